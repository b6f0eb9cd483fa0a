//! Authenticated connections: accepted on a listener, or dialed (once, or for as long as a
//! station runs in outbound mode).

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures::Stream;
use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use rustls::{ClientConfig, ServerConfig};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot};
use tokio_rustls::{TlsAcceptor, TlsConnector, TlsStream};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::server::Connected;
use tracing::{debug, info, warn};

use crate::coalesce::Coalesce;
use crate::tls::names;

/// How long a TLS handshake may take before the connection is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// An outbound connection may sit unused for hours; TCP keepalive notices when a firewall
/// or a dead peer silently dropped it (then the station dials again).
fn keep_alive(tcp: &TcpStream) {
    let keepalive = socket2::TcpKeepalive::new()
        .with_time(Duration::from_secs(60))
        .with_interval(Duration::from_secs(10))
        .with_retries(3);
    if let Err(e) = socket2::SockRef::from(tcp).set_tcp_keepalive(&keepalive) {
        warn!("cannot turn on TCP keepalive: {e}");
    }
}

/// Who is on the other end of a [`Conn`]: seen by services as a request extension.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    pub addr: Option<SocketAddr>,
    /// The peer's Railyard name, when the listener was told which names to expect.
    pub name: Option<String>,
}

/// A TCP connection after a successful TLS handshake.
pub struct Conn {
    io: TlsStream<TcpStream>,
    /// Bytes read ahead to confirm the server accepted us, not yet consumed.
    early: Vec<u8>,
    peer: Peer,
    /// Dropped with the connection: tells an outbound dialer to dial again.
    on_close: Option<oneshot::Sender<()>>,
}

impl Conn {
    pub fn peer(&self) -> &Peer {
        &self.peer
    }
}

impl std::fmt::Debug for Conn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Conn").field("peer", &self.peer).finish()
    }
}

impl Connected for Conn {
    type ConnectInfo = Peer;

    fn connect_info(&self) -> Peer {
        self.peer.clone()
    }
}

impl AsyncRead for Conn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if !self.early.is_empty() {
            let n = self.early.len().min(buf.remaining());
            buf.put_slice(&self.early[..n]);
            self.early.drain(..n);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}

fn server_name(name: &str) -> io::Result<ServerName<'static>> {
    ServerName::try_from(name.to_string()).map_err(|e| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("'{name}' is not a name a certificate can carry: {e}"),
        )
    })
}

/// Whom a dialed server must prove to be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expect {
    /// A Railyard party (the hub, a station) by its name: CA, alternative names and common
    /// name (see [`crate::tls::names`]).
    Party,
    /// A host as a researcher typed it: CA and alternative names (ordinary TLS).
    Host,
}

/// Dials `addr` (`host:port`) and completes a TLS handshake in which the server must prove
/// it is the party `name`.
pub async fn dial(addr: &str, name: &str, config: Arc<ClientConfig>) -> io::Result<Conn> {
    dial_expecting(addr, name, config, Expect::Party).await
}

async fn dial_expecting(
    addr: &str,
    name: &str,
    config: Arc<ClientConfig>,
    expect: Expect,
) -> io::Result<Conn> {
    let tcp = TcpStream::connect(addr).await?;
    // Small fragments answer in well under a millisecond; Nagle's delay would dominate.
    tcp.set_nodelay(true)?;
    keep_alive(&tcp);
    let remote = tcp.peer_addr().ok();
    let handshake = TlsConnector::from(config).connect(server_name(name)?, tcp);
    let io = tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake)
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "TLS handshake timed out"))??;
    // rustls checked the CA and the alternative names; the identity is the common name.
    let named = expect == Expect::Host
        || io
            .get_ref()
            .1
            .peer_certificates()
            .is_some_and(|chain| names(&chain[0], name));
    if !named {
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!("the server's certificate is not the certificate of '{name}'"),
        ));
    }
    Ok(Conn {
        io: TlsStream::Client(io),
        early: Vec::new(),
        peer: Peer {
            addr: remote,
            name: Some(name.to_string()),
        },
        on_close: None,
    })
}

/// Dials like [`dial`], then waits for the server's first bytes. In TLS 1.3 the client's
/// handshake completes before the server has checked the client's certificate, so a server
/// that refuses us would otherwise surface later as a vague failure of the first request;
/// here its alert ("unknown CA", "bad certificate") becomes the error. Only for servers
/// that speak first: an HTTP/2 server sends its SETTINGS frame at once.
pub async fn dial_confirmed(
    addr: &str,
    name: &str,
    config: Arc<ClientConfig>,
    expect: Expect,
) -> io::Result<Conn> {
    use tokio::io::AsyncReadExt;
    let mut conn = dial_expecting(addr, name, config, expect).await?;
    let mut early = vec![0u8; 4096];
    let n = match tokio::time::timeout(HANDSHAKE_TIMEOUT, conn.io.read(&mut early)).await {
        Ok(Ok(0)) => {
            return Err(io::Error::new(
                io::ErrorKind::ConnectionAborted,
                "the server closed the connection after the TLS handshake (it refused this \
                 party's certificate?)",
            ));
        }
        Ok(Ok(n)) => n,
        Ok(Err(e)) => return Err(e),
        Err(_) => {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "the server sent nothing after the TLS handshake",
            ));
        }
    };
    early.truncate(n);
    conn.early = early;
    Ok(conn)
}

/// What one connection attempt of a [`connector`] or [`plaintext_connector`] resolves to.
pub type Connecting<C> = Pin<Box<dyn Future<Output = io::Result<TokioIo<Coalesce<C>>>> + Send>>;

/// A connector for tonic's `Endpoint::connect_with_connector` whose every (re)connection is
/// `dial()`, its writes gathered per burst ([`Coalesce`]).
fn coalescing<C, D, F>(
    dial: D,
) -> impl tower::Service<
    http::Uri,
    Response = TokioIo<Coalesce<C>>,
    Error = io::Error,
    Future = Connecting<C>,
> + Clone
+ Send
+ 'static
where
    C: 'static,
    D: Fn() -> F + Clone + Send + 'static,
    F: Future<Output = io::Result<C>> + Send + 'static,
{
    tower::service_fn(move |_: http::Uri| {
        let connecting = dial();
        Box::pin(async move { Ok(TokioIo::new(Coalesce::new(connecting.await?))) }) as Connecting<C>
    })
}

/// A connector for tonic's `Endpoint::connect_with_connector` over plaintext TCP (`railyard
/// local`, tests): every (re)connection dials `addr`, with Nagle's algorithm off and writes
/// gathered per burst ([`Coalesce`]).
pub fn plaintext_connector(
    addr: String,
) -> impl tower::Service<
    http::Uri,
    Response = TokioIo<Coalesce<TcpStream>>,
    Error = io::Error,
    Future = Connecting<TcpStream>,
> + Clone
+ Send
+ 'static {
    coalescing(move || {
        let addr = addr.clone();
        async move {
            let tcp = TcpStream::connect(&addr).await?;
            tcp.set_nodelay(true)?;
            Ok(tcp)
        }
    })
}

/// A connector for tonic's `Endpoint::connect_with_connector`: every (re)connection dials
/// `addr`, expects the server to be `name` (as `expect` says), and waits until the server
/// has accepted this client ([`dial_confirmed`]).
pub fn connector(
    addr: String,
    name: String,
    config: Arc<ClientConfig>,
    expect: Expect,
) -> impl tower::Service<
    http::Uri,
    Response = TokioIo<Coalesce<Conn>>,
    Error = io::Error,
    Future = Connecting<Conn>,
> + Clone
+ Send
+ 'static {
    coalescing(move || {
        let (addr, name, config) = (addr.clone(), name.clone(), Arc::clone(&config));
        async move { dial_confirmed(&addr, &name, config, expect).await }
    })
}

/// Accepts connections on `listener` and completes their TLS handshakes concurrently (a slow
/// or hostile client holds up no one); the stream yields only connections that passed.
/// With `expect` non-empty, each connection's [`Peer::name`] is the first of those names its
/// certificate carries (the server configuration decides whether one must).
pub fn accept(
    listener: TcpListener,
    config: Arc<ServerConfig>,
    expect: Vec<String>,
) -> impl Stream<Item = io::Result<Conn>> + Send + 'static {
    let (tx, rx) = mpsc::channel::<io::Result<Conn>>(16);
    let acceptor = TlsAcceptor::from(config);
    let expect = Arc::new(expect);
    tokio::spawn(async move {
        loop {
            let (tcp, remote) = tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        // Out of file descriptors and the like: back off, keep serving.
                        warn!("accepting a connection failed: {e}");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                },
                _ = tx.closed() => return,
            };
            let _ = tcp.set_nodelay(true);
            keep_alive(&tcp);
            let (acceptor, tx, expect) = (acceptor.clone(), tx.clone(), Arc::clone(&expect));
            tokio::spawn(async move {
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                    Ok(Ok(io)) => {
                        let name =
                            io.get_ref().1.peer_certificates().and_then(|chain| {
                                expect.iter().find(|n| names(&chain[0], n)).cloned()
                            });
                        debug!("TLS connection from {remote} ({name:?})");
                        let conn = Conn {
                            io: TlsStream::Server(io),
                            early: Vec::new(),
                            peer: Peer {
                                addr: Some(remote),
                                name,
                            },
                            on_close: None,
                        };
                        let _ = tx.send(Ok(conn)).await;
                    }
                    // Plaintext, a certificate from another CA, the wrong peer: refused
                    // here, and said where the operator looks.
                    Ok(Err(e)) => warn!("TLS handshake with {remote} refused: {e}"),
                    Err(_) => warn!("TLS handshake with {remote} timed out"),
                }
            });
        }
    });
    ReceiverStream::new(rx)
}

/// Outbound mode: dials the hub at `addr` (which must prove it is `name`) and yields the
/// connection; when that connection ends, dials again, backing off while the hub is
/// unreachable. The station's Flight server runs over the yielded connections.
pub fn dial_out(
    addr: String,
    name: String,
    config: Arc<ClientConfig>,
) -> impl Stream<Item = io::Result<Conn>> + Send + 'static {
    let (tx, rx) = mpsc::channel::<io::Result<Conn>>(1);
    tokio::spawn(async move {
        const FIRST: Duration = Duration::from_millis(100);
        // A connection that lasted this long was a working one: dial the next at once.
        const LASTED: Duration = Duration::from_secs(10);
        let mut backoff = FIRST;
        loop {
            match dial(&addr, &name, Arc::clone(&config)).await {
                Ok(mut conn) => {
                    let (closed_tx, closed_rx) = oneshot::channel();
                    conn.on_close = Some(closed_tx);
                    info!("connected to the hub at {addr}");
                    let since = tokio::time::Instant::now();
                    if tx.send(Ok(conn)).await.is_err() {
                        return;
                    }
                    // Resolves (with an error) when the server drops the connection.
                    let _ = closed_rx.await;
                    if since.elapsed() >= LASTED {
                        info!("connection to the hub at {addr} ended; dialing again");
                        backoff = FIRST;
                        continue;
                    }
                    // Closed at once: in TLS 1.3 that is how a hub refuses our certificate.
                    warn!(
                        "the hub at {addr} closed the connection at once (does it list this \
                         station, with this certificate?); retrying in {backoff:?}"
                    );
                }
                Err(e) => warn!("cannot reach the hub at {addr}: {e}; retrying in {backoff:?}"),
            }
            tokio::select! {
                _ = tokio::time::sleep(backoff) => {}
                _ = tx.closed() => return,
            }
            backoff = (backoff * 2).min(Duration::from_secs(10));
        }
    });
    ReceiverStream::new(rx)
}
