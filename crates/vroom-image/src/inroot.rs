//! Paths inside an image root being built, resolved the way the guest will
//! see them: symbolic links (a package's or a recipe's) are followed *within*
//! the root, so `/usr/lib/ssl/certs -> /etc/ssl/certs` means the image's
//! `etc/ssl/certs`, never the host's. vroomd builds as root, so a write or
//! removal through such a link would otherwise land on the host.
//!
//! The kernel does the resolving (`openat2` with `RESOLVE_IN_ROOT`, Linux
//! 5.6+): the parent directory of a path is opened inside the root and its
//! real location read back from `/proc/self/fd`, so the returned path has no
//! symbolic link left in it but (perhaps) its last component, which each
//! caller treats with `symlink_metadata`. The build dir is vroomd's own, so
//! nothing changes it between the resolve and the use.

use std::ffi::CString;
use std::fs;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::io::{FromRawFd, OwnedFd};
use std::path::{Component, Path, PathBuf};

/// Opens `relative` (a directory) inside `root`, following links within it.
fn open_dir_in_root(root: &Path, relative: &Path) -> io::Result<PathBuf> {
    let fd = open_in_root(root, relative, libc::O_PATH | libc::O_DIRECTORY)?;
    fs::read_link(format!(
        "/proc/self/fd/{}",
        std::os::unix::io::AsRawFd::as_raw_fd(&fd)
    ))
}

/// Opens the file at `guest_path` for reading, every link on the way (its
/// own included) followed within `root`, as the guest would open it.
pub fn open_file(root: &Path, guest_path: impl AsRef<Path>) -> io::Result<fs::File> {
    let relative: PathBuf = components(guest_path.as_ref()).into_iter().collect();
    Ok(open_in_root(root, &relative, libc::O_RDONLY)?.into())
}

/// `openat2(root, relative, flags | O_CLOEXEC)` with `RESOLVE_IN_ROOT`.
fn open_in_root(root: &Path, relative: &Path, flags: libc::c_int) -> io::Result<OwnedFd> {
    let root_dir = fs::File::open(root)?;
    let relative = if relative.as_os_str().is_empty() {
        Path::new(".")
    } else {
        relative
    };
    let path = CString::new(relative.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "a path with a NUL byte"))?;
    // SAFETY: open_how is a plain C struct of integers; all-zero is valid.
    let mut how: libc::open_how = unsafe { std::mem::zeroed() };
    how.flags = (flags | libc::O_CLOEXEC) as u64;
    how.resolve = libc::RESOLVE_IN_ROOT | libc::RESOLVE_NO_MAGICLINKS;
    // SAFETY: openat2 with a valid dir fd, a NUL-terminated path and a
    // properly sized open_how; a non-negative result is a new fd we own.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_openat2,
            std::os::unix::io::AsRawFd::as_raw_fd(&root_dir),
            path.as_ptr(),
            &how as *const libc::open_how,
            std::mem::size_of::<libc::open_how>(),
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd was just returned by the kernel and is owned by no one else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// The components of a guest path, without the leading `/`, `.` or `..`
/// (recipes are validated to have none; this never lets one through).
fn components(guest_path: &Path) -> Vec<&std::ffi::OsStr> {
    guest_path
        .components()
        .filter_map(|c| match c {
            Component::Normal(name) => Some(name),
            _ => None,
        })
        .collect()
}

/// Where `guest_path` lives on the host: its parent resolved inside `root`,
/// joined with its last component (which may itself be a link; callers
/// decide). Fails with `NotFound` when the parent does not exist.
pub fn resolve(root: &Path, guest_path: impl AsRef<Path>) -> io::Result<PathBuf> {
    let parts = components(guest_path.as_ref());
    let Some((last, parents)) = parts.split_last() else {
        return Ok(root.to_path_buf());
    };
    let parent: PathBuf = parents.iter().collect();
    Ok(open_dir_in_root(root, &parent)?.join(last))
}

/// `mkdir -p` of `guest_path` inside `root`, following existing links within
/// the root; returns the directory's host path.
pub fn create_dir_all(root: &Path, guest_path: impl AsRef<Path>) -> io::Result<PathBuf> {
    let mut done = PathBuf::new();
    for part in components(guest_path.as_ref()) {
        let host = open_dir_in_root(root, &done)?.join(part);
        match fs::create_dir(&host) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(e),
        }
        done.push(part);
    }
    open_dir_in_root(root, &done)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn links_resolve_inside_the_root_never_to_the_host() {
        let host = tempfile::tempdir().unwrap();
        let outside = host.path().join("outside");
        fs::create_dir(&outside).unwrap();
        let root = host.path().join("root");
        fs::create_dir_all(root.join("etc/ssl/certs")).unwrap();
        fs::create_dir_all(root.join("usr/lib/ssl")).unwrap();
        // An absolute link, as packages ship them, and one aimed at the host.
        std::os::unix::fs::symlink("/etc/ssl/certs", root.join("usr/lib/ssl/certs")).unwrap();
        std::os::unix::fs::symlink(&outside, root.join("escape")).unwrap();
        std::os::unix::fs::symlink("../../..", root.join("etc/up")).unwrap();
        let root = fs::canonicalize(&root).unwrap();

        assert_eq!(
            resolve(&root, "/usr/lib/ssl/certs/ca.pem").unwrap(),
            root.join("etc/ssl/certs/ca.pem")
        );
        // The host dir named by an absolute link is looked up in the root.
        let err = resolve(&root, "/escape/file").unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::NotFound, "{err}");
        assert_eq!(resolve(&root, "/etc/up/x").unwrap(), root.join("x"));
        // mkdir -p through the links stays inside too: the host dir is not
        // in the root, so the link dangles there, as it will in the guest.
        let err = create_dir_all(&root, "/escape/sub").unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::NotFound, "{err}");
        assert!(!outside.join("sub").exists());
        assert_eq!(
            create_dir_all(&root, "/usr/lib/ssl/certs/new").unwrap(),
            root.join("etc/ssl/certs/new")
        );
        // The last component is left to the caller.
        assert_eq!(
            resolve(&root, "/usr/lib/ssl/certs").unwrap(),
            root.join("usr/lib/ssl/certs")
        );
    }
}
