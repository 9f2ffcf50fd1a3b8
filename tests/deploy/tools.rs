//! The tools the checks run, found on PATH or where Debian installs them; a missing one fails
//! the test with its package.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The repository's root.
pub(crate) const ROOT: &str = env!("CARGO_MANIFEST_DIR");

/// `relative` under the repository's root.
pub(crate) fn repo_path(relative: &str) -> PathBuf {
    Path::new(ROOT).join(relative)
}

/// The text of the repository file `relative`.
pub(crate) fn read(relative: &str) -> String {
    std::fs::read_to_string(repo_path(relative))
        .unwrap_or_else(|e| panic!("cannot read {relative}: {e}"))
}

/// Finds `name`; panics naming the Debian package to install otherwise.
pub(crate) fn tool(name: &str, debian_package: &str) -> PathBuf {
    let path_dirs = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .unwrap_or_default();
    path_dirs
        .into_iter()
        .chain(["/usr/bin", "/usr/sbin", "/bin", "/sbin"].map(PathBuf::from))
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
        .unwrap_or_else(|| {
            panic!(
                "`{name}` is not installed, and this check needs it. Install it with \
                 `apt-get install {debian_package}` (or run scripts/install-test-deps.sh)"
            )
        })
}

/// Runs `command`; its output, whatever its exit status.
pub(crate) fn output_of(command: &mut Command) -> Output {
    command
        .output()
        .unwrap_or_else(|e| panic!("cannot run {command:?}: {e}"))
}

/// Stdout and stderr of `output`, for failure messages.
pub(crate) fn both(output: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// Every document of the YAML file `relative`.
pub(crate) fn yaml_documents(relative: &str) -> Vec<yaml_rust2::Yaml> {
    yaml_rust2::YamlLoader::load_from_str(&read(relative))
        .unwrap_or_else(|e| panic!("{relative} is not valid YAML: {e}"))
}

/// The one document of the YAML text `text` (named `what` in failures).
pub(crate) fn yaml_text(what: &str, text: &str) -> yaml_rust2::Yaml {
    let mut documents = yaml_rust2::YamlLoader::load_from_str(text)
        .unwrap_or_else(|e| panic!("{what} is not valid YAML: {e}"));
    assert_eq!(documents.len(), 1, "{what} holds one YAML document");
    documents.remove(0)
}

/// The string at `value`, failing with `what` it should have been.
pub(crate) fn text<'a>(value: &'a yaml_rust2::Yaml, what: &str) -> &'a str {
    value
        .as_str()
        .unwrap_or_else(|| panic!("{what} is a string (found {value:?})"))
}
