//! A logical optimizer rule for 128-bit decimal arithmetic, run last in a fragment's
//! session: the same values, of the same types, with the same overflow errors, computed
//! with fewer checked 128-bit operations per row.
//!
//! - **A constant added to or subtracted from a decimal of a larger scale** (`1 - l_discount`):
//!   Arrow brings both sides to one scale by multiplying every value by a power of ten
//!   (a checked 128-bit multiplication per row and side) before it adds. The constant is
//!   brought to the other side's scale once, here: `Decimal128(1, 20, 0) - d(15, 2)`
//!   becomes `Decimal128(100, 22, 2) - d(15, 2)`, and Arrow then only adds. The constant's
//!   digits before the point do not change, so Arrow's precision rule gives the same type,
//!   and the integer sum computed is the same, so it overflows exactly when it did.
//! - **A product of two decimals** becomes [`DecimalMul`]: when every value of both sides
//!   fits 64 bits (as in any decimal of up to 18 digits), each product is one 64 × 64-bit
//!   multiplication into 128 bits, which cannot overflow; otherwise it runs Arrow's own
//!   kernel, the one `*` runs. Same type (Arrow's rule), same values.
//!
//! Each rewritten expression keeps its name, so no schema changes. Scans are left alone:
//! a filter pushed into a scan prunes files (or is sent to PostgreSQL) as written, while the
//! filter that remains above the scan is the one that runs per row.
//!
//! Measured on TPC-H Q1 (issue 24): `1 - l_discount` and `1 + l_tax` took a fifth of each
//! station's CPU, nearly all of it in the rescaling multiplications, and the products a
//! tenth.

use std::sync::Arc;

use datafusion::arrow::array::{Array, ArrayRef, AsArray, Decimal128Array};
use datafusion::arrow::buffer::NullBuffer;
use datafusion::arrow::compute::kernels::numeric::mul_wrapping;
use datafusion::arrow::datatypes::{
    DECIMAL128_MAX_PRECISION, DataType, Decimal128Type, Field, FieldRef,
};
use datafusion::common::tree_node::{Transformed, TreeNode, TreeNodeRecursion};
use datafusion::common::{DFSchema, DFSchemaRef, Result, ScalarValue, exec_err, plan_err};
use datafusion::logical_expr::expr::ScalarFunction;
use datafusion::logical_expr::expr_rewriter::NamePreserver;
use datafusion::logical_expr::utils::merge_schema;
use datafusion::logical_expr::{
    BinaryExpr, ColumnarValue, Expr, ExprSchemable, LogicalPlan, Operator, ReturnFieldArgs,
    ScalarFunctionArgs, ScalarUDF, ScalarUDFImpl, Signature, Volatility,
};
use datafusion::optimizer::optimizer::ApplyOrder;
use datafusion::optimizer::{OptimizerConfig, OptimizerRule};

/// The optimizer rule (see the module docs).
#[derive(Debug)]
pub struct DecimalArithmetic {
    mul: Arc<ScalarUDF>,
}

impl Default for DecimalArithmetic {
    fn default() -> Self {
        Self {
            mul: Arc::new(ScalarUDF::from(DecimalMul::default())),
        }
    }
}

impl OptimizerRule for DecimalArithmetic {
    fn name(&self) -> &str {
        "decimal_arithmetic"
    }

    fn apply_order(&self) -> Option<ApplyOrder> {
        Some(ApplyOrder::BottomUp)
    }

    fn rewrite(
        &self,
        plan: LogicalPlan,
        _config: &dyn OptimizerConfig,
    ) -> Result<Transformed<LogicalPlan>> {
        // Scans and leaves are left as written (module docs); a node without a sum or
        // product of the two shapes costs only this look.
        let mut candidate = false;
        plan.apply_expressions(|e| {
            candidate = e.exists(|n| Ok(shape(n).is_some()))?;
            Ok(if candidate {
                TreeNodeRecursion::Stop
            } else {
                TreeNodeRecursion::Continue
            })
        })?;
        let schema: DFSchemaRef = match plan.inputs().as_slice() {
            _ if !candidate => return Ok(Transformed::no(plan)),
            [] => return Ok(Transformed::no(plan)),
            [input] => Arc::clone(input.schema()),
            inputs => Arc::new(merge_schema(inputs)),
        };
        let names = NamePreserver::new(&plan);
        plan.map_expressions(|expr| {
            let name = names.save(&expr);
            let rewritten = expr.transform_up(|e| Ok(self.rewrite_expr(e, &schema)))?;
            Ok(if rewritten.transformed {
                Transformed::yes(name.restore(rewritten.data))
            } else {
                rewritten
            })
        })
    }
}

/// The shapes the rule looks at: a sum or difference with a decimal constant on one side
/// (`true` when it is the left side), or a product.
enum Shape {
    Constant { left: bool },
    Product,
}

fn shape(e: &Expr) -> Option<Shape> {
    let Expr::BinaryExpr(BinaryExpr { left, op, right }) = e else {
        return None;
    };
    let constant = |side: &Expr| {
        matches!(
            side,
            Expr::Literal(ScalarValue::Decimal128(Some(_), _, _), _)
        )
    };
    match op {
        Operator::Plus | Operator::Minus if constant(left) => Some(Shape::Constant { left: true }),
        Operator::Plus | Operator::Minus if constant(right) => {
            Some(Shape::Constant { left: false })
        }
        Operator::Multiply => Some(Shape::Product),
        _ => None,
    }
}

impl DecimalArithmetic {
    /// `e` rewritten if it is one of the module's two shapes, otherwise unchanged.
    fn rewrite_expr(&self, e: Expr, schema: &DFSchema) -> Transformed<Expr> {
        let decimal = |side: &Expr| match side.get_type(schema) {
            Ok(DataType::Decimal128(precision, scale)) => Some((precision, scale)),
            _ => None,
        };
        let Some(shape) = shape(&e) else {
            return Transformed::no(e);
        };
        let Expr::BinaryExpr(BinaryExpr { left, op, right }) = e else {
            unreachable!("a shape is a binary expression")
        };
        match shape {
            Shape::Constant { left: true } => {
                if let Some(l) = decimal(&right).and_then(|(_, scale)| rescaled(&left, scale)) {
                    return Transformed::yes(Expr::BinaryExpr(BinaryExpr::new(
                        Box::new(l),
                        op,
                        right,
                    )));
                }
            }
            Shape::Constant { left: false } => {
                if let Some(r) = decimal(&left).and_then(|(_, scale)| rescaled(&right, scale)) {
                    return Transformed::yes(Expr::BinaryExpr(BinaryExpr::new(
                        left,
                        op,
                        Box::new(r),
                    )));
                }
            }
            Shape::Product => {
                if let (Some(l), Some(r)) = (decimal(&left), decimal(&right))
                    && let Some(product) = product_type(l, r)
                {
                    let e = Expr::BinaryExpr(BinaryExpr::new(left, op, right));
                    // Only where DataFusion types the product as Arrow computes it.
                    if e.get_type(schema).ok() != Some(product) {
                        return Transformed::no(e);
                    }
                    let Expr::BinaryExpr(BinaryExpr { left, right, .. }) = e else {
                        unreachable!("built just above")
                    };
                    return Transformed::yes(Expr::ScalarFunction(ScalarFunction::new_udf(
                        Arc::clone(&self.mul),
                        vec![*left, *right],
                    )));
                }
            }
        }
        Transformed::no(Expr::BinaryExpr(BinaryExpr::new(left, op, right)))
    }
}

/// The decimal constant `side` at `scale`, when that is larger than its own scale and the
/// rescaled constant still fits 38 digits; `None` otherwise.
fn rescaled(side: &Expr, scale: i8) -> Option<Expr> {
    let Expr::Literal(ScalarValue::Decimal128(Some(value), precision, own), metadata) = side else {
        return None;
    };
    if scale <= *own {
        return None;
    }
    let shift = u8::try_from(i16::from(scale) - i16::from(*own)).ok()?;
    let precision = precision.checked_add(shift)?;
    if precision > DECIMAL128_MAX_PRECISION {
        return None;
    }
    let value = value.checked_mul(10_i128.checked_pow(u32::from(shift))?)?;
    Some(Expr::Literal(
        ScalarValue::Decimal128(Some(value), precision, scale),
        metadata.clone(),
    ))
}

/// The type of the product of two `Decimal128`s, by Arrow's rule (precision p1 + p2 + 1, at
/// most 38; scale s1 + s2), or `None` where Arrow refuses it (a scale beyond 38).
fn product_type((p1, s1): (u8, i8), (p2, s2): (u8, i8)) -> Option<DataType> {
    let scale = s1.checked_add(s2)?;
    if !(0..=38).contains(&scale) || s1 < 0 || s2 < 0 {
        return None;
    }
    let precision = (u16::from(p1) + u16::from(p2) + 1).min(u16::from(DECIMAL128_MAX_PRECISION));
    Some(DataType::Decimal128(u8::try_from(precision).ok()?, scale))
}

/// The product of two `Decimal128` values, as `*` computes it; only [`DecimalArithmetic`]
/// puts it in a plan (it is not registered under a name a query could call).
#[derive(Debug, PartialEq, Eq, Hash)]
pub struct DecimalMul {
    signature: Signature,
}

impl Default for DecimalMul {
    fn default() -> Self {
        Self {
            signature: Signature::any(2, Volatility::Immutable),
        }
    }
}

impl ScalarUDFImpl for DecimalMul {
    fn name(&self) -> &str {
        "decimal_mul"
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn return_type(&self, arg_types: &[DataType]) -> Result<DataType> {
        match arg_types {
            [DataType::Decimal128(p1, s1), DataType::Decimal128(p2, s2)] => {
                match product_type((*p1, *s1), (*p2, *s2)) {
                    Some(t) => Ok(t),
                    None => plan_err!("decimal_mul: no product type for {arg_types:?}"),
                }
            }
            _ => plan_err!("decimal_mul takes two Decimal128 values, not {arg_types:?}"),
        }
    }

    /// Null exactly where either side is, as `*` is.
    fn return_field_from_args(&self, args: ReturnFieldArgs) -> Result<FieldRef> {
        let types: Vec<DataType> = args
            .arg_fields
            .iter()
            .map(|f| f.data_type().clone())
            .collect();
        let nullable = args.arg_fields.iter().any(|f| f.is_nullable());
        Ok(Arc::new(Field::new(
            self.name(),
            self.return_type(&types)?,
            nullable,
        )))
    }

    fn invoke_with_args(&self, args: ScalarFunctionArgs) -> Result<ColumnarValue> {
        let scalars = args
            .args
            .iter()
            .all(|a| matches!(a, ColumnarValue::Scalar(_)));
        let [left, right] = args.args.as_slice() else {
            return exec_err!("decimal_mul takes two arguments");
        };
        // Two constants are multiplied as one row (whatever the batch's row count).
        let rows = if scalars { 1 } else { args.number_rows };
        let (left, right) = (left.to_array(rows)?, right.to_array(rows)?);
        let (Some(l), Some(r)) = (
            left.as_primitive_opt::<Decimal128Type>(),
            right.as_primitive_opt::<Decimal128Type>(),
        ) else {
            return exec_err!("decimal_mul takes two Decimal128 arrays");
        };
        let DataType::Decimal128(precision, scale) = args.return_field.data_type() else {
            return exec_err!("decimal_mul returns a Decimal128");
        };
        let product: ArrayRef = if fits_64_bits(l) && fits_64_bits(r) {
            // |a|, |b| < 2^63, so |a·b| < 2^126: no product overflows 128 bits.
            let values: Vec<i128> = l
                .values()
                .iter()
                .zip(r.values().iter())
                .map(|(a, b)| i128::from(*a as i64) * i128::from(*b as i64))
                .collect();
            Arc::new(
                Decimal128Array::try_new(values.into(), NullBuffer::union(l.nulls(), r.nulls()))?
                    .with_precision_and_scale(*precision, *scale)?,
            )
        } else {
            // Arrow's own kernel, as `*` runs it (same type, same overflow error).
            mul_wrapping(&left, &right)?
        };
        if scalars {
            Ok(ColumnarValue::Scalar(ScalarValue::try_from_array(
                &product, 0,
            )?))
        } else {
            Ok(ColumnarValue::Array(product))
        }
    }
}

/// Whether every value of `a` (null slots too) fits 64 bits.
fn fits_64_bits(a: &Decimal128Array) -> bool {
    // A fold without an early exit, so that it vectorizes.
    !a.values()
        .iter()
        .fold(false, |wide, v| wide | (i128::from(*v as i64) != *v))
}

#[cfg(test)]
mod tests {
    use super::*;
    use datafusion::arrow::array::RecordBatch;
    use datafusion::arrow::util::pretty::pretty_format_batches;
    use datafusion::prelude::SessionContext;

    /// Decimal columns of several precisions and scales, nulls, signs, values at the edge
    /// of their precision, and (`big`) values beyond 64 bits.
    fn table() -> RecordBatch {
        let d = |values: Vec<Option<i128>>, p: u8, s: i8| -> Arc<dyn Array> {
            Arc::new(
                Decimal128Array::from(values)
                    .with_precision_and_scale(p, s)
                    .unwrap(),
            )
        };
        let edge = 10_i128.pow(15) - 1;
        RecordBatch::try_from_iter([
            (
                "price",
                d(
                    vec![
                        Some(123_456),
                        Some(-5),
                        None,
                        Some(edge),
                        Some(-edge),
                        Some(0),
                    ],
                    15,
                    2,
                ),
            ),
            (
                "rate",
                d(
                    vec![Some(7), Some(100), Some(3), None, Some(-99), Some(1)],
                    12,
                    4,
                ),
            ),
            (
                "big",
                d(
                    vec![
                        Some(9 * 10_i128.pow(37)),
                        Some(-(10_i128.pow(37))),
                        Some(1),
                        Some(0),
                        None,
                        Some(2),
                    ],
                    38,
                    10,
                ),
            ),
            (
                "mid",
                d(
                    vec![
                        Some(10_i128.pow(20)),
                        Some(-(10_i128.pow(20))),
                        Some(3),
                        None,
                        Some(i128::from(i64::MAX)),
                        Some(i128::from(i64::MIN)),
                    ],
                    25,
                    3,
                ),
            ),
        ])
        .unwrap()
    }

    async fn run(ctx: &SessionContext, sql: &str) -> std::result::Result<String, String> {
        let run = async {
            let df = ctx.sql(sql).await?;
            let schema = df.schema().as_arrow().clone();
            let batches = df.collect().await?;
            Ok::<_, datafusion::error::DataFusionError>(format!(
                "{schema:?}\n{}",
                pretty_format_batches(&batches)?
            ))
        };
        run.await.map_err(|e| e.strip_backtrace())
    }

    fn session(rule: bool) -> SessionContext {
        let ctx = SessionContext::new();
        if rule {
            ctx.add_optimizer_rule(Arc::new(DecimalArithmetic::default()));
        }
        ctx.register_batch("t", table()).unwrap();
        ctx
    }

    /// Every query gives the same schema (names and types) and the same values, or the same
    /// error, with the rule as DataFusion gives without it.
    #[tokio::test]
    async fn results_types_and_errors_are_datafusions_own() {
        let queries = [
            "SELECT 1 - price, price + 1, 1 + rate, rate - 2 FROM t",
            "SELECT price * (1 - rate) * (1 + rate) AS charge FROM t",
            "SELECT sum(price * (1 - rate)), avg(1 + rate), count(*) FROM t",
            "SELECT price > 0, sum(price * (1 - rate) * (1 + rate)) FROM t GROUP BY price > 0 ORDER BY 1",
            "SELECT 1.5 - rate, rate + 0.25, -3 + price, 7 - (price + 1) FROM t",
            "SELECT CAST(1 AS DECIMAL(38, 0)) - big FROM t",
            "SELECT 1 - big, big + 12345678901 FROM t",
            "SELECT price FROM t WHERE 1 - rate > 0.99 AND price * rate > 0 ORDER BY price",
            "SELECT 0.001 + price, price - 0.125 FROM t",
            "SELECT 1 - price AS x FROM t GROUP BY 1 - price ORDER BY x",
            "SELECT price * rate AS x FROM t ORDER BY price * rate",
            "SELECT CAST(NULL AS DECIMAL(10, 0)) - price, CAST(NULL AS DECIMAL(10, 0)) * price FROM t",
            // 9.99…e37 + 9e37 overflows 128 bits: the same error either way.
            "SELECT CAST(9999999999999999999999999999 AS DECIMAL(28, 0)) + big FROM t",
            // Products beyond 64-bit operands: Arrow's own kernel, its values and its error.
            "SELECT mid * rate, mid * price, rate * mid FROM t",
            "SELECT mid * mid FROM t WHERE mid IS NOT NULL AND abs(mid) < 1000000000",
            "SELECT big * rate FROM t",
            "SELECT mid * mid FROM t",
            "SELECT big * big FROM t",
            // Constants on both sides, and a product the rule does not touch (integers).
            "SELECT CAST(2.5 AS DECIMAL(5, 1)) * CAST(4.25 AS DECIMAL(6, 2)), 3 * 4 FROM t",
            "SELECT price * 3, 3 * price, price * 1.5 FROM t",
        ];
        let (plain, rewritten) = (session(false), session(true));
        for sql in queries {
            assert_eq!(run(&rewritten, sql).await, run(&plain, sql).await, "{sql}");
        }
    }

    /// The rule does rewrite the shapes it is for.
    #[tokio::test]
    async fn the_constant_takes_the_decimal_s_scale_and_products_use_decimal_mul() {
        let df = session(true)
            .sql("SELECT 1 - price, price * rate FROM t")
            .await
            .unwrap();
        let plan = df.into_optimized_plan().unwrap();
        let text = plan.display_indent().to_string();
        assert!(text.contains("Decimal128(1.00,22,2) - t.price"), "{text}");
        assert!(text.contains("decimal_mul(t.price, t.rate)"), "{text}");
    }

    /// The 64-bit path and Arrow's kernel agree value for value, on random operands of
    /// every width around the 64-bit edge.
    #[test]
    fn the_64_bit_path_equals_arrow_s_kernel() {
        let mut seed = 0x9e37_79b9_7f4a_7c15_u64;
        let mut next = || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for _ in 0..200 {
            let mut value = || -> Option<i128> {
                let r = next();
                if r % 11 == 0 {
                    return None;
                }
                let bits = (next() % 64) as u32;
                let magnitude = i128::from(next() >> (63 - bits.min(62)));
                Some(if r % 2 == 0 { magnitude } else { -magnitude })
            };
            let a: Decimal128Array = (0..64).map(|_| value()).collect();
            let b: Decimal128Array = (0..64).map(|_| value()).collect();
            let (a, b) = (
                a.with_precision_and_scale(19, 2).unwrap(),
                b.with_precision_and_scale(19, 3).unwrap(),
            );
            assert!(fits_64_bits(&a) && fits_64_bits(&b));
            let want = mul_wrapping(&a, &b).unwrap();
            let got = DecimalMul::default()
                .invoke_with_args(ScalarFunctionArgs {
                    args: vec![
                        ColumnarValue::Array(Arc::new(a)),
                        ColumnarValue::Array(Arc::new(b)),
                    ],
                    arg_fields: vec![],
                    number_rows: 64,
                    return_field: Arc::new(Field::new("p", want.data_type().clone(), true)),
                    config_options: Default::default(),
                })
                .unwrap();
            let ColumnarValue::Array(got) = got else {
                panic!("an array")
            };
            assert_eq!(got.as_ref(), want.as_ref());
        }
    }

    /// Two constants give one constant, whatever the batch's row count.
    #[test]
    fn two_constants_give_a_constant() {
        for rows in [0, 1, 5] {
            let got = DecimalMul::default()
                .invoke_with_args(ScalarFunctionArgs {
                    args: vec![
                        ColumnarValue::Scalar(ScalarValue::Decimal128(Some(25), 5, 1)),
                        ColumnarValue::Scalar(ScalarValue::Decimal128(Some(-425), 6, 2)),
                    ],
                    arg_fields: vec![],
                    number_rows: rows,
                    return_field: Arc::new(Field::new("p", DataType::Decimal128(12, 3), true)),
                    config_options: Default::default(),
                })
                .unwrap();
            let ColumnarValue::Scalar(got) = got else {
                panic!("a constant")
            };
            assert_eq!(got, ScalarValue::Decimal128(Some(-10_625), 12, 3));
        }
    }

    /// `decimal_mul` exists only in plans the rule rewrote: a fragment (from a researcher,
    /// or from a compromised hub) cannot call it by name.
    #[tokio::test]
    async fn a_fragment_cannot_call_decimal_mul() {
        let ctx = crate::fragment_context().unwrap();
        ctx.register_batch("t", table()).unwrap();
        let err = ctx
            .sql("SELECT decimal_mul(price, rate) FROM t")
            .await
            .unwrap_err()
            .strip_backtrace();
        assert!(err.contains("decimal_mul"), "{err}");
        // The rule itself is in the fragment session.
        let plan = ctx
            .sql("SELECT price * rate FROM t")
            .await
            .unwrap()
            .into_optimized_plan()
            .unwrap();
        assert!(
            plan.display_indent().to_string().contains("decimal_mul("),
            "{}",
            plan.display_indent()
        );
    }
}
