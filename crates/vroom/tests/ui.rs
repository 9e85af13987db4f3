//! The web dashboard in a real headless browser: Debian's chromium, driven
//! through chromedriver's W3C WebDriver endpoint by the few JSON calls this
//! test needs (no WebDriver crate or Python: the protocol is JSON over
//! HTTP, and the assertions stay in Rust beside the `Env` harness). Run
//! with `cargo xtask test`, as root.
//!
//! One hello instance and one room (its firewall) are booted. Every page
//! must render with no console error; screenshots of each are kept under
//! `target/tmp/ui-*/` (printed), which outlive the test's data dir.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{free_port, poll, random_subnet, recipe, Env};
use serde_json::{json, Value};

/// One HTTP/1.1 exchange on a fresh connection: status, lowercased head,
/// body (read to its length: chromedriver keeps connections open).
fn http(addr: SocketAddr, request: &str) -> (u16, String, String) {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(120)))
        .unwrap();
    stream.write_all(request.as_bytes()).unwrap();
    let mut raw: Vec<u8> = vec![];
    let mut buf = [0u8; 16 * 1024];
    let complete = |raw: &[u8]| -> bool {
        let Some(end) = raw.windows(4).position(|w| w == b"\r\n\r\n") else {
            return false;
        };
        let head = String::from_utf8_lossy(&raw[..end]).to_lowercase();
        let body = &raw[end + 4..];
        if let Some(length) = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length:"))
            .and_then(|n| n.trim().parse::<usize>().ok())
        {
            return body.len() >= length;
        }
        head.contains("transfer-encoding: chunked") && body.ends_with(b"0\r\n\r\n")
    };
    while !complete(&raw) {
        match stream.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => raw.extend_from_slice(&buf[..n]),
            Err(e) => panic!(
                "reading from {addr}: {e}: {}",
                String::from_utf8_lossy(&raw)
            ),
        }
    }
    let raw = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = raw.split_once("\r\n\r\n").unwrap_or((&raw, ""));
    let head = head.to_lowercase();
    let body = if head.contains("transfer-encoding: chunked") {
        dechunk(body)
    } else {
        body.to_string()
    };
    let code = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (code, head, body)
}

fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = body.split_once("\r\n") {
        let size = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if size == 0 || rest.len() < size {
            break;
        }
        out.push_str(&rest[..size]);
        body = rest[size..].trim_start_matches("\r\n");
    }
    out
}

/// chromedriver and its headless chromium, for one test.
struct Browser {
    driver: Child,
    addr: SocketAddr,
    session: String,
    profile: PathBuf,
}

impl Browser {
    fn start(dir: &Path) -> Browser {
        let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let profile = dir.join("chromium-profile");
        std::fs::create_dir_all(&profile).unwrap();
        let log = std::fs::File::create(dir.join("chromedriver.log")).unwrap();
        // chromium's scratch dirs, which a killed chromium leaves behind,
        // go under the data dir that `Env` removes.
        let scratch = dir.join("chromium-tmp");
        std::fs::create_dir_all(&scratch).unwrap();
        let driver = {
            use std::os::unix::process::CommandExt;
            Command::new("chromedriver")
                .arg(format!("--port={}", addr.port()))
                .env("TMPDIR", &scratch)
                .stdin(Stdio::null())
                .stdout(log.try_clone().unwrap())
                .stderr(log)
                // Its own process group: Drop ends chromium with it.
                .process_group(0)
                .spawn()
                .expect("start chromedriver (Debian's chromium-driver package)")
        };
        let mut browser = Browser {
            driver,
            addr,
            session: String::new(),
            profile,
        };
        poll(Duration::from_secs(20), || {
            TcpStream::connect_timeout(&addr, Duration::from_millis(200)).ok()
        })
        .expect("chromedriver did not listen");
        let binary = ["/usr/lib/chromium/chromium", "/usr/bin/chromium"]
            .into_iter()
            .find(|p| Path::new(p).exists())
            .expect("chromium (Debian's chromium package)");
        let created = browser.call(
            "POST",
            "/session",
            Some(json!({"capabilities": {"alwaysMatch": {
                "browserName": "chrome",
                "unhandledPromptBehavior": "ignore",
                "goog:loggingPrefs": {"browser": "ALL"},
                "goog:chromeOptions": {
                    "binary": binary,
                    "args": [
                        "--headless=new", "--no-sandbox", "--disable-gpu",
                        "--disable-dev-shm-usage", "--no-first-run",
                        "--disable-background-networking", "--disable-extensions",
                        "--window-size=1400,1000",
                        format!("--user-data-dir={}", browser.profile.display()),
                    ]
                }
            }}})),
        );
        browser.session = created["sessionId"]
            .as_str()
            .unwrap_or_else(|| panic!("no WebDriver session: {created}"))
            .to_string();
        browser
    }

    /// One WebDriver command; its `value`.
    fn call(&self, method: &str, path: &str, body: Option<Value>) -> Value {
        let body = body.map(|b| b.to_string()).unwrap_or_default();
        let path = if path == "/session" {
            path.to_string()
        } else {
            format!("/session/{}{path}", self.session)
        };
        let (_, _, answer) = http(
            self.addr,
            &format!(
                "{method} {path} HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                self.addr,
                body.len()
            ),
        );
        let answer: Value = serde_json::from_str(&answer)
            .unwrap_or_else(|e| panic!("{method} {path}: {e}: {answer}"));
        answer["value"].clone()
    }

    fn goto(&self, url: &str) {
        let done = self.call("POST", "/url", Some(json!({ "url": url })));
        assert!(done.is_null(), "navigate to {url}: {done}");
    }

    fn script(&self, js: &str) -> Value {
        self.call(
            "POST",
            "/execute/sync",
            Some(json!({"script": js, "args": []})),
        )
    }

    fn url(&self) -> String {
        self.call("GET", "/url", None)
            .as_str()
            .unwrap_or("")
            .to_string()
    }

    /// The text of the first element matching `css`, if there is one.
    fn text(&self, css: &str) -> Option<String> {
        let found = self.script(&format!(
            "const e = document.querySelector({}); return e ? e.textContent : null;",
            json!(css)
        ));
        found.as_str().map(String::from)
    }

    fn wait_text(&self, css: &str, timeout: Duration, what: &str) -> String {
        poll(timeout, || self.text(css)).unwrap_or_else(|| {
            panic!(
                "{what}: no {css} within {timeout:?} on {}: {}",
                self.url(),
                self.script("return document.body.innerText")
            )
        })
    }

    fn click(&self, css: &str) {
        let element = self.call(
            "POST",
            "/element",
            Some(json!({"using": "css selector", "value": css})),
        );
        let id = element
            .as_object()
            .and_then(|o| o.values().next())
            .and_then(|v| v.as_str())
            .unwrap_or_else(|| panic!("no {css}: {element}"))
            .to_string();
        self.call("POST", &format!("/element/{id}/click"), Some(json!({})));
    }

    /// Clicks `css` until its confirmation dialog shows (the live page may
    /// replace the button between the lookup and the click), accepts it;
    /// returns its text.
    fn click_and_confirm(&self, css: &str) -> String {
        for _ in 0..5 {
            self.click(css);
            let text = poll(Duration::from_secs(4), || {
                self.call("GET", "/alert/text", None)
                    .as_str()
                    .map(String::from)
            });
            if let Some(text) = text {
                self.call("POST", "/alert/accept", Some(json!({})));
                return text;
            }
        }
        panic!("no confirmation dialog after clicking {css} five times");
    }

    fn screenshot(&self, path: &Path) {
        use base64::Engine;
        let data = self.call("GET", "/screenshot", None);
        let png = base64::engine::general_purpose::STANDARD
            .decode(data.as_str().expect("a screenshot"))
            .unwrap();
        std::fs::write(path, png).unwrap();
        println!("screenshot: {}", path.display());
    }

    /// The browser's console messages since the last call, at level SEVERE.
    fn console_errors(&self) -> Vec<String> {
        let log = self.call("POST", "/se/log", Some(json!({"type": "browser"})));
        let entries = log
            .as_array()
            .unwrap_or_else(|| panic!("the browser log: {log}"));
        entries
            .iter()
            .filter(|e| e["level"] == "SEVERE")
            .map(|e| e["message"].as_str().unwrap_or("").to_string())
            .collect()
    }

    fn cookies(&self) -> Vec<Value> {
        self.call("GET", "/cookie", None)
            .as_array()
            .cloned()
            .unwrap_or_default()
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        if !self.session.is_empty() {
            let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                self.call("DELETE", "", None)
            }));
        }
        // SAFETY: plain syscall, on the group this test started.
        unsafe { libc::kill(-(self.driver.id() as i32), libc::SIGKILL) };
        let _ = self.driver.wait();
        // A chromium that left the group still names this test's profile.
        let profile = self.profile.display().to_string();
        for entry in std::fs::read_dir("/proc").unwrap().flatten() {
            let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
                continue;
            };
            let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
            if String::from_utf8_lossy(&cmdline).contains(&profile) {
                // SAFETY: plain syscall.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
    }
}

/// `vroom ui`, running for the test: its link and port.
struct Dashboard {
    child: Child,
    link: String,
    addr: SocketAddr,
}

impl Dashboard {
    fn start(env: &Env) -> Dashboard {
        let log = std::fs::File::create(env.dir.join("ui.log")).unwrap();
        let mut child = env
            .command()
            .arg("ui")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .expect("start vroom ui");
        let mut stdout = child.stdout.take().unwrap();
        let mut line = vec![];
        let mut byte = [0u8];
        while stdout.read(&mut byte).unwrap_or(0) == 1 && byte[0] != b'\n' {
            line.push(byte[0]);
        }
        let link = String::from_utf8(line).unwrap();
        let port: u16 = link
            .strip_prefix("http://127.0.0.1:")
            .and_then(|rest| rest.split('/').next())
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| {
                panic!(
                    "vroom ui printed {link:?}: {}",
                    std::fs::read_to_string(env.dir.join("ui.log")).unwrap_or_default()
                )
            });
        assert!(link.contains("/ui/?token="), "{link}");
        Dashboard {
            child,
            link,
            addr: format!("127.0.0.1:{port}").parse().unwrap(),
        }
    }

    /// A raw request to the proxy, as another program (or page) would send it.
    fn request(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &str,
    ) -> (u16, String, String) {
        let mut text = format!(
            "{method} {path} HTTP/1.1\r\nConnection: close\r\nContent-Length: {}\r\n",
            body.len()
        );
        if !headers.iter().any(|(k, _)| k.eq_ignore_ascii_case("host")) {
            text.push_str(&format!("Host: {}\r\n", self.addr));
        }
        for (k, v) in headers {
            text.push_str(&format!("{k}: {v}\r\n"));
        }
        text.push_str("\r\n");
        text.push_str(body);
        http(self.addr, &text)
    }
}

impl Drop for Dashboard {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn state(env: &Env, name: &str) -> String {
    env.instance(name).status.state.to_string()
}

#[test]
fn the_dashboard_works_in_a_real_browser_and_refuses_what_it_must() {
    let env = Env::new("ui");
    let artifacts = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!(
        "ui-{}",
        env.dir.file_name().unwrap().to_string_lossy()
    ));
    std::fs::create_dir_all(&artifacts).unwrap();
    println!("artifacts: {}", artifacts.display());

    // One room (its firewall boots) with one hello in its lan, started later.
    env.ok(&["image", "build", &recipe("firewall")]);
    env.ok(&[
        "net",
        "create",
        "wan",
        "--subnet",
        &random_subnet(),
        "--nat",
    ]);
    env.ok(&[
        "room",
        "create",
        "r1",
        "--wan",
        "wan",
        "--subnet",
        &format!("lan={}", random_subnet()),
        "--subnet",
        &format!("dmz={}", random_subnet()),
    ]);
    let room: Value = serde_json::from_str(&env.ok(&["--json", "room", "inspect", "r1"])).unwrap();
    let firewall = room["firewall"].as_str().unwrap().to_string();

    let ui = Dashboard::start(&env);
    let base = format!("http://{}", ui.addr);

    // Without the link: no session. The wrong Host: refused before anything.
    let (code, _, body) = ui.request("GET", "/ui/", &[], "");
    assert_eq!(code, 401, "{body}");
    assert!(body.contains("no session"), "{body}");
    let (code, _, body) = ui.request("GET", "/ui/", &[("Host", "evil.example")], "");
    assert_eq!(code, 403, "{body}");
    assert!(body.contains("answers only as"), "{body}");

    // The link signs the browser in once, and leaves the address.
    let browser = Browser::start(&env.dir);
    browser.goto(&ui.link);
    assert_eq!(browser.url(), format!("{base}/ui/"));
    let cookies = browser.cookies();
    let session = cookies
        .iter()
        .find(|c| c["name"] == "vroom_ui")
        .unwrap_or_else(|| panic!("no session cookie: {cookies:?}"));
    assert_eq!(session["httpOnly"], true, "{session}");
    assert_eq!(session["sameSite"], "Strict", "{session}");
    assert_eq!(session["path"], "/", "{session}");
    let cookie = format!("vroom_ui={}", session["value"].as_str().unwrap());
    assert_eq!(
        browser.script("return document.cookie"),
        "",
        "HttpOnly: no script reads it"
    );

    // A reused link: refused, to another program and in the browser, whose
    // session still works.
    let token_path = ui.link.strip_prefix(&base).unwrap();
    let (code, _, body) = ui.request("GET", token_path, &[], "");
    assert_eq!(code, 403, "{body}");
    assert!(body.contains("cannot be used again"), "{body}");
    browser.goto(&ui.link);
    let refusal = browser.wait_text("#refusal", Duration::from_secs(5), "reused link");
    assert!(refusal.contains("cannot be used again"), "{refusal}");
    let _ = browser.console_errors(); // the 403 of the refused page itself

    // Every page renders, connects to the event stream and logs no error.
    let pages = [
        ("overview", "/ui/".to_string(), "Overview"),
        ("instances", "/ui/instances".to_string(), "Instances"),
        ("rooms", "/ui/rooms".to_string(), "Rooms"),
        ("room", "/ui/rooms/r1".to_string(), "Room r1"),
        ("services", "/ui/services".to_string(), "Services"),
        (
            "wiring",
            "/ui/wiring".to_string(),
            "Networks, splices and mirrors",
        ),
        ("snapshots", "/ui/snapshots".to_string(), "Snapshots"),
        ("volumes", "/ui/volumes".to_string(), "Volumes"),
        ("nodes", "/ui/nodes".to_string(), "Cluster nodes"),
        ("events", "/ui/events".to_string(), "Events"),
    ];
    let visit = |label: &str, path: &str, heading: &str| {
        browser.goto(&format!("{base}{path}"));
        let h1 = browser.wait_text("h1", Duration::from_secs(10), label);
        assert_eq!(h1, heading, "{path}");
        poll(Duration::from_secs(10), || {
            (browser.text("#live").as_deref() == Some("live")).then_some(())
        })
        .unwrap_or_else(|| {
            panic!(
                "{path}: the event stream never connected: {:?}",
                browser.text("#live")
            )
        });
        // Let the first refresh and metrics read finish.
        std::thread::sleep(Duration::from_millis(700));
        let errors = browser.console_errors();
        assert!(errors.is_empty(), "{path}: console errors: {errors:#?}");
        browser.screenshot(&artifacts.join(format!("{label}.png")));
    };
    for (label, path, heading) in &pages {
        visit(label, path, heading);
    }

    // The room page draws the room: Graphviz's SVG, naming its firewall.
    browser.goto(&format!("{base}/ui/rooms/r1"));
    let drawn = browser.wait_text("figure#topology svg", Duration::from_secs(10), "topology");
    assert!(drawn.contains(&firewall), "{drawn}");
    assert!(drawn.contains("r1-lan"), "{drawn}");

    // An instance started from the CLI appears without a reload.
    browser.goto(&format!("{base}/ui/instances"));
    browser.wait_text("#live", Duration::from_secs(10), "instances");
    poll(Duration::from_secs(10), || {
        (browser.text("#live").as_deref() == Some("live")).then_some(())
    })
    .expect("the instances page follows the events");
    browser.script("window.__sameDocument = true; return null;");
    env.ok(&[
        "run",
        "hello",
        "--name",
        "u1",
        "--room",
        "r1",
        "--segment",
        "lan",
    ]);
    browser.wait_text(
        "tr[data-instance=\"u1\"][data-state=\"running\"]",
        Duration::from_secs(20),
        "u1 appears running",
    );
    assert_eq!(
        browser.script("return window.__sameDocument === true"),
        true,
        "the page was reloaded"
    );
    // Its CPU sparkline and memory fill from successive /metrics reads.
    poll(Duration::from_secs(20), || {
        browser.text("svg[data-spark=\"u1\"] polyline").map(|_| ())
    })
    .expect("u1's CPU sparkline");
    let rss = browser.wait_text("[data-rss=\"u1\"]", Duration::from_secs(5), "rss");
    assert!(
        poll(Duration::from_secs(10), || browser
            .text("[data-rss=\"u1\"]")
            .filter(|t| t.contains("MiB resident")))
        .is_some(),
        "{rss}"
    );
    let errors = browser.console_errors();
    assert!(errors.is_empty(), "instances: {errors:#?}");
    browser.screenshot(&artifacts.join("instances-live.png"));

    // A service created from the CLI appears on the Services page without
    // a reload: its row at strength, its member balanced.
    browser.goto(&format!("{base}/ui/services"));
    poll(Duration::from_secs(10), || {
        (browser.text("#live").as_deref() == Some("live")).then_some(())
    })
    .expect("the services page follows the events");
    browser.script("window.__sameDocument = true; return null;");
    env.ok(&[
        "service",
        "create",
        "shop",
        "--image",
        "hello",
        "--replicas",
        "1",
        "--room",
        "r1",
    ]);
    let row = poll(Duration::from_secs(20), || {
        browser
            .text("tr[data-service=\"shop\"]")
            .filter(|t| t.contains("1/1") && t.contains("room r1") && t.contains("ready"))
    })
    .unwrap_or_else(|| {
        panic!(
            "shop at strength on the page: {:?}",
            browser.text("#services")
        )
    });
    assert!(row.contains("hello"), "{row}");
    let member = browser.wait_text(
        "tr[data-member=\"shop-1\"]",
        Duration::from_secs(10),
        "shop's member",
    );
    assert!(
        member.contains("running") && member.contains("yes"),
        "{member}"
    );
    assert_eq!(
        browser.script("return window.__sameDocument === true"),
        true,
        "the page was reloaded"
    );
    let errors = browser.console_errors();
    assert!(errors.is_empty(), "services: {errors:#?}");
    browser.screenshot(&artifacts.join("services-live.png"));

    // Its page follows the console.
    browser.goto(&format!("{base}/ui/instances/u1"));
    let console = poll(Duration::from_secs(20), || {
        browser.text("#logs").filter(|t| !t.trim().is_empty())
    })
    .expect("u1's console on its page");
    assert!(console.len() > 20, "{console}");
    browser.screenshot(&artifacts.join("instance.png"));

    // A snapshot from the page: asked, taken, then listed on its page.
    let asked =
        browser.click_and_confirm("#summary button[data-action=\"snapshot\"][data-name=\"u1\"]");
    assert!(asked.contains("Snapshot instance u1"), "{asked}");
    let snapshot = poll(Duration::from_secs(90), || {
        let list: Vec<Value> = serde_json::from_str(&env.ok(&["snapshot", "ls", "--json"])).ok()?;
        list.first()
            .and_then(|s| s["name"].as_str())
            .map(String::from)
    })
    .expect("the page's snapshot of u1");
    env.wait_for(
        "u1",
        "running after its snapshot",
        Duration::from_secs(60),
        |i| i.status.state == vroom_types::InstanceState::Running,
    );
    visit("snapshots-after", "/ui/snapshots", "Snapshots");
    browser.wait_text(
        &format!("tr[data-snapshot=\"{snapshot}\"]"),
        Duration::from_secs(5),
        "the snapshot listed",
    );
    browser.goto(&format!("{base}/ui/instances/u1"));
    browser.wait_text("#summary", Duration::from_secs(10), "u1's page again");

    // A cross-origin POST with the browser's own cookie changes nothing;
    // neither does one with no Origin, or to the wrong Host.
    for headers in [
        vec![
            ("Origin", "http://evil.example"),
            ("Cookie", cookie.as_str()),
        ],
        vec![("Cookie", cookie.as_str())],
        vec![
            ("Origin", base.as_str()),
            ("Sec-Fetch-Site", "cross-site"),
            ("Cookie", cookie.as_str()),
        ],
        vec![
            ("Host", "attacker.example"),
            ("Origin", "http://attacker.example"),
            ("Cookie", cookie.as_str()),
        ],
    ] {
        let mut headers = headers;
        headers.push(("Content-Type", "application/json"));
        let (code, _, body) = ui.request(
            "POST",
            "/v1/instances/u1/actions",
            &headers,
            r#"{"action":"stop"}"#,
        );
        assert_eq!(code, 403, "{headers:?}: {body}");
        assert!(
            body.contains("refused") || body.contains("answers only as"),
            "{body}"
        );
    }
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(
        state(&env, "u1"),
        "running",
        "a refused POST changed nothing"
    );

    // A stop from the page: asked first, then done, and seen without a reload.
    browser.script("window.__sameDocument = true; return null;");
    let asked =
        browser.click_and_confirm("#summary button[data-action=\"stop\"][data-name=\"u1\"]");
    assert!(asked.contains("Stop instance u1"), "{asked}");
    let deadline = Instant::now() + Duration::from_secs(60);
    while state(&env, "u1") != "stopped" {
        assert!(
            Instant::now() < deadline,
            "u1 did not stop: {}",
            state(&env, "u1")
        );
        std::thread::sleep(Duration::from_millis(300));
    }
    browser.wait_text(
        "#summary tr[data-instance=\"u1\"][data-state=\"stopped\"]",
        Duration::from_secs(10),
        "u1 shown stopped",
    );
    assert_eq!(
        browser.script("return window.__sameDocument === true"),
        true
    );
    let errors = browser.console_errors();
    assert!(errors.is_empty(), "instance page: {errors:#?}");
    browser.screenshot(&artifacts.join("instance-stopped.png"));
    // The overview counts it and lists its event.
    visit("overview-after", "/ui/", "Overview");
    let recent = browser.wait_text("#recent", Duration::from_secs(5), "recent events");
    assert!(
        recent.contains("u1") && recent.contains("stopped"),
        "{recent}"
    );

    drop(browser);
    drop(ui);
    env.ok(&["snapshot", "rm", &snapshot]);
    env.ok(&["rm", "-f", "u1"]);
    env.ok(&["room", "rm", "--force", "r1"]);
    env.ok(&["net", "rm", "wan"]);
    env.assert_nothing_left("ui");
}
