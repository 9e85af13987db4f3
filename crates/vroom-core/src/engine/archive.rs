//! Forensic decommissioning: `rm --archive DIR` keeps what an investigation
//! needs (a last snapshot of the memory when the instance runs, the config
//! volume and its history, the console logs, the record) with a `sha256sum`
//! manifest, then overwrites the instance's files before unlinking them.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;

use vroom_types::{ArchiveReport, ArchivedFile, ARCHIVE_MANIFEST};

use super::snapshots::{copy_hashed_into, save_memory_into, MEMORY, VOLUME};
use super::*;

/// Whether a caller may write into a directory owned by `dir_uid` with
/// permission bits `mode`, as the caller could itself: root (`None`) may
/// anywhere; any other uid (a member of the `vroom` group, whom vroomd's
/// root privileges must not serve beyond what it may do itself) only into a
/// directory it owns and may write and enter, or one that everybody may
/// write and enter (`/tmp`). Groups are not consulted: refusing a
/// group-writable directory is the safe side.
fn may_write_into(owner: Option<u32>, dir_uid: u32, mode: u32) -> bool {
    match owner {
        None => true,
        Some(uid) if uid == dir_uid => mode & 0o300 == 0o300,
        Some(_) => mode & 0o003 == 0o003,
    }
}

/// The archive directory, open: every file of the archive is created through
/// this descriptor (`/proc/self/fd/N/FILE`), never through the path the user
/// gave, so a directory swapped for a symbolic link after the checks is not
/// where the archive goes. Files are created new, 0600, never following a
/// link, and belong to the caller.
struct ArchiveDir {
    handle: File,
    owner: Option<u32>,
}

/// Opens a directory without following a symbolic link as its last
/// component.
fn open_dir_nofollow(path: &Path) -> std::io::Result<File> {
    OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
}

impl ArchiveDir {
    /// The directory as a path that resolves through its descriptor.
    fn path(&self) -> PathBuf {
        PathBuf::from(format!("/proc/self/fd/{}", self.handle.as_raw_fd()))
    }

    fn give_to_owner(&self, file: &File) -> std::io::Result<()> {
        match self.owner {
            Some(uid) => std::os::unix::fs::fchown(file, Some(uid), None),
            None => Ok(()),
        }
    }

    /// Creates `name` in the directory: new (an existing file or link is an
    /// error), 0600, the caller's.
    fn create_file(&self, name: &str) -> std::io::Result<File> {
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(self.path().join(name))?;
        self.give_to_owner(&file)?;
        Ok(file)
    }

    /// Creates the subdirectory `name` (0700, the caller's) and opens it.
    fn create_dir(&self, name: &str) -> std::io::Result<ArchiveDir> {
        let path = self.path().join(name);
        std::fs::DirBuilder::new().mode(0o700).create(&path)?;
        let handle = open_dir_nofollow(&path)?;
        let dir = ArchiveDir {
            handle,
            owner: self.owner,
        };
        dir.give_to_owner(&dir.handle)?;
        Ok(dir)
    }
}

/// Checks the archive directory before anything changes and opens it;
/// creates it (0700, the caller's) when it does not exist. Returns it and
/// whether it was created. `owner` is the caller's uid unless it is root:
/// see [`may_write_into`]. A symbolic link is refused as the directory or
/// its parent, whoever asks.
fn prepare_dir(dir: &Path, owner: Option<u32>) -> Result<(ArchiveDir, bool), OpError> {
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
    let not_yours = || {
        refuse(format!(
            "uid {} may not write there; archive into a directory of your own",
            owner.unwrap_or(0)
        ))
    };
    // O_DIRECTORY answers ENOTDIR for a link before O_NOFOLLOW's ELOOP.
    let opened = |e: std::io::Error, path: &Path, what: &str| {
        let link = path
            .symlink_metadata()
            .is_ok_and(|m| m.file_type().is_symlink());
        match e.raw_os_error() {
            Some(libc::ELOOP) => refuse(format!("{what} is a symbolic link")),
            Some(libc::ENOTDIR) if link => refuse(format!("{what} is a symbolic link")),
            Some(libc::ENOTDIR) => refuse(format!("{what} is not a directory")),
            _ => refuse(e.to_string()),
        }
    };
    let parent = ArchiveDir {
        handle: open_dir_nofollow(parent).map_err(|e| opened(e, parent, "its parent"))?,
        owner,
    };
    let (archive, created) = match open_dir_nofollow(&parent.path().join(name)) {
        Ok(handle) => {
            let meta = handle.metadata().map_err(|e| refuse(e.to_string()))?;
            if !may_write_into(owner, meta.uid(), meta.mode()) {
                return Err(not_yours());
            }
            let archive = ArchiveDir { handle, owner };
            let mut entries =
                std::fs::read_dir(archive.path()).map_err(|e| refuse(e.to_string()))?;
            if entries.next().is_some() {
                return Err(refuse("it is not empty".into()));
            }
            (archive, false)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let meta = parent
                .handle
                .metadata()
                .map_err(|e| refuse(e.to_string()))?;
            if !may_write_into(owner, meta.uid(), meta.mode()) {
                return Err(not_yours());
            }
            let name = name
                .to_str()
                .ok_or_else(|| refuse("its name is not UTF-8".into()))?;
            let archive = parent.create_dir(name).map_err(|e| refuse(e.to_string()))?;
            (archive, true)
        }
        Err(e) => return Err(opened(e, dir, "it")),
    };
    // Writable, really (a read-only mount answers only on write).
    let probe = archive.path().join(".vroom-probe");
    if let Err(e) = archive
        .create_file(".vroom-probe")
        .and_then(|_| std::fs::remove_file(&probe))
    {
        if created {
            let _ = std::fs::remove_dir(dir);
        }
        return Err(refuse(format!("it is not writable ({e})")));
    }
    Ok((archive, created))
}

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
    /// `caller` is the uid that asked (`None` when unknown): a caller other
    /// than root archives only where it may write itself, and the archive
    /// is its own.
    pub async fn remove_archived(
        self: &Arc<Self>,
        name: &str,
        dir: &str,
        caller: Option<u32>,
    ) -> Result<ArchiveReport, OpError> {
        let cell = self.cell(name)?;
        let _op = cell.op.lock().await;
        self.still_registered(name, &cell)?;
        self.check_removable(name)?;
        let dir = PathBuf::from(dir);
        // Like a build's reads: root writes anywhere, a member only where
        // it could itself, and an unidentified caller (the TCP API's) nowhere.
        let owner = match caller {
            Some(0) => None,
            Some(uid) => Some(uid),
            None => {
                return Err(OpError::conflict(format!(
                    "cannot archive to {}: the caller is not identified (only local callers of the API's socket archive to a host path)",
                    dir.display()
                )))
            }
        };
        let (archive, created) = blocking(|| prepare_dir(&dir, owner))?;
        let archived = self.archive_into(&cell, &archive).await;
        let (files, memory) = match archived {
            Ok(done) => done,
            Err(e) => {
                // Nothing half-written stays behind; the instance is untouched.
                blocking(|| {
                    for file in files_under(&archive.path()) {
                        let _ = std::fs::remove_file(file);
                    }
                    let _ = std::fs::remove_dir(archive.path().join("console"));
                    if created {
                        let _ = std::fs::remove_dir(&dir);
                    }
                });
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
        dir: &ArchiveDir,
    ) -> Result<(Vec<ArchivedFile>, bool), OpError> {
        let process = cell
            .lock()
            .process
            .clone()
            .filter(|p| self.driver.is_alive(p));
        let written = self.write_archive(cell, dir, process.as_ref()).await;
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
        dir: &ArchiveDir,
        process: Option<&VmProcess>,
    ) -> Result<(Vec<ArchivedFile>, bool), OpError> {
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
        blocking(|| -> Result<(), OpError> {
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
            for d in [&console_dir, dir] {
                d.handle.sync_all().map_err(|e| io("the archive dir", e))?;
            }
            Ok(())
        })?;
        Ok((files, process.is_some()))
    }
}

/// Checks an archive against its manifest: every listed file is there with
/// its sha256 and nothing else is. Returns one line per problem.
pub fn verify_archive(dir: &Path) -> Result<Vec<String>, String> {
    use sha2::Digest;
    let manifest = std::fs::read_to_string(dir.join(ARCHIVE_MANIFEST))
        .map_err(|e| format!("cannot read {}: {e}", dir.join(ARCHIVE_MANIFEST).display()))?;
    let listed =
        vroom_types::parse_sha256sums(&manifest).map_err(|e| format!("{ARCHIVE_MANIFEST}: {e}"))?;
    let mut problems = vec![];
    for (hash, path) in &listed {
        match std::fs::read(dir.join(path)) {
            Ok(bytes) => {
                let actual = snapshots::hex(&sha2::Sha256::digest(&bytes));
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

    #[test]
    fn archive_dirs_must_be_absolute_empty_and_writable() {
        let root = tempfile::tempdir().unwrap();
        assert!(prepare_dir(Path::new("relative"), None).is_err());
        assert!(prepare_dir(&root.path().join("a/../b"), None).is_err());
        let new = root.path().join("new");
        let (_, created) = prepare_dir(&new, None).unwrap();
        assert!(created);
        std::fs::write(new.join("x"), b"x").unwrap();
        let err = prepare_dir(&new, None).err().unwrap();
        assert!(err.message.contains("not empty"), "{}", err.message);
        let missing_parent = root.path().join("a/b");
        assert!(prepare_dir(&missing_parent, None).is_err());
        assert!(!missing_parent.exists());
    }

    /// Who may write where: root anywhere; any other uid into a directory
    /// it owns and may write and enter, or one everybody may (`/tmp`).
    #[test]
    fn may_write_into_table() {
        let (me, other) = (1000, 2000);
        let cases = [
            (None, other, 0o700, true),
            (None, 0, 0o755, true),
            (Some(me), me, 0o700, true),
            (Some(me), me, 0o500, false),
            (Some(me), me, 0o600, false),
            (Some(me), other, 0o755, false),
            (Some(me), 0, 0o775, false),
            (Some(me), 0, 0o1777, true),
            (Some(me), 0, 0o1776, false),
        ];
        for (owner, dir_uid, mode, want) in cases {
            assert_eq!(
                may_write_into(owner, dir_uid, mode),
                want,
                "caller {owner:?}, dir of uid {dir_uid} mode {mode:o}"
            );
        }
    }

    /// The path rule on a real tree: (caller, target, allowed). Symbolic
    /// links are refused as the directory or its parent, for root too; a
    /// non-root caller may use its own directories, not another's. What is
    /// created is 0700 and the caller's.
    #[test]
    fn archive_dir_rule_table() {
        use std::os::unix::fs::symlink;
        let root = tempfile::tempdir().unwrap();
        let base = root.path();
        let mine = base.metadata().unwrap().uid();
        let stranger = if mine == 0 { 65534 } else { mine + 1 };
        std::fs::create_dir(base.join("empty")).unwrap();
        let elsewhere = tempfile::tempdir().unwrap();
        symlink(elsewhere.path(), base.join("link")).unwrap();
        std::fs::create_dir(elsewhere.path().join("sub")).unwrap();
        let cases: &[(Option<u32>, &str, Result<(), &str>)] = &[
            (None, "new-root", Ok(())),
            (None, "empty", Ok(())),
            (None, "link", Err("is a symbolic link")),
            (None, "link/sub", Err("its parent is a symbolic link")),
            (Some(mine), "new-mine", Ok(())),
            (Some(stranger), "new-stranger", Err("may not write there")),
            (Some(stranger), "empty", Err("may not write there")),
            (Some(stranger), "link", Err("is a symbolic link")),
            (
                Some(stranger),
                "link/sub",
                Err("its parent is a symbolic link"),
            ),
        ];
        for (owner, target, want) in cases {
            let dir = base.join(target);
            let existed = dir.symlink_metadata().is_ok();
            let got = prepare_dir(&dir, *owner);
            match (want, got) {
                (Ok(()), Ok((_, created))) => {
                    assert_eq!(created, !existed, "{target}");
                    if created {
                        let meta = dir.symlink_metadata().unwrap();
                        assert_eq!(meta.mode() & 0o7777, 0o700, "{target}");
                        assert_eq!(meta.uid(), owner.unwrap_or(mine), "{target}");
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
                    got.map(|(_, c)| c).map_err(|e| e.message)
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
    }

    /// Archive files are created new (a planted link is not followed) and
    /// 0600.
    #[test]
    fn archive_files_are_new_and_private() {
        let root = tempfile::tempdir().unwrap();
        let (dir, _) = prepare_dir(&root.path().join("a"), None).unwrap();
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
