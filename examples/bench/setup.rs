//! What a measurement runs against: the brokers, and the bridge's YAML.
//!
//! Environment knobs read here (`BENCH_BRIDGE`, `BENCH_PERF`, `BENCH_PYTHON` and
//! `BENCH_NATS_CONSUMER` are read where they act):
//! - `BENCH_NATS_SERVER`: the nats-server binary (default: `nats-server` on the PATH).
//! - `BENCH_TANSU`: the tansu binary (default: `~/.cargo/bin/tansu` if present, else `tansu` on
//!   the PATH).
//! - `BENCH_KAFKA_LINGER_MS`: librdkafka's `linger.ms` for the bare pipe and the bridge alike.
//! - `BENCH_ENVELOPE`: the bridge sink's `envelope` (`binary`, the default, or `structured`).

use std::path::{Path, PathBuf};

use anyhow::Result;

use crate::process::{free_port, wait_port, Proc};
use crate::STARTUP;

/// A broker process (nats-server or tansu) on a free port, stopped on drop.
pub(crate) struct Broker {
    /// Kept for its drop, which stops the broker.
    _proc: Proc,
    /// What clients connect to: `nats://127.0.0.1:<port>` or `127.0.0.1:<port>`.
    pub(crate) url: String,
}

/// The nats-server binary.
pub(crate) fn nats_server() -> PathBuf {
    std::env::var_os("BENCH_NATS_SERVER")
        .map(PathBuf::from)
        .unwrap_or_else(|| "nats-server".into())
}

/// nats-server's arguments: JetStream on, loopback only, its store in `store`.
pub(crate) fn nats_server_args(port: u16, store: &Path) -> Vec<String> {
    let port = port.to_string();
    let store = store.display().to_string();
    ["-js", "-a", "127.0.0.1", "-p", &port, "-sd", &store]
        .iter()
        .map(|s| s.to_string())
        .collect()
}

/// The tansu binary (a Kafka-compatible broker, `cargo install tansu`).
fn tansu() -> PathBuf {
    if let Some(path) = std::env::var_os("BENCH_TANSU") {
        return path.into();
    }
    let installed = std::env::var_os("HOME")
        .map(|home| PathBuf::from(home).join(".cargo/bin/tansu"))
        .filter(|p| p.is_file());
    installed.unwrap_or_else(|| "tansu".into())
}

/// Starts the broker `sink` needs (none for `http`), its files in `dir`.
pub(crate) fn start_broker(sink: &str, dir: &Path) -> Result<Option<Broker>> {
    let port = free_port()?;
    let (program, args, url) = match sink {
        "nats" | "jetstream" => (
            nats_server(),
            nats_server_args(port, &dir.join("js")),
            format!("nats://127.0.0.1:{port}"),
        ),
        "kafka" => {
            let listener = format!("tcp://127.0.0.1:{port}");
            let args = [
                "broker",
                "--storage-engine",
                "memory://tansu/",
                "--listener-url",
                &listener,
                "--advertised-listener-url",
                &listener,
            ]
            .iter()
            .map(|s| s.to_string())
            .collect();
            (tansu(), args, format!("127.0.0.1:{port}"))
        }
        _ => return Ok(None),
    };
    let proc = Proc::spawn(sink, &program, &args, &dir.join(format!("{sink}.log")))?;
    wait_port(port, STARTUP)?;
    Ok(Some(Broker { _proc: proc, url }))
}

/// `BENCH_KAFKA_LINGER_MS`: librdkafka's `linger.ms` for the bare pipe and the bridge alike
/// (unset: librdkafka's default, 5 ms).
pub(crate) fn kafka_linger_ms() -> Option<u64> {
    std::env::var("BENCH_KAFKA_LINGER_MS")
        .ok()
        .and_then(|v| v.parse().ok())
}

/// `BENCH_ENVELOPE`: the bridge sink's `envelope` (`binary`, the default, or `structured`).
fn bench_envelope() -> Option<String> {
    std::env::var("BENCH_ENVELOPE")
        .ok()
        .filter(|e| !e.is_empty())
}

/// The bridge's sink as a YAML flow mapping.
fn sink_yaml(sink: &str, target: &str, topic: &str) -> String {
    let sink_yaml = match sink {
        "nats" => format!("{{ type: nats, url: \"{target}\", subject: \"bench.{{event}}\" }}"),
        "jetstream" => format!(
            "{{ type: nats, url: \"{target}\", subject: \"bench.{{event}}\", jetstream: {{ stream: BENCH }} }}"
        ),
        "kafka" => match kafka_linger_ms() {
            Some(ms) => format!(
                "{{ type: kafka, brokers: [\"{target}\"], topic: \"{topic}\", librdkafka: {{ linger.ms: \"{ms}\" }} }}"
            ),
            None => format!("{{ type: kafka, brokers: [\"{target}\"], topic: \"{topic}\" }}"),
        },
        "http" => format!("{{ type: http, url: \"{target}\" }}"),
        _ => unreachable!("the orchestrator checked the sink"),
    };
    match bench_envelope() {
        Some(envelope) => format!(
            "{}, envelope: {envelope} }}",
            sink_yaml
                .strip_suffix('}')
                .expect("a flow mapping")
                .trim_end()
        ),
        None => sink_yaml,
    }
}

/// The bridge's YAML for one token on `cable` and one sink; `spool_max_bytes` raises the
/// spool's bound (the backlog's million events do not fit the default).
pub(crate) fn bridge_yaml(
    cable: &str,
    sink: &str,
    target: &str,
    topic: &str,
    spool: &Path,
    spool_max_bytes: Option<u64>,
) -> String {
    let sink_yaml = sink_yaml(sink, target, topic);
    let max_bytes = spool_max_bytes
        .map(|n| format!(", max_bytes: {n}"))
        .unwrap_or_default();
    format!(
        "chatwoot:\n  url: {cable}\ntokens:\n  - name: bench\n    pubsub_token: bench-token\n    account_id: 1\n    user_id: 1\nsinks:\n  out: {sink_yaml}\nroutes:\n  - {{ name: all, match: {{}}, to: [out] }}\nspool: {{ dir: \"{}\"{max_bytes} }}\n",
        spool.display()
    )
}
