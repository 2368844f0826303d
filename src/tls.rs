//! TLS: the rustls server configuration, and development certificates.
//!
//! This module owns reading PEM files into a `rustls::ServerConfig` and
//! making a throw-away CA plus server certificate for development and tests.
//! It must not touch sockets: the gateway layers TLS over TCP itself.
//! The certificate lives in a [`CertStore`], which `SIGHUP` reloads without
//! touching established connections.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use rustls::crypto::CryptoProvider;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// Why TLS could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read certificate chain {path}")]
    ReadCert {
        path: PathBuf,
        #[source]
        source: rustls::pki_types::pem::Error,
    },
    #[error("cannot read private key {path}")]
    ReadKey {
        path: PathBuf,
        #[source]
        source: rustls::pki_types::pem::Error,
    },
    #[error("certificate file {path} holds no certificate")]
    NoCertificate { path: PathBuf },
    #[error("certificate and key do not form a valid server configuration")]
    Config(#[source] rustls::Error),
    #[error("cannot generate a development certificate")]
    Generate(#[source] rcgen::Error),
    #[error("cannot write {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// The server's certificate and key, swappable while connections live.
///
/// Every TLS handshake asks the resolver for the current pair; a reload
/// swaps it, so new handshakes use the new one while established sessions
/// keep their negotiated keys and are never dropped. The lock is held only
/// to clone or replace an `Arc`, never across I/O.
#[derive(Debug)]
pub struct CertStore {
    cert: PathBuf,
    key: PathBuf,
    current: RwLock<Arc<CertifiedKey>>,
}

impl CertStore {
    /// Loads `cert` and `key` (PEM) and checks that they match.
    pub fn load(cert: &Path, key: &Path) -> Result<Arc<CertStore>, TlsError> {
        let current = RwLock::new(load_pair(cert, key)?);
        Ok(Arc::new(CertStore {
            cert: cert.to_owned(),
            key: key.to_owned(),
            current,
        }))
    }

    /// Re-reads the files. On error the previous pair stays in force.
    pub fn reload(&self) -> Result<(), TlsError> {
        let fresh = load_pair(&self.cert, &self.key)?;
        match self.current.write() {
            Ok(mut guard) => *guard = fresh,
            // A poisoned lock still holds a valid pair: replace it anyway.
            Err(poisoned) => *poisoned.into_inner() = fresh,
        }
        Ok(())
    }

    fn get(&self) -> Arc<CertifiedKey> {
        match self.current.read() {
            Ok(guard) => guard.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }
}

impl ResolvesServerCert for CertStore {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.get())
    }
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn load_pair(cert: &Path, key: &Path) -> Result<Arc<CertifiedKey>, TlsError> {
    let chain = CertificateDer::pem_file_iter(cert)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|source| TlsError::ReadCert {
            path: cert.to_owned(),
            source,
        })?;
    if chain.is_empty() {
        return Err(TlsError::NoCertificate {
            path: cert.to_owned(),
        });
    }
    let key = PrivateKeyDer::from_pem_file(key).map_err(|source| TlsError::ReadKey {
        path: key.to_owned(),
        source,
    })?;
    let pair = CertifiedKey::from_der(chain, key, &provider()).map_err(TlsError::Config)?;
    Ok(Arc::new(pair))
}

/// Builds the server configuration: TLS 1.2 and 1.3, rustls defaults, no
/// client certificates, HTTP/1.1 only (the WebSocket upgrade), and the
/// certificate from `certs`, which may be reloaded.
pub fn server_config(certs: Arc<CertStore>) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let mut config = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(TlsError::Config)?
        .with_no_client_auth()
        .with_cert_resolver(certs);
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// A development CA and a server certificate it signed, as PEM text.
pub struct DevCerts {
    pub ca_pem: String,
    pub cert_pem: String,
    pub key_pem: String,
}

/// Makes a CA and an ECDSA P-256 server certificate for `localhost`,
/// `127.0.0.1` and `::1`.
pub fn generate_dev_certs() -> Result<DevCerts, TlsError> {
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose,
    };
    let ca_key = KeyPair::generate().map_err(TlsError::Generate)?;
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).map_err(TlsError::Generate)?;
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "Switchboard development CA");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca_cert = ca_params.self_signed(&ca_key).map_err(TlsError::Generate)?;
    let issuer = Issuer::new(ca_params, ca_key);

    let key = KeyPair::generate().map_err(TlsError::Generate)?;
    let mut params = CertificateParams::new(vec![
        "localhost".to_owned(),
        "127.0.0.1".to_owned(),
        "::1".to_owned(),
    ])
    .map_err(TlsError::Generate)?;
    params
        .distinguished_name
        .push(DnType::CommonName, "switchboard dev server");
    let cert = params
        .signed_by(&key, &issuer)
        .map_err(TlsError::Generate)?;
    Ok(DevCerts {
        ca_pem: ca_cert.pem(),
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    })
}

/// Writes development certificates next to `cert` when neither `cert` nor
/// `key` exists: the CA goes to `ca.pem` in the same directory, so clients
/// can trust it. Returns whether it generated anything.
pub fn ensure_dev_certs(cert: &Path, key: &Path) -> Result<bool, TlsError> {
    if cert.exists() || key.exists() {
        return Ok(false);
    }
    let certs = generate_dev_certs()?;
    let dir = cert.parent().unwrap_or(Path::new("."));
    let write = |path: &Path, text: &str| {
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(|source| TlsError::Write {
                path: parent.to_owned(),
                source,
            })?;
        }
        std::fs::write(path, text).map_err(|source| TlsError::Write {
            path: path.to_owned(),
            source,
        })
    };
    write(&dir.join("ca.pem"), &certs.ca_pem)?;
    write(cert, &certs.cert_pem)?;
    write(key, &certs.key_pem)?;
    Ok(true)
}
