//! Mutual TLS between the CLI and a cluster node's vroomd over TCP: the TLS
//! directory both ends read and the client's side. Every party holds a
//! certificate signed by the cluster's CA (kept in etcd, made by `vroom
//! cluster init`, see `vroom_cluster::tls`): a node gets one when it joins,
//! a workstation from `vroom cluster credentials`. A TLS directory holds
//! `ca.pem`, `cert.pem` and `key.pem`. vroomd's side (the server config) is
//! the `vroom` binary's (`serve::tls`).

use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::{ClientConfig, RootCertStore, ServerConfig};

/// The TCP port a cluster node serves its API on, with mutual TLS.
pub const API_PORT: u16 = 7948;
pub const CA_FILE: &str = "ca.pem";
pub const CERT_FILE: &str = "cert.pem";
pub const KEY_FILE: &str = "key.pem";

/// ring: it builds with the C compiler every machine here has (aws-lc,
/// rustls's default, is a long C build). rustls deprecates it only for its
/// lack of post-quantum key exchange.
#[allow(deprecated)]
pub fn crypto_provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The certificates in the PEM file at `path` (at least one).
pub fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs: Vec<_> = CertificateDer::pem_file_iter(path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?
        .collect::<Result<_, _>>()
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!("{} holds no certificate", path.display()));
    }
    Ok(certs)
}

/// The private key in the PEM file at `path`.
pub fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, String> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| format!("cannot read {}: {e}", path.display()))
}

/// The cluster's CA of the TLS directory `dir`, as the only trusted root.
pub fn read_roots(dir: &Path) -> Result<RootCertStore, String> {
    let mut roots = RootCertStore::empty();
    for cert in read_certs(&dir.join(CA_FILE))? {
        roots
            .add(cert)
            .map_err(|e| format!("the cluster CA in {}: {e}", dir.display()))?;
    }
    Ok(roots)
}

/// The CLI's side: trusts only the cluster's CA and shows its own certificate.
pub fn client_config(dir: &Path) -> Result<Arc<ClientConfig>, String> {
    client_config_with(dir, crypto_provider(), rustls::DEFAULT_VERSIONS).map(Arc::new)
}

/// A client's side with `provider`'s ciphers and these protocol `versions`:
/// trusts only the cluster's CA and shows the certificate of `dir`.
pub fn client_config_with(
    dir: &Path,
    provider: Arc<rustls::crypto::CryptoProvider>,
    versions: &[&'static rustls::SupportedProtocolVersion],
) -> Result<ClientConfig, String> {
    ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(versions)
        .map_err(|e| e.to_string())?
        .with_root_certificates(read_roots(dir)?)
        .with_client_auth_cert(
            read_certs(&dir.join(CERT_FILE))?,
            read_key(&dir.join(KEY_FILE))?,
        )
        .map_err(|e| format!("the certificate in {}: {e}", dir.display()))
}

/// A node's side (its API, its replicas' streams): serves the certificate
/// of `dir` and requires of every caller a client certificate signed by
/// the cluster's CA.
pub fn server_config(dir: &Path) -> Result<ServerConfig, String> {
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(read_roots(dir)?),
        crypto_provider(),
    )
    .build()
    .map_err(|e| e.to_string())?;
    ServerConfig::builder_with_provider(crypto_provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_client_cert_verifier(verifier)
        .with_single_cert(
            read_certs(&dir.join(CERT_FILE))?,
            read_key(&dir.join(KEY_FILE))?,
        )
        .map_err(|e| format!("the certificate in {}: {e}", dir.display()))
}

/// The subject's common name of a certificate the cluster's CA issued (a
/// node's or a workstation's name), to say who made a request. The CA puts
/// the name in the subject's CN; the subject follows the issuer in the
/// certificate, so the name is the string after the last CN attribute type
/// (OID 2.5.4.3). No X.509 parser is pulled in for this one field: the
/// certificate was already verified against the CA by the TLS handshake.
pub fn common_name(cert: &CertificateDer<'_>) -> Option<String> {
    const CN_OID: [u8; 5] = [0x06, 0x03, 0x55, 0x04, 0x03];
    let der = cert.as_ref();
    let at = der.windows(CN_OID.len()).rposition(|w| w == CN_OID)? + CN_OID.len();
    // A UTF8String, PrintableString or IA5String with a short length.
    let (&tag, rest) = der.get(at..)?.split_first()?;
    let (&len, rest) = rest.split_first()?;
    if !matches!(tag, 0x0c | 0x13 | 0x16) || len >= 0x80 {
        return None;
    }
    let name = std::str::from_utf8(rest.get(..usize::from(len))?).ok()?;
    Some(name.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_common_name_is_the_subjects_not_the_issuers() {
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut ca = rcgen::CertificateParams::new(vec![]).unwrap();
        ca.distinguished_name
            .push(rcgen::DnType::CommonName, "vroom cluster CA");
        ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca = ca.self_signed(&ca_key).unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let mut node = rcgen::CertificateParams::new(vec!["10.0.0.2".into()]).unwrap();
        node.distinguished_name
            .push(rcgen::DnType::CommonName, "n2");
        let node = node.signed_by(&key, &ca, &ca_key).unwrap();
        assert_eq!(common_name(node.der()).as_deref(), Some("n2"));
        assert_eq!(common_name(ca.der()).as_deref(), Some("vroom cluster CA"));
        assert_eq!(common_name(&CertificateDer::from(vec![1, 2, 3])), None);
    }
}
