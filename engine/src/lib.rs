//! The Railyard hub: researchers' Flight SQL endpoint, fragment dispatch and merge.
//!
//! ```text
//!   client ── Flight SQL ──▶ HubFlightSql ──▶ Hub::plan (SQL) / Hub::plan_substrait
//!                                              │ DataFusion: parse or consume, analyze,
//!                                              │   optimize
//!                                              │ FederatedQueryPlanner: split into fragments
//!                                              │   (railyard-planner) and plan physically
//!                                              ▼
//!                         merge operators (final aggregates, joins, sort, limit)
//!                                              ▲
//!                         FragmentExec: one stream of every station's DoGet, concurrent
//!                                              ▲
//!                              stations (Arrow Flight, railyard-contract), or the
//!                              in-process join station of a vertical table
//! ```
//!
//! The key decision: the hub is DataFusion with one extra operator. Everything above the
//! fragments — merging partial aggregate states, HAVING, ORDER BY, joins of merged results —
//! is DataFusion's own execution, so the hub inherits its correctness and speed.
//!
//! Layout: [`hub`] (catalog discovery, per-query sessions), [`console`] (the HTTP front:
//! JSON API and web console, through the same planner), [`exec`] (the fragment operator and
//! the query planner), [`station_client`] (connections to stations), [`flight_sql`] (the
//! Flight SQL service: open in `railyard local`, bearer tokens from [`tokens`] in a
//! deployed hub, one [`Hub`] per collaboration), [`stats`] (statistics table functions),
//! [`vertical`] (vertically partitioned tables: the members' pseudonymized rows and their
//! join), `join_station` (the station that serves a vertical table, from `railyard-policy`
//! and `railyard-audit`, called in-process), [`budget`] (`railyard.budget`), [`train`]
//! (`train(...)` calls), [`substrait`] (Substrait plans, consumed into the same planner as
//! SQL), `guards` (string growth in the hub's own plan), [`withheld`] (the
//! hub's second threshold, and what an answer says it left out), [`error`] (errors and their
//! one mapping to gRPC statuses; a station's status is read once, in
//! `StationFailure::from_status`).
//!
//! The hub depends on no station code: it shares with stations only the contract, the pure
//! policy rules and the audit log.

pub mod board;
pub mod budget;
pub mod console;
pub mod error;
pub mod exec;
pub mod flight_front;
pub mod flight_sql;
mod guards;
pub mod hub;
mod join_station;
pub mod params;
pub mod station_client;
pub mod stats;
pub mod substrait;
pub mod tokens;
pub mod train;
pub mod vertical;
pub mod withheld;

use std::future::Future;
use std::sync::Arc;

use arrow_flight::flight_service_server::FlightServiceServer;
use tokio::net::TcpListener;

pub use board::StationBoard;
pub use error::{Error, Result, StationFailure};
pub use flight_sql::{HubFlightSql, LOCAL_RESEARCHER};
pub use hub::{Hub, HubOptions, Planned};
pub use station_client::{MAX_MESSAGE_BYTES, StationAddress, StationClient, Transport};
pub use vertical::VerticalSpec;

/// Serves the hub's Flight SQL endpoint on `listener` until `shutdown` resolves.
pub async fn serve(
    hub: Arc<Hub>,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<()> {
    let incoming = railyard_net::serve::plaintext(listener);
    serve_incoming(HubFlightSql::new(hub), incoming, shutdown).await
}

/// Serves `flight` on already accepted connections (TLS ones, in a deployed hub) until
/// `shutdown` resolves.
pub async fn serve_incoming<I, IO, IE>(
    flight: HubFlightSql,
    incoming: I,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<()>
where
    I: futures::Stream<Item = std::result::Result<IO, IE>>,
    IO: tokio::io::AsyncRead
        + tokio::io::AsyncWrite
        + tonic::transport::server::Connected
        + Unpin
        + Send
        + 'static,
    IE: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let service = FlightServiceServer::new(flight_front::HubFlightService(flight))
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES);
    railyard_net::serve::serve(tonic::service::Routes::new(service), incoming, shutdown).await?;
    Ok(())
}
