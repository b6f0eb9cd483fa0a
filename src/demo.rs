//! `railyard demo`: a three-hospital federation on synthetic registry data, a handful of
//! realistic questions, each shown with its federated plan and its answer.

use std::io::Write;
use std::path::Path;
use std::time::Instant;

use anyhow::Result;
use arrow::array::{Array, AsArray};
use railyard_engine::HubOptions;
use tokio::net::TcpListener;

use crate::client::{Answer, HubClient};
use crate::local::{Governance, LocalFederation, TableSpec};
use crate::synth;

/// Default number of synthetic patients over all stations.
pub const DEFAULT_PATIENTS: usize = 210_000;

/// The demo's questions: (what a researcher asks, the SQL).
pub const QUERIES: &[(&str, &str)] = &[
    (
        "How many patients does the federation hold, and how old were they at diagnosis?",
        "SELECT count(*) AS patients, round(avg(age), 1) AS mean_age, \
         round(stddev_samp(age), 1) AS sd_age FROM registry",
    ),
    (
        "Case mix by tumour site and sex",
        "SELECT site, sex, count(*) AS patients, round(avg(age), 1) AS mean_age \
         FROM registry GROUP BY site, sex ORDER BY site, sex",
    ),
    (
        "Share of advanced (stage III-IV) tumours by site and period of diagnosis \
         (stations release counts per group; the hub computes the shares)",
        "WITH g AS (SELECT site, CASE WHEN diagnosis_year < 2012 THEN '2000-2011' \
         ELSE '2012-2022' END AS period, stage >= 3 AS advanced, count(*) AS n \
         FROM registry WHERE stage IS NOT NULL AND site IN ('lung', 'colorectal', 'breast') \
         GROUP BY 1, 2, 3) \
         SELECT site, period, sum(n) AS patients, \
         round(100.0 * sum(CASE WHEN advanced THEN n ELSE 0 END) / sum(n), 1) AS pct_advanced \
         FROM g GROUP BY site, period ORDER BY site, period",
    ),
    (
        "Crude 5-year mortality by stage, diagnoses up to 2020",
        "WITH g AS (SELECT stage, vital_status = 'dead' AND survival_days <= 1826 AS died, \
         count(*) AS n, sum(survival_days) AS days FROM registry \
         WHERE diagnosis_date <= DATE '2020-12-31' AND stage IS NOT NULL GROUP BY 1, 2) \
         SELECT stage, sum(n) AS patients, \
         round(100.0 * sum(CASE WHEN died THEN n ELSE 0 END) / sum(n), 1) AS pct_dead_within_5y, \
         round(CAST(sum(days) AS DOUBLE) / sum(n) / 365.25, 2) AS mean_years_followed \
         FROM g GROUP BY stage ORDER BY stage",
    ),
    (
        "Body-mass index by sex (a DECIMAL column, with missing values)",
        "SELECT sex, count(bmi) AS measured, count(*) - count(bmi) AS missing, \
         round(avg(bmi), 2) AS mean_bmi, round(var_samp(bmi), 2) AS var_bmi \
         FROM registry GROUP BY sex ORDER BY sex",
    ),
    (
        "Yearly incidence per site: sites averaging more than 500 cases a year",
        "WITH yearly AS (SELECT site, diagnosis_year, count(*) AS cases FROM registry \
         GROUP BY site, diagnosis_year) \
         SELECT site, min(cases) AS fewest, max(cases) AS most, round(avg(cases), 1) AS mean \
         FROM yearly GROUP BY site HAVING avg(cases) > 500 ORDER BY mean DESC",
    ),
];

/// Questions the stations' default policy refuses: (what is tried, the SQL).
pub const REFUSED: &[(&str, &str)] = &[
    (
        "The youngest patient's exact age (one person's value)",
        "SELECT min(age) FROM registry",
    ),
    (
        "Row-level data",
        "SELECT patient_id, age, site FROM registry LIMIT 5",
    ),
    (
        "One patient singled out by a filter",
        "SELECT count(*), avg(age) FROM registry WHERE patient_id = 1234",
    ),
];

/// Runs the demo, writing everything it shows to `out`.
pub async fn run(patients: usize, data_dir: &Path, out: &mut impl Write) -> Result<()> {
    let dir = tempfile::tempdir()?;
    let started = Instant::now();
    let profiles = synth::default_profiles(patients);
    let registry = synth::write_registry(dir.path(), &profiles, synth::DEFAULT_SEED)?;
    writeln!(
        out,
        "Generated {patients} synthetic patients for {} stations in {:.1?}:",
        profiles.len(),
        started.elapsed()
    )?;
    for p in &profiles {
        writeln!(out, "  {:<10} {:>7} patients", p.name, p.patients)?;
    }
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let federation = LocalFederation::start(
        &[TableSpec {
            name: "registry".into(),
            dir: registry,
        }],
        listener,
        HubOptions::default(),
        &Governance::new(None, data_dir)?,
    )
    .await?;
    writeln!(
        out,
        "Hub listening on {}; stations: {}\n",
        federation.hub_url,
        federation
            .stations
            .iter()
            .map(|s| format!("{} ({})", s.name, s.url))
            .collect::<Vec<_>>()
            .join(", ")
    )?;
    let mut client = HubClient::connect(&federation.hub_url).await?;
    let result = async {
        for (i, (question, sql)) in QUERIES.iter().enumerate() {
            writeln!(out, "── {}. {question}", i + 1)?;
            writeln!(out, "{sql}\n")?;
            let plan = client.query(&format!("EXPLAIN FEDERATED {sql}")).await?;
            write!(out, "{}", format_explain(&plan))?;
            let t = Instant::now();
            let answer = client.query(sql).await?;
            let elapsed = t.elapsed();
            writeln!(out, "{}", answer.to_table()?)?;
            writeln!(
                out,
                "{} rows in {:.1} ms (3 stations, over Flight on loopback)\n",
                answer.num_rows(),
                elapsed.as_secs_f64() * 1000.0
            )?;
        }
        writeln!(
            out,
            "── The stations' default policy: every column 'aggregate', groups of at least 5"
        )?;
        let policies = client
            .query(
                "SELECT station, table_name, min_group_size, count(*) AS columns, \
                 string_agg(DISTINCT visibility, ', ') AS visibilities FROM railyard.policies \
                 GROUP BY 1, 2, 3 ORDER BY 1, 2",
            )
            .await?;
        writeln!(out, "{}\n", policies.to_table()?)?;
        for (what, sql) in REFUSED {
            writeln!(out, "── Refused: {what}")?;
            writeln!(out, "{sql}")?;
            match client.query(sql).await {
                Ok(answer) => anyhow::bail!(
                    "the default policy let through {} rows of: {sql}",
                    answer.num_rows()
                ),
                Err(e) => writeln!(out, "  → {}\n", refusal_text(&e))?,
            }
        }
        writeln!(
            out,
            "Every decision above is in the stations' audit logs: {} \
             (check one with `railyard audit verify PATH`)",
            data_dir.join("<station>").join("audit.jsonl").display()
        )?;
        anyhow::Ok(())
    }
    .await;
    federation.shutdown().await?;
    result
}

/// The message of a refused query, without the client library's wrapping.
fn refusal_text(e: &anyhow::Error) -> String {
    let text = format!("{e:#}");
    match text.find("policy:") {
        Some(at) => text[at..].to_string(),
        None => text,
    }
}

/// Renders an `EXPLAIN FEDERATED` answer compactly: each fragment once, with the stations
/// that run it and what leaves them, then the hub's merge plan.
pub fn format_explain(answer: &Answer) -> String {
    let mut text = String::new();
    let mut fragments: Vec<(String, Vec<String>, String, String)> = Vec::new();
    let mut hub = String::new();
    for batch in &answer.batches {
        let col = |i: usize| batch.column(i).as_string::<i32>().clone();
        let (location, step, plan, releases) = (col(0), col(1), col(2), col(3));
        for r in 0..batch.num_rows() {
            if location.is_null(r) {
                continue;
            }
            if location.value(r) == "hub" {
                hub = plan.value(r).to_string();
                continue;
            }
            match fragments.iter_mut().find(|f| f.0 == step.value(r)) {
                Some(f) => f.1.push(location.value(r).to_string()),
                None => fragments.push((
                    step.value(r).to_string(),
                    vec![location.value(r).to_string()],
                    plan.value(r).to_string(),
                    releases.value(r).to_string(),
                )),
            }
        }
    }
    for (step, stations, sql, releases) in fragments {
        text.push_str(&format!("  {step} at {}:\n", stations.join(", ")));
        text.push_str(&format!("    {sql}\n"));
        text.push_str(&format!("    leaves each station: {releases}\n"));
    }
    text.push_str("  hub merge plan:\n");
    for line in hub.lines() {
        text.push_str(&format!("    {line}\n"));
    }
    text
}
