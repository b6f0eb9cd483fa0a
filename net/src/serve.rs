//! Serving one gRPC service on a stream of connections: how the hub's Flight SQL front and
//! every station run, whether the connections come from a plaintext listener (`railyard
//! local`), a TLS listener, or an outbound station's own dialer.

use std::future::Future;
use std::io;
use std::time::Duration;

use futures::{Stream, StreamExt};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio_stream::wrappers::TcpListenerStream;
use tonic::service::Routes;
use tonic::transport::server::Connected;

use crate::coalesce::Coalesce;

/// Plaintext connections from `listener`, with Nagle's algorithm off: small fragments answer
/// in well under a millisecond, and Nagle's delay would dominate.
pub fn plaintext(listener: TcpListener) -> impl Stream<Item = io::Result<TcpStream>> {
    TcpListenerStream::new(listener).map(|conn| {
        conn.and_then(|stream| {
            stream.set_nodelay(true)?;
            Ok(stream)
        })
    })
}

/// Serves `routes` on `incoming` until `shutdown` resolves. HTTP/2 keepalive notices a peer
/// that vanished (power loss, a cut cable); an outbound station then dials again.
pub async fn serve<I, IO, IE>(
    routes: Routes,
    incoming: I,
    shutdown: impl Future<Output = ()>,
) -> Result<(), tonic::transport::Error>
where
    I: Stream<Item = Result<IO, IE>>,
    IO: AsyncRead + AsyncWrite + Connected + Unpin + Send + 'static,
    IE: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    // Each answer's headers, message and trailers leave in one write (`coalesce`).
    let incoming = incoming.map(|conn| conn.map(Coalesce::new));
    tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .http2_keepalive_timeout(Some(Duration::from_secs(20)))
        .add_routes(routes)
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await
}
