//! The scenarios that compare producers run by run: throughput, latency, python; and the
//! dispatch to the backlog.

use std::path::Path;

use anyhow::{bail, Result};

use crate::args::Args;
use crate::report::{self, Series, Table};
use crate::run::RunSpec;
use crate::setup::{start_broker, Broker};

/// What every scenario of one invocation shares.
struct Scenario<'a> {
    /// The command-line flags.
    args: &'a Args,
    /// The sink under test.
    sink: &'a str,
    /// How many times each variant runs.
    reps: usize,
    /// The broker, started once for every run.
    broker: Option<&'a Broker>,
    /// Where every run's files go.
    dir: &'a Path,
    /// The per-run table.
    table: Table<'a>,
}

impl Scenario<'_> {
    fn spec(&self, count: u64, rate: f64, warmup: u64, run: usize) -> RunSpec<'_> {
        RunSpec {
            sink: self.sink,
            broker: self.broker,
            count,
            rate,
            warmup,
            dir: self.dir,
            run,
        }
    }

    /// The bare pipe and the bridge (and, with `--with-reader`, the bare reader) as fast as they
    /// go, `reps` times; the ratio of their rates and their CPU per million events.
    fn throughput(&self) -> Result<()> {
        let count: u64 = self.args.num("count", 300_000);
        let variants: &[&str] = if self.args.has("with-reader") {
            &["reader", "bare", "bridge"]
        } else {
            &["bare", "bridge"]
        };
        let (mut ratios, mut bridge, mut bare) = (Vec::new(), Series::default(), Series::default());
        for run in 1..=self.reps {
            let spec = self.spec(count, 0.0, 0, run);
            let mut results = Vec::new();
            for variant in variants {
                let r = spec.once(variant)?;
                self.table.row(variant, run, &r);
                results.push(r);
            }
            let (bare_run, bridge_run) = (&results[results.len() - 2], &results[results.len() - 1]);
            let ratio = bridge_run.f("rate") / bare_run.f("rate");
            println!("RATIO sink={} run={run} bridge/bare={ratio:.2}", self.sink);
            report::cpu_line(self.sink, run, bridge_run, bare_run);
            ratios.push(ratio);
            bridge.push(bridge_run);
            bare.push(bare_run);
        }
        // Runs on shared cores scatter; the median of the runs is the figure to quote.
        if ratios.is_empty() {
            bail!("--reps 0: nothing measured");
        }
        report::throughput_summary(self.sink, &mut ratios, &mut bridge, &mut bare);
        Ok(())
    }

    /// The bare pipe and the bridge at a steady `--rate` for `--secs`, the first second left
    /// out of the percentiles as warm-up.
    fn latency(&self) -> Result<()> {
        let rate: f64 = self.args.num("rate", 2000.0);
        let secs: u64 = self.args.num("secs", 20);
        let (mut bridge, mut bare) = (Series::default(), Series::default());
        for run in 1..=self.reps {
            let spec = self.spec((rate as u64) * secs, rate, rate as u64, run);
            for (variant, series) in [("bare", &mut bare), ("bridge", &mut bridge)] {
                let r = spec.once(variant)?;
                self.table.row(variant, run, &r);
                series.push(&r);
            }
        }
        report::latency_summary(self.sink, "bare", &mut bare);
        report::latency_summary(self.sink, "bridge", &mut bridge);
        Ok(())
    }

    /// The minimal Python bridge, for context.
    fn python(&self) -> Result<()> {
        let count: u64 = self.args.num("count", 300_000);
        for run in 1..=self.reps {
            let r = self.spec(count, 0.0, 0, run).once("python")?;
            self.table.row("python", run, &r);
        }
        Ok(())
    }
}

/// Runs `scenario` (`throughput`, `latency`, `python` or `backlog`) on `--sink`.
pub(crate) fn run(scenario: &str, args: &Args) -> Result<()> {
    let sink = args.str("sink", "nats");
    if !matches!(sink.as_str(), "nats" | "jetstream" | "kafka" | "http") {
        bail!("unknown sink {sink}: nats, jetstream, kafka or http");
    }
    let reps: usize = args.num("reps", 2);
    let dir = tempfile::Builder::new().prefix("cwb-bench").tempdir()?;
    let broker = start_broker(&sink, dir.path())?;
    println!(
        "# scenario={scenario} sink={sink} reps={reps} logs={}",
        dir.path().display()
    );
    let table = Table {
        scenario,
        sink: &sink,
    };
    table.header();
    let s = Scenario {
        args,
        sink: &sink,
        reps,
        broker: broker.as_ref(),
        dir: dir.path(),
        table,
    };
    match scenario {
        "throughput" => s.throughput()?,
        "latency" => s.latency()?,
        "python" => s.python()?,
        "backlog" => crate::backlog::run(args, &sink, dir.path())?,
        other => bail!("unknown scenario {other}"),
    }
    drop(broker);
    if args.has("keep-logs") {
        let kept = dir.keep();
        println!("# logs kept in {}", kept.display());
    }
    Ok(())
}
