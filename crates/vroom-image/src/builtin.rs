//! Images vroom can make without being handed a recipe: the catalog
//! (`recipes/` at the repository root: hello, web, dns, firewall, sniffer),
//! bundled into the binary by the build script and built on first use like
//! any other recipe.

use std::path::PathBuf;

use crate::store::ImageStoreError;

include!(concat!(env!("OUT_DIR"), "/bundled.rs"));

/// The names of the catalog's images, sorted.
pub fn catalog() -> Vec<&'static str> {
    BUNDLED.iter().map(|(name, _)| *name).collect()
}

/// Whether `name` is an image of the catalog.
pub fn in_catalog(name: &str) -> bool {
    BUNDLED.iter().any(|(n, _)| *n == name)
}

/// The kernel modules each catalog image's recipe asks for.
pub fn catalog_modules() -> Vec<(&'static str, Vec<String>)> {
    #[derive(serde::Deserialize)]
    struct Modules {
        #[serde(default)]
        modules: Vec<String>,
    }
    BUNDLED
        .iter()
        .map(|(name, files)| {
            let recipe = files
                .iter()
                .find(|(file, _)| *file == "recipe.toml")
                .and_then(|(_, bytes)| std::str::from_utf8(bytes).ok())
                .and_then(|text| toml::from_str::<Modules>(text).ok())
                .expect("invariant: the catalog's recipes parse (tested below)");
            (*name, recipe.modules)
        })
        .collect()
}

/// Writes a bundled recipe into `dir`; `None` when there is none of that name.
pub fn write_bundled_recipe(name: &str, dir: &std::path::Path) -> Option<std::io::Result<PathBuf>> {
    let (_, files) = BUNDLED.iter().find(|(n, _)| *n == name)?;
    let written = files.iter().try_for_each(|(file, bytes)| {
        let path = dir.join(file);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)?;
        }
        std::fs::write(path, bytes)
    });
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
    #[error(
        "image {image} needs what kernel {kernel} does not build in: {}; add the option to the kernel's config, or build with --kernel debian",
        .missing.join(", ")
    )]
    KernelLacks {
        image: String,
        kernel: String,
        missing: Vec<String>,
    },
    #[error(transparent)]
    Store(#[from] ImageStoreError),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_catalogs_module_lists_are_read() {
        let modules = catalog_modules();
        assert_eq!(modules.len(), catalog().len());
        let firewall = &modules.iter().find(|(n, _)| *n == "firewall").unwrap().1;
        assert!(firewall.iter().any(|m| m == "nft_masq"), "{firewall:?}");
    }

    #[test]
    fn every_builtin_has_a_bundled_recipe_that_loads() {
        assert!(catalog().len() >= 5, "{:?}", catalog());
        for name in catalog() {
            let dir = tempfile::tempdir().unwrap();
            let path = write_bundled_recipe(name, dir.path()).unwrap().unwrap();
            let loaded = crate::recipe::load(&path).unwrap();
            assert_eq!(loaded.recipe.name, name);
        }
        assert!(write_bundled_recipe("nope", std::path::Path::new("/")).is_none());
    }
}
