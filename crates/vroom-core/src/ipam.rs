//! Address and name allocation: pure functions, no I/O.

use std::net::Ipv4Addr;

use ipnet::Ipv4Net;
use sha2::{Digest, Sha256};
use vroom_types::{Network, ROUTER_ROLES};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AllocateIpError {
    #[error("address {ip} is outside subnet {subnet}")]
    OutsideSubnet { ip: Ipv4Addr, subnet: Ipv4Net },
    #[error("address {ip} is reserved in subnet {subnet} (network, broadcast or gateway)")]
    Reserved { ip: Ipv4Addr, subnet: Ipv4Net },
    #[error("address {ip} is already in use")]
    InUse { ip: Ipv4Addr },
    #[error("subnet {subnet} has no free address left")]
    Exhausted { subnet: Ipv4Net },
}

/// The host's address on a network's bridge: the first usable address.
pub fn gateway(subnet: Ipv4Net) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(subnet.network()) + 1)
}

/// Picks `requested` if it is free and usable, else the lowest free address.
pub fn allocate_ip(
    subnet: Ipv4Net,
    used: &[Ipv4Addr],
    requested: Option<Ipv4Addr>,
) -> Result<Ipv4Addr, AllocateIpError> {
    let reserved =
        |ip: Ipv4Addr| ip == subnet.network() || ip == subnet.broadcast() || ip == gateway(subnet);
    if let Some(ip) = requested {
        if !subnet.contains(&ip) {
            return Err(AllocateIpError::OutsideSubnet { ip, subnet });
        }
        if reserved(ip) {
            return Err(AllocateIpError::Reserved { ip, subnet });
        }
        if used.contains(&ip) {
            return Err(AllocateIpError::InUse { ip });
        }
        return Ok(ip);
    }
    subnet
        .hosts()
        .find(|ip| !reserved(*ip) && !used.contains(ip))
        .ok_or(AllocateIpError::Exhausted { subnet })
}

/// The first /24 in `pool` that overlaps none of `taken`.
pub fn choose_subnet(pool: Ipv4Net, taken: &[Ipv4Net]) -> Option<Ipv4Net> {
    pool.subnets(24)
        .ok()?
        .find(|candidate| !taken.iter().any(|t| overlaps(*candidate, *t)))
}

pub fn overlaps(a: Ipv4Net, b: Ipv4Net) -> bool {
    a.contains(&b.network()) || b.contains(&a.network())
}

fn short_hash(parts: &[&str], len: usize) -> String {
    let mut hasher = Sha256::new();
    for part in parts {
        hasher.update(part.as_bytes());
        hasher.update([0]);
    }
    hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<String>()[..len]
        .to_string()
}

/// Interface names are limited to 15 bytes, so they are derived from hashes:
/// `<prefix>b<8 hex>` for bridges, `<prefix>t<8 hex>` for taps. The bridge hash
/// covers the data dir, so two vroomd with separate data dirs never collide.
pub fn bridge_name(prefix: &str, scope: &str, network: &str) -> String {
    format!("{prefix}b{}", short_hash(&[scope, network], 8))
}

/// The VXLAN device that joins a network's bridge to the same network on
/// other cluster nodes: the bridge's name with `x` in place of its `b`.
pub fn vxlan_name(bridge: &str) -> String {
    match bridge.len().checked_sub(9) {
        Some(at) if bridge.as_bytes()[at] == b'b' => {
            format!("{}x{}", &bridge[..at], &bridge[at + 1..])
        }
        _ => format!("{}x", &bridge[..bridge.len().min(14)]),
    }
}

/// The gateway's MAC on a network that spans cluster nodes: the same on
/// every node's bridge (locally administered, from the VNI), so that a guest
/// that moves between nodes keeps reaching its gateway through the ARP
/// entry it has.
pub fn gateway_mac(vni: u32) -> [u8; 6] {
    let [_, a, b, c] = vni.to_be_bytes();
    [0x02, 0x76, 0x72, a, b, c]
}

pub fn mac_text(mac: [u8; 6]) -> String {
    mac.map(|b| format!("{b:02x}")).join(":")
}

/// Whether a NIC playing `role` for an image with `roles` takes `network`'s
/// gateway address: on an isolated network, a router's inside NIC (`lan` or
/// `dmz` of an image that also has a `wan`) does, unless another address is
/// asked for.
pub fn takes_gateway(
    network: &Network,
    roles: &[String],
    role: Option<&str>,
    requested: Option<Ipv4Addr>,
) -> bool {
    let is_router = roles.iter().any(|r| r == "wan");
    let inside = role.is_some_and(|r| ROUTER_ROLES.contains(&r));
    network.isolated && is_router && inside && requested.is_none_or(|ip| ip == network.gateway)
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AssignRolesError {
    #[error("the image declares no NIC roles, so NIC role {role:?} means nothing")]
    NoRoles { role: String },
    #[error("the image has {count} NIC(s) ({roles}); {given} were given")]
    TooMany {
        count: usize,
        roles: String,
        given: usize,
    },
    #[error("the image has no NIC role {role:?} (its roles: {roles})")]
    Unknown { role: String, roles: String },
    #[error("NIC role {role:?} is given twice")]
    Twice { role: String },
}

/// The role each requested NIC plays: the one it names (which must be one
/// of the image's, once), or else the image's next role not named by any
/// NIC, in the image's order. `None` for every NIC of an image without roles.
pub fn assign_roles(
    requested: &[Option<&str>],
    roles: &[String],
) -> Result<Vec<Option<String>>, AssignRolesError> {
    if roles.is_empty() {
        if let Some(role) = requested.iter().flatten().next() {
            return Err(AssignRolesError::NoRoles {
                role: role.to_string(),
            });
        }
        return Ok(vec![None; requested.len()]);
    }
    if requested.len() > roles.len() {
        return Err(AssignRolesError::TooMany {
            count: roles.len(),
            roles: roles.join(", "),
            given: requested.len(),
        });
    }
    let mut named: Vec<&str> = vec![];
    for role in requested.iter().flatten() {
        if !roles.iter().any(|r| r == role) {
            return Err(AssignRolesError::Unknown {
                role: role.to_string(),
                roles: roles.join(", "),
            });
        }
        if named.contains(role) {
            return Err(AssignRolesError::Twice {
                role: role.to_string(),
            });
        }
        named.push(role);
    }
    let mut free = roles.iter().filter(|r| !named.contains(&r.as_str()));
    Ok(requested
        .iter()
        .map(|role| match role {
            Some(role) => Some(role.to_string()),
            None => free.next().cloned(),
        })
        .collect())
}

/// An nftables wildcard matching every bridge [`bridge_name`] makes with `prefix`.
/// The private bridge of the splice whose appliance is `appliance`: outside
/// [`bridge_glob`], so no network's rules ever match it.
pub fn segment_name(prefix: &str, scope: &str, appliance: &str) -> String {
    format!("{prefix}s{}", short_hash(&[scope, "splice", appliance], 8))
}

pub fn bridge_glob(prefix: &str) -> String {
    format!("{prefix}b*")
}

pub fn tap_name(prefix: &str, instance_id: &str, index: usize) -> String {
    format!(
        "{prefix}t{}",
        short_hash(&[instance_id, &index.to_string()], 8)
    )
}

/// A locally administered unicast MAC in QEMU's 52:54:00 range.
pub fn mac_address(instance_id: &str, index: usize) -> String {
    let h = short_hash(&[instance_id, &index.to_string(), "mac"], 6);
    format!("52:54:00:{}:{}:{}", &h[0..2], &h[2..4], &h[4..6])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_routers_inside_nic_on_an_isolated_network_takes_the_gateway() {
        let network = |isolated| Network {
            name: vroom_types::Name::new("lan").unwrap(),
            subnet: "10.9.0.0/24".parse().unwrap(),
            nat: false,
            isolated,
            mirror: false,
            allow_host: vec![],
            bridge: "vrb1".into(),
            gateway: "10.9.0.1".parse().unwrap(),
            created_at: 0,
        };
        let roles = |r: &[&str]| r.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let fw = roles(&["wan", "lan", "dmz"]);
        let gw = Some("10.9.0.1".parse().unwrap());
        let other = Some("10.9.0.7".parse().unwrap());
        let role = |i: usize| fw.get(i).map(String::as_str);
        assert!(takes_gateway(&network(true), &fw, role(1), None));
        assert!(takes_gateway(&network(true), &fw, role(2), gw));
        assert!(!takes_gateway(&network(true), &fw, role(1), other));
        assert!(
            !takes_gateway(&network(true), &fw, role(0), None),
            "wan is outside"
        );
        assert!(
            !takes_gateway(&network(false), &fw, role(1), None),
            "the host is the gateway"
        );
        assert!(
            !takes_gateway(&network(true), &roles(&["lan"]), Some("lan"), None),
            "a plain lan appliance is no router"
        );
    }

    fn net(s: &str) -> Ipv4Net {
        s.parse().unwrap()
    }
    fn ip(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }

    #[test]
    fn allocation_table() {
        let subnet = net("10.0.0.0/29"); // .1 gateway, .2-.6 usable, .7 broadcast
        type Case = (
            Vec<Ipv4Addr>,
            Option<Ipv4Addr>,
            Result<Ipv4Addr, AllocateIpError>,
        );
        let cases: Vec<Case> = vec![
            (vec![], None, Ok(ip("10.0.0.2"))),
            (
                vec![ip("10.0.0.2"), ip("10.0.0.3")],
                None,
                Ok(ip("10.0.0.4")),
            ),
            (vec![ip("10.0.0.3")], None, Ok(ip("10.0.0.2"))),
            (vec![], Some(ip("10.0.0.5")), Ok(ip("10.0.0.5"))),
            (
                vec![ip("10.0.0.5")],
                Some(ip("10.0.0.5")),
                Err(AllocateIpError::InUse { ip: ip("10.0.0.5") }),
            ),
            (
                vec![],
                Some(ip("10.0.0.1")),
                Err(AllocateIpError::Reserved {
                    ip: ip("10.0.0.1"),
                    subnet,
                }),
            ),
            (
                vec![],
                Some(ip("10.0.0.7")),
                Err(AllocateIpError::Reserved {
                    ip: ip("10.0.0.7"),
                    subnet,
                }),
            ),
            (
                vec![],
                Some(ip("10.0.1.2")),
                Err(AllocateIpError::OutsideSubnet {
                    ip: ip("10.0.1.2"),
                    subnet,
                }),
            ),
            (
                (2..=6).map(|i| ip(&format!("10.0.0.{i}"))).collect(),
                None,
                Err(AllocateIpError::Exhausted { subnet }),
            ),
        ];
        for (used, requested, want) in cases {
            assert_eq!(
                allocate_ip(subnet, &used, requested),
                want,
                "used {used:?} requested {requested:?}"
            );
        }
        assert_eq!(gateway(subnet), ip("10.0.0.1"));
    }

    #[test]
    fn subnet_choice_skips_taken_ranges() {
        let pool = net("10.213.0.0/16");
        assert_eq!(choose_subnet(pool, &[]), Some(net("10.213.0.0/24")));
        assert_eq!(
            choose_subnet(pool, &[net("10.213.0.0/23"), net("10.213.2.128/25")]),
            Some(net("10.213.3.0/24"))
        );
        assert_eq!(choose_subnet(pool, &[net("10.0.0.0/8")]), None);
        assert!(overlaps(net("10.0.0.0/16"), net("10.0.5.0/24")));
        assert!(!overlaps(net("10.0.0.0/24"), net("10.0.1.0/24")));
    }

    #[test]
    fn interface_names_fit_and_differ() {
        let a = bridge_name("vr", "/var/lib/vroom", "default");
        let b = bridge_name("vr", "/tmp/test", "default");
        assert_ne!(a, b);
        assert!(a.len() <= 15 && a.starts_with("vrb"));
        let t = tap_name("vroom", "0123456789abcdef", 3);
        assert!(t.len() <= 15, "{t}");
        assert_ne!(tap_name("vr", "x", 0), tap_name("vr", "x", 1));
        let mac = mac_address("x", 0);
        assert_eq!(mac.len(), 17);
        assert!(mac.starts_with("52:54:00:"));
    }

    #[test]
    fn role_assignment_table() {
        let roles = |r: &[&str]| r.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let fw = roles(&["wan", "lan", "dmz"]);
        let got = |requested: &[Option<&str>], image: &[String]| {
            assign_roles(requested, image).map_err(|e| e.to_string())
        };
        let names = |v: &[&str]| v.iter().map(|s| Some(s.to_string())).collect::<Vec<_>>();
        type Case<'a> = (
            Vec<Option<&'a str>>,
            Vec<String>,
            Result<Vec<Option<String>>, &'a str>,
        );
        let cases: Vec<Case> = vec![
            (vec![None, None], fw.clone(), Ok(names(&["wan", "lan"]))),
            (
                vec![Some("lan"), None],
                fw.clone(),
                Ok(names(&["lan", "wan"])),
            ),
            (
                vec![None, Some("wan"), None],
                fw.clone(),
                Ok(names(&["lan", "wan", "dmz"])),
            ),
            (vec![Some("dmz")], fw.clone(), Ok(names(&["dmz"]))),
            (
                vec![Some("lan"), Some("lan")],
                fw.clone(),
                Err("given twice"),
            ),
            (vec![Some("mgmt")], fw.clone(), Err("no NIC role \"mgmt\"")),
            (vec![None; 4], fw.clone(), Err("has 3 NIC(s)")),
            (vec![None, None], vec![], Ok(vec![None, None])),
            (vec![Some("lan")], vec![], Err("declares no NIC roles")),
        ];
        for (requested, image, want) in cases {
            match (got(&requested, &image), want) {
                (Ok(g), Ok(w)) => assert_eq!(g, w, "{requested:?}"),
                (Err(e), Err(w)) => assert!(e.contains(w), "{requested:?}: {e}"),
                (g, w) => panic!("{requested:?}: got {g:?}, want {w:?}"),
            }
        }
    }

    #[test]
    fn a_vxlan_device_is_named_after_its_bridge() {
        let bridge = bridge_name("ke474", "", "default");
        let vxlan = vxlan_name(&bridge);
        assert_eq!(vxlan.len(), bridge.len());
        assert!(vxlan.starts_with("ke474x") && vxlan.len() <= 15, "{vxlan}");
        assert_eq!(&vxlan[6..], &bridge[6..]);
        assert_ne!(vxlan_name(&bridge_name("ke474", "", "other")), vxlan);
    }
}
