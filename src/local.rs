//! `railyard local`: a whole federation in one process, on loopback sockets.
//!
//! Every `.csv`/`.parquet` file in a table's directory becomes one station (named after the
//! file's stem); files with the same stem under different tables belong to the same station.
//! A vertical table's files hold other columns of the same patients; the stations share a
//! fresh random collaboration secret for its pseudonyms, and the hub joins them.
//! Each station serves its own Flight endpoint on `127.0.0.1:0`, and the hub connects to them
//! exactly as it would to remote stations.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;

use anyhow::{Context, Result, anyhow, bail};
use arrow::datatypes::SchemaRef;
use datafusion::prelude::{CsvReadOptions, ParquetReadOptions, SessionContext};
use railyard_engine::{Hub, HubOptions, StationAddress, VerticalSpec};
use railyard_station::{Format, Policy, Station, StationConfig, TableFile, Visibility};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinSet;

/// `NAME=DIR`: a federated table whose parts are the files in `DIR`, one per station.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableSpec {
    pub name: String,
    pub dir: PathBuf,
    /// `None`: horizontally partitioned (each file holds other rows, same columns).
    /// `Some(key)`: vertically partitioned (each file holds other columns of the same
    /// patients plus the linking column `key`; the table is their inner join on it).
    pub key: Option<String>,
}

impl FromStr for TableSpec {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (name, dir) = s
            .split_once('=')
            .ok_or_else(|| format!("expected NAME=DIR, got '{s}'"))?;
        let name = name.trim();
        if name.is_empty() {
            return Err(format!("table name missing in '{s}'"));
        }
        if dir.trim().is_empty() {
            return Err(format!("directory missing in '{s}'"));
        }
        Ok(TableSpec {
            name: name.to_string(),
            dir: PathBuf::from(dir.trim()),
            key: None,
        })
    }
}

/// The stations of a local federation, derived from the table directories: station name →
/// its tables.
pub async fn plan_stations(specs: &[TableSpec]) -> Result<BTreeMap<String, Vec<TableFile>>> {
    let mut stations: BTreeMap<String, Vec<TableFile>> = BTreeMap::new();
    let mut seen_tables = std::collections::BTreeSet::new();
    for spec in specs {
        if !seen_tables.insert(spec.name.clone()) {
            bail!("table '{}' is given twice", spec.name);
        }
        let files = table_files(&spec.dir).with_context(|| format!("table '{}'", spec.name))?;
        let schemas = match &spec.key {
            // Each part has its own columns: each file keeps its own schema, and must hold
            // the key.
            Some(key) => {
                for (station, path, format) in &files {
                    let schema = file_schema(path, *format).await?;
                    if schema.field_with_name(key).is_err() {
                        bail!(
                            "vertical table '{}': station '{station}' ({}) has no key column \
                             '{key}'; its columns are {}",
                            spec.name,
                            path.display(),
                            schema
                                .fields()
                                .iter()
                                .map(|f| f.name().as_str())
                                .collect::<Vec<_>>()
                                .join(", ")
                        );
                    }
                }
                vec![None; files.len()]
            }
            None => unified_schemas(&files)
                .await
                .with_context(|| format!("table '{}' in {}", spec.name, spec.dir.display()))?,
        };
        for ((station, path, format), schema) in files.into_iter().zip(schemas) {
            stations.entry(station).or_default().push(TableFile {
                name: spec.name.clone(),
                path,
                format,
                schema,
            });
        }
    }
    Ok(stations)
}

/// The schema a station will read `path` with (CSV: inferred).
async fn file_schema(path: &Path, format: Format) -> Result<SchemaRef> {
    let ctx = SessionContext::new();
    let name = path.to_string_lossy().into_owned();
    let ext = format!(
        ".{}",
        path.extension()
            .and_then(|e| e.to_str())
            .unwrap_or_default()
    );
    let df = match format {
        Format::Csv => {
            ctx.read_csv(
                name,
                CsvReadOptions::new().has_header(true).file_extension(&ext),
            )
            .await
        }
        Format::Parquet => {
            ctx.read_parquet(name, ParquetReadOptions::default().file_extension(&ext))
                .await
        }
    }
    .with_context(|| format!("cannot read {}", path.display()))?;
    Ok(Arc::new(df.schema().as_arrow().clone()))
}

/// The data files of one table directory: (station name, path, format), sorted by station.
fn table_files(dir: &Path) -> Result<Vec<(String, PathBuf, Format)>> {
    let entries = std::fs::read_dir(dir)
        .with_context(|| format!("cannot read directory {}", dir.display()))?;
    let mut files = BTreeMap::new();
    for entry in entries {
        let path = entry?.path();
        if !path.is_file() {
            continue;
        }
        let Some(format) = Format::of(&path) else {
            continue;
        };
        let stem = path
            .file_stem()
            .and_then(|s| s.to_str())
            .ok_or_else(|| anyhow!("file name is not UTF-8: {}", path.display()))?
            .to_string();
        if let Some((other, _)) = files.insert(stem.clone(), (path.clone(), format)) {
            bail!(
                "station '{stem}' has two files in {}: {} and {}",
                dir.display(),
                other.display(),
                path.display()
            );
        }
    }
    if files.is_empty() {
        bail!("no .csv or .parquet files in {}", dir.display());
    }
    Ok(files
        .into_iter()
        .map(|(stem, (path, format))| (stem, path, format))
        .collect())
}

/// The schema each file should be read with, so all stations of a table agree on types:
/// CSV files are inferred together (a column that is integral at one station and fractional
/// at another becomes a float everywhere); if the table also has Parquet parts, the first
/// Parquet file's schema is authoritative for the CSV parts.
async fn unified_schemas(files: &[(String, PathBuf, Format)]) -> Result<Vec<Option<SchemaRef>>> {
    let ctx = SessionContext::new();
    let csv: Vec<String> = files
        .iter()
        .filter(|f| f.2 == Format::Csv)
        .map(|f| f.1.to_string_lossy().into_owned())
        .collect();
    let first_parquet = files.iter().find(|f| f.2 == Format::Parquet);
    let csv_schema: Option<SchemaRef> = match (first_parquet, csv.is_empty()) {
        (_, true) => None,
        (Some((_, path, _)), false) => Some(file_schema(path, Format::Parquet).await?),
        (None, false) => {
            let df = ctx
                .read_csv(csv.clone(), CsvReadOptions::new().has_header(true))
                .await
                .with_context(|| format!("cannot infer a schema from {}", csv.join(", ")))?;
            Some(Arc::new(df.schema().as_arrow().clone()))
        }
    };
    Ok(files
        .iter()
        .map(|f| match f.2 {
            Format::Csv => csv_schema.clone(),
            Format::Parquet => None,
        })
        .collect())
}

/// How the stations of a local federation are governed.
#[derive(Debug, Clone)]
pub struct Governance {
    /// The policy every station applies ([`Policy::default`]: nothing row-level, k = 5).
    pub policy: Policy,
    /// Each station keeps its audit log in `DIR/<station>/audit.jsonl`.
    pub data_dir: PathBuf,
    /// Reference tables (`--reference NAME=FILE`): every station serves the same file.
    pub references: Vec<ReferenceSpec>,
}

/// `NAME=FILE`: a reference table (a vocabulary) that every station holds a copy of.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReferenceSpec {
    pub name: String,
    pub path: PathBuf,
}

impl FromStr for ReferenceSpec {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (name, path) = s
            .split_once('=')
            .ok_or_else(|| format!("expected NAME=FILE, got '{s}'"))?;
        let (name, path) = (name.trim(), path.trim());
        if name.is_empty() || path.is_empty() {
            return Err(format!("expected NAME=FILE, got '{s}'"));
        }
        let path = PathBuf::from(path);
        if Format::of(&path).is_none() {
            return Err(format!(
                "reference table '{name}': {} is not a .csv or .parquet file",
                path.display()
            ));
        }
        Ok(ReferenceSpec {
            name: name.to_string(),
            path,
        })
    }
}

/// The SHA-256 (hex) of a file's bytes: what a station announces of a reference table.
pub fn file_sha256(path: &Path) -> Result<String> {
    use sha2::Digest;
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    Ok(sha2::Sha256::digest(&bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect())
}

impl Governance {
    /// `policy` from a file (or the default policy), audit logs under `data_dir`.
    pub fn new(policy: Option<&Path>, data_dir: impl Into<PathBuf>) -> Result<Self> {
        let policy = match policy {
            Some(path) => Policy::load(path)?,
            None => Policy::default(),
        };
        Ok(Self {
            policy,
            data_dir: data_dir.into(),
            references: Vec::new(),
        })
    }

    /// Where `station` keeps its audit log.
    pub fn audit_log(&self, station: &str) -> PathBuf {
        self.data_dir.join(station).join("audit.jsonl")
    }

    /// The policy of the local stations: the given one, with every vertical table opted in
    /// (`allow_vertical`) and its key column a `join_key`, unless the policy file says
    /// otherwise (then the stations refuse, naming the rule).
    pub fn station_policy(&self, specs: &[TableSpec]) -> Policy {
        let mut policy = self.policy.clone();
        for spec in specs {
            let Some(key) = &spec.key else { continue };
            let table = policy.tables.entry(spec.name.clone()).or_default();
            // An explicit `allow_vertical = false`, for the table or the whole file, wins.
            if table.allow_vertical.is_none() && self.policy.allow_vertical.is_none() {
                table.allow_vertical = Some(true);
            }
            table
                .columns
                .entry(key.clone())
                .or_insert((Visibility::JoinKey, 0));
        }
        policy
    }
}

/// A fresh hub secret: 32 random bytes as hex (a header value must be text).
fn hub_secret() -> String {
    use rand::RngCore;
    let mut bytes = [0u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The threads `railyard local` runs its stations on ("railyard-station"), apart from the
/// hub's. Dropping it stops them without waiting, so it may be dropped in async code.
pub struct StationRuntime(Option<tokio::runtime::Runtime>);

/// A multi-threaded runtime whose threads are named `name`. Planning recurses over a query's
/// plan; the statement limits (railyard_policy::limits) keep plans shallow, and 8 MiB per
/// worker (tokio's default is 2 MiB) keeps a margin under them in a debug build too.
pub fn runtime(name: &str) -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name(name)
        .thread_stack_size(8 << 20)
        .build()
        .with_context(|| format!("cannot start the async runtime '{name}'"))
}

impl StationRuntime {
    pub fn new() -> Result<Self> {
        Ok(Self(Some(runtime("railyard-station")?)))
    }

    pub fn handle(&self) -> tokio::runtime::Handle {
        // Present until dropped.
        self.0
            .as_ref()
            .expect("the runtime is present until dropped")
            .handle()
            .clone()
    }
}

impl Drop for StationRuntime {
    fn drop(&mut self) {
        if let Some(runtime) = self.0.take() {
            runtime.shutdown_background();
        }
    }
}

/// A running local federation.
pub struct LocalFederation {
    pub hub: Arc<Hub>,
    /// The secret the stations require of their hub (for tests that play the hub).
    pub hub_secret: Arc<str>,
    /// `grpc://127.0.0.1:PORT` of the hub's Flight SQL endpoint.
    pub hub_url: String,
    pub stations: Vec<StationAddress>,
    shutdown: watch::Sender<bool>,
    tasks: JoinSet<Result<()>>,
}

impl LocalFederation {
    /// Starts one station per data file stem and a hub serving Flight SQL on `hub_listener`.
    pub async fn start(
        specs: &[TableSpec],
        hub_listener: TcpListener,
        options: HubOptions,
        governance: &Governance,
    ) -> Result<Self> {
        Self::start_on(specs, hub_listener, options, governance, None).await
    }

    /// [`LocalFederation::start`], with the stations opened and served on `stations` (a
    /// runtime of their own) if given: `railyard local` keeps them apart from the hub's
    /// threads, as separate machines would be, so that the hub's own CPU time can be read
    /// per thread (benches/adbc.py).
    pub async fn start_on(
        specs: &[TableSpec],
        hub_listener: TcpListener,
        options: HubOptions,
        governance: &Governance,
        stations: Option<tokio::runtime::Handle>,
    ) -> Result<Self> {
        let mut plan = plan_stations(specs).await?;
        let mut policy = governance.station_policy(specs);
        for r in &governance.references {
            if specs.iter().any(|s| s.name == r.name) {
                bail!(
                    "table '{}' is given both as --table and as --reference",
                    r.name
                );
            }
            let format = Format::of(&r.path)
                .ok_or_else(|| anyhow!("{} is not a .csv or .parquet file", r.path.display()))?;
            policy
                .reference_tables
                .insert(r.name.clone(), file_sha256(&r.path)?);
            for tables in plan.values_mut() {
                tables.push(TableFile {
                    name: r.name.clone(),
                    path: r.path.clone(),
                    format,
                    schema: None,
                });
            }
        }
        let (shutdown, stop) = watch::channel(false);
        let mut tasks = JoinSet::new();
        let mut addresses = Vec::new();
        let mut options = options;
        for spec in specs {
            if let Some(key) = &spec.key {
                options.vertical.push(VerticalSpec {
                    name: spec.name.clone(),
                    key: key.clone(),
                    members: Vec::new(),
                });
            }
        }
        if options.data_dir.is_none() {
            options.data_dir = Some(governance.data_dir.join("hub"));
        }
        // Shared by the stations only: the hub never learns it.
        let secret = (!options.vertical.is_empty()).then(crate::secret::random);
        // Shared by the hub and its stations only: on this machine nobody else can send
        // the stations tickets (under another researcher's name, for a fresh DP budget, or
        // for the pseudonymized rows of a vertical member).
        let hub_secret: Arc<str> = hub_secret().into();
        options.transport.secret = Some(Arc::clone(&hub_secret));
        for (name, tables) in plan {
            let config = StationConfig {
                policy: policy.clone(),
                audit_log: governance.audit_log(&name),
                collaboration_secret: secret.clone(),
                hub_secret: Some(Arc::clone(&hub_secret)),
            };
            let station_name = name.clone();
            let open = async move {
                let station = Arc::new(Station::open(station_name, &tables, config).await?);
                let listener = TcpListener::bind("127.0.0.1:0").await?;
                anyhow::Ok((station, listener))
            };
            let (station, listener) = match &stations {
                Some(runtime) => runtime
                    .spawn(open)
                    .await
                    .context("opening a station panicked")??,
                None => open.await?,
            };
            let addr = listener.local_addr()?;
            let mut stop = stop.clone();
            let serve = async move {
                railyard_station::serve(station, listener, async move {
                    let _ = stop.wait_for(|s| *s).await;
                })
                .await
                .map_err(anyhow::Error::from)
            };
            match &stations {
                Some(runtime) => tasks.spawn_on(serve, runtime),
                None => tasks.spawn(serve),
            };
            addresses.push(StationAddress {
                name,
                url: format!("grpc://{addr}"),
            });
        }
        let hub = Arc::new(Hub::connect(&addresses, options).await?);
        let hub_addr = hub_listener.local_addr()?;
        let mut stop_hub = stop.clone();
        let serving = Arc::clone(&hub);
        tasks.spawn(async move {
            railyard_engine::serve(serving, hub_listener, async move {
                let _ = stop_hub.wait_for(|s| *s).await;
            })
            .await
            .map_err(anyhow::Error::from)
        });
        Ok(Self {
            hub,
            hub_secret,
            hub_url: format!("grpc://{hub_addr}"),
            stations: addresses,
            shutdown,
            tasks,
        })
    }

    /// Stops the hub and all stations and waits for them to finish.
    pub async fn shutdown(mut self) -> Result<()> {
        let _ = self.shutdown.send(true);
        while let Some(done) = self.tasks.join_next().await {
            done.context("a server task panicked")??;
        }
        Ok(())
    }
}

/// Resolves at Ctrl-C or SIGTERM: how `railyard local` and `railyard demo --serve` are
/// stopped.
pub async fn wait_for_stop_signal() -> Result<()> {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("cannot listen for SIGTERM")?;
    tokio::select! {
        r = tokio::signal::ctrl_c() => r.context("cannot listen for Ctrl-C")?,
        _ = term.recv() => {}
    }
    Ok(())
}

/// Serves the web console of `federation` on `console` (its query history in the file
/// `history`), prints where the hub and the console listen to `out`, and waits for Ctrl-C or SIGTERM; then stops the console (the
/// caller shuts the federation down).
///
/// Both lines go out in one write: whoever started us may read the first line only and
/// close the pipe, and a second write would then fail. A reader that has gone away is
/// reported on stderr instead of ending the federation.
pub async fn serve_until_stopped(
    federation: &LocalFederation,
    console: TcpListener,
    history: PathBuf,
    out: &mut impl std::io::Write,
) -> Result<()> {
    let url = format!("http://{}/", console.local_addr()?);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(railyard_engine::console::serve(
        console,
        Arc::clone(&federation.hub),
        railyard_engine::flight_sql::LOCAL_RESEARCHER,
        Some(history),
        async move {
            let _ = stopped.await;
        },
    ));
    let banner = format!(
        "hub listening on {}\nconsole at {url}\n",
        federation.hub_url
    );
    if let Err(e) = out.write_all(banner.as_bytes()).and_then(|()| out.flush()) {
        eprintln!("could not print where the hub listens ({e}); serving anyway");
    }
    wait_for_stop_signal().await?;
    let _ = stop.send(());
    task.await
        .context("the console task failed")?
        .context("the console stopped with an error")?;
    Ok(())
}
