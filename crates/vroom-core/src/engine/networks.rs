//! Networks: bridges with their subnets, NAT and addresses.

use super::*;
use crate::net::NetworkBackendError;

impl Engine {
    pub fn list_networks(&self) -> Vec<Network> {
        self.networks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .cloned()
            .collect()
    }

    pub fn network(&self, name: &str) -> Result<Network, OpError> {
        let map = self.networks.lock().unwrap_or_else(|p| p.into_inner());
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

    pub async fn create_network(&self, spec: NetworkSpec) -> Result<Network, OpError> {
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
        let host = self
            .net
            .host_addresses()
            .await
            .map_err(|e| OpError::internal("failed to read host addresses", e))?;
        let ours = self.list_networks();
        let subnet = match spec.subnet {
            Some(subnet) => {
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
                subnet
            }
            None => {
                let taken: Vec<Ipv4Net> = ours
                    .iter()
                    .map(|n| n.subnet)
                    .chain(host.iter().map(|a| a.subnet))
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
        match self.net.create_network(&network).await {
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
            return Err(OpError::internal("failed to save the network", e));
        }
        self.networks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(network.name.clone(), network.clone());
        tracing::info!(network = %network.name, subnet = %network.subnet, bridge = %network.bridge, "network created");
        Ok(network)
    }

    pub async fn remove_network(&self, name: &str) -> Result<(), OpError> {
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
        self.networks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&network.name);
        Ok(())
    }
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
}
