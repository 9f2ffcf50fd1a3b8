//! Panics on demand, for the tests of what the bridge does when one of its loops panics (as
//! `spool::inject_fault` makes a disk fail): a test arms a site, and the next time the code
//! passes it, it panics, once. Sites are keyed by what only one test uses (a spool directory, a
//! sink name), since tests run in parallel.

use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// Where a loop can be made to panic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum PanicSite {
    /// The ingest appending to the spool in this directory, with a batch of events in hand.
    Ingest(PathBuf),
    /// The delivery loop of the sink of this name, with events taken and not delivered yet.
    SinkLoop(String),
}

/// The sites armed and not passed yet.
static ARMED: Mutex<Vec<PanicSite>> = Mutex::new(Vec::new());

fn armed() -> std::sync::MutexGuard<'static, Vec<PanicSite>> {
    ARMED.lock().unwrap_or_else(|e| e.into_inner())
}

/// Makes the next pass through `site` panic.
pub(crate) fn panic_once(site: PanicSite) {
    armed().push(site);
}

/// Panics if `site` is armed, disarming it first.
pub(crate) fn maybe_panic(site: &PanicSite) {
    let mut armed = armed();
    if let Some(i) = armed.iter().position(|s| s == site) {
        armed.remove(i);
        drop(armed);
        panic!("injected panic at {site:?}");
    }
}

/// Whether `site` is still armed (the code has not passed it yet).
pub(crate) fn is_armed(site: &PanicSite) -> bool {
    armed().contains(site)
}

/// [`PanicSite::Ingest`] for the spool in `dir`.
pub(crate) fn ingest(dir: &Path) -> PanicSite {
    PanicSite::Ingest(dir.to_owned())
}
