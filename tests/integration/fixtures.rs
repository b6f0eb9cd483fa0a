//! Shared test data and the two engines every corpus query runs on.
//!
//! Data: the real `lung` (CSV stations) and `breast_cancer` (Parquet stations) datasets from
//! `tests/data`, a synthetic `registry`, and TPC-H `lineitem` and `orders` at SF 0.01, all
//! split over the same three stations, so stations hold several tables of mixed formats.
//! The centralized reference reads the pooled data: `full.*` for the real datasets, and all
//! station files of a table as one table for the generated ones.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use datafusion::prelude::{CsvReadOptions, ParquetReadOptions, SessionContext};
use railyard::local::{Governance, LocalFederation, TableSpec};
use railyard_engine::HubOptions;
use tempfile::TempDir;
use tokio::net::TcpListener;

pub const STATIONS: [&str; 3] = ["station_a", "station_b", "station_c"];
/// Synthetic registry size in the tests (the demo uses more).
pub const REGISTRY_PATIENTS: usize = 30_000;
pub const TPCH_SCALE: f64 = 0.01;

pub struct Data {
    _generated: TempDir,
    pub registry: PathBuf,
    pub lineitem: PathBuf,
    pub orders: PathBuf,
}

pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

pub fn test_data(rel: &str) -> PathBuf {
    repo().join("tests/data").join(rel)
}

/// Generated data, made once per test process.
pub fn data() -> &'static Data {
    static DATA: OnceLock<Data> = OnceLock::new();
    DATA.get_or_init(|| {
        let dir = tempfile::tempdir().expect("temp dir");
        let registry = railyard::synth::write_registry(
            dir.path(),
            &railyard::synth::default_profiles(REGISTRY_PATIENTS),
            railyard::synth::DEFAULT_SEED,
        )
        .expect("registry data");
        let (lineitem, orders) =
            railyard::tpch::write_tpch(dir.path(), TPCH_SCALE, &STATIONS).expect("TPC-H data");
        Data {
            _generated: dir,
            registry,
            lineitem,
            orders,
        }
    })
}

/// The federated tables of the corpus.
pub fn table_specs() -> Vec<TableSpec> {
    let d = data();
    vec![
        spec("lung", test_data("lung/horizontal/csv")),
        spec(
            "breast_cancer",
            test_data("breast_cancer/horizontal/parquet"),
        ),
        spec("registry", d.registry.clone()),
        spec("lineitem", d.lineitem.clone()),
        spec("orders", d.orders.clone()),
    ]
}

/// The clinical tables of the OMOP sample (tests/data/omop), three stations each.
pub const OMOP_TABLES: [&str; 8] = [
    "person",
    "observation_period",
    "visit_occurrence",
    "condition_occurrence",
    "drug_exposure",
    "procedure_occurrence",
    "measurement",
    "observation",
];

/// The OMOP vocabularies every station holds a copy of.
pub const OMOP_REFERENCES: [&str; 2] = ["concept", "concept_ancestor"];

pub fn omop_specs() -> Vec<TableSpec> {
    OMOP_TABLES
        .iter()
        .map(|t| spec(t, test_data(&format!("omop/{t}"))))
        .collect()
}

/// `governance` with the OMOP vocabularies as reference tables.
pub fn with_omop_references(mut governance: Governance) -> Governance {
    governance.references = OMOP_REFERENCES
        .iter()
        .map(|r| railyard::local::ReferenceSpec {
            name: r.to_string(),
            path: test_data(&format!("omop/reference/{r}.parquet")),
        })
        .collect();
    governance
}

/// One DataFusion session over the pooled OMOP files and the vocabularies.
pub async fn omop_centralized() -> SessionContext {
    let ctx = SessionContext::new();
    for t in OMOP_TABLES {
        ctx.register_parquet(
            t,
            path(&test_data(&format!("omop/pooled/{t}.parquet"))),
            ParquetReadOptions::default(),
        )
        .await
        .expect(t);
    }
    for r in OMOP_REFERENCES {
        ctx.register_parquet(
            r,
            path(&test_data(&format!("omop/reference/{r}.parquet"))),
            ParquetReadOptions::default(),
        )
        .await
        .expect(r);
    }
    ctx
}

/// Runs `future` on a two-worker runtime with the worker stacks of `railyard` itself
/// (8 MiB; tokio's default is 2 MiB): relational fragments plan deeper than single-table
/// ones.
pub fn on_railyard_stacks<F: Future>(future: F) -> F::Output {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_stack_size(8 << 20)
        .enable_all()
        .build()
        .expect("runtime")
        .block_on(future)
}

pub fn spec(name: &str, dir: PathBuf) -> TableSpec {
    TableSpec {
        name: name.to_string(),
        dir,
        key: None,
    }
}

/// One DataFusion session over the pooled data: the reference answer.
pub async fn centralized() -> SessionContext {
    let d = data();
    let ctx = SessionContext::new();
    ctx.register_csv(
        "lung",
        path(&test_data("lung/full.csv")),
        CsvReadOptions::new().has_header(true),
    )
    .await
    .expect("lung");
    ctx.register_parquet(
        "breast_cancer",
        path(&test_data("breast_cancer/full.parquet")),
        ParquetReadOptions::default(),
    )
    .await
    .expect("breast_cancer");
    for (name, dir) in [
        ("registry", &d.registry),
        ("lineitem", &d.lineitem),
        ("orders", &d.orders),
    ] {
        // A trailing slash makes the directory one table of all its files.
        ctx.register_parquet(
            name,
            format!("{}/", path(dir)),
            ParquetReadOptions::default(),
        )
        .await
        .expect(name);
    }
    ctx
}

/// Three stations and a hub on loopback ports.
/// Under the open test policy (`tests/policies/open.toml`: every column public, k = 1),
/// with audit logs in a fresh temporary directory.
pub async fn federation(specs: &[TableSpec], options: HubOptions) -> LocalFederation {
    federation_with(specs, options, &open_governance()).await
}

/// The open test policy, audit logs in a temporary directory kept for the process.
pub fn open_governance() -> Governance {
    Governance::new(Some(&repo().join("tests/policies/open.toml")), audit_dir())
        .expect("the open test policy loads")
}

/// The stations' default policy (no file), audit logs in a temporary directory.
pub fn default_governance() -> Governance {
    Governance::new(None, audit_dir()).expect("the default policy")
}

/// A fresh directory for audit logs, removed when the test process ends.
pub fn audit_dir() -> PathBuf {
    static DIRS: std::sync::Mutex<Vec<TempDir>> = std::sync::Mutex::new(Vec::new());
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().to_path_buf();
    DIRS.lock().unwrap_or_else(|p| p.into_inner()).push(dir);
    path
}

/// Three stations and a hub on loopback ports, governed by `governance`.
pub async fn federation_with(
    specs: &[TableSpec],
    options: HubOptions,
    governance: &Governance,
) -> LocalFederation {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind hub");
    let federation = LocalFederation::start(specs, listener, options, governance)
        .await
        .expect("start the federation");
    let mut secrets = HUB_SECRETS.lock().unwrap_or_else(|p| p.into_inner());
    for station in &federation.stations {
        secrets.insert(station.url.clone(), federation.hub_secret.to_string());
    }
    federation
}

/// The hub secret of each local station started by a test, by URL: tests that send
/// tickets straight to a station play its hub (a compromised one), so they carry it.
static HUB_SECRETS: std::sync::Mutex<std::collections::BTreeMap<String, String>> =
    std::sync::Mutex::new(std::collections::BTreeMap::new());

/// `request` with the hub secret of the local station at `url` (if a test started one).
pub fn as_hub<T>(url: &str, mut request: tonic::Request<T>) -> tonic::Request<T> {
    let secrets = HUB_SECRETS.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(secret) = secrets.get(url) {
        request.metadata_mut().insert(
            railyard_contract::HUB_SECRET_HEADER,
            secret.parse().expect("a hex secret"),
        );
    }
    request
}

pub fn path(p: &Path) -> String {
    p.to_str().expect("UTF-8 path").to_string()
}

/// The `railyard` binary, run in a fresh directory (stations keep their audit logs under
/// `./.railyard` unless told otherwise).
pub fn railyard() -> std::process::Command {
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_railyard"));
    command.current_dir(audit_dir());
    command
}

/// Starts `railyard local --listen 127.0.0.1:0 ARGS…`; returns the process and the hub URL
/// from the one line it prints when ready.
pub fn spawn_local<I, S>(args: I) -> (std::process::Child, String)
where
    I: IntoIterator<Item = S>,
    S: AsRef<std::ffi::OsStr>,
{
    use std::io::BufRead;
    let mut child = railyard()
        .args(["local", "--listen", "127.0.0.1:0"])
        .args(args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("railyard local starts");
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().expect("stdout"))
        .read_line(&mut line)
        .expect("first line");
    let url = line
        .trim()
        .strip_prefix("hub listening on ")
        .unwrap_or_else(|| panic!("unexpected first line: {line:?}"))
        .to_string();
    (child, url)
}

/// `--table NAME=DIR` arguments.
pub fn table_arg(name: &str, rel: &str) -> [String; 2] {
    [
        "--table".to_string(),
        format!("{name}={}", test_data(rel).display()),
    ]
}

/// Sends `sql` straight to a station as a fragment ticket (as a hub would, or as a
/// compromised hub could: with the hub's secret), and collects what it releases.
pub async fn run_at_station(
    url: &str,
    sql: &str,
) -> Result<Vec<arrow::array::RecordBatch>, String> {
    run_at_station_as(url, sql, "test").await
}

/// [`run_at_station`] on behalf of `researcher`.
pub async fn run_at_station_as(
    url: &str,
    sql: &str,
    researcher: &str,
) -> Result<Vec<arrow::array::RecordBatch>, String> {
    use arrow_flight::decode::FlightRecordBatchStream;
    use arrow_flight::error::FlightError;
    use futures::TryStreamExt;
    let channel = tonic::transport::Endpoint::from_shared(url.replace("grpc://", "http://"))
        .map_err(|e| e.to_string())?
        .connect()
        .await
        .map_err(|e| e.to_string())?;
    let mut client = arrow_flight::flight_service_client::FlightServiceClient::new(channel);
    let ticket = railyard_contract::FragmentTicket {
        query_id: "test".into(),
        fragment: 1,
        researcher: researcher.into(),
        collaboration: String::new(),
        epsilon: None,
        sql: sql.to_string(),
        train: None,
    };
    let response = client
        .do_get(as_hub(
            url,
            tonic::Request::new(arrow_flight::Ticket::new(ticket.to_bytes())),
        ))
        .await
        .map_err(|s| s.message().to_string())?
        .into_inner();
    FlightRecordBatchStream::new_from_flight_data(response.map_err(FlightError::from))
        .try_collect()
        .await
        .map_err(|e| e.to_string())
}

/// `name`'s part of the lung table (Parquet) as a station under the policy in `policy`, its
/// audit log (and ledger) in `dir/name`.
pub async fn lung_station(
    name: &str,
    policy: &Path,
    dir: &Path,
) -> std::sync::Arc<railyard_station::Station> {
    let table = railyard_station::TableFile {
        name: "lung".into(),
        path: test_data(&format!("lung/horizontal/parquet/{name}.parquet")),
        format: railyard_station::Format::Parquet,
        schema: None,
    };
    let config = railyard_station::StationConfig {
        policy: railyard_station::Policy::load(policy).expect("the policy loads"),
        audit_log: dir.join(name).join("audit.jsonl"),
        collaboration_secret: None,
        hub_secret: None,
    };
    std::sync::Arc::new(
        railyard_station::Station::open(name, &[table], config)
            .await
            .expect("the station opens"),
    )
}

/// A plain Flight SQL client of the hub at `url` (no token: a `railyard local` hub).
pub async fn flight_sql_client(
    url: &str,
) -> arrow_flight::sql::client::FlightSqlServiceClient<tonic::transport::Channel> {
    let channel = tonic::transport::Endpoint::from_shared(url.replace("grpc://", "http://"))
        .expect("a hub URL")
        .connect()
        .await
        .expect("the hub answers");
    arrow_flight::sql::client::FlightSqlServiceClient::new(channel)
}

/// Everything the first endpoint of `info` streams (its `DoGet`).
pub async fn fetch_all(
    client: &mut arrow_flight::sql::client::FlightSqlServiceClient<tonic::transport::Channel>,
    info: &arrow_flight::FlightInfo,
) -> Vec<arrow::array::RecordBatch> {
    use futures::TryStreamExt;
    let ticket = info.endpoint[0].ticket.clone().expect("a ticket");
    client
        .do_get(ticket)
        .await
        .expect("DoGet starts")
        .try_collect()
        .await
        .expect("DoGet streams")
}
