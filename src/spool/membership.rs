//! Sinks joining and leaving while the spool is open (a config reload): a new sink starts at
//! the current end, as at open; a sink that leaves no longer holds back reclaiming, and what it
//! had not committed is given up.
//!
//! Registry entries are never removed or moved while the spool is open (readers hold their
//! index): a sink that joins when every bit was handed out takes over, in place, the entry of a
//! sink that is no longer configured.

use tracing::info;

use super::registry::{SinkState, MAX_SINKS};
use super::{Spool, SpoolError};

impl Spool {
    /// Registers `sink` while the spool is open, at the current end: records appended before
    /// are not its. A sink the registry remembers from an earlier configuration keeps its bit
    /// but starts at the end too: what it had not committed was given up when it left. Nothing
    /// changes for a sink already configured. The registry is written at once.
    pub fn add_sink(&self, sink: &str) -> Result<(), SpoolError> {
        let mut state = self.inner.lock();
        if state.configured_sink(sink).is_some() {
            return Ok(());
        }
        let end = state.next_seq - 1;
        let joining = |bit| SinkState {
            name: sink.to_owned(),
            bit,
            committed: end,
            pending: 0,
            lost: 0,
            configured: true,
        };
        let used = |bit: u8| state.sinks.iter().any(|s| s.bit == bit);
        if let Some(known) = state.sinks.iter().position(|s| s.name == sink) {
            let lost = state.sinks[known].lost;
            state.sinks[known] = SinkState {
                lost,
                ..joining(state.sinks[known].bit)
            };
        } else if let Some(bit) = (0..MAX_SINKS as u8).find(|&b| !used(b)) {
            state.sinks.push(joining(bit));
        } else if let Some(gone) = state.sinks.iter().position(|s| !s.configured) {
            info!(sink = %state.sinks[gone].name, bit = state.sinks[gone].bit,
                "forgetting unconfigured sink to reuse its bit");
            state.sinks[gone] = joining(state.sinks[gone].bit);
        } else {
            return Err(SpoolError::TooManySinks {
                count: state.sinks.len() + 1,
                max: MAX_SINKS,
            });
        }
        info!(sink, start = end, "new spool sink starts at the end");
        state.persist(&self.inner.config.dir)
    }

    /// Takes `sink` out of the configured sinks while the spool is open: it no longer holds
    /// back reclaiming, and the records it had not committed are given up. Returns how many
    /// those were (0 for a sink not configured). The registry is written at once.
    pub fn retire_sink(&self, sink: &str) -> Result<u64, SpoolError> {
        let mut state = self.inner.lock();
        let Some(index) = state.configured_sink(sink) else {
            return Ok(0);
        };
        state.sinks[index].configured = false;
        let given_up = state.sinks[index].pending;
        let dir = &self.inner.config.dir;
        state.reclaim(dir)?;
        state.persist(dir)?;
        Ok(given_up)
    }

    /// Records routed to `sink` and not committed yet; `None` for a sink not configured.
    pub fn backlog(&self, sink: &str) -> Option<u64> {
        let state = self.inner.lock();
        state.configured_sink(sink).map(|i| state.sinks[i].pending)
    }
}

#[cfg(test)]
mod tests {
    use crate::spool::test_support::{append_n, config, names, read_seqs};
    use crate::spool::Spool;

    #[test]
    fn a_sink_added_while_open_starts_at_the_end_and_a_retired_one_stops_holding_segments() {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = config(dir.path());
        cfg.segment_bytes = 300;
        let spool = Spool::open(cfg.clone(), &names(&["a"])).unwrap();
        append_n(&spool, 3, spool.mask(&["a"]));
        spool.add_sink("b").unwrap();
        assert_ne!(spool.mask(&["b"]), spool.mask(&["a"]));
        assert_eq!(spool.backlog("b"), Some(0));
        // Two batches, so two segments: one batch always goes into one segment.
        append_n(&spool, 2, spool.mask(&["a", "b"]));
        append_n(&spool, 2, spool.mask(&["a", "b"]));
        let mut b = spool.reader("b").unwrap();
        assert_eq!(
            read_seqs(&mut b),
            [4, 5, 6, 7],
            "only what came after it joined"
        );
        assert_eq!(spool.backlog("b"), Some(4));

        // b leaves with its backlog: a, having committed everything, alone holds segments.
        let mut a = spool.reader("a").unwrap();
        assert_eq!(read_seqs(&mut a).len(), 7);
        a.commit(7).unwrap();
        let segments = spool.stats().segments;
        assert_eq!(spool.retire_sink("b").unwrap(), 4);
        assert_eq!(spool.backlog("b"), None);
        assert_eq!(spool.mask(&["b"]).0, 0, "nothing is routed to it any more");
        assert!(
            spool.stats().segments < segments,
            "its segments were reclaimed"
        );

        // It comes back: its old bit, at the end, without the records it gave up.
        let bit = spool.stats().sinks.iter().position(|s| s.name == "b");
        spool.add_sink("b").unwrap();
        assert_eq!(spool.stats().sinks.iter().position(|s| s.name == "b"), bit);
        assert_eq!(spool.backlog("b"), Some(0));
        drop((a, b));
        drop(spool);
        // The registry was written: a restart knows b and where it is.
        let spool = Spool::open(cfg, &names(&["a", "b"])).unwrap();
        let mut b = spool.reader("b").unwrap();
        assert!(read_seqs(&mut b).is_empty());
    }
}
