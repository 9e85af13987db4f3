//! Where every tap belongs: the pure rule that turns instances, networks
//! and splices into "tap T is a port of bridge B (or of none)".
//!
//! The engine never moves a tap by any other rule: after a splice, an
//! unsplice, an appliance failing or coming back, a VM or appliance
//! relaunching, or a daemon restart, it computes the wiring again and
//! moves only the taps whose bridge differs. A state is therefore always
//! repairable from the records alone.
//!
//! Splices in front of one NIC form a chain, ordered by `seq` (lowest is
//! closest to the network):
//!
//! ```text
//! network bridge ─ outside[A1]inside ─ seg(A1) ─ outside[A2]inside ─ seg(A2) ─ VM tap
//! ```
//!
//! A splice out of the path (starting, bypassed, being removed) is skipped:
//! its neighbours join directly, its `outside` NIC is detached, and its
//! `inside` NIC waits on its own (empty) segment. A fail-closed splice whose
//! appliance is down stays in the chain with its `outside` NIC detached, so
//! the path is cut there.

use std::collections::BTreeMap;

use vroom_types::{Instance, Network, Splice, SpliceState, INSIDE_ROLE, MIRROR_ROLE, OUTSIDE_ROLE};

/// Each tap of every instance, with the bridge it belongs on (`None`:
/// attached to no bridge).
pub fn wiring(
    instances: &[Instance],
    networks: &[Network],
    splices: &[Splice],
) -> BTreeMap<String, Option<String>> {
    let bridge_of = |network: &str| {
        networks
            .iter()
            .find(|n| n.name.as_str() == network)
            .map(|n| n.bridge.clone())
    };
    let by_name = |name: &str| instances.iter().find(|i| i.spec.name.as_str() == name);
    let role_tap = |instance: &Instance, role: &str| {
        instance
            .nics
            .iter()
            .find(|n| n.role.as_deref() == Some(role))
            .map(|n| n.tap.clone())
    };

    let mut out = BTreeMap::new();
    for instance in instances {
        let outside_net = instance
            .nics
            .iter()
            .find(|n| n.role.as_deref() == Some(OUTSIDE_ROLE))
            .map(|n| n.network.clone());
        for nic in &instance.nics {
            let bridge = match nic.role.as_deref() {
                // A capture sink is fed by its mirror network's flooding,
                // or by `vroom mirror` through tc: on any other network it
                // is a member in name only, and stays off its bridge.
                Some(MIRROR_ROLE) => networks
                    .iter()
                    .find(|n| n.name == nic.network && n.mirror)
                    .map(|n| n.bridge.clone()),
                // Both sides of a bump in the wire on one bridge would be
                // a loop through the guest's own bridge: the inside waits
                // for a splice.
                Some(INSIDE_ROLE) if outside_net.as_ref() == Some(&nic.network) => None,
                // An unspliced bump in the wire is off the wire.
                Some(OUTSIDE_ROLE)
                    if outside_net.as_ref() == Some(&nic.network) && {
                        instance.nics.iter().any(|n| {
                            n.role.as_deref() == Some(INSIDE_ROLE) && n.network == nic.network
                        })
                    } =>
                {
                    None
                }
                _ => bridge_of(nic.network.as_str()),
            };
            out.insert(nic.tap.clone(), bridge);
        }
    }

    // Chains, one per spliced NIC, in stacking order.
    let mut chains: BTreeMap<(String, usize), Vec<&Splice>> = BTreeMap::new();
    for splice in splices {
        chains
            .entry((splice.vm.to_string(), splice.nic))
            .or_default()
            .push(splice);
    }
    for ((vm, nic), mut chain) in chains {
        chain.sort_by_key(|s| s.seq);
        let Some(vm) = by_name(&vm) else { continue };
        let Some(vm_nic) = vm.nics.get(nic) else {
            continue;
        };
        let mut upstream = bridge_of(vm_nic.network.as_str());
        for splice in chain {
            let appliance = by_name(splice.appliance.as_str());
            let outside = appliance.and_then(|a| role_tap(a, OUTSIDE_ROLE));
            let inside = appliance.and_then(|a| role_tap(a, INSIDE_ROLE));
            let (outside_to, inside_to) = match splice.state {
                SpliceState::Active => {
                    let wired = (upstream.clone(), Some(splice.segment.clone()));
                    upstream = Some(splice.segment.clone());
                    wired
                }
                SpliceState::Cut => {
                    upstream = Some(splice.segment.clone());
                    (None, Some(splice.segment.clone()))
                }
                SpliceState::Starting | SpliceState::Bypassed => {
                    (None, Some(splice.segment.clone()))
                }
                SpliceState::Removing => (None, None),
            };
            if let Some(tap) = outside {
                out.insert(tap, outside_to);
            }
            if let Some(tap) = inside {
                out.insert(tap, inside_to);
            }
        }
        out.insert(vm_nic.tap.clone(), upstream);
    }
    out
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use vroom_types::{
        AccelChoice, DesiredState, FailMode, InstanceSpec, InstanceStatus, Name, NicStatus,
    };

    use super::*;

    fn network(name: &str, mirror: bool) -> Network {
        Network {
            name: Name::new(name).unwrap(),
            subnet: "10.0.0.0/24".parse().unwrap(),
            nat: false,
            isolated: false,
            mirror,
            allow_host: vec![],
            bridge: format!("br-{name}"),
            gateway: Ipv4Addr::new(10, 0, 0, 1),
            created_at: 0,
        }
    }

    fn instance(name: &str, nics: &[(&str, Option<&str>)]) -> Instance {
        Instance {
            id: name.into(),
            spec: InstanceSpec {
                name: Name::new(name).unwrap(),
                image: "x".into(),
                mem_mib: None,
                cpus: 1,
                nics: vec![],
                accel: AccelChoice::Auto,
                config_volume_kib: None,
                ephemeral: false,
                volumes: Vec::new(),
            },
            image_id: "x".into(),
            image_name: "x".into(),
            mem_mib: 128,
            created_at: 0,
            desired: DesiredState::Running,
            nics: nics
                .iter()
                .enumerate()
                .map(|(i, (net, role))| NicStatus {
                    network: Name::new(net).unwrap(),
                    ip: None,
                    prefix_len: 24,
                    gateway: Ipv4Addr::new(10, 0, 0, 1),
                    mac: String::new(),
                    tap: format!("{name}{i}"),
                    role: role.map(String::from),
                })
                .collect(),
            status: InstanceStatus::stopped(),
            config: Default::default(),
            node: None,
            health: None,
        }
    }

    fn bump(name: &str, net: &str) -> Instance {
        instance(name, &[(net, Some("outside")), (net, Some("inside"))])
    }

    fn splice(appliance: &str, seq: u64, state: SpliceState) -> Splice {
        Splice {
            appliance: Name::new(appliance).unwrap(),
            vm: Name::new("web").unwrap(),
            nic: 0,
            network: Name::new("lan").unwrap(),
            segment: format!("seg-{appliance}"),
            fail: FailMode::Closed,
            owned: true,
            seq,
            state,
            created_at: 0,
            events: vec![],
        }
    }

    fn at<'a>(w: &'a BTreeMap<String, Option<String>>, tap: &str) -> Option<&'a str> {
        w.get(tap)
            .unwrap_or_else(|| panic!("{tap} wired"))
            .as_deref()
    }

    #[test]
    fn without_splices_every_nic_is_on_its_network_and_bumps_are_off_the_wire() {
        let nets = [network("lan", false), network("span", true)];
        let insts = [
            instance("web", &[("lan", None)]),
            bump("fw", "lan"),
            instance("snf", &[("lan", Some("mirror-sink"))]),
            instance("tap", &[("span", Some("mirror-sink"))]),
        ];
        let w = wiring(&insts, &nets, &[]);
        assert_eq!(at(&w, "web0"), Some("br-lan"));
        assert_eq!(at(&w, "fw0"), None, "an unspliced bump's outside");
        assert_eq!(at(&w, "fw1"), None, "and inside would loop");
        assert_eq!(at(&w, "snf0"), None, "a sink off a mirror network");
        assert_eq!(
            at(&w, "tap0"),
            Some("br-span"),
            "a sink on a mirror network"
        );
    }

    #[test]
    fn a_bump_between_two_networks_is_wired_to_both() {
        let nets = [network("a", false), network("b", false)];
        let insts = [instance(
            "fw",
            &[("a", Some("outside")), ("b", Some("inside"))],
        )];
        let w = wiring(&insts, &nets, &[]);
        assert_eq!(at(&w, "fw0"), Some("br-a"));
        assert_eq!(at(&w, "fw1"), Some("br-b"));
    }

    #[test]
    fn one_active_splice_puts_the_appliance_between_vm_and_network() {
        let nets = [network("lan", false)];
        let insts = [instance("web", &[("lan", None)]), bump("fw", "lan")];
        let w = wiring(&insts, &nets, &[splice("fw", 1, SpliceState::Active)]);
        assert_eq!(at(&w, "fw0"), Some("br-lan"));
        assert_eq!(at(&w, "fw1"), Some("seg-fw"));
        assert_eq!(at(&w, "web0"), Some("seg-fw"));
    }

    #[test]
    fn states_out_of_the_path_leave_the_vm_on_its_network() {
        let nets = [network("lan", false)];
        let insts = [instance("web", &[("lan", None)]), bump("fw", "lan")];
        for state in [
            SpliceState::Starting,
            SpliceState::Bypassed,
            SpliceState::Removing,
        ] {
            let w = wiring(&insts, &nets, &[splice("fw", 1, state)]);
            assert_eq!(at(&w, "web0"), Some("br-lan"), "{state}");
            assert_eq!(at(&w, "fw0"), None, "{state}: outside detached");
        }
    }

    #[test]
    fn a_cut_splice_keeps_the_vm_behind_it_with_the_outside_detached() {
        let nets = [network("lan", false)];
        let insts = [instance("web", &[("lan", None)]), bump("fw", "lan")];
        let w = wiring(&insts, &nets, &[splice("fw", 1, SpliceState::Cut)]);
        assert_eq!(at(&w, "web0"), Some("seg-fw"));
        assert_eq!(at(&w, "fw0"), None);
    }

    #[test]
    fn stacked_splices_chain_and_a_missing_middle_closes_the_gap() {
        let nets = [network("lan", false)];
        let insts = [
            instance("web", &[("lan", None)]),
            bump("fw", "lan"),
            bump("snf", "lan"),
        ];
        let both = [
            splice("fw", 1, SpliceState::Active),
            splice("snf", 2, SpliceState::Active),
        ];
        let w = wiring(&insts, &nets, &both);
        assert_eq!(at(&w, "fw0"), Some("br-lan"));
        assert_eq!(at(&w, "fw1"), Some("seg-fw"));
        assert_eq!(at(&w, "snf0"), Some("seg-fw"));
        assert_eq!(at(&w, "snf1"), Some("seg-snf"));
        assert_eq!(at(&w, "web0"), Some("seg-snf"));

        // The outer one leaves: the sniffer's outside moves up to the network.
        let w = wiring(
            &insts,
            &nets,
            &[splice("fw", 1, SpliceState::Removing), both[1].clone()],
        );
        assert_eq!(at(&w, "snf0"), Some("br-lan"));
        assert_eq!(at(&w, "web0"), Some("seg-snf"));
        assert_eq!(at(&w, "fw0"), None);

        // The inner one is bypassed: the VM joins the firewall's segment.
        let w = wiring(
            &insts,
            &nets,
            &[both[0].clone(), splice("snf", 2, SpliceState::Bypassed)],
        );
        assert_eq!(at(&w, "web0"), Some("seg-fw"));
        assert_eq!(at(&w, "snf0"), None);
    }
}
