//! A live migration to a node that holds no up-to-date copy of the
//! instance's replicated volumes: the replica moves there first.
//!
//! A volume with one copy moves the same way: the destination is recorded
//! as its replica (it had none), filled, and the takeover makes its copy
//! the only one ([`VolumeRecord::promoted`]); a move that fails, or a
//! replica a killed source left, goes back to the source's copy alone
//! (`ClusterNode::drop_moving_replica`).
//!
//! The source (the owner, under the instance's fencing token) rewrites
//! each volume's record so that the destination keeps its replica,
//! `Outdated` (a copy it does not have yet): from that write on, the old
//! replica's copy is no longer the volume's and is never promoted. Its
//! running replication lets the old replica go, the next pass fills the
//! destination's copy with a full copy (the same path as any new replica),
//! and once the record says `UpToDate` the migration streams the VM and
//! the takeover swaps the roles as for any move to the replica's node. The
//! old replica's node removes its copy when it sees the record no longer
//! name it.
//!
//! **Unprotected:** from the record's rewrite until the destination's copy
//! is up to date, only the primary has every write: a full copy, 3–8 s per
//! GiB of the volume's data (measured for a resync). A loss of the
//! primary's node then leaves the instance waiting for it (no copy is
//! promotable), as the record says. After the swap the old primary's copy
//! is filled again from the new primary, as after any role swap.
//!
//! A move that does not get its copy in time (the destination down), or
//! whose fill failed [`FILL_ATTEMPTS`] times (its disk full), puts the replica back on its old node, unless the new copy
//! came up to date after all; a source killed meanwhile leaves the replica
//! on the destination, where the restarted source fills it.

use super::*;

/// What a live migration to node `to` needs of a replicated volume before
/// the VM is streamed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(in crate::node) enum BeforeMove {
    /// `to` holds the up-to-date replica: the takeover swaps the roles.
    Nothing,
    /// `to` holds the replica, which is being filled: wait for it.
    AwaitCopy,
    /// `to` holds no replica: it moves there from `from`, and is filled.
    MoveReplica { from: String },
}

pub(in crate::node) fn before_move(volume: &VolumeRecord, to: &str) -> BeforeMove {
    if volume.replica != to {
        BeforeMove::MoveReplica {
            from: volume.replica.clone(),
        }
    } else if volume.state != ReplicaState::UpToDate {
        BeforeMove::AwaitCopy
    } else {
        BeforeMove::Nothing
    }
}

/// How many failed fills of the destination's copy fail the move (each
/// is tried again [`RETRY_AFTER`] after the last).
const FILL_ATTEMPTS: usize = 3;

/// How long a migration waits for a replica of `size_mib` to be filled:
/// four times the slowest full copy measured (8 s/GiB) and a minute.
pub(in crate::node) fn fill_within(size_mib: u64) -> Duration {
    Duration::from_secs(60) + Duration::from_millis(size_mib.saturating_mul(32))
}

/// How long the migration of an instance using `volumes` to `to` may wait
/// for their replicas there.
pub(in crate::node) fn fills_within<'a>(
    volumes: impl IntoIterator<Item = &'a VolumeRecord>,
    to: &str,
) -> Duration {
    volumes
        .into_iter()
        .filter(|v| before_move(v, to) != BeforeMove::Nothing)
        .map(|v| fill_within(v.size_mib))
        .sum()
}

impl ClusterNode {
    /// Before migration `m` of `name` streams its VM: every replicated
    /// volume of the instance has its up-to-date replica on the
    /// destination, moved and filled there if it was elsewhere. `Err`: it
    /// did not come in time, or the migration was called off (replicas it
    /// moved and that are not up to date are put back).
    pub(in crate::node) async fn replicas_to(
        &self,
        name: &str,
        m: &MigrationRecord,
        within: Option<Duration>,
    ) -> Result<(), String> {
        let to = m.to.as_str();
        let record = self
            .store
            .get_json::<InstanceRecord>(&key(INSTANCES, name))
            .await
            .map_err(|e| format!("cannot read the instance: {e}"))?
            .ok_or_else(|| format!("instance {name} is gone"))?
            .0;
        let volumes = self
            .volume_records_of(&record)
            .await
            .map_err(|e| e.message)?;
        if volumes
            .iter()
            .all(|(v, _)| before_move(v, to) == BeforeMove::Nothing)
        {
            return Ok(());
        }
        let wait = within.unwrap_or_else(|| fills_within(volumes.iter().map(|(v, _)| v), to));
        self.moving_replicas
            .lock_unpoisoned()
            .insert(name.to_string());
        let mut moved = vec![];
        let outcome = self
            .move_and_fill(name, m, &volumes, wait, &mut moved)
            .await;
        if let Err(reason) = &outcome {
            self.put_replicas_back(name, m, &moved, reason).await;
        }
        self.moving_replicas.lock_unpoisoned().remove(name);
        outcome
    }

    async fn move_and_fill(
        &self,
        name: &str,
        m: &MigrationRecord,
        volumes: &[(VolumeRecord, Kv)],
        wait: Duration,
        moved: &mut Vec<(String, String)>,
    ) -> Result<(), String> {
        let to = m.to.as_str();
        let why = format!(
            "moving to node {to} for the live migration of {name}: filled from {}, then the roles swap",
            self.name
        );
        for (volume, _) in volumes {
            let BeforeMove::MoveReplica { from } = before_move(volume, to) else {
                continue;
            };
            self.update_volume(name, m.token, &volume.name, |v| {
                Ok((v.replica != to).then(|| VolumeRecord {
                    replica: to.to_string(),
                    ..v.with_state(ReplicaState::Outdated, Some(why.clone()), now_secs())
                }))
            })
            .await
            .map_err(|e| e.message)?;
            tracing::info!(volume = %volume.name, instance = %name, %from, %to, "the replica moves for a live migration");
            moved.push((volume.name.clone(), from));
        }
        self.wake.notify_one();
        let since = Instant::now();
        // Fills that failed (the record's `since` of each): a destination
        // that cannot make or take the copy fails the move soon.
        let mut failed = BTreeSet::new();
        loop {
            tokio::time::sleep(Duration::from_millis(200)).await;
            if self.token(name) != Some(m.token) {
                return Err(format!("node {} lost the instance", self.name));
            }
            let asked = self
                .store
                .get_json::<MigrationRecord>(&key(MIGRATIONS, name))
                .await
                .map_err(|e| format!("cannot read the migration: {e}"))?;
            if asked.is_none_or(|(now, _)| now.id != m.id) {
                return Err("the migration was called off".into());
            }
            let mut waiting = None;
            for (volume, _) in volumes {
                let current = self
                    .store
                    .get_json::<VolumeRecord>(&key(VOLUMES, &volume.name))
                    .await
                    .map_err(|e| format!("cannot read volume {}: {e}", volume.name))?
                    .ok_or_else(|| format!("volume {} is gone", volume.name))?
                    .0;
                if before_move(&current, to) != BeforeMove::Nothing {
                    waiting = Some(current);
                    break;
                }
            }
            let Some(current) = waiting else {
                tracing::info!(instance = %name, %to, took_ms = since.elapsed().as_millis() as u64, "the replicas are up to date on the destination");
                return Ok(());
            };
            let reason = current.reason.as_deref().unwrap_or("no reason given");
            if current.replica == to && current.state == ReplicaState::Outdated && reason != why {
                failed.insert(current.since);
                if failed.len() >= FILL_ATTEMPTS {
                    return Err(format!(
                        "volume {}'s copy on {to} failed {FILL_ATTEMPTS} times: {reason}",
                        current.name
                    ));
                }
            }
            if since.elapsed() > wait {
                return Err(format!(
                    "volume {}'s copy on {to} was not filled within {} s ({}: {})",
                    current.name,
                    wait.as_secs(),
                    current.state,
                    current.reason.as_deref().unwrap_or("no reason given")
                ));
            }
        }
    }

    /// A move whose replicas did not come: each replica it moved goes back
    /// to its old node (which is filled again), unless the destination's
    /// copy came up to date after all (then it stays: it is a whole copy).
    async fn put_replicas_back(
        &self,
        name: &str,
        m: &MigrationRecord,
        moved: &[(String, String)],
        reason: &str,
    ) {
        let to = m.to.as_str();
        for (volume, from) in moved {
            let why = format!(
                "the live migration of {name} to {to} failed ({reason}); the replica is back on {from}"
            );
            let back = self
                .update_volume(name, m.token, volume, |v| {
                    Ok(
                        (v.replica == to && v.state != ReplicaState::UpToDate).then(|| {
                            VolumeRecord {
                                replica: from.clone(),
                                ..v.with_state(
                                    ReplicaState::Outdated,
                                    Some(why.clone()),
                                    now_secs(),
                                )
                            }
                        }),
                    )
                })
                .await;
            match back {
                Ok(()) => {
                    tracing::info!(%volume, %from, %to, "the replica moved back after a failed migration")
                }
                Err(e) => {
                    tracing::warn!(%volume, error = %e.message, "cannot move the replica back after a failed migration")
                }
            }
        }
        self.wake.notify_one();
    }
}
