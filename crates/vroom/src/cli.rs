//! The client-side commands: each talks to vroomd through `vroom-client`.

use std::io::Write;
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use vroom_client::{Client, ClientError};
use vroom_types::{
    CappedOutput, ConfigDocument, ExecEvent, ExecRequest, ExecResult, Instance, InstanceAction,
    InstanceSpec, InstanceState, NetworkSpec, RunRequest,
};

use crate::output;
use crate::{paths, Cli, Command, ConfigOp, ImageOp, NetOp, RunArgs};

pub async fn dispatch(cli: &Cli) -> Result<i32> {
    let json = cli.json;
    if let Command::Bench { op } = &cli.command {
        return match op {
            crate::BenchOp::Boot { runs } => crate::bench::boot(&cli.data_dir, *runs).await,
            crate::BenchOp::Jail { runs } => crate::bench::jail(&cli.data_dir, *runs).await,
            crate::BenchOp::Density {
                budget,
                count,
                tb_runs,
            } => crate::bench_density::density(&cli.data_dir, *budget, *count, *tb_runs).await,
            crate::BenchOp::Splice { runs } => {
                crate::bench_splice::splice(&cli.data_dir, *runs).await
            }
            crate::BenchOp::Warm { runs } => crate::bench_warm::warm(&cli.data_dir, *runs).await,
            crate::BenchOp::Failover { runs } => crate::bench_failover::failover(*runs).await,
            crate::BenchOp::Migrate { runs, mem, loaded } => {
                crate::bench_migrate::migrate(*runs, *mem, *loaded).await
            }
            crate::BenchOp::Images {
                recipes,
                runs,
                no_debootstrap,
            } => crate::bench_images::images(&cli.data_dir, recipes, *runs, !*no_debootstrap).await,
        }
        .map(|()| 0);
    }
    // A file to import is checked before anything else: a refused one must
    // not start a daemon on the way.
    if let Command::Config {
        op: ConfigOp::Import { file },
        ..
    } = &cli.command
    {
        if file.as_os_str() != "-" {
            vroom_input::open_input(file, MAX_IMPORT_BYTES, None)?;
        }
    }
    if let Command::Archive {
        op: crate::ArchiveOp::Verify { dir },
    } = &cli.command
    {
        return crate::snapshot::verify(dir, json);
    }
    let client = match &cli.host {
        Some(host) => {
            let dir = cli
                .tls_dir
                .clone()
                .unwrap_or_else(|| cli.data_dir.join("tls"));
            Client::remote(host, &dir)?
        }
        None => connect(&cli.data_dir).await?,
    };
    match &cli.command {
        Command::Run(args) => return run(&client, args, json).await,
        Command::Ps => ps(&client, json).await?,
        Command::Node { op } => node(&client, op, json).await?,
        Command::Migrate { name, to } => {
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
        }
        Command::Inspect { name } => {
            let instance = client.get(name).await?;
            if json {
                output::json(&instance);
            } else {
                show_instance(&instance);
            }
        }
        Command::Start { name } => lifecycle(&client, name, InstanceAction::Start, json).await?,
        Command::Stop { name } => lifecycle(&client, name, InstanceAction::Stop, json).await?,
        Command::Restart { name } => {
            lifecycle(&client, name, InstanceAction::Restart, json).await?
        }
        Command::Rm {
            force,
            archive: Some(dir),
            name,
        } => crate::snapshot::archive(&client, name, dir, *force, json).await?,
        Command::Rm {
            force,
            archive: None,
            name,
        } => client.remove(name, *force).await?,
        Command::Snapshot { op, vm, name, stop } => {
            crate::snapshot::snapshot(&client, op.as_ref(), vm.as_deref(), name, *stop, json)
                .await?
        }
        Command::Restore { vm, snapshot } => {
            crate::snapshot::restore(&client, vm, snapshot, json).await?
        }
        Command::Clone {
            snapshot,
            name,
            nets,
        } => {
            let args = RunArgs {
                image: None,
                name: name.clone(),
                mem: None,
                cpus: 1,
                nets: nets.clone(),
                accel: vroom_types::AccelChoice::Auto,
                timeout: vroom_core::engine::DEFAULT_READY_TIMEOUT_SECS,
                config_size: None,
                from_snapshot: Some(snapshot.clone()),
                cold: false,
                ephemeral: false,
                room: None,
                segment: None,
                ha: Default::default(),
                spread: None,
                node: None,
            };
            return run(&client, &args, json).await;
        }
        Command::Archive { .. } => unreachable!("handled before connecting"),
        Command::Logs {
            follow,
            boot,
            tail,
            name,
        } => logs(&client, name, *boot, *tail, *follow).await?,
        Command::Cp { source, dest } => copy_out(&client, source, dest).await?,
        Command::Exec {
            name,
            timeout,
            interactive,
            command,
        } => {
            let req = ExecRequest {
                argv: command.to_vec(),
                timeout_secs: Some(*timeout),
                stdin: *interactive,
            };
            return exec(&client, name, &req, json).await;
        }
        Command::Config { name, op } => config(&client, name, op, json).await?,
        Command::Net { op } => net(&client, op, json).await?,
        Command::Image { op } => image(&client, op, json).await?,
        Command::Demo { keep } => crate::demo::run(&client, *keep).await?,
        Command::Splice {
            appliance,
            in_front_of,
            fail,
            name,
            timeout,
        } => {
            crate::splice::splice(
                &client,
                appliance,
                in_front_of,
                *fail,
                name.clone(),
                *timeout,
                json,
            )
            .await?
        }
        Command::Unsplice { appliance } => client.unsplice(appliance).await?,
        Command::Splices => crate::splice::list(&client, json).await?,
        Command::Room { op } => crate::room::room(&client, op, json).await?,
        Command::Topology { room, format } => {
            crate::room::topology(&client, room.as_deref(), *format, json).await?
        }
        Command::Capture {
            name,
            filter,
            count,
        } => return crate::capture::capture(&client, name, filter.as_deref(), *count).await,
        Command::Mirror { source, to, filter } => {
            crate::splice::mirror(&client, source, to, filter.clone(), json).await?
        }
        Command::Unmirror { source, to } => {
            crate::splice::unmirror(&client, source, to.as_ref()).await?
        }
        Command::Gc { remove } => {
            crate::gc::run(
                &client,
                &cli.data_dir,
                &paths::iface_prefix(),
                *remove,
                json,
            )
            .await?
        }
        Command::Setup { .. }
        | Command::Kernel { .. }
        | Command::Daemon { .. }
        | Command::Bench { .. }
        | Command::Jail { .. }
        | Command::Guard { .. }
        | Command::Cluster { .. } => {
            unreachable!("handled in main")
        }
    }
    Ok(0)
}

/// Connects to vroomd, starting one in the background when none answers.
pub async fn connect(data_dir: &Path) -> Result<Client> {
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
    let exe = std::env::current_exe().context("cannot find the vroom executable")?;
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

async fn run(client: &Client, args: &RunArgs, json: bool) -> Result<i32> {
    let mut nics = args.nets.clone();
    if let (Some(room), Some(segment)) = (&args.room, args.segment) {
        nics.insert(0, crate::room::room_nic(client, room, segment).await?);
    }
    let spec = InstanceSpec {
        name: args.name.clone(),
        image: args.image.clone().unwrap_or_default(),
        mem_mib: args.mem,
        cpus: args.cpus,
        nics,
        accel: args.accel,
        config_volume_kib: args.config_size,
        ephemeral: args.ephemeral,
    };
    if args.from_snapshot.is_none() {
        build_from_catalog_if_missing(client, &spec.image, json).await?;
    }
    let spinner = output::spinner(json, format!("creating {}", spec.name));
    let created = client
        .run(&RunRequest {
            spec,
            ready_timeout_secs: Some(args.timeout),
            from_snapshot: args.from_snapshot.clone(),
            cold: args.cold,
            placement: vroom_types::Placement {
                ha: args.ha,
                spread: args.spread.clone(),
                node: args.node.clone(),
            },
        })
        .await;
    let created = match created {
        Ok(i) => i,
        Err(e) => {
            if let Some(s) = &spinner {
                s.finish_and_clear();
            }
            return Err(e.into());
        }
    };
    if let Some(s) = &spinner {
        s.set_message(format!(
            "booting {} ({})",
            created.spec.name,
            accel_of(&created)
        ));
    }
    let instance = wait_ready(
        client,
        created.spec.name.as_str(),
        Duration::from_secs(args.timeout + 10),
    )
    .await;
    if let Some(s) = &spinner {
        s.finish_and_clear();
    }
    let instance = instance?;
    if json {
        output::json(&instance);
    } else {
        let ips: Vec<String> = instance
            .nics
            .iter()
            .map(|n| format!("{} ({})", n.shown_ip(), n.network))
            .collect();
        let from = instance
            .status
            .started_from
            .as_ref()
            .map(|f| format!(" from {f}"))
            .unwrap_or_default();
        println!(
            "{} is running: {} in {:.1}s on {}{from}",
            instance.spec.name,
            ips.join(", "),
            instance.status.boot_ms.unwrap_or(0) as f64 / 1000.0,
            accel_of(&instance)
        );
    }
    Ok(0)
}

/// `run` of a catalog image that is not built yet builds it first, with its
/// stages shown as `image build` shows them.
pub(crate) async fn build_from_catalog_if_missing(
    client: &Client,
    image: &str,
    json: bool,
) -> Result<()> {
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

/// `inspect` for people; `--json` gives the whole record.
fn show_instance(i: &Instance) {
    let status = &i.status;
    let mut state = status.state.to_string();
    let mut details = vec![];
    if let Some(pid) = status.pid {
        details.push(format!("pid {pid}"));
    }
    if let Some(accel) = status.accel {
        details.push(accel.to_string());
    }
    if let Some(ms) = status.boot_ms {
        details.push(format!("ready in {:.1}s", ms as f64 / 1000.0));
    }
    if let Some(from) = &status.started_from {
        details.push(format!("from {from}"));
    }
    details.push(format!("{} restarts", status.restarts));
    state.push_str(&format!(" ({})", details.join(", ")));
    let rows = [
        ("name", i.spec.name.to_string()),
        (
            "image",
            format!(
                "{} ({})",
                i.image_name,
                &i.image_id[..12.min(i.image_id.len())]
            ),
        ),
        ("state", state),
        ("wanted", format!("{:?}", i.desired).to_lowercase()),
        (
            "resources",
            format!("{} MiB, {} vCPU", i.mem_mib, i.spec.cpus),
        ),
        ("created", output::ago(i.created_at)),
    ];
    for (key, value) in rows {
        println!("{:<10} {value}", format!("{key}:"));
    }
    if let Some(node) = &i.node {
        println!("{:<10} {node}", "node:");
    }
    if i.spec.ephemeral {
        println!(
            "{:<10} ephemeral: every start returns to its first config",
            "slate:"
        );
    }
    if let Some(error) = &status.last_error {
        println!("{:<10} {error}", "error:");
    }
    if let Some(health) = &i.health {
        println!("{:<10} {}", "health:", health_line(health));
    }
    println!("nics:");
    for nic in &i.nics {
        println!(
            "  {:<6} {} on {} (gateway {}), mac {}, tap {}",
            nic.role.as_deref().unwrap_or("-"),
            nic.shown_cidr(),
            nic.network,
            nic.gateway,
            nic.mac,
            nic.tap
        );
    }
    println!("config:");
    for (key, value) in &i.config {
        println!("  {key}={value}");
    }
}

/// The guest's own report in a line: "passes its health check;
/// connections tracked: 2,410 of 12,451, 0 dropped".
fn health_line(health: &vroom_types::GuestHealth) -> String {
    let mut parts = vec![if health.ready {
        "passes its health check".to_string()
    } else {
        "fails its health check".to_string()
    }];
    if !health.services_down.is_empty() {
        parts.push(format!("down: {}", health.services_down.join(", ")));
    }
    if let Some(table) = health.conntrack {
        let mut line = format!(
            "connections tracked: {} of {}, {} dropped",
            table.entries, table.max, table.dropped
        );
        if table.dropped > 0 || table.entries >= table.max {
            line.push_str(" (table full: raise conntrack_max or memory)");
        }
        parts.push(line);
    }
    parts.join("; ")
}

fn accel_of(i: &Instance) -> String {
    i.status
        .accel
        .map(|a| a.to_string())
        .unwrap_or_else(|| "-".into())
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

async fn node(client: &Client, op: &crate::NodeOp, json: bool) -> Result<()> {
    use crate::NodeOp;
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

async fn ps(client: &Client, json: bool) -> Result<()> {
    let header = [
        "NAME",
        "IMAGE",
        "STATE",
        "PID",
        "ACCEL",
        "MEM",
        "ADDRESSES",
        "RESTARTS",
        "CREATED",
    ];
    let list = client.list().await?;
    // A NIC on a room's network is labelled by its segment (lan, dmz).
    let rooms = if json {
        vec![]
    } else {
        client.rooms().await.unwrap_or_default()
    };
    // A cluster node's listing says where each instance runs.
    let cluster = list.iter().any(|i| i.node.is_some());
    let header: Vec<&str> = if cluster {
        header
            .iter()
            .copied()
            .take(3)
            .chain(["NODE"])
            .chain(header.iter().copied().skip(3))
            .collect()
    } else {
        header.to_vec()
    };
    output::list(json, &list, &header, |i| {
        let mut row = vec![
            i.spec.name.to_string(),
            i.image_name.clone(),
            i.status.state.to_string(),
            i.status
                .pid
                .map(|p| p.to_string())
                .unwrap_or_else(|| "-".into()),
            accel_of(i),
            format!("{}M", i.mem_mib),
            i.nics
                .iter()
                .map(|n| {
                    match vroom_types::nic_label(&rooms, n.network.as_str(), n.role.as_deref()) {
                        Some(label) => format!("{label}:{}", n.shown_ip()),
                        None => n.shown_ip(),
                    }
                })
                .collect::<Vec<_>>()
                .join(","),
            i.status.restarts.to_string(),
            output::ago(i.created_at),
        ];
        if cluster {
            row.insert(3, i.node.clone().unwrap_or_else(|| "-".into()));
        }
        row
    });
    Ok(())
}

async fn lifecycle(client: &Client, name: &str, action: InstanceAction, json: bool) -> Result<()> {
    let verb = match action {
        InstanceAction::Start => "starting",
        InstanceAction::Stop => "stopping",
        InstanceAction::Restart => "restarting",
    };
    let spinner = output::spinner(json, format!("{verb} {name}"));
    let done = async {
        let instance = client.action(name, action).await?;
        if matches!(action, InstanceAction::Start | InstanceAction::Restart) {
            if let Some(s) = &spinner {
                s.set_message(format!("{verb} {name}: waiting for its guest to be ready"));
            }
            wait_ready(
                client,
                name,
                Duration::from_secs(vroom_core::engine::DEFAULT_READY_TIMEOUT_SECS + 10),
            )
            .await
        } else {
            Ok(instance)
        }
    }
    .await;
    if let Some(s) = spinner {
        s.finish_and_clear();
    }
    let instance = done?;
    if json {
        output::json(&instance);
    } else {
        println!("{name} is {}", instance.status.state);
    }
    Ok(())
}

async fn copy_out(client: &Client, source: &str, dest: &Path) -> Result<()> {
    let Some((name, path)) = source
        .split_once(':')
        .filter(|(n, p)| !n.is_empty() && !p.is_empty())
    else {
        bail!("the source {source:?} must be NAME:/path/in/the/guest");
    };
    if dest == Path::new("-") {
        client
            .read_file_to(name, path, &mut tokio::io::stdout())
            .await?;
        return Ok(());
    }
    if path.ends_with('/') {
        return copy_dir_out(client, name, path, dest).await;
    }
    let target = if dest.is_dir() {
        let file = Path::new(path)
            .file_name()
            .with_context(|| format!("{path} names no file"))?;
        dest.join(file)
    } else {
        dest.to_path_buf()
    };
    copy_file_out(client, name, path, &target).await
}

/// `cp NAME:/dir/ LOCALDIR`: every regular file directly in the guest's
/// directory (not recursive), into `dest`, created if missing. The listing
/// comes from the guest's busybox `find`; each name is untrusted and must be
/// a plain file name (no `/`, not `.` or `..`).
async fn copy_dir_out(client: &Client, name: &str, dir: &str, dest: &Path) -> Result<()> {
    let listing = client
        .exec(
            name,
            &ExecRequest {
                argv: [
                    "/bin/busybox",
                    "find",
                    dir,
                    "-maxdepth",
                    "1",
                    "-type",
                    "f",
                    "-print0",
                ]
                .map(String::from)
                .to_vec(),
                timeout_secs: Some(30),
                stdin: false,
            },
        )
        .await?;
    if listing.exit_code != 0 {
        bail!(
            "cannot list {dir} in {name}: {}",
            listing.stderr.lines().next().unwrap_or("find failed")
        );
    }
    if listing.stdout_truncated {
        bail!("{dir} in {name} holds too many files to copy at once");
    }
    std::fs::create_dir_all(dest).with_context(|| format!("cannot create {}", dest.display()))?;
    let mut copied = 0;
    for path in listing.stdout.split('\0').filter(|p| !p.is_empty()) {
        let file = path.strip_prefix(dir).unwrap_or(path);
        if file.is_empty() || file.contains('/') || file == "." || file == ".." {
            eprintln!("skipping {path:?}: not a plain file name");
            continue;
        }
        copy_file_out(client, name, path, &dest.join(file)).await?;
        copied += 1;
    }
    eprintln!(
        "copied {} from {name}:{dir} to {}",
        output::count(copied, "file", "files"),
        dest.display()
    );
    Ok(())
}

async fn copy_file_out(client: &Client, name: &str, path: &str, target: &Path) -> Result<()> {
    // Write beside the target and rename, so a failed copy leaves nothing half-written.
    let partial = target.with_extension("vroom-partial");
    let copied = async {
        let mut file = tokio::fs::File::create(&partial)
            .await
            .with_context(|| format!("cannot create {}", partial.display()))?;
        client.read_file_to(name, path, &mut file).await?;
        file.sync_all()
            .await
            .with_context(|| format!("cannot write {}", partial.display()))?;
        tokio::fs::rename(&partial, target)
            .await
            .with_context(|| format!("cannot write {}", target.display()))
    }
    .await;
    if copied.is_err() {
        let _ = std::fs::remove_file(&partial);
    }
    copied
}

async fn logs(
    client: &Client,
    name: &str,
    boot: i32,
    tail: Option<usize>,
    follow: bool,
) -> Result<()> {
    let mut offset = 0;
    let mut stdout = std::io::stdout();
    if let Some(lines) = tail {
        // Read to the end, keeping only the last lines.
        let mut kept = std::collections::VecDeque::with_capacity(lines + 1);
        let mut partial = String::new();
        loop {
            let chunk = client.boot_logs(name, boot, offset).await?;
            if chunk.next_offset == offset {
                break;
            }
            offset = chunk.next_offset;
            partial.push_str(&chunk.data);
            while let Some(end) = partial.find('\n') {
                let line: String = partial.drain(..=end).collect();
                kept.push_back(line);
                if kept.len() > lines {
                    kept.pop_front();
                }
            }
        }
        if !partial.is_empty() {
            kept.push_back(partial);
            if kept.len() > lines {
                kept.pop_front();
            }
        }
        for line in kept {
            stdout.write_all(line.as_bytes())?;
        }
        stdout.flush()?;
        if !follow {
            return Ok(());
        }
    }
    loop {
        let chunk = client.boot_logs(name, boot, offset).await?;
        stdout.write_all(chunk.data.as_bytes())?;
        stdout.flush()?;
        let got_data = chunk.next_offset != offset;
        offset = chunk.next_offset;
        if !got_data {
            if !follow {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    }
}

/// Streams a command's output to ours as it comes, feeding it our stdin
/// with `-i`; returns its exit code. `--json` prints the whole result at the end.
pub(crate) async fn exec(
    client: &Client,
    name: &str,
    req: &ExecRequest,
    json: bool,
) -> Result<i32> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (mut events, input) = client.exec_stream(name, req).await?;
    if let Some(mut input) = input {
        tokio::spawn(async move {
            let mut stdin = tokio::io::stdin();
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                match stdin.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        if input.write(buf[..n].to_vec().into()).await.is_err() {
                            break;
                        }
                    }
                }
            }
            // Dropping `input` ends the request body: the command's stdin closes.
        });
    }
    let (mut stdout, mut stderr) = (tokio::io::stdout(), tokio::io::stderr());
    let (mut out_text, mut err_text) = (CappedOutput::default(), CappedOutput::default());
    while let Some(event) = events.next().await {
        match event? {
            ExecEvent::Stdout { data } if json => out_text.push(&data),
            ExecEvent::Stderr { data } if json => err_text.push(&data),
            ExecEvent::Stdout { data } => {
                stdout.write_all(&data).await?;
                stdout.flush().await?;
            }
            ExecEvent::Stderr { data } => {
                stderr.write_all(&data).await?;
                stderr.flush().await?;
            }
            ExecEvent::Exit(exit) => {
                if json {
                    output::json(&ExecResult {
                        exit_code: exit.exit_code,
                        stdout: out_text.text(),
                        stderr: err_text.text(),
                        stdout_truncated: out_text.truncated(),
                        stderr_truncated: err_text.truncated(),
                        message: exit.message,
                    });
                } else if let Some(message) = &exit.message {
                    eprintln!("vroom exec: {message}");
                }
                return Ok(exit.exit_code);
            }
            ExecEvent::Error { error } => return Err(events.error(error).into()),
        }
    }
    Err(events.ended_early().into())
}

/// The most `config import` reads.
const MAX_IMPORT_BYTES: u64 = 1 << 20;

async fn config(client: &Client, name: &str, op: &ConfigOp, json: bool) -> Result<()> {
    config_op(client, name, op, json)
        .await
        .map_err(|e| match e.downcast::<ClientError>() {
            // A refused change carries the failing check's output after its
            // first line: show it, and keep the error itself to one line.
            Ok(ClientError::Api { message, .. }) => {
                let (first, rest) = message.split_once('\n').unwrap_or((&message, ""));
                for line in rest.lines() {
                    eprintln!("  | {line}");
                }
                anyhow::anyhow!("{first}")
            }
            Ok(other) => other.into(),
            Err(e) => e,
        })
}

async fn config_op(client: &Client, name: &str, op: &ConfigOp, json: bool) -> Result<()> {
    let show = |values: &vroom_types::ConfigValues| {
        if json {
            output::json(&ConfigDocument {
                values: values.clone(),
            });
        } else {
            for (k, v) in values {
                println!("{k}={v}");
            }
        }
    };
    match op {
        ConfigOp::Get { key: None } => show(&client.config_get(name).await?),
        ConfigOp::Get { key: Some(key) } => {
            let values = client.config_get(name).await?;
            let value = values
                .get(key)
                .with_context(|| format!("instance {name} has no config key {key:?}"))?;
            if json {
                output::json(value);
            } else {
                println!("{value}");
            }
        }
        ConfigOp::Set { pairs } => show(
            &client
                .config_set(name, pairs.iter().cloned().collect())
                .await?,
        ),
        ConfigOp::Reset => show(&client.config_reset(name).await?),
        ConfigOp::Export { file } => {
            let values = client.config_get(name).await?;
            let mut bytes = serde_json::to_vec_pretty(&ConfigDocument { values })?;
            bytes.push(b'\n');
            if file.as_os_str() == "-" {
                let mut out = std::io::stdout().lock();
                out.write_all(&bytes)?;
                out.flush()?;
            } else {
                std::fs::write(file, bytes)
                    .with_context(|| format!("cannot write {}", file.display()))?;
            }
        }
        ConfigOp::Import { file } => {
            let (bytes, source) = if file.as_os_str() == "-" {
                (read_bounded(std::io::stdin().lock())?, "stdin".to_string())
            } else {
                // A regular file under the cap, opened without blocking: a
                // FIFO or /dev/zero is refused at once, naming what it is.
                let bytes = vroom_input::read_input(file, MAX_IMPORT_BYTES, None)?;
                (bytes, file.display().to_string())
            };
            let doc: ConfigDocument = serde_json::from_slice(&bytes)
                .with_context(|| format!("{source} is not a config export"))?;
            show(&client.config_replace(name, doc.values).await?);
        }
        ConfigOp::History => {
            let history = client.config_history(name).await?;
            if json {
                output::json(&history);
            } else {
                let rows: Vec<Vec<String>> = history
                    .versions
                    .iter()
                    .map(|v| {
                        let mark = if v.version == history.current {
                            "*"
                        } else {
                            ""
                        };
                        let origin = match v.rollback_to {
                            Some(to) => format!("rollback to {to}"),
                            None => format!("{:?}", v.origin).to_lowercase(),
                        };
                        vec![
                            format!("{}{mark}", v.version),
                            output::ago(v.time),
                            origin,
                            v.changed.join(", "),
                        ]
                    })
                    .collect();
                output::table(&["VERSION", "TIME", "ORIGIN", "CHANGED"], &rows);
            }
        }
        ConfigOp::Diff { v1, v2 } => {
            let diff = client.config_diff(name, *v1, *v2).await?;
            if json {
                output::json(&diff);
            } else {
                println!("--- version {}", diff.from);
                println!("+++ version {}", diff.to);
                for change in &diff.changes {
                    if let Some(old) = &change.old {
                        println!("-{}={old}", change.key);
                    }
                    if let Some(new) = &change.new {
                        println!("+{}={new}", change.key);
                    }
                }
            }
        }
        ConfigOp::Rollback { version } => show(&client.config_rollback(name, *version).await?),
    }
    Ok(())
}

/// Reads at most [`MAX_IMPORT_BYTES`]; more is an error, not a cut.
fn read_bounded(reader: impl std::io::Read) -> Result<Vec<u8>> {
    use std::io::Read;
    let mut bytes = Vec::new();
    reader
        .take(MAX_IMPORT_BYTES + 1)
        .read_to_end(&mut bytes)
        .context("cannot read the config")?;
    if bytes.len() as u64 > MAX_IMPORT_BYTES {
        bail!(
            "the config to import exceeds {} KiB",
            MAX_IMPORT_BYTES / 1024
        );
    }
    Ok(bytes)
}

async fn net(client: &Client, op: &NetOp, json: bool) -> Result<()> {
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

async fn image(client: &Client, op: &ImageOp, json: bool) -> Result<()> {
    match op {
        ImageOp::Ls => output::list(
            json,
            &client.images().await?,
            &["NAME", "VERSION", "ID", "SIZE", "KERNEL"],
            |i| {
                vec![
                    // `*` marks the build the name resolves to; older builds go with `image prune`.
                    if i.current {
                        format!("{} *", i.name)
                    } else {
                        i.name.clone()
                    },
                    i.version.clone(),
                    i.id[..12].to_string(),
                    output::bytes(i.size),
                    format!("{} {}", i.manifest.kernel.flavor, i.manifest.kernel.release),
                ]
            },
        ),
        ImageOp::Inspect { image } => {
            let i = client.image(image).await?;
            if json {
                output::json(&i);
            } else {
                let m = &i.manifest;
                let a = &m.appliance;
                for (key, value) in [
                    (
                        "name",
                        format!(
                            "{} {}{}",
                            i.name,
                            i.version,
                            if i.current {
                                " (current build)"
                            } else {
                                " (older build)"
                            }
                        ),
                    ),
                    ("id", i.id.clone()),
                    (
                        "size",
                        format!(
                            "{} (root {}, initramfs {})",
                            output::bytes(i.size),
                            output::bytes(m.rootfs.size),
                            output::bytes(m.initramfs.size)
                        ),
                    ),
                    (
                        "kernel",
                        match &m.kernel.id {
                            Some(id) => format!(
                                "vroom's {id}: {} ({} {}), everything built in, no ACPI",
                                m.kernel.release, m.kernel.package, m.kernel.version
                            ),
                            None => format!(
                                "Debian's {} ({}), modules in the initramfs",
                                m.kernel.release, m.kernel.version
                            ),
                        },
                    ),
                    (
                        "memory",
                        format!(
                            "{} MiB by default, at least {} MiB",
                            m.default_mem_mib, m.min_mem_mib
                        ),
                    ),
                    (
                        "packages",
                        format!(
                            "{} (`vroom image sbom {}` lists them)",
                            m.packages.len(),
                            i.name
                        ),
                    ),
                    (
                        "nic roles",
                        if a.nic_roles.is_empty() {
                            "-".into()
                        } else {
                            a.nic_roles.join(", ")
                        },
                    ),
                    (
                        "services",
                        a.services
                            .iter()
                            .map(|s| s.name.clone())
                            .collect::<Vec<_>>()
                            .join(", "),
                    ),
                ] {
                    println!("{:<10} {value}", format!("{key}:"));
                }
                println!("config:");
                for (key, value) in &a.seed_config {
                    println!("  {key}={value}");
                }
            }
        }
        ImageOp::Rm { image } => client.remove_image(image).await?,
        ImageOp::Warm { image, mem } => crate::snapshot::warm(client, image, *mem, json).await?,
        ImageOp::Prune => {
            let removed = client.prune_images().await?;
            if json {
                output::json(&removed);
            } else if removed.is_empty() {
                println!("no older builds to remove");
            } else {
                for image in &removed {
                    println!(
                        "removed {} {} {} ({})",
                        image.name,
                        image.version,
                        &image.id[..12],
                        output::bytes(image.size)
                    );
                }
            }
        }
        ImageOp::Sbom { image } => {
            let packages = client.image(image).await?.manifest.packages;
            output::list(
                json,
                &packages,
                &["PACKAGE", "VERSION", "SOURCE", "SHA256"],
                |p| {
                    vec![
                        p.name.clone(),
                        p.version.clone(),
                        p.source.clone(),
                        p.sha256[..16].to_string(),
                    ]
                },
            );
        }
        ImageOp::Build {
            recipe,
            update,
            kernel,
        } => {
            // A catalog name (`vroom image build firewall`) unless such a path exists here.
            let path = match recipe.to_str() {
                Some(name) if !recipe.exists() && vroom_image::in_catalog(name) => recipe.clone(),
                _ => recipe.canonicalize().with_context(|| {
                    format!(
                        "cannot find recipe {} (the catalog has {})",
                        recipe.display(),
                        vroom_image::catalog().join(", ")
                    )
                })?,
            };
            let mut stages = output::Stages::new(json, format!("building {}", path.display()));
            let built = client
                .build_image(&path, *update, kernel.as_deref(), |stage, detail| {
                    stages.update(stage, detail)
                })
                .await;
            stages.finish(built.is_ok());
            let report = built?;
            let image = &report.image;
            if json {
                output::json(&report);
                return Ok(());
            }
            let what = if report.cached { "unchanged" } else { "built" };
            println!(
                "{what} {} {} ({}): {} packages, {}",
                image.name,
                image.version,
                &image.id[..12],
                image.manifest.packages.len(),
                output::bytes(image.size)
            );
            for change in &report.changes {
                let version = |v: &Option<String>| v.clone().unwrap_or_else(|| "-".into());
                println!(
                    "  {} {} -> {}",
                    change.name,
                    version(&change.from),
                    version(&change.to)
                );
            }
            if *update && report.changes.is_empty() {
                println!("  no package changed");
            }
        }
    }
    Ok(())
}
