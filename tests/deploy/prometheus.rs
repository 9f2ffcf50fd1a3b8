//! deploy/prometheus/alerts.yaml: valid for promtool, every alert fires in
//! deploy/prometheus/alerts_test.yaml on the failure it is for (and stays quiet before), and
//! every query names only metrics the bridge exports.

use std::collections::BTreeSet;
use std::process::Command;

use crate::promql::{bridge_series, check_names};
use crate::tools::{both, output_of, repo_path, text, tool, yaml_documents};

const ALERTS: &str = "deploy/prometheus/alerts.yaml";
const ALERTS_TEST: &str = "deploy/prometheus/alerts_test.yaml";

/// promtool, from Debian's `prometheus` package.
fn promtool() -> Command {
    Command::new(tool("promtool", "prometheus"))
}

#[test]
fn promtool_accepts_the_alert_rules() {
    let out = output_of(promtool().arg("check").arg("rules").arg(repo_path(ALERTS)));
    assert!(
        out.status.success(),
        "promtool check rules:\n{}",
        both(&out)
    );
}

#[test]
fn every_alert_fires_in_promtools_unit_tests_of_the_failures() {
    let out = output_of(
        promtool()
            .arg("test")
            .arg("rules")
            .arg(repo_path(ALERTS_TEST)),
    );
    assert!(out.status.success(), "promtool test rules:\n{}", both(&out));
    assert!(both(&out).contains("SUCCESS"), "{}", both(&out));
}

/// Every rule of alerts.yaml: (alert or record name, expression).
fn rules() -> Vec<(String, String)> {
    let document = &yaml_documents(ALERTS)[0];
    let mut rules = Vec::new();
    for group in document["groups"].as_vec().expect("groups: a list") {
        for rule in group["rules"].as_vec().expect("rules: a list") {
            let name = rule["alert"].as_str().or(rule["record"].as_str());
            let name = name.expect("a rule is an alert or a record");
            rules.push((name.to_owned(), text(&rule["expr"], "expr").to_owned()));
        }
    }
    rules
}

/// The alerts alerts_test.yaml tests, each with whether it saw it fire and saw it quiet.
fn tested_alerts() -> Vec<(String, bool, bool)> {
    let document = &yaml_documents(ALERTS_TEST)[0];
    let mut seen: Vec<(String, bool, bool)> = Vec::new();
    for test in document["tests"].as_vec().expect("tests: a list") {
        for case in test["alert_rule_test"].as_vec().into_iter().flatten() {
            let name = text(&case["alertname"], "alertname").to_owned();
            let fires = !case["exp_alerts"].as_vec().expect("exp_alerts").is_empty();
            match seen.iter_mut().find(|(n, _, _)| *n == name) {
                Some(entry) => {
                    entry.1 |= fires;
                    entry.2 |= !fires;
                }
                None => seen.push((name, fires, !fires)),
            }
        }
    }
    seen
}

#[test]
fn every_alert_has_a_test_that_sees_it_fire_and_one_that_sees_it_quiet() {
    let tested = tested_alerts();
    let alerts: Vec<String> = rules()
        .into_iter()
        .map(|(name, _)| name)
        .filter(|name| !name.contains(':'))
        .collect();
    // The failures operators are paged for, by the issue that asked for them.
    for wanted in [
        "ChatwootBridgeDown",
        "ChatwootBridgeTokenNotSubscribed",
        "ChatwootBridgeTokenSilent",
        "ChatwootBridgeDeliveryStalled",
        "ChatwootBridgeDeadLettersGrowing",
        "ChatwootBridgeEventsDropped",
        "ChatwootBridgeSpoolNearlyFull",
        "ChatwootBridgeSinkLoopRestarting",
        "ChatwootBridgeIngestRestarting",
    ] {
        assert!(alerts.iter().any(|a| a == wanted), "no alert {wanted}");
    }
    for alert in &alerts {
        let entry = tested.iter().find(|(name, _, _)| name == alert);
        let (_, fires, quiet) = entry.unwrap_or_else(|| panic!("{alert} has no unit test"));
        assert!(*fires, "no unit test of {alert} expects it to fire");
        assert!(
            *quiet,
            "no unit test of {alert} expects it quiet before the failure"
        );
    }
}

#[test]
fn the_alerts_name_only_metrics_the_bridge_exports() {
    let rules = rules();
    let mut allowed = bridge_series();
    // Prometheus's own series for a scrape target.
    allowed.insert("up".to_owned());
    // The file's recording rules.
    allowed.extend(
        rules
            .iter()
            .filter(|(name, _)| name.contains(':'))
            .map(|(name, _)| name.clone()),
    );
    let mut named = BTreeSet::new();
    for (name, expr) in &rules {
        if name.contains(':') {
            // A recording rule of settings (`vector(3600)`) selects no metric.
            continue;
        }
        named.extend(check_names(&format!("{ALERTS}: {name}"), expr, &allowed));
    }
    assert!(
        named.contains("chatwoot_bridge_token_subscribed"),
        "{named:?}"
    );
}
