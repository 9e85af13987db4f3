//! The state store seam: what the engine persists and how it asks for it.
//! The embedded implementation on redb is the `vroom-store` crate's.
//!
//! An implementation makes every change durable before it returns, so an
//! acknowledged change survives a crash of vroomd, and removes an
//! instance's config history (a [`ConfigLog`]) together with the instance.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use vroom_types::{ConfigLog, Instance, Mirror, Network, Room, Splice, Volume};

use crate::driver::VmProcess;

/// What vroom stores per instance: the API view plus what only the daemon needs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstanceRecord {
    pub instance: Instance,
    /// The VMM process, kept so that a restarted daemon re-adopts it.
    pub process: Option<VmProcess>,
    pub ready_timeout_secs: u64,
    /// The guest has reported ready at least once: a later death during boot
    /// is restarted rather than failed.
    #[serde(default)]
    pub ever_ready: bool,
    /// The config an ephemeral instance returns to at every start.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed_config: Option<vroom_types::ConfigValues>,
    /// Created by the cluster layer (its desired state is in etcd).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub cluster: bool,
    /// An `rm` was acknowledged: set before the VM is killed, so a daemon
    /// killed inside the removal finishes it at its next start.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub removing: bool,
    /// The removal wipes the instance's files (an `rm --archive` whose
    /// archive is written): a daemon killed inside it finishes it with the
    /// wipe, never with a plain unlink.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub wipe: bool,
    /// The snapshot this instance is a clone of, until its VM first runs
    /// from it: a daemon killed before then fails the clone visibly instead
    /// of booting it as if it were one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cloning_from: Option<String>,
}

#[derive(Debug, thiserror::Error)]
#[error("state store {path}: {reason}")]
pub struct StateStoreError {
    pub path: PathBuf,
    pub reason: String,
}

pub trait StateStore: Send + Sync {
    fn put_instance(&self, record: &InstanceRecord) -> Result<(), StateStoreError>;
    fn delete_instance(&self, name: &str) -> Result<(), StateStoreError>;
    fn instances(&self) -> Result<Vec<InstanceRecord>, StateStoreError>;
    fn put_network(&self, network: &Network) -> Result<(), StateStoreError>;
    fn delete_network(&self, name: &str) -> Result<(), StateStoreError>;
    fn networks(&self) -> Result<Vec<Network>, StateStoreError>;

    /// An instance's config history; `None` before its first change.
    fn config_log(&self, name: &str) -> Result<Option<ConfigLog>, StateStoreError>;
    /// Saves a history, e.g. with a change about to be sent to the guest.
    fn put_config_log(&self, name: &str, log: &ConfigLog) -> Result<(), StateStoreError>;
    /// Saves an accepted change: the record (with its new config) and the
    /// history, atomically. `delete_instance` removes the history too.
    fn commit_config(
        &self,
        record: &InstanceRecord,
        log: &ConfigLog,
    ) -> Result<(), StateStoreError>;

    /// Splices, keyed by their appliance.
    fn put_splice(&self, splice: &Splice) -> Result<(), StateStoreError>;
    fn delete_splice(&self, appliance: &str) -> Result<(), StateStoreError>;
    fn splices(&self) -> Result<Vec<Splice>, StateStoreError>;
    /// Mirrors, keyed by their id.
    fn put_mirror(&self, mirror: &Mirror) -> Result<(), StateStoreError>;
    fn delete_mirror(&self, id: &str) -> Result<(), StateStoreError>;
    fn mirrors(&self) -> Result<Vec<Mirror>, StateStoreError>;
    /// Rooms, keyed by name.
    fn put_room(&self, room: &Room) -> Result<(), StateStoreError>;
    fn delete_room(&self, name: &str) -> Result<(), StateStoreError>;
    fn rooms(&self) -> Result<Vec<Room>, StateStoreError>;
    /// Data volumes, keyed by name.
    fn put_volume(&self, volume: &Volume) -> Result<(), StateStoreError>;
    fn delete_volume(&self, name: &str) -> Result<(), StateStoreError>;
    fn volumes(&self) -> Result<Vec<Volume>, StateStoreError>;
    /// Services, keyed by name.
    fn put_service(&self, service: &vroom_types::ServiceRecord) -> Result<(), StateStoreError>;
    fn delete_service(&self, name: &str) -> Result<(), StateStoreError>;
    fn services(&self) -> Result<Vec<vroom_types::ServiceRecord>, StateStoreError>;

    /// Saves an event and forgets all but the last `keep`.
    fn append_event(&self, event: &vroom_types::Event, keep: usize) -> Result<(), StateStoreError>;
    /// The events kept, oldest first.
    fn events(&self) -> Result<Vec<vroom_types::Event>, StateStoreError>;
}
