//! Host networking for vroom: one Linux bridge per network, created and wired
//! over rtnetlink; taps (created by the VMM) enslaved to their bridge; NAT to
//! the host's uplink as one nftables table per network, through `nft`, the
//! standard tool for it.

use std::net::IpAddr;
use std::process::Stdio;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use futures::TryStreamExt;
use ipnet::Ipv4Net;
use netlink_packet_route::address::AddressAttribute;
use netlink_packet_route::link::{InfoBridge, InfoData, InfoKind, LinkAttribute, LinkInfo};
use rtnetlink::Handle;
use vroom_core::net::{HostAddress, NetworkBackend, NetworkBackendError};
use vroom_types::Network;

pub struct NetlinkNetwork {
    handle: Handle,
    /// Matches all of this vroom's bridges (see [`vroom_core::ipam::bridge_glob`]).
    bridge_glob: String,
}

impl NetlinkNetwork {
    /// Opens a netlink connection; must be called inside a tokio runtime.
    pub fn new(bridge_glob: String) -> std::io::Result<Self> {
        let (connection, handle, _) = rtnetlink::new_connection()?;
        tokio::spawn(connection);
        Ok(NetlinkNetwork {
            handle,
            bridge_glob,
        })
    }

    async fn link_index(&self, name: &str) -> Option<u32> {
        let mut links = self
            .handle
            .link()
            .get()
            .match_name(name.to_string())
            .execute();
        links
            .try_next()
            .await
            .ok()
            .flatten()
            .map(|l| l.header.index)
    }
}

fn fail(action: impl Into<String>) -> impl FnOnce(rtnetlink::Error) -> NetworkBackendError {
    let action = action.into();
    move |e| NetworkBackendError::Failed {
        action,
        reason: e.to_string(),
    }
}

/// The nftables table that holds a network's NAT rule.
pub fn nat_table(network: &Network) -> String {
    format!("vroom_{}", network.bridge)
}

/// Masquerades what the network's guests send out of the host. Traffic that
/// leaves through one of vroom's own bridges is left alone: with br_netfilter
/// loaded, packets a router appliance forwards between two vroom networks
/// pass this hook too, and must keep their addresses.
pub fn nat_ruleset(network: &Network, bridge_glob: &str) -> String {
    format!(
        "table ip {table} {{\n  chain postrouting {{\n    type nat hook postrouting priority srcnat; policy accept;\n    ip saddr {subnet} ip daddr != {subnet} oifname != \"{bridge_glob}\" masquerade\n  }}\n}}\n",
        table = nat_table(network),
        subnet = network.subnet,
    )
}

/// Runs an nft script, as a child process awaited without blocking the runtime.
async fn nft(script: &str) -> Result<(), String> {
    use tokio::io::AsyncWriteExt;
    let mut child = tokio::process::Command::new("nft")
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| format!("cannot run nft: {e}"))?;
    let mut stdin = child.stdin.take().expect("invariant: piped stdin");
    stdin
        .write_all(script.as_bytes())
        .await
        .map_err(|e| e.to_string())?;
    drop(stdin);
    let out = child.wait_with_output().await.map_err(|e| e.to_string())?;
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr)
            .lines()
            .next()
            .unwrap_or("nft failed")
            .to_string());
    }
    Ok(())
}

#[async_trait]
impl NetworkBackend for NetlinkNetwork {
    async fn create_network(&self, network: &Network) -> Result<(), NetworkBackendError> {
        let bridge = &network.bridge;
        if self.link_index(bridge).await.is_some() {
            return Err(NetworkBackendError::InterfaceExists {
                name: bridge.clone(),
            });
        }
        let mut add = self.handle.link().add().name(bridge.clone());
        let mut options = vec![];
        if network.mirror {
            // No learning: every frame is flooded to every port, like a hub.
            options.push(InfoBridge::AgeingTime(0));
        }
        add.message_mut()
            .attributes
            .push(LinkAttribute::LinkInfo(vec![
                LinkInfo::Kind(InfoKind::Bridge),
                LinkInfo::Data(InfoData::Bridge(options)),
            ]));
        add.execute()
            .await
            .map_err(fail(format!("create bridge {bridge}")))?;
        let index = self
            .link_index(bridge)
            .await
            .ok_or_else(|| NetworkBackendError::Failed {
                action: format!("create bridge {bridge}"),
                reason: "it vanished after creation".into(),
            })?;
        if !network.isolated {
            self.handle
                .address()
                .add(
                    index,
                    IpAddr::V4(network.gateway),
                    network.subnet.prefix_len(),
                )
                .execute()
                .await
                .map_err(fail(format!("add {} to {bridge}", network.gateway)))?;
        }
        self.handle
            .link()
            .set(index)
            .up()
            .execute()
            .await
            .map_err(fail(format!("bring up {bridge}")))?;
        if network.nat {
            std::fs::write("/proc/sys/net/ipv4/ip_forward", "1").map_err(|e| {
                NetworkBackendError::Failed {
                    action: "enable IPv4 forwarding".into(),
                    reason: e.to_string(),
                }
            })?;
            nft(&nat_ruleset(network, &self.bridge_glob))
                .await
                .map_err(|reason| NetworkBackendError::Failed {
                    action: format!("add NAT for {}", network.name),
                    reason,
                })?;
        }
        Ok(())
    }

    async fn delete_network(&self, network: &Network) -> Result<(), NetworkBackendError> {
        if network.nat {
            // Deleting a table that is not there fails; only a present one matters.
            let _ = nft(&format!("delete table ip {}\n", nat_table(network))).await;
        }
        if let Some(index) = self.link_index(&network.bridge).await {
            self.handle
                .link()
                .del(index)
                .execute()
                .await
                .map_err(fail(format!("delete bridge {}", network.bridge)))?;
        }
        Ok(())
    }

    async fn attach_tap(&self, tap: &str, bridge: &str) -> Result<(), NetworkBackendError> {
        let bridge_index =
            self.link_index(bridge)
                .await
                .ok_or_else(|| NetworkBackendError::Failed {
                    action: format!("attach {tap}"),
                    reason: format!(
                        "bridge {bridge} does not exist (was it deleted outside vroom?)"
                    ),
                })?;
        let deadline = Instant::now() + Duration::from_secs(3);
        let tap_index = loop {
            if let Some(index) = self.link_index(tap).await {
                break index;
            }
            if Instant::now() > deadline {
                return Err(NetworkBackendError::Failed {
                    action: format!("attach {tap}"),
                    reason: "the tap does not exist".into(),
                });
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        self.handle
            .link()
            .set(tap_index)
            .controller(bridge_index)
            .up()
            .execute()
            .await
            .map_err(fail(format!("attach {tap} to {bridge}")))
    }

    async fn host_addresses(&self) -> Result<Vec<HostAddress>, NetworkBackendError> {
        let mut names = std::collections::HashMap::new();
        let mut links = self.handle.link().get().execute();
        while let Some(link) = links.try_next().await.map_err(fail("list links"))? {
            for attr in link.attributes {
                if let LinkAttribute::IfName(name) = attr {
                    names.insert(link.header.index, name);
                }
            }
        }
        let mut out = Vec::new();
        let mut addresses = self.handle.address().get().execute();
        while let Some(msg) = addresses.try_next().await.map_err(fail("list addresses"))? {
            let addr = msg.attributes.iter().find_map(|a| match a {
                AddressAttribute::Local(IpAddr::V4(ip))
                | AddressAttribute::Address(IpAddr::V4(ip)) => Some(*ip),
                _ => None,
            });
            if let Some(ip) = addr {
                if let Ok(net) = Ipv4Net::new(ip, msg.header.prefix_len) {
                    let interface = names.get(&msg.header.index).cloned().unwrap_or_default();
                    out.push(HostAddress {
                        interface,
                        subnet: net.trunc(),
                    });
                }
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vroom_types::Name;

    #[test]
    fn nat_ruleset_masquerades_only_leaving_traffic() {
        let network = Network {
            name: Name::new("lan").unwrap(),
            subnet: "10.9.0.0/24".parse().unwrap(),
            nat: true,
            isolated: false,
            mirror: false,
            bridge: "vrb12345678".into(),
            gateway: "10.9.0.1".parse().unwrap(),
            created_at: 0,
        };
        let rules = nat_ruleset(&network, "vrb*");
        assert!(rules.starts_with("table ip vroom_vrb12345678 {"));
        assert!(rules.contains(
            "ip saddr 10.9.0.0/24 ip daddr != 10.9.0.0/24 oifname != \"vrb*\" masquerade"
        ));
        assert!(rules.contains("type nat hook postrouting priority srcnat"));
    }
}
