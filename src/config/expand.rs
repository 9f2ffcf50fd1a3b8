//! `${VAR}` and `${VAR:-default}` in the strings of the config tree, before it is deserialized.

use super::ConfigError;

/// `value` with every string expanded; `key` is its path (empty at the top), named in errors.
pub(super) fn expand_tree(
    value: serde_json::Value,
    key: &str,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<serde_json::Value, ConfigError> {
    use serde_json::Value;
    Ok(match value {
        Value::String(s) => Value::String(expand_string(&s, key, env)?),
        Value::Array(items) => Value::Array(
            items
                .into_iter()
                .enumerate()
                .map(|(i, v)| expand_tree(v, &format!("{key}[{i}]"), env))
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
                    expand_tree(v, &child, env).map(|v| (k, v))
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
