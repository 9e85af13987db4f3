//! `vroom info`: which vroomd this CLI talks to (a systemd unit, socket
//! activated or not, or a daemon the CLI started), so that an operator
//! never wonders whose state a command changed. Starts no daemon.

use std::path::Path;

use anyhow::Result;
use vroom_client::{Client, ClientError};

use crate::{paths, session};

pub async fn run(data_dir: &Path, json: bool) -> Result<i32> {
    let socket = paths::socket(data_dir);
    let answer = match Client::new(&socket).version().await {
        Ok(version) => Some(version),
        Err(ClientError::Connect { .. }) => None,
        Err(e) => return Err(e.into()),
    };
    let exe = std::env::current_exe().unwrap_or_default();
    // The answering daemon's QEMU; with none, the one a daemon started
    // from here would use.
    let (vmm, whose) = match answer.as_ref().and_then(|a| a.daemon.as_ref()?.vmm.clone()) {
        Some(vmm) => (vmm, "vroomd's"),
        None => {
            let explicit = std::env::var_os("VROOM_QEMU").map(std::path::PathBuf::from);
            let vmm =
                tokio::task::spawn_blocking(move || vroom_qemu::vmm::describe(explicit.as_deref()))
                    .await?;
            (vmm, "for a daemon started here")
        }
    };
    if json {
        let info = serde_json::json!({
            "cli": {"version": env!("CARGO_PKG_VERSION"), "path": exe},
            "socket": socket,
            "guest_init": paths::init_binary(),
            "qemu": vmm,
            "vroomd": answer,
        });
        println!("{}", serde_json::to_string_pretty(&info)?);
        return Ok(0);
    }
    println!(
        "vroom:      {} ({})",
        env!("CARGO_PKG_VERSION"),
        exe.display()
    );
    match &answer {
        Some(version) => println!("vroomd:     {}", session::describe(version)),
        None => {
            let next = session::self_start_refusal_here(data_dir)
                .unwrap_or_else(|| "the next command starts one".to_string());
            println!("vroomd:     none answers; {next}");
        }
    }
    println!("socket:     {}", socket.display());
    println!("guest init: {}", paths::init_binary().display());
    println!("qemu:       {} ({whose})", vmm.describe());
    Ok(0)
}
