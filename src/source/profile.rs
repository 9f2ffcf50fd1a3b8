//! Tokens from the API: a token given as a user's API access token learns its pubsub token,
//! user id and accounts from `GET /api/v1/profile`, and a contact given by its inbox and
//! contact identifiers learns its pubsub token from the public contact API. Both learn it
//! again every `refresh_interval` and whenever the subscription goes unconfirmed, so a pubsub
//! token that Chatwoot rotated (a password change) is picked up without an operator.
//!
//! A `ProfileWatcher` runs beside the token's socket and publishes what to subscribe with on
//! a watch channel; the socket switches over when it changes (see `cable`).

use std::sync::Arc;
use std::time::Duration;

use reqwest::header::{HeaderValue, ACCEPT};
use reqwest::StatusCode;
use serde::Deserialize;
use tokio::sync::{watch, Notify};
use tokio::time::sleep;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::backoff::Backoff;
use crate::source::settings::{ApiToken, CableSettings, ContactToken, Identity, TokenSpec};
use crate::status::{TokenReporter, TokenState};
use crate::tls::{self, ClientTls};
use crate::types::Secret;

/// Bounds the body of a profile or contact answer. Chatwoot's profile is about 1 KB plus some
/// 200 bytes per account, a contact well under 1 KB; a larger answer is not Chatwoot's and is
/// refused before it is parsed.
pub const MAX_PROFILE_BYTES: usize = 256 * 1024;

/// The header Chatwoot reads a user's access token from.
const ACCESS_TOKEN_HEADER: &str = "api_access_token";

/// What a subscription is made with: the pubsub token and whose it is.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Subscriber {
    /// The bearer token of the subscription.
    pub(crate) pubsub_token: Secret,
    /// Whose token it is, which decides the identifier.
    pub(crate) identity: Identity,
}

impl Subscriber {
    /// The subscriber a token written with its pubsub token has, for good.
    pub(crate) fn fixed(spec: &TokenSpec) -> Subscriber {
        Subscriber {
            pubsub_token: spec.pubsub_token.clone(),
            identity: spec.identity.clone(),
        }
    }
}

/// Why the profile or the contact gave no subscriber. Never holds the access token, the
/// contact identifier (the URLs shown leave it out) or the pubsub token.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProfileError {
    /// 401 or 403: the access token is wrong, revoked, or an agent bot's (which the profile
    /// endpoint refuses).
    #[error("API access token refused: {url} answered HTTP {status}; check the token's api_access_token (a user's, not an agent bot's)")]
    Refused {
        /// The profile URL.
        url: String,
        /// The status code.
        status: u16,
    },
    /// Any other non-success status.
    #[error("{url} answered HTTP {status}")]
    Status {
        /// The profile URL.
        url: String,
        /// The status code.
        status: u16,
    },
    /// Connect, TLS, timeout or a broken body.
    #[error("GET {url} failed: {reason}")]
    Transport {
        /// The profile URL.
        url: String,
        /// What went wrong, without the request's headers.
        reason: String,
    },
    /// The body exceeds [`MAX_PROFILE_BYTES`].
    #[error("{url} answered more than {MAX_PROFILE_BYTES} bytes; that is not Chatwoot's answer")]
    TooLarge {
        /// The profile URL.
        url: String,
    },
    /// Not a JSON object with `id`, `pubsub_token` and `accounts` (a profile) or with
    /// `pubsub_token` (a contact).
    #[error("{url} answered something that is not Chatwoot's answer: {reason}")]
    Malformed {
        /// The profile URL.
        url: String,
        /// The parser's complaint (class and position only).
        reason: String,
    },
    /// The user is not a member of the configured account.
    #[error("token `{token}`: account_id {account_id} is not among the accounts of the API access token's user (accounts: {available:?})")]
    AccountNotFound {
        /// The token's name.
        token: String,
        /// The configured account.
        account_id: u64,
        /// The accounts the profile lists.
        available: Vec<u64>,
    },
    /// 404 on the public contact API: the inbox has no such contact, or there is no such
    /// inbox. Names the inbox, never the contact identifier.
    #[error("token `{token}`: inbox `{inbox}` has no contact with the configured contact_identifier, or there is no such inbox ({url} answered HTTP 404); check inbox_identifier and contact_identifier")]
    UnknownContact {
        /// The token's name.
        token: String,
        /// The configured inbox identifier.
        inbox: String,
        /// The contact URL without the contact identifier.
        url: String,
    },
    /// The configured `user_id` is not the profile's.
    #[error("token `{token}`: user_id {configured} is given, but the API access token belongs to user {actual}")]
    UserMismatch {
        /// The token's name.
        token: String,
        /// The configured user id.
        configured: u64,
        /// The profile's id.
        actual: u64,
    },
}

impl ProfileError {
    /// Whether the credential itself was refused: the access token, or the contact's
    /// identifiers.
    fn refused(&self) -> bool {
        matches!(
            self,
            ProfileError::Refused { .. } | ProfileError::UnknownContact { .. }
        )
    }
}

/// The part of Chatwoot's profile answer the bridge needs.
#[derive(Deserialize)]
struct Profile {
    /// The user's id, the `user_id` of the identifier.
    id: u64,
    /// The user's current pubsub token.
    pubsub_token: Secret,
    /// The accounts the user belongs to.
    accounts: Vec<ProfileAccount>,
}

/// The part of Chatwoot's public contact answer the bridge needs (it also has `id`,
/// `source_id`, `name`, `email` and `phone_number`).
#[derive(Deserialize)]
struct PublicContact {
    /// The contact's current pubsub token.
    pubsub_token: Secret,
}

/// Where a token's subscriber is read from, when the config does not give its pubsub token.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Lookup {
    /// A user's API access token: the profile.
    Profile(ApiToken),
    /// A contact's identifiers: the public contact API.
    Contact(ContactToken),
}

impl Lookup {
    /// The lookup of `spec`; `None` for a token written with its pubsub token.
    pub(crate) fn of(spec: &TokenSpec) -> Option<Lookup> {
        match (&spec.api, &spec.contact) {
            (Some(api), _) => Some(Lookup::Profile(api.clone())),
            (None, Some(contact)) => Some(Lookup::Contact(contact.clone())),
            (None, None) => None,
        }
    }

    /// How often the subscriber is read again.
    fn refresh_interval(&self) -> Duration {
        match self {
            Lookup::Profile(api) => api.refresh_interval,
            Lookup::Contact(contact) => contact.refresh_interval,
        }
    }

    /// The TLS of an `https://` API URL.
    fn tls(&self) -> Option<&ClientTls> {
        match self {
            Lookup::Profile(api) => api.tls.as_ref(),
            Lookup::Contact(contact) => contact.tls.as_ref(),
        }
    }
}

/// One account of the profile.
#[derive(Deserialize)]
struct ProfileAccount {
    /// The account id.
    id: u64,
}

/// The HTTP client of one token's reads: its TLS, timeout, and no redirects (a redirect could
/// carry the access token header, or the contact identifier in the path, to another host).
pub(crate) fn client(lookup: &Lookup, settings: &CableSettings) -> Result<reqwest::Client, String> {
    let mut builder = reqwest::Client::builder()
        .connect_timeout(settings.connect_timeout)
        .timeout(settings.connect_timeout)
        .redirect(reqwest::redirect::Policy::none());
    if let Some(tls) = lookup.tls() {
        builder = tls.reqwest(builder);
    }
    builder
        .build()
        .map_err(|e| format!("cannot build the HTTP client of Chatwoot's API: {e}"))
}

/// Reads the subscriber of `token` once, from the profile or the public contact API.
pub(crate) async fn fetch(
    client: &reqwest::Client,
    token: &str,
    lookup: &Lookup,
) -> Result<Subscriber, ProfileError> {
    match lookup {
        Lookup::Profile(api) => fetch_profile(client, token, api).await,
        Lookup::Contact(contact) => fetch_contact(client, token, contact).await,
    }
}

/// What an endpoint answered.
enum Reply {
    /// A success, with its body (within [`MAX_PROFILE_BYTES`]).
    Body(Vec<u8>),
    /// Any other status.
    Status(StatusCode),
}

/// Sends `request` and reads a success's body up to [`MAX_PROFILE_BYTES`]; `url` is the URL
/// errors show.
async fn get(request: reqwest::RequestBuilder, url: &str) -> Result<Reply, ProfileError> {
    let transport = |e: reqwest::Error| ProfileError::Transport {
        url: url.to_owned(),
        reason: describe(e),
    };
    let mut response = request
        .header(ACCEPT, "application/json")
        .send()
        .await
        .map_err(transport)?;
    let status = response.status();
    if !status.is_success() {
        return Ok(Reply::Status(status));
    }
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await.map_err(transport)? {
        if body.len() + chunk.len() > MAX_PROFILE_BYTES {
            return Err(ProfileError::TooLarge {
                url: url.to_owned(),
            });
        }
        body.extend_from_slice(&chunk);
    }
    Ok(Reply::Body(body))
}

/// `body` as a `T`, or what is wrong with it (class and position only: never its text).
fn parse<T: serde::de::DeserializeOwned>(body: &[u8], url: &str) -> Result<T, ProfileError> {
    serde_json::from_slice(body).map_err(|e| ProfileError::Malformed {
        url: url.to_owned(),
        reason: format!(
            "{:?} error at line {} column {}",
            e.classify(),
            e.line(),
            e.column()
        ),
    })
}

/// Reads the contact once from the public contact API.
async fn fetch_contact(
    client: &reqwest::Client,
    token: &str,
    contact: &ContactToken,
) -> Result<Subscriber, ProfileError> {
    let shown = contact.shown_url();
    let mut url = reqwest::Url::parse(&contact.api_url).map_err(|e| ProfileError::Transport {
        url: shown.clone(),
        reason: format!("chatwoot.api_url is not a URL ({e})"),
    })?;
    url.path_segments_mut()
        .map_err(|()| ProfileError::Transport {
            url: shown.clone(),
            reason: "chatwoot.api_url cannot take a path".into(),
        })?
        .pop_if_empty()
        .extend([
            "public",
            "api",
            "v1",
            "inboxes",
            &contact.inbox_identifier,
            "contacts",
            contact.contact_identifier.expose(),
        ]);
    match get(client.get(url), &shown).await? {
        Reply::Status(StatusCode::NOT_FOUND) => Err(ProfileError::UnknownContact {
            token: token.to_owned(),
            inbox: contact.inbox_identifier.clone(),
            url: shown,
        }),
        Reply::Status(status) => Err(ProfileError::Status {
            url: shown,
            status: status.as_u16(),
        }),
        Reply::Body(body) => {
            let answer: PublicContact = parse(&body, &shown)?;
            Ok(Subscriber {
                pubsub_token: answer.pubsub_token,
                identity: Identity::Contact,
            })
        }
    }
}

/// Reads the profile once and picks the subscriber of `token`'s account.
async fn fetch_profile(
    client: &reqwest::Client,
    token: &str,
    api: &ApiToken,
) -> Result<Subscriber, ProfileError> {
    let url = api.profile_url();
    let mut value =
        HeaderValue::from_str(api.access_token.expose()).map_err(|_| ProfileError::Transport {
            url: url.clone(),
            reason: "the API access token holds characters not allowed in an HTTP header".into(),
        })?;
    value.set_sensitive(true);
    let request = client.get(&url).header(ACCESS_TOKEN_HEADER, value);
    match get(request, &url).await? {
        Reply::Status(status @ (StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN)) => {
            Err(ProfileError::Refused {
                url,
                status: status.as_u16(),
            })
        }
        Reply::Status(status) => Err(ProfileError::Status {
            url,
            status: status.as_u16(),
        }),
        Reply::Body(body) => choose(parse(&body, &url)?, token, api),
    }
}

/// The subscriber of the configured account, checked against the profile.
fn choose(profile: Profile, token: &str, api: &ApiToken) -> Result<Subscriber, ProfileError> {
    if let Some(configured) = api.user_id {
        if configured != profile.id {
            return Err(ProfileError::UserMismatch {
                token: token.to_owned(),
                configured,
                actual: profile.id,
            });
        }
    }
    if !profile.accounts.iter().any(|a| a.id == api.account_id) {
        return Err(ProfileError::AccountNotFound {
            token: token.to_owned(),
            account_id: api.account_id,
            available: profile.accounts.iter().map(|a| a.id).collect(),
        });
    }
    Ok(Subscriber {
        pubsub_token: profile.pubsub_token,
        identity: Identity::Agent {
            account_id: api.account_id,
            user_id: profile.id,
        },
    })
}

/// A transport error in words, with the TLS explanation the cable gives too; without its URL,
/// which may hold a contact identifier (the error's `url` field shows the safe one).
fn describe(error: reqwest::Error) -> String {
    use std::error::Error as _;
    let error = error.without_url();
    let mut source = error.source();
    while let Some(cause) = source {
        if let Some(io) = cause.downcast_ref::<std::io::Error>() {
            if let Some(explained) = tls::explain_failure(io, "chatwoot.tls") {
                return explained;
            }
        }
        source = cause.source();
    }
    if error.is_timeout() {
        return "timed out (chatwoot.connect_timeout)".into();
    }
    // Without its URL, reqwest's message names the failure only, never the request's headers.
    error.to_string()
}

/// Keeps one token's subscriber current: reads the profile or the contact at start, every
/// `refresh_interval`, and when asked, and publishes a changed subscriber.
pub(crate) struct ProfileWatcher {
    /// The token's name, for logs and errors.
    pub(crate) name: Arc<str>,
    /// What to read (the profile or the contact), and how often.
    pub(crate) lookup: Lookup,
    /// Its HTTP client.
    pub(crate) client: reqwest::Client,
    /// The token's status cell: the state before the first subscriber, the rotations after.
    pub(crate) status: TokenReporter,
    /// Where the current subscriber is published; `None` until the first profile read.
    pub(crate) subscriber: watch::Sender<Option<Subscriber>>,
    /// Rings when the socket wants the profile read now (an unconfirmed subscription).
    pub(crate) refresh_now: Arc<Notify>,
    /// Spaces the reads after a failure.
    pub(crate) backoff: Backoff,
    /// Stops the watcher with its token task.
    pub(crate) cancel: CancellationToken,
}

impl ProfileWatcher {
    /// Reads the profile until cancelled.
    pub(crate) async fn run(mut self) {
        loop {
            let wait = match fetch(&self.client, &self.name, &self.lookup).await {
                Ok(subscriber) => {
                    self.publish(subscriber);
                    self.backoff.reset();
                    self.lookup.refresh_interval()
                }
                Err(e) => {
                    let delay = self.backoff.next_delay();
                    self.failed(&e, delay);
                    delay
                }
            };
            tokio::select! {
                _ = self.cancel.cancelled() => return,
                _ = self.refresh_now.notified() => {}
                _ = sleep(wait) => {}
            }
        }
    }

    /// Publishes `subscriber`, also when unchanged: a socket whose switch to it failed tries
    /// again. A changed pubsub token is a rotation.
    fn publish(&self, subscriber: Subscriber) {
        let name = &self.name;
        match &*self.subscriber.borrow() {
            Some(old) if old.pubsub_token != subscriber.pubsub_token => {
                warn!(token = %name, "the pubsub token changed (Chatwoot rotates it when the user's password changes); subscribing with the new one");
                self.status.rotated();
            }
            Some(_) => {}
            None => debug!(token = %name, "profile read"),
        }
        self.subscriber.send_replace(Some(subscriber));
    }

    /// Reports a failed read: as the token's state while there is no subscriber yet, else as
    /// its last error only (the socket keeps the subscriber it has).
    fn failed(&self, error: &ProfileError, retry_in: Duration) {
        warn!(token = %self.name, error = %error, retry_in = ?retry_in, "reading the pubsub token from Chatwoot's API failed");
        if self.subscriber.borrow().is_some() {
            self.status.note(error.to_string());
        } else if error.refused() {
            self.status
                .fail(TokenState::ApiTokenRefused, error.to_string());
        } else {
            self.status.fail(TokenState::BackingOff, error.to_string());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn api(user_id: Option<u64>) -> ApiToken {
        ApiToken {
            access_token: Secret::new("access-SECRET"),
            api_url: "http://127.0.0.1:1".into(),
            account_id: 7,
            user_id,
            refresh_interval: Duration::from_secs(300),
            tls: None,
            backfill: None,
            stall_after: None,
        }
    }

    fn profile(text: &str) -> Profile {
        serde_json::from_str(text).unwrap()
    }

    const PROFILE: &str =
        r#"{"id":3,"name":"x","pubsub_token":"pub-SECRET","accounts":[{"id":1},{"id":7}]}"#;

    #[test]
    fn the_configured_account_and_the_profiles_user_make_the_subscriber() {
        let chosen = choose(profile(PROFILE), "agent", &api(None)).unwrap();
        assert_eq!(chosen.pubsub_token.expose(), "pub-SECRET");
        assert_eq!(
            chosen.identity,
            Identity::Agent {
                account_id: 7,
                user_id: 3
            }
        );
        assert!(choose(profile(PROFILE), "agent", &api(Some(3))).is_ok());
    }

    #[tokio::test]
    async fn a_failed_contact_read_shows_the_url_without_the_identifier() {
        let contact = ContactToken {
            inbox_identifier: "Inbox1".into(),
            contact_identifier: Secret::new("visitor-SECRET"),
            // Nobody listens on port 1: the connection is refused.
            api_url: "http://127.0.0.1:1".into(),
            refresh_interval: Duration::from_secs(300),
            tls: None,
        };
        let lookup = Lookup::Contact(contact);
        let client = client(&lookup, &CableSettings::default()).unwrap();
        let err = fetch(&client, "visitor", &lookup).await.unwrap_err();
        assert!(matches!(err, ProfileError::Transport { .. }), "{err:?}");
        let text = err.to_string();
        assert!(
            text.starts_with(
                "GET http://127.0.0.1:1/public/api/v1/inboxes/Inbox1/contacts/{contact_identifier} failed: "
            ),
            "{text}"
        );
        assert!(!text.contains("SECRET"), "{text}");
    }

    #[test]
    fn a_foreign_account_or_user_is_named_without_secrets() {
        let mut other = api(None);
        other.account_id = 9;
        let err = choose(profile(PROFILE), "agent", &other).unwrap_err();
        let text = err.to_string();
        assert_eq!(
            text,
            "token `agent`: account_id 9 is not among the accounts of the API access token's user (accounts: [1, 7])"
        );
        let err = choose(profile(PROFILE), "agent", &api(Some(4)))
            .unwrap_err()
            .to_string();
        assert!(err.contains("user_id 4") && err.contains("user 3"), "{err}");
        assert!(!err.contains("SECRET") && !text.contains("SECRET"));
    }
}
