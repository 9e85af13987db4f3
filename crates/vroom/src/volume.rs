//! `vroom volume`: data volumes.

use anyhow::Result;
use vroom_client::Client;
use vroom_types::{Volume, VolumeCreateRequest, VolumeFs};

use crate::args::VolumeOp;
use crate::output;

pub async fn volume(client: &Client, op: &VolumeOp, json: bool) -> Result<()> {
    match op {
        VolumeOp::Create {
            name,
            size,
            replicas,
        } => {
            let volume = client
                .create_volume(&VolumeCreateRequest {
                    name: name.clone(),
                    size_mib: *size,
                    fs: VolumeFs::Ext4,
                    replicas: *replicas,
                })
                .await?;
            if json {
                output::json(&volume);
            } else {
                println!(
                    "volume {} created: {} {}",
                    volume.name,
                    size_text(volume.size_mib),
                    volume.fs.as_str()
                );
            }
        }
        VolumeOp::Ls => output::list(
            json,
            &client.volumes().await?,
            &["NAME", "SIZE", "USED ON DISK", "FS", "INSTANCE", "CREATED"],
            |v| {
                vec![
                    v.name.to_string(),
                    size_text(v.size_mib),
                    output::bytes(v.allocated_bytes),
                    v.fs.as_str().to_string(),
                    attached(v),
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
                println!("{:<12} {}", "instance:", attached(&v));
                println!("{:<12} {}", "created:", output::ago(v.created_at));
            }
        }
        VolumeOp::Rm { name } => client.remove_volume(name.as_str()).await?,
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
