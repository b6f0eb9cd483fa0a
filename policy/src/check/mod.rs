//! The policy check: run on the plan a station built itself from a fragment's SQL, before
//! any data is read.
//!
//! A fragment must be a straight chain over one table. Three shapes pass:
//!
//! ```text
//!   rows:       [Projection | Filter | SubqueryAlias | Sort | Limit]* → TableScan
//!               every column it touches (output, filter, sort) must be `public`
//!   aggregate:  [Projection | SubqueryAlias]* → Aggregate → [Projection | Filter | SubqueryAlias]* → TableScan
//!               filters and group keys may use `aggregate` columns (the group-size
//!               threshold covers whatever they select); aggregate arguments are checked
//!               per call; the station appends the group's row count `__rows`
//!   pseudonymized rows (vertical tables): [Projection | Filter | SubqueryAlias]* → TableScan
//!               with `pseudonym(join_key)` among the outputs; other columns `public` or
//!               `aggregate`; only if the table's policy has `allow_vertical`, and at least
//!               k rows
//! ```
//!
//! Why arguments are restricted: thresholds count the rows of a group, but an expression
//! inside an aggregate can make one row dominate it (`sum(age * (patient_id = 7))`, or the
//! same with pure arithmetic). An argument over a non-public column may therefore only
//! scale and shift that one column (`a·x + b`), and only aggregates whose state is a sum
//! of per-row contributions are accepted (count, sum, mean, variances, covariances,
//! regressions): their value moves by a bounded amount per row, where `min()`, `median()` or
//! `array_agg()` would hand out one patient's value.
//!
//! Model aggregates (`glm_terms`, `survival_terms`) are the exception: their arguments are
//! several columns, used unchanged (or, for a GLM covariate, as a level indicator
//! `column = literal`), with literal settings; what they release is bounded by the model
//! rules of [`Release::Model`] and [`Release::Survival`], applied after running.
//!
//! Differentially private fragments (`partial_dp_count/sum/avg`, see `railyard_policy::dp` and the station's noise) are the
//! other exception: an aggregate whose every call is a DP one, over columns used unchanged
//! (`public`, `aggregate` or `dp`; sums need bounds in the policy), grouped only by columns
//! whose public keys the policy declares. What they release is decided by ε, not by k.
//!
//! Every refusal names the rule and the column, and never contains a data value: messages
//! are built from the policy, the schema and the query text only.

use std::collections::BTreeSet;
use std::sync::Arc;

use arrow::datatypes::DataType;
use datafusion::common::Column;
use datafusion::common::tree_node::{TreeNode, TreeNodeRecursion};
use datafusion::common::{DFSchema, ScalarValue};
use datafusion::functions::math::expr_fn::isnan;
use datafusion::logical_expr::expr::AggregateFunction;
use datafusion::logical_expr::{
    Aggregate, BinaryExpr, Expr, ExprSchemable, LogicalPlan, Operator, Projection, SubqueryAlias,
    TableScan, Volatility,
};
use datafusion::logical_expr::{cast, lit, when};
use railyard_contract::ReleaseKind;
use railyard_udfs::PartialAggregate;
use railyard_udfs::dp::{DpKind, dp_kind};
use railyard_udfs::glm_terms::{Family, GLM_TERMS, glm_covariates};
use railyard_udfs::pseudonym::PSEUDONYM;
use railyard_udfs::survival_terms::{SURVIVAL_TERMS, survival_covariates};

use crate::file::{Policy, Visibility};
use crate::rule::{Refusal, Rule};

pub use railyard_contract::ROWS_COLUMN;

mod aggregate;
pub mod contributors;
mod dp;
mod expr;
mod form;
mod lineage;
mod poly;
mod relational;
#[cfg(test)]
mod tests;

use aggregate::*;
use contributors::*;
use dp::*;
use expr::*;
use form::*;
use lineage::*;
use relational::*;

/// What a checked fragment may release.
#[derive(Debug, Clone, PartialEq)]
pub enum Release {
    /// Row-level values of public columns.
    Rows,
    /// One row per group, the last column being the group's row count; groups below `k`
    /// are suppressed, and a global aggregate below `k` is refused.
    Groups { k: u64, global: bool },
    /// One `glm_terms` value (and the row count): released only if it covers at least
    /// `min_rows` complete rows, at least three per parameter, and every design column is
    /// non-zero on at least `k` rows and zero on none or at least `k` (a column non-zero
    /// on a few rows, a level indicator or a rare 0/1 flag, would isolate them).
    Model {
        k: u64,
        min_rows: u64,
        parameters: usize,
    },
    /// Groups as for [`Release::Groups`], each with a `survival_terms` value (the
    /// second-last column); a NULL value (times that cannot be pooled to the rule) refuses
    /// the whole release.
    Survival { k: u64, global: bool },
    /// Row-level values of `public` and `aggregate` columns keyed by `pseudonym(join_key)`,
    /// for a hub that joins them with other stations' columns and releases only aggregates
    /// over groups of at least k joined rows. Refused below `k` rows.
    Pseudonymized { k: u64 },
    /// Row-level values of `public` and `aggregate` columns handed to a containerized train
    /// inside the station (they never leave it); refused below `k` rows. What leaves is the
    /// train's output, bounded by the `[trains]` policy.
    TrainInput { k: u64 },
    /// Differentially private aggregate states: one row per declared key combination,
    /// every state field noised (the plan is the aggregate alone, its sums clamped).
    Dp(Arc<crate::dp::DpRelease>),
}

impl Release {
    /// What the release is, as the station's check answers it.
    pub fn kind(&self) -> ReleaseKind {
        match self {
            Release::Rows => ReleaseKind::Rows,
            Release::Groups { .. } | Release::Survival { .. } => ReleaseKind::Groups,
            Release::Model { .. } => ReleaseKind::Model,
            Release::Pseudonymized { .. } => ReleaseKind::Pseudonymized,
            Release::TrainInput { .. } => ReleaseKind::Train,
            Release::Dp(_) => ReleaseKind::Dp,
        }
    }

    /// The group-size threshold the station applies to it (1 for what is not thresholded:
    /// public rows and DP states).
    pub fn min_group_size(&self) -> u64 {
        match self {
            Release::Rows | Release::Dp(_) => 1,
            Release::Groups { k, .. }
            | Release::Survival { k, .. }
            | Release::Model { k, .. }
            | Release::Pseudonymized { k }
            | Release::TrainInput { k } => *k,
        }
    }
}

/// A fragment that passed the policy: the plan to run (with the row count appended for an
/// aggregate) and what it releases.
#[derive(Debug, Clone)]
pub struct Checked {
    pub plan: LogicalPlan,
    pub table: String,
    pub release: Release,
    /// The query-set auditor's domain when it watches this release (the plan then
    /// collects `__units_*` sets): the patients of every table whose privacy unit is the
    /// column `unit:C` (a unit's hash does not depend on its table), or the rows of table
    /// `table:T`. `None`: the release is not watched (public columns only, DP noise, or
    /// the auditor is off for the table).
    pub audit: Option<String>,
}

/// Refuses what is not a query: DDL, DML and statements such as `SET` never run at a
/// station, whatever its policy.
pub fn verify_query(plan: &LogicalPlan) -> datafusion::error::Result<()> {
    datafusion::execution::context::SQLOptions::new()
        .with_allow_ddl(false)
        .with_allow_dml(false)
        .with_allow_statements(false)
        .verify_plan(plan)
}

/// Checks a fragment's (unoptimized) logical plan against `policy`.
pub fn check(plan: &LogicalPlan, policy: &Policy, station: &str) -> Result<Checked, Refusal> {
    check_for(plan, policy, station, false)
}

/// Checks the input of a containerized train: rows of one table, as a row-level fragment,
/// but over `public` and `aggregate` columns (they stay at the station); `hidden`, `dp` and
/// `join_key` columns are refused as anywhere else.
pub fn check_train_input(
    plan: &LogicalPlan,
    policy: &Policy,
    station: &str,
) -> Result<Checked, Refusal> {
    check_for(plan, policy, station, true)
}

fn check_for(
    plan: &LogicalPlan,
    policy: &Policy,
    station: &str,
    train_input: bool,
) -> Result<Checked, Refusal> {
    let (chain, bottom) = node_chain(plan, station)?;
    let (table, tables) = match bottom {
        Bottom::Scan(scan) => (scan.table_name.table().to_string(), Vec::new()),
        Bottom::Relational(base) => {
            // Refuses what would mix patients before anything else is looked at.
            Carrier::new(policy, station).carry(base)?;
            let tables = tables_of(base);
            // Messages and per-table settings name the first patient table read.
            let first = tables
                .iter()
                .find(|(t, _)| !policy.is_reference(t))
                .or(tables.first())
                .map(|(t, _)| t.clone())
                .unwrap_or_default();
            (first, tables)
        }
    };
    let units: Vec<String> = match bottom {
        Bottom::Scan(scan) => policy
            .privacy_unit(&table, scan.source.schema().as_ref())
            .0
            .into_iter()
            .collect(),
        Bottom::Relational(_) => tables
            .iter()
            .filter_map(|(t, schema)| policy.privacy_unit(t, schema.as_ref()).0)
            .collect(),
    };
    let mut checker = Checker {
        policy,
        station,
        table,
        tables,
        units,
        used: BTreeSet::new(),
        model: None,
        pseudonymized: false,
        dp: false,
        call: 0,
        nonlinear: Vec::new(),
    };
    let aggregate_at = chain
        .iter()
        .position(|n| matches!(n, LogicalPlan::Aggregate(_)))
        .filter(|at| !matches!(bottom, Bottom::Relational(_)) || *at < chain.len() - 1);
    if chain[..chain.len() - 1]
        .iter()
        .filter(|n| matches!(n, LogicalPlan::Aggregate(_)))
        .count()
        > 1
    {
        return Err(checker.shape("it may aggregate only once"));
    }

    // A train's input is rows (refused below if it aggregates): never a DP release.
    checker.dp = !train_input
        && aggregate_at.is_some_and(|at| match chain[at] {
            LogicalPlan::Aggregate(agg) => agg.aggr_expr.iter().any(|e| dp_call_of(e).is_some()),
            _ => false,
        });
    if checker.dp && policy.dp.is_none() {
        return Err(crate::gate::no_dp(station));
    }
    if checker.dp && matches!(bottom, Bottom::Relational(_)) {
        return Err(checker.shape(
            "differentially private aggregates run over one table, not over joins or \
             per-patient derivations",
        ));
    }
    let traced = trace(&mut checker, &chain, aggregate_at, bottom)?;
    decide(checker, plan, &chain, aggregate_at, traced, train_input)
}

/// Where a fragment's chain ends: one table, or a relational input (joins, per-patient
/// derivations, correlated subqueries; see [`relational`]).
#[derive(Clone, Copy)]
enum Bottom<'p> {
    Scan(&'p TableScan),
    Relational(&'p LogicalPlan),
}

/// The fragment as a chain of nodes, top to bottom, down to the table scan or the root of
/// the relational input it ends in (the chain's last node).
fn node_chain<'p>(
    plan: &'p LogicalPlan,
    station: &str,
) -> Result<(Vec<&'p LogicalPlan>, Bottom<'p>), Refusal> {
    let mut chain = vec![plan];
    let mut release_seen = false;
    loop {
        let node = chain[chain.len() - 1];
        if is_relational(node, release_seen) {
            return Ok((chain, Bottom::Relational(node)));
        }
        release_seen |= matches!(node, LogicalPlan::Aggregate(_));
        match node.inputs().as_slice() {
            [] => break,
            [one] => chain.push(one),
            _ => {
                return Err(Refusal {
                    rule: Rule::FragmentShape,
                    message: format!(
                        "policy: station '{station}' refuses the fragment: it must read one \
                         table without joins or unions"
                    ),
                });
            }
        }
    }
    let LogicalPlan::TableScan(scan) = chain[chain.len() - 1] else {
        return Err(Refusal {
            rule: Rule::FragmentShape,
            message: format!("policy: station '{station}' refuses the fragment: it reads no table"),
        });
    };
    Ok((chain, Bottom::Scan(scan)))
}

/// What tracing a fragment's lineage, bottom-up, found: the lineage of its output columns
/// and, for a DP fragment, its checked calls and the lineage of the aggregate's input.
struct Trace {
    lineage: Vec<(Column, Lineage)>,
    dp_calls: Vec<DpCall>,
    dp_input: Vec<(Column, Lineage)>,
}

/// Traces the lineage of every column through the chain, bottom-up, checking every
/// expression on the way (literals, filters, projections, aggregate calls, ordering).
fn trace(
    checker: &mut Checker<'_>,
    chain: &[&LogicalPlan],
    aggregate_at: Option<usize>,
    bottom: Bottom<'_>,
) -> Result<Trace, Refusal> {
    let station = checker.station;
    let mut dp_calls = Vec::new();
    let mut dp_input = Vec::new();
    let mut lineage: Vec<(Column, Lineage)> = Vec::new();
    for (depth, node) in chain.iter().enumerate().rev() {
        let above_aggregate = aggregate_at.is_some_and(|a| depth < a);
        if let Bottom::Relational(base) = bottom
            && depth == chain.len() - 1
        {
            lineage = trace_base(checker, base, &[])?;
            continue;
        }
        for e in node.expressions() {
            checker.literals(&e)?;
        }
        lineage = match node {
            LogicalPlan::TableScan(scan) => scan_lineage(checker, scan)?,
            LogicalPlan::Filter(filter) => {
                if above_aggregate {
                    return Err(checker.shape("HAVING is not accepted in an aggregate fragment"));
                }
                checker.lineage(&filter.predicate, &lineage, filter.input.schema())?;
                lineage
            }
            LogicalPlan::Projection(p) => {
                // Above the aggregate only renaming: an expression over a group's results
                // (e.g. one that fails when count(*) = 1) would act before the threshold.
                if above_aggregate
                    && !p
                        .expr
                        .iter()
                        .all(|e| matches!(e.clone().unalias_nested().data, Expr::Column(_)))
                {
                    return Err(checker.shape(
                        "expressions over aggregate results are computed at the hub; \
                         a fragment may only name them",
                    ));
                }
                let mut out = Vec::new();
                for (e, c) in p.expr.iter().zip(p.schema.columns()) {
                    if let Some(key) = pseudonym_argument(e) {
                        checker.pseudonym(key, &lineage)?;
                        // A pseudonym carries no column's values: it uses none.
                        let l = Lineage {
                            pseudonym: true,
                            ..Lineage::default()
                        };
                        out.push((c, l));
                        continue;
                    }
                    let mut l = checker.lineage(e, &lineage, p.input.schema())?;
                    let source = match e.clone().unalias() {
                        Expr::Column(source) => find(&lineage, &source),
                        _ => None,
                    };
                    l.direct = source.is_some_and(|s| s.direct);
                    l.pseudonym = source.is_some_and(|s| s.pseudonym);
                    l.form = form_of(e, &lineage, p.input.schema());
                    out.push((c, l));
                }
                out
            }
            LogicalPlan::SubqueryAlias(a) => a
                .schema
                .columns()
                .into_iter()
                .zip(lineage.into_iter().map(|(_, l)| l))
                .collect(),
            LogicalPlan::Aggregate(agg) => {
                let mut out = Vec::new();
                let columns = agg.schema.columns();
                for (e, c) in agg.group_expr.iter().zip(columns.iter()) {
                    out.push((c.clone(), checker.lineage(e, &lineage, agg.input.schema())?));
                }
                if matches!(agg.group_expr.as_slice(), [Expr::GroupingSet(_)]) {
                    return Err(checker
                        .shape("GROUPING SETS are merged at the hub; send the finest grouping"));
                }
                if checker.dp {
                    dp_input.clone_from(&lineage);
                    for e in &agg.aggr_expr {
                        let call = checker.dp_call(e, &lineage, agg.input.schema())?;
                        out.push((columns[out.len()].clone(), call.lineage()));
                        dp_calls.push(call);
                    }
                    lineage = out;
                    continue;
                }
                for e in &agg.aggr_expr {
                    let call = match e {
                        Expr::Alias(a) => a.expr.as_ref(),
                        other => other,
                    };
                    let Expr::AggregateFunction(f) = call else {
                        return Err(checker.shape("an aggregate output is not an aggregate call"));
                    };
                    checker.call = out.len() - agg.group_expr.len();
                    let value = checker.aggregate_call(f, &lineage, agg.input.schema())?;
                    out.push((columns[out.len()].clone(), value));
                }
                out
            }
            LogicalPlan::Sort(s) => {
                if aggregate_at.is_some() {
                    return Err(Refusal {
                        rule: Rule::Ordering,
                        message: format!(
                            "policy: station '{station}' refuses ORDER BY in an aggregate \
                             fragment: it would select rows by their values"
                        ),
                    });
                }
                for e in &s.expr {
                    checker.lineage(&e.expr, &lineage, s.input.schema())?;
                }
                lineage
            }
            LogicalPlan::Limit(_) => {
                if aggregate_at.is_some() {
                    return Err(Refusal {
                        rule: Rule::Ordering,
                        message: format!(
                            "policy: station '{station}' refuses LIMIT in an aggregate \
                             fragment: it would select which rows are aggregated"
                        ),
                    });
                }
                lineage
            }
            LogicalPlan::Distinct(_) => {
                return Err(checker.shape("SELECT DISTINCT is not accepted; use GROUP BY"));
            }
            other => {
                return Err(checker.shape(&format!(
                    "{} is not accepted in a fragment",
                    other.display()
                )));
            }
        };
    }

    Ok(Trace {
        lineage,
        dp_calls,
        dp_input,
    })
}

/// The lineage of a scan's columns (each its own base, unchanged), its pushed filters
/// checked.
fn scan_lineage(
    checker: &mut Checker<'_>,
    scan: &TableScan,
) -> Result<Vec<(Column, Lineage)>, Refusal> {
    let full =
        DFSchema::try_from_qualified_schema(scan.table_name.clone(), scan.source.schema().as_ref())
            .map_err(|_| checker.shape("its table schema cannot be read"))?;
    let mut out: Vec<(Column, Lineage)> = full
        .columns()
        .into_iter()
        .map(|c| {
            let bases = BTreeSet::from([c.name.clone()]);
            let l = Lineage {
                bases,
                direct: true,
                pseudonym: false,
                form: Form::COLUMN,
            };
            (c, l)
        })
        .collect();
    for f in &scan.filters {
        checker.lineage(f, &out, &full)?;
    }
    if let Some(projection) = &scan.projection {
        out = projection
            .iter()
            .filter_map(|i| out.get(*i).cloned())
            .collect();
    }
    Ok(out)
}

/// The name of an aggregate call's function, through its partial wrapper.
fn call_name(f: &AggregateFunction) -> String {
    match f.func.inner().downcast_ref::<PartialAggregate>() {
        Some(partial) => partial.inner().name().to_string(),
        None => f.func.name().to_string(),
    }
}

/// Decides what a traced fragment releases, and the plan that runs: rows, a train's input,
/// pseudonymized rows, groups, a model, or DP states.
fn decide(
    mut checker: Checker<'_>,
    plan: &LogicalPlan,
    chain: &[&LogicalPlan],
    aggregate_at: Option<usize>,
    traced: Trace,
    train_input: bool,
) -> Result<Checked, Refusal> {
    let (policy, station) = (checker.policy, checker.station);
    let Trace {
        lineage,
        dp_calls,
        dp_input,
    } = traced;
    let table = checker.table.clone();
    if checker.dp {
        let at = aggregate_at.expect("a DP fragment has an aggregate");
        return dp_release(&checker, plan, chain, at, &dp_input, dp_calls);
    }
    if train_input {
        if aggregate_at.is_some() || checker.pseudonymized {
            return Err(
                checker.shape("a train's input is rows of one table (aggregate inside the train)")
            );
        }
        if policy.joined(&table) {
            return Err(Refusal {
                rule: Rule::RowLevel,
                message: format!(
                    "policy: table '{table}' at station '{station}' is a join of several \
                     stations' rows; no train reads it"
                ),
            });
        }
        // As in an aggregate, ordering would pick rows by their values (the k oldest), and
        // an expression over a non-public column could single out one row among all of
        // them (CASE WHEN … THEN 1000 ELSE age END); a train reads such columns as they are.
        no_ordering(chain, station, "a train's input")?;
        for (_, l) in &lineage {
            if !l.direct
                && let Some(c) = checker.first_non_public(&l.bases)
            {
                return Err(checker.column_refusal(
                    Rule::TrainInput,
                    &c,
                    "a train reads it only as it is, not inside an expression",
                ));
            }
        }
        return Ok(Checked {
            plan: plan.clone(),
            release: Release::TrainInput { k: checker.k() },
            table,
            audit: None,
        });
    }
    if checker.pseudonymized {
        // The pseudonym must be released: without it the rows are plain row-level values.
        if !lineage.iter().any(|(_, l)| l.pseudonym) {
            return Err(checker.shape("a pseudonymized fragment must output the pseudonym"));
        }
        // The join station checks the hub's aggregate over these rows against the grammar
        // of released computation; a column computed here (CASE WHEN age >= 80 THEN 1 END)
        // would reach it as a plain column.
        for (_, l) in &lineage {
            if !l.direct
                && !l.pseudonym
                && let Some(c) = checker.first_non_public(&l.bases)
            {
                return Err(checker.column_refusal(
                    Rule::AggregateArgument,
                    &c,
                    "a pseudonymized row carries it only as it is, not inside an expression",
                ));
            }
        }
        return pseudonymized_release(&checker, plan, chain, aggregate_at.is_some());
    }
    let joined = policy.joined(&table);
    let Some(at) = aggregate_at else {
        if joined {
            return Err(Refusal {
                rule: Rule::RowLevel,
                message: format!(
                    "policy: table '{table}' at station '{station}' is a join of several \
                     stations' rows; only aggregates over at least {} of them leave it",
                    checker.k()
                ),
            });
        }
        if let Some(c) = checker.first_non_public(&checker.used) {
            return Err(checker.column_refusal(
                Rule::RowLevel,
                &c,
                "row-level values cannot leave the station; use it inside an aggregate",
            ));
        }
        return Ok(Checked {
            plan: plan.clone(),
            table,
            release: Release::Rows,
            audit: None,
        });
    };
    let LogicalPlan::Aggregate(agg) = chain[at] else {
        unreachable!("aggregate_at points at an Aggregate");
    };
    // Over joined rows even the row count is a disclosure (how many patients the stations
    // share): k applies to an aggregate that names no column.
    let k = if joined || checker.first_non_public(&checker.used).is_some() {
        checker.k()
    } else {
        1
    };
    if plan
        .schema()
        .fields()
        .iter()
        .any(|f| f.name() == ROWS_COLUMN || is_internal(f.name()))
    {
        return Err(checker.shape(&format!(
            "the column names {ROWS_COLUMN} and __digest_*, __contributors_* are reserved"
        )));
    }
    let unit = match chain.last() {
        Some(LogicalPlan::TableScan(scan)) => {
            policy.privacy_unit(&table, scan.source.schema().as_ref()).0
        }
        _ => None,
    };
    let relational = !matches!(chain.last(), Some(LogicalPlan::TableScan(_)));
    let mut magnitude: Vec<(usize, Expr)> = Vec::new();
    if (unit.is_some() || relational) && checker.first_non_public(&checker.used).is_some() {
        // One patient's many rows can dominate a sum over a group of k patients although
        // no single row does: every magnitude aggregate over a non-public column is held
        // to the dominance rule, per patient.
        for (i, e) in agg.aggr_expr.iter().enumerate() {
            let Expr::AggregateFunction(f) = (match e {
                Expr::Alias(a) => a.expr.as_ref(),
                other => other,
            }) else {
                continue;
            };
            if matches!(call_name(f).as_str(), GLM_TERMS | SURVIVAL_TERMS | "count") {
                continue;
            }
            // Arguments may read columns renamed below the aggregate: any argument over a
            // column counts when the fragment reads a non-public one.
            for a in &f.params.args {
                if !a.column_refs().is_empty()
                    && !checker.nonlinear.iter().any(|(c, x)| *c == i && x == a)
                {
                    magnitude.push((i, a.clone()));
                }
            }
        }
    }
    // The auditor watches a release over non-public columns of a table it is on for (over
    // a relational input: any patient table read).
    // Even an aggregate over public columns only (`count(*)`, k = 1) is watched when the
    // table holds non-public ones: its set is what a later filtered count is compared with.
    let private_table = match chain.last() {
        Some(LogicalPlan::TableScan(scan)) => has_non_public(policy, &table, &scan.source.schema()),
        _ => checker
            .tables
            .iter()
            .any(|(t, schema)| !policy.is_reference(t) && has_non_public(policy, t, schema)),
    };
    let audit = (k > 1 || private_table)
        .then(|| audit_domain(&checker, unit.as_deref(), relational))
        .flatten();
    let contributors = (k > 1 || audit.is_some()).then(|| Counted {
        below: &chain[at + 1..],
        used: &checker.used,
        nonlinear: &checker.nonlinear,
        magnitude: &magnitude,
        unit: unit.as_deref(),
        policy,
        station,
        audit: audit.is_some(),
    });
    let global = agg.group_expr.is_empty();
    let restricted = k > 1 || checker.first_non_public(&checker.used).is_some();
    // A model over non-public columns runs with the policy's dominance rule, whatever
    // coefficients the round was sent with.
    let dominated;
    let agg = if restricted && checker.model.is_some() {
        dominated = with_dominance(agg, policy.model_dominance)
            .map_err(|e| checker.shape(&format!("the model cannot be checked ({e})")))?;
        &dominated
    } else {
        agg
    };
    let plan = with_row_count(&chain[..at], agg, contributors)
        .map_err(|e| checker.shape(&format!("the row count cannot be added ({e})")))?;
    let release = match checker.model.take() {
        None => Release::Groups { k, global },
        Some(model) => {
            if agg.aggr_expr.len() != 1 {
                return Err(
                    checker.shape("a model aggregate must be the fragment's only aggregate")
                );
            }
            model_release(&checker, model, k, global, restricted)?
        }
    };
    Ok(Checked {
        plan,
        table,
        release,
        audit,
    })
}

/// Whether `table` has a column that is not `public`.
fn has_non_public(policy: &Policy, table: &str, schema: &arrow::datatypes::Schema) -> bool {
    schema
        .fields()
        .iter()
        .any(|f| policy.visibility(table, f.name()) != Visibility::Public)
}

/// The query-set auditor's domain for an aggregate release (see [`Checked::audit`]), if
/// the auditor watches it.
fn audit_domain(checker: &Checker<'_>, unit: Option<&str>, relational: bool) -> Option<String> {
    let policy = checker.policy;
    if relational {
        let watched = checker
            .tables
            .iter()
            .any(|(t, _)| !policy.is_reference(t) && policy.query_set_audit(t));
        // A relational input carries its first patient table's unit hash.
        return watched.then(|| {
            checker.units.first().map_or_else(
                || format!("table:{}", checker.table),
                |u| format!("unit:{u}"),
            )
        });
    }
    if !policy.query_set_audit(&checker.table) {
        return None;
    }
    Some(match unit {
        Some(u) => format!("unit:{u}"),
        None => format!("table:{}", checker.table),
    })
}

/// Whether every scalar and aggregate function in `plan` gives the same result whenever it
/// runs, so that a plan optimized once (constants folded) may be run again: a station's and
/// the hub's plan caches keep only such plans.
pub fn only_immutable_functions(plan: &LogicalPlan) -> bool {
    let mut immutable = true;
    let _ = plan.apply_with_subqueries(|node| {
        node.apply_expressions(|expr| {
            expr.apply(|e| {
                let volatile = match e {
                    Expr::ScalarFunction(f) => f.func.signature().volatility,
                    Expr::AggregateFunction(f) => f.func.signature().volatility,
                    _ => Volatility::Immutable,
                };
                if volatile != Volatility::Immutable {
                    immutable = false;
                    return Ok(TreeNodeRecursion::Stop);
                }
                Ok(TreeNodeRecursion::Continue)
            })
        })
    });
    immutable
}
