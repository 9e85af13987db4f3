//! The jail of one QEMU process: what the jailer (`vroom __jail`, see
//! [`crate::jailer`]) is told to build, and the pure planning of it from a
//! [`LaunchSpec`].
//!
//! vroomd writes a [`JailSpec`] as JSON to `<run dir>/jail.json` (0600, in
//! the 0700 data dir; it is also the record of the uid the VMM runs as) and
//! runs `/proc/self/exe __jail <run dir>/jail.json`. The jailer, still root:
//! - opens every [`FdSource`] (listening unix sockets for QMP, the agent and
//!   the console, taps through `/dev/net/tun`, the disks) and hands them
//!   to QEMU as fds `3, 4, …` in order, so QEMU opens nothing by a host path;
//! - forks; the child calls `setsid`, joins its cgroup (see
//!   [`crate::cgroup`]), unshares its mount, network and IPC namespaces
//!   (the taps were made in the host's, so they stay there and work through
//!   their fds; QEMU can reach no host service), mounts a tmpfs on
//!   `<run dir>/jail`, fills it, `pivot_root`s into it, remounts it
//!   read-only, caps file sizes (`RLIMIT_FSIZE` = [`MAX_FILE_BYTES`], with
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
//! tasks (128 + vCPUs); see [`crate::cgroup`].
//!
//! **Format.** `jail.json` is read only by the jailer of the same binary that
//! wrote it, just before; it is not versioned.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use vroom_core::driver::LaunchSpec;
use vroom_types::Accel;

use crate::cgroup::CgroupSpec;
use crate::cmdline::{self, BootFiles, VmmFds};

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
/// The largest file offset a jailed QEMU may write: the largest config
/// volume plus 64 MiB.
pub const MAX_FILE_BYTES: u64 = vroom_types::limits::CONFIG_VOLUME_KIB.max * 1024 + (64 << 20);
/// How long the jailer waits for QMP's greeting.
pub const READY_TIMEOUT_SECS: u64 = 60;

/// What the jailer does, in full.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JailSpec {
    pub run_dir: PathBuf,
    /// The program to exec, as seen after the jail is entered.
    pub program: PathBuf,
    /// QEMU's arguments (argv[1..]).
    pub args: Vec<String>,
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

/// The jail's place for what vroom puts there.
const VM_DIR: &str = "/vm";

/// Plans the launch of one VM: its fds, QEMU's arguments and, when
/// `isolation` names the uid and gid, its jail.
pub fn plan(
    spec: &LaunchSpec,
    qemu: &Path,
    isolation: Option<(u32, u32)>,
    host: &HostLayout,
    tsc_khz: Option<u64>,
) -> JailSpec {
    let qmp_socket = spec.run_dir.join("qmp.sock");
    let mut fds: Vec<FdSource> = vec![];
    let mut add = |source: FdSource| {
        fds.push(source);
        FIRST_FD + fds.len() as i32 - 1
    };
    let vmm_fds = VmmFds {
        qmp: add(FdSource::Listen {
            path: qmp_socket.clone(),
        }),
        agent: add(FdSource::Listen {
            path: spec.agent_socket.clone(),
        }),
        console: add(FdSource::Listen {
            path: spec.console_socket.clone(),
        }),
        root_disk: add(FdSource::File {
            path: spec.root_disk.clone(),
            access: FileAccess::Read,
        }),
        // QEMU probes a drive read-only before it opens it read-write; an
        // fd set answers each open with the fd of the same access mode.
        config_disk: [
            add(FdSource::File {
                path: spec.config_disk.clone(),
                access: FileAccess::ReadWrite,
            }),
            add(FdSource::File {
                path: spec.config_disk.clone(),
                access: FileAccess::Read,
            }),
        ],
        taps: spec
            .nics
            .iter()
            .map(|nic| {
                add(FdSource::Tap {
                    name: nic.tap.clone(),
                })
            })
            .collect(),
    };
    let Some((uid, gid)) = isolation else {
        let boot = BootFiles {
            kernel: spec.kernel.clone(),
            initramfs: spec.initramfs.clone(),
        };
        return JailSpec {
            run_dir: spec.run_dir.clone(),
            program: qemu.to_path_buf(),
            args: cmdline::qemu_args(spec, &boot, &vmm_fds, false, tsc_khz),
            fds,
            log: spec.run_dir.join("qemu.log"),
            qmp_socket,
            pid_file: spec.run_dir.join("qemu.pid"),
            ready_timeout_secs: READY_TIMEOUT_SECS,
            isolation: None,
        };
    };
    let vm = Path::new(VM_DIR);
    let boot = BootFiles {
        kernel: vm.join("kernel"),
        initramfs: vm.join("initramfs"),
    };
    let bind = |source: &Path, path: &Path| JailEntry::Bind {
        source: source.to_path_buf(),
        path: path.to_path_buf(),
    };
    let mut entries = vec![bind(Path::new("/usr"), Path::new("/usr"))];
    for (name, target) in &host.symlinks {
        entries.push(JailEntry::Symlink {
            path: Path::new("/").join(name),
            target: target.clone(),
        });
    }
    for name in &host.dirs {
        let path = Path::new("/").join(name);
        entries.push(bind(&path, &path));
    }
    if host.ld_cache {
        let cache = Path::new("/etc/ld.so.cache");
        entries.push(bind(cache, cache));
    }
    for dev in ["/dev/null", "/dev/urandom"] {
        entries.push(bind(Path::new(dev), Path::new(dev)));
    }
    let mut groups = vec![];
    if spec.accel == Accel::Kvm {
        entries.push(bind(Path::new("/dev/kvm"), Path::new("/dev/kvm")));
        groups.extend(host.kvm_gid.filter(|g| *g != 0));
    }
    entries.push(bind(&spec.kernel, &boot.kernel));
    entries.push(bind(&spec.initramfs, &boot.initramfs));
    let program = if qemu.starts_with("/usr/") {
        qemu.to_path_buf()
    } else {
        let inside = vm.join("qemu");
        entries.push(bind(qemu, &inside));
        inside
    };
    JailSpec {
        run_dir: spec.run_dir.clone(),
        program,
        args: cmdline::qemu_args(spec, &boot, &vmm_fds, true, tsc_khz),
        fds,
        log: spec.run_dir.join("qemu.log"),
        qmp_socket,
        pid_file: spec.run_dir.join("qemu.pid"),
        ready_timeout_secs: READY_TIMEOUT_SECS,
        isolation: Some(Isolation {
            uid,
            gid,
            groups,
            root: spec.run_dir.join("jail"),
            entries,
            cgroup: CgroupSpec::for_vm(&spec.run_dir, spec.mem_mib, spec.cpus),
            max_file_bytes: MAX_FILE_BYTES,
        }),
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
    use crate::cmdline::tests::value_after;
    use vroom_core::driver::LaunchNic;

    fn spec(accel: Accel) -> LaunchSpec {
        LaunchSpec {
            instance_id: "ab12".into(),
            name: "web".into(),
            run_dir: "/data/instances/ab12".into(),
            kernel: "/cache/vmlinuz".into(),
            initramfs: "/images/x/initramfs.cpio".into(),
            cmdline: String::new(),
            acpi: true,
            tcg_tb_mib: None,
            mem_mib: 128,
            cpus: 1,
            accel,
            root_disk: "/images/x/rootfs.erofs".into(),
            config_disk: "/data/instances/ab12/config.img".into(),
            nics: vec![LaunchNic {
                tap: "vrt1".into(),
                mac: "52:54:00:00:00:01".into(),
            }],
            agent_socket: "/data/instances/ab12/agent.sock".into(),
            console_socket: "/data/instances/ab12/console.sock".into(),
            incoming: false,
        }
    }

    fn merged_usr() -> HostLayout {
        HostLayout {
            symlinks: vec![
                ("bin".into(), "usr/bin".into()),
                ("lib".into(), "usr/lib".into()),
                ("lib64".into(), "usr/lib64".into()),
            ],
            dirs: vec![],
            ld_cache: true,
            kvm_gid: Some(994),
        }
    }

    #[test]
    fn fds_are_numbered_in_order_from_three() {
        let jail = plan(
            &spec(Accel::Tcg),
            Path::new("/usr/bin/qemu-system-x86_64"),
            Some((7, 7)),
            &merged_usr(),
            None,
        );
        let dir = Path::new("/data/instances/ab12");
        assert_eq!(
            jail.fds,
            vec![
                FdSource::Listen {
                    path: dir.join("qmp.sock")
                },
                FdSource::Listen {
                    path: dir.join("agent.sock")
                },
                FdSource::Listen {
                    path: dir.join("console.sock")
                },
                FdSource::File {
                    path: "/images/x/rootfs.erofs".into(),
                    access: FileAccess::Read
                },
                FdSource::File {
                    path: dir.join("config.img"),
                    access: FileAccess::ReadWrite
                },
                FdSource::File {
                    path: dir.join("config.img"),
                    access: FileAccess::Read
                },
                FdSource::Tap {
                    name: "vrt1".into()
                },
            ]
        );
        let args = &jail.args;
        assert_eq!(
            value_after(args, "-chardev"),
            vec![
                "socket,id=console,fd=5,server=on,wait=off",
                "socket,id=agent,fd=4,server=on,wait=off",
                "socket,id=qmp,fd=3,server=on,wait=off",
            ]
        );
        assert_eq!(
            value_after(args, "-add-fd"),
            vec!["fd=6,set=1", "fd=7,set=2", "fd=8,set=2"]
        );
        assert_eq!(value_after(args, "-netdev"), vec!["tap,id=net0,fd=9"]);
    }

    #[test]
    fn jailed_tcg_layout_and_sandbox() {
        let jail = plan(
            &spec(Accel::Tcg),
            Path::new("/usr/bin/qemu-system-x86_64"),
            Some((0x5000_0001, 0x5000_0001)),
            &merged_usr(),
            Some(2_000_000),
        );
        assert_eq!(jail.program, Path::new("/usr/bin/qemu-system-x86_64"));
        let iso = jail.isolation.as_ref().unwrap();
        assert_eq!((iso.uid, iso.gid), (0x5000_0001, 0x5000_0001));
        assert!(iso.groups.is_empty(), "no supplementary group without KVM");
        assert_eq!(iso.root, Path::new("/data/instances/ab12/jail"));
        assert_eq!(iso.cgroup.name, "vroom/ab12");
        assert_eq!(
            iso.max_file_bytes,
            128 << 20,
            "above the largest config volume (64 MiB)"
        );
        let b = |s: &str, p: &str| JailEntry::Bind {
            source: s.into(),
            path: p.into(),
        };
        let l = |p: &str, t: &str| JailEntry::Symlink {
            path: p.into(),
            target: t.into(),
        };
        assert_eq!(
            iso.entries,
            vec![
                b("/usr", "/usr"),
                l("/bin", "usr/bin"),
                l("/lib", "usr/lib"),
                l("/lib64", "usr/lib64"),
                b("/etc/ld.so.cache", "/etc/ld.so.cache"),
                b("/dev/null", "/dev/null"),
                b("/dev/urandom", "/dev/urandom"),
                b("/cache/vmlinuz", "/vm/kernel"),
                b("/images/x/initramfs.cpio", "/vm/initramfs"),
            ]
        );
        assert_eq!(value_after(&jail.args, "-kernel"), vec!["/vm/kernel"]);
        assert_eq!(value_after(&jail.args, "-initrd"), vec!["/vm/initramfs"]);
        assert_eq!(
            value_after(&jail.args, "-sandbox"),
            vec!["on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"]
        );
        assert!(
            !jail.args.iter().any(|a| a.contains("/data/")),
            "no host path reaches QEMU: {:?}",
            jail.args
        );
        assert!(!jail.args.contains(&"-daemonize".to_string()));
    }

    #[test]
    fn kvm_gets_the_device_and_its_group_only() {
        let jail = plan(
            &spec(Accel::Kvm),
            Path::new("/usr/bin/qemu-system-x86_64"),
            Some((9, 9)),
            &merged_usr(),
            None,
        );
        let iso = jail.isolation.unwrap();
        assert_eq!(iso.groups, vec![994]);
        assert!(iso.entries.contains(&JailEntry::Bind {
            source: "/dev/kvm".into(),
            path: "/dev/kvm".into()
        }));
        assert_eq!(value_after(&jail.args, "-accel"), vec!["kvm"]);
        assert!(jail.args.contains(&"-sandbox".to_string()));
        // A root-owned /dev/kvm grants nothing through a group.
        let root_kvm = HostLayout {
            kvm_gid: Some(0),
            ..merged_usr()
        };
        let jail = plan(
            &spec(Accel::Kvm),
            Path::new("/usr/bin/q"),
            Some((9, 9)),
            &root_kvm,
            None,
        );
        assert!(jail.isolation.unwrap().groups.is_empty());
    }

    #[test]
    fn unmerged_usr_and_qemu_outside_usr_are_bound() {
        let host = HostLayout {
            symlinks: vec![],
            dirs: vec!["lib".into(), "lib64".into()],
            ld_cache: false,
            kvm_gid: None,
        };
        let jail = plan(
            &spec(Accel::Tcg),
            Path::new("/opt/qemu/bin/qemu-system-x86_64"),
            Some((9, 9)),
            &host,
            None,
        );
        assert_eq!(jail.program, Path::new("/vm/qemu"));
        let entries = jail.isolation.unwrap().entries;
        for (source, path) in [
            ("/lib", "/lib"),
            ("/lib64", "/lib64"),
            ("/opt/qemu/bin/qemu-system-x86_64", "/vm/qemu"),
        ] {
            assert!(entries.contains(&JailEntry::Bind {
                source: source.into(),
                path: path.into()
            }));
        }
        assert!(!entries.iter().any(|e| matches!(e, JailEntry::Bind { source, .. } if source == Path::new("/etc/ld.so.cache"))));
    }

    #[test]
    fn unjailed_keeps_host_paths_and_no_sandbox() {
        let jail = plan(
            &spec(Accel::Tcg),
            Path::new("/usr/bin/qemu-system-x86_64"),
            None,
            &merged_usr(),
            None,
        );
        assert!(jail.isolation.is_none());
        assert_eq!(value_after(&jail.args, "-kernel"), vec!["/cache/vmlinuz"]);
        assert!(!jail.args.contains(&"-sandbox".to_string()));
        assert_eq!(jail.fds.len(), 7, "the same fds either way");
    }

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
