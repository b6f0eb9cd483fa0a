//! `glm(table, formula, family [, filter])` and `glm_fit(…)`: Fisher scoring over federated
//! rounds.
//!
//! ```text
//!   round 0   intercept-only terms at b = 0        → n, Σy      (the mean outcome ȳ)
//!   round 1   model terms at b_1 = (g(ȳ), 0, …, 0) → XᵀWX, XᵀWz, deviance at b_1; b_1 is
//!             the null model's point, so that deviance is the null deviance
//!   rounds 2… model terms at b_k                   → XᵀWX, XᵀWz, deviance at b_k
//!             b_{k+1} = (XᵀWX)⁻¹ XᵀWz  (Cholesky)
//! ```
//!
//! Converged when the Newton step from b_k is negligible or the deviance stops changing;
//! the reported estimates are b_k, with standard errors from the XᵀWX of the same round,
//! so estimates, deviance and errors belong to one point. A gaussian model (identity link)
//! needs round 1 only: its solve is exact, and the deviance at the solution follows from
//! round 1's sums. A model without an intercept asks the null deviance in a round of its own.

use std::sync::Arc;

use arrow::array::{Array, AsArray, RecordBatch};
use arrow::array::{BooleanArray, Float64Array, Int64Array, StringArray};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use datafusion::common::{Result, exec_err, plan_err};
use railyard_udfs::glm_terms::{
    Family, GLM_TERMS, GlmLayout, add_terms, f64_list_type, list_values,
};

use super::formula::{Formula, Term};
use super::{
    Rounds, Select, Source, batch, float_sql, ident, levels, normal_p, spd_inverse, spd_solve, t_p,
    value_sql, value_text, with_rows,
};

const MAX_ITERATIONS: usize = 50;
/// Relative size of a Newton step (or deviance change) taken as convergence.
const TOLERANCE: f64 = 1e-10;

#[derive(Debug, Clone)]
pub(crate) struct GlmJob {
    pub source: Source,
    formula: Formula,
    family: Family,
    fit_summary: bool,
}

/// One design column: its name in results and its SQL at the station.
struct DesignColumn {
    name: String,
    sql: String,
}

impl GlmJob {
    pub fn new(source: Source, formula: &str, family: &str, fit_summary: bool) -> Result<Self> {
        let Some(family) = Family::parse(family.trim()) else {
            return plan_err!(
                "glm: unknown family '{family}' (families: gaussian, binomial, poisson)"
            );
        };
        let formula = Formula::parse(formula)?;
        for (i, c) in formula.columns().iter().enumerate() {
            let role = if i == 0 { "response" } else { "covariate" };
            match &formula.terms.get(i.wrapping_sub(1)) {
                Some(Term::Categorical(_)) => {
                    source.column_type(c)?;
                }
                _ => source.numeric_column(c, role)?,
            }
        }
        if formula.terms.is_empty() && !formula.intercept {
            return plan_err!("glm: the model has no terms and no intercept");
        }
        Ok(Self {
            source,
            formula,
            family,
            fit_summary,
        })
    }

    pub fn schema(&self) -> SchemaRef {
        if self.fit_summary {
            Arc::new(Schema::new(vec![
                Field::new("n", DataType::Int64, false),
                Field::new("iterations", DataType::Int64, false),
                Field::new("converged", DataType::Boolean, false),
                Field::new("log_likelihood", DataType::Float64, false),
                Field::new("deviance", DataType::Float64, false),
                Field::new("null_deviance", DataType::Float64, false),
                Field::new("aic", DataType::Float64, false),
            ]))
        } else {
            coefficient_schema()
        }
    }

    /// One round: the summed `glm_terms` of every station for `design` at `beta`.
    async fn terms(
        &self,
        rounds: &Rounds,
        rows: &[String],
        design: &[DesignColumn],
        intercept: bool,
        beta: &[f64],
    ) -> Result<Vec<f64>> {
        let q = design.len() + usize::from(intercept);
        let layout = GlmLayout { q };
        let mut args = vec![
            format!("'{}'", self.family.name()),
            intercept.to_string(),
            ident(self.formula.response.as_deref().unwrap_or_default()),
        ];
        args.extend(design.iter().map(|d| d.sql.clone()));
        args.extend(beta.iter().map(|b| float_sql(*b)));
        let select = Select {
            items: vec![(
                format!("{GLM_TERMS}({})", args.join(", ")),
                "terms".to_string(),
            )],
            filters: rows.to_vec(),
            group_by: Vec::new(),
        };
        let schema = with_rows(vec![Field::new("terms", f64_list_type(), true)]);
        let answers = rounds.run(select, schema).await?;
        let mut sums = vec![0.0; layout.len()];
        for batch in answers.iter().flatten() {
            let list = batch.column(0).as_list::<i32>();
            for row in 0..list.len() {
                if let Some(values) = list_values(list, row) {
                    add_terms(&mut sums, &values)?;
                }
            }
        }
        if sums[GlmLayout::INVALID] > 0.0 {
            let what = match self.family {
                Family::Binomial => "a binomial outcome must lie between 0 and 1",
                Family::Poisson => "a poisson outcome must be a count (≥ 0)",
                Family::Gaussian => "the linear predictor overflowed",
            };
            return exec_err!(
                "glm: {what}; '{}' has values outside that range",
                self.formula.response.as_deref().unwrap_or_default()
            );
        }
        Ok(sums)
    }

    /// The design columns, and the WHERE clause of the rows the model uses: the filter,
    /// complete cases, and for each `C(x)` only the levels the stations release (a row of a
    /// withheld level would otherwise count as the reference level).
    async fn design(&self, rounds: &Rounds) -> Result<(Vec<DesignColumn>, Vec<String>)> {
        let complete = self.formula.columns();
        let mut rows = self.source.filters(complete.iter())?;
        let mut design = Vec::new();
        for term in &self.formula.terms {
            match term {
                Term::Numeric(c) => design.push(DesignColumn {
                    name: c.clone(),
                    sql: ident(c),
                }),
                Term::Categorical(c) => {
                    let levels = levels(rounds, &self.source, c, &complete).await?;
                    if levels.len() < 2 {
                        return exec_err!(
                            "glm: C({c}) needs at least two levels with enough rows; it has {}",
                            levels.len()
                        );
                    }
                    for level in &levels[1..] {
                        design.push(DesignColumn {
                            name: format!("C({c})[T.{}]", value_text(level)),
                            sql: format!("{} = {}", ident(c), value_sql(level)?),
                        });
                    }
                    let listed = levels
                        .iter()
                        .map(value_sql)
                        .collect::<railyard_planner::Result<Vec<_>>>()?
                        .join(", ");
                    rows.push(format!("{} IN ({listed})", ident(c)));
                }
            }
        }
        Ok((design, rows))
    }

    /// The null model's linear predictor g(ȳ) from n and Σy of the complete rows, or the
    /// error that the model cannot be fitted.
    fn null_point(&self, n: f64, sum_y: f64) -> Result<f64> {
        if n == 0.0 {
            return exec_err!("glm: no complete rows");
        }
        let start = self.family.link(sum_y / n);
        if !start.is_finite() {
            return exec_err!(
                "glm: the outcome is constant over the complete rows: the model cannot be fitted"
            );
        }
        Ok(start)
    }

    pub async fn run(&self, rounds: &Rounds) -> Result<RecordBatch> {
        let (design, rows) = self.design(rounds).await?;
        let intercept = self.formula.intercept;
        let q = design.len() + usize::from(intercept);
        let layout = GlmLayout { q };

        // Where Fisher scoring starts, and the null deviance (the intercept-only model at
        // ȳ, over the same rows, with or without an intercept in the model):
        // - binomial and gaussian start at b = 0 (μ = ½, μ = 0). That round also answers n
        //   and Σy, and the null deviance follows from its deviance in closed form
        //   (`null_deviance_from_zero`): one round fewer, and a gaussian model is one round.
        // - poisson starts at the null model's point b = (log ȳ, 0, …, 0): from b = 0 (μ = 1
        //   everywhere) the first step overflows for large counts. ȳ takes a round of its
        //   own; with an intercept, the first iteration's deviance is the null deviance.
        let (mut beta, mut null_deviance, mut first) = match self.family {
            Family::Binomial | Family::Gaussian => {
                let beta = vec![0.0; q];
                let sums = self.terms(rounds, &rows, &design, intercept, &beta).await?;
                let (n, sum_y) = (sums[GlmLayout::N], sums[GlmLayout::SUM_Y]);
                self.null_point(n, sum_y)?;
                let null =
                    null_deviance_from_zero(self.family, sums[GlmLayout::DEVIANCE], n, sum_y);
                (beta, Some(null), Some(sums))
            }
            Family::Poisson => {
                let first = self.terms(rounds, &rows, &[], true, &[0.0]).await?;
                let start = self.null_point(first[GlmLayout::N], first[GlmLayout::SUM_Y])?;
                let null = if intercept {
                    None
                } else {
                    Some(self.terms(rounds, &rows, &[], true, &[start]).await?[GlmLayout::DEVIANCE])
                };
                let mut beta = vec![0.0; q];
                if intercept {
                    beta[0] = start;
                }
                (beta, null, None)
            }
        };
        let mut previous_deviance = f64::INFINITY;
        let mut converged = false;
        let mut iterations = 0;
        let mut sums;
        loop {
            iterations += 1;
            sums = match first.take() {
                Some(sums) => sums,
                None => self.terms(rounds, &rows, &design, intercept, &beta).await?,
            };
            let deviance = sums[GlmLayout::DEVIANCE];
            null_deviance.get_or_insert(deviance);
            let Some(next) = spd_solve(&sums[layout.xtwx()], &sums[layout.xtwz()]) else {
                return exec_err!(
                    "glm: the design is singular or the fit diverged (a covariate is constant \
                     or a combination of others, a level has no rows, or the covariates \
                     separate the outcome perfectly)"
                );
            };
            if matches!(self.family, Family::Gaussian) {
                // The identity link: XᵀWX = XᵀX and XᵀWz = Xᵀy at every point, so this
                // solve is the least-squares fit itself, and its deviance follows from
                // this round's: D(b) = yᵀy − 2bᵀXᵀy + bᵀXᵀXb. One round, not two.
                let (xtx, xty) = (&sums[layout.xtwx()], &sums[layout.xtwz()]);
                let quadratic = |b: &[f64]| -> f64 {
                    (0..q)
                        .map(|i| b[i] * (0..q).map(|j| xtx[i * q + j] * b[j]).sum::<f64>())
                        .sum()
                };
                let linear = |b: &[f64]| -> f64 { b.iter().zip(xty).map(|(b, v)| b * v).sum() };
                let yty = deviance + 2.0 * linear(&beta) - quadratic(&beta);
                let fitted = (yty - 2.0 * linear(&next) + quadratic(&next)).max(0.0);
                sums[GlmLayout::DEVIANCE] = fitted;
                beta = next;
                converged = true;
                break;
            }
            let step_small = next
                .iter()
                .zip(&beta)
                .all(|(b1, b0)| (b1 - b0).abs() <= TOLERANCE * b1.abs().max(1.0));
            let deviance_still =
                (deviance - previous_deviance).abs() <= TOLERANCE * (deviance.abs() + 0.1);
            if step_small || deviance_still {
                converged = true;
                break;
            }
            if iterations >= MAX_ITERATIONS {
                break;
            }
            previous_deviance = deviance;
            beta = next;
        }

        let null_deviance = null_deviance.expect("the first iteration sets it");
        let n = sums[GlmLayout::N];
        let deviance = sums[GlmLayout::DEVIANCE];
        let residual_df = n - q as f64;
        let (log_likelihood, aic) = match self.family {
            Family::Gaussian => {
                let ll = -n / 2.0 * ((2.0 * std::f64::consts::PI * deviance / n).ln() + 1.0);
                (ll, -2.0 * ll + 2.0 * (q as f64 + 1.0))
            }
            _ => {
                let ll = sums[GlmLayout::LOGLIK];
                (ll, -2.0 * ll + 2.0 * q as f64)
            }
        };
        if self.fit_summary {
            return batch(
                self.schema(),
                vec![
                    Arc::new(Int64Array::from(vec![n as i64])),
                    Arc::new(Int64Array::from(vec![iterations as i64])),
                    Arc::new(BooleanArray::from(vec![converged])),
                    Arc::new(Float64Array::from(vec![log_likelihood])),
                    Arc::new(Float64Array::from(vec![deviance])),
                    Arc::new(Float64Array::from(vec![null_deviance])),
                    Arc::new(Float64Array::from(vec![aic])),
                ],
            );
        }
        let Some(inverse) = spd_inverse(&sums[layout.xtwx()], q) else {
            return exec_err!("glm: the information matrix is singular at the estimate");
        };
        let dispersion = match self.family {
            Family::Gaussian => deviance / residual_df,
            _ => 1.0,
        };
        let mut names: Vec<String> = Vec::with_capacity(q);
        if intercept {
            names.push("Intercept".to_string());
        }
        names.extend(design.iter().map(|d| d.name.clone()));
        let mut estimates = Vec::with_capacity(q);
        let mut errors = Vec::with_capacity(q);
        let mut statistics = Vec::with_capacity(q);
        let mut p_values = Vec::with_capacity(q);
        for j in 0..q {
            let se = (dispersion * inverse[(j, j)]).sqrt();
            let statistic = beta[j] / se;
            estimates.push(beta[j]);
            errors.push(se);
            statistics.push(statistic);
            p_values.push(match self.family {
                Family::Gaussian => t_p(statistic, residual_df),
                _ => normal_p(statistic),
            });
        }
        coefficients(names, estimates, errors, statistics, p_values)
    }
}

/// The deviance of the intercept-only model at ȳ = Σy / n, from the deviance `d0` of the
/// same rows at b = 0 (η = 0 on every row):
/// - binomial: D(m) = 2S − 2n(ȳ ln m + (1 − ȳ) ln(1 − m)) with S = Σ y ln y + (1 − y) ln(1 − y),
///   so D(ȳ) = D(½) − 2n ln 2 − 2n(ȳ ln ȳ + (1 − ȳ) ln(1 − ȳ));
/// - gaussian: D(m) = Σ(y − m)², so D(ȳ) = D(0) − (Σy)² / n;
/// - poisson: D(m) = 2Σ(y ln y − y) − 2Σy ln m + 2nm, so D(ȳ) = D(1) − 2n + 2Σy − 2Σy ln ȳ
///   (`GlmJob::run` does not start poisson fits at b = 0; the formula is here for all three).
fn null_deviance_from_zero(family: Family, d0: f64, n: f64, sum_y: f64) -> f64 {
    let mean = sum_y / n;
    let null = match family {
        Family::Binomial => {
            d0 - 2.0 * n * std::f64::consts::LN_2
                - 2.0 * n * (mean * mean.ln() + (1.0 - mean) * (1.0 - mean).ln())
        }
        Family::Gaussian => d0 - sum_y * sum_y / n,
        Family::Poisson => d0 - 2.0 * n + 2.0 * sum_y - 2.0 * sum_y * mean.ln(),
    };
    null.max(0.0)
}

/// `term, estimate, std_error, statistic, p_value`.
pub(crate) fn coefficient_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("term", DataType::Utf8, false),
        Field::new("estimate", DataType::Float64, false),
        Field::new("std_error", DataType::Float64, false),
        Field::new("statistic", DataType::Float64, false),
        Field::new("p_value", DataType::Float64, false),
    ]))
}

pub(crate) fn coefficients(
    names: Vec<String>,
    estimates: Vec<f64>,
    errors: Vec<f64>,
    statistics: Vec<f64>,
    p_values: Vec<f64>,
) -> Result<RecordBatch> {
    batch(
        coefficient_schema(),
        vec![
            Arc::new(StringArray::from(names)),
            Arc::new(Float64Array::from(estimates)),
            Arc::new(Float64Array::from(errors)),
            Arc::new(Float64Array::from(statistics)),
            Arc::new(Float64Array::from(p_values)),
        ],
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The deviance of a constant mean `m`, from each family's definition.
    fn deviance(family: Family, y: &[f64], m: f64) -> f64 {
        let xlogy = |x: f64, r: f64| if x > 0.0 { x * r.ln() } else { 0.0 };
        y.iter()
            .map(|&y| match family {
                Family::Gaussian => (y - m) * (y - m),
                Family::Binomial => 2.0 * (xlogy(y, y / m) + xlogy(1.0 - y, (1.0 - y) / (1.0 - m))),
                Family::Poisson => 2.0 * (xlogy(y, y / m) - (y - m)),
            })
            .sum()
    }

    #[test]
    fn the_null_deviance_follows_from_the_deviance_at_zero() {
        let cases = [
            (
                Family::Binomial,
                0.5,
                vec![0.0, 1.0, 1.0, 0.0, 1.0, 1.0, 0.25, 0.9],
            ),
            (
                Family::Gaussian,
                0.0,
                vec![61.0, 74.5, 58.0, 70.0, 66.25, 80.0],
            ),
            (
                Family::Poisson,
                1.0,
                vec![0.0, 3.0, 12.0, 7.0, 1.0, 40.0, 2.0],
            ),
        ];
        for (family, mean_at_zero, y) in cases {
            let n = y.len() as f64;
            let sum_y: f64 = y.iter().sum();
            let got = null_deviance_from_zero(family, deviance(family, &y, mean_at_zero), n, sum_y);
            let want = deviance(family, &y, sum_y / n);
            assert!(
                (got - want).abs() <= 1e-9 * want.abs().max(1.0),
                "{family:?}: {got} against {want}"
            );
        }
    }
}
