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
//!
//! A crash or a full disk in the middle of an append can leave a torn last line. Before every
//! append, replay or purge (under the folder's lock), a file that does not end with a whole line
//! is cut back to its last one, and the torn bytes are kept in `<sink>.jsonl.torn-<unix time>`.
//! Readers skip a line that is not a dead letter (damaged, torn, or longer than
//! [`DeadLetters::max_line_bytes`]), count it and log its file and line number, never its
//! content (it can hold secrets); a replay keeps such lines in `<replay file>.bad-lines`.

use std::fs::{self, File, OpenOptions};
use std::io::{self, BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use tracing::warn;

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

impl DeadLetter {
    /// A dead letter for each of `events`, all given up now, after `attempts` tries, with
    /// `error`.
    pub(crate) fn each_given_up_now(
        events: &[Arc<Event>],
        error: &str,
        attempts: u32,
    ) -> Vec<DeadLetter> {
        let now = SystemTime::now();
        events
            .iter()
            .map(|event| DeadLetter {
                event: Event::clone(event),
                error: error.to_owned(),
                attempts,
                first_attempt: now,
                last_attempt: now,
            })
            .collect()
    }
}

/// Dead letter `n` of the tests: a `message.created` of account 1 and `conversation_id`,
/// numbered `n` in its data and in the high bits of its id, given up after `n` attempts with
/// `error`, at fixed times.
#[cfg(test)]
pub(crate) fn test_letter(n: u32, conversation_id: u64, error: &str) -> DeadLetter {
    let mut event = Event::for_test(
        "message.created",
        "agent",
        &format!(r#"{{"account_id":1,"conversation_id":{conversation_id},"n":{n}}}"#),
    );
    event.id = EventId(u128::from(n) << 64 | 0xabc);
    DeadLetter {
        event,
        error: error.into(),
        attempts: n,
        first_attempt: SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_781_964_126),
        last_attempt: SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_781_964_130),
    }
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
    /// A replay's progress file that this program did not write, or that does not fit its
    /// replay file.
    #[error("{path} line {line}: not written by this program for this file ({reason})")]
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

/// The `chatwoot.max_frame_bytes` a store assumes until [`DeadLetters::with_max_frame_bytes`]
/// gives the configured one: its default.
const DEFAULT_MAX_FRAME_BYTES: usize = 8 << 20;

/// Bounds what a dead letter's line holds besides its event's `data` (at most a frame): the
/// error (cut to [`MAX_ERROR_BYTES`] when written), the times, the id, the names and the
/// CloudEvents attributes.
const LINE_ENVELOPE_BYTES: usize = 64 << 10;

/// Bounds the error text kept with a dead letter, so that every line written stays within
/// [`DeadLetters::max_line_bytes`]: a destination's error can be long, its first 4 KiB say why.
const MAX_ERROR_BYTES: usize = 4 << 10;

/// After a sink's file name, the torn bytes cut off its end (then the unix time).
const TORN_SUFFIX: &str = ".torn-";

/// After a replay file's name, the lines a replay skipped because they are not dead letters.
const BAD_LINES_SUFFIX: &str = ".bad-lines";

/// What a read of a dead letter file found.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LetterCount {
    /// Dead letters read.
    pub letters: usize,
    /// Lines that are not dead letters (torn, damaged, too long): skipped, logged by number.
    pub skipped: usize,
}

/// The dead letter files of every sink.
#[derive(Debug, Clone)]
pub struct DeadLetters {
    /// `<spool dir>/dead-letters`.
    dir: PathBuf,
    /// Longest line a reader takes into memory; a longer one is skipped as it is read.
    max_line_bytes: usize,
}

impl DeadLetters {
    /// Opens (creating if needed) the dead letter folder under `spool_dir`, for events of at
    /// most the default frame size ([`DeadLetters::with_max_frame_bytes`] sets another).
    pub fn open(spool_dir: &Path) -> Result<DeadLetters, DeadLetterError> {
        let dir = spool_dir.join("dead-letters");
        create_dir_durably(&dir).map_err(|source| DeadLetterError::Io {
            action: "create",
            path: dir.clone(),
            source,
        })?;
        Ok(DeadLetters {
            dir,
            max_line_bytes: DEFAULT_MAX_FRAME_BYTES + LINE_ENVELOPE_BYTES,
        })
    }

    /// The store for events read under `chatwoot.max_frame_bytes` = `max_frame_bytes`: a
    /// dead letter's event data is at most a frame, so its line at most
    /// [`DeadLetters::max_line_bytes`].
    pub fn with_max_frame_bytes(self, max_frame_bytes: usize) -> DeadLetters {
        DeadLetters {
            max_line_bytes: max_frame_bytes.saturating_add(LINE_ENVELOPE_BYTES),
            ..self
        }
    }

    /// The longest line a reader takes into memory: `chatwoot.max_frame_bytes` plus 64 KiB.
    /// A longer line (possible only after the frame limit was lowered) is skipped and counted;
    /// a replay keeps it aside.
    pub fn max_line_bytes(&self) -> usize {
        self.max_line_bytes
    }

    /// The dead letter file of `sink`.
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
        repair_torn_tail(&path)?;
        let mut text = Vec::new();
        for letter in letters {
            encode_line(sink, letter, &mut text);
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

    /// Calls `f` with each dead letter of `sink`, oldest first; returns how many there were,
    /// and how many lines were skipped as not dead letters (each logged by its number).
    pub fn each(
        &self,
        sink: &str,
        f: impl FnMut(DeadLetter),
    ) -> Result<LetterCount, DeadLetterError> {
        self.reader(&self.file(sink), ReplayPosition::START, None)?
            .for_each(f)
    }

    /// Deletes the dead letters of `sink` (and the lines that are not dead letters, after a
    /// torn last line is kept aside); returns how many there were.
    pub fn purge(&self, sink: &str) -> Result<LetterCount, DeadLetterError> {
        self.exclusively(|| self.purge_unlocked(sink))
    }

    fn purge_unlocked(&self, sink: &str) -> Result<LetterCount, DeadLetterError> {
        let path = self.file(sink);
        repair_torn_tail(&path)?;
        let count = self.each(sink, drop)?;
        match fs::remove_file(&path) {
            Ok(()) => Ok(count),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(LetterCount::default()),
            Err(source) => Err(DeadLetterError::Io {
                action: "delete",
                path,
                source,
            }),
        }
    }

    /// Queues the dead letters of `sink` for redelivery; returns how many, and how many lines
    /// are not dead letters (the replay skips them and keeps them aside).
    pub fn queue_replay(&self, sink: &str) -> Result<LetterCount, DeadLetterError> {
        self.exclusively(|| self.queue_replay_unlocked(sink))
    }

    fn queue_replay_unlocked(&self, sink: &str) -> Result<LetterCount, DeadLetterError> {
        let path = self.file(sink);
        // A torn last line is kept aside here: it must not become part of the replay file.
        repair_torn_tail(&path)?;
        let count = self.each(sink, drop)?;
        if count == LetterCount::default() {
            return Ok(count);
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
    /// Lines that are not dead letters are skipped, and kept in `<path>.bad-lines` once the
    /// replay records it got past them ([`DeadLetters::replay_done_upto`]).
    pub(crate) fn resume_replay(&self, path: &Path) -> Result<LetterReader, DeadLetterError> {
        let progress = progress_file(path);
        let from = match read_progress(&progress) {
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
        let skipped = SkippedLines::new(with_suffix(path, BAD_LINES_SUFFIX));
        self.reader(path, from, Some(skipped))
    }

    /// A reader of `path` from `from`, with this store's line limit.
    fn reader(
        &self,
        path: &Path,
        from: ReplayPosition,
        skipped: Option<SkippedLines>,
    ) -> Result<LetterReader, DeadLetterError> {
        LetterReader::open(path, from, self.max_line_bytes, skipped)
    }

    /// Records that the letters of the replay file `replay` reads before `upto` are back in the
    /// spool, so that a replay stopped after this goes on from there; the lines it skipped
    /// before `upto` are kept aside first. Written to a temporary file, fsynced and renamed: a
    /// crash leaves the old position or the new one, and at worst letters (and skipped lines)
    /// after the old one are put back (kept) twice, never skipped.
    pub(crate) fn replay_done_upto(
        &self,
        replay: &mut LetterReader,
        upto: ReplayPosition,
    ) -> Result<(), DeadLetterError> {
        replay.keep_skipped_before(upto.offset)?;
        let path = &replay.path;
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

    /// Removes a replay file once `replay` read it to the end and its events are back in the
    /// spool, then its progress; the lines it skipped are kept aside first.
    pub(crate) fn finish_replay(&self, mut replay: LetterReader) -> Result<(), DeadLetterError> {
        replay.keep_skipped_before(u64::MAX)?;
        let path = &replay.path;
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

/// Reads a dead-letter file one line at a time from a position: memory holds one line (at most
/// the store's line limit) however many the file has. A line that is not a dead letter is
/// skipped, counted and logged by its number, and kept aside when the reader has a place for it.
pub(crate) struct LetterReader {
    /// For errors and logs.
    path: PathBuf,
    /// `None` when the file does not exist: no letters.
    lines: Option<BufReader<File>>,
    /// Just past the last line read.
    position: ReplayPosition,
    /// The line being read, reused.
    buffer: Vec<u8>,
    /// Longest line taken into memory; a longer one is skipped as it is read.
    max_line_bytes: usize,
    /// The skipped lines to keep aside (a replay, which deletes its file once done); `None`
    /// for readers that leave the file as it is.
    to_keep: Option<SkippedLines>,
    /// Lines skipped so far.
    skipped: usize,
}

impl LetterReader {
    fn open(
        path: &Path,
        from: ReplayPosition,
        max_line_bytes: usize,
        to_keep: Option<SkippedLines>,
    ) -> Result<LetterReader, DeadLetterError> {
        let io_error = |action, source| DeadLetterError::Io {
            action,
            path: path.to_owned(),
            source,
        };
        let lines = match File::open(path) {
            Ok(mut file) => {
                check_line_start(&mut file, path, from)?;
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
            buffer: Vec::new(),
            max_line_bytes,
            to_keep,
            skipped: 0,
        })
    }

    /// Just past the last letter read.
    pub(crate) fn position(&self) -> ReplayPosition {
        self.position
    }

    /// Lines skipped so far because they are not dead letters.
    pub(crate) fn skipped(&self) -> usize {
        self.skipped
    }

    /// Lines a replay kept aside so far ([`DeadLetters::replay_done_upto`]).
    pub(crate) fn kept_aside(&self) -> usize {
        self.to_keep.as_ref().map_or(0, |k| k.kept)
    }

    /// Keeps aside the skipped lines that end before `offset`.
    fn keep_skipped_before(&mut self, offset: u64) -> Result<(), DeadLetterError> {
        match &mut self.to_keep {
            Some(to_keep) => to_keep.keep_before(&self.path, offset),
            None => Ok(()),
        }
    }

    /// The next letter, or `None` at the end of the file. Lines that are not dead letters are
    /// skipped on the way.
    pub(crate) fn next_letter(&mut self) -> Result<Option<DeadLetter>, DeadLetterError> {
        loop {
            let Some(lines) = &mut self.lines else {
                return Ok(None);
            };
            let start = self.position.offset;
            let raw = read_bounded_line(lines, &mut self.buffer, self.max_line_bytes, &self.path)?;
            if raw.consumed == 0 {
                return Ok(None);
            }
            self.position.offset += raw.consumed;
            self.position.line += 1;
            let problem = if raw.too_long {
                LineProblem::TooLong(self.max_line_bytes)
            } else if self.buffer.trim_ascii().is_empty() {
                continue;
            } else {
                match parse_line(&self.buffer) {
                    Ok(letter) => return Ok(Some(letter)),
                    Err(problem) => problem,
                }
            };
            self.skip(SkippedLine {
                bytes: start..self.position.offset,
                line: self.position.line,
                last_line: self.position.line,
                problem,
                ended: raw.ended,
            });
        }
    }

    /// Counts the line just read, which is not a dead letter; logs it (by number, never by
    /// content), or, in a replay, notes it to keep aside and log once the replay gets past it
    /// (a pass that stops before it would log it again on every pass).
    fn skip(&mut self, line: SkippedLine) {
        self.skipped += 1;
        match &mut self.to_keep {
            Some(to_keep) => to_keep.note(line),
            None => warn!(file = %self.path.display(), line = line.line, problem = %line.problem,
                "skipped a line that is not a dead letter (its content is not logged)"),
        }
    }

    /// Calls `f` with every letter left; returns how many, and how many lines were skipped.
    fn for_each(mut self, mut f: impl FnMut(DeadLetter)) -> Result<LetterCount, DeadLetterError> {
        let mut letters = 0;
        while let Some(letter) = self.next_letter()? {
            f(letter);
            letters += 1;
        }
        Ok(LetterCount {
            letters,
            skipped: self.skipped,
        })
    }
}

/// Checks that `from` is the start of a line of `file`: a position from another file, or from
/// before the file was rewritten, would skip letters or read from the middle of one. The end
/// of the file counts (a last line without its newline).
fn check_line_start(
    file: &mut File,
    path: &Path,
    from: ReplayPosition,
) -> Result<(), DeadLetterError> {
    if from.offset == 0 {
        return Ok(());
    }
    let at_end = file.metadata().is_ok_and(|m| m.len() == from.offset);
    let mut before = [0u8; 1];
    let after_newline = file
        .seek(SeekFrom::Start(from.offset - 1))
        .and_then(|_| file.read_exact(&mut before))
        .is_ok_and(|()| before == *b"\n");
    if at_end || after_newline {
        return Ok(());
    }
    Err(DeadLetterError::Corrupt {
        path: path.to_owned(),
        line: from.line,
        reason: format!(
            "a replay recorded as done up to byte {}, which does not end a line of this file",
            from.offset
        ),
    })
}

/// How [`read_bounded_line`] found a line.
struct RawLine {
    /// Bytes taken from the file, newline included; 0 at the end of the file.
    consumed: u64,
    /// Longer than the limit: read past, none of it in the buffer.
    too_long: bool,
    /// It ended with a newline (the last line of a file may not).
    ended: bool,
}

/// Reads the next line into `line` (cleared first) while it stays within `max` bytes; a longer
/// one is read past, so memory never holds more than `max` bytes of it.
fn read_bounded_line(
    input: &mut impl BufRead,
    line: &mut Vec<u8>,
    max: usize,
    path: &Path,
) -> Result<RawLine, DeadLetterError> {
    line.clear();
    let mut raw = RawLine {
        consumed: 0,
        too_long: false,
        ended: false,
    };
    while !raw.ended {
        let chunk = input.fill_buf().map_err(|source| DeadLetterError::Io {
            action: "read",
            path: path.to_owned(),
            source,
        })?;
        if chunk.is_empty() {
            break;
        }
        let take = match chunk.iter().position(|&b| b == b'\n') {
            Some(newline) => {
                raw.ended = true;
                newline + 1
            }
            None => chunk.len(),
        };
        if !raw.too_long && line.len() + take > max {
            raw.too_long = true;
            line.clear();
        }
        if !raw.too_long {
            if line.capacity() < line.len() + take {
                // Doubling, as `Vec` does, but never past the limit.
                let wanted = (line.len() + take).max(2 * line.capacity()).min(max);
                line.reserve_exact(wanted - line.len());
            }
            line.extend_from_slice(&chunk[..take]);
        }
        input.consume(take);
        raw.consumed += take as u64;
    }
    Ok(raw)
}

/// A line a reader skipped.
struct SkippedLine {
    /// Where it is in the file, newline included.
    bytes: std::ops::Range<u64>,
    /// Its number, from 1.
    line: usize,
    /// The number of the last line joined to it (itself when none is): adjacent skipped
    /// lines are kept as one.
    last_line: usize,
    /// Why it is not a dead letter (the first line's, when joined).
    problem: LineProblem,
    /// It ended with a newline (a torn last line does not).
    ended: bool,
}

/// The lines a replay skipped, to keep in `<replay file>.bad-lines` once the replay records it
/// got past them: the replay file is deleted once done, and what was in it must not go with
/// it. A pass that stops before a skipped line leaves it to the next pass, which notes it
/// again; kept only once (twice at worst after a crash, never lost).
struct SkippedLines {
    /// `<replay file>.bad-lines`.
    keep_in: PathBuf,
    /// Skipped and not kept yet, in file order. Adjacent lines share one entry (the first's
    /// number and problem are logged), so there is at most one more entry than letters read
    /// since the last keep: bounded by the replay's batch.
    pending: Vec<SkippedLine>,
    /// Lines kept so far.
    kept: usize,
}

impl SkippedLines {
    fn new(keep_in: PathBuf) -> SkippedLines {
        SkippedLines {
            keep_in,
            pending: Vec::new(),
            kept: 0,
        }
    }

    /// Notes `line`, joined to the last noted one when it follows it directly.
    fn note(&mut self, line: SkippedLine) {
        match self.pending.last_mut() {
            Some(last) if last.bytes.end == line.bytes.start => {
                last.bytes.end = line.bytes.end;
                last.last_line = line.last_line;
                last.ended = line.ended;
            }
            _ => self.pending.push(line),
        }
    }

    /// Copies the noted lines that end before `offset` from `source` into the side file,
    /// fsynced, and logs them (file, line numbers, problem; never their content).
    fn keep_before(&mut self, source: &Path, offset: u64) -> Result<(), DeadLetterError> {
        let due = self
            .pending
            .iter()
            .take_while(|skipped| skipped.bytes.end <= offset)
            .count();
        if due == 0 {
            return Ok(());
        }
        let io_error = |action, path: &Path, source| DeadLetterError::Io {
            action,
            path: path.to_owned(),
            source,
        };
        let mut from = File::open(source).map_err(|e| io_error("open", source, e))?;
        let mut kept = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.keep_in)
            .map_err(|e| io_error("open", &self.keep_in, e))?;
        for skipped in self.pending.drain(..due) {
            let length = skipped.bytes.end - skipped.bytes.start;
            from.seek(SeekFrom::Start(skipped.bytes.start))
                .map_err(|e| io_error("seek", source, e))?;
            io::copy(&mut (&mut from).take(length), &mut kept)
                .and_then(|_| match skipped.ended {
                    // One line each in the side file, a torn last one included.
                    true => Ok(()),
                    false => kept.write_all(b"\n"),
                })
                .map_err(|e| io_error("write", &self.keep_in, e))?;
            self.kept += skipped.last_line - skipped.line + 1;
            warn!(file = %source.display(), line = skipped.line, to_line = skipped.last_line,
                bytes = length, problem = %skipped.problem, kept_in = %self.keep_in.display(),
                "a replay skipped lines that are not dead letters and kept them aside (their content is not logged; the problem is the first line's)");
        }
        kept.sync_data()
            .map_err(|e| io_error("fsync", &self.keep_in, e))
    }
}

/// Why a line is not a dead letter. Says nothing of the line's content, which can hold
/// secrets: logs and counts carry this, never the text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum LineProblem {
    /// Longer than the reader's limit, in bytes.
    TooLong(usize),
    /// Not UTF-8 text.
    NotText,
    /// Its JSON stops before it is complete: a torn write.
    CutShort,
    /// Not JSON: a syntax error at this column.
    NotJson(usize),
    /// JSON, but not shaped like a dead letter (a field missing or of another type) at this
    /// column.
    NotALetter(usize),
    /// Its event id is not hexadecimal.
    BadId,
    /// One of its times is not an RFC 3339 time.
    BadTime,
}

impl std::fmt::Display for LineProblem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LineProblem::TooLong(max) => write!(
                f,
                "longer than {max} bytes (chatwoot.max_frame_bytes plus 64 KiB)"
            ),
            LineProblem::NotText => f.write_str("not UTF-8 text"),
            LineProblem::CutShort => f.write_str("cut short (a torn write)"),
            LineProblem::NotJson(column) => write!(f, "not JSON (at column {column})"),
            LineProblem::NotALetter(column) => {
                write!(f, "JSON, but not a dead letter (at column {column})")
            }
            LineProblem::BadId => f.write_str("its event id is not hexadecimal"),
            LineProblem::BadTime => f.write_str("a time in it is not RFC 3339"),
        }
    }
}

impl From<serde_json::Error> for LineProblem {
    fn from(e: serde_json::Error) -> LineProblem {
        match e.classify() {
            serde_json::error::Category::Eof => LineProblem::CutShort,
            serde_json::error::Category::Data => LineProblem::NotALetter(e.column()),
            serde_json::error::Category::Syntax | serde_json::error::Category::Io => {
                LineProblem::NotJson(e.column())
            }
        }
    }
}

/// `letter` of `sink` as one line of a dead-letter file (without the newline), appended to
/// `out`. The parked events of a sink use the same form.
pub(crate) fn encode_line(sink: &str, letter: &DeadLetter, out: &mut Vec<u8>) {
    let mut event = Vec::new();
    letter.event.write_structured(&mut event);
    let event = String::from_utf8(event).expect("structured events are UTF-8");
    let line = Line {
        sink,
        error: cut_at_char(&letter.error, MAX_ERROR_BYTES),
        attempts: letter.attempts,
        first_attempt: humantime::format_rfc3339_millis(letter.first_attempt).to_string(),
        last_attempt: humantime::format_rfc3339_millis(letter.last_attempt).to_string(),
        event: &RawValue::from_string(event).expect("structured events are JSON"),
    };
    serde_json::to_writer(out, &line).expect("writing JSON to a Vec cannot fail");
}

/// A line back to a dead letter.
pub(crate) fn parse_line(text: &[u8]) -> Result<DeadLetter, LineProblem> {
    let text = std::str::from_utf8(text).map_err(|_| LineProblem::NotText)?;
    let stored: Line = serde_json::from_str(text)?;
    let event: StoredEvent = serde_json::from_str(stored.event.get())?;
    let time = |t: &str| humantime::parse_rfc3339(t).map_err(|_| LineProblem::BadTime);
    let id = u128::from_str_radix(event.id, 16).map_err(|_| LineProblem::BadId)?;
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

/// Cuts a file that does not end with a whole line back to its last one, keeping the torn bytes
/// in `<file>.torn-<unix time>` (fsynced before the cut). A crash or a full disk in the middle
/// of an append leaves such a tail, and a line appended after it would be joined to it.
/// Nothing to do for a file that is missing, empty or whole.
fn repair_torn_tail(path: &Path) -> Result<(), DeadLetterError> {
    let io_error = |action, path: &Path, source| DeadLetterError::Io {
        action,
        path: path.to_owned(),
        source,
    };
    let mut file = match OpenOptions::new().read(true).write(true).open(path) {
        Ok(file) => file,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(io_error("open", path, e)),
    };
    let len = file
        .metadata()
        .map_err(|e| io_error("read", path, e))?
        .len();
    let whole = whole_lines_end(&mut file, len).map_err(|e| io_error("read", path, e))?;
    if whole == len {
        return Ok(());
    }
    let aside = torn_file(path);
    let mut kept = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&aside)
        .map_err(|e| io_error("create", &aside, e))?;
    file.seek(SeekFrom::Start(whole))
        .map_err(|e| io_error("seek", path, e))?;
    io::copy(&mut (&mut file).take(len - whole), &mut kept)
        .and_then(|_| kept.sync_all())
        .map_err(|e| io_error("write", &aside, e))?;
    if let Some(dir) = path.parent() {
        // The side file's name must be on disk before the bytes leave the other file.
        fsync_dir(dir).map_err(|e| io_error("fsync", dir, e))?;
    }
    file.set_len(whole)
        .and_then(|()| file.sync_all())
        .map_err(|e| io_error("truncate", path, e))?;
    warn!(file = %path.display(), bytes = len - whole, kept_in = %aside.display(),
        "a dead letter file ended in a torn line (a crash or a full disk during an append): cut back to its last whole line");
    Ok(())
}

/// The length of `file` up to and including its last newline (0 without one), read backwards
/// a block at a time.
fn whole_lines_end(file: &mut File, len: u64) -> io::Result<u64> {
    let mut block = [0u8; 8192];
    let mut end = len;
    while end > 0 {
        let start = end.saturating_sub(block.len() as u64);
        let chunk = &mut block[..(end - start) as usize];
        file.seek(SeekFrom::Start(start))?;
        file.read_exact(chunk)?;
        if let Some(newline) = chunk.iter().rposition(|&b| b == b'\n') {
            return Ok(start + newline as u64 + 1);
        }
        end = start;
    }
    Ok(0)
}

/// A new name for the torn tail of `path`: `<path>.torn-<unix time>`, one second on while
/// taken (a second repair within the same second).
fn torn_file(path: &Path) -> PathBuf {
    let mut stamp = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    loop {
        let aside = with_suffix(path, &format!("{TORN_SUFFIX}{stamp}"));
        if !aside.exists() {
            return aside;
        }
        stamp += 1;
    }
}

/// Bounds what is read of a progress file: two numbers.
const MAX_PROGRESS_BYTES: u64 = 64;

/// A replay's progress file, at most [`MAX_PROGRESS_BYTES`] of it.
fn read_progress(path: &Path) -> io::Result<String> {
    let mut text = String::new();
    File::open(path)?
        .take(MAX_PROGRESS_BYTES)
        .read_to_string(&mut text)?;
    Ok(text)
}

/// The longest start of `text` of at most `max` bytes that ends on a character boundary.
fn cut_at_char(text: &str, max: usize) -> &str {
    if text.len() <= max {
        return text;
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Dead letter `n` of conversation 9, refused with a 400.
    fn letter(n: u32) -> DeadLetter {
        test_letter(n, 9, "HTTP 400 Bad Request")
    }

    /// A line that is not a dead letter and carries a secret: a reader must skip it without
    /// the secret reaching a log (serde's own message for it would quote it).
    const BAD_LINE: &[u8] =
        b"{\"sink\":\"hook\",\"error\":\"x\",\"attempts\":\"pubsub-SECRET-123\"}\n";

    /// Appends `bytes` to `path` as they are, as a torn write or a stray editor would.
    fn write_raw(path: &Path, bytes: &[u8]) {
        OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .unwrap()
            .write_all(bytes)
            .unwrap();
    }

    /// A store with letters 1 and 2 in `hook`'s file, `bad` between them.
    fn damaged(bad: &[u8]) -> (tempfile::TempDir, DeadLetters, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let store = DeadLetters::open(dir.path()).unwrap();
        let path = dir.path().join("dead-letters/hook.jsonl");
        store.append("hook", &[letter(1)]).unwrap();
        write_raw(&path, bad);
        store.append("hook", &[letter(2)]).unwrap();
        (dir, store, path)
    }

    /// The attempts of each letter, which the tests use as its number.
    fn numbers(letters: &[DeadLetter]) -> Vec<u32> {
        letters.iter().map(|l| l.attempts).collect()
    }

    /// The files in the dead letter folder whose names contain `part`.
    fn files_with(dir: &Path, part: &str) -> Vec<PathBuf> {
        let mut found: Vec<PathBuf> = fs::read_dir(dir.join("dead-letters"))
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.file_name().unwrap().to_string_lossy().contains(part))
            .collect();
        found.sort();
        found
    }

    /// What `f` logs, as text.
    fn logs_of<T>(f: impl FnOnce() -> T) -> (T, String) {
        #[derive(Clone, Default)]
        struct Captured(Arc<std::sync::Mutex<Vec<u8>>>);
        impl Write for Captured {
            fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(bytes);
                Ok(bytes.len())
            }
            fn flush(&mut self) -> io::Result<()> {
                Ok(())
            }
        }
        let captured = Captured::default();
        let writer = captured.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || writer.clone())
            .with_ansi(false)
            .finish();
        let result = tracing::subscriber::with_default(subscriber, f);
        let text = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
        (result, text)
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

        assert_eq!(store.queue_replay("hook").unwrap().letters, 3);
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
        store.finish_replay(replay).unwrap();
        assert!(store.pending_replays().unwrap().is_empty());

        store.append("hook", &[letter(4)]).unwrap();
        assert_eq!(store.purge("hook").unwrap().letters, 1);
        assert!(store.list("hook").unwrap().is_empty());
        assert_eq!(store.purge("hook").unwrap(), LetterCount::default());
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
        let done = replay.position();
        store.replay_done_upto(&mut replay, done).unwrap();
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
        store.finish_replay(replay).unwrap();
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
    fn a_torn_last_line_is_kept_aside_and_the_next_append_starts_a_line_of_its_own() {
        let dir = tempfile::tempdir().unwrap();
        let store = DeadLetters::open(dir.path()).unwrap();
        let path = dir.path().join("dead-letters/hook.jsonl");
        store.append("hook", &[letter(1), letter(2)]).unwrap();
        // A crash (or a full disk) in the middle of the next append.
        let torn = br#"{"sink":"hook","error":"HTTP 5"#;
        write_raw(&path, torn);
        let (count, logs) = logs_of(|| store.each("hook", drop).unwrap());
        assert_eq!((count.letters, count.skipped), (2, 1), "a reader skips it");
        assert!(
            logs.contains("line=3") && logs.contains("cut short"),
            "{logs}"
        );

        let ((), logs) = logs_of(|| store.append("hook", &[letter(4)]).unwrap());
        assert!(logs.contains(&format!("bytes={}", torn.len())), "{logs}");
        assert_eq!(numbers(&store.list("hook").unwrap()), [1, 2, 4]);
        assert_eq!(store.each("hook", drop).unwrap().skipped, 0);
        let kept = files_with(dir.path(), "hook.jsonl.torn-");
        assert_eq!(kept.len(), 1, "the torn bytes are kept aside");
        assert_eq!(fs::read(&kept[0]).unwrap(), torn);

        // A second tear: kept in a file of its own, not over the first.
        write_raw(&path, b"{\"si");
        store.queue_replay("hook").unwrap();
        assert_eq!(files_with(dir.path(), "hook.jsonl.torn-").len(), 2);
        let (_, replay) = store.pending_replays().unwrap().remove(0);
        assert!(fs::read(replay).unwrap().ends_with(b"\n"), "queued whole");
    }

    #[test]
    fn a_garbage_line_in_the_middle_is_skipped_and_counted_and_never_logged() {
        let (_dir, store, _) = damaged(BAD_LINE);
        let ((letters, count), logs) = logs_of(|| {
            let mut letters = Vec::new();
            let count = store.each("hook", |l| letters.push(l)).unwrap();
            (letters, count)
        });
        assert_eq!(numbers(&letters), [1, 2]);
        assert_eq!(
            count,
            LetterCount {
                letters: 2,
                skipped: 1
            }
        );
        assert!(
            logs.contains("hook.jsonl") && logs.contains("line=2"),
            "{logs}"
        );
        assert!(logs.contains("not a dead letter"), "{logs}");
        assert!(
            !logs.contains("SECRET"),
            "a line's content was logged: {logs}"
        );
        // Purge and replay go on past it too.
        assert_eq!(store.queue_replay("hook").unwrap(), count);
    }

    #[test]
    fn a_replay_goes_on_past_a_bad_line_and_keeps_it_aside_once() {
        let (dir, store, _) = damaged(BAD_LINE);
        store.queue_replay("hook").unwrap();
        let (_, path) = store.pending_replays().unwrap().remove(0);
        let mut replay = store.resume_replay(&path).unwrap();
        let first = replay.next_letter().unwrap().unwrap();
        let done = replay.position();
        let second = replay.next_letter().unwrap().unwrap();
        assert_eq!(
            (first.attempts, second.attempts, replay.skipped()),
            (1, 2, 1)
        );
        // Only the first letter went in (the replay's share was used): the next pass resumes
        // before the bad line and meets it again.
        store.replay_done_upto(&mut replay, done).unwrap();
        drop(replay);
        assert!(files_with(dir.path(), ".bad-lines").is_empty());

        let mut replay = store.resume_replay(&path).unwrap();
        assert_eq!(replay.next_letter().unwrap().unwrap().attempts, 2);
        assert!(replay.next_letter().unwrap().is_none());
        let ((), logs) = logs_of(|| store.finish_replay(replay).unwrap());
        assert!(logs.contains("line=2") && logs.contains("kept"), "{logs}");
        assert!(
            !logs.contains("SECRET"),
            "a line's content was logged: {logs}"
        );
        let kept = files_with(dir.path(), ".bad-lines");
        assert_eq!(kept.len(), 1);
        assert_eq!(
            fs::read(&kept[0]).unwrap(),
            BAD_LINE,
            "kept whole and once, not lost"
        );
        assert!(
            store.pending_replays().unwrap().is_empty(),
            "the kept lines are not a replay"
        );
    }

    #[test]
    fn a_line_longer_than_the_limit_is_skipped_without_being_held_in_memory() {
        let dir = tempfile::tempdir().unwrap();
        // The limit is 64 KiB (the envelope) with frames of at most 0 bytes.
        let store = DeadLetters::open(dir.path())
            .unwrap()
            .with_max_frame_bytes(0);
        assert_eq!(store.max_line_bytes(), LINE_ENVELOPE_BYTES);
        let path = dir.path().join("dead-letters/hook.jsonl");
        let mut big = letter(7);
        let padding = "p".repeat(3 * LINE_ENVELOPE_BYTES);
        big.event.data = JsonText::from_string(format!(r#"{{"pad":"{padding}"}}"#)).unwrap();
        store.append("hook", &[letter(1), big, letter(2)]).unwrap();
        let big_line = fs::read_to_string(&path)
            .unwrap()
            .lines()
            .nth(1)
            .unwrap()
            .len()
            + 1;
        assert_eq!(
            store.each("hook", drop).unwrap(),
            LetterCount {
                letters: 2,
                skipped: 1
            }
        );

        store.queue_replay("hook").unwrap();
        let (_, path) = store.pending_replays().unwrap().remove(0);
        let mut replay = store.resume_replay(&path).unwrap();
        let mut seen = Vec::new();
        while let Some(letter) = replay.next_letter().unwrap() {
            seen.push(letter.attempts);
        }
        assert_eq!(seen, [1, 2]);
        assert!(
            replay.buffer.capacity() <= store.max_line_bytes(),
            "the reader held {} bytes of a line",
            replay.buffer.capacity()
        );
        store.finish_replay(replay).unwrap();
        let kept = files_with(dir.path(), ".bad-lines");
        assert_eq!(fs::metadata(&kept[0]).unwrap().len(), big_line as u64);
    }

    #[test]
    fn a_long_error_is_cut_on_a_character_boundary() {
        let dir = tempfile::tempdir().unwrap();
        let store = DeadLetters::open(dir.path()).unwrap();
        let mut long = letter(1);
        long.error = "é".repeat(MAX_ERROR_BYTES);
        store.append("hook", &[long]).unwrap();
        let error = &store.list("hook").unwrap()[0].error;
        assert_eq!(error.len(), MAX_ERROR_BYTES);
        assert!(error.chars().all(|c| c == 'é'));
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
        let mut replay = store.resume_replay(&path).unwrap();
        store
            .replay_done_upto(&mut replay, ReplayPosition { offset: 7, line: 1 })
            .unwrap();
        let err = store.resume_replay(&path).err().unwrap().to_string();
        assert!(err.contains("does not end a line"), "{err}");
        store
            .replay_done_upto(
                &mut replay,
                ReplayPosition {
                    offset: 1 << 40,
                    line: 1,
                },
            )
            .unwrap();
        drop(replay);
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
        let mut replay = store.resume_replay(&replay).unwrap();
        store
            .replay_done_upto(&mut replay, ReplayPosition { offset: 0, line: 1 })
            .unwrap();
        assert_eq!(
            dir_fsyncs::take(),
            vec![folder.clone()],
            "the progress file's rename"
        );
        write_raw(&folder.join("hook.jsonl"), b"{\"torn");
        store.append("hook", &[letter(3)]).unwrap();
        assert_eq!(
            dir_fsyncs::take(),
            vec![folder.clone(), folder.clone()],
            "the torn bytes' side file, before the cut; then the new file"
        );
    }
}
