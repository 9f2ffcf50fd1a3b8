//! What a token task tells its REST side about the socket: when the subscription was last
//! healthy (a reconnect's gap starts there, see [`backfill`](super::backfill)) and what the
//! socket delivered (a backfill skips those messages; a stall check counts that activity as
//! delivered, see [`stall`](super::stall)). Inert for a token written with its pubsub token.

use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use serde::Deserialize;
use tokio::sync::Notify;
use tokio_util::sync::{CancellationToken, DropGuard};
use tracing::{error, info};

use crate::event::Event;
use crate::source::activity::{Activity, ActivityTracker, Gap};
use crate::source::backfill::{BackfillContext, Backfiller};
use crate::source::profile;
use crate::source::rest::AccountApi;
use crate::source::resume::{ResumeFile, ResumePoint};
use crate::source::sender::EventSender;
use crate::source::settings::{CableSettings, TokenSpec};
use crate::source::stall::StallWatch;
use crate::status::TokenReporter;

/// The ids and activity a live conversation or message event carries. A message event has
/// `conversation_id` (the display id) and its own `id`; a conversation event has the display
/// id as `id`. Numbers only: anything else fails the parse and the event is not tracked.
#[derive(Deserialize)]
pub struct LiveActivity {
    /// The account; a user in several accounts gets all their events.
    account_id: Option<u64>,
    /// A message's id, or a conversation's display id.
    id: Option<u64>,
    /// A message's conversation (display id).
    conversation_id: Option<u64>,
    /// A message's creation (whole seconds).
    created_at: Option<f64>,
    /// A conversation's activity (whole seconds).
    last_activity_at: Option<f64>,
    /// A message's conversation, with its activity.
    conversation: Option<LiveConversation>,
    /// A conversation's latest message(s).
    messages: Option<Vec<LiveMessage>>,
}

/// A message listed in a live conversation event.
#[derive(Deserialize)]
struct LiveMessage {
    /// Its id.
    id: Option<u64>,
}

/// `conversation` of a live message event.
#[derive(Deserialize)]
struct LiveConversation {
    /// The conversation's activity after this message (whole seconds).
    last_activity_at: Option<f64>,
}

/// What a delivered event says of a conversation.
pub struct Delivered {
    /// The conversation's display id.
    pub conversation: u64,
    /// The message id, for a message event.
    pub message: Option<u64>,
    /// The latest activity the event shows.
    pub activity: Option<Activity>,
}

impl LiveActivity {
    /// What `event` (of `account_id`) says of a conversation; `None` for another account's or
    /// an event about no conversation.
    pub fn of(event: &Event, account_id: u64) -> Option<Delivered> {
        let name = &*event.name;
        let message = name.starts_with("message.");
        let conversation_event = matches!(
            name,
            "conversation.created"
                | "conversation.updated"
                | "conversation.status_changed"
                | "conversation.read"
                | "conversation.contact_changed"
                | "assignee.changed"
                | "team.changed"
        );
        if !message && !conversation_event {
            return None;
        }
        let live: LiveActivity = serde_json::from_str(event.data.get()).ok()?;
        if live.account_id.is_some_and(|id| id != account_id) {
            return None;
        }
        let at = [
            live.created_at.filter(|_| message),
            live.last_activity_at,
            live.conversation.and_then(|c| c.last_activity_at),
        ]
        .into_iter()
        .flatten()
        .map(|at| at.max(0.0) as u64)
        .max();
        let (conversation, message) = if message {
            (live.conversation_id?, live.id)
        } else {
            (live.id?, None)
        };
        let latest_message = message.or_else(|| live.messages?.iter().filter_map(|m| m.id).max());
        Some(Delivered {
            conversation,
            message,
            activity: at.map(|at| Activity {
                at,
                message: latest_message.unwrap_or(0),
            }),
        })
    }
}

/// The REST side of one token task, across its connections.
pub(crate) struct Gaps {
    /// The account the REST side reads; events of other accounts are not tracked.
    account_id: u64,
    /// Reads a reconnect's gap and a stalled span; `None` without `backfill`.
    backfiller: Option<Arc<Backfiller>>,
    /// Shared with the stall check; `None` without one (`stall_after: off`, or no API token).
    stall: Option<Arc<Mutex<ActivityTracker>>>,
    /// The last ping or event while the subscription was confirmed; at start, the one the
    /// resume file kept.
    last_healthy: Option<SystemTime>,
    /// Keeps where a restart resumes from; `None` without backfill.
    resume: Option<ResumeFile>,
    /// How far back a followed rotation's quiet span starts when the token was not known good
    /// since: the refresh reads the profile every `refresh_interval`.
    rotation_lookback: Duration,
    /// When the subscription's pubsub token was last known good (confirmed, or shown again by
    /// the profile): a rotation found later happened after it.
    token_shown_at: Option<SystemTime>,
    /// Stops the stall check and the backfills when the token task ends in any way (stopped,
    /// returned, panicked): a restarted task starts its own.
    _stop: Option<DropGuard>,
}

/// What the REST side of a token is built from.
pub(crate) struct GapsContext<'a> {
    /// The cable's settings (timeouts, TLS, nesting).
    pub(crate) settings: &'a CableSettings,
    /// The socket's pipeline, which backfilled events join.
    pub(crate) events: &'a EventSender,
    /// The token's status cell.
    pub(crate) status: &'a TokenReporter,
    /// The token task's cancellation.
    pub(crate) cancel: &'a CancellationToken,
    /// Asks the profile watcher to read the profile now.
    pub(crate) refresh_profile: Option<Arc<Notify>>,
}

impl Gaps {
    /// The REST side of `spec`: its backfiller and its stall check (started here), resumed
    /// from its resume file; inert for a token without an API access token.
    pub(crate) async fn new(spec: &TokenSpec, context: GapsContext<'_>) -> Gaps {
        let Some(api) = &spec.api else {
            return Gaps::inert();
        };
        let GapsContext {
            settings,
            events,
            status,
            cancel,
            refresh_profile,
        } = context;
        let cancel = cancel.child_token();
        // One HTTP client (one connection pool) for the backfill and the stall check.
        let client = profile::client(&profile::Lookup::Profile(api.clone()), settings)
            .map_err(
                |e| error!(token = %spec.name, error = %e, "backfill and stall check disabled"),
            )
            .ok();
        let account_api = || {
            let client = client.clone()?;
            Some(AccountApi::new(spec.name.clone(), api.clone(), client))
        };
        let tracker = api
            .stall_after
            .map(|_| Arc::new(Mutex::new(ActivityTracker::default())));
        let backfiller = api.backfill.clone().and_then(|backfill| {
            let context = BackfillContext {
                backfill,
                max_nesting: settings.max_nesting,
                events: events.clone(),
                status: status.clone(),
                cancel: cancel.clone(),
                tracker: tracker.clone(),
            };
            Some(Arc::new(Backfiller::new(spec, account_api()?, context)))
        });
        // A stall an ended task of this token showed can no longer end: this task finds its own.
        status.stall_over();
        let stall = api
            .stall_after
            .zip(tracker)
            .and_then(|(stall_after, tracker)| {
                let watch = StallWatch {
                    token: spec.name.clone(),
                    api: account_api()?,
                    stall_after,
                    tracker: tracker.clone(),
                    backfiller: backfiller.clone(),
                    refresh_profile,
                    status: status.clone(),
                    cancel: cancel.clone(),
                };
                tokio::spawn(watch.run());
                Some(tracker)
            });
        let resume = api.backfill.as_ref().and_then(|b| b.resume_dir.as_deref());
        let resume = resume
            .filter(|_| backfiller.is_some())
            .map(|dir| ResumeFile::new(dir, &spec.name, api.account_id));
        let mut gaps = Gaps {
            account_id: api.account_id,
            backfiller,
            stall,
            last_healthy: None,
            resume,
            rotation_lookback: api.refresh_interval,
            token_shown_at: None,
            _stop: Some(cancel.drop_guard()),
        };
        gaps.resume_from_file().await;
        gaps
    }

    /// The REST side of a token without an API access token: nothing tracked.
    fn inert() -> Gaps {
        Gaps {
            account_id: 0,
            backfiller: None,
            stall: None,
            last_healthy: None,
            resume: None,
            rotation_lookback: Duration::ZERO,
            token_shown_at: None,
            _stop: None,
        }
    }

    /// Starts from where the previous run left: its last healthy moment, its last message ids.
    async fn resume_from_file(&mut self) {
        let (Some(file), Some(backfiller)) = (&self.resume, &self.backfiller) else {
            return;
        };
        let Some(point) = file.load().await else {
            return;
        };
        for (conversation, message) in point.last_messages {
            backfiller.seen(conversation, message, point.last_healthy);
        }
        self.last_healthy = Some(point.last_healthy);
    }

    /// Where a restart would resume from now: no later than the last healthy moment, a gap
    /// not backfilled yet, or activity the stall check still waits for. `None` before the
    /// first healthy moment.
    fn resume_point(&self, last_healthy: SystemTime) -> Option<ResumePoint> {
        let backfiller = self.backfiller.as_ref()?;
        let from = [
            Some(last_healthy),
            backfiller.earliest_unfinished(),
            self.earliest_pending(),
        ]
        .into_iter()
        .flatten()
        .min()?;
        Some(ResumePoint {
            last_healthy: from,
            // Only what was delivered by then: a later id would make a restart read past the
            // messages of a gap not backfilled yet.
            last_messages: backfiller.last_ids_before(from),
        })
    }

    /// The earliest activity the stall check waits for the cable to deliver.
    fn earliest_pending(&self) -> Option<SystemTime> {
        self.stall
            .as_ref()?
            .lock()
            .expect("tracker lock")
            .earliest_pending()
    }

    /// A ping or event arrived while the subscription was confirmed.
    pub(crate) fn healthy(&mut self, at: SystemTime) {
        if self.backfiller.is_none() {
            return;
        }
        self.last_healthy = Some(at);
        if !self.resume.as_ref().is_some_and(ResumeFile::due) {
            return;
        }
        let point = self.resume_point(at);
        if let (Some(file), Some(point)) = (&mut self.resume, point) {
            file.save_in_background(&point);
        }
    }

    /// The token task stops: the resume file gets where a restart resumes from.
    pub(crate) async fn stopped(&self) {
        let point = self.last_healthy.and_then(|at| self.resume_point(at));
        if let (Some(file), Some(point)) = (&self.resume, point) {
            file.save(&point).await;
        }
    }

    /// The socket delivered `event`: a message is remembered, so that no backfill sends it
    /// again, and the activity it shows counts as delivered for the stall check.
    pub(crate) fn delivered(&self, event: &Event, status: &TokenReporter) {
        if self.backfiller.is_none() && self.stall.is_none() {
            return;
        }
        let Some(delivered) = LiveActivity::of(event, self.account_id) else {
            return;
        };
        if let (Some(backfiller), Some(message)) = (&self.backfiller, delivered.message) {
            if &*event.name == "message.created" {
                backfiller.seen(delivered.conversation, message, event.received_at);
            }
        }
        let (Some(stall), Some(activity)) = (&self.stall, delivered.activity) else {
            return;
        };
        let ended = stall.lock().expect("tracker lock").delivered(
            delivered.conversation,
            activity,
            event.received_at,
            status,
        );
        if let Some(lasted) = ended {
            info!(token = %event.token, stalled_for = ?lasted, "the cable delivers again after a stall");
        }
    }

    /// The subscription is confirmed: if it was healthy before, the gap since is backfilled.
    pub(crate) fn confirmed(&mut self) {
        let now = SystemTime::now();
        let since = self.last_healthy.replace(now);
        self.start_afresh(since, now);
    }

    /// The profile showed the subscription's pubsub token again: it was good until now.
    pub(crate) fn token_still_shown(&mut self) {
        self.token_shown_at = Some(SystemTime::now());
    }

    /// The subscription moved to a rotated pubsub token on the same socket. The old one went
    /// quiet at some moment since it was last known good (or, not known since, at most
    /// `refresh_interval` ago): that span is backfilled (what the socket did deliver is
    /// skipped), at most `backfill.max_gap` of it, since the token most likely rotated well
    /// within and a longer gap would be given up whole.
    pub(crate) fn rotated(&mut self) {
        let now = SystemTime::now();
        let lookback = now.checked_sub(self.rotation_lookback).unwrap_or(now);
        let mut quiet_since = self.token_shown_at.unwrap_or(lookback);
        if let Some(max_gap) = self.backfiller.as_ref().map(|b| b.max_gap()) {
            quiet_since = quiet_since.max(now.checked_sub(max_gap).unwrap_or(now));
        }
        self.start_afresh(Some(quiet_since), now);
    }

    /// A new subscription is confirmed at `now`: the stall check starts afresh and, with
    /// backfill, the span the socket may have missed, from `since`, is backfilled in its own
    /// task. It starts no later than activity the stall check was still waiting for: pings go
    /// on while broadcasting stalls, so the last healthy moment alone could start it too late.
    fn start_afresh(&mut self, since: Option<SystemTime>, now: SystemTime) {
        self.token_shown_at = Some(now);
        let pending = self.earliest_pending();
        if let Some(stall) = &self.stall {
            stall.lock().expect("tracker lock").resubscribed(now);
        }
        if let (Some(backfiller), Some(since)) = (&self.backfiller, since) {
            let start = pending.map_or(since, |pending| pending.min(since));
            backfiller.enqueue(Gap { start, end: now });
        }
    }

    /// The socket ended: the stall check pauses until the next confirm.
    pub(crate) fn ended(&self) {
        if let Some(stall) = &self.stall {
            stall.lock().expect("tracker lock").unsubscribed();
        }
    }
}
