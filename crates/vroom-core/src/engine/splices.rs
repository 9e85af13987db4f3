//! Splices and mirrors: an appliance put inline in front of a running VM's
//! NIC by moving taps between bridges (nothing restarted), and copies of a
//! NIC's traffic sent to a capture appliance with tc.
//!
//! Every splice is a record with a state; where each tap belongs follows
//! from the records alone ([`crate::wiring`]), so every step is "change the
//! record, then rewire", and a daemon killed anywhere recovers by finishing
//! or undoing the step its record names.

use std::collections::BTreeSet;

use vroom_base::LockExt;
use vroom_types::{
    FailMode, Mirror, MirrorRequest, Splice, SpliceRequest, SpliceState, INSIDE_ROLE, OUTSIDE_ROLE,
};

use super::*;
use crate::net::MirrorTarget;

/// How often the watchdog looks at spliced appliances.
const WATCH_EVERY: Duration = Duration::from_millis(250);
/// How long an appliance's agent has to answer a health check.
const WATCH_HEALTH_TIMEOUT: Duration = Duration::from_millis(700);
/// Failed health checks in a row (of a live appliance) before it counts as down.
const WATCH_STRIKES: u32 = 2;

impl Engine {
    pub fn list_splices(&self) -> Vec<Splice> {
        self.splices.lock_unpoisoned().values().cloned().collect()
    }

    pub fn get_splice(&self, appliance: &str) -> Result<Splice, OpError> {
        self.splices
            .lock_unpoisoned()
            .values()
            .find(|s| s.appliance.as_str() == appliance)
            .cloned()
            .ok_or_else(|| {
                OpError::new(
                    ErrorCode::NotFound,
                    format!("{appliance} is not spliced in front of anything"),
                )
            })
    }

    pub fn list_mirrors(&self) -> Vec<Mirror> {
        self.mirrors.lock_unpoisoned().values().cloned().collect()
    }

    pub(super) fn save_splice(&self, splice: &Splice) -> Result<(), OpError> {
        blocking(|| self.store.put_splice(splice))
            .map_err(|e| OpError::internal("failed to save the splice", e))?;
        let before = self
            .splices
            .lock_unpoisoned()
            .insert(splice.appliance.clone(), splice.clone())
            .map(|s| s.state);
        if before != Some(splice.state) {
            let action = match (before, splice.state) {
                (Some(SpliceState::Bypassed | SpliceState::Cut), SpliceState::Active) => {
                    "restored".to_string()
                }
                (_, state) => state.to_string(),
            };
            let mut event = NewEvent::new(EventKind::Splice, action, splice.appliance.as_str())
                .detail("vm", splice.vm.to_string())
                .detail("nic", splice.nic);
            if let Some(last) = splice.events.last() {
                event = event.message(last.message.clone());
            }
            self.emit(event);
        }
        Ok(())
    }

    fn forget_splice(&self, appliance: &Name) -> Result<(), OpError> {
        blocking(|| self.store.delete_splice(appliance.as_str()))
            .map_err(|e| OpError::internal("failed to delete the splice", e))?;
        if self.splices.lock_unpoisoned().remove(appliance).is_some() {
            self.emit(NewEvent::new(
                EventKind::Splice,
                "removed",
                appliance.as_str(),
            ));
        }
        Ok(())
    }

    /// Changes a splice's record (in memory and in the store) and notes why.
    pub(super) fn update_splice(
        &self,
        appliance: &Name,
        state: SpliceState,
        event: &str,
    ) -> Result<Splice, OpError> {
        let mut splice = self.get_splice(appliance.as_str())?;
        splice.state = state;
        splice.record(now_ms(), event);
        self.save_splice(&splice)?;
        Ok(splice)
    }

    /// Puts an appliance inline in front of a running VM's NIC. Returns once
    /// traffic goes through it; any failure before that undoes everything.
    pub async fn splice(self: &Arc<Self>, req: SpliceRequest) -> Result<Splice, OpError> {
        req.validate()?;
        let _op = self.splice_op.lock().await;
        let vm = self.get(req.vm.as_str())?;
        self.may_change(vm.spec.name.as_str())?;
        if vm.status.state != InstanceState::Running {
            return Err(OpError::conflict(format!(
                "cannot splice in front of {}: it is {}, not running",
                vm.spec.name, vm.status.state
            )));
        }
        let nic = resolve_nic(&vm, req.nic.as_deref())?;
        let vm_nic = &vm.nics[nic];
        if is_l2_role(vm_nic.role.as_deref()) {
            return Err(OpError::new(
                ErrorCode::Conflict,
                format!(
                    "cannot splice in front of {}:{}: it is an L2 port, not a VM's NIC",
                    vm.spec.name,
                    vm_nic.role.as_deref().unwrap_or_default()
                ),
            ));
        }
        let network = vm_nic.network.clone();
        // An instance of that name first, then an image.
        let existing = self.get(&req.appliance).ok();
        let (appliance, owned, roles) = match existing {
            Some(instance) => {
                if instance.spec.name == vm.spec.name {
                    return Err(OpError::new(
                        ErrorCode::Conflict,
                        format!("cannot splice {} in front of itself", vm.spec.name),
                    ));
                }
                if req.name.is_some() {
                    return Err(OpError::new(
                        ErrorCode::Conflict,
                        format!(
                            "{} is an existing instance: a name only applies when splicing an image",
                            instance.spec.name
                        ),
                    ));
                }
                if self
                    .list_splices()
                    .iter()
                    .any(|s| s.appliance == instance.spec.name)
                {
                    let s = self.get_splice(instance.spec.name.as_str())?;
                    return Err(OpError::conflict(format!(
                        "{} is already spliced in front of {}:{}",
                        s.appliance, s.vm, s.nic
                    )));
                }
                if instance.status.state != InstanceState::Stopped {
                    return Err(OpError::conflict(format!(
                        "cannot splice {}: it is {}; an existing appliance must be stopped (the splice starts it)",
                        instance.spec.name, instance.status.state
                    )));
                }
                for role in [OUTSIDE_ROLE, INSIDE_ROLE] {
                    match instance
                        .nics
                        .iter()
                        .find(|n| n.role.as_deref() == Some(role))
                    {
                        None => {
                            return Err(OpError::new(
                                ErrorCode::Conflict,
                                format!(
                                    "cannot splice {}: it has no {role} NIC (a bump in the wire needs outside and inside)",
                                    instance.spec.name
                                ),
                            ))
                        }
                        Some(n) if n.network != network => {
                            return Err(OpError::new(
                                ErrorCode::Conflict,
                                format!(
                                    "cannot splice {}: its {role} NIC is on network {}, but {}'s NIC is on {network}",
                                    instance.spec.name, n.network, vm.spec.name
                                ),
                            ))
                        }
                        Some(_) => {}
                    }
                }
                let roles: Vec<String> = instance
                    .nics
                    .iter()
                    .filter_map(|n| n.role.clone())
                    .collect();
                (instance.spec.name, false, roles)
            }
            None => {
                let image = self.resolve_image(&req.appliance).await.map_err(|e| {
                    if e.code == ErrorCode::NotFound {
                        OpError::new(
                            ErrorCode::NotFound,
                            format!("no instance or image named {:?}", req.appliance),
                        )
                    } else {
                        e
                    }
                })?;
                let roles = image.manifest.appliance.nic_roles.clone();
                if ![OUTSIDE_ROLE, INSIDE_ROLE]
                    .iter()
                    .all(|r| roles.iter().any(|have| have == r))
                {
                    return Err(OpError::new(
                        ErrorCode::Conflict,
                        format!(
                            "image {} has no outside and inside NICs, so it cannot be spliced (l2-firewall and sniffer can)",
                            image.manifest.name
                        ),
                    ));
                }
                let name = match &req.name {
                    Some(name) => name.clone(),
                    None => Name::new(&format!("{}-{}", vm.spec.name, image.manifest.name))
                        .map_err(|e| {
                            OpError::new(
                                ErrorCode::Conflict,
                                format!("cannot name the appliance after {} and {}: {e}; give it a name", vm.spec.name, image.manifest.name),
                            )
                        })?,
                };
                if self.get(name.as_str()).is_ok() {
                    return Err(OpError::new(
                        ErrorCode::AlreadyExists,
                        format!("an instance named {:?} already exists; give the appliance another name", name.as_str()),
                    ));
                }
                (name, true, roles)
            }
        };
        let fail = req
            .fail
            .unwrap_or(if roles.iter().any(|r| r == MIRROR_ROLE) {
                FailMode::Open
            } else {
                FailMode::Closed
            });
        let seq = self.list_splices().iter().map(|s| s.seq).max().unwrap_or(0) + 1;
        let mut splice = Splice {
            appliance: appliance.clone(),
            vm: vm.spec.name.clone(),
            nic,
            network: network.clone(),
            segment: ipam::segment_name(
                &self.cfg.iface_prefix,
                &self.cfg.data_dir.display().to_string(),
                appliance.as_str(),
            ),
            fail,
            owned,
            seq,
            state: SpliceState::Starting,
            created_at: now_secs(),
            events: vec![],
        };
        splice.record(now_ms(), "splicing: the appliance is starting");
        self.save_splice(&splice)?;
        let ready_timeout = req
            .ready_timeout_secs
            .unwrap_or(DEFAULT_READY_TIMEOUT_SECS)
            .max(1);
        let started = async {
            self.net
                .create_segment(&splice.segment)
                .await
                .map_err(|e| OpError::internal("failed to create the splice's segment", e))?;
            if owned {
                let nic = |role: &str| NicSpec {
                    network: network.clone(),
                    ip: None,
                    role: Some(Name::new(role).expect("invariant: valid role")),
                };
                self.run(RunRequest {
                    spec: InstanceSpec {
                        name: appliance.clone(),
                        image: req.appliance.clone(),
                        mem_mib: None,
                        cpus: 1,
                        nics: vec![nic(OUTSIDE_ROLE), nic(INSIDE_ROLE)],
                        accel: vm.spec.accel,
                        config_volume_kib: None,
                        ephemeral: false,
                        volumes: Vec::new(),
                    },
                    ready_timeout_secs: Some(ready_timeout),
                    from_snapshot: None,
                    cold: false,
                    placement: Default::default(),
                    env: Default::default(),
                })
                .await?;
            } else {
                self.action(appliance.as_str(), InstanceAction::Start)
                    .await?;
            }
            self.wait_running(&appliance, Duration::from_secs(ready_timeout + 5))
                .await?;
            self.update_splice(&appliance, SpliceState::Active, "in the path")?;
            self.rewire().await;
            Ok::<(), OpError>(())
        }
        .await;
        if let Err(e) = started {
            tracing::warn!(appliance = %appliance, error = %e, "splice failed; undoing it");
            if let Err(undo) = self.take_out(&appliance).await {
                tracing::error!(appliance = %appliance, error = %undo, "failed to undo a splice");
            }
            return Err(e);
        }
        // Acknowledged only once the cluster has it: it moves with the VM.
        if let Err(e) = self.replicate_wiring(&splice.vm).await {
            tracing::warn!(appliance = %appliance, error = %e, "cannot record the splice in the cluster; undoing it");
            if let Err(undo) = self.take_out(&appliance).await {
                tracing::error!(appliance = %appliance, error = %undo, "failed to undo a splice");
            }
            return Err(e);
        }
        let splice = self.get_splice(appliance.as_str())?;
        tracing::info!(appliance = %appliance, vm = %splice.vm, nic, fail = %splice.fail, "spliced");
        Ok(splice)
    }

    /// Takes a spliced appliance out of the VM's path and removes it (or,
    /// when it existed before the splice, stops it).
    pub async fn unsplice(self: &Arc<Self>, appliance: &str) -> Result<(), OpError> {
        let _op = self.splice_op.lock().await;
        let splice = self.get_splice(appliance)?;
        self.may_change(splice.vm.as_str())?;
        self.take_out(&splice.appliance).await?;
        self.replicate_wiring(&splice.vm).await?;
        tracing::info!(appliance, vm = %splice.vm, "unspliced");
        Ok(())
    }

    /// Marks a splice removing, rewires around it, then removes its
    /// appliance (or stops one that was not created for it), its segment
    /// and its record. Every step may be repeated, so recovery finishes a
    /// removal a daemon died in.
    pub(super) async fn take_out(self: &Arc<Self>, appliance: &Name) -> Result<(), OpError> {
        let splice = self.update_splice(appliance, SpliceState::Removing, "unsplicing")?;
        self.rewire().await;
        if self.get(appliance.as_str()).is_ok() {
            if splice.owned {
                self.remove(appliance.as_str(), true).await?;
            } else {
                let cell = self.cell(appliance.as_str())?;
                let _op = cell.op.lock().await;
                self.stop_locked(&cell, false, DesiredState::Stopped)
                    .await?;
            }
        }
        self.net
            .delete_segment(&splice.segment)
            .await
            .map_err(|e| OpError::internal("failed to remove the splice's segment", e))?;
        self.forget_splice(appliance)
    }

    /// Waits until an instance reports ready; its failure or a stop ends the wait.
    pub(super) async fn wait_running(&self, name: &Name, timeout: Duration) -> Result<(), OpError> {
        let deadline = Instant::now() + timeout;
        loop {
            let instance = self.get(name.as_str())?;
            match instance.status.state {
                InstanceState::Running => return Ok(()),
                InstanceState::Failed | InstanceState::Stopped => {
                    return Err(OpError::new(
                        ErrorCode::GuestError,
                        format!(
                            "appliance {name} did not come up: {}",
                            instance
                                .status
                                .last_error
                                .unwrap_or_else(|| instance.status.state.to_string())
                        ),
                    ))
                }
                _ => {}
            }
            if Instant::now() >= deadline {
                return Err(OpError::new(
                    ErrorCode::Timeout,
                    format!(
                        "appliance {name} did not become ready within {}s",
                        timeout.as_secs()
                    ),
                ));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Where every tap belongs now.
    pub(super) fn current_wiring(&self) -> BTreeMap<String, Option<String>> {
        crate::wiring::wiring(&self.list(), &self.list_networks(), &self.list_splices())
    }

    /// Moves every running VM's tap where the records say it belongs. A tap
    /// that vanished (its VM just died) is skipped: its next launch wires it.
    pub(super) async fn rewire(&self) {
        let live: BTreeSet<String> = self
            .cells()
            .iter()
            .filter(|c| c.lock().process.is_some())
            .flat_map(|c| {
                c.lock()
                    .instance
                    .nics
                    .iter()
                    .map(|n| n.tap.clone())
                    .collect::<Vec<_>>()
            })
            .collect();
        for (tap, bridge) in self.current_wiring() {
            if !live.contains(&tap) {
                continue;
            }
            match self.net.move_tap(&tap, bridge.as_deref()).await {
                Ok(()) | Err(crate::net::NetworkBackendError::NoSuchInterface { .. }) => {}
                Err(e) => tracing::warn!(%tap, error = %e, "cannot move a tap"),
            }
        }
    }

    /// Re-applies every mirror that `name`'s taps take part in (as the
    /// copied VM or as the capture appliance): a launch makes new taps.
    pub(super) async fn refresh_mirrors_for(&self, name: &Name) {
        let sources: BTreeSet<(Name, usize)> = self
            .list_mirrors()
            .into_iter()
            .filter(|m| &m.vm == name || &m.to == name)
            .map(|m| (m.vm, m.nic))
            .collect();
        for (vm, nic) in sources {
            self.refresh_mirrors_of(&vm, nic).await;
        }
    }

    /// Replaces the tc mirroring of one VM NIC with what its mirrors say.
    async fn refresh_mirrors_of(&self, vm: &Name, nic: usize) {
        let live_tap = |name: &Name, index: usize, id: Option<&String>| {
            let cell = self.cell(name.as_str()).ok()?;
            let record = cell.lock();
            record.process.as_ref()?;
            if id.is_some_and(|id| *id != record.instance.id) {
                return None;
            }
            record.instance.nics.get(index).map(|n| n.tap.clone())
        };
        let Some(source) = live_tap(vm, nic, None) else {
            return;
        };
        let mut targets = vec![];
        for mirror in self
            .list_mirrors()
            .into_iter()
            .filter(|m| &m.vm == vm && m.nic == nic)
        {
            let Some(tap) = live_tap(&mirror.to, mirror.to_nic, mirror.to_id.as_ref()) else {
                continue;
            };
            let filter = match &mirror.filter {
                Some(expr) => match self.net.compile_filter(expr).await {
                    Ok(code) => Some(code),
                    Err(e) => {
                        tracing::warn!(mirror = %mirror.id, error = %e, "cannot compile the mirror's filter");
                        continue;
                    }
                },
                None => None,
            };
            targets.push(MirrorTarget { tap, filter });
        }
        if let Err(e) = self.net.set_mirrors(&source, &targets).await {
            tracing::warn!(vm = %vm, nic, error = %e, "cannot set up mirroring");
        }
    }

    /// Copies one NIC's traffic, both directions, to a capture appliance.
    pub async fn mirror(&self, req: MirrorRequest) -> Result<Mirror, OpError> {
        req.validate()?;
        let _op = self.splice_op.lock().await;
        let vm = self.get(req.vm.as_str())?;
        self.may_change(vm.spec.name.as_str())?;
        let nic = resolve_nic(&vm, req.nic.as_deref())?;
        let to = self.get(req.to.as_str())?;
        if to.spec.name == vm.spec.name {
            return Err(OpError::new(
                ErrorCode::Conflict,
                format!("cannot mirror {} to itself", vm.spec.name),
            ));
        }
        let to_nic = match req.to_nic.as_deref() {
            Some(raw) => {
                let index = resolve_nic(&to, Some(raw))?;
                if to.nics[index].role.as_deref() != Some(MIRROR_ROLE) {
                    return Err(OpError::new(
                        ErrorCode::Conflict,
                        format!(
                            "NIC {raw} of {} is not a capture NIC ({MIRROR_ROLE}): mirror to a sniffer's sink",
                            to.spec.name
                        ),
                    ));
                }
                index
            }
            None => to
                .nics
                .iter()
                .position(|n| n.role.as_deref() == Some(MIRROR_ROLE))
                .ok_or_else(|| {
                    OpError::new(
                        ErrorCode::Conflict,
                        format!(
                            "{} has no capture NIC ({MIRROR_ROLE}): mirror to a sniffer",
                            to.spec.name
                        ),
                    )
                })?,
        };
        let filter = req.filter.filter(|f| !f.trim().is_empty());
        if let Some(expr) = &filter {
            self.net.compile_filter(expr).await.map_err(|e| {
                OpError::new(ErrorCode::Conflict, format!("invalid filter {expr:?}: {e}"))
            })?;
        }
        let id = Mirror::make_id(&vm.spec.name, nic, &to.spec.name, to_nic);
        if self.list_mirrors().iter().any(|m| m.id == id) {
            return Err(OpError::new(
                ErrorCode::AlreadyExists,
                format!(
                    "{}:{nic} is already mirrored to {}:{to_nic}",
                    vm.spec.name, to.spec.name
                ),
            ));
        }
        let mirror = Mirror {
            id: id.clone(),
            vm: vm.spec.name.clone(),
            nic,
            to: to.spec.name.clone(),
            to_nic,
            to_id: Some(to.id.clone()),
            filter,
            created_at: now_secs(),
        };
        blocking(|| self.store.put_mirror(&mirror))
            .map_err(|e| OpError::internal("failed to save the mirror", e))?;
        self.mirrors.lock_unpoisoned().insert(id, mirror.clone());
        if let Err(e) = self.replicate_wiring(&mirror.vm).await {
            let _ = self.drop_mirror(&mirror.id).await;
            return Err(e);
        }
        self.refresh_mirrors_of(&mirror.vm, nic).await;
        tracing::info!(mirror = %mirror.id, "mirroring");
        self.emit(
            NewEvent::new(EventKind::Mirror, "created", mirror.vm.as_str())
                .id(&mirror.id)
                .message(format!(
                    "{}:{} to {}:{}",
                    mirror.vm, mirror.nic, mirror.to, mirror.to_nic
                )),
        );
        Ok(mirror)
    }

    /// Stops one mirror.
    pub async fn unmirror(&self, id: &str) -> Result<(), OpError> {
        let _op = self.splice_op.lock().await;
        let vm = self
            .list_mirrors()
            .into_iter()
            .find(|m| m.id == id)
            .map(|m| m.vm);
        if let Some(vm) = &vm {
            self.may_change(vm.as_str())?;
        }
        self.drop_mirror(id).await?;
        match vm {
            Some(vm) => self.replicate_wiring(&vm).await,
            None => Ok(()),
        }
    }

    pub(super) async fn drop_mirror(&self, id: &str) -> Result<(), OpError> {
        let mirror = self
            .list_mirrors()
            .into_iter()
            .find(|m| m.id == id)
            .ok_or_else(|| OpError::new(ErrorCode::NotFound, format!("no mirror {id:?}")))?;
        blocking(|| self.store.delete_mirror(id))
            .map_err(|e| OpError::internal("failed to delete the mirror", e))?;
        self.mirrors.lock_unpoisoned().remove(id);
        self.refresh_mirrors_of(&mirror.vm, mirror.nic).await;
        self.emit(NewEvent::new(EventKind::Mirror, "removed", mirror.vm.as_str()).id(id));
        Ok(())
    }

    /// Why an instance may not be removed: a splice still needs it.
    pub(super) fn splice_blocking_removal(&self, name: &str) -> Option<String> {
        self.list_splices()
            .into_iter()
            .filter(|s| s.state != SpliceState::Removing)
            .find_map(|s| {
                if s.appliance.as_str() == name {
                    Some(format!(
                        "{name} is spliced in front of {}; `vroom unsplice {name}` takes it out (and removes it)",
                        s.vm
                    ))
                } else if s.vm.as_str() == name {
                    Some(format!(
                        "{} is spliced in front of {name}; `vroom unsplice {}` first",
                        s.appliance, s.appliance
                    ))
                } else {
                    None
                }
            })
    }

    /// Forgets the mirrors of an instance being removed.
    pub(super) async fn drop_mirrors_of(&self, name: &str) {
        let ids: Vec<String> = self
            .list_mirrors()
            .into_iter()
            .filter(|m| m.vm.as_str() == name || m.to.as_str() == name)
            .map(|m| m.id)
            .collect();
        for id in ids {
            let _ = self.drop_mirror(&id).await;
        }
    }

    /// Loads splices and mirrors, before any instance is recovered: a VM
    /// relaunched by recovery must find its tap's place behind its splice,
    /// never on the open network.
    pub(super) async fn load_splices(&self) -> Result<(), OpError> {
        let splices = blocking(|| self.store.splices())
            .map_err(|e| OpError::internal("failed to load splices", e))?;
        let mirrors = blocking(|| self.store.mirrors())
            .map_err(|e| OpError::internal("failed to load mirrors", e))?;
        {
            let mut map = self.splices.lock_unpoisoned();
            for splice in &splices {
                map.insert(splice.appliance.clone(), splice.clone());
            }
        }
        {
            let mut map = self.mirrors.lock_unpoisoned();
            for mirror in mirrors {
                map.insert(mirror.id.clone(), mirror);
            }
        }
        // Segments vanish with a host reboot; taps relaunched by recovery
        // need theirs back first.
        for splice in self.list_splices() {
            if let Err(e) = self.net.create_segment(&splice.segment).await {
                tracing::error!(segment = %splice.segment, error = %e, "cannot recreate a splice's segment");
            }
        }
        Ok(())
    }

    /// After the instances are recovered: undoes a splice that was never
    /// acknowledged, finishes an unsplice, brings back segments (gone after
    /// a host reboot), rewires everything, re-applies mirrors and starts the
    /// watchdog.
    pub(super) async fn recover_splices(self: &Arc<Self>) -> Result<(), OpError> {
        let _op = self.splice_op.lock().await;
        for splice in self.list_splices() {
            match splice.state {
                SpliceState::Starting | SpliceState::Removing => {
                    tracing::warn!(appliance = %splice.appliance, state = %splice.state, "finishing an interrupted splice change: taking the appliance out");
                    if let Err(e) = self.take_out(&splice.appliance).await {
                        tracing::error!(appliance = %splice.appliance, error = %e, "cannot take out an interrupted splice");
                    }
                }
                _ => {}
            }
        }
        self.rewire().await;
        let names: BTreeSet<Name> = self.list().into_iter().map(|i| i.spec.name).collect();
        for name in names {
            self.refresh_mirrors_for(&name).await;
        }
        self.spawn_splice_watchdog();
        Ok(())
    }

    /// Watches every spliced appliance: one that dies or fails its health
    /// check is bypassed (fail open) or cuts the path (fail closed), and
    /// put back in the path when it is healthy again. Each change is an
    /// event on the splice.
    fn spawn_splice_watchdog(self: &Arc<Self>) {
        let engine = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut strikes: BTreeMap<Name, u32> = BTreeMap::new();
            loop {
                tokio::time::sleep(WATCH_EVERY).await;
                let Some(engine) = engine.upgrade() else {
                    return;
                };
                let watched: Vec<Splice> = engine
                    .list_splices()
                    .into_iter()
                    .filter(|s| {
                        matches!(
                            s.state,
                            SpliceState::Active | SpliceState::Bypassed | SpliceState::Cut
                        )
                    })
                    .collect();
                strikes.retain(|name, _| watched.iter().any(|s| &s.appliance == name));
                for splice in watched {
                    let health = engine.appliance_health(&splice.appliance).await;
                    if health == Health::Unhealthy && engine.changing_config(&splice.appliance) {
                        // Its services restart for an acknowledged change.
                        continue;
                    }
                    let strike = strikes.entry(splice.appliance.clone()).or_default();
                    let healthy = match health {
                        Health::Dead => {
                            *strike = WATCH_STRIKES;
                            false
                        }
                        Health::Unhealthy => {
                            *strike += 1;
                            *strike < WATCH_STRIKES && splice.state == SpliceState::Active
                        }
                        Health::Healthy => {
                            *strike = 0;
                            true
                        }
                    };
                    engine.watch_step(&splice, healthy, health).await;
                }
            }
        });
    }

    async fn watch_step(self: &Arc<Self>, splice: &Splice, healthy: bool, health: Health) {
        let next = match (splice.state, healthy) {
            (SpliceState::Active, false) => match splice.fail {
                FailMode::Open => SpliceState::Bypassed,
                FailMode::Closed => SpliceState::Cut,
            },
            (SpliceState::Bypassed | SpliceState::Cut, true) => SpliceState::Active,
            _ => return,
        };
        let _op = self.splice_op.lock().await;
        // The splice may have changed while the lock was taken.
        match self.get_splice(splice.appliance.as_str()) {
            Ok(current) if current.state == splice.state => {}
            _ => return,
        }
        let why = match health {
            Health::Dead => "the appliance is down",
            Health::Unhealthy => "the appliance fails its health check",
            Health::Healthy => "the appliance is healthy again",
        };
        let event = match next {
            SpliceState::Bypassed => format!("{why}: failing open, traffic bypasses it"),
            SpliceState::Cut => format!("{why}: failing closed, the path stays cut"),
            _ => format!("{why}: back in the path"),
        };
        if let Err(e) = self.update_splice(&splice.appliance, next, &event) {
            tracing::error!(appliance = %splice.appliance, error = %e, "cannot record a splice change");
            return;
        }
        self.rewire().await;
        tracing::warn!(appliance = %splice.appliance, vm = %splice.vm, state = %next, "{event}");
    }

    async fn appliance_health(&self, name: &Name) -> Health {
        let Ok(cell) = self.cell(name.as_str()) else {
            return Health::Dead;
        };
        let (process, state) = {
            let r = cell.lock();
            (r.process.clone(), r.instance.status.state)
        };
        match process {
            Some(p) if self.driver.is_alive(&p) => {}
            _ => return Health::Dead,
        }
        if state != InstanceState::Running {
            return Health::Unhealthy;
        }
        let report = cell.agent.health(WATCH_HEALTH_TIMEOUT).await;
        if let Ok(usage) = report.as_ref().map(|r| r.conntrack) {
            note_conntrack_drops(name, &cell, usage);
        }
        match report {
            Ok(report) if report.ready => Health::Healthy,
            Ok(report) => {
                tracing::debug!(appliance = %name, ?report, "appliance not ready");
                Health::Unhealthy
            }
            Err(e) => {
                tracing::debug!(appliance = %name, error = %e, "appliance health check failed");
                Health::Unhealthy
            }
        }
    }

    /// Whether an appliance's config change is being put in force.
    fn changing_config(&self, name: &Name) -> bool {
        self.cell(name.as_str())
            .is_ok_and(|cell| cell.config_changing.load(Ordering::SeqCst))
    }
}

/// Logs on the host when a spliced appliance's connection tracking table
/// dropped packets since it was last asked: new connections through it fail.
fn note_conntrack_drops(name: &Name, cell: &Cell, usage: Option<ConntrackUsage>) {
    let Some(usage) = usage else {
        return;
    };
    let before = cell.conntrack_dropped.swap(usage.dropped, Ordering::SeqCst);
    if usage.dropped > before {
        tracing::warn!(
            appliance = %name,
            dropped = usage.dropped - before,
            entries = usage.entries,
            max = usage.max,
            "the appliance's connection tracking table is full and drops new connections; raise its conntrack_max or memory"
        );
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Health {
    Healthy,
    Unhealthy,
    Dead,
}

pub(super) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// The index of `VM[:NIC]`'s NIC: a role, or an index from 0; the first NIC
/// when absent.
pub(super) fn resolve_nic(instance: &Instance, nic: Option<&str>) -> Result<usize, OpError> {
    let name = &instance.spec.name;
    let Some(raw) = nic else {
        return if instance.nics.is_empty() {
            Err(OpError::new(
                ErrorCode::Conflict,
                format!("{name} has no NIC"),
            ))
        } else {
            Ok(0)
        };
    };
    if let Some(index) = instance
        .nics
        .iter()
        .position(|n| n.role.as_deref() == Some(raw))
    {
        return Ok(index);
    }
    match raw.parse::<usize>() {
        Ok(index) if index < instance.nics.len() => Ok(index),
        _ => Err(OpError::new(
            ErrorCode::NotFound,
            format!(
                "{name} has no NIC {raw:?} (its NICs: {})",
                instance
                    .nics
                    .iter()
                    .enumerate()
                    .map(|(i, n)| n.role.clone().unwrap_or_else(|| i.to_string()))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        )),
    }
}

#[cfg(test)]
mod tests;
