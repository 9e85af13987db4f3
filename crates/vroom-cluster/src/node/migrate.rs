//! Live migration between nodes.
//!
//! Any node may ask: it checks the request and writes a
//! [`MigrationRecord`] (bound to its own lease) naming the owner's fencing
//! token and a secret. The owner (`from`) picks it up in its pass, has
//! the replicas of the instance's replicated volumes moved to the
//! destination and filled there if they are not up to date there
//! (`volumes/moving.rs`), and connects to the destination's peer port
//! twice. The steps:
//!
//! 1. control connection (JSON lines): the destination checks the
//!    migration against etcd, creates the instance with its identity,
//!    launches its VMM waiting for a state, and answers `ready`;
//! 2. data connection, which each side hands straight to its QEMU
//!    (`getfd`): QEMU migrates over it while the guest runs;
//! 3. once the source's QEMU has finished (its VM paused for good), the
//!    source sends the config volume's bytes and QEMU's numbers over the
//!    control connection;
//! 4. takeover: the destination writes the volume in place and takes
//!    ownership in one transaction that also voids the source's token (the
//!    owner key's mod revision); the migration record stays `requested`;
//! 5. the destination lets its VM run, then verifies it: the guest must
//!    answer its agent (and pass its health check, if it did on the
//!    source: the control hello says) within [`ANSWER_WITHIN`] (it was
//!    running a moment ago), and still run and answer so [`ANSWER_SETTLE`]
//!    later (polled, within [`ANSWER_WITHIN`] again);
//! 6. verified: the destination records the migration `switched` (fenced
//!    on its takeover) and answers `resumed`; the source drops its paused
//!    copy and records it `done`;
//! 7. not verified: the destination kills its VM and removes the instance,
//!    then, unless the source hung up, gives ownership back in one
//!    transaction fenced on its takeover's revision and on the source's
//!    lease (the owner key names the source again, under the source's
//!    lease; the instance record is restored), then takes out its splices
//!    and answers `failed`. The source resumes its paused copy and records
//!    the migration `failed`, so `vroom migrate` fails and says why and
//!    where the instance runs. A destination that cannot give it back (the
//!    source hung up or is gone) records the migration `failed`, keeps
//!    owning the instance and starts it by its policy.
//!
//! After the stream, whatever happened, the source decides by the owner
//! key: if it names the source, the source rewrites it (which voids any
//! takeover still in flight) and its VM runs on. Otherwise the destination
//! has it; if its answer did not come in time (the destination is alive
//! but silent), the source keeps its paused copy while the destination
//! owns the instance and the migration is still `requested` (a give-back
//! may still come), up to [`DECISION_WAIT`], then records the migration
//! `failed` if nobody did. A destination that hung up gives nothing back
//! (it gives back only over an open control connection), so then the
//! paused copy goes at once: kept, it would sit beside the VM the
//! destination's new vroomd boots. A destination whose
//! vroomd restarted after its takeover (no receive under way, the
//! instance its own, the migration `requested`) records it `failed`: its
//! new vroomd boots the instance cold, which is no live move. Until the
//! source has decided it keeps its paused copy, even when its pass sees
//! another owner.

use std::time::Instant;

use super::*;

mod destination;
mod protocol;
mod request;
mod source;

#[cfg(test)]
pub(super) use destination::ArrivedVolume;
pub(super) use protocol::DataSlot;
use protocol::*;

/// How long `vroom migrate` waits for the move.
const MIGRATE_TIMEOUT: Duration = Duration::from_secs(120);
/// How long a peer may take for a step of the protocol (launching the
/// destination's VMM, then streaming).
pub(super) const STEP_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a migrated guest has, once it runs on the destination, to
/// answer its agent and pass its health check. It was running a moment
/// ago; this only allows for a loaded host.
pub const ANSWER_WITHIN: Duration = Duration::from_secs(10);
/// How long after its first answer a migrated guest must still run and
/// answer: guests whose memory the move corrupted (QEMU 7.2's TCG loses
/// pages a vCPU dirties during a live copy on a loaded host) answered once
/// and panicked about 2 s later. The source keeps its paused copy until
/// then; the guest's pause is not longer for it.
pub const ANSWER_SETTLE: Duration = Duration::from_secs(3);
/// How long a source whose destination's answer did not come keeps its
/// paused copy while the destination owns the instance and the migration
/// is still `requested`: the destination may still be checking its guest
/// (up to [`ANSWER_WITHIN`] and [`ANSWER_SETTLE`]) and then give it back,
/// or have restarted and be about to say it has it.
const DECISION_WAIT: Duration = Duration::from_secs(30);
/// How a source's error says that the destination hung up.
const WENT_AWAY: &str = "went away during the migration";

/// What the destination's takeover changed, for the switch or the give-back.
#[derive(Debug, Clone)]
pub(super) struct Taken {
    /// The takeover's revision: the owner key's mod revision after it.
    pub(super) revision: i64,
    /// The instance record before the takeover.
    instance: InstanceRecord,
    /// The migration record's mod revision (the takeover left it as it was).
    migration_rev: i64,
    downtime_ms: u64,
    bytes: u64,
    /// When the takeover was done.
    at: Instant,
}

/// The revisions of an incoming instance's config and wiring records as
/// the destination read them (0: none); its takeover requires them still.
#[derive(Debug, Clone, Copy)]
pub(super) struct Seen {
    pub(super) config: i64,
    pub(super) wiring: i64,
}
