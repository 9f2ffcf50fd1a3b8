//! The backlog counts (`pending` in `sinks.json`) across process crashes: each sink's backlog
//! must stay the number of its records that a reader at its cursor still reads, however many
//! times the process is killed while segments are being deleted.
//!
//! A running spool deletes a segment as soon as the cursors in memory are past it, while the
//! cursor file is written lazily; a crash in between leaves a cursor file whose cursor (and
//! backlog) still counts records of a file that no longer exists.

use proptest::prelude::*;

use super::test_support::{
    append_n, append_one_by_one, backlog, config, crash, hold_back_cursor_writes, names, read_all,
    read_seqs, REC,
};
use super::{Spool, SpoolConfig, WhenFull};

/// A spool in segments of three 100-byte records for the sinks `fast` and `slow`.
fn config_in_threes(dir: &std::path::Path) -> SpoolConfig {
    let mut cfg = config(dir);
    cfg.segment_bytes = 3 * REC;
    cfg
}

/// The backlog the spool reports for `sink`, and the records a reader at its cursor reads.
fn backlog_and_unread(spool: &Spool, sink: &str) -> (u64, u64) {
    let mut reader = spool.reader(sink).unwrap();
    (backlog(spool, sink), read_all(&mut reader).len() as u64)
}

#[test]
fn a_crash_after_segments_were_reclaimed_leaves_the_backlog_exact() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config_in_threes(dir.path());
    let spool = Spool::open(cfg.clone(), &names(&["fast", "slow"])).unwrap();
    let both = spool.mask(&["fast", "slow"]);
    append_one_by_one(&spool, 10, both);
    let (mut fast, mut slow) = (spool.reader("fast").unwrap(), spool.reader("slow").unwrap());
    assert_eq!(read_all(&mut fast).len(), 10);
    fast.commit(10).unwrap();
    assert_eq!(read_all(&mut slow).len(), 10);
    slow.commit(2).unwrap();
    // The cursor file now says: slow committed 2, 8 records in its backlog.
    spool.sync().unwrap();
    hold_back_cursor_writes(&spool);
    // The slow sink delivers up to 7: the segments of 1-3 and 4-6 go, in memory only.
    slow.commit(7).unwrap();
    assert_eq!(spool.stats().segments, 2);
    assert_eq!(backlog(&spool, "slow"), 3);
    crash(spool, vec![fast, slow]);

    let spool = Spool::open(cfg, &names(&["fast", "slow"])).unwrap();
    let mut slow = spool.reader("slow").unwrap();
    assert_eq!(
        read_seqs(&mut slow),
        vec![7, 8, 9, 10],
        "7 is delivered again (its commit was lost), 3 to 6 are gone"
    );
    let stats = spool.stats();
    let slow_stats = stats.sinks.iter().find(|s| s.name == "slow").unwrap();
    assert_eq!(
        slow_stats.backlog, 4,
        "the backlog counts what the sink reads"
    );
    assert_eq!(
        slow_stats.backlog,
        stats.last_seq - slow_stats.committed,
        "every record is the slow sink's: its backlog is what lies past its cursor"
    );
    assert_eq!(backlog(&spool, "fast"), 0);
}

#[test]
fn a_crash_after_a_segment_was_pushed_out_leaves_the_backlog_exact() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config_in_threes(dir.path());
    cfg.max_bytes = 10 * REC;
    cfg.when_full = WhenFull::DeadLetter;
    let spool = Spool::open(cfg.clone(), &names(&["slow"])).unwrap();
    let mask = spool.mask(&["slow"]);
    append_one_by_one(&spool, 9, mask);
    spool.sync().unwrap();
    hold_back_cursor_writes(&spool);
    // The oldest segment (1-3) goes to the slow sink's dead letters.
    let mut eviction = spool.evict_oldest().unwrap().unwrap();
    while eviction.next_record().unwrap().is_some() {}
    eviction.finish().unwrap();
    assert_eq!(backlog(&spool, "slow"), 6);
    crash(spool, Vec::new());

    let spool = Spool::open(cfg, &names(&["slow"])).unwrap();
    assert_eq!(backlog_and_unread(&spool, "slow"), (6, 6));
    let stats = spool.stats();
    assert_eq!(stats.sinks[0].committed, 3, "1-3 are in the dead letters");
}

/// One round of the repeated-crash run: records appended to both sinks, how far the slow one
/// delivers before the cursor file is written, how far after it (in memory only), then a crash.
#[derive(Debug, Clone)]
struct Round {
    /// Records appended this round, one append each, so segments roll as under a trickle.
    appended: usize,
    /// Of the slow sink's unread records, how many it delivers before the cursor file is
    /// written.
    before_write: proptest::sample::Index,
    /// Of the rest, how many it delivers after (in memory only).
    after_write: proptest::sample::Index,
    /// Whether the fast sink delivers everything too (else it stays where it was).
    fast_keeps_up: bool,
}

fn round() -> impl Strategy<Value = Round> {
    (
        1..12usize,
        any::<proptest::sample::Index>(),
        any::<proptest::sample::Index>(),
        any::<bool>(),
    )
        .prop_map(
            |(appended, before_write, after_write, fast_keeps_up)| Round {
                appended,
                before_write,
                after_write,
                fast_keeps_up,
            },
        )
}

/// Commits the first `how_many` of the records the reader has read and not committed
/// (`unread`), and forgets them.
fn deliver(reader: &mut super::SpoolReader, unread: &mut Vec<u64>, how_many: usize) {
    if how_many == 0 {
        return;
    }
    let upto = unread[how_many - 1];
    reader.commit(upto).unwrap();
    unread.drain(..how_many);
}

/// Rounds of appends and deliveries, each ended by a crash: after every restart each sink's
/// backlog is what its reader reads, which for sinks every record goes to is the last seq less
/// its cursor.
fn restart_repeatedly(rounds: Vec<Round>) -> Result<(), TestCaseError> {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config_in_threes(dir.path());
    for round in rounds {
        let spool = Spool::open(cfg.clone(), &names(&["fast", "slow"])).unwrap();
        for sink in ["fast", "slow"] {
            let stats = spool.stats();
            let s = stats.sinks.iter().find(|s| s.name == sink).unwrap();
            prop_assert_eq!(
                s.backlog,
                stats.last_seq - s.committed,
                "{} after a restart",
                sink
            );
        }
        let both = spool.mask(&["fast", "slow"]);
        append_one_by_one(&spool, round.appended, both);
        let mut fast = spool.reader("fast").unwrap();
        let mut slow = spool.reader("slow").unwrap();
        let mut fast_unread = read_seqs(&mut fast);
        if round.fast_keeps_up {
            let all = fast_unread.len();
            deliver(&mut fast, &mut fast_unread, all);
        }
        let mut unread = read_seqs(&mut slow);
        let n = round.before_write.index(unread.len() + 1);
        deliver(&mut slow, &mut unread, n);
        spool.sync().unwrap();
        hold_back_cursor_writes(&spool);
        let n = round.after_write.index(unread.len() + 1);
        deliver(&mut slow, &mut unread, n);
        crash(spool, vec![fast, slow]);
    }
    let spool = Spool::open(cfg, &names(&["fast", "slow"])).unwrap();
    for sink in ["fast", "slow"] {
        let (backlog, unread) = backlog_and_unread(&spool, sink);
        prop_assert_eq!(backlog, unread, "{} at the end", sink);
    }
    // The fast sink delivers everything; the spool holds then only what the slow one needs.
    let mut fast = spool.reader("fast").unwrap();
    if let Some(&last) = read_seqs(&mut fast).last() {
        fast.commit(last).unwrap();
    }
    prop_assert_eq!(backlog(&spool, "fast"), 0);
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, failure_persistence: None, ..ProptestConfig::default() })]
    #[test]
    fn the_backlog_stays_exact_across_repeated_crashes(rounds in prop::collection::vec(round(), 1..30)) {
        restart_repeatedly(rounds)?;
    }
}

#[test]
fn a_sink_whose_cursor_file_is_behind_a_deleted_segment_resumes_after_it() {
    // The cursor moves up to the oldest record kept, so that the reader does not report the
    // records below as pushed out or dropped: they were delivered before the crash.
    let dir = tempfile::tempdir().unwrap();
    let cfg = config_in_threes(dir.path());
    let spool = Spool::open(cfg.clone(), &names(&["a"])).unwrap();
    let mask = spool.mask(&["a"]);
    append_n(&spool, 3, mask);
    append_n(&spool, 3, mask);
    hold_back_cursor_writes(&spool);
    let mut a = spool.reader("a").unwrap();
    assert_eq!(read_all(&mut a).len(), 6);
    a.commit(4).unwrap();
    crash(spool, vec![a]);

    let spool = Spool::open(cfg, &names(&["a"])).unwrap();
    let stats = spool.stats();
    assert_eq!((stats.sinks[0].committed, stats.sinks[0].backlog), (3, 3));
}
