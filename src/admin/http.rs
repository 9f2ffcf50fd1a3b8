//! The admin endpoint's HTTP server: hyper's HTTP/1, one request per connection, and the bounds
//! that keep a client (or many) from taking more than a little memory and a few sockets:
//! [`MAX_ADMIN_CONNECTIONS`](super::MAX_ADMIN_CONNECTIONS), [`MAX_REQUEST_HEAD_BYTES`],
//! [`MAX_REQUEST_HEADERS`], [`MAX_REQUEST_BODY_BYTES`], and timeouts for a client that sends
//! or reads too slowly.

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, LengthLimitError, Limited};
use hyper::body::Incoming;
use hyper::header::{HeaderValue, ALLOW, CACHE_CONTROL, CONTENT_TYPE};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{oneshot, OwnedSemaphorePermit, Semaphore};
use tokio::time::{sleep, Sleep};
use tokio_util::task::TaskTracker;
use tracing::{debug, warn};

use super::report::{readiness_problems, Snapshot, StatusReport};
use super::{metrics, tap, ReloadRequest, Shared, MAX_ADMIN_CONNECTIONS};

/// Bounds a request's line and headers, in bytes; past it the answer is 431.
pub const MAX_REQUEST_HEAD_BYTES: usize = 8 << 10;

/// Bounds a request's headers, in number; past it the answer is 431.
pub const MAX_REQUEST_HEADERS: usize = 32;

/// Bounds a request's body: no endpoint takes one, so only a little is read; past it the
/// answer is 413.
pub const MAX_REQUEST_BODY_BYTES: usize = 1 << 10;

/// Bounds how long a client may take to send its request line and headers.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(5);

/// Bounds how long a client may take to send its body.
pub const BODY_READ_TIMEOUT: Duration = Duration::from_secs(5);

/// Bounds how long a client may leave the answer unread (a write that cannot go on): then the
/// connection is closed. A tap whose client reads slowly misses events long before this.
pub const WRITE_STALL_TIMEOUT: Duration = Duration::from_secs(10);

/// Bounds the wait for the answer to `POST /reload`.
pub const RELOAD_ANSWER_TIMEOUT: Duration = Duration::from_secs(120);

/// Bounds what hyper buffers of a connection's input: a request head at most, and a little.
const READ_BUFFER_BYTES: usize = 2 * MAX_REQUEST_HEAD_BYTES;

/// How long the accept loop waits after a failed accept (out of file descriptors).
const ACCEPT_RETRY: Duration = Duration::from_millis(100);

/// The body of every answer.
type AnswerBody = BoxBody<Bytes, Infallible>;

/// Accepts connections until the endpoint stops, serving each on its own task while fewer than
/// [`MAX_ADMIN_CONNECTIONS`] are open; past that a new one is closed at once.
pub(super) async fn accept(listener: TcpListener, shared: Arc<Shared>, tasks: TaskTracker) {
    let slots = Arc::new(Semaphore::new(MAX_ADMIN_CONNECTIONS));
    loop {
        let accepted = tokio::select! {
            () = shared.stop.cancelled() => return,
            accepted = listener.accept() => accepted,
        };
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(e) => {
                warn!(error = %e, "the admin endpoint cannot accept a connection");
                tokio::select! {
                    () = shared.stop.cancelled() => return,
                    () = sleep(ACCEPT_RETRY) => continue,
                }
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            debug!("admin endpoint: {MAX_ADMIN_CONNECTIONS} connections open already; closing a new one");
            continue;
        };
        tasks.spawn(serve(stream, shared.clone(), slot));
    }
}

/// Serves one connection: one request, then it closes.
async fn serve(stream: TcpStream, shared: Arc<Shared>, _slot: OwnedSemaphorePermit) {
    let io = TokioIo::new(StallGuard {
        stream,
        stalled: None,
    });
    let service = {
        let shared = shared.clone();
        service_fn(move |request| answer(shared.clone(), request))
    };
    let mut builder = http1::Builder::new();
    builder
        .keep_alive(false)
        .max_headers(MAX_REQUEST_HEADERS)
        .max_header_size(MAX_REQUEST_HEAD_BYTES)
        .max_buf_size(READ_BUFFER_BYTES)
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT);
    let connection = builder.serve_connection(io, service);
    tokio::select! {
        served = connection => if let Err(e) = served {
            debug!(error = %e, "an admin connection ended with an error");
        },
        () = shared.stop.cancelled() => {}
    }
}

/// Answers one request.
async fn answer(
    shared: Arc<Shared>,
    request: Request<Incoming>,
) -> Result<Response<AnswerBody>, Infallible> {
    let (parts, body) = request.into_parts();
    if let Err(refused) = read_body(body).await {
        return Ok(refused);
    }
    let path = parts.uri.path();
    let answer = match (&parts.method, path) {
        (&Method::GET, "/metrics") => {
            let snapshot = Snapshot::take(&shared.sources);
            text(
                StatusCode::OK,
                metrics::CONTENT_TYPE,
                metrics::encode(&snapshot),
            )
        }
        (&Method::GET, "/healthz") => verdict(shared.sources.status.health_problems(), "ok"),
        (&Method::GET, "/readyz") => {
            let tokens = shared.sources.status.tokens();
            let writable = !shared
                .sources
                .stats
                .append_failing
                .load(std::sync::atomic::Ordering::Relaxed);
            verdict(
                readiness_problems(&shared.view(), &tokens, writable),
                "ready",
            )
        }
        (&Method::GET, "/status") => status(&shared),
        (&Method::GET, "/tap") => match tap::start(&shared, parts.uri.query()) {
            Ok(body) => {
                let mut answer = Response::new(body.boxed());
                let headers = answer.headers_mut();
                headers.insert(
                    CONTENT_TYPE,
                    HeaderValue::from_static("application/x-ndjson"),
                );
                headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
                answer
            }
            Err(refused @ tap::TapRefused::TooMany) => {
                plain(StatusCode::TOO_MANY_REQUESTS, refused.to_string())
            }
            Err(refused) => plain(StatusCode::BAD_REQUEST, refused.to_string()),
        },
        (&Method::POST, "/reload") => reload(&shared).await,
        (_, "/metrics" | "/healthz" | "/readyz" | "/status" | "/tap") => not_allowed("GET"),
        (_, "/reload") => not_allowed("POST"),
        _ => plain(
            StatusCode::NOT_FOUND,
            "not found: the admin endpoint serves GET /metrics, /healthz, /readyz, /status, /tap \
             and POST /reload\n",
        ),
    };
    Ok(answer)
}

/// Reads the request's body, which no endpoint uses, within [`MAX_REQUEST_BODY_BYTES`] and
/// [`BODY_READ_TIMEOUT`]; the answer to send instead when it is too large or too slow.
async fn read_body(body: Incoming) -> Result<(), Response<AnswerBody>> {
    let limited = Limited::new(body, MAX_REQUEST_BODY_BYTES);
    match tokio::time::timeout(BODY_READ_TIMEOUT, limited.collect()).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) if e.downcast_ref::<LengthLimitError>().is_some() => Err(plain(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!(
                "the request body is larger than {MAX_REQUEST_BODY_BYTES} bytes \
                 (MAX_REQUEST_BODY_BYTES); no endpoint takes a body\n"
            ),
        )),
        Ok(Err(_)) => Err(plain(
            StatusCode::BAD_REQUEST,
            "the request body could not be read\n",
        )),
        Err(_) => Err(plain(
            StatusCode::REQUEST_TIMEOUT,
            format!("the request body took longer than {BODY_READ_TIMEOUT:?}\n"),
        )),
    }
}

/// `/status`: the snapshot as JSON, with the health and readiness verdicts.
fn status(shared: &Shared) -> Response<AnswerBody> {
    let snapshot = Snapshot::take(&shared.sources);
    let unhealthy = shared.sources.status.health_problems();
    let not_ready = readiness_problems(&shared.view(), &snapshot.tokens, snapshot.spool_writable);
    let report = StatusReport::new(&snapshot, unhealthy, not_ready);
    let mut json = serde_json::to_string_pretty(&report).expect("the report serializes");
    json.push('\n');
    text(StatusCode::OK, "application/json", json)
}

/// `POST /reload`: hands the request to the task that reloads and answers with what it said:
/// 200 with what changed, 422 with why the new config was refused, 503 when nothing reloads,
/// 504 when the answer does not come within [`RELOAD_ANSWER_TIMEOUT`].
async fn reload(shared: &Shared) -> Response<AnswerBody> {
    let unwired = shared
        .unclaimed_reloads
        .lock()
        .expect("admin reload lock")
        .is_some();
    if unwired || shared.reloads.is_closed() {
        return plain(
            StatusCode::SERVICE_UNAVAILABLE,
            "reload is not wired in this process: nothing acts on POST /reload\n",
        );
    }
    let (reply, answered) = oneshot::channel();
    let asked = async {
        shared.reloads.send(ReloadRequest { reply }).await.ok()?;
        answered.await.ok()
    };
    let answer = tokio::select! {
        answer = tokio::time::timeout(RELOAD_ANSWER_TIMEOUT, asked) => answer,
        () = shared.stop.cancelled() => {
            return plain(StatusCode::SERVICE_UNAVAILABLE, "the bridge is shutting down\n");
        }
    };
    match answer {
        Ok(Some(Ok(done))) => plain(StatusCode::OK, with_newline(done)),
        Ok(Some(Err(refused))) => plain(StatusCode::UNPROCESSABLE_ENTITY, with_newline(refused)),
        Ok(None) => plain(
            StatusCode::SERVICE_UNAVAILABLE,
            "the reload task went away without an answer\n",
        ),
        Err(_) => plain(
            StatusCode::GATEWAY_TIMEOUT,
            format!("the reload did not answer within {RELOAD_ANSWER_TIMEOUT:?}; see the log\n"),
        ),
    }
}

/// `text` ending with a line feed.
fn with_newline(mut text: String) -> String {
    if !text.ends_with('\n') {
        text.push('\n');
    }
    text
}

/// 200 with `ok` when there is no problem, else 503 with one line per problem.
fn verdict(problems: Vec<String>, ok: &str) -> Response<AnswerBody> {
    if problems.is_empty() {
        return plain(StatusCode::OK, format!("{ok}\n"));
    }
    let mut body = format!("not {ok}:\n");
    for problem in problems {
        body.push_str("- ");
        body.push_str(&problem);
        body.push('\n');
    }
    plain(StatusCode::SERVICE_UNAVAILABLE, body)
}

/// 405, naming the method the path takes.
fn not_allowed(allowed: &'static str) -> Response<AnswerBody> {
    let mut answer = plain(
        StatusCode::METHOD_NOT_ALLOWED,
        format!("this path takes {allowed} only\n"),
    );
    answer
        .headers_mut()
        .insert(ALLOW, HeaderValue::from_static(allowed));
    answer
}

/// An answer in plain text.
fn plain(status: StatusCode, body: impl Into<Bytes>) -> Response<AnswerBody> {
    text(status, "text/plain; charset=utf-8", body)
}

/// An answer of `content_type`.
fn text(
    status: StatusCode,
    content_type: &'static str,
    body: impl Into<Bytes>,
) -> Response<AnswerBody> {
    let mut answer = Response::new(Full::new(body.into()).boxed());
    *answer.status_mut() = status;
    answer
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    answer
}

/// A connection's socket that gives up on a client that stops reading: a write that cannot go
/// on for [`WRITE_STALL_TIMEOUT`] fails, and hyper closes the connection.
struct StallGuard {
    /// The client's socket.
    stream: TcpStream,
    /// Runs while a write waits for the client to read; reset by every write that goes on.
    stalled: Option<Pin<Box<Sleep>>>,
}

impl StallGuard {
    /// After a write that could not go on: fails once it has waited [`WRITE_STALL_TIMEOUT`].
    fn waiting<T>(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<T>> {
        let timer = self
            .stalled
            .get_or_insert_with(|| Box::pin(sleep(WRITE_STALL_TIMEOUT)));
        match timer.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "the admin client stopped reading",
            ))),
            Poll::Pending => Poll::Pending,
        }
    }

    /// A write's outcome: a write that went on resets the stall timer.
    fn wrote<T>(
        &mut self,
        cx: &mut Context<'_>,
        written: Poll<io::Result<T>>,
    ) -> Poll<io::Result<T>> {
        match written {
            Poll::Ready(done) => {
                self.stalled = None;
                Poll::Ready(done)
            }
            Poll::Pending => self.waiting(cx),
        }
    }
}

impl AsyncRead for StallGuard {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for StallGuard {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let written = Pin::new(&mut self.stream).poll_write(cx, buf);
        self.wrote(cx, written)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let written = Pin::new(&mut self.stream).poll_write_vectored(cx, bufs);
        self.wrote(cx, written)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let flushed = Pin::new(&mut self.stream).poll_flush(cx);
        self.wrote(cx, flushed)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}
