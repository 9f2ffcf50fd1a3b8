//! Reloading the config while running ([`Bridge::reload`]): the new config is compared with
//! the running one and only what differs changes.
//!
//! - tokens added, removed or changed start, stop or restart ([`Supervisor::apply`]); the
//!   others' sockets are not touched;
//! - sinks added join the spool at its end and get a loop; sinks changed are built again and
//!   their loop resumes from the committed cursor; the others are not touched;
//! - the route table is swapped whole: the ingest takes it between two batches;
//! - sinks removed stop getting events; what they have not delivered is delivered first
//!   (`retired_sinks: { NAME: drain }`, and always when they owe nothing) or given up
//!   (`{ drop: COUNT }`, COUNT at least what they owe); one that owes events and is not named
//!   there refuses the reload;
//! - every file sink opens its file again before its next write (logrotate);
//! - `shutdown_timeout` applies from then on.
//!
//! The settings that the running process is built around (the spool, `memory_limit`, the
//! cable's timing and limits) refuse the reload, each named. Everything is checked, and every
//! new or changed sink built, before anything changes: a refused reload changes nothing.

use std::fmt;
use std::path::Path;

use tokio_util::sync::CancellationToken;
use tracing::{error, info};

use super::loops::build_sink;
use super::{push_out, Bridge};
use crate::config::{CableSettings, Config, ConfigError, Retirement};
use crate::delivery::ingest::IngestTable;
use crate::memory::MemoryBudget;
use crate::sink::Sink;
use crate::source::supervisor::ApplyReport;
use crate::spool::MAX_SINKS;
use crate::types::{Problem, Problems};

/// What a reload changed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReloadReport {
    /// The hash of the config running now ([`Config::hash`]).
    pub hash: String,
    /// The route table in force: one more per reload (0 at start).
    pub generation: u64,
    /// Tokens started, stopped and restarted; the other tokens' sockets were not touched.
    pub tokens: ApplyReport,
    /// Sinks added: they get the events appended from now on.
    pub sinks_added: Vec<String>,
    /// Sinks whose settings changed: built again, resuming from their committed cursor.
    pub sinks_changed: Vec<String>,
    /// Sinks removed that deliver what they still owe, then leave.
    pub sinks_draining: Vec<String>,
    /// Sinks removed whose events not delivered are given up (`drop`), with how many they
    /// owed when the reload was checked.
    pub sinks_dropped: Vec<(String, u64)>,
}

impl fmt::Display for ReloadReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let list = |names: &[String]| {
            if names.is_empty() {
                "none".to_owned()
            } else {
                names.join(", ")
            }
        };
        let dropped: Vec<String> = self
            .sinks_dropped
            .iter()
            .map(|(name, owed)| format!("{name} ({owed} events given up)"))
            .collect();
        write!(
            f,
            "config {} (routes #{}); tokens started: {}, stopped: {}, restarted: {}; sinks \
             added: {}, changed: {}, draining: {}, dropped: {}",
            self.hash.get(..12).unwrap_or(&self.hash),
            self.generation,
            list(&self.tokens.started),
            list(&self.tokens.stopped),
            list(&self.tokens.restarted),
            list(&self.sinks_added),
            list(&self.sinks_changed),
            list(&self.sinks_draining),
            list(&dropped),
        )
    }
}

/// Why a reload was refused. The running config keeps running, unchanged.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    /// The new config file is invalid: every problem, each with its key path.
    #[error("config not reloaded, the running one stays: {0}")]
    Invalid(#[from] ConfigError),
    /// The new config is valid but cannot be applied while running: every reason, each with
    /// its key path (settings that need a restart, a removed sink that owes events, a sink
    /// that cannot be built).
    #[error("config not reloaded, the running one stays:\n{}", lines(.0))]
    Refused(Vec<Problem>),
}

/// One problem a line.
fn lines(problems: &[Problem]) -> String {
    problems
        .iter()
        .map(Problem::to_string)
        .collect::<Vec<_>>()
        .join("\n")
}

/// What a reload will do, found by comparing the configs before anything changes.
#[derive(Default)]
struct Plan {
    /// Sinks to add.
    added: Vec<String>,
    /// Sinks to build again.
    changed: Vec<String>,
    /// Sinks to remove, with whether what they owe is dropped, and how much that is.
    removed: Vec<(String, bool, u64)>,
    /// Sinks still draining after an earlier reload that this one drops.
    drop_retiring: Vec<String>,
}

impl Bridge {
    /// Applies `new` in place of the running config, changing only what differs (see the
    /// module documentation); on error nothing changed. Recorded on the status board
    /// ([`StatusBoard::config`](crate::status::StatusBoard::config)) and logged either way.
    pub async fn reload(&mut self, new: Config) -> Result<ReloadReport, ReloadError> {
        let reloaded = self.apply(new).await;
        match &reloaded {
            Ok(report) => {
                self.status.config_reloaded(&report.hash);
                info!("config reloaded: {report}");
            }
            Err(e) => self.refused(e),
        }
        reloaded
    }

    /// Reads the config file at `path` again (with the environment, as at start) and
    /// [reloads](Bridge::reload) it: what SIGHUP does.
    pub async fn reload_from(&mut self, path: &Path) -> Result<ReloadReport, ReloadError> {
        let path = path.to_owned();
        let loaded = tokio::task::spawn_blocking(move || Config::load(&path))
            .await
            .expect("loading the config does not panic");
        match loaded {
            Ok(config) => self.reload(config).await,
            Err(e) => {
                let e = ReloadError::Invalid(e);
                self.refused(&e);
                Err(e)
            }
        }
    }

    /// Records and logs a refused reload.
    fn refused(&self, e: &ReloadError) {
        let text = e.to_string();
        self.status.config_reload_failed(&text);
        error!("{text}");
    }

    /// Checks `new`, builds its new and changed sinks, then applies it.
    async fn apply(&mut self, new: Config) -> Result<ReloadReport, ReloadError> {
        self.loops.retiring.retain(|_, r| !r.gone.is_cancelled());
        let mut problems = Problems::top_level();
        needs_restart(&self.config, &new, &mut problems);
        let plan = self.plan(&new, &mut problems);
        let mut built = Vec::with_capacity(plan.added.len() + plan.changed.len());
        for name in plan.added.iter().chain(&plan.changed) {
            match build_sink(name, &new.sinks[name]).await {
                Ok(sink) => built.push((name.clone(), sink)),
                Err(e) => problems.add(&format!("sinks.{name}"), e.cause.to_string()),
            }
        }
        problems.finish(|| ()).map_err(ReloadError::Refused)?;
        for (i, name) in plan.added.iter().enumerate() {
            if let Err(e) = self.spool.add_sink(name) {
                // Taken out again: a sink in the spool without a loop would hold its segments.
                for added in &plan.added[..i] {
                    let _ = self.spool.retire_sink(added);
                }
                return Err(ReloadError::Refused(vec![sink_problem(
                    name,
                    e.to_string(),
                )]));
            }
        }
        Ok(self.switch_over(new, plan, built).await)
    }

    /// Which sinks are added, changed and removed, with every reason the reload cannot go on.
    fn plan(&self, new: &Config, problems: &mut Problems<'_>) -> Plan {
        let mut plan = Plan::default();
        for (name, settings) in &new.sinks {
            if self.loops.retiring.contains_key(name) {
                problems.add(
                    &format!("sinks.{name}"),
                    "is still leaving after an earlier reload removed it (draining what it \
                     owed); add it back once it has left the status board, or drop what it \
                     owes first (retired_sinks)",
                );
                continue;
            }
            match self.config.sinks.get(name) {
                None => plan.added.push(name.clone()),
                Some(running) if running != settings => plan.changed.push(name.clone()),
                Some(_) => {}
            }
        }
        for name in self.config.sinks.keys() {
            if new.sinks.contains_key(name) {
                continue;
            }
            match self.retirement(name, new.retired_sinks.get(name)) {
                Ok((drop, owed)) => plan.removed.push((name.clone(), drop, owed)),
                Err(problem) => problems.add(&problem.key, problem.message),
            }
        }
        for (name, retiring) in &self.loops.retiring {
            if let (Some(Retirement::Drop(_)), false) = (
                new.retired_sinks.get(name),
                retiring.dropping.is_cancelled(),
            ) {
                match self.retirement(name, new.retired_sinks.get(name)) {
                    Ok(_) => plan.drop_retiring.push(name.clone()),
                    Err(problem) => problems.add(&problem.key, problem.message),
                }
            }
        }
        let configured = new.sinks.len() + self.loops.retiring.len() + plan.removed.len();
        if configured > MAX_SINKS {
            problems.add(
                "sinks",
                format!(
                    "{configured} sinks would be in the spool at once (the new ones, and those \
                     removed until they have left), more than {MAX_SINKS}; remove sinks in one \
                     reload and add the others in the next"
                ),
            );
        }
        plan
    }

    /// How removed sink `name` leaves: whether what it owes is dropped, and how much it owes;
    /// or why it cannot leave as the new config says.
    fn retirement(&self, name: &str, said: Option<&Retirement>) -> Result<(bool, u64), Problem> {
        let spooled = self.spool.backlog(name).unwrap_or(0);
        let parked = self.status.sink(name).map_or(0, |s| s.parked);
        let owed = spooled + parked;
        let owing = format!(
            "{owed} events not delivered ({spooled} in the spool, {parked} in its retry set)"
        );
        match said {
            Some(Retirement::Drop(count)) if *count >= owed => Ok((true, owed)),
            Some(Retirement::Drop(count)) => Err(Problem {
                key: format!("retired_sinks.{name}.drop"),
                message: format!(
                    "gives up {count} events, but the sink has {owing}: give at least {owed} to \
                     give them up, or drain it"
                ),
            }),
            Some(Retirement::Drain) => Ok((false, owed)),
            // Owes nothing now: drained of what the ingest may still route to it meanwhile.
            None if owed == 0 => Ok((false, 0)),
            None => Err(sink_problem(
                name,
                format!(
                    "is removed while it has {owing}; say what becomes of them: \
                     `retired_sinks: {{ {name}: drain }}` delivers them first, \
                     `retired_sinks: {{ {name}: {{ drop: {owed} }} }}` gives them up"
                ),
            )),
        }
    }

    /// Applies a checked plan: sinks, routes, removals, tokens, the rest. Cannot fail.
    async fn switch_over(
        &mut self,
        new: Config,
        plan: Plan,
        built: Vec<(String, Sink)>,
    ) -> ReloadReport {
        let memory = MemoryBudget::divide(new.memory_limit, new.sinks.len()).sink;
        let mut stopped = Vec::new();
        for (name, sink) in built {
            if plan.changed.contains(&name) {
                if let Some(old) = self.loops.stop(&name).await {
                    stopped.push(old);
                }
            }
            if let Err(e) = self.loops.launch(&name, &new.sinks[&name], sink, memory) {
                error!(sink = %name, error = %e, "cannot start the delivery loop of a reloaded sink");
            }
        }
        let generation = self.routes.current().generation + 1;
        let kit = &self.loops.kit;
        self.routes.swap(IngestTable {
            generation,
            routes: new.routes.clone(),
            push_out: push_out(&new, kit.dead_letters.clone(), &kit.status, &kit.stats),
            sinks: new.sinks.keys().cloned().collect(),
        });
        let mut report = ReloadReport {
            hash: new.hash.clone(),
            generation,
            ..ReloadReport::default()
        };
        self.retire_removed(&plan, &stopped, generation, &mut report);
        for name in &plan.drop_retiring {
            if let Some(retiring) = self.loops.retiring.get(name) {
                retiring.dropping.cancel();
                retiring.handle.stop.cancel();
            }
        }
        report.tokens = self.supervisor.apply(&new.tokens);
        report.sinks_added = plan.added;
        report.sinks_changed = plan.changed;
        self.shutdown_timeout = new.shutdown_timeout;
        crate::sink::file::reopen_files();
        self.refresh_admin(&new);
        self.config = new;
        report
    }

    /// Starts the retirement of every removed sink, once the ingest routes by `generation`.
    fn retire_removed(
        &mut self,
        plan: &Plan,
        stopped: &[super::loops::LoopHandle],
        generation: u64,
        report: &mut ReloadReport,
    ) {
        for (name, drop, owed) in &plan.removed {
            let Some(handle) = self.loops.running.remove(name) else {
                continue;
            };
            // Loops stopped by this reload that dead-lettered into it.
            let feeders: Vec<CancellationToken> = stopped
                .iter()
                .filter(|h| h.settings.dead_letter.as_deref() == Some(name.as_str()))
                .map(|h| h.ended.clone())
                .collect();
            let routed_around = self.routes.applied(generation);
            self.loops
                .retire(name, handle, *drop, feeders, routed_around);
            if *drop {
                report.sinks_dropped.push((name.clone(), *owed));
            } else {
                report.sinks_draining.push(name.clone());
            }
        }
    }
}

/// A problem at `sinks.<name>`.
fn sink_problem(name: &str, message: String) -> Problem {
    Problem {
        key: format!("sinks.{name}"),
        message,
    }
}

/// Every setting the running process is built around that `new` changes: each refuses the
/// reload, named.
fn needs_restart(running: &Config, new: &Config, problems: &mut Problems<'_>) {
    let (old, now) = (&running.spool, &new.spool);
    let mut settings = vec![
        (
            "spool.dir",
            old.dir.display().to_string(),
            now.dir.display().to_string(),
        ),
        (
            "spool.max_bytes",
            old.max_bytes.to_string(),
            now.max_bytes.to_string(),
        ),
        (
            "spool.fsync",
            format!("{:?}", old.fsync),
            format!("{:?}", now.fsync),
        ),
        (
            "spool.fsync_interval",
            format!("{:?}", old.fsync_interval),
            format!("{:?}", now.fsync_interval),
        ),
        (
            "spool.when_full",
            format!("{:?}", old.when_full),
            format!("{:?}", now.when_full),
        ),
        (
            "spool.replay_share",
            old.replay_share.to_string(),
            now.replay_share.to_string(),
        ),
        (
            "memory_limit",
            running.memory_limit.to_string(),
            new.memory_limit.to_string(),
        ),
    ];
    settings.extend(cable_settings(&running.cable, &new.cable));
    // The endpoint's socket stays bound for the process's life; what it serves follows reloads.
    let listen = |config: &Config| {
        config
            .admin
            .as_ref()
            .map_or_else(|| "off".to_owned(), |admin| admin.listen.to_string())
    };
    settings.push(("admin.listen", listen(running), listen(new)));
    let before = problems.found.len();
    for (key, from, to) in settings {
        if from != to {
            problems.add(
                key,
                format!("changes from {from} to {to}, which needs a restart of the bridge"),
            );
        }
    }
    // A setting added to the cable's and not listed above still refuses, if not by name.
    if running.cable != new.cable && problems.found.len() == before {
        problems.add(
            "chatwoot",
            "a setting every socket shares changes, which needs a restart of the bridge",
        );
    }
}

/// The cable's timing and limits, shared by every socket, as (key, running, new).
fn cable_settings(old: &CableSettings, now: &CableSettings) -> Vec<(&'static str, String, String)> {
    let durations = [
        (
            "chatwoot.connect_timeout",
            old.connect_timeout,
            now.connect_timeout,
        ),
        (
            "chatwoot.confirm_timeout",
            old.confirm_timeout,
            now.confirm_timeout,
        ),
        ("chatwoot.stale_after", old.stale_after, now.stale_after),
        (
            "chatwoot.presence_interval",
            old.presence_interval,
            now.presence_interval,
        ),
        (
            "chatwoot.reconnect.initial",
            old.reconnect.initial,
            now.reconnect.initial,
        ),
        (
            "chatwoot.reconnect.max",
            old.reconnect.max,
            now.reconnect.max,
        ),
        (
            "chatwoot.reconnect.reset_after",
            old.reconnect.reset_after,
            now.reconnect.reset_after,
        ),
        (
            "chatwoot.reconnect.after_disconnect_without_reconnect",
            old.reconnect.after_disconnect_without_reconnect,
            now.reconnect.after_disconnect_without_reconnect,
        ),
    ];
    let mut settings: Vec<_> = durations
        .into_iter()
        .map(|(key, from, to)| (key, format!("{from:?}"), format!("{to:?}")))
        .collect();
    settings.push((
        "chatwoot.max_frame_bytes",
        old.max_frame_bytes.to_string(),
        now.max_frame_bytes.to_string(),
    ));
    settings.push((
        "chatwoot.max_nesting",
        old.max_nesting.to_string(),
        now.max_nesting.to_string(),
    ));
    settings
}

/// A reload can run in a spawned task (the admin endpoint's): its future is `Send`.
#[cfg(test)]
#[allow(dead_code)]
fn reload_is_send(bridge: &mut Bridge, config: Config, path: &Path) {
    fn send<T: Send>(_: T) {}
    send(bridge.reload(config));
    send(bridge.reload_from(path));
}
