//! Keeps one `TokenTask` running per configured token.
//!
//! The token set can change while running ([`Supervisor::apply`]): new tokens start, removed ones
//! stop, changed ones restart, and the others are not touched. A panic in one token's task is
//! caught and that task alone is restarted.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Semaphore;
use tokio::time::sleep;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::error;

use crate::source::cable::{TokenTask, MAX_CONCURRENT_HANDSHAKES};
use crate::source::sender::EventSender;
use crate::source::settings::{CableSettings, TokenSpec};
use crate::status::{ReconnectReason, StatusBoard, TokenState};

/// Pause before restarting a task that panicked, so a panic loop cannot spin a core.
const RESTART_AFTER_PANIC: Duration = Duration::from_secs(1);

/// Owns the token tasks.
pub struct Supervisor {
    /// Shared by every token task.
    settings: Arc<CableSettings>,
    /// Into the pipeline; each task holds a clone.
    events: EventSender,
    /// Where every token's state is reported.
    status: StatusBoard,
    /// Tracks every token task so shutdown can wait for them.
    tracker: TaskTracker,
    /// Parent of every token's own cancellation: cancelling it stops all sources.
    cancel: CancellationToken,
    /// What runs now, by token name.
    running: HashMap<Arc<str>, Running>,
    /// Bounds handshakes in progress over all tokens (see [`MAX_CONCURRENT_HANDSHAKES`]).
    handshakes: Arc<Semaphore>,
}

/// One token whose task runs.
struct Running {
    /// The spec the task was started with, to tell whether a reload changed it.
    spec: Arc<TokenSpec>,
    /// Stops this token alone.
    cancel: CancellationToken,
}

/// What [`Supervisor::apply`] did, by token name.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ApplyReport {
    /// Tokens that were not running and now are.
    pub started: Vec<String>,
    /// Tokens that are no longer configured; their sockets are closed.
    pub stopped: Vec<String>,
    /// Tokens whose spec changed; their sockets were closed and opened again.
    pub restarted: Vec<String>,
}

impl Supervisor {
    /// A supervisor with no token running yet; [`Supervisor::apply`] starts them. Cancelling
    /// `cancel` stops every token.
    pub fn new(
        settings: Arc<CableSettings>,
        events: impl Into<EventSender>,
        status: StatusBoard,
        cancel: CancellationToken,
    ) -> Self {
        Supervisor {
            settings,
            events: events.into(),
            status,
            tracker: TaskTracker::new(),
            cancel,
            running: HashMap::new(),
            handshakes: Arc::new(Semaphore::new(MAX_CONCURRENT_HANDSHAKES)),
        }
    }

    /// Makes the running set equal to `tokens`, touching only what differs.
    pub fn apply(&mut self, tokens: &[TokenSpec]) -> ApplyReport {
        let mut report = ApplyReport::default();
        let wanted: HashMap<&str, &TokenSpec> = tokens.iter().map(|t| (&*t.name, t)).collect();
        let gone: Vec<Arc<str>> = self
            .running
            .keys()
            .filter(|name| !wanted.contains_key(&***name))
            .cloned()
            .collect();
        for name in gone {
            self.stop(&name);
            self.status.unregister(&name);
            report.stopped.push(name.to_string());
        }
        for spec in tokens {
            match self.running.get(&spec.name) {
                Some(running) if *running.spec == *spec => {}
                Some(_) => {
                    self.stop(&spec.name);
                    // A fresh status cell: the stopped task's last words must not land on it.
                    self.status.unregister(&spec.name);
                    self.start(spec.clone());
                    report.restarted.push(spec.name.to_string());
                }
                None => {
                    self.start(spec.clone());
                    report.started.push(spec.name.to_string());
                }
            }
        }
        report
    }

    /// Stops every token task and waits for them to end.
    pub async fn shutdown(mut self) {
        self.cancel.cancel();
        self.running.clear();
        self.tracker.close();
        self.tracker.wait().await;
    }

    /// Cancels one token's task; its end is awaited only at shutdown.
    fn stop(&mut self, name: &str) {
        if let Some(running) = self.running.remove(name) {
            running.cancel.cancel();
        }
    }

    /// Starts one token's task, restarting it after a panic until it is cancelled.
    fn start(&mut self, spec: TokenSpec) {
        let spec = Arc::new(spec);
        let cancel = self.cancel.child_token();
        self.running.insert(
            spec.name.clone(),
            Running {
                spec: spec.clone(),
                cancel: cancel.clone(),
            },
        );
        let settings = self.settings.clone();
        let events = self.events.clone();
        let status = self.status.register(&spec.name);
        let handshakes = self.handshakes.clone();
        self.tracker.spawn(async move {
            loop {
                let task = TokenTask {
                    spec: spec.clone(),
                    settings: settings.clone(),
                    events: events.clone(),
                    status: status.clone(),
                    cancel: cancel.clone(),
                    handshakes: handshakes.clone(),
                };
                match tokio::spawn(task.run()).await {
                    Ok(()) => break,
                    Err(e) if e.is_panic() => {
                        error!(token = %spec.name, "token task panicked; restarting it");
                        status.fail(TokenState::BackingOff, "task panicked; restarting");
                        status.reconnecting(ReconnectReason::TaskPanicked);
                        tokio::select! {
                            _ = cancel.cancelled() => break,
                            _ = sleep(RESTART_AFTER_PANIC) => {}
                        }
                    }
                    Err(_) => break,
                }
            }
        });
    }
}
