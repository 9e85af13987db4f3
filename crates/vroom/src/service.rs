//! `vroom service ...`: members of one image behind a load balancer.

use anyhow::{bail, Result};
use vroom_client::Client;
use vroom_types::{Name, ScaleTarget, Service, ServiceDefinition, ServiceScaleRequest};

use crate::args::ServiceOp;
use crate::output;

pub async fn service(client: &Client, op: &ServiceOp, json: bool) -> Result<()> {
    match op {
        ServiceOp::Create {
            name,
            image,
            replicas,
            net,
            room,
            port,
            slo,
            target_cpu,
            cold,
        } => {
            let scale_on = match (slo, target_cpu) {
                (Some(t @ ScaleTarget::P95Ms(_)), None) => Some(*t),
                (None, Some(t @ ScaleTarget::CpuPercent(_))) => Some(*t),
                (None, None) => None,
                (Some(t), _) => bail!("--slo takes a latency like p95<50ms, not {t}"),
                (_, Some(t)) => bail!("--target-cpu takes a percentage like 60%, not {t}"),
            };
            let network = match (net, room) {
                (None, None) => Some(Name::new("default").expect("invariant: a valid name")),
                (net, _) => net.clone(),
            };
            let definition = ServiceDefinition {
                name: name.clone(),
                image: image.clone(),
                replicas: replicas.0,
                max_replicas: replicas.1,
                network,
                room: room.clone(),
                port: *port,
                scale_on,
                warm: !cold,
            };
            let spinner = output::spinner(
                json,
                format!(
                    "creating service {name}: {} × {image} behind {name}-lb",
                    replicas.0
                ),
            );
            let made = match client.create_service(&definition).await {
                Ok(_) => vroom::session::service_converged(client, name.as_str()).await,
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
                        format!("{}/{}", s.ready, s.desired),
                        s.spec.scale(),
                        address(s),
                        placement(s),
                    ]
                })
                .collect();
            output::table(&["NAME", "IMAGE", "READY", "SCALE", "ADDRESS", "ON"], &rows);
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
            let req = match replicas {
                (n, None) => ServiceScaleRequest {
                    replicas: Some(*n),
                    ..Default::default()
                },
                (min, Some(max)) => ServiceScaleRequest {
                    min: Some(*min),
                    max: Some(*max),
                    ..Default::default()
                },
            };
            let shown = match replicas {
                (n, None) => n.to_string(),
                (min, Some(max)) => format!("{min}..{max}"),
            };
            let spinner = output::spinner(json, format!("scaling service {name} to {shown}"));
            let scaled = match client.scale_service(name, &req).await {
                Ok(_) => vroom::session::service_converged(client, name).await,
                Err(e) => Err(e.into()),
            };
            if let Some(s) = spinner {
                s.finish_and_clear();
            }
            show_done(&scaled?, json);
        }
        ServiceOp::Update { name, image } => {
            let spinner = output::spinner(json, format!("updating service {name} to {image}"));
            let updated = match client.update_service(name, image).await {
                Ok(_) => vroom::session::service_converged(client, name).await,
                Err(e) => Err(e.into()),
            };
            if let Some(s) = spinner {
                s.finish_and_clear();
            }
            let updated = updated?;
            if updated.spec.image != *image {
                bail!(
                    "the update of service {name} to {image} was rolled back: a new member failed (`vroom events --filter kind=service` says why)"
                );
            }
            show_done(&updated, json);
        }
        ServiceOp::Rm { name } => {
            let spinner = output::spinner(json, format!("removing service {name}"));
            let removed = match client.remove_service(name).await {
                Ok(()) => vroom::session::service_gone(client, name).await,
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
            service.desired,
            address(service)
        );
    }
}

fn placement(service: &Service) -> String {
    match (&service.spec.room, &service.spec.network) {
        (Some(room), _) => format!("room {room}"),
        (None, Some(network)) => network.to_string(),
        (None, None) => "-".into(),
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
    println!("on:       {}", placement(service));
    println!("ready:    {} of {}", service.ready, service.desired);
    println!("scale:    {}", service.spec.scale());
    if let Some(load) = &service.load {
        println!("load:     {load}");
    }
    if let Some(update) = &service.update {
        match &update.rolling_back {
            Some(why) => println!("update:   rolling back to {}: {why}", update.from),
            None => println!("update:   {} -> {}", update.from, update.to),
        }
    }
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
                m.image.clone(),
                if m.balanced { "yes" } else { "no" }.into(),
            ]
        })
        .collect();
    output::table(&["MEMBER", "STATE", "ADDRESS", "IMAGE", "BALANCED"], &rows);
    if !service.decisions.is_empty() {
        println!();
        let rows: Vec<Vec<String>> = service
            .decisions
            .iter()
            .rev()
            .map(|d| {
                vec![
                    output::ago(d.at_ms / 1000),
                    format!("{} -> {}", d.from, d.to),
                    d.reason.clone(),
                    d.load.to_string(),
                ]
            })
            .collect();
        output::table(&["WHEN", "MEMBERS", "WHY", "MEASURED"], &rows);
    }
}
