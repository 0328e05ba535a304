//! A throwaway PKI for tests (rcgen): one CA, server and client certificates signed by
//! it, written as PEM files, plus rustls configs built from them.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    SanType,
};
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::rustls::server::WebPkiClientVerifier;
use tokio_rustls::rustls::{self, ClientConfig, RootCertStore, ServerConfig};

/// PEM files of one certificate and its key.
#[derive(Clone, Debug)]
pub struct CertFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

pub struct Pki {
    pub dir: PathBuf,
    pub ca: PathBuf,
    issuer: Issuer<'static, KeyPair>,
}

pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

impl Pki {
    /// A CA named `name`, its certificate written to `dir/<name>-ca.crt`.
    pub fn new(dir: &Path, name: &str) -> Pki {
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("ca params");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(DnType::CommonName, format!("{name} test CA"));
        let key = KeyPair::generate().expect("ca key");
        let cert = params.self_signed(&key).expect("ca cert");
        let ca = dir.join(format!("{name}-ca.crt"));
        std::fs::write(&ca, cert.pem()).expect("write ca");
        Pki {
            dir: dir.to_path_buf(),
            ca,
            issuer: Issuer::new(params, key),
        }
    }

    /// A server certificate for `localhost`, `127.0.0.1` and any extra DNS names.
    pub fn server(&self, file_stem: &str, extra_names: &[&str]) -> CertFiles {
        self.host(
            file_stem,
            extra_names,
            &[ExtendedKeyUsagePurpose::ServerAuth],
        )
    }

    /// A certificate for both ends of a connection (Raft peers): server and client
    /// auth, for `localhost` and `127.0.0.1`.
    pub fn peer(&self, file_stem: &str) -> CertFiles {
        self.host(
            file_stem,
            &[],
            &[
                ExtendedKeyUsagePurpose::ServerAuth,
                ExtendedKeyUsagePurpose::ClientAuth,
            ],
        )
    }

    fn host(
        &self,
        file_stem: &str,
        extra_names: &[&str],
        usages: &[ExtendedKeyUsagePurpose],
    ) -> CertFiles {
        let mut names = vec!["localhost".to_string()];
        names.extend(extra_names.iter().map(|n| n.to_string()));
        let mut params = CertificateParams::new(names).expect("host params");
        params
            .subject_alt_names
            .push(SanType::IpAddress([127, 0, 0, 1].into()));
        params
            .distinguished_name
            .push(DnType::CommonName, file_stem);
        params.extended_key_usages = usages.to_vec();
        self.issue(file_stem, params)
    }

    /// A client certificate whose subject CN is `common_name`.
    pub fn client(&self, common_name: &str) -> CertFiles {
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("client params");
        params
            .distinguished_name
            .push(DnType::CommonName, common_name);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        self.issue(common_name, params)
    }

    fn issue(&self, stem: &str, params: CertificateParams) -> CertFiles {
        let key = KeyPair::generate().expect("key");
        let cert = params.signed_by(&key, &self.issuer).expect("sign");
        let files = CertFiles {
            cert: self.dir.join(format!("{stem}.crt")),
            key: self.dir.join(format!("{stem}.key")),
        };
        std::fs::write(&files.cert, cert.pem()).expect("write cert");
        std::fs::write(&files.key, key.serialize_pem()).expect("write key");
        files
    }

    pub fn roots(&self) -> RootCertStore {
        let mut roots = RootCertStore::empty();
        for cert in certs(&self.ca) {
            roots.add(cert).expect("add ca");
        }
        roots
    }

    /// A server config; with `require_client_cert`, clients must present a cert from this CA.
    pub fn server_config(
        &self,
        files: &CertFiles,
        require_client_cert: bool,
        alpn: &[&[u8]],
    ) -> Arc<ServerConfig> {
        let builder = ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .expect("versions");
        let builder = if require_client_cert {
            let verifier =
                WebPkiClientVerifier::builder_with_provider(Arc::new(self.roots()), provider())
                    .build()
                    .expect("verifier");
            builder.with_client_cert_verifier(verifier)
        } else {
            builder.with_no_client_auth()
        };
        let mut config = builder
            .with_single_cert(certs(&files.cert), key(&files.key))
            .expect("server cert");
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        Arc::new(config)
    }

    /// A client config trusting this CA, with an optional client certificate.
    pub fn client_config(&self, client: Option<&CertFiles>, alpn: &[&[u8]]) -> Arc<ClientConfig> {
        let builder = ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_root_certificates(self.roots());
        let mut config = match client {
            Some(c) => builder
                .with_client_auth_cert(certs(&c.cert), key(&c.key))
                .expect("client cert"),
            None => builder.with_no_client_auth(),
        };
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        Arc::new(config)
    }
}

pub fn certs(path: &Path) -> Vec<CertificateDer<'static>> {
    CertificateDer::pem_file_iter(path)
        .expect("read certs")
        .collect::<Result<Vec<_>, _>>()
        .expect("parse certs")
}

pub fn key(path: &Path) -> PrivateKeyDer<'static> {
    PrivateKeyDer::from_pem_file(path).expect("read key")
}
