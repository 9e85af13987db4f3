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
