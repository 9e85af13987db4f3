//! Data volumes on fakes (real files, real mkfs.ext4): create, attach,
//! the rules of attaching, declared volumes, rollback, removal, growth and
//! what a restarted daemon sweeps.

use std::time::Duration;

use vroom_types::{
    ApplianceSpec, ErrorCode, InstanceState, Name, RunRequest, VolumeAttach, VolumeCreateRequest,
    VolumeDecl, VolumeExportRequest, VolumeFs, VolumeImportRequest, VolumeResizeRequest,
};

use crate::store::StateStore;
use crate::testing::{run_request, TestEngine};

fn create(name: &str, size_mib: u64) -> VolumeCreateRequest {
    VolumeCreateRequest {
        name: Name::new(name).unwrap(),
        size_mib,
        fs: VolumeFs::Ext4,
        replicas: 1,
        node: None,
        replica_node: None,
    }
}

fn attach(volume: &str, path: &str) -> VolumeAttach {
    VolumeAttach {
        volume: Name::new(volume).unwrap(),
        path: path.into(),
        read_only: false,
    }
}

fn with_volumes(name: &str, image: &str, volumes: Vec<VolumeAttach>) -> RunRequest {
    let mut req = run_request(name, image, &[]);
    req.spec.volumes = volumes;
    req
}

/// An engine with `store` (writable /var, no volumes) and `db` (declares
/// a 32 MiB `data` volume at /var/lib/db).
async fn engine(dir: &std::path::Path) -> TestEngine {
    let t = TestEngine::new(dir);
    t.engine.recover().await.unwrap();
    let plain = ApplianceSpec {
        writable: vec!["/run".into(), "/var".into()],
        ..ApplianceSpec::default()
    };
    let own = vroom_types::KernelFlavor::Vroom;
    t.images.add_appliance("store", plain.clone(), own);
    t.images
        .add_appliance("debian", plain.clone(), vroom_types::KernelFlavor::Debian);
    t.images.add_appliance(
        "db",
        ApplianceSpec {
            volumes: vec![VolumeDecl {
                name: Name::new("data").unwrap(),
                path: "/var/lib/db".into(),
                size_mib: 32,
                fs: VolumeFs::Ext4,
                exec: false,
            }],
            ..plain
        },
        own,
    );
    t
}

async fn running_pid(t: &TestEngine, name: &str) -> u32 {
    for _ in 0..200 {
        let i = t.engine.get(name).unwrap();
        if i.status.state == InstanceState::Running {
            return i.status.pid.unwrap();
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("{name} never ran");
}

#[tokio::test]
async fn a_volume_is_attached_to_one_instance_and_outlives_it() {
    let dir = tempfile::tempdir().unwrap();
    let t = engine(dir.path()).await;
    let v = t.engine.create_volume(create("files", 64)).await.unwrap();
    assert_eq!((v.size_mib, v.attached_to.clone()), (64, None));
    assert!(
        v.allocated_bytes > 0 && v.allocated_bytes < 16 << 20,
        "{v:?}"
    );
    let err = t
        .engine
        .create_volume(create("files", 64))
        .await
        .unwrap_err();
    assert_eq!(err.code, ErrorCode::AlreadyExists);

    t.engine
        .run(with_volumes(
            "a",
            "store",
            vec![attach("files", "/var/files")],
        ))
        .await
        .unwrap();
    let pid = running_pid(&t, "a").await;
    let disks = t.driver.spec_of(pid).unwrap().data_disks;
    assert_eq!(disks.len(), 1);
    assert!(disks[0]
        .path
        .ends_with(format!("volumes/{}/volume.img", v.id)));
    assert_eq!((disks[0].read_only, disks[0].bytes), (false, 64 << 20));
    assert_eq!(
        t.engine.volume("files").unwrap().attached_to,
        Some(Name::new("a").unwrap())
    );

    // A second instance cannot have it, and it cannot be removed.
    let err = t
        .engine
        .run(with_volumes("b", "store", vec![attach("files", "/var/x")]))
        .await
        .unwrap_err();
    assert!(
        err.message.contains("attached to instance a"),
        "{}",
        err.message
    );
    assert!(t.engine.get("b").is_err(), "nothing of b is left");
    let err = t.engine.remove_volume("files").await.unwrap_err();
    assert_eq!(err.code, ErrorCode::Conflict);
    assert!(
        err.message.contains("remove the instance first"),
        "{}",
        err.message
    );

    // The instance goes, the volume stays, and the next one takes it.
    t.engine.remove("a", true).await.unwrap();
    assert_eq!(t.engine.volume("files").unwrap().attached_to, None);
    t.engine
        .run(with_volumes("b", "store", vec![attach("files", "/var/x")]))
        .await
        .unwrap();
    t.engine.remove("b", true).await.unwrap();
    t.engine.remove_volume("files").await.unwrap();
    assert!(t.engine.list_volumes().unwrap().is_empty());
    assert!(!dir.path().join("volumes").join(&v.id).exists());
}

#[tokio::test]
async fn bad_attachments_are_refused_with_nothing_made() {
    let dir = tempfile::tempdir().unwrap();
    let t = engine(dir.path()).await;
    t.engine.create_volume(create("v", 16)).await.unwrap();
    t.engine.create_volume(create("w", 16)).await.unwrap();
    let cases: Vec<(Vec<VolumeAttach>, &str)> = vec![
        (vec![attach("nope", "/var/x")], "no volume named \"nope\""),
        (vec![attach("v", "/srv/x")], "read-only root"),
        (vec![attach("v", "/etc/x")], "system directory"),
        (
            vec![attach("v", "/var/x"), attach("v", "/var/y")],
            "attached twice",
        ),
        (
            vec![attach("v", "/var/x"), attach("w", "/var/x")],
            "two volumes are mounted at /var/x",
        ),
    ];
    for (volumes, want) in cases {
        let err = t
            .engine
            .run(with_volumes("c", "store", volumes.clone()))
            .await
            .unwrap_err();
        assert!(err.message.contains(want), "{volumes:?}: {}", err.message);
        assert!(!err.message.contains('\n'));
        assert!(t.engine.get("c").is_err());
    }
    let err = t
        .engine
        .run(with_volumes("c", "debian", vec![attach("v", "/var/x")]))
        .await
        .unwrap_err();
    assert!(
        err.message.contains("built for Debian's kernel"),
        "{}",
        err.message
    );
    let mut ephemeral = with_volumes("c", "store", vec![attach("v", "/var/x")]);
    ephemeral.spec.ephemeral = true;
    let err = t.engine.run(ephemeral).await.unwrap_err();
    assert!(err.message.contains("not --volume"), "{}", err.message);
    let names: Vec<_> = t
        .engine
        .list_volumes()
        .unwrap()
        .into_iter()
        .map(|v| (v.name.to_string(), v.attached_to))
        .collect();
    assert_eq!(names, [("v".into(), None), ("w".into(), None)]);

    let err = t
        .engine
        .create_volume(VolumeCreateRequest {
            replicas: 2,
            node: None,
            replica_node: None,
            ..create("r", 16)
        })
        .await
        .unwrap_err();
    assert!(err.message.contains("needs a cluster"), "{}", err.message);
    let err = t.engine.create_volume(create("big", 15)).await.unwrap_err();
    assert_eq!(err.code, ErrorCode::InvalidArgument);
    let err = t
        .engine
        .create_volume(create("huge", vroom_types::MAX_VOLUME_MIB))
        .await
        .unwrap_err();
    assert_eq!(err.code, ErrorCode::HostUnsupported, "{}", err.message);
    assert_eq!(t.engine.list_volumes().unwrap().len(), 2);
    let on_disk = std::fs::read_dir(dir.path().join("volumes"))
        .unwrap()
        .count();
    assert_eq!(on_disk, 2, "no directory of a refused volume");
}

/// `vroom run db --name pg` just works: the declared volume is made as
/// `pg-data`, kept when the instance goes, and taken again by the next
/// `pg`. A failed run removes what it made, and only that.
#[tokio::test]
async fn declared_volumes_are_made_kept_and_taken_again() {
    let dir = tempfile::tempdir().unwrap();
    let t = engine(dir.path()).await;
    let i = t.engine.run(run_request("pg", "db", &[])).await.unwrap();
    assert_eq!(i.spec.volumes, vec![attach("pg-data", "/var/lib/db")]);
    let first = t.engine.volume("pg-data").unwrap();
    assert_eq!(first.size_mib, 32);
    t.engine.remove("pg", true).await.unwrap();
    t.engine.run(run_request("pg", "db", &[])).await.unwrap();
    assert_eq!(
        t.engine.volume("pg-data").unwrap().id,
        first.id,
        "the same volume"
    );
    t.engine.remove("pg", true).await.unwrap();

    // The user's own volume takes the declared path's place.
    t.engine.create_volume(create("mine", 16)).await.unwrap();
    let i = t
        .engine
        .run(with_volumes(
            "pg",
            "db",
            vec![attach("mine", "/var/lib/db")],
        ))
        .await
        .unwrap();
    assert_eq!(i.spec.volumes, vec![attach("mine", "/var/lib/db")]);
    t.engine.remove("pg", true).await.unwrap();

    // A launch that fails removes the volume it made, not the kept one.
    t.driver
        .fail_launch
        .store(true, std::sync::atomic::Ordering::SeqCst);
    assert!(t.engine.run(run_request("pg", "db", &[])).await.is_err());
    assert!(t.engine.run(run_request("other", "db", &[])).await.is_err());
    let names: Vec<String> = t
        .engine
        .list_volumes()
        .unwrap()
        .into_iter()
        .map(|v| v.name.to_string())
        .collect();
    assert_eq!(names, ["mine", "pg-data"]);
    let on_disk = std::fs::read_dir(dir.path().join("volumes"))
        .unwrap()
        .count();
    assert_eq!(on_disk, 2);
}

#[tokio::test]
async fn volumes_grow_online_and_offline() {
    let dir = tempfile::tempdir().unwrap();
    let t = engine(dir.path()).await;
    let v = t.engine.create_volume(create("v", 16)).await.unwrap();
    t.engine
        .run(with_volumes("a", "store", vec![attach("v", "/var/v")]))
        .await
        .unwrap();
    let pid = running_pid(&t, "a").await;
    let grow = |mib| VolumeResizeRequest { size_mib: mib };
    // Running: the file grows and the VM is told.
    assert_eq!(
        t.engine
            .resize_volume("v", grow(32))
            .await
            .unwrap()
            .size_mib,
        32
    );
    assert_eq!(t.driver.spec_of(pid).unwrap().data_disks[0].bytes, 32 << 20);
    t.engine
        .action("a", vroom_types::InstanceAction::Stop)
        .await
        .unwrap();
    // Stopped: the file grows; the next VM gets it.
    assert_eq!(
        t.engine
            .resize_volume("v", grow(48))
            .await
            .unwrap()
            .size_mib,
        48
    );
    let file = dir.path().join("volumes").join(&v.id).join("volume.img");
    assert_eq!(std::fs::metadata(&file).unwrap().len(), 48 << 20);
    let err = t.engine.resize_volume("v", grow(16)).await.unwrap_err();
    assert!(err.message.contains("only grow"), "{}", err.message);
    let err = t
        .engine
        .resize_volume("v", grow(vroom_types::MAX_VOLUME_MIB))
        .await
        .unwrap_err();
    assert_eq!(err.code, ErrorCode::HostUnsupported, "{}", err.message);
    assert_eq!(
        t.engine.volume("v").unwrap().size_mib,
        48,
        "a refused growth is not recorded"
    );
    t.engine
        .action("a", vroom_types::InstanceAction::Start)
        .await
        .unwrap();
    let pid = running_pid(&t, "a").await;
    assert_eq!(t.driver.spec_of(pid).unwrap().data_disks[0].bytes, 48 << 20);
}

/// What a daemon killed inside a volume operation leaves, the next start
/// settles: a volume being made (staging dir) or removed (no record) is
/// gone, a growth the record has but the file lacks is finished.
#[tokio::test]
async fn a_restart_sweeps_what_a_killed_daemon_left() {
    let dir = tempfile::tempdir().unwrap();
    let t = engine(dir.path()).await;
    let kept = t.engine.create_volume(create("kept", 16)).await.unwrap();
    let grown = t.engine.create_volume(create("grown", 16)).await.unwrap();
    let removed = t.engine.create_volume(create("removed", 16)).await.unwrap();
    let volumes = dir.path().join("volumes");
    // Killed inside a creation: its staging dir, half made.
    std::fs::create_dir(volumes.join(".new-0123")).unwrap();
    std::fs::write(volumes.join(".new-0123/volume.img"), b"half").unwrap();
    // Killed inside a removal: the record went, the files did not.
    t.store.delete_volume("removed").unwrap();
    // Killed inside a growth: the record says 48 MiB, the file is 16.
    let mut record = t
        .store
        .volumes()
        .unwrap()
        .into_iter()
        .find(|v| v.name.as_str() == "grown")
        .unwrap();
    record.size_mib = 48;
    t.store.put_volume(&record).unwrap();

    let engine = t.restarted();
    engine.recover().await.unwrap();
    let mut left: Vec<String> = std::fs::read_dir(&volumes)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    left.sort();
    let mut want = vec![kept.id.clone(), grown.id.clone()];
    want.sort();
    assert_eq!(left, want);
    assert!(!volumes.join(&removed.id).exists());
    let file = volumes.join(&grown.id).join("volume.img");
    assert_eq!(std::fs::metadata(file).unwrap().len(), 48 << 20);
    assert_eq!(engine.list_volumes().unwrap().len(), 2);
}

/// A cluster's volume with one copy is not grown here: the cluster's
/// record keeps its size, and a move makes its new copy that size.
#[tokio::test]
async fn a_clusters_volume_with_one_copy_is_not_grown() {
    let dir = tempfile::tempdir().unwrap();
    let t = engine(dir.path()).await;
    let req = VolumeCreateRequest {
        name: Name::new("pinned").unwrap(),
        size_mib: 16,
        fs: VolumeFs::Ext4,
        replicas: 1,
        node: Some(Name::new("n1").unwrap()),
        replica_node: None,
    };
    t.engine.create_volume_copy(&req).await.unwrap();
    let err = t
        .engine
        .resize_volume("pinned", VolumeResizeRequest { size_mib: 32 })
        .await
        .unwrap_err();
    assert_eq!(err.code, ErrorCode::Conflict);
    assert!(
        err.message.contains("cannot grow a cluster's volume"),
        "{}",
        err.message
    );
    assert_eq!(t.engine.volume("pinned").unwrap().size_mib, 16);
}

/// An instance with a volume of one copy stays on its host: no
/// migration, no warm start (one whose volumes are kept on two nodes may
/// move: the cluster decides where).
#[tokio::test]
async fn what_cannot_carry_volumes_yet_refuses_them() {
    let dir = tempfile::tempdir().unwrap();
    let t = engine(dir.path()).await;
    t.engine.run(run_request("pg", "db", &[])).await.unwrap();
    running_pid(&t, "pg").await;
    let err = t.engine.check_movable("pg").unwrap_err();
    assert!(
        err.message
            .contains("data volume pg-data, which has one copy"),
        "{}",
        err.message
    );
    let err = t.engine.warm_image("db", None).await.unwrap_err();
    assert!(
        err.message.contains("declares data volumes"),
        "{}",
        err.message
    );
    // Kept on two nodes: it may move.
    let req = VolumeCreateRequest {
        name: Name::new("shared").unwrap(),
        size_mib: 16,
        fs: VolumeFs::Ext4,
        replicas: 2,
        node: None,
        replica_node: None,
    };
    t.engine.create_volume_copy(&req).await.unwrap();
    t.engine
        .run(with_volumes(
            "web",
            "store",
            vec![attach("shared", "/var/x")],
        ))
        .await
        .unwrap();
    t.engine.check_movable("web").unwrap();
}

/// A snapshot of an instance holds its data volumes of the same instant; a
/// restore puts them back with its memory, and a clone gets copies of its
/// own, named for the clone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn instance_snapshots_carry_their_volumes() {
    let dir = tempfile::tempdir().unwrap();
    let t = engine(dir.path()).await;
    t.engine.create_volume(create("mine", 16)).await.unwrap();
    t.engine
        .run(with_volumes("pg", "db", vec![attach("mine", "/var/mine")]))
        .await
        .unwrap();
    running_pid(&t, "pg").await;
    let file_of = |name: &str| {
        let v = t.engine.volume(name).unwrap();
        dir.path().join("volumes").join(v.id).join("volume.img")
    };
    const AT: u64 = 8 << 20;
    poke(&file_of("mine"), AT, b"snap");
    poke(&file_of("pg-data"), AT, b"data");
    let snap = t
        .engine
        .snapshot(vroom_types::SnapshotRequest {
            instance: Name::new("pg").unwrap(),
            name: Some(Name::new("s").unwrap()),
            stop: false,
        })
        .await
        .unwrap();
    let paths: Vec<_> = snap.data_volumes.iter().map(|v| v.path.as_str()).collect();
    assert_eq!(paths, ["/var/mine", "/var/lib/db"]);
    assert_eq!(snap.data_volumes[0].file.bytes, 16 << 20);

    // Later writes are undone by a restore.
    poke(&file_of("mine"), AT, b"late");
    t.engine.restore("pg", "s").await.unwrap();
    assert_eq!(peek(&file_of("mine"), AT, 4), b"snap");
    running_pid(&t, "pg").await;

    // A clone runs on copies of its own.
    let mut clone = run_request("cl", "", &[]);
    clone.from_snapshot = Some(Name::new("s").unwrap());
    let cl = t.engine.run(clone).await.unwrap();
    let names: Vec<_> = cl
        .spec
        .volumes
        .iter()
        .map(|a| a.volume.to_string())
        .collect();
    assert_eq!(names, ["cl-mine", "cl-data"]);
    assert_eq!(peek(&file_of("cl-mine"), AT, 4), b"snap");
    assert_eq!(peek(&file_of("cl-data"), AT, 4), b"data");
    poke(&file_of("cl-mine"), AT, b"mine");
    assert_eq!(
        peek(&file_of("mine"), AT, 4),
        b"snap",
        "copies are independent"
    );

    // A clone that cannot start removes the copies it made.
    t.driver
        .fail_launch
        .store(true, std::sync::atomic::Ordering::SeqCst);
    let mut again = run_request("cl2", "", &[]);
    again.from_snapshot = Some(Name::new("s").unwrap());
    assert!(t.engine.run(again).await.is_err());
    assert!(t.engine.volume("cl2-mine").is_err());
    assert!(t.engine.volume("cl2-data").is_err());
}

fn poke(file: &std::path::Path, at: u64, data: &[u8]) {
    use std::io::{Seek, SeekFrom, Write};
    let mut f = std::fs::OpenOptions::new().write(true).open(file).unwrap();
    f.seek(SeekFrom::Start(at)).unwrap();
    f.write_all(data).unwrap();
}

fn peek(file: &std::path::Path, at: u64, len: usize) -> Vec<u8> {
    std::fs::read(file).unwrap()[at as usize..at as usize + len].to_vec()
}

/// Snapshots keep the volume as it was; a restore brings it back, a clone
/// is a new volume of it; names are unique, and a snapshot of another
/// volume is not restored. A running guest is held for the copy and runs
/// again after; growing its volume tells its VM.
#[tokio::test]
async fn snapshots_restore_and_clone_volumes() {
    let dir = tempfile::tempdir().unwrap();
    let t = engine(dir.path()).await;
    let v = t.engine.create_volume(create("v", 16)).await.unwrap();
    let file = dir.path().join("volumes").join(&v.id).join("volume.img");
    const AT: u64 = 8 << 20;
    poke(&file, AT, b"one");
    let named = |n: &str| vroom_types::VolumeSnapshotRequest {
        name: Some(Name::new(n).unwrap()),
    };
    let s1 = t.engine.snapshot_volume("v", named("s1")).await.unwrap();
    assert_eq!(s1.taken, vroom_types::SnapshotTaken::Offline);
    assert!(s1.bytes > 0 && s1.bytes < 16 << 20, "{s1:?}");
    let err = t
        .engine
        .snapshot_volume("v", named("s1"))
        .await
        .unwrap_err();
    assert_eq!(err.code, ErrorCode::AlreadyExists);

    poke(&file, AT, b"two");
    let restore = |s: &str| vroom_types::VolumeRestoreRequest {
        snapshot: Name::new(s).unwrap(),
    };
    t.engine.restore_volume("v", restore("s1")).await.unwrap();
    assert_eq!(peek(&file, AT, 3), b"one");

    let w = t
        .engine
        .clone_volume(
            "s1",
            vroom_types::VolumeCloneRequest {
                name: Name::new("w").unwrap(),
            },
        )
        .await
        .unwrap();
    let wfile = dir.path().join("volumes").join(&w.id).join("volume.img");
    assert_eq!(peek(&wfile, AT, 3), b"one");
    poke(&wfile, AT, b"own");
    assert_eq!(peek(&file, AT, 3), b"one", "a clone is independent");
    t.engine.snapshot_volume("w", named("ws")).await.unwrap();
    let err = t
        .engine
        .restore_volume("v", restore("ws"))
        .await
        .unwrap_err();
    assert!(
        err.message.contains("is of volume w, not v"),
        "{}",
        err.message
    );
    assert_eq!(peek(&file, AT, 3), b"one");

    // Attached to a running guest: held for the copy, running after.
    t.engine
        .run(with_volumes("a", "store", vec![attach("v", "/var/v")]))
        .await
        .unwrap();
    let pid = running_pid(&t, "a").await;
    let s2 = t.engine.snapshot_volume("v", named("s2")).await.unwrap();
    assert_eq!(s2.taken, vroom_types::SnapshotTaken::Frozen);
    let process = t.engine.get("a").unwrap();
    assert_eq!(process.status.state, InstanceState::Running);
    let vm = crate::driver::VmProcess {
        pid,
        accel: vroom_types::Accel::Tcg,
        control_socket: t.driver.spec_of(pid).unwrap().run_dir.join("qmp.sock"),
    };
    use crate::driver::VmDriver;
    assert_eq!(
        t.driver.run_state(&vm).unwrap(),
        crate::driver::VmRunState::Running,
        "resumed after the copy"
    );
    let err = t
        .engine
        .restore_volume("v", restore("s2"))
        .await
        .unwrap_err();
    assert!(err.message.contains("stop it first"), "{}", err.message);
    // Grown online: the VM learns the new size.
    t.engine
        .resize_volume("v", VolumeResizeRequest { size_mib: 32 })
        .await
        .unwrap();
    assert_eq!(t.driver.spec_of(pid).unwrap().data_disks[0].bytes, 32 << 20);

    t.engine.remove_volume_snapshot("v", "s1").await.unwrap();
    let snaps = dir.path().join("volumes").join(&v.id).join("snapshots");
    assert!(!snaps.join("s1.img").exists());
    assert!(snaps.join("s2.img").exists());
    let names: Vec<_> = t
        .engine
        .volume("v")
        .unwrap()
        .snapshots
        .into_iter()
        .map(|s| s.name.to_string())
        .collect();
    assert_eq!(names, ["s2"]);

    // What a daemon killed inside a snapshot or a restore leaves is swept.
    std::fs::write(snaps.join(".new-s3.img"), b"half").unwrap();
    std::fs::write(snaps.join("s9.img"), b"unrecorded").unwrap();
    std::fs::write(file.with_file_name(".new-volume.img"), b"half").unwrap();
    let engine = t.restarted();
    engine.recover().await.unwrap();
    let mut left: Vec<_> = std::fs::read_dir(&snaps)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    left.sort();
    assert_eq!(left, ["s2.img"]);
    assert!(!file.with_file_name(".new-volume.img").exists());
}

/// An ephemeral instance's declared volumes start empty at every cold
/// start; it never takes (and so never wipes) a volume that exists.
#[tokio::test]
async fn ephemeral_instances_get_empty_volumes_at_every_start() {
    let dir = tempfile::tempdir().unwrap();
    let t = engine(dir.path()).await;
    let mut req = run_request("tmp", "db", &[]);
    req.spec.ephemeral = true;
    t.engine.run(req.clone()).await.unwrap();
    running_pid(&t, "tmp").await;
    let v = t.engine.volume("tmp-data").unwrap();
    let file = dir.path().join("volumes").join(&v.id).join("volume.img");
    const AT: u64 = 8 << 20;
    poke(&file, AT, b"junk");
    t.engine
        .action("tmp", vroom_types::InstanceAction::Restart)
        .await
        .unwrap();
    running_pid(&t, "tmp").await;
    assert_eq!(peek(&file, AT, 4), [0, 0, 0, 0], "made empty again");
    assert_eq!(&std::fs::read(&file).unwrap()[1080..1082], &[0x53, 0xef]);

    t.engine.remove("tmp", true).await.unwrap();
    let err = t.engine.run(req).await.unwrap_err();
    assert!(
        err.message.contains("volume tmp-data exists"),
        "{}",
        err.message
    );
    assert!(t.engine.get("tmp").is_err());
}

/// `rm --archive` puts a copy of each data volume in the archive, listed in
/// its SHA256SUMS with the rest, holes kept; the volumes themselves stay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_archive_holds_the_data_volumes() {
    let dir = tempfile::tempdir().unwrap();
    let t = engine(dir.path()).await;
    t.engine.run(run_request("pg", "db", &[])).await.unwrap();
    running_pid(&t, "pg").await;
    let v = t.engine.volume("pg-data").unwrap();
    let file = dir.path().join("volumes").join(&v.id).join("volume.img");
    const AT: u64 = 8 << 20;
    poke(&file, AT, b"evidence");
    let archive = dir.path().join("archive");
    let report = t
        .engine
        .remove_archived("pg", archive.to_str().unwrap(), Some((0, 0)))
        .await
        .unwrap();
    assert!(
        report.files.iter().any(|f| f.path == "volumes/pg-data.img"),
        "{:?}",
        report.files
    );
    let copy = archive.join("volumes/pg-data.img");
    assert_eq!(std::fs::read(&copy).unwrap(), std::fs::read(&file).unwrap());
    assert!(
        vroom_volume::data::allocated_bytes(&copy) < 8 << 20,
        "holes kept: {}",
        vroom_volume::data::allocated_bytes(&copy)
    );
    let sums = std::fs::read_to_string(archive.join(vroom_types::ARCHIVE_MANIFEST)).unwrap();
    assert!(sums.contains("  volumes/pg-data.img\n"), "{sums}");
    assert_eq!(
        crate::engine::verify_archive(&archive).unwrap(),
        Vec::<String>::new()
    );
    // A changed byte is caught.
    poke(&copy, AT, b"tampered");
    let problems = crate::engine::verify_archive(&archive).unwrap();
    assert!(
        problems[0].starts_with("volumes/pg-data.img: sha256"),
        "{problems:?}"
    );
    assert_eq!(t.engine.volume("pg-data").unwrap().attached_to, None);
}

fn export_req(snapshot: Option<&str>, listen: Option<&str>, backup: bool) -> VolumeExportRequest {
    VolumeExportRequest {
        snapshot: snapshot.map(|s| Name::new(s).unwrap()),
        listen: listen.map(String::from),
        backup,
    }
}

/// The live qemu-nbd serving `volume`'s export, if any.
fn server(dir: &std::path::Path, volume: &str) -> Option<u32> {
    vroom_volume::nbd::server_pid(&dir.join("exports").join(format!("{volume}.pid")))
}

/// Whether process `pid` is gone (a reaped or zombie server counts).
fn gone(pid: u32) -> bool {
    std::fs::read(format!("/proc/{pid}/cmdline")).map_or(true, |c| c.is_empty())
}

fn exports_dir_files(dir: &std::path::Path) -> Vec<String> {
    let mut files: Vec<String> = std::fs::read_dir(dir.join("exports"))
        .map(|d| {
            d.map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    files.sort();
    files
}

/// An export serves a point in time with a real qemu-nbd: the volume
/// itself while no instance runs with it (and no instance starts with it
/// meanwhile), a snapshot, or for a backup a snapshot taken for it. A taken
/// address, a second export, a missing snapshot and a member's socket path
/// are refused with nothing left; removing the volume or snapshot ends the
/// export.
#[tokio::test]
async fn exports_serve_a_point_in_time_and_leave_nothing_when_refused() {
    let dir = tempfile::tempdir().unwrap();
    let t = engine(dir.path()).await;
    let v = t.engine.create_volume(create("v", 16)).await.unwrap();
    let e = t
        .engine
        .export_volume("v", export_req(None, None, false), None)
        .await
        .unwrap();
    let socket = dir.path().join("exports/v.sock");
    assert_eq!(e.listen, format!("unix:{}", socket.display()));
    assert_eq!(e.uri, format!("nbd+unix:///v?socket={}", socket.display()));
    assert_eq!((e.size_bytes, e.writable), (16 << 20, false));
    assert_eq!(server(dir.path(), "v"), Some(e.pid));
    assert!(socket.exists());
    assert_eq!(t.engine.volume("v").unwrap().export, Some(e.clone()));

    // Nothing may start with the exported volume; a second export and a
    // member's own socket path are refused.
    let err = t
        .engine
        .run(with_volumes("a", "store", vec![attach("v", "/var/v")]))
        .await
        .unwrap_err();
    assert!(err.message.contains("unexport v"), "{}", err.message);
    assert!(t.engine.get("a").is_err());
    let err = t
        .engine
        .export_volume("v", export_req(None, None, false), None)
        .await
        .unwrap_err();
    assert_eq!(err.code, ErrorCode::AlreadyExists, "{}", err.message);
    t.engine.unexport_volume("v").await.unwrap();
    assert!(gone(e.pid));
    assert_eq!(exports_dir_files(dir.path()), Vec::<String>::new());
    assert_eq!(t.engine.volume("v").unwrap().export, None);

    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = format!("tcp:{}", taken.local_addr().unwrap());
    let refusals: Vec<(VolumeExportRequest, Option<u32>, &str)> = vec![
        (
            export_req(None, Some(&addr), false),
            None,
            "address is in use",
        ),
        (
            export_req(None, Some("unix:/tmp/x.sock"), false),
            Some(1000),
            "may not name a socket path",
        ),
        (
            export_req(None, Some("tcp:127.0.0.1:80"), false),
            Some(1000),
            "below 1024",
        ),
        (
            export_req(Some("nope"), None, false),
            None,
            "no volume snapshot named",
        ),
        (
            export_req(None, Some("tcp:nowhere"), false),
            None,
            "invalid listen address",
        ),
    ];
    for (req, uid, want) in refusals {
        let err = t
            .engine
            .export_volume("v", req.clone(), uid)
            .await
            .unwrap_err();
        assert!(err.message.contains(want), "{req:?}: {}", err.message);
        assert!(!err.message.contains('\n'));
        assert_eq!(
            exports_dir_files(dir.path()),
            Vec::<String>::new(),
            "{req:?}"
        );
        assert!(vroom_volume::nbd::servers_under(&dir.path().join("exports")).is_empty());
    }
    // An existing path is taken too (qemu-nbd would unlink it).
    let file = dir.path().join("exists");
    std::fs::write(&file, b"mine").unwrap();
    let listen = format!("unix:{}", file.display());
    let err = t
        .engine
        .export_volume("v", export_req(None, Some(&listen), false), None)
        .await
        .unwrap_err();
    assert!(err.message.contains("in use"), "{}", err.message);
    assert_eq!(std::fs::read(&file).unwrap(), b"mine");

    // Running: refused with a hint, unless for a backup, which exports a
    // snapshot taken for it and removes it with the export.
    t.engine
        .run(with_volumes("a", "store", vec![attach("v", "/var/v")]))
        .await
        .unwrap();
    running_pid(&t, "a").await;
    let err = t
        .engine
        .export_volume("v", export_req(None, None, false), None)
        .await
        .unwrap_err();
    assert!(err.message.contains("export a snapshot"), "{}", err.message);
    let b = t
        .engine
        .export_volume("v", export_req(None, None, true), None)
        .await
        .unwrap();
    let snap = b.snapshot.clone().unwrap();
    assert!(b.temporary_snapshot);
    assert_eq!(b.kind, vroom_types::ExportKind::Backup);
    let snaps = dir.path().join("volumes").join(&v.id).join("snapshots");
    assert!(snaps.join(format!("{snap}.img")).exists());
    t.engine.unexport_volume("v").await.unwrap();
    assert!(gone(b.pid));
    assert!(t.engine.volume("v").unwrap().snapshots.is_empty());
    assert!(!snaps.join(format!("{snap}.img")).exists());

    // A snapshot's export ends with the snapshot, a volume's with the volume.
    let named = vroom_types::VolumeSnapshotRequest {
        name: Some(Name::new("s1").unwrap()),
    };
    t.engine.snapshot_volume("v", named).await.unwrap();
    let s = t
        .engine
        .export_volume("v", export_req(Some("s1"), None, false), None)
        .await
        .unwrap();
    t.engine.remove_volume_snapshot("v", "s1").await.unwrap();
    assert!(gone(s.pid));
    assert_eq!(exports_dir_files(dir.path()), Vec::<String>::new());
    t.engine.remove("a", true).await.unwrap();
    let e = t
        .engine
        .export_volume("v", export_req(None, None, false), None)
        .await
        .unwrap();
    t.engine.remove_volume("v").await.unwrap();
    assert!(gone(e.pid));
    assert_eq!(exports_dir_files(dir.path()), Vec::<String>::new());
}

/// An import is a staging file served writable; committed, it is a volume
/// when it holds ext4, and nothing at all otherwise.
#[tokio::test]
async fn imports_make_a_whole_volume_or_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let t = engine(dir.path()).await;
    let src = t.engine.create_volume(create("src", 16)).await.unwrap();
    let src_file = dir.path().join("volumes").join(&src.id).join("volume.img");
    poke(&src_file, 8 << 20, b"data");
    let import = |size_mib| VolumeImportRequest { size_mib };

    let e = t.engine.import_volume("imp", import(16)).await.unwrap();
    assert!(e.writable);
    assert_eq!(t.engine.list_volumes().unwrap().len(), 1, "not listed yet");
    let err = t.engine.import_volume("imp", import(16)).await.unwrap_err();
    assert_eq!(err.code, ErrorCode::AlreadyExists);
    let err = t.engine.import_volume("src", import(16)).await.unwrap_err();
    assert_eq!(err.code, ErrorCode::AlreadyExists);
    let err = t.engine.import_volume("big", import(8)).await.unwrap_err();
    assert_eq!(err.code, ErrorCode::InvalidArgument);
    // What a client would write over NBD, written to the same file.
    let staged = std::fs::read_dir(dir.path().join("volumes"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| {
            p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with(".new-")
        })
        .unwrap()
        .join("volume.img");
    std::fs::write(&staged, std::fs::read(&src_file).unwrap()).unwrap();
    let v = t.engine.commit_import("imp").await.unwrap();
    assert_eq!(v.size_mib, 16);
    assert!(gone(e.pid));
    let file = dir.path().join("volumes").join(&v.id).join("volume.img");
    assert_eq!(peek(&file, 8 << 20, 4), b"data");
    assert_eq!(exports_dir_files(dir.path()), Vec::<String>::new());

    // Not ext4: refused, and nothing is left.
    t.engine.import_volume("junk", import(16)).await.unwrap();
    let err = t.engine.commit_import("junk").await.unwrap_err();
    assert!(err.message.contains("not an ext4"), "{}", err.message);
    assert_eq!(err.code, ErrorCode::InvalidVolume);
    assert!(t.engine.volume("junk").is_err());
    let mut on_disk: Vec<_> = std::fs::read_dir(dir.path().join("volumes"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    on_disk.sort();
    let mut want = vec![src.id.clone(), v.id.clone()];
    want.sort();
    assert_eq!(on_disk, want);
    assert_eq!(exports_dir_files(dir.path()), Vec::<String>::new());
    // Dropped before its commit: the same.
    t.engine.import_volume("drop", import(16)).await.unwrap();
    t.engine.unexport_volume("drop").await.unwrap();
    assert_eq!(
        std::fs::read_dir(dir.path().join("volumes"))
            .unwrap()
            .count(),
        2
    );
    assert_eq!(exports_dir_files(dir.path()), Vec::<String>::new());
}

/// A daemon killed with exports under way: at the next start a plain
/// export whose server runs is kept; a backup's export (and its snapshot),
/// an import (and its staging file), a record whose server is gone, and a
/// server no record names are ended and removed.
#[tokio::test]
async fn a_restart_keeps_live_exports_and_ends_the_rest() {
    let dir = tempfile::tempdir().unwrap();
    let t = engine(dir.path()).await;
    for name in ["kept", "backed", "dead", "orphan"] {
        t.engine.create_volume(create(name, 16)).await.unwrap();
    }
    let kept = t
        .engine
        .export_volume("kept", export_req(None, None, false), None)
        .await
        .unwrap();
    t.engine
        .run(with_volumes("a", "store", vec![attach("backed", "/var/b")]))
        .await
        .unwrap();
    running_pid(&t, "a").await;
    let backed = t
        .engine
        .export_volume("backed", export_req(None, None, true), None)
        .await
        .unwrap();
    assert!(backed.temporary_snapshot);
    assert_eq!(t.engine.volume("backed").unwrap().snapshots.len(), 1);
    let imp = t
        .engine
        .import_volume("imp", VolumeImportRequest { size_mib: 16 })
        .await
        .unwrap();
    let dead = t
        .engine
        .export_volume("dead", export_req(None, None, false), None)
        .await
        .unwrap();
    vroom_volume::nbd::stop(dead.pid, &dir.path().join("exports/dead.pid")).unwrap();
    // A server started just before a kill, before its record was written.
    let exports = dir.path().join("exports");
    let listen =
        vroom_types::ExportAddress::Unix(exports.join("orphan.sock").display().to_string());
    let orphan_file = dir
        .path()
        .join("volumes")
        .join(t.engine.volume("orphan").unwrap().id)
        .join("volume.img");
    let orphan = vroom_volume::nbd::serve(&vroom_volume::nbd::Serve {
        file: &orphan_file,
        export_name: "orphan",
        listen: &listen,
        pid_file: &exports.join("orphan.pid"),
        writable: false,
        durable: false,
        clients: 1,
    })
    .unwrap();
    // A record written just before a kill, nothing else made yet.
    std::fs::write(exports.join("half.json.tmp"), b"{").unwrap();

    let engine = t.restarted();
    engine.recover().await.unwrap();
    assert_eq!(server(dir.path(), "kept"), Some(kept.pid));
    assert_eq!(engine.volume("kept").unwrap().export.unwrap().pid, kept.pid);
    for pid in [backed.pid, imp.pid, orphan] {
        assert!(gone(pid), "{pid} still runs");
    }
    for name in ["backed", "dead", "orphan"] {
        assert_eq!(engine.volume(name).unwrap().export, None, "{name}");
    }
    assert!(engine.volume("imp").is_err());
    assert!(
        engine.volume("backed").unwrap().snapshots.is_empty(),
        "the backup's snapshot"
    );
    assert_eq!(
        exports_dir_files(dir.path()),
        ["kept.json", "kept.pid", "kept.sock"]
    );
    let staging = std::fs::read_dir(dir.path().join("volumes"))
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .file_name()
                .to_string_lossy()
                .starts_with(".new-")
        })
        .count();
    assert_eq!(staging, 0);
    engine.unexport_volume("kept").await.unwrap();
    assert!(gone(kept.pid));
}

/// A daemon killed while a volume snapshot holds the guest (VM paused, its
/// volumes frozen, the marker down) leaves it paused: the next daemon lets
/// it run. A snapshot that finishes leaves no marker behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_guest_held_for_a_volume_snapshot_runs_again_after_a_daemon_crash() {
    use crate::driver::{VmDriver, VmRunState};
    let dir = tempfile::tempdir().unwrap();
    let t = engine(dir.path()).await;
    let i = t.engine.run(run_request("pg", "db", &[])).await.unwrap();
    let pid = running_pid(&t, "pg").await;
    let run_dir = dir.path().join("instances").join(&i.id);
    t.engine
        .snapshot_volume("pg-data", vroom_types::VolumeSnapshotRequest::default())
        .await
        .unwrap();
    assert!(
        !run_dir.join("snapshotting").exists(),
        "a finished snapshot clears its marker"
    );

    // What a kill in the middle of the copy leaves.
    let vm = crate::driver::VmProcess {
        pid,
        accel: vroom_types::Accel::Tcg,
        control_socket: run_dir.join("qmp.sock"),
    };
    t.driver.pause(&vm).unwrap();
    std::fs::write(run_dir.join("snapshotting"), b"").unwrap();
    let engine = t.restarted();
    engine.recover().await.unwrap();
    assert_eq!(t.driver.run_state(&vm).unwrap(), VmRunState::Running);
    assert!(!run_dir.join("snapshotting").exists());
}
