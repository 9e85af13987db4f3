//! One consistent read of the cluster, and what the scheduler and a drain
//! make of it: the nodes as candidates, where an instance would go.

use super::*;

/// One consistent read of the cluster.
#[derive(Default)]
pub(super) struct View {
    pub(super) nodes: BTreeMap<String, (NodeRecord, Kv)>,
    pub(super) members: BTreeMap<String, NodeRecord>,
    /// Cordoned nodes; `true` while draining.
    pub(super) cordons: BTreeMap<String, bool>,
    pub(super) leader: Option<(String, i64)>,
    pub(super) instances: BTreeMap<String, (InstanceRecord, Kv)>,
    pub(super) owners: BTreeMap<String, (OwnerRecord, Kv)>,
    pub(super) assigns: BTreeMap<String, (String, Kv)>,
    pub(super) statuses: BTreeMap<String, StatusRecord>,
    pub(super) configs: BTreeMap<String, ConfigValues>,
    pub(super) networks: BTreeMap<String, NetworkRecord>,
    pub(super) migrations: BTreeMap<String, (MigrationRecord, Kv)>,
    /// Each VM's recorded splices and mirrors.
    pub(super) wirings: BTreeMap<String, (Wiring, Kv)>,
    /// Volumes kept on two nodes.
    pub(super) volumes: BTreeMap<String, (VolumeRecord, Kv)>,
    /// The etcd revision it was read at (0: unknown).
    pub(super) revision: i64,
}

impl View {
    pub(super) fn parse(kvs: Vec<Kv>) -> View {
        let mut view = View::default();
        for kv in kvs {
            let key = kv.key.clone();
            let bad = |e: StoreError| tracing::warn!(%key, error = %e, "skipping an unreadable cluster key");
            if let Some(name) = key.strip_prefix(NODES) {
                match kv.decode() {
                    Ok(n) => drop(view.nodes.insert(name.into(), (n, kv))),
                    Err(e) => bad(e),
                }
            } else if let Some(name) = key.strip_prefix(MEMBERS) {
                match kv.decode() {
                    Ok(n) => drop(view.members.insert(name.into(), n)),
                    Err(e) => bad(e),
                }
            } else if let Some(name) = key.strip_prefix(CORDONS) {
                view.cordons.insert(name.into(), kv.value == DRAIN);
            } else if key == LEADER {
                view.leader = Some((String::from_utf8_lossy(&kv.value).into_owned(), kv.lease));
            } else if let Some(name) = key.strip_prefix(INSTANCES) {
                match kv.decode() {
                    Ok(r) => drop(view.instances.insert(name.into(), (r, kv))),
                    Err(e) => bad(e),
                }
            } else if let Some(name) = key.strip_prefix(OWNERS) {
                match kv.decode() {
                    Ok(o) => drop(view.owners.insert(name.into(), (o, kv))),
                    Err(e) => bad(e),
                }
            } else if let Some(name) = key.strip_prefix(ASSIGNS) {
                let node = String::from_utf8_lossy(&kv.value).into_owned();
                view.assigns.insert(name.into(), (node, kv));
            } else if let Some(name) = key.strip_prefix(STATUSES) {
                match kv.decode() {
                    Ok(s) => drop(view.statuses.insert(name.into(), s)),
                    Err(e) => bad(e),
                }
            } else if let Some(name) = key.strip_prefix(CONFIGS) {
                match kv.decode() {
                    Ok(c) => drop(view.configs.insert(name.into(), c)),
                    Err(e) => bad(e),
                }
            } else if let Some(name) = key.strip_prefix(MIGRATIONS) {
                match kv.decode() {
                    Ok(m) => drop(view.migrations.insert(name.into(), (m, kv))),
                    Err(e) => bad(e),
                }
            } else if let Some(name) = key.strip_prefix(NETWORKS) {
                match kv.decode() {
                    Ok(n) => drop(view.networks.insert(name.into(), n)),
                    Err(e) => bad(e),
                }
            } else if let Some(name) = key.strip_prefix(WIRINGS) {
                match kv.decode() {
                    Ok(w) => drop(view.wirings.insert(name.into(), (w, kv))),
                    Err(e) => bad(e),
                }
            } else if let Some(name) = key.strip_prefix(VOLUMES) {
                match kv.decode() {
                    Ok(v) => drop(view.volumes.insert(name.into(), (v, kv))),
                    Err(e) => bad(e),
                }
            }
        }
        view
    }

    /// The cluster instance that uses volume `name`, if any.
    pub(super) fn user_of_volume(&self, name: &str) -> Option<&str> {
        self.instances
            .iter()
            .find(|(_, (r, _))| {
                r.request
                    .spec
                    .volumes
                    .iter()
                    .any(|a| a.volume.as_str() == name)
            })
            .map(|(user, _)| user.as_str())
    }

    /// How node `name` stands for placement.
    pub(super) fn node_state(&self, name: &str) -> NodeState {
        match self.cordons.get(name) {
            _ if !self.nodes.contains_key(name) => NodeState::Lost,
            Some(true) => NodeState::Draining,
            Some(false) => NodeState::Cordoned,
            None => NodeState::Ready,
        }
    }

    /// Every node as the scheduler sees it: its state, free memory (less
    /// what is placed but not yet claimed), spread groups. A lost node (a
    /// member without a lease) has no memory to give.
    pub(super) fn candidates(&self) -> BTreeMap<String, Candidate> {
        let lost = self
            .members
            .iter()
            .filter(|(name, _)| !self.nodes.contains_key(*name));
        let mut candidates: BTreeMap<String, Candidate> = self
            .nodes
            .iter()
            .map(|(name, (n, _))| (name, n))
            .chain(lost)
            .map(|(name, n)| {
                let state = self.node_state(name);
                let mem_free_mib = match state {
                    NodeState::Lost => 0,
                    _ => n.mem_total_mib.saturating_sub(n.mem_used_mib),
                };
                (
                    name.clone(),
                    Candidate {
                        name: name.clone(),
                        state,
                        mem_free_mib,
                        spread: BTreeMap::new(),
                    },
                )
            })
            .collect();
        let spread_of = |inst: &str| {
            self.instances
                .get(inst)
                .and_then(|(r, _)| r.request.placement.spread.as_ref().map(|s| s.to_string()))
        };
        for (inst, node) in self
            .owners
            .iter()
            .map(|(i, (o, _))| (i, &o.node))
            .chain(self.assigns.iter().map(|(i, (n, _))| (i, n)))
        {
            if let (Some(c), Some(group)) = (candidates.get_mut(node), spread_of(inst)) {
                *c.spread.entry(group).or_default() += 1;
            }
        }
        for (inst, (node, _)) in &self.assigns {
            if let (Some(c), Some((r, _))) = (candidates.get_mut(node), self.instances.get(inst)) {
                c.mem_free_mib = c
                    .mem_free_mib
                    .saturating_sub(r.mem_mib + schedule::VMM_OVERHEAD_MIB);
            }
        }
        candidates
    }

    /// Nodes the scheduler keeps `name` off: the one it moved off while
    /// that is cordoned, or one where it failed to start lately (a node that
    /// failed a minute ago is tried again).
    pub(super) fn avoid(&self, name: &str) -> Vec<String> {
        match self.statuses.get(name) {
            Some(s)
                if self.cordons.contains_key(&s.node)
                    || (s.error.is_some()
                        && now_secs().saturating_sub(s.updated_at) < RETRY_AFTER_SECS) =>
            {
                vec![s.node.clone()]
            }
            _ => vec![],
        }
    }

    /// What instance `name` needs to move off node `from`.
    pub(super) fn resident(&self, name: &str, from: &str) -> Option<Resident> {
        let (record, _) = self.instances.get(name)?;
        let placement = &record.request.placement;
        Some(Resident {
            pending: Pending {
                name: name.to_string(),
                mem_mib: record.mem_mib,
                spread: placement.spread.as_ref().map(|s| s.to_string()),
                node: self.volume_target(record, from),
                avoid: self
                    .avoid(name)
                    .into_iter()
                    .chain([from.to_string()])
                    .collect(),
            },
            ha: placement.ha,
            wants_running: record.desired == DesiredState::Running,
        })
    }

    /// Where an instance with replicated volumes moves off `from`: the
    /// node of their up-to-date replicas when it can take it (the roles
    /// swap, nothing is copied); otherwise any node, whose copies are
    /// filled as part of the move (`None`); nowhere (`from` itself, which
    /// the move avoids) when a primary copy is not on `from`.
    fn volume_target(&self, record: &InstanceRecord, from: &str) -> Option<String> {
        let mut replicas = BTreeSet::new();
        let mut swap = true;
        for attach in &record.request.spec.volumes {
            let Some((v, _)) = self.volumes.get(attach.volume.as_str()) else {
                continue;
            };
            if v.primary != from {
                return Some(from.to_string());
            }
            swap &= v.state == vroom_types::ReplicaState::UpToDate;
            replicas.insert(v.replica.as_str());
        }
        let [replica] = replicas.into_iter().collect::<Vec<_>>()[..] else {
            return None;
        };
        let need = record.mem_mib + schedule::VMM_OVERHEAD_MIB;
        let fits = self
            .candidates()
            .get(replica)
            .is_some_and(|c| c.state == NodeState::Ready && c.mem_free_mib >= need);
        (swap && fits).then(|| replica.to_string())
    }

    /// Where the scheduler would move `name` off `from`.
    pub(super) fn target_for(&self, name: &str, from: &str) -> Option<String> {
        let resident = self.resident(name, from)?;
        let candidates: Vec<Candidate> = self.candidates().into_values().collect();
        schedule::place(&candidates, &[resident.pending])
            .into_iter()
            .next()
            .map(|(_, node)| node)
    }

    /// The drain of node `from` as it would go now: the nodes as the
    /// scheduler sees them, and the plan for every instance `from` owns
    /// (but those being removed).
    pub(super) fn drain_plan(&self, from: &str) -> (Vec<Candidate>, schedule::DrainPlan) {
        let residents: Vec<Resident> = self
            .owners
            .iter()
            .filter(|(_, (o, _))| o.node == from)
            .filter(|(name, _)| self.instances.get(*name).is_some_and(|(r, _)| !r.removing))
            .filter_map(|(name, _)| self.resident(name, from))
            .collect();
        let candidates: Vec<Candidate> = self.candidates().into_values().collect();
        let plan = schedule::plan_drain(&candidates, from, &residents);
        (candidates, plan)
    }

    pub(super) fn owner_of(&self, name: &str) -> Option<&str> {
        self.owners.get(name).map(|(o, _)| o.node.as_str())
    }

    pub(super) fn node_info(&self, name: &str) -> Option<NodeInfo> {
        let live = self.nodes.get(name).map(|(n, _)| n);
        let record = live.or_else(|| self.members.get(name))?;
        let instances: Vec<String> = self
            .owners
            .iter()
            .filter(|(_, (o, _))| o.node == name)
            .map(|(i, _)| i.clone())
            .collect();
        Some(NodeInfo {
            name: Name::new(name).ok()?,
            advertise: record.advertise.clone(),
            alive: live.is_some(),
            cordoned: self.cordons.contains_key(name),
            leader: self.leader.as_ref().is_some_and(|(l, _)| l == name),
            mem_total_mib: record.mem_total_mib,
            mem_free_mib: record.mem_total_mib.saturating_sub(record.mem_used_mib),
            cpus: record.cpus,
            joined_at: record.joined_at,
            instances,
        })
    }
}
