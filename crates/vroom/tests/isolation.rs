//! Tenant networks isolated on the host, tried the way an adversary would:
//! from network namespaces plugged into the bridges (the cheapest guests)
//! and from one real guest. A guest on network A must not reach the host's
//! uplink address, its link-local IPv6 address, network B's gateway or
//! anything on network B, nor a TCP or UDP port of its own gateway that was
//! not opened, nor send out packets with a source that is not its own; a
//! network without NAT is routed nowhere. A guest still reaches the outside
//! through NAT, its neighbours on A, and the ports `--allow-host` opened,
//! and the host still reaches it. See docs/networking.md, "Isolation".

mod common;

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, TcpListener, UdpSocket};
use std::process::Command;
use std::time::Duration;

use common::{echo_server_root, fetch, host, random_subnet, serve, sh, Env};

/// A TCP listener in the host's own namespace, bound to one address, that
/// answers any request with an HTTP page naming `label`. Port 0 picks a free
/// one; the port is returned. It lives as long as the test process.
fn listen(ip: impl Into<IpAddr>, port: u16, label: &'static str) -> u16 {
    let ip = ip.into();
    let listener =
        TcpListener::bind((ip, port)).unwrap_or_else(|e| panic!("bind {ip}:{port}: {e}"));
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
            let mut request = [0u8; 1024];
            let _ = (&stream).read(&mut request);
            let _ = write!(
                &stream,
                "HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\n{label}\n"
            );
        }
    });
    port
}

/// A UDP socket on a host address that answers every datagram with `label`.
fn echo_udp(ip: Ipv4Addr, port: u16, label: &'static str) -> u16 {
    let socket =
        UdpSocket::bind((ip, port)).unwrap_or_else(|e| panic!("bind udp {ip}:{port}: {e}"));
    let port = socket.local_addr().unwrap().port();
    std::thread::spawn(move || {
        let mut buf = [0u8; 512];
        while let Ok((_, peer)) = socket.recv_from(&mut buf) {
            let _ = socket.send_to(label.as_bytes(), peer);
        }
    });
    port
}

/// Sends one datagram from a namespace to `IP:PORT` and waits 5 s for the
/// answer (busybox nc has no UDP here): the exit code and the answer.
fn udp_ask(ns: &str, to: &str) -> (i32, String) {
    let (ip, port) = to.rsplit_once(':').unwrap();
    let script = "import socket,sys\n\
                  s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\n\
                  s.settimeout(5)\n\
                  s.sendto(b'hi',(sys.argv[1],int(sys.argv[2])))\n\
                  print(s.recv(512).decode())";
    let out = Command::new("ip")
        .args([
            "netns",
            "exec",
            ns,
            "/usr/bin/python3",
            "-c",
            script,
            ip,
            port,
        ])
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(255),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

/// One probe: what it tries, the URL, whether it must answer, and the text
/// the answer must carry.
struct Probe {
    what: &'static str,
    url: String,
    reachable: bool,
    answer: String,
}

impl Probe {
    /// What is wrong with the outcome seen from `from`, if anything.
    fn judge(&self, from: &str, rc: i32, body: &str) -> Option<String> {
        let answered = rc == 0 && body.contains(&self.answer);
        (answered != self.reachable).then(|| {
            let expected = if self.reachable {
                "an answer"
            } else {
                "no answer"
            };
            format!(
                "{from} -> {} ({}): expected {expected}, got rc={rc} body={:?}",
                self.url,
                self.what,
                body.trim()
            )
        })
    }
}

/// Runs every probe at once (each dropped one waits out its timeout) and
/// returns the failures.
fn run_probes(
    probes: &[(&str, &Probe)],
    try_one: impl Fn(&str, &str) -> (i32, String) + Sync,
) -> Vec<String> {
    std::thread::scope(|scope| {
        let handles: Vec<_> = probes
            .iter()
            .map(|(from, p)| {
                let try_one = &try_one;
                scope.spawn(move || {
                    let (rc, body) = try_one(from, &p.url);
                    p.judge(from, rc, &body)
                })
            })
            .collect();
        handles
            .into_iter()
            .filter_map(|h| h.join().unwrap())
            .collect()
    })
}

#[test]
fn guests_reach_only_the_outside_their_neighbours_and_allowed_host_ports() {
    let env = Env::new("iso");
    let (a, b, w) = (random_subnet(), random_subnet(), random_subnet());
    let allowed: u16 = 20000 + rand::random::<u16>() % 40000;
    env.ok(&[
        "net",
        "create",
        "a",
        "--subnet",
        &a,
        "--nat",
        "--allow-host",
        &allowed.to_string(),
        "--allow-host",
        &format!("{allowed}/udp"),
    ]);
    env.ok(&["net", "create", "b", "--subnet", &b, "--nat"]);
    // Host mode: reachable from the host, routed nowhere.
    let c = random_subnet();
    env.ok(&["net", "create", "c", "--subnet", &c]);

    // The uplink: a veth to a namespace standing for the outside. The host
    // end holds the host's "external" address, w.1.
    let (outside, uplink) = env.namespace(
        "up",
        &format!("{}/24", host(&w, 2)),
        &host(&w, 1).to_string(),
    );
    sh(&format!("ip addr add {}/24 dev {uplink}", host(&w, 1)));
    let root = echo_server_root(&env, "outside");
    serve(&env, &outside, 8000, &root);

    // Host services: on the uplink address, on B's gateway, and on A's
    // gateway on a port that was opened and on one that was not.
    let on_uplink = listen(host(&w, 1), 0, "host service on the uplink address");
    let on_gateway_b = listen(host(&b, 1), 0, "host service on b's gateway");
    let closed = listen(host(&a, 1), 0, "host service on a's gateway, not allowed");
    listen(host(&a, 1), allowed, "host service on a's gateway, allowed");
    echo_udp(host(&a, 1), allowed, "udp service on a's gateway, allowed");
    let closed_udp = echo_udp(host(&a, 1), 0, "udp service on a's gateway, not allowed");

    // Namespaces as guests: a client and a web server on A, a web server on
    // B, a client on C.
    let ns = |name: &str, net: &str, n: u32| {
        let subnet = match net {
            "a" => &a,
            "b" => &b,
            _ => &c,
        };
        let cidr = format!("{}/24", host(subnet, n));
        env.namespace_on(name, net, Some((&cidr, &host(subnet, 1).to_string())))
    };
    let a_client = ns("ac", "a", 10);
    let a_server = ns("as", "a", 11);
    let b_server = ns("bs", "b", 10);
    let c_client = ns("cc", "c", 10);
    serve(&env, &a_server, 80, &echo_server_root(&env, "neighbour"));
    serve(&env, &b_server, 80, &echo_server_root(&env, "b-instance"));

    let probe = |what, url: String, reachable, answer: &str| Probe {
        what,
        url,
        reachable,
        answer: answer.to_string(),
    };
    // What a guest on A tries, from a namespace and from a real guest.
    let from_a = [
        probe(
            "the host's uplink address",
            format!("http://{}:{on_uplink}/", host(&w, 1)),
            false,
            "host service",
        ),
        probe(
            "b's gateway",
            format!("http://{}:{on_gateway_b}/", host(&b, 1)),
            false,
            "host service",
        ),
        probe(
            "an instance on b",
            format!("http://{}/", host(&b, 10)),
            false,
            "b-instance server",
        ),
        probe(
            "a port of its own gateway that was not allowed",
            format!("http://{}:{closed}/", host(&a, 1)),
            false,
            "host service",
        ),
        probe(
            "the port --allow-host opened",
            format!("http://{}:{allowed}/", host(&a, 1)),
            true,
            "a's gateway, allowed",
        ),
        probe(
            "a neighbour on the same bridge",
            format!("http://{}/", host(&a, 11)),
            true,
            "neighbour server",
        ),
        probe(
            "the outside, through NAT (seen as the uplink address)",
            format!("http://{}:8000/cgi-bin/addr", host(&w, 2)),
            true,
            &format!("{}", host(&w, 1)),
        ),
    ];
    // IPv6: the bridge's link-local address is the host too.
    let on_any = listen(Ipv6Addr::UNSPECIFIED, 0, "host service on every address");
    let bridge_a = env.network("a").bridge;
    // The client needs its own link-local address (past DAD) to talk at all.
    link_local(Some(&a_client), "eth0");
    let bridge_address = link_local(None, &bridge_a);
    let from_a_v6 = probe(
        "the host's link-local IPv6 address on a's bridge",
        format!("http://[{bridge_address}%eth0]:{on_any}/"),
        false,
        "host service",
    );
    let udp_allowed = probe(
        "the udp port --allow-host opened",
        format!("udp://{}:{allowed}", host(&a, 1)),
        true,
        "udp service on a's gateway, allowed",
    );
    let udp_closed = probe(
        "a udp port of its own gateway that was not allowed",
        format!("udp://{}:{closed_udp}", host(&a, 1)),
        false,
        "udp service",
    );
    let from_b = probe(
        "an instance on a, from b",
        format!("http://{}/", host(&a, 11)),
        false,
        "neighbour server",
    );
    let mut probes: Vec<(&str, &Probe)> = from_a.iter().map(|p| (a_client.as_str(), p)).collect();
    probes.push((&b_server, &from_b));
    probes.push((&a_client, &from_a_v6));
    probes.push((&a_client, &udp_allowed));
    probes.push((&a_client, &udp_closed));
    let from_c = probe(
        "the outside, from a network without NAT",
        format!("http://{}:8000/", host(&w, 2)),
        false,
        "outside server",
    );
    probes.push((&c_client, &from_c));
    let failures = run_probes(&probes, |ns, url| match url.strip_prefix("udp://") {
        Some(to) => udp_ask(ns, to),
        None => fetch(&env, ns, url),
    });
    assert!(
        failures.is_empty(),
        "from namespaces:\n{}",
        failures.join("\n")
    );

    // A spoofed source: a namespace on A claiming an address from outside
    // A's subnet. Nothing of it may leave the host, masqueraded or not.
    let spoofed = host(&random_subnet(), 5);
    let spoofer = env.namespace_on("sp", "a", None);
    sh(&format!(
        "ip -n {spoofer} addr add {spoofed}/24 dev eth0 && \
         ip -n {spoofer} route add default via {} dev eth0 onlink",
        host(&a, 1)
    ));
    assert!(
        !outside_sees(&outside, &spoofed.to_string(), || {
            fetch(&env, &spoofer, &format!("http://{}:8000/", host(&w, 2)));
        }),
        "a packet from the spoofed address {spoofed} reached the outside"
    );

    // One real guest on A: the same holes, tried from inside a VM.
    let guest_ip = host(&a, 20);
    env.ok(&[
        "run",
        "hello",
        "--name",
        "web",
        "--net",
        &format!("a:{guest_ip}"),
    ]);
    let probes: Vec<(&str, &Probe)> = from_a.iter().map(|p| ("guest", p)).collect();
    let failures = run_probes(&probes, |_, url| {
        // A dropped connection hangs wget: exec's timeout ends it.
        let out = env.vroom(&["exec", "--timeout", "8", "web", "--", "wget", "-qO-", url]);
        let body = String::from_utf8_lossy(&out.stdout).into_owned();
        (out.status.code().unwrap_or(255), body)
    });
    assert!(
        failures.is_empty(),
        "from the guest:\n{}",
        failures.join("\n")
    );

    // The host still reaches the guest (its replies are let back in), and
    // B still cannot.
    let page = common::http_get(guest_ip).expect("the host fetches the guest's page");
    assert!(page.contains("Hello from vroom!"), "{page}");
    let (rc, body) = fetch(&env, &b_server, &format!("http://{guest_ip}/"));
    assert_ne!(rc, 0, "b reached the guest on a: {body}");

    env.ok(&["rm", "-f", "web"]);
    for ns in [&a_client, &a_server, &b_server, &c_client, &spoofer] {
        sh(&format!("ip netns del {ns}"));
    }
    env.ok(&["net", "rm", "a"]);
    env.ok(&["net", "rm", "b"]);
    env.ok(&["net", "rm", "c"]);
    assert!(
        env.nft_tables().is_empty(),
        "tables left after net rm: {:?}",
        env.nft_tables()
    );
}

/// The link-local IPv6 address of `dev` (in namespace `ns`, or the host's),
/// once duplicate address detection is done with it.
fn link_local(ns: Option<&str>, dev: &str) -> String {
    let mut cmd = vec![];
    if let Some(ns) = ns {
        cmd.extend(["netns", "exec", ns, "ip"]);
    }
    cmd.extend(["-6", "-o", "addr", "show", "dev", dev, "scope", "link"]);
    common::poll(Duration::from_secs(20), || {
        let out = Command::new("ip").args(&cmd).output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        if text.contains("tentative") {
            return None;
        }
        text.split_whitespace()
            .find(|w| w.starts_with("fe80:"))
            .map(|w| w.split('/').next().unwrap().to_string())
    })
    .unwrap_or_else(|| panic!("{dev} in {ns:?} has no usable link-local IPv6 address"))
}

/// Whether the outside namespace receives any packet from `source` while
/// `act` runs (tcpdump there, started and listening before `act`).
fn outside_sees(outside: &str, source: &str, act: impl FnOnce()) -> bool {
    use std::io::BufRead;
    let mut capture = Command::new("ip")
        .args(["netns", "exec", outside, "timeout", "10", "tcpdump"])
        .args(["-nl", "-i", "eth0", "-c", "1", "src", "host", source])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("the host has tcpdump (cargo xtask test installs it)");
    let mut stderr = std::io::BufReader::new(capture.stderr.take().unwrap());
    let mut line = String::new();
    while stderr.read_line(&mut line).unwrap_or(0) > 0 && !line.contains("listening on") {
        line.clear();
    }
    assert!(
        line.contains("listening on"),
        "tcpdump did not start in {outside}"
    );
    act();
    // tcpdump ends at the first packet, or at its timeout.
    let out = capture.wait_with_output().unwrap();
    String::from_utf8_lossy(&out.stdout).contains(source)
}

fn table(family: &str, name: &str) -> Option<String> {
    let out = Command::new("nft")
        .args(["list", "table", family, name])
        .output()
        .unwrap();
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `--allow-host` is validated, stored and shown; a restarted daemon puts
/// back the rules of a network whose table was replaced by an older vroom's
/// NAT-only one; `vroom gc` sweeps stray tables of both families.
#[test]
fn host_ports_are_checked_and_rules_survive_restart_and_gc_sweeps_them() {
    let env = Env::new("isorules");
    let subnet = random_subnet();
    for (bad, why) in [
        ("0", "between 1 and 65535"),
        ("65536", "between 1 and 65535"),
        ("80/sctp", "tcp or udp"),
    ] {
        let err = env.fail(&[
            "net",
            "create",
            "lan",
            "--subnet",
            &subnet,
            "--allow-host",
            bad,
        ]);
        assert!(err.contains(why), "{bad}: {err}");
    }
    let err = env.fail(&["net", "create", "lan", "--isolated", "--allow-host", "80"]);
    assert!(err.contains("cannot be used with"), "{err}");
    assert!(env.nft_tables().is_empty(), "a refused create left a table");

    env.ok(&[
        "net",
        "create",
        "lan",
        "--subnet",
        &subnet,
        "--nat",
        "--allow-host",
        "8080",
        "--allow-host",
        "53/udp",
        "--allow-host",
        "8080/tcp",
    ]);
    let network = env.network("lan");
    let ports: Vec<String> = network.allow_host.iter().map(|p| p.to_string()).collect();
    assert_eq!(ports, ["53/udp", "8080/tcp"]);
    let shown = env.ok(&["net", "inspect", "lan"]);
    assert!(shown.contains("53/udp, 8080/tcp"), "{shown}");
    let name = format!("vroom_{}", network.bridge);
    let rules = table("inet", &name).expect("the network's inet table");
    assert!(rules.contains("tcp dport 8080 accept"), "{rules}");
    assert!(rules.contains("udp dport 53 accept"), "{rules}");
    assert!(rules.contains("masquerade"), "{rules}");

    // What an older vroom left: an ip-family NAT table and no filter.
    sh(&format!(
        "nft delete table inet {name} && nft add table ip {name} && \
         nft 'add chain ip {name} postrouting {{ type nat hook postrouting priority srcnat; }}'"
    ));
    env.kill_daemon();
    env.start_daemon();
    let rules = table("inet", &name).expect("the restarted daemon put the table back");
    assert!(rules.contains("tcp dport 8080 accept"), "{rules}");
    assert!(table("ip", &name).is_none(), "the old ip table stayed");

    // Strays whose bridges are gone, one per family, are idle leftovers.
    let strays = [
        ("inet", format!("vroom_{}bdead0000", env.prefix)),
        ("ip", format!("vroom_{}bdead0001", env.prefix)),
    ];
    for (family, stray) in &strays {
        sh(&format!("nft add table {family} {stray}"));
    }
    let listed = env.ok(&["gc"]);
    for (_, stray) in &strays {
        assert!(listed.contains(stray.as_str()), "{listed}");
    }
    assert!(
        !listed.contains(&name),
        "a live network's table is no leftover: {listed}"
    );
    env.ok(&["gc", "--remove"]);
    for (family, stray) in &strays {
        assert!(table(family, stray).is_none(), "gc left {family} {stray}");
    }
    assert!(table("inet", &name).is_some(), "gc removed a live table");

    env.ok(&["net", "rm", "lan"]);
    env.assert_nothing_left("after net rm");
}
