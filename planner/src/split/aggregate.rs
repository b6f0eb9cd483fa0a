//! An aggregate fragment: the partial half of every aggregate call at the stations, and
//! the merge aggregate and projection that finish it at the hub.

use super::*;
use arrow::datatypes::FieldRef;
use datafusion::functions::core::expr_fn::{get_field, named_struct, nullif};
use datafusion::functions_aggregate::count::count_udaf;
use datafusion::logical_expr::lit;

/// An aggregate whose partial half can run at the stations.
pub(super) struct AggregateSplit {
    pub(super) rows: RowChain,
    /// Distinct group keys as the hub's plan spells them (over the aggregate's input).
    pub(super) keys: Vec<Expr>,
    /// The same keys as station expressions.
    pub(super) groups: Vec<Expr>,
    /// `partial_<agg>(…)` calls as station expressions, one per state column the stations
    /// send (`a0, a1, …`).
    pub(super) partials: Vec<Expr>,
    /// The struct type each partial returns, computed from the hub's argument types.
    pub(super) state_types: Vec<DataType>,
    /// The aggregate call each partial is the state of, over the station's columns (for
    /// EXPLAIN and errors).
    pub(super) originals: Vec<Expr>,
    /// The fields of each partial's arguments as the hub's plan types them.
    pub(super) arg_fields: Vec<Vec<FieldRef>>,
    /// The hub half of each of the query's aggregates, in the query's order.
    pub(super) merges: Vec<HubMerge>,
}

/// The hub half of one aggregate: its merge function and the state it reads.
pub(super) struct HubMerge {
    /// A [`MergeAggregate`], or `sum` of the stations' distinct-patient counts.
    pub(super) func: AggregateUDF,
    pub(super) input: StateInput,
}

/// Where the hub finds the state of one aggregate among the stations' state columns.
pub(super) enum StateInput {
    /// Partial `a{j}` is the aggregate's own state.
    Partial(usize),
    /// `avg(x)`'s state `(count, sum)`, put together from the states of `count(x)` and
    /// `sum(x)` of the same argument and FILTER: a query asking for `sum(x)` and `avg(x)`
    /// makes the stations add `x` up once (TPC-H Q1 asks for both, twice).
    Avg {
        count: usize,
        sum: usize,
        /// avg's own state field types, which the parts are cast to (lossless: an
        /// `Int64` count, never negative, to `UInt64`; a decimal sum to a wider precision).
        count_type: DataType,
        sum_type: DataType,
    },
    /// A count of the group's rows (`count(*)`, or a count of never-NULL arguments) read
    /// from the count in the state of `avg` over never-NULL arguments, of the same FILTER.
    Rows { avg: usize },
}

impl StateInput {
    /// The hub's argument to the merge function, over the fragment's columns.
    pub(super) fn hub_arg(&self) -> Expr {
        let state = |j: usize| Expr::Column(Column::new_unqualified(format!("a{j}")));
        match self {
            StateInput::Partial(j) => state(*j),
            StateInput::Avg {
                count,
                sum,
                count_type,
                sum_type,
            } => {
                // A partial's struct children are `s0, s1, …` (`PartialAggregate`); a merge
                // reads them by position. avg's state marks a group that saw no value with
                // a NULL count as well as a NULL sum (a count of 0 would make its merge
                // divide by zero); a count is 0 exactly when the sum is NULL.
                let first = |j: usize| get_field(state(j), "s0");
                named_struct(vec![
                    lit("s0"),
                    nullif(cast(first(*count), count_type.clone()), lit(0u64)),
                    lit("s1"),
                    cast(first(*sum), sum_type.clone()),
                ])
            }
            // avg's count is a `UInt64`, count's state an `Int64` (a count of rows is far
            // below 2^63); avg's state marks a group where no row passed the FILTER with a
            // NULL count, which counts 0.
            // (A CASE, not `coalesce`: the hub's merge is planned after the simplifier that
            // rewrites `coalesce` ran.)
            StateInput::Rows { avg } => {
                let count = cast(get_field(state(*avg), "s0"), DataType::Int64);
                named_struct(vec![
                    lit("s0"),
                    Expr::Case(datafusion::logical_expr::Case::new(
                        None,
                        vec![(Box::new(count.clone().is_null()), Box::new(lit(0i64)))],
                        Some(Box::new(count)),
                    )),
                ])
            }
        }
    }
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
        let mut funcs = Vec::new();
        let mut state_types = Vec::new();
        let mut originals = Vec::new();
        let mut all_arg_fields = Vec::new();
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
            let mut arg_fields = Vec::new();
            for a in &p.args {
                arg_fields.push(a.to_field(input_schema.as_ref())?.1);
            }
            all_arg_fields.push(arg_fields.clone());
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
                funcs.push(AggregateUDF::from(
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
            let merge_args = p
                .args
                .iter()
                .zip(&arg_fields)
                .map(|(a, field)| match a {
                    Expr::Literal(v, _) => MergeArg::Literal(Arc::clone(field), v.clone()),
                    _ => MergeArg::Column(Arc::clone(field)),
                })
                .collect();
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
            funcs.push(AggregateUDF::from(MergeAggregate::new(
                Arc::clone(&f.func),
                merge_args,
                p.distinct,
            )));
        }
        let mut split = AggregateSplit {
            rows,
            keys,
            groups,
            merges: funcs
                .into_iter()
                .enumerate()
                .map(|(j, func)| HubMerge {
                    func,
                    input: StateInput::Partial(j),
                })
                .collect(),
            partials,
            state_types,
            originals,
            arg_fields: all_arg_fields,
        };
        split.share_avg_sums()?;
        Ok(Some(split))
    }

    /// Lets every `avg(x)` whose query also asks for `sum(x)` (same argument, same FILTER)
    /// read that sum's state and a `count(x)` state instead of an accumulator of its own:
    /// the stations then add `x` up once. The merge is avg's own (`merge_batch` of avg's
    /// accumulator over the state it would have sent), so the answer is unchanged; a count
    /// of the argument is what avg counts, and a sum over the same rows is what it adds.
    ///
    /// Where an argument is never NULL (as every station announces it), counting it counts
    /// the group's rows that pass the call's FILTER. Every state that holds that number
    /// serves every call that needs it: the count of another never-NULL argument or
    /// `count(*)`, and the count inside the state of an `avg` of a never-NULL argument that
    /// keeps its own partial. So such an `avg` also gives its count to a `count(*)` of the
    /// same FILTER, whose partial the stations then do not compute.
    fn share_avg_sums(&mut self) -> Result<()> {
        // The avg calls that can read a sum's state, with the types of avg's own state.
        let mut sharing = Vec::new();
        for j in 0..self.merges.len() {
            let StateInput::Partial(avg) = self.merges[j].input else {
                continue;
            };
            let Some((args, filter)) = plain_call(&self.originals[avg], "avg") else {
                continue;
            };
            // Doubles and decimals, which DataFusion's avg and sum add with the same
            // operations (Arrow's sum kernel, or one addition per row into each group;
            // wrapping for decimals), so the sum's state is the sum avg would have kept.
            let (count_type, sum_type) = match state_children(&self.state_types[avg]).as_slice() {
                [c @ DataType::UInt64, s] if s.is_decimal() || **s == DataType::Float64 => {
                    ((*c).clone(), (*s).clone())
                }
                _ => continue,
            };
            let Some(sum) = (0..self.partials.len()).find(|&k| {
                plain_call(&self.originals[k], "sum") == Some((args, filter))
                    && matches!(state_children(&self.state_types[k]).as_slice(), [t] if widens(t, &sum_type))
            }) else {
                continue;
            };
            let (args, filter) = (args.to_vec(), filter.cloned());
            sharing.push((j, avg, sum, count_type, sum_type, args, filter));
        }
        let mut dropped = vec![false; self.partials.len()];
        for &(_, avg, ..) in &sharing {
            dropped[avg] = true;
        }
        for (j, avg, sum, count_type, sum_type, args, filter) in sharing {
            let same_args = (0..self.partials.len()).find(|&k| {
                plain_call(&self.originals[k], "count") == Some((&args, filter.as_ref()))
                    && self.count_state(k)
            });
            let count = if self.never_null(avg) {
                self.avg_rows(filter.as_ref(), &dropped)
                    .or(same_args)
                    .or_else(|| self.count_rows(filter.as_ref()))
            } else {
                same_args
            };
            let count = match count {
                Some(k) => k,
                None => {
                    let count_udf = count_udaf();
                    let arg_fields = self.arg_fields[avg].clone();
                    let state =
                        DataType::Struct(railyard_udfs::PartialAggregate::state_struct_fields(
                            &count_udf,
                            &arg_fields,
                            false,
                        )?);
                    if !matches!(state_children(&state).as_slice(), [DataType::Int64]) {
                        // Not the count state this expects: keep avg's own.
                        dropped[avg] = false;
                        continue;
                    }
                    let filter = filter.map(Box::new);
                    self.originals
                        .push(Expr::AggregateFunction(AggregateFunction::new_udf(
                            Arc::clone(&count_udf),
                            args.clone(),
                            false,
                            filter.clone(),
                            vec![],
                            None,
                        )));
                    self.partials
                        .push(Expr::AggregateFunction(AggregateFunction::new_udf(
                            partial_of(count_udf, false),
                            args,
                            false,
                            filter,
                            vec![],
                            None,
                        )));
                    self.state_types.push(state);
                    self.arg_fields.push(arg_fields);
                    dropped.push(false);
                    self.partials.len() - 1
                }
            };
            self.merges[j].input = StateInput::Avg {
                count,
                sum,
                count_type,
                sum_type,
            };
        }
        // A count of never-NULL arguments (`count(*)`) reads the count of an avg that keeps
        // its partial, unless an avg above reads this count.
        for j in 0..self.merges.len() {
            let StateInput::Partial(k) = self.merges[j].input else {
                continue;
            };
            let Some((_, filter)) = plain_call(&self.originals[k], "count") else {
                continue;
            };
            if !self.never_null(k)
                || !self.count_state(k)
                || self
                    .merges
                    .iter()
                    .any(|m| matches!(m.input, StateInput::Avg { count, .. } if count == k))
            {
                continue;
            }
            let Some(avg) = self.avg_rows(filter, &dropped) else {
                continue;
            };
            self.merges[j].input = StateInput::Rows { avg };
            dropped[k] = true;
        }
        if !dropped.contains(&true) {
            return Ok(());
        }
        // Renumber the state columns that remain.
        let mut renumbered = Vec::with_capacity(dropped.len());
        let mut next = 0;
        for d in &dropped {
            renumbered.push(next);
            if !d {
                next += 1;
            }
        }
        fn keep<T>(v: &mut Vec<T>, dropped: &[bool]) {
            let mut i = 0;
            v.retain(|_| {
                i += 1;
                !dropped[i - 1]
            });
        }
        keep(&mut self.partials, &dropped);
        keep(&mut self.originals, &dropped);
        keep(&mut self.state_types, &dropped);
        keep(&mut self.arg_fields, &dropped);
        for m in &mut self.merges {
            match &mut m.input {
                StateInput::Partial(j) => *j = renumbered[*j],
                StateInput::Avg { count, sum, .. } => {
                    *count = renumbered[*count];
                    *sum = renumbered[*sum];
                }
                StateInput::Rows { avg } => *avg = renumbered[*avg],
            }
        }
        Ok(())
    }
}

impl AggregateSplit {
    /// Whether every argument of partial `k` is never NULL (as the hub's plan types it,
    /// from what every station announces).
    fn never_null(&self, k: usize) -> bool {
        self.arg_fields[k].iter().all(|f| !f.is_nullable())
    }

    /// Whether partial `k`'s state is a count's: one `Int64`.
    fn count_state(&self, k: usize) -> bool {
        matches!(
            state_children(&self.state_types[k]).as_slice(),
            [DataType::Int64]
        )
    }

    /// A partial `avg` of never-NULL arguments under `filter` that keeps its partial: the
    /// first child of its state counts the group's rows that pass `filter`.
    fn avg_rows(&self, filter: Option<&Expr>, dropped: &[bool]) -> Option<usize> {
        (0..self.partials.len()).find(|&k| {
            !dropped[k]
                && plain_call(&self.originals[k], "avg").is_some_and(|(_, f)| f == filter)
                && self.never_null(k)
                && matches!(
                    state_children(&self.state_types[k]).as_slice(),
                    [DataType::UInt64, _]
                )
        })
    }

    /// A partial count of never-NULL arguments under `filter` (`count(*)` among them).
    fn count_rows(&self, filter: Option<&Expr>) -> Option<usize> {
        (0..self.partials.len()).find(|&k| {
            plain_call(&self.originals[k], "count").is_some_and(|(_, f)| f == filter)
                && self.never_null(k)
                && self.count_state(k)
        })
    }
}

/// The arguments and FILTER of `call` if it is a plain (not DISTINCT, unordered) call of
/// the aggregate `name`.
fn plain_call<'a>(call: &'a Expr, name: &str) -> Option<(&'a [Expr], Option<&'a Expr>)> {
    match call {
        Expr::AggregateFunction(f)
            if f.func.name() == name && !f.params.distinct && f.params.order_by.is_empty() =>
        {
            Some((f.params.args.as_slice(), f.params.filter.as_deref()))
        }
        _ => None,
    }
}

/// The types of a state struct's children.
fn state_children(state: &DataType) -> Vec<&DataType> {
    match state {
        DataType::Struct(fields) => fields.iter().map(|f| f.data_type()).collect(),
        _ => Vec::new(),
    }
}

/// Whether every value of type `from` is a value of type `to` (a cast between them changes
/// no value): the same type, or a decimal of the same scale, at least its precision and at
/// least its width.
fn widens(from: &DataType, to: &DataType) -> bool {
    let decimal = |t: &DataType| match t {
        DataType::Decimal32(p, s) => Some((32, *p, *s)),
        DataType::Decimal64(p, s) => Some((64, *p, *s)),
        DataType::Decimal128(p, s) => Some((128, *p, *s)),
        DataType::Decimal256(p, s) => Some((256, *p, *s)),
        _ => None,
    };
    from == to
        || matches!(
            (decimal(from), decimal(to)),
            (Some((w1, p1, s1)), Some((w2, p2, s2))) if s1 == s2 && p1 <= p2 && w1 <= w2
        )
}
