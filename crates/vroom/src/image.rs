//! `vroom image`: build, list, inspect, warm and remove images.

use anyhow::{Context, Result};
use vroom_client::Client;

use crate::args::ImageOp;
use crate::output;

/// A local transport's path made absolute (the daemon resolves it), the
/// rest as written.
fn absolute_reference(reference: &str) -> Result<String> {
    for transport in ["oci-archive:", "docker-archive:", "oci:"] {
        if let Some(path) = reference.strip_prefix(transport) {
            if path.starts_with('/') {
                return Ok(reference.to_string());
            }
            // `oci:DIR:TAG` keeps its tag.
            let (path, tag) = match (transport, path.rsplit_once(':')) {
                ("oci:", Some((dir, tag))) if !tag.contains('/') => (dir, Some(tag)),
                _ => (path, None),
            };
            let absolute = std::path::Path::new(path)
                .canonicalize()
                .with_context(|| format!("cannot find {path}"))?;
            let tag = tag.map(|t| format!(":{t}")).unwrap_or_default();
            return Ok(format!("{transport}{}{tag}", absolute.display()));
        }
    }
    Ok(reference.to_string())
}

pub async fn image(client: &Client, op: &ImageOp, json: bool) -> Result<()> {
    match op {
        ImageOp::Ls => output::list(
            json,
            &client.images().await?,
            &["NAME", "VERSION", "ID", "SIZE", "KERNEL", "SOURCE"],
            |i| {
                vec![
                    // `*` marks the build the name resolves to; older builds go with `image prune`.
                    if i.current {
                        format!("{} *", i.name)
                    } else {
                        i.name.clone()
                    },
                    i.version.clone(),
                    i.id[..12].to_string(),
                    output::bytes(i.size),
                    format!("{} {}", i.manifest.kernel.flavor, i.manifest.kernel.release),
                    match &i.manifest.oci {
                        Some(oci) => format!("{} {}", oci.reference, &oci.digest),
                        None => "recipe".into(),
                    },
                ]
            },
        ),
        ImageOp::Inspect { image } => {
            let i = client.image(image).await?;
            if json {
                output::json(&i);
            } else {
                let m = &i.manifest;
                let a = &m.appliance;
                for (key, value) in [
                    (
                        "name",
                        format!(
                            "{} {}{}",
                            i.name,
                            i.version,
                            if i.current {
                                " (current build)"
                            } else {
                                " (older build)"
                            }
                        ),
                    ),
                    ("id", i.id.clone()),
                    (
                        "size",
                        format!(
                            "{} (root {}, initramfs {})",
                            output::bytes(i.size),
                            output::bytes(m.rootfs.size),
                            output::bytes(m.initramfs.size)
                        ),
                    ),
                    (
                        "kernel",
                        match &m.kernel.id {
                            Some(id) => format!(
                                "vroom's {id}: {} ({} {}), everything built in, no ACPI",
                                m.kernel.release, m.kernel.package, m.kernel.version
                            ),
                            None => format!(
                                "Debian's {} ({}), modules in the initramfs",
                                m.kernel.release, m.kernel.version
                            ),
                        },
                    ),
                    (
                        "memory",
                        format!(
                            "{} MiB by default, at least {} MiB",
                            m.default_mem_mib, m.min_mem_mib
                        ),
                    ),
                    (
                        "packages",
                        format!(
                            "{} (`vroom image sbom {}` lists them)",
                            m.packages.len(),
                            i.name
                        ),
                    ),
                    (
                        "nic roles",
                        if a.nic_roles.is_empty() {
                            "-".into()
                        } else {
                            a.nic_roles.join(", ")
                        },
                    ),
                    (
                        "services",
                        a.services
                            .iter()
                            .map(|s| s.name.clone())
                            .collect::<Vec<_>>()
                            .join(", "),
                    ),
                ] {
                    println!("{:<10} {value}", format!("{key}:"));
                }
                if let Some(oci) = &m.oci {
                    print_oci(oci, a);
                }
                println!("config:");
                for (key, value) in &a.seed_config {
                    println!("  {key}={value}{}", env_note(a, key));
                }
            }
        }
        ImageOp::Rm { image } => client.remove_image(image).await?,
        ImageOp::Warm { image, mem } => crate::snapshot::warm(client, image, *mem, json).await?,
        ImageOp::Prune => {
            let removed = client.prune_images().await?;
            if json {
                output::json(&removed);
            } else if removed.is_empty() {
                println!("no older builds to remove");
            } else {
                for image in &removed {
                    println!(
                        "removed {} {} {} ({})",
                        image.name,
                        image.version,
                        &image.id[..12],
                        output::bytes(image.size)
                    );
                }
            }
        }
        ImageOp::Sbom { image } => {
            let packages = client.image(image).await?.manifest.packages;
            output::list(
                json,
                &packages,
                &["PACKAGE", "VERSION", "SOURCE", "SHA256"],
                |p| {
                    vec![
                        p.name.clone(),
                        p.version.clone(),
                        p.source.clone(),
                        p.sha256[..16].to_string(),
                    ]
                },
            );
        }
        ImageOp::Import {
            reference,
            name,
            insecure,
            kernel,
        } => {
            let req = vroom_types::ImportImageRequest {
                reference: absolute_reference(reference)?,
                name: name.clone(),
                insecure: *insecure,
                kernel: kernel.clone(),
            };
            let mut stages = output::Stages::new(json, format!("importing {}", req.reference));
            let imported = client
                .import_image(&req, |stage, detail| stages.update(stage, detail))
                .await;
            stages.finish(imported.is_ok());
            let report = imported?;
            let image = &report.image;
            if json {
                output::json(&report);
                return Ok(());
            }
            let what = if report.cached {
                "unchanged"
            } else {
                "imported"
            };
            println!(
                "{what} {} {} ({}): {}",
                image.name,
                image.version,
                &image.id[..12],
                output::bytes(image.size)
            );
        }
        ImageOp::Build {
            recipe,
            update,
            kernel,
        } => {
            // A catalog name (`vroom image build firewall`) unless such a path exists here.
            let path = match recipe.to_str() {
                Some(name) if !recipe.exists() && vroom_image::in_catalog(name) => recipe.clone(),
                _ => recipe.canonicalize().with_context(|| {
                    format!(
                        "cannot find recipe {} (the catalog has {})",
                        recipe.display(),
                        vroom_image::catalog().join(", ")
                    )
                })?,
            };
            let mut stages = output::Stages::new(json, format!("building {}", path.display()));
            let built = client
                .build_image(&path, *update, kernel.as_deref(), |stage, detail| {
                    stages.update(stage, detail)
                })
                .await;
            stages.finish(built.is_ok());
            let report = built?;
            let image = &report.image;
            if json {
                output::json(&report);
                return Ok(());
            }
            let what = if report.cached { "unchanged" } else { "built" };
            println!(
                "{what} {} {} ({}): {} packages, {}",
                image.name,
                image.version,
                &image.id[..12],
                image.manifest.packages.len(),
                output::bytes(image.size)
            );
            for change in &report.changes {
                let version = |v: &Option<String>| v.clone().unwrap_or_else(|| "-".into());
                println!(
                    "  {} {} -> {}",
                    change.name,
                    version(&change.from),
                    version(&change.to)
                );
            }
            if *update && report.changes.is_empty() {
                println!("  no package changed");
            }
        }
    }
    Ok(())
}

/// What an imported image was and how its config was mapped.
/// What `image inspect` says of a config key that feeds a service's
/// environment (an imported image's): its type, variable and description.
fn env_note(a: &vroom_types::ApplianceSpec, key: &str) -> String {
    let Some(var) = a
        .services
        .iter()
        .find_map(|s| s.config_env.iter().find(|(_, k)| *k == key))
        .map(|(var, _)| var)
    else {
        return String::new();
    };
    let field = a.config_schema.get(key).cloned().unwrap_or_default();
    let kind = serde_json::to_value(field.kind)
        .ok()
        .and_then(|v| v.as_str().map(String::from))
        .unwrap_or_default();
    match field.description {
        // An unlabelled variable's key says no more than its name.
        Some(d) if d != format!("the environment variable {var}") => {
            format!("  ({kind}, ${var}: {d})")
        }
        _ => format!("  ({kind}, ${var})"),
    }
}

fn print_oci(oci: &vroom_types::OciOrigin, a: &vroom_types::ApplianceSpec) {
    let none = |v: &[String]| {
        if v.is_empty() {
            "-".to_string()
        } else {
            v.join(", ")
        }
    };
    let main = a.services.first().cloned().unwrap_or_default();
    for (key, value) in [
        ("source", oci.reference.clone()),
        ("digest", oci.digest.clone()),
        ("layers", oci.layers.len().to_string()),
        ("entrypoint", format!("{:?}", main.command)),
        ("env", none(&main.env)),
        ("user", main.user.unwrap_or_else(|| "0:0 (root)".into())),
        ("workdir", main.workdir.unwrap_or_else(|| "/".into())),
        (
            "stop signal",
            main.stop_signal.unwrap_or_else(|| "SIGTERM".into()),
        ),
        ("ports", none(&oci.exposed_ports)),
        (
            "health",
            a.health_tcp_port
                .map_or("-".into(), |p| format!("tcp connect to port {p}")),
        ),
        (
            "volumes",
            none(
                &oci.volumes
                    .iter()
                    .map(|path| match a.volumes.iter().find(|v| &v.path == path) {
                        Some(v) => format!(
                            "{path} (data volume INSTANCE-{}, {} MiB)",
                            v.name, v.size_mib
                        ),
                        None => format!("{path} (tmpfs)"),
                    })
                    .collect::<Vec<_>>(),
            ),
        ),
        ("writable", format!("{} (tmpfs)", none(&a.writable))),
    ] {
        println!("{:<12} {value}", format!("{key}:"));
    }
}
