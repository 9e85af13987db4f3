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

/// The QMP names of data volume `index`'s replication.
struct Names {
    drive: String,
    fd: String,
    node: String,
    job: String,
}

fn names(index: usize) -> Names {
    Names {
        drive: crate::cmdline::data_drive_id(index),
        fd: format!("vroom-repl{index}"),
        node: format!("repl{index}-nbd"),
        job: format!("repl{index}"),
    }
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
}

/// Starts mirroring data volume `index` into `export` on `conn` (a
/// connected stream speaking NBD). Nothing is left behind on an error.
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
    qmp.execute_with_fd("getfd", json!({ "fdname": n.fd }), conn)?;
    let added = qmp.execute(
        "blockdev-add",
        json!({
            "driver": "nbd",
            "node-name": n.node,
            "server": { "type": "fd", "str": n.fd },
            "export": export,
            // With an fd address a reconnect cannot succeed and holds the
            // guest's writes for the whole delay (replication.md §2.1).
            "reconnect-delay": 0,
        }),
    );
    if let Err(e) = added {
        let _ = qmp.execute("closefd", json!({ "fdname": n.fd }));
        return Err(e);
    }
    let mirror = qmp.execute(
        "blockdev-mirror",
        json!({
            "job-id": n.job,
            "device": n.drive,
            "target": n.node,
            "sync": "full",
            "copy-mode": "write-blocking",
            "on-source-error": "stop",
            "on-target-error": "stop",
            "auto-dismiss": false,
        }),
    );
    if let Err(e) = mirror {
        let _ = qmp.execute("blockdev-del", json!({ "node-name": n.node }));
        return Err(e);
    }
    Ok(())
}

/// The replication job of data volume `index`, if one exists.
pub fn job(socket: &Path, index: usize) -> Result<Option<MirrorJob>, QmpError> {
    let n = names(index);
    let mut qmp = Session::connect(socket)?;
    find_job(&mut qmp, &n.job)
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
    let nodes = qmp.execute("query-named-block-nodes", json!({ "flat": true }))?;
    let present = nodes
        .as_array()
        .into_iter()
        .flatten()
        .any(|node| node["node-name"] == n.node.as_str());
    if present {
        qmp.execute("blockdev-del", json!({ "node-name": n.node }))?;
    }
    Ok(())
}
