//! Who may speak on the peer port ([`crate::node::PEER_PORT`]): every
//! connection proves that a node of this cluster opened it before the
//! server acts on its hello.
//!
//! # Protocol (version 1)
//! One JSON line each, before anything else on the connection:
//! 1. server → client, on accept: a [`Challenge`]: the protocol version,
//!    the server's node name, and a nonce of 32 random bytes that is new
//!    for this connection;
//! 2. client → server: a [`SignedHello`]: the client's node name, its
//!    hello (the JSON text, exactly as proven) and the proof: HMAC-SHA256,
//!    keyed by the cluster's peer secret, over the nonce, the server's
//!    name, the client's name and the hello ([`proof_input`]: a domain tag,
//!    then each field prefixed by its length);
//! 3. server → client: a [`Verdict`]. After `accepted` the connection
//!    belongs to what the hello asked for (an image, a replica's address, a
//!    migration's control or state stream, which goes raw to QEMU).
//!
//! The server checks the proof (constant time) before it reads anything
//! from etcd, then that the named node is live in the cluster and
//! advertised at the connection's source address, then that the hello asks
//! for what that node may have (a replica's copy only from the volume's
//! recorded primary): `crate::node::peers`. The client reads the challenge
//! and the verdict byte by byte, so nothing after them is taken from the
//! socket. A refused connection gets a verdict with a reason and is closed;
//! the reason says only "not authenticated" until the proof checked out.
//!
//! The secret is 32 random bytes at [`PEER_SECRET_KEY`] in etcd, made once
//! (a compare-and-swap create, like the CA at `/vroom/ca`) by `cluster
//! init`, or by the first node that joins a cluster from before it. Every
//! node reads it when it joins and keeps it in memory only.
//!
//! # Why a MAC with a cluster secret, not a signature with the node's key
//! etcd is the cluster's root of trust: the CA's private key lives there
//! too, so whoever can read etcd (every node can) can issue a certificate
//! for any node name. A signature checked against a CA-issued certificate
//! would therefore prove no more than a MAC keyed by a secret kept beside
//! the CA, while it needs certificate parsing, chain, expiry and key-usage
//! checks, and the node's key in vroomd's hands. The HMAC needs only `ring`
//! (already built, for rustls) and its constant-time `hmac::verify`. What
//! ties a connection to one node is the source-address check; what ties a
//! proof to one connection is the nonce; to one destination, its name.
//!
//! # What it does not do
//! It authenticates the first line only. A replica's stream goes on in TLS
//! with both nodes' certificates (`crate::node::volumes`), but images and
//! VM state follow as plain TCP, neither encrypted nor integrity-protected,
//! so someone on the path between two nodes can read them or take over an
//! accepted connection. The cluster's network should be private. The
//! secret is never rotated: a node removed from the cluster still knows it
//! (it is refused while it is not live, or at another address).
//!
//! # Versioning
//! A version-1 server refuses a client that sends its hello without
//! waiting (vroom before version 1): its line is no [`SignedHello`]. A
//! version-1 client waiting for a challenge from an older server gives up
//! after [`HANDSHAKE_TIMEOUT`]. Upgrade the nodes of a cluster together:
//! between versions, migrations, image transfers and replication fail
//! (with these reasons in the logs) while instances keep running. A later
//! version raises [`PROTOCOL`] and keeps answering a lower one or refuses
//! it by name.

use ring::hmac;
use ring::rand::{SecureRandom, SystemRandom};
use serde::{Deserialize, Serialize};

use crate::store::{json, Compare, Op, Store, Txn};

/// Where etcd keeps the cluster's peer secret ([`PeerSecret`]).
pub const PEER_SECRET_KEY: &str = "/vroom/peer-secret";

/// The version of this handshake, in every [`Challenge`].
pub const PROTOCOL: u32 = 1;

/// How long a client waits for the challenge and, after its hello, for the
/// verdict (the server reads etcd before it answers).
pub const HANDSHAKE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

const SECRET_BYTES: usize = 32;
const NONCE_BYTES: usize = 32;

/// What the proof is computed over besides its fields: a proof for another
/// purpose (or version) never passes for this one.
const DOMAIN: &[u8] = b"vroom peer hello v1\0";

/// The cluster's peer secret as etcd keeps it.
#[derive(Clone, Serialize, Deserialize)]
pub struct PeerSecret {
    #[serde(with = "vroom_base::base64_bytes")]
    key: Vec<u8>,
}

impl PeerSecret {
    pub fn generate() -> Result<PeerSecret, String> {
        Ok(PeerSecret {
            key: random(SECRET_BYTES)?,
        })
    }

    pub fn key(&self) -> PeerKey {
        PeerKey(hmac::Key::new(hmac::HMAC_SHA256, &self.key))
    }
}

fn random(len: usize) -> Result<Vec<u8>, String> {
    let mut bytes = vec![0; len];
    SystemRandom::new()
        .fill(&mut bytes)
        .map_err(|_| "the system's random source failed".to_string())?;
    Ok(bytes)
}

/// The key that proves and checks hellos (derived from the secret).
#[derive(Clone)]
pub struct PeerKey(hmac::Key);

/// What the proof covers, unambiguously: each field after its length.
pub fn proof_input(nonce: &[u8], server: &str, client: &str, hello: &str) -> Vec<u8> {
    let mut input = DOMAIN.to_vec();
    for field in [
        nonce,
        server.as_bytes(),
        client.as_bytes(),
        hello.as_bytes(),
    ] {
        input.extend_from_slice(&(field.len() as u32).to_be_bytes());
        input.extend_from_slice(field);
    }
    input
}

impl PeerKey {
    pub fn prove(&self, nonce: &[u8], server: &str, client: &str, hello: &str) -> Vec<u8> {
        let input = proof_input(nonce, server, client, hello);
        hmac::sign(&self.0, &input).as_ref().to_vec()
    }

    /// Whether `proof` is this key's for these fields; compared in constant
    /// time (`ring::hmac::verify`).
    pub fn verify(
        &self,
        nonce: &[u8],
        server: &str,
        client: &str,
        hello: &str,
        proof: &[u8],
    ) -> bool {
        let input = proof_input(nonce, server, client, hello);
        hmac::verify(&self.0, &input, proof).is_ok()
    }
}

/// The server's first line.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Challenge {
    pub v: u32,
    /// The server's node name: the client proves for it, and says so when
    /// another node answers at the address it meant.
    pub node: String,
    #[serde(with = "vroom_base::base64_bytes")]
    pub nonce: Vec<u8>,
}

impl Challenge {
    /// A challenge from node `server`, with a fresh nonce.
    pub fn new(server: &str) -> Result<Challenge, String> {
        Ok(Challenge {
            v: PROTOCOL,
            node: server.to_string(),
            nonce: random(NONCE_BYTES)?,
        })
    }
}

/// The client's hello with its proof.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SignedHello {
    /// The client's node name.
    pub node: String,
    /// The hello's JSON text, as proven.
    pub hello: String,
    #[serde(with = "vroom_base::base64_bytes")]
    pub proof: Vec<u8>,
}

impl SignedHello {
    /// `hello` from node `client`, proven for `challenge` with `key`.
    pub fn new(key: &PeerKey, challenge: &Challenge, client: &str, hello: String) -> SignedHello {
        let proof = key.prove(&challenge.nonce, &challenge.node, client, &hello);
        SignedHello {
            node: client.to_string(),
            hello,
            proof,
        }
    }

    /// Whether it was proven with `key` for `challenge`.
    pub fn verify(&self, key: &PeerKey, challenge: &Challenge) -> bool {
        key.verify(
            &challenge.nonce,
            &challenge.node,
            &self.node,
            &self.hello,
            &self.proof,
        )
    }
}

/// The server's answer to a [`SignedHello`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "verdict", rename_all = "snake_case")]
pub enum Verdict {
    Accepted,
    Refused { reason: String },
}

/// The cluster's peer key, the secret made now if the cluster has none yet
/// (a cluster from before it): the first node's stands.
pub async fn ensure_peer_key(store: &dyn Store) -> Result<PeerKey, String> {
    let read = |e| format!("cannot read the cluster's peer secret: {e}");
    if let Some((secret, _)) = store
        .get_json::<PeerSecret>(PEER_SECRET_KEY)
        .await
        .map_err(read)?
    {
        return Ok(secret.key());
    }
    let txn = Txn::new()
        .when([Compare::create_revision(PEER_SECRET_KEY, 0)])
        .and_then([Op::put(PEER_SECRET_KEY, json(&PeerSecret::generate()?))]);
    store
        .txn(txn)
        .await
        .map_err(|e| format!("cannot store the cluster's peer secret: {e}"))?;
    store
        .get_json::<PeerSecret>(PEER_SECRET_KEY)
        .await
        .map_err(read)?
        .map(|(secret, _)| secret.key())
        .ok_or_else(|| "the cluster's peer secret vanished".to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A proof passes only for the key, nonce, server, client and hello it
    /// was made for.
    #[test]
    fn a_proof_holds_only_for_what_it_was_made_for() {
        let key = PeerSecret::generate().unwrap().key();
        let other = PeerSecret::generate().unwrap().key();
        let challenge = Challenge::new("b").unwrap();
        let hello = r#"{"kind":"image","id":"x"}"#.to_string();
        let signed = SignedHello::new(&key, &challenge, "a", hello.clone());
        assert!(signed.verify(&key, &challenge));
        type Change<'a> = dyn Fn(&mut SignedHello, &mut Challenge) + 'a;
        let altered = |f: &Change| {
            let (mut s, mut c) = (signed.clone(), challenge.clone());
            f(&mut s, &mut c);
            s.verify(&key, &c)
        };
        let cases: [(&str, &Change); 6] = [
            ("another nonce", &|_, c| c.nonce[0] ^= 1),
            ("another server", &|_, c| c.node = "c".into()),
            ("another client", &|s, _| s.node = "c".into()),
            ("another hello", &|s, _| s.hello = hello.replace('x', "y")),
            ("a cut proof", &|s, _| s.proof.truncate(16)),
            ("no proof", &|s, _| s.proof.clear()),
        ];
        for (what, change) in cases {
            assert!(!altered(change), "{what} passed");
        }
        assert!(!signed.verify(&other, &challenge), "another key passed");
        // The fields cannot be shifted into one another.
        assert_ne!(
            proof_input(b"n", "ab", "c", "h"),
            proof_input(b"n", "a", "bc", "h")
        );
    }

    #[test]
    fn nonces_and_secrets_are_fresh() {
        let (a, b) = (Challenge::new("b").unwrap(), Challenge::new("b").unwrap());
        assert_eq!(a.nonce.len(), NONCE_BYTES);
        assert_ne!(a.nonce, b.nonce);
        let (a, b) = (
            PeerSecret::generate().unwrap(),
            PeerSecret::generate().unwrap(),
        );
        assert_ne!(a.key, b.key);
    }

    /// The secret is made once: a second node finds the first one's.
    #[tokio::test]
    async fn the_secret_is_made_once() {
        let store = crate::store::mem::MemStore::new();
        let first = ensure_peer_key(&store).await.unwrap();
        let second = ensure_peer_key(&store).await.unwrap();
        let proof = first.prove(b"n", "b", "a", "h");
        assert!(second.verify(b"n", "b", "a", "h", &proof));
    }
}
