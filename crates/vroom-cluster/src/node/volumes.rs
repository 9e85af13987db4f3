//! A cluster's volumes: kept on two nodes (`vroom volume create NAME
//! --replicas 2`), or on one (`--replicas 1`, the default), which pins the
//! instance that uses it to that node.
//!
//! A volume with one copy is recorded like a replicated one, with its node
//! as the primary and no replica ([`VolumeRecord::one_copy`]): every node
//! lists it, the scheduler places its instance on that node only (HA
//! `restart` restarts it there; `standby` is refused: nowhere to fail over
//! to), and while that node is lost the instance waits, saying so, rather
//! than boot elsewhere on an empty disk. A live migration copies it to the
//! destination first, as a replica ([`moving`]).
//!
//! Each of the two nodes keeps its copy as a local volume of the same name;
//! the record `volumes/<name>` ([`VolumeRecord`]) says which copy is the
//! primary and whether the replica has every write a guest saw complete
//! (`UpToDate`), is being filled (`Syncing`) or misses writes (`Outdated`).
//! The rules, and where each is kept:
//!
//! - **A VM runs only on the primary copy.** The launch hook refuses a VM
//!   on any other ([`ClusterNode::before_launch_with_volumes`]).
//! - **Only an up-to-date replica is promoted.** The scheduler places an
//!   instance on its primary's node, or on the replica's node when the
//!   primary's is gone and the replica is `UpToDate`, and nowhere else
//!   ([`volume_home`]); the claim makes the replica the primary (a new
//!   epoch, the old primary's copy `Outdated`) in the same transaction that
//!   takes the instance, compared with the record the scheduler read.
//! - **Before a primary writes without its replica, the record says so.**
//!   A VM starting on the primary marks the replica `Syncing` first (the
//!   launch hook); the replication marks it `Outdated` before it cuts a
//!   replica that stopped answering loose (then the guest goes on alone).
//!   Every such write compares the instance's fencing token: a node that
//!   lost its instance cannot write it.
//! - **A returning primary never merges.** Serving a copy as the replica
//!   empties it; the new primary fills it with a full copy.
//!
//! The data path: the primary's VMM mirrors the volume's drive
//! synchronously (QEMU `blockdev-mirror`, `write-blocking`) into a
//! `qemu-nbd` on the replica's node that writes through. The NBD stream
//! travels on the very peer-port connection whose proven hello asked for
//! the replica, in TLS from right after the hello's verdict: the primary
//! shows its node certificate and checks the replica's name on the
//! replica's, the replica checks that the primary's certificate names the
//! node that proved the hello, before it makes, empties or serves a copy
//! (`crate::tls::replication_client`, [`ClusterNode::serve_replica`]).
//! The replica's node splices the TLS stream to its server's unix socket
//! ([`splice`]), and no server of a copy listens on the network (it would
//! take any client: qemu-nbd has no authentication but TLS). The primary
//! hands the established connection, with its TLS record keys, to its
//! relay ([`vroom_volume::relay::sealed`]). The VMM does not get that
//! connection: it
//! talks to a relay (`vroom __nbd-relay`, [`vroom_volume::relay`]) that
//! forwards while the replica answers and *holds* the guest's write when it
//! fails, closes or goes silent for [`SILENT`], until this node has recorded
//! the replica outdated and releases it: QEMU alone would complete that
//! write with the local copy at once (docs/design/replication.md §5.2).

use std::net::SocketAddr;
use std::os::fd::AsFd;
use std::time::Instant;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UnixStream};
use vroom_types::{ReplicaState, Volume, VolumeCreateRequest, VolumeReplication};
use vroom_volume::relay;

use super::peers::read_json_line;
use super::*;
use crate::peer_auth::HANDSHAKE_TIMEOUT;

mod moving;
mod splice;

pub(super) use moving::fills_within;

/// How long a replica may leave a write unanswered before the relay holds
/// it as lost (a frozen node keeps acknowledging TCP: only this catches it).
const SILENT: Duration = Duration::from_secs(1);
/// How often a replication is looked at.
const WATCH_EVERY: Duration = Duration::from_millis(100);
/// How long after a replication ended the next one may start.
const RETRY_AFTER: Duration = Duration::from_secs(2);
/// How long a primary tries to record its replica `Outdated` before it
/// stops its VM rather than let it write unprotected.
const RECORD_DEADLINE: Duration = Duration::from_secs(3);
/// Whether the same replica back after a fault gets only what it missed
/// (the paused job, given a new connection), rather than a full copy.
const RESUME_INCREMENTALLY: bool = true;
/// How long a copy this node made (or is making) is kept while a pass's
/// view lacks its record (the view may be older than the record).
const CREATE_GRACE: Duration = Duration::from_secs(60);
/// How long after this node last served a copy it is kept although the
/// record names other nodes: a pass's view may be older than the record
/// that named this node (one pass: under a second).
const SERVE_GRACE: Duration = Duration::from_secs(5);

/// The node an instance using `volumes` may run on now: the primary's
/// while it is up and not cordoned; else the replica's, if that copy is up
/// to date and its node is up and not cordoned. `None`: nowhere yet. The
/// volumes of one instance must agree.
pub(super) fn volume_home(view: &View, volumes: &[&VolumeRecord]) -> Option<String> {
    let usable = |node: &str| view.node_state(node) == NodeState::Ready;
    let mut home: Option<String> = None;
    for v in volumes {
        let here = if usable(&v.primary) {
            v.primary.clone()
        } else if v.replicated() && v.state == ReplicaState::UpToDate && usable(&v.replica) {
            v.replica.clone()
        } else {
            return None;
        };
        match &home {
            Some(h) if *h != here => return None,
            _ => home = Some(here),
        }
    }
    home
}

/// Why an instance using `volumes` is not placed, when a volume's only
/// copy is on a node that cannot take it now: it waits for that node.
pub(super) fn waiting_for_volume(view: &View, volumes: &[&VolumeRecord]) -> Option<String> {
    volumes.iter().filter(|v| v.one_copy).find_map(|v| {
        let state = view.node_state(&v.primary);
        (state != NodeState::Ready).then(|| {
            format!(
                "waiting for node {} ({}), which holds volume {}'s only copy",
                v.primary,
                match state {
                    NodeState::Cordoned => "cordoned",
                    _ => "lost",
                },
                v.name
            )
        })
    })
}

/// What ended a replication.
enum Ended {
    /// The VM stopped, or this node no longer owns it: nothing to record.
    Quietly,
    /// The replica failed or went silent: recorded `Outdated`.
    Fault(String),
}

impl ClusterNode {
    /// The cluster volumes an instance's record names.
    pub(super) fn volumes_of<'a>(
        view: &'a View,
        record: &InstanceRecord,
    ) -> Vec<&'a (VolumeRecord, Kv)> {
        record
            .request
            .spec
            .volumes
            .iter()
            .filter_map(|a| view.volumes.get(a.volume.as_str()))
            .collect()
    }

    /// A new cluster instance's volumes: each the cluster's (a local
    /// volume would not follow it), unused, and all with their primary (or
    /// only) copy on one node, the one it is asked to run on, if any; a
    /// volume with one copy also needs its node up, and no `--ha standby`.
    pub(super) fn check_volumes(&self, req: &RunRequest, view: &View) -> Result<(), OpError> {
        let mut primaries = BTreeSet::new();
        for attach in &req.spec.volumes {
            let name = attach.volume.as_str();
            let Some((volume, _)) = view.volumes.get(name) else {
                return Err(OpError::new(
                    ErrorCode::HostUnsupported,
                    format!(
                        "{} (volume {name} is not the cluster's)",
                        vroom_core::engine::VOLUMES_STAY_LOCAL
                    ),
                ));
            };
            if let Some(user) = view.user_of_volume(name) {
                return Err(OpError::conflict(format!(
                    "volume {name} is attached to instance {user}"
                )));
            }
            if volume.one_copy {
                let node = &volume.primary;
                if req.placement.ha == HaPolicy::Standby {
                    return Err(OpError::conflict(format!(
                        "--ha standby needs another node to fail over to, and volume {name} has one copy, on node {node}: use --ha restart (it restarts there), or a volume with --replicas 2"
                    )));
                }
                if let Some(asked) = req.placement.node.as_ref().filter(|n| n.as_str() != node) {
                    return Err(OpError::conflict(format!(
                        "volume {name} has one copy, on node {node}: an instance using it runs there, not on {asked}"
                    )));
                }
                if view.node_state(node) != NodeState::Ready {
                    return Err(OpError::conflict(format!(
                        "volume {name} has one copy, on node {node}, which is down or cordoned"
                    )));
                }
            }
            primaries.insert(volume.primary.clone());
        }
        if primaries.len() > 1 {
            return Err(OpError::conflict(format!(
                "the volumes' primary copies are on different nodes ({}); an instance runs on one",
                primaries.into_iter().collect::<Vec<_>>().join(", ")
            )));
        }
        if let (Some(node), Some(primary)) = (&req.placement.node, primaries.first()) {
            if node.as_str() != primary {
                return Err(OpError::conflict(format!(
                    "its volumes' primary copies are on node {primary}, not {node}"
                )));
            }
        }
        Ok(())
    }

    /// A new cluster instance's declared volumes (its image's
    /// `[[volumes]]`) that the request does not attach: `INSTANCE-ROLE`,
    /// kept on two nodes: taken when the cluster has it (and nothing uses
    /// it), made here otherwise. Returns the volumes it made.
    pub(super) async fn attach_declared_volumes(
        &self,
        request: &mut RunRequest,
        view: &View,
    ) -> Result<Vec<String>, OpError> {
        if request.from_snapshot.is_some() {
            return Ok(vec![]);
        }
        let image = self.engine.get_image(&request.spec.image)?;
        let mut made = vec![];
        for decl in &image.manifest.appliance.volumes {
            if request.spec.volumes.iter().any(|a| a.path == decl.path) {
                continue;
            }
            let name = format!("{}-{}", request.spec.name, decl.name);
            let attached = match Name::new(&name) {
                Ok(n) => n,
                Err(_) => {
                    self.remove_made(&made).await;
                    return Err(OpError::new(
                        ErrorCode::InvalidArgument,
                        format!(
                            "the name {name:?} for the instance's {} volume is too long; name the instance shorter or attach a volume with --volume NAME:{}",
                            decl.name, decl.path
                        ),
                    ));
                }
            };
            if let Some(user) = view.user_of_volume(&name) {
                self.remove_made(&made).await;
                return Err(OpError::conflict(format!(
                    "volume {name} is attached to instance {user}"
                )));
            }
            if !view.volumes.contains_key(&name) {
                if let Some(node) = request
                    .placement
                    .node
                    .as_ref()
                    .filter(|n| n.as_str() != self.name)
                {
                    self.remove_made(&made).await;
                    return Err(OpError::conflict(format!(
                        "its {} volume would be made on node {} (the one asked), where its primary copy must be: ask node {node}, or make it there first with `vroom volume create {name} --replicas 2`",
                        decl.name, self.name
                    )));
                }
                let req = VolumeCreateRequest {
                    name: attached.clone(),
                    size_mib: decl.size_mib,
                    fs: decl.fs,
                    replicas: 2,
                    node: None,
                    replica_node: None,
                };
                if let Err(e) = self.create_volume(req).await {
                    self.remove_made(&made).await;
                    return Err(OpError::new(
                        e.code,
                        format!(
                            "its {} volume is kept on two nodes in a cluster: {}",
                            decl.name, e.message
                        ),
                    ));
                }
                made.push(name.clone());
            }
            request.spec.volumes.push(vroom_types::VolumeAttach {
                volume: attached,
                path: decl.path.clone(),
                read_only: false,
            });
        }
        Ok(made)
    }

    pub(super) async fn remove_made(&self, made: &[String]) {
        for volume in made {
            let _ = self.remove_volume(volume).await;
        }
    }

    /// Makes a volume on node `req.node` (this one when absent; another is
    /// asked over its API): with one copy, kept there alone; with two
    /// replicas, that copy is the primary and another node (`replica_node`,
    /// or the one with the most free memory) keeps the replica.
    pub async fn create_volume(&self, mut req: VolumeCreateRequest) -> Result<Volume, OpError> {
        req.validate()?;
        let name = req.name.to_string();
        let view = self.view().await?;
        let node = req
            .node
            .as_ref()
            .map_or_else(|| self.name.clone(), |n| n.to_string());
        Self::check_volume_node(&view, &node, "")?;
        if let Some(replica) = &req.replica_node {
            if replica.as_str() == node {
                return Err(OpError::new(
                    ErrorCode::InvalidArgument,
                    format!("the replica must be on another node than the primary ({node})"),
                ));
            }
            Self::check_volume_node(&view, replica.as_str(), "replica ")?;
        }
        if view.volumes.contains_key(&name) {
            return Err(OpError::new(
                ErrorCode::AlreadyExists,
                format!("a volume named {name} already exists"),
            ));
        }
        if node != self.name {
            let client = self.peer_api(&view, &node).map_err(|e| {
                OpError::new(ErrorCode::Conflict, format!("cannot ask node {node}: {e}"))
            })?;
            return client
                .create_volume(&req)
                .await
                .map_err(|e| peer_error(&node, e));
        }
        if self.engine.volume(&name).is_ok() {
            return Err(OpError::new(
                ErrorCode::AlreadyExists,
                format!("a volume named {name} already exists"),
            ));
        }
        req.node = Some(Name::new(&self.name)?);
        if req.replicas < 2 {
            return self.create_one_copy(req).await;
        }
        let replica = match &req.replica_node {
            Some(r) => r.to_string(),
            None => view
                .candidates()
                .values()
                .filter(|c| c.name != self.name && c.state == NodeState::Ready)
                .max_by_key(|c| c.mem_free_mib)
                .map(|c| c.name.clone())
                .ok_or_else(|| {
                    OpError::new(
                        ErrorCode::HostUnsupported,
                        "a volume with 2 replicas needs a second node that is up and not cordoned; this cluster has none",
                    )
                })?,
        };
        self.creating_volumes
            .lock_unpoisoned()
            .insert(name.clone(), Instant::now());
        let made = self.record_new_volume(&req, &replica).await;
        {
            // A pass that read the view before the record was written must
            // still leave the new copy alone: the mark stays for the grace
            // after the record, not just while it is written.
            let mut creating = self.creating_volumes.lock_unpoisoned();
            match &made {
                Ok(_) => creating.insert(name.clone(), Instant::now()),
                Err(_) => creating.remove(&name),
            };
        }
        let record = made?;
        tracing::info!(volume = %name, primary = %self.name, %replica, "replicated volume created");
        self.volume_view(&record, self.engine.volume(&name).ok())
    }

    /// Refuses to keep a volume's copy (`role`: "" or "replica ") on node
    /// `node` unless it is a member that is up and not cordoned.
    fn check_volume_node(view: &View, node: &str, role: &str) -> Result<(), OpError> {
        match view.node_info(node) {
            None => Err(OpError::new(
                ErrorCode::NotFound,
                format!("{role}node {node} is not in the cluster"),
            )),
            Some(n) if !n.alive => Err(OpError::conflict(format!(
                "{role}node {node} is down; a volume is made on a live node"
            ))),
            Some(n) if n.cordoned => Err(OpError::conflict(format!(
                "{role}node {node} is cordoned; a volume is made on a node that takes instances"
            ))),
            Some(_) => Ok(()),
        }
    }

    /// Makes a volume with one copy, on this node, and records it.
    async fn create_one_copy(&self, req: VolumeCreateRequest) -> Result<Volume, OpError> {
        let name = req.name.to_string();
        self.creating_volumes
            .lock_unpoisoned()
            .insert(name.clone(), Instant::now());
        let made = self.record_new_volume(&req, "").await;
        {
            let mut creating = self.creating_volumes.lock_unpoisoned();
            match &made {
                Ok(_) => creating.insert(name.clone(), Instant::now()),
                Err(_) => creating.remove(&name),
            };
        }
        let record = made?;
        tracing::info!(volume = %name, node = %self.name, "volume with one copy created");
        self.volume_view(&record, self.engine.volume(&name).ok())
    }

    /// Makes this node's copy and records the volume (`replica`: empty for
    /// a volume with one copy); the copy goes again when the record cannot
    /// be written.
    async fn record_new_volume(
        &self,
        req: &VolumeCreateRequest,
        replica: &str,
    ) -> Result<VolumeRecord, OpError> {
        let name = req.name.as_str();
        self.engine.create_volume_copy(req).await?;
        let now = now_secs();
        let record = VolumeRecord {
            name: name.to_string(),
            size_mib: req.size_mib,
            fs: req.fs,
            primary: self.name.clone(),
            replica: replica.to_string(),
            one_copy: replica.is_empty(),
            state: ReplicaState::Outdated,
            epoch: 1,
            since: now,
            reason: (!replica.is_empty())
                .then(|| "not synced yet: its first copy is made when an instance uses it".into()),
            created_at: now,
            last_sync: None,
        };
        let txn = Txn::new()
            .when([Compare::create_revision(key(VOLUMES, name), 0)])
            .and_then([Op::put(key(VOLUMES, name), json(&record))]);
        let written = match self.store.txn(txn).await {
            Ok(r) if r.succeeded() => Ok(()),
            Ok(_) => Err(OpError::new(
                ErrorCode::AlreadyExists,
                format!("a volume named {name} already exists"),
            )),
            Err(e) => Err(etcd_error("cannot record the volume", e)),
        };
        if let Err(e) = written {
            let _ = self.engine.remove_volume(name).await;
            return Err(e);
        }
        Ok(record)
    }

    /// Removes a volume; a replicated one from both nodes (the other node
    /// removes its copy when it sees the record gone).
    pub async fn remove_volume(&self, name: &str) -> Result<(), OpError> {
        let view = self.view().await?;
        let Some((_, kv)) = view.volumes.get(name) else {
            return self.engine.remove_volume(name).await;
        };
        if let Some(user) = view.user_of_volume(name) {
            return Err(OpError::conflict(format!(
                "volume {name} is attached to instance {user}; remove the instance first (its volumes stay unless `rm --volumes`)"
            )));
        }
        let (record, _) = &view.volumes[name];
        if record.one_copy
            && record.primary != self.name
            && view.nodes.contains_key(&record.primary)
        {
            // Its node removes the copy and the record; a node that is
            // down removes its copy when it sees the record gone.
            let node = &record.primary;
            let client = self.peer_api(&view, node).map_err(|e| {
                OpError::new(ErrorCode::Conflict, format!("cannot ask node {node}: {e}"))
            })?;
            return client
                .remove_volume(name)
                .await
                .map_err(|e| peer_error(node, e));
        }
        let txn = Txn::new()
            .when([Compare::mod_revision(kv.key.clone(), kv.mod_revision)])
            .and_then([Op::delete(kv.key.clone())]);
        match self.store.txn(txn).await {
            Ok(r) if r.succeeded() => {}
            Ok(_) => {
                return Err(OpError::conflict(format!(
                    "volume {name} changed while it was being removed; try again"
                )))
            }
            Err(e) => return Err(etcd_error("cannot remove the volume's record", e)),
        }
        self.engine.stop_replica_server(name);
        match self.engine.remove_volume(name).await {
            Ok(()) => Ok(()),
            Err(e) if e.code == ErrorCode::NotFound => Ok(()),
            Err(e) => Err(e),
        }
    }

    pub async fn list_volumes(&self) -> Result<Vec<Volume>, OpError> {
        let mut local = self.engine.list_volumes()?;
        let Ok(view) = self.view().await else {
            return Ok(local);
        };
        let mut listed = vec![];
        for (name, (record, _)) in &view.volumes {
            let copy = local
                .iter()
                .position(|v| v.name.as_str() == name)
                .map(|i| local.remove(i));
            listed.push(self.volume_view(record, copy)?);
        }
        listed.extend(local);
        listed.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(listed)
    }

    pub async fn volume(&self, name: &str) -> Result<Volume, OpError> {
        let local = self.engine.volume(name).ok();
        let record = self
            .store
            .get(&key(VOLUMES, name))
            .await
            .map_err(|e| etcd_error("cannot read the volume", e))?;
        match (record, local) {
            (Some(kv), local) => {
                let record: VolumeRecord = kv
                    .decode()
                    .map_err(|e| etcd_error("cannot read the volume", e))?;
                self.volume_view(&record, local)
            }
            (None, Some(local)) => Ok(local),
            (None, None) => Err(OpError::not_found("volume", name)),
        }
    }

    /// A cluster's volume as the API shows it: this node's copy (if it has
    /// one) with where its copies are; a sync this node runs says how far
    /// it is.
    fn volume_view(&self, record: &VolumeRecord, copy: Option<Volume>) -> Result<Volume, OpError> {
        let mut volume = match copy {
            Some(v) => v,
            None => Volume {
                id: String::new(),
                name: Name::new(&record.name)?,
                size_mib: record.size_mib,
                fs: record.fs,
                replicas: 2,
                created_at: record.created_at,
                attached_to: None,
                allocated_bytes: 0,
                snapshots: vec![],
                export: None,
                replication: None,
                node: None,
            },
        };
        if record.one_copy {
            volume.replicas = 1;
            volume.node = Some(record.primary.clone());
            if !record.replicated() {
                return Ok(volume);
            }
            // A live migration copies it to its replica: shown as one.
        }
        let progress = volume
            .attached_to
            .as_ref()
            .filter(|_| record.primary == self.name && record.state == ReplicaState::Syncing)
            .and_then(|i| {
                self.engine
                    .replica_job(i.as_str(), &record.name)
                    .ok()
                    .flatten()
            });
        volume.replication = Some(VolumeReplication {
            primary: record.primary.clone(),
            replica: record.replica.clone(),
            state: record.state,
            epoch: record.epoch,
            since: record.since,
            reason: record.reason.clone(),
            synced_bytes: progress.map(|j| j.done),
            sync_total_bytes: progress.map(|j| j.total),
            last_sync: record.last_sync,
        });
        Ok(volume)
    }

    /// The claim's share for an instance with replicated volumes: compares
    /// with the records the scheduler read, and (taken over on the
    /// replica's node) the promotion. `None`: this node may not take it.
    pub(super) fn claim_volumes(
        &self,
        view: &View,
        record: &InstanceRecord,
    ) -> Option<(Vec<Compare>, Vec<Op>)> {
        let mut compares = vec![];
        let mut ops = vec![];
        for (volume, kv) in Self::volumes_of(view, record) {
            compares.push(Compare::mod_revision(kv.key.clone(), kv.mod_revision));
            if volume.primary == self.name {
                continue;
            }
            if volume.replica != self.name || volume.state != ReplicaState::UpToDate {
                return None;
            }
            ops.push(Op::put(kv.key.clone(), json(&volume.promoted(now_secs()))));
        }
        Some((compares, ops))
    }

    /// The records of the replicated volumes an instance's record names.
    async fn volume_records_of(
        &self,
        record: &InstanceRecord,
    ) -> Result<Vec<(VolumeRecord, Kv)>, OpError> {
        let mut found = vec![];
        for attach in &record.request.spec.volumes {
            let read = self
                .store
                .get_json::<VolumeRecord>(&key(VOLUMES, attach.volume.as_str()))
                .await
                .map_err(|e| etcd_error("cannot read the volume", e))?;
            found.extend(read);
        }
        Ok(found)
    }

    /// A live migration's takeover share: every replicated volume of the
    /// instance has its up-to-date replica on this node, which becomes the
    /// primary in the takeover's transaction. `Err`: it may not move here.
    pub(super) async fn takeover_volumes(
        &self,
        record: &InstanceRecord,
    ) -> Result<(Vec<Compare>, Vec<Op>), OpError> {
        let mut compares = vec![];
        let mut ops = vec![];
        for (volume, kv) in self.volume_records_of(record).await? {
            let name = &volume.name;
            if volume.replica != self.name || volume.state != ReplicaState::UpToDate {
                return Err(OpError::conflict(format!(
                    "volume {name}'s copy here is not its up-to-date replica; the instance stays where it was"
                )));
            }
            compares.push(Compare::mod_revision(kv.key.clone(), kv.mod_revision));
            ops.push(Op::put(kv.key, json(&volume.promoted(now_secs()))));
        }
        Ok((compares, ops))
    }

    /// A give-back's share: the volumes' primary copies are the source's
    /// again (a new epoch), and this node's copies, which its VM may have
    /// written, are outdated.
    pub(super) async fn give_back_volumes(
        &self,
        record: &InstanceRecord,
        to: &str,
    ) -> Result<(Vec<Compare>, Vec<Op>), String> {
        let mut compares = vec![];
        let mut ops = vec![];
        let records = self
            .volume_records_of(record)
            .await
            .map_err(|e| e.message)?;
        for (volume, kv) in records {
            let back = VolumeRecord {
                primary: to.to_string(),
                // A volume with one copy is the source's alone again: this
                // node's copy goes.
                replica: match volume.one_copy {
                    true => String::new(),
                    false => self.name.clone(),
                },
                epoch: volume.epoch + 1,
                ..volume.with_state(
                    ReplicaState::Outdated,
                    Some(format!(
                        "a migration to {} failed; the copy there is synced again",
                        self.name
                    )),
                    now_secs(),
                )
            };
            compares.push(Compare::mod_revision(kv.key.clone(), kv.mod_revision));
            ops.push(Op::put(kv.key, json(&back)));
        }
        Ok((compares, ops))
    }

    /// Stops serving this node's copies of an instance's volumes: they
    /// are its primary copies now.
    pub(super) fn stop_serving_volumes_of(&self, record: &InstanceRecord) {
        for attach in &record.request.spec.volumes {
            self.engine.stop_replica_server(attach.volume.as_str());
        }
    }

    /// The launch hook: a VM using replicated volumes starts only on their
    /// primary copies, and only once their records say the replicas miss
    /// what it writes until they are synced again. Blocking.
    pub(super) fn before_launch_with_volumes(
        &self,
        instance: &str,
        volumes: &[String],
    ) -> Result<(), OpError> {
        let handle = tokio::runtime::Handle::current();
        if self.incoming.lock_unpoisoned().contains_key(instance) {
            // A live migration coming in runs on this node's replica: only
            // an up-to-date one; the takeover promotes it.
            for volume in volumes {
                let record = tokio::task::block_in_place(|| {
                    handle.block_on(self.store.get(&key(VOLUMES, volume)))
                })
                .map_err(|e| etcd_error("cannot read the volume", e))?
                .map(|kv| kv.decode::<VolumeRecord>())
                .transpose()
                .map_err(|e| etcd_error("cannot read the volume", e))?;
                if let Some(v) = record {
                    if v.replica != self.name || v.state != ReplicaState::UpToDate {
                        return Err(OpError::conflict(format!(
                            "volume {volume}'s copy on node {} is not its up-to-date replica",
                            self.name
                        )));
                    }
                }
            }
            return Ok(());
        }
        let Some(token) = self.token(instance) else {
            return Ok(());
        };
        for volume in volumes {
            let volume = volume.as_str();
            tokio::task::block_in_place(|| {
                handle.block_on(self.update_volume(instance, token, volume, |v| {
                    if v.primary != self.name {
                        return Err(OpError::conflict(format!(
                            "volume {volume}'s primary copy is on node {}; instance {instance} does not start on node {}'s copy",
                            v.primary, self.name
                        )));
                    }
                    Ok((v.state == ReplicaState::UpToDate).then(|| {
                        v.with_state(
                            ReplicaState::Syncing,
                            Some(format!(
                                "instance {instance} starts on node {}: its replica is synced again",
                                self.name
                            )),
                            now_secs(),
                        )
                    }))
                }))
            })?;
            // No copy here is a replica while a VM uses it.
            self.engine.stop_replica_server(volume);
        }
        Ok(())
    }

    /// Changes a volume's record under `instance`'s fencing token: `change`
    /// says what it becomes (`None`: nothing to change).
    async fn update_volume(
        &self,
        instance: &str,
        token: i64,
        volume: &str,
        change: impl Fn(&VolumeRecord) -> Result<Option<VolumeRecord>, OpError>,
    ) -> Result<(), OpError> {
        // A record another writer changed between the read and the write
        // is read again; a lost token is final.
        for _ in 0..5 {
            let Some(kv) = self
                .store
                .get(&key(VOLUMES, volume))
                .await
                .map_err(|e| etcd_error("cannot read the volume", e))?
            else {
                return Ok(());
            };
            let current: VolumeRecord = kv
                .decode()
                .map_err(|e| etcd_error("cannot read the volume", e))?;
            let Some(next) = change(&current)? else {
                return Ok(());
            };
            let txn = Txn::new()
                .when([
                    Compare::mod_revision(key(OWNERS, instance), token),
                    Compare::mod_revision(kv.key.clone(), kv.mod_revision),
                ])
                .and_then([Op::put(kv.key.clone(), json(&next))]);
            let done = self
                .store
                .txn(txn)
                .await
                .map_err(|e| etcd_error("cannot record the volume's state", e))?;
            if done.succeeded() {
                if next.state != current.state {
                    tracing::info!(%volume, from = %current.state, to = %next.state, reason = ?next.reason, "replica state");
                    let action = match next.state {
                        ReplicaState::UpToDate => "resynced",
                        ReplicaState::Outdated => "degraded",
                        _ => "syncing",
                    };
                    let mut event = NewEvent::new(EventKind::Volume, action, volume)
                        .detail("replica", next.replica.clone())
                        .detail("epoch", next.epoch);
                    if let Some(reason) = &next.reason {
                        event = event.message(reason.clone());
                    }
                    self.event(event);
                }
                return Ok(());
            }
            if self.token(instance) != Some(token) {
                break;
            }
        }
        Err(OpError::conflict(format!(
            "node {} no longer owns {instance}; volume {volume}'s record is not its to change",
            self.name
        )))
    }

    /// The reconcile pass's share: runs a replication for each replicated
    /// volume an instance running here uses as primary; stops serving
    /// copies this node is not the replica of; removes copies whose volume
    /// is gone.
    pub(super) async fn replicate(&self, view: &View) {
        let owned = self.owned.lock_unpoisoned().clone();
        {
            let mut running = self.replications.lock_unpoisoned();
            running.retain(|_, (_, task)| !task.is_finished());
        }
        for (instance, token) in &owned {
            let Some((record, _)) = view.instances.get(instance) else {
                continue;
            };
            let running_here = self
                .engine
                .get(instance)
                .is_ok_and(|i| i.status.state == InstanceState::Running);
            if !running_here || self.streaming_out(instance) {
                continue;
            }
            for (volume, _) in Self::volumes_of(view, record) {
                if volume.primary != self.name {
                    continue;
                }
                let migrating = self.migrating.lock_unpoisoned().contains(instance);
                if volume.one_copy && volume.replicated() && !migrating {
                    // The replica a live migration made and did not use
                    // (it failed, or a killed daemon left it): the volume
                    // is this copy's alone again.
                    self.drop_moving_replica(instance, *token, volume).await;
                    continue;
                }
                if !volume.replicated() {
                    if self
                        .replications
                        .lock_unpoisoned()
                        .contains_key(&volume.name)
                    {
                        self.replica_moved
                            .lock_unpoisoned()
                            .insert(volume.name.clone());
                    }
                    continue;
                }
                if !view.members.contains_key(&volume.replica) && !volume.one_copy {
                    // Its replica's node was removed: another keeps it.
                    self.rehome_replica(instance, *token, volume, view).await;
                    continue;
                }
                if !view.nodes.contains_key(&volume.replica) {
                    continue;
                }
                let Some(peer) = view
                    .nodes
                    .get(&volume.replica)
                    .and_then(|(n, _)| n.peer.clone())
                else {
                    continue;
                };
                let mut running = self.replications.lock_unpoisoned();
                if let Some((to, _)) = running.get(&volume.name) {
                    if *to != volume.replica {
                        // The record names another replica now (written
                        // first): the running one is let go, and the next
                        // pass fills the new one.
                        self.replica_moved
                            .lock_unpoisoned()
                            .insert(volume.name.clone());
                    }
                    continue;
                }
                if let Some(ended) = self.replication_ended.lock_unpoisoned().get(&volume.name) {
                    if ended.elapsed() < RETRY_AFTER {
                        continue;
                    }
                }
                // The same replica back after a fault that left the job
                // paused with what it missed: only that is sent.
                let paused_for = self
                    .paused_replications
                    .lock_unpoisoned()
                    .remove(&volume.name);
                let resume =
                    RESUME_INCREMENTALLY && paused_for.as_deref() == Some(volume.replica.as_str());
                self.replica_moved.lock_unpoisoned().remove(&volume.name);
                let node = self.arc();
                let (instance, volume_name, token) =
                    (instance.clone(), volume.name.clone(), *token);
                let replica = volume.replica.clone();
                // The first replication of this volume since vroomd
                // started: QEMU may still run the last one's job.
                let first = !self
                    .replication_ended
                    .lock_unpoisoned()
                    .contains_key(&volume.name);
                let task = tokio::spawn(async move {
                    let adopted = match first {
                        true => {
                            node.readopt_replication(&instance, &volume_name, token, &replica)
                                .await
                        }
                        false => None,
                    };
                    let ended = match adopted {
                        Some(ended) => ended,
                        None => {
                            node.run_replication(
                                &instance,
                                &volume_name,
                                token,
                                (&replica, &peer),
                                resume,
                            )
                            .await
                        }
                    };
                    match ended {
                        Ended::Quietly => {}
                        Ended::Fault(reason) => {
                            tracing::warn!(volume = %volume_name, %instance, %reason, "the replication ended");
                            // A sync that did not get going says why.
                            let _ = node
                                .update_volume(&instance, token, &volume_name, |v| {
                                    Ok((v.state == ReplicaState::Syncing).then(|| {
                                        v.with_state(
                                            ReplicaState::Outdated,
                                            Some(reason.clone()),
                                            now_secs(),
                                        )
                                    }))
                                })
                                .await;
                        }
                    }
                    let _ = std::fs::remove_file(mark_path(&node.relay_control(&volume_name)));
                    node.replication_ended
                        .lock_unpoisoned()
                        .insert(volume_name, Instant::now());
                });
                running.insert(volume.name.clone(), (volume.replica.clone(), task));
            }
        }
        self.tidy_copies(view).await;
    }

    /// Makes `volume`, which has one copy, this node's alone again: the
    /// replica a live migration made goes (its node removes the copy once
    /// the record no longer names it; the replication to it ends).
    async fn drop_moving_replica(&self, instance: &str, token: i64, volume: &VolumeRecord) {
        let gone = volume.replica.clone();
        let dropped = self
            .update_volume(instance, token, &volume.name, |v| {
                Ok((v.one_copy && v.replica == gone).then(|| VolumeRecord {
                    replica: String::new(),
                    ..v.with_state(ReplicaState::Outdated, None, now_secs())
                }))
            })
            .await;
        match dropped {
            Ok(()) => {
                tracing::info!(volume = %volume.name, %instance, replica = %gone, "the volume has one copy again: the copy a migration made goes");
                let running = self
                    .replications
                    .lock_unpoisoned()
                    .get(&volume.name)
                    .is_some_and(|(_, task)| !task.is_finished());
                if running {
                    self.replica_moved
                        .lock_unpoisoned()
                        .insert(volume.name.clone());
                    return;
                }
                // A replication a killed daemon left (its relay and QEMU's
                // mirror job outlive it): its replica's node stops serving
                // now, and the relay would hold the guest's writes.
                let control = self.relay_control(&volume.name);
                release_relay(&control);
                let engine = self.engine.clone();
                let (inst, vol) = (instance.to_string(), volume.name.clone());
                let _ =
                    tokio::task::spawn_blocking(move || engine.stop_replicating(&inst, &vol)).await;
                let _ = std::fs::remove_file(mark_path(&control));
            }
            Err(e) => {
                tracing::warn!(volume = %volume.name, error = %e.message, "cannot drop the copy a migration made")
            }
        }
    }

    /// Chooses a new node for the replica of `volume`, whose node was
    /// removed from the cluster: up, not cordoned, not this one, the most
    /// free memory. Its copy is made and filled by the next replication.
    async fn rehome_replica(&self, instance: &str, token: i64, volume: &VolumeRecord, view: &View) {
        let Some(new) = view
            .candidates()
            .into_values()
            .filter(|c| c.name != self.name && c.state == NodeState::Ready)
            .max_by_key(|c| c.mem_free_mib)
            .map(|c| c.name)
        else {
            return;
        };
        let gone = volume.replica.clone();
        let moved = self
            .update_volume(instance, token, &volume.name, |v| {
                Ok((v.replica == gone).then(|| VolumeRecord {
                    replica: new.clone(),
                    ..v.with_state(
                        ReplicaState::Outdated,
                        Some(format!(
                            "node {gone} was removed; node {new} keeps the replica now"
                        )),
                        now_secs(),
                    )
                }))
            })
            .await;
        match moved {
            Ok(()) => {
                tracing::info!(volume = %volume.name, %gone, %new, "the replica has a new node")
            }
            Err(e) => {
                tracing::warn!(volume = %volume.name, error = %e.message, "cannot give the replica a new node")
            }
        }
    }

    /// Stops serving copies this node is not the replica of, and removes
    /// replicated copies whose volume the cluster no longer has or keeps
    /// on other nodes (its replica moved, for a live migration, to a node
    /// that had no copy). A copy served when the pass began goes only at a
    /// later pass, and a young one (made or served lately) not at all: the
    /// view may be older than the record that named this node.
    pub(super) async fn tidy_copies(&self, view: &View) {
        let served = self.engine.served_replicas();
        for volume in &served {
            let keep = view
                .volumes
                .get(volume.as_str())
                .is_some_and(|(v, _)| v.replica == self.name);
            if !keep {
                self.engine.stop_replica_server(volume);
            }
        }
        let Ok(local) = self.engine.list_volumes() else {
            return;
        };
        let creating = {
            // A mark is needed only until a view has the record: from then
            // on the record decides (a copy that moves away within its
            // first minute must go like any other).
            let mut creating = self.creating_volumes.lock_unpoisoned();
            creating.retain(|name, t| {
                t.elapsed() < CREATE_GRACE && !view.volumes.contains_key(name.as_str())
            });
            creating.clone()
        };
        let served_lately = {
            let mut served = self.served_lately.lock_unpoisoned();
            served.retain(|_, t| t.elapsed() < SERVE_GRACE);
            served.clone()
        };
        for copy in local {
            let name = copy.name.as_str();
            let young = creating
                .get(name)
                .is_some_and(|t| t.elapsed() < CREATE_GRACE)
                || served_lately
                    .get(name)
                    .is_some_and(|t| t.elapsed() < SERVE_GRACE);
            // A volume made without the cluster is this node's alone.
            let local_only = copy.replicas < 2 && copy.node.is_none();
            if local_only || young || copy.attached_to.is_some() {
                continue;
            }
            let why = match view.volumes.get(name) {
                None => "the cluster no longer has the volume",
                Some((v, _)) if v.primary != self.name && v.replica != self.name => {
                    if served.iter().any(|s| s == name) {
                        continue;
                    }
                    "the volume's copies are kept on other nodes now"
                }
                Some(_) => continue,
            };
            tracing::info!(volume = %name, reason = why, "removing this node's copy of a replicated volume");
            self.engine.stop_replica_server(name);
            if let Err(e) = self.engine.remove_volume(name).await {
                tracing::warn!(volume = %name, error = %e.message, "cannot remove the copy");
            }
        }
    }

    /// One replication, from asking the replica's node to serve its copy
    /// until the VM stops, this node loses the instance, or the replica
    /// fails (then recorded `Outdated` before the guest goes on alone).
    async fn run_replication(
        &self,
        instance: &str,
        volume: &str,
        token: i64,
        replica: (&str, &str),
        resume: bool,
    ) -> Ended {
        let now = now_secs();
        let started_at = Instant::now();
        let what = if resume {
            format!("{} sends what the replica missed", self.name)
        } else {
            format!("a full copy from {} is under way", self.name)
        };
        // Not promotable from the moment its copy is emptied.
        let syncing = self
            .update_volume(instance, token, volume, |v| {
                Ok((v.state != ReplicaState::Syncing)
                    .then(|| v.with_state(ReplicaState::Syncing, Some(what.clone()), now)))
            })
            .await;
        if let Err(e) = syncing {
            return Ended::Fault(e.message);
        }
        // A relay left by an earlier daemon (holding, maybe) goes now that
        // the record no longer says up to date.
        let control = self.relay_control(volume);
        release_relay(&control);
        let (conn, keys) = match self.connect_replica(volume, replica, !resume).await {
            Ok(ReplicaConnection { stream, keys }) => (stream, keys),
            Err(e) => return Ended::Fault(e),
        };
        let conn = match conn.into_std().and_then(|c| {
            c.set_nonblocking(false)?;
            Ok(c)
        }) {
            Ok(c) => c,
            Err(e) => return Ended::Fault(format!("the replica's connection: {e}")),
        };
        // QEMU talks NBD to the relay, which holds a replica's failure
        // (an error, a close, silence) as a stall rather than let QEMU
        // acknowledge the write with the local copy alone.
        let (qemu_end, relay_end) = match std::os::unix::net::UnixStream::pair() {
            Ok(pair) => pair,
            Err(e) => return Ended::Fault(format!("cannot make the relay's socket pair: {e}")),
        };
        let exe = match std::env::current_exe() {
            Ok(exe) => exe,
            Err(e) => return Ended::Fault(format!("cannot find vroom's binary: {e}")),
        };
        let spawned = {
            let control = control.clone();
            tokio::task::spawn_blocking(move || {
                relay::spawn(
                    &exe,
                    relay_end.into(),
                    conn.into(),
                    Some(&keys),
                    &control,
                    SILENT,
                )
            })
            .await
        };
        match spawned {
            Ok(Ok(_pid)) => {}
            Ok(Err(e)) => return Ended::Fault(format!("cannot start the relay: {e}")),
            Err(e) => return Ended::Fault(e.to_string()),
        }
        let engine = self.engine.clone();
        let (inst, vol) = (instance.to_string(), volume.to_string());
        let started = tokio::task::spawn_blocking(move || {
            // QEMU keeps its own copy of the fd.
            engine.replicate_volume(&inst, &vol, qemu_end.as_fd(), resume)
        })
        .await;
        match started {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                release_relay(&control);
                return Ended::Fault(e.message);
            }
            Err(e) => {
                release_relay(&control);
                return Ended::Fault(e.to_string());
            }
        }
        tracing::info!(%volume, %instance, replica = %replica.0, at = %replica.1, resume, "replicating");
        self.mark_relay(&control, instance, replica.0);
        self.watch_replication(Watch {
            instance,
            volume,
            token,
            replica: replica.0,
            control: &control,
            resume,
            started_at,
            up_to_date: false,
        })
        .await
    }

    /// Takes over the replication of `instance`'s `volume` to `replica`
    /// that a previous vroomd left running (the relay and QEMU outlive it):
    /// its relay still answers, it was started for this instance and this
    /// replica, and QEMU still has its job. Then nothing is copied again:
    /// the job goes on with its dirty bitmap, and an up-to-date replica
    /// stays up to date. `None`: there is none to take over.
    async fn readopt_replication(
        &self,
        instance: &str,
        volume: &str,
        token: i64,
        replica: &str,
    ) -> Option<Ended> {
        let control = self.relay_control(volume);
        let mark: RelayMark = std::fs::read(mark_path(&control))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())?;
        if mark.instance != instance || mark.replica != replica {
            return None;
        }
        relay_status(&control).ok()?;
        let engine = self.engine.clone();
        let (inst, vol) = (instance.to_string(), volume.to_string());
        let job = tokio::task::spawn_blocking(move || engine.replica_job(&inst, &vol))
            .await
            .ok()?
            .ok()??;
        if job.failed {
            return None;
        }
        let record = self
            .store
            .get_json::<VolumeRecord>(&key(VOLUMES, volume))
            .await
            .ok()??
            .0;
        if record.primary != self.name || record.replica != replica {
            return None;
        }
        let up_to_date = record.state == ReplicaState::UpToDate;
        tracing::info!(%volume, %instance, %replica, state = %record.state, dirty = job.dirty, "took over the replication a previous vroomd left running: nothing is copied again");
        Some(
            self.watch_replication(Watch {
                instance,
                volume,
                token,
                replica,
                control: &control,
                resume: false,
                started_at: Instant::now(),
                up_to_date,
            })
            .await,
        )
    }

    /// Notes beside the relay's socket which replication it carries, for
    /// the next vroomd to take it over ([`Self::readopt_replication`]).
    fn mark_relay(&self, control: &Path, instance: &str, replica: &str) {
        let mark = RelayMark {
            instance: instance.to_string(),
            replica: replica.to_string(),
        };
        // A torn file is read as none: the next vroomd copies again.
        let written = serde_json::to_vec(&mark)
            .map_err(std::io::Error::other)
            .and_then(|b| std::fs::write(mark_path(control), b));
        if let Err(e) = written {
            tracing::warn!(control = %control.display(), error = %e, "cannot note the relay's replication; a restarted vroomd copies the volume again");
        }
    }

    /// Watches a replication until the VM stops, this node loses the
    /// instance, the replica moves, or the replica fails (then recorded
    /// `Outdated` before the guest goes on alone); records the replica up
    /// to date once it is.
    async fn watch_replication(&self, w: Watch<'_>) -> Ended {
        let Watch {
            instance,
            volume,
            token,
            replica,
            control,
            resume,
            started_at,
            up_to_date,
        } = w;
        let control = control.to_path_buf();
        let mut up_to_date = up_to_date;
        let mut seen_job = false;
        loop {
            tokio::time::sleep(WATCH_EVERY).await;
            if self.token(instance) != Some(token) {
                return Ended::Quietly;
            }
            let engine = self.engine.clone();
            let (inst, vol) = (instance.to_string(), volume.to_string());
            let job =
                match tokio::task::spawn_blocking(move || engine.replica_job(&inst, &vol)).await {
                    Ok(Ok(job)) => job,
                    // QMP busy or slow: nothing is known; look again.
                    Ok(Err(_)) | Err(_) => continue,
                };
            if self.replica_moved.lock_unpoisoned().remove(volume) {
                // The record no longer names this replica (it was written
                // first, so the guest may go on without it): let it go.
                release_relay(&control);
                let engine = self.engine.clone();
                let (inst, vol) = (instance.to_string(), volume.to_string());
                let stopped =
                    tokio::task::spawn_blocking(move || engine.stop_replicating(&inst, &vol)).await;
                if let Ok(Err(e)) = stopped {
                    tracing::warn!(%volume, error = %e.message, "cannot end the replication to the replica's old node");
                }
                tracing::info!(%volume, %instance, old = %replica, "the replica moved; no longer replicating to its old node");
                return Ended::Quietly;
            }
            if self.streaming_out(instance) {
                // Paused for good while it moves; its replica's node takes
                // over from its copy, or the move fails and the record is
                // rewritten: nothing to judge here until it is decided.
                continue;
            }
            let Some(job) = job else {
                // The VM stopped (or is gone): every write it completed is
                // on both copies, as the record says.
                release_relay(&control);
                return Ended::Quietly;
            };
            if !seen_job {
                seen_job = true;
                tracing::info!(%volume, dirty = job.dirty, done = job.done, total = job.total, "replication under way");
            }
            let fault = match relay_status(&control) {
                Ok(s) if s.state == relay::RelayState::Holding => Some(
                    s.fault
                        .unwrap_or_else(|| "the replica stopped answering".into()),
                ),
                Ok(_) if job.failed => Some("the replica failed a write".to_string()),
                Ok(_) => None,
                Err(e) => Some(format!("the relay is gone ({e})")),
            };
            if let Some(reason) = fault {
                self.cut_loose(instance, token, volume, &reason, &control)
                    .await;
                return Ended::Fault(reason);
            }
            // Ready and nothing left to send: a resumed job stays ready
            // while it sends what the replica missed, and its progress lags.
            if job.in_sync() && !up_to_date {
                let report = vroom_types::SyncReport {
                    incremental: resume,
                    bytes: relay_status(&control).map_or(0, |s| s.to_peer_bytes),
                    ms: started_at.elapsed().as_millis() as u64,
                    at: now_secs(),
                };
                let done = self
                    .update_volume(instance, token, volume, |v| {
                        Ok((v.state != ReplicaState::UpToDate).then(|| VolumeRecord {
                            last_sync: Some(report),
                            ..v.with_state(ReplicaState::UpToDate, None, now_secs())
                        }))
                    })
                    .await;
                match done {
                    Ok(()) => {
                        tracing::info!(%volume, %instance, sent = report.bytes, "the replica is up to date");
                        self.engine
                            .events()
                            .metrics()
                            .resync_bytes
                            .with_label_values(&[volume])
                            .inc_by(report.bytes as f64);
                        up_to_date = true;
                    }
                    Err(e) => {
                        tracing::warn!(%volume, error = %e.message, "cannot record the replica up to date")
                    }
                }
            }
        }
    }

    /// Whether `instance` is being streamed to another node: its replications
    /// are not judged meanwhile (its VM is paused for good, or about to be).
    /// While its volumes' replicas are moved first, it is not yet.
    fn streaming_out(&self, instance: &str) -> bool {
        self.migrating.lock_unpoisoned().contains(instance)
            && !self.moving_replicas.lock_unpoisoned().contains(instance)
    }

    /// Where the relay of `volume`'s replication answers.
    fn relay_control(&self, volume: &str) -> PathBuf {
        let dir = self.data_dir.join("relays");
        let _ = std::fs::create_dir_all(&dir);
        dir.join(format!("{volume}.sock"))
    }

    /// The replica stopped answering (or failed a write): the record says
    /// `Outdated` first, then the connection is cut and the guest's writes
    /// go on locally. A record that cannot be written in time stops the VM
    /// (its held writes were never acknowledged).
    async fn cut_loose(
        &self,
        instance: &str,
        token: i64,
        volume: &str,
        reason: &str,
        control: &Path,
    ) {
        let deadline = Instant::now() + RECORD_DEADLINE;
        let recorded = loop {
            // An etcd that does not answer must not hold the guest longer.
            let left = deadline.saturating_duration_since(Instant::now());
            let attempt = self.update_volume(instance, token, volume, |v| {
                Ok((v.state != ReplicaState::Outdated).then(|| {
                    v.with_state(ReplicaState::Outdated, Some(reason.to_string()), now_secs())
                }))
            });
            let outdated = match tokio::time::timeout(left, attempt).await {
                Ok(result) => result,
                Err(_) => Err(OpError::new(
                    ErrorCode::Timeout,
                    format!("etcd did not answer within {RECORD_DEADLINE:?}"),
                )),
            };
            match outdated {
                Ok(()) => break true,
                Err(_) if Instant::now() < deadline && self.token(instance) == Some(token) => {
                    tokio::time::sleep(Duration::from_millis(100)).await
                }
                Err(e) => {
                    tracing::error!(%volume, %instance, error = %e.message, "cannot record the replica outdated: stopping the VM rather than let it write unprotected");
                    break false;
                }
            }
        };
        if !recorded {
            let _ = self.engine.kill_vm(instance);
        }
        // Only now may QEMU see the failure (and complete the held write
        // with the local copy alone). Its job pauses with what the replica
        // missed: the same replica back resumes from there.
        release_relay(control);
        if let Ok(Some(kv)) = self.store.get(&key(VOLUMES, volume)).await {
            if let Ok(record) = kv.decode::<VolumeRecord>() {
                self.paused_replications
                    .lock_unpoisoned()
                    .insert(volume.to_string(), record.replica);
            }
        }
    }

    /// Asks node `replica` (at `peer`) to serve its copy, and returns the
    /// proven connection that asked, now TLS with `replica`'s certificate
    /// (the name checked), and its record keys: the replica's NBD stream
    /// follows on it, for the relay to carry.
    pub(super) async fn connect_replica(
        &self,
        volume: &str,
        (replica, peer): (&str, &str),
        empty: bool,
    ) -> Result<ReplicaConnection, String> {
        let hello = Hello::Replica {
            volume: volume.to_string(),
            primary: self.name.clone(),
            empty,
        };
        let ask = async {
            let stream = self.connect_peer(replica, peer, &hello).await?;
            // One NBD message is one write; Nagle would hold a reply
            // behind an ACK.
            let _ = stream.set_nodelay(true);
            let config = crate::tls::replication_client(&self.tls_dir())?;
            let name = rustls::pki_types::ServerName::try_from(replica.to_string())
                .map_err(|e| format!("node name {replica} is no TLS server name: {e}"))?;
            let mut tls = tokio::time::timeout(
                HANDSHAKE_TIMEOUT,
                tokio_rustls::TlsConnector::from(config).connect(name, stream),
            )
            .await
            .map_err(|_| {
                format!("no TLS handshake with node {replica} within {HANDSHAKE_TIMEOUT:?}")
            })?
            .map_err(|e| format!("TLS with node {replica} failed: {e}"))?;
            // Byte by byte: nothing of the stream may be buffered here.
            let answer: ReplicaReply = read_json_line(&mut tls)
                .await
                .map_err(|e| format!("no answer from {peer} to serve the replica: {e}"))?;
            Ok::<_, String>((tls, answer))
        };
        let (mut tls, answer) = tokio::time::timeout(Duration::from_secs(30), ask)
            .await
            .map_err(|_| format!("node at {peer} did not answer"))??;
        match answer {
            ReplicaReply::Streaming => {}
            ReplicaReply::Refused { reason } => return Err(reason),
            ReplicaReply::Serving { addr } => {
                return Err(format!(
                    "node {replica} serves its copy on an open port ({addr}), as vroom did before replicas were served over the peer connection; upgrade it"
                ))
            }
        }
        // The replica starts its stream only after this: until then
        // nothing arrives that the keys taken next would miss.
        let went = async {
            tls.write_all(&[STREAM_READY]).await?;
            tls.flush().await
        };
        went.await
            .map_err(|e| format!("node {replica} went away before the stream: {e}"))?;
        let (stream, conn) = tls.into_inner();
        let keys = crate::tls::record_keys(conn.dangerous_extract_secrets())?;
        Ok(ReplicaConnection { stream, keys })
    }

    /// Proven node `primary` asks this node to serve its copy of `volume`:
    /// only over TLS with `primary`'s own node certificate, only the node
    /// the record names as primary, to the node it names as replica
    /// (checked before the hello was accepted, and again here), and never
    /// a copy the record calls up to date (serving empties it). The copy's
    /// server listens on a unix socket, and the TLS stream is spliced to it
    /// until either side ends.
    pub(super) async fn serve_replica(
        &self,
        stream: TcpStream,
        volume: &str,
        primary: &str,
        empty: bool,
    ) {
        let _ = stream.set_nodelay(true);
        // Before anything is made or emptied.
        let mut tls = match self.accept_replication(stream, primary).await {
            Ok(tls) => tls,
            Err(reason) => {
                tracing::warn!(%volume, %primary, %reason, "refused a replica's stream");
                return;
            }
        };
        let server = match self.check_and_serve(volume, primary, empty).await {
            Ok(server) => server,
            Err(reason) => {
                tracing::warn!(%volume, %primary, %reason, "not serving a replica");
                let refused = line(&ReplicaReply::Refused { reason });
                let _ = async {
                    tls.write_all(&refused).await?;
                    tls.shutdown().await
                }
                .await;
                return;
            }
        };
        // The answer goes before the server's first byte (its greeting),
        // which waits for the primary's go-ahead.
        let ready = async {
            tls.write_all(&line(&ReplicaReply::Streaming)).await?;
            tls.flush().await?;
            match tls.read_u8().await? {
                STREAM_READY => Ok(()),
                other => Err(std::io::Error::other(format!(
                    "{other:#x} for the go-ahead"
                ))),
            }
        };
        match tokio::time::timeout(HANDSHAKE_TIMEOUT, ready).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                tracing::warn!(%volume, %primary, error = %e, "the primary went away before the replica's stream");
                return;
            }
            Err(_) => {
                tracing::warn!(%volume, %primary, "no go-ahead from the primary for the replica's stream");
                return;
            }
        }
        tracing::info!(%volume, %primary, "the replica's stream starts on the primary's connection");
        // The splice seals and opens records itself, on threads of its own:
        // no lock shared between the directions, no task to schedule.
        let (tcp, conn) = tls.into_inner();
        let keys = match crate::tls::record_keys(conn.dangerous_extract_secrets()) {
            Ok(keys) => keys,
            Err(e) => {
                tracing::warn!(%volume, %primary, error = %e, "cannot start the replica's stream");
                return;
            }
        };
        let streams = super::peers::into_blocking(tcp).and_then(|tcp| {
            let server = server.into_std()?;
            server.set_nonblocking(false)?;
            Ok((tcp, server))
        });
        let end = match streams {
            Ok((tcp, server)) => {
                tokio::task::spawn_blocking(move || splice::splice(tcp, &keys, server))
                    .await
                    .unwrap_or_else(|e| splice::SpliceEnd::Failed(e.to_string()))
            }
            Err(e) => splice::SpliceEnd::Failed(e.to_string()),
        };
        tracing::info!(%volume, %primary, ?end, "the replica's stream ended");
    }

    /// The replica's side of a replication's TLS on the proven connection
    /// `stream`: the primary shows a certificate of this cluster's CA for
    /// the node it proved to be (`primary`).
    async fn accept_replication(
        &self,
        stream: TcpStream,
        primary: &str,
    ) -> Result<tokio_rustls::server::TlsStream<TcpStream>, String> {
        let config = crate::tls::replication_server(&self.tls_dir())?;
        let tls = tokio::time::timeout(
            HANDSHAKE_TIMEOUT,
            tokio_rustls::TlsAcceptor::from(config).accept(stream),
        )
        .await
        .map_err(|_| format!("no TLS handshake within {HANDSHAKE_TIMEOUT:?}"))?
        .map_err(|e| format!("TLS failed (a certificate of another cluster, or none?): {e}"))?;
        let shown = tls
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|certs| certs.first())
            .and_then(vroom_client::tls::common_name);
        if shown.as_deref() != Some(primary) {
            return Err(format!(
                "node {primary} showed the certificate of {}",
                shown.as_deref().unwrap_or("nobody")
            ));
        }
        Ok(tls)
    }

    /// The record of `volume`, when this node keeps its replica for node
    /// `primary`.
    pub(super) async fn replica_record(
        &self,
        volume: &str,
        primary: &str,
    ) -> Result<VolumeRecord, String> {
        let kv = self
            .store
            .get(&key(VOLUMES, volume))
            .await
            .map_err(|e| e.to_string())?
            .ok_or_else(|| format!("volume {volume} is not in the cluster"))?;
        let record: VolumeRecord = kv.decode().map_err(|e| e.to_string())?;
        if record.primary != primary || record.replica != self.name {
            return Err(format!(
                "volume {volume}'s copies are on {} (primary) and {} (replica), not {primary} and {}",
                record.primary, record.replica, self.name
            ));
        }
        Ok(record)
    }

    /// Serves this node's copy of `volume` (made first if it has none)
    /// and returns a connection to its server.
    async fn check_and_serve(
        &self,
        volume: &str,
        primary: &str,
        empty: bool,
    ) -> Result<UnixStream, String> {
        let record = self.replica_record(volume, primary).await?;
        // A pass whose view is older than the record that named this node
        // must not take the copy for one of a replica that moved away.
        self.served_lately
            .lock_unpoisoned()
            .insert(volume.to_string(), Instant::now());
        if record.state == ReplicaState::UpToDate {
            return Err(format!(
                "volume {volume}'s replica here is up to date; it is not served for a new copy"
            ));
        }
        if !empty && self.engine.volume(volume).is_err() {
            return Err(format!("this node has no copy of {volume} to resume"));
        }
        if self.engine.volume(volume).is_err() {
            let req = VolumeCreateRequest {
                name: Name::new(volume).map_err(|e| e.to_string())?,
                size_mib: record.size_mib,
                fs: record.fs,
                replicas: 2,
                node: None,
                replica_node: None,
            };
            self.engine
                .create_volume_copy(&req)
                .await
                .map_err(|e| e.message)?;
        }
        let socket = self
            .engine
            .serve_replica(volume, empty)
            .await
            .map_err(|e| e.message)?;
        tokio::time::timeout(Duration::from_secs(5), UnixStream::connect(&socket))
            .await
            .map_err(|_| "the replica's server did not accept within 5 s".to_string())?
            .map_err(|e| format!("cannot connect to the replica's server: {e}"))
    }
}

/// A replica's stream on the primary's side: the TCP connection, carrying
/// TLS records, and the keys to seal and open them.
#[derive(Debug)]
pub(super) struct ReplicaConnection {
    pub(super) stream: TcpStream,
    pub(super) keys: relay::sealed::RecordKeys,
}

/// The byte the primary sends, in TLS, once it has read the replica's
/// answer: the replica's stream may start.
const STREAM_READY: u8 = b'\n';

/// The answer to [`Hello::Replica`], the first line inside TLS.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub(super) enum ReplicaReply {
    /// The copy's NBD stream follows on this connection.
    Streaming,
    Refused {
        reason: String,
    },
    /// What a vroom from before [`Self::Streaming`] answered: its server's
    /// open TCP port. Only read, to tell the user to upgrade that node.
    Serving {
        addr: SocketAddr,
    },
}

/// What [`ClusterNode::watch_replication`] watches.
struct Watch<'a> {
    instance: &'a str,
    volume: &'a str,
    token: i64,
    /// The replica's node.
    replica: &'a str,
    /// The relay's control socket.
    control: &'a Path,
    /// It sends only what the replica missed.
    resume: bool,
    started_at: Instant,
    /// The record says the replica is up to date already.
    up_to_date: bool,
}

/// Which replication a relay carries (`relays/VOLUME.json`, beside its
/// socket), so that a restarted vroomd can take it over. Written by the
/// vroomd that started it; version 1, unversioned JSON: a field added
/// later must default.
#[derive(Debug, Serialize, Deserialize)]
struct RelayMark {
    instance: String,
    replica: String,
}

fn mark_path(control: &Path) -> PathBuf {
    control.with_extension("json")
}

/// The status of the relay answering at `control`.
fn relay_status(control: &Path) -> Result<relay::RelayStatus, String> {
    relay::RelayClient::connect(control)
        .and_then(|mut c| c.status())
        .map_err(|e| e.to_string())
}

/// Releases the relay answering at `control`, if one does: it closes QEMU's
/// end (QEMU fails what it held) and exits.
fn release_relay(control: &Path) {
    if let Ok(mut client) = relay::RelayClient::connect(control) {
        if let Err(e) = client.release() {
            tracing::warn!(control = %control.display(), error = %e, "cannot release a relay");
        }
    }
}
