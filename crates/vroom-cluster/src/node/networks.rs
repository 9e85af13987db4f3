//! Cluster networks: recorded once in the cluster (subnet and VNI), made
//! on each node that runs an instance on them, joined to the other nodes
//! over VXLAN; addresses taken in the cluster.

use super::*;

impl ClusterNode {
    /// Joins every cluster network this node has to the other live nodes
    /// (VXLAN), when the set of peers changed.
    pub(super) async fn join_networks(&self, view: &View) {
        let Some(local) = advertised_ip(&self.advertise) else {
            return;
        };
        let peers: Vec<Ipv4Addr> = view
            .nodes
            .iter()
            .filter(|(name, _)| **name != self.name)
            .filter_map(|(_, (n, _))| advertised_ip(&n.advertise))
            .collect();
        for (name, network) in &view.networks {
            if network.vni == 0 || self.engine.network(name).is_err() {
                continue;
            }
            let want = (network.vni, peers.clone());
            let applied = self.overlays.lock_unpoisoned().get(name) == Some(&want);
            if applied {
                continue;
            }
            match self
                .engine
                .set_overlay(name, network.vni, local, &peers)
                .await
            {
                Ok(()) => {
                    tracing::info!(network = %name, vni = network.vni, peers = ?peers, "network joined to the other nodes");
                    self.overlays.lock_unpoisoned().insert(name.clone(), want);
                }
                Err(e) => {
                    tracing::warn!(network = %name, error = %e.message, "cannot join the network to the other nodes")
                }
            }
        }
    }

    /// Creates a cluster network here as etcd describes it.
    pub(super) async fn ensure_network(&self, name: &str) -> Result<(), OpError> {
        let record = self
            .store
            .get_json::<NetworkRecord>(&key(NETWORKS, name))
            .await
            .map_err(|e| etcd_error("cannot read the network", e))?
            .map(|(n, _)| n)
            .ok_or_else(|| OpError::not_found("cluster network", name))?;
        match self.engine.network(name) {
            Ok(local) if local.subnet == record.subnet => Ok(()),
            Ok(local) => Err(OpError::conflict(format!(
                "network {name} is {} on this node but {} in the cluster",
                local.subnet, record.subnet
            ))),
            Err(_) => self.make_network(&record).await,
        }
    }

    /// Makes cluster network `record` on this node. One of its name made
    /// meanwhile with its subnet is as good: two starts at once (two
    /// instances failing over here together) both found it missing, and
    /// the other made it.
    pub(super) async fn make_network(&self, record: &NetworkRecord) -> Result<(), OpError> {
        let mut spec = record.spec.clone();
        spec.subnet = Some(record.subnet);
        let name = spec.name.to_string();
        match self.engine.create_network(spec).await {
            Ok(_) => Ok(()),
            Err(e) if e.code == ErrorCode::AlreadyExists => match self.engine.network(&name) {
                Ok(local) if local.subnet == record.subnet => Ok(()),
                _ => Err(e),
            },
            Err(e) => Err(e),
        }
    }

    /// The network a new instance's NIC joins, recorded in the cluster: an
    /// existing cluster network, or this node's (created on first use for
    /// `default`).
    pub(super) async fn cluster_network(
        &self,
        name: &str,
        view: &View,
    ) -> Result<NetworkRecord, OpError> {
        if let Some(n) = view.networks.get(name) {
            return Ok(n.clone());
        }
        let local = match self.engine.network(name) {
            Ok(n) => n,
            Err(_) if name == vroom_core::engine::DEFAULT_NETWORK => {
                self.engine
                    .create_network(NetworkSpec {
                        name: Name::new(name).expect("invariant: valid name"),
                        subnet: None,
                        nat: true,
                        isolated: false,
                        mirror: false,
                        allow_host: vec![],
                    })
                    .await?
            }
            Err(e) => return Err(e),
        };
        let mut record = NetworkRecord {
            spec: NetworkSpec {
                name: local.name.clone(),
                subnet: Some(local.subnet),
                nat: local.nat,
                isolated: local.isolated,
                mirror: local.mirror,
                allow_host: local.allow_host.clone(),
            },
            subnet: local.subnet,
            vni: 0,
        };
        let k = key(NETWORKS, name);
        // The network and its VNI in one transaction; a VNI another network
        // just took means the next one.
        for _ in 0..8 {
            record.vni = view
                .networks
                .values()
                .map(|n| n.vni + 1)
                .max()
                .unwrap_or(FIRST_VNI)
                .max(FIRST_VNI);
            let (taken, _) = self
                .store
                .list(VNIS)
                .await
                .map_err(|e| etcd_error("cannot read the VNIs", e))?;
            while taken
                .iter()
                .any(|kv| kv.name(VNIS) == record.vni.to_string())
            {
                record.vni += 1;
            }
            let vni_key = format!("{VNIS}{}", record.vni);
            let txn = Txn::new()
                .when([
                    Compare::create_revision(k.clone(), 0),
                    Compare::create_revision(vni_key.clone(), 0),
                ])
                .and_then([
                    Op::put(k.clone(), json(&record)),
                    Op::put(vni_key, name.to_string()),
                ]);
            let done = self
                .store
                .txn(txn)
                .await
                .map_err(|e| etcd_error("cannot record the network", e))?;
            if done.succeeded()
                || self
                    .store
                    .get(&k)
                    .await
                    .map_err(|e| etcd_error("cannot read the network", e))?
                    .is_some()
            {
                break;
            }
        }
        let (stored, _) = self
            .store
            .get_json::<NetworkRecord>(&k)
            .await
            .map_err(|e| etcd_error("cannot read the network", e))?
            .ok_or_else(|| OpError::not_found("cluster network", name))?;
        Ok(stored)
    }

    /// A free address on a network (the requested one, checked), not among
    /// `also_taken` (this request's other NICs). Taken for real by the
    /// transaction that records the instance.
    pub(super) async fn free_ip(
        &self,
        network: &NetworkRecord,
        requested: Option<Ipv4Addr>,
        also_taken: &[(String, Ipv4Addr)],
    ) -> Result<Ipv4Addr, OpError> {
        let net = network.spec.name.as_str();
        if let Some(ip) = requested {
            vroom_core::ipam::allocate_ip(network.subnet, &[], Some(ip))
                .map_err(|e| OpError::new(ErrorCode::InvalidArgument, e.to_string()))?;
            return Ok(ip);
        }
        let prefix = format!("{IPS}{net}/");
        let (taken, _) = self
            .store
            .list(&prefix)
            .await
            .map_err(|e| etcd_error("cannot read the addresses", e))?;
        let mut used: Vec<Ipv4Addr> = taken
            .iter()
            .filter_map(|kv| kv.name(&prefix).parse().ok())
            .collect();
        used.extend(also_taken.iter().map(|(_, ip)| *ip));
        vroom_core::ipam::allocate_ip(network.subnet, &used, None).map_err(|_| {
            OpError::new(
                ErrorCode::ResourceExhausted,
                format!("network {net} has no free address left"),
            )
        })
    }
}
