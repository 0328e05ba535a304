//! TLS configs (rustls with aws-lc-rs) built from PEM files, and reloaded when the
//! files change on disk, so a renewed certificate needs no restart.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use tokio_rustls::rustls::client::danger::{
    HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier,
};
use tokio_rustls::rustls::crypto::{CryptoProvider, aws_lc_rs};
use tokio_rustls::rustls::server::WebPkiClientVerifier;
use tokio_rustls::rustls::{
    self, ClientConfig, DigitallySignedStruct, RootCertStore, ServerConfig, SignatureScheme,
};
use tokio_util::sync::CancellationToken;

use crate::config::schema::{BackendTls, Terminate};

/// Debian's bundle of public CAs, used when a `backend_tls` names no `ca`.
const SYSTEM_ROOTS: &str = "/etc/ssl/certs/ca-certificates.crt";

/// How often certificate files are checked for changes.
const RELOAD_EVERY: Duration = Duration::from_secs(2);

fn provider() -> Arc<CryptoProvider> {
    Arc::new(aws_lc_rs::default_provider())
}

pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs: Vec<_> = CertificateDer::pem_file_iter(path)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| format!("{}: cannot read certificates: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!(
            "{}: no PEM certificate in the file",
            path.display()
        ));
    }
    Ok(certs)
}

pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, String> {
    PrivateKeyDer::from_pem_file(path)
        .map_err(|e| format!("{}: cannot read the private key: {e}", path.display()))
}

fn roots(path: &Path) -> Result<RootCertStore, String> {
    let mut store = RootCertStore::empty();
    for cert in load_certs(path)? {
        store
            .add(cert)
            .map_err(|e| format!("{}: not a usable CA certificate: {e}", path.display()))?;
    }
    Ok(store)
}

/// The server side of `tls: terminate`; `alpn` is what the listener offers clients.
pub fn server_config(t: &Terminate, alpn: &[Vec<u8>]) -> Result<ServerConfig, String> {
    let builder = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?;
    let builder = match &t.client_ca {
        Some(ca) => {
            let verifier =
                WebPkiClientVerifier::builder_with_provider(Arc::new(roots(ca)?), provider())
                    .build()
                    .map_err(|e| format!("{}: {e}", ca.display()))?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let mut config = builder
        .with_single_cert(load_certs(&t.cert)?, load_key(&t.key)?)
        .map_err(|e| {
            format!(
                "{} / {}: certificate and key do not go together: {e}",
                t.cert.display(),
                t.key.display()
            )
        })?;
    config.alpn_protocols = alpn.to_vec();
    Ok(config)
}

/// The client side towards backends (re-encryption) or for health probes. Without a
/// CA, `verify` decides: re-encryption checks against the system roots, probes only
/// want a status code and skip verification (HAProxy's `check-ssl verify none`).
pub fn client_config(
    t: Option<&BackendTls>,
    verify_without_ca: bool,
) -> Result<ClientConfig, String> {
    let builder = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?;
    let ca = t.and_then(|t| t.ca.as_deref());
    let builder = match ca {
        Some(ca) => builder.with_root_certificates(roots(ca)?),
        None if verify_without_ca => {
            builder.with_root_certificates(roots(Path::new(SYSTEM_ROOTS))?)
        }
        None => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(NoVerify(provider()))),
    };
    match t.and_then(|t| t.cert.as_deref().zip(t.key.as_deref())) {
        Some((cert, key)) => builder
            .with_client_auth_cert(load_certs(cert)?, load_key(key)?)
            .map_err(|e| {
                format!(
                    "{} / {}: certificate and key do not go together: {e}",
                    cert.display(),
                    key.display()
                )
            }),
        None => Ok(builder.with_no_client_auth()),
    }
}

/// The name to send in SNI and to verify: `server_name`, else the backend's host.
pub fn server_name(t: Option<&BackendTls>, host: &str) -> Result<ServerName<'static>, String> {
    let name = t
        .and_then(|t| t.server_name.clone())
        .unwrap_or_else(|| host.to_string());
    ServerName::try_from(name.clone())
        .map_err(|e| format!("{name:?} is not a valid TLS server name: {e}"))
}

/// Every file a TLS setting reads, for change detection.
pub fn files_of_backend(t: &BackendTls) -> Vec<PathBuf> {
    [&t.ca, &t.cert, &t.key]
        .into_iter()
        .flatten()
        .cloned()
        .collect()
}

pub fn files_of_terminate(t: &Terminate) -> Vec<PathBuf> {
    [Some(&t.cert), Some(&t.key), t.client_ca.as_ref()]
        .into_iter()
        .flatten()
        .cloned()
        .collect()
}

/// A TLS config rebuilt from its files when they change; the old one stays in use
/// when the new files do not load (logged).
pub struct Reloading<T> {
    current: Arc<ArcSwap<T>>,
    stop: CancellationToken,
}

impl<T: Send + Sync + 'static> Reloading<T> {
    pub fn new(
        what: String,
        files: Vec<PathBuf>,
        build: impl Fn() -> Result<T, String> + Send + 'static,
    ) -> Result<Self, String> {
        let current = Arc::new(ArcSwap::from_pointee(build()?));
        let stop = CancellationToken::new();
        let (swap, token) = (current.clone(), stop.clone());
        tokio::spawn(async move {
            let mut seen = mtimes(&files);
            loop {
                tokio::select! {
                    () = token.cancelled() => return,
                    () = tokio::time::sleep(RELOAD_EVERY) => {}
                }
                let now = mtimes(&files);
                if now == seen {
                    continue;
                }
                seen = now;
                match build() {
                    Ok(config) => {
                        swap.store(Arc::new(config));
                        tracing::info!(%what, "certificate files changed: TLS config reloaded");
                    }
                    Err(e) => {
                        tracing::error!(%what, error = %e, "certificate files changed but do not load; keeping the previous ones")
                    }
                }
            }
        });
        Ok(Reloading { current, stop })
    }

    pub fn get(&self) -> Arc<T> {
        self.current.load_full()
    }
}

impl<T> Drop for Reloading<T> {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

fn mtimes(files: &[PathBuf]) -> Vec<Option<SystemTime>> {
    files
        .iter()
        .map(|f| std::fs::metadata(f).and_then(|m| m.modified()).ok())
        .collect()
}

/// Accepts any server certificate (signatures are still checked): probes only.
#[derive(Debug)]
struct NoVerify(Arc<CryptoProvider>);

impl ServerCertVerifier for NoVerify {
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
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}
