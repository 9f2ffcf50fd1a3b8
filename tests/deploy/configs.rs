//! The bridge configs shipped under `deploy/` load with the bridge's own config reader (the
//! secrets they read from files pointed at stand-ins), and the metric list the alerts and the
//! dashboard are checked against is exactly what a running bridge exports.

use std::collections::BTreeSet;
use std::path::Path;
use std::time::Duration;

use chatwoot_bridge::config::Config;
use chatwoot_bridge::mock::{Answer, MockConfig};
use chatwoot_bridge::Bridge;

use crate::promql::BRIDGE_METRICS;
use crate::support::{mock_token, quoted, shut_down, start_mock, BridgeYaml};
use crate::tools::{read, repo_path, text, yaml_documents};

/// Loads `text` as the daemon would, with the secret files under `mounted` read from `stand_ins`.
fn load(what: &str, text: &str, mounted: &str, stand_ins: &Path) -> Config {
    let text = text.replace(mounted, &format!("{}/", stand_ins.display()));
    Config::from_yaml(&text, &|_| None, false)
        .unwrap_or_else(|e| panic!("{what} is refused by the bridge: {e}"))
}

#[test]
fn the_compose_config_loads_with_its_secrets() {
    let config = load(
        "deploy/compose/bridge.yaml",
        &read("deploy/compose/bridge.yaml"),
        "/run/secrets/",
        &repo_path("deploy/compose/secrets"),
    );
    assert_eq!(config.tokens.len(), 2);
    let admin = config
        .admin
        .expect("the compose config serves the admin endpoint");
    assert_eq!(admin.listen.to_string(), "0.0.0.0:9464");
}

#[test]
fn the_kubernetes_config_map_loads_with_its_secrets() {
    let documents = yaml_documents("deploy/kubernetes/chatwoot-bridge.yaml");
    let config_map = documents
        .iter()
        .find(|d| d["kind"].as_str() == Some("ConfigMap"))
        .expect("a ConfigMap");
    let bridge_yaml = text(&config_map["data"]["bridge.yaml"], "bridge.yaml");
    let secrets = tempfile::tempdir().unwrap();
    for name in ["agent-token", "contact-token"] {
        std::fs::write(secrets.path().join(name), "stand-in\n").unwrap();
    }
    let config = load(
        "the ConfigMap's bridge.yaml",
        bridge_yaml,
        "/run/secrets/chatwoot-bridge/",
        secrets.path(),
    );
    assert!(!config.tokens.is_empty());
    assert!(config.admin.is_some(), "the probes need the admin endpoint");
}

/// The metric families `/metrics` text names in its `# TYPE` lines, without the prefix.
fn families(metrics: &str) -> BTreeSet<String> {
    metrics
        .lines()
        .filter_map(|line| line.strip_prefix("# TYPE chatwoot_bridge_"))
        .map(|rest| rest.split(' ').next().unwrap().to_owned())
        .collect()
}

#[tokio::test]
async fn the_metric_list_the_alerts_use_is_what_the_bridge_exports() {
    let mock = start_mock(MockConfig {
        tokens: vec![mock_token("t", Answer::Confirm)],
        ..MockConfig::default()
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let config = BridgeYaml::new(&mock.url())
        .token("{ name: a, pubsub_token: t }")
        .sink(
            "out",
            &format!(
                "{{ type: file, path: {} }}",
                quoted(dir.path().join("out.jsonl"))
            ),
        )
        .route_all(&["out"])
        .spool(&dir.path().join("spool"))
        .setting("admin: { listen: '127.0.0.1:0' }")
        .config();
    let bridge = Bridge::start(config).await.unwrap();
    let admin = bridge.admin_addr().unwrap().to_string();
    let answer = tokio::task::spawn_blocking(move || {
        chatwoot_bridge::probe::get(&admin, "/metrics", Duration::from_secs(10))
    })
    .await
    .unwrap()
    .expect("/metrics answers");
    shut_down(bridge).await;
    mock.stop().await;
    assert!(answer.is_success(), "{}", answer.body);
    let listed: BTreeSet<String> = BRIDGE_METRICS.iter().map(|m| m.to_string()).collect();
    assert_eq!(
        families(&answer.body),
        listed,
        "tests/deploy/promql.rs lists the metrics the bridge exports"
    );
}
