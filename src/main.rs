//! The `chatwoot-bridge` command: a thin CLI over the library.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::Context;
use chatwoot_bridge::admin::client::{AdminClient, TapFilter, TopOptions};
use chatwoot_bridge::admin::ReloadRequest;
use chatwoot_bridge::bridge::{Drain, ShutdownReport};
use chatwoot_bridge::config::Config;
use chatwoot_bridge::delivery::dead_letter::DeadLetters;
use chatwoot_bridge::mock::{
    Answer, MockAccount, MockConfig, MockContact, MockContactInbox, MockRole, MockServer, MockTls,
    MockToken, MockUser,
};
use chatwoot_bridge::notify::{Notice, Notifier};
use chatwoot_bridge::status::StatusBoard;
use clap::{Parser, Subcommand, ValueEnum};
use tracing::info;

/// Every event is a handful of short-lived allocations made on one thread and freed on another
/// (socket task, ingest, sink loop); glibc's allocator spends a large share of the daemon's CPU
/// on that pattern under load (BENCHMARKS.md has the numbers). Built without its
/// transparent-huge-page advice (`no_thp`): with it, growth is faulted in and zeroed 2 MiB at a
/// time and the resident set is larger for the same events. That only stops asking for huge
/// pages; where the host's setting is `always`, `MIMALLOC_ALLOW_THP=0` (set by the Dockerfile and
/// the systemd unit) turns them off for the process.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

// The command line. Doc comments on clap items are its help text.
#[derive(Parser)]
#[command(
    name = "chatwoot-bridge",
    version,
    about = "Chatwoot's real-time events, delivered to Kafka, NATS, webhooks and files"
)]
struct Cli {
    /// Log format on stderr.
    #[arg(
        long,
        global = true,
        value_enum,
        default_value = "text",
        env = "CHATWOOT_BRIDGE_LOG_FORMAT"
    )]
    log_format: LogFormat,
    /// Let the transport libraries log at trace level (`RUST_LOG=trace`): what crosses the wire,
    /// including pubsub tokens, handshake headers and passwords. Off: they stop at debug.
    #[arg(
        long,
        global = true,
        env = "CHATWOOT_BRIDGE_TRACE_SECRETS",
        value_parser = clap::builder::BoolishValueParser::new()
    )]
    trace_secrets: bool,
    #[command(subcommand)]
    command: Command,
}

// How log lines are written on stderr.
#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

// What `dlq` does.
#[derive(Subcommand)]
enum DlqAction {
    /// One line per dead letter: id, event, attempts, last attempt, error.
    List(DlqArgs),
    /// Queue the dead letters for delivery again (the running daemon, or the next start, picks
    /// them up).
    Replay(DlqArgs),
    /// Delete the dead letters.
    Purge(DlqArgs),
}

// Which dead letters `dlq` acts on.
#[derive(clap::Args)]
struct DlqArgs {
    #[arg(long, short, env = "CHATWOOT_BRIDGE_CONFIG")]
    config: PathBuf,
    /// The sink whose dead letters to act on.
    #[arg(long)]
    sink: String,
}

// The subcommands.
#[derive(Subcommand)]
enum Command {
    /// Run the daemon until SIGTERM or Ctrl-C.
    Run {
        #[arg(long, short, env = "CHATWOOT_BRIDGE_CONFIG")]
        config: PathBuf,
    },
    /// Parse and validate a config file; exit non-zero with every problem and its key path.
    Check {
        #[arg(long, short, env = "CHATWOOT_BRIDGE_CONFIG")]
        config: PathBuf,
        /// Also try each sink and each token's handshake and subscription, and report each.
        #[arg(long)]
        connect: bool,
    },
    /// Start a mock Chatwoot and the bridge together; events are printed to stdout.
    Demo {
        /// Events per second the mock broadcasts.
        #[arg(long, default_value_t = 2.0)]
        rate: f64,
        /// Stop after this many events (default: run until Ctrl-C).
        #[arg(long)]
        events: Option<u64>,
        /// Append events to this file instead of printing them.
        #[arg(long)]
        file: Option<PathBuf>,
    },
    /// Run sample events through the config's routes, templates and redaction (nothing is
    /// connected); print a line per case; exit 1 with a diff when a case fails, 2 when the
    /// config or the cases file is invalid.
    Test {
        #[arg(long, short, env = "CHATWOOT_BRIDGE_CONFIG")]
        config: PathBuf,
        /// The cases file: events (recorded fixtures or inline) and the sinks each must reach.
        cases: PathBuf,
    },
    /// Print the JSON Schema of the config file (committed as bridge.schema.json).
    Schema,
    /// Inspect, re-deliver or delete a sink's dead letters.
    Dlq {
        #[command(subcommand)]
        action: DlqAction,
    },
    /// Run a mock Chatwoot ActionCable server (for trying pipelines without a Chatwoot).
    MockServer(MockServerArgs),
    /// Ask the admin endpoint whether the daemon is healthy (a container's HEALTHCHECK): exits 0
    /// on a 2xx answer, 1 otherwise, printing the answer.
    Healthcheck(HealthcheckArgs),
    /// Print a running daemon's routed events live, as JSON lines (pubsub tokens removed),
    /// from its admin endpoint.
    Tap(TapArgs),
    /// Show a running daemon's rates and backlogs per token and sink, redrawn every second.
    Top(TopArgs),
    /// Ask a running daemon to reload its config; exit non-zero if it refused.
    Reload(AdminArgs),
}

// The flags of `healthcheck`.
#[derive(clap::Args)]
struct HealthcheckArgs {
    /// The admin endpoint's address (`admin.listen` in the config).
    #[arg(long, default_value = "127.0.0.1:9464", env = "CHATWOOT_BRIDGE_ADMIN")]
    admin: String,
    /// What to ask: `/healthz` (alive) or `/readyz` (ready for traffic).
    #[arg(long, default_value = "/healthz")]
    path: String,
    /// How long the whole request may take.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    timeout: Duration,
}

// Where the daemon's admin endpoint is.
#[derive(clap::Args)]
struct AdminArgs {
    /// The daemon's admin endpoint (`admin.listen`): host:port, a port, or http://host:port.
    #[arg(long, env = "CHATWOOT_BRIDGE_ADMIN", default_value = "127.0.0.1:9464")]
    admin: String,
}

// The flags of `tap`.
#[derive(clap::Args)]
struct TapArgs {
    #[command(flatten)]
    admin: AdminArgs,
    /// Only events this route matched.
    #[arg(long)]
    route: Option<String>,
    /// Only events routed to this sink, redacted as it sees them.
    #[arg(long)]
    sink: Option<String>,
    /// Only events read with this token (its name).
    #[arg(long)]
    token: Option<String>,
    /// Stop after this many events.
    #[arg(long)]
    count: Option<u64>,
}

// The flags of `top`.
#[derive(clap::Args)]
struct TopArgs {
    #[command(flatten)]
    admin: AdminArgs,
    /// Time between frames; rates are measured over it.
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    interval: Duration,
    /// Draw this many frames, then exit.
    #[arg(long)]
    iterations: Option<u64>,
    /// Draw one frame (rates over one interval), without clearing the screen, then exit.
    #[arg(long, conflicts_with = "iterations")]
    once: bool,
}

// The flags of `mock-server`.
#[derive(clap::Args)]
struct MockServerArgs {
    #[arg(long, default_value = "127.0.0.1:3000")]
    listen: SocketAddr,
    /// A pubsub token the server confirms (repeatable).
    #[arg(long = "token")]
    tokens: Vec<String>,
    /// A pubsub token the server ignores in silence, as Chatwoot does a wrong one (repeatable).
    #[arg(long = "silent-token")]
    silent_tokens: Vec<String>,
    /// A pubsub token the server rejects (repeatable).
    #[arg(long = "reject-token")]
    reject_tokens: Vec<String>,
    /// Confirm every token not listed otherwise (default: silence, like Chatwoot).
    #[arg(long)]
    accept_any: bool,
    /// An agent, answered as Chatwoot's RoomChannel does (right user_id and account_id or
    /// silence), as `ID:PUBSUB_TOKEN:ACCOUNT[,ACCOUNT...][:API_ACCESS_TOKEN]` (repeatable).
    #[arg(long = "user", value_parser = parse_mock_user)]
    users: Vec<MockUser>,
    /// A `--user`'s role, as `ID:ROLE` with ROLE `administrator` (the default: sees every
    /// conversation), `agent` (a member of the mock's inbox: sees them too) or
    /// `agent-outside-inbox` (receives no conversation or message event, lists none; repeatable).
    #[arg(long = "role", value_parser = parse_mock_role)]
    roles: Vec<(u64, MockRole)>,
    /// A widget visitor, as `ID:ACCOUNT:PUBSUB_TOKEN[:INBOX_IDENTIFIER:SOURCE_ID]` (the last two
    /// for the public contact API; repeatable).
    #[arg(long = "contact", value_parser = parse_mock_contact)]
    contacts: Vec<MockContact>,
    /// Events per second to broadcast.
    #[arg(long, default_value_t = 1.0)]
    rate: f64,
    /// Stop broadcasting after this many events.
    #[arg(long)]
    count: Option<u64>,
    /// The `mock_seq` of the first event (a restarted server given the next unused number keeps
    /// every event's number unique).
    #[arg(long, default_value_t = 0)]
    first_seq: u64,
    /// Heartbeat period.
    #[arg(long, default_value = "3s", value_parser = humantime::parse_duration)]
    ping_interval: Duration,
    /// Serve `wss://` with this PEM certificate chain (with --tls-key).
    #[arg(long, requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// The PEM private key of --tls-cert.
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<PathBuf>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.log_format, cli.trace_secrets);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let result = runtime.block_on(execute(cli.command));
    // Whatever was left behind (a write stuck on a disk that does not answer) must not hold the
    // exit: the shutdown has logged what it could not finish.
    runtime.shutdown_timeout(RUNTIME_STOP);
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Bounds the wait for tasks and threads still running once a command has finished.
const RUNTIME_STOP: Duration = Duration::from_secs(1);

/// The transport libraries whose trace level writes what crosses the wire: WebSocket frames and
/// handshakes (the subscribe command holds the pubsub token, the handshake the configured
/// headers, broadcasts the contacts' tokens), NATS protocol operations (CONNECT), the Kafka and
/// HTTP clients' internals. Without `--trace-secrets` they log at most at debug, whatever
/// `RUST_LOG` says, so that turning tracing on to chase a bug does not put secrets in the logs.
const WIRE_TARGETS: &[&str] = &[
    "tungstenite",
    "tokio_tungstenite",
    "async_nats",
    "rdkafka",
    "librdkafka",
    "hyper",
    "hyper_util",
    "h2",
    "reqwest",
];

fn init_logging(format: LogFormat, trace_secrets: bool) {
    use tracing_subscriber::filter::{EnvFilter, LevelFilter, Targets};
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    use tracing_subscriber::Layer;

    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    // A filter of its own rather than directives added to RUST_LOG's: a more specific target
    // there (`tungstenite::protocol=trace`) would win over an added `tungstenite=debug`.
    let wire_cap = (!trace_secrets).then(|| {
        Targets::new()
            .with_default(LevelFilter::TRACE)
            .with_targets(WIRE_TARGETS.iter().map(|t| (*t, LevelFilter::DEBUG)))
    });
    let output = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let output = match format {
        LogFormat::Text => output.boxed(),
        LogFormat::Json => output.json().flatten_event(true).boxed(),
    };
    tracing_subscriber::registry()
        .with(filter)
        .with(wire_cap)
        .with(output)
        .init();
}

async fn execute(command: Command) -> anyhow::Result<ExitCode> {
    match command {
        Command::Run { config } => run(&config).await,
        Command::Check { config, connect } => Ok(check(&config, connect).await),
        Command::Demo { rate, events, file } => demo(rate, events, file).await,
        Command::Dlq { action } => dlq(action),
        Command::Test { config, cases } => Ok(test_cases(&config, &cases)),
        Command::Schema => {
            print!("{}", chatwoot_bridge::config::json_schema());
            Ok(ExitCode::SUCCESS)
        }
        Command::MockServer(args) => mock_server(args).await,
        Command::Healthcheck(args) => healthcheck(args).await,
        Command::Tap(args) => tap(args).await,
        Command::Top(args) => top(args).await,
        Command::Reload(args) => {
            let answer = AdminClient::new(&args.admin)?.reload().await?;
            print!("{answer}");
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// `tap`: the events the admin endpoint streams, on stdout, until it stops or `--count`.
async fn tap(args: TapArgs) -> anyhow::Result<ExitCode> {
    let filter = TapFilter {
        route: args.route,
        sink: args.sink,
        token: args.token,
    };
    let client = AdminClient::new(&args.admin.admin)?;
    client
        .tap(&filter, args.count, &mut std::io::stdout().lock())
        .await?;
    Ok(ExitCode::SUCCESS)
}

/// `top`: a frame per interval on stdout, the screen cleared first on a terminal.
async fn top(args: TopArgs) -> anyhow::Result<ExitCode> {
    use std::io::IsTerminal;
    let iterations = if args.once { Some(1) } else { args.iterations };
    let stdout = std::io::stdout();
    let options = TopOptions {
        interval: args.interval,
        iterations,
        clear_screen: stdout.is_terminal() && iterations != Some(1),
    };
    AdminClient::new(&args.admin.admin)?
        .top(options, &mut stdout.lock())
        .await?;
    Ok(ExitCode::SUCCESS)
}

/// The daemon, until SIGTERM or Ctrl-C; SIGHUP reloads the config file.
async fn run(path: &Path) -> anyhow::Result<ExitCode> {
    // Before anything slow: the default actions of SIGHUP and SIGTERM end the process, and a
    // stop asked for during a slow start is still a graceful one.
    let hangups = hangups()?;
    let stops = StopSignals::listen()?;
    let config = Config::load(path)?;
    let report = tokio::select! {
        report = serve(config, path, hangups, stops.clone().received(1)) => report?,
        () = stops.received(2) => {
            // An operator who asks twice does not wait for the shutdown deadline.
            tracing::error!("second signal: exiting now, before the shutdown finished; \
                what was appended stays in the spool for the next start, events still in memory \
                on their way to it are lost");
            std::process::exit(EXIT_SECOND_SIGNAL);
        }
    };
    Ok(ExitCode::from(exit_code(&report)))
}

/// The bridge until `stop` completes, reloading the config file at `path` on every SIGHUP
/// (a bad config is logged with every problem and the running one stays), then shut down.
/// Tells systemd (when it started the daemon with `Type=notify`): READY=1 once the bridge
/// started (every sink built, the spool open), RELOADING=1 and READY=1 around each reload,
/// WATCHDOG=1 while its loops are alive (with `WatchdogSec=`), STOPPING=1 at the signal.
async fn serve(
    config: Config,
    path: &Path,
    mut hangups: Hangups,
    stop: impl std::future::Future<Output = ()>,
) -> Result<ShutdownReport, chatwoot_bridge::StartError> {
    let notifier = Notifier::from_env().unwrap_or_else(|e| {
        tracing::warn!(error = %e, "systemd notifications are off");
        Notifier::default()
    });
    let mut bridge = chatwoot_bridge::Bridge::start(config).await?;
    notifier.notify_or_log(&[Notice::Ready, Notice::Status(&running(&bridge))]);
    let watchdog = notifier
        .start_watchdog(loops_alive(bridge.status().clone()))
        .unwrap_or_else(|e| {
            tracing::error!(error = %e, "the systemd watchdog is not kept alive");
            None
        });
    let mut admin_reloads = bridge.reload_requests();
    tokio::pin!(stop);
    loop {
        tokio::select! {
            () = &mut stop => break,
            () = hangups.next() => {
                info!(config = %path.display(), "SIGHUP received: reloading the config");
                // The outcome, or every problem, is logged by the reload itself.
                let _ = reload(&mut bridge, path, &notifier).await;
            }
            Some(request) = next_request(&mut admin_reloads) => {
                info!(config = %path.display(), "reload asked on the admin endpoint");
                let answer = reload(&mut bridge, path, &notifier).await;
                // The asker may have gone away; the outcome is logged either way.
                let _ = request.reply.send(answer);
            }
        }
    }
    // systemd stops watching once told the service is stopping, and the loops end one by one
    // now: the pings end first, so that STOPPING=1 is the last notification.
    drop(watchdog);
    notifier.notify_or_log(&[
        Notice::Stopping,
        Notice::Status("shutting down: storing and delivering what was read"),
    ]);
    Ok(bridge.shutdown().await)
}

/// Reloads the config file at `path`, telling systemd RELOADING=1 before and READY=1 after
/// (after a refused reload too, or systemd stays in "reloading"). The report, or every problem.
async fn reload(
    bridge: &mut chatwoot_bridge::Bridge,
    path: &Path,
    notifier: &Notifier,
) -> Result<String, String> {
    notifier.notify_or_log(&[Notice::Reloading]);
    let outcome = bridge
        .reload_from(path)
        .await
        .map(|report| report.to_string())
        .map_err(|e| e.to_string());
    notifier.notify_or_log(&[Notice::Ready, Notice::Status(&running(bridge))]);
    outcome
}

/// The next reload asked on the admin endpoint; never, when it is off.
async fn next_request(
    requests: &mut Option<tokio::sync::mpsc::Receiver<ReloadRequest>>,
) -> Option<ReloadRequest> {
    match requests {
        Some(requests) => requests.recv().await,
        None => std::future::pending().await,
    }
}

/// The status line systemd shows while the bridge runs.
fn running(bridge: &chatwoot_bridge::Bridge) -> String {
    let status = bridge.status();
    format!(
        "running: {} tokens, {} sinks",
        status.tokens().len(),
        status.sinks().len()
    )
}

/// The watchdog's liveness check, the same as `/healthz`'s: the ingest and every sink loop run
/// (one that panicked and is being restarted does not). Those end only at shutdown, so one that
/// ended while running is a daemon that stopped doing its work.
fn loops_alive(status: StatusBoard) -> impl Fn() -> bool + Send + 'static {
    move || status.health_problems().is_empty()
}

/// Asks the admin endpoint's `path` and exits by its answer.
async fn healthcheck(args: HealthcheckArgs) -> anyhow::Result<ExitCode> {
    let HealthcheckArgs {
        admin,
        path,
        timeout,
    } = args;
    let answer = tokio::task::spawn_blocking(move || {
        chatwoot_bridge::probe::get(&admin, &path, timeout).map(|a| (admin, path, a))
    })
    .await
    .context("the probe's thread")?;
    let (admin, path, answer) = answer?;
    println!("{admin}{path}: {} {}", answer.status, answer.reason);
    let body = answer.body.trim_end();
    if !body.is_empty() {
        println!("{body}");
    }
    Ok(if answer.is_success() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// SIGHUP, as `systemctl reload` and `kill -HUP` send it.
#[cfg(unix)]
struct Hangups(tokio::signal::unix::Signal);

/// No SIGHUP where there is none.
#[cfg(not(unix))]
struct Hangups;

#[cfg(unix)]
fn hangups() -> anyhow::Result<Hangups> {
    use tokio::signal::unix::{signal, SignalKind};
    let hangups = signal(SignalKind::hangup()).context("cannot listen for SIGHUP")?;
    Ok(Hangups(hangups))
}

#[cfg(not(unix))]
fn hangups() -> anyhow::Result<Hangups> {
    Ok(Hangups)
}

impl Hangups {
    /// Completes at the next SIGHUP.
    async fn next(&mut self) {
        #[cfg(unix)]
        if self.0.recv().await.is_some() {
            return;
        }
        std::future::pending::<()>().await
    }
}

/// The exit code of `run` after a shutdown. Undelivered events are safe in the spool: a stop is
/// clean when every event read reached it and it was fsynced; else [`EXIT_NOT_SPOOLED`].
fn exit_code(report: &ShutdownReport) -> u8 {
    if report.everything_read_is_spooled() {
        0
    } else {
        EXIT_NOT_SPOOLED
    }
}

/// The exit code after a shutdown in which events read did not all reach the spool, or the
/// spool's final fsync did not complete: the spool's disk failed. `EX_IOERR` of sysexits.h; the
/// last log line says which, and how many events.
const EXIT_NOT_SPOOLED: u8 = 74;

/// Validates the config and, with `connect`, tries every sink and token.
async fn check(path: &Path, connect: bool) -> ExitCode {
    let config = match Config::load(path) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("{}: invalid config\n{e}", path.display());
            return ExitCode::FAILURE;
        }
    };
    println!(
        "{}: ok ({} tokens, {} sinks, {} routes)",
        path.display(),
        config.tokens.len(),
        config.sinks.len(),
        config.routes.route_names().count()
    );
    print_sample_subjects(&config);
    if connect {
        check_connect(&config).await
    } else {
        ExitCode::SUCCESS
    }
}

/// The exit code of `test` when the config or the cases file cannot be used (1 is a failed case).
const EXIT_TEST_INVALID: u8 = 2;

/// Runs the cases file against the config; prints a line per case and the diff of each failure.
fn test_cases(config_path: &Path, cases_path: &Path) -> ExitCode {
    let config = match Config::load(config_path) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("{}: invalid config\n{e}", config_path.display());
            return ExitCode::from(EXIT_TEST_INVALID);
        }
    };
    let cases = match chatwoot_bridge::cases::Cases::load(cases_path, &config) {
        Ok(cases) => cases,
        Err(e) => {
            eprintln!("{}: invalid cases\n{e}", cases_path.display());
            return ExitCode::from(EXIT_TEST_INVALID);
        }
    };
    let report = cases.run(&config);
    print!("{report}");
    if report.passed() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// The topic or subject each Kafka and NATS sink gives a recorded `message.created`, so an
/// operator sees what to subscribe to before anything runs.
fn print_sample_subjects(config: &Config) {
    let Some(sample) = chatwoot_bridge::mock::fixtures::sample_event("message.created") else {
        return;
    };
    for (name, sink) in &config.sinks {
        match sink.kind.topic_or_subject(&sample) {
            Some(Ok(target)) => println!("sink {name}: message.created goes to {target}"),
            Some(Err(why)) => println!("sink {name}: message.created goes nowhere: {why}"),
            None => {}
        }
    }
}

/// Acts on one sink's dead letters.
fn dlq(action: DlqAction) -> anyhow::Result<ExitCode> {
    let (DlqAction::List(args) | DlqAction::Replay(args) | DlqAction::Purge(args)) = &action;
    let config = Config::load(&args.config)?;
    anyhow::ensure!(
        config.sinks.contains_key(&args.sink),
        "no sink is named `{}` (sinks: {})",
        args.sink,
        config.sinks.keys().cloned().collect::<Vec<_>>().join(", ")
    );
    let store =
        DeadLetters::open(&config.spool.dir)?.with_max_frame_bytes(config.cable.max_frame_bytes);
    match action {
        DlqAction::List(_) => {
            let count = store.each(&args.sink, |l| {
                println!(
                    "{}  {}  attempts={}  last={}  {}",
                    l.event.id,
                    l.event.name,
                    l.attempts,
                    humantime::format_rfc3339_seconds(l.last_attempt),
                    l.error
                );
            })?;
            eprintln!(
                "{} dead letters for sink {}{}",
                count.letters,
                args.sink,
                skipped_lines(count.skipped, "the log above gives their numbers")
            );
        }
        DlqAction::Replay(_) => {
            let count = store.queue_replay(&args.sink)?;
            println!(
                "{} dead letters queued for redelivery to sink {}{}",
                count.letters,
                args.sink,
                skipped_lines(
                    count.skipped,
                    "the replay keeps them in <replay file>.bad-lines"
                )
            );
        }
        DlqAction::Purge(_) => {
            let count = store.purge(&args.sink)?;
            println!(
                "{} dead letters of sink {} deleted{}",
                count.letters,
                args.sink,
                skipped_lines(count.skipped, "deleted with them")
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// What `dlq` adds to its line when a dead letter file had lines that are not dead letters.
fn skipped_lines(skipped: usize, what_became_of_them: &str) -> String {
    match skipped {
        0 => String::new(),
        n => format!(
            "; {n} lines skipped, not dead letters (torn or damaged; {what_became_of_them})"
        ),
    }
}

/// Tries every sink and token; prints one line each. Fails if any failed.
async fn check_connect(config: &Config) -> ExitCode {
    let mut failures = 0usize;
    for (name, sink) in &config.sinks {
        match chatwoot_bridge::sink::Sink::probe(name, &sink.kind).await {
            Ok(()) => println!("sink {name}: ok"),
            Err(e) => {
                failures += 1;
                println!("sink {name}: FAILED: {e}");
            }
        }
    }
    let probes = config.tokens.iter().map(|token| async move {
        (
            token.name.clone(),
            chatwoot_bridge::source::cable::probe(token, &config.cable).await,
        )
    });
    for (name, result) in futures_util::future::join_all(probes).await {
        match result {
            Ok(()) => println!("token {name}: ok (subscription confirmed)"),
            Err(e) => {
                failures += 1;
                println!("token {name}: FAILED: {e}");
            }
        }
    }
    if failures == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// A mock Chatwoot cable server, until SIGTERM or Ctrl-C.
async fn mock_server(args: MockServerArgs) -> anyhow::Result<ExitCode> {
    let stops = StopSignals::listen()?;
    let answers = [
        (args.tokens, Answer::Confirm),
        (args.silent_tokens, Answer::Silent),
        (args.reject_tokens, Answer::Reject),
    ];
    let tokens = answers
        .into_iter()
        .flat_map(|(list, answer)| {
            list.into_iter().map(move |pubsub_token| MockToken {
                pubsub_token,
                answer,
            })
        })
        .collect();
    let listen = args.listen;
    let mut users = args.users;
    give_roles(&mut users, &args.roles).map_err(anyhow::Error::msg)?;
    let server = MockServer::start(MockConfig {
        listen,
        tokens,
        unknown_answer: if args.accept_any {
            Answer::Confirm
        } else {
            Answer::Silent
        },
        ping_interval: args.ping_interval,
        rate: args.rate,
        count: args.count,
        first_seq: args.first_seq,
        wait_for_subscriptions: 0,
        blast: None,
        tls: args
            .tls_cert
            .zip(args.tls_key)
            .map(|(cert_file, key_file)| MockTls {
                cert_file,
                key_file,
            }),
        send_welcome: true,
        accounts: mock_accounts(&users, &args.contacts),
        users,
        contacts: args.contacts,
    })
    .await
    .with_context(|| format!("cannot start the mock server on {listen}"))?;
    info!(url = %server.url(), "mock Chatwoot cable server listening");
    stops.received(1).await;
    server.stop().await;
    Ok(ExitCode::SUCCESS)
}

/// `--user ID:PUBSUB_TOKEN:ACCOUNT[,ACCOUNT...][:API_ACCESS_TOKEN]`.
fn parse_mock_user(value: &str) -> Result<MockUser, String> {
    let shape = "expected ID:PUBSUB_TOKEN:ACCOUNT[,ACCOUNT...][:API_ACCESS_TOKEN]";
    let parts: Vec<&str> = value.splitn(4, ':').collect();
    let [id, pubsub_token, accounts, rest @ ..] = parts.as_slice() else {
        return Err(shape.into());
    };
    let number = |what: &str, v: &str| {
        v.parse::<u64>()
            .map_err(|_| format!("{what} `{v}` is not a whole number ({shape})"))
    };
    Ok(MockUser {
        id: number("the user id", id)?,
        pubsub_token: pubsub_token.to_string(),
        accounts: accounts
            .split(',')
            .map(|a| number("the account id", a))
            .collect::<Result<_, _>>()?,
        api_access_token: rest.first().map(|t| t.to_string()),
        role: MockRole::default(),
    })
}

/// Gives each `--role` to its `--user`; an error names a role whose id no user has.
fn give_roles(users: &mut [MockUser], roles: &[(u64, MockRole)]) -> Result<(), String> {
    for &(user_id, role) in roles {
        let user = users.iter_mut().find(|u| u.id == user_id);
        let user = user.ok_or_else(|| format!("--role {user_id}: no --user has id {user_id}"))?;
        user.role = role;
    }
    Ok(())
}

/// `--role ID:ROLE`.
fn parse_mock_role(value: &str) -> Result<(u64, MockRole), String> {
    let shape = "expected ID:ROLE, ROLE administrator, agent or agent-outside-inbox";
    let (id, role) = value.split_once(':').ok_or(shape)?;
    let id = id
        .parse::<u64>()
        .map_err(|_| format!("the user id `{id}` is not a whole number ({shape})"))?;
    let role = match role {
        "administrator" => MockRole::Administrator,
        "agent" => MockRole::Agent { inbox_member: true },
        "agent-outside-inbox" => MockRole::Agent {
            inbox_member: false,
        },
        other => return Err(format!("the role `{other}` is unknown ({shape})")),
    };
    Ok((id, role))
}

/// `--contact ID:ACCOUNT:PUBSUB_TOKEN[:INBOX_IDENTIFIER:SOURCE_ID]`.
fn parse_mock_contact(value: &str) -> Result<MockContact, String> {
    let shape = "expected ID:ACCOUNT:PUBSUB_TOKEN[:INBOX_IDENTIFIER:SOURCE_ID]";
    let parts: Vec<&str> = value.split(':').collect();
    let (id, account_id, pubsub_token, public) = match parts[..] {
        [id, account_id, pubsub_token] => (id, account_id, pubsub_token, None),
        [id, account_id, pubsub_token, inbox_identifier, source_id] => {
            let public = MockContactInbox {
                inbox_identifier: inbox_identifier.into(),
                source_id: source_id.into(),
            };
            (id, account_id, pubsub_token, Some(public))
        }
        _ => return Err(shape.into()),
    };
    let number = |what: &str, v: &str| {
        v.parse::<u64>()
            .map_err(|_| format!("{what} `{v}` is not a whole number ({shape})"))
    };
    Ok(MockContact {
        id: number("the contact id", id)?,
        account_id: number("the account id", account_id)?,
        pubsub_token: pubsub_token.into(),
        public,
    })
}

/// The accounts the mock's users and contacts name, each once.
fn mock_accounts(users: &[MockUser], contacts: &[MockContact]) -> Vec<MockAccount> {
    let ids: std::collections::BTreeSet<u64> = users
        .iter()
        .flat_map(|u| u.accounts.iter().copied())
        .chain(contacts.iter().map(|c| c.account_id))
        .collect();
    ids.into_iter()
        .map(|id| MockAccount {
            id,
            name: format!("Account {id}"),
        })
        .collect()
}

/// The demo: a mock Chatwoot with an agent and a widget visitor, and the bridge printing events.
async fn demo(rate: f64, events: Option<u64>, file: Option<PathBuf>) -> anyhow::Result<ExitCode> {
    let stops = StopSignals::listen()?;
    let server = MockServer::start(MockConfig {
        tokens: vec![
            MockToken {
                pubsub_token: "demo-agent-token".into(),
                answer: Answer::Confirm,
            },
            MockToken {
                pubsub_token: "demo-contact-token".into(),
                answer: Answer::Confirm,
            },
        ],
        rate,
        count: events,
        wait_for_subscriptions: 2,
        ..MockConfig::default()
    })
    .await
    .context("cannot start the mock server")?;
    let spool_dir =
        std::env::temp_dir().join(format!("chatwoot-bridge-demo-{}", std::process::id()));
    let config = demo_config(&server.url(), file.as_deref(), &spool_dir)?;
    info!(url = %server.url(), "demo: mock Chatwoot started; events follow (Ctrl-C to stop)");
    let bridge = chatwoot_bridge::Bridge::start(config).await?;
    match events {
        // Each event reaches both tokens: wait for all copies, then stop.
        Some(n) => {
            tokio::select! {
                () = stops.received(1) => {}
                _ = delivered_at_least(&bridge, n * 2) => {}
            }
        }
        None => stops.received(1).await,
    }
    let report = bridge.shutdown().await;
    server.stop().await;
    let _ = std::fs::remove_dir_all(&spool_dir);
    Ok(match report.drain {
        Drain::CaughtUp => ExitCode::SUCCESS,
        Drain::DeadlinePassed => ExitCode::FAILURE,
    })
}

/// The demo's config: both mock tokens, one sink (stdout or `file`), one route for everything.
fn demo_config(url: &str, file: Option<&Path>, spool_dir: &Path) -> anyhow::Result<Config> {
    let sink = match file {
        Some(path) => format!("{{ type: file, path: {} }}", serde_json::to_string(path)?),
        None => "{ type: stdout }".to_string(),
    };
    let yaml = format!(
        r#"
chatwoot:
  url: {url}
tokens:
  - {{ name: demo-agent, pubsub_token: demo-agent-token, account_id: 1, user_id: 1 }}
  - {{ name: demo-visitor, pubsub_token: demo-contact-token }}
sinks:
  out: {sink}
routes:
  - {{ name: everything, match: {{}}, to: [out] }}
spool: {{ dir: {spool} }}
"#,
        spool = serde_json::to_string(spool_dir)?
    );
    Ok(Config::from_yaml(&yaml, &|_| None, false)?)
}

/// Completes once the sinks have delivered `want` events.
async fn delivered_at_least(bridge: &chatwoot_bridge::Bridge, want: u64) {
    while bridge.stats().delivered.load(Ordering::Relaxed) < want {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The exit code after a second Ctrl-C or SIGTERM cut the shutdown short: 128 + SIGINT, as a
/// shell reports an interrupted command.
const EXIT_SECOND_SIGNAL: i32 = 130;

/// SIGTERM (what `docker stop`, systemd and Kubernetes send) and Ctrl-C (SIGINT), counted from
/// the moment [`StopSignals::listen`] ran: the first asks for a graceful stop, a second for an
/// immediate exit.
#[derive(Clone)]
struct StopSignals(tokio::sync::watch::Receiver<u32>);

impl StopSignals {
    /// Takes over both signals now, so that one arriving while the daemon is still starting is
    /// counted instead of ending the process by the default action.
    fn listen() -> anyhow::Result<Self> {
        let (count, counted) = tokio::sync::watch::channel(0u32);
        #[cfg(unix)]
        {
            use tokio::signal::unix::{signal, SignalKind};
            let mut terminate =
                signal(SignalKind::terminate()).context("cannot listen for SIGTERM")?;
            let mut interrupt =
                signal(SignalKind::interrupt()).context("cannot listen for Ctrl-C")?;
            tokio::spawn(async move {
                loop {
                    tokio::select! {
                        Some(()) = terminate.recv() => info!("SIGTERM received"),
                        Some(()) = interrupt.recv() => info!("Ctrl-C received"),
                        else => break,
                    }
                    count.send_modify(|n| *n += 1);
                }
            });
        }
        #[cfg(not(unix))]
        tokio::spawn(async move {
            while tokio::signal::ctrl_c().await.is_ok() {
                info!("Ctrl-C received");
                count.send_modify(|n| *n += 1);
            }
        });
        Ok(Self(counted))
    }

    /// Completes once `n` signals have come since [`StopSignals::listen`]; never when the
    /// signals cannot be listened to any more.
    async fn received(mut self, n: u32) {
        if self.0.wait_for(|count| *count >= n).await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use chatwoot_bridge::bridge::{Drain, Persistence, ShutdownReport};

    use super::{
        exit_code, give_roles, mock_accounts, parse_mock_contact, parse_mock_role, parse_mock_user,
        MockRole, EXIT_NOT_SPOOLED,
    };

    fn report(not_spooled: u64, persistence: Persistence) -> ShutdownReport {
        ShutdownReport {
            drain: Drain::DeadlinePassed,
            persistence,
            read: 100,
            spooled: 100 - not_spooled,
            not_spooled,
        }
    }

    #[test]
    fn the_exit_code_says_whether_every_event_read_reached_the_spool() {
        // Undelivered is fine (the spool has it); unstored or unsynced is not.
        assert_eq!(exit_code(&report(0, Persistence::Synced)), 0);
        assert_eq!(exit_code(&report(3, Persistence::Synced)), EXIT_NOT_SPOOLED);
        assert_eq!(
            exit_code(&report(0, Persistence::SyncFailed)),
            EXIT_NOT_SPOOLED
        );
        assert_eq!(
            exit_code(&report(0, Persistence::SyncTimedOut)),
            EXIT_NOT_SPOOLED
        );
        assert_eq!(
            exit_code(&report(3, Persistence::SyncTimedOut)),
            EXIT_NOT_SPOOLED
        );
    }

    #[test]
    fn mock_users_and_contacts_are_read_from_their_flags_and_bad_ones_named() {
        let user = parse_mock_user("3:tok:1,2:api").unwrap();
        assert_eq!((user.id, user.accounts.as_slice()), (3, &[1, 2][..]));
        assert_eq!(user.api_access_token.as_deref(), Some("api"));
        assert_eq!(parse_mock_user("3:tok:1").unwrap().api_access_token, None);
        let error = parse_mock_user("3:tok:x").unwrap_err();
        assert!(
            error.starts_with("the account id `x` is not a whole number"),
            "{error}"
        );
        assert!(parse_mock_user("3:tok").is_err());
        assert_eq!(
            parse_mock_role("7:agent-outside-inbox").unwrap(),
            (
                7,
                MockRole::Agent {
                    inbox_member: false
                }
            )
        );
        assert_eq!(
            parse_mock_role("7:agent").unwrap().1,
            MockRole::Agent { inbox_member: true }
        );
        let error = parse_mock_role("7:owner").unwrap_err();
        assert!(error.starts_with("the role `owner` is unknown"), "{error}");
        assert!(parse_mock_role("x:agent").is_err());
        let mut users = vec![parse_mock_user("3:tok:1").unwrap()];
        assert_eq!(users[0].role, MockRole::Administrator);
        give_roles(&mut users, &[parse_mock_role("3:agent").unwrap()]).unwrap();
        assert_eq!(users[0].role, MockRole::Agent { inbox_member: true });
        let error = give_roles(&mut users, &[(4, MockRole::Administrator)]).unwrap_err();
        assert_eq!(error, "--role 4: no --user has id 4");
        let contact = parse_mock_contact("42:1:visitor").unwrap();
        assert_eq!((contact.id, contact.account_id), (42, 1));
        assert!(parse_mock_contact("42:visitor").is_err());
        let public = parse_mock_contact("43:1:v:inbox:source")
            .unwrap()
            .public
            .unwrap();
        assert_eq!(
            (public.inbox_identifier.as_str(), public.source_id.as_str()),
            ("inbox", "source")
        );
        let accounts = mock_accounts(&[user], &[contact]);
        assert_eq!(accounts.iter().map(|a| a.id).collect::<Vec<_>>(), [1, 2]);
    }
}
