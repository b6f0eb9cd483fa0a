//! `dp_count(*)`, `dp_count(x)`, `dp_sum(x)`, `dp_avg(x)`, `dp_quantile(x, q)` and
//! `dp_median(x)`: the differentially private aggregates, as the hub and stations plan them.
//!
//! These functions add no noise themselves. Their accumulators compute the exact value, and
//! their state is a short list of sums:
//!
//! ```text
//!   dp_count(x)   state {s0: Int64   count}            value s0
//!   dp_sum(x)     state {s0: Float64 sum}              value s0
//!   dp_avg(x)     state {s0: Float64 sum, s1: Int64}   value s0 / s1 (NULL unless s1 > 0)
//!   dp_quantile(x, q), dp_median(x)
//!                 state {s0: List<Float64> bin edges,  value the q-quantile of the histogram
//!                        s1: List<Float64> counts}     (uniform within a bin; NULL if empty)
//! ```
//!
//! A quantile's histogram is over bins the station's policy declares: the station appends
//! the edges to the call as constant arguments (`partial_dp_quantile(x, q, e0, …, en)`), and
//! values below `e0` or above `en` count in the first or last bin. Stations may declare
//! different bins: the hub merges histograms by splitting every bin at the union of the edges
//! in proportion to length, which leaves each histogram's cumulative count (linear within a
//! bin) unchanged, so the merged histogram's cumulative count is exactly the sum of the
//! stations'. Noisy counts may be negative; they are read as zero when the quantile is told.
//!
//! A station computes the state of its own rows with `partial_dp_*` (clamping `x` to the
//! bounds its policy declares), adds noise to every state field with an OpenDP measurement,
//! and only then releases it; the hub merges the noisy states by addition and evaluates the
//! value. So the hub never holds an un-noised partial, and the federated answer is the sum
//! of the stations' noisy answers (see `docs/privacy.md`).
//!
//! `dp_count(*)` plans as `dp_count(1)`, like `count(*)` (see [`DpCountStarPlanner`]).

use std::sync::Arc;

use arrow::array::{Array, ArrayRef, AsArray};
use arrow::datatypes::{DataType, Field, FieldRef, Float64Type, Int64Type};
use datafusion::common::{Result, ScalarValue, internal_err, plan_err};
use datafusion::logical_expr::expr::{AggregateFunction, AggregateFunctionParams};
use datafusion::logical_expr::function::{AccumulatorArgs, StateFieldsArgs};
use datafusion::logical_expr::planner::{ExprPlanner, PlannerResult, RawAggregateExpr};
use datafusion::logical_expr::{
    Accumulator, AggregateUDF, AggregateUDFImpl, Expr, Signature, Volatility,
};

pub mod histogram;

use histogram::QuantileAccumulator;

/// Which differentially private aggregate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DpKind {
    Count,
    Sum,
    Avg,
    /// `dp_quantile(x, q)`.
    Quantile,
    /// `dp_median(x)`: the quantile 0.5.
    Median,
}

/// What one field of a DP aggregate's state holds, which decides its sensitivity: one row
/// changes a count by at most 1 and a clamped sum by at most max(|lower|, |upper|).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DpField {
    Count,
    Sum,
    /// The edges of a histogram's bins: public (from the policy), never noised.
    Edges,
    /// A histogram's counts, one per bin: one row changes one count by 1.
    Histogram,
}

impl DpKind {
    pub fn name(self) -> &'static str {
        match self {
            DpKind::Count => "dp_count",
            DpKind::Sum => "dp_sum",
            DpKind::Avg => "dp_avg",
            DpKind::Quantile => "dp_quantile",
            DpKind::Median => "dp_median",
        }
    }

    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "dp_count" => Some(DpKind::Count),
            "dp_sum" => Some(DpKind::Sum),
            "dp_avg" => Some(DpKind::Avg),
            "dp_quantile" => Some(DpKind::Quantile),
            "dp_median" => Some(DpKind::Median),
            _ => None,
        }
    }

    /// The fields of the state, in order.
    pub fn fields(self) -> &'static [DpField] {
        match self {
            DpKind::Count => &[DpField::Count],
            DpKind::Sum => &[DpField::Sum],
            DpKind::Avg => &[DpField::Sum, DpField::Count],
            DpKind::Quantile | DpKind::Median => &[DpField::Edges, DpField::Histogram],
        }
    }

    /// Whether the argument is summed (and so must be numeric and bounded).
    pub fn sums(self) -> bool {
        matches!(self, DpKind::Sum | DpKind::Avg)
    }

    /// Whether the value is a quantile of a histogram over the policy's bins.
    pub fn quantile(self) -> bool {
        matches!(self, DpKind::Quantile | DpKind::Median)
    }

    /// How many arguments a researcher writes: the column, and `q` for `dp_quantile`. A
    /// station appends the bin edges after them.
    pub fn user_args(self) -> usize {
        match self {
            DpKind::Quantile => 2,
            _ => 1,
        }
    }
}

impl DpField {
    pub fn data_type(self) -> DataType {
        match self {
            DpField::Count => DataType::Int64,
            DpField::Sum => DataType::Float64,
            DpField::Edges | DpField::Histogram => {
                DataType::List(Arc::new(Field::new_list_field(DataType::Float64, true)))
            }
        }
    }

    /// Whether the station noises this field (the edges are public).
    pub fn noised(self) -> bool {
        !matches!(self, DpField::Edges)
    }
}

/// One of the DP aggregates.
#[derive(Debug, PartialEq, Eq, Hash)]
pub struct DpAggregate {
    kind: DpKind,
    signature: Signature,
}

impl DpAggregate {
    pub fn new(kind: DpKind) -> Self {
        Self {
            kind,
            signature: Signature::user_defined(Volatility::Immutable),
        }
    }

    pub fn kind(&self) -> DpKind {
        self.kind
    }

    /// The functions, as registered.
    pub fn all() -> Vec<AggregateUDF> {
        [
            DpKind::Count,
            DpKind::Sum,
            DpKind::Avg,
            DpKind::Quantile,
            DpKind::Median,
        ]
        .into_iter()
        .map(|k| AggregateUDF::from(DpAggregate::new(k)))
        .collect()
    }
}

/// The DP kind of an aggregate function, if it is one.
pub fn dp_kind(udaf: &AggregateUDF) -> Option<DpKind> {
    udaf.inner().downcast_ref::<DpAggregate>().map(|d| d.kind)
}

impl AggregateUDFImpl for DpAggregate {
    fn name(&self) -> &str {
        self.kind.name()
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn coerce_types(&self, arg_types: &[DataType]) -> Result<Vec<DataType>> {
        if self.kind.quantile() {
            return histogram::coerce_types(self.kind, arg_types);
        }
        let [t] = arg_types else {
            return plan_err!("{}() takes one argument", self.kind.name());
        };
        if !self.kind.sums() {
            return Ok(vec![t.clone()]);
        }
        if !(t.is_numeric() || t.is_null()) {
            return plan_err!("{}() needs a numeric argument, not {t}", self.kind.name());
        }
        Ok(vec![DataType::Float64])
    }

    fn return_type(&self, _arg_types: &[DataType]) -> Result<DataType> {
        Ok(match self.kind {
            DpKind::Count => DataType::Int64,
            DpKind::Sum | DpKind::Avg | DpKind::Quantile | DpKind::Median => DataType::Float64,
        })
    }

    fn is_nullable(&self) -> bool {
        matches!(self.kind, DpKind::Avg | DpKind::Quantile | DpKind::Median)
    }

    fn state_fields(&self, args: StateFieldsArgs) -> Result<Vec<FieldRef>> {
        Ok(self
            .kind
            .fields()
            .iter()
            .enumerate()
            .map(|(i, f)| {
                Arc::new(Field::new(
                    format!("{}[{i}]", args.name),
                    f.data_type(),
                    true,
                ))
            })
            .collect())
    }

    fn accumulator(&self, args: AccumulatorArgs) -> Result<Box<dyn Accumulator>> {
        if self.kind.quantile() {
            return Ok(Box::new(QuantileAccumulator::new(self.kind, &args)?));
        }
        Ok(Box::new(DpAccumulator {
            kind: self.kind,
            sum: 0.0,
            count: 0,
        }))
    }

    fn default_value(&self, _data_type: &DataType) -> Result<ScalarValue> {
        Ok(match self.kind {
            DpKind::Count => ScalarValue::Int64(Some(0)),
            DpKind::Sum => ScalarValue::Float64(Some(0.0)),
            DpKind::Avg | DpKind::Quantile | DpKind::Median => ScalarValue::Float64(None),
        })
    }
}

/// The exact sums behind a DP aggregate.
#[derive(Debug)]
struct DpAccumulator {
    kind: DpKind,
    sum: f64,
    count: i64,
}

impl Accumulator for DpAccumulator {
    fn update_batch(&mut self, values: &[ArrayRef]) -> Result<()> {
        let Some(values) = values.first() else {
            return Ok(());
        };
        self.count += (values.len() - values.null_count()) as i64;
        if self.kind.sums() {
            let values = values.as_primitive::<Float64Type>();
            self.sum += values.iter().flatten().sum::<f64>();
        }
        Ok(())
    }

    fn merge_batch(&mut self, states: &[ArrayRef]) -> Result<()> {
        for (field, state) in self.kind.fields().iter().zip(states) {
            match field {
                DpField::Count => {
                    self.count += state
                        .as_primitive::<Int64Type>()
                        .iter()
                        .flatten()
                        .sum::<i64>();
                }
                DpField::Sum => {
                    self.sum += state
                        .as_primitive::<Float64Type>()
                        .iter()
                        .flatten()
                        .sum::<f64>();
                }
                DpField::Edges | DpField::Histogram => {
                    return internal_err!("{}() has no histogram", self.kind.name());
                }
            }
        }
        Ok(())
    }

    fn state(&mut self) -> Result<Vec<ScalarValue>> {
        Ok(self
            .kind
            .fields()
            .iter()
            .map(|f| match f {
                DpField::Count => ScalarValue::Int64(Some(self.count)),
                DpField::Sum => ScalarValue::Float64(Some(self.sum)),
                DpField::Edges | DpField::Histogram => ScalarValue::Float64(None),
            })
            .collect())
    }

    fn evaluate(&mut self) -> Result<ScalarValue> {
        Ok(match self.kind {
            DpKind::Count => ScalarValue::Int64(Some(self.count)),
            DpKind::Sum => ScalarValue::Float64(Some(self.sum)),
            // A noisy count can be zero or negative: no mean can be told then.
            DpKind::Avg => {
                ScalarValue::Float64((self.count > 0).then(|| self.sum / self.count as f64))
            }
            DpKind::Quantile | DpKind::Median => {
                return internal_err!("{}() is a histogram", self.kind.name());
            }
        })
    }

    fn size(&self) -> usize {
        size_of_val(self)
    }
}

/// Plans `dp_count(*)` and `dp_count()` as `dp_count(1)` (DataFusion does the same for
/// `count` only).
#[derive(Debug, Default)]
pub struct DpCountStarPlanner;

impl ExprPlanner for DpCountStarPlanner {
    fn plan_aggregate(&self, raw: RawAggregateExpr) -> Result<PlannerResult<RawAggregateExpr>> {
        #[expect(deprecated)]
        let star = raw.func.name() == DpKind::Count.name()
            && (raw.args.is_empty()
                || (raw.args.len() == 1 && matches!(raw.args[0], Expr::Wildcard { .. })));
        if !star {
            return Ok(PlannerResult::Original(raw));
        }
        let name = if raw.args.is_empty() {
            "dp_count()"
        } else {
            "dp_count(*)"
        };
        let RawAggregateExpr {
            func,
            distinct,
            filter,
            order_by,
            null_treatment,
            ..
        } = raw;
        let expr = Expr::AggregateFunction(AggregateFunction {
            func,
            params: AggregateFunctionParams {
                args: vec![Expr::Literal(ScalarValue::Int64(Some(1)), None)],
                distinct,
                filter,
                order_by,
                null_treatment,
            },
        });
        Ok(PlannerResult::Planned(expr.alias(name)))
    }
}

/// Registers the DP aggregates and the planning of `dp_count(*)`.
pub fn register(ctx: &mut datafusion::prelude::SessionContext) -> Result<()> {
    use datafusion::execution::FunctionRegistry;
    for f in DpAggregate::all() {
        datafusion::prelude::SessionContext::register_udaf(ctx, f);
    }
    ctx.register_expr_planner(Arc::new(DpCountStarPlanner))
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::{Float64Array, Int64Array, RecordBatch};
    use arrow::datatypes::Schema;
    use datafusion::prelude::SessionContext;

    async fn run(sql: &str) -> Vec<RecordBatch> {
        let mut ctx = SessionContext::new();
        register(&mut ctx).unwrap();
        let schema = Arc::new(Schema::new(vec![Field::new("x", DataType::Int64, true)]));
        let batch = RecordBatch::try_new(
            Arc::clone(&schema),
            vec![Arc::new(Int64Array::from(vec![
                Some(1),
                None,
                Some(4),
                Some(7),
            ]))],
        )
        .unwrap();
        ctx.register_batch("t", batch).unwrap();
        ctx.sql(sql)
            .await
            .map_err(|e| e.to_string())
            .unwrap()
            .collect()
            .await
            .unwrap()
    }

    #[tokio::test]
    async fn count_star_counts_rows() {
        let got = run("SELECT dp_count(*), dp_count() FROM t").await;
        assert_eq!(got[0].column(0).as_primitive::<Int64Type>().value(0), 4);
        assert_eq!(got[0].column(1).as_primitive::<Int64Type>().value(0), 4);
        assert_eq!(got[0].schema().field(0).name(), "dp_count(*)");
    }

    #[tokio::test]
    async fn exact_values_match_the_plain_aggregates() {
        let got =
            run("SELECT dp_count(x), dp_sum(x), dp_avg(x), count(x), sum(x), avg(x) FROM t").await;
        let b = &got[0];
        assert_eq!(b.column(0).as_primitive::<Int64Type>().value(0), 3);
        assert_eq!(b.column(3).as_primitive::<Int64Type>().value(0), 3);
        let f = |i: usize| {
            b.column(i)
                .as_any()
                .downcast_ref::<Float64Array>()
                .map(|a| a.value(0))
        };
        assert_eq!(f(1), Some(12.0));
        assert_eq!(f(2), Some(4.0));
        assert_eq!(b.column(4).as_primitive::<Int64Type>().value(0), 12);
        assert_eq!(f(5), Some(4.0));
    }
}
