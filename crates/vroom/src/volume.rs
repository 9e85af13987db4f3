//! `vroom volume`: data volumes.

use anyhow::Result;
use vroom_client::Client;
use vroom_types::{SnapshotTaken, Volume, VolumeCreateRequest, VolumeExportRequest, VolumeFs};

use crate::args::VolumeOp;
use crate::output;

/// Where a replicated volume's replica is, and how far: `n2 UpToDate`.
fn replica_text(v: &Volume) -> String {
    v.replication
        .as_ref()
        .map_or_else(|| "-".into(), |r| format!("{} {}", r.replica, r.state))
}

/// The node of a cluster's volume: its primary copy's, or its only copy's.
fn node_text(v: &Volume) -> String {
    v.replication
        .as_ref()
        .map(|r| r.primary.clone())
        .or_else(|| v.node.clone())
        .unwrap_or_else(|| "-".into())
}

/// Where a new cluster volume is: ` on node n1` (and ` and n2`).
fn where_text(v: &Volume) -> String {
    match (&v.replication, &v.node) {
        (Some(r), _) => format!(" on nodes {} and {}", r.primary, r.replica),
        (None, Some(node)) => format!(" on node {node}"),
        (None, None) => String::new(),
    }
}

pub async fn volume(client: &Client, op: &VolumeOp, json: bool) -> Result<()> {
    match op {
        VolumeOp::Create {
            name,
            size,
            replicas,
            node,
            replica_node,
        } => {
            let volume = client
                .create_volume(&VolumeCreateRequest {
                    name: name.clone(),
                    size_mib: *size,
                    fs: VolumeFs::Ext4,
                    replicas: *replicas,
                    node: node.clone(),
                    replica_node: replica_node.clone(),
                })
                .await?;
            if json {
                output::json(&volume);
            } else {
                println!(
                    "volume {} created: {} {}{}",
                    volume.name,
                    size_text(volume.size_mib),
                    volume.fs.as_str(),
                    where_text(&volume)
                );
            }
        }
        VolumeOp::Ls => output::list(
            json,
            &client.volumes().await?,
            &[
                "NAME",
                "SIZE",
                "USED ON DISK",
                "FS",
                "INSTANCE",
                "NODE",
                "REPLICA",
                "EXPORT",
                "CREATED",
            ],
            |v| {
                vec![
                    v.name.to_string(),
                    size_text(v.size_mib),
                    output::bytes(v.allocated_bytes),
                    v.fs.as_str().to_string(),
                    attached(v),
                    node_text(v),
                    replica_text(v),
                    v.export
                        .as_ref()
                        .map_or_else(|| "-".into(), |e| e.listen.clone()),
                    output::ago(v.created_at),
                ]
            },
        ),
        VolumeOp::Inspect { name } => {
            let v = client.volume(name.as_str()).await?;
            if json {
                output::json(&v);
            } else {
                println!("{:<12} {}", "name:", v.name);
                println!("{:<12} {}", "id:", v.id);
                println!("{:<12} {}", "size:", size_text(v.size_mib));
                println!("{:<12} {}", "on disk:", output::bytes(v.allocated_bytes));
                println!("{:<12} {}", "fs:", v.fs.as_str());
                println!("{:<12} {}", "replicas:", v.replicas);
                if let Some(node) = &v.node {
                    println!("{:<12} {node} (its only copy)", "node:");
                }
                println!("{:<12} {}", "instance:", attached(&v));
                println!("{:<12} {}", "created:", output::ago(v.created_at));
                if let Some(r) = &v.replication {
                    println!("{:<12} {}", "primary:", r.primary);
                    println!("{:<12} {} ({})", "replica:", r.replica, r.state);
                    println!("{:<12} {}", "epoch:", r.epoch);
                    println!("{:<12} {}", "state since:", output::ago(r.since));
                    if let (Some(done), Some(total)) = (r.synced_bytes, r.sync_total_bytes) {
                        println!(
                            "{:<12} {} of {}",
                            "synced:",
                            output::bytes(done),
                            output::bytes(total)
                        );
                    }
                    if let Some(reason) = &r.reason {
                        println!("{:<12} {reason}", "why:");
                    }
                    if let Some(sync) = &r.last_sync {
                        println!(
                            "{:<12} {} sent, {} in {} ms, {}",
                            "last sync:",
                            output::bytes(sync.bytes),
                            if sync.incremental {
                                "what it missed"
                            } else {
                                "a full copy"
                            },
                            sync.ms,
                            output::ago(sync.at)
                        );
                    }
                }
                if let Some(e) = &v.export {
                    println!(
                        "{:<12} {} ({})",
                        "export:",
                        e.uri,
                        crate::volume_file::export_target(e)
                    );
                }
                if !v.snapshots.is_empty() {
                    println!("snapshots:");
                    output::table(
                        &["NAME", "SIZE", "COPIED", "TAKEN", "HELD", "CREATED"],
                        &v.snapshots
                            .iter()
                            .map(|s| {
                                vec![
                                    s.name.to_string(),
                                    size_text(s.size_mib),
                                    output::bytes(s.bytes),
                                    taken_text(s.taken).to_string(),
                                    format!("{} ms", s.pause_ms),
                                    output::ago(s.created_at),
                                ]
                            })
                            .collect::<Vec<_>>(),
                    );
                }
            }
        }
        VolumeOp::Rm { name } => client.remove_volume(name.as_str()).await?,
        VolumeOp::Snapshot { name, snapshot } => {
            let s = client
                .snapshot_volume(name.as_str(), snapshot.clone())
                .await?;
            if json {
                output::json(&s);
            } else {
                println!(
                    "snapshot {} of volume {name}: {} copied ({}, the guest held {} ms)",
                    s.name,
                    output::bytes(s.bytes),
                    taken_text(s.taken),
                    s.pause_ms
                );
            }
        }
        VolumeOp::Restore { name, snapshot } => {
            let v = client
                .restore_volume(name.as_str(), snapshot.clone())
                .await?;
            if json {
                output::json(&v);
            } else {
                println!("volume {} is back to snapshot {snapshot}", v.name);
            }
        }
        VolumeOp::Clone { snapshot, name } => {
            let v = client.clone_volume(snapshot.as_str(), name.clone()).await?;
            if json {
                output::json(&v);
            } else {
                println!("volume {} created from snapshot {snapshot}", v.name);
            }
        }
        VolumeOp::SnapshotRm { name, snapshot } => {
            client
                .remove_volume_snapshot(name.as_str(), snapshot.as_str())
                .await?
        }
        VolumeOp::Export {
            name,
            snapshot,
            listen,
        } => {
            let req = VolumeExportRequest {
                snapshot: snapshot.clone(),
                listen: listen.clone(),
                backup: false,
            };
            let e = client.export_volume(name.as_str(), &req).await?;
            if json {
                output::json(&e);
            } else {
                println!(
                    "{} exported at {}",
                    crate::volume_file::export_target(&e),
                    e.uri
                );
            }
        }
        VolumeOp::Unexport { name } => client.unexport_volume(name.as_str()).await?,
        VolumeOp::Backup {
            name,
            file,
            snapshot,
            format,
        } => crate::volume_file::backup(client, name, file, snapshot.clone(), format, json).await?,
        VolumeOp::Import { name, file } => {
            crate::volume_file::import(client, name, file, json).await?
        }
        VolumeOp::Resize { name, size } => {
            let v = client.resize_volume(name.as_str(), *size).await?;
            if json {
                output::json(&v);
            } else {
                println!("volume {} is now {}", v.name, size_text(v.size_mib));
            }
        }
    }
    Ok(())
}

fn taken_text(taken: SnapshotTaken) -> &'static str {
    match taken {
        SnapshotTaken::Frozen => "frozen",
        SnapshotTaken::Paused => "paused, not frozen",
        SnapshotTaken::Offline => "offline",
    }
}

fn attached(v: &Volume) -> String {
    v.attached_to
        .as_ref()
        .map(|n| n.to_string())
        .unwrap_or_else(|| "-".into())
}

/// `2 GiB` for whole GiB, else MiB.
fn size_text(mib: u64) -> String {
    if mib >= 1024 && mib.is_multiple_of(1024) {
        format!("{} GiB", mib / 1024)
    } else {
        format!("{mib} MiB")
    }
}
