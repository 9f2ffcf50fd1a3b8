//! The board's process-wide cells: whether a loop (a sink's delivery loop, the ingest) runs, and
//! which config runs with how its reloads went.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use serde::Serialize;

use super::rfc3339;

/// Whether a loop runs, and how often it was restarted after it died.
#[derive(Debug)]
pub(super) struct LoopHealth {
    /// False once the loop ended other than by a shutdown (a panic), until it is restarted.
    alive: AtomicBool,
    /// Restarts after the loop died.
    restarts: AtomicU64,
}

impl Default for LoopHealth {
    /// A loop starts out alive: its task is about to run.
    fn default() -> Self {
        LoopHealth {
            alive: AtomicBool::new(true),
            restarts: AtomicU64::new(0),
        }
    }
}

impl LoopHealth {
    /// Counts a restart.
    #[allow(
        dead_code,
        reason = "called by Bridge::reload and the loop restarts (issue 20, lifecycle part)"
    )]
    pub(super) fn restarted(&self) {
        self.restarts.fetch_add(1, Ordering::Relaxed);
    }

    /// The loop's health now.
    pub(super) fn status(&self) -> LoopStatus {
        LoopStatus {
            alive: self.alive.load(Ordering::Relaxed),
            restarts: self.restarts.load(Ordering::Relaxed),
        }
    }
}

/// A loop's health read at one moment.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct LoopStatus {
    /// Whether the loop runs (or ended with a shutdown); false after it died.
    pub alive: bool,
    /// How often it was restarted after it died.
    pub restarts: u64,
}

/// Held by a loop's task while it runs: dropped without [`AliveGuard::ended_by_shutdown`] (the
/// task panicked, or was dropped midway), it marks the loop dead.
#[derive(Debug)]
#[must_use = "the loop counts as dead as soon as the guard is dropped"]
pub(crate) struct AliveGuard {
    /// The loop's cell.
    health: Arc<LoopHealth>,
    /// Set when the loop ended as it should: the drop then leaves it alive.
    ended_cleanly: bool,
}

impl AliveGuard {
    /// Marks the loop of `health` alive.
    pub(super) fn new(health: Arc<LoopHealth>) -> AliveGuard {
        health.alive.store(true, Ordering::Relaxed);
        AliveGuard {
            health,
            ended_cleanly: false,
        }
    }

    /// The loop ended because the bridge shuts down: it is not dead.
    pub(crate) fn ended_by_shutdown(mut self) {
        self.ended_cleanly = true;
    }
}

impl Drop for AliveGuard {
    fn drop(&mut self) {
        if !self.ended_cleanly {
            self.health.alive.store(false, Ordering::Relaxed);
        }
    }
}

/// The config that runs and how its reloads went, read at one moment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ConfigStatus {
    /// The hash of the config that runs (`Config::hash`); empty before one is set.
    pub hash: String,
    /// Reloads that took effect.
    pub reloads_succeeded: u64,
    /// Reloads refused (an invalid config) or failed: the config before them kept running.
    pub reloads_failed: u64,
    /// When the config that runs was loaded: at start, or by the last successful reload.
    #[serde(serialize_with = "rfc3339")]
    pub last_success: SystemTime,
}

/// Where the board keeps the [`ConfigStatus`]: written at start and by reloads, read by scrapes.
#[derive(Debug)]
pub(crate) struct ConfigCell {
    /// One lock for the four fields, so they read consistently; taken once per reload or scrape.
    inner: Mutex<ConfigStatus>,
}

impl Default for ConfigCell {
    fn default() -> Self {
        ConfigCell {
            inner: Mutex::new(ConfigStatus {
                hash: String::new(),
                reloads_succeeded: 0,
                reloads_failed: 0,
                last_success: SystemTime::now(),
            }),
        }
    }
}

impl ConfigCell {
    /// The config with `hash` was loaded now, at start.
    pub(super) fn loaded(&self, hash: String) {
        let mut status = self.inner.lock().expect("status lock");
        status.hash = hash;
        status.last_success = SystemTime::now();
    }

    /// A reload put the config with `hash` in place now.
    #[allow(
        dead_code,
        reason = "called by Bridge::reload and the loop restarts (issue 20, lifecycle part)"
    )]
    pub(super) fn reloaded(&self, hash: String) {
        self.loaded(hash);
        self.inner.lock().expect("status lock").reloads_succeeded += 1;
    }

    /// A reload was refused or failed.
    #[allow(
        dead_code,
        reason = "called by Bridge::reload and the loop restarts (issue 20, lifecycle part)"
    )]
    pub(super) fn reload_failed(&self) {
        self.inner.lock().expect("status lock").reloads_failed += 1;
    }

    /// The config's status now.
    pub(super) fn status(&self) -> ConfigStatus {
        self.inner.lock().expect("status lock").clone()
    }
}
