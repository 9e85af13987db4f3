//! The controller's pass over one service: what it finds is brought one
//! step nearer to what the record asks, and every step is written to the
//! record before (a member named, a member leaving) and after (a member
//! gone) it is taken.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use vroom_base::LockExt;
use vroom_types::{
    balancer_name, member_name, ErrorCode, ExecEvent, ExecRequest, InstanceState, MemberRecord,
    Name, ScaleDecision, ScaleTarget, ServiceDefinition, ServiceRecord, KEPT_DECISIONS,
};

use super::scaler::{Counters, Policy, Reading};
use super::{configured_backends, member_request, Engine, BALANCER_IMAGE};
use crate::engine::scrape::cpu_seconds;
use crate::events::NewEvent;
use crate::OpError;

/// How often the controller looks at every service.
const PASS: Duration = Duration::from_secs(1);

/// How many members one pass starts at once (the next pass starts more).
const MAX_STARTING: usize = 4;

/// The highest member number (names stay within 32 characters).
const MAX_MEMBER_NUMBER: u32 = 9_999_999;

/// How long a member that left the balancer keeps running at most while
/// the balancer's old workers finish the requests they carry to it (each
/// closes its client connections after their next response, and exits
/// once it has none; the lb recipe's `hard-stop-after` is 30 s).
const DRAIN: Duration = Duration::from_secs(30);

/// How long a drain goes on while the balancer cannot be asked.
const BLIND_DRAIN: Duration = Duration::from_secs(2);

/// The balancer's statistics as CSV, from its running worker: the
/// servers it has now.
const STATS: &[&str] = &[
    "/bin/busybox",
    "wget",
    "-q",
    "-O",
    "-",
    "http://127.0.0.1:8404/stats;csv",
];

/// How long a running member may fail its health check before it is
/// replaced (it leaves the balancer at once).
const UNHEALTHY_FOR: Duration = Duration::from_secs(3);

/// How long a new member of a rolling update has to be ready; one that
/// is not rolls the update back.
const UPDATE_READY_SECS: u64 = 30;

/// How long a pass waits for an instance it made to start (or fail).
const SETTLE_WITHIN: Duration = Duration::from_secs(300);

/// The balancer's counters, from inside it (its stats port is not
/// reachable from the host on every network). The exec's own timeout
/// bounds it: Debian's static busybox wget crashes with `-T`.
const COUNTERS: &[&str] = &[
    "/bin/busybox",
    "wget",
    "-q",
    "-O",
    "-",
    "http://127.0.0.1:8404/vroom",
];

impl Engine {
    /// Starts a pass over `name` now, beside the controller's: a change
    /// returns once recorded, and the service converges behind it (`service
    /// inspect` shows how far; the CLI waits for it).
    pub(super) fn kick_service(self: &Arc<Self>, name: &str) {
        if !self.service_kicks.load(std::sync::atomic::Ordering::SeqCst) {
            return;
        }
        let engine = self.clone();
        let name = name.to_string();
        tokio::spawn(async move {
            if let Err(e) = engine.converge_service(&name).await {
                tracing::warn!(service = %name, error = %e, "service pass failed");
            }
        });
    }

    /// Runs every service's pass each second, for as long as the engine
    /// lives: failed members are replaced, the autoscaler decides, and
    /// interrupted changes finish.
    pub fn spawn_service_controller(self: &Arc<Self>) {
        let engine = Arc::downgrade(self);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(PASS).await;
                let Some(engine) = engine.upgrade() else {
                    return;
                };
                let names: Vec<String> = match engine.service_records().await {
                    Ok(records) => records
                        .into_iter()
                        .map(|r| r.spec.name.to_string())
                        .collect(),
                    Err(_) => continue,
                };
                // Each service in its own task: one whose members take long
                // to start does not hold up the others.
                for name in names {
                    // A service whose pass is still running (members
                    // starting, a drain) is looked at by that pass.
                    let Ok(pass) = engine.service_pass_lock(&name).try_lock_owned() else {
                        continue;
                    };
                    let engine = engine.clone();
                    tokio::spawn(async move {
                        let _pass = pass;
                        if let Err(e) = engine.pass(&name).await {
                            tracing::warn!(service = %name, error = %e, "service pass failed");
                        }
                    });
                }
            }
        });
    }

    pub(super) fn service_pass_lock(&self, name: &str) -> Arc<tokio::sync::Mutex<()>> {
        self.service_passes
            .lock_unpoisoned()
            .entry(name.to_string())
            .or_default()
            .clone()
    }

    /// One pass over `name`: finishes a removal; or replaces failed
    /// members, lets the autoscaler decide, takes the next step of an
    /// update, adds or removes members to match the number asked, and sets
    /// the balancer's backends to the members that are up.
    pub async fn converge_service(self: &Arc<Self>, name: &str) -> Result<(), OpError> {
        let lock = self.service_pass_lock(name);
        let _pass = lock.lock().await;
        self.pass(name).await
    }

    async fn pass(self: &Arc<Self>, name: &str) -> Result<(), OpError> {
        let record = match self.service_record(name).await {
            Ok(record) => record,
            // Removed meanwhile.
            Err(e) if e.code == ErrorCode::NotFound => {
                self.service_scalers.lock_unpoisoned().remove(name);
                return Ok(());
            }
            Err(e) => return Err(e),
        };
        let balancer = balancer_name(&record.spec.name);
        if let Some(cluster) = self.services_cluster() {
            // In a cluster, the node that runs the balancer keeps the
            // service (the leader while there is none).
            if !cluster.keeps_service(balancer.as_str()) {
                return Ok(());
            }
        }
        if record.removing {
            return self.finish_service_removal(record).await;
        }
        let network = self.service_network(&record.spec)?;
        let found = self.service_instance(balancer.as_str()).await;
        if let Some(failed) = found
            .as_ref()
            .ok()
            .filter(|b| b.status.state == InstanceState::Failed)
        {
            // Its restart policy gave up on it: a new one (the service's
            // address may change).
            let why = failed
                .status
                .last_error
                .clone()
                .unwrap_or_else(|| "it failed".into());
            self.remove_gone_or(&balancer).await?;
            self.emit(
                NewEvent::new(vroom_types::EventKind::Service, "replacing", name)
                    .detail("member", balancer.to_string())
                    .message(format!("balancer {balancer} failed: {why}")),
            );
        }
        if self.service_instance(balancer.as_str()).await.is_err() {
            let mut req = self.placed(
                member_request(&network, &balancer, BALANCER_IMAGE),
                &record.spec.name,
                true,
            );
            match self.run_service_instance(req.clone()).await {
                // This node cannot take it (cordoned): another node can,
                // and keeps the service from then on.
                Err(e) if e.code == ErrorCode::Conflict && req.placement.node.is_some() => {
                    req.placement.node = None;
                    self.run_service_instance(req).await?;
                }
                other => drop(other?),
            }
        }
        self.settled(&balancer).await?;
        if let Some(cluster) = self.services_cluster() {
            // The balancer's node keeps the service; its passes go on.
            if !cluster.keeps_service(balancer.as_str()) {
                return Ok(());
            }
        }
        self.check_update(name).await?;
        self.replace_failed(name).await?;
        self.autoscale(name).await?;
        let record = self.service_record(name).await?;
        if record.update.is_some() {
            self.step_update(name).await?;
        } else {
            self.size_members(name).await?;
        }
        self.warm_members_image(&self.service_record(name).await?.spec)
            .await;
        self.make_missing(name, &network).await
    }

    /// Has the members' image warmed once, in the background, if it has no
    /// warm snapshot: members started after that (replacements, scale-outs)
    /// are warm starts. Once per image and daemon: a warming that fails is
    /// not tried again (the members boot).
    async fn warm_members_image(self: &Arc<Self>, spec: &ServiceDefinition) {
        // In a cluster the members start on other nodes, which warm
        // their own images.
        if !spec.warm || self.services_cluster().is_some() {
            return;
        }
        let Ok(id) = self.resolve_image_id(&spec.image).await else {
            return;
        };
        if !self.service_warming.lock_unpoisoned().insert(id.clone()) {
            return;
        }
        let warm = self
            .list_snapshots()
            .into_iter()
            .any(|s| s.kind == vroom_types::SnapshotKind::Warm && s.instance.image_id == id);
        if warm {
            return;
        }
        let engine = self.clone();
        let image = spec.image.clone();
        tokio::spawn(async move {
            if let Err(e) = engine.warm_image(&id, None).await {
                tracing::warn!(image, error = %e, "cannot warm a service's image; its members boot");
            }
        });
    }

    /// Members, then the balancer, then the record go.
    async fn finish_service_removal(
        self: &Arc<Self>,
        record: ServiceRecord,
    ) -> Result<(), OpError> {
        let name = record.spec.name.to_string();
        for member in &record.members {
            self.remove_gone_or(&member.name).await?;
            self.edit_service(&name, |r| r.members.retain(|m| m.name != member.name))
                .await?;
        }
        self.remove_gone_or(&balancer_name(&record.spec.name))
            .await?;
        self.delete_service_record(&name).await?;
        self.service_scalers.lock_unpoisoned().remove(&name);
        self.service_passes.lock_unpoisoned().remove(&name);
        self.emit(NewEvent::new(
            vroom_types::EventKind::Service,
            "removed",
            &name,
        ));
        Ok(())
    }

    /// Takes `member` out: marked leaving in the record, out of the
    /// balancer, drained, removed, then out of the record. A pass after a
    /// crash finds it marked and finishes.
    async fn drain_member(self: &Arc<Self>, service: &str, member: &Name) -> Result<(), OpError> {
        self.drain_members(service, std::slice::from_ref(member))
            .await
    }

    /// Takes several members out at once: one reload of the balancer, one
    /// drain, their removals side by side.
    async fn drain_members(
        self: &Arc<Self>,
        service: &str,
        members: &[Name],
    ) -> Result<(), OpError> {
        let record = self
            .edit_service(service, |r| {
                for m in r.members.iter_mut().filter(|m| members.contains(&m.name)) {
                    m.leaving = true;
                }
            })
            .await?;
        let instances = self.service_instances().await;
        let servers: Vec<String> = members
            .iter()
            .filter_map(|m| instances.get(m.as_str()))
            .filter_map(|i| i.nics.first().and_then(|n| n.ip))
            .map(|ip| format!("{ip}:{}", record.spec.port))
            .collect();
        // Even when the backends were set already (by a pass cut short, or
        // one whose reload outlasted the agent's answer): the balancer's
        // running worker is what counts.
        self.set_backends(&record).await?;
        if !servers.is_empty() {
            self.drained(&record.spec, &servers).await;
        }
        let mut removing = tokio::task::JoinSet::new();
        for member in members {
            let engine = self.clone();
            let member = member.clone();
            removing.spawn(async move { engine.remove_gone_or(&member).await });
        }
        let mut first_error = None;
        while let Some(done) = removing.join_next().await {
            if let Err(e) = done.map_err(|e| OpError::internal("a member's removal failed", e))? {
                first_error.get_or_insert(e);
            }
        }
        if let Some(e) = first_error {
            // The members stay marked: the next pass removes them.
            return Err(e);
        }
        self.edit_service(service, |r| {
            r.members.retain(|m| !members.contains(&m.name))
        })
        .await?;
        for member in members {
            self.unhealthy_since(service, member, None);
        }
        Ok(())
    }

    /// Members whose instance failed, or has failed its health check for a
    /// while, leave and are replaced (a new name: numbers are never reused).
    async fn replace_failed(self: &Arc<Self>, name: &str) -> Result<(), OpError> {
        let record = self.service_record(name).await?;
        let instances = self.service_instances().await;
        let now = Instant::now();
        // Removals a daemon left half done.
        let leaving: Vec<Name> = record
            .members
            .iter()
            .filter(|m| m.leaving)
            .map(|m| m.name.clone())
            .collect();
        if !leaving.is_empty() {
            self.drain_members(name, &leaving).await?;
        }
        let healthy = |m: &MemberRecord| {
            instances.get(m.name.as_str()).is_some_and(|i| {
                i.status.state == InstanceState::Running
                    && i.health.as_ref().is_none_or(|h| h.ready)
            })
        };
        let mut healthy_count = record
            .members
            .iter()
            .filter(|m| !m.leaving && healthy(m))
            .count();
        for member in record.members.iter().filter(|m| !m.leaving) {
            let Some(instance) = instances.get(member.name.as_str()) else {
                continue;
            };
            let unhealthy = instance.status.state == InstanceState::Running
                && instance.health.as_ref().is_some_and(|h| !h.ready);
            // A host so loaded that every member's check fails must not
            // replace them all: only while another member is healthy, and
            // one per pass (the balancer's own check keeps requests off a
            // member that does not answer, at once).
            let since = self.unhealthy_since(name, &member.name, unhealthy.then_some(now));
            let why = if instance.status.state == InstanceState::Failed {
                Some(
                    instance
                        .status
                        .last_error
                        .clone()
                        .unwrap_or_else(|| "it failed".into()),
                )
            } else if since.is_some_and(|s| now.duration_since(s) >= UNHEALTHY_FOR)
                && healthy_count > 0
            {
                // Counted as not healthy already; no other this pass.
                healthy_count = 0;
                Some(format!(
                    "it failed its health check for {}s",
                    UNHEALTHY_FOR.as_secs()
                ))
            } else {
                None
            };
            if let Some(why) = why {
                self.drain_member(name, &member.name).await?;
                self.emit(
                    NewEvent::new(vroom_types::EventKind::Service, "replacing", name)
                        .detail("member", member.name.to_string())
                        .message(format!("member {} failed: {why}", member.name)),
                );
            }
        }
        Ok(())
    }

    /// Notes (Some) or clears (None) when `member` began failing its
    /// health check; returns when it began, if it is failing.
    fn unhealthy_since(
        &self,
        service: &str,
        member: &Name,
        now: Option<Instant>,
    ) -> Option<Instant> {
        let mut scalers = self.service_scalers.lock_unpoisoned();
        let scaler = scalers.entry(service.to_string()).or_default();
        match now {
            Some(now) => Some(*scaler.unhealthy.entry(member.to_string()).or_insert(now)),
            None => {
                scaler.unhealthy.remove(member.as_str());
                None
            }
        }
    }

    /// Reads the balancer and the members, and lets the autoscaler decide.
    async fn autoscale(self: &Arc<Self>, name: &str) -> Result<(), OpError> {
        let record = self.service_record(name).await?;
        let Some(target) = record.spec.scale_on else {
            return Ok(());
        };
        let counters = self.balancer_counters(&record.spec).await;
        let was_read = {
            let mut scalers = self.service_scalers.lock_unpoisoned();
            let scaler = scalers.entry(name.to_string()).or_default();
            std::mem::replace(&mut scaler.counters_read, counters.is_ok())
        };
        let counters = match counters {
            Ok(c) => Some(c),
            Err(e) => {
                // Once when it starts failing, not every second.
                if was_read {
                    tracing::warn!(service = name, error = %e, "cannot read the balancer's counters");
                }
                None
            }
        };
        let instances = self.service_instances().await;
        let cpu: BTreeMap<String, f64> = record
            .members
            .iter()
            .filter(|m| !m.leaving)
            .filter_map(|m| instances.get(m.name.as_str()))
            .filter(|i| i.status.state == InstanceState::Running)
            .filter_map(|i| {
                Some((
                    i.spec.name.to_string(),
                    cpu_seconds(i.status.pid?)? / f64::from(i.spec.cpus.max(1)),
                ))
            })
            .collect();
        let now = Instant::now();
        let (min, max) = record.spec.bounds();
        let desired = record.desired();
        let backends =
            configured_backends(instances.get(balancer_name(&record.spec.name).as_str()));
        let ready = record
            .members
            .iter()
            .filter(|m| !m.leaving)
            .filter_map(|m| instances.get(m.name.as_str()))
            .filter(|i| i.status.state == InstanceState::Running)
            .filter(|i| {
                i.nics
                    .first()
                    .and_then(|n| n.ip)
                    .is_some_and(|ip| backends.contains(&ip))
            })
            .count() as u32;
        let decision = {
            let mut scalers = self.service_scalers.lock_unpoisoned();
            let scaler = scalers.entry(name.to_string()).or_default();
            scaler.observe(Reading {
                at: now,
                counters,
                cpu,
            });
            if record.update.is_some() {
                // An update moves members itself: decide after it.
                None
            } else {
                scaler.decide(now, Policy { target, min, max }, desired, ready)
            }
        };
        let Some(decision) = decision else {
            return Ok(());
        };
        let at_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        self.edit_service(name, |r| {
            r.desired = Some(decision.to);
            r.decisions.push(ScaleDecision {
                at_ms,
                from: desired,
                to: decision.to,
                reason: decision.reason.clone(),
                load: decision.load.clone(),
            });
            let extra = r.decisions.len().saturating_sub(KEPT_DECISIONS);
            r.decisions.drain(..extra);
        })
        .await?;
        let action = if decision.to > desired {
            "scaled_out"
        } else {
            "scaled_in"
        };
        self.emit(
            NewEvent::new(vroom_types::EventKind::Service, action, name)
                .detail("from", desired)
                .detail("to", decision.to)
                .detail("reason", decision.reason.clone())
                .detail(
                    "load",
                    serde_json::to_value(&decision.load).unwrap_or_default(),
                )
                .message(format!(
                    "{desired} -> {} members: {} ({})",
                    decision.to, decision.reason, decision.load
                )),
        );
        Ok(())
    }

    /// Returns once the balancer's running worker no longer has `servers`
    /// (its reload is done) and its old workers (those that had them) have
    /// exited: what they carried is done. Bounded by [`DRAIN`].
    async fn drained(&self, spec: &ServiceDefinition, servers: &[String]) {
        let balancer = balancer_name(&spec.name);
        let deadline = Instant::now() + DRAIN;
        let mut failing_since = None;
        loop {
            let stats = self.guest_output(balancer.as_str(), STATS).await;
            // The master and one worker.
            let workers = self
                .guest_output(balancer.as_str(), &["/bin/busybox", "pidof", "haproxy"])
                .await;
            match (stats, workers) {
                (Ok(stats), Ok(pids)) => {
                    failing_since = None;
                    let listed = pool_servers(&stats);
                    let still: Vec<&String> =
                        servers.iter().filter(|s| listed.contains(s)).collect();
                    if still.is_empty() && pids.split_whitespace().count() <= 2 {
                        return;
                    }
                    if Instant::now() >= deadline {
                        tracing::warn!(service = %spec.name, ?still, pids, "the balancer did not drain in time");
                        return;
                    }
                }
                (Err(e), _) | (_, Err(e)) => {
                    // A balancer that cannot be asked (not running, no
                    // agent) is not waited for long.
                    let since = *failing_since.get_or_insert_with(Instant::now);
                    if Instant::now() >= deadline || since.elapsed() >= BLIND_DRAIN {
                        tracing::warn!(service = %spec.name, error = %e, "cannot see whether the balancer drained");
                        return;
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// The balancer's request counters, read inside it.
    async fn balancer_counters(&self, spec: &ServiceDefinition) -> Result<Counters, OpError> {
        let balancer = balancer_name(&spec.name);
        let out = self.guest_output(balancer.as_str(), COUNTERS).await?;
        Counters::parse(&out).map_err(|e| OpError::new(ErrorCode::GuestError, e))
    }

    /// What a short command prints in guest `name`; an error if it fails.
    async fn guest_output(&self, name: &str, argv: &[&str]) -> Result<String, OpError> {
        let mut exec = self
            .exec(
                name,
                ExecRequest {
                    argv: argv.iter().map(|s| s.to_string()).collect(),
                    timeout_secs: Some(3),
                    stdin: false,
                },
            )
            .await?;
        let mut out = Vec::new();
        while let Some(event) = exec.next().await {
            match event {
                ExecEvent::Stdout { data } => out.extend_from_slice(&data),
                ExecEvent::Stderr { .. } => {}
                ExecEvent::Exit(exit) if exit.exit_code == 0 => break,
                ExecEvent::Exit(exit) => {
                    return Err(OpError::new(
                        ErrorCode::GuestError,
                        format!("{} exited {}", argv.join(" "), exit.exit_code),
                    ))
                }
                ExecEvent::Error { error } => {
                    return Err(OpError::new(error.code, error.message));
                }
            }
        }
        Ok(String::from_utf8_lossy(&out).into_owned())
    }

    /// Rolls an update back when one of its new members failed (it never
    /// became ready, or failed since).
    async fn check_update(self: &Arc<Self>, name: &str) -> Result<(), OpError> {
        let record = self.service_record(name).await?;
        let Some(update) = &record.update else {
            return Ok(());
        };
        if update.rolling_back.is_some() {
            return Ok(());
        }
        let instances = self.service_instances().await;
        let failed = record
            .members
            .iter()
            .filter(|m| m.image == update.to && !m.leaving)
            .find_map(|m| {
                let i = instances.get(m.name.as_str())?;
                (i.status.state == InstanceState::Failed).then(|| {
                    format!(
                        "new member {} failed: {}",
                        m.name,
                        i.status.last_error.as_deref().unwrap_or("it failed")
                    )
                })
            });
        if let Some(reason) = failed {
            self.roll_back(name, reason).await?;
        }
        Ok(())
    }

    async fn roll_back(self: &Arc<Self>, name: &str, reason: String) -> Result<(), OpError> {
        let record = self
            .edit_service(name, |r| {
                if let Some(u) = &mut r.update {
                    if u.rolling_back.is_none() {
                        u.rolling_back = Some(reason.clone());
                        r.spec.image = u.from.clone();
                    }
                }
            })
            .await?;
        if let Some(u) = &record.update {
            self.emit(
                NewEvent::new(vroom_types::EventKind::Service, "rolling_back", name)
                    .detail("from", u.to.clone())
                    .detail("to", u.from.clone())
                    .detail("reason", reason.clone())
                    .message(format!("rolling back to {}: {reason}", u.from)),
            );
        }
        Ok(())
    }

    /// One step of a rolling update: a new member up and balanced lets an
    /// old one drain and go; then the next new member is named. Rolling
    /// back, the new members go; the service then grows back on the old
    /// image.
    async fn step_update(self: &Arc<Self>, name: &str) -> Result<(), OpError> {
        let record = self.service_record(name).await?;
        let Some(update) = record.update.clone() else {
            return Ok(());
        };
        let live: Vec<&MemberRecord> = record.members.iter().filter(|m| !m.leaving).collect();
        if let Some(reason) = &update.rolling_back {
            let new: Vec<Name> = live
                .iter()
                .filter(|m| m.image == update.to)
                .map(|m| m.name.clone())
                .collect();
            self.drain_members(name, &new).await?;
            self.edit_service(name, |r| r.update = None).await?;
            self.emit(
                NewEvent::new(vroom_types::EventKind::Service, "rolled_back", name)
                    .detail("image", update.from.clone())
                    .detail("reason", reason.clone())
                    .message(format!("update to {} rolled back: {reason}", update.to)),
            );
            return self.size_members(name).await;
        }
        let old: Vec<Name> = live
            .iter()
            .filter(|m| m.image != update.to)
            .map(|m| m.name.clone())
            .collect();
        if old.is_empty() {
            self.edit_service(name, |r| r.update = None).await?;
            self.emit(
                NewEvent::new(vroom_types::EventKind::Service, "updated", name)
                    .detail("from", update.from.clone())
                    .detail("to", update.to.clone()),
            );
            return self.size_members(name).await;
        }
        let instances = self.service_instances().await;
        let backends =
            configured_backends(instances.get(balancer_name(&record.spec.name).as_str()));
        let new_up = live.iter().filter(|m| m.image == update.to).all(|m| {
            instances.get(m.name.as_str()).is_some_and(|i| {
                i.status.state == InstanceState::Running
                    && i.nics
                        .first()
                        .and_then(|n| n.ip)
                        .is_some_and(|ip| backends.contains(&ip))
            })
        });
        let desired = record.desired() as usize;
        if !new_up {
            // A new member is starting, or not yet balanced.
            return Ok(());
        }
        if live.len() > desired {
            // The new member serves: the oldest old one drains and goes.
            return self.drain_member(name, &old[0]).await;
        }
        self.name_member(name, &update.to).await.map(|_| ())
    }

    /// Adds or removes members until the record has the number asked: the
    /// newest leave first.
    async fn size_members(self: &Arc<Self>, name: &str) -> Result<(), OpError> {
        loop {
            let record = self.service_record(name).await?;
            let live: Vec<&MemberRecord> = record.members.iter().filter(|m| !m.leaving).collect();
            let desired = record.desired() as usize;
            if live.len() > desired {
                // The newest leave, together.
                let newest: Vec<Name> = live[desired..].iter().map(|m| m.name.clone()).collect();
                self.drain_members(name, &newest).await?;
            } else if live.len() < desired {
                self.name_member(name, &record.spec.image).await?;
            } else {
                return Ok(());
            }
        }
    }

    /// Records a new member of `image` (made by `make_missing`).
    async fn name_member(&self, name: &str, image: &str) -> Result<ServiceRecord, OpError> {
        let mut exhausted = false;
        let record = self
            .edit_service(name, |r| {
                if r.next > MAX_MEMBER_NUMBER {
                    exhausted = true;
                    return;
                }
                r.members.push(MemberRecord {
                    name: member_name(&r.spec.name, r.next),
                    image: image.to_string(),
                    leaving: false,
                });
                r.next += 1;
            })
            .await?;
        if exhausted {
            return Err(OpError::new(
                ErrorCode::ResourceExhausted,
                format!("service {name} has used every member number; create it again"),
            ));
        }
        Ok(record)
    }

    /// Makes recorded members that have no instance (a few at a time, side
    /// by side: a scale-out takes about one start), then sets the
    /// balancer's backends to the members that are up.
    async fn make_missing(self: &Arc<Self>, name: &str, network: &Name) -> Result<(), OpError> {
        let record = self.service_record(name).await?;
        let instances = self.service_instances().await;
        let missing: Vec<MemberRecord> = record
            .members
            .iter()
            .filter(|m| !m.leaving && !instances.contains_key(m.name.as_str()))
            .cloned()
            .collect();
        let updating_to = record.update.as_ref().map(|u| u.to.clone());
        let mut making = tokio::task::JoinSet::new();
        for member in missing.into_iter().take(MAX_STARTING) {
            let engine = self.clone();
            let mut req = self.placed(
                member_request(network, &member.name, &member.image),
                &record.spec.name,
                false,
            );
            req.cold = !record.spec.warm;
            if updating_to.as_deref() == Some(member.image.as_str()) {
                req.ready_timeout_secs = Some(UPDATE_READY_SECS);
            }
            making.spawn(async move {
                let made = match engine.run_service_instance(req).await {
                    Ok(_) => engine.settled(&member.name).await.map(|_| ()),
                    Err(e) => Err(e),
                };
                (member, made)
            });
        }
        let mut first_error = None;
        while let Some(done) = making.join_next().await {
            let (member, made) =
                done.map_err(|e| OpError::internal("a member's start failed", e))?;
            let Err(e) = made else { continue };
            tracing::warn!(service = name, member = %member.name, error = %e, "a member was not made");
            if updating_to.as_deref() == Some(member.image.as_str()) {
                // The new image does not start: back to the old one.
                self.roll_back(
                    name,
                    format!("new member {} was not made: {}", member.name, e.message),
                )
                .await?;
            }
            // A member that cannot be made leaves the record: the next
            // pass names another.
            let _ = self.remove_gone_or(&member.name).await;
            self.edit_service(name, |r| r.members.retain(|m| m.name != member.name))
                .await?;
            first_error.get_or_insert(e);
        }
        let record = self.service_record(name).await?;
        self.set_backends(&record).await?;
        match first_error {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// Sets the balancer's backends to the members that run and are not
    /// leaving (and its port and latency target; HAProxy's own health
    /// check takes a member that does not answer out within a second),
    /// if they differ; returns once the balancer uses them, and whether it
    /// changed anything.
    async fn set_backends(&self, record: &ServiceRecord) -> Result<bool, OpError> {
        let spec = &record.spec;
        let balancer = balancer_name(&spec.name);
        let instances = self.service_instances().await;
        let backends = record
            .members
            .iter()
            .filter(|m| !m.leaving)
            .filter_map(|m| instances.get(m.name.as_str()))
            .filter(|i| i.status.state == InstanceState::Running)
            .filter_map(|i| i.nics.first().and_then(|n| n.ip))
            .map(|ip| format!("{ip}:{}", spec.port))
            .collect::<Vec<_>>()
            .join(",");
        let slo_ms = match spec.scale_on {
            Some(ScaleTarget::P95Ms(ms)) => ms,
            _ => 0,
        };
        let want = [
            ("backends", backends),
            ("port", spec.port.to_string()),
            ("slo_ms", slo_ms.to_string()),
        ];
        let current = self.config_get(balancer.as_str()).await?;
        if want.iter().all(|(k, v)| current.get(*k) == Some(v)) {
            return Ok(false);
        }
        let set = want.into_iter().map(|(k, v)| (k.to_string(), v)).collect();
        self.config_update(balancer.as_str(), set).await?;
        Ok(true)
    }

    /// Waits while instance `name` starts (or stops): its state once it
    /// is running, stopped or failed. Bounded by its own ready timeout,
    /// after which the engine fails it.
    async fn settled(&self, name: &Name) -> Result<vroom_types::Instance, OpError> {
        let started = Instant::now();
        loop {
            let instance = self.service_instance(name.as_str()).await?;
            if matches!(
                instance.status.state,
                InstanceState::Running | InstanceState::Stopped | InstanceState::Failed
            ) {
                return Ok(instance);
            }
            // A cluster instance that no node takes (none has room) fails
            // no ready timeout: the pass gives up on it and tries again.
            if started.elapsed() > SETTLE_WITHIN {
                return Err(OpError::new(
                    ErrorCode::Timeout,
                    format!("{name} did not start within {} s", SETTLE_WITHIN.as_secs()),
                ));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Removes instance `name` (stopping it), or nothing if it is gone.
    async fn remove_gone_or(self: &Arc<Self>, name: &Name) -> Result<(), OpError> {
        match self.remove_service_instance(name.as_str()).await {
            Err(e) if e.code == ErrorCode::NotFound => Ok(()),
            other => other,
        }
    }
}

/// The servers of the balancer's `pool` backend in its statistics CSV
/// (`pxname,svname,...`; servers are named `IP:PORT`).
fn pool_servers(csv: &str) -> Vec<String> {
    csv.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let mut fields = l.split(',');
            let (proxy, server) = (fields.next()?, fields.next()?);
            (proxy == "pool" && server != "BACKEND" && server != "FRONTEND")
                .then(|| server.to_string())
        })
        .collect()
}

#[cfg(test)]
mod tests {
    #[test]
    fn pool_servers_come_from_the_stats_csv() {
        let csv = "# pxname,svname,qcur\nserve,FRONTEND,,\npool,10.0.0.3:80,0\npool,10.0.0.4:80,0\npool,BACKEND,0\nstats,FRONTEND,,\n";
        assert_eq!(super::pool_servers(csv), ["10.0.0.3:80", "10.0.0.4:80"]);
    }
}
