//! One measured run: a producer (`bridge`, `bare`, `reader` or `python`) against a fresh mock
//! server and consumer.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};

use crate::process::{bridge_binary, me, per_million, Proc, Usage};
use crate::setup::{bridge_yaml, Broker};
use crate::STARTUP;

/// Bounds a run: from the producer's start to the consumer's `RESULT` line.
const RUN_WITHIN: Duration = Duration::from_secs(300);

/// Bounds the consumer's start (a Kafka consumer creates its topic first).
const CONSUMER_READY_WITHIN: Duration = Duration::from_secs(60);

/// One measured run's outcome.
#[derive(Debug, Clone, Default)]
pub(crate) struct RunResult {
    /// The `key=value` pairs of the `RESULT` line (the consumer's, or the bare reader's).
    fields: BTreeMap<String, String>,
    /// The producer's memory and CPU time at the end of the run.
    pub(crate) usage: Usage,
    /// The producer's CPU seconds from its start to the end of the run.
    pub(crate) cpu_s: f64,
    /// Seconds from the producer's start to the `RESULT` line.
    pub(crate) wall_s: f64,
}

impl RunResult {
    /// The fields of a `RESULT key=value ...` line.
    pub(crate) fn parse(line: &str) -> RunResult {
        let fields = line
            .split_whitespace()
            .skip(1)
            .filter_map(|kv| kv.split_once('='))
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect();
        RunResult {
            fields,
            ..Default::default()
        }
    }

    /// A numeric field; NaN if absent.
    pub(crate) fn f(&self, key: &str) -> f64 {
        self.fields
            .get(key)
            .and_then(|v| v.parse().ok())
            .unwrap_or(f64::NAN)
    }

    /// The producer's CPU seconds per million distinct events delivered.
    pub(crate) fn cpu_per_million(&self) -> f64 {
        per_million(self.cpu_s, self.f("distinct"))
    }
}

/// What every run of one scenario shares, and the run's number.
pub(crate) struct RunSpec<'a> {
    /// `nats`, `jetstream`, `kafka` or `http`.
    pub(crate) sink: &'a str,
    /// The broker the sink publishes to (none for `http`: the consumer is the server).
    pub(crate) broker: Option<&'a Broker>,
    /// Events the mock sends, and the consumer expects.
    pub(crate) count: u64,
    /// Events per second the mock sends; 0: as fast as the socket takes them.
    pub(crate) rate: f64,
    /// Events at the start left out of the latency figures.
    pub(crate) warmup: u64,
    /// Where configs, spools and every child's stderr go.
    pub(crate) dir: &'a Path,
    /// The run's number, in file names.
    pub(crate) run: usize,
}

impl RunSpec<'_> {
    /// Runs `variant` once and measures it.
    pub(crate) fn once(&self, variant: &str) -> Result<RunResult> {
        let tag = format!("{variant}-{}-{}", self.sink, self.run);
        let topic = format!("bench-{tag}");
        let (mock, cable) = self.start_mock(&tag)?;
        let (consumer, target) = if variant == "reader" {
            (None, String::new())
        } else {
            let (consumer, target) = self.start_consumer(&tag, &topic)?;
            (Some(consumer), target)
        };
        let started = Instant::now();
        let producer = self.start_producer(variant, &tag, &cable, &target, &topic)?;
        let before = producer.usage();
        let line = match &consumer {
            Some(c) => c.wait_line("RESULT", RUN_WITHIN)?,
            None => producer.wait_line("RESULT", RUN_WITHIN)?,
        };
        let mut result = RunResult::parse(&line);
        result.wall_s = started.elapsed().as_secs_f64();
        result.usage = producer.usage();
        result.cpu_s = result.usage.cpu_since(&before);
        drop(producer);
        drop(consumer);
        drop(mock);
        Ok(result)
    }

    fn log(&self, tag: &str, role: &str) -> std::path::PathBuf {
        self.dir.join(format!("{tag}-{role}.log"))
    }

    /// A mock server that blasts `count` events at whoever subscribes; and its URL.
    fn start_mock(&self, tag: &str) -> Result<(Proc, String)> {
        let mut args = vec![
            "mock".to_string(),
            "--blast-count".into(),
            self.count.to_string(),
        ];
        if self.rate > 0.0 {
            args.extend(["--rate".into(), self.rate.to_string()]);
        }
        let mock = Proc::spawn("mock", &me()?, &args, &self.log(tag, "mock"))?;
        let cable = mock
            .wait_line("LISTEN ", STARTUP)?
            .trim_start_matches("LISTEN ")
            .to_owned();
        Ok((mock, cable))
    }

    /// A subscribed consumer; and where the producer publishes (the broker, or the webhook).
    fn start_consumer(&self, tag: &str, topic: &str) -> Result<(Proc, String)> {
        let mut args = vec![
            "consumer".to_string(),
            "--sink".into(),
            self.sink.into(),
            "--expect".into(),
            self.count.to_string(),
            "--warmup".into(),
            self.warmup.to_string(),
            "--topic".into(),
            topic.into(),
        ];
        if let Some(b) = self.broker {
            args.extend(["--url".into(), b.url.clone()]);
        }
        let consumer = Proc::spawn("consumer", &me()?, &args, &self.log(tag, "consumer"))?;
        let ready = consumer.wait_line("READY", CONSUMER_READY_WITHIN)?;
        let target = match self.broker {
            Some(b) => b.url.clone(),
            None => ready.trim_start_matches("READY ").to_owned(),
        };
        Ok((consumer, target))
    }

    fn start_producer(
        &self,
        variant: &str,
        tag: &str,
        cable: &str,
        target: &str,
        topic: &str,
    ) -> Result<Proc> {
        match variant {
            "bridge" => {
                let spool = self.dir.join(format!("{tag}-spool"));
                let config = self.dir.join(format!("{tag}.yaml"));
                let yaml = bridge_yaml(cable, self.sink, target, topic, &spool, None);
                std::fs::write(&config, yaml)?;
                start_bridge(&config, &self.log(tag, "bridge"))
            }
            "bare" | "reader" => {
                let sink = if variant == "reader" {
                    "reader"
                } else {
                    self.sink
                };
                let args: Vec<String> = [
                    "bare", "--sink", sink, "--cable", cable, "--target", target, "--topic", topic,
                    "--count",
                ]
                .iter()
                .map(|s| s.to_string())
                .chain([self.count.to_string()])
                .collect();
                Proc::spawn("bare", &me()?, &args, &self.log(tag, "bare"))
            }
            "python" => {
                let python = std::env::var("BENCH_PYTHON")
                    .unwrap_or_else(|_| "bench/venv/bin/python".into());
                let args = [
                    "bench/python_bridge.py".into(),
                    cable.into(),
                    target.into(),
                    self.count.to_string(),
                ];
                Proc::spawn(
                    "python",
                    Path::new(&python),
                    &args,
                    &self.log(tag, "python"),
                )
            }
            other => bail!("unknown variant {other}"),
        }
    }
}

/// The bridge on `config`; under `perf record` when `BENCH_PERF` names an output file (perf is
/// then the process measured, stopped with SIGINT so that it writes its data).
fn start_bridge(config: &Path, log: &Path) -> Result<Proc> {
    let mut argv = vec![
        "run".to_string(),
        "--config".into(),
        config.display().to_string(),
    ];
    match std::env::var("BENCH_PERF") {
        Ok(out) if !out.is_empty() => {
            let mut perf: Vec<String> = [
                "record",
                "-e",
                "cpu-clock",
                "-F",
                "2000",
                "--call-graph",
                "dwarf,16384",
                "-o",
            ]
            .iter()
            .map(|s| s.to_string())
            .collect();
            perf.push(out);
            perf.push("--".into());
            perf.push(bridge_binary()?.display().to_string());
            perf.append(&mut argv);
            Proc::spawn("perf", Path::new("perf"), &perf, log)
        }
        _ => Proc::spawn("bridge", &bridge_binary()?, &argv, log),
    }
}
