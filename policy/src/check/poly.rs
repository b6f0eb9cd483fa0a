//! A released argument as a sum of terms, for two rules the grammar of [`super::form`]
//! cannot see in an expression's shape alone: terms that cancel, and terms that dominate.
//!
//! Both exploit that the grammar's algebra is exact and the station's arithmetic is not, or
//! that a sum mixes terms of very different sizes:
//!
//! ```text
//!   age + 1e20*(id-1)*(id-1) - 1e20*(id-1)*(id-1)    in floating point: age on the row
//!                                                    id = 1, 0 on every other (their age
//!                                                    is lost in the 1e20 and then removed)
//!   age / (id*id) + 1000                             the 1000 hides that one row holds
//!                                                    nearly all of the first term
//! ```
//!
//! So an argument is expanded into terms `c * a1 * a2 / (b1 * b2)` over its atoms (a column
//! or a fixed function of one, identified by the table columns it reads: `floor(id)`, `id`
//! and `CAST(id AS DOUBLE)` are the same atom). Like terms of opposite signs are refused
//! (they can only cancel, exactly or to rounding), and each non-linear term is held to the
//! dominance rule on its own.

use super::*;

/// Most terms an expansion may have (a product of two long sums multiplies their lengths).
const MAX_TERMS: usize = 256;

/// One term: a coefficient times a product of atoms over a product of atoms, each atom
/// named by the table columns it reads ([`Expansion`] keeps an expression for each name).
#[derive(Debug, Clone)]
pub(super) struct Term {
    coef: f64,
    num: Vec<String>,
    den: Vec<String>,
}

impl Term {
    fn constant(coef: f64) -> Self {
        Term {
            coef,
            num: vec![],
            den: vec![],
        }
    }

    /// Cancels atoms that stand above and below the line (`id * x / id` is `x`).
    fn reduce(mut self) -> Self {
        let mut den = Vec::new();
        for d in std::mem::take(&mut self.den) {
            match self.num.iter().position(|n| *n == d) {
                Some(i) => {
                    self.num.remove(i);
                }
                None => den.push(d),
            }
        }
        self.den = den;
        self.num.sort();
        self.den.sort();
        self
    }

    /// Whether the term is a product or a ratio of atoms (its sum is not a plain sum).
    fn nonlinear(&self) -> bool {
        self.num.len() > 1 || !self.den.is_empty()
    }
}

/// An argument's expansion: its terms and an expression for each atom.
#[derive(Debug, Default)]
pub(super) struct Expansion {
    terms: Vec<Term>,
    atoms: Vec<(String, Expr)>,
}

/// Expands `expr` (an accepted form) over the atoms among `input`'s columns. `None` when it
/// is no sum of such terms: it reads a column computed below this level (not an atom), or
/// expands past [`MAX_TERMS`].
pub(super) fn expand(expr: &Expr, input: &[(Column, Lineage)]) -> Option<Expansion> {
    let mut atoms = Vec::new();
    let terms = terms(expr, input, &mut atoms)?;
    Some(Expansion { terms, atoms })
}

fn atom_name(bases: &BTreeSet<String>) -> String {
    bases.iter().cloned().collect::<Vec<_>>().join(",")
}

fn terms(
    expr: &Expr,
    input: &[(Column, Lineage)],
    atoms: &mut Vec<(String, Expr)>,
) -> Option<Vec<Term>> {
    if expr.column_refs().is_empty() {
        return Some(vec![Term::constant(number(&constant(expr)?)?)]);
    }
    let mut atom = |bases: &BTreeSet<String>, e: &Expr| {
        let name = atom_name(bases);
        if !atoms.iter().any(|(n, _)| *n == name) {
            atoms.push((name.clone(), e.clone()));
        }
        Some(vec![Term {
            coef: 1.0,
            num: vec![name],
            den: vec![],
        }])
    };
    let out = match expr {
        Expr::Column(c) => {
            let l = find(input, c)?;
            if !matches!(l.form, Form::Smooth { atom: true, .. }) {
                return None;
            }
            atom(&l.bases, expr)?
        }
        Expr::Alias(a) => terms(&a.expr, input, atoms)?,
        Expr::Cast(c) => terms(&c.expr, input, atoms)?,
        Expr::TryCast(c) => terms(&c.expr, input, atoms)?,
        Expr::Negative(e) => negate(terms(e, input, atoms)?),
        // signum() is 1 on every row of a positive column: a term multiplied by it is the
        // same term under another name (`A*id - A*id*signum(age)` cancels), so it counts as
        // a constant here.
        Expr::ScalarFunction(f) if f.func.name() == "signum" => vec![Term::constant(1.0)],
        Expr::ScalarFunction(_) => {
            // A fixed function of one atom (the grammar accepted it): the same atom.
            let mut bases = BTreeSet::new();
            for c in expr.column_refs() {
                bases.extend(find(input, c)?.bases.iter().cloned());
            }
            atom(&bases, expr)?
        }
        Expr::BinaryExpr(BinaryExpr { left, op, right }) => {
            let l = terms(left, input, atoms)?;
            let r = terms(right, input, atoms)?;
            match op {
                Operator::Plus => [l, r].concat(),
                Operator::Minus => [l, negate(r)].concat(),
                Operator::Multiply => {
                    if l.len() * r.len() > MAX_TERMS {
                        return None;
                    }
                    let mut out = Vec::with_capacity(l.len() * r.len());
                    for a in &l {
                        for b in &r {
                            out.push(Term {
                                coef: a.coef * b.coef,
                                num: [a.num.clone(), b.num.clone()].concat(),
                                den: [a.den.clone(), b.den.clone()].concat(),
                            });
                        }
                    }
                    out
                }
                Operator::Divide => match r.as_slice() {
                    [d] if d.den.is_empty() && d.coef != 0.0 => l
                        .into_iter()
                        .map(|t| Term {
                            coef: t.coef / d.coef,
                            num: t.num,
                            den: [t.den, d.num.clone()].concat(),
                        })
                        .collect(),
                    _ => return None,
                },
                _ => return None,
            }
        }
        _ => return None,
    };
    if out.len() > MAX_TERMS {
        return None;
    }
    Some(out.into_iter().map(Term::reduce).collect())
}

fn negate(terms: Vec<Term>) -> Vec<Term> {
    terms
        .into_iter()
        .map(|t| Term { coef: -t.coef, ..t })
        .collect()
}

impl Expansion {
    /// Whether two like terms (the same atoms above and below the line, or two constants)
    /// have opposite signs: they can only cancel, and in floating point a cancelled term
    /// takes the other terms' low digits with it on every row where it is large.
    pub(super) fn cancels(&self) -> bool {
        self.terms.iter().enumerate().any(|(i, a)| {
            self.terms[i + 1..].iter().any(|b| {
                a.num == b.num
                    && a.den == b.den
                    && a.coef != 0.0
                    && b.coef != 0.0
                    && a.coef.signum() != b.coef.signum()
            })
        })
    }

    /// Whether a term's coefficient lies outside [2^-20, 2^20] (constants aside): double
    /// precision keeps 53 bits, and two terms whose scales differ by more than that lose the
    /// smaller one on every row where the larger is not zero.
    pub(super) fn out_of_scale(&self) -> bool {
        const SCALE: f64 = 1_048_576.0;
        self.terms.iter().any(|t| {
            (!t.num.is_empty() || !t.den.is_empty())
                && t.coef != 0.0
                && !(1.0 / SCALE..=SCALE).contains(&t.coef.abs())
        })
    }

    /// The non-linear terms as expressions at the argument's level, in floating point: each
    /// is held to the dominance rule on its own.
    pub(super) fn nonlinear_terms(&self) -> Vec<Expr> {
        let atom = |name: &String| {
            self.atoms
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, e)| cast(e.clone(), DataType::Float64))
        };
        let product = |names: &[String]| {
            names
                .iter()
                .filter_map(atom)
                .reduce(|a, b| a * b)
                .unwrap_or_else(|| lit(1.0))
        };
        self.terms
            .iter()
            .filter(|t| t.nonlinear())
            .map(|t| {
                let mut e = lit(t.coef) * product(&t.num);
                if !t.den.is_empty() {
                    e = e / product(&t.den);
                }
                e
            })
            .collect()
    }
}
