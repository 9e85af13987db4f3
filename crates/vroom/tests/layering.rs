//! Keeps the architecture true: reads `cargo metadata` and fails when a crate
//! depends on something its layer must not know.

use std::collections::BTreeMap;
use std::process::Command;

fn direct_deps() -> BTreeMap<String, Vec<String>> {
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
    let deps = direct_deps();
    let rules: &[(&str, &[&str])] = &[
        // Domain types: no I/O, no transport.
        (
            "vroom-types",
            &["tokio", "axum", "hyper", "rtnetlink", "redb", "vroom-core"],
        ),
        // Core: no HTTP, QMP (the QEMU driver), netlink or images.
        (
            "vroom-core",
            &[
                "axum",
                "hyper",
                "rtnetlink",
                "netlink-packet-route",
                "vroom-qemu",
                "vroom-net",
                "vroom-api",
                "vroom-image",
            ],
        ),
        // The protocol crate stays tiny and fuzzable.
        ("vroom-agent-proto", &["tokio", "vroom-types", "vroom-core"]),
        // The guest init is a small static binary: no async runtime, no host crates.
        (
            "vroom-init",
            &["tokio", "vroom-core", "vroom-volume", "fatfs"],
        ),
        // Only the API crate knows HTTP server types; only the QEMU driver speaks QMP.
        ("vroom-qemu", &["axum", "hyper", "rtnetlink"]),
        ("vroom-net", &["axum", "hyper", "vroom-qemu"]),
        ("vroom-client", &["axum", "vroom-core"]),
    ];
    for (krate, forbidden) in rules {
        let have = deps
            .get(*krate)
            .unwrap_or_else(|| panic!("no crate {krate}"));
        for f in *forbidden {
            assert!(
                !have.iter().any(|d| d == f),
                "{krate} must not depend on {f}"
            );
        }
    }
    let http_servers: Vec<&String> = deps
        .iter()
        .filter(|(_, d)| d.iter().any(|x| x == "axum"))
        .map(|(k, _)| k)
        .collect();
    assert_eq!(
        http_servers,
        vec!["vroom", "vroom-api"],
        "only vroom-api (and the composition root that serves it) use axum"
    );
}
