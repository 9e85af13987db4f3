//! The local transports: an OCI image layout as a directory (`oci:`) or a
//! tar file (`oci-archive:`), and a `docker save` archive
//! (`docker-archive:`). Archives are read in place: their members are
//! located once, then read by offset, never extracted.
//!
//! Every file is opened as untrusted input (regular, one link, and with a
//! caller who is not root, the caller's own: see [`vroom_input`]).

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, Read};
use std::os::unix::fs::FileExt;
use std::path::{Component, Path, PathBuf};

use serde::Deserialize;
use vroom_input::open_input;

use super::{
    blobs, choose_from, digest_hex, pick_platform, unpack, Chosen, Descriptor, Document,
    ImportImageError, Transport, MAX_DOCUMENT_BYTES,
};

/// The annotation that names an image in a layout's index.
const REF_NAME: &str = "org.opencontainers.image.ref.name";
/// An archive with more members than this is not an image.
const MAX_ARCHIVE_MEMBERS: usize = 100_000;
/// The largest blob read from a layout.
const MAX_BLOB_BYTES: u64 = unpack::LIMITS.max_bytes;

/// A directory's files, or an archive's members.
pub enum Files {
    Dir {
        dir: PathBuf,
        owner: Option<u32>,
    },
    Archive {
        path: PathBuf,
        file: File,
        /// member path → (offset of its data, size)
        members: HashMap<String, (u64, u64)>,
    },
}

/// A member of an archive, read by offset.
struct Member<'a> {
    file: &'a File,
    pos: u64,
    end: u64,
}

impl Read for Member<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let left = (self.end - self.pos).min(buf.len() as u64) as usize;
        if left == 0 {
            return Ok(0);
        }
        let n = self.file.read_at(&mut buf[..left], self.pos)?;
        self.pos += n as u64;
        Ok(n)
    }
}

/// A member path as written in an archive or a manifest, made plain
/// (`./a/b` is `a/b`); `..` or an absolute path is none.
fn plain(path: &Path) -> Option<String> {
    let mut parts = vec![];
    for c in path.components() {
        match c {
            Component::Normal(p) => parts.push(p.to_str()?),
            Component::CurDir => {}
            _ => return None,
        }
    }
    Some(parts.join("/"))
}

impl Files {
    pub fn dir(dir: &Path, owner: Option<u32>) -> Self {
        Files::Dir {
            dir: dir.to_path_buf(),
            owner,
        }
    }

    /// Locates the members of a tar archive.
    pub fn archive(path: &Path, owner: Option<u32>) -> Result<Self, ImportImageError> {
        let input_err = |source| ImportImageError::Input {
            what: format!("cannot open {}", path.display()),
            source,
        };
        let file = open_input(path, u64::MAX >> 1, owner)
            .map_err(input_err)?
            .into_file();
        let read_err = |source| ImportImageError::Read {
            what: format!("{} as a tar archive", path.display()),
            source,
        };
        let mut members = HashMap::new();
        let mut archive = tar::Archive::new(&file);
        let entries = archive.entries_with_seek().map_err(read_err)?;
        for entry in entries {
            let entry = entry.map_err(read_err)?;
            if !entry.header().entry_type().is_file() {
                continue;
            }
            let name = entry.path().map_err(read_err)?;
            if let Some(name) = plain(&name) {
                members.insert(name, (entry.raw_file_position(), entry.size()));
            }
            if members.len() > MAX_ARCHIVE_MEMBERS {
                return Err(ImportImageError::Invalid {
                    reason: format!(
                        "{} has more than {MAX_ARCHIVE_MEMBERS} members",
                        path.display()
                    ),
                });
            }
        }
        Ok(Files::Archive {
            path: path.to_path_buf(),
            file,
            members,
        })
    }

    fn shown(&self, name: &str) -> String {
        match self {
            Files::Dir { dir, .. } => dir.join(name).display().to_string(),
            Files::Archive { path, .. } => format!("{} in {}", name, path.display()),
        }
    }

    /// A file of the layout, at most `cap` bytes.
    pub fn open(&self, name: &str, cap: u64) -> Result<Box<dyn Read + '_>, ImportImageError> {
        match self {
            Files::Dir { dir, owner } => {
                let input = open_input(&dir.join(name), cap, *owner).map_err(|source| {
                    ImportImageError::Input {
                        what: format!("cannot open {}", self.shown(name)),
                        source,
                    }
                })?;
                let size = input.size();
                Ok(Box::new(input.into_file().take(size)))
            }
            Files::Archive { file, members, .. } => {
                let Some(&(pos, size)) = members.get(name) else {
                    return Err(ImportImageError::Invalid {
                        reason: format!("{} is missing", self.shown(name)),
                    });
                };
                if size > cap {
                    return Err(ImportImageError::Invalid {
                        reason: format!("{} is larger than {cap} bytes", self.shown(name)),
                    });
                }
                Ok(Box::new(Member {
                    file,
                    pos,
                    end: pos + size,
                }))
            }
        }
    }

    fn read(&self, name: &str) -> Result<Vec<u8>, ImportImageError> {
        let mut bytes = vec![];
        self.open(name, MAX_DOCUMENT_BYTES)?
            .read_to_end(&mut bytes)
            .map_err(|source| ImportImageError::Read {
                what: self.shown(name),
                source,
            })?;
        Ok(bytes)
    }

    fn size(&self, name: &str) -> Option<u64> {
        match self {
            Files::Dir { dir, .. } => std::fs::symlink_metadata(dir.join(name))
                .ok()
                .map(|m| m.len()),
            Files::Archive { members, .. } => members.get(name).map(|m| m.1),
        }
    }
}

/// An OCI image layout (`image-spec/image-layout.md`), in a directory or a tar.
pub struct OciLayout {
    pub files: Files,
    pub tag: Option<String>,
}

impl Transport for OciLayout {
    fn choose(&mut self) -> Result<Chosen, ImportImageError> {
        let index = Document::parse(&self.files.read("index.json")?, "index.json")?;
        let manifests = index.manifests.unwrap_or_default();
        fn named(d: &Descriptor) -> Option<&str> {
            d.annotations.get(REF_NAME).map(String::as_str)
        }
        let candidates: Vec<Descriptor> = match &self.tag {
            Some(tag) => manifests
                .iter()
                .filter(|d| named(d) == Some(tag.as_str()))
                .cloned()
                .collect(),
            None => manifests.clone(),
        };
        let chosen = match candidates.as_slice() {
            [] if self.tag.is_some() => {
                let tags: Vec<&str> = manifests.iter().filter_map(named).collect();
                return Err(ImportImageError::Reference {
                    reason: format!(
                        "the layout has no image tagged {:?} (it has: {})",
                        self.tag.as_deref().unwrap_or_default(),
                        if tags.is_empty() {
                            "no tags".to_string()
                        } else {
                            tags.join(", ")
                        }
                    ),
                });
            }
            [one] => one.clone(),
            several if several.iter().all(|d| d.platform.is_some()) => {
                pick_platform(several)?.clone()
            }
            several => {
                return Err(ImportImageError::Reference {
                    reason: format!(
                        "the layout holds {} images: name one with oci:DIR:TAG",
                        several.len()
                    ),
                })
            }
        };
        let tag = self
            .tag
            .clone()
            .or_else(|| chosen.annotations.get(REF_NAME).cloned());
        let top = blobs::read_document(self, &chosen)?;
        choose_from(self, top, chosen.digest, tag)
    }

    fn open_blob(
        &mut self,
        descriptor: &Descriptor,
    ) -> Result<Box<dyn Read + '_>, ImportImageError> {
        let hex = digest_hex(&descriptor.digest)?;
        self.files
            .open(&format!("blobs/sha256/{hex}"), MAX_BLOB_BYTES)
    }
}

/// One image of a docker archive's `manifest.json`.
#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct DockerEntry {
    config: String,
    #[serde(default)]
    repo_tags: Option<Vec<String>>,
    layers: Vec<String>,
}

/// What `docker save` writes: `manifest.json`, the config and one
/// uncompressed tar per layer, named by digest or not. A layer's digest is
/// its diff id in the config (or the digest its name carries).
pub struct DockerArchive {
    pub files: Files,
    /// digest → member
    members: HashMap<String, String>,
}

impl DockerArchive {
    pub fn new(files: Files) -> Self {
        DockerArchive {
            files,
            members: HashMap::new(),
        }
    }
}

/// The digest a member's name carries (`blobs/sha256/HEX`, `HEX.json`,
/// `HEX/layer.tar`, `HEX.tar`), if it carries one.
fn named_digest(name: &str) -> Option<String> {
    name.split(['/', '.'])
        .map(|part| format!("sha256:{part}"))
        .find(|d| digest_hex(d).is_ok())
}

impl Transport for DockerArchive {
    fn choose(&mut self) -> Result<Chosen, ImportImageError> {
        let entries: Vec<DockerEntry> = serde_json::from_slice(&self.files.read("manifest.json")?)
            .map_err(|e| ImportImageError::Invalid {
                reason: format!("manifest.json is not a docker archive's manifest: {e}"),
            })?;
        let [entry] = entries.as_slice() else {
            return Err(ImportImageError::Reference {
                reason: format!(
                    "the archive holds {} images; vroom imports archives of one",
                    entries.len()
                ),
            });
        };
        let member = |name: &str| {
            plain(Path::new(name)).ok_or_else(|| ImportImageError::Invalid {
                reason: format!("manifest.json names {name:?}, which is outside the archive"),
            })
        };
        let config_name = member(&entry.config)?;
        let config = self.files.read(&config_name)?;
        let actual = format!("sha256:{}", crate::util::sha256_bytes(&config));
        if let Some(named) = named_digest(&config_name) {
            if named != actual {
                return Err(ImportImageError::DigestMismatch {
                    digest: named,
                    actual: actual["sha256:".len()..].to_string(),
                });
            }
        }
        let diff_ids = super::config::diff_ids(&config)?;
        if diff_ids.len() != entry.layers.len() {
            return Err(ImportImageError::Invalid {
                reason: format!(
                    "the config lists {} layers, manifest.json {}",
                    diff_ids.len(),
                    entry.layers.len()
                ),
            });
        }
        self.members.insert(actual.clone(), config_name.clone());
        let mut layers = vec![];
        for (name, diff_id) in entry.layers.iter().zip(diff_ids) {
            let name = member(name)?;
            let digest = named_digest(&name)
                .filter(|_| name.starts_with("blobs/"))
                .unwrap_or(diff_id);
            layers.push(Descriptor {
                media_type: String::new(),
                size: self.files.size(&name),
                digest: digest.clone(),
                platform: None,
                annotations: Default::default(),
            });
            self.members.insert(digest, name);
        }
        Ok(Chosen {
            digest: actual.clone(),
            config: Descriptor {
                media_type: String::new(),
                digest: actual,
                size: Some(config.len() as u64),
                platform: None,
                annotations: Default::default(),
            },
            layers,
            tag: entry
                .repo_tags
                .as_ref()
                .and_then(|tags| tags.first())
                .and_then(|t| t.rsplit_once(':'))
                .map(|(_, tag)| tag.to_string()),
        })
    }

    fn open_blob(
        &mut self,
        descriptor: &Descriptor,
    ) -> Result<Box<dyn Read + '_>, ImportImageError> {
        let Some(name) = self.members.get(&descriptor.digest) else {
            return Err(ImportImageError::Invalid {
                reason: format!("the archive has no blob {}", descriptor.digest),
            });
        };
        self.files.open(name, MAX_BLOB_BYTES)
    }
}
