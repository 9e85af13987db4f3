//! The content-addressed image store: `<dir>/<id>/` with `manifest.json`,
//! `initramfs.cpio` and `rootfs.erofs`, where `<id>` is the sha256 of the
//! manifest bytes. Entries are created by renaming a finished staging
//! directory into place, so a half-built image is never visible.
//!
//! A name resolves to its newest build: `<dir>/names/<name>` holds the id of
//! the image last built (or found in the build cache) under that name,
//! replaced atomically. Builds no name points to are kept until
//! `vroom image prune`. Stores from before names existed fall back to the
//! most recently committed image of the name.

use std::fs;
use std::path::{Path, PathBuf};

use vroom_types::{ImageManifest, ImageSummary, MANIFEST_VERSION};

use crate::util::sha256_bytes;

pub const MANIFEST_FILE: &str = "manifest.json";

#[derive(Debug, thiserror::Error)]
pub enum ImageStoreError {
    #[error("no image named or with id {reference:?}")]
    NotFound { reference: String },
    #[error("image reference {reference:?} is ambiguous")]
    Ambiguous { reference: String },
    #[error("image {id} has manifest version {version}, this vroom reads {MANIFEST_VERSION}")]
    ManifestVersion { id: String, version: u32 },
    #[error("image store {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("image {id} as received is not the image: {reason}")]
    Mismatch { id: String, reason: String },
    #[error("image {id} has a corrupt manifest")]
    Manifest {
        id: String,
        #[source]
        source: serde_json::Error,
    },
}

#[derive(Debug, Clone)]
pub struct StoredImage {
    pub id: String,
    pub manifest: ImageManifest,
    pub dir: PathBuf,
}

impl StoredImage {
    pub fn initramfs(&self) -> PathBuf {
        self.dir.join(&self.manifest.initramfs.file)
    }

    pub fn rootfs(&self) -> PathBuf {
        self.dir.join(&self.manifest.rootfs.file)
    }

    pub fn summary(&self) -> ImageSummary {
        ImageSummary {
            id: self.id.clone(),
            name: self.manifest.name.clone(),
            version: self.manifest.version.clone(),
            size: self.manifest.initramfs.size + self.manifest.rootfs.size,
            manifest: self.manifest.clone(),
            current: false,
        }
    }
}

pub struct ImageStore {
    dir: PathBuf,
}

impl ImageStore {
    pub fn new(dir: &Path) -> Self {
        ImageStore {
            dir: dir.to_path_buf(),
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn io(&self) -> impl Fn(std::io::Error) -> ImageStoreError + '_ {
        |source| ImageStoreError::Io {
            path: self.dir.clone(),
            source,
        }
    }

    pub fn list(&self) -> Result<Vec<StoredImage>, ImageStoreError> {
        let entries = match fs::read_dir(&self.dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(vec![]),
            Err(e) => return Err(self.io()(e)),
        };
        let mut images = Vec::new();
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.len() == 64 && name.bytes().all(|b| b.is_ascii_hexdigit()) {
                images.push(self.load(&name)?);
            }
        }
        images.sort_by(|a, b| {
            (&a.manifest.name, &a.manifest.version, &a.id).cmp(&(
                &b.manifest.name,
                &b.manifest.version,
                &b.id,
            ))
        });
        Ok(images)
    }

    fn load(&self, id: &str) -> Result<StoredImage, ImageStoreError> {
        let dir = self.dir.join(id);
        let bytes = fs::read(dir.join(MANIFEST_FILE)).map_err(self.io())?;
        let manifest: ImageManifest =
            serde_json::from_slice(&bytes).map_err(|source| ImageStoreError::Manifest {
                id: id.into(),
                source,
            })?;
        if manifest.manifest_version != MANIFEST_VERSION {
            return Err(ImageStoreError::ManifestVersion {
                id: id.into(),
                version: manifest.manifest_version,
            });
        }
        Ok(StoredImage {
            id: id.to_string(),
            manifest,
            dir,
        })
    }

    fn names_dir(&self) -> PathBuf {
        self.dir.join("names")
    }

    /// The id the name points to, if that image is still in the store.
    pub fn current_id(&self, name: &str) -> Option<String> {
        let id = fs::read_to_string(self.names_dir().join(name)).ok()?;
        let id = id.trim();
        let valid = id.len() == 64 && id.bytes().all(|b| b.is_ascii_hexdigit());
        (valid && self.dir.join(id).join(MANIFEST_FILE).is_file()).then(|| id.to_string())
    }

    /// Points the image's name at it: it becomes what the name resolves to.
    pub fn tag(&self, image: &StoredImage) -> Result<(), ImageStoreError> {
        let dir = self.names_dir();
        fs::create_dir_all(&dir).map_err(self.io())?;
        let name = &image.manifest.name;
        let tmp = dir.join(format!(".{name}.tmp"));
        let mut file = fs::File::create(&tmp).map_err(self.io())?;
        std::io::Write::write_all(&mut file, image.id.as_bytes()).map_err(self.io())?;
        file.sync_all().map_err(self.io())?;
        fs::rename(&tmp, dir.join(name)).map_err(self.io())
    }

    /// Finds an image by full id, by an id prefix of at least 8 characters, or
    /// by name (its newest build).
    pub fn resolve(&self, reference: &str) -> Result<StoredImage, ImageStoreError> {
        if let Some(id) = self.current_id(reference) {
            return self.load(&id);
        }
        let images = self.list()?;
        let newest = images
            .iter()
            .filter(|i| i.manifest.name == reference)
            .max_by_key(|i| fs::metadata(&i.dir).and_then(|m| m.modified()).ok());
        if let Some(image) = newest {
            return Ok(image.clone());
        }
        let matches: Vec<_> = images
            .iter()
            .filter(|i| reference.len() >= 8 && i.id.starts_with(reference))
            .collect();
        match matches.as_slice() {
            [one] => Ok((*one).clone()),
            [] => Err(ImageStoreError::NotFound {
                reference: reference.into(),
            }),
            _ => Err(ImageStoreError::Ambiguous {
                reference: reference.into(),
            }),
        }
    }

    /// A fresh staging directory inside the store, on the same filesystem.
    pub fn staging(&self) -> Result<tempfile::TempDir, ImageStoreError> {
        fs::create_dir_all(&self.dir).map_err(self.io())?;
        tempfile::Builder::new()
            .prefix(".staging-")
            .tempdir_in(&self.dir)
            .map_err(self.io())
    }

    /// Removes the staging dirs a crash left (of builds, imports and
    /// received images). Only while none is under way (at the daemon's start).
    pub fn sweep_staging(&self) {
        let Ok(entries) = fs::read_dir(&self.dir) else {
            return;
        };
        for entry in entries.flatten() {
            if entry.file_name().to_string_lossy().starts_with(".staging-") {
                match fs::remove_dir_all(entry.path()) {
                    Ok(()) => tracing::info!(
                        "removed {}, left by an interrupted build or import",
                        entry.path().display()
                    ),
                    Err(err) => tracing::warn!("cannot remove {}: {err}", entry.path().display()),
                }
            }
        }
    }

    /// Writes the manifest into a finished staging dir and moves it into place.
    /// An identical image already in the store wins; the staging dir is dropped.
    pub fn commit(
        &self,
        staging: tempfile::TempDir,
        manifest: &ImageManifest,
    ) -> Result<StoredImage, ImageStoreError> {
        let bytes = serde_json::to_vec_pretty(manifest).expect("invariant: manifests serialize");
        let id = sha256_bytes(&bytes);
        fs::write(staging.path().join(MANIFEST_FILE), &bytes).map_err(self.io())?;
        let dest = self.dir.join(&id);
        if !dest.exists() {
            let path = staging.keep();
            if let Err(e) = fs::rename(&path, &dest) {
                let _ = fs::remove_dir_all(&path);
                if !dest.exists() {
                    return Err(self.io()(e));
                }
            }
        }
        let image = self.load(&id)?;
        self.tag(&image)?;
        Ok(image)
    }

    /// Takes in an image received from elsewhere: `dir` (from
    /// [`ImageStore::staging`]) holds its files. The manifest must hash to
    /// `id` and every file must have the size and sha256 it names; then the
    /// directory moves into place as is. Anything else is refused and the
    /// directory removed.
    pub fn import(
        &self,
        id: &str,
        manifest: &[u8],
        dir: tempfile::TempDir,
    ) -> Result<StoredImage, ImageStoreError> {
        let mismatch = |reason: String| ImageStoreError::Mismatch {
            id: id.to_string(),
            reason,
        };
        if sha256_bytes(manifest) != id {
            return Err(mismatch("its manifest does not hash to its id".into()));
        }
        let parsed: ImageManifest =
            serde_json::from_slice(manifest).map_err(|source| ImageStoreError::Manifest {
                id: id.into(),
                source,
            })?;
        for file in [&parsed.initramfs, &parsed.rootfs] {
            if file.file.contains('/') || file.file.starts_with('.') {
                return Err(mismatch(format!("bad file name {:?}", file.file)));
            }
            let (sha256, size) = crate::util::sha256_file(&dir.path().join(&file.file))
                .map_err(|e| mismatch(format!("{}: {e}", file.file)))?;
            if sha256 != file.sha256 || size != file.size {
                return Err(mismatch(format!(
                    "{} has {size} bytes with sha256 {}, the manifest says {} bytes with sha256 {}",
                    file.file,
                    &sha256[..12],
                    file.size,
                    &file.sha256[..12.min(file.sha256.len())]
                )));
            }
        }
        fs::write(dir.path().join(MANIFEST_FILE), manifest).map_err(self.io())?;
        let dest = self.dir.join(id);
        if !dest.exists() {
            let path = dir.keep();
            if let Err(e) = fs::rename(&path, &dest) {
                let _ = fs::remove_dir_all(&path);
                if !dest.exists() {
                    return Err(self.io()(e));
                }
            }
        }
        self.load(id)
    }

    /// Removes an image. It leaves the store's view at once (renamed out of
    /// the id namespace), so a crash during the deletion never leaves a
    /// half-deleted image that resolves; leftovers of such a crash are swept
    /// by the next removal.
    pub fn remove(&self, id: &str) -> Result<(), ImageStoreError> {
        let image = self.resolve(id)?;
        let doomed = self.dir.join(format!(".deleting-{}", image.id));
        fs::rename(&image.dir, &doomed).map_err(self.io())?;
        if let Ok(entries) = fs::read_dir(&self.dir) {
            for entry in entries.flatten() {
                if entry
                    .file_name()
                    .to_string_lossy()
                    .starts_with(".deleting-")
                {
                    fs::remove_dir_all(entry.path()).map_err(self.io())?;
                }
            }
        }
        if self.current_id(&image.manifest.name).is_none() {
            let _ = fs::remove_file(self.names_dir().join(&image.manifest.name));
        }
        Ok(())
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use vroom_types::{ApplianceSpec, FileDigest, KernelRef};

    /// A manifest of image `fw` whose files are not checked.
    pub(crate) fn manifest(cmdline: &str) -> ImageManifest {
        let digest = |file: &str| FileDigest {
            file: file.into(),
            sha256: "0".repeat(64),
            size: 1,
        };
        ImageManifest {
            manifest_version: MANIFEST_VERSION,
            name: "fw".into(),
            version: "1.0".into(),
            kernel: KernelRef {
                package: "k".into(),
                version: "1".into(),
                release: "6.1".into(),
                sha256: "0".repeat(64),
                flavor: Default::default(),
                id: None,
            },
            initramfs: digest("initramfs.cpio"),
            rootfs: digest("rootfs.erofs"),
            cmdline: cmdline.into(),
            default_mem_mib: 128,
            min_mem_mib: 128,
            appliance: ApplianceSpec::default(),
            packages: vec![],
            init_sha256: None,
            oci: None,
        }
    }

    /// An image received from a peer goes in only as the very image its id
    /// names: the manifest's hash, each file's size and digest.
    #[test]
    fn an_imported_image_must_match_its_id_and_digests() {
        let from = tempfile::tempdir().unwrap();
        let store = ImageStore::new(from.path());
        let mut m = manifest("a");
        m.initramfs.sha256 = sha256_bytes(b"init");
        m.initramfs.size = 4;
        m.rootfs.sha256 = sha256_bytes(b"root!");
        m.rootfs.size = 5;
        let bytes = serde_json::to_vec_pretty(&m).unwrap();
        let id = sha256_bytes(&bytes);
        let received = |initramfs: &[u8]| {
            let dir = store.staging().unwrap();
            fs::write(dir.path().join("initramfs.cpio"), initramfs).unwrap();
            fs::write(dir.path().join("rootfs.erofs"), b"root!").unwrap();
            dir
        };
        let err = store.import(&id, &bytes, received(b"evil")).unwrap_err();
        assert!(
            err.to_string().contains("initramfs.cpio has 4 bytes"),
            "{err}"
        );
        let err = store
            .import(&"0".repeat(64), &bytes, received(b"init"))
            .unwrap_err();
        assert!(err.to_string().contains("does not hash"), "{err}");
        assert!(
            store.list().unwrap().is_empty(),
            "a refused image stays out"
        );
        let image = store.import(&id, &bytes, received(b"init")).unwrap();
        assert_eq!(image.id, id);
        assert_eq!(store.resolve(&id).unwrap().manifest, m);
        let leftovers = fs::read_dir(from.path())
            .unwrap()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with(".staging"))
            .count();
        assert_eq!(leftovers, 0, "no staging dir is left behind");
    }

    /// Defect 8: two builds of one recipe version; the newer one must win
    /// whichever way their ids sort.
    #[test]
    fn a_name_resolves_to_its_newest_build_whatever_the_ids() {
        for newer_sorts_lower in [true, false] {
            let dir = tempfile::tempdir().unwrap();
            let store = ImageStore::new(dir.path());
            let first = store
                .commit(store.staging().unwrap(), &manifest("a"))
                .unwrap();
            let mut n = 0;
            let second = loop {
                let m = manifest(&format!("b{n}"));
                let id = sha256_bytes(&serde_json::to_vec_pretty(&m).unwrap());
                if (id < first.id) == newer_sorts_lower {
                    break store.commit(store.staging().unwrap(), &m).unwrap();
                }
                n += 1;
            };
            assert_eq!(store.resolve("fw").unwrap().id, second.id);
            assert_eq!(store.current_id("fw"), Some(second.id.clone()));
            // Finding an older build again (a build cache hit) makes it current.
            store.tag(&first).unwrap();
            assert_eq!(store.resolve("fw").unwrap().id, first.id);
            // Removing the current build leaves the name to the other one.
            store.remove(&first.id).unwrap();
            assert_eq!(store.resolve("fw").unwrap().id, second.id);
            // A removal cut short by a crash is invisible and swept by the next one.
            let torn = dir.path().join(format!(".deleting-{}", "a".repeat(64)));
            fs::create_dir_all(torn.join("x")).unwrap();
            assert_eq!(store.list().unwrap().len(), 1);
            store.remove(&second.id).unwrap();
            assert!(!torn.exists());
            assert!(store.list().unwrap().is_empty());
        }
    }
}
