//! Console logs that cannot fill the disk: the collector that reads a VM's
//! serial console and the rotated files it writes.
//!
//! The VMM serves the guest's serial console on a listening unix socket,
//! [`CONSOLE_SOCKET`] in the instance's run dir. vroomd connects to it as
//! soon as it launches the VM (and again when it re-adopts the VM after a
//! daemon restart) and writes what it reads itself, through fixed buffers,
//! into files it rotates by size.
//!
//! On-disk layout (layout version 1; plain text, as the guest wrote it):
//!
//! | file               | holds                                                    |
//! |--------------------|----------------------------------------------------------|
//! | `console.log`      | the current (or last) boot, its newest part              |
//! | `console.prev.log` | the current boot, the part before `console.log`          |
//! | `console.1.log`    | the boot before, its last [`SEGMENT_BYTES`]              |
//! | ...                |                                                          |
//! | `console.5.log`    | the oldest kept boot ([`KEPT_BOOTS`] earlier boots)      |
//!
//! Each file holds at most [`SEGMENT_BYTES`] (512 KiB). When `console.log`
//! is full it becomes `console.prev.log` (replacing the one before) and a new
//! `console.log` starts, so the current boot keeps between 512 KiB and 1 MiB
//! of its newest output. At each boot the earlier boots shift by one, the
//! last 512 KiB of the boot that ended become `console.1.log`, and the
//! oldest is deleted. An instance's console thus takes at most
//! [`MAX_CONSOLE_BYTES`] (3.5 MiB) of disk whatever its guest writes.
//!
//! Offsets: the offsets of boot 0 count the bytes the boot wrote (so a reader
//! following the log is not thrown back by a rotation); reading from an
//! offset that was rotated away starts at the oldest byte kept, and one past
//! the end (a new boot) starts over. Earlier boots' offsets are file offsets.
//! A restarted daemon counts from what is on disk.
//!
//! Known gap: a socket chardev drops output while no client is connected,
//! i.e. while vroomd is down; the collector reconnects on adoption.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::io::AsyncReadExt;
use tokio::sync::watch;
use vroom_base::LockExt;

/// The VMM's console socket in an instance's run dir.
pub const CONSOLE_SOCKET: &str = "console.sock";
/// The largest console file.
pub const SEGMENT_BYTES: u64 = 512 * 1024;
/// How many earlier boots' consoles an instance keeps.
pub const KEPT_BOOTS: i32 = 5;
/// The most disk an instance's console logs take: two files for the current
/// boot, one for each earlier boot.
pub const MAX_CONSOLE_BYTES: u64 = (2 + KEPT_BOOTS as u64) * SEGMENT_BYTES;
/// The collector's read buffer: the only memory it holds per instance.
const READ_BUFFER: usize = 16 * 1024;

const LIVE: &str = "console.log";
const PREV: &str = "console.prev.log";

/// The file of earlier boot `n` (1 is the boot before the current one).
fn boot_file(dir: &Path, n: i32) -> PathBuf {
    dir.join(format!("console.{n}.log"))
}

/// Whether a run dir's file name belongs to the console layout.
fn in_layout(name: &str) -> bool {
    name == LIVE
        || name == PREV
        || name == CONSOLE_SOCKET
        || name
            .strip_prefix("console.")
            .and_then(|rest| rest.strip_suffix(".log"))
            .and_then(|n| n.parse::<i32>().ok())
            .is_some_and(|n| (1..=KEPT_BOOTS).contains(&n) && format!("console.{n}.log") == name)
}

/// Console files in a run dir that the layout does not name: rotations
/// beyond [`KEPT_BOOTS`], unfinished compactions, files of older layouts.
pub fn stale_console_files(run_dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = fs::read_dir(run_dir) else {
        return vec![];
    };
    let mut stale: Vec<PathBuf> = entries
        .flatten()
        .filter(|e| {
            let name = e.file_name();
            let name = name.to_string_lossy();
            name.starts_with("console.") && !in_layout(&name)
        })
        .map(|e| e.path())
        .collect();
    stale.sort();
    stale
}

/// One instance's console log files and the writer's position in them.
pub struct ConsoleLog {
    dir: PathBuf,
    segment: u64,
    state: Mutex<LogState>,
}

struct LogState {
    /// Bumped at each boot; writes of an earlier boot's collector are dropped.
    epoch: u64,
    live: Option<File>,
    live_len: u64,
    /// The boot offset of `console.log`'s first byte.
    base: u64,
}

fn len_of(path: &Path) -> u64 {
    fs::metadata(path).map(|m| m.len()).unwrap_or(0)
}

fn open_if_exists(path: &Path) -> io::Result<Option<File>> {
    match File::open(path) {
        Ok(f) => Ok(Some(f)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// Reads up to `max` bytes of `file` from `from`.
fn read_range(file: &mut File, from: u64, max: u64, out: &mut Vec<u8>) -> io::Result<()> {
    file.seek(SeekFrom::Start(from))?;
    file.take(max).read_to_end(out)?;
    Ok(())
}

impl ConsoleLog {
    /// The console log of the run dir `dir`, continuing what is on disk.
    pub fn open(dir: &Path) -> Self {
        Self::with_segment(dir, SEGMENT_BYTES)
    }

    pub fn with_segment(dir: &Path, segment: u64) -> Self {
        let live_len = len_of(&dir.join(LIVE));
        let base = len_of(&dir.join(PREV));
        ConsoleLog {
            dir: dir.to_path_buf(),
            segment,
            state: Mutex::new(LogState {
                epoch: 0,
                live: None,
                live_len,
                base,
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, LogState> {
        self.state.lock_unpoisoned()
    }

    /// The epoch of the current boot, for a collector that joins it.
    pub fn epoch(&self) -> u64 {
        self.lock().epoch
    }

    /// Starts a new boot: earlier boots shift by one, the boot that ended
    /// keeps its last segment as `console.1.log`. Returns the new epoch.
    pub fn new_boot(&self) -> io::Result<u64> {
        let mut s = self.lock();
        s.epoch += 1;
        s.live = None;
        let _ = fs::remove_file(boot_file(&self.dir, KEPT_BOOTS));
        for n in (1..KEPT_BOOTS).rev() {
            match fs::rename(boot_file(&self.dir, n), boot_file(&self.dir, n + 1)) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
                _ => {}
            }
        }
        self.compact_ended_boot()?;
        s.live_len = 0;
        s.base = 0;
        Ok(s.epoch)
    }

    /// Moves the last segment of the boot that ended into `console.1.log`.
    fn compact_ended_boot(&self) -> io::Result<()> {
        let live_path = self.dir.join(LIVE);
        let prev_path = self.dir.join(PREV);
        let target = boot_file(&self.dir, 1);
        let live_len = len_of(&live_path);
        let prev_exists = prev_path.exists();
        if !prev_exists && live_len <= self.segment {
            // The whole boot fits: a rename does.
            match fs::rename(&live_path, &target) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
                _ => return Ok(()),
            }
        }
        let partial = self.dir.join("console.1.log.partial");
        let mut out = File::create(&partial)?;
        let from_live = live_len.min(self.segment);
        let from_prev = self.segment - from_live;
        let mut buf = Vec::new();
        if let Some(mut prev) = open_if_exists(&prev_path)? {
            let len = prev.metadata()?.len();
            read_range(
                &mut prev,
                len.saturating_sub(from_prev),
                from_prev,
                &mut buf,
            )?;
        }
        if let Some(mut live) = open_if_exists(&live_path)? {
            read_range(&mut live, live_len - from_live, from_live, &mut buf)?;
        }
        out.write_all(&buf)?;
        drop(out);
        fs::rename(&partial, &target)?;
        let _ = fs::remove_file(&prev_path);
        let _ = fs::remove_file(&live_path);
        Ok(())
    }

    /// Appends console output of boot `epoch`, rotating `console.log` when
    /// it is full. Returns false (and writes nothing) for an earlier boot.
    pub fn append(&self, epoch: u64, mut data: &[u8]) -> io::Result<bool> {
        let mut s = self.lock();
        if s.epoch != epoch {
            return Ok(false);
        }
        while !data.is_empty() {
            if s.live_len >= self.segment {
                s.live = None;
                fs::rename(self.dir.join(LIVE), self.dir.join(PREV))?;
                s.base += s.live_len;
                s.live_len = 0;
            }
            if s.live.is_none() {
                let file = OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(self.dir.join(LIVE))?;
                s.live_len = file.metadata()?.len();
                s.live = Some(file);
                continue;
            }
            let room = (self.segment - s.live_len) as usize;
            let n = room.min(data.len());
            let file = s.live.as_mut().expect("invariant: opened above");
            file.write_all(&data[..n])?;
            s.live_len += n as u64;
            data = &data[n..];
        }
        Ok(true)
    }

    /// Up to `max` bytes of boot `boot` (0 the current one, -1 the one
    /// before, ...) from `offset`, and the offset that follows them.
    pub fn read(&self, boot: i32, offset: u64, max: u64) -> io::Result<(Vec<u8>, u64)> {
        let mut out = Vec::new();
        if boot < 0 {
            let Some(mut file) = open_if_exists(&boot_file(&self.dir, -boot))? else {
                return Ok((out, 0));
            };
            let len = file.metadata()?.len();
            let start = if offset > len { 0 } else { offset };
            read_range(&mut file, start, max, &mut out)?;
            let next = start + out.len() as u64;
            return Ok((out, next));
        }
        // Open both files under the lock: a rotation after that renames
        // them, but the handles keep reading the same bytes.
        let (prev, live, base) = {
            let s = self.lock();
            (
                open_if_exists(&self.dir.join(PREV))?,
                open_if_exists(&self.dir.join(LIVE))?,
                s.base,
            )
        };
        let prev_len = match &prev {
            Some(f) => f.metadata()?.len(),
            None => 0,
        };
        let live_len = match &live {
            Some(f) => f.metadata()?.len(),
            None => 0,
        };
        let first = base.saturating_sub(prev_len);
        let end = base + live_len;
        let start = if offset > end || offset < first {
            first
        } else {
            offset
        };
        if let (Some(mut prev), true) = (prev, start < base) {
            let from = prev_len - (base - start);
            read_range(&mut prev, from, max, &mut out)?;
        }
        let at = start + out.len() as u64;
        let room = max - out.len() as u64;
        if let (Some(mut live), true) = (live, at >= base && room > 0) {
            read_range(&mut live, at - base, room, &mut out)?;
        }
        let next = start + out.len() as u64;
        Ok((out, next))
    }

    /// The last `max` bytes of the current boot, as text.
    pub fn tail(&self, max: u64) -> String {
        let end = {
            let s = self.lock();
            s.base + len_of(&self.dir.join(LIVE)).max(s.live_len)
        };
        self.read(0, end.saturating_sub(max), max)
            .map(|(bytes, _)| String::from_utf8_lossy(&bytes).into_owned())
            .unwrap_or_default()
    }
}

/// A console's history as it travels with a live-migrated instance: the
/// destination's log continues the source's ([`ConsoleLog::adopt`]).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ConsoleHistory {
    /// The earlier boots' kept segments, the boot before first.
    pub earlier: Vec<Vec<u8>>,
    /// The kept part of the current boot, its oldest byte first.
    pub current: Vec<u8>,
    /// How many bytes the current boot wrote in all: the offset after
    /// `current`.
    pub written: u64,
}

impl ConsoleHistory {
    /// Whether its parts fit the layout (a peer's may not).
    pub fn fits(&self) -> bool {
        let earlier: Vec<u64> = self.earlier.iter().map(|b| b.len() as u64).collect();
        Self::sizes_fit(&earlier, self.current.len() as u64)
            && self.written >= self.current.len() as u64
    }

    /// Whether parts of these sizes fit the layout: checked on a peer's
    /// announced sizes before anything is read.
    pub fn sizes_fit(earlier: &[u64], current: u64) -> bool {
        earlier.len() <= KEPT_BOOTS as usize
            && earlier.iter().all(|&n| n <= SEGMENT_BYTES)
            && current <= 2 * SEGMENT_BYTES
    }
}

/// Writes `bytes` to `path` through a partial file and a rename.
fn replace_file(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let mut partial = path.as_os_str().to_owned();
    partial.push(".partial");
    let partial = PathBuf::from(partial);
    fs::write(&partial, bytes)?;
    fs::rename(&partial, path)
}

impl ConsoleLog {
    /// What this log holds, to send with a migrating instance.
    pub fn export(&self) -> io::Result<ConsoleHistory> {
        let s = self.lock();
        let mut earlier = Vec::new();
        for n in 1..=KEPT_BOOTS {
            match fs::read(boot_file(&self.dir, n)) {
                Ok(bytes) => earlier.push(bytes),
                Err(e) if e.kind() == io::ErrorKind::NotFound => break,
                Err(e) => return Err(e),
            }
        }
        let mut current = Vec::new();
        for file in [PREV, LIVE] {
            match fs::read(self.dir.join(file)) {
                Ok(bytes) => current.extend_from_slice(&bytes),
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
        }
        let written =
            (s.base + len_of(&self.dir.join(LIVE)).max(s.live_len)).max(current.len() as u64);
        Ok(ConsoleHistory {
            earlier,
            current,
            written,
        })
    }

    /// Puts a migrated instance's history before what this log holds: its
    /// earlier boots become this log's, and the current boot (which the
    /// guest continues here) starts with the source's part. The newest
    /// bytes are kept as [`append`](Self::append) would have kept them;
    /// offsets count both nodes' bytes.
    pub fn adopt(&self, history: &ConsoleHistory) -> io::Result<()> {
        let mut s = self.lock();
        for (i, bytes) in history.earlier.iter().enumerate() {
            let kept = &bytes[bytes.len().saturating_sub(self.segment as usize)..];
            replace_file(&boot_file(&self.dir, i as i32 + 1), kept)?;
        }
        let mut current = history.current.clone();
        for file in [PREV, LIVE] {
            match fs::read(self.dir.join(file)) {
                Ok(bytes) => current.extend_from_slice(&bytes),
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
        }
        let here = s.base + len_of(&self.dir.join(LIVE)).max(s.live_len);
        let written = history.written.max(history.current.len() as u64) + here;
        let segment = self.segment as usize;
        let live_len = match current.len() % segment {
            0 => current.len().min(segment),
            rest => rest,
        };
        let live_from = current.len() - live_len;
        let prev = &current[live_from.saturating_sub(segment)..live_from];
        s.live = None;
        if prev.is_empty() {
            match fs::remove_file(self.dir.join(PREV)) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
                _ => {}
            }
        } else {
            replace_file(&self.dir.join(PREV), prev)?;
        }
        replace_file(&self.dir.join(LIVE), &current[live_from..])?;
        s.live_len = live_len as u64;
        s.base = written - live_len as u64;
        Ok(())
    }
}

/// Where a collector is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Waiting for the VMM's socket to accept.
    Connecting,
    /// Connected, copying output.
    Collecting,
    /// The VMM closed its end (it exited) and all output is on disk, or the
    /// collector gave up.
    Done,
}

/// The task that copies one VMM's console into its [`ConsoleLog`]. Dropping
/// it stops the task.
pub struct ConsoleCollector {
    task: tokio::task::JoinHandle<()>,
    phase: watch::Receiver<Phase>,
}

impl ConsoleCollector {
    /// Starts copying the console served on `socket` into `log` as boot
    /// `epoch`. The VMM may still be creating its socket: the collector
    /// keeps trying to connect for `connect_for`.
    pub fn spawn(
        log: Arc<ConsoleLog>,
        epoch: u64,
        socket: PathBuf,
        connect_for: Duration,
        instance: String,
    ) -> Self {
        let (phase_tx, phase) = watch::channel(Phase::Connecting);
        let task = tokio::spawn(async move {
            let deadline = tokio::time::Instant::now() + connect_for;
            let mut stream = loop {
                match tokio::net::UnixStream::connect(&socket).await {
                    Ok(stream) => break stream,
                    Err(e) if tokio::time::Instant::now() >= deadline => {
                        tracing::warn!(%instance, error = %e, socket = %socket.display(), "cannot collect the console: its socket does not answer");
                        phase_tx.send_replace(Phase::Done);
                        return;
                    }
                    Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
                }
            };
            phase_tx.send_replace(Phase::Collecting);
            let mut buf = vec![0u8; READ_BUFFER];
            let mut failed = false;
            loop {
                let n = match stream.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => n,
                };
                // Keep draining even when the disk refuses: a console
                // nobody reads stalls the guest.
                match log.append(epoch, &buf[..n]) {
                    Ok(true) => failed = false,
                    Ok(false) => break,
                    Err(e) if !failed => {
                        failed = true;
                        tracing::warn!(%instance, error = %e, "cannot write the console log; dropping console output until a write succeeds");
                    }
                    Err(_) => {}
                }
            }
            phase_tx.send_replace(Phase::Done);
        });
        ConsoleCollector { task, phase }
    }

    /// After the VMM exited: waits (up to `timeout`) until everything it
    /// wrote to its console is on disk. A collector that never connected has
    /// nothing to flush and is stopped.
    pub async fn flushed(&self, timeout: Duration) {
        let mut phase = self.phase.clone();
        if *phase.borrow() == Phase::Connecting {
            self.task.abort();
            return;
        }
        let _ = tokio::time::timeout(timeout, phase.wait_for(|p| *p == Phase::Done)).await;
    }
}

impl Drop for ConsoleCollector {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn files(dir: &Path) -> Vec<(String, u64)> {
        let mut out: Vec<(String, u64)> = fs::read_dir(dir)
            .unwrap()
            .flatten()
            .map(|e| {
                (
                    e.file_name().to_string_lossy().into_owned(),
                    e.metadata().unwrap().len(),
                )
            })
            .collect();
        out.sort();
        out
    }

    fn read_all(log: &ConsoleLog, boot: i32) -> (Vec<u8>, u64) {
        log.read(boot, 0, u64::MAX).unwrap()
    }

    /// Sizes after a table of writes in one boot, with 10-byte segments.
    #[test]
    fn rotation_keeps_files_under_their_cap_and_the_newest_bytes() {
        /// Writes, the files and sizes they leave, the text of boot 0.
        type Case = (
            &'static [&'static str],
            &'static [(&'static str, u64)],
            &'static str,
        );
        let table: &[Case] = &[
            (&["abc"], &[("console.log", 3)], "abc"),
            (&["0123456789"], &[("console.log", 10)], "0123456789"),
            (
                &["0123456789", "a"],
                &[("console.log", 1), ("console.prev.log", 10)],
                "0123456789a",
            ),
            (
                &["0123456789abcdefghijKLM"],
                &[("console.log", 3), ("console.prev.log", 10)],
                "abcdefghijKLM",
            ),
            (
                &["0123", "456789abcdefghij", "klmnopqrstuvwxyz!"],
                &[("console.log", 7), ("console.prev.log", 10)],
                "klmnopqrstuvwxyz!",
            ),
        ];
        for (writes, expected_files, text) in table {
            let dir = tempfile::tempdir().unwrap();
            let log = ConsoleLog::with_segment(dir.path(), 10);
            let epoch = log.new_boot().unwrap();
            for w in *writes {
                assert!(log.append(epoch, w.as_bytes()).unwrap());
            }
            let expected: Vec<(String, u64)> = expected_files
                .iter()
                .map(|(n, s)| (n.to_string(), *s))
                .collect();
            assert_eq!(files(dir.path()), expected, "{writes:?}");
            let (got, next) = read_all(&log, 0);
            assert_eq!(String::from_utf8(got).unwrap(), *text, "{writes:?}");
            let total: usize = writes.iter().map(|w| w.len()).sum();
            assert_eq!(next, total as u64, "offsets count the boot's bytes");
        }
    }

    #[test]
    fn boots_shift_keep_their_last_segment_and_the_total_stays_capped() {
        let dir = tempfile::tempdir().unwrap();
        let log = ConsoleLog::with_segment(dir.path(), 10);
        for boot in 0..(KEPT_BOOTS + 3) {
            let epoch = log.new_boot().unwrap();
            let text = format!("boot{boot}:").repeat(4);
            log.append(epoch, text.as_bytes()).unwrap();
        }
        let listing = files(dir.path());
        let total: u64 = listing.iter().map(|(_, s)| s).sum();
        assert!(total <= (2 + KEPT_BOOTS as u64) * 10, "{listing:?}");
        assert_eq!(listing.len(), 2 + KEPT_BOOTS as usize, "{listing:?}");
        // The boot before the current one kept its last ten bytes.
        let last = KEPT_BOOTS + 2;
        let (previous, _) = read_all(&log, -1);
        assert_eq!(
            String::from_utf8(previous).unwrap(),
            format!("boot{}:", last - 1).repeat(4)[14..],
        );
        let (oldest, _) = read_all(&log, -KEPT_BOOTS);
        assert!(String::from_utf8(oldest)
            .unwrap()
            .ends_with(&format!("boot{}:", last - KEPT_BOOTS)));
        assert!(read_all(&log, -KEPT_BOOTS - 1).0.is_empty());
    }

    #[test]
    fn readers_follow_across_rotations_and_restart_on_a_new_boot() {
        let dir = tempfile::tempdir().unwrap();
        let log = ConsoleLog::with_segment(dir.path(), 10);
        let epoch = log.new_boot().unwrap();
        log.append(epoch, b"0123456").unwrap();
        let (got, next) = log.read(0, 0, 4).unwrap();
        assert_eq!((&got[..], next), (&b"0123"[..], 4));
        log.append(epoch, b"789abcdefgh").unwrap();
        // Offset 4 is still kept (in console.prev.log).
        let (got, next) = log.read(0, 4, 100).unwrap();
        assert_eq!((&got[..], next), (&b"456789abcdefgh"[..], 18));
        // Rotated away: the oldest byte kept comes next.
        log.append(epoch, b"ijklmnop").unwrap();
        let (got, next) = log.read(0, 18, 100).unwrap();
        assert_eq!((&got[..], next), (&b"ijklmnop"[..], 26));
        let (got, _) = log.read(0, 2, 3).unwrap();
        assert_eq!(&got[..], b"abc", "offset 2 was rotated away: start at 10");
        // A stale collector of the boot that ended writes nothing.
        let next_epoch = log.new_boot().unwrap();
        assert!(!log.append(epoch, b"late").unwrap());
        log.append(next_epoch, b"new").unwrap();
        let (got, next) = log.read(0, 26, 100).unwrap();
        assert_eq!((&got[..], next), (&b"new"[..], 3), "a new boot starts over");
        assert_eq!(
            read_all(&log, -1).0,
            b"ghijklmnop".to_vec(),
            "the last segment of the boot that ended"
        );
    }

    #[test]
    fn a_reopened_log_continues_what_is_on_disk() {
        let dir = tempfile::tempdir().unwrap();
        {
            let log = ConsoleLog::with_segment(dir.path(), 10);
            let epoch = log.new_boot().unwrap();
            log.append(epoch, b"0123456789abc").unwrap();
        }
        let log = ConsoleLog::with_segment(dir.path(), 10);
        log.append(log.epoch(), b"defghijk").unwrap();
        assert_eq!(
            files(dir.path()),
            vec![("console.log".into(), 1), ("console.prev.log".into(), 10)]
        );
        assert_eq!(read_all(&log, 0).0, b"abcdefghijk".to_vec());
    }

    #[test]
    fn a_migrated_log_continues_the_sources_history() {
        let from = tempfile::tempdir().unwrap();
        let source = ConsoleLog::with_segment(from.path(), 10);
        let first = source.new_boot().unwrap();
        source.append(first, b"old boot").unwrap();
        let epoch = source.new_boot().unwrap();
        source.append(epoch, b"0123456789abcdef").unwrap();
        let history = source.export().unwrap();
        assert_eq!(history.earlier, vec![b"old boot".to_vec()]);
        assert_eq!(history.current, b"0123456789abcdef".to_vec());
        assert_eq!(history.written, 16);
        assert!(history.fits());

        // The destination's collector wrote a little before the history came.
        let to = tempfile::tempdir().unwrap();
        let dest = ConsoleLog::with_segment(to.path(), 10);
        let epoch = dest.new_boot().unwrap();
        dest.append(epoch, b"ghi").unwrap();
        dest.adopt(&history).unwrap();
        let (got, next) = read_all(&dest, 0);
        assert_eq!(
            (String::from_utf8(got).unwrap().as_str(), next),
            ("0123456789abcdefghi", 19),
            "the source's bytes, then the destination's"
        );
        assert_eq!(read_all(&dest, -1).0, b"old boot".to_vec());
        // And it goes on as before.
        dest.append(epoch, b"jk").unwrap();
        let (got, next) = dest.read(0, 19, 100).unwrap();
        assert_eq!((&got[..], next), (&b"jk"[..], 21));
        assert_eq!(
            files(to.path()),
            vec![
                ("console.1.log".into(), 8),
                ("console.log".into(), 1),
                ("console.prev.log".into(), 10)
            ]
        );

        // A history that fits in one file, into an empty log.
        let empty = tempfile::tempdir().unwrap();
        let dest = ConsoleLog::with_segment(empty.path(), 10);
        dest.new_boot().unwrap();
        let small = ConsoleHistory {
            earlier: vec![],
            current: b"abc".to_vec(),
            written: 3,
        };
        dest.adopt(&small).unwrap();
        assert_eq!(read_all(&dest, 0), (b"abc".to_vec(), 3));
        assert_eq!(files(empty.path()), vec![("console.log".into(), 3)]);
        let too_big = ConsoleHistory {
            current: vec![0; 2 * SEGMENT_BYTES as usize + 1],
            ..small
        };
        assert!(!too_big.fits());
    }

    #[test]
    fn stale_files_are_those_outside_the_layout() {
        let dir = tempfile::tempdir().unwrap();
        for name in [
            "console.log",
            "console.prev.log",
            "console.1.log",
            "console.5.log",
            "console.6.log",
            "console.01.log",
            "console.1.log.partial",
            "console.sock",
            "agent.sock",
            "config.img",
        ] {
            fs::write(dir.path().join(name), "x").unwrap();
        }
        let stale: Vec<String> = stale_console_files(dir.path())
            .iter()
            .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        assert_eq!(
            stale,
            vec!["console.01.log", "console.1.log.partial", "console.6.log"]
        );
    }
}
