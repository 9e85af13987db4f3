//! Talking to vroomd, as every client-side command does: connect (starting a
//! daemon when none runs), build a catalog image on first use, wait for a
//! guest to be ready, wait for a service to converge. vroom-bench drives
//! vroomd through the same functions.

use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use vroom_client::{Client, ClientError};
use vroom_types::{ErrorCode, Instance, InstanceState, Service};

use crate::{output, paths};

/// The variable that marks a daemon the CLI started (`vroom info` says so).
pub const STARTED_BY_ENV: &str = "VROOM_STARTED_BY";

/// Where systemd looks for units, the administrator's first.
const UNIT_DIRS: &[&str] = &[
    "/etc/systemd/system",
    "/lib/systemd/system",
    "/usr/lib/systemd/system",
];

/// Connects to the vroomd of `data_dir`, starting one in the background when
/// none answers: `vroom` (this executable when `None`) `daemon`. Not where
/// the systemd unit should serve it (see [`self_start_refusal`]).
pub async fn connect(data_dir: &Path, vroom: Option<&Path>) -> Result<Client> {
    let client = Client::new(&paths::socket(data_dir));
    match client.version().await {
        Ok(_) => return Ok(client),
        Err(ClientError::Connect { .. }) => {}
        Err(e) => return Err(e).context("vroomd answered strangely"),
    }
    if let Some(refusal) = self_start_refusal_here(data_dir) {
        bail!("{refusal}");
    }
    if data_dir.join(vroom_cluster::MEMBERSHIP_FILE).is_file() {
        // A daemon of the CLI's would run this node's instances outside
        // its cluster (beside the node that took them over).
        bail!(
            "no vroomd answers on {}, and {} is a cluster node's data dir: start its daemon with `vroom daemon --cluster ...`; the CLI does not start one",
            paths::socket(data_dir).display(),
            data_dir.display()
        );
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
        .env(STARTED_BY_ENV, "cli")
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

/// [`self_start_refusal`] on this host.
pub fn self_start_refusal_here(data_dir: &Path) -> Option<String> {
    let booted = Path::new("/run/systemd/system").is_dir();
    let unit = UNIT_DIRS
        .iter()
        .any(|dir| Path::new(dir).join("vroomd.service").is_file());
    self_start_refusal(data_dir, booted, unit)
}

/// Why the CLI must not start a daemon of its own for `data_dir`, if it
/// must not: where systemd runs (`booted`) and the package's unit is
/// installed (`unit_installed`), the unit serves the default data dir, and
/// a daemon of the CLI's would hold the data dir's lock against it. A
/// developer's checkout (no unit), a machine without systemd and other
/// data dirs keep the self-started daemon.
pub fn self_start_refusal(data_dir: &Path, booted: bool, unit_installed: bool) -> Option<String> {
    (booted && unit_installed && data_dir == Path::new(paths::DEFAULT_DATA_DIR)).then(|| {
        format!(
            "vroomd.service is installed but no vroomd answers on {}: start it with `systemctl start vroomd.socket vroomd.service` (`systemctl status vroomd` says why it stopped)",
            paths::socket(data_dir).display()
        )
    })
}

/// Which daemon answers, in words: `vroomd 0.1.0 (pid 42, systemd unit
/// vroomd.service, socket-activated), data dir /var/lib/vroom`.
pub fn describe(version: &vroom_types::VersionInfo) -> String {
    use vroom_types::DaemonStarter;
    let who = match &version.daemon {
        Some(d) => {
            let by = match d.started_by {
                DaemonStarter::Systemd => match &d.unit {
                    Some(unit) => format!("systemd unit {unit}"),
                    None => "started by systemd".to_string(),
                },
                DaemonStarter::Cli => "started by the CLI".to_string(),
                DaemonStarter::Manual => "started by hand (`vroom daemon`)".to_string(),
            };
            let activated = if d.socket_activated {
                ", socket-activated"
            } else {
                ""
            };
            format!("pid {}, {by}{activated}", d.pid)
        }
        None => "a daemon too old to say who started it".to_string(),
    };
    format!(
        "vroomd {} ({who}), data dir {}",
        version.version, version.data_dir
    )
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

/// Waits until the guest is ready; on failure the error carries the console tail.
pub async fn wait_ready(client: &Client, name: &str, timeout: Duration) -> Result<Instance> {
    let deadline = Instant::now() + timeout;
    loop {
        // vroomd answers when the state changes (a long poll).
        let asked = Instant::now();
        let wait = deadline
            .saturating_duration_since(asked)
            .max(Duration::from_secs(1));
        let instance = client.get_settled(name, wait).await?;
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
            // A vroomd from before long polls answers at once.
            _ if asked.elapsed() < Duration::from_millis(100) => {
                tokio::time::sleep(Duration::from_millis(100)).await
            }
            _ => {}
        }
    }
}

/// How long a client waits for a service to converge.
pub const CONVERGE_WITHIN: Duration = Duration::from_secs(300);

/// Waits until vroomd has brought the service to its number: every member
/// running and balanced.
pub async fn service_converged(client: &Client, name: &str) -> Result<Service> {
    let deadline = Instant::now() + CONVERGE_WITHIN;
    loop {
        let service = client.service(name).await?;
        let replicas = service.desired;
        if service.converged() {
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
pub async fn service_gone(client: &Client, name: &str) -> Result<()> {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cli_starts_no_daemon_where_the_unit_serves() {
        let default = Path::new(paths::DEFAULT_DATA_DIR);
        let other = Path::new("/tmp/vroom-dev");
        // (data dir, systemd booted, unit installed, refused)
        let cases = [
            (default, true, true, true),
            (default, true, false, false),
            (default, false, true, false),
            (other, true, true, false),
        ];
        for (dir, booted, unit, refused) in cases {
            assert_eq!(
                self_start_refusal(dir, booted, unit).is_some(),
                refused,
                "{dir:?} booted {booted} unit {unit}"
            );
        }
    }

    #[test]
    fn describes_the_daemon() {
        use vroom_types::{DaemonInfo, DaemonStarter, VersionInfo};
        let version = |daemon| VersionInfo {
            version: "1.2.3".into(),
            data_dir: "/var/lib/vroom".into(),
            daemon,
        };
        let cases = [
            (
                Some(DaemonInfo {
                    pid: 42,
                    started_by: DaemonStarter::Systemd,
                    unit: Some("vroomd.service".into()),
                    socket_activated: true,
                    vmm: None,
                }),
                "vroomd 1.2.3 (pid 42, systemd unit vroomd.service, socket-activated), data dir /var/lib/vroom",
            ),
            (
                Some(DaemonInfo {
                    pid: 7,
                    started_by: DaemonStarter::Cli,
                    unit: None,
                    socket_activated: false,
                    vmm: None,
                }),
                "vroomd 1.2.3 (pid 7, started by the CLI), data dir /var/lib/vroom",
            ),
            (
                Some(DaemonInfo {
                    pid: 9,
                    started_by: DaemonStarter::Systemd,
                    unit: None,
                    socket_activated: false,
                    vmm: None,
                }),
                "vroomd 1.2.3 (pid 9, started by systemd), data dir /var/lib/vroom",
            ),
            (
                None,
                "vroomd 1.2.3 (a daemon too old to say who started it), data dir /var/lib/vroom",
            ),
        ];
        for (daemon, want) in cases {
            assert_eq!(describe(&version(daemon)), want);
        }
    }
}
