//! Builds the shipped hello recipe from real Debian packages (CI runs
//! `vroom setup` first, which caches the kernel; `cargo xtask test` builds
//! vroom-init and sets VROOM_INIT).

use std::path::{Path, PathBuf};

use vroom_image::build::{build_recipe, RecipeInputs, Stage};
use vroom_image::{recipe, ImageStore, KernelCache};

fn init_binary() -> PathBuf {
    let path = std::env::var_os("VROOM_INIT")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../../target/x86_64-unknown-linux-gnu/init/vroom-init")
        });
    assert!(
        path.is_file(),
        "vroom-init not found at {}: run `cargo xtask test`",
        path.display()
    );
    path
}

#[test]
fn hello_recipe_builds_reproducibly_with_its_sbom() {
    let cache_dir = std::env::var_os("VROOM_CACHE_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| "/var/cache/vroom".into());
    let kernel = KernelCache::new(&cache_dir)
        .current()
        .expect("a cached kernel: run `vroom setup`");
    let init = init_binary();
    let loaded = recipe::load(
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("../../recipes/hello/recipe.toml"),
    )
    .unwrap();
    let debs = tempfile::tempdir().unwrap();
    let inputs = RecipeInputs {
        kernel: &kernel,
        init: &init,
        deb_cache: debs.path(),
    };

    let mut stages = vec![];
    let first_store = tempfile::tempdir().unwrap();
    let first = build_recipe(
        &loaded,
        &inputs,
        &ImageStore::new(first_store.path()),
        false,
        &mut |stage, _| stages.push(stage),
    )
    .unwrap();
    assert!(!first.cached);
    let first = first.image;
    stages.dedup();
    assert_eq!(
        stages,
        vec![
            Stage::Resolve,
            Stage::Download,
            Stage::Extract,
            Stage::Trim,
            Stage::Pack
        ]
    );

    let sbom = &first.manifest.packages;
    let bb = sbom
        .iter()
        .find(|p| p.name == "busybox-static")
        .expect("busybox-static in the SBOM");
    assert_eq!(bb.source, "busybox");
    assert_eq!(
        first.manifest.appliance.seed_config["greeting"],
        "Hello from vroom!"
    );
    assert!(
        first.manifest.rootfs.size < 8 << 20,
        "a busybox image stays small: {}",
        first.manifest.rootfs.size
    );

    // A second build in a fresh store from the same inputs is byte-identical.
    let second_store = tempfile::tempdir().unwrap();
    let second = build_recipe(
        &loaded,
        &inputs,
        &ImageStore::new(second_store.path()),
        false,
        &mut |_, _| {},
    )
    .unwrap()
    .image;
    assert_eq!(
        first.manifest.rootfs.sha256, second.manifest.rootfs.sha256,
        "rootfs is reproducible"
    );
    assert_eq!(
        first.manifest.initramfs.sha256, second.manifest.initramfs.sha256,
        "initramfs is reproducible"
    );
    assert_eq!(first.id, second.id);

    // Rebuilding the unchanged recipe into the same store does nothing.
    let mut stages = vec![];
    let again = build_recipe(
        &loaded,
        &inputs,
        &ImageStore::new(first_store.path()),
        false,
        &mut |stage, detail| stages.push(format!("{stage}: {detail}")),
    )
    .unwrap();
    assert!(again.cached, "{stages:?}");
    assert_eq!(again.image.id, first.id);
    assert!(
        !stages.iter().any(|s| s.starts_with("download")),
        "{stages:?}"
    );

    // A changed file in the recipe's directory is a new build.
    let copy = tempfile::tempdir().unwrap();
    for file in ["recipe.toml", "index.html"] {
        std::fs::copy(loaded.dir.join(file), copy.path().join(file)).unwrap();
    }
    std::fs::write(copy.path().join("index.html"), "<h1>{{ greeting }}!</h1>").unwrap();
    let changed = recipe::load(&copy.path().join("recipe.toml")).unwrap();
    let rebuilt = build_recipe(
        &changed,
        &inputs,
        &ImageStore::new(first_store.path()),
        false,
        &mut |_, _| {},
    )
    .unwrap();
    assert!(!rebuilt.cached);
    assert_ne!(rebuilt.image.id, first.id);
}
