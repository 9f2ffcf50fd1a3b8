//! Why a spool operation failed.

use std::io;
use std::path::{Path, PathBuf};

/// Why a spool operation failed; I/O errors name the operation and the file.
#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    /// A file operation failed; `op` says which ("write spool segment", ...).
    #[error("cannot {op} {}: {error}", path.display())]
    Io {
        /// The operation, worded to follow "cannot".
        op: &'static str,
        /// The file or directory it was done on.
        path: PathBuf,
        /// What the OS said: part of the message, not a separate source, so that an error
        /// chain printed whole (`{:#}`) says it once.
        error: io::Error,
    },
    /// `sinks.json` does not parse, or a record in the middle of the active segment is bad.
    #[error("corrupt spool file {}: {detail}", path.display())]
    Corrupt {
        /// The damaged file.
        path: PathBuf,
        /// What is wrong with it.
        detail: String,
    },
    /// A record that could never fit, whatever is deleted.
    #[error(
        "spool record of {size} bytes (header included) exceeds the spool's max_bytes of {max}"
    )]
    RecordTooLarge {
        /// The record's size on disk, header included.
        size: u64,
        /// The spool's `max_bytes`.
        max: u64,
    },
    /// Masks are `u64`s.
    #[error("{count} sinks configured; a spool serves at most {max}")]
    TooManySinks {
        /// Distinct sinks asked for.
        count: usize,
        /// How many a spool serves: one bit each in a record's sink mask.
        max: usize,
    },
    /// `reader` was asked for a sink that was not passed to `open`.
    #[error("sink {0:?} is not configured for this spool")]
    UnknownSink(String),
    /// Zero sizes.
    #[error("invalid spool configuration: {0}")]
    Config(String),
}

/// Builds the `map_err` closure for an I/O error on `path`.
pub(super) fn io_err<'p>(
    op: &'static str,
    path: &'p Path,
) -> impl FnOnce(io::Error) -> SpoolError + 'p {
    move |error| SpoolError::Io {
        op,
        path: path.to_path_buf(),
        error,
    }
}
