//! Placement: which node runs an instance. Pure, so it is tested alone.
//!
//! A candidate is ready (alive, not cordoned) and has the memory free (its
//! total minus what its instances and this round's placements take). Among
//! candidates the scheduler prefers, in order: the requested node (the only
//! candidate then), for `ha none` the instance's home, the fewest members
//! of the instance's spread group, the most free memory, the name.
//!
//! A drain is planned here too ([`plan_drain`]): where each instance of the
//! drained node goes, and which ones no node can take (a drain refuses, or
//! with `--force` leaves them running where they are).

use std::collections::BTreeMap;
use std::fmt;

use vroom_types::HaPolicy;

/// How a node stands for placement.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NodeState {
    /// Alive and not cordoned: it takes instances.
    Ready,
    Cordoned,
    /// Cordoned, and its instances are being moved off.
    Draining,
    /// Its lease is gone.
    Lost,
}

impl fmt::Display for NodeState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            NodeState::Ready => "ready",
            NodeState::Cordoned => "cordoned",
            NodeState::Draining => "draining",
            NodeState::Lost => "down",
        })
    }
}

/// A node as the scheduler sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    pub name: String,
    pub state: NodeState,
    pub mem_free_mib: u64,
    /// How many instances of each spread group it runs.
    pub spread: BTreeMap<String, u32>,
}

/// An instance waiting for a node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pending {
    pub name: String,
    pub mem_mib: u64,
    pub spread: Option<String>,
    /// Only this node will do.
    pub node: Option<String>,
    /// Nodes it must not go to (e.g. the one being drained).
    pub avoid: Vec<String>,
}

/// Host memory a VMM needs beyond its guest's (QEMU itself, TCG's cache).
pub const VMM_OVERHEAD_MIB: u64 = 96;

/// Places what fits; an instance no node can take is left out (it waits).
pub fn place(nodes: &[Candidate], pending: &[Pending]) -> Vec<(String, String)> {
    place_into(&mut nodes.to_vec(), pending)
}

/// [`place`], taking each placement's memory and spread off `nodes`.
fn place_into(nodes: &mut [Candidate], pending: &[Pending]) -> Vec<(String, String)> {
    let mut placed = vec![];
    for want in pending {
        let need = want.mem_mib + VMM_OVERHEAD_MIB;
        let best = nodes
            .iter_mut()
            .filter(|n| n.state == NodeState::Ready && n.mem_free_mib >= need)
            .filter(|n| !want.avoid.contains(&n.name))
            .filter(|n| want.node.as_ref().is_none_or(|only| *only == n.name))
            .min_by(|a, b| {
                let group = |n: &Candidate| {
                    want.spread
                        .as_ref()
                        .and_then(|g| n.spread.get(g))
                        .copied()
                        .unwrap_or(0)
                };
                group(a)
                    .cmp(&group(b))
                    .then(b.mem_free_mib.cmp(&a.mem_free_mib))
                    .then(a.name.cmp(&b.name))
            });
        if let Some(node) = best {
            node.mem_free_mib -= need;
            if let Some(group) = &want.spread {
                *node.spread.entry(group.clone()).or_default() += 1;
            }
            placed.push((want.name.clone(), node.name.clone()));
        }
    }
    placed
}

/// An instance owned by a node being drained.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resident {
    /// Its placement needs (`avoid` holds the drained node).
    pub pending: Pending,
    pub ha: HaPolicy,
    /// The user wants it running: it needs a node to go to. One that is
    /// stopped on purpose is only given up (it is placed when started).
    pub wants_running: bool,
}

/// Why no node can take an instance off a drained node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Stuck {
    /// Every other node is cordoned, draining or down (or there is none).
    NoReadyNode,
    /// Ready nodes exist, but none has the memory free.
    NoRoom { need_mib: u64, most_free_mib: u64 },
}

/// What a drain of one node would do.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DrainPlan {
    /// (instance, node it goes to).
    pub moves: Vec<(String, String)>,
    /// Instances stopped on purpose: given up, nothing to move.
    pub released: Vec<String>,
    /// Instances no node can take, and why: a drain refuses, or with
    /// `--force` leaves them running where they are.
    pub stuck: Vec<(String, HaPolicy, Stuck)>,
}

/// Plans the drain of node `from`: each resident that wants to run gets a
/// node as the scheduler would place it (the placements use memory up in
/// turn), or is stuck with the reason.
pub fn plan_drain(nodes: &[Candidate], from: &str, residents: &[Resident]) -> DrainPlan {
    let mut plan = DrainPlan::default();
    let mut nodes: Vec<Candidate> = nodes.to_vec();
    for resident in residents {
        let name = &resident.pending.name;
        if !resident.wants_running {
            plan.released.push(name.clone());
            continue;
        }
        let mut want = resident.pending.clone();
        if !want.avoid.iter().any(|n| n == from) {
            want.avoid.push(from.to_string());
        }
        let Some((_, to)) = place_into(&mut nodes, std::slice::from_ref(&want)).pop() else {
            let ready: Vec<&Candidate> = nodes
                .iter()
                .filter(|n| n.state == NodeState::Ready && !want.avoid.contains(&n.name))
                .collect();
            let why = match ready.iter().map(|n| n.mem_free_mib).max() {
                None => Stuck::NoReadyNode,
                Some(most_free_mib) => Stuck::NoRoom {
                    need_mib: want.mem_mib + VMM_OVERHEAD_MIB,
                    most_free_mib,
                },
            };
            plan.stuck.push((name.clone(), resident.ha, why));
            continue;
        };
        plan.moves.push((name.clone(), to));
    }
    plan
}

/// Why no node can take an instance off `from`, for a person.
pub fn explain(from: &str, nodes: &[Candidate], why: &Stuck) -> String {
    let others: Vec<String> = nodes
        .iter()
        .filter(|n| n.name != from && n.state != NodeState::Ready)
        .map(|n| format!("{} {}", n.name, n.state))
        .collect();
    match why {
        Stuck::NoReadyNode if others.is_empty() => "no other node is in the cluster".into(),
        Stuck::NoReadyNode => format!(
            "no other node is ready and uncordoned ({})",
            others.join(", ")
        ),
        Stuck::NoRoom {
            need_mib,
            most_free_mib,
        } => format!("no ready node has {need_mib} MiB free (at most {most_free_mib} MiB)"),
    }
}

/// Why a drain of `from` is refused, in one line: the stuck instances by
/// reason (with their HA policy), the other nodes' states, and what to do.
pub fn refusal(from: &str, nodes: &[Candidate], stuck: &[(String, HaPolicy, Stuck)]) -> String {
    let mut reasons: Vec<(String, Vec<(&str, HaPolicy)>)> = vec![];
    for (name, ha, why) in stuck {
        let reason = explain(from, nodes, why);
        match reasons.iter_mut().find(|(r, _)| *r == reason) {
            Some((_, names)) => names.push((name, *ha)),
            None => reasons.push((reason, vec![(name, *ha)])),
        }
    }
    let groups: Vec<String> = reasons
        .iter()
        .map(|(reason, names)| format!("{reason} for {}", with_policies(names)))
        .collect();
    let fix = if stuck.iter().any(|(_, _, w)| *w == Stuck::NoReadyNode) {
        "uncordon or add a node"
    } else {
        "free memory on a node"
    };
    format!(
        "cannot drain {from}: {}; {fix}, or use --force to leave them running here",
        groups.join("; ")
    )
}

/// `web1, db (--ha standby)` when they share a policy, else each its own.
fn with_policies(names: &[(&str, HaPolicy)]) -> String {
    let first = names.first().map(|(_, ha)| *ha);
    if names.iter().all(|(_, ha)| Some(*ha) == first) {
        let all: Vec<&str> = names.iter().map(|(n, _)| *n).collect();
        format!("{} (--ha {})", all.join(", "), first.unwrap_or_default())
    } else {
        let each: Vec<String> = names
            .iter()
            .map(|(n, ha)| format!("{n} (--ha {ha})"))
            .collect();
        each.join(", ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(name: &str, free: u64) -> Candidate {
        Candidate {
            name: name.into(),
            state: NodeState::Ready,
            mem_free_mib: free,
            spread: BTreeMap::new(),
        }
    }

    fn pending(name: &str, mem: u64) -> Pending {
        Pending {
            name: name.into(),
            mem_mib: mem,
            spread: None,
            node: None,
            avoid: vec![],
        }
    }

    #[test]
    fn most_free_memory_wins_and_placements_use_it_up() {
        let nodes = [node("a", 1000), node("b", 700)];
        let placed = place(
            &nodes,
            &[pending("x", 128), pending("y", 128), pending("z", 128)],
        );
        // a: 1000 -> 776 -> (b 700 wins) -> a 776 wins again.
        assert_eq!(
            placed,
            vec![
                ("x".into(), "a".into()),
                ("y".into(), "a".into()),
                ("z".into(), "b".into())
            ]
        );
    }

    #[test]
    fn cordoned_full_and_avoided_nodes_take_nothing() {
        let mut cordoned = node("a", 10_000);
        cordoned.state = NodeState::Cordoned;
        let nodes = [cordoned, node("b", 200), node("c", 5000)];
        let mut x = pending("x", 128);
        x.avoid = vec!["c".into()];
        assert!(
            place(&nodes, &[x]).is_empty(),
            "b is too small, a cordoned, c avoided"
        );
        assert_eq!(
            place(&nodes, &[pending("y", 64)]),
            vec![("y".into(), "c".into())]
        );
    }

    #[test]
    fn a_spread_group_goes_to_different_nodes_while_it_can() {
        let nodes = [node("a", 4000), node("b", 1000)];
        let web = |n: &str| {
            let mut p = pending(n, 128);
            p.spread = Some("web".into());
            p
        };
        let placed = place(&nodes, &[web("w1"), web("w2"), web("w3")]);
        let on: Vec<&str> = placed.iter().map(|(_, n)| n.as_str()).collect();
        assert_eq!(on, vec!["a", "b", "a"]);
    }

    #[test]
    fn a_requested_node_is_the_only_candidate() {
        let nodes = [node("a", 4000), node("b", 1000)];
        let mut x = pending("x", 128);
        x.node = Some("b".into());
        assert_eq!(place(&nodes, &[x.clone()]), vec![("x".into(), "b".into())]);
        x.node = Some("nope".into());
        assert!(place(&nodes, &[x]).is_empty());
    }

    fn at(name: &str, state: NodeState, free: u64) -> Candidate {
        Candidate {
            state,
            ..node(name, free)
        }
    }

    fn resident(name: &str, mem: u64, ha: HaPolicy) -> Resident {
        Resident {
            pending: pending(name, mem),
            ha,
            wants_running: true,
        }
    }

    /// One drain per row: the nodes (n1 is drained), its residents, and
    /// where each goes or why it cannot.
    #[test]
    fn a_drain_plans_each_instance_or_says_why_not() {
        use NodeState::*;
        let standby = |n: &str| resident(n, 128, HaPolicy::Standby);
        let stopped = |n: &str| Resident {
            wants_running: false,
            ..resident(n, 128, HaPolicy::Restart)
        };
        let spread = |n: &str| {
            let mut r = resident(n, 128, HaPolicy::Restart);
            r.pending.spread = Some("web".into());
            r
        };
        let mut web_on_n2 = at("n2", Ready, 4000);
        web_on_n2.spread.insert("web".into(), 1);
        type Row = (
            &'static str,
            Vec<Candidate>,
            Vec<Resident>,
            Vec<(&'static str, &'static str)>,
            Vec<&'static str>,
            Vec<(&'static str, Stuck)>,
        );
        let rows: Vec<Row> = vec![
            (
                "the only other node cordoned",
                vec![at("n1", Draining, 4000), at("n2", Cordoned, 4000)],
                vec![standby("web1"), standby("db")],
                vec![],
                vec![],
                vec![("web1", Stuck::NoReadyNode), ("db", Stuck::NoReadyNode)],
            ),
            (
                "the others draining or down",
                vec![
                    at("n1", Draining, 4000),
                    at("n2", Draining, 4000),
                    at("n3", Lost, 4000),
                ],
                vec![resident("a", 128, HaPolicy::Restart)],
                vec![],
                vec![],
                vec![("a", Stuck::NoReadyNode)],
            ),
            (
                "a node alone",
                vec![at("n1", Draining, 4000)],
                vec![resident("a", 128, HaPolicy::None)],
                vec![],
                vec![],
                vec![("a", Stuck::NoReadyNode)],
            ),
            (
                "a ready node takes every policy, ha none included",
                vec![at("n1", Ready, 0), at("n2", Ready, 4000)],
                vec![
                    resident("a", 128, HaPolicy::None),
                    resident("b", 128, HaPolicy::Restart),
                    standby("c"),
                ],
                vec![("a", "n2"), ("b", "n2"), ("c", "n2")],
                vec![],
                vec![],
            ),
            (
                "never back onto the drained node, however free",
                vec![at("n1", Ready, 100_000), at("n2", Ready, 300)],
                vec![resident("a", 128, HaPolicy::Restart), standby("b")],
                vec![("a", "n2")],
                vec![],
                vec![(
                    "b",
                    Stuck::NoRoom {
                        need_mib: 224,
                        most_free_mib: 76,
                    },
                )],
            ),
            (
                "the memory of earlier moves is used up; the lost node's is not there",
                vec![
                    at("n1", Draining, 0),
                    at("n2", Ready, 500),
                    at("n3", Lost, 10_000),
                ],
                vec![
                    resident("a", 128, HaPolicy::Restart),
                    resident("b", 128, HaPolicy::Restart),
                    resident("c", 128, HaPolicy::Restart),
                ],
                vec![("a", "n2"), ("b", "n2")],
                vec![],
                vec![(
                    "c",
                    Stuck::NoRoom {
                        need_mib: 224,
                        most_free_mib: 52,
                    },
                )],
            ),
            (
                "a stopped instance needs no node",
                vec![at("n1", Draining, 4000), at("n2", Cordoned, 4000)],
                vec![stopped("off")],
                vec![],
                vec!["off"],
                vec![],
            ),
            (
                "a spread group prefers the node without its members",
                vec![at("n1", Draining, 0), web_on_n2, at("n3", Ready, 1000)],
                vec![spread("w2"), spread("w3")],
                vec![("w2", "n3"), ("w3", "n2")],
                vec![],
                vec![],
            ),
        ];
        for (case, nodes, residents, moves, released, stuck) in rows {
            let plan = plan_drain(&nodes, "n1", &residents);
            let ha_of = |n: &str| residents.iter().find(|r| r.pending.name == n).unwrap().ha;
            let want = DrainPlan {
                moves: moves
                    .iter()
                    .map(|(i, n)| (i.to_string(), n.to_string()))
                    .collect(),
                released: released.iter().map(|i| i.to_string()).collect(),
                stuck: stuck
                    .into_iter()
                    .map(|(i, why)| (i.to_string(), ha_of(i), why))
                    .collect(),
            };
            assert_eq!(plan, want, "{case}");
        }
    }

    #[test]
    fn a_refusal_names_the_instances_the_reason_and_the_way_out() {
        use NodeState::*;
        let nodes = [at("n1", Ready, 4000), at("n2", Cordoned, 4000)];
        let stuck = |i: &str, ha| (i.to_string(), ha, Stuck::NoReadyNode);
        assert_eq!(
            refusal(
                "n1",
                &nodes,
                &[
                    stuck("web1", HaPolicy::Standby),
                    stuck("db", HaPolicy::Standby)
                ]
            ),
            "cannot drain n1: no other node is ready and uncordoned (n2 cordoned) for web1, db \
             (--ha standby); uncordon or add a node, or use --force to leave them running here"
        );
        assert_eq!(
            refusal(
                "n1",
                &nodes[..1],
                &[
                    stuck("web1", HaPolicy::Standby),
                    stuck("db", HaPolicy::None)
                ]
            ),
            "cannot drain n1: no other node is in the cluster for web1 (--ha standby), \
             db (--ha none); uncordon or add a node, or use --force to leave them running here"
        );
        let no_room = Stuck::NoRoom {
            need_mib: 224,
            most_free_mib: 76,
        };
        assert_eq!(
            refusal(
                "n1",
                &[at("n1", Ready, 0), at("n2", Ready, 76)],
                &[("big".into(), HaPolicy::Restart, no_room)]
            ),
            "cannot drain n1: no ready node has 224 MiB free (at most 76 MiB) for big \
             (--ha restart); free memory on a node, or use --force to leave them running here"
        );
    }
}
