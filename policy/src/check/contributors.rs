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
/// Prefix of the set of patients (units) behind aggregate call `i`'s value, for the
/// query-set auditor (`__units_i`; `__units_rows` for the group's).
pub const UNITS_PREFIX: &str = "__units_";
/// The set of the group's units.
pub const UNITS_ROWS: &str = "__units_rows";
/// The per-row hash carried from the scan to the aggregate.
const ROW_HASH_COLUMN: &str = "__row_hash";
/// For a table without a privacy unit, the hash of the whole row (every column of the
/// table): the row's identity for the query-set auditor, the same whichever columns a
/// query reads.
const AUDIT_HASH_COLUMN: &str = "__audit_hash";
/// The hash of the row's privacy unit (its patient), carried beside the row hash when the
/// table has a unit: counts and digests are then over distinct units, not rows.
pub(super) const UNIT_HASH_COLUMN: &str = "__unit_hash";

/// Whether a column of an approved plan is one of the station's own, never released.
pub fn is_internal(name: &str) -> bool {
    name.starts_with(CONTRIBUTORS_PREFIX)
        || name.starts_with(DIGEST_PREFIX)
        || name.starts_with(UNITS_PREFIX)
        || name.starts_with("__dominance_")
}

/// What the approved plan counts beside the row count: the nodes below the aggregate, the
/// columns the fragment uses (hashed per row), and the non-linear arguments per call.
pub(super) struct Counted<'a> {
    pub(super) below: &'a [&'a LogicalPlan],
    pub(super) used: &'a BTreeSet<String>,
    pub(super) nonlinear: &'a [(usize, Expr)],
    /// Arguments of magnitude aggregates over a table with a privacy unit: held to the
    /// dominance rule for patients whose several rows add up.
    pub(super) magnitude: &'a [(usize, Expr)],
    /// The table's privacy unit column (`None`: each row is a unit, or the input is
    /// relational and carries its own).
    pub(super) unit: Option<&'a str>,
    pub(super) policy: &'a Policy,
    pub(super) station: &'a str,
    /// Whether the query-set auditor watches the release: the aggregate then also
    /// collects the set of units behind each value (`__units_*`).
    pub(super) audit: bool,
}

/// The aggregate's input rebuilt so that it carries `__row_hash` of the `used` columns,
/// from the scan up through every node (`below`: the aggregate's input first, the scan
/// last).
fn with_row_hash(
    below: &[&LogicalPlan],
    counted: &Counted<'_>,
) -> datafusion::common::Result<LogicalPlan> {
    let (used, unit) = (counted.used, counted.unit);
    let mut plan: Option<LogicalPlan> = None;
    let mut nodes = below.iter().rev();
    if let Some(base) = below.last()
        && !matches!(base, LogicalPlan::TableScan(_))
    {
        // A relational input carries its rows' unit hash up from its scans.
        nodes.next();
        let carried = Carrier::new(counted.policy, counted.station)
            .carry(base)
            .map_err(|r| datafusion::common::DataFusionError::Plan(r.message))?;
        let Some(hash) = carried.hash else {
            return datafusion::common::plan_err!("the relational input reads no patient table");
        };
        let mut exprs: Vec<Expr> = carried
            .plan
            .schema()
            .columns()
            .into_iter()
            .filter(|c| *c != hash)
            .map(Expr::Column)
            .collect();
        exprs.push(Expr::Column(hash).alias(UNIT_HASH_COLUMN));
        plan = Some(LogicalPlan::Projection(Projection::try_new(
            exprs,
            Arc::new(carried.plan),
        )?));
    }
    for node in nodes {
        let carried = |plan: &LogicalPlan| -> datafusion::common::Result<Vec<Expr>> {
            let mut out = Vec::new();
            for name in [ROW_HASH_COLUMN, UNIT_HASH_COLUMN, AUDIT_HASH_COLUMN] {
                if let Ok((q, f)) = plan.schema().qualified_field_with_unqualified_name(name) {
                    out.push(Expr::Column(Column::from((q, f))));
                }
            }
            Ok(out)
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
                let unit_hash = unit.map(|unit| {
                    unit_hash(Column::new(Some(scan.table_name.clone()), unit))
                        .alias(UNIT_HASH_COLUMN)
                });
                // Without a unit the auditor identifies a row by all its columns.
                let audit_hash =
                    (counted.audit && unit.is_none() && !columns.is_empty()).then(|| {
                        RowHash::udf()
                            .call(columns.clone())
                            .alias(AUDIT_HASH_COLUMN)
                    });
                let mut exprs = columns;
                exprs.push(hash.alias(ROW_HASH_COLUMN));
                exprs.extend(unit_hash);
                exprs.extend(audit_hash);
                LogicalPlan::Projection(Projection::try_new(exprs, Arc::new(scanned))?)
            }
            (LogicalPlan::Filter(f), Some(input)) => {
                LogicalPlan::Filter(Filter::try_new(f.predicate.clone(), Arc::new(input))?)
            }
            (LogicalPlan::Projection(p), Some(input)) => {
                let mut exprs = p.expr.clone();
                exprs.extend(carried(&input)?);
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
    let input = with_row_hash(counted.below, counted)?;
    let column = |name: &str| -> datafusion::common::Result<Expr> {
        let (q, f) = input.schema().qualified_field_with_unqualified_name(name)?;
        Ok(Expr::Column(Column::from((q, f))))
    };
    // With a unit, a contributor is a patient: counts and digests run over distinct unit
    // hashes, and dominance compares the largest patient's total, not the largest row.
    let unit = column(UNIT_HASH_COLUMN).ok();
    let hash = unit.clone().map_or_else(|| column(ROW_HASH_COLUMN), Ok)?;
    let distinct = unit.is_some();
    // The auditor's identity of a contributor: the patient, or else the whole row.
    let member = if counted.audit {
        unit.clone().or_else(|| column(AUDIT_HASH_COLUMN).ok())
    } else {
        None
    };
    let mut aggr = agg.aggr_expr.clone();
    for (i, e) in agg.aggr_expr.iter().enumerate() {
        let Expr::AggregateFunction(f) = (match e {
            Expr::Alias(a) => a.expr.as_ref(),
            other => other,
        }) else {
            continue;
        };
        if matches!(call_name(f).as_str(), GLM_TERMS | SURVIVAL_TERMS) {
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
        // A relational input can give every patient but one a known number of rows (an
        // outer join pads the others to one, a UNION ALL adds one each): there even a row
        // count is held to the dominance rule, on each patient's departure from the
        // median patient.
        let relational = counted
            .below
            .last()
            .is_some_and(|b| !matches!(b, LogicalPlan::TableScan(_)));
        let distinct_call = f.params.distinct
            || f.func
                .name()
                .starts_with(railyard_udfs::PARTIAL_DISTINCT_PREFIX);
        if relational
            && !distinct_call
            && let Some(u) = &unit
        {
            let condition = conjunction(conditions.clone()).unwrap_or(lit(true));
            let is_count = call_name(f) == "count";
            let sizes: Vec<Expr> = if is_count {
                vec![lit(1.0)]
            } else {
                f.params
                    .args
                    .iter()
                    .filter(|a| !a.column_refs().is_empty())
                    .map(|a| abs(cast(a.clone(), DataType::Float64)))
                    .collect()
            };
            for (j, size) in sizes.into_iter().enumerate() {
                let (dev_max, dev_sum) = railyard_udfs::unit_share::deviation_udafs();
                aggr.push(
                    dev_max
                        .call(vec![u.clone(), size.clone()])
                        .filter(condition.clone())
                        .build()?
                        .alias(format!("{DOMINANCE_MAX_PREFIX}{i}_d{j}")),
                );
                aggr.push(
                    dev_sum
                        .call(vec![u.clone(), size])
                        .filter(condition.clone())
                        .build()?
                        .alias(format!("{DOMINANCE_SUM_PREFIX}{i}_d{j}")),
                );
            }
        }
        let Some(condition) = conjunction(conditions) else {
            continue;
        };
        let counter = match &unit {
            Some(u) => count(u.clone()).distinct(),
            None => count(lit(1)).null_treatment(None),
        };
        aggr.push(
            counter
                .filter(condition.clone())
                .build()?
                .alias(format!("{CONTRIBUTORS_PREFIX}{i}")),
        );
        let digest = if distinct {
            railyard_udfs::unit_share::digest_udaf()
                .call(vec![hash.clone()])
                .null_treatment(None)
        } else {
            bit_xor(hash.clone()).null_treatment(None)
        };
        aggr.push(
            digest
                .filter(condition.clone())
                .build()?
                .alias(format!("{DIGEST_PREFIX}{i}")),
        );
        if let Some(m) = &member {
            aggr.push(
                railyard_udfs::unit_set::udaf()
                    .call(vec![m.clone()])
                    .filter(condition.clone())
                    .build()?
                    .alias(format!("{UNITS_PREFIX}{i}")),
            );
        }
        let nonlinear = counted
            .nonlinear
            .iter()
            .filter(|(call, _)| *call == i)
            .map(|(_, arg)| (arg, false));
        let magnitude = counted
            .magnitude
            .iter()
            .filter(|(call, _)| *call == i)
            .map(|(_, arg)| (arg, true));
        for (j, (arg, several)) in nonlinear.chain(magnitude).enumerate() {
            // In floating point: abs() of the smallest integer fails.
            let size = abs(cast(arg.clone(), DataType::Float64));
            // Over a relational input a per-patient value is one row per patient: its
            // total counts whether or not the patient had several rows.
            let several = several && !relational;
            let largest = match (&unit, several) {
                (Some(u), false) => {
                    railyard_udfs::unit_share::udaf().call(vec![u.clone(), size.clone()])
                }
                (Some(u), true) => railyard_udfs::unit_share::several_rows_udaf()
                    .call(vec![u.clone(), size.clone()]),
                (None, _) => max(size.clone()),
            };
            aggr.push(
                largest
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
    let rows_digest = if distinct {
        railyard_udfs::unit_share::digest_udaf().call(vec![hash])
    } else {
        bit_xor(hash)
    };
    aggr.push(rows_digest.alias(ROWS_DIGEST));
    if let Some(m) = member {
        aggr.push(
            railyard_udfs::unit_set::udaf()
                .call(vec![m])
                .alias(UNITS_ROWS),
        );
    }
    Aggregate::try_new(Arc::new(input), agg.group_expr.clone(), aggr)
}
