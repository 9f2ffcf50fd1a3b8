//! Bounds on the config before it is parsed into a tree: its size, how deep it nests, and how
//! many values it holds once its aliases are expanded.
//!
//! The YAML loader, the `config` crate and serde build and walk (and drop) the tree recursively,
//! so a file nested a few thousand levels deep (`- - - - …` is two bytes a level) overflowed the
//! stack, and a handful of aliases that each repeat the one before (the "billion laughs")
//! expanded into gigabytes. The file is therefore first read as a stream of YAML events, which
//! needs neither recursion nor the expanded tree, and refused past these limits with the line
//! where it went past.

use std::collections::HashMap;

use yaml_rust2::parser::{Event, Parser};

use super::{ConfigError, ENV_PREFIX};

/// Largest config file read. A config for 10,000 tokens is about 1.5 MB.
pub const MAX_CONFIG_BYTES: u64 = 16 << 20;

/// Deepest nesting of mappings and lists in the config (the schema itself needs 6:
/// `routes[0].where[0].equals` holding a list). Also bounds `${VAR}` expansion over the tree and
/// the keys `CHATWOOT_BRIDGE__A__B` overrides name.
pub const MAX_CONFIG_NESTING: usize = 32;

/// Most values (scalars, mappings and lists) the config may hold once its aliases are expanded;
/// a config for 10,000 tokens holds about 60,000.
pub const MAX_CONFIG_VALUES: u64 = 1_000_000;

/// The measure of a value read whole: what it adds to the one holding it, and what an alias
/// to it repeats.
#[derive(Debug, Clone, Copy)]
struct Measure {
    /// Values in it, itself included, aliases inside it expanded.
    values: u64,
    /// Levels of mappings and lists it takes, itself included (0 for a scalar).
    depth: usize,
}

/// A scalar's measure.
const SCALAR: Measure = Measure {
    values: 1,
    depth: 0,
};

/// A mapping or a list being read.
#[derive(Debug, Clone, Copy)]
struct Open {
    /// Its anchor id (0: none), to remember its measure when it ends.
    anchor: usize,
    /// Values in it so far, itself included.
    values: u64,
    /// Levels below it so far.
    below: usize,
}

/// Checks the config `text` against [`MAX_CONFIG_BYTES`], [`MAX_CONFIG_NESTING`] and
/// [`MAX_CONFIG_VALUES`]. Text that is not YAML passes: the loader reports where it is wrong.
pub(super) fn check_yaml(text: &str) -> Result<(), ConfigError> {
    check_yaml_of(text, "config", "the schema needs 6")
}

/// [`check_yaml`] for another YAML file the daemon reads (`what` names it in errors; `needs`
/// says how deep its own schema nests).
pub(crate) fn check_yaml_of(text: &str, what: &str, needs: &str) -> Result<(), ConfigError> {
    if text.len() as u64 > MAX_CONFIG_BYTES {
        return Err(too_much(
            what.into(),
            format!("is larger than {MAX_CONFIG_BYTES} bytes (MAX_CONFIG_BYTES)"),
        ));
    }
    let mut parser = Parser::new_from_str(text);
    let mut open: Vec<Open> = vec![Open {
        anchor: 0,
        values: 0,
        below: 0,
    }];
    let mut anchored: HashMap<usize, Measure> = HashMap::new();
    loop {
        let Ok((event, at)) = parser.next_token() else {
            return Ok(());
        };
        let place = || format!("line {}, column {}", at.line(), at.col() + 1);
        let added = match event {
            Event::StreamEnd => return Ok(()),
            Event::SequenceStart(anchor, _) | Event::MappingStart(anchor, _) => {
                if open.len() > MAX_CONFIG_NESTING {
                    return Err(too_deep(place(), what, needs));
                }
                open.push(Open {
                    anchor,
                    values: 1,
                    below: 0,
                });
                continue;
            }
            Event::SequenceEnd | Event::MappingEnd => {
                let Some(done) = open.pop().filter(|_| !open.is_empty()) else {
                    return Ok(());
                };
                let measure = Measure {
                    values: done.values,
                    depth: done.below + 1,
                };
                if done.anchor != 0 {
                    anchored.insert(done.anchor, measure);
                }
                measure
            }
            Event::Scalar(_, _, anchor, _) => {
                if anchor != 0 {
                    anchored.insert(anchor, SCALAR);
                }
                SCALAR
            }
            // An alias to a value still open (the loader refuses it) counts as one.
            Event::Alias(anchor) => anchored.get(&anchor).copied().unwrap_or(SCALAR),
            _ => continue,
        };
        let parent = open.last_mut().expect("the document level is never popped");
        parent.values = parent.values.saturating_add(added.values);
        parent.below = parent.below.max(added.depth);
        if open.len() - 1 + added.depth > MAX_CONFIG_NESTING {
            return Err(too_deep(place(), what, needs));
        }
        if open
            .iter()
            .map(|o| o.values)
            .fold(0u64, u64::saturating_add)
            > MAX_CONFIG_VALUES
        {
            return Err(too_much(
                place(),
                format!(
                    "holds more than {MAX_CONFIG_VALUES} values once its aliases are expanded \
                     (MAX_CONFIG_VALUES)"
                ),
            ));
        }
    }
}

/// Checks that no `CHATWOOT_BRIDGE__A__B…` override among `names` reaches deeper than
/// [`MAX_CONFIG_NESTING`].
pub(super) fn check_overrides<'n>(names: impl Iterator<Item = &'n str>) -> Result<(), ConfigError> {
    let prefix = format!("{ENV_PREFIX}__");
    for name in names {
        if let Some(path) = name.strip_prefix(&prefix) {
            if path.split("__").count() > MAX_CONFIG_NESTING {
                return Err(too_much(
                    format!("environment variable {}…", &name[..prefix.len()]),
                    format!(
                        "overrides a key nested deeper than {MAX_CONFIG_NESTING} levels \
                         (MAX_CONFIG_NESTING)"
                    ),
                ));
            }
        }
    }
    Ok(())
}

fn too_deep(at: String, what: &str, needs: &str) -> ConfigError {
    too_much(
        at,
        format!(
            "{what} nests mappings and lists deeper than {MAX_CONFIG_NESTING} levels \
             (MAX_CONFIG_NESTING; {needs})"
        ),
    )
}

fn too_much(at: String, message: String) -> ConfigError {
    ConfigError::Limit { at, message }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nested_lists(depth: usize) -> String {
        format!("x:\n  {}1\n", "- ".repeat(depth))
    }

    #[test]
    fn nesting_up_to_the_limit_passes_and_one_more_is_refused_with_its_line() {
        // `x:` is one level, each `- ` one more.
        assert!(check_yaml(&nested_lists(MAX_CONFIG_NESTING - 1)).is_ok());
        let err = check_yaml(&nested_lists(MAX_CONFIG_NESTING))
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("line 2, column "), "{err}");
        assert!(err.contains("deeper than 32 levels"), "{err}");
        let flow = format!("x: {}1{}\n", "[".repeat(40), "]".repeat(40));
        assert!(check_yaml(&flow).is_err());
    }

    #[test]
    fn a_hundred_thousand_levels_are_refused_without_recursion() {
        let text = nested_lists(100_000);
        let err = std::thread::Builder::new()
            .stack_size(64 << 10)
            .spawn(move || check_yaml(&text).map_err(|e| e.to_string()))
            .unwrap()
            .join()
            .expect("no stack overflow")
            .unwrap_err();
        assert!(err.contains("MAX_CONFIG_NESTING"), "{err}");
    }

    #[test]
    fn aliases_count_what_they_repeat() {
        // Each level repeats the one before ten times: 10^9 values once expanded.
        let mut text = String::from("a0: &a0 [x, x, x, x, x, x, x, x, x, x]\n");
        for i in 1..9 {
            let prev = format!("*a{}", i - 1);
            let list = [prev.as_str(); 10].join(", ");
            text.push_str(&format!("a{i}: &a{i} [{list}]\n"));
        }
        let err = check_yaml(&text).unwrap_err().to_string();
        assert!(err.contains("MAX_CONFIG_VALUES"), "{err}");
        // A few aliases that repeat a small block, as configs use them, pass.
        let text = "base: &retry { initial: 1s, max: 30s }\nsinks:\n  a: { retry: *retry }\n  b: { retry: *retry }\n";
        assert!(check_yaml(text).is_ok());
    }

    #[test]
    fn an_alias_counts_the_depth_of_what_it_repeats() {
        let deep = format!("a: &deep {}1{}\n", "[".repeat(20), "]".repeat(20));
        let text = format!("{deep}b: {}*deep{}\n", "[".repeat(20), "]".repeat(20));
        let err = check_yaml(&text).unwrap_err().to_string();
        assert!(err.contains("MAX_CONFIG_NESTING"), "{err}");
    }

    #[test]
    fn overrides_nested_too_deep_are_refused() {
        let deep = format!("CHATWOOT_BRIDGE__{}", vec!["A"; 40].join("__"));
        let err = check_overrides([deep.as_str()].into_iter())
            .unwrap_err()
            .to_string();
        assert!(err.contains("MAX_CONFIG_NESTING"), "{err}");
        assert!(check_overrides(
            [
                "CHATWOOT_BRIDGE__CHATWOOT__URL",
                "CHATWOOT_BRIDGE_LOG_FORMAT"
            ]
            .into_iter()
        )
        .is_ok());
    }
}
