//! Benchmarks: the bridge side by side with the bare pipe. See BENCHMARKS.md.
//!
//! One binary, several roles, each run as its own process by the orchestrator:
//!
//! ```text
//! bench throughput --sink nats|jetstream|kafka|http [--count N] [--reps R] [--with-reader 1]
//! bench latency    --sink nats|jetstream|kafka|http [--rate 2000] [--secs 20] [--reps R]
//! bench scale      [--tokens 10000] [--observe-secs 300]
//! bench backlog    [--sink nats|jetstream] [--count 1000000]
//! bench python     [--count N]          (needs bench/venv, see bench/python_bridge.py)
//! ```
//! Roles started by those: `mock` (the mock cable server in blast mode), `consumer` (counts
//! distinct events by `mock_seq`, measures latency from `mock_sent_at_us`), `bare` (the bare
//! reader and the bare pipes) and the real `chatwoot-bridge run` binary built beside this one.
//! Every child is killed when the orchestrator drops it; every wait is bounded.
//!
//! Modules, in the order a measurement uses them:
//! - [`args`]: the `--name value` flags every role reads.
//! - [`mock`]: the `mock` role, the cable server the producers read.
//! - [`bare`]: the `bare` role, the reader and the bare pipes the bridge is held against.
//! - [`consumer`]: the `consumer` role and its [`tally`] of distinct events and latencies.
//! - [`process`]: child processes, their CPU and memory from `/proc`, ports.
//! - [`setup`]: brokers and the bridge's YAML.
//! - [`run`]: one producer against a fresh mock and consumer.
//! - [`report`]: the tables and summary lines the orchestrator prints.
//! - [`orchestrate`], [`backlog`], [`scale`]: the scenarios.

mod args;
mod backlog;
mod bare;
mod consumer;
mod mock;
mod orchestrate;
mod process;
mod report;
mod run;
mod scale;
mod setup;
mod tally;

use std::time::{Duration, SystemTime};

use anyhow::Result;

use crate::args::Args;

/// The daemon's allocator, for the bare pipes and the consumer too: the bare pipe is the ceiling
/// the bridge is held against and the consumer shares the cores with it, so neither should lose
/// time in glibc's allocator (a sixth of the consumer's CPU with 10-header NATS messages).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// The identifier every benchmark client subscribes with.
const IDENTIFIER: &str =
    r#"{"channel":"RoomChannel","pubsub_token":"bench-token","account_id":1,"user_id":1}"#;

/// Bounds every wait for a child's first line (`LISTEN`, `READY`) and for a port to open.
const STARTUP: Duration = Duration::from_secs(20);

fn main() -> Result<()> {
    let argv: Vec<String> = std::env::args().skip(1).collect();
    let role = argv.first().cloned().unwrap_or_default();
    let args = Args::new(argv);
    match role.as_str() {
        "mock" => runtime()?.block_on(mock::run(args)),
        // One thread: the client's connection task and the counting loop hand every message
        // over without a cross-thread wake-up (with two workers the consumer spent a fifth of
        // its CPU switching threads, and took a core from the producer it measures).
        "consumer" => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
            .block_on(consumer::run(args)),
        "bare" => runtime()?.block_on(bare::run(args)),
        "throughput" | "latency" | "backlog" | "python" => orchestrate::run(&role, &args),
        "scale" => scale::run(&args),
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

/// Microseconds since the epoch: the clock `mock_sent_at_us` is read against.
fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}
