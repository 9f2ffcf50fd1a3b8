//! Role `bare`: the bare reader and the bare pipes, the ceiling the bridge is held against.
//!
//! The reader parses each frame with serde (frame, then message) and publishes nothing; a pipe
//! publishes each event's data bytes to the sink and nothing else. Prints one `RESULT` line.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Result};
use futures_util::{SinkExt, StreamExt};
use rdkafka::error::KafkaError;
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord};
use rdkafka::types::RDKafkaErrorCode;
use tokio::sync::Semaphore;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

use crate::args::Args;
use crate::setup::kafka_linger_ms;
use crate::IDENTIFIER;

/// Bounds the Kafka pipe's list of pending delivery reports.
const KAFKA_PENDING: usize = 100_000;

/// Just enough of a frame to publish: the event's data bytes.
#[derive(serde::Deserialize)]
struct BareFrame<'a> {
    /// `welcome`, `ping`, `confirm_subscription`...; absent on a broadcast.
    #[serde(rename = "type", borrow, default)]
    kind: Option<&'a str>,
    /// A broadcast's message, left unparsed until the frame is known to be one.
    #[serde(borrow, default)]
    message: Option<&'a serde_json::value::RawValue>,
}

/// A broadcast's message.
#[derive(serde::Deserialize)]
struct BareMessage<'a> {
    /// The event's name: the subject's last part.
    #[serde(borrow)]
    event: &'a str,
    /// The event's data: the published bytes.
    #[serde(borrow)]
    data: &'a serde_json::value::RawValue,
}

/// Where the bare pipe publishes.
enum BareSink {
    Reader,
    Nats(async_nats::Client),
    JetStream {
        /// The JetStream context publishes go through.
        js: async_nats::jetstream::Context,
        /// Acks not yet awaited, oldest first.
        acks: VecDeque<async_nats::jetstream::context::PublishAckFuture>,
        /// Bounds `acks`: the sliding window of publishes in flight.
        in_flight: usize,
    },
    Kafka {
        /// Idempotent, `acks=all`, lz4: the bridge's defaults.
        producer: FutureProducer,
        /// Where every record goes.
        topic: String,
        /// Delivery reports not yet awaited, oldest first.
        pending: VecDeque<DeliveryFuture>,
    },
    Http {
        /// One pooled client for every POST.
        client: reqwest::Client,
        /// The consumer's webhook.
        url: String,
        /// One per request in flight.
        permits: Arc<Semaphore>,
        /// How many requests may be in flight: `finish` takes every permit.
        in_flight: u32,
    },
}

impl BareSink {
    /// Connects to the sink named by `--sink` at `--target`.
    async fn connect(args: &Args) -> Result<BareSink> {
        let url = args.str("target", "");
        Ok(match args.str("sink", "reader").as_str() {
            "reader" => BareSink::Reader,
            "nats" => BareSink::Nats(async_nats::connect(url.as_str()).await?),
            "jetstream" => BareSink::JetStream {
                js: async_nats::jetstream::new(async_nats::connect(url.as_str()).await?),
                acks: VecDeque::new(),
                in_flight: args.num("in-flight", 512),
            },
            "kafka" => BareSink::Kafka {
                producer: kafka_producer(&url)?,
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
                    permits: Arc::new(Semaphore::new(in_flight as usize)),
                    in_flight,
                }
            }
            other => bail!("unknown sink {other}"),
        })
    }

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
            } => produce(producer, topic, pending, data).await?,
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

    /// Waits until everything published is confirmed (flushed, acked, reported, answered).
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

/// An idempotent producer with the bridge's defaults (`acks=all`, lz4) and the bench's linger.
fn kafka_producer(brokers: &str) -> Result<FutureProducer> {
    let mut config = rdkafka::ClientConfig::new();
    config
        .set("bootstrap.servers", brokers)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("compression.type", "lz4");
    if let Some(ms) = kafka_linger_ms() {
        config.set("linger.ms", ms.to_string());
    }
    Ok(config.create()?)
}

/// Enqueues one record; when librdkafka's queue is full, awaits the oldest report first.
async fn produce(
    producer: &FutureProducer,
    topic: &str,
    pending: &mut VecDeque<DeliveryFuture>,
    data: &[u8],
) -> Result<()> {
    loop {
        let record = FutureRecord::to(topic).key("1:87").payload(data);
        match producer.send_result(record) {
            Ok(delivery) => {
                pending.push_back(delivery);
                // Keep the list short: drop reports already in.
                while pending.len() > KAFKA_PENDING {
                    let _ = pending.pop_front().expect("not empty").await;
                }
                return Ok(());
            }
            Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => {
                match pending.pop_front() {
                    Some(d) => {
                        let _ = d.await;
                    }
                    None => tokio::time::sleep(Duration::from_millis(1)).await,
                }
            }
            Err((e, _)) => bail!("produce: {e}"),
        }
    }
}

/// Reads `--count` broadcasts from `--cable` and publishes each one's data, then prints the
/// rate from the first broadcast to the last confirmation.
pub(crate) async fn run(args: Args) -> Result<()> {
    let count: u64 = args.num("count", 100_000);
    let mut sink = BareSink::connect(&args).await?;
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
