//! The catalog appliances, built from their recipes in `recipes/` and tested
//! with real clients in network namespaces.

mod common;

use std::net::Ipv4Addr;
use std::time::Duration;

use common::{poll, random_subnet, recipe, Env};
use vroom_types::Ipv4Net;

/// The n-th address of a subnet.
fn host(subnet: &str, n: u32) -> Ipv4Addr {
    let net: Ipv4Net = subnet.parse().unwrap();
    Ipv4Addr::from(u32::from(net.network()) + n)
}

fn build(env: &Env, name: &str) -> vroom_types::ImageSummary {
    let out = env.ok(&["--json", "image", "build", &recipe(name)]);
    serde_json::from_str(&out).unwrap()
}

/// A web root with a CGI that answers with the caller's address.
fn echo_server_root(env: &Env, name: &str) -> String {
    let www = env.dir.join(name);
    std::fs::create_dir_all(www.join("cgi-bin")).unwrap();
    std::fs::write(www.join("index.html"), format!("{name} server\n")).unwrap();
    let cgi = www.join("cgi-bin/addr");
    std::fs::write(
        &cgi,
        "#!/bin/sh\necho 'Content-Type: text/plain'\necho\necho \"remote=$REMOTE_ADDR\"\n",
    )
    .unwrap();
    std::fs::set_permissions(&cgi, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    www.display().to_string()
}

/// Starts busybox httpd (it daemonizes; the namespace's teardown kills it).
fn serve(env: &Env, ns: &str, port: u16, root: &str) {
    let out = env.run_in(ns, &format!("busybox httpd -p {port} -h {root}"));
    assert!(out.status.success(), "httpd in {ns}: {out:?}");
}

/// `busybox wget` from a namespace (its `-T` option crashes the static build,
/// so `timeout` bounds it): the exit code and the body.
fn fetch(env: &Env, ns: &str, url: &str) -> (i32, String) {
    let out = env.run_in(
        ns,
        &format!("timeout 5 busybox wget -qO- {url} 2>&1; echo \"rc=$?\""),
    );
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, rc) = text.rsplit_once("rc=").unwrap_or((&text, "255"));
    (rc.trim().parse().unwrap_or(255), body.to_string())
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
    let fw_wan = fw.nics[0].ip;
    assert_eq!(
        fw.nics[1].ip,
        host(&lan, 1),
        "the firewall is lan's gateway"
    );
    assert_eq!(fw.nics[2].ip, host(&dmz, 1), "and dmz's");

    // A server on the wan side, a web server in the dmz, a client on lan.
    let server_ip = host(&wan, 50);
    let server = env.namespace_on(
        "srv",
        "wan",
        Some((&format!("{server_ip}/24"), &host(&wan, 1).to_string())),
    );
    let root = echo_server_root(&env, "wan");
    serve(&env, &server, 8000, &root);
    let web_ip = host(&dmz, 10);
    let web = env.namespace_on(
        "web",
        "dmz",
        Some((&format!("{web_ip}/24"), &host(&dmz, 1).to_string())),
    );
    let root = echo_server_root(&env, "dmz");
    serve(&env, &web, 80, &root);
    let client = env.namespace_on("cl", "lan", None);

    env.ok(&[
        "config",
        "fw",
        "set",
        &format!("hosts=server.wan={server_ip}"),
        &format!("forward=8080:{web_ip}:80"),
    ]);

    // DHCP: udhcpc applies the lease with a hook script and records it.
    let hook = env.dir.join("udhcpc.sh");
    let lease_file = env.dir.join("lease");
    std::fs::write(
        &hook,
        format!(
            "#!/bin/sh\ncase \"$1\" in bound|renew)\n  ip addr add \"$ip/$mask\" dev \"$interface\"\n  ip route replace default via \"${{router%% *}}\"\n  echo \"ip=$ip router=$router dns=$dns\" > {}\n;; esac\n",
            lease_file.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&hook, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let dhcp = env.run_in(
        &client,
        &format!(
            "busybox udhcpc -i eth0 -q -n -t 10 -T 1 -s {}",
            hook.display()
        ),
    );
    let lease = std::fs::read_to_string(&lease_file).unwrap_or_else(|_| {
        panic!(
            "no DHCP lease: {}{}",
            String::from_utf8_lossy(&dhcp.stdout),
            String::from_utf8_lossy(&dhcp.stderr)
        )
    });
    let field = |k: &str| {
        lease
            .split_whitespace()
            .find_map(|kv| kv.strip_prefix(&format!("{k}=")))
            .unwrap_or_default()
            .to_string()
    };
    let leased: Ipv4Addr = field("ip").parse().unwrap();
    let pool = u32::from(host(&lan, 100))..=u32::from(host(&lan, 199));
    assert!(pool.contains(&u32::from(leased)), "lease {lease}");
    assert_eq!(field("router"), host(&lan, 1).to_string(), "lease {lease}");
    assert_eq!(field("dns"), host(&lan, 1).to_string(), "lease {lease}");

    // DNS: the firewall answers for the name from its config.
    let resolved = poll(Duration::from_secs(10), || {
        let out = env.run_in(
            &client,
            &format!("busybox nslookup -type=a server.wan {}", host(&lan, 1)),
        );
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        text.lines()
            .skip_while(|l| !l.contains("server.wan"))
            .find_map(|l| l.strip_prefix("Address:"))
            .map(|a| a.trim().to_string())
    })
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
}
