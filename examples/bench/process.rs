//! Child processes, their CPU time and memory from `/proc`, and loopback ports.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};

/// The unit of `utime` and `stime` in `/proc/<pid>/stat` (`USER_HZ`, 100 on Linux's ABI).
const CLOCK_TICKS_PER_SECOND: f64 = 100.0;

/// Bounds how long `perf record` may take to write its data after SIGINT.
const PERF_STOP_WITHIN: Duration = Duration::from_secs(30);

/// A child process, killed and reaped on drop; its stdout lines arrive on a channel.
pub(crate) struct Proc {
    /// The role, in error messages; `perf` is stopped with SIGINT so that it writes its data.
    name: String,
    /// The process itself.
    child: Child,
    /// Its stdout, line by line, from a reader thread.
    pub(crate) lines: mpsc::Receiver<String>,
}

impl Proc {
    /// Starts `program` with `args`, stdin piped (closing it stops the roles of this binary),
    /// stderr into `log`.
    pub(crate) fn spawn(name: &str, program: &Path, args: &[String], log: &Path) -> Result<Proc> {
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
    pub(crate) fn wait_line(&self, prefix: &str, within: Duration) -> Result<String> {
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

    /// Peak RSS, current RSS and CPU time so far. A child that exited stays a zombie until it
    /// is dropped: its CPU time still reads, its memory reads 0.
    pub(crate) fn usage(&self) -> Usage {
        Usage::of(self.child.id())
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if self.name == "perf" {
            // perf writes its data on SIGINT; SIGKILL would lose it.
            let _ = Command::new("kill")
                .args(["-INT", &self.child.id().to_string()])
                .status();
            let deadline = Instant::now() + PERF_STOP_WITHIN;
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

/// A process's memory and CPU time at one moment, from `/proc/<pid>/status` and `stat`.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Usage {
    /// Peak resident set (VmHWM), MB.
    pub(crate) hwm_mb: f64,
    /// Resident set now (VmRSS), MB.
    pub(crate) rss_mb: f64,
    /// User plus system CPU seconds since the process started, all its threads.
    pub(crate) cpu_s: f64,
}

impl Usage {
    pub(crate) fn of(pid: u32) -> Usage {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        let kb = |key: &str| {
            status
                .lines()
                .find(|l| l.starts_with(key))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse::<f64>().ok())
                .unwrap_or(0.0)
        };
        Usage {
            hwm_mb: kb("VmHWM:") / 1024.0,
            rss_mb: kb("VmRSS:") / 1024.0,
            cpu_s: cpu_seconds(pid),
        }
    }

    /// CPU seconds spent between `before` and this sample.
    pub(crate) fn cpu_since(&self, before: &Usage) -> f64 {
        (self.cpu_s - before.cpu_s).max(0.0)
    }
}

/// `utime + stime` of `/proc/<pid>/stat` in seconds; 0 if the process is gone.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // The fields after the command name (in parentheses, which may hold spaces): the first of
    // them is the state, the line's 3rd field, so utime (14th) and stime (15th) are 11 and 12.
    let after = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    (ticks(11) + ticks(12)) / CLOCK_TICKS_PER_SECOND
}

/// CPU seconds per million events: the figure that holds steadier than a rate on shared cores.
pub(crate) fn per_million(cpu_s: f64, events: f64) -> f64 {
    if events > 0.0 {
        cpu_s * 1e6 / events
    } else {
        f64::NAN
    }
}

/// This binary: every role runs as another process of it.
pub(crate) fn me() -> Result<PathBuf> {
    Ok(std::env::current_exe()?)
}

/// The daemon measured: `BENCH_BRIDGE` if set (another build, for an A/B with the same harness),
/// else the release binary built beside this example (`target/release/chatwoot-bridge`).
pub(crate) fn bridge_binary() -> Result<PathBuf> {
    let bin = match std::env::var_os("BENCH_BRIDGE") {
        Some(path) => PathBuf::from(path),
        None => me()?
            .parent()
            .and_then(Path::parent)
            .map(|d| d.join("chatwoot-bridge"))
            .ok_or_else(|| anyhow!("no target dir"))?,
    };
    if !bin.is_file() {
        bail!(
            "{} is missing: cargo build --release --bin chatwoot-bridge",
            bin.display()
        );
    }
    Ok(bin)
}

/// A loopback port free at the time of asking.
pub(crate) fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

pub(crate) fn wait_port(port: u16, within: Duration) -> Result<()> {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    bail!("port {port} not open within {within:?}")
}
