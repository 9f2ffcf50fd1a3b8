//! The parked file of one sink, `<spool dir>/parked/<sink>.jsonl`: one line per parked event,
//! oldest first, `{"keys":{..},"letter":{..}}`. `letter` is the event as a dead-letter line
//! (error, attempts, times, the CloudEvent; `jq .letter` reads it like a dead letter); `keys` are
//! the ids the sink read out of the event before its redaction, which the event's `data` may no
//! longer hold (`fields.drop`), and which pick its partition, subject or URL.
//!
//! Every call here is blocking file I/O: the delivery loop runs them on the blocking pool. Each
//! write is fsynced (and a new or renamed file's folder too) before the call returns: a parked
//! event is no longer in the sink's part of the spool once its batch counts as settled.

use std::fs::{self, File, OpenOptions};
use std::io::{self, BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use tracing::{error, warn};

use crate::delivery::dead_letter::{encode_line, parse_line, DeadLetter, LineProblem};
use crate::event::DataKeys;

/// A parked file that cannot be read or written.
#[derive(Debug, thiserror::Error)]
#[error("cannot {action} {path}: {source}")]
pub(crate) struct ParkedFileError {
    /// What was being done ("open", "write", "rename", ...).
    action: &'static str,
    /// The file or folder it was done to.
    path: PathBuf,
    /// Why it failed.
    source: io::Error,
}

/// Where one line is in the file: its first byte and its length, newline included.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Span {
    /// Its first byte.
    pub(super) offset: u64,
    /// Its length, newline included.
    pub(super) len: u64,
}

/// A line read back when the file is opened.
#[derive(Debug)]
pub(super) struct LoadedLine {
    /// Where it is (after the file was cleaned up, see [`ParkedFile::load`]).
    pub(super) span: Span,
    /// The ids of its event, as stored.
    pub(super) keys: DataKeys,
}

/// The ids of an event as a line stores them.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct StoredKeys {
    /// [`DataKeys::account_id`].
    account_id: Option<u64>,
    /// [`DataKeys::conversation_id`].
    conversation_id: Option<u64>,
    /// [`DataKeys::inbox_id`].
    inbox_id: Option<u64>,
}

/// One line as written.
#[derive(Serialize)]
struct LineOut<'a> {
    /// The event's ids.
    keys: StoredKeys,
    /// The dead-letter line of the event.
    letter: &'a RawValue,
}

/// One line as read.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LineIn<'a> {
    /// The event's ids.
    keys: StoredKeys,
    /// The dead-letter line of the event.
    #[serde(borrow)]
    letter: &'a RawValue,
}

/// How one line of the file reads, by [`read_line`].
enum RawLine {
    /// The end of the file.
    End,
    /// A line, newline included.
    Whole(Vec<u8>),
    /// A line longer than the limit: skipped, its length (newline included).
    TooLong(u64),
    /// Bytes after the last newline: an append that did not finish. Their length.
    Torn(u64),
}

/// One sink's parked file.
#[derive(Debug)]
pub(crate) struct ParkedFile {
    /// `<spool dir>/parked/<sink>.jsonl`.
    path: PathBuf,
    /// `<spool dir>/parked/<sink>.unreadable`: lines that cannot be read back are moved here
    /// (never deleted) so that an operator can look at them.
    aside: PathBuf,
    /// The sink's name, written into each line (as in its dead letters).
    sink: String,
    /// The longest line read back; a longer one is moved aside unread: bounds what opening a
    /// damaged or foreign file allocates.
    max_line: u64,
}

impl ParkedFile {
    /// The parked file of `sink` under `spool_dir`; nothing is opened yet.
    pub(crate) fn new(spool_dir: &Path, sink: &str, max_line: u64) -> ParkedFile {
        let dir = spool_dir.join("parked");
        ParkedFile {
            path: dir.join(format!("{sink}.jsonl")),
            aside: dir.join(format!("{sink}.unreadable")),
            sink: sink.to_owned(),
            max_line,
        }
    }

    /// The file's path, for logs.
    pub(super) fn path(&self) -> &Path {
        &self.path
    }

    /// Appends `letter`, with the event's `keys`, as one line to `out`; returns its length.
    pub(super) fn encode(&self, letter: &DeadLetter, out: &mut Vec<u8>) -> u64 {
        let start = out.len();
        let mut inner = Vec::new();
        encode_line(&self.sink, letter, &mut inner);
        let inner = String::from_utf8(inner).expect("dead-letter lines are UTF-8");
        let keys = letter.event.keys;
        let line = LineOut {
            keys: StoredKeys {
                account_id: keys.account_id,
                conversation_id: keys.conversation_id,
                inbox_id: keys.inbox_id,
            },
            letter: &RawValue::from_string(inner).expect("dead-letter lines are JSON"),
        };
        serde_json::to_writer(&mut *out, &line).expect("writing JSON to a Vec cannot fail");
        out.push(b'\n');
        (out.len() - start) as u64
    }

    /// A line back to the event it parked, with its stored ids; `Err` says what is wrong.
    fn decode(&self, line: &[u8]) -> Result<DeadLetter, String> {
        // Reasons never quote the line: it holds customer data and perhaps tokens.
        let problem = |p: LineProblem| p.to_string();
        let text = std::str::from_utf8(line).map_err(|_| problem(LineProblem::NotText))?;
        let stored: LineIn =
            serde_json::from_str(text).map_err(|e| problem(LineProblem::from(e)))?;
        let mut letter = parse_line(stored.letter.get().as_bytes()).map_err(problem)?;
        letter.event.keys = DataKeys {
            account_id: stored.keys.account_id,
            conversation_id: stored.keys.conversation_id,
            inbox_id: stored.keys.inbox_id,
        };
        Ok(letter)
    }

    /// Reads the file (none is an empty set), keeping at most `max_lines` lines. Cleans it up
    /// first if needed: bytes after the last newline (an append cut short by a crash: its batch
    /// was not settled, so its events are still in the spool) are cut off; lines that cannot be
    /// read back, or past `max_lines`, are moved to the `.unreadable` file, logged at error
    /// level, and the file is rewritten without them.
    pub(super) fn load(&self, max_lines: usize) -> Result<Vec<LoadedLine>, ParkedFileError> {
        let file = match File::open(&self.path) {
            Ok(file) => file,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(self.error("open", &self.path, e)),
        };
        let mut reader = BufReader::new(file);
        let (mut lines, mut unreadable, mut offset, mut number) = (Vec::new(), Vec::new(), 0, 0);
        let torn = loop {
            let raw = read_line(&mut reader, self.max_line)
                .map_err(|e| self.error("read", &self.path, e))?;
            let span = |len| Span { offset, len };
            let (len, loaded) = match raw {
                RawLine::End => break false,
                RawLine::Torn(len) => {
                    warn!(file = %self.path.display(), bytes = len,
                        "cut off the end of a parked file that a crash left half written (its events are still in the spool)");
                    break true;
                }
                RawLine::TooLong(len) => (len, Err(format!("longer than {} bytes", self.max_line))),
                RawLine::Whole(line) if line.trim_ascii().is_empty() => {
                    (line.len() as u64, Ok(None))
                }
                RawLine::Whole(line) => {
                    let len = line.len() as u64;
                    let read = match self.decode(&line) {
                        Ok(_) if lines.len() >= max_lines => {
                            Err(format!("more than {max_lines} parked events"))
                        }
                        Ok(letter) => Ok(Some(LoadedLine {
                            span: span(len),
                            keys: letter.event.keys,
                        })),
                        Err(reason) => Err(reason),
                    };
                    (len, read)
                }
            };
            number += 1;
            match loaded {
                Ok(Some(line)) => lines.push(line),
                Ok(None) => {}
                Err(reason) => {
                    error!(file = %self.path.display(), line = number, %reason,
                        "a parked event cannot be read back; moved to {}", self.aside.display());
                    unreadable.push(span(len));
                }
            }
            offset += len;
        };
        if !unreadable.is_empty() {
            self.set_aside(&unreadable)?;
        }
        if torn || !unreadable.is_empty() {
            let spans: Vec<Span> = lines.iter().map(|l| l.span).collect();
            for (line, span) in lines.iter_mut().zip(self.rewrite(&spans)?) {
                line.span = span;
            }
        }
        Ok(lines)
    }

    /// Reads the lines at `spans` back to the events they parked: one result per span, `Err`
    /// saying what is wrong with a line that cannot be read back.
    pub(super) fn read(
        &self,
        spans: &[Span],
    ) -> Result<Vec<Result<DeadLetter, String>>, ParkedFileError> {
        let mut file = File::open(&self.path).map_err(|e| self.error("open", &self.path, e))?;
        let mut read = Vec::with_capacity(spans.len());
        for span in spans {
            let mut line = vec![0; span.len as usize];
            file.seek(SeekFrom::Start(span.offset))
                .and_then(|_| file.read_exact(&mut line))
                .map_err(|e| self.error("read", &self.path, e))?;
            read.push(
                self.decode(&line)
                    .map_err(|reason| format!("at byte {}: {reason}", span.offset)),
            );
        }
        Ok(read)
    }

    /// Appends `lines` at byte `at`, where the file ends as far as the set knows (bytes after
    /// it, from an append that failed half way, are cut off first), and fsyncs.
    pub(super) fn append(&self, at: u64, lines: &[u8]) -> Result<(), ParkedFileError> {
        let created = !self.path.exists();
        if created {
            let dir = self.dir();
            fs::create_dir_all(dir).map_err(|e| self.error("create", dir, e))?;
        }
        let mut file = private_file()
            .write(true)
            .create(true)
            .truncate(false)
            .open(&self.path)
            .map_err(|e| self.error("open", &self.path, e))?;
        let io = |file: &mut File| -> io::Result<()> {
            if file.metadata()?.len() != at {
                file.set_len(at)?;
            }
            file.seek(SeekFrom::Start(at))?;
            file.write_all(lines)?;
            file.sync_data()
        };
        io(&mut file).map_err(|e| self.error("write", &self.path, e))?;
        if created {
            self.sync_dir()?;
        }
        Ok(())
    }

    /// Rewrites the file with only the lines at `keep` (in file order), through a temporary
    /// file, fsynced and renamed over it: a crash leaves the old file or the new one. Returns
    /// where each kept line now is. Keeping nothing deletes the file.
    pub(super) fn rewrite(&self, keep: &[Span]) -> Result<Vec<Span>, ParkedFileError> {
        if keep.is_empty() {
            match fs::remove_file(&self.path) {
                Ok(()) => return self.sync_dir().map(|()| Vec::new()),
                Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
                Err(e) => return Err(self.error("delete", &self.path, e)),
            }
        }
        let temporary = self.path.with_extension("jsonl.new");
        let mut from = File::open(&self.path).map_err(|e| self.error("open", &self.path, e))?;
        let mut to = private_file()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&temporary)
            .map_err(|e| self.error("create", &temporary, e))?;
        let mut moved = Vec::with_capacity(keep.len());
        let mut offset = 0;
        for span in keep {
            copy_span(&mut from, *span, &mut to).map_err(|e| self.error("copy", &temporary, e))?;
            moved.push(Span {
                offset,
                len: span.len,
            });
            offset += span.len;
        }
        to.sync_data()
            .map_err(|e| self.error("fsync", &temporary, e))?;
        fs::rename(&temporary, &self.path).map_err(|e| self.error("rename", &self.path, e))?;
        self.sync_dir()?;
        Ok(moved)
    }

    /// Copies the lines at `spans` to the `.unreadable` file, and fsyncs it.
    pub(super) fn set_aside(&self, spans: &[Span]) -> Result<(), ParkedFileError> {
        let mut from = File::open(&self.path).map_err(|e| self.error("open", &self.path, e))?;
        let mut to = private_file()
            .append(true)
            .create(true)
            .open(&self.aside)
            .map_err(|e| self.error("open", &self.aside, e))?;
        for span in spans {
            copy_span(&mut from, *span, &mut to).map_err(|e| self.error("copy", &self.aside, e))?;
        }
        to.sync_data()
            .map_err(|e| self.error("fsync", &self.aside, e))
    }

    /// The `parked` folder.
    fn dir(&self) -> &Path {
        self.path
            .parent()
            .expect("the file is in the parked folder")
    }

    /// Fsyncs the folder, so that a new, renamed or deleted file stays so after a crash.
    fn sync_dir(&self) -> Result<(), ParkedFileError> {
        let dir = self.dir();
        File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| self.error("fsync", dir, e))
    }

    fn error(&self, action: &'static str, path: &Path, source: io::Error) -> ParkedFileError {
        ParkedFileError {
            action,
            path: path.to_owned(),
            source,
        }
    }
}

/// Options for a file that holds customer messages: readable by the owner only.
fn private_file() -> OpenOptions {
    let mut options = OpenOptions::new();
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    options
}

/// Copies the bytes of `span` from `from` to the end of what was written to `to`.
fn copy_span(from: &mut File, span: Span, to: &mut File) -> io::Result<()> {
    from.seek(SeekFrom::Start(span.offset))?;
    let copied = io::copy(&mut from.take(span.len), to)?;
    if copied != span.len {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "the file is shorter than the set knows",
        ));
    }
    Ok(())
}

/// Reads the next line, keeping at most `max` bytes of it in memory.
fn read_line(reader: &mut impl BufRead, max: u64) -> io::Result<RawLine> {
    let mut line = Vec::new();
    let read = reader.by_ref().take(max + 1).read_until(b'\n', &mut line)?;
    if read == 0 {
        return Ok(RawLine::End);
    }
    if line.last() == Some(&b'\n') {
        return Ok(RawLine::Whole(line));
    }
    if (read as u64) <= max {
        return Ok(RawLine::Torn(read as u64));
    }
    // Too long: skip to its end without keeping it.
    let mut len = read as u64;
    loop {
        let available = reader.fill_buf()?;
        if available.is_empty() {
            return Ok(RawLine::Torn(len));
        }
        match available.iter().position(|&b| b == b'\n') {
            Some(end) => {
                reader.consume(end + 1);
                return Ok(RawLine::TooLong(len + end as u64 + 1));
            }
            None => {
                let skipped = available.len();
                reader.consume(skipped);
                len += skipped as u64;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::delivery::dead_letter::test_letter;
    use crate::event::JsonText;

    /// Event `n` of conversation 7, its `data` without ids (as a redaction can leave it), the
    /// ids kept in its keys.
    fn letter(n: u32) -> DeadLetter {
        let mut letter = test_letter(n, 7, "HTTP 500");
        letter.event.data = JsonText::from_string(format!(r#"{{"n":{n}}}"#)).unwrap();
        letter
    }

    /// A parked file under a temporary spool holding `letters`, appended one call each.
    fn parked(letters: &[DeadLetter]) -> (tempfile::TempDir, ParkedFile, u64) {
        let dir = tempfile::tempdir().unwrap();
        let file = ParkedFile::new(dir.path(), "hook", 4096);
        let mut at = 0;
        for letter in letters {
            let mut line = Vec::new();
            let len = file.encode(letter, &mut line);
            file.append(at, &line).unwrap();
            at += len;
        }
        (dir, file, at)
    }

    fn numbers(file: &ParkedFile, lines: &[LoadedLine]) -> Vec<u32> {
        let spans: Vec<Span> = lines.iter().map(|l| l.span).collect();
        file.read(&spans)
            .unwrap()
            .into_iter()
            .map(|l| l.unwrap().attempts)
            .collect()
    }

    #[test]
    fn lines_keep_the_event_its_ids_and_its_tries() {
        let (_dir, file, len) = parked(&[letter(1), letter(2)]);
        let lines = file.load(10).unwrap();
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[1].span.offset + lines[1].span.len, len);
        assert_eq!(
            lines[0].keys.conversation_id,
            Some(7),
            "kept though data lost it"
        );
        let read = file.read(&[lines[1].span]).unwrap().remove(0).unwrap();
        let original = letter(2);
        assert_eq!(read.event.id, original.event.id);
        assert_eq!(read.event.data.get(), r#"{"n":2}"#);
        assert_eq!(read.event.keys, original.event.keys);
        assert_eq!(
            (read.attempts, read.error.as_str(), read.first_attempt),
            (2, "HTTP 500", original.first_attempt)
        );
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = fs::metadata(file.path()).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600, "customer messages: owner only");
        }
    }

    #[test]
    fn a_torn_tail_is_cut_off_and_the_next_append_goes_after_the_last_whole_line() {
        let (_dir, file, len) = parked(&[letter(1), letter(2)]);
        let mut text = fs::read(file.path()).unwrap();
        text.extend_from_slice(br#"{"keys":{"account_id":1,"#);
        fs::write(file.path(), &text).unwrap();
        let lines = file.load(10).unwrap();
        assert_eq!(numbers(&file, &lines), [1, 2]);
        assert_eq!(fs::metadata(file.path()).unwrap().len(), len, "cut off");
        // An append that failed half way leaves bytes the set does not know of: cut off too.
        fs::write(file.path(), &text).unwrap();
        let mut line = Vec::new();
        file.encode(&letter(3), &mut line);
        file.append(len, &line).unwrap();
        assert_eq!(numbers(&file, &file.load(10).unwrap()), [1, 2, 3]);
    }

    #[test]
    fn unreadable_and_overlong_lines_are_moved_aside_not_lost() {
        let (dir, file, _) = parked(&[letter(1)]);
        let mut text = fs::read(file.path()).unwrap();
        text.extend_from_slice(b"{not json\n");
        text.extend_from_slice(&[b'x'; 5000]); // over the 4096-byte bound
        text.push(b'\n');
        let (mut second, mut third) = (Vec::new(), Vec::new());
        file.encode(&letter(2), &mut second);
        file.encode(&letter(3), &mut third);
        text.extend_from_slice(&second);
        text.extend_from_slice(&third);
        fs::write(file.path(), &text).unwrap();

        // At most two lines kept: the third readable one goes aside too.
        let lines = file.load(2).unwrap();
        assert_eq!(numbers(&file, &lines), [1, 2]);
        let aside = fs::read(dir.path().join("parked/hook.unreadable")).unwrap();
        assert!(aside.starts_with(b"{not json\n"));
        assert_eq!(aside.len(), 10 + 5001 + third.len());
        assert!(aside.ends_with(&third));
        // The file was rewritten with the lines kept only.
        assert_eq!(numbers(&file, &file.load(10).unwrap()), [1, 2]);
    }

    #[test]
    fn a_rewrite_keeps_the_given_lines_and_keeping_none_deletes_the_file() {
        let (_dir, file, _) = parked(&[letter(1), letter(2), letter(3)]);
        let lines = file.load(10).unwrap();
        let moved = file.rewrite(&[lines[0].span, lines[2].span]).unwrap();
        assert_eq!(moved[0].offset, 0);
        assert_eq!(moved[1].offset, lines[0].span.len);
        assert_eq!(numbers(&file, &file.load(10).unwrap()), [1, 3]);
        assert_eq!(file.read(&moved).unwrap().len(), 2);
        file.rewrite(&[]).unwrap();
        assert!(!file.path().exists());
        assert!(file.load(10).unwrap().is_empty(), "no file: nothing parked");
    }
}
