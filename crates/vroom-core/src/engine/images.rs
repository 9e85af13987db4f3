//! Images: listing, building from recipes, removal.

use super::*;

impl Engine {
    pub fn list_images(&self) -> Result<Vec<ImageSummary>, OpError> {
        self.images.list().map_err(image_error)
    }

    /// Builds an image from a recipe on this host (a blocking job, run off the async workers).
    /// Builds an image from a recipe; `progress` hears of each stage.
    pub async fn build_image(
        &self,
        recipe: PathBuf,
        update: bool,
        mut progress: impl FnMut(&str, &str) + Send + 'static,
    ) -> Result<BuildReport, OpError> {
        let images = self.images.clone();
        let shown = recipe.display().to_string();
        let result = tokio::task::spawn_blocking(move || {
            images.build(&recipe, update, &mut |stage, detail| {
                tracing::info!(recipe = %recipe.display(), "{stage}: {detail}");
                progress(stage, detail);
            })
        })
        .await
        .map_err(|e| OpError::internal("the build task failed", e))?;
        result.map_err(|e| match e {
            crate::images::BuildFromRecipeError::Recipe { .. } => {
                OpError::new(ErrorCode::InvalidArgument, e.to_string())
            }
            crate::images::BuildFromRecipeError::Build { .. } => {
                OpError::wrap(ErrorCode::Internal, format!("cannot build {shown}"), e)
            }
        })
    }

    /// Removes an image no instance uses.
    pub async fn remove_image(&self, reference: &str) -> Result<(), OpError> {
        let _alloc = self.alloc.lock().await;
        let image = self.get_image(reference)?;
        let users: Vec<String> = self
            .list()
            .into_iter()
            .filter(|i| i.image_id == image.id)
            .map(|i| i.spec.name.to_string())
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

    pub fn get_image(&self, reference: &str) -> Result<ImageSummary, OpError> {
        let image = self.images.resolve(reference).map_err(image_error)?;
        let list = self.list_images()?;
        list.into_iter()
            .find(|i| i.id == image.id)
            .ok_or_else(|| OpError::not_found("image", reference))
    }
}
