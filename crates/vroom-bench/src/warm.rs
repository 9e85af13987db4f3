//! `vroom bench warm`: the web appliance booted cold against started from
//! its warm snapshot (request to ready, both in one run), what a snapshot
//! costs against guest memory, and how many clones start per minute.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use vroom_client::Client;
use vroom_types::{
    AccelChoice, InstanceSpec, InstanceState, Name, NetworkSpec, NicSpec, RunRequest,
    SnapshotRequest, WarmRequest,
};

use crate::stats::{median, p90};

const IMAGE: &str = "web";

pub async fn warm(data_dir: &Path, runs: usize) -> Result<()> {
    if runs == 0 {
        bail!("--runs must be at least 1");
    }
    let client = crate::vroomd::connect(data_dir).await?;
    vroom::session::build_from_catalog_if_missing(&client, IMAGE, true).await?;
    let tag = std::process::id() % 10000;
    let net = format!("bwm{tag}");
    client
        .create_network(&NetworkSpec::plain(Name::new(&net)?))
        .await?;
    let result = measure(&client, &net, tag, runs).await;
    for instance in client.list().await.unwrap_or_default() {
        if instance
            .spec
            .name
            .as_str()
            .starts_with(&format!("bwm{tag}"))
        {
            let _ = client.remove(instance.spec.name.as_str(), true).await;
        }
    }
    for snapshot in client.snapshots(false).await.unwrap_or_default() {
        if snapshot.name.as_str().starts_with(&format!("bwm{tag}")) {
            let _ = client.remove_snapshot(snapshot.name.as_str()).await;
        }
    }
    let _ = client.remove_network(&net).await;
    result
}

fn request(name: &str, net: &str, cold: bool, from: Option<&str>) -> Result<RunRequest> {
    one_nic_request(name, IMAGE, net, cold, from)
}

/// Runs `image` as `name` with one NIC on `net`, 120 s to be ready; `from`:
/// a snapshot to clone.
pub(crate) fn one_nic_request(
    name: &str,
    image: &str,
    net: &str,
    cold: bool,
    from: Option<&str>,
) -> Result<RunRequest> {
    Ok(RunRequest {
        spec: InstanceSpec {
            name: Name::new(name)?,
            image: image.into(),
            mem_mib: None,
            cpus: 1,
            nics: vec![NicSpec {
                network: Name::new(net)?,
                ip: None,
                role: None,
            }],
            accel: AccelChoice::Auto,
            config_volume_kib: None,
            ephemeral: false,
            volumes: Vec::new(),
        },
        ready_timeout_secs: Some(120),
        from_snapshot: from.map(Name::new).transpose()?,
        cold,
        placement: Default::default(),
        env: Default::default(),
    })
}

/// Request to ready, in seconds; the instance's `started_from`.
pub(crate) async fn start(client: &Client, req: &RunRequest) -> Result<(f64, Option<String>)> {
    let t0 = Instant::now();
    client.run(req).await?;
    let name = req.spec.name.as_str();
    loop {
        // Answered when the guest reports ready: no polling interval.
        let instance = client.get_settled(name, Duration::from_secs(60)).await?;
        match instance.status.state {
            InstanceState::Running => {
                return Ok((t0.elapsed().as_secs_f64(), instance.status.started_from))
            }
            InstanceState::Failed | InstanceState::Stopped => {
                bail!("{name} failed: {:?}", instance.status.last_error)
            }
            _ if t0.elapsed() > Duration::from_secs(120) => bail!("{name} never became ready"),
            _ => {}
        }
    }
}

async fn measure(client: &Client, net: &str, tag: u32, runs: usize) -> Result<()> {
    let warm = client.warm_image(IMAGE, &WarmRequest::default()).await?;
    let mut cold = vec![];
    let mut warm_starts = vec![];
    let mut resumes = vec![];
    for i in 0..runs {
        for (is_cold, out) in [(true, &mut cold), (false, &mut warm_starts)] {
            let name = format!("bwm{tag}-{}{i}", if is_cold { "c" } else { "w" });
            let (secs, from) = start(client, &request(&name, net, is_cold, None)?).await?;
            if is_cold != from.is_none() {
                bail!(
                    "{name} started from {from:?}, expected a {} start",
                    if is_cold { "cold" } else { "warm" }
                );
            }
            out.push(secs);
            if !is_cold {
                let console = client.logs(&name, 0).await?.data;
                resumes.extend(console.lines().rev().find_map(resume_split));
            }
            client.remove(&name, true).await?;
        }
    }
    println!(
        "cold boot to ready: median {:.3}s p90 {:.3}s; warm start to ready: median {:.3}s p90 {:.3}s ({:.1}x faster), {runs} runs each",
        median(&cold),
        p90(&cold),
        median(&warm_starts),
        p90(&warm_starts),
        median(&cold) / median(&warm_starts)
    );
    println!(
        "warm snapshot of {IMAGE} ({} MiB guest): {:.1} MB of state, {:.1} MB compressed ({:.2} of guest memory)",
        warm.instance.mem_mib,
        warm.state_bytes as f64 / 1e6,
        warm.memory.bytes as f64 / 1e6,
        warm.memory.bytes as f64 / (warm.instance.mem_mib as f64 * 1048576.0)
    );
    if let Some(line) = median_split(&resumes) {
        println!("the guest's part of a warm start (its log), median: {line}");
    }

    let source = format!("bwm{tag}-src");
    start(client, &request(&source, net, false, None)?).await?;
    let mut took = vec![];
    let mut paused = vec![];
    let mut snapshot_name = String::new();
    for i in 0..runs.min(3) {
        snapshot_name = format!("bwm{tag}-s{i}");
        let t0 = Instant::now();
        let snapshot = client
            .snapshot(&SnapshotRequest {
                instance: Name::new(&source)?,
                name: Some(Name::new(&snapshot_name)?),
                stop: false,
            })
            .await?;
        took.push(t0.elapsed().as_secs_f64());
        paused.push(snapshot.pause_ms as f64 / 1000.0);
    }
    println!(
        "snapshot of a running {IMAGE}: median {:.3}s in all, the guest paused {:.3}s",
        median(&took),
        median(&paused)
    );

    let t0 = Instant::now();
    for i in 0..runs {
        let name = format!("bwm{tag}-k{i}");
        start(client, &request(&name, net, false, Some(&snapshot_name))?).await?;
    }
    let per_clone = t0.elapsed().as_secs_f64() / runs as f64;
    println!(
        "clones of one snapshot, one after another to ready: {:.0} per minute ({:.3}s each, {runs} clones all running)",
        60.0 / per_clone,
        per_clone
    );
    Ok(())
}

/// A guest's resume steps from its log line `vroom-init: resumed (identity
/// changed: true) in 585 ms (reseed and clock 13, remount 77, ...)`: the
/// total and each step, in ms.
fn resume_split(line: &str) -> Option<(u64, Vec<(String, u64)>)> {
    let rest = line.split("vroom-init: resumed (").nth(1)?;
    let (total, steps) = rest.split_once(") in ")?.1.split_once(" ms (")?;
    let steps = steps
        .trim_end()
        .strip_suffix(')')?
        .split(", ")
        .map(|step| {
            let (name, ms) = step.rsplit_once(' ')?;
            Some((name.to_string(), ms.parse().ok()?))
        })
        .collect::<Option<Vec<_>>>()?;
    Some((total.parse().ok()?, steps))
}

/// `585 ms (reseed and clock 13, remount 77, ...)`: the median of each,
/// steps in the order the first resume took them.
fn median_split(resumes: &[(u64, Vec<(String, u64)>)]) -> Option<String> {
    let (_, first) = resumes.first()?;
    let of = |values: Vec<u64>| median(&values.iter().map(|v| *v as f64).collect::<Vec<_>>());
    let steps: Vec<String> = first
        .iter()
        .map(|(name, _)| {
            let values = resumes
                .iter()
                .filter_map(|(_, steps)| steps.iter().find(|(n, _)| n == name).map(|(_, ms)| *ms))
                .collect();
            format!("{name} {:.0}", of(values))
        })
        .collect();
    let total = of(resumes.iter().map(|(total, _)| *total).collect());
    Some(format!(
        "{total:.0} ms ({}), {} resumes",
        steps.join(", "),
        resumes.len()
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_guest_resume_split() {
        let line = "vroom-init: resumed (identity changed: true) in 585 ms (reseed and clock 13, remount 127, read 12, names 12, NICs 76, render 55, on_clone 281, continue 7)";
        let (total, steps) = resume_split(line).unwrap();
        assert_eq!(total, 585);
        assert_eq!(steps[0], ("reseed and clock".to_string(), 13));
        assert_eq!(steps[6], ("on_clone".to_string(), 281));
        assert_eq!(steps.len(), 8);
        assert_eq!(resume_split("vroom-init: services continue"), None);
        let other = |total: &str, volume: &str| {
            resume_split(&line.replace("585", total).replace("remount 127", volume)).unwrap()
        };
        let three = [
            other("600", "remount 130"),
            (total, steps),
            other("590", "remount 125"),
        ];
        assert_eq!(
            median_split(&three).unwrap(),
            "590 ms (reseed and clock 13, remount 127, read 12, names 12, NICs 76, render 55, on_clone 281, continue 7), 3 resumes"
        );
    }
}
