//! `/tap`: the routed events, live, as JSON lines: one `{"routes":[..],"sinks":[..],"event":{..}}`
//! per event, the event as a structured CloudEvent; and `{"missed":N}` where the tap fell behind.
//!
//! What a tap shows is redacted as the sinks see it, and pubsub tokens are always removed: with
//! `sink=S`, by S's redaction; otherwise by every `fields.drop` of the sinks the event goes to.
//! The work (filtering, redaction, encoding) is done here, on the tap's task; the ingest only
//! hands batches over ([`crate::delivery::tap`]).

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use hyper::body::{Body, Frame};
use tokio::sync::{mpsc, OwnedSemaphorePermit};
use tokio_util::sync::CancellationToken;

use super::{ConfigView, Shared, MAX_TAPS};
use crate::delivery::tap::{TapBatch, TapReceiver};
use crate::event::Event;
use crate::route::redact::Redaction;

/// Bounds the chunks (one per batch) written and not yet taken by the client's connection:
/// past it the tap stops reading batches, and misses some.
const TAP_CHUNKS: usize = 4;

/// Bounds the length of a query string value after decoding (names are short).
const MAX_FILTER_BYTES: usize = 256;

/// Which events a tap shows: those matching every filter given.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(super) struct TapFilter {
    /// Only events this route matched.
    pub(super) route: Option<String>,
    /// Only events routed to this sink, redacted as it sees them.
    pub(super) sink: Option<String>,
    /// Only events read with this token.
    pub(super) token: Option<String>,
}

impl TapFilter {
    /// The filter of a query string (`route=R&sink=S&token=T`, each at most once), checked
    /// against the names `view` knows.
    pub(super) fn parse(query: Option<&str>, view: &ConfigView) -> Result<TapFilter, String> {
        let mut filter = TapFilter::default();
        for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            let value = percent_decode(value)
                .ok_or_else(|| format!("`{key}`: not a percent-encoded UTF-8 name"))?;
            let (slot, known) = match key {
                "route" => (&mut filter.route, view.routes.contains(&value)),
                "sink" => (&mut filter.sink, view.redactions.contains_key(&value)),
                "token" => (&mut filter.token, view.tokens.contains(&value)),
                other => {
                    return Err(format!(
                        "unknown parameter `{other}`: give route=, sink= or token="
                    ))
                }
            };
            if slot.is_some() {
                return Err(format!("`{key}` is given twice"));
            }
            if !known {
                return Err(format!("no {key} is named `{value}`"));
            }
            *slot = Some(value);
        }
        Ok(filter)
    }
}

/// `value` with its `%XX` escapes (and `+` for space) decoded; `None` when that is not UTF-8 or
/// longer than [`MAX_FILTER_BYTES`].
fn percent_decode(value: &str) -> Option<String> {
    let bytes = value.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                let hex = std::str::from_utf8(bytes.get(i + 1..i + 3)?).ok()?;
                out.push(u8::from_str_radix(hex, 16).ok()?);
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
        if out.len() > MAX_FILTER_BYTES {
            return None;
        }
    }
    String::from_utf8(out).ok()
}

/// A tap's response body: the chunks its task writes.
pub(super) struct TapBody {
    /// From the tap's task; the body ends when the task does.
    chunks: mpsc::Receiver<Bytes>,
}

impl Body for TapBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.chunks
            .poll_recv(cx)
            .map(|chunk| chunk.map(|c| Ok(Frame::data(c))))
    }
}

/// Why a tap cannot start.
#[derive(Debug)]
pub(super) enum TapRefused {
    /// The query is wrong: what the client should fix.
    BadFilter(String),
    /// [`MAX_TAPS`] taps stream already.
    TooMany,
}

impl std::fmt::Display for TapRefused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TapRefused::BadFilter(why) => writeln!(f, "{why}"),
            TapRefused::TooMany => writeln!(
                f,
                "{MAX_TAPS} taps stream already (MAX_TAPS); close one and try again"
            ),
        }
    }
}

/// Starts a tap for `query`: its body, fed by a task that ends with the connection or the
/// endpoint.
pub(super) fn start(shared: &Arc<Shared>, query: Option<&str>) -> Result<TapBody, TapRefused> {
    let view = shared.view();
    let filter = TapFilter::parse(query, &view).map_err(TapRefused::BadFilter)?;
    let slot = shared
        .taps
        .clone()
        .try_acquire_owned()
        .map_err(|_| TapRefused::TooMany)?;
    let (chunks, body) = mpsc::channel(TAP_CHUNKS);
    let tap = Tap {
        receiver: shared.sources.tap.subscribe(),
        filter,
        view,
        chunks,
        _slot: slot,
    };
    tokio::spawn(tap.run(shared.stop.clone()));
    Ok(TapBody { chunks: body })
}

/// One tap's task.
struct Tap {
    /// The batches the ingest offers.
    receiver: TapReceiver,
    /// Which events it shows.
    filter: TapFilter,
    /// The redactions of the config that ran when it started.
    view: Arc<ConfigView>,
    /// Into its response body.
    chunks: mpsc::Sender<Bytes>,
    /// Its slot among [`MAX_TAPS`], given back when it ends.
    _slot: OwnedSemaphorePermit,
}

impl Tap {
    /// Writes the lines of every batch until the client goes away or the endpoint stops.
    async fn run(mut self, stop: CancellationToken) {
        loop {
            let (batch, missed) = tokio::select! {
                next = self.receiver.next() => next,
                () = self.chunks.closed() => return,
                () = stop.cancelled() => return,
            };
            let chunk = self.lines(&batch, missed);
            drop(batch);
            if chunk.is_empty() {
                continue;
            }
            // While the client reads slowly this waits, and the tap falls behind instead of
            // the pipeline.
            tokio::select! {
                sent = self.chunks.send(Bytes::from(chunk)) => if sent.is_err() { return },
                () = stop.cancelled() => return,
            }
        }
    }

    /// The lines of `batch`: a `missed` line first when events were missed, then one per
    /// event the filter lets through.
    fn lines(&self, batch: &TapBatch, missed: u64) -> Vec<u8> {
        let mut out = Vec::new();
        if missed > 0 {
            out.extend_from_slice(format!("{{\"missed\":{missed}}}\n").as_bytes());
        }
        let sink_names = batch.routes.sink_names();
        let wanted_sink = self
            .filter
            .sink
            .as_ref()
            .map(|s| sink_names.iter().position(|n| n == s));
        for tapped in &batch.events {
            let event = &tapped.event;
            if self
                .filter
                .token
                .as_deref()
                .is_some_and(|t| *event.token != *t)
            {
                continue;
            }
            if let Some(wanted) = wanted_sink {
                if !wanted.is_some_and(|i| tapped.routed.sinks.iter().any(|s| s == i)) {
                    continue;
                }
            }
            let routes = batch.routes.matching_route_names(event);
            if let Some(route) = &self.filter.route {
                if !routes.iter().any(|r| r == route) {
                    continue;
                }
            }
            let sinks: Vec<&str> = tapped
                .routed
                .sinks
                .iter()
                .map(|i| sink_names[i].as_str())
                .collect();
            let redaction = self.redaction(&sinks);
            let shown = redaction.redacted("tap", event.clone());
            write_line(&mut out, &routes, &sinks, &shown);
        }
        out
    }

    /// What to remove from an event going to `sinks`: pubsub tokens always; the fields of the
    /// filtered sink, or of every sink it goes to.
    fn redaction(&self, sinks: &[&str]) -> Redaction {
        let redactions: &BTreeMap<String, Redaction> = &self.view.redactions;
        let mut drop = Vec::new();
        let shown_as: Vec<&str> = match &self.filter.sink {
            Some(sink) => vec![sink.as_str()],
            None => sinks.to_vec(),
        };
        for sink in shown_as {
            if let Some(redaction) = redactions.get(sink) {
                drop.extend(redaction.drop.iter().cloned());
            }
        }
        Redaction {
            strip_pubsub_tokens: true,
            drop,
        }
    }
}

/// One event's line.
fn write_line(out: &mut Vec<u8>, routes: &[&str], sinks: &[&str], event: &Event) {
    out.extend_from_slice(b"{\"routes\":");
    out.extend_from_slice(&serde_json::to_vec(routes).expect("strings serialize"));
    out.extend_from_slice(b",\"sinks\":");
    out.extend_from_slice(&serde_json::to_vec(sinks).expect("strings serialize"));
    out.extend_from_slice(b",\"event\":");
    event.write_structured(out);
    out.extend_from_slice(b"}\n");
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view() -> ConfigView {
        ConfigView {
            tokens: ["agent".into()].into(),
            routes: ["all of it".into()].into(),
            redactions: [("out".to_owned(), Redaction::default())].into(),
            ..ConfigView::default()
        }
    }

    #[test]
    fn filters_name_what_exists_and_say_what_is_wrong() {
        let filter = TapFilter::parse(Some("route=all%20of+it&token=agent"), &view()).unwrap();
        assert_eq!(filter.route.as_deref(), Some("all of it"));
        assert_eq!(filter.token.as_deref(), Some("agent"));
        assert_eq!(TapFilter::parse(None, &view()), Ok(TapFilter::default()));
        let err = TapFilter::parse(Some("sink=nope"), &view()).unwrap_err();
        assert_eq!(err, "no sink is named `nope`");
        let err = TapFilter::parse(Some("sink=out&sink=out"), &view()).unwrap_err();
        assert_eq!(err, "`sink` is given twice");
        let err = TapFilter::parse(Some("colour=red"), &view()).unwrap_err();
        assert!(err.starts_with("unknown parameter `colour`"), "{err}");
        let err = TapFilter::parse(Some("token=%ZZ"), &view()).unwrap_err();
        assert!(err.contains("not a percent-encoded"), "{err}");
        let long = "a".repeat(MAX_FILTER_BYTES + 1);
        assert!(TapFilter::parse(Some(&format!("token={long}")), &view()).is_err());
    }
}
