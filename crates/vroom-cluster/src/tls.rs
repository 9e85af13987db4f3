//! The cluster's certificate authority, kept in etcd at `/vroom/ca` (made
//! by `vroom cluster init`, or by the first node of a cluster from before
//! it), and the certificates it issues: one per node when it joins (its
//! API's server certificate, and a client certificate for the CLI on that
//! host), and one per `vroom cluster credentials`. Whoever can read etcd
//! can issue certificates: etcd is the cluster's root of trust.
//!
//! The same node certificates secure a replicated volume's stream between
//! the primary's relay and the replica's node ([`replication_client`],
//! [`replication_server`], [`record_keys`]): TLS 1.3 with
//! ChaCha20-Poly1305 only, because the primary hands the established
//! connection's keys to its relay process, whose record layer
//! ([`vroom_volume::relay::sealed`]) then never needs a key update.

use std::path::Path;
use std::sync::Arc;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};
use serde::{Deserialize, Serialize};
use vroom_client::tls::{CA_FILE, CERT_FILE, KEY_FILE};
use vroom_volume::relay::sealed::{DirectionKeys, RecordKeys, CHACHA20_POLY1305};

use crate::store::etcd::Etcd;
use crate::store::{json, Compare, Op, Store, Txn};

pub const CA_KEY: &str = "/vroom/ca";

/// The CA as etcd keeps it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Ca {
    /// The CA certificate's common name: the issuer of every certificate.
    pub name: String,
    pub cert_pem: String,
    pub key_pem: String,
}

fn ca_params(name: &str) -> Result<CertificateParams, String> {
    let mut params = CertificateParams::new(Vec::<String>::new()).map_err(|e| e.to_string())?;
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, name);
    params.distinguished_name = dn;
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    Ok(params)
}

impl Ca {
    pub fn generate(cluster_id: &str) -> Result<Ca, String> {
        let name = format!("vroom cluster {cluster_id}");
        let key = KeyPair::generate().map_err(|e| e.to_string())?;
        let cert = ca_params(&name)?
            .self_signed(&key)
            .map_err(|e| e.to_string())?;
        Ok(Ca {
            name,
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }

    /// A certificate for `subject`, written into `dir` with the CA's
    /// certificate (the key readable by its owner only). With `sans` it
    /// serves too (a node: its names and addresses); without, it is a
    /// client's only. Valid for a year (a node reissues its own at start).
    pub fn issue(&self, subject: &str, sans: &[String], dir: &Path) -> Result<(), String> {
        let ca_key = KeyPair::from_pem(&self.key_pem).map_err(|e| format!("the CA key: {e}"))?;
        // The issuer as it signs: the same name and key as the stored CA
        // certificate, which is what a verifier checks.
        let issuer = ca_params(&self.name)?
            .self_signed(&ca_key)
            .map_err(|e| e.to_string())?;
        let mut params = CertificateParams::new(sans.to_vec()).map_err(|e| e.to_string())?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, subject);
        params.distinguished_name = dn;
        params.extended_key_usages = if sans.is_empty() {
            vec![ExtendedKeyUsagePurpose::ClientAuth]
        } else {
            vec![
                ExtendedKeyUsagePurpose::ServerAuth,
                ExtendedKeyUsagePurpose::ClientAuth,
            ]
        };
        let now = time::OffsetDateTime::now_utc();
        params.not_before = now - time::Duration::hours(1);
        params.not_after = now + time::Duration::days(365);
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        let key = KeyPair::generate().map_err(|e| e.to_string())?;
        let cert = params
            .signed_by(&key, &issuer, &ca_key)
            .map_err(|e| e.to_string())?;
        write_private(dir, &self.cert_pem, &cert.pem(), &key.serialize_pem())
            .map_err(|e| format!("cannot write {}: {e}", dir.display()))
    }
}

fn write_private(dir: &Path, ca: &str, cert: &str, key: &str) -> std::io::Result<()> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    std::fs::create_dir_all(dir)?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
    for (name, text, mode) in [
        (CA_FILE, ca, 0o644),
        (CERT_FILE, cert, 0o644),
        (KEY_FILE, key, 0o600),
    ] {
        let staged = dir.join(format!(".{name}.new"));
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode)
            .open(&staged)?;
        std::io::Write::write_all(&mut file, text.as_bytes())?;
        file.sync_all()?;
        std::fs::rename(&staged, dir.join(name))?;
    }
    Ok(())
}

/// The cluster's CA, made now if the cluster has none yet (a cluster from
/// before the CA existed).
pub async fn ensure_ca(etcd: &dyn Store, cluster_id: &str) -> Result<Ca, String> {
    if let Some((ca, _)) = etcd
        .get_json::<Ca>(CA_KEY)
        .await
        .map_err(|e| format!("cannot read the cluster's CA: {e}"))?
    {
        return Ok(ca);
    }
    let ca = Ca::generate(cluster_id)?;
    let txn = Txn::new()
        .when([Compare::create_revision(CA_KEY, 0)])
        .and_then([Op::put(CA_KEY, json(&ca))]);
    etcd.txn(txn)
        .await
        .map_err(|e| format!("cannot store the cluster's CA: {e}"))?;
    // Another node may have made it first: theirs stands.
    etcd.get_json::<Ca>(CA_KEY)
        .await
        .map_err(|e| format!("cannot read the cluster's CA: {e}"))?
        .map(|(ca, _)| ca)
        .ok_or_else(|| "the cluster's CA vanished".to_string())
}

/// The primary's side of a replication's TLS, with the node certificate of
/// `dir`: TLS 1.3 with ChaCha20-Poly1305 alone, its keys extractable.
pub fn replication_client(dir: &Path) -> Result<Arc<rustls::ClientConfig>, String> {
    #[allow(deprecated)] // ring: see `vroom_client::tls::crypto_provider`
    let mut provider = rustls::crypto::ring::default_provider();
    provider.cipher_suites =
        vec![rustls::crypto::ring::cipher_suite::TLS13_CHACHA20_POLY1305_SHA256];
    let mut config =
        vroom_client::tls::client_config_with(dir, Arc::new(provider), &[&rustls::version::TLS13])?;
    config.enable_secret_extraction = true;
    Ok(Arc::new(config))
}

/// The replica's side, with the node certificate of `dir`: a client
/// certificate of the cluster's CA is required, no session ticket follows
/// the handshake (the primary's relay reads application data only), and
/// the keys are extractable (the splice seals and opens records itself).
pub fn replication_server(dir: &Path) -> Result<Arc<rustls::ServerConfig>, String> {
    let mut config = vroom_client::tls::server_config(dir)?;
    config.send_tls13_tickets = 0;
    config.enable_secret_extraction = true;
    Ok(Arc::new(config))
}

/// The record keys of an established replication connection (either
/// end's, from `dangerous_extract_secrets`): nothing may be buffered in the
/// connection they came from (the replica sends nothing between its answer
/// and the primary's go-ahead, the primary nothing after the go-ahead
/// before the server's greeting).
pub fn record_keys(
    secrets: Result<rustls::ExtractedSecrets, rustls::Error>,
) -> Result<RecordKeys, String> {
    let secrets = secrets.map_err(|e| format!("cannot take the connection's keys: {e}"))?;
    let direction = |(seq, secrets)| match secrets {
        rustls::ConnectionTrafficSecrets::Chacha20Poly1305 { key, iv } => Ok(DirectionKeys {
            key: AsRef::<[u8]>::as_ref(&key).to_vec(),
            iv: AsRef::<[u8]>::as_ref(&iv).to_vec(),
            seq,
        }),
        _ => Err("the connection's cipher is not ChaCha20-Poly1305".to_string()),
    };
    Ok(RecordKeys {
        cipher: CHACHA20_POLY1305.into(),
        tx: direction(secrets.tx)?,
        rx: direction(secrets.rx)?,
    })
}

/// `vroom cluster credentials`: a client certificate for a workstation.
pub async fn credentials(endpoints: &[String], name: &str, dir: &Path) -> Result<(), String> {
    let etcd = Etcd::connect(endpoints).await.map_err(|e| e.to_string())?;
    let etcd: &dyn Store = &etcd;
    let info = etcd
        .get_json::<vroom_types::ClusterInfo>(crate::model::CLUSTER)
        .await
        .map_err(|e| e.to_string())?
        .map(|(info, _)| info)
        .ok_or_else(|| format!("no cluster at {}", etcd.endpoints()))?;
    let ca = ensure_ca(etcd, &info.id).await?;
    ca.issue(name, &[], dir)
}
