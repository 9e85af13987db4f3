//! A cluster's volume with one copy (`vroom volume create NAME --replicas
//! 1 [--node N]`): recorded like a replicated one so every node lists it,
//! its instance pinned to its node, and never booted elsewhere on an
//! empty disk while that node is lost.

use super::moving::{has_copy, replica_becomes};
use super::*;

fn one_copy(name: &str, node: Option<&str>) -> vroom_types::VolumeCreateRequest {
    vroom_types::VolumeCreateRequest {
        name: Name::new(name).unwrap(),
        size_mib: 16,
        fs: vroom_types::VolumeFs::Ext4,
        replicas: 1,
        node: node.map(|n| Name::new(n).unwrap()),
        replica_node: None,
    }
}

/// Every node gets the image the instance runs (vroom's kernel: ext4).
fn add_store_image(fleet: &Fleet) {
    for m in &fleet.members {
        let spec = vroom_types::ApplianceSpec {
            writable: vec!["/run".into(), "/var".into()],
            ..Default::default()
        };
        m.engine
            .images
            .add_appliance("store", spec, vroom_types::KernelFlavor::Vroom);
    }
}

/// Made on `b` (asked there), the volume is recorded with `b` as its only
/// node, and every node lists and inspects it so; an instance using it,
/// asked for through `a` with `--ha restart`, runs on `b`. When `b` is
/// lost the instance is not booted on `a` or `c` (it would get an empty
/// disk): no node claims it, the record is unchanged, and `ps`/`inspect`
/// say what it waits for. Back, `b` runs it again.
///
/// Checks it covers: `create_volume`, `volume_view`, `volume_home`,
/// `waiting_for_volume`, `claim_volumes`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_volume_with_one_copy_pins_its_instance_and_waits_for_its_node() {
    let fleet = Fleet::new(&["a", "b", "c"]).await;
    add_store_image(&fleet);
    let made = fleet
        .node("b")
        .create_volume(one_copy("data", None))
        .await
        .unwrap();
    assert_eq!((made.replicas, made.node.as_deref()), (1, Some("b")));
    let record = volume_record(&fleet, "data").await;
    assert!(record.one_copy && record.replica.is_empty(), "{record:?}");
    assert_eq!(record.primary, "b");
    for node in ["a", "c"] {
        let listed = fleet.node(node).list_volumes().await.unwrap();
        let v = listed.iter().find(|v| v.name.as_str() == "data").unwrap();
        assert_eq!((v.replicas, v.node.as_deref()), (1, Some("b")), "{node}");
        assert!(v.replication.is_none());
        let v = fleet.node(node).volume("data").await.unwrap();
        assert_eq!(v.node.as_deref(), Some("b"));
        assert!(
            fleet.member(node).engine.engine.volume("data").is_err(),
            "no copy on {node}"
        );
    }

    fleet
        .run(
            "a",
            with_volume(request("db", None, HaPolicy::Restart), "data"),
        )
        .await;
    fleet
        .settle("db runs on b", |f| f.running_on("db") == ["b"])
        .await;

    fleet.stop("b");
    for _ in 0..40 {
        fleet.passes().await;
    }
    assert!(
        fleet.running_on("db").iter().all(|n| n == "b"),
        "db ran elsewhere"
    );
    assert_eq!(fleet.owner("db").await, None, "nobody may take db");
    assert_eq!(
        volume_record(&fleet, "data").await,
        record,
        "the record stays"
    );
    for node in ["a", "c"] {
        assert!(fleet.member(node).engine.engine.volume("data").is_err());
        let db = fleet.node(node).instance("db").await.unwrap().unwrap();
        let waiting = db.status.waiting.unwrap_or_default();
        assert!(
            waiting.contains("waiting for node b") && waiting.contains("volume data"),
            "{waiting}"
        );
        let listed = fleet.node(node).instances().await.unwrap();
        let db = listed
            .iter()
            .find(|i| i.spec.name.as_str() == "db")
            .unwrap();
        assert!(db.status.waiting.is_some());
    }
}

/// An instance using a volume with one copy: `--node` elsewhere and `--ha
/// standby` are refused with the reason, and nothing is made; a drain
/// moves it (its copy with it); `node rm` of its dead node is refused (it
/// holds the only copy).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_a_volume_with_one_copy_cannot_do_is_refused() {
    let fleet = Fleet::new(&["a", "b", "c"]).await;
    add_store_image(&fleet);
    let a = fleet.node("a");
    a.create_volume(one_copy("data", None)).await.unwrap();

    let e = a
        .run(with_volume(
            request("elsewhere", Some("b"), HaPolicy::Restart),
            "data",
        ))
        .await
        .unwrap_err();
    assert!(e.message.contains("runs there, not on b"), "{}", e.message);
    let e = a
        .run(with_volume(
            request("warm", None, HaPolicy::Standby),
            "data",
        ))
        .await
        .unwrap_err();
    assert!(e.message.contains("--ha standby"), "{}", e.message);
    let view = a.view().await.unwrap();
    assert!(view.instances.is_empty(), "nothing recorded");

    fleet
        .run(
            "c",
            with_volume(request("db", None, HaPolicy::Restart), "data"),
        )
        .await;
    fleet
        .settle("db runs on a", |f| f.running_on("db") == ["a"])
        .await;
    let view = a.view().await.unwrap();
    let target = view.target_for("db", "a");
    assert!(matches!(target.as_deref(), Some("b" | "c")), "{target:?}");
    let (_, plan) = view.drain_plan("a");
    assert!(plan.stuck.is_empty(), "{plan:?}");

    let e = fleet.node("b").remove_volume("data").await.unwrap_err();
    assert!(
        e.message.contains("attached to instance db"),
        "{}",
        e.message
    );

    fleet.stop("a");
    let e = fleet.node("b").remove_node("a").await.unwrap_err();
    assert!(e.message.contains("volume data"), "{}", e.message);
}

/// Bad input gets one line and leaves nothing: an unknown node, a node
/// that is down, `--replica-node` with one copy, a replica on the primary's
/// node, a name taken.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_volume_requests_are_refused_and_leave_nothing() {
    let fleet = Fleet::new(&["a", "b", "c"]).await;
    let a = fleet.node("a");
    fleet.stop("c");
    let mut with_replica_node = one_copy("v", None);
    with_replica_node.replica_node = Some(Name::new("b").unwrap());
    let mut replica_here = one_copy("v", None);
    replica_here.replicas = 2;
    replica_here.replica_node = Some(Name::new("a").unwrap());
    let cases = [
        (one_copy("v", Some("zz")), "node zz is not in the cluster"),
        (one_copy("v", Some("c")), "node c is down"),
        (with_replica_node, "--replica-node needs --replicas 2"),
        (replica_here, "another node than the primary"),
    ];
    for (req, want) in cases {
        let e = a.create_volume(req).await.unwrap_err();
        assert!(e.message.contains(want), "{want}: {}", e.message);
        assert!(!e.message.contains('\n'));
        assert!(volume_records(&fleet).await.is_empty(), "{want}");
        for m in &fleet.members {
            assert!(m.engine.engine.list_volumes().unwrap().is_empty(), "{want}");
        }
    }
    a.create_volume(one_copy("v", None)).await.unwrap();
    let e = fleet
        .node("b")
        .create_volume(one_copy("v", None))
        .await
        .unwrap_err();
    assert_eq!(e.code, ErrorCode::AlreadyExists, "{}", e.message);
    assert!(fleet.member("b").engine.engine.volume("v").is_err());
}

async fn volume_records(fleet: &Fleet) -> Vec<String> {
    fleet
        .store
        .list(VOLUMES)
        .await
        .unwrap()
        .0
        .into_iter()
        .map(|kv| kv.key)
        .collect()
}

/// The record gone (removed through a node while the volume's own was
/// down), the copy goes at its node's next pass; a copy whose record
/// stays is kept through passes, and a volume made without the cluster
/// is never touched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_copy_goes_with_its_record_and_a_local_volume_stays() {
    let fleet = Fleet::new(&["a", "b"]).await;
    let a = fleet.node("a");
    a.create_volume(one_copy("kept", None)).await.unwrap();
    a.create_volume(one_copy("gone", None)).await.unwrap();
    let engine = &fleet.member("a").engine.engine;
    engine.create_volume(one_copy("mine", None)).await.unwrap();
    for _ in 0..3 {
        fleet.passes().await;
    }
    let kv = fleet
        .store
        .get(&key(VOLUMES, "gone"))
        .await
        .unwrap()
        .unwrap();
    fleet.store.delete(&kv.key).await.unwrap();
    a.creating_volumes.lock_unpoisoned().clear();
    fleet.passes().await;
    assert!(
        engine.volume("gone").is_err(),
        "the copy without its record stays"
    );
    assert!(engine.volume("kept").is_ok());
    assert!(engine.volume("mine").is_ok(), "a local volume went");
}

/// `db` on `a`, its volume `data` with one copy there, and a migration of
/// it to `c` asked for (as the source's pass marks it).
async fn db_with_one_copy_asked_to_c() -> (Fleet, MigrationRecord, InstanceRecord) {
    let fleet = Fleet::new(&["a", "b", "c"]).await;
    add_store_image(&fleet);
    fleet
        .node("a")
        .create_volume(one_copy("data", None))
        .await
        .unwrap();
    fleet
        .run(
            "a",
            with_volume(request("db", None, HaPolicy::Restart), "data"),
        )
        .await;
    fleet
        .settle("db runs on a", |f| f.running_on("db") == ["a"])
        .await;
    let m = fleet.ask_migration("db", "c").await;
    fleet
        .node("a")
        .migrating
        .lock_unpoisoned()
        .insert("db".into());
    let instance = fleet
        .store
        .get(&key(INSTANCES, "db"))
        .await
        .unwrap()
        .unwrap()
        .decode()
        .unwrap();
    (fleet, m, instance)
}

/// Issue 25: a live migration of an instance whose volume has one copy
/// copies it to the destination with the instance running: the source
/// records the destination as a replica (outdated: never taken over), the
/// replication fills it, and the takeover makes the destination's copy the
/// volume's only one (a new epoch), so the source's goes.
///
/// Checks it covers: `before_move` and `move_and_fill` on a volume with
/// one copy, `takeover_volumes` (`VolumeRecord::promoted`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_migration_copies_the_only_copy_and_the_destination_keeps_it() {
    let (fleet, m, instance) = db_with_one_copy_asked_to_c().await;
    let a = fleet.node("a");
    let moving = {
        let (a, m) = (a.clone(), m.clone());
        tokio::spawn(async move { a.replicas_to("db", &m, Some(Duration::from_secs(30))).await })
    };
    let record = replica_becomes(&fleet, "c").await;
    assert!(record.one_copy, "{record:?}");
    assert_eq!(
        (record.primary.as_str(), record.state, record.epoch),
        ("a", ReplicaState::Outdated, 1)
    );
    assert!(
        fleet.node("c").takeover_volumes(&instance).await.is_err(),
        "c took over a copy it does not have yet"
    );
    // The source's passes leave the copy being made alone meanwhile.
    for _ in 0..3 {
        fleet.passes().await;
    }
    assert_eq!(volume_record(&fleet, "data").await.replica, "c");
    assert!(!moving.is_finished(), "the move went on before the copy");

    // The replication filled c's copy.
    set_volume_state(&fleet, "data", ReplicaState::UpToDate).await;
    moving.await.unwrap().expect("the copy is on c");
    let (compares, ops) = fleet.node("c").takeover_volumes(&instance).await.unwrap();
    let done = fleet
        .store
        .txn(Txn::new().when(compares).and_then(ops))
        .await
        .unwrap();
    assert!(done.succeeded());
    let record = volume_record(&fleet, "data").await;
    assert!(record.one_copy);
    assert_eq!(
        (
            record.primary.as_str(),
            record.replica.as_str(),
            record.epoch
        ),
        ("c", "", 2),
        "c's copy is the only one: {record:?}"
    );
    let v = fleet.node("b").volume("data").await.unwrap();
    assert_eq!((v.replicas, v.node.as_deref()), (1, Some("c")));
}

/// A copy that does not come (c down, its disk full): the instance stays
/// on `a` with its volume, which has one copy again, and c's half copy
/// goes. A replica a killed source left behind (no migration under way)
/// is dropped the same way by the source's next pass.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_move_without_its_copy_leaves_the_volume_whole_where_it_was() {
    let (fleet, m, _) = db_with_one_copy_asked_to_c().await;
    let req = vroom_types::VolumeCreateRequest {
        replicas: 2,
        ..one_copy("data", None)
    };
    let c = &fleet.member("c").engine.engine;
    // What a fill cut short leaves on c.
    c.create_volume_copy(&req).await.unwrap();
    let a = fleet.node("a");
    let err = a
        .replicas_to("db", &m, Some(Duration::from_millis(500)))
        .await
        .unwrap_err();
    assert!(err.contains("not filled within"), "{err}");
    let record = volume_record(&fleet, "data").await;
    assert!(record.one_copy && !record.replicated(), "{record:?}");
    assert_eq!((record.primary.as_str(), record.epoch), ("a", 1));
    for _ in 0..3 {
        fleet.passes().await;
    }
    assert!(!has_copy(&fleet, "c"), "c kept its half copy");
    assert!(has_copy(&fleet, "a"));
    assert_eq!(fleet.running_on("db"), ["a"]);

    // A source killed during the move: the record names c's copy (filled,
    // even), no migration runs any more.
    c.create_volume_copy(&req).await.unwrap();
    let mut left = volume_record(&fleet, "data").await;
    left.replica = "c".into();
    left.state = ReplicaState::UpToDate;
    fleet
        .store
        .put(&key(VOLUMES, "data"), json(&left))
        .await
        .unwrap();
    fleet.store.delete(&key(MIGRATIONS, "db")).await.unwrap();
    a.migrating.lock_unpoisoned().clear();
    for _ in 0..3 {
        fleet.passes().await;
    }
    let record = volume_record(&fleet, "data").await;
    assert!(record.one_copy && !record.replicated(), "{record:?}");
    assert_eq!(record.primary, "a");
    fleet.settle("c's copy goes", |f| !has_copy(f, "c")).await;
    assert!(has_copy(&fleet, "a"));
    assert_eq!(fleet.running_on("db"), ["a"]);
}

/// The source's node lost while the copy is made: a copy that is not up
/// to date is never taken over (the instance waits for `a`); once it is
/// (it has every write the guest saw complete), the failover takes it and
/// it is the volume's only copy from then on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failover_during_the_copy_takes_only_a_whole_copy() {
    let (fleet, m, _) = db_with_one_copy_asked_to_c().await;
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
    assert_eq!(fleet.owner("db").await, None, "a half copy was taken over");
    moving.abort();

    // The replication filled c's copy (the fakes mirror nothing).
    let req = vroom_types::VolumeCreateRequest {
        replicas: 2,
        ..one_copy("data", None)
    };
    let c = &fleet.member("c").engine.engine;
    c.create_volume_copy(&req).await.unwrap();
    set_volume_state(&fleet, "data", ReplicaState::UpToDate).await;
    fleet
        .settle("db runs on c", |f| f.running_on("db").contains(&"c".into()))
        .await;
    let record = volume_record(&fleet, "data").await;
    assert!(record.one_copy);
    assert_eq!(
        (
            record.primary.as_str(),
            record.replica.as_str(),
            record.epoch
        ),
        ("c", "", 2)
    );
}
