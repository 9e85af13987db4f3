//! `vroom daemon`: the composition root. Wires the QEMU driver, netlink
//! networking, the redb store and the local image source into the engine and
//! serves the API on a unix socket: mode 0600, or 0660 with group `vroom`
//! when that group exists (`vroom setup` creates it), so that root can grant
//! the API to other users. Every connection's peer credentials reach the
//! API (its audit log); connections are bounded (see [`crate::serve`]). VMs outlive the daemon: on start it re-adopts the
//! ones still running.
//!
//! Under systemd (`vroomd.service`, see docs/install.md) the socket may be
//! passed by `vroomd.socket` instead (its owner and mode are the unit's),
//! and the daemon reports `READY=1` once it serves and `STOPPING=1` when
//! it stops (see [`crate::systemd`]).

use std::fs;
use std::os::fd::AsRawFd;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use vroom_core::{Engine, EngineConfig};
use vroom_net::NetlinkNetwork;
use vroom_qemu::QemuDriver;
use vroom_store::RedbStateStore;

use crate::paths;

pub async fn run(
    data_dir: &Path,
    jail: vroom_qemu::JailMode,
    metrics: Option<std::net::SocketAddr>,
    cluster: crate::args::ClusterArgs,
    launch: crate::systemd::Launch,
) -> Result<()> {
    if cluster.cluster && jail == vroom_qemu::JailMode::Unjailed {
        bail!("a cluster node needs jailed VMMs: its guard fences them through their cgroups");
    }
    // Bound first: a taken port is refused before anything else happens.
    let metrics = match metrics {
        Some(addr) => Some((addr, bind_metrics(addr).await?)),
        None => None,
    };
    fs::create_dir_all(data_dir)
        .with_context(|| format!("cannot create data dir {}", data_dir.display()))?;
    let group = paths::api_group();
    let access = ApiAccess::for_group(group_id(&group));
    fs::set_permissions(data_dir, fs::Permissions::from_mode(access.data_dir_mode))
        .context("cannot restrict the data dir")?;
    if let Some(gid) = access.gid {
        std::os::unix::fs::chown(data_dir, None, Some(gid))
            .context("cannot give the data dir to the API group")?;
    }
    let _lock = lock(data_dir, launch.started_by)?;

    let store = RedbStateStore::open(&data_dir.join("state.redb"))
        .context("cannot open the state store")?;
    let net = NetlinkNetwork::new(vroom_core::ipam::bridge_glob(&paths::iface_prefix()))
        .context("cannot open a netlink connection")?;
    if jail == vroom_qemu::JailMode::Unjailed {
        tracing::warn!("--no-jail: QEMU runs as root without seccomp, cgroup or jail; for benchmarks and debugging only");
    }
    let qemu: Option<std::path::PathBuf> = std::env::var_os("VROOM_QEMU").map(Into::into);
    // Said once at start (and in `vroom info`): which QEMU, which version.
    let vmm = {
        let qemu = qemu.clone();
        tokio::task::spawn_blocking(move || vroom_qemu::vmm::describe(qemu.as_deref()))
            .await
            .context("cannot probe QEMU")?
    };
    match &vmm.problem {
        None => {
            tracing::info!(path = %vmm.path, version = vmm.version.as_deref().unwrap_or("unknown"), "VMs run on this QEMU")
        }
        Some(problem) => {
            tracing::warn!(%problem, "no VM can start until QEMU is fixed (`vroom setup` checks it)")
        }
    }
    let driver = QemuDriver::new(qemu, jail);
    let images = paths::local_images(data_dir);
    // Nothing is being built or received yet: what a killed vroomd left
    // half-made goes.
    images.sweep_leftovers();
    let cfg = EngineConfig {
        data_dir: data_dir.to_path_buf(),
        iface_prefix: paths::iface_prefix(),
        stop_timeout: Duration::from_secs(10),
        host_mem_mib: host_mem_mib(),
        host_cpus: std::thread::available_parallelism()
            .map(|n| n.get() as u32)
            .unwrap_or(1),
    };
    let engine = Engine::new(
        cfg,
        Arc::new(driver),
        Arc::new(net),
        Arc::new(store),
        Arc::new(images),
    );
    // A cluster node joins before it relaunches anything: the lease (the
    // previous vroomd's, if still alive) and the guard must be in place.
    let node = if cluster.cluster {
        let opts = vroom_cluster::JoinOptions {
            endpoints: cluster.etcd.clone(),
            node: cluster.node.clone().context("--node is required")?,
            advertise: cluster
                .advertise
                .clone()
                .context("--advertise is required")?,
            data_dir: data_dir.to_path_buf(),
            expect_cluster: cluster.cluster_id.clone(),
        };
        engine.events().set_node(opts.node.as_str());
        let node = vroom_cluster::ClusterNode::join(engine.clone(), opts)
            .await
            .map_err(|e| anyhow::anyhow!(e))?;
        engine.set_cluster(node.clone());
        Some(node)
    } else {
        None
    };
    // The API's way in: the cluster's, or this host's alone.
    let vroomd: Arc<dyn vroom_core::service::Vroomd> = match &node {
        Some(node) => {
            let clustered = Arc::new(vroom_cluster::Clustered::new(engine.clone(), node.clone()));
            // Services keep their records in etcd and their instances
            // anywhere in the cluster.
            engine.set_services_cluster(clustered.clone());
            clustered
        }
        None => Arc::new(vroom_core::service::Local::new(engine.clone())),
    };
    engine.recover().await.context("cannot recover state")?;
    // Services are kept at strength: this host's, or (in a cluster) those
    // whose balancer runs here.
    engine.spawn_service_controller();
    let limits = crate::serve::Limits::from_env(crate::serve::raise_fd_limit());
    tracing::info!(?limits, "API connection limits (per listener)");
    // Which daemon this is, in `GET /v1/version` on every listener.
    let info = launch.info(vmm);
    if let Some(node) = &node {
        node.start();
        let config = crate::serve::tls::server_config(&node.tls_dir())
            .map_err(|e| anyhow::anyhow!("cannot set up the API's TLS: {e}"))?;
        let addr = node.api_addr();
        let listener = node
            .take_api_listener()
            .context("the API listener was taken already")?;
        tracing::info!(%addr, "serving the API to other hosts (mutual TLS, cluster CA)");
        let endpoint =
            crate::serve::Endpoint::Tls(listener, tokio_rustls::TlsAcceptor::from(config));
        tokio::spawn(crate::serve::serve(
            endpoint,
            vroom_api::router(vroomd.clone()).layer(axum::Extension(info.clone())),
            limits,
            std::future::pending(),
        ));
    }
    if let Some((addr, listener)) = metrics {
        tracing::info!(%addr, "serving GET /metrics in plain HTTP on loopback");
        let router = vroom_api::metrics_router(engine.clone());
        tokio::spawn(async move {
            if let Err(e) = axum::serve(listener, router).await {
                tracing::warn!(%addr, error = %e, "the metrics listener stopped");
            }
        });
    }
    for group in tokio::task::spawn_blocking(vroom_qemu::sweep_cgroups).await? {
        tracing::info!(cgroup = %group, "removed the cgroup of a VMM that is gone");
    }

    let socket = paths::socket(data_dir);
    let listener = match &launch.listener {
        Some(passed) => listener_passed(passed, &socket)?,
        None => bind(&socket, &access)?,
    };
    match access.gid {
        _ if info.socket_activated => {
            tracing::info!(socket = %socket.display(), "vroomd serving the socket systemd passed (its owner and mode are vroomd.socket's)")
        }
        Some(gid) => {
            tracing::info!(socket = %socket.display(), %group, gid, "vroomd listening; members of the group may use the API")
        }
        None => {
            tracing::info!(socket = %socket.display(), "vroomd listening; root only (create group {group} to grant the API)")
        }
    }

    // The handlers are in place before READY=1: a SIGTERM right after it
    // (systemd stopping a unit it just started) must stop vroomd the
    // graceful way, not kill it before the accept loop first polls.
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).context("cannot handle SIGTERM")?;
    let mut interrupt = signal(SignalKind::interrupt()).context("cannot handle SIGINT")?;
    let shutdown = async {
        tokio::select! {
            _ = term.recv() => {}
            _ = interrupt.recv() => {}
        }
        launch.notify("STOPPING=1");
        tracing::info!("vroomd stopping; VMs keep running");
    };
    // The socket listens and recovery is done: requests are answered from
    // here on (those already queued in the backlog too).
    launch.notify("READY=1");
    crate::serve::serve(
        crate::serve::Endpoint::Unix(listener),
        vroom_api::router(vroomd).layer(axum::Extension(info.clone())),
        limits,
        shutdown,
    )
    .await;
    // A passed socket is systemd's: it keeps listening, and starts the
    // next vroomd on the next connection.
    if !info.socket_activated {
        let _ = fs::remove_file(&socket);
    }
    Ok(())
}

/// Binds the API socket at `socket` and gives it to the API group.
fn bind(socket: &Path, access: &ApiAccess) -> Result<tokio::net::UnixListener> {
    let _ = fs::remove_file(socket);
    let listener = tokio::net::UnixListener::bind(socket)
        .with_context(|| format!("cannot listen on {}", socket.display()))?;
    if let Some(gid) = access.gid {
        std::os::unix::fs::chown(socket, None, Some(gid))
            .context("cannot give the API socket to the API group")?;
    }
    fs::set_permissions(socket, fs::Permissions::from_mode(access.socket_mode))
        .context("cannot restrict the API socket")?;
    Ok(listener)
}

/// The socket systemd passed, if it is the data dir's: clients of this data
/// dir look for vroomd there and nowhere else.
fn listener_passed(
    passed: &std::os::unix::net::UnixListener,
    socket: &Path,
) -> Result<tokio::net::UnixListener> {
    let path = crate::systemd::listener_path(passed);
    if path.as_deref() != Some(socket) {
        bail!(
            "the socket systemd passed is {}, not {} where clients of this data dir look (set ListenStream= in vroomd.socket to match --data-dir)",
            path.map(|p| p.display().to_string())
                .unwrap_or_else(|| "unnamed".into()),
            socket.display()
        );
    }
    let listener = passed
        .try_clone()
        .context("cannot take the socket systemd passed")?;
    listener
        .set_nonblocking(true)
        .context("cannot take the socket systemd passed")?;
    tokio::net::UnixListener::from_std(listener).context("cannot take the socket systemd passed")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_socket_is_shared_only_with_an_existing_group() {
        assert_eq!(
            ApiAccess::for_group(None),
            ApiAccess {
                gid: None,
                socket_mode: 0o600,
                data_dir_mode: 0o700
            }
        );
        assert_eq!(
            ApiAccess::for_group(Some(123)),
            ApiAccess {
                gid: Some(123),
                socket_mode: 0o660,
                data_dir_mode: 0o710
            }
        );
        assert_eq!(group_id("root"), Some(0));
        assert_eq!(group_id("no-such-group-vroom"), None);
    }

    #[test]
    fn only_a_vroom_daemon_is_found_by_its_socket() {
        let cases: [(&[u8], bool); 5] = [
            (
                b"/usr/bin/vroom\0--data-dir\0/var/lib/vroom\0daemon\0",
                true,
            ),
            (b"vroom\0daemon\0", true),
            (b"/sbin/init\0", false),
            (b"/usr/bin/systemd-socket-activate\0-l\0x\0daemon\0", false),
            (b"/usr/bin/vroom\0ps\0", false),
        ];
        for (cmdline, want) in cases {
            assert_eq!(
                cmdline_is_vroom_daemon(cmdline),
                want,
                "{}",
                String::from_utf8_lossy(cmdline)
            );
        }
        assert!(!is_vroom_daemon(1));
    }

    /// A second daemon on a data dir is refused and names the first.
    #[test]
    fn a_second_daemon_names_the_holder() {
        let dir = tempfile::tempdir().unwrap();
        let _held = lock(dir.path(), vroom_types::DaemonStarter::Systemd).unwrap();
        let err = lock(dir.path(), vroom_types::DaemonStarter::Manual).unwrap_err();
        let pid = std::process::id();
        assert_eq!(
            err.to_string(),
            format!(
                "another vroomd (pid {pid}, started by systemd) already serves {}; stop it first (`vroom daemon stop`, or `systemctl stop vroomd` for the unit: VMs keep running either way)",
                dir.path().display()
            )
        );
        assert_eq!(describe_holder(""), "another vroomd");
        assert_eq!(describe_holder("7\n"), "another vroomd (pid 7)");
        assert_eq!(
            describe_holder("7 cli\n"),
            "another vroomd (pid 7, started by the CLI)"
        );
        assert_eq!(
            describe_holder("7 manual\n"),
            "another vroomd (pid 7, started by hand)"
        );
    }
}

/// Who may reach the API socket.
#[derive(Debug, PartialEq, Eq)]
struct ApiAccess {
    gid: Option<u32>,
    socket_mode: u32,
    /// Members of the group need to traverse the data dir to the socket,
    /// never to list it.
    data_dir_mode: u32,
}

impl ApiAccess {
    fn for_group(gid: Option<u32>) -> Self {
        match gid {
            Some(gid) => ApiAccess {
                gid: Some(gid),
                socket_mode: 0o660,
                data_dir_mode: 0o710,
            },
            None => ApiAccess {
                gid: None,
                socket_mode: 0o600,
                data_dir_mode: 0o700,
            },
        }
    }
}

/// The id of a host group, if it exists.
/// The plain metrics listener: loopback only (it has no authentication;
/// other hosts scrape a cluster node's mutual-TLS API).
async fn bind_metrics(addr: std::net::SocketAddr) -> Result<tokio::net::TcpListener> {
    if !addr.ip().is_loopback() {
        bail!(
            "--metrics {addr}: the metrics listener takes a loopback address (127.0.0.1:PORT or [::1]:PORT); it has no authentication"
        );
    }
    tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot serve metrics on {addr}"))
}

pub fn group_id(name: &str) -> Option<u32> {
    let name = std::ffi::CString::new(name).ok()?;
    let mut group = std::mem::MaybeUninit::<libc::group>::uninit();
    let mut buf = vec![0 as libc::c_char; 16 * 1024];
    let mut result: *mut libc::group = std::ptr::null_mut();
    // SAFETY: every pointer is valid for the call; the reentrant variant
    // writes only into `group` and `buf`, whose length is passed.
    let rc = unsafe {
        libc::getgrnam_r(
            name.as_ptr(),
            group.as_mut_ptr(),
            buf.as_mut_ptr(),
            buf.len(),
            &mut result,
        )
    };
    if rc != 0 || result.is_null() {
        return None;
    }
    // SAFETY: getgrnam_r succeeded and filled `group`.
    Some(unsafe { group.assume_init() }.gr_gid)
}

/// One daemon per data dir: the holder of the lock writes its pid and
/// who started it into the lock file, so that the next one can name it.
fn lock(data_dir: &Path, started_by: vroom_types::DaemonStarter) -> Result<fs::File> {
    use std::io::{Read, Seek, Write};
    let path = data_dir.join("vroomd.lock");
    let mut file = fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .open(&path)
        .context("cannot open the lock file")?;
    // SAFETY: plain syscall on an fd we own.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        let mut holder = String::new();
        let _ = file.read_to_string(&mut holder);
        bail!(
            "{} already serves {}; stop it first (`vroom daemon stop`, or `systemctl stop vroomd` for the unit: VMs keep running either way)",
            describe_holder(&holder),
            data_dir.display()
        );
    }
    file.set_len(0)
        .and_then(|()| file.rewind())
        .and_then(|()| writeln!(file, "{} {started_by}", std::process::id()))
        .context("cannot write the lock file")?;
    Ok(file)
}

/// `another vroomd (pid 42, started by cli)`, from a lock file's `PID STARTER`.
fn describe_holder(lock_file: &str) -> String {
    let mut words = lock_file.split_whitespace();
    let by = |starter: &str| match starter {
        "cli" => "the CLI".to_string(),
        "manual" => "hand".to_string(),
        other => other.to_string(),
    };
    match (
        words.next().and_then(|p| p.parse::<u32>().ok()),
        words.next(),
    ) {
        (Some(pid), Some(starter)) => {
            format!("another vroomd (pid {pid}, started by {})", by(starter))
        }
        (Some(pid), None) => format!("another vroomd (pid {pid})"),
        _ => "another vroomd".to_string(),
    }
}

/// Whether process `pid` runs `vroom ... daemon`.
fn is_vroom_daemon(pid: i32) -> bool {
    cmdline_is_vroom_daemon(&fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default())
}

/// Whether a `/proc/PID/cmdline` is `vroom ... daemon`.
fn cmdline_is_vroom_daemon(cmdline: &[u8]) -> bool {
    let mut args = cmdline.split(|b| *b == 0);
    let exe_is_vroom = args.next().is_some_and(|exe| exe.ends_with(b"vroom"));
    exe_is_vroom && args.any(|a| a == b"daemon")
}

fn host_mem_mib() -> u64 {
    let meminfo = fs::read_to_string("/proc/meminfo").unwrap_or_default();
    meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|kb| kb.parse::<u64>().ok())
        .map(|kb| kb / 1024)
        .unwrap_or(u64::MAX)
}

/// Stops the vroomd serving `data_dir` with SIGTERM (it finishes the
/// requests under way; VMs keep running) and waits until it is gone. The
/// daemon names its pid in `GET /v1/version` (a daemon older than that is
/// found through the socket's SO_PEERCRED; under socket activation that
/// would be systemd itself), so no pid file can be stale. A daemon of a
/// systemd unit is left to systemctl, which would otherwise restart it or
/// count it failed. With `self_started_only`, only a daemon the CLI started
/// is stopped (the package's takeover).
pub async fn stop(data_dir: &Path, self_started_only: bool) -> Result<()> {
    let socket = crate::paths::socket(data_dir);
    let stream = match tokio::net::UnixStream::connect(&socket).await {
        Ok(stream) => stream,
        Err(_) => {
            println!("no vroomd runs for {}", data_dir.display());
            return Ok(());
        }
    };
    let peer = stream.peer_cred().ok().and_then(|c| c.pid());
    drop(stream);
    // A daemon that does not answer (busy, hung) is found by its socket.
    let daemon = match vroom_client::Client::new(&socket).version().await {
        Ok(version) => version.daemon,
        Err(e) => {
            tracing::warn!(error = %e, "vroomd does not say who it is; finding it by its socket");
            None
        }
    };
    use vroom_types::DaemonStarter;
    let pid = match &daemon {
        Some(info) if info.started_by == DaemonStarter::Systemd => {
            if self_started_only {
                println!("vroomd (pid {}) runs under systemd; left alone", info.pid);
                return Ok(());
            }
            bail!(
                "vroomd (pid {}) runs under systemd ({}): stop it with `systemctl stop vroomd.socket vroomd.service` (VMs keep running)",
                info.pid,
                info.unit.as_deref().unwrap_or("vroomd.service")
            );
        }
        Some(info) if self_started_only && info.started_by != DaemonStarter::Cli => {
            println!(
                "vroomd (pid {}) was started by hand, not by the CLI; left alone",
                info.pid
            );
            return Ok(());
        }
        Some(info) => info.pid as i32,
        // The socket's peer is who listened: a vroomd, unless a service
        // manager holds the socket (then it is systemd, never to signal).
        None => match peer {
            Some(pid) if is_vroom_daemon(pid) => pid,
            _ => bail!(
                "cannot tell which process serves {}: no vroomd names itself there",
                socket.display()
            ),
        },
    };
    // SAFETY: plain syscall on the pid the daemon (or the kernel) named.
    if unsafe { libc::kill(pid, libc::SIGTERM) } != 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("cannot signal vroomd (pid {pid})"));
    }
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    // Gone, or a zombie its parent has yet to reap.
    let running = || {
        std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .map(|stat| {
                !stat
                    .rsplit_once(')')
                    .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z'))
            })
            .unwrap_or(false)
    };
    while running() {
        if std::time::Instant::now() > deadline {
            anyhow::bail!("vroomd (pid {pid}) did not stop within 30 s");
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    println!("vroomd (pid {pid}) stopped; its VMs keep running");
    Ok(())
}
