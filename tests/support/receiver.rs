//! A webhook receiver for the HTTP sink: records every request and answers as the test says, on
//! a loopback port, until dropped.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::service::service_fn;
use hyper::{HeaderMap, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use rustls::ServerConfig;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

use super::wait_until;

/// One request as the receiver saw it.
#[derive(Debug, Clone)]
pub(crate) struct Received {
    /// To check the configured method is used.
    pub method: String,
    /// Rendered from the URL template.
    pub path: String,
    /// CloudEvents, custom and signature headers.
    pub headers: HeaderMap,
    /// Exactly as sent, for byte comparisons and signature checks.
    pub body: Bytes,
    /// Arrival time, to measure the pause before a retry.
    pub at: Instant,
}

/// What the receiver answers: status, extra headers.
pub(crate) type Reply = (StatusCode, Vec<(&'static str, String)>);

/// Decides the answer to a request from it and the answers given so far for its path.
pub(crate) type Responder = Arc<dyn Fn(&Received, usize) -> Reply + Send + Sync>;

/// A webhook receiver: records every request and answers as `responder` says.
pub(crate) struct Receiver {
    /// Where it listens.
    pub addr: SocketAddr,
    /// Every request so far, in arrival order.
    pub requests: Arc<Mutex<Vec<Received>>>,
    /// Whether it serves `https://` (else `http://`).
    tls: bool,
    /// TLS handshakes that failed (an untrusted certificate, a missing client certificate).
    pub tls_failures: Arc<AtomicUsize>,
    /// The accept loop, aborted on drop.
    task: tokio::task::JoinHandle<()>,
}

impl Receiver {
    /// Starts on a free port.
    pub(crate) async fn start(responder: Responder) -> Receiver {
        Receiver::start_on(0, responder).await
    }

    /// Starts on a given port (to bring up an endpoint a sink was already pointed at).
    pub(crate) async fn start_on(port: u16, responder: Responder) -> Receiver {
        Receiver::listen(port, responder, None).await
    }

    /// Starts on a free port, serving `https://` with `tls`.
    pub(crate) async fn start_tls(responder: Responder, tls: Arc<ServerConfig>) -> Receiver {
        Receiver::listen(0, responder, Some(TlsAcceptor::from(tls))).await
    }

    /// Listens on `port` (0: a free one), over TLS when `tls` is given.
    async fn listen(port: u16, responder: Responder, tls: Option<TlsAcceptor>) -> Receiver {
        let listener = TcpListener::bind(("127.0.0.1", port)).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let requests: Arc<Mutex<Vec<Received>>> = Arc::default();
        let tls_failures = Arc::new(AtomicUsize::new(0));
        let (seen, failures, secure) = (requests.clone(), tls_failures.clone(), tls.is_some());
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let seen = seen.clone();
                let responder = responder.clone();
                let (tls, failures) = (tls.clone(), failures.clone());
                tokio::spawn(async move {
                    let service =
                        service_fn(move |request| answer(request, seen.clone(), responder.clone()));
                    let http = hyper::server::conn::http1::Builder::new();
                    let _ = match tls {
                        None => http.serve_connection(TokioIo::new(stream), service).await,
                        Some(tls) => match tls.accept(stream).await {
                            Ok(stream) => {
                                http.serve_connection(TokioIo::new(stream), service).await
                            }
                            Err(_) => {
                                failures.fetch_add(1, Ordering::Relaxed);
                                return;
                            }
                        },
                    };
                });
            }
        });
        Receiver {
            addr,
            requests,
            tls: secure,
            tls_failures,
            task,
        }
    }

    /// The URL of `path` on this receiver.
    pub(crate) fn url(&self, path: &str) -> String {
        let scheme = if self.tls { "https" } else { "http" };
        format!("{scheme}://{}{path}", self.addr)
    }

    /// Every request so far, in arrival order.
    pub(crate) fn received(&self) -> Vec<Received> {
        self.requests.lock().unwrap().clone()
    }

    /// How many requests arrived, and how many distinct event ids (`ce-id`) they carried: the
    /// two are equal when no event came twice.
    pub(crate) fn requests_and_distinct_ids(&self) -> (usize, usize) {
        let mut ids: Vec<String> = self
            .received()
            .iter()
            .map(|r| r.headers["ce-id"].to_str().unwrap().to_owned())
            .collect();
        let requests = ids.len();
        ids.sort_unstable();
        ids.dedup();
        (requests, ids.len())
    }

    /// Waits until at least `n` requests arrived; returns all of them.
    pub(crate) async fn wait_for(&self, n: usize) -> Vec<Received> {
        wait_until(&format!("{n} requests at the receiver"), || {
            self.requests.lock().unwrap().len() >= n
        })
        .await;
        self.received()
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Replys from a fixed queue, then 200.
pub(crate) fn scripted(answers: Vec<Reply>) -> Responder {
    let queue = Arc::new(Mutex::new(VecDeque::from(answers)));
    Arc::new(move |_, _| {
        queue
            .lock()
            .unwrap()
            .pop_front()
            .unwrap_or((StatusCode::OK, vec![]))
    })
}

/// Records one request and answers it as `responder` decides.
async fn answer(
    request: Request<hyper::body::Incoming>,
    seen: Arc<Mutex<Vec<Received>>>,
    responder: Responder,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let (parts, body) = request.into_parts();
    let body = body
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let received = Received {
        method: parts.method.to_string(),
        path: parts.uri.path().to_owned(),
        headers: parts.headers,
        body,
        at: Instant::now(),
    };
    let (status, extra) = {
        let mut all = seen.lock().unwrap();
        let before = all.iter().filter(|r| r.path == received.path).count();
        all.push(received.clone());
        responder(&received, before)
    };
    let mut response = Response::new(Full::new(Bytes::new()));
    *response.status_mut() = status;
    for (name, value) in extra {
        response.headers_mut().insert(name, value.parse().unwrap());
    }
    Ok(response)
}
