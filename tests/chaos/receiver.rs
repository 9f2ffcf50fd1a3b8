//! Role `receiver`: the webhook destination. Every request is one line in its record (time,
//! `ce-id`, token, the mock's number) written before the 200 goes out, so a request the
//! bridge counts as delivered is always in the record, and a kill between the write and the
//! answer shows as a duplicate.
//!
//! ```text
//! receiver --listen 127.0.0.1:PORT --record FILE
//! ```

use std::fs::File;
use std::io::Write;
use std::sync::{Arc, Mutex};

use anyhow::{Context, Result};
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use serde::{Deserialize, Serialize};

use crate::args::Args;
use crate::now_ms;

/// One request as the record keeps it.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct Received {
    /// When it arrived, in ms since the epoch.
    pub(crate) at_ms: u64,
    /// `ce-id`: the event id.
    pub(crate) id: String,
    /// `ce-chatwoottoken`: the token that read it.
    pub(crate) token: String,
    /// `mock_seq` from the body.
    pub(crate) mock_seq: Option<u64>,
}

pub(crate) async fn run(args: &Args) -> Result<()> {
    let listen = args.required("listen")?;
    let path = args.path("record")?;
    let record = File::options()
        .create(true)
        .append(true)
        .open(&path)
        .with_context(|| format!("cannot open {}", path.display()))?;
    let record = Arc::new(Mutex::new(record));
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("cannot listen on {listen}"))?;
    loop {
        let (stream, _) = listener.accept().await?;
        let record = record.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let record = record.clone();
                async move { handle(req, &record).await }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                .await;
        });
    }
}

/// Writes the request's line, then answers 200; a request that cannot be recorded gets a 500,
/// so the bridge retries it.
async fn handle(
    req: hyper::Request<hyper::body::Incoming>,
    record: &Mutex<File>,
) -> Result<hyper::Response<Full<Bytes>>, std::convert::Infallible> {
    let header = |name: &str| {
        req.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_owned()
    };
    let (id, token) = (header("ce-id"), header("ce-chatwoottoken"));
    let body = req.into_body().collect().await.map(|b| b.to_bytes());
    let Ok(body) = body else {
        return Ok(answer(500));
    };
    let received = Received {
        at_ms: now_ms(),
        id,
        token,
        mock_seq: std::str::from_utf8(&body).ok().and_then(crate::mock_seq),
    };
    let mut line = serde_json::to_vec(&received).expect("a record line serializes");
    line.push(b'\n');
    // One write per line: whole lines in the file even when the process is killed.
    let written = record.lock().expect("record lock").write_all(&line);
    Ok(answer(if written.is_ok() { 200 } else { 500 }))
}

fn answer(status: u16) -> hyper::Response<Full<Bytes>> {
    let mut response = hyper::Response::new(Full::new(Bytes::new()));
    *response.status_mut() = hyper::StatusCode::from_u16(status).expect("a valid status");
    response
}
