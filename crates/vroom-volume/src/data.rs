//! Data volumes on the host: one sparse raw file per volume, formatted by
//! the host when it is made and owned by the guest afterwards.
//!
//! **Layout.** `<volumes dir>/<id>/volume.img`. A volume is made in
//! `<volumes dir>/.new-<id>/` and renamed into place only when its file is
//! formatted and synced, so a crash leaves either no volume directory or a
//! whole one (the engine removes `.new-*` directories and directories no
//! record names when it starts).
//!
//! **Why raw.** A raw file is what a plain virtio-blk disk without vroom
//! uses, so a volume costs nothing over it; ext4 on the host has no reflink,
//! so a copy-on-write format would buy cheap copies at the price of every
//! write. The host never reads the filesystem inside after it formatted it:
//! what a guest wrote there is its own (the guest checks it with `e2fsck`).

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use vroom_types::VolumeFs;

/// The volume's file inside its directory.
pub const DATA_FILE: &str = "volume.img";
/// The prefix of a directory a volume is being made in.
pub const NEW_PREFIX: &str = ".new-";

#[derive(Debug, thiserror::Error)]
pub enum CreateDataVolumeError {
    #[error(
        "not enough disk space for volume {name}: it needs {need_mib} MiB, {free_mib} MiB are free"
    )]
    NoSpace {
        name: String,
        need_mib: u64,
        free_mib: u64,
    },
    #[error("cannot create volume {name} in {dir}")]
    Io {
        name: String,
        dir: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot format volume {name}: {tool} {reason}")]
    Format {
        name: String,
        tool: &'static str,
        reason: String,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum GrowDataVolumeError {
    #[error("volume {name} is {have_mib} MiB; volumes only grow")]
    Shrink { name: String, have_mib: u64 },
    #[error(
        "not enough disk space to grow volume {name} by {need_mib} MiB: {free_mib} MiB are free"
    )]
    NoSpace {
        name: String,
        need_mib: u64,
        free_mib: u64,
    },
    #[error("cannot grow volume {name}")]
    Io {
        name: String,
        #[source]
        source: io::Error,
    },
}

/// The directory of volume `id`.
pub fn volume_dir(volumes_dir: &Path, id: &str) -> PathBuf {
    volumes_dir.join(id)
}

/// The file of volume `id`.
pub fn volume_file(volumes_dir: &Path, id: &str) -> PathBuf {
    volume_dir(volumes_dir, id).join(DATA_FILE)
}

/// Bytes free for an unprivileged writer on the filesystem holding `dir`.
pub fn free_bytes(dir: &Path) -> io::Result<u64> {
    let st = rustix::fs::statvfs(dir)?;
    Ok(st.f_bavail.saturating_mul(st.f_frsize))
}

/// Makes volume `id` of `size_mib` under `volumes_dir`, formatted with
/// `fs` and labelled `name`. Refused before anything is written when the
/// host's disk has less free space than the volume's size (the file is
/// sparse, but a volume the host cannot fill is a lie to the guest).
/// Nothing is left behind on failure.
pub fn create(
    volumes_dir: &Path,
    id: &str,
    name: &str,
    size_mib: u64,
    fs_type: VolumeFs,
) -> Result<PathBuf, CreateDataVolumeError> {
    let io_err = |source| CreateDataVolumeError::Io {
        name: name.to_string(),
        dir: volumes_dir.to_path_buf(),
        source,
    };
    check_room(volumes_dir, name, size_mib)?;
    let staging = staging_dir(volumes_dir, id);
    let result = (|| {
        fs::create_dir(&staging).map_err(io_err)?;
        let file = staging.join(DATA_FILE);
        let f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&file)
            .map_err(io_err)?;
        f.set_len(size_mib << 20).map_err(io_err)?;
        drop(f);
        format(&file, name, fs_type)?;
        File::open(&file)
            .and_then(|f| f.sync_all())
            .map_err(io_err)?;
        sync_dir(&staging).map_err(io_err)?;
        let dir = volume_dir(volumes_dir, id);
        fs::rename(&staging, &dir).map_err(io_err)?;
        sync_dir(volumes_dir).map_err(io_err)?;
        Ok(dir.join(DATA_FILE))
    })();
    if result.is_err() {
        let _ = fs::remove_dir_all(&staging);
    }
    result
}

/// Refuses a volume of `size_mib` when the host's disk has less free
/// space (the file is sparse, but a volume the host cannot fill is a lie to
/// the guest). Makes `volumes_dir` when missing.
fn check_room(volumes_dir: &Path, name: &str, size_mib: u64) -> Result<(), CreateDataVolumeError> {
    let io_err = |source| CreateDataVolumeError::Io {
        name: name.to_string(),
        dir: volumes_dir.to_path_buf(),
        source,
    };
    fs::create_dir_all(volumes_dir).map_err(io_err)?;
    let free = free_bytes(volumes_dir).map_err(io_err)?;
    if size_mib.saturating_mul(1 << 20) > free {
        return Err(CreateDataVolumeError::NoSpace {
            name: name.to_string(),
            need_mib: size_mib,
            free_mib: free >> 20,
        });
    }
    Ok(())
}

/// The staging directory volume `id` is made in.
pub fn staging_dir(volumes_dir: &Path, id: &str) -> PathBuf {
    volumes_dir.join(format!("{NEW_PREFIX}{id}"))
}

/// Makes the staging file of an import: `<volumes dir>/.new-<id>/volume.img`,
/// `size_mib` of zeros (a hole), checked against the free space like
/// [`create`]. A client writes the image into it (over NBD), then
/// [`finish_import`] puts it in place; until then no record names it, and a
/// restarted vroomd removes it with the other staging directories.
pub fn stage_import(
    volumes_dir: &Path,
    id: &str,
    name: &str,
    size_mib: u64,
) -> Result<PathBuf, CreateDataVolumeError> {
    check_room(volumes_dir, name, size_mib)?;
    let staging = staging_dir(volumes_dir, id);
    let made = (|| {
        fs::create_dir(&staging)?;
        let file = staging.join(DATA_FILE);
        OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&file)?
            .set_len(size_mib << 20)?;
        Ok(file)
    })();
    made.map_err(|source| {
        let _ = fs::remove_dir_all(&staging);
        CreateDataVolumeError::Io {
            name: name.to_string(),
            dir: volumes_dir.to_path_buf(),
            source,
        }
    })
}

#[derive(Debug, thiserror::Error)]
pub enum FinishImportError {
    #[error("the image of volume {name} is not an ext4 filesystem (no ext4 superblock at 1 KiB)")]
    NotExt4 { name: String },
    #[error("cannot put the imported volume {name} in place")]
    Io {
        name: String,
        #[source]
        source: io::Error,
    },
}

/// Puts an import's staging file in place as volume `id` once it holds an
/// ext4 filesystem: synced, then renamed, like [`create`]. The staging
/// directory is left for the caller to remove on an error.
pub fn finish_import(
    volumes_dir: &Path,
    id: &str,
    name: &str,
) -> Result<PathBuf, FinishImportError> {
    let io_err = |source| FinishImportError::Io {
        name: name.to_string(),
        source,
    };
    let staging = staging_dir(volumes_dir, id);
    let file = staging.join(DATA_FILE);
    let f = File::open(&file).map_err(io_err)?;
    if !is_ext4(&f).map_err(io_err)? {
        return Err(FinishImportError::NotExt4 {
            name: name.to_string(),
        });
    }
    f.sync_all().map_err(io_err)?;
    sync_dir(&staging).map_err(io_err)?;
    let dir = volume_dir(volumes_dir, id);
    fs::rename(&staging, &dir).map_err(io_err)?;
    sync_dir(volumes_dir).map_err(io_err)?;
    Ok(dir.join(DATA_FILE))
}

/// Whether a raw image starts with an ext2/3/4 superblock (magic 0xEF53 at
/// byte 1080). Only those two bytes are read: what is inside stays the
/// guest's to check.
pub fn is_ext4(file: &File) -> io::Result<bool> {
    use std::os::unix::fs::FileExt;
    let mut magic = [0u8; 2];
    match file.read_exact_at(&mut magic, 1080) {
        Ok(()) => Ok(magic == [0x53, 0xef]),
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Ok(false),
        Err(e) => Err(e),
    }
}

/// Makes volume `id` under `volumes_dir` as a copy of `source` (a
/// snapshot), the same way as [`create`]: whole or not at all.
pub fn create_from(
    volumes_dir: &Path,
    id: &str,
    name: &str,
    source: &Path,
) -> Result<PathBuf, CreateDataVolumeError> {
    let io_err = |source| CreateDataVolumeError::Io {
        name: name.to_string(),
        dir: volumes_dir.to_path_buf(),
        source,
    };
    let need = allocated_bytes(source);
    let free = free_bytes(volumes_dir).map_err(io_err)?;
    if need > free {
        return Err(CreateDataVolumeError::NoSpace {
            name: name.to_string(),
            need_mib: need.div_ceil(1 << 20),
            free_mib: free >> 20,
        });
    }
    let staging = staging_dir(volumes_dir, id);
    let result = (|| {
        fs::create_dir(&staging).map_err(io_err)?;
        copy_sparse(source, &staging.join(DATA_FILE)).map_err(io_err)?;
        sync_dir(&staging).map_err(io_err)?;
        let dir = volume_dir(volumes_dir, id);
        fs::rename(&staging, &dir).map_err(io_err)?;
        sync_dir(volumes_dir).map_err(io_err)?;
        Ok(dir.join(DATA_FILE))
    })();
    if result.is_err() {
        let _ = fs::remove_dir_all(&staging);
    }
    result
}

/// Replaces a volume's file with a freshly formatted one of `size_mib`
/// (an ephemeral instance's clean slate): the old file until the new one
/// is whole, then the new one.
pub fn reset(
    file: &Path,
    name: &str,
    size_mib: u64,
    fs_type: VolumeFs,
) -> Result<(), CreateDataVolumeError> {
    let io_err = |source| CreateDataVolumeError::Io {
        name: name.to_string(),
        dir: file.parent().unwrap_or(Path::new("/")).to_path_buf(),
        source,
    };
    let staging = staging_path(file);
    let _ = fs::remove_file(&staging);
    let result = (|| {
        let f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&staging)
            .map_err(io_err)?;
        f.set_len(size_mib << 20).map_err(io_err)?;
        drop(f);
        format(&staging, name, fs_type)?;
        File::open(&staging)
            .and_then(|f| f.sync_all())
            .map_err(io_err)?;
        fs::rename(&staging, file).map_err(io_err)?;
        sync_dir(file.parent().unwrap_or(Path::new("/"))).map_err(io_err)
    })();
    if result.is_err() {
        let _ = fs::remove_file(&staging);
    }
    result
}

/// Where volume `id`'s snapshots are kept.
pub fn snapshots_dir(volumes_dir: &Path, id: &str) -> PathBuf {
    volume_dir(volumes_dir, id).join("snapshots")
}

/// The file of snapshot `snapshot` of volume `id`.
pub fn snapshot_file(volumes_dir: &Path, id: &str, snapshot: &str) -> PathBuf {
    snapshots_dir(volumes_dir, id).join(format!("{snapshot}.img"))
}

/// Copies `from` to `to` through a staging file beside it that is renamed
/// into place once synced: `to` is the old file or the whole new one,
/// never a part. Returns the bytes copied.
pub fn copy_into_place(from: &Path, to: &Path) -> io::Result<u64> {
    let staging = staging_path(to);
    let _ = fs::remove_file(&staging);
    let copied = copy_sparse(from, &staging)?;
    if let Err(e) = fs::rename(&staging, to) {
        let _ = fs::remove_file(&staging);
        return Err(e);
    }
    sync_dir(to.parent().unwrap_or(Path::new("/")))?;
    Ok(copied)
}

/// The staging file [`copy_into_place`] writes for `to`.
pub fn staging_path(to: &Path) -> PathBuf {
    let name = to
        .file_name()
        .map(|n| n.to_string_lossy())
        .unwrap_or_default();
    to.with_file_name(format!("{NEW_PREFIX}{name}"))
}

/// The file system's label: mkfs.ext4 takes at most 16 bytes.
fn label(name: &str) -> &str {
    &name[..name.len().min(16)]
}

fn format(file: &Path, name: &str, fs_type: VolumeFs) -> Result<(), CreateDataVolumeError> {
    let failed = |reason: String| CreateDataVolumeError::Format {
        name: name.to_string(),
        tool: "mkfs.ext4",
        reason,
    };
    match fs_type {
        VolumeFs::Ext4 => {
            // No reserved blocks (the appliance's service, not root, fills
            // it); lazy init: the file is sparse and reads as zeros, which
            // is what zeroing the inode tables and journal would write.
            let out = Command::new("mkfs.ext4")
                .args(["-F", "-q", "-m", "0", "-L", label(name)])
                .args(["-E", "lazy_itable_init=1,lazy_journal_init=1,nodiscard"])
                .arg(file)
                .output()
                .map_err(|e| failed(format!("cannot run: {e} (install e2fsprogs)")))?;
            if !out.status.success() {
                return Err(failed(vroom_base::failure_line(&out, "failed")));
            }
        }
    }
    Ok(())
}

/// Grows a volume's file to `size_mib` (the guest grows its filesystem when
/// it next mounts it, or at once when told). Checks the host's free space
/// for the growth first.
pub fn grow(file: &Path, name: &str, size_mib: u64) -> Result<(), GrowDataVolumeError> {
    let io_err = |source| GrowDataVolumeError::Io {
        name: name.to_string(),
        source,
    };
    let have = fs::metadata(file).map_err(io_err)?.len();
    let want = size_mib << 20;
    if want < have {
        return Err(GrowDataVolumeError::Shrink {
            name: name.to_string(),
            have_mib: have >> 20,
        });
    }
    if want == have {
        return Ok(());
    }
    let free = free_bytes(file.parent().unwrap_or(Path::new("/"))).map_err(io_err)?;
    if want - have > free {
        return Err(GrowDataVolumeError::NoSpace {
            name: name.to_string(),
            need_mib: (want - have) >> 20,
            free_mib: free >> 20,
        });
    }
    let f = OpenOptions::new().write(true).open(file).map_err(io_err)?;
    f.set_len(want).map_err(io_err)?;
    f.sync_all().map_err(io_err)
}

/// Copies `from` to a new file `to` of the same length, holes as holes
/// (ext4 has no reflink: each data extent is copied with
/// `copy_file_range`, which stays in the kernel), and syncs it. Returns the
/// bytes copied. `to` must not exist; it is removed on failure.
pub fn copy_sparse(from: &Path, to: &Path) -> io::Result<u64> {
    let src = File::open(from)?;
    let dst = OpenOptions::new().write(true).create_new(true).open(to)?;
    let result = (|| {
        let len = src.metadata()?.len();
        dst.set_len(len)?;
        let mut copied = 0u64;
        let mut pos = 0u64;
        while pos < len {
            let data = match rustix::fs::seek(&src, rustix::fs::SeekFrom::Data(pos)) {
                Ok(offset) => offset,
                // No data after `pos`: the rest is a hole.
                Err(rustix::io::Errno::NXIO) => break,
                Err(e) => return Err(e.into()),
            };
            let hole = rustix::fs::seek(&src, rustix::fs::SeekFrom::Hole(data))?.min(len);
            let (mut off_in, mut off_out) = (data, data);
            while off_in < hole {
                let chunk = usize::try_from(hole - off_in)
                    .unwrap_or(usize::MAX)
                    .min(1 << 30);
                let n = rustix::fs::copy_file_range(
                    &src,
                    Some(&mut off_in),
                    &dst,
                    Some(&mut off_out),
                    chunk,
                )?;
                if n == 0 {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        format!("{} shrank while being copied", from.display()),
                    ));
                }
                copied += n as u64;
            }
            pos = hole;
        }
        dst.sync_all()?;
        Ok(copied)
    })();
    if result.is_err() {
        let _ = fs::remove_file(to);
    }
    result
}

/// Bytes a (sparse) file takes on disk.
pub fn allocated_bytes(file: &Path) -> u64 {
    fs::metadata(file).map(|m| m.blocks() * 512).unwrap_or(0)
}

pub fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_volume_is_a_sparse_formatted_file_made_whole_or_not_at_all() {
        let root = tempfile::tempdir().unwrap();
        let file = create(root.path(), "ab12", "db-data", 64, VolumeFs::Ext4).unwrap();
        assert_eq!(file, volume_file(root.path(), "ab12"));
        assert_eq!(fs::metadata(&file).unwrap().len(), 64 << 20);
        assert!(allocated_bytes(&file) < 16 << 20, "sparse");
        // An ext4 superblock: magic 0xEF53 at byte 1080.
        let raw = fs::read(&file).unwrap();
        assert_eq!(&raw[1080..1082], &[0x53, 0xef]);
        let leftovers: Vec<_> = fs::read_dir(root.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(leftovers, vec![std::ffi::OsString::from("ab12")]);

        // The same id again: refused, and the existing volume untouched.
        assert!(create(root.path(), "ab12", "db-data", 64, VolumeFs::Ext4).is_err());
        assert_eq!(fs::read(&file).unwrap()[1080..1082], [0x53, 0xef]);
        assert!(!root.path().join(".new-ab12").exists());
    }

    #[test]
    fn more_than_the_disk_holds_is_refused_before_anything_is_written() {
        let root = tempfile::tempdir().unwrap();
        let err = create(
            root.path(),
            "cd34",
            "huge",
            vroom_types::MAX_VOLUME_MIB,
            VolumeFs::Ext4,
        )
        .unwrap_err();
        assert!(
            matches!(err, CreateDataVolumeError::NoSpace { .. }),
            "{err}"
        );
        assert!(err.to_string().contains("MiB are free"), "{err}");
        assert_eq!(fs::read_dir(root.path()).unwrap().count(), 0);
    }

    #[test]
    fn volumes_grow_and_never_shrink() {
        let root = tempfile::tempdir().unwrap();
        let file = create(root.path(), "ef56", "v", 32, VolumeFs::Ext4).unwrap();
        grow(&file, "v", 48).unwrap();
        assert_eq!(fs::metadata(&file).unwrap().len(), 48 << 20);
        let err = grow(&file, "v", 32).unwrap_err();
        assert!(err.to_string().contains("only grow"), "{err}");
        grow(&file, "v", 48).unwrap();
        let err = grow(&file, "v", vroom_types::MAX_VOLUME_MIB).unwrap_err();
        assert!(matches!(err, GrowDataVolumeError::NoSpace { .. }), "{err}");
        assert_eq!(fs::metadata(&file).unwrap().len(), 48 << 20);
    }

    #[test]
    fn a_sparse_copy_is_equal_and_stays_sparse() {
        use std::io::{Seek, SeekFrom, Write};
        let root = tempfile::tempdir().unwrap();
        let from = root.path().join("a");
        let mut f = File::create(&from).unwrap();
        f.set_len(64 << 20).unwrap();
        for (at, byte) in [(0u64, 1u8), (5 << 20, 2), ((64 << 20) - 4096, 3)] {
            f.seek(SeekFrom::Start(at)).unwrap();
            f.write_all(&vec![byte; 4096]).unwrap();
        }
        drop(f);
        let to = root.path().join("b");
        let copied = copy_sparse(&from, &to).unwrap();
        assert!(copied < 1 << 20, "only the data: {copied}");
        assert_eq!(fs::read(&from).unwrap(), fs::read(&to).unwrap());
        assert!(allocated_bytes(&to) < 1 << 20, "{}", allocated_bytes(&to));
        // It never overwrites.
        assert!(copy_sparse(&from, &to).is_err());
        assert_eq!(fs::read(&from).unwrap(), fs::read(&to).unwrap());
        // An empty file and a file that is all hole.
        let hole = root.path().join("hole");
        File::create(&hole).unwrap().set_len(1 << 20).unwrap();
        assert_eq!(copy_sparse(&hole, &root.path().join("c")).unwrap(), 0);
        assert_eq!(fs::metadata(root.path().join("c")).unwrap().len(), 1 << 20);
    }

    #[test]
    fn an_import_is_put_in_place_only_when_it_holds_ext4() {
        let root = tempfile::tempdir().unwrap();
        let file = stage_import(root.path(), "aa", "imp", 16).unwrap();
        assert_eq!(fs::metadata(&file).unwrap().len(), 16 << 20);
        // Zeros: refused, and left staged for the caller to drop.
        let err = finish_import(root.path(), "aa", "imp").unwrap_err();
        assert!(err.to_string().contains("not an ext4"), "{err}");
        assert!(file.exists());
        fs::remove_dir_all(staging_dir(root.path(), "aa")).unwrap();
        // A formatted volume's bytes: put in place.
        let made = create(root.path(), "src", "src", 16, VolumeFs::Ext4).unwrap();
        let file = stage_import(root.path(), "bb", "imp", 16).unwrap();
        fs::remove_file(&file).unwrap();
        copy_sparse(&made, &file).unwrap();
        let placed = finish_import(root.path(), "bb", "imp").unwrap();
        assert_eq!(placed, volume_file(root.path(), "bb"));
        assert!(!staging_dir(root.path(), "bb").exists());
        let err = stage_import(root.path(), "cc", "imp", vroom_types::MAX_VOLUME_MIB).unwrap_err();
        assert!(
            matches!(err, CreateDataVolumeError::NoSpace { .. }),
            "{err}"
        );
        assert!(!staging_dir(root.path(), "cc").exists());
    }

    #[test]
    fn labels_fit_mkfs() {
        assert_eq!(label("db-data"), "db-data");
        assert_eq!(label(&"a".repeat(32)).len(), 16);
    }
}
