//! From the initramfs to a running root: modules, mounts, switch root, config.

use std::collections::BTreeMap;
use std::ffi::CString;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use vroom_agent_proto::volume::{
    ConfigFile, InstanceFile, CONFIG_DISK_SERIAL, CONFIG_FILE, INSTANCE_FILE, ROOT_DISK_SERIAL,
};
use vroom_types::template::TemplateNic;
use vroom_types::{ApplianceSpec, ConfigValues};

use crate::{log, netconf};

const NEW_ROOT: &str = "/newroot";
const SEED_MNT: &str = "/seed";
const MODULE_LIST: &str = "/lib/vroom/modules";
const APPLIANCE_FILE: &str = "/etc/vroom/appliance.json";
pub const CONFIG_DIR: &str = "/config";

/// Everything the supervisor needs after boot.
pub struct Booted {
    pub spec: ApplianceSpec,
    pub config: ConfigValues,
    pub hostname: String,
    pub nics: BTreeMap<String, TemplateNic>,
}

pub fn boot() -> Result<Booted, String> {
    mount("devtmpfs", "/dev", "devtmpfs", 0, "")?;
    mount("proc", "/proc", "proc", 0, "")?;
    mount("sysfs", "/sys", "sysfs", 0, "")?;
    load_modules()?;

    let root_dev = find_disk(ROOT_DISK_SERIAL, "vda")?;
    let config_dev = find_disk(CONFIG_DISK_SERIAL, "vdb")?;
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
            use std::os::unix::fs::PermissionsExt;
            let _ = fs::set_permissions(
                SEED_MNT,
                fs::Permissions::from_mode(meta.permissions().mode()),
            );
        }
        mount(SEED_MNT, &target, "", libc::MS_MOVE, "")?;
    }
    mount(
        &config_dev,
        &format!("{NEW_ROOT}{CONFIG_DIR}"),
        "vfat",
        libc::MS_NOSUID | libc::MS_NODEV,
        "umask=0077,iocharset=iso8859-1",
    )?;
    for dir in ["/dev", "/proc", "/sys"] {
        mount(dir, &format!("{NEW_ROOT}{dir}"), "", libc::MS_MOVE, "")?;
    }
    switch_root()?;

    let instance: InstanceFile = read_json(&Path::new(CONFIG_DIR).join(INSTANCE_FILE))?;
    let config = match read_json::<ConfigFile>(&Path::new(CONFIG_DIR).join(CONFIG_FILE)) {
        Ok(file) => file.values,
        Err(err) => {
            log(&format!("{err}; using the factory config"));
            spec.seed_config.clone()
        }
    };
    set_hostname(&instance.hostname)?;
    apply_sysctl(&spec.sysctl);
    let nics = netconf::configure(&instance.nics)?;
    Ok(Booted {
        spec,
        config,
        hostname: instance.hostname,
        nics,
    })
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
            fs::set_permissions(&dst, fs::Permissions::from_mode(meta.mode()))?;
        } else if kind.is_file() {
            fs::copy(&src, &dst)?;
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

/// Finds a virtio disk by its serial; kernels that do not expose serials get
/// the disk at its probe-order name.
fn find_disk(serial: &str, fallback: &str) -> Result<String, String> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let mut without_serial = false;
        for entry in fs::read_dir("/sys/block").into_iter().flatten().flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if !name.starts_with("vd") {
                continue;
            }
            match fs::read_to_string(entry.path().join("serial")) {
                Ok(found) if found.trim() == serial => return Ok(format!("/dev/{name}")),
                Ok(_) => {}
                Err(_) => without_serial = true,
            }
        }
        if without_serial && Path::new("/sys/block").join(fallback).exists() {
            return Ok(format!("/dev/{fallback}"));
        }
        if Instant::now() > deadline {
            return Err(format!("no disk with serial {serial} appeared"));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
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

fn set_hostname(name: &str) -> Result<(), String> {
    // SAFETY: the pointer and length describe a valid byte buffer.
    if unsafe { libc::sethostname(name.as_ptr().cast(), name.len()) } != 0 {
        return Err(format!(
            "sethostname {name}: {}",
            io::Error::last_os_error()
        ));
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
        let root = fs::File::open(&dir)?;
        // SAFETY: plain syscall on an fd we own.
        if unsafe { libc::syncfs(std::os::fd::AsRawFd::as_raw_fd(&root)) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
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
    if flags & libc::MS_MOVE == 0 {
        mkdir(target)?;
    }
    let c = |s: &str| CString::new(s).map_err(|_| format!("NUL in mount argument {s:?}"));
    let (src, tgt, fs, dat) = (c(source)?, c(target)?, c(fstype)?, c(data)?);
    // SAFETY: all pointers are valid C strings that outlive the call.
    let rc = unsafe {
        libc::mount(
            src.as_ptr(),
            tgt.as_ptr(),
            fs.as_ptr(),
            flags,
            dat.as_ptr().cast(),
        )
    };
    if rc != 0 {
        return Err(format!(
            "mount {source} on {target} ({fstype}): {}",
            io::Error::last_os_error()
        ));
    }
    Ok(())
}

/// Flushes and detaches the config volume, then powers the VM off. Never returns.
pub fn power_off() -> ! {
    // SAFETY: plain syscalls without pointers other than a valid C string.
    unsafe {
        libc::sync();
        let config = CString::new(CONFIG_DIR).expect("invariant: no NUL");
        libc::umount2(config.as_ptr(), libc::MNT_DETACH);
        libc::sync();
        libc::reboot(libc::RB_POWER_OFF);
    }
    loop {
        std::thread::sleep(Duration::from_secs(60));
    }
}
