//! vroom's cluster layer: several vroomd hosts sharing state in etcd.
//!
//! - [`model`]: what is stored in etcd and under which key;
//! - [`store`]: the store seam (compare-and-swap transactions, leases,
//!   watches) with its etcd adapter and, for tests, an in-memory one;
//! - [`guard`]: the self-fencing guard, a process of its own per node that
//!   kills the node's VMMs when its lease can no longer be alive;
//! - [`schedule`]: pure placement by free memory and anti-affinity;
//! - [`service`]: the API's way into the cluster ([`Clustered`], a
//!   `Vroomd`);
//! - [`tls`]: the cluster's CA and the certificates of the TCP API;
//! - [`peer_auth`]: the proof every peer connection gives before its
//!   hello is acted on (a MAC keyed by the cluster's peer secret);
//! - [`node`]: a node's membership (lease and keepalive), the leader's
//!   scheduler, ownership claims under a fencing token, and the reconcile
//!   loop that makes the local engine run what this node owns.
//!
//! The invariant everything serves: an instance runs on at most one node.
//! A node owns an instance through a key bound to its lease, created only if
//! absent; every later write for the instance compares that key's mod
//! revision (the fencing token, which a migration's handover moves to the
//! new owner); a node launches a VM only while it owns it
//! under a lease whose last keepalive was acknowledged less than
//! `TTL - 0.5 s` ago, and its guard kills its VMMs when that stops being so.
//! Another node can claim the instance only after the lease has expired,
//! which etcd does no earlier than `TTL` after the last keepalive.

pub mod guard;
pub mod model;
pub mod node;
pub mod peer_auth;
pub mod schedule;
pub mod service;
pub mod store;
pub mod tls;

pub use node::{ClusterNode, JoinOptions, MEMBERSHIP_FILE};
pub use service::Clustered;

/// A node's lease time to live. etcd 3.4's minimum is 2 s.
pub const LEASE_TTL_SECS: i64 = 2;
/// How often a node renews its lease.
pub const KEEPALIVE_EVERY: std::time::Duration = std::time::Duration::from_millis(500);
/// How long before its lease could expire a node stops its VMs: the guard
/// kills them `TTL - FENCE_MARGIN` after the last acknowledged keepalive
/// was sent.
pub const FENCE_MARGIN: std::time::Duration = std::time::Duration::from_millis(500);

/// The monotonic clock in nanoseconds, shared by every process of the host
/// (vroomd and its guard compare instants through it).
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes only into `ts`, which is valid.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// The fencing deadline of a keepalive sent at `sent_ns`.
pub fn fence_deadline_ns(sent_ns: u64) -> u64 {
    sent_ns + (LEASE_TTL_SECS as u64) * 1_000_000_000 - FENCE_MARGIN.as_nanos() as u64
}
