//! The board's process-wide cells: whether a loop (a sink's delivery loop, the ingest) runs, and
//! which config runs with how its reloads went.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
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
    /// The loop died (panicked): counted as a restart, and not alive until it runs again.
    pub(super) fn died(&self) {
        self.restarts.fetch_add(1, Ordering::Relaxed);
        self.alive.store(false, Ordering::Relaxed);
    }

    /// Whether the loop runs now; returns whether that changed.
    pub(super) fn set_alive(&self, alive: bool) -> bool {
        self.alive.swap(alive, Ordering::Relaxed) != alive
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
    /// Why the last reload was refused, every problem; `None` once a reload takes effect.
    pub last_error: Option<String>,
}

/// Where the board keeps the [`ConfigStatus`]: written at start and by reloads, read by scrapes.
#[derive(Debug)]
pub(crate) struct ConfigCell {
    /// One lock for the fields, so they read consistently; taken once per reload or scrape.
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
                last_error: None,
            }),
        }
    }
}

impl ConfigCell {
    /// The config with `hash` was loaded now, at start.
    pub(super) fn loaded(&self, hash: &str) {
        let mut status = self.inner.lock().expect("status lock");
        status.hash = hash.to_owned();
        status.last_success = SystemTime::now();
    }

    /// A reload put the config with `hash` in place now.
    pub(super) fn reloaded(&self, hash: &str) {
        let mut status = self.inner.lock().expect("status lock");
        status.hash = hash.to_owned();
        status.last_success = SystemTime::now();
        status.last_error = None;
        status.reloads_succeeded += 1;
    }

    /// A reload was refused or failed, for `error`.
    pub(super) fn reload_failed(&self, error: &str) {
        let mut status = self.inner.lock().expect("status lock");
        status.reloads_failed += 1;
        status.last_error = Some(error.to_owned());
    }

    /// The config's status now.
    pub(super) fn status(&self) -> ConfigStatus {
        self.inner.lock().expect("status lock").clone()
    }
}
