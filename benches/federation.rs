//! Federated vs centralized, in one process, on the same files.
//!
//! `cargo bench --bench federation` generates the synthetic registry (1M patients per
//! station by default) and TPC-H `lineitem` at SF1 split over three stations, then times
//! each query on a single DataFusion session over all the files (the centralized baseline)
//! and on the federation (three stations + hub on loopback, queried through the Flight SQL
//! client), and prints the median times and their ratio. It ends with the latency of a small
//! aggregate over three stations, end to end through Flight SQL.
//!
//! Environment: `RAILYARD_BENCH_ROWS` (registry patients per station, default 1000000),
//! `RAILYARD_BENCH_SF` (TPC-H scale, default 1), `RAILYARD_BENCH_RUNS` (timed runs per query,
//! default 7), `RAILYARD_BENCH_DIR` (reuse generated data from this directory).

#![allow(clippy::unwrap_used)] // a test or benchmark that cannot unwrap has failed

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Result;
use datafusion::prelude::{ParquetReadOptions, SessionContext};
use railyard::client::HubClient;
use railyard::local::{Governance, LocalFederation, TableSpec};
use railyard::synth::{StationProfile, default_profiles, write_registry};
use railyard_engine::HubOptions;
use tokio::net::TcpListener;

const QUERIES: &[(&str, &str)] = &[
    (
        "TPC-H Q1",
        "select l_returnflag, l_linestatus, sum(l_quantity) as sum_qty, \
         sum(l_extendedprice) as sum_base_price, \
         sum(l_extendedprice * (1 - l_discount)) as sum_disc_price, \
         sum(l_extendedprice * (1 - l_discount) * (1 + l_tax)) as sum_charge, \
         avg(l_quantity) as avg_qty, avg(l_extendedprice) as avg_price, \
         avg(l_discount) as avg_disc, count(*) as count_order \
         from lineitem where l_shipdate <= date '1998-12-01' - interval '90' day \
         group by l_returnflag, l_linestatus order by l_returnflag, l_linestatus",
    ),
    (
        "TPC-H Q6",
        "select sum(l_extendedprice * l_discount) as revenue from lineitem \
         where l_shipdate >= date '1994-01-01' \
         and l_shipdate < date '1994-01-01' + interval '1' year \
         and l_discount between 0.06 - 0.01 and 0.06 + 0.01 and l_quantity < 24",
    ),
    (
        "registry: count, mean, sd",
        "SELECT count(*), avg(age), stddev_samp(age) FROM registry",
    ),
    (
        "registry: by site and stage",
        "SELECT site, stage, count(*), avg(survival_days), var_samp(bmi) FROM registry \
         GROUP BY site, stage ORDER BY site, stage",
    ),
    (
        "registry: filtered CASE",
        "SELECT diagnosis_year, avg(CASE WHEN vital_status = 'dead' THEN 1.0 ELSE 0.0 END) \
         FROM registry WHERE diagnosis_date >= DATE '2010-01-01' AND site IN ('lung', 'breast') \
         GROUP BY diagnosis_year ORDER BY diagnosis_year",
    ),
    (
        "registry: 20k groups",
        "SELECT patient_id % 20000 AS bucket, count(*), sum(bmi) FROM registry GROUP BY 1 \
         ORDER BY 1 LIMIT 5",
    ),
];

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn median(mut samples: Vec<Duration>) -> Duration {
    samples.sort();
    samples[samples.len() / 2]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

#[tokio::main]
async fn main() -> Result<()> {
    // `cargo bench` passes `--bench`; a filter argument is not supported by this runner.
    let per_station: usize = env_or("RAILYARD_BENCH_ROWS", 1_000_000);
    let scale: f64 = env_or("RAILYARD_BENCH_SF", 1.0);
    let runs: usize = env_or("RAILYARD_BENCH_RUNS", 7);
    let keep = std::env::var("RAILYARD_BENCH_DIR").ok().map(PathBuf::from);
    let temp = tempfile::tempdir()?;
    let dir = keep.clone().unwrap_or_else(|| temp.path().to_path_buf());
    // The bench measures the engine on every query shape, so stations run the open test
    // policy (every column public, k = 1); audit logs (fsynced per fragment) are written
    // as in production.
    let governance = Governance::new(
        Some(&PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/policies/open.toml")),
        temp.path().join("audit"),
    )?;

    let profiles: Vec<StationProfile> = default_profiles(per_station * 3)
        .into_iter()
        .map(|p| StationProfile {
            patients: per_station,
            ..p
        })
        .collect();
    let names: Vec<&str> = profiles.iter().map(|p| p.name.as_str()).collect();
    let registry = dir.join("registry");
    let lineitem = dir.join("lineitem");
    if !(registry.exists() && lineitem.exists()) {
        let t = Instant::now();
        write_registry(&dir, &profiles, railyard::synth::DEFAULT_SEED)?;
        railyard::tpch::write_tpch(&dir, scale, &names)?;
        eprintln!(
            "generated data in {:.1?} under {}",
            t.elapsed(),
            dir.display()
        );
    }

    let central = SessionContext::new();
    for (name, path) in [("registry", &registry), ("lineitem", &lineitem)] {
        central
            .register_parquet(
                name,
                format!("{}/", path.display()),
                ParquetReadOptions::default(),
            )
            .await?;
    }
    let specs = [
        TableSpec {
            name: "registry".into(),
            dir: registry.clone(),
            key: None,
        },
        TableSpec {
            name: "lineitem".into(),
            dir: lineitem.clone(),
            key: None,
        },
    ];
    let federation = LocalFederation::start(
        &specs,
        TcpListener::bind("127.0.0.1:0").await?,
        HubOptions::default(),
        &governance,
    )
    .await?;
    let mut client = HubClient::connect(&federation.hub_url).await?;

    println!(
        "federated (3 stations + hub, Flight SQL client) vs centralized (one session, same files)"
    );
    println!(
        "registry: {} patients per station; TPC-H SF{scale}; median of {runs} runs\n",
        per_station
    );
    println!(
        "{:<30} {:>14} {:>14} {:>8}",
        "query", "centralized ms", "federated ms", "ratio"
    );
    for (label, sql) in QUERIES {
        // Warm both (file metadata caches, connections), and check they agree on row count.
        let c_rows: usize = central
            .sql(sql)
            .await?
            .collect()
            .await?
            .iter()
            .map(|b| b.num_rows())
            .sum();
        let f_rows = client.query(sql).await?.num_rows();
        anyhow::ensure!(c_rows == f_rows, "{label}: {c_rows} vs {f_rows} rows");
        let mut c = Vec::new();
        let mut f = Vec::new();
        for _ in 0..runs {
            let t = Instant::now();
            central.sql(sql).await?.collect().await?;
            c.push(t.elapsed());
            let t = Instant::now();
            client.query(sql).await?;
            f.push(t.elapsed());
        }
        let (c, f) = (median(c), median(f));
        println!(
            "{label:<30} {:>14.1} {:>14.1} {:>7.2}x",
            ms(c),
            ms(f),
            f.as_secs_f64() / c.as_secs_f64()
        );
    }
    federation.shutdown().await?;

    // A small aggregate over three small stations, end to end through Flight SQL.
    let lung = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data/lung/horizontal/csv");
    let small = LocalFederation::start(
        &[TableSpec {
            name: "lung".into(),
            dir: lung,
            key: None,
        }],
        TcpListener::bind("127.0.0.1:0").await?,
        HubOptions::default(),
        &governance,
    )
    .await?;
    let mut client = HubClient::connect(&small.hub_url).await?;
    let sql = "SELECT sex, count(*), avg(age) FROM lung GROUP BY sex";
    for _ in 0..20 {
        client.query(sql).await?;
    }
    let mut samples = Vec::new();
    for _ in 0..200 {
        let t = Instant::now();
        client.query(sql).await?;
        samples.push(t.elapsed());
    }
    samples.sort();
    println!(
        "\nsmall aggregate over 3 stations through Flight SQL ({sql}):\n  \
         median {:.2} ms, p90 {:.2} ms, min {:.2} ms (200 runs)",
        ms(samples[samples.len() / 2]),
        ms(samples[samples.len() * 9 / 10]),
        ms(samples[0])
    );
    small.shutdown().await?;
    drop(temp);
    Ok(())
}
