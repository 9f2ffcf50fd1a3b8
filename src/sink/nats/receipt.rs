//! Receipts for core NATS: proof that the server has read what the sink published.
//!
//! Core NATS acknowledges nothing, and async-nats's `flush` completes once the bytes are in the
//! socket: a server that is frozen, or dies before reading them, loses them although the flush
//! succeeded. So after a batch the sink publishes a numbered marker to an inbox of its own that
//! it subscribes to. The server handles one connection's messages in the order they arrive and
//! routes each before reading the next, so once a marker comes back every message published
//! before it on the connection has been read and routed by the server. It is the round trip of
//! NATS's PING/PONG, which async-nats does not offer to callers.

use async_nats::{Client, PublishError, Subject, Subscriber};
use futures_util::StreamExt;
use tokio::sync::watch;
use tokio_util::task::AbortOnDropHandle;

/// The markers one sink sends and the ones the server has sent back.
pub(crate) struct Receipts {
    /// Where markers go: an inbox (`_INBOX.<unique>`) only this sink subscribes to.
    inbox: Subject,
    /// The number of the last marker handed out. One batch at a time takes the next, and
    /// publishes it after the batch, so markers go out in the order of their numbers.
    sent: u64,
    /// The highest marker number back from the server. Markers come back in the order they
    /// were sent, so every lower one was read too (or was lost with a connection, and its batch
    /// timed out).
    returned: watch::Receiver<u64>,
    /// Reads the markers as they come back; stops with the sink.
    _reader: AbortOnDropHandle<()>,
}

/// One batch's receipt: the marker to publish after the batch, and the wait for it to come back.
pub(crate) struct Receipt {
    /// The sink's inbox.
    inbox: Subject,
    /// The marker's number, which is also its payload.
    number: u64,
    /// The highest number back so far, watched until it reaches `number`.
    returned: watch::Receiver<u64>,
}

impl Receipts {
    /// Subscribes to a fresh inbox. The client subscribes it again after every reconnect.
    pub(crate) async fn start(client: &Client) -> Result<Receipts, async_nats::SubscribeError> {
        let inbox = Subject::from(client.new_inbox());
        let subscriber = client.subscribe(inbox.clone()).await?;
        let (tell, returned) = watch::channel(0);
        let reader = tokio::spawn(read_markers(subscriber, tell));
        Ok(Receipts {
            inbox,
            sent: 0,
            returned,
            _reader: AbortOnDropHandle::new(reader),
        })
    }

    /// The receipt of the next batch.
    pub(crate) fn next(&mut self) -> Receipt {
        self.sent += 1;
        Receipt {
            inbox: self.inbox.clone(),
            number: self.sent,
            returned: self.returned.clone(),
        }
    }
}

impl Receipt {
    /// Hands the marker to the client, behind everything published before it.
    pub(crate) async fn send(&self, client: &Client) -> Result<(), PublishError> {
        let marker = bytes::Bytes::from(self.number.to_string());
        client.publish(self.inbox.clone(), marker).await
    }

    /// Waits until the server has sent the marker back (unbounded: the caller times it out).
    pub(crate) async fn returned(mut self) {
        let number = self.number;
        // An error means the reader stopped (the sink is going away): never returned.
        if self
            .returned
            .wait_for(|back| *back >= number)
            .await
            .is_err()
        {
            std::future::pending::<()>().await;
        }
    }
}

/// Records the number of each marker that comes back. Anything else on the inbox (it is a
/// plain subject another client could publish to) is ignored.
async fn read_markers(mut subscriber: Subscriber, tell: watch::Sender<u64>) {
    while let Some(message) = subscriber.next().await {
        let Some(number) = std::str::from_utf8(&message.payload)
            .ok()
            .and_then(|text| text.parse::<u64>().ok())
        else {
            continue;
        };
        tell.send_if_modified(|back| {
            let newer = number > *back;
            if newer {
                *back = number;
            }
            newer
        });
    }
}
