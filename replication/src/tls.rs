//! TLS for both connection kinds, with libpq's `sslmode` semantics.
//!
//! | sslmode       | encrypted | chain verified          | host name checked |
//! |---------------|-----------|-------------------------|-------------------|
//! | disable       | no        | -                       | -                 |
//! | allow, prefer | if offered| only with `sslrootcert` | no                |
//! | require       | yes       | only with `sslrootcert` | no                |
//! | verify-ca     | yes       | yes                     | no                |
//! | verify-full   | yes       | yes                     | yes               |
//!
//! Root certificates come from `sslrootcert` (a PEM file, or `system` for
//! the operating system's store) or, as in libpq, `~/.postgresql/root.crt`.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::WebPkiSupportedAlgorithms;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, ServerConfig,
    SignatureScheme,
};

use crate::conninfo::{ConnInfo, SslMode};

/// Why TLS could not be set up for a connection string.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// The root certificate file could not be read or holds no certificate.
    #[error(
        "cannot read root certificates from {path}: {reason} (set sslrootcert to a PEM file with the CA that signed the server's certificate)"
    )]
    RootCert {
        /// The file that was read.
        path: String,
        /// What went wrong.
        reason: String,
    },
    /// verify-ca or verify-full without any root certificate to verify with.
    #[error(
        "sslmode={mode} needs root certificates: set sslrootcert=/path/to/ca.pem (or sslrootcert=system), or put the CA in ~/.postgresql/root.crt"
    )]
    NoRootCert {
        /// The SSL mode asking for verification.
        mode: &'static str,
    },
    /// A server's certificate or key file could not be used.
    #[error("cannot use {path}: {reason}")]
    ServerFile {
        /// The file that was read.
        path: String,
        /// What went wrong.
        reason: String,
    },
    /// rustls refused the configuration.
    #[error("TLS setup failed: {0}")]
    Rustls(#[from] rustls::Error),
}

/// The rustls configuration for a connection, or `None` when the
/// connection is never encrypted (sslmode=disable, unix sockets).
pub fn client_config(info: &ConnInfo) -> Result<Option<Arc<ClientConfig>>, TlsError> {
    let mode = info.sslmode();
    if mode == SslMode::Disable {
        return Ok(None);
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let roots = load_roots(info.sslrootcert(), mode)?;
    let verifier: Arc<dyn ServerCertVerifier> = match (mode, roots) {
        (SslMode::VerifyFull, Some(roots)) => {
            WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider.clone())
                .build()
                .map_err(|e| TlsError::Rustls(rustls::Error::General(e.to_string())))?
        }
        (_, Some(roots)) => Arc::new(ChainOnly {
            inner: WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider.clone())
                .build()
                .map_err(|e| TlsError::Rustls(rustls::Error::General(e.to_string())))?,
        }),
        (SslMode::VerifyCa, None) => return Err(TlsError::NoRootCert { mode: "verify-ca" }),
        (SslMode::VerifyFull, None) => {
            return Err(TlsError::NoRootCert {
                mode: "verify-full",
            });
        }
        (_, None) => Arc::new(EncryptOnly {
            algorithms: provider.signature_verification_algorithms,
            pinned: None,
        }),
    };
    let config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    Ok(Some(Arc::new(config)))
}

/// A TLS server (the admin console): its rustls configuration, and the
/// certificate it presents, for clients that pin it.
#[derive(Debug, Clone)]
pub struct ServerIdentity {
    /// For the acceptor.
    pub config: Arc<ServerConfig>,
    /// The certificate presented (the first of the chain).
    pub certificate: CertificateDer<'static>,
}

/// Loads a server's certificate chain and private key (PEM files) and
/// checks that they belong together.
pub fn server_identity(cert: &Path, key: &Path) -> Result<ServerIdentity, TlsError> {
    let unreadable = |path: &Path, reason: String| TlsError::ServerFile {
        path: path.display().to_string(),
        reason,
    };
    // Read with a bound: a device or a huge file named by mistake fails
    // instead of hanging the start.
    let read = |path: &Path| -> Result<Vec<u8>, TlsError> {
        use std::io::Read;
        const MAX_PEM_FILE: u64 = 1024 * 1024;
        let mut bytes = Vec::new();
        std::fs::File::open(path)
            .and_then(|file| file.take(MAX_PEM_FILE + 1).read_to_end(&mut bytes))
            .map_err(|e| unreadable(path, e.to_string()))?;
        if bytes.len() as u64 > MAX_PEM_FILE {
            return Err(unreadable(path, "larger than 1 MiB: not a PEM file".into()));
        }
        Ok(bytes)
    };
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&read(cert)?)
        .collect::<Result<_, _>>()
        .map_err(|e| unreadable(cert, e.to_string()))?;
    let Some(certificate) = chain.first().cloned() else {
        return Err(unreadable(cert, "no certificate in the file".into()));
    };
    let private =
        PrivateKeyDer::from_pem_slice(&read(key)?).map_err(|e| unreadable(key, e.to_string()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(chain, private)
        .map_err(|e| {
            unreadable(
                key,
                format!("{e} (the key must be the private key of the certificate's first entry)"),
            )
        })?;
    // What PostgreSQL 17's clients ask for with sslnegotiation=direct.
    config.alpn_protocols = vec![b"postgresql".to_vec()];
    Ok(ServerIdentity {
        config: Arc::new(config),
        certificate,
    })
}

/// A client configuration that trusts exactly `certificate`, whatever
/// name it carries.
pub fn pinned_client_config(
    certificate: CertificateDer<'static>,
) -> Result<Arc<ClientConfig>, TlsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier = Arc::new(EncryptOnly {
        algorithms: provider.signature_verification_algorithms,
        pinned: Some(certificate),
    });
    Ok(Arc::new(
        ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_no_client_auth(),
    ))
}

/// The name to verify the certificate against and to send as SNI.
pub fn server_name(host: &str) -> Result<ServerName<'static>, TlsError> {
    ServerName::try_from(host.to_owned()).map_err(|e| {
        TlsError::Rustls(rustls::Error::General(format!(
            "invalid server name {host:?}: {e}"
        )))
    })
}

fn load_roots(sslrootcert: Option<&str>, mode: SslMode) -> Result<Option<RootCertStore>, TlsError> {
    let path = match sslrootcert {
        Some("system") => {
            let mut store = RootCertStore::empty();
            let found = rustls_native_certs::load_native_certs();
            let (added, _) = store.add_parsable_certificates(found.certs);
            if added == 0 {
                return Err(TlsError::RootCert {
                    path: "the system certificate store".into(),
                    reason: "no certificate found".into(),
                });
            }
            return Ok(Some(store));
        }
        Some(path) => PathBuf::from(path),
        None => {
            // libpq's default: ~/.postgresql/root.crt, used when it exists.
            let Some(home) = std::env::var_os("HOME") else {
                return Ok(None);
            };
            let default = PathBuf::from(home).join(".postgresql/root.crt");
            if !default.exists() || matches!(mode, SslMode::Allow | SslMode::Prefer) {
                return Ok(None);
            }
            default
        }
    };
    let shown = path.display().to_string();
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&path)
        .and_then(|iter| iter.collect::<Result<_, _>>())
        .map_err(|e| TlsError::RootCert {
            path: shown.clone(),
            reason: e.to_string(),
        })?;
    let mut store = RootCertStore::empty();
    let (added, _) = store.add_parsable_certificates(certs);
    if added == 0 {
        return Err(TlsError::RootCert {
            path: shown,
            reason: "no usable certificate in the file".into(),
        });
    }
    Ok(Some(store))
}

/// `verify-ca` (and `require` with a root certificate): the chain must lead
/// to a trusted root, the host name may differ.
#[derive(Debug)]
struct ChainOnly {
    inner: Arc<WebPkiServerVerifier>,
}

impl ServerCertVerifier for ChainOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self.inner.verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        ) {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// `prefer`/`require` without root certificates: encrypted, not
/// authenticated, exactly as libpq behaves. The handshake signatures are
/// still checked so the session key belongs to the certificate presented.
///
/// With `pinned`, the certificate presented must be that one: cutover's
/// own commands reaching the daemon's console trust exactly the
/// certificate the config gives it (often self-signed, which the web PKI
/// checks refuse as an end entity).
#[derive(Debug)]
struct EncryptOnly {
    algorithms: WebPkiSupportedAlgorithms,
    pinned: Option<CertificateDer<'static>>,
}

impl ServerCertVerifier for EncryptOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match &self.pinned {
            Some(pinned) if pinned.as_ref() != end_entity.as_ref() => Err(
                rustls::Error::InvalidCertificate(CertificateError::ApplicationVerificationFailure),
            ),
            _ => Ok(ServerCertVerified::assertion()),
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}
