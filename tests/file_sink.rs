//! The file sink on a real file system: the mode of the files it creates, and a batch that the
//! OS refuses halfway. A binary of its own, because both tests change what is process-wide (the
//! umask, the file size limit) and must not disturb other tests.

mod support;

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;

use chatwoot_bridge::event::{Event, EventId};
use chatwoot_bridge::sink::{Outcome, Sink};
use support::{sink, within};

/// An event whose `data` carries `padding` bytes of text.
fn event(id: u128, padding: usize) -> Arc<Event> {
    let data = format!(r#"{{"account_id":1,"text":"{}"}}"#, "x".repeat(padding));
    let mut e = Event::for_test("message.created", "agent", &data);
    e.id = EventId(id);
    Arc::new(e)
}

/// A file sink appending to `path`, with `extra` settings.
async fn file_sink(path: &Path, extra: &str) -> Sink {
    sink(
        "archive",
        &format!("{{ type: file, path: '{}'{extra} }}", path.display()),
    )
    .await
}

async fn outcomes(sink: &mut Sink, batch: &[Arc<Event>]) -> Vec<&'static str> {
    within("the sink's outcomes", sink.deliver(batch))
        .await
        .iter()
        .map(|o| match o {
            Outcome::Delivered => "delivered",
            Outcome::Retryable(_) => "retryable",
            Outcome::Permanent(_) => "permanent",
        })
        .collect()
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

#[tokio::test]
async fn a_created_file_is_readable_by_its_owner_only_unless_the_config_says_otherwise() {
    // The usual umask, which leaves new files readable by everyone.
    // SAFETY: umask only sets the process's file creation mask.
    unsafe { libc::umask(0o022) };
    let dir = tempfile::tempdir().unwrap();
    let private = dir.path().join("private.jsonl");
    let mut sink = file_sink(&private, "").await;
    assert_eq!(outcomes(&mut sink, &[event(1, 1)]).await, ["delivered"]);
    assert_eq!(mode(&private), 0o600);

    // The operator's mode, exactly (the umask would have taken the group's write bit).
    let shared = dir.path().join("shared.jsonl");
    let mut sink = file_sink(&shared, ", mode: '0660'").await;
    assert_eq!(outcomes(&mut sink, &[event(1, 1)]).await, ["delivered"]);
    assert_eq!(mode(&shared), 0o660);

    // An existing file keeps the mode it has.
    std::fs::set_permissions(&private, std::fs::Permissions::from_mode(0o644)).unwrap();
    let mut sink = file_sink(&private, "").await;
    assert_eq!(outcomes(&mut sink, &[event(2, 1)]).await, ["delivered"]);
    assert_eq!(mode(&private), 0o644);
}

/// Sets the soft limit on the size of files this process writes.
fn limit_file_size(bytes: libc::rlim_t) {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: get/setrlimit read and write the struct passed; the soft limit stays at or under
    // the hard one, which an unprivileged process may set.
    unsafe {
        assert_eq!(libc::getrlimit(libc::RLIMIT_FSIZE, &mut limit), 0);
        limit.rlim_cur = bytes.min(limit.rlim_max);
        assert_eq!(libc::setrlimit(libc::RLIMIT_FSIZE, &limit), 0);
    }
}

#[tokio::test]
async fn a_batch_refused_halfway_leaves_whole_lines_and_its_retry_writes_each_once() {
    // The size limit makes write(2) stop partway (and then fail with EFBIG) instead of
    // stopping the process with SIGXFSZ.
    // SAFETY: ignoring a signal installs no handler code.
    unsafe { libc::signal(libc::SIGXFSZ, libc::SIG_IGN) };
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("events.jsonl");
    std::fs::write(&path, "existing\n").unwrap();
    let mut sink = file_sink(&path, "").await;
    // Five events of 1 MiB each: the file may grow by 3.5 MiB only.
    let batch: Vec<Arc<Event>> = (1..=5).map(|id| event(id, 1 << 20)).collect();
    limit_file_size(9 + (7 << 19));
    let refused = outcomes(&mut sink, &batch).await;
    limit_file_size(libc::RLIM_INFINITY);
    assert_eq!(refused, ["retryable"; 5]);
    let after = std::fs::read(&path).unwrap();
    assert!(
        after == b"existing\n",
        "a refused batch must leave nothing behind; the file has {} bytes, ending {:?}",
        after.len(),
        String::from_utf8_lossy(&after[after.len().saturating_sub(20)..])
    );

    assert_eq!(outcomes(&mut sink, &batch).await, ["delivered"; 5]);
    within("the sink to close", sink.close()).await;
    let text = std::fs::read_to_string(&path).unwrap();
    let mut lines = text.lines();
    assert_eq!(lines.next(), Some("existing"));
    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
    for line in lines {
        let v: serde_json::Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("a torn line ({e}): {}", &line[..line.len().min(80)]));
        *seen
            .entry(v["id"].as_str().unwrap().to_owned())
            .or_default() += 1;
    }
    let expected: BTreeMap<String, usize> = batch.iter().map(|e| (e.id.to_string(), 1)).collect();
    assert_eq!(seen, expected, "each event once");
    assert!(text.ends_with('\n'));
}
