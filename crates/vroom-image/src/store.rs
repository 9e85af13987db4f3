//! The content-addressed image store: `<dir>/<id>/` with `manifest.json`,
//! `initramfs.cpio` and `rootfs.erofs`, where `<id>` is the sha256 of the
//! manifest bytes. Entries are created by renaming a finished staging
//! directory into place, so a half-built image is never visible.

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

    /// Finds an image by full id, by an id prefix of at least 8 characters, or
    /// by name (the highest version of that name).
    pub fn resolve(&self, reference: &str) -> Result<StoredImage, ImageStoreError> {
        let images = self.list()?;
        if let Some(image) = images.iter().rev().find(|i| i.manifest.name == reference) {
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
        self.load(&id)
    }

    pub fn remove(&self, id: &str) -> Result<(), ImageStoreError> {
        let image = self.resolve(id)?;
        fs::remove_dir_all(&image.dir).map_err(self.io())
    }
}
