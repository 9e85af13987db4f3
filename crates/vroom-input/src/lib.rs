//! Files a user names by path: a recipe and every file it references, a
//! config to import. vroomd runs as root, so such a path may name anything on
//! the host; only a regular file, under a size cap, is ever read.
//!
//! The path is opened with `O_PATH | O_NOFOLLOW` (which opens nothing: no
//! FIFO blocks, no device sees an open) and that descriptor is checked with
//! fstat: a symbolic link, FIFO, socket, device or directory is refused,
//! naming the file and its type, and so is a file with more than one hard
//! link (a link to `/etc/shadow` placed beside a recipe must not land in an
//! image) or one larger than the cap. Only then is the very inode reopened
//! for reading through `/proc/self/fd`, never the path again, so a file
//! swapped after the check is not what is read. Reads stop one byte past the
//! cap, so a file that grows after the check is refused, not buffered.
//!
//! With an `owner`, the file must also belong to that uid: a build asked for
//! by a non-root API caller (a member of the `vroom` group) reads only that
//! caller's own files, so vroomd's root privileges never read for them a
//! file they could not read themselves.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum OpenInputError {
    #[error("cannot open {path}")]
    Open {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path} is {kind}, not a regular file")]
    NotRegular { path: PathBuf, kind: &'static str },
    #[error(
        "{path} has {links} hard links; only files with one link are read \
         (replace it by a copy: cp {path} {path}.copy && mv {path}.copy {path})"
    )]
    HardLinked { path: PathBuf, links: u64 },
    #[error("{path} belongs to uid {file_owner}, not to uid {owner} who asked for it; only the caller's own files are read")]
    NotOwned {
        path: PathBuf,
        file_owner: u32,
        owner: u32,
    },
    #[error("{path} is larger than the {cap} bytes allowed")]
    TooLarge { path: PathBuf, cap: u64 },
    #[error("cannot read {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// An open regular file, checked, of at most `cap` bytes.
#[derive(Debug)]
pub struct InputFile {
    file: File,
    path: PathBuf,
    size: u64,
    cap: u64,
}

/// Opens `path` for reading if it is a regular file with one link and at
/// most `cap` bytes (and, with `owner`, belongs to that uid); see the module
/// documentation.
pub fn open_input(path: &Path, cap: u64, owner: Option<u32>) -> Result<InputFile, OpenInputError> {
    let open_err = |source| OpenInputError::Open {
        path: path.into(),
        source,
    };
    let handle = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_PATH | libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
        .map_err(open_err)?;
    let meta = handle.metadata().map_err(open_err)?;
    check(path, &meta, cap, owner)?;
    // The inode just checked, not whatever the path names by now.
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY | libc::O_CLOEXEC)
        .open(format!("/proc/self/fd/{}", handle.as_raw_fd()))
        .map_err(open_err)?;
    let opened = file.metadata().map_err(open_err)?;
    if (opened.dev(), opened.ino()) != (meta.dev(), meta.ino()) {
        return Err(open_err(io::Error::other(
            "the file changed while it was opened",
        )));
    }
    check(path, &opened, cap, owner)?;
    Ok(InputFile {
        file,
        path: path.into(),
        size: opened.len(),
        cap,
    })
}

/// Reads all of a checked file (at most `cap` bytes).
pub fn read_input(path: &Path, cap: u64, owner: Option<u32>) -> Result<Vec<u8>, OpenInputError> {
    let mut input = open_input(path, cap, owner)?;
    let mut bytes = Vec::with_capacity(input.size as usize);
    input.copy_to(&mut bytes)?;
    Ok(bytes)
}

fn check(
    path: &Path,
    meta: &std::fs::Metadata,
    cap: u64,
    owner: Option<u32>,
) -> Result<(), OpenInputError> {
    let kind = file_kind(&meta.file_type());
    if kind != "a regular file" {
        return Err(OpenInputError::NotRegular {
            path: path.into(),
            kind,
        });
    }
    if meta.nlink() > 1 {
        return Err(OpenInputError::HardLinked {
            path: path.into(),
            links: meta.nlink(),
        });
    }
    if let Some(owner) = owner.filter(|o| *o != meta.uid()) {
        return Err(OpenInputError::NotOwned {
            path: path.into(),
            file_owner: meta.uid(),
            owner,
        });
    }
    if meta.len() > cap {
        return Err(OpenInputError::TooLarge {
            path: path.into(),
            cap,
        });
    }
    Ok(())
}

/// What a file is, for messages.
pub fn file_kind(t: &std::fs::FileType) -> &'static str {
    if t.is_file() {
        "a regular file"
    } else if t.is_dir() {
        "a directory"
    } else if t.is_symlink() {
        "a symbolic link"
    } else if t.is_fifo() {
        "a FIFO"
    } else if t.is_socket() {
        "a socket"
    } else if t.is_char_device() {
        "a character device"
    } else if t.is_block_device() {
        "a block device"
    } else {
        "an unknown kind of file"
    }
}

impl InputFile {
    /// The size when it was opened.
    pub fn size(&self) -> u64 {
        self.size
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The checked file itself, for a reader that bounds what it reads
    /// on its own (e.g. by offsets within an archive of that size).
    pub fn into_file(self) -> File {
        self.file
    }

    /// Streams the whole file into `out`; more than the cap (a file that
    /// grew since it was checked) is an error. Returns the bytes copied.
    pub fn copy_to(&mut self, out: &mut impl Write) -> Result<u64, OpenInputError> {
        let read_err = |source| OpenInputError::Read {
            path: self.path.clone(),
            source,
        };
        let copied = io::copy(&mut (&self.file).take(self.cap + 1), out).map_err(read_err)?;
        if copied > self.cap {
            return Err(OpenInputError::TooLarge {
                path: self.path.clone(),
                cap: self.cap,
            });
        }
        Ok(copied)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixListener;

    #[derive(Debug)]
    enum Want {
        Bytes(&'static [u8]),
        Error(&'static str),
    }

    #[test]
    fn only_single_link_regular_files_under_the_cap_are_read() {
        let dir = tempfile::tempdir().unwrap();
        let at = |name: &str| dir.path().join(name);
        std::fs::write(at("plain"), b"hello").unwrap();
        std::fs::write(at("empty"), b"").unwrap();
        std::fs::write(at("big"), vec![b'x'; 17]).unwrap();
        std::fs::write(at("linked"), b"secret").unwrap();
        std::fs::hard_link(at("linked"), at("other-link")).unwrap();
        std::os::unix::fs::symlink(at("plain"), at("symlink")).unwrap();
        std::os::unix::fs::symlink(at("nowhere"), at("dangling")).unwrap();
        std::fs::create_dir(at("dir")).unwrap();
        let fifo = std::ffi::CString::new(at("fifo").to_str().unwrap()).unwrap();
        // SAFETY: mkfifo with a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o600) }, 0);
        let _socket = UnixListener::bind(at("socket")).unwrap();
        let path = |name: &str| at(name).to_str().unwrap().to_string();
        let cases: Vec<(String, Want)> = vec![
            (path("plain"), Want::Bytes(b"hello")),
            (path("empty"), Want::Bytes(b"")),
            (
                path("big"),
                Want::Error("is larger than the 16 bytes allowed"),
            ),
            (path("linked"), Want::Error("has 2 hard links")),
            (
                path("symlink"),
                Want::Error("is a symbolic link, not a regular file"),
            ),
            (path("dangling"), Want::Error("is a symbolic link")),
            (
                path("dir"),
                Want::Error("is a directory, not a regular file"),
            ),
            (path("fifo"), Want::Error("is a FIFO, not a regular file")),
            (
                path("socket"),
                Want::Error("is a socket, not a regular file"),
            ),
            (path("missing"), Want::Error("cannot open")),
            (
                "/dev/zero".into(),
                Want::Error("/dev/zero is a character device"),
            ),
            ("/dev/null".into(), Want::Error("is a character device")),
        ];
        for (path, want) in cases {
            let got = read_input(Path::new(&path), 16, None);
            match (&want, got) {
                (Want::Bytes(bytes), Ok(read)) => assert_eq!(&read, bytes, "{path}"),
                (Want::Error(text), Err(e)) => {
                    let message = e.to_string();
                    assert!(message.contains(text), "{path}: {message:?} lacks {text:?}");
                    assert!(
                        message.contains(&path),
                        "{path}: {message:?} names the file"
                    );
                }
                (want, got) => panic!("{path}: wanted {want:?}, got {got:?}"),
            }
        }
    }

    #[test]
    fn with_an_owner_only_that_uid_s_files_are_read() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("recipe.toml");
        std::fs::write(&path, b"name = 'x'").unwrap();
        let mine = std::fs::metadata(&path).unwrap().uid();
        assert_eq!(read_input(&path, 64, Some(mine)).unwrap(), b"name = 'x'");
        assert_eq!(read_input(&path, 64, None).unwrap(), b"name = 'x'");
        let other = mine.wrapping_add(4242);
        let err = read_input(&path, 64, Some(other)).unwrap_err();
        assert!(
            matches!(err, OpenInputError::NotOwned { file_owner, owner, .. }
                if file_owner == mine && owner == other),
            "{err}"
        );
        assert!(err
            .to_string()
            .contains("only the caller's own files are read"));
    }

    #[test]
    fn a_file_that_grows_after_the_check_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("growing");
        std::fs::write(&path, b"1234").unwrap();
        let mut input = open_input(&path, 8, None).unwrap();
        std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap()
            .write_all(b"56789")
            .unwrap();
        let err = input.copy_to(&mut Vec::new()).unwrap_err();
        assert!(
            matches!(err, OpenInputError::TooLarge { cap: 8, .. }),
            "{err}"
        );
    }

    #[test]
    fn the_opened_inode_is_read_even_if_the_path_is_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, b"checked").unwrap();
        let mut input = open_input(&path, 64, None).unwrap();
        std::fs::remove_file(&path).unwrap();
        std::os::unix::fs::symlink("/etc/hostname", &path).unwrap();
        let mut bytes = Vec::new();
        input.copy_to(&mut bytes).unwrap();
        assert_eq!(bytes, b"checked");
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(64))]
        /// Any content is read back exactly when it fits the cap, and
        /// refused as too large when it does not.
        #[test]
        fn reads_exactly_what_fits(
            bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..4096),
            cap in 0u64..4096,
        ) {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("f");
            std::fs::write(&path, &bytes).unwrap();
            match read_input(&path, cap, None) {
                Ok(read) => {
                    proptest::prop_assert!(bytes.len() as u64 <= cap);
                    proptest::prop_assert_eq!(read, bytes);
                }
                Err(OpenInputError::TooLarge { cap: c, .. }) => {
                    proptest::prop_assert_eq!(c, cap);
                    proptest::prop_assert!(bytes.len() as u64 > cap);
                }
                Err(e) => proptest::prop_assert!(false, "{}", e),
            }
        }
    }
}
