//! Model formulas: `y ~ x1 + C(x2) - 1` (R/patsy style, the subset Railyard fits).
//!
//! An intercept is included unless the right-hand side has `- 1` or `+ 0`; `C(x)` marks a
//! categorical covariate (treatment coding, the lowest level is the reference). Covariate
//! lists for Cox models are the right-hand side alone: `age + sex`.

use datafusion::common::{Result, plan_err};

/// One covariate term.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Term {
    Numeric(String),
    Categorical(String),
}

impl Term {
    pub fn column(&self) -> &str {
        match self {
            Term::Numeric(c) | Term::Categorical(c) => c,
        }
    }
}

/// A parsed formula.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Formula {
    pub response: Option<String>,
    pub terms: Vec<Term>,
    pub intercept: bool,
}

fn identifier(text: &str) -> Option<&str> {
    let mut chars = text.chars();
    let first = chars.next()?;
    ((first.is_ascii_alphabetic() || first == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_'))
    .then_some(text)
}

impl Formula {
    /// Parses `y ~ rhs`.
    pub fn parse(text: &str) -> Result<Self> {
        let Some((lhs, rhs)) = text.split_once('~') else {
            return plan_err!("formula '{text}': expected 'response ~ covariates'");
        };
        let Some(response) = identifier(lhs.trim()) else {
            return plan_err!("formula '{text}': the response must be one column name");
        };
        let mut formula = Self::covariates(rhs, text, true)?;
        formula.response = Some(response.to_string());
        Ok(formula)
    }

    /// Parses a right-hand side alone (`age + sex`); no intercept terms are allowed.
    pub fn parse_covariates(text: &str) -> Result<Self> {
        let formula = Self::covariates(text, text, false)?;
        if formula.terms.is_empty() {
            return plan_err!("covariates '{text}': name at least one column");
        }
        Ok(formula)
    }

    fn covariates(rhs: &str, whole: &str, allow_intercept_terms: bool) -> Result<Self> {
        let mut terms = Vec::new();
        let mut intercept = allow_intercept_terms;
        // Split on + and -, keeping the sign of each part.
        let mut parts = Vec::new();
        let mut sign = '+';
        let mut current = String::new();
        let mut depth = 0;
        for c in rhs.chars() {
            match c {
                '(' => {
                    depth += 1;
                    current.push(c);
                }
                ')' => {
                    depth -= 1;
                    current.push(c);
                }
                '+' | '-' if depth == 0 => {
                    parts.push((sign, std::mem::take(&mut current)));
                    sign = c;
                }
                _ => current.push(c),
            }
        }
        parts.push((sign, current));
        for (i, (sign, part)) in parts.into_iter().enumerate() {
            let part = part.trim();
            if part.is_empty() && i == 0 && sign == '+' {
                continue;
            }
            match (sign, part) {
                ('-', "1") | ('+', "0") if allow_intercept_terms => intercept = false,
                ('+', "1") if allow_intercept_terms => intercept = true,
                ('+', p) => {
                    let term = if let Some(inner) =
                        p.strip_prefix("C(").and_then(|r| r.strip_suffix(')'))
                    {
                        match identifier(inner.trim()) {
                            Some(c) => Term::Categorical(c.to_string()),
                            None => return plan_err!("formula '{whole}': '{p}' is not C(column)"),
                        }
                    } else {
                        match identifier(p) {
                            Some(c) => Term::Numeric(c.to_string()),
                            None => {
                                return plan_err!(
                                    "formula '{whole}': '{p}' is not a column name or C(column) \
                                     (interactions and transformations are not supported)"
                                );
                            }
                        }
                    };
                    if terms.iter().any(|t: &Term| t.column() == term.column()) {
                        return plan_err!(
                            "formula '{whole}': column '{}' appears twice",
                            term.column()
                        );
                    }
                    terms.push(term);
                }
                (_, p) => {
                    return plan_err!("formula '{whole}': '- {p}' is not supported (only '- 1')");
                }
            }
        }
        Ok(Self {
            response: None,
            terms,
            intercept,
        })
    }

    /// Every column the formula reads: the response first.
    pub fn columns(&self) -> Vec<String> {
        self.response
            .iter()
            .cloned()
            .chain(self.terms.iter().map(|t| t.column().to_string()))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formulas_parse_like_r() {
        let f = Formula::parse("status ~ age + C(ph_ecog)").unwrap();
        assert_eq!(f.response.as_deref(), Some("status"));
        assert!(f.intercept);
        assert_eq!(
            f.terms,
            vec![
                Term::Numeric("age".into()),
                Term::Categorical("ph_ecog".into())
            ]
        );
        assert!(!Formula::parse("y ~ x - 1").unwrap().intercept);
        assert!(!Formula::parse("y ~ 0 + x").unwrap().intercept);
        assert!(Formula::parse("y ~ 1").unwrap().terms.is_empty());
        for bad in [
            "y",
            "y ~ x*z",
            "y ~ log(x)",
            "y ~ x - z",
            "y ~ x + x",
            "a b ~ x",
        ] {
            assert!(Formula::parse(bad).is_err(), "{bad}");
        }
        assert_eq!(
            Formula::parse_covariates("age + sex").unwrap().terms.len(),
            2
        );
        assert!(Formula::parse_covariates("age - 1").is_err());
    }
}
