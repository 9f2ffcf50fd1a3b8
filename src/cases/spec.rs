//! The cases file as written, and its checks into [`Case`]s: every problem is collected, each
//! named by its key path and the case's name.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::SystemTime;

use serde::Deserialize;

use super::{Case, Expect};
use crate::config::{Config, TokenSpec};
use crate::event::id::IdAssigner;
use crate::event::{nesting_exceeds, Event, JsonText};
use crate::route::jsonpath::JsonPath;
use crate::source::protocol::{self, ServerFrame};
use crate::types::Problem;

/// The whole cases file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct CasesFile {
    /// The cases, run in file order.
    pub(super) cases: Vec<CaseSpec>,
}

/// One case as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct CaseSpec {
    /// Shown on its pass or fail line; unique in the file.
    name: String,
    /// A recorded event by name (`message.created`); `data` is then merged over its data.
    #[serde(default)]
    fixture: Option<String>,
    /// The event name of an inline event, whose `data` is all of its data.
    #[serde(default)]
    event: Option<String>,
    /// Inline: the event's data. With `fixture`: a JSON merge patch (RFC 7386) over the
    /// recording's data, so a case changes only what it is about (`null` removes a key).
    #[serde(default)]
    data: Option<serde_json::Value>,
    /// The configured token the event arrives on; may be left out when there is one token.
    #[serde(default)]
    token: Option<String>,
    /// Exactly the sinks the event must reach (`[]`: none; it is dropped).
    #[serde(default)]
    reaches: Option<Vec<String>>,
    /// Sinks the event must not reach.
    #[serde(default)]
    misses: Vec<String>,
    /// The topic, subject or URL the event must get at each named sink.
    #[serde(default)]
    targets: BTreeMap<String, String>,
    /// Paths of `data` each named sink must not see (removed by its redaction).
    #[serde(default)]
    removed: BTreeMap<String, Vec<String>>,
}

/// Where the problems of one case are reported: its key path and its name.
struct CaseProblems<'p> {
    /// `cases[i]`.
    key: String,
    /// The case's name, added to every problem so it can be found without counting.
    name: String,
    /// Every problem of the file so far.
    problems: &'p mut Vec<Problem>,
    /// How many problems there were before this case: whether it added any.
    before: usize,
}

impl CaseProblems<'_> {
    /// A problem at `field` of this case (`""`: the case itself).
    fn add(&mut self, field: &str, message: impl Into<String>) {
        let key = if field.is_empty() {
            format!("{} (case `{}`)", self.key, self.name)
        } else {
            format!("{}.{field} (case `{}`)", self.key, self.name)
        };
        self.problems.push(Problem {
            key,
            message: message.into(),
        });
    }

    /// Whether this case had no problem.
    fn none(&self) -> bool {
        self.problems.len() == self.before
    }
}

/// Checks every case against `config`; all the problems, or the cases.
pub(super) fn check(file: CasesFile, config: &Config) -> Result<Vec<Case>, Vec<Problem>> {
    let mut problems = Vec::new();
    if file.cases.is_empty() {
        problems.push(Problem {
            key: "cases".into(),
            message: "is empty: give at least one case".into(),
        });
    }
    let mut names = BTreeSet::new();
    let mut ids = IdAssigner::new();
    let mut cases = Vec::with_capacity(file.cases.len());
    for (i, spec) in file.cases.into_iter().enumerate() {
        let mut at = CaseProblems {
            key: format!("cases[{i}]"),
            name: spec.name.clone(),
            before: problems.len(),
            problems: &mut problems,
        };
        if spec.name.trim().is_empty() {
            at.add("name", "is empty");
        } else if !names.insert(spec.name.clone()) {
            at.add(
                "name",
                "is the name of an earlier case too; names must be unique",
            );
        }
        if let Some(case) = spec.check(config, &mut ids, &mut at) {
            cases.push(case);
        }
    }
    if problems.is_empty() {
        Ok(cases)
    } else {
        Err(problems)
    }
}

impl CaseSpec {
    /// The case, or `None` with its problems reported.
    fn check(
        self,
        config: &Config,
        ids: &mut IdAssigner,
        at: &mut CaseProblems<'_>,
    ) -> Option<Case> {
        let token = self.token(config, at);
        let event = self.event(config, at);
        let expect = self.expect(config, at);
        let (Some(token), Some((name, data))) = (token, event) else {
            return None;
        };
        let mut event = Event::new(
            &name,
            data,
            token.name.clone(),
            Arc::from(token.source()),
            SystemTime::now(),
        );
        // As the ingest does, so that a template with `{id}` renders.
        event.id = ids.assign(
            event.content_hash,
            &event.token,
            event.received_at,
            event.received_mono,
        );
        at.none().then(|| Case {
            name: self.name,
            event: Arc::new(event),
            expect,
        })
    }

    /// The token the event arrives on: the one named, or the only one configured.
    fn token<'c>(&self, config: &'c Config, at: &mut CaseProblems<'_>) -> Option<&'c TokenSpec> {
        let known = || {
            config
                .tokens
                .iter()
                .map(|t| format!("`{}`", t.name))
                .collect::<Vec<_>>()
                .join(", ")
        };
        match &self.token {
            Some(name) => {
                let found = config.tokens.iter().find(|t| *t.name == **name);
                if found.is_none() {
                    at.add(
                        "token",
                        format!("no token is named `{name}` (tokens: {})", known()),
                    );
                }
                found
            }
            None => match config.tokens.as_slice() {
                [only] => Some(only),
                _ => {
                    at.add(
                        "",
                        format!("needs `token`: the config has several ({})", known()),
                    );
                    None
                }
            },
        }
    }

    /// The event's name and data: the fixture with `data` merged over it, or the inline event.
    fn event(&self, config: &Config, at: &mut CaseProblems<'_>) -> Option<(String, JsonText)> {
        let (name, data) = match (&self.fixture, &self.event) {
            (Some(fixture), None) => {
                let (name, mut data) = fixture_event(fixture, at)?;
                if let Some(patch) = &self.data {
                    merge_patch(&mut data, patch);
                }
                (name, data)
            }
            (None, Some(event)) => {
                if event.is_empty() {
                    at.add("event", "is empty");
                    return None;
                }
                let data = self.data.clone().unwrap_or_else(|| serde_json::json!({}));
                (event.clone(), data)
            }
            (Some(_), Some(_)) => {
                at.add(
                    "",
                    "gives both `fixture` and `event`: a case is a recorded event or an inline one",
                );
                return None;
            }
            (None, None) => {
                at.add(
                    "",
                    format!(
                        "needs `fixture` (a recorded event: {}) or `event` and `data`",
                        fixture_names()
                    ),
                );
                return None;
            }
        };
        if !data.is_object() {
            at.add(
                "data",
                "must be a mapping: Chatwoot's data is a JSON object",
            );
            return None;
        }
        let text = data.to_string();
        if nesting_exceeds(&text, config.cable.max_nesting) {
            at.add(
                "data",
                format!(
                    "nests deeper than chatwoot.max_nesting ({}): the bridge would refuse this event",
                    config.cable.max_nesting
                ),
            );
            return None;
        }
        let data = JsonText::from_string(text).expect("a serialized JSON value is JSON");
        Some((name, data))
    }

    /// What the case checks, each sink named checked against the config.
    fn expect(&self, config: &Config, at: &mut CaseProblems<'_>) -> Expect {
        let known_sink = |field: String, sink: &str, at: &mut CaseProblems<'_>| {
            let known = config.sinks.contains_key(sink);
            if !known {
                let sinks: Vec<&str> = config.sinks.keys().map(String::as_str).collect();
                at.add(
                    &field,
                    format!("no sink is named `{sink}` (sinks: {})", sinks.join(", ")),
                );
            }
            known
        };
        let reaches = self.reaches.as_ref().map(|list| {
            for (j, sink) in list.iter().enumerate() {
                known_sink(format!("reaches[{j}]"), sink, at);
            }
            list.iter().cloned().collect::<BTreeSet<String>>()
        });
        let mut misses = BTreeSet::new();
        for (j, sink) in self.misses.iter().enumerate() {
            let field = format!("misses[{j}]");
            if known_sink(field.clone(), sink, at)
                && reaches.as_ref().is_some_and(|r| r.contains(sink))
            {
                at.add(&field, format!("`{sink}` is in `reaches` too"));
            }
            misses.insert(sink.clone());
        }
        for sink in self.targets.keys() {
            let field = format!("targets.{sink}");
            if !known_sink(field.clone(), sink, at) {
                continue;
            }
            if config.sinks[sink].kind.target_kind().is_none() {
                at.add(
                    &field,
                    format!("sink `{sink}` writes to a file: it has no topic, subject or URL"),
                );
            }
            must_be_reachable(&field, sink, reaches.as_ref(), &misses, at);
        }
        let mut removed = BTreeMap::new();
        for (sink, paths) in &self.removed {
            let field = format!("removed.{sink}");
            if known_sink(field.clone(), sink, at) {
                must_be_reachable(&field, sink, reaches.as_ref(), &misses, at);
            }
            let mut parsed = Vec::with_capacity(paths.len());
            for (j, path) in paths.iter().enumerate() {
                match JsonPath::parse(path) {
                    Ok(path) => parsed.push(path),
                    Err(message) => at.add(&format!("{field}[{j}]"), message),
                }
            }
            removed.insert(sink.clone(), parsed);
        }
        if reaches.is_none() && misses.is_empty() && self.targets.is_empty() && removed.is_empty() {
            at.add(
                "",
                "checks nothing: give `reaches` (every sink the event goes to; `[]` for none), \
                 `misses`, `targets` or `removed`",
            );
        }
        Expect {
            reaches,
            misses,
            targets: self.targets.clone(),
            removed,
        }
    }
}

/// Reports a check on `sink` (at `field`) that the case's own lists say cannot be reached.
fn must_be_reachable(
    field: &str,
    sink: &str,
    reaches: Option<&BTreeSet<String>>,
    misses: &BTreeSet<String>,
    at: &mut CaseProblems<'_>,
) {
    if misses.contains(sink) {
        at.add(field, format!("`{sink}` is in `misses`"));
    } else if reaches.is_some_and(|r| !r.contains(sink)) {
        at.add(field, format!("`{sink}` is not in `reaches`"));
    }
}

/// The recorded fixture `name` as (event name, data).
fn fixture_event(name: &str, at: &mut CaseProblems<'_>) -> Option<(String, serde_json::Value)> {
    let frame = crate::mock::fixtures::ALL
        .iter()
        .find(|(recorded, _)| *recorded == name)
        .map(|(_, frame)| *frame);
    let Some(frame) = frame else {
        at.add(
            "fixture",
            format!(
                "no recorded event is named `{name}` (fixtures: {})",
                fixture_names()
            ),
        );
        return None;
    };
    let recorded = match protocol::decode(frame) {
        Ok(ServerFrame::Message { event, data, .. }) => serde_json::from_str(data.0.get())
            .ok()
            .map(|data| (event.into_owned(), data)),
        _ => None,
    };
    if recorded.is_none() {
        at.add("fixture", format!("the recording `{name}` is not an event"));
    }
    recorded
}

/// The names of the recorded events, for errors.
fn fixture_names() -> String {
    crate::mock::fixtures::ALL
        .iter()
        .map(|(name, _)| *name)
        .collect::<Vec<_>>()
        .join(", ")
}

/// Applies a JSON merge patch (RFC 7386) to `target`: objects merge key by key, `null`
/// removes a key, anything else replaces. Recurses as deep as the patch nests, which the
/// cases file's shape check bounds (`MAX_CONFIG_NESTING`).
pub(super) fn merge_patch(target: &mut serde_json::Value, patch: &serde_json::Value) {
    let serde_json::Value::Object(patch) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = serde_json::Value::Object(serde_json::Map::new());
    }
    let target = target.as_object_mut().expect("made an object above");
    for (key, value) in patch {
        if value.is_null() {
            target.remove(key);
        } else {
            merge_patch(
                target.entry(key.clone()).or_insert(serde_json::Value::Null),
                value,
            );
        }
    }
}
