//! What a backfilling token keeps on disk, so that a gap across a restart of the bridge (or of
//! the token's task, after a reload or a panic) is backfilled too: when its subscription was
//! last healthy, and the last message id the socket delivered per conversation, which a
//! backfill after the restart reads from instead of sending those messages again.
//!
//! One small JSON file per token in the spool directory (`backfill/<token>.json`), written at
//! most every [`SAVE_EVERY`] while the subscription is healthy and once when the task stops;
//! written to a temporary file and renamed, off the socket's task. A missing, unreadable or
//! foreign file (another account) is ignored with a warning: the token then starts as a new
//! one, with no gap before its first subscription.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use serde::{Deserialize, Serialize};
use tracing::warn;

/// Bounds the file read back at start: 512 conversations take about 20 KB.
pub const MAX_RESUME_FILE_BYTES: u64 = 256 * 1024;

/// How often the file is written while the subscription is healthy: a restart re-reads at
/// most this much (plus the backfill margin) of what the socket had delivered, and skips it
/// by id where the conversation's last message is known.
pub const SAVE_EVERY: Duration = Duration::from_secs(10);

/// The file's content.
#[derive(Debug, Serialize, Deserialize, PartialEq)]
struct Saved {
    /// The account the ids belong to: a file of another account is ignored.
    account_id: u64,
    /// When the subscription was last healthy, in milliseconds since the Unix epoch.
    last_healthy_ms: u64,
    /// (conversation display id, last message id the socket delivered).
    last_messages: Vec<(u64, u64)>,
}

/// Where a token resumes from after a restart.
#[derive(Debug, PartialEq)]
pub(crate) struct ResumePoint {
    /// When the subscription was last healthy.
    pub(crate) last_healthy: SystemTime,
    /// (conversation display id, last message id the socket delivered).
    pub(crate) last_messages: Vec<(u64, u64)>,
}

/// One token's resume file.
pub(crate) struct ResumeFile {
    /// `backfill/<token>.json` in the spool directory.
    path: PathBuf,
    /// The token's account, written and checked.
    account_id: u64,
    /// When the file was last written, to write at most every [`SAVE_EVERY`].
    saved_at: Option<Instant>,
    /// Set while a write runs off the task: a second one waits its turn rather than racing.
    writing: Arc<AtomicBool>,
}

impl ResumeFile {
    /// The resume file of token `token` of `account_id` in `dir`.
    pub(crate) fn new(dir: &Path, token: &str, account_id: u64) -> ResumeFile {
        ResumeFile {
            path: dir.join(format!("{token}.json")),
            account_id,
            saved_at: None,
            writing: Arc::new(AtomicBool::new(false)),
        }
    }

    /// The resume point saved by the previous run, if there is a usable one.
    pub(crate) fn load(&self) -> Option<ResumePoint> {
        let text = match read_bounded(&self.path) {
            Ok(Some(text)) => text,
            Ok(None) => return None,
            Err(reason) => {
                warn!(path = %self.path.display(), %reason,
                    "ignored the backfill resume file: a gap across the restart is not backfilled");
                return None;
            }
        };
        let saved: Saved = match serde_json::from_slice(&text) {
            Ok(saved) => saved,
            Err(e) => {
                warn!(path = %self.path.display(), error = %e,
                    "ignored a damaged backfill resume file: a gap across the restart is not backfilled");
                return None;
            }
        };
        if saved.account_id != self.account_id {
            warn!(path = %self.path.display(), saved = saved.account_id, configured = self.account_id,
                "ignored the backfill resume file of another account");
            return None;
        }
        Some(ResumePoint {
            last_healthy: SystemTime::UNIX_EPOCH + Duration::from_millis(saved.last_healthy_ms),
            last_messages: saved.last_messages,
        })
    }

    /// Saves `point` off the task when [`SAVE_EVERY`] has passed since the last save and no
    /// save is running; `point` is only built then.
    pub(crate) fn save_now_and_then(&mut self, point: impl FnOnce() -> ResumePoint) {
        if self.saved_at.is_some_and(|at| at.elapsed() < SAVE_EVERY)
            || self.writing.swap(true, Ordering::AcqRel)
        {
            return;
        }
        self.saved_at = Some(Instant::now());
        let bytes = self.encode(&point());
        let (path, writing) = (self.path.clone(), self.writing.clone());
        tokio::task::spawn_blocking(move || {
            if let Err(e) = write_atomically(&path, &bytes) {
                warn!(path = %path.display(), error = %e, "could not save the backfill resume file");
            }
            writing.store(false, Ordering::Release);
        });
    }

    /// Saves `point` now, on this thread: when the task stops.
    pub(crate) fn save(&self, point: &ResumePoint) {
        if let Err(e) = write_atomically(&self.path, &self.encode(point)) {
            warn!(path = %self.path.display(), error = %e, "could not save the backfill resume file");
        }
    }

    /// The file's bytes for `point`.
    fn encode(&self, point: &ResumePoint) -> Vec<u8> {
        let saved = Saved {
            account_id: self.account_id,
            last_healthy_ms: point
                .last_healthy
                .duration_since(SystemTime::UNIX_EPOCH)
                .unwrap_or_default()
                .as_millis() as u64,
            last_messages: point.last_messages.clone(),
        };
        serde_json::to_vec(&saved).unwrap_or_default()
    }
}

/// The file's bytes, at most [`MAX_RESUME_FILE_BYTES`]; `None` when there is none.
fn read_bounded(path: &Path) -> Result<Option<Vec<u8>>, String> {
    let file = match std::fs::File::open(path) {
        Ok(file) => file,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e.to_string()),
    };
    let mut text = Vec::new();
    file.take(MAX_RESUME_FILE_BYTES + 1)
        .read_to_end(&mut text)
        .map_err(|e| e.to_string())?;
    if text.len() as u64 > MAX_RESUME_FILE_BYTES {
        return Err(format!("larger than {MAX_RESUME_FILE_BYTES} bytes"));
    }
    Ok(Some(text))
}

/// Writes `bytes` to a temporary file beside `path` and renames it over `path`, so a reader
/// sees the old content or the new, never half.
fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let temporary = path.with_extension("json.tmp");
    std::fs::write(&temporary, bytes)?;
    std::fs::rename(&temporary, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn point(seconds: u64) -> ResumePoint {
        ResumePoint {
            last_healthy: SystemTime::UNIX_EPOCH + Duration::from_secs(seconds),
            last_messages: vec![(87, 5120), (88, 5200)],
        }
    }

    #[test]
    fn a_saved_point_is_read_back_for_its_account_only() {
        let dir = tempfile::tempdir().unwrap();
        let file = ResumeFile::new(&dir.path().join("backfill"), "agent", 1);
        assert_eq!(file.load(), None, "nothing saved yet");
        file.save(&point(1_000));
        assert_eq!(file.load(), Some(point(1_000)));
        let other_account = ResumeFile::new(&dir.path().join("backfill"), "agent", 2);
        assert_eq!(other_account.load(), None);
    }

    #[test]
    fn a_damaged_or_oversized_file_is_ignored() {
        let dir = tempfile::tempdir().unwrap();
        let file = ResumeFile::new(dir.path(), "agent", 1);
        std::fs::write(dir.path().join("agent.json"), b"{\"account_id\":1,").unwrap();
        assert_eq!(file.load(), None);
        let big = vec![b' '; MAX_RESUME_FILE_BYTES as usize + 1];
        std::fs::write(dir.path().join("agent.json"), big).unwrap();
        assert_eq!(file.load(), None);
    }

    #[tokio::test]
    async fn saves_while_healthy_are_spaced() {
        let dir = tempfile::tempdir().unwrap();
        let mut file = ResumeFile::new(dir.path(), "agent", 1);
        file.save_now_and_then(|| point(1_000));
        for _ in 0..100 {
            if !file.writing.load(Ordering::Acquire) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(file.load(), Some(point(1_000)));
        file.save_now_and_then(|| panic!("not built within SAVE_EVERY of the last save"));
        assert_eq!(file.load(), Some(point(1_000)));
    }
}
