//! The tables and summary lines the orchestrator prints. BENCHMARKS.md quotes them.

use crate::run::RunResult;

/// The per-run table of one scenario on one sink.
pub(crate) struct Table<'a> {
    /// `throughput`, `latency`, `python` or `backlog`.
    pub(crate) scenario: &'a str,
    /// The sink every row measured.
    pub(crate) sink: &'a str,
}

impl Table<'_> {
    pub(crate) fn header(&self) {
        println!("| scenario | variant | sink | run | events | distinct | ev/s | p50 ms | p99 ms | p99.9 ms | max ms | producer peak RSS MB | producer CPU s | producer CPU s per M events |");
        println!("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|");
    }

    pub(crate) fn row(&self, variant: &str, run: usize, r: &RunResult) {
        println!(
            "| {} | {variant} | {} | {run} | {} | {} | {:.0} | {:.3} | {:.3} | {:.3} | {:.3} | {:.1} | {:.2} | {:.2} |",
            self.scenario,
            self.sink,
            r.f("expect"),
            r.f("distinct"),
            r.f("rate"),
            r.f("p50_ms"),
            r.f("p99_ms"),
            r.f("p999_ms"),
            r.f("max_ms"),
            r.usage.hwm_mb,
            r.cpu_s,
            r.cpu_per_million()
        );
    }
}

/// The median (the mean of the middle two for an even count); None when empty. Sorts `values`.
pub(crate) fn median(values: &mut [f64]) -> Option<f64> {
    if values.is_empty() {
        return None;
    }
    values.sort_by(f64::total_cmp);
    let n = values.len();
    Some((values[(n - 1) / 2] + values[n / 2]) / 2.0)
}

/// The values with two decimals, space-separated (sorted if [`median`] sorted them).
pub(crate) fn listed(values: &[f64]) -> String {
    let listed: Vec<String> = values.iter().map(|r| format!("{r:.2}")).collect();
    listed.join(" ")
}

/// The figures of one variant over a scenario's runs, for its summary lines.
#[derive(Default)]
pub(crate) struct Series {
    /// Events per second.
    pub(crate) rates: Vec<f64>,
    /// Producer CPU seconds per million events.
    pub(crate) cpu_per_million: Vec<f64>,
    /// p50, p99 and p99.9 latencies, ms.
    pub(crate) p50: Vec<f64>,
    pub(crate) p99: Vec<f64>,
    pub(crate) p999: Vec<f64>,
}

impl Series {
    pub(crate) fn push(&mut self, r: &RunResult) {
        self.rates.push(r.f("rate"));
        self.cpu_per_million.push(r.cpu_per_million());
        self.p50.push(r.f("p50_ms"));
        self.p99.push(r.f("p99_ms"));
        self.p999.push(r.f("p999_ms"));
    }
}

/// `median (lowest to highest)` of `values`, with `decimals` places.
fn spread(values: &mut [f64], decimals: usize) -> String {
    match median(values) {
        Some(m) => format!(
            "{m:.decimals$} ({:.decimals$} to {:.decimals$})",
            values[0],
            values[values.len() - 1]
        ),
        None => "n/a".into(),
    }
}

/// After one throughput run: the bridge's and the bare pipe's CPU per million events.
pub(crate) fn cpu_line(sink: &str, run: usize, bridge: &RunResult, bare: &RunResult) {
    let (b, p) = (bridge.cpu_per_million(), bare.cpu_per_million());
    println!(
        "CPU sink={sink} run={run} bridge={b:.2} bare={p:.2} s per million events, bridge/bare={:.2}",
        b / p
    );
}

/// After the throughput runs: the median ratio (the figure to quote), then the median CPU per
/// million events of the bridge and the bare pipe, which scatters less than the rates.
pub(crate) fn throughput_summary(
    sink: &str,
    ratios: &mut [f64],
    bridge: &mut Series,
    bare: &mut Series,
) {
    let n = ratios.len();
    if let Some(m) = median(ratios) {
        println!(
            "RATIO sink={sink} median={m:.2} of {n} runs ({})",
            listed(ratios)
        );
    }
    println!(
        "CPU sink={sink} median of {n} runs, s per million events: bridge {}, bare {}",
        spread(&mut bridge.cpu_per_million, 2),
        spread(&mut bare.cpu_per_million, 2)
    );
}

/// After the latency runs: each variant's median percentiles, p99.9 beside p99.
pub(crate) fn latency_summary(sink: &str, variant: &str, series: &mut Series) {
    let n = series.p99.len();
    println!(
        "LATENCY sink={sink} variant={variant} median of {n} runs, ms: p50 {} p99 {} p99.9 {}; CPU s per million events {}",
        spread(&mut series.p50, 3),
        spread(&mut series.p99, 3),
        spread(&mut series.p999, 3),
        spread(&mut series.cpu_per_million, 2)
    );
}
