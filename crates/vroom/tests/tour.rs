//! The README's tour, run as a user would paste it: every line of the
//! ```sh block under its `## Tour` heading goes to `sh -c` in order, with
//! `vroom` on the PATH and this test's own data dir and interface prefix in
//! the environment (what a user's shell provides; nothing in the lines is
//! substituted). Each command must succeed, and where it changes something
//! the test looks: the new greeting is served, the spliced firewall blocks,
//! the clone has the config, the room's port forward reaches its server,
//! removed things are gone. A line the test has no check for fails it, so
//! the README and this file cannot drift apart.

mod common;

use std::collections::BTreeSet;
use std::net::Ipv4Addr;
use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use common::{fetch, poll, vroom_bin, Env};
use vroom_types::{InstanceState, Room, Snapshot, Splice, SpliceState};

const GREETING: &str = "Hello from the tour";

/// The commands of the README's tour, in order, each as written (its
/// comment included: the shell drops it).
fn tour_lines(readme: &str) -> Vec<String> {
    let mut lines = readme.lines().skip_while(|l| l.trim() != "## Tour");
    assert!(lines.next().is_some(), "README.md has no `## Tour` heading");
    let block: Vec<String> = lines
        .skip_while(|l| l.trim() != "```sh")
        .skip(1)
        .take_while(|l| l.trim() != "```")
        .filter(|l| !l.trim().is_empty())
        .map(String::from)
        .collect();
    assert!(
        !block.is_empty(),
        "README.md's tour has no ```sh block of commands"
    );
    block
}

/// The command without its comment, as the checks below name it.
fn command_of(line: &str) -> &str {
    line.split("  #").next().unwrap_or(line).trim()
}

/// `sh -c LINE` in this test's environment, with `vroom` first on the PATH.
fn shell(env: &Env, line: &str) -> Output {
    let base = env.command();
    let mut cmd = Command::new("sh");
    cmd.arg("-c").arg(line);
    for (key, value) in base.get_envs() {
        match value {
            Some(value) => cmd.env(key, value),
            None => cmd.env_remove(key),
        };
    }
    let bin_dir = Path::new(vroom_bin()).parent().unwrap();
    let path = std::env::var("PATH").unwrap_or_default();
    cmd.env("PATH", format!("{}:{path}", bin_dir.display()));
    cmd.output().expect("run sh")
}

fn ip_of(env: &Env, name: &str) -> Ipv4Addr {
    env.instance(name).nics[0]
        .ip
        .unwrap_or_else(|| panic!("{name} has an address"))
}

fn gone(env: &Env, name: &str) -> bool {
    !env.instances().iter().any(|i| i.spec.name.as_str() == name)
}

/// What the checks need from earlier steps.
#[derive(Default)]
struct Tour {
    /// A client namespace on the `default` network, outside every splice.
    client: Option<String>,
}

impl Tour {
    fn client(&mut self, env: &Env) -> String {
        self.client
            .get_or_insert_with(|| {
                let subnet = env.network("default").subnet.to_string();
                env.client_on("out", "default", &subnet)
            })
            .clone()
    }

    /// The body of `url` from the client, polled until it holds `text`.
    fn serves(&mut self, env: &Env, url: &str, text: &str) -> bool {
        let ns = self.client(env);
        poll(Duration::from_secs(20), || {
            let (rc, body) = fetch(env, &ns, url);
            (rc == 0 && body.contains(text)).then_some(())
        })
        .is_some()
    }

    /// Polls until `url` no longer answers from the client.
    fn refused(&mut self, env: &Env, url: &str) -> bool {
        let ns = self.client(env);
        poll(Duration::from_secs(20), || {
            (fetch(env, &ns, url).0 != 0).then_some(())
        })
        .is_some()
    }
}

/// Looks at what `command` did; panics naming the command when it did not.
fn check(env: &Env, tour: &mut Tour, command: &str, stdout: &str) {
    let hello_page = || format!("http://{}/", ip_of(env, "hello"));
    match command {
        "vroom run hello --name hello" => {
            assert!(stdout.contains("hello is running"), "{stdout}");
            assert!(
                tour.serves(env, &hello_page(), "Hello from vroom!"),
                "hello serves its seed greeting"
            );
        }
        "vroom config hello set greeting='Hello from the tour'" => {
            assert_eq!(env.ok(&["config", "hello", "get", "greeting"]).trim(), GREETING);
            assert!(tour.serves(env, &hello_page(), GREETING), "the new greeting is served");
        }
        "vroom exec hello -- wget -qO- http://127.0.0.1/" => {
            assert!(stdout.contains(GREETING), "{stdout}");
        }
        "vroom splice l2-firewall --in-front-of hello" => {
            let splices: Vec<Splice> =
                serde_json::from_str(&env.ok(&["--json", "splices"])).unwrap();
            assert!(
                splices.iter().any(|s| s.appliance.as_str() == "hello-l2-firewall"
                    && s.vm.as_str() == "hello"
                    && s.state == SpliceState::Active),
                "{splices:?}"
            );
            assert!(
                tour.serves(env, &hello_page(), GREETING),
                "hello serves through its firewall"
            );
        }
        "vroom config hello-l2-firewall set block_tcp=80" => {
            assert!(
                tour.refused(env, &hello_page()),
                "the firewall in front of hello blocks port 80"
            );
        }
        "vroom unsplice hello-l2-firewall" => {
            let splices: Vec<Splice> =
                serde_json::from_str(&env.ok(&["--json", "splices"])).unwrap();
            assert!(splices.is_empty(), "{splices:?}");
            assert!(gone(env, "hello-l2-firewall"), "the appliance is removed");
            assert!(
                tour.serves(env, &hello_page(), GREETING),
                "hello serves directly again"
            );
        }
        "vroom snapshot hello --name hello-snap" => {
            let snapshot: Snapshot =
                serde_json::from_str(&env.ok(&["snapshot", "inspect", "--json", "hello-snap"]))
                    .unwrap();
            assert_eq!(snapshot.instance.spec.name.as_str(), "hello");
            assert_eq!(env.instance("hello").status.state, InstanceState::Running);
        }
        "vroom clone hello-snap hello-2" => {
            assert_eq!(
                env.ok(&["config", "hello-2", "get", "greeting"]).trim(),
                GREETING
            );
            let (original, copy) = (ip_of(env, "hello"), ip_of(env, "hello-2"));
            assert_ne!(original, copy, "the clone has its own address");
            assert!(tour.serves(env, &format!("http://{copy}/"), GREETING));
        }
        "vroom room create acme" => {
            let room: Room =
                serde_json::from_str(&env.ok(&["room", "inspect", "--json", "acme"])).unwrap();
            assert_eq!(room.firewall.as_str(), "acme-fw");
            assert_eq!(env.instance("acme-fw").status.state, InstanceState::Running);
        }
        "vroom run web --name shop --room acme --segment dmz" => {
            assert!(stdout.contains("shop is running"), "{stdout}");
        }
        "vroom room expose acme --port 8080 --to shop:80" => {
            let wan = ip_of(env, "acme-fw");
            assert!(
                tour.serves(env, &format!("http://{wan}:8080/"), "It works"),
                "the firewall's port 8080 reaches shop's page"
            );
        }
        "vroom ps" => {
            for name in ["hello", "hello-2", "acme-fw", "shop"] {
                assert!(stdout.contains(name), "ps lists {name}: {stdout}");
            }
        }
        "vroom events -n 5" => {
            let lines: Vec<&str> = stdout.lines().collect();
            assert_eq!(lines.len(), 5, "{stdout}");
            // The room's exposure was among the last changes, by the user.
            assert!(
                lines.iter().any(|l| l.contains(" room ")
                    && l.contains(" exposed ")
                    && l.contains(" acme ")
                    && l.contains(" by=uid:")),
                "{stdout}"
            );
        }
        "vroom room rm --force acme" => {
            let rooms: Vec<Room> = serde_json::from_str(&env.ok(&["room", "ls", "--json"])).unwrap();
            assert!(rooms.is_empty(), "{rooms:?}");
            assert!(gone(env, "shop") && gone(env, "acme-fw"));
        }
        "vroom rm -f hello-2" => assert!(gone(env, "hello-2")),
        "vroom rm -f hello" => assert!(gone(env, "hello")),
        "vroom snapshot rm hello-snap" => {
            let snapshots: Vec<Snapshot> =
                serde_json::from_str(&env.ok(&["snapshot", "ls", "--json"])).unwrap();
            assert!(snapshots.is_empty(), "{snapshots:?}");
        }
        other => panic!(
            "the README's tour has `{other}`, which tests/tour.rs does not check: add a check for it"
        ),
    }
}

#[test]
fn the_readme_tour_runs_as_written() {
    let readme =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../../README.md"))
            .unwrap();
    let lines = tour_lines(&readme);
    let env = Env::new("tour");
    let mut tour = Tour::default();
    let mut seen = BTreeSet::new();
    let started = Instant::now();
    for line in &lines {
        let step = Instant::now();
        let out = shell(&env, line);
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "the tour's `{line}` failed ({}): {}{stdout}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        let command = command_of(line);
        check(&env, &mut tour, command, &stdout);
        assert!(
            seen.insert(command.to_string()),
            "`{command}` twice in the tour"
        );
        eprintln!("tour: {command} ({:.1} s)", step.elapsed().as_secs_f64());
    }
    eprintln!(
        "tour: {} commands in {:.1} s",
        lines.len(),
        started.elapsed().as_secs_f64()
    );
    // The tour cleans up after itself.
    assert!(env.instances().is_empty(), "{:?}", env.instances());
    let left = poll(Duration::from_secs(5), || {
        env.qemu_pids().is_empty().then_some(())
    });
    assert!(left.is_some(), "QEMUs left: {:?}", env.qemu_pids());
}

#[test]
fn the_tour_is_read_from_its_block() {
    let readme = "# x\n\n```sh\nvroom nope\n```\n\n## Tour\n\ntext\n\n```sh\nvroom ps            # a comment\n\nvroom rm -f a\n```\n\n```sh\nvroom later\n```\n";
    let lines = tour_lines(readme);
    assert_eq!(lines, ["vroom ps            # a comment", "vroom rm -f a"]);
    assert_eq!(command_of(&lines[0]), "vroom ps");
}
