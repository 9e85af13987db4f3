//! `vroom gc`: host leftovers that carry vroom's interface prefix but belong
//! to no network or instance of this data dir, e.g. bridges and nft tables
//! that outlived a deleted data dir. Lists them; `--remove` deletes the ones
//! that are idle (a bridge with no ports, a table whose bridge is gone),
//! so that a live bridge of another data dir sharing the prefix is never
//! touched.
//!
//! It also sweeps the data dir's stale files: run dirs of instances that no
//! longer exist and console files that the log layout of
//! `vroom_core::console` does not name (older rotations), each idle once
//! untouched for a minute (so an instance being created or a rotation under
//! way is left alone). vroomd sweeps
//! the same at start; this is for a daemon that has run for long.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, SystemTime};

use anyhow::{Context, Result};
use vroom_client::Client;

/// One leftover and whether it is idle (safe to remove).
struct Leftover {
    kind: &'static str,
    name: String,
    idle: bool,
    /// The nft family of a table.
    family: Option<String>,
}

fn bridge_ports(name: &str) -> usize {
    std::fs::read_dir(format!("/sys/class/net/{name}/brif"))
        .map(|d| d.count())
        .unwrap_or(0)
}

fn is_bridge(name: &str) -> bool {
    Path::new(&format!("/sys/class/net/{name}/bridge")).exists()
}

/// vroom's tables of every family it has used, as (family, name).
fn nft_tables() -> Vec<(String, String)> {
    let out = Command::new("nft")
        .args(["list", "tables"])
        .output()
        .map(|o| o.stdout)
        .unwrap_or_default();
    String::from_utf8_lossy(&out)
        .lines()
        .filter_map(|l| {
            let mut words = l.split_whitespace();
            match (words.next(), words.next(), words.next()) {
                (Some("table"), Some(family), Some(name))
                    if vroom_net::TABLE_FAMILIES.contains(&family) =>
                {
                    Some((family.to_string(), name.to_string()))
                }
                _ => None,
            }
        })
        .collect()
}

/// A run dir younger than this may belong to an instance being created, a
/// console file to a rotation under way.
const GRACE: Duration = Duration::from_secs(60);

fn untouched_for_a_while(path: &Path) -> bool {
    std::fs::metadata(path)
        .and_then(|m| m.modified())
        .ok()
        .and_then(|t| SystemTime::now().duration_since(t).ok())
        .is_some_and(|age| age >= GRACE)
}

fn size_of(path: &Path) -> u64 {
    let Ok(meta) = std::fs::symlink_metadata(path) else {
        return 0;
    };
    if !meta.is_dir() {
        return meta.len();
    }
    std::fs::read_dir(path)
        .map(|entries| entries.flatten().map(|e| size_of(&e.path())).sum())
        .unwrap_or(0)
}

/// Stale files of the data dir: (kind, path, idle).
fn stale_files(
    data_dir: &Path,
    known_ids: &BTreeSet<String>,
) -> Vec<(&'static str, PathBuf, bool)> {
    let mut out = vec![];
    let Ok(entries) = std::fs::read_dir(data_dir.join("instances")) else {
        return out;
    };
    let mut dirs: Vec<PathBuf> = entries.flatten().map(|e| e.path()).collect();
    dirs.sort();
    for dir in dirs {
        let id = dir.file_name().map(|n| n.to_string_lossy().into_owned());
        if id.is_some_and(|id| known_ids.contains(&id)) {
            for file in vroom_core::console::stale_console_files(&dir) {
                let idle = untouched_for_a_while(&file);
                out.push(("file", file, idle));
            }
            continue;
        }
        let idle = untouched_for_a_while(&dir);
        out.push(("run dir", dir, idle));
    }
    out
}

pub async fn run(
    client: &Client,
    data_dir: &Path,
    prefix: &str,
    remove: bool,
    json: bool,
) -> Result<()> {
    let networks = client.networks().await?;
    let instances = client.list().await?;
    let mut known: BTreeSet<String> = networks.iter().map(|n| n.bridge.clone()).collect();
    // A cluster network's VXLAN device goes with its bridge.
    known.extend(
        networks
            .iter()
            .map(|n| vroom_core::ipam::vxlan_name(&n.bridge)),
    );
    known.extend(client.splices().await?.into_iter().map(|s| s.segment));
    known.extend(
        instances
            .iter()
            .flat_map(|i| i.nics.iter().map(|n| n.tap.clone())),
    );
    let known_tables: BTreeSet<String> = networks.iter().map(vroom_net::rules_table).collect();

    let mut leftovers = vec![];
    let links = std::fs::read_dir("/sys/class/net").context("cannot list host interfaces")?;
    let mut names: Vec<String> = links
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(prefix) && !known.contains(n))
        .collect();
    names.sort();
    for name in names {
        let (kind, idle) = if is_bridge(&name) {
            ("bridge", bridge_ports(&name) == 0)
        } else {
            ("interface", false)
        };
        leftovers.push(Leftover {
            kind,
            name,
            idle,
            family: None,
        });
    }
    let table_prefix = format!("vroom_{prefix}");
    for (family, table) in nft_tables() {
        // An `ip` table of a known network is the NAT table of an older
        // vroom that the daemon replaces at start; gc leaves it to that.
        if table.starts_with(&table_prefix) && !known_tables.contains(&table) {
            let bridge = table.trim_start_matches("vroom_");
            let idle = !Path::new(&format!("/sys/class/net/{bridge}")).exists();
            leftovers.push(Leftover {
                kind: "nft table",
                name: table,
                idle,
                family: Some(family),
            });
        }
    }

    let known_ids: BTreeSet<String> = instances.iter().map(|i| i.id.clone()).collect();
    let mut stale_bytes = 0;
    for (kind, path, idle) in stale_files(data_dir, &known_ids) {
        stale_bytes += size_of(&path);
        leftovers.push(Leftover {
            kind,
            name: path.display().to_string(),
            idle,
            family: None,
        });
    }

    let mut removed = vec![];
    if remove {
        for l in leftovers.iter().filter(|l| l.idle) {
            let done = match l.kind {
                "bridge" => Command::new("ip")
                    .args(["link", "delete", &l.name])
                    .status()
                    .is_ok_and(|s| s.success()),
                "run dir" => std::fs::remove_dir_all(&l.name).is_ok(),
                "file" => std::fs::remove_file(&l.name).is_ok(),
                _ => Command::new("nft")
                    .args([
                        "delete",
                        "table",
                        l.family.as_deref().unwrap_or("inet"),
                        &l.name,
                    ])
                    .status()
                    .is_ok_and(|s| s.success()),
            };
            if done {
                removed.push(l.name.clone());
            }
        }
    }
    if json {
        let rows: Vec<serde_json::Value> = leftovers
            .iter()
            .map(|l| {
                serde_json::json!({
                    "kind": l.kind,
                    "name": l.name,
                    "idle": l.idle,
                    "removed": removed.contains(&l.name),
                })
            })
            .collect();
        crate::output::json(&rows);
        return Ok(());
    }
    if leftovers.is_empty() {
        println!("no leftovers with prefix {prefix:?} and no stale files");
        return Ok(());
    }
    for l in &leftovers {
        let note = if removed.contains(&l.name) {
            "removed"
        } else if l.idle {
            "idle: `vroom gc --remove` deletes it"
        } else if l.kind == "run dir" || l.kind == "file" {
            "changed in the last minute (in use?): left alone"
        } else {
            "in use (another data dir's?): left alone"
        };
        println!("{:<10} {:<16} {note}", l.kind, l.name);
    }
    if stale_bytes > 0 {
        println!("stale files: {} KiB", stale_bytes.div_ceil(1024));
    }
    Ok(())
}
