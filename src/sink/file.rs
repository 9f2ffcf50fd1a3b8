//! The embedded default sink: CloudEvents JSON lines appended to a file or written to stdout.

use std::io;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncWrite, AsyncWriteExt};

use super::{settled, Confirmations, Destination, ErrorClass, Outcome, SinkError, SinkLimits};
use crate::event::Event;

/// Where a file sink writes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum FileTarget {
    /// Append to this file, created when missing.
    Append(PathBuf),
    /// Standard output.
    Stdout,
}

/// Errors that stop a file sink from being created.
#[derive(Debug, thiserror::Error)]
pub(crate) enum FileBuildError {
    #[error("cannot open {} for appending: {source}", path.display())]
    Open { path: PathBuf, source: io::Error },
}

/// Writes one CloudEvents structured-mode JSON object per line.
pub struct FileSink {
    /// The open file (appending) or stdout.
    out: Box<dyn AsyncWrite + Send + Sync + Unpin>,
    /// Reused across batches to encode without allocating.
    buffer: Vec<u8>,
}

impl FileSink {
    async fn open(target: &FileTarget) -> Result<FileSink, FileBuildError> {
        let out: Box<dyn AsyncWrite + Send + Sync + Unpin> = match target {
            FileTarget::Append(path) => Box::new(
                tokio::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)
                    .await
                    .map_err(|source| FileBuildError::Open {
                        path: path.clone(),
                        source,
                    })?,
            ),
            FileTarget::Stdout => Box::new(tokio::io::stdout()),
        };
        Ok(FileSink {
            out,
            buffer: Vec::new(),
        })
    }

    /// A batch is one write: the lines reach the OS together or the batch is retried whole.
    async fn write(&mut self, batch: &[Arc<Event>]) -> Vec<Outcome> {
        self.buffer.clear();
        for event in batch {
            event.write_structured(&mut self.buffer);
            self.buffer.push(b'\n');
        }
        let written = async {
            self.out.write_all(&self.buffer).await?;
            self.out.flush().await
        }
        .await;
        match written {
            Ok(()) => batch.iter().map(|_| Outcome::Delivered).collect(),
            Err(e) => {
                let class = classify(&e);
                batch
                    .iter()
                    .map(|_| SinkError::new(format!("write failed: {e}")).outcome(class))
                    .collect()
            }
        }
    }
}

impl Destination for FileSink {
    type Settings = FileTarget;
    type BuildError = FileBuildError;

    async fn build(target: &FileTarget, _: SinkLimits) -> Result<FileSink, FileBuildError> {
        FileSink::open(target).await
    }

    /// The batch is written before this returns: its outcomes are already known.
    async fn send(&mut self, batch: &[Arc<Event>]) -> Confirmations {
        settled(self.write(batch).await)
    }

    /// One writer, one sequential stream.
    fn preserves_key_order(&self) -> bool {
        true
    }

    /// An open file (or stdout) is reached already.
    async fn probe(&self, _within: Duration) -> Result<(), String> {
        Ok(())
    }

    async fn close(&mut self) {
        let _ = self.out.flush().await;
    }
}

/// A full disk or a closed pipe may recover; data the OS refuses as invalid will not.
pub(crate) fn classify(error: &io::Error) -> ErrorClass {
    match error.kind() {
        io::ErrorKind::InvalidInput | io::ErrorKind::InvalidData => ErrorClass::Permanent,
        _ => ErrorClass::Retryable,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classification() {
        let full = io::Error::new(io::ErrorKind::StorageFull, "disk full");
        assert_eq!(classify(&full), ErrorClass::Retryable);
        let invalid = io::Error::new(io::ErrorKind::InvalidData, "bad");
        assert_eq!(classify(&invalid), ErrorClass::Permanent);
    }

    #[tokio::test]
    async fn appends_json_lines() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out.jsonl");
        std::fs::write(&path, "existing\n").unwrap();
        let mut sink = FileSink::open(&FileTarget::Append(path.clone()))
            .await
            .unwrap();
        let batch: Vec<Arc<Event>> = (0..3)
            .map(|i| {
                Arc::new(Event::for_test(
                    "message.created",
                    "agent",
                    &format!(r#"{{"id":{i}}}"#),
                ))
            })
            .collect();
        let outcomes = sink.send(&batch).await.await;
        assert!(outcomes.iter().all(|o| matches!(o, Outcome::Delivered)));
        sink.close().await;
        let text = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 4);
        assert_eq!(lines[0], "existing");
        for (i, line) in lines[1..].iter().enumerate() {
            let v: serde_json::Value = serde_json::from_str(line).unwrap();
            assert_eq!(v["data"]["id"], i);
        }
    }
}
