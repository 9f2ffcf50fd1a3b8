//! Reading an account's conversations and messages over Chatwoot's REST API with a user's
//! access token: what a backfill and a stall check ask. One client per token; every answer
//! bounded in bytes, `429` waited out as `Retry-After` says, other failures retried a few times.

use std::time::Duration;

use reqwest::header::{HeaderValue, ACCEPT, RETRY_AFTER};
use reqwest::StatusCode;
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::{Map, Value};
use std::sync::Arc;
use tokio::time::sleep;
use tracing::warn;

use crate::source::settings::ApiToken;

/// Bounds the body of one REST answer. A page of 100 messages is some 100-300 KB; a larger
/// answer is refused before it is parsed.
pub const MAX_REST_RESPONSE_BYTES: usize = 8 * 1024 * 1024;

/// Bounds the `429` answers one request waits out before it fails.
pub const MAX_THROTTLED_RETRIES: u32 = 60;

/// Bounds the wait of one `Retry-After` (a longer one is cut to this).
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(60);

/// Attempts of one request that fails otherwise (transport, 5xx) before it fails.
const MAX_FAILED_ATTEMPTS: u32 = 4;

/// The header Chatwoot reads a user's access token from.
const ACCESS_TOKEN_HEADER: &str = "api_access_token";

/// Why a REST request failed. Never holds the access token, which travels in a header.
#[derive(Debug, thiserror::Error)]
pub enum RestError {
    /// A non-success status other than 429.
    #[error("{url} answered HTTP {status}")]
    Status {
        /// The request URL (no credentials).
        url: String,
        /// The status code.
        status: u16,
    },
    /// Still `429` after [`MAX_THROTTLED_RETRIES`] waits.
    #[error("{url} kept answering 429 Too Many Requests ({MAX_THROTTLED_RETRIES} times)")]
    Throttled {
        /// The request URL.
        url: String,
    },
    /// Connect, TLS, timeout or a broken body.
    #[error("GET {url} failed: {reason}")]
    Transport {
        /// The request URL.
        url: String,
        /// What went wrong, without the request's headers.
        reason: String,
    },
    /// The body exceeds [`MAX_REST_RESPONSE_BYTES`].
    #[error("{url} answered more than {MAX_REST_RESPONSE_BYTES} bytes")]
    TooLarge {
        /// The request URL.
        url: String,
    },
    /// Not the JSON shape Chatwoot answers.
    #[error("{url} answered something that is not Chatwoot's: {reason}")]
    Malformed {
        /// The request URL.
        url: String,
        /// The parser's complaint.
        reason: String,
    },
}

/// What one answer was, short of success.
enum Attempt {
    /// 429: wait this long, then ask again.
    Throttled(Duration),
    /// Worth retrying (transport, 5xx).
    Retry(RestError),
    /// Not worth retrying.
    Fail(RestError),
}

/// The list of conversations: `{"data": {"payload": [...]}}`.
#[derive(Deserialize)]
pub(crate) struct ConversationList {
    /// The envelope.
    data: ConversationPayload,
}

/// `data` of the conversation list.
#[derive(Deserialize)]
struct ConversationPayload {
    /// The conversations, each kept whole for its event.
    payload: Vec<Map<String, Value>>,
}

impl ConversationList {
    /// The conversations, each whole.
    pub(crate) fn into_conversations(self) -> Vec<Map<String, Value>> {
        self.data.payload
    }
}

/// One token's REST client on one account.
pub(crate) struct AccountApi {
    /// The token's name, for logs.
    token: Arc<str>,
    /// The REST API, the account and the access token.
    api: ApiToken,
    /// The HTTP client (the profile's settings: TLS, timeouts, no redirects).
    client: reqwest::Client,
}

impl AccountApi {
    /// The client of token `token` reading `api` with `client`.
    pub(crate) fn new(token: Arc<str>, api: ApiToken, client: reqwest::Client) -> AccountApi {
        AccountApi { token, api, client }
    }

    /// The account whose conversations are read.
    pub(crate) fn account_id(&self) -> u64 {
        self.api.account_id
    }

    /// `{api_url}/api/v1/accounts/{account_id}`.
    pub(crate) fn account_url(&self) -> String {
        format!(
            "{}/api/v1/accounts/{}",
            self.api.api_url.trim_end_matches('/'),
            self.api.account_id
        )
    }

    /// The conversations of every status updated within the last `seconds`, each whole.
    /// Chatwoot answers these unpaged (its `ConversationFinder` skips paging with
    /// `updated_within`); [`MAX_REST_RESPONSE_BYTES`] bounds them.
    pub(crate) async fn conversations_updated_within(
        &self,
        seconds: u64,
    ) -> Result<Vec<Map<String, Value>>, RestError> {
        let url = format!(
            "{}/conversations?status=all&updated_within={seconds}",
            self.account_url()
        );
        let list: ConversationList = self.get(&url).await?;
        Ok(list.into_conversations())
    }

    /// GETs `url` as JSON, waiting out 429s and retrying transient failures, within bounds.
    pub(crate) async fn get<T: DeserializeOwned>(&self, url: &str) -> Result<T, RestError> {
        self.get_sized(url).await.map(|(value, _)| value)
    }

    /// [`AccountApi::get`], with the size of the body read: a caller reading many pages
    /// bounds their sum.
    pub(crate) async fn get_sized<T: DeserializeOwned>(
        &self,
        url: &str,
    ) -> Result<(T, usize), RestError> {
        let (mut throttled, mut failed) = (0u32, 0u32);
        loop {
            let error = match self.attempt(url).await {
                Ok(body) => {
                    let value =
                        serde_json::from_slice(&body).map_err(|e| RestError::Malformed {
                            url: url.to_owned(),
                            reason: e.to_string(),
                        })?;
                    return Ok((value, body.len()));
                }
                Err(Attempt::Throttled(wait)) => {
                    throttled += 1;
                    if throttled > MAX_THROTTLED_RETRIES {
                        return Err(RestError::Throttled {
                            url: url.to_owned(),
                        });
                    }
                    warn!(token = %self.token, wait = ?wait, "the REST API answered 429; waiting");
                    sleep(wait).await;
                    continue;
                }
                Err(Attempt::Retry(error)) => error,
                Err(Attempt::Fail(error)) => return Err(error),
            };
            failed += 1;
            if failed >= MAX_FAILED_ATTEMPTS {
                return Err(error);
            }
            warn!(token = %self.token, error = %error, "a REST request failed; retrying");
            sleep(Duration::from_millis(250) * 2u32.pow(failed)).await;
        }
    }

    /// One GET: the body, at most [`MAX_REST_RESPONSE_BYTES`].
    async fn attempt(&self, url: &str) -> Result<Vec<u8>, Attempt> {
        let transport = |e: reqwest::Error| {
            Attempt::Retry(RestError::Transport {
                url: url.to_owned(),
                reason: e.without_url().to_string(),
            })
        };
        let mut token = HeaderValue::from_str(self.api.access_token.expose()).map_err(|_| {
            Attempt::Fail(RestError::Transport {
                url: url.to_owned(),
                reason: "the API access token holds characters not allowed in an HTTP header"
                    .into(),
            })
        })?;
        token.set_sensitive(true);
        let mut response = self
            .client
            .get(url)
            .header(ACCESS_TOKEN_HEADER, token)
            .header(ACCEPT, "application/json")
            .send()
            .await
            .map_err(transport)?;
        let status = response.status();
        if status == StatusCode::TOO_MANY_REQUESTS {
            return Err(Attempt::Throttled(retry_after(response.headers())));
        }
        if !status.is_success() {
            let error = RestError::Status {
                url: url.to_owned(),
                status: status.as_u16(),
            };
            return Err(if status.is_server_error() {
                Attempt::Retry(error)
            } else {
                Attempt::Fail(error)
            });
        }
        let mut body = Vec::new();
        while let Some(chunk) = response.chunk().await.map_err(transport)? {
            if body.len() + chunk.len() > MAX_REST_RESPONSE_BYTES {
                return Err(Attempt::Fail(RestError::TooLarge {
                    url: url.to_owned(),
                }));
            }
            body.extend_from_slice(&chunk);
        }
        Ok(body)
    }
}

/// The wait a 429 asks for: `Retry-After` in seconds, at least one second and at most
/// [`MAX_RETRY_AFTER`]; one second when absent or given as a date.
fn retry_after(headers: &reqwest::header::HeaderMap) -> Duration {
    let seconds = headers
        .get(RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .unwrap_or(1);
    Duration::from_secs(seconds.max(1)).min(MAX_RETRY_AFTER)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_is_read_and_bounded() {
        let mut headers = reqwest::header::HeaderMap::new();
        assert_eq!(retry_after(&headers), Duration::from_secs(1));
        headers.insert(RETRY_AFTER, HeaderValue::from_static("3"));
        assert_eq!(retry_after(&headers), Duration::from_secs(3));
        headers.insert(RETRY_AFTER, HeaderValue::from_static("86400"));
        assert_eq!(retry_after(&headers), MAX_RETRY_AFTER);
        headers.insert(
            RETRY_AFTER,
            HeaderValue::from_static("Wed, 21 Oct 2015 07:28:00 GMT"),
        );
        assert_eq!(retry_after(&headers), Duration::from_secs(1));
    }
}
