//! The host network seam: bridges, taps, isolation and NAT.

use async_trait::async_trait;
use ipnet::Ipv4Net;
use vroom_types::Network;

#[derive(Debug, thiserror::Error)]
pub enum NetworkBackendError {
    /// A host interface already has the name vroom wanted; it is not vroom's
    /// to remove, so nothing may roll it back.
    #[error("host interface {name} already exists")]
    InterfaceExists { name: String },
    /// The interface is not there (a tap whose VMM has exited).
    #[error("host interface {name} does not exist")]
    NoSuchInterface { name: String },
    #[error("failed to {action}: {reason}")]
    Failed { action: String, reason: String },
}

/// Where a copy of a tap's traffic goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MirrorTarget {
    /// The capture NIC's tap.
    pub tap: String,
    /// Classic BPF as `tc ... bpf bytecode` takes it (from
    /// [`NetworkBackend::compile_filter`]); every frame when absent.
    pub filter: Option<String>,
}

/// An address configured on a host interface.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostAddress {
    pub interface: String,
    pub subnet: Ipv4Net,
}

/// A route of the host's main IPv4 table (not the default route).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostRoute {
    pub destination: Ipv4Net,
    pub gateway: Option<std::net::Ipv4Addr>,
    /// The interface it leaves by; empty when the route has none (a
    /// blackhole, or several next hops).
    pub interface: String,
}

impl std::fmt::Display for HostRoute {
    /// As `ip route` shows it: `10.0.0.0/22 via 10.0.0.1 dev eth0`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.destination)?;
        if let Some(gateway) = self.gateway {
            write!(f, " via {gateway}")?;
        }
        if !self.interface.is_empty() {
            write!(f, " dev {}", self.interface)?;
        }
        Ok(())
    }
}

#[async_trait]
pub trait NetworkBackend: Send + Sync {
    /// Creates the bridge with the gateway address, brings it up and installs
    /// its firewall (isolation from the host and other networks, NAT if asked).
    async fn create_network(&self, network: &Network) -> Result<(), NetworkBackendError>;
    /// Replaces a network's firewall with the one its record asks for, in one
    /// step: at daemon start, so that the rules of an older vroom (or rules
    /// flushed by someone else) are brought up to date.
    async fn apply_rules(&self, network: &Network) -> Result<(), NetworkBackendError>;
    /// Removes the bridge and its NAT rules; missing pieces are not an error.
    async fn delete_network(&self, network: &Network) -> Result<(), NetworkBackendError>;
    /// Enslaves a tap to a bridge and brings it up.
    async fn attach_tap(&self, tap: &str, bridge: &str) -> Result<(), NetworkBackendError>;
    /// Puts a running VM's tap on `bridge`, or on no bridge, and brings it
    /// up, without waiting: [`NetworkBackendError::NoSuchInterface`] when
    /// the tap is gone. A tap already there is left as it is.
    async fn move_tap(&self, tap: &str, bridge: Option<&str>) -> Result<(), NetworkBackendError>;
    /// Creates a splice segment: a bridge with no address and no rules (the
    /// host has no address on it, so nothing is routed to or from it). One
    /// that exists already is kept.
    async fn create_segment(&self, bridge: &str) -> Result<(), NetworkBackendError>;
    /// Removes a splice segment; a missing one is not an error.
    async fn delete_segment(&self, bridge: &str) -> Result<(), NetworkBackendError>;
    /// Replaces where copies of a tap's traffic, both directions, go; no
    /// targets removes the mirroring.
    async fn set_mirrors(
        &self,
        tap: &str,
        targets: &[MirrorTarget],
    ) -> Result<(), NetworkBackendError>;
    /// Compiles a pcap-filter expression for Ethernet frames; the error
    /// says what is wrong with it.
    async fn compile_filter(&self, expr: &str) -> Result<String, NetworkBackendError>;
    /// Joins a network's bridge to the same network on other hosts: a VXLAN
    /// device (`ipam::vxlan_name`, VNI `vni`, from `local`) on the bridge,
    /// flooding to `peers`. ARP for the gateway address does not cross it, so
    /// every host stays its own guests' gateway. Idempotent.
    async fn set_overlay(
        &self,
        network: &Network,
        vni: u32,
        local: std::net::Ipv4Addr,
        peers: &[std::net::Ipv4Addr],
    ) -> Result<(), NetworkBackendError>;
    /// Every IPv4 subnet configured on the host, to keep new networks from colliding.
    async fn host_addresses(&self) -> Result<Vec<HostAddress>, NetworkBackendError>;
    /// The unicast routes of the host's main IPv4 table but the default
    /// route: a network inside one would take its traffic (or be
    /// unreachable).
    async fn host_routes(&self) -> Result<Vec<HostRoute>, NetworkBackendError>;
}
