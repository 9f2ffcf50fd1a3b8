//! Which events of a batch being settled go to the sink next, and in what order.
//!
//! A batch is settled in passes, one after each backoff; a pass sends *waves*. A wave holds every
//! untried event of a conversation or only its first (per [`WaveMode`]); a conversation with an
//! event that failed in this pass is held until the next pass, so that nothing of it overtakes
//! that event.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use crate::delivery::dead_letter::DeadLetter;
use crate::event::Event;

/// Where one event of a batch being settled stands.
pub(super) struct Attempt {
    /// The event, sent again on each try.
    pub(super) event: Arc<Event>,
    /// Conversation key for ordering; `None` orders with nothing.
    order_key: Option<(u64, u64)>,
    /// Tries so far, for the dead letter.
    attempts: u32,
    /// When it was first tried: it is given up `max_elapsed` after.
    first_attempt: Option<SystemTime>,
    /// The last error, logged and reported while it waits to be retried.
    pub(super) last_error: Option<String>,
    /// Where it stands in the current pass.
    standing: Standing,
}

/// Where an event stands in the current pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Standing {
    /// Not finished and not tried in this pass yet.
    Untried,
    /// Sent in this pass and not delivered: waits for the next pass (after the backoff), and
    /// holds back later events of its conversation.
    Failed,
    /// Delivered or dead-lettered.
    Done,
}

/// An event's conversation key for ordering, `(account, conversation)`; `None` orders with
/// nothing.
pub(super) fn order_key(event: &Event) -> Option<(u64, u64)> {
    event
        .keys
        .conversation_id
        .map(|c| (event.keys.account_id.unwrap_or(0), c))
}

/// The tries of an event so far, kept while it waits in a sink's retry set.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(super) struct Tries {
    /// Tries so far, for the dead letter.
    pub(super) attempts: u32,
    /// When it was first tried: it is given up `max_elapsed` after.
    pub(super) first_attempt: Option<SystemTime>,
    /// The last error, logged and reported while it waits to be retried.
    pub(super) last_error: Option<String>,
}

impl Attempt {
    /// An event not tried yet.
    pub(super) fn new(event: Arc<Event>) -> Attempt {
        Attempt::resume(event, Tries::default())
    }

    /// An event tried before (in a sink's retry set), to try again.
    pub(super) fn resume(event: Arc<Event>, tries: Tries) -> Attempt {
        Attempt {
            order_key: order_key(&event),
            event,
            attempts: tries.attempts,
            first_attempt: tries.first_attempt,
            last_error: tries.last_error,
            standing: Standing::Untried,
        }
    }

    /// Its tries so far.
    pub(super) fn tries(&self) -> Tries {
        Tries {
            attempts: self.attempts,
            first_attempt: self.first_attempt,
            last_error: self.last_error.clone(),
        }
    }

    /// Whether it is delivered or dead-lettered.
    pub(super) fn is_done(&self) -> bool {
        self.standing == Standing::Done
    }

    /// A new pass starts: an event that failed in the last one may be tried again.
    pub(super) fn start_pass(&mut self) {
        if self.standing == Standing::Failed {
            self.standing = Standing::Untried;
        }
    }

    /// Counts a try made at `now`; until [`Attempt::finish`], it failed.
    pub(super) fn tried(&mut self, now: SystemTime) {
        self.attempts += 1;
        self.standing = Standing::Failed;
        self.first_attempt.get_or_insert(now);
    }

    /// Delivered or dead-lettered.
    pub(super) fn finish(&mut self) {
        self.standing = Standing::Done;
    }

    /// Whether it has failed for `max_elapsed` since its first try, as of `now`.
    pub(super) fn expired(&self, now: SystemTime, max_elapsed: Duration) -> bool {
        self.first_attempt.is_some_and(|first| {
            now.duration_since(first)
                .is_ok_and(|age| age >= max_elapsed)
        })
    }

    /// How many tries it had.
    pub(super) fn attempts(&self) -> u32 {
        self.attempts
    }

    /// Its dead letter, given up at `now` with `error`.
    pub(super) fn dead_letter(&self, error: String, now: SystemTime) -> DeadLetter {
        DeadLetter {
            event: Event::clone(&self.event),
            error,
            attempts: self.attempts,
            first_attempt: self.first_attempt.unwrap_or(now),
            last_attempt: now,
        }
    }
}

/// How many events of a conversation a wave takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum WaveMode {
    /// Every untried event: for a sink that keeps order itself, once the destination is back.
    AllAtOnce,
    /// The first untried event of each conversation: its next one waits until it gets through.
    OnePerConversation,
}

/// How a wave went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum WaveResult {
    /// Every event of it was delivered.
    DeliveredWhole,
    /// Some of it was finished (delivered or dead-lettered), not all delivered.
    Progressed,
    /// Nothing of it was finished: the destination is still failing.
    Stuck,
}

/// What follows a wave within a pass: `None` ends the pass; otherwise the next wave's mode. A
/// wave of everything untried ends the pass. Otherwise the next wave comes only while this one
/// made progress (failures hold their conversation), and all the rest at once when this one was
/// delivered whole to a sink that keeps order itself: the destination is back.
pub(super) fn next_wave_mode(
    was: WaveMode,
    result: WaveResult,
    preserves_order: bool,
) -> Option<WaveMode> {
    if was == WaveMode::AllAtOnce || result == WaveResult::Stuck {
        return None;
    }
    if preserves_order && result == WaveResult::DeliveredWhole {
        Some(WaveMode::AllAtOnce)
    } else {
        Some(WaveMode::OnePerConversation)
    }
}

/// The events to send next in this pass: every untried event without a conversation, and of
/// each conversation whose unfinished events were not tried yet in this pass, all of them
/// ([`WaveMode::AllAtOnce`]) or the first. A conversation with an event tried and not finished
/// in this pass is held: its later events wait until that one gets through, in the next pass.
pub(super) fn next_wave(attempts: &[Attempt], mode: WaveMode) -> Vec<usize> {
    let all_at_once = mode == WaveMode::AllAtOnce;
    let mut wave = Vec::new();
    let mut held: HashSet<(u64, u64)> = HashSet::new();
    let mut claimed: HashSet<(u64, u64)> = HashSet::new();
    for (i, a) in attempts.iter().enumerate() {
        let failed = match a.standing {
            Standing::Done => continue,
            Standing::Failed => true,
            Standing::Untried => false,
        };
        match a.order_key {
            None if !failed => wave.push(i),
            None => {}
            Some(key) if held.contains(&key) => {}
            Some(key) if failed => {
                held.insert(key);
            }
            Some(key) if all_at_once || claimed.insert(key) => wave.push(i),
            Some(_) => {}
        }
    }
    wave
}

/// The events to set aside as of `now`: of each conversation whose first unfinished event has
/// failed for `park_after`, every unfinished event, in batch order (its later events wait
/// behind it); and each event without a conversation that has failed that long.
pub(super) fn overdue(attempts: &[Attempt], now: SystemTime, park_after: Duration) -> Vec<usize> {
    let mut seen: HashSet<(u64, u64)> = HashSet::new();
    let mut parked: HashSet<(u64, u64)> = HashSet::new();
    let mut overdue = Vec::new();
    for (i, a) in attempts.iter().enumerate() {
        if a.is_done() {
            continue;
        }
        let expired = a.expired(now, park_after);
        let park = match a.order_key {
            None => expired,
            Some(key) if parked.contains(&key) => true,
            Some(key) if seen.insert(key) && expired => {
                parked.insert(key);
                true
            }
            Some(_) => false,
        };
        if park {
            overdue.push(i);
        }
    }
    overdue
}

#[cfg(test)]
mod tests {
    use super::*;
    use WaveMode::{AllAtOnce, OnePerConversation};
    use WaveResult::{DeliveredWhole, Progressed, Stuck};

    fn attempt(conversation: Option<u64>, done: bool) -> Attempt {
        let data = match conversation {
            Some(c) => format!(r#"{{"account_id":1,"conversation_id":{c}}}"#),
            None => r#"{"account_id":1}"#.into(),
        };
        let mut attempt = Attempt::new(Arc::new(Event::for_test("message.created", "t", &data)));
        if done {
            attempt.standing = Standing::Done;
        }
        attempt
    }

    #[test]
    fn a_retry_pass_goes_all_at_once_once_a_wave_is_delivered_whole() {
        // Everything untried was sent: the pass is over, whatever came back.
        assert_eq!(next_wave_mode(AllAtOnce, DeliveredWhole, true), None);
        // Nothing moved: the destination is still failing; wait for the next pass.
        assert_eq!(next_wave_mode(OnePerConversation, Stuck, true), None);
        // An order-keeping sink took a whole wave: the rest at once.
        assert_eq!(
            next_wave_mode(OnePerConversation, DeliveredWhole, true),
            Some(AllAtOnce)
        );
        // Some of the wave failed, or the sink sends concurrently: one per conversation.
        assert_eq!(
            next_wave_mode(OnePerConversation, Progressed, true),
            Some(OnePerConversation)
        );
        assert_eq!(
            next_wave_mode(OnePerConversation, DeliveredWhole, false),
            Some(OnePerConversation)
        );
    }

    #[test]
    fn waves_keep_one_event_per_conversation() {
        let batch = vec![
            attempt(Some(1), false),
            attempt(Some(1), false),
            attempt(Some(2), false),
            attempt(None, false),
            attempt(Some(2), false),
            attempt(None, false),
        ];
        assert_eq!(next_wave(&batch, OnePerConversation), vec![0, 2, 3, 5]);
        assert_eq!(next_wave(&batch, AllAtOnce), vec![0, 1, 2, 3, 4, 5]);
        let mut batch = batch;
        batch[0].standing = Standing::Done;
        batch[2].standing = Standing::Done;
        assert_eq!(next_wave(&batch, OnePerConversation), vec![1, 3, 4, 5]);
        // A failed event waits for the next pass and holds its conversation back.
        batch[1].standing = Standing::Failed;
        batch[3].standing = Standing::Failed;
        assert_eq!(next_wave(&batch, OnePerConversation), vec![4, 5]);
        assert_eq!(next_wave(&batch, AllAtOnce), vec![4, 5]);
    }

    #[test]
    fn a_conversation_is_parked_whole_when_its_first_unfinished_event_is_overdue() {
        let start = SystemTime::UNIX_EPOCH + Duration::from_secs(1000);
        let park_after = Duration::from_secs(300);
        let mut batch = vec![
            attempt(Some(1), true),  // delivered: stays
            attempt(Some(1), false), // failing since `start`
            attempt(Some(2), false), // failing, not for long enough
            attempt(Some(1), false), // behind conversation 1's failing event
            attempt(None, false),    // failing since `start`, no conversation
            attempt(None, false),    // never tried
            attempt(Some(3), false), // never tried
            attempt(Some(2), false), // behind conversation 2's
        ];
        for i in [1, 4] {
            batch[i].tried(start);
        }
        batch[2].tried(start + Duration::from_secs(100));
        let at = |secs| start + Duration::from_secs(secs);
        assert!(overdue(&batch, at(299), park_after).is_empty());
        assert_eq!(overdue(&batch, at(300), park_after), vec![1, 3, 4]);
        assert_eq!(overdue(&batch, at(400), park_after), vec![1, 2, 3, 4, 7]);
        // What is tried again keeps its first try's time.
        let resumed = Attempt::resume(batch[1].event.clone(), batch[1].tries());
        assert_eq!(resumed.tries().first_attempt, Some(start));
        assert_eq!(resumed.attempts(), 1);
        assert!(!resumed.is_done());
    }

    #[test]
    fn all_at_once_still_holds_a_conversation_behind_its_failed_event() {
        // X1 failed in this pass; Y1 and Y2 went through one at a time, so the rest goes at
        // once: but X2 must not overtake X1.
        let mut batch = vec![
            attempt(Some(1), false),
            attempt(Some(2), true),
            attempt(Some(2), true),
            attempt(Some(1), false),
            attempt(Some(3), false),
            attempt(Some(3), false),
        ];
        batch[0].standing = Standing::Failed;
        assert_eq!(next_wave(&batch, AllAtOnce), vec![4, 5]);
        assert_eq!(next_wave(&batch, OnePerConversation), vec![4]);
    }
}
