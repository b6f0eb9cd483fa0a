//! What a join station remembers of its recent scans (see [`JoinCache`]).

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arrow::array::RecordBatch;

/// What a join station remembers of its recent scans, per (query, researcher, member SQL,
/// output columns): that the members accepted the fragments at the join station's `check`
/// (the scan at run time need not ask again: a member re-checks every fragment it runs
/// anyway), and the joined rows once fetched. A statistics call sends the join station the
/// same member fragments round after round (only its coefficients change), so the members
/// release their rows once per call instead of once per round. Entries go when newer ones
/// push them out or, at the latest, one (member) timeout after they were made.
#[derive(Debug, Default)]
pub(super) struct JoinCache {
    entries: Mutex<VecDeque<(JoinKey, Instant, Option<RecordBatch>)>>,
}

/// (query id, researcher, every member's SQL, the output columns in order).
pub(super) type JoinKey = (String, String, Vec<String>, Vec<String>);

/// Scans a join station remembers at once.
pub(super) const JOIN_CACHE_ENTRIES: usize = 8;

impl JoinCache {
    /// Whether the members accepted `key`'s fragments (or answered them) within `ttl`.
    pub(super) fn checked(&self, key: &JoinKey, ttl: Duration) -> bool {
        self.fresh(ttl).iter().any(|(k, _, _)| k == key)
    }

    /// The joined rows of `key`, if fetched within `ttl`.
    pub(super) fn get(&self, key: &JoinKey, ttl: Duration) -> Option<RecordBatch> {
        self.fresh(ttl)
            .iter()
            .find(|(k, _, _)| k == key)
            .and_then(|(_, _, joined)| joined.clone())
    }

    pub(super) fn mark_checked(&self, key: JoinKey, ttl: Duration) {
        if !self.checked(&key, ttl) {
            self.insert(key, None, ttl);
        }
    }

    pub(super) fn put(self: &Arc<Self>, key: JoinKey, joined: RecordBatch, ttl: Duration) {
        self.insert(key, Some(joined), ttl);
        // Nothing keeps joined rows past their time, even if no query comes after them.
        let cache = Arc::downgrade(self);
        tokio::spawn(async move {
            tokio::time::sleep(ttl).await;
            if let Some(cache) = cache.upgrade() {
                drop(cache.fresh(ttl));
            }
        });
    }

    pub(super) fn insert(&self, key: JoinKey, joined: Option<RecordBatch>, ttl: Duration) {
        let mut entries = self.fresh(ttl);
        entries.retain(|(k, _, _)| *k != key);
        if entries.len() >= JOIN_CACHE_ENTRIES {
            entries.pop_front();
        }
        entries.push_back((key, Instant::now(), joined));
    }

    /// The entries, with those older than `ttl` dropped.
    pub(super) fn fresh(
        &self,
        ttl: Duration,
    ) -> std::sync::MutexGuard<'_, VecDeque<(JoinKey, Instant, Option<RecordBatch>)>> {
        // The lock guards queue operations only; after a panic the queue is still valid.
        let mut entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        entries.retain(|(_, at, _)| at.elapsed() < ttl);
        entries
    }
}
