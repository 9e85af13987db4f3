use std::net::Ipv4Addr;

use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};

use crate::{InvalidInputError, Name};

/// What a user asks for when creating a network.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct NetworkSpec {
    pub name: Name,
    /// An IPv4 subnet between /16 and /29, written as its network address,
    /// outside the loopback, link-local, multicast, reserved (240.0.0.0/4)
    /// and 0.0.0.0/8 ranges; a free one is chosen when absent.
    #[cfg_attr(feature = "openapi", schema(schema_with = subnet_schema))]
    #[serde(default, deserialize_with = "deserialize_subnet")]
    pub subnet: Option<Ipv4Net>,
    /// NAT from this network to the host's uplink; not on an isolated network.
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
    /// Ports on the network's gateway (the host's address on its bridge)
    /// that its guests may reach on the host. By default they reach none:
    /// the host answers only connections it opened itself. Not on an
    /// isolated network, where the host has no address.
    #[serde(default)]
    pub allow_host: Vec<HostPort>,
}

impl NetworkSpec {
    /// A plain bridged network with an automatic subnet: no NAT, not
    /// isolated, no mirror port, no host ports.
    pub fn plain(name: Name) -> Self {
        NetworkSpec {
            name,
            subnet: None,
            nat: false,
            isolated: false,
            mirror: false,
            allow_host: vec![],
        }
    }
}

/// A port on a network's gateway that the network's guests may reach.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct HostPort {
    #[cfg_attr(feature = "openapi", schema(minimum = 1, maximum = 65535))]
    #[serde(deserialize_with = "deserialize_port")]
    pub port: u16,
    /// TCP when absent.
    #[serde(default)]
    pub protocol: Protocol,
}

/// The transport protocol of a host port.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    #[default]
    Tcp,
    Udp,
}

impl Protocol {
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
        }
    }
}

fn deserialize_port<'de, D>(deserializer: D) -> Result<u16, D::Error>
where
    D: serde::Deserializer<'de>,
{
    // `8080.0` is the same JSON integer as `8080`.
    let port: u64 = crate::json_int::required(deserializer)?;
    check_port(&port.to_string(), port).map_err(serde::de::Error::custom)
}

fn check_port(raw: &str, port: u64) -> Result<u16, InvalidInputError> {
    u16::try_from(port)
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| InvalidInputError::HostPort {
            raw: raw.to_string(),
            reason: "the port must be between 1 and 65535",
        })
}

impl std::fmt::Display for HostPort {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.port, self.protocol.as_str())
    }
}

impl std::str::FromStr for HostPort {
    type Err = InvalidInputError;

    /// `PORT`, `PORT/tcp` or `PORT/udp`, as `--allow-host` takes it.
    fn from_str(raw: &str) -> Result<Self, Self::Err> {
        let invalid = |reason| InvalidInputError::HostPort {
            raw: raw.to_string(),
            reason,
        };
        let (port, protocol) = match raw.split_once('/') {
            None => (raw, Protocol::Tcp),
            Some((port, "tcp")) => (port, Protocol::Tcp),
            Some((port, "udp")) => (port, Protocol::Udp),
            Some(_) => return Err(invalid("the protocol must be tcp or udp")),
        };
        if port.is_empty() || !port.bytes().all(|b| b.is_ascii_digit()) || port.len() > 5 {
            return Err(invalid("use PORT, PORT/tcp or PORT/udp, e.g. 8080"));
        }
        let port = check_port(raw, port.parse().expect("invariant: 1 to 5 digits"))?;
        Ok(HostPort { port, protocol })
    }
}

/// The NIC role that receives a copy of a network's traffic.
pub const MIRROR_ROLE: &str = "mirror-sink";

/// The inside NIC roles of a router appliance (one that also has a `wan`):
/// on an isolated network it routes for the network they sit on.
pub const ROUTER_ROLES: &[&str] = &["lan", "dmz"];

/// A network as created on the host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Network {
    pub name: Name,
    #[cfg_attr(feature = "openapi", schema(value_type = String))]
    pub subnet: Ipv4Net,
    pub nat: bool,
    #[serde(default)]
    pub isolated: bool,
    #[serde(default)]
    pub mirror: bool,
    /// Ports on the gateway the guests may reach on the host, sorted, each
    /// once; every other packet from a guest to the host is dropped.
    #[serde(default)]
    pub allow_host: Vec<HostPort>,
    /// The host bridge.
    pub bridge: String,
    /// The guests' default gateway: the host's address on the bridge, or on
    /// an isolated network the address its router appliance takes.
    #[cfg_attr(feature = "openapi", schema(value_type = String))]
    pub gateway: Ipv4Addr,
    pub created_at: u64,
}

/// [`parse_subnet`]'s rule as a regular expression, for the API document:
/// the network address of a /16 to /29 (host bits clear, no leading zeros)
/// outside the refused ranges. Spelled out number by number because a
/// generated client (and a fuzzer) must be able to produce only valid ones.
pub fn subnet_pattern() -> &'static str {
    static PATTERN: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    PATTERN.get_or_init(|| {
        let alt = |nums: Vec<u32>| {
            let nums: Vec<String> = nums.iter().map(u32::to_string).collect();
            format!("({})", nums.join("|"))
        };
        let any = "(25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])";
        let not_254 = "(25[0-35]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])";
        let first = alt((1..=223).filter(|o| *o != 127 && *o != 169).collect());
        let multiples = |step: u32| alt((0..256).step_by(step as usize).collect());
        let mut tails = vec!["0\\.0/16".to_string()];
        for prefix in 17..=23u32 {
            tails.push(format!("{}\\.0/{prefix}", multiples(1 << (24 - prefix))));
        }
        tails.push(format!("{any}\\.0/24"));
        for prefix in 25..=29u32 {
            tails.push(format!(
                "{any}\\.{}/{prefix}",
                multiples(1 << (32 - prefix))
            ));
        }
        format!(
            "^({first}\\.{any}|169\\.{not_254})\\.({})$",
            tails.join("|")
        )
    })
}

#[cfg(feature = "openapi")]
pub(crate) fn subnet_schema() -> utoipa::openapi::schema::Object {
    use utoipa::openapi::schema::{ObjectBuilder, SchemaType, Type};
    ObjectBuilder::new()
        .schema_type(SchemaType::from_iter([Type::String, Type::Null]))
        .pattern(Some(subnet_pattern()))
        .examples(["10.90.0.0/24"])
        .build()
}

pub(crate) fn deserialize_subnet<'de, D>(deserializer: D) -> Result<Option<Ipv4Net>, D::Error>
where
    D: serde::Deserializer<'de>,
{
    match Option::<String>::deserialize(deserializer)? {
        Some(raw) => parse_subnet(&raw)
            .map(Some)
            .map_err(serde::de::Error::custom),
        None => Ok(None),
    }
}

/// Parses and checks a subnet: IPv4, /16 to /29, written as its network
/// address, and not in a range that a host cannot route as a LAN.
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
    if net.to_string() != raw {
        return Err(invalid(
            "write it plainly, e.g. 10.90.0.0/24 (no leading zeros)",
        ));
    }
    // Every refused block is /16 or wider and the subnet is /16 or narrower,
    // so the subnet lies inside a block exactly when its first address does.
    let addr = net.network();
    let refused = if addr.is_loopback() {
        Some("127.0.0.0/8 is loopback")
    } else if addr.octets()[0] == 0 {
        Some("0.0.0.0/8 means \"this network\" and cannot be routed")
    } else if addr.is_link_local() {
        Some("169.254.0.0/16 is link-local (it holds the cloud metadata address)")
    } else if addr.is_multicast() {
        Some("224.0.0.0/4 is multicast")
    } else if addr.octets()[0] >= 240 {
        Some("240.0.0.0/4 is reserved (and holds the broadcast address)")
    } else {
        None
    };
    match refused {
        Some(reason) => Err(invalid(reason)),
        None => Ok(net),
    }
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
            ("169.254.0.0/16", false),
            ("169.254.169.0/24", false),
            ("169.253.0.0/16", true),
            ("240.0.0.0/24", false),
            ("255.255.255.248/29", false),
            ("239.255.255.248/29", false),
            ("224.0.0.0/24", false),
            ("223.255.255.0/24", true),
            ("0.0.0.0/16", false),
            ("0.255.0.0/16", false),
            ("1.0.0.0/16", true),
            ("127.255.0.0/16", false),
            ("128.0.0.0/16", true),
            ("172.16.0.0/12", false),
        ];
        for (raw, ok) in cases {
            assert_eq!(parse_subnet(raw).is_ok(), *ok, "subnet {raw:?}");
        }
    }

    /// The document's pattern admits exactly what `parse_subnet` accepts.
    #[test]
    fn subnet_pattern_agrees_with_parse_subnet() {
        let pattern = regex::Regex::new(subnet_pattern()).unwrap();
        let mut checked = 0;
        for a in [
            0, 1, 10, 126, 127, 128, 168, 169, 170, 192, 223, 224, 239, 240, 255,
        ] {
            for b in [0, 1, 253, 254, 255] {
                for c in [0, 1, 2, 4, 8, 16, 32, 64, 96, 128, 254, 255] {
                    for d in [0, 1, 4, 8, 16, 24, 128, 248, 255] {
                        for prefix in 14..=30 {
                            let raw = format!("{a}.{b}.{c}.{d}/{prefix}");
                            assert_eq!(pattern.is_match(&raw), parse_subnet(&raw).is_ok(), "{raw}");
                            checked += 1;
                        }
                    }
                }
            }
        }
        assert!(checked > 10_000);
        for raw in [
            "01.0.0.0/24",
            "10.90.0.0/024",
            "10.90.0/24",
            " 10.90.0.0/24",
            "10.90.0.0",
        ] {
            assert!(!pattern.is_match(raw), "{raw}");
            assert!(parse_subnet(raw).is_err(), "{raw}");
        }
    }

    #[cfg(feature = "openapi")]
    #[test]
    fn the_document_states_the_subnet_rule() {
        use utoipa::PartialSchema;
        let schema = serde_json::to_value(NetworkSpec::schema()).unwrap();
        assert_eq!(schema["properties"]["subnet"]["pattern"], subnet_pattern());
    }

    #[test]
    fn host_ports_table() {
        let cases: &[(&str, Option<(u16, Protocol)>)] = &[
            ("8080", Some((8080, Protocol::Tcp))),
            ("8080/tcp", Some((8080, Protocol::Tcp))),
            ("53/udp", Some((53, Protocol::Udp))),
            ("1", Some((1, Protocol::Tcp))),
            ("65535/udp", Some((65535, Protocol::Udp))),
            ("0", None),
            ("65536", None),
            ("99999999999999999999", None),
            ("-1", None),
            ("+80", None),
            ("80/sctp", None),
            ("80/", None),
            ("/tcp", None),
            ("", None),
            ("http", None),
            (" 80", None),
        ];
        for (raw, want) in cases {
            let got = raw.parse::<HostPort>().ok().map(|p| (p.port, p.protocol));
            assert_eq!(got, *want, "host port {raw:?}");
        }
        let port: HostPort = "53/udp".parse().unwrap();
        assert_eq!(port.to_string(), "53/udp");
        assert_eq!(port.to_string().parse::<HostPort>().unwrap(), port);
    }

    #[test]
    fn host_ports_in_specs_are_checked() {
        let spec = |ports: &str| {
            serde_json::from_str::<NetworkSpec>(&format!(
                r#"{{"name":"lan","nat":true,"allow_host":{ports}}}"#
            ))
        };
        let ok = spec(r#"[{"port":8080.0},{"port":53,"protocol":"udp"}]"#).unwrap();
        assert_eq!(
            ok.allow_host,
            vec![
                HostPort {
                    port: 8080,
                    protocol: Protocol::Tcp
                },
                HostPort {
                    port: 53,
                    protocol: Protocol::Udp
                }
            ]
        );
        for bad in [
            r#"[{"port":0}]"#,
            r#"[{"port":65536}]"#,
            r#"[{"port":-1}]"#,
            r#"[{"port":80.5}]"#,
            r#"[{"port":80,"protocol":"icmp"}]"#,
            r#"[{"port":80,"extra":1}]"#,
            r#"["80"]"#,
        ] {
            assert!(spec(bad).is_err(), "{bad}");
        }
        // Absent means none: specs and stored networks from before the field.
        let old = r#"{"name":"lan","nat":true}"#;
        assert!(serde_json::from_str::<NetworkSpec>(old)
            .unwrap()
            .allow_host
            .is_empty());
    }

    #[test]
    fn network_specs_are_strict() {
        let ok = r#"{"name":"lan","subnet":"10.90.0.0/24","nat":true}"#;
        assert!(serde_json::from_str::<NetworkSpec>(ok).is_ok());
        let no_subnet = r#"{"name":"lan","nat":true}"#;
        assert_eq!(
            serde_json::from_str::<NetworkSpec>(no_subnet)
                .unwrap()
                .subnet,
            None
        );
        for bad in [
            r#"{"name":"lan","subnet":"169.254.0.0/16","nat":true}"#,
            r#"{"name":"lan","subnet":"10.90.0.1/24","nat":true}"#,
            r#"{"name":"lan","nat":true,"bogus":1}"#,
        ] {
            assert!(serde_json::from_str::<NetworkSpec>(bad).is_err(), "{bad}");
        }
    }
}
