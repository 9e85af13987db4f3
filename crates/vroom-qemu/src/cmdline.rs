//! Builds the `qemu-system-x86_64 -M microvm` command line.
//!
//! The VM gets virtio-mmio devices only: two disks (the read-only root and the
//! config volume, told apart in the guest by their serials), one virtio-net
//! device per NIC on a tap QEMU creates, and a virtio-serial port for the
//! agent. The serial console is a listening unix socket vroomd reads (see
//! `vroom_core::console`), and QMP another.

use std::path::{Path, PathBuf};

use vroom_agent_proto::volume::{CONFIG_DISK_SERIAL, ROOT_DISK_SERIAL};
use vroom_agent_proto::PORT_NAME;
use vroom_core::driver::LaunchSpec;
use vroom_types::Accel;

/// Translation-block cache per VM under TCG, in MiB. Without a bound QEMU
/// reserves about 1 GiB per VM (measured RSS 1.2 GB against ~210 MB).
pub const TCG_TB_SIZE_MIB: u32 = 32;

/// Kernel arguments that skip timer calibration under TCG. With several
/// emulated guests on a busy host, calibrating the TSC against the PIT fails
/// ("tsc: Unable to calibrate against PIT"), and microvm has no HPET or PM
/// timer to fall back on, so the boot stalls. Under TCG the guest TSC is the
/// host's, so the host's TSC rate is the true value. `lpj` is in TSC cycles
/// per jiffy (HZ=250 in Debian kernels).
pub fn tcg_timer_args(tsc_khz: u64) -> String {
    format!("tsc_early_khz={tsc_khz} lpj={}", tsc_khz * 1000 / 250)
}

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

pub fn qemu_args(
    spec: &LaunchSpec,
    qmp_socket: &Path,
    pid_file: &Path,
    tsc_khz: Option<u64>,
) -> Vec<String> {
    let p = |path: &Path| path.display().to_string();
    let accel = match spec.accel {
        Accel::Kvm => "kvm".to_string(),
        Accel::Tcg => format!("tcg,tb-size={TCG_TB_SIZE_MIB}"),
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
    let mut args: Vec<String> = vec![
        "-name".into(),
        format!("vroom-{},process=vroom-{}", spec.name, spec.name),
        "-M".into(),
        "microvm".into(),
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
        "-chardev".into(),
        format!(
            "socket,id=console,path={},server=on,wait=off",
            p(&spec.console_socket)
        ),
        "-serial".into(),
        "chardev:console".into(),
        "-kernel".into(),
        p(&spec.kernel),
        "-initrd".into(),
        p(&spec.initramfs),
        "-append".into(),
        cmdline,
        "-drive".into(),
        format!(
            "id=root,file={},format=raw,if=none,readonly=on",
            p(&spec.root_disk)
        ),
        "-device".into(),
        format!("virtio-blk-device,drive=root,serial={ROOT_DISK_SERIAL}"),
        // writeback cache with flushes passed through: the guest's fsync reaches the host disk.
        "-drive".into(),
        format!(
            "id=config,file={},format=raw,if=none,cache=writeback",
            p(&spec.config_disk)
        ),
        "-device".into(),
        format!("virtio-blk-device,drive=config,serial={CONFIG_DISK_SERIAL}"),
    ];
    for (i, nic) in spec.nics.iter().enumerate() {
        args.push("-netdev".into());
        args.push(format!(
            "tap,id=net{i},ifname={},script=no,downscript=no",
            nic.tap
        ));
        args.push("-device".into());
        args.push(format!("virtio-net-device,netdev=net{i},mac={}", nic.mac));
    }
    args.extend([
        "-device".into(),
        "virtio-serial-device".into(),
        "-chardev".into(),
        format!(
            "socket,id=agent,path={},server=on,wait=off",
            p(&spec.agent_socket)
        ),
        "-device".into(),
        format!("virtserialport,chardev=agent,name={PORT_NAME}"),
        "-qmp".into(),
        format!("unix:{},server=on,wait=off", p(qmp_socket)),
        "-daemonize".into(),
        "-pidfile".into(),
        p(pid_file),
    ]);
    args
}

/// What a running VMM's command line says about it: its QMP socket (which
/// names its run dir) and its accelerator. `None` for anything that is not a
/// VMM that vroom started.
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
    let accel = match after("-accel") {
        Some(a) if a.starts_with("kvm") => Accel::Kvm,
        _ => Accel::Tcg,
    };
    Some((socket, accel))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;
    use vroom_core::driver::LaunchNic;

    fn spec(accel: Accel) -> LaunchSpec {
        LaunchSpec {
            instance_id: "abc".into(),
            name: "web".into(),
            run_dir: "/run/x".into(),
            kernel: "/k/vmlinuz".into(),
            initramfs: "/i/initramfs.cpio".into(),
            cmdline: "vroom.debug".into(),
            mem_mib: 128,
            cpus: 2,
            accel,
            root_disk: "/i/rootfs.erofs".into(),
            config_disk: "/x/config.img".into(),
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
        }
    }

    fn value_after<'a>(args: &'a [String], flag: &str) -> Vec<&'a str> {
        args.windows(2)
            .filter(|w| w[0] == flag)
            .map(|w| w[1].as_str())
            .collect()
    }

    #[test]
    fn tcg_is_bounded_and_kvm_uses_host_cpu() {
        let tcg = qemu_args(
            &spec(Accel::Tcg),
            &PathBuf::from("/x/qmp.sock"),
            &PathBuf::from("/x/qemu.pid"),
            None,
        );
        assert_eq!(value_after(&tcg, "-accel"), vec!["tcg,tb-size=32"]);
        assert_eq!(value_after(&tcg, "-cpu"), vec!["max"]);
        let kvm = qemu_args(
            &spec(Accel::Kvm),
            &PathBuf::from("/x/qmp.sock"),
            &PathBuf::from("/x/qemu.pid"),
            None,
        );
        assert_eq!(value_after(&kvm, "-accel"), vec!["kvm"]);
        assert_eq!(value_after(&kvm, "-cpu"), vec!["host"]);
    }

    #[test]
    fn tcg_presets_timer_calibration_and_kvm_does_not() {
        let qmp = PathBuf::from("/x/qmp.sock");
        let pid = PathBuf::from("/x/qemu.pid");
        let tcg = qemu_args(&spec(Accel::Tcg), &qmp, &pid, Some(2_596_146));
        assert_eq!(
            value_after(&tcg, "-append"),
            vec!["console=ttyS0 quiet panic=-1 tsc_early_khz=2596146 lpj=10384584 vroom.debug"]
        );
        let kvm = qemu_args(&spec(Accel::Kvm), &qmp, &pid, Some(2_596_146));
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

    #[test]
    fn devices_sockets_and_resources() {
        let args = qemu_args(
            &spec(Accel::Tcg),
            &PathBuf::from("/x/qmp.sock"),
            &PathBuf::from("/x/qemu.pid"),
            None,
        );
        assert_eq!(value_after(&args, "-M"), vec!["microvm"]);
        assert_eq!(value_after(&args, "-m"), vec!["128M"]);
        assert_eq!(value_after(&args, "-smp"), vec!["2"]);
        assert_eq!(
            value_after(&args, "-append"),
            vec!["console=ttyS0 quiet panic=-1 vroom.debug"]
        );
        assert_eq!(
            value_after(&args, "-drive"),
            vec![
                "id=root,file=/i/rootfs.erofs,format=raw,if=none,readonly=on",
                "id=config,file=/x/config.img,format=raw,if=none,cache=writeback"
            ]
        );
        assert_eq!(
            value_after(&args, "-netdev"),
            vec![
                "tap,id=net0,ifname=vrt1,script=no,downscript=no",
                "tap,id=net1,ifname=vrt2,script=no,downscript=no"
            ]
        );
        assert!(value_after(&args, "-device")
            .contains(&"virtio-net-device,netdev=net1,mac=52:54:00:00:00:02"));
        assert!(value_after(&args, "-device")
            .contains(&"virtserialport,chardev=agent,name=org.vroom.agent.0"));
        assert_eq!(
            value_after(&args, "-qmp"),
            vec!["unix:/x/qmp.sock,server=on,wait=off"]
        );
        assert!(args.contains(&"-daemonize".to_string()));
        assert!(args.contains(&"-no-reboot".to_string()));
    }

    #[test]
    fn vmm_args_parse_back_to_socket_and_accel() {
        let qmp = PathBuf::from("/data/instances/ab/qmp.sock");
        let pid = PathBuf::from("/data/instances/ab/qemu.pid");
        for accel in [Accel::Tcg, Accel::Kvm] {
            let args = qemu_args(&spec(accel), &qmp, &pid, Some(2_596_146));
            assert_eq!(parse_vmm_args(&args), Some((qmp.clone(), accel)));
        }
        let strings = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
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
        ] {
            assert_eq!(parse_vmm_args(&other), None, "{other:?}");
        }
    }
}
