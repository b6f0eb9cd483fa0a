//! Federation behaviour beyond query answers: what crosses the wire, failures, timeouts,
//! catalog checks, Flight SQL metadata and the command line.

use std::net::SocketAddr;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use arrow::array::{Array, AsArray, RecordBatch};
use arrow::datatypes::DataType;
use arrow_flight::sql::CommandGetTables;
use railyard::client::HubClient;
use railyard_engine::{Hub, HubOptions, StationAddress};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use crate::fixtures::{self, spec, test_data};

fn lung_only() -> Vec<railyard::local::TableSpec> {
    vec![spec("lung", test_data("lung/horizontal/csv"))]
}

/// The rows of an `EXPLAIN FEDERATED` answer as (location, step, plan, releases).
fn explain_rows(batches: &[RecordBatch]) -> Vec<[String; 4]> {
    let mut rows = Vec::new();
    for b in batches {
        let col = |i: usize| b.column(i).as_string::<i32>().clone();
        let cols = [col(0), col(1), col(2), col(3)];
        for r in 0..b.num_rows() {
            rows.push(cols.clone().map(|c| c.value(r).to_string()));
        }
    }
    rows
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn explain_federated_shows_each_station_fragment_and_the_merge() {
    let federation = fixtures::federation(&lung_only(), HubOptions::default()).await;
    let mut client = HubClient::connect(&federation.hub_url).await.unwrap();
    let answer = client
        .query("EXPLAIN FEDERATED SELECT sex, avg(age) FROM lung WHERE age > 50 GROUP BY sex")
        .await
        .unwrap();
    let rows = explain_rows(&answer.batches);
    let stations: Vec<&str> = rows
        .iter()
        .filter(|r| r[0] != "hub")
        .map(|r| r[0].as_str())
        .collect();
    assert_eq!(stations, ["station_a", "station_b", "station_c"]);
    for r in rows.iter().filter(|r| r[0] != "hub") {
        assert!(r[1].contains("partial aggregate of lung"), "{r:?}");
        assert!(r[2].contains("partial_avg("), "{r:?}");
        assert!(r[2].contains("WHERE (age > 50)"), "{r:?}");
        assert!(r[2].contains("GROUP BY sex"), "{r:?}");
        assert!(r[3].contains("one row per group of (sex)"), "{r:?}");
    }
    let hub = rows.iter().find(|r| r[0] == "hub").expect("a hub row");
    assert!(hub[2].contains("merge_avg"), "{hub:?}");
    assert!(hub[2].contains("Fragment #1"), "{hub:?}");
    federation.shutdown().await.unwrap();
}

/// `avg(x)` beside `sum(x)` costs the stations no accumulator of its own: they send the sum's
/// state and a count, and the hub builds avg's state from both (the values are checked
/// against the centralized engine in `sql/registry.slt`, `sql/lung.slt` and TPC-H Q1).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_avg_beside_a_sum_of_its_argument_shares_the_stations_sum() {
    let federation = fixtures::federation(&lung_only(), HubOptions::default()).await;
    let mut client = HubClient::connect(&federation.hub_url).await.unwrap();
    // avg(age) averages age as a double; the sum of that double is the one it can share.
    let shared = "SELECT sex, sum(CAST(age AS DOUBLE)) AS s, avg(age) AS a FROM lung GROUP BY sex";
    let rows = explain_rows(
        &client
            .query(&format!("EXPLAIN FEDERATED {shared}"))
            .await
            .unwrap()
            .batches,
    );
    let fragment = &rows
        .iter()
        .find(|r| r[0] == "station_a")
        .expect("a fragment")[2];
    assert!(fragment.contains("partial_sum("), "{fragment}");
    assert!(fragment.contains("partial_count("), "{fragment}");
    assert!(!fragment.contains("partial_avg("), "{fragment}");
    let hub = rows.iter().find(|r| r[0] == "hub").expect("a hub row");
    assert!(hub[2].contains("merge_avg"), "{hub:?}");

    // A sum of another argument (the integer age) shares nothing.
    let apart = "EXPLAIN FEDERATED SELECT sex, sum(age), avg(age) FROM lung GROUP BY sex";
    let rows = explain_rows(&client.query(apart).await.unwrap().batches);
    let fragment = &rows
        .iter()
        .find(|r| r[0] == "station_a")
        .expect("a fragment")[2];
    assert!(fragment.contains("partial_avg("), "{fragment}");
    assert!(!fragment.contains("partial_count("), "{fragment}");

    // The shared answer is the answer of the query without sharing (avg alone).
    let value = |batches: &[RecordBatch], col: usize| -> Vec<f64> {
        batches
            .iter()
            .flat_map(|b| {
                let c = b
                    .column(col)
                    .as_primitive::<arrow::datatypes::Float64Type>()
                    .clone();
                (0..c.len()).map(move |i| c.value(i))
            })
            .collect()
    };
    let with_sum = client
        .query(&format!("{shared} ORDER BY sex"))
        .await
        .unwrap();
    let alone = client
        .query("SELECT sex, avg(age) AS a FROM lung GROUP BY sex ORDER BY sex")
        .await
        .unwrap();
    let (a, b) = (value(&with_sum.batches, 2), value(&alone.batches, 1));
    assert_eq!(a.len(), 2);
    for (x, y) in a.iter().zip(&b) {
        assert!((x - y).abs() <= 1e-12 * y.abs(), "{a:?} vs {b:?}");
    }
    federation.shutdown().await.unwrap();
}

/// Writes `dir/<station>.parquet` with one Float64 column `dose`, declared non-nullable
/// when `values` holds no NULL and `nullable` is false.
fn write_doses(dir: &std::path::Path, station: &str, values: &[Option<f64>], nullable: bool) {
    let schema = Arc::new(arrow::datatypes::Schema::new(vec![
        arrow::datatypes::Field::new("dose", DataType::Float64, nullable),
    ]));
    let batch = RecordBatch::try_new(
        Arc::clone(&schema),
        vec![Arc::new(arrow::array::Float64Array::from(values.to_vec()))],
    )
    .unwrap();
    let file = std::fs::File::create(dir.join(format!("{station}.parquet"))).unwrap();
    let mut writer = parquet::arrow::ArrowWriter::try_new(file, schema, None).unwrap();
    writer.write(&batch).unwrap();
    writer.close().unwrap();
}

/// A column is non-nullable for the hub only when every station announces it so. When
/// all do, the stations keep one count of a group's rows for every call that needs it:
/// `avg(x)` beside `sum(x)` reads `count(*)`'s state, and `count(*)` the count in an avg's
/// state. When one station's `x` holds NULLs, `count(x)` is its own, `x IS NULL` is not
/// folded away, and its rows are accepted. Every answer is checked against DataFusion over
/// the pooled files.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_column_is_never_null_only_if_no_station_says_it_may_be() {
    let dense = tempfile::tempdir().unwrap();
    let sparse = tempfile::tempdir().unwrap();
    write_doses(
        dense.path(),
        "hospital_1",
        &[Some(1.0), Some(2.0), Some(4.0)],
        false,
    );
    write_doses(dense.path(), "hospital_2", &[Some(8.0), Some(16.5)], false);
    // The first station announces `dose` as never NULL; the second holds a NULL. Either
    // may be the one the hub hears first.
    write_doses(
        sparse.path(),
        "hospital_1",
        &[Some(1.0), Some(2.0), Some(4.0)],
        false,
    );
    write_doses(
        sparse.path(),
        "hospital_2",
        &[Some(8.0), None, Some(16.5)],
        true,
    );
    let federation = fixtures::federation(
        &[
            spec("dense", dense.path().to_path_buf()),
            spec("sparse", sparse.path().to_path_buf()),
        ],
        HubOptions::default(),
    )
    .await;
    let pooled = datafusion::prelude::SessionContext::new();
    for (name, dir) in [("dense", dense.path()), ("sparse", sparse.path())] {
        pooled
            .register_parquet(
                name,
                format!("{}/", fixtures::path(dir)),
                datafusion::prelude::ParquetReadOptions::default(),
            )
            .await
            .unwrap();
    }
    let mut client = HubClient::connect(&federation.hub_url).await.unwrap();
    let counts = |table: &str| {
        format!("EXPLAIN FEDERATED SELECT sum(dose), avg(dose), count(*) FROM {table}")
    };
    // (query, partial counts, partial avgs at a station)
    for (sql, counts, avgs) in [
        (counts("dense"), 1, 0),
        (counts("sparse"), 2, 0),
        // count(*) reads the count in avg's state.
        (
            "EXPLAIN FEDERATED SELECT avg(dose), count(*) FROM dense".into(),
            0,
            1,
        ),
        (
            "EXPLAIN FEDERATED SELECT avg(dose), count(*) FROM sparse".into(),
            1,
            1,
        ),
        // avg(dose) reads sum(dose) and the count of avg(dose * 2), as count(*) does.
        (
            "EXPLAIN FEDERATED SELECT sum(dose), avg(dose), avg(dose * 2), count(*) FROM dense"
                .into(),
            0,
            1,
        ),
    ] {
        let rows = explain_rows(&client.query(&sql).await.unwrap().batches);
        let fragment = &rows
            .iter()
            .find(|r| r[0] == "hospital_1")
            .expect("a fragment")[2];
        assert_eq!(
            fragment.matches("partial_count(").count(),
            counts,
            "{sql}: {fragment}"
        );
        assert_eq!(
            fragment.matches("partial_avg(").count(),
            avgs,
            "{sql}: {fragment}"
        );
    }
    let as_text = |batches: &[RecordBatch]| {
        arrow::util::pretty::pretty_format_batches(batches)
            .unwrap()
            .to_string()
    };
    for sql in [
        "SELECT sum(dose) AS s, avg(dose) AS a, count(*) AS n FROM dense",
        "SELECT sum(dose) AS s, avg(dose) AS a, count(*) AS n FROM sparse",
        "SELECT avg(dose) AS a, count(dose) AS d, count(*) AS n FROM sparse",
        "SELECT avg(dose) AS a, count(*) AS n FROM dense",
        "SELECT avg(dose) AS a, count(*) AS n FROM sparse",
        "SELECT sum(dose) AS s, avg(dose) AS a, avg(dose * 2) AS b, count(*) AS n FROM dense",
        // A group where no row passes the FILTER: a count of 0 and a NULL average.
        "SELECT dose > 3 AS big, avg(dose) FILTER (WHERE dose > 2) AS a, \
         count(*) FILTER (WHERE dose > 2) AS n, count(*) AS rows FROM dense \
         GROUP BY dose > 3 ORDER BY big",
        "SELECT count(*) AS n FROM sparse WHERE dose IS NULL",
        "SELECT count(*) AS n FROM sparse WHERE dose IS NOT NULL",
        "SELECT dose FROM sparse ORDER BY dose NULLS FIRST",
    ] {
        let got = client
            .query(sql)
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"));
        let want = pooled.sql(sql).await.unwrap().collect().await.unwrap();
        assert_eq!(as_text(&got.batches), as_text(&want), "{sql}");
    }
    federation.shutdown().await.unwrap();
}

/// Sends a fragment straight to a station, as the hub would, and returns its batches.
async fn run_at_station(url: &str, sql: &str) -> Vec<RecordBatch> {
    fixtures::run_at_station(url, sql)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_partial_states_leave_a_station_for_an_aggregate() {
    // Under the stations' default policy: nothing row-level, k = 5.
    let federation = fixtures::federation_with(
        &lung_only(),
        HubOptions::default(),
        &fixtures::default_governance(),
    )
    .await;
    let mut client = HubClient::connect(&federation.hub_url).await.unwrap();
    let sql = "SELECT sex, count(*), avg(age), var_samp(time) FROM lung GROUP BY sex";
    let plan = client
        .query(&format!("EXPLAIN FEDERATED {sql}"))
        .await
        .unwrap();
    let fragment = explain_rows(&plan.batches)
        .into_iter()
        .find(|r| r[0] == "station_a")
        .expect("a fragment for station_a")[2]
        .clone();
    let station_a = &federation.stations[0];
    assert_eq!(station_a.name, "station_a");
    let released = run_at_station(&station_a.url, &fragment).await;
    let rows: usize = released.iter().map(|b| b.num_rows()).sum();
    // Two groups (sex 1 and 2), not the station's 76 patients.
    assert_eq!(rows, 2);
    let schema = released[0].schema();
    assert_eq!(schema.fields().len(), 5, "{schema:?}");
    for field in schema.fields().iter().skip(1).take(3) {
        assert!(
            matches!(field.data_type(), DataType::Struct(_)),
            "aggregates leave as state structs: {field:?}"
        );
    }
    // The station appends each group's row count, which the hub uses to apply k again.
    let last = schema.field(4);
    assert_eq!(
        (last.name().as_str(), last.data_type()),
        ("__rows", &DataType::Int64)
    );
    let counts: i64 = released
        .iter()
        .map(|b| arrow::compute::sum(b.column(4).as_primitive::<arrow::datatypes::Int64Type>()))
        .map(Option::unwrap_or_default)
        .sum();
    let expected = datafusion::prelude::SessionContext::new()
        .read_csv(
            fixtures::path(&test_data("lung/horizontal/csv/station_a.csv")),
            datafusion::prelude::CsvReadOptions::new(),
        )
        .await
        .unwrap()
        .count()
        .await
        .unwrap() as i64;
    assert_eq!(counts, expected);
    // The hub's merged answer equals the pooled one.
    let merged = client.query(&format!("{sql} ORDER BY sex")).await.unwrap();
    let pooled = fixtures::centralized()
        .await
        .sql(&format!("{sql} ORDER BY sex"))
        .await
        .unwrap()
        .collect()
        .await
        .unwrap();
    assert_eq!(
        crate::slt::format_rows(&merged.batches),
        crate::slt::format_rows(&pooled)
    );
    federation.shutdown().await.unwrap();
}

/// A station of a [`Manual`] federation: name, address, stop switch, server task.
type ManualStation = (
    String,
    SocketAddr,
    Option<oneshot::Sender<()>>,
    JoinHandle<()>,
);

/// Stations started one by one, each with its own stop switch, and a hub over them.
struct Manual {
    hub_url: String,
    stations: Vec<ManualStation>,
    hub_stop: oneshot::Sender<()>,
}

async fn manual_federation(options: HubOptions) -> Manual {
    let mut stations = Vec::new();
    let mut addresses = Vec::new();
    for name in fixtures::STATIONS {
        let station = fixtures::lung_station(
            name,
            &fixtures::repo().join("tests/policies/open.toml"),
            &fixtures::audit_dir(),
        )
        .await;
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            railyard_station::serve(station, listener, async {
                let _ = stopped.await;
            })
            .await
            .unwrap();
        });
        addresses.push(StationAddress {
            name: name.to_string(),
            url: format!("grpc://{addr}"),
        });
        stations.push((name.to_string(), addr, Some(stop), task));
    }
    let hub = Arc::new(Hub::connect(&addresses, options).await.unwrap());
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let hub_url = format!("grpc://{}", listener.local_addr().unwrap());
    let (hub_stop, hub_stopped) = oneshot::channel::<()>();
    tokio::spawn(async move {
        railyard_engine::serve(hub, listener, async {
            let _ = hub_stopped.await;
        })
        .await
        .unwrap();
    });
    Manual {
        hub_url,
        stations,
        hub_stop,
    }
}

impl Manual {
    /// Stops one station's server and waits until its port is closed.
    async fn stop_station(&mut self, name: &str) -> SocketAddr {
        let entry = self
            .stations
            .iter_mut()
            .find(|s| s.0 == name)
            .expect("a station of that name");
        entry
            .2
            .take()
            .expect("station still running")
            .send(())
            .unwrap();
        (&mut entry.3).await.unwrap();
        entry.1
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_station_that_is_down_fails_the_query_with_its_name() {
    let mut federation = manual_federation(HubOptions::default()).await;
    let mut client = HubClient::connect(&federation.hub_url).await.unwrap();
    assert_eq!(
        client
            .query("SELECT count(*) FROM lung")
            .await
            .unwrap()
            .num_rows(),
        1
    );
    federation.stop_station("station_b").await;
    let err = client
        .query("SELECT count(*) FROM lung")
        .await
        .expect_err("a query needing a stopped station fails")
        .to_string();
    assert!(err.contains("station 'station_b'"), "{err}");
    assert!(err.contains("unreachable"), "{err}");
    assert!(err.contains("Unavailable"), "{err}");
    let _ = federation.hub_stop.send(());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_station_that_hangs_is_cut_off_by_the_fragment_timeout() {
    let options = HubOptions {
        fragment_timeout: Duration::from_millis(700),
        ..HubOptions::default()
    };
    let mut federation = manual_federation(options).await;
    let addr = federation.stop_station("station_c").await;
    // A peer that accepts connections on station_c's address and never answers.
    let black_hole = TcpListener::bind(addr).await.unwrap();
    let held = tokio::spawn(async move {
        let mut open = Vec::new();
        while let Ok((socket, _)) = black_hole.accept().await {
            open.push(socket);
        }
    });
    let mut client = HubClient::connect(&federation.hub_url).await.unwrap();
    let err = client
        .query("SELECT sex, count(*) FROM lung GROUP BY sex")
        .await
        .expect_err("a hung station fails the query")
        .to_string();
    assert!(err.contains("station 'station_c'"), "{err}");
    assert!(err.contains("did not answer fragment #1 within"), "{err}");
    assert!(err.contains("DeadlineExceeded"), "{err}");
    held.abort();
    let _ = federation.hub_stop.send(());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stations_with_different_columns_for_one_table_are_refused_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let write = |name: &str, column_type: DataType| {
        let schema = Arc::new(arrow::datatypes::Schema::new(vec![
            arrow::datatypes::Field::new("id", DataType::Int64, false),
            arrow::datatypes::Field::new("dose", column_type.clone(), true),
        ]));
        let dose: Arc<dyn Array> = match column_type {
            DataType::Int64 => Arc::new(arrow::array::Int64Array::from(vec![1, 2])),
            _ => Arc::new(arrow::array::StringArray::from(vec!["1", "2"])),
        };
        let batch = RecordBatch::try_new(
            Arc::clone(&schema),
            vec![Arc::new(arrow::array::Int64Array::from(vec![1, 2])), dose],
        )
        .unwrap();
        let file = std::fs::File::create(dir.path().join(name)).unwrap();
        let mut writer = parquet::arrow::ArrowWriter::try_new(file, schema, None).unwrap();
        writer.write(&batch).unwrap();
        writer.close().unwrap();
    };
    write("hospital_1.parquet", DataType::Int64);
    write("hospital_2.parquet", DataType::Utf8);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let err = railyard::local::LocalFederation::start(
        &[spec("trial", dir.path().to_path_buf())],
        listener,
        HubOptions::default(),
        &fixtures::open_governance(),
    )
    .await
    .err()
    .expect("mismatched stations are refused")
    .to_string();
    assert!(err.contains("table 'trial'"), "{err}");
    assert!(err.contains("column 'dose'"), "{err}");
    assert!(
        err.contains("hospital_1") && err.contains("hospital_2"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flight_sql_metadata_lists_federated_tables_with_their_columns() {
    let specs = vec![
        spec("lung", test_data("lung/horizontal/csv")),
        spec(
            "breast_cancer",
            test_data("breast_cancer/horizontal/parquet"),
        ),
    ];
    let federation = fixtures::federation(&specs, HubOptions::default()).await;
    let mut client = fixtures::flight_sql_client(&federation.hub_url).await;
    let info = client
        .get_tables(CommandGetTables {
            catalog: None,
            db_schema_filter_pattern: Some("public".into()),
            table_name_filter_pattern: None,
            table_types: vec![],
            include_schema: true,
        })
        .await
        .unwrap();
    let batches = fixtures::fetch_all(&mut client, &info).await;
    let batch = arrow::compute::concat_batches(&batches[0].schema(), &batches).unwrap();
    let names = batch
        .column_by_name("table_name")
        .unwrap()
        .as_string::<i32>()
        .iter()
        .map(|v| v.unwrap().to_string())
        .collect::<Vec<_>>();
    assert_eq!(names, ["breast_cancer", "lung"]);
    let schemas = batch
        .column_by_name("table_schema")
        .unwrap()
        .as_binary::<i32>();
    let lung_schema = arrow::ipc::convert::try_schema_from_ipc_buffer(schemas.value(1)).unwrap();
    assert_eq!(lung_schema.fields().len(), 11);
    assert!(lung_schema.field_with_name("wt_loss").is_ok());
    federation.shutdown().await.unwrap();
}

use fixtures::railyard;

#[test]
fn railyard_local_serves_until_sigterm_and_exits_cleanly() {
    let (mut child, url) = fixtures::spawn_local(
        fixtures::table_arg("lung", "lung/horizontal/csv")
            .into_iter()
            .chain(fixtures::table_arg(
                "breast_cancer",
                "breast_cancer/horizontal/parquet",
            )),
    );
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let (lung, bc) = runtime.block_on(async {
        let mut client = HubClient::connect(&url).await.unwrap();
        let lung = client.query("SELECT count(*) FROM lung").await.unwrap();
        let bc = client
            .query("SELECT count(*) FROM breast_cancer")
            .await
            .unwrap();
        (lung, bc)
    });
    assert_eq!(crate::slt::format_rows(&lung.batches), [["228"]]);
    assert_eq!(crate::slt::format_rows(&bc.batches), [["569"]]);
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let exit = child.wait().unwrap();
    assert!(exit.success(), "railyard local exited with {exit}");
}

#[test]
fn railyard_local_explains_bad_arguments() {
    let missing = railyard()
        .args([
            "local",
            "--listen",
            "127.0.0.1:0",
            "--table",
            "x=/no/such/dir",
        ])
        .output()
        .unwrap();
    assert!(!missing.status.success());
    let err = String::from_utf8_lossy(&missing.stderr);
    assert!(
        err.contains("table 'x'") && err.contains("/no/such/dir"),
        "{err}"
    );

    let no_equals = railyard()
        .args(["local", "--table", "lung"])
        .output()
        .unwrap();
    assert!(!no_equals.status.success());
    let err = String::from_utf8_lossy(&no_equals.stderr);
    assert!(err.contains("expected NAME=DIR"), "{err}");

    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(
        test_data("lung/horizontal/csv/station_a.csv"),
        dir.path().join("station_a.csv"),
    )
    .unwrap();
    std::fs::copy(
        test_data("lung/horizontal/parquet/station_a.parquet"),
        dir.path().join("station_a.parquet"),
    )
    .unwrap();
    let twice = railyard()
        .args(["local", "--listen", "127.0.0.1:0", "--table"])
        .arg(format!("lung={}", dir.path().display()))
        .output()
        .unwrap();
    assert!(!twice.status.success());
    let err = String::from_utf8_lossy(&twice.stderr);
    assert!(err.contains("station 'station_a' has two files"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn railyard_sql_prints_answers_and_explains_errors() {
    let federation = fixtures::federation(&lung_only(), HubOptions::default()).await;
    let url = federation.hub_url.clone();
    let (ok, bad, csv) = tokio::task::spawn_blocking(move || {
        let ok = railyard()
            .args([
                "sql",
                "--hub",
                &url,
                "SELECT sex, count(*) AS n FROM lung GROUP BY sex ORDER BY sex",
            ])
            .output()
            .unwrap();
        let bad = railyard()
            .args(["sql", "--hub", &url, "SELECT nothing FROM lung"])
            .output()
            .unwrap();
        let csv = railyard()
            .args([
                "sql",
                "--hub",
                &url,
                "--format",
                "csv",
                "SELECT count(*) AS n FROM lung",
            ])
            .output()
            .unwrap();
        (ok, bad, csv)
    })
    .await
    .unwrap();
    assert!(ok.status.success());
    let table = String::from_utf8_lossy(&ok.stdout);
    assert!(table.contains("| sex | n   |"), "{table}");
    assert!(table.contains("| 1   | 138 |"), "{table}");
    assert!(!bad.status.success());
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(err.contains("nothing"), "{err}");
    assert_eq!(String::from_utf8_lossy(&csv.stdout), "n\n228\n");
    federation.shutdown().await.unwrap();
}

#[test]
fn railyard_demo_runs_its_queries_and_exits_zero() {
    let out = railyard()
        .args(["demo", "--patients", "6000"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "demo failed: {}\n{stdout}",
        String::from_utf8_lossy(&out.stderr)
    );
    for (_, sql) in railyard::demo::QUERIES {
        assert!(stdout.contains(sql), "the demo shows {sql}");
    }
    assert_eq!(
        stdout.matches("hub merge plan:").count(),
        railyard::demo::QUERIES.len() + 4,
        "each SQL query, the first vertical one, the first OMOP one, the train and the DP \
         query show their plan"
    );
    // The OMOP section: the cohort by gender, counted in persons (479 in all).
    for (_, sql) in railyard::demo::OMOP_QUERIES {
        assert!(stdout.contains(sql), "the demo shows {sql}");
    }
    assert!(stdout.contains("| FEMALE | 242     |"), "{stdout}");
    assert!(stdout.contains("| MALE   | 237     |"), "{stdout}");
    // The DP query: its plan names the ε each station charges, and the budget left.
    assert!(stdout.contains(railyard::demo::DP_QUERY), "{stdout}");
    assert!(stdout.contains(railyard::demo::DP_MEDIAN_QUERY), "{stdout}");
    assert!(
        stdout.contains("ε = 0.5 charged at this station"),
        "{stdout}"
    );
    assert!(
        stdout.contains("| station   | table_name | budget | spent | remaining |"),
        "{stdout}"
    );
    assert!(
        stdout.contains("| 10.0   | 1.0   | 9.0       |"),
        "{stdout}"
    );
    // The example train (its image is built by scripts/build-trains, which the suite runs).
    assert!(stdout.contains(railyard::demo::TRAIN_QUERY), "{stdout}");
    assert!(
        stdout.contains(
            "train #1 (railyard/histogram:dev over lung) at station_a, station_b, station_c"
        ),
        "{stdout}"
    );
    assert!(
        stdout.contains("| bin_lower | bin_upper | patients |"),
        "{stdout}"
    );
    assert!(
        stdout.contains("| patients | mean_age | sd_age |"),
        "{stdout}"
    );
    assert!(stdout.contains("| 6000     |"), "{stdout}");
    for (_, sql) in railyard::demo::MODELS
        .iter()
        .chain(railyard::demo::VERTICAL)
    {
        assert!(stdout.contains(sql), "the demo shows {sql}");
    }
    // The vertical table's plan: a fragment per member and the join at the hub.
    assert!(
        stdout.contains("inner join of [station_a, station_b, station_c] on the pseudonyms"),
        "{stdout}"
    );
    assert!(stdout.contains("| concavity_error |"), "{stdout}");
    // The binomial GLM's coefficient rows, and the Kaplan–Meier plot's axis and legend.
    for shown in [
        "| mean_radius  |",
        "| Intercept    |",
        "0.0 ┤",
        "curves: 1 = sex 1, 2 = sex 2",
    ] {
        assert!(stdout.contains(shown), "the demo shows {shown}\n{stdout}");
    }
}

/// The hub keeps plans by statement text (engine/src/hub/cache.rs): a statement asked
/// again answers what planning it again would, and one whose answer depends on when or how
/// often it runs is planned afresh each time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_statement_asked_again_answers_as_if_planned_again() {
    let federation = fixtures::federation(&lung_only(), HubOptions::default()).await;
    let mut client = HubClient::connect(&federation.hub_url).await.unwrap();
    // A join at the hub and a top-k: operators that keep state while they run (a hash
    // table, a dynamic filter) start empty on every run of a kept plan.
    let kept = [
        "SELECT a.sex, count(*) FROM lung a JOIN (SELECT sex, max(age) AS m FROM lung GROUP BY sex) b \
         ON a.sex = b.sex AND a.age = b.m GROUP BY a.sex ORDER BY a.sex",
        "SELECT age, inst FROM lung WHERE age IS NOT NULL ORDER BY age DESC, inst LIMIT 3",
        "SELECT 1 AS one",
    ];
    for sql in kept {
        let first = crate::slt::format_rows(&client.query(sql).await.unwrap().batches);
        for _ in 0..3 {
            let again = crate::slt::format_rows(&client.query(sql).await.unwrap().batches);
            assert_eq!(again, first, "{sql}");
        }
    }
    // now() is folded into a constant when planned: a kept plan would repeat its time.
    let now = |a: railyard::client::Answer| crate::slt::format_rows(&a.batches);
    let first = now(client.query("SELECT now()").await.unwrap());
    tokio::time::sleep(Duration::from_millis(5)).await;
    let second = now(client.query("SELECT now()").await.unwrap());
    assert_ne!(first, second, "now() is planned afresh");
    // The same for a Substrait plan, which the hub plans from its logical form.
    let planner = datafusion::prelude::SessionContext::new();
    let logical = planner.sql("SELECT now()").await.unwrap();
    let plan = datafusion_substrait::logical_plan::producer::to_substrait_plan(
        logical.logical_plan(),
        &planner.state(),
    )
    .unwrap();
    let bytes = prost::Message::encode_to_vec(plan.as_ref());
    let first = now(client.query_substrait(bytes.clone(), false).await.unwrap());
    tokio::time::sleep(Duration::from_millis(5)).await;
    let second = now(client.query_substrait(bytes, false).await.unwrap());
    assert_ne!(first, second, "now() in a Substrait plan is planned afresh");
    // railyard.stations is read by the hub while it plans: a station that stops shows.
    let online = |a: railyard::client::Answer| format!("{:?}", crate::slt::format_rows(&a.batches));
    let before = online(
        client
            .query("SELECT station, online FROM railyard.stations ORDER BY station")
            .await
            .unwrap(),
    );
    assert!(!before.contains("false"), "{before}");
    federation
        .hub
        .board()
        .lost("station_a", "stopped by the test".to_string());
    let after = online(
        client
            .query("SELECT station, online FROM railyard.stations ORDER BY station")
            .await
            .unwrap(),
    );
    assert!(after.contains("false"), "{after}");
    federation.shutdown().await.unwrap();
}

/// A station keeps the physical plans of fragments it has run (station/src/kept.rs): a
/// fragment sent again answers from the station's data as it is now. A file that grows, a
/// file replaced by another of the same size and modification time, and a Parquet file whose
/// row count the planner could fold into a constant, are read afresh.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_station_answers_a_fragment_sent_again_from_its_data_as_it_is_now() {
    use futures::TryStreamExt;
    let dir = tempfile::tempdir().unwrap();
    let schema = Arc::new(arrow::datatypes::Schema::new(vec![
        arrow::datatypes::Field::new("x", DataType::Int64, true),
    ]));
    let csv = dir.path().join("t.csv");
    std::fs::write(&csv, "x\n1\n2\n3\n").unwrap();
    let parquet = dir.path().join("p.parquet");
    let write_parquet = |values: Vec<i64>| {
        let batch = RecordBatch::try_new(
            Arc::clone(&schema),
            vec![Arc::new(arrow::array::Int64Array::from(values))],
        )
        .unwrap();
        let file = std::fs::File::create(&parquet).unwrap();
        let mut writer =
            parquet::arrow::ArrowWriter::try_new(file, Arc::clone(&schema), None).unwrap();
        writer.write(&batch).unwrap();
        writer.close().unwrap();
    };
    write_parquet(vec![1, 2, 3]);
    let tables = [
        railyard_station::TableFile {
            name: "t".into(),
            path: csv.clone(),
            format: railyard_station::Format::Csv,
            schema: Some(Arc::clone(&schema)),
        },
        railyard_station::TableFile {
            name: "p".into(),
            path: parquet.clone(),
            format: railyard_station::Format::Parquet,
            schema: None,
        },
    ];
    let config = railyard_station::StationConfig {
        policy: railyard_station::Policy::load(&fixtures::repo().join("tests/policies/open.toml"))
            .unwrap(),
        audit_log: dir.path().join("audit").join("audit.jsonl"),
        collaboration_secret: None,
        hub_secret: None,
    };
    let station = railyard_station::Station::open("s", &tables, config)
        .await
        .unwrap();
    // The named Int64 columns of the station's answer to `sql`.
    let ask = async |sql: &str, columns: &[&str]| -> Vec<i64> {
        let ticket = railyard_contract::FragmentTicket {
            query_id: "q".into(),
            fragment: 1,
            researcher: "test".into(),
            collaboration: String::new(),
            epsilon: None,
            sql: sql.into(),
            train: None,
        };
        let stream = station.run_fragment(&ticket).await.unwrap();
        let batches: Vec<RecordBatch> = stream.try_collect().await.unwrap();
        columns
            .iter()
            .map(|name| {
                batches[0]
                    .column_by_name(name)
                    .unwrap()
                    .as_primitive::<arrow::datatypes::Int64Type>()
                    .value(0)
            })
            .collect()
    };
    let sums = "SELECT count(*) AS n, sum(x) AS s FROM t";
    assert_eq!(ask(sums, &["n", "s"]).await, [3, 6]);
    assert_eq!(
        ask(sums, &["n", "s"]).await,
        [3, 6],
        "the kept plan answers the same"
    );
    // The file grows (a kept plan would read only its old length).
    std::fs::write(&csv, "x\n1\n2\n3\n4\n").unwrap();
    assert_eq!(
        ask(sums, &["n", "s"]).await,
        [4, 10],
        "a grown file is read whole"
    );
    // Replaced by a file of the same size and modification time, other values.
    let before = std::fs::metadata(&csv).unwrap().modified().unwrap();
    let other = dir.path().join("other.csv");
    std::fs::write(&other, "x\n5\n6\n7\n8\n").unwrap();
    std::fs::File::options()
        .write(true)
        .open(&other)
        .unwrap()
        .set_modified(before)
        .unwrap();
    std::fs::rename(&other, &csv).unwrap();
    assert_eq!(
        ask(sums, &["n", "s"]).await,
        [4, 26],
        "a replaced file is read afresh"
    );
    // A Parquet file's row count is known while planning; the answer follows the file.
    let count = "SELECT count(*) AS n FROM p";
    assert_eq!(ask(count, &["n"]).await, [3]);
    assert_eq!(ask(count, &["n"]).await, [3]);
    write_parquet(vec![1, 2, 3, 4, 5]);
    assert_eq!(
        ask(count, &["n"]).await,
        [5],
        "a rewritten Parquet file is counted afresh"
    );
    // Each Parquet file is read with the schema it has now (station/src/file_schemas.rs
    // keeps schemas by file): replaced, at the same modification time, by a file whose
    // column holds doubles, it is read as doubles (cast to the table's Int64), not with the
    // schema kept for the file before.
    let sum = "SELECT sum(x) AS s FROM p";
    assert_eq!(ask(sum, &["s"]).await, [15]);
    assert_eq!(ask(sum, &["s"]).await, [15]);
    let before = std::fs::metadata(&parquet).unwrap().modified().unwrap();
    let doubles = dir.path().join("doubles.parquet");
    let double_schema = Arc::new(arrow::datatypes::Schema::new(vec![
        arrow::datatypes::Field::new("x", DataType::Float64, true),
    ]));
    let batch = RecordBatch::try_new(
        Arc::clone(&double_schema),
        vec![Arc::new(arrow::array::Float64Array::from(vec![10.0, 20.0]))],
    )
    .unwrap();
    let file = std::fs::File::create(&doubles).unwrap();
    let mut writer = parquet::arrow::ArrowWriter::try_new(file, double_schema, None).unwrap();
    writer.write(&batch).unwrap();
    writer.close().unwrap();
    std::fs::File::options()
        .write(true)
        .open(&doubles)
        .unwrap()
        .set_modified(before)
        .unwrap();
    std::fs::rename(&doubles, &parquet).unwrap();
    assert_eq!(
        ask(sum, &["s"]).await,
        [30],
        "a Parquet file replaced by one of another schema is read with its own"
    );
}
