//! The `railyard` command line.

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand, ValueEnum};
use railyard::client::HubClient;
use railyard::local::{Governance, LocalFederation, TableSpec};
use railyard::{demo, synth};
use railyard_engine::HubOptions;
use tokio::net::TcpListener;

/// Railyard: federated analytics for health research. Stations keep patient data at home;
/// researchers send SQL to a hub, and only aggregates come back.
#[derive(Debug, Parser)]
#[command(name = "railyard", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run a whole federation in this process: one station per data file, and a hub.
    ///
    /// Every .csv or .parquet file in a table's directory becomes one station, named after
    /// the file's stem (station_a.csv → station 'station_a'); files with the same stem under
    /// several --table directories are tables of the same station. Each station serves
    /// Arrow Flight on its own loopback port; the hub serves Flight SQL on --listen.
    /// No authentication: for trying things on one machine. Stops on Ctrl-C or SIGTERM.
    Local {
        /// Address of the hub's Flight SQL endpoint (port 0 picks a free port).
        #[arg(long, default_value = "127.0.0.1:50051")]
        listen: SocketAddr,
        /// A federated table NAME whose parts are the data files in DIR (repeatable): each
        /// file holds other patients with the same columns (horizontal partitioning).
        #[arg(
            long = "table",
            value_name = "NAME=DIR",
            required_unless_present = "vertical"
        )]
        tables: Vec<TableSpec>,
        /// A vertically partitioned table NAME (repeatable): each file in DIR holds other
        /// columns of the same patients plus the --key column; the table is their inner
        /// join on it. Stations link rows by keyed pseudonyms (HMAC-SHA256 under a secret
        /// they share and the hub never sees); see docs/vertical.md.
        #[arg(long = "vertical", value_name = "NAME=DIR", requires = "key")]
        vertical: Vec<TableSpec>,
        /// The column that links the parts of every --vertical table (never queryable).
        #[arg(long, value_name = "COLUMN", requires = "vertical")]
        key: Option<String>,
        /// Seconds one station may take to deliver one fragment.
        #[arg(long, default_value_t = 60)]
        fragment_timeout: u64,
        /// Partitions of the hub's own execution (merging states needs one; raise it for
        /// queries that join large row-level fragments at the hub).
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..))]
        hub_partitions: u16,
        /// The disclosure policy (TOML) every station applies; see docs/policy.md. Without
        /// one, stations release nothing row-level and no group of fewer than 5 rows.
        #[arg(long, value_name = "FILE")]
        policy: Option<PathBuf>,
        /// Where stations keep their state: DIR/<station>/audit.jsonl is each audit log
        /// (the hub's join stations of --vertical tables log to DIR/hub/<table>-join/).
        #[arg(long, value_name = "DIR", default_value = ".railyard")]
        data_dir: PathBuf,
    },
    /// Generate synthetic registry data, start a local federation, run realistic queries and
    /// print each query, its federated plan and its answer. Needs no arguments or network.
    Demo {
        /// Synthetic patients over all three stations.
        #[arg(long, default_value_t = demo::DEFAULT_PATIENTS)]
        patients: usize,
        /// Where the demo's stations keep their audit logs (DIR/<station>/audit.jsonl).
        #[arg(long, value_name = "DIR", default_value = ".railyard")]
        data_dir: PathBuf,
    },
    /// Work with a station's audit log.
    Audit {
        #[command(subcommand)]
        command: AuditCommand,
    },
    /// Write the demo's synthetic registry data (one Parquet file per station) to a
    /// directory, for `railyard local --table registry=DIR/registry`; optionally also TPC-H
    /// `lineitem` and `orders` split over the same three stations.
    Gen {
        /// Directory to write into (created if missing); files go to DIR/registry/.
        #[arg(long)]
        out: PathBuf,
        /// Synthetic patients over all three stations.
        #[arg(long, default_value_t = demo::DEFAULT_PATIENTS)]
        patients: usize,
        /// Random seed: the same seed always gives the same data.
        #[arg(long, default_value_t = synth::DEFAULT_SEED)]
        seed: u64,
        /// Also write TPC-H lineitem and orders at this scale factor (1 = 6M line items)
        /// to DIR/lineitem/ and DIR/orders/.
        #[arg(long, value_name = "SF")]
        tpch_scale: Option<f64>,
    },
    /// Run one SQL statement on a hub and print the answer.
    ///
    /// Prefix a query with EXPLAIN FEDERATED to see what each station would run and what
    /// would leave it, without running anything.
    Sql {
        /// The hub's Flight SQL address.
        #[arg(long, default_value = "grpc://127.0.0.1:50051")]
        hub: String,
        /// How to print the answer.
        #[arg(long, value_enum, default_value_t = OutputFormat::Table)]
        format: OutputFormat,
        /// The SQL statement.
        sql: String,
    },
}

#[derive(Debug, Subcommand)]
enum AuditCommand {
    /// Check an audit log's hash chain; report the first broken record and exit non-zero
    /// if there is one.
    Verify {
        /// The audit log (e.g. .railyard/station_a/audit.jsonl).
        path: PathBuf,
    },
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum OutputFormat {
    /// An aligned text table.
    Table,
    /// CSV with a header row.
    Csv,
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    match start(cli) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            // One readable line (with its causes), never a backtrace: this is for people.
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn start(cli: Cli) -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("RAILYARD_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(run(cli))
}

async fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Local {
            listen,
            mut tables,
            vertical,
            key,
            fragment_timeout,
            hub_partitions,
            policy,
            data_dir,
        } => {
            tables.extend(vertical.into_iter().map(|spec| TableSpec {
                key: key.clone(),
                ..spec
            }));
            let governance = Governance::new(policy.as_deref(), data_dir)?;
            let listener = TcpListener::bind(listen)
                .await
                .with_context(|| format!("cannot listen on {listen}"))?;
            let options = HubOptions {
                fragment_timeout: Duration::from_secs(fragment_timeout),
                merge_partitions: usize::from(hub_partitions),
                ..HubOptions::default()
            };
            let federation =
                LocalFederation::start(&tables, listener, options, &governance).await?;
            for s in &federation.stations {
                eprintln!("station {} listening on {}", s.name, s.url);
            }
            println!("hub listening on {}", federation.hub_url);
            std::io::stdout().flush()?;
            wait_for_stop_signal().await?;
            federation.shutdown().await?;
            Ok(())
        }
        Command::Demo { patients, data_dir } => {
            let mut out = std::io::stdout().lock();
            demo::run(patients, &data_dir, &mut out).await
        }
        Command::Audit {
            command: AuditCommand::Verify { path },
        } => {
            let v = railyard_station::audit::verify(&path)
                .with_context(|| format!("cannot read {}", path.display()))?;
            if let Some((line, why)) = v.broken {
                anyhow::bail!(
                    "{}: record {line} is broken: {why} ({} records before it verify)",
                    path.display(),
                    v.records
                );
            }
            println!(
                "{}: {} records, chain intact, head {}",
                path.display(),
                v.records,
                v.head
            );
            if v.torn_tail {
                println!(
                    "note: the last line is incomplete (the station stopped while writing it); \
                     it was never acknowledged, and the station cuts it off when it next starts"
                );
            }
            Ok(())
        }
        Command::Gen {
            out,
            patients,
            seed,
            tpch_scale,
        } => {
            let profiles = synth::default_profiles(patients);
            let dir = synth::write_registry(&out, &profiles, seed)?;
            println!(
                "wrote {patients} patients for {} stations to {}",
                profiles.len(),
                dir.display()
            );
            if let Some(scale) = tpch_scale {
                anyhow::ensure!(
                    scale > 0.0 && scale.is_finite(),
                    "--tpch-scale must be a positive number, got {scale}"
                );
                let names: Vec<&str> = profiles.iter().map(|p| p.name.as_str()).collect();
                let (lineitem, orders) = railyard::tpch::write_tpch(&out, scale, &names)?;
                println!(
                    "wrote TPC-H SF{scale} to {} and {}",
                    lineitem.display(),
                    orders.display()
                );
            }
            Ok(())
        }
        Command::Sql { hub, format, sql } => {
            let mut client = HubClient::connect(&hub).await?;
            let answer = client.query(&sql).await?;
            match format {
                OutputFormat::Table => println!("{}", answer.to_table()?),
                OutputFormat::Csv => {
                    let stdout = std::io::stdout().lock();
                    let mut writer = arrow::csv::WriterBuilder::new()
                        .with_header(true)
                        .build(stdout);
                    if answer.batches.is_empty() {
                        writer.write(&arrow::array::RecordBatch::new_empty(answer.schema))?;
                    }
                    for batch in &answer.batches {
                        writer.write(batch)?;
                    }
                }
            }
            Ok(())
        }
    }
}

async fn wait_for_stop_signal() -> Result<()> {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("cannot listen for SIGTERM")?;
    tokio::select! {
        r = tokio::signal::ctrl_c() => r.context("cannot listen for Ctrl-C")?,
        _ = term.recv() => {}
    }
    Ok(())
}
