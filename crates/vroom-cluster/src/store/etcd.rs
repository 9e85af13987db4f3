//! The [`Store`] on etcd, through `etcd-client`: bounded waits, a
//! connection that replaces itself after a failure, and errors that name
//! the endpoints.

use std::sync::Arc;
use std::time::Duration;

use etcd_client::{Client, CompareOp, ConnectOptions, GetOptions, PutOptions, WatchOptions};

use super::{Check, KeepAlive, Kv, Op, Store, StoreError, Txn, TxnResponse, Watch};
use vroom_base::LockExt;

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

impl From<etcd_client::Error> for StoreError {
    fn from(e: etcd_client::Error) -> Self {
        StoreError::Request(one_line(&e.to_string()))
    }
}

fn one_line(s: &str) -> String {
    s.lines().next().unwrap_or("").chars().take(300).collect()
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
    client: Arc<std::sync::Mutex<Client>>,
    endpoints: Vec<String>,
}

async fn bounded<T>(
    work: impl std::future::Future<Output = Result<T, etcd_client::Error>>,
) -> Result<T, StoreError> {
    match tokio::time::timeout(REQUEST_TIMEOUT, work).await {
        Ok(result) => Ok(result?),
        Err(_) => Err(StoreError::Timeout(REQUEST_TIMEOUT)),
    }
}

impl Etcd {
    /// Connects and checks that etcd answers (a client connects lazily).
    pub async fn connect(endpoints: &[String]) -> Result<Etcd, StoreError> {
        let unreachable = |reason: String| StoreError::Unreachable {
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
            client: Arc::new(std::sync::Mutex::new(client)),
            endpoints: endpoints.to_vec(),
        };
        etcd.get(crate::model::CLUSTER)
            .await
            .map_err(|e| unreachable(e.to_string()))?;
        Ok(etcd)
    }

    fn client(&self) -> Client {
        self.client.lock_unpoisoned().clone()
    }

    /// Runs a request; after a failure, the next request uses a new connection.
    async fn request<T, F>(&self, work: impl FnOnce(Client) -> F) -> Result<T, StoreError>
    where
        F: std::future::Future<Output = Result<T, etcd_client::Error>>,
    {
        let result = bounded(work(self.client())).await;
        if result.is_err() {
            self.refresh().await;
        }
        result
    }

    /// A read, tried again once on a fresh connection: reads are safe to repeat.
    async fn read<T, F>(&self, work: impl Fn(Client) -> F) -> Result<T, StoreError>
    where
        F: std::future::Future<Output = Result<T, etcd_client::Error>>,
    {
        match self.request(&work).await {
            Ok(v) => Ok(v),
            Err(_) => self.request(&work).await,
        }
    }
}

fn to_etcd(txn: Txn) -> etcd_client::Txn {
    let compares: Vec<etcd_client::Compare> = txn
        .when
        .into_iter()
        .map(|c| match c.check {
            Check::CreateRevision(r) => {
                etcd_client::Compare::create_revision(c.key, CompareOp::Equal, r)
            }
            Check::Exists => etcd_client::Compare::create_revision(c.key, CompareOp::Greater, 0),
            Check::ModRevision(r) => etcd_client::Compare::mod_revision(c.key, CompareOp::Equal, r),
            Check::Value(v) => etcd_client::Compare::value(c.key, CompareOp::Equal, v),
            Check::Lease(l) => etcd_client::Compare::lease(c.key, CompareOp::Equal, l),
        })
        .collect();
    let ops = |ops: Vec<Op>| -> Vec<etcd_client::TxnOp> {
        ops.into_iter()
            .map(|op| match op {
                Op::Put { key, value, lease } => {
                    let options = (lease != 0).then(|| PutOptions::new().with_lease(lease));
                    etcd_client::TxnOp::put(key, value, options)
                }
                Op::Delete { key } => etcd_client::TxnOp::delete(key, None),
                Op::Txn(inner) => etcd_client::TxnOp::txn(to_etcd(inner)),
            })
            .collect()
    };
    let mut etcd = etcd_client::Txn::new()
        .when(compares)
        .and_then(ops(txn.then));
    if !txn.otherwise.is_empty() {
        etcd = etcd.or_else(ops(txn.otherwise));
    }
    etcd
}

fn from_etcd(resp: &etcd_client::TxnResponse) -> TxnResponse {
    TxnResponse {
        succeeded: resp.succeeded(),
        revision: resp.header().map_or(0, |h| h.revision()),
        nested: resp
            .op_responses()
            .iter()
            .filter_map(|r| match r {
                etcd_client::TxnOpResponse::Txn(t) => Some(from_etcd(t)),
                _ => None,
            })
            .collect(),
    }
}

struct EtcdKeepAlive {
    keeper: etcd_client::LeaseKeeper,
    stream: etcd_client::LeaseKeepAliveStream,
}

#[async_trait::async_trait]
impl KeepAlive for EtcdKeepAlive {
    async fn renew(&mut self) -> Result<Option<i64>, StoreError> {
        self.keeper.keep_alive().await?;
        Ok(self.stream.message().await?.map(|r| r.ttl()))
    }
}

struct EtcdWatch {
    /// The connection the stream runs on, held while it does.
    _client: Client,
    stream: etcd_client::WatchStream,
}

#[async_trait::async_trait]
impl Watch for EtcdWatch {
    async fn changed(&mut self) -> bool {
        matches!(self.stream.message().await, Ok(Some(_)))
    }
}

#[async_trait::async_trait]
impl Store for Etcd {
    fn endpoints(&self) -> String {
        self.endpoints.join(",")
    }

    async fn get(&self, key: &str) -> Result<Option<Kv>, StoreError> {
        let resp = self
            .read(|mut c| {
                let key = key.to_string();
                async move { c.get(key, None).await }
            })
            .await?;
        Ok(resp.kvs().first().map(Kv::from))
    }

    async fn list(&self, prefix: &str) -> Result<(Vec<Kv>, i64), StoreError> {
        let resp = self
            .read(|mut c| {
                let prefix = prefix.to_string();
                async move { c.get(prefix, Some(GetOptions::new().with_prefix())).await }
            })
            .await?;
        let revision = resp.header().map(|h| h.revision()).unwrap_or(0);
        Ok((resp.kvs().iter().map(Kv::from).collect(), revision))
    }

    async fn put(&self, key: &str, value: Vec<u8>) -> Result<(), StoreError> {
        let key = key.to_string();
        self.request(|mut c| async move { c.put(key, value, None).await })
            .await
            .map(|_| ())
    }

    async fn delete(&self, key: &str) -> Result<(), StoreError> {
        let key = key.to_string();
        self.request(|mut c| async move { c.delete(key, None).await })
            .await
            .map(|_| ())
    }

    async fn txn(&self, txn: Txn) -> Result<TxnResponse, StoreError> {
        let txn = to_etcd(txn);
        self.request(|mut c| async move { c.txn(txn).await })
            .await
            .map(|r| from_etcd(&r))
    }

    async fn grant(&self, ttl_secs: i64) -> Result<i64, StoreError> {
        Ok(self.client().lease_grant(ttl_secs, None).await?.id())
    }

    async fn time_to_live(&self, lease: i64) -> Result<i64, StoreError> {
        Ok(self.client().lease_time_to_live(lease, None).await?.ttl())
    }

    async fn revoke(&self, lease: i64) -> Result<(), StoreError> {
        self.client().lease_revoke(lease).await?;
        Ok(())
    }

    async fn keep_alive(&self, lease: i64) -> Result<Box<dyn KeepAlive>, StoreError> {
        match self.client().lease_keep_alive(lease).await {
            Ok((keeper, stream)) => Ok(Box::new(EtcdKeepAlive { keeper, stream })),
            // The client refuses to open a stream for a lease etcd no
            // longer has: it expired.
            Err(etcd_client::Error::LeaseKeepAliveError(e)) if e.contains("not found") => {
                Err(StoreError::LeaseNotFound(lease))
            }
            Err(e) => Err(e.into()),
        }
    }

    async fn watch(&self, prefix: &str) -> Result<Box<dyn Watch>, StoreError> {
        let mut client = self.client();
        let stream = client
            .watch(prefix, Some(WatchOptions::new().with_prefix()))
            .await?;
        Ok(Box::new(EtcdWatch {
            _client: client,
            stream,
        }))
    }

    async fn reconnect(&self) -> Result<Arc<dyn Store>, StoreError> {
        Ok(Arc::new(Etcd::connect(&self.endpoints).await?))
    }

    async fn refresh(&self) {
        let options = connect_options();
        if let Ok(Ok(client)) = tokio::time::timeout(
            CONNECT_TIMEOUT,
            Client::connect(&self.endpoints, Some(options)),
        )
        .await
        {
            *self.client.lock_unpoisoned() = client;
        }
    }
}
