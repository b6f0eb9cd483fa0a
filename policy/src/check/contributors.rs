//! k counts contributors: the rows whose values enter each released value, not the group.
//!
//! `regr_avgx(y, x)` uses only the rows where both arguments are non-NULL, `count(a, b)`
//! the rows where all are, and an aggregate's FILTER a sub-group: a group of 200 rows can
//! hold a value computed from one. So the approved plan counts, beside the group's rows, the
//! contributors of every aggregate call over columns (`count(*) FILTER (WHERE each argument
//! IS NOT NULL AND the call's filter)`), and the release keeps a group only if each count
//! reaches the threshold.
//!
//! The threshold is k plus a small margin drawn from a keyed hash of *which* rows
//! contribute (the XOR of a hash of each contributing row), as Diffix's low-count filter
//! does. The same rows always meet the same threshold, so repeating a query learns
//! nothing new; a set that differs by one patient meets another, so a query that adds one
//! patient to k − 1 others no longer reads that patient's value from whether the answer
//! comes back. Below k nothing is released, whatever the margin.
//!
//! ```text
//!   Aggregate(group, [calls…, __contributors_i, __digest_i …, __digest_rows, __rows])
//!     └ … every node below carries __row_hash = row_hash(the columns the fragment uses)
//! ```
//!
//! A value computed in a non-linear form (a product, a ratio) is also held to the dominance
//! rule: with known weights, `sum(age / (patient_id * patient_id))` (in floats) over patient 1 and nine
//! patients numbered above 200 is patient 1's age to two decimals. The plan computes the
//! largest and the total absolute contribution of each such argument
//! (`__dominance_max_i_j`, `__dominance_sum_i_j`), and the release withholds a group in
//! which one row holds more than the policy's `model_dominance` share of one.
//!
//! The extra columns never leave: the release strips them (see
//! [`crate::release::released_schema`]).

use datafusion::functions::math::expr_fn::abs;
use datafusion::functions_aggregate::bit_and_or_xor::bit_xor;
use datafusion::functions_aggregate::count::count;
use datafusion::functions_aggregate::min_max::max;
use datafusion::functions_aggregate::sum::sum;
use datafusion::logical_expr::utils::conjunction;
use datafusion::logical_expr::{ExprFunctionExt, Filter};
use railyard_udfs::row_hash::RowHash;

use super::*;

/// Prefix of the contributor count of aggregate call `i` (`__contributors_i`).
pub const CONTRIBUTORS_PREFIX: &str = "__contributors_";
/// Prefix of the digest of the rows counted by the column of the same suffix.
pub const DIGEST_PREFIX: &str = "__digest_";
/// The digest of the group's rows (paired with `__rows`).
pub const ROWS_DIGEST: &str = "__digest_rows";
/// Prefix of the largest absolute contribution to a non-linear argument (`_i_j`: call i,
/// its j-th such argument).
pub const DOMINANCE_MAX_PREFIX: &str = "__dominance_max_";
/// Prefix of the total absolute contribution to the same argument.
pub const DOMINANCE_SUM_PREFIX: &str = "__dominance_sum_";
/// The per-row hash carried from the scan to the aggregate.
const ROW_HASH_COLUMN: &str = "__row_hash";

/// Whether a column of an approved plan is one of the station's own, never released.
pub fn is_internal(name: &str) -> bool {
    name.starts_with(CONTRIBUTORS_PREFIX)
        || name.starts_with(DIGEST_PREFIX)
        || name.starts_with("__dominance_")
}

/// What the approved plan counts beside the row count: the nodes below the aggregate, the
/// columns the fragment uses (hashed per row), and the non-linear arguments per call.
pub(super) struct Counted<'a> {
    pub(super) below: &'a [&'a LogicalPlan],
    pub(super) used: &'a BTreeSet<String>,
    pub(super) nonlinear: &'a [(usize, Expr)],
}

/// The aggregate's input rebuilt so that it carries `__row_hash` of the `used` columns,
/// from the scan up through every node (`below`: the aggregate's input first, the scan
/// last).
fn with_row_hash(
    below: &[&LogicalPlan],
    used: &BTreeSet<String>,
) -> datafusion::common::Result<LogicalPlan> {
    let mut plan: Option<LogicalPlan> = None;
    for node in below.iter().rev() {
        let hash_of = |plan: &LogicalPlan| -> datafusion::common::Result<Expr> {
            let (q, f) = plan
                .schema()
                .qualified_field_with_unqualified_name(ROW_HASH_COLUMN)?;
            Ok(Expr::Column(Column::from((q, f))))
        };
        plan = Some(match (node, plan) {
            (LogicalPlan::TableScan(scan), None) => {
                let scanned = LogicalPlan::TableScan(scan.clone());
                let columns: Vec<Expr> = scanned
                    .schema()
                    .columns()
                    .into_iter()
                    .map(Expr::Column)
                    .collect();
                let hashed: Vec<Expr> = columns
                    .iter()
                    .filter(|c| matches!(c, Expr::Column(c) if used.contains(&c.name)))
                    .cloned()
                    .collect();
                let hash = if hashed.is_empty() {
                    lit(0u64)
                } else {
                    RowHash::udf().call(hashed)
                };
                let mut exprs = columns;
                exprs.push(hash.alias(ROW_HASH_COLUMN));
                LogicalPlan::Projection(Projection::try_new(exprs, Arc::new(scanned))?)
            }
            (LogicalPlan::Filter(f), Some(input)) => {
                LogicalPlan::Filter(Filter::try_new(f.predicate.clone(), Arc::new(input))?)
            }
            (LogicalPlan::Projection(p), Some(input)) => {
                let mut exprs = p.expr.clone();
                exprs.push(hash_of(&input)?);
                LogicalPlan::Projection(Projection::try_new(exprs, Arc::new(input))?)
            }
            (LogicalPlan::SubqueryAlias(a), Some(input)) => LogicalPlan::SubqueryAlias(
                SubqueryAlias::try_new(Arc::new(input), a.alias.clone())?,
            ),
            (other, _) => {
                return datafusion::common::plan_err!("{} below an aggregate", other.display());
            }
        });
    }
    plan.ok_or_else(|| datafusion::common::DataFusionError::Plan("no table scan".into()))
}

/// The aggregate of `agg` with the contributor counts and digests appended (before the row
/// count, which [`with_row_count`] appends last).
pub(super) fn with_contributors(
    agg: &Aggregate,
    counted: &Counted<'_>,
) -> datafusion::common::Result<Aggregate> {
    let input = with_row_hash(counted.below, counted.used)?;
    let hash = {
        let (q, f) = input
            .schema()
            .qualified_field_with_unqualified_name(ROW_HASH_COLUMN)?;
        Expr::Column(Column::from((q, f)))
    };
    let mut aggr = agg.aggr_expr.clone();
    for (i, e) in agg.aggr_expr.iter().enumerate() {
        let Expr::AggregateFunction(f) = (match e {
            Expr::Alias(a) => a.expr.as_ref(),
            other => other,
        }) else {
            continue;
        };
        let name = match f.func.inner().downcast_ref::<PartialAggregate>() {
            Some(partial) => partial.inner().name().to_string(),
            None => f.func.name().to_string(),
        };
        if matches!(name.as_str(), GLM_TERMS | SURVIVAL_TERMS) {
            // Models have rules of their own, on their complete rows and levels.
            continue;
        }
        let mut conditions: Vec<Expr> = f
            .params
            .args
            .iter()
            .filter(|a| !a.column_refs().is_empty())
            .map(|a| a.clone().is_not_null())
            .collect();
        if let Some(filter) = &f.params.filter {
            conditions.push(filter.as_ref().clone());
        }
        let Some(condition) = conjunction(conditions) else {
            continue;
        };
        aggr.push(
            count(lit(1))
                .filter(condition.clone())
                .build()?
                .alias(format!("{CONTRIBUTORS_PREFIX}{i}")),
        );
        aggr.push(
            bit_xor(hash.clone())
                .filter(condition.clone())
                .build()?
                .alias(format!("{DIGEST_PREFIX}{i}")),
        );
        let nonlinear = counted.nonlinear.iter().filter(|(call, _)| *call == i);
        for (j, (_, arg)) in nonlinear.enumerate() {
            // In floating point: abs() of the smallest integer fails.
            let size = abs(cast(arg.clone(), DataType::Float64));
            aggr.push(
                max(size.clone())
                    .filter(condition.clone())
                    .build()?
                    .alias(format!("{DOMINANCE_MAX_PREFIX}{i}_{j}")),
            );
            aggr.push(
                sum(size)
                    .filter(condition.clone())
                    .build()?
                    .alias(format!("{DOMINANCE_SUM_PREFIX}{i}_{j}")),
            );
        }
    }
    aggr.push(bit_xor(hash).alias(ROWS_DIGEST));
    Aggregate::try_new(Arc::new(input), agg.group_expr.clone(), aggr)
}
