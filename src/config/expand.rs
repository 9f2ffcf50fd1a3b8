//! `${VAR}` and `${VAR:-default}` in the strings of the config tree, before it is deserialized.

use super::shape::MAX_CONFIG_NESTING;
use super::ConfigError;

/// `value` with every string expanded; `key` is its path (empty at the top), named in errors.
/// The tree nests at most [`MAX_CONFIG_NESTING`] levels (the file was checked before it was
/// parsed); deeper is refused here too rather than walked, as the walk recurses.
pub(super) fn expand_tree(
    value: serde_json::Value,
    key: &str,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<serde_json::Value, ConfigError> {
    expand_below(value, key, env, 0)
}

/// [`expand_tree`] for a value `depth` levels of mappings and lists below the top.
fn expand_below(
    value: serde_json::Value,
    key: &str,
    env: &dyn Fn(&str) -> Option<String>,
    depth: usize,
) -> Result<serde_json::Value, ConfigError> {
    use serde_json::Value;
    if matches!(value, Value::Array(_) | Value::Object(_)) && depth >= MAX_CONFIG_NESTING {
        return Err(ConfigError::Limit {
            at: if key.is_empty() { "(top level)" } else { key }.to_owned(),
            message: format!(
                "nests mappings and lists deeper than {MAX_CONFIG_NESTING} levels \
                 (MAX_CONFIG_NESTING)"
            ),
        });
    }
    Ok(match value {
        Value::String(s) => Value::String(expand_string(&s, key, env)?),
        Value::Array(items) => Value::Array(
            items
                .into_iter()
                .enumerate()
                .map(|(i, v)| expand_below(v, &format!("{key}[{i}]"), env, depth + 1))
                .collect::<Result<_, _>>()?,
        ),
        Value::Object(map) => Value::Object(
            map.into_iter()
                .map(|(k, v)| {
                    let child = if key.is_empty() {
                        k.clone()
                    } else {
                        format!("{key}.{k}")
                    };
                    expand_below(v, &child, env, depth + 1).map(|v| (k, v))
                })
                .collect::<Result<_, _>>()?,
        ),
        other => other,
    })
}

/// Expands `${VAR}` and `${VAR:-default}`; `$${` stands for a literal `${`. `key` is where the
/// text is in the config, named in errors.
pub(super) fn expand_string(
    input: &str,
    key: &str,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<String, ConfigError> {
    let mut out = String::with_capacity(input.len());
    let mut rest = input;
    while let Some(start) = rest.find('$') {
        out.push_str(&rest[..start]);
        let tail = &rest[start..];
        if let Some(after) = tail.strip_prefix("$${") {
            out.push_str("${");
            rest = after;
        } else if let Some(body) = tail.strip_prefix("${") {
            let Some(end) = body.find('}') else {
                return Err(ConfigError::Schema {
                    key: key.into(),
                    message: "`${` is not closed by `}`".into(),
                });
            };
            let expr = &body[..end];
            let (var, default) = match expr.split_once(":-") {
                Some((var, default)) => (var, Some(default)),
                None => (expr, None),
            };
            if var.is_empty() || !var.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
                return Err(ConfigError::Schema {
                    key: key.into(),
                    message: format!("`${{{expr}}}` does not name an environment variable"),
                });
            }
            match (env(var), default) {
                (Some(value), _) => out.push_str(&value),
                (None, Some(default)) => out.push_str(default),
                (None, None) => {
                    return Err(ConfigError::MissingEnv {
                        key: key.into(),
                        var: var.into(),
                    })
                }
            }
            rest = &body[end + 1..];
        } else {
            out.push('$');
            rest = &tail[1..];
        }
    }
    out.push_str(rest);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `{"a": {"a": … "${X}" …}}`, `levels` mappings deep.
    fn nested(levels: usize) -> serde_json::Value {
        let mut value = serde_json::json!("${X}");
        for _ in 0..levels {
            value = serde_json::json!({ "a": value });
        }
        value
    }

    #[test]
    fn expansion_stops_at_the_nesting_limit_and_names_where() {
        let env = |_: &str| Some("x".to_owned());
        let expanded = expand_tree(nested(MAX_CONFIG_NESTING), "", &env).unwrap();
        assert_eq!(expanded, {
            let mut value = serde_json::json!("x");
            for _ in 0..MAX_CONFIG_NESTING {
                value = serde_json::json!({ "a": value });
            }
            value
        });
        let err = expand_tree(nested(MAX_CONFIG_NESTING + 1), "", &env)
            .unwrap_err()
            .to_string();
        let at = vec!["a"; MAX_CONFIG_NESTING].join(".");
        assert!(err.starts_with(&format!("{at}: nests")), "{err}");
        assert!(err.contains("MAX_CONFIG_NESTING"), "{err}");
    }
}
