//! An aggregate fragment: the partial half of every aggregate call at the stations, and
//! the merge aggregate and projection that finish it at the hub.

use super::*;

/// An aggregate whose partial half can run at the stations.
pub(super) struct AggregateSplit {
    pub(super) rows: RowChain,
    /// Distinct group keys as the hub's plan spells them (over the aggregate's input).
    pub(super) keys: Vec<Expr>,
    /// The same keys as station expressions.
    pub(super) groups: Vec<Expr>,
    /// `partial_<agg>(…)` calls as station expressions.
    pub(super) partials: Vec<Expr>,
    /// The hub half of each aggregate (a [`MergeAggregate`], or `sum` of the stations'
    /// distinct-patient counts).
    pub(super) merges: Vec<AggregateUDF>,
    /// The struct type each partial returns, computed from the hub's argument types.
    pub(super) state_types: Vec<DataType>,
    /// The original aggregate calls over the station's columns (for EXPLAIN and errors).
    pub(super) originals: Vec<Expr>,
}

impl AggregateSplit {
    pub(super) fn analyze(agg: &Aggregate) -> Result<Option<AggregateSplit>> {
        let Some(rows) = RowChain::analyze_in(&agg.input, true)? else {
            return Ok(None);
        };
        // Partial aggregation below a per-station LIMIT would aggregate too many rows.
        if rows.fetch.is_some() {
            return Ok(None);
        }
        let keys: Vec<Expr> = match agg.group_expr.as_slice() {
            [Expr::GroupingSet(set)] => set.distinct_expr().into_iter().cloned().collect(),
            list => list.to_vec(),
        };
        let Some(groups) = keys
            .iter()
            .map(|k| rows.substitute(k))
            .collect::<Option<Vec<_>>>()
        else {
            return Ok(None);
        };

        let input_schema = agg.input.schema();
        let mut partials = Vec::new();
        let mut merges = Vec::new();
        let mut state_types = Vec::new();
        let mut originals = Vec::new();
        for e in &agg.aggr_expr {
            let inner = match e {
                Expr::Alias(a) => a.expr.as_ref(),
                other => other,
            };
            let Expr::AggregateFunction(f) = inner else {
                return Ok(None);
            };
            let p = &f.params;
            if !p.order_by.is_empty()
                || matches!(p.null_treatment, Some(NullTreatment::IgnoreNulls))
            {
                return Ok(None);
            }
            let Some(args) = p
                .args
                .iter()
                .map(|a| rows.substitute(a))
                .collect::<Option<Vec<_>>>()
            else {
                return Ok(None);
            };
            // count(DISTINCT unit): a patient lives at one station, so the federated count
            // is the sum of the stations' counts; the stations release the count, never
            // the set.
            if f.func.name() == "count"
                && p.distinct
                && p.filter.is_none()
                && let [arg] = args.as_slice()
                && matches!(arg, Expr::Column(c) if rows.is_unit(&c.name))
            {
                let call = Expr::AggregateFunction(AggregateFunction::new_udf(
                    Arc::clone(&f.func),
                    args.clone(),
                    true,
                    None,
                    vec![],
                    None,
                ));
                originals.push(call.clone());
                partials.push(call);
                merges.push(AggregateUDF::from(
                    railyard_udfs::checked_sum::CheckedSum::default(),
                ));
                state_types.push(DataType::Int64);
                continue;
            }
            let filter = match &p.filter {
                None => None,
                Some(flt) => match rows.substitute(flt) {
                    Some(s) => Some(Box::new(s)),
                    None => return Ok(None),
                },
            };
            let mut merge_args = Vec::new();
            let mut arg_fields = Vec::new();
            for a in &p.args {
                let (_, field) = a.to_field(input_schema.as_ref())?;
                arg_fields.push(Arc::clone(&field));
                merge_args.push(match a {
                    Expr::Literal(v, _) => MergeArg::Literal(field, v.clone()),
                    _ => MergeArg::Column(field),
                });
            }
            let state_fields = railyard_udfs::PartialAggregate::state_struct_fields(
                &f.func,
                &arg_fields,
                p.distinct,
            )?;
            state_types.push(DataType::Struct(state_fields));
            // The original call as the station would spell it, to say what is released.
            originals.push(Expr::AggregateFunction(AggregateFunction::new_udf(
                Arc::clone(&f.func),
                args.clone(),
                p.distinct,
                filter.clone(),
                vec![],
                None,
            )));
            partials.push(Expr::AggregateFunction(AggregateFunction::new_udf(
                partial_of(Arc::clone(&f.func), p.distinct),
                args,
                false,
                filter,
                vec![],
                None,
            )));
            merges.push(AggregateUDF::from(MergeAggregate::new(
                Arc::clone(&f.func),
                merge_args,
                p.distinct,
            )));
        }
        Ok(Some(AggregateSplit {
            rows,
            keys,
            groups,
            partials,
            merges,
            state_types,
            originals,
        }))
    }
}
