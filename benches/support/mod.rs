//! What the benches share: their settings, three loopback lung stations, timing one query
//! through the Flight SQL client, and printing times as ratios to a baseline.
//!
//! Every bench compiles this module on its own and uses a part of it.
#![allow(dead_code)]

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Result;
use railyard::client::HubClient;
use railyard::local::{Governance, LocalFederation, TableSpec};
use railyard_engine::HubOptions;
use tokio::net::TcpListener;

/// Timed runs per query: `RAILYARD_BENCH_RUNS`, or `default`.
pub fn runs(default: usize) -> usize {
    std::env::var("RAILYARD_BENCH_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// The lung stations of `tests/data` (CSV) and a hub on loopback, under `governance`.
pub async fn lung_federation(governance: &Governance) -> Result<LocalFederation> {
    let data = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data");
    LocalFederation::start(
        &[TableSpec {
            name: "lung".into(),
            dir: data.join("lung/horizontal/csv"),
            key: None,
        }],
        TcpListener::bind("127.0.0.1:0").await?,
        HubOptions::default(),
        governance,
    )
    .await
}

/// Prints one line per (label, time): milliseconds and the ratio to `baseline`.
pub fn print_ratios(baseline: Duration, rows: &[(&str, Duration)]) {
    let width = rows
        .iter()
        .map(|(l, _)| l.chars().count())
        .max()
        .unwrap_or(0);
    println!("{:<width$} {:>10} {:>12}", "", "ms", "x baseline");
    for (label, d) in rows {
        println!(
            "{label:<width$} {:>10.3} {:>12.3}",
            ms(*d),
            d.as_secs_f64() / baseline.as_secs_f64()
        );
    }
}

pub fn median(mut samples: Vec<Duration>) -> Duration {
    samples.sort();
    samples[samples.len() / 2]
}

pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Runs `sql` `warmup` times untimed, then `runs` times; returns the median time.
pub async fn time_query(
    client: &mut HubClient,
    sql: &str,
    warmup: usize,
    runs: usize,
) -> Result<Duration> {
    for _ in 0..warmup {
        client.query(sql).await?;
    }
    let mut samples = Vec::with_capacity(runs);
    for _ in 0..runs {
        let t = Instant::now();
        client.query(sql).await?;
        samples.push(t.elapsed());
    }
    Ok(median(samples))
}
