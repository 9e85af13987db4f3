//! `vroom config`: an instance's config, its versions and their history.

use std::io::Write;
use std::path::Path;

use anyhow::{bail, Context, Result};
use vroom_client::{Client, ClientError};
use vroom_types::{shown_config, ConfigDocument, ConfigSchema};

use crate::args::ConfigOp;
use crate::output;

/// The most `config import` reads.
const MAX_IMPORT_BYTES: u64 = 1 << 20;

/// Refuses a file `config import` could not read (too large, not a regular
/// file) before anything is sent; `-` (stdin) is read later.
pub fn check_import_file(file: &Path) -> Result<()> {
    if file.as_os_str() != "-" {
        vroom_input::open_input(file, MAX_IMPORT_BYTES, None)?;
    }
    Ok(())
}

pub async fn config(client: &Client, name: &str, op: &ConfigOp, json: bool) -> Result<()> {
    config_op(client, name, op, json)
        .await
        .map_err(|e| match e.downcast::<ClientError>() {
            // A refused change carries the failing check's output after its
            // first line: show it, and keep the error itself to one line.
            Ok(ClientError::Api { message, .. }) => {
                let (first, rest) = message.split_once('\n').unwrap_or((&message, ""));
                for line in rest.lines() {
                    eprintln!("  | {line}");
                }
                anyhow::anyhow!("{first}")
            }
            Ok(other) => other.into(),
            Err(e) => e,
        })
}

/// The schema of the instance's image, so that its secret values (passwords)
/// are shown masked.
pub async fn schema_of(client: &Client, name: &str) -> ConfigSchema {
    match client.get(name).await {
        Ok(instance) => image_schema(client, &instance.image_id).await,
        Err(_) => ConfigSchema::new(),
    }
}

/// The config schema of an image. An image this node cannot read has none:
/// values are then shown as they are.
pub async fn image_schema(client: &Client, image_id: &str) -> ConfigSchema {
    match client.image(image_id).await {
        Ok(image) => image.manifest.appliance.config_schema,
        Err(_) => ConfigSchema::new(),
    }
}

async fn config_op(client: &Client, name: &str, op: &ConfigOp, json: bool) -> Result<()> {
    // Every value printed goes through it: secrets are masked, except in an
    // export, which is a backup to import again.
    let schema = match op {
        ConfigOp::Export { .. } | ConfigOp::History => ConfigSchema::new(),
        _ => schema_of(client, name).await,
    };
    let show = |values: &vroom_types::ConfigValues| {
        let values = shown_config(&schema, values);
        if json {
            output::json(&ConfigDocument { values });
        } else {
            for (k, v) in &values {
                println!("{k}={v}");
            }
        }
    };
    match op {
        ConfigOp::Get { key: None } => show(&client.config_get(name).await?),
        ConfigOp::Get { key: Some(key) } => {
            let values = shown_config(&schema, &client.config_get(name).await?);
            let value = values
                .get(key)
                .with_context(|| format!("instance {name} has no config key {key:?}"))?;
            if json {
                output::json(value);
            } else {
                println!("{value}");
            }
        }
        ConfigOp::Set { pairs } => show(
            &client
                .config_set(name, pairs.iter().cloned().collect())
                .await?,
        ),
        ConfigOp::Reset => show(&client.config_reset(name).await?),
        ConfigOp::Export { file } => {
            let values = client.config_get(name).await?;
            let mut bytes = serde_json::to_vec_pretty(&ConfigDocument { values })?;
            bytes.push(b'\n');
            if file.as_os_str() == "-" {
                let mut out = std::io::stdout().lock();
                out.write_all(&bytes)?;
                out.flush()?;
            } else {
                std::fs::write(file, bytes)
                    .with_context(|| format!("cannot write {}", file.display()))?;
            }
        }
        ConfigOp::Import { file } => {
            let (bytes, source) = if file.as_os_str() == "-" {
                (read_bounded(std::io::stdin().lock())?, "stdin".to_string())
            } else {
                // A regular file under the cap, opened without blocking: a
                // FIFO or /dev/zero is refused at once, naming what it is.
                let bytes = vroom_input::read_input(file, MAX_IMPORT_BYTES, None)?;
                (bytes, file.display().to_string())
            };
            let doc: ConfigDocument = serde_json::from_slice(&bytes)
                .with_context(|| format!("{source} is not a config export"))?;
            show(&client.config_replace(name, doc.values).await?);
        }
        ConfigOp::History => {
            let history = client.config_history(name).await?;
            if json {
                output::json(&history);
            } else {
                let rows: Vec<Vec<String>> = history
                    .versions
                    .iter()
                    .map(|v| {
                        let mark = if v.version == history.current {
                            "*"
                        } else {
                            ""
                        };
                        let origin = match v.rollback_to {
                            Some(to) => format!("rollback to {to}"),
                            None => format!("{:?}", v.origin).to_lowercase(),
                        };
                        vec![
                            format!("{}{mark}", v.version),
                            output::ago(v.time),
                            origin,
                            v.changed.join(", "),
                        ]
                    })
                    .collect();
                output::table(&["VERSION", "TIME", "ORIGIN", "CHANGED"], &rows);
            }
        }
        ConfigOp::Diff { v1, v2 } => {
            let mut diff = client.config_diff(name, *v1, *v2).await?;
            for change in &mut diff.changes {
                if let Some(field) = schema.get(&change.key) {
                    for value in [&mut change.old, &mut change.new].into_iter().flatten() {
                        *value = field.shown(value).to_string();
                    }
                }
            }
            if json {
                output::json(&diff);
            } else {
                println!("--- version {}", diff.from);
                println!("+++ version {}", diff.to);
                for change in &diff.changes {
                    if let Some(old) = &change.old {
                        println!("-{}={old}", change.key);
                    }
                    if let Some(new) = &change.new {
                        println!("+{}={new}", change.key);
                    }
                }
            }
        }
        ConfigOp::Rollback { version } => show(&client.config_rollback(name, *version).await?),
    }
    Ok(())
}

/// Reads at most [`MAX_IMPORT_BYTES`]; more is an error, not a cut.
fn read_bounded(reader: impl std::io::Read) -> Result<Vec<u8>> {
    use std::io::Read;
    let mut bytes = Vec::new();
    reader
        .take(MAX_IMPORT_BYTES + 1)
        .read_to_end(&mut bytes)
        .context("cannot read the config")?;
    if bytes.len() as u64 > MAX_IMPORT_BYTES {
        bail!(
            "the config to import exceeds {} KiB",
            MAX_IMPORT_BYTES / 1024
        );
    }
    Ok(bytes)
}
