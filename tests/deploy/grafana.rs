//! deploy/grafana/chatwoot-bridge.json: valid JSON whose every query promtool parses, names only
//! metrics the bridge exports, and which shows every one of them somewhere.

use std::collections::BTreeSet;
use std::process::Command;

use serde_json::Value;

use crate::promql::{bridge_series, check_names, metric_of, BRIDGE_METRICS};
use crate::tools::{both, output_of, read, tool};

const DASHBOARD: &str = "deploy/grafana/chatwoot-bridge.json";

/// The dashboard.
fn dashboard() -> Value {
    serde_json::from_str(&read(DASHBOARD))
        .unwrap_or_else(|e| panic!("{DASHBOARD} is not valid JSON: {e}"))
}

/// Every PromQL query in `value`, with where it is: panel targets and annotations (`expr`), and
/// the template variables' `label_values(QUERY, label)`.
fn queries(value: &Value, at: &str, found: &mut Vec<(String, String)>) {
    match value {
        Value::Object(map) => {
            if let Some(Value::String(expr)) = map.get("expr") {
                found.push((at.to_owned(), expr.clone()));
            }
            if let Some(Value::String(definition)) = map.get("definition") {
                let inner = definition
                    .strip_prefix("label_values(")
                    .and_then(|rest| rest.rsplit_once(','))
                    .map(|(query, _label)| query.to_owned())
                    .unwrap_or_else(|| panic!("{at}: a variable that is not label_values(...)"));
                found.push((format!("{at}.definition"), inner));
            }
            for (key, inner) in map {
                let label = map
                    .get("title")
                    .or(map.get("name"))
                    .and_then(Value::as_str)
                    .map_or_else(|| key.clone(), |t| format!("{key} of \"{t}\""));
                queries(inner, &format!("{at}/{label}"), found);
            }
        }
        Value::Array(items) => {
            for (i, inner) in items.iter().enumerate() {
                queries(inner, &format!("{at}[{i}]"), found);
            }
        }
        _ => {}
    }
}

fn all_queries() -> Vec<(String, String)> {
    let mut found = Vec::new();
    queries(&dashboard(), DASHBOARD, &mut found);
    assert!(found.len() > 20, "only {} queries found", found.len());
    found
}

#[test]
fn the_dashboard_names_only_metrics_the_bridge_exports_and_shows_them_all() {
    let allowed = bridge_series();
    let mut shown = BTreeSet::new();
    for (at, expr) in all_queries() {
        for name in check_names(&at, &expr, &allowed) {
            shown.insert(metric_of(&name));
        }
    }
    for metric in BRIDGE_METRICS {
        let full = format!("chatwoot_bridge_{metric}");
        assert!(shown.contains(&full), "no panel shows {full}");
    }
}

/// `expr` with Grafana's variables replaced by values PromQL accepts where they stand.
fn as_promql(expr: &str) -> String {
    expr.replace("$__rate_interval", "5m")
        .replace("$__range", "6h")
        .replace("$__interval", "1m")
}

#[test]
fn promtool_parses_every_query_of_the_dashboard() {
    // As recording rules, the one form promtool parses offline.
    let mut rules = String::from("groups:\n  - name: dashboard\n    rules:\n");
    for (i, (_, expr)) in all_queries().iter().enumerate() {
        rules += &format!(
            "      - record: dashboard_query_{i}\n        expr: {}\n",
            serde_json::to_string(&as_promql(expr)).unwrap()
        );
    }
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("dashboard-queries.yaml");
    std::fs::write(&file, &rules).unwrap();
    let out = output_of(
        Command::new(tool("promtool", "prometheus"))
            .args(["check", "rules"])
            .arg(&file),
    );
    assert!(
        out.status.success(),
        "promtool check rules:\n{}\n{rules}",
        both(&out)
    );
}

#[test]
fn every_panel_has_a_unique_id_and_fits_the_grid() {
    let dashboard = dashboard();
    let panels = dashboard["panels"].as_array().expect("panels");
    let mut ids = BTreeSet::new();
    for panel in panels {
        let title = panel["title"].as_str().unwrap_or("?");
        assert!(
            ids.insert(panel["id"].as_u64().expect("an id")),
            "{title}: id reused"
        );
        let grid = &panel["gridPos"];
        let (x, w) = (grid["x"].as_u64().unwrap(), grid["w"].as_u64().unwrap());
        assert!(x + w <= 24, "{title}: wider than the grid");
        if panel["type"] != "row" {
            assert_eq!(
                panel["datasource"]["uid"], "${datasource}",
                "{title}: not on the dashboard's data source variable"
            );
        }
    }
}
