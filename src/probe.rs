//! One HTTP GET of the admin endpoint over a plain TCP connection: `chatwoot-bridge healthcheck`,
//! for a container image that has no curl (Docker's `HEALTHCHECK` runs a command inside the
//! container).
//!
//! The answer is read under a byte limit and a deadline, since whatever listens on the address
//! (the daemon, or anything else bound there) may send anything, or nothing.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

/// The most bytes of an answer read, headers included; the rest is not read. The admin
/// endpoint's health answers are a few hundred bytes.
pub const MAX_PROBE_RESPONSE_BYTES: usize = 64 * 1024;

/// What the endpoint answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProbeAnswer {
    /// The HTTP status code.
    pub status: u16,
    /// The status line's reason phrase (`OK`, `Service Unavailable`), possibly empty.
    pub reason: String,
    /// The body as text (invalid UTF-8 replaced), cut at [`MAX_PROBE_RESPONSE_BYTES`].
    pub body: String,
}

impl ProbeAnswer {
    /// Whether the status is 2xx: healthy, for `/healthz` and `/readyz`.
    pub fn is_success(&self) -> bool {
        (200..300).contains(&self.status)
    }
}

/// Why the probe got no answer.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    /// The path is not one a request line can carry.
    #[error("{0:?} is not a request path: it must start with / and hold no spaces or line breaks")]
    BadPath(String),
    /// The address could not be resolved to any socket address.
    #[error("cannot resolve {address}: {source}")]
    Resolve {
        /// The address as given.
        address: String,
        /// Why.
        source: std::io::Error,
    },
    /// No address it resolves to accepted a connection in time.
    #[error("cannot connect to {address}: {source}")]
    Connect {
        /// The address as given.
        address: String,
        /// The last attempt's error.
        source: std::io::Error,
    },
    /// Sending the request or reading the answer failed, or the deadline passed.
    #[error("no answer from {address}: {source}")]
    Exchange {
        /// The address as given.
        address: String,
        /// Why.
        source: std::io::Error,
    },
    /// What came back is not an HTTP/1 answer.
    #[error("{address} did not answer in HTTP/1: {what}")]
    NotHttp {
        /// The address as given.
        address: String,
        /// What was wrong.
        what: &'static str,
    },
}

/// Sends `GET path` to `address` (`host:port`) and reads the answer, all within `timeout`.
pub fn get(address: &str, path: &str, timeout: Duration) -> Result<ProbeAnswer, ProbeError> {
    if !path.starts_with('/') || path.contains(|c: char| c.is_whitespace() || c.is_control()) {
        return Err(ProbeError::BadPath(path.to_owned()));
    }
    let deadline = Instant::now() + timeout;
    let mut stream = connect(address, deadline)?;
    let exchange = |source| ProbeError::Exchange {
        address: address.to_owned(),
        source,
    };
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\nAccept: */*\r\n\r\n"
    );
    stream
        .set_write_timeout(Some(remaining(deadline).map_err(exchange)?))
        .map_err(exchange)?;
    stream.write_all(request.as_bytes()).map_err(exchange)?;
    let bytes = read_bounded(&mut stream, deadline).map_err(exchange)?;
    parse(&bytes).map_err(|what| ProbeError::NotHttp {
        address: address.to_owned(),
        what,
    })
}

/// A connection to the first of `address`'s socket addresses that accepts one before
/// `deadline`.
fn connect(address: &str, deadline: Instant) -> Result<TcpStream, ProbeError> {
    let resolve = |source| ProbeError::Resolve {
        address: address.to_owned(),
        source,
    };
    let candidates: Vec<SocketAddr> = address.to_socket_addrs().map_err(resolve)?.collect();
    let mut last = std::io::Error::new(std::io::ErrorKind::NotFound, "resolves to no address");
    for candidate in candidates {
        let attempt =
            remaining(deadline).and_then(|left| TcpStream::connect_timeout(&candidate, left));
        match attempt {
            Ok(stream) => return Ok(stream),
            Err(e) => last = e,
        }
    }
    Err(ProbeError::Connect {
        address: address.to_owned(),
        source: last,
    })
}

/// The time left before `deadline`, or a timeout error once it has passed.
fn remaining(deadline: Instant) -> std::io::Result<Duration> {
    let left = deadline.saturating_duration_since(Instant::now());
    if left.is_zero() {
        Err(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            "the probe's timeout passed",
        ))
    } else {
        Ok(left)
    }
}

/// The answer's bytes up to the end of the connection, [`MAX_PROBE_RESPONSE_BYTES`] or
/// `deadline`, whichever comes first (the deadline is an error).
fn read_bounded(stream: &mut TcpStream, deadline: Instant) -> std::io::Result<Vec<u8>> {
    let mut bytes = Vec::new();
    let mut chunk = [0u8; 4096];
    while bytes.len() < MAX_PROBE_RESPONSE_BYTES {
        stream.set_read_timeout(Some(remaining(deadline)?))?;
        let room = (MAX_PROBE_RESPONSE_BYTES - bytes.len()).min(chunk.len());
        match stream.read(&mut chunk[..room]) {
            Ok(0) => break,
            Ok(n) => bytes.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(bytes)
}

/// Reads an HTTP/1 answer: its status line, and its body by `Content-Length`, chunked transfer
/// coding, or the end of the connection.
fn parse(bytes: &[u8]) -> Result<ProbeAnswer, &'static str> {
    let head_end = find(bytes, b"\r\n\r\n").ok_or("no end of the headers")?;
    let head = std::str::from_utf8(&bytes[..head_end]).map_err(|_| "headers are not text")?;
    let mut lines = head.split("\r\n");
    let status_line = lines.next().ok_or("no status line")?;
    let rest = status_line
        .strip_prefix("HTTP/1.1 ")
        .or_else(|| status_line.strip_prefix("HTTP/1.0 "))
        .ok_or("the status line does not start with HTTP/1.x")?;
    let (code, reason) = rest.split_once(' ').unwrap_or((rest, ""));
    let status: u16 = code
        .parse()
        .ok()
        .filter(|s| (100..600).contains(s))
        .ok_or("the status code is not a number from 100 to 599")?;
    let mut chunked = false;
    let mut length = None;
    for line in lines {
        let (name, value) = line
            .split_once(':')
            .ok_or("a header line without a colon")?;
        let value = value.trim();
        if name.eq_ignore_ascii_case("transfer-encoding") {
            chunked = value.to_ascii_lowercase().contains("chunked");
        } else if name.eq_ignore_ascii_case("content-length") {
            length = Some(value.parse::<usize>().map_err(|_| "a bad Content-Length")?);
        }
    }
    let raw = &bytes[head_end + 4..];
    let body = if chunked {
        unchunk(raw)?
    } else {
        raw[..length.unwrap_or(raw.len()).min(raw.len())].to_vec()
    };
    Ok(ProbeAnswer {
        status,
        reason: reason.to_owned(),
        body: String::from_utf8_lossy(&body).into_owned(),
    })
}

/// The body of a chunked answer, as far as it was read (an answer cut at the byte limit keeps
/// what came before the cut).
fn unchunk(mut raw: &[u8]) -> Result<Vec<u8>, &'static str> {
    let mut body = Vec::new();
    loop {
        let Some(line_end) = find(raw, b"\r\n") else {
            return Ok(body);
        };
        let size_text = std::str::from_utf8(&raw[..line_end]).map_err(|_| "a bad chunk size")?;
        // A chunk size may carry extensions after a semicolon.
        let size_text = size_text.split(';').next().unwrap_or("").trim();
        let size = usize::from_str_radix(size_text, 16).map_err(|_| "a bad chunk size")?;
        raw = &raw[line_end + 2..];
        if size == 0 {
            return Ok(body);
        }
        let available = size.min(raw.len());
        body.extend_from_slice(&raw[..available]);
        if available < size {
            return Ok(body);
        }
        raw = raw.get(size + 2..).unwrap_or(&[]);
    }
}

/// Where `needle` first occurs in `haystack`.
fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use std::net::TcpListener;
    use std::thread;

    use super::*;

    /// A server on a free loopback port that reads one request, answers `answer` and closes;
    /// returns its address and the request it read.
    fn serve_once(answer: &'static [u8]) -> (String, thread::JoinHandle<String>) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let address = listener.local_addr().unwrap().to_string();
        let server = thread::spawn(move || {
            let (mut stream, _) = listener.accept().unwrap();
            let mut request = Vec::new();
            let mut chunk = [0u8; 1024];
            while find(&request, b"\r\n\r\n").is_none() {
                let n = stream.read(&mut chunk).unwrap();
                assert!(n > 0, "the request ends with an empty line");
                request.extend_from_slice(&chunk[..n]);
            }
            stream.write_all(answer).unwrap();
            String::from_utf8(request).unwrap()
        });
        (address, server)
    }

    const WAIT: Duration = Duration::from_secs(10);

    #[test]
    fn a_healthy_answer_is_a_success_with_its_body() {
        let (address, server) = serve_once(
            b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\ncontent-type: text/plain\r\n\r\nok\n",
        );
        let answer = get(&address, "/healthz", WAIT).unwrap();
        assert_eq!(answer.status, 200);
        assert_eq!(answer.reason, "OK");
        assert_eq!(answer.body, "ok\n");
        assert!(answer.is_success());
        let request = server.join().unwrap();
        assert!(
            request.starts_with("GET /healthz HTTP/1.1\r\n"),
            "{request}"
        );
        assert!(
            request.contains(&format!("Host: {address}\r\n")),
            "{request}"
        );
    }

    #[test]
    fn an_unhealthy_answer_is_read_whole_even_when_chunked() {
        let (address, server) = serve_once(
            b"HTTP/1.1 503 Service Unavailable\r\nTransfer-Encoding: chunked\r\n\r\n\
              6\r\nsink o\r\n8;ext=1\r\nut died\n\r\n0\r\n\r\n",
        );
        let answer = get(&address, "/healthz", WAIT).unwrap();
        assert_eq!(answer.status, 503);
        assert_eq!(answer.body, "sink out died\n");
        assert!(!answer.is_success());
        server.join().unwrap();
    }

    #[test]
    fn something_that_is_not_http_is_named() {
        let (address, server) = serve_once(b"SSH-2.0-OpenSSH_9.2\r\n\r\n");
        let err = get(&address, "/healthz", WAIT).unwrap_err().to_string();
        assert!(err.contains(&address) && err.contains("HTTP/1"), "{err}");
        server.join().unwrap();
    }

    #[test]
    fn nothing_listening_is_a_connect_error_naming_the_address() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let address = listener.local_addr().unwrap().to_string();
        drop(listener);
        let err = get(&address, "/healthz", WAIT).unwrap_err();
        assert!(matches!(err, ProbeError::Connect { .. }), "{err}");
        assert!(err.to_string().contains(&address), "{err}");
    }

    #[test]
    fn a_server_that_never_answers_fails_at_the_timeout() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let address = listener.local_addr().unwrap().to_string();
        // Accepted by the kernel's backlog, never read or answered.
        let err = get(&address, "/healthz", Duration::from_millis(200)).unwrap_err();
        assert!(matches!(err, ProbeError::Exchange { .. }), "{err}");
        drop(listener);
    }

    #[test]
    fn a_path_that_would_change_the_request_is_refused() {
        for bad in ["healthz", "/a b", "/a\r\nX-Evil: 1"] {
            let err = get("127.0.0.1:1", bad, WAIT).unwrap_err();
            assert!(matches!(err, ProbeError::BadPath(_)), "{bad:?}: {err}");
        }
    }

    #[test]
    fn an_endless_answer_is_read_only_up_to_the_limit() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let address = listener.local_addr().unwrap().to_string();
        let server = thread::spawn(move || {
            let (mut stream, _) = listener.accept().unwrap();
            let mut request = [0u8; 1024];
            let _ = stream.read(&mut request).unwrap();
            stream.write_all(b"HTTP/1.1 200 OK\r\n\r\n").unwrap();
            let filler = [b'x'; 4096];
            // Stops when the probe closes its end after reading its fill.
            while stream.write_all(&filler).is_ok() {}
        });
        let answer = get(&address, "/status", WAIT).unwrap();
        assert_eq!(answer.status, 200);
        assert_eq!(
            answer.body.len(),
            MAX_PROBE_RESPONSE_BYTES - "HTTP/1.1 200 OK\r\n\r\n".len()
        );
        server.join().unwrap();
    }

    #[test]
    fn parse_refuses_broken_status_lines_and_lengths() {
        for (bad, why) in [
            (&b"HTTP/1.1 abc OK\r\n\r\n"[..], "status code"),
            (
                b"HTTP/1.1 200 OK\r\ncontent-length: x\r\n\r\n",
                "Content-Length",
            ),
            (b"HTTP/1.1 200 OK\r\nno colon\r\n\r\n", "colon"),
            (b"HTTP/1.1 200 OK\r\n", "end of the headers"),
            (
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
                "chunk size",
            ),
        ] {
            let err = parse(bad).unwrap_err();
            assert!(
                err.contains(why),
                "{err} for {:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }
}
