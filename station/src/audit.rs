//! The station's tamper-evident audit log.
//!
//! One JSON line per fragment decision, appended and flushed to disk (`fsync`) before any
//! batch of that fragment leaves the station. Every record carries the hash of the record
//! before it and its own hash:
//!
//! ```text
//!   hash(n) = SHA-256( hash(n-1) as hex  ||  "\n"  ||  record n without its "hash" field, as JSON )
//!   hash(0) of the first record's predecessor = 64 zeros
//! ```
//!
//! so editing, inserting or deleting a record breaks the chain at that record, which
//! [`verify`] reports. A station killed while writing leaves at most one incomplete last
//! line; [`AuditLog::open`] cuts it off (it was never acknowledged, so nothing was released
//! under it) and continues the chain from the last complete record.

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// What the station decided about one fragment.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Decision {
    /// The fragment passed the policy; `rows`/`groups` say what was released.
    Allowed,
    /// The policy refused the fragment; `rule` names why. Nothing was released.
    Refused,
    /// The fragment passed the policy but failed while running. Nothing was released.
    Failed,
}

/// One audit record, as written (without its hash).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Record {
    pub seq: u64,
    /// RFC 3339 UTC time of the decision.
    pub time: String,
    pub station: String,
    /// The researcher the hub named, or `local`.
    pub researcher: String,
    pub query_id: String,
    pub fragment: u64,
    pub sql: String,
    /// For a train: the image id it ran (its input is `sql`), or, if refused before the
    /// image was resolved, the image name asked for.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub train: Option<String>,
    /// For a train: its arguments (JSON text), which decide what the image computes.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub args: Option<String>,
    pub decision: Decision,
    /// The refusing rule, or the failure category.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub rule: Option<String>,
    /// Rows released (for an aggregate: the groups released).
    pub rows: u64,
    /// Groups withheld because they counted fewer than k rows.
    pub suppressed: u64,
    /// For a differentially private release: the ε charged to the researcher's budget.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub epsilon: Option<f64>,
    /// Hash of the previous record.
    pub prev: String,
}

#[derive(Serialize, Deserialize)]
struct Line {
    #[serde(flatten)]
    record: Record,
    hash: String,
}

fn hash_of(record: &Record) -> String {
    let body = serde_json::to_string(record).expect("an audit record always serializes");
    let mut h = Sha256::new();
    h.update(record.prev.as_bytes());
    h.update(b"\n");
    h.update(body.as_bytes());
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

/// The fields of a record the station fills in; sequence, time and chain are added on append.
#[derive(Debug, Clone)]
pub struct Entry<'a> {
    pub researcher: &'a str,
    pub query_id: &'a str,
    pub fragment: u64,
    pub sql: &'a str,
    pub train: Option<&'a str>,
    pub args: Option<&'a str>,
    pub decision: Decision,
    pub rule: Option<&'a str>,
    pub rows: u64,
    pub suppressed: u64,
    pub epsilon: Option<f64>,
}

struct Tail {
    file: File,
    seq: u64,
    hash: String,
}

/// An open audit log; appends are serialized.
pub struct AuditLog {
    path: PathBuf,
    station: String,
    tail: Mutex<Tail>,
}

/// Why an audit log cannot be opened or appended to.
#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error("audit log {path}: {message}")]
    Io { path: String, message: String },
    #[error("audit log {path}: record {line} is broken ({why}); run `railyard audit verify`")]
    Broken {
        path: String,
        line: usize,
        why: String,
    },
}

impl AuditLog {
    /// Opens (or creates) the log at `path` for `station`, checking the whole chain and
    /// cutting off an incomplete last line left by a crash.
    pub fn open(path: &Path, station: &str) -> Result<Self, AuditError> {
        let io = |e: std::io::Error| AuditError::Io {
            path: path.display().to_string(),
            message: e.to_string(),
        };
        if let Some(dir) = path.parent()
            && !dir.as_os_str().is_empty()
        {
            std::fs::create_dir_all(dir).map_err(io)?;
        }
        let mut file = OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .open(path)
            .map_err(io)?;
        let report = scan(&mut file).map_err(io)?;
        if let Some(broken) = report.broken {
            return Err(AuditError::Broken {
                path: path.display().to_string(),
                line: broken.line,
                why: broken.why,
            });
        }
        if report.torn_at.is_some() {
            file.set_len(report.good_bytes).map_err(io)?;
            file.sync_all().map_err(io)?;
            tracing::warn!(path = %path.display(), "audit log: cut off an incomplete last record left by a crash");
        }
        file.seek(SeekFrom::End(0)).map_err(io)?;
        Ok(Self {
            path: path.to_path_buf(),
            station: station.to_string(),
            tail: Mutex::new(Tail {
                file,
                seq: report.records,
                hash: report.last_hash,
            }),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends one record and flushes it to disk; returns once it is durable.
    pub fn append(&self, entry: Entry<'_>) -> Result<(), AuditError> {
        // The lock guards the file and chain head; after a panic mid-append the next open
        // re-validates the file, so continuing with the in-memory head is safe.
        let mut tail = self.tail.lock().unwrap_or_else(|p| p.into_inner());
        let record = Record {
            seq: tail.seq + 1,
            time: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
            station: self.station.clone(),
            researcher: entry.researcher.to_string(),
            query_id: entry.query_id.to_string(),
            fragment: entry.fragment,
            sql: entry.sql.to_string(),
            train: entry.train.map(str::to_string),
            args: entry.args.map(str::to_string),
            decision: entry.decision,
            rule: entry.rule.map(str::to_string),
            rows: entry.rows,
            suppressed: entry.suppressed,
            epsilon: entry.epsilon,
            prev: tail.hash.clone(),
        };
        let hash = hash_of(&record);
        let mut line = serde_json::to_vec(&Line {
            record,
            hash: hash.clone(),
        })
        .expect("an audit record always serializes");
        line.push(b'\n');
        let io = |e: std::io::Error| AuditError::Io {
            path: self.path.display().to_string(),
            message: e.to_string(),
        };
        tail.file.write_all(&line).map_err(io)?;
        tail.file.sync_data().map_err(io)?;
        tail.seq += 1;
        tail.hash = hash;
        Ok(())
    }
}

#[derive(Debug)]
struct Broken {
    line: usize,
    why: String,
}

struct Scan {
    records: u64,
    last_hash: String,
    good_bytes: u64,
    /// Line number of an incomplete last line (no newline at the end of the file).
    torn_at: Option<usize>,
    broken: Option<Broken>,
}

fn scan(file: &mut File) -> std::io::Result<Scan> {
    file.seek(SeekFrom::Start(0))?;
    let mut reader = BufReader::new(&mut *file);
    let mut out = Scan {
        records: 0,
        last_hash: GENESIS.to_string(),
        good_bytes: 0,
        torn_at: None,
        broken: None,
    };
    let mut buf = Vec::new();
    let mut number = 0;
    loop {
        buf.clear();
        let n = reader.read_until(b'\n', &mut buf)?;
        if n == 0 {
            break;
        }
        number += 1;
        if buf.last() != Some(&b'\n') {
            // A crash cut the last write short: it was never acknowledged.
            out.torn_at = Some(number);
            break;
        }
        let fail = |why: String| Broken { line: number, why };
        let line: Line = match serde_json::from_slice(&buf[..buf.len() - 1]) {
            Ok(line) => line,
            Err(e) => {
                out.broken = Some(fail(format!("not a valid record: {e}")));
                break;
            }
        };
        if line.record.seq != out.records + 1 {
            out.broken = Some(fail(format!(
                "sequence number {} where {} was expected",
                line.record.seq,
                out.records + 1
            )));
            break;
        }
        if line.record.prev != out.last_hash {
            out.broken = Some(fail(
                "it does not point to the hash of the record before it".to_string(),
            ));
            break;
        }
        if hash_of(&line.record) != line.hash {
            out.broken = Some(fail(
                "its content does not match its hash: it was edited".to_string(),
            ));
            break;
        }
        out.records += 1;
        out.last_hash = line.hash;
        out.good_bytes += n as u64;
    }
    Ok(out)
}

/// The outcome of [`verify`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified {
    /// Complete records whose chain holds.
    pub records: u64,
    /// Hash of the last good record (to compare with a copy kept elsewhere: truncating the
    /// log at a record boundary cannot be detected from the file alone).
    pub head: String,
    /// An incomplete last line (a crash while writing; never acknowledged).
    pub torn_tail: bool,
    /// The first broken record: its line number and why.
    pub broken: Option<(usize, String)>,
}

/// Checks the hash chain of the log at `path`.
pub fn verify(path: &Path) -> std::io::Result<Verified> {
    let mut file = File::open(path)?;
    let scan = scan(&mut file)?;
    Ok(Verified {
        records: scan.records,
        head: scan.last_hash,
        torn_tail: scan.torn_at.is_some(),
        broken: scan.broken.map(|b| (b.line, b.why)),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(decision: Decision) -> Entry<'static> {
        Entry {
            researcher: "local",
            query_id: "q",
            fragment: 1,
            sql: "SELECT count(*) FROM lung",
            train: None,
            args: None,
            decision,
            rule: None,
            rows: 1,
            suppressed: 0,
            epsilon: None,
        }
    }

    #[test]
    fn appended_records_chain_and_survive_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a/audit.jsonl");
        let log = AuditLog::open(&path, "s").unwrap();
        log.append(entry(Decision::Allowed)).unwrap();
        log.append(entry(Decision::Refused)).unwrap();
        drop(log);
        let log = AuditLog::open(&path, "s").unwrap();
        log.append(entry(Decision::Allowed)).unwrap();
        let v = verify(&path).unwrap();
        assert_eq!(v.records, 3);
        assert!(v.broken.is_none() && !v.torn_tail);
    }

    #[test]
    fn an_edited_record_is_found() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let log = AuditLog::open(&path, "s").unwrap();
        for _ in 0..3 {
            log.append(entry(Decision::Allowed)).unwrap();
        }
        let text = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        let edited = lines[1].replace("\"rows\":1", "\"rows\":7");
        assert_ne!(edited, lines[1]);
        std::fs::write(&path, format!("{}\n{edited}\n{}\n", lines[0], lines[2])).unwrap();
        let v = verify(&path).unwrap();
        assert_eq!(v.records, 1);
        assert_eq!(v.broken.as_ref().map(|b| b.0), Some(2), "{v:?}");
        assert!(AuditLog::open(&path, "s").is_err());

        // Deleting a record breaks the chain at the record after it.
        std::fs::write(&path, format!("{}\n{}\n", lines[0], lines[2])).unwrap();
        assert_eq!(verify(&path).unwrap().broken.map(|b| b.0), Some(2));
    }

    #[test]
    fn a_torn_last_line_is_cut_off_on_open() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let log = AuditLog::open(&path, "s").unwrap();
        log.append(entry(Decision::Allowed)).unwrap();
        drop(log);
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(b"{\"seq\":2,\"ti").unwrap();
        drop(f);
        let v = verify(&path).unwrap();
        assert!(v.torn_tail && v.broken.is_none() && v.records == 1);
        let log = AuditLog::open(&path, "s").unwrap();
        log.append(entry(Decision::Allowed)).unwrap();
        let v = verify(&path).unwrap();
        assert!(
            !v.torn_tail && v.broken.is_none() && v.records == 2,
            "{v:?}"
        );
    }
}
