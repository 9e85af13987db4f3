//! An HTTP client that loops requests from a network namespace while a
//! test changes the path under it (a splice, a migration), and what its
//! log says afterwards.

use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use super::{poll, Env};

/// An HTTP client looping in a namespace until `stop` exists: every 100 ms
/// a request on a kept-alive connection and one on a new connection. Each
/// result goes to `log` as `MILLIS KIND OUTCOME` (`ok`, `timeout`, `reset`,
/// `refused`, `error:...`).
const LOOP_CLIENT: &str = r#"
import http.client, socket, sys, time, os
url_host, log_path, stop = sys.argv[1], sys.argv[2], sys.argv[3]
log = open(log_path, "w", buffering=1)
t0 = time.time()
def outcome(e):
    if isinstance(e, (ConnectionResetError, BrokenPipeError)): return "reset"
    if isinstance(e, ConnectionRefusedError): return "refused"
    if isinstance(e, (socket.timeout, TimeoutError)): return "timeout"
    return "error:" + type(e).__name__
def get(conn):
    conn.request("GET", "/", headers={"Connection": "keep-alive"})
    r = conn.getresponse(); r.read()
    if r.status != 200: raise RuntimeError(r.status)
kept = None
while not os.path.exists(stop):
    for kind in ("keepalive", "new"):
        try:
            if kind == "new":
                c = http.client.HTTPConnection(url_host, 80, timeout=2); get(c); c.close()
            else:
                if kept is None: kept = http.client.HTTPConnection(url_host, 80, timeout=2)
                get(kept)
            res = "ok"
        except Exception as e:
            res = outcome(e)
            if kind == "keepalive":
                try: kept.close()
                except Exception: pass
                kept = None
        log.write("%d %s %s\n" % ((time.time() - t0) * 1000, kind, res))
    time.sleep(0.1)
"#;

pub struct LoopClient {
    child: Child,
    log: PathBuf,
    stop: PathBuf,
}

impl LoopClient {
    pub fn start(env: &Env, ns: &str, ip: Ipv4Addr) -> Self {
        let script = env.dir.join("loop.py");
        std::fs::write(&script, LOOP_CLIENT).unwrap();
        let log = env.dir.join(format!("loop-{ns}.log"));
        let stop = env.dir.join(format!("loop-{ns}.stop"));
        let child = Command::new("ip")
            .args(["netns", "exec", ns, "python3"])
            .arg(&script)
            .arg(ip.to_string())
            .arg(&log)
            .arg(&stop)
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        LoopClient { child, log, stop }
    }

    /// The results so far: (millis, kind, outcome).
    pub fn results(&self) -> Vec<(u64, String, String)> {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| {
                let mut f = l.split_whitespace();
                Some((
                    f.next()?.parse().ok()?,
                    f.next()?.to_string(),
                    f.next()?.to_string(),
                ))
            })
            .collect()
    }

    pub fn now_ms(&self) -> u64 {
        self.results().last().map(|r| r.0).unwrap_or(0)
    }

    /// Waits until requests succeed again, on both kinds of connection.
    pub fn wait_ok(&self, timeout: Duration) -> bool {
        let since = self.now_ms();
        poll(timeout, || {
            let r = self.results();
            let ok = |kind: &str| {
                r.iter()
                    .any(|(t, k, o)| *t > since && k == kind && o == "ok")
            };
            (ok("keepalive") && ok("new")).then_some(())
        })
        .is_some()
    }

    /// Waits until the last three new connections made after `since` all
    /// failed (a rule in the path blocks them).
    pub fn wait_new_blocked(&self, since: u64, timeout: Duration) -> bool {
        poll(timeout, || {
            let new: Vec<_> = self
                .results()
                .into_iter()
                .filter(|(t, k, _)| *t > since && k == "new")
                .collect();
            (new.len() >= 3 && new[new.len() - 3..].iter().all(|r| r.2 != "ok")).then_some(())
        })
        .is_some()
    }

    pub fn stop(mut self) -> Vec<(u64, String, String)> {
        std::fs::write(&self.stop, "").unwrap();
        let _ = poll(Duration::from_secs(10), || {
            self.child.try_wait().ok().flatten()
        });
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.results()
    }
}

/// The longest run of failed requests (ms), ignoring those in `skip` windows.
pub fn longest_outage(results: &[(u64, String, String)], skip: &[(u64, u64)]) -> u64 {
    let mut longest = 0;
    let mut start: Option<u64> = None;
    for (t, _, outcome) in results {
        if skip.iter().any(|(a, b)| t >= a && t <= b) {
            start = None;
            continue;
        }
        if outcome == "ok" {
            if let Some(s) = start.take() {
                longest = longest.max(t - s);
            }
        } else if start.is_none() {
            start = Some(*t);
        }
    }
    longest
}
