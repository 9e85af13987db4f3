//! The state store on redb, the embedded database vroomd keeps in
//! `<data dir>/state.redb`: the implementation of the engine's
//! [`StateStore`] seam.
//!
//! Records are JSON values in redb tables keyed by name: instances, networks,
//! and each instance's config history (a [`ConfigLog`](vroom_types::ConfigLog)),
//! which goes away in the same transaction as its instance. redb commits are
//! durable (fsync) before `put` returns, so an acknowledged change survives a
//! crash of vroomd.
//!
//! **Format.** One table per kind (`instances`, `networks`, `config_logs`,
//! `splices`, `mirrors`, `rooms`, `volumes`), each mapping a key to the
//! record's JSON. A table a newer vroom adds is created when the store opens.

use std::path::{Path, PathBuf};
use std::time::Duration;

use redb::{Database, ReadableTable, TableDefinition};
use vroom_core::store::{InstanceRecord, StateStore, StateStoreError};
use vroom_types::{ConfigLog, Event, Mirror, Network, Room, Splice, Volume};

const INSTANCES: TableDefinition<&str, &[u8]> = TableDefinition::new("instances");
const NETWORKS: TableDefinition<&str, &[u8]> = TableDefinition::new("networks");
const CONFIG_LOGS: TableDefinition<&str, &[u8]> = TableDefinition::new("config_logs");
const SPLICES: TableDefinition<&str, &[u8]> = TableDefinition::new("splices");
const MIRRORS: TableDefinition<&str, &[u8]> = TableDefinition::new("mirrors");
const ROOMS: TableDefinition<&str, &[u8]> = TableDefinition::new("rooms");
const VOLUMES: TableDefinition<&str, &[u8]> = TableDefinition::new("volumes");
const SERVICES: TableDefinition<&str, &[u8]> = TableDefinition::new("services");
/// Events by number: the last few thousand, for history after a restart.
const EVENTS: TableDefinition<u64, &[u8]> = TableDefinition::new("events");

pub struct RedbStateStore {
    db: Database,
    path: PathBuf,
}

impl RedbStateStore {
    /// Opens or creates the store. A second daemon on the same data dir is
    /// refused by redb's file lock; a crashed daemon's lock is retried briefly.
    pub fn open(path: &Path) -> Result<Self, StateStoreError> {
        let err = |reason: String| StateStoreError {
            path: path.to_path_buf(),
            reason,
        };
        let mut last = String::new();
        for _ in 0..20 {
            match Database::create(path) {
                Ok(db) => {
                    let txn = db.begin_write().map_err(|e| err(e.to_string()))?;
                    txn.open_table(INSTANCES).map_err(|e| err(e.to_string()))?;
                    txn.open_table(NETWORKS).map_err(|e| err(e.to_string()))?;
                    txn.open_table(EVENTS).map_err(|e| err(e.to_string()))?;
                    for table in [CONFIG_LOGS, SPLICES, MIRRORS, ROOMS, VOLUMES, SERVICES] {
                        txn.open_table(table).map_err(|e| err(e.to_string()))?;
                    }
                    txn.commit().map_err(|e| err(e.to_string()))?;
                    return Ok(RedbStateStore {
                        db,
                        path: path.to_path_buf(),
                    });
                }
                Err(e) => last = e.to_string(),
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Err(err(last))
    }

    fn err(&self, e: impl std::fmt::Display) -> StateStoreError {
        StateStoreError {
            path: self.path.clone(),
            reason: e.to_string(),
        }
    }

    fn put(
        &self,
        table: TableDefinition<&str, &[u8]>,
        key: &str,
        value: &[u8],
    ) -> Result<(), StateStoreError> {
        let txn = self.db.begin_write().map_err(|e| self.err(e))?;
        txn.open_table(table)
            .map_err(|e| self.err(e))?
            .insert(key, value)
            .map_err(|e| self.err(e))?;
        txn.commit().map_err(|e| self.err(e))
    }

    fn delete(
        &self,
        table: TableDefinition<&str, &[u8]>,
        key: &str,
    ) -> Result<(), StateStoreError> {
        let txn = self.db.begin_write().map_err(|e| self.err(e))?;
        txn.open_table(table)
            .map_err(|e| self.err(e))?
            .remove(key)
            .map_err(|e| self.err(e))?;
        txn.commit().map_err(|e| self.err(e))
    }

    fn all<T: serde::de::DeserializeOwned>(
        &self,
        table: TableDefinition<&str, &[u8]>,
    ) -> Result<Vec<T>, StateStoreError> {
        let txn = self.db.begin_read().map_err(|e| self.err(e))?;
        let table = txn.open_table(table).map_err(|e| self.err(e))?;
        let mut out = Vec::new();
        for entry in table.iter().map_err(|e| self.err(e))? {
            let (key, value) = entry.map_err(|e| self.err(e))?;
            let record = serde_json::from_slice(value.value())
                .map_err(|e| self.err(format!("record {} is corrupt: {e}", key.value())))?;
            out.push(record);
        }
        Ok(out)
    }
}

impl StateStore for RedbStateStore {
    fn put_instance(&self, record: &InstanceRecord) -> Result<(), StateStoreError> {
        let bytes = serde_json::to_vec(record).map_err(|e| self.err(e))?;
        self.put(INSTANCES, record.instance.spec.name.as_str(), &bytes)
    }

    fn delete_instance(&self, name: &str) -> Result<(), StateStoreError> {
        let txn = self.db.begin_write().map_err(|e| self.err(e))?;
        for table in [INSTANCES, CONFIG_LOGS] {
            txn.open_table(table)
                .map_err(|e| self.err(e))?
                .remove(name)
                .map_err(|e| self.err(e))?;
        }
        txn.commit().map_err(|e| self.err(e))
    }

    fn instances(&self) -> Result<Vec<InstanceRecord>, StateStoreError> {
        self.all(INSTANCES)
    }

    fn put_network(&self, network: &Network) -> Result<(), StateStoreError> {
        let bytes = serde_json::to_vec(network).map_err(|e| self.err(e))?;
        self.put(NETWORKS, network.name.as_str(), &bytes)
    }

    fn delete_network(&self, name: &str) -> Result<(), StateStoreError> {
        self.delete(NETWORKS, name)
    }

    fn networks(&self) -> Result<Vec<Network>, StateStoreError> {
        self.all(NETWORKS)
    }

    fn config_log(&self, name: &str) -> Result<Option<ConfigLog>, StateStoreError> {
        let txn = self.db.begin_read().map_err(|e| self.err(e))?;
        let table = txn.open_table(CONFIG_LOGS).map_err(|e| self.err(e))?;
        let Some(value) = table.get(name).map_err(|e| self.err(e))? else {
            return Ok(None);
        };
        serde_json::from_slice(value.value())
            .map(Some)
            .map_err(|e| self.err(format!("config history of {name} is corrupt: {e}")))
    }

    fn put_config_log(&self, name: &str, log: &ConfigLog) -> Result<(), StateStoreError> {
        let bytes = serde_json::to_vec(log).map_err(|e| self.err(e))?;
        self.put(CONFIG_LOGS, name, &bytes)
    }

    fn commit_config(
        &self,
        record: &InstanceRecord,
        log: &ConfigLog,
    ) -> Result<(), StateStoreError> {
        let name = record.instance.spec.name.as_str();
        let record_bytes = serde_json::to_vec(record).map_err(|e| self.err(e))?;
        let log_bytes = serde_json::to_vec(log).map_err(|e| self.err(e))?;
        let txn = self.db.begin_write().map_err(|e| self.err(e))?;
        for (table, bytes) in [(INSTANCES, &record_bytes), (CONFIG_LOGS, &log_bytes)] {
            txn.open_table(table)
                .map_err(|e| self.err(e))?
                .insert(name, bytes.as_slice())
                .map_err(|e| self.err(e))?;
        }
        txn.commit().map_err(|e| self.err(e))
    }

    fn put_splice(&self, splice: &Splice) -> Result<(), StateStoreError> {
        let bytes = serde_json::to_vec(splice).map_err(|e| self.err(e))?;
        self.put(SPLICES, splice.appliance.as_str(), &bytes)
    }

    fn delete_splice(&self, appliance: &str) -> Result<(), StateStoreError> {
        self.delete(SPLICES, appliance)
    }

    fn splices(&self) -> Result<Vec<Splice>, StateStoreError> {
        self.all(SPLICES)
    }

    fn put_mirror(&self, mirror: &Mirror) -> Result<(), StateStoreError> {
        let bytes = serde_json::to_vec(mirror).map_err(|e| self.err(e))?;
        self.put(MIRRORS, &mirror.id, &bytes)
    }

    fn delete_mirror(&self, id: &str) -> Result<(), StateStoreError> {
        self.delete(MIRRORS, id)
    }

    fn mirrors(&self) -> Result<Vec<Mirror>, StateStoreError> {
        self.all(MIRRORS)
    }

    fn put_room(&self, room: &Room) -> Result<(), StateStoreError> {
        let bytes = serde_json::to_vec(room).map_err(|e| self.err(e))?;
        self.put(ROOMS, room.name.as_str(), &bytes)
    }

    fn delete_room(&self, name: &str) -> Result<(), StateStoreError> {
        self.delete(ROOMS, name)
    }

    fn rooms(&self) -> Result<Vec<Room>, StateStoreError> {
        self.all(ROOMS)
    }

    fn put_service(&self, service: &vroom_types::ServiceRecord) -> Result<(), StateStoreError> {
        let bytes = serde_json::to_vec(service).map_err(|e| self.err(e))?;
        self.put(SERVICES, service.spec.name.as_str(), &bytes)
    }

    fn delete_service(&self, name: &str) -> Result<(), StateStoreError> {
        self.delete(SERVICES, name)
    }

    fn services(&self) -> Result<Vec<vroom_types::ServiceRecord>, StateStoreError> {
        self.all(SERVICES)
    }

    fn put_volume(&self, volume: &Volume) -> Result<(), StateStoreError> {
        let bytes = serde_json::to_vec(volume).map_err(|e| self.err(e))?;
        self.put(VOLUMES, volume.name.as_str(), &bytes)
    }

    fn delete_volume(&self, name: &str) -> Result<(), StateStoreError> {
        self.delete(VOLUMES, name)
    }

    fn volumes(&self) -> Result<Vec<Volume>, StateStoreError> {
        self.all(VOLUMES)
    }

    fn append_event(&self, event: &Event, keep: usize) -> Result<(), StateStoreError> {
        let bytes = serde_json::to_vec(event).map_err(|e| self.err(e))?;
        let txn = self.db.begin_write().map_err(|e| self.err(e))?;
        {
            let mut table = txn.open_table(EVENTS).map_err(|e| self.err(e))?;
            table
                .insert(event.seq, bytes.as_slice())
                .map_err(|e| self.err(e))?;
            let forget_below = event.seq.saturating_sub(keep as u64 - 1);
            if forget_below > 0 {
                table
                    .retain_in(..forget_below, |_, _| false)
                    .map_err(|e| self.err(e))?;
            }
        }
        txn.commit().map_err(|e| self.err(e))
    }

    fn events(&self) -> Result<Vec<Event>, StateStoreError> {
        let txn = self.db.begin_read().map_err(|e| self.err(e))?;
        let table = txn.open_table(EVENTS).map_err(|e| self.err(e))?;
        let mut out = Vec::new();
        for entry in table.iter().map_err(|e| self.err(e))? {
            let (seq, value) = entry.map_err(|e| self.err(e))?;
            match serde_json::from_slice(value.value()) {
                Ok(event) => out.push(event),
                // History is a courtesy: one unreadable event (from a newer
                // vroom, say) must not keep the daemon from starting.
                Err(e) => {
                    tracing::warn!(seq = seq.value(), error = %e, "skipping an unreadable event")
                }
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vroom_types::Instance;
    use vroom_types::Name;

    fn record(name: &str, greeting: &str) -> InstanceRecord {
        let instance: Instance = serde_json::from_value(serde_json::json!({
            "id": "0123456789abcdef",
            "spec": {
                "name": name, "image": "hello", "mem_mib": null, "cpus": 1,
                "nics": [], "accel": "auto", "config_volume_kib": null
            },
            "image_id": "abc", "image_name": "hello", "mem_mib": 128, "created_at": 1,
            "desired": "running", "nics": [],
            "status": {
                "state": "stopped", "pid": null, "accel": null, "started_at": null,
                "boot_ms": null, "restarts": 0, "last_error": null
            },
            "config": { "greeting": greeting }
        }))
        .unwrap();
        InstanceRecord {
            instance,
            process: None,
            ready_timeout_secs: 120,
            ever_ready: false,
            seed_config: None,
            cluster: false,
            removing: false,
            wipe: false,
            cloning_from: None,
        }
    }

    #[test]
    fn config_history_commits_with_its_record_and_goes_with_the_instance() {
        use vroom_types::ConfigOrigin;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.redb");
        let values = |g: &str| -> vroom_types::ConfigValues {
            [("greeting".to_string(), g.to_string())].into()
        };
        {
            let store = RedbStateStore::open(&path).unwrap();
            store.put_instance(&record("web", "hi")).unwrap();
            assert_eq!(store.config_log("web").unwrap(), None);
            let mut log = ConfigLog::start(values("hi"), 1);
            let v2 = log
                .propose(values("ho"), ConfigOrigin::Set, None, 2)
                .unwrap();
            log.pending = Some(v2.clone());
            store.put_config_log("web", &log).unwrap();
            log.commit(v2);
            store.commit_config(&record("web", "ho"), &log).unwrap();
        }
        // Reopened, as after a daemon kill: record and history agree.
        let store = RedbStateStore::open(&path).unwrap();
        let log = store.config_log("web").unwrap().unwrap();
        assert_eq!(log.pending, None);
        assert_eq!(log.current().unwrap().version, 2);
        assert_eq!(
            store.instances().unwrap()[0].instance.config,
            log.current().unwrap().values
        );
        store.delete_instance("web").unwrap();
        assert_eq!(
            store.config_log("web").unwrap(),
            None,
            "gone with the instance"
        );
        assert!(store.instances().unwrap().is_empty());
    }

    #[test]
    fn networks_roundtrip_and_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.redb");
        let net = Network {
            name: Name::new("lan").unwrap(),
            subnet: "10.1.0.0/24".parse().unwrap(),
            nat: false,
            isolated: false,
            mirror: false,
            allow_host: vec![],
            bridge: "vrb1".into(),
            gateway: "10.1.0.1".parse().unwrap(),
            created_at: 1,
        };
        {
            let store = RedbStateStore::open(&path).unwrap();
            store.put_network(&net).unwrap();
        }
        let store = RedbStateStore::open(&path).unwrap();
        assert_eq!(store.networks().unwrap(), vec![net]);
        store.delete_network("lan").unwrap();
        assert!(store.networks().unwrap().is_empty());
    }
}
