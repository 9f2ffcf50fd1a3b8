//! The embedded default sink: CloudEvents JSON lines appended to a file or written to stdout.

use std::io;
use std::path::Path;
use std::sync::Arc;

use tokio::io::{AsyncWrite, AsyncWriteExt};

use super::{ErrorClass, Outcome, SinkError};
use crate::event::Event;

/// Writes one CloudEvents structured-mode JSON object per line.
pub struct FileSink {
    /// The open file (appending) or stdout.
    out: Box<dyn AsyncWrite + Send + Sync + Unpin>,
    /// Reused across batches to encode without allocating.
    buffer: Vec<u8>,
}

impl FileSink {
    pub async fn open(path: &Path) -> io::Result<FileSink> {
        let file = tokio::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .await?;
        Ok(FileSink {
            out: Box::new(file),
            buffer: Vec::new(),
        })
    }

    pub fn stdout() -> FileSink {
        FileSink {
            out: Box::new(tokio::io::stdout()),
            buffer: Vec::new(),
        }
    }

    /// A batch is one write: the lines reach the OS together or the batch is retried whole.
    pub async fn deliver(&mut self, batch: &[Arc<Event>]) -> Vec<Outcome> {
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

    pub async fn close(&mut self) {
        let _ = self.out.flush().await;
    }
}

/// A full disk or a closed pipe may recover; data the OS refuses as invalid will not.
pub fn classify(error: &io::Error) -> ErrorClass {
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
        let mut sink = FileSink::open(&path).await.unwrap();
        let batch: Vec<Arc<Event>> = (0..3)
            .map(|i| {
                Arc::new(Event::for_test(
                    "message.created",
                    "agent",
                    &format!(r#"{{"id":{i}}}"#),
                ))
            })
            .collect();
        let outcomes = sink.deliver(&batch).await;
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
