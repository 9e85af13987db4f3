//! A live migration to a node without the volume's up-to-date replica
//! (`node/volumes/moving.rs`): the replica moves there first, is never
//! promoted before it is filled, and a move that does not get its copy
//! puts it back. The fakes mirror nothing: the test records the fill as
//! the replication would.

use super::*;

/// `db` on `a`, its volume `data` kept on `a` and `b` (up to date), and a
/// migration of it to `c` asked for.
async fn db_asked_to_c() -> (Fleet, MigrationRecord) {
    let fleet = Fleet::new(&["a", "b", "c"]).await;
    replicated_volume(&fleet, "data", ReplicaState::UpToDate).await;
    fleet
        .run(
            "a",
            with_volume(request("db", None, HaPolicy::Restart), "data"),
        )
        .await;
    fleet
        .settle("db runs on a", |f| f.running_on("db") == ["a"])
        .await;
    set_volume_state(&fleet, "data", ReplicaState::UpToDate).await;
    let m = fleet.ask_migration("db", "c").await;
    // As the source's pass does before it calls `replicas_to` itself.
    fleet
        .node("a")
        .migrating
        .lock_unpoisoned()
        .insert("db".into());
    (fleet, m)
}

/// Waits (without passes) until the record names `replica`.
pub(super) async fn replica_becomes(fleet: &Fleet, replica: &str) -> VolumeRecord {
    for _ in 0..200 {
        let record = volume_record(fleet, "data").await;
        if record.replica == replica {
            return record;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("the replica did not move to {replica}");
}

pub(super) fn has_copy(fleet: &Fleet, node: &str) -> bool {
    fleet.member(node).engine.engine.volume("data").is_ok()
}

/// Issue 25: "otherwise it mirrors the volume to the destination as part
/// of the migration". Refused before; now the source records the
/// destination as the replica (outdated: never promoted), the old
/// replica's node drops its copy, and the migration goes on once the
/// destination's copy is up to date, where the takeover promotes it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_migration_to_a_node_without_a_copy_moves_the_replica_there_first() {
    let (fleet, m) = db_asked_to_c().await;
    let a = fleet.node("a");
    let moving = {
        let (a, m) = (a.clone(), m.clone());
        tokio::spawn(async move { a.replicas_to("db", &m, Some(Duration::from_secs(30))).await })
    };
    let record = replica_becomes(&fleet, "c").await;
    assert_eq!(
        (record.primary.as_str(), record.state, record.epoch),
        ("a", ReplicaState::Outdated, 1),
        "the replica moved to c, not filled yet: {record:?}"
    );
    // c takes no instance over on a copy it does not have yet.
    let instance: InstanceRecord = fleet
        .store
        .get(&key(INSTANCES, "db"))
        .await
        .unwrap()
        .unwrap()
        .decode()
        .unwrap();
    assert!(fleet.node("c").takeover_volumes(&instance).await.is_err());
    // b's copy is no longer the volume's: it goes.
    for _ in 0..3 {
        fleet.passes().await;
    }
    assert!(!has_copy(&fleet, "b"), "b kept a copy no record names");
    assert!(has_copy(&fleet, "a"));
    assert!(!moving.is_finished(), "the move went on before the copy");

    // The replication filled c's copy.
    set_volume_state(&fleet, "data", ReplicaState::UpToDate).await;
    moving.await.unwrap().expect("the replicas are on c");
    let (_, ops) = fleet.node("c").takeover_volumes(&instance).await.unwrap();
    assert_eq!(ops.len(), 1, "the takeover promotes c's copy");
}

/// A copy that does not come in time (c down, its disk full): the replica
/// goes back to b, outdated (it is filled again), and c's half copy goes.
/// One that came up to date after all stays on c.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_move_whose_copy_does_not_come_puts_the_replica_back() {
    let (fleet, m) = db_asked_to_c().await;
    // What a fill cut short leaves on c.
    let req = vroom_types::VolumeCreateRequest {
        name: Name::new("data").unwrap(),
        size_mib: 16,
        fs: vroom_types::VolumeFs::Ext4,
        replicas: 2,
        node: None,
        replica_node: None,
    };
    let c = &fleet.member("c").engine.engine;
    c.create_volume_copy(&req).await.unwrap();
    let a = fleet.node("a");
    let err = a
        .replicas_to("db", &m, Some(Duration::from_millis(500)))
        .await
        .unwrap_err();
    assert!(err.contains("not filled within"), "{err}");
    let record = volume_record(&fleet, "data").await;
    assert_eq!(
        (
            record.primary.as_str(),
            record.replica.as_str(),
            record.state
        ),
        ("a", "b", ReplicaState::Outdated),
        "{record:?}"
    );
    for _ in 0..3 {
        fleet.passes().await;
    }
    assert!(!has_copy(&fleet, "c"), "c kept its half copy");
    assert!(has_copy(&fleet, "b") && has_copy(&fleet, "a"));

    // Called off after c's copy came up to date: it stays the replica.
    fleet.store.delete(&key(MIGRATIONS, "db")).await.unwrap();
    set_volume_state(&fleet, "data", ReplicaState::UpToDate).await;
    let m = fleet.ask_migration("db", "c").await;
    let moving = {
        let (a, m) = (a.clone(), m.clone());
        tokio::spawn(async move { a.replicas_to("db", &m, Some(Duration::from_secs(30))).await })
    };
    replica_becomes(&fleet, "c").await;
    set_volume_state(&fleet, "data", ReplicaState::UpToDate).await;
    fleet.store.delete(&key(MIGRATIONS, "db")).await.unwrap();
    // (It may have seen the copy before the call-off.)
    let _ = moving.await.unwrap();
    let record = volume_record(&fleet, "data").await;
    assert_eq!(
        (record.replica.as_str(), record.state),
        ("c", ReplicaState::UpToDate)
    );
}

/// The primary's node lost while the replica moves: c's copy is not up to
/// date, so nobody takes the instance (it waits for a), and the record is
/// as the move left it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failover_during_the_move_promotes_nothing() {
    let (fleet, m) = db_asked_to_c().await;
    let a = fleet.node("a");
    let moving = {
        let m = m.clone();
        tokio::spawn(async move { a.replicas_to("db", &m, Some(Duration::from_secs(30))).await })
    };
    replica_becomes(&fleet, "c").await;
    fleet.stop("a");
    for _ in 0..30 {
        fleet.passes().await;
    }
    assert_eq!(fleet.owner("db").await, None, "a copy was promoted");
    assert!(!fleet.running_on("db").iter().any(|n| n != "a"));
    let record = volume_record(&fleet, "data").await;
    assert_eq!(
        (
            record.primary.as_str(),
            record.replica.as_str(),
            record.epoch
        ),
        ("a", "c", 1)
    );
    assert_ne!(record.state, ReplicaState::UpToDate);
    moving.abort();
}

/// A destination that cannot take the copy (its disk full): each fill
/// fails and is recorded outdated with the reason; the move fails after a
/// few, not at its bound, says why, and the replica goes back to b.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_destination_that_fails_its_fills_fails_the_move_soon() {
    let (fleet, m) = db_asked_to_c().await;
    let a = fleet.node("a");
    let moving = {
        let m = m.clone();
        tokio::spawn(async move { a.replicas_to("db", &m, Some(Duration::from_secs(60))).await })
    };
    replica_becomes(&fleet, "c").await;
    let started = std::time::Instant::now();
    for attempt in 0..3 {
        // What the replication records when the fill fails.
        let mut record = volume_record(&fleet, "data").await.with_state(
            ReplicaState::Outdated,
            Some("node c has 1 MiB free; the volume needs 16 MiB".into()),
            now_secs() + attempt,
        );
        record.replica = "c".into();
        fleet
            .store
            .put(&key(VOLUMES, "data"), json(&record))
            .await
            .unwrap();
        // (a's lease, which the migration's record is bound to, lives.)
        fleet.beat("a").await;
        tokio::time::sleep(Duration::from_millis(400)).await;
    }
    let err = tokio::time::timeout(Duration::from_secs(5), moving)
        .await
        .expect("the move failed soon")
        .unwrap()
        .unwrap_err();
    assert!(err.contains("1 MiB free"), "{err}");
    assert!(started.elapsed() < Duration::from_secs(10));
    let record = volume_record(&fleet, "data").await;
    assert_eq!(record.replica, "b");
}
