//! The binary as systemd and a container runtime see it: the notifications it sends to
//! `$NOTIFY_SOCKET` (READY, WATCHDOG, STOPPING) and `healthcheck`, the probe a Docker
//! `HEALTHCHECK` runs.

mod support;

use std::io::{Read, Write};
use std::net::TcpListener;
use std::path::Path;

use chatwoot_bridge::mock::{Answer, MockConfig};
use support::{mock_token, quoted, signal, start_mock, within, BridgeYaml};
use tokio::net::UnixDatagram;
use tokio::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_chatwoot-bridge");

/// The next notification on `socket`, as text.
async fn next_notification(socket: &UnixDatagram) -> String {
    let mut buffer = [0u8; 4096];
    let n = within("a notification from the daemon", socket.recv(&mut buffer))
        .await
        .unwrap();
    String::from_utf8(buffer[..n].to_vec()).unwrap()
}

/// Writes `dir/c.yaml`: the mock at `cable` with its token `t`, every event to a file sink.
fn config(cable: &str, dir: &Path) -> std::path::PathBuf {
    BridgeYaml::new(cable)
        .token("{ name: a, pubsub_token: t }")
        .sink(
            "out",
            &format!("{{ type: file, path: {} }}", quoted(dir.join("out.jsonl"))),
        )
        .route_all(&["out"])
        .spool(&dir.join("spool"))
        .write(&dir.join("c.yaml"))
}

#[tokio::test]
async fn the_daemon_tells_systemd_ready_keeps_the_watchdog_alive_and_says_stopping_on_sigterm() {
    let server = start_mock(MockConfig {
        tokens: vec![mock_token("t", Answer::Confirm)],
        rate: 50.0,
        ..MockConfig::default()
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let socket_path = dir.path().join("notify.sock");
    let socket = UnixDatagram::bind(&socket_path).unwrap();
    let mut child = Command::new(BIN)
        .args([
            "run",
            "--config",
            config(&server.url(), dir.path()).to_str().unwrap(),
        ])
        .env("NOTIFY_SOCKET", &socket_path)
        // A watchdog of 400 ms: a ping every 200 ms.
        .env("WATCHDOG_USEC", "400000")
        .env_remove("WATCHDOG_PID")
        .kill_on_drop(true)
        .spawn()
        .unwrap();

    let ready = next_notification(&socket).await;
    assert_eq!(
        ready, "READY=1\nSTATUS=running: 1 tokens, 1 sinks\n",
        "the first notification is READY, once the bridge started"
    );
    assert_eq!(next_notification(&socket).await, "WATCHDOG=1\n");
    assert_eq!(next_notification(&socket).await, "WATCHDOG=1\n");

    signal(&child, "TERM");
    let mut after_signal = Vec::new();
    loop {
        let notification = next_notification(&socket).await;
        let stopping = notification.starts_with("STOPPING=1\n");
        after_signal.push(notification);
        if stopping {
            break;
        }
    }
    let stopping = after_signal.last().unwrap();
    assert!(
        stopping.contains("\nSTATUS=shutting down"),
        "STOPPING carries a status line: {stopping:?}"
    );
    // Only watchdog pings already on their way came before it.
    assert!(
        after_signal[..after_signal.len() - 1]
            .iter()
            .all(|n| n == "WATCHDOG=1\n"),
        "{after_signal:?}"
    );
    let status = within("the daemon to exit after SIGTERM", child.wait())
        .await
        .unwrap();
    assert!(status.success(), "{status}");
    // No ping after STOPPING: the watchdog ended with it.
    let mut buffer = [0u8; 4096];
    assert!(
        socket.try_recv(&mut buffer).is_err(),
        "nothing after STOPPING=1: {:?}",
        String::from_utf8_lossy(&buffer)
    );
}

#[tokio::test]
async fn without_notify_socket_the_daemon_runs_and_stops_as_before() {
    let server = start_mock(MockConfig {
        tokens: vec![mock_token("t", Answer::Confirm)],
        rate: 50.0,
        ..MockConfig::default()
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let mut child = Command::new(BIN)
        .args([
            "run",
            "--config",
            config(&server.url(), dir.path()).to_str().unwrap(),
        ])
        .env_remove("NOTIFY_SOCKET")
        .env("WATCHDOG_USEC", "400000")
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let out_file = dir.path().join("out.jsonl");
    support::wait_until("events to reach the file sink", || {
        std::fs::metadata(&out_file).is_ok_and(|m| m.len() > 0)
    })
    .await;
    signal(&child, "TERM");
    let status = within("the daemon to exit after SIGTERM", child.wait())
        .await
        .unwrap();
    assert!(status.success(), "{status}");
}

/// An HTTP server on a free loopback port that answers each of `answers` to one request, in
/// order, then stops.
fn admin_stand_in(answers: Vec<&'static str>) -> (String, std::thread::JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let address = listener.local_addr().unwrap().to_string();
    let server = std::thread::spawn(move || {
        for answer in answers {
            let (mut stream, _) = listener.accept().unwrap();
            let mut request = Vec::new();
            let mut chunk = [0u8; 1024];
            while !request.windows(4).any(|w| w == b"\r\n\r\n") {
                let n = stream.read(&mut chunk).unwrap();
                assert!(n > 0, "a whole request arrives");
                request.extend_from_slice(&chunk[..n]);
            }
            let request = String::from_utf8(request).unwrap();
            assert!(
                request.starts_with("GET /healthz HTTP/1.1\r\n"),
                "{request}"
            );
            stream.write_all(answer.as_bytes()).unwrap();
        }
    });
    (address, server)
}

async fn healthcheck(args: &[&str]) -> std::process::Output {
    within(
        "healthcheck to finish",
        Command::new(BIN)
            .arg("healthcheck")
            .args(args)
            .env_remove("CHATWOOT_BRIDGE_ADMIN")
            .kill_on_drop(true)
            .output(),
    )
    .await
    .unwrap()
}

#[tokio::test]
async fn healthcheck_exits_by_the_admin_endpoints_answer() {
    let (address, server) = admin_stand_in(vec![
        "HTTP/1.1 200 OK\r\ncontent-length: 3\r\n\r\nok\n",
        "HTTP/1.1 503 Service Unavailable\r\ncontent-length: 22\r\n\r\nsink loop `out` ended\n",
    ]);
    let healthy = healthcheck(&["--admin", &address]).await;
    assert!(healthy.status.success(), "{healthy:?}");
    let stdout = String::from_utf8_lossy(&healthy.stdout);
    assert!(
        stdout.starts_with(&format!("{address}/healthz: 200 OK")),
        "{stdout}"
    );

    let unhealthy = healthcheck(&["--admin", &address, "--timeout", "10s"]).await;
    assert_eq!(unhealthy.status.code(), Some(1), "{unhealthy:?}");
    let stdout = String::from_utf8_lossy(&unhealthy.stdout);
    assert!(stdout.contains("503 Service Unavailable"), "{stdout}");
    assert!(stdout.contains("sink loop `out` ended"), "{stdout}");
    server.join().unwrap();

    // The server has stopped: nothing listens on its port now.
    let down = healthcheck(&["--admin", &address]).await;
    assert_eq!(down.status.code(), Some(1), "{down:?}");
    let stderr = String::from_utf8_lossy(&down.stderr);
    assert!(
        stderr.contains(&format!("cannot connect to {address}")),
        "{stderr}"
    );
}

#[tokio::test]
async fn healthcheck_reads_its_address_from_the_environment() {
    let (address, server) = admin_stand_in(vec!["HTTP/1.1 204 No Content\r\n\r\n"]);
    let out = within(
        "healthcheck to finish",
        Command::new(BIN)
            .arg("healthcheck")
            .env("CHATWOOT_BRIDGE_ADMIN", &address)
            .kill_on_drop(true)
            .output(),
    )
    .await
    .unwrap();
    assert!(out.status.success(), "{out:?}");
    server.join().unwrap();
}
