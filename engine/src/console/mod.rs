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
//! Two ways to serve it ([`Access`]):
//! - open (`railyard local`, the demo): it answers as
//!   [`crate::flight_sql::LOCAL_RESEARCHER`], only on a loopback address, and refuses a
//!   request whose `Host` is not a loopback name (a web page the researcher visits cannot
//!   reach it through DNS rebinding);
//! - with tokens (`console_listen` in hub.toml): HTTPS with the hub's certificate, and every
//!   page and call carries a researcher's bearer token, checked by the same
//!   [`verify_bearer`] as Flight SQL; the researcher sees only their collaboration
//!   ([`auth`] has the sign-in page and its cookie).
//!
//! Query calls take JSON bodies only: a form another site posts is not JSON and is refused,
//! and a cross-site `fetch` with a JSON body needs a CORS preflight the console never
//! grants.

pub mod answers;
pub mod auth;
pub mod format;
pub mod history;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use axum::extract::{Extension, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures::TryStreamExt;
use futures::future::{AbortHandle, Abortable};
use serde::{Deserialize, Serialize};

use crate::error::to_status;
use crate::flight_sql::{Collaborations, verify_bearer};
use crate::hub::{EPSILON_METADATA, Hub};
use crate::tokens::TokenStore;
use crate::withheld::WITHHELD_METADATA;

/// Most rows a JSON answer carries; the downloads carry all of them.
pub const MAX_JSON_ROWS: usize = 10_000;

/// Who may use the console.
#[derive(Clone)]
pub enum Access {
    /// `railyard local` and the demo: no authentication, loopback only, one researcher.
    Open { hub: Arc<Hub>, researcher: String },
    /// A deployed hub (`console_listen` in hub.toml): every page and call needs a
    /// researcher's bearer token, checked exactly as Flight SQL checks it; a token sees
    /// only its own collaboration's hub (stations, tables, policies, budget, history).
    Tokens {
        store: Arc<TokenStore>,
        collaborations: Collaborations,
    },
}

/// A running query a researcher may cancel: (collaboration, researcher, the page's id).
type RunningKey = (String, String, String);

#[derive(Clone)]
struct Console {
    access: Access,
    history: Option<Arc<history::History>>,
    running: Arc<Mutex<HashMap<RunningKey, AbortHandle>>>,
    /// Answers kept for their downloads.
    answers: Arc<answers::Answers>,
}

/// The caller of one request, as [`authenticate`] resolved it.
#[derive(Clone)]
struct Caller {
    hub: Arc<Hub>,
    researcher: String,
    /// Empty on an open console.
    collaboration: String,
}

/// The console and its API, keeping the query history in the file `history` (none without
/// one).
pub fn router(access: Access, history: Option<std::path::PathBuf>) -> Router {
    let open = matches!(access, Access::Open { .. });
    let console = Console {
        access,
        history: history.map(|path| Arc::new(history::History::new(path))),
        running: Arc::new(Mutex::new(HashMap::new())),
        answers: Arc::new(answers::Answers::default()),
    };
    let guarded = Router::new()
        .route("/", get(page))
        .route("/console.js", get(script))
        .route("/editor.js", get(editor_script))
        .route("/api/session", get(session))
        .route("/api/query", post(query))
        .route("/api/cancel", post(cancel))
        .route("/api/answer/{id}", get(kept_answer))
        .route("/api/explain", post(explain))
        .route("/api/catalog", get(catalog))
        .route("/api/stations", get(stations))
        .route("/api/policies", get(policies))
        .route("/api/budget", get(budget))
        .route("/api/history", get(recent))
        .route("/api/logout", post(logout))
        .layer(axum::middleware::from_fn_with_state(
            console.clone(),
            authenticate,
        ));
    let mut public = Router::new()
        .route("/console.css", get(auth::style))
        .route("/favicon.ico", get(auth::no_icon));
    if !open {
        public = public
            .route("/login", get(auth::login_page))
            .route("/login.js", get(auth::login_script))
            .route("/api/login", post(login));
    }
    let router = guarded
        .merge(public)
        .fallback(not_found)
        .with_state(console)
        .layer(axum::middleware::from_fn(auth::security_headers));
    if open {
        router.layer(axum::middleware::from_fn(loopback_host))
    } else {
        router
    }
}

/// Serves an open console on `listener` until `shutdown` resolves (`railyard local`).
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
                "without tokens the console listens on loopback addresses only, not {local} \
                 (a deployed hub serves it with tokens and TLS: `console_listen` in hub.toml)"
            ),
        ));
    }
    let access = Access::Open {
        hub,
        researcher: researcher.to_string(),
    };
    axum::serve(listener, router(access, history))
        .with_graceful_shutdown(shutdown)
        .await
}

/// Serves a deployed hub's console over HTTPS (`listener` from [`auth::TlsListener`]), every
/// request authenticated with a researcher's token, until `shutdown` resolves.
pub async fn serve_tokens(
    listener: auth::TlsListener,
    store: Arc<TokenStore>,
    collaborations: Collaborations,
    history: Option<std::path::PathBuf>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let access = Access::Tokens {
        store,
        collaborations,
    };
    axum::serve(listener, router(access, history))
        .with_graceful_shutdown(shutdown)
        .await
}

/// Resolves who is calling (the open console's researcher, or the bearer of a valid token)
/// and refuses everything else before any handler runs.
async fn authenticate(
    State(console): State<Console>,
    mut request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let caller = match &console.access {
        Access::Open { hub, researcher } => Caller {
            hub: Arc::clone(hub),
            researcher: researcher.clone(),
            collaboration: String::new(),
        },
        Access::Tokens {
            store,
            collaborations,
        } => {
            let path = request.uri().path().to_string();
            let Some(token) = auth::presented(request.headers(), auth::CONSOLE_COOKIE) else {
                return auth::unauthenticated(&path, &crate::tokens::Refused::Missing.to_string());
            };
            match verify_bearer(store, collaborations, &token).await {
                Ok((hub, bearer)) => Caller {
                    hub,
                    researcher: bearer.researcher,
                    collaboration: bearer.collaboration,
                },
                Err(status) if status.code() == tonic::Code::Unauthenticated => {
                    return auth::unauthenticated(&path, status.message());
                }
                Err(status) => {
                    return failure(StatusCode::INTERNAL_SERVER_ERROR, status.message(), None);
                }
            }
        }
    };
    request.extensions_mut().insert(caller);
    next.run(request).await
}

#[derive(Deserialize)]
struct Login {
    token: String,
}

/// `POST /api/login` with `{"token": "…"}`: checks the token as every request will, and
/// keeps it in the browser's `HttpOnly` cookie.
async fn login(State(console): State<Console>, Json(login): Json<Login>) -> Response {
    let Access::Tokens {
        store,
        collaborations,
    } = &console.access
    else {
        return failure(StatusCode::NOT_FOUND, "this console needs no token", None);
    };
    let bearer = match verify_bearer(store, collaborations, &login.token).await {
        Ok((_, bearer)) => bearer,
        Err(status) if status.code() == tonic::Code::Unauthenticated => {
            return failure(StatusCode::UNAUTHORIZED, status.message(), None);
        }
        Err(status) => {
            return failure(StatusCode::INTERNAL_SERVER_ERROR, status.message(), None);
        }
    };
    let Some(cookie) = auth::session_cookie(auth::CONSOLE_COOKIE, login.token.trim()) else {
        return failure(
            StatusCode::BAD_REQUEST,
            "that is not a Railyard token",
            None,
        );
    };
    (
        [(header::SET_COOKIE, cookie)],
        Json(serde_json::json!({
            "researcher": bearer.researcher,
            "collaboration": bearer.collaboration,
        })),
    )
        .into_response()
}

/// `POST /api/logout`: forgets the browser's token.
async fn logout() -> Response {
    (
        [(
            header::SET_COOKIE,
            auth::cleared_cookie(auth::CONSOLE_COOKIE),
        )],
        Json(serde_json::json!({ "signed_out": true })),
    )
        .into_response()
}

/// `GET /api/session`: who the console answers as.
async fn session(State(console): State<Console>, Extension(caller): Extension<Caller>) -> Response {
    Json(serde_json::json!({
        "researcher": caller.researcher,
        "collaboration": (!caller.collaboration.is_empty()).then_some(&caller.collaboration),
        "authenticated": matches!(console.access, Access::Tokens { .. }),
    }))
    .into_response()
}

async fn not_found() -> Response {
    failure(StatusCode::NOT_FOUND, "no such page or call", None)
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

async fn editor_script() -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/javascript; charset=utf-8")],
        include_str!("assets/editor.js"),
    )
}

async fn script() -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/javascript; charset=utf-8")],
        include_str!("assets/console.js"),
    )
}

/// A failure as the page shows it: the message, and the rule of a refusal.
#[derive(Serialize)]
struct Failure<'a> {
    error: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    rule: Option<String>,
}

pub(crate) fn failure(status: StatusCode, message: &str, rule: Option<String>) -> Response {
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
    /// The page's name for this run (letters, digits and '-', at most 64), under which
    /// `POST /api/cancel` stops it.
    #[serde(default)]
    id: Option<String>,
}

#[derive(Deserialize)]
struct Download {
    format: Option<String>,
}

/// Runs a query for `caller`: its schema (with the ε and withheld-group metadata) and its
/// rows.
async fn run(
    caller: &Caller,
    sql: &str,
) -> Result<(arrow::datatypes::SchemaRef, Vec<arrow::array::RecordBatch>), crate::error::Error> {
    let planned = caller.hub.plan(sql, &caller.researcher).await?;
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

/// Takes a running query out of the registry when it ends, however it ends.
struct Registered {
    running: Arc<Mutex<HashMap<RunningKey, AbortHandle>>>,
    key: RunningKey,
}

impl Drop for Registered {
    fn drop(&mut self) {
        self.running
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.key);
    }
}

/// What became of a query the console ran.
enum Ran {
    Done(
        Result<(arrow::datatypes::SchemaRef, Vec<arrow::array::RecordBatch>), crate::error::Error>,
    ),
    Cancelled,
    /// Not run: the id is malformed or already in use.
    NotRun(Response),
}

/// Runs `sql` for `caller`, cancellable under `id` while it runs. Cancelling drops the
/// query: its streams from the stations close, and nothing more reaches the hub.
async fn run_cancellable(console: &Console, caller: &Caller, sql: &str, id: Option<&str>) -> Ran {
    let Some(id) = id else {
        return Ran::Done(run(caller, sql).await);
    };
    if !valid_id(id) {
        return Ran::NotRun(invalid_id());
    }
    let key = (
        caller.collaboration.clone(),
        caller.researcher.clone(),
        id.to_string(),
    );
    let (handle, registration) = AbortHandle::new_pair();
    {
        let mut running = console.running.lock().unwrap_or_else(|p| p.into_inner());
        if running.contains_key(&key) {
            return Ran::NotRun(failure(
                StatusCode::CONFLICT,
                &format!("a query with id '{id}' is already running"),
                None,
            ));
        }
        running.insert(key.clone(), handle);
    }
    let _registered = Registered {
        running: Arc::clone(&console.running),
        key,
    };
    match Abortable::new(run(caller, sql), registration).await {
        Ok(answer) => Ran::Done(answer),
        Err(futures::future::Aborted) => Ran::Cancelled,
    }
}

fn valid_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= 64 && id.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
}

fn invalid_id() -> Response {
    failure(
        StatusCode::BAD_REQUEST,
        "a query id is 1 to 64 letters, digits or '-'",
        None,
    )
}

/// `POST /api/query` with `{"sql": "…", "id": "…"}`: the answer as JSON (at most
/// [`MAX_JSON_ROWS`] rows), or with `?format=csv|parquet|arrow` as a file.
async fn query(
    State(console): State<Console>,
    Extension(caller): Extension<Caller>,
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
    let ran = run_cancellable(&console, &caller, &statement.sql, statement.id.as_deref()).await;
    let (schema, batches) = match ran {
        Ran::Done(Ok(answer)) => {
            remember(
                &console,
                &caller,
                &statement.sql,
                "answered",
                Some(&answer.1),
                None,
            )
            .await;
            if let Some(id) = &statement.id {
                let key = (
                    caller.collaboration.clone(),
                    caller.researcher.clone(),
                    id.clone(),
                );
                console.answers.keep(key, Arc::clone(&answer.0), &answer.1);
            }
            answer
        }
        Ran::Done(Err(e)) => {
            let (http, message, rule) = failure_parts(e);
            let outcome = if http == StatusCode::FORBIDDEN {
                "refused"
            } else {
                "failed"
            };
            remember(
                &console,
                &caller,
                &statement.sql,
                outcome,
                None,
                rule.clone(),
            )
            .await;
            return failure(http, &message, rule);
        }
        Ran::NotRun(response) => return response,
        Ran::Cancelled => {
            remember(&console, &caller, &statement.sql, "cancelled", None, None).await;
            return failure(
                StatusCode::CONFLICT,
                "cancelled: the query was stopped at the researcher's request",
                None,
            );
        }
    };
    respond(download.format.as_deref(), &schema, &batches)
}

/// An answer in `kind` (JSON unless it says csv, parquet or arrow).
fn respond(
    kind: Option<&str>,
    schema: &arrow::datatypes::SchemaRef,
    batches: &[arrow::array::RecordBatch],
) -> Response {
    match kind {
        None | Some("json") => match format::json(schema, batches, MAX_JSON_ROWS) {
            Ok(body) => json_answer(schema, body),
            Err(e) => failure(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string(), None),
        },
        Some(kind @ ("csv" | "parquet" | "arrow")) => match format::file(kind, schema, batches) {
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
            StatusCode::BAD_REQUEST,
            &format!("unknown format '{other}': json, csv, parquet or arrow"),
            None,
        ),
    }
}

/// `GET /api/answer/{id}?format=csv|parquet|arrow|json`: the caller's answer to the query
/// they ran under `id`, as it was answered (nothing runs again).
async fn kept_answer(
    State(console): State<Console>,
    Extension(caller): Extension<Caller>,
    axum::extract::Path(id): axum::extract::Path<String>,
    Query(download): Query<Download>,
) -> Response {
    if !valid_id(&id) {
        return invalid_id();
    }
    let key = (caller.collaboration, caller.researcher, id);
    match console.answers.get(&key) {
        Some((schema, batches)) => respond(download.format.as_deref(), &schema, &batches),
        None => failure(
            StatusCode::NOT_FOUND,
            &format!(
                "no answer of yours is kept under '{}' (answers are kept {} minutes, up to {} \
                 MiB): run the query again",
                key.2,
                answers::KEPT_FOR.as_secs() / 60,
                answers::MAX_ANSWER_BYTES >> 20
            ),
            None,
        ),
    }
}

#[derive(Deserialize)]
struct Cancel {
    id: String,
}

/// `POST /api/cancel` with `{"id": "…"}`: stops the caller's running query of that id (a
/// researcher can stop only their own).
async fn cancel(
    State(console): State<Console>,
    Extension(caller): Extension<Caller>,
    Json(cancel): Json<Cancel>,
) -> Response {
    if !valid_id(&cancel.id) {
        return invalid_id();
    }
    let key = (caller.collaboration, caller.researcher, cancel.id);
    let handle = console
        .running
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .remove(&key);
    match handle {
        Some(handle) => {
            handle.abort();
            Json(serde_json::json!({ "cancelled": true })).into_response()
        }
        None => failure(
            StatusCode::NOT_FOUND,
            &format!("no query of yours with id '{}' is running", key.2),
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
async fn explain(
    Extension(caller): Extension<Caller>,
    Json(statement): Json<Statement>,
) -> Response {
    let sql = format!("EXPLAIN FEDERATED {}", statement.sql);
    table_answer(&caller, &sql).await
}

async fn table_answer(caller: &Caller, sql: &str) -> Response {
    match run(caller, sql).await {
        Ok((schema, batches)) => match format::json(&schema, &batches, MAX_JSON_ROWS) {
            Ok(body) => json_answer(&schema, body),
            Err(e) => failure(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string(), None),
        },
        Err(e) => hub_failure(e),
    }
}

/// Records a query of `caller` in the history: its SQL and outcome, never a value of its
/// answer. The file is written on the blocking pool, off the async workers.
async fn remember(
    console: &Console,
    caller: &Caller,
    sql: &str,
    outcome: &str,
    batches: Option<&[arrow::array::RecordBatch]>,
    rule: Option<String>,
) {
    let Some(history) = console.history.clone() else {
        return;
    };
    let entry = history::Entry {
        at: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
        researcher: caller.researcher.clone(),
        collaboration: caller.collaboration.clone(),
        sql: sql.to_string(),
        outcome: outcome.to_string(),
        rows: batches.map(|b| b.iter().map(|b| b.num_rows()).sum()),
        rule,
    };
    // A history that cannot be written does not fail the query (`record` logs it).
    let _ = tokio::task::spawn_blocking(move || history.record(&entry)).await;
}

/// `GET /api/history`: the caller's last queries in their collaboration, newest first (the
/// file is read on the blocking pool).
async fn recent(State(console): State<Console>, Extension(caller): Extension<Caller>) -> Response {
    let Some(history) = console.history.clone() else {
        return Json(serde_json::json!({ "entries": [] })).into_response();
    };
    let entries =
        tokio::task::spawn_blocking(move || history.of(&caller.researcher, &caller.collaboration))
            .await
            .unwrap_or_default();
    Json(serde_json::json!({ "entries": entries })).into_response()
}

/// `GET /api/catalog`: the federated tables with their columns and types.
async fn catalog(Extension(caller): Extension<Caller>) -> Response {
    let tables = match caller.hub.list_tables().await {
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
async fn stations(Extension(caller): Extension<Caller>) -> Response {
    table_answer(&caller, "SELECT * FROM railyard.stations").await
}

/// `GET /api/policies`: `railyard.policies`.
async fn policies(Extension(caller): Extension<Caller>) -> Response {
    table_answer(&caller, "SELECT * FROM railyard.policies").await
}

/// `GET /api/budget`: `railyard.budget`, the researcher's DP budget.
async fn budget(Extension(caller): Extension<Caller>) -> Response {
    table_answer(&caller, "SELECT * FROM railyard.budget").await
}
