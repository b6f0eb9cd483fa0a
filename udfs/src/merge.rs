//! `merge_<agg>(state)`: the hub half of an aggregate whose station half was
//! [`crate::PartialAggregate`].
//!
//! The hub never sees the rows a state came from, only the state struct. To finish the
//! aggregate it needs the inner accumulator built exactly as the station built it, so a merge
//! function remembers the *original* argument fields (and literal arguments, such as the
//! percentile of `approx_percentile_cont`) and creates the inner accumulator from a synthetic
//! argument list over those fields. Its own single argument is the state struct; updating it
//! means `merge_batch()` on the inner accumulator, and evaluating it means the inner
//! `evaluate()`.
//!
//! Merge functions are built by the hub's planner for one call site each; they are never
//! registered by name and never travel as SQL.

use std::sync::Arc;

use arrow::array::{Array, ArrayRef, AsArray, BooleanArray};
use arrow::datatypes::{DataType, Field, FieldRef, Schema};
use datafusion::common::{Result, ScalarValue, exec_err, internal_err};
use datafusion::logical_expr::function::{AccumulatorArgs, StateFieldsArgs};
use datafusion::logical_expr::{
    Accumulator, AggregateUDF, AggregateUDFImpl, EmitTo, GroupsAccumulator, Signature, Volatility,
};
use datafusion::physical_expr::PhysicalExpr;
use datafusion::physical_expr::expressions::{Column, Literal};

/// One argument of the original aggregate call, as the merge side needs to know it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum MergeArg {
    /// A value computed per row at the station: only its field (type) is known here.
    Column(FieldRef),
    /// A constant argument: the accumulator may read it (a percentile, a separator).
    Literal(FieldRef, ScalarValue),
}

impl MergeArg {
    fn field(&self) -> &FieldRef {
        match self {
            MergeArg::Column(f) | MergeArg::Literal(f, _) => f,
        }
    }
}

/// The hub half of `inner`: folds state structs into the final aggregate value.
#[derive(Debug, PartialEq, Eq, Hash)]
pub struct MergeAggregate {
    inner: Arc<AggregateUDF>,
    name: String,
    args: Vec<MergeArg>,
    distinct: bool,
    signature: Signature,
}

impl MergeAggregate {
    pub fn new(inner: Arc<AggregateUDF>, args: Vec<MergeArg>, distinct: bool) -> Self {
        Self {
            name: format!("merge_{}", inner.name()),
            signature: Signature::any(1, Volatility::Immutable),
            inner,
            args,
            distinct,
        }
    }

    fn arg_fields(&self) -> Vec<FieldRef> {
        self.args.iter().map(|a| a.field().clone()).collect()
    }

    /// Builds the inner accumulator's arguments over a synthetic schema of the original
    /// argument fields, and calls `f` with them (the arguments borrow locals).
    fn with_inner_args<T>(&self, name: &str, f: impl FnOnce(AccumulatorArgs) -> T) -> Result<T> {
        let fields = self.arg_fields();
        let schema = Schema::new(
            fields
                .iter()
                .enumerate()
                .map(|(i, f)| f.as_ref().clone().with_name(format!("c{i}")))
                .collect::<Vec<Field>>(),
        );
        let exprs: Vec<Arc<dyn PhysicalExpr>> = self
            .args
            .iter()
            .enumerate()
            .map(|(i, a)| -> Arc<dyn PhysicalExpr> {
                match a {
                    MergeArg::Column(_) => Arc::new(Column::new(&format!("c{i}"), i)),
                    MergeArg::Literal(_, v) => Arc::new(Literal::new(v.clone())),
                }
            })
            .collect();
        let return_field = self.inner.return_field(&fields)?;
        Ok(f(AccumulatorArgs {
            return_field,
            schema: &schema,
            ignore_nulls: false,
            order_bys: &[],
            is_reversed: false,
            name,
            is_distinct: self.distinct,
            exprs: &exprs,
            expr_fields: &fields,
        }))
    }
}

impl AggregateUDFImpl for MergeAggregate {
    fn name(&self) -> &str {
        &self.name
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn return_type(&self, _arg_types: &[DataType]) -> Result<DataType> {
        Ok(self
            .inner
            .return_field(&self.arg_fields())?
            .data_type()
            .clone())
    }

    fn return_field(&self, _arg_fields: &[FieldRef]) -> Result<FieldRef> {
        let inner = self.inner.return_field(&self.arg_fields())?;
        Ok(Arc::new(inner.as_ref().clone().with_name(self.name())))
    }

    fn is_nullable(&self) -> bool {
        self.inner.is_nullable()
    }

    fn accumulator(&self, args: AccumulatorArgs) -> Result<Box<dyn Accumulator>> {
        let inner = self.with_inner_args(args.name, |a| self.inner.accumulator(a))??;
        Ok(Box::new(MergeAccumulator { inner }))
    }

    fn state_fields(&self, args: StateFieldsArgs) -> Result<Vec<FieldRef>> {
        let fields = self.arg_fields();
        let return_field = self.inner.return_field(&fields)?;
        self.inner.state_fields(StateFieldsArgs {
            name: args.name,
            input_fields: &fields,
            return_field,
            ordering_fields: &[],
            is_distinct: self.distinct,
        })
    }

    fn groups_accumulator_supported(&self, args: AccumulatorArgs) -> bool {
        self.with_inner_args(args.name, |a| self.inner.groups_accumulator_supported(a))
            .unwrap_or(false)
    }

    fn create_groups_accumulator(
        &self,
        args: AccumulatorArgs,
    ) -> Result<Box<dyn GroupsAccumulator>> {
        let inner =
            self.with_inner_args(args.name, |a| self.inner.create_groups_accumulator(a))??;
        Ok(Box::new(MergeGroupsAccumulator { inner }))
    }

    fn default_value(&self, data_type: &DataType) -> Result<ScalarValue> {
        self.inner.default_value(data_type)
    }
}

/// Runs one step of the inner accumulator over states that came from stations (directly, or
/// through the hub's own two-phase aggregation of them), turning a panic into an error.
/// DataFusion's accumulators trust their states: a state no station computes (an `avg`
/// state with a count of 0 beside a sum, say, which its merge divides by) would panic the
/// hub's task, and the researcher would see a cancelled stream instead of an answer or an
/// error. A station that sends such a state is broken or compromised; the query fails with a
/// message that says so and names no value.
fn guarded<T>(step: impl FnOnce() -> Result<T>) -> Result<T> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(step)) {
        Ok(result) => result,
        Err(_) => exec_err!(
            "the hub could not merge the aggregate states the stations sent (a station sent a \
             state its own accumulator would not produce)"
        ),
    }
}

/// The children of the state struct a station sent.
fn state_columns(values: &[ArrayRef]) -> Result<Vec<ArrayRef>> {
    let [value] = values else {
        return internal_err!("a merge aggregate takes exactly one state argument");
    };
    let Some(state) = value.as_struct_opt() else {
        return exec_err!(
            "a merge aggregate expects a state struct, got {}",
            value.data_type()
        );
    };
    if state.null_count() > 0 {
        return exec_err!("a station sent a missing aggregate state");
    }
    Ok(state.columns().to_vec())
}

#[derive(Debug)]
struct MergeAccumulator {
    inner: Box<dyn Accumulator>,
}

impl Accumulator for MergeAccumulator {
    fn update_batch(&mut self, values: &[ArrayRef]) -> Result<()> {
        let states = state_columns(values)?;
        guarded(|| self.inner.merge_batch(&states))
    }

    fn evaluate(&mut self) -> Result<ScalarValue> {
        guarded(|| self.inner.evaluate())
    }

    fn size(&self) -> usize {
        self.inner.size() + size_of_val(self)
    }

    fn state(&mut self) -> Result<Vec<ScalarValue>> {
        guarded(|| self.inner.state())
    }

    fn merge_batch(&mut self, states: &[ArrayRef]) -> Result<()> {
        guarded(|| self.inner.merge_batch(states))
    }
}

struct MergeGroupsAccumulator {
    inner: Box<dyn GroupsAccumulator>,
}

impl GroupsAccumulator for MergeGroupsAccumulator {
    fn update_batch(
        &mut self,
        values: &[ArrayRef],
        group_indices: &[usize],
        opt_filter: Option<&BooleanArray>,
        total_num_groups: usize,
    ) -> Result<()> {
        // A merge never has a FILTER clause of its own, but DataFusion passes an all-false
        // filter to create the groups of empty grouping sets: merge only the selected rows.
        let Some(filter) = opt_filter else {
            let states = state_columns(values)?;
            return guarded(|| {
                self.inner
                    .merge_batch(&states, group_indices, total_num_groups)
            });
        };
        let selected: Vec<ArrayRef> = values
            .iter()
            .map(|v| arrow::compute::filter(v.as_ref(), filter))
            .collect::<std::result::Result<_, _>>()?;
        let indices: Vec<usize> = group_indices
            .iter()
            .enumerate()
            .filter(|(i, _)| filter.is_valid(*i) && filter.value(*i))
            .map(|(_, g)| *g)
            .collect();
        let states = state_columns(&selected)?;
        guarded(|| self.inner.merge_batch(&states, &indices, total_num_groups))
    }

    fn evaluate(&mut self, emit_to: EmitTo) -> Result<ArrayRef> {
        guarded(|| self.inner.evaluate(emit_to))
    }

    fn state(&mut self, emit_to: EmitTo) -> Result<Vec<ArrayRef>> {
        guarded(|| self.inner.state(emit_to))
    }

    fn merge_batch(
        &mut self,
        values: &[ArrayRef],
        group_indices: &[usize],
        total_num_groups: usize,
    ) -> Result<()> {
        guarded(|| {
            self.inner
                .merge_batch(values, group_indices, total_num_groups)
        })
    }

    fn convert_to_state(
        &self,
        values: &[ArrayRef],
        opt_filter: Option<&BooleanArray>,
    ) -> Result<Vec<ArrayRef>> {
        if opt_filter.is_some() {
            return internal_err!("a merge aggregate never carries a FILTER clause");
        }
        // The input already is a state: hand its columns on unchanged.
        state_columns(values)
    }

    fn size(&self) -> usize {
        self.inner.size()
    }
}
