use std::net::Ipv4Addr;

use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};

use crate::{InvalidInputError, Name};

/// What a user asks for when creating a network.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct NetworkSpec {
    pub name: Name,
    /// An IPv4 subnet between /16 and /29; a free one is chosen when absent.
    #[schema(value_type = Option<String>, example = "10.90.0.0/24")]
    pub subnet: Option<Ipv4Net>,
    /// NAT from this network to the host's uplink.
    pub nat: bool,
    /// The host takes no address on it and does not route it: a router
    /// appliance (one with a `wan` NIC) whose `lan` or `dmz` NIC is on it
    /// becomes its gateway.
    #[serde(default)]
    pub isolated: bool,
    /// Every frame goes to every port (the bridge learns no addresses), so a
    /// sniffer's `mirror-sink` NIC on it sees all of the network's traffic.
    #[serde(default)]
    pub mirror: bool,
}

/// The NIC role that receives a copy of a network's traffic.
pub const MIRROR_ROLE: &str = "mirror-sink";

/// The inside NIC roles of a router appliance (one that also has a `wan`):
/// on an isolated network it routes for the network they sit on.
pub const ROUTER_ROLES: &[&str] = &["lan", "dmz"];

/// A network as created on the host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Network {
    pub name: Name,
    #[schema(value_type = String)]
    pub subnet: Ipv4Net,
    pub nat: bool,
    #[serde(default)]
    pub isolated: bool,
    #[serde(default)]
    pub mirror: bool,
    /// The host bridge.
    pub bridge: String,
    /// The guests' default gateway: the host's address on the bridge, or on
    /// an isolated network the address its router appliance takes.
    #[schema(value_type = String)]
    pub gateway: Ipv4Addr,
    pub created_at: u64,
}

/// Parses and checks a subnet: IPv4, /16 to /29, written as its network address.
pub fn parse_subnet(raw: &str) -> Result<Ipv4Net, InvalidInputError> {
    let invalid = |reason| InvalidInputError::Subnet {
        raw: raw.to_string(),
        reason,
    };
    let net: Ipv4Net = raw
        .parse()
        .map_err(|_| invalid("use an IPv4 CIDR such as 10.90.0.0/24"))?;
    if !(16..=29).contains(&net.prefix_len()) {
        return Err(invalid("the prefix length must be between 16 and 29"));
    }
    if net.network() != net.addr() {
        return Err(invalid("host bits are set; write the network address"));
    }
    if net.addr().is_loopback() || net.addr().is_multicast() || net.addr().is_unspecified() {
        return Err(invalid(
            "loopback, multicast and 0.0.0.0 ranges cannot be used",
        ));
    }
    Ok(net)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subnets_table() {
        let cases: &[(&str, bool)] = &[
            ("10.90.0.0/24", true),
            ("192.168.7.0/29", true),
            ("10.0.0.0/16", true),
            ("10.0.0.0/8", false),
            ("10.90.0.1/24", false),
            ("10.90.0.0/30", false),
            ("127.0.0.0/24", false),
            ("fd00::/64", false),
            ("nonsense", false),
        ];
        for (raw, ok) in cases {
            assert_eq!(parse_subnet(raw).is_ok(), *ok, "subnet {raw:?}");
        }
    }
}
