//! deploy/compose.yaml: the file parses, and the bridge's config (deploy/compose/bridge.yaml)
//! points at the services it starts, reads the secrets it mounts, and gives the mock Chatwoot
//! tokens it confirms; the Prometheus it starts accepts its config and loads the alert rules.

use std::process::Command;

use yaml_rust2::Yaml;

use crate::tools::{both, output_of, read, repo_path, text, tool, yaml_documents, yaml_text};

const COMPOSE: &str = "deploy/compose.yaml";

/// The compose file's service `name`.
fn service<'a>(compose: &'a Yaml, name: &str) -> &'a Yaml {
    let service = &compose["services"][name];
    assert!(!service.is_badvalue(), "{COMPOSE} has no service {name}");
    service
}

/// The strings of a list.
fn strings(list: &Yaml, what: &str) -> Vec<String> {
    list.as_vec()
        .unwrap_or_else(|| panic!("{what} is a list"))
        .iter()
        .map(|item| text(item, what).to_owned())
        .collect()
}

/// The host and port of a URL (`ws://mock:3000/cable`) or address (`kafka:9092`).
fn host_port(address: &str) -> (String, u16) {
    let rest = address.split_once("://").map_or(address, |(_, rest)| rest);
    let authority = rest.split('/').next().unwrap();
    let (host, port) = authority.rsplit_once(':').expect("a port");
    (host.to_owned(), port.parse().unwrap())
}

/// The host file a service mounts at `target` (a `./relative:target[:ro]` volume), relative to
/// the compose file's folder.
fn mounted_file(service: &Yaml, target: &str) -> String {
    strings(&service["volumes"], "volumes")
        .into_iter()
        .find_map(|v| {
            let mut parts = v.split(':');
            let (source, at) = (parts.next()?, parts.next()?);
            (at == target).then(|| format!("deploy/{}", source.trim_start_matches("./")))
        })
        .unwrap_or_else(|| panic!("nothing is mounted at {target}"))
}

#[test]
fn the_bridge_config_points_at_the_services_compose_starts() {
    let compose = &yaml_documents(COMPOSE)[0];
    let bridge = service(compose, "bridge");
    let mock = service(compose, "mock");
    let config_file = mounted_file(bridge, "/etc/chatwoot-bridge/bridge.yaml");
    let config = yaml_text(&config_file, &read(&config_file));

    // The cable is the mock's, on the port it listens on.
    let mock_args = strings(&mock["command"], "mock command");
    assert_eq!(mock_args[0], "mock-server");
    let listen = mock_args
        .iter()
        .find_map(|a| a.strip_prefix("--listen="))
        .expect("the mock's --listen");
    let (cable_host, cable_port) = host_port(text(&config["chatwoot"]["url"], "chatwoot.url"));
    assert_eq!(cable_host, "mock");
    assert_eq!(cable_port, host_port(listen).1);

    // Each sink's server is a service.
    for sink in config["sinks"].as_hash().expect("sinks").values() {
        let address = match text(&sink["type"], "type") {
            "nats" => text(&sink["url"], "url").to_owned(),
            "kafka" => text(&sink["brokers"][0], "brokers").to_owned(),
            other => panic!("a {other} sink needs no service; the compose setup has none"),
        };
        let (host, _) = host_port(&address);
        service(compose, &host);
    }

    // Each token's file is a secret compose gives the bridge, holding a token the mock confirms.
    let confirmed: Vec<&str> = mock_args
        .iter()
        .filter_map(|a| a.strip_prefix("--token="))
        .collect();
    let given = strings(&bridge["secrets"], "bridge secrets");
    for token in config["tokens"].as_vec().expect("tokens") {
        let file = text(&token["pubsub_token_file"], "pubsub_token_file");
        let secret = file
            .strip_prefix("/run/secrets/")
            .expect("a compose secret");
        assert!(
            given.iter().any(|g| g == secret),
            "the bridge is not given {secret}"
        );
        let source = text(&compose["secrets"][secret]["file"], "secret file");
        let value = read(&format!("deploy/{}", source.trim_start_matches("./")));
        assert!(
            confirmed.contains(&value.trim()),
            "the mock does not confirm {secret}"
        );
    }

    // The admin endpoint listens inside the container on the port compose publishes.
    let admin = text(&config["admin"]["listen"], "admin.listen");
    let (_, admin_port) = host_port(admin);
    let published = strings(&bridge["ports"], "ports");
    assert!(
        published
            .iter()
            .any(|p| p.ends_with(&format!(":{admin_port}"))),
        "{published:?} does not publish {admin_port}"
    );
}

#[test]
fn the_compose_prometheus_accepts_its_config_and_scrapes_the_bridge() {
    let compose = &yaml_documents(COMPOSE)[0];
    let prometheus = service(compose, "prometheus");
    let config_file = mounted_file(prometheus, "/etc/prometheus/prometheus.yml");
    let rules_file = mounted_file(prometheus, "/etc/prometheus/alerts.yaml");
    assert_eq!(rules_file, "deploy/prometheus/alerts.yaml");

    let config = yaml_text(&config_file, &read(&config_file));
    let job = &config["scrape_configs"][0];
    assert_eq!(job["job_name"].as_str(), Some("chatwoot-bridge"));
    let target = text(&job["static_configs"][0]["targets"][0], "target");
    let bridge_config = read(&mounted_file(
        service(compose, "bridge"),
        "/etc/chatwoot-bridge/bridge.yaml",
    ));
    let admin = yaml_text("bridge.yaml", &bridge_config)["admin"]["listen"].clone();
    assert_eq!(
        host_port(target),
        (
            "bridge".to_owned(),
            host_port(text(&admin, "admin.listen")).1
        )
    );

    // As mounted: the rules next to the config.
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(repo_path(&config_file), dir.path().join("prometheus.yml")).unwrap();
    std::fs::copy(repo_path(&rules_file), dir.path().join("alerts.yaml")).unwrap();
    let out = output_of(
        Command::new(tool("promtool", "prometheus"))
            .args(["check", "config"])
            .arg(dir.path().join("prometheus.yml")),
    );
    assert!(
        out.status.success(),
        "promtool check config:\n{}",
        both(&out)
    );
}
