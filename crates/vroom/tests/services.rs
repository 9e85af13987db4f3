//! Services: members of one image behind the `lb` appliance, kept at their
//! number by vroomd, under real HTTP load from wrk.

mod common;

use std::time::Duration;

use common::{kill_during, poll, random_subnet, Env};
use vroom_types::Service;

fn service(env: &Env, name: &str) -> Service {
    serde_json::from_str(&env.ok(&["--json", "service", "inspect", name])).unwrap()
}

/// wrk against `url` for `secs` seconds, a new connection per request:
/// (requests, failed).
fn load(url: String, secs: u32) -> std::thread::JoinHandle<(u64, u64)> {
    std::thread::spawn(move || {
        let out = std::process::Command::new("wrk")
            .args([
                "-t1",
                "-c4",
                &format!("-d{secs}s"),
                "-H",
                "Connection: close",
            ])
            .arg(&url)
            .output()
            .expect("wrk runs (cargo xtask test installs it)");
        let report = String::from_utf8_lossy(&out.stdout).into_owned();
        let requests = report
            .lines()
            .find_map(|l| {
                l.trim()
                    .split_once(" requests in ")
                    .map(|(n, _)| n.parse().unwrap())
            })
            .unwrap_or_else(|| panic!("no request count: {report}"));
        // "Socket errors: connect 0, read 1, write 0, timeout 0" and
        // "Non-2xx or 3xx responses: 3".
        let mut failed = 0;
        for line in report.lines().map(str::trim) {
            if let Some(errors) = line.strip_prefix("Socket errors:") {
                failed += errors
                    .split(',')
                    .filter_map(|e| e.split_whitespace().last()?.parse::<u64>().ok())
                    .sum::<u64>();
            }
            if let Some(n) = line.strip_prefix("Non-2xx or 3xx responses:") {
                failed += n.trim().parse::<u64>().unwrap();
            }
        }
        (requests, failed)
    })
}

/// A service of two hello members: reachable through its balancer; under
/// load, a member's QEMU killed costs at most the requests in flight on it
/// and the service is back to strength; a scale-out and a scale-in (which
/// drains the member before it goes) fail no request; a removal leaves
/// nothing. Bad definitions change nothing.
#[test]
fn a_service_heals_and_scales_under_load() {
    let env = Env::new("svc");
    env.ok(&["net", "create", "lan", "--subnet", &random_subnet()]);
    let out = env.ok(&[
        "service",
        "create",
        "shop",
        "--image",
        "hello",
        "--replicas",
        "2",
        "--net",
        "lan",
    ]);
    assert!(out.contains("2 of 2 members ready"), "{out}");
    let shop = service(&env, "shop");
    let address = shop.address.expect("the service has an address");
    assert!(common::page_shows(address, "Hello from vroom"));

    let run = load(format!("http://{address}/"), 45);
    std::thread::sleep(Duration::from_secs(3));
    // A member's QEMU dies: the balancer drops it, vroomd brings it back.
    let victim = env.instance("shop-1").status.pid.unwrap();
    // SAFETY: kill(2) on a pid this test's vroomd started.
    unsafe { libc::kill(victim as i32, libc::SIGKILL) };
    let healed = poll(Duration::from_secs(30), || {
        let s = service(&env, "shop");
        (s.ready == 2 && env.instance("shop-1").status.pid != Some(victim)).then_some(s)
    });
    assert!(
        healed.is_some(),
        "not back to strength: {:?}",
        service(&env, "shop")
    );
    let out = env.ok(&["service", "scale", "shop", "3"]);
    assert!(out.contains("3 of 3"), "{out}");
    let out = env.ok(&["service", "scale", "shop", "1"]);
    assert!(out.contains("1 of 1"), "{out}");
    let (requests, failed) = run.join().unwrap();
    assert!(requests > 200, "{requests} requests");
    // At most the connections in flight on the killed member (wrk keeps 4).
    assert!(failed <= 4, "{failed} of {requests} requests failed");

    let names: Vec<String> = env
        .instances()
        .iter()
        .map(|i| i.spec.name.to_string())
        .collect();
    assert_eq!(names.len(), 2, "the balancer and one member: {names:?}");
    let err = env.fail(&[
        "service", "create", "shop", "--image", "hello", "--net", "lan",
    ]);
    assert!(err.contains("already exists"), "{err}");
    let err = env.fail(&[
        "service",
        "create",
        "web",
        "--image",
        "hello",
        "--replicas",
        "0",
        "--net",
        "lan",
    ]);
    assert!(err.contains("replicas must be 1 to 64"), "{err}");
    let err = env.fail(&[
        "service", "create", "web", "--image", "nope", "--net", "lan",
    ]);
    assert!(err.contains("nope"), "{err}");
    let err = env.fail(&["service", "scale", "ghost", "2"]);
    assert!(err.contains("ghost"), "{err}");
    assert_eq!(
        env.instances().len(),
        2,
        "a refused request changed nothing"
    );

    // vroomd killed inside a scale-out: the service converges, with no
    // member left out of its record.
    kill_during(
        &env,
        "POST",
        "/v1/services/shop/scale",
        r#"{"replicas":3}"#.into(),
        Duration::from_millis(400),
    );
    let converged = poll(Duration::from_secs(60), || {
        let s = service(&env, "shop");
        (s.ready == s.spec.replicas).then_some(s)
    })
    .unwrap_or_else(|| panic!("never converged: {:?}", service(&env, "shop")));
    let members: Vec<String> = converged
        .members
        .iter()
        .map(|m| m.name.to_string())
        .collect();
    for instance in env.instances() {
        let name = instance.spec.name.to_string();
        assert!(
            name == "shop-lb" || members.contains(&name),
            "{name} is an orphan of {members:?}"
        );
    }

    env.ok(&["service", "rm", "shop"]);
    assert!(env.instances().is_empty(), "{:?}", env.instances());
    assert!(env.ok(&["service", "ls"]).lines().count() <= 1);
    env.ok(&["net", "rm", "lan"]);
    env.assert_nothing_left("after the service");
}
