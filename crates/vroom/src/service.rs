//! `vroom service ...`: members of one image behind a load balancer.

use anyhow::Result;
use vroom_client::Client;
use vroom_types::{Service, ServiceDefinition};

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
            let made = client.create_service(&definition).await;
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
            let scaled = client.scale_service(name, *replicas).await;
            if let Some(s) = spinner {
                s.finish_and_clear();
            }
            show_done(&scaled?, json);
        }
        ServiceOp::Rm { name } => {
            let spinner = output::spinner(json, format!("removing service {name}"));
            let removed = client.remove_service(name).await;
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
