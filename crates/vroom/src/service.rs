//! `vroom service ...`: members of one image behind a load balancer.

use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use vroom_client::Client;
use vroom_types::{ErrorCode, InstanceState, Service, ServiceDefinition};

use crate::args::ServiceOp;
use crate::output;

pub async fn service(client: &Client, op: &ServiceOp, json: bool) -> Result<()> {
    match op {
        ServiceOp::Create {
            name,
            image,
            replicas,
            net,
            port,
        } => {
            let definition = ServiceDefinition {
                name: name.clone(),
                image: image.clone(),
                replicas: *replicas,
                network: net.clone(),
                port: *port,
            };
            let spinner = output::spinner(
                json,
                format!("creating service {name}: {replicas} × {image} behind {name}-lb"),
            );
            let made = match client.create_service(&definition).await {
                Ok(_) => converged(client, name.as_str()).await,
                Err(e) => Err(e.into()),
            };
            if let Some(s) = spinner {
                s.finish_and_clear();
            }
            show_done(&made?, json);
        }
        ServiceOp::Ls => {
            let services = client.services().await?;
            if json {
                output::json(&services);
                return Ok(());
            }
            let rows: Vec<Vec<String>> = services
                .iter()
                .map(|s| {
                    vec![
                        s.spec.name.to_string(),
                        s.spec.image.clone(),
                        format!("{}/{}", s.ready, s.spec.replicas),
                        address(s),
                        s.spec.network.to_string(),
                    ]
                })
                .collect();
            output::table(&["NAME", "IMAGE", "READY", "ADDRESS", "NETWORK"], &rows);
        }
        ServiceOp::Inspect { name } => {
            let service = client.service(name).await?;
            if json {
                output::json(&service);
            } else {
                show(&service);
            }
        }
        ServiceOp::Scale { name, replicas } => {
            let spinner = output::spinner(json, format!("scaling service {name} to {replicas}"));
            let scaled = match client.scale_service(name, *replicas).await {
                Ok(_) => converged(client, name).await,
                Err(e) => Err(e.into()),
            };
            if let Some(s) = spinner {
                s.finish_and_clear();
            }
            show_done(&scaled?, json);
        }
        ServiceOp::Rm { name } => {
            let spinner = output::spinner(json, format!("removing service {name}"));
            let removed = match client.remove_service(name).await {
                Ok(()) => gone(client, name).await,
                Err(e) => Err(e.into()),
            };
            if let Some(s) = spinner {
                s.finish_and_clear();
            }
            removed?;
            if !json {
                println!("service {name} removed");
            }
        }
    }
    Ok(())
}

/// How long the CLI waits for a service to converge.
const CONVERGE_WITHIN: Duration = Duration::from_secs(300);

/// Waits until vroomd has brought the service to its number: every member
/// running and balanced.
async fn converged(client: &Client, name: &str) -> Result<Service> {
    let deadline = Instant::now() + CONVERGE_WITHIN;
    loop {
        let service = client.service(name).await?;
        let replicas = service.spec.replicas;
        if service.ready == replicas && service.members.len() as u32 == replicas {
            return Ok(service);
        }
        if Instant::now() > deadline {
            let failed: Vec<String> = service
                .members
                .iter()
                .filter(|m| m.state == Some(InstanceState::Failed))
                .map(|m| m.name.to_string())
                .collect();
            bail!(
                "service {name} has {} of {replicas} members ready after {}s{}; vroomd keeps at it (`vroom service inspect {name}`)",
                service.ready,
                CONVERGE_WITHIN.as_secs(),
                if failed.is_empty() {
                    String::new()
                } else {
                    format!(" (failed: {}, see `vroom logs`)", failed.join(", "))
                }
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Waits until vroomd has removed the service.
async fn gone(client: &Client, name: &str) -> Result<()> {
    let deadline = Instant::now() + CONVERGE_WITHIN;
    loop {
        match client.service(name).await {
            Err(e) if e.code() == Some(ErrorCode::NotFound) => return Ok(()),
            Err(e) => return Err(e.into()),
            Ok(_) if Instant::now() > deadline => {
                bail!("service {name} is still being removed; vroomd keeps at it")
            }
            Ok(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
}

fn address(service: &Service) -> String {
    service
        .address
        .map(|ip| format!("{ip}:{}", service.spec.port))
        .unwrap_or_else(|| "-".into())
}

fn show_done(service: &Service, json: bool) {
    if json {
        output::json(service);
    } else {
        println!(
            "service {} has {} of {} members ready at {}",
            service.spec.name,
            service.ready,
            service.spec.replicas,
            address(service)
        );
    }
}

fn show(service: &Service) {
    println!("name:     {}", service.spec.name);
    println!("image:    {}", service.spec.image);
    println!(
        "address:  {} (balancer {})",
        address(service),
        service.balancer
    );
    println!("network:  {}", service.spec.network);
    println!("ready:    {} of {}", service.ready, service.spec.replicas);
    if service.removing {
        println!("state:    being removed");
    }
    let rows: Vec<Vec<String>> = service
        .members
        .iter()
        .map(|m| {
            vec![
                m.name.to_string(),
                m.state.map_or("-".into(), |s| s.to_string()),
                m.ip.map_or("-".into(), |ip| ip.to_string()),
                if m.balanced { "yes" } else { "no" }.into(),
            ]
        })
        .collect();
    output::table(&["MEMBER", "STATE", "ADDRESS", "BALANCED"], &rows);
}
