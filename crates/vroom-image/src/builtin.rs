//! Images vroom can make without being handed a recipe: the recipes bundled
//! into the binary. For now only `hello` (recipes/hello: busybox's httpd
//! serving a page whose heading comes from the `greeting` config key), built
//! on first use like any other recipe.

use std::path::PathBuf;

use crate::store::ImageStoreError;

pub const BUILTIN_IMAGES: &[&str] = &["hello"];

/// The files of the bundled recipes, by image name.
const BUNDLED: &[(&str, &[(&str, &str)])] = &[(
    "hello",
    &[
        (
            "recipe.toml",
            include_str!("../../../recipes/hello/recipe.toml"),
        ),
        (
            "index.html",
            include_str!("../../../recipes/hello/index.html"),
        ),
    ],
)];

/// Writes a bundled recipe into `dir`; `None` when there is none of that name.
pub fn write_bundled_recipe(name: &str, dir: &std::path::Path) -> Option<std::io::Result<PathBuf>> {
    let (_, files) = BUNDLED.iter().find(|(n, _)| *n == name)?;
    let written = files
        .iter()
        .try_for_each(|(file, text)| std::fs::write(dir.join(file), text));
    Some(written.map(|()| dir.join("recipe.toml")))
}

#[derive(Debug, thiserror::Error)]
pub enum BuildImageError {
    #[error("failed to stage {what}")]
    Stage {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("failed to pack the image: {reason}")]
    Pack { reason: String },
    #[error(transparent)]
    Store(#[from] ImageStoreError),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_builtin_has_a_bundled_recipe_that_loads() {
        for name in BUILTIN_IMAGES {
            let dir = tempfile::tempdir().unwrap();
            let path = write_bundled_recipe(name, dir.path()).unwrap().unwrap();
            let loaded = crate::recipe::load(&path).unwrap();
            assert_eq!(loaded.recipe.name, *name);
        }
        assert!(write_bundled_recipe("nope", std::path::Path::new("/")).is_none());
    }
}
