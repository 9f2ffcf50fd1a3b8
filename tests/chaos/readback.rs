//! What each destination holds at the end, read back independently of the bridge: every copy
//! with its event id, token and time, from the JetStream stream, the Kafka topic, the webhook
//! receiver's record, and the sink's dead letters.

use std::collections::HashMap;
use std::io::BufRead;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use futures_util::StreamExt;

use crate::ledger::Key;
use crate::receiver::Received;

/// Bounds reading one destination back; a broker that stops answering fails the check.
const READ_WITHIN: Duration = Duration::from_secs(120);

/// How long the Kafka topic must stay quiet, once read to its high watermarks, for the read to
/// be complete.
const KAFKA_QUIET: Duration = Duration::from_secs(3);

/// Every copy a destination holds.
#[derive(Default)]
pub(crate) struct Deliveries {
    /// Each key's copies: when each arrived (ms since the epoch; Kafka: when it was produced),
    /// ascending.
    pub(crate) copies: HashMap<Key, Vec<u64>>,
    /// Messages without an event id or token header (never expected).
    pub(crate) unmatched: u64,
}

impl Deliveries {
    fn add(&mut self, id: String, token: String, at_ms: u64) {
        if id.is_empty() || token.is_empty() {
            self.unmatched += 1;
            return;
        }
        self.copies.entry((id, token)).or_default().push(at_ms);
    }

    fn sorted(mut self) -> Deliveries {
        for times in self.copies.values_mut() {
            times.sort_unstable();
        }
        self
    }
}

/// The webhook receiver's record.
pub(crate) fn webhook(record: &Path) -> Result<Deliveries> {
    let mut deliveries = Deliveries::default();
    let file = match std::fs::File::open(record) {
        Ok(file) => file,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(deliveries),
        Err(e) => return Err(e).with_context(|| format!("cannot open {}", record.display())),
    };
    for (n, line) in std::io::BufReader::new(file).lines().enumerate() {
        let line = line?;
        let received: Received = serde_json::from_str(&line)
            .with_context(|| format!("{}:{}: not a record line", record.display(), n + 1))?;
        deliveries.add(received.id, received.token, received.at_ms);
    }
    Ok(deliveries.sorted())
}

/// Every message of the JetStream `stream`, with the time the server stored it.
pub(crate) async fn jetstream(url: &str, stream: &str) -> Result<Deliveries> {
    use async_nats::jetstream::consumer::{pull::OrderedConfig, DeliverPolicy};
    let client = async_nats::connect(url)
        .await
        .with_context(|| format!("cannot connect to {url}"))?;
    let js = async_nats::jetstream::new(client);
    let mut stream = js
        .get_stream(stream)
        .await
        .map_err(|e| anyhow!("stream {stream}: {e}"))?;
    let last = stream
        .info()
        .await
        .map_err(|e| anyhow!("stream info: {e}"))?
        .state
        .last_sequence;
    let mut deliveries = Deliveries::default();
    if last == 0 {
        return Ok(deliveries);
    }
    let consumer = stream
        .create_consumer(OrderedConfig {
            deliver_policy: DeliverPolicy::All,
            ..OrderedConfig::default()
        })
        .await
        .map_err(|e| anyhow!("ordered consumer: {e}"))?;
    let mut messages = consumer
        .messages()
        .await
        .map_err(|e| anyhow!("reading the stream: {e}"))?;
    let deadline = Instant::now() + READ_WITHIN;
    loop {
        let Ok(next) = tokio::time::timeout_at(deadline.into(), messages.next()).await else {
            bail!("JetStream: not every message read within {READ_WITHIN:?}");
        };
        let message = next
            .ok_or_else(|| anyhow!("JetStream: the stream of messages ended"))?
            .map_err(|e| anyhow!("JetStream: {e}"))?;
        let info = message.info().map_err(|e| anyhow!("JetStream: {e}"))?;
        let header = |name: &str| {
            message
                .headers
                .as_ref()
                .and_then(|h| h.get(name))
                .map(|v| v.as_str().to_owned())
                .unwrap_or_default()
        };
        let at_ms = (info.published.unix_timestamp_nanos() / 1_000_000) as u64;
        deliveries.add(header("ce-id"), header("ce-chatwoottoken"), at_ms);
        if info.stream_sequence >= last {
            return Ok(deliveries.sorted());
        }
    }
}

/// Every message of every partition of the Kafka `topic`, with its producer timestamp.
pub(crate) fn kafka(bootstrap: &str, topic: &str) -> Result<Deliveries> {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    use rdkafka::message::Message;
    use rdkafka::{Offset, TopicPartitionList};
    let consumer: BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", format!("chaos-check-{}", std::process::id()))
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest")
        // Big fetches without waiting: the whole topic is there to be read.
        .set("fetch.wait.max.ms", "10")
        .set("max.partition.fetch.bytes", "16777216")
        .set("fetch.max.bytes", "52428800")
        .create()?;
    let metadata = consumer.fetch_metadata(Some(topic), Duration::from_secs(30))?;
    let partitions = metadata
        .topics()
        .first()
        .map(|t| t.partitions().len())
        .unwrap_or(0) as i32;
    if partitions == 0 {
        bail!("Kafka: topic {topic} has no partitions");
    }
    let mut list = TopicPartitionList::new();
    // Per partition, the high watermark: the offset to read up to at least.
    let mut ends = HashMap::new();
    for p in 0..partitions {
        ends.insert(
            p,
            consumer
                .fetch_watermarks(topic, p, Duration::from_secs(30))?
                .1,
        );
        list.add_partition_offset(topic, p, Offset::Beginning)?;
    }
    consumer.assign(&list)?;
    let mut deliveries = Deliveries::default();
    // Per partition, the next offset to be read.
    let mut next: HashMap<i32, i64> = (0..partitions).map(|p| (p, 0)).collect();
    let deadline = Instant::now() + READ_WITHIN;
    let mut last_message = Instant::now();
    // tansu 0.6 reports a high watermark one past the first record of the partition's last
    // batch, not past its last record: read on until the topic has been quiet for a while.
    while (0..partitions).any(|p| next[&p] < ends[&p]) || last_message.elapsed() < KAFKA_QUIET {
        if Instant::now() > deadline {
            bail!("Kafka: not every message read within {READ_WITHIN:?}");
        }
        let Some(message) = consumer.poll(Duration::from_millis(200)) else {
            continue;
        };
        let message = message?;
        let (id, token) = kafka_key(&message);
        let at_ms = message.timestamp().to_millis().unwrap_or(0).max(0) as u64;
        deliveries.add(id, token, at_ms);
        next.insert(message.partition(), message.offset() + 1);
        last_message = Instant::now();
    }
    Ok(deliveries.sorted())
}

/// A Kafka message's event id and token, from its `ce_` headers.
fn kafka_key(message: &rdkafka::message::BorrowedMessage<'_>) -> (String, String) {
    use rdkafka::message::{Headers, Message};
    let mut id = String::new();
    let mut token = String::new();
    if let Some(headers) = message.headers() {
        for header in headers.iter() {
            let value = String::from_utf8_lossy(header.value.unwrap_or_default()).into_owned();
            match header.key {
                "ce_id" => id = value,
                "ce_chatwoottoken" => token = value,
                _ => {}
            }
        }
    }
    (id, token)
}

/// The dead letters of `sink`, as deliveries (a dead letter accounts for its event).
pub(crate) fn dead_letters(spool_dir: &Path, sink: &str) -> Result<Deliveries> {
    let store = chatwoot_bridge::delivery::dead_letter::DeadLetters::open(spool_dir)?;
    let mut deliveries = Deliveries::default();
    store.each(sink, |letter| {
        let at_ms = letter
            .last_attempt
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        deliveries.add(
            letter.event.id.hex().as_str().to_owned(),
            letter.event.token.to_string(),
            at_ms,
        );
    })?;
    Ok(deliveries.sorted())
}
