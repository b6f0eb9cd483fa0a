//! The `railyard` command line.

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

/// See the `mimalloc` dependency in Cargo.toml.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

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
        /// The column that identifies a patient (the privacy unit) in every table that has
        /// it: k, contributor counts and the dominance rule count its distinct values, not
        /// rows. Overrides the policy file's top-level privacy_unit. Without either, a
        /// table with a person_id or patient_id column counts that; any other table, rows.
        #[arg(long, value_name = "COLUMN")]
        privacy_unit: Option<String>,
        /// A reference table NAME read from FILE (.csv or .parquet; repeatable): a table
        /// without patient data (a vocabulary such as OMOP's concept and
        /// concept_ancestor) that every station holds a copy of. It is public, joinable in
        /// every station's fragments, and queried on its own it is answered once.
        #[arg(long = "reference", value_name = "NAME=FILE")]
        references: Vec<railyard::local::ReferenceSpec>,
        /// Where stations keep their state: DIR/<station>/audit.jsonl is each audit log
        /// (the hub's join stations of --vertical tables log to DIR/hub/<table>-join/).
        #[arg(long, value_name = "DIR", default_value = ".railyard")]
        data_dir: PathBuf,
        /// Take each client's researcher name from its x-railyard-researcher header
        /// (otherwise every query is the researcher "local"). Each name has its own
        /// query-set memory and DP budget at the stations, so test corpora can run each
        /// test as a fresh researcher. Anyone who can reach the port chooses a name: use
        /// it on your own machine only.
        #[arg(long)]
        named_researchers: bool,
        /// Queries one researcher may start per minute at the hub (0: no limit).
        #[arg(long, value_name = "N", default_value_t = 0)]
        max_queries_per_minute: u64,
        /// Address of the web console and its JSON API (docs/console.md): a loopback
        /// address, port 0 picks a free port. Printed as `console at http://…/` on the line
        /// after the hub's.
        #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:0")]
        console_listen: SocketAddr,
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
        /// After the demo, keep its federation running and serve the web console at ADDR
        /// (a loopback address; port 0 picks a free port) until Ctrl-C or SIGTERM.
        #[arg(long, value_name = "ADDR", num_args = 0..=1, default_missing_value = "127.0.0.1:0")]
        serve: Option<SocketAddr>,
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
    /// Run a deployed hub from its configuration file (see docs/deployment.md).
    ///
    /// Serves Flight SQL over TLS to researchers with bearer tokens (`railyard token`),
    /// reaches its stations over mutual TLS (or accepts outbound stations on
    /// `tunnel_listen`), and gives each collaboration's researchers only that
    /// collaboration's stations and tables. Waits for every station at start-up. Stops on
    /// Ctrl-C or SIGTERM.
    Hub {
        /// The hub's configuration (hub.toml).
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
    },
    /// Run a deployed station from its configuration file (see docs/deployment.md).
    ///
    /// Serves its tables (CSV, Parquet, PostgreSQL) under its policy to the one hub whose
    /// certificate it trusts: either listening (`listen`) or, where the firewall allows no
    /// inbound connection, dialing the hub (`hub`) and serving over that connection. Stops
    /// on Ctrl-C or SIGTERM.
    Station {
        /// The station's configuration (station.toml).
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
    },
    /// Create a collaboration's certificate authority and its parties' certificates.
    Certs {
        #[command(subcommand)]
        command: CertsCommand,
    },
    /// Create a collaboration secret: the key the stations of a collaboration share to link
    /// a vertical table's parts (see docs/deployment.md). The hub never holds it.
    Secret {
        #[command(subcommand)]
        command: SecretCommand,
    },
    /// Issue, list and revoke researchers' bearer tokens (kept hashed in the hub's data
    /// directory).
    Token {
        #[command(subcommand)]
        command: TokenCommand,
    },
    /// Run one SQL statement on a hub and print the answer.
    ///
    /// Prefix a query with EXPLAIN FEDERATED to see what each station would run and what
    /// would leave it, without running anything.
    Sql {
        /// The hub's Flight SQL address: grpc://HOST:PORT (railyard local) or
        /// grpc+tls://HOST:PORT (a deployed hub; needs --ca and a token).
        #[arg(long, default_value = "grpc://127.0.0.1:50051")]
        hub: String,
        /// The collaboration's CA certificate, to verify a grpc+tls:// hub.
        #[arg(long, value_name = "FILE")]
        ca: Option<PathBuf>,
        /// A bearer token from `railyard token create`.
        #[arg(long, env = "RAILYARD_TOKEN", hide_env_values = true)]
        token: Option<String>,
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

#[derive(Debug, Subcommand)]
enum CertsCommand {
    /// Create DIR/ca.pem and DIR/ca.key: the collaboration's certificate authority. Keep
    /// ca.key offline or with the coordinator; every party gets ca.pem.
    Init {
        /// Where the CA's files go (created if missing; existing files are never replaced).
        #[arg(long, value_name = "DIR")]
        dir: PathBuf,
        /// The collaboration's name (shown in the CA's subject).
        #[arg(long)]
        collaboration: String,
    },
    /// Issue DIR/NAME.pem and DIR/NAME.key for the hub or a station, signed by DIR's CA.
    Issue {
        /// The directory holding the CA (from `certs init`).
        #[arg(long, value_name = "DIR")]
        dir: PathBuf,
        /// The party's name: `hub` (or the hub's `name`), or the station's name as hub.toml
        /// lists it. Peers check it.
        #[arg(long)]
        name: String,
        /// A host name or IP address the party is reached at (repeatable), e.g. the hub's
        /// public DNS name for researchers.
        #[arg(long = "host", value_name = "HOST")]
        hosts: Vec<String>,
    },
}

#[derive(Debug, Subcommand)]
enum SecretCommand {
    /// Write a fresh random secret to FILE, readable by its owner only (0600). An existing
    /// file is never replaced. Pass it to each station operator of the collaboration out of
    /// band (never through the hub); each names it in `collaboration_secret_file`.
    Init {
        /// The collaboration the secret is for (written into the file as a comment).
        #[arg(long)]
        collaboration: String,
        /// Where to write the secret.
        #[arg(long, value_name = "FILE")]
        out: PathBuf,
    },
}

#[derive(Debug, Subcommand)]
enum TokenCommand {
    /// Issue a token for a researcher in a collaboration and print it (once: only its hash
    /// is kept).
    Create {
        /// The hub's configuration (hub.toml): where the token database is, and who belongs
        /// to which collaboration.
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
        #[arg(long)]
        researcher: String,
        #[arg(long)]
        collaboration: String,
        /// How long the token is valid: 90d, 12h, 30m, 45s.
        #[arg(long, default_value = "90d", value_parser = railyard::deploy::parse_duration)]
        expires_in: Duration,
    },
    /// List every token: id, researcher, collaboration, expiry, revocation.
    List {
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
    },
    /// Revoke a token by its id (the hub refuses it from its next call on).
    Revoke {
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
        /// The token's id (`token list`; the part after `ryt_`).
        id: String,
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
    railyard::local::runtime("railyard")?.block_on(run(cli))
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
            privacy_unit,
            references,
            data_dir,
            named_researchers,
            max_queries_per_minute,
            console_listen,
        } => {
            tables.extend(vertical.into_iter().map(|spec| TableSpec {
                key: key.clone(),
                ..spec
            }));
            let mut governance = Governance::new(policy.as_deref(), &data_dir)?;
            governance.references = references;
            if let Some(unit) = privacy_unit {
                governance.policy.privacy_unit = Some(railyard_policy::file::PrivacyUnit::Column {
                    name: unit,
                    line: 0,
                });
            }
            let listener = TcpListener::bind(listen)
                .await
                .with_context(|| format!("cannot listen on {listen}"))?;
            if !console_listen.ip().is_loopback() {
                anyhow::bail!(
                    "--console-listen {console_listen}: the console has no authentication, so \
                     it listens on a loopback address only (127.0.0.1 or ::1)"
                );
            }
            let console_listener = TcpListener::bind(console_listen)
                .await
                .with_context(|| format!("cannot listen on {console_listen} for the console"))?;
            let options = HubOptions {
                fragment_timeout: Duration::from_secs(fragment_timeout),
                merge_partitions: usize::from(hub_partitions),
                named_researchers,
                max_queries_per_minute,
                ..HubOptions::default()
            };
            // The stations run on threads of their own ("railyard-station"), apart from
            // the hub's ("railyard"): as on separate machines, one side's load shows as its
            // own threads' CPU time.
            let stations = railyard::local::StationRuntime::new()?;
            let federation = LocalFederation::start_on(
                &tables,
                listener,
                options,
                &governance,
                Some(stations.handle()),
            )
            .await?;
            for s in &federation.stations {
                eprintln!("station {} listening on {}", s.name, s.url);
            }
            railyard::local::serve_until_stopped(
                &federation,
                console_listener,
                data_dir.join("console").join("history.jsonl"),
                &mut std::io::stdout(),
            )
            .await?;
            federation.shutdown().await?;
            Ok(())
        }
        Command::Demo {
            patients,
            data_dir,
            serve,
        } => {
            let mut out = std::io::stdout().lock();
            demo::run(patients, &data_dir, serve, &mut out).await
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
        Command::Hub { config } => {
            let config = railyard::deploy::HubConfig::load(&config)?;
            railyard::deploy::run_hub(config, async {
                let _ = wait_for_stop_signal().await;
            })
            .await
        }
        Command::Station { config } => {
            let setup = railyard::deploy::StationFileConfig::load(&config)?;
            railyard::deploy::run_station(setup, async {
                let _ = wait_for_stop_signal().await;
            })
            .await
        }
        Command::Certs {
            command: CertsCommand::Init { dir, collaboration },
        } => {
            let ca = railyard_net::certs::init(&dir, &collaboration)?;
            println!("created the CA for '{collaboration}': {}", ca.display());
            Ok(())
        }
        Command::Certs {
            command: CertsCommand::Issue { dir, name, hosts },
        } => {
            let issued = railyard_net::certs::issue(&dir, &name, &hosts)?;
            println!(
                "issued '{name}': {} and {}",
                issued.cert.display(),
                issued.key.display()
            );
            Ok(())
        }
        Command::Secret {
            command: SecretCommand::Init { collaboration, out },
        } => {
            railyard::secret::init(&collaboration, &out)?;
            println!(
                "wrote the collaboration secret for '{collaboration}' to {} (mode 0600); give \
                 it to the collaboration's station operators only",
                out.display()
            );
            Ok(())
        }
        Command::Token { command } => token(command),
        Command::Sql {
            hub,
            ca,
            token,
            format,
            sql,
        } => {
            let mut client = HubClient::connect_with(&hub, ca.as_deref(), token.as_deref()).await?;
            let answer = client.query(&sql).await?;
            // On stderr, so that the CSV on stdout stays a CSV.
            for note in answer.notes() {
                eprintln!("{note}");
            }
            match format {
                OutputFormat::Table => println!("{}", answer.to_table()?),
                OutputFormat::Csv => railyard_engine::console::format::write_csv(
                    &answer.schema,
                    &answer.batches,
                    std::io::stdout().lock(),
                )?,
            }
            Ok(())
        }
    }
}

fn token(command: TokenCommand) -> Result<()> {
    use railyard::deploy::HubConfig;
    let when = |secs: i64| {
        chrono::DateTime::from_timestamp(secs, 0).map_or_else(
            || secs.to_string(),
            |t| t.format("%Y-%m-%d %H:%M:%SZ").to_string(),
        )
    };
    match command {
        TokenCommand::Create {
            config,
            researcher,
            collaboration,
            expires_in,
        } => {
            let config = HubConfig::load(&config)?;
            config.membership(&researcher, &collaboration)?;
            let token = config
                .token_store()?
                .create(&researcher, &collaboration, expires_in)?;
            eprintln!(
                "token {} for '{researcher}' in '{collaboration}', valid until {}",
                token.id,
                when(token.expires)
            );
            println!("{}", token.token);
        }
        TokenCommand::List { config } => {
            let config = HubConfig::load(&config)?;
            println!("id\tresearcher\tcollaboration\tcreated\texpires\trevoked");
            for t in config.token_store()?.list()? {
                println!(
                    "{}\t{}\t{}\t{}\t{}\t{}",
                    t.id,
                    t.researcher,
                    t.collaboration,
                    when(t.created),
                    when(t.expires),
                    t.revoked.map_or_else(|| "-".to_string(), when)
                );
            }
        }
        TokenCommand::Revoke { config, id } => {
            let config = HubConfig::load(&config)?;
            config.token_store()?.revoke(&id)?;
            println!("revoked token {id}");
        }
    }
    Ok(())
}

async fn wait_for_stop_signal() -> Result<()> {
    railyard::local::wait_for_stop_signal().await
}
