//! Images: listing, building from recipes, removal.

use super::*;

impl Engine {
    pub fn list_images(&self) -> Result<Vec<ImageSummary>, OpError> {
        self.images.list().map_err(image_error)
    }

    /// Builds an image from a recipe on this host (a blocking job, run off
    /// the async workers); `progress` hears of each stage. `caller` is the
    /// uid that asked: anyone but root gets only their own files read.
    pub(in crate::engine) async fn build_image_unlogged(
        &self,
        recipe: PathBuf,
        update: bool,
        kernel: Option<String>,
        caller: Option<u32>,
        mut progress: impl FnMut(&str, &str) + Send + 'static,
    ) -> Result<BuildReport, OpError> {
        let images = self.images.clone();
        let shown = recipe.display().to_string();
        // An unknown caller is nobody's owner: every file is refused.
        let owner = match caller {
            Some(0) => None,
            Some(uid) => Some(uid),
            None => Some(u32::MAX),
        };
        let result = tokio::task::spawn_blocking(move || {
            images.build(
                &recipe,
                update,
                kernel.as_deref(),
                owner,
                &mut |stage, detail| {
                    tracing::info!(recipe = %recipe.display(), "{stage}: {detail}");
                    progress(stage, detail);
                },
            )
        })
        .await
        .map_err(|e| OpError::internal("the build task failed", e))?;
        result.map_err(|e| match e {
            crate::images::BuildFromRecipeError::Recipe { .. } => {
                OpError::new(ErrorCode::InvalidArgument, e.to_string())
            }
            crate::images::BuildFromRecipeError::Build { .. }
            | crate::images::BuildFromRecipeError::Import { .. } => {
                OpError::wrap(ErrorCode::Internal, format!("cannot build {shown}"), e)
            }
        })
    }

    /// Imports an OCI image on this host (a blocking job, run off the async
    /// workers); `caller` as for a build.
    pub(in crate::engine) async fn import_oci_image_unlogged(
        &self,
        request: vroom_types::ImportImageRequest,
        caller: Option<u32>,
        mut progress: impl FnMut(&str, &str) + Send + 'static,
    ) -> Result<BuildReport, OpError> {
        let images = self.images.clone();
        let owner = match caller {
            Some(0) => None,
            Some(uid) => Some(uid),
            None => Some(u32::MAX),
        };
        let result = tokio::task::spawn_blocking(move || {
            images.import_oci(&request, owner, &mut |stage, detail| {
                tracing::info!(reference = %request.reference, "{stage}: {detail}");
                progress(stage, detail);
            })
        })
        .await
        .map_err(|e| OpError::internal("the import task failed", e))?;
        result.map_err(|e| match e {
            crate::images::BuildFromRecipeError::Recipe { message } => {
                OpError::new(ErrorCode::InvalidArgument, message)
            }
            crate::images::BuildFromRecipeError::Build { message } => {
                OpError::new(ErrorCode::Internal, message)
            }
            crate::images::BuildFromRecipeError::Import { code, message } => {
                OpError::new(code, message)
            }
        })
    }

    /// Removes an image no instance or snapshot uses.
    pub(in crate::engine) async fn remove_image_unlogged(
        &self,
        reference: &str,
    ) -> Result<(), OpError> {
        let _alloc = self.alloc.lock().await;
        let image = self.get_image(reference)?;
        let users: Vec<String> = self
            .list()
            .into_iter()
            .filter(|i| i.image_id == image.id)
            .map(|i| i.spec.name.to_string())
            .chain(
                self.list_snapshots()
                    .into_iter()
                    .filter(|s| s.image_id() == image.id)
                    .map(|s| format!("snapshot {}", s.name)),
            )
            .collect();
        if !users.is_empty() {
            return Err(OpError::conflict(format!(
                "image {} is used by {}",
                image.name,
                users.join(", ")
            )));
        }
        self.images.remove(&image.id).map_err(image_error)
    }

    /// Looks an image up by name or id; never builds one.
    pub fn get_image(&self, reference: &str) -> Result<ImageSummary, OpError> {
        self.images.find(reference).map_err(image_error)
    }

    /// Removes the builds no name points to any more and no instance or
    /// snapshot uses; returns them.
    pub(in crate::engine) async fn prune_images_unlogged(
        &self,
    ) -> Result<Vec<ImageSummary>, OpError> {
        let _alloc = self.alloc.lock().await;
        let used: std::collections::BTreeSet<String> = self
            .list()
            .into_iter()
            .map(|i| i.image_id)
            .chain(
                self.list_snapshots()
                    .into_iter()
                    .map(|s| s.instance.image_id),
            )
            .collect();
        let mut removed = vec![];
        for image in self.list_images()? {
            if image.current || used.contains(&image.id) {
                continue;
            }
            self.images.remove(&image.id).map_err(image_error)?;
            tracing::info!(image = %image.name, id = %image.id, "pruned an older build");
            removed.push(image);
        }
        Ok(removed)
    }

    /// Resolves an image for booting, off the async workers: the first use
    /// of a built-in image builds it.
    /// An image's files, for a peer that lacks it.
    pub fn export_image(&self, id: &str) -> Result<crate::images::ImageExport, OpError> {
        self.images.export(id).map_err(image_error)
    }

    /// A directory to receive an image into (see [`Engine::import_image`]).
    pub fn image_receiving(&self) -> Result<tempfile::TempDir, OpError> {
        self.images.receiving().map_err(image_error)
    }

    /// Takes in an image received from a peer, checked against its id.
    pub(in crate::engine) async fn import_image_unlogged(
        &self,
        id: &str,
        manifest: Vec<u8>,
        dir: tempfile::TempDir,
    ) -> Result<ImageSummary, OpError> {
        let images = self.images.clone();
        let id = id.to_string();
        tokio::task::spawn_blocking(move || images.import(&id, &manifest, dir))
            .await
            .map_err(|e| OpError::internal("the image task failed", e))?
            .map_err(image_error)
    }

    /// Resolves a reference to an image, building a catalog image on first use.
    pub async fn resolve_image_id(&self, reference: &str) -> Result<String, OpError> {
        Ok(self.resolve_image(reference).await?.id)
    }

    pub(super) async fn resolve_image(&self, reference: &str) -> Result<BootImage, OpError> {
        let images = self.images.clone();
        let reference = reference.to_string();
        tokio::task::spawn_blocking(move || images.resolve(&reference))
            .await
            .map_err(|e| OpError::internal("the image task failed", e))?
            .map_err(image_error)
    }
}
