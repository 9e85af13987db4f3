//! OCI images as appliances (`vroom image import REF`): an image from an
//! OCI layout, an OCI or docker archive, or a registry becomes a vroom image
//! (an erofs root, vroom-init and the kernel's modules, a manifest) whose
//! entrypoint is a supervised service.
//!
//! - [`vroom_types::ImportReference`]: what `REF` may be;
//! - [`layout`] and [`registry`]: the transports, which find the image's
//!   manifest for linux/amd64 and open its blobs;
//! - [`blobs`]: every blob is checked against its sha256 while it is read,
//!   and layers are kept by digest in `<store>/blobs/sha256/`, shared by
//!   every image that has them;
//! - [`unpack`]: the layer rules, inside a staging root;
//! - [`config`]: the image config mapped onto an [`vroom_types::ApplianceSpec`];
//! - [`import`]: all of it, ending in the store's crash-safe commit.

pub mod blobs;
pub mod config;
pub mod import;
pub mod layout;
pub mod registry;
pub mod unpack;

use serde::Deserialize;
use std::collections::BTreeMap;

pub use import::{import_image, ImportOutcome, ImportRequest};
pub use vroom_types::ImportReference;

/// Index, manifest and config documents are small; more is refused.
pub const MAX_DOCUMENT_BYTES: u64 = 4 << 20;

#[derive(Debug, thiserror::Error)]
pub enum ImportImageError {
    #[error(transparent)]
    Parse(#[from] vroom_types::ParseImportReferenceError),
    #[error("{reason}")]
    Reference { reason: String },
    #[error("{reason}")]
    Invalid { reason: String },
    #[error("the image is for {platform}, not linux/amd64")]
    Architecture { platform: String },
    #[error("the image has neither an Entrypoint nor a Cmd: nothing to run")]
    NoEntrypoint,
    #[error("blob {digest} does not match its digest (its bytes hash to sha256:{actual})")]
    DigestMismatch { digest: String, actual: String },
    #[error("blob {digest} is truncated: {got} bytes of {want}")]
    Truncated { digest: String, got: u64, want: u64 },
    #[error("blob {digest} is larger than the {want} bytes its descriptor says")]
    Oversized { digest: String, want: u64 },
    #[error("cannot read {what}")]
    Read {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{what}")]
    Input {
        what: String,
        #[source]
        source: vroom_input::OpenInputError,
    },
    #[error("registry {registry}: {reason}")]
    Registry {
        registry: String,
        reason: String,
        failure: RegistryFailure,
    },
    #[error("registry {registry} sent a bad blob")]
    BadBlob {
        registry: String,
        #[source]
        source: Box<ImportImageError>,
    },
    #[error("cannot unpack layer {digest}")]
    Unpack {
        digest: String,
        #[source]
        source: unpack::UnpackLayerError,
    },
    #[error("cannot stage {what}")]
    Stage {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Pack(#[from] crate::BuildImageError),
    #[error(transparent)]
    Store(#[from] crate::ImageStoreError),
}

/// What went wrong with a registry, for the code the API answers with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RegistryFailure {
    /// It cannot be reached (connection refused, DNS, TLS, a timeout).
    Unreachable,
    /// It answered a 5xx, or an answer that does not read.
    Failed,
    /// It denied access (401, 403): credentials are missing or wrong.
    Denied,
    /// It has no such repository, tag or blob (404).
    Missing,
    /// The request cannot be made as asked (plain HTTP to a public host,
    /// another 4xx).
    Refused,
}

impl ImportImageError {
    /// The API's code for this failure: the reference or the image is at
    /// fault (a 4xx), a registry failed (a bad gateway), or this host did.
    pub fn code(&self) -> vroom_types::ErrorCode {
        use vroom_types::ErrorCode;
        match self {
            ImportImageError::Stage { .. }
            | ImportImageError::Store(_)
            | ImportImageError::Pack(crate::BuildImageError::Stage { .. }) => ErrorCode::Internal,
            ImportImageError::Parse(_) => ErrorCode::InvalidReference,
            ImportImageError::Registry { failure, .. } => match failure {
                RegistryFailure::Unreachable | RegistryFailure::Failed => ErrorCode::UpstreamError,
                RegistryFailure::Denied => ErrorCode::InvalidReference,
                RegistryFailure::Missing => ErrorCode::NotFound,
                RegistryFailure::Refused => ErrorCode::InvalidArgument,
            },
            ImportImageError::BadBlob { .. } => ErrorCode::UpstreamError,
            _ => ErrorCode::InvalidArgument,
        }
    }
}

/// The hex part of a `sha256:` digest, checked; other algorithms are refused.
pub fn digest_hex(digest: &str) -> Result<&str, ImportImageError> {
    match digest.strip_prefix("sha256:") {
        Some(hex)
            if hex.len() == 64
                && hex
                    .bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) =>
        {
            Ok(hex)
        }
        _ => Err(ImportImageError::Invalid {
            reason: format!("{digest:?} is not a sha256 digest"),
        }),
    }
}

/// A content descriptor (`image-spec/descriptor.md`).
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Descriptor {
    #[serde(default)]
    pub media_type: String,
    pub digest: String,
    #[serde(default)]
    pub size: Option<u64>,
    #[serde(default)]
    pub platform: Option<Platform>,
    #[serde(default)]
    pub annotations: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Platform {
    pub architecture: String,
    pub os: String,
    #[serde(default)]
    pub variant: Option<String>,
}

impl std::fmt::Display for Platform {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.os, self.architecture)?;
        if let Some(variant) = &self.variant {
            write!(f, "/{variant}")?;
        }
        Ok(())
    }
}

/// An image index (or Docker manifest list) or an image manifest: which one
/// shows by its fields (the media type is optional in OCI).
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Document {
    #[serde(default)]
    pub schema_version: Option<u32>,
    #[serde(default)]
    pub media_type: Option<String>,
    #[serde(default)]
    pub manifests: Option<Vec<Descriptor>>,
    #[serde(default)]
    pub config: Option<Descriptor>,
    #[serde(default)]
    pub layers: Option<Vec<Descriptor>>,
}

impl Document {
    pub fn parse(bytes: &[u8], what: &str) -> Result<Self, ImportImageError> {
        serde_json::from_slice(bytes).map_err(|e| ImportImageError::Invalid {
            reason: format!("{what} is not an OCI index or manifest: {e}"),
        })
    }
}

/// The image a transport found: its manifest's digest, config and layers.
#[derive(Debug, Clone)]
pub struct Chosen {
    /// The manifest's digest (`sha256:...`); for a docker archive, which has
    /// none, the config's (Docker's image id).
    pub digest: String,
    pub config: Descriptor,
    pub layers: Vec<Descriptor>,
    /// The tag it was found by, if any.
    pub tag: Option<String>,
}

/// The manifest for linux/amd64 among an index's.
pub fn pick_platform(manifests: &[Descriptor]) -> Result<&Descriptor, ImportImageError> {
    let amd64 = manifests.iter().find(|d| {
        d.platform
            .as_ref()
            .is_some_and(|p| p.os == "linux" && p.architecture == "amd64")
    });
    if let Some(found) = amd64 {
        return Ok(found);
    }
    match manifests {
        [only] if only.platform.is_none() => Ok(only),
        [] => Err(ImportImageError::Invalid {
            reason: "the index lists no manifest".into(),
        }),
        _ => Err(ImportImageError::Architecture {
            platform: manifests
                .iter()
                .map(|d| {
                    d.platform
                        .as_ref()
                        .map_or("an unnamed platform".to_string(), Platform::to_string)
                })
                .collect::<Vec<_>>()
                .join(", "),
        }),
    }
}

/// Where a transport's blobs come from: each is opened raw, and checked
/// against its digest by the caller (see [`blobs`]).
pub trait Transport {
    /// The image the reference names, for linux/amd64.
    fn choose(&mut self) -> Result<Chosen, ImportImageError>;
    /// The registry the blobs come from, if they come from one (whose
    /// failure a bad blob then is).
    fn registry(&self) -> Option<&str> {
        None
    }
    /// A blob's bytes, unverified.
    fn open_blob(
        &mut self,
        descriptor: &Descriptor,
    ) -> Result<Box<dyn std::io::Read + '_>, ImportImageError>;
}

/// Follows an index (or a manifest list) down to the linux/amd64 manifest:
/// `top` is the document the reference names, with its digest.
pub fn choose_from(
    transport: &mut dyn Transport,
    mut top: Vec<u8>,
    mut digest: String,
    tag: Option<String>,
) -> Result<Chosen, ImportImageError> {
    // An index of indexes is allowed, but only this deep.
    for _ in 0..3 {
        let doc = Document::parse(&top, &format!("document {digest}"))?;
        if doc.schema_version == Some(1) {
            return Err(ImportImageError::Invalid {
                reason: "the image has a Docker schema 1 manifest, which is not supported".into(),
            });
        }
        if let Some(manifests) = &doc.manifests {
            let chosen = pick_platform(manifests)?.clone();
            top = blobs::read_document(transport, &chosen)?;
            digest = chosen.digest;
            continue;
        }
        let (Some(config), Some(layers)) = (doc.config, doc.layers) else {
            return Err(ImportImageError::Invalid {
                reason: format!("document {digest} is neither an index nor an image manifest"),
            });
        };
        return Ok(Chosen {
            digest,
            config,
            layers,
            tag,
        });
    }
    Err(ImportImageError::Invalid {
        reason: "indexes nest deeper than 3".into(),
    })
}
