//! The instance commands: run, clone, ps, inspect, start, stop, restart, rm.

use std::time::Duration;

use anyhow::Result;
use vroom_client::Client;
use vroom_types::{Instance, InstanceAction, InstanceSpec, Name, NicSpec, RunRequest};

use crate::args::RunArgs;
use crate::output;
use crate::session::{build_from_catalog_if_missing, wait_ready};

pub async fn run(client: &Client, args: &RunArgs, json: bool) -> Result<i32> {
    let mut nics = args.nets.clone();
    if let (Some(room), Some(segment)) = (&args.room, args.segment) {
        nics.insert(0, crate::room::room_nic(client, room, segment).await?);
    }
    let spec = InstanceSpec {
        name: args.name.clone(),
        image: args.image.clone().unwrap_or_default(),
        mem_mib: args.mem,
        cpus: args.cpus,
        nics,
        accel: args.accel,
        config_volume_kib: args.config_size,
        ephemeral: args.ephemeral,
        volumes: args.volumes.clone(),
    };
    if args.from_snapshot.is_none() {
        build_from_catalog_if_missing(client, &spec.image, json).await?;
    }
    let spinner = output::spinner(json, format!("creating {}", spec.name));
    let created = client
        .run(&RunRequest {
            spec,
            ready_timeout_secs: Some(args.timeout),
            from_snapshot: args.from_snapshot.clone(),
            cold: args.cold,
            placement: vroom_types::Placement {
                ha: args.ha,
                spread: args.spread.clone(),
                node: args.node.clone(),
            },
            env: args.env.iter().cloned().collect(),
        })
        .await;
    let created = match created {
        Ok(i) => i,
        Err(e) => {
            if let Some(s) = &spinner {
                s.finish_and_clear();
            }
            return Err(e.into());
        }
    };
    if let Some(s) = &spinner {
        s.set_message(format!(
            "booting {} ({})",
            created.spec.name,
            accel_of(&created)
        ));
    }
    let instance = wait_ready(
        client,
        created.spec.name.as_str(),
        Duration::from_secs(args.timeout + 10),
    )
    .await;
    if let Some(s) = &spinner {
        s.finish_and_clear();
    }
    let instance = instance?;
    if json {
        output::json(&instance);
    } else {
        let ips: Vec<String> = instance
            .nics
            .iter()
            .map(|n| format!("{} ({})", n.shown_ip(), n.network))
            .collect();
        let from = instance
            .status
            .started_from
            .as_ref()
            .map(|f| format!(" from {f}"))
            .unwrap_or_default();
        println!(
            "{} is running: {} in {:.1}s on {}{from}",
            instance.spec.name,
            ips.join(", "),
            instance.status.boot_ms.unwrap_or(0) as f64 / 1000.0,
            accel_of(&instance)
        );
    }
    Ok(0)
}

/// `vroom clone SNAPSHOT NAME`: `run --from-snapshot` with the defaults.
pub async fn clone(
    client: &Client,
    snapshot: &Name,
    name: &Name,
    nets: &[NicSpec],
    json: bool,
) -> Result<i32> {
    let args = RunArgs {
        image: None,
        name: name.clone(),
        mem: None,
        cpus: 1,
        nets: nets.to_vec(),
        accel: vroom_types::AccelChoice::Auto,
        timeout: vroom_core::engine::DEFAULT_READY_TIMEOUT_SECS,
        config_size: None,
        from_snapshot: Some(snapshot.clone()),
        cold: false,
        ephemeral: false,
        volumes: Vec::new(),
        room: None,
        segment: None,
        ha: Default::default(),
        spread: None,
        node: None,
        env: Vec::new(),
    };
    run(client, &args, json).await
}

pub async fn inspect(client: &Client, name: &str, json: bool) -> Result<()> {
    let mut instance = client.get(name).await?;
    // Secret values (passwords) are masked here as in `config get`.
    let schema = crate::config::image_schema(client, &instance.image_id).await;
    instance.config = vroom_types::shown_config(&schema, &instance.config);
    if json {
        output::json(&instance);
    } else {
        show_instance(&instance);
    }
    Ok(())
}

pub async fn start(client: &Client, name: &str, json: bool) -> Result<()> {
    lifecycle(client, name, InstanceAction::Start, json).await
}

pub async fn stop(client: &Client, name: &str, json: bool) -> Result<()> {
    lifecycle(client, name, InstanceAction::Stop, json).await
}

pub async fn restart(client: &Client, name: &str, json: bool) -> Result<()> {
    lifecycle(client, name, InstanceAction::Restart, json).await
}

/// `inspect` for people; `--json` gives the whole record.
fn show_instance(i: &Instance) {
    let status = &i.status;
    let mut state = status.state.to_string();
    let mut details = vec![];
    if let Some(pid) = status.pid {
        details.push(format!("pid {pid}"));
    }
    if let Some(accel) = status.accel {
        details.push(accel.to_string());
    }
    if let Some(ms) = status.boot_ms {
        let secs = |ms: u64| ms as f64 / 1000.0;
        details.push(match status.boot_phases {
            Some(p) => format!(
                "ready in {:.1}s: kernel {:.1}s, init {:.1}s",
                secs(ms),
                secs(p.kernel_ms),
                secs(p.init_ms)
            ),
            None => format!("ready in {:.1}s", secs(ms)),
        });
    }
    if let Some(from) = &status.started_from {
        details.push(format!("from {from}"));
    }
    details.push(format!("{} restarts", status.restarts));
    state.push_str(&format!(" ({})", details.join(", ")));
    let rows = [
        ("name", i.spec.name.to_string()),
        (
            "image",
            format!(
                "{} ({})",
                i.image_name,
                &i.image_id[..12.min(i.image_id.len())]
            ),
        ),
        ("state", state),
        ("wanted", format!("{:?}", i.desired).to_lowercase()),
        (
            "resources",
            format!("{} MiB, {} vCPU", i.mem_mib, i.spec.cpus),
        ),
        ("created", output::ago(i.created_at)),
    ];
    for (key, value) in rows {
        println!("{:<10} {value}", format!("{key}:"));
    }
    if let Some(node) = &i.node {
        println!("{:<10} {node}", "node:");
    }
    if i.spec.ephemeral {
        println!(
            "{:<10} ephemeral: every start returns to its first config",
            "slate:"
        );
    }
    if let Some(error) = &status.last_error {
        println!("{:<10} {error}", "error:");
    }
    if let Some(why) = &status.waiting {
        println!("{:<10} {why}", "waiting:");
    }
    if let Some(health) = &i.health {
        println!("{:<10} {}", "health:", health_line(health));
    }
    println!("nics:");
    for nic in &i.nics {
        println!(
            "  {:<6} {} on {} (gateway {}), mac {}, tap {}",
            nic.role.as_deref().unwrap_or("-"),
            nic.shown_cidr(),
            nic.network,
            nic.gateway,
            nic.mac,
            nic.tap
        );
    }
    println!("config:");
    for (key, value) in &i.config {
        println!("  {key}={value}");
    }
}

/// The guest's own report in a line: "passes its health check;
/// connections tracked: 2,410 of 12,451, 0 dropped".
fn health_line(health: &vroom_types::GuestHealth) -> String {
    let mut parts = vec![if health.ready {
        "passes its health check".to_string()
    } else {
        "fails its health check".to_string()
    }];
    if !health.services_down.is_empty() {
        parts.push(format!("down: {}", health.services_down.join(", ")));
    }
    if let Some(table) = health.conntrack {
        let mut line = format!(
            "connections tracked: {} of {}, {} dropped",
            table.entries, table.max, table.dropped
        );
        if table.dropped > 0 || table.entries >= table.max {
            line.push_str(" (table full: raise conntrack_max or memory)");
        }
        parts.push(line);
    }
    parts.extend(health.volumes.iter().filter_map(|v| v.issue()));
    parts.join("; ")
}

fn accel_of(i: &Instance) -> String {
    i.status
        .accel
        .map(|a| a.to_string())
        .unwrap_or_else(|| "-".into())
}

pub async fn ps(client: &Client, json: bool) -> Result<()> {
    let header = [
        "NAME",
        "IMAGE",
        "STATE",
        "PID",
        "ACCEL",
        "MEM",
        "ADDRESSES",
        "RESTARTS",
        "CREATED",
    ];
    let list = client.list().await?;
    // A NIC on a room's network is labelled by its segment (lan, dmz).
    let rooms = if json {
        vec![]
    } else {
        client.rooms().await.unwrap_or_default()
    };
    // A cluster node's listing says where each instance runs.
    let cluster = list.iter().any(|i| i.node.is_some());
    let header: Vec<&str> = if cluster {
        header
            .iter()
            .copied()
            .take(3)
            .chain(["NODE"])
            .chain(header.iter().copied().skip(3))
            .collect()
    } else {
        header.to_vec()
    };
    output::list(json, &list, &header, |i| {
        let mut row = vec![
            i.spec.name.to_string(),
            i.image_name.clone(),
            match &i.status.waiting {
                // The cluster runs it nowhere now: `waiting`, and why in
                // `inspect`.
                Some(_) => "waiting".to_string(),
                None => i.status.state.to_string(),
            },
            i.status
                .pid
                .map(|p| p.to_string())
                .unwrap_or_else(|| "-".into()),
            accel_of(i),
            format!("{}M", i.mem_mib),
            i.nics
                .iter()
                .map(|n| {
                    match vroom_types::nic_label(&rooms, n.network.as_str(), n.role.as_deref()) {
                        Some(label) => format!("{label}:{}", n.shown_ip()),
                        None => n.shown_ip(),
                    }
                })
                .collect::<Vec<_>>()
                .join(","),
            i.status.restarts.to_string(),
            output::ago(i.created_at),
        ];
        if cluster {
            row.insert(3, i.node.clone().unwrap_or_else(|| "-".into()));
        }
        row
    });
    Ok(())
}

async fn lifecycle(client: &Client, name: &str, action: InstanceAction, json: bool) -> Result<()> {
    let verb = match action {
        InstanceAction::Start => "starting",
        InstanceAction::Stop => "stopping",
        InstanceAction::Restart => "restarting",
    };
    let spinner = output::spinner(json, format!("{verb} {name}"));
    let done = async {
        let instance = client.action(name, action).await?;
        if matches!(action, InstanceAction::Start | InstanceAction::Restart) {
            if let Some(s) = &spinner {
                s.set_message(format!("{verb} {name}: waiting for its guest to be ready"));
            }
            wait_ready(
                client,
                name,
                Duration::from_secs(vroom_core::engine::DEFAULT_READY_TIMEOUT_SECS + 10),
            )
            .await
        } else {
            Ok(instance)
        }
    }
    .await;
    if let Some(s) = spinner {
        s.finish_and_clear();
    }
    let instance = done?;
    if json {
        output::json(&instance);
    } else {
        println!("{name} is {}", instance.status.state);
    }
    Ok(())
}
