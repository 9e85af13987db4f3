//! Synchronous replication of a data volume: a `blockdev-mirror` job in
//! `write-blocking` mode from the volume's drive into an NBD export on the
//! replica node, reached over a connection vroomd opens and hands QEMU with
//! `getfd` (a jailed QEMU connects nowhere by itself). Once the job is
//! READY, QEMU completes a guest write only after the local and the remote
//! write; the replica's server writes through (each write reaches its disk
//! before it answers), since QEMU never forwards the guest's flushes to the
//! target. Measured and explained in docs/design/replication.md.

use std::os::fd::BorrowedFd;
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::qmp::{QmpError, Session};

/// How long a cancelled job has to go before its nodes are taken out anyway.
const CANCEL_DEADLINE: Duration = Duration::from_secs(5);

/// The QMP names of data volume `index`'s replication. The job's target
/// is a `quorum` node (one child, one vote) over the NBD node of the
/// current connection: a connection lost and made again is swapped in
/// under the paused job (`x-blockdev-change`), which then resends only what
/// its dirty bitmap holds (replication.md §2.2). The NBD node of the `g`th
/// connection is `repl<i>-nbd-<g>`, the quorum's child `children.<g>`.
struct Names {
    drive: String,
    index: usize,
    target: String,
    job: String,
}

impl Names {
    fn node(&self, generation: u32) -> String {
        format!("repl{}-nbd-{generation}", self.index)
    }

    fn fd(&self, generation: u32) -> String {
        format!("vroom-repl{}-{generation}", self.index)
    }
}

fn names(index: usize) -> Names {
    Names {
        drive: crate::cmdline::data_drive_id(index),
        index,
        target: format!("repl{index}"),
        job: format!("repl{index}"),
    }
}

/// Adds the NBD node of connection `generation` on `conn`.
fn add_connection(
    qmp: &mut Session,
    n: &Names,
    generation: u32,
    conn: BorrowedFd<'_>,
    export: &str,
) -> Result<(), QmpError> {
    let fd = n.fd(generation);
    qmp.execute_with_fd("getfd", json!({ "fdname": fd }), conn)?;
    let added = qmp.execute(
        "blockdev-add",
        json!({
            "driver": "nbd",
            "node-name": n.node(generation),
            "server": { "type": "fd", "str": fd },
            "export": export,
            // With an fd address a reconnect cannot succeed and holds the
            // guest's writes for the whole delay (replication.md §2.1).
            "reconnect-delay": 0,
        }),
    );
    if let Err(e) = added {
        let _ = qmp.execute("closefd", json!({ "fdname": fd }));
        return Err(e);
    }
    Ok(())
}

/// The generations of the NBD nodes present, oldest first.
fn connections(qmp: &mut Session, n: &Names) -> Result<Vec<u32>, QmpError> {
    let nodes = qmp.execute("query-named-block-nodes", json!({ "flat": true }))?;
    let prefix = format!("repl{}-nbd-", n.index);
    let mut found: Vec<u32> = nodes
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|node| {
            node["node-name"]
                .as_str()?
                .strip_prefix(&prefix)?
                .parse()
                .ok()
        })
        .collect();
    found.sort_unstable();
    found.dedup();
    Ok(found)
}

fn node_present(qmp: &mut Session, name: &str) -> Result<bool, QmpError> {
    let nodes = qmp.execute("query-named-block-nodes", json!({ "flat": true }))?;
    Ok(nodes
        .as_array()
        .into_iter()
        .flatten()
        .any(|node| node["node-name"] == name))
}

/// A replication job as QEMU reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MirrorJob {
    /// The initial copy is done: every write is synchronous from now on.
    pub ready: bool,
    /// The target failed a write: the job stopped, its writes are local only.
    pub failed: bool,
    pub offset: u64,
    pub len: u64,
    pub status: String,
    /// Bytes the replica does not have yet (the job's dirty bitmap). Its
    /// progress figures lag behind a resume; this does not.
    pub dirty: u64,
}

/// Starts mirroring data volume `index` into `export` on `conn` (a
/// connected stream speaking NBD): a full copy, then every write. Nothing
/// is left behind on an error.
pub fn start(
    socket: &Path,
    index: usize,
    conn: BorrowedFd<'_>,
    export: &str,
) -> Result<(), QmpError> {
    let n = names(index);
    let mut qmp = Session::connect(socket)?;
    // A job or node a failed attempt left goes first.
    clear(&mut qmp, &n)?;
    add_connection(&mut qmp, &n, 0, conn, export)?;
    let quorum = qmp.execute(
        "blockdev-add",
        json!({
            "driver": "quorum",
            "node-name": n.target,
            "vote-threshold": 1,
            "children": [n.node(0)],
        }),
    );
    if let Err(e) = quorum {
        let _ = qmp.execute("blockdev-del", json!({ "node-name": n.node(0) }));
        return Err(e);
    }
    let mirror = qmp.execute(
        "blockdev-mirror",
        json!({
            "job-id": n.job,
            "device": n.drive,
            "target": n.target,
            "sync": "full",
            "copy-mode": "write-blocking",
            "on-source-error": "stop",
            "on-target-error": "stop",
            "auto-dismiss": false,
        }),
    );
    if let Err(e) = mirror {
        let _ = qmp.execute("blockdev-del", json!({ "node-name": n.target }));
        let _ = qmp.execute("blockdev-del", json!({ "node-name": n.node(0) }));
        return Err(e);
    }
    Ok(())
}

/// Gives the paused replication of data volume `index` (its target failed)
/// a new connection to the same replica, and resumes it: it sends only the
/// ranges its dirty bitmap holds. On an error the job stays paused.
pub fn resume(
    socket: &Path,
    index: usize,
    conn: BorrowedFd<'_>,
    export: &str,
) -> Result<(), QmpError> {
    let n = names(index);
    let mut qmp = Session::connect(socket)?;
    let Some(job) = find_job(&mut qmp, &n.job)? else {
        return Err(QmpError::Command {
            command: "block-job-resume".into(),
            desc: "no replication job to resume".into(),
        });
    };
    if job.status != "standby" && job.status != "paused" {
        return Err(QmpError::Command {
            command: "block-job-resume".into(),
            desc: format!("the replication job is {}, not paused", job.status),
        });
    }
    let old = connections(&mut qmp, &n)?;
    let Some(&current) = old.last() else {
        return Err(QmpError::Command {
            command: "x-blockdev-change".into(),
            desc: "the replication has no connection to replace".into(),
        });
    };
    let next = current + 1;
    add_connection(&mut qmp, &n, next, conn, export)?;
    let swapped = qmp
        .execute(
            "x-blockdev-change",
            json!({ "parent": n.target, "node": n.node(next) }),
        )
        .and_then(|_| {
            qmp.execute(
                "x-blockdev-change",
                json!({ "parent": n.target, "child": format!("children.{current}") }),
            )
        });
    if let Err(e) = swapped {
        let _ = qmp.execute("blockdev-del", json!({ "node-name": n.node(next) }));
        return Err(e);
    }
    for generation in old {
        let _ = qmp.execute("blockdev-del", json!({ "node-name": n.node(generation) }));
    }
    qmp.execute("block-job-resume", json!({ "device": n.job }))?;
    Ok(())
}

/// The replication job of data volume `index`, if one exists.
pub fn job(socket: &Path, index: usize) -> Result<Option<MirrorJob>, QmpError> {
    let n = names(index);
    let mut qmp = Session::connect(socket)?;
    let Some(mut job) = find_job(&mut qmp, &n.job)? else {
        return Ok(None);
    };
    // The job's bitmap hangs on the drive's top node (the mirror filter).
    let block = qmp.execute("query-block", Value::Null)?;
    job.dirty = block
        .as_array()
        .into_iter()
        .flatten()
        .filter(|b| b["device"] == n.drive.as_str())
        .flat_map(|b| {
            b["inserted"]["dirty-bitmaps"]
                .as_array()
                .cloned()
                .unwrap_or_default()
        })
        .filter_map(|bitmap| bitmap["count"].as_u64())
        .sum();
    Ok(Some(job))
}

fn find_job(qmp: &mut Session, id: &str) -> Result<Option<MirrorJob>, QmpError> {
    let jobs = qmp.execute("query-block-jobs", Value::Null)?;
    Ok(jobs
        .as_array()
        .into_iter()
        .flatten()
        .find(|j| j["device"] == id)
        .map(|j| {
            let status = j["status"].as_str().unwrap_or_default().to_string();
            MirrorJob {
                ready: j["ready"].as_bool().unwrap_or(false),
                failed: j["io-status"].as_str().is_some_and(|s| s != "ok")
                    || status == "concluded" && j["error"].is_string(),
                offset: j["offset"].as_u64().unwrap_or(0),
                len: j["len"].as_u64().unwrap_or(0),
                status,
                dirty: 0,
            }
        }))
}

/// Ends the replication of data volume `index` (the job and its NBD node);
/// writes are local only afterwards. Nothing to end is not an error.
pub fn stop(socket: &Path, index: usize) -> Result<(), QmpError> {
    let n = names(index);
    let mut qmp = Session::connect(socket)?;
    clear(&mut qmp, &n)
}

fn clear(qmp: &mut Session, n: &Names) -> Result<(), QmpError> {
    if let Some(job) = find_job(qmp, &n.job)? {
        if job.status != "concluded" {
            // `force`: a paused job (its target failed) is refused without it.
            qmp.execute(
                "block-job-cancel",
                json!({ "device": n.job, "force": true }),
            )?;
        }
        let deadline = Instant::now() + CANCEL_DEADLINE;
        loop {
            match find_job(qmp, &n.job)? {
                Some(j) if j.status == "concluded" => {
                    qmp.execute("block-job-dismiss", json!({ "id": n.job }))?;
                    break;
                }
                None => break,
                Some(_) if Instant::now() > deadline => break,
                Some(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        }
    }
    if node_present(qmp, &n.target)? {
        qmp.execute("blockdev-del", json!({ "node-name": n.target }))?;
    }
    for generation in connections(qmp, n)? {
        qmp.execute("blockdev-del", json!({ "node-name": n.node(generation) }))?;
    }
    Ok(())
}
