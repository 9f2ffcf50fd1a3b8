//! Scale: 10,000 token sockets on one bridge, idle, then a restart of the server.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Result};

use crate::args::Args;
use crate::process::{bridge_binary, free_port, me, Proc};
use crate::STARTUP;

/// Bounds the wait for every token to be subscribed, at the start and after the restart.
const SUBSCRIBED_WITHIN: Duration = Duration::from_secs(120);

/// How long the mock server is down between its stop and its restart.
const RESTART_GAP: Duration = Duration::from_millis(500);

/// The mock server's `STAT` line's counters.
struct Stat {
    /// Subscriptions streaming (confirmed).
    streaming: usize,
    /// Connections accepted since the server started.
    accepted: u64,
}

impl Stat {
    fn parse(line: &str) -> Stat {
        let field = |k: &str| {
            line.split_whitespace()
                .find_map(|kv| kv.strip_prefix(k))
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0)
        };
        Stat {
            streaming: field("streaming=") as usize,
            accepted: field("accepted="),
        }
    }
}

/// The mock server with its counters on, on a fixed address so that a restart takes the same.
struct ScaleMock<'a> {
    /// `127.0.0.1:<port>`.
    listen: String,
    /// Where its logs go.
    dir: &'a Path,
}

impl ScaleMock<'_> {
    fn start(&self, name: &str) -> Result<(Proc, String)> {
        let args = [
            "mock".into(),
            "--listen".into(),
            self.listen.clone(),
            "--stats".into(),
            "1".into(),
        ];
        let mock = Proc::spawn("mock", &me()?, &args, &self.dir.join(format!("{name}.log")))?;
        let cable = mock
            .wait_line("LISTEN ", STARTUP)?
            .trim_start_matches("LISTEN ")
            .to_owned();
        Ok((mock, cable))
    }
}

/// Runs the scenario and prints its `SCALE` lines.
pub(crate) fn run(args: &Args) -> Result<()> {
    let tokens: usize = args.num("tokens", 10_000);
    let observe = Duration::from_secs(args.num("observe-secs", 300));
    let dir = tempfile::Builder::new().prefix("cwb-scale").tempdir()?;
    let mocks = ScaleMock {
        listen: format!("127.0.0.1:{}", free_port()?),
        dir: dir.path(),
    };
    let (mock, cable) = mocks.start("scale-mock")?;
    let bridge = start_bridge(&cable, tokens, dir.path())?;
    let started = Instant::now();
    let (t_all, _) = all_streaming(&mock, tokens, started)?;
    println!("SCALE tokens={tokens} all subscribed {t_all:.1} s after the bridge started");
    idle_window(&mock, &bridge, observe)?;
    // Restart the mock server on the same port: TCP drops without a close frame, like a deploy.
    drop(mock);
    std::thread::sleep(RESTART_GAP);
    let restarted = Instant::now();
    let (mock, _) = mocks.start("scale-mock-2")?;
    let (t_back, curve) = all_streaming(&mock, tokens, restarted)?;
    println!(
        "SCALE restart: all {tokens} resubscribed {t_back:.1} s after the mock server came back"
    );
    print_histogram(&curve);
    let u = bridge.usage();
    println!(
        "SCALE after restart: bridge RSS {:.1} MB, peak {:.1} MB",
        u.rss_mb, u.hwm_mb
    );
    drop(bridge);
    drop(mock);
    Ok(())
}

/// The bridge with `tokens` tokens on `cable` and a file sink.
fn start_bridge(cable: &str, tokens: usize, dir: &Path) -> Result<Proc> {
    let spool = dir.join("spool");
    let out = dir.join("out.jsonl");
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
    let config = dir.join("scale.yaml");
    std::fs::write(&config, yaml)?;
    Proc::spawn(
        "bridge",
        &bridge_binary()?,
        &[
            "run".into(),
            "--config".into(),
            config.display().to_string(),
        ],
        &dir.join("scale-bridge.log"),
    )
}

/// Waits until `tokens` subscriptions stream; the seconds since `from` it took, and the
/// subscription count at each `STAT` line.
fn all_streaming(mock: &Proc, tokens: usize, from: Instant) -> Result<(f64, Vec<(f64, usize)>)> {
    let deadline = Instant::now() + SUBSCRIBED_WITHIN;
    let mut curve = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let line = mock.wait_line("STAT ", left.max(Duration::from_millis(1)))?;
        let t = from.elapsed().as_secs_f64();
        let n = Stat::parse(&line).streaming;
        curve.push((t, n));
        if n >= tokens {
            return Ok((t, curve));
        }
        if Instant::now() > deadline {
            bail!("only {n} of {tokens} subscribed after {SUBSCRIBED_WITHIN:?}");
        }
    }
}

/// Idle (pings only) for `observe`: the bridge's CPU over the window, its RSS, and the
/// connections the mock accepted meanwhile (reconnects).
fn idle_window(mock: &Proc, bridge: &Proc, observe: Duration) -> Result<()> {
    let accepted_before = latest_stat(mock)?.accepted;
    let u0 = bridge.usage();
    let t0 = Instant::now();
    let mut max_rss: f64 = u0.rss_mb;
    while t0.elapsed() < observe {
        std::thread::sleep(Duration::from_secs(1));
        max_rss = max_rss.max(bridge.usage().rss_mb);
    }
    let u1 = bridge.usage();
    let accepted_after = latest_stat(mock)?.accepted;
    let window = t0.elapsed().as_secs_f64();
    println!(
        "SCALE idle window {window:.0} s: bridge CPU {:.1}% of one core, RSS {:.1} MB (max {:.1}, peak since start {:.1}), reconnects during window {}",
        100.0 * u1.cpu_since(&u0) / window,
        u1.rss_mb,
        max_rss,
        u1.hwm_mb,
        accepted_after.saturating_sub(accepted_before)
    );
    Ok(())
}

/// Resubscriptions per second after the restart, as a bar chart.
fn print_histogram(curve: &[(f64, usize)]) {
    let mut prev = 0;
    let mut buckets: BTreeMap<u64, usize> = BTreeMap::new();
    for &(t, n) in curve {
        *buckets.entry(t as u64).or_default() += n.saturating_sub(prev);
        prev = n.max(prev);
    }
    println!("SCALE resubscriptions per second after the restart (second: count):");
    let peak = buckets.values().copied().max().unwrap_or(1).max(1);
    for (s, n) in &buckets {
        println!("  {s:>3} s {n:>6} {}", "#".repeat(n * 50 / peak));
    }
}

/// The newest `STAT` line: drain what queued up, else wait for the next.
fn latest_stat(mock: &Proc) -> Result<Stat> {
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
    if !line.contains("accepted=") {
        return Err(anyhow!("bad STAT line"));
    }
    Ok(Stat::parse(&line))
}
