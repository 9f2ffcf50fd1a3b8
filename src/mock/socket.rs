//! What a mock connection reads and writes: the handshake (connection.rs) makes it, the blast
//! (blast.rs) writes to it, the REST API (rest.rs) answers on it.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::server::TlsStream;
use tokio_tungstenite::WebSocketStream;
use tokio_util::either::Either;

/// A connection's byte stream: plain TCP, or TLS over it when the server serves `wss://`.
pub(super) type Wire = Either<TcpStream, TlsStream<TcpStream>>;

/// The byte stream after the request head was read to tell a WebSocket upgrade from a REST
/// request: the head is read again first.
pub(super) type Stream = Rewind<Wire>;

/// A server-side WebSocket.
pub(super) type Socket = WebSocketStream<Stream>;

/// A stream whose first bytes (already read from it) are read again before the rest.
pub(super) struct Rewind<S> {
    /// The bytes read before, given back first.
    prefix: Vec<u8>,
    /// How much of `prefix` has been given back.
    given: usize,
    /// The stream the rest comes from, and writes go to.
    inner: S,
}

impl<S> Rewind<S> {
    /// `inner`, with `prefix` read again first.
    pub(super) fn new(prefix: Vec<u8>, inner: S) -> Rewind<S> {
        Rewind {
            prefix,
            given: 0,
            inner,
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Rewind<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.given < this.prefix.len() {
            let rest = &this.prefix[this.given..];
            let n = rest.len().min(buf.remaining());
            buf.put_slice(&rest[..n]);
            this.given += n;
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Rewind<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::AsyncReadExt;

    use super::*;

    #[tokio::test]
    async fn the_prefix_is_read_before_the_rest() {
        let mut stream = Rewind::new(b"GET /".to_vec(), &b" HTTP/1.1"[..]);
        let mut all = String::new();
        stream.read_to_string(&mut all).await.unwrap();
        assert_eq!(all, "GET / HTTP/1.1");
    }
}
