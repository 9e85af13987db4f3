//! The image source the daemon boots from: the local store, plus the kernel
//! cache that images reference. Built-in images are built on first use.

use std::path::PathBuf;
use std::sync::Mutex;

use vroom_base::LockExt;
use vroom_core::images::{BootImage, BuildFromRecipeError, ImageSource, ResolveImageError};
use vroom_types::{package_changes, BuildReport, ImageSummary};

use crate::build::{build_recipe, BuildRecipeError, RecipeInputs};
use crate::builtin::{catalog, in_catalog, write_bundled_recipe};
use crate::kernel::{KernelCache, KernelChoice};
use crate::store::{ImageStore, ImageStoreError, StoredImage};
use vroom_core::error::chain;

pub struct LocalImages {
    pub store: ImageStore,
    pub kernels: KernelCache,
    /// The static vroom-init binary images are made with.
    pub init: PathBuf,
    /// Downloaded packages, kept by digest across builds.
    pub deb_cache: PathBuf,
    build: Mutex<()>,
    /// The init's digest, keyed by its size and mtime: resolving an image
    /// (every launch) compares it without hashing the file again.
    init_digest: Mutex<Option<(u64, std::time::SystemTime, String)>>,
}

impl LocalImages {
    pub fn new(store: ImageStore, kernels: KernelCache, init: PathBuf, deb_cache: PathBuf) -> Self {
        LocalImages {
            store,
            kernels,
            init,
            deb_cache,
            build: Mutex::new(()),
            init_digest: Mutex::new(None),
        }
    }

    /// Builds a built-in image from its bundled recipe (or finds it in the store).
    pub fn ensure_builtin(&self, name: &str) -> Result<StoredImage, ResolveImageError> {
        let failed = |message: String| ResolveImageError::Other {
            message: format!("cannot build image {name}: {message}"),
        };
        let dir = tempfile::tempdir().map_err(|e| failed(e.to_string()))?;
        let recipe = match write_bundled_recipe(name, dir.path()) {
            Some(written) => written.map_err(|e| failed(e.to_string()))?,
            None => {
                return Err(ResolveImageError::NotFound {
                    reference: name.into(),
                    catalog: catalog().join(", "),
                })
            }
        };
        let _guard = self.build.lock_unpoisoned();
        if let Ok(image) = self.store.resolve(name) {
            if name != AUTO_REBUILT || !self.built_with_older_init(&image) {
                return Ok(image);
            }
            tracing::info!(
                image = name,
                "rebuilding: this vroom carries a newer vroom-init"
            );
        }
        crate::init_check::check_init_file(&self.init).map_err(|e| failed(e.to_string()))?;
        let kernel = self.kernels.choose(&KernelChoice::Default).map_err(|_| {
            ResolveImageError::KernelMissing {
                image: name.into(),
                release: "(none cached)".into(),
            }
        })?;
        let loaded = crate::recipe::load(&recipe).map_err(|e| failed(chain(&e)))?;
        let inputs = RecipeInputs {
            kernel: &kernel,
            init: &self.init,
            deb_cache: &self.deb_cache,
        };
        let outcome = build_recipe(
            &loaded,
            &inputs,
            &self.store,
            false,
            &mut |stage, detail| tracing::info!(image = name, "{stage}: {detail}"),
        )
        .map_err(|e| match e {
            // Fetched from Debian's mirror: its failure is not this host's.
            crate::build::BuildRecipeError::Resolve(_)
            | crate::build::BuildRecipeError::Download(_) => ResolveImageError::Upstream {
                message: format!("cannot build image {name}: {}", chain(&e)),
            },
            e => failed(chain(&e)),
        })?;
        let image = outcome.image;
        self.store.tag(&image).map_err(|e| failed(chain(&e)))?;
        Ok(image)
    }

    /// Removes what a crash left half-made: staging dirs and half-fetched
    /// layers. Only while nothing is built, imported or received (at the
    /// daemon's start).
    pub fn sweep_leftovers(&self) {
        self.store.sweep_staging();
        crate::oci::blobs::BlobCache::new(self.store.dir()).sweep();
    }

    /// Removes the cached layers no imported image names any more. Never
    /// while an import runs (it may be fetching layers no image names
    /// yet) and never waiting for one: the next removal collects them.
    pub fn collect_layers(&self) {
        let Ok(_guard) = self.build.try_lock() else {
            return;
        };
        let Ok(images) = self.store.list() else {
            return;
        };
        let kept: std::collections::BTreeSet<&str> = images
            .iter()
            .filter_map(|i| i.manifest.oci.as_ref())
            .flat_map(|o| o.layers.iter().map(String::as_str))
            .collect();
        let cache = crate::oci::blobs::BlobCache::new(self.store.dir());
        for digest in cache.list() {
            if kept.contains(digest.as_str()) {
                continue;
            }
            if let Ok(path) = cache.path(&digest) {
                match std::fs::remove_file(&path) {
                    Ok(()) => tracing::info!(layer = %digest, "removed a layer no image uses"),
                    Err(err) => tracing::warn!(layer = %digest, "cannot remove: {err}"),
                }
            }
        }
    }

    /// Whether the image's `/init` differs from the vroom-init this vroom
    /// packs now (images from before the digest was recorded count as older).
    pub fn built_with_older_init(&self, image: &StoredImage) -> bool {
        let current = self.current_init_digest();
        current.is_some() && image.manifest.init_sha256 != current
    }

    fn current_init_digest(&self) -> Option<String> {
        let meta = std::fs::metadata(&self.init).ok()?;
        let key = (meta.len(), meta.modified().ok()?);
        let mut cached = self.init_digest.lock_unpoisoned();
        if let Some((len, mtime, digest)) = cached.as_ref() {
            if (*len, *mtime) == key {
                return Some(digest.clone());
            }
        }
        let (digest, _) = crate::util::sha256_file(&self.init).ok()?;
        *cached = Some((key.0, key.1, digest.clone()));
        Some(digest)
    }

    fn boot_image(&self, image: StoredImage) -> Result<BootImage, ResolveImageError> {
        let kernel = &image.manifest.kernel;
        let found = self
            .kernels
            .find(kernel)
            .ok_or_else(|| ResolveImageError::KernelMissing {
                image: image.manifest.name.clone(),
                release: kernel.release.clone(),
            })?;
        Ok(BootImage {
            initramfs: image.initramfs(),
            rootfs: image.rootfs(),
            kernel: found.vmlinuz,
            id: image.id,
            manifest: image.manifest,
        })
    }
}

/// The demo's image, which vroom rebuilds by itself when it carries a newer
/// vroom-init; other images may be the user's own builds under a catalog
/// name, so they only get a warning.
const AUTO_REBUILT: &str = "hello";

fn store_error(e: ImageStoreError) -> ResolveImageError {
    match e {
        ImageStoreError::NotFound { reference } => ResolveImageError::NotFound {
            reference,
            catalog: catalog().join(", "),
        },
        e => ResolveImageError::Other {
            message: e.to_string(),
        },
    }
}

impl ImageSource for LocalImages {
    fn import_oci(
        &self,
        request: &vroom_types::ImportImageRequest,
        owner: Option<u32>,
        progress: &mut dyn FnMut(&str, &str),
    ) -> Result<BuildReport, BuildFromRecipeError> {
        let user = |message: String| BuildFromRecipeError::Recipe {
            message: format!("cannot import {}: {message}", request.reference),
        };
        let reference: crate::oci::ImportReference =
            request.reference.parse().map_err(|e| user(chain(&e)))?;
        let choice: KernelChoice = request
            .kernel
            .as_deref()
            .unwrap_or_default()
            .parse()
            .map_err(user)?;
        crate::init_check::check_init_file(&self.init).map_err(|e| {
            BuildFromRecipeError::Build {
                message: e.to_string(),
            }
        })?;
        let kernel = self.kernels.choose(&choice).map_err(user)?;
        let _guard = self.build.lock_unpoisoned();
        let req = crate::oci::ImportRequest {
            reference: &reference,
            name: request.name.as_ref().map(|n| n.to_string()),
            insecure: request.insecure,
            owner,
            kernel: &kernel,
            init: &self.init,
        };
        let outcome = crate::oci::import_image(&req, &self.store, &mut |stage, detail| {
            progress(stage, &detail)
        })
        .map_err(|e| BuildFromRecipeError::Import {
            code: e.code(),
            message: format!("cannot import {reference}: {}", chain(&e)),
        })?;
        Ok(BuildReport {
            image: outcome.image.summary(),
            cached: outcome.cached,
            changes: vec![],
        })
    }

    fn build(
        &self,
        recipe: &std::path::Path,
        update: bool,
        kernel: Option<&str>,
        owner: Option<u32>,
        progress: &mut dyn FnMut(&str, &str),
    ) -> Result<BuildReport, BuildFromRecipeError> {
        let choice: KernelChoice = kernel
            .unwrap_or_default()
            .parse()
            .map_err(|message| BuildFromRecipeError::Recipe { message })?;
        // A bare catalog name builds the recipe bundled into this binary.
        let bundled_dir;
        let mut owner = owner;
        let recipe = match recipe.to_str().filter(|r| !r.contains('/')) {
            Some(name) => {
                // Unpacked by vroomd itself: anyone may build the catalog.
                owner = None;
                bundled_dir = tempfile::tempdir().map_err(|e| BuildFromRecipeError::Build {
                    message: format!("cannot unpack the catalog recipe {name}: {e}"),
                })?;
                match write_bundled_recipe(name, bundled_dir.path()) {
                    Some(Ok(path)) => path,
                    Some(Err(e)) => {
                        return Err(BuildFromRecipeError::Build {
                            message: format!("cannot unpack the catalog recipe {name}: {e}"),
                        })
                    }
                    None => {
                        return Err(BuildFromRecipeError::Recipe {
                            message: format!(
                            "{name:?} is neither an absolute recipe path nor a catalog recipe ({})",
                            catalog().join(", ")
                        ),
                        })
                    }
                }
            }
            None => recipe.to_path_buf(),
        };
        let path = if recipe.is_dir() {
            recipe.join("recipe.toml")
        } else {
            recipe
        };
        let loaded = crate::recipe::load_owned(&path, owner)
            .map_err(|e| BuildFromRecipeError::Recipe { message: chain(&e) })?;
        crate::init_check::check_init_file(&self.init).map_err(|e| {
            BuildFromRecipeError::Build {
                message: e.to_string(),
            }
        })?;
        let kernel = self
            .kernels
            .choose(&choice)
            .map_err(|message| BuildFromRecipeError::Recipe { message })?;
        progress(
            "kernel",
            &match &kernel.reference.id {
                Some(id) => format!("vroom {id} ({})", kernel.reference.release),
                None => format!("debian {}", kernel.reference.release),
            },
        );
        let _guard = self.build.lock_unpoisoned();
        let inputs = RecipeInputs {
            kernel: &kernel,
            init: &self.init,
            deb_cache: &self.deb_cache,
        };
        let before = self.store.resolve(&loaded.recipe.name).ok();
        let outcome = build_recipe(
            &loaded,
            &inputs,
            &self.store,
            update,
            &mut |stage, detail| progress(&stage.to_string(), &detail),
        )
        .map_err(|e| match e {
            BuildRecipeError::Resolve(ref inner)
                if !matches!(inner, crate::apt::ResolvePackagesError::Apt { .. }) =>
            {
                BuildFromRecipeError::Recipe {
                    message: format!("{}: {}", path.display(), chain(inner)),
                }
            }
            // The recipe asks for what the chosen kernel has not got.
            e @ BuildRecipeError::Image(crate::BuildImageError::KernelLacks { .. }) => {
                BuildFromRecipeError::Recipe {
                    message: e.to_string(),
                }
            }
            e => BuildFromRecipeError::Build { message: chain(&e) },
        })?;
        // A cache hit may be an older build: building it again makes it current.
        self.store
            .tag(&outcome.image)
            .map_err(|e| BuildFromRecipeError::Build { message: chain(&e) })?;
        let changes = match &before {
            Some(before) => {
                package_changes(&before.manifest.packages, &outcome.image.manifest.packages)
            }
            None => vec![],
        };
        Ok(BuildReport {
            image: outcome.image.summary(),
            cached: outcome.cached,
            changes,
        })
    }

    fn resolve(&self, reference: &str) -> Result<BootImage, ResolveImageError> {
        let image = match self.store.resolve(reference) {
            Ok(image) => image,
            Err(ImageStoreError::NotFound { .. }) if in_catalog(reference) => {
                self.ensure_builtin(reference)?
            }
            Err(e) => return Err(store_error(e)),
        };
        if self.built_with_older_init(&image) && image.manifest.name != AUTO_REBUILT {
            tracing::warn!(
                image = %image.manifest.name,
                "image was built with another vroom-init than this vroom carries; rebuild it with `vroom image build`"
            );
        }
        self.boot_image(image)
    }

    fn find(&self, reference: &str) -> Result<ImageSummary, ResolveImageError> {
        let image = self.store.resolve(reference).map_err(store_error)?;
        let mut summary = image.summary();
        summary.current =
            self.store.current_id(&image.manifest.name).as_deref() == Some(image.id.as_str());
        Ok(summary)
    }

    fn remove(&self, id: &str) -> Result<(), ResolveImageError> {
        self.store.remove(id).map_err(store_error)?;
        self.collect_layers();
        Ok(())
    }

    fn export(&self, id: &str) -> Result<vroom_core::images::ImageExport, ResolveImageError> {
        let image = self.store.resolve(id).map_err(store_error)?;
        if image.id != id {
            return Err(store_error(ImageStoreError::NotFound {
                reference: id.into(),
            }));
        }
        let manifest = std::fs::read(image.dir.join(crate::store::MANIFEST_FILE)).map_err(|e| {
            store_error(ImageStoreError::Io {
                path: image.dir.clone(),
                source: e,
            })
        })?;
        let mut files = vec![
            (image.manifest.initramfs.file.clone(), image.initramfs()),
            (image.manifest.rootfs.file.clone(), image.rootfs()),
        ];
        // vroom's kernel goes along: another host's build of it would
        // differ byte for byte, and images pin it by digest.
        if image.manifest.kernel.flavor == vroom_types::KernelFlavor::Vroom {
            let kernel = self
                .kernels
                .find_own(&image.manifest.kernel)
                .ok_or_else(|| ResolveImageError::KernelMissing {
                    image: image.manifest.name.clone(),
                    release: image.manifest.kernel.release.clone(),
                })?;
            files.extend(KernelCache::own_files(&kernel));
        }
        Ok(vroom_core::images::ImageExport { manifest, files })
    }

    fn receiving(&self) -> Result<tempfile::TempDir, ResolveImageError> {
        self.store.staging().map_err(store_error)
    }

    fn import(
        &self,
        id: &str,
        manifest: &[u8],
        dir: tempfile::TempDir,
    ) -> Result<ImageSummary, ResolveImageError> {
        let parsed: vroom_types::ImageManifest =
            serde_json::from_slice(manifest).map_err(|e| ResolveImageError::Other {
                message: format!("image {id}: its manifest does not read: {e}"),
            })?;
        if parsed.kernel.flavor == vroom_types::KernelFlavor::Vroom {
            // Checked against the manifest's digest here; the manifest is
            // checked against the id by the store, and nothing boots until
            // both are in.
            if crate::util::sha256_bytes(manifest) != id {
                return Err(ResolveImageError::Other {
                    message: format!("image {id}: its manifest does not hash to its id"),
                });
            }
            self.kernels
                .adopt_own(&parsed.kernel, dir.path())
                .map_err(|message| ResolveImageError::Other {
                    message: format!("image {id}: {message}"),
                })?;
        }
        Ok(self
            .store
            .import(id, manifest, dir)
            .map_err(store_error)?
            .summary())
    }

    fn list(&self) -> Result<Vec<ImageSummary>, ResolveImageError> {
        Ok(self
            .store
            .list()
            .map_err(store_error)?
            .iter()
            .map(|image| {
                let mut summary = image.summary();
                summary.current = self.store.current_id(&image.manifest.name).as_deref()
                    == Some(image.id.as_str());
                summary
            })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use std::fs;

    use vroom_types::{ApplianceSpec, FileDigest, ImageManifest};

    use super::*;
    use crate::util::sha256_bytes;

    fn images(dir: &std::path::Path) -> LocalImages {
        LocalImages::new(
            ImageStore::new(&dir.join("images")),
            KernelCache::new(&dir.join("cache")),
            dir.join("init"),
            dir.join("debs"),
        )
    }

    /// Cached layers go with the last imported image that names them.
    #[test]
    fn layers_are_removed_with_the_last_image_that_has_them() {
        let dir = tempfile::tempdir().unwrap();
        let local = images(dir.path());
        let cache = crate::oci::blobs::BlobCache::new(local.store.dir());
        let layer = |n: u8| format!("sha256:{}", sha256_bytes(&[n]));
        fs::create_dir_all(cache.path(&layer(0)).unwrap().parent().unwrap()).unwrap();
        for n in 0..3 {
            fs::write(cache.path(&layer(n)).unwrap(), [n]).unwrap();
        }
        let commit = |name: &str, layers: Vec<String>| {
            let mut manifest = crate::store::tests::manifest("");
            manifest.name = name.into();
            manifest.oci = Some(vroom_types::OciOrigin {
                reference: format!("oci:/{name}"),
                digest: layer(9),
                config_digest: layer(9),
                layers,
                exposed_ports: vec![],
                volumes: vec![],
            });
            local
                .store
                .commit(local.store.staging().unwrap(), &manifest)
                .unwrap()
        };
        let a = commit("a", vec![layer(0), layer(1)]);
        let b = commit("b", vec![layer(0)]);
        let cached = || {
            let mut list = cache.list();
            list.sort();
            list
        };
        let mut all = vec![layer(0), layer(1), layer(2)];
        all.sort();
        assert_eq!(cached(), all);
        local.remove(&a.id).unwrap();
        assert_eq!(cached(), vec![layer(0)], "b's layer stays");
        local.remove(&b.id).unwrap();
        assert!(cached().is_empty());
    }

    /// An image for vroom's kernel moves to another host with its kernel
    /// (another host's build of it would differ), checked against the
    /// digest the image pins; a kernel that does not match is refused.
    #[test]
    fn an_image_for_vrooms_kernel_travels_with_it() {
        let a_dir = tempfile::tempdir().unwrap();
        let a = images(a_dir.path());
        let fragment = crate::Fragment::parse("CONFIG_BLOCK=y\n").unwrap();
        let kernel =
            crate::kernel::fake_own_kernel(&a.kernels, &fragment, "6.1.1-1", b"vmlinux of a");
        let staging = a.store.staging().unwrap();
        let digest = |file: &str, bytes: &[u8]| {
            fs::write(staging.path().join(file), bytes).unwrap();
            FileDigest {
                file: file.into(),
                sha256: sha256_bytes(bytes),
                size: bytes.len() as u64,
            }
        };
        let manifest = ImageManifest {
            manifest_version: vroom_types::MANIFEST_VERSION,
            name: "hello".into(),
            version: "1".into(),
            kernel: kernel.clone(),
            initramfs: digest("initramfs.cpio", b"init"),
            rootfs: digest("rootfs.erofs", b"root"),
            cmdline: String::new(),
            default_mem_mib: 64,
            min_mem_mib: 64,
            appliance: ApplianceSpec::default(),
            packages: vec![],
            init_sha256: None,
            oci: None,
        };
        let image = a.store.commit(staging, &manifest).unwrap();
        let export = a.export(&image.id).unwrap();
        assert_eq!(export.files.len(), 5, "{:?}", export.files);

        let send = |to: &LocalImages, tamper: bool| {
            let dir = to.receiving().unwrap();
            for (name, path) in &export.files {
                let mut bytes = fs::read(path).unwrap();
                if tamper && name == "kernel.vmlinux" {
                    bytes.extend_from_slice(b" and more");
                }
                fs::write(dir.path().join(name), bytes).unwrap();
            }
            to.import(&image.id, &export.manifest, dir)
        };
        let b_dir = tempfile::tempdir().unwrap();
        let b = images(b_dir.path());
        let err = send(&b, true).unwrap_err().to_string();
        assert!(err.contains("the image pins"), "{err}");
        assert!(b.kernels.own().is_empty() && b.store.list().unwrap().is_empty());

        send(&b, false).unwrap();
        let boot = b.resolve(&image.id).unwrap();
        assert!(boot.kernel.starts_with(b_dir.path()), "{:?}", boot.kernel);
        assert_eq!(fs::read(&boot.kernel).unwrap(), b"vmlinux of a");
        let stored = b.store.resolve(&image.id).unwrap();
        assert!(
            !stored.dir.join("kernel.vmlinux").exists(),
            "the kernel goes to the cache, not into the image"
        );
    }
}
