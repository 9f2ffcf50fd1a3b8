//! How much of the spool is used, and by whom: read by the admin endpoint at each scrape, under
//! the lock for as long as it takes to sum a few numbers per segment and per sink.

use super::Spool;

/// The spool's size and every configured sink's backlog, read at one moment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpoolUsage {
    /// Total size of the segment files.
    pub bytes: u64,
    /// The cap on it (`spool.max_bytes`).
    pub max_bytes: u64,
    /// Every configured sink's backlog, in the registry's order.
    pub sinks: Vec<SinkBacklog>,
}

/// One sink's backlog in the spool.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SinkBacklog {
    /// The sink's configured name.
    pub name: String,
    /// Records routed to it and not committed yet.
    pub events: u64,
    /// The spool's bytes after its committed cursor, when it has a backlog: whole segments
    /// past the one holding the cursor, and that one in proportion to the records left in it.
    /// Records routed only to other sinks in between count too: they are what this sink keeps
    /// from being reclaimed.
    pub bytes: u64,
}

impl Spool {
    /// The spool's size and each configured sink's backlog now.
    pub fn usage(&self) -> SpoolUsage {
        let state = self.inner.lock();
        let sinks = state
            .sinks
            .iter()
            .filter(|s| s.configured)
            .map(|sink| {
                let bytes = if sink.pending == 0 {
                    0
                } else {
                    bytes_after(&state, sink.committed)
                };
                SinkBacklog {
                    name: sink.name.clone(),
                    events: sink.pending,
                    bytes,
                }
            })
            .collect();
        SpoolUsage {
            bytes: state.total_bytes,
            max_bytes: self.inner.config.max_bytes,
            sinks,
        }
    }
}

/// The bytes of the records after seq `committed`: the segments after the one that holds the
/// next seq whole, and that one in proportion to its records past `committed` (the records of
/// a segment are not indexed by offset).
fn bytes_after(state: &super::state::State, committed: u64) -> u64 {
    let next = committed.saturating_add(1).max(state.oldest_base());
    if next >= state.next_seq {
        return 0;
    }
    let first = state.locate(next);
    let segment = state.segments[first];
    let records = state.segment_end(first).saturating_sub(segment.base).max(1);
    let left = state.segment_end(first).saturating_sub(next);
    let partial = (u128::from(segment.bytes) * u128::from(left) / u128::from(records)) as u64;
    let whole: u64 = state.segments.iter().skip(first + 1).map(|s| s.bytes).sum();
    partial + whole
}

#[cfg(test)]
mod tests {
    use crate::spool::test_support::{append_n, config};
    use crate::spool::{SinkMask, Spool};

    #[test]
    fn a_sinks_backlog_is_what_it_has_not_committed() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(config(dir.path()), &["a".into(), "b".into()]).unwrap();
        let (a, b) = (spool.mask(&["a"]), spool.mask(&["b"]));
        append_n(&spool, 10, SinkMask(a.0 | b.0));
        append_n(&spool, 10, a);
        let usage = spool.usage();
        assert_eq!(usage.max_bytes, spool.max_bytes());
        let (usage_a, usage_b) = (&usage.sinks[0], &usage.sinks[1]);
        assert_eq!((usage_a.name.as_str(), usage_a.events), ("a", 20));
        assert_eq!((usage_b.name.as_str(), usage_b.events), ("b", 10));
        assert_eq!(
            usage_a.bytes, usage.bytes,
            "a has committed nothing: all of it"
        );
        assert_eq!(usage_b.bytes, usage.bytes, "b's cursor is at the start too");
        let mut reader = spool.reader("b").unwrap();
        reader.commit(20).unwrap();
        let usage = spool.usage();
        assert_eq!((usage.sinks[1].events, usage.sinks[1].bytes), (0, 0));
        let mut reader = spool.reader("a").unwrap();
        reader.commit(10).unwrap();
        let usage = spool.usage();
        assert_eq!(usage.sinks[0].events, 10);
        let half = usage.bytes / 2;
        assert!(
            usage.sinks[0].bytes.abs_diff(half) <= 1,
            "ten of twenty equal records: half the bytes ({half}): {usage:?}"
        );
    }
}
