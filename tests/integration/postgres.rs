//! A station whose tables live in PostgreSQL answers exactly like the same stations over
//! Parquet files: the same queries through a real hub, over real sockets, against a real
//! PostgreSQL server (`scripts/postgres`, started by `scripts/test` and `.ci/run`).

use std::sync::Arc;

use arrow::array::RecordBatch;
use railyard::client::HubClient;
use railyard_engine::{Hub, HubOptions, StationAddress};
use railyard_station::postgres::{PostgresSource, Relation};
use railyard_station::{Policy, Station, StationConfig};
use tokio::net::TcpListener;

use crate::fixtures::{self, STATIONS, spec, test_data};

fn connection() -> String {
    std::env::var("RAILYARD_TEST_POSTGRES").expect(
        "RAILYARD_TEST_POSTGRES must hold the test PostgreSQL server's connection string: \
         `export RAILYARD_TEST_POSTGRES=\"$(scripts/postgres)\"` (scripts/test does this)",
    )
}

async fn client() -> tokio_postgres::Client {
    let (client, conn) = tokio_postgres::connect(&connection(), tokio_postgres::NoTls)
        .await
        .expect("the test PostgreSQL server accepts connections");
    tokio::spawn(conn);
    client
}

/// Copies each lung station's CSV into its own PostgreSQL table in a fresh schema; returns
/// the schema's name.
async fn load_lung() -> String {
    let schema = format!("lung_{}", uuid_like());
    let pg = client().await;
    pg.batch_execute(&format!("CREATE SCHEMA {schema}"))
        .await
        .expect("create schema");
    for station in STATIONS {
        let text =
            std::fs::read_to_string(test_data(&format!("lung/horizontal/csv/{station}.csv")))
                .expect("lung CSV");
        let mut lines = text.lines();
        let header = lines.next().expect("header");
        let columns: Vec<String> = header.split(',').map(|c| format!("{c} bigint")).collect();
        let rows: Vec<String> = lines
            .map(|line| {
                // Every lung value is an integer or missing: no quoting is needed.
                let values: Vec<&str> = line
                    .split(',')
                    .map(|v| if v.is_empty() { "NULL" } else { v })
                    .collect();
                format!("({})", values.join(","))
            })
            .collect();
        pg.batch_execute(&format!(
            "CREATE TABLE {schema}.{station} ({}); INSERT INTO {schema}.{station} VALUES {};",
            columns.join(", "),
            rows.join(",")
        ))
        .await
        .expect("load a lung station");
    }
    schema
}

fn uuid_like() -> String {
    use rand::RngCore;
    format!("{:016x}", rand::rng().next_u64())
}

fn open_policy() -> Policy {
    Policy::load(&fixtures::repo().join("tests/policies/open.toml")).expect("open policy")
}

/// Three stations over PostgreSQL tables and a hub; returns the hub's URL.
async fn postgres_federation(schema: &str) -> String {
    federation_over(
        STATIONS
            .iter()
            .map(|station| (station.to_string(), format!("{schema}.{station}")))
            .collect(),
        "lung",
    )
    .await
}

/// One station per (name, PostgreSQL relation), each serving it as `table`, and a hub;
/// returns the hub's URL.
async fn federation_over(stations: Vec<(String, String)>, table: &str) -> String {
    let mut addresses = Vec::new();
    let dir = fixtures::audit_dir();
    for (station, relation) in &stations {
        let station = station.as_str();
        let source = PostgresSource {
            name: table.to_string(),
            connection: connection(),
            relation: Relation::Table(relation.clone()),
        };
        let config = StationConfig {
            policy: open_policy(),
            audit_log: dir.join(station).join("audit.jsonl"),
            collaboration_secret: None,
            hub_secret: None,
        };
        let opened = Station::open_sources(station, &[], &[source], config)
            .await
            .expect("a PostgreSQL station opens");
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let url = format!("grpc://{}", listener.local_addr().expect("addr"));
        tokio::spawn(railyard_station::serve(
            Arc::new(opened),
            listener,
            std::future::pending(),
        ));
        addresses.push(StationAddress {
            name: station.to_string(),
            url,
        });
    }
    let hub = Arc::new(
        Hub::connect(&addresses, HubOptions::default())
            .await
            .expect("hub"),
    );
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind hub");
    let url = format!("grpc://{}", listener.local_addr().expect("addr"));
    tokio::spawn(railyard_engine::serve(
        hub,
        listener,
        std::future::pending(),
    ));
    url
}

async fn answer(url: &str, sql: &str) -> Vec<RecordBatch> {
    let mut client = HubClient::connect(url).await.expect("connect");
    client
        .query(sql)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
        .batches
}

fn text(batches: &[RecordBatch]) -> String {
    arrow::util::pretty::pretty_format_batches(batches)
        .expect("format")
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_postgres_station_answers_like_the_parquet_one() {
    let schema = load_lung().await;
    let pg = postgres_federation(&schema).await;
    let parquet = fixtures::federation(
        &[spec("lung", test_data("lung/horizontal/parquet"))],
        HubOptions::default(),
    )
    .await;
    // Aggregates, every kind of pushed filter (and some that stay in DataFusion), row-level
    // answers (the open test policy makes every column public), NULLs.
    let queries = [
        "SELECT count(*) AS n, sum(time) AS t, min(age) AS lo, max(age) AS hi FROM lung",
        "SELECT sex, count(*) AS n, avg(age) AS age, count(wt_loss) AS w FROM lung \
         GROUP BY sex ORDER BY sex",
        "SELECT ph_ecog, count(*) AS n FROM lung WHERE age > 60 AND sex = 2 \
         GROUP BY ph_ecog ORDER BY ph_ecog NULLS FIRST",
        "SELECT count(*) AS n FROM lung WHERE meal_cal IS NULL OR wt_loss IS NULL",
        "SELECT count(*) AS n FROM lung WHERE inst IN (1, 3, 11) AND age BETWEEN 50 AND 70",
        "SELECT count(*) AS n FROM lung WHERE NOT (status = 1) AND abs(age - 60) < 5",
        "SELECT patient_id, age, meal_cal FROM lung WHERE age >= 75 ORDER BY patient_id",
        "SELECT status, avg(time) AS t FROM lung WHERE ph_karno <> 100 GROUP BY status \
         ORDER BY status",
    ];
    for sql in queries {
        let from_postgres = text(&answer(&pg, sql).await);
        let from_parquet = text(&answer(&parquet.hub_url, sql).await);
        assert_eq!(from_postgres, from_parquet, "{sql}");
        // And neither is vacuous.
        assert!(from_postgres.lines().count() > 4, "{sql}: {from_postgres}");
    }
    parquet.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_postgres_table_that_cannot_be_read_is_named_and_the_password_is_not_echoed() {
    let pg = client().await;
    let schema = format!("odd_{}", uuid_like());
    pg.batch_execute(&format!(
        "CREATE SCHEMA {schema}; CREATE TABLE {schema}.t (id bigint, doc jsonb);"
    ))
    .await
    .expect("create");
    let config = || StationConfig {
        policy: Policy::default(),
        audit_log: fixtures::audit_dir().join("audit.jsonl"),
        collaboration_secret: None,
        hub_secret: None,
    };
    let source = |connection: String, relation: Relation| PostgresSource {
        name: "odd".to_string(),
        connection,
        relation,
    };
    let e = Station::open_sources(
        "s",
        &[],
        &[source(connection(), Relation::Table(format!("{schema}.t")))],
        config(),
    )
    .await
    .err()
    .expect("a jsonb column is refused");
    let message = e.to_string();
    assert!(
        message.contains("'odd'") && message.contains("'doc'") && message.contains("jsonb"),
        "{message}"
    );
    // A query relation can cast it away.
    let station = Station::open_sources(
        "s",
        &[],
        &[source(
            connection(),
            Relation::Query(format!("SELECT id, doc::text AS doc FROM {schema}.t")),
        )],
        config(),
    )
    .await
    .expect("a query relation opens");
    assert_eq!(station.tables().await.expect("tables").len(), 1);

    // Nobody listens on port 1: the error names the table, never the connection string.
    let e = Station::open_sources(
        "s",
        &[],
        &[source(
            "host=127.0.0.1 port=1 user=u password=hunter2-secret dbname=d".to_string(),
            Relation::Table("t".to_string()),
        )],
        config(),
    )
    .await
    .err()
    .expect("unreachable server");
    let message = e.to_string();
    assert!(
        message.contains("'odd'") && message.contains("connect"),
        "{message}"
    );
    assert!(!message.contains("hunter2"), "{message}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn numeric_and_char_columns_filter_as_datafusion_reads_them() {
    // numeric is read as float8 and char(n) without its padding: a filter PostgreSQL runs
    // (text equality is pushed, floating point is not) must never drop a row DataFusion
    // keeps over the values it reads.
    let pg = client().await;
    let schema = format!("edge_{}", uuid_like());
    pg.batch_execute(&format!(
        "CREATE SCHEMA {schema};
         CREATE TABLE {schema}.t (id bigint, dose numeric, code char(6));
         INSERT INTO {schema}.t VALUES
           (1, 0.09999999999999999999, 'ab'), (2, 0.1, 'ab'), (3, 0.2, 'cd'), (4, NULL, NULL);"
    ))
    .await
    .expect("create");
    let hub = federation_over(vec![("s".to_string(), format!("{schema}.t"))], "t").await;
    // What DataFusion's own semantics give over the values it reads (as f64, unpadded).
    // PostgreSQL's numeric → float8 rounds correctly, as Rust's parse does.
    let first: f64 = "0.09999999999999999999".parse().expect("a decimal");
    let doses: [Option<f64>; 4] = [Some(first), Some(0.1), Some(0.2), None];
    let codes = [Some("ab"), Some("ab"), Some("cd"), None];
    let count = |pred: &dyn Fn(usize) -> bool| (0..4).filter(|&i| pred(i)).count() as i64;
    let cases: Vec<(&str, i64)> = vec![
        (
            "SELECT count(*) AS n FROM t WHERE dose >= 0.1",
            count(&|i| doses[i].is_some_and(|d| d >= 0.1)),
        ),
        (
            "SELECT count(*) AS n FROM t WHERE dose < 0.1",
            count(&|i| doses[i].is_some_and(|d| d < 0.1)),
        ),
        (
            "SELECT count(*) AS n FROM t WHERE code = 'ab'",
            count(&|i| codes[i] == Some("ab")),
        ),
        (
            "SELECT count(*) AS n FROM t WHERE code <> 'ab'",
            count(&|i| codes[i].is_some_and(|c| c != "ab")),
        ),
    ];
    for (sql, want) in cases {
        let batches = answer(&hub, sql).await;
        let got = batches[0]
            .column(0)
            .as_any()
            .downcast_ref::<arrow::array::Int64Array>()
            .expect("a count")
            .value(0);
        assert_eq!(got, want, "{sql}");
    }
    assert_eq!(count(&|i| doses[i].is_some_and(|d| d >= 0.1)), 3);
}

/// Copies `columns` of a Parquet file into a new PostgreSQL table `relation` (bigint and
/// date columns).
async fn load_parquet(
    pg: &tokio_postgres::Client,
    relation: &str,
    path: &std::path::Path,
    columns: &str,
) {
    use arrow::array::Array;
    use arrow::datatypes::DataType;
    let ctx = datafusion::prelude::SessionContext::new();
    ctx.register_parquet(
        "t",
        path.to_str().expect("UTF-8 path"),
        datafusion::prelude::ParquetReadOptions::default(),
    )
    .await
    .expect("parquet");
    let df = ctx
        .sql(&format!("SELECT {columns} FROM t"))
        .await
        .expect("select");
    let schema = df.schema().as_arrow().clone();
    let batches = df.collect().await.expect("rows");
    let defs: Vec<String> = schema
        .fields()
        .iter()
        .map(|f| {
            let t = match f.data_type() {
                DataType::Date32 => "date",
                _ => "bigint",
            };
            format!("{} {t}", f.name())
        })
        .collect();
    pg.batch_execute(&format!("CREATE TABLE {relation} ({})", defs.join(", ")))
        .await
        .expect("create table");
    let mut rows = Vec::new();
    for b in &batches {
        for r in 0..b.num_rows() {
            let values: Vec<String> = (0..b.num_columns())
                .map(|c| {
                    let col = b.column(c);
                    if col.is_null(r) {
                        return "NULL".to_string();
                    }
                    let v = arrow::util::display::array_value_to_string(col, r).expect("value");
                    match col.data_type() {
                        DataType::Date32 => format!("'{v}'"),
                        _ => v,
                    }
                })
                .collect();
            rows.push(format!("({})", values.join(",")));
        }
    }
    for chunk in rows.chunks(5000) {
        pg.batch_execute(&format!(
            "INSERT INTO {relation} VALUES {}",
            chunk.join(",")
        ))
        .await
        .expect("insert");
    }
}

/// OMOP stations over PostgreSQL: person and condition_occurrence per station, the
/// vocabulary's concept_ancestor as a reference table loaded at each station. The GI bleed
/// cohort by gender joins three relations at each station and equals the pooled answer;
/// a station whose vocabulary differs is refused by the hub, named.
#[test]
fn an_omop_station_over_postgresql_joins_its_relations_and_its_vocabulary_is_checked() {
    fixtures::on_railyard_stacks(omop_over_postgres());
}

async fn omop_over_postgres() {
    let schema = format!("omop_{}", uuid_like());
    let pg = client().await;
    pg.batch_execute(&format!("CREATE SCHEMA {schema}"))
        .await
        .expect("schema");
    let omop = |p: &str| test_data(&format!("omop/{p}"));
    for station in STATIONS {
        load_parquet(
            &pg,
            &format!("{schema}.person_{station}"),
            &omop(&format!("person/{station}.parquet")),
            "person_id, gender_concept_id, year_of_birth",
        )
        .await;
        load_parquet(
            &pg,
            &format!("{schema}.condition_{station}"),
            &omop(&format!("condition_occurrence/{station}.parquet")),
            "person_id, condition_concept_id, condition_start_date",
        )
        .await;
        load_parquet(
            &pg,
            &format!("{schema}.ancestor_{station}"),
            &omop("reference/concept_ancestor.parquet"),
            "ancestor_concept_id, descendant_concept_id",
        )
        .await;
    }
    // station_c's copy of the vocabulary lacks one row: a later release, say.
    pg.batch_execute(&format!(
        "CREATE TABLE {schema}.ancestor_old AS SELECT * FROM {schema}.ancestor_station_c \
         WHERE NOT (ancestor_concept_id = 192671 AND descendant_concept_id = 192671)"
    ))
    .await
    .expect("a differing copy");

    let start = |vocabulary: &'static str| {
        let schema = schema.clone();
        async move {
            let dir = fixtures::audit_dir();
            let mut addresses = Vec::new();
            for station in STATIONS {
                let ancestor = if station == "station_c" && vocabulary == "old" {
                    format!("{schema}.ancestor_old")
                } else {
                    format!("{schema}.ancestor_{station}")
                };
                let sources = [
                    ("person", format!("{schema}.person_{station}")),
                    (
                        "condition_occurrence",
                        format!("{schema}.condition_{station}"),
                    ),
                    ("concept_ancestor", ancestor),
                ]
                .map(|(name, relation)| PostgresSource {
                    name: name.to_string(),
                    connection: connection(),
                    relation: Relation::Table(relation),
                });
                let mut policy = Policy::default();
                // An empty digest: the station hashes the relation's rows itself.
                policy
                    .reference_tables
                    .insert("concept_ancestor".to_string(), String::new());
                let config = StationConfig {
                    policy,
                    audit_log: dir.join(station).join("audit.jsonl"),
                    collaboration_secret: None,
                    hub_secret: None,
                };
                let opened = Station::open_sources(station, &[], &sources, config)
                    .await
                    .expect("a PostgreSQL OMOP station opens");
                let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
                let url = format!("grpc://{}", listener.local_addr().expect("addr"));
                tokio::spawn(railyard_station::serve(
                    Arc::new(opened),
                    listener,
                    std::future::pending(),
                ));
                addresses.push(StationAddress {
                    name: station.to_string(),
                    url,
                });
            }
            Hub::connect(&addresses, HubOptions::default()).await
        }
    };

    let hub = Arc::new(
        start("same")
            .await
            .expect("the hub accepts identical vocabularies"),
    );
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind hub");
    let url = format!("grpc://{}", listener.local_addr().expect("addr"));
    tokio::spawn(railyard_engine::serve(
        hub,
        listener,
        std::future::pending(),
    ));
    let sql = "SELECT p.gender_concept_id, count(DISTINCT p.person_id) AS persons FROM person p \
               JOIN condition_occurrence co ON co.person_id = p.person_id \
               JOIN concept_ancestor ca ON ca.descendant_concept_id = co.condition_concept_id \
               WHERE ca.ancestor_concept_id = 192671 GROUP BY 1 ORDER BY 1";
    let got = answer(&url, sql).await;
    // The reference: the pooled files in one DataFusion session.
    let reference = fixtures::omop_centralized().await;
    let want = reference
        .sql(sql)
        .await
        .expect("reference")
        .collect()
        .await
        .expect("reference rows");
    assert_eq!(text(&got), text(&want));
    assert!(text(&got).contains("242"), "{}", text(&got));

    let refused = start("old")
        .await
        .err()
        .expect("differing vocabularies are refused");
    let message = refused.to_string();
    assert!(
        message.contains("reference table 'concept_ancestor' is not the same at every station")
            && message.contains("station_c"),
        "{message}"
    );
    pg.batch_execute(&format!("DROP SCHEMA {schema} CASCADE"))
        .await
        .expect("drop schema");
}
