//! Differentially private fragments: every call a DP one over a column used unchanged, sums
//! with bounds, groups with public keys; the release the station noises.

use super::*;

/// A DP aggregate call of a fragment, as checked.
pub(super) struct DpCall {
    pub(super) kind: DpKind,
    /// The table column it reads (none for `dp_count(*)`).
    pub(super) column: Option<String>,
    /// The argument expression (clamped before a sum).
    pub(super) arg: Expr,
    /// The arguments after it (the quantile q of `dp_quantile`).
    pub(super) rest: Vec<Expr>,
    /// The output name of the call.
    pub(super) name: String,
}

impl DpCall {
    pub(super) fn lineage(&self) -> Lineage {
        Lineage {
            bases: self.column.iter().cloned().collect(),
            ..Lineage::default()
        }
    }
}

/// The DP kind of an aggregate output, and whether it is the station half
/// (`partial_dp_*`).
pub(super) fn dp_call_of(e: &Expr) -> Option<(DpKind, bool, &AggregateFunction)> {
    let call = match e {
        Expr::Alias(a) => a.expr.as_ref(),
        other => other,
    };
    let Expr::AggregateFunction(f) = call else {
        return None;
    };
    match f.func.inner().downcast_ref::<PartialAggregate>() {
        Some(partial) => dp_kind(partial.inner()).map(|k| (k, true, f)),
        None => dp_kind(&f.func).map(|k| (k, false, f)),
    }
}

/// A column of the table used unchanged (possibly cast): a DP argument or group key, or a
/// column argument of a model aggregate.
pub(super) fn plain_column<'a>(e: &Expr, input: &'a [(Column, Lineage)]) -> Option<&'a String> {
    let e = match e {
        Expr::Cast(c) => c.expr.as_ref(),
        Expr::TryCast(c) => c.expr.as_ref(),
        other => other,
    };
    let Expr::Column(c) = e else { return None };
    find(input, c)
        .filter(|l| l.direct && l.bases.len() == 1 && !l.pseudonym)
        .and_then(|l| l.bases.iter().next())
}

impl Checker<'_> {
    /// Checks one aggregate call of a DP fragment: a station half of a DP aggregate, over a
    /// column used unchanged (or a literal, for a count), with bounds for a sum.
    pub(super) fn dp_call(
        &mut self,
        e: &Expr,
        input: &[(Column, Lineage)],
        schema: &DFSchema,
    ) -> Result<DpCall, Refusal> {
        let Some((kind, partial, f)) = dp_call_of(e) else {
            return Err(Refusal {
                rule: Rule::DpMixed,
                message: format!(
                    "policy: station '{}' answers differentially private aggregates only on \
                     their own: an exact aggregate in the same fragment would bypass the noise",
                    self.station
                ),
            });
        };
        if !partial {
            return Err(self.shape(&format!(
                "{}() is computed by stations as {}{}() states",
                kind.name(),
                railyard_udfs::PARTIAL_PREFIX,
                kind.name()
            )));
        }
        let distinct_state = f
            .func
            .inner()
            .downcast_ref::<PartialAggregate>()
            .is_some_and(|p| p.is_distinct());
        if distinct_state
            || f.params.distinct
            || f.params.filter.is_some()
            || !f.params.order_by.is_empty()
        {
            return Err(self.shape(&format!(
                "{}() takes no DISTINCT, FILTER or ORDER BY",
                kind.name()
            )));
        }
        let (arg, rest) = match f.params.args.split_first() {
            Some((arg, rest)) if rest.len() + 1 == kind.user_args() => (arg, rest),
            _ => {
                return Err(self.shape(&match kind {
                    DpKind::Quantile => {
                        "dp_quantile() takes two arguments: a column and the quantile q".to_string()
                    }
                    _ => format!("{}() takes one argument", kind.name()),
                }));
            }
        };
        // The quantile q of dp_quantile: a constant between 0 and 1.
        for q in rest {
            let value = match q {
                Expr::Cast(c) => literal(&c.expr),
                other => literal(other),
            };
            let q = value.and_then(|v| match v.cast_to(&DataType::Float64).ok()? {
                ScalarValue::Float64(Some(q)) if (0.0..=1.0).contains(&q) => Some(q),
                _ => None,
            });
            if q.is_none() {
                return Err(self.shape(
                    "the second argument of dp_quantile() is the quantile q: a constant \
                     between 0 and 1",
                ));
            }
        }
        // The usual checks first: literals, forbidden columns, and no expression (a cast
        // included) that could fail on particular values.
        self.lineage(arg, input, schema)?;
        let column = match plain_column(arg, input) {
            Some(c) => {
                self.forbidden(c)?;
                self.used.insert(c.clone());
                Some(c.clone())
            }
            None if kind == DpKind::Count
                && arg.column_refs().is_empty()
                && literal(arg).is_some() =>
            {
                None
            }
            None => {
                return Err(self.shape(&format!(
                    "the {}argument of {}() must be a column of the table, unchanged{}",
                    if kind.user_args() > 1 { "first " } else { "" },
                    kind.name(),
                    if kind == DpKind::Count { ", or *" } else { "" }
                )));
            }
        };
        if kind.quantile() {
            let c = column.as_deref().unwrap_or_default();
            if self.policy.dp_quantile_edges(&self.table, c).is_none() {
                return Err(self.column_refusal(
                    Rule::DpBounds,
                    c,
                    &format!(
                        "{}() needs bins (bins = N over lower and upper, or bins = [edges]) \
                         in the policy's [tables.{}.dp]",
                        kind.name(),
                        self.table
                    ),
                ));
            }
        }
        if kind.sums() {
            let c = column.as_deref().unwrap_or_default();
            if self
                .policy
                .dp_column(&self.table, c)
                .and_then(|d| d.bounds)
                .is_none()
            {
                return Err(self.column_refusal(
                    Rule::DpBounds,
                    c,
                    &format!(
                        "{}() needs its bounds (lower, upper) in the policy's [tables.{}.dp]",
                        kind.name(),
                        self.table
                    ),
                ));
            }
        }
        Ok(DpCall {
            kind,
            column,
            arg: arg.clone(),
            rest: rest.to_vec(),
            name: e.schema_name().to_string(),
        })
    }
}

/// The release of a DP fragment: the aggregate alone, with every summed argument clamped to
/// its bounds, the public key set of every group column, and where each output column of
/// the fragment comes from in the aggregate's output.
pub(super) fn dp_release(
    checker: &Checker,
    plan: &LogicalPlan,
    chain: &[&LogicalPlan],
    at: usize,
    input_lineage: &[(Column, Lineage)],
    calls: Vec<DpCall>,
) -> Result<Checked, Refusal> {
    let LogicalPlan::Aggregate(agg) = chain[at] else {
        unreachable!("the DP aggregate is at its position");
    };
    let table = &checker.table;
    let input_schema = agg.input.schema();
    let mut groups = Vec::new();
    let mut cells: usize = 1;
    for g in &agg.group_expr {
        let column = plain_column(g, input_lineage).cloned();
        let keys = column.as_ref().and_then(|c| {
            let t = g.get_type(input_schema).ok()?;
            let keys = checker.policy.dp_column(table, c)?.keys.as_ref()?;
            keys.iter()
                .map(|k| k.to_scalar(&t))
                .collect::<Option<Vec<_>>>()
        });
        let (Some(column), Some(keys)) = (column, keys) else {
            let name = g.schema_name().to_string();
            return Err(Refusal {
                rule: Rule::DpKeys,
                message: format!(
                    "policy: station '{}' groups differentially private aggregates of table \
                     '{table}' only by columns, unchanged, whose public keys its policy \
                     declares ([tables.{table}.dp] column = {{ keys = [...] }}); '{name}' is \
                     not one",
                    checker.station
                ),
            });
        };
        cells = cells.saturating_mul(keys.len());
        groups.push(crate::dp::DpGroup { column, keys });
    }
    if cells > crate::file::MAX_DP_GROUPS {
        return Err(checker.shape(&format!(
            "a differentially private release has at most {} groups (key combinations)",
            crate::file::MAX_DP_GROUPS
        )));
    }
    let mut aggregates = Vec::new();
    let mut exprs = Vec::new();
    for call in calls {
        let mut edges = Vec::new();
        let bound = match (&call.column, call.kind.sums()) {
            (Some(c), false) if call.kind.quantile() => {
                // The station counts over its own bins: their edges follow the call's
                // arguments, as constants.
                edges = checker
                    .policy
                    .dp_quantile_edges(table, c)
                    .expect("checked in dp_call");
                let mut args = vec![cast(call.arg.clone(), DataType::Float64)];
                args.extend(call.rest.iter().map(|q| cast(q.clone(), DataType::Float64)));
                args.extend(edges.iter().map(|e| lit(*e)));
                exprs.push((call.name.clone(), Some(args)));
                1.0
            }
            (Some(c), true) => {
                let (lower, upper) = checker
                    .policy
                    .dp_column(table, c)
                    .and_then(|d| d.bounds)
                    .expect("checked in dp_call");
                let x = cast(call.arg.clone(), DataType::Float64);
                // NULL and NaN are left out (like NULL in any sum); the rest is clamped.
                let clamped = when(
                    x.clone().is_null().or(isnan(x.clone())),
                    lit(ScalarValue::Float64(None)),
                )
                .when(x.clone().lt(lit(lower)), lit(lower))
                .when(x.clone().gt(lit(upper)), lit(upper))
                .otherwise(x)
                .map_err(|e| checker.shape(&format!("the bounds cannot be applied ({e})")))?;
                exprs.push((call.name.clone(), Some(vec![clamped])));
                lower.abs().max(upper.abs())
            }
            _ => {
                exprs.push((call.name.clone(), None));
                1.0
            }
        };
        aggregates.push(crate::dp::DpAggregateSpec {
            kind: call.kind,
            column: call.column,
            bound,
            edges,
        });
    }
    // Every bin of every group is released: bound the size of the noised vectors.
    let bins: usize = aggregates
        .iter()
        .map(|a| a.edges.len().saturating_sub(1))
        .sum();
    if cells.saturating_mul(bins) > MAX_DP_HISTOGRAM_CELLS {
        return Err(checker.shape(&format!(
            "a differentially private release has at most {MAX_DP_HISTOGRAM_CELLS} histogram \
             bins in all (groups × bins of each quantile)"
        )));
    }
    let aggr_expr = agg
        .aggr_expr
        .iter()
        .zip(exprs)
        .map(|(e, (name, args))| {
            let Some((_, _, f)) = dp_call_of(e) else {
                unreachable!("every call of a DP fragment is a DP call");
            };
            let mut f = f.clone();
            if let Some(args) = args {
                f.params.args = args;
            }
            Expr::AggregateFunction(f).alias(name)
        })
        .collect::<Vec<_>>();
    // With a privacy unit, a patient's rows beyond `max_rows_per_unit` are left out and the
    // noise is scaled to that many rows: ε then protects a patient, not a row.
    let (input, rows_per_unit) = match checker.units.first() {
        Some(unit) => {
            let m = checker
                .policy
                .dp
                .as_ref()
                .map_or(crate::file::DEFAULT_DP_MAX_ROWS_PER_UNIT, |d| {
                    d.max_rows_per_unit
                });
            let bounded = bounded_per_unit(&agg.input, unit, m).map_err(|e| {
                checker.shape(&format!(
                    "a differentially private aggregate over a table with the privacy unit \
                     '{unit}' needs that column below it ({e})"
                ))
            })?;
            (Arc::new(bounded), m as f64)
        }
        None => (Arc::clone(&agg.input), 1.0),
    };
    for a in &mut aggregates {
        a.bound *= rows_per_unit;
    }
    let aggregate = Aggregate::try_new(input, agg.group_expr.clone(), aggr_expr)
        .map_err(|e| checker.shape(&format!("the bounds cannot be applied ({e})")))?;
    // Above the aggregate there are only renaming projections: trace each output column.
    let mut positions: Vec<usize> = (0..agg.schema.fields().len()).collect();
    for node in chain[..at].iter().rev() {
        if let LogicalPlan::Projection(p) = node {
            let mut next = Vec::with_capacity(p.expr.len());
            for e in &p.expr {
                let Expr::Column(c) = e.clone().unalias_nested().data else {
                    return Err(checker.shape("a DP fragment may only name its aggregates"));
                };
                let i =
                    p.input.schema().index_of_column(&c).map_err(|_| {
                        checker.shape(&format!("column '{}' cannot be traced", c.name))
                    })?;
                next.push(positions[i]);
            }
            positions = next;
        }
    }
    let release = crate::dp::DpRelease {
        table: table.clone(),
        groups,
        aggregates,
        rows_per_unit,
        aggregate_schema: Arc::new(aggregate.schema.as_arrow().clone()),
        output: positions,
        schema: Arc::new(plan.schema().as_arrow().clone()),
    };
    Ok(Checked {
        plan: LogicalPlan::Aggregate(aggregate),
        table: table.clone(),
        release: Release::Dp(Arc::new(release)),
        audit: None,
    })
}

/// Most histogram bins one DP release may carry, over all its groups and quantiles: each
/// is counted and noised at the station (about 1 µs each in a release build, 10 in a debug
/// one), and a tiny ε makes a release cheap to repeat.
pub const MAX_DP_HISTOGRAM_CELLS: usize = 100_000;

/// `input` with at most `m` rows per value of `unit` (which rows of a patient are kept is
/// arbitrary, as in SmartNoise's reservoir), its columns unchanged.
fn bounded_per_unit(
    input: &Arc<LogicalPlan>,
    unit: &str,
    m: u64,
) -> datafusion::common::Result<LogicalPlan> {
    use datafusion::functions_window::expr_fn::row_number;
    use datafusion::logical_expr::{ExprFunctionExt, LogicalPlanBuilder};
    let (q, f) = input.schema().qualified_field_with_unqualified_name(unit)?;
    let unit = Expr::Column(Column::from((q, f)));
    let rank = row_number()
        .partition_by(vec![unit])
        .build()?
        .alias("__unit_row");
    let columns: Vec<Expr> = input
        .schema()
        .columns()
        .into_iter()
        .map(Expr::Column)
        .collect();
    LogicalPlanBuilder::from(input.as_ref().clone())
        .window(vec![rank])?
        .filter(Expr::Column(Column::new_unqualified("__unit_row")).lt_eq(lit(m)))?
        .project(columns)?
        .build()
}
