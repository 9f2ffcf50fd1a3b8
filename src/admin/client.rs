//! The admin endpoint's other side, for the commands an operator runs next to the daemon:
//! `chatwoot-bridge tap` (the routed events as JSON lines), `top` (rates and backlogs per token
//! and sink, redrawn every second) and `reload` (`POST /reload`).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::Write;
use std::time::{Duration, Instant};

use super::report::StatusReport;

/// Bounds the wait for the admin endpoint to accept a connection.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Bounds a `/status` request: the endpoint answers at once.
const STATUS_TIMEOUT: Duration = Duration::from_secs(10);

/// Bounds a `/reload` request: the endpoint's own wait, and some.
const RELOAD_TIMEOUT: Duration =
    super::RELOAD_ANSWER_TIMEOUT.saturating_add(Duration::from_secs(10));

/// Bounds how much of an error answer is read and shown.
const MAX_ERROR_BODY_BYTES: usize = 64 << 10;

/// The longest last error `top` shows of a token or a sink; the rest is cut.
const TOP_ERROR_CHARS: usize = 60;

/// What went wrong talking to the admin endpoint.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The address is not one.
    #[error("`{0}` is not an admin endpoint address: give host:port, a port, or http://host:port")]
    Address(String),
    /// No connection, or it broke.
    #[error("cannot reach the admin endpoint at {url}: {source}")]
    Unreachable {
        /// What was asked.
        url: String,
        /// Why it failed.
        source: reqwest::Error,
    },
    /// The endpoint answered with an error status.
    #[error("{url} answered {status}: {body}")]
    Refused {
        /// What was asked.
        url: String,
        /// The status code.
        status: u16,
        /// What it said, cut at 64 KiB.
        body: String,
    },
    /// `/status` answered what is not a status report (another program on that port?).
    #[error("{url} did not answer with a status report: {detail}")]
    NotAReport {
        /// What was asked.
        url: String,
        /// Why it could not be read.
        detail: String,
    },
    /// The output could not be written (a closed pipe).
    #[error("cannot write the output: {0}")]
    Output(#[from] std::io::Error),
}

/// Which events `tap` asks for: those matching every filter given.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TapFilter {
    /// Only events this route matched.
    pub route: Option<String>,
    /// Only events routed to this sink, shown as it sees them.
    pub sink: Option<String>,
    /// Only events read with this token.
    pub token: Option<String>,
}

/// How `top` draws.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TopOptions {
    /// Between two frames; rates are measured over it.
    pub interval: Duration,
    /// Frames to draw before returning; `None` for ever.
    pub iterations: Option<u64>,
    /// Clear the terminal before each frame (for a terminal, not for a pipe).
    pub clear_screen: bool,
}

/// A client of one admin endpoint.
#[derive(Debug, Clone)]
pub struct AdminClient {
    /// `http://host:port`, without a trailing slash.
    base: String,
    /// The HTTP client.
    http: reqwest::Client,
}

impl AdminClient {
    /// A client of the endpoint at `admin`: `host:port`, a port alone (on 127.0.0.1), or an
    /// `http://` URL.
    pub fn new(admin: &str) -> Result<AdminClient, ClientError> {
        let admin = admin.trim().trim_end_matches('/');
        let base = if admin.starts_with("http://") || admin.starts_with("https://") {
            admin.to_owned()
        } else if !admin.is_empty() && admin.bytes().all(|b| b.is_ascii_digit()) {
            format!("http://127.0.0.1:{admin}")
        } else {
            format!("http://{admin}")
        };
        reqwest::Url::parse(&base).map_err(|_| ClientError::Address(admin.to_owned()))?;
        let http = reqwest::Client::builder()
            .connect_timeout(CONNECT_TIMEOUT)
            .build()
            .map_err(|source| ClientError::Unreachable {
                url: base.clone(),
                source,
            })?;
        Ok(AdminClient { base, http })
    }

    /// The endpoint's `/status`.
    pub async fn status(&self) -> Result<StatusReport, ClientError> {
        let url = format!("{}/status", self.base);
        let request = self.http.get(&url).timeout(STATUS_TIMEOUT);
        let text = self.send(&url, request).await?;
        serde_json::from_str(&text).map_err(|e| ClientError::NotAReport {
            url,
            detail: e.to_string(),
        })
    }

    /// Asks the daemon to reload its config; what it did, or why it refused (as
    /// [`ClientError::Refused`]).
    pub async fn reload(&self) -> Result<String, ClientError> {
        let url = format!("{}/reload", self.base);
        let request = self.http.post(&url).timeout(RELOAD_TIMEOUT);
        self.send(&url, request).await
    }

    /// Writes the tapped events to `out` as they come, one JSON line each (and a
    /// `{"missed":N}` line where the tap fell behind), until the daemon stops or, with
    /// `count`, that many events were written. Returns how many events were written.
    pub async fn tap(
        &self,
        filter: &TapFilter,
        count: Option<u64>,
        out: &mut impl Write,
    ) -> Result<u64, ClientError> {
        let url = format!("{}/tap", self.base);
        let query: Vec<(&str, &str)> = [
            ("route", &filter.route),
            ("sink", &filter.sink),
            ("token", &filter.token),
        ]
        .into_iter()
        .filter_map(|(key, value)| value.as_deref().map(|v| (key, v)))
        .collect();
        let unreachable = |source| ClientError::Unreachable {
            url: url.clone(),
            source,
        };
        let mut response = self
            .http
            .get(&url)
            .query(&query)
            .send()
            .await
            .map_err(unreachable)?;
        if !response.status().is_success() {
            return Err(refused(&url, response).await);
        }
        let mut lines = LineCounter::default();
        while let Some(chunk) = response.chunk().await.map_err(unreachable)? {
            let (upto, done) = lines.take(&chunk, count);
            out.write_all(&chunk[..upto])?;
            out.flush()?;
            if done {
                break;
            }
        }
        Ok(lines.events)
    }

    /// Draws `top` on `out`: a frame per interval, rates measured over it.
    pub async fn top(&self, options: TopOptions, out: &mut impl Write) -> Result<(), ClientError> {
        let mut before = (self.status().await?, Instant::now());
        let mut frames = 0;
        while options.iterations.is_none_or(|n| frames < n) {
            tokio::time::sleep(options.interval).await;
            let now = (self.status().await?, Instant::now());
            let elapsed = now.1.duration_since(before.1).as_secs_f64();
            let frame = render(&self.base, &before.0, &now.0, elapsed);
            if options.clear_screen {
                out.write_all(b"\x1b[H\x1b[2J")?;
            }
            out.write_all(frame.as_bytes())?;
            out.flush()?;
            before = now;
            frames += 1;
        }
        Ok(())
    }

    /// Sends `request`: the answer's text on success, else [`ClientError::Refused`].
    async fn send(
        &self,
        url: &str,
        request: reqwest::RequestBuilder,
    ) -> Result<String, ClientError> {
        let unreachable = |source| ClientError::Unreachable {
            url: url.to_owned(),
            source,
        };
        let response = request.send().await.map_err(unreachable)?;
        if !response.status().is_success() {
            return Err(refused(url, response).await);
        }
        response.text().await.map_err(unreachable)
    }
}

/// The error of an answer with an error status, with what it said.
async fn refused(url: &str, mut response: reqwest::Response) -> ClientError {
    let status = response.status().as_u16();
    let mut body = Vec::new();
    while let Ok(Some(chunk)) = response.chunk().await {
        body.extend_from_slice(&chunk);
        if body.len() >= MAX_ERROR_BODY_BYTES {
            body.truncate(MAX_ERROR_BODY_BYTES);
            break;
        }
    }
    ClientError::Refused {
        url: url.to_owned(),
        status,
        body: String::from_utf8_lossy(&body).trim_end().to_owned(),
    }
}

/// Counts the event lines of a tap's stream as it passes, without holding any line: an event
/// line starts with `{"r` (`{"routes":`), a notice with `{"m` (`{"missed":`).
#[derive(Debug, Default)]
struct LineCounter {
    /// The position in the current line (capped at 3: only the first bytes matter).
    column: usize,
    /// Whether the current line is an event's.
    is_event: bool,
    /// Event lines ended so far.
    events: u64,
}

impl LineCounter {
    /// Takes `chunk`: how much of it to write, and whether that reaches `count` events.
    fn take(&mut self, chunk: &[u8], count: Option<u64>) -> (usize, bool) {
        for (i, &byte) in chunk.iter().enumerate() {
            if byte == b'\n' {
                self.events += u64::from(self.is_event);
                self.column = 0;
                self.is_event = false;
                if count.is_some_and(|n| self.events >= n) {
                    return (i + 1, true);
                }
                continue;
            }
            if self.column == 2 {
                self.is_event = byte == b'r';
            }
            self.column = (self.column + 1).min(3);
        }
        (chunk.len(), false)
    }
}

/// One frame of `top`: `before` and `now` are two reports `elapsed` seconds apart.
pub(crate) fn render(
    base: &str,
    before: &StatusReport,
    now: &StatusReport,
    elapsed: f64,
) -> String {
    let rate = |now: u64, then: Option<u64>| match then {
        Some(then) if elapsed > 0.0 => format!("{:.1}", now.saturating_sub(then) as f64 / elapsed),
        _ => "-".into(),
    };
    let mut frame = String::new();
    let _ = writeln!(
        frame,
        "chatwoot-bridge top  {base}  v{}  config {}  {}  {}",
        now.version,
        now.config.hash,
        if now.healthy { "healthy" } else { "UNHEALTHY" },
        if now.ready { "ready" } else { "NOT READY" },
    );
    for why in now.unhealthy_because.iter().chain(&now.not_ready_because) {
        let _ = writeln!(frame, "  ! {why}");
    }
    let width = name_width(now.tokens.keys().chain(now.sinks.keys()));
    let _ = writeln!(
        frame,
        "\n{:width$}  {:12} {:>9} {:>10} {:>10} {:>6}  LAST ERROR",
        "TOKEN", "STATE", "EVENTS/S", "EVENTS", "LAST EVENT", "RECONN"
    );
    for (name, token) in &now.tokens {
        let then = before.tokens.get(name).map(|t| t.events);
        let _ = writeln!(
            frame,
            "{name:width$}  {:12} {:>9} {:>10} {:>10} {:>6}  {}",
            token.state,
            rate(token.events, then),
            token.events,
            age(token.last_event_age_seconds),
            token.reconnects.values().sum::<u64>(),
            cut(token.last_error.as_deref()),
        );
    }
    sink_rows(&mut frame, width, before, now, &rate);
    let spooled = rate(now.events.spooled, Some(before.events.spooled));
    let dropped: u64 = now.events.dropped.values().sum();
    let _ = writeln!(
        frame,
        "\nspool {} of {}{}  spooled {} ({spooled}/s)  dropped {dropped}  unmatched {}",
        bytes(now.spool.bytes),
        bytes(now.spool.max_bytes),
        if now.spool.writable {
            ""
        } else {
            " (NOT WRITABLE)"
        },
        now.events.spooled,
        now.events.unmatched.values().sum::<u64>(),
    );
    frame
}

/// The sinks' table of a `top` frame.
fn sink_rows(
    frame: &mut String,
    width: usize,
    before: &StatusReport,
    now: &StatusReport,
    rate: &dyn Fn(u64, Option<u64>) -> String,
) {
    let _ = writeln!(
        frame,
        "\n{:width$}  {:12} {:>9} {:>10} {:>9} {:>10} {:>8} {:>8} {:>7} {:>7} {:>6}  LAST ERROR",
        "SINK",
        "STATE",
        "DELIV/S",
        "DELIVERED",
        "BACKLOG",
        "BYTES",
        "OLDEST",
        "INFLIGHT",
        "PARKED",
        "RETRIES",
        "DEAD"
    );
    let sinks: &BTreeMap<String, super::report::SinkReport> = &now.sinks;
    for (name, sink) in sinks {
        let then = before.sinks.get(name).map(|s| s.delivered);
        let state = if sink.loop_alive {
            sink.state.as_str()
        } else {
            "DEAD"
        };
        let _ = writeln!(
            frame,
            "{name:width$}  {state:12} {:>9} {:>10} {:>9} {:>10} {:>8} {:>8} {:>7} {:>7} {:>6}  {}",
            rate(sink.delivered, then),
            sink.delivered,
            sink.backlog_events,
            bytes(sink.backlog_bytes),
            age(sink.oldest_undelivered_age_seconds),
            sink.in_flight,
            sink.parked,
            sink.retries,
            sink.dead_lettered,
            cut(sink.last_error.as_deref()),
        );
    }
}

/// The width of the name column: the longest name, within 8 to 32.
fn name_width<'a>(names: impl Iterator<Item = &'a String>) -> usize {
    names
        .map(|n| n.chars().count())
        .max()
        .unwrap_or(0)
        .clamp(8, 32)
}

/// An age in seconds, short.
fn age(seconds: f64) -> String {
    match seconds {
        s if s < 60.0 => format!("{s:.1}s"),
        s if s < 3600.0 => format!("{:.1}m", s / 60.0),
        s => format!("{:.1}h", s / 3600.0),
    }
}

/// A size in bytes, short.
fn bytes(n: u64) -> String {
    const UNITS: [&str; 4] = ["B", "KiB", "MiB", "GiB"];
    let mut value = n as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

/// A last error on one line, cut to [`TOP_ERROR_CHARS`]; `-` for none.
fn cut(error: Option<&str>) -> String {
    let Some(error) = error else {
        return "-".into();
    };
    let line: String = error.replace('\n', " ");
    if line.chars().count() <= TOP_ERROR_CHARS {
        return line;
    }
    let mut short: String = line.chars().take(TOP_ERROR_CHARS - 1).collect();
    short.push('…');
    short
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_take_a_port_a_host_and_port_or_a_url() {
        assert_eq!(
            AdminClient::new("9464").unwrap().base,
            "http://127.0.0.1:9464"
        );
        assert_eq!(
            AdminClient::new("localhost:9000").unwrap().base,
            "http://localhost:9000"
        );
        assert_eq!(
            AdminClient::new("http://10.0.0.1:9464/").unwrap().base,
            "http://10.0.0.1:9464"
        );
        assert!(matches!(
            AdminClient::new("a b:1"),
            Err(ClientError::Address(_))
        ));
    }

    #[test]
    fn the_line_counter_stops_after_the_events_asked_for_and_skips_notices() {
        let stream = b"{\"missed\":3}\n{\"routes\":[]}\n{\"rou";
        let mut lines = LineCounter::default();
        assert_eq!(lines.take(stream, Some(2)), (stream.len(), false));
        assert_eq!(lines.events, 1);
        let rest = b"tes\":[]}\n{\"routes\":[]}\n";
        assert_eq!(lines.take(rest, Some(2)), (9, true));
        assert_eq!(lines.events, 2);
    }

    #[test]
    fn sizes_and_ages_are_short() {
        assert_eq!(bytes(512), "512 B");
        assert_eq!(bytes(3 << 20), "3.0 MiB");
        assert_eq!(age(2.25), "2.2s");
        assert_eq!(age(90.0), "1.5m");
        assert_eq!(cut(Some(&"x".repeat(100))).chars().count(), TOP_ERROR_CHARS);
    }
}
