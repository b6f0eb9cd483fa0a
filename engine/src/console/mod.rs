//! The hub's HTTP front: a small JSON API and the web console that uses it, served beside
//! the Flight SQL port.
//!
//! ```text
//!   browser ── HTTP ──▶ console::router ──▶ Hub::plan / Hub::list_tables
//!                         (JSON, CSV,          the same planner, checks, refusals and
//!                          Parquet, Arrow)     audit as Flight SQL; no second query path
//! ```
//!
//! Every query goes through [`Hub::plan`] under the console's researcher, exactly as a
//! Flight SQL statement does: the stations check and audit it, refusals come back with
//! their rule (as JSON, never a stack trace). The page is hand-written HTML, CSS and a JS
//! module, embedded in the binary (`assets/`), so `cargo build` alone produces it.
//!
//! The console is served only where the hub is unauthenticated (`railyard local`, the
//! demo): it answers as [`crate::flight_sql::LOCAL_RESEARCHER`], only on a loopback
//! address, and refuses a request whose `Host` is not a loopback name (a web page the
//! researcher visits cannot reach it through DNS rebinding). Query calls take JSON bodies
//! only: a form another site posts is not JSON and is refused, and a cross-site `fetch`
//! with a JSON body needs a CORS preflight the console never grants.

pub mod format;
pub mod history;

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures::TryStreamExt;
use serde::{Deserialize, Serialize};

use crate::error::to_status;
use crate::hub::{EPSILON_METADATA, Hub};
use crate::withheld::WITHHELD_METADATA;

/// Most rows a JSON answer carries; the downloads carry all of them.
pub const MAX_JSON_ROWS: usize = 10_000;

#[derive(Clone)]
struct Console {
    hub: Arc<Hub>,
    researcher: String,
    history: Option<Arc<history::History>>,
}

/// The console and its API for `hub`, answering as `researcher`, keeping the query history
/// in the file `history` (none without one).
pub fn router(hub: Arc<Hub>, researcher: &str, history: Option<std::path::PathBuf>) -> Router {
    Router::new()
        .route("/", get(page))
        .route("/console.js", get(script))
        .route("/console.css", get(style))
        .route("/api/query", post(query))
        .route("/api/explain", post(explain))
        .route("/api/catalog", get(catalog))
        .route("/api/stations", get(stations))
        .route("/api/policies", get(policies))
        .route("/api/budget", get(budget))
        .route("/api/history", get(recent))
        .layer(axum::middleware::from_fn(loopback_host))
        .with_state(Console {
            hub,
            researcher: researcher.to_string(),
            history: history.map(|path| Arc::new(history::History::new(path))),
        })
}

/// Serves the console on `listener` until `shutdown` resolves.
pub async fn serve(
    listener: tokio::net::TcpListener,
    hub: Arc<Hub>,
    researcher: &str,
    history: Option<std::path::PathBuf>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let local: SocketAddr = listener.local_addr()?;
    if !local.ip().is_loopback() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!(
                "the console has no authentication yet and listens on loopback addresses \
                 only, not {local}"
            ),
        ));
    }
    axum::serve(listener, router(hub, researcher, history))
        .with_graceful_shutdown(shutdown)
        .await
}

/// Refuses a request whose `Host` is not a loopback name: a page that rebinds its own name
/// to 127.0.0.1 must not reach the console.
async fn loopback_host(request: axum::extract::Request, next: axum::middleware::Next) -> Response {
    let host = request
        .headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or("");
    let name = match host.rsplit_once(':') {
        Some((name, port)) if port.chars().all(|c| c.is_ascii_digit()) => name,
        _ => host,
    };
    let loopback = name == "localhost"
        || name
            .trim_matches(['[', ']'])
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback());
    if !loopback {
        return failure(
            StatusCode::FORBIDDEN,
            "the console answers requests for a loopback host (127.0.0.1, localhost) only",
            None,
        );
    }
    next.run(request).await
}

async fn page() -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
        include_str!("assets/index.html"),
    )
}

async fn script() -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/javascript; charset=utf-8")],
        include_str!("assets/console.js"),
    )
}

async fn style() -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/css; charset=utf-8")],
        include_str!("assets/console.css"),
    )
}

/// A failure as the page shows it: the message, and the rule of a refusal.
#[derive(Serialize)]
struct Failure<'a> {
    error: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    rule: Option<String>,
}

fn failure(status: StatusCode, message: &str, rule: Option<String>) -> Response {
    (
        status,
        Json(Failure {
            error: message,
            rule,
        }),
    )
        .into_response()
}

/// A hub error as a response: the status the gRPC code stands for, the message, and the
/// refusal's rule. The one conversion, through the Flight SQL front's [`to_status`], so
/// both fronts say the same.
fn hub_failure(e: crate::error::Error) -> Response {
    let (http, message, rule) = failure_parts(e);
    failure(http, &message, rule)
}

/// A hub error's HTTP status, message and refusal rule.
fn failure_parts(e: crate::error::Error) -> (StatusCode, String, Option<String>) {
    let status = to_status(e);
    let rule = railyard_contract::Refusal::from_bytes(status.details()).map(|r| r.rule);
    let http = match status.code() {
        tonic::Code::PermissionDenied => StatusCode::FORBIDDEN,
        tonic::Code::InvalidArgument | tonic::Code::FailedPrecondition => StatusCode::BAD_REQUEST,
        tonic::Code::ResourceExhausted => StatusCode::TOO_MANY_REQUESTS,
        tonic::Code::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        tonic::Code::DeadlineExceeded => StatusCode::GATEWAY_TIMEOUT,
        tonic::Code::Unauthenticated => StatusCode::UNAUTHORIZED,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    };
    (http, status.message().to_string(), rule)
}

#[derive(Deserialize)]
struct Statement {
    sql: String,
}

#[derive(Deserialize)]
struct Download {
    format: Option<String>,
}

/// Runs a query for the console's researcher: its schema (with the ε and withheld-group
/// metadata) and its rows.
async fn run(
    console: &Console,
    sql: &str,
) -> Result<(arrow::datatypes::SchemaRef, Vec<arrow::array::RecordBatch>), crate::error::Error> {
    let planned = console.hub.plan(sql, &console.researcher).await?;
    let stream = planned.run().await?;
    let schema = stream.schema();
    let batches: Vec<_> = stream
        .try_collect()
        .await
        .map_err(crate::error::Error::from)?;
    // A plan that reports withheld groups has them in its batches' schema.
    let schema = batches.first().map_or(schema, |b| b.schema());
    Ok((schema, batches))
}

/// `POST /api/query` with `{"sql": "…"}`: the answer as JSON (at most [`MAX_JSON_ROWS`]
/// rows), or with `?format=csv|parquet|arrow` as a file.
async fn query(
    State(console): State<Console>,
    Query(download): Query<Download>,
    Json(statement): Json<Statement>,
) -> Response {
    if let Some(other) = download
        .format
        .as_deref()
        .filter(|f| !matches!(*f, "json" | "csv" | "parquet" | "arrow"))
    {
        // Refused before anything runs: a run costs the stations work and audit records,
        // and a DP query its ε.
        return failure(
            StatusCode::BAD_REQUEST,
            &format!("unknown format '{other}': json, csv, parquet or arrow"),
            None,
        );
    }
    let answer = run(&console, &statement.sql).await;
    let (schema, batches) = match answer {
        Ok(answer) => {
            remember(&console, &statement.sql, "answered", Some(&answer.1), None);
            answer
        }
        Err(e) => {
            let (http, message, rule) = failure_parts(e);
            let outcome = if http == StatusCode::FORBIDDEN {
                "refused"
            } else {
                "failed"
            };
            remember(&console, &statement.sql, outcome, None, rule.clone());
            return failure(http, &message, rule);
        }
    };
    match download.format.as_deref() {
        None | Some("json") => match format::json(&schema, &batches, MAX_JSON_ROWS) {
            Ok(body) => json_answer(&schema, body),
            Err(e) => failure(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string(), None),
        },
        Some(kind @ ("csv" | "parquet" | "arrow")) => match format::file(kind, &schema, &batches) {
            Ok((content_type, bytes)) => (
                [
                    (header::CONTENT_TYPE, content_type.to_string()),
                    (
                        header::CONTENT_DISPOSITION,
                        format!("attachment; filename=\"railyard-answer.{kind}\""),
                    ),
                ],
                bytes,
            )
                .into_response(),
            Err(e) => failure(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string(), None),
        },
        Some(other) => failure(
            StatusCode::INTERNAL_SERVER_ERROR,
            &format!("format '{other}' was let through unchecked"),
            None,
        ),
    }
}

/// The JSON answer: columns, rows, and what the schema's metadata says (ε charged per
/// station, groups withheld).
fn json_answer(schema: &arrow::datatypes::Schema, body: format::JsonRows) -> Response {
    let metadata = |key: &str| {
        schema
            .metadata()
            .get(key)
            .and_then(|text| serde_json::from_str::<serde_json::Value>(text).ok())
    };
    let mut headers = HeaderMap::new();
    headers.insert(header::CACHE_CONTROL, "no-store".parse().expect("static"));
    (
        headers,
        Json(serde_json::json!({
            "columns": body.columns,
            "rows": body.rows,
            "row_count": body.row_count,
            "truncated": body.row_count > body.rows.len(),
            "epsilon": metadata(EPSILON_METADATA),
            "withheld": metadata(WITHHELD_METADATA),
        })),
    )
        .into_response()
}

/// `POST /api/explain` with `{"sql": "…"}`: `EXPLAIN FEDERATED` as JSON rows.
async fn explain(State(console): State<Console>, Json(statement): Json<Statement>) -> Response {
    let sql = format!("EXPLAIN FEDERATED {}", statement.sql);
    table_answer(&console, &sql).await
}

async fn table_answer(console: &Console, sql: &str) -> Response {
    match run(console, sql).await {
        Ok((schema, batches)) => match format::json(&schema, &batches, MAX_JSON_ROWS) {
            Ok(body) => json_answer(&schema, body),
            Err(e) => failure(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string(), None),
        },
        Err(e) => hub_failure(e),
    }
}

/// Records a query of the console's researcher in the history: its SQL and outcome, never
/// a value of its answer.
fn remember(
    console: &Console,
    sql: &str,
    outcome: &str,
    batches: Option<&[arrow::array::RecordBatch]>,
    rule: Option<String>,
) {
    let Some(history) = &console.history else {
        return;
    };
    history.record(&history::Entry {
        at: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
        researcher: console.researcher.clone(),
        sql: sql.to_string(),
        outcome: outcome.to_string(),
        rows: batches.map(|b| b.iter().map(|b| b.num_rows()).sum()),
        rule,
    });
}

/// `GET /api/history`: the researcher's last queries, newest first.
async fn recent(State(console): State<Console>) -> Response {
    let entries = console
        .history
        .as_ref()
        .map(|h| h.of(&console.researcher))
        .unwrap_or_default();
    Json(serde_json::json!({ "entries": entries })).into_response()
}

/// `GET /api/catalog`: the federated tables with their columns and types.
async fn catalog(State(console): State<Console>) -> Response {
    let tables = match console.hub.list_tables().await {
        Ok(tables) => tables,
        Err(e) => return hub_failure(e),
    };
    let tables: Vec<_> = tables
        .into_iter()
        .map(|(catalog, schema, name, kind, columns)| {
            serde_json::json!({
                "catalog": catalog,
                "schema": schema,
                "name": name,
                "kind": kind,
                "columns": columns.fields().iter().map(|f| serde_json::json!({
                    "name": f.name(),
                    "type": f.data_type().to_string(),
                })).collect::<Vec<_>>(),
            })
        })
        .collect();
    Json(serde_json::json!({ "tables": tables })).into_response()
}

/// `GET /api/stations`: `railyard.stations`.
async fn stations(State(console): State<Console>) -> Response {
    table_answer(&console, "SELECT * FROM railyard.stations").await
}

/// `GET /api/policies`: `railyard.policies`.
async fn policies(State(console): State<Console>) -> Response {
    table_answer(&console, "SELECT * FROM railyard.policies").await
}

/// `GET /api/budget`: `railyard.budget`, the researcher's DP budget.
async fn budget(State(console): State<Console>) -> Response {
    table_answer(&console, "SELECT * FROM railyard.budget").await
}
