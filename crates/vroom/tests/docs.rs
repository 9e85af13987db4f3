//! Docs that name code are checked against it (as rust-analyzer's tidy
//! does): every file path that README.md, ARCHITECTURE.md and docs/*.md
//! put in backticks, and every relative link they make, must exist.
//!
//! A path starting at a top-level directory (`crates/...`, `xtask/...`,
//! `recipes/...`, `docs/...`, `kernel/...`, `.ci/...`) must exist as
//! written; a shorter one that ends in a file name (`engine/snapshots.rs`,
//! `tests/jail.rs`) must be the end of some file's path in the repository.
//! Placeholders (`DATA/...`, `<name>`, globs) and absolute paths (guest or
//! host paths such as `/config`) are not repository paths and are skipped.

use std::path::{Path, PathBuf};

/// Paths ARCHITECTURE.md still names though they are gone: the document
/// is rewritten once the restructuring of issue 24 has landed. Empty this
/// list then; the test fails for a path listed here that is no longer named
/// or exists again, so the list cannot outlive the rewrite.
const KNOWN_STALE_IN_ARCHITECTURE: &[&str] = &[];

const TOP_LEVEL: &[&str] = &[
    "crates/",
    "xtask/",
    "recipes/",
    "docs/",
    "kernel/",
    ".ci/",
    "packaging/",
];

const FILE_ENDINGS: &[&str] = &[
    ".rs", ".md", ".toml", ".json", ".sh", ".config", ".conf", ".html", ".lock",
];

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// Every file of the repository, relative to its root (no build output).
fn repository_files(root: &Path) -> Vec<String> {
    fn walk(root: &Path, dir: &Path, out: &mut Vec<String>) {
        for entry in std::fs::read_dir(dir).unwrap().flatten() {
            let path = entry.path();
            let name = entry.file_name();
            if name == "target" || name == ".git" {
                continue;
            }
            if path.is_dir() {
                walk(root, &path, out);
            } else {
                out.push(
                    path.strip_prefix(root)
                        .unwrap()
                        .to_string_lossy()
                        .into_owned(),
                );
            }
        }
    }
    let mut out = vec![];
    walk(root, root, &mut out);
    out
}

/// The backticked spans of a markdown text that are repository paths.
fn backticked_paths(text: &str) -> Vec<String> {
    let mut paths = vec![];
    let mut in_fence = false;
    for line in text.lines() {
        // Fenced code blocks hold commands and files, not paths in backticks.
        if line.trim_start().starts_with("```") {
            in_fence = !in_fence;
            continue;
        }
        if in_fence {
            continue;
        }
        for (i, span) in line.split('`').enumerate() {
            if i % 2 == 0 || span.is_empty() {
                continue;
            }
            let path_shaped = span
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "._/-".contains(c))
                && span.contains('/')
                && !span.starts_with('/')
                && !span.starts_with(|c: char| c.is_ascii_uppercase());
            let is_path = TOP_LEVEL.iter().any(|t| span.starts_with(t))
                || FILE_ENDINGS.iter().any(|e| span.ends_with(e));
            if path_shaped && is_path {
                paths.push(span.to_string());
            }
        }
    }
    paths
}

/// The targets of a markdown text's relative links (`[text](target)`),
/// without their `#anchor`.
fn relative_links(text: &str) -> Vec<String> {
    let mut links = vec![];
    let mut rest = text;
    while let Some(at) = rest.find("](") {
        rest = &rest[at + 2..];
        let Some(end) = rest.find(')') else { break };
        let target = rest[..end].split('#').next().unwrap_or("");
        if !target.is_empty() && !target.contains("://") && !target.starts_with("mailto:") {
            links.push(target.to_string());
        }
        rest = &rest[end..];
    }
    links
}

/// What a document names that does not exist: backticked paths (resolved
/// from the root, or as a path's end) and relative links (from the
/// document's directory).
fn missing_in(root: &Path, files: &[String], doc: &str) -> Vec<String> {
    let text = std::fs::read_to_string(root.join(doc)).unwrap();
    let mut missing = vec![];
    for path in backticked_paths(&text) {
        let trimmed = path.trim_end_matches('/');
        let exists = if TOP_LEVEL.iter().any(|t| path.starts_with(t)) {
            root.join(trimmed).exists()
        } else {
            files
                .iter()
                .any(|f| f == trimmed || f.ends_with(&format!("/{trimmed}")))
        };
        if !exists {
            missing.push(path);
        }
    }
    let dir = Path::new(doc).parent().unwrap_or(Path::new(""));
    for link in relative_links(&text) {
        if !root.join(dir).join(&link).exists() {
            missing.push(link);
        }
    }
    missing
}

#[test]
fn every_path_the_docs_name_exists() {
    let root = root();
    let files = repository_files(&root);
    let mut docs = vec!["README.md".to_string()];
    let mut topics: Vec<String> = files
        .iter()
        .filter(|f| f.starts_with("docs/") && f.ends_with(".md"))
        .cloned()
        .collect();
    topics.sort();
    docs.extend(topics);
    let mut problems = vec![];
    for doc in &docs {
        for path in missing_in(&root, &files, doc) {
            problems.push(format!("{doc} names `{path}`, which does not exist"));
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

#[test]
fn every_path_architecture_md_names_exists_but_the_known_stale_ones() {
    let root = root();
    let files = repository_files(&root);
    let missing = missing_in(&root, &files, "ARCHITECTURE.md");
    for stale in KNOWN_STALE_IN_ARCHITECTURE {
        eprintln!("ARCHITECTURE.md: known stale path `{stale}` (rewrite pending)");
    }
    let new: Vec<&String> = missing
        .iter()
        .filter(|p| !KNOWN_STALE_IN_ARCHITECTURE.contains(&p.as_str()))
        .collect();
    assert!(
        new.is_empty(),
        "ARCHITECTURE.md names paths that do not exist: {new:?}"
    );
    let fixed: Vec<&&str> = KNOWN_STALE_IN_ARCHITECTURE
        .iter()
        .filter(|p| !missing.iter().any(|m| m == *p))
        .collect();
    assert!(
        fixed.is_empty(),
        "ARCHITECTURE.md no longer names these missing paths: remove them from KNOWN_STALE_IN_ARCHITECTURE: {fixed:?}"
    );
}

#[test]
fn paths_and_links_are_found_in_markdown() {
    let text = "See `crates/vroom/src/main.rs`, `engine/snapshots.rs` and `DATA/cluster.json`,\n\
                `/config`, `snapshots/.partial-*`, `vroom run`, [a](docs/x.md#part), [b](https://e.x/).\n\
                ```sh\nvroom `not/a/path.rs`\n```\n";
    assert_eq!(
        backticked_paths(text),
        ["crates/vroom/src/main.rs", "engine/snapshots.rs"]
    );
    assert_eq!(relative_links(text), ["docs/x.md"]);
}
