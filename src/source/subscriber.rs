//! What a token task subscribes with: the token's own pubsub token for good, or, for a token
//! given as an API access token or a contact given by its identifiers, whatever Chatwoot's API
//! says now (see [`profile`](super::profile)).

use std::future::pending;
use std::sync::Arc;

use tokio::sync::{watch, Notify};
use tokio_util::sync::{CancellationToken, DropGuard};
use tracing::error;

use crate::backoff::Backoff;
use crate::source::profile::{self, Lookup, ProfileWatcher, Subscriber};
use crate::source::protocol;
use crate::source::settings::{CableSettings, TokenSpec};
use crate::status::{TokenReporter, TokenState};

/// The current subscriber of one token task, and news of the next.
pub(crate) struct Subscribers {
    /// What the next subscription is made with.
    current: Subscriber,
    /// The profile watcher's channel; `None` for a token written with its pubsub token.
    updates: Option<watch::Receiver<Option<Subscriber>>>,
    /// Asks the watcher to read the profile now.
    refresh_now: Option<Arc<Notify>>,
    /// Stops the watcher when the token task ends (or panics).
    _watcher: Option<DropGuard>,
}

impl Subscribers {
    /// The subscribers of `spec`: for an API token, starts its profile watcher and waits for
    /// the first profile. `None` when cancelled first.
    pub(crate) async fn start(
        spec: &TokenSpec,
        settings: &CableSettings,
        status: &TokenReporter,
        cancel: &CancellationToken,
    ) -> Option<Subscribers> {
        let Some(lookup) = Lookup::of(spec) else {
            return Some(Subscribers {
                current: Subscriber::fixed(spec),
                updates: None,
                refresh_now: None,
                _watcher: None,
            });
        };
        let client = match profile::client(&lookup, settings) {
            Ok(client) => client,
            Err(e) => {
                error!(token = %spec.name, error = %e, "cannot read the profile");
                status.fail(TokenState::BackingOff, e);
                cancel.cancelled().await;
                return None;
            }
        };
        let (sender, mut updates) = watch::channel(None);
        let refresh_now = Arc::new(Notify::new());
        let watcher_cancel = cancel.child_token();
        let watcher = ProfileWatcher {
            name: spec.name.clone(),
            lookup,
            client,
            status: status.clone(),
            subscriber: sender,
            refresh_now: refresh_now.clone(),
            backoff: Backoff::new(settings.reconnect.initial, settings.reconnect.max),
            cancel: watcher_cancel.clone(),
        };
        tokio::spawn(watcher.run());
        let guard = watcher_cancel.drop_guard();
        let current = tokio::select! {
            _ = cancel.cancelled() => return None,
            first = updates.wait_for(Option::is_some) => first.ok()?.clone()?,
        };
        Some(Subscribers {
            current,
            updates: Some(updates),
            refresh_now: Some(refresh_now),
            _watcher: Some(guard),
        })
    }

    /// The identifier of the current subscriber.
    pub(crate) fn identifier(&self) -> String {
        protocol::identifier(&self.current.pubsub_token, &self.current.identity)
    }

    /// The next subscriber the profile gives (possibly the same again); never for a token
    /// written with its pubsub token. Cancel-safe.
    pub(crate) async fn changed(&mut self) -> Subscriber {
        let Some(updates) = &mut self.updates else {
            return pending().await;
        };
        loop {
            if updates.changed().await.is_err() {
                // The watcher stopped: the task is being cancelled.
                return pending().await;
            }
            if let Some(next) = updates.borrow_and_update().clone() {
                self.current = next.clone();
                return next;
            }
        }
    }

    /// What asks the profile watcher to read the profile now, for others that notice a silent
    /// subscription (the stall check); `None` for a token written with its pubsub token.
    pub(crate) fn refresh_handle(&self) -> Option<Arc<Notify>> {
        self.refresh_now.clone()
    }

    /// Asks for the profile to be read now, when a subscription went unconfirmed; nothing for
    /// a token written with its pubsub token.
    pub(crate) fn refresh_now(&self) {
        if let Some(notify) = &self.refresh_now {
            notify.notify_one();
        }
    }
}
