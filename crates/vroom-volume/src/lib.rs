//! Config volumes: one small FAT filesystem image per instance (1.44 MB by
//! default, the seed's floppy). The files on it and their versioning are
//! described in [`vroom_agent_proto::volume`].
//!
//! The host only touches a volume while its VM is not running. Host writes are
//! atomic: the whole image is copied, changed, fsynced and renamed over the
//! old one, so a crash leaves either the old or the new volume.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use vroom_agent_proto::volume::{
    ConfigFile, InstanceFile, CONFIG_FILE, INSTANCE_FILE, VOLUME_LABEL, VOLUME_VERSION,
};
use vroom_types::ConfigValues;

pub mod data;
pub mod nbd;
pub mod relay;

pub const DEFAULT_SIZE_KIB: u32 = 1440;
pub const MIN_SIZE_KIB: u32 = 64;
pub const MAX_SIZE_KIB: u32 = 64 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum VolumeError {
    #[error("config volume size {kib} KiB is outside {MIN_SIZE_KIB}..={MAX_SIZE_KIB} KiB")]
    Size { kib: u32 },
    #[error("not enough disk space for the config volume {path}")]
    NoSpace { path: PathBuf },
    #[error("config volume {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("config volume {path} holds an unreadable {file}")]
    Corrupt {
        path: PathBuf,
        file: &'static str,
        #[source]
        source: serde_json::Error,
    },
    #[error(
        "config volume {path} has format version {version}, this vroom reads {VOLUME_VERSION}"
    )]
    Version { path: PathBuf, version: u32 },
}

/// Creates a new volume holding `instance` and `config`. Nothing is left
/// behind on failure, and a full disk is reported as such.
pub fn create(
    path: &Path,
    size_kib: u32,
    instance: &InstanceFile,
    config: &ConfigValues,
) -> Result<(), VolumeError> {
    if !(MIN_SIZE_KIB..=MAX_SIZE_KIB).contains(&size_kib) {
        return Err(VolumeError::Size { kib: size_kib });
    }
    let tmp = tmp_path(path);
    let result = (|| {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&tmp)
            .map_err(io_err(&tmp))?;
        allocate(&file, u64::from(size_kib) * 1024).map_err(|e| match e.raw_os_error() {
            Some(libc::ENOSPC) => VolumeError::NoSpace {
                path: path.to_path_buf(),
            },
            _ => io_err(&tmp)(e),
        })?;
        let mut file = file;
        let label = volume_label();
        fatfs::format_volume(
            &mut file,
            fatfs::FormatVolumeOptions::new().volume_label(label),
        )
        .map_err(io_err(&tmp))?;
        write_files(&mut file, Some(instance), Some(config)).map_err(io_err(&tmp))?;
        file.sync_all().map_err(io_err(&tmp))?;
        fs::rename(&tmp, path).map_err(io_err(path))?;
        sync_parent(path)
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

pub fn read_config(path: &Path) -> Result<ConfigValues, VolumeError> {
    let file = read_file::<ConfigFile>(path, CONFIG_FILE)?;
    check_version(path, file.version)?;
    Ok(file.values)
}

pub fn read_instance(path: &Path) -> Result<InstanceFile, VolumeError> {
    let file = read_file::<InstanceFile>(path, INSTANCE_FILE)?;
    check_version(path, file.version)?;
    Ok(file)
}

/// Replaces the config on a volume whose VM is not running.
pub fn write_config(path: &Path, values: &ConfigValues) -> Result<(), VolumeError> {
    rewrite(path, None, Some(values))
}

/// Replaces the instance identity on a volume whose VM is not running.
pub fn write_instance(path: &Path, instance: &InstanceFile) -> Result<(), VolumeError> {
    rewrite(path, Some(instance), None)
}

fn rewrite(
    path: &Path,
    instance: Option<&InstanceFile>,
    config: Option<&ConfigValues>,
) -> Result<(), VolumeError> {
    let tmp = tmp_path(path);
    let result = (|| {
        fs::copy(path, &tmp).map_err(|e| match e.raw_os_error() {
            Some(libc::ENOSPC) => VolumeError::NoSpace {
                path: path.to_path_buf(),
            },
            _ => io_err(path)(e),
        })?;
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&tmp)
            .map_err(io_err(&tmp))?;
        write_files(&mut file, instance, config).map_err(io_err(&tmp))?;
        file.sync_all().map_err(io_err(&tmp))?;
        fs::rename(&tmp, path).map_err(io_err(path))?;
        sync_parent(path)
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// Writes the given files into a FAT image; exposed for in-memory use in tests and tools.
pub fn write_files<S: Read + Write + Seek>(
    storage: S,
    instance: Option<&InstanceFile>,
    config: Option<&ConfigValues>,
) -> io::Result<()> {
    let fs = fatfs::FileSystem::new(storage, fatfs::FsOptions::new())?;
    {
        let root = fs.root_dir();
        if let Some(instance) = instance {
            replace(&root, INSTANCE_FILE, &serde_json::to_vec_pretty(instance)?)?;
        }
        if let Some(values) = config {
            let file = ConfigFile {
                version: VOLUME_VERSION,
                values: values.clone(),
            };
            replace(&root, CONFIG_FILE, &serde_json::to_vec_pretty(&file)?)?;
        }
    }
    fs.unmount()
}

fn replace<T: fatfs::ReadWriteSeek>(
    root: &fatfs::Dir<'_, T>,
    name: &str,
    bytes: &[u8],
) -> io::Result<()> {
    let mut file = root.create_file(name)?;
    file.truncate()?;
    file.write_all(bytes)?;
    file.flush()
}

/// Reads one file from a FAT image; exposed for in-memory use in tests and tools.
pub fn read_bytes<S: Read + Write + Seek>(storage: S, name: &str) -> io::Result<Vec<u8>> {
    let fs = fatfs::FileSystem::new(storage, fatfs::FsOptions::new())?;
    let mut bytes = Vec::new();
    fs.root_dir().open_file(name)?.read_to_end(&mut bytes)?;
    Ok(bytes)
}

fn read_file<T: serde::de::DeserializeOwned>(
    path: &Path,
    name: &'static str,
) -> Result<T, VolumeError> {
    let file = File::options()
        .read(true)
        .write(true)
        .open(path)
        .map_err(io_err(path))?;
    let bytes = read_bytes(file, name).map_err(io_err(path))?;
    serde_json::from_slice(&bytes).map_err(|source| VolumeError::Corrupt {
        path: path.to_path_buf(),
        file: name,
        source,
    })
}

fn check_version(path: &Path, version: u32) -> Result<(), VolumeError> {
    if version != VOLUME_VERSION {
        return Err(VolumeError::Version {
            path: path.to_path_buf(),
            version,
        });
    }
    Ok(())
}

fn allocate(file: &File, len: u64) -> io::Result<()> {
    // SAFETY: plain syscall on an fd we own.
    let rc = unsafe { libc::posix_fallocate(file.as_raw_fd(), 0, len as libc::off_t) };
    match rc {
        0 => Ok(()),
        // Filesystems without fallocate: fall back to writing zeros.
        libc::EOPNOTSUPP | libc::EINVAL => {
            let mut f = file;
            let zeros = vec![0u8; 64 * 1024];
            let mut left = len;
            while left > 0 {
                let n = left.min(zeros.len() as u64) as usize;
                f.write_all(&zeros[..n])?;
                left -= n as u64;
            }
            f.rewind()
        }
        errno => Err(io::Error::from_raw_os_error(errno)),
    }
}

fn volume_label() -> [u8; 11] {
    let mut label = [b' '; 11];
    label[..VOLUME_LABEL.len()].copy_from_slice(VOLUME_LABEL.as_bytes());
    label
}

fn tmp_path(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".tmp");
    path.with_file_name(name)
}

fn sync_parent(path: &Path) -> Result<(), VolumeError> {
    let parent = path.parent().unwrap_or(Path::new("."));
    File::open(parent)
        .and_then(|d| d.sync_all())
        .map_err(io_err(parent))
}

fn io_err(path: &Path) -> impl Fn(io::Error) -> VolumeError + '_ {
    move |source| VolumeError::Io {
        path: path.to_path_buf(),
        source,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vroom_agent_proto::volume::NicConfig;

    fn instance() -> InstanceFile {
        InstanceFile {
            version: VOLUME_VERSION,
            hostname: "web".into(),
            nics: vec![NicConfig {
                mac: "52:54:00:00:00:01".into(),
                role: Some("lan".into()),
                address: Some("10.0.0.2".into()),
                prefix_len: 24,
                gateway: Some("10.0.0.1".into()),
            }],
            machine_id: Some("0123456789abcdef0123456789abcdef".into()),
            volumes: Vec::new(),
        }
    }

    #[test]
    fn create_read_write_roundtrip() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.img");
        let seed: ConfigValues = [("greeting".to_string(), "hi".to_string())].into();
        create(&path, DEFAULT_SIZE_KIB, &instance(), &seed).unwrap();
        assert_eq!(fs::metadata(&path).unwrap().len(), 1440 * 1024);
        assert_eq!(read_config(&path).unwrap(), seed);
        assert_eq!(read_instance(&path).unwrap(), instance());

        let long: ConfigValues = [("greeting".to_string(), "x".repeat(3000))].into();
        write_config(&path, &long).unwrap();
        assert_eq!(read_config(&path).unwrap(), long);
        // Shrinking the file must truncate, not leave stale JSON behind.
        write_config(&path, &seed).unwrap();
        assert_eq!(read_config(&path).unwrap(), seed);
        assert_eq!(read_instance(&path).unwrap(), instance());
        assert!(!tmp_path(&path).exists());
    }

    #[test]
    fn rejects_bad_sizes_and_existing_files() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v.img");
        assert!(matches!(
            create(&path, 10, &instance(), &ConfigValues::new()),
            Err(VolumeError::Size { .. })
        ));
        assert!(!path.exists());
        assert!(!tmp_path(&path).exists());
    }

    #[test]
    fn corrupt_and_future_files_are_reported() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v.img");
        create(&path, 256, &instance(), &ConfigValues::new()).unwrap();
        let file = File::options().read(true).write(true).open(&path).unwrap();
        let fs = fatfs::FileSystem::new(file, fatfs::FsOptions::new()).unwrap();
        replace(&fs.root_dir(), CONFIG_FILE, b"{not json").unwrap();
        fs.unmount().unwrap();
        assert!(matches!(
            read_config(&path),
            Err(VolumeError::Corrupt { .. })
        ));

        let file = File::options().read(true).write(true).open(&path).unwrap();
        let fs = fatfs::FileSystem::new(file, fatfs::FsOptions::new()).unwrap();
        replace(
            &fs.root_dir(),
            CONFIG_FILE,
            br#"{"version":99,"values":{}}"#,
        )
        .unwrap();
        fs.unmount().unwrap();
        assert!(matches!(
            read_config(&path),
            Err(VolumeError::Version { version: 99, .. })
        ));
    }
}
