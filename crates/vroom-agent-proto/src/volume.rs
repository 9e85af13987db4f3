//! Files on the config volume ("floppy"), format version [`VOLUME_VERSION`].
//!
//! The volume is a FAT filesystem with two JSON files in its root:
//! - [`CONFIG_FILE`]: the appliance's config values. The guest owns it while
//!   the volume is mounted and replaces it atomically (write a temp file,
//!   fsync, rename, fsync the directory); the host writes it only while the
//!   VM is not running.
//! - [`INSTANCE_FILE`]: the identity vroom assigns: hostname and NIC
//!   addresses. Only the host writes it, only while the VM is not running.
//!
//! Readers reject a `version` they do not know.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

pub const VOLUME_VERSION: u32 = 1;
pub const CONFIG_FILE: &str = "config.json";
pub const INSTANCE_FILE: &str = "instance.json";
/// The FAT volume label, so a guest can tell the config volume apart.
pub const VOLUME_LABEL: &str = "VROOMCFG";
/// The virtio-blk serial numbers by which the guest finds its disks.
pub const ROOT_DISK_SERIAL: &str = "vroom-root";
pub const CONFIG_DISK_SERIAL: &str = "vroom-config";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConfigFile {
    pub version: u32,
    pub values: BTreeMap<String, String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstanceFile {
    pub version: u32,
    pub hostname: String,
    pub nics: Vec<NicConfig>,
    /// 32 lower-case hex digits, unique per instance (`/etc/machine-id`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub machine_id: Option<String>,
    /// Data volumes to check and mount before the services start.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub volumes: Vec<DataVolume>,
}

/// The virtio-blk serial of the data volume at `index` in
/// [`InstanceFile::volumes`] (virtio-blk serials hold at most 20 bytes).
pub fn data_disk_serial(index: usize) -> String {
    format!("vroom-vol-{index}")
}

/// One data volume as the guest sees it: found by its disk serial
/// ([`data_disk_serial`]), checked, and mounted at `path` with `nodev`,
/// `nosuid`, and `noexec` unless `exec`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DataVolume {
    pub serial: String,
    /// The volume's name on the host, for messages.
    pub name: String,
    pub path: String,
    /// The filesystem on it, e.g. `ext4`.
    pub fs: String,
    #[serde(default)]
    pub read_only: bool,
    #[serde(default)]
    pub exec: bool,
}

/// One NIC, matched in the guest by its MAC address.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NicConfig {
    pub mac: String,
    pub role: Option<String>,
    /// `a.b.c.d`; absent on an L2 port, which is only brought up.
    pub address: Option<String>,
    pub prefix_len: u8,
    pub gateway: Option<String>,
}
