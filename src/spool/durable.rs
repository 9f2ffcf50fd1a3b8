//! Making directory entries survive a machine crash: a file's `fsync` makes its bytes durable,
//! not the name that reaches it. A file created or renamed, and not followed by an fsync of its
//! directory, can be missing (or have its old content under the new name) after a power cut.
//! Shared by the spool and the dead letters kept beside it.

use std::fs::{self, File};
use std::io;
use std::path::Path;

/// Fsyncs the directory `dir`, so that files created, renamed or deleted in it stay so.
pub(crate) fn fsync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()?;
    #[cfg(test)]
    record::fsynced(dir);
    Ok(())
}

/// Creates `dir` and any missing parents, fsyncing the directory that holds each one created
/// so that the new folders themselves survive a machine crash.
pub(crate) fn create_dir_durably(dir: &Path) -> io::Result<()> {
    let mut missing = Vec::new();
    let mut at = Some(dir);
    while let Some(path) = at.filter(|p| !p.as_os_str().is_empty() && !p.exists()) {
        missing.push(path);
        at = path.parent();
    }
    fs::create_dir_all(dir)?;
    for created in missing.iter().rev() {
        let parent = created
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        fsync_dir(parent)?;
    }
    Ok(())
}

/// Which directories this thread fsynced, so tests can check that an operation does.
#[cfg(test)]
pub(crate) mod record {
    use std::cell::RefCell;
    use std::path::{Path, PathBuf};

    thread_local! {
        /// The directories fsynced on this thread since the last [`take`].
        static FSYNCED: RefCell<Vec<PathBuf>> = const { RefCell::new(Vec::new()) };
    }

    pub(super) fn fsynced(dir: &Path) {
        FSYNCED.with(|f| f.borrow_mut().push(dir.to_path_buf()));
    }

    /// The directories fsynced on this thread since the last call, in order.
    pub(crate) fn take() -> Vec<PathBuf> {
        FSYNCED.with(|f| std::mem::take(&mut *f.borrow_mut()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn creating_nested_folders_fsyncs_the_parent_of_each() {
        let root = tempfile::tempdir().unwrap();
        let deep = root.path().join("a").join("b");
        record::take();
        create_dir_durably(&deep).unwrap();
        assert!(deep.is_dir());
        assert_eq!(
            record::take(),
            vec![root.path().to_path_buf(), root.path().join("a")]
        );
        // Already there: nothing to make durable.
        create_dir_durably(&deep).unwrap();
        assert!(record::take().is_empty());
    }
}
