//! The script's timeline: one line per start, kill, exit and disk fill, `<ms> <action>
//! <component> [detail]`, read by the check to count the chaos and to tell a redelivery after a
//! restart from a retry.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{Context, Result};

/// One line of the timeline.
#[derive(Debug, Clone)]
pub(crate) struct Entry {
    /// When, in ms since the epoch.
    pub(crate) at_ms: u64,
    /// `start`, `kill`, `exit`, `fill`, `free`, ...
    pub(crate) action: String,
    /// Which process (or `disk`).
    pub(crate) component: String,
    /// The rest of the line: a first seq, an exit status.
    pub(crate) detail: String,
}

/// The whole timeline, in order.
pub(crate) struct Timeline {
    /// Every line, in the order written.
    pub(crate) entries: Vec<Entry>,
}

impl Timeline {
    pub(crate) fn read(path: &Path) -> Result<Timeline> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read the timeline {}", path.display()))?;
        let mut entries = Vec::new();
        for (n, line) in text.lines().enumerate() {
            let mut parts = line.splitn(4, ' ');
            let (Some(at), Some(action), Some(component)) =
                (parts.next(), parts.next(), parts.next())
            else {
                anyhow::bail!("{}:{}: not a timeline line: {line}", path.display(), n + 1);
            };
            entries.push(Entry {
                at_ms: at
                    .parse()
                    .with_context(|| format!("{}:{}: no time", path.display(), n + 1))?,
                action: action.to_owned(),
                component: component.to_owned(),
                detail: parts.next().unwrap_or("").to_owned(),
            });
        }
        Ok(Timeline { entries })
    }

    /// How often each component was killed, by name.
    pub(crate) fn kills(&self) -> BTreeMap<&str, u64> {
        self.count("kill")
    }

    /// How often each component ended by itself (and was started again), by name.
    pub(crate) fn exits(&self) -> BTreeMap<&str, u64> {
        self.count("exit")
    }

    fn count(&self, action: &str) -> BTreeMap<&str, u64> {
        let mut counts = BTreeMap::new();
        for e in self.entries.iter().filter(|e| e.action == action) {
            *counts.entry(e.component.as_str()).or_default() += 1;
        }
        counts
    }

    /// When the bridge was started, each time, ascending.
    pub(crate) fn bridge_starts(&self) -> Vec<u64> {
        self.entries
            .iter()
            .filter(|e| e.action == "start" && e.component == "bridge")
            .map(|e| e.at_ms)
            .collect()
    }

    /// The first `mock_seq` of each mock server run, ascending.
    pub(crate) fn mock_first_seqs(&self) -> Vec<u64> {
        let mut seqs: Vec<u64> = self
            .entries
            .iter()
            .filter(|e| e.action == "start" && e.component == "mock")
            .filter_map(|e| e.detail.parse().ok())
            .collect();
        seqs.sort_unstable();
        seqs
    }

    /// How long the disk was full, in ms, summed over the fills.
    pub(crate) fn disk_full_ms(&self) -> u64 {
        let mut since = None;
        let mut total = 0;
        for e in self.entries.iter().filter(|e| e.component == "disk") {
            match e.action.as_str() {
                "fill" => since = Some(e.at_ms),
                "free" => total += since.take().map_or(0, |s| e.at_ms.saturating_sub(s)),
                _ => {}
            }
        }
        total
    }

    /// How long the chaos lasted: from the first entry to `end chaos`.
    pub(crate) fn chaos_ms(&self) -> u64 {
        let first = self.entries.first().map_or(0, |e| e.at_ms);
        self.entries
            .iter()
            .find(|e| e.action == "end" && e.component == "chaos")
            .map_or(0, |e| e.at_ms.saturating_sub(first))
    }

    /// The entries within `window_ms` of `at_ms`, for explaining a lost event.
    pub(crate) fn around(&self, at_ms: u64, window_ms: u64) -> Vec<&Entry> {
        self.entries
            .iter()
            .filter(|e| e.at_ms + window_ms >= at_ms && e.at_ms <= at_ms + window_ms)
            .collect()
    }
}
