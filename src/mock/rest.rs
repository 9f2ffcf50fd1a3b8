//! The REST endpoints a bridge reads, on the cable's listen address as in Chatwoot (one host
//! serves `/cable` and `/api`): a connection's request head is read first, and a WebSocket
//! upgrade goes to the cable while anything else is answered here with hyper's HTTP/1.
//!
//! - `GET /api/v1/profile` (header `api_access_token`): the user's id, pubsub token and accounts.
//! - `GET /public/api/v1/inboxes/{inbox_identifier}/contacts/{source_id}` (no token): a
//!   contact's `pubsub_token`, for contacts given [`super::MockContactInbox`].
//! - `GET /api/v1/accounts/{id}/conversations` with `status` (default `open`; `all`),
//!   `updated_within` (seconds; then not paged, as Chatwoot's `ConversationFinder`) and `page`
//!   ([`CONVERSATIONS_PER_PAGE`] a page, latest activity first).
//! - `GET /api/v1/accounts/{id}/conversations/{display_id}/messages` with `after` (at most
//!   [`MESSAGES_AFTER_LIMIT`] with a greater id, oldest first) or `before`, else the last
//!   [`MESSAGES_PAGE`].
//!
//! Conversations are those the user sees ([`super::MockRole`]): an agent outside the mock's inbox
//! lists none, and its messages are 401 as Chatwoot's `ConversationPolicy` answers (after 404 for
//! a conversation that does not exist).
//!
//! A missing or unknown token, or an account the user is not in, is 401; while throttled
//! ([`super::MockServer::set_rest_throttle`]) every request is 429 with `Retry-After`.

use std::convert::Infallible;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{HeaderValue, CONTENT_TYPE, RETRY_AFTER};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use serde_json::{json, Value};
use tokio::io::AsyncReadExt;
use tokio_util::sync::CancellationToken;
use tracing::debug;

use super::identity::MockUser;
use super::model::now_seconds;
use super::socket::{Stream, Wire};
use super::Shared;

/// Bounds a request head (request line and headers), for the cable's upgrade and REST alike;
/// a longer one closes the connection.
pub const MAX_REQUEST_HEAD_BYTES: usize = 16 << 10;

/// Bounds how long a client may take to send its request head.
pub const HEAD_READ_TIMEOUT: Duration = Duration::from_secs(5);

/// Conversations a page of the list holds (Chatwoot's `ConversationFinder`: 25).
pub const CONVERSATIONS_PER_PAGE: usize = 25;

/// Bounds the messages one `after=` answer holds (Chatwoot: 100).
pub const MESSAGES_AFTER_LIMIT: usize = 100;

/// Messages an answer without `after` holds (Chatwoot: the last 20).
pub const MESSAGES_PAGE: usize = 20;

/// Bounds a query parameter's value: every parameter the mock reads is a number or a status.
const MAX_PARAMETER_BYTES: usize = 32;

/// Why a connection's head could not be read.
#[derive(Debug, thiserror::Error)]
pub(super) enum HeadError {
    /// Longer than [`MAX_REQUEST_HEAD_BYTES`], or not finished within [`HEAD_READ_TIMEOUT`].
    #[error("the request head is longer than {MAX_REQUEST_HEAD_BYTES} bytes or took longer than {HEAD_READ_TIMEOUT:?}")]
    TooLong,
    /// The client went away.
    #[error("the connection ended before its request head: {0}")]
    Io(#[from] std::io::Error),
}

/// Reads the bytes of the request head (and whatever came with them).
pub(super) async fn read_head(stream: &mut Wire) -> Result<Vec<u8>, HeadError> {
    let read = async {
        let mut head = Vec::with_capacity(1024);
        let mut chunk = [0u8; 2048];
        while !head.windows(4).any(|w| w == b"\r\n\r\n") {
            if head.len() > MAX_REQUEST_HEAD_BYTES {
                return Err(HeadError::TooLong);
            }
            let n = stream.read(&mut chunk).await?;
            if n == 0 {
                return Err(std::io::Error::from(std::io::ErrorKind::UnexpectedEof).into());
            }
            head.extend_from_slice(&chunk[..n]);
        }
        Ok(head)
    };
    tokio::time::timeout(HEAD_READ_TIMEOUT, read)
        .await
        .map_err(|_| HeadError::TooLong)?
}

/// Whether the head asks for a WebSocket (an `Upgrade: websocket` header).
pub(super) fn is_upgrade(head: &[u8]) -> bool {
    head.split(|b| *b == b'\n').any(|line| {
        let line = line.to_ascii_lowercase();
        line.starts_with(b"upgrade:") && line.windows(9).any(|w| w == b"websocket")
    })
}

/// Answers REST requests on one connection until it closes or the server stops.
pub(super) async fn serve(stream: Stream, shared: Arc<Shared>, cancel: CancellationToken) {
    let service = service_fn(move |request| {
        let shared = shared.clone();
        async move { Ok::<_, Infallible>(answer(&shared, &request)) }
    });
    let mut builder = http1::Builder::new();
    builder
        .max_buf_size(2 * MAX_REQUEST_HEAD_BYTES)
        .timer(TokioTimer::new())
        .header_read_timeout(HEAD_READ_TIMEOUT);
    let connection = builder.serve_connection(TokioIo::new(stream), service);
    tokio::select! {
        served = connection => if let Err(e) = served {
            debug!(error = %e, "mock server: a REST connection ended with an error");
        },
        () = cancel.cancelled() => {}
    }
}

/// An answer: status and JSON body.
type Answer = (StatusCode, Value);

/// Answers one request (bodies are never read: every endpoint is a GET).
fn answer(shared: &Shared, request: &Request<Incoming>) -> Response<Full<Bytes>> {
    shared.rest_requests.fetch_add(1, Ordering::Relaxed);
    let throttle = *shared.rest_throttle.lock().expect("throttle lock");
    if let Some(retry_after) = throttle {
        let mut response = json_response(
            StatusCode::TOO_MANY_REQUESTS,
            &json!({"error": "Too many requests"}),
        );
        let seconds = retry_after.as_secs_f64().ceil() as u64;
        response.headers_mut().insert(RETRY_AFTER, seconds.into());
        return response;
    }
    let (status, body) = route(shared, request).unwrap_or_else(|answer| answer);
    json_response(status, &body)
}

/// A JSON response.
fn json_response(status: StatusCode, body: &Value) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body.to_string())));
    *response.status_mut() = status;
    response.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("application/json; charset=utf-8"),
    );
    response
}

/// An error answer with Chatwoot's `{"error": ...}` body.
fn error(status: StatusCode, message: &str) -> Answer {
    (status, json!({ "error": message }))
}

/// Finds the endpoint; `Err` carries an error answer.
fn route(shared: &Shared, request: &Request<Incoming>) -> Result<Answer, Answer> {
    let not_found = || error(StatusCode::NOT_FOUND, "Resource could not be found");
    if request.method() != Method::GET {
        return Err(not_found());
    }
    let segments: Vec<&str> = request.uri().path().split('/').skip(1).collect();
    // The public contact API needs no token: the identifiers are the credentials.
    if let ["public", "api", "v1", "inboxes", inbox, "contacts", source_id] = segments.as_slice() {
        return public_contact(shared, inbox, source_id).ok_or_else(not_found);
    }
    let user = authenticate(shared, request)?;
    let query = Query(request.uri().query().unwrap_or(""));
    match segments.as_slice() {
        ["api", "v1", "profile"] => Ok(profile(shared, &user)),
        ["api", "v1", "accounts", account, "conversations"] => {
            let account_id = member_of(&user, account)?;
            conversations(shared, &user, account_id, &query)
        }
        ["api", "v1", "accounts", account, "conversations", display_id, "messages"] => {
            let account_id = member_of(&user, account)?;
            let display_id = display_id.parse().map_err(|_| not_found())?;
            messages(shared, &user, account_id, display_id, &query)
        }
        _ => Err(not_found()),
    }
}

/// The user whose `api_access_token` header the request carries; 401 otherwise.
fn authenticate(shared: &Shared, request: &Request<Incoming>) -> Result<MockUser, Answer> {
    let refused = || error(StatusCode::UNAUTHORIZED, "Invalid Access Token");
    let token = request
        .headers()
        .get("api_access_token")
        .and_then(|v| v.to_str().ok())
        .ok_or_else(refused)?;
    let directory = shared.directory.lock().expect("directory lock");
    directory
        .users
        .iter()
        .find(|u| u.api_access_token.as_deref() == Some(token))
        .cloned()
        .ok_or_else(refused)
}

/// The account id of the path, if the user belongs to it; 401 otherwise (as Chatwoot answers).
fn member_of(user: &MockUser, account: &str) -> Result<u64, Answer> {
    account
        .parse()
        .ok()
        .filter(|id| user.accounts.contains(id))
        .ok_or_else(|| {
            error(
                StatusCode::UNAUTHORIZED,
                "You are not authorized to access this account",
            )
        })
}

/// `GET /api/v1/profile`. Shape from Chatwoot's app/views/api/v1/models/_user.json.jbuilder
/// (the fields a bridge reads, and the common ones around them; never the access token).
fn profile(shared: &Shared, user: &MockUser) -> Answer {
    let model = shared.model.lock().expect("model lock");
    let accounts: Vec<Value> = user
        .accounts
        .iter()
        .map(|id| {
            let name = model
                .accounts
                .iter()
                .find(|a| a.id == *id)
                .map_or_else(|| format!("Account {id}"), |a| a.name.clone());
            json!({"id": id, "name": name, "role": user.role.name(), "status": "active",
                   "availability": "online", "availability_status": "online",
                   "auto_offline": true})
        })
        .collect();
    let name = format!("Mock Agent {}", user.id);
    let body = json!({
        "id": user.id,
        "account_id": user.accounts.first(),
        "accounts": accounts,
        "available_name": name,
        "display_name": name,
        "name": name,
        "email": format!("agent{}@mock.invalid", user.id),
        "confirmed": true,
        "pubsub_token": user.pubsub_token,
        "role": user.role.name(),
        "type": "user",
        "uid": format!("agent{}@mock.invalid", user.id),
        "ui_settings": {},
        "custom_attributes": {},
    });
    (StatusCode::OK, body)
}

/// `GET /public/api/v1/inboxes/{inbox_identifier}/contacts/{source_id}`. Shape from Chatwoot's
/// app/views/public/api/v1/inboxes/contacts/show.json.jbuilder (`source_id`, `pubsub_token` and
/// the public contact model's `id`, `name`, `email`, `phone_number`).
fn public_contact(shared: &Shared, inbox: &str, source_id: &str) -> Option<Answer> {
    let directory = shared.directory.lock().expect("directory lock");
    let contact = directory.contacts.iter().find(|c| {
        c.public
            .as_ref()
            .is_some_and(|p| p.inbox_identifier == inbox && p.source_id == source_id)
    })?;
    let body = json!({
        "source_id": source_id,
        "pubsub_token": contact.pubsub_token,
        "id": contact.id,
        "name": format!("visitor-{}", contact.id),
        "email": null,
        "phone_number": null,
    });
    Some((StatusCode::OK, body))
}

/// `GET /api/v1/accounts/{id}/conversations`: the conversations `user` sees.
fn conversations(
    shared: &Shared,
    user: &MockUser,
    account_id: u64,
    query: &Query,
) -> Result<Answer, Answer> {
    let status = query.get("status")?.unwrap_or("open");
    if !["open", "resolved", "pending", "snoozed", "all"].contains(&status) {
        return Err(error(
            StatusCode::UNPROCESSABLE_ENTITY,
            "status must be open, resolved, pending, snoozed or all",
        ));
    }
    let updated_within = query.number("updated_within")?;
    let page = query.number("page")?.unwrap_or(1).max(1) as usize;
    let model = shared.model.lock().expect("model lock");
    let mut listed: Vec<_> = model
        .conversations
        .iter()
        // Every mock conversation is in the one inbox: the role decides for all of them.
        .filter(|_| user.role.sees_conversations())
        .filter(|c| c.account_id == account_id && (status == "all" || c.status == status))
        .collect();
    let all_count = listed.len();
    listed.sort_by(|a, b| b.last_activity_at.total_cmp(&a.last_activity_at));
    let payload: Vec<Value> = match updated_within {
        Some(seconds) => {
            let since = now_seconds() - seconds as f64;
            listed
                .iter()
                .filter(|c| c.updated_at > since)
                .map(|c| c.rest_json())
                .collect()
        }
        None => listed
            .iter()
            .skip((page - 1).saturating_mul(CONVERSATIONS_PER_PAGE))
            .take(CONVERSATIONS_PER_PAGE)
            .map(|c| c.rest_json())
            .collect(),
    };
    let meta = json!({"mine_count": 0, "assigned_count": 0, "unassigned_count": all_count,
                      "all_count": all_count});
    Ok((
        StatusCode::OK,
        json!({"data": {"meta": meta, "payload": payload}}),
    ))
}

/// `GET /api/v1/accounts/{id}/conversations/{display_id}/messages`, if `user` sees the
/// conversation.
fn messages(
    shared: &Shared,
    user: &MockUser,
    account_id: u64,
    display_id: u64,
    query: &Query,
) -> Result<Answer, Answer> {
    let after = query.number("after")?;
    let before = query.number("before")?;
    let model = shared.model.lock().expect("model lock");
    let conversation = model
        .conversation(account_id, display_id)
        .ok_or_else(|| error(StatusCode::NOT_FOUND, "Resource could not be found"))?;
    if !user.role.sees_conversations() {
        return Err(error(
            StatusCode::UNAUTHORIZED,
            "You are not authorized to do this action",
        ));
    }
    let all = &conversation.messages;
    let chosen = match (after, before) {
        (Some(after), _) => {
            let from = all.partition_point(|m| m.id <= after);
            &all[from..all.len().min(from + MESSAGES_AFTER_LIMIT)]
        }
        (None, Some(before)) => {
            let to = all.partition_point(|m| m.id < before);
            &all[to.saturating_sub(MESSAGES_PAGE)..to]
        }
        (None, None) => &all[all.len().saturating_sub(MESSAGES_PAGE)..],
    };
    let payload: Vec<Value> = chosen
        .iter()
        .map(|m| conversation.message_rest_json(m))
        .collect();
    let meta = json!({"labels": [], "additional_attributes": {},
                      "contact_id": conversation.contact_id});
    Ok((StatusCode::OK, json!({"meta": meta, "payload": payload})))
}

/// A request's query string.
struct Query<'a>(&'a str);

impl Query<'_> {
    /// The value of parameter `name`, if given; a value longer than [`MAX_PARAMETER_BYTES`] is
    /// an error naming the parameter.
    fn get(&self, name: &str) -> Result<Option<&str>, Answer> {
        let value = self
            .0
            .split('&')
            .filter_map(|pair| pair.split_once('='))
            .find(|(key, _)| *key == name)
            .map(|(_, value)| value);
        match value {
            Some(v) if v.len() > MAX_PARAMETER_BYTES => Err(error(
                StatusCode::BAD_REQUEST,
                &format!("{name} is longer than {MAX_PARAMETER_BYTES} bytes"),
            )),
            other => Ok(other),
        }
    }

    /// Parameter `name` as a whole number, if given; anything else is an error naming it.
    fn number(&self, name: &str) -> Result<Option<u64>, Answer> {
        self.get(name)?
            .map(|v| {
                v.parse().map_err(|_| {
                    error(
                        StatusCode::BAD_REQUEST,
                        &format!("{name} must be a whole number"),
                    )
                })
            })
            .transpose()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_upgrade_is_told_from_a_rest_request() {
        let upgrade =
            b"GET /cable HTTP/1.1\r\nHost: x\r\nUpgrade: WebSocket\r\nConnection: Upgrade\r\n\r\n";
        let rest = b"GET /api/v1/profile HTTP/1.1\r\nHost: x\r\napi_access_token: t\r\n\r\n";
        assert!(is_upgrade(upgrade));
        assert!(!is_upgrade(rest));
    }

    #[test]
    fn query_parameters_are_read_and_bad_ones_named() {
        let query = Query("page=2&after=17&status=all&updated_within=x");
        assert_eq!(query.number("page").unwrap(), Some(2));
        assert_eq!(query.number("after").unwrap(), Some(17));
        assert_eq!(query.get("status").unwrap(), Some("all"));
        assert_eq!(query.number("before").unwrap(), None);
        let (status, body) = query.number("updated_within").unwrap_err();
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert_eq!(body["error"], "updated_within must be a whole number");
        let long = format!("page={}", "9".repeat(40));
        assert!(Query(&long).get("page").is_err());
    }
}
