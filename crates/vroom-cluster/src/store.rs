//! The cluster's store, as vroom uses it: keys with the revisions that
//! fence writes, compare-and-swap transactions, leases that delete their
//! keys when they expire, and a watch that says something changed.
//!
//! [`Store`] is the seam: [`etcd::Etcd`] is the real one; with the
//! `testing` feature, `mem::MemStore` keeps the same rules in memory so
//! that the cluster's decisions are unit-tested without etcd.
//!
//! The rules both keep (etcd's): every write advances one global revision;
//! a key remembers the revision that created it and the one that last
//! changed it; a transaction's writes all happen at one revision, or none
//! do; a compare on a missing key sees revisions and lease 0, and a value
//! compare on a missing key fails.

use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::Serialize;

pub mod etcd;
#[cfg(any(test, feature = "testing"))]
pub mod mem;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("etcd at {endpoints} is unreachable: {reason}")]
    Unreachable { endpoints: String, reason: String },
    #[error("etcd request failed: {0}")]
    Request(String),
    #[error("etcd did not answer within {0:?}")]
    Timeout(Duration),
    #[error("etcd key {key} holds what this vroom cannot read: {reason}")]
    Decode { key: String, reason: String },
    /// The lease is gone (expired or revoked).
    #[error("etcd lease {0:x} not found")]
    LeaseNotFound(i64),
}

impl StoreError {
    /// A lease this request named is gone: a write under it is refused
    /// with etcd's own message.
    pub fn is_lease_not_found(&self) -> bool {
        match self {
            StoreError::LeaseNotFound(_) => true,
            StoreError::Request(message) => message.contains("requested lease not found"),
            _ => false,
        }
    }
}

/// One key as read, with the revisions that fence writes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Kv {
    pub key: String,
    pub value: Vec<u8>,
    pub create_revision: i64,
    pub mod_revision: i64,
    pub lease: i64,
}

impl Kv {
    pub fn decode<T: DeserializeOwned>(&self) -> Result<T, StoreError> {
        serde_json::from_slice(&self.value).map_err(|e| StoreError::Decode {
            key: self.key.clone(),
            reason: e.to_string(),
        })
    }

    /// The key without `prefix`.
    pub fn name(&self, prefix: &str) -> &str {
        self.key.strip_prefix(prefix).unwrap_or(&self.key)
    }
}

pub fn json<T: Serialize>(value: &T) -> Vec<u8> {
    serde_json::to_vec(value).expect("invariant: cluster records serialize")
}

/// What a transaction's guard checks on one key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Compare {
    pub key: String,
    pub check: Check,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Check {
    /// The key was created at this revision (0: it does not exist).
    CreateRevision(i64),
    /// The key exists (its create revision is above 0).
    Exists,
    /// The key last changed at this revision (0: it does not exist): the
    /// fencing token's check.
    ModRevision(i64),
    /// The key holds exactly this value (never true of a missing key).
    Value(Vec<u8>),
    /// The key is bound to this lease (0: to none, or it does not exist).
    Lease(i64),
}

impl Compare {
    pub fn create_revision(key: impl Into<String>, revision: i64) -> Compare {
        Compare {
            key: key.into(),
            check: Check::CreateRevision(revision),
        }
    }

    pub fn exists(key: impl Into<String>) -> Compare {
        Compare {
            key: key.into(),
            check: Check::Exists,
        }
    }

    pub fn mod_revision(key: impl Into<String>, revision: i64) -> Compare {
        Compare {
            key: key.into(),
            check: Check::ModRevision(revision),
        }
    }

    pub fn value(key: impl Into<String>, value: impl Into<Vec<u8>>) -> Compare {
        Compare {
            key: key.into(),
            check: Check::Value(value.into()),
        }
    }

    pub fn lease(key: impl Into<String>, lease: i64) -> Compare {
        Compare {
            key: key.into(),
            check: Check::Lease(lease),
        }
    }
}

/// One write of a transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// Writes `value` at `key`, bound to `lease` (0: to none).
    Put {
        key: String,
        value: Vec<u8>,
        lease: i64,
    },
    Delete {
        key: String,
    },
    /// A transaction inside this one (its writes at the same revision).
    Txn(Txn),
}

impl Op {
    pub fn put(key: impl Into<String>, value: impl Into<Vec<u8>>) -> Op {
        Op::put_leased(key, value, 0)
    }

    /// A put bound to `lease`: the key goes when the lease does.
    pub fn put_leased(key: impl Into<String>, value: impl Into<Vec<u8>>, lease: i64) -> Op {
        Op::Put {
            key: key.into(),
            value: value.into(),
            lease,
        }
    }

    pub fn delete(key: impl Into<String>) -> Op {
        Op::Delete { key: key.into() }
    }

    pub fn txn(txn: Txn) -> Op {
        Op::Txn(txn)
    }
}

/// A compare-and-swap: `then` if every compare holds, else `otherwise`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Txn {
    pub when: Vec<Compare>,
    pub then: Vec<Op>,
    pub otherwise: Vec<Op>,
}

impl Txn {
    pub fn new() -> Txn {
        Txn::default()
    }

    pub fn when(mut self, compares: impl IntoIterator<Item = Compare>) -> Txn {
        self.when.extend(compares);
        self
    }

    pub fn and_then(mut self, ops: impl IntoIterator<Item = Op>) -> Txn {
        self.then.extend(ops);
        self
    }

    pub fn or_else(mut self, ops: impl IntoIterator<Item = Op>) -> Txn {
        self.otherwise.extend(ops);
        self
    }
}

/// How a transaction went.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TxnResponse {
    /// Whether every compare held (and `then` ran).
    pub succeeded: bool,
    /// The store's revision after it (a write's revision, if it wrote).
    pub revision: i64,
    /// The responses of the transactions among the ops that ran.
    pub nested: Vec<TxnResponse>,
}

impl TxnResponse {
    pub fn succeeded(&self) -> bool {
        self.succeeded
    }

    pub fn revision(&self) -> i64 {
        self.revision
    }
}

/// A lease's renewal stream.
#[async_trait::async_trait]
pub trait KeepAlive: Send {
    /// Renews the lease once: its time to live left (0: it expired), or
    /// `None` when the stream closed.
    async fn renew(&mut self) -> Result<Option<i64>, StoreError>;
}

/// Changes under a prefix.
#[async_trait::async_trait]
pub trait Watch: Send {
    /// Waits for a change: `false` when the watch broke.
    async fn changed(&mut self) -> bool;
}

/// The cluster's store: etcd, or its in-memory stand-in in tests.
#[async_trait::async_trait]
pub trait Store: Send + Sync {
    /// Where it is, for messages.
    fn endpoints(&self) -> String;
    async fn get(&self, key: &str) -> Result<Option<Kv>, StoreError>;
    /// Every key under `prefix`, and the revision they were read at.
    async fn list(&self, prefix: &str) -> Result<(Vec<Kv>, i64), StoreError>;
    async fn put(&self, key: &str, value: Vec<u8>) -> Result<(), StoreError>;
    async fn delete(&self, key: &str) -> Result<(), StoreError>;
    async fn txn(&self, txn: Txn) -> Result<TxnResponse, StoreError>;

    /// A new lease that lives `ttl_secs` after its last renewal.
    async fn grant(&self, ttl_secs: i64) -> Result<i64, StoreError>;
    /// The lease's time to live left (0 or less: it is gone).
    async fn time_to_live(&self, lease: i64) -> Result<i64, StoreError>;
    /// Ends the lease now, and with it its keys.
    async fn revoke(&self, lease: i64) -> Result<(), StoreError>;
    /// Opens the lease's renewal stream; [`StoreError::LeaseNotFound`]
    /// when the lease is gone.
    async fn keep_alive(&self, lease: i64) -> Result<Box<dyn KeepAlive>, StoreError>;
    async fn watch(&self, prefix: &str) -> Result<Box<dyn Watch>, StoreError>;

    /// A second connection to the same store (the keepalive's own).
    async fn reconnect(&self) -> Result<std::sync::Arc<dyn Store>, StoreError>;
    /// Opens a fresh connection in place of the current one (best effort).
    async fn refresh(&self) {}
}

impl dyn Store + '_ {
    pub async fn get_json<T: DeserializeOwned>(
        &self,
        key: &str,
    ) -> Result<Option<(T, Kv)>, StoreError> {
        match self.get(key).await? {
            Some(kv) => Ok(Some((kv.decode()?, kv))),
            None => Ok(None),
        }
    }
}
