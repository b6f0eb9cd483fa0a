//! The cost of the federated statistics, in round trips.
//!
//! `cargo bench --bench statistics` starts three loopback stations over the lung and breast
//! cancer data, the latter also split vertically (the stations' default policy), and times,
//! through the Flight SQL client, one small aggregate (one round trip per station: the
//! baseline) and each statistics call. It prints each call's median time, its ratio to the
//! baseline, and how many rounds it ran (the fragments the first station's audit log
//! recorded for one call). For the vertical table that count is how often station_a
//! released its pseudonymized rows: the model's rounds run at the hub's join station, which
//! keeps the joined rows for the rest of the call. A SQL query also sends every station a
//! `check` before running; the statistics' rounds are checked as they run.
//!
//! Environment: `RAILYARD_BENCH_RUNS` (timed runs per call, default 50).

#![allow(clippy::unwrap_used)] // a test or benchmark that cannot unwrap has failed

mod support;

use std::path::PathBuf;

use anyhow::Result;
use railyard::client::HubClient;
use railyard::local::{Governance, LocalFederation, TableSpec};
use railyard_engine::HubOptions;
use tokio::net::TcpListener;

use support::{ms, time_query};

const BASELINE: &str = "SELECT sex, count(*), avg(age) FROM lung GROUP BY sex";

const CALLS: &[(&str, &str)] = &[
    (
        "binomial GLM, breast cancer",
        "SELECT * FROM glm('breast_cancer', 'diagnosis ~ mean_radius + mean_texture', 'binomial')",
    ),
    (
        "gaussian GLM, breast cancer",
        "SELECT * FROM glm('breast_cancer', 'mean_area ~ mean_radius + mean_texture', 'gaussian')",
    ),
    (
        "Kaplan–Meier by sex, lung",
        "SELECT * FROM kaplan_meier('lung', 'time', 'status', 'sex')",
    ),
    (
        "Cox age + sex, lung",
        "SELECT * FROM cox('lung', 'time', 'status', 'age + sex')",
    ),
    (
        "crosstab, lung",
        "SELECT * FROM crosstab('lung', 'sex', 'ph_ecog')",
    ),
    (
        "grouped aggregate, horizontal",
        "SELECT diagnosis, count(*), avg(worst_area) FROM breast_cancer GROUP BY diagnosis",
    ),
    (
        "the same, vertical (3 members)",
        "SELECT diagnosis, count(*), avg(worst_area) FROM breast_vertical GROUP BY diagnosis",
    ),
    (
        "binomial GLM, vertical",
        "SELECT * FROM glm('breast_vertical', 'diagnosis ~ mean_radius + mean_texture', 'binomial')",
    ),
    (
        "GLM, covariates at 3 stations",
        "SELECT * FROM glm('breast_vertical', \
         'diagnosis ~ mean_radius + radius_error + worst_texture', 'binomial')",
    ),
];

/// Lines in station_a's audit log.
fn audited(data_dir: &std::path::Path) -> usize {
    std::fs::read_to_string(data_dir.join("station_a").join("audit.jsonl"))
        .map(|t| t.lines().count())
        .unwrap_or(0)
}

#[tokio::main]
async fn main() -> Result<()> {
    let runs = support::runs(50);
    let data = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data");
    let dir = tempfile::tempdir()?;
    let governance = Governance::new(None, dir.path())?;
    let federation = LocalFederation::start(
        &[
            TableSpec {
                name: "lung".into(),
                dir: data.join("lung/horizontal/csv"),
                key: None,
            },
            TableSpec {
                name: "breast_cancer".into(),
                dir: data.join("breast_cancer/horizontal/parquet"),
                key: None,
            },
            TableSpec {
                name: "breast_vertical".into(),
                dir: data.join("breast_cancer/vertical/parquet"),
                key: Some("patient_id".into()),
            },
        ],
        TcpListener::bind("127.0.0.1:0").await?,
        HubOptions::default(),
        &governance,
    )
    .await?;
    let mut client = HubClient::connect(&federation.hub_url).await?;
    let mut time = async |sql: &str| time_query(&mut client, sql, 5, runs).await;
    let baseline = time(BASELINE).await?;
    println!("three loopback stations, default policy, median of {runs} runs through Flight SQL\n");
    println!(
        "{:<32} {:>10} {:>12} {:>8}",
        "call", "ms", "x baseline", "rounds"
    );
    println!(
        "{:<32} {:>10.2} {:>12.2} {:>8}",
        "baseline: one grouped aggregate",
        ms(baseline),
        1.0,
        1
    );
    for (label, sql) in CALLS {
        let before = audited(dir.path());
        let elapsed = time(sql).await?;
        let rounds = (audited(dir.path()) - before) / (runs + 5);
        println!(
            "{label:<32} {:>10.2} {:>12.2} {:>8}",
            ms(elapsed),
            elapsed.as_secs_f64() / baseline.as_secs_f64(),
            rounds
        );
    }
    federation.shutdown().await?;
    Ok(())
}
