//! The route table: which sinks each event goes to.
//!
//! Routes are compiled once at load into sink indices, so matching an event is a few string
//! comparisons and no allocation. Routes are tried in file order; the first that matches wins
//! unless it says `continue: true`.

use std::collections::BTreeSet;

use serde::Deserialize;

use crate::config::Problem;
use crate::event::Event;

/// What a route matches, as written. Every present condition must hold; a list means any-of.
/// `match: {}` matches every event.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MatchSpec {
    /// Event names, exact or with `*` wildcards (`conversation.*`).
    #[serde(default)]
    pub event: Vec<String>,
    /// Token names.
    #[serde(default)]
    pub token: Vec<String>,
}

/// A route compiled against the sink list.
#[derive(Debug, Clone)]
struct Route {
    /// Shown in logs and metrics.
    name: String,
    /// Empty means any event name.
    events: Vec<Glob>,
    /// Empty means any token.
    tokens: Vec<String>,
    /// Indices into [`RouteTable::sinks`].
    to: Vec<usize>,
    /// Whether later routes are tried after this one matched.
    continue_matching: bool,
}

/// All routes, compiled. Sinks are referred to by index into `sinks`.
#[derive(Debug, Clone, Default)]
pub struct RouteTable {
    routes: Vec<Route>,
    /// Names of the sinks that routes send to, in index order.
    sinks: Vec<String>,
}

/// The set of sinks one event goes to, as indices into [`RouteTable::sink_names`].
pub type SinkSet = Vec<usize>;

impl RouteTable {
    /// Compiles routes given as `(name, match, to, continue)`; `tokens` are the known token names.
    pub fn compile(
        routes: Vec<(String, MatchSpec, Vec<String>, bool)>,
        tokens: &BTreeSet<String>,
    ) -> Result<RouteTable, Vec<Problem>> {
        let mut problems = Vec::new();
        let mut sinks: Vec<String> = Vec::new();
        let mut compiled = Vec::with_capacity(routes.len());
        for (i, (name, spec, to, continue_matching)) in routes.into_iter().enumerate() {
            for (j, token) in spec.token.iter().enumerate() {
                if !tokens.contains(token) {
                    problems.push(Problem {
                        key: format!("routes[{i}].match.token[{j}]"),
                        message: format!("no token is named `{token}`"),
                    });
                }
            }
            let mut events = Vec::with_capacity(spec.event.len());
            for (j, pattern) in spec.event.iter().enumerate() {
                if pattern.is_empty() {
                    problems.push(Problem {
                        key: format!("routes[{i}].match.event[{j}]"),
                        message: "is empty".into(),
                    });
                }
                events.push(Glob::new(pattern));
            }
            let to = to
                .into_iter()
                .map(|sink| match sinks.iter().position(|s| *s == sink) {
                    Some(index) => index,
                    None => {
                        sinks.push(sink);
                        sinks.len() - 1
                    }
                })
                .collect();
            compiled.push(Route {
                name,
                events,
                tokens: spec.token,
                to,
                continue_matching,
            });
        }
        if problems.is_empty() {
            Ok(RouteTable {
                routes: compiled,
                sinks,
            })
        } else {
            Err(problems)
        }
    }

    /// Names of the sinks routes refer to; a [`SinkSet`] holds indices into this.
    pub fn sink_names(&self) -> &[String] {
        &self.sinks
    }

    /// The sinks `event` goes to, deduplicated, in route order. Empty when no route matched.
    pub fn route(&self, event: &Event) -> SinkSet {
        let mut out = SinkSet::new();
        for route in &self.routes {
            if route.matches(event) {
                for &sink in &route.to {
                    if !out.contains(&sink) {
                        out.push(sink);
                    }
                }
                if !route.continue_matching {
                    break;
                }
            }
        }
        out
    }

    /// Names of the routes, for logs.
    pub fn route_names(&self) -> impl Iterator<Item = &str> {
        self.routes.iter().map(|r| r.name.as_str())
    }
}

impl Route {
    fn matches(&self, event: &Event) -> bool {
        (self.events.is_empty() || self.events.iter().any(|g| g.matches(&event.name)))
            && (self.tokens.is_empty() || self.tokens.iter().any(|t| **t == *event.token))
    }
}

/// A name pattern where `*` stands for any run of characters.
#[derive(Debug, Clone, PartialEq)]
struct Glob {
    /// The pattern split at `*`; one part means no wildcard.
    parts: Vec<String>,
}

impl Glob {
    fn new(pattern: &str) -> Glob {
        Glob {
            parts: pattern.split('*').map(str::to_owned).collect(),
        }
    }

    fn matches(&self, text: &str) -> bool {
        let (first, rest) = self
            .parts
            .split_first()
            .expect("split yields one part at least");
        if rest.is_empty() {
            return text == first;
        }
        let Some(mut remaining) = text.strip_prefix(first.as_str()) else {
            return false;
        };
        let (last, middle) = rest.split_last().expect("rest is not empty");
        for part in middle {
            match remaining.find(part.as_str()) {
                Some(at) => remaining = &remaining[at + part.len()..],
                None => return false,
            }
        }
        remaining.len() >= last.len() && remaining.ends_with(last.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs() {
        let g = Glob::new("conversation.*");
        assert!(g.matches("conversation.created"));
        assert!(g.matches("conversation."));
        assert!(!g.matches("message.created"));
        assert!(Glob::new("*").matches("anything"));
        assert!(Glob::new("message.created").matches("message.created"));
        assert!(!Glob::new("message.created").matches("message.created2"));
        assert!(Glob::new("*.created").matches("message.created"));
        assert!(Glob::new("a*b*c").matches("axxbyyc"));
        assert!(!Glob::new("a*b*c").matches("axxcyyb"));
        assert!(!Glob::new("ab*ba").matches("aba"));
    }

    fn table(routes: Vec<(&str, MatchSpec, Vec<&str>, bool)>) -> RouteTable {
        let tokens = ["agent".to_string(), "visitor".to_string()].into();
        RouteTable::compile(
            routes
                .into_iter()
                .map(|(n, m, to, c)| (n.into(), m, to.into_iter().map(Into::into).collect(), c))
                .collect(),
            &tokens,
        )
        .unwrap()
    }

    #[test]
    fn first_match_wins_unless_continue() {
        let messages = MatchSpec {
            event: vec!["message.*".into()],
            token: vec![],
        };
        let t = table(vec![
            ("messages", messages.clone(), vec!["kafka"], false),
            ("rest", MatchSpec::default(), vec!["archive"], false),
        ]);
        let msg = Event::for_test("message.created", "agent", r#"{"account_id":1}"#);
        let conv = Event::for_test("conversation.created", "agent", r#"{"account_id":1}"#);
        assert_eq!(t.route(&msg), vec![0]);
        assert_eq!(t.route(&conv), vec![1]);

        let t = table(vec![
            ("messages", messages, vec!["kafka", "archive"], true),
            ("rest", MatchSpec::default(), vec!["archive"], false),
        ]);
        assert_eq!(t.route(&msg), vec![0, 1]);
        assert_eq!(t.sink_names(), ["kafka", "archive"]);
    }

    #[test]
    fn token_condition_and_unknown_token() {
        let only_visitor = MatchSpec {
            event: vec![],
            token: vec!["visitor".into()],
        };
        let t = table(vec![("v", only_visitor.clone(), vec!["a"], false)]);
        assert!(t.route(&Event::for_test("x", "agent", "{}")).is_empty());
        assert_eq!(t.route(&Event::for_test("x", "visitor", "{}")), vec![0]);

        let bad = MatchSpec {
            event: vec![],
            token: vec!["nobody".into()],
        };
        let err = RouteTable::compile(
            vec![("r".into(), bad, vec!["a".into()], false)],
            &BTreeSet::new(),
        )
        .unwrap_err();
        assert_eq!(err[0].key, "routes[0].match.token[0]");
    }
}
