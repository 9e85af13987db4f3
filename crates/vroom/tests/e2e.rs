//! End-to-end tests: real QEMU microVMs (TCG here), real bridges and taps,
//! a real vroomd driven through the CLI. Run with `cargo xtask test`, as root.

mod common;

use std::time::Duration;

use common::{page_shows, random_subnet, Env};
use vroom_types::InstanceState;

const BOOT: Duration = Duration::from_secs(90);

fn running(env: &Env, name: &str) -> vroom_types::Instance {
    env.wait_for(name, "running", BOOT, |i| {
        i.status.state == InstanceState::Running
    })
}

#[test]
fn hello_serves_greeting_and_config_follows_the_instance() {
    let env = Env::new("hello");
    let subnet = random_subnet();
    env.ok(&["net", "create", "lan", "--subnet", &subnet]);
    let out = env.ok(&["run", "hello", "--name", "web", "--net", "lan"]);
    assert!(out.contains("web is running"), "{out}");
    let web = env.instance("web");
    assert_eq!(web.status.state, InstanceState::Running);
    // auto picks KVM only with vmx/svm and a usable /dev/kvm (never on a PVM-only host like ours).
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap();
    let has_virt = cpuinfo
        .lines()
        .filter(|l| l.starts_with("flags"))
        .any(|l| l.split_whitespace().any(|f| f == "vmx" || f == "svm"));
    let kvm_opens = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok();
    let expected = if has_virt && kvm_opens { "kvm" } else { "tcg" };
    assert_eq!(
        web.status.accel.map(|a| a.to_string()).as_deref(),
        Some(expected),
        "inspect shows the accelerator auto chose"
    );
    let ip = web.nics[0].ip.unwrap();
    assert!(
        page_shows(ip, "Hello from vroom!"),
        "the seed greeting is served"
    );

    // Live change through the agent: applied and on the floppy when the command returns.
    env.ok(&["config", "web", "set", "greeting=Changed live"]);
    assert!(page_shows(ip, "Changed live"));
    assert_eq!(
        env.ok(&["config", "web", "get", "greeting"]).trim(),
        "Changed live"
    );
    let on_disk = env.ok(&["exec", "web", "--", "cat", "/config/config.json"]);
    assert!(
        on_disk.contains("Changed live"),
        "the guest wrote the floppy: {on_disk}"
    );

    // Duplicate names and networks in use are refused.
    assert!(env
        .fail(&["run", "hello", "--name", "web", "--net", "lan"])
        .contains("already exists"));
    assert!(env.fail(&["net", "rm", "lan"]).contains("is used by web"));
    assert!(env
        .fail(&["config", "web", "set", "nope=1"])
        .contains("unknown config key"));

    // Stop then start keeps the config; while stopped the host reads and writes the floppy.
    env.ok(&["stop", "web"]);
    assert_eq!(env.instance("web").status.state, InstanceState::Stopped);
    assert!(env.qemu_pids().is_empty(), "stop ends QEMU");
    assert_eq!(
        env.ok(&["config", "web", "get", "greeting"]).trim(),
        "Changed live"
    );
    env.ok(&["config", "web", "set", "greeting=Set while stopped"]);
    env.ok(&["start", "web"]);
    let web = running(&env, "web");
    assert!(page_shows(web.nics[0].ip.unwrap(), "Set while stopped"));

    // Export, reset to the seed (live), import back.
    let export = env.dir.join("export.json");
    env.ok(&["config", "web", "export", export.to_str().unwrap()]);
    env.ok(&["config", "web", "reset"]);
    assert!(
        page_shows(ip, "Hello from vroom!"),
        "reset restores the seed greeting"
    );
    env.ok(&["config", "web", "import", export.to_str().unwrap()]);
    assert!(page_shows(ip, "Set while stopped"));

    // exec passes the exit code through.
    let out = env.vroom(&["exec", "web", "--", "sh", "-c", "echo hi; exit 7"]);
    assert_eq!(out.status.code(), Some(7));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "hi\n");

    let logs = env.ok(&["logs", "web"]);
    assert!(
        logs.contains("vroom-init: services started"),
        "console log captured: {logs}"
    );
    let images = env.ok(&["image", "ls"]);
    assert!(images.contains("hello"), "{images}");

    env.ok(&["rm", "-f", "web"]);
    env.ok(&["net", "rm", "lan"]);
    env.assert_nothing_left("after rm");
}

#[test]
fn killed_daemon_leaves_vms_running_and_a_new_one_readopts_them() {
    // Also: a VM that died while no daemon ran is restarted by the next one.
    let env = Env::new("adopt");
    env.ok(&["net", "create", "lan", "--subnet", &random_subnet()]);
    let names = ["a1", "a2", "a3"];
    for name in names {
        env.ok(&["run", "hello", "--name", name, "--net", "lan"]);
    }
    let before: Vec<(String, u32)> = env
        .instances()
        .iter()
        .map(|i| (i.spec.name.to_string(), i.status.pid.unwrap()))
        .collect();
    assert_eq!(before.len(), 3);

    env.kill_daemon();
    std::thread::sleep(Duration::from_millis(500));
    let pids = env.qemu_pids();
    for (name, pid) in &before {
        assert!(
            pids.contains(pid),
            "{name}'s QEMU {pid} died with the daemon"
        );
    }

    // One VM dies while no daemon watches it: the next daemon must restart it.
    let (dead_name, dead_pid) = before[0].clone();
    // SAFETY: plain syscall on the test's own VM.
    unsafe { libc::kill(dead_pid as i32, libc::SIGKILL) };
    std::thread::sleep(Duration::from_millis(300));

    env.start_daemon();
    // The event log outlived the daemon: a1's life before the kill is
    // still told, and the new daemon's numbers go on after it.
    let history = events(&env, &["--filter", "name=a1", "--since", "0"]);
    let seq_of = |action: &str| {
        history
            .iter()
            .filter(|e| e.action == action)
            .map(|e| e.seq)
            .next_back()
    };
    let ready_before = seq_of("ready").expect("a1 was ready before the kill");
    assert!(seq_of("created").unwrap() < ready_before, "{history:?}");
    assert!(history
        .iter()
        .all(|e| e.actor.starts_with("uid:") || e.actor == "vroomd"));
    let after = env.instances();
    for (name, pid) in &before[1..] {
        let i = after.iter().find(|i| i.spec.name.as_str() == name).unwrap();
        assert_eq!(i.status.state, InstanceState::Running, "{name}");
        assert_eq!(i.status.pid, Some(*pid), "{name} keeps its pid");
    }
    env.wait_for(&dead_name, "a restart after recovery", BOOT, |i| {
        i.status.state == InstanceState::Running && i.status.pid.is_some_and(|p| p != dead_pid)
    });
    let history = events(
        &env,
        &[
            "--filter",
            &format!("name={dead_name}"),
            "--since",
            &ready_before.to_string(),
        ],
    );
    assert!(
        history
            .iter()
            .any(|e| e.action == "ready" && e.actor == "vroomd"),
        "the restart after recovery is the daemon's doing: {history:?}"
    );
    // The re-adopted VMs are fully usable: the agent answers and a config change applies.
    let ip = env.instance("a2").nics[0].ip.unwrap();
    env.ok(&["config", "a2", "set", "greeting=after adoption"]);
    assert!(page_shows(ip, "after adoption"));
    // And stopping one works through the new daemon.
    env.ok(&["stop", "a3"]);
    assert!(!env.qemu_pids().contains(&before[2].1));
    for name in names {
        env.ok(&["rm", "-f", name]);
    }
    env.ok(&["net", "rm", "lan"]);
    env.assert_nothing_left("after rm");
}

#[test]
fn crashed_vm_restarts_with_its_config_and_stopped_vm_stays_stopped() {
    let env = Env::new("crash");
    env.ok(&["net", "create", "lan", "--subnet", &random_subnet()]);
    env.ok(&["run", "hello", "--name", "crashy", "--net", "lan"]);
    env.ok(&["run", "hello", "--name", "parked", "--net", "lan"]);
    env.ok(&["stop", "parked"]);

    // A follower of the event log sees the crash and the restart live.
    let mut follower = env
        .command()
        .args(["events", "--follow", "--json", "--filter", "name=crashy"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let (lines_tx, lines_rx) = std::sync::mpsc::channel::<String>();
    let stdout = follower.stdout.take().unwrap();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            if lines_tx.send(line).is_err() {
                break;
            }
        }
    });
    // An acknowledged config change survives QEMU dying right after.
    env.ok(&["config", "crashy", "set", "greeting=survives the crash"]);
    let old = env.instance("crashy");
    let old_pid = old.status.pid.unwrap();
    // SAFETY: plain syscall on the test's own VM.
    unsafe { libc::kill(old_pid as i32, libc::SIGKILL) };

    let again = env.wait_for("crashy", "a restart", BOOT, |i| {
        i.status.state == InstanceState::Running && i.status.pid.is_some_and(|p| p != old_pid)
    });
    assert_eq!(again.status.restarts, 1);
    assert!(page_shows(again.nics[0].ip.unwrap(), "survives the crash"));
    let mut seen = vec![];
    while !seen.ends_with(&["restarting", "starting", "ready"].map(String::from)) {
        let line = lines_rx
            .recv_timeout(Duration::from_secs(30))
            .unwrap_or_else(|_| panic!("the follower saw only {seen:?}"));
        let line: vroom_types::EventLine = serde_json::from_str(&line).unwrap();
        if let vroom_types::EventLine::Event(e) = line {
            if e.action == "restarting" {
                assert_eq!(e.actor, "vroomd");
                assert!(e.message.is_some(), "{e:?}");
            }
            seen.push(e.action);
        }
    }
    assert_eq!(seen[0], "applied", "the config change came first: {seen:?}");
    let _ = follower.kill();
    let _ = follower.wait();
    let parked = env.instance("parked");
    assert_eq!(
        parked.status.state,
        InstanceState::Stopped,
        "a user-stopped instance is not restarted"
    );
    assert_eq!(env.qemu_pids(), vec![again.status.pid.unwrap()]);

    env.ok(&["rm", "-f", "crashy"]);
    env.ok(&["rm", "parked"]);
    env.ok(&["net", "rm", "lan"]);
    env.assert_nothing_left("after rm");
}

#[test]
fn bad_input_gets_a_clear_error_and_leaves_nothing_behind() {
    let env = Env::new("bad");
    let subnet = random_subnet();
    env.ok(&["net", "create", "lan", "--subnet", &subnet]);
    let cases: &[(&[&str], &str)] = &[
        (
            &["run", "hello", "--name", "Bad_Name", "--net", "lan"],
            "invalid value 'Bad_Name'",
        ),
        (
            &["run", "hello", "--name", "../etc", "--net", "lan"],
            "invalid name \"../etc\"",
        ),
        (
            &[
                "run", "hello", "--name", "ok", "--net", "lan", "--mem", "32M",
            ],
            "below the 64 MiB the guest kernel needs",
        ),
        (
            &[
                "run", "hello", "--name", "ok", "--net", "lan", "--mem", "100000G",
            ],
            "exceeds the host",
        ),
        (
            &[
                "run", "hello", "--name", "ok", "--net", "lan", "--cpus", "0",
            ],
            "invalid cpu count 0",
        ),
        (
            &["run", "nosuchimage", "--name", "ok", "--net", "lan"],
            "unknown image \"nosuchimage\"",
        ),
        (
            &["run", "hello", "--name", "ok", "--net", "nosuchnet"],
            "no network named \"nosuchnet\"",
        ),
        (
            &["run", "hello", "--name", "ok", "--net", "lan:192.0.2.9"],
            "outside subnet",
        ),
        (
            &[
                "run",
                "hello",
                "--name",
                "ok",
                "--net",
                "lan",
                "--config-size",
                "1",
            ],
            "config volume size 1 KiB is outside",
        ),
        (
            &["net", "create", "lan2", "--subnet", &subnet],
            "overlaps network lan",
        ),
        (
            &["net", "create", "lan", "--subnet", "10.250.0.0/24"],
            "already exists",
        ),
        (
            &["net", "create", "x", "--subnet", "10.1.2.3/24"],
            "host bits are set",
        ),
        (
            &["net", "create", "y", "--subnet", "127.0.0.0/24"],
            "loopback",
        ),
        (&["inspect", "ghost"], "no instance named \"ghost\""),
        (&["stop", "ghost"], "no instance named \"ghost\""),
        (&["net", "rm", "ghost"], "no network named \"ghost\""),
    ];
    for (args, want) in cases {
        let stderr = env.fail(args);
        assert!(
            stderr.contains(want),
            "vroom {args:?}: expected {want:?} in {stderr:?}"
        );
    }
    let overlap_host = env.fail(&[
        "net",
        "create",
        "hostnet",
        "--subnet",
        &host_loopback_free_subnet(),
    ]);
    assert!(overlap_host.contains("overlaps"), "{overlap_host}");

    // A subnet inside a host route, or equal to it, would take the route's
    // traffic or be unreachable: refused, naming the route. The route is on
    // a tun link of this test's prefix (the harness removes it on failure;
    // the dummy driver is not in every kernel).
    let tun = format!("{}rd", env.prefix);
    let (a, b) = (
        200 + rand::random::<u8>() % 40,
        (rand::random::<u8>() % 63) * 4,
    );
    let routed = format!("10.{a}.{b}.0/22");
    common::sh(&format!(
        "ip tuntap add {tun} mode tun && ip link set {tun} up && ip route add {routed} dev {tun}"
    ));
    for (name, subnet) in [
        ("inside", format!("10.{a}.{}.0/24", b + 1)),
        ("equal", routed.clone()),
    ] {
        let err = env.fail(&["net", "create", name, "--subnet", &subnet]);
        assert!(
            err.contains(&format!(
                "subnet {subnet} overlaps the host route {routed} dev {tun}; pick another subnet"
            )),
            "{name}: {err}"
        );
    }
    let networks = env.ok(&["net", "ls"]);
    assert!(
        !networks.contains("inside") && !networks.contains("equal"),
        "{networks}"
    );
    common::sh(&format!("ip link del {tun}"));

    env.ok(&["net", "rm", "lan"]);
    env.assert_nothing_left("after bad input");
}

/// A subnet that overlaps an address the host already has (the first non-loopback one).
fn host_loopback_free_subnet() -> String {
    let out = std::process::Command::new("ip")
        .args(["-o", "-4", "addr", "show"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let cidr = text
        .lines()
        .filter(|l| !l.contains(" lo "))
        .find_map(|l| {
            l.split_whitespace()
                .skip_while(|w| *w != "inet")
                .nth(1)
                .map(String::from)
        })
        .expect("the host has an IPv4 address");
    let net: vroom_types::Ipv4Net = cidr.parse().unwrap();
    let prefix = net.prefix_len().clamp(16, 29);
    vroom_types::Ipv4Net::new(net.addr(), prefix)
        .unwrap()
        .trunc()
        .to_string()
}

#[test]
fn guest_that_never_becomes_ready_is_marked_failed_with_its_console() {
    let env = Env::new("slow");
    env.ok(&["net", "create", "lan", "--subnet", &random_subnet()]);
    env.ok(&["image", "build", &common::recipe("hello")]);
    // A guest that cannot answer: its QEMU is stopped as soon as it runs
    // (vroom's kernel boots hello in about a second, so a short timeout
    // alone would race the boot).
    let run = env
        .command()
        .args([
            "run",
            "hello",
            "--name",
            "slow",
            "--net",
            "lan",
            "--timeout",
            "3",
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let pid = common::poll(Duration::from_secs(30), || {
        env.instances()
            .into_iter()
            .find(|i| i.spec.name.as_str() == "slow")
            .and_then(|i| i.status.pid)
    })
    .expect("slow's QEMU runs");
    // SAFETY: plain syscall on a pid of this test's own QEMU.
    unsafe { libc::kill(pid as i32, libc::SIGSTOP) };
    let out = run.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains("instance slow failed: the guest did not become ready within 3s"),
        "{stderr}"
    );
    assert!(
        stderr.contains("--- console of slow"),
        "the console tail is shown: {stderr}"
    );
    let slow = env.instance("slow");
    assert_eq!(slow.status.state, InstanceState::Failed);
    assert!(env.qemu_pids().is_empty(), "the failed VM was killed");
    // A failed instance stays failed (no restart loop) and can be removed.
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(env.instance("slow").status.state, InstanceState::Failed);
    env.ok(&["rm", "slow"]);
    env.ok(&["net", "rm", "lan"]);
    env.assert_nothing_left("after rm");
}

#[test]
fn missing_qemu_or_kernel_is_reported_and_rolled_back() {
    let no_qemu = Env::with_env(
        "noqemu",
        vec![("VROOM_QEMU", "/nonexistent/qemu-system-x86_64".into())],
    );
    no_qemu.ok(&["net", "create", "lan", "--subnet", &random_subnet()]);
    let stderr = no_qemu.fail(&["run", "hello", "--name", "q", "--net", "lan"]);
    assert!(
        stderr.contains("/nonexistent/qemu-system-x86_64 not found; run `vroom setup`"),
        "{stderr}"
    );
    no_qemu.ok(&["net", "rm", "lan"]);
    no_qemu.assert_nothing_left("after missing qemu");

    // The default network is created on first use, and removed again when that use fails.
    let empty_cache = tempdir_path("vre-cache");
    let no_kernel = Env::with_env(
        "nokernel",
        vec![("VROOM_CACHE_DIR", empty_cache.display().to_string())],
    );
    // `hello` is not built in this data dir, so `run` builds it first, which needs the kernel.
    let stderr = no_kernel.fail(&["run", "hello", "--name", "k"]);
    assert!(
        stderr.contains("no guest kernel is cached; run `vroom setup`"),
        "{stderr}"
    );
    assert!(
        no_kernel.ok(&["net", "ls", "--json"]).trim() == "[]",
        "no default network left behind"
    );
    no_kernel.assert_nothing_left("after missing kernel");
    let _ = std::fs::remove_dir_all(empty_cache);
}

fn tempdir_path(prefix: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("{prefix}-{:08x}", rand::random::<u32>()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[test]
fn full_disk_while_creating_the_config_volume_is_reported() {
    let env = Env::new("full");
    // Move the data dir onto a small tmpfs: the image fits, a 64 MiB volume does not.
    env.kill_daemon();
    let status = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=24m", "tmpfs"])
        .arg(&env.dir)
        .status()
        .unwrap();
    assert!(status.success(), "mount tmpfs");
    env.start_daemon();
    env.ok(&["net", "create", "lan", "--subnet", &random_subnet()]);
    let stderr = env.fail(&[
        "run",
        "hello",
        "--name",
        "big",
        "--net",
        "lan",
        "--config-size",
        "65536",
    ]);
    assert!(
        stderr.contains("not enough disk space for the config volume"),
        "{stderr}"
    );
    env.ok(&["net", "rm", "lan"]);
    env.assert_nothing_left("after a full disk");
    let leftovers: Vec<_> = std::fs::read_dir(env.dir.join("instances"))
        .map(|d| d.count())
        .into_iter()
        .collect();
    assert!(leftovers.iter().all(|n| *n == 0));
    env.kill_daemon();
}

/// Real traffic between network namespaces: a client on the bridge fetches the
/// appliance's page, and the appliance reaches a host on the far side of the
/// host through NAT, which sees the host's address, not the guest's.
#[test]
fn namespaced_client_reaches_the_appliance_and_nat_masquerades_its_traffic() {
    let env = Env::new("netns");
    let lan = random_subnet();
    let lan_net: vroom_types::Ipv4Net = lan.parse().unwrap();
    let octets = lan_net.network().octets();
    let prefix = format!("{}.{}.{}", octets[0], octets[1], octets[2]);
    let network: vroom_types::Network = serde_json::from_str(
        &env.ok(&["net", "create", "lan", "--subnet", &lan, "--nat", "--json"]),
    )
    .unwrap();
    env.ok(&[
        "run",
        "hello",
        "--name",
        "web",
        "--net",
        &format!("lan:{prefix}.10"),
    ]);

    // A client namespace plugged into the network's bridge.
    let (client, client_end) =
        env.namespace("cl", &format!("{prefix}.200/24"), &format!("{prefix}.1"));
    let status = std::process::Command::new("ip")
        .args(["link", "set", &client_end, "master", &network.bridge])
        .status()
        .unwrap();
    assert!(status.success());
    let fetch = std::process::Command::new("ip")
        .args([
            "netns",
            "exec",
            &client,
            "/bin/busybox",
            "wget",
            "-qO-",
            &format!("http://{prefix}.10/"),
        ])
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&fetch.stdout).contains("Hello from vroom!"),
        "client fetch: {fetch:?}"
    );

    // A "wan" host behind the host, with a CGI that echoes the caller's address.
    let wan = random_subnet();
    let wan_net: vroom_types::Ipv4Net = wan.parse().unwrap();
    let w = wan_net.network().octets();
    let (host_ip, server_ip) = (
        format!("{}.{}.{}.1", w[0], w[1], w[2]),
        format!("{}.{}.{}.2", w[0], w[1], w[2]),
    );
    let (server_ns, server_end) = env.namespace("wan", &format!("{server_ip}/24"), &host_ip);
    let status = std::process::Command::new("ip")
        .args(["addr", "add", &format!("{host_ip}/24"), "dev", &server_end])
        .status()
        .unwrap();
    assert!(status.success());
    let www = common::echo_server_root(&env, "www");
    common::serve(&env, &server_ns, 8080, &www);

    let from_guest = env.ok(&[
        "exec",
        "web",
        "--",
        "wget",
        "-qO-",
        &format!("http://{server_ip}:8080/cgi-bin/addr"),
    ]);
    // busybox httpd may report the peer as an IPv4-mapped IPv6 address.
    let seen = from_guest
        .trim()
        .trim_start_matches("remote=")
        .trim_start_matches("[::ffff:")
        .trim_end_matches(']');
    assert_eq!(
        seen, host_ip,
        "the guest's traffic leaves through the host, masqueraded (server saw {from_guest:?})"
    );

    env.ok(&["rm", "-f", "web"]);
    env.ok(&["net", "rm", "lan"]);
    assert!(
        env.nft_tables().is_empty(),
        "the NAT table goes with the network"
    );
}

/// An image built from a recipe out of real Debian packages boots and serves;
/// a recipe with an unknown package fails before anything reaches the store.
#[test]
fn recipe_built_image_boots_and_bad_recipes_fail_first() {
    let env = Env::new("recipe");
    let recipes = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../recipes");
    let hello = recipes.join("hello");
    let hello = hello.to_str().unwrap();
    let out = env.vroom(&["image", "build", hello]);
    assert!(out.status.success(), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    for stage in ["resolve", "download", "extract", "trim", "pack"] {
        assert!(
            stderr.lines().any(|l| l.starts_with(stage)),
            "progress shows the {stage} stage: {stderr}"
        );
    }
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("built hello 1.0"));

    // Unchanged: nothing is built again.
    let out = env.ok(&["--json", "image", "build", hello]);
    let report: vroom_types::BuildReport = serde_json::from_str(&out).unwrap();
    assert!(report.cached, "an unchanged recipe is not rebuilt");
    let image = report.image;

    // --update refreshes the indexes and reports what changed (maybe nothing).
    let out = env.vroom(&["image", "build", "--update", hello]);
    assert!(out.status.success(), "{out:?}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("indexes refreshed"),
        "{out:?}"
    );
    assert!(
        stdout.contains("no package changed") || stdout.contains(" -> "),
        "{stdout}"
    );
    assert!(
        image
            .manifest
            .packages
            .iter()
            .any(|p| p.name == "busybox-static"),
        "the SBOM lists the packages"
    );

    env.ok(&["net", "create", "lan", "--subnet", &random_subnet()]);
    env.ok(&["run", &image.id, "--name", "fromrecipe", "--net", "lan"]);
    let instance = env.instance("fromrecipe");
    assert_eq!(instance.image_id, image.id);
    assert!(page_shows(
        instance.nics[0].ip.unwrap(),
        "Hello from vroom!"
    ));
    env.ok(&[
        "config",
        "fromrecipe",
        "set",
        "greeting=built from a recipe",
    ]);
    assert!(page_shows(
        instance.nics[0].ip.unwrap(),
        "built from a recipe"
    ));

    // A bad recipe: the error names the package, and the store is unchanged.
    let bad = env.dir.join("bad");
    std::fs::create_dir_all(&bad).unwrap();
    let text = std::fs::read_to_string(recipes.join("hello/recipe.toml"))
        .unwrap()
        .replace(
            "packages = [{ name = \"busybox-static\", exclude = [\"/usr/share/doc\"] }]",
            "packages = [\"busybox-static\", \"no-such-package-vroom\"]",
        );
    assert!(text.contains("no-such-package-vroom"));
    std::fs::write(bad.join("recipe.toml"), text).unwrap();
    std::fs::copy(recipes.join("hello/index.html"), bad.join("index.html")).unwrap();
    let before = env.ok(&["image", "ls", "--json"]);
    let stderr = env.fail(&["image", "build", bad.to_str().unwrap()]);
    assert!(
        stderr.contains("unknown package no-such-package-vroom"),
        "{stderr}"
    );
    assert_eq!(env.ok(&["image", "ls", "--json"]), before);

    let sbom = env.ok(&["image", "sbom", &image.id]);
    assert!(
        sbom.lines()
            .any(|l| l.starts_with("busybox-static ") && l.contains("busybox")),
        "{sbom}"
    );
    assert!(env
        .fail(&["image", "rm", &image.id])
        .contains("is used by fromrecipe"));

    env.ok(&["rm", "-f", "fromrecipe"]);
    env.ok(&["image", "rm", &image.id]);
    assert!(env
        .fail(&["image", "inspect", &image.id])
        .contains("unknown image"));
    env.ok(&["net", "rm", "lan"]);
    env.assert_nothing_left("after rm");
}

/// The event log's history, as `vroom events --json ARGS` prints it.
fn events(env: &Env, args: &[&str]) -> Vec<vroom_types::Event> {
    let mut all = vec!["events", "--json"];
    all.extend_from_slice(args);
    env.ok(&all)
        .lines()
        .filter_map(|line| match serde_json::from_str(line).unwrap() {
            vroom_types::EventLine::Event(e) => Some(e),
            _ => None,
        })
        .collect()
}
