//! The catalog appliances, built from their recipes in `recipes/` and tested
//! with real clients in network namespaces.

mod common;

use std::net::Ipv4Addr;
use std::time::Duration;

use common::{
    dhcp_lease, fetch, host, poll, psql, random_subnet, recipe, resolve, resolve_once, Env,
};

/// Builds a catalog image for vroom's own kernel (`cargo xtask test` has
/// `vroom setup` build it first): everything built in, no modules in the
/// initramfs, and 64 MiB by default for all but the sniffer and postgres.
fn build(env: &Env, name: &str) -> vroom_types::ImageSummary {
    let out = env.ok(&[
        "--json",
        "image",
        "build",
        &recipe(name),
        "--kernel",
        "vroom",
    ]);
    let image = serde_json::from_str::<vroom_types::BuildReport>(&out)
        .unwrap()
        .image;
    let manifest = &image.manifest;
    assert_eq!(manifest.kernel.flavor, vroom_types::KernelFlavor::Vroom);
    if !["sniffer", "postgres"].contains(&name) {
        assert!(manifest.default_mem_mib <= 64, "{name}: {manifest:?}");
    }
    image
}

/// A network `lan` on a random subnet and an instance of `image` on it:
/// the subnet and the instance's address.
fn run_on_lan(env: &Env, image: &str, name: &str) -> (String, Ipv4Addr) {
    let lan = random_subnet();
    env.ok(&["net", "create", "lan", "--subnet", &lan]);
    env.ok(&["run", image, "--name", name, "--net", "lan"]);
    let ip = env.instance(name).nics[0].ip.unwrap();
    (lan, ip)
}

/// Debian's cloud kernel stays available: an image built for it carries
/// its modules, needs 128 MiB (and says so), and boots with ACPI.
#[test]
fn debian_kernel_images_still_boot() {
    let env = Env::new("dk");
    let out = env.ok(&[
        "--json",
        "image",
        "build",
        &recipe("hello"),
        "--kernel",
        "debian",
    ]);
    let image = serde_json::from_str::<vroom_types::BuildReport>(&out)
        .unwrap()
        .image;
    assert_eq!(
        image.manifest.kernel.flavor,
        vroom_types::KernelFlavor::Debian
    );
    assert_eq!(image.manifest.default_mem_mib, 128);
    let lan = random_subnet();
    env.ok(&["net", "create", "lan", "--subnet", &lan]);
    let err = env.fail(&[
        "run", "hello", "--name", "small", "--net", "lan", "--mem", "64M",
    ]);
    assert!(
        err.contains("below the 128 MiB image hello needs on debian's kernel"),
        "{err}"
    );
    env.ok(&["run", "hello", "--name", "h", "--net", "lan"]);
    let release = env.ok(&["exec", "h", "--", "/bin/busybox", "uname", "-r"]);
    assert_eq!(release.trim(), image.manifest.kernel.release);
    let err = env.fail(&["image", "build", &recipe("hello"), "--kernel", "linux"]);
    assert!(err.contains("unknown kernel \"linux\""), "{err}");
}

/// A recipe that needs a module vroom's kernel does not build in fails at
/// build time, naming the module and the option, before anything is
/// downloaded; Debian's kernel has it as a module.
#[test]
fn a_recipe_needing_a_missing_kernel_option_fails_naming_it() {
    let env = Env::new("ko");
    let dir = tempfile::tempdir().unwrap();
    let hello = std::path::Path::new(&recipe("hello")).to_path_buf();
    for file in ["recipe.toml", "index.html"] {
        std::fs::copy(hello.join(file), dir.path().join(file)).unwrap();
    }
    let text = std::fs::read_to_string(dir.path().join("recipe.toml")).unwrap();
    let text = text.replacen(
        "nics = [\"lan\"]",
        "nics = [\"lan\"]\nmodules = [\"wireguard\"]",
        1,
    );
    std::fs::write(dir.path().join("recipe.toml"), text).unwrap();
    let path = dir.path().display().to_string();
    let err = env.fail(&["image", "build", &path, "--kernel", "vroom"]);
    assert!(err.contains("wireguard (CONFIG_WIREGUARD)"), "{err}");
    assert!(err.contains("image hello"), "{err}");
    assert!(!env.ok(&["image", "ls"]).contains("hello"), "nothing built");
    let out = env.ok(&["--json", "image", "build", &path, "--kernel", "debian"]);
    let report: vroom_types::BuildReport = serde_json::from_str(&out).unwrap();
    assert_eq!(
        report.image.manifest.kernel.flavor,
        vroom_types::KernelFlavor::Debian
    );
}

/// The firewall: a lan client gets a DHCP lease and DNS from it and reaches a
/// wan server through NAT; a port forward reaches a web server in the dmz; a
/// port that is not forwarded is refused, or dropped once the config says so.
#[test]
fn firewall_routes_serves_dhcp_and_dns_and_forwards_ports() {
    let env = Env::new("fw");
    let image = build(&env, "firewall");
    assert!(
        image.manifest.packages.iter().any(|p| p.name == "nftables")
            && image
                .manifest
                .packages
                .iter()
                .any(|p| p.name == "dnsmasq-base"),
        "the SBOM lists nftables and dnsmasq"
    );
    let (wan, lan, dmz) = (random_subnet(), random_subnet(), random_subnet());
    env.ok(&["net", "create", "wan", "--subnet", &wan, "--nat"]);
    env.ok(&["net", "create", "lan", "--subnet", &lan, "--isolated"]);
    env.ok(&["net", "create", "dmz", "--subnet", &dmz, "--isolated"]);
    env.ok(&[
        "run", "firewall", "--name", "fw", "--net", "wan", "--net", "lan", "--net", "dmz",
    ]);
    let fw = env.instance("fw");
    let fw_wan = fw.nics[0].ip.unwrap();
    assert_eq!(
        fw.nics[1].ip.unwrap(),
        host(&lan, 1),
        "the firewall is lan's gateway"
    );
    assert_eq!(fw.nics[2].ip.unwrap(), host(&dmz, 1), "and dmz's");
    // Its connection tracking table is sized for its memory, not the
    // kernel's 1,024 entries, and a typed key sets it.
    let conntrack_max = || -> u64 {
        let out = env.ok(&[
            "exec",
            "fw",
            "--",
            "cat",
            "/proc/sys/net/netfilter/nf_conntrack_max",
        ]);
        out.trim().parse().unwrap()
    };
    let sized = conntrack_max();
    assert!(sized >= 8 * 1024, "{sized} entries for {} MiB", fw.mem_mib);
    env.ok(&["config", "fw", "set", "conntrack_max=5000"]);
    assert_eq!(conntrack_max(), 5000);
    let err = env.fail(&["config", "fw", "set", "conntrack_max=lots"]);
    assert!(err.contains("must be an integer"), "{err}");
    env.ok(&["config", "fw", "set", "conntrack_max=0"]);
    assert_eq!(conntrack_max(), sized);

    // A server on the wan side, a web server in the dmz, a client on lan.
    let server_ip = host(&wan, 50);
    let server = env.namespace_on(
        "srv",
        "wan",
        Some((&format!("{server_ip}/24"), &host(&wan, 1).to_string())),
    );
    let root = common::echo_server_root(&env, "wan");
    common::serve(&env, &server, 8000, &root);
    let web_ip = host(&dmz, 10);
    let web = env.namespace_on(
        "web",
        "dmz",
        Some((&format!("{web_ip}/24"), &host(&dmz, 1).to_string())),
    );
    let root = common::echo_server_root(&env, "dmz");
    common::serve(&env, &web, 80, &root);
    let client = env.namespace_on("cl", "lan", None);

    env.ok(&[
        "config",
        "fw",
        "set",
        &format!("hosts=server.wan={server_ip}"),
        &format!("forward=8080:{web_ip}:80"),
    ]);

    let lease = dhcp_lease(&env, &client);
    let field = |k: &str| lease.get(k).cloned().unwrap_or_default();
    let leased: Ipv4Addr = field("ip").parse().unwrap();
    let pool = u32::from(host(&lan, 100))..=u32::from(host(&lan, 199));
    assert!(pool.contains(&u32::from(leased)), "lease {lease:?}");
    assert_eq!(
        field("router"),
        host(&lan, 1).to_string(),
        "lease {lease:?}"
    );
    assert_eq!(field("dns"), host(&lan, 1).to_string(), "lease {lease:?}");

    // DNS: the firewall answers for the name from its config.
    let resolved = resolve(&env, &client, "server.wan", host(&lan, 1))
        .expect("server.wan resolves through the firewall");
    assert_eq!(resolved, server_ip.to_string());

    // NAT: the wan server sees the firewall's wan address, not the client's.
    let (rc, body) = fetch(
        &env,
        &client,
        &format!("http://{resolved}:8000/cgi-bin/addr"),
    );
    assert_eq!(rc, 0, "lan client reaches the wan server: {body}");
    assert!(
        body.contains(&format!("remote={fw_wan}"))
            || body.contains(&format!("remote=[::ffff:{fw_wan}]")),
        "masqueraded to {fw_wan}: {body}"
    );

    // Port forward: wan port 8080 reaches the dmz web server.
    let (rc, body) = fetch(&env, &server, &format!("http://{fw_wan}:8080/"));
    assert_eq!(rc, 0, "port forward: {body}");
    assert!(body.contains("dmz server"), "{body}");

    // Not forwarded: refused at once.
    let (rc, body) = fetch(&env, &server, &format!("http://{fw_wan}:8081/"));
    assert_ne!(rc, 0);
    assert!(body.contains("Connection refused"), "{body}");

    // With wan_policy=drop the same port gives no answer at all.
    env.ok(&["config", "fw", "set", "wan_policy=drop"]);
    let dropped = poll(Duration::from_secs(10), || {
        let (rc, body) = fetch(&env, &server, &format!("http://{fw_wan}:8081/"));
        (rc == 124).then_some(body)
    });
    assert!(dropped.is_some(), "port 8081 should time out once dropped");
    let (rc, body) = fetch(&env, &server, &format!("http://{fw_wan}:8080/"));
    assert_eq!(rc, 0, "the forward still works: {body}");

    // Bad config is refused with the key named, and nothing changes.
    let err = env.fail(&["config", "fw", "set", "forward=8080:nowhere"]);
    assert!(err.contains("\"forward\""), "{err}");
    let err = env.fail(&["config", "fw", "set", "wan_policy=maybe"]);
    assert!(err.contains("must be one of reject, drop"), "{err}");
    // A value that passes its type but not the network (host 300 of a /24)
    // is refused by the schema's rules (tests/config.rs has the rest).
    let err = env.fail(&["config", "fw", "set", "dhcp_last=300"]);
    assert!(err.contains("host number of lan's subnet"), "{err}");

    // Thrown away and recreated: same addresses, new MACs. The new firewall
    // announces itself, so neighbours that knew the old one follow at once
    // instead of after their ARP entries expire.
    env.ok(&["rm", "-f", "fw"]);
    env.ok(&[
        "run", "firewall", "--name", "fw", "--net", "wan", "--net", "lan", "--net", "dmz",
    ]);
    assert_eq!(env.instance("fw").nics[0].ip.unwrap(), fw_wan);
    env.ok(&["config", "fw", "set", &format!("forward=8080:{web_ip}:80")]);
    let out = env.run_in(
        &server,
        &format!("timeout 2 busybox wget -qO- http://{fw_wan}:8080/"),
    );
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("dmz server"),
        "the recreated firewall forwards at once: {out:?}"
    );
}

/// The sniffer: tcpdump on its mirror-sink NIC sees traffic between others on
/// a mirrored network; the pcap, copied out with `vroom cp`, opens with the
/// host's tcpdump; the ring stays within its configured bounds.
#[test]
fn sniffer_captures_a_mirrored_network_into_bounded_pcaps() {
    let env = Env::new("sniff");
    build(&env, "sniffer");
    let span = random_subnet();
    env.ok(&["net", "create", "span", "--subnet", &span, "--mirror"]);
    // At its recipe's minimum: 64 MiB holds the default ring (4 x 4 MB).
    env.ok(&[
        "run", "sniffer", "--name", "sn", "--net", "span", "--mem", "64M",
    ]);
    env.ok(&["run", "hello", "--name", "web", "--net", "span"]);
    let web_ip = env.instance("web").nics[0].ip.unwrap();
    let client = env.namespace_on(
        "cl",
        "span",
        Some((
            &format!("{}/24", host(&span, 200)),
            &host(&span, 1).to_string(),
        )),
    );

    let probe = format!("vroom-probe-{:08x}", rand::random::<u32>());
    for _ in 0..3 {
        let (rc, body) = fetch(&env, &client, &format!("http://{web_ip}/?{probe}"));
        assert_eq!(rc, 0, "{body}");
    }
    let pcap = env.dir.join("capture.pcap");
    let seen = poll(Duration::from_secs(10), || {
        env.ok(&["cp", "sn:/captures/capture.pcap0", pcap.to_str().unwrap()]);
        let out = std::process::Command::new("tcpdump")
            .args(["-nn", "-A", "-r"])
            .arg(&pcap)
            .output()
            .expect("the host has tcpdump (cargo xtask test installs it)");
        assert!(out.status.success(), "tcpdump -r: {out:?}");
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        (text.matches(&probe).count() >= 3).then_some(text)
    })
    .expect("the pcap holds the three requests");
    let client_ip = format!("IP {}.", host(&span, 200));
    assert!(
        seen.lines()
            .any(|l| l.contains(&client_ip) && l.contains(&format!("> {web_ip}.80:"))),
        "the capture shows the client talking to the web server"
    );

    // A small ring: 2 files of 1 MB, however much traffic passes. Pings go
    // to the web guest: the host answers its guests nothing (isolation).
    env.ok(&["config", "sn", "set", "file_mb=1", "files=2", "filter=icmp"]);
    let out = env.run_in(
        &client,
        &format!("busybox ping -q -c 1500 -i 0.002 -s 1400 {web_ip}"),
    );
    assert!(out.status.success(), "ping: {out:?}");
    let listing = poll(Duration::from_secs(10), || {
        let out = env.ok(&["exec", "sn", "--", "/bin/busybox", "ls", "-l", "/captures"]);
        out.contains("capture.pcap1").then_some(out)
    })
    .expect("the ring rotated to a second file");
    let sizes: Vec<u64> = listing
        .lines()
        .filter(|l| l.contains("capture.pcap"))
        .map(|l| l.split_whitespace().nth(4).unwrap().parse().unwrap())
        .collect();
    assert_eq!(sizes.len(), 2, "exactly two files: {listing}");
    assert!(
        sizes.iter().all(|s| *s <= 1_000_000 + 2_000),
        "each file stays near 1 MB: {listing}"
    );
    env.ok(&["cp", "sn:/captures/capture.pcap1", pcap.to_str().unwrap()]);
    let out = std::process::Command::new("tcpdump")
        .args(["-nn", "-r"])
        .arg(&pcap)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("ICMP echo"), "the filter keeps pings");
    assert!(!text.contains(".80:"), "and only pings");

    let err = env.fail(&["cp", "sn:/captures/none", "/tmp"]);
    assert!(err.contains("No such file"), "{err}");
}

/// The web appliance: page and port come from config, and the text is escaped.
#[test]
fn web_serves_its_configured_page_on_its_configured_port() {
    let env = Env::new("web");
    build(&env, "web");
    let (_, ip) = run_on_lan(&env, "web", "site");
    assert!(common::page_shows(ip, "<h1>It works</h1>"));

    env.ok(&[
        "config",
        "site",
        "set",
        "port=8080",
        "title=Back office",
        "body=<b>staff</b> only",
    ]);
    let page = poll(Duration::from_secs(10), || {
        let out = std::process::Command::new("busybox")
            .args(["wget", "-qO-", &format!("http://{ip}:8080/")])
            .output()
            .ok()?;
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        text.contains("Back office").then_some(text)
    })
    .expect("the page moves to port 8080");
    assert!(
        page.contains("&lt;b&gt;staff&lt;") && !page.contains("<b>"),
        "the text is HTML-escaped: {page}"
    );
    assert!(
        common::http_get(ip).is_err(),
        "nothing listens on port 80 any more"
    );

    // The health check follows the configured port across a restart.
    env.ok(&["restart", "site"]);
    assert_eq!(
        env.instance("site").status.state,
        vroom_types::InstanceState::Running
    );
    let err = env.fail(&["config", "site", "set", "port=0"]);
    assert!(err.contains("must be a port number"), "{err}");
}

/// The dns appliance: DHCP for its network and DNS for names from its config.
#[test]
fn dns_serves_leases_and_local_names() {
    let env = Env::new("dns");
    build(&env, "dns");
    let (lan, dns_ip) = run_on_lan(&env, "dns", "ns");
    let asker = env.client_on("q", "lan", &lan);
    env.ok(&[
        "config",
        "ns",
        "set",
        "dhcp=true",
        "domain=office",
        &format!(
            "hosts=nas.office={},printer={}",
            host(&lan, 20),
            host(&lan, 21)
        ),
    ]);
    // `config set` returns once dnsmasq answers again, with the new names:
    // a bare name is qualified by the domain.
    let printer = host(&lan, 21).to_string();
    for name in ["printer.office", "printer", "nas.office"] {
        let answer = resolve_once(&env, &asker, name, dns_ip);
        let want = if name == "nas.office" {
            host(&lan, 20).to_string()
        } else {
            printer.clone()
        };
        assert_eq!(answer, Some(want), "{name} right after config set");
    }
    let client = env.namespace_on("cl", "lan", None);
    let lease = dhcp_lease(&env, &client);
    let leased: Ipv4Addr = lease["ip"].parse().unwrap();
    let pool = u32::from(host(&lan, 100))..=u32::from(host(&lan, 199));
    assert!(pool.contains(&u32::from(leased)), "{lease:?}");
    assert_eq!(lease["router"], host(&lan, 1).to_string(), "{lease:?}");
    assert_eq!(lease["dns"], dns_ip.to_string(), "{lease:?}");
    assert_eq!(
        resolve(&env, &client, "printer.office", dns_ip),
        Some(host(&lan, 21).to_string())
    );
    let err = env.fail(&["config", "ns", "set", "hosts=nas.office"]);
    assert!(err.contains("must look like NAME=IP"), "{err}");
}

/// The postgres appliance: users and databases from its config, real `psql`
/// logins with passwords from a client on its network, tables that survive
/// a config change that restarts the server, a removed user that can no
/// longer log in, and passwords that are never shown or logged.
#[test]
fn postgres_serves_configured_databases_to_password_logins() {
    // Quotes, a backslash and a colon: each must reach the server as is.
    const APP_PASSWORD: &str = r#"it's a "s3cret"\:pw"#;
    const REPORT_PASSWORD: &str = "report-pw-9f2c1e";
    let env = Env::new("pg");
    let image = build(&env, "postgres");
    let packages = &image.manifest.packages;
    assert!(packages.iter().any(|p| p.name == "postgresql-15"));
    assert!(
        packages.iter().any(|p| p.name == "e2fsprogs"),
        "vroom-init checks the data volume with e2fsck"
    );
    assert!(
        !packages
            .iter()
            .any(|p| p.name == "perl-base" || p.name == "libllvm14"),
        "Perl wrappers and JIT are pruned"
    );
    // `run` returns once PostgreSQL accepts connections on 5432 and the
    // accounts oneshot has run.
    let (lan, ip) = run_on_lan(&env, "postgres", "db");
    let client = env.client_on("cl", "lan", &lan);

    env.ok(&[
        "config",
        "db",
        "set",
        &format!("users=app:{APP_PASSWORD}"),
        "databases=shop:app",
    ]);
    let app = |sql: &str| psql(&client, ip, "app", APP_PASSWORD, "shop", sql);
    app("CREATE TABLE items (n int PRIMARY KEY, name text)").unwrap();
    app("INSERT INTO items VALUES (1, 'bolt'), (2, 'nut')").unwrap();
    assert_eq!(
        app("SELECT n, name FROM items ORDER BY n").unwrap(),
        "1|bolt\n2|nut"
    );
    assert_eq!(app("SHOW synchronous_commit").unwrap(), "on");
    let err = psql(&client, ip, "app", "wrong-password", "shop", "SELECT 1").unwrap_err();
    assert!(err.contains("password authentication failed"), "{err}");

    // A second user and database, and a setting that needs a restart: the
    // server comes back with it and with the rows.
    env.ok(&[
        "config",
        "db",
        "set",
        &format!("users=app:{APP_PASSWORD},report:{REPORT_PASSWORD}"),
        "databases=shop:app,reports:report",
        "max_connections=25",
    ]);
    let report = |sql: &str| psql(&client, ip, "report", REPORT_PASSWORD, "reports", sql);
    let restarted = poll(Duration::from_secs(60), || {
        report("SHOW max_connections").ok().filter(|n| n == "25")
    });
    assert!(restarted.is_some(), "{:?}", report("SHOW max_connections"));
    report("CREATE TABLE daily (day date, total int)").unwrap();
    report("INSERT INTO daily VALUES ('2026-01-02', 3)").unwrap();
    assert_eq!(report("SELECT total FROM daily").unwrap(), "3");
    assert_eq!(app("SELECT count(*) FROM items").unwrap(), "2");

    // A bad name is refused by the appliance's check, naming it.
    let err = env.fail(&["config", "db", "set", "users=Bad-Name:long-enough"]);
    assert!(err.contains("user \"Bad-Name\""), "{err}");

    // A database's owner must be a configured user.
    let err = env.fail(&["config", "db", "set", &format!("users=app:{APP_PASSWORD}")]);
    assert!(
        err.contains("owner \"report\" is not a configured user"),
        "{err}"
    );
    // Removing a user revokes its login; no database is dropped.
    env.ok(&[
        "config",
        "db",
        "set",
        &format!("users=app:{APP_PASSWORD}"),
        "databases=shop:app",
    ]);
    let err = report("SELECT 1").unwrap_err();
    assert!(err.contains("password authentication failed"), "{err}");
    let databases = app("SELECT datname FROM pg_database ORDER BY 1").unwrap();
    assert!(databases.contains("reports\nshop"), "{databases}");

    // The passwords are masked for people and never reach the console.
    let shown = env.ok(&["config", "db", "get"]);
    assert!(shown.contains("users=********\n"), "{shown}");
    let inspected = env.ok(&["inspect", "db"]);
    let diff = env.ok(&["config", "db", "diff"]);
    let logs = env.ok(&["logs", "db"]);
    assert!(logs.contains("accounts: config applied"), "{logs}");
    for text in [&shown, &inspected, &diff, &logs] {
        for secret in ["s3cret", REPORT_PASSWORD] {
            assert!(!text.contains(secret), "{secret} shown: {text}");
        }
    }
    // An export is the backup to import again: it keeps them.
    let export = env.ok(&["config", "db", "export", "-"]);
    assert!(export.contains("s3cret"), "{export}");

    // The data lives on the `db-data` volume, not in the instance: killed
    // and removed, a new `db` finds every committed row (after PostgreSQL's
    // crash recovery).
    env.ok(&["rm", "-f", "db"]);
    let volumes = env.ok(&["volume", "ls"]);
    assert!(volumes.contains("db-data"), "{volumes}");
    env.ok(&["run", "postgres", "--name", "db", "--net", "lan"]);
    let rows = env.ok(&[
        "exec",
        "db",
        "--",
        "/usr/bin/psql",
        "-U",
        "postgres",
        "-d",
        "shop",
        "-A",
        "-t",
        "-c",
        "SELECT count(*) FROM items",
    ]);
    assert_eq!(rows.trim(), "2", "{rows}");
}

/// The load balancer: HAProxy in front of two hello instances. A config
/// change is in force when `config set` returns; under steady HTTP load
/// (wrk, a new connection per request) a reload, a backend stopped and
/// started again, and a backend taken out of the config fail no request;
/// a stopped backend is marked down by its health check; statistics are
/// served for Prometheus; bad backends are refused with the reason.
#[test]
fn lb_balances_reloads_and_drops_dead_backends_without_a_failed_request() {
    let env = Env::new("lb");
    build(&env, "lb");
    let (_, b1) = run_on_lan(&env, "hello", "b1");
    env.ok(&["run", "hello", "--name", "b2", "--net", "lan"]);
    let b2 = env.instance("b2").nics[0].ip.unwrap();
    env.ok(&["run", "lb", "--name", "lb", "--net", "lan"]);
    let lb = env.instance("lb").nics[0].ip.unwrap();
    let err = common::http_get(lb).unwrap_or_else(|e| e.to_string());
    assert!(err.contains("503"), "no backends yet: {err}");
    env.ok(&["config", "lb", "set", &format!("backends={b1}:80,{b2}:80")]);
    let page = common::http_get(lb).unwrap();
    assert!(
        page.contains("Hello from vroom"),
        "in force on return: {page}"
    );

    // Each backend's state, by its address (the server's name).
    let stats = |server: Ipv4Addr| {
        let server = format!("{server}:80");
        let csv = std::process::Command::new("busybox")
            .args(["wget", "-qO-", &format!("http://{lb}:8404/stats;csv")])
            .output()
            .unwrap();
        String::from_utf8_lossy(&csv.stdout)
            .lines()
            .find(|l| l.starts_with(&format!("pool,{server},")))
            .and_then(|l| l.split(',').nth(17).map(str::to_string))
            .unwrap_or_default()
    };
    let wrk = std::process::Command::new("wrk")
        .args(["-t1", "-c4", "-d30s", "-H", "Connection: close"])
        .arg(format!("http://{lb}/"))
        .output();
    let load = std::thread::spawn(move || wrk);
    std::thread::sleep(Duration::from_secs(3));
    // A reload, a backend down and back, a backend taken out.
    env.ok(&["config", "lb", "set", "check_ms=300"]);
    env.ok(&["stop", "b1"]);
    poll(Duration::from_secs(10), || {
        (stats(b1) == "DOWN").then_some(())
    })
    .expect("the stopped backend is marked down");
    env.ok(&["start", "b1"]);
    poll(Duration::from_secs(10), || {
        (stats(b1) == "UP").then_some(())
    })
    .expect("the started backend is back");
    env.ok(&["config", "lb", "set", &format!("backends={b2}:80")]);
    let out = load
        .join()
        .unwrap()
        .expect("wrk runs (cargo xtask test installs it)");
    let report = String::from_utf8_lossy(&out.stdout);
    let requests: u64 = report
        .lines()
        .find_map(|l| {
            l.trim()
                .split_once(" requests in ")
                .map(|(n, _)| n.parse().unwrap())
        })
        .unwrap_or_else(|| panic!("no request count: {report}"));
    assert!(requests > 100, "{report}");
    assert!(
        !report.contains("Socket errors") && !report.contains("Non-2xx"),
        "requests failed: {report}"
    );
    assert_eq!(stats(b2), "UP");
    assert_eq!(stats(b1), "", "b1 left the config");

    let metrics = std::process::Command::new("busybox")
        .args(["wget", "-qO-", &format!("http://{lb}:8404/metrics")])
        .output()
        .unwrap();
    let metrics = String::from_utf8_lossy(&metrics.stdout);
    assert!(
        metrics.contains("haproxy_backend_active_servers{proxy=\"pool\"} 1"),
        "{metrics}"
    );

    for (value, says) in [
        ("backends=10.1.2.3", "must look like IP:PORT"),
        ("backends=web:80", "must look like IP:PORT"),
        ("backends=192.0.2.1:80", "must lie inside lan's subnet"),
        ("balance=random", "must be one of"),
    ] {
        let err = env.fail(&["config", "lb", "set", value]);
        assert!(err.contains(says), "{value}: {err}");
    }
    assert_eq!(stats(b2), "UP", "a refused change changed nothing");
}
