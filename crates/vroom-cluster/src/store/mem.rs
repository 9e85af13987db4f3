//! The [`Store`] in memory, with etcd's rules (see [`super`]): one global
//! revision, per-key create and mod revisions, transactions that compare
//! and write atomically, leases whose keys go with them. A lease expires
//! `ttl` after its last renewal by tokio's clock (checked at each request),
//! or at once through [`MemStore::expire`]. Clones share one store.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::broadcast;
use tokio::time::Instant;

use super::{Check, Compare, KeepAlive, Kv, Op, Store, StoreError, Txn, TxnResponse, Watch};
use vroom_base::LockExt;

#[derive(Clone)]
pub struct MemStore {
    state: Arc<Mutex<State>>,
    /// The keys each write changed, for the watches.
    changes: broadcast::Sender<Vec<String>>,
}

#[derive(Default)]
struct State {
    revision: i64,
    keys: BTreeMap<String, Entry>,
    leases: BTreeMap<i64, Lease>,
    next_lease: i64,
}

#[derive(Clone)]
struct Entry {
    value: Vec<u8>,
    create_revision: i64,
    mod_revision: i64,
    lease: i64,
}

struct Lease {
    ttl_secs: i64,
    deadline: Instant,
    keys: BTreeSet<String>,
}

impl Default for MemStore {
    fn default() -> Self {
        MemStore::new()
    }
}

impl MemStore {
    pub fn new() -> MemStore {
        MemStore {
            state: Arc::new(Mutex::new(State {
                next_lease: 0x7000,
                ..State::default()
            })),
            changes: broadcast::channel(1024).0,
        }
    }

    /// Ends `lease` now, as its expiry would: its keys go at one revision.
    /// `false` when it was gone already.
    pub fn expire(&self, lease: i64) -> bool {
        let changed = {
            let mut state = self.state.lock_unpoisoned();
            state.end_lease(lease)
        };
        match changed {
            Some(keys) => {
                self.announce(keys);
                true
            }
            None => false,
        }
    }

    /// The store's current revision.
    pub fn revision(&self) -> i64 {
        self.state.lock_unpoisoned().revision
    }

    /// Every key with its value, as read now (for comparing snapshots).
    pub fn dump(&self) -> Vec<Kv> {
        let mut state = self.state.lock_unpoisoned();
        let expired = state.expire_due();
        let all = state.range("");
        drop(state);
        self.announce(expired);
        all
    }

    /// Runs `work` on the state after the leases that are due expired,
    /// then tells the watches what changed.
    fn with_state<T>(&self, work: impl FnOnce(&mut State) -> (T, Vec<String>)) -> T {
        let (result, changed) = {
            let mut state = self.state.lock_unpoisoned();
            let mut changed = state.expire_due();
            let (result, more) = work(&mut state);
            changed.extend(more);
            (result, changed)
        };
        self.announce(changed);
        result
    }

    fn announce(&self, keys: Vec<String>) {
        if !keys.is_empty() {
            let _ = self.changes.send(keys);
        }
    }
}

impl State {
    fn kv(&self, key: &str) -> Option<Kv> {
        self.keys.get(key).map(|e| Kv {
            key: key.to_string(),
            value: e.value.clone(),
            create_revision: e.create_revision,
            mod_revision: e.mod_revision,
            lease: e.lease,
        })
    }

    fn range(&self, prefix: &str) -> Vec<Kv> {
        self.keys
            .range(prefix.to_string()..)
            .take_while(|(k, _)| k.starts_with(prefix))
            .filter_map(|(k, _)| self.kv(k))
            .collect()
    }

    /// Ends the leases whose deadline passed; returns the keys that went.
    fn expire_due(&mut self) -> Vec<String> {
        let now = Instant::now();
        let due: Vec<i64> = self
            .leases
            .iter()
            .filter(|(_, l)| l.deadline <= now)
            .map(|(id, _)| *id)
            .collect();
        due.into_iter()
            .filter_map(|id| self.end_lease(id))
            .flatten()
            .collect()
    }

    /// Ends a lease and deletes its keys at one revision (`None`: no such
    /// lease).
    fn end_lease(&mut self, id: i64) -> Option<Vec<String>> {
        let lease = self.leases.remove(&id)?;
        let keys: Vec<String> = lease
            .keys
            .into_iter()
            .filter(|k| self.keys.contains_key(k))
            .collect();
        if !keys.is_empty() {
            self.revision += 1;
            for k in &keys {
                self.keys.remove(k);
            }
        }
        Some(keys)
    }

    fn holds(&self, compare: &Compare) -> bool {
        let entry = self.keys.get(&compare.key);
        match &compare.check {
            Check::CreateRevision(r) => entry.map_or(0, |e| e.create_revision) == *r,
            Check::Exists => entry.is_some(),
            Check::ModRevision(r) => entry.map_or(0, |e| e.mod_revision) == *r,
            Check::Value(v) => entry.is_some_and(|e| e.value == *v),
            Check::Lease(l) => entry.map_or(0, |e| e.lease) == *l,
        }
    }

    /// Which branches a transaction takes, decided on the state before it
    /// writes (as etcd does, nested transactions included): the ops to
    /// apply and the response shape.
    fn decide(&self, txn: &Txn, ops: &mut Vec<Op>) -> TxnResponse {
        let succeeded = txn.when.iter().all(|c| self.holds(c));
        let branch = if succeeded { &txn.then } else { &txn.otherwise };
        let mut nested = vec![];
        for op in branch {
            match op {
                Op::Txn(inner) => nested.push(self.decide(inner, ops)),
                other => ops.push(other.clone()),
            }
        }
        TxnResponse {
            succeeded,
            revision: 0,
            nested,
        }
    }

    /// Checks writes as etcd does before it applies any: one write per key,
    /// and only existing leases.
    fn check(&self, ops: &[Op]) -> Result<(), StoreError> {
        let mut seen = BTreeSet::new();
        for op in ops {
            let (key, lease) = match op {
                Op::Put { key, lease, .. } => (key, *lease),
                Op::Delete { key } => (key, 0),
                Op::Txn(_) => continue,
            };
            if !seen.insert(key.clone()) {
                return Err(StoreError::Request(
                    "etcdserver: duplicate key given in txn request".into(),
                ));
            }
            if lease != 0 && !self.leases.contains_key(&lease) {
                return Err(StoreError::Request(
                    "etcdserver: requested lease not found".into(),
                ));
            }
        }
        Ok(())
    }

    /// Applies writes at one new revision (none if nothing changes).
    /// Returns the keys changed.
    fn apply(&mut self, ops: Vec<Op>) -> Vec<String> {
        let writes = ops.iter().any(|op| match op {
            Op::Put { .. } => true,
            Op::Delete { key } => self.keys.contains_key(key),
            Op::Txn(_) => false,
        });
        if !writes {
            return vec![];
        }
        self.revision += 1;
        let revision = self.revision;
        let mut changed = vec![];
        for op in ops {
            match op {
                Op::Put { key, value, lease } => {
                    let create_revision =
                        self.keys.get(&key).map_or(revision, |e| e.create_revision);
                    if let Some(old) = self.keys.get(&key) {
                        let old_lease = old.lease;
                        if let Some(l) = self.leases.get_mut(&old_lease) {
                            l.keys.remove(&key);
                        }
                    }
                    if let Some(l) = self.leases.get_mut(&lease) {
                        l.keys.insert(key.clone());
                    }
                    self.keys.insert(
                        key.clone(),
                        Entry {
                            value,
                            create_revision,
                            mod_revision: revision,
                            lease,
                        },
                    );
                    changed.push(key);
                }
                Op::Delete { key } => {
                    if let Some(old) = self.keys.remove(&key) {
                        if let Some(l) = self.leases.get_mut(&old.lease) {
                            l.keys.remove(&key);
                        }
                        changed.push(key);
                    }
                }
                Op::Txn(_) => {}
            }
        }
        changed
    }

    fn run(&mut self, txn: &Txn) -> (Result<TxnResponse, StoreError>, Vec<String>) {
        let mut ops = vec![];
        let mut response = self.decide(txn, &mut ops);
        if let Err(e) = self.check(&ops) {
            return (Err(e), vec![]);
        }
        let changed = self.apply(ops);
        response.revision = self.revision;
        (Ok(response), changed)
    }
}

struct MemKeepAlive {
    store: MemStore,
    lease: i64,
}

#[async_trait::async_trait]
impl KeepAlive for MemKeepAlive {
    async fn renew(&mut self) -> Result<Option<i64>, StoreError> {
        let lease = self.lease;
        Ok(Some(self.store.with_state(|state| {
            let ttl = match state.leases.get_mut(&lease) {
                Some(l) => {
                    l.deadline = Instant::now() + Duration::from_secs(l.ttl_secs as u64);
                    l.ttl_secs
                }
                None => 0,
            };
            (ttl, vec![])
        })))
    }
}

struct MemWatch {
    changes: broadcast::Receiver<Vec<String>>,
    prefix: String,
}

#[async_trait::async_trait]
impl Watch for MemWatch {
    async fn changed(&mut self) -> bool {
        loop {
            match self.changes.recv().await {
                Ok(keys) if keys.iter().any(|k| k.starts_with(&self.prefix)) => return true,
                Ok(_) => {}
                Err(broadcast::error::RecvError::Lagged(_)) => return true,
                Err(broadcast::error::RecvError::Closed) => return false,
            }
        }
    }
}

#[async_trait::async_trait]
impl Store for MemStore {
    fn endpoints(&self) -> String {
        "memory".into()
    }

    async fn get(&self, key: &str) -> Result<Option<Kv>, StoreError> {
        Ok(self.with_state(|state| (state.kv(key), vec![])))
    }

    async fn list(&self, prefix: &str) -> Result<(Vec<Kv>, i64), StoreError> {
        Ok(self.with_state(|state| ((state.range(prefix), state.revision), vec![])))
    }

    async fn put(&self, key: &str, value: Vec<u8>) -> Result<(), StoreError> {
        self.txn(Txn::new().and_then([Op::put(key, value)]))
            .await
            .map(|_| ())
    }

    async fn delete(&self, key: &str) -> Result<(), StoreError> {
        self.txn(Txn::new().and_then([Op::delete(key)]))
            .await
            .map(|_| ())
    }

    async fn txn(&self, txn: Txn) -> Result<TxnResponse, StoreError> {
        self.with_state(|state| state.run(&txn))
    }

    async fn grant(&self, ttl_secs: i64) -> Result<i64, StoreError> {
        Ok(self.with_state(|state| {
            state.next_lease += 1;
            let id = state.next_lease;
            state.leases.insert(
                id,
                Lease {
                    ttl_secs,
                    deadline: Instant::now() + Duration::from_secs(ttl_secs as u64),
                    keys: BTreeSet::new(),
                },
            );
            (id, vec![])
        }))
    }

    async fn time_to_live(&self, lease: i64) -> Result<i64, StoreError> {
        Ok(self.with_state(|state| {
            let left = state.leases.get(&lease).map_or(-1, |l| {
                // As etcd answers: whole seconds, rounded down.
                l.deadline
                    .saturating_duration_since(Instant::now())
                    .as_secs() as i64
            });
            (left, vec![])
        }))
    }

    async fn revoke(&self, lease: i64) -> Result<(), StoreError> {
        self.with_state(|state| match state.end_lease(lease) {
            Some(keys) => (Ok(()), keys),
            None => (Err(StoreError::LeaseNotFound(lease)), vec![]),
        })
    }

    async fn keep_alive(&self, lease: i64) -> Result<Box<dyn KeepAlive>, StoreError> {
        let alive = self.with_state(|state| (state.leases.contains_key(&lease), vec![]));
        if !alive {
            return Err(StoreError::LeaseNotFound(lease));
        }
        Ok(Box::new(MemKeepAlive {
            store: self.clone(),
            lease,
        }))
    }

    async fn watch(&self, prefix: &str) -> Result<Box<dyn Watch>, StoreError> {
        Ok(Box::new(MemWatch {
            changes: self.changes.subscribe(),
            prefix: prefix.to_string(),
        }))
    }

    async fn reconnect(&self) -> Result<Arc<dyn Store>, StoreError> {
        Ok(Arc::new(self.clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn put_if_absent(key: &str, value: &str, lease: i64) -> Txn {
        Txn::new()
            .when([Compare::create_revision(key, 0)])
            .and_then([Op::put_leased(key, value, lease)])
    }

    /// A transaction writes at one revision; a compare on a key's revisions
    /// is the fencing token's check; a missing key's revisions are 0 and a
    /// value compare on it fails.
    #[tokio::test]
    async fn revisions_fence_writes() {
        let store = MemStore::new();
        let first = store.txn(put_if_absent("/k", "a", 0)).await.unwrap();
        assert!(first.succeeded());
        assert_eq!(first.revision(), 1);
        let again = store.txn(put_if_absent("/k", "b", 0)).await.unwrap();
        assert!(!again.succeeded(), "create-if-absent: only once");
        assert_eq!(again.revision(), 1, "a failed compare writes nothing");
        let two = Txn::new()
            .when([Compare::mod_revision("/k", 1)])
            .and_then([Op::put("/k", "c"), Op::put("/j", "d")]);
        assert_eq!(store.txn(two.clone()).await.unwrap().revision(), 2);
        let kv = store.get("/k").await.unwrap().unwrap();
        assert_eq!((kv.create_revision, kv.mod_revision), (1, 2));
        assert_eq!(store.get("/j").await.unwrap().unwrap().mod_revision, 2);
        assert!(
            !store.txn(two).await.unwrap().succeeded(),
            "a stale token is refused"
        );
        let missing = Txn::new()
            .when([
                Compare::mod_revision("/none", 0),
                Compare::lease("/none", 0),
            ])
            .and_then([Op::delete("/j")]);
        assert!(store.txn(missing).await.unwrap().succeeded());
        let value = Txn::new().when([Compare::value("/none", "")]);
        assert!(!store.txn(value).await.unwrap().succeeded());
        let dup = Txn::new().and_then([Op::put("/x", "1"), Op::delete("/x")]);
        assert!(store.txn(dup).await.is_err(), "one write per key");
    }

    /// A lease's keys go when it expires, by its TTL or at once; a put
    /// under a lease that is gone fails; a renewal after the expiry says 0.
    #[tokio::test(start_paused = true)]
    async fn leases_take_their_keys_with_them() {
        let store = MemStore::new();
        let lease = store.grant(2).await.unwrap();
        store
            .txn(put_if_absent("/owned", "n1", lease))
            .await
            .unwrap();
        store.put("/kept", b"x".to_vec()).await.unwrap();
        let mut keeper = store.keep_alive(lease).await.unwrap();
        tokio::time::sleep(Duration::from_millis(1500)).await;
        assert_eq!(keeper.renew().await.unwrap(), Some(2));
        tokio::time::sleep(Duration::from_millis(1500)).await;
        assert!(store.get("/owned").await.unwrap().is_some(), "renewed");
        tokio::time::sleep(Duration::from_millis(600)).await;
        assert!(store.get("/owned").await.unwrap().is_none(), "expired");
        assert!(store.get("/kept").await.unwrap().is_some());
        assert_eq!(keeper.renew().await.unwrap(), Some(0));
        assert!(store.time_to_live(lease).await.unwrap() <= 0);
        assert!(matches!(
            store.keep_alive(lease).await,
            Err(StoreError::LeaseNotFound(_))
        ));
        assert!(store
            .txn(put_if_absent("/late", "n1", lease))
            .await
            .is_err());

        let other = store.grant(2).await.unwrap();
        store
            .txn(put_if_absent("/owned", "n2", other))
            .await
            .unwrap();
        let mut watch = store.watch("/").await.unwrap();
        assert!(store.expire(other));
        assert!(watch.changed().await, "an expiry is a change");
        assert!(store.get("/owned").await.unwrap().is_none());
    }
}
