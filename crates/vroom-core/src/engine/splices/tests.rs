//! The splice and mirror engine on fakes: splicing, unsplicing, the
//! watchdog, recovery, and what moves with a VM.

use vroom_types::{
    FailMode, InstanceState, Name, NetworkSpec, RunRequest, SpliceRequest, SpliceState,
};

use crate::store::StateStore;
use crate::testing::{run_request, GuestBehavior, TestEngine};

async fn with_running_vm(dir: &std::path::Path) -> TestEngine {
    let t = TestEngine::new(dir);
    t.engine.recover().await.unwrap();
    t.engine
        .create_network(NetworkSpec {
            name: Name::new("lan").unwrap(),
            subnet: None,
            nat: false,
            isolated: false,
            mirror: false,
            allow_host: vec![],
        })
        .await
        .unwrap();
    t.engine
        .run(run_request("web", "hello", &[None]))
        .await
        .unwrap();
    wait(&t, "web", |i| i.status.state == InstanceState::Running).await;
    t
}

async fn wait(t: &TestEngine, name: &str, check: impl Fn(&vroom_types::Instance) -> bool) {
    for _ in 0..400 {
        if t.engine.get(name).is_ok_and(|i| check(&i)) {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(25)).await;
    }
    panic!(
        "{name} never got there: {:?}",
        t.engine.get(name).map(|i| i.status)
    );
}

fn request(appliance: &str) -> SpliceRequest {
    SpliceRequest {
        appliance: appliance.into(),
        vm: Name::new("web").unwrap(),
        nic: None,
        fail: None,
        name: None,
        ready_timeout_secs: Some(5),
    }
}

fn bridge_of(t: &TestEngine, tap: &str) -> Option<String> {
    t.net.attached.lock().unwrap().get(tap).cloned()
}

fn tap(t: &TestEngine, name: &str, index: usize) -> String {
    t.engine.get(name).unwrap().nics[index].tap.clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn splice_puts_the_appliance_in_the_path_and_unsplice_takes_it_out() {
    let dir = tempfile::tempdir().unwrap();
    let t = with_running_vm(dir.path()).await;
    let lan = t.engine.network("lan").unwrap().bridge;
    let web_tap = tap(&t, "web", 0);
    let web_pid = t.engine.get("web").unwrap().status.pid;
    assert_eq!(bridge_of(&t, &web_tap), Some(lan.clone()));

    let splice = t.engine.splice(request("bump")).await.unwrap();
    assert_eq!(splice.appliance.as_str(), "web-bump", "named VM-IMAGE");
    assert_eq!(splice.state, SpliceState::Active);
    assert_eq!(splice.fail, FailMode::Closed, "not a capture appliance");
    assert_eq!(bridge_of(&t, &web_tap), Some(splice.segment.clone()));
    assert_eq!(bridge_of(&t, &tap(&t, "web-bump", 0)), Some(lan.clone()));
    assert_eq!(
        bridge_of(&t, &tap(&t, "web-bump", 1)),
        Some(splice.segment.clone())
    );
    let appliance = t.engine.get("web-bump").unwrap();
    assert!(appliance.nics.iter().all(|n| n.ip.is_none()), "L2 ports");
    assert_eq!(t.store.splices().unwrap().len(), 1, "on record");
    assert_eq!(
        t.engine.get("web").unwrap().status.pid,
        web_pid,
        "VM untouched"
    );

    let err = t.engine.splice(request("web-bump")).await.unwrap_err();
    assert!(err.message.contains("already spliced"), "{}", err.message);
    let err = t.engine.remove("web-bump", true).await.unwrap_err();
    assert!(err.message.contains("unsplice"), "{}", err.message);
    let err = t.engine.remove("web", true).await.unwrap_err();
    assert!(err.message.contains("unsplice"), "{}", err.message);

    t.engine.unsplice("web-bump").await.unwrap();
    assert_eq!(bridge_of(&t, &web_tap), Some(lan));
    assert!(t.engine.get("web-bump").is_err(), "the appliance went");
    assert!(!t.net.bridges.lock().unwrap().contains(&splice.segment));
    assert!(t.store.splices().unwrap().is_empty());
    let err = t.engine.unsplice("web-bump").await.unwrap_err();
    assert_eq!(err.code, vroom_types::ErrorCode::NotFound);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_splices_change_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let t = with_running_vm(dir.path()).await;
    let before = t.engine.list().len();
    for (req, says) in [
        (request("hello"), "no outside and inside"),
        (request("nope"), "no instance or image"),
        (request("web"), "itself"),
        (
            SpliceRequest {
                nic: Some("eth7".into()),
                ..request("bump")
            },
            "no NIC",
        ),
        (
            SpliceRequest {
                vm: Name::new("ghost").unwrap(),
                ..request("bump")
            },
            "ghost",
        ),
    ] {
        let err = t.engine.splice(req).await.unwrap_err();
        assert!(err.message.contains(says), "{says}: {}", err.message);
    }
    t.engine
        .action("web", vroom_types::InstanceAction::Stop)
        .await
        .unwrap();
    let err = t.engine.splice(request("bump")).await.unwrap_err();
    assert!(err.message.contains("not running"), "{}", err.message);
    assert_eq!(t.engine.list().len(), before);
    assert!(t.engine.list_splices().is_empty());
}

/// An appliance that never becomes ready: the splice is undone whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_splice_whose_appliance_fails_is_undone() {
    let dir = tempfile::tempdir().unwrap();
    let t = with_running_vm(dir.path()).await;
    let web_tap = tap(&t, "web", 0);
    let lan = t.engine.network("lan").unwrap().bridge;
    t.driver.set_behavior(GuestBehavior::NeverReady);
    let mut req = request("bump");
    req.ready_timeout_secs = Some(1);
    t.engine.splice(req).await.unwrap_err();
    assert!(t.engine.list_splices().is_empty());
    assert!(t.store.splices().unwrap().is_empty());
    assert!(
        t.engine.get("web-bump").is_err(),
        "the appliance was removed"
    );
    assert_eq!(bridge_of(&t, &web_tap), Some(lan));
    let segments: Vec<String> = t
        .net
        .bridges
        .lock()
        .unwrap()
        .iter()
        .filter(|b| b.starts_with("tfs"))
        .cloned()
        .collect();
    assert!(segments.is_empty(), "{segments:?}");
}

/// A daemon killed inside a splice or an unsplice: the next one takes
/// the appliance out (the splice was never acknowledged, or its removal
/// was asked for), and nothing is left.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recovery_undoes_a_half_made_splice_and_finishes_an_unsplice() {
    for state in [SpliceState::Starting, SpliceState::Removing] {
        let dir = tempfile::tempdir().unwrap();
        let t = with_running_vm(dir.path()).await;
        let web_tap = tap(&t, "web", 0);
        let lan = t.engine.network("lan").unwrap().bridge;
        let mut splice = t.engine.splice(request("bump")).await.unwrap();
        splice.state = state;
        t.store.put_splice(&splice).unwrap();

        let engine = t.restarted();
        engine.recover().await.unwrap();
        assert!(engine.list_splices().is_empty(), "{state}");
        assert!(t.store.splices().unwrap().is_empty(), "{state}");
        assert!(
            engine.get("web-bump").is_err(),
            "{state}: appliance removed"
        );
        assert_eq!(bridge_of(&t, &web_tap), Some(lan), "{state}");
        assert!(!t.net.bridges.lock().unwrap().contains(&splice.segment));
    }
}

/// A restarted daemon rewires an active splice the way the record says,
/// even if someone moved the tap meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recovery_rewires_active_splices() {
    let dir = tempfile::tempdir().unwrap();
    let t = with_running_vm(dir.path()).await;
    let web_tap = tap(&t, "web", 0);
    let splice = t.engine.splice(request("bump")).await.unwrap();
    let lan = t.engine.network("lan").unwrap().bridge;
    t.net.attached.lock().unwrap().insert(web_tap.clone(), lan);
    let engine = t.restarted();
    engine.recover().await.unwrap();
    assert_eq!(bridge_of(&t, &web_tap), Some(splice.segment));
    assert_eq!(engine.list_splices()[0].state, SpliceState::Active);
}

/// A config change of a spliced fail-closed appliance whose services
/// restart for it: the watchdog holds while it is put in force, so the
/// path is never cut, and `config set` returns only once the appliance
/// passes its health check again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_config_change_does_not_trip_the_watchdog_and_returns_once_healthy() {
    use crate::testing::{SLOW_RESTART, SLOW_RESTART_VALUE};
    let dir = tempfile::tempdir().unwrap();
    let t = with_running_vm(dir.path()).await;
    let web_tap = tap(&t, "web", 0);
    let mut req = request("bump");
    req.fail = Some(FailMode::Closed);
    let splice = t.engine.splice(req).await.unwrap();
    let started = std::time::Instant::now();
    t.engine
        .config_update(
            "web-bump",
            [("greeting".to_string(), SLOW_RESTART_VALUE.to_string())].into(),
        )
        .await
        .unwrap();
    assert!(
        started.elapsed() >= SLOW_RESTART,
        "returned after {:?}, before the services were back",
        started.elapsed()
    );
    let cell = t.engine.cell("web-bump").unwrap();
    let report = cell.agent.health(std::time::Duration::from_secs(1)).await;
    assert!(report.unwrap().ready, "healthy when config set returns");
    // Well past two strikes of the watchdog.
    tokio::time::sleep(super::WATCH_EVERY * 4).await;
    let now = t.engine.get_splice("web-bump").unwrap();
    assert_eq!(now.state, SpliceState::Active, "{:?}", now.events);
    assert!(
        now.events
            .iter()
            .all(|e| !e.message.contains("failing closed")),
        "{:?}",
        now.events
    );
    assert_eq!(bridge_of(&t, &web_tap), Some(splice.segment));
}

/// The watchdog: a dead fail-open appliance is bypassed, and put back
/// when vroom has restarted it; a fail-closed one cuts the path.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_appliances_fail_open_or_closed() {
    for fail in [FailMode::Open, FailMode::Closed] {
        let dir = tempfile::tempdir().unwrap();
        let t = with_running_vm(dir.path()).await;
        let web_tap = tap(&t, "web", 0);
        let lan = t.engine.network("lan").unwrap().bridge;
        let mut req = request("bump");
        req.fail = Some(fail);
        let splice = t.engine.splice(req).await.unwrap();
        let pid = t.engine.get("web-bump").unwrap().status.pid.unwrap();
        t.driver.crash(pid);
        let want = match fail {
            FailMode::Open => SpliceState::Bypassed,
            FailMode::Closed => SpliceState::Cut,
        };
        let mut seen = None;
        for _ in 0..200 {
            let state = t.engine.get_splice("web-bump").unwrap().state;
            if state == want {
                seen = Some(bridge_of(&t, &web_tap));
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        let expected = match fail {
            FailMode::Open => Some(lan.clone()),
            FailMode::Closed => Some(splice.segment.clone()),
        };
        assert_eq!(seen, Some(expected), "{fail}");
        // vroom restarts it (backoff 1 s); the splice follows. The
        // record turns active first, then the tap moves: wait for both.
        for _ in 0..400 {
            let splice = t.engine.get_splice("web-bump").unwrap();
            if splice.state == SpliceState::Active
                && bridge_of(&t, &web_tap) == Some(splice.segment.clone())
            {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(25)).await;
        }
        let splice = t.engine.get_splice("web-bump").unwrap();
        assert_eq!(
            splice.state,
            SpliceState::Active,
            "{fail}: {:?}",
            splice.events
        );
        assert_eq!(bridge_of(&t, &web_tap), Some(splice.segment.clone()));
        assert!(splice
            .events
            .iter()
            .any(|e| e.message.contains("back in the path")));
    }
}

/// A VM restarted while spliced comes back behind its splice, and an
/// appliance restarted comes back in the path.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarts_come_back_wired_behind_the_splice() {
    let dir = tempfile::tempdir().unwrap();
    let t = with_running_vm(dir.path()).await;
    let lan = t.engine.network("lan").unwrap().bridge;
    let splice = t.engine.splice(request("bump")).await.unwrap();
    let web_tap = tap(&t, "web", 0);
    t.net.attached.lock().unwrap().remove(&web_tap);
    t.engine
        .action("web", vroom_types::InstanceAction::Restart)
        .await
        .unwrap();
    assert_eq!(bridge_of(&t, &web_tap), Some(splice.segment.clone()));
    let outside = tap(&t, "web-bump", 0);
    t.net.attached.lock().unwrap().remove(&outside);
    t.engine
        .action("web-bump", vroom_types::InstanceAction::Restart)
        .await
        .unwrap();
    wait(&t, "web-bump", |i| i.status.state == InstanceState::Running).await;
    for _ in 0..200 {
        if bridge_of(&t, &outside).is_some() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    assert_eq!(bridge_of(&t, &outside), Some(lan));
    assert_eq!(bridge_of(&t, &tap(&t, "web-bump", 1)), Some(splice.segment));
}

/// Two appliances stack in front of one NIC; unsplicing the outer one
/// closes the gap.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stacked_splices_close_the_gap_when_one_goes() {
    let dir = tempfile::tempdir().unwrap();
    let t = with_running_vm(dir.path()).await;
    let web_tap = tap(&t, "web", 0);
    let lan = t.engine.network("lan").unwrap().bridge;
    let named = |name: &str| SpliceRequest {
        name: Some(Name::new(name).unwrap()),
        ..request("bump")
    };
    let outer = t.engine.splice(named("fw")).await.unwrap();
    let inner = t.engine.splice(named("snf")).await.unwrap();
    assert_eq!(bridge_of(&t, &tap(&t, "fw", 0)), Some(lan.clone()));
    assert_eq!(
        bridge_of(&t, &tap(&t, "snf", 0)),
        Some(outer.segment.clone())
    );
    assert_eq!(bridge_of(&t, &web_tap), Some(inner.segment.clone()));
    t.engine.unsplice("fw").await.unwrap();
    assert_eq!(bridge_of(&t, &tap(&t, "snf", 0)), Some(lan.clone()));
    assert_eq!(bridge_of(&t, &web_tap), Some(inner.segment));
    t.engine.unsplice("snf").await.unwrap();
    assert_eq!(bridge_of(&t, &web_tap), Some(lan));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mirrors_follow_launches_and_refuse_non_capture_nics() {
    let dir = tempfile::tempdir().unwrap();
    let t = with_running_vm(dir.path()).await;
    let req = |to: &str, filter: Option<&str>| vroom_types::MirrorRequest {
        vm: Name::new("web").unwrap(),
        nic: None,
        to: Name::new(to).unwrap(),
        to_nic: None,
        filter: filter.map(String::from),
    };
    let err = t.engine.mirror(req("web", None)).await.unwrap_err();
    assert!(err.message.contains("itself"), "{}", err.message);
    // `bump` has no mirror-sink NIC.
    t.engine.splice(request("bump")).await.unwrap();
    let err = t.engine.mirror(req("web-bump", None)).await.unwrap_err();
    assert!(err.message.contains("capture NIC"), "{}", err.message);
    assert!(t.engine.list_mirrors().is_empty());
    assert!(t.net.mirrors.lock().unwrap().is_empty());
}

/// A spliced appliance does not migrate alone, and neither does a VM
/// behind an appliance that was an instance of its own; a VM whose
/// splice made its appliance streams out, stays paused, and runs again
/// when the migration does not hand it over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spliced_appliance_does_not_migrate_alone_and_an_unhanded_vm_runs_again() {
    let dir = tempfile::tempdir().unwrap();
    let t = with_running_vm(dir.path()).await;
    t.engine.splice(request("bump")).await.unwrap();
    let (channel, _peer) = std::os::unix::net::UnixStream::pair().unwrap();
    let err = t
        .engine
        .send_live("web-bump", channel.into())
        .await
        .unwrap_err();
    assert!(
        err.message.contains("cannot move to another node")
            && err.message.contains("moves with it"),
        "{}",
        err.message
    );
    assert_eq!(t.engine.immovable_reason("web"), None);
    // An appliance of its own, spliced: its VM stays.
    t.engine.unsplice("web-bump").await.unwrap();
    t.engine
        .run(run_request(
            "own",
            "bump",
            &[Some("outside"), Some("inside")],
        ))
        .await
        .unwrap();
    wait(&t, "own", |i| i.status.state == InstanceState::Running).await;
    t.engine
        .action("own", vroom_types::InstanceAction::Stop)
        .await
        .unwrap();
    wait(&t, "own", |i| i.status.state == InstanceState::Stopped).await;
    t.engine.splice(request("own")).await.unwrap();
    let (channel, _peer) = std::os::unix::net::UnixStream::pair().unwrap();
    let err = t.engine.send_live("web", channel.into()).await.unwrap_err();
    assert!(
        err.message.contains("instance of its own"),
        "{}",
        err.message
    );
    t.engine.unsplice("own").await.unwrap();
    let (channel, _peer) = std::os::unix::net::UnixStream::pair().unwrap();
    let sent = t.engine.send_live("web", channel.into()).await.unwrap();
    assert!(!sent.volume.is_empty(), "the config volume goes along");
    assert_eq!(t.engine.migrating_out(), vec!["web".to_string()]);
    let process = t
        .engine
        .cell("web")
        .unwrap()
        .lock()
        .process
        .clone()
        .unwrap();
    assert_eq!(
        crate::driver::VmDriver::run_state(t.driver.as_ref(), &process).unwrap(),
        crate::driver::VmRunState::Paused
    );
    t.engine.resume_unmigrated("web").await.unwrap();
    assert_eq!(
        crate::driver::VmDriver::run_state(t.driver.as_ref(), &process).unwrap(),
        crate::driver::VmRunState::Running
    );
    assert!(t.engine.migrating_out().is_empty());
}

/// Another node with `a`'s network `lan`, where `a`'s VMs could move.
async fn peer_of(a: &TestEngine, dir: &std::path::Path) -> TestEngine {
    let b = TestEngine::new(dir);
    b.engine.recover().await.unwrap();
    let lan = a.engine.network("lan").unwrap();
    b.engine
        .create_network(NetworkSpec {
            name: lan.name,
            subnet: Some(lan.subnet),
            nat: false,
            isolated: false,
            mirror: false,
            allow_host: vec![],
        })
        .await
        .unwrap();
    b
}

/// A daemon killed while a VM's splice is being made on the node it
/// moves to: the next one takes the half-made splice out, appliance,
/// segment and all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_half_moved_splice_is_taken_out_by_recovery() {
    let dir = tempfile::tempdir().unwrap();
    let a = with_running_vm(dir.path()).await;
    a.engine.splice(request("bump")).await.unwrap();
    let wiring = a.engine.wiring_of("web").unwrap();
    let other = tempfile::tempdir().unwrap();
    let b = peer_of(&a, other.path()).await;
    b.driver.set_behavior(GuestBehavior::NeverReady);
    let engine = b.engine.clone();
    let moving = tokio::spawn(async move { engine.install_wiring("web", &wiring).await });
    let mut booting = false;
    for _ in 0..200 {
        booting = b.engine.get("web-bump").is_ok();
        if booting {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    assert!(booting, "the appliance never started");
    let segment = b.engine.get_splice("web-bump").unwrap().segment;
    assert!(b.net.bridges.lock().unwrap().contains(&segment));
    moving.abort();

    let engine = b.restarted();
    engine.recover().await.unwrap();
    assert!(engine.list_splices().is_empty());
    assert!(b.store.splices().unwrap().is_empty());
    assert!(engine.get("web-bump").is_err(), "appliance removed");
    assert!(!b.net.bridges.lock().unwrap().contains(&segment));
    assert!(b.driver.running().is_empty(), "{:?}", b.driver.running());
}

/// A VM's splices move with it: another node makes its appliance with
/// the same id and config, in the path before the VM arrives; the node
/// it left takes its copies out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wiring_moves_with_its_vm() {
    let dir = tempfile::tempdir().unwrap();
    let a = with_running_vm(dir.path()).await;
    a.engine.splice(request("bump")).await.unwrap();
    a.engine
        .config_update(
            "web-bump",
            [("greeting".to_string(), "moved".to_string())].into(),
        )
        .await
        .unwrap();
    let wiring = a.engine.wiring_of("web").expect("web has a splice");
    assert_eq!(wiring.splices.len(), 1);
    let carried = &wiring.splices[0];
    let appliance = a.engine.get("web-bump").unwrap();
    assert_eq!(carried.id, appliance.id);
    assert_eq!(carried.spec.image, appliance.image_id, "pinned by id");
    assert!(a.engine.wiring_of("web-bump").is_none());

    // The other node: the network, then the wiring, then the VM.
    let other = tempfile::tempdir().unwrap();
    let b = peer_of(&a, other.path()).await;
    b.engine.install_wiring("web", &wiring).await.unwrap();
    let moved = b.engine.get_splice("web-bump").unwrap();
    assert_eq!(moved.state, SpliceState::Active);
    assert_ne!(moved.segment, carried.splice.segment, "this node's segment");
    let copy = b.engine.get("web-bump").unwrap();
    assert_eq!(copy.id, appliance.id, "same identity, same MACs");
    let volume = b.engine.cell("web-bump").unwrap().volume();
    let on_volume = vroom_volume::read_config(&volume).unwrap();
    assert_eq!(
        on_volume.get("greeting").map(String::as_str),
        Some("moved"),
        "its config came"
    );
    b.engine.install_wiring("web", &wiring).await.unwrap();
    assert_eq!(
        b.engine.list_splices().len(),
        1,
        "installing twice is a no-op"
    );
    assert_eq!(b.engine.wired_elsewhere(), vec!["web".to_string()]);
    let web = a.engine.get("web").unwrap();
    b.engine
        .run_as(
            RunRequest {
                spec: web.spec.clone(),
                ready_timeout_secs: Some(30),
                from_snapshot: None,
                cold: false,
                placement: Default::default(),
                env: Default::default(),
            },
            Some(crate::cluster::Identity {
                id: web.id.clone(),
                config: None,
                cluster: false,
            }),
        )
        .await
        .unwrap();
    wait(&b, "web", |i| i.status.state == InstanceState::Running).await;
    assert_eq!(
        bridge_of(&b, &tap(&b, "web", 0)),
        Some(moved.segment.clone())
    );
    let lan = b.engine.network("lan").unwrap().bridge;
    assert_eq!(
        bridge_of(&b, &tap(&b, "web-bump", 0)),
        Some(lan),
        "outside on the network"
    );
    assert_eq!(
        bridge_of(&b, &tap(&b, "web-bump", 1)),
        Some(moved.segment.clone()),
        "inside on the segment once the VM came"
    );
    assert!(b.engine.wired_elsewhere().is_empty());

    // The node it left.
    a.engine.drop_wiring("web").await;
    assert!(a.engine.list_splices().is_empty());
    assert!(a.engine.get("web-bump").is_err(), "its appliance went");
    assert!(
        a.engine.get("web").is_ok(),
        "the VM is the cluster's to remove"
    );

    // A name taken on the other node refuses the move and leaves nothing.
    let third = tempfile::tempdir().unwrap();
    let c = with_running_vm(third.path()).await;
    c.engine.splice(request("bump")).await.unwrap();
    let err = c.engine.install_wiring("other", &wiring).await.unwrap_err();
    assert!(
        err.message.contains("spliced in front of web"),
        "{}",
        err.message
    );
    assert_eq!(c.engine.list_splices().len(), 1);
}

/// The cluster's half for these tests: it refuses every change to the
/// instances it names (they are migrating away) and takes the rest.
struct Migrating(Vec<&'static str>);

#[async_trait::async_trait]
impl crate::cluster::ClusterHooks for Migrating {
    fn may_change(&self, name: &str, spliced_into: Option<&str>) -> Result<(), crate::OpError> {
        match [Some(name), spliced_into]
            .into_iter()
            .flatten()
            .find(|n| self.0.contains(n))
        {
            Some(moving) => Err(crate::OpError::conflict(format!("{moving} is migrating"))),
            None => Ok(()),
        }
    }
    fn replicate_config(&self, _: crate::cluster::ConfigReplica<'_>) -> Result<(), crate::OpError> {
        Ok(())
    }
    async fn replicate_wiring(
        &self,
        _: &str,
        _: Option<crate::cluster::Wiring>,
    ) -> Result<(), crate::OpError> {
        Ok(())
    }
    fn may_launch(&self, _: &str, _: bool) -> Result<(), crate::OpError> {
        Ok(())
    }
}

/// While a VM migrates away, its splices, mirrors and config are not
/// changed at all: the destination has read them already.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_about_a_migrating_vm_changes() {
    let dir = tempfile::tempdir().unwrap();
    let t = with_running_vm(dir.path()).await;
    t.engine.splice(request("bump")).await.unwrap();
    let web_config = t.engine.config_get("web").await.unwrap();
    t.engine
        .set_cluster(std::sync::Arc::new(Migrating(vec!["web"])));

    let before = t.engine.list().len();
    let err = t.engine.splice(request("bump")).await.unwrap_err();
    assert!(err.message.contains("migrating"), "{}", err.message);
    let err = t.engine.unsplice("web-bump").await.unwrap_err();
    assert!(err.message.contains("migrating"), "{}", err.message);
    let set = [("greeting".to_string(), "changed".to_string())].into();
    let err = t.engine.config_update("web", set).await.unwrap_err();
    assert!(err.message.contains("migrating"), "{}", err.message);
    // The appliance moves with its VM: the engine tells the cluster
    // which VM it is spliced in front of.
    let set = [("greeting".to_string(), "changed".to_string())].into();
    let err = t.engine.config_update("web-bump", set).await.unwrap_err();
    assert!(err.message.contains("web is migrating"), "{}", err.message);

    assert_eq!(t.engine.config_get("web").await.unwrap(), web_config);
    let splices = t.engine.list_splices();
    assert_eq!(splices.len(), 1, "{splices:?}");
    assert_eq!(splices[0].state, SpliceState::Active);
    assert_eq!(t.engine.list().len(), before, "no appliance made");
    assert_eq!(t.store.splices().unwrap().len(), 1);
}

/// A mirror that came with its VM copies to the capture appliance it
/// was made for, never to another instance that has its name here.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_moved_mirror_copies_only_to_its_own_capture_appliance() {
    let dir = tempfile::tempdir().unwrap();
    let t = with_running_vm(dir.path()).await;
    t.engine
        .run(run_request("sn", "router", &[None, None, None]))
        .await
        .unwrap();
    wait(&t, "sn", |i| i.status.state == InstanceState::Running).await;
    let web_tap = tap(&t, "web", 0);
    let sn = t.engine.get("sn").unwrap();
    let wiring = |to_id: &str| crate::cluster::Wiring {
        splices: vec![],
        mirrors: vec![vroom_types::Mirror {
            id: format!("web.0-sn.0-{to_id}"),
            vm: Name::new("web").unwrap(),
            nic: 0,
            to: Name::new("sn").unwrap(),
            to_nic: 0,
            to_id: Some(to_id.to_string()),
            filter: None,
            created_at: 0,
        }],
    };
    let targets = |t: &TestEngine| {
        t.net
            .mirrors
            .lock()
            .unwrap()
            .get(&web_tap)
            .map_or(0, |v| v.len())
    };
    t.engine
        .install_wiring("web", &wiring("someone-else"))
        .await
        .unwrap();
    t.engine
        .refresh_mirrors_for(&Name::new("web").unwrap())
        .await;
    assert_eq!(targets(&t), 0, "copied to a stranger named sn");
    t.engine
        .install_wiring("web", &wiring(&sn.id))
        .await
        .unwrap();
    t.engine
        .refresh_mirrors_for(&Name::new("web").unwrap())
        .await;
    assert_eq!(targets(&t), 1, "its own sn gets the copy");
}
