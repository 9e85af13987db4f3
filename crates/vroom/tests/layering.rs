//! Keeps the architecture true: reads `cargo metadata`, places every
//! workspace member in a layer and fails when a crate depends on something
//! its layer must not know, or when a crate is in no layer at all.
//!
//! The rules are one pure function, [`violations`], over a dependency map
//! (crate → its direct normal dependencies), so they are tested on made-up
//! graphs too (see `the_check_*`).

use std::collections::BTreeMap;
use std::process::Command;

/// Where a crate sits. Dependencies point inward: a layer may use only the
/// layers [`may_use`] lists, and nothing uses the binary, the guest or the
/// tooling.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Layer {
    /// std-level helpers every crate may use, the guest init included
    /// (poison-tolerant locks, base64 in JSON, a failed tool's message).
    Base,
    /// Domain and API data types: names, specs, statuses, validation. No I/O.
    Domain,
    /// The host↔guest protocol: framing and messages. Tiny and fuzzable.
    Protocol,
    /// The config volume, the other host↔guest interface: the core writes
    /// it itself (it is a file format, not a seam).
    Volume,
    /// The engine, its state machine and the seams (traits) it drives.
    Core,
    /// Host building blocks that more than one adapter or the binary use,
    /// knowing no engine: the jail, reading user-named files.
    Host,
    /// Implementations of the core's seams and of the outside world's
    /// protocols. No edges between two adapters (see [`ALLOWED_EDGES`]).
    Adapter,
    /// HTTP: routes, extractors, the OpenAPI document.
    Api,
    /// The typed API client.
    Client,
    /// The composition root: the CLI and `vroom daemon`.
    Binary,
    /// The static guest init: no host crate, no async runtime.
    Guest,
    /// Developer tasks and benchmarks, outside the product.
    Tooling,
}

use Layer::*;

/// Every workspace member and its layer. A new crate fails the check until
/// it is placed here.
const LAYERS: &[(&str, Layer)] = &[
    ("vroom-base", Base),
    ("vroom-types", Domain),
    ("vroom-agent-proto", Protocol),
    ("vroom-volume", Volume),
    ("vroom-core", Core),
    ("vroom-jail", Host),
    ("vroom-input", Host),
    ("vroom-qemu", Adapter),
    ("vroom-net", Adapter),
    ("vroom-image", Adapter),
    ("vroom-store", Adapter),
    ("vroom-cluster", Adapter),
    ("vroom-api", Api),
    ("vroom-client", Client),
    ("vroom", Binary),
    ("vroom-init", Guest),
    ("xtask", Tooling),
    ("vroom-bench", Tooling),
    ("vroom-lab", Tooling),
];

/// The layers whose crates a crate of `layer` may depend on.
fn may_use(layer: Layer) -> &'static [Layer] {
    match layer {
        Base => &[],
        Domain | Protocol => &[Base],
        Volume => &[Base, Domain, Protocol],
        Core => &[Base, Domain, Protocol, Volume],
        Host => &[Base, Domain],
        Adapter => &[Base, Domain, Protocol, Volume, Core, Host],
        Api => &[Base, Domain, Core],
        Client => &[Base, Domain],
        Guest => &[Base, Domain, Protocol],
        Binary => &[
            Base, Domain, Protocol, Volume, Core, Host, Adapter, Api, Client,
        ],
        // The benches drive the product (the `vroom` crate's library) and
        // the lab.
        Tooling => &[
            Base, Domain, Protocol, Volume, Core, Host, Adapter, Api, Client, Binary, Tooling,
        ],
    }
}

/// Edges between workspace crates that the layers alone would refuse, each
/// with its reason. Keep this list short: an entry is a boundary to revisit.
const ALLOWED_EDGES: &[(&str, &str, &str)] = &[(
    "vroom-cluster",
    "vroom-client",
    "a node calls its peers' API (forwarding, migration) through the typed client",
)];

/// Outside crates a workspace crate must not depend on, whatever its layer
/// allows among workspace crates.
const FORBIDDEN: &[(&str, &[&str])] = &[
    // The helpers under everything: std, serde and base64 only.
    ("vroom-base", &["tokio", "thiserror", "libc"]),
    // Domain types: no I/O, no transport.
    (
        "vroom-types",
        &["tokio", "axum", "hyper", "rtnetlink", "redb"],
    ),
    // Core: no HTTP, QMP (the QEMU driver), netlink, etcd or database.
    (
        "vroom-core",
        &[
            "axum",
            "hyper",
            "rtnetlink",
            "netlink-packet-route",
            "etcd-client",
            "redb",
        ],
    ),
    // The protocol crate stays tiny and fuzzable.
    ("vroom-agent-proto", &["tokio"]),
    // The guest init is a small static binary: no async runtime.
    ("vroom-init", &["tokio", "fatfs"]),
    // Only the API crate knows HTTP server types; only the QEMU driver speaks QMP.
    ("vroom-qemu", &["axum", "hyper", "rtnetlink"]),
    ("vroom-net", &["axum", "hyper"]),
    ("vroom-client", &["axum"]),
];

/// Outside crates only the listed workspace crates may use.
const ONLY_USED_BY: &[(&str, &[&str])] = &[
    // HTTP serving: the API crate, and the composition root that serves it.
    ("axum", &["vroom", "vroom-api"]),
    // etcd: the cluster adapter alone.
    ("etcd-client", &["vroom-cluster"]),
    // The embedded database: the store adapter alone.
    ("redb", &["vroom-store"]),
];

/// Workspace crates and their direct normal dependencies.
type Graph = BTreeMap<String, Vec<String>>;

fn layer_of(krate: &str) -> Option<Layer> {
    LAYERS.iter().find(|(k, _)| *k == krate).map(|(_, l)| *l)
}

/// Every broken rule in `graph`, as a message saying what to do; empty when
/// the graph keeps the architecture.
fn violations(graph: &Graph) -> Vec<String> {
    let mut found = vec![];
    for (krate, deps) in graph {
        let Some(layer) = layer_of(krate) else {
            found.push(format!(
                "crate {krate} is in no layer: place it in LAYERS in crates/vroom/tests/layering.rs \
                 (Domain, Protocol, Volume, Core, Host for building blocks several adapters share, \
                 Adapter for an implementation of a core seam, Api, Client, Binary, Guest, or \
                 Tooling for developer tasks and benchmarks)"
            ));
            continue;
        };
        for dep in deps {
            if let Some(dep_layer) = graph.contains_key(dep).then(|| layer_of(dep)).flatten() {
                let allowed = may_use(layer).contains(&dep_layer)
                    || ALLOWED_EDGES
                        .iter()
                        .any(|(from, to, _)| from == krate && to == dep);
                if !allowed {
                    let sideways = if layer == Adapter && dep_layer == Adapter {
                        " (no edges between adapters: move what both need into a Host crate, \
                         or add the edge with its reason to ALLOWED_EDGES)"
                    } else {
                        ""
                    };
                    found.push(format!(
                        "{krate} ({layer:?}) must not depend on {dep} ({dep_layer:?}){sideways}"
                    ));
                }
            }
        }
        let forbidden = FORBIDDEN
            .iter()
            .filter(|(k, _)| k == krate)
            .flat_map(|(_, f)| f.iter());
        for f in forbidden {
            if deps.iter().any(|d| d == f) {
                found.push(format!("{krate} must not depend on {f}"));
            }
        }
        for (outside, users) in ONLY_USED_BY {
            if deps.iter().any(|d| d == outside) && !users.contains(&krate.as_str()) {
                found.push(format!(
                    "{krate} must not depend on {outside}: only {} may",
                    users.join(", ")
                ));
            }
        }
    }
    found
}

fn workspace_graph() -> Graph {
    let out = Command::new(env!("CARGO"))
        .args(["metadata", "--format-version", "1", "--no-deps"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("run cargo metadata");
    assert!(out.status.success(), "cargo metadata failed");
    let meta: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    meta["packages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            let deps = p["dependencies"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|d| d["kind"].is_null())
                .map(|d| d["name"].as_str().unwrap().to_string())
                .collect();
            (p["name"].as_str().unwrap().to_string(), deps)
        })
        .collect()
}

#[test]
fn layers_only_know_what_they_own() {
    let graph = workspace_graph();
    let found = violations(&graph);
    assert!(found.is_empty(), "{}", found.join("\n"));
}

#[test]
fn every_placed_crate_exists() {
    let graph = workspace_graph();
    for (krate, _) in LAYERS {
        assert!(
            graph.contains_key(*krate),
            "LAYERS places {krate}, which is no workspace member: remove it"
        );
    }
    for (from, to, _) in ALLOWED_EDGES {
        assert!(
            graph[*from].iter().any(|d| d == to),
            "ALLOWED_EDGES lets {from} use {to}, which it no longer does: remove the entry"
        );
    }
}

/// The static guest init links no OpenAPI machinery and no async runtime:
/// vroom-types' `openapi` feature stays off for it (its `templates` feature
/// is on: the init renders appliance templates).
#[test]
fn the_guest_init_links_no_host_machinery() {
    let out = Command::new(env!("CARGO"))
        .args([
            "tree",
            "-p",
            "vroom-init",
            "-e",
            "normal",
            "--prefix",
            "none",
        ])
        .args(["--format", "{p}"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("run cargo tree");
    assert!(out.status.success(), "cargo tree failed");
    let tree = String::from_utf8_lossy(&out.stdout);
    for host_only in ["utoipa", "tokio", "axum", "hyper"] {
        assert!(
            !tree
                .lines()
                .any(|l| l.split_whitespace().next() == Some(host_only)),
            "vroom-init links {host_only}:\n{tree}"
        );
    }
}

fn graph(edges: &[(&str, &[&str])]) -> Graph {
    edges
        .iter()
        .map(|(k, deps)| (k.to_string(), deps.iter().map(|d| d.to_string()).collect()))
        .collect()
}

/// A made-up workspace shaped like ours, which keeps every rule.
fn good() -> Graph {
    graph(&[
        ("vroom-base", &["serde", "base64"]),
        ("vroom-types", &["vroom-base", "serde"]),
        ("vroom-agent-proto", &["serde"]),
        (
            "vroom-volume",
            &["vroom-types", "vroom-agent-proto", "fatfs"],
        ),
        ("vroom-core", &["vroom-types", "vroom-volume", "tokio"]),
        ("vroom-jail", &["nix"]),
        ("vroom-qemu", &["vroom-core", "vroom-jail"]),
        ("vroom-store", &["vroom-core", "redb"]),
        (
            "vroom-cluster",
            &["vroom-core", "vroom-jail", "vroom-client", "etcd-client"],
        ),
        ("vroom-api", &["vroom-core", "axum"]),
        ("vroom-client", &["vroom-types", "hyper"]),
        (
            "vroom",
            &[
                "vroom-api",
                "vroom-qemu",
                "vroom-store",
                "vroom-cluster",
                "axum",
            ],
        ),
        (
            "vroom-init",
            &["vroom-base", "vroom-types", "vroom-agent-proto"],
        ),
        ("xtask", &["anyhow"]),
    ])
}

#[test]
fn the_check_passes_a_good_graph() {
    assert_eq!(violations(&good()), Vec::<String>::new());
}

#[test]
fn the_check_fails_for_an_unclassified_crate() {
    let mut g = good();
    g.insert("vroom-gadget".into(), vec!["vroom-types".into()]);
    let found = violations(&g);
    assert_eq!(found.len(), 1, "{found:?}");
    assert!(
        found[0].starts_with("crate vroom-gadget is in no layer: place it in LAYERS"),
        "{found:?}"
    );
}

#[test]
fn the_check_fails_for_a_forbidden_edge() {
    // (crate, what it gains, the start of the message that must come out)
    let table: &[(&str, &str, &str)] = &[
        ("vroom-qemu", "vroom-cluster", "vroom-qemu (Adapter) must not depend on vroom-cluster (Adapter) (no edges between adapters"),
        ("vroom-cluster", "vroom-qemu", "vroom-cluster (Adapter) must not depend on vroom-qemu (Adapter)"),
        ("vroom-core", "vroom-cluster", "vroom-core (Core) must not depend on vroom-cluster (Adapter)"),
        ("vroom-core", "vroom-client", "vroom-core (Core) must not depend on vroom-client (Client)"),
        ("vroom-core", "vroom-qemu", "vroom-core (Core) must not depend on vroom-qemu (Adapter)"),
        ("vroom-core", "etcd-client", "vroom-core must not depend on etcd-client"),
        ("vroom-core", "redb", "vroom-core must not depend on redb"),
        ("vroom-types", "vroom-core", "vroom-types (Domain) must not depend on vroom-core (Core)"),
        ("vroom-init", "vroom-core", "vroom-init (Guest) must not depend on vroom-core (Core)"),
        ("vroom-init", "tokio", "vroom-init must not depend on tokio"),
        ("vroom-base", "vroom-types", "vroom-base (Base) must not depend on vroom-types (Domain)"),
        ("vroom-jail", "vroom-core", "vroom-jail (Host) must not depend on vroom-core (Core)"),
        ("vroom-api", "vroom-init", "vroom-api (Api) must not depend on vroom-init (Guest)"),
        ("vroom-client", "axum", "vroom-client must not depend on axum"),
        ("vroom-qemu", "etcd-client", "vroom-qemu must not depend on etcd-client: only vroom-cluster may"),
    ];
    for (krate, dep, want) in table {
        let mut g = good();
        g.get_mut(*krate).unwrap().push(dep.to_string());
        let found = violations(&g);
        assert!(
            found.iter().any(|m| m.starts_with(want)),
            "{krate} -> {dep}: want {want:?}, got {found:?}"
        );
    }
}
