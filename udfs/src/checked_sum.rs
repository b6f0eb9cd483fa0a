//! `sum` of integers that cannot wrap: DataFusion's own `sum(BIGINT)` adds with wrapping
//! arithmetic, so `sum(age * 100000000000000000)` over 228 rows answers a plausible, wrong
//! number. This replacement, registered under the same name at the hub and at every
//! station, accumulates `BIGINT` and `BIGINT UNSIGNED` sums in 128 bits and ships that
//! wide sum as its state (`DECIMAL(38, 0)`), so a station's partial sum can never overflow
//! — no failure there depends on the data. Only the final value, at the hub, is narrowed
//! back to the column's type, and a sum outside it is an error that says so instead of a
//! wrapped value. Every other type (floats, decimals, intervals) and `sum(DISTINCT …)` are
//! DataFusion's own sum, unchanged.
//!
//! ```text
//!   station: update_batch(i64 rows) ─▶ i128 per group ─▶ state DECIMAL(38,0)
//!   hub:     merge_batch(states)    ─▶ i128 per group ─▶ evaluate: i64, or an overflow error
//! ```

use std::sync::Arc;

use arrow::array::{Array, ArrayRef, AsArray, BooleanArray, Decimal128Array, PrimitiveArray};
use arrow::datatypes::{
    ArrowPrimitiveType, DataType, Decimal128Type, Field, FieldRef, Int64Type, UInt64Type,
};
use datafusion::common::{Result, ScalarValue, exec_err, internal_err};
use datafusion::logical_expr::function::{AccumulatorArgs, StateFieldsArgs};
use datafusion::logical_expr::utils::{AggregateOrderSensitivity, format_state_name};
use datafusion::logical_expr::{
    Accumulator, AggregateUDF, AggregateUDFImpl, EmitTo, Expr, GroupsAccumulator, Operator,
    ReversedUDAF, SetMonotonicity, Signature, expr::AggregateFunction,
};

/// The type in which integer sums travel between station and hub.
pub const WIDE_SUM_TYPE: DataType = DataType::Decimal128(38, 0);

/// DataFusion's `sum`, with integer sums accumulated in 128 bits and checked when narrowed.
#[derive(Debug, PartialEq, Eq, Hash)]
pub struct CheckedSum {
    inner: Arc<AggregateUDF>,
}

impl Default for CheckedSum {
    fn default() -> Self {
        Self {
            inner: datafusion::functions_aggregate::sum::sum_udaf(),
        }
    }
}

/// The checked `sum`, to register in place of the built-in one.
pub fn udaf() -> AggregateUDF {
    AggregateUDF::from(CheckedSum::default())
}

/// Which integer sum an aggregate over `return_type` is, if it is one this module widens.
fn integer(return_type: &DataType, distinct: bool) -> Option<Integer> {
    match (return_type, distinct) {
        (DataType::Int64, false) => Some(Integer::Signed),
        (DataType::UInt64, false) => Some(Integer::Unsigned),
        _ => None,
    }
}

#[derive(Debug, Clone, Copy)]
enum Integer {
    Signed,
    Unsigned,
}

impl Integer {
    /// The sum of the non-NULL values of `values` (whose rows `keep` selects), in 128 bits.
    /// No i64 or u64 values can overflow it: that would take more than 2^63 rows.
    fn add_rows(self, values: &ArrayRef, mut each: impl FnMut(usize, i128)) {
        fn rows<T: ArrowPrimitiveType>(
            values: &PrimitiveArray<T>,
            each: &mut impl FnMut(usize, i128),
            wide: impl Fn(T::Native) -> i128,
        ) {
            for (i, v) in values.iter().enumerate() {
                if let Some(v) = v {
                    each(i, wide(v));
                }
            }
        }
        match self {
            Integer::Signed => rows(values.as_primitive::<Int64Type>(), &mut each, i128::from),
            Integer::Unsigned => rows(values.as_primitive::<UInt64Type>(), &mut each, i128::from),
        }
    }

    /// The final value: the wide sum narrowed to the column's type, or an error.
    fn narrow(self, sum: Option<i128>) -> Result<ScalarValue> {
        let out_of_range = || {
            exec_err!(
                "sum() is outside the range of {} (cast its argument to DOUBLE or DECIMAL)",
                match self {
                    Integer::Signed => "BIGINT",
                    Integer::Unsigned => "BIGINT UNSIGNED",
                }
            )
        };
        Ok(match (self, sum) {
            (Integer::Signed, None) => ScalarValue::Int64(None),
            (Integer::Unsigned, None) => ScalarValue::UInt64(None),
            (Integer::Signed, Some(s)) => match i64::try_from(s) {
                Ok(v) => ScalarValue::Int64(Some(v)),
                Err(_) => return out_of_range(),
            },
            (Integer::Unsigned, Some(s)) => match u64::try_from(s) {
                Ok(v) => ScalarValue::UInt64(Some(v)),
                Err(_) => return out_of_range(),
            },
        })
    }
}

/// Adds a merged state to a wide sum. Two states can overflow 128 bits only after more than
/// 2^64 rows; that is reported rather than wrapped.
fn add_state(sum: &mut Option<i128>, v: i128) -> Result<()> {
    match sum.unwrap_or(0).checked_add(v) {
        Some(s) => {
            *sum = Some(s);
            Ok(())
        }
        None => internal_err!("a 128-bit sum overflowed"),
    }
}

fn wide_states(states: &[ArrayRef]) -> Result<&Decimal128Array> {
    match states.first() {
        Some(s) if s.data_type() == &WIDE_SUM_TYPE => Ok(s.as_primitive::<Decimal128Type>()),
        Some(s) => internal_err!("a wide sum state of type {}", s.data_type()),
        None => internal_err!("a wide sum without its state"),
    }
}

fn wide_array(sums: Vec<Option<i128>>) -> Result<ArrayRef> {
    Ok(Arc::new(
        Decimal128Array::from(sums).with_data_type(WIDE_SUM_TYPE.clone()),
    ))
}

impl AggregateUDFImpl for CheckedSum {
    fn name(&self) -> &str {
        self.inner.name()
    }

    fn aliases(&self) -> &[String] {
        self.inner.aliases()
    }

    fn signature(&self) -> &Signature {
        self.inner.signature()
    }

    fn return_type(&self, arg_types: &[DataType]) -> Result<DataType> {
        self.inner.return_type(arg_types)
    }

    fn accumulator(&self, args: AccumulatorArgs) -> Result<Box<dyn Accumulator>> {
        match integer(args.return_field.data_type(), args.is_distinct) {
            Some(kind) => Ok(Box::new(WideSum { kind, sum: None })),
            None => self.inner.accumulator(args),
        }
    }

    fn state_fields(&self, args: StateFieldsArgs) -> Result<Vec<FieldRef>> {
        match integer(args.return_type(), args.is_distinct) {
            Some(_) => Ok(vec![Arc::new(Field::new(
                format_state_name(args.name, "sum"),
                WIDE_SUM_TYPE,
                true,
            ))]),
            None => self.inner.state_fields(args),
        }
    }

    fn groups_accumulator_supported(&self, args: AccumulatorArgs) -> bool {
        integer(args.return_field.data_type(), args.is_distinct).is_some()
            || self.inner.groups_accumulator_supported(args)
    }

    fn create_groups_accumulator(
        &self,
        args: AccumulatorArgs,
    ) -> Result<Box<dyn GroupsAccumulator>> {
        match integer(args.return_field.data_type(), args.is_distinct) {
            Some(kind) => Ok(Box::new(WideGroupSums {
                kind,
                sums: Vec::new(),
            })),
            None => self.inner.create_groups_accumulator(args),
        }
    }

    fn create_sliding_accumulator(&self, args: AccumulatorArgs) -> Result<Box<dyn Accumulator>> {
        self.inner.create_sliding_accumulator(args)
    }

    fn reverse_expr(&self) -> ReversedUDAF {
        ReversedUDAF::Identical
    }

    fn order_sensitivity(&self) -> AggregateOrderSensitivity {
        AggregateOrderSensitivity::Insensitive
    }

    fn set_monotonicity(&self, data_type: &DataType) -> SetMonotonicity {
        self.inner.inner().set_monotonicity(data_type)
    }

    fn simplify_expr_op_literal(
        &self,
        agg_function: &AggregateFunction,
        arg: &Expr,
        op: Operator,
        lit: &Expr,
        arg_is_left: bool,
    ) -> Result<Option<Expr>> {
        self.inner
            .inner()
            .simplify_expr_op_literal(agg_function, arg, op, lit, arg_is_left)
    }

    fn documentation(&self) -> Option<&datafusion::logical_expr::Documentation> {
        self.inner.documentation()
    }
}

/// One group's integer sum, in 128 bits.
#[derive(Debug)]
struct WideSum {
    kind: Integer,
    sum: Option<i128>,
}

impl Accumulator for WideSum {
    fn update_batch(&mut self, values: &[ArrayRef]) -> Result<()> {
        let Some(values) = values.first() else {
            return internal_err!("sum() without an argument");
        };
        let sum = &mut self.sum;
        self.kind
            .add_rows(values, |_, v| *sum = Some(sum.unwrap_or(0) + v));
        Ok(())
    }

    fn merge_batch(&mut self, states: &[ArrayRef]) -> Result<()> {
        for v in wide_states(states)?.iter().flatten() {
            add_state(&mut self.sum, v)?;
        }
        Ok(())
    }

    fn state(&mut self) -> Result<Vec<ScalarValue>> {
        Ok(vec![ScalarValue::Decimal128(self.sum, 38, 0)])
    }

    fn evaluate(&mut self) -> Result<ScalarValue> {
        self.kind.narrow(self.sum)
    }

    fn size(&self) -> usize {
        size_of_val(self)
    }
}

/// Every group's integer sum, in 128 bits (NULL while a group has seen no value).
#[derive(Debug)]
struct WideGroupSums {
    kind: Integer,
    sums: Vec<Option<i128>>,
}

impl GroupsAccumulator for WideGroupSums {
    fn update_batch(
        &mut self,
        values: &[ArrayRef],
        group_indices: &[usize],
        opt_filter: Option<&BooleanArray>,
        total_num_groups: usize,
    ) -> Result<()> {
        let Some(values) = values.first() else {
            return internal_err!("sum() without an argument");
        };
        self.sums.resize(total_num_groups, None);
        let sums = &mut self.sums;
        self.kind.add_rows(values, |row, v| {
            if opt_filter.is_none_or(|f| f.is_valid(row) && f.value(row)) {
                let s = &mut sums[group_indices[row]];
                *s = Some(s.unwrap_or(0) + v);
            }
        });
        Ok(())
    }

    fn evaluate(&mut self, emit_to: EmitTo) -> Result<ArrayRef> {
        let sums = emit_to.take_needed(&mut self.sums);
        let values = sums
            .into_iter()
            .map(|s| self.kind.narrow(s))
            .collect::<Result<Vec<_>>>()?;
        let array = ScalarValue::iter_to_array(values)?;
        Ok(array)
    }

    fn state(&mut self, emit_to: EmitTo) -> Result<Vec<ArrayRef>> {
        Ok(vec![wide_array(emit_to.take_needed(&mut self.sums))?])
    }

    fn merge_batch(
        &mut self,
        values: &[ArrayRef],
        group_indices: &[usize],
        total_num_groups: usize,
    ) -> Result<()> {
        self.sums.resize(total_num_groups, None);
        let states = wide_states(values)?;
        for (row, v) in states.iter().enumerate() {
            if let Some(v) = v {
                add_state(&mut self.sums[group_indices[row]], v)?;
            }
        }
        Ok(())
    }

    fn convert_to_state(
        &self,
        values: &[ArrayRef],
        opt_filter: Option<&BooleanArray>,
    ) -> Result<Vec<ArrayRef>> {
        let Some(values) = values.first() else {
            return internal_err!("sum() without an argument");
        };
        let mut states = vec![None; values.len()];
        self.kind.add_rows(values, |row, v| {
            if opt_filter.is_none_or(|f| f.is_valid(row) && f.value(row)) {
                states[row] = Some(v);
            }
        });
        Ok(vec![wide_array(states)?])
    }

    fn size(&self) -> usize {
        self.sums.capacity() * size_of::<Option<i128>>() + size_of_val(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::{Int64Array, RecordBatch};
    use datafusion::prelude::SessionContext;

    fn ctx() -> SessionContext {
        let ctx = SessionContext::new();
        ctx.register_udaf(udaf());
        ctx
    }

    async fn one(ctx: &SessionContext, sql: &str) -> Result<ScalarValue> {
        let batches = ctx.sql(sql).await?.collect().await?;
        ScalarValue::try_from_array(batches[0].column(0), 0)
    }

    #[tokio::test]
    async fn a_sum_past_bigint_is_an_error_not_a_wrapped_value() {
        let ctx = ctx();
        let big = i64::MAX / 2 + 1;
        let batch = RecordBatch::try_from_iter([(
            "x",
            Arc::new(Int64Array::from(vec![big, big, 5])) as ArrayRef,
        )])
        .unwrap();
        ctx.register_batch("t", batch).unwrap();
        // DataFusion's own sum wraps to a negative number here.
        let plain = SessionContext::new();
        plain
            .register_batch(
                "t",
                ctx.table("t").await.unwrap().collect().await.unwrap()[0].clone(),
            )
            .unwrap();
        let wrapped = one(&plain, "SELECT sum(x) FROM t").await.unwrap();
        assert!(matches!(wrapped, ScalarValue::Int64(Some(v)) if v < 0));
        for sql in [
            "SELECT sum(x) FROM t",
            "SELECT sum(x) FROM t GROUP BY x > 0 HAVING count(*) = 2",
        ] {
            let err = one(&ctx, sql).await.unwrap_err().to_string();
            assert!(err.contains("outside the range of BIGINT"), "{sql}: {err}");
        }
        // Back in range, the wide sum is exact even where a running one was not.
        let v = one(
            &ctx,
            "SELECT sum(x) FROM (SELECT x FROM t UNION ALL SELECT -x FROM t WHERE x > 5)",
        )
        .await
        .unwrap();
        assert_eq!(v, ScalarValue::Int64(Some(5)));
    }

    #[tokio::test]
    async fn other_sums_are_datafusions_own() {
        let ctx = ctx();
        for (sql, want) in [
            (
                "SELECT sum(x) FROM (VALUES (1), (2), (NULL)) AS v(x)",
                ScalarValue::Int64(Some(3)),
            ),
            (
                "SELECT sum(x) FROM (VALUES (1.5), (2.0)) AS v(x)",
                ScalarValue::Float64(Some(3.5)),
            ),
            (
                "SELECT sum(DISTINCT x) FROM (VALUES (1), (1), (2)) AS v(x)",
                ScalarValue::Int64(Some(3)),
            ),
            (
                "SELECT sum(x) FROM (VALUES (CAST(NULL AS BIGINT))) AS v(x)",
                ScalarValue::Int64(None),
            ),
        ] {
            assert_eq!(one(&ctx, sql).await.unwrap(), want, "{sql}");
        }
    }
}
