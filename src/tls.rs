//! Client TLS of what the bridge reaches over the web (Chatwoot's cable, webhooks, and Chatwoot's
//! REST API): which servers it trusts, and which certificate it shows them.
//!
//! A server is trusted when its certificate chains to the system's trust store (the
//! distribution's bundle that `update-ca-certificates` manages, or `SSL_CERT_FILE` /
//! `SSL_CERT_DIR`), to the web roots bundled in the binary (so an image without a store still
//! reaches public hosts), or to the CAs of the section's `ca_file`. `cert_file` and `key_file`
//! are the client certificate shown to servers that ask for one. `insecure_skip_verify` turns
//! verification off, with a warning every time the config is loaded.
//!
//! Every file is read and checked when the config is loaded, so `check` refuses a missing,
//! unreadable or mismatched one before anything connects and a reload reads them again. Errors
//! name the file; nothing of a key's content reaches a message.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::pem::{self, PemObject};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore};
use schemars::JsonSchema;
use serde::Deserialize;
use xxhash_rust::xxh3::Xxh3;

use crate::types::{Problem, Problems};

/// Largest `ca_file`, `cert_file` or `key_file` read: a whole distribution bundle (about
/// 220 KB) fits several times over.
pub const MAX_TLS_FILE_BYTES: u64 = 1 << 20;

/// `tls:` as written: where the bridge is a TLS client (`chatwoot.tls`, `sinks.<name>.tls`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM CA certificate(s) trusted besides the system's store and the bundled web roots: the
    /// private CA a self-hosted server's certificate is signed by.
    ca_file: Option<PathBuf>,
    /// PEM client certificate (and its intermediates), shown to a server that asks for one
    /// (mutual TLS); with `key_file`.
    cert_file: Option<PathBuf>,
    /// PEM private key of `cert_file` (PKCS#8, PKCS#1 or SEC1; not encrypted).
    key_file: Option<PathBuf>,
    /// Accept any server certificate, so anyone on the way can read and change what is sent,
    /// tokens and signatures included. For a test bench only; warned about at every start.
    #[serde(default)]
    insecure_skip_verify: bool,
}

/// Client TLS ready to connect with, built from a [`TlsConfig`].
///
/// Two are equal when built from the same trust anchors (the system's included), client
/// certificate and verification setting: a reload that changes none of them can leave the
/// connections that use it alone.
#[derive(Clone)]
pub struct ClientTls {
    /// What the TLS libraries connect with.
    config: Arc<ClientConfig>,
    /// A digest of everything the config was built from, for equality.
    fingerprint: u128,
    /// Whether server certificates are verified (`insecure_skip_verify` is not set).
    verifies: bool,
}

impl std::fmt::Debug for ClientTls {
    /// Says what matters to an operator; certificates and keys are left out.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientTls")
            .field("verifies", &self.verifies)
            .field(
                "client_certificate",
                &self.config.client_auth_cert_resolver.has_certs(),
            )
            .finish()
    }
}

impl PartialEq for ClientTls {
    fn eq(&self, other: &Self) -> bool {
        self.fingerprint == other.fingerprint && self.verifies == other.verifies
    }
}

impl ClientTls {
    /// The config of rustls and the libraries on top of it (tokio-tungstenite, tokio-rustls).
    pub fn rustls(&self) -> Arc<ClientConfig> {
        self.config.clone()
    }

    /// `builder` with this TLS instead of reqwest's own roots.
    pub(crate) fn reqwest(&self, builder: reqwest::ClientBuilder) -> reqwest::ClientBuilder {
        builder.use_preconfigured_tls(ClientConfig::clone(&self.config))
    }

    /// Whether server certificates are verified (`insecure_skip_verify` is not set).
    pub fn verifies_certificates(&self) -> bool {
        self.verifies
    }
}

/// The files of a client certificate, read.
struct ClientIdentity {
    /// The certificate, then its intermediates.
    chain: Vec<CertificateDer<'static>>,
    /// Its private key.
    key: PrivateKeyDer<'static>,
}

impl TlsConfig {
    /// Reads and checks the files and builds the client TLS; `key` (such as `chatwoot.tls`) is
    /// where the section is, named in every problem and in the warning of
    /// `insecure_skip_verify`.
    pub fn validate(&self, key: &str) -> Result<ClientTls, Vec<Problem>> {
        let mut at = Problems::new(key);
        let private_cas = self
            .ca_file
            .as_deref()
            .and_then(|path| at.check("ca_file", read_certificates(path)));
        let identity = self.client_identity(&mut at);
        if self.insecure_skip_verify && self.ca_file.is_some() {
            at.add(
                "insecure_skip_verify",
                "verifies nothing, so ca_file would not be used: remove one of them",
            );
        }
        let mut fingerprint = Xxh3::new();
        let roots = match &private_cas {
            Some(cas) => trusted_roots(cas, self.ca_file.as_deref(), &mut at, &mut fingerprint),
            None => trusted_roots(&[], None, &mut at, &mut fingerprint),
        };
        if !at.found.is_empty() {
            return Err(at.found);
        }
        let crypto = provider();
        let builder = ClientConfig::builder_with_provider(crypto.clone())
            .with_safe_default_protocol_versions()
            .expect("ring supports the default protocol versions");
        let builder = if self.insecure_skip_verify {
            warn_insecure(key);
            builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(AcceptAnyServerCertificate(
                    crypto.signature_verification_algorithms,
                )))
        } else {
            builder.with_root_certificates(roots)
        };
        let config = match identity {
            None => builder.with_no_client_auth(),
            Some(identity) => {
                for der in &identity.chain {
                    fingerprint.update(der);
                }
                fingerprint.update(identity.key.secret_der());
                let built = builder.with_client_auth_cert(identity.chain, identity.key);
                match at.check("key_file", built.map_err(|e| self.mismatch(&e))) {
                    Some(config) => config,
                    None => return Err(at.found),
                }
            }
        };
        Ok(ClientTls {
            config: Arc::new(config),
            fingerprint: fingerprint.digest128(),
            verifies: !self.insecure_skip_verify,
        })
    }

    /// The client certificate and key, read; `None` when not configured or with a problem.
    fn client_identity(&self, at: &mut Problems<'_>) -> Option<ClientIdentity> {
        match (&self.cert_file, &self.key_file) {
            (None, None) => None,
            (Some(_), None) => {
                at.add(
                    "key_file",
                    "is needed with cert_file: the client certificate's key",
                );
                None
            }
            (None, Some(_)) => {
                at.add(
                    "cert_file",
                    "is needed with key_file: the key's client certificate",
                );
                None
            }
            (Some(cert), Some(key)) => {
                let chain = at.check("cert_file", read_certificates(cert));
                let key = at.check("key_file", read_private_key(key));
                Some(ClientIdentity {
                    chain: chain?,
                    key: key?,
                })
            }
        }
    }

    /// Why rustls refused the client certificate and key, naming both files.
    fn mismatch(&self, error: &rustls::Error) -> String {
        let (cert, key) = (
            self.cert_file.as_deref().unwrap_or(Path::new("")).display(),
            self.key_file.as_deref().unwrap_or(Path::new("")).display(),
        );
        match error {
            rustls::Error::InconsistentKeys(_) => {
                format!("the key in {key} does not belong to the certificate in {cert}")
            }
            other => format!("the key in {key} cannot sign for the certificate in {cert}: {other}"),
        }
    }
}

/// Logs that a section verifies no server certificate; called every time such a config is
/// loaded, so every start and every reload says it again.
fn warn_insecure(key: &str) {
    tracing::warn!(
        key = %format!("{key}.insecure_skip_verify"),
        "TLS certificate verification is OFF for {key}: any server on the way can pose as the \
         real one and read or change what is sent, tokens and signatures included. Name the \
         server's CA in {key}.ca_file instead"
    );
}

/// The trust anchors: the bundled web roots, the system's store, and `private_cas` (read from
/// `ca_file`, whose problems go to `at`). Every anchor's certificate goes into `fingerprint`.
fn trusted_roots(
    private_cas: &[CertificateDer<'static>],
    ca_file: Option<&Path>,
    at: &mut Problems<'_>,
    fingerprint: &mut Xxh3,
) -> RootCertStore {
    let mut roots = RootCertStore {
        roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
    };
    let system = rustls_native_certs::load_native_certs();
    for error in &system.errors {
        // A store that is partly unreadable still has the rest, and the bundled roots.
        tracing::warn!(%error, "part of the system's trust store could not be read");
    }
    for der in &system.certs {
        fingerprint.update(der);
    }
    roots.add_parsable_certificates(system.certs);
    let path = ca_file.map(Path::display);
    for (i, der) in private_cas.iter().enumerate() {
        fingerprint.update(der);
        if let Err(e) = roots.add(der.clone()) {
            let path = path.as_ref().expect("private CAs come from ca_file");
            at.add(
                "ca_file",
                format!(
                    "certificate {} of {path} cannot be a trust anchor: {e}",
                    i + 1
                ),
            );
        }
    }
    roots
}

/// The file's bytes, at most [`MAX_TLS_FILE_BYTES`]; errors name the file.
fn read_bounded(path: &Path) -> Result<Vec<u8>, String> {
    let mut bytes = Vec::new();
    std::fs::File::open(path)
        .and_then(|file| file.take(MAX_TLS_FILE_BYTES + 1).read_to_end(&mut bytes))
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    if bytes.len() as u64 > MAX_TLS_FILE_BYTES {
        return Err(format!(
            "{} is larger than {MAX_TLS_FILE_BYTES} bytes (MAX_TLS_FILE_BYTES); it is not a PEM \
             certificate or key file",
            path.display()
        ));
    }
    Ok(bytes)
}

/// The PEM certificates of a file, at least one.
pub(crate) fn read_certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let bytes = read_bounded(path)?;
    let certificates = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{} is not PEM: {}", path.display(), pem_error(&e)))?;
    if certificates.is_empty() {
        return Err(format!(
            "{} holds no PEM certificate (-----BEGIN CERTIFICATE-----)",
            path.display()
        ));
    }
    Ok(certificates)
}

/// The PEM private key of a file; an error never shows any of its content.
pub(crate) fn read_private_key(path: &Path) -> Result<PrivateKeyDer<'static>, String> {
    let bytes = read_bounded(path)?;
    PrivateKeyDer::from_pem_slice(&bytes).map_err(|e| match e {
        pem::Error::NoItemsFound => format!(
            "{} holds no PEM private key (PKCS#8, PKCS#1 or SEC1; an encrypted key is not \
             supported)",
            path.display()
        ),
        other => format!("{} is not PEM: {}", path.display(), pem_error(&other)),
    })
}

/// What is wrong with a PEM file, without the line or bytes it was found in (a key file's
/// content is secret).
fn pem_error(error: &pem::Error) -> &'static str {
    match error {
        pem::Error::MissingSectionEnd { .. } => "a section has no END line",
        pem::Error::IllegalSectionStart { .. } => "a BEGIN line is malformed",
        pem::Error::Base64Decode(_) => "a section's body is not base64",
        pem::Error::NoItemsFound => "it holds nothing of the kind expected",
        pem::Error::SectionTooLarge => "a section is too large",
        _ => "it cannot be read as PEM",
    }
}

/// A TLS failure inside `error`, in words an operator can act on, or `None` when it holds
/// none. `section` is where this connection's TLS is configured (`chatwoot.tls`), named in the
/// hint.
pub(crate) fn explain_failure(
    error: &(dyn std::error::Error + 'static),
    section: &str,
) -> Option<String> {
    let rustls_error = find_rustls_error(error)?;
    let hint = match rustls_error {
        rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer) => format!(
            "the server's certificate is signed by a CA this bridge does not trust; if it is a \
             private CA, name it in {section}.ca_file"
        ),
        rustls::Error::InvalidCertificate(
            CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
        ) => "the server's certificate is not valid for the host name or address connected to"
            .to_owned(),
        rustls::Error::InvalidCertificate(_) => "the server's certificate was refused".to_owned(),
        rustls::Error::AlertReceived(rustls::AlertDescription::CertificateRequired) => format!(
            "the server asks for a client certificate: give {section}.cert_file and key_file"
        ),
        _ => "the TLS handshake failed".to_owned(),
    };
    Some(format!("TLS error: {hint} ({rustls_error})"))
}

/// The rustls error in `error`'s chain of sources, looking inside I/O errors too (whose
/// `source` skips the error they wrap).
fn find_rustls_error<'a>(
    error: &'a (dyn std::error::Error + 'static),
) -> Option<&'a rustls::Error> {
    let mut next = Some(error);
    // Chains are a handful deep; the bound keeps a cyclic one from looping.
    for _ in 0..16 {
        let current = next?;
        if let Some(found) = current.downcast_ref::<rustls::Error>() {
            return Some(found);
        }
        if let Some(inner) = current
            .downcast_ref::<std::io::Error>()
            .and_then(std::io::Error::get_ref)
        {
            if let Some(found) = find_rustls_error(inner) {
                return Some(found);
            }
        }
        next = current.source();
    }
    None
}

/// The verifier of `insecure_skip_verify`: any certificate is accepted. Handshake signatures
/// are still checked, so the connection is at least with the holder of the certificate shown.
#[derive(Debug)]
struct AcceptAnyServerCertificate(WebPkiSupportedAlgorithms);

impl ServerCertVerifier for AcceptAnyServerCertificate {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.supported_schemes()
    }
}

/// The provider every TLS client and the mock's server are built with: ring, which every TLS
/// library in the tree already uses.
pub(crate) fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}
#[cfg(test)]
mod tests {
    use super::*;

    /// The problems of `tls` as `chatwoot.tls`, as `key: message` lines.
    fn problems(tls: serde_json::Value) -> Vec<String> {
        let config: TlsConfig = serde_json::from_value(tls).unwrap();
        match config.validate("chatwoot.tls") {
            Ok(built) => panic!("built {built:?}"),
            Err(found) => found.iter().map(ToString::to_string).collect(),
        }
    }

    #[test]
    fn without_files_the_system_store_and_the_bundled_roots_are_trusted() {
        let tls = TlsConfig::default().validate("chatwoot.tls").unwrap();
        assert!(tls.verifies_certificates());
        assert_eq!(
            format!("{tls:?}"),
            "ClientTls { verifies: true, client_certificate: false }"
        );
        // Built twice from the same store: equal, so a reload leaves sockets alone.
        assert_eq!(tls, TlsConfig::default().validate("chatwoot.tls").unwrap());
        let insecure = TlsConfig {
            insecure_skip_verify: true,
            ..TlsConfig::default()
        };
        let insecure = insecure.validate("chatwoot.tls").unwrap();
        assert!(!insecure.verifies_certificates());
        assert_ne!(tls, insecure);
    }

    #[test]
    fn missing_unreadable_oversized_and_non_pem_files_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("ca.pem");
        let found = problems(serde_json::json!({ "ca_file": missing }));
        assert_eq!(found.len(), 1, "{found:?}");
        assert!(
            found[0].starts_with(&format!(
                "chatwoot.tls.ca_file: cannot read {}: No such file",
                missing.display()
            )),
            "{found:?}"
        );
        let found = problems(serde_json::json!({ "ca_file": dir.path() }));
        assert!(
            found[0].starts_with("chatwoot.tls.ca_file: cannot read"),
            "{found:?}"
        );
        let large = dir.path().join("large.pem");
        std::fs::write(&large, vec![b'-'; MAX_TLS_FILE_BYTES as usize + 1]).unwrap();
        let found = problems(serde_json::json!({ "ca_file": large }));
        assert_eq!(
            found,
            [format!(
                "chatwoot.tls.ca_file: {} is larger than 1048576 bytes (MAX_TLS_FILE_BYTES); it \
                 is not a PEM certificate or key file",
                large.display()
            )]
        );
        let text = dir.path().join("notes.txt");
        std::fs::write(&text, "not a certificate\n").unwrap();
        let found = problems(serde_json::json!({ "ca_file": text }));
        assert_eq!(
            found,
            [format!(
                "chatwoot.tls.ca_file: {} holds no PEM certificate (-----BEGIN CERTIFICATE-----)",
                text.display()
            )]
        );
    }

    #[test]
    fn a_key_file_is_never_echoed() {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = (dir.path().join("client.pem"), dir.path().join("client.key"));
        std::fs::write(
            &cert,
            "-----BEGIN CERTIFICATE-----\nnot base64 at all!\n-----END CERTIFICATE-----\n",
        )
        .unwrap();
        std::fs::write(
            &key,
            "-----BEGIN PRIVATE KEY-----\nTUlJRXZRSUJBREFOQmdrcWhraUc5dzBC\n",
        )
        .unwrap();
        let found = problems(serde_json::json!({ "cert_file": cert, "key_file": key }));
        assert_eq!(
            found,
            [
                format!(
                    "chatwoot.tls.cert_file: {} is not PEM: a section's body is not base64",
                    cert.display()
                ),
                format!(
                    "chatwoot.tls.key_file: {} is not PEM: a section has no END line",
                    key.display()
                ),
            ]
        );
        std::fs::write(&key, "TUlJRXZRSUJBREFOQmdrcWhraUc5dzBC\n").unwrap();
        let found = problems(serde_json::json!({ "cert_file": cert, "key_file": key }));
        assert_eq!(
            found[1],
            format!(
                "chatwoot.tls.key_file: {} holds no PEM private key (PKCS#8, PKCS#1 or SEC1; an \
                 encrypted key is not supported)",
                key.display()
            )
        );
        assert!(
            !found.iter().any(|p| p.contains("TUlJ")),
            "key material in {found:?}"
        );
    }

    #[test]
    fn a_client_certificate_and_its_key_go_together() {
        let found = problems(serde_json::json!({ "cert_file": "client.pem" }));
        assert_eq!(
            found,
            ["chatwoot.tls.key_file: is needed with cert_file: the client certificate's key"]
        );
        let found = problems(serde_json::json!({ "key_file": "client.key" }));
        assert_eq!(
            found,
            ["chatwoot.tls.cert_file: is needed with key_file: the key's client certificate"]
        );
    }

    #[test]
    fn a_tls_error_is_found_inside_io_errors_and_explained() {
        let unknown = rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer);
        let wrapped = std::io::Error::new(std::io::ErrorKind::InvalidData, unknown);
        let explained = explain_failure(&wrapped, "chatwoot.tls").unwrap();
        assert_eq!(
            explained,
            "TLS error: the server's certificate is signed by a CA this bridge does not trust; \
             if it is a private CA, name it in chatwoot.tls.ca_file (invalid peer certificate: \
             UnknownIssuer)"
        );
        let plain = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "refused");
        assert_eq!(explain_failure(&plain, "chatwoot.tls"), None);
    }
}
