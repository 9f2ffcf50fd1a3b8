//! High-rate mode (see [`Blast`]): pre-encoded frames written straight to the socket.

use std::sync::atomic::Ordering;
use std::time::Duration;

use futures_util::SinkExt;
use tokio::io::AsyncWriteExt;
use tokio::time::{Instant, Interval};
use tokio_util::sync::CancellationToken;

use super::events::{encode_message, now_us, ping_frame, streaming_at_least, templates};
use super::socket::Socket;
use super::{Blast, Closed, Shared};

/// Bounds the width of the space-padded `mock_seq` in a blast frame (JSON allows whitespace
/// before a value).
const SEQ_WIDTH: usize = 12;
/// Bounds the width of the space-padded `mock_sent_at_us`.
const SENT_AT_WIDTH: usize = 17;
/// Bounds the width of the space-padded `conversation_id`.
const CONVERSATION_WIDTH: usize = 8;

/// Bounds the frames written with one `write` in a blast.
const BLAST_CHUNK: u64 = 32;

/// One WebSocket text frame (server to client: unmasked), header included.
fn ws_text_frame(payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(payload.len() + 10);
    out.push(0x81);
    match payload.len() {
        n if n < 126 => out.push(n as u8),
        n if n <= u16::MAX as usize => {
            out.push(126);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            out.push(127);
            out.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    out.extend_from_slice(payload);
    out
}

/// Writes `value` right-aligned in `field`, spaces in front.
fn patch_number(field: &mut [u8], mut value: u64) {
    let mut i = field.len();
    loop {
        i -= 1;
        field[i] = b'0' + (value % 10) as u8;
        value /= 10;
        if value == 0 || i == 0 {
            break;
        }
    }
    field[..i].fill(b' ');
}

/// A pre-encoded `message.created` frame and where its numbers are.
struct BlastTemplate {
    /// The whole WebSocket frame, header included; only the number fields change.
    frame: Vec<u8>,
    /// Offset of the `mock_seq` field.
    seq_at: usize,
    /// Offset of the `mock_sent_at_us` field.
    sent_at_at: usize,
    /// Offset of the `conversation_id` field.
    conversation_at: usize,
}

impl BlastTemplate {
    /// The template for events on subscription `identifier`.
    fn new(identifier: &str) -> BlastTemplate {
        let (_, rest) = templates()
            .iter()
            .find(|(name, _)| name == "message.created")
            .expect("the message.created fixture exists");
        let pad = |w: usize| " ".repeat(w);
        let rest = rest.replacen(
            r#""conversation_id":87"#,
            &format!(r#""conversation_id":{}"#, pad(CONVERSATION_WIDTH)),
            1,
        );
        let identifier = serde_json::to_string(identifier).expect("a string serializes");
        let data = format!(
            r#"{{"mock_seq":{},"mock_sent_at_us":{},{rest}"#,
            pad(SEQ_WIDTH),
            pad(SENT_AT_WIDTH)
        );
        let payload = format!(
            r#"{{"identifier":{identifier},"message":{}}}"#,
            encode_message("message.created", &data)
        );
        let frame = ws_text_frame(payload.as_bytes());
        let find = |key: &str| {
            let needle = format!(r#""{key}":"#);
            frame
                .windows(needle.len())
                .position(|w| w == needle.as_bytes())
                .expect("the template has the key")
                + needle.len()
        };
        BlastTemplate {
            seq_at: find("mock_seq"),
            sent_at_at: find("mock_sent_at_us"),
            conversation_at: find("conversation_id"),
            frame,
        }
    }

    /// Appends the frame for one event.
    fn write(&mut self, out: &mut Vec<u8>, seq: u64, sent_at_us: u64, conversation: u64) {
        patch_number(&mut self.frame[self.seq_at..][..SEQ_WIDTH], seq);
        patch_number(
            &mut self.frame[self.sent_at_at..][..SENT_AT_WIDTH],
            sent_at_us,
        );
        patch_number(
            &mut self.frame[self.conversation_at..][..CONVERSATION_WIDTH],
            conversation,
        );
        out.extend_from_slice(&self.frame);
    }
}

/// Writes a connection's blast (see [`Blast`]), answering nothing meanwhile but keeping pings.
pub(super) async fn run_blast(
    ws: &mut Socket,
    shared: &Shared,
    blast: Blast,
    identifier: &str,
    ping: &mut Interval,
    cancel: &CancellationToken,
) -> Result<(), Closed> {
    streaming_at_least(shared, shared.wait_for_subscriptions, cancel).await?;
    ws.flush().await.map_err(|_| Closed)?;
    let mut template = BlastTemplate::new(identifier);
    let conversations = blast.conversations.max(1);
    let stream = ws.get_mut();
    let mut buffer = Vec::with_capacity(template.frame.len() * BLAST_CHUNK as usize);
    let start = Instant::now();
    let mut sent = 0u64;
    while sent < blast.count {
        let due = match blast.rate {
            None => blast.count,
            Some(rate) => blast
                .count
                .min((start.elapsed().as_secs_f64() * rate) as u64 + 1),
        };
        if due <= sent {
            let rate = blast.rate.expect("only a paced blast waits");
            let next = start + Duration::from_secs_f64((sent as f64) / rate);
            tokio::select! {
                _ = cancel.cancelled() => return Err(Closed),
                _ = ping.tick() => {
                    let frame = ws_text_frame(ping_frame().as_bytes());
                    stream.write_all(&frame).await.map_err(|_| Closed)?;
                }
                _ = tokio::time::sleep_until(next) => {}
            }
            continue;
        }
        let n = (due - sent).min(BLAST_CHUNK);
        let first = shared.sequence.fetch_add(n, Ordering::Relaxed);
        let sent_at_us = now_us();
        buffer.clear();
        for seq in first..first + n {
            template.write(&mut buffer, seq, sent_at_us, seq % conversations + 1);
        }
        tokio::select! {
            _ = cancel.cancelled() => return Err(Closed),
            written = stream.write_all(&buffer) => written.map_err(|_| Closed)?,
        }
        sent += n;
    }
    Ok(())
}
