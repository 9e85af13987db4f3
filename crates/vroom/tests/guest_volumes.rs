//! The guest's side of data volumes, on its own: QEMU started here with an
//! image built for vroom's kernel, a config volume whose instance file lists
//! a data volume, and an ext4 file made here with `mkfs.ext4` attached as a
//! third virtio-blk disk with serial `vroom-vol-0` (what the host side does
//! for `vroom run --volume`). Checks, over the agent, that vroom-init
//! mounts it with the flags asked, that data outlives the VM, that it grows
//! the filesystem to its disk (at boot and on request), freezes and thaws
//! it (by itself after the bound), and that a volume it cannot use fails
//! the boot with a reason naming it. Needs root, QEMU and e2fsprogs.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use vroom_agent_proto::volume::{data_disk_serial, DataVolume, InstanceFile, VOLUME_VERSION};
use vroom_agent_proto::ExecStatus;
use vroom_agent_proto::{GuestReply, HealthReport, HostCommand, VOLUME_FREEZE_BOUND_MS};
use vroom_core::agent::{AgentClient, ExecEvent};
use vroom_core::images::{BootImage, ImageSource};

mod common;

const MIB: u64 = 1 << 20;
const VOLUME_PATH: &str = "/var/lib/data";
const CALL: Duration = Duration::from_secs(10);

/// Builds `recipe` (a directory) into `dir` with vroom's own kernel.
fn build_image(dir: &Path, recipe: &Path) -> BootImage {
    let cache = PathBuf::from("/var/cache/vroom");
    let kernels = vroom_image::KernelCache::new(&cache);
    assert!(
        kernels.vroom_kernel().is_some(),
        "vroom's kernel for this kernel/vroom.config is not built: run `vroom kernel build`"
    );
    let images = vroom_image::LocalImages::new(
        vroom_image::ImageStore::new(&dir.join("images")),
        kernels,
        common::init_binary(),
        cache.join("debs"),
    );
    let report = images
        .build(recipe, false, None, None, &mut |_, _| {})
        .unwrap_or_else(|e| panic!("build {}: {e}", recipe.display()));
    images.resolve(&report.image.id).unwrap()
}

/// The hello recipe, plus e2fsprogs: the guest checks volumes with e2fsck.
fn hello_with_e2fsck(dir: &Path) -> PathBuf {
    let recipe = dir.join("voltest");
    std::fs::create_dir_all(&recipe).unwrap();
    let hello = PathBuf::from(common::recipe("hello"));
    for entry in std::fs::read_dir(&hello).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), recipe.join(entry.file_name())).unwrap();
    }
    let toml = std::fs::read_to_string(recipe.join("recipe.toml")).unwrap();
    let toml = toml
        .replace("name = \"hello\"", "name = \"voltest\"")
        .replace(
            "packages = [{ name = \"busybox-static\", exclude = [\"/usr/share/doc\"] }]",
            "packages = [{ name = \"busybox-static\", exclude = [\"/usr/share/doc\"] }, { name = \"e2fsprogs\" }]",
        );
    assert!(toml.contains("e2fsprogs"), "the hello recipe changed shape");
    std::fs::write(recipe.join("recipe.toml"), toml).unwrap();
    recipe
}

/// A sparse file of `mib` MiB formatted ext4 on the host.
fn ext4_file(path: &Path, mib: u64) {
    std::fs::File::create(path)
        .unwrap()
        .set_len(mib * MIB)
        .unwrap();
    host(Command::new("mkfs.ext4").args(["-F", "-q"]).arg(path));
}

fn host(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn volume(read_only: bool, exec: bool) -> DataVolume {
    DataVolume {
        serial: data_disk_serial(0),
        name: "data".into(),
        path: VOLUME_PATH.into(),
        fs: "ext4".into(),
        read_only,
        exec,
    }
}

/// One VM, killed when dropped.
struct Guest {
    qemu: Child,
    dir: PathBuf,
    agent: AgentClient,
    rt: tokio::runtime::Runtime,
}

impl Drop for Guest {
    fn drop(&mut self) {
        let _ = self.qemu.kill();
        let _ = self.qemu.wait();
    }
}

impl Guest {
    /// Starts QEMU with `disk` as data volume 0 (`volumes` says how the
    /// guest mounts it) in `dir`, which holds the run's sockets and
    /// console log.
    fn start(
        image: &BootImage,
        dir: &Path,
        volumes: Vec<DataVolume>,
        disk: &Path,
        disk_read_only: bool,
    ) -> Guest {
        std::fs::create_dir_all(dir).unwrap();
        let instance = InstanceFile {
            version: VOLUME_VERSION,
            hostname: "voltest".into(),
            nics: vec![],
            machine_id: None,
            volumes,
        };
        let config = dir.join("config.img");
        let _ = std::fs::remove_file(&config);
        vroom_volume::create(
            &config,
            1440,
            &instance,
            &image.manifest.appliance.seed_config,
        )
        .unwrap();
        let (agent, qmp, console) = (
            dir.join("agent.sock"),
            dir.join("qmp.sock"),
            dir.join("console.log"),
        );
        for stale in [&agent, &qmp, &console] {
            let _ = std::fs::remove_file(stale);
        }
        let mut append = String::from("console=ttyS0 panic=-1");
        if let Some(khz) = std::fs::read_to_string("/proc/cpuinfo")
            .ok()
            .and_then(|c| vroom_qemu::cmdline::host_tsc_khz(&c))
        {
            append.push(' ');
            append.push_str(&vroom_qemu::cmdline::tcg_timer_args(khz));
        }
        if !image.manifest.cmdline.is_empty() {
            append.push(' ');
            append.push_str(&image.manifest.cmdline);
        }
        let drive = |id: &str, file: &Path, extra: &str, serial: &str| {
            [
                "-drive".to_string(),
                format!("id={id},file={},format=raw,if=none{extra}", file.display()),
                "-device".to_string(),
                format!("virtio-blk-device,drive={id},serial={serial}"),
            ]
        };
        let mut cmd = Command::new(
            std::env::var_os("VROOM_QEMU").unwrap_or_else(|| "qemu-system-x86_64".into()),
        );
        cmd.args(["-M", "microvm,acpi=off", "-accel", "tcg", "-cpu", "max"])
            .args(["-m", "128M", "-smp", "1", "-nodefaults", "-no-user-config"])
            .args(["-display", "none", "-no-reboot"])
            .arg("-serial")
            .arg(format!("file:{}", console.display()))
            .arg("-kernel")
            .arg(&image.kernel)
            .arg("-initrd")
            .arg(&image.initramfs)
            .arg("-append")
            .arg(append)
            .args(drive("root", &image.rootfs, ",readonly=on", "vroom-root"))
            .args(drive("config", &config, "", "vroom-config"))
            .args(drive(
                "vol0",
                disk,
                if disk_read_only { ",readonly=on" } else { "" },
                &data_disk_serial(0),
            ))
            .args(["-device", "virtio-serial-device", "-chardev"])
            .arg(format!(
                "socket,id=agent,path={},server=on,wait=off",
                agent.display()
            ))
            .arg("-device")
            .arg(format!(
                "virtserialport,chardev=agent,name={}",
                vroom_agent_proto::PORT_NAME
            ))
            .arg("-qmp")
            .arg(format!("unix:{},server=on,wait=off", qmp.display()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let qemu = cmd.spawn().expect("start qemu-system-x86_64");
        let guest = Guest {
            qemu,
            dir: dir.to_path_buf(),
            agent: AgentClient::new(agent.clone()),
            rt: tokio::runtime::Runtime::new().unwrap(),
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while !agent.exists() {
            assert!(Instant::now() < deadline, "QEMU made no agent socket");
            std::thread::sleep(Duration::from_millis(50));
        }
        guest
    }

    fn console(&self) -> String {
        std::fs::read_to_string(self.dir.join("console.log")).unwrap_or_default()
    }

    /// Waits until the guest is ready; `Err` with its console when QEMU
    /// ended first (a boot that failed powers off).
    fn ready(&mut self) -> Result<HealthReport, String> {
        let deadline = Instant::now() + Duration::from_secs(180);
        loop {
            if let Ok(report) = self.rt.block_on(self.agent.health(Duration::from_secs(2))) {
                if report.ready {
                    return Ok(report);
                }
            }
            if let Ok(Some(_)) = self.qemu.try_wait() {
                return Err(self.console());
            }
            assert!(
                Instant::now() < deadline,
                "the guest did not become ready:\n{}",
                self.console()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Waits for QEMU to end by itself; panics with the console after `limit`.
    fn exited(&mut self, limit: Duration) {
        let deadline = Instant::now() + limit;
        while self.qemu.try_wait().unwrap().is_none() {
            assert!(
                Instant::now() < deadline,
                "QEMU still runs:\n{}",
                self.console()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn call(&self, command: HostCommand) -> GuestReply {
        self.rt.block_on(self.agent.call(command, CALL)).unwrap()
    }

    fn health(&self) -> HealthReport {
        self.rt.block_on(self.agent.health(CALL)).unwrap()
    }

    fn read(&self, path: &str) -> String {
        let chunk = self
            .rt
            .block_on(self.agent.read_file(path, 0, CALL))
            .unwrap_or_else(|e| panic!("read {path}: {e}"));
        String::from_utf8(chunk.data).unwrap()
    }

    /// Runs `sh -c script` in the guest: its exit code and output.
    fn sh(&self, script: &str) -> (i32, String) {
        self.rt.block_on(async {
            let argv = vec!["/bin/sh".into(), "-c".into(), script.into()];
            let mut session = self
                .agent
                .exec(argv, Duration::from_secs(30), false, CALL)
                .await
                .unwrap();
            let mut output = String::new();
            while let Some(event) = session.next().await {
                match event.unwrap() {
                    ExecEvent::Output { data, .. } => {
                        output.push_str(&String::from_utf8_lossy(&data))
                    }
                    ExecEvent::Exit(ExecStatus::Exited { code }) => return (code, output),
                    ExecEvent::Exit(other) => panic!("exec {script}: {other:?}"),
                }
            }
            panic!("exec {script}: no exit");
        })
    }

    /// The mount options of the volume, from the guest's /proc/mounts.
    fn mount_options(&self) -> Vec<String> {
        let mounts = self.read("/proc/mounts");
        let line = mounts
            .lines()
            .find(|l| l.split(' ').nth(1) == Some(VOLUME_PATH))
            .unwrap_or_else(|| panic!("{VOLUME_PATH} is not mounted:\n{mounts}"));
        let fields: Vec<&str> = line.split(' ').collect();
        assert_eq!(fields[2], "ext4", "{line}");
        fields[3].split(',').map(String::from).collect()
    }

    /// Tells QEMU the volume's disk is now `bytes` long (the host side's
    /// online grow).
    fn resize_disk(&self, bytes: u64) {
        let stream = UnixStream::connect(self.dir.join("qmp.sock")).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let mut reader = BufReader::new(stream.try_clone().unwrap());
        let mut writer = stream;
        let mut line = String::new();
        reader.read_line(&mut line).unwrap();
        for command in [
            r#"{"execute":"qmp_capabilities"}"#.to_string(),
            format!(
                r#"{{"execute":"block_resize","arguments":{{"device":"vol0","size":{bytes}}}}}"#
            ),
        ] {
            writeln!(writer, "{command}").unwrap();
            loop {
                line.clear();
                reader.read_line(&mut line).unwrap();
                assert!(!line.contains("\"error\""), "{command}: {line}");
                if line.contains("\"return\"") {
                    break;
                }
            }
        }
    }
}

fn only_volume(report: &HealthReport) -> &vroom_agent_proto::VolumeUsage {
    assert_eq!(report.volumes.len(), 1, "{:?}", report.volumes);
    let usage = &report.volumes[0];
    assert_eq!(
        (usage.name.as_str(), usage.path.as_str()),
        ("data", VOLUME_PATH)
    );
    usage
}

/// Boots with `disk` as the one data volume and waits until ready.
fn boot(
    image: &BootImage,
    dir: &Path,
    volume: DataVolume,
    disk: &Path,
    disk_read_only: bool,
) -> (Guest, HealthReport) {
    let mut guest = Guest::start(image, &dir.join("run"), vec![volume], disk, disk_read_only);
    let report = guest
        .ready()
        .unwrap_or_else(|console| panic!("boot failed:\n{console}"));
    (guest, report)
}

/// Boots with `disk` as a read-write data volume, expecting the boot to
/// fail: the guest's console.
fn failed_boot(image: &BootImage, dir: &Path, disk: &Path) -> String {
    let mut guest = Guest::start(
        image,
        &dir.join("run"),
        vec![volume(false, false)],
        disk,
        false,
    );
    guest
        .ready()
        .map(|report| panic!("booted with a volume it must refuse: {report:?}"))
        .unwrap_err()
}

/// Asks the guest to shut down and waits for QEMU to end.
fn shut_down(mut guest: Guest) {
    assert_eq!(guest.call(HostCommand::Shutdown), GuestReply::ShuttingDown);
    guest.exited(Duration::from_secs(60));
}

#[test]
fn a_data_volume_is_mounted_keeps_its_data_grows_and_freezes() {
    let dir = tempfile::tempdir().unwrap();
    let image = build_image(dir.path(), Path::new(&common::recipe("hello")));
    let disk = dir.path().join("data.img");
    ext4_file(&disk, 64);

    // Boot 1: read-write, noexec.
    let (guest, report) = boot(&image, dir.path(), volume(false, false), &disk, false);
    let usage = only_volume(&report);
    assert!(
        (50 * MIB..64 * MIB).contains(&usage.total_bytes),
        "{usage:?}"
    );
    assert!(!usage.read_only && !usage.frozen, "{usage:?}");
    let options = guest.mount_options();
    for want in ["rw", "nosuid", "nodev", "noexec"] {
        assert!(
            options.iter().any(|o| o == want),
            "{want} missing: {options:?}"
        );
    }
    assert!(
        guest
            .console()
            .contains("data volumes are not checked: the image has no e2fsck"),
        "{}",
        guest.console()
    );
    assert_eq!(
        guest.sh(&format!("echo persisted > {VOLUME_PATH}/f")),
        (0, String::new())
    );

    // Freeze and thaw on request.
    let frozen = guest.call(HostCommand::FreezeVolumes);
    assert_eq!(
        frozen,
        GuestReply::VolumesFrozen {
            paths: vec![VOLUME_PATH.into()],
            thaw_after_ms: VOLUME_FREEZE_BOUND_MS,
        }
    );
    assert!(only_volume(&guest.health()).frozen);
    // A resize would wait for the thaw: refused instead.
    let refused = guest.call(HostCommand::GrowVolume {
        serial: data_disk_serial(0),
    });
    assert!(
        matches!(&refused, GuestReply::Error { message } if message.contains("frozen")),
        "{refused:?}"
    );
    assert_eq!(
        guest.call(HostCommand::ThawVolumes),
        GuestReply::VolumesThawed {
            paths: vec![VOLUME_PATH.into()]
        }
    );
    assert_eq!(
        guest.call(HostCommand::ThawVolumes),
        GuestReply::VolumesThawed { paths: vec![] }
    );
    // A host that never thaws: the guest thaws by itself after the bound.
    let froze_at = Instant::now();
    assert!(matches!(
        guest.call(HostCommand::FreezeVolumes),
        GuestReply::VolumesFrozen { .. }
    ));
    let thawed = common::poll(Duration::from_secs(30), || {
        (!only_volume(&guest.health()).frozen).then(Instant::now)
    })
    .expect("the volume stayed frozen");
    let waited = thawed - froze_at;
    assert!(
        waited >= Duration::from_millis(VOLUME_FREEZE_BOUND_MS - 500),
        "thawed after {waited:?}"
    );
    assert_eq!(guest.sh(&format!("echo after-thaw > {VOLUME_PATH}/g")).0, 0);

    // Online grow: QEMU resizes the disk, the guest grows the filesystem.
    guest.resize_disk(96 * MIB);
    let grown = common::poll(Duration::from_secs(10), || {
        match guest.call(HostCommand::GrowVolume {
            serial: data_disk_serial(0),
        }) {
            GuestReply::VolumeGrown {
                before_bytes,
                after_bytes,
            } if after_bytes > before_bytes => Some((before_bytes, after_bytes)),
            GuestReply::VolumeGrown { .. } => None,
            other => panic!("grow: {other:?}"),
        }
    })
    .expect("the guest never saw the disk grow");
    assert_eq!(grown, (64 * MIB, 96 * MIB));
    assert!(only_volume(&guest.health()).total_bytes > 80 * MIB);
    let unknown = guest.call(HostCommand::GrowVolume {
        serial: "vroom-vol-7".into(),
    });
    assert!(
        matches!(&unknown, GuestReply::Error { message } if message.contains("vroom-vol-7")),
        "{unknown:?}"
    );

    shut_down(guest);
    // Unmounted cleanly, and consistent after the online resize.
    host(Command::new("e2fsck").arg("-fn").arg(&disk));

    // Offline grow (the host extends the file), then boot 2: exec allowed.
    std::fs::OpenOptions::new()
        .write(true)
        .open(&disk)
        .unwrap()
        .set_len(128 * MIB)
        .unwrap();
    let (guest, report) = boot(&image, dir.path(), volume(false, true), &disk, false);
    assert!(
        only_volume(&report).total_bytes > 110 * MIB,
        "{:?}",
        report.volumes
    );
    assert!(
        guest.console().contains("grew from 96 MiB to 128 MiB"),
        "{}",
        guest.console()
    );
    assert_eq!(guest.read(&format!("{VOLUME_PATH}/f")), "persisted\n");
    assert_eq!(guest.read(&format!("{VOLUME_PATH}/g")), "after-thaw\n");
    let options = guest.mount_options();
    assert!(!options.iter().any(|o| o == "noexec"), "{options:?}");
    // A crash after a sync: the kernel replays the journal at the next mount.
    assert_eq!(
        guest
            .sh(&format!("echo synced > {VOLUME_PATH}/h && sync"))
            .0,
        0
    );
    drop(guest);
    let (guest, _) = boot(&image, dir.path(), volume(false, false), &disk, false);
    assert_eq!(guest.read(&format!("{VOLUME_PATH}/h")), "synced\n");
    shut_down(guest);

    // Boot 3: read-only, on a disk QEMU attaches read-only.
    let (guest, report) = boot(&image, dir.path(), volume(true, false), &disk, true);
    assert!(only_volume(&report).read_only);
    assert!(guest.mount_options().iter().any(|o| o == "ro"));
    let (code, said) = guest.sh(&format!("echo no > {VOLUME_PATH}/i"));
    assert_ne!(code, 0, "{said}");
    assert_eq!(guest.read(&format!("{VOLUME_PATH}/f")), "persisted\n");
}

/// Without e2fsck in the image, a volume the kernel cannot mount fails the
/// boot, with a reason that names it.
#[test]
fn a_volume_that_does_not_mount_fails_the_boot() {
    let dir = tempfile::tempdir().unwrap();
    let image = build_image(dir.path(), Path::new(&common::recipe("hello")));
    let disk = dir.path().join("data.img");
    ext4_file(&disk, 32);
    // No superblock: not ext4 any more.
    {
        use std::os::unix::fs::FileExt;
        let file = std::fs::OpenOptions::new().write(true).open(&disk).unwrap();
        file.write_all_at(&[0u8; 1024], 1024).unwrap();
    }
    let console = failed_boot(&image, dir.path(), &disk);
    assert!(
        console.contains(&format!(
            "boot failed: volume data: cannot mount /dev/vdc at {VOLUME_PATH} as ext4"
        )),
        "{console}"
    );
    assert!(!console.contains("services started"), "{console}");
}

/// With e2fsck in the image: what `e2fsck -p` repairs is repaired and the
/// volume mounted; what it cannot repair fails the boot.
#[test]
fn e2fsck_repairs_what_it_safely_can_and_refuses_the_rest() {
    let dir = tempfile::tempdir().unwrap();
    let image = build_image(dir.path(), &hello_with_e2fsck(dir.path()));
    let debugfs = |disk: &Path, request: &str| {
        host(
            Command::new("debugfs")
                .args(["-w", "-R", request])
                .arg(disk),
        );
    };

    // Wrong free counts on a filesystem marked not clean: preen fixes them.
    let fixable = dir.path().join("fixable.img");
    ext4_file(&fixable, 32);
    debugfs(&fixable, "ssv free_blocks_count 17");
    debugfs(&fixable, "ssv state 0");
    let (guest, _) = boot(&image, dir.path(), volume(false, false), &fixable, false);
    let console = guest.console();
    assert!(
        console.contains("volume data (/dev/vdc): e2fsck -p: errors corrected (exit code 1)"),
        "{console}"
    );
    guest.mount_options();
    shut_down(guest);
    host(Command::new("e2fsck").arg("-fn").arg(&fixable));

    // A root directory that is gone: preen stops, the boot fails.
    let broken = dir.path().join("broken.img");
    ext4_file(&broken, 32);
    debugfs(&broken, "clri <2>");
    debugfs(&broken, "ssv state 0");
    let console = failed_boot(&image, dir.path(), &broken);
    assert!(
        console.contains(&format!(
            "boot failed: volume data at {VOLUME_PATH}: e2fsck on /dev/vdc left errors uncorrected (exit code 4: Root inode is not a directory.); not mounted"
        )),
        "{console}"
    );
    assert!(!console.contains("mounted /dev/vdc"), "{console}");
}
