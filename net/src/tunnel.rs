//! The hub's side of outbound stations.
//!
//! An outbound station dials the hub's tunnel listener; after the mutual TLS handshake the
//! hub knows which station it is (its certificate names it) and parks the connection in that
//! station's slot. The hub's Flight client for the station is an ordinary tonic channel whose
//! connector takes the next parked connection instead of dialing: the roles of the TLS
//! handshake (station = client) and of HTTP/2 (hub = client) are independent.

use std::collections::HashMap;
use std::io;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::sync::{Mutex, mpsc};
use tonic::transport::{Channel, Endpoint};
use tracing::{info, warn};

use crate::conn::{Conn, accept};
use crate::error::{Error, Result};
use crate::tls::Tls;

/// Connections not yet taken by the hub's channel, per station.
const PARKED: usize = 4;

struct Slot {
    tx: mpsc::Sender<Conn>,
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
            let (tx, rx) = mpsc::channel(PARKED);
            let taken = Arc::new(Mutex::new(rx));
            let station = name.clone();
            let connector = tower::service_fn(move |_: http::Uri| {
                let (taken, station) = (Arc::clone(&taken), station.clone());
                async move {
                    let mut parked = taken.lock().await;
                    match tokio::time::timeout(wait, parked.recv()).await {
                        Ok(Some(conn)) => Ok(TokioIo::new(conn)),
                        Ok(None) => Err(io::Error::new(
                            io::ErrorKind::NotConnected,
                            "the hub's tunnel listener stopped",
                        )),
                        Err(_) => Err(io::Error::new(
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
            slots.insert(name.clone(), Slot { tx, channel });
        }
        Ok(Self {
            slots: Arc::new(slots),
        })
    }

    /// The channel to outbound station `name`, if the hub expects it.
    pub fn channel(&self, name: &str) -> Option<Channel> {
        self.slots.get(name).map(|s| s.channel.clone())
    }

    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    /// Accepts the stations' connections on `listener` until `shutdown`: mutual TLS, client
    /// certificates from the CA naming one of the expected stations.
    pub async fn serve(
        &self,
        listener: TcpListener,
        tls: &Tls,
        shutdown: impl std::future::Future<Output = ()>,
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
            let slot = &self.slots[&name];
            info!(
                "outbound station '{name}' dialed in from {:?}",
                conn.peer().addr
            );
            if slot.tx.try_send(conn).is_err() {
                warn!(
                    "outbound station '{name}' dialed in {PARKED} times without being used; dropping"
                );
            }
        }
    }
}
