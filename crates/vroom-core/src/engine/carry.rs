//! Splices and mirrors that move with their VM between cluster nodes.
//!
//! The owner of a VM records its [`Wiring`] in the cluster whenever it
//! changes (and before a migration). The node the VM moves to, or fails
//! over to, makes it again before the VM runs there
//! ([`Engine::install_wiring`]): each splice's segment, and its appliance
//! booted with the same id and config, in the path before the VM's first
//! packet. The node it left takes its copies out ([`Engine::drop_wiring`]).
//!
//! Only what a splice created moves: an appliance that was an instance of
//! its own before its splice stays where it is, and its VM with it. A
//! mirror moves with the VM it copies; it copies again once its capture
//! appliance is on the same node.

use vroom_base::LockExt;
use vroom_types::{Mirror, Splice, SpliceState};

use super::splices::now_ms;
use super::*;
use crate::cluster::{CarriedSplice, ConfigReplica, Identity, Wiring};

impl Engine {
    /// What moves with `vm`: its splices (in path order, each with its
    /// appliance) and its mirrors. `None` when it has neither.
    pub fn wiring_of(&self, vm: &str) -> Option<Wiring> {
        let mut splices: Vec<Splice> = self
            .list_splices()
            .into_iter()
            .filter(|s| s.vm.as_str() == vm && s.owned)
            .filter(|s| s.state != SpliceState::Starting && s.state != SpliceState::Removing)
            .collect();
        splices.sort_by_key(|s| s.seq);
        let splices: Vec<CarriedSplice> = splices
            .into_iter()
            .filter_map(|splice| {
                let appliance = self.get(splice.appliance.as_str()).ok()?;
                let mut spec = appliance.spec.clone();
                spec.image = appliance.image_id.clone();
                Some(CarriedSplice {
                    splice,
                    id: appliance.id,
                    spec,
                    config: appliance.config,
                })
            })
            .collect();
        let mirrors: Vec<Mirror> = self
            .list_mirrors()
            .into_iter()
            .filter(|m| m.vm.as_str() == vm)
            .collect();
        (!splices.is_empty() || !mirrors.is_empty()).then_some(Wiring { splices, mirrors })
    }

    /// Refuses to move `name` to another node when it cannot go (see
    /// [`Self::immovable_reason`]): the cluster asks before it contacts
    /// the destination, and [`Self::send_live`] again before it streams.
    pub fn check_movable(&self, name: &str) -> Result<(), OpError> {
        match self.immovable_reason(name) {
            Some(reason) => Err(OpError::conflict(format!(
                "{name} cannot move to another node: {reason}"
            ))),
            None => Ok(()),
        }
    }

    /// What moves with `name` to another node (its splices and mirrors),
    /// once it is checked movable.
    pub fn wiring_to_carry(&self, name: &str) -> Result<Option<Wiring>, OpError> {
        self.check_movable(name)?;
        Ok(self.wiring_of(name))
    }

    /// Why `name` cannot leave this node with its wiring, if it cannot.
    pub fn immovable_reason(&self, name: &str) -> Option<String> {
        if let Some(volumes) = self.cell(name).ok().map(|c| c.snapshot().spec.volumes) {
            // A volume kept on two nodes moves with it (the cluster says
            // where to); one with a single copy stays here.
            if let Some(local) = self.local_volume_of(&volumes) {
                return Some(format!(
                    "it has data volume {local}, which has one copy and stays on this node"
                ));
            }
        }
        let splices = self.list_splices();
        if let Some(s) = splices.iter().find(|s| s.appliance.as_str() == name) {
            return Some(format!(
                "it is spliced in front of {}, and moves with it (`vroom migrate {}`)",
                s.vm, s.vm
            ));
        }
        if let Some(s) = splices.iter().find(|s| s.vm.as_str() == name && !s.owned) {
            return Some(format!(
                "{} was an instance of its own before it was spliced in front of it, and does not move; `vroom unsplice {}` first",
                s.appliance, s.appliance
            ));
        }
        if let Some(s) = splices.iter().find(|s| {
            s.vm.as_str() == name
                && matches!(s.state, SpliceState::Starting | SpliceState::Removing)
        }) {
            return Some(format!(
                "its splice of {} is {}; try again when that is done",
                s.appliance, s.state
            ));
        }
        None
    }

    /// Whether the cluster (when this host is in one) takes a change to
    /// `name`'s config, splices or mirrors now.
    pub(super) fn may_change(&self, name: &str) -> Result<(), OpError> {
        match self.cluster() {
            Some(cluster) => {
                let spliced_into = self.get_splice(name).ok().map(|s| s.vm);
                cluster.may_change(name, spliced_into.as_ref().map(|vm| vm.as_str()))
            }
            None => Ok(()),
        }
    }

    /// Replicates `name`'s accepted config (when this host is in a
    /// cluster): an appliance a splice made carries it in its VM's wiring
    /// (nothing to do while the VM has none); any other instance as its own.
    pub(super) fn replicate_config(
        &self,
        name: &str,
        values: &ConfigValues,
    ) -> Result<(), OpError> {
        let Some(cluster) = self.cluster() else {
            return Ok(());
        };
        let Some(splice) = self.get_splice(name).ok().filter(|s| s.owned) else {
            return cluster.replicate_config(ConfigReplica::Own { name, values });
        };
        let Some(mut wiring) = self.wiring_of(splice.vm.as_str()) else {
            return Ok(());
        };
        for carried in &mut wiring.splices {
            if carried.splice.appliance.as_str() == name {
                carried.config = values.clone();
            }
        }
        cluster.replicate_config(ConfigReplica::Carried {
            vm: splice.vm.as_str(),
            wiring: &wiring,
        })
    }

    /// Records `vm`'s wiring in the cluster (when this host is in one).
    pub(super) async fn replicate_wiring(&self, vm: &Name) -> Result<(), OpError> {
        match self.cluster() {
            Some(cluster) => {
                cluster
                    .replicate_wiring(vm.as_str(), self.wiring_of(vm.as_str()))
                    .await
            }
            None => Ok(()),
        }
    }

    /// Makes `vm`'s wiring here before the VM runs here: every splice's
    /// segment and appliance (booted and ready), then its mirrors. What is
    /// already here is kept; any failure takes out what this call made.
    pub async fn install_wiring(
        self: &Arc<Self>,
        vm: &str,
        wiring: &Wiring,
    ) -> Result<(), OpError> {
        let _op = self.splice_op.lock().await;
        let mut made: Vec<Name> = vec![];
        for carried in &wiring.splices {
            match self.install_splice(vm, carried).await {
                Ok(true) => made.push(carried.splice.appliance.clone()),
                Ok(false) => {}
                Err(e) => {
                    for appliance in &made {
                        if let Err(undo) = self.take_out(appliance).await {
                            tracing::error!(%appliance, error = %undo, "cannot undo a moved splice");
                        }
                    }
                    return Err(e);
                }
            }
        }
        for mirror in &wiring.mirrors {
            if self.list_mirrors().iter().any(|m| m.id == mirror.id) {
                continue;
            }
            blocking(|| self.store.put_mirror(mirror))
                .map_err(|e| OpError::internal("failed to save the mirror", e))?;
            self.mirrors
                .lock_unpoisoned()
                .insert(mirror.id.clone(), mirror.clone());
        }
        Ok(())
    }

    /// One splice of [`Engine::install_wiring`]; `Ok(false)` when it is here.
    async fn install_splice(
        self: &Arc<Self>,
        vm: &str,
        carried: &CarriedSplice,
    ) -> Result<bool, OpError> {
        let appliance = &carried.splice.appliance;
        if let Ok(existing) = self.get_splice(appliance.as_str()) {
            if existing.vm.as_str() == vm {
                return Ok(false);
            }
            return Err(OpError::conflict(format!(
                "{appliance} is spliced in front of {} here already",
                existing.vm
            )));
        }
        if self.get(appliance.as_str()).is_ok() {
            return Err(OpError::conflict(format!(
                "an instance named {appliance} is here already, so {vm}'s appliance cannot come"
            )));
        }
        let seq = self.list_splices().iter().map(|s| s.seq).max().unwrap_or(0) + 1;
        let mut splice = Splice {
            segment: ipam::segment_name(
                &self.cfg.iface_prefix,
                &self.cfg.data_dir.display().to_string(),
                appliance.as_str(),
            ),
            seq,
            state: SpliceState::Starting,
            ..carried.splice.clone()
        };
        splice.record(now_ms(), "moving with its VM: the appliance starts here");
        self.save_splice(&splice)?;
        if let Err(e) = self.bring_up(&splice, carried).await {
            if let Err(undo) = self.take_out(appliance).await {
                tracing::error!(%appliance, error = %undo, "cannot undo a moved splice");
            }
            return Err(e);
        }
        tracing::info!(%appliance, vm, "a splice moved here with its VM");
        Ok(true)
    }

    /// The segment and the appliance of a splice on record as starting.
    async fn bring_up(
        self: &Arc<Self>,
        splice: &Splice,
        carried: &CarriedSplice,
    ) -> Result<(), OpError> {
        let appliance = &splice.appliance;
        self.net
            .create_segment(&splice.segment)
            .await
            .map_err(|e| OpError::internal("failed to create the splice's segment", e))?;
        let ready_timeout = DEFAULT_READY_TIMEOUT_SECS;
        self.run_as(
            RunRequest {
                spec: carried.spec.clone(),
                ready_timeout_secs: Some(ready_timeout),
                from_snapshot: None,
                cold: false,
                placement: Default::default(),
                env: Default::default(),
            },
            Some(Identity {
                id: carried.id.clone(),
                config: Some(carried.config.clone()),
                cluster: false,
            }),
        )
        .await?;
        self.wait_running(appliance, Duration::from_secs(ready_timeout + 5))
            .await?;
        self.update_splice(appliance, SpliceState::Active, "in the path")?;
        self.rewire().await;
        Ok(())
    }

    /// Takes out `vm`'s splices and mirrors here: it runs on another node
    /// now (or never came here). The appliances the splices made go.
    pub async fn drop_wiring(self: &Arc<Self>, vm: &str) {
        let _op = self.splice_op.lock().await;
        let splices: Vec<Splice> = self
            .list_splices()
            .into_iter()
            .filter(|s| s.vm.as_str() == vm)
            .collect();
        for splice in splices {
            if let Err(e) = self.take_out(&splice.appliance).await {
                tracing::error!(appliance = %splice.appliance, error = %e, "cannot take out the splice of a VM that left");
            }
        }
        let mirrors: Vec<String> = self
            .list_mirrors()
            .into_iter()
            .filter(|m| m.vm.as_str() == vm)
            .map(|m| m.id)
            .collect();
        for id in mirrors {
            let _ = self.drop_mirror(&id).await;
        }
    }

    /// VMs whose splices or mirrors are here while the VM is not.
    pub fn wired_elsewhere(&self) -> Vec<String> {
        let here = |name: &Name| self.get(name.as_str()).is_ok();
        let mut vms: Vec<String> = self
            .list_splices()
            .into_iter()
            .map(|s| s.vm)
            .chain(self.list_mirrors().into_iter().map(|m| m.vm))
            .filter(|vm| !here(vm))
            .map(|vm| vm.to_string())
            .collect();
        vms.sort();
        vms.dedup();
        vms
    }
}
