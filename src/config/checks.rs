//! Checks of single values that several sections share; a leaf of the config folder.

use std::time::Duration;

use tokio_tungstenite::tungstenite::http::Uri;

use crate::types::MAX_DURATION;

/// A timeout or interval: above zero, and short enough for `Instant` to hold.
pub(super) fn check_duration(value: Duration) -> Result<(), &'static str> {
    if value.is_zero() {
        Err("must be greater than zero")
    } else if value > MAX_DURATION {
        Err("must be at most 30 days")
    } else {
        Ok(())
    }
}

/// `wss://host:port/cable` -> `https://host:port`.
pub(super) fn derive_origin(url: &str) -> Option<String> {
    let uri: Uri = url.parse().ok()?;
    let scheme = match uri.scheme_str()? {
        "wss" => "https",
        _ => "http",
    };
    Some(format!("{scheme}://{}", uri.authority()?))
}
