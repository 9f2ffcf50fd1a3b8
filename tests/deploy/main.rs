//! The files under `deploy/` and the Dockerfile, checked with the tools operators run on them:
//! the systemd unit with `systemd-analyze verify` and `security` and against the system calls
//! the daemon really makes; the alert rules with `promtool check rules` and `promtool test
//! rules` (each alert fed the failure it is for, and seen to fire); the Grafana dashboard's and
//! the alerts' queries parsed by promtool and naming only metrics the bridge exports; the
//! Kubernetes manifests, the Compose file and the Dockerfile read and cross-checked (probes on
//! the admin port the config listens on, secrets mounted where the config reads them, services
//! the config points at).
//!
//! A missing tool fails its test with the Debian package that has it
//! (`scripts/install-test-deps.sh` installs them all).
//!
//! Modules: [`tools`] (finding and running them), [`promql`] (the metric names a query
//! selects, and the bridge's list), [`systemd`], [`prometheus`], [`grafana`], [`kubernetes`],
//! [`compose`], [`docker`].

#[path = "../support/mod.rs"]
mod support;

mod compose;
mod configs;
mod docker;
mod grafana;
mod kubernetes;
mod prometheus;
mod promql;
mod systemd;
mod tools;
