//! Talking to vroomd, as every client-side command does: connect (starting a
//! daemon when none runs), build a catalog image on first use, wait for a
//! guest to be ready. vroom-bench drives vroomd through the same functions.

use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use vroom_client::{Client, ClientError};
use vroom_types::{Instance, InstanceState};

use crate::{output, paths};

/// Connects to the vroomd of `data_dir`, starting one in the background when
/// none answers: `vroom` (this executable when `None`) `daemon`.
pub async fn connect(data_dir: &Path, vroom: Option<&Path>) -> Result<Client> {
    let client = Client::new(&paths::socket(data_dir));
    match client.version().await {
        Ok(_) => return Ok(client),
        Err(ClientError::Connect { .. }) => {}
        Err(e) => return Err(e).context("vroomd answered strangely"),
    }
    std::fs::create_dir_all(data_dir)
        .with_context(|| format!("cannot create {}", data_dir.display()))?;
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(data_dir.join("vroomd.log"))?;
    let exe = match vroom {
        Some(vroom) => vroom.to_path_buf(),
        None => std::env::current_exe().context("cannot find the vroom executable")?,
    };
    let mut cmd = std::process::Command::new(exe);
    cmd.arg("--data-dir")
        .arg(data_dir)
        .arg("daemon")
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);
    // SAFETY: setsid is async-signal-safe; it detaches the daemon from our session and terminal.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(&mut cmd, || {
            libc::setsid();
            Ok(())
        });
    }
    cmd.spawn().context("cannot start vroomd")?;
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        tokio::time::sleep(Duration::from_millis(50)).await;
        match client.version().await {
            Ok(_) => return Ok(client),
            Err(_) if Instant::now() < deadline => continue,
            Err(e) => {
                let log = vroom_core::engine::tail_of(&data_dir.join("vroomd.log"), 1);
                return Err(e).context(format!("vroomd did not come up (last log line: {log})"));
            }
        }
    }
}

/// `run` of a catalog image that is not built yet builds it first, with its
/// stages shown as `image build` shows them.
pub async fn build_from_catalog_if_missing(client: &Client, image: &str, json: bool) -> Result<()> {
    match client.image(image).await {
        Err(ClientError::Api { status: 404, .. }) if vroom_image::in_catalog(image) => {}
        _ => return Ok(()),
    }
    let mut stages = output::Stages::new(json, format!("building {image} from the catalog"));
    let built = client
        .build_image(Path::new(image), false, None, |stage, detail| {
            stages.update(stage, detail)
        })
        .await;
    stages.finish(built.is_ok());
    built?;
    Ok(())
}

/// Polls until the guest is ready; on failure the error carries the console tail.
pub async fn wait_ready(client: &Client, name: &str, timeout: Duration) -> Result<Instance> {
    let deadline = Instant::now() + timeout;
    loop {
        let instance = client.get(name).await?;
        match instance.status.state {
            InstanceState::Running => return Ok(instance),
            InstanceState::Failed | InstanceState::Stopped => {
                let cause = instance
                    .status
                    .last_error
                    .clone()
                    .unwrap_or_else(|| format!("it is {}", instance.status.state));
                let console = client
                    .logs(name, 0)
                    .await
                    .map(|c| c.data)
                    .unwrap_or_default();
                let tail: Vec<&str> = console.lines().rev().take(15).collect();
                eprintln!("--- console of {name} (last lines) ---");
                for line in tail.iter().rev() {
                    eprintln!("{line}");
                }
                eprintln!("---");
                bail!("instance {name} failed: {cause}");
            }
            _ if Instant::now() > deadline => bail!(
                "instance {name} is still {} after {timeout:?}",
                instance.status.state
            ),
            _ => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}
