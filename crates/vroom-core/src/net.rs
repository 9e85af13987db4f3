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
    #[error("failed to {action}: {reason}")]
    Failed { action: String, reason: String },
}

/// An address configured on a host interface.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostAddress {
    pub interface: String,
    pub subnet: Ipv4Net,
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
    /// Every IPv4 subnet configured on the host, to keep new networks from colliding.
    async fn host_addresses(&self) -> Result<Vec<HostAddress>, NetworkBackendError>;
}
