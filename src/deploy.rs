//! `railyard hub --config hub.toml` and `railyard station --config station.toml`: the two
//! daemons of a deployed collaboration (see docs/deployment.md for a walk-through).
//!
//! ```text
//!   researcher ──Flight SQL, TLS + bearer token──▶ hub ──mTLS──▶ inbound station (listens)
//!                                                   ▲
//!                                                   └──mTLS── outbound station (dials the hub;
//!                                                             the hub's Flight calls ride back)
//! ```
//!
//! Paths in a configuration file are relative to the file's directory.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use railyard_engine::flight_sql::Collaboration;
use railyard_engine::tokens::TokenStore;
use railyard_engine::{Hub, HubFlightSql, HubOptions, StationAddress, Transport};
use railyard_net::{Tls, TlsFiles, Tunnels};
use railyard_station::postgres::{PostgresSource, Relation};
use railyard_station::{Format, Policy, Station, StationConfig, TableFile};
use serde::Deserialize;
use tokio::net::TcpListener;

/// The name a hub's certificate carries unless its configuration says otherwise.
pub const DEFAULT_HUB_NAME: &str = "hub";

fn default_hub_name() -> String {
    DEFAULT_HUB_NAME.to_string()
}

fn default_station_wait() -> u64 {
    60
}

fn default_fragment_timeout() -> u64 {
    60
}

/// `[tls]`: the collaboration's CA and this party's certificate and key.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsSection {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl TlsSection {
    /// The same files, relative to `base` (the configuration file's directory).
    fn rebased(self, base: &Path) -> Self {
        Self {
            ca: base.join(self.ca),
            cert: base.join(self.cert),
            key: base.join(self.key),
        }
    }

    fn files(&self) -> TlsFiles {
        TlsFiles {
            ca: self.ca.clone(),
            cert: self.cert.clone(),
            key: self.key.clone(),
        }
    }
}

/// hub.toml
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HubConfig {
    /// The name the hub's certificate carries (stations accept only this hub).
    #[serde(default = "default_hub_name")]
    pub name: String,
    /// The researchers' Flight SQL endpoint (TLS; bearer tokens).
    pub listen: SocketAddr,
    /// Where outbound stations dial in (mutual TLS). Needed if any station is outbound.
    pub tunnel_listen: Option<SocketAddr>,
    /// The hub's state: `tokens.sqlite` (researchers' tokens).
    pub data_dir: PathBuf,
    /// Seconds the hub waits at start-up for each station (an outbound one must dial in).
    #[serde(default = "default_station_wait")]
    pub station_wait_seconds: u64,
    /// Seconds one station may take to deliver one fragment.
    #[serde(default = "default_fragment_timeout")]
    pub fragment_timeout_seconds: u64,
    /// Queries one researcher may start per minute (0, the default: no limit).
    #[serde(default)]
    pub max_queries_per_minute: u64,
    pub tls: TlsSection,
    /// `[[stations]]`: every station this hub talks to.
    pub stations: Vec<StationEntry>,
    /// `[collaborations.NAME]`: who may query which tables at which stations.
    pub collaborations: BTreeMap<String, CollaborationEntry>,
}

/// One `[[stations]]` entry of hub.toml.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StationEntry {
    /// The station's name, as its certificate carries it.
    pub name: String,
    /// `host:port` where the station listens (inbound mode).
    pub address: Option<String>,
    /// The station dials the hub's `tunnel_listen` instead (outbound mode).
    #[serde(default)]
    pub outbound: bool,
}

/// One `[collaborations.NAME]` section of hub.toml.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CollaborationEntry {
    pub stations: Vec<String>,
    pub tables: Vec<String>,
    #[serde(default)]
    pub researchers: Vec<String>,
}

fn read_toml<T: serde::de::DeserializeOwned>(path: &Path) -> Result<(T, PathBuf)> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let config = toml::from_str(&text).with_context(|| format!("{}", path.display()))?;
    let base = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .map_or_else(|| PathBuf::from("."), Path::to_path_buf);
    Ok((config, base))
}

fn check_name(kind: &str, name: &str) -> Result<()> {
    ensure!(
        railyard_net::tls::valid_name(name),
        "{kind} name '{name}' cannot be carried by a certificate: use letters, digits, '-' and \
         '.' (at most 63 characters)"
    );
    Ok(())
}

impl HubConfig {
    /// Reads and checks hub.toml; paths become relative to its directory.
    pub fn load(path: &Path) -> Result<Self> {
        let (mut config, base): (HubConfig, _) = read_toml(path)?;
        config.data_dir = base.join(&config.data_dir);
        config.tls = config.tls.rebased(&base);
        config
            .validate()
            .with_context(|| format!("{}", path.display()))?;
        Ok(config)
    }

    fn validate(&self) -> Result<()> {
        check_name("the hub's", &self.name)?;
        ensure!(!self.stations.is_empty(), "no [[stations]]");
        let mut names = BTreeSet::new();
        ensure!(
            self.station_wait_seconds >= 1,
            "station_wait_seconds must be at least 1"
        );
        for s in &self.stations {
            check_name("station", &s.name)?;
            ensure!(
                s.name != self.name,
                "station '{}' has the hub's name: every party needs its own",
                s.name
            );
            ensure!(
                names.insert(&s.name),
                "station '{}' is listed twice",
                s.name
            );
            match (&s.address, s.outbound) {
                (Some(_), false) | (None, true) => {}
                (Some(_), true) => bail!(
                    "station '{}': give `address` (the hub dials it) or `outbound = true` (it \
                     dials the hub), not both",
                    s.name
                ),
                (None, false) => bail!(
                    "station '{}' needs `address = \"host:port\"` or `outbound = true`",
                    s.name
                ),
            }
            ensure!(
                !s.outbound || self.tunnel_listen.is_some(),
                "station '{}' is outbound, so the hub needs `tunnel_listen` for it to dial",
                s.name
            );
        }
        ensure!(!self.collaborations.is_empty(), "no [collaborations.NAME]");
        for (name, c) in &self.collaborations {
            ensure!(
                !name.is_empty()
                    && name
                        .chars()
                        .all(|ch| ch.is_ascii_alphanumeric() || ch == '-' || ch == '_'),
                "collaboration name '{name}': use letters, digits, '-' and '_'"
            );
            ensure!(
                !c.stations.is_empty(),
                "collaboration '{name}' has no stations"
            );
            ensure!(!c.tables.is_empty(), "collaboration '{name}' has no tables");
            for s in &c.stations {
                ensure!(
                    names.contains(s),
                    "collaboration '{name}' names station '{s}', which is not in [[stations]]"
                );
            }
        }
        Ok(())
    }

    /// The collaboration `name`, checked to have `researcher` as a member.
    pub fn membership(&self, researcher: &str, collaboration: &str) -> Result<()> {
        let c = self.collaborations.get(collaboration).with_context(|| {
            format!(
                "no collaboration '{collaboration}' in the hub's configuration (it has: {})",
                self.collaborations
                    .keys()
                    .cloned()
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        })?;
        ensure!(
            c.researchers.iter().any(|r| r == researcher),
            "researcher '{researcher}' is not listed in [collaborations.{collaboration}] \
             researchers; add them there first"
        );
        Ok(())
    }

    pub fn token_store(&self) -> Result<TokenStore> {
        Ok(TokenStore::open(&self.data_dir.join("tokens.sqlite"))?)
    }
}

/// Runs the hub until `stop` resolves.
pub async fn run_hub(config: HubConfig, stop: impl Future<Output = ()> + Send) -> Result<()> {
    let tls = Tls::load(&config.tls.files())?;
    let (shutdown, stopped) = tokio::sync::watch::channel(false);
    let wait = Duration::from_secs(config.station_wait_seconds);

    let outbound: Vec<String> = config
        .stations
        .iter()
        .filter(|s| s.outbound)
        .map(|s| s.name.clone())
        .collect();
    let mut tasks = tokio::task::JoinSet::new();
    let tunnels = if let Some(addr) = config.tunnel_listen {
        let tunnels = Tunnels::new(&outbound, wait)?;
        let listener = TcpListener::bind(addr)
            .await
            .with_context(|| format!("cannot listen on {addr} (tunnel_listen)"))?;
        println!("hub tunnel listening on {}", listener.local_addr()?);
        std::io::stdout().flush()?;
        let (serving, tls) = (tunnels.clone(), tls.clone());
        let mut stopped = stopped.clone();
        tasks.spawn(async move {
            serving
                .serve(listener, &tls, async move {
                    let _ = stopped.wait_for(|s| *s).await;
                })
                .await
                .map_err(anyhow::Error::from)
        });
        Some(tunnels)
    } else {
        None
    };
    let transport = Transport {
        tls: Some(tls.client_config()?),
        tunnels,
        // Deployed stations know their hub by its certificate.
        secret: None,
    };

    let mut collaborations = HashMap::new();
    for (name, c) in &config.collaborations {
        let addresses: Vec<StationAddress> = c
            .stations
            .iter()
            .map(|s| {
                let entry = config
                    .stations
                    .iter()
                    .find(|e| &e.name == s)
                    .expect("validated: every collaboration station is listed");
                StationAddress {
                    name: s.clone(),
                    url: match &entry.address {
                        Some(addr) => format!("grpc+tls://{addr}"),
                        None => format!("tunnel://{s}"),
                    },
                }
            })
            .collect();
        let options = HubOptions {
            fragment_timeout: Duration::from_secs(config.fragment_timeout_seconds),
            connect_patience: wait,
            collaboration: name.clone(),
            tables: Some(c.tables.clone()),
            transport: transport.clone(),
            data_dir: Some(config.data_dir.join("collaborations").join(name)),
            max_queries_per_minute: config.max_queries_per_minute,
            ..HubOptions::default()
        };
        let hub = Hub::connect(&addresses, options)
            .await
            .with_context(|| format!("collaboration '{name}'"))?;
        let announced: BTreeSet<String> = hub
            .list_tables()
            .await?
            .into_iter()
            .map(|(_, _, table, ..)| table)
            .collect();
        for table in &c.tables {
            ensure!(
                announced.contains(table),
                "collaboration '{name}' lists table '{table}', which none of its stations ({}) \
                 serves",
                c.stations.join(", ")
            );
        }
        eprintln!(
            "collaboration '{name}': {} stations, tables {}",
            c.stations.len(),
            c.tables.join(", ")
        );
        collaborations.insert(
            name.clone(),
            Collaboration {
                hub: Arc::new(hub),
                researchers: c.researchers.clone(),
            },
        );
    }

    let store = Arc::new(config.token_store()?);
    let flight = HubFlightSql::with_tokens(store, collaborations);
    let listener = TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("cannot listen on {} (listen)", config.listen))?;
    let addr = listener.local_addr()?;
    let incoming = railyard_net::conn::accept(listener, tls.server_config()?, Vec::new());
    let mut stopped_hub = stopped.clone();
    tasks.spawn(async move {
        railyard_engine::serve_incoming(flight, incoming, async move {
            let _ = stopped_hub.wait_for(|s| *s).await;
        })
        .await
        .map_err(anyhow::Error::from)
    });
    println!("hub listening on grpc+tls://{addr}");
    std::io::stdout().flush()?;
    tokio::select! {
        () = stop => {}
        Some(done) = tasks.join_next() => {
            done.context("a hub task panicked")??;
            bail!("a hub listener stopped unexpectedly");
        }
    }
    let _ = shutdown.send(true);
    while let Some(done) = tasks.join_next().await {
        done.context("a hub task panicked")??;
    }
    Ok(())
}

/// station.toml
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StationFileConfig {
    /// The station's name, as its certificate and the hub's configuration carry it.
    pub name: String,
    /// The station's state: `audit.jsonl`, `ledger.sqlite`, train work files.
    pub data_dir: PathBuf,
    /// The disclosure policy (docs/policy.md); without one, nothing row-level leaves and no
    /// group of fewer than 5 rows.
    pub policy: Option<PathBuf>,
    /// Inbound mode: where the station listens for its hub.
    pub listen: Option<SocketAddr>,
    /// Outbound mode: `host:port` of the hub's `tunnel_listen`, which the station dials.
    pub hub: Option<String>,
    /// The name the hub's certificate must carry.
    #[serde(default = "default_hub_name")]
    pub hub_name: String,
    pub tls: TlsSection,
    /// `[[tables]]`: the station's data.
    pub tables: Vec<TableEntry>,
}

/// One `[[tables]]` entry of station.toml: a file, or a PostgreSQL relation or query.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TableEntry {
    pub name: String,
    /// A .csv or .parquet file.
    pub path: Option<PathBuf>,
    /// A PostgreSQL connection string (`host=… port=… user=… password=… dbname=…`).
    pub postgres: Option<String>,
    /// With `postgres`: the table or view to read (`schema.table` or `table`).
    pub relation: Option<String>,
    /// With `postgres`: a SELECT whose columns are the table's.
    pub query: Option<String>,
    /// A reference table (a vocabulary): no patient data, an identical copy at every
    /// station; public, joinable in every fragment, answered once (docs/policy.md).
    #[serde(default)]
    pub reference: bool,
}

/// How a station meets its hub.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StationMode {
    /// Inbound: listen here for the hub.
    Listen(SocketAddr),
    /// Outbound: dial the hub's tunnel listener at `host:port`.
    Dial(String),
}

/// A loaded station.toml, ready to open.
pub struct StationSetup {
    pub config: StationFileConfig,
    pub mode: StationMode,
    pub tls: TlsFiles,
    pub files: Vec<TableFile>,
    pub postgres: Vec<PostgresSource>,
    pub policy: Policy,
}

impl StationFileConfig {
    /// Reads and checks station.toml; paths become relative to its directory.
    pub fn load(path: &Path) -> Result<StationSetup> {
        let (config, base): (StationFileConfig, _) = read_toml(path)?;
        let context = || format!("{}", path.display());
        check_name("station", &config.name).with_context(context)?;
        check_name("the hub's", &config.hub_name).with_context(context)?;
        ensure!(
            config.name != config.hub_name,
            "{}: the station's name is the hub's ('{}')",
            path.display(),
            config.name
        );
        let mode = match (&config.listen, &config.hub) {
            (Some(addr), None) => StationMode::Listen(*addr),
            (None, Some(hub)) => StationMode::Dial(hub.clone()),
            _ => bail!(
                "{}: give `listen = \"host:port\"` (the hub dials the station) or `hub = \
                 \"host:port\"` (the station dials the hub's tunnel_listen), exactly one",
                path.display()
            ),
        };
        ensure!(
            !config.tables.is_empty(),
            "{}: no [[tables]]",
            path.display()
        );
        let mut files = Vec::new();
        let mut postgres = Vec::new();
        let mut names = BTreeSet::new();
        for t in &config.tables {
            ensure!(
                names.insert(&t.name),
                "{}: table '{}' is listed twice",
                path.display(),
                t.name
            );
            match (&t.path, &t.postgres) {
                (Some(file), None) => {
                    ensure!(
                        t.relation.is_none() && t.query.is_none(),
                        "{}: table '{}': `relation` and `query` go with `postgres`",
                        path.display(),
                        t.name
                    );
                    let file = base.join(file);
                    let format = Format::of(&file).with_context(|| {
                        format!(
                            "{}: table '{}': {} is neither .csv nor .parquet",
                            path.display(),
                            t.name,
                            file.display()
                        )
                    })?;
                    files.push(TableFile {
                        name: t.name.clone(),
                        path: file,
                        format,
                        schema: None,
                    });
                }
                (None, Some(connection)) => {
                    let relation = match (&t.relation, &t.query) {
                        (Some(r), None) => Relation::Table(r.clone()),
                        (None, Some(q)) => Relation::Query(q.clone()),
                        _ => bail!(
                            "{}: table '{}': give `relation = \"schema.table\"` or `query = \
                             \"SELECT …\"`, exactly one",
                            path.display(),
                            t.name
                        ),
                    };
                    postgres.push(PostgresSource {
                        name: t.name.clone(),
                        connection: connection.clone(),
                        relation,
                    });
                }
                _ => bail!(
                    "{}: table '{}': give `path` (a .csv or .parquet file) or `postgres` (a \
                     connection string), exactly one",
                    path.display(),
                    t.name
                ),
            }
        }
        let mut policy = match &config.policy {
            Some(p) => Policy::load(&base.join(p))?,
            None => Policy::default(),
        };
        for t in config.tables.iter().filter(|t| t.reference) {
            // A file's digest is of its bytes; a relation's is computed by the station from
            // its rows (an empty digest asks for that).
            let digest = match &t.path {
                Some(file) => crate::local::file_sha256(&base.join(file))?,
                None => String::new(),
            };
            policy.reference_tables.insert(t.name.clone(), digest);
        }
        let config = StationFileConfig {
            data_dir: base.join(&config.data_dir),
            tls: config.tls.rebased(&base),
            ..config
        };
        let tls = config.tls.files();
        Ok(StationSetup {
            config,
            mode,
            tls,
            files,
            postgres,
            policy,
        })
    }
}

/// Runs a station until `stop` resolves.
pub async fn run_station(setup: StationSetup, stop: impl Future<Output = ()> + Send) -> Result<()> {
    let tls = Tls::load(&setup.tls)?;
    let config = &setup.config;
    let station_config = StationConfig {
        policy: setup.policy,
        audit_log: config.data_dir.join("audit.jsonl"),
        collaboration_secret: None,
        hub_secret: None,
    };
    let station = Arc::new(
        Station::open_sources(
            config.name.clone(),
            &setup.files,
            &setup.postgres,
            station_config,
        )
        .await?,
    );
    let hub_name = vec![config.hub_name.clone()];
    type Incoming =
        std::pin::Pin<Box<dyn futures::Stream<Item = std::io::Result<railyard_net::Conn>> + Send>>;
    let incoming: Incoming = match &setup.mode {
        StationMode::Listen(listen) => {
            let listener = TcpListener::bind(listen)
                .await
                .with_context(|| format!("cannot listen on {listen}"))?;
            println!(
                "station {} listening on {}",
                config.name,
                listener.local_addr()?
            );
            Box::pin(railyard_net::conn::accept(
                listener,
                tls.mutual_server_config(hub_name.clone())?,
                hub_name,
            ))
        }
        StationMode::Dial(hub) => {
            println!("station {} dialing the hub at {hub}", config.name);
            Box::pin(railyard_net::conn::dial_out(
                hub.clone(),
                config.hub_name.clone(),
                tls.client_config()?,
            ))
        }
    };
    std::io::stdout().flush()?;
    railyard_station::serve_incoming(station, incoming, stop).await?;
    Ok(())
}

/// `90d`, `12h`, `30m`, `45s` (or plain seconds) as a duration.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let (number, unit) = text
        .find(|c: char| !c.is_ascii_digit())
        .map_or((text, "s"), |i| text.split_at(i));
    let n: u64 = number
        .parse()
        .map_err(|_| format!("'{text}' is not a duration like 90d, 12h, 30m or 45s"))?;
    let seconds = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => return Err(format!("'{text}': the unit must be s, m, h or d")),
    };
    Ok(Duration::from_secs(n.saturating_mul(seconds)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_with_units() {
        assert_eq!(parse_duration("90d"), Ok(Duration::from_secs(90 * 86_400)));
        assert_eq!(parse_duration("2h"), Ok(Duration::from_secs(7200)));
        assert_eq!(parse_duration("5"), Ok(Duration::from_secs(5)));
        assert!(parse_duration("5w").is_err());
        assert!(parse_duration("d").is_err());
    }

    #[test]
    fn a_hub_config_names_its_mistakes() {
        let config = |stations: &str, collaborations: &str| -> Result<()> {
            let text = format!(
                "listen = \"127.0.0.1:0\"\ndata_dir = \"d\"\n[tls]\nca = \"a\"\ncert = \"b\"\n\
                 key = \"c\"\n{stations}\n{collaborations}"
            );
            let c: HubConfig = toml::from_str(&text)?;
            c.validate()
        };
        let lung = "[collaborations.lung]\nstations = [\"a\"]\ntables = [\"lung\"]";
        assert!(config("[[stations]]\nname = \"a\"\naddress = \"h:1\"", lung).is_ok());
        let e = config("[[stations]]\nname = \"a\"\noutbound = true", lung).unwrap_err();
        assert!(e.to_string().contains("tunnel_listen"), "{e}");
        let e = config("[[stations]]\nname = \"a\"", lung).unwrap_err();
        assert!(e.to_string().contains("outbound = true"), "{e}");
        let e = config("[[stations]]\nname = \"a_b\"\naddress = \"h:1\"", lung).unwrap_err();
        assert!(e.to_string().contains("certificate"), "{e}");
        let e = config(
            "[[stations]]\nname = \"a\"\naddress = \"h:1\"",
            "[collaborations.lung]\nstations = [\"z\"]\ntables = [\"lung\"]",
        )
        .unwrap_err();
        assert!(e.to_string().contains("'z'"), "{e}");
    }
}
