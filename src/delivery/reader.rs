//! The spool cursor of a sink loop that is behind, which may be away on a blocking thread
//! reading the next records ahead while the current ones are sent.

use tokio::task::JoinHandle;
use tracing::error;

use crate::delivery::ingest::MAX_BATCH;
use crate::spool::{SpoolError, SpoolReader};

/// Records read from the spool, as (seq, payload).
pub(super) type Records = Vec<(u64, Vec<u8>)>;

/// The outcome of a spool call: what it read, with the commit it carried (`None`: none).
pub(super) type SpoolRead = (Option<u64>, Result<Records, SpoolError>);

/// A sink loop's spool reader, which may be away on a blocking thread reading the next records
/// ahead (at most one read at a time).
pub(crate) struct FileReader {
    /// The reader; `None` while `ahead` holds it.
    reader: Option<SpoolReader>,
    /// The read ahead under way, and the commit it carries.
    ahead: Option<(Option<u64>, JoinHandle<SpoolIo>)>,
    /// A read ahead that came back, and the commit it carried: its records are sent next.
    read: Option<SpoolRead>,
    /// Bytes of records at which a read stops: the sink's share of `memory_limit` bounds what
    /// one read holds (one record larger than this is read alone).
    read_bytes: usize,
}

/// What a blocking spool call hands back: the reader, and what it read.
type SpoolIo = (SpoolReader, Result<Records, SpoolError>);

impl FileReader {
    /// Reads with `reader`, stopping each read at [`MAX_BATCH`] records or once they hold
    /// `read_bytes`.
    pub(crate) fn new(reader: SpoolReader, read_bytes: usize) -> FileReader {
        FileReader {
            reader: Some(reader),
            ahead: None,
            read: None,
            read_bytes,
        }
    }

    /// Bytes of records at which a read stops.
    pub(super) fn read_bytes(&self) -> usize {
        self.read_bytes
    }

    /// The reader, once a read ahead is back (its outcome waits in `take_read_ahead`).
    /// Cancel-safe: the read stays under way until awaited to the end.
    pub(super) async fn back(&mut self) -> &mut SpoolReader {
        if let Some((_, reading)) = &mut self.ahead {
            let (reader, result) = reading.await.expect("spool reads do not panic");
            let (upto, _) = self.ahead.take().expect("awaited just now");
            self.reader = Some(reader);
            self.read = Some((upto, result));
        }
        self.get()
    }

    /// The reader, which [`FileReader::back`] brought back.
    pub(super) fn get(&mut self) -> &mut SpoolReader {
        assert!(self.ahead.is_none(), "the reader is used only once back");
        self.reader.as_mut().expect("a reader not away is here")
    }

    /// The outcome of the read ahead that came back, with the commit it carried.
    pub(super) fn take_read_ahead(&mut self) -> Option<SpoolRead> {
        self.read.take()
    }

    /// Whether a read ahead came back and its records were not taken yet.
    pub(super) fn has_read_ahead(&self) -> bool {
        self.read.is_some()
    }

    /// Starts reading the next records on a blocking thread, after committing up to `upto`.
    pub(super) fn read_ahead(&mut self, upto: Option<u64>) {
        let reader = self.get_owned();
        let read = Some(self.read_bytes);
        self.ahead = Some((upto, spawn_spool_io(reader, upto, read)));
    }

    /// Commits up to `upto` and, if `read`, reads the next records, now. Reading with records
    /// read ahead not taken would skip them: callers take them first.
    pub(super) async fn io(
        &mut self,
        upto: Option<u64>,
        read: bool,
    ) -> Result<Records, SpoolError> {
        self.back().await;
        debug_assert!(
            !(read && self.read.is_some()),
            "records read ahead not taken"
        );
        let reader = self.get_owned();
        let read = read.then_some(self.read_bytes);
        let (reader, result) = spawn_spool_io(reader, upto, read)
            .await
            .expect("spool reads do not panic");
        self.reader = Some(reader);
        result
    }

    /// [`SpoolReader::wait_for_data`], once the reader is back. Cancel-safe.
    pub(super) async fn wait_for_data(&mut self) {
        self.back().await.wait_for_data().await
    }

    /// Takes the reader out, to hand it to a blocking thread.
    fn get_owned(&mut self) -> SpoolReader {
        self.get();
        self.reader.take().expect("checked by get")
    }
}

/// Commits progress up to `upto` and, if `read` gives a read's bytes, reads the next records:
/// file I/O, on a blocking thread, which needs the reader for the time being.
fn spawn_spool_io(
    mut reader: SpoolReader,
    upto: Option<u64>,
    read: Option<usize>,
) -> JoinHandle<SpoolIo> {
    tokio::task::spawn_blocking(move || {
        let mut result = Ok(Vec::new());
        if let Some(seq) = upto {
            if let Err(e) = reader.commit(seq) {
                // Not fatal: a later commit covers it, and a crash meanwhile re-delivers.
                error!(sink = %reader.sink(), error = %e, "cannot commit spool progress; the batch may be delivered again after a restart");
            }
        }
        if let Some(max_bytes) = read {
            result = reader.read_batch_within(MAX_BATCH, max_bytes);
        }
        (reader, result)
    })
}
