//! What the hub's console and a station's audit page share when they are deployed: a
//! bearer token on every page and call (in the `Authorization` header, or in a cookie the
//! sign-in page sets), HTTPS with the party's certificate, and the headers that keep a page
//! out of other sites' frames and caches.
//!
//! A browser cannot put a header on a link it follows, so the sign-in page (the one page
//! served without a token; it shows nothing but a token field) posts the token once and
//! the server keeps it in an `HttpOnly`, `Secure`, `SameSite=Strict` cookie: scripts cannot
//! read it, it travels only over TLS, and no other site's page can make the browser send
//! it. The server verifies it again on every request, so a revoked token stops at once.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;

use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use futures::{Stream, StreamExt};

/// Cookie of the hub's console.
pub const CONSOLE_COOKIE: &str = "railyard_console";
/// Cookie of a station's audit page (cookies are not kept apart by port: a station and a
/// hub on one host need two names).
pub const ADMIN_COOKIE: &str = "railyard_admin";

/// How long a sign-in lasts in the browser (the token's own expiry still applies).
const SESSION_SECONDS: u64 = 12 * 3600;

/// The token a request presents: `Authorization: Bearer <token>`, else the cookie `name`.
pub fn presented(headers: &HeaderMap, cookie: &str) -> Option<String> {
    if let Some(value) = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
    {
        return Some(crate::flight_sql::bearer_token(value).to_string());
    }
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(key, _)| *key == cookie)
        .map(|(_, value)| value.to_string())
}

/// The `Set-Cookie` that keeps `token` in cookie `name`; `None` for a token with characters
/// a cookie cannot carry as they are (no token Railyard makes has them).
pub fn session_cookie(name: &str, token: &str) -> Option<HeaderValue> {
    let plain = !token.is_empty()
        && token.len() <= 512
        && token
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "_-.".contains(c));
    if !plain {
        return None;
    }
    HeaderValue::from_str(&format!(
        "{name}={token}; Path=/; HttpOnly; Secure; SameSite=Strict; Max-Age={SESSION_SECONDS}"
    ))
    .ok()
}

/// The `Set-Cookie` that forgets cookie `name` (signing out).
pub fn cleared_cookie(name: &str) -> HeaderValue {
    HeaderValue::from_str(&format!(
        "{name}=; Path=/; HttpOnly; Secure; SameSite=Strict; Max-Age=0"
    ))
    .unwrap_or_else(|_| HeaderValue::from_static(""))
}

/// The answer to a request without a valid token: for the API, 401 with the reason as JSON;
/// for a page, a redirect to the sign-in page (which shows nothing else).
pub fn unauthenticated(path: &str, reason: &str) -> Response {
    if path.starts_with("/api/") {
        let mut response = super::failure(StatusCode::UNAUTHORIZED, reason, None);
        response.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            HeaderValue::from_static("Bearer realm=\"railyard\""),
        );
        response
    } else {
        (
            StatusCode::SEE_OTHER,
            [(header::LOCATION, "/login")],
            "sign in with your token at /login",
        )
            .into_response()
    }
}

/// `GET /login`: the sign-in page.
pub async fn login_page() -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
        include_str!("assets/login.html"),
    )
}

/// `GET /login.js`.
pub async fn login_script() -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/javascript; charset=utf-8")],
        include_str!("assets/login.js"),
    )
}

/// `GET /console.css`: the pages' style sheet (no data; served without a token so the
/// sign-in page has it).
pub async fn style() -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/css; charset=utf-8")],
        include_str!("assets/console.css"),
    )
}

/// `GET /favicon.ico`: none (a browser asks for it on every page).
pub async fn no_icon() -> StatusCode {
    StatusCode::NO_CONTENT
}

/// Headers on every answer: not framed by another site, not cached, no referrer, scripts
/// only from the server itself.
pub async fn security_headers(
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let mut response = next.run(request).await;
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data: blob:; \
             frame-ancestors 'none'; form-action 'self'; base-uri 'none'",
        ),
    );
    headers.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    headers
        .entry(header::CACHE_CONTROL)
        .or_insert(HeaderValue::from_static("no-store"));
    response
}

/// Whether `presented` is `expected`, compared by their SHA-256 digests in constant time
/// (neither the length nor a prefix of the expected token leaks through timing).
pub fn same_token(presented: &str, expected: &str) -> bool {
    use sha2::{Digest, Sha256};
    let (a, b) = (
        Sha256::digest(presented.as_bytes()),
        Sha256::digest(expected.as_bytes()),
    );
    a.iter()
        .zip(b.iter())
        .fold(0u8, |acc, (x, y)| acc | (x ^ y))
        == 0
}

type Incoming = Pin<Box<dyn Stream<Item = std::io::Result<railyard_net::Conn>> + Send>>;

/// A listener whose connections have completed a TLS handshake with `config` (see
/// [`railyard_net::Tls::https_server_config`]), for `axum::serve`.
pub struct TlsListener {
    incoming: Incoming,
    local: SocketAddr,
}

impl TlsListener {
    pub fn new(
        listener: tokio::net::TcpListener,
        config: Arc<railyard_net::rustls::ServerConfig>,
    ) -> std::io::Result<Self> {
        let local = listener.local_addr()?;
        Ok(Self {
            incoming: Box::pin(railyard_net::conn::accept(listener, config, Vec::new())),
            local,
        })
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = railyard_net::Conn;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            match self.incoming.next().await {
                Some(Ok(conn)) => {
                    let addr = conn.peer().addr.unwrap_or(self.local);
                    return (conn, addr);
                }
                Some(Err(e)) => tracing::debug!("an HTTPS connection failed: {e}"),
                // The acceptor stops only with its listener; nothing more will come.
                None => std::future::pending::<()>().await,
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(self.local)
    }
}
