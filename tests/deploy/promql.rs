//! The metric names a PromQL query selects, and the names the bridge exports, so that a
//! dashboard panel or an alert on a misspelt metric (which would show nothing, or never fire)
//! fails here.

use std::collections::BTreeSet;

/// Every metric the bridge exports at `/metrics` (without the `chatwoot_bridge_` prefix), as
/// the admin endpoint names them.
pub(crate) const BRIDGE_METRICS: &[&str] = &[
    "token_state",
    "token_subscribed",
    "token_connects_total",
    "token_reconnects_total",
    "token_subscriptions_unconfirmed_total",
    "token_subscriptions_rejected_total",
    "token_rotations_total",
    "token_backfills_total",
    "token_backfilled_events_total",
    "token_backfill_gaps_given_up_total",
    "token_stalled",
    "token_stalls_total",
    "token_frames_received_total",
    "token_events_received_total",
    "token_malformed_frames_total",
    "token_last_event_age_seconds",
    "token_last_ping_age_seconds",
    "sink_state",
    "sink_events_delivered_total",
    "sink_retries_total",
    "sink_events_dead_lettered_total",
    "sink_events_pushed_out_total",
    "sink_events_parked",
    "sink_events_in_flight",
    "sink_delivery_latency_seconds",
    "sink_backlog_events",
    "sink_backlog_bytes",
    "sink_oldest_undelivered_age_seconds",
    "sink_loop_restarts_total",
    "spool_bytes",
    "spool_max_bytes",
    "events_spooled_total",
    "events_dropped_total",
    "events_unmatched_total",
    "ingest_restarts_total",
    "build_info",
    "config_reloads_total",
    "config_info",
    "config_last_reload_success_timestamp_seconds",
];

/// The histograms among [`BRIDGE_METRICS`]: queried through their `_bucket`, `_sum` and
/// `_count` series.
const HISTOGRAMS: &[&str] = &["sink_delivery_latency_seconds"];

/// Every series name a query may select: the metrics, with the histograms' series.
pub(crate) fn bridge_series() -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for metric in BRIDGE_METRICS {
        names.insert(format!("chatwoot_bridge_{metric}"));
    }
    for histogram in HISTOGRAMS {
        for suffix in ["_bucket", "_sum", "_count"] {
            names.insert(format!("chatwoot_bridge_{histogram}{suffix}"));
        }
    }
    names
}

/// The metric a series name belongs to (a histogram's `_bucket` is the histogram).
pub(crate) fn metric_of(series: &str) -> String {
    for histogram in HISTOGRAMS {
        let full = format!("chatwoot_bridge_{histogram}");
        if series.starts_with(&full) {
            return full;
        }
    }
    series.to_owned()
}

/// Aggregation operators: followed by `by`/`without` or a parenthesis, never metrics.
const AGGREGATIONS: &[&str] = &[
    "sum",
    "min",
    "max",
    "avg",
    "group",
    "stddev",
    "stdvar",
    "count",
    "count_values",
    "bottomk",
    "topk",
    "quantile",
    "limitk",
    "limit_ratio",
];

/// Keywords followed by a parenthesized list of label names.
const LABEL_LISTS: &[&str] = &[
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
];

/// Other words of the language that are not metrics.
const KEYWORDS: &[&str] = &[
    "and", "or", "unless", "bool", "offset", "atan2", "inf", "nan",
];

/// The metric names `expr` selects, in order, each once. Function names, keywords, label names
/// (in matchers and in `by (...)` lists), strings, ranges, numbers, durations and Grafana
/// variables (`$token`, `${x}`) are not.
pub(crate) fn metric_names(expr: &str) -> Vec<String> {
    let chars: Vec<char> = expr.chars().collect();
    let mut names: Vec<String> = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        if c == '"' || c == '\'' || c == '`' {
            i = after_string(&chars, i);
        } else if c == '{' {
            i = after_group(&chars, i, '{', '}');
        } else if c == '[' {
            i = after_group(&chars, i, '[', ']');
        } else if c == '$' {
            i += 1;
            if chars.get(i) == Some(&'{') {
                i = after_group(&chars, i, '{', '}');
            } else {
                i = after_word(&chars, i);
            }
        } else if c.is_ascii_digit() || c == '.' {
            // A number or a duration (`5m`, `1e3`) is one token.
            i = after_word(&chars, i);
        } else if c.is_ascii_alphabetic() || c == '_' || c == ':' {
            let end = after_word(&chars, i);
            let word: String = chars[i..end].iter().collect();
            let next = chars[end..].iter().find(|c| !c.is_whitespace());
            i = end;
            let lower = word.to_ascii_lowercase();
            if LABEL_LISTS.contains(&lower.as_str()) {
                if let Some(open) = chars[i..].iter().position(|c| !c.is_whitespace()) {
                    if chars[i + open] == '(' {
                        i = after_group(&chars, i + open, '(', ')');
                    }
                }
            } else if next == Some(&'(')
                || AGGREGATIONS.contains(&lower.as_str())
                || KEYWORDS.contains(&lower.as_str())
            {
                // A function or an operator.
            } else if !names.contains(&word) {
                names.push(word);
            }
        } else {
            i += 1;
        }
    }
    names
}

/// The index after the word (letters, digits, `_`, `:`, `.`) starting at `start`.
fn after_word(chars: &[char], start: usize) -> usize {
    let mut i = start;
    while i < chars.len() && (chars[i].is_ascii_alphanumeric() || "_:.".contains(chars[i])) {
        i += 1;
    }
    i.max(start + 1)
}

/// The index after the string literal opening at `start` (backslash escapes in `"` and `'`).
fn after_string(chars: &[char], start: usize) -> usize {
    let quote = chars[start];
    let mut i = start + 1;
    while i < chars.len() {
        if chars[i] == '\\' && quote != '`' {
            i += 2;
            continue;
        }
        if chars[i] == quote {
            return i + 1;
        }
        i += 1;
    }
    i
}

/// The index after the `open`…`close` group starting at `start`, nested groups and strings
/// inside included.
fn after_group(chars: &[char], start: usize, open: char, close: char) -> usize {
    let mut depth = 0usize;
    let mut i = start;
    while i < chars.len() {
        let c = chars[i];
        if c == '"' || c == '\'' || c == '`' {
            i = after_string(chars, i);
            continue;
        }
        if c == open {
            depth += 1;
        } else if c == close {
            depth -= 1;
            if depth == 0 {
                return i + 1;
            }
        }
        i += 1;
    }
    i
}

/// Fails unless `expr` (from `source`) selects at least one metric and only names in
/// `allowed`; returns the names it selects.
pub(crate) fn check_names(source: &str, expr: &str, allowed: &BTreeSet<String>) -> Vec<String> {
    let names = metric_names(expr);
    assert!(
        !names.is_empty(),
        "{source}: the query selects no metric: {expr}"
    );
    for name in &names {
        assert!(
            allowed.contains(name),
            "{source}: `{name}` is not a metric the bridge exports (misspelt?), in: {expr}"
        );
    }
    names
}

#[test]
fn metric_names_skips_functions_labels_strings_ranges_and_variables() {
    let expr = r#"sum by (token, reason) (increase(chatwoot_bridge_token_reconnects_total{token=~"$token", x='}{"'}[5m] offset 1h))
        > on (job) group_left (sink) up unless foo:bar * 2.5e3 and ignoring(sink) ${var}
        or histogram_quantile(0.99, sum without (le) (rate(x_bucket[$__rate_interval]))) > bool Inf"#;
    assert_eq!(
        metric_names(expr),
        [
            "chatwoot_bridge_token_reconnects_total",
            "up",
            "foo:bar",
            "x_bucket"
        ]
    );
}

#[test]
fn a_misspelt_metric_is_named() {
    let allowed = bridge_series();
    let caught = std::panic::catch_unwind(|| {
        check_names(
            "a test",
            "rate(chatwoot_bridge_sink_event_delivered_total[5m])",
            &allowed,
        )
    });
    let message = *caught.unwrap_err().downcast::<String>().unwrap();
    assert!(
        message.contains("`chatwoot_bridge_sink_event_delivered_total` is not a metric"),
        "{message}"
    );
    assert_eq!(
        check_names(
            "a test",
            "histogram_quantile(0.5, rate(chatwoot_bridge_sink_delivery_latency_seconds_bucket[5m]))",
            &allowed
        ),
        ["chatwoot_bridge_sink_delivery_latency_seconds_bucket"]
    );
}
