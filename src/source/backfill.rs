//! Filling the socket's gaps over Chatwoot's REST API, for tokens given as an API access token
//! with `backfill: true`.
//!
//! Chatwoot's cable has no replay: whatever it broadcasts while a socket is down is gone. A
//! token task remembers when its subscription was last healthy (the last ping or event while
//! confirmed) and, when the subscription is confirmed again, spawns a backfill of that gap, as
//! Chatwoot's dashboard recovers: the conversations updated within the gap plus
//! [`BACKFILL_MARGIN`], then per conversation the messages after the last one the socket
//! delivered before the gap. Each missed message becomes a `message.created` event and each
//! listed conversation a `conversation.updated` event, marked [`Event::backfill`]
//! (`chatwootbackfill: true`) and handed to the same [`EventSender`] as the socket's events.
//!
//! A backfill never holds up the socket: it runs in its own task, one gap at a time per token,
//! at most [`BACKFILL_CONCURRENCY`] requests at once, honouring `429` and `Retry-After`.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use futures_util::{stream, StreamExt};
use serde::Deserialize;
use serde_json::{Map, Value};
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::event::{nesting_exceeds, Event, JsonText};
use crate::source::activity::{listed_activity, ActivityTracker, Gap, BACKFILL_MARGIN};
use crate::source::rest::{AccountApi, RestError};
use crate::source::sender::EventSender;
use crate::source::settings::{BackfillSettings, TokenSpec};
use crate::status::{BackfillRecord, TokenReporter};

/// REST requests one token's backfill has in flight at once.
pub const BACKFILL_CONCURRENCY: usize = 2;

/// Bounds the conversations one gap backfills; a gap that changed more is given up.
pub const MAX_BACKFILL_CONVERSATIONS: usize = 1000;

/// Bounds the bytes of the message pages read for one conversation (their parsed objects are
/// held until handed over); past it the gap is given up for the rest.
pub const MAX_CONVERSATION_BYTES: usize = 8 * 1024 * 1024;

/// Bounds the message pages read per conversation (100 messages a page after a known message,
/// 20 a page backwards in a conversation the socket never delivered); beyond, the gap is given
/// up for the rest.
pub const MAX_MESSAGE_PAGES: usize = 20;

/// Conversations whose recent message ids a token remembers, the least recently used
/// forgotten first.
pub const REMEMBERED_CONVERSATIONS: usize = 512;

/// Message ids remembered per conversation, the oldest forgotten first.
pub const REMEMBERED_IDS_PER_CONVERSATION: usize = 128;

/// Messages `GET .../messages?after=` answers at most (Chatwoot's limit): fewer means the end.
const MESSAGES_AFTER_PAGE: usize = 100;

/// Why a gap was not (fully) backfilled. Never holds the access token.
#[derive(Debug, thiserror::Error)]
pub enum BackfillError {
    /// The gap is longer than `backfill.max_gap`.
    #[error("the gap of {gap:?} is longer than backfill.max_gap ({max_gap:?})")]
    TooLong {
        /// How long the subscription was not healthy.
        gap: Duration,
        /// The configured bound.
        max_gap: Duration,
    },
    /// A REST request failed (after its retries).
    #[error(transparent)]
    Rest(#[from] RestError),
    /// More conversations changed than [`MAX_BACKFILL_CONVERSATIONS`].
    #[error("{count} conversations changed in the gap, more than {MAX_BACKFILL_CONVERSATIONS}")]
    TooManyConversations {
        /// How many the list held.
        count: usize,
    },
    /// A conversation had more messages in the gap than [`MAX_MESSAGE_PAGES`] pages or
    /// [`MAX_CONVERSATION_BYTES`].
    #[error("conversation {conversation} has more than {MAX_MESSAGE_PAGES} pages or {MAX_CONVERSATION_BYTES} bytes of messages in the gap")]
    TooManyMessages {
        /// The conversation's display id.
        conversation: u64,
    },
    /// The pipeline closed (shutdown deadline passed).
    #[error("the pipeline closed before the backfill's events were handed over")]
    PipelineClosed,
}

/// The message ids the socket delivered lately, per conversation: what a backfill must not send
/// again, and where it starts reading. Bounded by [`REMEMBERED_CONVERSATIONS`] ×
/// [`REMEMBERED_IDS_PER_CONVERSATION`].
#[derive(Debug, Default)]
pub(crate) struct SeenMessages {
    /// By conversation display id.
    conversations: HashMap<u64, SeenConversation>,
    /// Counts uses, to tell the least recently used conversation.
    uses: u64,
}

/// One conversation's remembered messages.
#[derive(Debug, Default)]
struct SeenConversation {
    /// Message ids with when they were delivered, oldest first.
    ids: VecDeque<(u64, SystemTime)>,
    /// [`SeenMessages::uses`] when last recorded into, for eviction.
    used: u64,
}

impl SeenMessages {
    /// Remembers that message `id` of `conversation` was delivered at `at`.
    pub(crate) fn record(&mut self, conversation: u64, id: u64, at: SystemTime) {
        self.uses += 1;
        if !self.conversations.contains_key(&conversation)
            && self.conversations.len() >= REMEMBERED_CONVERSATIONS
        {
            let oldest = self
                .conversations
                .iter()
                .min_by_key(|(_, c)| c.used)
                .map(|(id, _)| *id);
            if let Some(oldest) = oldest {
                self.conversations.remove(&oldest);
            }
        }
        let seen = self.conversations.entry(conversation).or_default();
        seen.used = self.uses;
        if seen.ids.len() >= REMEMBERED_IDS_PER_CONVERSATION {
            seen.ids.pop_front();
        }
        seen.ids.push_back((id, at));
    }

    /// Per conversation, the greatest message id remembered as delivered no later than `at`:
    /// what a restart resuming from `at` reads after. A conversation with none is left out (a
    /// restart then reads it from the gap's start, by time).
    pub(crate) fn last_ids_before(&self, at: SystemTime) -> Vec<(u64, u64)> {
        self.conversations
            .keys()
            .filter_map(|conversation| Some((*conversation, self.last_before(*conversation, at)?)))
            .collect()
    }

    /// Whether message `id` of `conversation` is remembered as delivered.
    pub(crate) fn contains(&self, conversation: u64, id: u64) -> bool {
        self.conversations
            .get(&conversation)
            .is_some_and(|c| c.ids.iter().any(|(seen, _)| *seen == id))
    }

    /// The greatest message id of `conversation` delivered no later than `at`: a gap starting
    /// at `at` is read from after it.
    pub(crate) fn last_before(&self, conversation: u64, at: SystemTime) -> Option<u64> {
        self.conversations.get(&conversation).and_then(|c| {
            c.ids
                .iter()
                .filter(|(_, seen)| *seen <= at)
                .map(|(id, _)| *id)
                .max()
        })
    }
}

/// Reads one token's gaps over REST and hands what the socket missed to the pipeline.
pub(crate) struct Backfiller {
    /// The token's name, the events' `token`.
    token: Arc<str>,
    /// The events' `source`, as the socket's.
    source: Arc<str>,
    /// The REST client on the token's account.
    api: AccountApi,
    /// `backfill.max_gap`.
    backfill: BackfillSettings,
    /// `chatwoot.max_nesting`, applied to backfilled data as to the socket's.
    max_nesting: usize,
    /// The socket's pipeline.
    events: EventSender,
    /// The token's status cell, for the counters.
    status: TokenReporter,
    /// The token task's cancellation: a stopped token stops its backfill.
    cancel: CancellationToken,
    /// Messages the socket (or an earlier backfill) delivered.
    seen: Mutex<SeenMessages>,
    /// One gap at a time per token: a second gap waits, and then skips what the first sent.
    one_at_a_time: tokio::sync::Mutex<()>,
    /// The gap waiting for its turn and the one running: what a restart must still read.
    queue: Mutex<GapQueue>,
    /// Events the running backfill handed over so far, for its record when it is given up.
    handed_over: AtomicU64,
    /// The stall check's tracker, told what a backfill recovered so it does not wait for the
    /// socket to deliver it; `None` without a stall check.
    tracker: Option<Arc<Mutex<ActivityTracker>>>,
}

/// What a backfiller is built from, besides its token and REST client.
pub(crate) struct BackfillContext {
    /// `backfill.max_gap`.
    pub(crate) backfill: BackfillSettings,
    /// `chatwoot.max_nesting`.
    pub(crate) max_nesting: usize,
    /// The socket's pipeline.
    pub(crate) events: EventSender,
    /// The token's status cell.
    pub(crate) status: TokenReporter,
    /// The token task's cancellation.
    pub(crate) cancel: CancellationToken,
    /// The stall check's tracker, if the token has one.
    pub(crate) tracker: Option<Arc<Mutex<ActivityTracker>>>,
}

/// The gaps of one token not backfilled yet.
#[derive(Debug, Default)]
struct GapQueue {
    /// The gap waiting behind the running one; gaps found meanwhile widen it, so a slow REST
    /// API makes one wider backfill rather than a queue of them.
    waiting: Option<Gap>,
    /// The gap being read; kept when the backfill is cancelled, so the resume file keeps it.
    running: Option<Gap>,
}

/// The bytes of the message pages read for one conversation, within
/// [`MAX_CONVERSATION_BYTES`].
#[derive(Default)]
struct ReadBytes(usize);

impl ReadBytes {
    /// Adds a page of `size` bytes of conversation `conversation`; an error past the bound.
    fn add(&mut self, size: usize, conversation: u64) -> Result<(), BackfillError> {
        self.0 += size;
        if self.0 > MAX_CONVERSATION_BYTES {
            return Err(BackfillError::TooManyMessages { conversation });
        }
        Ok(())
    }
}

/// The messages of a conversation: `{"payload": [...]}`.
#[derive(Deserialize)]
struct MessageList {
    /// The messages, oldest first, each kept whole for its event.
    payload: Vec<Map<String, Value>>,
}

impl Backfiller {
    /// The backfiller of `spec`, reading with `api`.
    pub(crate) fn new(spec: &TokenSpec, api: AccountApi, context: BackfillContext) -> Backfiller {
        let BackfillContext {
            backfill,
            max_nesting,
            events,
            status,
            cancel,
            tracker,
        } = context;
        Backfiller {
            token: spec.name.clone(),
            source: Arc::from(spec.source()),
            api,
            backfill,
            max_nesting,
            events,
            status,
            cancel,
            seen: Mutex::new(SeenMessages::default()),
            one_at_a_time: tokio::sync::Mutex::new(()),
            queue: Mutex::new(GapQueue::default()),
            handed_over: AtomicU64::new(0),
            tracker,
        }
    }

    /// The socket delivered message `id` of `conversation` at `at`: no backfill sends it again.
    pub(crate) fn seen(&self, conversation: u64, id: u64, at: SystemTime) {
        self.seen
            .lock()
            .expect("seen lock")
            .record(conversation, id, at);
    }

    /// Per conversation, the last message id delivered no later than `at`, for a resume file
    /// that resumes from `at`.
    pub(crate) fn last_ids_before(&self, at: SystemTime) -> Vec<(u64, u64)> {
        self.seen.lock().expect("seen lock").last_ids_before(at)
    }

    /// `backfill.max_gap`: a longer gap is given up.
    pub(crate) fn max_gap(&self) -> Duration {
        self.backfill.max_gap
    }

    /// Backfills `gap` in its own task, after the gap running now; joins the gap already
    /// waiting, if one is.
    pub(crate) fn enqueue(self: &Arc<Self>, gap: Gap) {
        let mut queue = self.queue.lock().expect("queue lock");
        if let Some(waiting) = &mut queue.waiting {
            waiting.start = waiting.start.min(gap.start);
            waiting.end = waiting.end.max(gap.end);
            return;
        }
        queue.waiting = Some(gap);
        tokio::spawn(self.clone().run_next());
    }

    /// The earliest start of a gap not backfilled yet (waiting, running, or cancelled while
    /// running).
    pub(crate) fn earliest_unfinished(&self) -> Option<SystemTime> {
        let queue = self.queue.lock().expect("queue lock");
        [queue.waiting, queue.running]
            .into_iter()
            .flatten()
            .map(|gap| gap.start)
            .min()
    }

    /// Waits for its turn, then backfills the waiting gap, counting how it went.
    async fn run_next(self: Arc<Self>) {
        let _turn = tokio::select! {
            turn = self.one_at_a_time.lock() => turn,
            () = self.cancel.cancelled() => return,
        };
        let gap = {
            let mut queue = self.queue.lock().expect("queue lock");
            queue.running = queue.waiting.take();
            queue.running
        };
        let Some(gap) = gap else {
            return;
        };
        self.handed_over.store(0, Ordering::Relaxed);
        let filled = tokio::select! {
            filled = self.fill(gap) => filled,
            () = self.cancel.cancelled() => return,
        };
        self.queue.lock().expect("queue lock").running = None;
        let record = |events: usize, given_up: Option<String>| BackfillRecord {
            from: gap.start,
            to: gap.end,
            ended_at: SystemTime::now(),
            events: events as u64,
            given_up,
        };
        match filled {
            Ok(events) => {
                info!(token = %self.token, gap = ?gap.length(), events, "backfilled the gap over the REST API");
                self.status.backfilled(record(events, None));
            }
            Err(e) => {
                error!(token = %self.token, gap = ?gap.length(), error = %e,
                    "GAP NOT BACKFILLED: events Chatwoot broadcast while the socket was down may be lost");
                self.status.note(format!("gap not backfilled: {e}"));
                let handed_over = self.handed_over.load(Ordering::Relaxed);
                self.status
                    .backfill_given_up(record(handed_over as usize, Some(e.to_string())));
            }
        }
    }

    /// Reads the conversations changed in `gap` and each one's missed messages; how many events
    /// were handed over.
    async fn fill(&self, gap: Gap) -> Result<usize, BackfillError> {
        if gap.length() > self.backfill.max_gap {
            return Err(BackfillError::TooLong {
                gap: gap.length(),
                max_gap: self.backfill.max_gap,
            });
        }
        let since = gap.start - BACKFILL_MARGIN;
        let within = SystemTime::now()
            .duration_since(since)
            .unwrap_or_default()
            .as_secs()
            + 1;
        let conversations = self.api.conversations_updated_within(within).await?;
        if conversations.len() > MAX_BACKFILL_CONVERSATIONS {
            return Err(BackfillError::TooManyConversations {
                count: conversations.len(),
            });
        }
        let mut filled = stream::iter(conversations)
            .map(|conversation| self.conversation(conversation, gap, since))
            .buffer_unordered(BACKFILL_CONCURRENCY);
        let mut events = 0;
        while let Some(result) = filled.next().await {
            events += result?;
        }
        Ok(events)
    }

    /// One changed conversation: its missed messages, then its `conversation.updated`.
    async fn conversation(
        &self,
        conversation: Map<String, Value>,
        gap: Gap,
        since: SystemTime,
    ) -> Result<usize, BackfillError> {
        let Some(display_id) = conversation.get("id").and_then(Value::as_u64) else {
            warn!(token = %self.token, "skipped a listed conversation without an id");
            return Ok(0);
        };
        let activity = listed_activity(&conversation);
        let after = self
            .seen
            .lock()
            .expect("seen lock")
            .last_before(display_id, gap.start);
        let messages = match after {
            Some(after) => self.messages_after(display_id, after).await?,
            None => self.messages_since(display_id, since).await?,
        };
        let mut events = 0;
        for message in messages {
            let Some(id) = message.get("id").and_then(Value::as_u64) else {
                continue;
            };
            if self
                .seen
                .lock()
                .expect("seen lock")
                .contains(display_id, id)
            {
                continue;
            }
            events += self.emit("message.created", message).await?;
            self.seen
                .lock()
                .expect("seen lock")
                .record(display_id, id, SystemTime::now());
        }
        events += self.emit("conversation.updated", conversation).await?;
        if let (Some(tracker), Some((_, activity))) = (&self.tracker, activity) {
            tracker
                .lock()
                .expect("tracker lock")
                .covered(display_id, activity);
        }
        Ok(events)
    }

    /// The messages of a conversation the socket delivered before the gap: those after the
    /// last one it delivered, oldest first.
    async fn messages_after(
        &self,
        display_id: u64,
        mut after: u64,
    ) -> Result<Vec<Map<String, Value>>, BackfillError> {
        let mut messages = Vec::new();
        let mut read = ReadBytes::default();
        for _ in 0..MAX_MESSAGE_PAGES {
            let url = format!(
                "{}/conversations/{display_id}/messages?after={after}",
                self.api.account_url()
            );
            let (page, size): (MessageList, usize) = self.api.get_sized(&url).await?;
            read.add(size, display_id)?;
            let full = page.payload.len() >= MESSAGES_AFTER_PAGE;
            for message in page.payload {
                if let Some(id) = message.get("id").and_then(Value::as_u64) {
                    after = after.max(id);
                    messages.push(message);
                }
            }
            if !full {
                return Ok(messages);
            }
        }
        Err(BackfillError::TooManyMessages {
            conversation: display_id,
        })
    }

    /// The messages of a conversation the socket never delivered: those created since `since`,
    /// read backwards from the latest, returned oldest first.
    async fn messages_since(
        &self,
        display_id: u64,
        since: SystemTime,
    ) -> Result<Vec<Map<String, Value>>, BackfillError> {
        let since = since
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs_f64();
        let mut newest_first = Vec::new();
        let mut before = None;
        let mut read = ReadBytes::default();
        for _ in 0..MAX_MESSAGE_PAGES {
            let url = match before {
                Some(id) => format!(
                    "{}/conversations/{display_id}/messages?before={id}",
                    self.api.account_url()
                ),
                None => format!(
                    "{}/conversations/{display_id}/messages",
                    self.api.account_url()
                ),
            };
            let (page, size): (MessageList, usize) = self.api.get_sized(&url).await?;
            read.add(size, display_id)?;
            if page.payload.is_empty() {
                newest_first.reverse();
                return Ok(newest_first);
            }
            before = page
                .payload
                .iter()
                .filter_map(|m| m.get("id").and_then(Value::as_u64))
                .min();
            let mut reached_older = false;
            for message in page.payload.into_iter().rev() {
                let created = message.get("created_at").and_then(Value::as_f64);
                if created.is_some_and(|at| at < since) {
                    reached_older = true;
                } else {
                    newest_first.push(message);
                }
            }
            if reached_older || before.is_none() {
                newest_first.reverse();
                return Ok(newest_first);
            }
        }
        Err(BackfillError::TooManyMessages {
            conversation: display_id,
        })
    }

    /// Hands one object over as a marked event of `name`; 1 when handed over, 0 when skipped.
    /// A REST message lacks the cable's `account_id`: it is added, as routes and keys read it.
    async fn emit(&self, name: &str, mut data: Map<String, Value>) -> Result<usize, BackfillError> {
        data.entry("account_id")
            .or_insert_with(|| Value::from(self.api.account_id()));
        let text = Value::Object(data).to_string();
        if nesting_exceeds(&text, self.max_nesting) {
            warn!(token = %self.token, event = name,
                "skipped a backfilled object nesting deeper than chatwoot.max_nesting");
            return Ok(0);
        }
        let data = JsonText::from_string(text).map_err(|e| RestError::Malformed {
            url: self.api.account_url(),
            reason: e.to_string(),
        })?;
        let mut event = Event::new(
            name,
            data,
            self.token.clone(),
            self.source.clone(),
            SystemTime::now(),
        );
        event.backfill = true;
        self.events
            .send(event)
            .await
            .map_err(|_| BackfillError::PipelineClosed)?;
        self.status.backfilled_event();
        self.handed_over.fetch_add(1, Ordering::Relaxed);
        Ok(1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seen_messages_are_bounded_and_tell_where_a_gap_starts() {
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000);
        let mut seen = SeenMessages::default();
        seen.record(7, 10, t0);
        seen.record(7, 11, t0 + Duration::from_secs(5));
        assert_eq!(seen.last_before(7, t0 + Duration::from_secs(1)), Some(10));
        assert_eq!(seen.last_before(7, t0 + Duration::from_secs(9)), Some(11));
        assert_eq!(seen.last_before(8, t0), None);
        assert!(seen.contains(7, 11) && !seen.contains(7, 12));
        assert_eq!(
            seen.last_ids_before(t0 + Duration::from_secs(1)),
            [(7, 10)],
            "a resume point keeps only what was delivered by then"
        );
        for id in 0..(REMEMBERED_IDS_PER_CONVERSATION as u64 + 5) {
            seen.record(9, 1_000 + id, t0);
        }
        assert!(!seen.contains(9, 1_000), "the oldest id is forgotten");
        assert_eq!(
            seen.conversations[&9].ids.len(),
            REMEMBERED_IDS_PER_CONVERSATION
        );
        seen.record(7, 12, t0);
        for conversation in 100..(100 + REMEMBERED_CONVERSATIONS as u64) {
            seen.record(conversation, 1, t0);
        }
        assert_eq!(seen.conversations.len(), REMEMBERED_CONVERSATIONS);
        assert!(
            !seen.contains(9, 1_100),
            "the least recently used conversation is forgotten first"
        );
    }
}
