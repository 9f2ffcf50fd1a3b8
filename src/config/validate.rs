//! The config as written, checked into each stage's settings: one check per section, each
//! reporting into the same [`Problems`], so that every problem of a file is reported at once,
//! with its key path, in the order of the sections.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::Arc;

use tokio_tungstenite::tungstenite::http::{HeaderName, HeaderValue, Uri};

use super::api_token::ApiDefaults;
use super::checks::{check_duration, derive_origin};
use super::presence::check_presence;
use super::raw::{RawAdmin, RawChatwoot, RawConfig, RawReadyRequires, RawSink, RawSpool, RawToken};
use super::{Config, ConfigError, Retirement, SinkSettings};
use crate::admin::settings::{parse_listen, AdminSettings, ReadyRequires, DEFAULT_ADMIN_LISTEN};
use crate::delivery::retry::RetrySettings;
use crate::event::MAX_NESTING_CEILING;
use crate::route::jsonpath::JsonPath;
use crate::route::redact::Redaction;
use crate::route::{RouteSpec, RouteTable};
use crate::secret_file;
use crate::sink::SinkKind;
use crate::source::settings::{ApiToken, CableSettings, Identity, ReconnectSettings, TokenSpec};
use crate::spool::SpoolConfig;
use crate::tls::{ClientTls, TlsConfig};
use crate::types::{Problems, Secret};

/// Smallest `chatwoot.max_frame_bytes` accepted: Chatwoot frames are often several KB.
const MIN_FRAME_BYTES: u64 = 1024;

/// Smallest `spool.max_bytes` accepted.
const MIN_SPOOL_BYTES: u64 = 1 << 20;

/// Smallest `memory_limit` accepted: below it, the shares of the stages that hold events
/// would each hold a few ordinary events at most.
const MIN_MEMORY_LIMIT: u64 = 4 << 20;

impl RawConfig {
    /// The config the daemon runs on, or every problem found in any section.
    pub(super) fn validate(self) -> Result<Config, ConfigError> {
        let RawConfig {
            chatwoot,
            tokens,
            sinks,
            routes,
            unmatched,
            spool,
            shutdown_timeout,
            memory_limit,
            retired_sinks,
            admin,
        } = self;
        let mut problems = Problems::top_level();
        let chatwoot = check_cable(chatwoot, &tokens, &mut problems);
        let tokens = check_tokens(tokens, &chatwoot, &mut problems);
        check_presence(
            chatwoot.cable.presence_interval,
            &tokens.specs,
            &mut problems,
        );
        let sinks = check_sinks(sinks, &mut problems);
        let routes = check_routes(routes, unmatched, &sinks, &mut problems);
        let spool = check_spool(spool, chatwoot.max_frame_bytes, &mut problems);
        let mut tokens = tokens;
        keep_resume_files_in(&spool.dir, &mut tokens.specs);
        check_memory_limit(memory_limit, chatwoot.max_frame_bytes, &mut problems);
        check_retired_sinks(&retired_sinks, &sinks, &mut problems);
        let admin = admin.map(|admin| check_admin(admin, &tokens.names, &mut problems));
        // Compiled last: the problems of conditions and token names come after all the others.
        let table = RouteTable::compile(routes.specs, &tokens.names, routes.unmatched);
        let Some(routes) = problems.absorb(table) else {
            return Err(ConfigError::Invalid(problems.found));
        };
        problems
            .finish(|| Config {
                cable: chatwoot.cable,
                tokens: tokens.specs,
                sinks,
                routes,
                spool,
                shutdown_timeout: shutdown_timeout.0,
                memory_limit,
                retired_sinks,
                hash: String::new(),
                admin,
            })
            .map_err(ConfigError::Invalid)
    }
}

/// The `chatwoot:` section checked: what every socket shares and what tokens inherit.
pub(super) struct Chatwoot {
    /// Timing and limits of every socket.
    cable: CableSettings,
    /// Where tokens without a `url` of their own connect.
    pub(super) url: String,
    /// The `Origin` of tokens without a `url` of their own, when the config sets one.
    origin: Option<String>,
    /// The handshake headers every token sends.
    headers: Vec<(String, Secret)>,
    /// The TLS of `wss://` sockets; `None` when neither a URL nor the config asks for it, or
    /// when `chatwoot.tls` has problems.
    pub(super) tls: Option<ClientTls>,
    /// The frame limit as written: the spool must hold two such frames.
    max_frame_bytes: u64,
    /// `chatwoot.api_url` as written, for tokens given as API access tokens.
    pub(super) api_url: Option<String>,
}

impl Chatwoot {
    /// What tokens read from Chatwoot's API inherit of this section.
    fn api_defaults(&self) -> ApiDefaults<'_> {
        ApiDefaults {
            api_url: self.api_url.as_deref(),
            tls: self.tls.as_ref(),
        }
    }
}

/// Whether `chatwoot.tls` is built: when any socket is `wss://` (`chatwoot.url` or a token's
/// own), or the section is written, so its files are checked even before a URL uses them. Only
/// then is the system's trust store read.
fn wants_tls(raw: &RawChatwoot, tokens: &[RawToken]) -> bool {
    let secure = |url: &str| url.starts_with("wss://");
    raw.tls != TlsConfig::default()
        || secure(&raw.url)
        || raw
            .api_url
            .as_deref()
            .is_some_and(|u| u.starts_with("https://"))
        || tokens.iter().any(|t| t.url.as_deref().is_some_and(secure))
}

/// Checks `chatwoot:`: its URL and origin, limits, durations, headers and TLS (read when a
/// socket of `tokens` is `wss://`).
fn check_cable(raw: RawChatwoot, tokens: &[RawToken], problems: &mut Problems<'_>) -> Chatwoot {
    let mut at = Problems::new("chatwoot");
    at.check("url", check_cable_url(&raw.url));
    if let Some(origin) = &raw.origin {
        if !(origin.starts_with("http://") || origin.starts_with("https://")) {
            at.add(
                "origin",
                format!("`{origin}` must start with http:// or https://"),
            );
        }
    }
    let max_frame_bytes = raw.max_frame_bytes;
    if max_frame_bytes < MIN_FRAME_BYTES {
        at.add(
            "max_frame_bytes",
            format!("{max_frame_bytes} is too small; Chatwoot frames are often several KB"),
        );
    }
    if !(1..=MAX_NESTING_CEILING as u64).contains(&raw.max_nesting) {
        at.add(
            "max_nesting",
            format!(
                "{} is out of range; give 1 to {MAX_NESTING_CEILING} (Chatwoot's payloads nest under 10)",
                raw.max_nesting
            ),
        );
    }
    let reconnect = &raw.reconnect;
    for (field, value) in [
        ("connect_timeout", raw.connect_timeout.0),
        ("confirm_timeout", raw.confirm_timeout.0),
        ("stale_after", raw.stale_after.0),
        ("presence_interval", raw.presence_interval.0),
        ("reconnect.initial", reconnect.initial.0),
        ("reconnect.max", reconnect.max.0),
    ] {
        at.check(field, check_duration(value));
    }
    if reconnect.max.0 < reconnect.initial.0 {
        at.add(
            "reconnect.max",
            "must not be smaller than chatwoot.reconnect.initial",
        );
    }
    let tls = if wants_tls(&raw, tokens) {
        at.absorb(raw.tls.validate("chatwoot.tls"))
    } else {
        None
    };
    if let Some(api_url) = &raw.api_url {
        at.check("api_url", super::api_token::check_api_url(api_url));
    }
    let headers = secret_file::map(&mut at, "headers", raw.headers, raw.headers_file);
    check_headers(&headers, &mut at);
    problems.include(at);
    Chatwoot {
        cable: CableSettings {
            connect_timeout: raw.connect_timeout.0,
            confirm_timeout: raw.confirm_timeout.0,
            stale_after: raw.stale_after.0,
            presence_interval: raw.presence_interval.0,
            max_frame_bytes: max_frame_bytes as usize,
            max_nesting: raw.max_nesting.min(MAX_NESTING_CEILING as u64) as usize,
            reconnect: ReconnectSettings {
                initial: raw.reconnect.initial.0,
                max: raw.reconnect.max.0,
                reset_after: raw.reconnect.reset_after.0,
                after_disconnect_without_reconnect: raw
                    .reconnect
                    .after_disconnect_without_reconnect
                    .0,
            },
        },
        url: raw.url,
        origin: raw.origin,
        headers: headers.into_iter().collect(),
        tls,
        max_frame_bytes,
        api_url: raw.api_url,
    }
}

/// Handshake headers must be valid HTTP; a value is never echoed, as it may be a credential.
fn check_headers(headers: &BTreeMap<String, Secret>, at: &mut Problems<'_>) {
    for (name, value) in headers {
        let field = format!("headers.{name}");
        if HeaderName::try_from(name.as_str()).is_err() {
            at.add(&field, "is not a valid HTTP header name");
        }
        if HeaderValue::from_str(value.expose()).is_err() {
            at.add(
                &field,
                "value contains characters not allowed in an HTTP header",
            );
        }
    }
}

/// The `tokens:` section checked.
struct Tokens {
    /// One socket per token, in file order.
    specs: Vec<TokenSpec>,
    /// The valid, unique token names, which route conditions may name.
    names: BTreeSet<String>,
}

/// Checks `tokens:`: at least one, unique names, agent ids in pairs, their own URLs.
fn check_tokens(raw: Vec<RawToken>, chatwoot: &Chatwoot, problems: &mut Problems<'_>) -> Tokens {
    if raw.is_empty() {
        problems.add("tokens", "at least one token is needed");
    }
    let mut tokens = Tokens {
        specs: Vec::with_capacity(raw.len()),
        names: BTreeSet::new(),
    };
    for (i, mut token) in raw.into_iter().enumerate() {
        let mut at = Problems::new(format!("tokens[{i}]"));
        match check_name(&token.name) {
            Err(message) => at.add("name", message),
            Ok(()) if !tokens.names.insert(token.name.clone()) => at.add(
                "name",
                format!("`{}` is used by another token already", token.name),
            ),
            Ok(()) => {}
        }
        let url = token.url.clone().unwrap_or_else(|| chatwoot.url.clone());
        let contact =
            super::contact_token::take(&mut token, &url, &chatwoot.api_defaults(), &mut at);
        let api = match contact {
            // Its mixes with api_access_token are reported by the contact's check.
            Some(_) => None,
            None => super::api_token::take(&mut token, &url, &chatwoot.api_defaults(), &mut at),
        };
        let pubsub_token = match (&api, &contact) {
            (None, None) => pubsub_token(
                token.pubsub_token.take(),
                token.pubsub_token_file.take(),
                &mut at,
            ),
            _ => Secret::new(""),
        };
        let mut spec = token_spec(token, pubsub_token, api, chatwoot, &mut at);
        if contact.is_some() {
            spec.identity = Identity::Contact;
            spec.contact = contact;
        }
        tokens.specs.push(spec);
        problems.include(at);
    }
    tokens
}

/// One token's socket: its identity, and the URL, origin, headers and TLS it connects with.
fn token_spec(
    raw: RawToken,
    pubsub_token: Secret,
    api: Option<ApiToken>,
    chatwoot: &Chatwoot,
    at: &mut Problems<'_>,
) -> TokenSpec {
    let identity = match (raw.account_id, raw.user_id) {
        // An agent's, of the configured account; the profile gives the user, so 0 stands for
        // a user_id left out (the token task never subscribes with this one).
        _ if api.is_some() => Identity::Agent {
            account_id: raw.account_id.unwrap_or_default(),
            user_id: raw.user_id.unwrap_or_default(),
        },
        (Some(account_id), Some(user_id)) => Identity::Agent {
            account_id,
            user_id,
        },
        (None, None) => Identity::Contact,
        (Some(_), None) => {
            at.add(
                "user_id",
                "an agent token needs user_id with account_id (Chatwoot ignores the subscription otherwise)",
            );
            Identity::Contact
        }
        (None, Some(_)) => {
            at.add("account_id", "an agent token needs account_id with user_id");
            Identity::Contact
        }
    };
    let url = match &raw.url {
        Some(own) => {
            at.check("url", check_cable_url(own));
            own.clone()
        }
        None => chatwoot.url.clone(),
    };
    let origin = match (&raw.url, &chatwoot.origin) {
        (None, Some(origin)) => origin.clone(),
        _ => derive_origin(&url).unwrap_or_default(),
    };
    let tls = chatwoot.tls.clone().filter(|_| url.starts_with("wss://"));
    TokenSpec {
        name: Arc::from(raw.name.as_str()),
        url,
        origin,
        headers: chatwoot.headers.clone(),
        pubsub_token,
        identity,
        api,
        contact: None,
        presence: raw.presence,
        tls,
    }
}

/// The pubsub token, written in the config or read from `pubsub_token_file`; on a problem an
/// empty one (the config is refused anyway).
fn pubsub_token(inline: Option<Secret>, file: Option<PathBuf>, at: &mut Problems<'_>) -> Secret {
    match secret_file::one(at, "pubsub_token", inline, file) {
        None => {
            at.add(
                "pubsub_token",
                "is missing; give pubsub_token or pubsub_token_file, api_access_token or api_access_token_file, or inbox_identifier + contact_identifier",
            );
            Secret::new("")
        }
        Some(Err(secret_file::Reported)) => Secret::new(""),
        Some(Ok(token)) => {
            if token.expose().trim().is_empty() {
                at.add("pubsub_token", "is empty");
            }
            token
        }
    }
}

/// Checks `sinks:`: each sink, then where their dead letters go.
fn check_sinks(
    raw: BTreeMap<String, RawSink>,
    problems: &mut Problems<'_>,
) -> BTreeMap<String, SinkSettings> {
    let mut sinks = BTreeMap::new();
    for (name, sink) in raw {
        let settings = check_sink(&name, sink, problems);
        sinks.insert(name, settings);
    }
    check_dead_letters(&sinks, problems);
    sinks
}

/// One sink: its name, what it removes from `data`, its kind's own settings, its retries.
///
/// A sink with problems is still returned, so that routes naming it are not reported as well.
fn check_sink(name: &str, raw: RawSink, problems: &mut Problems<'_>) -> SinkSettings {
    let key = format!("sinks.{name}");
    if let Err(message) = check_name(name) {
        problems.add(&key, message);
    }
    let mut at = Problems::new(key.as_str());
    let mut drop = Vec::with_capacity(raw.fields.drop.len());
    for (j, path) in raw.fields.drop.iter().enumerate() {
        drop.extend(at.check(&format!("fields.drop[{j}]"), JsonPath::parse(path)));
    }
    let redaction = Redaction {
        strip_pubsub_tokens: !raw.keep_pubsub_tokens,
        drop,
    };
    let kind = at
        .absorb(raw.kind.validate(&key))
        .unwrap_or(SinkKind::Stdout);
    let retry = RetrySettings {
        initial: raw.retry.initial.0,
        max: raw.retry.max.0,
        park_after: raw.retry.park_after.map_or_else(
            || {
                RetrySettings::default()
                    .park_after
                    .min(raw.retry.max_elapsed.0)
            },
            |given| given.0,
        ),
        max_elapsed: raw.retry.max_elapsed.0,
    };
    if retry.initial.is_zero() || retry.max < retry.initial {
        at.add(
            "retry",
            "initial must be above zero and max at least initial",
        );
    }
    if retry.park_after.is_zero() || retry.park_after > retry.max_elapsed {
        at.add(
            "retry.park_after",
            format!(
                "must be above zero and at most retry.max_elapsed ({})",
                humantime::format_duration(retry.max_elapsed)
            ),
        );
    }
    problems.include(at);
    SinkSettings {
        kind,
        redaction,
        retry,
        dead_letter: raw.dead_letter,
    }
}

/// A dead letter sink must exist, be another sink, and keep its own failures on disk: no
/// chains, so a dead letter that fails again never goes round in a loop.
fn check_dead_letters(sinks: &BTreeMap<String, SinkSettings>, problems: &mut Problems<'_>) {
    for (name, settings) in sinks {
        let Some(target) = &settings.dead_letter else {
            continue;
        };
        let message = match sinks.get(target) {
            None => format!(
                "no sink is named `{target}` (sinks: {})",
                sink_names(sinks)
            ),
            Some(_) if target == name => "a sink cannot be its own dead letter sink".into(),
            Some(t) if t.dead_letter.is_some() => format!(
                "`{target}` has a dead_letter sink of its own; a dead letter sink must keep its failures on disk"
            ),
            Some(_) => continue,
        };
        problems.add(&format!("sinks.{name}.dead_letter"), message);
    }
}

/// Every sink's name, for messages about a name that is none of them.
fn sink_names(sinks: &BTreeMap<String, SinkSettings>) -> String {
    sinks
        .keys()
        .map(String::as_str)
        .collect::<Vec<_>>()
        .join(", ")
}

/// The `routes:` and `unmatched:` sections checked, ready for [`RouteTable::compile`].
struct Routes {
    /// The routes as written, in file order.
    specs: Vec<RouteSpec>,
    /// The sink of events no route matches; `None` drops them.
    unmatched: Option<String>,
}

/// Checks `routes:` and `unmatched:`: unique route names, and sinks that exist.
fn check_routes(
    raw: Vec<RouteSpec>,
    unmatched: Option<String>,
    sinks: &BTreeMap<String, SinkSettings>,
    problems: &mut Problems<'_>,
) -> Routes {
    let mut names = BTreeSet::new();
    for (i, route) in raw.iter().enumerate() {
        let mut at = Problems::new(format!("routes[{i}]"));
        if !names.insert(route.name.as_str()) {
            at.add(
                "name",
                format!("`{}` is used by another route already", route.name),
            );
        }
        // `to: []` drops what the route matches, which only stopping there can do.
        if route.to.is_empty() && route.continue_matching {
            at.add(
                "to",
                "names no sink and has continue: true, so it does nothing; `to: []` drops what \
                 the route matches only without continue",
            );
        }
        for (j, sink) in route.to.iter().enumerate() {
            if !sinks.contains_key(sink) {
                at.add(
                    &format!("to[{j}]"),
                    format!("no sink is named `{sink}` (sinks: {})", sink_names(sinks)),
                );
            }
        }
        problems.include(at);
    }
    let unmatched = match unmatched.as_deref() {
        None | Some("drop") => None,
        Some(sink) if sinks.contains_key(sink) => Some(sink.to_owned()),
        Some(sink) => {
            problems.add(
                "unmatched",
                format!(
                    "must be `drop` or a sink name; no sink is named `{sink}` (sinks: {})",
                    sink_names(sinks)
                ),
            );
            None
        }
    };
    Routes {
        specs: raw,
        unmatched,
    }
}

/// Checks `spool:`: big enough for its smallest use, and a real fsync interval.
fn check_spool(raw: RawSpool, max_frame_bytes: u64, problems: &mut Problems<'_>) -> SpoolConfig {
    let spool = SpoolConfig {
        max_bytes: raw.max_bytes,
        fsync: raw.fsync,
        fsync_interval: raw.fsync_interval.0,
        when_full: raw.when_full,
        replay_share: raw.replay_share,
        ..SpoolConfig::new(raw.dir)
    };
    let mut at = Problems::new("spool");
    if spool.max_bytes < MIN_SPOOL_BYTES {
        at.add(
            "max_bytes",
            format!(
                "{} is too small; give the spool at least 1 MiB (1048576)",
                spool.max_bytes
            ),
        );
    } else if spool.max_bytes < 2 * max_frame_bytes {
        // One event can be as large as a frame; the spool must hold it with room to spare.
        at.add(
            "max_bytes",
            format!(
                "{} is smaller than twice chatwoot.max_frame_bytes ({max_frame_bytes})",
                spool.max_bytes
            ),
        );
    }
    if spool.fsync_interval.is_zero() {
        at.add("fsync_interval", "must be greater than zero");
    }
    check_replay_share(&spool, max_frame_bytes, &mut at);
    problems.include(at);
    spool
}

/// Checks `admin:`: an address to listen on, and readiness that names tokens that exist.
fn check_admin(
    raw: RawAdmin,
    tokens: &BTreeSet<String>,
    problems: &mut Problems<'_>,
) -> AdminSettings {
    let mut at = Problems::new("admin");
    let listen = match raw.listen.as_deref().map(parse_listen) {
        None => DEFAULT_ADMIN_LISTEN,
        Some(parsed) => at.check("listen", parsed).unwrap_or(DEFAULT_ADMIN_LISTEN),
    };
    let ready_requires = match raw.ready_requires {
        None => ReadyRequires::All,
        Some(RawReadyRequires::Keyword(keyword)) => match keyword.as_str() {
            "all" => ReadyRequires::All,
            "any" => ReadyRequires::Any,
            _ => {
                at.add(
                    "ready_requires",
                    format!("`{keyword}` must be `all`, `any` or a list of token names"),
                );
                ReadyRequires::All
            }
        },
        Some(RawReadyRequires::Tokens(names)) => {
            for (i, name) in names.iter().enumerate() {
                if !tokens.contains(name) {
                    at.add(
                        &format!("ready_requires[{i}]"),
                        format!("no token is named `{name}`"),
                    );
                }
            }
            ReadyRequires::Tokens(names)
        }
    };
    problems.include(at);
    AdminSettings {
        listen,
        ready_requires,
    }
}

/// Checks `memory_limit`: room for two events as large as a frame, one on its way from a
/// socket and one on its way to a sink.
fn check_memory_limit(limit: u64, max_frame_bytes: u64, problems: &mut Problems<'_>) {
    if limit < MIN_MEMORY_LIMIT {
        problems.add(
            "memory_limit",
            format!("{limit} is too small; give at least 4 MiB (4194304)"),
        );
    } else if limit < 2 * max_frame_bytes {
        problems.add(
            "memory_limit",
            format!("{limit} is smaller than twice chatwoot.max_frame_bytes ({max_frame_bytes})"),
        );
    }
}

/// Checks `retired_sinks:`: plain names, none of them a configured sink.
fn check_retired_sinks(
    retired: &BTreeMap<String, Retirement>,
    sinks: &BTreeMap<String, SinkSettings>,
    problems: &mut Problems<'_>,
) {
    for name in retired.keys() {
        let key = format!("retired_sinks.{name}");
        if let Err(message) = check_name(name) {
            problems.add(&key, message);
        } else if sinks.contains_key(name) {
            problems.add(
                &key,
                format!(
                    "`{name}` is configured under sinks: a sink is configured or retired, not both"
                ),
            );
        }
    }
}

/// Checks `spool.replay_share`: a fraction above 0 and at most 1, whose share of `max_bytes`
/// holds the largest event (a frame), so that every replayed letter fits in it.
fn check_replay_share(spool: &SpoolConfig, max_frame_bytes: u64, at: &mut Problems<'_>) {
    let share = spool.replay_share;
    if !(share > 0.0 && share <= 1.0) {
        at.add(
            "replay_share",
            format!(
                "{share} is out of range; give a fraction above 0 and at most 1 (the part of max_bytes a dlq replay may fill, 0.5 by default)"
            ),
        );
    } else if spool.max_bytes >= MIN_SPOOL_BYTES && spool.replay_bytes() < max_frame_bytes {
        at.add(
            "replay_share",
            format!(
                "{share} of max_bytes is {} bytes, less than chatwoot.max_frame_bytes ({max_frame_bytes}): a replayed event could not fit in it",
                spool.replay_bytes()
            ),
        );
    }
}

/// Backfilling tokens keep their resume files in `backfill/` of the spool directory: state that
/// must outlive the process lives with the spool, on its volume.
fn keep_resume_files_in(spool_dir: &std::path::Path, tokens: &mut [TokenSpec]) {
    for token in tokens {
        if let Some(backfill) = token.api.as_mut().and_then(|api| api.backfill.as_mut()) {
            backfill.resume_dir = Some(spool_dir.join("backfill"));
        }
    }
}

/// Names appear in metrics labels, log fields and templates, so they stay plain.
fn check_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("is empty".into());
    }
    if !name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    {
        return Err(format!(
            "`{name}` may contain only letters, digits, `-`, `_` and `.`"
        ));
    }
    Ok(())
}

/// A cable URL: `ws://` or `wss://` with a host, and nothing that must not be echoed.
pub(super) fn check_cable_url(url: &str) -> Result<(), String> {
    // Checked before anything echoes the URL: the URL ends up in every event's `source` and in
    // logs, so it must not carry credentials.
    let uri: Uri = url.parse().map_err(|e| format!("is not a URL ({e})"))?;
    if uri.authority().is_some_and(|a| a.as_str().contains('@')) {
        return Err("must not contain credentials (user:password@); use chatwoot.headers".into());
    }
    if uri.query().is_some() {
        return Err(
            "must not have a query string: it would appear in every event's source and in logs"
                .into(),
        );
    }
    match uri.scheme_str() {
        Some("ws") | Some("wss") => {}
        _ => return Err(format!("`{url}` must start with ws:// or wss://")),
    }
    if uri.host().is_none_or(str::is_empty) {
        return Err(format!("`{url}` has no host"));
    }
    Ok(())
}
