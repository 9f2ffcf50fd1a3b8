//! What a mock connection reads and writes: the handshake (connection.rs) makes it, the blast
//! (blast.rs) writes to it.

use tokio::net::TcpStream;
use tokio_rustls::server::TlsStream;
use tokio_tungstenite::WebSocketStream;
use tokio_util::either::Either;

/// A connection's byte stream: plain TCP, or TLS over it when the server serves `wss://`.
pub(super) type Stream = Either<TcpStream, TlsStream<TcpStream>>;

/// A server-side WebSocket.
pub(super) type Socket = WebSocketStream<Stream>;
