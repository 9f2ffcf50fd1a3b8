//! The embedded default sink: CloudEvents JSON lines appended to a file or written to stdout.
//!
//! A file gets whole lines only: each batch is appended in full or, when the OS takes only part
//! of it (a full disk, a size limit), the file is cut back to the length it had, so a refused
//! batch leaves neither a torn line nor, after its retry, a line twice. A file the sink creates
//! is readable by its owner alone unless the config gives a `mode`: events carry customers'
//! messages.

use std::fmt;
use std::fs::{File, OpenOptions, Permissions};
use std::io::{self, Write};
use std::os::unix::fs::{FileExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use schemars::JsonSchema;
use serde::{Deserialize, Deserializer};
use tokio::io::AsyncWriteExt;

use super::{settled, Confirmations, Destination, ErrorClass, Outcome, SinkError, SinkLimits};
use crate::event::Event;

/// The permissions of a file the sink creates when the config names none: the owner's alone.
pub(crate) const DEFAULT_MODE: u32 = 0o600;

/// Where a file sink writes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum FileTarget {
    /// Append to this file; a missing one is created with `mode`.
    Append {
        /// The file.
        path: PathBuf,
        /// Permission bits of the file when the sink creates it.
        mode: u32,
    },
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
    /// The open file or stdout.
    out: Output,
    /// Reused across batches to encode without allocating.
    buffer: Vec<u8>,
}

/// What a file sink writes to.
enum Output {
    /// A file, written with blocking calls off the runtime.
    File(AppendedFile),
    /// Standard output: a pipe or a terminal, which cannot be cut back.
    Stdout(tokio::io::Stdout),
}

/// A file the sink appends to, and what it needs to open it again.
struct AppendedFile {
    /// The open file. The lock keeps batches one at a time even when a send was abandoned
    /// while its write still runs, so a cut-back never removes another batch's lines.
    file: Arc<Mutex<File>>,
    /// Where the file is, and the mode of one the sink creates: to open it again.
    target: (PathBuf, u32),
    /// The [`REOPEN`] count when it was opened: a higher count opens it again.
    opened_at: u64,
}

/// Counts the requests that every file sink open its file again before its next write: a
/// config reload (SIGHUP) makes one, so that a file logrotate moved away is created again
/// instead of written to under its new name. One atomic load per batch.
static REOPEN: AtomicU64 = AtomicU64::new(0);

/// Makes every file sink open its file again (by its path) before its next write.
pub fn reopen_files() {
    REOPEN.fetch_add(1, Ordering::Relaxed);
}

/// A file sink's `mode` as written: text only. YAML parsers read `0640` as 640 or as 416
/// depending on the YAML version they follow, so a number is refused instead of guessed at.
#[derive(Debug, Clone, PartialEq, Eq, JsonSchema)]
#[serde(transparent)]
pub struct FileMode(String);

impl<'de> Deserialize<'de> for FileMode {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = FileMode;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a file mode in quotes, such as \"0640\"")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<FileMode, E> {
                Ok(FileMode(v.to_owned()))
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<FileMode, E> {
                Err(E::custom(format!(
                    "mode: `{v}` is a YAML number, which YAML may have read in decimal or \
                     octal; write the mode in quotes, such as \"0640\""
                )))
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<FileMode, E> {
                self.visit_u64(v.unsigned_abs())
            }
        }
        d.deserialize_any(V)
    }
}

/// The mode a `mode` setting names, or [`DEFAULT_MODE`] without one: octal digits (`"0640"`,
/// `"640"`) that let the owner read and write (the sink reopens the file after a restart).
pub(crate) fn parse_mode(mode: Option<&FileMode>) -> Result<u32, String> {
    let Some(FileMode(text)) = mode else {
        return Ok(DEFAULT_MODE);
    };
    let digits = text.trim();
    let octal = !digits.is_empty()
        && digits.len() <= 4
        && digits.bytes().all(|b| b.is_ascii_digit() && b < b'8');
    let mode = octal
        .then(|| u32::from_str_radix(digits, 8).ok())
        .flatten()
        .filter(|mode| *mode <= 0o777 && mode & 0o600 == 0o600);
    mode.ok_or_else(|| {
        format!(
            "`{text}` is not a file mode: give octal permissions that let the owner read and \
             write, in quotes, such as \"0640\""
        )
    })
}

impl FileSink {
    async fn open(target: &FileTarget) -> Result<FileSink, FileBuildError> {
        let out = match target {
            FileTarget::Append { path, mode } => {
                let (path, mode) = (path.clone(), *mode);
                let opened = tokio::task::spawn_blocking({
                    let path = path.clone();
                    move || open_append(&path, mode)
                })
                .await
                .unwrap_or_else(|e| Err(io::Error::other(e)));
                let opened_at = REOPEN.load(Ordering::Relaxed);
                let file = opened.map_err(|source| FileBuildError::Open {
                    path: path.clone(),
                    source,
                })?;
                Output::File(AppendedFile {
                    file: Arc::new(Mutex::new(file)),
                    target: (path, mode),
                    opened_at,
                })
            }
            FileTarget::Stdout => Output::Stdout(tokio::io::stdout()),
        };
        Ok(FileSink {
            out,
            buffer: Vec::new(),
        })
    }

    /// A batch is one append: its lines reach the OS together or the batch is retried whole.
    async fn write(&mut self, batch: &[Arc<Event>]) -> Vec<Outcome> {
        self.buffer.clear();
        for event in batch {
            event.write_structured(&mut self.buffer);
            self.buffer.push(b'\n');
        }
        let written = match &mut self.out {
            Output::File(out) => {
                let file = out.file.clone();
                let wanted = REOPEN.load(Ordering::Relaxed);
                let reopen = (wanted != out.opened_at).then(|| out.target.clone());
                let lines = std::mem::take(&mut self.buffer);
                let appended = tokio::task::spawn_blocking(move || {
                    let mut file = file.lock().unwrap_or_else(PoisonError::into_inner);
                    let appended = reopen_if_asked(&mut file, reopen)
                        .and_then(|()| append_whole(&file, &lines));
                    (lines, appended)
                })
                .await;
                match appended {
                    Ok((lines, appended)) => {
                        self.buffer = lines;
                        // Reopened if asked: a failed reopen is tried again with the retry.
                        if appended.is_ok() {
                            out.opened_at = wanted;
                        }
                        appended
                    }
                    Err(e) => Err(io::Error::other(format!("the write did not finish: {e}"))),
                }
            }
            Output::Stdout(stdout) => {
                async {
                    stdout.write_all(&self.buffer).await?;
                    stdout.flush().await
                }
                .await
            }
        };
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

/// Opens `path` to append (and to read its last byte). A missing file is created with `mode`
/// exactly: the umask is not applied, since the operator named the mode. An existing file keeps
/// the mode it has.
fn open_append(path: &Path, mode: u32) -> io::Result<File> {
    let mut options = OpenOptions::new();
    options.read(true).append(true);
    match options.clone().create_new(true).mode(mode).open(path) {
        Ok(file) => {
            file.set_permissions(Permissions::from_mode(mode))?;
            Ok(file)
        }
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => options.open(path),
        Err(e) => Err(e),
    }
}

/// Replaces `file` by the file at `target`'s path, opened (or created with its mode) again,
/// when `target` is given. On failure `file` stays as it was.
fn reopen_if_asked(file: &mut File, target: Option<(PathBuf, u32)>) -> io::Result<()> {
    let Some((path, mode)) = target else {
        return Ok(());
    };
    let reopened = open_append(&path, mode).map_err(|e| {
        io::Error::new(
            e.kind(),
            format!("cannot open {} again after a reload: {e}", path.display()),
        )
    })?;
    *file = reopened;
    Ok(())
}

/// Appends `lines` after the file's last whole line, or leaves the file as it was. A file that
/// does not end in a newline (a write cut short by a crash, a file made by hand) gets one
/// first, so the batch's lines stay whole. When a write fails partway, the file is cut back to
/// the length it had before the batch.
fn append_whole(file: &File, lines: &[u8]) -> io::Result<()> {
    let before = file.metadata()?.len();
    let mut out = file;
    let appended = ends_mid_line(file, before).and_then(|mid_line| {
        if mid_line {
            out.write_all(b"\n")?;
        }
        out.write_all(lines)
    });
    let Err(error) = appended else {
        return Ok(());
    };
    match file.set_len(before) {
        Ok(()) => Err(error),
        Err(cut) => Err(io::Error::new(
            error.kind(),
            format!(
                "{error}; cutting the file back to its {before} bytes failed too ({cut}), so it \
                 ends in a partial line until the next batch starts a new one"
            ),
        )),
    }
}

/// Whether a file of `len` bytes ends without a newline.
fn ends_mid_line(file: &File, len: u64) -> io::Result<bool> {
    if len == 0 {
        return Ok(false);
    }
    let mut last = [0u8];
    file.read_exact_at(&mut last, len - 1)?;
    Ok(last[0] != b'\n')
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
        // A file is written without a buffer of ours; stdout may hold some.
        if let Output::Stdout(stdout) = &mut self.out {
            let _ = stdout.flush().await;
        }
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

    impl FileSink {
        /// Delivers a batch and waits for its outcomes.
        async fn deliver_for_test(&mut self, batch: &[Arc<Event>]) -> Vec<Outcome> {
            self.send(batch).await.await
        }
    }

    #[test]
    fn classification() {
        let full = io::Error::new(io::ErrorKind::StorageFull, "disk full");
        assert_eq!(classify(&full), ErrorClass::Retryable);
        let invalid = io::Error::new(io::ErrorKind::InvalidData, "bad");
        assert_eq!(classify(&invalid), ErrorClass::Permanent);
    }

    #[test]
    fn modes_are_octal_and_leave_the_owner_read_and_write() {
        let mode = |text: &str| parse_mode(Some(&FileMode(text.to_owned())));
        assert_eq!(parse_mode(None), Ok(0o600));
        for (text, bits) in [
            ("0640", 0o640),
            ("640", 0o640),
            (" 0600 ", 0o600),
            ("0777", 0o777),
        ] {
            assert_eq!(mode(text), Ok(bits), "{text}");
        }
        for text in [
            "0400",
            "0460",
            "1777",
            "07777",
            "0o640",
            "rw-r-----",
            "",
            "0x1a4",
        ] {
            let refused = mode(text).unwrap_err();
            assert!(refused.contains("is not a file mode"), "{text}: {refused}");
        }
        // A YAML number is refused: `0640` may have been read as 640 or as 416.
        let number = serde_json::from_str::<FileMode>("640").unwrap_err();
        assert!(
            number.to_string().contains("write the mode in quotes"),
            "{number}"
        );
    }

    #[test]
    fn a_line_cut_short_gets_its_newline_before_the_next_batch() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out.jsonl");
        std::fs::write(&path, "whole\n{\"torn").unwrap();
        let file = open_append(&path, DEFAULT_MODE).unwrap();
        append_whole(&file, b"{}\n").unwrap();
        append_whole(&file, b"[]\n").unwrap();
        assert_eq!(
            std::fs::read_to_string(&path).unwrap(),
            "whole\n{\"torn\n{}\n[]\n"
        );
    }

    #[tokio::test]
    async fn after_a_reopen_request_the_next_batch_goes_to_a_new_file_at_the_path() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out.jsonl");
        let target = FileTarget::Append {
            path: path.clone(),
            mode: DEFAULT_MODE,
        };
        let mut sink = FileSink::open(&target).await.unwrap();
        let batch = |n: u32| {
            let data = format!(r#"{{"n":{n}}}"#);
            vec![Arc::new(Event::for_test("message.created", "a", &data))]
        };
        let delivered = |outcomes: Vec<Outcome>| matches!(outcomes[..], [Outcome::Delivered]);
        assert!(delivered(sink.deliver_for_test(&batch(1)).await));
        // logrotate moves the file away, then asks for a reopen.
        let rotated = dir.path().join("out.jsonl.1");
        std::fs::rename(&path, &rotated).unwrap();
        reopen_files();
        assert!(delivered(sink.deliver_for_test(&batch(2)).await));
        let numbers = |p: &Path| -> Vec<u64> {
            std::fs::read_to_string(p)
                .unwrap()
                .lines()
                .map(|l| {
                    serde_json::from_str::<serde_json::Value>(l).unwrap()["data"]["n"]
                        .as_u64()
                        .unwrap()
                })
                .collect()
        };
        assert_eq!(numbers(&rotated), [1]);
        assert_eq!(
            numbers(&path),
            [2],
            "the batch after the request went to a new file"
        );
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, DEFAULT_MODE, "created with the sink's mode");
    }

    #[tokio::test]
    async fn appends_json_lines() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out.jsonl");
        std::fs::write(&path, "existing\n").unwrap();
        let target = FileTarget::Append {
            path: path.clone(),
            mode: DEFAULT_MODE,
        };
        let mut sink = FileSink::open(&target).await.unwrap();
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
