//! Bundles the catalog (`recipes/*` at the repository root) into the binary:
//! every file of every recipe directory becomes an `include_bytes!` in
//! `$OUT_DIR/bundled.rs`, so `vroom run firewall` can build the firewall on
//! first use from an installed binary, and a recipe file added later is
//! picked up without editing code.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

fn files_under(dir: &Path, out: &mut Vec<PathBuf>) {
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", dir.display()))
        .flatten()
        .map(|e| e.path())
        .collect();
    entries.sort();
    for path in entries {
        if path.is_dir() {
            files_under(&path, out);
        } else if path.is_file() {
            out.push(path);
        }
    }
}

fn main() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../recipes");
    let root = root.canonicalize().expect("the recipes directory exists");
    println!("cargo:rerun-if-changed={}", root.display());
    let mut recipes: Vec<PathBuf> = std::fs::read_dir(&root)
        .expect("the recipes directory is readable")
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.join("recipe.toml").is_file())
        .collect();
    recipes.sort();
    let mut code = String::from(
        "/// One file of a bundled recipe: its path in the recipe dir and its bytes.\n\
         pub type BundledFile = (&'static str, &'static [u8]);\n\
         /// The catalog's recipes: (name, files).\n\
         pub const BUNDLED: &[(&str, &[BundledFile])] = &[\n",
    );
    for dir in recipes {
        let name = dir
            .file_name()
            .and_then(|n| n.to_str())
            .expect("utf-8 recipe name");
        let mut files = vec![];
        files_under(&dir, &mut files);
        writeln!(code, "    ({name:?}, &[").unwrap();
        for file in files {
            let rel = file.strip_prefix(&dir).expect("under the recipe dir");
            let rel = rel.to_str().expect("utf-8 file name");
            let abs = file.to_str().expect("utf-8 path");
            writeln!(code, "        ({rel:?}, include_bytes!({abs:?})),").unwrap();
        }
        writeln!(code, "    ]),").unwrap();
    }
    code.push_str("];\n");
    let out = Path::new(&std::env::var("OUT_DIR").expect("cargo sets OUT_DIR")).join("bundled.rs");
    std::fs::write(out, code).expect("OUT_DIR is writable");
}
