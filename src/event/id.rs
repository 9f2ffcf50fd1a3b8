//! Event ids: one id for one broadcast, however many tokens saw it; a new id for a later
//! broadcast with the same bytes.
//!
//! Chatwoot sends no event id. A broadcast fanned out to several tokens arrives as byte-identical
//! copies within milliseconds; but identical bytes also recur for genuinely new changes (typing
//! on/off/on, a contact edited A→B→A), and a downstream dedup (JetStream's duplicate window, a
//! webhook's idempotency) must not merge those. Two facts separate them:
//! - one subscription receives each broadcast once, so the same bytes seen twice *on the same
//!   token* are always two broadcasts;
//! - copies of one broadcast on different tokens arrive within a short window.
//!
//! So copies are grouped: a sighting joins the latest group with the same content if that group
//! opened less than [`FANOUT_WINDOW`] ago (on the monotonic clock: a wall clock stepped back
//! must not keep groups open) and has not seen this token yet; otherwise it opens a new group.
//! A group's id is `xxh3-128(content hash, the UTC second the group opened, n)`, where n counts
//! the earlier groups with the same content opened in that same second. Including the second
//! (rather than a counter alone) makes replicas that see the same broadcast agree on its id,
//! except when their sightings straddle a second boundary: a rare duplicate, never a merge.
//! The second is the wall clock's, except that it never goes back nor runs slower than the
//! monotonic clock (see `Clocks`), so that no id repeats after a step back.

use std::collections::{HashMap, VecDeque};
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use crate::event::EventId;

/// How long after a group opens a copy on another token still joins it. Copies of one broadcast
/// arrive within milliseconds; the window must not be shorter than the one-second id bucket.
pub const FANOUT_WINDOW: Duration = Duration::from_secs(1);

/// Assigns ids to events in receive order. Memory is bounded by the broadcasts of one window,
/// whatever the wall clock does: the window runs on the monotonic clock.
#[derive(Debug, Default)]
pub struct IdAssigner {
    /// The latest group per content hash. The key already is an xxh3 hash: hashing it again
    /// with SipHash was most of the cost of an id.
    groups: HashMap<u128, Group, BuildHasherDefault<ContentHasher>>,
    /// Groups in opening order (monotonic microseconds, see [`Clocks`]), to forget them once
    /// the window has passed.
    opened: VecDeque<(u64, u128)>,
    /// The two times every sighting is placed on.
    clocks: Clocks,
}

/// The times of sightings. The fan-out window is measured on the monotonic clock, because a wall
/// clock stepped back would stop it: groups would never expire (memory grows) and a later
/// broadcast with the same bytes on another token would join an old group, get its id and be
/// dropped downstream as a duplicate. Ids name a wall-clock second, so that replicas agree.
#[derive(Debug, Default)]
struct Clocks {
    /// The first sighting's monotonic time: the origin of `mono_us`.
    origin: Option<Instant>,
    /// The latest monotonic time seen, in microseconds since `origin`. Sightings from several
    /// tokens' tasks can reach the assigner slightly out of order; this never goes back.
    mono_us: u64,
    /// The latest id time, in microseconds since the Unix epoch: the wall clock, but never
    /// back and never slower than the monotonic clock. After the wall clock is stepped back, a
    /// second already used would otherwise start over at `n = 0` and repeat an old id; and a
    /// second that stood still while groups expire would do the same.
    id_us: u64,
}

/// One sighting's place on both clocks.
#[derive(Debug, Clone, Copy)]
struct Now {
    /// Monotonic microseconds since [`Clocks::origin`]: what the window is measured in.
    mono_us: u64,
    /// The id's time in microseconds since the Unix epoch; its second goes into the id.
    id_us: u64,
}

impl Clocks {
    /// Places a sighting received at `wall` (wall clock) and `mono` (monotonic clock).
    fn advance(&mut self, wall: SystemTime, mono: Instant) -> Now {
        let origin = *self.origin.get_or_insert(mono);
        let mono_us = (mono.saturating_duration_since(origin).as_micros() as u64).max(self.mono_us);
        let elapsed_us = mono_us - self.mono_us;
        let wall_us = wall
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_micros() as u64)
            .unwrap_or(0);
        self.mono_us = mono_us;
        self.id_us = wall_us.max(self.id_us.saturating_add(elapsed_us));
        Now {
            mono_us,
            id_us: self.id_us,
        }
    }
}

/// One broadcast's sightings. Kept small (64 bytes with its key): the map holds every broadcast
/// of the last window, and at 100k events/s its growth and cache misses were most of an id's
/// cost. The id is not stored: it follows from the content, the second and `repeat`, and is
/// needed again only when a copy joins.
#[derive(Debug)]
struct Group {
    /// When the group opened, in monotonic microseconds (as precise as the window needs: whole
    /// milliseconds made it up to 1 ms shorter): the start of its fan-out window.
    opened_mono_us: u64,
    /// The id's second (of [`Now::id_us`]) when the group opened.
    second: u64,
    /// How many earlier groups with the same content opened in the same second; part of the id.
    repeat: u32,
    /// The token that opened the group: a second sighting on it is a new broadcast.
    first_token: Arc<str>,
    /// Tokens whose copy joined since, boxed so that the common group of one sighting costs
    /// one word for them and allocates nothing (a bare `Vec` is three words). A boxed slice
    /// would be as small but copy the list for every join.
    #[allow(clippy::box_collection)]
    joined: Option<Box<Vec<Arc<str>>>>,
}

impl Group {
    fn has_seen(&self, token: &Arc<str>) -> bool {
        self.first_token == *token
            || self
                .joined
                .iter()
                .flat_map(|j| j.iter())
                .any(|t| t == token)
    }
}

impl IdAssigner {
    /// An assigner that remembers no broadcast yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// The id of a sighting of `content` on `token`, received at `wall` on the wall clock (the
    /// second of the id) and at `mono` on the monotonic clock (the fan-out window).
    pub fn assign(
        &mut self,
        content: u128,
        token: &Arc<str>,
        wall: SystemTime,
        mono: Instant,
    ) -> EventId {
        let now = self.clocks.advance(wall, mono);
        self.forget_before(now.mono_us);
        let second = now.id_us / MICROS_PER_SECOND;
        let repeat = match self.groups.get_mut(&content) {
            Some(group) => {
                if now.mono_us - group.opened_mono_us < WINDOW_US && !group.has_seen(token) {
                    group.joined.get_or_insert_default().push(token.clone());
                    return group_id(content, group.second, group.repeat);
                }
                if group.second == second {
                    group.repeat + 1
                } else {
                    0
                }
            }
            None => 0,
        };
        self.groups.insert(
            content,
            Group {
                opened_mono_us: now.mono_us,
                second,
                repeat,
                first_token: token.clone(),
                joined: None,
            },
        );
        self.opened.push_back((now.mono_us, content));
        group_id(content, second, repeat)
    }

    /// Groups remembered now; bounded by the broadcasts of one window.
    pub fn remembered(&self) -> usize {
        self.groups.len()
    }

    fn forget_before(&mut self, now_mono_us: u64) {
        while let Some(&(opened_mono_us, content)) = self.opened.front() {
            if now_mono_us - opened_mono_us < WINDOW_US {
                break;
            }
            self.opened.pop_front();
            // A newer group for the same content may have replaced this one; keep that.
            if self
                .groups
                .get(&content)
                .is_some_and(|g| g.opened_mono_us == opened_mono_us)
            {
                self.groups.remove(&content);
            }
        }
    }
}

/// [`FANOUT_WINDOW`] in the microseconds groups are timed in.
const WINDOW_US: u64 = FANOUT_WINDOW.as_micros() as u64;

const MICROS_PER_SECOND: u64 = 1_000_000;

/// Uses the low 64 bits of a key that is already a good hash (the content hash).
#[derive(Default)]
struct ContentHasher(u64);

impl Hasher for ContentHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        // Not reached for u128 keys; a fallback that still spreads arbitrary bytes.
        for &b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(b);
        }
    }
    fn write_u128(&mut self, n: u128) {
        self.0 = n as u64;
    }
}

fn group_id(content: u128, second: u64, repeat: u32) -> EventId {
    let mut bytes = [0u8; 28];
    bytes[..16].copy_from_slice(&content.to_le_bytes());
    bytes[16..24].copy_from_slice(&second.to_le_bytes());
    bytes[24..].copy_from_slice(&repeat.to_le_bytes());
    EventId(xxhash_rust::xxh3::xxh3_128(&bytes))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::content_hash;
    use std::collections::HashSet;
    use std::sync::LazyLock;

    /// The monotonic instant every test's times count from.
    static MONO_BASE: LazyLock<Instant> = LazyLock::new(Instant::now);

    /// A sighting's times when the wall clock reads `wall_us` and the monotonic clock `mono_us`
    /// microseconds past the tests' bases.
    fn clocks_us(wall_us: u64, mono_us: u64) -> (SystemTime, Instant) {
        let wall = SystemTime::UNIX_EPOCH + Duration::from_millis(1_781_964_126_000);
        (
            wall + Duration::from_micros(wall_us),
            *MONO_BASE + Duration::from_micros(mono_us),
        )
    }

    /// `ms` milliseconds in, both clocks agreeing.
    fn at(ms: u64) -> (SystemTime, Instant) {
        clocks_us(ms * 1_000, ms * 1_000)
    }

    /// The wall clock at `wall_ms`, the monotonic clock at `mono_ms`.
    fn stepped(wall_ms: u64, mono_ms: u64) -> (SystemTime, Instant) {
        clocks_us(wall_ms * 1_000, mono_ms * 1_000)
    }

    impl IdAssigner {
        fn sight(&mut self, content: u128, token: &Arc<str>, at: (SystemTime, Instant)) -> EventId {
            self.assign(content, token, at.0, at.1)
        }
    }

    #[test]
    fn fanout_copies_on_several_tokens_share_one_id() {
        let (a, b, c) = (Arc::from("a"), Arc::from("b"), Arc::from("c"));
        let content = content_hash("message.created", r#"{"id":1}"#);
        let mut ids = IdAssigner::new();
        let first = ids.sight(content, &a, at(0));
        assert_eq!(ids.sight(content, &b, at(3)), first);
        assert_eq!(ids.sight(content, &c, at(40)), first);
    }

    #[test]
    fn repeat_on_same_token_gets_new_id_even_within_the_same_second() {
        // typing on / off / on within a few milliseconds
        let a: Arc<str> = Arc::from("a");
        let on = content_hash("conversation.typing_on", r#"{"conversation":{"id":87}}"#);
        let off = content_hash("conversation.typing_off", r#"{"conversation":{"id":87}}"#);
        let mut ids = IdAssigner::new();
        let on1 = ids.sight(on, &a, at(100));
        let off1 = ids.sight(off, &a, at(101));
        let on2 = ids.sight(on, &a, at(102));
        assert_ne!(on1, on2);
        assert_ne!(on1, off1);
        let on3 = ids.sight(on, &a, at(103));
        assert_ne!(on3, on2);
        assert_ne!(on3, on1);
    }

    #[test]
    fn repeat_seen_on_two_tokens_gives_two_ids_each_shared() {
        // contact edited A -> B -> A, seen by two agents
        let (a, b) = (Arc::from("a"), Arc::from("b"));
        let state_a = content_hash("contact.updated", r#"{"name":"A"}"#);
        let state_b = content_hash("contact.updated", r#"{"name":"B"}"#);
        let mut ids = IdAssigner::new();
        let first_a = ids.sight(state_a, &a, at(0));
        assert_eq!(ids.sight(state_a, &b, at(2)), first_a);
        let b_on_a = ids.sight(state_b, &a, at(300));
        assert_eq!(ids.sight(state_b, &b, at(301)), b_on_a);
        let second_a = ids.sight(state_a, &a, at(600));
        assert_ne!(second_a, first_a);
        assert_eq!(ids.sight(state_a, &b, at(602)), second_a);
    }

    #[test]
    fn same_bytes_after_the_window_are_a_new_broadcast() {
        let (a, b) = (Arc::from("a"), Arc::from("b"));
        let content = content_hash("presence.update", r#"{"users":{}}"#);
        let mut ids = IdAssigner::new();
        let first = ids.sight(content, &a, at(0));
        let later = ids.sight(content, &b, at(5_000));
        assert_ne!(first, later);
    }

    #[test]
    fn ids_are_stable_across_instances_for_the_same_second() {
        // two replicas (or a restart) seeing the same broadcast in the same second agree
        let a: Arc<str> = Arc::from("a");
        let content = content_hash("message.created", r#"{"id":1}"#);
        let one = IdAssigner::new().sight(content, &a, at(10));
        let two = IdAssigner::new().sight(content, &a, stepped(20, 7_000));
        assert_eq!(one, two);
    }

    #[test]
    fn a_clock_stepped_back_never_repeats_an_id() {
        let a: Arc<str> = Arc::from("a");
        let content = content_hash("conversation.typing_on", r#"{"conversation":{"id":1}}"#);
        let mut ids = IdAssigner::new();
        let first = ids.sight(content, &a, at(500));
        // Two seconds later the same bytes again, then the wall clock is stepped back 2.6 s.
        let second = ids.sight(content, &a, at(2_500));
        let after_step = ids.sight(content, &a, stepped(0, 2_600));
        assert_ne!(first, second);
        assert_ne!(after_step, first);
        assert_ne!(after_step, second);
    }

    #[test]
    fn a_wall_clock_stepped_back_still_forgets_groups_after_the_window() {
        let a: Arc<str> = Arc::from("a");
        let mut ids = IdAssigner::new();
        ids.sight(content_hash("e", "start"), &a, stepped(60_000, 0));
        // The wall clock is stepped back a minute; 10 s of events at one per ms follow.
        for i in 1..=10_000u64 {
            ids.sight(content_hash("e", &i.to_string()), &a, stepped(i, i));
        }
        assert!(ids.remembered() <= 1_001, "{}", ids.remembered());
        assert_eq!(ids.opened.len(), ids.remembered());
    }

    #[test]
    fn after_a_step_back_a_later_broadcast_on_another_token_gets_its_own_id() {
        let (a, b) = (Arc::from("a"), Arc::from("b"));
        let content = content_hash("contact.updated", r#"{"name":"A"}"#);
        let mut ids = IdAssigner::new();
        let first = ids.sight(content, &a, stepped(10_000, 0));
        // The wall clock is stepped back 5 s; 2 s later a new broadcast of the same bytes
        // reaches token b alone. Joining the first group would give it a delivered id.
        let later = ids.sight(content, &b, stepped(7_000, 2_000));
        assert_ne!(later, first);
        // A copy of that later broadcast on token a, 3 ms after it, still shares its id.
        assert_eq!(ids.sight(content, &a, stepped(7_003, 2_003)), later);
    }

    #[test]
    fn while_the_wall_clock_stands_behind_ids_never_repeat() {
        let a: Arc<str> = Arc::from("a");
        let content = content_hash("conversation.typing_on", r#"{"conversation":{"id":1}}"#);
        let mut ids = IdAssigner::new();
        let mut seen = HashSet::new();
        assert!(seen.insert(ids.sight(content, &a, stepped(60_000, 0))));
        // Stepped back a minute: the same bytes every 700 ms for 20 s, each a new broadcast,
        // while every group before them is forgotten.
        for i in 1..=30u64 {
            let id = ids.sight(content, &a, stepped(i * 700, i * 700));
            assert!(seen.insert(id), "sighting {i} repeated an id");
            assert_eq!(ids.remembered(), 1);
        }
    }

    #[test]
    fn a_copy_just_inside_the_window_joins_and_one_at_its_end_does_not() {
        let (a, b, c) = (Arc::from("a"), Arc::from("b"), Arc::from("c"));
        let content = content_hash("message.created", r#"{"id":1}"#);
        let mut ids = IdAssigner::new();
        let first = ids.sight(content, &a, clocks_us(500, 500));
        // 999.9 ms later: inside the window, although a millisecond clock would say 1000.
        let near_end = 500 + 999_900;
        assert_eq!(ids.sight(content, &b, clocks_us(near_end, near_end)), first);
        // Exactly one window later: a new broadcast (never a merge at the edge).
        let end = 500 + WINDOW_US;
        assert_ne!(ids.sight(content, &c, clocks_us(end, end)), first);
    }

    #[test]
    fn groups_of_one_content_opened_in_the_same_instant_are_forgotten_together() {
        let a: Arc<str> = Arc::from("a");
        let content = content_hash("conversation.typing_on", r#"{"conversation":{"id":1}}"#);
        let mut ids = IdAssigner::new();
        let first = ids.sight(content, &a, at(0));
        let second = ids.sight(content, &a, at(0));
        assert_ne!(first, second);
        assert_eq!(ids.remembered(), 1);
        assert_eq!(ids.opened.len(), 2);
        ids.sight(content_hash("other", "{}"), &a, at(1_000));
        assert_eq!(
            ids.remembered(),
            1,
            "both groups of the first instant are gone"
        );
        assert_eq!(ids.opened.len(), 1);
        // The same bytes later in that new second start a fresh group.
        assert_ne!(ids.sight(content, &a, at(1_001)), second);
    }

    #[test]
    fn a_remembered_group_takes_64_bytes_with_its_key() {
        assert!(std::mem::size_of::<(u128, Group)>() <= 64);
    }

    #[test]
    fn memory_is_bounded_by_the_window() {
        let a: Arc<str> = Arc::from("a");
        let mut ids = IdAssigner::new();
        for i in 0..10_000u64 {
            ids.sight(content_hash("e", &i.to_string()), &a, at(i));
        }
        // 10 s of events at one per ms: only the last second is remembered
        assert!(ids.remembered() <= 1_001, "{}", ids.remembered());
        assert_eq!(ids.opened.len(), ids.remembered());
    }
}
