//! What a token knows of its conversations' activity, from the socket, from the stall check's
//! REST reads and from backfills (`ActivityTracker`), and the spans the socket may have missed
//! (`Gap`): the vocabulary the backfill and the stall check share.

use std::collections::HashMap;
use std::time::{Duration, Instant, SystemTime};

use serde_json::{Map, Value};

use crate::status::TokenReporter;

/// Added before the gap's start when asking which conversations changed: the last healthy
/// moment is known to the second, and Chatwoot's `updated_at` is written by background jobs.
pub const BACKFILL_MARGIN: Duration = Duration::from_secs(30);

/// Bounds the conversations whose latest activity a token remembers; past it the one with the
/// oldest activity is forgotten (a forgotten conversation is then judged as one never seen: by
/// Chatwoot's clock against the previous check's).
pub const MAX_TRACKED_CONVERSATIONS: usize = 4096;

/// Bounds the window a check asks for, in check intervals (four times `stall_after`).
pub const MAX_WINDOW_INTERVALS: u32 = 16;

/// A time the socket delivered nothing: down between two subscriptions, or stalled.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Gap {
    /// The last ping or event while confirmed, or the earliest activity of a stall.
    pub(crate) start: SystemTime,
    /// When the subscription was confirmed again, or the stall noticed.
    pub(crate) end: SystemTime,
}

impl Gap {
    /// How long it lasted.
    pub(crate) fn length(&self) -> Duration {
        self.end.duration_since(self.start).unwrap_or_default()
    }
}

/// How far a conversation's activity went: its `last_activity_at` and its latest message id.
/// Chatwoot writes the time in whole seconds, so messages of one second differ only by id.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct Activity {
    /// `last_activity_at` (Chatwoot's clock, whole seconds).
    pub at: u64,
    /// The latest message id shown with it; 0 when none.
    pub message: u64,
}

/// Activity the REST API showed and the cable has not delivered yet.
#[derive(Debug, Clone, Copy)]
struct Pending {
    /// How far the conversation's activity went.
    activity: Activity,
    /// When a check first showed it: a stall is measured from here, on this machine's clock.
    seen_at: Instant,
}

/// Activity the cable has owed for `stall_after`: what a stall backfills.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Overdue {
    /// The earliest overdue `last_activity_at` (Chatwoot's clock, whole seconds): the stalled
    /// span starts there.
    pub(crate) earliest: u64,
    /// How many conversations it is in.
    pub(crate) conversations: usize,
}

/// Where the checks of the current subscription are.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
enum Checks {
    /// No confirmed subscription: nothing is checked.
    #[default]
    Down,
    /// Started afresh at this moment, not checked since: at a confirm (what moved before is a
    /// gap's, which a backfill reads) or after a window too large to read. Only activity after
    /// this second counts.
    StartedAt(SystemTime),
    /// Checked last at this moment.
    Checked(SystemTime),
}

impl Overdue {
    /// The stalled span found at `now`: from the earliest overdue activity (Chatwoot's clock;
    /// a time past ours, or past what a `SystemTime` holds, starts now) to `now`.
    pub(crate) fn span(&self, now: SystemTime) -> Gap {
        let start = SystemTime::UNIX_EPOCH
            .checked_add(Duration::from_secs(self.earliest))
            .map_or(now, |start| start.min(now));
        Gap { start, end: now }
    }
}

/// What one token knows of its conversations' activity, from the cable and from the checks.
#[derive(Debug, Default)]
pub(crate) struct ActivityTracker {
    /// Per conversation display id, the latest activity seen from either side, so that a check
    /// tells activity that moved from activity already known.
    known: HashMap<u64, Activity>,
    /// Per conversation display id, activity a check showed that the cable has not delivered.
    pending: HashMap<u64, Pending>,
    /// Where the checks are: what a check compares with, and whether one runs.
    checks: Checks,
    /// When the current stall was noticed; `None` while the cable delivers.
    stalled_since: Option<SystemTime>,
}

impl ActivityTracker {
    /// The subscription is confirmed (again) at `at`: the checks start afresh from there.
    pub(crate) fn resubscribed(&mut self, at: SystemTime) {
        self.checks = Checks::StartedAt(at);
        self.pending.clear();
    }

    /// The socket ended: no check until the subscription is confirmed again.
    pub(crate) fn unsubscribed(&mut self) {
        self.checks = Checks::Down;
    }

    /// A backfill handed over `activity` of `conversation`: known, and no longer waited for
    /// from the socket. A stall stays on: only the socket delivering ends it.
    pub(crate) fn covered(&mut self, conversation: u64, activity: Activity) {
        self.remember(conversation, activity);
        if self
            .pending
            .get(&conversation)
            .is_some_and(|p| p.activity <= activity)
        {
            self.pending.remove(&conversation);
        }
    }

    /// The earliest activity a check showed and the cable has not delivered: a reconnect's gap
    /// and a restart's resume point start no later.
    pub(crate) fn earliest_pending(&self) -> Option<SystemTime> {
        let earliest = self.pending.values().map(|p| p.activity.at).min()?;
        SystemTime::UNIX_EPOCH.checked_add(Duration::from_secs(earliest))
    }

    /// The check at `now` could not read its window (too many changes): the next one starts
    /// from `now`, counting only what moves after it.
    pub(crate) fn skip_window(&mut self, now: SystemTime) {
        if self.checks != Checks::Down {
            self.checks = Checks::StartedAt(now);
        }
    }

    /// Whether a check runs now: only while the subscription is confirmed.
    pub(crate) fn checking(&self) -> bool {
        self.checks != Checks::Down
    }

    /// The cable delivered activity `activity` of `conversation`. Returns how long the stall
    /// lasted when this ends one, which `status` then shows.
    pub(crate) fn delivered(
        &mut self,
        conversation: u64,
        activity: Activity,
        now: SystemTime,
        status: &TokenReporter,
    ) -> Option<Duration> {
        self.remember(conversation, activity);
        if self
            .pending
            .get(&conversation)
            .is_some_and(|p| p.activity <= activity)
        {
            self.pending.remove(&conversation);
        }
        let since = self.stalled_since.take()?;
        status.stall_over();
        Some(now.duration_since(since).unwrap_or_default())
    }

    /// The window a check asks for: since the previous check or the confirm (or one
    /// interval), plus [`BACKFILL_MARGIN`] for Chatwoot's clock and its background writes. At
    /// most [`MAX_WINDOW_INTERVALS`] intervals: after checks failed for long, a longer list
    /// could outgrow what one check reads and keep every later one failing.
    pub(crate) fn window(&self, now: SystemTime, interval: Duration) -> u64 {
        let since = match self.checks {
            Checks::StartedAt(at) | Checks::Checked(at) => now.duration_since(at).ok(),
            Checks::Down => None,
        };
        let since = since
            .unwrap_or(interval)
            .min(interval * MAX_WINDOW_INTERVALS);
        (since + BACKFILL_MARGIN).as_secs() + 1
    }

    /// Whether `activity` of a conversation whose latest known activity is `known` moved since
    /// the last check. The first check after a confirm counts only activity after the confirm's
    /// second; a later one counts a conversation never seen when its activity is no older than
    /// the previous check minus [`BACKFILL_MARGIN`] (an old conversation listed for another
    /// change has not moved).
    fn moved(&self, known: Option<&Activity>, activity: Activity) -> bool {
        match self.checks {
            Checks::Down => false,
            Checks::StartedAt(at) => {
                activity.at > unix_seconds(at) && known.is_none_or(|known| activity > *known)
            }
            Checks::Checked(at) => match known {
                Some(known) => activity > *known,
                None => activity.at >= unix_seconds(at).saturating_sub(BACKFILL_MARGIN.as_secs()),
            },
        }
    }

    /// A check at `now` listed `listed` (conversation, activity). Activity that moved (see
    /// [`ActivityTracker::moved`]) and the cable has not delivered becomes pending; what has
    /// been pending `stall_after` is returned and forgotten (it is handed to a backfill once).
    pub(crate) fn observe(
        &mut self,
        listed: impl IntoIterator<Item = (u64, Activity)>,
        now: (SystemTime, Instant),
        stall_after: Duration,
    ) -> Option<Overdue> {
        let (wall, instant) = now;
        if self.checks == Checks::Down {
            // The socket ended while the check was in flight.
            return None;
        }
        for (conversation, activity) in listed {
            let moved = self.moved(self.known.get(&conversation), activity);
            self.remember(conversation, activity);
            if moved {
                let pending = self.pending.entry(conversation).or_insert(Pending {
                    activity,
                    seen_at: instant,
                });
                pending.activity = pending.activity.max(activity);
            }
        }
        self.checks = Checks::Checked(wall);
        self.take_overdue(instant, stall_after)
    }

    /// Removes and returns what has been pending for `stall_after` at `now`.
    fn take_overdue(&mut self, now: Instant, stall_after: Duration) -> Option<Overdue> {
        let mut overdue: Option<Overdue> = None;
        self.pending.retain(|_, pending| {
            if now.duration_since(pending.seen_at) < stall_after {
                return true;
            }
            let at = pending.activity.at;
            let earliest = overdue.map_or(at, |o| o.earliest.min(at));
            let conversations = overdue.map_or(0, |o| o.conversations) + 1;
            overdue = Some(Overdue {
                earliest,
                conversations,
            });
            false
        });
        overdue
    }

    /// A stall was found at `now`: true when it is a new one (none was on), which `status`
    /// then shows; under the same lock as [`ActivityTracker::delivered`], so a delivery racing
    /// it cannot leave the status stalled.
    pub(crate) fn stall(&mut self, now: SystemTime, status: &TokenReporter) -> bool {
        if self.stalled_since.is_some() {
            return false;
        }
        self.stalled_since = Some(now);
        status.stalled(now);
        true
    }

    /// Records `activity` as the latest known of `conversation`, forgetting the conversation
    /// with the oldest activity when [`MAX_TRACKED_CONVERSATIONS`] are known.
    fn remember(&mut self, conversation: u64, activity: Activity) {
        if let Some(known) = self.known.get_mut(&conversation) {
            *known = (*known).max(activity);
            return;
        }
        if self.known.len() >= MAX_TRACKED_CONVERSATIONS {
            let oldest = self.known.iter().min_by_key(|(_, a)| **a).map(|(c, _)| *c);
            if let Some(oldest) = oldest {
                self.known.remove(&oldest);
                self.pending.remove(&oldest);
            }
        }
        self.known.insert(conversation, activity);
    }
}

/// Seconds since the Unix epoch of `at`.
fn unix_seconds(at: SystemTime) -> u64 {
    at.duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs()
}

/// The display id and activity of a listed conversation (`last_activity_at`, or `timestamp`
/// which Chatwoot fills with it, and the id of the last message it lists); `None` for one
/// without.
pub(crate) fn listed_activity(conversation: &Map<String, Value>) -> Option<(u64, Activity)> {
    let id = conversation.get("id")?.as_u64()?;
    let at = ["last_activity_at", "timestamp"]
        .iter()
        .find_map(|key| conversation.get(*key)?.as_f64())?;
    let message = conversation
        .get("messages")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|m| m.get("id")?.as_u64())
        .max()
        .unwrap_or(0);
    Some((
        id,
        Activity {
            at: at.max(0.0) as u64,
            message,
        },
    ))
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    const STALL_AFTER: Duration = Duration::from_secs(120);

    fn at(seconds: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(seconds)
    }

    /// A status cell to report to.
    fn status() -> TokenReporter {
        crate::status::StatusBoard::new().register(&Arc::from("agent"))
    }

    /// Activity at `seconds` with message `message`.
    fn act(seconds: u64, message: u64) -> Activity {
        Activity {
            at: seconds,
            message,
        }
    }

    #[test]
    fn the_first_check_after_a_subscribe_counts_only_what_moved_after_it() {
        let mut tracker = ActivityTracker::default();
        let start = Instant::now();
        assert!(!tracker.checking(), "nothing is checked before a confirm");
        tracker.resubscribed(at(1_000));
        assert!(tracker.checking());
        assert_eq!(tracker.window(at(1_002), Duration::from_secs(30)), 33);
        // 1 and 2 moved before the confirm (a gap's business); 3 after it.
        let listed = [(1, act(990, 0)), (2, act(1_000, 0)), (3, act(1_001, 0))];
        assert_eq!(
            tracker.observe(listed, (at(1_002), start), STALL_AFTER),
            None
        );
        assert_eq!(tracker.pending.keys().copied().collect::<Vec<_>>(), [3]);
        let later = start + STALL_AFTER * 2;
        let overdue = tracker.observe(listed, (at(1_240), later), STALL_AFTER);
        assert_eq!(
            overdue,
            Some(Overdue {
                earliest: 1_001,
                conversations: 1
            })
        );
        tracker.unsubscribed();
        assert!(!tracker.checking());
    }

    #[test]
    fn activity_the_cable_never_delivers_is_overdue_after_stall_after() {
        let mut tracker = ActivityTracker::default();
        tracker.resubscribed(at(995));
        let start = Instant::now();
        tracker.observe([(1, act(990, 0))], (at(1_000), start), STALL_AFTER);
        // Conversation 1 moved and 3 is new; 2 is new but its activity predates the last
        // check by more than the margin (an old conversation listed for another change).
        let listed = [(1, act(1_010, 0)), (2, act(900, 0)), (3, act(1_020, 0))];
        assert_eq!(
            tracker.observe(
                listed,
                (at(1_030), start + Duration::from_secs(30)),
                STALL_AFTER
            ),
            None
        );
        assert_eq!(tracker.pending.len(), 2);
        let overdue = tracker.observe(
            listed,
            (at(1_150), start + Duration::from_secs(150)),
            STALL_AFTER,
        );
        assert_eq!(
            overdue,
            Some(Overdue {
                earliest: 1_010,
                conversations: 2
            })
        );
        assert!(
            tracker.pending.is_empty(),
            "overdue activity is handed over once"
        );
        let board = crate::status::StatusBoard::new();
        let status = board.register(&Arc::from("agent"));
        assert!(tracker.stall(at(1_150), &status));
        assert!(
            !tracker.stall(at(1_160), &status),
            "one stall until the cable delivers"
        );
        assert!(board.token("agent").unwrap().stalled_since.is_some());
        assert_eq!(
            tracker.delivered(1, act(1_200, 0), at(1_210), &status),
            Some(Duration::from_secs(60))
        );
        assert_eq!(
            tracker.delivered(1, act(1_201, 0), at(1_211), &status),
            None
        );
        assert_eq!(
            board.token("agent").unwrap().stalled_since,
            None,
            "the delivery ended it"
        );
    }

    #[test]
    fn activity_the_cable_delivers_is_never_overdue() {
        let mut tracker = ActivityTracker::default();
        tracker.resubscribed(at(995));
        let start = Instant::now();
        tracker.observe([(1, act(990, 0))], (at(1_000), start), STALL_AFTER);
        // Delivered before the check shows it...
        tracker.delivered(1, act(1_010, 0), at(1_011), &status());
        // ...and after (the REST API can be quicker than the broadcast).
        tracker.observe(
            [(1, act(1_010, 0)), (2, act(1_020, 0))],
            (at(1_030), start + Duration::from_secs(30)),
            STALL_AFTER,
        );
        tracker.delivered(2, act(1_020, 0), at(1_031), &status());
        let overdue = tracker.observe(
            [(1, act(1_010, 0)), (2, act(1_020, 0))],
            (at(1_200), start + Duration::from_secs(200)),
            STALL_AFTER,
        );
        assert_eq!(overdue, None);
    }

    #[test]
    fn messages_of_one_second_differ_by_id() {
        let mut tracker = ActivityTracker::default();
        tracker.resubscribed(at(995));
        let start = Instant::now();
        tracker.observe([(1, act(1_000, 5))], (at(1_000), start), STALL_AFTER);
        tracker.delivered(1, act(1_000, 6), at(1_000), &status());
        let soon = start + Duration::from_millis(500);
        tracker.observe([(1, act(1_000, 6))], (at(1_000), soon), STALL_AFTER);
        assert!(tracker.pending.is_empty(), "delivered already");
        tracker.observe([(1, act(1_000, 7))], (at(1_001), soon), STALL_AFTER);
        assert_eq!(
            tracker.pending.len(),
            1,
            "message 7 of the same second moved it"
        );
        let overdue = tracker.observe([], (at(1_200), start + STALL_AFTER * 2), STALL_AFTER);
        assert_eq!(
            overdue,
            Some(Overdue {
                earliest: 1_000,
                conversations: 1
            })
        );
    }

    #[test]
    fn a_gap_across_a_reconnect_is_not_a_stall_and_pending_activity_outlives_it() {
        let mut tracker = ActivityTracker::default();
        let start = Instant::now();
        tracker.resubscribed(at(995));
        tracker.delivered(1, act(1_000, 5), at(1_000), &status());
        // Pending when the socket drops: a reconnect's gap must start no later.
        tracker.observe([(2, act(1_004, 9))], (at(1_005), start), STALL_AFTER);
        assert_eq!(tracker.earliest_pending(), Some(at(1_004)));
        tracker.unsubscribed();
        assert_eq!(
            tracker.observe([(3, act(1_010, 10))], (at(1_010), start), STALL_AFTER),
            None
        );
        // Message 6 came while the socket was down (a gap, backfilled), before the confirm.
        tracker.resubscribed(at(1_025));
        tracker.observe([(1, act(1_020, 6))], (at(1_026), start), STALL_AFTER);
        assert!(
            tracker.pending.is_empty(),
            "the gap is the backfill's, not a stall"
        );
        let later = start + STALL_AFTER * 2;
        assert_eq!(
            tracker.observe([(1, act(1_020, 6))], (at(1_300), later), STALL_AFTER),
            None
        );
    }

    #[test]
    fn failed_checks_widen_the_next_one_within_a_bound_and_what_a_backfill_covered_is_not_awaited()
    {
        let mut tracker = ActivityTracker::default();
        let interval = Duration::from_secs(30);
        tracker.resubscribed(at(1_000));
        tracker.observe([], (at(1_000), Instant::now()), STALL_AFTER);
        assert_eq!(
            tracker.window(at(1_090), interval),
            121,
            "two checks failed"
        );
        assert_eq!(
            tracker.window(at(9_000), interval),
            u64::from(MAX_WINDOW_INTERVALS) * 30 + 31
        );
        tracker.skip_window(at(9_000));
        assert_eq!(
            tracker.window(at(9_030), interval),
            61,
            "a window too large to read is skipped, not asked for again"
        );
        tracker.observe([], (at(1_000), Instant::now()), STALL_AFTER);
        let start = Instant::now();
        tracker.observe([(4, act(1_050, 3))], (at(1_100), start), STALL_AFTER);
        assert_eq!(tracker.pending.len(), 1, "moved after the last good check");
        tracker.covered(4, act(1_050, 3));
        assert!(tracker.pending.is_empty(), "the backfill covered it");
    }

    #[test]
    fn the_tracker_is_bounded() {
        let mut tracker = ActivityTracker::default();
        for conversation in 0..(MAX_TRACKED_CONVERSATIONS as u64 + 10) {
            tracker.delivered(
                conversation,
                act(1_000 + conversation, 0),
                at(2_000),
                &status(),
            );
        }
        assert_eq!(tracker.known.len(), MAX_TRACKED_CONVERSATIONS);
        assert!(
            !tracker.known.contains_key(&0),
            "the oldest activity is forgotten first"
        );
    }

    #[test]
    fn a_check_asks_for_the_time_since_the_last_plus_the_margin() {
        let mut tracker = ActivityTracker::default();
        let interval = Duration::from_secs(30);
        assert_eq!(tracker.window(at(1_000), interval), 61);
        tracker.resubscribed(at(990));
        assert_eq!(tracker.window(at(1_000), interval), 41);
        tracker.observe([], (at(1_000), Instant::now()), STALL_AFTER);
        assert_eq!(tracker.window(at(1_045), interval), 76);
    }
}
