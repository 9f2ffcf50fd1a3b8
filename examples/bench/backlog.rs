//! Backlog: the sink is down while events arrive; then it comes back and the spool drains.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};

use crate::args::Args;
use crate::process::{bridge_binary, free_port, me, per_million, wait_port, Proc};
use crate::run::RunResult;
use crate::setup::{bridge_yaml, nats_server, nats_server_args};
use crate::STARTUP;

/// Bounds the spool for this scenario: 1,000,000 events of ~1.1 KB take 1.1 GB on disk.
const SPOOL_MAX_BYTES: u64 = 4 << 30;

/// Bounds the wait for the bridge to spool every event.
const SPOOL_WITHIN: Duration = Duration::from_secs(300);

/// How often the spool's size is read while it grows.
const SPOOL_POLL: Duration = Duration::from_millis(500);

/// How many polls in a row the spool must keep its size to count as complete.
const SPOOL_STILL_POLLS: u32 = 4;

/// Bounds the drain: from the broker's start to the consumer's `RESULT` line.
const DRAIN_WITHIN: Duration = Duration::from_secs(600);

/// The spool once it stopped growing.
struct Spooled {
    /// Its size on disk.
    bytes: u64,
    /// Seconds from the bridge's start until it stopped growing (the still polls left out).
    secs: f64,
}

/// Runs the scenario on `sink` (`nats` or `jetstream`) and prints its `BACKLOG` lines.
pub(crate) fn run(args: &Args, sink: &str, dir: &Path) -> Result<()> {
    if sink != "nats" && sink != "jetstream" {
        bail!("backlog runs with --sink nats or jetstream");
    }
    let count: u64 = args.num("count", 1_000_000);
    // The broker is started only after the bridge has spooled everything: until then nothing
    // listens on its port, and the sink is down.
    let port = free_port()?;
    let url = format!("nats://127.0.0.1:{port}");
    let (mock, bridge, spool) = start_bridge(count, sink, &url, dir)?;
    let spooled = wait_until_spooled(&spool)?;
    let at_spooled = bridge.usage();
    println!(
        "BACKLOG spooled {count} events with the sink down: spool {:.0} MB, in {:.1} s; bridge RSS now {:.1} MB, peak {:.1} MB",
        spooled.bytes as f64 / 1e6,
        spooled.secs,
        at_spooled.rss_mb,
        at_spooled.hwm_mb
    );
    let nats = start_nats(port, dir)?;
    let consumer = start_consumer(sink, &url, count, dir)?;
    let r = RunResult::parse(&consumer.wait_line("RESULT", DRAIN_WITHIN)?);
    let drained = bridge.usage();
    println!(
        "BACKLOG drained distinct={} of {count} at {:.0} ev/s (first to last receipt, {:.1} s); bridge peak RSS {:.1} MB (whole run)",
        r.f("distinct"),
        r.f("recv_rate"),
        r.f("recv_span_s"),
        drained.hwm_mb
    );
    let drain_cpu = drained.cpu_since(&at_spooled);
    println!(
        "BACKLOG bridge CPU: spooling {:.2} s ({:.2} s per million events), draining {drain_cpu:.2} s ({:.2} s per million events)",
        at_spooled.cpu_s,
        per_million(at_spooled.cpu_s, count as f64),
        per_million(drain_cpu, r.f("distinct"))
    );
    drop(consumer);
    drop(bridge);
    drop(nats);
    drop(mock);
    Ok(())
}

/// A mock server blasting `count` events, and the bridge reading it into a spool raised to
/// [`SPOOL_MAX_BYTES`] with its sink at `url`; and the spool's directory.
fn start_bridge(
    count: u64,
    sink: &str,
    url: &str,
    dir: &Path,
) -> Result<(Proc, Proc, std::path::PathBuf)> {
    let mock = Proc::spawn(
        "mock",
        &me()?,
        &["mock".into(), "--blast-count".into(), count.to_string()],
        &dir.join("backlog-mock.log"),
    )?;
    let cable = mock
        .wait_line("LISTEN ", STARTUP)?
        .trim_start_matches("LISTEN ")
        .to_owned();
    let spool = dir.join("backlog-spool");
    let config = dir.join("backlog.yaml");
    let yaml = bridge_yaml(&cable, sink, url, "", &spool, Some(SPOOL_MAX_BYTES));
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
    Ok((mock, bridge, spool))
}

/// Waits (bounded) until the spool stops growing: every event read and appended.
fn wait_until_spooled(spool: &Path) -> Result<Spooled> {
    let started = Instant::now();
    let mut last = 0u64;
    let mut still = 0;
    while started.elapsed() < SPOOL_WITHIN && still < SPOOL_STILL_POLLS {
        std::thread::sleep(SPOOL_POLL);
        let size = dir_size(spool);
        if size == last && size > 0 {
            still += 1;
        } else {
            still = 0;
        }
        last = size;
    }
    if still < SPOOL_STILL_POLLS {
        eprintln!("backlog: the spool still grew after {SPOOL_WITHIN:?}");
    }
    Ok(Spooled {
        bytes: last,
        secs: started.elapsed().as_secs_f64() - (SPOOL_POLL * SPOOL_STILL_POLLS).as_secs_f64(),
    })
}

/// nats-server with JetStream on `port`, its store in `dir`.
fn start_nats(port: u16, dir: &Path) -> Result<Proc> {
    let store = dir.join("backlog-nats");
    std::fs::create_dir_all(&store)?;
    let nats = Proc::spawn(
        "nats-server",
        &nats_server(),
        &nats_server_args(port, &store),
        &dir.join("backlog-nats.log"),
    )?;
    wait_port(port, STARTUP)?;
    Ok(nats)
}

/// The consumer of the drain, with a longer idle cutoff than a blast's.
fn start_consumer(sink: &str, url: &str, count: u64, dir: &Path) -> Result<Proc> {
    let args: Vec<String> = [
        "consumer",
        "--sink",
        sink,
        "--url",
        url,
        "--expect",
        &count.to_string(),
        "--idle-ms",
        "10000",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    Proc::spawn("consumer", &me()?, &args, &dir.join("backlog-consumer.log"))
}

/// The bytes of the regular files directly in `dir`.
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
