//! The hub's side of outbound stations.
//!
//! An outbound station dials the hub's tunnel listener; after the mutual TLS handshake the
//! hub knows which station it is (its certificate names it) and parks the connection in that
//! station's slot (the newest connection replaces an unused older one: after a network
//! blip the old one is likely dead). The hub's Flight client for the station is an ordinary
//! tonic channel whose connector takes the parked connection instead of dialing: the roles
//! of the TLS handshake (station = client) and of HTTP/2 (hub = client) are independent.

use std::collections::HashMap;
use std::io;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::sync::Notify;
use tonic::transport::{Channel, Endpoint};
use tracing::{info, warn};

use crate::coalesce::Coalesce;
use crate::conn::{Conn, accept};
use crate::error::{Error, Result};
use crate::tls::Tls;

/// A station's newest connection not yet taken by the hub's channel.
#[derive(Default)]
struct Parked {
    conn: std::sync::Mutex<Option<Conn>>,
    arrived: Notify,
}

impl Parked {
    fn put(&self, conn: Conn) {
        // Held for a swap only.
        let old = self
            .conn
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .replace(conn);
        drop(old);
        self.arrived.notify_waiters();
    }

    fn take(&self) -> Option<Conn> {
        self.conn.lock().unwrap_or_else(|p| p.into_inner()).take()
    }

    /// The next connection, waiting up to `wait` for one.
    async fn next(&self, wait: Duration) -> Option<Conn> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            // Registered before looking, so an arrival in between is not missed.
            let arrived = self.arrived.notified();
            if let Some(conn) = self.take() {
                return Some(conn);
            }
            if tokio::time::timeout_at(deadline, arrived).await.is_err() {
                return None;
            }
        }
    }
}

struct Slot {
    parked: Arc<Parked>,
    channel: Channel,
}

/// The outbound stations a hub expects, and a channel to each.
#[derive(Clone)]
pub struct Tunnels {
    slots: Arc<HashMap<String, Slot>>,
}

impl std::fmt::Debug for Tunnels {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tunnels")
            .field("stations", &self.slots.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl Tunnels {
    /// Slots for the stations `names`; each channel waits up to `wait` for its station to
    /// dial in whenever it needs a connection. Must run inside a tokio runtime.
    pub fn new(names: &[String], wait: Duration) -> Result<Self> {
        let mut slots = HashMap::new();
        for name in names {
            let parked = Arc::new(Parked::default());
            let waiting = Arc::clone(&parked);
            let station = name.clone();
            let connector = tower::service_fn(move |_: http::Uri| {
                let (waiting, station) = (Arc::clone(&waiting), station.clone());
                async move {
                    match waiting.next(wait).await {
                        Some(conn) => Ok(TokioIo::new(Coalesce::new(conn))),
                        None => Err(io::Error::new(
                            io::ErrorKind::TimedOut,
                            format!(
                                "outbound station '{station}' has not dialed in within {wait:?}"
                            ),
                        )),
                    }
                }
            });
            let channel = Endpoint::from_shared(format!("http://{name}.tunnel"))
                .map_err(|e| Error::Invalid(format!("station name '{name}': {e}")))?
                .http2_keep_alive_interval(Duration::from_secs(30))
                .keep_alive_while_idle(true)
                .connect_with_connector_lazy(connector);
            slots.insert(name.clone(), Slot { parked, channel });
        }
        Ok(Self {
            slots: Arc::new(slots),
        })
    }

    /// The channel to outbound station `name`, if the hub expects it.
    pub fn channel(&self, name: &str) -> Option<Channel> {
        self.slots.get(name).map(|s| s.channel.clone())
    }

    /// Accepts the stations' connections on `listener` until `shutdown`: mutual TLS, client
    /// certificates from the CA naming one of the expected stations.
    pub async fn serve(
        &self,
        listener: TcpListener,
        tls: &Tls,
        shutdown: impl Future<Output = ()>,
    ) -> Result<()> {
        let names: Vec<String> = self.slots.keys().cloned().collect();
        let config = tls.mutual_server_config(names.clone())?;
        let incoming = accept(listener, config, names);
        tokio::pin!(incoming);
        tokio::pin!(shutdown);
        loop {
            let conn = tokio::select! {
                next = incoming.next() => match next {
                    Some(Ok(conn)) => conn,
                    Some(Err(e)) => { warn!("tunnel listener: {e}"); continue; }
                    None => return Ok(()),
                },
                _ = &mut shutdown => return Ok(()),
            };
            let Some(name) = conn.peer().name.clone() else {
                continue;
            };
            info!(
                "outbound station '{name}' dialed in from {:?}",
                conn.peer().addr
            );
            self.slots[&name].parked.put(conn);
        }
    }
}
