//! What a deployment's transport costs a query.
//!
//! `cargo bench --bench deployment` starts, in one process, the three lung stations (Parquet)
//! and a hub three times over: plaintext as `railyard local` runs them (the baseline); as
//! deployed daemons run them — mutual TLS between hub and stations, TLS and a bearer-token
//! check (one SQLite lookup per call) at the researcher's endpoint; and the same with every
//! station outbound (each dials the hub's tunnel listener and serves Flight over that
//! connection). Each setup answers the same queries through the Flight SQL client, on one
//! kept-open connection; then a fresh connection per query (what a one-shot client such as
//! `railyard sql` pays: TCP, TLS handshake, the query). Ratios are against the plaintext
//! baseline measured in the same process.
//!
//! Environment: `RAILYARD_BENCH_RUNS` (timed runs per query, default 50).

#![allow(clippy::unwrap_used)] // a test or benchmark that cannot unwrap has failed

mod support;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Result;
use railyard::client::HubClient;
use railyard::local::{Governance, LocalFederation, TableSpec};
use railyard_engine::flight_sql::{Collaboration, Collaborations};
use railyard_engine::tokens::TokenStore;
use railyard_engine::{Hub, HubFlightSql, HubOptions, StationAddress, Transport};
use railyard_net::{Tls, TlsFiles, Tunnels, certs, conn};
use railyard_station::{Format, Policy, Station, StationConfig, TableFile};
use tokio::net::TcpListener;

use support::{median, print_ratios, time_query};

const QUERIES: [(&str, &str); 2] = [
    (
        "grouped count and mean",
        "SELECT sex, count(*), avg(age) FROM lung GROUP BY sex",
    ),
    ("filtered count", "SELECT count(*) FROM lung WHERE age > 60"),
];

const STATIONS: [(&str, &str); 3] = [
    ("station-a", "station_a"),
    ("station-b", "station_b"),
    ("station-c", "station_c"),
];

fn lung() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data/lung/horizontal/parquet")
}

fn tls_of(certs: &Path, name: &str) -> Result<Tls> {
    Ok(Tls::load(&TlsFiles {
        ca: certs.join(certs::CA_CERT),
        cert: certs.join(format!("{name}.pem")),
        key: certs.join(format!("{name}.key")),
    })?)
}

/// A deployed-style federation in this process; returns the hub's URL and a token.
async fn deployed(dir: &Path, outbound: bool) -> Result<(String, String)> {
    let certs = dir.join("certs");
    certs::init(&certs, "bench")?;
    certs::issue(&certs, "hub", &["127.0.0.1".to_string()])?;
    for (name, _) in STATIONS {
        certs::issue(&certs, name, &["127.0.0.1".to_string()])?;
    }
    let hub_tls = tls_of(&certs, "hub")?;
    let hub_name = vec!["hub".to_string()];
    let names: Vec<String> = STATIONS.iter().map(|(n, _)| n.to_string()).collect();

    let (tunnels, tunnel_addr) = if outbound {
        let tunnels = Tunnels::new(&names, Duration::from_secs(10))?;
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?.to_string();
        let (serving, tls) = (tunnels.clone(), hub_tls.clone());
        tokio::spawn(async move { serving.serve(listener, &tls, std::future::pending()).await });
        (Some(tunnels), addr)
    } else {
        (None, String::new())
    };

    let mut addresses = Vec::new();
    for (name, file) in STATIONS {
        let tls = tls_of(&certs, name)?;
        let table = TableFile {
            name: "lung".to_string(),
            path: lung().join(format!("{file}.parquet")),
            format: Format::Parquet,
            schema: None,
        };
        let config = StationConfig {
            policy: Policy::default(),
            audit_log: dir.join(name).join("audit.jsonl"),
            collaboration_secret: None,
            hub_secret: None,
        };
        let station = Arc::new(Station::open(name, &[table], config).await?);
        type Incoming =
            std::pin::Pin<Box<dyn futures::Stream<Item = std::io::Result<conn::Conn>> + Send>>;
        let (incoming, url): (Incoming, String) = if outbound {
            let incoming = conn::dial_out(tunnel_addr.clone(), "hub".into(), tls.client_config()?);
            (Box::pin(incoming), format!("tunnel://{name}"))
        } else {
            let listener = TcpListener::bind("127.0.0.1:0").await?;
            let url = format!("grpc+tls://{}", listener.local_addr()?);
            let config = tls.mutual_server_config(hub_name.clone())?;
            (
                Box::pin(conn::accept(listener, config, hub_name.clone())),
                url,
            )
        };
        tokio::spawn(railyard_station::serve_incoming(
            station,
            incoming,
            std::future::pending(),
        ));
        addresses.push(StationAddress {
            name: name.to_string(),
            url,
        });
    }
    let options = HubOptions {
        collaboration: "bench".to_string(),
        transport: Transport {
            tls: Some(hub_tls.client_config()?),
            tunnels,
            secret: None,
            board: None,
        },
        ..HubOptions::default()
    };
    let hub = Arc::new(Hub::connect(&addresses, options).await?);
    let store = TokenStore::open(&dir.join("tokens.sqlite"))?;
    let token = store
        .create("alice", "bench", Duration::from_secs(3600))?
        .token;
    let flight = HubFlightSql::with_tokens(
        Arc::new(store),
        Collaborations::new(HashMap::from([(
            "bench".to_string(),
            Collaboration {
                hub,
                researchers: vec!["alice".to_string()],
            },
        )])),
    );
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("grpc+tls://{}", listener.local_addr()?);
    let incoming = conn::accept(listener, hub_tls.server_config()?, Vec::new());
    tokio::spawn(railyard_engine::serve_incoming(
        flight,
        incoming,
        std::future::pending(),
    ));
    Ok((url, token))
}

/// Median time of connecting afresh and running `sql`.
async fn time_fresh(
    url: &str,
    ca: Option<&Path>,
    token: Option<&str>,
    sql: &str,
    runs: usize,
) -> Result<Duration> {
    let mut samples = Vec::with_capacity(runs);
    for _ in 0..runs {
        let t = Instant::now();
        let mut client = HubClient::connect_with(url, ca, token).await?;
        client.query(sql).await?;
        samples.push(t.elapsed());
    }
    Ok(median(samples))
}

fn main() -> Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let runs = support::runs(50);
        let dir = tempfile::tempdir()?;
        let governance = Governance::new(None, dir.path().join("local"))?;
        let local = LocalFederation::start(
            &[TableSpec {
                name: "lung".into(),
                dir: lung(),
                key: None,
            }],
            TcpListener::bind("127.0.0.1:0").await?,
            HubOptions::default(),
            &governance,
        )
        .await?;
        let (inbound_url, inbound_token) = deployed(&dir.path().join("inbound"), false).await?;
        let (outbound_url, outbound_token) = deployed(&dir.path().join("outbound"), true).await?;
        let ca_in = dir.path().join("inbound/certs").join(certs::CA_CERT);
        let ca_out = dir.path().join("outbound/certs").join(certs::CA_CERT);

        let mut plain = HubClient::connect(&local.hub_url).await?;
        let mut inbound =
            HubClient::connect_with(&inbound_url, Some(&ca_in), Some(&inbound_token)).await?;
        let mut outbound =
            HubClient::connect_with(&outbound_url, Some(&ca_out), Some(&outbound_token)).await?;
        for (label, sql) in QUERIES {
            println!("\n{label}: {sql}  ({runs} runs, median, one open connection)");
            let base = time_query(&mut plain, sql, 5, runs).await?;
            let tls = time_query(&mut inbound, sql, 5, runs).await?;
            let out = time_query(&mut outbound, sql, 5, runs).await?;
            print_ratios(
                base,
                &[
                    ("plaintext (railyard local)", base),
                    ("mTLS + token, stations listening", tls),
                    ("mTLS + token, stations outbound", out),
                ],
            );
        }
        let (label, sql) = QUERIES[1];
        println!("\n{label}, a fresh connection per query ({runs} runs, median)");
        let base = time_fresh(&local.hub_url, None, None, sql, runs).await?;
        let tls = time_fresh(&inbound_url, Some(&ca_in), Some(&inbound_token), sql, runs).await?;
        print_ratios(
            base,
            &[
                ("plaintext connect + query", base),
                ("TLS connect + token + query", tls),
            ],
        );
        local.shutdown().await?;
        Ok(())
    })
}
