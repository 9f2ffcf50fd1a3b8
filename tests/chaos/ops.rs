//! The script's small roles: free ports, the Kafka topic, waiting for the bridge to drain.
//!
//! ```text
//! free-ports --count N                      N free loopback ports, one per line
//! create-topic --kafka HOST:PORT --partitions P   the topic, retried until the broker answers
//! drained --spool DIR --within SECONDS      until every sink's backlog in sinks.json is 0
//! ```

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Result};
use serde::Deserialize;

use crate::args::Args;
use crate::check::TOPIC;

/// Prints `--count` ports nobody listens on right now (the OS picks them).
pub(crate) fn free_ports(args: &Args) -> Result<()> {
    let count: usize = args.num("count", 1)?;
    // All bound at once, so the OS hands out distinct ports.
    let listeners = (0..count)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0"))
        .collect::<std::io::Result<Vec<_>>>()?;
    for listener in &listeners {
        println!("{}", listener.local_addr()?.port());
    }
    Ok(())
}

/// Bounds the wait for a starting broker to create the topic.
const CREATE_WITHIN: Duration = Duration::from_secs(60);

/// Creates the chaos topic (tansu does not create topics on use); an existing one is fine.
pub(crate) async fn create_topic(args: &Args) -> Result<()> {
    use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
    use rdkafka::client::DefaultClientContext;
    use rdkafka::types::RDKafkaErrorCode;
    let bootstrap = args.required("kafka")?;
    let partitions: i32 = args.num("partitions", 3)?;
    let admin: AdminClient<DefaultClientContext> = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .create()?;
    let deadline = Instant::now() + CREATE_WITHIN;
    loop {
        let topic = NewTopic::new(TOPIC, partitions, TopicReplication::Fixed(1));
        let attempt = tokio::time::timeout(
            Duration::from_secs(10),
            admin.create_topics(&[topic], &AdminOptions::new()),
        )
        .await;
        let error = match attempt {
            Ok(Ok(results)) => match results.into_iter().next() {
                Some(Ok(_)) => return Ok(()),
                Some(Err((_, RDKafkaErrorCode::TopicAlreadyExists))) => return Ok(()),
                Some(Err((_, code))) => anyhow!("{code:?}"),
                None => anyhow!("no answer for the topic"),
            },
            Ok(Err(e)) => anyhow!(e),
            Err(_) => anyhow!("no answer within 10 s"),
        };
        if Instant::now() > deadline {
            bail!("cannot create topic {TOPIC} at {bootstrap}: {error}");
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// The part of `sinks.json` that says how far behind each sink is.
#[derive(Deserialize)]
struct State {
    /// The seq the next record gets.
    next_seq: u64,
    /// Each sink's cursor.
    sinks: Vec<SinkState>,
}

/// One sink's cursor in `sinks.json`.
#[derive(Deserialize)]
struct SinkState {
    /// The sink's name, for the message when it does not drain.
    name: String,
    /// Every record up to this seq is done for it.
    committed: u64,
    /// Records routed to it after `committed`: 0 is drained.
    pending: u64,
}

/// How long the state must stay drained: `sinks.json` is written a quarter second after
/// commits, so two looks a second apart that agree are the settled state.
const SETTLE: Duration = Duration::from_secs(1);

/// Waits until every sink's backlog is 0 in the spool's `sinks.json`, twice in a row.
pub(crate) fn drained(args: &Args) -> Result<()> {
    let spool = args.path("spool")?;
    let within = Duration::from_secs(args.num("within", 120)?);
    let deadline = Instant::now() + within;
    let mut drained_at: Option<u64> = None;
    loop {
        let state = read_state(&spool);
        let done = match &state {
            Ok(s) => s.sinks.iter().all(|k| k.pending == 0),
            Err(_) => false,
        };
        match (&state, done) {
            (Ok(s), true) if drained_at == Some(s.next_seq) => return Ok(()),
            (Ok(s), true) => drained_at = Some(s.next_seq),
            _ => drained_at = None,
        }
        if Instant::now() > deadline {
            let what = match state {
                Ok(s) => s
                    .sinks
                    .iter()
                    .map(|k| {
                        format!(
                            "{} committed {} with {} pending",
                            k.name, k.committed, k.pending
                        )
                    })
                    .collect::<Vec<_>>()
                    .join(", "),
                Err(e) => e.to_string(),
            };
            bail!("the sinks did not drain within {within:?}: {what}");
        }
        std::thread::sleep(SETTLE);
    }
}

fn read_state(spool: &Path) -> Result<State> {
    let text = std::fs::read(spool.join("sinks.json"))?;
    Ok(serde_json::from_slice(&text)?)
}
