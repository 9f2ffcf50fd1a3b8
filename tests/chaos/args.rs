//! The `--name value` flags every role reads.

use std::path::PathBuf;

use anyhow::{anyhow, Context, Result};

/// A role's arguments after the role name.
pub(crate) struct Args(
    /// The flags and their values, in order.
    Vec<String>,
);

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

    /// The value after `--name`; an error naming the flag when it is missing.
    pub(crate) fn required(&self, name: &str) -> Result<&str> {
        self.get(name)
            .ok_or_else(|| anyhow!("--{name} is required"))
    }

    /// The value after `--name` as a path.
    pub(crate) fn path(&self, name: &str) -> Result<PathBuf> {
        self.required(name).map(PathBuf::from)
    }

    /// The value after `--name` parsed, `default` when absent; an error when unparsable.
    pub(crate) fn num<T: std::str::FromStr>(&self, name: &str, default: T) -> Result<T>
    where
        T::Err: std::error::Error + Send + Sync + 'static,
    {
        match self.get(name) {
            Some(value) => value
                .parse()
                .with_context(|| format!("--{name} {value}: not a number")),
            None => Ok(default),
        }
    }
}
