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
//! The order of one DP fragment, and what a crash at each step leaves:
//!
//! ```text
//!   1. charge ε, committed (fsync)       crash before: nothing charged, nothing released
//!   2. run the aggregate, add the noise  crash here: a charge without an audit record
//!   3. audit record with ε (fsync)       crash here: charged and audited, not released
//!   4. release the noised states
//! ```
//!
//! A charge without its audit record (step 2, or an audit log that could not be written)
//! gets one when the station starts: [`Ledger::unreconciled`] lists the charges since the
//! last start, the station counts their records in the audit log, and appends a `failed`
//! record with rule `recovered` and the ε for each charge that has none (nothing was
//! released under it: the release waits for the record). Only then does
//! [`Ledger::mark_reconciled`] move the watermark, so a crash during reconciliation is
//! reconciled again, without duplicates (records already written are counted).
//!
//! ```text
//!   charges(seq, time, researcher, collaboration, table_name, query_id, fragment, epsilon, sql)
//!   reconciled(seq)   every charge up to seq has its audit record
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
    /// The fragment's SQL, for the audit record a crash may leave to write.
    pub sql: &'a str,
}

/// A charge as recorded (see [`Ledger::unreconciled`]).
#[derive(Debug, Clone, PartialEq)]
pub struct Recorded {
    pub seq: u64,
    pub researcher: String,
    pub query_id: String,
    pub fragment: u64,
    pub epsilon: f64,
    pub sql: String,
}

/// The outcome of a charge.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Charged {
    /// Committed; the spend afterwards.
    Committed { spent: f64 },
    /// Refused (nothing written): the charge would take the spend past the budget.
    OverBudget { spent: f64 },
}

/// One account's spend, as [`Ledger::spending`] lists it.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Spending {
    pub researcher: String,
    pub collaboration: String,
    pub table: String,
    pub spent: f64,
    pub charges: u64,
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
                     ON charges (researcher, collaboration, table_name);
                 CREATE TABLE IF NOT EXISTS reconciled (
                     id INTEGER PRIMARY KEY CHECK (id = 1),
                     seq INTEGER NOT NULL
                 );",
        )
        .map_err(error)?;
        // Ledgers written before charges carried their SQL gain the column (empty).
        let has_sql = conn
            .prepare("SELECT 1 FROM pragma_table_info('charges') WHERE name = 'sql'")
            .and_then(|mut q| q.exists([]))
            .map_err(|e| error(e.to_string()))?;
        if !has_sql {
            conn.execute_batch("ALTER TABLE charges ADD COLUMN sql TEXT NOT NULL DEFAULT ''")
                .map_err(|e| error(e.to_string()))?;
        }
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

    /// Every account's spend so far: (researcher, collaboration, table, ε spent, charges),
    /// sorted by researcher, collaboration and table.
    pub fn spending(&self) -> Result<Vec<Spending>, LedgerError> {
        let conn = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        let mut query = conn
            .prepare(
                "SELECT researcher, collaboration, table_name, total(epsilon), count(*)
                 FROM charges GROUP BY researcher, collaboration, table_name
                 ORDER BY researcher, collaboration, table_name",
            )
            .map_err(|e| self.error(e))?;
        let rows = query
            .query_map([], |r| {
                Ok(Spending {
                    researcher: r.get(0)?,
                    collaboration: r.get(1)?,
                    table: r.get(2)?,
                    spent: r.get(3)?,
                    charges: r.get::<_, i64>(4)?.try_into().unwrap_or(0),
                })
            })
            .map_err(|e| self.error(e))?;
        rows.collect::<Result<_, _>>().map_err(|e| self.error(e))
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
                                      fragment, epsilon, sql)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
                params![
                    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
                    charge.researcher,
                    charge.collaboration,
                    charge.table,
                    charge.query_id,
                    charge.fragment as i64,
                    charge.epsilon,
                    charge.sql,
                ],
            )?;
            tx.commit()?;
            Ok(Charged::Committed {
                spent: before + charge.epsilon,
            })
        };
        run().map_err(|e| self.error(e))
    }

    /// The charges after the reconciliation watermark, in order: those whose audit records
    /// the station has not checked since it last started.
    pub fn unreconciled(&self) -> Result<Vec<Recorded>, LedgerError> {
        let conn = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        let run = || -> rusqlite::Result<Vec<Recorded>> {
            let mut q = conn.prepare(
                "SELECT seq, researcher, query_id, fragment, epsilon, sql FROM charges
                 WHERE seq > (SELECT coalesce(max(seq), 0) FROM reconciled) ORDER BY seq",
            )?;
            q.query_map([], |row| {
                Ok(Recorded {
                    seq: row.get::<_, i64>(0)? as u64,
                    researcher: row.get(1)?,
                    query_id: row.get(2)?,
                    fragment: row.get::<_, i64>(3)? as u64,
                    epsilon: row.get(4)?,
                    sql: row.get(5)?,
                })
            })?
            .collect()
        };
        run().map_err(|e| self.error(e))
    }

    /// Records (durably) that every charge up to `seq` has its audit record.
    pub fn mark_reconciled(&self, seq: u64) -> Result<(), LedgerError> {
        let conn = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        conn.execute(
            "INSERT INTO reconciled (id, seq) VALUES (1, ?1)
             ON CONFLICT (id) DO UPDATE SET seq = max(seq, excluded.seq)",
            params![seq as i64],
        )
        .map(|_| ())
        .map_err(|e| self.error(e))
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
            sql: "SELECT partial_dp_count(1) AS a0 FROM lung",
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
    fn charges_after_the_watermark_are_unreconciled_across_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ledger.sqlite");
        let ledger = Ledger::open(&path).unwrap();
        assert_eq!(ledger.unreconciled().unwrap(), vec![]);
        ledger.charge(charge("ann", 0.5), 10.0).unwrap();
        ledger.charge(charge("bob", 0.25), 10.0).unwrap();
        let pending = ledger.unreconciled().unwrap();
        assert_eq!(
            pending
                .iter()
                .map(|c| (c.researcher.as_str(), c.epsilon, c.sql.as_str()))
                .collect::<Vec<_>>(),
            vec![
                ("ann", 0.5, "SELECT partial_dp_count(1) AS a0 FROM lung"),
                ("bob", 0.25, "SELECT partial_dp_count(1) AS a0 FROM lung")
            ]
        );
        ledger.mark_reconciled(pending[0].seq).unwrap();
        drop(ledger);
        let ledger = Ledger::open(&path).unwrap();
        let pending = ledger.unreconciled().unwrap();
        assert_eq!(pending.len(), 1);
        assert_eq!(pending[0].researcher, "bob");
        ledger.mark_reconciled(pending[0].seq).unwrap();
        // The watermark never moves back.
        ledger.mark_reconciled(1).unwrap();
        assert_eq!(ledger.unreconciled().unwrap(), vec![]);
    }

    #[test]
    fn a_ledger_from_before_the_sql_column_gains_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ledger.sqlite");
        let old = Connection::open(&path).unwrap();
        old.execute_batch(
            "CREATE TABLE charges (seq INTEGER PRIMARY KEY AUTOINCREMENT, time TEXT NOT NULL,
                 researcher TEXT NOT NULL, collaboration TEXT NOT NULL,
                 table_name TEXT NOT NULL, query_id TEXT NOT NULL, fragment INTEGER NOT NULL,
                 epsilon REAL NOT NULL CHECK (epsilon > 0));
             INSERT INTO charges (time, researcher, collaboration, table_name, query_id,
                 fragment, epsilon) VALUES ('t', 'ann', 'c', 'lung', 'q0', 1, 0.5);",
        )
        .unwrap();
        drop(old);
        let ledger = Ledger::open(&path).unwrap();
        assert_eq!(ledger.spent("ann", "c", "lung").unwrap(), 0.5);
        let pending = ledger.unreconciled().unwrap();
        assert_eq!(
            (pending[0].query_id.as_str(), pending[0].sql.as_str()),
            ("q0", "")
        );
        ledger.charge(charge("ann", 0.5), 10.0).unwrap();
        assert_eq!(ledger.spent("ann", "c", "lung").unwrap(), 1.0);
    }

    #[test]
    fn a_non_positive_charge_is_an_error_not_a_refund() {
        let dir = tempfile::tempdir().unwrap();
        let ledger = Ledger::open(&dir.path().join("ledger.sqlite")).unwrap();
        assert!(ledger.charge(charge("ann", -1.0), 10.0).is_err());
        assert_eq!(ledger.spent("ann", "c", "lung").unwrap(), 0.0);
    }
}
