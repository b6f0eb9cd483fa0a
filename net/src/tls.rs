//! PEM files → rustls configurations, and the peer-name rule.
//!
//! Trust is narrow on purpose: the only root is the collaboration's CA (never the system's
//! store), and a certificate from that CA is not enough on its own — the peer must also be the
//! one expected (its certificate names it). Otherwise any station of a collaboration could
//! pose as its hub, or as another station.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::client::danger::HandshakeSignatureValid;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{ClientConfig, DigitallySignedStruct, DistinguishedName, RootCertStore, ServerConfig};

use crate::error::{Error, Result};

/// Where a party's TLS material lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// The collaboration's CA certificate (the only root trusted).
    pub ca: PathBuf,
    /// This party's certificate (PEM, leaf first).
    pub cert: PathBuf,
    /// This party's private key (PEM).
    pub key: PathBuf,
}

/// A party's loaded TLS identity and trust root.
#[derive(Debug)]
pub struct Tls {
    roots: Arc<RootCertStore>,
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
}

impl Clone for Tls {
    fn clone(&self) -> Self {
        Self {
            roots: Arc::clone(&self.roots),
            chain: self.chain.clone(),
            key: self.key.clone_key(),
        }
    }
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// gRPC runs over HTTP/2; clients such as grpc-go insist on negotiating it.
fn h2() -> Vec<Vec<u8>> {
    vec![b"h2".to_vec()]
}

/// The certificates of a PEM file.
pub fn read_certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>> {
    let bytes = std::fs::read(path).map_err(|source| Error::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let certs = CertificateDer::pem_slice_iter(&bytes)
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| Error::Pem {
            path: path.to_path_buf(),
            message: format!("not a PEM certificate file: {e}"),
        })?;
    if certs.is_empty() {
        return Err(Error::Pem {
            path: path.to_path_buf(),
            message: "holds no certificate".to_string(),
        });
    }
    Ok(certs)
}

fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>> {
    let bytes = std::fs::read(path).map_err(|source| Error::Read {
        path: path.to_path_buf(),
        source,
    })?;
    PrivateKeyDer::from_pem_slice(&bytes).map_err(|e| Error::Pem {
        path: path.to_path_buf(),
        message: format!("not a PEM private key: {e}"),
    })
}

/// A root store holding only the CA certificate(s) in `ca`.
pub fn read_roots(ca: &Path) -> Result<Arc<RootCertStore>> {
    let mut roots = RootCertStore::empty();
    for cert in read_certificates(ca)? {
        roots.add(cert).map_err(|e| Error::Pem {
            path: ca.to_path_buf(),
            message: format!("not a usable CA certificate: {e}"),
        })?;
    }
    Ok(Arc::new(roots))
}

/// A client configuration that trusts only `ca` and presents no certificate: how a
/// researcher's tools reach the hub.
pub fn trusting(ca: &Path) -> Result<Arc<ClientConfig>> {
    let mut config = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(read_roots(ca)?)
        .with_no_client_auth();
    config.alpn_protocols = h2();
    Ok(Arc::new(config))
}

/// Whether `cert` is the certificate of the Railyard party `name`: its subject's common
/// name is exactly `name` (`certs issue --name`), and its subject alternative names cover
/// `name` too. The common name is the identity because only `--name` sets it: a host name
/// given with `--host` (or a wildcard) can never make a station's certificate pass for the
/// hub's.
pub fn names(cert: &CertificateDer<'_>, name: &str) -> bool {
    let Ok(server_name) = ServerName::try_from(name) else {
        return false;
    };
    let alt_names = webpki::EndEntityCert::try_from(cert)
        .and_then(|ee| ee.verify_is_valid_for_subject_name(&server_name))
        .is_ok();
    alt_names && common_name(cert).is_some_and(|cn| cn == name)
}

/// The subject's common name of a certificate.
pub fn common_name(cert: &CertificateDer<'_>) -> Option<String> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref()).ok()?;
    let cn = parsed.subject().iter_common_name().next()?;
    cn.as_str().ok().map(str::to_string)
}

/// Whether `name` can name a Railyard party in a certificate: a DNS name of letters,
/// digits, `-` and `.`, with at least one letter (so it never reads as an IP address).
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 63
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.')
        && name.chars().any(|c| c.is_ascii_alphabetic())
        && !name.starts_with(['-', '.'])
        && !name.ends_with(['-', '.'])
        && matches!(ServerName::try_from(name), Ok(ServerName::DnsName(_)))
}

impl Tls {
    /// Loads the CA, this party's certificate chain and key; fails naming the file.
    pub fn load(files: &TlsFiles) -> Result<Self> {
        let tls = Self {
            roots: read_roots(&files.ca)?,
            chain: read_certificates(&files.cert)?,
            key: read_key(&files.key)?,
        };
        // Fail now, naming the files, rather than on the first handshake.
        tls.server_config().map_err(|e| {
            Error::Invalid(format!(
                "{} and {} do not form a usable identity: {e}",
                files.cert.display(),
                files.key.display()
            ))
        })?;
        webpki::EndEntityCert::try_from(&tls.chain[0])
            .map_err(|e| Error::Certificate(format!("{}: {e}", files.cert.display())))?;
        Ok(tls)
    }

    /// The client side of a hub–station link: presents this party's certificate, trusts only
    /// the CA, and (per connection) checks that the server's certificate names the peer it
    /// dialed.
    pub fn client_config(&self) -> Result<Arc<ClientConfig>> {
        let mut config = ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()?
            .with_root_certificates(Arc::clone(&self.roots))
            .with_client_auth_cert(self.chain.clone(), self.key.clone_key())?;
        config.alpn_protocols = h2();
        Ok(Arc::new(config))
    }

    /// A server that requires a client certificate from the CA naming one of `peers`.
    pub fn mutual_server_config(&self, peers: Vec<String>) -> Result<Arc<ServerConfig>> {
        let inner =
            WebPkiClientVerifier::builder_with_provider(Arc::clone(&self.roots), provider())
                .build()
                .map_err(|e| Error::Invalid(format!("client verifier: {e}")))?;
        let verifier = Arc::new(NamedClients { inner, peers });
        let mut config = ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()?
            .with_client_cert_verifier(verifier)
            .with_single_cert(self.chain.clone(), self.key.clone_key())?;
        config.alpn_protocols = h2();
        Ok(Arc::new(config))
    }

    /// A server that presents this party's certificate and asks for none (researchers
    /// authenticate with tokens).
    pub fn server_config(&self) -> Result<Arc<ServerConfig>> {
        let mut config = ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_single_cert(self.chain.clone(), self.key.clone_key())?;
        config.alpn_protocols = h2();
        Ok(Arc::new(config))
    }

    /// [`Self::server_config`] for HTTP/1.1 (web pages: the hub's console, a station's
    /// audit page), which browsers reach with this party's certificate.
    pub fn https_server_config(&self) -> Result<Arc<ServerConfig>> {
        let mut config = ServerConfig::clone(&*self.server_config()?);
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Arc::new(config))
    }
}

/// The CA's verdict, plus: the certificate must name one of the expected peers.
#[derive(Debug)]
struct NamedClients {
    inner: Arc<dyn ClientCertVerifier>,
    peers: Vec<String>,
}

impl ClientCertVerifier for NamedClients {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> std::result::Result<ClientCertVerified, rustls::Error> {
        let verified = self
            .inner
            .verify_client_cert(end_entity, intermediates, now)?;
        if self.peers.iter().any(|p| names(end_entity, p)) {
            Ok(verified)
        } else {
            Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::NotValidForName,
            ))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}
