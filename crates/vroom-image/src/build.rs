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
use vroom_input::open_input;

use crate::inroot;

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
    match build_once(loaded, inputs, store, update, progress) {
        // The mirror drops a version when a newer one (a security update)
        // is published: indexes older than that resolve to files that are
        // gone. Refresh them and resolve again, once.
        Err(BuildRecipeError::Download(DownloadPackagesError::Download { .. })) if !update => {
            progress(
                Stage::Resolve,
                "the mirror no longer has a resolved version; refreshing the package indexes"
                    .into(),
            );
            build_once(loaded, inputs, store, true, progress)
        }
        other => other,
    }
}

fn build_once(
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
    // Before anything is downloaded: the kernel has what the image needs.
    let modules: Vec<&str> = crate::pack::BASE_MODULES
        .iter()
        .copied()
        .chain(recipe.modules.iter().map(String::as_str))
        .collect();
    crate::pack::check_kernel(&recipe.name, inputs.kernel, &modules)?;
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
            remove_in_root(root, path).map_err(stage(path))?;
        }
    }
    for path in TRIM {
        remove_in_root(root, path).map_err(stage(path))?;
    }
    match inroot::resolve(root, "usr/share/doc") {
        Ok(doc) if !fs::symlink_metadata(&doc).is_ok_and(|m| m.is_symlink()) => {
            trim_docs(&doc).map_err(stage("usr/share/doc"))?
        }
        _ => {}
    }
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
        keep_owners: false,
        oci: None,
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
pub(crate) fn digest(fields: &[&[u8]]) -> String {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    for field in fields {
        h.update((field.len() as u64).to_le_bytes());
        h.update(field);
    }
    crate::util::hex(&h.finalize())
}

/// Removes a guest path of the image (a link itself, never what it points
/// at); a path whose parent is missing is already gone.
fn remove_in_root(root: &Path, guest_path: &str) -> std::io::Result<()> {
    match inroot::resolve(root, guest_path) {
        Ok(path) => remove(&path),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
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

/// The guest path's host location for writing a new file or link: its
/// parent made inside the root, and whatever link sat at the path removed,
/// so nothing is ever written through a link.
fn replaceable_in_root(root: &Path, guest_path: &str) -> std::io::Result<std::path::PathBuf> {
    if let Some(parent) = Path::new(guest_path).parent() {
        inroot::create_dir_all(root, parent)?;
    }
    let dest = inroot::resolve(root, guest_path)?;
    if fs::symlink_metadata(&dest).is_ok_and(|m| !m.is_dir()) {
        fs::remove_file(&dest)?;
    }
    Ok(dest)
}

/// The recipe's dirs, files and users, written inside the image root only:
/// every path is resolved in the root (see [`inroot`]), as the guest will.
fn apply_declarations(loaded: &LoadedRecipe, root: &Path) -> std::io::Result<()> {
    let recipe = &loaded.recipe;
    for dir in &recipe.dirs {
        inroot::create_dir_all(root, dir)?;
    }
    for file in &recipe.files {
        let dest = replaceable_in_root(root, &file.path)?;
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
            let dest = replaceable_in_root(root, path)?;
            std::os::unix::fs::symlink(&link.target, &dest)?;
        }
    }
    // The account files are plain files of the image: a link there (the
    // recipe's or a package's) is replaced, never read or written through.
    let etc = inroot::create_dir_all(root, "etc")?;
    for name in ["passwd", "group"] {
        if fs::symlink_metadata(etc.join(name)).is_ok_and(|m| m.is_symlink()) {
            fs::remove_file(etc.join(name))?;
        }
    }
    let read = |name: &str, base: &str| {
        fs::read_to_string(etc.join(name)).unwrap_or_else(|_| base.to_string())
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
    fs::write(etc.join("passwd"), passwd)?;
    fs::write(etc.join("group"), group)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A recipe that aims its links and files at the host: everything lands
    /// in the image root, nothing on the host changes.
    #[test]
    fn declarations_never_write_through_links_onto_the_host() {
        let host = tempfile::tempdir().unwrap();
        let victim = host.path().join("victim");
        fs::create_dir(&victim).unwrap();
        fs::write(victim.join("passwd"), "host:x:0:0::/:/bin/sh\n").unwrap();
        let victim_dir = victim.display().to_string();
        let recipe_dir = host.path().join("recipe");
        fs::create_dir(&recipe_dir).unwrap();
        let hello = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../recipes/hello");
        fs::copy(hello.join("index.html"), recipe_dir.join("index.html")).unwrap();
        let recipe = fs::read_to_string(hello.join("recipe.toml")).unwrap()
            + &format!(
                r#"
[[symlinks]]
target = "/proc/self/root{victim_dir}/passwd"
paths = ["/etc/passwd"]

[[files]]
path = "/usr/lib/certs/planted"
content = "planted"

[[users]]
name = "svc"
uid = 100
"#
            );
        fs::write(recipe_dir.join("recipe.toml"), recipe).unwrap();
        let loaded = crate::recipe::load(&recipe_dir.join("recipe.toml")).unwrap();
        let root = host.path().join("root");
        fs::create_dir(&root).unwrap();
        // A package's absolute link, as openssl ships /usr/lib/ssl/certs.
        fs::create_dir_all(root.join("usr/lib")).unwrap();
        std::os::unix::fs::symlink(&victim, root.join("usr/lib/certs")).unwrap();
        // The link's target as the guest sees it, inside the image.
        let inside = root.join(victim.strip_prefix("/").unwrap());
        fs::create_dir_all(&inside).unwrap();
        fs::write(inside.join("passwd"), "image's own").unwrap();

        apply_declarations(&loaded, &root).unwrap();
        remove_in_root(&root, "/usr/lib/certs/passwd").unwrap();

        assert_eq!(
            fs::read_to_string(victim.join("passwd")).unwrap(),
            "host:x:0:0::/:/bin/sh\n"
        );
        assert!(!victim.join("planted").exists());
        let passwd = fs::read_to_string(root.join("etc/passwd")).unwrap();
        assert!(passwd.contains("svc:x:100:"), "{passwd}");
        assert!(!fs::symlink_metadata(root.join("etc/passwd"))
            .unwrap()
            .is_symlink());
        assert_eq!(
            fs::read_to_string(inside.join("planted")).unwrap(),
            "planted"
        );
        assert!(!inside.join("passwd").exists(), "removed inside the image");
    }
}
