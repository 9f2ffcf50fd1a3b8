//! What a backfilling token keeps on disk, so that a gap across a restart of the bridge (or of
//! the token's task, after a reload or a panic) is backfilled too: the moment to resume from
//! (the last healthy one, or earlier while a gap is not backfilled yet or the stall check waits
//! for activity), and per conversation the last message id delivered (live or backfilled) by
//! that moment, which a backfill after the restart reads from instead of sending those
//! messages again.
//!
//! One small JSON file per token in the spool directory (`backfill/<token>.json`), written at
//! most every [`SAVE_EVERY`] while the subscription is healthy and once when the task stops;
//! written to a temporary file, synced and renamed, on a blocking thread, never an older point
//! over a newer one. A missing, unreadable, future-dated or foreign file (another account) is
//! ignored with a warning: the token then starts as a new one, with no gap before its first
//! subscription.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use serde::{Deserialize, Serialize};
use tracing::warn;

/// Bounds the file read back at start: 512 conversations take about 20 KB.
pub const MAX_RESUME_FILE_BYTES: u64 = 256 * 1024;

/// How far past this machine's clock a saved moment may be (a small clock adjustment) before
/// the file is taken as damaged.
const FUTURE_SLACK: Duration = Duration::from_secs(60);

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
    /// (conversation display id, last message id delivered by the moment resumed from).
    last_messages: Vec<(u64, u64)>,
}

/// Where a token resumes from after a restart.
#[derive(Debug, PartialEq)]
pub(crate) struct ResumePoint {
    /// When the subscription was last healthy.
    pub(crate) last_healthy: SystemTime,
    /// (conversation display id, last message id delivered by the moment resumed from).
    pub(crate) last_messages: Vec<(u64, u64)>,
}

/// One token's resume file.
pub(crate) struct ResumeFile {
    /// `backfill/<token>.json` in the spool directory.
    path: PathBuf,
    /// The token's account, written and checked.
    account_id: u64,
    /// When a save was last started, to save at most every [`SAVE_EVERY`] while healthy.
    saved_at: Option<Instant>,
    /// Numbers the saves, so a save that runs late never puts back an older point.
    next_save: Arc<AtomicU64>,
    /// Held while writing, with the number of the latest save written.
    written: Arc<Mutex<u64>>,
}

/// Makes each temporary file's name unique in the process: the resume files of a token's old
/// and new task (a reload restarts it) never write the same temporary file.
static TEMPORARY_FILES: AtomicU64 = AtomicU64::new(0);

impl ResumeFile {
    /// The resume file of token `token` of `account_id` in `dir`.
    pub(crate) fn new(dir: &Path, token: &str, account_id: u64) -> ResumeFile {
        ResumeFile {
            path: dir.join(format!("{token}.json")),
            account_id,
            saved_at: None,
            next_save: Arc::new(AtomicU64::new(1)),
            written: Arc::new(Mutex::new(0)),
        }
    }

    /// The resume point saved by the previous run, if there is a usable one; read on a
    /// blocking thread.
    pub(crate) async fn load(&self) -> Option<ResumePoint> {
        let path = self.path.clone();
        let account_id = self.account_id;
        tokio::task::spawn_blocking(move || load(&path, account_id))
            .await
            .ok()
            .flatten()
    }
    /// Whether a save while healthy is due: [`SAVE_EVERY`] passed since the last one.
    pub(crate) fn due(&self) -> bool {
        self.saved_at.is_none_or(|at| at.elapsed() >= SAVE_EVERY)
    }

    /// Saves `point` on a blocking thread, without waiting: while healthy, when
    /// [`ResumeFile::due`].
    pub(crate) fn save_in_background(&mut self, point: &ResumePoint) {
        self.saved_at = Some(Instant::now());
        tokio::task::spawn_blocking(self.save_job(point));
    }

    /// Saves `point` and waits for it: when the task stops.
    pub(crate) async fn save(&self, point: &ResumePoint) {
        let _ = tokio::task::spawn_blocking(self.save_job(point)).await;
    }

    /// The blocking work of one save, numbered now: it writes unless a later save was
    /// written first.
    fn save_job(&self, point: &ResumePoint) -> impl FnOnce() + Send + 'static {
        let number = self.next_save.fetch_add(1, Ordering::Relaxed);
        let bytes = self.encode(point);
        let (path, written) = (self.path.clone(), self.written.clone());
        move || {
            let mut latest = written.lock().expect("resume write lock");
            if *latest > number {
                return;
            }
            match write_atomically(&path, &bytes) {
                Ok(()) => *latest = number,
                Err(e) => {
                    warn!(path = %path.display(), error = %e, "could not save the backfill resume file");
                }
            }
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

/// See [`ResumeFile::load`].
fn load(path: &Path, account_id: u64) -> Option<ResumePoint> {
    let text = match read_bounded(path) {
        Ok(Some(text)) => text,
        Ok(None) => return None,
        Err(reason) => {
            warn!(path = %path.display(), %reason,
                "ignored the backfill resume file: a gap across the restart is not backfilled");
            return None;
        }
    };
    match parse(&text, account_id) {
        Ok(point) => Some(point),
        Err(reason) => {
            warn!(path = %path.display(), %reason,
                "ignored the backfill resume file: a gap across the restart is not backfilled");
            None
        }
    }
}

/// The resume point in a file's bytes, if they are one of `account_id`'s.
pub(crate) fn parse(text: &[u8], account_id: u64) -> Result<ResumePoint, String> {
    let saved: Saved = serde_json::from_slice(text).map_err(|e| format!("damaged: {e}"))?;
    if saved.account_id != account_id {
        return Err(format!(
            "kept for account {}, not the configured {account_id}",
            saved.account_id
        ));
    }
    let last_healthy = SystemTime::UNIX_EPOCH + Duration::from_millis(saved.last_healthy_ms);
    let now = SystemTime::now();
    if last_healthy > now + FUTURE_SLACK {
        // Damage, or a clock stepped back: a gap from a future moment would read nothing.
        return Err(format!(
            "its last healthy moment ({} ms after the Unix epoch) is in the future (a damaged file, or this machine's clock went back)",
            saved.last_healthy_ms
        ));
    }
    Ok(ResumePoint {
        // A moment a little ahead (a clock adjusted back since) resumes from now.
        last_healthy: last_healthy.min(now),
        last_messages: saved.last_messages,
    })
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

/// Writes `bytes` to a temporary file beside `path`, syncs it and renames it over `path`, so a
/// reader sees the old content or the new, never half, even after a power loss.
fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let unique = TEMPORARY_FILES.fetch_add(1, Ordering::Relaxed);
    let temporary = path.with_extension(format!("json.{}.{unique}.tmp", std::process::id()));
    let written = std::fs::File::create(&temporary).and_then(|mut file| {
        file.write_all(bytes)?;
        file.sync_all()
    });
    match written.and_then(|()| std::fs::rename(&temporary, path)) {
        Ok(()) => Ok(()),
        Err(e) => {
            let _ = std::fs::remove_file(&temporary);
            Err(e)
        }
    }
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

    #[tokio::test]
    async fn a_saved_point_is_read_back_for_its_account_only() {
        let dir = tempfile::tempdir().unwrap();
        let file = ResumeFile::new(&dir.path().join("backfill"), "agent", 1);
        assert_eq!(file.load().await, None, "nothing saved yet");
        file.save(&point(1_000)).await;
        assert_eq!(file.load().await, Some(point(1_000)));
        let other_account = ResumeFile::new(&dir.path().join("backfill"), "agent", 2);
        assert_eq!(other_account.load().await, None);
        let names: Vec<_> = std::fs::read_dir(dir.path().join("backfill"))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["agent.json"], "no temporary file left behind");
    }

    #[test]
    fn a_point_in_the_future_is_refused() {
        let in_an_hour = SystemTime::now() + Duration::from_secs(3_600);
        let ms = in_an_hour
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap()
            .as_millis();
        let text = format!(r#"{{"account_id":1,"last_healthy_ms":{ms},"last_messages":[]}}"#);
        let refused = parse(text.as_bytes(), 1).unwrap_err();
        assert!(refused.contains("in the future"), "{refused}");
        let far = br#"{"account_id":1,"last_healthy_ms":18446744073709551615,"last_messages":[]}"#;
        assert!(parse(far, 1).is_err());
    }

    #[tokio::test]
    async fn a_damaged_or_oversized_file_is_ignored() {
        let dir = tempfile::tempdir().unwrap();
        let file = ResumeFile::new(dir.path(), "agent", 1);
        std::fs::write(dir.path().join("agent.json"), b"{\"account_id\":1,").unwrap();
        assert_eq!(file.load().await, None);
        let big = vec![b' '; MAX_RESUME_FILE_BYTES as usize + 1];
        std::fs::write(dir.path().join("agent.json"), big).unwrap();
        assert_eq!(file.load().await, None);
    }

    #[tokio::test]
    async fn saves_while_healthy_are_spaced_and_a_late_save_never_wins() {
        let dir = tempfile::tempdir().unwrap();
        let mut file = ResumeFile::new(dir.path(), "agent", 1);
        // Numbered before the periodic save, run after it: an older point, not written.
        let late = file.save_job(&point(900));
        assert!(file.due());
        file.save_in_background(&point(1_000));
        assert!(!file.due(), "not due again within SAVE_EVERY");
        file.save(&point(1_100)).await;
        tokio::task::spawn_blocking(late).await.unwrap();
        assert_eq!(file.load().await, Some(point(1_100)));
    }
}
