//! Building an image from a recipe: resolve → download → extract → trim →
//! pack. No maintainer script runs on the host; what an appliance needs from
//! them is declared in the recipe (files, dirs, users).

use std::fmt;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;

use vroom_types::PackageEntry;

use crate::apt::{self, DownloadPackagesError, ResolvePackagesError};
use crate::builtin::BuildImageError;
use crate::kernel::Kernel;
use crate::pack::{pack_and_commit, ImageMeta};
use crate::recipe::{LoadedRecipe, MAX_RECIPE_INPUT_BYTES, MAX_SOURCE_BYTES};
use crate::store::{ImageStore, StoredImage};
use crate::util::run;
use vroom_core::input::open_input;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    Resolve,
    Download,
    Extract,
    Trim,
    Pack,
}

impl fmt::Display for Stage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Stage::Resolve => "resolve",
            Stage::Download => "download",
            Stage::Extract => "extract",
            Stage::Trim => "trim",
            Stage::Pack => "pack",
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum BuildRecipeError {
    #[error("resolve failed")]
    Resolve(#[from] ResolvePackagesError),
    #[error("download failed")]
    Download(#[from] DownloadPackagesError),
    #[error("cannot extract {package}: {reason}")]
    Extract { package: String, reason: String },
    #[error("cannot stage {what}")]
    Stage {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Image(#[from] BuildImageError),
}

pub struct RecipeInputs<'a> {
    pub kernel: &'a Kernel,
    pub init: &'a Path,
    /// Where downloaded packages are kept, by digest, across builds.
    pub deb_cache: &'a Path,
}

/// Paths removed from every image: documentation, manuals, translations and
/// package-manager state that a read-only appliance never uses.
/// Copyright files stay (they travel with the binaries).
const TRIM: &[&str] = &[
    "usr/share/man",
    "usr/share/info",
    "usr/share/locale",
    "usr/share/lintian",
    "usr/share/linda",
    "usr/share/bug",
    "usr/share/doc-base",
    "usr/share/menu",
    "var/cache/apt",
    "var/lib/apt",
    "var/cache/debconf",
];

/// What a build did.
pub struct BuildOutcome {
    pub image: StoredImage,
    /// The recipe, its packages and the toolchain were unchanged: nothing was built.
    pub cached: bool,
}

pub fn build_recipe(
    loaded: &LoadedRecipe,
    inputs: &RecipeInputs<'_>,
    store: &ImageStore,
    update: bool,
    progress: &mut dyn FnMut(Stage, String),
) -> Result<BuildOutcome, BuildRecipeError> {
    let recipe = &loaded.recipe;
    let stage_err = |what: &str| {
        let what = what.to_string();
        move |source| BuildRecipeError::Stage { what, source }
    };
    if update {
        progress(Stage::Resolve, "refreshing the package indexes".into());
        apt::update()?;
    }
    let refreshed = if update { "indexes refreshed, " } else { "" };
    // Equal inputs give an equal image, so an unchanged recipe is not rebuilt.
    // With unchanged package indexes the resolve would give the same closure,
    // so the quick key (before resolving) already finds the image.
    let base = inputs_digest(loaded, inputs).map_err(stage_err("the build key"))?;
    let quick_key = digest(&[
        base.as_bytes(),
        apt::index_fingerprint()
            .map_err(stage_err("the package indexes"))?
            .as_bytes(),
    ]);
    let cache_dir = store.dir().join(".build-cache");
    let cached = |key: &str| {
        fs::read_to_string(cache_dir.join(key))
            .ok()
            .and_then(|id| store.resolve(id.trim()).ok())
    };
    if let Some(image) = cached(&format!("indexes-{quick_key}")) {
        progress(
            Stage::Resolve,
            format!(
                "{refreshed}unchanged recipe and indexes: image {}",
                &image.id[..12]
            ),
        );
        return Ok(BuildOutcome {
            image,
            cached: true,
        });
    }
    let names: Vec<&str> = recipe.debian.packages.iter().map(|p| p.name()).collect();
    progress(Stage::Resolve, format!("{} requested", names.len()));
    let packages = apt::resolve(&names)?;
    let pruned: Vec<&str> = recipe.debian.prune.iter().map(String::as_str).collect();
    let packages = apt::prune(packages, &names, &pruned)?;
    progress(
        Stage::Resolve,
        format!("{refreshed}{} packages in the closure", packages.len()),
    );

    let closure: Vec<String> = packages
        .iter()
        .map(|p| format!("{} {} {}", p.name, p.version, p.sha256))
        .collect();
    let key = digest(&[base.as_bytes(), closure.join("\n").as_bytes()]);
    let remember = |image: &StoredImage| {
        let written = fs::create_dir_all(&cache_dir).and_then(|()| {
            fs::write(cache_dir.join(&key), &image.id)?;
            fs::write(cache_dir.join(format!("indexes-{quick_key}")), &image.id)
        });
        if let Err(err) = written {
            // Only the next build's speed depends on it.
            tracing::warn!("cannot record the build cache entry: {err}");
        }
    };
    if let Some(image) = cached(&key) {
        remember(&image);
        progress(Stage::Pack, format!("unchanged: image {}", &image.id[..12]));
        return Ok(BuildOutcome {
            image,
            cached: true,
        });
    }

    let total: u64 = packages.iter().map(|p| p.size).sum();
    progress(
        Stage::Download,
        format!("{} packages, {:.1} MB", packages.len(), total as f64 / 1e6),
    );
    let debs = apt::download(&packages, inputs.deb_cache)?;

    let stage = stage_err;
    let tree = tempfile::tempdir().map_err(stage("a temporary root"))?;
    let root = tree.path();
    progress(Stage::Extract, format!("{} packages", debs.len()));
    for (package, deb) in packages.iter().zip(&debs) {
        run(Command::new("dpkg-deb").arg("-x").arg(deb).arg(root)).map_err(|reason| {
            BuildRecipeError::Extract {
                package: package.name.clone(),
                reason,
            }
        })?;
    }

    progress(Stage::Trim, "docs, manuals, locales, caches".into());
    for spec in &recipe.debian.packages {
        for path in spec.excludes() {
            remove(&root.join(path.trim_start_matches('/'))).map_err(stage(path))?;
        }
    }
    for path in TRIM {
        remove(&root.join(path)).map_err(stage(path))?;
    }
    trim_docs(&root.join("usr/share/doc")).map_err(stage("usr/share/doc"))?;
    apply_declarations(loaded, root).map_err(stage("the recipe's files"))?;

    progress(Stage::Pack, "erofs root and initramfs".into());
    let meta = ImageMeta {
        name: recipe.name.clone(),
        version: recipe.version.clone(),
        default_mem_mib: loaded.default_mem_mib,
        min_mem_mib: loaded.min_mem_mib,
        appliance: loaded.appliance(),
        modules: recipe.modules.clone(),
        packages: packages
            .iter()
            .map(|p| PackageEntry {
                name: p.name.clone(),
                version: p.version.clone(),
                source: p.source.clone(),
                sha256: p.sha256.clone(),
            })
            .collect(),
    };
    let image = pack_and_commit(root, meta, inputs.kernel, inputs.init, store)?;
    remember(&image);
    Ok(BuildOutcome {
        image,
        cached: false,
    })
}

/// The digest of what an image is made from besides its packages: this
/// builder's version, the recipe file and every file it references (not the
/// rest of its directory), the kernel and vroom-init. Files are opened as
/// untrusted input (regular, one link, capped) and hashed as they stream.
fn inputs_digest(loaded: &LoadedRecipe, inputs: &RecipeInputs<'_>) -> std::io::Result<String> {
    use sha2::{Digest, Sha256};
    let files = loaded.input_files().map_err(std::io::Error::other)?;
    let mut fields: Vec<Vec<u8>> = vec![
        b"vroom-build-2".to_vec(),
        env!("CARGO_PKG_VERSION").as_bytes().to_vec(),
        inputs.kernel.reference.sha256.as_bytes().to_vec(),
        crate::util::sha256_file(inputs.init)?.0.into_bytes(),
    ];
    let mut total = 0u64;
    for (relative, path) in &files {
        let mut file =
            open_input(path, MAX_SOURCE_BYTES, loaded.owner).map_err(std::io::Error::other)?;
        total += file.size();
        if total > MAX_RECIPE_INPUT_BYTES {
            return Err(std::io::Error::other(format!(
                "the files the recipe references exceed {} MiB together",
                MAX_RECIPE_INPUT_BYTES >> 20
            )));
        }
        let mut hasher = Sha256::new();
        file.copy_to(&mut hasher).map_err(std::io::Error::other)?;
        fields.push(relative.as_bytes().to_vec());
        fields.push(hasher.finalize().to_vec());
    }
    Ok(digest(
        &fields.iter().map(Vec::as_slice).collect::<Vec<_>>(),
    ))
}

/// sha256 over length-prefixed fields, so that no two field lists collide.
fn digest(fields: &[&[u8]]) -> String {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    for field in fields {
        h.update((field.len() as u64).to_le_bytes());
        h.update(field);
    }
    crate::util::hex(&h.finalize())
}

fn remove(path: &Path) -> std::io::Result<()> {
    match fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => fs::remove_dir_all(path),
        Ok(_) => fs::remove_file(path),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

/// Keeps only `copyright` files under usr/share/doc.
fn trim_docs(doc: &Path) -> std::io::Result<()> {
    let Ok(entries) = fs::read_dir(doc) else {
        return Ok(());
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if entry.file_type()?.is_dir() {
            for file in fs::read_dir(&path)?.flatten() {
                if file.file_name() != "copyright" {
                    remove(&file.path())?;
                }
            }
        } else {
            remove(&path)?;
        }
    }
    Ok(())
}

/// The recipe's dirs, files and users.
fn apply_declarations(loaded: &LoadedRecipe, root: &Path) -> std::io::Result<()> {
    let recipe = &loaded.recipe;
    for dir in &recipe.dirs {
        fs::create_dir_all(root.join(dir.trim_start_matches('/')))?;
    }
    for file in &recipe.files {
        let dest = root.join(file.path.trim_start_matches('/'));
        if let Some(parent) = dest.parent() {
            fs::create_dir_all(parent)?;
        }
        match (&file.content, &file.source) {
            (Some(content), _) => fs::write(&dest, content)?,
            (None, Some(source)) => {
                let path = loaded.source_path(source).map_err(std::io::Error::other)?;
                let mut input = open_input(&path, MAX_SOURCE_BYTES, loaded.owner)
                    .map_err(std::io::Error::other)?;
                let mut out = fs::File::create(&dest)?;
                input.copy_to(&mut out).map_err(std::io::Error::other)?;
            }
            (None, None) => {}
        }
        let mode = file
            .mode
            .as_deref()
            .and_then(|m| u32::from_str_radix(m, 8).ok())
            .unwrap_or(0o644);
        fs::set_permissions(&dest, fs::Permissions::from_mode(mode))?;
    }
    for link in &recipe.symlinks {
        for path in &link.paths {
            let dest = root.join(path.trim_start_matches('/'));
            if let Some(parent) = dest.parent() {
                fs::create_dir_all(parent)?;
            }
            if fs::symlink_metadata(&dest).is_ok() {
                fs::remove_file(&dest)?;
            }
            std::os::unix::fs::symlink(&link.target, &dest)?;
        }
    }
    fs::create_dir_all(root.join("etc"))?;
    let read = |name: &str, base: &str| {
        fs::read_to_string(root.join("etc").join(name)).unwrap_or_else(|_| base.to_string())
    };
    let mut passwd = read("passwd", "root:x:0:0:root:/root:/bin/sh\n");
    let mut group = read("group", "root:x:0:\n");
    for user in &recipe.users {
        let gid = user.gid.unwrap_or(user.uid);
        let home = user.home.as_deref().unwrap_or("/nonexistent");
        passwd.push_str(&format!(
            "{}:x:{}:{gid}:{}:{home}:/usr/sbin/nologin\n",
            user.name, user.uid, user.name
        ));
        if !group
            .lines()
            .any(|l| l.split(':').nth(2) == Some(&gid.to_string()))
        {
            group.push_str(&format!("{}:x:{gid}:\n", user.name));
        }
    }
    fs::write(root.join("etc/passwd"), passwd)?;
    fs::write(root.join("etc/group"), group)
}
