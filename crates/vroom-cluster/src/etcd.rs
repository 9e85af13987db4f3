//! A thin typed wrapper over `etcd-client`: bounded waits, JSON values and
//! errors that name the endpoints.

use std::time::Duration;

use etcd_client::{Client, ConnectOptions, GetOptions, Txn, TxnResponse};
use serde::de::DeserializeOwned;
use serde::Serialize;

/// How long one etcd request may take before it counts as failed.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(3);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// HTTP/2 pings no more often than etcd tolerates: it answers pings closer
/// than `--grpc-keepalive-min-time` (5 s) with GOAWAY "too_many_pings",
/// which fails the request under way. A dead peer is caught by the request
/// timeout, and the next request reconnects.
fn connect_options() -> ConnectOptions {
    ConnectOptions::new()
        .with_connect_timeout(CONNECT_TIMEOUT)
        .with_timeout(REQUEST_TIMEOUT)
        .with_keep_alive(Duration::from_secs(10), Duration::from_secs(3))
}

#[derive(Debug, thiserror::Error)]
pub enum EtcdError {
    #[error("etcd at {endpoints} is unreachable: {reason}")]
    Unreachable { endpoints: String, reason: String },
    #[error("etcd request failed: {0}")]
    Request(String),
    #[error("etcd did not answer within {0:?}")]
    Timeout(Duration),
    #[error("etcd key {key} holds what this vroom cannot read: {reason}")]
    Decode { key: String, reason: String },
}

impl From<etcd_client::Error> for EtcdError {
    fn from(e: etcd_client::Error) -> Self {
        EtcdError::Request(one_line(&e.to_string()))
    }
}

fn one_line(s: &str) -> String {
    s.lines().next().unwrap_or("").chars().take(300).collect()
}

/// One key as read, with the revisions that fence writes.
#[derive(Debug, Clone)]
pub struct Kv {
    pub key: String,
    pub value: Vec<u8>,
    pub create_revision: i64,
    pub mod_revision: i64,
    pub lease: i64,
}

impl Kv {
    pub fn decode<T: DeserializeOwned>(&self) -> Result<T, EtcdError> {
        serde_json::from_slice(&self.value).map_err(|e| EtcdError::Decode {
            key: self.key.clone(),
            reason: e.to_string(),
        })
    }

    /// The key without `prefix`.
    pub fn name(&self, prefix: &str) -> &str {
        self.key.strip_prefix(prefix).unwrap_or(&self.key)
    }
}

impl From<&etcd_client::KeyValue> for Kv {
    fn from(kv: &etcd_client::KeyValue) -> Self {
        Kv {
            key: String::from_utf8_lossy(kv.key()).into_owned(),
            value: kv.value().to_vec(),
            create_revision: kv.create_revision(),
            mod_revision: kv.mod_revision(),
            lease: kv.lease(),
        }
    }
}

/// A connection to etcd that replaces itself after a failed request: a
/// gRPC channel that lived through a partition can stay wedged long after
/// the network heals.
#[derive(Clone)]
pub struct Etcd {
    client: std::sync::Arc<std::sync::Mutex<Client>>,
    endpoints: Vec<String>,
}

pub fn json<T: Serialize>(value: &T) -> Vec<u8> {
    serde_json::to_vec(value).expect("invariant: cluster records serialize")
}

async fn bounded<T>(
    work: impl std::future::Future<Output = Result<T, etcd_client::Error>>,
) -> Result<T, EtcdError> {
    match tokio::time::timeout(REQUEST_TIMEOUT, work).await {
        Ok(result) => Ok(result?),
        Err(_) => Err(EtcdError::Timeout(REQUEST_TIMEOUT)),
    }
}

impl Etcd {
    /// Connects and checks that etcd answers (a client connects lazily).
    pub async fn connect(endpoints: &[String]) -> Result<Etcd, EtcdError> {
        let unreachable = |reason: String| EtcdError::Unreachable {
            endpoints: endpoints.join(","),
            reason: one_line(&reason),
        };
        let options = connect_options();
        let client = tokio::time::timeout(
            CONNECT_TIMEOUT * 2,
            Client::connect(endpoints, Some(options)),
        )
        .await
        .map_err(|_| unreachable("no answer".into()))?
        .map_err(|e| unreachable(e.to_string()))?;
        let etcd = Etcd {
            client: std::sync::Arc::new(std::sync::Mutex::new(client)),
            endpoints: endpoints.to_vec(),
        };
        etcd.get(crate::model::CLUSTER)
            .await
            .map_err(|e| unreachable(e.to_string()))?;
        Ok(etcd)
    }

    /// A second connection to the same endpoints (the keepalive's own).
    pub async fn reconnect(&self) -> Result<Etcd, EtcdError> {
        Etcd::connect(&self.endpoints).await
    }

    pub fn endpoints(&self) -> String {
        self.endpoints.join(",")
    }

    pub fn client(&self) -> Client {
        self.client
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Opens a fresh connection in place of the current one (best effort).
    pub async fn refresh(&self) {
        let options = connect_options();
        if let Ok(Ok(client)) = tokio::time::timeout(
            CONNECT_TIMEOUT,
            Client::connect(&self.endpoints, Some(options)),
        )
        .await
        {
            *self.client.lock().unwrap_or_else(|p| p.into_inner()) = client;
        }
    }

    /// Runs a request; after a failure, the next request uses a new connection.
    async fn request<T, F>(&self, work: impl FnOnce(Client) -> F) -> Result<T, EtcdError>
    where
        F: std::future::Future<Output = Result<T, etcd_client::Error>>,
    {
        let result = bounded(work(self.client())).await;
        if result.is_err() {
            self.refresh().await;
        }
        result
    }

    pub async fn get(&self, key: &str) -> Result<Option<Kv>, EtcdError> {
        let resp = self
            .read(|mut c| {
                let key = key.to_string();
                async move { c.get(key, None).await }
            })
            .await?;
        Ok(resp.kvs().first().map(Kv::from))
    }

    pub async fn get_json<T: DeserializeOwned>(
        &self,
        key: &str,
    ) -> Result<Option<(T, Kv)>, EtcdError> {
        match self.get(key).await? {
            Some(kv) => Ok(Some((kv.decode()?, kv))),
            None => Ok(None),
        }
    }

    /// Every key under `prefix`, and the revision they were read at.
    pub async fn list(&self, prefix: &str) -> Result<(Vec<Kv>, i64), EtcdError> {
        let resp = self
            .read(|mut c| {
                let prefix = prefix.to_string();
                async move { c.get(prefix, Some(GetOptions::new().with_prefix())).await }
            })
            .await?;
        let revision = resp.header().map(|h| h.revision()).unwrap_or(0);
        Ok((resp.kvs().iter().map(Kv::from).collect(), revision))
    }

    /// A read, tried again once on a fresh connection: reads are safe to repeat.
    async fn read<T, F>(&self, work: impl Fn(Client) -> F) -> Result<T, EtcdError>
    where
        F: std::future::Future<Output = Result<T, etcd_client::Error>>,
    {
        match self.request(&work).await {
            Ok(v) => Ok(v),
            Err(_) => self.request(&work).await,
        }
    }

    pub async fn txn(&self, txn: Txn) -> Result<TxnResponse, EtcdError> {
        self.request(|mut c| async move { c.txn(txn).await }).await
    }

    pub async fn put(&self, key: &str, value: Vec<u8>) -> Result<(), EtcdError> {
        let key = key.to_string();
        self.request(|mut c| async move { c.put(key, value, None).await })
            .await
            .map(|_| ())
    }

    pub async fn delete(&self, key: &str) -> Result<(), EtcdError> {
        let key = key.to_string();
        self.request(|mut c| async move { c.delete(key, None).await })
            .await
            .map(|_| ())
    }
}
