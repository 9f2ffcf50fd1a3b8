//! A private PKI made by the test itself (rcgen): a CA, a server certificate for 127.0.0.1 and
//! localhost, and a client certificate, as PEM files in a temporary folder, and the TLS server
//! configs of test servers that use them.

use std::path::PathBuf;
use std::sync::Arc;

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};

/// A CA and the certificates it signed, as PEM files.
pub(crate) struct Pki {
    /// Holds the files; removed on drop.
    pub dir: tempfile::TempDir,
    /// The CA's certificate: what a client names in `ca_file`.
    pub ca: PathBuf,
    /// The server's certificate (127.0.0.1 and localhost), signed by the CA.
    pub server_cert: PathBuf,
    /// The server certificate's private key.
    pub server_key: PathBuf,
    /// A client certificate signed by the CA, for mutual TLS.
    pub client_cert: PathBuf,
    /// The client certificate's private key.
    pub client_key: PathBuf,
}

impl Pki {
    /// Makes the CA, the server and the client certificate in a new temporary folder.
    pub(crate) fn make() -> Pki {
        let dir = tempfile::tempdir().unwrap();
        let write = |name: &str, pem: String| {
            let path = dir.path().join(name);
            std::fs::write(&path, pem).unwrap();
            path
        };
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "chatwoot-bridge test CA");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let ca_key = KeyPair::generate().unwrap();
        let ca = write("ca.pem", ca_params.self_signed(&ca_key).unwrap().pem());
        let issuer = Issuer::new(ca_params, ca_key);
        let leaf = |names: Vec<String>, usage: ExtendedKeyUsagePurpose| {
            let mut params = CertificateParams::new(names).unwrap();
            params.extended_key_usages = vec![usage];
            let key = KeyPair::generate().unwrap();
            let cert = params.signed_by(&key, &issuer).unwrap();
            (cert.pem(), key.serialize_pem())
        };
        let (server_cert, server_key) = leaf(
            vec!["127.0.0.1".into(), "localhost".into()],
            ExtendedKeyUsagePurpose::ServerAuth,
        );
        let (client_cert, client_key) = leaf(
            vec!["bridge.test".into()],
            ExtendedKeyUsagePurpose::ClientAuth,
        );
        Pki {
            ca,
            server_cert: write("server.pem", server_cert),
            server_key: write("server.key", server_key),
            client_cert: write("client.pem", client_cert),
            client_key: write("client.key", client_key),
            dir,
        }
    }

    /// A TLS server showing the server certificate; with `demand_client_certificate`, it also demands a client
    /// certificate signed by the CA.
    pub(crate) fn server_config(&self, demand_client_certificate: bool) -> Arc<ServerConfig> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .unwrap();
        let builder = if demand_client_certificate {
            let mut roots = RootCertStore::empty();
            roots
                .add(CertificateDer::from_pem_file(&self.ca).unwrap())
                .unwrap();
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .unwrap();
            builder.with_client_cert_verifier(verifier)
        } else {
            builder.with_no_client_auth()
        };
        let chain = vec![CertificateDer::from_pem_file(&self.server_cert).unwrap()];
        let key = PrivateKeyDer::from_pem_file(&self.server_key).unwrap();
        Arc::new(builder.with_single_cert(chain, key).unwrap())
    }
}
