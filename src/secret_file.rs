//! Secrets read from files: every secret key `K` of the config has a twin `K_file` of the same
//! shape whose values are paths, read when the config is loaded (so a reload reads them again).
//!
//! That is how systemd credentials (`${CREDENTIALS_DIRECTORY}/name`) and Kubernetes secrets
//! mounted as files reach the bridge without the secret in the config or the environment. A
//! file holds the value alone; its trailing line breaks are dropped (`echo` and editors add
//! one). Giving both `K` and `K_file` is an error naming both; an unreadable, empty, oversized
//! or non-UTF-8 file is an error naming the path, never the content.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};

use crate::types::{OneOrMany, Problems, Secret};

/// Largest secret file read: secrets are tokens, passwords and keys of a few hundred bytes at
/// most; anything larger is the wrong file.
pub const MAX_SECRET_FILE_BYTES: u64 = 64 * 1024;

/// A secret that was given but could not be read, or was given twice: its problem is already
/// reported, and checks of its value are skipped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Reported;

/// A secret given inline or from a file; `Err` when that failed (already reported).
pub(crate) type Resolved = Result<Secret, Reported>;

/// The value of secret `field` (`pubsub_token`), given inline or in `<field>_file`; `None`
/// when neither is given. Problems are reported at `field` and `<field>_file` in `at`.
pub(crate) fn one(
    at: &mut Problems<'_>,
    field: &str,
    inline: Option<Secret>,
    file: Option<PathBuf>,
) -> Option<Resolved> {
    match (inline, file) {
        (None, None) => None,
        (Some(value), None) => Some(Ok(value)),
        (Some(_), Some(_)) => {
            at.add(field, both(field));
            Some(Err(Reported))
        }
        (None, Some(path)) => Some(
            at.check(&format!("{field}_file"), read(&path))
                .ok_or(Reported),
        ),
    }
}

/// The values of secret map `field` (`headers`), merged with those of `<field>_file`; a name in
/// both, or a file that cannot be read, is reported and left out.
pub(crate) fn map(
    at: &mut Problems<'_>,
    field: &str,
    mut inline: BTreeMap<String, Secret>,
    files: BTreeMap<String, PathBuf>,
) -> BTreeMap<String, Secret> {
    for (name, path) in files {
        if inline.remove(&name).is_some() {
            at.add(
                &format!("{field}.{name}"),
                format!("is given in both {field} and {field}_file; keep one"),
            );
        } else if let Some(value) = at.check(&format!("{field}_file.{name}"), read(&path)) {
            inline.insert(name, value);
        }
    }
    inline
}

/// The values of secret `field` that may be one or a list (`secret`), given inline or in
/// `<field>_file`, each with the key its problems are reported at. A file that cannot be
/// read is reported and left out.
pub(crate) fn list(
    at: &mut Problems<'_>,
    field: &str,
    inline: Option<OneOrMany<Secret>>,
    files: Option<OneOrMany<PathBuf>>,
) -> Result<Vec<(String, Secret)>, Reported> {
    /// Each value with its key: `field` alone for one, `field[i]` in a list.
    fn keyed<T>(field: &str, values: OneOrMany<T>) -> Vec<(String, T)> {
        match values {
            OneOrMany::One(value) => vec![(field.to_owned(), value)],
            OneOrMany::Many(values) => values
                .into_iter()
                .enumerate()
                .map(|(i, value)| (format!("{field}[{i}]"), value))
                .collect(),
        }
    }
    match (inline, files) {
        (None, None) => Ok(Vec::new()),
        (Some(inline), None) => Ok(keyed(field, inline)),
        (Some(_), Some(_)) => {
            at.add(field, both(field));
            Err(Reported)
        }
        (None, Some(files)) => {
            let mut values = Vec::new();
            for (key, path) in keyed(&format!("{field}_file"), files) {
                values.extend(at.check(&key, read(&path)).map(|value| (key, value)));
            }
            Ok(values)
        }
    }
}

/// The problem of a secret given both inline and from a file.
fn both(field: &str) -> String {
    format!("{field} and {field}_file are both given; keep one")
}

/// A secret file's value: its text without trailing line breaks. Errors name the file, never
/// what is in it.
pub(crate) fn read(path: &Path) -> Result<Secret, String> {
    let mut bytes = Vec::new();
    std::fs::File::open(path)
        .and_then(|file| file.take(MAX_SECRET_FILE_BYTES + 1).read_to_end(&mut bytes))
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    if bytes.len() as u64 > MAX_SECRET_FILE_BYTES {
        return Err(format!(
            "{} is larger than {MAX_SECRET_FILE_BYTES} bytes (MAX_SECRET_FILE_BYTES); a secret \
             file holds the secret alone",
            path.display()
        ));
    }
    let text =
        String::from_utf8(bytes).map_err(|_| format!("{} is not UTF-8 text", path.display()))?;
    let value = text.trim_end_matches(['\n', '\r']);
    if value.is_empty() {
        return Err(format!("{} is empty", path.display()));
    }
    Ok(Secret::new(value))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The problems `at` collected, as `key: message` lines.
    fn lines(at: Problems<'_>) -> Vec<String> {
        at.found.iter().map(ToString::to_string).collect()
    }

    #[test]
    fn a_file_is_read_without_its_trailing_line_breaks_and_nothing_else() {
        let dir = tempfile::tempdir().unwrap();
        for (written, read_back) in [
            ("s3cret\n", "s3cret"),
            ("s3cret\r\n", "s3cret"),
            ("s3cret\n\n", "s3cret"),
            (" s3cret ", " s3cret "),
            ("two\nlines\n", "two\nlines"),
        ] {
            let path = dir.path().join("secret");
            std::fs::write(&path, written).unwrap();
            assert_eq!(read(&path).unwrap().expose(), read_back, "{written:?}");
        }
    }

    #[test]
    fn unreadable_empty_oversized_and_binary_files_are_refused_naming_the_path_only() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("secret");
        let shown = path.display().to_string();
        let missing = read(&path).unwrap_err();
        assert!(
            missing.starts_with(&format!("cannot read {shown}: ")),
            "{missing}"
        );
        std::fs::write(&path, "\n").unwrap();
        assert_eq!(read(&path).unwrap_err(), format!("{shown} is empty"));
        std::fs::write(&path, vec![b'x'; MAX_SECRET_FILE_BYTES as usize + 1]).unwrap();
        let large = read(&path).unwrap_err();
        assert!(
            large.starts_with(&format!("{shown} is larger than 65536 bytes")),
            "{large}"
        );
        std::fs::write(&path, b"hunter2\xff").unwrap();
        let binary = read(&path).unwrap_err();
        assert_eq!(binary, format!("{shown} is not UTF-8 text"));
        let directory = read(dir.path()).unwrap_err();
        assert!(directory.starts_with("cannot read"), "{directory}");
        // Exactly at the limit is accepted.
        std::fs::write(&path, vec![b'x'; MAX_SECRET_FILE_BYTES as usize]).unwrap();
        assert_eq!(
            read(&path).unwrap().expose().len(),
            MAX_SECRET_FILE_BYTES as usize
        );
    }

    #[test]
    fn both_forms_of_one_secret_are_refused_naming_both_keys() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        std::fs::write(&path, "from-file\n").unwrap();
        let mut at = Problems::new("tokens[0]");
        let got = one(
            &mut at,
            "pubsub_token",
            Some(Secret::new("inline")),
            Some(path.clone()),
        );
        assert_eq!(got, Some(Err(Reported)));
        assert_eq!(
            lines(at),
            ["tokens[0].pubsub_token: pubsub_token and pubsub_token_file are both given; keep one"]
        );
        let mut at = Problems::new("tokens[0]");
        let got = one(&mut at, "pubsub_token", None, Some(path));
        assert_eq!(got.unwrap().unwrap().expose(), "from-file");
        assert!(at.found.is_empty());
        let mut at = Problems::new("tokens[0]");
        assert_eq!(one(&mut at, "pubsub_token", None, None), None);
        let got = one(&mut at, "pubsub_token", None, Some(dir.path().join("nope")));
        assert_eq!(got, Some(Err(Reported)));
        let found = lines(at);
        assert!(
            found[0].starts_with("tokens[0].pubsub_token_file: cannot read "),
            "{found:?}"
        );
    }

    #[test]
    fn maps_merge_their_files_and_refuse_a_name_given_twice() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("auth");
        std::fs::write(&path, "Bearer from-file\n").unwrap();
        let mut at = Problems::new("sinks.hook");
        let inline = BTreeMap::from([
            ("X-Tenant".to_owned(), Secret::new("acme")),
            ("X-Twice".to_owned(), Secret::new("inline")),
        ]);
        let files = BTreeMap::from([
            ("Authorization".to_owned(), path.clone()),
            ("X-Twice".to_owned(), path),
            ("X-Gone".to_owned(), dir.path().join("gone")),
        ]);
        let merged = map(&mut at, "headers", inline, files);
        let merged: Vec<(&str, &str)> = merged
            .iter()
            .map(|(name, value)| (name.as_str(), value.expose()))
            .collect();
        assert_eq!(
            merged,
            [("Authorization", "Bearer from-file"), ("X-Tenant", "acme")]
        );
        let found = lines(at);
        assert!(
            found[0].starts_with("sinks.hook.headers_file.X-Gone: cannot read "),
            "{found:?}"
        );
        assert_eq!(
            found[1],
            "sinks.hook.headers.X-Twice: is given in both headers and headers_file; keep one"
        );
    }
}
