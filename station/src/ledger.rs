//! The station's privacy ledger: the ε each researcher has spent, per collaboration and
//! table, in an embedded SQLite database beside the audit log.
//!
//! A charge is checked against the budget and written in one `IMMEDIATE` transaction, and
//! the commit is durable (write-ahead log with `synchronous = FULL`: the log is fsynced
//! before the commit returns). The station charges before it runs a DP fragment and adds
//! noise only after the commit, so whatever a crash interrupts, the recorded spend is never
//! less than what was released: a charge whose release never happened stays charged (the
//! safe direction), and no release happens without its charge on disk.
//!
//! ```text
//!   charges(seq, time, researcher, collaboration, table_name, query_id, fragment, epsilon)
//!   spent(researcher, collaboration, table) = Σ epsilon
//! ```

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use rusqlite::{Connection, OptionalExtension, TransactionBehavior, params};

/// A ledger that cannot be opened or written.
#[derive(Debug, thiserror::Error)]
#[error("privacy ledger {path}: {message}")]
pub struct LedgerError {
    pub path: String,
    pub message: String,
}

/// Who is charged, for what.
#[derive(Debug, Clone, Copy)]
pub struct Charge<'a> {
    pub researcher: &'a str,
    pub collaboration: &'a str,
    pub table: &'a str,
    pub query_id: &'a str,
    pub fragment: u64,
    pub epsilon: f64,
}

/// The outcome of a charge.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Charged {
    /// Committed; the spend afterwards.
    Committed { spent: f64 },
    /// Refused (nothing written): the charge would take the spend past the budget.
    OverBudget { spent: f64 },
}

/// The ledger file and its connection.
pub struct Ledger {
    path: PathBuf,
    conn: Mutex<Connection>,
}

impl std::fmt::Debug for Ledger {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ledger").field("path", &self.path).finish()
    }
}

impl Ledger {
    /// Opens (or creates, with its directory) the ledger at `path`.
    pub fn open(path: &Path) -> Result<Self, LedgerError> {
        let error = |message: String| LedgerError {
            path: path.display().to_string(),
            message,
        };
        let conn = open_durable(
            path,
            "CREATE TABLE IF NOT EXISTS charges (
                     seq INTEGER PRIMARY KEY AUTOINCREMENT,
                     time TEXT NOT NULL,
                     researcher TEXT NOT NULL,
                     collaboration TEXT NOT NULL,
                     table_name TEXT NOT NULL,
                     query_id TEXT NOT NULL,
                     fragment INTEGER NOT NULL,
                     epsilon REAL NOT NULL CHECK (epsilon > 0)
                 );
                 CREATE INDEX IF NOT EXISTS charges_by_account
                     ON charges (researcher, collaboration, table_name);",
        )
        .map_err(error)?;
        Ok(Self {
            path: path.to_path_buf(),
            conn: Mutex::new(conn),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn error(&self, e: rusqlite::Error) -> LedgerError {
        LedgerError {
            path: self.path.display().to_string(),
            message: e.to_string(),
        }
    }

    /// The ε spent so far by `researcher` in `collaboration` on `table`.
    pub fn spent(
        &self,
        researcher: &str,
        collaboration: &str,
        table: &str,
    ) -> Result<f64, LedgerError> {
        // The lock guards the connection only; SQLite keeps the data consistent.
        let conn = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        spent(&conn, researcher, collaboration, table).map_err(|e| self.error(e))
    }

    /// Charges `charge.epsilon` if the spend stays within `budget`: checked and written in
    /// one transaction, committed durably before this returns.
    pub fn charge(&self, charge: Charge<'_>, budget: f64) -> Result<Charged, LedgerError> {
        let mut conn = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        let mut run = || -> rusqlite::Result<Charged> {
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let before = spent(&tx, charge.researcher, charge.collaboration, charge.table)?;
            // The rule is the policy crate's; the ledger applies it inside its transaction.
            if !railyard_policy::gate::within_budget(before, charge.epsilon, budget) {
                return Ok(Charged::OverBudget { spent: before });
            }
            tx.execute(
                "INSERT INTO charges (time, researcher, collaboration, table_name, query_id,
                                      fragment, epsilon)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                params![
                    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
                    charge.researcher,
                    charge.collaboration,
                    charge.table,
                    charge.query_id,
                    charge.fragment as i64,
                    charge.epsilon,
                ],
            )?;
            tx.commit()?;
            Ok(Charged::Committed {
                spent: before + charge.epsilon,
            })
        };
        run().map_err(|e| self.error(e))
    }
}

/// Opens (or creates, with its directory) the SQLite database at `path` for durable
/// commits (write-ahead log, `synchronous = FULL`: a commit is fsynced before it returns),
/// with `schema` applied; the new file's directory entry is synced too. The ledger and the
/// query-set auditor keep their state this way.
pub(crate) fn open_durable(path: &Path, schema: &str) -> Result<Connection, String> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| format!("cannot create: {e}"))?;
    }
    let conn = Connection::open(path).map_err(|e| e.to_string())?;
    let setup = || -> rusqlite::Result<()> {
        conn.busy_timeout(std::time::Duration::from_secs(10))?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.execute_batch(schema)
    };
    setup().map_err(|e| e.to_string())?;
    // The new file's directory entry must survive a crash too.
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty())
        && let Ok(d) = std::fs::File::open(dir)
    {
        let _ = d.sync_all();
    }
    Ok(conn)
}

fn spent(
    conn: &Connection,
    researcher: &str,
    collaboration: &str,
    table: &str,
) -> rusqlite::Result<f64> {
    conn.query_row(
        "SELECT total(epsilon) FROM charges
         WHERE researcher = ?1 AND collaboration = ?2 AND table_name = ?3",
        params![researcher, collaboration, table],
        |row| row.get::<_, f64>(0),
    )
    .optional()
    .map(|v| v.unwrap_or(0.0))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn charge(researcher: &str, epsilon: f64) -> Charge<'_> {
        Charge {
            researcher,
            collaboration: "c",
            table: "lung",
            query_id: "q",
            fragment: 1,
            epsilon,
        }
    }

    #[test]
    fn charges_add_up_per_account_and_stop_at_the_budget() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s/ledger.sqlite");
        let ledger = Ledger::open(&path).unwrap();
        for i in 1..=20 {
            assert_eq!(
                ledger.charge(charge("ann", 0.5), 10.0).unwrap(),
                Charged::Committed {
                    spent: 0.5 * f64::from(i)
                }
            );
        }
        assert_eq!(
            ledger.charge(charge("ann", 0.1), 10.0).unwrap(),
            Charged::OverBudget { spent: 10.0 }
        );
        assert_eq!(ledger.spent("ann", "c", "lung").unwrap(), 10.0);
        assert_eq!(ledger.spent("bob", "c", "lung").unwrap(), 0.0);
        assert_eq!(ledger.spent("ann", "other", "lung").unwrap(), 0.0);
        assert!(matches!(
            ledger.charge(charge("bob", 1.0), 10.0).unwrap(),
            Charged::Committed { spent } if spent == 1.0
        ));
        drop(ledger);
        // Reopened, the spend is still there.
        let ledger = Ledger::open(&path).unwrap();
        assert_eq!(ledger.spent("ann", "c", "lung").unwrap(), 10.0);
        assert_eq!(ledger.spent("bob", "c", "lung").unwrap(), 1.0);
    }

    #[test]
    fn a_non_positive_charge_is_an_error_not_a_refund() {
        let dir = tempfile::tempdir().unwrap();
        let ledger = Ledger::open(&dir.path().join("ledger.sqlite")).unwrap();
        assert!(ledger.charge(charge("ann", -1.0), 10.0).is_err());
        assert_eq!(ledger.spent("ann", "c", "lung").unwrap(), 0.0);
    }
}
