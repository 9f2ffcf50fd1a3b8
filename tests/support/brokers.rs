//! Real servers for the sink tests: nats-server and a tansu Kafka broker, each on a free loopback
//! port, each stopped (killed and reaped) when dropped.
//!
//! A missing binary fails the test with how to install it: a skipped broker test would pass
//! while proving nothing.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::{free_port, within, POLL, WAIT};

/// Bounds one attempt to connect to a starting server's port.
const CONNECT_ATTEMPT: Duration = Duration::from_secs(1);

/// Finds `name` on PATH or in `extra` places; panics with the install command otherwise.
fn binary(name: &str, extra: &[PathBuf], install: &str) -> PathBuf {
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

/// Waits until `port` accepts TCP connections while `child` still runs, or panics after
/// [`WAIT`] with the server's log. A server that exited (a port taken meanwhile, for one) fails
/// here even when something else answers on its port.
async fn wait_for_port(port: u16, child: &mut Child, log: &Path, what: &str) {
    let deadline = Instant::now() + WAIT;
    loop {
        let connect = tokio::net::TcpStream::connect(("127.0.0.1", port));
        let accepted = matches!(
            tokio::time::timeout(CONNECT_ATTEMPT, connect).await,
            Ok(Ok(_))
        );
        if accepted && matches!(child.try_wait(), Ok(None)) {
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
                "{what} did not accept connections on 127.0.0.1:{port} within {WAIT:?}:\n{}",
                std::fs::read_to_string(log).unwrap_or_default()
            );
        }
        tokio::time::sleep(POLL).await;
    }
}

/// Whether every thread under `tasks` (a `/proc/PID/task` directory) is stopped by a signal:
/// the state after the command name in its `stat` is `T`.
fn every_thread_stopped(tasks: &Path) -> bool {
    let Ok(entries) = std::fs::read_dir(tasks) else {
        return false;
    };
    entries.flatten().all(|task| {
        std::fs::read_to_string(task.path().join("stat")).is_ok_and(|stat| {
            stat.rsplit_once(')')
                .is_some_and(|(_, rest)| rest.trim_start().starts_with('T'))
        })
    })
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
pub(crate) struct NatsServer {
    /// Keeps the server running for as long as the handle lives.
    process: Process,
    /// Where it listens on 127.0.0.1.
    pub port: u16,
}

impl NatsServer {
    /// Starts on a free port.
    pub(crate) async fn start() -> NatsServer {
        NatsServer::start_on(free_port()).await
    }

    /// Starts on a given port (to bring up a server a sink was already pointed at).
    pub(crate) async fn start_on(port: u16) -> NatsServer {
        NatsServer::start_with(port, &[]).await
    }

    /// Starts with extra command-line options (auth, for instance).
    pub(crate) async fn start_with(port: u16, extra: &[&str]) -> NatsServer {
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

    /// The URL clients connect to.
    pub(crate) fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// Freezes the server (SIGSTOP): its connections stay open and the kernel still takes what
    /// clients write, but nothing is read or answered, as with a server stuck in a long pause.
    pub(crate) fn pause(&self) {
        self.signal("-STOP");
        // SIGSTOP takes effect as each thread next runs: until all have stopped, the server
        // may still read (and answer) what the test sends next.
        let tasks = format!("/proc/{}/task", self.process.child.id());
        let deadline = Instant::now() + WAIT;
        while !every_thread_stopped(Path::new(&tasks)) {
            assert!(
                Instant::now() < deadline,
                "nats-server did not stop on SIGSTOP"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// Lets a paused server run again (SIGCONT).
    pub(crate) fn resume(&self) {
        self.signal("-CONT");
    }

    fn signal(&self, which: &str) {
        let status = Command::new("kill")
            .args([which, &self.process.child.id().to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill {which} nats-server: {status}");
    }

    /// An independent client for reading back.
    pub(crate) async fn client(&self) -> async_nats::Client {
        within(
            "a connection to nats-server",
            async_nats::connect(self.url()),
        )
        .await
        .expect("connect to nats-server")
    }

    /// A core subscription to `subject`, registered with the server before this returns.
    pub(crate) async fn subscribed(&self, subject: &str) -> async_nats::Subscriber {
        let reader = self.client().await;
        let subscription = within("a subscription", reader.subscribe(subject.to_owned()))
            .await
            .unwrap();
        within("the subscription flushed", reader.flush())
            .await
            .unwrap();
        subscription
    }

    /// Every message of the JetStream stream `stream`, in stored order: its subject and its
    /// data.
    pub(crate) async fn stored_messages(&self, stream: &str) -> Vec<(String, serde_json::Value)> {
        let js = async_nats::jetstream::new(self.client().await);
        let mut stream = within("the stream", js.get_stream(stream)).await.unwrap();
        let stored = within("the stream's info", stream.info())
            .await
            .unwrap()
            .state
            .messages;
        let mut messages = Vec::new();
        for n in 1..=stored {
            let message = within(&format!("stored message {n}"), stream.get_raw_message(n))
                .await
                .unwrap();
            let data = serde_json::from_slice(&message.payload).unwrap();
            messages.push((message.subject.to_string(), data));
        }
        messages
    }
}

/// A throwaway CA and a server certificate for 127.0.0.1, made with the `openssl` command.
pub(crate) struct TestCertificates {
    /// Holds the files; removed on drop.
    pub dir: tempfile::TempDir,
    /// The CA certificate clients trust.
    pub ca: PathBuf,
    /// The server's certificate (SAN IP:127.0.0.1).
    pub cert: PathBuf,
    /// The server certificate's private key.
    pub key: PathBuf,
}

impl TestCertificates {
    /// Makes the CA and the server certificate in a new temporary folder.
    pub(crate) fn make() -> TestCertificates {
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
pub(crate) struct KafkaBroker {
    /// Keeps the broker running for as long as the handle lives.
    process: Process,
    /// Where it listens (and advertises itself) on 127.0.0.1.
    pub port: u16,
}

impl KafkaBroker {
    /// Starts on a free port.
    pub(crate) async fn start() -> KafkaBroker {
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

    /// The `bootstrap.servers` of clients.
    pub(crate) fn bootstrap(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Creates topics (tansu does not auto-create them) with the rdkafka admin client.
    pub(crate) async fn create_topics(&self, topics: &[(&str, i32)]) {
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
        let results = within(
            "the broker to create topics",
            admin.create_topics(&new, &AdminOptions::new()),
        )
        .await
        .expect("create topics");
        for result in results {
            result.unwrap_or_else(|(topic, code)| panic!("creating topic {topic}: {code:?}"));
        }
    }

    /// An independent consumer reading `topic`'s partitions from the beginning.
    pub(crate) fn consumer(
        &self,
        topic: &str,
        partitions: i32,
    ) -> rdkafka::consumer::StreamConsumer {
        kafka_consumer(&self.bootstrap(), topic, partitions)
    }
}

/// An independent consumer reading `topic`'s partitions at `bootstrap` from the beginning.
pub(crate) fn kafka_consumer(
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
