//! A cluster's volume with one copy (`vroom volume create NAME --replicas
//! 1 [--node N]`): recorded like a replicated one so every node lists it,
//! its instance pinned to its node, and never booted elsewhere on an
//! empty disk while that node is lost.

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

/// An instance using a volume with one copy: `--node` elsewhere, `--ha
/// standby`, a migration and a drain are refused with the reason, and
/// nothing is made; `node rm` of its dead node is refused (it holds the
/// only copy).
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
    let e = a.migrate("db", "b").await.unwrap_err();
    assert!(e.message.contains("one copy, on node a"), "{}", e.message);
    let view = a.view().await.unwrap();
    assert_eq!(
        view.target_for("db", "a"),
        None,
        "a drain has nowhere to take it"
    );
    let (_, plan) = view.drain_plan("a");
    assert_eq!(plan.stuck.len(), 1, "{plan:?}");

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
