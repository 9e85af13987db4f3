//! `vroom bench service`: what a service's balancer costs and how fast a
//! service grows, against baselines measured in the same run.
//!
//! - The balancer's overhead: `wrk` (keep-alive, 4 connections) through
//!   the service's address against `wrk` straight at its one member,
//!   interleaved: p50 and p99 latency and requests per second.
//! - Scale-out: `service scale` from 1 to 3 until all three run and are
//!   balanced, with cold boots (the image has no warm snapshot: the
//!   baseline) against warm starts (after `image warm`).
//! - Requests failed under `wrk` (a new connection per request) during a
//!   scale-in from 3 to 1 and during a rolling update to a second image of
//!   the same recipe with another version (the goal is 0).
//!
//! - SLO breach to SLO restored: a service of `bench-work` (hello whose
//!   `/cgi-bin/work` takes 100 ms, one request at a time per member, so more
//!   members serve more whatever the host's CPU) with `p95<300ms` and 1..4
//!   members, under one connection, then four (each request waits for three
//!   others: 400 ms); seconds from the step until the service shows the p95
//!   under the target again with every member it wants balanced. Members
//!   boot cold (the service made `--cold`: the baseline) against warm
//!   starts, run alternately.
//!
//! The load runs from the host on the service's own network; the bench
//! starts vroomd for the data dir if none answers. For the cold baseline
//! it removes web's warm snapshot (a service starts its members warm
//! whenever the image has one), then makes it again with `image warm`.

use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use vroom_client::Client;
use vroom_types::{
    InstanceState, Name, NetworkSpec, Service, ServiceDefinition, ServiceScaleRequest, WarmRequest,
};

use crate::stats::median;

const IMAGE: &str = "web";
/// The second version of `web` that the rolling update moves to.
const IMAGE_V2: &str = "web-v2";
/// hello with a page that takes 100 ms, one request at a time.
const WORK: &str = "bench-work";
/// The breach bench's latency target.
const TARGET_MS: u32 = 300;

pub async fn service(data_dir: &Path, runs: usize, secs: u32, breach_only: bool) -> Result<()> {
    if runs == 0 || secs == 0 {
        bail!("--runs and --secs must be at least 1");
    }
    which_wrk()?;
    let client = crate::vroomd::connect(data_dir).await?;
    for image in [IMAGE, "lb"] {
        vroom::session::build_from_catalog_if_missing(&client, image, true).await?;
    }
    build_v2(&client).await?;
    build_work(&client).await?;
    let tag = std::process::id() % 10000;
    let net = format!("bsv{tag}");
    let name = format!("bsv{tag}");
    client
        .create_network(&NetworkSpec::plain(Name::new(&net)?))
        .await?;
    let mut result = match breach_only {
        true => Ok(()),
        false => measure(&client, &net, &name, runs, secs).await,
    };
    if result.is_ok() {
        result = breaches(&client, &net, &name, runs).await;
    }
    if client.remove_service(&name).await.is_ok() {
        let _ = vroom::session::service_gone(&client, &name).await;
    }
    let _ = client.remove_network(&net).await;
    result
}

fn which_wrk() -> Result<()> {
    match Command::new("wrk").arg("--version").output() {
        Ok(_) => Ok(()),
        Err(_) => bail!("vroom bench service needs wrk (apt-get install wrk, or `cargo xtask test` installs it)"),
    }
}

/// `web-v2`: the catalog's web recipe under another name and version.
async fn build_v2(client: &Client) -> Result<()> {
    if client.image(IMAGE_V2).await.is_ok() {
        return Ok(());
    }
    let dir = tempfile::Builder::new()
        .prefix("vroom-bench-web-v2")
        .tempdir()?;
    let recipe = vroom_image::write_bundled_recipe(IMAGE, dir.path())
        .context("the catalog has no web recipe")??;
    let text = std::fs::read_to_string(&recipe)?;
    let text = text
        .replacen("name = \"web\"", &format!("name = \"{IMAGE_V2}\""), 1)
        .replacen("version = \"1.0\"", "version = \"2.0\"", 1);
    std::fs::write(&recipe, text)?;
    eprintln!("building {IMAGE_V2} (the web recipe, version 2.0)...");
    client
        .build_image(dir.path(), false, None, |_, _| {})
        .await
        .with_context(|| format!("cannot build {IMAGE_V2}"))?;
    Ok(())
}

/// `bench-work`: the catalog's hello serving `/www`, whose `/cgi-bin/work`
/// takes 100 ms, one request at a time (a lock in the guest); its `/` is
/// what the balancer's health check asks for.
async fn build_work(client: &Client) -> Result<()> {
    if client.image(WORK).await.is_ok() {
        return Ok(());
    }
    let dir = tempfile::Builder::new()
        .prefix("vroom-bench-work")
        .tempdir()?;
    let recipe = vroom_image::write_bundled_recipe("hello", dir.path())
        .context("the catalog has no hello recipe")??;
    let text = std::fs::read_to_string(&recipe)?
        .replacen("name = \"hello\"", &format!("name = \"{WORK}\""), 1)
        .replacen("\"-h\", \"/run/www\"]", "\"-h\", \"/www\"]", 1);
    let text = format!(
        r#"{text}
[[files]]
path = "/www/cgi-bin/work"
mode = "0755"
content = """
#!/bin/sh
until /bin/busybox mkdir /run/work.lock 2>/dev/null; do /bin/busybox usleep 5000; done
/bin/busybox usleep 100000
/bin/busybox rmdir /run/work.lock
printf 'Content-Type: text/plain\r\nContent-Length: 7\r\n\r\nworked\n'
"""

[[files]]
path = "/www/index.html"
content = "work\n"
"#
    );
    std::fs::write(&recipe, text)?;
    eprintln!("building {WORK} (hello with a page that takes 100 ms)...");
    client
        .build_image(dir.path(), false, None, |_, _| {})
        .await
        .with_context(|| format!("cannot build {WORK}"))?;
    Ok(())
}

/// SLO breach to SLO restored, cold boots against warm starts, `runs`
/// each, alternately.
async fn breaches(client: &Client, net: &str, name: &str, runs: usize) -> Result<()> {
    client.warm_image(WORK, &WarmRequest::default()).await?;
    let (mut cold, mut warm) = (vec![], vec![]);
    for round in 0..runs {
        for warm_start in [false, true] {
            let service = format!("{name}w{round}{}", u8::from(warm_start));
            let took = breach(client, net, &service, warm_start).await;
            if client.remove_service(&service).await.is_ok() {
                let _ = vroom::session::service_gone(client, &service).await;
            }
            let took = took?;
            eprintln!(
                "breach to restored, {}: {took:.1} s",
                if warm_start { "warm" } else { "cold" }
            );
            if warm_start { &mut warm } else { &mut cold }.push(took);
        }
    }
    println!(
        "SLO breach to SLO restored (p95<{TARGET_MS}ms, 1 -> 4 connections, members of 10 req/s; {runs} each, medians): cold boots {:.1} s, warm starts {:.1} s ({:.2}x)",
        median(&cold),
        median(&warm),
        median(&cold) / median(&warm)
    );
    Ok(())
}

/// One breach: seconds from the step to four connections until the p95 is
/// under the target with more than one member, all of them balanced.
async fn breach(client: &Client, net: &str, name: &str, warm: bool) -> Result<f64> {
    client
        .create_service(&ServiceDefinition {
            name: Name::new(name)?,
            image: WORK.into(),
            replicas: 1,
            max_replicas: Some(4),
            network: Some(Name::new(net)?),
            room: None,
            port: 80,
            scale_on: Some(vroom_types::ScaleTarget::P95Ms(TARGET_MS)),
            warm,
        })
        .await?;
    let service = vroom::session::service_converged(client, name).await?;
    let address = service.address.context("the service has no address")?;
    let url = format!("http://{address}/cgi-bin/work");
    // A calm start: one connection is within the target.
    let calm = Wrk4::start(&url, 1)?;
    tokio::time::sleep(Duration::from_secs(4)).await;
    drop(calm);
    let load = Wrk4::start(&url, 4)?;
    let step = Instant::now();
    let step_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_millis() as u64;
    let mut balanced = None;
    loop {
        let s = client.service(name).await?;
        if balanced.is_none() && s.ready > 1 && s.ready == s.desired {
            balanced = Some(step.elapsed().as_secs_f64());
        }
        let under = s
            .load
            .as_ref()
            .and_then(|l| l.p95_at_most_ms)
            .is_some_and(|p| p <= TARGET_MS);
        if under && s.ready > 1 && s.ready == s.desired {
            drop(load);
            let restored = step.elapsed().as_secs_f64();
            let decided = s
                .decisions
                .iter()
                .find(|d| d.to > d.from && d.at_ms >= step_ms)
                .map(|d| (d.at_ms - step_ms) as f64 / 1000.0);
            eprintln!(
                "  {name}: scale-out decided after {}, {} members balanced after {:.1} s, p95 under the target after {restored:.1} s",
                decided.map_or("?".into(), |d| format!("{d:.1} s")),
                s.ready,
                balanced.unwrap_or(restored)
            );
            return Ok(restored);
        }
        if step.elapsed() > Duration::from_secs(120) {
            bail!("service {name} did not come back under p95<{TARGET_MS}ms within 120 s: {s:?}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// wrk with `connections` (a new connection per request) until dropped.
struct Wrk4(std::process::Child);

impl Wrk4 {
    fn start(url: &str, connections: u32) -> Result<Wrk4> {
        let child = Command::new("wrk")
            .args([
                "-t1",
                &format!("-c{connections}"),
                "-d600s",
                "--timeout",
                "10s",
                "-H",
                "Connection: close",
                url,
            ])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .context("cannot run wrk")?;
        Ok(Wrk4(child))
    }
}

impl Drop for Wrk4 {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

async fn measure(client: &Client, net: &str, name: &str, runs: usize, secs: u32) -> Result<()> {
    client
        .create_service(&ServiceDefinition {
            name: Name::new(name)?,
            image: IMAGE.into(),
            replicas: 1,
            max_replicas: None,
            network: Some(Name::new(net)?),
            room: None,
            port: 80,
            scale_on: None,
            warm: true,
        })
        .await?;
    let shop = vroom::session::service_converged(client, name).await?;
    let address = shop.address.context("the service has no address")?;
    let member = shop.members[0].ip.context("the member has no address")?;

    // The balancer's overhead, interleaved with the direct path.
    let (mut direct, mut through) = (vec![], vec![]);
    for _ in 0..runs {
        direct.push(wrk(&format!("http://{member}/"), secs, false)?);
        through.push(wrk(&format!("http://{address}/"), secs, false)?);
    }
    let pick = |v: &[Wrk], f: fn(&Wrk) -> f64| median(&v.iter().map(f).collect::<Vec<_>>());
    let (d50, t50) = (pick(&direct, |w| w.p50_ms), pick(&through, |w| w.p50_ms));
    let (d99, t99) = (pick(&direct, |w| w.p99_ms), pick(&through, |w| w.p99_ms));
    let (drps, trps) = (pick(&direct, |w| w.rps), pick(&through, |w| w.rps));
    println!(
        "balancer overhead (wrk -c4 keep-alive, {secs}s x {runs}, medians): direct to one member p50 {d50:.2} ms, p99 {d99:.2} ms, {drps:.0} req/s; through the balancer p50 {t50:.2} ms ({:.2}x), p99 {t99:.2} ms ({:.2}x), {trps:.0} req/s ({:.2}x)",
        t50 / d50,
        t99 / d99,
        trps / drps
    );

    // Scale-out from 1 to 3: cold boots (no warm snapshot), then warm.
    let _ = client.remove_warm(IMAGE).await;
    let mut cold = vec![];
    for _ in 0..runs {
        cold.push(scale_out(client, name, false).await?);
        scale(client, name, 1).await?;
    }
    client.warm_image(IMAGE, &WarmRequest::default()).await?;
    let mut warm = vec![];
    for i in 0..runs {
        warm.push(scale_out(client, name, true).await?);
        if i + 1 < runs {
            scale(client, name, 1).await?;
        }
    }
    let run: fn(&(f64, f64)) -> f64 = |t| t.0;
    let balanced: fn(&(f64, f64)) -> f64 = |t| t.1;
    let of =
        |v: &[(f64, f64)], f: fn(&(f64, f64)) -> f64| median(&v.iter().map(f).collect::<Vec<_>>());
    println!(
        "scale-out 1 -> 3 ({runs} each, medians): until the new members run: cold boots {:.2} s, warm starts {:.2} s ({:.2}x); until they are balanced too: cold {:.2} s, warm {:.2} s ({:.2}x)",
        of(&cold, run),
        of(&warm, run),
        of(&cold, run) / of(&warm, run),
        of(&cold, balanced),
        of(&warm, balanced),
        of(&cold, balanced) / of(&warm, balanced),
    );

    // Scale-in 3 -> 1 under load (the service is at 3).
    let url = format!("http://{address}/");
    let (took, load) = under_load(&url, async {
        scale(client, name, 1).await?;
        Ok(())
    })
    .await?;
    println!(
        "scale-in 3 -> 1 under wrk (a new connection per request): {} of {} requests failed, {took:.1} s to converge",
        load.failed, load.requests
    );

    // A rolling update of two members to web-v2 (warm too), under load.
    client.warm_image(IMAGE_V2, &WarmRequest::default()).await?;
    scale(client, name, 2).await?;
    let (took, load) = under_load(&url, async {
        client.update_service(name, IMAGE_V2).await?;
        let s = vroom::session::service_converged(client, name).await?;
        if s.spec.image != IMAGE_V2 {
            bail!("the update to {IMAGE_V2} was rolled back");
        }
        Ok(())
    })
    .await?;
    println!(
        "rolling update of 2 members {IMAGE} -> {IMAGE_V2} under wrk (a new connection per request): {} of {} requests failed, {took:.1} s to converge",
        load.failed, load.requests
    );
    Ok(())
}

/// Scales `name` from 1 to 3: seconds until all three run, and until
/// all three are balanced too.
async fn scale_out(client: &Client, name: &str, warm: bool) -> Result<(f64, f64)> {
    let t0 = Instant::now();
    client
        .scale_service(
            name,
            &ServiceScaleRequest {
                replicas: Some(3),
                ..Default::default()
            },
        )
        .await?;
    let mut running = None;
    let service = loop {
        let service = client.service(name).await?;
        let all_run = service.members.len() == 3
            && service
                .members
                .iter()
                .all(|m| m.state == Some(InstanceState::Running));
        if all_run && running.is_none() {
            running = Some(t0.elapsed().as_secs_f64());
        }
        if service.converged() {
            break service;
        }
        if t0.elapsed() > vroom::session::CONVERGE_WITHIN {
            bail!("service {name} did not converge: {service:?}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let balanced = t0.elapsed().as_secs_f64();
    for member in &service.members {
        let instance = client.get(member.name.as_str()).await?;
        let was_warm = instance.status.started_from.is_some();
        if member.name != service.members[0].name && was_warm != warm {
            bail!(
                "{} started {}, expected a {} start",
                member.name,
                if was_warm { "warm" } else { "cold" },
                if warm { "warm" } else { "cold" }
            );
        }
    }
    Ok((running.unwrap_or(balanced), balanced))
}

async fn scale(client: &Client, name: &str, replicas: u32) -> Result<Service> {
    client
        .scale_service(
            name,
            &ServiceScaleRequest {
                replicas: Some(replicas),
                ..Default::default()
            },
        )
        .await?;
    vroom::session::service_converged(client, name).await
}

/// What one wrk run saw.
#[derive(Debug, Default, Clone, Copy)]
struct Wrk {
    requests: u64,
    failed: u64,
    rps: f64,
    p50_ms: f64,
    p99_ms: f64,
}

/// wrk -t1 -c4 against `url` for `secs` seconds; `close`: a new
/// connection per request.
fn wrk(url: &str, secs: u32, close: bool) -> Result<Wrk> {
    let mut cmd = Command::new("wrk");
    cmd.args(["-t1", "-c4", "--latency", &format!("-d{secs}s")]);
    if close {
        cmd.args(["-H", "Connection: close"]);
    }
    let out = cmd.arg(url).output().context("cannot run wrk")?;
    let report = String::from_utf8_lossy(&out.stdout);
    parse_wrk(&report).with_context(|| format!("wrk said: {report}"))
}

fn parse_wrk(report: &str) -> Result<Wrk> {
    let mut w = Wrk::default();
    for line in report.lines().map(str::trim) {
        if let Some((n, _)) = line.split_once(" requests in ") {
            w.requests = n.parse()?;
        } else if let Some(rps) = line.strip_prefix("Requests/sec:") {
            w.rps = rps.trim().parse()?;
        } else if let Some(errors) = line.strip_prefix("Socket errors:") {
            // "connect 0, read 1, write 0, timeout 0"
            w.failed += errors
                .split(',')
                .filter_map(|e| e.split_whitespace().last()?.parse::<u64>().ok())
                .sum::<u64>();
        } else if let Some(n) = line.strip_prefix("Non-2xx or 3xx responses:") {
            w.failed += n.trim().parse::<u64>()?;
        } else if let Some(v) = line.strip_prefix("50%") {
            w.p50_ms = millis(v.trim())?;
        } else if let Some(v) = line.strip_prefix("99%") {
            w.p99_ms = millis(v.trim())?;
        }
    }
    if w.requests == 0 {
        bail!("no requests counted");
    }
    Ok(w)
}

/// wrk's `1.23ms`, `456.00us`, `1.02s`.
fn millis(raw: &str) -> Result<f64> {
    let (number, scale) = if let Some(n) = raw.strip_suffix("us") {
        (n, 0.001)
    } else if let Some(n) = raw.strip_suffix("ms") {
        (n, 1.0)
    } else if let Some(n) = raw.strip_suffix('s') {
        (n, 1000.0)
    } else {
        bail!("a latency without a unit: {raw}")
    };
    Ok(number.parse::<f64>()? * scale)
}

/// Runs `operation` while wrk (a new connection per request) loads `url`
/// in rounds of 2 s from a second before it until a second after it;
/// (seconds the operation took, requests and failures summed).
async fn under_load(
    url: &str,
    operation: impl std::future::Future<Output = Result<()>>,
) -> Result<(f64, Wrk)> {
    let stop = Arc::new(AtomicBool::new(false));
    let load = {
        let stop = stop.clone();
        let url = url.to_string();
        std::thread::spawn(move || -> Result<Wrk> {
            let mut sum = Wrk::default();
            while !stop.load(Ordering::SeqCst) {
                let w = wrk(&url, 2, true)?;
                sum.requests += w.requests;
                sum.failed += w.failed;
            }
            Ok(sum)
        })
    };
    tokio::time::sleep(Duration::from_secs(1)).await;
    let t0 = Instant::now();
    let done = operation.await;
    let took = t0.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.store(true, Ordering::SeqCst);
    let load = load
        .join()
        .map_err(|_| anyhow::anyhow!("the load thread panicked"))??;
    done?;
    Ok((took, load))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wrk_reports_parse() {
        let report = "Running 2s test @ http://10.0.0.2/
  1 threads and 4 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     2.10ms  600.00us  10.00ms   90.00%
  Latency Distribution
     50%  812.00us
     75%    2.00ms
     90%    3.00ms
     99%    1.20s
  1000 requests in 2.00s, 1.00MB read
  Socket errors: connect 0, read 2, write 1, timeout 0
  Non-2xx or 3xx responses: 3
Requests/sec:    500.00
Transfer/sec:    512.00KB
";
        let w = parse_wrk(report).unwrap();
        assert_eq!((w.requests, w.failed), (1000, 6));
        assert_eq!((w.p50_ms, w.p99_ms, w.rps), (0.812, 1200.0, 500.0));
        assert!(parse_wrk("unable to connect").is_err());
        assert!(millis("12").is_err());
    }
}
