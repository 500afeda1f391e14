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

use std::path::PathBuf;
use std::sync::Arc;

use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::WebPkiSupportedAlgorithms;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme,
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
        }),
    };
    let config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    Ok(Some(Arc::new(config)))
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
#[derive(Debug)]
struct EncryptOnly {
    algorithms: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for EncryptOnly {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
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
