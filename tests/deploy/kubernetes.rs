//! deploy/kubernetes/: the manifests parse, and their parts agree with each other and with the
//! bridge's config inside them: probes on the port the admin endpoint listens on, secret files
//! where the config reads them, the spool on the volume, a Service the ServiceMonitor finds,
//! resources that hold the measured peaks.

use yaml_rust2::Yaml;

use crate::tools::{text, yaml_documents, yaml_text};

const MANIFEST: &str = "deploy/kubernetes/chatwoot-bridge.yaml";
const SERVICE_MONITOR: &str = "deploy/kubernetes/servicemonitor.yaml";

/// The one object of `kind` among `documents`.
fn object<'a>(documents: &'a [Yaml], kind: &str) -> &'a Yaml {
    let mut found = documents
        .iter()
        .filter(|d| d["kind"].as_str() == Some(kind));
    let first = found
        .next()
        .unwrap_or_else(|| panic!("no {kind} in the manifests"));
    assert!(found.next().is_none(), "more than one {kind}");
    first
}

/// A Kubernetes memory quantity (`64Mi`, `1Gi`) in MiB.
fn mebibytes(quantity: &str) -> u64 {
    if let Some(n) = quantity.strip_suffix("Mi") {
        n.parse().unwrap()
    } else if let Some(n) = quantity.strip_suffix("Gi") {
        n.parse::<u64>().unwrap() * 1024
    } else {
        panic!("a memory quantity in Mi or Gi: {quantity}")
    }
}

/// The port of a `host:port` listen address.
fn port_of(listen: &str) -> i64 {
    listen.rsplit_once(':').unwrap().1.parse().unwrap()
}

/// The container's mount path of the volume `name`.
fn mount_path<'a>(container: &'a Yaml, name: &str) -> &'a str {
    let mounts = container["volumeMounts"].as_vec().expect("volumeMounts");
    let mount = mounts.iter().find(|m| m["name"].as_str() == Some(name));
    text(
        &mount.unwrap_or_else(|| panic!("no mount of {name}"))["mountPath"],
        "mountPath",
    )
}

#[test]
fn the_manifests_parse_and_agree_with_the_config_inside_them() {
    let documents = yaml_documents(MANIFEST);
    let statefulset = object(&documents, "StatefulSet");
    let pod = &statefulset["spec"]["template"];
    let container = &pod["spec"]["containers"][0];
    let config = yaml_text(
        "the ConfigMap's bridge.yaml",
        text(
            &object(&documents, "ConfigMap")["data"]["bridge.yaml"],
            "bridge.yaml",
        ),
    );

    // The admin endpoint listens on the pod's address, on the port the probes and Prometheus use.
    let listen = text(&config["admin"]["listen"], "admin.listen");
    assert!(
        listen.starts_with("0.0.0.0:"),
        "the kubelet's probes come from outside the pod: {listen}"
    );
    let admin = container["ports"]
        .as_vec()
        .unwrap()
        .iter()
        .find(|p| p["name"].as_str() == Some("admin"))
        .expect("a container port named admin");
    assert_eq!(admin["containerPort"].as_i64(), Some(port_of(listen)));
    for (probe, path) in [
        ("startupProbe", "/healthz"),
        ("livenessProbe", "/healthz"),
        ("readinessProbe", "/readyz"),
    ] {
        let get = &container[probe]["httpGet"];
        assert_eq!(get["path"].as_str(), Some(path), "{probe}");
        assert_eq!(get["port"].as_str(), Some("admin"), "{probe}");
    }
    let annotations = &pod["metadata"]["annotations"];
    assert_eq!(annotations["prometheus.io/scrape"].as_str(), Some("true"));
    assert_eq!(
        annotations["prometheus.io/port"].as_str(),
        Some(port_of(listen).to_string().as_str())
    );

    // Every secret the config reads is a file of the mounted Secret.
    let secret = object(&documents, "Secret");
    let secrets_at = mount_path(container, "secrets");
    let volumes = pod["spec"]["volumes"].as_vec().unwrap();
    let secret_volume = volumes
        .iter()
        .find(|v| v["name"].as_str() == Some("secrets"))
        .unwrap();
    assert_eq!(
        secret_volume["secret"]["secretName"],
        secret["metadata"]["name"]
    );
    let tokens = config["tokens"].as_vec().expect("tokens");
    for token in tokens {
        let file = text(&token["pubsub_token_file"], "pubsub_token_file");
        let key = file
            .strip_prefix(&format!("{secrets_at}/"))
            .unwrap_or_else(|| panic!("{file} is not under the Secret's mount {secrets_at}"));
        assert!(
            !secret["stringData"][key].is_badvalue(),
            "the Secret has no {key} for {file}"
        );
    }

    // The spool is on the claimed volume.
    let spool = text(&config["spool"]["dir"], "spool.dir");
    let claim = text(
        &statefulset["spec"]["volumeClaimTemplates"][0]["metadata"]["name"],
        "claim",
    );
    assert!(
        spool.starts_with(mount_path(container, claim)),
        "{spool} is not on the volume"
    );
    // The shutdown (shutdown_timeout, 10 s, plus up to 5 s) ends before the kubelet kills.
    assert!(
        pod["spec"]["terminationGracePeriodSeconds"]
            .as_i64()
            .unwrap()
            >= 15
    );
}

#[test]
fn resources_hold_the_measured_memory_peaks() {
    let documents = yaml_documents(MANIFEST);
    let container = &object(&documents, "StatefulSet")["spec"]["template"]["spec"]["containers"][0];
    let resources = &container["resources"];
    // BENCHMARKS.md, Memory: 18 to 32 MB at a steady 2,000 events/s; 143 MB at most in a blast
    // or draining a 1,000,000-event backlog.
    let request = mebibytes(text(&resources["requests"]["memory"], "requests.memory"));
    let limit = mebibytes(text(&resources["limits"]["memory"], "limits.memory"));
    assert!(
        request >= 32,
        "the request ({request} Mi) is below the steady state"
    );
    assert!(
        limit >= 150,
        "the limit ({limit} Mi) is below the measured peaks"
    );
    // memory_limit's default (64 MiB) is a quarter of the limit (src/memory.rs).
    assert_eq!(limit, 256);
    assert!(!resources["requests"]["cpu"].is_badvalue(), "a CPU request");
}

#[test]
fn the_service_monitor_scrapes_the_service_that_selects_the_pod() {
    let documents = yaml_documents(MANIFEST);
    let service = object(&documents, "Service");
    let statefulset = object(&documents, "StatefulSet");
    let pod_labels = &statefulset["spec"]["template"]["metadata"]["labels"];
    for (label, value) in service["spec"]["selector"].as_hash().unwrap() {
        assert_eq!(
            &pod_labels[label.as_str().unwrap()],
            value,
            "the Service selects the pod"
        );
    }
    assert_eq!(
        statefulset["spec"]["serviceName"],
        service["metadata"]["name"]
    );
    assert_eq!(
        service["spec"]["publishNotReadyAddresses"].as_bool(),
        Some(true),
        "a bridge whose tokens are down is still scraped"
    );
    let monitor_documents = yaml_documents(SERVICE_MONITOR);
    let monitor = object(&monitor_documents, "ServiceMonitor");
    for (label, value) in monitor["spec"]["selector"]["matchLabels"]
        .as_hash()
        .unwrap()
    {
        assert_eq!(
            &service["metadata"]["labels"][label.as_str().unwrap()],
            value,
            "the ServiceMonitor selects the Service"
        );
    }
    let endpoint = &monitor["spec"]["endpoints"][0];
    let service_port = &service["spec"]["ports"][0];
    assert_eq!(endpoint["port"], service_port["name"]);
    assert_eq!(endpoint["path"].as_str(), Some("/metrics"));
    // deploy/prometheus/alerts.yaml's ChatwootBridgeDown expects the job `chatwoot-bridge`,
    // which the Prometheus Operator takes from the Service's name.
    assert_eq!(
        service["metadata"]["name"].as_str(),
        Some("chatwoot-bridge")
    );
}
