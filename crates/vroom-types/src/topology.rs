//! What is wired to what: networks, instances with their NIC roles and
//! addresses, splices, mirrors, rooms and their exposed ports; as JSON, as
//! text for people and as a Graphviz graph.

use std::fmt::Write;

use serde::{Deserialize, Serialize};

use crate::{Instance, InstanceState, Mirror, Network, Room, Splice};

/// One NIC in the topology.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct TopologyNic {
    pub network: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<String>,
    /// Absent on an L2 port.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip: Option<String>,
}

/// One instance in the topology.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct TopologyInstance {
    pub name: String,
    pub image: String,
    pub state: InstanceState,
    pub nics: Vec<TopologyNic>,
}

/// The answer of `GET /v1/topology`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Topology {
    pub rooms: Vec<Room>,
    pub networks: Vec<Network>,
    pub instances: Vec<TopologyInstance>,
    pub splices: Vec<Splice>,
    pub mirrors: Vec<Mirror>,
}

impl Topology {
    /// Everything, or (with `room`) one room: its networks, firewall,
    /// members, and the splices and mirrors that touch them.
    pub fn build(
        rooms: Vec<Room>,
        networks: Vec<Network>,
        instances: Vec<Instance>,
        splices: Vec<Splice>,
        mirrors: Vec<Mirror>,
        room: Option<&Room>,
    ) -> Topology {
        let keep_net = |n: &str| match room {
            None => true,
            Some(r) => [&r.lan, &r.dmz, &r.wan].iter().any(|x| x.as_str() == n),
        };
        let keep_instance = |i: &Instance| match room {
            None => true,
            Some(r) => {
                i.spec.name == r.firewall
                    || i.nics
                        .iter()
                        .any(|n| n.network == r.lan || n.network == r.dmz)
            }
        };
        let instances: Vec<TopologyInstance> = instances
            .iter()
            .filter(|i| keep_instance(i))
            .map(|i| TopologyInstance {
                name: i.spec.name.to_string(),
                image: i.image_name.clone(),
                state: i.status.state,
                nics: i
                    .nics
                    .iter()
                    .map(|n| TopologyNic {
                        network: n.network.to_string(),
                        role: n.role.clone(),
                        ip: n.ip.map(|ip| ip.to_string()),
                    })
                    .collect(),
            })
            .collect();
        let has = |name: &str| instances.iter().any(|i| i.name == name);
        Topology {
            rooms: rooms
                .into_iter()
                .filter(|r| room.is_none_or(|want| want.name == r.name))
                .collect(),
            networks: networks
                .into_iter()
                .filter(|n| keep_net(n.name.as_str()))
                .collect(),
            splices: splices.into_iter().filter(|s| has(s.vm.as_str())).collect(),
            mirrors: mirrors.into_iter().filter(|m| has(m.vm.as_str())).collect(),
            instances,
        }
    }

    fn kind(n: &Network) -> &'static str {
        if n.mirror {
            "mirror"
        } else if n.isolated {
            "isolated"
        } else if n.nat {
            "nat"
        } else {
            "host-only"
        }
    }

    /// A tree for people: networks and their members, then splices,
    /// mirrors and rooms.
    pub fn to_text(&self) -> String {
        let mut out = String::new();
        for n in &self.networks {
            let _ = writeln!(
                out,
                "network {} {} ({}, bridge {})",
                n.name,
                n.subnet,
                Self::kind(n),
                n.bridge
            );
            for i in &self.instances {
                for nic in i.nics.iter().filter(|nic| nic.network == n.name.as_str()) {
                    let _ = writeln!(
                        out,
                        "  {} {}{} [{}]",
                        i.name,
                        nic.role
                            .as_deref()
                            .map(|r| format!("{r} "))
                            .unwrap_or_default(),
                        nic.ip.as_deref().unwrap_or("l2"),
                        i.state
                    );
                }
            }
        }
        for s in &self.splices {
            let _ = writeln!(
                out,
                "splice {} in front of {}:{} on {} ({}, fails {})",
                s.appliance, s.vm, s.nic, s.network, s.state, s.fail
            );
        }
        for m in &self.mirrors {
            let _ = writeln!(
                out,
                "mirror {}:{} -> {}:{}{}",
                m.vm,
                m.nic,
                m.to,
                m.to_nic,
                m.filter
                    .as_deref()
                    .map(|f| format!(" ({f})"))
                    .unwrap_or_default()
            );
        }
        for r in &self.rooms {
            let _ = writeln!(
                out,
                "room {}: firewall {} (wan {}), lan {}, dmz {}, domain {}",
                r.name, r.firewall, r.wan, r.lan, r.dmz, r.domain
            );
            for e in &r.exposes {
                let _ = writeln!(
                    out,
                    "  expose {}/{} -> {}:{}",
                    e.proto.as_str(),
                    e.port,
                    e.to,
                    e.to_port
                );
            }
        }
        out
    }

    /// A Graphviz graph: networks are boxes, instances ellipses, NICs edges
    /// (labelled with role and address), splices bold red edges, mirrors
    /// dashed edges, rooms clusters.
    pub fn to_dot(&self) -> String {
        let q = |s: &str| format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""));
        let mut out = String::from("graph vroom {\n  rankdir=LR;\n  node [fontname=\"sans\"];\n");
        for r in &self.rooms {
            let _ = writeln!(
                out,
                "  subgraph {} {{\n    label={};\n    style=rounded;",
                q(&format!("cluster_{}", r.name)),
                q(&format!("room {} ({})", r.name, r.domain))
            );
            for n in [&r.lan, &r.dmz] {
                let _ = writeln!(out, "    {};", q(&format!("net:{n}")));
            }
            let _ = writeln!(out, "    {};", q(&format!("vm:{}", r.firewall)));
            out.push_str("  }\n");
        }
        for n in &self.networks {
            let _ = writeln!(
                out,
                "  {} [shape=box, label={}];",
                q(&format!("net:{}", n.name)),
                q(&format!("{}\\n{} {}", n.name, n.subnet, Self::kind(n)))
            );
        }
        for i in &self.instances {
            let _ = writeln!(
                out,
                "  {} [label={}];",
                q(&format!("vm:{}", i.name)),
                q(&format!("{}\\n{} [{}]", i.name, i.image, i.state))
            );
            for nic in &i.nics {
                let label = format!(
                    "{}{}",
                    nic.role
                        .as_deref()
                        .map(|r| format!("{r} "))
                        .unwrap_or_default(),
                    nic.ip.as_deref().unwrap_or("l2")
                );
                let _ = writeln!(
                    out,
                    "  {} -- {} [label={}];",
                    q(&format!("vm:{}", i.name)),
                    q(&format!("net:{}", nic.network)),
                    q(&label)
                );
            }
        }
        for s in &self.splices {
            let _ = writeln!(
                out,
                "  {} -- {} [color=red, penwidth=2, label={}];",
                q(&format!("vm:{}", s.appliance)),
                q(&format!("vm:{}", s.vm)),
                q(&format!("splice ({})", s.state))
            );
        }
        for m in &self.mirrors {
            let _ = writeln!(
                out,
                "  {} -- {} [style=dashed, label=\"mirror\"];",
                q(&format!("vm:{}", m.vm)),
                q(&format!("vm:{}", m.to))
            );
        }
        for r in &self.rooms {
            for e in &r.exposes {
                let _ = writeln!(
                    out,
                    "  {} -- {} [style=dotted, label={}];",
                    q(&format!("vm:{}", r.firewall)),
                    q(&format!("vm:{}", e.to)),
                    q(&format!("{}/{} -> {}", e.proto.as_str(), e.port, e.to_port))
                );
            }
        }
        out.push_str("}\n");
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Name, Protocol};

    fn network(name: &str, isolated: bool) -> Network {
        Network {
            name: Name::new(name).unwrap(),
            subnet: "10.0.0.0/24".parse().unwrap(),
            nat: !isolated,
            isolated,
            mirror: false,
            allow_host: vec![],
            bridge: format!("br{name}"),
            gateway: "10.0.0.1".parse().unwrap(),
            created_at: 0,
        }
    }

    fn room() -> Room {
        Room {
            name: Name::new("acme").unwrap(),
            wan: Name::new("default").unwrap(),
            lan: Name::new("acme-lan").unwrap(),
            dmz: Name::new("acme-dmz").unwrap(),
            firewall: Name::new("acme-fw").unwrap(),
            domain: "acme.lan".into(),
            exposes: vec![crate::Expose {
                port: 8080,
                proto: Protocol::Tcp,
                to: Name::new("web1").unwrap(),
                to_port: 80,
            }],
            state: crate::RoomState::Ready,
            created_at: 0,
        }
    }

    #[test]
    fn a_room_filter_keeps_its_networks_and_renders() {
        let nets = vec![
            network("default", false),
            network("acme-lan", true),
            network("acme-dmz", true),
            network("other", false),
        ];
        let t = Topology::build(vec![room()], nets, vec![], vec![], vec![], Some(&room()));
        let names: Vec<&str> = t.networks.iter().map(|n| n.name.as_str()).collect();
        assert_eq!(names, ["default", "acme-lan", "acme-dmz"]);
        let text = t.to_text();
        assert!(
            text.contains("network acme-dmz 10.0.0.0/24 (isolated"),
            "{text}"
        );
        assert!(text.contains("expose tcp/8080 -> web1:80"), "{text}");
        let dot = t.to_dot();
        assert!(dot.starts_with("graph vroom {"), "{dot}");
        assert!(dot.contains("subgraph \"cluster_acme\""), "{dot}");
        assert!(dot.contains("\"vm:acme-fw\" -- \"vm:web1\""), "{dot}");
        assert!(dot.trim_end().ends_with('}'));
    }

    #[test]
    fn dot_quotes_what_it_is_given() {
        let mut r = room();
        r.domain = "a\"b".into();
        let t = Topology::build(vec![r], vec![], vec![], vec![], vec![], None);
        assert!(t.to_dot().contains("a\\\"b"), "{}", t.to_dot());
    }
}
