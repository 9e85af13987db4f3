//! Networks: bridges with their subnets, NAT and addresses.

use vroom_base::LockExt;

use super::*;
use crate::net::{HostRoute, NetworkBackendError};

impl Engine {
    pub fn list_networks(&self) -> Vec<Network> {
        self.networks.lock_unpoisoned().values().cloned().collect()
    }

    pub fn network(&self, name: &str) -> Result<Network, OpError> {
        let map = self.networks.lock_unpoisoned();
        map.values()
            .find(|n| n.name.as_str() == name)
            .cloned()
            .ok_or_else(|| OpError::not_found("network", name))
    }

    /// Joins network `name` to the same network on other cluster nodes
    /// (see [`crate::net::NetworkBackend::set_overlay`]).
    pub async fn set_overlay(
        &self,
        name: &str,
        vni: u32,
        local: Ipv4Addr,
        peers: &[Ipv4Addr],
    ) -> Result<(), OpError> {
        let network = self.network(name)?;
        self.net
            .set_overlay(&network, vni, local, peers)
            .await
            .map_err(|e| OpError::internal("cannot join the network to the other hosts", e))
    }

    pub(in crate::engine) async fn create_network_unlogged(
        &self,
        spec: NetworkSpec,
    ) -> Result<Network, OpError> {
        let _alloc = self.alloc.lock().await;
        self.create_network_locked(spec).await
    }

    pub(super) async fn create_network_locked(
        &self,
        spec: NetworkSpec,
    ) -> Result<Network, OpError> {
        if spec.isolated && spec.nat {
            return Err(OpError::new(
                ErrorCode::InvalidArgument,
                "an isolated network cannot have NAT: its router appliance does that",
            ));
        }
        if spec.isolated && !spec.allow_host.is_empty() {
            return Err(OpError::new(
                ErrorCode::InvalidArgument,
                "an isolated network cannot allow host ports: the host has no address on it",
            ));
        }
        if self.network(spec.name.as_str()).is_ok() {
            return Err(OpError::new(
                ErrorCode::AlreadyExists,
                format!("a network named {:?} already exists", spec.name.as_str()),
            ));
        }
        let host = self.host_addresses().await?;
        let ours = self.list_networks();
        let routes = self.foreign_routes(&ours).await?;
        let subnet = match spec.subnet {
            Some(subnet) => {
                check_subnet_free(subnet, &ours, &host, &routes)?;
                subnet
            }
            None => {
                let taken: Vec<Ipv4Net> = ours
                    .iter()
                    .map(|n| n.subnet)
                    .chain(host.iter().map(|a| a.subnet))
                    .chain(routes.iter().map(|r| r.destination))
                    .collect();
                let pool: Ipv4Net = AUTO_SUBNET_POOL.parse().expect("invariant: valid pool");
                ipam::choose_subnet(pool, &taken).ok_or_else(|| {
                    OpError::new(
                        ErrorCode::ResourceExhausted,
                        format!("no free /24 left in {AUTO_SUBNET_POOL}"),
                    )
                })?
            }
        };
        let network = Network {
            bridge: ipam::bridge_name(
                &self.cfg.iface_prefix,
                &self.cfg.data_dir.display().to_string(),
                spec.name.as_str(),
            ),
            gateway: ipam::gateway(subnet),
            name: spec.name,
            subnet,
            nat: spec.nat,
            isolated: spec.isolated,
            mirror: spec.mirror,
            allow_host: {
                let mut ports = spec.allow_host;
                ports.sort();
                ports.dedup();
                ports
            },
            created_at: now_secs(),
        };
        // Noted before the bridge exists: a daemon killed before the
        // record is written leaves a bridge that recovery knows is its own.
        let pending = self.pending_bridges().join(&network.bridge);
        blocking(|| write_synced(&pending, &network))
            .map_err(|e| OpError::internal("failed to note the new bridge", e))?;
        let created = self.net.create_network(&network).await;
        if created.is_err() {
            let _ = std::fs::remove_file(&pending);
        }
        match created {
            Ok(()) => {}
            // Not ours to roll back: a leftover of another data dir, or someone else's.
            Err(NetworkBackendError::InterfaceExists { name }) => {
                return Err(OpError::conflict(format!(
                    "cannot create network {}: host interface {name} already exists \
                     (left over from a removed vroom data dir?); `vroom gc` lists leftovers, \
                     `ip link delete {name}` removes it",
                    network.name
                )));
            }
            Err(e) => {
                let _ = self.net.delete_network(&network).await;
                return Err(OpError::internal(
                    format!("failed to create network {}", network.name),
                    e,
                ));
            }
        }
        if let Err(e) = blocking(|| self.store.put_network(&network)) {
            let _ = self.net.delete_network(&network).await;
            let _ = std::fs::remove_file(&pending);
            return Err(OpError::internal("failed to save the network", e));
        }
        let _ = std::fs::remove_file(&pending);
        self.networks
            .lock_unpoisoned()
            .insert(network.name.clone(), network.clone());
        tracing::info!(network = %network.name, subnet = %network.subnet, bridge = %network.bridge, "network created");
        Ok(network)
    }

    /// Bridges being made, a file each (the network as JSON), from just
    /// before the bridge is created until its network is on record.
    fn pending_bridges(&self) -> PathBuf {
        self.cfg.data_dir.join("pending-bridges")
    }

    /// Removes the bridges a daemon killed inside [`Engine::create_network`]
    /// left: noted as pending, on no network's record.
    pub(super) async fn sweep_pending_bridges(&self, recorded: &[Network]) {
        let Ok(entries) = std::fs::read_dir(self.pending_bridges()) else {
            return;
        };
        for path in entries.flatten().map(|e| e.path()) {
            let bridge = path.file_name().unwrap_or_default().to_string_lossy();
            if !recorded.iter().any(|n| n.bridge == bridge) {
                let noted: Option<Network> = std::fs::read(&path)
                    .ok()
                    .and_then(|b| serde_json::from_slice(&b).ok());
                if let Some(network) = noted.filter(|n| n.bridge == bridge) {
                    tracing::warn!(network = %network.name, %bridge, "removing the bridge of a network a killed daemon did not finish creating");
                    if let Err(e) = self.net.delete_network(&network).await {
                        tracing::error!(%bridge, error = %e, "cannot remove a half-made network's bridge");
                        continue;
                    }
                }
            }
            let _ = std::fs::remove_file(&path);
        }
    }

    async fn host_addresses(&self) -> Result<Vec<crate::net::HostAddress>, OpError> {
        self.net
            .host_addresses()
            .await
            .map_err(|e| OpError::internal("failed to read host addresses", e))
    }

    /// Refuses a subnet that a network or a host interface already has.
    pub(super) async fn check_subnet_free(&self, subnet: Ipv4Net) -> Result<(), OpError> {
        let host = self.host_addresses().await?;
        let ours = self.list_networks();
        let routes = self.foreign_routes(&ours).await?;
        check_subnet_free(subnet, &ours, &host, &routes)
    }

    /// The host's routes that are not vroom's: the connected routes of its
    /// own bridges are its networks, checked as such; any other route but
    /// the default one is the host's, and a network inside it would take
    /// its traffic.
    async fn foreign_routes(&self, ours: &[Network]) -> Result<Vec<HostRoute>, OpError> {
        Ok(self
            .net
            .host_routes()
            .await
            .map_err(|e| OpError::internal("failed to read host routes", e))?
            .into_iter()
            .filter(|r| !ours.iter().any(|n| n.bridge == r.interface))
            .collect())
    }

    pub(in crate::engine) async fn remove_network_unlogged(
        &self,
        name: &str,
    ) -> Result<(), OpError> {
        let _alloc = self.alloc.lock().await;
        self.remove_network_locked(name).await
    }

    pub(super) async fn remove_network_locked(&self, name: &str) -> Result<(), OpError> {
        let network = self.network(name)?;
        let users: Vec<String> = self
            .list()
            .into_iter()
            .filter(|i| i.nics.iter().any(|n| n.network.as_str() == name))
            .map(|i| i.spec.name.to_string())
            .collect();
        if !users.is_empty() {
            return Err(OpError::conflict(format!(
                "network {name} is used by {}",
                users.join(", ")
            )));
        }
        self.net
            .delete_network(&network)
            .await
            .map_err(|e| OpError::internal(format!("failed to remove network {name}"), e))?;
        self.store
            .delete_network(name)
            .map_err(|e| OpError::internal("failed to delete the network", e))?;
        self.networks.lock_unpoisoned().remove(&network.name);
        Ok(())
    }
}

/// Writes `value` as JSON to `path` (its dir made if needed) and fsyncs it.
fn check_subnet_free(
    subnet: Ipv4Net,
    ours: &[Network],
    host: &[crate::net::HostAddress],
    routes: &[HostRoute],
) -> Result<(), OpError> {
    if let Some(other) = ours.iter().find(|n| ipam::overlaps(n.subnet, subnet)) {
        return Err(OpError::conflict(format!(
            "subnet {subnet} overlaps network {} ({})",
            other.name, other.subnet
        )));
    }
    if let Some(addr) = host.iter().find(|a| ipam::overlaps(a.subnet, subnet)) {
        return Err(OpError::conflict(format!(
            "subnet {subnet} overlaps {} on host interface {}",
            addr.subnet, addr.interface
        )));
    }
    if let Some(route) = routes
        .iter()
        .find(|r| ipam::overlaps(r.destination, subnet))
    {
        return Err(OpError::conflict(format!(
            "subnet {subnet} overlaps the host route {route}; pick another subnet"
        )));
    }
    Ok(())
}

fn write_synced(path: &Path, value: &impl serde::Serialize) -> std::io::Result<()> {
    use std::io::Write;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let mut file = std::fs::File::create(path)?;
    file.write_all(&serde_json::to_vec(value).map_err(std::io::Error::other)?)?;
    file.sync_all()
}

#[cfg(test)]
mod tests {
    use vroom_types::{HostPort, Name, NetworkSpec};

    use crate::testing::TestEngine;

    fn spec(name: &str, isolated: bool, allow_host: &[&str]) -> NetworkSpec {
        NetworkSpec {
            name: Name::new(name).unwrap(),
            subnet: None,
            nat: !isolated,
            isolated,
            mirror: false,
            allow_host: allow_host.iter().map(|p| p.parse().unwrap()).collect(),
        }
    }

    #[tokio::test]
    async fn allowed_host_ports_are_stored_sorted_once() {
        let dir = tempfile::tempdir().unwrap();
        let t = TestEngine::new(dir.path());
        let network = t
            .engine
            .create_network(spec("lan", false, &["8080", "53/udp", "8080/tcp", "22"]))
            .await
            .unwrap();
        let want: Vec<HostPort> = ["22", "53/udp", "8080"]
            .iter()
            .map(|p| p.parse().unwrap())
            .collect();
        assert_eq!(network.allow_host, want);
        use crate::store::StateStore;
        assert_eq!(t.store.networks().unwrap()[0].allow_host, want);
    }

    /// A subnet overlapping a host route (inside it, equal to it, or
    /// around it) is refused, naming the route; vroom's own bridges' routes
    /// and the default route are not in the way, and a chosen subnet avoids
    /// the routes. (subnet, refused with).
    #[tokio::test]
    async fn subnets_overlapping_host_routes_are_refused_table() {
        use crate::net::HostRoute;
        let dir = tempfile::tempdir().unwrap();
        let t = TestEngine::new(dir.path());
        *t.net.routes.lock().unwrap() = vec![
            HostRoute {
                destination: "10.253.220.0/22".parse().unwrap(),
                gateway: Some("10.0.0.1".parse().unwrap()),
                interface: "eth0".into(),
            },
            HostRoute {
                destination: "10.213.0.0/24".parse().unwrap(),
                gateway: None,
                interface: "wg0".into(),
            },
        ];
        let cases: &[(&str, Option<&str>)] = &[
            (
                "10.253.221.0/24",
                Some("subnet 10.253.221.0/24 overlaps the host route 10.253.220.0/22 via 10.0.0.1 dev eth0; pick another subnet"),
            ),
            (
                "10.253.220.0/22",
                Some("overlaps the host route 10.253.220.0/22 via 10.0.0.1 dev eth0"),
            ),
            ("10.252.0.0/14", Some("10.253.220.0/22 via 10.0.0.1 dev eth0")),
            ("10.213.0.128/25", Some("the host route 10.213.0.0/24 dev wg0")),
            ("10.253.224.0/24", None),
            // A network of vroom's own is named as such, not by its
            // bridge's route.
            ("10.253.224.0/24", Some("overlaps network n4 (10.253.224.0/24)")),
        ];
        for (i, (subnet, refused)) in cases.iter().enumerate() {
            let mut spec = spec(&format!("n{i}"), false, &[]);
            spec.subnet = Some(subnet.parse().unwrap());
            let bridges_before = t.net.bridges.lock().unwrap().len();
            match (t.engine.create_network(spec).await, refused) {
                (Ok(_), None) => {}
                (Err(e), Some(want)) => {
                    assert_eq!(e.code, vroom_types::ErrorCode::Conflict, "{subnet}");
                    assert!(e.message.contains(want), "{subnet}: {}", e.message);
                    assert_eq!(t.net.bridges.lock().unwrap().len(), bridges_before);
                    assert!(t.engine.network(&format!("n{i}")).is_err());
                }
                (got, want) => panic!("{subnet}: want {want:?}, got {:?}", got.map(|n| n.subnet)),
            }
        }
        let chosen = t
            .engine
            .create_network(spec("auto", false, &[]))
            .await
            .unwrap();
        assert_eq!(
            chosen.subnet.to_string(),
            "10.213.1.0/24",
            "the routed /24 is skipped"
        );
    }

    #[tokio::test]
    async fn an_isolated_network_allows_no_host_port() {
        let dir = tempfile::tempdir().unwrap();
        let t = TestEngine::new(dir.path());
        let err = t
            .engine
            .create_network(spec("inside", true, &["8080"]))
            .await
            .unwrap_err();
        assert_eq!(err.code, vroom_types::ErrorCode::InvalidArgument);
        assert!(err.message.contains("no address"), "{}", err.message);
        assert!(t.net.bridges.lock().unwrap().is_empty(), "nothing created");
    }

    /// A restarted daemon re-installs every network's firewall, so rules of
    /// an older vroom (which had none) are brought up to date.
    #[tokio::test]
    async fn recovery_reapplies_every_networks_rules() {
        let dir = tempfile::tempdir().unwrap();
        let t = TestEngine::new(dir.path());
        let a = t
            .engine
            .create_network(spec("a", false, &[]))
            .await
            .unwrap();
        let b = t.engine.create_network(spec("b", true, &[])).await.unwrap();
        assert!(t.net.rules_applied.lock().unwrap().is_empty());
        t.restarted().recover().await.unwrap();
        let mut applied = t.net.rules_applied.lock().unwrap().clone();
        applied.sort();
        let mut want = vec![a.bridge, b.bridge];
        want.sort();
        assert_eq!(applied, want);
    }

    /// A daemon killed between making a network's bridge and recording the
    /// network: the next one removes the bridge, and the network can be
    /// made again (a bridge it never noted stays refused: defect 4).
    #[tokio::test]
    async fn recovery_removes_the_bridge_of_a_half_made_network() {
        use crate::store::StateStore;
        let dir = tempfile::tempdir().unwrap();
        let t = TestEngine::new(dir.path());
        let kept = t
            .engine
            .create_network(spec("kept", false, &[]))
            .await
            .unwrap();
        let half = t
            .engine
            .create_network(spec("lan", false, &[]))
            .await
            .unwrap();
        assert!(
            !dir.path()
                .join("pending-bridges")
                .join(&half.bridge)
                .exists(),
            "the note goes once the network is on record"
        );
        // As the killed daemon left it: the bridge and its note, no record;
        // and a note of a network that was recorded just before the kill.
        t.store.delete_network("lan").unwrap();
        for network in [&half, &kept] {
            super::write_synced(
                &dir.path().join("pending-bridges").join(&network.bridge),
                network,
            )
            .unwrap();
        }

        let engine = t.restarted();
        engine.recover().await.unwrap();
        let bridges = t.net.bridges.lock().unwrap().clone();
        assert!(!bridges.contains(&half.bridge), "{bridges:?}");
        assert!(bridges.contains(&kept.bridge), "{bridges:?}");
        let notes = std::fs::read_dir(dir.path().join("pending-bridges"))
            .unwrap()
            .count();
        assert_eq!(notes, 0);
        let again = engine
            .create_network(spec("lan", false, &[]))
            .await
            .unwrap();
        assert_eq!(again.bridge, half.bridge);
    }
}
