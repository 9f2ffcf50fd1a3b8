//! The Kafka consumer: creates the topic, reads it from the beginning with an rdkafka consumer.

use std::sync::Mutex;
use std::time::Duration;

use anyhow::{anyhow, Result};
use futures_util::StreamExt;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::Message as _;

use super::Patience;
use crate::args::Args;
use crate::tally::Tally;

/// Bounds the topic's creation.
const CREATE_TOPIC_WITHIN: Duration = Duration::from_secs(30);

pub(super) async fn consume(args: &Args, tally: &Mutex<Tally>, patience: Patience) -> Result<()> {
    let brokers = args.str("url", "127.0.0.1:9092");
    let topic = args.str("topic", "bench");
    create_topic(&brokers, &topic).await?;
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
        let wait = patience.next_wait(tally);
        tokio::select! {
            m = stream.next() => match m {
                Some(Ok(m)) => {
                    let mut t = tally.lock().expect("tally lock");
                    t.record(m.payload().unwrap_or_default());
                    if t.done() { break; }
                }
                Some(Err(e)) => eprintln!("consumer: {e}"),
                None => break,
            },
            _ = tokio::time::sleep(wait) => break,
            _ = tokio::time::sleep_until(patience.deadline) => break,
        }
    }
    Ok(())
}

/// One partition, one replica: the order the bench reads is the order the producer wrote.
async fn create_topic(brokers: &str, topic: &str) -> Result<()> {
    let admin: AdminClient<DefaultClientContext> = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()?;
    let created = tokio::time::timeout(
        CREATE_TOPIC_WITHIN,
        admin.create_topics(
            &[NewTopic::new(topic, 1, TopicReplication::Fixed(1))],
            &AdminOptions::new(),
        ),
    )
    .await??;
    for r in created {
        r.map_err(|(t, e)| anyhow!("create topic {t}: {e:?}"))?;
    }
    Ok(())
}
