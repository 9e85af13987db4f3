//! Server rooms end to end: real firewalls and web servers, clients in
//! network namespaces on a room's lan and on the wan outside.

mod common;

use std::time::Duration;

use common::{dhcp_lease, fetch, poll, random_subnet, recipe, resolve, Env};
use vroom_types::{Room, RoomPlan};

fn build(env: &Env, name: &str) {
    env.ok(&["image", "build", &recipe(name)]);
}

fn room(env: &Env, name: &str) -> Room {
    serde_json::from_str(&env.ok(&["--json", "room", "inspect", name])).unwrap()
}

fn ip_of(env: &Env, name: &str, nic: usize) -> String {
    env.instance(name).nics[nic].ip.unwrap().to_string()
}

/// Two rooms on one wan: an outside client reaches room A's dmz web server
/// only through the exposed port; a lan client of A gets a DHCP lease,
/// resolves A's instance by name and reaches it, and reaches nothing of room
/// B; `room rm` refuses while instances remain, and `--force` leaves nothing.
#[test]
fn rooms_are_isolated_and_serve_their_tenants() {
    let env = Env::new("rooms");
    build(&env, "firewall");
    build(&env, "web");
    let wan = random_subnet();
    env.ok(&["net", "create", "wan", "--subnet", &wan, "--nat"]);
    // Subnets chosen on create; a pre-made network of a room's names is
    // refused with the way out.
    let (ra_lan, ra_dmz) = (random_subnet(), random_subnet());
    env.ok(&[
        "room",
        "create",
        "ra",
        "--wan",
        "wan",
        "--subnet",
        &format!("lan={ra_lan}"),
        "--subnet",
        &format!("dmz={ra_dmz}"),
    ]);
    assert_eq!(env.network("ra-lan").subnet.to_string(), ra_lan);
    assert_eq!(env.network("ra-dmz").subnet.to_string(), ra_dmz);
    env.ok(&["net", "create", "rb-lan"]);
    let err = env.fail(&["room", "create", "rb", "--wan", "wan"]);
    assert!(
        err.contains("network rb-lan already exists") && err.contains("--subnet"),
        "{err}"
    );
    env.ok(&["net", "rm", "rb-lan"]);
    let err = env.fail(&["room", "create", "rb", "--subnet", "lan=10.1.2.3/24"]);
    assert!(err.contains("--subnet"), "{err}");
    env.ok(&["room", "create", "rb", "--wan", "wan"]);
    env.ok(&[
        "run",
        "web",
        "--name",
        "web1",
        "--room",
        "ra",
        "--segment",
        "dmz",
    ]);
    env.ok(&[
        "run",
        "web",
        "--name",
        "web2",
        "--room",
        "rb",
        "--segment",
        "dmz",
    ]);
    let fw_a = ip_of(&env, "ra-fw", 0);
    let exposed = env.ok(&["room", "expose", "ra", "--port", "8080", "--to", "web1:80"]);
    assert!(
        exposed.contains(&format!("forwards tcp/8080 of {fw_a} on wan to web1:80")),
        "{exposed}"
    );
    let a = room(&env, "ra");
    assert_eq!(a.exposes.len(), 1);
    let shown = env.ok(&["room", "inspect", "ra"]);
    assert!(shown.contains(&format!("(wan {fw_a} on wan)")), "{shown}");
    // web's one NIC role is `lan`; in the dmz it is labelled dmz.
    let ps = env.ok(&["ps"]);
    assert!(
        ps.contains(&format!("dmz:{}", ip_of(&env, "web1", 0))),
        "{ps}"
    );
    assert!(env
        .ok(&["topology", "ra"])
        .contains(&format!("web1 dmz {}", ip_of(&env, "web1", 0))));
    let err = env.fail(&["room", "expose", "ra", "--port", "8080", "--to", "web1:80"]);
    assert!(err.contains("already goes to web1"), "{err}");
    let err = env.fail(&["room", "expose", "ra", "--port", "9090", "--to", "web2:80"]);
    assert!(err.contains("no instance web2"), "{err}");
    let err = env.fail(&["room", "create", &"x".repeat(29)]);
    assert!(err.contains("28"), "{err}");

    let fw_b = ip_of(&env, "rb-fw", 0);
    let (web1, web2) = (ip_of(&env, "web1", 0), ip_of(&env, "web2", 0));
    let outside = env.client_on("out", "wan", &wan);
    // Only through the exposed port.
    let page = poll(Duration::from_secs(20), || {
        let (rc, body) = fetch(&env, &outside, &format!("http://{fw_a}:8080/"));
        (rc == 0).then_some(body)
    })
    .expect("the exposed port reaches web1");
    assert!(page.contains("It works"), "{page}");
    for url in [
        format!("http://{fw_a}:8081/"),
        format!("http://{fw_b}:8080/"),
        format!("http://{web1}/"),
        format!("http://{web2}/"),
    ] {
        let (rc, body) = fetch(&env, &outside, &url);
        assert_ne!(rc, 0, "{url} is not reachable from outside: {body}");
    }

    // A lan client of room A: a lease, the room's DNS, its dmz, nothing of B.
    let lan = env.namespace_on("alan", "ra-lan", None);
    let lease = dhcp_lease(&env, &lan);
    let router = lease["router"].clone();
    assert_eq!(router, ip_of(&env, "ra-fw", 1), "the firewall routes lan");
    let dns: std::net::Ipv4Addr = lease["dns"].parse().unwrap();
    for name in ["web1.ra.lan", "web1"] {
        assert_eq!(
            resolve(&env, &lan, name, dns).as_deref(),
            Some(web1.as_str()),
            "{name} resolves in room ra"
        );
    }
    assert_eq!(
        resolve(&env, &lan, "web2.rb.lan", dns),
        None,
        "not room rb's names"
    );
    let (rc, body) = fetch(&env, &lan, &format!("http://{web1}/"));
    assert_eq!(rc, 0, "lan reaches the dmz: {body}");
    for url in [
        format!("http://{web2}/"),
        format!("http://{}/", ip_of(&env, "rb-fw", 1)),
    ] {
        let (rc, body) = fetch(&env, &lan, &url);
        assert_ne!(
            rc, 0,
            "room rb's {url} is not reachable from room ra: {body}"
        );
    }

    // A member that goes leaves the room's DNS and forwards.
    env.ok(&["rm", "-f", "web1"]);
    let hosts = env.ok(&["config", "ra-fw", "get", "hosts"]);
    assert!(!hosts.contains("web1"), "{hosts}");
    assert!(
        room(&env, "ra").exposes.is_empty(),
        "its expose went with it"
    );
    env.ok(&[
        "run",
        "web",
        "--name",
        "web3",
        "--room",
        "ra",
        "--segment",
        "lan",
    ]);
    assert!(env
        .ok(&["config", "ra-fw", "get", "hosts"])
        .contains("web3.ra.lan"));

    let err = env.fail(&["rm", "-f", "ra-fw"]);
    assert!(err.contains("room ra's firewall"), "{err}");
    let err = env.fail(&["room", "rm", "ra"]);
    assert!(err.contains("web3") && err.contains("--force"), "{err}");
    let topology = env.ok(&["topology", "ra"]);
    assert!(
        topology.contains("network ra-dmz") && !topology.contains("rb-dmz"),
        "{topology}"
    );
    let removed = env.ok(&["room", "rm", "--force", "ra"]);
    assert!(
        removed.contains("room ra removed") && removed.contains("1 instance"),
        "{removed}"
    );
    env.ok(&["room", "rm", "--force", "rb"]);
    assert!(env.instances().is_empty(), "{:?}", env.instances());
    let nets = env.ok(&["net", "ls"]);
    assert!(
        !nets.contains("ra-lan") && !nets.contains("rb-dmz"),
        "{nets}"
    );
    env.ok(&["net", "rm", "wan"]);
    env.remove_namespaces(&["out", "alan"]);
    env.assert_nothing_left("rooms removed");
}

/// `room apply`: the file creates the room, the same file again changes
/// nothing, and changing one port changes only that forward. Its service
/// answers to its name in the room's DNS (a lan client resolves it and is
/// served through the balancer), is exposed like an instance, scales with
/// the file and goes with the room.
#[test]
fn room_apply_converges_and_changes_only_what_changed() {
    let env = Env::new("rapply");
    build(&env, "firewall");
    build(&env, "web");
    let wan = random_subnet();
    env.ok(&["net", "create", "wan", "--subnet", &wan, "--nat"]);
    let file = env.dir.join("room.toml");
    let write = |port: u16, replicas: u32| {
        std::fs::write(
            &file,
            format!(
                "name = \"rc\"\nwan = \"wan\"\n\n[instances.site]\nimage = \"web\"\nsegment = \"dmz\"\nconfig = {{ title = \"Room C\" }}\n\n[[expose]]\nport = {port}\nto = \"site\"\nto_port = 80\n\n[[expose]]\nport = 8090\nto = \"shop\"\nto_port = 80\n\n[[services]]\nname = \"shop\"\nimage = \"web\"\nreplicas = {replicas}\n"
            ),
        )
        .unwrap();
    };
    let apply = |dry: bool| -> RoomPlan {
        let file = file.to_str().unwrap();
        let args: Vec<&str> = if dry {
            vec!["--json", "room", "apply", file, "--dry-run"]
        } else {
            vec!["--json", "room", "apply", file]
        };
        serde_json::from_str(&env.ok(&args)).unwrap()
    };
    // Bad files change nothing and say what is wrong in one line.
    std::fs::write(&file, "name = \"rc\"\nbogus = 1\n").unwrap();
    let err = env.fail(&["room", "apply", file.to_str().unwrap()]);
    assert!(err.contains("bogus"), "{err}");
    std::fs::write(
        &file,
        "name = \"rc\"\n[[expose]]\nport = 80\nto = \"ghost\"\nto_port = 80\n",
    )
    .unwrap();
    let err = env.fail(&["room", "apply", file.to_str().unwrap()]);
    assert!(err.contains("ghost"), "{err}");
    std::fs::write(
        &file,
        "name = \"rc\"\n[[services]]\nname = \"shop\"\nimage = \"web\"\nreplicas = \"two\"\n",
    )
    .unwrap();
    let err = env.fail(&["room", "apply", file.to_str().unwrap()]);
    assert!(
        err.contains("bad replicas") && err.lines().count() == 1,
        "{err}"
    );
    std::fs::write(
        &file,
        "name = \"rc\"\n[instances.shop-1]\nimage = \"web\"\nsegment = \"lan\"\n[[services]]\nname = \"shop\"\nimage = \"web\"\n",
    )
    .unwrap();
    let err = env.fail(&["room", "apply", file.to_str().unwrap()]);
    assert!(err.contains("service shop: instance shop-1"), "{err}");
    assert!(env.ok(&["--json", "room", "ls"]).trim() == "[]");
    assert!(env.ok(&["--json", "service", "ls"]).trim() == "[]");

    write(8080, 1);
    let plan = apply(true);
    assert!(!plan.applied && plan.changes.len() == 5, "{plan:?}");
    assert!(
        env.ok(&["--json", "room", "ls"]).trim() == "[]",
        "a dry run changes nothing"
    );
    let plan = apply(false);
    assert!(plan.applied, "{plan:?}");
    let fw = ip_of(&env, "rc-fw", 0);
    let outside = env.client_on("out", "wan", &wan);
    // An apply returns once its members serve: no retry.
    let (rc, page) = fetch(&env, &outside, &format!("http://{fw}:8080/"));
    assert!(
        rc == 0 && page.contains("Room C"),
        "served with its config right after the apply: {rc} {page}"
    );
    let site_pid = env.instance("site").status.pid;
    // The service: its name in the room's DNS, served through its
    // balancer to a lan client, and exposed on the wan.
    let shop: vroom_types::Service =
        serde_json::from_str(&env.ok(&["--json", "service", "inspect", "shop"])).unwrap();
    assert_eq!(shop.ready, 1, "{shop:?}");
    let lb = shop.address.unwrap().to_string();
    let lan = env.namespace_on("clan", "rc-lan", None);
    let lease = dhcp_lease(&env, &lan);
    let dns: std::net::Ipv4Addr = lease["dns"].parse().unwrap();
    for name in ["shop", "shop.rc.lan"] {
        assert_eq!(
            resolve(&env, &lan, name, dns).as_deref(),
            Some(lb.as_str()),
            "{name} is the balancer's address in the room's DNS"
        );
    }
    let (rc, page) = fetch(&env, &lan, &format!("http://{lb}/"));
    assert!(rc == 0 && page.contains("It works"), "{rc} {page}");
    let (rc, page) = fetch(&env, &outside, &format!("http://{fw}:8090/"));
    assert!(
        rc == 0 && page.contains("It works"),
        "the service is exposed: {rc} {page}"
    );
    let shown = env.ok(&["room", "inspect", "rc"]);
    assert!(
        shown.contains(&format!("{lb}:80 (DNS shop, shop.rc.lan) [1 of 1 ready")),
        "{shown}"
    );

    let again = apply(false);
    assert!(
        again.changes.is_empty(),
        "the same file changes nothing: {again:?}"
    );
    assert!(env
        .ok(&["room", "apply", file.to_str().unwrap()])
        .contains("no changes"));

    write(8081, 2);
    let plan = apply(false);
    let what: Vec<&str> = plan.changes.iter().map(|c| c.what.as_str()).collect();
    assert_eq!(
        what,
        ["service shop", "expose tcp/8081", "expose tcp/8080"],
        "{plan:?}"
    );
    let shop: vroom_types::Service =
        serde_json::from_str(&env.ok(&["--json", "service", "inspect", "shop"])).unwrap();
    assert_eq!((shop.ready, shop.desired), (2, 2), "scaled with the file");
    assert_eq!(
        env.instance("site").status.pid,
        site_pid,
        "the instance was not touched"
    );
    let (rc, _) = fetch(&env, &outside, &format!("http://{fw}:8081/"));
    assert_eq!(rc, 0, "the forward moved to 8081 when the apply returned");
    let (rc, _) = fetch(&env, &outside, &format!("http://{fw}:8080/"));
    assert_ne!(rc, 0, "8080 is no longer forwarded");
    env.ok(&["room", "rm", "--force", "rc"]);
    assert!(
        env.ok(&["--json", "service", "ls"]).trim() == "[]",
        "its service went with the room"
    );
    env.ok(&["net", "rm", "wan"]);
    env.remove_namespaces(&["out", "clan"]);
    env.assert_nothing_left("room removed");
}

/// vroomd SIGKILLed at a spread of moments inside `room create` and `room
/// rm`: the next daemon leaves the room whole (ready, its firewall running,
/// its networks there) or gone entirely (no firewall, no networks, no
/// bridges), never between.
#[test]
fn a_daemon_killed_inside_room_create_or_rm_leaves_all_or_nothing() {
    let env = Env::new("rcrash");
    build(&env, "firewall");
    let wan = random_subnet();
    env.ok(&["net", "create", "wan", "--subnet", &wan, "--nat"]);
    let wan_bridge = env.network("wan").bridge;
    let settled = |context: &str| -> bool {
        let rooms: Vec<Room> = poll(Duration::from_secs(120), || {
            let rooms: Vec<Room> = serde_json::from_str(&env.ok(&["--json", "room", "ls"])).ok()?;
            rooms
                .iter()
                .all(|r| r.state == vroom_types::RoomState::Ready)
                .then_some(rooms)
        })
        .unwrap_or_else(|| panic!("{context}: the room never settled"));
        let nets = env.ok(&["net", "ls"]);
        let fw = env
            .instances()
            .into_iter()
            .find(|i| i.spec.name.as_str() == "rk-fw");
        if rooms.is_empty() {
            assert!(fw.is_none(), "{context}: a firewall without its room");
            assert!(
                !nets.contains("rk-lan") && !nets.contains("rk-dmz"),
                "{context}: {nets}"
            );
            let bridges: Vec<String> = env
                .links()
                .into_iter()
                .filter(|l| l.starts_with(&format!("{}b", env.prefix)) && *l != wan_bridge)
                .collect();
            assert!(bridges.is_empty(), "{context}: bridges left {bridges:?}");
            false
        } else {
            let fw = fw.unwrap_or_else(|| panic!("{context}: a room without its firewall"));
            let fw = poll(Duration::from_secs(120), || {
                let fw = env.instance(fw.spec.name.as_str());
                (fw.status.state == vroom_types::InstanceState::Running).then_some(fw)
            });
            assert!(fw.is_some(), "{context}: the firewall runs");
            assert!(
                nets.contains("rk-lan") && nets.contains("rk-dmz"),
                "{context}: {nets}"
            );
            true
        }
    };
    let body = r#"{"name":"rk","wan":"wan"}"#;
    // The last create finishes before the kill, so each rm delay meets a
    // whole room at least once.
    let mut whole = 0;
    for (delay_ms, rm_delay_ms) in [(200, 50), (1500, 300), (4000, 800), (20000, 150)] {
        let context = format!("killed {delay_ms} ms into room create");
        common::kill_during(
            &env,
            "POST",
            "/v1/rooms",
            body.to_string(),
            Duration::from_millis(delay_ms),
        );
        if settled(&context) {
            whole += 1;
            let context = format!("killed {rm_delay_ms} ms into room rm");
            common::kill_during(
                &env,
                "DELETE",
                "/v1/rooms/rk?force=true",
                String::new(),
                Duration::from_millis(rm_delay_ms),
            );
            if settled(&context) {
                env.ok(&["room", "rm", "--force", "rk"]);
            }
        }
    }
    assert!(whole > 0, "some create finished, so rm was killed too");
    assert!(!settled("at the end"));
    env.ok(&["net", "rm", "wan"]);
    env.assert_nothing_left("rooms removed");
}
