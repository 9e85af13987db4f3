//! Applying OCI image layers (tar streams) to a staging root, by the OCI
//! image spec's rules (`image-spec/layer.md`):
//!
//! - `.wh.NAME` deletes `NAME` of the layers below; `.wh..wh..opq` empties
//!   its directory of what the layers below put there;
//! - a directory over an existing directory merges; anything else replaces
//!   what was at its path;
//! - hard links point at a path already in the layer set;
//! - owners and modes are kept (the packer keeps owners for imported
//!   images); timestamps are not, the packer sets every one to 0.
//!
//! vroomd unpacks as root, so every path is resolved *inside* the staging
//! root ([`crate::inroot`]): a link in an earlier entry or layer can never
//! make a later entry land on the host, and nothing is ever written through
//! a link (a link at an entry's path is replaced). Entries with `..` and
//! device nodes are dropped with a warning. The input is bounded like recipe
//! input: unpacked bytes, entries and path depth ([`Limits`]), so a layer
//! bomb is a one-line error.

use std::collections::HashSet;
use std::fs;
use std::io::{self, Read};
use std::os::unix::fs::PermissionsExt;
use std::path::{Component, Path, PathBuf};

use crate::inroot;

/// How much a layer set may unpack to.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Bytes of uncompressed tar, over all layers.
    pub max_bytes: u64,
    /// Entries over all layers.
    pub max_entries: u64,
    /// Components of one path.
    pub max_depth: usize,
}

/// The bounds of an imported image: larger than any appliance, far below
/// what fills a host.
pub const LIMITS: Limits = Limits {
    max_bytes: 4 << 30,
    max_entries: 300_000,
    max_depth: 64,
};

#[derive(Debug, thiserror::Error)]
pub enum UnpackLayerError {
    #[error("the layers unpack to more than {limit} bytes")]
    TooLarge { limit: u64 },
    #[error("the layers hold more than {limit} entries")]
    TooManyEntries { limit: u64 },
    #[error("{path} is nested deeper than {limit} directories")]
    TooDeep { path: String, limit: usize },
    #[error("the layer is not a valid tar stream")]
    Read(#[source] io::Error),
    #[error("cannot unpack {path}")]
    Write {
        path: String,
        #[source]
        source: io::Error,
    },
}

/// The error a [`Bounded`] reader gives when its budget is spent.
#[derive(Debug)]
struct BudgetSpent;

impl std::fmt::Display for BudgetSpent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("the byte budget is spent")
    }
}

impl std::error::Error for BudgetSpent {}

/// A reader that fails once it has given `budget` bytes.
struct Bounded<R> {
    inner: R,
    budget: u64,
    read: u64,
}

impl<R: Read> Read for Bounded<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.read += n as u64;
        if self.read > self.budget {
            return Err(io::Error::other(BudgetSpent));
        }
        Ok(n)
    }
}

fn budget_spent(e: &io::Error) -> bool {
    e.get_ref().is_some_and(|inner| inner.is::<BudgetSpent>())
}

/// Applies layers one after the other to `root`.
pub struct Unpacker<'a> {
    root: &'a Path,
    limits: Limits,
    bytes: u64,
    entries: u64,
    /// What was dropped, one line each.
    pub warnings: Vec<String>,
}

impl<'a> Unpacker<'a> {
    pub fn new(root: &'a Path, limits: Limits) -> Self {
        Unpacker {
            root,
            limits,
            bytes: 0,
            entries: 0,
            warnings: vec![],
        }
    }

    /// Applies one layer, an uncompressed tar stream, read to its end (so
    /// that a digest computed over the stream covers all of it).
    pub fn apply(&mut self, layer: impl Read) -> Result<(), UnpackLayerError> {
        let mut bounded = Bounded {
            inner: layer,
            budget: self.limits.max_bytes - self.bytes,
            read: 0,
        };
        let result = self.apply_entries(&mut bounded).and_then(|()| {
            io::copy(&mut bounded, &mut io::sink())
                .map(drop)
                .map_err(UnpackLayerError::Read)
        });
        self.bytes += bounded.read;
        match result {
            Err(UnpackLayerError::Read(e) | UnpackLayerError::Write { source: e, .. })
                if budget_spent(&e) =>
            {
                Err(UnpackLayerError::TooLarge {
                    limit: self.limits.max_bytes,
                })
            }
            other => other,
        }
    }

    fn apply_entries(&mut self, layer: &mut impl Read) -> Result<(), UnpackLayerError> {
        let mut archive = tar::Archive::new(layer);
        // What this layer put in place: an opaque whiteout keeps it.
        let mut this_layer = HashSet::new();
        for entry in archive.entries().map_err(UnpackLayerError::Read)? {
            let entry = entry.map_err(UnpackLayerError::Read)?;
            self.entries += 1;
            if self.entries > self.limits.max_entries {
                return Err(UnpackLayerError::TooManyEntries {
                    limit: self.limits.max_entries,
                });
            }
            self.entry(entry, &mut this_layer)?;
        }
        Ok(())
    }

    fn entry<R: Read>(
        &mut self,
        mut entry: tar::Entry<R>,
        this_layer: &mut HashSet<PathBuf>,
    ) -> Result<(), UnpackLayerError> {
        let raw = entry.path().map_err(UnpackLayerError::Read)?.into_owned();
        let Some(rel) = clean(&raw) else {
            self.warnings
                .push(format!("dropped {}: it has a .. component", raw.display()));
            return Ok(());
        };
        let shown = rel.display().to_string();
        if rel.components().count() > self.limits.max_depth {
            return Err(UnpackLayerError::TooDeep {
                path: shown,
                limit: self.limits.max_depth,
            });
        }
        let Some(name) = rel.file_name().map(|n| n.to_string_lossy().into_owned()) else {
            // The root itself: its owner and mode stay vroom's.
            return Ok(());
        };
        let parent = rel.parent().unwrap_or(Path::new("")).to_path_buf();
        let write_err = |source| UnpackLayerError::Write {
            path: shown.clone(),
            source,
        };
        if name == ".wh..wh..opq" {
            return self.opaque(&parent, this_layer).map_err(write_err);
        }
        if let Some(hidden) = name.strip_prefix(".wh.") {
            return match inroot::resolve(self.root, parent.join(hidden)) {
                Ok(path) => remove(&path).map_err(write_err),
                // Its directory is not there: nothing to hide.
                Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
                Err(e) => Err(write_err(e)),
            };
        }
        let xattrs = xattrs(&mut entry).map_err(UnpackLayerError::Read)?;
        let header = entry.header();
        let kind = header.entry_type();
        let mode = header.mode().map_err(UnpackLayerError::Read)? & 0o7777;
        let uid = header.uid().map_err(UnpackLayerError::Read)?;
        let gid = header.gid().map_err(UnpackLayerError::Read)?;
        let owner = (
            u32::try_from(uid).unwrap_or(u32::MAX - 1),
            u32::try_from(gid).unwrap_or(u32::MAX - 1),
        );
        if !(kind.is_dir()
            || kind.is_file()
            || kind.is_symlink()
            || kind.is_hard_link()
            || kind == tar::EntryType::Continuous)
        {
            let what = match kind {
                tar::EntryType::Char | tar::EntryType::Block => "a device node",
                tar::EntryType::Fifo => "a fifo",
                _ => "an entry of an unsupported type",
            };
            self.warnings.push(format!("dropped {shown}: {what}"));
            return Ok(());
        }
        // The parent is made (or found) inside the root; so the entry's own
        // path is inside the root, whatever links lie on the way.
        let dir = inroot::create_dir_all(self.root, &parent).map_err(write_err)?;
        let dest = dir.join(&name);
        let existing = fs::symlink_metadata(&dest).ok();
        if kind.is_dir() {
            if !existing.as_ref().is_some_and(|m| m.is_dir()) {
                remove(&dest).map_err(write_err)?;
                fs::create_dir(&dest).map_err(write_err)?;
            }
            set_owner_and_mode(&dest, owner, Some(mode)).map_err(write_err)?;
            set_xattrs(&dest, &xattrs).map_err(write_err)?;
        } else if kind.is_symlink() || kind.is_hard_link() {
            let target = entry
                .link_name()
                .map_err(UnpackLayerError::Read)?
                .ok_or_else(|| write_err(io::Error::other("a link without a target")))?
                .into_owned();
            if kind.is_symlink() {
                // Kept as is: the guest resolves it in its own root, and
                // this unpacker never follows it out of the staging root.
                remove(&dest).map_err(write_err)?;
                std::os::unix::fs::symlink(&target, &dest).map_err(write_err)?;
                set_owner_and_mode(&dest, owner, None).map_err(write_err)?;
            } else {
                let Some(target_rel) = clean(&target) else {
                    self.warnings.push(format!(
                        "dropped {shown}: a hard link to {} (outside the root)",
                        target.display()
                    ));
                    return Ok(());
                };
                let source = inroot::resolve(self.root, &target_rel)
                    .ok()
                    .filter(|source| fs::symlink_metadata(source).is_ok_and(|m| !m.is_dir()));
                let source = match source {
                    Some(source) => source,
                    None => {
                        self.warnings.push(format!(
                            "dropped {shown}: a hard link to {}, which the layers do not hold",
                            target_rel.display()
                        ));
                        return Ok(());
                    }
                };
                if source != dest {
                    remove(&dest).map_err(write_err)?;
                    fs::hard_link(&source, &dest).map_err(write_err)?;
                }
            }
        } else {
            remove(&dest).map_err(write_err)?;
            let mut file = fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&dest)
                .map_err(write_err)?;
            io::copy(&mut entry, &mut file).map_err(write_err)?;
            set_owner_and_mode(&dest, owner, Some(mode)).map_err(write_err)?;
            set_xattrs(&dest, &xattrs).map_err(write_err)?;
        }
        this_layer.insert(rel);
        Ok(())
    }

    /// `.wh..wh..opq` in `dir`: what the layers below put there goes; what
    /// this layer put there stays.
    fn opaque(&mut self, dir: &Path, this_layer: &HashSet<PathBuf>) -> io::Result<()> {
        let host = match inroot::resolve(self.root, dir) {
            Ok(host) => host,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(e),
        };
        if !fs::symlink_metadata(&host).is_ok_and(|m| m.is_dir()) {
            return Ok(());
        }
        for child in fs::read_dir(&host)? {
            let child = child?;
            if !this_layer.contains(&dir.join(child.file_name())) {
                remove(&child.path())?;
            }
        }
        Ok(())
    }
}

/// A layer path made relative, without `.` or a leading `/`; `None` when it
/// has a `..` (never followed, whatever it would resolve to).
fn clean(path: &Path) -> Option<PathBuf> {
    let mut out = PathBuf::new();
    for component in path.components() {
        match component {
            Component::Normal(part) => out.push(part),
            Component::RootDir | Component::CurDir => {}
            Component::ParentDir | Component::Prefix(_) => return None,
        }
    }
    Some(out)
}

/// Removes what is at `path` (a link itself, never its target); nothing
/// there is fine.
fn remove(path: &Path) -> io::Result<()> {
    match fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => fs::remove_dir_all(path),
        Ok(_) => fs::remove_file(path),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

/// The extended attributes a layer gives an entry (PAX `SCHILY.xattr.*`)
/// that mean the same inside the guest: `user.*` and file capabilities.
/// Others (`security.selinux`, `trusted.*`) are the host's business.
fn xattrs<R: Read>(entry: &mut tar::Entry<R>) -> io::Result<Vec<(std::ffi::CString, Vec<u8>)>> {
    let mut out = vec![];
    let Some(extensions) = entry.pax_extensions()? else {
        return Ok(out);
    };
    for extension in extensions {
        let extension = extension?;
        let Some(name) = extension.key_bytes().strip_prefix(b"SCHILY.xattr.") else {
            continue;
        };
        if name.starts_with(b"user.") || name == b"security.capability" {
            if let Ok(name) = std::ffi::CString::new(name) {
                out.push((name, extension.value_bytes().to_vec()));
            }
        }
    }
    Ok(out)
}

/// Sets extended attributes, after the owner (chown drops capabilities).
fn set_xattrs(path: &Path, xattrs: &[(std::ffi::CString, Vec<u8>)]) -> io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    if xattrs.is_empty() {
        return Ok(());
    }
    let path = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "a path with a NUL byte"))?;
    for (name, value) in xattrs {
        // SAFETY: NUL-terminated path and name, and a value buffer of the
        // length passed.
        let rc = unsafe {
            libc::lsetxattr(
                path.as_ptr(),
                name.as_ptr(),
                value.as_ptr().cast(),
                value.len(),
                0,
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// The owner first: chown clears the set-id bits the mode may carry.
fn set_owner_and_mode(path: &Path, (uid, gid): (u32, u32), mode: Option<u32>) -> io::Result<()> {
    std::os::unix::fs::lchown(path, Some(uid), Some(gid))?;
    if let Some(mode) = mode {
        fs::set_permissions(path, fs::Permissions::from_mode(mode))?;
    }
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    /// A layer built entry by entry with the tar crate.
    pub(crate) struct Layer(tar::Builder<Vec<u8>>);

    impl Layer {
        pub(crate) fn new() -> Self {
            Layer(tar::Builder::new(Vec::new()))
        }

        fn header(kind: tar::EntryType, mode: u32, size: u64) -> tar::Header {
            let mut h = tar::Header::new_gnu();
            h.set_entry_type(kind);
            h.set_mode(mode);
            h.set_size(size);
            h.set_uid(0);
            h.set_gid(0);
            h.set_mtime(1_700_000_000);
            h
        }

        pub(crate) fn dir(mut self, path: &str) -> Self {
            let mut h = Self::header(tar::EntryType::Directory, 0o755, 0);
            self.0.append_data(&mut h, path, io::empty()).unwrap();
            self
        }

        pub(crate) fn file(self, path: &str, content: &str) -> Self {
            self.file_owned(path, content, 0o644, 0, 0)
        }

        pub(crate) fn file_owned(
            mut self,
            path: &str,
            content: &str,
            mode: u32,
            uid: u64,
            gid: u64,
        ) -> Self {
            let mut h = Self::header(tar::EntryType::Regular, mode, content.len() as u64);
            h.set_uid(uid);
            h.set_gid(gid);
            self.0
                .append_data(&mut h, path, content.as_bytes())
                .unwrap();
            self
        }

        /// A PAX header giving the next entry an extended attribute.
        fn xattr(mut self, name: &str, value: &str) -> Self {
            let record = |len: usize| format!("{len} SCHILY.xattr.{name}={value}\n");
            let mut len = record(0).len();
            while record(len).len() != len {
                len = record(len).len();
            }
            let data = record(len);
            let mut h = Self::header(tar::EntryType::XHeader, 0o644, data.len() as u64);
            self.0
                .append_data(&mut h, "PaxHeader", data.as_bytes())
                .unwrap();
            self
        }

        pub(crate) fn symlink(mut self, path: &str, target: &str) -> Self {
            let mut h = Self::header(tar::EntryType::Symlink, 0o777, 0);
            self.0.append_link(&mut h, path, target).unwrap();
            self
        }

        fn hardlink(mut self, path: &str, target: &str) -> Self {
            let mut h = Self::header(tar::EntryType::Link, 0o644, 0);
            self.0.append_link(&mut h, path, target).unwrap();
            self
        }

        fn device(mut self, path: &str) -> Self {
            let mut h = Self::header(tar::EntryType::Char, 0o666, 0);
            h.set_device_major(1).unwrap();
            h.set_device_minor(3).unwrap();
            self.0.append_data(&mut h, path, io::empty()).unwrap();
            self
        }

        /// An entry whose name is written raw, as a hostile layer would
        /// (the builder itself refuses `..`).
        fn raw_file(mut self, name: &[u8], content: &str) -> Self {
            let mut h = Self::header(tar::EntryType::Regular, 0o644, content.len() as u64);
            let gnu = h.as_gnu_mut().unwrap();
            gnu.name[..name.len()].copy_from_slice(name);
            h.set_cksum();
            self.0.append(&h, content.as_bytes()).unwrap();
            self
        }

        pub(crate) fn bytes(self) -> Vec<u8> {
            self.0.into_inner().unwrap()
        }
    }

    fn tree(root: &Path) -> Vec<String> {
        fn walk(root: &Path, dir: &Path, out: &mut Vec<String>) {
            let mut entries: Vec<_> = fs::read_dir(dir).unwrap().flatten().collect();
            entries.sort_by_key(|e| e.file_name());
            for e in entries {
                let rel = e.path().strip_prefix(root).unwrap().display().to_string();
                let meta = fs::symlink_metadata(e.path()).unwrap();
                if meta.is_symlink() {
                    out.push(format!(
                        "{rel} -> {}",
                        fs::read_link(e.path()).unwrap().display()
                    ));
                } else if meta.is_dir() {
                    out.push(format!("{rel}/"));
                    walk(root, &e.path(), out);
                } else {
                    out.push(format!(
                        "{rel} = {}",
                        fs::read_to_string(e.path()).unwrap_or_default()
                    ));
                }
            }
        }
        let mut out = vec![];
        walk(root, root, &mut out);
        out
    }

    /// Whiteouts hide what the layers below hold; an opaque directory
    /// keeps only what its own layer put there; hard links reach into
    /// lower layers; owners and modes are kept.
    #[test]
    fn layers_apply_by_the_oci_rules() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        let mut unpacker = Unpacker::new(root, LIMITS);
        let base = Layer::new()
            .dir("etc")
            .file("etc/keep", "k")
            .file("etc/gone", "g")
            .dir("opq")
            .file("opq/old", "o")
            .dir("opq/sub")
            .file("opq/sub/deep", "d")
            .file_owned("srv/www", "w", 0o4750, 1000, 100)
            .symlink("bin", "usr/bin")
            .xattr("user.origin", "base layer")
            .file("etc/tagged", "t")
            .xattr("trusted.host", "not the guest's")
            .file("etc/untagged", "u")
            .bytes();
        unpacker.apply(&base[..]).unwrap();
        let xattr = |file: &str, name: &str| {
            use std::os::unix::ffi::OsStrExt;
            let path = std::ffi::CString::new(root.join(file).as_os_str().as_bytes()).unwrap();
            let name = std::ffi::CString::new(name).unwrap();
            let mut buf = [0u8; 64];
            // SAFETY: NUL-terminated strings and a buffer of the length passed.
            let n = unsafe {
                libc::lgetxattr(
                    path.as_ptr(),
                    name.as_ptr(),
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                )
            };
            String::from_utf8_lossy(&buf[..n.max(0) as usize]).into_owned()
        };
        assert_eq!(xattr("etc/tagged", "user.origin"), "base layer");
        assert_eq!(xattr("etc/untagged", "trusted.host"), "");
        let upper = Layer::new()
            .file("etc/.wh.gone", "")
            .file("opq/new-before", "n")
            .file("opq/.wh..wh..opq", "")
            .file("opq/new", "n")
            .hardlink("etc/keep-link", "etc/keep")
            .file("./bin", "replaced a link")
            .file("etc/.wh.never-was", "")
            .file("nodir/.wh.x", "")
            .bytes();
        unpacker.apply(&upper[..]).unwrap();
        assert_eq!(
            tree(root),
            [
                "bin = replaced a link",
                "etc/",
                "etc/keep = k",
                "etc/keep-link = k",
                "etc/tagged = t",
                "etc/untagged = u",
                "opq/",
                "opq/new = n",
                "opq/new-before = n",
                "srv/",
                "srv/www = w",
            ]
        );
        let www = fs::metadata(root.join("srv/www")).unwrap();
        assert_eq!(
            (www.uid(), www.gid(), www.mode() & 0o7777),
            (1000, 100, 0o4750)
        );
        let keep = fs::metadata(root.join("etc/keep")).unwrap();
        assert_eq!(keep.nlink(), 2, "a hard link, not a copy");
        assert!(unpacker.warnings.is_empty(), "{:?}", unpacker.warnings);
    }

    /// A hostile layer: `..` entries, a link to the host written through,
    /// a hard link out of the root, a device node. Nothing lands outside the
    /// staging root; what cannot be placed inside it is dropped or refused.
    #[test]
    fn a_hostile_layer_writes_nothing_outside_the_root() {
        let host = tempfile::tempdir().unwrap();
        let victim = host.path().join("victim");
        fs::create_dir(&victim).unwrap();
        fs::write(victim.join("passwd"), "host").unwrap();
        let root = host.path().join("root");
        fs::create_dir(&root).unwrap();
        let mut unpacker = Unpacker::new(&root, LIMITS);
        let victim_abs = victim.display().to_string();
        let layer = Layer::new()
            .raw_file(b"../escaped", "x")
            .raw_file(b"a/../../escaped2", "x")
            .symlink("escape", &victim_abs)
            .symlink("up", "../../..")
            .symlink("passwd-link", &format!("{victim_abs}/passwd"))
            .device("dev-null")
            .hardlink("hard", &format!("{victim_abs}/passwd"))
            .raw_file(b"/../abs-escape", "x")
            .bytes();
        unpacker.apply(&layer[..]).unwrap();
        // Writing through the links the layer planted: into the root, or refused.
        let through = Layer::new()
            .file("up/planted", "in the root")
            .file("passwd-link", "replaces the link")
            .bytes();
        unpacker.apply(&through[..]).unwrap();
        let refused = Layer::new().file("escape/planted", "x").bytes();
        let err = unpacker.apply(&refused[..]).unwrap_err();
        assert!(err.to_string().contains("escape/planted"), "{err}");

        assert_eq!(fs::read_to_string(victim.join("passwd")).unwrap(), "host");
        assert_eq!(fs::read_dir(&victim).unwrap().count(), 1);
        let outside: Vec<_> = fs::read_dir(host.path())
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(outside.len(), 2, "{outside:?}");
        assert_eq!(
            fs::read_to_string(root.join("planted")).unwrap(),
            "in the root"
        );
        assert_eq!(
            fs::read_to_string(root.join("passwd-link")).unwrap(),
            "replaces the link"
        );
        assert!(!root.join("dev-null").exists());
        assert!(fs::symlink_metadata(root.join("hard")).is_err());
        let warnings = unpacker.warnings.join("\n");
        for says in [
            "dropped ../escaped",
            "dropped a/../../escaped2",
            "dropped dev-null: a device node",
            "dropped hard: a hard link",
        ] {
            assert!(warnings.contains(says), "{says}: {warnings}");
        }
    }

    /// A layer bomb: too many bytes, too many entries or too deep a path is
    /// one error, whichever bound it passes.
    #[test]
    fn layer_bombs_are_bounded() {
        let limits = Limits {
            max_bytes: 64 << 10,
            max_entries: 20,
            max_depth: 8,
        };
        let big = "x".repeat(100 << 10);
        let cases: [(Vec<u8>, &str); 3] = [
            (
                Layer::new().file("big", &big).bytes(),
                "the layers unpack to more than 65536 bytes",
            ),
            (
                (0..30)
                    .fold(Layer::new(), |l, i| l.file(&format!("f{i}"), ""))
                    .bytes(),
                "the layers hold more than 20 entries",
            ),
            (
                Layer::new().file("a/b/c/d/e/f/g/h/i/j", "").bytes(),
                "a/b/c/d/e/f/g/h/i/j is nested deeper than 8 directories",
            ),
        ];
        for (layer, says) in cases {
            let dir = tempfile::tempdir().unwrap();
            let err = Unpacker::new(dir.path(), limits)
                .apply(&layer[..])
                .unwrap_err();
            assert_eq!(err.to_string(), says);
        }
        // Zeros after the end of the archive count too: a gzip bomb of
        // padding is bounded by what it decompresses to.
        let dir = tempfile::tempdir().unwrap();
        let mut padded = Layer::new().file("small", "s").bytes();
        padded.resize(padded.len() + (100 << 10), 0);
        let err = Unpacker::new(dir.path(), limits)
            .apply(&padded[..])
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "the layers unpack to more than 65536 bytes"
        );
    }
}
