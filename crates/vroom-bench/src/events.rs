//! `vroom bench events`: what the event log costs vroomd and how soon a
//! follower hears of a change, against the same daemon with no follower
//! (measured in the same run).
//!
//! Each change is a network created and removed (a bridge and its nft
//! rules, no VM): two events. Reported: vroomd's CPU time per change with
//! `--followers` live followers against none, and the delay from a
//! change's API reply to its event at each follower (the event is logged
//! before the reply, so a delay at or below zero is a follower that heard
//! first).

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use vroom_client::Client;
use vroom_types::{EventLine, EventQuery, Name, NetworkSpec};

use crate::stats::{median, p90};

/// vroomd's user+system CPU time so far, in milliseconds.
fn cpu_ms(pid: u32) -> Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let after_comm = stat.rsplit_once(')').context("unreadable /proc stat")?.1;
    let fields: Vec<&str> = after_comm.split_whitespace().collect();
    let ticks: f64 = fields[11].parse::<f64>()? + fields[12].parse::<f64>()?;
    // SAFETY: sysconf has no side effects.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    Ok(ticks * 1000.0 / hz)
}

/// `changes` changes; returns vroomd's CPU ms per change and when each
/// network's removal was answered.
async fn churn(
    client: &Client,
    pid: u32,
    tag: &str,
    changes: usize,
) -> Result<(f64, Vec<(String, Instant)>)> {
    let before = cpu_ms(pid)?;
    let mut replies = vec![];
    for i in 0..changes {
        let name = format!("bev-{tag}{i}");
        let spec = NetworkSpec::plain(Name::new(&name)?);
        client.create_network(&spec).await?;
        client.remove_network(&name).await?;
        replies.push((name, Instant::now()));
    }
    Ok(((cpu_ms(pid)? - before) / changes as f64, replies))
}

/// vroomd's resident memory in bytes.
fn rss_bytes(pid: u32) -> Result<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kib = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().strip_suffix("kB"))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .context("no VmRSS")?;
    Ok(kib * 1024.0)
}

/// vroomd's CPU (as a share of one core) over `window`, while `instances`
/// idle hellos run: alone, then watched by `followers` event followers,
/// one follower that never reads, and a Prometheus-like scrape of
/// `/metrics` every 5 s.
async fn watched(
    client: &Client,
    data_dir: &Path,
    pid: u32,
    instances: usize,
    followers: usize,
    window: Duration,
) -> Result<()> {
    let names: Vec<String> = (0..instances).map(|i| format!("bev-vm{i}")).collect();
    for name in &names {
        client
            .run(&crate::splice::run_request(name, "hello", vec![])?)
            .await
            .with_context(|| format!("cannot start {name}"))?;
    }
    let measure = |window: Duration| async move {
        let (cpu, started) = (cpu_ms(pid)?, Instant::now());
        tokio::time::sleep(window).await;
        anyhow::Ok((cpu_ms(pid)? - cpu) / started.elapsed().as_secs_f64() / 1000.0)
    };
    let rss_alone = rss_bytes(pid)?;
    let alone = measure(window).await?;

    let mut tasks = vec![];
    for _ in 0..followers {
        let mut stream = client.events(&EventQuery::from_pairs([])?).await?;
        tasks.push(tokio::spawn(async move {
            while let Some(Ok(_)) = stream.next().await {}
        }));
    }
    // A follower that never reads: its socket fills, then it falls behind.
    let stalled = client.events(&EventQuery::from_pairs([])?).await?;
    let scraper = {
        let socket = vroom::paths::socket(data_dir);
        tokio::spawn(async move {
            loop {
                let _ = scrape(&socket).await;
                tokio::time::sleep(Duration::from_secs(5)).await;
            }
        })
    };
    let watched = measure(window).await?;
    let rss_watched = rss_bytes(pid)?;
    scraper.abort();
    drop(stalled);
    for task in tasks {
        task.abort();
    }
    for name in &names {
        client.remove(name, true).await?;
    }
    println!(
        "  {instances} idle hellos, {}s each: vroomd CPU {:.2}% of a core alone, {:.2}% with {followers} followers, a stalled one and a scrape every 5 s ({:.2}x); RSS {:.1} MiB -> {:.1} MiB",
        window.as_secs(),
        alone * 100.0,
        watched * 100.0,
        watched / alone.max(1e-6),
        rss_alone / 1048576.0,
        rss_watched / 1048576.0
    );
    Ok(())
}

/// One `GET /metrics` on the unix socket; its size.
async fn scrape(socket: &Path) -> Result<usize> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::UnixStream::connect(socket).await?;
    stream
        .write_all(b"GET /metrics HTTP/1.0\r\nHost: vroomd\r\n\r\n")
        .await?;
    let mut body = vec![];
    stream.read_to_end(&mut body).await?;
    Ok(body.len())
}

pub async fn events(
    data_dir: &Path,
    changes: usize,
    followers: usize,
    instances: usize,
    window: Duration,
) -> Result<()> {
    let client = crate::vroomd::connect(data_dir).await?;
    let pid = client
        .version()
        .await?
        .daemon
        .context("this vroomd does not say its pid")?
        .pid;
    // Warm up (the first network change loads nft and the bridge module).
    churn(&client, pid, "w", 3).await?;
    let (alone, _) = churn(&client, pid, "a", changes).await?;

    let (heard_tx, mut heard_rx) = tokio::sync::mpsc::unbounded_channel::<(String, Instant)>();
    let mut tasks = vec![];
    for _ in 0..followers {
        let query = EventQuery::from_pairs([("kind", "network"), ("action", "removed")])?;
        let mut stream = client.events(&query).await?;
        let heard = heard_tx.clone();
        tasks.push(tokio::spawn(async move {
            while let Some(Ok(line)) = stream.next().await {
                if let EventLine::Event(e) = line {
                    let _ = heard.send((e.name, Instant::now()));
                }
            }
        }));
    }
    drop(heard_tx);
    let (followed, replies) = churn(&client, pid, "f", changes).await?;
    let mut delays = vec![];
    let deadline = Instant::now() + Duration::from_secs(10);
    while delays.len() < changes * followers {
        let left = deadline.saturating_duration_since(Instant::now());
        let Ok(Some((name, at))) = tokio::time::timeout(left, heard_rx.recv()).await else {
            break;
        };
        if let Some((_, replied)) = replies.iter().find(|(n, _)| *n == name) {
            let ms = if at >= *replied {
                (at - *replied).as_secs_f64() * 1000.0
            } else {
                -((*replied - at).as_secs_f64() * 1000.0)
            };
            delays.push(ms);
        }
    }
    for task in tasks {
        task.abort();
    }
    println!("events: {changes} changes (a network created and removed), {followers} followers");
    println!(
        "  vroomd CPU per change: {alone:.2} ms alone, {followed:.2} ms with followers ({:.2}x)",
        followed / alone.max(0.001)
    );
    println!(
        "  heard {} of {} events at the followers",
        delays.len(),
        changes * followers
    );
    if !delays.is_empty() {
        println!(
            "  delay from the reply to the event at a follower: median {:.2} ms, p90 {:.2} ms, max {:.2} ms",
            median(&delays),
            p90(&delays),
            delays.iter().cloned().fold(f64::MIN, f64::max)
        );
    }
    if instances > 0 {
        watched(&client, data_dir, pid, instances, followers, window).await?;
    }
    Ok(())
}
