//! Data volumes: ext4 disks the host attaches with serials `vroom-vol-N`
//! (the order of `volumes` in the config volume's instance file).
//!
//! At boot, before any service starts, each is found by its serial,
//! checked with `e2fsck -p` when the image has e2fsck (a volume it cannot
//! repair fails the boot instead of being mounted), mounted `nodev,nosuid`
//! (and `noexec` unless asked, `ro` when attached read-only) and, when its
//! disk is larger than its filesystem, grown online to fill it: the host
//! grows a volume by extending its file while the VM is off. A running
//! guest grows one on request ([`DataVolumes::grow`]) after the host
//! resized the disk under it, and freezes all of them for a snapshot
//! ([`DataVolumes::freeze`]), thawing by itself after a bound.
//!
//! Resizing uses `EXT4_IOC_RESIZE_FS` on the mounted filesystem, so images
//! need no resize2fs; the sizes come from the disk (`/sys/block/vdX/size`)
//! and the ext4 superblock read from the device.

use std::ffi::CString;
use std::fs::{self, File};
use std::io;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use vroom_agent_proto::volume::DataVolume;
use vroom_agent_proto::{VolumeUsage, VOLUME_FREEZE_BOUND_MS};
use vroom_base::{error_chain as chain, LockExt};
use vroom_types::InvalidInputError;

use crate::log;

/// Where images keep e2fsck (Debian's e2fsprogs: /sbin is /usr/sbin there).
const E2FSCK_PATHS: &[&str] = &["/sbin/e2fsck", "/usr/sbin/e2fsck"];
/// A preen of a clean volume takes milliseconds; a damaged large one can
/// take minutes under TCG. Past this, the check counts as failed.
const E2FSCK_TIMEOUT: Duration = Duration::from_secs(600);

/// `_IOC(dir, type, nr, size)` from `<asm-generic/ioctl.h>`.
const fn ioc(dir: libc::c_ulong, ty: u8, nr: u8, size: usize) -> libc::c_ulong {
    (dir << 30)
        | ((size as libc::c_ulong) << 16)
        | ((ty as libc::c_ulong) << 8)
        | nr as libc::c_ulong
}
const IOC_WRITE: libc::c_ulong = 1;
const IOC_READ: libc::c_ulong = 2;
/// `EXT4_IOC_RESIZE_FS`: `_IOW('f', 16, __u64)`, the new block count.
pub const EXT4_IOC_RESIZE_FS: libc::c_ulong = ioc(IOC_WRITE, b'f', 16, 8);
/// `FIFREEZE` and `FITHAW`: `_IOWR('X', 119/120, int)`, on any file of the
/// filesystem (the argument is unused).
pub const FIFREEZE: libc::c_ulong = ioc(IOC_READ | IOC_WRITE, b'X', 119, 4);
pub const FITHAW: libc::c_ulong = ioc(IOC_READ | IOC_WRITE, b'X', 120, 4);

/// The mount flags of a data volume: never device nodes or set-id
/// programs, programs only when the recipe asks (`exec`).
pub fn mount_flags(volume: &DataVolume) -> libc::c_ulong {
    let mut flags = libc::MS_NODEV | libc::MS_NOSUID;
    if !volume.exec {
        flags |= libc::MS_NOEXEC;
    }
    if volume.read_only {
        flags |= libc::MS_RDONLY;
    }
    flags
}

/// What an `e2fsck -p` exit code means (`e2fsck(8)`: a bit mask).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FsckOutcome {
    Clean,
    Corrected,
    /// Corrected; e2fsck wants a reboot, which matters only for a mounted
    /// root: a data volume is checked before it is mounted.
    CorrectedRebootWanted,
    /// Errors left uncorrected (4), an operational or usage error (8, 16),
    /// cancelled (32), a library error (128), or killed.
    Failed,
}

impl FsckOutcome {
    pub fn from_exit_code(code: i32) -> FsckOutcome {
        if !(0..4).contains(&code) {
            FsckOutcome::Failed
        } else if code & 2 != 0 {
            FsckOutcome::CorrectedRebootWanted
        } else if code & 1 != 0 {
            FsckOutcome::Corrected
        } else {
            FsckOutcome::Clean
        }
    }

    fn describe(self) -> &'static str {
        match self {
            FsckOutcome::Clean => "clean",
            FsckOutcome::Corrected => "errors corrected",
            FsckOutcome::CorrectedRebootWanted => {
                "errors corrected (reboot wanted, not needed here)"
            }
            FsckOutcome::Failed => "errors left uncorrected",
        }
    }
}

/// The size of an ext4 filesystem, from its superblock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ext4Size {
    pub block_size: u64,
    pub blocks: u64,
}

impl Ext4Size {
    pub fn bytes(self) -> u64 {
        self.block_size * self.blocks
    }

    /// Reads the superblock at byte 1024 of a device or image (`sb` holds
    /// the bytes from 1024 on): `None` when it is not ext2/3/4.
    pub fn parse(sb: &[u8]) -> Option<Ext4Size> {
        let u32_at = |at: usize| -> Option<u32> {
            Some(u32::from_le_bytes(sb.get(at..at + 4)?.try_into().ok()?))
        };
        let magic = u16::from_le_bytes(sb.get(0x38..0x3a)?.try_into().ok()?);
        if magic != 0xef53 {
            return None;
        }
        let log_block_size = u32_at(0x18)?;
        if log_block_size > 6 {
            return None;
        }
        let incompat = u32_at(0x60)?;
        const INCOMPAT_64BIT: u32 = 0x80;
        let hi = if incompat & INCOMPAT_64BIT != 0 {
            u64::from(u32_at(0x150)?)
        } else {
            0
        };
        Some(Ext4Size {
            block_size: 1024 << log_block_size,
            blocks: hi << 32 | u64::from(u32_at(0x04)?),
        })
    }

    /// Reads the superblock from a block device (through its page cache,
    /// which the mounted filesystem's own superblock buffer is part of, so
    /// a resize shows at once).
    fn read(dev: &str) -> io::Result<Ext4Size> {
        use std::os::unix::fs::FileExt;
        let mut sb = vec![0u8; 1024];
        File::open(dev)?.read_exact_at(&mut sb, 1024)?;
        Ext4Size::parse(&sb)
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "no ext4 superblock"))
    }
}

#[derive(Debug, thiserror::Error)]
pub enum MountVolumeError {
    #[error("volume {name} at {path}: the guest mounts only ext4, not {fs}")]
    UnsupportedFs {
        name: String,
        path: String,
        fs: String,
    },
    #[error("volume {name}")]
    BadPath {
        name: String,
        #[source]
        source: InvalidInputError,
    },
    #[error("volume {name} at {path}: no disk with serial {serial} appeared")]
    NoDisk {
        name: String,
        path: String,
        serial: String,
    },
    #[error("volume {name} at {path}: e2fsck on {dev} left errors uncorrected (exit code {code}: {said}); not mounted, run e2fsck -f on the volume")]
    Uncorrected {
        name: String,
        path: String,
        dev: String,
        code: i32,
        said: String,
    },
    #[error("volume {name}: cannot create its mount point {path}: its parent is on the read-only root (mount it under a writable directory, or create the directory in the image)")]
    ReadOnlyParent { name: String, path: String },
    #[error("volume {name}: cannot create its mount point {path}")]
    MountPoint {
        name: String,
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("volume {name}: cannot mount {dev} at {path} as ext4")]
    Mount {
        name: String,
        dev: String,
        path: String,
        #[source]
        source: io::Error,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum GrowVolumeError {
    #[error("no data volume with serial {serial} is mounted")]
    Unknown { serial: String },
    #[error("volume {name} is mounted read-only")]
    ReadOnly { name: String },
    #[error("volume {name} is frozen for a snapshot; thaw it first")]
    Frozen { name: String },
    #[error("volume {name}: cannot read the size of its disk {disk}")]
    DiskSize {
        name: String,
        disk: String,
        #[source]
        source: io::Error,
    },
    #[error("volume {name}: cannot read the ext4 superblock of {dev}")]
    Superblock {
        name: String,
        dev: String,
        #[source]
        source: io::Error,
    },
    #[error("volume {name}: cannot grow {path} to {blocks} blocks of {block_size} bytes")]
    Resize {
        name: String,
        path: String,
        blocks: u64,
        block_size: u64,
        #[source]
        source: io::Error,
    },
}

#[derive(Debug, thiserror::Error)]
#[error("cannot freeze volume {name} at {path}")]
pub struct FreezeVolumesError {
    name: String,
    path: String,
    #[source]
    source: io::Error,
}

/// A mounted data volume.
#[derive(Debug, Clone)]
struct Mounted {
    name: String,
    path: String,
    serial: String,
    /// `/dev/vdc`.
    dev: String,
    read_only: bool,
    /// As mounted ([`mount_flags`]): a remount must give them again.
    flags: libc::c_ulong,
}

impl Mounted {
    /// The disk's name in /sys/block (`vdc`).
    fn disk(&self) -> &str {
        self.dev.trim_start_matches("/dev/")
    }
}

/// Whether the volumes are frozen, and which freeze the pending self-thaw
/// belongs to (a later freeze restarts the bound).
#[derive(Debug, Default)]
struct FreezeState {
    frozen: bool,
    generation: u64,
}

/// The data volumes this guest mounted at boot.
#[derive(Debug, Default)]
pub struct DataVolumes {
    mounted: Vec<Mounted>,
    freeze: Mutex<FreezeState>,
}

/// Finds, checks and mounts every volume in `volumes`, in order; grows
/// each read-write one that is smaller than its disk. On an error, what
/// was mounted already is unmounted again.
pub fn mount_all(volumes: &[DataVolume]) -> Result<DataVolumes, MountVolumeError> {
    let mut done = DataVolumes::default();
    let e2fsck = E2FSCK_PATHS.iter().find(|p| Path::new(p).is_file());
    if e2fsck.is_none() && !volumes.is_empty() {
        log("data volumes are not checked: the image has no e2fsck (the kernel replays their journal at mount)");
    }
    for volume in volumes {
        match mount_one(volume, e2fsck.copied()) {
            Ok(mounted) => done.mounted.push(mounted),
            Err(err) => {
                done.release();
                return Err(err);
            }
        }
    }
    for mounted in done.mounted.iter().filter(|m| !m.read_only) {
        match done.grow_mounted(mounted) {
            Ok((before, after)) if after != before => log(&format!(
                "volume {} at {}: grew from {} to {} to fill its disk",
                mounted.name,
                mounted.path,
                mib(before),
                mib(after)
            )),
            Ok(_) => {}
            // It works at the size it has: the services start.
            Err(err) => log(&format!("{}; it keeps its size", chain(&err))),
        }
    }
    Ok(done)
}

fn mount_one(volume: &DataVolume, e2fsck: Option<&str>) -> Result<Mounted, MountVolumeError> {
    let (name, path) = (volume.name.clone(), volume.path.clone());
    if volume.fs != "ext4" {
        return Err(MountVolumeError::UnsupportedFs {
            name,
            path,
            fs: volume.fs.clone(),
        });
    }
    // The host checked it; a guest mounts nothing over its own system
    // directories whatever the instance file says.
    vroom_types::check_mount_path(&path).map_err(|source| MountVolumeError::BadPath {
        name: name.clone(),
        source,
    })?;
    let dev =
        crate::disk::find_disk(&volume.serial, None).map_err(|_| MountVolumeError::NoDisk {
            name: name.clone(),
            path: path.clone(),
            serial: volume.serial.clone(),
        })?;
    let disk = dev.trim_start_matches("/dev/");
    let disk_read_only =
        fs::read_to_string(format!("/sys/block/{disk}/ro")).is_ok_and(|ro| ro.trim() == "1");
    match e2fsck {
        // e2fsck -p writes its repairs; a disk QEMU attached read-only
        // takes none (nor a journal replay: the mount says so).
        Some(_) if disk_read_only => log(&format!(
            "volume {name} ({dev}): not checked, its disk is read-only"
        )),
        Some(e2fsck) => check(volume, &dev, e2fsck)?,
        None => {}
    }
    if let Err(source) = fs::create_dir_all(&path) {
        return Err(if source.raw_os_error() == Some(libc::EROFS) {
            MountVolumeError::ReadOnlyParent { name, path }
        } else {
            MountVolumeError::MountPoint { name, path, source }
        });
    }
    let flags = mount_flags(volume);
    let mut mounted = crate::disk::sys_mount(&dev, &path, "ext4", flags, "");
    if disk_read_only
        && mounted
            .as_ref()
            .is_err_and(|e| e.raw_os_error() == Some(libc::EROFS))
    {
        // Its journal holds writes a VM killed before it unmounted the
        // volume never put in place, and a read-only disk cannot take the
        // replay: mount what the filesystem has without them, and say so.
        log(&format!(
            "volume {name} ({dev}): was not cleanly unmounted and its disk is read-only: mounted without replaying its journal, its last writes are missing"
        ));
        mounted = crate::disk::sys_mount(&dev, &path, "ext4", flags, "noload");
    }
    mounted.map_err(|source| MountVolumeError::Mount {
        name: name.clone(),
        dev: dev.clone(),
        path: path.clone(),
        source,
    })?;
    log(&format!(
        "volume {name}: mounted {dev} at {path} ({})",
        describe_flags(flags)
    ));
    Ok(Mounted {
        name,
        path,
        serial: volume.serial.clone(),
        dev,
        read_only: volume.read_only,
        flags,
    })
}

/// Runs `e2fsck -p` on the volume's disk and logs what it did; a volume it
/// could not repair is refused.
fn check(volume: &DataVolume, dev: &str, e2fsck: &str) -> Result<(), MountVolumeError> {
    let argv = [e2fsck.to_string(), "-p".into(), dev.to_string()];
    let (code, stdout, stderr) = crate::command::run_unreaped(&argv, E2FSCK_TIMEOUT);
    let outcome = FsckOutcome::from_exit_code(code);
    let said = format!("{stdout}\n{stderr}");
    let said: Vec<&str> = said.lines().filter(|l| !l.trim().is_empty()).collect();
    log(&format!(
        "volume {} ({dev}): e2fsck -p: {} (exit code {code}){}{}",
        volume.name,
        outcome.describe(),
        if said.is_empty() { "" } else { ": " },
        said.join(" / ")
    ));
    if outcome == FsckOutcome::Failed {
        return Err(MountVolumeError::Uncorrected {
            name: volume.name.clone(),
            path: volume.path.clone(),
            dev: dev.to_string(),
            code,
            said: fsck_reason(&said, dev),
        });
    }
    Ok(())
}

/// The line of e2fsck's output that says what is wrong, without the device
/// name it starts with. In preen mode e2fsck names the problem, then stops
/// with "UNEXPECTED INCONSISTENCY; RUN fsck MANUALLY." and a hint.
fn fsck_reason(lines: &[&str], dev: &str) -> String {
    let stop = lines
        .iter()
        .position(|l| l.contains("UNEXPECTED INCONSISTENCY"));
    let line = match stop {
        Some(at) if at > 0 => lines[at - 1],
        Some(at) => lines[at],
        None => lines
            .iter()
            .rev()
            .find(|l| !l.starts_with(['(', ' ', '\t']))
            .copied()
            .unwrap_or("no output"),
    };
    let line = line.trim();
    line.strip_prefix(&format!("{dev}: "))
        .unwrap_or(line)
        .trim()
        .to_string()
}

fn describe_flags(flags: libc::c_ulong) -> String {
    let names = [
        (libc::MS_RDONLY, "ro"),
        (libc::MS_NODEV, "nodev"),
        (libc::MS_NOSUID, "nosuid"),
        (libc::MS_NOEXEC, "noexec"),
    ];
    let mut set: Vec<&str> = names
        .iter()
        .filter(|(bit, _)| flags & bit != 0)
        .map(|(_, name)| *name)
        .collect();
    if flags & libc::MS_RDONLY == 0 {
        set.insert(0, "rw");
    }
    set.join(",")
}

/// An ioctl on the mount point's directory.
fn ioctl_on(path: &str, request: libc::c_ulong, arg: *const libc::c_void) -> io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let dir = fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECTORY)
        .open(path)?;
    // SAFETY: the fd is ours; `arg` is what `request` expects (callers pass
    // a pointer to a live u64, or null where the argument is unused).
    if unsafe { libc::ioctl(dir.as_raw_fd(), request as _, arg) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

impl DataVolumes {
    /// Grows the mounted volume with this disk serial to fill its disk:
    /// its filesystem's size before and after, in bytes.
    pub fn grow(&self, serial: &str) -> Result<(u64, u64), GrowVolumeError> {
        let mounted = self
            .mounted
            .iter()
            .find(|m| m.serial == serial)
            .ok_or_else(|| GrowVolumeError::Unknown {
                serial: serial.to_string(),
            })?;
        if mounted.read_only {
            return Err(GrowVolumeError::ReadOnly {
                name: mounted.name.clone(),
            });
        }
        // Held across the resize, so that no freeze starts under it (a
        // resize on a frozen filesystem would wait for the thaw).
        let freeze = self.freeze.lock_unpoisoned();
        if freeze.frozen {
            return Err(GrowVolumeError::Frozen {
                name: mounted.name.clone(),
            });
        }
        let grown = self.grow_mounted(mounted)?;
        drop(freeze);
        if grown.1 != grown.0 {
            log(&format!(
                "volume {} at {}: grew from {} to {}",
                mounted.name,
                mounted.path,
                mib(grown.0),
                mib(grown.1)
            ));
        }
        Ok(grown)
    }

    fn grow_mounted(&self, mounted: &Mounted) -> Result<(u64, u64), GrowVolumeError> {
        let name = || mounted.name.clone();
        let sectors_file = format!("/sys/block/{}/size", mounted.disk());
        let disk_bytes = fs::read_to_string(&sectors_file)
            .and_then(|s| {
                s.trim()
                    .parse::<u64>()
                    .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
            })
            .map_err(|source| GrowVolumeError::DiskSize {
                name: name(),
                disk: mounted.disk().to_string(),
                source,
            })?
            * 512;
        let superblock = |source| GrowVolumeError::Superblock {
            name: name(),
            dev: mounted.dev.clone(),
            source,
        };
        let before = Ext4Size::read(&mounted.dev).map_err(superblock)?;
        let blocks = disk_bytes / before.block_size;
        if blocks <= before.blocks {
            return Ok((before.bytes(), before.bytes()));
        }
        ioctl_on(
            &mounted.path,
            EXT4_IOC_RESIZE_FS,
            (&blocks as *const u64).cast(),
        )
        .map_err(|source| GrowVolumeError::Resize {
            name: name(),
            path: mounted.path.clone(),
            blocks,
            block_size: before.block_size,
            source,
        })?;
        // The kernel may stop short of the disk's end (a last block group
        // too small to hold its metadata): the superblock says how far.
        let after = Ext4Size::read(&mounted.dev).map_err(superblock)?;
        Ok((before.bytes(), after.bytes()))
    }

    /// Freezes every mounted volume (`FIFREEZE` flushes it first), and
    /// thaws them again after [`VOLUME_FREEZE_BOUND_MS`] unless a thaw or
    /// another freeze came. All or none: on an error, what was frozen is
    /// thawed. Returns the mount paths.
    pub fn freeze(self: &Arc<Self>) -> Result<Vec<String>, FreezeVolumesError> {
        let mut state = self.freeze.lock_unpoisoned();
        if !state.frozen {
            for (index, mounted) in self.mounted.iter().enumerate() {
                if let Err(source) = ioctl_on(&mounted.path, FIFREEZE, std::ptr::null()) {
                    self.thaw_these(&self.mounted[..index]);
                    return Err(FreezeVolumesError {
                        name: mounted.name.clone(),
                        path: mounted.path.clone(),
                        source,
                    });
                }
            }
            state.frozen = true;
            log("data volumes frozen");
        }
        state.generation += 1;
        let generation = state.generation;
        drop(state);
        let volumes = Arc::downgrade(self);
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(VOLUME_FREEZE_BOUND_MS));
            let Some(volumes) = volumes.upgrade() else {
                return;
            };
            let mut state = volumes.freeze.lock_unpoisoned();
            if state.frozen && state.generation == generation {
                volumes.thaw_these(&volumes.mounted);
                state.frozen = false;
                log(&format!(
                    "data volumes thawed after {VOLUME_FREEZE_BOUND_MS} ms without a thaw from the host"
                ));
            }
        });
        Ok(self.paths())
    }

    /// Thaws the volumes if they are frozen; returns the mount paths thawed.
    pub fn thaw(&self) -> Vec<String> {
        let mut state = self.freeze.lock_unpoisoned();
        if !state.frozen {
            return vec![];
        }
        self.thaw_these(&self.mounted);
        state.frozen = false;
        log("data volumes thawed");
        self.paths()
    }

    fn thaw_these(&self, volumes: &[Mounted]) {
        for mounted in volumes {
            // EINVAL: not frozen (someone in the guest thawed it).
            match ioctl_on(&mounted.path, FITHAW, std::ptr::null()) {
                Err(err) if err.raw_os_error() != Some(libc::EINVAL) => log(&format!(
                    "thaw volume {} at {}: {err}",
                    mounted.name, mounted.path
                )),
                _ => {}
            }
        }
    }

    fn paths(&self) -> Vec<String> {
        self.mounted.iter().map(|m| m.path.clone()).collect()
    }

    /// How full each mounted volume is.
    pub fn usage(&self) -> Vec<VolumeUsage> {
        let frozen = self.freeze.lock_unpoisoned().frozen;
        self.mounted
            .iter()
            .filter_map(|mounted| {
                let st = statvfs(&mounted.path)
                    .map_err(|e| log(&format!("statvfs {}: {e}", mounted.path)))
                    .ok()?;
                let fragment = st.f_frsize as u64;
                Some(VolumeUsage {
                    name: mounted.name.clone(),
                    path: mounted.path.clone(),
                    total_bytes: st.f_blocks as u64 * fragment,
                    used_bytes: (st.f_blocks as u64).saturating_sub(st.f_bfree as u64) * fragment,
                    available_bytes: st.f_bavail as u64 * fragment,
                    inodes_total: st.f_files as u64,
                    inodes_available: st.f_favail as u64,
                    read_only: mounted.read_only,
                    frozen,
                })
            })
            .collect()
    }

    /// Before power-off: thaws, then unmounts each volume (its journal is
    /// then clean); one that is busy (an exec'd command still holds a file)
    /// is remounted read-only instead, or at least flushed.
    pub fn release(&self) {
        self.thaw();
        for mounted in self.mounted.iter().rev() {
            let Ok(path) = CString::new(mounted.path.as_str()) else {
                continue;
            };
            // SAFETY: a valid C string; null source, type and data are
            // what a remount takes.
            let released = unsafe {
                libc::umount2(path.as_ptr(), 0) == 0
                    || libc::mount(
                        std::ptr::null(),
                        path.as_ptr(),
                        std::ptr::null(),
                        libc::MS_REMOUNT | libc::MS_RDONLY | mounted.flags,
                        std::ptr::null(),
                    ) == 0
            };
            if !released {
                log(&format!(
                    "volume {} at {}: busy, left mounted ({}); flushed",
                    mounted.name,
                    mounted.path,
                    io::Error::last_os_error()
                ));
                if let Ok(dir) = File::open(&mounted.path) {
                    // SAFETY: plain syscall on an fd we own.
                    unsafe { libc::syncfs(dir.as_raw_fd()) };
                }
            }
        }
    }
}

fn statvfs(path: &str) -> io::Result<libc::statvfs> {
    let c = CString::new(path).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    let mut st = std::mem::MaybeUninit::<libc::statvfs>::zeroed();
    // SAFETY: a valid C string and a buffer of the right type.
    if unsafe { libc::statvfs(c.as_ptr(), st.as_mut_ptr()) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: statvfs filled it.
    Ok(unsafe { st.assume_init() })
}

fn mib(bytes: u64) -> String {
    format!("{} MiB", bytes >> 20)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn volume(read_only: bool, exec: bool) -> DataVolume {
        DataVolume {
            serial: "vroom-vol-0".into(),
            name: "data".into(),
            path: "/var/lib/data".into(),
            fs: "ext4".into(),
            read_only,
            exec,
        }
    }

    #[test]
    fn mount_flags_table() {
        use libc::{MS_NODEV, MS_NOEXEC, MS_NOSUID, MS_RDONLY};
        // (read_only, exec, flags, as logged)
        let cases = [
            (
                false,
                false,
                MS_NODEV | MS_NOSUID | MS_NOEXEC,
                "rw,nodev,nosuid,noexec",
            ),
            (false, true, MS_NODEV | MS_NOSUID, "rw,nodev,nosuid"),
            (
                true,
                false,
                MS_RDONLY | MS_NODEV | MS_NOSUID | MS_NOEXEC,
                "ro,nodev,nosuid,noexec",
            ),
            (
                true,
                true,
                MS_RDONLY | MS_NODEV | MS_NOSUID,
                "ro,nodev,nosuid",
            ),
        ];
        for (read_only, exec, flags, shown) in cases {
            let got = mount_flags(&volume(read_only, exec));
            assert_eq!(got, flags, "read_only={read_only} exec={exec}");
            assert_eq!(describe_flags(got), shown);
        }
    }

    #[test]
    fn e2fsck_exit_codes() {
        use FsckOutcome::*;
        let cases = [
            (0, Clean),
            (1, Corrected),
            (2, CorrectedRebootWanted),
            (3, CorrectedRebootWanted),
            (4, Failed),
            (5, Failed),
            (8, Failed),
            (12, Failed),
            (16, Failed),
            (32, Failed),
            (128, Failed),
            // run_unreaped's codes: not found, killed at the timeout.
            (127, Failed),
            (137, Failed),
            (-1, Failed),
        ];
        for (code, outcome) in cases {
            assert_eq!(
                FsckOutcome::from_exit_code(code),
                outcome,
                "exit code {code}"
            );
        }
    }

    /// The values `<linux/ext4.h>` and `<linux/fs.h>` give on x86_64.
    #[test]
    fn ioctl_numbers() {
        assert_eq!(EXT4_IOC_RESIZE_FS, 0x4008_6610);
        assert_eq!(FIFREEZE, 0xc004_5877);
        assert_eq!(FITHAW, 0xc004_5878);
    }

    #[test]
    fn superblock_fields() {
        let mut sb = vec![0u8; 1024];
        assert_eq!(Ext4Size::parse(&sb), None, "no magic");
        sb[0x38..0x3a].copy_from_slice(&0xef53u16.to_le_bytes());
        sb[0x04..0x08].copy_from_slice(&0x1000u32.to_le_bytes());
        sb[0x18..0x1c].copy_from_slice(&2u32.to_le_bytes());
        sb[0x150..0x154].copy_from_slice(&1u32.to_le_bytes());
        let small = Ext4Size {
            block_size: 4096,
            blocks: 0x1000,
        };
        assert_eq!(
            Ext4Size::parse(&sb),
            Some(small),
            "the high half needs 64bit"
        );
        sb[0x60..0x64].copy_from_slice(&0x80u32.to_le_bytes());
        assert_eq!(
            Ext4Size::parse(&sb),
            Some(Ext4Size {
                block_size: 4096,
                blocks: (1 << 32) | 0x1000,
            })
        );
        assert_eq!(Ext4Size::parse(&sb[..0x40]), None, "cut short");
        sb[0x18..0x1c].copy_from_slice(&40u32.to_le_bytes());
        assert_eq!(Ext4Size::parse(&sb), None, "absurd block size");
    }

    /// What the host's mkfs.ext4 writes reads back as its size.
    #[test]
    fn superblock_of_a_real_mkfs() {
        let dir = std::env::temp_dir().join(format!("vroom-init-sb-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let image = dir.join("vol.img");
        File::create(&image).unwrap().set_len(64 << 20).unwrap();
        let status = std::process::Command::new("mkfs.ext4")
            .args(["-F", "-q", "-b", "4096"])
            .arg(&image)
            .status()
            .expect("mkfs.ext4 (e2fsprogs) is needed by this test");
        assert!(status.success());
        let size = Ext4Size::read(image.to_str().unwrap()).unwrap();
        fs::remove_dir_all(&dir).unwrap();
        assert_eq!(
            size,
            Ext4Size {
                block_size: 4096,
                blocks: (64 << 20) / 4096,
            }
        );
    }

    /// e2fsck 1.47's output for a volume whose root inode was cleared.
    #[test]
    fn the_reason_e2fsck_stopped() {
        let dev = "/dev/vdc";
        let cases: &[(&[&str], &str)] = &[
            (
                &[
                    "/dev/vdc was not cleanly unmounted, check forced.",
                    "/dev/vdc: Root inode is not a directory.  ",
                    "/dev/vdc: UNEXPECTED INCONSISTENCY; RUN fsck MANUALLY.",
                    "\t(i.e., without -a or -p options)",
                ],
                "Root inode is not a directory.",
            ),
            (
                &["e2fsck: Bad magic number in super-block while trying to open /dev/vdc"],
                "e2fsck: Bad magic number in super-block while trying to open /dev/vdc",
            ),
            (&[], "no output"),
        ];
        for (lines, want) in cases {
            assert_eq!(fsck_reason(lines, dev), *want, "{lines:?}");
        }
    }

    #[test]
    fn errors_are_one_line_and_name_the_volume() {
        let err = MountVolumeError::Uncorrected {
            name: "data".into(),
            path: "/var/lib/data".into(),
            dev: "/dev/vdc".into(),
            code: 4,
            said: "vdc: UNEXPECTED INCONSISTENCY; RUN fsck MANUALLY.".into(),
        };
        let line = chain(&err);
        assert!(line.contains("volume data at /var/lib/data"), "{line}");
        assert!(!line.contains('\n'), "{line}");
        let err = MountVolumeError::Mount {
            name: "data".into(),
            dev: "/dev/vdc".into(),
            path: "/var/lib/data".into(),
            source: io::Error::from_raw_os_error(libc::EINVAL),
        };
        assert_eq!(
            chain(&err),
            format!(
                "volume data: cannot mount /dev/vdc at /var/lib/data as ext4: {}",
                io::Error::from_raw_os_error(libc::EINVAL)
            )
        );
    }

    /// A volume the guest does not know how to mount, or one over a system
    /// directory, is refused before any disk is looked for.
    #[test]
    fn refused_before_looking_for_the_disk() {
        let mut xfs = volume(false, false);
        xfs.fs = "xfs".into();
        assert!(matches!(
            mount_one(&xfs, None),
            Err(MountVolumeError::UnsupportedFs { .. })
        ));
        let mut etc = volume(false, false);
        etc.path = "/etc/x".into();
        assert!(matches!(
            mount_one(&etc, None),
            Err(MountVolumeError::BadPath { .. })
        ));
    }
}
