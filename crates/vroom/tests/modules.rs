//! Keeps every crate's modules acyclic: reads each workspace crate's
//! `src/**/*.rs` and, for every module with children (the crate root,
//! `src/engine/`, ...), draws an edge A → B between two of its children
//! when a file of A (or of a module below A) names B (or something below
//! B): through `crate::`, enough `super::`s, or, in a file that glob-imports
//! its parent (`use super::*`), B's bare name. It fails on a cycle among
//! the children of one module, printing it with the files that make each
//! edge. A module naming its parent's own items, or one of its own
//! children, is no edge: only siblings are compared. The crate roots
//! (`lib.rs`, `main.rs`) are not modules of the graph: they declare the
//! others.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Cycles that exist today and are being taken apart: (crate, the modules of
/// the cycle, by their path from the crate root). A cycle passes if all its
/// modules are in one entry; an entry no cycle needs any more fails too, so
/// that the list only shrinks.
const KNOWN_CYCLES: &[(&str, &[&str])] = &[];

#[test]
fn no_crate_has_a_module_cycle() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let mut failures = vec![];
    let mut needed: BTreeSet<(String, Vec<String>)> = BTreeSet::new();
    let mut checked = 0;
    for krate in workspace_crates(&root) {
        let name = krate.file_name().unwrap().to_string_lossy().to_string();
        let graph = module_graph(&krate.join("src"));
        checked += 1;
        for cycle in cycles(&graph) {
            let known = KNOWN_CYCLES.iter().find(|(c, modules)| {
                *c == name && cycle.iter().all(|m| modules.contains(&m.as_str()))
            });
            match known {
                Some((c, modules)) => {
                    needed.insert((
                        c.to_string(),
                        modules.iter().map(|m| m.to_string()).collect(),
                    ));
                }
                None => failures.push(describe(&name, &cycle, &graph)),
            }
        }
    }
    assert!(
        checked >= 10,
        "found only {checked} crates under {}",
        root.display()
    );
    for (krate, modules) in KNOWN_CYCLES {
        let entry = (
            krate.to_string(),
            modules.iter().map(|m| m.to_string()).collect(),
        );
        if !needed.contains(&entry) {
            failures.push(format!(
                "{krate}: the known cycle {modules:?} is gone: remove it from KNOWN_CYCLES"
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "module cycles:\n{}",
        failures.join("\n")
    );
}

/// The directories of the workspace's crates: `crates/*` and `xtask`.
fn workspace_crates(root: &Path) -> Vec<PathBuf> {
    let mut crates: Vec<PathBuf> = std::fs::read_dir(root.join("crates"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.join("Cargo.toml").is_file())
        .collect();
    crates.push(root.join("xtask"));
    crates.sort();
    crates
}

/// Module → (module it names → the first file that names it), modules by
/// their path from the crate root (`engine::migrate`). Edges only join
/// children of one module, so every cycle lies among siblings.
type Graph = BTreeMap<String, BTreeMap<String, String>>;

fn module_graph(src: &Path) -> Graph {
    let mut files = vec![];
    rust_files(src, &mut files);
    let module_of = |file: &Path| -> Vec<String> {
        let rel = file.strip_prefix(src).unwrap();
        let mut path: Vec<String> = rel
            .iter()
            .map(|c| c.to_string_lossy().trim_end_matches(".rs").to_string())
            .collect();
        if path.last().is_some_and(|l| l == "mod") {
            path.pop();
        }
        if path.len() == 1 && (path[0] == "lib" || path[0] == "main") {
            path.clear();
        }
        path
    };
    // Every module, and every directory that holds modules.
    let mut modules: BTreeSet<Vec<String>> = BTreeSet::new();
    for file in &files {
        let module = module_of(file);
        for len in 1..=module.len() {
            modules.insert(module[..len].to_vec());
        }
    }
    let mut graph = Graph::new();
    for file in &files {
        let module = module_of(file);
        if module.is_empty() {
            continue;
        }
        let text = std::fs::read_to_string(file).unwrap();
        let rel = file.strip_prefix(src.parent().unwrap()).unwrap();
        for target in referenced_modules(&text, &module, &modules) {
            // The two siblings below the modules' closest common parent.
            let common = module
                .iter()
                .zip(&target)
                .take_while(|(a, b)| a == b)
                .count();
            let from = module[..=common].join("::");
            let to = target[..=common].join("::");
            graph
                .entry(from)
                .or_default()
                .entry(to)
                .or_insert_with(|| rel.display().to_string());
        }
    }
    graph
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The modules (paths from the crate root, among `modules`) that a file
/// of `module` names, leaving out `module` itself, its ancestors (a child
/// naming its parent's items) and its descendants.
fn referenced_modules(
    text: &str,
    module: &[String],
    modules: &BTreeSet<Vec<String>>,
) -> BTreeSet<Vec<String>> {
    let tokens = tokens(&strip_comments_and_literals(text));
    let parent = &module[..module.len().saturating_sub(1)];
    // In a file that glob-imports its parent, a sibling's bare name is the
    // sibling (`snapshots::copy_hashed`), unless the file has a child of
    // that name.
    let globbed = tokens
        .windows(5)
        .any(|w| w[0] == "use" && w[1] == "super" && w[2] == "::" && w[3] == "*" && w[4] == ";");
    let sibling = |name: &str| {
        let mut path = parent.to_vec();
        path.push(name.to_string());
        let mut child = module.to_vec();
        child.push(name.to_string());
        (path.as_slice() != module && modules.contains(&path) && !modules.contains(&child))
            .then_some(path)
    };
    let mut paths: Vec<Vec<String>> = vec![];
    // The brace depth inside each inline module (`mod tests { ... }`)
    // around this point: `super::` starts from the innermost.
    let mut inline: Vec<usize> = vec![];
    let mut depth = 0;
    let mut i = 0;
    while i < tokens.len() {
        let t = tokens[i].as_str();
        let after_path = i > 0 && tokens[i - 1] == "::";
        match t {
            "{" => depth += 1,
            "}" => {
                depth -= 1;
                if inline.last().is_some_and(|&d| depth < d) {
                    inline.pop();
                }
            }
            "mod" if tokens.get(i + 2).is_some_and(|t| t == "{") => inline.push(depth + 1),
            "crate"
                if (i == 0 || tokens[i - 1] != "$")
                    && tokens.get(i + 1).is_some_and(|t| t == "::") =>
            {
                expand(&[], &tokens[i + 2..], &mut paths);
            }
            "super" if !after_path => {
                let mut ups = 0;
                let mut j = i;
                while tokens.get(j).is_some_and(|t| t == "super")
                    && tokens.get(j + 1).is_some_and(|t| t == "::")
                {
                    ups += 1;
                    j += 2;
                }
                // Past the inline modules, each `super` is one module up.
                if ups > inline.len() && ups - inline.len() <= module.len() {
                    let base = &module[..module.len() - (ups - inline.len())];
                    expand(base, &tokens[j..], &mut paths);
                }
            }
            name if globbed
                && !after_path
                && tokens.get(i + 1).is_some_and(|t| t == "::")
                && !matches!(name, "self" | "Self") =>
            {
                if let Some(path) = sibling(name) {
                    expand(&path, &tokens[i + 2..], &mut paths);
                }
            }
            _ => {}
        }
        i += 1;
    }
    paths
        .into_iter()
        .filter_map(|path| {
            // The longest prefix that is a module: `a::b::f` names `a::b`.
            (1..=path.len())
                .rev()
                .map(|len| path[..len].to_vec())
                .find(|p| modules.contains(p))
        })
        .filter(|target| !target.starts_with(module) && !module.starts_with(target))
        .collect()
}

/// The paths that `tokens` start below `base`: `a::x` gives `base::a::x`,
/// `{a::x, b}` gives both, and nested groups likewise.
fn expand(base: &[String], tokens: &[String], out: &mut Vec<Vec<String>>) {
    let is_ident = |t: &str| t.starts_with(|c: char| c.is_alphabetic() || c == '_');
    let mut path = base.to_vec();
    let mut i = 0;
    loop {
        match tokens.get(i).map(String::as_str) {
            Some("{") => {
                // Each item of the group, up to its closing brace.
                let mut depth = 0;
                let mut item_start = i + 1;
                for (j, t) in tokens.iter().enumerate().skip(i) {
                    match t.as_str() {
                        "{" => depth += 1,
                        "}" | "," if depth == 1 => {
                            if j > item_start {
                                expand(&path, &tokens[item_start..j], out);
                            }
                            item_start = j + 1;
                            if t == "}" {
                                break;
                            }
                        }
                        "}" => depth -= 1,
                        _ => {}
                    }
                }
                return;
            }
            Some(t) if is_ident(t) && t != "self" => {
                path.push(t.to_string());
                if tokens.get(i + 1).is_some_and(|t| t == "::") {
                    i += 2;
                    continue;
                }
                break;
            }
            _ => break,
        }
    }
    if path.len() > base.len() || !base.is_empty() {
        out.push(path);
    }
}

/// Identifiers, `::`, and every other character as a token of its own.
fn tokens(text: &str) -> Vec<String> {
    let chars: Vec<char> = text.chars().collect();
    let mut out = vec![];
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        if c.is_alphanumeric() || c == '_' {
            let start = i;
            while i < chars.len() && (chars[i].is_alphanumeric() || chars[i] == '_') {
                i += 1;
            }
            out.push(chars[start..i].iter().collect());
            continue;
        }
        if c == ':' && chars.get(i + 1) == Some(&':') {
            out.push("::".into());
            i += 2;
            continue;
        }
        if !c.is_whitespace() {
            out.push(c.to_string());
        }
        i += 1;
    }
    out
}

/// The text with comments, strings and character literals blanked out: a
/// path in a doc comment or a message is not an import.
fn strip_comments_and_literals(text: &str) -> String {
    let c: Vec<char> = text.chars().collect();
    let mut out = String::with_capacity(text.len());
    let mut i = 0;
    let ident = |ch: char| ch.is_alphanumeric() || ch == '_';
    while i < c.len() {
        // Line comment.
        if c[i] == '/' && c.get(i + 1) == Some(&'/') {
            while i < c.len() && c[i] != '\n' {
                i += 1;
            }
            continue;
        }
        // Block comment, nested.
        if c[i] == '/' && c.get(i + 1) == Some(&'*') {
            let mut nest = 0;
            while i < c.len() {
                if c[i] == '/' && c.get(i + 1) == Some(&'*') {
                    nest += 1;
                    i += 2;
                } else if c[i] == '*' && c.get(i + 1) == Some(&'/') {
                    nest -= 1;
                    i += 2;
                    if nest == 0 {
                        break;
                    }
                } else {
                    i += 1;
                }
            }
            out.push(' ');
            continue;
        }
        // Raw string: r"..", r#".."#, br#".."#.
        let raw_start = match (c[i], c.get(i + 1)) {
            ('r', Some('"' | '#')) => Some(i + 1),
            ('b', Some('r')) if matches!(c.get(i + 2), Some('"' | '#')) => Some(i + 2),
            _ => None,
        };
        if let Some(mut j) = raw_start.filter(|_| i == 0 || !ident(c[i - 1])) {
            let mut hashes = 0;
            while c.get(j) == Some(&'#') {
                hashes += 1;
                j += 1;
            }
            if c.get(j) == Some(&'"') {
                j += 1;
                'raw: while j < c.len() {
                    if c[j] == '"' && (0..hashes).all(|h| c.get(j + 1 + h) == Some(&'#')) {
                        j += 1 + hashes;
                        break 'raw;
                    }
                    j += 1;
                }
                out.push_str(" \"\" ");
                i = j;
                continue;
            }
        }
        // String (and byte string).
        if c[i] == '"' {
            i += 1;
            while i < c.len() && c[i] != '"' {
                i += if c[i] == '\\' { 2 } else { 1 };
            }
            i += 1;
            out.push_str(" \"\" ");
            continue;
        }
        // Character literal, not a lifetime: 'x', '\n', '\u{..}'.
        if c[i] == '\'' {
            if c.get(i + 1) == Some(&'\\') {
                let mut j = i + 2;
                while j < c.len() && c[j] != '\'' {
                    j += 1;
                }
                i = j + 1;
                out.push_str(" ' ");
                continue;
            }
            if c.get(i + 2) == Some(&'\'') {
                i += 3;
                out.push_str(" ' ");
                continue;
            }
        }
        out.push(c[i]);
        i += 1;
    }
    out
}

/// Every strongly connected component of more than one module (Tarjan).
fn cycles(graph: &Graph) -> Vec<Vec<String>> {
    struct State<'a> {
        graph: &'a Graph,
        index: BTreeMap<&'a str, usize>,
        low: BTreeMap<&'a str, usize>,
        stack: Vec<&'a str>,
        on_stack: BTreeSet<&'a str>,
        found: Vec<Vec<String>>,
    }
    fn visit<'a>(s: &mut State<'a>, v: &'a str) {
        let n = s.index.len();
        s.index.insert(v, n);
        s.low.insert(v, n);
        s.stack.push(v);
        s.on_stack.insert(v);
        let graph = s.graph;
        for w in graph.get(v).into_iter().flat_map(|e| e.keys()) {
            let w = w.as_str();
            if !s.index.contains_key(w) {
                visit(s, w);
                let low = s.low[v].min(s.low[w]);
                s.low.insert(v, low);
            } else if s.on_stack.contains(w) {
                let low = s.low[v].min(s.index[w]);
                s.low.insert(v, low);
            }
        }
        if s.low[v] == s.index[v] {
            let mut component = vec![];
            loop {
                let w = s.stack.pop().unwrap();
                s.on_stack.remove(w);
                component.push(w.to_string());
                if w == v {
                    break;
                }
            }
            if component.len() > 1 {
                component.sort();
                s.found.push(component);
            }
        }
    }
    let mut state = State {
        graph,
        index: BTreeMap::new(),
        low: BTreeMap::new(),
        stack: vec![],
        on_stack: BTreeSet::new(),
        found: vec![],
    };
    for v in graph.keys() {
        if !state.index.contains_key(v.as_str()) {
            visit(&mut state, v);
        }
    }
    state.found
}

fn describe(krate: &str, cycle: &[String], graph: &Graph) -> String {
    let mut out = format!(
        "{krate}: {} modules in a cycle: {}\n",
        cycle.len(),
        cycle.join(", ")
    );
    for from in cycle {
        for (to, file) in &graph[from] {
            if cycle.contains(to) {
                out += &format!("  {from} -> {to}   ({file})\n");
            }
        }
    }
    out
}

/// The parser on the shapes it must see through, and those it must not take
/// for a reference.
#[test]
fn references_are_read_from_code_only_table() {
    let modules: BTreeSet<Vec<String>> = [
        "a",
        "b",
        "d",
        "x",
        "x::y",
        "engine",
        "engine::migrate",
        "engine::snapshots",
        "engine::markers",
        "engine::rooms",
        "engine::rooms::dns",
    ]
    .iter()
    .map(|m| m.split("::").map(String::from).collect())
    .collect();
    let cases: &[(&str, &str, &[&str])] = &[
        ("use crate::a;", "x", &["a"]),
        ("use crate::{a, b::c, d::{e, f}};", "x", &["a", "b", "d"]),
        ("fn f() { crate::a::g(); }", "x", &["a"]),
        (
            "// use crate::a;\n/* crate::b */ let s = \"crate::c\";",
            "x",
            &[],
        ),
        ("/// [`crate::a`]\nfn f() {}", "x", &[]),
        (
            "let r = r#\"crate::a\"#; let c = '\"'; use crate::b;",
            "x",
            &["b"],
        ),
        ("fn f<'a>(x: &'a str) { crate::a::g(x) }", "x", &["a"]),
        ("macro_rules! m { () => { $crate::a::g() } }", "x", &[]),
        // From src/x.rs, `super` is the root; in src/x/y.rs it is x.
        ("use super::a;", "x", &["a"]),
        ("use super::a;", "x::y", &[]),
        ("use super::super::a;", "x::y", &["a"]),
        // Inside an inline module, one `super` more.
        ("mod tests { use super::*; use super::a; }", "x", &[]),
        ("mod tests { use super::super::a; }", "x", &["a"]),
        ("mod tests { } use super::a;", "x", &["a"]),
        // Siblings below one parent: by `super::`, by `crate::`, and by
        // their bare names through a glob import of the parent.
        (
            "use super::markers::{clear_marker, MIGRATE_MARKER};",
            "engine::migrate",
            &["engine::markers"],
        ),
        (
            "use crate::engine::{snapshots::X, rooms};",
            "engine::migrate",
            &["engine::snapshots", "engine::rooms"],
        ),
        (
            "use super::*; fn f() { snapshots::copy(); }",
            "engine::migrate",
            &["engine::snapshots"],
        ),
        (
            "use super::*; mod tests { use super::*; fn f() { snapshots::g() } }",
            "engine::migrate",
            &["engine::snapshots"],
        ),
        // A child naming its parent's own items, or a name it was not
        // given: no edge.
        (
            "use super::*; fn f() { super::blocking(); Engine::new(); }",
            "engine::migrate",
            &[],
        ),
        ("fn f() { snapshots::copy(); }", "engine::migrate", &[]),
        // Its own child by that name, in a module of the same name as a
        // sibling's child: no edge.
        (
            "use super::*; fn f() { dns::zone(); }",
            "engine::rooms",
            &[],
        ),
        // A grandchild naming its parent's sibling: the edge is between
        // the two children of their common parent.
        (
            "use super::super::snapshots;",
            "engine::rooms::dns",
            &["engine::snapshots"],
        ),
    ];
    for (text, module, want) in cases {
        let module: Vec<String> = module.split("::").map(String::from).collect();
        let got: BTreeSet<String> = referenced_modules(text, &module, &modules)
            .into_iter()
            .map(|m| m.join("::"))
            .collect();
        let want: BTreeSet<String> = want.iter().map(|w| w.to_string()).collect();
        assert_eq!(got, want, "{text:?} in {module:?}");
    }
}
