//! `glm(table, formula, family [, filter])` and `glm_fit(…)`: Fisher scoring over federated
//! rounds.
//!
//! ```text
//!   round 1   model terms at the start b_1         → n, Σy, XᵀWX, XᵀWz, deviance at b_1
//!   rounds 2… model terms at b_k                   → XᵀWX, XᵀWz, deviance at b_k
//!             b_{k+1} = (XᵀWX)⁻¹ XᵀWz  (Cholesky)
//! ```
//!
//! Binomial and gaussian fits start at b = 0, whose round also gives the null deviance in
//! closed form; a binomial fit with an intercept asks its second round at Fisher's
//! discriminant, computed from the first round's sums, and goes on from there unless its
//! deviance is no better than b = 0's (then from the Newton step from 0). Poisson fits
//! first ask ȳ (and, without an intercept, the null deviance) in rounds of their own.
//!
//! Converged when the Newton step from b_k is negligible (1e-8 relative): the estimates are
//! its end b_{k+1} (accurate to about the step squared), the deviance moves there by the
//! round's quadratic model, and the standard errors are the round's (within the step,
//! relative). Or when the deviance stops changing (the steps still large): then everything
//! is b_k's. A gaussian model (identity link) needs round 1 only: its solve is exact, and
//! the deviance at the solution follows from round 1's sums.

use std::sync::Arc;

use arrow::array::{Array, AsArray, RecordBatch};
use arrow::array::{BooleanArray, Float64Array, Int64Array, StringArray};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use datafusion::common::{DataFusionError, Result, exec_err, plan_err};
use railyard_udfs::glm_terms::{
    Family, GLM_TERMS, GlmLayout, add_terms, f64_list_type, list_values,
};

use super::formula::{Formula, Term};
use super::{
    Rounds, Select, Source, batch, float_sql, ident, levels, normal_p, spd_inverse, spd_solve, t_p,
    value_sql, value_text, with_rows,
};
use crate::error::{StationFailure, station_failure};

const MAX_ITERATIONS: usize = 50;
/// Relative size of a Newton step taken as convergence: the estimate is the step's end,
/// accurate to about its square.
const STEP_TOLERANCE: f64 = 1e-8;
/// Relative change of the deviance between rounds taken as convergence (where the steps
/// stay large, as on the way to a separated outcome).
const DEVIANCE_TOLERANCE: f64 = 1e-10;

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

    /// One round: the summed `glm_terms` of every station for `design` at `beta`, to be
    /// checked with [`Self::valid`] before use.
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
        Ok(sums)
    }

    /// The error for summed terms that counted rows the family cannot use.
    fn valid(&self, sums: Vec<f64>) -> Result<Vec<f64>> {
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
        let mut rows = self.source.filters(complete.iter());
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
                let sums =
                    self.valid(self.terms(rounds, &rows, &design, intercept, &beta).await?)?;
                let (n, sum_y) = (sums[GlmLayout::N], sums[GlmLayout::SUM_Y]);
                self.null_point(n, sum_y)?;
                let null =
                    null_deviance_from_zero(self.family, sums[GlmLayout::DEVIANCE], n, sum_y);
                (beta, Some(null), Some(sums))
            }
            Family::Poisson => {
                let first = self.valid(self.terms(rounds, &rows, &[], true, &[0.0]).await?)?;
                let start = self.null_point(first[GlmLayout::N], first[GlmLayout::SUM_Y])?;
                let null = if intercept {
                    None
                } else {
                    Some(
                        self.valid(self.terms(rounds, &rows, &[], true, &[start]).await?)?
                            [GlmLayout::DEVIANCE],
                    )
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
                None => self.valid(self.terms(rounds, &rows, &design, intercept, &beta).await?)?,
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
                let linear = |b: &[f64]| -> f64 { b.iter().zip(xty).map(|(b, v)| b * v).sum() };
                let yty = deviance + 2.0 * linear(&beta) - quadratic_form(xtx, &beta);
                let fitted = (yty - 2.0 * linear(&next) + quadratic_form(xtx, &next)).max(0.0);
                sums[GlmLayout::DEVIANCE] = fitted;
                beta = next;
                converged = true;
                break;
            }
            let step_small = next
                .iter()
                .zip(&beta)
                .all(|(b1, b0)| (b1 - b0).abs() <= STEP_TOLERANCE * b1.abs().max(1.0));
            if step_small {
                // The estimate is the step's end b' = b + δ, as R and statsmodels report it
                // (its error is of the order of |δ|², far below the step), and the deviance
                // and log-likelihood move there by this round's quadratic model: for a
                // canonical link XᵀWz − XᵀWX·b is the score, so D(b') = D(b) − δᵀ·XᵀWX·δ
                // up to |δ|³. The standard errors stay this round's, within |δ| relative.
                let step: Vec<f64> = next.iter().zip(&beta).map(|(b1, b0)| b1 - b0).collect();
                let curvature = quadratic_form(&sums[layout.xtwx()], &step);
                sums[GlmLayout::DEVIANCE] = (deviance - curvature).max(0.0);
                sums[GlmLayout::LOGLIK] += curvature / 2.0;
                beta = next;
                converged = true;
                break;
            }
            let deviance_still =
                (deviance - previous_deviance).abs() <= DEVIANCE_TOLERANCE * (deviance.abs() + 0.1);
            if deviance_still {
                converged = true;
                break;
            }
            if iterations >= MAX_ITERATIONS {
                break;
            }
            previous_deviance = deviance;
            // A binomial model with an intercept asks its second round at Fisher's
            // discriminant (from the sums at b = 0) instead of the Newton step from 0: near
            // the estimate where the covariates are roughly normal within each outcome. If
            // its deviance is not below b = 0's (covariates far from normal), or a station
            // refuses it, the fit goes on from the Newton step: one round more.
            if iterations == 1
                && matches!(self.family, Family::Binomial)
                && intercept
                && let Some(start) = discriminant_start(&sums, layout)
            {
                match self.terms(rounds, &rows, &design, intercept, &start).await {
                    Ok(at_start)
                        if at_start[GlmLayout::INVALID] == 0.0
                            && at_start[GlmLayout::DEVIANCE] < deviance =>
                    {
                        (beta, first) = (start, Some(at_start));
                        continue;
                    }
                    Ok(_) => tracing::debug!("glm: the discriminant start is no better than 0"),
                    Err(e) if refused(&e) => {
                        tracing::debug!("glm: a station refused the discriminant start: {e}")
                    }
                    // A station that failed or did not answer would not answer the Newton
                    // step either: the fit fails now rather than after a second timeout.
                    Err(e) => return Err(e),
                }
            }
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

/// Whether `e` is a station's refusal under its policy, as opposed to a station that
/// failed or did not answer.
fn refused(e: &DataFusionError) -> bool {
    matches!(station_failure(e), Some(StationFailure::Refused { .. }))
}

/// `vᵀ·M·v` for the row-major square matrix `m`.
fn quadratic_form(m: &[f64], v: &[f64]) -> f64 {
    let q = v.len();
    (0..q)
        .map(|i| v[i] * (0..q).map(|j| m[i * q + j] * v[j]).sum::<f64>())
        .sum()
}

/// Fisher's linear discriminant as coefficients of a binomial model with an intercept (the
/// intercept first), from the summed terms at b = 0 — a start near the estimate when the
/// covariates are roughly normal within each outcome (Efron 1975). At b = 0 every weight
/// is ¼ and every mean ½, so XᵀX = 4·XᵀWX and Xᵀy = XᵀWz + ½·Xᵀ1, with Xᵀ1 the intercept's
/// column of XᵀX. With n₁ = Σy, n₀ = n − n₁, the outcome means m₁ = Σyx/n₁ and
/// m₀ = Σ(1 − y)x/n₀ and S = (XᵀX − n₁m₁m₁ᵀ − n₀m₀m₀ᵀ)/(n − 2) over the covariates:
/// slopes S⁻¹(m₁ − m₀), intercept ln(n₁/n₀) − ½(m₁ + m₀)ᵀ·slopes. None where S is not
/// positive definite or an outcome has no weight.
fn discriminant_start(sums: &[f64], layout: GlmLayout) -> Option<Vec<f64>> {
    let q = layout.q;
    let (n, n1) = (sums[GlmLayout::N], sums[GlmLayout::SUM_Y]);
    let n0 = n - n1;
    if q < 2 || n1 <= 0.0 || n0 <= 0.0 || n <= 2.0 {
        return None;
    }
    let xtwx = &sums[layout.xtwx()];
    let xtwz = &sums[layout.xtwz()];
    let xtx = |i: usize, j: usize| 4.0 * xtwx[i * q + j];
    let p = q - 1;
    let sum1: Vec<f64> = (1..q).map(|j| xtwz[j] + 0.5 * xtx(j, 0)).collect();
    let m1: Vec<f64> = sum1.iter().map(|s| s / n1).collect();
    let m0: Vec<f64> = (1..q).map(|j| (xtx(j, 0) - sum1[j - 1]) / n0).collect();
    let mut within = vec![0.0; p * p];
    for j in 0..p {
        for k in 0..p {
            within[j * p + k] =
                (xtx(j + 1, k + 1) - n1 * m1[j] * m1[k] - n0 * m0[j] * m0[k]) / (n - 2.0);
        }
    }
    let difference: Vec<f64> = m1.iter().zip(&m0).map(|(a, b)| a - b).collect();
    let slopes = spd_solve(&within, &difference)?;
    let centre: f64 = (0..p).map(|j| (m1[j] + m0[j]) / 2.0 * slopes[j]).sum();
    let mut start = Vec::with_capacity(q);
    start.push((n1 / n0).ln() - centre);
    start.extend(slopes);
    start.iter().all(|b| b.is_finite()).then_some(start)
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

    /// Fisher's discriminant from the sums a round at b = 0 answers equals the one computed
    /// from each outcome's rows apart (means per outcome, pooled within-outcome covariance).
    #[test]
    fn the_discriminant_start_equals_the_discriminant_of_the_rows() {
        let rows: [(f64, [f64; 2]); 9] = [
            (1.0, [14.2, 20.1]),
            (0.0, [11.0, 17.5]),
            (1.0, [17.9, 23.0]),
            (0.0, [12.4, 15.2]),
            (1.0, [15.5, 18.8]),
            (0.0, [10.1, 19.9]),
            (0.0, [13.3, 14.1]),
            (1.0, [16.0, 25.4]),
            (0.0, [11.7, 16.6]),
        ];
        // The sums glm_terms answers at b = 0 with an intercept: W = ¼, Wη + y − μ = y − ½.
        let layout = GlmLayout { q: 3 };
        let mut sums = vec![0.0; layout.len()];
        for (y, x) in &rows {
            let design = [1.0, x[0], x[1]];
            sums[GlmLayout::N] += 1.0;
            sums[GlmLayout::SUM_Y] += y;
            for j in 0..3 {
                sums[layout.xtwz().start + j] += design[j] * (y - 0.5);
                for k in 0..3 {
                    sums[layout.xtwx().start + j * 3 + k] += 0.25 * design[j] * design[k];
                }
            }
        }
        let got = discriminant_start(&sums, layout).expect("a discriminant");

        let group = |outcome: f64| -> Vec<[f64; 2]> {
            rows.iter()
                .filter(|(y, _)| *y == outcome)
                .map(|(_, x)| *x)
                .collect()
        };
        let (ones, zeros) = (group(1.0), group(0.0));
        let mean = |g: &[[f64; 2]], j: usize| g.iter().map(|x| x[j]).sum::<f64>() / g.len() as f64;
        let (m1, m0) = (
            [mean(&ones, 0), mean(&ones, 1)],
            [mean(&zeros, 0), mean(&zeros, 1)],
        );
        let mut s = [[0.0; 2]; 2];
        for (g, m) in [(&ones, m1), (&zeros, m0)] {
            for x in g.iter() {
                for j in 0..2 {
                    for k in 0..2 {
                        s[j][k] += (x[j] - m[j]) * (x[k] - m[k]);
                    }
                }
            }
        }
        let df = rows.len() as f64 - 2.0;
        let (a, b, d) = (s[0][0] / df, s[0][1] / df, s[1][1] / df);
        let det = a * d - b * b;
        let (u, v) = (m1[0] - m0[0], m1[1] - m0[1]);
        let slopes = [(d * u - b * v) / det, (a * v - b * u) / det];
        let intercept = (ones.len() as f64 / zeros.len() as f64).ln()
            - (m1[0] + m0[0]) / 2.0 * slopes[0]
            - (m1[1] + m0[1]) / 2.0 * slopes[1];
        let want = [intercept, slopes[0], slopes[1]];
        for (g, w) in got.iter().zip(want) {
            assert!(
                (g - w).abs() <= 1e-9 * w.abs().max(1.0),
                "{got:?} against {want:?}"
            );
        }
        // Without both outcomes there is no discriminant.
        let mut all_ones = sums.clone();
        all_ones[GlmLayout::SUM_Y] = all_ones[GlmLayout::N];
        assert!(discriminant_start(&all_ones, layout).is_none());
    }
}
