//! Forensic decommissioning: `rm --archive DIR` keeps what an investigation
//! needs (a last snapshot of the memory when the instance runs, the config
//! volume and its history, the console logs, the record) with a `sha256sum`
//! manifest, then overwrites the instance's files before unlinking them.

use std::fs::File;
use std::io::Write;

use vroom_types::{ArchiveReport, ArchivedFile, ARCHIVE_MANIFEST};

use super::snapshots::{copy_hashed, save_memory, MEMORY, VOLUME};
use super::*;

/// Checks the archive directory before anything changes; creates it when it
/// does not exist. Returns whether it was created.
fn prepare_dir(dir: &Path) -> Result<bool, OpError> {
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
    let created = match std::fs::read_dir(dir) {
        Ok(mut entries) => {
            if entries.next().is_some() {
                return Err(refuse("it is not empty".into()));
            }
            false
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            std::fs::create_dir(dir).map_err(|e| refuse(e.to_string()))?;
            true
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotADirectory => {
            return Err(refuse("it is not a directory".into()))
        }
        Err(e) => return Err(refuse(e.to_string())),
    };
    // Writable, really (a read-only mount answers only on write).
    let probe = dir.join(".vroom-probe");
    if let Err(e) = File::create(&probe).and_then(|_| std::fs::remove_file(&probe)) {
        if created {
            let _ = std::fs::remove_dir(dir);
        }
        return Err(refuse(format!("it is not writable ({e})")));
    }
    Ok(created)
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
    pub async fn remove_archived(
        self: &Arc<Self>,
        name: &str,
        dir: &str,
    ) -> Result<ArchiveReport, OpError> {
        let cell = self.cell(name)?;
        let _op = cell.op.lock().await;
        self.still_registered(name, &cell)?;
        self.check_removable(name)?;
        let dir = PathBuf::from(dir);
        let created = blocking(|| prepare_dir(&dir))?;
        let archived = self.archive_into(&cell, &dir).await;
        let (files, memory) = match archived {
            Ok(done) => done,
            Err(e) => {
                // Nothing half-written stays behind; the instance is untouched.
                blocking(|| {
                    for file in files_under(&dir) {
                        let _ = std::fs::remove_file(file);
                    }
                    let _ = std::fs::remove_dir(dir.join("console"));
                    if created {
                        let _ = std::fs::remove_dir(&dir);
                    }
                });
                return Err(e);
            }
        };
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
    async fn archive_into(
        &self,
        cell: &Arc<Cell>,
        dir: &Path,
    ) -> Result<(Vec<ArchivedFile>, bool), OpError> {
        let io = |what: &str, e: std::io::Error| {
            OpError::internal(format!("failed to archive {what}"), e)
        };
        let (record, process) = {
            let r = cell.lock();
            (r.clone(), r.process.clone())
        };
        let process = process.filter(|p| self.driver.is_alive(p));
        let mut files: Vec<ArchivedFile> = vec![];
        let entry = |path: &str, digest: vroom_types::SnapshotFile| ArchivedFile {
            path: path.to_string(),
            bytes: digest.bytes,
            sha256: digest.sha256,
        };
        if let Some(process) = &process {
            // A frozen guest writes nothing more; a guest that cannot be
            // frozen (an older vroom-init) is captured as it is.
            if let Err(e) = cell.agent.freeze(AGENT_TIMEOUT).await {
                tracing::warn!(error = %e, "archiving a guest that could not be frozen");
            }
            let (_, digest) =
                blocking(|| save_memory(self.driver.as_ref(), process, &dir.join(MEMORY)))?;
            files.push(entry(MEMORY, digest));
        }
        let history = self.settle_config(cell).await.ok();
        blocking(|| -> Result<(), OpError> {
            files.push(entry(
                VOLUME,
                copy_hashed(&cell.volume(), &dir.join(VOLUME))
                    .map_err(|e| io("the config volume", e))?,
            ));
            let write_json = |file: &str,
                              value: serde_json::Value|
             -> Result<ArchivedFile, OpError> {
                let bytes = serde_json::to_vec_pretty(&value).expect("invariant: JSON serializes");
                let path = dir.join(file);
                let mut out =
                    snapshots::Hashing::new(File::create(&path).map_err(|e| io(file, e))?);
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
            let console_dir = dir.join("console");
            std::fs::create_dir(&console_dir).map_err(|e| io("the console logs", e))?;
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
                    copy_hashed(&log, &dir.join(&rel)).map_err(|e| io("the console logs", e))?,
                ));
            }
            let manifest: String = files
                .iter()
                .map(|f| format!("{}  {}\n", f.sha256, f.path))
                .collect();
            let mut out =
                File::create(dir.join(ARCHIVE_MANIFEST)).map_err(|e| io(ARCHIVE_MANIFEST, e))?;
            out.write_all(manifest.as_bytes())
                .and_then(|()| out.sync_all())
                .map_err(|e| io(ARCHIVE_MANIFEST, e))?;
            for d in [&console_dir, &dir.to_path_buf()] {
                File::open(d)
                    .and_then(|f| f.sync_all())
                    .map_err(|e| io("the archive dir", e))?;
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
        assert!(prepare_dir(Path::new("relative")).is_err());
        let new = root.path().join("new");
        assert!(prepare_dir(&new).unwrap());
        std::fs::write(new.join("x"), b"x").unwrap();
        let err = prepare_dir(&new).unwrap_err();
        assert!(err.message.contains("not empty"), "{}", err.message);
        let missing_parent = root.path().join("a/b");
        assert!(prepare_dir(&missing_parent).is_err());
        assert!(!missing_parent.exists());
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
