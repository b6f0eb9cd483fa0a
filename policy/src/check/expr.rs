//! Expressions over non-public columns: which are total (cannot fail on any value), which
//! casts are lossless, and the ordering rule. What may enter an aggregate is the grammar
//! of [`super::form`].

use super::*;
use datafusion::logical_expr::simplify::SimplifyContext;
use datafusion::optimizer::simplify_expressions::ExprSimplifier;

/// The value of a literal argument (also a negated or cast literal).
pub(super) fn literal(e: &Expr) -> Option<ScalarValue> {
    match e {
        Expr::Literal(v, _) => Some(v.clone()),
        Expr::Negative(inner) => literal(inner)?.arithmetic_negate().ok(),
        Expr::Cast(c) => literal(&c.expr)?.cast_to(c.field.data_type()).ok(),
        _ => None,
    }
}

/// A literal as a finite number.
pub(super) fn number(v: &ScalarValue) -> Option<f64> {
    match v.cast_to(&DataType::Float64).ok()? {
        ScalarValue::Float64(Some(x)) if x.is_finite() => Some(x),
        _ => None,
    }
}

/// Scalar functions that return a value (or NULL) for every input, so whether they fail
/// cannot depend on the data.
pub(super) const TOTAL_FUNCTIONS: &[&str] = &[
    "date_part",
    "datepart",
    "extract",
    "date_trunc",
    "datetrunc",
    "floor",
    "ceil",
    "round",
    "trunc",
    "signum",
    "isnan",
    "iszero",
    "coalesce",
    "nullif",
    "nvl",
    "ifnull",
    "greatest",
    "least",
    "lower",
    "upper",
    "length",
    "char_length",
    "character_length",
    "octet_length",
    "substr",
    "substring",
    "left",
    "right",
    "trim",
    "btrim",
    "ltrim",
    "rtrim",
    "concat",
    "concat_ws",
    "starts_with",
    "ends_with",
    "strpos",
];

/// The value of a column-free expression, folded now: a literal, or what the station's own
/// functions compute from literals (`CAST('2020-01-01' AS DATE)`, `2 * 3`). `None` if it
/// does not fold, or fails.
pub(super) fn constant(e: &Expr) -> Option<ScalarValue> {
    if let Some(v) = literal(e) {
        return Some(v);
    }
    if !e.column_refs().is_empty() {
        return None;
    }
    // DataFusion's constant folding panics on some ill-typed expressions it is handed
    // before type coercion (fuzzing found `make_array(1, 'x')`: "Arrays with inconsistent
    // types passed to MutableArrayData"). Such an expression is not a constant this check
    // can use: the fragment's own planning refuses it with an error.
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let simplifier = ExprSimplifier::new(SimplifyContext::default());
        match simplifier.simplify(e.clone()) {
            Ok(Expr::Literal(v, _)) => Some(v),
            _ => None,
        }
    }))
    .unwrap_or(None)
}

/// An upper bound of `|e|` for an integer expression, from its constants and the bound
/// [`atom_bound`] assumes for everything else, with its degree in those atoms. Whether
/// integer arithmetic wraps must not be a threshold the researcher places:
/// `x + 4611686018427387904 + 4611686018427387000` passes every per-constant cap and still
/// wraps exactly when `x` is at least some chosen value.
fn integer_bound(e: &Expr, schema: &DFSchema) -> (f64, u32) {
    if e.column_refs().is_empty() {
        let bound = constant(e)
            .and_then(|v| number(&v))
            .map_or(f64::INFINITY, f64::abs);
        return (bound, 0);
    }
    let integer = e.get_type(schema).is_ok_and(|t| t.is_integer());
    match e {
        Expr::Alias(a) => integer_bound(&a.expr, schema),
        Expr::Negative(x) => integer_bound(x, schema),
        Expr::BinaryExpr(BinaryExpr { left, op, right }) if integer => {
            let ((l, ld), (r, rd)) = (integer_bound(left, schema), integer_bound(right, schema));
            match op {
                Operator::Plus | Operator::Minus => (l + r, ld.max(rd)),
                Operator::Multiply => (l * r, ld + rd),
                _ => (atom_bound(e, schema), 1),
            }
        }
        _ => (atom_bound(e, schema), 1),
    }
}

/// What a value of `e`'s type is assumed to stay within when bounding integer arithmetic:
/// half of its type's bits (2^31 for a BIGINT, 2^15 for an INT), so that a product of two
/// such values fits. Columns whose values use more (epoch milliseconds, long ids) are a
/// residual risk docs/policy.md names.
fn atom_bound(e: &Expr, schema: &DFSchema) -> f64 {
    let bits = match e.get_type(schema) {
        Ok(DataType::Int8 | DataType::UInt8) => 8,
        Ok(DataType::Int16 | DataType::UInt16) => 16,
        Ok(DataType::Int32 | DataType::UInt32) => 32,
        _ => 64,
    };
    2f64.powi(bits / 2 - 1)
}

/// The largest value of an integer type (of a 64-bit one for anything else).
fn integer_limit(t: &DataType) -> f64 {
    match t {
        DataType::Int8 => i8::MAX as f64,
        DataType::UInt8 => u8::MAX as f64,
        DataType::Int16 => i16::MAX as f64,
        DataType::UInt16 => u16::MAX as f64,
        DataType::Int32 => i32::MAX as f64,
        DataType::UInt32 => u32::MAX as f64,
        _ => i64::MAX as f64,
    }
}

/// For a function of [`TOTAL_FUNCTIONS`], the arguments that must be constants (a part
/// name, a position, a length), and whether they must be positive (a length may be 0).
fn parameters(name: &str) -> (&'static [usize], bool) {
    match name {
        "date_part" | "datepart" | "extract" | "date_trunc" | "datetrunc" | "concat_ws" => {
            (&[0], false)
        }
        "substr" | "substring" => (&[1, 2], true),
        "left" | "right" | "round" | "trunc" => (&[1], false),
        _ => (&[], false),
    }
}

/// Names the first part of `expr` whose evaluation can fail for particular values (a
/// division by a column that may be zero, a cast that may not parse, a function outside
/// [`TOTAL_FUNCTIONS`], a length computed from the data). Whether a fragment fails is
/// itself a release: a query could make the station fail exactly when one patient has some
/// value. That holds for a part without columns too (`1/0`): under a `CASE` arm or an `AND`
/// it runs only for the rows that reach it, so it is accepted only if it folds to a value
/// now.
pub(super) fn fallible(expr: &Expr, schema: &DFSchema) -> Option<String> {
    let mut found = None;
    let _ = expr.apply(|e| {
        if e.column_refs().is_empty() && constant(e).is_some() {
            return Ok(TreeNodeRecursion::Jump);
        }
        let bad = match e {
            Expr::Column(_)
            | Expr::Alias(_)
            | Expr::Not(_)
            | Expr::IsNull(_)
            | Expr::IsNotNull(_)
            | Expr::IsTrue(_)
            | Expr::IsFalse(_)
            | Expr::IsUnknown(_)
            | Expr::IsNotTrue(_)
            | Expr::IsNotFalse(_)
            | Expr::IsNotUnknown(_)
            | Expr::Negative(_)
            | Expr::Between(_)
            | Expr::Case(_)
            | Expr::TryCast(_)
            | Expr::InList(_)
            | Expr::Like(_)
            | Expr::AggregateFunction(_) => None,
            // The pattern is compiled to a regular expression, which can fail to compile.
            Expr::SimilarTo(like) => constant(&like.pattern)
                .is_none()
                .then(|| "SIMILAR TO a pattern computed from the data".to_string()),
            // Integer arithmetic wraps: a constant large enough to wrap it for some values
            // (`age * 9223372036854775807`, `x + 2^62 + 2^62`) turns it into a threshold.
            // Bounded over the whole integer computation, not one operator at a time:
            // chained constants add up, and so do products.
            Expr::BinaryExpr(BinaryExpr { op, .. })
                if matches!(op, Operator::Multiply | Operator::Plus | Operator::Minus)
                    && e.get_type(schema).is_ok_and(|t| {
                        // Degree 3 and up is no accepted form anyway (`aggregate_argument`
                        // says why); in a filter a wrap only selects, and k counts that.
                        t.is_integer() && {
                            let (bound, degree) = integer_bound(e, schema);
                            degree <= 2 && bound > integer_limit(&t)
                        }
                    }) =>
            {
                Some(format!(
                    "integer arithmetic ('{op}') whose result can leave the range of its type \
                     (cast to DOUBLE first)"
                ))
            }
            Expr::BinaryExpr(BinaryExpr { op, right, .. }) => match op {
                // A float quotient is infinite or NaN where an integer or decimal one fails.
                Operator::Divide | Operator::Modulo
                    if e.get_type(schema).is_ok_and(|t| t.is_floating()) =>
                {
                    None
                }
                Operator::Divide | Operator::Modulo => {
                    // Zero fails, and so does -1 for the smallest signed integer.
                    let safe = constant(right).is_some_and(|v| {
                        !v.is_null()
                            && ScalarValue::new_zero(&v.data_type()).is_ok_and(|z| z != v)
                            && !(v.data_type().is_signed_integer()
                                && ScalarValue::new_negative_one(&v.data_type())
                                    .is_ok_and(|m| m == v))
                    });
                    (!safe)
                        .then(|| format!("'{op}' by anything but a constant other than 0 and -1"))
                }
                Operator::Eq
                | Operator::NotEq
                | Operator::Lt
                | Operator::LtEq
                | Operator::Gt
                | Operator::GtEq
                | Operator::And
                | Operator::Or
                | Operator::IsDistinctFrom
                | Operator::IsNotDistinctFrom
                | Operator::Plus
                | Operator::Minus
                | Operator::Multiply
                | Operator::LikeMatch
                | Operator::ILikeMatch
                | Operator::NotLikeMatch
                | Operator::NotILikeMatch
                | Operator::StringConcat => None,
                other => Some(format!("the operator '{other}'")),
            },
            Expr::Cast(c) => match c.expr.get_type(schema) {
                Ok(from) if lossless_cast(&from, c.field.data_type()) => None,
                _ => Some(format!("CAST(… AS {})", c.field.data_type())),
            },
            Expr::ScalarFunction(f) => {
                let name = f.func.name();
                if !TOTAL_FUNCTIONS.contains(&name) {
                    Some(format!("{name}()"))
                } else {
                    let (constants, sign) = parameters(name);
                    constants
                        .iter()
                        .filter_map(|i| Some((*i, f.args.get(*i)?)))
                        .find_map(|(i, a)| {
                            let ok = constant(a).is_some_and(|v| {
                                !sign
                                    || v.is_null()
                                    || ScalarValue::new_zero(&v.data_type())
                                        .ok()
                                        .and_then(|z| v.partial_cmp(&z))
                                        .is_some_and(|o| o.is_gt() || (i > 1 && o.is_eq()))
                            });
                            (!ok).then(|| {
                                format!(
                                    "{name}() with argument {} not a constant{}",
                                    i + 1,
                                    if sign {
                                        " of at least 1 (0 for a length)"
                                    } else {
                                        ""
                                    }
                                )
                            })
                        })
                }
            }
            other => Some(other.variant_name().to_string()),
        };
        if bad.is_some() {
            found = bad;
            return Ok(TreeNodeRecursion::Stop);
        }
        Ok(TreeNodeRecursion::Continue)
    });
    found
}

/// Casts that succeed for every value of `from`.
pub(super) fn lossless_cast(from: &DataType, to: &DataType) -> bool {
    use DataType::*;
    let rank = |t: &DataType| match t {
        Int8 => Some((true, 1)),
        Int16 => Some((true, 2)),
        Int32 => Some((true, 4)),
        Int64 => Some((true, 8)),
        UInt8 => Some((false, 1)),
        UInt16 => Some((false, 2)),
        UInt32 => Some((false, 4)),
        UInt64 => Some((false, 8)),
        _ => None,
    };
    if from == to || matches!(to, Utf8 | LargeUtf8 | Utf8View) {
        return true;
    }
    match (from, to) {
        (_, Float64 | Float32) => from.is_numeric(),
        (Boolean, _) => to.is_integer(),
        (Date32, Date64 | Timestamp(..)) => true,
        (Decimal128(p, s), Decimal128(q, t)) => {
            t >= s && i16::from(*q) - i16::from(*t) >= i16::from(*p) - i16::from(*s)
        }
        _ => match (rank(from), rank(to)) {
            (Some((fs, fw)), Some((ts, tw))) => (fs == ts && tw >= fw) || (!fs && ts && tw > fw),
            _ => false,
        },
    }
}

/// Refuses `ORDER BY` and `LIMIT` in row-level fragments whose rows are not released as
/// they are (`what`): they would select rows by their values.
pub(super) fn no_ordering(
    chain: &[&LogicalPlan],
    station: &str,
    what: &str,
) -> Result<(), Refusal> {
    if chain
        .iter()
        .any(|n| matches!(n, LogicalPlan::Sort(_) | LogicalPlan::Limit(_)))
    {
        return Err(Refusal {
            rule: Rule::Ordering,
            message: format!(
                "policy: station '{station}' refuses ORDER BY and LIMIT in {what}: they would \
                 select rows by their values"
            ),
        });
    }
    Ok(())
}
