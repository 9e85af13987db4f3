//! The jailer: runs in `vroom __jail <jail.json>`, a single-threaded process
//! of its own (so `fork` is safe and the child may allocate), builds the jail
//! described by a [`JailSpec`] and execs QEMU in it. See [the crate docs](crate) for
//! the layout and the order of the steps.

use std::convert::Infallible;
use std::ffi::CString;
use std::io::{ErrorKind, Read};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::sched::{unshare, CloneFlags};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::{ForkResult, Gid, Pid, Uid};

use crate::cgroup::{Hierarchy, CGROUP_MOUNT};
use crate::{FdSource, FileAccess, Isolation, JailEntry, JailSpec, FIRST_FD, RUN_DIR_ENV};

/// The largest `jail.json` the jailer reads.
const MAX_SPEC_BYTES: u64 = 1 << 20;
/// How much of QEMU's stderr a failed launch reports.
const REPORT_BYTES: usize = 4096;

#[derive(Debug, thiserror::Error)]
pub enum RunJailError {
    #[error("failed to read the jail spec {path}")]
    ReadSpec {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid jail spec {path}")]
    ParseSpec {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("failed to open {what} for the VMM")]
    Open {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("failed to create tap {name}")]
    Tap {
        name: String,
        #[source]
        source: std::io::Error,
    },
    #[error("failed to fork the VMM")]
    Fork(#[source] nix::Error),
    #[error("QEMU exited at start ({status}): {stderr}")]
    Exited { status: String, stderr: String },
    #[error("QEMU did not answer on {socket} within {secs} s: {stderr}")]
    Timeout {
        socket: PathBuf,
        secs: u64,
        stderr: String,
    },
    #[error("failed to write {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Errors of the child between fork and exec; written to QEMU's log, which
/// the parent reports.
#[derive(Debug, thiserror::Error)]
enum EnterJailError {
    #[error("cannot join the cgroup")]
    Cgroup(#[source] crate::cgroup::CgroupError),
    #[error("jail: {step} failed")]
    Step {
        step: String,
        #[source]
        source: nix::Error,
    },
    #[error("jail: cannot create {path}")]
    Create {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid argument for exec: {0:?}")]
    Nul(String),
}

fn step(step: impl Into<String>) -> impl FnOnce(nix::Error) -> EnterJailError {
    let step = step.into();
    move |source| EnterJailError::Step { step, source }
}

/// Runs the jail described in `spec_path`: returns QEMU's pid once QMP
/// greets, or why QEMU did not come up.
pub fn run(spec_path: &Path) -> Result<u32, RunJailError> {
    let spec = read_spec(spec_path)?;
    let write_err = |path: &Path| {
        let path = path.to_path_buf();
        move |source| RunJailError::Write { path, source }
    };
    let _ = std::fs::remove_file(&spec.pid_file);
    let log = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&spec.log)
        .map_err(write_err(&spec.log))?;
    let fds = open_fds(&spec.fds)?;
    let null = std::fs::File::open("/dev/null").map_err(|source| RunJailError::Open {
        what: "/dev/null".into(),
        source,
    })?;
    if let Some(iso) = &spec.isolation {
        std::fs::create_dir_all(&iso.root).map_err(write_err(&iso.root))?;
    }
    // SAFETY: this process is single-threaded (the jailer runs before any
    // runtime starts), so the child may allocate and take locks.
    match unsafe { nix::unistd::fork() }.map_err(RunJailError::Fork)? {
        ForkResult::Child => {
            let null: OwnedFd = null.into();
            let mut placed = false;
            let err = match enter_and_exec(&spec, &fds, &null, &log, &mut placed) {
                Ok(never) => match never {},
                Err(e) => e,
            };
            let mut message = format!("vroom jailer: {err}");
            let mut source = std::error::Error::source(&err);
            while let Some(cause) = source {
                message.push_str(&format!(": {cause}"));
                source = cause.source();
            }
            message.push('\n');
            // Once the fds are in place, other fds are closed and stderr is the log.
            let log_fd = if placed { 2 } else { log.as_raw_fd() };
            let _ = nix::unistd::write(log_fd, message.as_bytes());
            // SAFETY: leaves the forked child without running destructors
            // (which would close fds that may be closed already).
            unsafe { libc::_exit(126) }
        }
        ForkResult::Parent { child } => {
            // The parent keeps no fd of QEMU's: a tap must vanish with QEMU alone.
            drop(fds);
            drop(null);
            let pid = child.as_raw() as u32;
            std::fs::write(&spec.pid_file, format!("{pid}\n"))
                .map_err(write_err(&spec.pid_file))?;
            let ready = wait_ready(&spec, child);
            if ready.is_err() {
                if let Some(iso) = &spec.isolation {
                    if let Ok(h) = Hierarchy::detect(Path::new(CGROUP_MOUNT)) {
                        let _ = h.remove(&iso.cgroup.name);
                    }
                }
                let _ = std::fs::remove_file(&spec.pid_file);
            }
            ready.map(|()| pid)
        }
    }
}

fn read_spec(path: &Path) -> Result<JailSpec, RunJailError> {
    let read = |source| RunJailError::ReadSpec {
        path: path.to_path_buf(),
        source,
    };
    let mut raw = vec![];
    std::fs::File::open(path)
        .map_err(read)?
        .take(MAX_SPEC_BYTES)
        .read_to_end(&mut raw)
        .map_err(read)?;
    serde_json::from_slice(&raw).map_err(|source| RunJailError::ParseSpec {
        path: path.to_path_buf(),
        source,
    })
}

fn open_fds(sources: &[FdSource]) -> Result<Vec<OwnedFd>, RunJailError> {
    sources.iter().map(open_fd).collect()
}

fn open_fd(source: &FdSource) -> Result<OwnedFd, RunJailError> {
    let open = |path: &Path| {
        let what = path.display().to_string();
        move |source| RunJailError::Open { what, source }
    };
    match source {
        FdSource::Listen { path } => {
            let _ = std::fs::remove_file(path);
            let listener = UnixListener::bind(path).map_err(open(path))?;
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
                .map_err(open(path))?;
            Ok(listener.into())
        }
        FdSource::Tap { name } => open_tap(name).map_err(|source| RunJailError::Tap {
            name: name.clone(),
            source,
        }),
        FdSource::File { path, access } => {
            let mut options = std::fs::OpenOptions::new();
            match access {
                FileAccess::Read => options.read(true),
                FileAccess::ReadWrite => options.read(true).write(true),
            };
            let file = options.open(path).map_err(open(path))?;
            Ok(file.into())
        }
    }
}

/// A new tap named `name` on an fd of /dev/net/tun, as QEMU's `tap,fd=` wants it.
pub fn open_tap(name: &str) -> std::io::Result<OwnedFd> {
    let tun = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/net/tun")?;
    if name.is_empty() || name.len() >= libc::IFNAMSIZ {
        return Err(std::io::Error::new(
            ErrorKind::InvalidInput,
            "interface names have 1 to 15 bytes",
        ));
    }
    // SAFETY: ifreq is plain data; all-zero is a valid value.
    let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in ifr.ifr_name.iter_mut().zip(name.bytes()) {
        *dst = src as libc::c_char;
    }
    ifr.ifr_ifru.ifru_flags =
        (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as libc::c_short;
    // SAFETY: TUNSETIFF reads and writes one ifreq, which lives for the call.
    if unsafe { libc::ioctl(tun.as_raw_fd(), libc::TUNSETIFF, &mut ifr) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(tun.into())
}

/// The child's half: enter the cgroup and the jail, drop privileges, exec.
fn enter_and_exec(
    spec: &JailSpec,
    fds: &[OwnedFd],
    stdin: &OwnedFd,
    log: &std::fs::File,
    placed: &mut bool,
) -> Result<Infallible, EnterJailError> {
    nix::unistd::setsid().map_err(step("setsid"))?;
    // Prepared before the jail hides /proc and the host's files.
    let argv = cstrings(
        std::iter::once(spec.program.as_os_str().as_bytes().to_vec())
            .chain(spec.args.iter().map(|a| a.as_bytes().to_vec())),
    )?;
    let mut env_var = format!("{RUN_DIR_ENV}=").into_bytes();
    env_var.extend_from_slice(spec.run_dir.as_os_str().as_bytes());
    let env = cstrings(
        std::iter::once(env_var).chain(
            spec.env
                .iter()
                .filter(|(k, _)| k != RUN_DIR_ENV)
                .map(|(k, v)| format!("{k}={v}").into_bytes()),
        ),
    )?;
    let program = cstrings([spec.program.as_os_str().as_bytes().to_vec()])?.remove(0);
    if let Some(iso) = &spec.isolation {
        let hierarchy =
            Hierarchy::detect(Path::new(CGROUP_MOUNT)).map_err(EnterJailError::Cgroup)?;
        hierarchy
            .create_and_join(&iso.cgroup, std::process::id())
            .map_err(EnterJailError::Cgroup)?;
        build_root(iso)?;
    }
    place_fds(fds, stdin, log)?;
    *placed = true;
    if let Some(iso) = &spec.isolation {
        drop_privileges(iso)?;
    }
    match nix::unistd::execve(&program, &argv, &env) {
        Ok(never) => match never {},
        Err(e) => Err(step(format!("exec {}", spec.program.display()))(e)),
    }
}

fn cstrings(items: impl IntoIterator<Item = Vec<u8>>) -> Result<Vec<CString>, EnterJailError> {
    items
        .into_iter()
        .map(|b| {
            CString::new(b).map_err(|e| {
                EnterJailError::Nul(String::from_utf8_lossy(&e.into_vec()).into_owned())
            })
        })
        .collect()
}

/// Private mount, network and IPC namespaces, and a tmpfs root holding only
/// the entries, made read-only once it is filled.
fn build_root(iso: &Isolation) -> Result<(), EnterJailError> {
    const NONE: Option<&str> = None;
    // A network namespace of its own: QEMU reaches the network only through
    // its tap fds (whose devices stay in the host's namespace, where they
    // were made), never a host service by TCP, UDP or an abstract unix
    // socket; an IPC namespace: no System V IPC shared with the host.
    unshare(CloneFlags::CLONE_NEWNS | CloneFlags::CLONE_NEWNET | CloneFlags::CLONE_NEWIPC)
        .map_err(step("unshare the mount, network and IPC namespaces"))?;
    // Nothing mounted from here on may reach the host's namespace.
    mount(NONE, "/", NONE, MsFlags::MS_REC | MsFlags::MS_PRIVATE, NONE)
        .map_err(step("make / private"))?;
    mount(
        Some("tmpfs"),
        &iso.root,
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        Some("size=64k,mode=0755"),
    )
    .map_err(step("mount the jail's tmpfs"))?;
    for entry in &iso.entries {
        match entry {
            JailEntry::Symlink { path, target } => {
                let at = inside(&iso.root, path);
                make_parent(&at)?;
                std::os::unix::fs::symlink(target, &at)
                    .map_err(|source| EnterJailError::Create { path: at, source })?;
            }
            JailEntry::Bind { source, path } => {
                let at = inside(&iso.root, path);
                make_parent(&at)?;
                let created = if source.is_dir() {
                    std::fs::create_dir(&at)
                } else {
                    std::fs::File::create(&at).map(drop)
                };
                created.map_err(|source| EnterJailError::Create {
                    path: at.clone(),
                    source,
                })?;
                let what = format!("bind {} at {}", source.display(), path.display());
                mount(Some(source), &at, NONE, MsFlags::MS_BIND, NONE)
                    .map_err(step(what.clone()))?;
                mount(
                    NONE,
                    &at,
                    NONE,
                    MsFlags::MS_BIND
                        | MsFlags::MS_REMOUNT
                        | MsFlags::MS_RDONLY
                        | MsFlags::MS_NOSUID,
                    NONE,
                )
                .map_err(step(format!("{what} read-only")))?;
            }
        }
    }
    nix::unistd::chdir(&iso.root).map_err(step("enter the jail"))?;
    // pivot_root(".", "."): the old root is stacked on the new one and
    // detached at once, so no directory for it is needed.
    nix::unistd::pivot_root(".", ".").map_err(step("pivot_root"))?;
    umount2(".", MntFlags::MNT_DETACH).map_err(step("detach the host's root"))?;
    nix::unistd::chdir("/").map_err(step("chdir /"))?;
    mount(
        NONE,
        "/",
        NONE,
        MsFlags::MS_REMOUNT
            | MsFlags::MS_RDONLY
            | MsFlags::MS_NOSUID
            | MsFlags::MS_NODEV
            | MsFlags::MS_NOEXEC,
        NONE,
    )
    .map_err(step("make the jail read-only"))?;
    Ok(())
}

fn inside(root: &Path, path: &Path) -> PathBuf {
    root.join(path.strip_prefix("/").unwrap_or(path))
}

fn make_parent(path: &Path) -> Result<(), EnterJailError> {
    match path.parent() {
        Some(parent) => std::fs::create_dir_all(parent).map_err(|source| EnterJailError::Create {
            path: parent.to_path_buf(),
            source,
        }),
        None => Ok(()),
    }
}

/// Puts fd `i` at `FIRST_FD + i`, /dev/null on stdin and the log on stdout
/// and stderr. Everything else is close-on-exec already (Rust opens with
/// O_CLOEXEC), and `dup2` clears that flag on the copies only.
fn place_fds(fds: &[OwnedFd], stdin: &OwnedFd, log: &std::fs::File) -> Result<(), EnterJailError> {
    // First out of the way of the targets, then into place.
    let high = FIRST_FD + fds.len() as RawFd + 8;
    let mut moved: Vec<OwnedFd> = vec![];
    for fd in fds {
        // SAFETY: F_DUPFD_CLOEXEC returns a new fd that nothing else owns.
        let copy = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_DUPFD_CLOEXEC, high) };
        if copy < 0 {
            return Err(step("move an fd")(nix::Error::last()));
        }
        // SAFETY: `copy` is a fresh fd owned here.
        moved.push(unsafe { OwnedFd::from_raw_fd(copy) });
    }
    nix::unistd::dup2(stdin.as_raw_fd(), 0).map_err(step("dup2 stdin"))?;
    nix::unistd::dup2(log.as_raw_fd(), 1).map_err(step("dup2 stdout"))?;
    nix::unistd::dup2(log.as_raw_fd(), 2).map_err(step("dup2 stderr"))?;
    for (i, fd) in moved.iter().enumerate() {
        nix::unistd::dup2(fd.as_raw_fd(), FIRST_FD + i as RawFd).map_err(step("dup2 an fd"))?;
    }
    // An fd vroomd inherited without O_CLOEXEC must not reach QEMU either.
    let first_unused = (FIRST_FD as usize + fds.len()) as libc::c_uint;
    // SAFETY: plain syscall; closes only fds nothing here uses any more
    // (`moved` is closed on exec anyway).
    if unsafe { libc::syscall(libc::SYS_close_range, first_unused, libc::c_uint::MAX, 0) } != 0 {
        return Err(step("close inherited fds")(nix::Error::last()));
    }
    std::mem::forget(moved);
    Ok(())
}

/// A cap on file sizes; no capability left, not even in the bounding set;
/// a session keyring of its own; the instance's own gid, groups and uid
/// (real, effective and saved); no_new_privs.
fn drop_privileges(iso: &Isolation) -> Result<(), EnterJailError> {
    // SAFETY: SIG_IGN installs no handler; an ignored SIGXFSZ survives exec,
    // so a write past the limit fails with EFBIG instead of killing QEMU.
    unsafe { libc::signal(libc::SIGXFSZ, libc::SIG_IGN) };
    let limit = libc::rlimit {
        rlim_cur: iso.max_file_bytes,
        rlim_max: iso.max_file_bytes,
    };
    // SAFETY: plain syscall on a value that lives for the call.
    if unsafe { libc::setrlimit(libc::RLIMIT_FSIZE, &limit) } != 0 {
        return Err(step("limit file sizes")(nix::Error::last()));
    }
    for cap in 0..64 {
        // SAFETY: plain prctl; EINVAL past the last capability is expected,
        // anything else (EPERM) means the bounding set was not cleared.
        if unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0) } != 0 {
            let err = nix::Error::last();
            if err != nix::Error::EINVAL {
                return Err(step("drop the capability bounding set")(err));
            }
        }
    }
    // A fresh anonymous session keyring: QEMU must not reach keys vroomd's
    // session holds (KEYCTL_JOIN_SESSION_KEYRING with no name).
    // SAFETY: plain syscall with integer arguments.
    if unsafe { libc::syscall(libc::SYS_keyctl, 1, 0usize) } < 0 {
        let err = nix::Error::last();
        // Kernels without keys support have nothing to leak.
        if err != nix::Error::ENOSYS {
            return Err(step("join a new session keyring")(err));
        }
    }
    let groups: Vec<Gid> = iso.groups.iter().map(|g| Gid::from_raw(*g)).collect();
    nix::unistd::setgroups(&groups).map_err(step("setgroups"))?;
    let gid = Gid::from_raw(iso.gid);
    nix::unistd::setresgid(gid, gid, gid).map_err(step("setresgid"))?;
    let uid = Uid::from_raw(iso.uid);
    nix::unistd::setresuid(uid, uid, uid).map_err(step("setresuid"))?;
    nix::sys::prctl::set_no_new_privs().map_err(step("set no_new_privs"))?;
    // Belt and braces: root must be out of reach now.
    if nix::unistd::setuid(Uid::from_raw(0)).is_ok() {
        return Err(step("drop root")(nix::Error::EPERM));
    }
    Ok(())
}

/// Waits until QEMU greets on QMP (it is up), exits, or the time runs out
/// (then it is killed). The connection is held across attempts so QEMU
/// sees one client.
fn wait_ready(spec: &JailSpec, child: Pid) -> Result<(), RunJailError> {
    let deadline = Instant::now() + Duration::from_secs(spec.ready_timeout_secs);
    let mut stream: Option<UnixStream> = None;
    let mut greeting = vec![];
    loop {
        match waitpid(child, Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::StillAlive) => {}
            Ok(status) => {
                return Err(RunJailError::Exited {
                    status: describe(status),
                    stderr: report(spec),
                })
            }
            Err(e) => {
                return Err(RunJailError::Exited {
                    status: e.to_string(),
                    stderr: report(spec),
                })
            }
        }
        if stream.is_none() {
            stream = UnixStream::connect(&spec.qmp_socket).ok();
            if let Some(s) = &stream {
                let _ = s.set_read_timeout(Some(Duration::from_millis(50)));
            }
        }
        if let Some(s) = stream.as_mut() {
            let mut buf = [0u8; 512];
            match s.read(&mut buf) {
                Ok(0) => stream = None,
                Ok(n) => {
                    greeting.extend_from_slice(&buf[..n]);
                    if greeting.contains(&b'\n') && greeting.starts_with(b"{\"QMP\"") {
                        return Ok(());
                    }
                }
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
                Err(_) => stream = None,
            }
        } else {
            std::thread::sleep(Duration::from_millis(20));
        }
        if Instant::now() > deadline {
            let _ = nix::sys::signal::kill(child, nix::sys::signal::Signal::SIGKILL);
            let _ = waitpid(child, None);
            return Err(RunJailError::Timeout {
                socket: spec.qmp_socket.clone(),
                secs: spec.ready_timeout_secs,
                stderr: report(spec),
            });
        }
    }
}

fn describe(status: WaitStatus) -> String {
    match status {
        WaitStatus::Exited(_, code) => format!("exit status {code}"),
        WaitStatus::Signaled(_, signal, _) => format!("killed by {signal}"),
        other => format!("{other:?}"),
    }
}

/// What QEMU said last, and whether its output hit the file size cap.
fn report(spec: &JailSpec) -> String {
    let mut said = log_tail(&spec.log);
    let size = std::fs::metadata(&spec.log).map(|m| m.len()).unwrap_or(0);
    if let Some(iso) = spec.isolation.as_ref().filter(|i| size >= i.max_file_bytes) {
        said.push_str(&format!(
            " (its output was cut at the {} MiB file size cap)",
            iso.max_file_bytes >> 20
        ));
    }
    said
}

/// The last non-empty line of QEMU's log (it names the cause), bounded.
fn log_tail(log: &Path) -> String {
    let raw = std::fs::read(log).unwrap_or_default();
    let tail = &raw[raw.len().saturating_sub(REPORT_BYTES)..];
    String::from_utf8_lossy(tail)
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("no error output")
        .trim()
        .to_string()
}
