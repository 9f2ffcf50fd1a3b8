//! The route table: which sinks each event goes to.
//!
//! Routes are compiled once at load into sink indices, so matching an event is a few string
//! comparisons and no allocation. Routes are tried in file order; the first that matches wins
//! unless it says `continue: true`.

pub(crate) mod jsonpath;
pub mod redact;
pub(crate) mod template;

use std::collections::BTreeSet;

use schemars::JsonSchema;
use serde::Deserialize;

use regex::Regex;

use crate::event::Event;
use crate::route::jsonpath::{Found, JsonPath};
use crate::types::{OneOrMany, Problem};

/// What a route matches, as written. Every present condition must hold; a list means any-of.
/// `match: {}` matches every event.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct MatchSpec {
    /// Event names, exact or with `*` wildcards (`conversation.*`).
    #[serde(default)]
    pub event: OneOrMany<String>,
    /// Token names.
    #[serde(default)]
    pub token: OneOrMany<String>,
    /// `data.account_id` values.
    #[serde(default)]
    pub account_id: OneOrMany<u64>,
    /// Inbox ids (`data.inbox_id`, or `data.conversation.inbox_id` for typing events).
    #[serde(default)]
    pub inbox_id: OneOrMany<u64>,
    /// Conditions on Chatwoot's data, by dotted path; all must hold.
    #[serde(default, rename = "where")]
    pub conditions: Vec<ConditionSpec>,
    /// Matches when this nested match does not.
    #[serde(default)]
    pub not: Option<Box<MatchSpec>>,
}

/// One `where` entry: a path and exactly one test.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ConditionSpec {
    /// Dotted path into `data`, such as `conversation.meta.sender.id`.
    pub path: String,
    /// The value equals one of these.
    #[serde(rename = "in", default)]
    pub one_of: Option<Vec<serde_json::Value>>,
    /// The value equals this.
    #[serde(default)]
    pub equals: Option<serde_json::Value>,
    /// The value is a string matching this regular expression.
    #[serde(default)]
    pub matches: Option<String>,
    /// `true`: the value is present and not null; `false`: absent or null.
    #[serde(default)]
    pub exists: Option<bool>,
}

/// A compiled `match`.
#[derive(Debug, Clone)]
struct Matcher {
    /// Empty means any event name.
    events: Vec<Glob>,
    /// Empty means any token.
    tokens: Vec<String>,
    /// Empty means any account.
    account_ids: Vec<u64>,
    /// Empty means any inbox.
    inbox_ids: Vec<u64>,
    conditions: Vec<Condition>,
    not: Option<Box<Matcher>>,
}

#[derive(Debug, Clone)]
struct Condition {
    path: JsonPath,
    test: Test,
}

#[derive(Debug, Clone)]
enum Test {
    OneOf(Vec<serde_json::Value>),
    Matches(Regex),
    Exists(bool),
}

/// A route compiled against the sink list.
#[derive(Debug, Clone)]
struct Route {
    /// Shown in logs and metrics.
    name: String,
    matcher: Matcher,
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
    /// Where events that match no route go; `None` drops them (they are counted).
    unmatched: Option<usize>,
}

/// The set of sinks one event goes to: bit `i` is [`RouteTable::sink_names`]`[i]`. A bitset
/// so routing an event allocates nothing.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SinkSet(u64);

/// Most sinks the routes can name (one bit each; the spool has the same limit).
pub const MAX_ROUTED_SINKS: usize = 64;

impl SinkSet {
    fn insert(&mut self, index: usize) {
        self.0 |= 1 << index;
    }

    /// Whether no sink is in the set.
    pub fn is_empty(self) -> bool {
        self.0 == 0
    }

    /// The sink indices, ascending.
    pub fn iter(self) -> impl Iterator<Item = usize> {
        (0..MAX_ROUTED_SINKS).filter(move |i| self.0 & (1 << i) != 0)
    }
}

/// Where one event goes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Routed {
    /// The sinks the event goes to.
    pub sinks: SinkSet,
    /// Whether a route matched (if not, `sinks` is the `unmatched` sink or nothing).
    pub matched: bool,
}

/// A route as written, before compiling.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RouteSpec {
    /// Shown in logs; unique.
    pub name: String,
    /// Which events; `{}` (or leaving it out) matches all.
    #[serde(rename = "match", default)]
    pub matches: MatchSpec,
    /// Sink names; `[]` drops what the route matches (not counted as unmatched).
    pub to: Vec<String>,
    /// Also try the routes after this one when it matched.
    #[serde(rename = "continue", default)]
    pub continue_matching: bool,
}

impl RouteTable {
    /// Compiles routes; `tokens` are the known token names, `unmatched` the sink for events no
    /// route matches (`None`: drop them).
    pub fn compile(
        routes: Vec<RouteSpec>,
        tokens: &BTreeSet<String>,
        unmatched: Option<String>,
    ) -> Result<RouteTable, Vec<Problem>> {
        let mut problems = Vec::new();
        let mut sinks: Vec<String> = Vec::new();
        let mut sink_index = |sink: String| match sinks.iter().position(|s| *s == sink) {
            Some(index) => index,
            None => {
                sinks.push(sink);
                sinks.len() - 1
            }
        };
        let mut compiled = Vec::with_capacity(routes.len());
        for (i, spec) in routes.into_iter().enumerate() {
            let key = format!("routes[{i}].match");
            let matcher = compile_match(spec.matches, &key, tokens, &mut problems);
            let to = spec.to.into_iter().map(&mut sink_index).collect();
            compiled.push(Route {
                name: spec.name,
                matcher,
                to,
                continue_matching: spec.continue_matching,
            });
        }
        let unmatched = unmatched.map(&mut sink_index);
        if sinks.len() > MAX_ROUTED_SINKS {
            problems.push(Problem {
                key: "routes".into(),
                message: format!(
                    "routes name {} sinks; at most {MAX_ROUTED_SINKS} are supported",
                    sinks.len()
                ),
            });
        }
        if problems.is_empty() {
            Ok(RouteTable {
                routes: compiled,
                sinks,
                unmatched,
            })
        } else {
            Err(problems)
        }
    }

    /// Names of the sinks routes refer to; a [`SinkSet`] holds indices into this.
    pub fn sink_names(&self) -> &[String] {
        &self.sinks
    }

    /// Where `event` goes. No sinks means it is dropped.
    pub fn route(&self, event: &Event) -> Routed {
        let mut routed = Routed::default();
        for route in &self.routes {
            if route.matcher.matches(event) {
                routed.matched = true;
                for &sink in &route.to {
                    routed.sinks.insert(sink);
                }
                if !route.continue_matching {
                    break;
                }
            }
        }
        if !routed.matched {
            if let Some(sink) = self.unmatched {
                routed.sinks.insert(sink);
            }
        }
        routed
    }

    /// Names of the routes, for logs.
    pub fn route_names(&self) -> impl Iterator<Item = &str> {
        self.routes.iter().map(|r| r.name.as_str())
    }

    /// Names of the routes that match `event`, as [`RouteTable::route`] tries them (up to the
    /// first match without `continue`). Routing itself names no route; the admin endpoint's taps
    /// ask this, on their side.
    pub(crate) fn matching_route_names(&self, event: &Event) -> Vec<&str> {
        let mut names = Vec::new();
        for route in &self.routes {
            if route.matcher.matches(event) {
                names.push(route.name.as_str());
                if !route.continue_matching {
                    break;
                }
            }
        }
        names
    }
}

fn compile_match(
    spec: MatchSpec,
    key: &str,
    tokens: &BTreeSet<String>,
    problems: &mut Vec<Problem>,
) -> Matcher {
    let mut problem = |key: String, message: String| problems.push(Problem { key, message });
    let token_list = spec.token.into_vec();
    for (j, token) in token_list.iter().enumerate() {
        if !tokens.contains(token) {
            problem(
                format!("{key}.token[{j}]"),
                format!("no token is named `{token}`"),
            );
        }
    }
    let event_list = spec.event.into_vec();
    for (j, pattern) in event_list.iter().enumerate() {
        if pattern.is_empty() {
            problem(format!("{key}.event[{j}]"), "is empty".into());
        }
    }
    let mut conditions = Vec::with_capacity(spec.conditions.len());
    for (j, c) in spec.conditions.into_iter().enumerate() {
        let ckey = format!("{key}.where[{j}]");
        let path = match JsonPath::parse(&c.path) {
            Ok(path) => path,
            Err(message) => {
                problem(format!("{ckey}.path"), message);
                continue;
            }
        };
        let tests = [
            c.one_of.is_some(),
            c.equals.is_some(),
            c.matches.is_some(),
            c.exists.is_some(),
        ];
        if tests.iter().filter(|t| **t).count() != 1 {
            problem(
                ckey,
                "needs exactly one of `in`, `equals`, `matches`, `exists`".into(),
            );
            continue;
        }
        let test = if let Some(values) = c.one_of {
            Test::OneOf(values)
        } else if let Some(value) = c.equals {
            Test::OneOf(vec![value])
        } else if let Some(pattern) = c.matches {
            match Regex::new(&pattern) {
                Ok(regex) => Test::Matches(regex),
                Err(e) => {
                    problem(
                        format!("{ckey}.matches"),
                        format!("not a valid regular expression: {e}"),
                    );
                    continue;
                }
            }
        } else {
            Test::Exists(c.exists.expect("one test is set"))
        };
        conditions.push(Condition { path, test });
    }
    let not = spec.not.map(|nested| {
        Box::new(compile_match(
            *nested,
            &format!("{key}.not"),
            tokens,
            problems,
        ))
    });
    Matcher {
        events: event_list.iter().map(|p| Glob::new(p)).collect(),
        tokens: token_list,
        account_ids: spec.account_id.into_vec(),
        inbox_ids: spec.inbox_id.into_vec(),
        conditions,
        not,
    }
}

impl Matcher {
    fn matches(&self, event: &Event) -> bool {
        fn any_of<T: PartialEq>(list: &[T], value: Option<T>) -> bool {
            list.is_empty() || value.is_some_and(|v| list.contains(&v))
        }
        (self.events.is_empty() || self.events.iter().any(|g| g.matches(&event.name)))
            && (self.tokens.is_empty() || self.tokens.iter().any(|t| **t == *event.token))
            && any_of(&self.account_ids, event.keys.account_id)
            && any_of(&self.inbox_ids, event.keys.inbox_id)
            && self.conditions.iter().all(|c| c.holds(event.data.get()))
            && !self.not.as_ref().is_some_and(|not| not.matches(event))
    }
}

impl Condition {
    fn holds(&self, data: &str) -> bool {
        let found = self.path.lookup(data);
        match &self.test {
            Test::Exists(wanted) => {
                let present = !matches!(found, None | Some(Found::Null));
                present == *wanted
            }
            Test::OneOf(values) => found.is_some_and(|f| values.iter().any(|v| f.equals(v))),
            Test::Matches(regex) => matches!(found, Some(Found::Str(s)) if regex.is_match(&s)),
        }
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
    use std::sync::Arc;
    use std::time::SystemTime;

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

    /// Every fixture as an event on the given token.
    fn fixture(name: &str, token: &str) -> Event {
        let (_, frame) = crate::mock::fixtures::ALL
            .iter()
            .find(|(n, _)| *n == name)
            .expect("fixture exists");
        let (event, data) = crate::mock::fixtures::message(frame);
        Event::new(
            &event,
            data,
            Arc::from(token),
            Arc::from("ws://x/cable"),
            SystemTime::UNIX_EPOCH,
        )
    }

    fn table_from_yaml(routes_yaml: &str) -> RouteTable {
        let routes: Vec<RouteSpec> = serde_json::from_value(yaml_to_json(routes_yaml)).unwrap();
        let tokens = ["agent".to_string(), "visitor".to_string()].into();
        RouteTable::compile(routes, &tokens, None).unwrap()
    }

    fn yaml_to_json(yaml: &str) -> serde_json::Value {
        config::Config::builder()
            .add_source(config::File::from_str(
                &format!("r: {yaml}"),
                config::FileFormat::Yaml,
            ))
            .build()
            .unwrap()
            .get::<serde_json::Value>("r")
            .unwrap()
    }

    /// (route table, [(fixture, token, expected sink names)])
    #[test]
    fn table_driven_over_the_fixtures() {
        let table = table_from_yaml(
            r#"
  - name: customer-messages
    match:
      event: ["message.created", "message.updated"]
      token: [agent]
      account_id: [1, 2]
      inbox_id: 2
      where:
        - { path: message_type, in: [0, "incoming"] }
        - { path: private, equals: false }
        - { path: content, matches: "(?i)CHARGED" }
    to: [kafka, crm]
    continue: true
  - name: assigned-conversations
    match:
      event: "conversation.*"
      where:
        - { path: meta.assignee, exists: true }
    to: [crm]
  - name: resolved
    match: { event: conversation.status_changed, where: [{ path: status, equals: resolved }] }
    to: [crm]
  - name: not-presence
    match: { not: { event: presence.update } }
    to: [archive]
"#,
        );
        let names = |e: &Event| -> Vec<String> {
            table
                .route(e)
                .sinks
                .iter()
                .map(|i| table.sink_names()[i].clone())
                .collect()
        };
        let cases: &[(&str, &str, &[&str])] = &[
            // incoming, public, "charged twice": both customer routes, then archive
            ("message.created", "agent", &["kafka", "crm", "archive"]),
            // the same event on another token fails `token`
            ("message.created", "visitor", &["archive"]),
            // message.updated fixture is outgoing (message_type 1)
            ("message.updated", "agent", &["archive"]),
            ("presence.update", "agent", &[]),
            ("contact.updated", "agent", &["archive"]),
        ];
        for (fixture_name, token, expected) in cases {
            assert_eq!(
                names(&fixture(fixture_name, token)),
                *expected,
                "{fixture_name} on {token}"
            );
        }
        // Conversation fixtures: assignee present or not decides the second route.
        for name in [
            "conversation.created",
            "conversation.updated",
            "conversation.status_changed",
            "assignee.changed",
        ] {
            let event = fixture(name, "agent");
            let assigned = !matches!(
                JsonPath::parse("meta.assignee")
                    .unwrap()
                    .lookup(event.data.get()),
                None | Some(Found::Null)
            );
            let status = JsonPath::parse("status").unwrap().lookup(event.data.get());
            let got = names(&event);
            let conversation_event = name.starts_with("conversation.");
            let expected_crm = (conversation_event && assigned)
                || (name == "conversation.status_changed"
                    && status == Some(Found::Str("resolved".into())));
            assert_eq!(
                got.contains(&"crm".to_string()),
                expected_crm,
                "{name}: {got:?}"
            );
            // First match wins: a conversation for the CRM does not also reach the archive.
            assert_eq!(
                got.contains(&"archive".to_string()),
                !expected_crm,
                "{name}: {got:?}"
            );
        }
    }

    #[test]
    fn first_match_wins_unless_continue_and_unmatched_sink() {
        let table = table_from_yaml(
            r#"
  - { name: messages, match: { event: "message.*" }, to: [kafka] }
  - { name: rest, match: {}, to: [archive] }
"#,
        );
        let msg = Event::for_test("message.created", "agent", r#"{"account_id":1}"#);
        let conv = Event::for_test("conversation.created", "agent", r#"{"account_id":1}"#);
        let sinks = |e: &Event| table.route(e).sinks.iter().collect::<Vec<_>>();
        assert_eq!(sinks(&msg), vec![0]);
        assert_eq!(sinks(&conv), vec![1]);

        let tokens = BTreeSet::new();
        let only_messages = vec![RouteSpec {
            name: "m".into(),
            matches: MatchSpec {
                event: OneOrMany::One("message.*".into()),
                ..MatchSpec::default()
            },
            to: vec!["kafka".into()],
            continue_matching: false,
        }];
        let table = RouteTable::compile(only_messages, &tokens, Some("leftovers".into())).unwrap();
        let sinks = |e: &Event| table.route(e).sinks.iter().collect::<Vec<_>>();
        assert_eq!(sinks(&msg), vec![0]);
        assert_eq!(sinks(&conv), vec![1]);
        assert_eq!(table.sink_names(), ["kafka", "leftovers"]);
        assert!(table.route(&msg).matched);
        assert!(!table.route(&conv).matched);
    }

    #[test]
    fn an_empty_to_drops_what_it_matches_before_later_routes_and_the_unmatched_sink() {
        let routes = r#"
  - { name: drop-presence, match: { event: presence.update }, to: [] }
  - { name: rest, match: {}, to: [archive] }
"#;
        let routes: Vec<RouteSpec> = serde_json::from_value(yaml_to_json(routes)).unwrap();
        let tokens = ["agent".to_string()].into();
        let table = RouteTable::compile(routes, &tokens, Some("leftovers".into())).unwrap();
        let presence = Event::for_test("presence.update", "agent", r#"{"account_id":1}"#);
        let message = Event::for_test("message.created", "agent", r#"{"account_id":1}"#);
        let dropped = table.route(&presence);
        assert!(dropped.sinks.is_empty(), "{dropped:?}");
        assert!(
            dropped.matched,
            "a dropped event is not counted as unmatched"
        );
        assert_eq!(table.matching_route_names(&presence), ["drop-presence"]);
        assert_eq!(table.route(&message).sinks.iter().collect::<Vec<_>>(), [0]);
    }

    #[test]
    fn config_mistakes_name_their_path() {
        let tokens: BTreeSet<String> = ["agent".to_string()].into();
        let bad = MatchSpec {
            token: OneOrMany::Many(vec!["agent".into(), "nobody".into()]),
            conditions: vec![
                ConditionSpec {
                    path: "content".into(),
                    matches: Some("(unclosed".into()),
                    ..ConditionSpec::default()
                },
                ConditionSpec {
                    path: "a..b".into(),
                    exists: Some(true),
                    ..ConditionSpec::default()
                },
                ConditionSpec {
                    path: "x".into(),
                    exists: Some(true),
                    equals: Some(serde_json::json!(1)),
                    ..ConditionSpec::default()
                },
            ],
            not: Some(Box::new(MatchSpec {
                token: OneOrMany::One("ghost".into()),
                ..MatchSpec::default()
            })),
            ..MatchSpec::default()
        };
        let ok = RouteSpec {
            name: "ok".into(),
            matches: MatchSpec::default(),
            to: vec!["a".into()],
            continue_matching: false,
        };
        let routes = vec![
            ok,
            RouteSpec {
                name: "bad".into(),
                matches: bad,
                to: vec!["a".into()],
                continue_matching: false,
            },
        ];
        let problems = RouteTable::compile(routes, &tokens, None).unwrap_err();
        let keys: Vec<&str> = problems.iter().map(|p| p.key.as_str()).collect();
        assert_eq!(
            keys,
            [
                "routes[1].match.token[1]",
                "routes[1].match.where[0].matches",
                "routes[1].match.where[1].path",
                "routes[1].match.where[2]",
                "routes[1].match.not.token[0]",
            ]
        );
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(256))]
        /// Matching never panics, whatever the data looks like.
        #[test]
        fn matching_never_panics(data in arbitrary_json(), name in "[a-z.]{0,20}") {
            let table = table_from_yaml(
                r#"
  - name: all-kinds
    match:
      event: ["message.*", "*"]
      account_id: [1]
      where:
        - { path: a.b, in: [1, "x", null, true] }
        - { path: a.0.c, matches: "^x" }
        - { path: z, exists: false }
      not: { inbox_id: 3 }
    to: [s]
"#,
            );
            let event = Event::for_test(&name, "agent", &data);
            let _ = table.route(&event);
        }
    }

    fn arbitrary_json() -> impl proptest::strategy::Strategy<Value = String> {
        use proptest::prelude::*;
        let leaf = prop_oneof![
            Just(serde_json::Value::Null),
            any::<bool>().prop_map(serde_json::Value::Bool),
            any::<i64>().prop_map(|n| serde_json::json!(n)),
            any::<f64>()
                .prop_filter("finite", |f| f.is_finite())
                .prop_map(|n| serde_json::json!(n)),
            "[a-zx\\\\\"]{0,8}".prop_map(serde_json::Value::String),
        ];
        let tree = leaf.prop_recursive(4, 32, 6, |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..6).prop_map(serde_json::Value::Array),
                proptest::collection::btree_map("[abcz0]{1,2}", inner, 0..6)
                    .prop_map(|m| serde_json::Value::Object(m.into_iter().collect())),
            ]
        });
        tree.prop_map(|v| {
            let mut object = serde_json::Map::new();
            object.insert("a".into(), v);
            serde_json::Value::Object(object).to_string()
        })
    }
}
