//! A station's page for its operator (`admin_listen` and `admin_token_file` in
//! station.toml): read-only, over the station's own audit log and privacy ledger.
//!
//! ```text
//!   operator's browser ── HTTPS + admin token ──▶ admin::router ──▶ audit.jsonl (decisions,
//!                                                                   hash chain)
//!                                                                 ledger.sqlite (ε spent)
//! ```
//!
//! It shows every decision the station took (researcher, fragment SQL, rule, rows, ε),
//! filterable; the result of `railyard audit verify` on the log; and the ε each researcher
//! has spent per collaboration and table. It changes nothing, and the hub has no way to it:
//! it listens on its own address with the station's certificate, and every page and call
//! needs the operator's token (the sign-in page and cookie are the console's,
//! [`railyard_engine::console::auth`]).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result};
use axum::extract::{Query, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use railyard_engine::console::auth;
use railyard_station::Station;
use railyard_station::audit::{Decision, Record};
use serde::Deserialize;

/// Most records one call returns.
pub const MAX_RECORDS: usize = 1000;
/// Records a call returns unless it asks for another number.
const DEFAULT_RECORDS: usize = 200;

#[derive(Clone)]
struct Admin {
    station: Arc<Station>,
    audit: PathBuf,
    token: Arc<str>,
}

/// Reads the operator's token from `path`: one line (comment lines aside) of at least 32
/// letters, digits, '-', '_' or '.', in a file only its owner may read.
pub fn load_token(path: &Path) -> Result<String> {
    let file = crate::secret::open_private(path, "the station's admin token is its operator's")?;
    let text =
        std::io::read_to_string(file).with_context(|| format!("cannot read {}", path.display()))?;
    let lines: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .collect();
    let valid = |t: &str| {
        t.len() >= 32
            && t.len() <= 512
            && t.chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
    };
    match lines.as_slice() {
        [token] if valid(token) => Ok((*token).to_string()),
        // Never echo the file: it may hold a secret written in the wrong place.
        _ => anyhow::bail!(
            "{} is not an admin token: expected one line of at least 32 letters, digits, '-', \
             '_' or '.' (for example from `railyard secret init`)",
            path.display()
        ),
    }
}

/// The operator's page and its API over `station`, whose audit log is `audit`.
fn router(station: Arc<Station>, audit: PathBuf, token: String) -> Router {
    let admin = Admin {
        station,
        audit,
        token: Arc::from(token),
    };
    let guarded = Router::new()
        .route("/", get(page))
        .route("/admin.js", get(script))
        .route("/api/audit", get(audit_records))
        .route("/api/verify", get(verify))
        .route("/api/spending", get(spending))
        .route("/api/logout", post(logout))
        .layer(axum::middleware::from_fn_with_state(
            admin.clone(),
            authenticate,
        ));
    Router::new()
        .route("/login", get(auth::login_page))
        .route("/login.js", get(auth::login_script))
        .route("/console.css", get(auth::style))
        .route("/favicon.ico", get(auth::no_icon))
        .route("/api/login", post(login))
        .merge(guarded)
        .fallback(|| async { failure(StatusCode::NOT_FOUND, "no such page or call") })
        .with_state(admin)
        .layer(axum::middleware::from_fn(auth::security_headers))
}

/// Serves the operator's page on `listener` (HTTPS) until `shutdown` resolves.
pub async fn serve(
    listener: auth::TlsListener,
    station: Arc<Station>,
    audit: PathBuf,
    token: String,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, router(station, audit, token))
        .with_graceful_shutdown(shutdown)
        .await
}

fn failure(status: StatusCode, message: &str) -> Response {
    (status, Json(serde_json::json!({ "error": message }))).into_response()
}

async fn authenticate(
    State(admin): State<Admin>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let path = request.uri().path().to_string();
    match auth::presented(request.headers(), auth::ADMIN_COOKIE) {
        Some(token) if auth::same_token(&token, &admin.token) => next.run(request).await,
        Some(_) => auth::unauthenticated(&path, "that is not this station's admin token"),
        None => auth::unauthenticated(
            &path,
            "this page needs the station's admin token (`Authorization: Bearer …`, or sign in \
             at /login)",
        ),
    }
}

#[derive(Deserialize)]
struct Login {
    token: String,
}

async fn login(State(admin): State<Admin>, Json(login): Json<Login>) -> Response {
    let token = login.token.trim();
    if !auth::same_token(token, &admin.token) {
        return failure(
            StatusCode::UNAUTHORIZED,
            "that is not this station's admin token",
        );
    }
    match auth::session_cookie(auth::ADMIN_COOKIE, token) {
        Some(cookie) => (
            [(header::SET_COOKIE, cookie)],
            Json(serde_json::json!({ "station": admin.station.name() })),
        )
            .into_response(),
        None => failure(
            StatusCode::BAD_REQUEST,
            "that token cannot be kept in a cookie",
        ),
    }
}

async fn logout() -> Response {
    (
        [(header::SET_COOKIE, auth::cleared_cookie(auth::ADMIN_COOKIE))],
        Json(serde_json::json!({ "signed_out": true })),
    )
        .into_response()
}

async fn page() -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/html; charset=utf-8"),
        )],
        include_str!("admin/admin.html"),
    )
}

async fn script() -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/javascript; charset=utf-8"),
        )],
        include_str!("admin/admin.js"),
    )
}

/// The filters of `GET /api/audit`; each is optional.
#[derive(Deserialize)]
struct Filter {
    /// Exactly this researcher.
    researcher: Option<String>,
    /// `allowed`, `refused` or `failed`.
    decision: Option<String>,
    /// Exactly this rule.
    rule: Option<String>,
    /// Exactly this query id (all of a query's fragments).
    query_id: Option<String>,
    /// Fragment SQL containing this text (case-insensitive).
    sql: Option<String>,
    /// How many of the newest matching records (default 200, at most 1000).
    limit: Option<usize>,
}

/// `GET /api/audit`: the newest matching decisions, newest first, and how many match.
async fn audit_records(State(admin): State<Admin>, Query(filter): Query<Filter>) -> Response {
    let decision = match filter.decision.as_deref().filter(|d| !d.is_empty()) {
        None => None,
        Some("allowed") => Some(Decision::Allowed),
        Some("refused") => Some(Decision::Refused),
        Some("failed") => Some(Decision::Failed),
        Some(_) => {
            return failure(
                StatusCode::BAD_REQUEST,
                "decision is allowed, refused or failed",
            );
        }
    };
    let limit = filter.limit.unwrap_or(DEFAULT_RECORDS);
    if limit > MAX_RECORDS {
        return failure(
            StatusCode::BAD_REQUEST,
            &format!("limit is at most {MAX_RECORDS}"),
        );
    }
    let nonempty = |v: Option<String>| v.filter(|s| !s.is_empty());
    let (researcher, rule, query_id) = (
        nonempty(filter.researcher),
        nonempty(filter.rule),
        nonempty(filter.query_id),
    );
    let sql = nonempty(filter.sql).map(|s| s.to_lowercase());
    let keep = move |r: &Record| {
        researcher.as_ref().is_none_or(|x| &r.researcher == x)
            && decision.is_none_or(|d| r.decision == d)
            && rule.as_ref().is_none_or(|x| r.rule.as_ref() == Some(x))
            && query_id.as_ref().is_none_or(|x| &r.query_id == x)
            && sql
                .as_ref()
                .is_none_or(|x| r.sql.to_lowercase().contains(x.as_str()))
    };
    let path = admin.audit.clone();
    let read =
        tokio::task::spawn_blocking(move || railyard_station::audit::newest(&path, limit, keep))
            .await;
    match read {
        Ok(Ok((records, matched))) => Json(serde_json::json!({
            "station": admin.station.name(),
            "matched": matched,
            "records": records,
        }))
        .into_response(),
        Ok(Err(e)) => failure(
            StatusCode::INTERNAL_SERVER_ERROR,
            &format!("cannot read the audit log: {e}"),
        ),
        Err(e) => failure(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string()),
    }
}

/// `GET /api/verify`: `railyard audit verify` on the station's log.
async fn verify(State(admin): State<Admin>) -> Response {
    let path = admin.audit.clone();
    let verified =
        tokio::task::spawn_blocking(move || railyard_station::audit::verify(&path)).await;
    match verified {
        Ok(Ok(v)) => Json(serde_json::json!({
            "intact": v.broken.is_none(),
            "records": v.records,
            "head": v.head,
            "torn_tail": v.torn_tail,
            "broken": v.broken.map(|(line, why)| serde_json::json!({ "line": line, "why": why })),
        }))
        .into_response(),
        Ok(Err(e)) if e.kind() == std::io::ErrorKind::NotFound => Json(serde_json::json!({
            "intact": true, "records": 0, "head": null, "torn_tail": false, "broken": null,
        }))
        .into_response(),
        Ok(Err(e)) => failure(
            StatusCode::INTERNAL_SERVER_ERROR,
            &format!("cannot read the audit log: {e}"),
        ),
        Err(e) => failure(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string()),
    }
}

/// `GET /api/spending`: the ε each researcher has spent, per collaboration and table, and
/// the budget each account has (null if the station answers no DP aggregates).
async fn spending(State(admin): State<Admin>) -> Response {
    match admin.station.spending().await {
        Ok((budget, accounts)) => Json(serde_json::json!({
            "budget": budget,
            "accounts": accounts,
        }))
        .into_response(),
        Err(e) => failure(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string()),
    }
}
