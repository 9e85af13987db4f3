//! `vroom snapshot`, `restore`, `image warm`, `rm --archive` and `archive
//! verify`.

use std::path::Path;

use anyhow::{bail, Context, Result};
use vroom_client::Client;
use vroom_types::{Name, Snapshot, SnapshotRequest, WarmRequest};

use crate::args::SnapshotOp;
use crate::output;

pub async fn snapshot(
    client: &Client,
    op: Option<&SnapshotOp>,
    vm: Option<&str>,
    name: &Option<Name>,
    stop: bool,
    json: bool,
) -> Result<()> {
    match (op, vm) {
        (Some(SnapshotOp::Ls { warm }), _) => list(client, *warm, json).await,
        (Some(SnapshotOp::Inspect { name }), _) => {
            let mut snapshot = client.snapshot_info(name).await?;
            // Secret values (passwords) are masked as in `config get`.
            let instance = &mut snapshot.instance;
            let schema = crate::config::image_schema(client, &instance.image_id).await;
            instance.config = vroom_types::shown_config(&schema, &instance.config);
            if json {
                output::json(&snapshot);
            } else {
                show(&snapshot);
            }
            Ok(())
        }
        (Some(SnapshotOp::Rm { name, warm: false }), _) => {
            client.remove_snapshot(name).await?;
            if !json {
                println!("removed snapshot {name}");
            }
            Ok(())
        }
        (Some(SnapshotOp::Rm { name, warm: true }), _) => {
            let removed = client.remove_warm(name).await?;
            if json {
                output::json(&removed);
            } else {
                for s in &removed {
                    println!(
                        "removed warm snapshot {} ({} MiB, {} CPU, {} NIC): `vroom run {}` boots it",
                        s.name,
                        s.instance.mem_mib,
                        s.instance.spec.cpus,
                        s.instance.nics.len(),
                        s.instance.image_name
                    );
                }
            }
            Ok(())
        }
        (None, Some(vm)) => {
            let vm = Name::new(vm).map_err(|e| anyhow::anyhow!("no instance {vm:?}: {e}"))?;
            let spinner = output::spinner(json, format!("capturing {vm}"));
            let taken = client
                .snapshot(&SnapshotRequest {
                    instance: vm,
                    name: name.clone(),
                    stop,
                })
                .await;
            if let Some(s) = spinner {
                s.finish_and_clear();
            }
            let snapshot = taken?;
            if json {
                output::json(&snapshot);
            } else {
                println!(
                    "snapshot {} of {}: {} of state in {} ({} paused){}",
                    snapshot.name,
                    snapshot.instance.spec.name,
                    output::bytes(snapshot.state_bytes),
                    output::bytes(snapshot.memory.bytes + snapshot.volume.bytes),
                    millis(snapshot.pause_ms),
                    if stop {
                        "; the instance is stopped"
                    } else {
                        ""
                    }
                );
            }
            Ok(())
        }
        (None, None) => bail!(
            "name the running instance to capture: `vroom snapshot VM` (or `vroom snapshot ls`)"
        ),
    }
}

fn millis(ms: u64) -> String {
    if ms < 1000 {
        format!("{ms} ms")
    } else {
        format!("{:.1} s", ms as f64 / 1000.0)
    }
}

async fn list(client: &Client, warm: bool, json: bool) -> Result<()> {
    let snapshots = client.snapshots(warm).await?;
    output::list(
        json,
        &snapshots,
        &["NAME", "INSTANCE", "IMAGE", "MEMORY", "SIZE", "CREATED"],
        |s| {
            vec![
                s.name.to_string(),
                if warm {
                    "-".into()
                } else {
                    s.instance.spec.name.to_string()
                },
                s.instance.image_name.clone(),
                format!("{} MiB", s.instance.mem_mib),
                output::bytes(s.memory.bytes + s.volume.bytes),
                output::ago(s.created_at),
            ]
        },
    );
    Ok(())
}

fn show(s: &Snapshot) {
    let i = &s.instance;
    println!("name:      {}", s.name);
    println!("kind:      {:?}", s.kind);
    println!("instance:  {} ({})", i.spec.name, i.id);
    println!(
        "image:     {} ({})",
        i.image_name,
        &i.image_id[..12.min(i.image_id.len())]
    );
    println!(
        "shape:     {} MiB, {} CPU, {} NIC",
        i.mem_mib,
        i.spec.cpus,
        i.nics.len()
    );
    println!("machine:   {}", s.machine);
    println!("created:   {}", output::ago(s.created_at));
    println!("paused:    {}", millis(s.pause_ms));
    println!(
        "memory:    {} of state, {} compressed (sha256 {})",
        output::bytes(s.state_bytes),
        output::bytes(s.memory.bytes),
        &s.memory.sha256[..16]
    );
    println!(
        "volume:    {} (sha256 {})",
        output::bytes(s.volume.bytes),
        &s.volume.sha256[..16]
    );
    for (k, v) in &i.config {
        println!("config:    {k} = {v}");
    }
}

pub async fn restore(client: &Client, vm: &str, snapshot: &Name, json: bool) -> Result<()> {
    let spinner = output::spinner(json, format!("restoring {vm} to {snapshot}"));
    let restored = client.restore(vm, snapshot).await;
    if let Some(s) = spinner {
        s.finish_and_clear();
    }
    let instance = restored?;
    if json {
        output::json(&instance);
    } else {
        println!("{vm} is back at snapshot {snapshot}");
    }
    Ok(())
}

pub async fn warm(client: &Client, image: &str, mem: Option<u64>, json: bool) -> Result<()> {
    crate::session::build_from_catalog_if_missing(client, image, json).await?;
    let spinner = output::spinner(json, format!("warming {image}"));
    let warmed = client
        .warm_image(image, &WarmRequest { mem_mib: mem })
        .await;
    if let Some(s) = spinner {
        s.finish_and_clear();
    }
    let snapshot = warmed?;
    if json {
        output::json(&snapshot);
    } else {
        println!(
            "{} is warm: `vroom run {}` with {} MiB, {} CPU and {} NIC starts from a {} snapshot instead of booting",
            snapshot.instance.image_name,
            snapshot.instance.image_name,
            snapshot.instance.mem_mib,
            snapshot.instance.spec.cpus,
            snapshot.instance.nics.len(),
            output::bytes(snapshot.memory.bytes + snapshot.volume.bytes)
        );
    }
    Ok(())
}

pub async fn archive(
    client: &Client,
    name: &str,
    dir: &Path,
    force: bool,
    json: bool,
) -> Result<()> {
    let dir = std::path::absolute(dir).with_context(|| format!("archive dir {}", dir.display()))?;
    let running = client.get(name).await?.status.pid.is_some();
    if running && !force {
        bail!("instance {name} is running; stop it first or use `rm -f --archive` (its memory is archived too)");
    }
    let report = client.archive(name, &dir.to_string_lossy()).await?;
    if json {
        output::json(&report);
        return Ok(());
    }
    println!("archived {name} into {}:", report.dir.display());
    for file in &report.files {
        println!(
            "  {:<28} {:>10}  sha256 {}",
            file.path,
            output::bytes(file.bytes),
            &file.sha256[..16]
        );
    }
    if !report.memory {
        println!("  (no memory image: the instance was not running)");
    }
    println!(
        "wiped {} (overwritten with zeros, then unlinked); `vroom archive verify {}` checks the archive",
        output::count(report.wiped.len(), "file", "files"),
        report.dir.display()
    );
    Ok(())
}

pub fn verify(dir: &Path, json: bool) -> Result<i32> {
    let problems = vroom_core::engine::verify_archive(dir).map_err(|e| anyhow::anyhow!(e))?;
    if json {
        output::json(&serde_json::json!({ "ok": problems.is_empty(), "problems": problems }));
    } else if problems.is_empty() {
        println!("{}: every file matches SHA256SUMS", dir.display());
    } else {
        for p in &problems {
            eprintln!("{p}");
        }
        eprintln!(
            "{}: {}",
            dir.display(),
            output::count(problems.len(), "problem", "problems")
        );
    }
    Ok(if problems.is_empty() { 0 } else { 1 })
}
