//! The hand-over from the token tasks (their sockets and backfills) to the ingest.

use tokio::sync::mpsc;

use crate::event::Event;
use crate::memory::ByteGate;

/// Where the token tasks hand their events: the ingest's channel, behind the byte gate that
/// bounds the bytes of events on their way to the spool (`memory_limit`).
#[derive(Debug, Clone)]
pub struct EventSender {
    /// The ingest's channel; its capacity bounds the events on their way, the gate their bytes.
    events: mpsc::Sender<Event>,
    /// Taken for each event before it is sent, given back by the ingest once it is appended;
    /// `None` when nothing appends them (a test reading the channel itself).
    gate: Option<ByteGate>,
}

impl From<mpsc::Sender<Event>> for EventSender {
    /// A sender bounded by the channel's capacity alone, for a reader that gives nothing back.
    fn from(events: mpsc::Sender<Event>) -> EventSender {
        EventSender { events, gate: None }
    }
}

impl EventSender {
    /// A sender whose events take their bytes from `gate`, which the ingest reading `events`
    /// gives back.
    pub(crate) fn gated(events: mpsc::Sender<Event>, gate: ByteGate) -> EventSender {
        EventSender {
            events,
            gate: Some(gate),
        }
    }

    /// Hands `event` over, waiting while the gate lacks room for its bytes or the channel is
    /// full. Fails when the ingest is gone. Cancel-safe: an event not sent takes nothing.
    pub(crate) async fn send(&self, event: Event) -> Result<(), mpsc::error::SendError<Event>> {
        let Some(gate) = &self.gate else {
            return self.events.send(event).await;
        };
        // The ingest closes the channel at the shutdown deadline: waiting for the gate ends
        // there too, and the event counts as held at stop.
        let taken = tokio::select! {
            taken = gate.enter(event.memory_bytes()) => taken,
            () = self.events.closed() => return Err(mpsc::error::SendError(event)),
        };
        self.events.send(event).await?;
        // The ingest gives them back once the event is in the spool.
        taken.forget();
        Ok(())
    }
}
