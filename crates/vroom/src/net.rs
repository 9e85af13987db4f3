//! `vroom net`: networks.

use anyhow::Result;
use vroom_client::Client;
use vroom_types::NetworkSpec;

use crate::args::NetOp;
use crate::output;

pub async fn net(client: &Client, op: &NetOp, json: bool) -> Result<()> {
    match op {
        NetOp::Create {
            name,
            subnet,
            nat,
            isolated,
            mirror,
            allow_host,
        } => {
            let network = client
                .create_network(&NetworkSpec {
                    name: name.clone(),
                    subnet: *subnet,
                    nat: *nat,
                    isolated: *isolated,
                    mirror: *mirror,
                    allow_host: allow_host.clone(),
                })
                .await?;
            if json {
                output::json(&network);
            } else {
                println!(
                    "network {} created: {} on bridge {}",
                    network.name, network.subnet, network.bridge
                );
            }
        }
        NetOp::Ls => output::list(
            json,
            &client.networks().await?,
            &["NAME", "SUBNET", "GATEWAY", "BRIDGE", "MODE"],
            |n| {
                vec![
                    n.name.to_string(),
                    n.subnet.to_string(),
                    n.gateway.to_string(),
                    n.bridge.clone(),
                    format!(
                        "{}{}",
                        match (n.isolated, n.nat) {
                            (true, _) => "isolated",
                            (false, true) => "nat",
                            (false, false) => "host",
                        },
                        if n.mirror { ",mirror" } else { "" }
                    ),
                ]
            },
        ),
        NetOp::Inspect { name } => {
            let n = client.network(name).await?;
            if json {
                output::json(&n);
            } else {
                let mode = match (n.isolated, n.nat) {
                    (true, _) => "isolated (no host address; a router appliance is its gateway)",
                    (false, true) => "nat (the host masquerades its traffic)",
                    (false, false) => "host (reachable from the host, not routed out)",
                };
                let instances: Vec<String> = client
                    .list()
                    .await?
                    .into_iter()
                    .flat_map(|i| {
                        i.nics
                            .iter()
                            .filter(|nic| nic.network == n.name)
                            .map(|nic| match &nic.role {
                                Some(role) => {
                                    format!("{} ({role} {})", i.spec.name, nic.shown_ip())
                                }
                                None => format!("{} ({})", i.spec.name, nic.shown_ip()),
                            })
                            .collect::<Vec<_>>()
                    })
                    .collect();
                for (key, value) in [
                    ("name", n.name.to_string()),
                    ("subnet", n.subnet.to_string()),
                    ("gateway", n.gateway.to_string()),
                    ("bridge", n.bridge.clone()),
                    ("mode", mode.to_string()),
                    (
                        "mirror",
                        if n.mirror {
                            "yes: every frame to every port"
                        } else {
                            "no"
                        }
                        .into(),
                    ),
                    (
                        "host ports",
                        if n.allow_host.is_empty() {
                            "none: guests reach no host service".into()
                        } else {
                            let ports: Vec<String> =
                                n.allow_host.iter().map(ToString::to_string).collect();
                            format!("{} on {}", ports.join(", "), n.gateway)
                        },
                    ),
                    ("created", output::ago(n.created_at)),
                    (
                        "attached",
                        if instances.is_empty() {
                            "-".into()
                        } else {
                            instances.join(", ")
                        },
                    ),
                ] {
                    println!("{:<12} {value}", format!("{key}:"));
                }
            }
        }
        NetOp::Rm { name } => {
            client.remove_network(name).await?;
            if !json {
                println!("network {name} removed");
            }
        }
    }
    Ok(())
}
