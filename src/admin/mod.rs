//! The admin endpoint: what an operator's tools read over HTTP while the bridge runs.
//!
//! - `GET /metrics`: Prometheus text format, read from the status board, the pipeline's
//!   counters and the spool at each scrape (`metrics`).
//! - `GET /healthz`: whether the ingest and every sink's delivery loop run; `GET /readyz`: whether
//!   the tokens `ready_requires` names are subscribed and the spool takes appends; `GET /status`:
//!   all of it as JSON (`report`).
//! - `GET /tap?route=R|sink=S|token=T`: the routed events as JSON lines, live (`tap`).
//! - `POST /reload`: asks whoever holds [`AdminServer::take_reload_requests`]'s receiver to
//!   reload the config, and answers with what it said.
//!
//! The server (`http`) is hyper's HTTP/1 with one request per connection and named bounds on
//! connections, request size, header count and slow clients. It has no authentication: it
//! listens on loopback unless the config says otherwise. `client` is the other side, for the
//! `tap`, `top` and `reload` commands.

pub mod client;
mod http;
mod metrics;
pub mod report;
pub mod settings;
mod tap;

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use crate::delivery::ingest::PipelineStats;
use crate::delivery::tap::TapHub;
use crate::route::redact::Redaction;
use crate::spool::Spool;
use crate::status::StatusBoard;
pub use http::{
    BODY_READ_TIMEOUT, HEADER_READ_TIMEOUT, MAX_REQUEST_BODY_BYTES, MAX_REQUEST_HEADERS,
    MAX_REQUEST_HEAD_BYTES, RELOAD_ANSWER_TIMEOUT, WRITE_STALL_TIMEOUT,
};
pub use settings::{AdminSettings, ReadyRequires};

/// Bounds the connections served at once, taps included; past it a new one is closed at once.
pub const MAX_ADMIN_CONNECTIONS: usize = 64;

/// Bounds the taps streaming at once; past it `/tap` answers 429.
pub const MAX_TAPS: usize = 8;

/// Bounds how long the connections still open at shutdown get to end.
const STOP_GRACE: Duration = Duration::from_secs(1);

/// A `POST /reload`, for the task that reloads the config: it answers on `reply` with what it
/// did (`Ok`) or why it refused (`Err`); the admin endpoint sends that text back.
#[derive(Debug)]
pub struct ReloadRequest {
    /// Where the answer goes.
    pub reply: oneshot::Sender<Result<String, String>>,
}

/// Why the admin endpoint could not start.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    /// The address could not be bound (in use, not an address of this host, no permission).
    #[error("cannot listen on {listen} for the admin endpoint: {source}")]
    Bind {
        /// The address from `admin.listen`.
        listen: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
}

/// What the endpoint reads: the bridge's live state.
#[derive(Debug, Clone)]
pub(crate) struct Sources {
    /// Every token's and sink's state and counters, the loops' health, the config's hash.
    pub(crate) status: StatusBoard,
    /// The pipeline's counters: spooled, dropped, unmatched, whether appends fail.
    pub(crate) stats: Arc<PipelineStats>,
    /// The spool, for its size and each sink's backlog.
    pub(crate) spool: Spool,
    /// The routed events, for taps.
    pub(crate) tap: TapHub,
}

/// What the endpoint needs of the config that runs; replaced whole by a reload
/// ([`AdminServer::apply`]).
#[derive(Debug, Clone, Default)]
pub(crate) struct ConfigView {
    /// Which tokens `/readyz` requires.
    pub(crate) ready_requires: ReadyRequires,
    /// Every token's name.
    pub(crate) tokens: BTreeSet<String>,
    /// Every route's name, for a tap's `route=`.
    pub(crate) routes: BTreeSet<String>,
    /// Every sink's redaction, by name: a tap shows an event as its sinks see it.
    pub(crate) redactions: BTreeMap<String, Redaction>,
}

/// `/tap`'s query string checked against a config with a token `agent`, a route `all of it`
/// and a sink `out`, for the fuzz target `admin_query`.
#[cfg(feature = "fuzzing")]
pub(crate) fn parse_tap_query(query: &str) -> Result<(), String> {
    let view = ConfigView {
        tokens: ["agent".into()].into(),
        routes: ["all of it".into()].into(),
        redactions: [("out".to_owned(), Redaction::default())].into(),
        ..ConfigView::default()
    };
    tap::TapFilter::parse(Some(query), &view).map(|_| ())
}

/// What the server's tasks share.
#[derive(Debug)]
struct Shared {
    /// The bridge's state.
    sources: Sources,
    /// The config that runs, as the endpoint needs it.
    view: Mutex<Arc<ConfigView>>,
    /// Where `POST /reload` sends its requests.
    reloads: mpsc::Sender<ReloadRequest>,
    /// The other end, until someone takes it: until then `/reload` answers that reloading is
    /// not wired.
    unclaimed_reloads: Mutex<Option<mpsc::Receiver<ReloadRequest>>>,
    /// Slots for taps ([`MAX_TAPS`]).
    taps: Arc<Semaphore>,
    /// Cancelled at shutdown: the accept loop and every connection end.
    stop: CancellationToken,
}

impl Shared {
    /// The config that runs, as the endpoint needs it.
    fn view(&self) -> Arc<ConfigView> {
        self.view.lock().expect("admin view lock").clone()
    }
}

/// The running admin endpoint.
#[derive(Debug)]
pub struct AdminServer {
    /// Where it listens (the port a `:0` got).
    addr: SocketAddr,
    /// What its tasks share.
    shared: Arc<Shared>,
    /// The accept loop and every connection.
    tasks: TaskTracker,
}

impl AdminServer {
    /// Binds `listen`, so that a bad address fails the start before anything connects.
    pub(crate) async fn bind(listen: SocketAddr) -> Result<TcpListener, AdminError> {
        TcpListener::bind(listen)
            .await
            .map_err(|source| AdminError::Bind { listen, source })
    }

    /// Serves the endpoint on `listener` until [`AdminServer::stop`].
    pub(crate) fn serve(listener: TcpListener, sources: Sources, view: ConfigView) -> AdminServer {
        let addr = listener
            .local_addr()
            .expect("a bound listener has an address");
        let (reloads, requests) = mpsc::channel(4);
        let shared = Arc::new(Shared {
            sources,
            view: Mutex::new(Arc::new(view)),
            reloads,
            unclaimed_reloads: Mutex::new(Some(requests)),
            taps: Arc::new(Semaphore::new(MAX_TAPS)),
            stop: CancellationToken::new(),
        });
        let tasks = TaskTracker::new();
        tasks.spawn(http::accept(listener, shared.clone(), tasks.clone()));
        info!(%addr, "admin endpoint listening: /metrics /healthz /readyz /status /tap /reload");
        AdminServer {
            addr,
            shared,
            tasks,
        }
    }

    /// Where it listens.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Takes the receiver of `POST /reload`'s requests (once; `None` after). Until it is
    /// taken, `/reload` answers 503: nothing would act on a request.
    pub fn take_reload_requests(&self) -> Option<mpsc::Receiver<ReloadRequest>> {
        self.shared
            .unclaimed_reloads
            .lock()
            .expect("admin reload lock")
            .take()
    }

    /// Puts the view of a reloaded config in place: readiness, tap names and redactions.
    pub(crate) fn apply(&self, view: ConfigView) {
        *self.shared.view.lock().expect("admin view lock") = Arc::new(view);
    }

    /// Stops accepting, ends the connections (taps included), and waits at most a second.
    pub(crate) async fn stop(self) {
        self.shared.stop.cancel();
        self.tasks.close();
        if tokio::time::timeout(STOP_GRACE, self.tasks.wait())
            .await
            .is_err()
        {
            warn!("admin connections did not end within a second of the shutdown; leaving them");
        }
    }
}
