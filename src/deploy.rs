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
use railyard_engine::flight_sql::{Collaboration, Collaborations};
use railyard_engine::tokens::TokenStore;
use railyard_engine::{
    Hub, HubFlightSql, HubOptions, StationAddress, StationBoard, Transport, VerticalSpec,
};
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

fn default_station_check() -> u64 {
    5
}

/// `[tls]`: the collaboration's CA and this party's certificate and key.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
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
    /// The web console (HTTPS with the hub's certificate; every page and call needs a
    /// researcher's token, as Flight SQL does). Off unless set.
    pub console_listen: Option<SocketAddr>,
    /// The hub's state: `tokens.sqlite` (researchers' tokens), `console/history.jsonl`.
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
    /// Seconds between the hub's questions to every station (online? what tables and
    /// policy?); `railyard.stations` is at most this old.
    #[serde(default = "default_station_check")]
    pub station_check_seconds: u64,
    pub tls: TlsSection,
    /// `[[stations]]`: every station this hub talks to.
    pub stations: Vec<StationEntry>,
    /// `[collaborations.NAME]`: who may query which tables at which stations.
    pub collaborations: BTreeMap<String, CollaborationEntry>,
    /// The file it was read from (SIGHUP reads it again).
    #[serde(skip)]
    pub path: Option<PathBuf>,
}

/// One `[[stations]]` entry of hub.toml.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
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
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CollaborationEntry {
    pub stations: Vec<String>,
    /// Horizontally partitioned tables: each station holds other patients.
    #[serde(default)]
    pub tables: Vec<String>,
    /// `[[collaborations.NAME.vertical]]`: vertically partitioned tables.
    #[serde(default)]
    pub vertical: Vec<VerticalEntry>,
    #[serde(default)]
    pub researchers: Vec<String>,
}

/// One `[[collaborations.NAME.vertical]]` entry of hub.toml: a table whose member stations
/// each hold other columns of the same patients, linked on `key` (which the members
/// pseudonymize with the collaboration secret only they hold; docs/vertical.md).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VerticalEntry {
    pub name: String,
    /// The linking column, present at every member (never a column of the joined table).
    pub key: String,
    /// The stations holding its parts (at least two, all in the collaboration's `stations`).
    pub members: Vec<String>,
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
        config.path = Some(path.to_path_buf());
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
        ensure!(
            self.station_check_seconds >= 1,
            "station_check_seconds must be at least 1"
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
            ensure!(
                !c.tables.is_empty() || !c.vertical.is_empty(),
                "collaboration '{name}' has no tables (give `tables` or \
                 [[collaborations.{name}.vertical]])"
            );
            for s in &c.stations {
                ensure!(
                    names.contains(s),
                    "collaboration '{name}' names station '{s}', which is not in [[stations]]"
                );
            }
            let mut tables: BTreeSet<&String> = BTreeSet::new();
            for t in &c.tables {
                ensure!(
                    tables.insert(t),
                    "collaboration '{name}' lists table '{t}' twice"
                );
            }
            for v in &c.vertical {
                ensure!(
                    tables.insert(&v.name),
                    "collaboration '{name}': table '{}' is listed twice (a table is either in \
                     `tables` or a vertical table, once)",
                    v.name
                );
                ensure!(
                    !v.key.is_empty(),
                    "collaboration '{name}': vertical table '{}' needs its linking column \
                     (`key`)",
                    v.name
                );
                ensure!(
                    v.members.len() >= 2,
                    "collaboration '{name}': vertical table '{}' needs at least two `members` \
                     (the stations holding its parts)",
                    v.name
                );
                let mut seen = BTreeSet::new();
                for m in &v.members {
                    ensure!(
                        c.stations.contains(m),
                        "collaboration '{name}': vertical table '{}' has member '{m}', which \
                         is not among the collaboration's stations",
                        v.name
                    );
                    ensure!(
                        seen.insert(m),
                        "collaboration '{name}': vertical table '{}' lists member '{m}' twice",
                        v.name
                    );
                }
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

/// Runs the hub until `stop` resolves. While it runs, it asks every station for its
/// announcement every `station_check_seconds` (`railyard.stations`; a station that does not
/// answer is offline, and queries that need it fail at once), builds a collaboration anew
/// when a station announces other tables or another policy, and re-reads hub.toml on
/// SIGHUP.
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
        board: Some(StationBoard::new()),
    };

    let mut collaborations = HashMap::new();
    for (name, c) in &config.collaborations {
        let hub = build_collaboration(&config, name, c, &transport, wait).await?;
        eprintln!(
            "collaboration '{name}': {} stations, tables {}",
            c.stations.len(),
            c.served().join(", ")
        );
        collaborations.insert(
            name.clone(),
            Collaboration {
                hub: Arc::new(hub),
                researchers: c.researchers.clone(),
            },
        );
    }
    let live = Collaborations::new(collaborations);

    let store = Arc::new(config.token_store()?);
    let flight = HubFlightSql::with_tokens(Arc::clone(&store), live.clone());
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
    let console = match config.console_listen {
        Some(console_addr) => {
            let listener = https_listener(console_addr, &tls, "console_listen").await?;
            let local = axum::serve::Listener::local_addr(&listener)?;
            let (store, live) = (Arc::clone(&store), live.clone());
            let history = Some(config.data_dir.join("console").join("history.jsonl"));
            let mut stopped_console = stopped.clone();
            tasks.spawn(async move {
                railyard_engine::console::serve_tokens(listener, store, live, history, async move {
                    let _ = stopped_console.wait_for(|s| *s).await;
                })
                .await
                .context("the console stopped")
            });
            Some(local)
        }
        None => None,
    };
    let mut hangup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        .context("cannot listen for SIGHUP")?;
    let supervisor = Supervisor {
        config,
        live,
        transport,
    };
    let mut stopped_supervisor = stopped.clone();
    tasks.spawn(async move {
        supervisor
            .run(&mut hangup, async move {
                let _ = stopped_supervisor.wait_for(|s| *s).await;
            })
            .await;
        Ok(())
    });
    // One write: a reader of the first line never sees half of the second.
    let mut lines = format!("hub listening on grpc+tls://{addr}\n");
    if let Some(console) = console {
        lines.push_str(&format!("console at https://{console}/\n"));
    }
    let mut stdout = std::io::stdout().lock();
    stdout.write_all(lines.as_bytes())?;
    stdout.flush()?;
    drop(stdout);
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

impl CollaborationEntry {
    /// Every table its researchers may query: the horizontal ones, then the vertical ones.
    fn served(&self) -> Vec<String> {
        self.tables
            .iter()
            .chain(self.vertical.iter().map(|v| &v.name))
            .cloned()
            .collect()
    }
}

/// Connects to the stations of collaboration `name` and builds its catalog from what they
/// announce, waiting up to `patience` for each station.
async fn build_collaboration(
    config: &HubConfig,
    name: &str,
    c: &CollaborationEntry,
    transport: &Transport,
    patience: Duration,
) -> Result<Hub> {
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
    let served = c.served();
    let options = HubOptions {
        fragment_timeout: Duration::from_secs(config.fragment_timeout_seconds),
        connect_patience: patience,
        collaboration: name.to_string(),
        tables: Some(served.clone()),
        vertical: c
            .vertical
            .iter()
            .map(|v| VerticalSpec {
                name: v.name.clone(),
                key: v.key.clone(),
                members: v.members.clone(),
            })
            .collect(),
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
    for table in &served {
        ensure!(
            announced.contains(table),
            "collaboration '{name}' lists table '{table}', which none of its stations ({}) \
             serves",
            c.stations.join(", ")
        );
    }
    Ok(hub)
}

/// Keeps a running hub's collaborations current: probes the stations, rebuilds a
/// collaboration whose stations announce something new, re-reads hub.toml on SIGHUP.
struct Supervisor {
    config: HubConfig,
    live: Collaborations,
    transport: Transport,
}

impl Supervisor {
    /// How long a rebuild waits for a station (it was just seen, so it should answer).
    const REBUILD_PATIENCE: Duration = Duration::from_secs(5);

    async fn run(
        mut self,
        hangup: &mut tokio::signal::unix::Signal,
        stop: impl Future<Output = ()>,
    ) {
        tokio::pin!(stop);
        let every = Duration::from_secs(self.config.station_check_seconds);
        let mut ticks = tokio::time::interval(every);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = &mut stop => return,
                _ = ticks.tick() => self.probe(every).await,
                Some(()) = hangup.recv() => self.reload().await,
            }
        }
    }

    /// Asks every collaboration's stations for their announcements; builds anew each
    /// collaboration with a stale catalog.
    async fn probe(&self, every: Duration) {
        // A station that takes longer than this to list its tables counts as offline.
        let timeout = every.clamp(Duration::from_secs(1), Duration::from_secs(10));
        let current = self.live.current();
        for (name, collaboration) in current.iter() {
            if !collaboration.hub.probe(timeout).await {
                continue;
            }
            let Some(entry) = self.config.collaborations.get(name) else {
                continue;
            };
            match build_collaboration(
                &self.config,
                name,
                entry,
                &self.transport,
                Self::REBUILD_PATIENCE,
            )
            .await
            {
                Ok(hub) => {
                    self.live.replace_hub(name, Arc::new(hub));
                    eprintln!(
                        "collaboration '{name}': catalog rebuilt (a station announced other \
                         tables or another policy)"
                    );
                }
                Err(e) => eprintln!(
                    "collaboration '{name}': a station announced other tables or another \
                     policy, but the catalog could not be rebuilt, so queries are still \
                     planned on the old one and each station still checks its own policy: \
                     {e:#}"
                ),
            }
        }
    }

    /// Re-reads hub.toml. Researchers take effect at once (a removed one is refused from the
    /// next call); stations and tables by building each changed collaboration anew. A file
    /// that does not load changes nothing.
    async fn reload(&mut self) {
        let Some(path) = self.config.path.clone() else {
            return;
        };
        let next = match HubConfig::load(&path) {
            Ok(next) => next,
            Err(e) => {
                eprintln!("hub.toml not reloaded, the hub keeps its running configuration: {e:#}");
                return;
            }
        };
        if let Err(e) = self.restart_only(&next) {
            eprintln!("hub.toml not reloaded, the hub keeps its running configuration: {e:#}");
            return;
        }
        let current = self.live.current();
        let mut rebuilt = HashMap::new();
        // Settings every collaboration's hub is built with.
        let same_settings = self.config.fragment_timeout_seconds == next.fragment_timeout_seconds
            && self.config.max_queries_per_minute == next.max_queries_per_minute;
        for (name, c) in &next.collaborations {
            let unchanged = same_settings
                && self.config.collaborations.get(name).is_some_and(|old| {
                    old.stations == c.stations
                        && old.tables == c.tables
                        && old.vertical == c.vertical
                        && c.stations.iter().all(|s| {
                            self.config.stations.iter().find(|e| &e.name == s)
                                == next.stations.iter().find(|e| &e.name == s)
                        })
                });
            let old = current.get(name).map(|c| Arc::clone(&c.hub));
            let hub = match old {
                Some(hub) if unchanged => hub,
                old => {
                    match build_collaboration(
                        &next,
                        name,
                        c,
                        &self.transport,
                        Self::REBUILD_PATIENCE,
                    )
                    .await
                    {
                        Ok(hub) => Arc::new(hub),
                        Err(e) => {
                            eprintln!(
                                "hub.toml: collaboration '{name}' could not be built ({e:#}); {}",
                                if old.is_some() {
                                    "it keeps its old stations and tables, with the new \
                                     researchers"
                                } else {
                                    "it is not served until the next reload"
                                }
                            );
                            match old {
                                Some(hub) => hub,
                                None => continue,
                            }
                        }
                    }
                }
            };
            rebuilt.insert(
                name.clone(),
                Collaboration {
                    hub,
                    researchers: c.researchers.clone(),
                },
            );
        }
        if let Some(board) = &self.transport.board {
            let names: Vec<String> = next.stations.iter().map(|s| s.name.clone()).collect();
            board.retain(&names);
        }
        let served: Vec<&String> = rebuilt.keys().collect();
        eprintln!("hub.toml reloaded: collaborations {served:?}");
        self.live.replace(rebuilt);
        self.config = next;
    }

    /// Refuses a reload that changes what only a restart can change.
    fn restart_only(&self, next: &HubConfig) -> Result<()> {
        let old = &self.config;
        ensure!(
            old.listen == next.listen
                && old.tunnel_listen == next.tunnel_listen
                && old.console_listen == next.console_listen
                && old.name == next.name
                && old.data_dir == next.data_dir
                && old.tls == next.tls
                && old.station_wait_seconds == next.station_wait_seconds
                && old.station_check_seconds == next.station_check_seconds,
            "`name`, `listen`, `tunnel_listen`, `console_listen`, `data_dir`, `station_wait_seconds`, \
             `station_check_seconds` and [tls] change only with a restart"
        );
        for s in next.stations.iter().filter(|s| s.outbound) {
            ensure!(
                old.stations.iter().any(|o| o.name == s.name && o.outbound),
                "station '{}' is a new outbound station: the hub accepts new outbound stations \
                 after a restart (inbound ones are dialled at once)",
                s.name
            );
        }
        Ok(())
    }
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
    /// The collaboration secret (`railyard secret init`) that keys the pseudonyms of
    /// `join_key` columns, for vertical tables. Readable by its owner only; the hub never
    /// holds it. Without one the station links no vertical table.
    pub collaboration_secret_file: Option<PathBuf>,
    /// The operator's read-only audit page (HTTPS with the station's certificate): its
    /// decisions, `audit verify`, the ε spent per researcher. Off unless set; needs
    /// `admin_token_file`.
    pub admin_listen: Option<SocketAddr>,
    /// The operator's token for that page: one line of at least 32 letters or digits, in a
    /// file only its owner may read.
    pub admin_token_file: Option<PathBuf>,
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
    pub collaboration_secret: Option<Arc<[u8]>>,
    /// The audit page's address and the operator's token.
    pub admin: Option<(SocketAddr, String)>,
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
        let collaboration_secret = match &config.collaboration_secret_file {
            Some(file) => Some(
                crate::secret::load(&base.join(file))
                    .with_context(|| format!("{}: collaboration_secret_file", path.display()))?,
            ),
            None => None,
        };
        let admin = match (config.admin_listen, &config.admin_token_file) {
            (Some(addr), Some(file)) => Some((
                addr,
                crate::admin::load_token(&base.join(file))
                    .with_context(|| format!("{}: admin_token_file", path.display()))?,
            )),
            (None, None) => None,
            _ => bail!(
                "{}: the audit page needs both `admin_listen` and `admin_token_file`",
                path.display()
            ),
        };
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
            collaboration_secret,
            admin,
        })
    }
}

/// Runs a station until `stop` resolves.
pub async fn run_station(setup: StationSetup, stop: impl Future<Output = ()> + Send) -> Result<()> {
    let tls = Tls::load(&setup.tls)?;
    let config = &setup.config;
    let station_config = StationConfig {
        policy: setup.policy,
        audit_log: audit_path(config),
        collaboration_secret: setup.collaboration_secret.clone(),
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
    // Its address lines, written at once when the station is ready.
    let mut lines = String::new();
    type Incoming =
        std::pin::Pin<Box<dyn futures::Stream<Item = std::io::Result<railyard_net::Conn>> + Send>>;
    let incoming: Incoming = match &setup.mode {
        StationMode::Listen(listen) => {
            let listener = TcpListener::bind(listen)
                .await
                .with_context(|| format!("cannot listen on {listen}"))?;
            lines.push_str(&format!(
                "station {} listening on {}\n",
                config.name,
                listener.local_addr()?
            ));
            Box::pin(railyard_net::conn::accept(
                listener,
                tls.mutual_server_config(hub_name.clone())?,
                hub_name,
            ))
        }
        StationMode::Dial(hub) => {
            lines.push_str(&format!(
                "station {} dialing the hub at {hub}\n",
                config.name
            ));
            Box::pin(railyard_net::conn::dial_out(
                hub.clone(),
                config.hub_name.clone(),
                tls.client_config()?,
            ))
        }
    };
    let (stopping, stopped) = tokio::sync::watch::channel(false);
    let admin = match &setup.admin {
        Some((addr, token)) => {
            let listener = https_listener(*addr, &tls, "admin_listen").await?;
            lines.push_str(&format!(
                "station admin at https://{}/\n",
                axum::serve::Listener::local_addr(&listener)?
            ));
            let mut stopped = stopped.clone();
            Some(tokio::spawn(crate::admin::serve(
                listener,
                Arc::clone(&station),
                audit_path(config),
                token.clone(),
                async move {
                    let _ = stopped.wait_for(|s| *s).await;
                },
            )))
        }
        None => None,
    };
    {
        let mut stdout = std::io::stdout().lock();
        stdout.write_all(lines.as_bytes())?;
        stdout.flush()?;
    }
    let served = railyard_station::serve_incoming(station, incoming, stop).await;
    let _ = stopping.send(true);
    if let Some(admin) = admin {
        admin
            .await
            .context("the audit page panicked")?
            .context("the audit page stopped")?;
    }
    served?;
    Ok(())
}

/// An HTTPS listener on `addr` with this party's certificate (`key` names the setting).
async fn https_listener(
    addr: SocketAddr,
    tls: &Tls,
    key: &str,
) -> Result<railyard_engine::console::auth::TlsListener> {
    let listener = TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on {addr} ({key})"))?;
    Ok(railyard_engine::console::auth::TlsListener::new(
        listener,
        tls.https_server_config()?,
    )?)
}

/// Where a deployed station keeps its audit log.
fn audit_path(config: &StationFileConfig) -> PathBuf {
    config.data_dir.join("audit.jsonl")
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

        // Vertical tables: at least two members, all among the collaboration's stations,
        // each table once.
        let two = "[[stations]]\nname = \"a\"\naddress = \"h:1\"\n[[stations]]\nname = \"b\"\n\
                   address = \"h:2\"";
        let vertical = |members: &str, tables: &str| {
            config(
                two,
                &format!(
                    "[collaborations.link]\nstations = [\"a\", \"b\"]\n{tables}\n\
                     [[collaborations.link.vertical]]\nname = \"breast\"\nkey = \"id\"\n\
                     members = [{members}]"
                ),
            )
        };
        assert!(vertical("\"a\", \"b\"", "").is_ok());
        let e = vertical("\"a\"", "").unwrap_err();
        assert!(e.to_string().contains("at least two"), "{e}");
        let e = vertical("\"a\", \"c\"", "").unwrap_err();
        assert!(e.to_string().contains("member 'c'"), "{e}");
        let e = vertical("\"a\", \"a\"", "").unwrap_err();
        assert!(e.to_string().contains("twice"), "{e}");
        let e = vertical("\"a\", \"b\"", "tables = [\"breast\"]").unwrap_err();
        assert!(e.to_string().contains("listed twice"), "{e}");
        let e = config(two, "[collaborations.link]\nstations = [\"a\"]").unwrap_err();
        assert!(e.to_string().contains("no tables"), "{e}");
    }
}
