//! Dead letters: events a sink refused for good, or could not deliver before `max_elapsed`.
//!
//! They are kept on local disk, one JSON line each in `<spool dir>/dead-letters/<sink>.jsonl`,
//! with the error, the attempt count and the times, and the whole event in CloudEvents
//! structured form (readable by `jq`, and enough to rebuild the event). `dlq replay` renames the
//! file to `<sink>.replay-<n>.jsonl`; the running daemon (or the next one to start) picks such
//! files up, puts their events back into the spool for that sink, and deletes them. Renames are
//! atomic, so a dead letter is always in exactly one place. Files are read a line at a time, so
//! memory does not grow with them; a replay that stops half way (a full spool, a restart) records
//! where it got to and goes on from there.

use std::fs::{self, File, OpenOptions};
use std::io::{self, BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use crate::event::{Event, EventId, JsonText};
use crate::spool::{create_dir_durably, fsync_dir};

/// One event that will not be delivered without an operator.
#[derive(Debug, Clone)]
pub struct DeadLetter {
    /// The whole event, to deliver it again after `dlq replay`.
    pub event: Event,
    /// The last error, in words.
    pub error: String,
    /// How many times delivery was tried.
    pub attempts: u32,
    /// When delivery was first tried.
    pub first_attempt: SystemTime,
    /// When it was given up.
    pub last_attempt: SystemTime,
}

/// A dead letter file that cannot be written or read.
#[derive(Debug, thiserror::Error)]
pub enum DeadLetterError {
    /// A file operation failed.
    #[error("cannot {action} {path}: {source}")]
    Io {
        /// What was being done ("open", "write", "rename", ...).
        action: &'static str,
        /// The file or folder it was done to.
        path: PathBuf,
        /// Why it failed.
        source: io::Error,
    },
    /// A line (or a replay's progress file) that this program did not write.
    #[error("{path} line {line}: not a dead letter written by this program ({reason})")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// Its line number, from 1.
        line: usize,
        /// What is wrong with it.
        reason: String,
    },
}

/// The line as stored.
#[derive(Serialize, Deserialize)]
struct Line<'a> {
    /// The sink that gave the event up.
    sink: &'a str,
    /// [`DeadLetter::error`].
    error: &'a str,
    /// [`DeadLetter::attempts`].
    attempts: u32,
    /// [`DeadLetter::first_attempt`], RFC 3339.
    first_attempt: String,
    /// [`DeadLetter::last_attempt`], RFC 3339.
    last_attempt: String,
    /// The event in CloudEvents structured form.
    #[serde(borrow)]
    event: &'a RawValue,
}

/// The CloudEvent fields needed to rebuild an [`Event`].
#[derive(Deserialize)]
struct StoredEvent<'a> {
    /// The event id, hex.
    id: &'a str,
    /// The CloudEvents `source`.
    source: &'a str,
    /// The CloudEvents `time`, when it was received.
    time: &'a str,
    /// The Chatwoot event name.
    chatwootevent: &'a str,
    /// The name of the token whose socket received it.
    chatwoottoken: &'a str,
    /// The event's `data`, as the sink was given it.
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
        create_dir_durably(&dir).map_err(|source| DeadLetterError::Io {
            action: "create",
            path: dir.clone(),
            source,
        })?;
        Ok(DeadLetters { dir })
    }

    /// The dead letter file of `sink`.
    fn file(&self, sink: &str) -> PathBuf {
        self.dir.join(format!("{sink}.jsonl"))
    }

    /// Fsyncs the folder, so that a dead letter file created since survives a machine crash
    /// (`append` fsyncs the lines; the file's name is in the folder).
    pub(crate) fn sync_folder(&self) -> Result<(), DeadLetterError> {
        File::open(&self.dir)
            .and_then(|folder| folder.sync_all())
            .map_err(|source| DeadLetterError::Io {
                action: "fsync",
                path: self.dir.clone(),
                source,
            })
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
        let created = file.metadata().map_err(|e| io_error("inspect", e))?.len() == 0;
        file.write_all(&text).map_err(|e| io_error("write", e))?;
        file.sync_data().map_err(|e| io_error("fsync", e))?;
        if created {
            self.fsync_dir()?;
        }
        Ok(())
    }

    /// Fsyncs the folder, so that a file created or renamed in it stays so after a machine
    /// crash (a file's own fsync does not make its name durable).
    fn fsync_dir(&self) -> Result<(), DeadLetterError> {
        fsync_dir(&self.dir).map_err(|source| DeadLetterError::Io {
            action: "fsync",
            path: self.dir.clone(),
            source,
        })
    }

    /// The dead letters of `sink`, oldest first. Collects them all: for tests and small files;
    /// [`DeadLetters::each`] reads one at a time.
    pub fn list(&self, sink: &str) -> Result<Vec<DeadLetter>, DeadLetterError> {
        let mut letters = Vec::new();
        self.each(sink, |letter| letters.push(letter))?;
        Ok(letters)
    }

    /// Calls `f` with each dead letter of `sink`, oldest first; returns how many there were.
    pub fn each(&self, sink: &str, f: impl FnMut(DeadLetter)) -> Result<usize, DeadLetterError> {
        LetterReader::open(&self.file(sink), ReplayPosition::START)?.for_each(f)
    }

    /// Deletes the dead letters of `sink`; returns how many there were.
    pub fn purge(&self, sink: &str) -> Result<usize, DeadLetterError> {
        self.exclusively(|| self.purge_unlocked(sink))
    }

    fn purge_unlocked(&self, sink: &str) -> Result<usize, DeadLetterError> {
        let path = self.file(sink);
        let count = self.each(sink, drop)?;
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
        // Every line is read first: a damaged file is reported, not queued.
        let count = self.each(sink, drop)?;
        if count == 0 {
            return Ok(0);
        }
        let mut stamp = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        // A rename onto a waiting replay (a clock stepped back) would drop its letters; a
        // progress file of an old replay of the same name would skip some of these.
        let target = loop {
            let target = self.dir.join(format!("{sink}.replay-{stamp}.jsonl"));
            if !target.exists() && !progress_file(&target).exists() {
                break target;
            }
            stamp += 1;
        };
        fs::rename(&path, &target).map_err(|source| DeadLetterError::Io {
            action: "rename",
            path,
            source,
        })?;
        self.fsync_dir()?;
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
            if let Some(sink) = replay_sink(&name) {
                replays.push((sink.to_owned(), entry.path()));
                continue;
            }
            let progress_of = name
                .strip_suffix(PROGRESS_SUFFIX)
                .or_else(|| name.strip_suffix(PROGRESS_TEMPORARY_SUFFIX));
            if let Some(replay) = progress_of.filter(|replay| replay_sink(replay).is_some()) {
                // Left behind when a replay ended between deleting its file and this one.
                if !self.dir.join(replay).exists() {
                    let _ = fs::remove_file(entry.path());
                }
            }
        }
        replays.sort_by(|a, b| a.1.cmp(&b.1));
        Ok(replays)
    }

    /// Reads a replay file from where an earlier replay of it stopped (its start the first time).
    pub(crate) fn resume_replay(&self, path: &Path) -> Result<LetterReader, DeadLetterError> {
        let progress = progress_file(path);
        let from = match fs::read_to_string(&progress) {
            Ok(text) => ReplayPosition::parse(&text).ok_or_else(|| DeadLetterError::Corrupt {
                path: progress.clone(),
                line: 1,
                reason: format!("expected `<byte offset> <line>`, found {text:?}"),
            })?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => ReplayPosition::START,
            Err(source) => {
                return Err(DeadLetterError::Io {
                    action: "read",
                    path: progress,
                    source,
                })
            }
        };
        LetterReader::open(path, from)
    }

    /// Records that the letters of a replay file before `upto` are back in the spool, so that a
    /// replay stopped after this goes on from there. Written to a temporary file, fsynced and
    /// renamed: a crash leaves the old position or the new one, and at worst letters after the
    /// old one are put back twice, never skipped.
    pub(crate) fn replay_done_upto(
        &self,
        path: &Path,
        upto: ReplayPosition,
    ) -> Result<(), DeadLetterError> {
        let progress = progress_file(path);
        let temporary = with_suffix(path, PROGRESS_TEMPORARY_SUFFIX);
        let io_error = |action, path: &Path, source| DeadLetterError::Io {
            action,
            path: path.to_owned(),
            source,
        };
        let mut file = File::create(&temporary).map_err(|e| io_error("create", &temporary, e))?;
        file.write_all(format!("{} {}\n", upto.offset, upto.line).as_bytes())
            .and_then(|()| file.sync_data())
            .map_err(|e| io_error("write", &temporary, e))?;
        fs::rename(&temporary, &progress).map_err(|e| io_error("rename", &progress, e))?;
        self.fsync_dir()
    }

    /// Removes a replay file once its events are back in the spool, then its progress.
    pub(crate) fn finish_replay(&self, path: &Path) -> Result<(), DeadLetterError> {
        fs::remove_file(path).map_err(|source| DeadLetterError::Io {
            action: "delete",
            path: path.to_owned(),
            source,
        })?;
        match fs::remove_file(progress_file(path)) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => {
                // Harmless: `pending_replays` removes it once the file it belongs to is gone.
                tracing::warn!(file = %path.display(), error = %e, "cannot delete a replay's progress file");
                Ok(())
            }
            _ => Ok(()),
        }
    }
}

/// After a replay file's name, the file that says how far its replay got.
const PROGRESS_SUFFIX: &str = ".progress";

/// After a replay file's name, the next progress while it is written.
const PROGRESS_TEMPORARY_SUFFIX: &str = ".progress-new";

/// The sink of a replay file's name, `<sink>.replay-<stamp>.jsonl`; `None` for other files,
/// including a sink's own dead letters when its name has `.replay-` in it.
fn replay_sink(name: &str) -> Option<&str> {
    let (sink, stamp) = name.strip_suffix(".jsonl")?.rsplit_once(".replay-")?;
    (!sink.is_empty() && !stamp.is_empty() && stamp.bytes().all(|b| b.is_ascii_digit()))
        .then_some(sink)
}

/// The file that says how far the replay of `replay` got.
fn progress_file(replay: &Path) -> PathBuf {
    with_suffix(replay, PROGRESS_SUFFIX)
}

/// `path` with `suffix` after its whole name (not in place of an extension).
fn with_suffix(path: &Path, suffix: &str) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(suffix);
    PathBuf::from(name)
}

/// A place in a dead-letter file: just past a line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ReplayPosition {
    /// Where the next line starts, in bytes.
    offset: u64,
    /// How many lines come before it: errors name lines, however far into a file a replay
    /// resumed.
    line: usize,
}

impl ReplayPosition {
    /// The start of a file.
    const START: ReplayPosition = ReplayPosition { offset: 0, line: 0 };

    /// A position as a progress file holds it: `<byte offset> <line>`.
    fn parse(text: &str) -> Option<ReplayPosition> {
        let (offset, line) = text.trim().split_once(' ')?;
        Some(ReplayPosition {
            offset: offset.parse().ok()?,
            line: line.parse().ok()?,
        })
    }
}

/// Reads a dead-letter file one line at a time from a position: memory holds one line however
/// many the file has.
pub(crate) struct LetterReader {
    /// For errors.
    path: PathBuf,
    /// `None` when the file does not exist: no letters.
    lines: Option<BufReader<File>>,
    /// Just past the last line read.
    position: ReplayPosition,
    /// The line being read, reused.
    buffer: String,
}

impl LetterReader {
    fn open(path: &Path, from: ReplayPosition) -> Result<LetterReader, DeadLetterError> {
        let io_error = |action, source| DeadLetterError::Io {
            action,
            path: path.to_owned(),
            source,
        };
        let lines = match File::open(path) {
            Ok(mut file) => {
                if from.offset > 0 {
                    // A position from another file, or from before the file was rewritten,
                    // would skip letters: it must be just past a line of this one.
                    let mut before = [0u8; 1];
                    file.seek(SeekFrom::Start(from.offset - 1))
                        .and_then(|_| file.read_exact(&mut before))
                        .ok()
                        .filter(|()| before == *b"\n")
                        .ok_or_else(|| DeadLetterError::Corrupt {
                            path: path.to_owned(),
                            line: from.line,
                            reason: format!(
                                "a replay recorded as done up to byte {}, which does not end a line of this file",
                                from.offset
                            ),
                        })?;
                }
                file.seek(SeekFrom::Start(from.offset))
                    .map_err(|e| io_error("seek", e))?;
                Some(BufReader::new(file))
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => None,
            Err(e) => return Err(io_error("open", e)),
        };
        Ok(LetterReader {
            path: path.to_owned(),
            lines,
            position: from,
            buffer: String::new(),
        })
    }

    /// Just past the last letter read.
    pub(crate) fn position(&self) -> ReplayPosition {
        self.position
    }

    /// The next letter, or `None` at the end of the file.
    pub(crate) fn next_letter(&mut self) -> Result<Option<DeadLetter>, DeadLetterError> {
        let Some(lines) = &mut self.lines else {
            return Ok(None);
        };
        loop {
            self.buffer.clear();
            let read = lines
                .read_line(&mut self.buffer)
                .map_err(|source| DeadLetterError::Io {
                    action: "read",
                    path: self.path.clone(),
                    source,
                })?;
            if read == 0 {
                return Ok(None);
            }
            self.position.offset += read as u64;
            self.position.line += 1;
            if !self.buffer.trim().is_empty() {
                return parse_line(&self.path, self.position.line, &self.buffer).map(Some);
            }
        }
    }

    /// Calls `f` with every letter left; returns how many.
    fn for_each(mut self, mut f: impl FnMut(DeadLetter)) -> Result<usize, DeadLetterError> {
        let mut count = 0;
        while let Some(letter) = self.next_letter()? {
            f(letter);
            count += 1;
        }
        Ok(count)
    }
}

/// Line number `line` of `path` (named in errors) back to a dead letter.
fn parse_line(path: &Path, line: usize, text: &str) -> Result<DeadLetter, DeadLetterError> {
    let corrupt = |reason: String| DeadLetterError::Corrupt {
        path: path.to_owned(),
        line,
        reason,
    };
    let stored: Line = serde_json::from_str(text).map_err(|e| corrupt(e.to_string()))?;
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
    Ok(DeadLetter {
        event: rebuilt,
        error: stored.error.to_owned(),
        attempts: stored.attempts,
        first_attempt: time(&stored.first_attempt)?,
        last_attempt: time(&stored.last_attempt)?,
    })
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

    /// A store whose `hook` file holds `letters`, then a line that is not a dead letter.
    fn damaged(letters: &[DeadLetter]) -> (tempfile::TempDir, DeadLetters, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let store = DeadLetters::open(dir.path()).unwrap();
        store.append("hook", letters).unwrap();
        let path = dir.path().join("dead-letters/hook.jsonl");
        let mut text = fs::read_to_string(&path).unwrap();
        text.push_str("{not json\n");
        fs::write(&path, text).unwrap();
        (dir, store, path)
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
        let mut replay = store.resume_replay(&replays[0].1).unwrap();
        let mut ids = Vec::new();
        while let Some(letter) = replay.next_letter().unwrap() {
            ids.push(letter.event.id);
        }
        assert_eq!(ids, [1, 2, 3].map(|n| letter(n).event.id));
        store.finish_replay(&replays[0].1).unwrap();
        assert!(store.pending_replays().unwrap().is_empty());

        store.append("hook", &[letter(4)]).unwrap();
        assert_eq!(store.purge("hook").unwrap(), 1);
        assert!(store.list("hook").unwrap().is_empty());
        assert_eq!(store.purge("hook").unwrap(), 0);
    }

    #[test]
    fn a_replay_stopped_half_way_goes_on_where_it_stopped() {
        let dir = tempfile::tempdir().unwrap();
        let store = DeadLetters::open(dir.path()).unwrap();
        store
            .append("hook", &(1..=5).map(letter).collect::<Vec<_>>())
            .unwrap();
        store.queue_replay("hook").unwrap();
        let (_, path) = store.pending_replays().unwrap().remove(0);
        // Two letters back in the spool, then the spool was full (or the process stopped).
        let mut replay = store.resume_replay(&path).unwrap();
        replay.next_letter().unwrap().unwrap();
        replay.next_letter().unwrap().unwrap();
        store.replay_done_upto(&path, replay.position()).unwrap();
        replay.next_letter().unwrap().unwrap();
        drop(replay);
        // The progress file is not taken for a replay of its own.
        assert_eq!(store.pending_replays().unwrap().len(), 1);

        let mut replay = store.resume_replay(&path).unwrap();
        let mut rest = Vec::new();
        while let Some(letter) = replay.next_letter().unwrap() {
            rest.push(letter.attempts);
        }
        assert_eq!(
            rest,
            [3, 4, 5],
            "the third was not recorded as done: it comes again"
        );
        store.finish_replay(&path).unwrap();
        assert!(store.pending_replays().unwrap().is_empty());
        assert_eq!(
            fs::read_dir(dir.path().join("dead-letters"))
                .unwrap()
                .count(),
            1,
            "only the lock is left"
        );
    }

    #[test]
    fn a_damaged_line_is_named_after_a_resumed_replay_too() {
        let (dir, store, path) = damaged(&[letter(1), letter(2)]);
        // `dlq replay` reads every line first and refuses the damaged file.
        let err = store.queue_replay("hook").unwrap_err().to_string();
        assert!(err.contains("hook.jsonl line 3"), "{err}");
        // A file damaged after it was queued fails where the replay reaches it.
        let replay = dir.path().join("dead-letters/hook.replay-1.jsonl");
        fs::rename(&path, &replay).unwrap();
        let mut reader = store.resume_replay(&replay).unwrap();
        reader.next_letter().unwrap().unwrap();
        store.replay_done_upto(&replay, reader.position()).unwrap();
        let mut reader = store.resume_replay(&replay).unwrap();
        reader.next_letter().unwrap().unwrap();
        let err = reader.next_letter().unwrap_err().to_string();
        assert!(err.contains("hook.replay-1.jsonl line 3"), "{err}");
    }

    #[test]
    fn replay_files_are_told_by_their_whole_name() {
        assert_eq!(replay_sink("hook.replay-123.jsonl"), Some("hook"));
        // A sink may have `.replay-` in its name: its own file is not a replay.
        assert_eq!(replay_sink("a.replay-b.jsonl"), None);
        assert_eq!(replay_sink("a.replay-b.replay-5.jsonl"), Some("a.replay-b"));
        assert_eq!(replay_sink("hook.replay-123.jsonl.progress"), None);
        assert_eq!(replay_sink("hook.jsonl"), None);
    }

    #[test]
    fn a_position_that_does_not_end_a_line_is_refused_and_orphans_are_swept() {
        let dir = tempfile::tempdir().unwrap();
        let store = DeadLetters::open(dir.path()).unwrap();
        store.append("hook", &[letter(1), letter(2)]).unwrap();
        store.queue_replay("hook").unwrap();
        let (_, path) = store.pending_replays().unwrap().remove(0);
        // As if the file had been rewritten since the position was recorded.
        store
            .replay_done_upto(&path, ReplayPosition { offset: 7, line: 1 })
            .unwrap();
        let err = store.resume_replay(&path).err().unwrap().to_string();
        assert!(err.contains("does not end a line"), "{err}");
        store
            .replay_done_upto(
                &path,
                ReplayPosition {
                    offset: 1 << 40,
                    line: 1,
                },
            )
            .unwrap();
        assert!(store.resume_replay(&path).is_err(), "past the end");

        // The replay file goes, its progress stays behind (a crash in between): swept.
        fs::remove_file(&path).unwrap();
        let dead_letters = dir.path().join("dead-letters");
        fs::write(progress_file(&path).with_extension("progress-new"), "0 0\n").unwrap();
        assert!(store.pending_replays().unwrap().is_empty());
        let left: Vec<String> = fs::read_dir(&dead_letters)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(left, [".lock"]);
    }

    #[test]
    fn a_damaged_file_is_reported_with_its_line() {
        let (_dir, store, _) = damaged(&[letter(1)]);
        let err = store.list("hook").unwrap_err().to_string();
        assert!(err.contains("hook.jsonl line 2"), "{err}");
    }

    #[test]
    fn files_created_and_renamed_are_fsynced_into_the_folder() {
        use crate::spool::dir_fsyncs;
        let dir = tempfile::tempdir().unwrap();
        let folder = dir.path().join("dead-letters");
        dir_fsyncs::take();
        let store = DeadLetters::open(dir.path()).unwrap();
        assert_eq!(dir_fsyncs::take(), [dir.path()], "the new folder");
        store.append("hook", &[letter(1)]).unwrap();
        assert_eq!(dir_fsyncs::take(), vec![folder.clone()], "a new file");
        store.append("hook", &[letter(2)]).unwrap();
        assert!(
            dir_fsyncs::take().is_empty(),
            "an append to a file already there"
        );
        store.queue_replay("hook").unwrap();
        assert_eq!(
            dir_fsyncs::take(),
            vec![folder.clone()],
            "the rename to a replay file"
        );
        let (_, replay) = store.pending_replays().unwrap().remove(0);
        store
            .replay_done_upto(&replay, ReplayPosition { offset: 0, line: 1 })
            .unwrap();
        assert_eq!(
            dir_fsyncs::take(),
            vec![folder.clone()],
            "the progress file's rename"
        );
    }
}
