//! `vroom room ...` and `vroom topology`.

use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};

use anyhow::{bail, Context, Result};
use vroom_client::Client;
use vroom_types::{Expose, Name, Room, RoomFile, RoomNetworks, RoomPlan, RoomSpec, Segment};

use crate::args::{RoomOp, TopologyFormat};
use crate::output;

/// Reads and checks a room file before anything is sent: a bounded regular
/// file, TOML with no unknown fields, whose JSON fits the API's body limit
/// for rooms (the same constant bounds the file, so one limit is named).
pub fn read_room_file(path: &Path) -> Result<RoomFile> {
    let limit = vroom_types::limits::MAX_ROOM_BODY;
    let bytes = vroom_input::read_input(path, limit as u64, None)?;
    let text =
        std::str::from_utf8(&bytes).with_context(|| format!("{} is not UTF-8", path.display()))?;
    let file: RoomFile = toml::from_str(text).map_err(|e| {
        anyhow::anyhow!(
            "{} is not a valid room file: {}",
            path.display(),
            e.message().lines().next().unwrap_or("invalid TOML")
        )
    })?;
    let sent = serde_json::to_vec(&file).context("cannot encode the room file")?;
    if sent.len() > limit {
        bail!(
            "{} is {} KiB once sent as JSON: a room file may hold {} KiB",
            path.display(),
            sent.len().div_ceil(1024),
            limit / 1024
        );
    }
    Ok(file)
}

pub async fn room(client: &Client, op: &RoomOp, json: bool) -> Result<()> {
    match op {
        RoomOp::Create { name, wan, subnets } => {
            let mut networks = RoomNetworks::default();
            for raw in subnets {
                networks
                    .set(raw)
                    .map_err(|e| anyhow::anyhow!("--subnet: {e}"))?;
            }
            check_room_networks(client, name, wan.as_ref()).await?;
            crate::session::build_from_catalog_if_missing(client, "firewall", json).await?;
            let spinner = output::spinner(json, format!("creating room {name}"));
            let created = client
                .create_room(&RoomSpec {
                    name: name.clone(),
                    wan: wan.clone(),
                    networks,
                })
                .await;
            if let Some(s) = &spinner {
                s.finish_and_clear();
            }
            let room = created?;
            if json {
                output::json(&room);
            } else {
                println!(
                    "room {} created: lan {}, dmz {}, firewall {} (wan on {}), DNS domain {}",
                    room.name, room.lan, room.dmz, room.firewall, room.wan, room.domain
                );
            }
        }
        RoomOp::Apply { file, dry_run } => {
            let file = read_room_file(file)?;
            check_room_networks(client, &file.name, file.wan.as_ref()).await?;
            crate::session::build_from_catalog_if_missing(client, "firewall", json).await?;
            let images = file.instances.values().map(|i| &i.image);
            let services = file.services.iter().map(|s| &s.image);
            let balancer = "lb".to_string();
            let balancer = (!file.services.is_empty()).then_some(&balancer);
            for image in images.chain(services).chain(balancer) {
                crate::session::build_from_catalog_if_missing(client, image, json).await?;
            }
            let spinner = (!*dry_run)
                .then(|| output::spinner(json, format!("applying room {}", file.name)))
                .flatten();
            let applied = client.apply_room(&file, *dry_run).await;
            if let Some(s) = spinner {
                s.finish_and_clear();
            }
            show_plan(&applied?, json);
        }
        RoomOp::Ls => {
            let rooms = client.rooms().await?;
            if json {
                output::json(&rooms);
                return Ok(());
            }
            let rows: Vec<Vec<String>> = rooms
                .iter()
                .map(|r| {
                    vec![
                        r.name.to_string(),
                        r.state.to_string(),
                        r.firewall.to_string(),
                        r.wan.to_string(),
                        r.domain.clone(),
                        r.exposes.len().to_string(),
                    ]
                })
                .collect();
            output::table(
                &["NAME", "STATE", "FIREWALL", "WAN", "DOMAIN", "EXPOSES"],
                &rows,
            );
        }
        RoomOp::Inspect { name } => {
            let room = client.room(name).await?;
            if json {
                output::json(&room);
            } else {
                show_room(client, &room).await?;
            }
        }
        RoomOp::Rm { name, force } => {
            let members = if *force {
                client
                    .topology(Some(name))
                    .await
                    .map(|t| t.instances.len().saturating_sub(1))
                    .unwrap_or(0)
            } else {
                0
            };
            let spinner = output::spinner(json, format!("removing room {name}"));
            let removed = client.remove_room(name, *force).await;
            if let Some(s) = spinner {
                s.finish_and_clear();
            }
            removed?;
            if !json {
                println!(
                    "room {name} removed with its firewall, networks and {}",
                    output::count(members, "instance", "instances")
                );
            }
        }
        RoomOp::Expose {
            name,
            port,
            to,
            proto,
        } => {
            let (instance, to_port) = match to.split_once(':') {
                Some((i, p)) => Name::new(i)
                    .ok()
                    .zip(p.parse::<u16>().ok())
                    .with_context(|| format!("--to {to:?}: use INSTANCE:PORT, e.g. web1:80"))?,
                None => {
                    let instance = Name::new(to).with_context(|| {
                        format!("--to {to:?}: use INSTANCE or INSTANCE:PORT, e.g. web1:80")
                    })?;
                    let port = exposed_port(client, to, *proto).await?;
                    (instance, port)
                }
            };
            let port = &port.unwrap_or(to_port);
            let to = format!("{instance}:{to_port}");
            let room = client
                .expose(
                    name,
                    &Expose {
                        port: *port,
                        proto: *proto,
                        to: instance,
                        to_port,
                    },
                )
                .await?;
            if json {
                output::json(&room);
            } else {
                let wan = firewall_wan(client, &room).await;
                println!(
                    "room {name} forwards {}/{port} of {} to {to}",
                    proto.as_str(),
                    wan.as_deref().unwrap_or("its firewall's wan address")
                );
            }
        }
        RoomOp::Unexpose { name, port, proto } => {
            let room = client.unexpose(name, *proto, *port).await?;
            if json {
                output::json(&room);
            } else {
                println!("room {name} no longer forwards {}/{port}", proto.as_str());
            }
        }
    }
    Ok(())
}

fn show_plan(plan: &RoomPlan, json: bool) {
    if json {
        output::json(plan);
        return;
    }
    if plan.changes.is_empty() {
        println!("room {}: no changes", plan.room);
        return;
    }
    for c in &plan.changes {
        println!("{} {} {}", c.op.sign(), c.what, c.detail);
    }
    let changes = output::count(plan.changes.len(), "change", "changes");
    if plan.applied {
        println!("room {}: {changes} applied", plan.room);
    } else {
        println!("room {}: {changes} (dry run, nothing changed)", plan.room);
    }
}

/// Refuses, before any image is built, a new room whose networks cannot
/// be made: one of its names taken, or a wan network that does not exist.
async fn check_room_networks(client: &Client, name: &Name, wan: Option<&Name>) -> Result<()> {
    vroom_types::check_room_name(name)?;
    if client.room(name.as_str()).await.is_ok() {
        return Ok(());
    }
    let networks = client.networks().await?;
    for segment in [Segment::Lan, Segment::Dmz] {
        let net = segment.network(name);
        if networks.iter().any(|n| n.name == net) {
            bail!("{}", vroom_core::engine::room_network_taken(name, &net));
        }
    }
    if let Some(wan) = wan {
        if !networks.iter().any(|n| &n.name == wan) {
            bail!("cannot create room {name}: its wan network {wan} does not exist (`vroom net create {wan}` first, or leave --wan out for `default`)");
        }
    }
    Ok(())
}

/// The firewall's address on its wan network, `ADDRESS on NETWORK`.
async fn firewall_wan(client: &Client, room: &Room) -> Option<String> {
    let firewall = client.get(room.firewall.as_str()).await.ok()?;
    let nic = firewall
        .nics
        .iter()
        .find(|n| n.network == room.wan && n.role.as_deref() == Some("wan"))?;
    Some(format!("{} on {}", nic.ip?, room.wan))
}

async fn show_room(client: &Client, room: &Room) -> Result<()> {
    println!("room      {} ({})", room.name, room.state);
    println!(
        "firewall  {} (wan {})",
        room.firewall,
        firewall_wan(client, room)
            .await
            .unwrap_or_else(|| format!("on {}, no address yet", room.wan))
    );
    println!("networks  lan {}, dmz {}", room.lan, room.dmz);
    println!("domain    {}", room.domain);
    let topology = client.topology(Some(room.name.as_str())).await?;
    println!("instances:");
    for i in &topology.instances {
        let nics: Vec<String> = i
            .nics
            .iter()
            .filter(|n| n.network == room.lan.as_str() || n.network == room.dmz.as_str())
            .map(|n| format!("{} {}", n.network, n.ip.as_deref().unwrap_or("l2")))
            .collect();
        println!(
            "  {:<16} {:<10} {} [{}]",
            i.name,
            i.image,
            nics.join(", "),
            i.state
        );
    }
    let services: Vec<_> = client
        .services()
        .await?
        .into_iter()
        .filter(|s| s.spec.room.as_ref() == Some(&room.name))
        .collect();
    if !services.is_empty() {
        println!("services:");
        for s in &services {
            println!(
                "  {:<16} {:<10} {} (DNS {}, {}.{}) [{} of {} ready, scale {}]",
                s.spec.name,
                s.spec.image,
                s.address
                    .map(|ip| format!("{ip}:{}", s.spec.port))
                    .unwrap_or_else(|| "no address yet".into()),
                s.spec.name,
                s.spec.name,
                room.domain,
                s.ready,
                s.desired,
                s.spec.scale()
            );
        }
    }
    println!("exposes:");
    for e in &room.exposes {
        println!(
            "  {}/{} -> {}:{}",
            e.proto.as_str(),
            e.port,
            e.to,
            e.to_port
        );
    }
    Ok(())
}

pub async fn topology(
    client: &Client,
    room: Option<&str>,
    format: TopologyFormat,
    json: bool,
) -> Result<()> {
    let topology = client.topology(room).await?;
    match (json, format) {
        (true, _) | (_, TopologyFormat::Json) => output::json(&topology),
        (_, TopologyFormat::Text) => print!("{}", topology.to_text()),
        (_, TopologyFormat::Dot) => print!("{}", topology.to_dot()),
        (_, TopologyFormat::Svg) => {
            let mut dot = Command::new("dot")
                .arg("-Tsvg")
                .stdin(Stdio::piped())
                .stdout(Stdio::inherit())
                .spawn()
                .map_err(|e| {
                    anyhow::anyhow!("cannot run Graphviz's dot ({e}): install the graphviz package, or use --format dot")
                })?;
            dot.stdin
                .take()
                .context("dot's stdin")?
                .write_all(topology.to_dot().as_bytes())?;
            if !dot.wait()?.success() {
                bail!("dot failed to render the topology");
            }
        }
    }
    Ok(())
}

/// `run --room R --segment S` puts the instance's NIC on the room's network.
pub async fn room_nic(
    client: &Client,
    room: &str,
    segment: vroom_types::Segment,
) -> Result<vroom_types::NicSpec> {
    let room = client.room(room).await?;
    Ok(vroom_types::NicSpec {
        network: room.network(segment).clone(),
        ip: None,
        role: None,
    })
}

/// The port `room expose --to INSTANCE` forwards to: the lowest one of
/// `proto` the instance's imported image exposes.
async fn exposed_port(
    client: &Client,
    instance: &str,
    proto: vroom_types::Protocol,
) -> Result<u16> {
    let image_id = client.get(instance).await?.image_id;
    let image = client.image(&image_id).await?;
    image
        .manifest
        .oci
        .as_ref()
        .and_then(|oci| oci.first_exposed(proto))
        .with_context(|| {
            format!(
                "--to {instance}: its image {} exposes no {} port; use --to {instance}:PORT",
                image.name,
                proto.as_str()
            )
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One limit, said once: a room file of 64 to 256 KiB (which the API
    /// once refused at 64 KiB) is read; one whose JSON exceeds the API's
    /// body limit is refused before anything is sent, naming that limit.
    #[test]
    fn room_files_fit_the_apis_body_limit_table() {
        let dir = tempfile::tempdir().unwrap();
        let kib = 1024;
        // (bytes of a value, a TOML literal string of backslashes, which
        // JSON doubles; the error, if any)
        let cases: &[(usize, bool, Option<&str>)] = &[
            (100 * kib, false, None),
            (200 * kib, false, None),
            (200 * kib, true, Some("a room file may hold 256 KiB")),
            (
                300 * kib,
                false,
                Some("larger than the 262144 bytes allowed"),
            ),
        ];
        for (i, (len, escaped, want)) in cases.iter().enumerate() {
            let value = if *escaped {
                format!("'{}'", "\\".repeat(*len))
            } else {
                format!("'{}'", "a".repeat(*len))
            };
            let path = dir.path().join(format!("room{i}.toml"));
            std::fs::write(
                &path,
                format!("name = \"r1\"\n[firewall]\nnote = {value}\n"),
            )
            .unwrap();
            match (read_room_file(&path), want) {
                (Ok(file), None) => assert_eq!(file.firewall["note"].len(), *len),
                (Err(e), Some(want)) => {
                    let text = format!("{e:#}");
                    assert!(text.contains(want), "{len} {escaped}: {text}");
                    assert!(text.matches("256 KiB").count() <= 1, "{text}");
                }
                (got, want) => panic!("{len} {escaped}: want {want:?}, got {:?}", got.map(|_| ())),
            }
        }
    }
}
