//! Role `consumer`: subscribes to the sink, counts distinct events and their latencies, and
//! prints one `RESULT` line (see [`Tally::report`]).
//!
//! It prints `READY` (with the webhook's URL for `http`) once it is subscribed, ends when every
//! expected event arrived, after `--idle-ms` without one once one came, or at `--limit-s`.

mod http;
mod kafka;
mod nats;

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, Result};

use crate::args::Args;
use crate::tally::Tally;

/// When the consumer stops waiting.
#[derive(Clone, Copy)]
pub(crate) struct Patience {
    /// Ends the run this long after the latest message, once one came.
    pub(crate) idle: Duration,
    /// Ends the run this long after the start, whatever came.
    pub(crate) limit: Duration,
    /// `limit` as a point in time.
    pub(crate) deadline: tokio::time::Instant,
}

impl Patience {
    /// How long to wait for the next message: the whole limit until the first one came.
    pub(crate) fn next_wait(&self, tally: &Mutex<Tally>) -> Duration {
        if tally.lock().expect("tally lock").first.is_some() {
            self.idle
        } else {
            self.limit
        }
    }
}

pub(crate) async fn run(args: Args) -> Result<()> {
    let sink = args.str("sink", "nats");
    let tally = Arc::new(Mutex::new(Tally::new(
        args.num("expect", 100_000),
        args.num("warmup", 0),
    )));
    let limit = Duration::from_secs(args.num("limit-s", 300));
    let patience = Patience {
        idle: Duration::from_millis(args.num("idle-ms", 5000)),
        limit,
        deadline: tokio::time::Instant::now() + limit,
    };
    match sink.as_str() {
        "nats" | "jetstream" => nats::consume(&args, &sink, &tally, patience).await?,
        "kafka" => kafka::consume(&args, &tally, patience).await?,
        "http" => http::consume(&tally, patience).await?,
        other => bail!("unknown sink {other}"),
    }
    println!("{}", tally.lock().expect("tally lock").report());
    std::io::stdout().flush()?;
    Ok(())
}
