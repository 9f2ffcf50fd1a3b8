//! Real servers for the sink tests: nats-server, a tansu Kafka broker and an HTTP receiver, each
//! on a free loopback port, each stopped when dropped.
//!
//! A missing binary fails the test with how to install it: a skipped broker test would pass
//! while proving nothing.

#![allow(dead_code)]

use std::collections::VecDeque;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chatwoot_bridge::config::{Config, SinkKind};
use chatwoot_bridge::sink::{Sink, SinkLimits};
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::service::service_fn;
use hyper::{HeaderMap, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

/// Bound on waiting for a server to accept connections.
pub const START_TIMEOUT: Duration = Duration::from_secs(20);

/// A port nobody listens on right now (the OS picks it; the listener is closed before use).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind a loopback port")
        .local_addr()
        .unwrap()
        .port()
}

/// Finds `name` on PATH or in `extra` places; panics with the install command otherwise.
pub fn binary(name: &str, extra: &[PathBuf], install: &str) -> PathBuf {
    let path_dirs = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .unwrap_or_default();
    path_dirs
        .into_iter()
        .map(|d| d.join(name))
        .chain(extra.iter().cloned())
        .find(|p| p.is_file())
        .unwrap_or_else(|| {
            panic!(
                "`{name}` is not installed; the sink tests need the real server. Install it with \
                 `{install}` (or run scripts/install-test-deps.sh)"
            )
        })
}

/// Waits until `port` accepts TCP connections, or panics after [`START_TIMEOUT`] with the
/// server's log.
async fn wait_for_port(port: u16, child: &mut Child, log: &Path, what: &str) {
    let deadline = Instant::now() + START_TIMEOUT;
    loop {
        let connect = tokio::net::TcpStream::connect(("127.0.0.1", port));
        if let Ok(Ok(_)) = tokio::time::timeout(Duration::from_secs(1), connect).await {
            return;
        }
        if let Ok(Some(status)) = child.try_wait() {
            panic!(
                "{what} exited ({status}) before accepting connections:\n{}",
                std::fs::read_to_string(log).unwrap_or_default()
            );
        }
        if Instant::now() > deadline {
            panic!(
                "{what} did not accept connections on 127.0.0.1:{port} within {START_TIMEOUT:?}:\n{}",
                std::fs::read_to_string(log).unwrap_or_default()
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A child process killed (and reaped) on drop, with its scratch directory.
struct Process {
    /// Killed on drop so no server outlives its test.
    child: Child,
    /// Storage and log; removed on drop.
    dir: tempfile::TempDir,
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn spawn(program: &Path, args: &[String], dir: tempfile::TempDir) -> (Process, PathBuf) {
    let log = dir.path().join("server.log");
    let out = std::fs::File::create(&log).unwrap();
    let child = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(out.try_clone().unwrap())
        .stderr(out)
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {}: {e}", program.display()));
    (Process { child, dir }, log)
}

/// A real `nats-server` with JetStream, storing in a temporary directory.
pub struct NatsServer {
    /// Keeps the server running for as long as the handle lives.
    process: Process,
    /// Where it listens on 127.0.0.1.
    pub port: u16,
}

impl NatsServer {
    pub async fn start() -> NatsServer {
        NatsServer::start_on(free_port()).await
    }

    /// Starts on a given port (to bring up a server a sink was already pointed at).
    pub async fn start_on(port: u16) -> NatsServer {
        NatsServer::start_with(port, &[]).await
    }

    /// Starts with extra command-line options (auth, for instance).
    pub async fn start_with(port: u16, extra: &[&str]) -> NatsServer {
        let bin = binary(
            "nats-server",
            &[
                "/usr/sbin/nats-server".into(),
                "/usr/bin/nats-server".into(),
            ],
            "apt-get install nats-server",
        );
        let dir = tempfile::tempdir().unwrap();
        let store = dir.path().join("js");
        let mut args = vec![
            "-js".to_owned(),
            "-a".to_owned(),
            "127.0.0.1".to_owned(),
            "-p".to_owned(),
            port.to_string(),
            "-sd".to_owned(),
            store.display().to_string(),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        let (mut process, log) = spawn(&bin, &args, dir);
        wait_for_port(port, &mut process.child, &log, "nats-server").await;
        NatsServer { process, port }
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// An independent client for reading back.
    pub async fn client(&self) -> async_nats::Client {
        tokio::time::timeout(START_TIMEOUT, async_nats::connect(self.url()))
            .await
            .expect("connect to nats-server in time")
            .expect("connect to nats-server")
    }
}

/// A throwaway CA and a server certificate for 127.0.0.1, made with the `openssl` command.
pub struct TestCertificates {
    /// Holds the files; removed on drop.
    pub dir: tempfile::TempDir,
    /// The CA certificate clients trust.
    pub ca: PathBuf,
    /// The server's certificate (SAN IP:127.0.0.1) and key.
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl TestCertificates {
    pub fn make() -> TestCertificates {
        let openssl = binary("openssl", &[], "apt-get install openssl");
        let dir = tempfile::tempdir().unwrap();
        let at = |name: &str| dir.path().join(name).display().to_string();
        std::fs::write(
            dir.path().join("ext.cnf"),
            "subjectAltName=IP:127.0.0.1,DNS:localhost\n",
        )
        .unwrap();
        let steps: [Vec<String>; 3] = [
            vec![
                "req",
                "-x509",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-days",
                "1",
                "-subj",
                "/CN=test-ca",
                "-keyout",
                &at("ca.key"),
                "-out",
                &at("ca.pem"),
            ]
            .into_iter()
            .map(String::from)
            .collect(),
            vec![
                "req",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-subj",
                "/CN=127.0.0.1",
                "-keyout",
                &at("server.key"),
                "-out",
                &at("server.csr"),
            ]
            .into_iter()
            .map(String::from)
            .collect(),
            vec![
                "x509",
                "-req",
                "-days",
                "1",
                "-in",
                &at("server.csr"),
                "-CA",
                &at("ca.pem"),
                "-CAkey",
                &at("ca.key"),
                "-CAcreateserial",
                "-extfile",
                &at("ext.cnf"),
                "-out",
                &at("server.pem"),
            ]
            .into_iter()
            .map(String::from)
            .collect(),
        ];
        for args in steps {
            let out = Command::new(&openssl)
                .args(&args)
                .stdin(Stdio::null())
                .output()
                .expect("run openssl");
            assert!(
                out.status.success(),
                "openssl {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        TestCertificates {
            ca: dir.path().join("ca.pem"),
            cert: dir.path().join("server.pem"),
            key: dir.path().join("server.key"),
            dir,
        }
    }
}

/// A real Kafka-protocol broker: tansu with in-memory storage.
pub struct KafkaBroker {
    /// Keeps the broker running for as long as the handle lives.
    process: Process,
    /// Where it listens (and advertises itself) on 127.0.0.1.
    pub port: u16,
}

impl KafkaBroker {
    pub async fn start() -> KafkaBroker {
        let home = std::env::var_os("HOME")
            .map(PathBuf::from)
            .unwrap_or_default();
        let bin = binary(
            "tansu",
            &[home.join(".cargo/bin/tansu")],
            "cargo install tansu --locked --features dynostore",
        );
        let port = free_port();
        let dir = tempfile::tempdir().unwrap();
        let listener = format!("tcp://127.0.0.1:{port}");
        let args = tansu_args(&listener);
        let (mut process, log) = spawn(&bin, &args, dir);
        wait_for_port(port, &mut process.child, &log, "tansu broker").await;
        KafkaBroker { process, port }
    }

    pub fn bootstrap(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Creates topics (tansu does not auto-create them) with the rdkafka admin client.
    pub async fn create_topics(&self, topics: &[(&str, i32)]) {
        use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
        use rdkafka::client::DefaultClientContext;
        let admin: AdminClient<DefaultClientContext> = rdkafka::ClientConfig::new()
            .set("bootstrap.servers", self.bootstrap())
            .create()
            .expect("admin client");
        let new: Vec<NewTopic> = topics
            .iter()
            .map(|(name, partitions)| NewTopic::new(name, *partitions, TopicReplication::Fixed(1)))
            .collect();
        let results = tokio::time::timeout(
            START_TIMEOUT,
            admin.create_topics(&new, &AdminOptions::new()),
        )
        .await
        .expect("create topics in time")
        .expect("create topics");
        for result in results {
            result.unwrap_or_else(|(topic, code)| panic!("creating topic {topic}: {code:?}"));
        }
    }

    /// An independent consumer reading `topic`'s partitions from the beginning.
    pub fn consumer(&self, topic: &str, partitions: i32) -> rdkafka::consumer::StreamConsumer {
        kafka_consumer(&self.bootstrap(), topic, partitions)
    }
}

/// An independent consumer reading `topic`'s partitions at `bootstrap` from the beginning.
pub fn kafka_consumer(
    bootstrap: &str,
    topic: &str,
    partitions: i32,
) -> rdkafka::consumer::StreamConsumer {
    use rdkafka::consumer::Consumer;
    use rdkafka::{Offset, TopicPartitionList};
    let consumer: rdkafka::consumer::StreamConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", format!("test-reader-{}", free_port()))
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest")
        .create()
        .expect("consumer");
    let mut list = TopicPartitionList::new();
    for p in 0..partitions {
        list.add_partition_offset(topic, p, Offset::Beginning)
            .unwrap();
    }
    consumer.assign(&list).expect("assign partitions");
    consumer
}

/// The tansu command line for one in-memory broker on `listener`.
fn tansu_args(listener: &str) -> Vec<String> {
    [
        "broker",
        "--storage-engine",
        "memory://tansu/",
        "--listener-url",
        listener,
        "--advertised-listener-url",
        listener,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// One request as the receiver saw it.
#[derive(Debug, Clone)]
pub struct Received {
    /// To check the configured method is used.
    pub method: String,
    /// Rendered from the URL template.
    pub path: String,
    /// CloudEvents, custom and signature headers.
    pub headers: HeaderMap,
    /// Exactly as sent, for byte comparisons and signature checks.
    pub body: Bytes,
    /// Arrival time, to measure the pause before a retry.
    pub at: Instant,
}

/// What the receiver answers: status, extra headers.
pub type Answer = (StatusCode, Vec<(&'static str, String)>);

/// Decides the answer to a request from it and the answers given so far for its path.
pub type Responder = Arc<dyn Fn(&Received, usize) -> Answer + Send + Sync>;

/// A webhook receiver: records every request and answers as `responder` says.
pub struct Receiver {
    /// Where it listens.
    pub addr: SocketAddr,
    /// Every request so far, in arrival order.
    pub requests: Arc<Mutex<Vec<Received>>>,
    /// The accept loop, aborted on drop.
    task: tokio::task::JoinHandle<()>,
}

impl Receiver {
    pub async fn start(responder: Responder) -> Receiver {
        Receiver::start_on(0, responder).await
    }

    /// Starts on a given port (to bring up an endpoint a sink was already pointed at).
    pub async fn start_on(port: u16, responder: Responder) -> Receiver {
        let listener = TcpListener::bind(("127.0.0.1", port)).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let requests: Arc<Mutex<Vec<Received>>> = Arc::default();
        let seen = requests.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let seen = seen.clone();
                let responder = responder.clone();
                tokio::spawn(async move {
                    let service = service_fn(move |req: Request<hyper::body::Incoming>| {
                        let seen = seen.clone();
                        let responder = responder.clone();
                        async move {
                            let (parts, body) = req.into_parts();
                            let body = body
                                .collect()
                                .await
                                .map(|b| b.to_bytes())
                                .unwrap_or_default();
                            let received = Received {
                                method: parts.method.to_string(),
                                path: parts.uri.path().to_owned(),
                                headers: parts.headers,
                                body,
                                at: Instant::now(),
                            };
                            let (status, extra) = {
                                let mut all = seen.lock().unwrap();
                                let before = all.iter().filter(|r| r.path == received.path).count();
                                all.push(received.clone());
                                responder(&received, before)
                            };
                            let mut response = Response::new(Full::new(Bytes::new()));
                            *response.status_mut() = status;
                            for (name, value) in extra {
                                response.headers_mut().insert(name, value.parse().unwrap());
                            }
                            Ok::<_, Infallible>(response)
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Receiver {
            addr,
            requests,
            task,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    pub fn received(&self) -> Vec<Received> {
        self.requests.lock().unwrap().clone()
    }

    /// Waits (bounded) until at least `n` requests arrived.
    pub async fn wait_for(&self, n: usize, within: Duration) -> Vec<Received> {
        let deadline = Instant::now() + within;
        loop {
            let got = self.received();
            if got.len() >= n || Instant::now() > deadline {
                return got;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A config with one agent token on `cable_url` and the given `sinks:` and `routes:` YAML.
/// A config and the temporary folder of its spool (deleted when dropped: keep it alive as long
/// as the bridge runs).
pub fn config(cable_url: &str, sinks_and_routes: &str) -> (Config, tempfile::TempDir) {
    let spool = tempfile::Builder::new()
        .prefix("chatwoot-bridge-test-spool")
        .tempdir()
        .expect("a temporary folder");
    (
        config_with_spool(cable_url, sinks_and_routes, spool.path()),
        spool,
    )
}

/// A config with one agent token on `cable_url`, the given `sinks:` and `routes:` YAML, and its
/// spool in `spool` (only created when a bridge starts).
fn config_with_spool(cable_url: &str, sinks_and_routes: &str, spool: &Path) -> Config {
    let spool = serde_json::to_string(spool).unwrap();
    let yaml = format!(
        "chatwoot:\n  url: {cable_url}\ntokens:\n  - name: agent\n    pubsub_token: tok-agent\n    account_id: 1\n    user_id: 1\nshutdown_timeout: 20s\nspool: {{ dir: {spool} }}\n{sinks_and_routes}"
    );
    Config::from_yaml(&yaml, &|_| None, false).unwrap_or_else(|e| panic!("config: {e}\n{yaml}"))
}

/// The validated settings of a sink given as the YAML of one `sinks:` entry.
pub fn sink_kind(name: &str, sink_yaml: &str) -> SinkKind {
    let config = config_with_spool(
        "ws://127.0.0.1:9/cable",
        &format!(
            "sinks:\n  {name}: {sink_yaml}\nroutes:\n  - {{ name: all, match: {{}}, to: [{name}] }}\n"
        ),
        Path::new("unused-spool"),
    );
    config.sinks[name].kind.clone()
}

/// The limits of a sink driven by a test: far more than the few batches a test hands over.
const TEST_SINK_LIMITS: SinkLimits = SinkLimits {
    max_unconfirmed_events: 8192,
};

/// Builds the sink named `name` from the YAML of one `sinks:` entry.
pub async fn sink(name: &str, sink_yaml: &str) -> Sink {
    tokio::time::timeout(
        START_TIMEOUT,
        Sink::build(name, &sink_kind(name, sink_yaml), TEST_SINK_LIMITS),
    )
    .await
    .expect("sink built in time")
    .expect("sink builds")
}

/// Waits (polling, bounded by `limit`) until `condition` holds; fails the test naming `what`.
pub async fn until(what: &str, limit: Duration, mut condition: impl FnMut() -> bool) {
    let ok = tokio::time::timeout(limit, async {
        while !condition() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .is_ok();
    assert!(ok, "timed out waiting for {what}");
}

/// Runs `f` until `cond` holds, bounded.
pub async fn eventually<F, Fut>(within: Duration, mut f: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if f().await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    false
}

/// Answers from a fixed queue, then 200.
pub fn scripted(answers: Vec<Answer>) -> Responder {
    let queue = Arc::new(Mutex::new(VecDeque::from(answers)));
    Arc::new(move |_, _| {
        queue
            .lock()
            .unwrap()
            .pop_front()
            .unwrap_or((StatusCode::OK, vec![]))
    })
}
