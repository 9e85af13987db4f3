//! One import: find the image, fetch its layers into the cache, unpack them
//! in a staging root, map its config, pack and commit. Nothing is listed
//! before the store's commit (a rename), so an import cut short leaves no
//! image, only complete cached layers (and staging dirs the store sweeps).

use std::fs;
use std::io::{self, BufRead, BufReader, Read};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use vroom_types::OciOrigin;

use super::blobs::{self, BlobCache, Hashing};
use super::config::{self, ImageConfig};
use super::layout::{DockerArchive, Files, OciLayout};
use super::unpack::{Unpacker, LIMITS};
use super::{digest_hex, registry, ImportImageError, ImportReference, Transport};
use crate::kernel::Kernel;
use crate::pack::{pack_and_commit, ImageMeta};
use crate::store::{ImageStore, StoredImage};

pub struct ImportRequest<'a> {
    pub reference: &'a ImportReference,
    /// The image's name; by default the reference's (see
    /// [`ImportReference::default_name`]).
    pub name: Option<String>,
    /// Plain HTTP to a registry on a loopback or private address.
    pub insecure: bool,
    /// With a caller who is not root: local files must be theirs.
    pub owner: Option<u32>,
    pub kernel: &'a Kernel,
    pub init: &'a Path,
}

pub struct ImportOutcome {
    pub image: StoredImage,
    /// The same image was imported before: nothing was done.
    pub cached: bool,
}

/// The transport a reference names.
fn transport(req: &ImportRequest<'_>) -> Result<Box<dyn Transport>, ImportImageError> {
    Ok(match req.reference {
        ImportReference::OciDir { dir, tag } => Box::new(OciLayout {
            files: Files::dir(dir, req.owner),
            tag: tag.clone(),
        }),
        ImportReference::OciArchive { file } => Box::new(OciLayout {
            files: Files::archive(file, req.owner)?,
            tag: None,
        }),
        ImportReference::DockerArchive { file } => {
            Box::new(DockerArchive::new(Files::archive(file, req.owner)?))
        }
        ImportReference::Registry {
            registry,
            repository,
            reference,
        } => Box::new(registry::Registry::new(
            registry,
            repository,
            reference,
            req.insecure,
        )?),
    })
}

pub fn import_image(
    req: &ImportRequest<'_>,
    store: &ImageStore,
    progress: &mut dyn FnMut(&str, String),
) -> Result<ImportOutcome, ImportImageError> {
    let mut transport = transport(req)?;
    let transport = transport.as_mut();
    let chosen = transport.choose()?;
    let name = req
        .name
        .clone()
        .unwrap_or_else(|| req.reference.default_name());
    let short = &digest_hex(&chosen.digest)?[..12];
    let version = chosen.tag.clone().unwrap_or_else(|| short.to_string());
    progress(
        "resolve",
        format!("{} ({} layers)", chosen.digest, chosen.layers.len()),
    );

    // The same image, name, kernel and init give the same image: found
    // again without fetching or packing anything.
    let key = crate::build::digest(&[
        b"vroom-oci-1",
        env!("CARGO_PKG_VERSION").as_bytes(),
        req.reference.to_string().as_bytes(),
        chosen.digest.as_bytes(),
        name.as_bytes(),
        version.as_bytes(),
        req.kernel.reference.sha256.as_bytes(),
        crate::util::sha256_file(req.init)
            .map_err(|source| ImportImageError::Stage {
                what: "the init's digest".into(),
                source,
            })?
            .0
            .as_bytes(),
    ]);
    let cache_file = store.dir().join(".build-cache").join(format!("oci-{key}"));
    if let Some(image) = fs::read_to_string(&cache_file)
        .ok()
        .and_then(|id| store.resolve(id.trim()).ok())
    {
        store.tag(&image)?;
        progress("resolve", format!("unchanged: image {}", &image.id[..12]));
        return Ok(ImportOutcome {
            image,
            cached: true,
        });
    }

    let config_bytes = blobs::read_document(transport, &chosen.config)?;
    let config = ImageConfig::parse(&config_bytes)?;
    config.check_platform()?;
    if config.diff_ids().len() != chosen.layers.len() {
        return Err(ImportImageError::Invalid {
            reason: format!(
                "the manifest has {} layers, the config {}",
                chosen.layers.len(),
                config.diff_ids().len()
            ),
        });
    }

    let cache = BlobCache::new(store.dir());
    // Imports run one at a time (the caller's lock): what a killed one
    // left half-written goes.
    cache.sweep();
    let mut layers = vec![];
    for layer in &chosen.layers {
        let (path, cached) = cache.ensure(transport, layer)?;
        let size = fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
        progress(
            "fetch",
            format!(
                "{} {:.1} MB{}",
                &layer.digest[..19],
                size as f64 / 1e6,
                if cached { " (cached)" } else { "" }
            ),
        );
        layers.push(path);
    }

    let stage = |what: &str| {
        let what = what.to_string();
        move |source| ImportImageError::Stage { what, source }
    };
    let staging = store.staging()?;
    let root = staging.path().join("root");
    fs::create_dir(&root).map_err(stage("the staging root"))?;
    fs::set_permissions(&root, fs::Permissions::from_mode(0o755))
        .map_err(stage("the staging root"))?;
    progress("unpack", format!("{} layers", layers.len()));
    let mut unpacker = Unpacker::new(&root, LIMITS);
    for ((path, layer), diff_id) in layers.iter().zip(&chosen.layers).zip(config.diff_ids()) {
        let file = fs::File::open(path).map_err(stage(&layer.digest))?;
        let mut tar = Hashing::new(decompress(file).map_err(|source| ImportImageError::Read {
            what: format!("layer {}", layer.digest),
            source,
        })?);
        unpacker
            .apply(&mut tar)
            .map_err(|source| ImportImageError::Unpack {
                digest: layer.digest.clone(),
                source,
            })?;
        let actual = tar.finish();
        if actual != digest_hex(diff_id)? {
            return Err(ImportImageError::DigestMismatch {
                digest: diff_id.clone(),
                actual,
            });
        }
    }
    for warning in &unpacker.warnings {
        tracing::warn!(reference = %req.reference, "{warning}");
        progress("unpack", warning.clone());
    }

    // Data volumes are ext4, which only vroom's kernel gives every image.
    let data_volumes = req.kernel.reference.flavor == vroom_types::KernelFlavor::Vroom;
    let mapped = config::map(&config, &root, data_volumes)?;
    let mount_points: Vec<String> = mapped
        .appliance
        .writable
        .iter()
        .cloned()
        .chain(mapped.appliance.volumes.iter().map(|v| v.path.clone()))
        .collect();
    for replaced in prepare_root(&root, &mount_points).map_err(stage("mount points"))? {
        progress("unpack", replaced);
    }
    progress("pack", "erofs root and initramfs".into());
    let meta = ImageMeta {
        name,
        version,
        default_mem_mib: 128,
        min_mem_mib: 64,
        appliance: mapped.appliance,
        packages: vec![],
        modules: vec![],
        keep_owners: true,
        oci: Some(OciOrigin {
            reference: req.reference.to_string(),
            digest: chosen.digest.clone(),
            config_digest: chosen.config.digest.clone(),
            layers: chosen.layers.iter().map(|l| l.digest.clone()).collect(),
            exposed_ports: mapped.exposed_ports,
            volumes: mapped.volumes,
        }),
    };
    let image = pack_and_commit(&root, meta, req.kernel, req.init, store)?;
    drop(staging);
    let remembered = fs::create_dir_all(store.dir().join(".build-cache"))
        .and_then(|()| fs::write(&cache_file, &image.id));
    if let Err(err) = remembered {
        // Only the next import's speed depends on it.
        tracing::warn!("cannot record the import cache entry: {err}");
    }
    Ok(ImportOutcome {
        image,
        cached: false,
    })
}

/// A layer's tar stream, whatever its compression (gzip, zstd or none: told
/// by its first bytes, as media types are not always right).
pub fn decompress(file: fs::File) -> io::Result<Box<dyn Read>> {
    let mut buffered = BufReader::with_capacity(256 << 10, file);
    let head = buffered.fill_buf()?;
    Ok(if head.starts_with(&[0x1f, 0x8b]) {
        Box::new(flate2::bufread::MultiGzDecoder::new(buffered))
    } else if head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        Box::new(zstd::stream::read::Decoder::with_buffer(buffered)?)
    } else {
        Box::new(buffered)
    })
}

/// Makes the paths vroom mounts over or writes real directories (a link
/// or file there is replaced: the guest mounts before it resolves links
/// the way the image means them) and `/etc/hosts` and `/etc/resolv.conf`
/// plain files for vroom-init to bind over. Returns what was replaced.
pub fn prepare_root(root: &Path, mount_points: &[String]) -> io::Result<Vec<String>> {
    let mut replaced = vec![];
    let dirs = ["/config", "/dev", "/proc", "/sys", "/etc/vroom"];
    for dir in dirs
        .iter()
        .copied()
        .chain(mount_points.iter().map(String::as_str))
    {
        let mut at = PathBuf::from(root);
        for part in Path::new(dir).components().skip(1) {
            at.push(part);
            match fs::symlink_metadata(&at) {
                Ok(m) if m.is_dir() => continue,
                Ok(_) => {
                    replaced.push(format!(
                        "replaced {} by a directory",
                        at.strip_prefix(root).unwrap_or(&at).display()
                    ));
                    fs::remove_file(&at)?;
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
            fs::create_dir(&at)?;
            fs::set_permissions(&at, fs::Permissions::from_mode(0o755))?;
        }
    }
    for file in ["etc/hosts", "etc/resolv.conf"] {
        let at = root.join(file);
        match fs::symlink_metadata(&at) {
            Ok(m) if m.is_file() => continue,
            Ok(m) => {
                replaced.push(format!("replaced /{file} by a plain file"));
                if m.is_dir() {
                    fs::remove_dir_all(&at)?;
                } else {
                    fs::remove_file(&at)?;
                }
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        fs::write(&at, "")?;
        fs::set_permissions(&at, fs::Permissions::from_mode(0o644))?;
    }
    Ok(replaced)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::oci::unpack::tests::Layer;
    use std::io::Write;

    /// A layer reads the same whether it came gzipped, zstd-compressed or
    /// plain, whatever its media type said.
    #[test]
    fn layers_decompress_by_their_first_bytes() {
        let tar = Layer::new().file("a", "one").dir("d").bytes();
        let mut gz = flate2::write::GzEncoder::new(vec![], flate2::Compression::fast());
        gz.write_all(&tar).unwrap();
        let gz = gz.finish().unwrap();
        let zst = zstd::stream::encode_all(&tar[..], 3).unwrap();
        let dir = tempfile::tempdir().unwrap();
        for (name, bytes) in [("gz", &gz), ("zst", &zst), ("plain", &tar)] {
            let path = dir.path().join(name);
            fs::write(&path, bytes).unwrap();
            let mut out = vec![];
            decompress(fs::File::open(&path).unwrap())
                .unwrap()
                .read_to_end(&mut out)
                .unwrap();
            assert!(out == tar, "{name}");
        }
    }

    /// Mount points and the files vroom-init binds over are made real,
    /// whatever the image had there; nothing outside the root changes.
    #[test]
    fn the_root_is_prepared_for_mounts_without_following_links() {
        let host = tempfile::tempdir().unwrap();
        let outside = host.path().join("outside");
        fs::create_dir(&outside).unwrap();
        let root = host.path().join("root");
        fs::create_dir_all(root.join("etc")).unwrap();
        std::os::unix::fs::symlink(&outside, root.join("tmp")).unwrap();
        std::os::unix::fs::symlink("../run/resolv.conf", root.join("etc/resolv.conf")).unwrap();
        fs::write(root.join("var"), "a file").unwrap();
        let replaced =
            prepare_root(&root, &["/run".into(), "/tmp".into(), "/var/lib/x".into()]).unwrap();
        assert_eq!(
            replaced,
            [
                "replaced tmp by a directory",
                "replaced var by a directory",
                "replaced /etc/resolv.conf by a plain file"
            ]
        );
        for dir in ["run", "tmp", "var/lib/x", "config", "etc/vroom"] {
            assert!(
                fs::symlink_metadata(root.join(dir)).unwrap().is_dir(),
                "{dir}"
            );
        }
        for file in ["etc/hosts", "etc/resolv.conf"] {
            assert!(
                fs::symlink_metadata(root.join(file)).unwrap().is_file(),
                "{file}"
            );
        }
        assert_eq!(fs::read_dir(&outside).unwrap().count(), 0);
    }
}
