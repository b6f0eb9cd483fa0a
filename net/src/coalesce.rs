//! One write per burst of HTTP/2 frames.
//!
//! HTTP/2 (h2, under tonic) writes what it has queued and flushes each time its connection
//! task runs. A gRPC call's parts are queued by different tasks: a request's headers by the
//! connection, its message by the body task once the new stream has send capacity; a
//! response's headers and message by the stream's task, its trailers when that task runs
//! again. Each part then leaves in a `writev` of its own, and on loopback or a LAN every
//! write costs both ends a system call, a wake-up and a pass through the TCP stack, which is
//! most of what a small fragment costs the hub per station (issue 24: four writes per
//! station per query, two of them 10 to 50 bytes).
//!
//! [`Coalesce`] holds written bytes until a flush, and answers the first flush of a burst by
//! yielding once: the connection task is woken at once, after the tasks already ready on the
//! runtime have run, and whatever they queued meanwhile (the message after its headers, the
//! trailers after the message) leaves in the same write. It adds no timer and no delay
//! beyond that one turn of the scheduler; a burst larger than [`LIMIT`] is written as it
//! comes.

use std::io::{self, IoSlice};
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tonic::transport::server::Connected;

/// Bytes held before they are written without waiting for a flush.
pub const LIMIT: usize = 64 * 1024;

/// A byte stream whose writes are gathered until a flush (see the module docs).
#[derive(Debug)]
pub struct Coalesce<IO> {
    io: IO,
    /// Bytes taken by `poll_write`, from `sent` on not yet written to `io`.
    held: Vec<u8>,
    sent: usize,
    /// The current burst's flush has yielded once.
    yielded: bool,
}

impl<IO> Coalesce<IO> {
    pub fn new(io: IO) -> Self {
        Self {
            io,
            held: Vec::new(),
            sent: 0,
            yielded: false,
        }
    }
}

impl<IO: AsyncWrite + Unpin> Coalesce<IO> {
    /// Writes every held byte to `io`; the next burst starts afresh.
    fn poll_drain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.sent < self.held.len() {
            let n = ready!(Pin::new(&mut self.io).poll_write(cx, &self.held[self.sent..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.sent += n;
        }
        self.held.clear();
        self.sent = 0;
        self.yielded = false;
        Poll::Ready(Ok(()))
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for Coalesce<IO> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Coalesce<IO> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.poll_write_vectored(cx, &[IoSlice::new(buf)])
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let len: usize = bufs.iter().map(|b| b.len()).sum();
        if self.held.len() + len > LIMIT {
            // A large burst: what is held goes first, then this write, as it comes.
            ready!(self.poll_drain(cx))?;
            if len > LIMIT {
                return Pin::new(&mut self.io).poll_write_vectored(cx, bufs);
            }
        }
        for b in bufs {
            self.held.extend_from_slice(b);
        }
        Poll::Ready(Ok(len))
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.held.is_empty() {
            return Pin::new(&mut self.io).poll_flush(cx);
        }
        if !self.yielded {
            // Once per burst: let the tasks that are ready queue what they have.
            self.yielded = true;
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        ready!(self.poll_drain(cx))?;
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.poll_drain(cx))?;
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

impl<IO: Connected> Connected for Coalesce<IO> {
    type ConnectInfo = IO::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.io.connect_info()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// Bytes reach the peer in order, whole, after a flush; small writes before it are one
    /// write on the socket; a write beyond the limit passes through; shutdown sends what
    /// is held.
    #[tokio::test]
    async fn bytes_arrive_in_order_after_a_flush_and_on_shutdown() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let reader = tokio::spawn(async move {
            let (mut peer, _) = listener.accept().await.unwrap();
            let mut all = Vec::new();
            peer.read_to_end(&mut all).await.unwrap();
            all
        });
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let mut io = Coalesce::new(tcp);
        let mut want = Vec::new();
        for i in 0..10u8 {
            let part = vec![i; 10 + usize::from(i)];
            io.write_all(&part).await.unwrap();
            want.extend_from_slice(&part);
        }
        assert_eq!(io.held.len(), want.len(), "small writes are held");
        io.flush().await.unwrap();
        assert!(io.held.is_empty(), "a flush writes them");
        let big: Vec<u8> = (0..3 * LIMIT).map(|i| (i % 251) as u8).collect();
        io.write_all(b"head").await.unwrap();
        io.write_all(&big).await.unwrap();
        io.write_all(b"tail").await.unwrap();
        want.extend_from_slice(b"head");
        want.extend_from_slice(&big);
        want.extend_from_slice(b"tail");
        io.shutdown().await.unwrap();
        assert_eq!(reader.await.unwrap(), want);
    }

    /// The first flush of a burst yields once and wakes its task at once; the second
    /// writes. Nothing held: a flush is the stream's own.
    #[tokio::test]
    async fn the_first_flush_of_a_burst_yields_once() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (mut peer, _) = listener.accept().await.unwrap();
        let mut io = Coalesce::new(tcp);
        let woken = std::sync::Arc::new(Woken::default());
        let waker = std::task::Waker::from(std::sync::Arc::clone(&woken));
        let mut cx = Context::from_waker(&waker);
        assert!(
            Pin::new(&mut io).poll_flush(&mut cx).is_ready(),
            "nothing held"
        );
        assert!(matches!(
            Pin::new(&mut io).poll_write(&mut cx, b"headers"),
            Poll::Ready(Ok(7))
        ));
        assert!(Pin::new(&mut io).poll_flush(&mut cx).is_pending());
        assert!(
            woken.0.load(std::sync::atomic::Ordering::SeqCst),
            "woken at once"
        );
        assert!(matches!(
            Pin::new(&mut io).poll_write(&mut cx, b"+message"),
            Poll::Ready(Ok(8))
        ));
        assert!(matches!(
            Pin::new(&mut io).poll_flush(&mut cx),
            Poll::Ready(Ok(()))
        ));
        let mut got = [0u8; 15];
        peer.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"headers+message");
    }

    #[derive(Default)]
    struct Woken(std::sync::atomic::AtomicBool);

    impl std::task::Wake for Woken {
        fn wake(self: std::sync::Arc<Self>) {
            self.0.store(true, std::sync::atomic::Ordering::SeqCst);
        }
    }
}
