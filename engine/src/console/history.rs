//! The console's query history: what each researcher ran and how it ended, kept at the hub
//! as one JSON line per query (`DIR/console/history.jsonl`), so it survives a restart.
//!
//! An entry holds the researcher's own SQL and the outcome (rows answered, or the rule of a
//! refusal), never a value of the answer.

use std::io::Write;
use std::path::PathBuf;
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

/// Entries the console returns, newest first.
pub const SHOWN: usize = 100;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Entry {
    pub at: String,
    pub researcher: String,
    /// The researcher's collaboration on a deployed hub (empty on an open console).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub collaboration: String,
    pub sql: String,
    /// `answered`, `refused`, `failed` or `cancelled`.
    pub outcome: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rows: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rule: Option<String>,
}

/// The history file, appended under a lock.
pub struct History {
    path: PathBuf,
    lock: Mutex<()>,
}

impl History {
    pub fn new(path: PathBuf) -> Self {
        Self {
            path,
            lock: Mutex::new(()),
        }
    }

    /// Appends `entry`. A history that cannot be written does not fail the query: the
    /// failure is logged.
    pub fn record(&self, entry: &Entry) {
        // The lock guards the file's appends only; after a panic the file is still valid.
        let _guard = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        let result = (|| -> std::io::Result<()> {
            if let Some(dir) = self.path.parent() {
                std::fs::create_dir_all(dir)?;
            }
            let mut line = serde_json::to_vec(entry).map_err(std::io::Error::other)?;
            line.push(b'\n');
            let mut file = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&self.path)?;
            file.write_all(&line)
        })();
        if let Err(e) = result {
            tracing::warn!(
                "cannot write the console history {}: {e}",
                self.path.display()
            );
        }
    }

    /// `researcher`'s last [`SHOWN`] entries in `collaboration`, newest first. A line that does not parse (a
    /// write cut short by a crash) is skipped.
    pub fn of(&self, researcher: &str, collaboration: &str) -> Vec<Entry> {
        let _guard = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        let Ok(text) = std::fs::read_to_string(&self.path) else {
            return Vec::new();
        };
        let mut entries: Vec<Entry> = text
            .lines()
            .filter_map(|line| serde_json::from_str::<Entry>(line).ok())
            .filter(|e| e.researcher == researcher && e.collaboration == collaboration)
            .collect();
        entries.reverse();
        entries.truncate(SHOWN);
        entries
    }
}
