//! Dead letters: events a sink refused for good, or could not deliver before `max_elapsed`.
//!
//! They are kept on local disk, one JSON line each in `<spool dir>/dead-letters/<sink>.jsonl`,
//! with the error, the attempt count and the times, and the whole event in CloudEvents
//! structured form (readable by `jq`, and enough to rebuild the event). `dlq replay` renames the
//! file to `<sink>.replay-<n>.jsonl`; the running daemon (or the next one to start) picks such
//! files up, puts their events back into the spool for that sink, and deletes them. Renames are
//! atomic, so a dead letter is always in exactly one place.

use std::fs::{self, File, OpenOptions};
use std::io::{self, BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use crate::event::{Event, EventId, JsonText};

/// One event that will not be delivered without an operator.
#[derive(Debug, Clone)]
pub struct DeadLetter {
    pub event: Event,
    /// The last error, in words.
    pub error: String,
    pub attempts: u32,
    pub first_attempt: SystemTime,
    pub last_attempt: SystemTime,
}

#[derive(Debug, thiserror::Error)]
pub enum DeadLetterError {
    #[error("cannot {action} {path}: {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    #[error("{path} line {line}: not a dead letter written by this program ({reason})")]
    Corrupt {
        path: PathBuf,
        line: usize,
        reason: String,
    },
}

/// The line as stored.
#[derive(Serialize, Deserialize)]
struct Line<'a> {
    sink: &'a str,
    error: &'a str,
    attempts: u32,
    first_attempt: String,
    last_attempt: String,
    #[serde(borrow)]
    event: &'a RawValue,
}

/// The CloudEvent fields needed to rebuild an [`Event`].
#[derive(Deserialize)]
struct StoredEvent<'a> {
    id: &'a str,
    source: &'a str,
    time: &'a str,
    chatwootevent: &'a str,
    chatwoottoken: &'a str,
    #[serde(borrow)]
    data: &'a RawValue,
}

/// The dead letter files of every sink.
#[derive(Debug, Clone)]
pub struct DeadLetters {
    /// `<spool dir>/dead-letters`.
    dir: PathBuf,
}

impl DeadLetters {
    /// Opens (creating if needed) the dead letter folder under `spool_dir`.
    pub fn open(spool_dir: &Path) -> Result<DeadLetters, DeadLetterError> {
        let dir = spool_dir.join("dead-letters");
        fs::create_dir_all(&dir).map_err(|source| DeadLetterError::Io {
            action: "create",
            path: dir.clone(),
            source,
        })?;
        Ok(DeadLetters { dir })
    }

    fn file(&self, sink: &str) -> PathBuf {
        self.dir.join(format!("{sink}.jsonl"))
    }

    /// Holds the folder's lock (shared by the daemon and the `dlq` command) while `f` runs, so
    /// a dead letter being written never lands in a file that `dlq replay` has just renamed.
    fn exclusively<T>(
        &self,
        f: impl FnOnce() -> Result<T, DeadLetterError>,
    ) -> Result<T, DeadLetterError> {
        let path = self.dir.join(".lock");
        let io_error = |action, source| DeadLetterError::Io {
            action,
            path: path.clone(),
            source,
        };
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(|e| io_error("open", e))?;
        lock.lock().map_err(|e| io_error("lock", e))?;
        let result = f();
        drop(lock); // closing the file releases the lock
        result
    }

    /// Appends and fsyncs: dead letters are rare, and losing one would be silent.
    pub fn append(&self, sink: &str, letters: &[DeadLetter]) -> Result<(), DeadLetterError> {
        self.exclusively(|| self.append_unlocked(sink, letters))
    }

    fn append_unlocked(&self, sink: &str, letters: &[DeadLetter]) -> Result<(), DeadLetterError> {
        let path = self.file(sink);
        let io_error = |action, source| DeadLetterError::Io {
            action,
            path: path.clone(),
            source,
        };
        let mut text = Vec::new();
        for letter in letters {
            let mut event = Vec::new();
            letter.event.write_structured(&mut event);
            let event = String::from_utf8(event).expect("structured events are UTF-8");
            let line = Line {
                sink,
                error: &letter.error,
                attempts: letter.attempts,
                first_attempt: humantime::format_rfc3339_millis(letter.first_attempt).to_string(),
                last_attempt: humantime::format_rfc3339_millis(letter.last_attempt).to_string(),
                event: &RawValue::from_string(event).expect("structured events are JSON"),
            };
            serde_json::to_writer(&mut text, &line).expect("writing JSON to a Vec cannot fail");
            text.push(b'\n');
        }
        let mut file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(|e| io_error("open", e))?;
        file.write_all(&text).map_err(|e| io_error("write", e))?;
        file.sync_data().map_err(|e| io_error("fsync", e))
    }

    /// The dead letters of `sink`, oldest first.
    pub fn list(&self, sink: &str) -> Result<Vec<DeadLetter>, DeadLetterError> {
        read_file(&self.file(sink))
    }

    /// Deletes the dead letters of `sink`; returns how many there were.
    pub fn purge(&self, sink: &str) -> Result<usize, DeadLetterError> {
        self.exclusively(|| self.purge_unlocked(sink))
    }

    fn purge_unlocked(&self, sink: &str) -> Result<usize, DeadLetterError> {
        let path = self.file(sink);
        let count = read_file(&path)?.len();
        match fs::remove_file(&path) {
            Ok(()) => Ok(count),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(0),
            Err(source) => Err(DeadLetterError::Io {
                action: "delete",
                path,
                source,
            }),
        }
    }

    /// Queues the dead letters of `sink` for redelivery; returns how many.
    pub fn queue_replay(&self, sink: &str) -> Result<usize, DeadLetterError> {
        self.exclusively(|| self.queue_replay_unlocked(sink))
    }

    fn queue_replay_unlocked(&self, sink: &str) -> Result<usize, DeadLetterError> {
        let path = self.file(sink);
        let count = read_file(&path)?.len();
        if count == 0 {
            return Ok(0);
        }
        let stamp = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        let target = self.dir.join(format!("{sink}.replay-{stamp}.jsonl"));
        fs::rename(&path, &target).map_err(|source| DeadLetterError::Io {
            action: "rename",
            path,
            source,
        })?;
        Ok(count)
    }

    /// Replay files waiting to be put back into the spool: `(sink, file)`.
    pub fn pending_replays(&self) -> Result<Vec<(String, PathBuf)>, DeadLetterError> {
        let entries = fs::read_dir(&self.dir).map_err(|source| DeadLetterError::Io {
            action: "list",
            path: self.dir.clone(),
            source,
        })?;
        let mut replays = Vec::new();
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if let Some((sink, _)) = name.split_once(".replay-") {
                replays.push((sink.to_owned(), entry.path()));
            }
        }
        replays.sort_by(|a, b| a.1.cmp(&b.1));
        Ok(replays)
    }

    /// The events of a replay file.
    pub fn read_replay(&self, path: &Path) -> Result<Vec<Event>, DeadLetterError> {
        Ok(read_file(path)?.into_iter().map(|l| l.event).collect())
    }

    /// Removes a replay file once its events are back in the spool.
    pub fn finish_replay(&self, path: &Path) -> Result<(), DeadLetterError> {
        fs::remove_file(path).map_err(|source| DeadLetterError::Io {
            action: "delete",
            path: path.to_owned(),
            source,
        })
    }
}

fn read_file(path: &Path) -> Result<Vec<DeadLetter>, DeadLetterError> {
    let file = match File::open(path) {
        Ok(file) => file,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => {
            return Err(DeadLetterError::Io {
                action: "open",
                path: path.to_owned(),
                source,
            })
        }
    };
    let mut letters = Vec::new();
    for (i, line) in BufReader::new(file).lines().enumerate() {
        let line = line.map_err(|source| DeadLetterError::Io {
            action: "read",
            path: path.to_owned(),
            source,
        })?;
        if line.trim().is_empty() {
            continue;
        }
        let corrupt = |reason: String| DeadLetterError::Corrupt {
            path: path.to_owned(),
            line: i + 1,
            reason,
        };
        let stored: Line = serde_json::from_str(&line).map_err(|e| corrupt(e.to_string()))?;
        let event: StoredEvent =
            serde_json::from_str(stored.event.get()).map_err(|e| corrupt(e.to_string()))?;
        let time =
            |t: &str| humantime::parse_rfc3339(t).map_err(|e| corrupt(format!("time `{t}`: {e}")));
        let id = u128::from_str_radix(event.id, 16).map_err(|e| corrupt(format!("id: {e}")))?;
        let mut rebuilt = Event::new(
            event.chatwootevent,
            JsonText::from_raw(event.data),
            Arc::from(event.chatwoottoken),
            Arc::from(event.source),
            time(event.time)?,
        );
        rebuilt.id = EventId(id);
        letters.push(DeadLetter {
            event: rebuilt,
            error: stored.error.to_owned(),
            attempts: stored.attempts,
            first_attempt: time(&stored.first_attempt)?,
            last_attempt: time(&stored.last_attempt)?,
        });
    }
    Ok(letters)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn letter(n: u32) -> DeadLetter {
        let mut event = Event::for_test(
            "message.created",
            "agent",
            &format!(r#"{{"account_id":1,"conversation_id":9,"n":{n}}}"#),
        );
        event.id = EventId(u128::from(n) << 64 | 0xabc);
        DeadLetter {
            event,
            error: "HTTP 400 Bad Request".into(),
            attempts: n,
            first_attempt: SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_781_964_126),
            last_attempt: SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_781_964_130),
        }
    }

    #[test]
    fn append_list_replay_purge() {
        let dir = tempfile::tempdir().unwrap();
        let store = DeadLetters::open(dir.path()).unwrap();
        assert!(store.list("hook").unwrap().is_empty());
        store.append("hook", &[letter(1), letter(2)]).unwrap();
        store.append("hook", &[letter(3)]).unwrap();
        let listed = store.list("hook").unwrap();
        assert_eq!(listed.len(), 3);
        assert_eq!(listed[1].attempts, 2);
        assert_eq!(listed[1].error, "HTTP 400 Bad Request");
        assert_eq!(listed[1].event.id, letter(2).event.id);
        assert_eq!(listed[1].event.data.get(), letter(2).event.data.get());
        assert_eq!(listed[1].event.keys.conversation_id, Some(9));
        assert_eq!(listed[1].first_attempt, letter(2).first_attempt);

        assert_eq!(store.queue_replay("hook").unwrap(), 3);
        assert!(store.list("hook").unwrap().is_empty());
        let replays = store.pending_replays().unwrap();
        assert_eq!(replays.len(), 1);
        assert_eq!(replays[0].0, "hook");
        let events = store.read_replay(&replays[0].1).unwrap();
        assert_eq!(events.len(), 3);
        store.finish_replay(&replays[0].1).unwrap();
        assert!(store.pending_replays().unwrap().is_empty());

        store.append("hook", &[letter(4)]).unwrap();
        assert_eq!(store.purge("hook").unwrap(), 1);
        assert!(store.list("hook").unwrap().is_empty());
        assert_eq!(store.purge("hook").unwrap(), 0);
    }

    #[test]
    fn a_damaged_file_is_reported_with_its_line() {
        let dir = tempfile::tempdir().unwrap();
        let store = DeadLetters::open(dir.path()).unwrap();
        store.append("hook", &[letter(1)]).unwrap();
        let path = dir.path().join("dead-letters/hook.jsonl");
        let mut text = fs::read_to_string(&path).unwrap();
        text.push_str("{not json\n");
        fs::write(&path, text).unwrap();
        let err = store.list("hook").unwrap_err().to_string();
        assert!(err.contains("hook.jsonl line 2"), "{err}");
    }
}
