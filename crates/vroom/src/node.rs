//! The cluster commands: `node`, `migrate` and `cluster init|credentials`.

use anyhow::Result;
use vroom_client::Client;
use vroom_types::Name;

use crate::args::{ClusterOp, NodeOp};
use crate::output;

pub async fn node(client: &Client, op: &NodeOp, json: bool) -> Result<()> {
    let one = match op {
        NodeOp::Ls => {
            let header = [
                "NAME",
                "STATE",
                "LEADER",
                "ADVERTISE",
                "MEM FREE",
                "CPUS",
                "INSTANCES",
            ];
            output::list(json, &client.nodes().await?, &header, |n| {
                let state = match (n.alive, n.cordoned) {
                    (true, false) => "ready",
                    (true, true) => "cordoned",
                    (false, _) => "down",
                };
                vec![
                    n.name.to_string(),
                    state.into(),
                    if n.leader { "*".into() } else { String::new() },
                    n.advertise.clone(),
                    format!("{}M/{}M", n.mem_free_mib, n.mem_total_mib),
                    n.cpus.to_string(),
                    n.instances.len().to_string(),
                ]
            });
            return Ok(());
        }
        NodeOp::Inspect { name } => client.node(name.as_str()).await?,
        NodeOp::Cordon { name } => client.node_op(name.as_str(), "cordon").await?,
        NodeOp::Uncordon { name } => client.node_op(name.as_str(), "uncordon").await?,
        NodeOp::Drain { name, force } => {
            let report = client.drain_node(name.as_str(), *force).await?;
            if json {
                output::json(&report);
            } else {
                print_drain(&report);
            }
            return Ok(());
        }
        NodeOp::Rm { name } => {
            client.remove_node(name.as_str()).await?;
            if !json {
                println!("node {name} removed from the cluster");
            }
            return Ok(());
        }
    };
    if json {
        output::json(&one);
    } else {
        println!("node:       {}", one.name);
        println!("advertise:  {}", one.advertise);
        println!(
            "state:      {}{}{}",
            if one.alive { "alive" } else { "down" },
            if one.cordoned { ", cordoned" } else { "" },
            if one.leader { ", leader" } else { "" }
        );
        println!(
            "memory:     {} MiB free of {} MiB",
            one.mem_free_mib, one.mem_total_mib
        );
        println!("cpus:       {}", one.cpus);
        println!("joined:     {}", output::ago(one.joined_at));
        println!(
            "instances:  {}",
            if one.instances.is_empty() {
                "-".to_string()
            } else {
                one.instances.join(", ")
            }
        );
    }
    Ok(())
}

/// What a drain did: one line per instance, then the node.
fn print_drain(report: &vroom_types::DrainReport) {
    let node = &report.node.name;
    for m in &report.moved {
        println!("moved {} from {node} to {}", m.instance, m.to);
    }
    for r in &report.released {
        println!("released {r} (stopped; it starts where the scheduler places it)");
    }
    for k in &report.kept {
        println!("left {} running on {node}: {}", k.instance, k.reason);
    }
    if report.kept.is_empty() {
        println!(
            "drained {node}: {} moved, {} released; it stays cordoned (`vroom node uncordon {node}` lets instances back)",
            report.moved.len(),
            report.released.len()
        );
    } else {
        println!(
            "cordoned {node}: {} moved, {} left running on it; `vroom node drain {node}` again once a node can take them",
            report.moved.len(),
            report.kept.len()
        );
    }
}

/// `vroom migrate NAME --to NODE`: a live migration, reported with its timings.
pub async fn migrate(client: &Client, name: &str, to: &Name, json: bool) -> Result<()> {
    let m = client.migrate(name, to).await?;
    if json {
        output::json(&m);
    } else {
        println!(
            "migrated {} from {} to {} in {} ms (guest paused {} ms, switch-over {} ms, {} MiB sent)",
            m.instance,
            m.from,
            m.to,
            m.total_ms,
            m.downtime_ms,
            m.switchover_ms,
            m.bytes >> 20
        );
    }
    Ok(())
}

/// `vroom cluster init|credentials`: straight to etcd, before any vroomd of
/// the cluster runs.
pub async fn cluster(op: &ClusterOp, json: bool) -> Result<i32> {
    match op {
        ClusterOp::Init { etcd } => {
            let info = vroom_cluster::node::init(etcd)
                .await
                .map_err(|e| anyhow::anyhow!(e))?;
            if json {
                output::json(&info);
            } else {
                println!("cluster {} created in etcd at {}", info.id, etcd.join(","));
            }
        }
        ClusterOp::Credentials { etcd, out, name } => {
            vroom_cluster::tls::credentials(etcd, name.as_str(), out)
                .await
                .map_err(|e| anyhow::anyhow!(e))?;
            if !json {
                println!(
                    "certificate {name} written to {}; use it with `VROOM_TLS_DIR={} vroom --host NODE ...`",
                    out.display(),
                    out.display()
                );
            }
        }
    }
    Ok(0)
}
