//! A cluster lab (`vroom_lab`) for the end-to-end tests, with the
//! assertions they use; its logs are printed when a test fails.

use std::path::Path;
use std::process::{Command, Output};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::{init_binary, poll, vroom_bin};

/// The lab of `vroom_lab`, with the assertions the tests use.
pub struct Lab(vroom_lab::Lab);

impl std::ops::Deref for Lab {
    type Target = vroom_lab::Lab;
    fn deref(&self) -> &Self::Target {
        &self.0
    }
}

impl Lab {
    /// `nodes` nodes whose names start with `letter` (one per test file,
    /// so that a leftover is known), running vroom with `env` beside the
    /// test's guest init.
    pub fn new(letter: char, nodes: usize, env: Vec<(String, String)>) -> Lab {
        let mut all = vec![(
            "VROOM_INIT".to_string(),
            init_binary().display().to_string(),
        )];
        all.extend(super::test_qemu());
        all.extend(env);
        Lab(vroom_lab::Lab::build(Path::new(vroom_bin()), letter, nodes, all).unwrap())
    }

    pub fn start(&self, i: usize) {
        self.0.start(i).unwrap();
    }

    pub fn vroom(&self, i: usize, args: &[&str]) -> Output {
        self.command(i).args(args).output().unwrap()
    }

    pub fn ok(&self, i: usize, args: &[&str]) -> String {
        let out = self.vroom(i, args);
        assert!(
            out.status.success(),
            "vroom {args:?} on {}: {}\n--- log:\n{}",
            self.nodes[i].name,
            String::from_utf8_lossy(&out.stderr),
            self.log(i)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    pub fn fail(&self, i: usize, args: &[&str]) -> String {
        let out = self.vroom(i, args);
        assert!(!out.status.success(), "vroom {args:?} succeeded");
        let err = String::from_utf8_lossy(&out.stderr).trim().to_string();
        assert_eq!(err.lines().count(), 1, "one line: {err}");
        err
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        if std::thread::panicking() {
            for (i, node) in self.nodes.iter().enumerate() {
                eprintln!("--- vroomd log of {}:\n{}", node.name, self.log(i));
            }
        }
    }
}

// Replicated volumes: what the cluster tests (and qemu10.rs) look at.

/// Waits until node `to` runs `instance` and it answers on `ip` from there;
/// returns how long that took.
pub fn failed_over(lab: &Lab, to: usize, instance: &str, ip: &str, budget: Duration) -> Duration {
    let started = Instant::now();
    let done = poll(budget, || {
        (lab.runs(to, instance).is_some() && lab.page_from(to, ip).is_some()).then_some(())
    });
    assert!(
        done.is_some(),
        "{instance} did not come up on {} within {budget:?}\n--- its log:\n{}",
        lab.nodes[to].name,
        lab.log(to)
    );
    started.elapsed()
}

/// A volume's replication as node `i` shows it: (primary, replica, state, epoch).
pub fn replication_of(lab: &Lab, i: usize, volume: &str) -> Option<(String, String, String, u64)> {
    let out = lab.vroom(i, &["--json", "volume", "inspect", volume]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
    let r = &v["replication"];
    Some((
        r["primary"].as_str()?.to_string(),
        r["replica"].as_str()?.to_string(),
        r["state"].as_str()?.to_string(),
        r["epoch"].as_u64()?,
    ))
}

/// Asserts that two copies of a volume are byte for byte the same, or says
/// how they differ (how many bytes, the first offsets, and each side's ext4
/// superblock view).
pub fn assert_same_copies(a: &Path, b: &Path, when: &str) {
    let same = Command::new("cmp").arg(a).arg(b).output().unwrap();
    if same.status.success() {
        return;
    }
    let sh = |cmd: String| {
        let out = Command::new("sh").arg("-c").arg(cmd).output().unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let diff = sh(format!("cmp -l {} {} | wc -l", a.display(), b.display()));
    let first = sh(format!("cmp -l {} {} | head -12", a.display(), b.display()));
    let sb = |f: &Path| {
        sh(format!(
            "dumpe2fs -h {} 2>/dev/null | grep -E 'state|Free blocks|Last write|Mount count|Last mount'",
            f.display()
        ))
    };
    panic!(
        "the copies differ {when}: {} bytes\n{first}--- {}:\n{}--- {}:\n{}",
        diff.trim(),
        a.display(),
        sb(a),
        b.display(),
        sb(b)
    );
}

/// The volume's last sync as node `i` shows it: (incremental, bytes).
pub fn last_sync(lab: &Lab, i: usize, volume: &str) -> (bool, u64) {
    let out = lab.ok(i, &["--json", "volume", "inspect", volume]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let sync = &v["replication"]["last_sync"];
    (
        sync["incremental"].as_bool().unwrap_or(false),
        sync["bytes"].as_u64().unwrap_or(0),
    )
}

/// Waits until node `i` shows the volume's replica up to date.
pub fn up_to_date(lab: &Lab, i: usize, volume: &str, primary: &str) {
    let synced = poll(Duration::from_secs(90), || {
        replication_of(lab, i, volume)
            .filter(|(p, _, s, _)| p == primary && s == "up_to_date")
            .map(|_| ())
    });
    assert!(
        synced.is_some(),
        "the replica of {volume} did not come up to date (primary {primary}): {:?}\n--- log:\n{}",
        replication_of(lab, i, volume),
        lab.log(i)
    );
}

/// This node's copy of a volume: its file.
pub fn copy_of(lab: &Lab, i: usize, volume: &str) -> std::path::PathBuf {
    let out = lab.ok(i, &["--json", "volume", "inspect", volume]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let id = v["id"].as_str().unwrap();
    assert!(!id.is_empty(), "node {i} has no copy of {volume}: {out}");
    lab.nodes[i].dir.join("volumes").join(id).join("volume.img")
}

/// Where the replicated-volume tests mount their volume.
pub const DATA: &str = "/var/data";

/// Writes numbered files in `instance` on node `i` (each synced: the guest
/// saw it complete) from `after + 1` on, and cuts the node's power after a
/// random number of them, at a random moment. Returns what was acknowledged.
pub fn write_until_power_loss(
    lab: &Arc<Lab>,
    i: usize,
    instance: &str,
    after: u32,
    before_the_cut: impl FnOnce(),
) -> Vec<u32> {
    let acked = Arc::new(Mutex::new(Vec::<u32>::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (lab, acked, stop) = (lab.clone(), acked.clone(), stop.clone());
        let instance = instance.to_string();
        std::thread::spawn(move || {
            for n in after + 1.. {
                if stop.load(Ordering::SeqCst) {
                    break;
                }
                let script = format!("echo write-{n} > {DATA}/w{n} && sync");
                let out = lab.vroom(i, &["exec", &instance, "--", "/bin/sh", "-c", &script]);
                if !out.status.success() {
                    break;
                }
                acked.lock().unwrap().push(n);
            }
        })
    };
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos() as usize;
    let count = 5 + seed % 11;
    poll(Duration::from_secs(60), || {
        (acked.lock().unwrap().len() >= count).then_some(())
    })
    .expect("the guest acknowledged no writes");
    std::thread::sleep(Duration::from_millis((seed / 11 % 300) as u64));
    before_the_cut();
    lab.power_loss(i);
    stop.store(true, Ordering::SeqCst);
    writer.join().unwrap();
    let acked = acked.lock().unwrap().clone();
    acked
}

/// Asserts that `instance` on node `i` has every write of `acked` (from
/// [`write_until_power_loss`]) on its volume at [`DATA`], waiting a moment
/// for the guest to answer; `context` says which scenario it is.
pub fn assert_acknowledged_writes(
    lab: &Lab,
    i: usize,
    instance: &str,
    acked: &[u32],
    context: &str,
) {
    let script = format!(
        "for n in {}; do cat {DATA}/w$n || echo missing-$n; done",
        acked
            .iter()
            .map(|n| n.to_string())
            .collect::<Vec<_>>()
            .join(" ")
    );
    let out = poll(Duration::from_secs(10), || {
        let out = lab.vroom(i, &["exec", instance, "--", "/bin/sh", "-c", &script]);
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
    })
    .unwrap_or_else(|| {
        panic!(
            "{context}: {instance} does not run on {}:\n{}",
            lab.nodes[i].name,
            lab.log(i)
        )
    });
    for n in acked {
        assert!(
            out.contains(&format!("write-{n}\n")),
            "{context}: write {n} was acknowledged and is lost:\n{out}"
        );
    }
}
