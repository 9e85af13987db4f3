//! The image seam: how core finds what to boot.

use std::path::PathBuf;

use vroom_types::{BuildReport, ImageManifest, ImageSummary};

/// An image resolved to files on this host.
#[derive(Debug, Clone)]
pub struct BootImage {
    pub id: String,
    pub manifest: ImageManifest,
    pub kernel: PathBuf,
    pub initramfs: PathBuf,
    pub rootfs: PathBuf,
}

/// An image's files, as [`ImageSource::export`] gives them.
#[derive(Debug, Clone)]
pub struct ImageExport {
    pub manifest: Vec<u8>,
    pub files: Vec<(String, PathBuf)>,
}

#[derive(Debug, thiserror::Error)]
pub enum ResolveImageError {
    #[error(
        "unknown image {reference:?}: not built here (`vroom image ls`) and not in the catalog \
         ({catalog}); `vroom image build RECIPE` builds one"
    )]
    NotFound { reference: String, catalog: String },
    #[error("kernel {release} of image {image} is not in the kernel cache; run `vroom setup`")]
    KernelMissing { image: String, release: String },
    /// A built-in image could not be built because what it is built from
    /// could not be fetched (Debian's mirror unreachable or failing).
    #[error("{message}")]
    Upstream { message: String },
    #[error("{message}")]
    Other { message: String },
}

#[derive(Debug, thiserror::Error)]
pub enum BuildFromRecipeError {
    /// The recipe is wrong (unreadable, invalid, unknown or conflicting packages).
    #[error("{message}")]
    Recipe { message: String },
    /// The build failed for another reason (download, packing, disk).
    #[error("{message}")]
    Build { message: String },
    /// An import failed, with the API's code for its cause (the reference,
    /// the image, the registry it comes from, this host).
    #[error("{message}")]
    Import {
        code: vroom_types::ErrorCode,
        message: String,
    },
}

pub trait ImageSource: Send + Sync {
    /// Builds an image from a recipe file, reporting progress per stage.
    /// With `update`, the package indexes are refreshed first and the report
    /// lists the packages that changed. With `owner`, every file read from
    /// the recipe's path must belong to that uid (a non-root caller's build;
    /// catalog recipes are exempt).
    fn build(
        &self,
        recipe: &std::path::Path,
        update: bool,
        kernel: Option<&str>,
        owner: Option<u32>,
        progress: &mut dyn FnMut(&str, &str),
    ) -> Result<BuildReport, BuildFromRecipeError>;

    /// Imports an OCI image (`vroom image import`): `reference` as
    /// [`vroom_types::ImportImageRequest`] says, with `owner` as for
    /// [`ImageSource::build`].
    fn import_oci(
        &self,
        request: &vroom_types::ImportImageRequest,
        owner: Option<u32>,
        progress: &mut dyn FnMut(&str, &str),
    ) -> Result<BuildReport, BuildFromRecipeError> {
        let _ = (owner, progress);
        Err(BuildFromRecipeError::Build {
            message: format!("this host does not import images ({})", request.reference),
        })
    }

    /// Finds an image by name or id, building a built-in one on first use.
    fn resolve(&self, reference: &str) -> Result<BootImage, ResolveImageError>;
    /// Finds an image by name or id without building anything.
    fn find(&self, reference: &str) -> Result<ImageSummary, ResolveImageError>;
    fn list(&self) -> Result<Vec<ImageSummary>, ResolveImageError>;
    /// Deletes an image by id.
    fn remove(&self, id: &str) -> Result<(), ResolveImageError>;

    /// An image's files, to send to another host: its manifest's exact bytes
    /// (they hash to its id) and its other files by name.
    fn export(&self, id: &str) -> Result<ImageExport, ResolveImageError> {
        Err(ResolveImageError::Other {
            message: format!("this host does not share images ({id})"),
        })
    }

    /// A fresh directory to receive an image's files into, for [`ImageSource::import`].
    fn receiving(&self) -> Result<tempfile::TempDir, ResolveImageError> {
        Err(ResolveImageError::Other {
            message: "this host does not take images in".into(),
        })
    }

    /// Takes in an image received from another host, after checking it
    /// against `id` (the manifest's sha256) and the manifest's digests.
    fn import(
        &self,
        id: &str,
        manifest: &[u8],
        dir: tempfile::TempDir,
    ) -> Result<ImageSummary, ResolveImageError> {
        drop(dir);
        Err(ResolveImageError::Other {
            message: format!(
                "this host does not take images in ({id}, {} bytes)",
                manifest.len()
            ),
        })
    }
}
