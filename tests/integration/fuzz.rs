//! Property-based fuzzing on stable Rust (proptest): random and pathological inputs at every
//! door a party opens, over real Flight on loopback. Each target runs for a bounded time
//! (`RAILYARD_FUZZ_SECONDS`, default 20 s per target) and every input must be answered — a
//! result or a clean error, never a panic, a dropped connection or a hang (each case has a
//! deadline) — and the party must still answer a plain query afterwards. A failure prints
//! the shrunk input.
//!
//! | target | door |
//! |---|---|
//! | fragment SQL → plan → check → run | a station's `DoGet`, as a compromised hub sends it |
//! | Flight tickets and actions | a station's `DoGet` / `DoAction` / `GetFlightInfo` bytes |
//! | Flight SQL commands | the hub's `GetFlightInfo` / `DoGet` / `DoAction`, researcher SQL included |
//! | bound parameters | the hub's `DoPut` of a prepared statement's values: the statement they make returns exactly them |
//! | policy, station.toml, hub.toml | the parsers and the policy's validation against a table |
//!
//! Train output (Arrow IPC) is fuzzed beside its reader, in `station/src/train/output.rs`.

use std::fmt::Debug;
use std::time::{Duration, Instant};

use arrow_flight::flight_service_client::FlightServiceClient;
use arrow_flight::sql::{Any, CommandStatementQuery, ProstMessageExt};
use arrow_flight::{Action, FlightDescriptor, Ticket};
use futures::TryStreamExt;
use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};
use prost::Message;
use railyard::local::LocalFederation;
use railyard_engine::HubOptions;
use tonic::transport::Channel;

use crate::fixtures::{self, spec, test_data};

/// How long each target runs.
fn budget() -> Duration {
    let seconds = std::env::var("RAILYARD_FUZZ_SECONDS")
        .ok()
        .and_then(|s| s.parse::<u64>().ok())
        .unwrap_or(20);
    Duration::from_secs(seconds)
}

/// The most one input may take to be answered (generous: the suite runs tests in parallel
/// on two cores).
const CASE_DEADLINE: Duration = Duration::from_secs(30);

/// Runs `case` on inputs from `strategy` until the target's time is up, in batches with
/// fresh seeds; a failing input is shrunk and reported.
fn fuzz<S>(name: &str, strategy: S, case: impl Fn(S::Value) -> Result<(), TestCaseError>)
where
    S: Strategy,
    S::Value: Debug,
{
    let started = Instant::now();
    let mut cases = 0u64;
    while started.elapsed() < budget() {
        let mut runner = TestRunner::new(Config {
            cases: 16,
            max_shrink_iters: 256,
            failure_persistence: None,
            ..Config::default()
        });
        if let Err(e) = runner.run(&strategy, &case) {
            panic!("fuzz target {name}: {e}");
        }
        cases += 16;
    }
    eprintln!(
        "fuzz target {name}: {cases} inputs in {:.1} s, every one answered",
        started.elapsed().as_secs_f64()
    );
}

/// A transport failure or a panic behind an error: the party did not answer cleanly.
fn broken(message: &str) -> bool {
    let m = message.to_lowercase();
    [
        "panick",
        "h2 protocol",
        "connection reset",
        "broken pipe",
        "transport error",
    ]
    .iter()
    .any(|s| m.contains(s))
}

fn check_answer(what: &str, message: Option<String>) -> Result<(), TestCaseError> {
    match message {
        Some(m) if broken(&m) => Err(TestCaseError::fail(format!("{what}: {m}"))),
        _ => Ok(()),
    }
}

/// Runs one input's exchange with a party (its error message, if it failed): the party must
/// answer before the case's deadline — a hang fails the target — and fail cleanly.
fn answered(
    runtime: &tokio::runtime::Runtime,
    party: &str,
    exchange: impl Future<Output = Option<String>>,
) -> Result<(), TestCaseError> {
    // The timer is made inside the runtime, which drives it.
    match runtime.block_on(async { tokio::time::timeout(CASE_DEADLINE, exchange).await }) {
        Err(_) => Err(TestCaseError::fail(format!(
            "{party}: no answer within {CASE_DEADLINE:?}"
        ))),
        Ok(error) => check_answer(party, error),
    }
}

// ── SQL generators ────────────────────────────────────────────────────────────────────

const LUNG_COLUMNS: [&str; 12] = [
    "age",
    "sex",
    "time",
    "status",
    "ph_ecog",
    "ph_karno",
    "pat_karno",
    "meal_cal",
    "wt_loss",
    "inst",
    "patient_id",
    "no_such_column",
];

fn column() -> impl Strategy<Value = String> {
    prop::sample::select(LUNG_COLUMNS.to_vec()).prop_map(String::from)
}

fn literal() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<i64>().prop_map(|i| i.to_string()),
        any::<i32>().prop_map(|i| i.to_string()),
        any::<f64>().prop_map(|f| format!("{f:?}")),
        prop::collection::vec(any::<char>(), 0..12).prop_map(|c| {
            let s: String = c.into_iter().collect();
            format!("'{}'", s.replace('\'', "''"))
        }),
        prop::sample::select(vec![
            "NULL",
            "true",
            "'NaN'::double",
            "'Infinity'::double",
            "CAST('2020-02-29' AS DATE)",
            "9223372036854775807",
            "-9223372036854775808",
            "1e308",
            "0.5",
            "1",
            "0",
        ])
        .prop_map(String::from),
    ]
}

fn sql_type() -> impl Strategy<Value = &'static str> {
    prop::sample::select(vec![
        "TINYINT",
        "SMALLINT",
        "INT",
        "BIGINT",
        "DOUBLE",
        "DECIMAL(1,0)",
        "DECIMAL(38,10)",
        "VARCHAR",
        "DATE",
        "TIMESTAMP",
        "BOOLEAN",
        "INTERVAL",
    ])
}

fn function() -> impl Strategy<Value = &'static str> {
    prop::sample::select(vec![
        "abs",
        "round",
        "floor",
        "power",
        "ln",
        "sqrt",
        "substr",
        "length",
        "concat",
        "coalesce",
        "nullif",
        "date_part",
        "to_timestamp",
        "repeat",
        "lpad",
        "random",
        "pseudonym",
        "make_array",
        "regexp_like",
        "greatest",
    ])
}

fn expr() -> impl Strategy<Value = String> {
    let leaf = prop_oneof![column(), literal()];
    leaf.prop_recursive(6, 48, 3, |inner| {
        let op = prop::sample::select(vec![
            "+", "-", "*", "/", "%", "=", "<>", "<", ">=", "AND", "OR", "||", "LIKE",
        ]);
        prop_oneof![
            (inner.clone(), op, inner.clone()).prop_map(|(a, o, b)| format!("({a} {o} {b})")),
            inner.clone().prop_map(|a| format!("(NOT {a})")),
            inner.clone().prop_map(|a| format!("(-{a})")),
            inner.clone().prop_map(|a| format!("({a} IS NULL)")),
            (inner.clone(), inner.clone(), inner.clone())
                .prop_map(|(c, a, b)| format!("CASE WHEN {c} THEN {a} ELSE {b} END")),
            (inner.clone(), sql_type()).prop_map(|(a, t)| format!("CAST({a} AS {t})")),
            (inner.clone(), sql_type()).prop_map(|(a, t)| format!("TRY_CAST({a} AS {t})")),
            (function(), prop::collection::vec(inner.clone(), 0..3))
                .prop_map(|(f, args)| format!("{f}({})", args.join(", "))),
            (inner.clone(), prop::collection::vec(inner.clone(), 1..4))
                .prop_map(|(a, l)| format!("({a} IN ({}))", l.join(", "))),
            (inner.clone(), inner.clone(), inner.clone())
                .prop_map(|(a, l, h)| format!("({a} BETWEEN {l} AND {h})")),
            inner
                .clone()
                .prop_map(|a| format!("(SELECT max({a}) FROM lung)")),
            inner.prop_map(|a| format!("EXISTS (SELECT 1 FROM lung WHERE {a})")),
        ]
    })
}

/// A fragment's aggregate call, as a hub spells station halves (and things it should not).
fn station_call() -> impl Strategy<Value = String> {
    let f = prop::sample::select(vec![
        "partial_count",
        "partial_sum",
        "partial_avg",
        "partial_min",
        "partial_max",
        "partial_var",
        "partial_stddev",
        "partial_distinct_count",
        "partial_median",
        "partial_dp_count",
        "partial_dp_sum",
        "partial_dp_avg",
        "partial_dp_median",
        "partial_array_agg",
        "count",
        "sum",
        "unit_set",
        "dp_count",
    ]);
    prop_oneof![
        (f, expr()).prop_map(|(f, e)| format!("{f}({e})")),
        expr().prop_map(|e| format!("partial_dp_quantile({e}, 0.5)")),
        expr(),
    ]
}

/// A fragment as a (possibly compromised) hub sends it to a station.
fn fragment() -> impl Strategy<Value = String> {
    (
        prop::collection::vec(expr(), 0..3),
        prop::collection::vec(station_call(), 1..4),
        prop::option::of(expr()),
        any::<bool>(),
    )
        .prop_map(|(groups, calls, filter, union)| {
            let mut select: Vec<String> = groups
                .iter()
                .enumerate()
                .map(|(i, g)| format!("{g} AS \"g{i}\""))
                .collect();
            select.extend(
                calls
                    .iter()
                    .enumerate()
                    .map(|(i, c)| format!("{c} AS \"a{i}\"")),
            );
            let from = if union {
                "(SELECT * FROM lung UNION ALL SELECT * FROM lung) AS \"__rel\""
            } else {
                "\"lung\""
            };
            let mut sql = format!("SELECT {} FROM {from}", select.join(", "));
            if let Some(f) = filter {
                sql.push_str(&format!(" WHERE {f}"));
            }
            if !groups.is_empty() {
                sql.push_str(&format!(" GROUP BY {}", groups.join(", ")));
            }
            sql
        })
}

/// A station's count under `filter`, as a hub would send it.
fn count_where(filter: &str) -> String {
    format!("SELECT partial_count(1) AS a0 FROM lung WHERE {filter}")
}

/// Inputs built to be expensive: deep nesting, long chains, huge literals, many columns,
/// and bytes that are not SQL at all.
fn pathological() -> impl Strategy<Value = String> {
    prop_oneof![
        (1usize..4000).prop_map(|d| format!(
            "SELECT partial_count({}age{}) AS a0 FROM lung",
            "(".repeat(d),
            ")".repeat(d)
        )),
        // Reserved words the parser backtracks over (each failed level parsed again as a
        // function call) or nests without its recursion counter, around a valid or a
        // broken innermost expression.
        (
            prop::sample::select(vec![
                ("NOT (", ")"),
                ("NOT ", ""),
                ("CAST(", " AS DOUBLE)"),
                ("TRY_CAST(", " AS INT)"),
                ("INTERVAL ", ""),
                ("CASE WHEN ", " THEN 1 ELSE 0 END = 1"),
                ("POSITION(", " IN 'a')"),
                ("SUBSTRING(", " FROM 1)"),
                ("EXTRACT(YEAR FROM ", ")"),
                ("CEIL(", ")"),
                ("ARRAY[", "]"),
                ("CONVERT(", ", INT)"),
                ("OVERLAY(", " PLACING 'a' FROM 1)"),
                ("EXISTS (SELECT 1 FROM lung WHERE ", ")"),
            ]),
            1usize..400,
            prop::sample::select(vec!["age > 1", "age > )", "'1'", "age"]),
        )
            .prop_map(|((open, close), d, inner)| count_where(&format!(
                "{}{inner}{}",
                open.repeat(d),
                close.repeat(d)
            ))),
        (1usize..30_000)
            .prop_map(|d| count_where(&format!("{}'1' IS NULL", "INTERVAL ".repeat(d)))),
        (1usize..20_000).prop_map(|n| count_where(
            &(0..n)
                .map(|i| format!("age = {i}"))
                .collect::<Vec<_>>()
                .join(" OR ")
        )),
        (1usize..30_000).prop_map(|n| count_where(&format!(
            "age IN ({})",
            (0..n).map(|i| i.to_string()).collect::<Vec<_>>().join(",")
        ))),
        (1usize..400_000).prop_map(|n| count_where(&format!("inst = '{}'", "x".repeat(n)))),
        (1usize..3000).prop_map(|n| format!(
            "SELECT {} FROM lung",
            (0..n)
                .map(|i| format!("partial_count(age) AS a{i}"))
                .collect::<Vec<_>>()
                .join(", ")
        )),
        (1usize..60).prop_map(|d| {
            let mut sql = "SELECT * FROM lung".to_string();
            for i in 0..d {
                sql = format!("SELECT * FROM ({sql}) AS t{i}");
            }
            format!("SELECT partial_count(1) AS a0 FROM ({sql}) AS \"__rel\"")
        }),
        (1usize..40).prop_map(|n| format!(
            "SELECT partial_count(1) AS a0 FROM {}",
            (0..n)
                .map(|i| format!("lung AS l{i}"))
                .collect::<Vec<_>>()
                .join(" CROSS JOIN ")
        )),
        prop::collection::vec(any::<u8>(), 0..300)
            .prop_map(|b| String::from_utf8_lossy(&b).into_owned()),
        (
            fragment(),
            prop::collection::vec((any::<usize>(), any::<u8>()), 1..6)
        )
            .prop_map(|(sql, edits)| {
                let mut bytes = sql.into_bytes();
                for (at, b) in edits {
                    if !bytes.is_empty() {
                        let i = at % bytes.len();
                        bytes[i] = b;
                    }
                }
                String::from_utf8_lossy(&bytes).into_owned()
            }),
    ]
}

// ── The federation under attack ─────────────────────────────────────────────────────────

/// A runtime and a federation over the lung stations under the default policy (k = 5,
/// the query-set auditor on), kept for one target.
fn lung_federation() -> (tokio::runtime::Runtime, LocalFederation) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_stack_size(8 << 20)
        .enable_all()
        .build()
        .expect("runtime");
    let federation = runtime.block_on(fixtures::federation_with(
        &[spec("lung", test_data("lung/horizontal/csv"))],
        HubOptions::default(),
        &fixtures::default_governance(),
    ));
    (runtime, federation)
}

async fn flight(url: &str) -> FlightServiceClient<Channel> {
    let channel = tonic::transport::Endpoint::from_shared(url.replace("grpc://", "http://"))
        .expect("a URL")
        .connect()
        .await
        .expect("the party listens");
    FlightServiceClient::new(channel)
        .max_decoding_message_size(64 << 20)
        .max_encoding_message_size(64 << 20)
}

/// The station still answers a plain fragment.
fn station_alive(runtime: &tokio::runtime::Runtime, url: &str) -> Result<(), TestCaseError> {
    runtime
        .block_on(fixtures::run_at_station(
            url,
            "SELECT sex AS g0, partial_count(1) AS a0 FROM lung GROUP BY sex",
        ))
        .map(|_| ())
        .map_err(|e| TestCaseError::fail(format!("the station stopped answering: {e}")))
}

#[test]
fn fuzz_fragments_at_a_station() {
    let (runtime, federation) = lung_federation();
    let url = federation.stations[0].url.clone();
    let strategy = prop_oneof![3 => fragment(), 1 => pathological()];
    fuzz("fragment SQL → plan → check → run", strategy, |sql| {
        answered(&runtime, "the station", async {
            fixtures::run_at_station(&url, &sql).await.err()
        })?;
        station_alive(&runtime, &url)
    });
    runtime.block_on(federation.shutdown()).unwrap();
}

#[test]
fn fuzz_flight_bytes_at_a_station() {
    let (runtime, federation) = lung_federation();
    let url = federation.stations[0].url.clone();
    let bytes = || prop::collection::vec(any::<u8>(), 0..512);
    let json_ticket = (
        prop::collection::vec(any::<char>(), 0..20),
        any::<i64>(),
        prop::option::of(any::<f64>()),
        fragment(),
    )
        .prop_map(|(id, fragment, epsilon, sql)| {
            serde_json::json!({
                "query_id": id.into_iter().collect::<String>(),
                "fragment": fragment,
                "researcher": "fuzz",
                "collaboration": "",
                "epsilon": epsilon,
                "sql": sql,
            })
            .to_string()
            .into_bytes()
        });
    let strategy = (
        0u8..4,
        prop_oneof![bytes(), json_ticket],
        prop::sample::select(vec!["check", "policies", "budget", "schema", "", "x"]),
    );
    fuzz(
        "Flight bytes at a station",
        strategy,
        |(door, body, action)| {
            answered(&runtime, "the station", async {
                let mut client = flight(&url).await;
                let error = match door {
                    0 => client
                        .do_get(fixtures::as_hub(
                            &url,
                            tonic::Request::new(Ticket::new(body)),
                        ))
                        .await
                        .err(),
                    1 => client
                        .do_action(fixtures::as_hub(
                            &url,
                            tonic::Request::new(Action::new(action, body)),
                        ))
                        .await
                        .err(),
                    2 => client
                        .get_flight_info(fixtures::as_hub(
                            &url,
                            tonic::Request::new(FlightDescriptor::new_cmd(body)),
                        ))
                        .await
                        .err(),
                    // Without the hub's secret: refused before anything is read.
                    _ => client
                        .do_get(tonic::Request::new(Ticket::new(body)))
                        .await
                        .err(),
                };
                error.map(|s| s.message().to_string())
            })?;
            station_alive(&runtime, &url)
        },
    );
    runtime.block_on(federation.shutdown()).unwrap();
}

/// Inputs the fuzz targets once found, kept so they are tried on every run.
#[test]
fn fragments_fuzzing_found_are_answered_cleanly() {
    let (runtime, federation) = lung_federation();
    let url = federation.stations[0].url.clone();
    // DataFusion's constant folding panicked on an ill-typed array the policy check folded
    // before the fragment's type coercion.
    let found = [
        "SELECT CASE WHEN (age BETWEEN 0 AND -478348936) THEN (-3.5e-80 >= ph_ecog) ELSE \
         (make_array(-8162363521467428476, 'S') IN (patient_id, -9223372036854775808, 7.5e-309)) \
         END AS \"a0\" FROM lung",
        "SELECT count(*) AS \"a0\" FROM lung WHERE make_array(1, 'x') IS NOT NULL",
    ];
    for sql in found {
        let ticket = serde_json::json!({
            "query_id": "",
            "fragment": 0,
            "researcher": "fuzz",
            "collaboration": "",
            "epsilon": null,
            "sql": sql,
        })
        .to_string()
        .into_bytes();
        let answered = answered(&runtime, "the station", async {
            let mut client = flight(&url).await;
            client
                .do_get(fixtures::as_hub(
                    &url,
                    tonic::Request::new(Ticket::new(ticket)),
                ))
                .await
                .err()
                .map(|s| s.message().to_string())
        });
        assert!(answered.is_ok(), "{sql}: {answered:?}");
        assert!(station_alive(&runtime, &url).is_ok());
    }
    runtime.block_on(federation.shutdown()).unwrap();
}

/// A researcher's query, as a Flight SQL client sends it.
fn researcher_sql() -> impl Strategy<Value = String> {
    let aggregate = (
        prop::sample::select(vec![
            "count",
            "sum",
            "avg",
            "min",
            "median",
            "stddev",
            "dp_count",
            "dp_avg",
            "dp_median",
            "var_samp",
            "corr",
        ]),
        expr(),
    )
        .prop_map(|(f, e)| format!("{f}({e})"));
    prop_oneof![
        (
            prop::collection::vec(column(), 0..2),
            prop::collection::vec(aggregate, 1..3),
            prop::option::of(expr())
        )
            .prop_map(|(groups, aggs, filter)| {
                let mut select = groups.clone();
                select.extend(aggs);
                let mut sql = format!("SELECT {} FROM lung", select.join(", "));
                if let Some(f) = filter {
                    sql.push_str(&format!(" WHERE {f}"));
                }
                if !groups.is_empty() {
                    sql.push_str(&format!(" GROUP BY {}", groups.join(", ")));
                }
                sql
            }),
        expr().prop_map(|e| format!("SELECT {e} FROM lung")),
        expr().prop_map(|e| format!("SELECT {e}")),
        expr().prop_map(|e| format!("EXPLAIN FEDERATED SELECT count(*) FROM lung WHERE {e}")),
        pathological(),
    ]
}

#[test]
fn fuzz_flight_sql_at_the_hub() {
    let (runtime, federation) = lung_federation();
    let url = federation.hub_url.clone();
    let command_types = prop::sample::select(vec![
        "type.googleapis.com/arrow.flight.protocol.sql.CommandStatementQuery",
        "type.googleapis.com/arrow.flight.protocol.sql.CommandPreparedStatementQuery",
        "type.googleapis.com/arrow.flight.protocol.sql.CommandStatementSubstraitPlan",
        "type.googleapis.com/arrow.flight.protocol.sql.CommandGetTables",
        "type.googleapis.com/arrow.flight.protocol.sql.CommandGetSqlInfo",
        "type.googleapis.com/arrow.flight.protocol.sql.TicketStatementQuery",
        "type.googleapis.com/nothing.Known",
    ]);
    let bytes = || prop::collection::vec(any::<u8>(), 0..512);
    let strategy = prop_oneof![
        3 => researcher_sql().prop_map(|sql| (0u8, sql.into_bytes(), String::new())),
        1 => (command_types, bytes()).prop_map(|(t, b)| (1u8, b, t.to_string())),
        1 => bytes().prop_map(|b| (2u8, b, String::new())),
        1 => (bytes(), prop::sample::select(vec![
            "CreatePreparedStatement",
            "ClosePreparedStatement",
            "CancelFlightInfo",
            "BeginTransaction",
            "x",
        ]))
        .prop_map(|(b, a)| (3u8, b, a.to_string())),
    ];
    fuzz("Flight SQL at the hub", strategy, |(door, body, kind)| {
        answered(&runtime, "the hub", async {
            let mut client = flight(&url).await;
            match door {
                0 => {
                    // A statement, then its result, as ADBC runs it.
                    let query = CommandStatementQuery {
                        query: String::from_utf8_lossy(&body).into_owned(),
                        transaction_id: None,
                    };
                    let descriptor = FlightDescriptor::new_cmd(query.as_any().encode_to_vec());
                    match client.get_flight_info(descriptor).await {
                        Err(s) => Some(s.message().to_string()),
                        Ok(info) => {
                            let mut error = None;
                            for endpoint in info.into_inner().endpoint {
                                let Some(ticket) = endpoint.ticket else {
                                    continue;
                                };
                                let stream = match client.do_get(ticket).await {
                                    Ok(s) => s.into_inner(),
                                    Err(s) => {
                                        error = Some(s.message().to_string());
                                        break;
                                    }
                                };
                                if let Err(s) = stream.try_collect::<Vec<_>>().await {
                                    error = Some(s.message().to_string());
                                }
                            }
                            error
                        }
                    }
                }
                1 => {
                    let any = Any {
                        type_url: kind,
                        value: body.into(),
                    };
                    client
                        .get_flight_info(FlightDescriptor::new_cmd(any.encode_to_vec()))
                        .await
                        .err()
                        .map(|s| s.message().to_string())
                }
                2 => client
                    .do_get(Ticket::new(body))
                    .await
                    .err()
                    .map(|s| s.message().to_string()),
                _ => match client.do_action(Action::new(kind, body)).await {
                    Err(s) => Some(s.message().to_string()),
                    Ok(stream) => stream
                        .into_inner()
                        .try_collect::<Vec<_>>()
                        .await
                        .err()
                        .map(|s| s.message().to_string()),
                },
            }
        })?;
        // The hub still answers.
        runtime
            .block_on(async {
                let mut client = railyard::client::HubClient::connect(&url).await?;
                client.query("SELECT count(*) FROM lung").await
            })
            .map(|_| ())
            .map_err(|e| TestCaseError::fail(format!("the hub stopped answering: {e:#}")))
    });
    runtime.block_on(federation.shutdown()).unwrap();
}

/// TOML text built from the keys the parsers know, with values of every type.
fn toml_text() -> impl Strategy<Value = String> {
    let key = prop::sample::select(vec![
        "min_group_size",
        "threshold_noise",
        "default_visibility",
        "privacy_unit",
        "query_set_audit",
        "max_query_sets",
        "max_fragments_per_minute",
        "model_dominance",
        "budget",
        "max_epsilon",
        "epsilon",
        "max_rows_per_unit",
        "lower",
        "upper",
        "bins",
        "keys",
        "age",
        "sex",
        "name",
        "listen",
        "data_dir",
        "path",
        "format",
        "reference",
        "collaboration",
        "stations",
        "researchers",
        "url",
        "allow",
        "max_concurrent",
        "max_output_rows",
        "images",
    ]);
    let value = prop_oneof![
        any::<i64>().prop_map(|i| i.to_string()),
        any::<f64>()
            .prop_filter("TOML has no NaN literal", |f| f.is_finite())
            .prop_map(|f| format!("{f:?}")),
        prop::sample::select(vec![
            "true",
            "\"public\"",
            "\"hidden\"",
            "\"dp\"",
            "\"row\"",
            "\"age\"",
            "\"127.0.0.1:0\"",
            "[]",
            "[1, 2]",
            "[0, 0]",
            "[3.5, 1]",
            "[\"a\", 1]",
            "{ lower = 0, upper = 1, bins = 1000 }",
            "{ bins = [1] }",
            "{ keys = [] }",
            "inf",
            "nan",
            "-0",
            "1e400",
        ])
        .prop_map(String::from),
    ];
    let header = prop::sample::select(vec![
        "",
        "[dp]",
        "[tables.lung]",
        "[tables.lung.columns]",
        "[tables.lung.dp]",
        "[trains]",
        "[[tables]]",
        "[[collaborations]]",
        "[tls]",
        "[tables.\"\"]",
    ]);
    prop::collection::vec((header, prop::collection::vec((key, value), 0..4)), 0..6).prop_map(
        |sections| {
            let mut text = String::new();
            for (header, pairs) in sections {
                text.push_str(header);
                text.push('\n');
                for (k, v) in pairs {
                    text.push_str(&format!("{k} = {v}\n"));
                }
            }
            text
        },
    )
}

#[test]
fn fuzz_policy_station_and_hub_configuration() {
    use arrow::datatypes::{DataType, Field, Schema};
    let lung = Schema::new(vec![
        Field::new("patient_id", DataType::Int64, false),
        Field::new("age", DataType::Int64, true),
        Field::new("sex", DataType::Int64, true),
        Field::new("inst", DataType::Utf8, true),
    ]);
    let dir = fixtures::audit_dir();
    let strategy = prop_oneof![
        4 => toml_text(),
        1 => prop::collection::vec(any::<u8>(), 0..400)
            .prop_map(|b| String::from_utf8_lossy(&b).into_owned()),
    ];
    fuzz("policy, station.toml and hub.toml", strategy, |text| {
        if let Ok(policy) = railyard_station::Policy::parse(&text, "fuzz.toml") {
            let _ = policy.validate_table("lung", &lung);
        }
        let file = dir.join("fuzz.toml");
        std::fs::write(&file, &text).map_err(|e| TestCaseError::fail(e.to_string()))?;
        let _ = railyard::deploy::HubConfig::load(&file);
        let _ = railyard::deploy::StationFileConfig::load(&file);
        Ok(())
    });
}

/// A value a researcher binds to a parameter.
#[derive(Debug, Clone)]
enum Bound {
    Text(String),
    Int(i64),
    Float(f64),
    Null,
}

/// Bound parameters at the hub (`DoPut` of one row to a prepared `SELECT ? AS v0, …`):
/// whatever the values, the statement they make returns exactly them — a value cannot
/// change the statement — and arbitrary bytes in place of the row are answered cleanly.
#[test]
fn fuzz_bound_parameters_at_the_hub() {
    use std::sync::Arc;

    use arrow::array::{Array, ArrayRef, AsArray, Float64Array, Int64Array, StringArray};
    use arrow::datatypes::{DataType, Field, Float64Type, Int64Type, Schema};
    use arrow_flight::encode::FlightDataEncoderBuilder;
    use arrow_flight::sql::{CommandPreparedStatementQuery, DoPutPreparedStatementResult};

    let (runtime, federation) = lung_federation();
    let url = federation.hub_url.clone();
    let value = prop_oneof![
        3 => any::<String>().prop_map(Bound::Text),
        2 => "[\\\\'\"$?;\\- a-z]{0,12}".prop_map(Bound::Text),
        2 => any::<i64>().prop_map(Bound::Int),
        2 => any::<f64>().prop_filter("finite", |f| f.is_finite()).prop_map(Bound::Float),
        1 => Just(Bound::Null),
    ];
    let strategy = prop_oneof![
        4 => prop::collection::vec(value, 1..4).prop_map(Ok),
        1 => prop::collection::vec(any::<u8>(), 0..256).prop_map(Err),
    ];
    fuzz("bound parameters at the hub", strategy, |input| {
        let url = url.clone();
        let mut mismatch = None;
        answered(&runtime, "the hub", async {
            let mut client = flight(&url).await;
            let count = match &input {
                Ok(values) => values.len(),
                Err(_) => 1,
            };
            let sql = (0..count)
                .map(|i| format!("? AS v{i}"))
                .collect::<Vec<_>>()
                .join(", ");
            let handle = format!("SELECT {sql}");
            let command = CommandPreparedStatementQuery {
                prepared_statement_handle: handle.into_bytes().into(),
            };
            let descriptor = FlightDescriptor::new_cmd(command.as_any().encode_to_vec());
            let data: Vec<arrow_flight::FlightData> = match &input {
                Ok(values) => {
                    let (fields, columns): (Vec<Field>, Vec<ArrayRef>) = values
                        .iter()
                        .enumerate()
                        .map(|(i, v)| {
                            let name = format!("p{i}");
                            match v {
                                Bound::Text(s) => (
                                    Field::new(name, DataType::Utf8, true),
                                    Arc::new(StringArray::from(vec![s.as_str()])) as ArrayRef,
                                ),
                                Bound::Int(n) => (
                                    Field::new(name, DataType::Int64, true),
                                    Arc::new(Int64Array::from(vec![*n])) as ArrayRef,
                                ),
                                Bound::Float(f) => (
                                    Field::new(name, DataType::Float64, true),
                                    Arc::new(Float64Array::from(vec![*f])) as ArrayRef,
                                ),
                                Bound::Null => (
                                    Field::new(name, DataType::Int64, true),
                                    Arc::new(Int64Array::from(vec![None::<i64>])) as ArrayRef,
                                ),
                            }
                        })
                        .unzip();
                    let batch =
                        arrow::array::RecordBatch::try_new(Arc::new(Schema::new(fields)), columns)
                            .expect("one row");
                    FlightDataEncoderBuilder::new()
                        .with_flight_descriptor(Some(descriptor))
                        .build(futures::stream::iter([Ok(batch)]))
                        .try_collect()
                        .await
                        .expect("encodes")
                }
                Err(bytes) => vec![arrow_flight::FlightData {
                    flight_descriptor: Some(descriptor),
                    data_header: bytes.clone().into(),
                    data_body: bytes.iter().rev().copied().collect::<Vec<u8>>().into(),
                    ..Default::default()
                }],
            };
            let put = match client.do_put(futures::stream::iter(data)).await {
                Ok(put) => put.into_inner(),
                Err(s) => return Some(s.message().to_string()),
            };
            let results: Vec<arrow_flight::PutResult> = match put.try_collect().await {
                Ok(r) => r,
                Err(s) => return Some(s.message().to_string()),
            };
            let Ok(values) = &input else {
                return None;
            };
            let bound = results
                .first()
                .and_then(|r| DoPutPreparedStatementResult::decode(r.app_metadata.clone()).ok())
                .and_then(|r| r.prepared_statement_handle)
                .expect("a bound handle");
            let run = CommandPreparedStatementQuery {
                prepared_statement_handle: bound.clone(),
            };
            let info = match client
                .get_flight_info(FlightDescriptor::new_cmd(run.as_any().encode_to_vec()))
                .await
            {
                Ok(info) => info.into_inner(),
                Err(s) => {
                    mismatch = Some(format!(
                        "{values:?} made {:?}, which fails: {}",
                        String::from_utf8_lossy(&bound),
                        s.message()
                    ));
                    return None;
                }
            };
            let ticket = info.endpoint[0].ticket.clone().expect("a ticket");
            let stream = client.do_get(ticket).await.expect("DoGet").into_inner();
            let batches: Vec<arrow::array::RecordBatch> =
                arrow_flight::decode::FlightRecordBatchStream::new_from_flight_data(
                    stream.map_err(arrow_flight::error::FlightError::from),
                )
                .try_collect()
                .await
                .expect("the answer streams");
            let row = &batches[0];
            for (i, v) in values.iter().enumerate() {
                let column = row.column(i);
                let same = match v {
                    Bound::Text(s) => {
                        let c = arrow::compute::cast(column, &DataType::Utf8).expect("text");
                        c.as_string::<i32>().value(0) == s
                    }
                    Bound::Int(n) => column.as_primitive::<Int64Type>().value(0) == *n,
                    Bound::Float(f) => column.as_primitive::<Float64Type>().value(0) == *f,
                    Bound::Null => column.logical_null_count() == 1,
                };
                if !same {
                    mismatch = Some(format!(
                        "{v:?} came back as {column:?} from {:?}",
                        String::from_utf8_lossy(&bound)
                    ));
                }
            }
            None
        })?;
        if let Some(m) = mismatch {
            return Err(TestCaseError::fail(m));
        }
        Ok(())
    });
    runtime.block_on(federation.shutdown()).unwrap();
}

/// Bound parameters whose record batch claims more bytes than its body holds (arrow's reader
/// would slice past the body and panic) are refused with INVALID_ARGUMENT, and the hub
/// answers the same client afterwards.
#[test]
fn bound_parameters_cut_short_are_refused() {
    use std::sync::Arc;

    use arrow::array::{Int64Array, RecordBatch};
    use arrow::datatypes::{DataType, Field, Schema};
    use arrow_flight::encode::FlightDataEncoderBuilder;
    use arrow_flight::sql::CommandPreparedStatementQuery;

    let (runtime, federation) = lung_federation();
    let url = federation.hub_url.clone();
    runtime.block_on(async {
        let mut client = flight(&url).await;
        let command = CommandPreparedStatementQuery {
            prepared_statement_handle: "SELECT ? AS v0".as_bytes().to_vec().into(),
        };
        let descriptor = FlightDescriptor::new_cmd(command.as_any().encode_to_vec());
        let schema = Arc::new(Schema::new(vec![Field::new("p0", DataType::Int64, true)]));
        let batch = RecordBatch::try_new(schema, vec![Arc::new(Int64Array::from(vec![1_i64; 64]))])
            .expect("a batch");
        let mut data: Vec<arrow_flight::FlightData> = FlightDataEncoderBuilder::new()
            .with_flight_descriptor(Some(descriptor))
            .build(futures::stream::iter([Ok(batch)]))
            .try_collect()
            .await
            .expect("encodes");
        let body = &mut data[1].data_body;
        *body = body.slice(..body.len() / 2);
        let status = match client.do_put(futures::stream::iter(data)).await {
            Ok(put) => put
                .into_inner()
                .try_collect::<Vec<_>>()
                .await
                .expect_err("refused"),
            Err(status) => status,
        };
        assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
        assert!(status.message().contains("beyond its body"), "{status:?}");
        let info = client
            .get_flight_info(FlightDescriptor::new_cmd(
                CommandStatementQuery {
                    query: "SELECT count(*) FROM lung".into(),
                    transaction_id: None,
                }
                .as_any()
                .encode_to_vec(),
            ))
            .await
            .expect("the hub answers afterwards");
        assert_eq!(info.into_inner().endpoint.len(), 1);
    });
    runtime.block_on(federation.shutdown()).unwrap();
}
