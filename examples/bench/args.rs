//! The `--name value` flags every role reads.

/// The process's arguments after the program name (the role first).
pub(crate) struct Args(Vec<String>);

impl Args {
    pub(crate) fn new(argv: Vec<String>) -> Args {
        Args(argv)
    }

    /// The value after `--name`, if the flag is given.
    pub(crate) fn get(&self, name: &str) -> Option<&str> {
        let flag = format!("--{name}");
        self.0
            .iter()
            .position(|a| *a == flag)
            .and_then(|i| self.0.get(i + 1))
            .map(String::as_str)
    }

    /// Whether `--name` is given (with any value).
    pub(crate) fn has(&self, name: &str) -> bool {
        self.get(name).is_some()
    }

    pub(crate) fn str(&self, name: &str, default: &str) -> String {
        self.get(name).unwrap_or(default).to_owned()
    }

    /// The value after `--name` parsed, or `default` when absent or unparsable.
    pub(crate) fn num<T: std::str::FromStr>(&self, name: &str, default: T) -> T {
        self.get(name)
            .and_then(|v| v.parse().ok())
            .unwrap_or(default)
    }
}
