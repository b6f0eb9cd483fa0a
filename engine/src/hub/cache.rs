//! The hub's plans kept by statement text, so that a statement asked again (a dashboard, a
//! prepared statement, the same query from many researchers) skips parsing to a plan,
//! optimizing, splitting into fragments and physical planning.
//!
//! A plan is kept only when running it again gives what planning it again would:
//! - every function in it is immutable (`now()` is folded into a constant by the optimizer,
//!   `random()` is drawn per row), and
//! - everything it reads comes from the stations when it runs: its leaves are fragments
//!   (or the single empty row of a `SELECT` without `FROM`). Tables the hub answers itself
//!   (`railyard.stations`, `information_schema`, the statistics functions, `train(...)`)
//!   read their state while being planned and are planned afresh each time.
//!
//! Who asks is not part of a plan: the query's identity is assigned to a copy of it, with
//! every operator's run state reset, for each run. A hub is rebuilt when its stations
//! announce something new, and its cache with it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use datafusion::common::tree_node::{TreeNode, TreeNodeRecursion};
use datafusion::physical_plan::ExecutionPlan;
use datafusion::physical_plan::placeholder_row::PlaceholderRowExec;

use crate::exec::FragmentExec;

/// Distinct statements whose plans a hub keeps; past it the cache starts over.
const ENTRIES: usize = 512;

#[derive(Default)]
pub(super) struct PlanCache {
    plans: Mutex<HashMap<String, Arc<dyn ExecutionPlan>>>,
}

impl PlanCache {
    pub(super) fn get(&self, text: &str) -> Option<Arc<dyn ExecutionPlan>> {
        // The lock guards map operations only; after a panic the map is still valid.
        let plans = self.plans.lock().unwrap_or_else(|p| p.into_inner());
        plans.get(text).cloned()
    }

    /// Keeps `physical` for `text` if it reads only the stations; the caller has checked
    /// that its logical plan has only immutable functions (see the module docs).
    pub(super) fn keep(&self, text: String, physical: &Arc<dyn ExecutionPlan>) {
        if !reads_only_stations(physical) {
            return;
        }
        let mut plans = self.plans.lock().unwrap_or_else(|p| p.into_inner());
        if plans.len() >= ENTRIES {
            plans.clear();
        }
        plans.insert(text, Arc::clone(physical));
    }
}

/// Whether every leaf of `plan` is a station fragment or the empty row of a `SELECT`
/// without `FROM`.
fn reads_only_stations(plan: &Arc<dyn ExecutionPlan>) -> bool {
    let mut only = true;
    let _ = plan.apply(|node| {
        if node.children().is_empty()
            && node.downcast_ref::<FragmentExec>().is_none()
            && node.downcast_ref::<PlaceholderRowExec>().is_none()
        {
            only = false;
            return Ok(TreeNodeRecursion::Stop);
        }
        Ok(TreeNodeRecursion::Continue)
    });
    only
}
