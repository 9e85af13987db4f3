//! What is wired to what: networks, instances with their NIC roles and
//! addresses, splices, mirrors, rooms and their exposed ports; as JSON, as
//! text for people and as a Graphviz graph.

use std::fmt::Write;

use serde::{Deserialize, Serialize};

use crate::{Instance, InstanceState, Mirror, Network, Room, Splice};

/// One NIC in the topology.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct TopologyNic {
    pub network: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<String>,
    /// Absent on an L2 port.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip: Option<String>,
}

/// One instance in the topology.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct TopologyInstance {
    pub name: String,
    pub image: String,
    pub state: InstanceState,
    pub nics: Vec<TopologyNic>,
}

/// The answer of `GET /v1/topology`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
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

    /// How a NIC is labelled: `ROLE ADDRESS`, the role being the room
    /// segment of a room network (see [`crate::nic_label`]).
    fn nic_text(&self, nic: &TopologyNic) -> String {
        format!(
            "{}{}",
            crate::nic_label(&self.rooms, &nic.network, nic.role.as_deref())
                .map(|r| format!("{r} "))
                .unwrap_or_default(),
            nic.ip.as_deref().unwrap_or("l2")
        )
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
                    let _ = writeln!(out, "  {} {} [{}]", i.name, self.nic_text(nic), i.state);
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

    /// The room an instance is drawn in: the one whose firewall it is, or
    /// the first whose lan or dmz it has a NIC on.
    fn room_of(&self, i: &TopologyInstance) -> Option<&Room> {
        self.rooms.iter().find(|r| {
            r.firewall.as_str() == i.name
                || i.nics.iter().any(|n| r.segment_of(&n.network).is_some())
        })
    }

    /// A Graphviz graph: networks are boxes, instances ellipses, NICs edges
    /// (labelled with role and address), rooms clusters holding their
    /// networks, firewall and members. A spliced NIC is drawn as the path
    /// its frames take, network -- appliance(s) -- VM, in bold red; mirrors
    /// are dashed edges, exposes dotted ones.
    pub fn to_dot(&self) -> String {
        let mut out = String::from(
            "graph vroom {\n  rankdir=LR;\n  fontname=\"sans\";\n  node [fontname=\"sans\"];\n  edge [fontname=\"sans\", fontsize=10];\n",
        );
        let net_node = |n: &Network| {
            format!(
                "{} [shape=box, label={}];",
                dot_id("net", n.name.as_str()),
                dot_label(&[n.name.as_str(), &format!("{} {}", n.subnet, Self::kind(n))])
            )
        };
        let vm_node = |i: &TopologyInstance| {
            format!(
                "{} [label={}];",
                dot_id("vm", &i.name),
                dot_label(&[&i.name, &format!("{} [{}]", i.image, i.state)])
            )
        };
        for r in &self.rooms {
            let _ = writeln!(
                out,
                "  subgraph {} {{\n    label={};\n    style=rounded;",
                dot_quote(&format!("cluster_{}", r.name)),
                dot_label(&[&format!("room {} ({})", r.name, r.domain)])
            );
            for n in self
                .networks
                .iter()
                .filter(|n| r.segment_of(n.name.as_str()).is_some())
            {
                let _ = writeln!(out, "    {}", net_node(n));
            }
            for i in &self.instances {
                if self.room_of(i).is_some_and(|of| of.name == r.name) {
                    let _ = writeln!(out, "    {}", vm_node(i));
                }
            }
            out.push_str("  }\n");
        }
        let in_a_room = |n: &str| self.rooms.iter().any(|r| r.segment_of(n).is_some());
        for n in self.networks.iter().filter(|n| !in_a_room(n.name.as_str())) {
            let _ = writeln!(out, "  {}", net_node(n));
        }
        for i in self.instances.iter().filter(|i| self.room_of(i).is_none()) {
            let _ = writeln!(out, "  {}", vm_node(i));
        }
        // A spliced NIC's frames go network -> appliances (lowest seq
        // first) -> VM: those edges replace the VM's own and the
        // appliances' NICs on that network.
        let spliced_nic = |vm: &str, index: usize| {
            self.splices
                .iter()
                .any(|s| s.vm.as_str() == vm && s.nic == index)
        };
        let splice_port = |appliance: &str, network: &str| {
            self.splices
                .iter()
                .any(|s| s.appliance.as_str() == appliance && s.network.as_str() == network)
        };
        for i in &self.instances {
            for (index, nic) in i.nics.iter().enumerate() {
                if spliced_nic(&i.name, index) || splice_port(&i.name, &nic.network) {
                    continue;
                }
                let _ = writeln!(
                    out,
                    "  {} -- {} [label={}];",
                    dot_id("vm", &i.name),
                    dot_id("net", &nic.network),
                    dot_label(&[&self.nic_text(nic)])
                );
            }
        }
        let mut paths: Vec<(&str, usize)> = self
            .splices
            .iter()
            .map(|s| (s.vm.as_str(), s.nic))
            .collect();
        paths.sort();
        paths.dedup();
        for (vm, index) in paths {
            let mut chain: Vec<&Splice> = self
                .splices
                .iter()
                .filter(|s| s.vm.as_str() == vm && s.nic == index)
                .collect();
            chain.sort_by_key(|s| s.seq);
            let mut from = dot_id("net", chain[0].network.as_str());
            for s in &chain {
                let to = dot_id("vm", s.appliance.as_str());
                let _ = writeln!(
                    out,
                    "  {from} -- {to} [color=red, penwidth=2, label={}];",
                    dot_label(&[&format!("splice ({}, fails {})", s.state, s.fail)])
                );
                from = to;
            }
            let label = self
                .instances
                .iter()
                .find(|i| i.name == vm)
                .and_then(|i| i.nics.get(index))
                .map(|nic| self.nic_text(nic))
                .unwrap_or_else(|| format!("NIC {index}"));
            let _ = writeln!(
                out,
                "  {from} -- {} [color=red, penwidth=2, label={}];",
                dot_id("vm", vm),
                dot_label(&[&label])
            );
        }
        for m in &self.mirrors {
            let _ = writeln!(
                out,
                "  {} -- {} [style=dashed, label=\"mirror\"];",
                dot_id("vm", m.vm.as_str()),
                dot_id("vm", m.to.as_str())
            );
        }
        for r in &self.rooms {
            for e in &r.exposes {
                let _ = writeln!(
                    out,
                    "  {} -- {} [style=dotted, label={}];",
                    dot_id("vm", r.firewall.as_str()),
                    dot_id("vm", e.to.as_str()),
                    dot_label(&[&format!("{}/{} -> {}", e.proto.as_str(), e.port, e.to_port)])
                );
            }
        }
        out.push_str("}\n");
        out
    }
}

/// A DOT string: quoted, with `"` and `\` escaped (so nothing a name or a
/// domain holds can end it or start an escape sequence).
fn dot_quote(s: &str) -> String {
    format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""))
}

/// A node's id: `net:NAME` or `vm:NAME`, quoted.
fn dot_id(kind: &str, name: &str) -> String {
    dot_quote(&format!("{kind}:{name}"))
}

/// A label of one or more lines, each escaped, joined by DOT's own line
/// break (`\n`, written as those two characters after escaping).
fn dot_label(lines: &[&str]) -> String {
    let escaped: Vec<String> = lines
        .iter()
        .map(|l| {
            let q = dot_quote(l);
            q[1..q.len() - 1].to_string()
        })
        .collect();
    format!("\"{}\"", escaped.join("\\n"))
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

    fn vm(name: &str, nics: &[(&str, Option<&str>, Option<&str>)]) -> TopologyInstance {
        TopologyInstance {
            name: name.into(),
            image: "img".into(),
            state: InstanceState::Running,
            nics: nics
                .iter()
                .map(|(network, role, ip)| TopologyNic {
                    network: network.to_string(),
                    role: role.map(String::from),
                    ip: ip.map(String::from),
                })
                .collect(),
        }
    }

    fn splice(appliance: &str, vm: &str, seq: u64) -> Splice {
        Splice {
            appliance: Name::new(appliance).unwrap(),
            vm: Name::new(vm).unwrap(),
            nic: 0,
            network: Name::new("acme-dmz").unwrap(),
            segment: "seg".into(),
            fail: crate::FailMode::Open,
            owned: true,
            seq,
            state: crate::SpliceState::Active,
            created_at: 0,
            events: vec![],
        }
    }

    /// The lines of the cluster subgraph of room `room`.
    fn cluster<'a>(dot: &'a str, room: &str) -> &'a str {
        let start = dot
            .find(&format!("subgraph \"cluster_{room}\" {{"))
            .unwrap_or_else(|| panic!("no cluster for {room}: {dot}"));
        let end = start + dot[start..].find("\n  }\n").unwrap();
        &dot[start..end]
    }

    /// The Graphviz renderer, case by case: what each drawing holds, what
    /// it must not, and what its room's box holds.
    #[test]
    fn dot_draws_labels_rooms_and_splice_paths() {
        let nets = || {
            vec![
                network("default", false),
                network("acme-lan", true),
                network("acme-dmz", true),
            ]
        };
        let firewall = vm(
            "acme-fw",
            &[
                ("default", Some("wan"), Some("10.0.0.2")),
                ("acme-lan", Some("lan"), Some("10.0.0.1")),
                ("acme-dmz", Some("dmz"), Some("10.0.0.1")),
            ],
        );
        // An image whose one NIC role is `lan`, in the dmz.
        let web = vm("web1", &[("acme-dmz", Some("lan"), Some("10.0.0.5"))]);
        let outsider = vm("other", &[("default", None, Some("10.0.0.9"))]);
        let sniffer = |name: &str| {
            vm(
                name,
                &[
                    ("acme-dmz", Some("outside"), None),
                    ("acme-dmz", Some("inside"), None),
                ],
            )
        };
        struct Case {
            what: &'static str,
            instances: Vec<TopologyInstance>,
            splices: Vec<Splice>,
            has: Vec<&'static str>,
            lacks: Vec<&'static str>,
            in_room: Vec<&'static str>,
            out_of_room: Vec<&'static str>,
        }
        let cases = [
            Case {
                what: "labels break lines with DOT's \\n, never a literal backslash",
                instances: vec![firewall.clone()],
                splices: vec![],
                has: vec![
                    r#"label="acme-lan\n10.0.0.0/24 isolated""#,
                    r#"label="acme-fw\nimg [running]""#,
                ],
                lacks: vec![r"\\n"],
                in_room: vec![],
                out_of_room: vec![],
            },
            Case {
                what: "members and firewall are drawn in their room's box",
                instances: vec![firewall.clone(), web.clone(), outsider.clone()],
                splices: vec![],
                has: vec![],
                lacks: vec![],
                in_room: vec![
                    r#""vm:acme-fw" [label="#,
                    r#""vm:web1" [label="#,
                    r#""net:acme-lan" [shape=box"#,
                    r#""net:acme-dmz" [shape=box"#,
                ],
                out_of_room: vec![r#""vm:other" [label="#, r#""net:default" [shape=box"#],
            },
            Case {
                what: "a dmz instance is labelled dmz, whatever its image calls the NIC",
                instances: vec![web.clone()],
                splices: vec![],
                has: vec![r#""vm:web1" -- "net:acme-dmz" [label="dmz 10.0.0.5"];"#],
                lacks: vec!["lan 10.0.0.5"],
                in_room: vec![],
                out_of_room: vec![],
            },
            Case {
                what: "a spliced VM is drawn network -- appliance -- VM",
                instances: vec![web.clone(), sniffer("snf")],
                splices: vec![splice("snf", "web1", 1)],
                has: vec![
                    r#""net:acme-dmz" -- "vm:snf" [color=red, penwidth=2, label="splice (active, fails open)"];"#,
                    r#""vm:snf" -- "vm:web1" [color=red, penwidth=2, label="dmz 10.0.0.5"];"#,
                ],
                lacks: vec![
                    r#""vm:web1" -- "net:acme-dmz""#,
                    r#""vm:snf" -- "net:acme-dmz""#,
                ],
                in_room: vec![r#""vm:snf" [label="#],
                out_of_room: vec![],
            },
            Case {
                what: "stacked splices are a path in their order, nearest the network first",
                instances: vec![web.clone(), sniffer("a2"), sniffer("a1")],
                splices: vec![splice("a2", "web1", 7), splice("a1", "web1", 3)],
                has: vec![
                    r#""net:acme-dmz" -- "vm:a1" [color=red"#,
                    r#""vm:a1" -- "vm:a2" [color=red"#,
                    r#""vm:a2" -- "vm:web1" [color=red"#,
                ],
                lacks: vec![r#""net:acme-dmz" -- "vm:a2""#, r#""vm:a1" -- "vm:web1""#],
                in_room: vec![],
                out_of_room: vec![],
            },
        ];
        for case in cases {
            let t = Topology {
                rooms: vec![room()],
                networks: nets(),
                instances: case.instances,
                splices: case.splices,
                mirrors: vec![],
            };
            let dot = t.to_dot();
            let boxed = cluster(&dot, "acme");
            for want in &case.has {
                assert!(dot.contains(want), "{}: no {want} in\n{dot}", case.what);
            }
            for unwanted in &case.lacks {
                assert!(
                    !dot.contains(unwanted),
                    "{}: {unwanted} in\n{dot}",
                    case.what
                );
            }
            for want in &case.in_room {
                assert!(
                    boxed.contains(want),
                    "{}: {want} not in the room's box\n{dot}",
                    case.what
                );
            }
            for want in &case.out_of_room {
                assert!(
                    dot.contains(want) && !boxed.contains(want),
                    "{}: {want}\n{dot}",
                    case.what
                );
            }
        }
    }
}
