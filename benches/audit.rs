//! What the audit log's durable write costs concurrent queries, and what group commit saves.
//!
//! `cargo bench --bench audit` starts, in one process, the three lung stations (CSV) twice
//! over, each time behind its own hub on loopback: once with one `fsync` per audit record
//! (the baseline), once with group commit (every record waiting when the audit writer wakes
//! shares one `fsync`; each query still returns only after its record is durable). Both run
//! the writes on the audit writer's thread; before that thread existed, the `fsync` ran on
//! an async worker under a lock (compare with an older checkout to see that cost). `RAILYARD_BENCH_CLIENTS` clients (default 16),
//! each on its own Flight SQL connection, run `RAILYARD_BENCH_RUNS` small aggregates each
//! (default 50) at the same time. Printed per setup: queries per second, the ratio to the
//! baseline, and the stations' audit records and `fsync`s during the run.
//!
//! The audit logs live in a temporary directory on the machine's disk (set `TMPDIR` to
//! measure another one). What group commit saves grows with the disk's flush latency: where
//! `fdatasync` takes 0.1 ms (measured on the development machine) it is a few percent of a
//! small query; where a flush takes milliseconds, the records that finish together share it.

#![allow(clippy::unwrap_used)] // a test or benchmark that cannot unwrap has failed

mod support;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Result;
use railyard::client::HubClient;
use railyard_engine::{Hub, HubOptions, StationAddress};
use railyard_station::audit::Commit;
use railyard_station::{Format, Policy, Station, StationConfig, TableFile};
use tokio::net::TcpListener;

const SQL: &str = "SELECT sex, count(*), avg(age) FROM lung GROUP BY sex";

const STATIONS: [(&str, &str); 3] = [
    ("station-a", "station_a"),
    ("station-b", "station_b"),
    ("station-c", "station_c"),
];

/// Three lung stations committing their audit logs by `commit`, and a hub over them;
/// returns the hub's URL and the stations.
async fn federation(dir: &Path, commit: Commit) -> Result<(String, Vec<Arc<Station>>)> {
    let data = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data/lung/horizontal/csv");
    let mut addresses = Vec::new();
    let mut stations = Vec::new();
    for (name, file) in STATIONS {
        let table = TableFile {
            name: "lung".to_string(),
            path: data.join(format!("{file}.csv")),
            format: Format::Csv,
            schema: None,
        };
        let config = StationConfig {
            policy: Policy::default(),
            audit_log: dir.join(name).join("audit.jsonl"),
            collaboration_secret: None,
            hub_secret: None,
        };
        let station =
            Arc::new(Station::open_with_commit(name, &[table], &[], config, commit).await?);
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        addresses.push(StationAddress {
            name: name.to_string(),
            url: format!("grpc://{}", listener.local_addr()?),
        });
        tokio::spawn(railyard_station::serve(
            Arc::clone(&station),
            listener,
            std::future::pending(),
        ));
        stations.push(station);
    }
    let hub = Arc::new(Hub::connect(&addresses, HubOptions::default()).await?);
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("grpc://{}", listener.local_addr()?);
    tokio::spawn(railyard_engine::serve(
        hub,
        listener,
        std::future::pending(),
    ));
    Ok((url, stations))
}

/// What one concurrent run measured.
struct Run {
    elapsed: Duration,
    queries: usize,
    records: u64,
    syncs: u64,
}

/// `clients` connections run `runs` queries each, all at once (after one warm-up query
/// each); returns the wall time and the audit records and `fsync`s it caused.
async fn concurrent(
    url: &str,
    stations: &[Arc<Station>],
    clients: usize,
    runs: usize,
) -> Result<Run> {
    let mut connected = Vec::with_capacity(clients);
    for _ in 0..clients {
        let mut client = HubClient::connect(url).await?;
        client.query(SQL).await?;
        connected.push(client);
    }
    let counts = |stations: &[Arc<Station>]| {
        stations.iter().fold((0, 0), |(r, s), st| {
            (r + st.audit_log().records(), s + st.audit_log().syncs())
        })
    };
    let (records0, syncs0) = counts(stations);
    let start = Instant::now();
    let tasks: Vec<_> = connected
        .into_iter()
        .map(|mut client| {
            tokio::spawn(async move {
                for _ in 0..runs {
                    let answer = client.query(SQL).await?;
                    anyhow::ensure!(answer.num_rows() == 2, "expected two groups");
                }
                Ok::<_, anyhow::Error>(())
            })
        })
        .collect();
    for task in tasks {
        task.await??;
    }
    let elapsed = start.elapsed();
    let (records1, syncs1) = counts(stations);
    Ok(Run {
        elapsed,
        queries: clients * runs,
        records: records1 - records0,
        syncs: syncs1 - syncs0,
    })
}

fn main() -> Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let runs = support::runs(50);
        let clients = std::env::var("RAILYARD_BENCH_CLIENTS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(16);
        let dir = tempfile::tempdir()?;
        println!("{clients} clients x {runs} queries at once: {SQL}");
        let mut results = Vec::new();
        for (label, commit) in [
            ("one fsync per audit record", Commit::PerRecord),
            ("group commit", Commit::Group),
        ] {
            let (url, stations) = federation(&dir.path().join(label), commit).await?;
            let run = concurrent(&url, &stations, clients, runs).await?;
            results.push((label, run));
        }
        let base = results[0].1.queries as f64 / results[0].1.elapsed.as_secs_f64();
        println!(
            "{:<28} {:>10} {:>12} {:>10} {:>8}",
            "", "queries/s", "x baseline", "records", "fsyncs"
        );
        for (label, run) in &results {
            let qps = run.queries as f64 / run.elapsed.as_secs_f64();
            println!(
                "{label:<28} {qps:>10.1} {:>12.2} {:>10} {:>8}",
                qps / base,
                run.records,
                run.syncs
            );
        }
        Ok(())
    })
}
