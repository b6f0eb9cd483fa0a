//! `kaplan_meier`, `logrank`, `cox` and `cox_fit` from per-station event tables.
//!
//! Every station returns, per released time, its rows and deaths (and for Cox the sums of
//! `exp(xᵀb)`-weighted covariates over those rows and deaths); the hub adds the stations'
//! entries of equal times. Risk sets are sums from the latest time down, so the pooled
//! product-limit estimate, the log-rank statistic and the Efron partial likelihood are
//! exactly the centralized ones (on the times the stations' policies release).

use std::sync::Arc;

use arrow::array::{AsArray, Float64Array, Int64Array, RecordBatch, StringArray};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use datafusion::common::{Result, ScalarValue, exec_err, plan_err};
use railyard_udfs::glm_terms::f64_list_type;
use railyard_udfs::glm_terms::list_values;
use railyard_udfs::survival_terms::{
    EventTable, SURVIVAL_TERMS, SurvivalLayout, Time, add_entries,
};

use super::formula::{Formula, Term};
use super::glm::coefficients;
use super::{
    Rounds, Select, Source, batch, chi2_p, float_sql, ident, normal_p, spd_inverse, spd_solve,
    value_text, with_rows,
};

const MAX_ITERATIONS: usize = 50;
const TOLERANCE: f64 = 1e-10;

/// What a survival fragment asks the stations for: the time resolution and pooling rules
/// of the strictest station holding a non-public column among those used.
struct Disclosure {
    resolution: f64,
    min_rows: u64,
    min_events: u64,
}

fn disclosure(source: &Source, columns: &[String], covariates: bool) -> Disclosure {
    let touched = source.touched(columns.iter());
    let mut d = Disclosure {
        resolution: 0.0,
        min_rows: 1,
        min_events: 0,
    };
    for policy in source.table.restricting(&touched) {
        d.resolution = d.resolution.max(policy.survival_time_resolution);
        if policy.survival_time_resolution > 0.0 {
            d.min_rows = d.min_rows.max(policy.min_group_size);
            if covariates {
                d.min_events = d.min_events.max(policy.min_group_size);
            }
        }
    }
    d
}

/// The time and event columns, checked.
fn time_event(source: &Source, time: &str, event: &str) -> Result<(String, String)> {
    source.numeric_column(time, "time column")?;
    source.numeric_column(event, "event column")?;
    Ok((time.to_string(), event.to_string()))
}

/// Runs one survival round and merges the stations' event tables per group (the group is
/// `None` without a group column).
async fn event_tables(
    rounds: &Rounds,
    source: &Source,
    time: &str,
    event: &str,
    group: Option<&str>,
    covariates: &[String],
    beta: &[f64],
) -> Result<Vec<(Option<ScalarValue>, EventTable)>> {
    let mut columns = vec![time.to_string(), event.to_string()];
    columns.extend(group.map(str::to_string));
    columns.extend(covariates.iter().cloned());
    let d = disclosure(source, &columns, !covariates.is_empty());
    let layout = SurvivalLayout {
        p: covariates.len(),
    };
    let mut args = vec![
        ident(time),
        ident(event),
        float_sql(d.resolution),
        d.min_rows.to_string(),
        d.min_events.to_string(),
    ];
    args.extend(covariates.iter().map(|c| ident(c)));
    args.extend(beta.iter().map(|b| float_sql(*b)));
    let terms = (
        format!("{SURVIVAL_TERMS}({})", args.join(", ")),
        "terms".to_string(),
    );
    let mut fields = Vec::new();
    let mut select = Select {
        items: Vec::new(),
        filters: source.filters(columns.iter()),
        group_by: Vec::new(),
    };
    if let Some(g) = group {
        fields.push(Field::new("grp", source.column_type(g)?, true));
        select.items.push((ident(g), "grp".to_string()));
        select.group_by.push(ident(g));
    }
    select.items.push(terms);
    fields.push(Field::new("terms", f64_list_type(), true));
    let answers = rounds.run(select, with_rows(fields)).await?;
    let mut tables: Vec<(Option<ScalarValue>, EventTable)> = Vec::new();
    for batch in answers.iter().flatten() {
        let list_column = batch.num_columns() - 2;
        let list = batch.column(list_column).as_list::<i32>();
        for row in 0..batch.num_rows() {
            let key = match group {
                Some(_) => Some(ScalarValue::try_from_array(batch.column(0), row)?),
                None => None,
            };
            let Some(values) = list_values(list, row) else {
                continue;
            };
            let at = match tables.iter().position(|(k, _)| *k == key) {
                Some(at) => at,
                None => {
                    tables.push((key, EventTable::new()));
                    tables.len() - 1
                }
            };
            add_entries(&mut tables[at].1, &values, layout)?;
        }
    }
    tables.sort_by(|a, b| a.0.partial_cmp(&b.0).unwrap_or(std::cmp::Ordering::Equal));
    Ok(tables)
}

#[derive(Debug, Clone)]
pub(crate) struct KmJob {
    pub source: Source,
    time: String,
    event: String,
    group: Option<String>,
}

impl KmJob {
    pub fn new(source: Source, time: &str, event: &str, group: Option<String>) -> Result<Self> {
        let (time, event) = time_event(&source, time, event)?;
        if let Some(g) = &group {
            source.column_type(g)?;
        }
        Ok(Self {
            source,
            time,
            event,
            group,
        })
    }

    pub fn km_schema(&self) -> SchemaRef {
        let mut fields = Vec::new();
        if self.group.is_some() {
            fields.push(Field::new("group", DataType::Utf8, false));
        }
        fields.extend([
            Field::new("time", DataType::Float64, false),
            Field::new("at_risk", DataType::Int64, false),
            Field::new("events", DataType::Int64, false),
            Field::new("censored", DataType::Int64, false),
            Field::new("survival", DataType::Float64, false),
            Field::new("std_error", DataType::Float64, true),
        ]);
        Arc::new(Schema::new(fields))
    }

    async fn tables(&self, rounds: &Rounds) -> Result<Vec<(Option<ScalarValue>, EventTable)>> {
        let tables = event_tables(
            rounds,
            &self.source,
            &self.time,
            &self.event,
            self.group.as_deref(),
            &[],
            &[],
        )
        .await?;
        if tables.is_empty() {
            return exec_err!(
                "{}: no complete rows",
                if self.group.is_some() {
                    "survival by group"
                } else {
                    "kaplan_meier"
                }
            );
        }
        Ok(tables)
    }

    pub async fn run_km(&self, rounds: &Rounds) -> Result<RecordBatch> {
        let tables = self.tables(rounds).await?;
        let (mut group, mut time, mut at_risk, mut events, mut censored, mut survival, mut se) =
            (vec![], vec![], vec![], vec![], vec![], vec![], vec![]);
        for (key, table) in &tables {
            let mut risk: f64 = table.values().map(|v| v[SurvivalLayout::ROWS]).sum();
            let (mut s, mut greenwood) = (1.0f64, 0.0f64);
            for (t, v) in table {
                let (rows, d) = (v[SurvivalLayout::ROWS], v[SurvivalLayout::EVENTS]);
                if d > 0.0 {
                    s *= 1.0 - d / risk;
                    greenwood += if risk > d {
                        d / (risk * (risk - d))
                    } else {
                        f64::INFINITY
                    };
                }
                if let Some(k) = key {
                    group.push(value_text(k));
                }
                time.push(t.0);
                at_risk.push(risk as i64);
                events.push(d as i64);
                censored.push((rows - d) as i64);
                survival.push(s);
                se.push((s > 0.0 && greenwood.is_finite()).then(|| s * greenwood.sqrt()));
                risk -= rows;
            }
        }
        let mut columns: Vec<arrow::array::ArrayRef> = Vec::new();
        if self.group.is_some() {
            columns.push(Arc::new(StringArray::from(group)));
        }
        columns.extend([
            Arc::new(Float64Array::from(time)) as _,
            Arc::new(Int64Array::from(at_risk)) as _,
            Arc::new(Int64Array::from(events)) as _,
            Arc::new(Int64Array::from(censored)) as _,
            Arc::new(Float64Array::from(survival)) as _,
            Arc::new(Float64Array::from(se)) as _,
        ]);
        batch(self.km_schema(), columns)
    }

    pub async fn run_logrank(&self, rounds: &Rounds) -> Result<RecordBatch> {
        let tables: Vec<EventTable> = self
            .tables(rounds)
            .await?
            .into_iter()
            .map(|(_, t)| t)
            .collect();
        let g = tables.len();
        if g < 2 {
            return exec_err!("logrank: needs at least two groups with enough rows; found {g}");
        }
        let mut risk: Vec<f64> = tables
            .iter()
            .map(|t| t.values().map(|v| v[SurvivalLayout::ROWS]).sum())
            .collect();
        let mut times: Vec<Time> = tables.iter().flat_map(|t| t.keys().copied()).collect();
        times.sort();
        times.dedup();
        let (mut observed, mut expected) = (vec![0.0; g], vec![0.0; g]);
        let mut variance = vec![0.0; g * g];
        for t in times {
            let entry = |i: usize| tables[i].get(&t);
            let deaths: Vec<f64> = (0..g)
                .map(|i| entry(i).map_or(0.0, |v| v[SurvivalLayout::EVENTS]))
                .collect();
            let (n, d): (f64, f64) = (risk.iter().sum(), deaths.iter().sum());
            if d > 0.0 && n > 0.0 {
                for i in 0..g {
                    observed[i] += deaths[i];
                    expected[i] += d * risk[i] / n;
                    if n > 1.0 {
                        for j in 0..g {
                            let kronecker = if i == j { 1.0 } else { 0.0 };
                            variance[i * g + j] +=
                                d * (risk[i] / n) * (kronecker - risk[j] / n) * (n - d) / (n - 1.0);
                        }
                    }
                }
            }
            for (i, r) in risk.iter_mut().enumerate() {
                *r -= entry(i).map_or(0.0, |v| v[SurvivalLayout::ROWS]);
            }
        }
        // Drop the last group: the full covariance is singular (rows sum to zero).
        let m = g - 1;
        let reduced: Vec<f64> = (0..m)
            .flat_map(|i| (0..m).map(move |j| (i, j)))
            .map(|(i, j)| variance[i * g + j])
            .collect();
        let difference: Vec<f64> = (0..m).map(|i| observed[i] - expected[i]).collect();
        let Some(solved) = spd_solve(&reduced, &difference) else {
            return exec_err!("logrank: the variance is singular (a group has no deaths at risk)");
        };
        let chi_square: f64 = difference.iter().zip(&solved).map(|(a, b)| a * b).sum();
        batch(
            logrank_schema(),
            vec![
                Arc::new(Float64Array::from(vec![chi_square])),
                Arc::new(Int64Array::from(vec![m as i64])),
                Arc::new(Float64Array::from(vec![chi2_p(chi_square, m as f64)])),
            ],
        )
    }
}

pub(crate) fn logrank_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("chi_square", DataType::Float64, false),
        Field::new("df", DataType::Int64, false),
        Field::new("p_value", DataType::Float64, false),
    ]))
}

#[derive(Debug, Clone)]
pub(crate) struct CoxJob {
    pub source: Source,
    time: String,
    event: String,
    covariates: Vec<String>,
    fit_summary: bool,
}

/// The Efron partial log-likelihood, its gradient and information at one point.
struct Efron {
    log_likelihood: f64,
    gradient: Vec<f64>,
    information: Vec<f64>,
    rows: f64,
    events: f64,
}

fn efron(table: &EventTable, p: usize, beta: &[f64]) -> Efron {
    let layout = SurvivalLayout { p };
    let (rb, db, dx) = (layout.rows_block(), layout.deaths_block(), layout.death_x());
    let mut out = Efron {
        log_likelihood: 0.0,
        gradient: vec![0.0; p],
        information: vec![0.0; p * p],
        rows: 0.0,
        events: 0.0,
    };
    // Risk-set sums over rows with time ≥ t, built from the latest time down.
    let mut r0 = 0.0;
    let mut r1 = vec![0.0; p];
    let mut r2 = vec![0.0; p * p];
    for v in table.values().rev() {
        r0 += v[rb];
        for j in 0..p {
            r1[j] += v[rb + 1 + j];
        }
        for jk in 0..p * p {
            r2[jk] += v[rb + 1 + p + jk];
        }
        out.rows += v[SurvivalLayout::ROWS];
        let d = v[SurvivalLayout::EVENTS];
        if d == 0.0 {
            continue;
        }
        out.events += d;
        for j in 0..p {
            out.log_likelihood += v[dx + j] * beta[j];
            out.gradient[j] += v[dx + j];
        }
        let deaths = d.round() as usize;
        for l in 0..deaths {
            let f = l as f64 / d;
            let phi = r0 - f * v[db];
            let a: Vec<f64> = (0..p).map(|j| r1[j] - f * v[db + 1 + j]).collect();
            out.log_likelihood -= phi.ln();
            for j in 0..p {
                out.gradient[j] -= a[j] / phi;
                for k in 0..p {
                    let b = r2[j * p + k] - f * v[db + 1 + p + j * p + k];
                    out.information[j * p + k] += b / phi - a[j] * a[k] / (phi * phi);
                }
            }
        }
    }
    out
}

impl CoxJob {
    pub fn new(
        source: Source,
        time: &str,
        event: &str,
        covariates: &str,
        fit_summary: bool,
    ) -> Result<Self> {
        let (time, event) = time_event(&source, time, event)?;
        let formula = Formula::parse_covariates(covariates)?;
        let mut columns = Vec::new();
        for term in formula.terms {
            match term {
                Term::Numeric(c) => {
                    source.numeric_column(&c, "covariate")?;
                    columns.push(c);
                }
                Term::Categorical(c) => {
                    return plan_err!(
                        "cox: C({c}) is not supported; code the levels as numeric indicator \
                         columns"
                    );
                }
            }
        }
        Ok(Self {
            source,
            time,
            event,
            covariates: columns,
            fit_summary,
        })
    }

    pub fn schema(&self) -> SchemaRef {
        if self.fit_summary {
            Arc::new(Schema::new(vec![
                Field::new("n", DataType::Int64, false),
                Field::new("events", DataType::Int64, false),
                Field::new("iterations", DataType::Int64, false),
                Field::new("log_likelihood", DataType::Float64, false),
            ]))
        } else {
            super::glm::coefficient_schema()
        }
    }

    pub async fn run(&self, rounds: &Rounds) -> Result<RecordBatch> {
        let p = self.covariates.len();
        let mut beta = vec![0.0; p];
        let mut previous: Option<(Vec<f64>, f64)> = None;
        let mut iterations = 0;
        let fit = loop {
            iterations += 1;
            let tables = event_tables(
                rounds,
                &self.source,
                &self.time,
                &self.event,
                None,
                &self.covariates,
                &beta,
            )
            .await?;
            let Some((_, table)) = tables.first() else {
                return exec_err!("cox: no complete rows");
            };
            let fit = efron(table, p, &beta);
            if fit.events == 0.0 {
                return exec_err!("cox: no deaths among the complete rows");
            }
            // Step halving, as R's coxph: a step that lowered the likelihood is retried
            // half as long.
            if let Some((before, ll)) = &previous
                && fit.log_likelihood < *ll - TOLERANCE * ll.abs()
                && iterations < MAX_ITERATIONS
            {
                beta = beta
                    .iter()
                    .zip(before)
                    .map(|(b, a)| (b + a) / 2.0)
                    .collect();
                continue;
            }
            let Some(step) = spd_solve(&fit.information, &fit.gradient) else {
                return exec_err!(
                    "cox: the information matrix is singular (a covariate is constant or a \
                     combination of others)"
                );
            };
            let step_small = step
                .iter()
                .zip(&beta)
                .all(|(s, b)| s.abs() <= TOLERANCE * b.abs().max(1.0));
            let likelihood_still = previous.as_ref().is_some_and(|(_, ll)| {
                (fit.log_likelihood - ll).abs()
                    <= TOLERANCE * 1e-2 * (fit.log_likelihood.abs() + 1.0)
            });
            if step_small || likelihood_still || iterations >= MAX_ITERATIONS {
                break fit;
            }
            previous = Some((beta.clone(), fit.log_likelihood));
            beta = beta.iter().zip(&step).map(|(b, s)| b + s).collect();
        };
        if self.fit_summary {
            return batch(
                self.schema(),
                vec![
                    Arc::new(Int64Array::from(vec![fit.rows as i64])),
                    Arc::new(Int64Array::from(vec![fit.events as i64])),
                    Arc::new(Int64Array::from(vec![iterations as i64])),
                    Arc::new(Float64Array::from(vec![fit.log_likelihood])),
                ],
            );
        }
        let Some(inverse) = spd_inverse(&fit.information, p) else {
            return exec_err!("cox: the information matrix is singular at the estimate");
        };
        let mut errors = Vec::with_capacity(p);
        let mut statistics = Vec::with_capacity(p);
        let mut p_values = Vec::with_capacity(p);
        for j in 0..p {
            let se = inverse[(j, j)].sqrt();
            errors.push(se);
            statistics.push(beta[j] / se);
            p_values.push(normal_p(beta[j] / se));
        }
        coefficients(self.covariates.clone(), beta, errors, statistics, p_values)
    }
}
