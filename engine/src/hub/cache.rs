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

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use datafusion::common::tree_node::{TreeNode, TreeNodeRecursion};
use datafusion::physical_plan::ExecutionPlan;
use datafusion::physical_plan::placeholder_row::PlaceholderRowExec;
use datafusion::sql::parser::Statement as DfStatement;

use super::Planned;
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

/// Plans made to answer a prepare, kept for the run that follows it. A Flight SQL client
/// (ADBC, JDBC) prepares every statement it executes and asks for its `FlightInfo` at once:
/// the hub planned the same text for the same researcher twice, and for a DP query or a
/// train asked every station to check it twice. [`Hub::plan`](super::Hub::plan) takes the
/// prepare's plan instead: a plan is taken at most once, by the researcher it was planned
/// for, for the same text, within [`PREPARED_FOR`] of its planning; a later run plans
/// again. At most [`PREPARED_PLANS`] wait; the oldest goes first.
#[derive(Default)]
pub(super) struct PreparedPlans {
    waiting: Mutex<VecDeque<Waiting>>,
}

struct Waiting {
    researcher: String,
    sql: String,
    at: Instant,
    planned: Planned,
}

/// How long a prepare's plan waits for its run. ADBC asks within a round trip; the limit
/// bounds how old the moment is at which a plan folded `now()`.
pub(super) const PREPARED_FOR: Duration = Duration::from_secs(2);
/// The most plans that wait at once.
pub(super) const PREPARED_PLANS: usize = 64;

impl PreparedPlans {
    /// Keeps the plan `planned` that `researcher`'s prepare of `sql` made.
    pub(super) fn keep(&self, researcher: &str, sql: &str, planned: Planned) {
        self.keep_at(researcher, sql, planned, Instant::now());
    }

    fn keep_at(&self, researcher: &str, sql: &str, planned: Planned, now: Instant) {
        if sql.len() > PARSED_TEXT_BYTES {
            return;
        }
        // The lock guards queue operations only; after a panic the queue is still valid.
        let mut waiting = self.waiting.lock().unwrap_or_else(|p| p.into_inner());
        waiting.retain(|w| now.saturating_duration_since(w.at) < PREPARED_FOR);
        if waiting.len() >= PREPARED_PLANS {
            waiting.pop_front();
        }
        waiting.push_back(Waiting {
            researcher: researcher.to_string(),
            sql: sql.to_string(),
            at: now,
            planned,
        });
    }

    /// The plan `researcher`'s prepare of `sql` made, if it waits still; taken.
    pub(super) fn take(&self, researcher: &str, sql: &str) -> Option<Planned> {
        let mut waiting = self.waiting.lock().unwrap_or_else(|p| p.into_inner());
        if waiting.is_empty() {
            return None;
        }
        let now = Instant::now();
        waiting.retain(|w| now.saturating_duration_since(w.at) < PREPARED_FOR);
        let i = waiting
            .iter()
            .position(|w| w.researcher == researcher && w.sql == sql)?;
        waiting.remove(i).map(|w| w.planned)
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

    /// A plan distinguishable by its one-column schema's name.
    fn plan_named(name: &str) -> Planned {
        let schema = Arc::new(arrow::datatypes::Schema::new(vec![
            arrow::datatypes::Field::new(name, arrow::datatypes::DataType::Int64, true),
        ]));
        Planned::Batches(schema, Vec::new())
    }

    fn name_of(planned: Option<Planned>) -> Option<String> {
        planned.map(|p| p.schema().field(0).name().clone())
    }

    /// A prepare's plan goes to the same researcher's run of the same text, once; never to
    /// another researcher (whose query would run, be audited and charged, as the first's).
    #[test]
    fn a_prepared_plan_is_taken_once_by_its_researcher() {
        let prepared = PreparedPlans::default();
        prepared.keep("ann", "SELECT 1", plan_named("ann's"));
        prepared.keep("bob", "SELECT 1", plan_named("bob's"));
        assert_eq!(name_of(prepared.take("carol", "SELECT 1")), None);
        assert_eq!(name_of(prepared.take("ann", "SELECT  1")), None);
        assert_eq!(
            name_of(prepared.take("bob", "SELECT 1")).as_deref(),
            Some("bob's")
        );
        assert_eq!(
            name_of(prepared.take("ann", "SELECT 1")).as_deref(),
            Some("ann's")
        );
        assert_eq!(name_of(prepared.take("ann", "SELECT 1")), None);
    }

    /// A plan waits at most `PREPARED_FOR`, and past `PREPARED_PLANS` the oldest goes.
    #[test]
    fn prepared_plans_wait_within_bounds() {
        let prepared = PreparedPlans::default();
        let long_ago = Instant::now()
            .checked_sub(PREPARED_FOR + Duration::from_millis(1))
            .expect("the clock is past PREPARED_FOR");
        prepared.keep_at("ann", "SELECT 1", plan_named("stale"), long_ago);
        assert_eq!(name_of(prepared.take("ann", "SELECT 1")), None);
        for i in 0..=PREPARED_PLANS {
            prepared.keep("ann", &format!("SELECT {i}"), plan_named(&i.to_string()));
        }
        assert_eq!(name_of(prepared.take("ann", "SELECT 0")), None);
        for i in 1..=PREPARED_PLANS {
            let sql = format!("SELECT {i}");
            assert_eq!(name_of(prepared.take("ann", &sql)), Some(i.to_string()));
        }
        // Texts longer than the parse cache keeps are not kept either.
        let long = format!("SELECT 1 -- {}", "x".repeat(PARSED_TEXT_BYTES));
        prepared.keep("ann", &long, plan_named("long"));
        assert_eq!(name_of(prepared.take("ann", &long)), None);
    }
}
