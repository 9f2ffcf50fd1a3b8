//! The chaos run: `scripts/chaos.sh [MINUTES]` streams numbered events from the mock Chatwoot to
//! three tokens, the bridge delivers them to JetStream, Kafka (tansu) and a webhook receiver,
//! and a loop kills (`kill -9`) and restarts the mock, nats-server, tansu, the receiver and the
//! bridge at random, and fills the spool's disk once. At the end this binary checks, per sink,
//! that every event that reached the spool was delivered or dead-lettered.
//!
//! One binary, several roles, each run as its own process by the script:
//!
//! ```text
//! chaos receiver --listen ADDR --record FILE       the webhook destination (receiver)
//! chaos tap --spool DIR --ledger FILE --stop-file F   what reached the spool (tap)
//! chaos check --run DIR --spool DIR --nats URL --kafka ADDR   the summary line (check)
//! chaos free-ports | create-topic | drained        small steps of the script (ops)
//! ```
//! Run without a role (as `cargo test` does, with libtest's arguments), it is the test: 45
//! seconds of chaos (about a minute in all) by the script, with this binary as its helper and
//! the bridge cargo built, passing when the summary says nothing was lost.
//!
//! Modules: [`args`], [`receiver`], [`tap`] and its [`ledger`], [`readback`] of the
//! destinations, the script's [`timeline`], the [`check`], and the [`ops`].

mod args;
mod check;
mod ledger;
mod ops;
mod readback;
mod receiver;
mod tap;
mod timeline;

use std::process::{Command, ExitCode};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{bail, Context, Result};

use crate::args::Args;

/// The test's name, for `--list` and filters.
const TEST_NAME: &str = "a_chaos_run_loses_nothing_that_reached_the_spool";

/// How long the test's chaos lasts, in minutes: 45 s, about a minute with the script's
/// start-up, drain and check, which the test suite can afford.
const TEST_MINUTES: &str = "0.75";

/// Bounds the whole test run, however the script behaves.
const TEST_WITHIN: Duration = Duration::from_secs(300);

fn main() -> ExitCode {
    let argv: Vec<String> = std::env::args().skip(1).collect();
    let role = argv.first().cloned().unwrap_or_default();
    let args = Args::new(argv.iter().skip(1).cloned().collect());
    let outcome = match role.as_str() {
        "receiver" => runtime().and_then(|rt| rt.block_on(receiver::run(&args))),
        "tap" => tap::run(&args),
        "check" => match runtime().and_then(|rt| rt.block_on(check::run(&args))) {
            Ok(true) => Ok(()),
            Ok(false) => return ExitCode::FAILURE,
            Err(e) => Err(e),
        },
        "free-ports" => ops::free_ports(&args),
        "create-topic" => runtime().and_then(|rt| rt.block_on(ops::create_topic(&args))),
        "drained" => ops::drained(&args),
        _ => return as_test(&argv),
    };
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("chaos {role}: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?)
}

/// Milliseconds since the epoch: the clock of the ledger, the record and the timeline.
pub(crate) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// The mock's `mock_seq` in an event's data, which the mock writes first: `{"mock_seq":N,...`.
pub(crate) fn mock_seq(data: &str) -> Option<u64> {
    let rest = &data[data.find("\"mock_seq\":")? + "\"mock_seq\":".len()..];
    let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
    rest[..digits].parse().ok()
}

/// The test, as libtest would run it: `--list` lists it, a filter that does not match it runs
/// nothing (as for every other test), anything else runs it.
fn as_test(argv: &[String]) -> ExitCode {
    if argv.iter().any(|a| a == "--list") {
        println!("{TEST_NAME}: test");
        return ExitCode::SUCCESS;
    }
    let filters = libtest_filters(argv);
    let exact = argv.iter().any(|a| a == "--exact");
    let selected = filters.is_empty()
        || filters.iter().any(|f| {
            if exact {
                f == TEST_NAME
            } else {
                TEST_NAME.contains(f.as_str())
            }
        });
    // The run is never marked to be skipped, so `--ignored` selects nothing here.
    if !selected || argv.iter().any(|a| a == "--ignored") {
        println!("\nrunning 0 tests\n\ntest result: ok. 0 passed; 0 failed; 0 ignored; 0 measured; 1 filtered out\n");
        return ExitCode::SUCCESS;
    }
    println!("\nrunning 1 test");
    match run_script() {
        Ok(summary) => {
            println!("{summary}");
            println!("test {TEST_NAME} ... ok\n\ntest result: ok. 1 passed; 0 failed; 0 ignored; 0 measured; 0 filtered out\n");
            ExitCode::SUCCESS
        }
        Err(e) => {
            println!("test {TEST_NAME} ... FAILED\n\n{e:#}\n\ntest result: FAILED. 0 passed; 1 failed; 0 ignored; 0 measured; 0 filtered out\n");
            ExitCode::FAILURE
        }
    }
}

/// libtest's positional arguments (test name filters), leaving out the values of its options.
fn libtest_filters(argv: &[String]) -> Vec<String> {
    const WITH_VALUE: [&str; 7] = [
        "--test-threads",
        "--skip",
        "--format",
        "--color",
        "--logfile",
        "-Z",
        "--shuffle-seed",
    ];
    let mut filters = Vec::new();
    let mut args = argv.iter();
    while let Some(arg) = args.next() {
        if WITH_VALUE.contains(&arg.as_str()) {
            args.next();
        } else if !arg.starts_with('-') {
            filters.push(arg.clone());
        }
    }
    filters
}

/// Runs `scripts/chaos.sh` for [`TEST_MINUTES`] with this binary as its helper; the summary
/// line when it says nothing was lost.
fn run_script() -> Result<String> {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/chaos.sh");
    let started = Instant::now();
    let mut child = Command::new(script)
        .arg(TEST_MINUTES)
        .env("CHAOS_BRIDGE", env!("CARGO_BIN_EXE_chatwoot-bridge"))
        .env("CHAOS_HELPER", std::env::current_exe()?)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot run {script}"))?;
    let stdout = child.stdout.take().expect("stdout is piped");
    // Read on a thread, so the deadline below holds even if the script stops writing.
    let reader = std::thread::spawn(move || std::io::read_to_string(stdout));
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if started.elapsed() > TEST_WITHIN {
            stop_script(&mut child);
            bail!("{script} did not finish within {TEST_WITHIN:?}");
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let out = reader.join().expect("the reader thread does not panic")?;
    let summary = out
        .lines()
        .rfind(|l| l.starts_with("chaos "))
        .unwrap_or("")
        .to_owned();
    if !status.success() || !summary.ends_with("| nothing lost") {
        bail!(
            "{script} {TEST_MINUTES} failed ({status}) after {:?}:\n{out}",
            started.elapsed()
        );
    }
    Ok(format!(
        "{summary} ({:.0} s in all)",
        started.elapsed().as_secs_f64()
    ))
}

/// Bounds the script's own clean-up after a SIGTERM.
const CLEAN_UP_WITHIN: Duration = Duration::from_secs(30);

/// SIGTERM, so the script's trap stops what it started and unmounts the spool's disk; SIGKILL
/// if it has not ended after [`CLEAN_UP_WITHIN`].
fn stop_script(child: &mut std::process::Child) {
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let asked = Instant::now();
    while asked.elapsed() < CLEAN_UP_WITHIN {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let _ = child.kill();
    let _ = child.wait();
}
