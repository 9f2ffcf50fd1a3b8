//! The webhook consumer: a hyper server answering 200 to every POST.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use anyhow::Result;
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use tokio::sync::Notify;

use super::Patience;
use crate::tally::Tally;

/// What every connection's handler shares with the waiting loop.
#[derive(Clone)]
struct Shared {
    /// Where each request's body is counted.
    tally: Arc<Mutex<Tally>>,
    /// Woken when every expected event arrived.
    done: Arc<Notify>,
    /// Requests so far: the waiting loop ends when it stops moving.
    activity: Arc<AtomicU64>,
}

impl Shared {
    async fn handle(
        &self,
        req: hyper::Request<hyper::body::Incoming>,
    ) -> Result<hyper::Response<Full<Bytes>>, std::convert::Infallible> {
        let body = req
            .into_body()
            .collect()
            .await
            .map(|b| b.to_bytes())
            .unwrap_or_default();
        self.activity.fetch_add(1, Ordering::Relaxed);
        let mut t = self.tally.lock().expect("tally lock");
        t.record(&body);
        if t.done() {
            self.done.notify_one();
        }
        Ok(hyper::Response::new(Full::new(Bytes::new())))
    }
}

pub(super) async fn consume(tally: &Arc<Mutex<Tally>>, patience: Patience) -> Result<()> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    println!("READY http://{}/hook", listener.local_addr()?);
    let shared = Shared {
        tally: tally.clone(),
        done: Arc::new(Notify::new()),
        activity: Arc::new(AtomicU64::new(0)),
    };
    tokio::spawn(serve(listener, shared.clone()));
    let mut seen = 0;
    loop {
        tokio::select! {
            _ = shared.done.notified() => break,
            _ = tokio::time::sleep_until(patience.deadline) => break,
            _ = tokio::time::sleep(patience.idle) => {
                let now = shared.activity.load(Ordering::Relaxed);
                if now == seen && now > 0 { break; }
                seen = now;
            }
        }
    }
    Ok(())
}

async fn serve(listener: tokio::net::TcpListener, shared: Shared) {
    while let Ok((stream, _)) = listener.accept().await {
        let shared = shared.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let shared = shared.clone();
                async move { shared.handle(req).await }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                .await;
        });
    }
}
