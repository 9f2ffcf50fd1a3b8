//! systemd's service notifications (`sd_notify(3)`): READY, RELOADING, STOPPING, STATUS and the
//! watchdog's keep-alive, each a datagram of `KEY=value` lines sent to the socket named by
//! `$NOTIFY_SOCKET`.
//!
//! Without `$NOTIFY_SOCKET` (not started by systemd, or a unit that is not `Type=notify`) every
//! notification is a no-op, so the daemon calls them unconditionally. A notification that cannot
//! be sent is an error the caller logs; it never stops the daemon: systemd then acts on its
//! timeouts, which is the failure mode it was configured for.

use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::task::JoinHandle;
use tracing::{error, info};

/// The environment variable systemd sets to the socket it listens on for notifications.
const NOTIFY_SOCKET: &str = "NOTIFY_SOCKET";

/// The environment variable systemd sets to the watchdog's timeout, in microseconds, when the
/// unit has `WatchdogSec=`.
const WATCHDOG_USEC: &str = "WATCHDOG_USEC";

/// The environment variable naming the process the watchdog settings are for; a child that
/// inherited them must not ping on its parent's behalf.
const WATCHDOG_PID: &str = "WATCHDOG_PID";

/// The longest `STATUS=` text sent, in bytes: longer text (a reload's list of problems) is cut
/// at a character boundary, so that one notification stays one small datagram.
pub const MAX_STATUS_BYTES: usize = 1024;

/// How long a send may block on a notification socket whose buffer is full before it fails:
/// systemd that stopped reading must not hold a runtime thread.
const SEND_TIMEOUT: Duration = Duration::from_secs(1);

/// One notification to systemd; several may go in one datagram.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Notice<'a> {
    /// `READY=1`: started (every sink built, the spool open), or a reload finished.
    Ready,
    /// `RELOADING=1` with `MONOTONIC_USEC=`: a reload began; `READY=1` ends it. The timestamp
    /// lets systemd ≥ 253 (`Type=notify-reload`) tell this reload from an older one.
    Reloading,
    /// `STOPPING=1`: the shutdown began.
    Stopping,
    /// `WATCHDOG=1`: alive; systemd restarts the service when these stop for `WatchdogSec`.
    Watchdog,
    /// `STATUS=`: one line shown by `systemctl status`.
    Status(&'a str),
}

/// Why a notification could not be sent.
#[derive(Debug, thiserror::Error)]
pub enum NotifyError {
    /// `$NOTIFY_SOCKET` holds neither an absolute path nor an abstract name (`@...`); systemd's
    /// `vsock:` addresses (for virtual machines) are among these.
    #[error("NOTIFY_SOCKET={0:?} is neither an absolute socket path nor an abstract name (@...)")]
    UnsupportedAddress(String),
    /// The socket's address is not one the system accepts (too long, a NUL inside).
    #[error("NOTIFY_SOCKET={address:?}: {source}")]
    BadAddress {
        /// `$NOTIFY_SOCKET` as read.
        address: String,
        /// What the system said about it.
        source: std::io::Error,
    },
    /// Creating the sending socket, or sending, failed.
    #[error("cannot notify systemd at {address:?}: {source}")]
    Send {
        /// `$NOTIFY_SOCKET` as read.
        address: String,
        /// What the system said.
        source: std::io::Error,
    },
    /// `$WATCHDOG_USEC` is set for this process but is not a positive number of microseconds.
    #[error("WATCHDOG_USEC={0:?} is not a positive number of microseconds")]
    BadWatchdogInterval(String),
}

/// Where notifications go: systemd's socket, or nowhere when not started by systemd. Cheap to
/// clone.
#[derive(Debug, Clone, Default)]
pub struct Notifier {
    /// The socket address and its text, when `$NOTIFY_SOCKET` was set.
    target: Option<Target>,
}

/// The notification socket, once resolved.
#[derive(Debug, Clone)]
struct Target {
    /// The address datagrams are sent to.
    address: SocketAddr,
    /// `$NOTIFY_SOCKET` as read, for errors.
    text: String,
}

impl Notifier {
    /// The notifier `$NOTIFY_SOCKET` asks for: a no-op one when it is unset or empty.
    pub fn from_env() -> Result<Notifier, NotifyError> {
        match std::env::var(NOTIFY_SOCKET) {
            Ok(text) if !text.is_empty() => Notifier::to(&text),
            _ => Ok(Notifier::default()),
        }
    }

    /// A notifier sending to `address`, written as in `$NOTIFY_SOCKET`: an absolute path, or
    /// `@name` for a name in Linux's abstract socket namespace.
    pub fn to(address: &str) -> Result<Notifier, NotifyError> {
        let bad = |source| NotifyError::BadAddress {
            address: address.to_owned(),
            source,
        };
        let resolved = if let Some(name) = address.strip_prefix('@') {
            SocketAddr::from_abstract_name(name.as_bytes()).map_err(bad)?
        } else if address.starts_with('/') {
            SocketAddr::from_pathname(PathBuf::from(address)).map_err(bad)?
        } else {
            return Err(NotifyError::UnsupportedAddress(address.to_owned()));
        };
        Ok(Notifier {
            target: Some(Target {
                address: resolved,
                text: address.to_owned(),
            }),
        })
    }

    /// Whether notifications go anywhere.
    pub fn is_active(&self) -> bool {
        self.target.is_some()
    }

    /// Sends `notices` in one datagram; does nothing without a socket.
    pub fn notify(&self, notices: &[Notice<'_>]) -> Result<(), NotifyError> {
        let Some(target) = &self.target else {
            return Ok(());
        };
        let message = message(notices);
        let send_error = |source| NotifyError::Send {
            address: target.text.clone(),
            source,
        };
        // A socket per notification: they are rare (a start, a reload, a stop, a watchdog ping
        // every few seconds), and nothing is held open between them.
        let socket = UnixDatagram::unbound().map_err(send_error)?;
        socket
            .set_write_timeout(Some(SEND_TIMEOUT))
            .map_err(send_error)?;
        socket
            .send_to_addr(message.as_bytes(), &target.address)
            .map_err(send_error)?;
        Ok(())
    }

    /// Sends `notices`, logging (not returning) a failure: what the daemon's lifecycle calls,
    /// since a notification that did not arrive must not stop the daemon.
    pub fn notify_or_log(&self, notices: &[Notice<'_>]) {
        if let Err(e) = self.notify(notices) {
            error!(error = %e, "systemd notification failed");
        }
    }

    /// Starts the watchdog's keep-alive when systemd asked for one (`WatchdogSec=` sets
    /// `$WATCHDOG_USEC`): `WATCHDOG=1` every half of the timeout, sent only while `alive` says
    /// the daemon works, so that systemd restarts a daemon whose loops stopped rather than one
    /// whose process merely exists. `None` when no watchdog is asked for (or no socket is set).
    pub fn start_watchdog(
        &self,
        alive: impl Fn() -> bool + Send + 'static,
    ) -> Result<Option<Watchdog>, NotifyError> {
        let Some(timeout) = watchdog_timeout()? else {
            return Ok(None);
        };
        if !self.is_active() {
            return Ok(None);
        }
        Ok(Some(self.watchdog_every(timeout / 2, alive)))
    }

    /// The keep-alive task: `WATCHDOG=1` every `period` while `alive` holds.
    pub fn watchdog_every(
        &self,
        period: Duration,
        alive: impl Fn() -> bool + Send + 'static,
    ) -> Watchdog {
        let notifier = self.clone();
        let stopped = Arc::new(Mutex::new(false));
        let stopped_for_task = stopped.clone();
        let task = tokio::spawn(async move {
            let mut ticks = tokio::time::interval(period);
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut was_alive = true;
            loop {
                ticks.tick().await;
                let now_alive = alive();
                match (was_alive, now_alive) {
                    (true, false) => error!(
                        "liveness check failed: watchdog pings to systemd stop, and it restarts \
                         the service if this lasts WatchdogSec"
                    ),
                    (false, true) => info!("liveness check passes again: watchdog pings resume"),
                    _ => {}
                }
                was_alive = now_alive;
                let stopped = stopped_for_task
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner);
                if now_alive && !*stopped {
                    notifier.notify_or_log(&[Notice::Watchdog]);
                }
            }
        });
        Watchdog { task, stopped }
    }
}

/// The running keep-alive task; stops when dropped, and no ping is sent once the drop returned
/// (so a `STOPPING=1` sent after it is the last notification).
#[derive(Debug)]
pub struct Watchdog {
    /// The task sending `WATCHDOG=1`.
    task: JoinHandle<()>,
    /// Set when dropped; the task holds the lock while it sends, so the drop waits for a ping
    /// under way rather than letting it arrive after what follows.
    stopped: Arc<Mutex<bool>>,
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        *self.stopped.lock().unwrap_or_else(PoisonError::into_inner) = true;
        self.task.abort();
    }
}

/// The watchdog timeout systemd set for this process, if any: `$WATCHDOG_USEC`, unless
/// `$WATCHDOG_PID` names another process.
pub fn watchdog_timeout() -> Result<Option<Duration>, NotifyError> {
    watchdog_timeout_of(
        std::env::var(WATCHDOG_USEC).ok(),
        std::env::var(WATCHDOG_PID).ok(),
        std::process::id(),
    )
}

/// The watchdog timeout `usec` and `pid` (the two variables' values) set for process `own_pid`.
fn watchdog_timeout_of(
    usec: Option<String>,
    pid: Option<String>,
    own_pid: u32,
) -> Result<Option<Duration>, NotifyError> {
    let Some(usec) = usec else {
        return Ok(None);
    };
    if pid.is_some_and(|pid| pid.trim() != own_pid.to_string()) {
        return Ok(None);
    }
    match usec.trim().parse::<u64>() {
        Ok(usec) if usec > 0 => Ok(Some(Duration::from_micros(usec))),
        _ => Err(NotifyError::BadWatchdogInterval(usec)),
    }
}

/// `CLOCK_MONOTONIC` in microseconds: the clock systemd stamps its reload signal with.
fn monotonic_usec() -> u64 {
    let now = rustix::time::clock_gettime(rustix::time::ClockId::Monotonic);
    // Never negative: the clock counts from boot.
    u64::try_from(now.tv_sec).unwrap_or(0) * 1_000_000
        + u64::try_from(now.tv_nsec).unwrap_or(0) / 1_000
}

/// The datagram for `notices`: one `KEY=value` line each.
fn message(notices: &[Notice<'_>]) -> String {
    let mut message = String::new();
    for notice in notices {
        match notice {
            Notice::Ready => message.push_str("READY=1\n"),
            Notice::Reloading => {
                let usec = monotonic_usec();
                message.push_str(&format!("RELOADING=1\nMONOTONIC_USEC={usec}\n"));
            }
            Notice::Stopping => message.push_str("STOPPING=1\n"),
            Notice::Watchdog => message.push_str("WATCHDOG=1\n"),
            Notice::Status(text) => {
                message.push_str("STATUS=");
                message.push_str(&status_line(text));
                message.push('\n');
            }
        }
    }
    message
}

/// `text` as one `STATUS=` value: line breaks (which would start another assignment) become
/// spaces, and it is cut to [`MAX_STATUS_BYTES`].
fn status_line(text: &str) -> String {
    let mut end = text.len().min(MAX_STATUS_BYTES);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text[..end].replace(['\n', '\r'], " ")
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, Ordering};

    use super::*;

    /// A socket standing in for systemd's, at a path in a fresh folder.
    fn listener() -> (tempfile::TempDir, UnixDatagram, String) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify.sock");
        let socket = UnixDatagram::bind(&path).unwrap();
        socket
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        (dir, socket, path.to_str().unwrap().to_owned())
    }

    fn receive(socket: &UnixDatagram) -> String {
        let mut buffer = [0u8; 4096];
        let n = socket.recv(&mut buffer).expect("a notification arrives");
        String::from_utf8(buffer[..n].to_vec()).unwrap()
    }

    #[test]
    fn each_notice_arrives_as_the_lines_systemd_reads() {
        let (_dir, socket, path) = listener();
        let notifier = Notifier::to(&path).unwrap();
        assert!(notifier.is_active());
        notifier
            .notify(&[Notice::Ready, Notice::Status("2 tokens subscribed")])
            .unwrap();
        assert_eq!(receive(&socket), "READY=1\nSTATUS=2 tokens subscribed\n");
        notifier.notify(&[Notice::Stopping]).unwrap();
        assert_eq!(receive(&socket), "STOPPING=1\n");
        notifier.notify(&[Notice::Watchdog]).unwrap();
        assert_eq!(receive(&socket), "WATCHDOG=1\n");
    }

    #[test]
    fn reloading_carries_the_monotonic_clock_systemd_compares_with_its_signal() {
        let (_dir, socket, path) = listener();
        let before = std::fs::read_to_string("/proc/uptime").unwrap();
        Notifier::to(&path)
            .unwrap()
            .notify(&[Notice::Reloading])
            .unwrap();
        let got = receive(&socket);
        let mut lines = got.lines();
        assert_eq!(lines.next(), Some("RELOADING=1"));
        let usec: u64 = lines
            .next()
            .and_then(|l| l.strip_prefix("MONOTONIC_USEC="))
            .expect("MONOTONIC_USEC follows")
            .parse()
            .unwrap();
        // CLOCK_MONOTONIC counts from boot, as /proc/uptime does (which adds suspended time):
        // never more than the uptime, and not zero.
        let uptime_secs: f64 = before.split_whitespace().next().unwrap().parse().unwrap();
        assert!(usec > 0);
        assert!(
            usec as f64 / 1e6 <= uptime_secs + 1.0,
            "{usec} vs {uptime_secs}"
        );
    }

    #[test]
    fn an_abstract_socket_name_is_reached_through_the_at_sign() {
        let name = format!("chatwoot-bridge-test-{}", std::process::id());
        let address = SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        let socket = UnixDatagram::bind_addr(&address).unwrap();
        socket
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        Notifier::to(&format!("@{name}"))
            .unwrap()
            .notify(&[Notice::Ready])
            .unwrap();
        assert_eq!(receive(&socket), "READY=1\n");
    }

    #[test]
    fn status_text_stays_one_line_and_bounded() {
        assert_eq!(status_line("a\nb\r\nc"), "a b  c");
        let long = "é".repeat(MAX_STATUS_BYTES);
        let cut = status_line(&long);
        assert!(cut.len() <= MAX_STATUS_BYTES && cut.len() >= MAX_STATUS_BYTES - 1);
        assert!(cut.chars().all(|c| c == 'é'));
    }

    #[test]
    fn addresses_systemd_may_give_that_cannot_be_used_are_named() {
        let err = Notifier::to("vsock:2:1234").unwrap_err().to_string();
        assert!(err.contains("vsock:2:1234"), "{err}");
        let err = Notifier::to(&format!("/{}", "x".repeat(200)))
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("NOTIFY_SOCKET="), "{err}");
    }

    #[test]
    fn the_watchdog_timeout_is_read_only_for_this_process() {
        let of = |usec: Option<&str>, pid: Option<&str>| {
            watchdog_timeout_of(usec.map(Into::into), pid.map(Into::into), 42)
        };
        assert_eq!(
            of(Some("30000000"), None).unwrap(),
            Some(Duration::from_secs(30))
        );
        assert_eq!(
            of(Some("30000000"), Some("42")).unwrap(),
            Some(Duration::from_secs(30))
        );
        assert_eq!(of(Some("30000000"), Some("7")).unwrap(), None);
        assert_eq!(of(None, Some("42")).unwrap(), None);
        for bad in ["0", "-5", "30s", ""] {
            let err = of(Some(bad), None).unwrap_err().to_string();
            assert!(err.contains(&format!("{bad:?}")), "{err}");
        }
    }

    #[test]
    fn without_a_socket_notifications_do_nothing() {
        let notifier = Notifier::default();
        assert!(!notifier.is_active());
        notifier.notify(&[Notice::Ready]).unwrap();
    }

    #[test]
    fn a_socket_nobody_listens_on_is_an_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("gone.sock");
        let err = Notifier::to(path.to_str().unwrap())
            .unwrap()
            .notify(&[Notice::Ready])
            .unwrap_err()
            .to_string();
        assert!(err.contains("gone.sock"), "{err}");
    }

    #[tokio::test]
    async fn the_watchdog_pings_only_while_the_liveness_check_passes() {
        let (_dir, socket, path) = listener();
        let alive = Arc::new(AtomicBool::new(true));
        let check = alive.clone();
        let watchdog = Notifier::to(&path)
            .unwrap()
            .watchdog_every(Duration::from_millis(20), move || {
                check.load(Ordering::Relaxed)
            });
        let socket = tokio::net::UnixDatagram::from_std({
            socket.set_nonblocking(true).unwrap();
            socket
        })
        .unwrap();
        let mut buffer = [0u8; 64];
        let n = tokio::time::timeout(Duration::from_secs(10), socket.recv(&mut buffer))
            .await
            .expect("a ping while alive")
            .unwrap();
        assert_eq!(&buffer[..n], b"WATCHDOG=1\n");

        alive.store(false, Ordering::Relaxed);
        // A ping sent before the check saw the change may still be queued: empty the queue once
        // no tick can be in flight, then nothing more may arrive for many periods.
        tokio::time::sleep(Duration::from_millis(100)).await;
        while socket.try_recv(&mut buffer).is_ok() {}
        let silent = tokio::time::timeout(Duration::from_millis(300), socket.recv(&mut buffer));
        assert!(silent.await.is_err(), "no ping while the check fails");

        alive.store(true, Ordering::Relaxed);
        let n = tokio::time::timeout(Duration::from_secs(10), socket.recv(&mut buffer))
            .await
            .expect("pings resume once the check passes")
            .unwrap();
        assert_eq!(&buffer[..n], b"WATCHDOG=1\n");

        drop(watchdog);
        while socket.try_recv(&mut buffer).is_ok() {}
        let silent = tokio::time::timeout(Duration::from_millis(200), socket.recv(&mut buffer));
        assert!(
            silent.await.is_err(),
            "no ping once the watchdog is dropped"
        );
    }
}
