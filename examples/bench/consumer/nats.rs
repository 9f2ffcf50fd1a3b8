//! The NATS consumer, for core NATS and JetStream alike: a core subscription on `bench.>`.
//!
//! For JetStream it first creates the stream the bridge and the bare pipe publish into.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use futures_util::{FutureExt, StreamExt};

use super::Patience;
use crate::args::Args;
use crate::tally::Tally;

/// The subject every producer publishes under.
const SUBJECT: &str = "bench.>";

/// Bounds the JetStream stream's size: 1,000,000 events of ~1 KB fit with room to spare.
const STREAM_MAX_BYTES: i64 = 4 << 30;

/// Bounds the raw reader's buffer, and so the socket reads per message.
const READ_BUFFER_BYTES: usize = 1 << 20;

pub(super) async fn consume(
    args: &Args,
    sink: &str,
    tally: &Arc<Mutex<Tally>>,
    patience: Patience,
) -> Result<()> {
    let url = args.str("url", "nats://127.0.0.1:4222");
    let client = async_nats::ConnectOptions::new()
        .subscription_capacity(1 << 20)
        .connect(url.as_str())
        .await?;
    if sink == "jetstream" {
        create_stream(&client).await?;
    }
    if !reads_raw() {
        return read_with_client(&client, tally, patience).await;
    }
    // The client was only needed to set the stream up.
    drop(client);
    let addr = url.trim_start_matches("nats://").to_owned();
    let counting = tally.clone();
    tokio::task::spawn_blocking(move || {
        let mut tally = counting.lock().expect("tally lock");
        read_raw(&addr, &mut tally, patience)
    })
    .await?
}

/// The stream `BENCH` on `bench.>`, recreated empty.
async fn create_stream(client: &async_nats::Client) -> Result<()> {
    let js = async_nats::jetstream::new(client.clone());
    let _ = js.delete_stream("BENCH").await;
    js.create_stream(async_nats::jetstream::stream::Config {
        name: "BENCH".into(),
        subjects: vec!["bench.>".into()],
        max_bytes: STREAM_MAX_BYTES,
        duplicate_window: Duration::from_secs(120),
        ..Default::default()
    })
    .await
    .map_err(|e| anyhow!("create stream: {e}"))?;
    Ok(())
}

/// `BENCH_NATS_CONSUMER`: how the consumer reads NATS. `raw` (the default) reads the protocol
/// itself ([`read_raw`]); `client` subscribes with async-nats.
fn reads_raw() -> bool {
    match std::env::var("BENCH_NATS_CONSUMER").as_deref() {
        Ok("client") => false,
        Ok("raw" | "") | Err(_) => true,
        Ok(other) => panic!("BENCH_NATS_CONSUMER={other}: expected raw or client"),
    }
}

/// Counts the messages on [`SUBJECT`] with an async-nats subscription
/// (`BENCH_NATS_CONSUMER=client`).
async fn read_with_client(
    client: &async_nats::Client,
    tally: &Mutex<Tally>,
    patience: Patience,
) -> Result<()> {
    let mut sub = client.subscribe(SUBJECT).await?;
    client.flush().await?;
    println!("READY");
    loop {
        let wait = patience.next_wait(tally);
        tokio::select! {
            m = sub.next() => match m {
                Some(m) => {
                    let mut t = tally.lock().expect("tally lock");
                    t.record(&m.payload);
                    // Whatever else is ready, without two timers per message.
                    while let Some(Some(m)) = sub.next().now_or_never() {
                        t.record(&m.payload);
                    }
                    if t.done() { break; }
                }
                None => break,
            },
            _ = tokio::time::sleep(wait) => break,
            _ = tokio::time::sleep_until(patience.deadline) => break,
        }
    }
    Ok(())
}

/// A socket read that ended for its timeout (the consumer's idle or overall limit).
fn timed_out(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
    )
}

/// Whether a read got its bytes or the stream ended (closed, or quiet past the timeout).
#[derive(PartialEq, Eq)]
enum ReadOutcome {
    Got,
    Ended,
}

/// One protocol line from the server, as the raw reader acts on it.
enum Op {
    /// `MSG`/`HMSG`: a message of `total` bytes whose first `headers` are its header block.
    Message {
        headers: usize,
        total: usize,
    },
    Ping,
    Pong,
    /// `+OK`, `INFO`: nothing to do.
    Ignored,
}

/// Parses one line (without its CRLF). `MSG <subject> <sid> [reply] <bytes>`;
/// `HMSG <subject> <sid> [reply] <header bytes> <total bytes>`.
fn parse_op(text: &str) -> Result<Op> {
    let op = text.split(' ').next().unwrap_or_default();
    match op {
        "MSG" | "HMSG" => {
            let numbers: Vec<usize> = text
                .rsplit(' ')
                .take(if op == "MSG" { 1 } else { 2 })
                .map(str::parse)
                .collect::<Result<_, _>>()
                .with_context(|| format!("bad {op} line: {text}"))?;
            let (headers, total) = match numbers[..] {
                [total] => (0, total),
                [total, headers] => (headers, total),
                _ => bail!("bad {op} line: {text}"),
            };
            if headers > total {
                bail!("bad {op} line: {text}");
            }
            Ok(Op::Message { headers, total })
        }
        "PING" => Ok(Op::Ping),
        "PONG" => Ok(Op::Pong),
        "+OK" | "INFO" => Ok(Op::Ignored),
        "-ERR" => bail!("{text}"),
        _ => bail!("unexpected line: {text}"),
    }
}

/// A blocking connection that reads the NATS text protocol itself.
struct RawConnection {
    /// Where PONGs are written.
    socket: TcpStream,
    /// Buffered reads of the same socket.
    reader: BufReader<TcpStream>,
    /// The current protocol line, reused.
    line: Vec<u8>,
    /// The current message with its CRLF, reused.
    body: Vec<u8>,
}

impl RawConnection {
    /// Connects, checks the server's INFO, and subscribes; the PONG to the PING sent with the
    /// SUB answers only after the SUB is registered: then the consumer is ready.
    fn subscribe(addr: &str, limit: Duration) -> Result<RawConnection> {
        let mut socket = TcpStream::connect(addr).with_context(|| format!("connect {addr}"))?;
        socket.set_nodelay(true)?;
        socket.set_read_timeout(Some(limit))?;
        let reader = BufReader::with_capacity(READ_BUFFER_BYTES, socket.try_clone()?);
        let mut connection = RawConnection {
            socket: socket.try_clone()?,
            reader,
            line: Vec::with_capacity(256),
            body: Vec::new(),
        };
        connection.reader.read_until(b'\n', &mut connection.line)?;
        if !connection.line.starts_with(b"INFO ") {
            bail!(
                "{addr} is not a NATS server: {}",
                String::from_utf8_lossy(&connection.line)
            );
        }
        write!(
            socket,
            "CONNECT {{\"verbose\":false,\"pedantic\":false,\"headers\":true,\"protocol\":1}}\r\nSUB {SUBJECT} 1\r\nPING\r\n"
        )?;
        Ok(connection)
    }

    fn read_line(&mut self) -> Result<ReadOutcome> {
        self.line.clear();
        match self.reader.read_until(b'\n', &mut self.line) {
            Ok(0) => Ok(ReadOutcome::Ended),
            Ok(_) => Ok(ReadOutcome::Got),
            Err(e) if timed_out(&e) => Ok(ReadOutcome::Ended),
            Err(e) => Err(e.into()),
        }
    }

    /// Reads a message of `total` bytes and its CRLF; counts what follows the header block.
    fn read_message(
        &mut self,
        headers: usize,
        total: usize,
        tally: &mut Tally,
    ) -> Result<ReadOutcome> {
        self.body.resize(total + 2, 0);
        match self.reader.read_exact(&mut self.body) {
            Ok(()) => {}
            // Idle in the middle of a message: report what was counted.
            Err(e) if timed_out(&e) => return Ok(ReadOutcome::Ended),
            Err(e) => return Err(e.into()),
        }
        if !self.body.ends_with(b"\r\n") {
            bail!("message of {total} bytes not followed by CRLF: out of step with the stream");
        }
        tally.record(&self.body[headers..total]);
        Ok(ReadOutcome::Got)
    }
}

/// Counts the messages on [`SUBJECT`] by reading the NATS text protocol directly, skipping each
/// message's header block. The instrument's cost per message must not depend on the headers a
/// producer sends: async-nats parses every header into its `HeaderMap`, 40% of the consumer's
/// CPU with the bridge's 10 CloudEvents headers, a cost the bare pipe's headerless messages do
/// not carry; with it the consumer, not the bridge, was the slowest process of a backlog drain.
fn read_raw(addr: &str, tally: &mut Tally, patience: Patience) -> Result<()> {
    let deadline = Instant::now() + patience.limit;
    let mut connection = RawConnection::subscribe(addr, patience.limit)?;
    let mut announced_ready = false;
    let mut idle_timeout_set = false;
    while !tally.done() && Instant::now() < deadline {
        if tally.first.is_some() && !idle_timeout_set {
            connection.socket.set_read_timeout(Some(patience.idle))?;
            idle_timeout_set = true;
        }
        if connection.read_line()? == ReadOutcome::Ended {
            break;
        }
        let text = std::str::from_utf8(&connection.line)?.trim_end();
        let op = parse_op(text).with_context(|| format!("from {addr}"))?;
        match op {
            Op::Message { headers, total } => {
                if connection.read_message(headers, total, tally)? == ReadOutcome::Ended {
                    break;
                }
            }
            Op::Ping => connection.socket.write_all(b"PONG\r\n")?,
            Op::Pong if !announced_ready => {
                announced_ready = true;
                println!("READY");
                std::io::stdout().flush()?;
            }
            Op::Pong | Op::Ignored => {}
        }
    }
    Ok(())
}
