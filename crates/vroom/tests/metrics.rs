//! vroomd's metrics as a real Prometheus sees them: scraped from the
//! daemon's loopback listener, queried through Prometheus's own API, and
//! linted by promtool. Run with `cargo xtask test`, as root.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::{free_port, page_shows, poll, random_subnet, Env};

/// A plain HTTP GET: the status line's code, the headers and the body.
fn get(addr: SocketAddr, path: &str) -> (u16, String, String) {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    write!(
        stream,
        "GET {path} HTTP/1.0\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let (head, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
    let code = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (code, head.to_lowercase(), body.to_string())
}

/// A Prometheus of the test's own, scraping `target` every second.
struct Prometheus {
    child: Child,
    addr: SocketAddr,
}

impl Prometheus {
    fn start(env: &Env, target: SocketAddr) -> Self {
        let dir = env.dir.join("prometheus");
        std::fs::create_dir_all(&dir).unwrap();
        let config = dir.join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\nscrape_configs:\n  - job_name: vroomd\n    static_configs:\n      - targets: ['{target}']\n"
            ),
        )
        .unwrap();
        let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let log = std::fs::File::create(dir.join("prometheus.log")).unwrap();
        let child = Command::new("prometheus")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address={addr}"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start prometheus (Debian's prometheus package)");
        Prometheus { child, addr }
    }

    /// The results of an instant query (`/api/v1/query`).
    fn query(&self, promql: &str) -> Vec<serde_json::Value> {
        let encoded: String = promql
            .bytes()
            .map(|b| {
                if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
                    (b as char).to_string()
                } else {
                    format!("%{b:02X}")
                }
            })
            .collect();
        let Ok(stream) = TcpStream::connect_timeout(&self.addr, Duration::from_millis(500)) else {
            return vec![];
        };
        drop(stream);
        let (code, _, body) = get(self.addr, &format!("/api/v1/query?query={encoded}"));
        if code != 200 {
            return vec![];
        }
        let answer: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
        answer["data"]["result"]
            .as_array()
            .cloned()
            .unwrap_or_default()
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn value(result: &serde_json::Value) -> f64 {
    result["value"][1]
        .as_str()
        .and_then(|v| v.parse().ok())
        .unwrap_or(f64::NAN)
}

#[test]
fn a_real_prometheus_scrapes_vroomd_and_promtool_finds_nothing_to_lint() {
    let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let env = Env::with_env("metrics", vec![("VROOM_METRICS", addr.to_string())]);
    env.ok(&["net", "create", "lan", "--subnet", &random_subnet()]);
    env.ok(&["run", "hello", "--name", "m1", "--net", "lan"]);
    let ip = env.instance("m1").nics[0].ip.unwrap();
    assert!(page_shows(ip, "Hello"), "m1 serves its page");

    // The exposition itself: its content type, and what a lint says.
    let (code, head, text) = get(addr, "/metrics");
    assert_eq!(code, 200, "{head}{text}");
    assert!(
        head.contains("content-type: text/plain; version=0.0.4"),
        "{head}"
    );
    assert!(
        text.contains(r#"vroom_instance_state{state="running",vm="m1"} 1"#),
        "{text}"
    );
    let mut promtool = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool (Debian's prometheus package)");
    promtool
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let lint = promtool.wait_with_output().unwrap();
    assert!(
        lint.status.success() && lint.stdout.is_empty() && lint.stderr.is_empty(),
        "promtool check metrics: {}{}",
        String::from_utf8_lossy(&lint.stdout),
        String::from_utf8_lossy(&lint.stderr)
    );
    // The same through the API's unix socket.
    let mut socket = std::os::unix::net::UnixStream::connect(env.dir.join("vroomd.sock")).unwrap();
    socket
        .write_all(b"GET /metrics HTTP/1.0\r\nHost: vroomd\r\n\r\n")
        .unwrap();
    let mut api = String::new();
    socket.read_to_string(&mut api).unwrap();
    assert!(api.starts_with("HTTP/1.0 200"), "{api}");
    assert!(api.contains(r#"vroom_instance_info{"#), "{api}");

    // A real Prometheus scrapes it: the instance, its traffic, its boot.
    let prometheus = Prometheus::start(&env, addr);
    let received = poll(Duration::from_secs(60), || {
        prometheus
            .query(r#"sum(vroom_instance_network_receive_bytes_total{vm="m1",network="lan"})"#)
            .first()
            .map(value)
            .filter(|v| *v > 0.0)
    });
    assert!(
        received.is_some(),
        "Prometheus never had m1's received bytes: {:?}",
        prometheus.query("up")
    );
    let info = prometheus.query(r#"vroom_instance_info{vm="m1",image="hello"}"#);
    assert_eq!(info.len(), 1, "{info:?}");
    let up = prometheus.query(r#"up{job="vroomd"}"#);
    assert_eq!(up.first().map(value), Some(1.0), "{up:?}");
    let boots = prometheus.query(r#"vroom_instance_start_seconds_count{how="cold"}"#);
    assert!(boots.first().map(value).unwrap_or(0.0) >= 1.0, "{boots:?}");
    let requests = prometheus
        .query(r#"vroom_api_requests_total{route="/v1/instances",method="POST",status="201"}"#);
    assert!(
        requests.first().map(value).unwrap_or(0.0) >= 1.0,
        "{requests:?}"
    );
    let cpu = prometheus.query(r#"vroom_instance_cpu_seconds_total{vm="m1"}"#);
    assert!(cpu.first().map(value).unwrap_or(0.0) > 0.0, "{cpu:?}");
    // The guest booted from its root drive: QEMU counted the reads.
    let root = prometheus.query(r#"vroom_instance_block_read_bytes_total{vm="m1",drive="root"}"#);
    assert!(root.first().map(value).unwrap_or(0.0) > 0.0, "{root:?}");

    // A removed instance leaves no series behind at the next scrape.
    env.ok(&["rm", "-f", "m1"]);
    let (_, _, text) = get(addr, "/metrics");
    assert!(!text.contains(r#"vm="m1""#), "{text}");
    env.ok(&["net", "rm", "lan"]);
}

#[test]
fn a_metrics_listener_off_loopback_or_on_a_taken_port_is_refused() {
    let env = Env::bare("metrics-bad");
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let taken_addr = taken.local_addr().unwrap();
    for (addr, says) in [
        ("0.0.0.0:9464".to_string(), "takes a loopback address"),
        (taken_addr.to_string(), "cannot serve metrics on"),
    ] {
        let out = env
            .command()
            .args(["daemon", "--metrics", &addr])
            .stdin(Stdio::null())
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{addr}: {stderr}");
        let errors: Vec<&str> = stderr.lines().filter(|l| l.starts_with("error:")).collect();
        assert_eq!(errors.len(), 1, "{stderr}");
        assert!(errors[0].contains(says), "{stderr}");
        assert!(
            !env.dir.join("vroomd.sock").exists(),
            "a refused daemon left its socket"
        );
    }
}
