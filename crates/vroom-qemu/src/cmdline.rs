//! Builds the `qemu-system-x86_64 -M microvm` command line.
//!
//! The VM gets virtio-mmio devices only: two disks (the read-only root and the
//! config volume, told apart in the guest by their serials), one virtio-net
//! device per NIC, and a virtio-serial port for the agent. QEMU opens no
//! host path for them: the jailer hands it fds (numbered by
//! [`crate::jail::plan`]): listening sockets for QMP, the agent and the
//! serial console (which vroomd reads, see `vroom_core::console`), the taps,
//! and fd sets (`-add-fd`, opened as `/dev/fdset/N`) for the disks. Only the
//! kernel and initramfs are named by path (inside the jail when jailed). QEMU
//! runs in the foreground; the jailer detaches it.

use std::path::{Path, PathBuf};

use vroom_agent_proto::volume::{CONFIG_DISK_SERIAL, ROOT_DISK_SERIAL};
use vroom_agent_proto::PORT_NAME;
use vroom_core::driver::LaunchSpec;
use vroom_types::Accel;

/// Translation-block cache per VM under TCG, in MiB. Without a bound QEMU
/// reserves about 1 GiB per VM (measured RSS 1.2 GB against ~210 MB).
pub const TCG_TB_SIZE_MIB: u32 = 32;

/// The translation cache for a guest of `mem_mib`. Measured with `vroom
/// bench density` (hello on vroom's kernel at 64 MiB, see the README):
/// 16 MiB boots as fast as 32 (1.02x) with 13% less PSS; 8 MiB saves 20%
/// but boots 1.24x slower. Larger guests (Debian's kernel, the sniffer)
/// keep 32 MiB: they run more code, and were not measured smaller.
pub fn tcg_tb_mib(mem_mib: u64) -> u32 {
    if mem_mib <= 64 {
        16
    } else {
        TCG_TB_SIZE_MIB
    }
}

/// Kernel arguments that skip timer calibration under TCG. With several
/// emulated guests on a busy host, calibrating the TSC against the PIT fails
/// ("tsc: Unable to calibrate against PIT"), and microvm has no HPET or PM
/// timer to fall back on, so the boot stalls. Under TCG the guest TSC is the
/// host's, so the host's TSC rate is the true value. `lpj` is in TSC cycles
/// per jiffy (HZ=250 in Debian kernels). `lapic_timer_hz` is QEMU's emulated
/// APIC timer rate (1 GHz in 7.2 and 10.0, as the guest's own calibration
/// measures): vroom's kernel (its patch `kernel/patches/lapic-timer-hz.patch`)
/// then skips calibrating the APIC timer, about 180 ms of its boot here;
/// Debian's kernel does not know the argument and hands it to init as an
/// environment variable, which vroom-init ignores.
///
/// `tsc=reliable` turns off the kernel's clocksource watchdog for the TSC.
/// microvm has no HPET or PM timer, so the watchdog checks the TSC against
/// jiffies, which fall behind whenever the host is too busy to run the
/// vCPU on time; the kernel then called the TSC unstable (at boot or
/// later), fell back to the jiffies clocksource and so to a periodic tick
/// (HZ 250 even when idle): `vroom bench density` saw such guests wake 250
/// times a second instead of about 16, which loaded the host further and
/// made more guests fall back, until boots stalled near 120. Under TCG the
/// guest TSC is the host's, which is reliable.
pub fn tcg_timer_args(tsc_khz: u64) -> String {
    format!(
        "tsc_early_khz={tsc_khz} lpj={} lapic_timer_hz={QEMU_APIC_TIMER_HZ} tsc=reliable",
        tsc_khz * 1000 / 250
    )
}

/// The rate QEMU's emulated local APIC timer counts at (before its divider).
const QEMU_APIC_TIMER_HZ: u64 = 1_000_000_000;

/// The host's TSC rate in kHz, read from the CPU clock in /proc/cpuinfo.
pub fn host_tsc_khz(cpuinfo: &str) -> Option<u64> {
    let mhz: f64 = cpuinfo
        .lines()
        .find(|l| l.starts_with("cpu MHz"))?
        .split(':')
        .nth(1)?
        .trim()
        .parse()
        .ok()?;
    Some((mhz * 1000.0) as u64).filter(|k| *k > 0)
}

/// Where QEMU finds the kernel and initramfs, and its firmware.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BootFiles {
    pub kernel: PathBuf,
    pub initramfs: PathBuf,
    /// `-L` dirs, searched before QEMU's built-in ones: those of a QEMU
    /// unpacked into a private prefix (see [`crate::vmm`]); empty for the
    /// system's.
    pub data_dirs: Vec<PathBuf>,
}

/// The fd numbers QEMU is given (see [`crate::jail::plan`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmmFds {
    pub qmp: i32,
    pub agent: i32,
    pub console: i32,
    pub root_disk: i32,
    /// Read-write, then read-only: QEMU picks by access mode.
    pub config_disk: [i32; 2],
    /// One fd set per data volume, in order: read-write then read-only,
    /// or read-only alone.
    pub data_disks: Vec<Vec<i32>>,
    /// One per NIC, in order.
    pub taps: Vec<i32>,
}

/// The seccomp filter QEMU installs on itself when jailed: no obsolete
/// syscalls, no setuid and friends, no fork or exec, no scheduler or
/// resource changes.
pub const SANDBOX: &str = "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny";

const ROOT_FDSET: u32 = 1;
const CONFIG_FDSET: u32 = 2;
/// Data volume `i` is fd set `FIRST_DATA_FDSET + i`.
const FIRST_DATA_FDSET: u32 = 3;

/// The QEMU drive id of data volume `index` (what `block_resize` names).
pub fn data_drive_id(index: usize) -> String {
    format!("vol{index}")
}

pub fn qemu_args(
    spec: &LaunchSpec,
    boot: &BootFiles,
    fds: &VmmFds,
    sandbox: bool,
    tsc_khz: Option<u64>,
) -> Vec<String> {
    let p = |path: &Path| path.display().to_string();
    let accel = match spec.accel {
        Accel::Kvm => "kvm".to_string(),
        Accel::Tcg => format!(
            "tcg,tb-size={}",
            spec.tcg_tb_mib.unwrap_or_else(|| tcg_tb_mib(spec.mem_mib))
        ),
    };
    let mut cmdline = String::from("console=ttyS0 quiet panic=-1");
    if let (Accel::Tcg, Some(khz)) = (spec.accel, tsc_khz) {
        cmdline.push(' ');
        cmdline.push_str(&tcg_timer_args(khz));
    }
    if !spec.cmdline.is_empty() {
        cmdline.push(' ');
        cmdline.push_str(&spec.cmdline);
    }
    let add_fd = |fd: i32, set: u32| ["-add-fd".to_string(), format!("fd={fd},set={set}")];
    let mut args: Vec<String> = vec![
        "-name".into(),
        format!("vroom-{},process=vroom-{}", spec.name, spec.name),
        "-M".into(),
        if spec.acpi {
            "microvm".into()
        } else {
            "microvm,acpi=off".into()
        },
        "-accel".into(),
        accel,
        "-cpu".into(),
        if spec.accel == Accel::Kvm {
            "host".into()
        } else {
            "max".into()
        },
        "-m".into(),
        format!("{}M", spec.mem_mib),
        "-smp".into(),
        spec.cpus.to_string(),
        "-nodefaults".into(),
        "-no-user-config".into(),
        "-display".into(),
        "none".into(),
        "-no-reboot".into(),
    ];
    if sandbox {
        args.extend(["-sandbox".into(), SANDBOX.into()]);
    }
    for dir in &boot.data_dirs {
        args.extend(["-L".into(), p(dir)]);
    }
    args.extend([
        "-chardev".into(),
        format!("socket,id=console,fd={},server=on,wait=off", fds.console),
        "-serial".into(),
        "chardev:console".into(),
        "-kernel".into(),
        p(&boot.kernel),
        "-initrd".into(),
        p(&boot.initramfs),
        "-append".into(),
        cmdline,
    ]);
    args.extend(add_fd(fds.root_disk, ROOT_FDSET));
    args.extend([
        "-drive".into(),
        format!("id=root,file=/dev/fdset/{ROOT_FDSET},format=raw,if=none,readonly=on"),
        "-device".into(),
        format!("virtio-blk-device,drive=root,serial={ROOT_DISK_SERIAL}"),
    ]);
    for fd in fds.config_disk {
        args.extend(add_fd(fd, CONFIG_FDSET));
    }
    args.extend([
        // writeback cache with flushes passed through: the guest's fsync
        // reaches the host disk. No image locking: vroom alone owns the
        // file, and QEMU cannot take back its write lock to run again after
        // writing its state out for a snapshot ("Failed to get write lock").
        "-drive".into(),
        format!("id=config,file=/dev/fdset/{CONFIG_FDSET},format=raw,if=none,cache=writeback,file.locking=off"),
        "-device".into(),
        format!("virtio-blk-device,drive=config,serial={CONFIG_DISK_SERIAL}"),
    ]);
    for (i, (disk, set_fds)) in spec.data_disks.iter().zip(&fds.data_disks).enumerate() {
        let set = FIRST_DATA_FDSET + i as u32;
        for fd in set_fds {
            args.extend(add_fd(*fd, set));
        }
        // Like the config volume: writeback with the guest's flushes passed
        // through (an fsync in the guest is an fdatasync on the host), no
        // image locking. `discard=unmap`: what the guest trims goes back to
        // the host's disk (the file is sparse).
        let id = data_drive_id(i);
        let mode = if disk.read_only {
            "readonly=on"
        } else {
            "discard=unmap"
        };
        args.extend([
            "-drive".into(),
            format!("id={id},file=/dev/fdset/{set},format=raw,if=none,cache=writeback,file.locking=off,{mode}"),
            "-device".into(),
            format!(
                "virtio-blk-device,drive={id},serial={}",
                vroom_agent_proto::volume::data_disk_serial(i)
            ),
        ]);
    }
    for (i, (nic, fd)) in spec.nics.iter().zip(&fds.taps).enumerate() {
        args.push("-netdev".into());
        args.push(format!("tap,id=net{i},fd={fd}"));
        args.push("-device".into());
        args.push(format!("virtio-net-device,netdev=net{i},mac={}", nic.mac));
    }
    args.extend([
        "-device".into(),
        "virtio-serial-device".into(),
        "-chardev".into(),
        format!("socket,id=agent,fd={},server=on,wait=off", fds.agent),
        "-device".into(),
        format!("virtserialport,chardev=agent,name={PORT_NAME}"),
        "-chardev".into(),
        format!("socket,id=qmp,fd={},server=on,wait=off", fds.qmp),
        "-mon".into(),
        "chardev=qmp,mode=control".into(),
    ]);
    if spec.incoming {
        // Paused, waiting for `migrate-incoming` (see `crate::state`).
        args.extend(["-S".into(), "-incoming".into(), "defer".into()]);
    }
    args
}

/// The accelerator a VMM's command line asks for.
pub fn vmm_accel(args: &[String]) -> Accel {
    match args.windows(2).find(|w| w[0] == "-accel") {
        Some(w) if w[1].starts_with("kvm") => Accel::Kvm,
        _ => Accel::Tcg,
    }
}

/// What the command line of a VMM started by an earlier vroom (unjailed,
/// `-daemonize`d, QMP by path) says about it: its QMP socket (which names
/// its run dir) and its accelerator. `None` for anything else, so VMs that
/// outlived an upgrade are still re-adopted.
pub fn parse_vmm_args(args: &[String]) -> Option<(PathBuf, Accel)> {
    let after = |flag: &str| {
        args.iter()
            .position(|a| a == flag)
            .and_then(|i| args.get(i + 1))
    };
    let qmp = after("-qmp")?.strip_prefix("unix:")?;
    let socket = PathBuf::from(qmp.split(',').next()?);
    if socket.file_name()? != "qmp.sock" || !args.iter().any(|a| a == "-daemonize") {
        return None;
    }
    Some((socket, vmm_accel(args)))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use vroom_core::driver::LaunchNic;

    fn spec(accel: Accel) -> LaunchSpec {
        LaunchSpec {
            instance_id: "abc".into(),
            name: "web".into(),
            run_dir: "/run/x".into(),
            kernel: "/k/vmlinuz".into(),
            initramfs: "/i/initramfs.cpio".into(),
            cmdline: "vroom.debug".into(),
            acpi: true,
            tcg_tb_mib: None,
            mem_mib: 128,
            cpus: 2,
            accel,
            root_disk: "/i/rootfs.erofs".into(),
            config_disk: "/x/config.img".into(),
            data_disks: vec![],
            nics: vec![
                LaunchNic {
                    tap: "vrt1".into(),
                    mac: "52:54:00:00:00:01".into(),
                },
                LaunchNic {
                    tap: "vrt2".into(),
                    mac: "52:54:00:00:00:02".into(),
                },
            ],
            agent_socket: "/x/agent.sock".into(),
            console_socket: "/x/console.sock".into(),
            incoming: false,
        }
    }

    fn boot() -> BootFiles {
        BootFiles {
            data_dirs: vec![],
            kernel: "/vm/kernel".into(),
            initramfs: "/vm/initramfs".into(),
        }
    }

    fn fds() -> VmmFds {
        VmmFds {
            qmp: 3,
            agent: 4,
            console: 5,
            root_disk: 6,
            config_disk: [7, 8],
            data_disks: vec![],
            taps: vec![9, 10],
        }
    }

    fn args(accel: Accel, tsc_khz: Option<u64>) -> Vec<String> {
        qemu_args(&spec(accel), &boot(), &fds(), true, tsc_khz)
    }

    /// Every value given to `flag`, in order.
    pub(crate) fn value_after<'a>(args: &'a [String], flag: &str) -> Vec<&'a str> {
        args.windows(2)
            .filter(|w| w[0] == flag)
            .map(|w| w[1].as_str())
            .collect()
    }

    /// vroom's kernel has no ACPI: QEMU then puts the virtio-mmio devices
    /// on the kernel command line, or the guest finds none.
    #[test]
    fn a_kernel_without_acpi_gets_a_machine_without_it() {
        let mut spec = spec(Accel::Tcg);
        spec.acpi = false;
        let args = qemu_args(&spec, &boot(), &fds(), true, None);
        assert_eq!(value_after(&args, "-M"), vec!["microvm,acpi=off"]);
    }

    #[test]
    fn small_guests_get_a_smaller_translation_cache() {
        let mut small = spec(Accel::Tcg);
        small.mem_mib = 64;
        let args = qemu_args(&small, &boot(), &fds(), true, None);
        assert_eq!(value_after(&args, "-accel"), vec!["tcg,tb-size=16"]);
        small.tcg_tb_mib = Some(8);
        let args = qemu_args(&small, &boot(), &fds(), true, None);
        assert_eq!(value_after(&args, "-accel"), vec!["tcg,tb-size=8"]);
    }

    #[test]
    fn tcg_is_bounded_and_kvm_uses_host_cpu() {
        let tcg = args(Accel::Tcg, None);
        assert_eq!(value_after(&tcg, "-accel"), vec!["tcg,tb-size=32"]);
        assert_eq!(value_after(&tcg, "-cpu"), vec!["max"]);
        assert_eq!(vmm_accel(&tcg), Accel::Tcg);
        let kvm = args(Accel::Kvm, None);
        assert_eq!(value_after(&kvm, "-accel"), vec!["kvm"]);
        assert_eq!(value_after(&kvm, "-cpu"), vec!["host"]);
        assert_eq!(vmm_accel(&kvm), Accel::Kvm);
    }

    #[test]
    fn tcg_presets_timer_calibration_and_kvm_does_not() {
        let tcg = args(Accel::Tcg, Some(2_596_146));
        assert_eq!(
            value_after(&tcg, "-append"),
            vec!["console=ttyS0 quiet panic=-1 tsc_early_khz=2596146 lpj=10384584 lapic_timer_hz=1000000000 tsc=reliable vroom.debug"]
        );
        let kvm = args(Accel::Kvm, Some(2_596_146));
        assert_eq!(
            value_after(&kvm, "-append"),
            vec!["console=ttyS0 quiet panic=-1 vroom.debug"]
        );
        assert_eq!(
            host_tsc_khz("model name : x\ncpu MHz\t\t: 2596.146\n"),
            Some(2_596_146)
        );
        assert_eq!(host_tsc_khz("nothing"), None);
    }

    /// Data volumes come after the config volume, each its own fd set (a
    /// read-only one gets no writable fd), in the order of their serials.
    #[test]
    fn data_volumes_are_disks_with_serials_in_order() {
        let mut spec = spec(Accel::Tcg);
        spec.data_disks = vec![
            vroom_core::driver::DataDisk {
                path: "/v/a/volume.img".into(),
                read_only: false,
                bytes: 1 << 30,
            },
            vroom_core::driver::DataDisk {
                path: "/v/b/volume.img".into(),
                read_only: true,
                bytes: 1 << 30,
            },
        ];
        let mut fds = fds();
        fds.data_disks = vec![vec![11, 12], vec![13]];
        let args = qemu_args(&spec, &boot(), &fds, true, None);
        assert_eq!(
            value_after(&args, "-add-fd")[3..],
            ["fd=11,set=3", "fd=12,set=3", "fd=13,set=4"]
        );
        assert_eq!(
            value_after(&args, "-drive")[2..],
            [
                "id=vol0,file=/dev/fdset/3,format=raw,if=none,cache=writeback,file.locking=off,discard=unmap",
                "id=vol1,file=/dev/fdset/4,format=raw,if=none,cache=writeback,file.locking=off,readonly=on",
            ]
        );
        let devices = value_after(&args, "-device");
        assert!(devices.contains(&"virtio-blk-device,drive=vol0,serial=vroom-vol-0"));
        assert!(devices.contains(&"virtio-blk-device,drive=vol1,serial=vroom-vol-1"));
    }

    #[test]
    fn devices_take_fds_and_resources() {
        let args = args(Accel::Tcg, None);
        assert_eq!(value_after(&args, "-M"), vec!["microvm"]);
        assert_eq!(value_after(&args, "-m"), vec!["128M"]);
        assert_eq!(value_after(&args, "-smp"), vec!["2"]);
        assert_eq!(value_after(&args, "-kernel"), vec!["/vm/kernel"]);
        assert_eq!(value_after(&args, "-initrd"), vec!["/vm/initramfs"]);
        assert_eq!(
            value_after(&args, "-add-fd"),
            vec!["fd=6,set=1", "fd=7,set=2", "fd=8,set=2"]
        );
        assert_eq!(
            value_after(&args, "-drive"),
            vec![
                "id=root,file=/dev/fdset/1,format=raw,if=none,readonly=on",
                "id=config,file=/dev/fdset/2,format=raw,if=none,cache=writeback,file.locking=off"
            ]
        );
        assert_eq!(
            value_after(&args, "-netdev"),
            vec!["tap,id=net0,fd=9", "tap,id=net1,fd=10"]
        );
        assert!(value_after(&args, "-device")
            .contains(&"virtio-net-device,netdev=net1,mac=52:54:00:00:00:02"));
        assert!(value_after(&args, "-device")
            .contains(&"virtserialport,chardev=agent,name=org.vroom.agent.0"));
        assert_eq!(
            value_after(&args, "-chardev"),
            vec![
                "socket,id=console,fd=5,server=on,wait=off",
                "socket,id=agent,fd=4,server=on,wait=off",
                "socket,id=qmp,fd=3,server=on,wait=off"
            ]
        );
        assert_eq!(value_after(&args, "-mon"), vec!["chardev=qmp,mode=control"]);
        assert_eq!(value_after(&args, "-sandbox"), vec![SANDBOX]);
        assert!(!args.contains(&"-daemonize".to_string()));
        assert!(args.contains(&"-no-reboot".to_string()));
        let unsandboxed = qemu_args(&spec(Accel::Tcg), &boot(), &fds(), false, None);
        assert!(!unsandboxed.contains(&"-sandbox".to_string()));
    }

    #[test]
    fn legacy_vmm_args_parse_back_to_socket_and_accel() {
        let strings = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let legacy = |accel: &str| {
            strings(&[
                "qemu-system-x86_64",
                "-accel",
                accel,
                "-qmp",
                "unix:/data/instances/ab/qmp.sock,server=on,wait=off",
                "-daemonize",
                "-pidfile",
                "/data/instances/ab/qemu.pid",
            ])
        };
        let qmp = PathBuf::from("/data/instances/ab/qmp.sock");
        assert_eq!(
            parse_vmm_args(&legacy("tcg,tb-size=32")),
            Some((qmp.clone(), Accel::Tcg))
        );
        assert_eq!(parse_vmm_args(&legacy("kvm")), Some((qmp, Accel::Kvm)));
        for other in [
            strings(&["sleep", "10"]),
            strings(&["qemu-system-x86_64", "-qmp", "tcp:1:2"]),
            strings(&[
                "qemu-system-x86_64",
                "-qmp",
                "unix:/x/other.sock",
                "-daemonize",
            ]),
            strings(&["qemu-system-x86_64", "-qmp", "unix:/x/qmp.sock,server=on"]),
            args(Accel::Tcg, None),
        ] {
            assert_eq!(parse_vmm_args(&other), None, "{other:?}");
        }
    }
}
