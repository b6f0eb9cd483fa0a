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
use railyard::local::{LocalFederation, TableSpec};
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

pub fn spec(name: &str, dir: PathBuf) -> TableSpec {
    TableSpec {
        name: name.to_string(),
        dir,
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
pub async fn federation(specs: &[TableSpec], options: HubOptions) -> LocalFederation {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind hub");
    LocalFederation::start(specs, listener, options)
        .await
        .expect("start the federation")
}

pub fn path(p: &Path) -> String {
    p.to_str().expect("UTF-8 path").to_string()
}
