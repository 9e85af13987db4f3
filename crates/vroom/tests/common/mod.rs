//! The end-to-end harness: every test gets its own data dir, its own host
//! interface prefix (so its bridges and taps are recognisable) and random
//! subnets, and `Drop` removes all of it — VMs, daemon, links, NAT tables and
//! files — even when the test fails.

#![allow(dead_code)]

pub mod lab;
pub mod loop_client;
pub mod oci;

use std::io::{Read, Write};
use std::net::{Ipv4Addr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use vroom_types::Instance;

pub struct Env {
    pub dir: PathBuf,
    pub prefix: String,
    daemon: Mutex<Option<Child>>,
    extra_env: Vec<(String, String)>,
}

pub fn vroom_bin() -> &'static str {
    env!("CARGO_BIN_EXE_vroom")
}

/// The static guest init, built by `cargo xtask test`.
pub fn init_binary() -> PathBuf {
    let path = std::env::var_os("VROOM_INIT")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../../target/x86_64-unknown-linux-gnu/init/vroom-init")
        });
    assert!(
        path.is_file(),
        "vroom-init not found at {}: run the tests with `cargo xtask test`",
        path.display()
    );
    path
}

/// The QEMU every test's vroom runs unless the test names one itself:
/// `VROOM_TEST_QEMU` (a binary's path) runs the whole suite on another
/// QEMU by hand, e.g. QEMU 10 from `vroom setup --qemu 10`
/// (docs/install.md); unset, the machine's.
pub fn test_qemu() -> Vec<(String, String)> {
    std::env::var("VROOM_TEST_QEMU")
        .ok()
        .filter(|q| !q.is_empty())
        .map(|q| ("VROOM_QEMU".to_string(), q))
        .into_iter()
        .collect()
}

fn suffix() -> String {
    format!("{:04x}", rand::random::<u16>())
}

/// A random /24 in 10.64.0.0/10, unlikely to meet another test's.
pub fn random_subnet() -> String {
    format!(
        "10.{}.{}.0/24",
        64 + rand::random::<u8>() % 64,
        rand::random::<u8>()
    )
}

impl Env {
    pub fn new(tag: &str) -> Self {
        Self::with_env(tag, vec![])
    }

    /// An environment whose daemon the test starts itself (a CLI's, a
    /// unit's); `Drop` kills every vroomd of its data dir all the same.
    pub fn bare(tag: &str) -> Self {
        let s = suffix();
        let env = Env {
            dir: PathBuf::from(format!("/tmp/vre-{tag}-{s}")),
            prefix: format!("t{s}"),
            daemon: Mutex::new(None),
            extra_env: vec![],
        };
        std::fs::create_dir_all(&env.dir).unwrap();
        env
    }

    pub fn with_env(tag: &str, extra_env: Vec<(&str, String)>) -> Self {
        let s = suffix();
        let env = Env {
            dir: PathBuf::from(format!("/tmp/vre-{tag}-{s}")),
            prefix: format!("t{s}"),
            daemon: Mutex::new(None),
            extra_env: extra_env
                .into_iter()
                .map(|(k, v)| (k.to_string(), v))
                .collect(),
        };
        std::fs::create_dir_all(&env.dir).unwrap();
        env.start_daemon();
        env
    }

    /// A `vroom` command of this environment, to spawn with its own stdio.
    pub fn command(&self) -> Command {
        let mut cmd = Command::new(vroom_bin());
        cmd.env("VROOM_DATA_DIR", &self.dir)
            .env("VROOM_IFACE_PREFIX", &self.prefix)
            .env("VROOM_INIT", init_binary())
            .env_remove("VROOM_LOG")
            .envs(test_qemu());
        for (k, v) in &self.extra_env {
            cmd.env(k, v);
        }
        cmd
    }

    pub fn start_daemon(&self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("vroomd.log"))
            .unwrap();
        let child = self
            .command()
            .arg("daemon")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start vroomd");
        *self.daemon.lock().unwrap() = Some(child);
        // Probe the socket itself: the CLI would start a daemon of its own.
        let socket = self.dir.join("vroomd.sock");
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::os::unix::net::UnixStream::connect(&socket).is_err() {
            assert!(
                Instant::now() < deadline,
                "vroomd did not come up: {}",
                self.daemon_log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGKILL, as a crash would.
    pub fn kill_daemon(&self) {
        if let Some(mut child) = self.daemon.lock().unwrap().take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub fn daemon_log(&self) -> String {
        std::fs::read_to_string(self.dir.join("vroomd.log")).unwrap_or_default()
    }

    pub fn vroom(&self, args: &[&str]) -> Output {
        self.command().args(args).output().expect("run vroom")
    }

    /// Runs vroom, asserts success and returns stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.vroom(args);
        assert!(
            out.status.success(),
            "vroom {args:?} failed: {}{}",
            String::from_utf8_lossy(&out.stderr),
            String::from_utf8_lossy(&out.stdout)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Runs vroom, asserts failure with a one-line `error:` cause and returns stderr.
    pub fn fail(&self, args: &[&str]) -> String {
        let out = self.vroom(args);
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(
            !out.status.success(),
            "vroom {args:?} should have failed; stdout: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        // vroom's own errors are one `error:` line; clap's usage errors
        // start with one and go on with the usage and a hint.
        let cause = stderr.lines().find(|l| l.starts_with("error: "));
        assert!(
            cause.is_some(),
            "vroom {args:?}: no `error:` cause on stderr: {stderr:?}"
        );
        stderr
    }

    pub fn instance(&self, name: &str) -> Instance {
        serde_json::from_str(&self.ok(&["inspect", "--json", name])).unwrap()
    }

    pub fn instances(&self) -> Vec<Instance> {
        serde_json::from_str(&self.ok(&["ps", "--json"])).unwrap()
    }

    /// Waits until `check` holds for the instance, or panics with its state.
    pub fn wait_for(
        &self,
        name: &str,
        what: &str,
        timeout: Duration,
        check: impl Fn(&Instance) -> bool,
    ) -> Instance {
        let deadline = Instant::now() + timeout;
        loop {
            let instance = self.instance(name);
            if check(&instance) {
                return instance;
            }
            assert!(
                Instant::now() < deadline,
                "{name}: timed out waiting for {what}; now {:?}",
                instance.status
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// QEMU processes that belong to this test's data dir.
    pub fn qemu_pids(&self) -> Vec<u32> {
        let needle = self.dir.display().to_string();
        let run_dir = format!("VROOM_RUN_DIR={needle}/");
        processes(|proc_dir, cmdline| {
            let is_qemu = cmdline.starts_with("qemu-system") || cmdline.contains("/qemu-system");
            // A jailed QEMU names its run dir only in its environment.
            let environ = std::fs::read(proc_dir.join("environ")).unwrap_or_default();
            let ours = cmdline.contains(&needle)
                || environ
                    .split(|b| *b == 0)
                    .any(|v| v.starts_with(run_dir.as_bytes()));
            is_qemu && ours
        })
    }

    /// Every `vroom daemon` of this test's data dir (by argument or environment).
    pub fn daemon_pids(&self) -> Vec<u32> {
        let needle = self.dir.display().to_string();
        let in_env = format!("VROOM_DATA_DIR={needle}");
        processes(|proc_dir, cmdline| {
            let environ = std::fs::read(proc_dir.join("environ")).unwrap_or_default();
            cmdline.split('\0').any(|a| a == "daemon")
                && (cmdline.split('\0').any(|a| a == needle)
                    || environ.split(|b| *b == 0).any(|v| v == in_env.as_bytes()))
        })
    }

    /// The qemu-nbd processes serving this test's volume exports.
    pub fn nbd_pids(&self) -> Vec<u32> {
        let needle = format!("--pid-file={}/", self.dir.display());
        processes(|_, cmdline| cmdline.contains("qemu-nbd") && cmdline.contains(&needle))
    }

    /// Host interfaces this test created (bridges and taps carry its prefix).
    pub fn links(&self) -> Vec<String> {
        let mut links: Vec<String> = std::fs::read_dir("/sys/class/net")
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with(&self.prefix))
            .collect();
        links.sort();
        links
    }

    /// Files under the instances dir: none may remain after a failed command.
    pub fn instance_dirs(&self) -> Vec<String> {
        std::fs::read_dir(self.dir.join("instances"))
            .map(|d| {
                d.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Network namespaces this test made (named `<prefix>-...`).
    pub fn namespaces(&self) -> Vec<String> {
        let out = Command::new("ip")
            .args(["netns", "list"])
            .output()
            .map(|o| o.stdout)
            .unwrap_or_default();
        String::from_utf8_lossy(&out)
            .lines()
            .filter_map(|l| l.split_whitespace().next())
            .filter(|n| n.starts_with(&format!("{}-", self.prefix)))
            .map(String::from)
            .collect()
    }

    /// Makes a namespace `<prefix>-<name>` joined to the host by a veth pair
    /// `<prefix><name>` (host end) with `ns_cidr` inside and `gateway` as its
    /// default route. The host end is left for the caller to address or bridge.
    pub fn namespace(&self, name: &str, ns_cidr: &str, gateway: &str) -> (String, String) {
        let ns = format!("{}-{name}", self.prefix);
        let host_end = format!("{}{name}", self.prefix);
        let sh = |cmd: &str| {
            let status = Command::new("sh").arg("-c").arg(cmd).status().unwrap();
            assert!(status.success(), "{cmd}");
        };
        sh(&format!("ip netns add {ns}"));
        sh(&format!(
            "ip link add {host_end} type veth peer name eth0 netns {ns}"
        ));
        sh(&format!("ip -n {ns} addr add {ns_cidr} dev eth0 && ip -n {ns} link set eth0 up && ip -n {ns} link set lo up"));
        sh(&format!("ip -n {ns} route add default via {gateway}"));
        sh(&format!("ip link set {host_end} up"));
        (ns, host_end)
    }

    /// Removes namespaces this test made (by their `name`): the host end of
    /// each veth first, since a namespace's own goes only when the kernel's
    /// namespace cleanup gets to it, seconds later under load.
    pub fn remove_namespaces(&self, names: &[&str]) {
        for name in names {
            let _ = Command::new("ip")
                .args(["link", "del", &format!("{}{name}", self.prefix)])
                .stderr(std::process::Stdio::null())
                .status();
            sh(&format!("ip netns del {}-{name}", self.prefix));
        }
    }

    /// A namespace `<prefix>-<name>` whose `eth0` is plugged into a vroom
    /// network's bridge; with `addr` (`CIDR`, gateway) it is configured, without
    /// it the caller configures it (e.g. by DHCP).
    pub fn namespace_on(&self, name: &str, network: &str, addr: Option<(&str, &str)>) -> String {
        let ns = format!("{}-{name}", self.prefix);
        let host_end = format!("{}{name}", self.prefix);
        let bridge = self.network(network).bridge;
        sh(&format!("ip netns add {ns}"));
        sh(&format!(
            "ip link add {host_end} type veth peer name eth0 netns {ns}"
        ));
        sh(&format!("ip link set {host_end} master {bridge} up"));
        sh(&format!(
            "ip -n {ns} link set eth0 up && ip -n {ns} link set lo up"
        ));
        if let Some((cidr, gateway)) = addr {
            sh(&format!("ip -n {ns} addr add {cidr} dev eth0"));
            sh(&format!("ip -n {ns} route add default via {gateway}"));
        }
        ns
    }

    /// A client namespace on a vroom network of `subnet` (a /24): address
    /// `.200`, default route via `.1`.
    pub fn client_on(&self, name: &str, network: &str, subnet: &str) -> String {
        self.namespace_on(
            name,
            network,
            Some((
                &format!("{}/24", host(subnet, 200)),
                &host(subnet, 1).to_string(),
            )),
        )
    }

    /// Runs a shell command in a namespace and returns its output.
    pub fn run_in(&self, ns: &str, cmd: &str) -> Output {
        Command::new("ip")
            .args(["netns", "exec", ns, "sh", "-c", cmd])
            .output()
            .expect("run in namespace")
    }

    pub fn network(&self, name: &str) -> vroom_types::Network {
        serde_json::from_str(&self.ok(&["net", "inspect", "--json", name])).unwrap()
    }

    pub fn nft_tables(&self) -> Vec<String> {
        let out = Command::new("nft")
            .args(["list", "tables"])
            .output()
            .map(|o| o.stdout)
            .unwrap_or_default();
        String::from_utf8_lossy(&out)
            .lines()
            .filter(|l| l.contains(&format!("vroom_{}", self.prefix)))
            .map(String::from)
            .collect()
    }

    pub fn assert_nothing_left(&self, context: &str) {
        // A tap goes when the last fd of its QEMU closes, which the kernel
        // finishes a moment after the exit that `rm` waited for: give the
        // host's own cleanup a few seconds, never a leak.
        poll(Duration::from_secs(5), || {
            (self.qemu_pids().is_empty() && self.links().is_empty()).then_some(())
        });
        assert!(
            self.instances().is_empty(),
            "{context}: instances left: {:?}",
            self.instances()
        );
        assert!(
            self.qemu_pids().is_empty(),
            "{context}: QEMU processes left: {:?}",
            self.qemu_pids()
        );
        assert!(
            self.links().is_empty(),
            "{context}: interfaces left: {:?}",
            self.links()
        );
        assert!(
            self.instance_dirs().is_empty(),
            "{context}: instance files left: {:?}",
            self.instance_dirs()
        );
        assert!(
            self.nft_tables().is_empty(),
            "{context}: nft tables left: {:?}",
            self.nft_tables()
        );
    }
}

/// The pids whose `/proc/PID` directory and command line (NULs as they
/// are) `pick` accepts, sorted.
fn processes(pick: impl Fn(&Path, &str) -> bool) -> Vec<u32> {
    let mut pids = vec![];
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
        if pick(&entry.path(), &String::from_utf8_lossy(&cmdline)) {
            pids.push(pid);
        }
    }
    pids.sort();
    pids
}

impl Drop for Env {
    fn drop(&mut self) {
        for pid in self.qemu_pids().into_iter().chain(self.nbd_pids()) {
            // SAFETY: plain syscall.
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        }
        self.kill_daemon();
        for pid in self.daemon_pids() {
            // SAFETY: plain syscall.
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        }
        for link in self.links() {
            let _ = Command::new("ip")
                .args(["link", "del", &link])
                .stderr(Stdio::null())
                .status();
        }
        for ns in self.namespaces() {
            let _ = std::fs::remove_dir_all(format!("/etc/netns/{ns}"));
            let _ = Command::new("ip")
                .args(["netns", "pids", &ns])
                .output()
                .map(|o| {
                    for pid in String::from_utf8_lossy(&o.stdout).split_whitespace() {
                        let _ = Command::new("kill").args(["-9", pid]).status();
                    }
                });
            let _ = Command::new("ip").args(["netns", "del", &ns]).status();
        }
        for table in self.nft_tables() {
            let name = table.trim_start_matches("table ").to_string();
            let _ = Command::new("nft")
                .args(["delete", "table"])
                .args(name.split_whitespace())
                .status();
        }
        if std::thread::panicking() {
            eprintln!(
                "--- vroomd log of {} ---\n{}",
                self.dir.display(),
                self.daemon_log()
            );
        }
        let _ = Command::new("umount")
            .arg("-l")
            .arg(&self.dir)
            .stderr(Stdio::null())
            .status();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A loopback port free right now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Runs a shell command on the host and asserts it succeeded.
pub fn sh(cmd: &str) {
    let status = Command::new("sh").arg("-c").arg(cmd).status().unwrap();
    assert!(status.success(), "{cmd}");
}

/// The n-th address of a subnet.
pub fn host(subnet: &str, n: u32) -> Ipv4Addr {
    let net: vroom_types::Ipv4Net = subnet.parse().unwrap();
    Ipv4Addr::from(u32::from(net.network()) + n)
}

/// `busybox wget` from a namespace (its `-T` option crashes the static build,
/// so `timeout` bounds it): the exit code and the body.
pub fn fetch(env: &Env, ns: &str, url: &str) -> (i32, String) {
    let out = env.run_in(
        ns,
        &format!("timeout 5 busybox wget -qO- {url} 2>&1; echo \"rc=$?\""),
    );
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, rc) = text.rsplit_once("rc=").unwrap_or((&text, "255"));
    (rc.trim().parse().unwrap_or(255), body.to_string())
}

/// The pid of this test's vroomd (the process whose data dir is the test's).
pub fn daemon_pid(env: &Env) -> u32 {
    let needle = format!("VROOM_DATA_DIR={}", env.dir.display());
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_string_lossy().parse::<u32>().ok())
        .find(|pid| {
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let environ = std::fs::read(format!("/proc/{pid}/environ")).unwrap_or_default();
            cmdline.split(|b| *b == 0).any(|a| a == b"daemon")
                && environ.split(|b| *b == 0).any(|v| v == needle.as_bytes())
        })
        .expect("this test's vroomd runs")
}

/// A field of `/proc/PID/status` in KiB, e.g. `VmHWM:` (peak resident memory).
pub fn status_kib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .expect("the field is in /proc/PID/status")
}

/// Polls `check` every 200 ms until it returns `Some` or `timeout` passes.
pub fn poll<T>(timeout: Duration, mut check: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = check() {
            return Some(value);
        }
        if Instant::now() > deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// A web root with a CGI that answers with the caller's address.
pub fn echo_server_root(env: &Env, name: &str) -> String {
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
pub fn serve(env: &Env, ns: &str, port: u16, root: &str) {
    let out = env.run_in(ns, &format!("busybox httpd -p {port} -h {root}"));
    assert!(out.status.success(), "httpd in {ns}: {out:?}");
}

/// A recipe shipped in the repository.
pub fn recipe(name: &str) -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../recipes")
        .join(name)
        .display()
        .to_string()
}

/// The body of `GET http://ip/`.
pub fn http_get(ip: Ipv4Addr) -> std::io::Result<String> {
    let mut stream = TcpStream::connect_timeout(&(ip, 80).into(), Duration::from_secs(5))?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(stream, "GET / HTTP/1.0\r\nHost: {ip}\r\n\r\n")?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    Ok(response)
}

/// Polls the page until it contains `text` (a config change is applied by
/// the time the API answers, but a fresh boot may need a moment).
pub fn page_shows(ip: Ipv4Addr, text: &str) -> bool {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if http_get(ip).is_ok_and(|p| p.contains(text)) {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Asks `server` for `name`'s A record from a namespace (busybox nslookup has
/// its own resolver; the static wget cannot resolve names).
pub fn resolve(env: &Env, ns: &str, name: &str, server: Ipv4Addr) -> Option<String> {
    poll(Duration::from_secs(10), || {
        let out = env.run_in(ns, &format!("busybox nslookup -type=a {name} {server}"));
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        text.lines()
            .skip_while(|l| !l.contains(name))
            .find_map(|l| l.strip_prefix("Address:"))
            .map(|a| a.trim().to_string())
    })
}

/// One DNS query for `name`'s A record, one UDP packet and no retry (a
/// resolver that is restarting refuses it): the first address answered.
pub fn resolve_once(env: &Env, ns: &str, name: &str, server: Ipv4Addr) -> Option<String> {
    const QUERY: &str = r#"
import socket, struct, sys
name, server = sys.argv[1], sys.argv[2]
q = struct.pack(">HHHHHH", 0x7672, 0x0100, 1, 0, 0, 0)
q += b"".join(bytes([len(p)]) + p.encode() for p in name.split(".")) + b"\0" + struct.pack(">HH", 1, 1)
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(2)
s.connect((server, 53))
s.send(q)
r = s.recv(512)
if r[3] & 0x0f or struct.unpack(">H", r[6:8])[0] == 0: sys.exit("no answer, rcode %d" % (r[3] & 0x0f))
print(".".join(str(b) for b in r[-4:]))
"#;
    let script = env.dir.join("query.py");
    std::fs::write(&script, QUERY).unwrap();
    let out = env.run_in(ns, &format!("python3 {} {name} {server}", script.display()));
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// Sends one API request straight to the daemon's socket (never through the
/// CLI, which would start a daemon of its own while none runs) and reads the
/// answer, if one comes.
pub fn send(data_dir: &std::path::Path, method: &str, path: &str, body: &str) {
    let Ok(mut stream) = std::os::unix::net::UnixStream::connect(data_dir.join("vroomd.sock"))
    else {
        return;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(30)));
    let _ = write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: vroomd\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let mut sink = Vec::new();
    let _ = stream.read_to_end(&mut sink);
}

/// Fires `method path` in the background, kills the daemon `delay` later,
/// and starts a new one.
pub fn kill_during(env: &Env, method: &str, path: &str, body: String, delay: Duration) {
    let dir = env.dir.clone();
    let (method, path) = (method.to_string(), path.to_string());
    let sender = std::thread::spawn(move || send(&dir, &method, &path, &body));
    std::thread::sleep(delay);
    env.kill_daemon();
    let _ = sender.join();
    env.start_daemon();
}

/// Waits until no instance is in a transitional state, then checks that the
/// QEMUs of the data dir and the records match one to one.
pub fn assert_consistent(env: &Env, context: &str) {
    let deadline = Instant::now() + Duration::from_secs(90);
    let instances = loop {
        let instances = env.instances();
        // Stopped while wanted running is the gap inside a restart.
        let settled = instances.iter().all(|i| match i.status.state {
            vroom_types::InstanceState::Running | vroom_types::InstanceState::Failed => true,
            vroom_types::InstanceState::Stopped => i.desired == vroom_types::DesiredState::Stopped,
            _ => false,
        });
        if settled {
            break instances;
        }
        assert!(
            Instant::now() < deadline,
            "{context}: instances never settled: {:?}\n{}",
            instances
                .iter()
                .map(|i| (i.spec.name.to_string(), i.status.state))
                .collect::<Vec<_>>(),
            env.daemon_log()
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    let mut recorded: Vec<u32> = instances.iter().filter_map(|i| i.status.pid).collect();
    recorded.sort();
    for i in &instances {
        assert_ne!(
            i.status.state,
            vroom_types::InstanceState::Failed,
            "{context}: {} failed: {:?}",
            i.spec.name,
            i.status.last_error
        );
    }
    assert_eq!(
        env.qemu_pids(),
        recorded,
        "{context}: QEMU processes do not match the records {:?}",
        instances
            .iter()
            .map(|i| (i.spec.name.to_string(), i.status.state, i.status.pid))
            .collect::<Vec<_>>()
    );
}

/// Runs busybox udhcpc in a namespace; its hook applies the lease and records
/// the lease's fields (`ip`, `router`, `dns`).
pub fn dhcp_lease(env: &Env, ns: &str) -> std::collections::BTreeMap<String, String> {
    let hook = env.dir.join(format!("udhcpc-{ns}.sh"));
    let lease_file = env.dir.join(format!("lease-{ns}"));
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
        ns,
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
    lease
        .split_whitespace()
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// The bridge (or splice segment) a host interface is enslaved to.
pub fn master_of(tap: &str) -> Option<String> {
    std::fs::read_link(format!("/sys/class/net/{tap}/master"))
        .ok()
        .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
}

/// Waits until the splice of `appliance` (in front of the VM whose tap is
/// `tap`) settles after a kill inside a splice or an unsplice, and asserts
/// it is whole (active, the tap on its segment, the appliance running) or
/// gone entirely (no appliance, the tap back on `bridge`, no segment left),
/// never between. Returns the splice if whole.
pub fn settled_splice(
    env: &Env,
    appliance: &str,
    tap: &str,
    bridge: &str,
    context: &str,
) -> Option<vroom_types::Splice> {
    let splice = poll(Duration::from_secs(90), || {
        let all: Vec<vroom_types::Splice> =
            serde_json::from_str(&env.ok(&["--json", "splices"])).ok()?;
        match all.into_iter().find(|s| s.appliance.as_str() == appliance) {
            None => Some(None),
            Some(s) if s.state == vroom_types::SpliceState::Active => Some(Some(s)),
            Some(_) => None,
        }
    })
    .unwrap_or_else(|| panic!("{context}: the splice never settled"));
    let instance = env
        .instances()
        .into_iter()
        .find(|i| i.spec.name.as_str() == appliance);
    match &splice {
        Some(s) => {
            assert_eq!(
                master_of(tap).as_deref(),
                Some(s.segment.as_str()),
                "{context}"
            );
            let instance =
                instance.unwrap_or_else(|| panic!("{context}: spliced {appliance} exists"));
            assert_eq!(
                instance.status.state,
                vroom_types::InstanceState::Running,
                "{context}"
            );
        }
        None => {
            assert_eq!(master_of(tap).as_deref(), Some(bridge), "{context}");
            assert!(
                instance.is_none(),
                "{context}: no appliance without a splice"
            );
            let segments: Vec<String> = env
                .links()
                .into_iter()
                .filter(|l| l.starts_with(&format!("{}s", env.prefix)))
                .collect();
            assert!(segments.is_empty(), "{context}: segments left {segments:?}");
        }
    }
    splice
}

/// A host group made for one test, deleted at the end.
pub struct TestGroup {
    pub name: String,
}

impl TestGroup {
    /// A name no group has yet; the group is deleted on drop if made.
    pub fn unique() -> Self {
        TestGroup {
            name: format!("vrt{:04x}", rand::random::<u16>()),
        }
    }

    pub fn new() -> Self {
        let group = Self::unique();
        let status = Command::new("groupadd")
            .args(["--system", &group.name])
            .status()
            .expect("run groupadd");
        assert!(status.success(), "groupadd {}", group.name);
        group
    }

    pub fn gid(&self) -> Option<u32> {
        std::fs::read_to_string("/etc/group")
            .unwrap()
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{}:x:", self.name)))
            .and_then(|rest| rest.split(':').next())
            .and_then(|gid| gid.parse().ok())
    }
}

impl Drop for TestGroup {
    fn drop(&mut self) {
        if self.gid().is_some() {
            let _ = Command::new("groupdel").arg(&self.name).status();
        }
    }
}

/// `psql` from a client namespace: a password login to `database`, one
/// statement; its output (rows as `a|b`) or its error.
pub fn psql(
    ns: &str,
    server: impl std::fmt::Display,
    user: &str,
    password: &str,
    database: &str,
    sql: &str,
) -> Result<String, String> {
    // Bounded: a statement in flight when its server's node loses power
    // would otherwise wait out TCP's retransmissions (about 15 minutes).
    let out = std::process::Command::new("ip")
        .args([
            "netns",
            "exec",
            ns,
            "timeout",
            "--kill-after=5",
            "30",
            "psql",
            "-X",
            "-A",
            "-t",
            "-v",
            "ON_ERROR_STOP=1",
        ])
        .args([
            "-h",
            &server.to_string(),
            "-U",
            user,
            "-d",
            database,
            "-c",
            sql,
        ])
        .env("PGPASSWORD", password)
        .env("PGCONNECT_TIMEOUT", "5")
        .output()
        .expect("run psql (cargo xtask test installs postgresql-client)");
    match out.status.success() {
        true => Ok(String::from_utf8_lossy(&out.stdout).trim().to_string()),
        false => Err(String::from_utf8_lossy(&out.stderr).into_owned()),
    }
}
