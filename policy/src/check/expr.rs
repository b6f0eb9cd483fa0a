//! Expressions over non-public columns: which are total (cannot fail on any value), which
//! casts are lossless, which arguments are affine (`a·x + b`), and the ordering rule.

use super::*;

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

/// Names the first part of `expr` over data whose evaluation can fail for particular
/// values (a division by a column that may be zero, a cast that may not parse, a function
/// outside [`TOTAL_FUNCTIONS`]). Whether a fragment fails is itself a release: a query could
/// make the station fail exactly when one patient has some value.
pub(super) fn fallible(expr: &Expr, schema: &DFSchema) -> Option<String> {
    let mut found = None;
    let _ = expr.apply(|e| {
        if e.column_refs().is_empty() {
            // Column-free: fails the same way whatever the data.
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
            | Expr::SimilarTo(_)
            | Expr::AggregateFunction(_) => None,
            Expr::BinaryExpr(BinaryExpr { op, right, .. }) => match op {
                Operator::Divide | Operator::Modulo => {
                    let nonzero = match right.as_ref() {
                        Expr::Literal(v, _) => {
                            !v.is_null()
                                && ScalarValue::new_zero(&v.data_type()).is_ok_and(|z| &z != v)
                        }
                        _ => false,
                    };
                    (!nonzero).then(|| format!("'{op}' by anything but a non-zero constant"))
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
                (!TOTAL_FUNCTIONS.contains(&name)).then(|| format!("{name}()"))
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

/// Whether `expr` is an affine function of (at most) one column: the column, literals,
/// casts, negation, `+` and `-`, and `*` or `/` by a column-free factor.
pub(super) fn affine(expr: &Expr) -> bool {
    let constant = |e: &Expr| e.column_refs().is_empty();
    match expr {
        Expr::Column(_) | Expr::Literal(..) => true,
        Expr::Alias(a) => affine(&a.expr),
        Expr::Cast(c) => affine(&c.expr),
        Expr::TryCast(c) => affine(&c.expr),
        Expr::Negative(e) => affine(e),
        Expr::BinaryExpr(BinaryExpr { left, op, right }) => match op {
            Operator::Plus | Operator::Minus => affine(left) && affine(right),
            Operator::Multiply => {
                (constant(left) && affine(right)) || (constant(right) && affine(left))
            }
            Operator::Divide => constant(right) && affine(left),
            _ => false,
        },
        _ => false,
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
