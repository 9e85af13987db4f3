//! Snapshots: capture a running VM (memory and device state, config volume
//! and record, as one object), restore it into the same instance, start
//! clones from it, and warm snapshots of images that `run` starts from
//! instead of booting.
//!
//! A snapshot is a directory `snapshots/NAME/` holding `memory.zst` (the
//! VMM's saved state through zstd), `config.img` (the config volume) and
//! `snapshot.json` (the [`Snapshot`], with both files' sizes and sha256).
//! It is written as `snapshots/.partial-*`, fsynced and renamed into place:
//! a crash leaves either no snapshot or a complete one, and partial
//! directories are swept at the next start. Warm snapshots live the same
//! way under `warm/KEY/`, where the key covers everything the saved state
//! depends on (image, memory, CPUs, NICs, machine), so a stale one is never
//! found.

use std::fs::File;
use std::io::{Read, Write};

use sha2::{Digest, Sha256};
use vroom_base::LockExt;
use vroom_types::{Snapshot, SnapshotFile, SnapshotKind, SnapshotRequest, VmShape};

use super::markers::{clear_marker, set_marker, sync_dir, RESTORE_MARKER, SNAPSHOT_MARKER};
use super::records::{instance_file, new_instance};
use super::*;
use crate::driver::VmRunState;

const SNAPSHOTS_DIR: &str = "snapshots";
const WARM_DIR: &str = "warm";
const PARTIAL_PREFIX: &str = ".partial-";
pub(super) const MANIFEST: &str = "snapshot.json";
pub(super) const MEMORY: &str = "memory.zst";
pub(super) const VOLUME: &str = "config.img";
/// Data volume `i` of a snapshot's instance: `volumes/i.img`.
pub(super) fn data_volume_file(dir: &Path, index: usize) -> PathBuf {
    dir.join("volumes").join(format!("{index}.img"))
}
/// Fast enough to stay off the pause's critical path (about 2.5x on guest
/// memory, measured: 91 MB of state to 37 MB).
const ZSTD_LEVEL: i32 = 1;
/// How long a warm image's guest may take to become ready.
const WARM_READY_TIMEOUT: Duration = Duration::from_secs(120);
/// Golden guests are addressed from the benchmarking range (RFC 2544) on
/// NICs attached to nothing; a warm start replaces the addresses.
const WARM_SUBNET_BASE: [u8; 2] = [198, 18];

/// A saved state to start a VM from instead of booting.
#[derive(Debug, Clone)]
pub(super) struct StateSource {
    pub memory: PathBuf,
    pub expected: SnapshotFile,
    /// The guest takes on the identity of its (replaced) config volume.
    pub reload_volume: bool,
    /// Shown as `status.started_from`.
    pub label: String,
}

/// Counts and hashes what goes through it.
pub(super) struct Hashing<T> {
    inner: T,
    hasher: Sha256,
    bytes: u64,
}

impl<T> Hashing<T> {
    pub(super) fn new(inner: T) -> Self {
        Hashing {
            inner,
            hasher: Sha256::new(),
            bytes: 0,
        }
    }
    pub(super) fn finish(self) -> (T, SnapshotFile) {
        let file = SnapshotFile {
            bytes: self.bytes,
            sha256: hex(&self.hasher.finalize()),
        };
        (self.inner, file)
    }
}

impl<W: Write> Write for Hashing<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.bytes += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

impl<R: Read> Read for Hashing<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        self.bytes += n as u64;
        Ok(n)
    }
}

pub(super) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Copies a file, fsyncs the copy and returns its size and sha256.
pub(super) fn copy_hashed(from: &Path, to: &Path) -> std::io::Result<SnapshotFile> {
    copy_hashed_into(from, File::create(to)?)
}

/// Writes `bytes` into a new file `to`, synced; returns its digest.
fn write_hashed(bytes: &[u8], to: &Path) -> std::io::Result<SnapshotFile> {
    let mut out = Hashing::new(File::create(to)?);
    out.write_all(bytes)?;
    let (file, digest) = out.finish();
    file.sync_all()?;
    Ok(digest)
}

/// [`copy_hashed`] into a file the caller created (as it must be created).
pub(super) fn copy_hashed_into(from: &Path, to: File) -> std::io::Result<SnapshotFile> {
    let mut out = Hashing::new(to);
    std::io::copy(&mut File::open(from)?, &mut out)?;
    let (file, digest) = out.finish();
    file.sync_all()?;
    Ok(digest)
}

/// [`copy_hashed_into`] of a sparse file (a data volume): its holes stay
/// holes in `to`, and are hashed as the zeros they read as.
pub(super) fn copy_hashed_sparse_into(from: &Path, to: File) -> std::io::Result<SnapshotFile> {
    use std::os::unix::fs::FileExt;
    let src = File::open(from)?;
    let len = src.metadata()?.len();
    to.set_len(len)?;
    let mut hasher = Sha256::new();
    let zeros = vec![0u8; 1 << 20];
    let mut buf = vec![0u8; 1 << 20];
    let mut pos = 0u64;
    while pos < len {
        let data = match rustix::fs::seek(&src, rustix::fs::SeekFrom::Data(pos)) {
            Ok(offset) => offset.min(len),
            Err(rustix::io::Errno::NXIO) => len,
            Err(e) => return Err(e.into()),
        };
        let mut hole = data - pos;
        while hole > 0 {
            let n = hole.min(zeros.len() as u64) as usize;
            hasher.update(&zeros[..n]);
            hole -= n as u64;
        }
        if data >= len {
            break;
        }
        let end = rustix::fs::seek(&src, rustix::fs::SeekFrom::Hole(data))?.min(len);
        let mut at = data;
        while at < end {
            let n = (end - at).min(buf.len() as u64) as usize;
            src.read_exact_at(&mut buf[..n], at)?;
            to.write_all_at(&buf[..n], at)?;
            hasher.update(&buf[..n]);
            at += n as u64;
        }
        pos = end;
    }
    to.sync_all()?;
    Ok(SnapshotFile {
        bytes: len,
        sha256: hex(&hasher.finalize()),
    })
}

/// A snapshot's files (relative to its directory) and what they must be.
fn snapshot_files(snapshot: &Snapshot) -> Vec<(String, &SnapshotFile)> {
    let mut files = vec![
        (MEMORY.to_string(), &snapshot.memory),
        (VOLUME.to_string(), &snapshot.volume),
    ];
    for (i, v) in snapshot.data_volumes.iter().enumerate() {
        files.push((format!("volumes/{i}.img"), &v.file));
    }
    files
}

pub(super) fn file_digest(path: &Path) -> std::io::Result<SnapshotFile> {
    let mut reader = Hashing::new(File::open(path)?);
    std::io::copy(&mut reader, &mut std::io::sink())?;
    Ok(reader.finish().1)
}

/// Writes the VM's saved state through zstd into `file` (`path` names it
/// in errors); returns the state's size and the file's digest. Blocking;
/// the VM stays paused.
pub(super) fn save_memory_into(
    driver: &dyn VmDriver,
    process: &VmProcess,
    file: File,
    path: &Path,
) -> Result<(u64, SnapshotFile), OpError> {
    let io =
        |e: std::io::Error| OpError::internal(format!("failed to write {}", path.display()), e);
    let mut encoder = zstd::Encoder::new(Hashing::new(file), ZSTD_LEVEL).map_err(io)?;
    encoder.include_checksum(true).map_err(io)?;
    let state_bytes = driver
        .save_state(process, &mut encoder)
        .map_err(|e| OpError::internal("failed to save the VM's state", e))?;
    let (file, digest) = encoder.finish().map_err(io)?.finish();
    file.sync_all().map_err(io)?;
    Ok((state_bytes, digest))
}

/// How much of a VM's state a capture keeps in memory while the guest is
/// paused: a 64 MiB guest saves about 34 MB. Past this the state is
/// compressed into its file as it comes, inside the pause.
const BUFFERED_STATE_MAX: usize = 512 << 20;

/// Where a capture writes the VM's state while the guest is paused: into
/// memory (up to [`BUFFERED_STATE_MAX`]), so that compressing it, writing
/// it and syncing the file happen after the guest runs again; the pause is
/// then QEMU's copy alone. A larger state spills into the file, compressed
/// on the way, as [`save_memory_into`] does.
pub(super) struct StateSink {
    buffer: Vec<u8>,
    file: Option<File>,
    encoder: Option<zstd::Encoder<'static, Hashing<File>>>,
}

impl StateSink {
    pub(super) fn new(file: File) -> StateSink {
        StateSink {
            buffer: Vec::new(),
            file: Some(file),
            encoder: None,
        }
    }

    fn encoder(&mut self) -> std::io::Result<&mut zstd::Encoder<'static, Hashing<File>>> {
        if self.encoder.is_none() {
            let file = self
                .file
                .take()
                .expect("invariant: the file goes into the encoder once");
            let mut encoder = zstd::Encoder::new(Hashing::new(file), ZSTD_LEVEL)?;
            encoder.include_checksum(true)?;
            encoder.write_all(&std::mem::take(&mut self.buffer))?;
            self.encoder = Some(encoder);
        }
        Ok(self.encoder.as_mut().expect("invariant: just made"))
    }

    /// Compresses what is buffered, syncs the file and returns its digest.
    pub(super) fn finish(mut self) -> std::io::Result<SnapshotFile> {
        self.encoder()?;
        let encoder = self.encoder.take().expect("invariant: made above");
        let (file, digest) = encoder.finish()?.finish();
        file.sync_all()?;
        Ok(digest)
    }
}

impl Write for StateSink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.encoder.is_none() && self.buffer.len() + buf.len() <= BUFFERED_STATE_MAX {
            self.buffer.extend_from_slice(buf);
            return Ok(buf.len());
        }
        self.encoder()?.write(buf)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        match &mut self.encoder {
            Some(encoder) => encoder.flush(),
            None => Ok(()),
        }
    }
}

/// Streams a saved state into a VM started `incoming`, checking it against
/// its digest on the way; the VM stays paused. Blocking.
fn load_memory(
    driver: &dyn VmDriver,
    process: &VmProcess,
    source: &StateSource,
) -> Result<(), OpError> {
    let corrupt = |why: String| {
        OpError::new(
            ErrorCode::Conflict,
            format!(
                "{} is corrupt ({why}); remove it and take it again",
                source.label
            ),
        )
    };
    let file = File::open(&source.memory)
        .map_err(|e| OpError::internal(format!("failed to open {}", source.memory.display()), e))?;
    let mut decoder = zstd::Decoder::new(Hashing::new(file))
        .map_err(|e| OpError::internal("failed to read the saved state", e))?;
    let loaded = driver.load_state(process, &mut decoder);
    // The digest covers the whole file, read or not.
    let mut rest = decoder.finish().into_inner();
    let drained = std::io::copy(&mut rest, &mut std::io::sink());
    let (_, digest) = rest.finish();
    if drained.is_err() || digest != source.expected {
        return Err(corrupt(format!(
            "its memory image has {} bytes with sha256 {}, {} bytes with sha256 {} were recorded",
            digest.bytes,
            &digest.sha256[..12],
            source.expected.bytes,
            &source.expected.sha256[..12.min(source.expected.sha256.len())]
        )));
    }
    loaded.map_err(|e| corrupt(e.to_string()))?;
    Ok(())
}

fn read_manifest(dir: &Path) -> Option<Snapshot> {
    let bytes = std::fs::read(dir.join(MANIFEST)).ok()?;
    serde_json::from_slice(&bytes).ok()
}

/// A default snapshot name: `INSTANCE-YYYYMMDD-HHMMSS` (UTC).
pub(super) fn default_name(instance: &str, now: u64) -> String {
    let days = now / 86_400;
    let secs = now % 86_400;
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{instance}-{year:04}{month:02}{day:02}-{:02}{:02}{:02}",
        secs / 3600,
        secs / 60 % 60,
        secs % 60
    )
}

impl Engine {
    fn snapshots_dir(&self) -> PathBuf {
        self.cfg.data_dir.join(SNAPSHOTS_DIR)
    }

    fn warm_dir(&self) -> PathBuf {
        self.cfg.data_dir.join(WARM_DIR)
    }

    /// A fresh directory to write a snapshot into before it is renamed.
    fn partial_dir(&self, parent: &Path) -> Result<PathBuf, OpError> {
        let dir = parent.join(format!("{PARTIAL_PREFIX}{}", random_id()));
        std::fs::create_dir_all(&dir)
            .map_err(|e| OpError::internal(format!("failed to create {}", dir.display()), e))?;
        Ok(dir)
    }

    /// Writes the manifest, fsyncs, and renames `partial` to `target`.
    fn commit_snapshot(
        &self,
        partial: &Path,
        target: &Path,
        snapshot: &Snapshot,
    ) -> Result<(), OpError> {
        let io = |e: std::io::Error| OpError::internal("failed to write the snapshot", e);
        let json = serde_json::to_vec_pretty(snapshot).expect("invariant: a snapshot serializes");
        let mut file = File::create(partial.join(MANIFEST)).map_err(io)?;
        file.write_all(&json).map_err(io)?;
        file.sync_all().map_err(io)?;
        sync_dir(partial).map_err(io)?;
        std::fs::rename(partial, target).map_err(|e| {
            if e.raw_os_error() == Some(libc::ENOTEMPTY) || e.raw_os_error() == Some(libc::EEXIST) {
                OpError::new(
                    ErrorCode::AlreadyExists,
                    format!(
                        "a snapshot named {:?} already exists",
                        snapshot.name.as_str()
                    ),
                )
            } else {
                io(e)
            }
        })?;
        if let Some(parent) = target.parent() {
            sync_dir(parent).map_err(io)?;
        }
        Ok(())
    }

    pub fn list_snapshots(&self) -> Vec<Snapshot> {
        let mut out: Vec<Snapshot> = std::fs::read_dir(self.snapshots_dir())
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| !e.file_name().to_string_lossy().starts_with('.'))
            .filter_map(|e| read_manifest(&e.path()))
            .collect();
        out.sort_by(|a, b| a.name.cmp(&b.name));
        out
    }

    /// Warm snapshots, one per image and shape.
    pub fn list_warm(&self) -> Vec<Snapshot> {
        self.warm_snapshots().into_iter().map(|(_, s)| s).collect()
    }

    fn warm_snapshots(&self) -> Vec<(PathBuf, Snapshot)> {
        let mut out: Vec<(PathBuf, Snapshot)> = std::fs::read_dir(self.warm_dir())
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| !e.file_name().to_string_lossy().starts_with('.'))
            .filter_map(|e| read_manifest(&e.path()).map(|s| (e.path(), s)))
            .collect();
        out.sort_by(|a, b| {
            (&a.1.name, a.1.instance.mem_mib).cmp(&(&b.1.name, b.1.instance.mem_mib))
        });
        out
    }

    /// Removes the warm snapshots of an image, by the name `snapshot ls
    /// --warm` shows (the image's name) or the image's id: every shape of
    /// it. `run` boots that image again until it is warmed anew.
    pub async fn remove_warm(&self, image: &str) -> Result<Vec<Snapshot>, OpError> {
        let doomed: Vec<(PathBuf, Snapshot)> = self
            .warm_snapshots()
            .into_iter()
            .filter(|(_, s)| {
                s.name.as_str() == image
                    || s.instance.image_name == image
                    || (image.len() >= 12 && s.instance.image_id.starts_with(image))
            })
            .collect();
        if doomed.is_empty() {
            return Err(OpError::new(
                ErrorCode::NotFound,
                format!("no warm snapshot of image {image:?}"),
            ));
        }
        for (dir, snapshot) in &doomed {
            self.remove_snapshot_dir(&self.warm_dir(), dir)
                .map_err(|e| {
                    OpError::internal(
                        format!("failed to remove warm snapshot {}", snapshot.name),
                        e,
                    )
                })?;
        }
        Ok(doomed.into_iter().map(|(_, s)| s).collect())
    }

    /// Renames a snapshot's directory away first, so it disappears at once
    /// and whole, then deletes it.
    fn remove_snapshot_dir(&self, parent: &Path, dir: &Path) -> std::io::Result<()> {
        let doomed = parent.join(format!("{PARTIAL_PREFIX}rm-{}", random_id()));
        blocking(|| {
            std::fs::rename(dir, &doomed)?;
            sync_dir(parent)?;
            std::fs::remove_dir_all(&doomed)
        })
    }

    fn snapshot_dir(&self, name: &str) -> Result<PathBuf, OpError> {
        Name::new(name).map_err(|_| OpError::not_found("snapshot", name))?;
        if self.snapshot_busy(name) {
            return Err(OpError::conflict(format!(
                "snapshot {name} is still being written"
            )));
        }
        let dir = self.snapshots_dir().join(name);
        if !dir.join(MANIFEST).is_file() {
            if self.list_warm().iter().any(|s| s.name.as_str() == name) {
                return Err(OpError::new(
                    ErrorCode::NotFound,
                    format!(
                        "no snapshot named {name:?}; {name} is a warm snapshot of an image (`vroom snapshot rm --warm {name}`)"
                    ),
                ));
            }
            return Err(OpError::not_found("snapshot", name));
        }
        Ok(dir)
    }

    pub fn get_snapshot(&self, name: &str) -> Result<Snapshot, OpError> {
        let dir = self.snapshot_dir(name)?;
        read_manifest(&dir).ok_or_else(|| {
            OpError::new(
                ErrorCode::Internal,
                format!("snapshot {name}: its {MANIFEST} cannot be read"),
            )
        })
    }

    pub(in crate::engine) async fn remove_snapshot_unlogged(
        &self,
        name: &str,
    ) -> Result<(), OpError> {
        let dir = self.snapshot_dir(name)?;
        self.remove_snapshot_dir(&self.snapshots_dir(), &dir)
            .map_err(|e| OpError::internal(format!("failed to remove snapshot {name}"), e))
    }

    fn snapshot_busy(&self, name: &str) -> bool {
        self.snapshots_in_progress.lock_unpoisoned().contains(name)
    }

    /// Removes what interrupted snapshot writes left, and the VMMs of
    /// interrupted warm-ups.
    pub(super) async fn sweep_partial_snapshots(&self) {
        for vmm in self.driver.processes_under(&self.warm_dir()) {
            tracing::warn!(
                pid = vmm.1.pid,
                "killing the VM of an interrupted `image warm`"
            );
            let _ = self.driver.kill(&vmm.1);
            self.driver.wait_exit(&vmm.1).await;
        }
        for parent in [self.snapshots_dir(), self.warm_dir()] {
            for entry in std::fs::read_dir(&parent).into_iter().flatten().flatten() {
                if entry
                    .file_name()
                    .to_string_lossy()
                    .starts_with(PARTIAL_PREFIX)
                {
                    tracing::warn!(dir = %entry.path().display(), "removing an incomplete snapshot");
                    if let Err(e) = std::fs::remove_dir_all(entry.path()) {
                        tracing::error!(dir = %entry.path().display(), error = %e, "cannot remove an incomplete snapshot");
                    }
                }
            }
        }
    }

    /// Captures a running instance: pauses it, writes its state, copies its
    /// config volume while it is paused, then resumes it (or shuts it down
    /// with `stop`).
    pub(in crate::engine) async fn snapshot_unlogged(
        self: &Arc<Self>,
        req: SnapshotRequest,
    ) -> Result<Snapshot, OpError> {
        let cell = self.cell(req.instance.as_str())?;
        let _op = cell.op.lock().await;
        self.still_registered(req.instance.as_str(), &cell)?;
        let name = match &req.name {
            Some(name) => name.to_string(),
            None => default_name(req.instance.as_str(), now_secs()),
        };
        let name = Name::new(&name).map_err(|e| {
            OpError::new(
                ErrorCode::InvalidArgument,
                format!("cannot name a snapshot {name:?}: {e}"),
            )
        })?;
        let (instance, process) = {
            let r = cell.lock();
            (r.instance.clone(), r.process.clone())
        };
        let process = process
            .filter(|p| instance.status.state == InstanceState::Running && self.driver.is_alive(p))
            .ok_or_else(|| {
                OpError::conflict(format!(
                    "instance {} is {}: only a running instance can be snapshotted",
                    instance.spec.name,
                    state_word(instance.status.state)
                ))
            })?;
        let target = self.snapshots_dir().join(name.as_str());
        {
            let mut busy = self.snapshots_in_progress.lock_unpoisoned();
            if target.exists() || busy.contains(name.as_str()) {
                return Err(OpError::new(
                    ErrorCode::AlreadyExists,
                    format!("a snapshot named {:?} already exists", name.as_str()),
                ));
            }
            busy.insert(name.to_string());
        }
        let result = self
            .capture(
                &cell,
                &instance,
                &process,
                &name,
                SnapshotKind::User,
                &target,
            )
            .await;
        self.snapshots_in_progress
            .lock_unpoisoned()
            .remove(name.as_str());
        let snapshot = result?;
        if req.stop {
            self.stop_locked(&cell, false, DesiredState::Stopped)
                .await?;
        }
        tracing::info!(instance = %instance.spec.name, snapshot = %name, pause_ms = snapshot.pause_ms, bytes = snapshot.memory.bytes, "snapshot taken");
        Ok(snapshot)
    }

    /// Freeze, pause and save, copy the volume, resume, commit.
    async fn capture(
        &self,
        cell: &Arc<Cell>,
        instance: &Instance,
        process: &VmProcess,
        name: &Name,
        kind: SnapshotKind,
        target: &Path,
    ) -> Result<Snapshot, OpError> {
        let parent = target.parent().unwrap_or(target).to_path_buf();
        let partial = blocking(|| self.partial_dir(&parent))?;
        if let Err(e) = blocking(|| set_marker(&cell.dir, SNAPSHOT_MARKER)) {
            let _ = blocking(|| std::fs::remove_dir_all(&partial));
            return Err(e);
        }
        if let Err(e) = cell.agent.freeze(AGENT_TIMEOUT).await {
            let _ = blocking(|| std::fs::remove_dir_all(&partial));
            clear_marker(&cell.dir, SNAPSHOT_MARKER);
            // A guest that froze but whose answer was lost runs on.
            let _ = cell.agent.resume(false, AGENT_TIMEOUT).await;
            return Err(OpError::wrap(
                ErrorCode::Conflict,
                format!(
                    "the guest of {} cannot be frozen for a snapshot (an image built by an older vroom? rebuild it)",
                    instance.spec.name
                ),
                e,
            ));
        }
        let data_disks = self.data_disks(instance);
        let paused_at = Instant::now();
        let saved = blocking(|| -> Result<_, OpError> {
            let data_disks = data_disks?;
            let memory_path = partial.join(MEMORY);
            let file = File::create(&memory_path).map_err(|e| {
                OpError::internal(format!("failed to write {}", memory_path.display()), e)
            })?;
            let mut state = StateSink::new(file);
            let state_bytes = self
                .driver
                .save_state(process, &mut state)
                .map_err(|e| OpError::internal("failed to save the VM's state", e))?;
            // Still paused: no config write can land between the two. Read
            // now, written and synced once the guest runs again.
            let volume = std::fs::read(cell.volume())
                .map_err(|e| OpError::internal("failed to copy the config volume", e))?;
            // Nor a data volume write: the guest's memory and its disks are
            // of one instant. Sparse copies; hashed after the guest runs.
            if !data_disks.is_empty() {
                std::fs::create_dir(partial.join("volumes"))
                    .map_err(|e| OpError::internal("failed to copy the data volumes", e))?;
            }
            for (i, disk) in data_disks.iter().enumerate() {
                vroom_volume::data::copy_sparse(&disk.path, &data_volume_file(&partial, i))
                    .map_err(|e| OpError::internal("failed to copy a data volume", e))?;
            }
            Ok((state_bytes, state, volume))
        });
        let resumed = blocking(|| self.driver.resume(process));
        let pause_ms = paused_at.elapsed().as_millis() as u64;
        let thawed = cell.agent.resume(false, AGENT_TIMEOUT).await;
        clear_marker(&cell.dir, SNAPSHOT_MARKER);
        let outcome = (|| {
            let (state_bytes, state, volume) = saved?;
            let (memory, volume) = blocking(|| -> Result<_, OpError> {
                let memory_path = partial.join(MEMORY);
                let memory = state.finish().map_err(|e| {
                    OpError::internal(format!("failed to write {}", memory_path.display()), e)
                })?;
                let volume = write_hashed(&volume, &partial.join(VOLUME))
                    .map_err(|e| OpError::internal("failed to copy the config volume", e))?;
                Ok((memory, volume))
            })?;
            resumed.map_err(|e| OpError::internal("failed to resume the VM", e))?;
            if let Err(e) = thawed {
                tracing::warn!(instance = %instance.spec.name, error = %e, "the guest did not confirm its resume");
            }
            let data_volumes = self.hashed_data_volumes(instance, &partial)?;
            let snapshot = Snapshot {
                name: name.clone(),
                kind,
                instance: instance.clone(),
                created_at: now_secs(),
                machine: self.driver.machine(process.accel),
                accel: process.accel,
                memory,
                state_bytes,
                volume,
                pause_ms,
                data_volumes,
            };
            blocking(|| self.commit_snapshot(&partial, target, &snapshot))?;
            Ok(snapshot)
        })();
        if outcome.is_err() {
            let _ = blocking(|| std::fs::remove_dir_all(&partial));
        }
        outcome
    }

    /// The data volumes copied into `dir` at a capture, with their digests.
    fn hashed_data_volumes(
        &self,
        instance: &Instance,
        dir: &Path,
    ) -> Result<Vec<vroom_types::SnapshotVolume>, OpError> {
        let sizes: BTreeMap<Name, u64> = self
            .store
            .volumes()
            .map_err(|e| OpError::internal("failed to load volumes", e))?
            .into_iter()
            .map(|v| (v.name, v.size_mib))
            .collect();
        instance
            .spec
            .volumes
            .iter()
            .enumerate()
            .map(|(i, a)| {
                let file = blocking(|| file_digest(&data_volume_file(dir, i)))
                    .map_err(|e| OpError::internal("failed to read a data volume's copy", e))?;
                Ok(vroom_types::SnapshotVolume {
                    volume: a.volume.clone(),
                    path: a.path.clone(),
                    size_mib: sizes.get(&a.volume).copied().unwrap_or(file.bytes >> 20),
                    file,
                })
            })
            .collect()
    }

    /// Checks that a snapshot can be loaded here; returns its directory.
    fn usable_snapshot(&self, snapshot: &Snapshot, dir: &Path) -> Result<(), OpError> {
        let accel = self
            .driver
            .resolve_accel(snapshot.instance.spec.accel)
            .unwrap_or(snapshot.accel);
        let here = self.driver.machine(accel);
        if snapshot.machine != here {
            return Err(OpError::conflict(format!(
                "snapshot {} was taken on {}, this host runs {here}",
                snapshot.name, snapshot.machine
            )));
        }
        for (file, expected) in snapshot_files(snapshot) {
            let size = std::fs::metadata(dir.join(&file)).map(|m| m.len()).ok();
            if size != Some(expected.bytes) {
                return Err(OpError::new(
                    ErrorCode::Conflict,
                    format!(
                        "snapshot {} is corrupt: its {file} has {} bytes, {} were recorded",
                        snapshot.name,
                        size.map_or("no".to_string(), |s| s.to_string()),
                        expected.bytes
                    ),
                ));
            }
        }
        Ok(())
    }

    /// Verifies a snapshot's files against their digests (a full read).
    fn verify_snapshot(&self, snapshot: &Snapshot, dir: &Path) -> Result<(), OpError> {
        self.usable_snapshot(snapshot, dir)?;
        for (file, expected) in snapshot_files(snapshot) {
            let digest = file_digest(&dir.join(&file))
                .map_err(|e| OpError::internal(format!("failed to read {file}"), e))?;
            if &digest != expected {
                return Err(OpError::new(
                    ErrorCode::Conflict,
                    format!(
                        "snapshot {} is corrupt: its {file} does not match its sha256; remove it",
                        snapshot.name
                    ),
                ));
            }
        }
        Ok(())
    }

    /// Puts an instance back to a snapshot: memory, devices and config. The
    /// snapshot is verified before anything changes; then the instance's
    /// VM is replaced by one started from the snapshot.
    pub(in crate::engine) async fn restore_unlogged(
        self: &Arc<Self>,
        name: &str,
        snapshot_name: &str,
    ) -> Result<Instance, OpError> {
        let cell = self.cell(name)?;
        let _op = cell.op.lock().await;
        self.still_registered(name, &cell)?;
        let dir = self.snapshot_dir(snapshot_name)?;
        let snapshot = self.get_snapshot(snapshot_name)?;
        let instance = cell.snapshot();
        if let Some(why) = VmShape::of(&instance).mismatch(&snapshot.shape()) {
            return Err(OpError::conflict(format!(
                "cannot restore snapshot {snapshot_name} into {name}: {why}"
            )));
        }
        if self.splice_blocking_removal(name).is_some() {
            return Err(OpError::conflict(format!(
                "cannot restore {name} while it is spliced; unsplice first"
            )));
        }
        blocking(|| self.verify_snapshot(&snapshot, &dir))?;
        let targets = self.volumes_to_restore(&instance, &snapshot)?;
        let same_instance = snapshot.instance.id == instance.id;
        self.stop_locked(&cell, true, DesiredState::Running).await?;
        let image = self.resolve_image(&instance.image_id).await?;
        // The guest's memory holds its disks as they were: they go back too.
        blocking(|| -> Result<(), OpError> {
            for (i, target) in targets.iter().enumerate() {
                vroom_volume::data::copy_into_place(&data_volume_file(&dir, i), target)
                    .map_err(|e| OpError::internal("failed to restore a data volume", e))?;
            }
            Ok(())
        })?;
        blocking(|| -> Result<(), OpError> {
            let io = |e| OpError::internal("failed to restore the config volume", e);
            let staged = cell.dir.join("config.img.restore");
            copy_hashed(&dir.join(VOLUME), &staged).map_err(io)?;
            if !same_instance {
                // Another instance's state: this one keeps its own identity.
                vroom_volume::write_instance(&staged, &instance_file(&instance, &image))
                    .map_err(|e| OpError::internal("failed to write the identity", e))?;
            }
            std::fs::rename(&staged, cell.volume()).map_err(io)?;
            sync_dir(&cell.dir).map_err(io)
        })?;
        // Another instance's snapshot brings a config this one never had:
        // a whole new config, as an import is.
        self.config_went_back(&cell, snapshot.config(), vroom_types::ConfigOrigin::Import)
            .await?;
        self.update(&cell, |r| r.instance.desired = DesiredState::Running)?;
        cell.crash_streak.store(0, Ordering::SeqCst);
        let source = StateSource {
            memory: dir.join(MEMORY),
            expected: snapshot.memory.clone(),
            reload_volume: !same_instance,
            label: format!("snapshot {snapshot_name}"),
        };
        self.launch_from(&cell, Some(image), Some(source)).await?;
        Ok(cell.snapshot())
    }

    /// The files of `instance`'s data volumes a restore of `snapshot` writes,
    /// in the snapshot's order: the instance must have the same volumes at
    /// the same paths (its memory has them mounted there).
    fn volumes_to_restore(
        &self,
        instance: &Instance,
        snapshot: &Snapshot,
    ) -> Result<Vec<PathBuf>, OpError> {
        let have: Vec<(&str, &str)> = instance
            .spec
            .volumes
            .iter()
            .map(|a| (a.volume.as_str(), a.path.as_str()))
            .collect();
        let had: Vec<&str> = snapshot
            .data_volumes
            .iter()
            .map(|v| v.path.as_str())
            .collect();
        if have.iter().map(|(_, p)| *p).collect::<Vec<_>>() != had {
            return Err(OpError::conflict(format!(
                "snapshot {} had data volumes at [{}], {} has them at [{}]",
                snapshot.name,
                had.join(", "),
                instance.spec.name,
                have.iter().map(|(_, p)| *p).collect::<Vec<_>>().join(", ")
            )));
        }
        Ok(self
            .data_disks(instance)?
            .into_iter()
            .map(|d| d.path)
            .collect())
    }

    /// The snapshot `run --from-snapshot` starts from, checked, with its directory.
    pub(super) fn clone_source(&self, name: &str) -> Result<(Snapshot, PathBuf), OpError> {
        let dir = self.snapshot_dir(name)?;
        let snapshot = self.get_snapshot(name)?;
        blocking(|| self.usable_snapshot(&snapshot, &dir))?;
        Ok((snapshot, dir))
    }

    /// Loads a saved state into a VMM just launched `incoming`, lets it run
    /// and has the guest reseed, set its clock and (for a clone) take on its
    /// new identity. The VMM is killed on failure.
    pub(super) async fn start_from_state(
        &self,
        cell: &Arc<Cell>,
        process: &VmProcess,
        source: &StateSource,
    ) -> Result<(), OpError> {
        let t0 = Instant::now();
        let loaded = blocking(|| {
            load_memory(self.driver.as_ref(), process, source)?;
            self.driver
                .resume(process)
                .map_err(|e| OpError::internal("failed to start the restored VM", e))
        });
        let load_ms = t0.elapsed().as_millis() as u64;
        let resumed = match loaded {
            Ok(()) => cell
                .agent
                .resume(source.reload_volume, AGENT_TIMEOUT)
                .await
                .map(|_| ())
                .map_err(|e| {
                    OpError::wrap(
                        ErrorCode::Internal,
                        format!("the guest restored from {} did not resume", source.label),
                        e,
                    )
                }),
            Err(e) => Err(e),
        };
        if resumed.is_err() {
            let _ = self.driver.kill(process);
            self.driver.wait_exit(process).await;
        }
        tracing::info!(from = %source.label, load_ms, resume_ms = t0.elapsed().as_millis() as u64 - load_ms, "started from a saved state");
        resumed
    }

    /// After a daemon restart, whether the VM was starting from a saved
    /// state: it is killed (the caller boots the instance instead).
    pub(super) async fn kill_interrupted_restore(
        &self,
        cell: &Arc<Cell>,
        process: &VmProcess,
    ) -> bool {
        if !cell.dir.join(RESTORE_MARKER).exists() {
            return false;
        }
        tracing::warn!(instance = %cell.snapshot().spec.name, "killing a VM whose start from a saved state was interrupted; booting it instead");
        let _ = self.driver.kill(process);
        self.driver.wait_exit(process).await;
        clear_marker(&cell.dir, RESTORE_MARKER);
        true
    }

    /// After a daemon restart: an instance whose clone from `snapshot` the
    /// last daemon did not finish fails, saying so, and its VM (which may
    /// hold the snapshot's identity) is killed. Booting it instead would
    /// present a fresh boot as a clone.
    pub(super) async fn fail_interrupted_clone(
        &self,
        cell: &Arc<Cell>,
        process: Option<VmProcess>,
        snapshot: &str,
    ) -> Result<(), OpError> {
        let error = format!(
            "interrupted while cloning from snapshot {snapshot}; remove it or run it again"
        );
        tracing::warn!(instance = %cell.snapshot().spec.name, %error, "failing an interrupted clone");
        if let Some(process) = process {
            let _ = self.driver.kill(&process);
            self.driver.wait_exit(&process).await;
        }
        clear_marker(&cell.dir, RESTORE_MARKER);
        self.update(cell, |r| {
            r.process = None;
            r.cloning_from = None;
            r.instance.status.pid = None;
            r.instance.status.state = InstanceState::Failed;
            r.instance.status.started_from = None;
            r.instance.status.last_error = Some(error.clone());
            // Nothing may start it as if it were the clone (a cluster's
            // pass starts what is wanted running): only a user's `start`.
            r.instance.desired = DesiredState::Stopped;
        })?;
        Ok(())
    }

    /// After a daemon restart: a VM an interrupted snapshot left paused
    /// runs again and its guest is resumed.
    pub(super) async fn recover_paused(&self, cell: &Arc<Cell>, process: &VmProcess) {
        if !cell.dir.join(SNAPSHOT_MARKER).exists() {
            return;
        }
        let name = cell.snapshot().spec.name;
        tracing::warn!(instance = %name, "resuming a VM an interrupted snapshot left paused or frozen");
        if let Ok(VmRunState::Paused | VmRunState::Saving) =
            blocking(|| self.driver.run_state(process))
        {
            if let Err(e) = blocking(|| self.driver.resume(process)) {
                tracing::warn!(instance = %name, error = %e, "cannot resume the VM");
            }
        }
        if let Err(e) = cell.agent.resume(false, AGENT_TIMEOUT).await {
            tracing::warn!(instance = %name, error = %e, "the guest did not confirm its resume");
        }
        // A volume snapshot froze its data volumes (they thaw by themselves
        // after a bound too; an older guest does not know the request).
        if !cell.lock().instance.spec.volumes.is_empty() {
            let _ = cell
                .agent
                .call(vroom_agent_proto::HostCommand::ThawVolumes, AGENT_TIMEOUT)
                .await;
        }
        clear_marker(&cell.dir, SNAPSHOT_MARKER);
    }

    /// The warm snapshot `run` may start from: same image, memory, CPUs,
    /// NICs and machine.
    pub(super) fn warm_for(
        &self,
        image: &BootImage,
        shape: &VmShape,
        accel: vroom_types::Accel,
    ) -> Option<(Snapshot, PathBuf)> {
        let dir = self.warm_dir().join(self.warm_key(image, shape, accel));
        let snapshot = read_manifest(&dir)?;
        (snapshot.kind == SnapshotKind::Warm
            && snapshot.shape() == *shape
            && self.usable_snapshot(&snapshot, &dir).is_ok())
        .then_some((snapshot, dir))
    }

    fn warm_key(&self, image: &BootImage, shape: &VmShape, accel: vroom_types::Accel) -> String {
        let key = format!(
            "{}|{}|{}|{}|{}|{}|{}",
            image.id,
            image.kernel.display(),
            image.initramfs.display(),
            shape.mem_mib,
            shape.cpus,
            shape.nics,
            self.driver.machine(accel)
        );
        hex(&Sha256::digest(key.as_bytes()))[..20].to_string()
    }

    /// Boots an image once with its default config on NICs attached to
    /// nothing, waits until it is ready and keeps a warm snapshot of it,
    /// replacing an older one of the same shape.
    pub(in crate::engine) async fn warm_image_unlogged(
        self: &Arc<Self>,
        image_ref: &str,
        mem_mib: Option<u64>,
    ) -> Result<Snapshot, OpError> {
        let image = self.resolve_image(image_ref).await?;
        if !image.manifest.appliance.volumes.is_empty() {
            return Err(OpError::conflict(format!(
                "image {} declares data volumes: its instances boot with them mounted, never from a warm snapshot",
                image.manifest.name
            )));
        }
        let spec = InstanceSpec {
            name: Name::new(&image.manifest.name)
                .or_else(|_| Name::new("warm"))
                .expect("invariant: valid name"),
            image: image.id.clone(),
            mem_mib,
            cpus: 1,
            nics: vec![],
            accel: vroom_types::AccelChoice::Auto,
            config_volume_kib: None,
            ephemeral: false,
            volumes: Vec::new(),
        };
        let mem_mib = self.check_resources(&spec, &image)?;
        let accel = self
            .driver
            .resolve_accel(spec.accel)
            .map_err(|e| OpError::wrap(ErrorCode::HostUnsupported, "cannot run here", e))?;
        let id = random_id();
        let roles = &image.manifest.appliance.nic_roles;
        let nics: Vec<NicStatus> = (0..roles.len().max(1))
            .map(|i| {
                let third = u8::try_from(i).unwrap_or(u8::MAX);
                let [a, b] = WARM_SUBNET_BASE;
                NicStatus {
                    network: Name::new("warm").expect("invariant: valid name"),
                    ip: Some(Ipv4Addr::new(a, b, third, 2)),
                    prefix_len: 24,
                    gateway: Ipv4Addr::new(a, b, third, 1),
                    mac: ipam::mac_address(&id, i),
                    tap: ipam::tap_name(&self.cfg.iface_prefix, &id, i),
                    role: roles.get(i).cloned(),
                }
            })
            .collect();
        let instance = new_instance(&id, spec, &image, mem_mib, accel, nics);
        let shape = VmShape::of(&instance);
        let target = self.warm_dir().join(self.warm_key(&image, &shape, accel));
        let partial = blocking(|| self.partial_dir(&self.warm_dir()))?;
        let run_dir = partial.join("run");
        let result = self
            .warm_in(&image, &instance, &run_dir, &partial, &target)
            .await;
        let _ = blocking(|| std::fs::remove_dir_all(&partial));
        result
    }

    async fn warm_in(
        &self,
        image: &BootImage,
        instance: &Instance,
        run_dir: &Path,
        partial: &Path,
        target: &Path,
    ) -> Result<Snapshot, OpError> {
        blocking(|| -> Result<(), OpError> {
            std::fs::create_dir_all(run_dir)
                .map_err(|e| OpError::internal("failed to create the warm-up dir", e))?;
            vroom_volume::create(
                &run_dir.join("config.img"),
                vroom_volume::DEFAULT_SIZE_KIB,
                &instance_file(instance, image),
                &instance.config,
            )
            .map_err(|e| OpError::internal("failed to create the config volume", e))
        })?;
        let cell = Cell::new(
            run_dir.to_path_buf(),
            InstanceRecord {
                instance: instance.clone(),
                process: None,
                ready_timeout_secs: WARM_READY_TIMEOUT.as_secs(),
                ever_ready: false,
                seed_config: None,
                cluster: false,
                removing: false,
                wipe: false,
                cloning_from: None,
            },
        );
        let launch = self.launch_spec(
            &cell,
            instance,
            image,
            instance.status.accel.unwrap_or(vroom_types::Accel::Tcg),
            false,
        )?;
        let process =
            self.driver.launch(&launch).await.map_err(|e| {
                OpError::wrap(ErrorCode::Internal, "failed to start the warm-up VM", e)
            })?;
        let outcome = async {
            let deadline = Instant::now() + WARM_READY_TIMEOUT;
            loop {
                if !self.driver.is_alive(&process) {
                    return Err(OpError::new(
                        ErrorCode::Internal,
                        format!("image {} died while warming up", instance.image_name),
                    ));
                }
                match cell.agent.health(Duration::from_secs(2)).await {
                    Ok(report) if report.ready => break,
                    Ok(report) if report.config_error.is_some() => {
                        return Err(OpError::new(
                            ErrorCode::Conflict,
                            format!(
                                "image {} cannot be warmed: its default config does not work: {}",
                                instance.image_name,
                                report.config_error.unwrap_or_default()
                            ),
                        ))
                    }
                    _ if Instant::now() > deadline => {
                        return Err(OpError::new(
                            ErrorCode::Internal,
                            format!(
                                "image {} did not become ready within {}s",
                                instance.image_name,
                                WARM_READY_TIMEOUT.as_secs()
                            ),
                        ))
                    }
                    _ => tokio::time::sleep(HEALTH_POLL).await,
                }
            }
            let name = Name::new(&instance.image_name)
                .or_else(|_| Name::new("warm"))
                .expect("invariant: valid name");
            // Replace an older warm snapshot of the same key.
            let old = partial.with_extension("old");
            if target.exists() {
                blocking(|| std::fs::rename(target, &old))
                    .map_err(|e| OpError::internal("failed to replace the old warm snapshot", e))?;
            }
            let snapshot = self
                .capture(&cell, instance, &process, &name, SnapshotKind::Warm, target)
                .await;
            let _ = blocking(|| std::fs::remove_dir_all(&old));
            snapshot
        }
        .await;
        let _ = self.driver.kill(&process);
        self.driver.wait_exit(&process).await;
        outcome
    }
}

pub(super) fn state_word(state: InstanceState) -> &'static str {
    match state {
        InstanceState::Starting => "starting",
        InstanceState::Running => "running",
        InstanceState::Stopping => "stopping",
        InstanceState::Stopped => "stopped",
        InstanceState::Restarting => "restarting",
        InstanceState::Failed => "failed",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_names_carry_the_utc_time() {
        assert_eq!(default_name("web", 0), "web-19700101-000000");
        // 2026-11-22 13:45:07 UTC
        assert_eq!(default_name("web", 1_795_355_107), "web-20261122-134507");
        assert_eq!(default_name("a", 951_782_400), "a-20000229-000000");
    }

    #[test]
    fn hashing_counts_and_digests_both_ways() {
        let mut w = Hashing::new(Vec::new());
        w.write_all(b"abc").unwrap();
        let (data, digest) = w.finish();
        assert_eq!(data, b"abc");
        assert_eq!(
            digest.sha256,
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        let mut r = Hashing::new(&b"abc"[..]);
        std::io::copy(&mut r, &mut std::io::sink()).unwrap();
        assert_eq!(r.finish().1, digest);
    }
}
