//! The Dockerfile's HEALTHCHECK: its command line is one the binary runs, and it asks
//! `/healthz` of the admin endpoint.

use std::io::{Read, Write};
use std::net::TcpListener;

use crate::tools::read;

const BIN: &str = env!("CARGO_BIN_EXE_chatwoot-bridge");

/// The Dockerfile's logical lines (continuations joined).
fn dockerfile_lines() -> Vec<String> {
    read("Dockerfile")
        .replace("\\\n", " ")
        .lines()
        .map(str::to_owned)
        .collect()
}

#[test]
fn the_healthcheck_runs_the_binarys_probe_of_healthz() {
    let lines = dockerfile_lines();
    let healthcheck = lines
        .iter()
        .find(|l| l.starts_with("HEALTHCHECK "))
        .expect("a HEALTHCHECK");
    let command = healthcheck
        .split_once(" CMD ")
        .expect("HEALTHCHECK ... CMD [...]")
        .1;
    let argv: Vec<String> = serde_json::from_str(command.trim())
        .unwrap_or_else(|e| panic!("CMD is an exec-form JSON array: {e}: {command}"));
    // The binary the image copies in.
    let copied = lines
        .iter()
        .find(|l| l.starts_with("COPY --from=build"))
        .expect("the binary's COPY");
    assert!(
        copied.ends_with(&format!(" {}", argv[0])),
        "{copied} vs {argv:?}"
    );

    // The same arguments, against a stand-in for the admin endpoint at CHATWOOT_BRIDGE_ADMIN.
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let address = listener.local_addr().unwrap().to_string();
    let server = std::thread::spawn(move || {
        let (mut stream, _) = listener.accept().unwrap();
        let mut request = [0u8; 1024];
        let n = stream.read(&mut request).unwrap();
        stream
            .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\n\r\nok\n")
            .unwrap();
        String::from_utf8_lossy(&request[..n]).into_owned()
    });
    let out = std::process::Command::new(BIN)
        .args(&argv[1..])
        .env("CHATWOOT_BRIDGE_ADMIN", &address)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let request = server.join().unwrap();
    assert!(request.starts_with("GET /healthz "), "{request}");

    let exposed = lines
        .iter()
        .find(|l| l.starts_with("EXPOSE "))
        .expect("EXPOSE");
    assert_eq!(exposed, "EXPOSE 9464", "the admin port the manifests use");
}
