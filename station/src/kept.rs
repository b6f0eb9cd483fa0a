//! Physical plans of approved fragments, kept by SQL text, so that a fragment sent again
//! (every run of a query sends the same fragments) skips physical planning, which is most of
//! a small fragment's cost at a station.
//!
//! Only what is decided before physical planning is reused: the station still approves
//! every fragment it receives (the approved logical plan comes from the policy check, see
//! `fragment.rs`), and still runs, releases and audits it every time. A plan is kept only
//! when running it again reads what planning it again would:
//! - its approved logical plan has only immutable functions (the caller's condition);
//! - every leaf reads its data when it runs: a file scan, a PostgreSQL scan, the empty row
//!   of a `SELECT` without `FROM`, or nothing. Any other source is planned afresh.
//! - it still scans every table its logical plan scans: the physical planner answers some
//!   queries from what it knows while planning (`count(*)` from a Parquet file's row count),
//!   and such a plan would repeat an old answer.
//! - the files a kept plan scans are still the files it listed: same size, modification
//!   time and inode (a file rewritten or replaced is planned afresh, so a kept plan never
//!   reads a new file with the old file's length).
//!
//! Each run takes a copy with every operator's run state reset. A kept plan's scans of small
//! files keep what they read while the files are unchanged (`remembered.rs`).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use datafusion::common::tree_node::{TreeNode, TreeNodeRecursion};
use datafusion::error::Result;
use datafusion::logical_expr::LogicalPlan;
use datafusion::physical_plan::ExecutionPlan;
use datafusion::physical_plan::empty::EmptyExec;
use datafusion::physical_plan::execution_plan::reset_plan_states;
use datafusion::physical_plan::placeholder_row::PlaceholderRowExec;

use crate::postgres::PostgresScanExec;
use crate::remembered::{KeptBytes, file_scan, remember_small_scans};

/// Distinct fragment texts whose physical plans a station keeps; past it the cache starts
/// over.
const ENTRIES: usize = 1024;

#[derive(Default)]
pub(crate) struct KeptPlans {
    plans: Mutex<HashMap<String, Arc<dyn ExecutionPlan>>>,
    /// What the kept plans' small-file scans hold (`remembered.rs`).
    bytes: Arc<KeptBytes>,
}

impl KeptPlans {
    /// A fresh copy of the plan kept for `sql`, if there is one and its files have not
    /// changed since it was planned.
    pub(crate) fn get(&self, sql: &str) -> Result<Option<Arc<dyn ExecutionPlan>>> {
        // The lock guards map operations only; after a panic the map is still valid.
        let kept = {
            let plans = self.plans.lock().unwrap_or_else(|p| p.into_inner());
            plans.get(sql).cloned()
        };
        let Some(kept) = kept else {
            return Ok(None);
        };
        if !files_unchanged(&kept) {
            let mut plans = self.plans.lock().unwrap_or_else(|p| p.into_inner());
            plans.remove(sql);
            return Ok(None);
        }
        reset_plan_states(kept).map(Some)
    }

    /// Bytes the kept plans' small-file scans hold.
    #[cfg(test)]
    pub(crate) fn remembered_bytes(&self) -> usize {
        self.bytes.used()
    }

    /// Keeps `physical`, planned from `logical`, for `sql` if each of its leaves reads its
    /// data when it runs and it still scans every table `logical` does; the caller has
    /// checked that `logical` has only immutable functions. Its scans of small files keep
    /// what they read (`remembered.rs`). Returns the plan as kept, to run in its place.
    pub(crate) fn keep(
        &self,
        sql: &str,
        logical: &LogicalPlan,
        physical: &Arc<dyn ExecutionPlan>,
    ) -> Result<Option<Arc<dyn ExecutionPlan>>> {
        if !reads_when_run(physical) || scan_leaves(physical) < table_scans(logical) {
            return Ok(None);
        }
        let kept = remember_small_scans(Arc::clone(physical), &self.bytes)?;
        let mut plans = self.plans.lock().unwrap_or_else(|p| p.into_inner());
        if plans.len() >= ENTRIES {
            plans.clear();
        }
        plans.insert(sql.to_string(), Arc::clone(&kept));
        Ok(Some(kept))
    }
}

/// Whether every leaf of `plan` reads its rows when executed (see the module docs).
fn reads_when_run(plan: &Arc<dyn ExecutionPlan>) -> bool {
    let mut only = true;
    let _ = plan.apply(|node| {
        if !node.children().is_empty() {
            return Ok(TreeNodeRecursion::Continue);
        }
        if scans(node)
            || node.downcast_ref::<PlaceholderRowExec>().is_some()
            || node.downcast_ref::<EmptyExec>().is_some()
        {
            return Ok(TreeNodeRecursion::Continue);
        }
        only = false;
        Ok(TreeNodeRecursion::Stop)
    });
    only
}

/// The table scans of a logical plan, subqueries included.
fn table_scans(plan: &LogicalPlan) -> usize {
    let mut n = 0;
    let _ = plan.apply_with_subqueries(|node| {
        if matches!(node, LogicalPlan::TableScan(_)) {
            n += 1;
        }
        Ok(TreeNodeRecursion::Continue)
    });
    n
}

/// The leaves of a physical plan that read a file or a PostgreSQL relation when run. Fewer
/// than the logical plan's table scans means the planner answered a scan from what it knew
/// while planning (a Parquet file's row count or min/max statistics folded into a
/// constant, a scan found empty): such a plan would repeat an old answer.
fn scan_leaves(plan: &Arc<dyn ExecutionPlan>) -> usize {
    let mut n = 0;
    let _ = plan.apply(|node| {
        if scans(node) {
            n += 1;
        }
        Ok(TreeNodeRecursion::Continue)
    });
    n
}

/// Whether `node` reads a file or a PostgreSQL relation when it runs.
fn scans(node: &Arc<dyn ExecutionPlan>) -> bool {
    file_scan(node).is_some() || node.downcast_ref::<PostgresScanExec>().is_some()
}

/// Whether every file `plan` scans still has the size, modification time and inode it had
/// when the plan listed it. A file that cannot be read counts as changed.
pub(crate) fn files_unchanged(plan: &Arc<dyn ExecutionPlan>) -> bool {
    let mut unchanged = true;
    let _ = plan.apply(|node| {
        let Some(config) = file_scan(node) else {
            return Ok(TreeNodeRecursion::Continue);
        };
        for file in config.file_groups.iter().flat_map(|g| g.files()) {
            if !same_file(&file.object_meta) {
                unchanged = false;
                return Ok(TreeNodeRecursion::Stop);
            }
        }
        Ok(TreeNodeRecursion::Continue)
    });
    unchanged
}

/// The local path of a station's file: its object paths are absolute paths without their
/// leading '/'.
pub(crate) fn local_path(meta: &datafusion::object_store::ObjectMeta) -> std::path::PathBuf {
    std::path::Path::new("/").join(meta.location.as_ref())
}

/// Whether the local file behind `meta` is the one `meta` describes.
pub(crate) fn same_file(meta: &datafusion::object_store::ObjectMeta) -> bool {
    std::fs::metadata(local_path(meta)).is_ok_and(|now| describes(meta, &now))
}

/// Whether `meta` describes the file whose metadata is `now`: its size, modification time
/// and, where `meta` has the local store's entity tag, its inode.
pub(crate) fn describes(
    meta: &datafusion::object_store::ObjectMeta,
    now: &std::fs::Metadata,
) -> bool {
    use std::os::unix::fs::MetadataExt;
    let Ok(modified) = now.modified() else {
        return false;
    };
    if now.len() != meta.size
        || chrono::DateTime::<chrono::Utc>::from(modified) != meta.last_modified
    {
        return false;
    }
    // The local store's entity tag is inode-mtime-size; where it has one, the inode must
    // match too (a file replaced by another of the same size and time).
    match &meta.e_tag {
        Some(tag) => tag
            .split('-')
            .next()
            .is_some_and(|inode| inode == format!("{:x}", now.ino())),
        None => true,
    }
}
