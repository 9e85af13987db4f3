//! Forensic decommissioning: `rm --archive DIR` keeps what an investigation
//! needs (a last snapshot of the memory when the instance runs, the config
//! volume and its history, the console logs, the record) with a `sha256sum`
//! manifest, then overwrites the instance's files before unlinking them.

use std::fs::File;
use std::io::Write;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::Mutex;

use rustix::fs::{Access, AtFlags, Mode, OFlags, ResolveFlags};
use rustix::process::{Gid, Uid};
use vroom_base::LockExt;

use vroom_types::{ArchiveReport, ArchivedFile, ARCHIVE_MANIFEST};

use super::snapshots::{copy_hashed_into, save_memory_into, MEMORY, VOLUME};
use super::*;

/// Who asked for an archive, when it is not root: the kernel checks every
/// step of the archive's path with this uid and gid (no supplementary
/// groups: refusing what only a group would allow is the safe side), and
/// the archive becomes theirs once it is complete.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Owner {
    uid: u32,
    gid: u32,
}

/// Runs `work` with the caller's filesystem identity, on a thread of its own
/// that ends with it (credentials are per thread on Linux; the raw syscalls
/// rustix makes change only the calling thread, unlike glibc's, which apply
/// to every thread of the process). vroomd's other threads keep root's.
/// `None` runs `work` here, as root.
fn as_caller<T: Send>(
    owner: Option<Owner>,
    work: impl FnOnce() -> Result<T, Refusal> + Send,
) -> Result<T, Refusal> {
    use rustix::thread::{set_thread_groups, set_thread_res_gid, set_thread_res_uid};
    let Some(owner) = owner else {
        return work();
    };
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                // Groups and gid first: they need CAP_SETGID, which a
                // non-root effective uid no longer has.
                let switched = set_thread_groups(&[])
                    .and_then(|()| set_thread_res_gid(None, Some(Gid::from_raw(owner.gid)), None))
                    .and_then(|()| set_thread_res_uid(None, Some(Uid::from_raw(owner.uid)), None));
                switched.map_err(|e| Refusal(e, "taking the caller's identity"))?;
                work()
            })
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    })
}

/// What vroomd made in an archive directory, to give to the caller once the
/// archive is complete or to remove on an error: by name, relative to the
/// directory's own descriptor, never by a path that resolves again.
enum Made {
    File {
        name: String,
        file: File,
    },
    Dir {
        name: String,
        dir: Option<Arc<ArchiveDir>>,
    },
}

/// An archive directory, open: every file of the archive is created through
/// this descriptor, never through the path the user gave, so a directory
/// swapped for a symbolic link after the checks is not where the archive
/// goes. Files are created new, 0600, never following a link; what is made
/// is remembered (see [`Made`]).
struct ArchiveDir {
    handle: OwnedFd,
    made: Mutex<Vec<Made>>,
}

fn made(dir: &ArchiveDir) -> std::sync::MutexGuard<'_, Vec<Made>> {
    dir.made.lock_unpoisoned()
}

const DIR_FLAGS: OFlags = OFlags::RDONLY
    .union(OFlags::DIRECTORY)
    .union(OFlags::NOFOLLOW)
    .union(OFlags::CLOEXEC);

/// Opens the directory `name` in `dir` without following a link, and
/// checks it is the one vroomd just made: its own, 0700 and empty. Another
/// directory renamed into place meanwhile is refused, never given to the
/// caller.
fn open_made_dir(dir: BorrowedFd<'_>, name: &str) -> std::io::Result<OwnedFd> {
    let handle = rustix::fs::openat(dir, name, DIR_FLAGS, Mode::empty())?;
    let stat = rustix::fs::fstat(&handle)?;
    let ours = stat.st_uid == rustix::process::geteuid().as_raw()
        && stat.st_mode & 0o7777 == 0o700
        && is_empty(&handle)?;
    if !ours {
        return Err(std::io::Error::other(format!(
            "{name} changed while it was being made"
        )));
    }
    Ok(handle)
}

fn is_empty(dir: &OwnedFd) -> std::io::Result<bool> {
    for entry in rustix::fs::Dir::read_from(dir)? {
        let entry = entry?;
        if !matches!(entry.file_name().to_bytes(), b"." | b"..") {
            return Ok(false);
        }
    }
    Ok(true)
}

impl ArchiveDir {
    fn new(handle: OwnedFd) -> ArchiveDir {
        ArchiveDir {
            handle,
            made: Mutex::default(),
        }
    }

    /// Creates `name` in the directory: new (an existing file or link is an
    /// error), 0600.
    fn create_file(&self, name: &str) -> std::io::Result<File> {
        let fd = rustix::fs::openat(
            &self.handle,
            name,
            OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::from_raw_mode(0o600),
        )?;
        let file = File::from(fd);
        made(self).push(Made::File {
            name: name.to_string(),
            file: file.try_clone()?,
        });
        Ok(file)
    }

    /// Creates the subdirectory `name` (0700) and opens it.
    fn create_dir(&self, name: &str) -> std::io::Result<Arc<ArchiveDir>> {
        rustix::fs::mkdirat(&self.handle, name, Mode::from_raw_mode(0o700))?;
        let index = {
            let mut made = made(self);
            made.push(Made::Dir {
                name: name.to_string(),
                dir: None,
            });
            made.len() - 1
        };
        let dir = Arc::new(ArchiveDir::new(open_made_dir(self.handle.as_fd(), name)?));
        if let Made::Dir { dir: slot, .. } = &mut made(self)[index] {
            *slot = Some(dir.clone());
        }
        Ok(dir)
    }

    /// Gives what vroomd made to `owner`, through the descriptors it holds.
    fn give_to(&self, owner: Owner) -> std::io::Result<()> {
        let (uid, gid) = (Uid::from_raw(owner.uid), Gid::from_raw(owner.gid));
        for entry in made(self).iter() {
            match entry {
                Made::File { file, .. } => rustix::fs::fchown(file, Some(uid), Some(gid))?,
                Made::Dir { dir: Some(dir), .. } => {
                    dir.give_to(owner)?;
                    rustix::fs::fchown(&dir.handle, Some(uid), Some(gid))?;
                }
                Made::Dir { dir: None, .. } => {}
            }
        }
        Ok(())
    }

    /// Removes what vroomd made, newest first, by name in the directory it
    /// made it in; nothing else. A name the caller swapped for a link is
    /// unlinked as a link (a file) or left (a directory): never followed.
    fn remove_made(&self) {
        let mut made = made(self);
        while let Some(entry) = made.pop() {
            let (name, flags) = match &entry {
                Made::File { name, .. } => (name, AtFlags::empty()),
                Made::Dir { name, dir } => {
                    if let Some(dir) = dir {
                        dir.remove_made();
                    }
                    (name, AtFlags::REMOVEDIR)
                }
            };
            if let Err(e) = rustix::fs::unlinkat(&self.handle, name.as_str(), flags) {
                tracing::warn!(file = %name, error = %e, "cannot remove a file of a failed archive");
            }
        }
    }
}

/// An archive directory and, when vroomd created it, the parent it was
/// created in (open) and its name there.
struct Archive {
    dir: ArchiveDir,
    created: Option<(OwnedFd, String)>,
    owner: Option<Owner>,
}

impl Archive {
    /// Gives the complete archive to its owner: the files and
    /// subdirectories vroomd made, and the directory when vroomd created
    /// it. Until then it is root's (0700), so the caller cannot change it
    /// while vroomd writes.
    fn give_to_owner(&self) -> std::io::Result<()> {
        let Some(owner) = self.owner else {
            return Ok(());
        };
        self.dir.give_to(owner)?;
        if self.created.is_some() {
            rustix::fs::fchown(
                &self.dir.handle,
                Some(Uid::from_raw(owner.uid)),
                Some(Gid::from_raw(owner.gid)),
            )?;
        }
        Ok(())
    }

    /// Removes what vroomd made, and the directory when vroomd created it.
    fn remove(&self) {
        self.dir.remove_made();
        if let Some((parent, name)) = &self.created {
            if let Err(e) = rustix::fs::unlinkat(parent, name.as_str(), AtFlags::REMOVEDIR) {
                tracing::warn!(dir = %name, error = %e, "cannot remove the dir of a failed archive");
            }
        }
    }
}

/// Checks the archive directory before anything changes and opens it;
/// creates it (0700) when it does not exist. `owner` is the caller unless
/// it is root: every component of the path is then resolved with the
/// caller's own permissions (search on each ancestor, write on the
/// directory or, to create it, on its parent), so vroomd's root privileges
/// reach nothing the caller could not. Whoever asks, a symbolic link is
/// refused as the directory or its parent, and a magic link
/// (`/proc/PID/root`, `/proc/self/fd/N`) anywhere in the path.
fn prepare_dir(dir: &Path, owner: Option<Owner>) -> Result<Archive, OpError> {
    let refuse =
        |why: String| OpError::conflict(format!("cannot archive to {}: {why}", dir.display()));
    if !dir.is_absolute() {
        return Err(OpError::new(
            ErrorCode::InvalidArgument,
            format!(
                "the archive dir must be an absolute path, not {}",
                dir.display()
            ),
        ));
    }
    if dir
        .components()
        .any(|c| matches!(c, std::path::Component::ParentDir))
    {
        return Err(OpError::new(
            ErrorCode::InvalidArgument,
            format!(
                "the archive dir must not contain `..`, not {}",
                dir.display()
            ),
        ));
    }
    let (Some(parent), Some(name)) = (dir.parent(), dir.file_name()) else {
        return Err(refuse("it is not empty".into()));
    };
    let name = name
        .to_str()
        .ok_or_else(|| refuse("its name is not UTF-8".into()))?;
    let not_yours = || {
        refuse(format!(
            "uid {} may not write there; archive into a directory of your own",
            owner.map_or(0, |o| o.uid)
        ))
    };
    let resolve = RESOLVE_FLAGS;
    let open = |at: BorrowedFd<'_>, path: &Path| {
        rustix::fs::openat2(at, path, DIR_FLAGS, Mode::empty(), resolve)
    };
    // As the caller: the parent, then the directory itself when it exists,
    // and whether the caller may write where vroomd is to write.
    let resolved = as_caller(owner, || {
        let writable = |at: &OwnedFd| {
            rustix::fs::accessat(
                at,
                ".",
                Access::WRITE_OK | Access::EXEC_OK,
                AtFlags::EACCESS,
            )
        };
        let parent = open(rustix::fs::CWD, parent).map_err(|e| Refusal(e, "its parent"))?;
        match open(parent.as_fd(), Path::new(name)) {
            Ok(existing) => {
                writable(&existing).map_err(|e| Refusal(e, "it"))?;
                Ok((parent, Some(existing)))
            }
            Err(rustix::io::Errno::NOENT) => {
                writable(&parent).map_err(|e| Refusal(e, "its parent"))?;
                Ok((parent, None))
            }
            Err(e) => Err(Refusal(e, "it")),
        }
    });
    let (parent, existing) = resolved.map_err(|Refusal(errno, what)| {
        // O_DIRECTORY answers ENOTDIR for a link before O_NOFOLLOW's ELOOP.
        let path = if what == "it" { dir } else { parent };
        let link = path
            .symlink_metadata()
            .is_ok_and(|m| m.file_type().is_symlink());
        match errno {
            rustix::io::Errno::LOOP | rustix::io::Errno::NOTDIR if link => {
                refuse(format!("{what} is a symbolic link"))
            }
            // Not the last component: a link on the way is one vroomd does
            // not follow.
            rustix::io::Errno::LOOP => refuse(format!(
                "{what} is reached through a magic link (/proc/PID/root, /proc/self/fd/N) or too many links"
            )),
            rustix::io::Errno::NOTDIR => refuse(format!("{what} is not a directory")),
            rustix::io::Errno::ACCESS | rustix::io::Errno::PERM => not_yours(),
            e => refuse(std::io::Error::from(e).to_string()),
        }
    })?;
    let archive = match existing {
        Some(handle) => {
            if !is_empty(&handle).map_err(|e| refuse(e.to_string()))? {
                return Err(refuse("it is not empty".into()));
            }
            Archive {
                dir: ArchiveDir::new(handle),
                created: None,
                owner,
            }
        }
        None => {
            rustix::fs::mkdirat(&parent, name, Mode::from_raw_mode(0o700))
                .map_err(|e| refuse(std::io::Error::from(e).to_string()))?;
            // Left in place when it is not the one just made: it is not ours.
            let handle = open_made_dir(parent.as_fd(), name).map_err(|e| refuse(e.to_string()))?;
            Archive {
                dir: ArchiveDir::new(handle),
                created: Some((parent, name.to_string())),
                owner,
            }
        }
    };
    // Writable, really (a read-only mount answers only on write).
    if let Err(e) = archive.dir.create_file(".vroom-probe") {
        archive.remove();
        return Err(refuse(format!("it is not writable ({e})")));
    }
    archive.dir.remove_made();
    Ok(archive)
}

/// How the archive's path resolves: magic links (`/proc/PID/root`, which
/// leads into another mount namespace, or `/proc/self/fd/N`, into vroomd's
/// own open directories) are refused.
const RESOLVE_FLAGS: ResolveFlags = ResolveFlags::NO_MAGICLINKS;

/// Why the caller's thread refused a path: the error and what it concerns.
#[derive(Debug)]
struct Refusal(rustix::io::Errno, &'static str);

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.1, std::io::Error::from(self.0))
    }
}

impl std::error::Error for Refusal {}

/// Overwrites a file with zeros, fsyncs it, then unlinks it.
fn wipe(path: &Path) -> std::io::Result<()> {
    let len = std::fs::metadata(path)?.len();
    let mut file = std::fs::OpenOptions::new().write(true).open(path)?;
    let zeros = vec![0u8; 64 * 1024];
    let mut left = len;
    while left > 0 {
        let n = left.min(zeros.len() as u64) as usize;
        file.write_all(&zeros[..n])?;
        left -= n as u64;
    }
    file.sync_all()?;
    std::fs::remove_file(path)
}

/// Zeroes, fsyncs and unlinks every file under `dir`; returns them.
pub(super) fn wipe_dir(dir: &Path) -> Result<Vec<PathBuf>, OpError> {
    let mut wiped = vec![];
    for file in files_under(dir) {
        wipe(&file)
            .map_err(|e| OpError::internal(format!("failed to wipe {}", file.display()), e))?;
        wiped.push(file);
    }
    Ok(wiped)
}

/// Every regular file under `dir`, depth first.
fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = vec![];
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        match entry.file_type() {
            Ok(t) if t.is_dir() => out.extend(files_under(&path)),
            Ok(t) if t.is_file() => out.push(path),
            _ => {}
        }
    }
    out
}

impl Engine {
    /// Archives an instance into `dir`, then removes it, wiping its files.
    /// `caller` is the uid and gid that asked (`None` when unknown): a
    /// caller other than root archives only where it may write itself, and
    /// the archive, once complete, is its own.
    pub(in crate::engine) async fn remove_archived_unlogged(
        self: &Arc<Self>,
        name: &str,
        dir: &str,
        caller: Option<(u32, u32)>,
    ) -> Result<ArchiveReport, OpError> {
        let cell = self.cell(name)?;
        let _op = cell.op.lock().await;
        self.still_registered(name, &cell)?;
        self.check_removable(name)?;
        let dir = PathBuf::from(dir);
        // Like a build's reads: root writes anywhere, a member only where
        // it could itself, and an unidentified caller (the TCP API's) nowhere.
        let owner = match caller {
            Some((0, _)) => None,
            Some((uid, gid)) => Some(Owner { uid, gid }),
            None => {
                return Err(OpError::conflict(format!(
                    "cannot archive to {}: the caller is not identified (only local callers of the API's socket archive to a host path)",
                    dir.display()
                )))
            }
        };
        let archive = blocking(|| prepare_dir(&dir, owner))?;
        let archived = self.archive_into(&cell, &archive).await;
        let (files, memory) = match archived {
            Ok(done) => done,
            Err(e) => {
                // Nothing half-written stays behind; the instance is untouched.
                blocking(|| archive.remove());
                return Err(e);
            }
        };
        // The intent goes on record before the VM is killed, with the wipe
        // it needs: a daemon killed from here on finishes the removal, wiping,
        // instead of leaving the instance stopped with its networks taken.
        self.update(&cell, |r| {
            r.removing = true;
            r.wipe = true;
        })?;
        self.stop_locked(&cell, true, DesiredState::Stopped).await?;
        let (networks, wiped) = self.forget(&cell, name, true).await?;
        drop(_op);
        self.sync_rooms_on(&networks).await;
        tracing::info!(instance = %name, dir = %dir.display(), files = files.len(), wiped = wiped.len(), "instance archived and removed");
        Ok(ArchiveReport {
            dir,
            files,
            wiped,
            memory,
        })
    }

    /// Writes the archive; the VM, if it runs, is left paused (it is
    /// removed next). Returns the files and whether memory is among them.
    /// On an error the VM runs on and its guest is thawed: the instance is
    /// left as it was, not paused while it reports running.
    async fn archive_into(
        &self,
        cell: &Arc<Cell>,
        archive: &Archive,
    ) -> Result<(Vec<ArchivedFile>, bool), OpError> {
        let process = cell
            .lock()
            .process
            .clone()
            .filter(|p| self.driver.is_alive(p));
        let written = self.write_archive(cell, archive, process.as_ref()).await;
        if let (Err(_), Some(process)) = (&written, &process) {
            if let Err(e) = blocking(|| self.driver.resume(process)) {
                tracing::error!(pid = process.pid, error = %e, "cannot resume the VM after a failed archive");
            }
            if let Err(e) = cell.agent.resume(false, AGENT_TIMEOUT).await {
                tracing::warn!(error = %e, "the guest did not confirm its resume after a failed archive");
            }
        }
        written
    }

    /// [`Self::archive_into`]'s work: freezes and saves `process` (when it
    /// runs), then writes every file and the manifest.
    async fn write_archive(
        &self,
        cell: &Arc<Cell>,
        archive: &Archive,
        process: Option<&VmProcess>,
    ) -> Result<(Vec<ArchivedFile>, bool), OpError> {
        let dir = &archive.dir;
        let io = |what: &str, e: std::io::Error| {
            OpError::internal(format!("failed to archive {what}"), e)
        };
        let record = cell.lock().clone();
        let mut files: Vec<ArchivedFile> = vec![];
        let entry = |path: &str, digest: vroom_types::SnapshotFile| ArchivedFile {
            path: path.to_string(),
            bytes: digest.bytes,
            sha256: digest.sha256,
        };
        if let Some(process) = process {
            // A frozen guest writes nothing more; a guest that cannot be
            // frozen (an older vroom-init) is captured as it is.
            if let Err(e) = cell.agent.freeze(AGENT_TIMEOUT).await {
                tracing::warn!(error = %e, "archiving a guest that could not be frozen");
            }
            let (_, digest) = blocking(|| {
                let file = dir.create_file(MEMORY).map_err(|e| io(MEMORY, e))?;
                save_memory_into(self.driver.as_ref(), process, file, Path::new(MEMORY))
            })?;
            files.push(entry(MEMORY, digest));
        }
        let history = self.settle_config(cell).await.ok();
        let data_disks = self.data_disks(&record.instance)?;
        blocking(|| -> Result<(), OpError> {
            // The data volumes (the VM, if it ran, is paused since its
            // memory was saved: of the same instant), holes kept.
            if !data_disks.is_empty() {
                let volumes_dir = dir
                    .create_dir("volumes")
                    .map_err(|e| io("the data volumes", e))?;
                for (a, disk) in record.instance.spec.volumes.iter().zip(&data_disks) {
                    let file = format!("{}.img", a.volume);
                    files.push(entry(
                        &format!("volumes/{file}"),
                        volumes_dir
                            .create_file(&file)
                            .and_then(|out| snapshots::copy_hashed_sparse_into(&disk.path, out))
                            .map_err(|e| io("the data volumes", e))?,
                    ));
                }
            }
            files.push(entry(
                VOLUME,
                dir.create_file(VOLUME)
                    .and_then(|file| copy_hashed_into(&cell.volume(), file))
                    .map_err(|e| io("the config volume", e))?,
            ));
            let write_json = |file: &str,
                              value: serde_json::Value|
             -> Result<ArchivedFile, OpError> {
                let bytes = serde_json::to_vec_pretty(&value).expect("invariant: JSON serializes");
                let mut out =
                    snapshots::Hashing::new(dir.create_file(file).map_err(|e| io(file, e))?);
                out.write_all(&bytes).map_err(|e| io(file, e))?;
                let (f, digest) = out.finish();
                f.sync_all().map_err(|e| io(file, e))?;
                Ok(entry(file, digest))
            };
            files.push(write_json(
                "instance.json",
                serde_json::to_value(&record).expect("invariant: a record serializes"),
            )?);
            files.push(write_json(
                "config-history.json",
                serde_json::to_value(&history).expect("invariant: a config log serializes"),
            )?);
            let console_dir = dir
                .create_dir("console")
                .map_err(|e| io("the console logs", e))?;
            let mut logs: Vec<PathBuf> = std::fs::read_dir(&cell.dir)
                .into_iter()
                .flatten()
                .flatten()
                .map(|e| e.path())
                .filter(|p| {
                    p.is_file()
                        && p.file_name()
                            .and_then(|n| n.to_str())
                            .is_some_and(|n| n.starts_with("console") && n.contains(".log"))
                })
                .collect();
            logs.sort();
            for log in logs {
                let file = log
                    .file_name()
                    .and_then(|n| n.to_str())
                    .unwrap_or("console.log");
                let rel = format!("console/{file}");
                files.push(entry(
                    &rel,
                    console_dir
                        .create_file(file)
                        .and_then(|out| copy_hashed_into(&log, out))
                        .map_err(|e| io("the console logs", e))?,
                ));
            }
            let manifest: String = files
                .iter()
                .map(|f| format!("{}  {}\n", f.sha256, f.path))
                .collect();
            let mut out = dir
                .create_file(ARCHIVE_MANIFEST)
                .map_err(|e| io(ARCHIVE_MANIFEST, e))?;
            out.write_all(manifest.as_bytes())
                .and_then(|()| out.sync_all())
                .map_err(|e| io(ARCHIVE_MANIFEST, e))?;
            // Complete: now, and only now, the caller's.
            archive
                .give_to_owner()
                .map_err(|e| io("the archive dir (giving it to the caller)", e))?;
            for d in [&console_dir.handle, &dir.handle] {
                rustix::fs::fsync(d).map_err(|e| io("the archive dir", e.into()))?;
            }
            Ok(())
        })?;
        Ok((files, process.is_some()))
    }
}

/// Checks an archive against its manifest: every listed file is there with
/// its sha256 and nothing else is. Returns one line per problem.
pub fn verify_archive(dir: &Path) -> Result<Vec<String>, String> {
    let manifest = std::fs::read_to_string(dir.join(ARCHIVE_MANIFEST))
        .map_err(|e| format!("cannot read {}: {e}", dir.join(ARCHIVE_MANIFEST).display()))?;
    let listed =
        vroom_types::parse_sha256sums(&manifest).map_err(|e| format!("{ARCHIVE_MANIFEST}: {e}"))?;
    let mut problems = vec![];
    for (hash, path) in &listed {
        // Streamed: a data volume's copy may be larger than memory.
        match snapshots::file_digest(&dir.join(path)) {
            Ok(digest) => {
                let actual = digest.sha256;
                if &actual != hash {
                    problems.push(format!("{path}: sha256 {actual}, the manifest says {hash}"));
                }
            }
            Err(e) => problems.push(format!("{path}: {e}")),
        }
    }
    for file in files_under(dir) {
        let rel = file
            .strip_prefix(dir)
            .map(|p| p.to_string_lossy().into_owned())
            .unwrap_or_default();
        if rel != ARCHIVE_MANIFEST && !listed.iter().any(|(_, p)| *p == rel) {
            problems.push(format!("{rel}: not in the manifest"));
        }
    }
    Ok(problems)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn archive_dirs_must_be_absolute_empty_and_writable() {
        let root = tempfile::tempdir().unwrap();
        assert!(prepare_dir(Path::new("relative"), None).is_err());
        assert!(prepare_dir(&root.path().join("a/../b"), None).is_err());
        let new = root.path().join("new");
        let archive = prepare_dir(&new, None).unwrap();
        assert!(archive.created.is_some());
        std::fs::write(new.join("x"), b"x").unwrap();
        let err = prepare_dir(&new, None).err().unwrap();
        assert!(err.message.contains("not empty"), "{}", err.message);
        let missing_parent = root.path().join("a/b");
        assert!(prepare_dir(&missing_parent, None).is_err());
        assert!(!missing_parent.exists());
    }

    /// The path rule on a real tree: (caller, target, allowed). Symbolic
    /// links are refused as the directory or its parent, for root too; a
    /// non-root caller may use its own directories, not another's, nor one
    /// it cannot reach (search on every ancestor is checked as the caller),
    /// nor a path through a magic link. What is created is 0700 and root's
    /// until the archive is complete.
    #[test]
    fn archive_dir_rule_table() {
        use std::os::unix::fs::{symlink, PermissionsExt};
        let root = tempfile::tempdir().unwrap();
        let base = root.path();
        std::fs::set_permissions(base, std::fs::Permissions::from_mode(0o755)).unwrap();
        let me = rustix::process::geteuid().as_raw();
        assert_eq!(me, 0, "these cases need root, as vroomd runs");
        let member = Owner {
            uid: 65534,
            gid: 65534,
        };
        let root_caller = None;
        std::fs::create_dir(base.join("empty")).unwrap();
        // The member's own directory, behind one it may not search.
        for (dir, mode) in [("locked", 0o700), ("locked/mine", 0o700), ("mine", 0o700)] {
            std::fs::create_dir(base.join(dir)).unwrap();
            std::fs::set_permissions(base.join(dir), std::fs::Permissions::from_mode(mode))
                .unwrap();
        }
        for dir in ["locked/mine", "mine"] {
            std::os::unix::fs::chown(base.join(dir), Some(member.uid), Some(member.gid)).unwrap();
        }
        let elsewhere = tempfile::tempdir().unwrap();
        symlink(elsewhere.path(), base.join("link")).unwrap();
        std::fs::create_dir(elsewhere.path().join("sub")).unwrap();
        let through_proc = format!("/proc/self/root{}", base.join("mine").display());
        let cases: &[(Option<Owner>, &str, Result<(), &str>)] = &[
            (root_caller, "new-root", Ok(())),
            (root_caller, "empty", Ok(())),
            (root_caller, "link", Err("is a symbolic link")),
            (
                root_caller,
                "link/sub",
                Err("its parent is a symbolic link"),
            ),
            (Some(member), "mine/new", Ok(())),
            (Some(member), "new-member", Err("may not write there")),
            (Some(member), "empty", Err("may not write there")),
            (Some(member), "locked/mine/new", Err("may not write there")),
            (Some(member), "link", Err("is a symbolic link")),
            (
                Some(member),
                "link/sub",
                Err("its parent is a symbolic link"),
            ),
            (Some(member), &through_proc, Err("magic link")),
            (root_caller, &through_proc, Err("magic link")),
        ];
        for (owner, target, want) in cases {
            let dir = base.join(target);
            let existed = dir.symlink_metadata().is_ok();
            let got = prepare_dir(&dir, *owner);
            match (want, got) {
                (Ok(()), Ok(archive)) => {
                    assert_eq!(archive.created.is_some(), !existed, "{target}");
                    if !existed {
                        let meta = dir.symlink_metadata().unwrap();
                        assert_eq!(meta.mode() & 0o7777, 0o700, "{target}");
                        assert_eq!(meta.uid(), me, "{target}");
                        archive.give_to_owner().unwrap();
                        let meta = dir.symlink_metadata().unwrap();
                        assert_eq!(meta.uid(), owner.map_or(me, |o| o.uid), "{target}");
                    }
                }
                (Err(why), Err(e)) => {
                    assert!(e.message.contains(why), "{target}: {}", e.message);
                    if !existed {
                        assert!(dir.symlink_metadata().is_err(), "{target} was created");
                    }
                }
                (want, got) => panic!(
                    "{owner:?} {target}: want {want:?}, got {:?}",
                    got.map(|a| a.created.is_some()).map_err(|e| e.message)
                ),
            }
        }
        assert_eq!(std::fs::read_dir(elsewhere.path()).unwrap().count(), 1);
        assert_eq!(
            std::fs::read_dir(elsewhere.path().join("sub"))
                .unwrap()
                .count(),
            0
        );
        assert_eq!(std::fs::read_dir(base.join("mine")).unwrap().count(), 1);
    }

    /// The clean-up of a failed archive removes what vroomd made and nothing
    /// else, even when the caller (who owns the directory) planted files
    /// and swapped a subdirectory vroomd made for a link to another.
    #[test]
    fn cleanup_removes_only_what_was_made() {
        use std::os::unix::fs::symlink;
        let root = tempfile::tempdir().unwrap();
        let victim = root.path().join("victim");
        std::fs::create_dir(&victim).unwrap();
        std::fs::write(victim.join("passwd"), b"keep").unwrap();
        std::fs::write(victim.join("console.log"), b"keep").unwrap();
        let target = root.path().join("archive");
        std::fs::create_dir(&target).unwrap();
        let archive = prepare_dir(&target, None).unwrap();
        archive.dir.create_file("memory.zst").unwrap();
        let console = archive.dir.create_dir("console").unwrap();
        console.create_file("console.log").unwrap();
        // The caller plants a manifest, moves the console dir away and puts
        // a link to another directory in its place.
        std::fs::write(target.join(ARCHIVE_MANIFEST), b"planted").unwrap();
        assert!(archive.dir.create_file(ARCHIVE_MANIFEST).is_err());
        std::fs::rename(target.join("console"), root.path().join("moved")).unwrap();
        symlink(&victim, target.join("console")).unwrap();
        archive.remove();
        assert_eq!(std::fs::read(victim.join("passwd")).unwrap(), b"keep");
        assert_eq!(std::fs::read(victim.join("console.log")).unwrap(), b"keep");
        assert_eq!(
            std::fs::read(target.join(ARCHIVE_MANIFEST)).unwrap(),
            b"planted"
        );
        assert!(target.join("console").symlink_metadata().is_ok());
        assert!(!target.join("memory.zst").exists());
        // What vroomd made in the console dir went, wherever it was moved.
        assert_eq!(
            std::fs::read_dir(root.path().join("moved"))
                .unwrap()
                .count(),
            0
        );
        // A directory vroomd created goes too, by its name in the parent it
        // holds, and nothing with that name elsewhere.
        let made = root.path().join("made");
        let archive = prepare_dir(&made, None).unwrap();
        archive.dir.create_file("instance.json").unwrap();
        archive.remove();
        assert!(!made.exists());
    }

    /// A subdirectory swapped in between its creation and its opening is
    /// not used (nor later given to the caller).
    #[test]
    fn a_dir_swapped_in_after_mkdir_is_refused() {
        let root = tempfile::tempdir().unwrap();
        let dir = ArchiveDir::new(rustix::fs::open(root.path(), DIR_FLAGS, Mode::empty()).unwrap());
        std::fs::create_dir(root.path().join("other")).unwrap();
        std::fs::write(root.path().join("other/x"), b"x").unwrap();
        rustix::fs::mkdirat(&dir.handle, "console", Mode::from_raw_mode(0o700)).unwrap();
        std::fs::remove_dir(root.path().join("console")).unwrap();
        std::fs::rename(root.path().join("other"), root.path().join("console")).unwrap();
        assert!(open_made_dir(dir.handle.as_fd(), "console").is_err());
    }

    /// Archive files are created new (a planted link is not followed) and
    /// 0600.
    #[test]
    fn archive_files_are_new_and_private() {
        let root = tempfile::tempdir().unwrap();
        let archive = prepare_dir(&root.path().join("a"), None).unwrap();
        let dir = &archive.dir;
        let target = root.path().join("target");
        std::fs::write(&target, b"keep").unwrap();
        std::os::unix::fs::symlink(&target, root.path().join("a/planted")).unwrap();
        assert!(dir.create_file("planted").is_err());
        assert_eq!(std::fs::read(&target).unwrap(), b"keep");
        dir.create_file("memory.zst").unwrap();
        let meta = root.path().join("a/memory.zst").metadata().unwrap();
        assert_eq!(meta.mode() & 0o777, 0o600);
    }

    #[test]
    fn verify_finds_flipped_missing_and_extra_files() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        std::fs::write(d.join("a"), b"hello").unwrap();
        let sum = snapshots::hex(&<sha2::Sha256 as sha2::Digest>::digest(b"hello"));
        std::fs::write(d.join(ARCHIVE_MANIFEST), format!("{sum}  a\n")).unwrap();
        assert_eq!(verify_archive(d).unwrap(), Vec::<String>::new());
        std::fs::write(d.join("a"), b"hellp").unwrap();
        assert!(verify_archive(d).unwrap()[0].starts_with("a: sha256"));
        std::fs::remove_file(d.join("a")).unwrap();
        std::fs::write(d.join("b"), b"x").unwrap();
        let problems = verify_archive(d).unwrap();
        assert_eq!(problems.len(), 2, "{problems:?}");
    }

    #[test]
    fn wiping_zeroes_then_unlinks() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("secret");
        std::fs::write(&f, vec![7u8; 100_000]).unwrap();
        wipe(&f).unwrap();
        assert!(!f.exists());
    }
}
