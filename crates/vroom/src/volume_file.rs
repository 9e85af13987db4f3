//! `vroom volume backup` and `vroom volume import`: a volume out to a file
//! and in from one, through an NBD export of vroomd.
//!
//! The file is read and written here, by the CLI, as the user who runs it
//! (with `qemu-img`): vroomd never opens a path a caller names, so a member
//! of the API group reaches only the files they could reach themselves,
//! and an untrusted qcow2 is parsed by the caller's `qemu-img`, not by root.
//! A backup reads a read-only export (a snapshot taken for it when an
//! instance runs with the volume) into `FILE` through a partial file renamed
//! once whole, then writes `FILE.sha256` (`sha256sum -c` reads it). An
//! import checks `FILE.sha256` when it exists, then writes the image into a
//! writable export of a staging file vroomd made and asks vroomd to commit
//! it (an ext4 filesystem of 16 MiB to 16 TiB, or nothing).

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};
use vroom_client::Client;
use vroom_types::{Name, VolumeExportRequest};

use crate::output;

/// `FILE.sha256`.
fn digest_path(file: &Path) -> PathBuf {
    let mut name = file.as_os_str().to_owned();
    name.push(".sha256");
    PathBuf::from(name)
}

/// Runs qemu-img; its last stderr line is the error.
fn qemu_img(args: &[&str]) -> Result<String> {
    let out = Command::new("qemu-img")
        .args(args)
        .output()
        .context("cannot run qemu-img (install qemu-utils)")?;
    if !out.status.success() {
        bail!(
            "qemu-img {}: {}",
            args[0],
            vroom_base::failure_line(&out, "failed")
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

async fn sha256(file: &Path) -> Result<String> {
    let path = file.to_path_buf();
    let (hash, _) = tokio::task::spawn_blocking(move || vroom_image::sha256_file(&path))
        .await?
        .with_context(|| format!("cannot read {}", file.display()))?;
    Ok(hash)
}

pub async fn backup(
    client: &Client,
    name: &Name,
    file: &Path,
    snapshot: Option<Name>,
    format: &str,
    json: bool,
) -> Result<()> {
    let file = std::path::absolute(file)?;
    let digest = digest_path(&file);
    for f in [&file, &digest] {
        if f.symlink_metadata().is_ok() {
            bail!("{} exists; back up to a new file", f.display());
        }
    }
    let Some(file_name) = file.file_name().map(|n| n.to_string_lossy().into_owned()) else {
        bail!("{} is not a file name", file.display());
    };
    let partial = file.with_file_name(format!(".{file_name}.partial"));
    let req = VolumeExportRequest {
        snapshot,
        listen: None,
        backup: true,
    };
    let export = client.export_volume(name.as_str(), &req).await?;
    let started = std::time::Instant::now();
    let written = async {
        let (uri, out, fmt) = (
            export.uri.clone(),
            partial.display().to_string(),
            format.to_string(),
        );
        tokio::task::spawn_blocking(move || {
            qemu_img(&["convert", "-q", "-f", "raw", "-O", &fmt, &uri, &out])
        })
        .await??;
        let hash = sha256(&partial).await?;
        std::fs::rename(&partial, &file).with_context(|| {
            format!("cannot rename {} to {}", partial.display(), file.display())
        })?;
        std::fs::write(&digest, format!("{hash}  {file_name}\n"))
            .with_context(|| format!("cannot write {}", digest.display()))?;
        anyhow::Ok(hash)
    }
    .await;
    let ended = client.unexport_volume(name.as_str()).await;
    let hash = match written {
        Ok(hash) => hash,
        Err(e) => {
            let _ = std::fs::remove_file(&partial);
            return Err(e.context(format!("cannot back up volume {name}")));
        }
    };
    if let Err(e) = ended {
        eprintln!("warning: the backup's export did not end: {e}; `vroom volume unexport {name}`");
    }
    let bytes = std::fs::metadata(&file).map(|m| m.len()).unwrap_or(0);
    if json {
        output::json(&serde_json::json!({
            "volume": name,
            "file": file,
            "format": format,
            "bytes": bytes,
            "size_bytes": export.size_bytes,
            "sha256": hash,
            "snapshot": export.snapshot,
            "seconds": started.elapsed().as_secs_f64(),
        }));
    } else {
        println!(
            "{} backed up to {} ({format}, {} of {}, {:.1} s); sha256 {hash} in {}",
            export_target(&export),
            file.display(),
            output::bytes(bytes),
            output::bytes(export.size_bytes),
            started.elapsed().as_secs_f64(),
            digest.display()
        );
    }
    Ok(())
}

/// What `qemu-img info` says of an image, checked: raw or qcow2, without a
/// backing or external data file, of a volume's size.
fn image_facts(file: &Path, info: &serde_json::Value) -> Result<(String, u64)> {
    let format = info["format"].as_str().unwrap_or("unknown").to_string();
    if format != "raw" && format != "qcow2" {
        bail!(
            "{} is a {format} image; vroom imports raw or qcow2",
            file.display()
        );
    }
    let data_file = &info["format-specific"]["data"]["data-file"];
    if info.get("backing-filename").is_some() || !data_file.is_null() {
        bail!(
            "{} refers to another file (a backing or data file); import a standalone image (qemu-img convert -O qcow2)",
            file.display()
        );
    }
    let bytes = info["virtual-size"].as_u64().unwrap_or(0);
    let mib = bytes.div_ceil(1 << 20);
    vroom_types::check_volume_mib(mib).map_err(|_| {
        anyhow::anyhow!(
            "{} is an image of {bytes} bytes; a volume is {} MiB to {} TiB",
            file.display(),
            vroom_types::MIN_VOLUME_MIB,
            vroom_types::MAX_VOLUME_MIB >> 20
        )
    })?;
    Ok((format, mib))
}

pub async fn import(client: &Client, name: &Name, file: &Path, json: bool) -> Result<()> {
    let file = std::path::absolute(file)?;
    let meta =
        std::fs::metadata(&file).with_context(|| format!("cannot read {}", file.display()))?;
    if !meta.is_file() {
        bail!("{} is not a regular file", file.display());
    }
    let digest = digest_path(&file);
    let hash = sha256(&file).await?;
    let verified = match std::fs::read_to_string(&digest) {
        Ok(text) => {
            let listed = vroom_types::parse_sha256sums(&text)
                .map_err(|e| anyhow::anyhow!("{}: {e}", digest.display()))?;
            let Some((want, _)) = listed.first() else {
                bail!("{} lists no digest", digest.display());
            };
            if *want != hash {
                bail!(
                    "{} does not match {} (sha256 {hash}, listed {want})",
                    file.display(),
                    digest.display()
                );
            }
            true
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => false,
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", digest.display())),
    };
    let path = file.display().to_string();
    let info: serde_json::Value =
        serde_json::from_str(&qemu_img(&["info", "--output=json", &path])?)
            .context("qemu-img info: unreadable answer")?;
    let (format, size_mib) = image_facts(&file, &info)?;
    let started = std::time::Instant::now();
    let export = client.import_volume(name.as_str(), size_mib).await?;
    let uri = export.uri.clone();
    let fmt = format.clone();
    let written = tokio::task::spawn_blocking(move || {
        qemu_img(&[
            "convert",
            "-q",
            "-n",
            "--target-is-zero",
            "-f",
            &fmt,
            "-O",
            "raw",
            &path,
            &uri,
        ])
    })
    .await?;
    if let Err(e) = written {
        let _ = client.unexport_volume(name.as_str()).await;
        return Err(e.context(format!("cannot import volume {name}")));
    }
    let volume = client
        .commit_import(name.as_str())
        .await
        .with_context(|| format!("cannot import {}", file.display()))?;
    if json {
        output::json(&volume);
    } else {
        println!(
            "volume {} imported from {} ({format}, {} MiB, {:.1} s); sha256 {hash} {}",
            volume.name,
            file.display(),
            volume.size_mib,
            started.elapsed().as_secs_f64(),
            if verified {
                format!("matches {}", digest.display())
            } else {
                format!("(no {} to check)", digest.display())
            }
        );
    }
    Ok(())
}

/// What an export serves, in words: `volume NAME` or `snapshot S of
/// volume NAME (taken for it)`.
pub fn export_target(e: &vroom_types::VolumeExport) -> String {
    match &e.snapshot {
        None => format!("volume {}", e.volume),
        Some(s) if e.temporary_snapshot => {
            format!("snapshot {s} of volume {} (taken for it)", e.volume)
        }
        Some(s) => format!("snapshot {s} of volume {}", e.volume),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn image_facts_table() {
        type Want = Result<(&'static str, u64), &'static str>;
        let file = Path::new("/x.img");
        let cases: &[(&str, Want)] = &[
            (
                r#"{"format":"raw","virtual-size":67108864}"#,
                Ok(("raw", 64)),
            ),
            (
                r#"{"format":"qcow2","virtual-size":16777217}"#,
                Ok(("qcow2", 17)),
            ),
            (
                r#"{"format":"vmdk","virtual-size":67108864}"#,
                Err("vmdk image"),
            ),
            (
                r#"{"format":"raw","virtual-size":4096}"#,
                Err("image of 4096 bytes"),
            ),
            (
                r#"{"format":"qcow2","virtual-size":67108864,"backing-filename":"/etc/shadow"}"#,
                Err("refers to another file"),
            ),
            (
                r#"{"format":"qcow2","virtual-size":67108864,"format-specific":{"data":{"data-file":"/dev/sda"}}}"#,
                Err("refers to another file"),
            ),
        ];
        for (raw, want) in cases {
            let info: serde_json::Value = serde_json::from_str(raw).unwrap();
            match (image_facts(file, &info), want) {
                (Ok((f, mib)), Ok((wf, wmib))) => assert_eq!((f.as_str(), mib), (*wf, *wmib)),
                (Err(e), Err(w)) => assert!(e.to_string().contains(w), "{raw}: {e}"),
                (got, _) => panic!("{raw}: {got:?}"),
            }
        }
    }
}
