//! Tokens given as a user's API access token (`api_access_token`), and `chatwoot.api_url`.

use std::time::Duration;

use tokio_tungstenite::tungstenite::http::Uri;

use super::checks::{check_duration, derive_origin};
use super::raw::RawToken;
use crate::secret_file;
use crate::source::settings::ApiToken;
use crate::source::settings::{BackfillSettings, DEFAULT_MAX_GAP, DEFAULT_STALL_AFTER};
use crate::tls::ClientTls;
use crate::types::Problems;

/// How often the profile is read again by default: a rotated pubsub token costs at most this
/// long of silence, and the profile endpoint sees one request per token per interval.
pub(super) const DEFAULT_REFRESH_INTERVAL: Duration = Duration::from_secs(5 * 60);

/// The API token of `raw`, taking its fields, or `None` when it is written with its pubsub
/// token. `cable_url` is the token's socket, from which the API URL is derived when
/// `chatwoot.api_url` is left out. Problems are added to `at`.
pub(super) fn take(
    raw: &mut RawToken,
    cable_url: &str,
    chatwoot: &ApiDefaults<'_>,
    at: &mut Problems<'_>,
) -> Option<ApiToken> {
    let inline = raw.api_access_token.take();
    let file = raw.api_access_token_file.take();
    if inline.is_none() && file.is_none() {
        if raw.refresh_interval.is_some() {
            at.add(
                "refresh_interval",
                "is only for a token given as api_access_token or inbox_identifier + contact_identifier (it says how often the pubsub token is read again)",
            );
        }
        if raw.stall_after.is_some() {
            at.add(
                "stall_after",
                "needs api_access_token: a stall check reads Chatwoot's REST API with the user's access token",
            );
        }
        if raw
            .backfill
            .as_ref()
            .is_some_and(|b| b.settings().is_some())
        {
            at.add(
                "backfill",
                "needs api_access_token: a backfill reads Chatwoot's REST API with the user's access token",
            );
        }
        return None;
    }
    if raw.pubsub_token.is_some() || raw.pubsub_token_file.is_some() {
        at.add(
            "api_access_token",
            "pubsub_token and api_access_token are both given; keep one (with api_access_token the pubsub token is read from Chatwoot's profile)",
        );
    }
    let access_token = match secret_file::one(at, "api_access_token", inline, file) {
        Some(Ok(token)) => {
            if token.expose().trim().is_empty() {
                at.add("api_access_token", "is empty");
            }
            token
        }
        // Reported already (both given, or the file unreadable).
        _ => crate::types::Secret::new(""),
    };
    let account_id = raw.account_id.unwrap_or_else(|| {
        at.add(
            "account_id",
            "a token given as api_access_token needs account_id: the account whose events it receives",
        );
        0
    });
    let refresh_interval = raw
        .refresh_interval
        .as_ref()
        .map_or(DEFAULT_REFRESH_INTERVAL, |d| d.0);
    at.check("refresh_interval", check_duration(refresh_interval));
    let (api_url, tls) = api_endpoint(cable_url, chatwoot);
    let backfill = backfill_settings(raw, at);
    let stall_after = stall_after(raw, at);
    Some(ApiToken {
        access_token,
        api_url,
        account_id,
        user_id: raw.user_id,
        refresh_interval,
        tls,
        backfill,
        stall_after,
    })
}

/// What a token read from Chatwoot's API inherits of the `chatwoot:` section.
pub(super) struct ApiDefaults<'a> {
    /// `chatwoot.api_url` as written; derived from the token's cable URL when `None`.
    pub(super) api_url: Option<&'a str>,
    /// `chatwoot.tls`, for an `https://` API URL.
    pub(super) tls: Option<&'a ClientTls>,
}

/// The REST base URL of a token on `cable_url` (`chatwoot.api_url`, or derived from the cable
/// URL) and the TLS it is read with.
pub(super) fn api_endpoint(
    cable_url: &str,
    chatwoot: &ApiDefaults<'_>,
) -> (String, Option<ClientTls>) {
    let api_url = match chatwoot.api_url {
        Some(url) => url.trim_end_matches('/').to_owned(),
        None => derive_api_url(cable_url).unwrap_or_default(),
    };
    let tls = chatwoot
        .tls
        .cloned()
        .filter(|_| api_url.starts_with("https://"));
    (api_url, tls)
}

/// `backfill` of a token given as an API access token.
fn backfill_settings(raw: &RawToken, at: &mut Problems<'_>) -> Option<BackfillSettings> {
    let settings = raw.backfill.as_ref()?.settings()?;
    let max_gap = settings.max_gap.as_ref().map_or(DEFAULT_MAX_GAP, |d| d.0);
    at.check("backfill.max_gap", check_duration(max_gap));
    // The spool directory is known after the tokens are checked; validate fills it in.
    Some(BackfillSettings {
        max_gap,
        resume_dir: None,
    })
}

/// `stall_after` of a token given as an API access token: a duration, `off`, or the default.
fn stall_after(raw: &RawToken, at: &mut Problems<'_>) -> Option<Duration> {
    let Some(text) = raw.stall_after.as_deref().map(str::trim) else {
        return Some(DEFAULT_STALL_AFTER);
    };
    if text == "off" {
        return None;
    }
    match humantime::parse_duration(text) {
        Ok(stall_after) => {
            at.check("stall_after", check_duration(stall_after));
            Some(stall_after)
        }
        Err(e) => {
            at.add(
                "stall_after",
                format!("`{text}` is neither a duration like `2m` nor `off` ({e})"),
            );
            None
        }
    }
}

/// The REST base URL of a cable URL: the same host over `https://` (`http://` for `ws://`),
/// with the path up to a trailing `/cable` (Chatwoot served under a path prefix keeps it).
fn derive_api_url(cable_url: &str) -> Option<String> {
    let origin = derive_origin(cable_url)?;
    let uri: Uri = cable_url.parse().ok()?;
    let path = uri.path().trim_end_matches('/');
    let prefix = path.strip_suffix("/cable").unwrap_or(path);
    Some(format!("{origin}{prefix}"))
}

/// `chatwoot.api_url`: `http://` or `https://`, a host, no credentials, query or fragment.
pub(super) fn check_api_url(url: &str) -> Result<(), String> {
    let uri: Uri = url.parse().map_err(|e| format!("is not a URL ({e})"))?;
    match uri.scheme_str() {
        Some("http") | Some("https") => {}
        _ => return Err(format!("`{url}` must start with http:// or https://")),
    }
    if uri.authority().is_some_and(|a| a.as_str().contains('@')) {
        return Err("must not contain credentials (user:password@)".into());
    }
    if uri.query().is_some() {
        return Err("must not have a query string".into());
    }
    if uri.host().is_none_or(str::is_empty) {
        return Err(format!("`{url}` has no host"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_api_url_is_the_cable_hosts() {
        let derived = |url| derive_api_url(url).unwrap();
        assert_eq!(
            derived("wss://chat.example.com/cable"),
            "https://chat.example.com"
        );
        assert_eq!(
            derived("ws://127.0.0.1:3000/cable"),
            "http://127.0.0.1:3000"
        );
        assert_eq!(
            derived("wss://example.com/chat/cable/"),
            "https://example.com/chat"
        );
        assert_eq!(derived("wss://example.com"), "https://example.com");
    }

    use crate::config::{Config, ConfigError};
    use crate::source::settings::Identity;

    /// The problems loading `tokens` (YAML list items) under a `wss://` cable give, in words.
    fn load(chatwoot: &str, tokens: &str) -> Result<Config, Vec<String>> {
        let text = format!(
            "chatwoot:\n  url: wss://chat.example.com/cable\n{chatwoot}tokens:\n{tokens}sinks:\n  out: {{ type: file, path: ./events.jsonl }}\nroutes:\n  - {{ name: all, match: {{}}, to: [out] }}\n"
        );
        let env = |name: &str| (name == "API").then(|| "access-SECRET".to_owned());
        Config::from_yaml(&text, &env, false).map_err(|e| match e {
            ConfigError::Invalid(found) => found.iter().map(ToString::to_string).collect(),
            other => vec![other.to_string()],
        })
    }

    #[test]
    fn an_api_token_needs_an_account_and_no_pubsub_token() {
        let cfg = load(
            "",
            "  - { name: agent, api_access_token: \"${API}\", account_id: 2 }\n",
        )
        .unwrap();
        let token = &cfg.tokens[0];
        let api = token.api.as_ref().expect("an API token");
        assert_eq!(api.access_token.expose(), "access-SECRET");
        assert_eq!(api.api_url, "https://chat.example.com");
        assert_eq!(api.profile_url(), "https://chat.example.com/api/v1/profile");
        assert_eq!(api.account_id, 2);
        assert_eq!(api.user_id, None);
        assert_eq!(api.refresh_interval, DEFAULT_REFRESH_INTERVAL);
        assert!(api.tls.is_some(), "https:// uses chatwoot.tls");
        assert!(matches!(
            token.identity,
            Identity::Agent { account_id: 2, .. }
        ));
        assert!(format!("{cfg:?}").contains("access") && !format!("{cfg:?}").contains("SECRET"));

        let found = load(
            "",
            "  - { name: a, api_access_token: x, pubsub_token: y, account_id: 1 }\n  - { name: b, api_access_token: x }\n  - { name: c, pubsub_token: y, refresh_interval: 1m }\n",
        )
        .unwrap_err();
        assert_eq!(
            found,
            [
                "tokens[0].api_access_token: pubsub_token and api_access_token are both given; keep one (with api_access_token the pubsub token is read from Chatwoot's profile)",
                "tokens[1].account_id: a token given as api_access_token needs account_id: the account whose events it receives",
                "tokens[2].refresh_interval: is only for a token given as api_access_token or inbox_identifier + contact_identifier (it says how often the pubsub token is read again)",
            ]
        );
    }

    #[test]
    fn backfill_is_opt_in_and_needs_an_api_token() {
        let cfg = load(
            "",
            "  - { name: a, api_access_token: x, account_id: 1, backfill: true }\n  - { name: b, api_access_token: x, account_id: 1, backfill: { max_gap: 10m } }\n  - { name: c, api_access_token: x, account_id: 1, backfill: false }\n",
        )
        .unwrap();
        let backfill = |i: usize| cfg.tokens[i].api.as_ref().unwrap().backfill.clone();
        assert_eq!(backfill(0).unwrap().max_gap, DEFAULT_MAX_GAP);
        assert_eq!(backfill(1).unwrap().max_gap, Duration::from_secs(600));
        assert_eq!(backfill(2), None);
        let found = load(
            "",
            "  - { name: a, pubsub_token: y, backfill: true }\n  - { name: b, api_access_token: x, account_id: 1, backfill: { max_gap: 0s } }\n",
        )
        .unwrap_err();
        assert_eq!(
            found,
            [
                "tokens[0].backfill: needs api_access_token: a backfill reads Chatwoot's REST API with the user's access token",
                "tokens[1].backfill.max_gap: must be greater than zero",
            ]
        );
        let one = |backfill: &str| {
            load(
                "",
                &format!(
                    "  - {{ name: a, api_access_token: x, account_id: 1, backfill: {backfill} }}\n"
                ),
            )
            .unwrap_err()
        };
        assert_eq!(
            one("{ maxgap: 1m }"),
            ["tokens[0].backfill: unknown field `maxgap`, expected `max_gap`"]
        );
        assert_eq!(
            one("3"),
            ["tokens[0].backfill: must be true, false or settings such as { max_gap: 1h }"]
        );
    }

    #[test]
    fn the_stall_check_is_on_for_api_tokens_unless_off() {
        let cfg = load(
            "",
            "  - { name: a, api_access_token: x, account_id: 1 }\n  - { name: b, api_access_token: x, account_id: 1, stall_after: 30s }\n  - { name: c, api_access_token: x, account_id: 1, stall_after: \" off \" }\n",
        )
        .unwrap();
        let stall_after = |i: usize| cfg.tokens[i].api.as_ref().unwrap().stall_after;
        assert_eq!(stall_after(0), Some(DEFAULT_STALL_AFTER));
        assert_eq!(stall_after(1), Some(Duration::from_secs(30)));
        assert_eq!(stall_after(2), None);
        let found = load(
            "",
            "  - { name: a, pubsub_token: y, stall_after: 1m }\n  - { name: b, api_access_token: x, account_id: 1, stall_after: soon }\n  - { name: c, api_access_token: x, account_id: 1, stall_after: 0s }\n",
        )
        .unwrap_err();
        assert_eq!(found.len(), 3, "{found:?}");
        assert_eq!(found[0], "tokens[0].stall_after: needs api_access_token: a stall check reads Chatwoot's REST API with the user's access token");
        assert!(
            found[1].starts_with(
                "tokens[1].stall_after: `soon` is neither a duration like `2m` nor `off`"
            ),
            "{found:?}"
        );
        assert_eq!(found[2], "tokens[2].stall_after: must be greater than zero");
    }

    #[test]
    fn chatwoot_api_url_is_checked_and_used() {
        let cfg = load(
            "  api_url: http://127.0.0.1:3000/\n",
            "  - { name: agent, api_access_token: x, account_id: 1, user_id: 3, refresh_interval: 30s }\n",
        )
        .unwrap();
        let api = cfg.tokens[0].api.as_ref().unwrap();
        assert_eq!(api.api_url, "http://127.0.0.1:3000");
        assert_eq!(api.user_id, Some(3));
        assert_eq!(api.refresh_interval, Duration::from_secs(30));
        assert!(api.tls.is_none(), "no TLS for http://");
        let found = load(
            "  api_url: wss://chat.example.com\n",
            "  - { name: agent, api_access_token: x, account_id: 1 }\n",
        )
        .unwrap_err();
        assert_eq!(
            found,
            ["chatwoot.api_url: `wss://chat.example.com` must start with http:// or https://"]
        );
    }

    #[test]
    fn api_urls_must_be_http() {
        assert!(check_api_url("https://chat.example.com").is_ok());
        assert!(check_api_url("wss://chat.example.com")
            .unwrap_err()
            .contains("http://"));
        assert!(check_api_url("https://u:p@chat.example.com").is_err());
    }
}
