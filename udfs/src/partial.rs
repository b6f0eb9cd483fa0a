//! `partial_<agg>(args…)`: the station half of any DataFusion aggregate.
//!
//! A station cannot send "the middle of an aggregation" as SQL unless the middle has a name.
//! This wrapper gives it one: `partial_avg(age)` runs the real `avg` accumulator and, instead
//! of finishing it, returns the accumulator's own `state()` as one struct value per group.
//! The hub feeds that struct into [`crate::MergeAggregate`], which calls the very same
//! accumulator's `merge_batch()`. Because both halves are DataFusion's own accumulator, the
//! federated answer has exactly the centralized type and semantics (including the numerically
//! stable Chan merge of `var`/`stddev`, decimal widths, and `count(DISTINCT …)`).
//!
//! `DISTINCT` cannot be expressed on the wrapper call itself (the struct type of the state
//! depends on it, and `return_type` does not see the flag), so it is part of the name:
//! `partial_distinct_count(x)` is the state of `count(DISTINCT x)`.

use std::sync::Arc;

use arrow::array::{Array, ArrayRef, BooleanArray, StructArray};
use arrow::compute::cast;
use arrow::datatypes::{DataType, Field, FieldRef, Fields};
use datafusion::common::{Result, ScalarValue, plan_err};
use datafusion::logical_expr::function::{AccumulatorArgs, StateFieldsArgs};
use datafusion::logical_expr::{
    Accumulator, AggregateUDF, AggregateUDFImpl, EmitTo, GroupsAccumulator, Signature,
};

/// Prefix of the state-returning wrappers in fragment SQL.
pub const PARTIAL_PREFIX: &str = "partial_";
/// Prefix of the state-returning wrappers of `DISTINCT` aggregates.
pub const PARTIAL_DISTINCT_PREFIX: &str = "partial_distinct_";

/// The station half of `inner`: returns `inner`'s accumulator state as a struct.
#[derive(Debug, PartialEq, Eq, Hash)]
pub struct PartialAggregate {
    inner: Arc<AggregateUDF>,
    name: String,
    aliases: Vec<String>,
    distinct: bool,
    signature: Signature,
}

impl PartialAggregate {
    pub fn new(inner: Arc<AggregateUDF>, distinct: bool) -> Self {
        let prefix = if distinct {
            PARTIAL_DISTINCT_PREFIX
        } else {
            PARTIAL_PREFIX
        };
        Self {
            name: format!("{prefix}{}", inner.name()),
            aliases: inner
                .aliases()
                .iter()
                .map(|a| format!("{prefix}{a}"))
                .collect(),
            signature: inner.signature().clone(),
            inner,
            distinct,
        }
    }

    /// The wrapped aggregate.
    pub fn inner(&self) -> &Arc<AggregateUDF> {
        &self.inner
    }

    /// Whether this is the state of a `DISTINCT` aggregate.
    pub fn is_distinct(&self) -> bool {
        self.distinct
    }

    /// The fields of the struct this wrapper returns for the given argument fields.
    ///
    /// Children are named `s0, s1, …` (the inner names embed the expression text, which the
    /// station and hub would spell differently) and are all nullable, so that the hub and the
    /// station always agree on the exact struct type.
    pub fn state_struct_fields(
        inner: &AggregateUDF,
        arg_fields: &[FieldRef],
        distinct: bool,
    ) -> Result<Fields> {
        let return_field = inner.return_field(arg_fields)?;
        let state = inner.state_fields(StateFieldsArgs {
            name: inner.name(),
            input_fields: arg_fields,
            return_field,
            ordering_fields: &[],
            is_distinct: distinct,
        })?;
        Ok(state
            .iter()
            .enumerate()
            .map(|(i, f)| Field::new(format!("s{i}"), f.data_type().clone(), true))
            .collect())
    }

    fn inner_args<'a>(&self, args: &AccumulatorArgs<'a>) -> Result<AccumulatorArgs<'a>> {
        if !args.order_bys.is_empty() {
            return plan_err!("{}: ordered aggregates have no partial state", self.name);
        }
        Ok(AccumulatorArgs {
            return_field: self.inner.return_field(args.expr_fields)?,
            schema: args.schema,
            ignore_nulls: args.ignore_nulls,
            order_bys: args.order_bys,
            is_reversed: args.is_reversed,
            name: args.name,
            is_distinct: self.distinct,
            exprs: args.exprs,
            expr_fields: args.expr_fields,
        })
    }

    fn struct_fields(&self, args: &AccumulatorArgs) -> Result<Fields> {
        Self::state_struct_fields(&self.inner, args.expr_fields, self.distinct)
    }
}

impl AggregateUDFImpl for PartialAggregate {
    fn name(&self) -> &str {
        &self.name
    }

    fn aliases(&self) -> &[String] {
        &self.aliases
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn coerce_types(&self, arg_types: &[DataType]) -> Result<Vec<DataType>> {
        self.inner.coerce_types(arg_types)
    }

    fn return_type(&self, arg_types: &[DataType]) -> Result<DataType> {
        let fields: Vec<FieldRef> = arg_types
            .iter()
            .enumerate()
            .map(|(i, t)| Arc::new(Field::new(format!("c{i}"), t.clone(), true)))
            .collect();
        Ok(DataType::Struct(Self::state_struct_fields(
            &self.inner,
            &fields,
            self.distinct,
        )?))
    }

    fn return_field(&self, arg_fields: &[FieldRef]) -> Result<FieldRef> {
        let fields = Self::state_struct_fields(&self.inner, arg_fields, self.distinct)?;
        Ok(Arc::new(Field::new(
            self.name(),
            DataType::Struct(fields),
            false,
        )))
    }

    fn is_nullable(&self) -> bool {
        false
    }

    fn accumulator(&self, args: AccumulatorArgs) -> Result<Box<dyn Accumulator>> {
        let fields = self.struct_fields(&args)?;
        let inner = self.inner.accumulator(self.inner_args(&args)?)?;
        Ok(Box::new(PartialAccumulator { inner, fields }))
    }

    fn state_fields(&self, args: StateFieldsArgs) -> Result<Vec<FieldRef>> {
        let return_field = self.inner.return_field(args.input_fields)?;
        self.inner.state_fields(StateFieldsArgs {
            name: args.name,
            input_fields: args.input_fields,
            return_field,
            ordering_fields: args.ordering_fields,
            is_distinct: self.distinct,
        })
    }

    fn groups_accumulator_supported(&self, args: AccumulatorArgs) -> bool {
        match self.inner_args(&args) {
            Ok(inner_args) => self.inner.groups_accumulator_supported(inner_args),
            Err(_) => false,
        }
    }

    fn create_groups_accumulator(
        &self,
        args: AccumulatorArgs,
    ) -> Result<Box<dyn GroupsAccumulator>> {
        let fields = self.struct_fields(&args)?;
        let inner = self
            .inner
            .create_groups_accumulator(self.inner_args(&args)?)?;
        Ok(Box::new(PartialGroupsAccumulator { inner, fields }))
    }

    fn default_value(&self, _data_type: &DataType) -> Result<ScalarValue> {
        plan_err!("{} has no default value", self.name)
    }
}

/// Builds the state struct, casting a state array to its declared type where an accumulator
/// produces an equivalent but differently spelled type (e.g. a list's child field name).
pub(crate) fn state_struct(fields: &Fields, state: Vec<ArrayRef>) -> Result<StructArray> {
    if state.len() != fields.len() {
        return plan_err!(
            "aggregate state has {} columns, its declaration {}",
            state.len(),
            fields.len()
        );
    }
    let arrays = state
        .into_iter()
        .zip(fields.iter())
        .map(|(a, f)| {
            if a.data_type() == f.data_type() {
                Ok(a)
            } else {
                Ok(cast(&a, f.data_type())?)
            }
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(StructArray::try_new(fields.clone(), arrays, None)?)
}

#[derive(Debug)]
struct PartialAccumulator {
    inner: Box<dyn Accumulator>,
    fields: Fields,
}

impl Accumulator for PartialAccumulator {
    fn update_batch(&mut self, values: &[ArrayRef]) -> Result<()> {
        self.inner.update_batch(values)
    }

    fn evaluate(&mut self) -> Result<ScalarValue> {
        let state = self
            .inner
            .state()?
            .into_iter()
            .map(|s| s.to_array())
            .collect::<Result<Vec<_>>>()?;
        Ok(ScalarValue::Struct(Arc::new(state_struct(
            &self.fields,
            state,
        )?)))
    }

    fn size(&self) -> usize {
        self.inner.size() + size_of_val(self)
    }

    fn state(&mut self) -> Result<Vec<ScalarValue>> {
        self.inner.state()
    }

    fn merge_batch(&mut self, states: &[ArrayRef]) -> Result<()> {
        self.inner.merge_batch(states)
    }
}

struct PartialGroupsAccumulator {
    inner: Box<dyn GroupsAccumulator>,
    fields: Fields,
}

impl GroupsAccumulator for PartialGroupsAccumulator {
    fn update_batch(
        &mut self,
        values: &[ArrayRef],
        group_indices: &[usize],
        opt_filter: Option<&BooleanArray>,
        total_num_groups: usize,
    ) -> Result<()> {
        self.inner
            .update_batch(values, group_indices, opt_filter, total_num_groups)
    }

    fn evaluate(&mut self, emit_to: EmitTo) -> Result<ArrayRef> {
        let state = self.inner.state(emit_to)?;
        Ok(Arc::new(state_struct(&self.fields, state)?))
    }

    fn state(&mut self, emit_to: EmitTo) -> Result<Vec<ArrayRef>> {
        self.inner.state(emit_to)
    }

    fn merge_batch(
        &mut self,
        values: &[ArrayRef],
        group_indices: &[usize],
        total_num_groups: usize,
    ) -> Result<()> {
        self.inner
            .merge_batch(values, group_indices, total_num_groups)
    }

    fn convert_to_state(
        &self,
        values: &[ArrayRef],
        opt_filter: Option<&BooleanArray>,
    ) -> Result<Vec<ArrayRef>> {
        self.inner.convert_to_state(values, opt_filter)
    }

    fn size(&self) -> usize {
        self.inner.size()
    }
}
