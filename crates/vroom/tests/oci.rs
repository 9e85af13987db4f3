//! End-to-end tests of OCI images as appliances (`vroom image import`), with
//! Debian's real tools: umoci builds the images (a static busybox httpd in
//! a base layer, an upper layer that whites a file out), skopeo copies them
//! into an OCI archive, a docker archive and a `docker-registry` the test
//! starts on loopback with its own config and storage. Each transport
//! imports the same image to the same erofs root, byte for byte; one of
//! them boots and serves, the whited-out file stays deleted, and the
//! service runs as the image's user and writes to its /var/cache. Bad
//! references and images fail in one line with nothing listed, and a
//! vroomd killed during an import leaves nothing half-made.

mod common;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use common::oci::{build_images, Registry};
use common::{fetch, host, kill_during, random_subnet, sh, Env};
use vroom_types::{ImageSummary, InstanceState};

const BOOT: Duration = Duration::from_secs(120);

fn images(env: &Env) -> Vec<ImageSummary> {
    serde_json::from_str(&env.ok(&["image", "ls", "--json"])).unwrap()
}

/// Every file in the layer cache is complete: it hashes to its name. None
/// is a temporary leftover.
fn assert_cache_complete(env: &Env, context: &str) {
    let dir = env.dir.join("images/blobs/sha256");
    for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        assert!(!name.starts_with('.'), "{context}: a leftover {name}");
        let (digest, _) = vroom_image::sha256_file(&entry.path()).unwrap();
        assert_eq!(
            digest, name,
            "{context}: a cached layer is not what its name says"
        );
    }
}

fn staging_dirs(env: &Env) -> Vec<String> {
    std::fs::read_dir(env.dir.join("images"))
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(".staging-"))
        .collect()
}

/// Every transport imports the image to the same root; one boots, serves
/// and keeps the whited-out file deleted; bad input fails in one line and
/// leaves nothing listed.
#[test]
fn oci_images_import_by_every_transport_and_boot_as_appliances() {
    let env = Env::new("oci");
    let layout = build_images(&env.dir, false);
    let l = layout.display().to_string();
    let registry = Registry::start(&env.dir);
    let reg = &registry.addr;
    let oci_archive = env.dir.join("web-oci.tar");
    let docker_archive = env.dir.join("web-docker.tar");
    sh(&format!(
        "skopeo copy -q oci:{l}:web oci-archive:{} && \
         skopeo copy -q oci:{l}:web docker-archive:{}:web:1 && \
         skopeo copy -q --dest-tls-verify=false oci:{l}:web docker://{reg}/test/web:1",
        oci_archive.display(),
        docker_archive.display()
    ));

    let imports = [
        (format!("oci:{l}:web"), "from-layout"),
        (
            format!("oci-archive:{}", oci_archive.display()),
            "from-oci-archive",
        ),
        (
            format!("docker-archive:{}", docker_archive.display()),
            "from-docker-archive",
        ),
        (format!("docker://{reg}/test/web:1"), "web"),
    ];
    for (reference, name) in &imports {
        let out = env.ok(&["image", "import", "--insecure", reference, "--name", name]);
        assert!(
            out.contains(&format!("imported {name}")),
            "{reference}: {out}"
        );
    }
    let listed = images(&env);
    let roots: Vec<&str> = listed
        .iter()
        .map(|i| i.manifest.rootfs.sha256.as_str())
        .collect();
    assert_eq!(listed.len(), 4, "{listed:?}");
    assert!(
        roots.iter().all(|r| *r == roots[0]),
        "the same layers give the same erofs root, whatever the transport: {roots:?}"
    );
    // The layers are cached once, shared by the images that have them.
    let oci = listed[0]
        .manifest
        .oci
        .clone()
        .expect("an imported image says so");
    for layer in &oci.layers {
        let hex = layer.trim_start_matches("sha256:");
        assert!(
            env.dir.join("images/blobs/sha256").join(hex).is_file(),
            "{layer}"
        );
    }
    assert_cache_complete(&env, "after the imports");
    // The same digest again is a no-op.
    let again = env.ok(&[
        "image",
        "import",
        "--insecure",
        &imports[3].0,
        "--name",
        "web",
    ]);
    assert!(again.contains("unchanged web 1"), "{again}");

    // `image ls` and `image inspect` say where it came from and what runs.
    let ls = env.ok(&["image", "ls"]);
    assert!(ls.contains(&format!("docker://{reg}/test/web:1")), "{ls}");
    assert!(
        ls.contains(&oci.digest) || ls.contains(&listed[3].manifest.oci.as_ref().unwrap().digest),
        "{ls}"
    );
    let inspect = env.ok(&["image", "inspect", "web"]);
    for says in [
        "entrypoint:  [\"/bin/sh\", \"-c\"",
        "env:         GREETING=hi",
        "user:        33:33",
        "workdir:     /www",
        "ports:       8080/tcp",
        "health:      tcp connect to port 8080",
        // The config floppy: its Env variable and its label's key.
        "  greeting=hi  (string, $GREETING)",
        "  motd=welcome  (string, $MOTD: the line after the greeting)",
    ] {
        assert!(inspect.contains(says), "{says}: {inspect}");
    }
    // The image's volume is a data volume where the kernel mounts ext4
    // (vroom's), a tmpfs on Debian's.
    let on_vrooms_kernel = listed[3].manifest.kernel.flavor == vroom_types::KernelFlavor::Vroom;
    let (volume, writable) = if on_vrooms_kernel {
        (
            "volumes:     /data (data volume INSTANCE-data, 1024 MiB)",
            "writable:    /run, /tmp, /var (tmpfs)",
        )
    } else {
        (
            "volumes:     /data (tmpfs)",
            "writable:    /run, /tmp, /var, /data (tmpfs)",
        )
    };
    assert!(inspect.contains(volume), "{inspect}");
    assert!(inspect.contains(writable), "{inspect}");

    // Bad references and images: one line each, nothing half-imported.
    for (args, says) in [
        (vec!["ftp:/x".to_string()], "unknown transport \"ftp\""),
        (vec![format!("oci:{l}:nope")], "no image tagged \"nope\""),
        (
            vec![format!("oci:{l}:arm")],
            "the image is for linux/arm64, not linux/amd64",
        ),
        (
            vec![format!("oci:{l}:noentry")],
            "the image has neither an Entrypoint nor a Cmd",
        ),
        (
            vec![
                "--insecure".into(),
                format!("docker://{reg}/test/nothere:1"),
            ],
            "test/nothere/manifests/1: not found (404)",
        ),
        (
            vec![format!("docker://{reg}/test/web:1")],
            "needs --insecure",
        ),
    ] {
        let mut full = vec!["image", "import"];
        full.extend(args.iter().map(String::as_str));
        let stderr = env.fail(&full);
        let errors: Vec<&str> = stderr.lines().filter(|l| l.starts_with("error:")).collect();
        assert_eq!(errors.len(), 1, "one line: {stderr}");
        assert!(errors[0].contains(says), "{args:?}: {stderr}");
    }
    assert_eq!(images(&env).len(), 4, "nothing half-imported is listed");
    assert!(staging_dirs(&env).is_empty(), "{:?}", staging_dirs(&env));

    // One boots: the service is up, serves, and the whiteout holds.
    let subnet = random_subnet();
    env.ok(&["net", "create", "lan", "--subnet", &subnet]);
    let stderr = env.fail(&[
        "run", "web", "--name", "bad", "--net", "lan", "--env", "NOPE=1",
    ]);
    assert!(
        stderr.contains("image web takes no env \"NOPE\" (its keys: greeting, motd)"),
        "{stderr}"
    );
    // --env names a variable (or its key) and seeds the config.
    env.ok(&[
        "run",
        "web",
        "--name",
        "w1",
        "--net",
        "lan",
        "--env",
        "GREETING=from run",
    ]);
    healthy(&env, "w1");
    let client = env.client_on("cl", "lan", &subnet);
    let ip = host(&subnet, 2);
    let (rc, body) = fetch(&env, &client, &format!("http://{ip}:8080/"));
    assert_eq!((rc, body.trim()), (0, "hello from an oci image"));
    let (rc, body) = fetch(&env, &client, &format!("http://{ip}:8080/secret.txt"));
    assert_ne!(rc, 0, "the whited-out file is gone: {body}");
    let listing = env.ok(&["exec", "w1", "--", "/bin/busybox", "ls", "/www"]);
    assert!(!listing.contains("secret"), "{listing}");
    // Its own user, working dir and env; its write to /var/cache landed.
    let stamp = env.ok(&[
        "exec",
        "w1",
        "--",
        "/bin/busybox",
        "cat",
        "/var/cache/stamp",
    ]);
    assert_eq!(stamp.trim(), "written");
    let logs = env.ok(&["logs", "w1"]);
    assert!(
        logs.contains("starting httpd as 33:33 in /www with from run and welcome"),
        "the service's output is in `vroom logs`, with the run's env: {logs}"
    );
    // `config set` restarts main with the new environment; `config reset`
    // brings back the image's. Each is done when main serves again.
    let greeted = |with: &str| {
        let last_start = || {
            let logs = env.ok(&["logs", "w1"]);
            let last = logs
                .lines()
                .rfind(|l| l.contains("starting httpd as"))
                .unwrap_or_default()
                .trim_end()
                .to_string();
            (last, logs)
        };
        // The console reaches the log file a moment after the guest wrote it.
        let seen = common::poll(Duration::from_secs(10), || {
            last_start().0.ends_with(with).then_some(())
        });
        let (last, logs) = last_start();
        assert!(seen.is_some(), "the last start: {last:?}\n{logs}");
    };
    env.ok(&["config", "w1", "set", "greeting=changed", "motd=bye"]);
    greeted("with changed and bye");
    assert_eq!(fetch(&env, &client, &format!("http://{ip}:8080/")).0, 0);
    env.ok(&["config", "w1", "reset"]);
    greeted("with hi and welcome");
    // Each restart stopped main with the image's StopSignal (SIGUSR1,
    // which the entrypoint traps and says so).
    let logs = env.ok(&["logs", "w1"]);
    assert!(
        logs.matches("stopped by SIGUSR1").count() >= 2,
        "config set and reset stop main with SIGUSR1: {logs}"
    );
    assert_eq!(fetch(&env, &client, &format!("http://{ip}:8080/")).0, 0);
    // `room expose --to w1` forwards to the image's lowest exposed port
    // of the protocol (found here; the room is what is missing), and says
    // when there is none.
    let stderr = env.fail(&["room", "expose", "nope", "--to", "w1"]);
    assert!(
        !stderr.contains("exposes no") && stderr.contains("nope"),
        "{stderr}"
    );
    let stderr = env.fail(&["room", "expose", "nope", "--to", "w1", "--proto", "udp"]);
    assert!(
        stderr.contains("--to w1: its image web exposes no udp port; use --to w1:PORT"),
        "{stderr}"
    );
    let config = env.ok(&["config", "w1", "get"]);
    assert!(
        config.contains("greeting") && config.contains("hi"),
        "{config}"
    );
    let mounts = env.ok(&["exec", "w1", "--", "/bin/busybox", "cat", "/proc/mounts"]);
    let data_fs = if on_vrooms_kernel {
        " /data ext4 "
    } else {
        " /data tmpfs "
    };
    assert!(mounts.contains(data_fs), "{mounts}");
    if on_vrooms_kernel {
        assert!(env.ok(&["volume", "ls"]).contains("w1-data"));
    }
    let hosts = env.ok(&[
        "exec",
        "w1",
        "--",
        "/bin/busybox",
        "cat",
        "/etc/hosts",
        "/etc/resolv.conf",
    ]);
    assert!(hosts.contains("127.0.1.1\tw1"), "{hosts}");
    assert!(
        hosts.contains(&format!("nameserver {}", host(&subnet, 1))),
        "{hosts}"
    );

    // `web` without its volume (an image with data volumes is never warmed).
    env.ok(&[
        "image",
        "import",
        &format!("oci:{l}:novolume"),
        "--name",
        "plain",
    ]);
    in_a_room(&env, &client);
    let reused = copies_and_services_of_an_imported_image(&env, &client);
    a_real_server_from_its_debian_package(&env, &client, &reused);

    // `stop` sends the image's StopSignal too (w1's boot is the restore's
    // now: its log has none yet).
    let stopped = || {
        env.ok(&["logs", "w1"])
            .matches("stopped by SIGUSR1")
            .count()
    };
    let before = stopped();
    env.ok(&["stop", "w1"]);
    let seen = common::poll(Duration::from_secs(10), || {
        (stopped() > before).then_some(())
    });
    assert!(
        seen.is_some(),
        "stop did not send SIGUSR1: {}",
        env.ok(&["logs", "w1"])
    );

    env.ok(&["rm", "-f", "--volumes", "w1"]);
    env.remove_namespaces(&["cl"]);
    env.ok(&["net", "rm", "lan"]);
    env.assert_nothing_left("after the oci test");
}

/// Waits until `name` runs and passes its health check.
fn healthy(env: &Env, name: &str) {
    env.wait_for(name, "healthy", BOOT, |i| {
        i.status.state == InstanceState::Running && i.health.as_ref().is_some_and(|h| h.ready)
    });
}

fn ip_of(env: &Env, name: &str) -> String {
    env.instance(name).nics[0]
        .ip
        .expect("an addressed nic")
        .to_string()
}

/// The last line of `name`'s log in which main said it started.
fn last_start(env: &Env, name: &str) -> String {
    env.ok(&["logs", name])
        .lines()
        .rfind(|l| l.contains("starting httpd as"))
        .unwrap_or_default()
        .trim_end()
        .to_string()
}

/// An imported image (`plain`) in a server room's dmz, with the room's wan on `lan`:
/// `room expose --to` without a port forwards the image's exposed port, and
/// the client on `lan` reaches it there through the room's firewall.
fn in_a_room(env: &Env, client: &str) {
    env.ok(&["image", "build", &common::recipe("firewall")]);
    env.ok(&["room", "create", "ro", "--wan", "lan"]);
    env.ok(&[
        "run",
        "plain",
        "--name",
        "rw",
        "--room",
        "ro",
        "--segment",
        "dmz",
    ]);
    healthy(env, "rw");
    let fw = ip_of(env, "ro-fw");
    let exposed = env.ok(&["room", "expose", "ro", "--to", "rw"]);
    assert!(
        exposed.contains(&format!("forwards tcp/8080 of {fw} on lan to rw:8080")),
        "{exposed}"
    );
    let page = common::poll(Duration::from_secs(20), || {
        let (rc, body) = fetch(env, client, &format!("http://{fw}:8080/"));
        (rc == 0).then_some(body)
    });
    assert_eq!(
        page.as_deref().map(str::trim),
        Some("hello from an oci image"),
        "through the room's firewall"
    );
    env.ok(&["room", "rm", "--force", "ro"]);
}

/// What works for any appliance works for an imported image: a snapshot of
/// running `w1` (on `lan`) and its clone serve, and a restore takes w1
/// back. For `plain` (`web` without
/// its volume: an image with data volumes is never warmed), its warm
/// snapshot starts a later `run`, whose `--env` still reaches main;
/// `--ephemeral` starts clean every time, and `rm --archive` keeps it; a
/// service of it serves through its balancer.
fn copies_and_services_of_an_imported_image(env: &Env, client: &str) -> String {
    let serves = |ip: &str| {
        let (rc, body) = fetch(env, client, &format!("http://{ip}:8080/"));
        assert_eq!((rc, body.trim()), (0, "hello from an oci image"), "{ip}");
    };
    env.ok(&["snapshot", "w1", "--name", "w1-then"]);
    env.ok(&["clone", "w1-then", "w2"]);
    healthy(env, "w2");
    serves(&ip_of(env, "w2"));
    env.ok(&["rm", "-f", "--volumes", "w2"]);
    // A restore takes w1 back to the snapshot: its config with it.
    env.ok(&["config", "w1", "set", "motd=after the snapshot"]);
    env.ok(&["restore", "w1", "w1-then"]);
    healthy(env, "w1");
    serves(&ip_of(env, "w1"));
    let config = env.ok(&["config", "w1", "get"]);
    assert!(!config.contains("after the snapshot"), "{config}");
    env.ok(&["snapshot", "rm", "w1-then"]);

    env.ok(&["image", "warm", "plain"]);
    env.ok(&[
        "run",
        "plain",
        "--name",
        "w3",
        "--net",
        "lan",
        "--ephemeral",
        "--env",
        "GREETING=warm",
    ]);
    healthy(env, "w3");
    let from = env.instance("w3").status.started_from.unwrap_or_default();
    assert!(from.starts_with("warm"), "w3 started from {from:?}");
    serves(&ip_of(env, "w3"));
    let seen = common::poll(Duration::from_secs(10), || {
        last_start(env, "w3")
            .ends_with("with warm and welcome")
            .then_some(())
    });
    assert!(
        seen.is_some(),
        "--env after a warm start: {}",
        last_start(env, "w3")
    );
    // A file it wrote outside its volumes and a config change are gone
    // after a stop.
    env.ok(&[
        "exec",
        "w3",
        "--",
        "/bin/busybox",
        "sh",
        "-c",
        "echo left > /var/cache/junk",
    ]);
    env.ok(&["config", "w3", "set", "motd=changed"]);
    env.ok(&["stop", "w3"]);
    env.ok(&["start", "w3"]);
    healthy(env, "w3");
    let junk = env.vroom(&["exec", "w3", "--", "/bin/busybox", "cat", "/var/cache/junk"]);
    assert!(
        !junk.status.success(),
        "--ephemeral kept a write: {}",
        String::from_utf8_lossy(&junk.stdout)
    );
    let config = env.ok(&["config", "w3", "get"]);
    assert!(!config.contains("changed"), "{config}");
    serves(&ip_of(env, "w3"));
    // Archived on removal, like any instance: its memory, config volume,
    // console logs and record, checked by their sums.
    let archive = env.dir.join("w3-archive").display().to_string();
    env.ok(&["rm", "-f", "--archive", &archive, "w3"]);
    env.ok(&["archive", "verify", &archive]);
    assert!(Path::new(&archive).join("memory.zst").is_file());

    env.ok(&[
        "service",
        "create",
        "ws",
        "--image",
        "plain",
        "--replicas",
        "2",
        "--net",
        "lan",
        "--port",
        "8080",
    ]);
    let service: serde_json::Value =
        serde_json::from_str(&env.ok(&["--json", "service", "inspect", "ws"])).unwrap();
    let address = service["address"].as_str().expect("a service address");
    assert_eq!(service["ready"], 2, "{service}");
    for _ in 0..4 {
        serves(address);
    }
    env.ok(&["service", "rm", "ws"]);
    address.to_string()
}

/// nginx from Debian's package, packed by the test as an OCI image: the
/// recipe builder fetches the package and its closure (a recipe that only
/// lists them, with busybox for `exec`), `fsck.erofs --extract` unpacks that root, umoci makes an
/// image of it with nginx's own entrypoint and config, and the image is
/// imported, boots and serves. It takes address `reused`, which the client
/// has just talked to on another MAC: it announces itself (a gratuitous
/// ARP, which an imported image's NIC, having no role, did not send), or
/// the client may keep sending to the MAC it knows.
fn a_real_server_from_its_debian_package(env: &Env, client: &str, reused: &str) {
    let recipe = env.dir.join("nginx-packages");
    std::fs::create_dir_all(&recipe).unwrap();
    std::fs::write(
        recipe.join("recipe.toml"),
        r#"name = "nginx-packages"
version = "1.0"
nics = ["lan"]
[debian]
suite = "bookworm"
packages = [{ name = "nginx" }, { name = "busybox-static" }]
[[services]]
name = "nginx"
command = ["/usr/sbin/nginx"]
[memory]
default = "128M"
min = "64M"
"#,
    )
    .unwrap();
    env.ok(&["image", "build", &recipe.display().to_string()]);
    let built = images(env)
        .into_iter()
        .find(|i| i.name == "nginx-packages")
        .expect("the packages' image");
    let layout = env.dir.join("nginx-layout");
    let bundle = env.dir.join("nginx-bundle");
    let (l, b) = (layout.display(), bundle.display());
    sh(&format!(
        "umoci init --layout {l} && umoci new --image {l}:nginx && umoci unpack --image {l}:nginx {b} && rmdir {b}/rootfs"
    ));
    let root = bundle.join("rootfs");
    sh(&format!(
        "fsck.erofs --extract={} {}",
        root.display(),
        env.dir
            .join("images")
            .join(&built.id)
            .join(&built.manifest.rootfs.file)
            .display()
    ));
    // Only the packages' files: not what the builder adds for an appliance.
    for added in ["etc/vroom", "config"] {
        let _ = std::fs::remove_dir_all(root.join(added));
    }
    // What Debian's maintainer scripts would add (the builder runs none):
    // nginx's user; and a site on 8080.
    std::fs::write(
        root.join("etc/passwd"),
        "root:x:0:0:root:/root:/bin/sh\nwww-data:x:33:33:www-data:/var/www:/usr/sbin/nologin\n",
    )
    .unwrap();
    std::fs::write(root.join("etc/group"), "root:x:0:\nwww-data:x:33:\n").unwrap();
    std::fs::create_dir_all(root.join("srv/www")).unwrap();
    std::fs::write(
        root.join("srv/www/index.html"),
        "hello from nginx in an oci image\n",
    )
    .unwrap();
    std::fs::write(
        root.join("etc/nginx/nginx.conf"),
        "user www-data;\nworker_processes 1;\npid /run/nginx.pid;\nerror_log stderr;\nevents {}\n\
         http { include mime.types; access_log off; server { listen 8080; root /srv/www; } }\n",
    )
    .unwrap();
    sh(&format!(
        "umoci repack --image {l}:nginx {b} && rm -rf {b} && \
         umoci config --image {l}:nginx --config.entrypoint /usr/sbin/nginx \
         --config.cmd -g --config.cmd 'daemon off;' --config.exposedports 8080/tcp \
         --config.stopsignal SIGQUIT"
    ));
    env.ok(&[
        "image",
        "import",
        &format!("oci:{l}:nginx"),
        "--name",
        "nginx",
    ]);
    let inspect = env.ok(&["image", "inspect", "nginx"]);
    assert!(
        inspect.contains("health:      tcp connect to port 8080"),
        "{inspect}"
    );
    // Listening for its announcement (an ARP request for its own address)
    // before it boots.
    let ip: std::net::Ipv4Addr = reused.parse().unwrap();
    let filter = format!(
        "arp and arp[6:2] = 1 and arp[14:4] = {0} and arp[24:4] = {0}",
        u32::from(ip)
    );
    let announced = std::process::Command::new("ip")
        .args([
            "netns", "exec", client, "timeout", "60", "tcpdump", "-l", "-n",
        ])
        .args(["-c", "1", "-i", "eth0", &filter])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("tcpdump");
    std::thread::sleep(Duration::from_millis(500));
    env.ok(&[
        "run",
        "nginx",
        "--name",
        "ng",
        "--net",
        &format!("lan:{reused}"),
    ]);
    healthy(env, "ng");
    let announced = announced.wait_with_output().unwrap();
    let announced = String::from_utf8_lossy(&announced.stdout);
    assert!(
        announced.contains(&format!("Request who-has {reused} tell {reused}")),
        "ng did not announce its address: {announced:?}"
    );
    let (rc, body) = fetch(env, client, &format!("http://{reused}:8080/"));
    assert_eq!(
        (rc, body.trim()),
        (0, "hello from nginx in an oci image"),
        "the client still sends to the balancer's MAC: {}",
        String::from_utf8_lossy(&env.run_in(client, "ip neigh").stdout)
    );
    // Its master runs as root and its worker as www-data, as on Debian.
    let ps = env.ok(&["exec", "ng", "--", "/bin/busybox", "ps"]);
    assert!(
        ps.contains("nginx: master process")
            && ps
                .lines()
                .any(|l| l.contains("www-data") && l.contains("nginx: worker")),
        "{ps}"
    );
    env.ok(&["rm", "-f", "ng"]);
}

/// vroomd SIGKILLed at several points of an import: nothing partial is
/// listed, the layer cache holds only complete layers, no staging dir
/// outlives the restart, and the next import reuses what was cached.
#[test]
fn a_killed_import_leaves_nothing_half_made_and_the_next_reuses_layers() {
    let env = Env::new("ocikill");
    let layout = build_images(&env.dir, true);
    let registry = Registry::start(&env.dir);
    let reference = format!("docker://{}/test/big:1", registry.addr);
    sh(&format!(
        "skopeo copy -q --dest-tls-verify=false oci:{}:big {reference}",
        layout.display()
    ));
    let body = format!(r#"{{"reference":"{reference}","name":"big","insecure":true}}"#);
    for delay_ms in [100, 600, 2500] {
        kill_during(
            &env,
            "POST",
            "/v1/images/import",
            body.clone(),
            Duration::from_millis(delay_ms),
        );
        let context = format!("killed {delay_ms} ms into the import");
        for image in images(&env) {
            // Listed means committed: complete, with its files.
            let dir = env.dir.join("images").join(&image.id);
            let rootfs = dir.join(&image.manifest.rootfs.file);
            assert_eq!(
                std::fs::metadata(&rootfs).map(|m| m.len()).ok(),
                Some(image.manifest.rootfs.size),
                "{context}: {image:?}"
            );
        }
        assert!(
            staging_dirs(&env).is_empty(),
            "{context}: {:?}",
            staging_dirs(&env)
        );
        assert_cache_complete(&env, &context);
    }
    // What was cached stays as it is: the next import reads it, it does not
    // fetch it again.
    let cached: Vec<(PathBuf, u64)> = std::fs::read_dir(env.dir.join("images/blobs/sha256"))
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| {
            use std::os::unix::fs::MetadataExt;
            (e.path(), e.metadata().unwrap().ino())
        })
        .collect();
    assert!(!cached.is_empty(), "some layer was complete before a kill");
    let out = env
        .command()
        .args(["image", "import", "--insecure", &reference, "--name", "big"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("(cached)"), "{text}");
    for (path, ino) in cached {
        use std::os::unix::fs::MetadataExt;
        assert_eq!(
            std::fs::metadata(&path).unwrap().ino(),
            ino,
            "{} was fetched again",
            path.display()
        );
    }
    let big: Vec<_> = images(&env)
        .into_iter()
        .filter(|i| i.name == "big")
        .collect();
    assert!(!big.is_empty());
    assert_cache_complete(&env, "after the last import");
}
