//! Property tests for recipe loading, which reads files a user (or anyone
//! who can write a recipe directory) controls: mangled recipes never panic
//! the loader, and whatever it accepts is valid. Longer run:
//! `PROPTEST_CASES=20000 cargo test -p vroom-image --test recipe_props`.

use proptest::prelude::*;

const HELLO: &str = include_str!("../../../recipes/hello/recipe.toml");
const PAGE: &str = include_str!("../../../recipes/hello/index.html");

/// Applies byte edits (position, new byte or deletion) to the text.
fn mangle(text: &str, edits: &[(usize, Option<u8>)]) -> Vec<u8> {
    let mut bytes = text.as_bytes().to_vec();
    for (at, edit) in edits {
        if bytes.is_empty() {
            break;
        }
        let at = at % bytes.len();
        match edit {
            Some(b) => bytes[at] = *b,
            None => {
                bytes.remove(at);
            }
        }
    }
    bytes
}

fn load(recipe: &[u8]) -> Result<vroom_image::recipe::LoadedRecipe, String> {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("recipe.toml"), recipe).unwrap();
    std::fs::write(dir.path().join("index.html"), PAGE).unwrap();
    vroom_image::recipe::load(&dir.path().join("recipe.toml")).map_err(|e| e.to_string())
}

proptest! {
    #[test]
    fn mangled_recipes_never_panic_and_errors_are_one_line(
        edits in proptest::collection::vec((any::<usize>(), proptest::option::of(any::<u8>())), 1..12)
    ) {
        match load(&mangle(HELLO, &edits)) {
            Ok(loaded) => {
                // Whatever loads is a recipe vroom can name and boot.
                prop_assert!(vroom_types::Name::new(&loaded.recipe.name).is_ok());
            }
            Err(message) => {
                prop_assert!(!message.is_empty());
                prop_assert!(!message.contains("panicked"));
                prop_assert!(!message.trim_end().contains('\n'), "{}", message);
            }
        }
    }

    #[test]
    fn arbitrary_text_never_panics(text in "\\PC{0,400}") {
        let _ = load(text.as_bytes());
    }
}

#[test]
fn the_unmangled_recipe_loads() {
    assert!(load(HELLO.as_bytes()).is_ok());
}
