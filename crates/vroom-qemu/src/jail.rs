//! The jail of one QEMU process, planned from a [`LaunchSpec`]: its fds,
//! QEMU's arguments and, when jailed, the root it sees. The jailer that
//! builds it, the format of `jail.json` and the cgroups are
//! [`vroom_jail`]'s; see there for what a jail holds.

use std::path::{Path, PathBuf};

use vroom_core::driver::LaunchSpec;
use vroom_jail::cgroup::CgroupSpec;
use vroom_jail::{FdSource, FileAccess, HostLayout, Isolation, JailEntry, JailSpec, FIRST_FD};
use vroom_types::Accel;

use crate::cmdline::{self, BootFiles, VmmFds};

/// The largest file offset a jailed QEMU may write: the largest config
/// volume plus 64 MiB.
pub const MAX_FILE_BYTES: u64 = vroom_types::limits::CONFIG_VOLUME_KIB.max * 1024 + (64 << 20);
/// The file size cap of a VM's QEMU: [`MAX_FILE_BYTES`], or its largest
/// data volume when that is larger (QEMU writes up to the end of each).
pub fn max_file_bytes(spec: &LaunchSpec) -> u64 {
    spec.data_disks
        .iter()
        .map(|d| d.bytes)
        .fold(MAX_FILE_BYTES, u64::max)
}

/// How long the jailer waits for QMP's greeting.
pub const READY_TIMEOUT_SECS: u64 = 60;

/// The jail's place for what vroom puts there.
const VM_DIR: &str = "/vm";

/// Where the jail binds a QEMU's private prefix (see [`crate::vmm`]), or
/// a lone binary outside `/usr`.
const QEMU_IN_JAIL: &str = "/vm/qemu";

/// Plans the launch of one VM: its fds, QEMU's arguments and, when
/// `isolation` names the uid and gid, its jail. `prefix` is the private
/// prefix `qemu` was unpacked into ([`crate::vmm::prefix_of`]), if any.
pub fn plan(
    spec: &LaunchSpec,
    qemu: &Path,
    prefix: Option<&Path>,
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
        data_disks: spec
            .data_disks
            .iter()
            .map(|disk| {
                let read = FdSource::File {
                    path: disk.path.clone(),
                    access: FileAccess::Read,
                };
                if disk.read_only {
                    vec![add(read)]
                } else {
                    let write = FdSource::File {
                        path: disk.path.clone(),
                        access: FileAccess::ReadWrite,
                    };
                    vec![add(write), add(read)]
                }
            })
            .collect(),
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
            data_dirs: prefix.map(crate::vmm::data_dirs_in).unwrap_or_default(),
        };
        return JailSpec {
            run_dir: spec.run_dir.clone(),
            program: qemu.to_path_buf(),
            args: cmdline::qemu_args(spec, &boot, &vmm_fds, false, tsc_khz),
            env: prefix.map(crate::vmm::env_in).unwrap_or_default(),
            fds,
            log: spec.run_dir.join("qemu.log"),
            qmp_socket,
            pid_file: spec.run_dir.join("qemu.pid"),
            ready_timeout_secs: READY_TIMEOUT_SECS,
            isolation: None,
        };
    };
    let vm = Path::new(VM_DIR);
    // A private prefix is bound whole: the binary, its firmware, its modules.
    let prefix_inside = Path::new(QEMU_IN_JAIL);
    let boot = BootFiles {
        kernel: vm.join("kernel"),
        initramfs: vm.join("initramfs"),
        data_dirs: prefix
            .map(|_| crate::vmm::data_dirs_in(prefix_inside))
            .unwrap_or_default(),
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
    let program = if let Some(prefix) = prefix {
        entries.push(bind(prefix, prefix_inside));
        match qemu.strip_prefix(prefix) {
            Ok(rest) => prefix_inside.join(rest),
            Err(_) => qemu.to_path_buf(),
        }
    } else if qemu.starts_with("/usr/") {
        qemu.to_path_buf()
    } else {
        entries.push(bind(qemu, Path::new(QEMU_IN_JAIL)));
        PathBuf::from(QEMU_IN_JAIL)
    };
    JailSpec {
        run_dir: spec.run_dir.clone(),
        program,
        args: cmdline::qemu_args(spec, &boot, &vmm_fds, true, tsc_khz),
        env: prefix
            .map(|_| crate::vmm::env_in(prefix_inside))
            .unwrap_or_default(),
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
            max_file_bytes: max_file_bytes(spec),
        }),
    }
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
            data_disks: vec![],
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
            None,
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

    /// Each data volume is opened by the jailer (read-write and read-only,
    /// or read-only alone), and the file size cap lets QEMU write to the
    /// end of the largest.
    #[test]
    fn data_volumes_are_fds_and_raise_the_file_size_cap() {
        let mut spec = spec(Accel::Tcg);
        let disk = |path: &str, read_only, bytes| vroom_core::driver::DataDisk {
            path: path.into(),
            read_only,
            bytes,
        };
        spec.data_disks = vec![
            disk("/v/a.img", false, 4 << 30),
            disk("/v/b.img", true, 1 << 30),
        ];
        let jail = plan(
            &spec,
            Path::new("/usr/bin/qemu-system-x86_64"),
            None,
            Some((0x5000_0001, 0x5000_0001)),
            &merged_usr(),
            None,
        );
        let files: Vec<_> = jail
            .fds
            .iter()
            .filter_map(|f| match f {
                FdSource::File { path, access } if path.starts_with("/v") => {
                    Some((path.to_str().unwrap(), *access))
                }
                _ => None,
            })
            .collect();
        assert_eq!(
            files,
            [
                ("/v/a.img", FileAccess::ReadWrite),
                ("/v/a.img", FileAccess::Read),
                ("/v/b.img", FileAccess::Read)
            ]
        );
        assert_eq!(jail.isolation.unwrap().max_file_bytes, 4 << 30);
        spec.data_disks.clear();
        assert_eq!(max_file_bytes(&spec), MAX_FILE_BYTES);
    }

    #[test]
    fn jailed_tcg_layout_and_sandbox() {
        let jail = plan(
            &spec(Accel::Tcg),
            Path::new("/usr/bin/qemu-system-x86_64"),
            None,
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
            None,
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
            None,
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
            None,
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

    /// A QEMU unpacked into a private prefix (`vroom setup --qemu 10`):
    /// the jail binds the prefix whole and QEMU is told its firmware dirs
    /// as the jail shows them; unjailed, as the host does.
    #[test]
    fn a_qemu_in_a_private_prefix_brings_its_firmware_into_the_jail() {
        let prefix = Path::new("/var/cache/vroom/qemu/10/usr");
        let binary = prefix.join("bin/qemu-system-x86_64");
        let jail = plan(
            &spec(Accel::Tcg),
            &binary,
            Some(prefix),
            Some((9, 9)),
            &merged_usr(),
            None,
        );
        assert_eq!(jail.program, Path::new("/vm/qemu/bin/qemu-system-x86_64"));
        assert_eq!(
            value_after(&jail.args, "-L"),
            vec!["/vm/qemu/share/qemu", "/vm/qemu/share/seabios"]
        );
        // Its own modules, never the system QEMU's (another build's).
        assert_eq!(
            jail.env,
            vec![(
                "QEMU_MODULE_DIR".to_string(),
                "/vm/qemu/lib/x86_64-linux-gnu/qemu".to_string()
            )]
        );
        assert!(jail.isolation.unwrap().entries.contains(&JailEntry::Bind {
            source: prefix.into(),
            path: "/vm/qemu".into()
        }));
        let unjailed = plan(
            &spec(Accel::Tcg),
            &binary,
            Some(prefix),
            None,
            &merged_usr(),
            None,
        );
        assert_eq!(unjailed.program, binary);
        assert_eq!(
            value_after(&unjailed.args, "-L"),
            vec![
                "/var/cache/vroom/qemu/10/usr/share/qemu",
                "/var/cache/vroom/qemu/10/usr/share/seabios"
            ]
        );
        // The system's QEMU gets no -L.
        let system = plan(
            &spec(Accel::Tcg),
            Path::new("/usr/bin/qemu-system-x86_64"),
            None,
            Some((9, 9)),
            &merged_usr(),
            None,
        );
        assert!(value_after(&system.args, "-L").is_empty());
        assert!(system.env.is_empty());
    }

    #[test]
    fn unjailed_keeps_host_paths_and_no_sandbox() {
        let jail = plan(
            &spec(Accel::Tcg),
            Path::new("/usr/bin/qemu-system-x86_64"),
            None,
            None,
            &merged_usr(),
            None,
        );
        assert!(jail.isolation.is_none());
        assert_eq!(value_after(&jail.args, "-kernel"), vec!["/cache/vmlinuz"]);
        assert!(!jail.args.contains(&"-sandbox".to_string()));
        assert_eq!(jail.fds.len(), 7, "the same fds either way");
    }
}
