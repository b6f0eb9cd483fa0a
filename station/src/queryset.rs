//! The station's query-set auditor: the sets of patients it released to each researcher,
//! in an embedded SQLite database beside the audit log (`querysets.sqlite`), and the
//! decision of [`railyard_policy::queryset`] on every new release.
//!
//! ```text
//!   sets(seq, researcher, collaboration, domain, query_id, fragment, merged, size, bitmap)
//!   a release's sets ──▶ compared with the account's sets (and with each other)
//!                        ├ too close to one: refused, rule `differencing`, naming its query
//!                        └ else: the new distinct sets are committed (fsync) before the
//!                          release leaves; a store that cannot be written refuses
//! ```
//!
//! An account is (researcher, collaboration, domain): the domain is the patients of a
//! privacy-unit column, or the rows of a table without one (see
//! [`railyard_policy::Checked::audit`]). Beyond the policy's `max_query_sets` per account the
//! two oldest sets are merged into their union: compacted, never forgotten (a difference
//! from the union is still seen; one from a single old set may no longer be).
//!
//! Sets are cached per account after the first read; one lock serializes the decide-and-
//! commit of an account's releases, so two concurrent fragments cannot both pass against a
//! state that holds neither.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use railyard_policy::Refusal;
use railyard_policy::queryset::{Earlier, ReleasedSet};
use railyard_policy::release::{ReleasedUnits, ThresholdKey};
use railyard_udfs::unit_set::Set;
use railyard_udfs::unit_share::UnitHashing;
use roaring::RoaringBitmap;
use rusqlite::{Connection, TransactionBehavior, params};

/// A store that cannot be opened or written.
#[derive(Debug, thiserror::Error)]
#[error("query-set store {path}: {message}")]
pub struct StoreError {
    pub path: String,
    pub message: String,
}

/// One remembered set.
#[derive(Debug, Clone)]
struct Remembered {
    seq: i64,
    query_id: String,
    /// How many released sets it is the union of (1: as released).
    merged: u64,
    set: RoaringBitmap,
}

type Account = (String, String, String);

/// What a release is audited as.
#[derive(Debug, Clone, Copy)]
pub struct Release<'a> {
    pub researcher: &'a str,
    pub collaboration: &'a str,
    pub domain: &'a str,
    pub table: &'a str,
    pub query_id: &'a str,
    pub fragment: usize,
    pub k: u64,
}

/// The auditor's database and its cache.
pub struct QuerySets {
    path: PathBuf,
    /// The connection and every account read so far (one lock: decide and commit together).
    inner: Mutex<Inner>,
}

struct Inner {
    conn: Connection,
    accounts: HashMap<Account, Vec<Remembered>>,
    numbers: Numbers,
    numbered: Numbered,
}

/// Released sets of units already numbered, in the station's numbering: a set released
/// again (every run of a query after its first) is looked up rather than renumbered and
/// built into a bitmap (a hash lookup and a sort per patient). Only sets whose every unit
/// had its number before are kept, and a unit's number never changes, so a kept bitmap is
/// what renumbering the set would build. Bounded: past [`NUMBERED_ELEMENTS`] elements in
/// all it starts over.
#[derive(Default)]
struct Numbered {
    sets: HashMap<Set, RoaringBitmap, UnitHashing>,
    elements: usize,
}

const NUMBERED_ELEMENTS: usize = 1 << 20;

impl Numbered {
    fn keep(&mut self, set: &Set, numbered: &RoaringBitmap) {
        let len = set.len() as usize;
        if len > NUMBERED_ELEMENTS {
            return;
        }
        if self.elements + len > NUMBERED_ELEMENTS {
            self.sets.clear();
            self.elements = 0;
        }
        if self.sets.insert(set.clone(), numbered.clone()).is_none() {
            self.elements += len;
        }
    }
}

/// The station's dense numbering of its units. A released set holds 32-bit unit hashes,
/// which scatter over the whole range (a roaring bitmap then spends about 10 bytes per
/// patient); numbered 0, 1, 2, … in order of first release, a set takes at most 2 bytes per
/// patient and at most 8 KiB per 65,536 numbers (one bit each). One numbering per
/// station, shared by every account.
#[derive(Default)]
struct Numbers {
    id_of: HashMap<u32, u32, UnitHashing>,
    unit_of: Vec<u32>,
}

impl std::fmt::Debug for QuerySets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QuerySets")
            .field("path", &self.path)
            .finish()
    }
}

/// The outcome of auditing a release.
#[derive(Debug)]
pub enum Audited {
    /// Committed: the release may leave.
    Allowed,
    /// Refused: nothing was written.
    Refused(Refusal),
}

impl QuerySets {
    /// Opens (or creates, with its directory) the store at `path`.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let error = |message: String| StoreError {
            path: path.display().to_string(),
            message,
        };
        let conn = crate::ledger::open_durable(
            path,
            "CREATE TABLE IF NOT EXISTS sets (
                     seq INTEGER PRIMARY KEY AUTOINCREMENT,
                     time TEXT NOT NULL,
                     researcher TEXT NOT NULL,
                     collaboration TEXT NOT NULL,
                     domain TEXT NOT NULL,
                     query_id TEXT NOT NULL,
                     fragment INTEGER NOT NULL,
                     merged INTEGER NOT NULL,
                     size INTEGER NOT NULL,
                     bitmap BLOB NOT NULL
                 );
                 CREATE INDEX IF NOT EXISTS sets_by_account
                     ON sets (researcher, collaboration, domain, seq);
                 CREATE TABLE IF NOT EXISTS units (
                     id INTEGER PRIMARY KEY,
                     unit INTEGER NOT NULL UNIQUE
                 );",
        )
        .map_err(error)?;
        let numbers = load_numbers(&conn).map_err(error)?;
        Ok(Self {
            path: path.to_path_buf(),
            inner: Mutex::new(Inner {
                conn,
                accounts: HashMap::new(),
                numbers,
                numbered: Numbered::default(),
            }),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn error(&self, message: impl std::fmt::Display) -> StoreError {
        StoreError {
            path: self.path.display().to_string(),
            message: message.to_string(),
        }
    }

    /// Audits `sets`, one release: refused if one is too close to a remembered set of the
    /// account or to another of them; otherwise the new distinct sets are committed
    /// durably (compacting the oldest beyond `max_sets`) before this returns.
    pub fn audit(
        &self,
        release: Release<'_>,
        sets: &[ReleasedUnits],
        max_sets: u64,
        key: &ThresholdKey,
    ) -> Result<Audited, StoreError> {
        // The lock guards the connection and the cache; after a panic the cache may lack a
        // committed set, so it is dropped and re-read.
        let inner = match self.inner.lock() {
            Ok(inner) => inner,
            Err(poisoned) => {
                let mut inner = poisoned.into_inner();
                inner.accounts.clear();
                inner.numbered = Numbered::default();
                inner
            }
        };
        let audited = self.audit_locked(inner, release, sets, max_sets, key, true)?;
        Ok(audited.expect("an audit that may read and write always decides"))
    }

    /// [`Self::audit`] when it needs neither the disk nor a wait: the decision on a release
    /// whose account is cached and which is refused or holds only sets already remembered
    /// (every run of a query after its first). `None` when the decision would read or write
    /// the store, or another release holds the lock: the caller then audits it with
    /// [`Self::audit`] off the async workers. Called on an async worker, so it never blocks.
    pub fn audit_in_memory(
        &self,
        release: Release<'_>,
        sets: &[ReleasedUnits],
        max_sets: u64,
        key: &ThresholdKey,
    ) -> Option<Audited> {
        // A poisoned lock is left to `audit`, which re-reads the cache; without I/O nothing
        // fails, and anything that did would be decided (and reported) by `audit`.
        let inner = self.inner.try_lock().ok()?;
        self.audit_locked(inner, release, sets, max_sets, key, false)
            .ok()
            .flatten()
    }

    /// The decision on a release under the lock; `io`: the store may be read (an account
    /// not cached) and written (new sets). Without it, `None` where either would be needed.
    fn audit_locked(
        &self,
        mut inner: std::sync::MutexGuard<'_, Inner>,
        release: Release<'_>,
        sets: &[ReleasedUnits],
        max_sets: u64,
        key: &ThresholdKey,
        io: bool,
    ) -> Result<Option<Audited>, StoreError> {
        if sets.is_empty() {
            return Ok(Some(Audited::Allowed));
        }
        let account: Account = (
            release.researcher.to_string(),
            release.collaboration.to_string(),
            release.domain.to_string(),
        );
        if !inner.accounts.contains_key(&account) {
            if !io {
                return Ok(None);
            }
            let loaded = load(&inner.conn, &account).map_err(|e| self.error(e))?;
            inner.accounts.insert(account.clone(), loaded);
        }
        let Inner {
            conn,
            accounts,
            numbers,
            numbered,
        } = &mut *inner;
        let remembered = accounts.get_mut(&account).expect("the account was loaded");
        // The release's sets in the station's numbering; units never released before get
        // the next numbers, kept only if the release is committed.
        let known = numbers.unit_of.len();
        let mut fresh: Vec<u32> = Vec::new();
        let mut fresh_id: HashMap<u32, u32, UnitHashing> = HashMap::default();
        let sets: Vec<ReleasedSet> = sets
            .iter()
            .map(|s| {
                if let Some(set) = numbered.sets.get(&s.set) {
                    return ReleasedSet {
                        group: s.group,
                        set: set.clone(),
                    };
                }
                let set = bitmap_of(
                    s.set
                        .iter()
                        .map(|unit| match numbers.id_of.get(&unit) {
                            Some(id) => *id,
                            None => *fresh_id.entry(unit).or_insert_with(|| {
                                fresh.push(unit);
                                (known + fresh.len() - 1) as u32
                            }),
                        })
                        .collect(),
                );
                // Numbers below `known` were all given before this release.
                if set.max().is_none_or(|id| (id as usize) < known) {
                    numbered.keep(&s.set, &set);
                }
                ReleasedSet {
                    group: s.group,
                    set,
                }
            })
            .collect();
        let unit_of = |id: u32| -> u32 {
            let id = id as usize;
            if id < known {
                numbers.unit_of[id]
            } else {
                fresh.get(id - known).copied().unwrap_or(id as u32)
            }
        };
        {
            let earlier: Vec<Earlier<'_>> = remembered
                .iter()
                .map(|r| Earlier {
                    query_id: &r.query_id,
                    set: &r.set,
                })
                .collect();
            if let Err(refusal) = railyard_policy::queryset::check(
                release.table,
                release.query_id,
                &sets,
                &earlier,
                release.k,
                key,
                &unit_of,
            ) {
                return Ok(Some(Audited::Refused(refusal)));
            }
        }
        let new: Vec<&RoaringBitmap> = sets
            .iter()
            .map(|s| &s.set)
            .filter(|s| !remembered.iter().any(|r| r.set == **s))
            .collect();
        if new.is_empty() {
            return Ok(Some(Audited::Allowed));
        }
        if !io {
            return Ok(None);
        }
        // Nothing of a failed transaction stays, and the cache changes only after the
        // commit: a store that cannot be written leaves both as they were.
        let units = Fresh {
            first: known as u32,
            units: &fresh,
        };
        commit(conn, &account, release, &new, units, max_sets, remembered)
            .map_err(|e| self.error(e))?;
        for (i, unit) in fresh.iter().enumerate() {
            numbers.id_of.insert(*unit, (known + i) as u32);
        }
        numbers.unit_of.extend(fresh);
        Ok(Some(Audited::Allowed))
    }

    /// How many sets an account holds and their serialized size in bytes (for the
    /// auditor's cost in benchmarks and notes).
    pub fn footprint(&self) -> Result<(u64, u64), StoreError> {
        let inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        inner
            .conn
            .query_row(
                "SELECT count(*), coalesce(sum(length(bitmap)), 0) FROM sets",
                [],
                |row| Ok((row.get::<_, i64>(0)? as u64, row.get::<_, i64>(1)? as u64)),
            )
            .map_err(|e| self.error(e))
    }
}

/// The set of `elements`, in any order, with repeats. Sorted first, the bitmap appends each
/// element to its last container; inserted in any other order, it searches and shifts its
/// containers for every one.
fn bitmap_of(mut elements: Vec<u32>) -> RoaringBitmap {
    elements.sort_unstable();
    elements.dedup();
    RoaringBitmap::from_sorted_iter(elements).expect("sorted, deduplicated elements ascend")
}

/// A stored set's bytes (the roaring bitmap's portable format) back as the set (`None`:
/// they are not a bitmap).
fn decode(bytes: &[u8]) -> Option<RoaringBitmap> {
    RoaringBitmap::deserialize_from(bytes).ok()
}

/// A set as the bytes the store keeps.
fn encode(set: &RoaringBitmap) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(set.serialized_size());
    set.serialize_into(&mut bytes)
        .expect("writing into a Vec cannot fail");
    bytes
}

/// Units numbered by a release: `units[i]` gets number `first + i`.
struct Fresh<'a> {
    first: u32,
    units: &'a [u32],
}

fn load_numbers(conn: &Connection) -> Result<Numbers, String> {
    let mut statement = conn
        .prepare("SELECT id, unit FROM units ORDER BY id")
        .map_err(|e| e.to_string())?;
    let rows = statement
        .query_map([], |row| Ok((row.get::<_, i64>(0)?, row.get::<_, i64>(1)?)))
        .map_err(|e| e.to_string())?;
    let mut numbers = Numbers::default();
    for row in rows {
        let (id, unit) = row.map_err(|e| e.to_string())?;
        // Numbers are dense from 0: a gap means a damaged file, and sets read against it
        // would name other patients.
        if id != numbers.unit_of.len() as i64 {
            return Err(format!(
                "unit number {id} is out of sequence (the file is damaged)"
            ));
        }
        let unit = unit as u32;
        numbers.id_of.insert(unit, id as u32);
        numbers.unit_of.push(unit);
    }
    Ok(numbers)
}

fn load(conn: &Connection, account: &Account) -> Result<Vec<Remembered>, String> {
    let mut statement = conn
        .prepare(
            "SELECT seq, query_id, merged, bitmap FROM sets
             WHERE researcher = ?1 AND collaboration = ?2 AND domain = ?3 ORDER BY seq",
        )
        .map_err(|e| e.to_string())?;
    let rows = statement
        .query_map(params![account.0, account.1, account.2], |row| {
            Ok((
                row.get::<_, i64>(0)?,
                row.get::<_, String>(1)?,
                row.get::<_, i64>(2)?,
                row.get::<_, Vec<u8>>(3)?,
            ))
        })
        .map_err(|e| e.to_string())?;
    let mut out = Vec::new();
    for row in rows {
        let (seq, query_id, merged, bytes) = row.map_err(|e| e.to_string())?;
        // A set that cannot be read fails the account closed: nothing is released against
        // a state the auditor cannot see.
        let set = decode(&bytes)
            .ok_or_else(|| format!("set {seq} is not a bitmap (the file is damaged)"))?;
        out.push(Remembered {
            seq,
            query_id,
            merged: merged.max(1) as u64,
            set,
        });
    }
    Ok(out)
}

/// Inserts `new` and compacts beyond `max_sets` (the oldest sets become their union), in
/// one durable transaction; `remembered`, the account's cached sets, follows only once the
/// transaction has committed.
fn commit(
    conn: &mut Connection,
    account: &Account,
    release: Release<'_>,
    new: &[&RoaringBitmap],
    fresh: Fresh<'_>,
    max_sets: u64,
    remembered: &mut Vec<Remembered>,
) -> rusqlite::Result<()> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    for (i, unit) in fresh.units.iter().enumerate() {
        tx.execute(
            "INSERT INTO units (id, unit) VALUES (?1, ?2)",
            params![i64::from(fresh.first) + i as i64, i64::from(*unit)],
        )?;
    }
    let now = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Micros, true);
    let insert = |query_id: &str,
                  fragment: usize,
                  merged: u64,
                  set: &RoaringBitmap|
     -> rusqlite::Result<i64> {
        tx.execute(
            "INSERT INTO sets (time, researcher, collaboration, domain, query_id, fragment,
                               merged, size, bitmap)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
            params![
                now,
                account.0,
                account.1,
                account.2,
                query_id,
                fragment as i64,
                merged as i64,
                set.len() as i64,
                encode(set),
            ],
        )?;
        Ok(tx.last_insert_rowid())
    };
    // Beyond the limit, the oldest `over + 1` sets become one: their union, under the
    // oldest one's query id.
    let max = usize::try_from(max_sets.max(2)).unwrap_or(usize::MAX);
    let over = (remembered.len() + new.len()).saturating_sub(max);
    let compacted = if over > 0 && remembered.len() > over {
        let oldest = &remembered[..=over];
        let mut union = RoaringBitmap::new();
        for r in oldest {
            union |= &r.set;
            tx.execute("DELETE FROM sets WHERE seq = ?1", params![r.seq])?;
        }
        let merged: u64 = oldest.iter().map(|r| r.merged).sum();
        let query_id = oldest[0].query_id.clone();
        // A merged set belongs to no one fragment (0).
        let seq = insert(&query_id, 0, merged, &union)?;
        Some(Remembered {
            seq,
            query_id,
            merged,
            set: union,
        })
    } else {
        None
    };
    let mut added = Vec::with_capacity(new.len());
    for set in new {
        let seq = insert(release.query_id, release.fragment, 1, set)?;
        added.push(Remembered {
            seq,
            query_id: release.query_id.to_string(),
            merged: 1,
            set: (*set).clone(),
        });
    }
    tx.commit()?;
    if let Some(merged) = compacted {
        remembered.drain(..=over);
        remembered.insert(0, merged);
    }
    remembered.extend(added);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn release<'a>(researcher: &'a str, query_id: &'a str) -> Release<'a> {
        Release {
            researcher,
            collaboration: "",
            domain: "unit:patient_id",
            table: "lung",
            query_id,
            fragment: 1,
            k: 5,
        }
    }

    fn key() -> ThresholdKey {
        ThresholdKey::new([1u8; 32], 3)
    }

    /// A release of one set, as the release hands it over (unit elements).
    fn one(set: &RoaringBitmap) -> Vec<ReleasedUnits> {
        vec![ReleasedUnits {
            group: Some(0),
            set: set.iter().collect(),
        }]
    }

    #[test]
    fn a_difference_is_refused_per_researcher_and_survives_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s/querysets.sqlite");
        let all: RoaringBitmap = (0..228).collect();
        let mut but_one = all.clone();
        but_one.remove(3);
        {
            let store = QuerySets::open(&path).unwrap();
            let first = store
                .audit(release("ann", "q1"), &one(&all), 100, &key())
                .unwrap();
            assert!(matches!(first, Audited::Allowed));
            // Another researcher's sets are not ann's.
            let bob = store
                .audit(release("bob", "q2"), &one(&but_one), 100, &key())
                .unwrap();
            assert!(matches!(bob, Audited::Allowed));
        }
        let store = QuerySets::open(&path).unwrap();
        match store
            .audit(release("ann", "q3"), &one(&but_one), 100, &key())
            .unwrap()
        {
            Audited::Refused(r) => assert!(r.message.contains("q1"), "{}", r.message),
            Audited::Allowed => panic!("the difference of one patient passed after a restart"),
        }
        // The same set again passes and is not stored twice.
        let again = store
            .audit(release("ann", "q4"), &one(&all), 100, &key())
            .unwrap();
        assert!(matches!(again, Audited::Allowed));
        assert_eq!(store.footprint().unwrap().0, 2);
    }

    /// Sets numbered before are looked up, not renumbered: the lookup holds what
    /// renumbering builds, and a difference of one patient is refused when both sets come
    /// from it.
    #[test]
    fn sets_numbered_before_decide_as_renumbered_ones() {
        let dir = tempfile::tempdir().unwrap();
        let store = QuerySets::open(&dir.path().join("q.sqlite")).unwrap();
        let all: RoaringBitmap = (0..228).map(|i| i * 7919 + 13).collect();
        let mut but_one = all.clone();
        but_one.remove(7 * 7919 + 13);
        let audit = |who, id, set: &RoaringBitmap| {
            store
                .audit(release(who, id), &one(set), 100, &key())
                .unwrap()
        };
        assert!(matches!(audit("ann", "q1", &all), Audited::Allowed));
        // Every unit of `all` is numbered now: from here on its sets are looked up.
        assert!(matches!(audit("ann", "q2", &all), Audited::Allowed));
        assert!(matches!(audit("bob", "q3", &but_one), Audited::Allowed));
        assert!(matches!(audit("bob", "q4", &but_one), Audited::Allowed));
        match audit("ann", "q5", &but_one) {
            Audited::Refused(r) => assert!(r.message.contains("q1"), "{}", r.message),
            Audited::Allowed => panic!("a difference of one patient passed from the lookup"),
        }
        let inner = store.inner.lock().unwrap();
        assert_eq!(inner.numbered.sets.len(), 2);
        for (set, numbered) in &inner.numbered.sets {
            let renumbered = bitmap_of(set.iter().map(|u| inner.numbers.id_of[&u]).collect());
            assert_eq!(*numbered, renumbered);
        }
    }

    /// The decision taken without the disk is the one `audit` takes, and it is taken only
    /// where `audit` would neither read nor write: an account not read yet, a release with a
    /// set not remembered, or a lock held elsewhere are left to `audit`.
    #[test]
    fn a_decision_in_memory_is_audits_own_and_never_skips_a_write() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("q.sqlite");
        let all: RoaringBitmap = (0..228).collect();
        let mut but_one = all.clone();
        but_one.remove(7);
        let in_memory = |store: &QuerySets, who, id, set: &RoaringBitmap| {
            store.audit_in_memory(release(who, id), &one(set), 100, &key())
        };
        {
            let store = QuerySets::open(&path).unwrap();
            // Nothing read for ann yet: left to `audit`, and nothing was written.
            assert!(in_memory(&store, "ann", "q1", &all).is_none());
            assert_eq!(store.footprint().unwrap().0, 0);
            let first = store
                .audit(release("ann", "q1"), &one(&all), 100, &key())
                .unwrap();
            assert!(matches!(first, Audited::Allowed));
            // The same set again: allowed in memory, nothing more stored.
            assert!(matches!(
                in_memory(&store, "ann", "q2", &all),
                Some(Audited::Allowed)
            ));
            // One patient fewer: refused in memory, as `audit` refuses it, naming q1.
            match in_memory(&store, "ann", "q3", &but_one) {
                Some(Audited::Refused(r)) => {
                    assert_eq!(r.rule.as_str(), "differencing");
                    assert!(r.message.contains("q1"), "{}", r.message);
                }
                other => panic!("a difference of one patient was not refused: {other:?}"),
            }
            // A set far from every remembered one must be committed: left to `audit`.
            let other: RoaringBitmap = (1000..1100).collect();
            assert!(in_memory(&store, "ann", "q4", &other).is_none());
            assert_eq!(store.footprint().unwrap().0, 1);
            // While another release holds the lock, nothing is decided here.
            let held = store.inner.lock().unwrap();
            assert!(in_memory(&store, "ann", "q5", &all).is_none());
            drop(held);
        }
        // After a restart the account is read again by `audit` first.
        let store = QuerySets::open(&path).unwrap();
        assert!(in_memory(&store, "ann", "q6", &but_one).is_none());
        match store
            .audit(release("ann", "q6"), &one(&but_one), 100, &key())
            .unwrap()
        {
            Audited::Refused(r) => assert_eq!(r.rule.as_str(), "differencing"),
            Audited::Allowed => panic!("the difference of one patient passed after a restart"),
        }
        assert!(matches!(
            in_memory(&store, "ann", "q7", &but_one),
            Some(Audited::Refused(_))
        ));
    }

    #[test]
    fn beyond_the_limit_the_oldest_sets_are_merged_not_forgotten() {
        let dir = tempfile::tempdir().unwrap();
        let store = QuerySets::open(&dir.path().join("q.sqlite")).unwrap();
        // Ten disjoint sets of 20 patients, at most four remembered.
        for i in 0..10u32 {
            let set: RoaringBitmap = (i * 20..i * 20 + 20).collect();
            let id = format!("q{i}");
            let out = store
                .audit(release("ann", &id), &one(&set), 4, &key())
                .unwrap();
            assert!(matches!(out, Audited::Allowed));
        }
        assert_eq!(store.footprint().unwrap().0, 4);
        // The union of the first seven (0..140) is still remembered: 0..139 differs by one.
        let near: RoaringBitmap = (0..139).collect();
        match store
            .audit(release("ann", "late"), &one(&near), 4, &key())
            .unwrap()
        {
            Audited::Refused(r) => assert!(r.message.contains("q0"), "{}", r.message),
            Audited::Allowed => panic!("a compacted set was forgotten"),
        }
    }

    #[test]
    fn patients_are_numbered_densely_so_sets_stay_small() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("q.sqlite");
        // 10,000 patients as their 32-bit hashes scatter over the whole range.
        let hash = |i: u32| i.wrapping_mul(0x9E37_79B9).rotate_left(7);
        let everyone: RoaringBitmap = (0..10_000).map(hash).collect();
        let scattered = encode(&everyone).len();
        {
            let store = QuerySets::open(&path).unwrap();
            store
                .audit(release("ann", "q1"), &one(&everyone), 100, &key())
                .unwrap();
            let (sets, bytes) = store.footprint().unwrap();
            assert_eq!(sets, 1);
            assert!(
                bytes * 10 < scattered as u64,
                "{bytes} bytes numbered, {scattered} scattered"
            );
        }
        // After a restart the numbering is the same: the set without one patient is seen.
        let store = QuerySets::open(&path).unwrap();
        let but_one: RoaringBitmap = (1..10_000).map(hash).collect();
        let out = store
            .audit(release("ann", "q2"), &one(&but_one), 100, &key())
            .unwrap();
        assert!(matches!(out, Audited::Refused(_)));
        // A patient first seen now gets a fresh number, kept only with a committed release.
        let more: RoaringBitmap = (0..10_010).map(hash).collect();
        let out = store
            .audit(release("bob", "q3"), &one(&more), 100, &key())
            .unwrap();
        assert!(matches!(out, Audited::Allowed));
    }

    #[test]
    fn a_store_that_cannot_be_written_refuses() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("q.sqlite");
        let store = QuerySets::open(&path).unwrap();
        {
            let inner = store.inner.lock().unwrap();
            inner.conn.pragma_update(None, "query_only", "ON").unwrap();
        }
        let set: RoaringBitmap = (0..50).collect();
        assert!(
            store
                .audit(release("ann", "q1"), &one(&set), 100, &key())
                .is_err()
        );
    }
}
