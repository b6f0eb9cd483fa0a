//! Railyard's transport: who may talk to whom, and over which connection.
//!
//! Every link between a hub and a station is mutual TLS (rustls) under one small certificate
//! authority per collaboration ([`certs`]): the station proves it is the station the hub
//! configured (its certificate names it), the hub proves it is the collaboration's hub. A
//! researcher reaches the hub over server-authenticated TLS and proves who they are with a
//! bearer token (checked by the hub, not here).
//!
//! The key design decision: TLS is done here, on plain byte streams, not inside tonic. The
//! same handshake code then serves three shapes of connection — a station listening, a hub
//! dialing, and a station *dialing out* to the hub and then serving Flight over that very
//! connection (outbound mode, for hospitals that allow no inbound port) — and tonic only ever
//! sees an already authenticated [`Conn`].
//!
//! ```text
//!   inbound:   hub ──TCP+mTLS──▶ station listener ──Conn──▶ station's Flight server
//!   outbound:  station ──TCP+mTLS──▶ hub tunnel listener ──Conn──▶ hub's Flight *client*
//!              (the station's Flight server runs over the connection it dialed)
//! ```
//!
//! Layout: [`tls`] (PEM files → rustls configurations, peer-name checks), [`certs`] (the CA
//! and its certificates), [`conn`] (accepting and dialing authenticated connections),
//! [`tunnel`] (the hub's side of outbound stations), [`serve`] (one gRPC service on any of
//! those connections), [`coalesce`] (one write per burst of HTTP/2 frames), [`flight_data`] (an answer's
//! Flight messages, each schema's encoded once), [`error`].

pub mod certs;
pub mod coalesce;
pub mod conn;
pub mod error;
pub mod flight_data;
pub mod serve;
pub mod tls;
pub mod tunnel;

pub use conn::{Conn, Expect, Peer};
pub use error::{Error, Result};
pub use rustls;
pub use tls::{Tls, TlsFiles};
pub use tunnel::Tunnels;
