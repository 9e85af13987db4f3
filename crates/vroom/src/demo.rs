//! `vroom demo`: a network, the hello appliance, its page fetched from the
//! host over the bridge, a live config change, and cleanup.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, TcpStream};
use std::time::Duration;

use anyhow::{Context, Result};
use vroom_client::Client;
use vroom_types::{AccelChoice, InstanceSpec, Name, NetworkSpec, NicSpec, RunRequest};

const NET: &str = "demo";
const INSTANCE: &str = "hello-demo";

/// A plain HTTP/1.0 GET; enough to show a page without an HTTP client crate.
pub fn http_get(ip: Ipv4Addr, path: &str) -> Result<String> {
    let mut stream = TcpStream::connect_timeout(&(ip, 80).into(), Duration::from_secs(5))
        .with_context(|| format!("cannot connect to {ip}:80"))?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {ip}\r\n\r\n")?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    Ok(response
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.to_string())
        .unwrap_or(response))
}

fn heading(page: &str) -> &str {
    page.split_once("<h1>")
        .and_then(|(_, rest)| rest.split_once("</h1>"))
        .map(|(h, _)| h)
        .unwrap_or(page.trim())
}

pub async fn run(client: &Client, keep: bool) -> Result<()> {
    crate::setup::run(true, crate::setup::OwnKernelSetup::Leave, None)
        .context("host setup failed")?;
    if client.get(INSTANCE).await.is_ok() || client.network(NET).await.is_ok() {
        anyhow::bail!("a demo is already set up; remove it with: vroom rm -f {INSTANCE} && vroom net rm {NET}");
    }
    let network = client
        .create_network(&NetworkSpec {
            name: Name::new(NET)?,
            subnet: None,
            nat: false,
            isolated: false,
            mirror: false,
            allow_host: vec![],
        })
        .await?;
    println!(
        "1. network {} created: {} on bridge {}",
        network.name, network.subnet, network.bridge
    );

    let outcome = demo_steps(client).await;
    if keep && outcome.is_ok() {
        println!("\nLeft running. Remove it with:\n  vroom rm -f {INSTANCE} && vroom net rm {NET}");
    } else {
        let _ = client.remove(INSTANCE, true).await;
        let _ = client.remove_network(NET).await;
        println!("6. cleaned up: instance and network removed");
    }
    outcome
}

async fn demo_steps(client: &Client) -> Result<()> {
    let spec = InstanceSpec {
        name: Name::new(INSTANCE)?,
        image: "hello".into(),
        mem_mib: None,
        cpus: 1,
        nics: vec![NicSpec {
            network: Name::new(NET)?,
            ip: None,
            role: None,
        }],
        accel: AccelChoice::Auto,
        config_volume_kib: None,
        ephemeral: false,
        volumes: Vec::new(),
    };
    client
        .run(&RunRequest {
            spec,
            ready_timeout_secs: Some(120),
            from_snapshot: None,
            cold: false,
            placement: Default::default(),
            env: Default::default(),
        })
        .await?;
    let instance = crate::session::wait_ready(client, INSTANCE, Duration::from_secs(130)).await?;
    let ip = instance.nics[0]
        .ip
        .context("the hello appliance's NIC has no address")?;
    // vroom's kernel once `vroom setup` has built it; Debian's until then.
    let kernel = match client.image(&instance.image_id).await {
        Ok(image) => format!("{}'s kernel", image.manifest.kernel.flavor),
        Err(_) => "its kernel".into(),
    };
    println!(
        "2. {INSTANCE} (image hello) is ready at {ip}: booted in {:.2}s with {} on {kernel} in {} MiB, QEMU pid {}",
        instance.status.boot_ms.unwrap_or(0) as f64 / 1000.0,
        instance
            .status
            .accel
            .map(|a| a.to_string())
            .unwrap_or_default(),
        instance.mem_mib,
        instance.status.pid.unwrap_or(0)
    );
    let page = http_get(ip, "/")?;
    println!("3. GET http://{ip}/ from the host says: {}", heading(&page));
    let greeting = format!("Hello from the config floppy of {INSTANCE}!");
    client
        .config_set(INSTANCE, [("greeting".to_string(), greeting)].into())
        .await?;
    println!("4. vroom config {INSTANCE} set greeting=... (applied live by the guest, fsynced to its floppy)");
    let page = http_get(ip, "/")?;
    println!("5. GET http://{ip}/ now says: {}", heading(&page));
    Ok(())
}
