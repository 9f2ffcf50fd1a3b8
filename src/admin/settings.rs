//! The admin endpoint's settings (`admin:` in the config): where it listens, and which tokens
//! must be subscribed for the process to count as ready.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

/// The port the admin endpoint is documented on (9464 is the port OpenTelemetry's Prometheus
/// exporters use).
pub const DEFAULT_ADMIN_PORT: u16 = 9464;

/// The address the endpoint listens on when `admin:` gives none, or gives a port alone:
/// loopback, so that turning it on exposes nothing beyond the host.
pub const DEFAULT_ADMIN_LISTEN: SocketAddr =
    SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), DEFAULT_ADMIN_PORT);

/// The validated `admin:` section.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdminSettings {
    /// Where the endpoint listens; port 0 picks a free one (the log says which).
    pub listen: SocketAddr,
    /// Which tokens `/readyz` requires to be subscribed.
    pub ready_requires: ReadyRequires,
}

/// Which tokens must be subscribed for `/readyz` to say ready (the spool must be writable too).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum ReadyRequires {
    /// Every configured token.
    #[default]
    All,
    /// At least one token.
    Any,
    /// These tokens (possibly none: then only the spool counts). One rotated token outside
    /// the list does not take the process out of service.
    Tokens(Vec<String>),
}

/// `listen:` as written: `IP:port`, or a port alone (`9464`, `:9464`) for loopback. A host name
/// is refused rather than resolved: what it resolves to can change under a running daemon.
pub(crate) fn parse_listen(text: &str) -> Result<SocketAddr, String> {
    let port = text.strip_prefix(':').unwrap_or(text);
    if !port.is_empty() && port.bytes().all(|b| b.is_ascii_digit()) {
        let port: u16 = port
            .parse()
            .map_err(|_| format!("`{text}` is not a port (0 to 65535)"))?;
        return Ok(SocketAddr::new(DEFAULT_ADMIN_LISTEN.ip(), port));
    }
    text.parse().map_err(|_| {
        format!(
            "`{text}` is not `IP:port` or a port; a host name is not resolved (write \
             127.0.0.1:{DEFAULT_ADMIN_PORT}, or 0.0.0.0:{DEFAULT_ADMIN_PORT} to listen on every \
             interface)"
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_port_alone_listens_on_loopback_and_a_host_name_is_refused() {
        let loopback = |port| SocketAddr::from(([127, 0, 0, 1], port));
        assert_eq!(parse_listen("9464"), Ok(loopback(9464)));
        assert_eq!(parse_listen(":9000"), Ok(loopback(9000)));
        assert_eq!(
            parse_listen("0.0.0.0:9464"),
            Ok(SocketAddr::from(([0, 0, 0, 0], 9464)))
        );
        assert_eq!(parse_listen("[::1]:80"), Ok("[::1]:80".parse().unwrap()));
        let err = parse_listen("localhost:9464").unwrap_err();
        assert!(err.contains("a host name is not resolved"), "{err}");
        let err = parse_listen("70000").unwrap_err();
        assert!(err.contains("is not a port"), "{err}");
    }
}
