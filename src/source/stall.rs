//! Noticing a socket that is connected, pinging and subscribed while Chatwoot broadcasts
//! nothing: Chatwoot's background workers (Sidekiq) broadcast every event but
//! `presence.update`, so when they are down the socket looks healthy and stays silent. A token
//! given as an API access token asks the REST API every quarter of `stall_after` which
//! conversations' `last_activity_at` moved, and compares with what the cable delivered. Activity
//! the cable has not delivered `stall_after` after the API first showed it is a stall: logged
//! loudly, counted, shown in `/status`, the profile read again (a rotated pubsub token goes
//! quiet the same way), and, with `backfill`, the stalled span backfilled.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use tokio::sync::Notify;
use tokio::time::sleep;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::source::activity::{listed_activity, ActivityTracker, Overdue};
use crate::source::backfill::{Backfiller, MAX_BACKFILL_CONVERSATIONS};
use crate::source::rest::{AccountApi, RestError};
use crate::status::TokenReporter;

/// Bounds how often a stall check may run, whatever `stall_after` says.
const MIN_CHECK_INTERVAL: Duration = Duration::from_millis(250);

/// How often the REST API is asked: a quarter of `stall_after`, so a stall is noticed at most a
/// quarter late.
pub fn check_interval(stall_after: Duration) -> Duration {
    (stall_after / 4).max(MIN_CHECK_INTERVAL)
}

/// Why a stall check did not complete.
#[derive(Debug, thiserror::Error)]
pub enum StallCheckError {
    /// The conversation list could not be read.
    #[error(transparent)]
    Rest(#[from] RestError),
    /// More conversations changed than one check reads.
    #[error("{count} conversations changed since the last check, more than {MAX_BACKFILL_CONVERSATIONS}")]
    TooManyConversations {
        /// How many the list held.
        count: usize,
    },
}

/// The stall check of one token: a task asking the REST API every [`check_interval`].
pub(crate) struct StallWatch {
    /// The token's name, for logs.
    pub(crate) token: Arc<str>,
    /// The REST client on the token's account.
    pub(crate) api: AccountApi,
    /// `stall_after`: how long activity may stay undelivered.
    pub(crate) stall_after: Duration,
    /// Shared with the socket, which reports what it delivered.
    pub(crate) tracker: Arc<Mutex<ActivityTracker>>,
    /// Fills the stalled span; `None` without `backfill`.
    pub(crate) backfiller: Option<Arc<Backfiller>>,
    /// Asks the profile watcher to read the profile now: a rotated pubsub token is silent too.
    pub(crate) refresh_profile: Option<Arc<Notify>>,
    /// The token's status cell: the stall's state and count.
    pub(crate) status: TokenReporter,
    /// The token task's cancellation.
    pub(crate) cancel: CancellationToken,
}

impl StallWatch {
    /// Checks every [`check_interval`] while subscribed, until cancelled.
    pub(crate) async fn run(self) {
        let interval = check_interval(self.stall_after);
        loop {
            tokio::select! {
                () = self.cancel.cancelled() => return,
                () = sleep(interval) => {}
            }
            if !self.tracker.lock().expect("tracker lock").checking() {
                continue;
            }
            let checked = tokio::select! {
                () = self.cancel.cancelled() => return,
                checked = self.check(interval) => checked,
            };
            if let Err(e) = checked {
                warn!(token = %self.token, error = %e, "the stall check could not read the REST API");
                self.status.note(format!("stall check failed: {e}"));
            }
        }
    }

    /// One check: lists what changed, and handles activity overdue.
    async fn check(&self, interval: Duration) -> Result<(), StallCheckError> {
        let window = self
            .tracker
            .lock()
            .expect("tracker lock")
            .window(SystemTime::now(), interval);
        let listed = match self.api.conversations_updated_within(window).await {
            Ok(listed) if listed.len() <= MAX_BACKFILL_CONVERSATIONS => listed,
            Ok(listed) => {
                self.skip_window();
                return Err(StallCheckError::TooManyConversations {
                    count: listed.len(),
                });
            }
            Err(e) => {
                if matches!(e, RestError::TooLarge { .. }) {
                    self.skip_window();
                }
                return Err(e.into());
            }
        };
        let now = (SystemTime::now(), Instant::now());
        let overdue = self.tracker.lock().expect("tracker lock").observe(
            listed.iter().filter_map(listed_activity),
            now,
            self.stall_after,
        );
        if let Some(overdue) = overdue {
            self.stalled(overdue, now.0);
        }
        Ok(())
    }

    /// A window too large to read is skipped, so the next asks for one interval again instead
    /// of failing the same way until a resubscribe: its activity is not checked.
    fn skip_window(&self) {
        warn!(token = %self.token,
            "the stall check skips a window with more changes than it reads: activity in it is not checked");
        self.tracker
            .lock()
            .expect("tracker lock")
            .skip_window(SystemTime::now());
    }

    /// Activity is overdue: says so, reads the profile again (at a stall's start) and
    /// backfills the span.
    fn stalled(&self, overdue: Overdue, now: SystemTime) {
        let new = self
            .tracker
            .lock()
            .expect("tracker lock")
            .stall(now, &self.status);
        if new {
            error!(token = %self.token, stall_after = ?self.stall_after, conversations = overdue.conversations,
                "CABLE STALLED: the REST API shows activity the subscribed socket has not delivered \
                 for stall_after; Chatwoot's background workers (Sidekiq) may be down, or the \
                 pubsub token rotated");
            // Once per stall: a rotation shows at the first read, and a long Sidekiq outage
            // need not cost a profile read per check.
            if let Some(refresh) = &self.refresh_profile {
                refresh.notify_one();
            }
        } else {
            warn!(token = %self.token, conversations = overdue.conversations,
                "the cable is still stalled: more activity it has not delivered");
        }
        let Some(backfiller) = &self.backfiller else {
            warn!(token = %self.token,
                "the stalled activity is not backfilled: backfill is off for this token");
            return;
        };
        info!(token = %self.token, "backfilling the stalled span");
        backfiller.enqueue(overdue.span(now));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_check_runs_every_quarter_of_stall_after_within_a_bound() {
        assert_eq!(
            check_interval(Duration::from_secs(120)),
            Duration::from_secs(30)
        );
        assert_eq!(
            check_interval(Duration::from_millis(100)),
            MIN_CHECK_INTERVAL
        );
    }
}
