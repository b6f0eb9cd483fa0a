//! The positive grammar of what may be computed from non-public columns before their values
//! enter a released aggregate: each accepted form, and why none of them can act as an
//! indicator that singles out one row.
//!
//! An aggregate over a group of at least k contributors is safe only if no row can be made
//! to dominate it. That fails as soon as the argument is a *threshold* the researcher
//! chooses: `CASE WHEN age >= 74 THEN 1 ELSE 0 END`, `(time - 306 + 10000) / 10000` in
//! integer arithmetic, `floor((age - 73.5) / 100)`, `TRY_CAST((id - 1) * 200 AS TINYINT)`
//! (NULL on every row but one), or a denominator shifted to zero at one row
//! (`1.0 / (id - 0.999)`). The accepted forms have no such threshold:
//!
//! ```text
//!   atom      := a table column, unchanged or cast without loss (or to a float / decimal)
//!              | f(column) for a fixed function f without a parameter: date_part/extract
//!                with a literal part, floor, ceil, round, trunc, signum, length
//!   numerator := a polynomial of degree ≤ 2 in atoms, with any constant coefficients
//!   form      := numerator / monomial        (monomial: a product of ≤ 2 scaled atoms,
//!              | Σ forms                       no additive constant; float result only)
//! ```
//!
//! Why each is safe: the sum of a polynomial of degree ≤ 2 is a linear combination of the
//! group's first and second moments, which the safe aggregates release anyway, so the
//! constants (`(age - 74)^2`) select nothing. A fixed function takes no parameter, so the
//! researcher cannot place its steps. A denominator with no additive constant is the data's
//! own value (`weight / (height * height)`), never one the researcher can shift to zero
//! for a single row. Degree 3 and up is refused: a polynomial of degree n through the known
//! ids of n rows is an exact indicator (Lagrange).

use super::*;

/// What an expression is, in terms of the grammar above.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(super) enum Form {
    /// An accepted form: `degree` of its numerators, `denominator` degree of its
    /// denominators, whether it is a product of scaled atoms (no additive constant), and
    /// whether it is a single atom (an argument a fixed function may take).
    Smooth {
        degree: u8,
        denominator: u8,
        monomial: bool,
        atom: bool,
    },
    /// Anything else: total (or the fallibility rule refuses it), but it may single out rows,
    /// so it is accepted only where k counts what it selects (filters, group keys, count).
    #[default]
    Other,
}

const MAX_DEGREE: u8 = 2;

impl Form {
    /// A table column, as a scan reads it.
    pub(super) const COLUMN: Form = Form::Smooth {
        degree: 1,
        denominator: 0,
        monomial: true,
        atom: true,
    };
    const CONSTANT: Form = Form::Smooth {
        degree: 0,
        denominator: 0,
        monomial: true,
        atom: false,
    };

    pub(super) fn accepted(self) -> bool {
        matches!(self, Form::Smooth { .. })
    }

    fn not_atom(self) -> Form {
        match self {
            Form::Smooth {
                degree,
                denominator,
                monomial,
                ..
            } => Form::Smooth {
                degree,
                denominator,
                monomial,
                atom: false,
            },
            Form::Other => Form::Other,
        }
    }
}

/// Parameterless functions of one column that may stand for an atom (their other arguments,
/// where they take any, must be constants: the part of a date, nothing else).
const FIXED_FUNCTIONS: &[&str] = &[
    "date_part",
    "datepart",
    "extract",
    "floor",
    "ceil",
    "trunc",
    "round",
    "signum",
    "length",
    "char_length",
    "character_length",
    "octet_length",
];

/// The form of `expr`, whose columns have the forms of `input`'s lineage.
pub(super) fn form_of(expr: &Expr, input: &[(Column, Lineage)], schema: &DFSchema) -> Form {
    if expr.column_refs().is_empty() {
        return Form::CONSTANT;
    }
    match expr {
        Expr::Column(c) => find(input, c).map_or(Form::Other, |l| l.form),
        Expr::Alias(a) => form_of(&a.expr, input, schema),
        Expr::Cast(c) => cast_form(&c.expr, c.field.data_type(), input, schema),
        // A TRY_CAST that cannot fail is a cast; one that can turns values into NULL, so
        // it selects the rows it keeps.
        Expr::TryCast(c) => match c.expr.get_type(schema) {
            Ok(from) if lossless_cast(&from, c.field.data_type()) => {
                cast_form(&c.expr, c.field.data_type(), input, schema)
            }
            _ => Form::Other,
        },
        Expr::Negative(e) => form_of(e, input, schema).not_atom(),
        // Single precision keeps 24 bits: `CAST(age AS REAL) + CAST(2147483648 AS REAL) *
        // CAST(id - 1 AS REAL)` rounds every age away but one patient's, and the sum (in
        // double precision) then adds exact multiples of 2^31 to it.
        Expr::BinaryExpr(_)
            if expr
                .get_type(schema)
                .is_ok_and(|t| matches!(t, DataType::Float16 | DataType::Float32)) =>
        {
            Form::Other
        }
        Expr::BinaryExpr(BinaryExpr { left, op, right }) => {
            let (l, r) = (form_of(left, input, schema), form_of(right, input, schema));
            let (
                Form::Smooth {
                    degree: ld,
                    denominator: le,
                    monomial: lm,
                    ..
                },
                Form::Smooth {
                    degree: rd,
                    denominator: re,
                    monomial: rm,
                    ..
                },
            ) = (l, r)
            else {
                return Form::Other;
            };
            let smooth = |degree: u8, denominator: u8, monomial: bool| {
                if degree > MAX_DEGREE || denominator > MAX_DEGREE {
                    Form::Other
                } else {
                    Form::Smooth {
                        degree,
                        denominator,
                        monomial,
                        atom: false,
                    }
                }
            };
            match op {
                Operator::Plus | Operator::Minus => smooth(ld.max(rd), le.max(re), false),
                Operator::Multiply => smooth(ld + rd, le + re, lm && rm),
                Operator::Divide => {
                    // Integer division truncates: a step the researcher places.
                    let exact = expr
                        .get_type(schema)
                        .is_ok_and(|t| t.is_floating() || matches!(t, DataType::Decimal128(..)));
                    if !exact {
                        Form::Other
                    } else if rd == 0 {
                        // By a constant: a scale (the fallibility rule wants it non-zero).
                        l.not_atom()
                    } else if re == 0 && rm {
                        smooth(ld, le + rd, false)
                    } else {
                        Form::Other
                    }
                }
                _ => Form::Other,
            }
        }
        Expr::ScalarFunction(f) if FIXED_FUNCTIONS.contains(&f.func.name()) => {
            let mut columns = f.args.iter().filter(|a| !a.column_refs().is_empty());
            match (columns.next(), columns.next()) {
                (Some(arg), None)
                    if matches!(form_of(arg, input, schema), Form::Smooth { atom: true, .. })
                        && (f.args.len() == 1 || !is_rounding(f.func.name())) =>
                {
                    Form::COLUMN
                }
                _ => Form::Other,
            }
        }
        _ => Form::Other,
    }
}

/// `round(x, digits)` and `trunc(x, digits)` with a digits argument place a step.
fn is_rounding(name: &str) -> bool {
    matches!(name, "round" | "trunc")
}

fn cast_form(inner: &Expr, to: &DataType, input: &[(Column, Lineage)], schema: &DFSchema) -> Form {
    let form = form_of(inner, input, schema);
    match inner.get_type(schema) {
        // A cast to text is never summed; to a float or a decimal it keeps the value's
        // order and scale; a lossless one keeps the value.
        Ok(_)
            if matches!(
                to,
                DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View
            ) =>
        {
            Form::Other
        }
        Ok(from) if lossless_cast(&from, to) => form,
        Ok(from)
            if from.is_numeric() && matches!(to, DataType::Float64 | DataType::Decimal128(..)) =>
        {
            form
        }
        _ => Form::Other,
    }
}
