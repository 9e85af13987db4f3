//! Services' side of the cluster: records changed by compare-and-swap,
//! and which node keeps a service.

use vroom_types::{ServiceDefinition, ServiceRecord};

use super::*;

fn web() -> ServiceRecord {
    let spec = ServiceDefinition {
        name: "web".parse().unwrap(),
        image: "hello".into(),
        replicas: 2,
        max_replicas: None,
        network: Some("lan".parse().unwrap()),
        room: None,
        port: 80,
        scale_on: None,
        warm: true,
    };
    ServiceRecord::new(spec, 0)
}

/// Two nodes record the same service: one wins. Changes made from both
/// nodes at once are all kept (each is applied again to the record another
/// wrote meanwhile), and a change that refuses writes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn service_records_are_the_cluster_s_and_no_change_is_lost() {
    let fleet = Fleet::new(&["a", "b"]).await;
    let (a, b) = (fleet.node("a"), fleet.node("b"));
    let record = web();
    let (ra, rb) = tokio::join!(
        a.create_service_record(&record),
        b.create_service_record(&record)
    );
    assert!(ra.is_ok() != rb.is_ok(), "exactly one creates it");
    let lost = ra.err().or(rb.err()).unwrap();
    assert_eq!(lost.code, ErrorCode::AlreadyExists);

    let mut edits = tokio::task::JoinSet::new();
    for i in 0..16 {
        let node = if i % 2 == 0 { a.clone() } else { b.clone() };
        edits.spawn(async move {
            node.edit_service_record("web", &mut |r| {
                r.next += 1;
                Ok(())
            })
            .await
        });
    }
    while let Some(done) = edits.join_next().await {
        done.unwrap().unwrap();
    }
    let seen = b.service_records().await.unwrap();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].next, 17, "every change is kept");

    let refused = a
        .edit_service_record("web", &mut |r| {
            r.next = 1000;
            Err(OpError::conflict("no"))
        })
        .await;
    assert!(refused.is_err());
    assert_eq!(b.service_records().await.unwrap()[0].next, 17);
    let missing = a.edit_service_record("nope", &mut |_| Ok(())).await;
    assert_eq!(missing.unwrap_err().code, ErrorCode::NotFound);

    b.delete_service_record("web").await.unwrap();
    assert!(a.service_records().await.unwrap().is_empty());
}

/// The leader keeps a service whose balancer the cluster does not have;
/// the balancer's owner keeps it once it runs, and whoever takes the
/// balancer over when its node is lost; never two nodes at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_is_kept_by_its_balancer_s_node_or_else_the_leader() {
    let fleet = Fleet::new(&["a", "b"]).await;
    // The first pass elects a leader, the second sees it.
    fleet.passes().await;
    fleet.passes().await;
    let (a, b) = (fleet.node("a"), fleet.node("b"));
    let keepers = || {
        [("a", &a), ("b", &b)]
            .into_iter()
            .filter(|(_, n)| n.keeps_service("web-lb"))
            .map(|(name, _)| name)
            .collect::<Vec<_>>()
    };
    let leader = if a.leads.load(Ordering::SeqCst) {
        "a"
    } else {
        "b"
    };
    assert_eq!(
        keepers(),
        [leader],
        "the leader, while there is no balancer"
    );

    let other = if leader == "a" { "b" } else { "a" };
    fleet
        .run(leader, request("web-lb", Some(other), HaPolicy::Restart))
        .await;
    fleet
        .settle("the balancer runs", |f| f.running_on("web-lb") == [other])
        .await;
    assert_eq!(keepers(), [other], "the balancer's node");

    fleet.stop(other);
    assert!(keepers().is_empty() || keepers() == [leader]);
    fleet
        .settle("the balancer comes back on the leader", |f| {
            // (The stopped node's engine still shows its VM: its guard
            // would have killed it.)
            f.running_on("web-lb").contains(&leader.to_string())
        })
        .await;
    assert_eq!(keepers(), [leader], "the balancer's new node");
}

/// An instance inspected from another node shows the config the cluster
/// holds now, not the one its node last published with its state (a
/// config change is replicated, not republished): a service's keeper
/// elsewhere counts its members as balanced from the balancer's config.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_remote_instance_shows_its_config_as_the_cluster_holds_it() {
    let fleet = Fleet::new(&["a", "b"]).await;
    fleet
        .run("a", request("lb", Some("a"), HaPolicy::Restart))
        .await;
    fleet
        .settle("lb runs on a", |f| f.running_on("lb") == ["a"])
        .await;
    fleet.passes().await;
    let before = fleet.node("b").instance("lb").await.unwrap().unwrap();
    assert_eq!(
        before.config.get("greeting").map(String::as_str),
        Some("hello")
    );
    fleet
        .member("a")
        .engine
        .engine
        .config_update("lb", values(&[("greeting", "changed")]))
        .await
        .unwrap();
    fleet.passes().await;
    let after = fleet.node("b").instance("lb").await.unwrap().unwrap();
    assert_eq!(
        after.config.get("greeting").map(String::as_str),
        Some("changed")
    );
    let listed = fleet.node("b").instances().await.unwrap();
    let lb = listed
        .iter()
        .find(|i| i.spec.name.as_str() == "lb")
        .unwrap();
    assert_eq!(
        lb.config.get("greeting").map(String::as_str),
        Some("changed")
    );
}
