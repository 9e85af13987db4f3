//! From the initramfs to a running root: modules, mounts, switch root, config.

use std::collections::BTreeMap;
use std::ffi::CString;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

use vroom_agent_proto::volume::{
    ConfigFile, InstanceFile, CONFIG_DISK_SERIAL, CONFIG_FILE, INSTANCE_FILE, ROOT_DISK_SERIAL,
};
use vroom_types::{ApplianceSpec, ConfigValues};

use crate::datavol::{self, DataVolumes};
use crate::{disk, log, netconf};

const NEW_ROOT: &str = "/newroot";
const SEED_MNT: &str = "/seed";
const MODULE_LIST: &str = "/lib/vroom/modules";
const APPLIANCE_FILE: &str = "/etc/vroom/appliance.json";
pub const CONFIG_DIR: &str = "/config";

/// Where the machine id is written (`/run` is a tmpfs in every appliance
/// that keeps the default writable directories); it is bind-mounted over
/// `/etc/machine-id`, which the image builder leaves empty for this.
const MACHINE_ID_FILE: &str = "/run/machine-id";
const ETC_MACHINE_ID: &str = "/etc/machine-id";
/// How the config volume is mounted, at boot and when a restore reloads it.
const CONFIG_MOUNT_FLAGS: libc::c_ulong = libc::MS_NOSUID | libc::MS_NODEV;
const CONFIG_MOUNT_OPTIONS: &str = "umask=0077,iocharset=iso8859-1";
/// `BLKFLSBUF` from `<linux/fs.h>`: `_IO(0x12, 97)`.
const BLKFLSBUF: libc::c_ulong = 0x1261;

/// Everything the supervisor needs after boot.
pub struct Booted {
    pub spec: ApplianceSpec,
    pub config: ConfigValues,
    pub hostname: String,
    pub machine_id: Option<String>,
    /// The NICs in the config volume's order, with the names the guest gave them.
    pub nics: Vec<netconf::Nic>,
    /// The config volume's block device, e.g. `/dev/vdb`.
    pub config_dev: String,
    /// The data volumes, checked and mounted.
    pub volumes: DataVolumes,
}

/// The config volume's two files.
pub struct Volume {
    pub instance: InstanceFile,
    pub config: Option<ConfigValues>,
}

/// Reads the config volume mounted at [`CONFIG_DIR`]; a missing or broken
/// config file is logged and left to the caller.
pub fn read_volume() -> Result<Volume, String> {
    let instance: InstanceFile = read_json(&Path::new(CONFIG_DIR).join(INSTANCE_FILE))?;
    let config = match read_json::<ConfigFile>(&Path::new(CONFIG_DIR).join(CONFIG_FILE)) {
        Ok(file) => Some(file.values),
        Err(err) => {
            log(&err);
            None
        }
    };
    Ok(Volume { instance, config })
}

pub fn boot() -> Result<Booted, String> {
    mount("devtmpfs", "/dev", "devtmpfs", 0, "")?;
    mount("proc", "/proc", "proc", 0, "")?;
    mount("sysfs", "/sys", "sysfs", 0, "")?;
    load_modules()?;

    let root_dev = disk::find_disk(ROOT_DISK_SERIAL, Some("vda"))?;
    let config_dev = disk::find_disk(CONFIG_DISK_SERIAL, Some("vdb"))?;
    mkdir(NEW_ROOT)?;
    mount(&root_dev, NEW_ROOT, "erofs", libc::MS_RDONLY, "")?;

    let spec: ApplianceSpec =
        read_json(&Path::new(NEW_ROOT).join(APPLIANCE_FILE.trim_start_matches('/')))?;
    mkdir(SEED_MNT)?;
    for dir in &spec.writable {
        let target = format!("{NEW_ROOT}{dir}");
        // The tmpfs starts as a copy of what the image has there (e.g. /var/lib).
        mount(
            "tmpfs",
            SEED_MNT,
            "tmpfs",
            libc::MS_NOSUID | libc::MS_NODEV,
            "mode=0755",
        )?;
        if let Err(err) = copy_tree(Path::new(&target), Path::new(SEED_MNT)) {
            log(&format!("seed {dir}: {err}"));
        }
        if let Ok(meta) = fs::metadata(&target) {
            use std::os::unix::fs::{MetadataExt, PermissionsExt};
            let _ = std::os::unix::fs::chown(SEED_MNT, Some(meta.uid()), Some(meta.gid()));
            let _ = fs::set_permissions(
                SEED_MNT,
                fs::Permissions::from_mode(meta.permissions().mode()),
            );
        }
        mount(SEED_MNT, &target, "", libc::MS_MOVE, "")?;
    }
    mount_config(&config_dev, &format!("{NEW_ROOT}{CONFIG_DIR}"))?;
    for dir in ["/dev", "/proc", "/sys"] {
        mount(dir, &format!("{NEW_ROOT}{dir}"), "", libc::MS_MOVE, "")?;
    }
    switch_root()?;

    let Volume { instance, config } = read_volume()?;
    let config = config.unwrap_or_else(|| {
        log("using the factory config");
        spec.seed_config.clone()
    });
    set_hostname(&instance.hostname)?;
    if let Some(id) = &instance.machine_id {
        if let Err(err) = set_machine_id(id) {
            log(&format!("machine id: {err}"));
        }
    }
    apply_sysctl(&spec.sysctl);
    let nics = netconf::configure(&instance.nics)?;
    if spec.network_files {
        if let Err(err) = write_network_files(&instance) {
            log(&format!("network files: {err}"));
        }
    }
    // Last, so that nothing after it fails the boot with volumes mounted;
    // before the services, which keep their data there.
    let volumes = datavol::mount_all(&instance.volumes).map_err(|e| vroom_base::error_chain(&e))?;
    Ok(Booted {
        spec,
        config,
        hostname: instance.hostname,
        machine_id: instance.machine_id,
        nics,
        config_dev,
        volumes,
    })
}

fn mount_config(dev: &str, target: &str) -> Result<(), String> {
    mount(
        dev,
        target,
        "vfat",
        CONFIG_MOUNT_FLAGS,
        CONFIG_MOUNT_OPTIONS,
    )
}

/// Flushes the config volume to its disk (see [`write_config`] for why the
/// whole filesystem).
pub fn sync_config() -> io::Result<()> {
    let root = fs::File::open(CONFIG_DIR)?;
    // SAFETY: plain syscall on an fd we own.
    if unsafe { libc::syncfs(std::os::fd::AsRawFd::as_raw_fd(&root)) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Mounts the config volume afresh after the host replaced its disk image
/// under a frozen guest: unmount, drop the block device's cached buffers
/// (clean, since freezing synced them) and mount it again, so that nothing
/// of the old image is read.
pub fn remount_config(dev: &str) -> Result<(), String> {
    let target = CString::new(CONFIG_DIR).expect("invariant: no NUL");
    // SAFETY: a valid C string.
    if unsafe { libc::umount2(target.as_ptr(), 0) } != 0 {
        return Err(format!(
            "unmount {CONFIG_DIR}: {}",
            io::Error::last_os_error()
        ));
    }
    let flushed = fs::File::open(dev).and_then(|disk| {
        // SAFETY: BLKFLSBUF takes no argument; the fd is ours.
        let rc = unsafe { libc::ioctl(std::os::fd::AsRawFd::as_raw_fd(&disk), BLKFLSBUF as _, 0) };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    });
    let mounted = mount_config(dev, CONFIG_DIR);
    flushed.map_err(|e| format!("flush the buffers of {dev}: {e}"))?;
    mounted
}

fn apply_sysctl(params: &BTreeMap<String, String>) {
    for (key, value) in params {
        let path = Path::new("/proc/sys").join(key.replace('.', "/"));
        match fs::write(&path, value) {
            Ok(()) => log(&format!("sysctl {key} = {value}")),
            Err(err) => log(&format!("sysctl {key}: {err}")),
        }
    }
}

/// Copies a directory tree (files, directories, symlinks; modes kept).
fn copy_tree(from: &Path, to: &Path) -> io::Result<()> {
    use std::os::unix::fs::{symlink, MetadataExt, PermissionsExt};
    let Ok(entries) = fs::read_dir(from) else {
        return Ok(());
    };
    for entry in entries {
        let entry = entry?;
        let src = entry.path();
        let dst = to.join(entry.file_name());
        let meta = fs::symlink_metadata(&src)?;
        let kind = meta.file_type();
        if kind.is_symlink() {
            symlink(fs::read_link(&src)?, &dst)?;
        } else if kind.is_dir() {
            fs::create_dir(&dst)?;
            copy_tree(&src, &dst)?;
        } else if kind.is_file() {
            fs::copy(&src, &dst)?;
        } else {
            continue;
        }
        // Owners as in the image (an imported image's services run as
        // their own users); the owner first, as chown clears set-id bits.
        std::os::unix::fs::lchown(&dst, Some(meta.uid()), Some(meta.gid()))?;
        if !kind.is_symlink() {
            fs::set_permissions(&dst, fs::Permissions::from_mode(meta.mode()))?;
        }
    }
    Ok(())
}

fn load_modules() -> Result<(), String> {
    let list = fs::read_to_string(MODULE_LIST).map_err(|e| format!("read {MODULE_LIST}: {e}"))?;
    for path in list.lines().filter(|l| !l.is_empty()) {
        let file = fs::File::open(path).map_err(|e| format!("open module {path}: {e}"))?;
        let params = CString::default();
        // SAFETY: the fd is open for the duration of the call and params is a valid C string.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_finit_module,
                std::os::fd::AsRawFd::as_raw_fd(&file),
                params.as_ptr(),
                0,
            )
        };
        if rc != 0 {
            let err = io::Error::last_os_error();
            if err.raw_os_error() != Some(libc::EEXIST) {
                return Err(format!("load module {path}: {err}"));
            }
        }
    }
    Ok(())
}

fn switch_root() -> Result<(), String> {
    std::env::set_current_dir(NEW_ROOT).map_err(|e| format!("chdir {NEW_ROOT}: {e}"))?;
    mount(".", "/", "", libc::MS_MOVE, "")?;
    let dot = CString::new(".").expect("invariant: no NUL");
    // SAFETY: dot is a valid C string.
    if unsafe { libc::chroot(dot.as_ptr()) } != 0 {
        return Err(format!("chroot: {}", io::Error::last_os_error()));
    }
    std::env::set_current_dir("/").map_err(|e| format!("chdir /: {e}"))
}

pub fn set_hostname(name: &str) -> Result<(), String> {
    // SAFETY: the pointer and length describe a valid byte buffer.
    if unsafe { libc::sethostname(name.as_ptr().cast(), name.len()) } != 0 {
        return Err(format!(
            "sethostname {name}: {}",
            io::Error::last_os_error()
        ));
    }
    Ok(())
}

/// Writes the machine id into [`MACHINE_ID_FILE`] (in place, so that a bind
/// mount of it stays valid) and makes `/etc/machine-id` show it.
pub fn set_machine_id(id: &str) -> Result<(), String> {
    if id.len() != 32 || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(format!("{id:?} is not 32 hex digits"));
    }
    fs::write(MACHINE_ID_FILE, format!("{id}\n"))
        .map_err(|e| format!("write {MACHINE_ID_FILE}: {e}"))?;
    if !Path::new(ETC_MACHINE_ID).is_file() || machine_id_bound() {
        return Ok(());
    }
    mount(MACHINE_ID_FILE, ETC_MACHINE_ID, "", libc::MS_BIND, "")
}

/// Whether `/etc/machine-id` is a mount point already.
fn machine_id_bound() -> bool {
    mounted_at(ETC_MACHINE_ID)
}

fn mounted_at(path: &str) -> bool {
    fs::read_to_string("/proc/self/mountinfo").is_ok_and(|table| {
        table
            .lines()
            .any(|line| line.split(' ').nth(4) == Some(path))
    })
}

/// `/etc/hosts` (localhost and the hostname) and `/etc/resolv.conf` (the
/// first NIC's gateway), written to `/run` and bound over the image's
/// plain files: what a container image expects its runtime to provide.
fn write_network_files(instance: &InstanceFile) -> Result<(), String> {
    let hosts = format!(
        "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n127.0.1.1\t{}\n",
        instance.hostname
    );
    let resolv: String = instance
        .nics
        .iter()
        .filter_map(|n| n.gateway.as_deref())
        .take(1)
        .map(|gw| format!("nameserver {gw}\n"))
        .collect();
    fs::create_dir_all("/run/vroom").map_err(|e| format!("mkdir /run/vroom: {e}"))?;
    for (file, content) in [("hosts", hosts), ("resolv.conf", resolv)] {
        let source = format!("/run/vroom/{file}");
        let target = format!("/etc/{file}");
        fs::write(&source, content).map_err(|e| format!("write {source}: {e}"))?;
        if Path::new(&target).is_file() && !mounted_at(&target) {
            mount(&source, &target, "", libc::MS_BIND, "")?;
        }
    }
    Ok(())
}

pub fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T, String> {
    let bytes = fs::read(path).map_err(|e| format!("read {}: {e}", path.display()))?;
    serde_json::from_slice(&bytes).map_err(|e| format!("parse {}: {e}", path.display()))
}

/// Replaces the config file atomically and durably, so an acknowledged change
/// survives a crash of the guest or of QEMU.
pub fn write_config(values: &ConfigValues) -> Result<(), String> {
    use std::io::Write;
    let file = ConfigFile {
        version: vroom_agent_proto::volume::VOLUME_VERSION,
        values: values.clone(),
    };
    let bytes = serde_json::to_vec_pretty(&file).map_err(|e| e.to_string())?;
    let dir = PathBuf::from(CONFIG_DIR);
    let tmp = dir.join("config.new");
    let write = || -> io::Result<()> {
        let mut f = fs::File::create(&tmp)?;
        f.write_all(&bytes)?;
        f.sync_all()?;
        fs::rename(&tmp, dir.join(CONFIG_FILE))?;
        // fsync on vfat does not reliably write back the FAT table itself (seen:
        // a directory entry pointing at a cluster still marked free after a
        // QEMU kill), so flush the whole, tiny filesystem.
        sync_config()
    };
    write().map_err(|e| format!("write {CONFIG_DIR}/{CONFIG_FILE}: {e}"))
}

fn mkdir(path: &str) -> Result<(), String> {
    fs::create_dir_all(path).map_err(|e| format!("mkdir {path}: {e}"))
}

fn mount(
    source: &str,
    target: &str,
    fstype: &str,
    flags: libc::c_ulong,
    data: &str,
) -> Result<(), String> {
    // A move or a bind mounts onto something that exists (a file, maybe).
    if flags & (libc::MS_MOVE | libc::MS_BIND) == 0 {
        mkdir(target)?;
    }
    disk::sys_mount(source, target, fstype, flags, data)
        .map_err(|e| format!("mount {source} on {target} ({fstype}): {e}"))
}

/// Flushes and detaches the config volume, then powers the VM off. Never returns.
pub fn power_off() -> ! {
    // Without ACPI (vroom's own kernel under `-M microvm,acpi=off`) the
    // kernel has no way to power off and RB_POWER_OFF only halts the CPUs;
    // vroom runs QEMU with -no-reboot, so a restart request ends it instead.
    let how = if Path::new("/sys/firmware/acpi").exists() {
        libc::RB_POWER_OFF
    } else {
        libc::RB_AUTOBOOT
    };
    // SAFETY: plain syscalls without pointers other than a valid C string.
    unsafe {
        libc::sync();
        let config = CString::new(CONFIG_DIR).expect("invariant: no NUL");
        libc::umount2(config.as_ptr(), libc::MNT_DETACH);
        libc::sync();
        libc::reboot(how);
    }
    loop {
        std::thread::sleep(Duration::from_secs(60));
    }
}
