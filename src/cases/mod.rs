//! `chatwoot-bridge test`: sample events run through a config's routes, templates and
//! redaction, without connecting anything, each checked against the sinks it must reach.
//!
//! A cases file lists events, each a recorded fixture (with changes to its data) or written
//! inline, and what must happen to it: exactly which sinks it reaches, which it misses, the
//! topic, subject or URL it gets at a sink, and what a sink's redaction removes. [`Cases::run`]
//! evaluates each with the same route table, templates and redaction the daemon builds from the
//! config, and the [`Report`] prints a pass or fail line per case with what differed.
//!
//! ```yaml
//! cases:
//!   - name: resolved conversations reach the CRM
//!     fixture: conversation.status_changed
//!     token: support-agent
//!     data: { status: resolved }
//!     reaches: [crm-webhook, archive, nats-events]
//!     targets: { nats-events: chatwoot.1.conversation.status_changed }
//! ```

mod spec;

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::config::{check_yaml_of, Config, ConfigError, MAX_CONFIG_BYTES};
use crate::event::Event;
use crate::route::jsonpath::{Found, JsonPath};
use crate::types::Problem;

/// Everything that can be wrong with a cases file; each names where.
#[derive(Debug, thiserror::Error)]
pub enum CasesError {
    /// The file could not be read.
    #[error("cannot read cases file {path}: {source}")]
    Read {
        /// The file asked for.
        path: PathBuf,
        /// Why reading it failed.
        source: std::io::Error,
    },
    /// The text is not YAML.
    #[error("cases file is not valid YAML: {0}")]
    Syntax(String),
    /// The file is larger, nests deeper or holds more values than the config may.
    #[error("{at}: {message}")]
    Limit {
        /// Where it went past the limit: a line and column, or the file.
        at: String,
        /// Which limit, and by what.
        message: String,
    },
    /// The file does not describe cases this config can run: every problem, each with the key
    /// path and the case's name.
    #[error("{}", .0.iter().map(|p| p.to_string()).collect::<Vec<_>>().join("\n"))]
    Invalid(Vec<Problem>),
}

/// The cases of one file, checked against one config.
#[derive(Debug)]
pub struct Cases {
    /// In file order.
    cases: Vec<Case>,
}

/// One case: the event and what must happen to it.
#[derive(Debug)]
struct Case {
    /// Its name in the file.
    name: String,
    /// The event as the ingest would route it (id assigned).
    event: Arc<Event>,
    /// What the case checks.
    expect: Expect,
}

/// What one case checks; the sinks named are configured sinks.
#[derive(Debug)]
struct Expect {
    /// Exactly the sinks the event reaches; `None` when the case does not say.
    reaches: Option<BTreeSet<String>>,
    /// Sinks it must not reach.
    misses: BTreeSet<String>,
    /// The topic, subject or URL it must get, by sink.
    targets: BTreeMap<String, String>,
    /// Paths of `data` the sink must not see, by sink.
    removed: BTreeMap<String, Vec<JsonPath>>,
}

impl Cases {
    /// Reads the cases file at `path` (at most [`MAX_CONFIG_BYTES`]) and checks it against
    /// `config`.
    pub fn load(path: &Path, config: &Config) -> Result<Cases, CasesError> {
        let mut text = String::new();
        // One byte past the limit is enough to know it is past.
        std::fs::File::open(path)
            .and_then(|file| file.take(MAX_CONFIG_BYTES + 1).read_to_string(&mut text))
            .map_err(|source| CasesError::Read {
                path: path.to_owned(),
                source,
            })?;
        Cases::from_yaml(&text, config)
    }

    /// Parses cases text and checks it against `config`.
    pub fn from_yaml(text: &str, config: &Config) -> Result<Cases, CasesError> {
        check_yaml_of(
            text,
            "cases file",
            "a case needs 4 levels, and its data its own",
        )
        .map_err(|e| match e {
            ConfigError::Limit { at, message } => CasesError::Limit { at, message },
            other => CasesError::Syntax(other.to_string()),
        })?;
        let tree: serde_json::Value = ::config::Config::builder()
            .add_source(::config::File::from_str(text, ::config::FileFormat::Yaml))
            .build()
            .and_then(|c| c.try_deserialize())
            .map_err(|e| CasesError::Syntax(e.to_string()))?;
        let file: spec::CasesFile = serde_path_to_error::deserialize(&tree).map_err(|e| {
            let key = e.path().to_string();
            CasesError::Invalid(vec![Problem {
                key: with_case_name(&tree, key),
                message: e.into_inner().to_string(),
            }])
        })?;
        spec::check(file, config)
            .map(|cases| Cases { cases })
            .map_err(CasesError::Invalid)
    }

    /// How many cases there are.
    pub fn len(&self) -> usize {
        self.cases.len()
    }

    /// Whether there are none (a checked file always has one at least).
    pub fn is_empty(&self) -> bool {
        self.cases.is_empty()
    }

    /// Runs every case through `config`'s routes, templates and redaction.
    pub fn run(&self, config: &Config) -> Report {
        Report {
            outcomes: self.cases.iter().map(|case| case.run(config)).collect(),
        }
    }
}

/// A schema error's key path (`cases[2].reaches`), with the name of the case it is in when
/// the file gives one.
fn with_case_name(tree: &serde_json::Value, key: String) -> String {
    let index = key
        .strip_prefix("cases[")
        .and_then(|rest| rest.split(']').next())
        .and_then(|i| i.parse::<usize>().ok());
    let name = index.and_then(|i| tree.get("cases")?.get(i)?.get("name")?.as_str());
    match name {
        Some(name) => format!("{key} (case `{name}`)"),
        None if key == "." => "(top level)".into(),
        None => key,
    }
}

/// What happened to each case.
#[derive(Debug)]
pub struct Report {
    /// One per case, in file order.
    pub outcomes: Vec<CaseOutcome>,
}

/// What happened to one case.
#[derive(Debug)]
pub struct CaseOutcome {
    /// The case's name.
    pub name: String,
    /// What it expected to reach, when it said (for the diff).
    pub expected: Option<Vec<String>>,
    /// The sinks the event reached, by name, sorted.
    pub reached: Vec<String>,
    /// What differed from the case; empty when it passed.
    pub failures: Vec<Failure>,
}

/// One way a case failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Failure {
    /// The sinks reached are not the ones in `reaches`.
    Sinks {
        /// Expected, not reached.
        missing: Vec<String>,
        /// Reached, not expected.
        unexpected: Vec<String>,
    },
    /// It reached a sink in `misses`.
    Reached {
        /// The sink.
        sink: String,
    },
    /// The topic, subject or URL at a sink is not the one in `targets`.
    Target {
        /// The sink.
        sink: String,
        /// `topic`, `subject` or `URL`.
        what: &'static str,
        /// As written in the case.
        expected: String,
        /// What the sink renders, or why it cannot.
        actual: Target,
    },
    /// The event reaches a sink that cannot render its topic, subject or URL for it: it would
    /// go to that sink's dead letters.
    Undeliverable {
        /// The sink.
        sink: String,
        /// Why, as the sink would say it.
        why: String,
    },
    /// A sink sees a path of `data` that the case says is removed.
    NotRemoved {
        /// The sink.
        sink: String,
        /// The path, as written.
        path: String,
    },
    /// A `removed` check on a sink the event does not reach.
    RemovedButNotReached {
        /// The sink.
        sink: String,
    },
}

/// A sink's topic, subject or URL for an event, as the sink would render it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// The event does not reach the sink.
    NotReached,
    /// The template cannot be rendered for the event, and why.
    Failed(String),
    /// What it renders.
    Rendered(String),
}

impl Case {
    /// Routes the event and checks what the case expects.
    fn run(&self, config: &Config) -> CaseOutcome {
        let table = &config.routes;
        let routed = table.route(&self.event);
        let mut reached: Vec<String> = routed
            .sinks
            .iter()
            .map(|i| table.sink_names()[i].clone())
            .collect();
        reached.sort();
        let mut failures = Vec::new();
        let expect = &self.expect;
        if let Some(reaches) = &expect.reaches {
            let missing: Vec<String> = reaches
                .iter()
                .filter(|s| !reached.contains(s))
                .cloned()
                .collect();
            let unexpected: Vec<String> = reached
                .iter()
                .filter(|s| !reaches.contains(*s))
                .cloned()
                .collect();
            if !missing.is_empty() || !unexpected.is_empty() {
                failures.push(Failure::Sinks {
                    missing,
                    unexpected,
                });
            }
        }
        for sink in reached.iter().filter(|s| expect.misses.contains(*s)) {
            failures.push(Failure::Reached { sink: sink.clone() });
        }
        for sink in &reached {
            self.check_sink(config, sink, &mut failures);
        }
        for (sink, expected) in &expect.targets {
            if !reached.contains(sink) {
                failures.push(Failure::Target {
                    sink: sink.clone(),
                    what: target_kind(config, sink),
                    expected: expected.clone(),
                    actual: Target::NotReached,
                });
            }
        }
        for sink in expect.removed.keys().filter(|s| !reached.contains(s)) {
            failures.push(Failure::RemovedButNotReached { sink: sink.clone() });
        }
        CaseOutcome {
            name: self.name.clone(),
            expected: expect.reaches.as_ref().map(|r| r.iter().cloned().collect()),
            reached,
            failures,
        }
    }

    /// Checks what `sink`, which the event reaches, makes of it: its target, and what its
    /// redaction removes.
    fn check_sink(&self, config: &Config, sink: &str, failures: &mut Vec<Failure>) {
        // Routes name only configured sinks (the config checks it).
        let Some(settings) = config.sinks.get(sink) else {
            return;
        };
        let seen = settings.redaction.redacted(sink, self.event.clone());
        let rendered = settings.kind.target(&seen);
        match (self.expect.targets.get(sink), rendered) {
            (Some(expected), Some(actual)) => {
                let actual = match actual {
                    Ok(text) if text == *expected => None,
                    Ok(text) => Some(Target::Rendered(text)),
                    Err(why) => Some(Target::Failed(why)),
                };
                if let Some(actual) = actual {
                    failures.push(Failure::Target {
                        sink: sink.to_owned(),
                        what: target_kind(config, sink),
                        expected: expected.clone(),
                        actual,
                    });
                }
            }
            (None, Some(Err(why))) => failures.push(Failure::Undeliverable {
                sink: sink.to_owned(),
                why,
            }),
            _ => {}
        }
        for path in self.expect.removed.get(sink).into_iter().flatten() {
            if !matches!(path.lookup(seen.data.get()), None | Some(Found::Null)) {
                failures.push(Failure::NotRemoved {
                    sink: sink.to_owned(),
                    path: path.to_string(),
                });
            }
        }
    }
}

/// `topic`, `subject` or `URL` for `sink` (checked at load to have one).
fn target_kind(config: &Config, sink: &str) -> &'static str {
    config
        .sinks
        .get(sink)
        .and_then(|s| s.kind.target_kind())
        .unwrap_or("target")
}

impl Report {
    /// Whether every case passed.
    pub fn passed(&self) -> bool {
        self.outcomes.iter().all(|o| o.failures.is_empty())
    }

    /// How many cases failed.
    pub fn failed(&self) -> usize {
        self.outcomes
            .iter()
            .filter(|o| !o.failures.is_empty())
            .count()
    }
}

/// The sinks of a list, or `(none)`.
fn list(sinks: &[String]) -> String {
    if sinks.is_empty() {
        "(none)".into()
    } else {
        sinks.join(", ")
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for outcome in &self.outcomes {
            write!(f, "{outcome}")?;
        }
        let failed = self.failed();
        writeln!(
            f,
            "{} cases: {} passed, {failed} failed",
            self.outcomes.len(),
            self.outcomes.len() - failed
        )
    }
}

impl fmt::Display for CaseOutcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.failures.is_empty() {
            return writeln!(f, "ok    {}", self.name);
        }
        writeln!(f, "FAIL  {}", self.name)?;
        for failure in &self.failures {
            match failure {
                Failure::Sinks {
                    missing,
                    unexpected,
                } => {
                    let expected = self.expected.as_deref().unwrap_or_default();
                    writeln!(f, "      sinks expected: {}", list(expected))?;
                    writeln!(f, "      sinks reached:  {}", list(&self.reached))?;
                    for sink in missing {
                        writeln!(f, "        - {sink}  (expected, not reached)")?;
                    }
                    for sink in unexpected {
                        writeln!(f, "        + {sink}  (reached, not expected)")?;
                    }
                }
                other => writeln!(f, "      {}", FailureLine(other, &self.reached))?,
            }
        }
        Ok(())
    }
}

/// A failure other than the sinks' diff, on one line; with the sinks reached for context.
struct FailureLine<'a>(&'a Failure, &'a [String]);

impl fmt::Display for FailureLine<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let FailureLine(failure, reached) = self;
        match failure {
            Failure::Sinks { .. } => Ok(()),
            Failure::Reached { sink } => write!(
                f,
                "reached {sink}, which it must miss (sinks reached: {})",
                list(reached)
            ),
            Failure::Target {
                sink,
                what,
                expected,
                actual,
            } => match actual {
                Target::NotReached => write!(
                    f,
                    "{sink} {what}: expected {expected}, but the event does not reach {sink} \
                     (sinks reached: {})",
                    list(reached)
                ),
                Target::Failed(why) => {
                    write!(f, "{sink} {what}: expected {expected}, but {why}")
                }
                Target::Rendered(actual) => {
                    let pad = " ".repeat(sink.len() + what.len() + 3);
                    write!(
                        f,
                        "{sink} {what}: expected {expected}\n      {pad}rendered {actual}"
                    )
                }
            },
            Failure::Undeliverable { sink, why } => write!(
                f,
                "{sink} cannot send it: {why} (it would go to {sink}'s dead letters)"
            ),
            Failure::NotRemoved { sink, path } => {
                write!(f, "{sink} sees {path}, which must be removed for it")
            }
            Failure::RemovedButNotReached { sink } => write!(
                f,
                "removed: the event does not reach {sink} (sinks reached: {})",
                list(reached)
            ),
        }
    }
}

#[cfg(test)]
mod tests;
