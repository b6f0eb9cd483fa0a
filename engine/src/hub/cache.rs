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
use datafusion::sql::parser::Statement as DfStatement;

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

/// Statements parsed by their text, so that a text asked again skips the statement limits'
/// check (`railyard_policy::limits::check_statement`, which reads only the text: a text
/// that passed it once passes it again) and the parser. Together they were a fifth of the
/// hub's instructions for a small query. Only texts that passed and parsed are kept, and
/// only short ones, so that the cache stays small whatever is asked.
#[derive(Default)]
pub(super) struct ParseCache {
    parsed: Mutex<Parsed>,
}

#[derive(Default)]
struct Parsed {
    statements: HashMap<String, (DfStatement, bool)>,
    /// The kept texts' bytes.
    bytes: usize,
}

/// The longest text kept, and the most bytes of text kept in all.
const PARSED_TEXT_BYTES: usize = 8 * 1024;
const PARSED_BYTES: usize = 1024 * 1024;

impl ParseCache {
    /// The statement parsed from `sql` (and whether it was `EXPLAIN FEDERATED`), if kept.
    pub(super) fn get(&self, sql: &str) -> Option<(DfStatement, bool)> {
        // The lock guards map operations only; after a panic the map is still valid.
        let parsed = self.parsed.lock().unwrap_or_else(|p| p.into_inner());
        parsed.statements.get(sql).cloned()
    }

    /// Keeps what `sql`, which passed the statement limits, parsed to.
    pub(super) fn keep(&self, sql: &str, statement: &(DfStatement, bool)) {
        if sql.len() > PARSED_TEXT_BYTES {
            return;
        }
        let mut parsed = self.parsed.lock().unwrap_or_else(|p| p.into_inner());
        if parsed.statements.len() >= ENTRIES || parsed.bytes + sql.len() > PARSED_BYTES {
            parsed.statements.clear();
            parsed.bytes = 0;
        }
        if parsed
            .statements
            .insert(sql.to_string(), statement.clone())
            .is_none()
        {
            parsed.bytes += sql.len();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use datafusion::sql::parser::DFParser;

    fn parsed(sql: &str) -> (DfStatement, bool) {
        let mut statements = DFParser::parse_sql(sql).unwrap();
        (statements.pop_front().unwrap(), false)
    }

    /// A kept text gives back what it parsed to; long texts are not kept, and past the
    /// cache's bytes it starts over.
    #[test]
    fn parsed_statements_are_kept_by_text_within_bounds() {
        let cache = ParseCache::default();
        let sql = "SELECT sex, count(*) FROM lung GROUP BY sex";
        assert!(cache.get(sql).is_none());
        cache.keep(sql, &parsed(sql));
        assert_eq!(cache.get(sql), Some(parsed(sql)));
        assert!(
            cache
                .get("SELECT sex, count(*) FROM lung  GROUP BY sex")
                .is_none()
        );

        let long = format!("SELECT 1 AS x{}", " ".repeat(PARSED_TEXT_BYTES));
        cache.keep(&long, &parsed(&long));
        assert!(
            cache.get(&long).is_none(),
            "a long text is parsed each time"
        );

        let texts: Vec<String> = (0..PARSED_BYTES / 4096 + 1)
            .map(|i| format!("SELECT {i} AS x{}", " ".repeat(4096)))
            .collect();
        for text in &texts {
            cache.keep(text, &parsed(text));
        }
        let kept = cache.parsed.lock().unwrap().bytes;
        assert!(kept <= PARSED_BYTES, "{kept} bytes kept");
        assert!(cache.get(texts.last().unwrap()).is_some());
        assert!(cache.get(sql).is_none(), "the cache started over");
    }
}
