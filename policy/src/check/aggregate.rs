//! Aggregate calls and the releases built on them: the safe aggregates and their
//! arguments, the model aggregates (`glm_terms`, `survival_terms`) and their literal settings,
//! pseudonymized rows, and the plan rewrite that appends the row count `__rows`.

use super::*;

/// Aggregates whose state is a sum of bounded per-row contributions: safe over groups of
/// at least k rows.
pub(super) const SAFE_AGGREGATES: &[&str] = &[
    "count",
    "sum",
    "avg",
    "mean",
    "var",
    "var_samp",
    "var_pop",
    "var_population",
    "stddev",
    "stddev_samp",
    "stddev_pop",
    "covar",
    "covar_samp",
    "covar_pop",
    "corr",
    "regr_slope",
    "regr_intercept",
    "regr_count",
    "regr_r2",
    "regr_avgx",
    "regr_avgy",
    "regr_sxx",
    "regr_syy",
    "regr_sxy",
    "bool_and",
    "bool_or",
];

/// What a model aggregate (`glm_terms`, `survival_terms`) asks for, as read from its
/// literal arguments.
#[derive(Debug, Clone, PartialEq)]
pub(super) enum ModelCall {
    Glm {
        parameters: usize,
    },
    Survival {
        covariates: usize,
        resolution: f64,
        min_rows: f64,
        min_events: f64,
    },
}

impl Checker<'_> {
    /// Checks one aggregate call; returns the lineage of its value (its arguments' columns).
    pub(super) fn aggregate_call(
        &mut self,
        call: &AggregateFunction,
        input: &[(Column, Lineage)],
        schema: &DFSchema,
    ) -> Result<Lineage, Refusal> {
        let (name, distinct) = match call.func.inner().downcast_ref::<PartialAggregate>() {
            Some(partial) => (partial.inner().name().to_string(), partial.is_distinct()),
            None => (call.func.name().to_string(), call.params.distinct),
        };
        if call.func.inner().is::<PartialAggregate>()
            && matches!(name.as_str(), GLM_TERMS | SURVIVAL_TERMS)
        {
            return Err(self.shape(&format!("{name}() is not split into partial states")));
        }
        let mut args = Vec::with_capacity(call.params.args.len());
        for arg in &call.params.args {
            args.push((arg, self.lineage(arg, input, schema)?.bases));
        }
        let value = Lineage {
            bases: args.iter().flat_map(|(_, b)| b.iter().cloned()).collect(),
            ..Lineage::default()
        };
        if matches!(name.as_str(), GLM_TERMS | SURVIVAL_TERMS) {
            self.model_call(&name, call, input)?;
            return Ok(value);
        }
        let mut arg_bases = value.bases.clone();
        for sort in &call.params.order_by {
            arg_bases.extend(self.lineage(&sort.expr, input, schema)?.bases);
        }
        if let Some(filter) = &call.params.filter {
            let bases = self.lineage(filter, input, schema)?.bases;
            if let Some(c) = self.first_non_public(&bases) {
                return Err(self.column_refusal(
                    Rule::AggregateFilter,
                    &c,
                    "an aggregate's FILTER clause would select a sub-group the group-size \
                     threshold does not count; filter with WHERE or split with GROUP BY instead",
                ));
            }
        }
        let Some(column) = self.first_non_public(&arg_bases) else {
            return Ok(value);
        };
        // The number of distinct patients is what the threshold counts anyway (`__rows`):
        // a count, not the set, so it may leave (the hub adds the stations' counts up).
        let unit_count = name == "count"
            && distinct
            && !call.func.inner().is::<PartialAggregate>()
            && call.params.filter.is_none()
            && matches!(call.params.args.as_slice(), [arg] if self.is_unit(arg, input));
        if distinct && !unit_count {
            return Err(self.column_refusal(
                Rule::DistinctAggregate,
                &column,
                &format!("{name}(DISTINCT …) would release the station's set of distinct values"),
            ));
        }
        if !call.params.order_by.is_empty() {
            return Err(self.column_refusal(
                Rule::Ordering,
                &column,
                &format!("{name}() with ORDER BY would pick values by their rank"),
            ));
        }
        if !SAFE_AGGREGATES.contains(&name.as_str()) {
            let why = match name.as_str() {
                "min" | "max" | "first_value" | "last_value" | "nth_value" => {
                    format!("{name}() would release a single value")
                }
                "array_agg" | "string_agg" => format!("{name}() would release every value"),
                n if n.contains("median") || n.contains("percentile") || n.contains("quantile") => {
                    format!("{name}() would release an individual value")
                }
                _ => format!("{name}() is not one of the station's disclosure-safe aggregates"),
            };
            return Err(self.column_refusal(Rule::UnsafeAggregate, &column, &why));
        }
        // A count releases how many rows its argument does not make NULL: whatever the
        // argument, that is the count of its contributors, which k counts.
        if name == "count" {
            return Ok(value);
        }
        for (arg, bases) in &args {
            let Some(c) = self.first_non_public(bases) else {
                continue;
            };
            let form = form_of(arg, input, schema);
            if form.accepted() {
                self.expansion(&name, arg, form, &c, input)?;
            }
            if !form.accepted() {
                return Err(self.column_refusal(
                    Rule::AggregateArgument,
                    &c,
                    &format!(
                        "inside {name}() it may only enter a sum of products of at most two \
                         columns, scaled or shifted (a*x + b, x - y, x*y, x / y, date_part of \
                         a column): a threshold, CASE, TRY_CAST or integer division could make \
                         a single patient's value dominate the result"
                    ),
                ));
            }
        }
        Ok(value)
    }

    /// The terms of an accepted argument (`super::poly`): refused if like terms cancel or
    /// if it reads a column computed below this level (where neither rule could see its
    /// terms; the hub writes every argument out at the aggregate), and each non-linear term
    /// recorded for the dominance rule.
    fn expansion(
        &mut self,
        name: &str,
        arg: &Expr,
        form: Form,
        column: &str,
        input: &[(Column, Lineage)],
    ) -> Result<(), Refusal> {
        let Some(expansion) = poly::expand(arg, input) else {
            return Err(self.column_refusal(
                Rule::AggregateArgument,
                column,
                &format!(
                    "inside {name}() it may only be computed in the aggregate's own argument, \
                     as a sum of at most 256 terms: a value computed in a subquery below it \
                     hides which terms the sum adds"
                ),
            ));
        };
        if expansion.out_of_scale() {
            return Err(self.column_refusal(
                Rule::AggregateArgument,
                column,
                &format!(
                    "inside {name}() a term is scaled by more than 2^20 (or less than 2^-20): \
                     next to a term of another scale it would round the other values away on \
                     every row but those where it is zero"
                ),
            ));
        }
        if expansion.cancels() {
            return Err(self.column_refusal(
                Rule::AggregateArgument,
                column,
                &format!(
                    "inside {name}() two like terms of opposite signs would cancel, and in \
                     floating point a large cancelled term erases the other terms' digits on \
                     every row but those where it is zero"
                ),
            ));
        }
        if let Form::Smooth {
            degree,
            denominator,
            ..
        } = form
            && (degree > 1 || denominator > 0)
        {
            for term in expansion.nonlinear_terms() {
                self.nonlinear.push((self.call, term));
            }
        }
        Ok(())
    }

    /// Checks the arguments of a model aggregate: table columns used unchanged (a GLM
    /// covariate may also be a level indicator `column = literal`), and literals for
    /// everything else. Records what the call asks for; the release rules are applied once
    /// the whole fragment is known.
    pub(super) fn model_call(
        &mut self,
        name: &str,
        call: &AggregateFunction,
        input: &[(Column, Lineage)],
    ) -> Result<(), Refusal> {
        if self.model.is_some() {
            return Err(self.shape(&format!("{name}() may appear once in a fragment")));
        }
        if call.params.distinct || call.params.filter.is_some() || !call.params.order_by.is_empty()
        {
            return Err(self.shape(&format!("{name}() takes no DISTINCT, FILTER or ORDER BY")));
        }
        let args = &call.params.args;
        let column = |e: &Expr| plain_column(e, input).map(|_| ());
        let not_column = |i: usize| {
            self.shape(&format!(
                "argument {} of {name}() must be a column of the table, unchanged",
                i + 1
            ))
        };
        let not_literal =
            |i: usize| self.shape(&format!("argument {} of {name}() must be a literal", i + 1));
        let model = if name == GLM_TERMS {
            let family = match args.first().and_then(literal) {
                Some(
                    ScalarValue::Utf8(Some(s))
                    | ScalarValue::LargeUtf8(Some(s))
                    | ScalarValue::Utf8View(Some(s)),
                ) => Family::parse(&s),
                _ => None,
            };
            if family.is_none() {
                return Err(self.shape(&format!(
                    "{name}() needs a literal family: 'gaussian', 'binomial' or 'poisson'"
                )));
            }
            let Some(ScalarValue::Boolean(Some(intercept))) = args.get(1).and_then(literal) else {
                return Err(not_literal(1));
            };
            let Some(p) = glm_covariates(args.len(), intercept) else {
                return Err(self.shape(&format!(
                    "{name}() needs as many coefficients as design columns"
                )));
            };
            column(&args[2]).ok_or_else(|| not_column(2))?;
            for (j, x) in args[3..3 + p].iter().enumerate() {
                if column(x).is_some() {
                    continue;
                }
                let indicator = match x {
                    Expr::BinaryExpr(BinaryExpr {
                        left,
                        op: Operator::Eq,
                        right,
                    }) => {
                        (column(left).is_some() && literal(right).is_some())
                            || (column(right).is_some() && literal(left).is_some())
                    }
                    _ => false,
                };
                if !indicator {
                    return Err(self.shape(&format!(
                        "argument {} of {name}() must be a column of the table, unchanged, or \
                         a level indicator `column = literal`",
                        j + 4
                    )));
                }
            }
            for (i, b) in args.iter().enumerate().skip(3 + p) {
                if literal(b).and_then(|v| number(&v)).is_none() {
                    return Err(not_literal(i));
                }
            }
            ModelCall::Glm {
                parameters: p + usize::from(intercept),
            }
        } else {
            let Some(p) = survival_covariates(args.len()) else {
                return Err(self.shape(&format!(
                    "{name}() needs as many coefficients as covariates"
                )));
            };
            for i in (0..2).chain(5..5 + p) {
                column(&args[i]).ok_or_else(|| not_column(i))?;
            }
            let mut literals = Vec::new();
            for i in (2..5).chain(5 + p..args.len()) {
                literals.push(
                    literal(&args[i])
                        .and_then(|v| number(&v))
                        .ok_or_else(|| not_literal(i))?,
                );
            }
            ModelCall::Survival {
                covariates: p,
                resolution: literals[0],
                min_rows: literals[1],
                min_events: literals[2],
            }
        };
        self.model = Some(model);
        Ok(())
    }
}

/// The release of a fragment that outputs `pseudonym(join_key)`: rows for a hub join.
pub(super) fn pseudonymized_release(
    checker: &Checker,
    plan: &LogicalPlan,
    chain: &[&LogicalPlan],
    aggregates: bool,
) -> Result<Checked, Refusal> {
    let table = &checker.table;
    if aggregates {
        return Err(checker.shape(
            "pseudonyms are released row by row for a hub join, never inside an aggregate",
        ));
    }
    no_ordering(chain, checker.station, "a pseudonymized fragment")?;
    if !checker.policy.allow_vertical(table) {
        return Err(Refusal {
            rule: Rule::AllowVertical,
            message: format!(
                "policy: station '{}' does not release table '{table}' for joins with other \
                 stations' columns (allow_vertical is off)",
                checker.station
            ),
        });
    }
    Ok(Checked {
        plan: plan.clone(),
        table: table.clone(),
        release: Release::Pseudonymized {
            k: checker.policy.min_group_size(table),
        },
        audit: None,
    })
}

/// The argument of a `pseudonym(…)` output column, if `e` is one.
pub(super) fn pseudonym_argument(e: &Expr) -> Option<&Expr> {
    let inner = match e {
        Expr::Alias(a) => a.expr.as_ref(),
        other => other,
    };
    match inner {
        Expr::ScalarFunction(f) if f.func.name() == PSEUDONYM => match f.args.as_slice() {
            [arg] => Some(arg),
            _ => None,
        },
        _ => None,
    }
}

/// The release of a model fragment, after checking what it asks for against the policy.
pub(super) fn model_release(
    checker: &Checker,
    model: ModelCall,
    k: u64,
    global: bool,
    restricted: bool,
) -> Result<Release, Refusal> {
    let policy = checker.policy;
    let table = &checker.table;
    match model {
        ModelCall::Glm { .. } if !global => {
            Err(checker.shape("a model is fitted over the whole table: no GROUP BY"))
        }
        ModelCall::Glm { .. } | ModelCall::Survival { .. } if !restricted => {
            Ok(Release::Groups { k: 1, global })
        }
        ModelCall::Glm { parameters } => Ok(Release::Model {
            k,
            min_rows: policy.model_min_rows(table),
            parameters,
        }),
        ModelCall::Survival {
            covariates,
            resolution,
            min_rows,
            min_events,
        } => {
            let width = policy.survival_time_resolution(table);
            let needed_events = if covariates > 0 { k as f64 } else { 0.0 };
            if width > 0.0
                && (resolution < width || min_rows < k as f64 || min_events < needed_events)
            {
                return Err(Refusal {
                    rule: Rule::SurvivalTimeResolution,
                    message: format!(
                        "policy: station '{}' releases survival times of table '{table}' only \
                         floored to multiples of at least {width}, pooled to at least {k} rows{} \
                         per released time",
                        checker.station,
                        if covariates > 0 {
                            format!(" and no deaths or at least {k} deaths")
                        } else {
                            String::new()
                        }
                    ),
                });
            }
            Ok(Release::Survival {
                k: k.max(policy.model_min_rows(table)),
                global,
            })
        }
    }
}

/// Rebuilds the fragment with `count(*) AS __rows` added to its aggregate and carried
/// through every node above it as the last output column; with `contributors`, also the
/// contributor counts, digests and dominance sums of [`super::contributors`], before it.
pub(super) fn with_row_count(
    above: &[&LogicalPlan],
    agg: &Aggregate,
    contributors: Option<Counted<'_>>,
) -> datafusion::common::Result<LogicalPlan> {
    let base = match contributors {
        Some(counted) => with_contributors(agg, &counted)?,
        None => agg.clone(),
    };
    let original = agg.schema.fields().len();
    let mut aggr = base.aggr_expr;
    // With a privacy unit the group's count is of distinct patients (their hashes), which
    // the hub adds up: a patient lives at one station.
    let units = base
        .input
        .schema()
        .qualified_field_with_unqualified_name(UNIT_HASH_COLUMN)
        .ok()
        .map(|(q, f)| Expr::Column(Column::from((q, f))));
    let counter = match units {
        Some(u) => {
            use datafusion::logical_expr::ExprFunctionExt;
            datafusion::functions_aggregate::count::count(u)
                .distinct()
                .build()?
        }
        None => datafusion::functions_aggregate::count::count_all(),
    };
    aggr.push(counter.alias(ROWS_COLUMN));
    let mut plan = LogicalPlan::Aggregate(Aggregate::try_new(base.input, base.group_expr, aggr)?);
    let extra = plan.schema().fields().len() - original;
    for node in above.iter().rev() {
        let carried: Vec<Expr> = {
            let schema = plan.schema();
            let n = schema.fields().len();
            (n - extra..n)
                .map(|i| Expr::Column(Column::from(schema.qualified_field(i))))
                .collect()
        };
        plan = match node {
            LogicalPlan::Projection(p) => {
                let mut exprs = p.expr.clone();
                exprs.extend(carried);
                LogicalPlan::Projection(Projection::try_new(exprs, Arc::new(plan))?)
            }
            LogicalPlan::SubqueryAlias(a) => {
                LogicalPlan::SubqueryAlias(SubqueryAlias::try_new(Arc::new(plan), a.alias.clone())?)
            }
            other => {
                return datafusion::common::plan_err!("{} above an aggregate", other.display());
            }
        };
    }
    Ok(plan)
}

/// `agg` with its model aggregate (`glm_terms`, `survival_terms`) replaced by the one that
/// enforces `share` as the dominance rule (its value is marked as dominated, and refused,
/// when one row holds more than `share` of a sum the coefficients shape).
pub(super) fn with_dominance(agg: &Aggregate, share: f64) -> datafusion::common::Result<Aggregate> {
    use datafusion::logical_expr::AggregateUDF;
    use railyard_udfs::glm_terms::GlmTerms;
    use railyard_udfs::survival_terms::SurvivalTerms;
    let aggr = agg
        .aggr_expr
        .iter()
        .map(|e| {
            e.clone()
                .transform(|e| {
                    Ok(match e {
                        Expr::AggregateFunction(mut f) if f.func.name() == GLM_TERMS => {
                            f.func = Arc::new(AggregateUDF::from(GlmTerms::with_dominance(share)));
                            datafusion::common::tree_node::Transformed::yes(
                                Expr::AggregateFunction(f),
                            )
                        }
                        Expr::AggregateFunction(mut f) if f.func.name() == SURVIVAL_TERMS => {
                            f.func =
                                Arc::new(AggregateUDF::from(SurvivalTerms::with_dominance(share)));
                            datafusion::common::tree_node::Transformed::yes(
                                Expr::AggregateFunction(f),
                            )
                        }
                        other => datafusion::common::tree_node::Transformed::no(other),
                    })
                })
                .map(|t| t.data)
        })
        .collect::<datafusion::common::Result<Vec<_>>>()?;
    Aggregate::try_new(Arc::clone(&agg.input), agg.group_expr.clone(), aggr)
}
