//! The jail of one VMM process: what the jailer (`vroom __jail`, see
//! [`jailer`]) is told to build ([`JailSpec`]), the jailer itself, the
//! cgroups that bound each VMM ([`cgroup`]) and the uids VMMs run as. The
//! QEMU driver plans a jail from a launch (`vroom_qemu::jail::plan`); the
//! cluster's guard finds the processes in a node's cgroups.
//!
//! **Architecture invariant:** this crate knows no engine, no QEMU command
//! line and no cluster: it runs what a [`JailSpec`] says, so both the driver
//! and the cluster's guard can use it without depending on each other.
//!
//! vroomd writes a [`JailSpec`] as JSON to `<run dir>/jail.json` (0600, in
//! the 0700 data dir; it is also the record of the uid the VMM runs as) and
//! runs `/proc/self/exe __jail <run dir>/jail.json`. The jailer, still root:
//! - opens every [`FdSource`] (listening unix sockets for QMP, the agent and
//!   the console, taps through `/dev/net/tun`, the disks) and hands them
//!   to QEMU as fds `3, 4, …` in order, so QEMU opens nothing by a host path;
//! - forks; the child calls `setsid`, joins its cgroup (see
//!   [`cgroup`]), unshares its mount, network and IPC namespaces
//!   (the taps were made in the host's, so they stay there and work through
//!   their fds; QEMU can reach no host service), mounts a tmpfs on
//!   `<run dir>/jail`, fills it, `pivot_root`s into it, remounts it
//!   read-only, caps file sizes (`RLIMIT_FSIZE` = [`Isolation::max_file_bytes`], with
//!   `SIGXFSZ` ignored, so QEMU's log and console file cannot fill the disk),
//!   drops every capability from the bounding set, sets its groups, gid and
//!   uid to the instance's own, sets `no_new_privs` and execs
//!   QEMU with `-sandbox on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny`;
//! - the parent writes `qemu.pid`, waits until QMP greets (or QEMU exits,
//!   whose stderr in `qemu.log` is then reported) and exits, so QEMU is no
//!   child of vroomd and outlives it.
//!
//! The jail's root, seen from QEMU (everything read-only, nothing writable):
//!
//! ```text
//! /usr                  bind of the host's /usr: QEMU, its libraries, /usr/share/qemu firmware
//! /lib /lib64 /bin ...  symlinks into usr/ as on the host (or binds where the host has dirs)
//! /etc/ld.so.cache      bind, so the loader finds the multiarch libraries
//! /dev/null /dev/urandom
//! /dev/kvm              bind, KVM only (reached through the supplementary group that owns it)
//! /vm/kernel /vm/initramfs
//! /vm/qemu              bind of QEMU itself when it lives outside /usr
//! ```
//!
//! The mounts exist only in QEMU's mount namespace: they vanish with it and
//! the host's mount table never sees them.
//!
//! **Identity.** Each VMM runs as uid = gid = [`UID_BASE`] + a hash of its
//! instance id (within [`UID_SPAN`]), moved on past ids that a running process
//! already uses, so one QEMU cannot signal or ptrace another, across daemons
//! with different data dirs too. Files stay root's: QEMU reaches its disks,
//! console and sockets only through the fds it was given.
//!
//! **Resources.** The cgroup caps memory (guest + guest/8 + 256 MiB) and
//! tasks (128 + vCPUs); see [`cgroup`].
//!
//! **Format.** `jail.json` is read only by the jailer of the same binary that
//! wrote it, just before; it is not versioned.

pub mod cgroup;
pub mod jailer;

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::cgroup::CgroupSpec;

/// The hidden subcommand of `vroom` that runs the jailer.
pub const JAIL_SUBCOMMAND: &str = "__jail";
/// Set in QEMU's environment: names its run dir, so a restarted daemon
/// recognises its VMMs by `/proc/PID/environ` (a reused pid lacks it).
pub const RUN_DIR_ENV: &str = "VROOM_RUN_DIR";
/// The first fd number handed to QEMU.
pub const FIRST_FD: i32 = 3;
/// The first uid (and gid) of the range VMMs run as.
pub const UID_BASE: u32 = 0x5000_0000;
/// How many uids the range holds.
pub const UID_SPAN: u32 = 1 << 24;

/// What the jailer does, in full.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JailSpec {
    pub run_dir: PathBuf,
    /// The program to exec, as seen after the jail is entered.
    pub program: PathBuf,
    /// QEMU's arguments (argv[1..]).
    pub args: Vec<String>,
    /// QEMU's environment beside [`RUN_DIR_ENV`] (a QEMU in a private
    /// prefix is told its module dir); absent from older specs.
    #[serde(default)]
    pub env: Vec<(String, String)>,
    /// Opened by the jailer and handed over as fds `FIRST_FD + index`.
    pub fds: Vec<FdSource>,
    /// QEMU's stdout and stderr (truncated at each launch).
    pub log: PathBuf,
    /// The QMP socket whose greeting means QEMU is up.
    pub qmp_socket: PathBuf,
    pub pid_file: PathBuf,
    pub ready_timeout_secs: u64,
    /// `None` runs QEMU unjailed (`vroom daemon --no-jail`).
    pub isolation: Option<Isolation>,
}

/// The jail proper.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Isolation {
    pub uid: u32,
    pub gid: u32,
    /// Supplementary groups (the group of /dev/kvm for KVM, none otherwise).
    pub groups: Vec<u32>,
    /// An empty host dir the jail's tmpfs is mounted on (in QEMU's namespace only).
    pub root: PathBuf,
    pub entries: Vec<JailEntry>,
    pub cgroup: CgroupSpec,
    /// RLIMIT_FSIZE, with SIGXFSZ ignored: no write at or past this offset
    /// succeeds, which bounds QEMU's own log (`qemu.log`) while leaving the
    /// largest config disk whole.
    pub max_file_bytes: u64,
}

/// One thing in the jail's root; paths are absolute inside the jail.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum JailEntry {
    Symlink {
        path: PathBuf,
        target: PathBuf,
    },
    /// A read-only bind mount of a host file, dir or device node.
    Bind {
        source: PathBuf,
        path: PathBuf,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum FileAccess {
    Read,
    ReadWrite,
}

/// An fd the jailer opens as root for QEMU.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum FdSource {
    /// A listening unix socket bound at `path` (a stale one is replaced).
    Listen {
        path: PathBuf,
    },
    /// A new, non-persistent tap (IFF_TAP | IFF_NO_PI | IFF_VNET_HDR): it
    /// vanishes with the last fd, that is with QEMU.
    Tap {
        name: String,
    },
    File {
        path: PathBuf,
        access: FileAccess,
    },
}

/// What the planner needs to know about the host.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct HostLayout {
    /// Top-level dirs next to /usr (`lib`, `bin`, ...) that are symlinks, with their targets.
    pub symlinks: Vec<(String, PathBuf)>,
    /// Top-level dirs next to /usr that are real directories (an unmerged /usr).
    pub dirs: Vec<String>,
    pub ld_cache: bool,
    /// The group owning /dev/kvm.
    pub kvm_gid: Option<u32>,
}

const TOP_LEVEL: [&str; 6] = ["bin", "sbin", "lib", "lib32", "lib64", "libx32"];

impl HostLayout {
    pub fn probe() -> HostLayout {
        use std::os::unix::fs::MetadataExt;
        let mut layout = HostLayout {
            ld_cache: Path::new("/etc/ld.so.cache").is_file(),
            kvm_gid: std::fs::metadata("/dev/kvm").ok().map(|m| m.gid()),
            ..HostLayout::default()
        };
        for name in TOP_LEVEL {
            let path = Path::new("/").join(name);
            match std::fs::symlink_metadata(&path) {
                Ok(m) if m.file_type().is_symlink() => {
                    if let Ok(target) = std::fs::read_link(&path) {
                        layout.symlinks.push((name.to_string(), target));
                    }
                }
                Ok(m) if m.is_dir() => layout.dirs.push(name.to_string()),
                _ => {}
            }
        }
        layout
    }
}

/// The uid a VMM of `instance_id` prefers: a stable hash into the range.
pub fn preferred_uid(instance_id: &str) -> u32 {
    // FNV-1a: stable across builds, unlike std's hasher.
    let hash = instance_id.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    });
    UID_BASE + (hash % u64::from(UID_SPAN)) as u32
}

/// The first uid from `preferred` on (wrapping within the range) that no
/// uid in `taken` uses.
pub fn pick_uid(preferred: u32, taken: &[u32]) -> u32 {
    let mut uid = preferred;
    while taken.contains(&uid) {
        uid = UID_BASE + (uid - UID_BASE + 1) % UID_SPAN;
    }
    uid
}

/// The real uids of every running process in the VMM range.
pub fn uids_in_use() -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return vec![];
    };
    entries
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().parse::<u32>().is_ok())
        .filter_map(|e| std::fs::read_to_string(e.path().join("status")).ok())
        .filter_map(|status| status_uid(&status))
        .filter(|uid| (UID_BASE..UID_BASE + UID_SPAN).contains(uid))
        .collect()
}

/// The real uid on the `Uid:` line of `/proc/PID/status`.
pub fn status_uid(status: &str) -> Option<u32> {
    status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uids_are_stable_in_range_and_skip_taken_ones() {
        let a = preferred_uid("0123456789abcdef");
        assert_eq!(a, preferred_uid("0123456789abcdef"));
        assert_ne!(a, preferred_uid("0123456789abcdee"));
        assert!((UID_BASE..UID_BASE + UID_SPAN).contains(&a));
        assert_eq!(pick_uid(a, &[]), a);
        assert_eq!(pick_uid(a, &[a, a + 1]), a + 2);
        let last = UID_BASE + UID_SPAN - 1;
        assert_eq!(pick_uid(last, &[last]), UID_BASE, "wraps within the range");
        assert_eq!(
            status_uid("Name:\tqemu\nUid:\t1342177281\t1342177281\t1342177281\t1342177281\n"),
            Some(1_342_177_281)
        );
        assert_eq!(status_uid("Name: x\n"), None);
    }
}
