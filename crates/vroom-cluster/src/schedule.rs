//! Placement: which node runs an instance. Pure, so it is tested alone.
//!
//! A candidate is alive, not cordoned and has the memory free (its total
//! minus what its instances and this round's placements take). Among
//! candidates the scheduler prefers, in order: the requested node (the only
//! candidate then), for `ha none` the instance's home, the fewest members
//! of the instance's spread group, the most free memory, the name.

use std::collections::BTreeMap;

/// A node as the scheduler sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    pub name: String,
    pub cordoned: bool,
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
    let mut nodes: Vec<Candidate> = nodes.to_vec();
    let mut placed = vec![];
    for want in pending {
        let need = want.mem_mib + VMM_OVERHEAD_MIB;
        let best = nodes
            .iter_mut()
            .filter(|n| !n.cordoned && n.mem_free_mib >= need)
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

#[cfg(test)]
mod tests {
    use super::*;

    fn node(name: &str, free: u64) -> Candidate {
        Candidate {
            name: name.into(),
            cordoned: false,
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
        cordoned.cordoned = true;
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
}
