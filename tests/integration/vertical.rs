//! Vertically partitioned tables: the breast-cancer split of `tests/data` (station_a:
//! diagnosis and the `mean_*` features, station_b: the `*_error` features, station_c: the
//! `worst_*` features without the 29 patients with `patient_id % 20 == 7`), linked by
//! keyed pseudonyms of `patient_id`.
//!
//! The reference is plain DataFusion over the three files joined on `patient_id`. What
//! crosses the wire between the hub and the member stations is recorded by a wrapper around
//! each station's Flight service, and checked to hold no raw `patient_id`.

use std::collections::BTreeSet;
use std::pin::Pin;
use std::sync::{Arc, Mutex};

use arrow::array::{Array, AsArray};
use arrow::datatypes::DataType;
use arrow_flight::flight_service_server::{FlightService, FlightServiceServer};
use arrow_flight::{
    Action, Criteria, Empty, FlightData, FlightDescriptor, FlightInfo, HandshakeRequest,
    HandshakeResponse, PollInfo, PutResult, SchemaResult, Ticket,
};
use datafusion::prelude::{CsvReadOptions, SessionContext};
use futures::{Stream, StreamExt};
use railyard::client::HubClient;
use railyard::local::TableSpec;
use railyard_contract::FragmentTicket;
use railyard_engine::{Hub, HubOptions, StationAddress, VerticalSpec};
use railyard_station::{Format, Policy, Station, StationConfig, StationService, TableFile};
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::{Request, Response, Status, Streaming};

use crate::fixtures::{self, test_data};
use crate::slt::format_rows;

const TABLE: &str = "breast";
const MEMBERS: [&str; 3] = ["station_a", "station_b", "station_c"];
/// A grouped query whose filter is a conjunction over two members' columns.
const GROUPED: &str = "SELECT diagnosis, avg(worst_area), avg(area_error) FROM breast \
                       WHERE mean_radius > 12 AND area_error < 100 GROUP BY diagnosis";

fn vertical_spec() -> TableSpec {
    TableSpec {
        name: TABLE.into(),
        dir: test_data("breast_cancer/vertical/csv"),
        key: Some("patient_id".into()),
    }
}

/// The reference: the three files joined on `patient_id`, as one table `breast` without
/// the key (what the federated table means).
async fn reference() -> SessionContext {
    let ctx = SessionContext::new();
    let mut columns = Vec::new();
    for m in MEMBERS {
        let file = test_data(&format!("breast_cancer/vertical/csv/{m}.csv"));
        ctx.register_csv(
            m,
            fixtures::path(&file),
            CsvReadOptions::new().has_header(true),
        )
        .await
        .unwrap();
        let schema = ctx.table(m).await.unwrap().schema().clone();
        columns.extend(
            schema
                .fields()
                .iter()
                .filter(|f| f.name() != "patient_id")
                .map(|f| format!("{m}.\"{}\"", f.name())),
        );
    }
    let view = format!(
        "CREATE VIEW {TABLE} AS SELECT {} FROM station_a \
         JOIN station_b ON station_a.patient_id = station_b.patient_id \
         JOIN station_c ON station_a.patient_id = station_c.patient_id",
        columns.join(", ")
    );
    ctx.sql(&view).await.unwrap().collect().await.unwrap();
    ctx
}

async fn answer(client: &mut HubClient, sql: &str) -> Vec<Vec<String>> {
    let got = client
        .query(sql)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"));
    format_rows(&got.batches)
}

async fn expected(ctx: &SessionContext, sql: &str) -> Vec<Vec<String>> {
    format_rows(&ctx.sql(sql).await.unwrap().collect().await.unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn vertical_answers_equal_the_inner_join_of_the_stations() {
    // The open policy (k = 1) with the vertical opt-in `railyard local` adds: the answers
    // must equal the reference exactly.
    let specs = vec![
        vertical_spec(),
        fixtures::spec(
            "breast_cancer",
            test_data("breast_cancer/horizontal/parquet"),
        ),
    ];
    let federation = fixtures::federation(&specs, HubOptions::default()).await;
    let mut client = HubClient::connect(&federation.hub_url).await.unwrap();
    let reference = reference().await;
    reference
        .register_parquet(
            "breast_cancer",
            fixtures::path(&test_data("breast_cancer/full.parquet")),
            Default::default(),
        )
        .await
        .unwrap();

    assert_eq!(
        answer(&mut client, "SELECT count(*) FROM breast").await,
        vec![vec!["540".to_string()]]
    );
    let queries = [
        // Columns of all three stations in one aggregate.
        "SELECT diagnosis, count(*) AS n, avg(worst_area) AS w, sum(radius_error) AS r, \
         stddev(mean_texture) AS t FROM breast GROUP BY diagnosis ORDER BY diagnosis",
        // Filters pushed to two different stations.
        "SELECT count(*), avg(mean_radius), var_pop(worst_smoothness) FROM breast \
         WHERE worst_texture > 25 AND radius_error < 0.5",
        // A filter over two stations' columns runs after the join.
        "SELECT diagnosis, count(*), avg(mean_area) FROM breast \
         WHERE mean_radius > worst_radius * 0.85 GROUP BY diagnosis ORDER BY diagnosis",
        // Group keys computed from two stations' columns.
        "SELECT CASE WHEN mean_radius > 15 THEN 'large' ELSE 'small' END AS size, \
         worst_concavity > 0.3 AS concave, count(*), corr(mean_area, area_error) \
         FROM breast GROUP BY 1, 2 ORDER BY 1, 2",
        // HAVING, ORDER BY and LIMIT above the federated aggregate.
        "SELECT round(mean_radius) AS r, count(*) AS n, avg(worst_perimeter) FROM breast \
         GROUP BY 1 HAVING count(*) > 20 ORDER BY n DESC, r LIMIT 5",
        // A vertical aggregate joined with a horizontal one (each side aggregated).
        "SELECT v.diagnosis, v.n AS linked, h.n AS pooled FROM \
         (SELECT diagnosis, count(*) AS n FROM breast GROUP BY diagnosis) v JOIN \
         (SELECT diagnosis, count(*) AS n FROM breast_cancer GROUP BY diagnosis) h \
         ON v.diagnosis = h.diagnosis ORDER BY v.diagnosis",
    ];
    for sql in queries {
        assert_eq!(
            answer(&mut client, sql).await,
            expected(&reference, sql).await,
            "{sql}"
        );
    }
    federation.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn explain_shows_each_member_fragment_and_the_hub_join() {
    let federation = fixtures::federation(&[vertical_spec()], HubOptions::default()).await;
    let mut client = HubClient::connect(&federation.hub_url).await.unwrap();
    let got = client
        .query(
            "EXPLAIN FEDERATED SELECT diagnosis, avg(worst_area) FROM breast \
             WHERE mean_radius > 15 GROUP BY diagnosis",
        )
        .await
        .unwrap();
    let rows: Vec<[String; 4]> = got
        .batches
        .iter()
        .flat_map(|b| {
            (0..b.num_rows())
                .map(|r| {
                    std::array::from_fn(|c| b.column(c).as_string::<i32>().value(r).to_string())
                })
                .collect::<Vec<_>>()
        })
        .collect();
    let at = |location: &str| {
        rows.iter()
            .find(|r| r[0] == location)
            .unwrap_or_else(|| panic!("no row for {location}: {rows:?}"))
    };
    let a = at("station_a");
    assert!(a[1].contains("pseudonymized rows of breast"), "{a:?}");
    assert!(
        a[2].starts_with(
            "SELECT pseudonym(\"patient_id\") AS \"__pseudonym\", \"diagnosis\" AS \"diagnosis\", \
             \"mean_radius\" AS \"mean_radius\" FROM \"breast\" WHERE (mean_radius > 15"
        ),
        "{a:?}"
    );
    assert!(
        at("station_b")[2].starts_with("SELECT pseudonym(\"patient_id\") AS \"__pseudonym\" FROM")
    );
    assert!(at("station_c")[2].contains("\"worst_area\""));
    assert!(!at("station_c")[2].contains("WHERE"));
    let join = rows
        .iter()
        .find(|r| r[0] == "hub" && r[1].contains("join of breast"))
        .expect("a hub join row");
    assert!(
        join[2].starts_with("inner join of [station_a, station_b, station_c] on the pseudonyms"),
        "{join:?}"
    );
    assert!(join[2].contains("partial_avg(worst_area)"), "{join:?}");
    assert!(
        rows.iter()
            .all(|r| !r[2].contains("patient_id") || r[2].contains("pseudonym(\"patient_id\")"))
    );
    federation.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_default_policy_thresholds_joined_groups_and_refuses_row_level_answers() {
    let governance = fixtures::default_governance();
    let federation =
        fixtures::federation_with(&[vertical_spec()], HubOptions::default(), &governance).await;
    let mut client = HubClient::connect(&federation.hub_url).await.unwrap();
    let reference = reference().await;

    // Small joined groups are withheld (k = 5 applies to the joined rows, plus a noisy
    // margin of 0 to 3): every group of 8 or more is released as it is, every released
    // group has at least 5 rows, and none is changed.
    let grouped = "SELECT round(worst_radius) AS r, diagnosis, count(*) AS n FROM breast \
                   GROUP BY 1, 2 ORDER BY 1, 2";
    let at_least =
        |n: u64| format!("SELECT * FROM ({grouped}) WHERE n >= {n} ORDER BY r, diagnosis");
    let got = answer(&mut client, grouped).await;
    let sure = expected(&reference, &at_least(8)).await;
    let possible = expected(&reference, &at_least(5)).await;
    assert!(
        sure.iter().all(|row| got.contains(row)),
        "{got:?}\n{sure:?}"
    );
    assert!(
        got.iter().all(|row| possible.contains(row)),
        "{got:?}\n{possible:?}"
    );
    assert!(
        got.len() < expected(&reference, grouped).await.len(),
        "some group is small"
    );

    for (sql, rule) in [
        ("SELECT mean_radius, worst_area FROM breast", "row_level"),
        ("SELECT max(worst_area) FROM breast", "unsafe_aggregate"),
        // Not even the joined row count leaves row by row.
        ("SELECT 1 FROM breast", "row_level"),
        (
            "SELECT count(*) FROM breast WHERE patient_id = 7",
            "patient_id",
        ),
    ] {
        let err = client.query(sql).await.unwrap_err().to_string();
        assert!(err.contains(rule), "{sql}: {err}");
    }

    // Crafted fragments sent straight to a member station: the raw key never leaves, and a
    // pseudonymized release covers at least k rows.
    let station_a = &federation.stations[0].url;
    for (sql, rule) in [
        (
            "SELECT patient_id, mean_radius FROM breast",
            "join_key_column",
        ),
        (
            "SELECT pseudonym(patient_id) AS p FROM breast WHERE mean_radius > 27",
            "min_group_size",
        ),
        ("SELECT pseudonym(mean_radius) AS p FROM breast", "join_key"),
    ] {
        let err = fixtures::run_at_station(station_a, sql).await.unwrap_err();
        assert!(err.contains(&format!("rule {rule}")), "{sql}: {err}");
        assert!(!err.contains("28.11"), "{err}");
    }
    federation.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_station_that_does_not_opt_in_stops_the_query_before_any_station_runs() {
    let dir = fixtures::audit_dir();
    let policy_file = dir.join("policy.toml");
    std::fs::write(
        &policy_file,
        "[tables.breast]\nallow_vertical = false\n[tables.breast.columns]\npatient_id = \"join_key\"\n",
    )
    .unwrap();
    let governance =
        railyard::local::Governance::new(Some(&policy_file), dir.join("logs")).unwrap();
    // The same stations also hold the horizontal split.
    let specs = [
        vertical_spec(),
        fixtures::spec(
            "breast_cancer",
            test_data("breast_cancer/horizontal/parquet"),
        ),
    ];
    let federation = fixtures::federation_with(&specs, HubOptions::default(), &governance).await;
    let mut client = HubClient::connect(&federation.hub_url).await.unwrap();
    let err = client
        .query(
            "SELECT v.diagnosis, v.n, h.n FROM \
             (SELECT diagnosis, count(*) AS n FROM breast GROUP BY diagnosis) v JOIN \
             (SELECT diagnosis, count(*) AS n FROM breast_cancer GROUP BY diagnosis) h \
             ON v.diagnosis = h.diagnosis",
        )
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("allow_vertical"), "{err}");
    // Every member refused at the hub's check, before any fragment ran anywhere: the
    // horizontal fragment of the same query, accepted at the check, never ran either.
    for m in MEMBERS {
        let log = std::fs::read_to_string(governance.audit_log(m)).unwrap();
        let records: Vec<serde_json::Value> = log
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert!(!records.is_empty(), "{m} audited nothing");
        assert!(
            records.iter().all(|r| r["decision"] == "refused"),
            "{m}: {records:?}"
        );
    }
    let join_log = dir.join("logs/hub/breast-join/audit.jsonl");
    let join_log = std::fs::read_to_string(join_log).unwrap();
    assert!(join_log.contains("refused"), "{join_log}");
    federation.shutdown().await.unwrap();
}

// ---- What crosses the wire -------------------------------------------------------------

/// One `DoGet` a member station answered: the ticket and the Flight messages it sent.
#[derive(Debug, Clone)]
struct Recorded {
    ticket: FragmentTicket,
    data: Vec<FlightData>,
}

type Log = Arc<Mutex<Vec<Recorded>>>;
type FlightStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

/// What a compromised station does to each message it sends.
type Tamper = fn(FlightData) -> FlightData;

/// A station's Flight service that records every ticket and every message it sends, each
/// message first passed through `tamper` (a compromised station's).
struct Recorder {
    inner: StationService,
    log: Log,
    tamper: Tamper,
}

#[tonic::async_trait]
impl FlightService for Recorder {
    type HandshakeStream = FlightStream<HandshakeResponse>;
    type ListFlightsStream = <StationService as FlightService>::ListFlightsStream;
    type DoGetStream = FlightStream<FlightData>;
    type DoPutStream = FlightStream<PutResult>;
    type DoActionStream = <StationService as FlightService>::DoActionStream;
    type ListActionsStream = <StationService as FlightService>::ListActionsStream;
    type DoExchangeStream = FlightStream<FlightData>;

    async fn handshake(
        &self,
        _r: Request<Streaming<HandshakeRequest>>,
    ) -> Result<Response<Self::HandshakeStream>, Status> {
        Err(Status::unimplemented("recorder"))
    }
    async fn list_flights(
        &self,
        r: Request<Criteria>,
    ) -> Result<Response<Self::ListFlightsStream>, Status> {
        self.inner.list_flights(r).await
    }
    async fn get_flight_info(
        &self,
        _r: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        Err(Status::unimplemented("recorder"))
    }
    async fn poll_flight_info(
        &self,
        _r: Request<FlightDescriptor>,
    ) -> Result<Response<PollInfo>, Status> {
        Err(Status::unimplemented("recorder"))
    }
    async fn get_schema(
        &self,
        _r: Request<FlightDescriptor>,
    ) -> Result<Response<SchemaResult>, Status> {
        Err(Status::unimplemented("recorder"))
    }
    async fn do_get(&self, r: Request<Ticket>) -> Result<Response<Self::DoGetStream>, Status> {
        let ticket =
            FragmentTicket::from_bytes(&r.get_ref().ticket).map_err(Status::invalid_argument)?;
        let at = {
            let mut log = self.log.lock().unwrap();
            log.push(Recorded {
                ticket,
                data: Vec::new(),
            });
            log.len() - 1
        };
        let log = Arc::clone(&self.log);
        let tamper = self.tamper;
        let stream = self.inner.do_get(r).await?.into_inner().map(move |item| {
            let item = item.map(tamper);
            if let Ok(data) = &item {
                log.lock().unwrap()[at].data.push(data.clone());
            }
            item
        });
        Ok(Response::new(Box::pin(stream)))
    }
    async fn do_put(
        &self,
        _r: Request<Streaming<FlightData>>,
    ) -> Result<Response<Self::DoPutStream>, Status> {
        Err(Status::unimplemented("recorder"))
    }
    async fn do_exchange(
        &self,
        _r: Request<Streaming<FlightData>>,
    ) -> Result<Response<Self::DoExchangeStream>, Status> {
        Err(Status::unimplemented("recorder"))
    }
    async fn do_action(
        &self,
        r: Request<Action>,
    ) -> Result<Response<Self::DoActionStream>, Status> {
        self.inner.do_action(r).await
    }
    async fn list_actions(
        &self,
        r: Request<Empty>,
    ) -> Result<Response<Self::ListActionsStream>, Status> {
        self.inner.list_actions(r).await
    }
}

/// The three members as separate Flight servers, each behind a [`Recorder`] and with its
/// own stop switch, and a hub with the vertical table over them.
struct Members {
    hub: Hub,
    logs: Vec<Log>,
    servers: Vec<(
        std::net::SocketAddr,
        tokio::sync::oneshot::Sender<()>,
        tokio::task::JoinHandle<()>,
    )>,
}

async fn recorded_members(fragment_timeout: std::time::Duration) -> Members {
    recorded_members_tampered(fragment_timeout, |_| None).await
}

/// [`recorded_members`], each member's messages passed through `tamper(member)` (none: sent
/// as the station sent them).
async fn recorded_members_tampered(
    fragment_timeout: std::time::Duration,
    tamper: fn(&str) -> Option<Tamper>,
) -> Members {
    let secret: Arc<[u8]> = Arc::from(vec![42u8; 32]);
    let dir = fixtures::audit_dir();
    let mut policy = Policy::load(&fixtures::repo().join("tests/policies/open.toml")).unwrap();
    policy.allow_vertical = Some(true);
    let policy = railyard::local::Governance {
        policy,
        data_dir: dir.clone(),
        references: Vec::new(),
    }
    .station_policy(&[vertical_spec()]);
    let mut addresses = Vec::new();
    let mut logs = Vec::new();
    let mut servers = Vec::new();
    for m in MEMBERS {
        let table = TableFile {
            name: TABLE.into(),
            path: test_data(&format!("breast_cancer/vertical/csv/{m}.csv")),
            format: Format::Csv,
            schema: None,
        };
        let config = StationConfig {
            policy: policy.clone(),
            audit_log: dir.join(m).join("audit.jsonl"),
            collaboration_secret: Some(Arc::clone(&secret)),
            hub_secret: None,
        };
        let station = Arc::new(Station::open(m, &[table], config).await.unwrap());
        let log: Log = Arc::default();
        let service = FlightServiceServer::new(Recorder {
            inner: StationService::new(station),
            log: Arc::clone(&log),
            tamper: tamper(m).unwrap_or(std::convert::identity),
        });
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        addresses.push(StationAddress {
            name: m.to_string(),
            url: format!("grpc://{addr}"),
        });
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming_shutdown(TcpListenerStream::new(listener), async {
                    let _ = stopped.await;
                })
                .await
                .unwrap();
        });
        servers.push((addr, stop, task));
        logs.push(log);
    }
    let options = HubOptions {
        vertical: vec![VerticalSpec {
            name: TABLE.into(),
            key: "patient_id".into(),
            members: Vec::new(),
        }],
        data_dir: Some(dir.join("hub")),
        fragment_timeout,
        ..HubOptions::default()
    };
    let hub = Hub::connect(&addresses, options).await.unwrap();
    Members { hub, logs, servers }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn raw_patient_ids_never_reach_the_hub() {
    let Members {
        hub,
        logs,
        servers: _servers,
    } = recorded_members(std::time::Duration::from_secs(60)).await;
    for sql in ["SELECT count(*) FROM breast", GROUPED] {
        let batches = hub.collect(sql, "researcher").await.unwrap();
        assert!(
            batches.iter().map(|b| b.num_rows()).sum::<usize>() > 0,
            "{sql}"
        );
    }
    // EXPLAIN shows exactly the SQL the members received for the grouped query.
    let explained = hub
        .collect(&format!("EXPLAIN FEDERATED {GROUPED}"), "researcher")
        .await
        .unwrap();
    for (m, log) in MEMBERS.iter().zip(&logs) {
        let shown = explained
            .iter()
            .flat_map(|b| {
                let location = b.column(0).as_string::<i32>();
                let plan = b.column(2).as_string::<i32>();
                (0..b.num_rows())
                    .filter(|&r| location.value(r) == *m)
                    .map(|r| plan.value(r).to_string())
                    .collect::<Vec<_>>()
            })
            .collect::<Vec<_>>();
        assert_eq!(
            shown,
            vec![log.lock().unwrap()[1].ticket.sql.clone()],
            "{m}"
        );
    }
    // A model runs many rounds at the join station, but each member releases its rows once
    // per call: the joined rows are kept for the rest of the query.
    let before: Vec<usize> = logs.iter().map(|l| l.lock().unwrap().len()).collect();
    let fit = hub
        .collect(
            "SELECT iterations, converged FROM glm_fit('breast', \
             'diagnosis ~ mean_radius + worst_texture', 'binomial')",
            "researcher",
        )
        .await
        .unwrap();
    assert_eq!(format_rows(&fit)[0][1], "true");
    let iterations: usize = format_rows(&fit)[0][0].parse().unwrap();
    assert!(iterations >= 5, "{iterations}");
    for (log, before) in logs.iter().zip(before) {
        assert_eq!(
            log.lock().unwrap().len() - before,
            1,
            "one release per member"
        );
    }

    let ids: BTreeSet<i64> = (1..=569).collect();
    for (m, log) in MEMBERS.iter().zip(&logs) {
        let recorded = log.lock().unwrap().clone();
        // The count, the group-by and the model: three releases.
        assert_eq!(recorded.len(), 3, "{m}");
        for r in recorded {
            // The key appears in the SQL only as the argument of pseudonym().
            assert_eq!(
                r.ticket.sql.matches("patient_id").count(),
                r.ticket.sql.matches("pseudonym(\"patient_id\")").count(),
                "{}",
                r.ticket.sql
            );
            let batches = arrow_flight::utils::flight_data_to_batches(&r.data).unwrap();
            assert!(!batches.is_empty());
            for b in &batches {
                let schema = b.schema();
                assert_eq!(schema.field(0).name(), "__pseudonym");
                assert!(schema.fields().iter().all(|f| f.name() != "patient_id"));
                let pseudonyms = b.column(0).as_binary::<i32>();
                for p in pseudonyms.iter().flatten() {
                    assert_eq!(p.len(), 32);
                    // Neither the id's text nor an unkeyed hash of it.
                    assert!(!ids.iter().any(|id| p == id.to_string().as_bytes()));
                }
                let first = pseudonyms.value(0);
                assert!(
                    !ids.iter().any(|id| {
                        use sha2::Digest;
                        sha2::Sha256::digest(id.to_string().as_bytes()).as_slice() == first
                    }),
                    "an unkeyed hash would be recomputable from a guessed id"
                );
                // No other column carries the ids either.
                for c in b.columns().iter().skip(1) {
                    if c.data_type() == &DataType::Int64 {
                        let values: BTreeSet<i64> = c
                            .as_primitive::<arrow::datatypes::Int64Type>()
                            .iter()
                            .flatten()
                            .collect();
                        assert!(
                            values.len() < 10 || !values.is_subset(&ids),
                            "{m}: an id-like column"
                        );
                    }
                }
            }
        }
    }
}

/// The statistics functions read a vertical table through the same join: a model over it
/// uses the 540 patients every station holds (its coefficients are checked against
/// statsmodels in `python/tests/test_vertical.py`).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_statistics_functions_run_on_vertical_tables() {
    let federation = fixtures::federation(&[vertical_spec()], HubOptions::default()).await;
    let batches = federation
        .hub
        .collect(
            "SELECT n, converged FROM glm_fit('breast', 'diagnosis ~ mean_radius + worst_texture', 'binomial')",
            "researcher",
        )
        .await
        .unwrap();
    assert_eq!(
        format_rows(&batches),
        vec![vec!["540".to_string(), "true".to_string()]]
    );
    federation.shutdown().await.unwrap();
}

#[test]
fn railyard_local_explains_bad_vertical_arguments() {
    let vertical = format!(
        "breast={}",
        test_data("breast_cancer/vertical/csv").display()
    );
    let no_key = fixtures::railyard()
        .args(["local", "--listen", "127.0.0.1:0", "--vertical", &vertical])
        .output()
        .unwrap();
    assert!(!no_key.status.success());
    let err = String::from_utf8_lossy(&no_key.stderr);
    assert!(err.contains("--key"), "{err}");

    let wrong_key = fixtures::railyard()
        .args([
            "local",
            "--listen",
            "127.0.0.1:0",
            "--key",
            "id",
            "--vertical",
            &vertical,
        ])
        .output()
        .unwrap();
    assert!(!wrong_key.status.success());
    let err = String::from_utf8_lossy(&wrong_key.stderr);
    assert!(
        err.contains("vertical table 'breast': station 'station_a'")
            && err.contains("has no key column 'id'; its columns are patient_id, diagnosis"),
        "{err}"
    );

    // The horizontal lung split: every station holds the same columns, so each column
    // would come from three stations.
    let overlapping = fixtures::railyard()
        .args([
            "local",
            "--listen",
            "127.0.0.1:0",
            "--key",
            "patient_id",
            "--vertical",
        ])
        .arg(format!(
            "lung={}",
            test_data("lung/horizontal/csv").display()
        ))
        .output()
        .unwrap();
    assert!(!overlapping.status.success());
    let err = String::from_utf8_lossy(&overlapping.stderr);
    assert!(
        err.contains("vertical table 'lung': column 'inst' is held by both station 'station_a' and station 'station_b'"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_station_without_the_collaboration_secret_refuses_to_pseudonymize() {
    let table = TableFile {
        name: TABLE.into(),
        path: test_data("breast_cancer/vertical/csv/station_b.csv"),
        format: Format::Csv,
        schema: None,
    };
    let dir = fixtures::audit_dir();
    let policy = railyard::local::Governance::new(None, &dir)
        .unwrap()
        .station_policy(&[vertical_spec()]);
    let config = StationConfig {
        policy,
        audit_log: dir.join("audit.jsonl"),
        collaboration_secret: None,
        hub_secret: None,
    };
    let station = Station::open("station_b", &[table], config).await.unwrap();
    let ticket = FragmentTicket {
        query_id: "q".into(),
        fragment: 1,
        researcher: "r".into(),
        collaboration: String::new(),
        epsilon: None,
        sql: "SELECT pseudonym(patient_id) AS p, radius_error FROM breast".into(),
        train: None,
    };
    let err = station
        .check_fragment(&ticket)
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("rule collaboration_secret"), "{err}");
    assert!(station.run_fragment(&ticket).await.is_err());
}

/// A member whose answer is cut short (a record batch's body shorter than its buffers say,
/// which arrow's own reader would slice past and panic on) fails the query with an error
/// naming it, and the hub answers the next query.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_member_that_sends_a_short_batch_is_named() {
    fn cut(mut data: FlightData) -> FlightData {
        if !data.data_body.is_empty() {
            data.data_body = data.data_body.slice(..data.data_body.len() / 2);
        }
        data
    }
    let Members {
        hub,
        servers: _servers,
        ..
    } = recorded_members_tampered(std::time::Duration::from_secs(60), |m| {
        (m == "station_b").then_some(cut as Tamper)
    })
    .await;
    for _ in 0..2 {
        let err = hub
            .collect("SELECT count(*) FROM breast", "r")
            .await
            .expect_err("a short answer fails the query")
            .to_string();
        assert!(err.contains("station_b"), "{err}");
        assert!(err.contains("beyond its body"), "{err}");
    }
}

/// A member that stops answering is named in the error: the join station gives its members
/// less time than the hub gives the join station.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_member_that_hangs_is_named_when_the_query_times_out() {
    let Members {
        hub, mut servers, ..
    } = recorded_members(std::time::Duration::from_millis(800)).await;
    let (addr, stop, task) = servers.pop().expect("station_c");
    let _ = stop.send(());
    task.await.unwrap();
    // A peer on station_c's address that accepts connections and never answers.
    let black_hole = TcpListener::bind(addr).await.unwrap();
    let held = tokio::spawn(async move {
        let mut open = Vec::new();
        while let Ok((socket, _)) = black_hole.accept().await {
            open.push(socket);
        }
    });
    let err = hub
        .collect(
            "SELECT diagnosis, count(*) FROM breast GROUP BY diagnosis",
            "r",
        )
        .await
        .expect_err("a hung member fails the query")
        .to_string();
    // The join station's failure while running names no station of its own; the member
    // that did not answer is named (a timeout is not a value of the data).
    assert!(err.contains("station 'station_c' did not answer"), "{err}");
    held.abort();
}
