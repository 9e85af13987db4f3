//! Blobs checked against their digests while they are read, and the layer
//! cache: `<store>/blobs/sha256/<hex>`, one file per layer as its transport
//! gave it (compressed or not), shared by every image that has it. A layer
//! is written under a temporary name, checked, fsynced and renamed, so a
//! file under its digest is always complete and correct; temporary files a
//! crash left are swept by the next import.

use std::fs;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use sha2::{Digest as _, Sha256};

use super::{digest_hex, Descriptor, ImportImageError, Transport, MAX_DOCUMENT_BYTES};

/// A reader that hashes what passes through it.
pub struct Hashing<R> {
    inner: R,
    hasher: Sha256,
    pub read: u64,
}

impl<R: Read> Hashing<R> {
    pub fn new(inner: R) -> Self {
        Hashing {
            inner,
            hasher: Sha256::new(),
            read: 0,
        }
    }

    /// The hex sha256 of what was read.
    pub fn finish(self) -> String {
        crate::util::hex(&self.hasher.finalize())
    }
}

impl<R: Read> Read for Hashing<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        self.read += n as u64;
        Ok(n)
    }
}

/// Checks a finished stream against the descriptor's digest and size.
fn check(descriptor: &Descriptor, got: u64, actual: String) -> Result<(), ImportImageError> {
    if let Some(want) = descriptor.size {
        if got < want {
            return Err(ImportImageError::Truncated {
                digest: descriptor.digest.clone(),
                got,
                want,
            });
        }
    }
    if actual != digest_hex(&descriptor.digest)? {
        return Err(ImportImageError::DigestMismatch {
            digest: descriptor.digest.clone(),
            actual,
        });
    }
    Ok(())
}

/// Copies a blob into `out`, at most its descriptor's size (a document's
/// at most [`MAX_DOCUMENT_BYTES`] when `cap` says so), checking its digest.
fn copy_checked(
    transport: &mut dyn Transport,
    descriptor: &Descriptor,
    cap: Option<u64>,
    out: &mut dyn Write,
) -> Result<(), ImportImageError> {
    digest_hex(&descriptor.digest)?;
    let limit = match (descriptor.size, cap) {
        (Some(size), Some(cap)) if size > cap => {
            return Err(ImportImageError::Invalid {
                reason: format!(
                    "document {} has {size} bytes, more than the {cap} allowed",
                    descriptor.digest
                ),
            })
        }
        (Some(size), _) => size,
        (None, Some(cap)) => cap,
        (None, None) => u64::MAX - 1,
    };
    let registry = transport.registry().map(String::from);
    let reader = transport.open_blob(descriptor)?;
    let mut hashing = Hashing::new(reader.take(limit + 1));
    let copied = copy_apart(&mut hashing, out, &descriptor.digest).and_then(|()| {
        if hashing.read > limit {
            return Err(match descriptor.size {
                Some(want) => ImportImageError::Oversized {
                    digest: descriptor.digest.clone(),
                    want,
                },
                None => ImportImageError::Invalid {
                    reason: format!("blob {} is larger than {limit} bytes", descriptor.digest),
                },
            });
        }
        let got = hashing.read;
        check(descriptor, got, hashing.finish())
    });
    // Bytes a registry sent that are not the blob (cut short, more, others,
    // a connection that broke) are its failure, not the image's.
    match (copied, registry) {
        (
            Err(
                e @ (ImportImageError::Read { .. }
                | ImportImageError::Truncated { .. }
                | ImportImageError::Oversized { .. }
                | ImportImageError::DigestMismatch { .. }),
            ),
            Some(registry),
        ) => Err(ImportImageError::BadBlob {
            registry,
            source: Box::new(e),
        }),
        (copied, _) => copied,
    }
}

/// Copies `from` into `out`: a failed read is the blob's ([`ImportImageError::Read`]),
/// a failed write this host's ([`ImportImageError::Stage`]).
fn copy_apart(
    from: &mut dyn Read,
    out: &mut dyn Write,
    digest: &str,
) -> Result<(), ImportImageError> {
    let mut buf = vec![0; 64 << 10];
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) => return Ok(()),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(source) => {
                return Err(ImportImageError::Read {
                    what: format!("blob {digest}"),
                    source,
                })
            }
        };
        out.write_all(&buf[..n])
            .map_err(|source| ImportImageError::Stage {
                what: format!("blob {digest}"),
                source,
            })?;
    }
}

/// A small document (index, manifest, config), checked.
pub fn read_document(
    transport: &mut dyn Transport,
    descriptor: &Descriptor,
) -> Result<Vec<u8>, ImportImageError> {
    let mut bytes = Vec::new();
    copy_checked(transport, descriptor, Some(MAX_DOCUMENT_BYTES), &mut bytes)?;
    Ok(bytes)
}

/// The layer cache of an image store.
pub struct BlobCache {
    dir: PathBuf,
}

impl BlobCache {
    pub fn new(store: &Path) -> Self {
        BlobCache {
            dir: store.join("blobs").join("sha256"),
        }
    }

    pub fn path(&self, digest: &str) -> Result<PathBuf, ImportImageError> {
        Ok(self.dir.join(digest_hex(digest)?))
    }

    /// Whether the layer is cached (complete and checked, as every file
    /// under its digest is).
    pub fn has(&self, digest: &str) -> bool {
        self.path(digest).is_ok_and(|p| p.is_file())
    }

    /// Removes what an interrupted fetch left (temporary files); the
    /// caller makes sure no fetch is under way.
    pub fn sweep(&self) {
        let Ok(entries) = fs::read_dir(&self.dir) else {
            return;
        };
        for entry in entries.flatten() {
            if entry.file_name().to_string_lossy().starts_with(".tmp") {
                let _ = fs::remove_file(entry.path());
            }
        }
    }

    /// The cached layer, fetched first when it is not cached.
    pub fn ensure(
        &self,
        transport: &mut dyn Transport,
        descriptor: &Descriptor,
    ) -> Result<(PathBuf, bool), ImportImageError> {
        let path = self.path(&descriptor.digest)?;
        if path.is_file() {
            return Ok((path, true));
        }
        let stage = |source| ImportImageError::Stage {
            what: format!("layer {}", descriptor.digest),
            source,
        };
        fs::create_dir_all(&self.dir).map_err(stage)?;
        let mut tmp = tempfile::Builder::new()
            .prefix(".tmp")
            .tempfile_in(&self.dir)
            .map_err(stage)?;
        {
            let mut out = io::BufWriter::new(tmp.as_file_mut());
            copy_checked(transport, descriptor, None, &mut out)?;
            out.flush().map_err(stage)?;
        }
        tmp.as_file().sync_all().map_err(stage)?;
        tmp.persist(&path).map_err(|e| stage(e.error))?;
        fs::File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(stage)?;
        Ok((path, false))
    }

    /// Every cached layer's digest.
    pub fn list(&self) -> Vec<String> {
        let Ok(entries) = fs::read_dir(&self.dir) else {
            return vec![];
        };
        entries
            .flatten()
            .map(|e| format!("sha256:{}", e.file_name().to_string_lossy()))
            .filter(|d| digest_hex(d).is_ok())
            .collect()
    }
}
