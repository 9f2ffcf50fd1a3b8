//! Benchmarks: the bridge side by side with the bare pipe. See BENCHMARKS.md.
//!
//! One binary, several roles, each run as its own process by the orchestrator:
//!
//! ```text
//! bench throughput --sink nats|jetstream|kafka|http [--count N] [--reps R]
//! bench latency    --sink nats|jetstream|kafka|http [--rate 2000] [--secs 20] [--reps R]
//! bench scale      [--tokens 10000] [--observe-secs 300]
//! bench backlog    [--count 1000000]
//! bench python     [--count N]          (needs bench/venv, see bench/python_bridge.py)
//! ```
//! Roles started by those: `mock` (the mock cable server in blast mode), `consumer` (counts
//! distinct events by `mock_seq`, measures latency from `mock_sent_at_us`), `bare` (the bare
//! reader and the bare pipes) and the real `chatwoot-bridge run` binary built beside this one.
//! Every child is killed when the orchestrator drops it; every wait is bounded.

use std::collections::{BTreeMap, VecDeque};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{anyhow, bail, Context, Result};
use futures_util::{FutureExt, SinkExt, StreamExt};

// ---------------------------------------------------------------------------------------------
// Arguments

struct Args(Vec<String>);

impl Args {
    fn get(&self, name: &str) -> Option<&str> {
        let flag = format!("--{name}");
        self.0
            .iter()
            .position(|a| *a == flag)
            .and_then(|i| self.0.get(i + 1))
            .map(String::as_str)
    }
    fn str(&self, name: &str, default: &str) -> String {
        self.get(name).unwrap_or(default).to_owned()
    }
    fn num<T: std::str::FromStr>(&self, name: &str, default: T) -> T {
        self.get(name)
            .and_then(|v| v.parse().ok())
            .unwrap_or(default)
    }
}

/// The daemon's allocator, for the bare pipes and the consumer too: the bare pipe is the ceiling
/// the bridge is held against and the consumer shares the cores with it, so neither should lose
/// time in glibc's allocator (a sixth of the consumer's CPU with 10-header NATS messages).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> Result<()> {
    let argv: Vec<String> = std::env::args().skip(1).collect();
    let role = argv.first().cloned().unwrap_or_default();
    let args = Args(argv);
    match role.as_str() {
        "mock" => runtime()?.block_on(mock_role(args)),
        // One thread: the client's connection task and the counting loop hand every message
        // over without a cross-thread wake-up (with two workers the consumer spent a fifth of
        // its CPU switching threads, and took a core from the producer it measures).
        "consumer" => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
            .block_on(consumer_role(args)),
        "bare" => runtime()?.block_on(bare_role(args)),
        "throughput" | "latency" | "backlog" | "python" => orchestrate(&role, args),
        "scale" => scale(args),
        _ => {
            eprintln!(
                "usage: bench throughput|latency|scale|backlog|python [--sink nats|jetstream|kafka|http] ..."
            );
            std::process::exit(2)
        }
    }
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?)
}

fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

/// The identifier every benchmark client subscribes with.
const IDENTIFIER: &str =
    r#"{"channel":"RoomChannel","pubsub_token":"bench-token","account_id":1,"user_id":1}"#;

// ---------------------------------------------------------------------------------------------
// Role: mock server

async fn mock_role(args: Args) -> Result<()> {
    use chatwoot_bridge::mock::{Answer, Blast, MockConfig, MockServer};
    let count: u64 = args.num("blast-count", 0);
    let rate: f64 = args.num("rate", 0.0);
    let listen = args.str("listen", "127.0.0.1:0").parse()?;
    let server = MockServer::start(MockConfig {
        listen,
        unknown_answer: Answer::Confirm,
        ping_interval: Duration::from_millis(args.num("ping-ms", 3000)),
        blast: (count > 0).then_some(Blast {
            count,
            rate: (rate > 0.0).then_some(rate),
            conversations: args.num("conversations", 64),
        }),
        ..MockConfig::default()
    })
    .await?;
    println!("LISTEN {}", server.url());
    let stats = args.get("stats").is_some();
    // Lives until stdin closes (the orchestrator drops it) or it is killed.
    let mut stdin = tokio::io::stdin();
    let mut buf = [0u8; 64];
    let started = Instant::now();
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    loop {
        use tokio::io::AsyncReadExt;
        tokio::select! {
            n = stdin.read(&mut buf) => if n.unwrap_or(0) == 0 { break },
            _ = tick.tick(), if stats => {
                println!("STAT t={:.3} streaming={} open={} accepted={}",
                    started.elapsed().as_secs_f64(), server.streaming_subscriptions(),
                    server.open_connections(), server.connections_accepted());
            }
        }
    }
    server.stop().await;
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Role: consumer

/// `mock_seq` and `mock_sent_at_us` from the start of an event's data (space-padded numbers).
fn seq_and_sent_at(payload: &[u8]) -> Option<(u64, u64)> {
    fn number_after(payload: &[u8], key: &[u8]) -> Option<u64> {
        // Binary mode: data starts the payload; structured mode: it follows ~450 bytes of
        // CloudEvents attributes.
        let head = &payload[..payload.len().min(1024)];
        let at = head.windows(key.len()).position(|w| w == key)? + key.len();
        let mut value = 0u64;
        let mut digits = 0;
        for &b in &head[at..] {
            match b {
                b' ' if digits == 0 => {}
                b'0'..=b'9' => {
                    value = value * 10 + (b - b'0') as u64;
                    digits += 1;
                }
                _ => break,
            }
        }
        (digits > 0).then_some(value)
    }
    Some((
        number_after(payload, b"\"mock_seq\":")?,
        number_after(payload, b"\"mock_sent_at_us\":")?,
    ))
}

/// Distinct events and their latencies.
struct Tally {
    expect: u64,
    /// Events below this sequence number are warm-up: counted, not in the latency figures.
    warmup: u64,
    seen: Vec<bool>,
    distinct: u64,
    received: u64,
    latencies_us: Vec<u32>,
    first: Option<Instant>,
    last: Instant,
    /// Earliest `mock_sent_at_us` and latest receipt (µs since the epoch): the rate is counted
    /// from the first send to the last receipt, so a sink that delivers in bursts (Kafka
    /// fetches) is not credited with its burst rate.
    first_sent_us: u64,
    last_received_us: u64,
}

impl Tally {
    fn new(expect: u64, warmup: u64) -> Tally {
        Tally {
            expect,
            warmup,
            seen: vec![false; expect as usize],
            distinct: 0,
            received: 0,
            latencies_us: Vec::with_capacity(expect as usize),
            first: None,
            last: Instant::now(),
            first_sent_us: u64::MAX,
            last_received_us: 0,
        }
    }

    fn record(&mut self, payload: &[u8]) {
        let now = now_us();
        let at = Instant::now();
        self.received += 1;
        self.first.get_or_insert(at);
        self.last = at;
        let Some((seq, sent_at)) = seq_and_sent_at(payload) else {
            return;
        };
        self.first_sent_us = self.first_sent_us.min(sent_at);
        self.last_received_us = now;
        if let Some(seen) = self.seen.get_mut(seq as usize) {
            if !*seen {
                *seen = true;
                self.distinct += 1;
                if seq >= self.warmup {
                    self.latencies_us
                        .push(now.saturating_sub(sent_at).min(u32::MAX as u64) as u32);
                }
            }
        }
    }

    fn done(&self) -> bool {
        self.distinct >= self.expect
    }

    fn report(&mut self) -> String {
        self.latencies_us.sort_unstable();
        let pct = |p: f64| -> f64 {
            if self.latencies_us.is_empty() {
                return f64::NAN;
            }
            let i = ((self.latencies_us.len() as f64 * p).ceil() as usize)
                .clamp(1, self.latencies_us.len())
                - 1;
            self.latencies_us[i] as f64 / 1000.0
        };
        let span = if self.last_received_us > self.first_sent_us {
            (self.last_received_us - self.first_sent_us) as f64 / 1e6
        } else {
            self.first
                .map(|f| self.last.duration_since(f).as_secs_f64())
                .unwrap_or(0.0)
        };
        let rate = if span > 0.0 {
            self.distinct as f64 / span
        } else {
            0.0
        };
        // First receipt to last receipt: how fast a backlog drains.
        let recv_span = self
            .first
            .map(|f| self.last.duration_since(f).as_secs_f64())
            .unwrap_or(0.0);
        let recv_rate = if recv_span > 0.0 {
            self.distinct as f64 / recv_span
        } else {
            0.0
        };
        format!(
            "RESULT recv_span_s={recv_span:.3} recv_rate={recv_rate:.0} distinct={} received={} expect={} span_s={:.3} rate={:.0} p50_ms={:.3} p99_ms={:.3} p999_ms={:.3} max_ms={:.3}",
            self.distinct,
            self.received,
            self.expect,
            span,
            rate,
            pct(0.5),
            pct(0.99),
            pct(0.999),
            pct(1.0)
        )
    }
}

async fn consumer_role(args: Args) -> Result<()> {
    let sink = args.str("sink", "nats");
    let expect: u64 = args.num("expect", 100_000);
    let warmup: u64 = args.num("warmup", 0);
    let idle = Duration::from_millis(args.num("idle-ms", 5000));
    let limit = Duration::from_secs(args.num("limit-s", 300));
    let tally = Arc::new(Mutex::new(Tally::new(expect, warmup)));
    let deadline = tokio::time::Instant::now() + limit;
    match sink.as_str() {
        "nats" | "jetstream" => {
            let url = args.str("url", "nats://127.0.0.1:4222");
            let client = async_nats::ConnectOptions::new()
                .subscription_capacity(1 << 20)
                .connect(url.as_str())
                .await?;
            if sink == "jetstream" {
                let js = async_nats::jetstream::new(client.clone());
                let _ = js.delete_stream("BENCH").await;
                js.create_stream(async_nats::jetstream::stream::Config {
                    name: "BENCH".into(),
                    subjects: vec!["bench.>".into()],
                    max_bytes: 4 << 30,
                    duplicate_window: Duration::from_secs(120),
                    ..Default::default()
                })
                .await
                .map_err(|e| anyhow!("create stream: {e}"))?;
            }
            if nats_consumer_reads_raw() {
                // The client was only needed to set the stream up.
                drop(client);
                let addr = url.trim_start_matches("nats://").to_owned();
                let counting = tally.clone();
                tokio::task::spawn_blocking(move || {
                    let mut tally = counting.lock().unwrap();
                    read_nats_raw(&addr, "bench.>", &mut tally, idle, limit)
                })
                .await??;
            } else {
                read_nats_client(&client, &tally, idle, limit, deadline).await?;
            }
        }
        "kafka" => {
            use rdkafka::consumer::{Consumer, StreamConsumer};
            use rdkafka::Message as _;
            let brokers = args.str("url", "127.0.0.1:9092");
            let topic = args.str("topic", "bench");
            {
                use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
                let admin: AdminClient<rdkafka::client::DefaultClientContext> =
                    rdkafka::ClientConfig::new()
                        .set("bootstrap.servers", &brokers)
                        .create()?;
                let created = tokio::time::timeout(
                    Duration::from_secs(30),
                    admin.create_topics(
                        &[NewTopic::new(&topic, 1, TopicReplication::Fixed(1))],
                        &AdminOptions::new(),
                    ),
                )
                .await??;
                for r in created {
                    r.map_err(|(t, e)| anyhow!("create topic {t}: {e:?}"))?;
                }
            }
            let consumer: StreamConsumer = rdkafka::ClientConfig::new()
                .set("bootstrap.servers", &brokers)
                .set("group.id", format!("bench-{}", std::process::id()))
                .set("enable.auto.commit", "false")
                .set("auto.offset.reset", "earliest")
                .set("fetch.wait.max.ms", "5")
                .set("fetch.min.bytes", "1")
                .create()?;
            let mut list = rdkafka::TopicPartitionList::new();
            list.add_partition_offset(&topic, 0, rdkafka::Offset::Beginning)?;
            consumer.assign(&list)?;
            println!("READY");
            let mut stream = consumer.stream();
            loop {
                let wait = if tally.lock().unwrap().first.is_some() {
                    idle
                } else {
                    limit
                };
                tokio::select! {
                    m = stream.next() => match m {
                        Some(Ok(m)) => {
                            let mut t = tally.lock().unwrap();
                            t.record(m.payload().unwrap_or_default());
                            if t.done() { break; }
                        }
                        Some(Err(e)) => eprintln!("consumer: {e}"),
                        None => break,
                    },
                    _ = tokio::time::sleep(wait) => break,
                    _ = tokio::time::sleep_until(deadline) => break,
                }
            }
        }
        "http" => {
            use http_body_util::{BodyExt, Full};
            use hyper::body::Bytes;
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
            println!("READY http://{}/hook", listener.local_addr()?);
            let done = Arc::new(tokio::sync::Notify::new());
            let activity = Arc::new(AtomicU64::new(0));
            {
                let (tally, done, activity) = (tally.clone(), done.clone(), activity.clone());
                tokio::spawn(async move {
                    while let Ok((stream, _)) = listener.accept().await {
                        let (tally, done, activity) =
                            (tally.clone(), done.clone(), activity.clone());
                        tokio::spawn(async move {
                            let service = hyper::service::service_fn(
                                move |req: hyper::Request<hyper::body::Incoming>| {
                                    let (tally, done, activity) =
                                        (tally.clone(), done.clone(), activity.clone());
                                    async move {
                                        let body = req
                                            .into_body()
                                            .collect()
                                            .await
                                            .map(|b| b.to_bytes())
                                            .unwrap_or_default();
                                        activity.fetch_add(1, Ordering::Relaxed);
                                        let mut t = tally.lock().unwrap();
                                        t.record(&body);
                                        if t.done() {
                                            done.notify_one();
                                        }
                                        Ok::<_, std::convert::Infallible>(hyper::Response::new(
                                            Full::new(Bytes::new()),
                                        ))
                                    }
                                },
                            );
                            let _ = hyper::server::conn::http1::Builder::new()
                                .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                                .await;
                        });
                    }
                });
            }
            let mut seen = 0;
            loop {
                tokio::select! {
                    _ = done.notified() => break,
                    _ = tokio::time::sleep_until(deadline) => break,
                    _ = tokio::time::sleep(idle) => {
                        let now = activity.load(Ordering::Relaxed);
                        if now == seen && now > 0 { break; }
                        seen = now;
                    }
                }
            }
        }
        other => bail!("unknown sink {other}"),
    }
    println!("{}", tally.lock().unwrap().report());
    std::io::stdout().flush()?;
    Ok(())
}

/// Counts the messages on `bench.>` with an async-nats subscription (`BENCH_NATS_CONSUMER=client`).
async fn read_nats_client(
    client: &async_nats::Client,
    tally: &Mutex<Tally>,
    idle: Duration,
    limit: Duration,
    deadline: tokio::time::Instant,
) -> Result<()> {
    let mut sub = client.subscribe("bench.>").await?;
    client.flush().await?;
    println!("READY");
    loop {
        let wait = if tally.lock().unwrap().first.is_some() {
            idle
        } else {
            limit
        };
        tokio::select! {
            m = sub.next() => match m {
                Some(m) => {
                    let mut t = tally.lock().unwrap();
                    t.record(&m.payload);
                    // Whatever else is ready, without two timers per message.
                    while let Some(Some(m)) = sub.next().now_or_never() {
                        t.record(&m.payload);
                    }
                    if t.done() { break; }
                }
                None => break,
            },
            _ = tokio::time::sleep(wait) => break,
            _ = tokio::time::sleep_until(deadline) => break,
        }
    }
    Ok(())
}

/// `BENCH_NATS_CONSUMER`: how the consumer reads NATS. `raw` (the default) reads the protocol
/// itself ([`read_nats_raw`]); `client` subscribes with async-nats.
fn nats_consumer_reads_raw() -> bool {
    match std::env::var("BENCH_NATS_CONSUMER").as_deref() {
        Ok("client") => false,
        Ok("raw") | Ok("") | Err(_) => true,
        Ok(other) => panic!("BENCH_NATS_CONSUMER={other}: expected raw or client"),
    }
}

/// A socket read that ended for its timeout (the consumer's idle or overall limit).
fn timed_out(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
    )
}

/// Counts the messages on `subject` by reading the NATS text protocol directly, skipping each
/// message's header block. The instrument's cost per message must not depend on the headers a
/// producer sends: async-nats parses every header into its `HeaderMap`, 40% of the consumer's
/// CPU with the bridge's 10 CloudEvents headers, a cost the bare pipe's headerless messages did
/// not carry. With that, the consumer was the slowest process of the backlog drain (a whole core
/// while the bridge used 0.9). Ends after `idle` without a message once one came, or at `limit`.
fn read_nats_raw(
    addr: &str,
    subject: &str,
    tally: &mut Tally,
    idle: Duration,
    limit: Duration,
) -> Result<()> {
    use std::io::Read;
    let deadline = Instant::now() + limit;
    let mut socket =
        std::net::TcpStream::connect(addr).with_context(|| format!("connect {addr}"))?;
    socket.set_nodelay(true)?;
    socket.set_read_timeout(Some(limit))?;
    let mut reader = BufReader::with_capacity(1 << 20, socket.try_clone()?);
    let mut line = Vec::with_capacity(256);
    reader.read_until(b'\n', &mut line)?;
    if !line.starts_with(b"INFO ") {
        bail!(
            "{addr} is not a NATS server: {}",
            String::from_utf8_lossy(&line)
        );
    }
    // The PONG answers the PING only after the SUB is registered: then the consumer is ready.
    write!(
        socket,
        "CONNECT {{\"verbose\":false,\"pedantic\":false,\"headers\":true,\"protocol\":1}}\r\nSUB {subject} 1\r\nPING\r\n"
    )?;
    let mut ready = false;
    let mut body = Vec::new();
    let mut idle_set = false;
    while !tally.done() && Instant::now() < deadline {
        if tally.first.is_some() && !idle_set {
            socket.set_read_timeout(Some(idle))?;
            idle_set = true;
        }
        line.clear();
        match reader.read_until(b'\n', &mut line) {
            Ok(0) => break,
            Ok(_) => {}
            Err(e) if timed_out(&e) => break,
            Err(e) => return Err(e.into()),
        }
        let text = std::str::from_utf8(&line)?.trim_end();
        match text.split(' ').next() {
            // MSG <subject> <sid> [reply] <bytes>; HMSG <subject> <sid> [reply] <header bytes> <total bytes>
            Some(op @ ("MSG" | "HMSG")) => {
                let numbers: Vec<usize> = text
                    .rsplit(' ')
                    .take(if op == "MSG" { 1 } else { 2 })
                    .map(str::parse)
                    .collect::<Result<_, _>>()
                    .with_context(|| format!("bad {op} line: {text}"))?;
                let (headers, total) = match numbers[..] {
                    [total] => (0, total),
                    [total, headers] => (headers, total),
                    _ => unreachable!("took one or two"),
                };
                if headers > total {
                    bail!("bad {op} line: {text}");
                }
                body.resize(total + 2, 0);
                match reader.read_exact(&mut body) {
                    Ok(()) => {}
                    // Idle in the middle of a message: report what was counted.
                    Err(e) if timed_out(&e) => break,
                    Err(e) => return Err(e.into()),
                }
                if !body.ends_with(b"\r\n") {
                    bail!(
                        "{op} of {total} bytes not followed by CRLF: out of step with the stream"
                    );
                }
                tally.record(&body[headers..total]);
            }
            Some("PING") => socket.write_all(b"PONG\r\n")?,
            Some("PONG") if !ready => {
                ready = true;
                println!("READY");
                std::io::stdout().flush()?;
            }
            Some("-ERR") => bail!("{addr}: {text}"),
            Some("+OK" | "INFO" | "PONG") => {}
            _ => bail!("unexpected line from {addr}: {text}"),
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Role: bare reader and bare pipes

/// Just enough of a frame to publish: the event's data bytes.
#[derive(serde::Deserialize)]
struct BareFrame<'a> {
    #[serde(rename = "type", borrow, default)]
    kind: Option<&'a str>,
    #[serde(borrow, default)]
    message: Option<&'a serde_json::value::RawValue>,
}

#[derive(serde::Deserialize)]
struct BareMessage<'a> {
    #[serde(borrow)]
    event: &'a str,
    #[serde(borrow)]
    data: &'a serde_json::value::RawValue,
}

/// Where the bare pipe publishes.
enum BareSink {
    Reader,
    Nats(async_nats::Client),
    JetStream {
        js: async_nats::jetstream::Context,
        acks: VecDeque<async_nats::jetstream::context::PublishAckFuture>,
        in_flight: usize,
    },
    Kafka {
        producer: rdkafka::producer::FutureProducer,
        topic: String,
        pending: VecDeque<rdkafka::producer::DeliveryFuture>,
    },
    Http {
        client: reqwest::Client,
        url: String,
        permits: Arc<tokio::sync::Semaphore>,
        in_flight: u32,
    },
}

impl BareSink {
    async fn publish(&mut self, event: &str, data: &[u8]) -> Result<()> {
        match self {
            BareSink::Reader => {}
            BareSink::Nats(client) => {
                client
                    .publish(
                        format!("bench.{event}"),
                        bytes::Bytes::copy_from_slice(data),
                    )
                    .await?;
            }
            BareSink::JetStream {
                js,
                acks,
                in_flight,
            } => {
                if acks.len() >= *in_flight {
                    acks.pop_front()
                        .expect("not empty")
                        .await
                        .map_err(|e| anyhow!("ack: {e}"))?;
                }
                let ack = js
                    .publish(
                        format!("bench.{event}"),
                        bytes::Bytes::copy_from_slice(data),
                    )
                    .await
                    .map_err(|e| anyhow!("publish: {e}"))?;
                acks.push_back(ack);
            }
            BareSink::Kafka {
                producer,
                topic,
                pending,
            } => loop {
                let record = rdkafka::producer::FutureRecord::to(topic.as_str())
                    .key("1:87")
                    .payload(data);
                match producer.send_result(record) {
                    Ok(delivery) => {
                        pending.push_back(delivery);
                        // Keep the list short: drop reports already in.
                        while pending.len() > 100_000 {
                            let _ = pending.pop_front().expect("not empty").await;
                        }
                        break;
                    }
                    Err((
                        rdkafka::error::KafkaError::MessageProduction(
                            rdkafka::types::RDKafkaErrorCode::QueueFull,
                        ),
                        _,
                    )) => match pending.pop_front() {
                        Some(d) => {
                            let _ = d.await;
                        }
                        None => tokio::time::sleep(Duration::from_millis(1)).await,
                    },
                    Err((e, _)) => bail!("produce: {e}"),
                }
            },
            BareSink::Http {
                client,
                url,
                permits,
                ..
            } => {
                let permit = permits.clone().acquire_owned().await?;
                let request = client
                    .post(url.as_str())
                    .header("content-type", "application/json")
                    .body(data.to_vec());
                tokio::spawn(async move {
                    let _ = request.send().await;
                    drop(permit);
                });
            }
        }
        Ok(())
    }

    async fn finish(&mut self) -> Result<()> {
        match self {
            BareSink::Reader => {}
            BareSink::Nats(client) => client.flush().await?,
            BareSink::JetStream { acks, .. } => {
                while let Some(ack) = acks.pop_front() {
                    ack.await.map_err(|e| anyhow!("ack: {e}"))?;
                }
            }
            BareSink::Kafka { pending, .. } => {
                while let Some(d) = pending.pop_front() {
                    let _ = d.await;
                }
            }
            BareSink::Http {
                permits, in_flight, ..
            } => {
                let _ = permits.acquire_many(*in_flight).await?;
            }
        }
        Ok(())
    }
}

async fn bare_role(args: Args) -> Result<()> {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    use tokio_tungstenite::tungstenite::Message;
    let count: u64 = args.num("count", 100_000);
    let url = args.str("target", "");
    let mut sink = match args.str("sink", "reader").as_str() {
        "reader" => BareSink::Reader,
        "nats" => BareSink::Nats(async_nats::connect(url.as_str()).await?),
        "jetstream" => BareSink::JetStream {
            js: async_nats::jetstream::new(async_nats::connect(url.as_str()).await?),
            acks: VecDeque::new(),
            in_flight: args.num("in-flight", 512),
        },
        "kafka" => BareSink::Kafka {
            producer: {
                let mut config = rdkafka::ClientConfig::new();
                config
                    .set("bootstrap.servers", &url)
                    .set("enable.idempotence", "true")
                    .set("acks", "all")
                    .set("compression.type", "lz4");
                if let Some(ms) = kafka_linger_ms() {
                    config.set("linger.ms", ms.to_string());
                }
                config.create()?
            },
            topic: args.str("topic", "bench"),
            pending: VecDeque::new(),
        },
        "http" => {
            let in_flight: u32 = args.num("in-flight", 8);
            BareSink::Http {
                client: reqwest::Client::builder()
                    .pool_max_idle_per_host(in_flight as usize)
                    .build()?,
                url,
                permits: Arc::new(tokio::sync::Semaphore::new(in_flight as usize)),
                in_flight,
            }
        }
        other => bail!("unknown sink {other}"),
    };
    let mut request = args.str("cable", "").into_client_request()?;
    request.headers_mut().insert(
        "Sec-WebSocket-Protocol",
        chatwoot_bridge::source::protocol::SUBPROTOCOL.parse()?,
    );
    let (mut ws, _) = tokio_tungstenite::connect_async(request).await?;
    let mut got = 0u64;
    let mut first: Option<Instant> = None;
    let limit = tokio::time::Instant::now() + Duration::from_secs(args.num("limit-s", 300));
    while got < count {
        let frame = tokio::select! {
            f = ws.next() => f,
            _ = tokio::time::sleep_until(limit) => break,
        };
        let text = match frame {
            Some(Ok(Message::Text(text))) => text,
            Some(Ok(_)) => continue,
            Some(Err(e)) => bail!("socket: {e}"),
            None => break,
        };
        let frame: BareFrame = serde_json::from_str(text.as_str())?;
        if let Some(message) = frame.message {
            if frame.kind.is_none() {
                let message: BareMessage = serde_json::from_str(message.get())?;
                first.get_or_insert_with(Instant::now);
                got += 1;
                sink.publish(message.event, message.data.get().as_bytes())
                    .await?;
            }
        } else if frame.kind == Some("welcome") {
            let subscribe = serde_json::json!({"command": "subscribe", "identifier": IDENTIFIER});
            ws.send(Message::text(subscribe.to_string())).await?;
        }
    }
    sink.finish().await?;
    let span = first.map(|f| f.elapsed().as_secs_f64()).unwrap_or(0.0);
    println!(
        "RESULT distinct={got} received={got} expect={count} span_s={span:.3} rate={:.0} p50_ms=NaN p99_ms=NaN p999_ms=NaN max_ms=NaN",
        if span > 0.0 { got as f64 / span } else { 0.0 }
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Child processes

/// A child process, killed and reaped on drop; its stdout lines arrive on a channel.
struct Proc {
    name: String,
    child: Child,
    lines: mpsc::Receiver<String>,
}

impl Proc {
    fn spawn(name: &str, program: &Path, args: &[String], log: &Path) -> Result<Proc> {
        let err = std::fs::File::create(log)?;
        let mut child = Command::new(program)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(err)
            .spawn()
            .with_context(|| format!("start {}", program.display()))?;
        let out = child.stdout.take().expect("piped");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Ok(Proc {
            name: name.into(),
            child,
            lines: rx,
        })
    }

    /// The next stdout line starting with `prefix`, within `within`.
    fn wait_line(&self, prefix: &str, within: Duration) -> Result<String> {
        let deadline = Instant::now() + within;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) if line.starts_with(prefix) => return Ok(line),
                Ok(_) => {}
                Err(_) => bail!("{}: no `{prefix}` line within {within:?}", self.name),
            }
        }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Peak RSS (MB), current RSS (MB) and CPU seconds so far, from /proc.
    fn usage(&self) -> Usage {
        usage_of(self.pid())
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if self.name == "perf" {
            // perf writes its data on SIGINT; SIGKILL would lose it.
            let _ = Command::new("kill")
                .args(["-INT", &self.child.id().to_string()])
                .status();
            let deadline = Instant::now() + Duration::from_secs(30);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = self.child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[derive(Debug, Clone, Copy, Default)]
struct Usage {
    hwm_mb: f64,
    rss_mb: f64,
    cpu_s: f64,
}

fn usage_of(pid: u32) -> Usage {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let kb = |key: &str| {
        status
            .lines()
            .find(|l| l.starts_with(key))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which is in parentheses): utime is 14th, stime 15th.
    let after = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    // fields[0] is the state (3rd field of the line): utime = 14th -> index 11.
    let hz = 100.0;
    Usage {
        hwm_mb: kb("VmHWM:") / 1024.0,
        rss_mb: kb("VmRSS:") / 1024.0,
        cpu_s: (ticks(11) + ticks(12)) / hz,
    }
}

fn me() -> Result<PathBuf> {
    Ok(std::env::current_exe()?)
}

/// The real daemon, built beside this example (`target/release/chatwoot-bridge`).
fn bridge_binary() -> Result<PathBuf> {
    let exe = me()?;
    let bin = exe
        .parent()
        .and_then(Path::parent)
        .map(|d| d.join("chatwoot-bridge"))
        .ok_or_else(|| anyhow!("no target dir"))?;
    if !bin.is_file() {
        bail!(
            "{} is missing: cargo build --release --bin chatwoot-bridge",
            bin.display()
        );
    }
    Ok(bin)
}

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

fn wait_port(port: u16, within: Duration) -> Result<()> {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    bail!("port {port} not open within {within:?}")
}

/// A broker process (nats-server or tansu) on a free port.
struct Broker {
    _proc: Proc,
    url: String,
}

fn start_broker(sink: &str, dir: &Path) -> Result<Option<Broker>> {
    let port = free_port()?;
    let (program, args, url): (PathBuf, Vec<String>, String) = match sink {
        "nats" | "jetstream" => (
            "nats-server".into(),
            [
                "-js",
                "-a",
                "127.0.0.1",
                "-p",
                &port.to_string(),
                "-sd",
                &dir.join("js").display().to_string(),
            ]
            .iter()
            .map(|s| s.to_string())
            .collect(),
            format!("nats://127.0.0.1:{port}"),
        ),
        "kafka" => {
            let home = std::env::var("HOME").unwrap_or_default();
            let listener = format!("tcp://127.0.0.1:{port}");
            (
                PathBuf::from(home).join(".cargo/bin/tansu"),
                [
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
                .collect(),
                format!("127.0.0.1:{port}"),
            )
        }
        _ => return Ok(None),
    };
    let proc = Proc::spawn(sink, &program, &args, &dir.join(format!("{sink}.log")))?;
    wait_port(port, Duration::from_secs(20))?;
    Ok(Some(Broker { _proc: proc, url }))
}

/// `BENCH_KAFKA_LINGER_MS`: librdkafka's `linger.ms` for the bare pipe and the bridge alike
/// (unset: librdkafka's default, 5 ms).
fn kafka_linger_ms() -> Option<u64> {
    std::env::var("BENCH_KAFKA_LINGER_MS")
        .ok()
        .and_then(|v| v.parse().ok())
}

/// The bridge's YAML for one token on `cable` and one sink.
fn bridge_yaml(cable: &str, sink: &str, target: &str, topic: &str, spool: &Path) -> String {
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
        _ => unreachable!(),
    };
    let sink_yaml = match bench_envelope() {
        Some(envelope) => format!(
            "{}, envelope: {envelope} }}",
            sink_yaml
                .strip_suffix('}')
                .expect("a flow mapping")
                .trim_end()
        ),
        None => sink_yaml,
    };
    format!(
        "chatwoot:\n  url: {cable}\ntokens:\n  - name: bench\n    pubsub_token: bench-token\n    account_id: 1\n    user_id: 1\nsinks:\n  out: {sink_yaml}\nroutes:\n  - {{ name: all, match: {{}}, to: [out] }}\nspool: {{ dir: \"{}\" }}\n",
        spool.display()
    )
}

/// `BENCH_ENVELOPE`: the bridge sink's `envelope` (`binary`, the default, or `structured`).
fn bench_envelope() -> Option<String> {
    std::env::var("BENCH_ENVELOPE")
        .ok()
        .filter(|e| !e.is_empty())
}

/// One measured run's outcome.
#[derive(Debug, Clone, Default)]
struct RunResult {
    fields: BTreeMap<String, String>,
    usage: Usage,
    wall_s: f64,
}

impl RunResult {
    fn parse(line: &str) -> RunResult {
        let fields = line
            .split_whitespace()
            .skip(1)
            .filter_map(|kv| kv.split_once('='))
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect();
        RunResult {
            fields,
            ..Default::default()
        }
    }
    fn f(&self, key: &str) -> f64 {
        self.fields
            .get(key)
            .and_then(|v| v.parse().ok())
            .unwrap_or(f64::NAN)
    }
}

/// Runs one producer (`bridge`, `bare`, `reader` or `python`) against a fresh mock and consumer.
#[allow(clippy::too_many_arguments)]
fn run_once(
    variant: &str,
    sink: &str,
    broker: Option<&Broker>,
    count: u64,
    rate: f64,
    warmup: u64,
    dir: &Path,
    run: usize,
) -> Result<RunResult> {
    let me = me()?;
    let tag = format!("{variant}-{sink}-{run}");
    let mut mock_args = vec![
        "mock".to_string(),
        "--blast-count".into(),
        count.to_string(),
    ];
    if rate > 0.0 {
        mock_args.extend(["--rate".into(), rate.to_string()]);
    }
    let mock = Proc::spawn(
        "mock",
        &me,
        &mock_args,
        &dir.join(format!("{tag}-mock.log")),
    )?;
    let cable = mock
        .wait_line("LISTEN ", Duration::from_secs(20))?
        .trim_start_matches("LISTEN ")
        .to_owned();
    let topic = format!("bench-{tag}");
    let measured_by_consumer = variant != "reader";
    let (consumer, target) = if measured_by_consumer {
        let mut args = vec![
            "consumer".to_string(),
            "--sink".into(),
            sink.into(),
            "--expect".into(),
            count.to_string(),
            "--warmup".into(),
            warmup.to_string(),
            "--topic".into(),
            topic.clone(),
        ];
        if let Some(b) = broker {
            args.extend(["--url".into(), b.url.clone()]);
        }
        let consumer = Proc::spawn(
            "consumer",
            &me,
            &args,
            &dir.join(format!("{tag}-consumer.log")),
        )?;
        let ready = consumer.wait_line("READY", Duration::from_secs(60))?;
        let target = match broker {
            Some(b) => b.url.clone(),
            None => ready.trim_start_matches("READY ").to_owned(),
        };
        (Some(consumer), target)
    } else {
        (None, String::new())
    };
    let started = Instant::now();
    let producer = match variant {
        "bridge" => {
            let spool = dir.join(format!("{tag}-spool"));
            let config = dir.join(format!("{tag}.yaml"));
            std::fs::write(&config, bridge_yaml(&cable, sink, &target, &topic, &spool))?;
            let mut argv = vec![
                "run".into(),
                "--config".into(),
                config.display().to_string(),
            ];
            match std::env::var("BENCH_PERF") {
                // Profile the bridge: `perf record` wraps it and is stopped with SIGINT.
                Ok(out) if !out.is_empty() => {
                    let mut perf: Vec<String> = [
                        "record",
                        "-e",
                        "cpu-clock",
                        "-F",
                        "2000",
                        "--call-graph",
                        "dwarf,16384",
                        "-o",
                    ]
                    .iter()
                    .map(|s| s.to_string())
                    .collect();
                    perf.push(out);
                    perf.push("--".into());
                    perf.push(bridge_binary()?.display().to_string());
                    perf.append(&mut argv);
                    Proc::spawn(
                        "perf",
                        Path::new("perf"),
                        &perf,
                        &dir.join(format!("{tag}-bridge.log")),
                    )?
                }
                _ => Proc::spawn(
                    "bridge",
                    &bridge_binary()?,
                    &argv,
                    &dir.join(format!("{tag}-bridge.log")),
                )?,
            }
        }
        "bare" | "reader" => Proc::spawn(
            "bare",
            &me,
            &[
                "bare".into(),
                "--sink".into(),
                if variant == "reader" {
                    "reader".into()
                } else {
                    sink.into()
                },
                "--cable".into(),
                cable.clone(),
                "--target".into(),
                target.clone(),
                "--topic".into(),
                topic.clone(),
                "--count".into(),
                count.to_string(),
            ],
            &dir.join(format!("{tag}-bare.log")),
        )?,
        "python" => {
            let python =
                std::env::var("BENCH_PYTHON").unwrap_or_else(|_| "bench/venv/bin/python".into());
            Proc::spawn(
                "python",
                Path::new(&python),
                &[
                    "bench/python_bridge.py".into(),
                    cable.clone(),
                    target.clone(),
                    count.to_string(),
                ],
                &dir.join(format!("{tag}-python.log")),
            )?
        }
        other => bail!("unknown variant {other}"),
    };
    let timeout = Duration::from_secs(300);
    let line = match &consumer {
        Some(c) => c.wait_line("RESULT", timeout)?,
        None => producer.wait_line("RESULT", timeout)?,
    };
    let mut result = RunResult::parse(&line);
    result.wall_s = started.elapsed().as_secs_f64();
    result.usage = producer.usage();
    drop(producer);
    drop(consumer);
    drop(mock);
    Ok(result)
}

fn orchestrate(scenario: &str, args: Args) -> Result<()> {
    let sink = args.str("sink", "nats");
    let reps: usize = args.num("reps", 2);
    let dir = tempfile::Builder::new().prefix("cwb-bench").tempdir()?;
    let broker = start_broker(&sink, dir.path())?;
    println!(
        "# scenario={scenario} sink={sink} reps={reps} logs={}",
        dir.path().display()
    );
    let header = "| scenario | variant | sink | run | events | distinct | ev/s | p50 ms | p99 ms | p99.9 ms | max ms | producer peak RSS MB | producer CPU s |";
    println!("{header}");
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|---|");
    let row = |variant: &str, run: usize, r: &RunResult| {
        println!(
            "| {scenario} | {variant} | {sink} | {run} | {} | {} | {:.0} | {:.3} | {:.3} | {:.3} | {:.3} | {:.1} | {:.2} |",
            r.f("expect"),
            r.f("distinct"),
            r.f("rate"),
            r.f("p50_ms"),
            r.f("p99_ms"),
            r.f("p999_ms"),
            r.f("max_ms"),
            r.usage.hwm_mb,
            r.usage.cpu_s
        );
    };
    match scenario {
        "throughput" => {
            let count: u64 = args.num("count", 300_000);
            let mut ratios: Vec<f64> = Vec::new();
            for run in 1..=reps {
                let mut rates = BTreeMap::new();
                let variants: &[&str] = if args.get("with-reader").is_some() {
                    &["reader", "bare", "bridge"]
                } else {
                    &["bare", "bridge"]
                };
                for variant in variants {
                    let r = run_once(
                        variant,
                        &sink,
                        broker.as_ref(),
                        count,
                        0.0,
                        0,
                        dir.path(),
                        run,
                    )?;
                    row(variant, run, &r);
                    rates.insert(variant.to_string(), r.f("rate"));
                }
                let ratio = rates["bridge"] / rates["bare"];
                println!("RATIO sink={sink} run={run} bridge/bare={ratio:.2}");
                ratios.push(ratio);
            }
            // Runs on 2 shared cores scatter; the median of the runs is the figure to quote.
            if ratios.is_empty() {
                bail!("--reps 0: nothing measured");
            }
            ratios.sort_by(f64::total_cmp);
            let listed: Vec<String> = ratios.iter().map(|r| format!("{r:.2}")).collect();
            let n = ratios.len();
            println!(
                "RATIO sink={sink} median={:.2} of {n} runs ({})",
                (ratios[(n - 1) / 2] + ratios[n / 2]) / 2.0,
                listed.join(" ")
            );
        }
        "latency" => {
            let rate: f64 = args.num("rate", 2000.0);
            let secs: u64 = args.num("secs", 20);
            let count = (rate as u64) * secs;
            for run in 1..=reps {
                for variant in ["bare", "bridge"] {
                    let r = run_once(
                        variant,
                        &sink,
                        broker.as_ref(),
                        count,
                        rate,
                        rate as u64,
                        dir.path(),
                        run,
                    )?;
                    row(variant, run, &r);
                }
            }
        }
        "python" => {
            let count: u64 = args.num("count", 300_000);
            for run in 1..=reps {
                let r = run_once(
                    "python",
                    &sink,
                    broker.as_ref(),
                    count,
                    0.0,
                    0,
                    dir.path(),
                    run,
                )?;
                row("python", run, &r);
            }
        }
        "backlog" => backlog(&args, &sink, dir.path())?,
        _ => unreachable!(),
    }
    if args.get("keep-logs").is_some() {
        let kept = dir.keep();
        println!("# logs kept in {}", kept.display());
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Backlog: the sink is down while events arrive; then it comes back.

fn backlog(args: &Args, sink: &str, dir: &Path) -> Result<()> {
    if sink != "nats" && sink != "jetstream" {
        bail!("backlog runs with --sink nats or jetstream");
    }
    let count: u64 = args.num("count", 1_000_000);
    let me = me()?;
    // The broker is started only after the bridge has spooled everything.
    let port = free_port()?;
    let url = format!("nats://127.0.0.1:{port}");
    let mock = Proc::spawn(
        "mock",
        &me,
        &["mock".into(), "--blast-count".into(), count.to_string()],
        &dir.join("backlog-mock.log"),
    )?;
    let cable = mock
        .wait_line("LISTEN ", Duration::from_secs(20))?
        .trim_start_matches("LISTEN ")
        .to_owned();
    let spool = dir.join("backlog-spool");
    let config = dir.join("backlog.yaml");
    let mut yaml = bridge_yaml(&cable, sink, &url, "", &spool);
    yaml = yaml.replace(
        &format!("spool: {{ dir: \"{}\" }}", spool.display()),
        &format!(
            "spool: {{ dir: \"{}\", max_bytes: 4294967296 }}",
            spool.display()
        ),
    );
    std::fs::write(&config, yaml)?;
    let bridge = Proc::spawn(
        "bridge",
        &bridge_binary()?,
        &[
            "run".into(),
            "--config".into(),
            config.display().to_string(),
        ],
        &dir.join("backlog-bridge.log"),
    )?;
    let started = Instant::now();
    // Wait (bounded) until the spool stops growing: every event read and appended.
    let mut last = 0u64;
    let mut still = 0;
    let mut peak_rss: f64 = 0.0;
    while started.elapsed() < Duration::from_secs(300) {
        std::thread::sleep(Duration::from_millis(500));
        let size = dir_size(&spool);
        peak_rss = peak_rss.max(bridge.usage().rss_mb);
        if size == last && size > 0 {
            still += 1;
            if still >= 4 {
                break;
            }
        } else {
            still = 0;
        }
        last = size;
    }
    let spooled_s = started.elapsed().as_secs_f64() - 2.0;
    let u = bridge.usage();
    println!(
        "BACKLOG spooled {count} events with the sink down: spool {:.0} MB, in {spooled_s:.1} s; bridge RSS now {:.1} MB, peak {:.1} MB",
        last as f64 / 1e6,
        u.rss_mb,
        u.hwm_mb
    );
    // Bring the sink back with a consumer on it.
    let broker_dir = dir.join("backlog-nats");
    std::fs::create_dir_all(&broker_dir)?;
    let nats = Proc::spawn(
        "nats-server",
        Path::new("nats-server"),
        &[
            "-js".into(),
            "-a".into(),
            "127.0.0.1".into(),
            "-p".into(),
            port.to_string(),
            "-sd".into(),
            broker_dir.display().to_string(),
        ],
        &dir.join("backlog-nats.log"),
    )?;
    wait_port(port, Duration::from_secs(20))?;
    let consumer = Proc::spawn(
        "consumer",
        &me,
        &[
            "consumer".into(),
            "--sink".into(),
            sink.into(),
            "--url".into(),
            url.clone(),
            "--expect".into(),
            count.to_string(),
            "--idle-ms".into(),
            "10000".into(),
        ],
        &dir.join("backlog-consumer.log"),
    )?;
    let line = consumer.wait_line("RESULT", Duration::from_secs(600))?;
    let r = RunResult::parse(&line);
    let u = bridge.usage();
    println!(
        "BACKLOG drained distinct={} of {count} at {:.0} ev/s (first to last receipt, {:.1} s); bridge peak RSS {:.1} MB (whole run)",
        r.f("distinct"),
        r.f("recv_rate"),
        r.f("recv_span_s"),
        u.hwm_mb
    );
    drop(consumer);
    drop(bridge);
    drop(nats);
    drop(mock);
    Ok(())
}

fn dir_size(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .filter_map(|e| e.ok())
                .filter_map(|e| e.metadata().ok())
                .filter(|m| m.is_file())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0)
}

// ---------------------------------------------------------------------------------------------
// Scale: 10,000 token sockets

fn scale(args: Args) -> Result<()> {
    let tokens: usize = args.num("tokens", 10_000);
    let observe = Duration::from_secs(args.num("observe-secs", 300));
    let me = me()?;
    let dir = tempfile::Builder::new().prefix("cwb-scale").tempdir()?;
    let port = free_port()?;
    let listen = format!("127.0.0.1:{port}");
    let start_mock = |name: &str| -> Result<Proc> {
        Proc::spawn(
            "mock",
            &me,
            &[
                "mock".into(),
                "--listen".into(),
                listen.clone(),
                "--stats".into(),
                "1".into(),
            ],
            &dir.path().join(format!("{name}.log")),
        )
    };
    let mock = start_mock("scale-mock")?;
    let cable = mock
        .wait_line("LISTEN ", Duration::from_secs(20))?
        .trim_start_matches("LISTEN ")
        .to_owned();
    let spool = dir.path().join("spool");
    let out = dir.path().join("out.jsonl");
    let mut yaml = format!("chatwoot:\n  url: {cable}\ntokens:\n");
    for i in 0..tokens {
        yaml.push_str(&format!(
            "  - {{ name: t{i}, pubsub_token: tok-{i}, account_id: 1, user_id: {i} }}\n"
        ));
    }
    yaml.push_str(&format!(
        "sinks:\n  out: {{ type: file, path: \"{}\" }}\nroutes:\n  - {{ name: all, match: {{}}, to: [out] }}\nspool: {{ dir: \"{}\" }}\n",
        out.display(),
        spool.display()
    ));
    let config = dir.path().join("scale.yaml");
    std::fs::write(&config, yaml)?;
    let bridge = Proc::spawn(
        "bridge",
        &bridge_binary()?,
        &[
            "run".into(),
            "--config".into(),
            config.display().to_string(),
        ],
        &dir.path().join("scale-bridge.log"),
    )?;
    let started = Instant::now();
    let all_streaming =
        |mock: &Proc, within: Duration, from: Instant| -> Result<(f64, Vec<(f64, usize)>)> {
            let deadline = Instant::now() + within;
            let mut curve = Vec::new();
            loop {
                let left = deadline.saturating_duration_since(Instant::now());
                let line = mock.wait_line("STAT ", left.max(Duration::from_millis(1)))?;
                let field = |k: &str| {
                    line.split_whitespace()
                        .find_map(|kv| kv.strip_prefix(k))
                        .and_then(|v| v.parse::<usize>().ok())
                        .unwrap_or(0)
                };
                let t = from.elapsed().as_secs_f64();
                let n = field("streaming=");
                curve.push((t, n));
                if n >= tokens {
                    return Ok((t, curve));
                }
                if Instant::now() > deadline {
                    bail!("only {n} of {tokens} subscribed after {within:?}");
                }
            }
        };
    let (t_all, _) = all_streaming(&mock, Duration::from_secs(120), started)?;
    println!("SCALE tokens={tokens} all subscribed {t_all:.1} s after the bridge started");
    // Idle: pings only. CPU over the window, RSS at its end; reconnects from the mock's count.
    let accepted_before = mock_accepted(&mock)?;
    let u0 = bridge.usage();
    let t0 = Instant::now();
    let mut max_rss: f64 = u0.rss_mb;
    while t0.elapsed() < observe {
        std::thread::sleep(Duration::from_secs(1));
        max_rss = max_rss.max(bridge.usage().rss_mb);
    }
    let u1 = bridge.usage();
    let accepted_after = mock_accepted(&mock)?;
    let window = t0.elapsed().as_secs_f64();
    println!(
        "SCALE idle window {window:.0} s: bridge CPU {:.1}% of one core, RSS {:.1} MB (max {:.1}, peak since start {:.1}), reconnects during window {}",
        100.0 * (u1.cpu_s - u0.cpu_s) / window,
        u1.rss_mb,
        max_rss,
        u1.hwm_mb,
        accepted_after.saturating_sub(accepted_before)
    );
    // Restart the mock server on the same port.
    drop(mock);
    std::thread::sleep(Duration::from_millis(500));
    let restarted = Instant::now();
    let mock = start_mock("scale-mock-2")?;
    mock.wait_line("LISTEN ", Duration::from_secs(20))?;
    let (t_back, curve) = all_streaming(&mock, Duration::from_secs(120), restarted)?;
    println!(
        "SCALE restart: all {tokens} resubscribed {t_back:.1} s after the mock server came back"
    );
    // Histogram of resubscriptions per second.
    let mut prev = 0;
    let mut buckets: BTreeMap<u64, usize> = BTreeMap::new();
    for (t, n) in curve {
        *buckets.entry(t as u64).or_default() += n.saturating_sub(prev);
        prev = n.max(prev);
    }
    println!("SCALE resubscriptions per second after the restart (second: count):");
    let peak = buckets.values().copied().max().unwrap_or(1).max(1);
    for (s, n) in &buckets {
        println!("  {s:>3} s {n:>6} {}", "#".repeat(n * 50 / peak));
    }
    let u = bridge.usage();
    println!(
        "SCALE after restart: bridge RSS {:.1} MB, peak {:.1} MB",
        u.rss_mb, u.hwm_mb
    );
    drop(bridge);
    drop(mock);
    Ok(())
}

fn mock_accepted(mock: &Proc) -> Result<u64> {
    // The newest STAT line: drain what queued up, else wait for the next.
    let mut line = None;
    while let Ok(l) = mock.lines.try_recv() {
        if l.starts_with("STAT ") {
            line = Some(l);
        }
    }
    let line = match line {
        Some(l) => l,
        None => mock.wait_line("STAT ", Duration::from_secs(5))?,
    };
    line.split_whitespace()
        .find_map(|kv| kv.strip_prefix("accepted="))
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| anyhow!("bad STAT line"))
}
