//! The engine against the in-memory seams of [`crate::testing`]: create
//! rollback, the monitor, the restart policy, generation fencing and
//! recovery after a daemon crash, without root or QEMU.

use std::time::Duration;

use vroom_types::{ErrorCode, InstanceAction, InstanceState, Name, RunRequest};

use crate::testing::{GuestBehavior, TestEngine};

fn request(name: &str) -> RunRequest {
    crate::testing::run_request(name, "hello", &[])
}

/// Waits (in paused-free real time, bounded) for an instance to reach a state.
async fn wait_state(t: &TestEngine, name: &str, want: InstanceState) -> vroom_types::Instance {
    for _ in 0..400 {
        if let Ok(i) = t.engine.get(name) {
            if i.status.state == want {
                return i;
            }
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!(
        "{name} never became {want}: {:?}",
        t.engine.get(name).map(|i| i.status)
    );
}

fn stored_state(t: &TestEngine, name: &str) -> Option<InstanceState> {
    use crate::store::StateStore;
    t.store
        .instances()
        .unwrap()
        .into_iter()
        .find(|r| r.instance.spec.name.as_str() == name)
        .map(|r| r.instance.status.state)
}

/// On the daemon's multi-threaded runtime, so that blocking work goes
/// through `block_in_place`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_becomes_running_and_is_recorded() {
    let dir = tempfile::tempdir().unwrap();
    let t = TestEngine::new(dir.path());
    t.engine.run(request("web")).await.unwrap();
    let i = wait_state(&t, "web", InstanceState::Running).await;
    assert!(i.status.pid.is_some());
    let phases = i.status.boot_phases.expect("a boot's phases");
    assert_eq!(
        (phases.kernel_ms, phases.init_ms),
        (crate::testing::FAKE_KERNEL_MS, crate::testing::FAKE_INIT_MS)
    );
    assert_eq!(stored_state(&t, "web"), Some(InstanceState::Running));
    assert_eq!(t.driver.running().len(), 1);
    assert_eq!(t.net.attached.lock().unwrap().len(), 1);
}

/// Defect 1: a guest that dies during boot used to panic the monitor
/// ("async fn resumed after completion") and leave the instance `starting`.
#[tokio::test]
async fn guest_dying_at_boot_fails_fast_with_its_last_words() {
    let dir = tempfile::tempdir().unwrap();
    let t = TestEngine::new(dir.path());
    t.driver
        .set_behavior(GuestBehavior::PanicAtBoot(Duration::from_millis(50)));
    t.engine.run(request("broken")).await.unwrap();
    let i = wait_state(&t, "broken", InstanceState::Failed).await;
    let error = i.status.last_error.unwrap();
    assert!(error.contains("Kernel panic"), "{error}");
    assert_eq!(i.status.pid, None);
    // Never restarted: it has never been ready.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(t.driver.launches(), 1);
    assert_eq!(
        t.engine.get("broken").unwrap().status.state,
        InstanceState::Failed
    );
}

/// An instance that has been running is restarted when a later boot dies,
/// like any other crash.
#[tokio::test]
async fn crash_of_a_running_instance_restarts_it() {
    let dir = tempfile::tempdir().unwrap();
    let t = TestEngine::new(dir.path());
    t.engine.run(request("web")).await.unwrap();
    let i = wait_state(&t, "web", InstanceState::Running).await;
    let first = i.status.pid.unwrap();
    t.driver.crash(first);
    // Restart backoff for the first crash is 1 s.
    let mut restarted = None;
    for _ in 0..200 {
        let i = t.engine.get("web").unwrap();
        if i.status.state == InstanceState::Running && i.status.pid != Some(first) {
            restarted = Some(i);
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let i = restarted.expect("restarted");
    assert_eq!(i.status.restarts, 1);
    assert_eq!(t.driver.running().len(), 1);
}

#[tokio::test]
async fn failed_launch_rolls_back_everything_it_made() {
    let dir = tempfile::tempdir().unwrap();
    let t = TestEngine::new(dir.path());
    t.net
        .fail_attach
        .store(true, std::sync::atomic::Ordering::SeqCst);
    let err = t.engine.run(request("web")).await.unwrap_err();
    assert!(err.message.contains("NIC"), "{}", err.message);
    assert!(t.engine.list().is_empty());
    assert_eq!(stored_state(&t, "web"), None);
    assert!(t.driver.running().is_empty(), "the VMM was left running");
    assert!(
        t.engine.list_networks().is_empty(),
        "the default network stayed"
    );
    assert!(t.net.bridges.lock().unwrap().is_empty());
    let leftovers: Vec<_> = std::fs::read_dir(dir.path().join("instances"))
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

/// Defect 4: a bridge vroom did not create is refused, never rolled back.
#[tokio::test]
async fn a_foreign_bridge_is_refused_and_left_alone() {
    let dir = tempfile::tempdir().unwrap();
    let t = TestEngine::new(dir.path());
    let bridge = crate::ipam::bridge_name("tf", &dir.path().display().to_string(), "default");
    t.net.foreign.lock().unwrap().insert(bridge.clone());
    let err = t.engine.run(request("web")).await.unwrap_err();
    assert_eq!(err.code, vroom_types::ErrorCode::Conflict);
    assert!(err.message.contains(&bridge), "{}", err.message);
    assert!(err.message.contains("ip link delete"), "{}", err.message);
    assert!(
        t.net.foreign.lock().unwrap().contains(&bridge),
        "rolled back a bridge it did not make"
    );
    // Still refused on retry: the first failure must not have removed it.
    assert!(t.engine.run(request("web")).await.is_err());
}

/// A stopped instance's old monitor must not act on a later exit.
#[tokio::test]
async fn stop_fences_the_old_monitor() {
    let dir = tempfile::tempdir().unwrap();
    let t = TestEngine::new(dir.path());
    t.engine.run(request("web")).await.unwrap();
    wait_state(&t, "web", InstanceState::Running).await;
    t.engine.action("web", InstanceAction::Stop).await.unwrap();
    assert_eq!(
        t.engine.get("web").unwrap().status.state,
        InstanceState::Stopped
    );
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(
        t.engine.get("web").unwrap().status.state,
        InstanceState::Stopped
    );
    assert!(t.driver.running().is_empty());
    assert_eq!(t.driver.launches(), 1);
}

/// Defect 5: a VMM launched but not yet recorded when the daemon died is
/// adopted, and one whose instance is gone is killed.
#[tokio::test]
async fn recovery_adopts_unrecorded_vms_and_kills_ownerless_ones() {
    let dir = tempfile::tempdir().unwrap();
    let t = TestEngine::new(dir.path());
    t.engine.run(request("web")).await.unwrap();
    let i = wait_state(&t, "web", InstanceState::Running).await;
    // The daemon "dies" with the record still saying no process (as after a
    // kill between the VMM start and the commit), and a stray VMM whose
    // record never got written.
    {
        use crate::store::StateStore;
        let mut record = t
            .store
            .instances()
            .unwrap()
            .into_iter()
            .find(|r| r.instance.spec.name.as_str() == "web")
            .unwrap();
        record.process = None;
        record.instance.status.state = InstanceState::Starting;
        t.store.put_instance(&record).unwrap();
    }
    let stray_dir = dir.path().join("instances").join("0123456789abcdef");
    let stray = t.driver.spawn_stray(&stray_dir);
    let engine = t.restarted();
    engine.recover().await.unwrap();
    let running = t.driver.running();
    assert_eq!(
        running,
        vec![i.status.pid.unwrap()],
        "stray not killed or web not adopted"
    );
    assert!(!stray_dir.exists(), "the stray's run dir stayed");
    for _ in 0..200 {
        if engine.get("web").unwrap().status.state == InstanceState::Running {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let web = engine.get("web").unwrap();
    assert_eq!(web.status.state, InstanceState::Running);
    assert_eq!(web.status.pid, i.status.pid);
    assert_ne!(stray.pid, web.status.pid.unwrap());
    assert_eq!(t.driver.launches(), 2, "recovery launched a duplicate");
}

/// Defect 6: a stop interrupted by a daemon crash is finished by recovery
/// instead of leaving the instance `stopping` forever.
#[tokio::test]
async fn recovery_finishes_an_interrupted_stop() {
    let dir = tempfile::tempdir().unwrap();
    let t = TestEngine::new(dir.path());
    t.engine.run(request("web")).await.unwrap();
    wait_state(&t, "web", InstanceState::Running).await;
    {
        use crate::store::StateStore;
        let mut record = t.store.instances().unwrap().remove(0);
        record.instance.status.state = InstanceState::Stopping;
        record.instance.desired = vroom_types::DesiredState::Stopped;
        t.store.put_instance(&record).unwrap();
    }
    let engine = t.restarted();
    engine.recover().await.unwrap();
    for _ in 0..400 {
        if engine.get("web").unwrap().status.state == InstanceState::Stopped {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert_eq!(
        engine.get("web").unwrap().status.state,
        InstanceState::Stopped
    );
    assert!(t.driver.running().is_empty());
    // And it can be started again.
    engine.action("web", InstanceAction::Start).await.unwrap();
}

/// A guest that never reports ready is failed at its deadline and its VMM killed.
#[tokio::test]
async fn a_guest_that_never_gets_ready_is_failed_at_the_deadline() {
    let dir = tempfile::tempdir().unwrap();
    let t = TestEngine::new(dir.path());
    t.driver.set_behavior(GuestBehavior::NeverReady);
    let mut req = request("slow");
    req.ready_timeout_secs = Some(1);
    t.engine.run(req).await.unwrap();
    let i = wait_state(&t, "slow", InstanceState::Failed).await;
    assert!(i.status.last_error.unwrap().contains("ready"));
    for _ in 0..100 {
        if t.driver.running().is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert!(t.driver.running().is_empty());
}

/// A client waiting for ready is answered when the state changes, not at
/// the end of its wait: ready, or failed at the guest's deadline; a wait
/// of zero answers at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wait_for_ready_is_answered_when_the_state_changes() {
    let dir = tempfile::tempdir().unwrap();
    let t = TestEngine::new(dir.path());
    let long = Duration::from_secs(30);
    assert_eq!(
        t.engine
            .wait_settled("nobody", long)
            .await
            .unwrap_err()
            .code,
        ErrorCode::NotFound
    );

    t.engine.run(request("web")).await.unwrap();
    let i = t.engine.wait_settled("web", long).await.unwrap();
    assert_eq!(i.status.state, InstanceState::Running);
    assert!(i.health.is_none(), "the guest is not asked again");

    t.driver.set_behavior(GuestBehavior::NeverReady);
    let mut req = request("slow");
    req.ready_timeout_secs = Some(2);
    t.engine.run(req).await.unwrap();
    let i = t.engine.wait_settled("slow", Duration::ZERO).await.unwrap();
    assert_eq!(i.status.state, InstanceState::Starting);
    let asked = std::time::Instant::now();
    let i = t.engine.wait_settled("slow", long).await.unwrap();
    assert_eq!(i.status.state, InstanceState::Failed);
    assert!(
        asked.elapsed() < Duration::from_secs(10),
        "answered after {:?}",
        asked.elapsed()
    );
}

/// NIC roles: named roles are honoured, and a router's wan may not sit on
/// an isolated network (nothing would route it out).
#[tokio::test]
async fn nic_roles_are_assigned_and_a_routers_wan_stays_off_isolated_networks() {
    use vroom_types::{NetworkSpec, NicSpec};
    let dir = tempfile::tempdir().unwrap();
    let t = TestEngine::new(dir.path());
    let net = |name: &str, isolated: bool| NetworkSpec {
        name: Name::new(name).unwrap(),
        subnet: None,
        nat: false,
        isolated,
        mirror: false,
        allow_host: vec![],
    };
    t.engine.create_network(net("up", false)).await.unwrap();
    t.engine.create_network(net("inside", true)).await.unwrap();
    let nic = |network: &str, role: Option<&str>| NicSpec {
        network: Name::new(network).unwrap(),
        ip: None,
        role: role.map(|r| Name::new(r).unwrap()),
    };
    let mut req = request("fw");
    req.spec.image = "router".into();
    req.spec.nics = vec![nic("inside", Some("lan")), nic("up", None)];
    let fw = t.engine.run(req.clone()).await.unwrap();
    let roles: Vec<_> = fw.nics.iter().map(|n| n.role.clone().unwrap()).collect();
    assert_eq!(roles, ["lan", "wan"]);
    // The router's inside NIC on the isolated network is its gateway.
    let inside = t.engine.network("inside").unwrap();
    assert_eq!(fw.nics[0].ip, Some(inside.gateway));

    req.spec.name = Name::new("fw2").unwrap();
    req.spec.nics = vec![nic("inside", Some("wan"))];
    let err = t.engine.run(req).await.unwrap_err();
    assert!(
        err.message.contains("isolated network inside"),
        "{}",
        err.message
    );
}

/// Config transactions: an accepted change is a new version that `get`
/// shows; one the guest's check refuses changes nothing, neither the config
/// nor the history; rollback is itself a version.
#[tokio::test]
async fn config_changes_are_transactions_with_history() {
    use crate::testing::REJECTED_VALUE;
    let dir = tempfile::tempdir().unwrap();
    let t = TestEngine::new(dir.path());
    t.engine.run(request("web")).await.unwrap();
    wait_state(&t, "web", InstanceState::Running).await;
    let set =
        |v: &str| -> vroom_types::ConfigValues { [("greeting".to_string(), v.to_string())].into() };
    let applied = t.engine.config_update("web", set("hi")).await.unwrap();
    assert_eq!(applied["greeting"], "hi");
    assert_eq!(t.engine.config_get("web").await.unwrap()["greeting"], "hi");
    let versions = t.engine.config_history("web").await.unwrap().versions.len();

    let err = t
        .engine
        .config_update("web", set(REJECTED_VALUE))
        .await
        .unwrap_err();
    assert!(err.message.contains("check refused"), "{}", err.message);
    assert_eq!(t.engine.config_get("web").await.unwrap()["greeting"], "hi");
    assert_eq!(t.engine.get("web").unwrap().config["greeting"], "hi");
    assert_eq!(
        t.engine.config_history("web").await.unwrap().versions.len(),
        versions,
        "a refused change made a version"
    );

    t.engine.config_rollback("web", None).await.unwrap();
    assert_eq!(
        t.engine.config_get("web").await.unwrap()["greeting"],
        "hello"
    );
    assert_eq!(
        t.engine.config_history("web").await.unwrap().versions.len(),
        versions + 1
    );
    // The history goes with the instance.
    t.engine.remove("web", true).await.unwrap();
    use crate::store::StateStore;
    assert!(t.store.config_log("web").unwrap().is_none());
}

/// The console reaches `logs` through the collector, each boot keeps its
/// own, and a restarted daemon sweeps console files the layout does not name.
#[tokio::test]
async fn consoles_are_collected_per_boot_and_stale_files_swept() {
    use crate::testing::BOOT_CONSOLE;
    let dir = tempfile::tempdir().unwrap();
    let t = TestEngine::new(dir.path());
    t.engine.run(request("web")).await.unwrap();
    let i = wait_state(&t, "web", InstanceState::Running).await;
    let mut console = String::new();
    for _ in 0..200 {
        console = t.engine.logs("web", 0, 0).unwrap().0;
        if console == BOOT_CONSOLE {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert_eq!(console, BOOT_CONSOLE, "the collector wrote the console");
    t.engine
        .action("web", InstanceAction::Restart)
        .await
        .unwrap();
    wait_state(&t, "web", InstanceState::Running).await;
    assert_eq!(t.engine.logs("web", -1, 0).unwrap().0, BOOT_CONSOLE);

    let run_dir = dir.path().join("instances").join(&i.id);
    for stale in ["console.9.log", "console.log.1"] {
        std::fs::write(run_dir.join(stale), "old").unwrap();
    }
    let engine = t.restarted();
    engine.recover().await.unwrap();
    assert!(!run_dir.join("console.9.log").exists());
    assert!(!run_dir.join("console.log.1").exists());
    assert!(run_dir.join("console.1.log").exists(), "kept boots stay");
}

fn snapshot_request(instance: &str, name: &str) -> vroom_types::SnapshotRequest {
    vroom_types::SnapshotRequest {
        instance: Name::new(instance).unwrap(),
        name: Some(Name::new(name).unwrap()),
        stop: false,
    }
}

/// A snapshot holds the VM's state and volume; a clone starts from that
/// state (not a boot) with its own identity; a restore reloads it; a
/// corrupted memory image is refused before the instance is touched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_clone_restore_and_corruption() {
    let dir = tempfile::tempdir().unwrap();
    let t = TestEngine::new(dir.path());
    t.engine.run(request("web")).await.unwrap();
    let web = wait_state(&t, "web", InstanceState::Running).await;
    let snap = t
        .engine
        .snapshot(snapshot_request("web", "s1"))
        .await
        .unwrap();
    assert_eq!(snap.instance.id, web.id);
    assert!(snap.memory.bytes > 0 && snap.volume.bytes > 0);
    assert_eq!(t.engine.list_snapshots().len(), 1);
    assert_eq!(
        t.engine
            .snapshot(snapshot_request("web", "s1"))
            .await
            .unwrap_err()
            .code,
        vroom_types::ErrorCode::AlreadyExists
    );
    // The source runs on.
    assert_eq!(
        t.engine.get("web").unwrap().status.state,
        InstanceState::Running
    );

    let mut clone = request("web2");
    clone.from_snapshot = Some(Name::new("s1").unwrap());
    clone.spec.image = String::new();
    let c = t.engine.run(clone).await.unwrap();
    assert_eq!(c.status.started_from.as_deref(), Some("snapshot s1"));
    assert_ne!(c.nics[0].mac, web.nics[0].mac);
    assert_ne!(c.nics[0].ip, web.nics[0].ip);
    let pid = c.status.pid.unwrap();
    // The clone's "memory" is the source's.
    assert_eq!(
        t.driver.memory_of(pid).unwrap(),
        web.id.as_bytes().repeat(1024)
    );
    wait_state(&t, "web2", InstanceState::Running).await;

    let restored = t.engine.restore("web", "s1").await.unwrap();
    assert_eq!(restored.status.started_from.as_deref(), Some("snapshot s1"));
    assert_ne!(restored.status.pid, web.status.pid);

    // Corrupt the memory image: restore refuses, and the instance is untouched.
    let memory = dir.path().join("snapshots/s1/memory.zst");
    let mut bytes = std::fs::read(&memory).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0xff;
    std::fs::write(&memory, &bytes).unwrap();
    let before = t.engine.get("web").unwrap().status.pid;
    let err = t.engine.restore("web", "s1").await.unwrap_err();
    assert!(err.message.contains("corrupt"), "{}", err.message);
    assert_eq!(t.engine.get("web").unwrap().status.pid, before);

    t.engine.remove_snapshot("s1").await.unwrap();
    assert!(t.engine.list_snapshots().is_empty());
    assert!(t.engine.get_snapshot("s1").is_err());
}

/// Restoring into an instance of another shape is refused and changes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restore_refuses_another_shape() {
    let dir = tempfile::tempdir().unwrap();
    let t = TestEngine::new(dir.path());
    t.engine.run(request("small")).await.unwrap();
    wait_state(&t, "small", InstanceState::Running).await;
    let mut big = request("big");
    big.spec.mem_mib = Some(256);
    t.engine.run(big).await.unwrap();
    let big = wait_state(&t, "big", InstanceState::Running).await;
    t.engine
        .snapshot(snapshot_request("small", "s"))
        .await
        .unwrap();
    let err = t.engine.restore("big", "s").await.unwrap_err();
    assert!(err.message.contains("MiB of memory"), "{}", err.message);
    assert_eq!(t.engine.get("big").unwrap().status.pid, big.status.pid);
}

/// `image warm` keeps a warm snapshot that `run` starts from; `--cold`
/// boots; an ephemeral instance's config returns at every start.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn warm_starts_cold_starts_and_ephemeral_instances() {
    let dir = tempfile::tempdir().unwrap();
    let t = TestEngine::new(dir.path());
    let warm = t.engine.warm_image("hello", None).await.unwrap();
    assert_eq!(warm.kind, vroom_types::SnapshotKind::Warm);
    assert_eq!(t.engine.list_warm().len(), 1);
    // The warm-up VM is gone.
    assert!(t.driver.running().is_empty());
    let w = t.engine.run(request("w")).await.unwrap();
    assert_eq!(w.status.started_from.as_deref(), Some("warm hello"));
    let w = t
        .engine
        .wait_settled("w", Duration::from_secs(30))
        .await
        .unwrap();
    assert_eq!(w.status.state, InstanceState::Running);
    assert_eq!(
        w.status.boot_phases, None,
        "a warm start has no boot of its own"
    );
    let mut cold = request("c");
    cold.cold = true;
    let c = t.engine.run(cold).await.unwrap();
    assert_eq!(c.status.started_from, None);

    // `snapshot rm` of the name `ls --warm` shows points at `--warm`;
    // `rm --warm` removes it, and `run` boots again.
    let err = t.engine.remove_snapshot("hello").await.unwrap_err();
    assert_eq!(err.code, ErrorCode::NotFound);
    assert!(err.message.contains("--warm hello"), "{}", err.message);
    let removed = t.engine.remove_warm(warm.name.as_str()).await.unwrap();
    assert_eq!(removed.len(), 1);
    assert!(t.engine.list_warm().is_empty());
    let booted = t.engine.run(request("b")).await.unwrap();
    assert_eq!(booted.status.started_from, None);
    let err = t.engine.remove_warm("hello").await.unwrap_err();
    assert_eq!(err.code, ErrorCode::NotFound);
    t.engine.warm_image("hello", None).await.unwrap();
    let by_id = t.engine.remove_warm(&warm.instance.image_id).await.unwrap();
    assert_eq!(by_id.len(), 1);

    let mut eph = request("e");
    eph.spec.ephemeral = true;
    eph.cold = true;
    t.engine.run(eph).await.unwrap();
    wait_state(&t, "e", InstanceState::Running).await;
    let seed = t.engine.get("e").unwrap().config;
    let changed = t
        .engine
        .config_update("e", [("greeting".into(), "changed".into())].into())
        .await
        .unwrap();
    assert_ne!(changed, seed);
    t.engine.action("e", InstanceAction::Restart).await.unwrap();
    assert_eq!(t.engine.get("e").unwrap().config, seed);
}

/// `run --env` of an imported image: keys or the variables they feed,
/// over the image's defaults, checked against its schema before anything
/// is made; refused for a recipe's image and for unknown keys. `config
/// reset` goes back to the image's defaults, not the run's.
#[tokio::test]
async fn run_env_seeds_an_imported_images_config() {
    use vroom_types::{ConfigField, FieldType, ServiceSpec};
    let dir = tempfile::tempdir().unwrap();
    let t = TestEngine::new(dir.path());
    let values = |pairs: &[(&str, &str)]| -> vroom_types::ConfigValues {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    };
    t.images.add_imported(
        "ctr",
        vroom_types::ApplianceSpec {
            seed_config: values(&[("greeting", "hi"), ("workers", "2")]),
            config_schema: [
                ("greeting".to_string(), ConfigField::default()),
                (
                    "workers".to_string(),
                    ConfigField {
                        kind: FieldType::Int,
                        ..Default::default()
                    },
                ),
            ]
            .into(),
            services: vec![ServiceSpec {
                name: "main".into(),
                command: vec!["/bin/app".into()],
                restart: true,
                restart_on_config: true,
                config_env: [
                    ("GREETING".to_string(), "greeting".to_string()),
                    ("WORKERS".into(), "workers".into()),
                ]
                .into(),
                ..Default::default()
            }],
            ..Default::default()
        },
    );
    let with_env = |name: &str, image: &str, env: &[(&str, &str)]| {
        let mut req = crate::testing::run_request(name, image, &[]);
        req.env = values(env);
        req
    };
    for (image, env, code, says) in [
        (
            "hello",
            vec![("greeting", "x")],
            ErrorCode::InvalidConfig,
            "--env is for imported images and hello was built from a recipe",
        ),
        (
            "ctr",
            vec![("NOPE", "1")],
            ErrorCode::InvalidConfig,
            "image ctr takes no env \"NOPE\" (its keys: greeting, workers)",
        ),
        (
            "ctr",
            vec![("WORKERS", "many")],
            ErrorCode::InvalidConfig,
            "invalid value \"many\" for config key \"workers\": must be an integer",
        ),
    ] {
        let err = t
            .engine
            .run(with_env("bad", image, &env))
            .await
            .unwrap_err();
        assert_eq!(err.code, code, "{image} {env:?}: {}", err.message);
        assert!(err.message.contains(says), "{}", err.message);
        assert!(t.engine.get("bad").is_err(), "a refused run left {image}");
    }
    assert!(
        !dir.path().join("instances").exists()
            || std::fs::read_dir(dir.path().join("instances"))
                .unwrap()
                .next()
                .is_none(),
        "a refused run left a run dir"
    );

    let run = t
        .engine
        .run(with_env(
            "c1",
            "ctr",
            &[("GREETING", "from run"), ("workers", "8")],
        ))
        .await
        .unwrap();
    let seeded = values(&[("greeting", "from run"), ("workers", "8")]);
    assert_eq!(run.config, seeded);
    wait_state(&t, "c1", InstanceState::Running).await;
    assert_eq!(t.engine.config_get("c1").await.unwrap(), seeded);
    let history = t.engine.config_history("c1").await.unwrap();
    assert_eq!(history.versions.len(), 1, "the run's config is version 1");
    t.engine
        .config_update("c1", values(&[("greeting", "changed")]))
        .await
        .unwrap();
    let reset = t.engine.config_reset("c1").await.unwrap();
    assert_eq!(reset, values(&[("greeting", "hi"), ("workers", "2")]));
    // Without --env, the image's defaults.
    let plain = t.engine.run(with_env("c2", "ctr", &[])).await.unwrap();
    assert_eq!(
        plain.config,
        values(&[("greeting", "hi"), ("workers", "2")])
    );
}

/// `rm --archive` keeps memory, volume, history, consoles and record under
/// a manifest that verifies, wipes the instance's files and forgets it; a
/// non-empty archive dir is refused and changes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn archived_removal_keeps_a_verifiable_archive_and_wipes_the_rest() {
    let dir = tempfile::tempdir().unwrap();
    let t = TestEngine::new(dir.path());
    let web = t.engine.run(request("web")).await.unwrap();
    wait_state(&t, "web", InstanceState::Running).await;
    let busy = dir.path().join("busy");
    std::fs::create_dir(&busy).unwrap();
    std::fs::write(busy.join("x"), b"x").unwrap();
    let err = t
        .engine
        .remove_archived("web", busy.to_str().unwrap(), Some((0, 0)))
        .await
        .unwrap_err();
    assert!(err.message.contains("not empty"), "{}", err.message);
    assert!(t.engine.get("web").is_ok());

    let archive = dir.path().join("archive");
    let report = t
        .engine
        .remove_archived("web", archive.to_str().unwrap(), Some((0, 0)))
        .await
        .unwrap();
    assert!(report.memory);
    let names: Vec<&str> = report.files.iter().map(|f| f.path.as_str()).collect();
    for want in [
        "memory.zst",
        "config.img",
        "instance.json",
        "config-history.json",
    ] {
        assert!(names.contains(&want), "{names:?}");
    }
    assert!(names.iter().any(|n| n.starts_with("console/")), "{names:?}");
    assert!(!report.wiped.is_empty());
    assert!(report.wiped.iter().all(|p| !p.exists()));
    assert!(!dir.path().join("instances").join(&web.id).exists());
    assert!(t.engine.get("web").is_err());
    assert_eq!(
        super::verify_archive(&archive).unwrap(),
        Vec::<String>::new()
    );
}

/// An archive that fails after the guest was frozen and its memory saved
/// (here its config volume is gone) leaves the instance as it was: its VM
/// runs again and its guest is thawed, not paused under a `running` label.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_archive_resumes_the_frozen_guest() {
    let dir = tempfile::tempdir().unwrap();
    let t = TestEngine::new(dir.path());
    let web = t.engine.run(request("web")).await.unwrap();
    wait_state(&t, "web", InstanceState::Running).await;
    let cell = t.engine.cell("web").unwrap();
    std::fs::remove_file(cell.volume()).unwrap();
    let archive = dir.path().join("archive");
    let err = t
        .engine
        .remove_archived("web", archive.to_str().unwrap(), Some((0, 0)))
        .await
        .unwrap_err();
    assert!(err.message.contains("config volume"), "{}", err.message);
    assert!(!archive.exists(), "the half-written archive was left");
    let process = cell.lock().process.clone().unwrap();
    use crate::driver::VmDriver;
    assert_eq!(
        t.driver.run_state(&process).unwrap(),
        crate::driver::VmRunState::Running
    );
    let health = cell.agent.health(super::AGENT_TIMEOUT).await.unwrap();
    assert!(!health.frozen, "the guest was left frozen");
    assert_eq!(t.engine.get("web").unwrap().status.pid, web.status.pid);
}

/// A daemon killed inside `rm --archive` once the archive was written (here
/// just before it kills the VM) leaves the removal on record with its wipe:
/// the next one finishes it, wiping (a hard link from outside the run dir
/// sees the zeros), not with a plain unlink nor by running the instance on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recovery_finishes_an_interrupted_archived_removal_with_the_wipe() {
    use std::sync::atomic::Ordering::SeqCst;
    let dir = tempfile::tempdir().unwrap();
    let t = TestEngine::new(dir.path());
    let web = t.engine.run(request("web")).await.unwrap();
    wait_state(&t, "web", InstanceState::Running).await;
    let run_dir = dir.path().join("instances").join(&web.id);
    std::fs::write(run_dir.join("secret"), b"secret").unwrap();
    let outside = dir.path().join("outside");
    std::fs::hard_link(run_dir.join("secret"), &outside).unwrap();
    t.driver.fail_kill.store(true, SeqCst);
    let archive = dir.path().join("archive");
    t.engine
        .remove_archived("web", archive.to_str().unwrap(), Some((0, 0)))
        .await
        .unwrap_err();
    t.driver.fail_kill.store(false, SeqCst);
    let engine = t.restarted();
    engine.recover().await.unwrap();
    assert!(engine.get("web").is_err(), "the removal was not finished");
    assert!(!run_dir.exists());
    assert_eq!(std::fs::read(&outside).unwrap(), vec![0u8; 6], "not wiped");
    assert!(t.driver.running().is_empty());
    assert_eq!(
        super::verify_archive(&archive).unwrap(),
        Vec::<String>::new()
    );
}

/// A daemon killed while an instance was starting from a saved state that
/// is its own (a restore or a warm start, not a clone): the next one kills
/// that VM and boots the instance instead, without claiming the state.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recovery_boots_an_instance_whose_restore_was_interrupted() {
    let dir = tempfile::tempdir().unwrap();
    let t = TestEngine::new(dir.path());
    let web = t.engine.run(request("web")).await.unwrap();
    wait_state(&t, "web", InstanceState::Running).await;
    let old_pid = web.status.pid.unwrap();
    {
        use crate::store::StateStore;
        let mut record = t.store.instances().unwrap().remove(0);
        record.instance.status.state = InstanceState::Starting;
        t.store.put_instance(&record).unwrap();
    }
    let marker = dir.path().join("instances").join(&web.id).join("restoring");
    std::fs::write(&marker, b"").unwrap();
    let engine = t.restarted();
    engine.recover().await.unwrap();
    let mut booted = None;
    for _ in 0..400 {
        let i = engine.get("web").unwrap();
        if i.status.state == InstanceState::Running {
            booted = Some(i);
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let booted = booted.expect("the instance boots again");
    assert_ne!(booted.status.pid, Some(old_pid));
    assert_eq!(booted.status.started_from, None);
    assert!(!marker.exists());
    assert_eq!(t.driver.running().len(), 1);
}

/// Issue 23 #9: an `rm -f` interrupted before its VM died (the kill fails
/// here, as if the daemon died first) or after it (the record deletion
/// fails) is finished by the next daemon: no VM, record or run dir stays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recovery_finishes_an_interrupted_removal() {
    use std::sync::atomic::Ordering;
    let dir = tempfile::tempdir().unwrap();
    let t = TestEngine::new(dir.path());
    let before = t.engine.run(request("before")).await.unwrap();
    let after = t.engine.run(request("after")).await.unwrap();
    wait_state(&t, "before", InstanceState::Running).await;
    wait_state(&t, "after", InstanceState::Running).await;

    t.driver.fail_kill.store(true, Ordering::SeqCst);
    assert!(t.engine.remove("before", true).await.is_err());
    t.driver.fail_kill.store(false, Ordering::SeqCst);
    assert_eq!(t.driver.running().len(), 2, "the VM died before the kill");
    // Refused while the removal is unfinished: it would launch a VM the
    // next daemon removes.
    let err = t
        .engine
        .action("before", InstanceAction::Restart)
        .await
        .unwrap_err();
    assert!(err.message.contains("being removed"), "{}", err.message);

    t.store.fail_instance_deletes.store(true, Ordering::SeqCst);
    assert!(t.engine.remove("after", true).await.is_err());
    t.store.fail_instance_deletes.store(false, Ordering::SeqCst);
    assert_eq!(t.driver.running().len(), 1);

    let engine = t.restarted();
    engine.recover().await.unwrap();
    assert!(engine.list().is_empty(), "{:?}", engine.list());
    assert_eq!(stored_state(&t, "before"), None);
    assert_eq!(stored_state(&t, "after"), None);
    assert!(
        t.driver.running().is_empty(),
        "a VM of a removed instance runs"
    );
    for i in [&before, &after] {
        assert!(!dir.path().join("instances").join(&i.id).exists());
    }
    // Their network can go.
    engine.remove_network("default").await.unwrap();
}

/// Issue 23 #9: two `rm -f` of one instance both succeed (the second waits
/// for the first) and the instance is gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_concurrent_removals_both_succeed() {
    let dir = tempfile::tempdir().unwrap();
    let t = TestEngine::new(dir.path());
    t.engine.run(request("web")).await.unwrap();
    wait_state(&t, "web", InstanceState::Running).await;
    // Both arrive while another operation holds the instance: they queue.
    let busy = t.engine.cell("web").unwrap();
    let held = busy.op.lock().await;
    let first = tokio::spawn({
        let engine = t.engine.clone();
        async move { engine.remove("web", true).await }
    });
    let second = tokio::spawn({
        let engine = t.engine.clone();
        async move { engine.remove("web", true).await }
    });
    tokio::time::sleep(Duration::from_millis(50)).await;
    drop(held);
    first.await.unwrap().unwrap();
    second.await.unwrap().unwrap();
    assert!(t.engine.get("web").is_err());
    assert!(t.driver.running().is_empty());
    // A third, after the fact, says it is not there.
    assert_eq!(
        t.engine.remove("web", true).await.unwrap_err().code,
        vroom_types::ErrorCode::NotFound
    );
}

/// Issue 23 #10: a daemon killed inside a clone (`run --from-snapshot`),
/// before the VMM started or while it loaded the state, leaves a clone that
/// the next daemon fails visibly, its VM killed; never one it boots and
/// shows running as if it were the clone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recovery_fails_a_clone_whose_start_was_interrupted() {
    use crate::store::StateStore;
    let dir = tempfile::tempdir().unwrap();
    let t = TestEngine::new(dir.path());
    let web = t.engine.run(request("web")).await.unwrap();
    wait_state(&t, "web", InstanceState::Running).await;
    t.engine
        .snapshot(snapshot_request("web", "s1"))
        .await
        .unwrap();
    let clone = |name: &str| {
        let mut req = request(name);
        req.from_snapshot = Some(Name::new("s1").unwrap());
        req.spec.image = String::new();
        req
    };
    let loading = t.engine.run(clone("loading")).await.unwrap();
    let unlaunched = t.engine.run(clone("unlaunched")).await.unwrap();
    // What the kills left: `loading`'s VMM runs but its record does not
    // know it yet and its marker is down; `unlaunched` has only its record.
    // Its VMM goes by a stop, not a crash: a crash would leave this (still
    // live) engine's monitor to write the record back and restart the VM
    // after its backoff, racing the records written below.
    wait_state(&t, "unlaunched", InstanceState::Running).await;
    t.engine
        .action("unlaunched", InstanceAction::Stop)
        .await
        .unwrap();
    for (i, state) in [
        (&loading, InstanceState::Starting),
        (&unlaunched, InstanceState::Stopped),
    ] {
        let mut record = t
            .store
            .instances()
            .unwrap()
            .into_iter()
            .find(|r| r.instance.id == i.id)
            .unwrap();
        record.process = None;
        record.cloning_from = Some("s1".into());
        record.instance.status = vroom_types::InstanceStatus {
            state,
            ..vroom_types::InstanceStatus::stopped()
        };
        t.store.put_instance(&record).unwrap();
    }
    let marker = dir
        .path()
        .join("instances")
        .join(&loading.id)
        .join("restoring");
    std::fs::write(&marker, b"").unwrap();

    let engine = t.restarted();
    engine.recover().await.unwrap();
    // Given time to (wrongly) boot them.
    tokio::time::sleep(Duration::from_millis(500)).await;
    for name in ["loading", "unlaunched"] {
        let i = engine.get(name).unwrap();
        assert_eq!(i.status.state, InstanceState::Failed, "{name}");
        assert_eq!(i.status.started_from, None, "{name}");
        assert_eq!(
            i.status.last_error.as_deref(),
            Some("interrupted while cloning from snapshot s1; remove it or run it again"),
            "{name}"
        );
        // A cluster's pass starts what is wanted running: not this one.
        assert_eq!(i.desired, vroom_types::DesiredState::Stopped, "{name}");
    }
    assert!(!marker.exists());
    assert_eq!(t.driver.running(), vec![web.status.pid.unwrap()]);
    // Removing one and running it again clones it.
    engine.remove("loading", true).await.unwrap();
    let again = engine.run(clone("loading")).await.unwrap();
    assert_eq!(again.status.started_from.as_deref(), Some("snapshot s1"));
    // The record of a finished clone no longer says it is cloning.
    assert!(t
        .store
        .instances()
        .unwrap()
        .iter()
        .all(|r| r.cloning_from.is_none()));
}

/// Issue 23 #15: after a restore, and after an ephemeral instance's
/// restart, `config history` marks as current the version whose values are
/// in force, not the change made after the snapshot (or since the start).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn config_history_follows_a_restore_and_an_ephemeral_restart() {
    let dir = tempfile::tempdir().unwrap();
    let t = TestEngine::new(dir.path());
    let set =
        |v: &str| -> vroom_types::ConfigValues { [("greeting".to_string(), v.to_string())].into() };
    t.engine.run(request("web")).await.unwrap();
    wait_state(&t, "web", InstanceState::Running).await;
    t.engine.config_update("web", set("a")).await.unwrap();
    let a = t.engine.config_history("web").await.unwrap().current;
    t.engine
        .snapshot(snapshot_request("web", "s1"))
        .await
        .unwrap();
    t.engine.config_update("web", set("b")).await.unwrap();
    let b = t.engine.config_history("web").await.unwrap().current;
    assert!(b > a);
    t.engine.restore("web", "s1").await.unwrap();
    wait_state(&t, "web", InstanceState::Running).await;
    assert_eq!(t.engine.config_get("web").await.unwrap()["greeting"], "a");
    let history = t.engine.config_history("web").await.unwrap();
    assert_eq!(history.current, a, "{history:?}");
    // b stays in the history.
    assert!(history.versions.iter().any(|v| v.version == b));
    let diff = t.engine.config_diff("web", None, None).await.unwrap();
    assert_eq!(diff.to, a);
    // The next change counts on from the newest version.
    t.engine.config_update("web", set("c")).await.unwrap();
    assert_eq!(t.engine.config_history("web").await.unwrap().current, b + 1);

    let mut eph = request("e");
    eph.spec.ephemeral = true;
    eph.cold = true;
    t.engine.run(eph).await.unwrap();
    wait_state(&t, "e", InstanceState::Running).await;
    let seed = t.engine.config_history("e").await.unwrap().current;
    t.engine.config_update("e", set("changed")).await.unwrap();
    t.engine.action("e", InstanceAction::Restart).await.unwrap();
    wait_state(&t, "e", InstanceState::Running).await;
    let history = t.engine.config_history("e").await.unwrap();
    assert_eq!(history.current, seed, "{history:?}");
    assert_eq!(t.engine.config_get("e").await.unwrap()["greeting"], "hello");
}

/// What happened to an instance, as its events tell it.
fn actions_of(t: &TestEngine, name: &str) -> Vec<String> {
    use futures::FutureExt;
    let query = vroom_types::EventQuery::from_pairs([("name", name), ("follow", "false")]).unwrap();
    let mut reader = t.engine.events().read(query);
    let mut actions = vec![];
    while let Some(line) = reader.next().now_or_never().flatten() {
        match line {
            vroom_types::EventLine::Event(e) => actions.push(format!("{}:{}", e.kind, e.action)),
            other => panic!("{other:?}"),
        }
    }
    actions
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_life_is_told_by_its_events_and_who_caused_them() {
    let dir = tempfile::tempdir().unwrap();
    let t = TestEngine::new(dir.path());
    crate::events::acting_for("uid:1000".into(), t.engine.run(request("web")))
        .await
        .unwrap();
    let first = wait_state(&t, "web", InstanceState::Running).await;
    t.driver.crash(first.status.pid.unwrap());
    for _ in 0..200 {
        let i = t.engine.get("web").unwrap();
        if i.status.state == InstanceState::Running && i.status.pid != first.status.pid {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    t.engine
        .config_update("web", [("greeting".to_string(), "ho".to_string())].into())
        .await
        .unwrap();
    t.engine.action("web", InstanceAction::Stop).await.unwrap();
    t.engine.remove("web", false).await.unwrap();
    assert_eq!(
        actions_of(&t, "web"),
        [
            "instance:created",
            "instance:starting",
            "instance:ready",
            "instance:restarting",
            "instance:starting",
            "instance:ready",
            "config:applied",
            "instance:stopping",
            "instance:stopped",
            "instance:removed"
        ]
    );
    use futures::FutureExt;
    let query = vroom_types::EventQuery::from_pairs([("follow", "false")]).unwrap();
    let mut reader = t.engine.events().read(query);
    let mut events = vec![];
    while let Some(vroom_types::EventLine::Event(e)) = reader.next().now_or_never().flatten() {
        events.push(e);
    }
    let created = events.iter().find(|e| e.action == "created").unwrap();
    assert_eq!(created.actor, "uid:1000", "the caller made it");
    assert_eq!(created.id.as_deref(), Some(first.id.as_str()));
    let restarting = events.iter().find(|e| e.action == "restarting").unwrap();
    assert_eq!(restarting.actor, "vroomd", "the policy restarted it");
    let ready = events.iter().find(|e| e.action == "ready").unwrap();
    assert!(ready.detail.contains_key("boot_ms"), "{ready:?}");
}
