//! One cgroup per jailed VMM, named `vroom/<run dir name>`, with a memory
//! and a pids limit.
//!
//! Both hierarchies are handled:
//! - **v2** (the unified hierarchy mounted at `/sys/fs/cgroup`, recognised by
//!   its `cgroup.controllers` file): one group `vroom/<id>` with `memory.max`,
//!   `memory.swap.max` and `pids.max`; the memory and pids controllers are
//!   enabled in the `subtree_control` of the root and of `vroom`.
//! - **v1** (or hybrid, with the controllers under `/sys/fs/cgroup/memory` and
//!   `/sys/fs/cgroup/pids`): `vroom/<id>` in both, with `memory.limit_in_bytes`
//!   and `pids.max`.
//!
//! The VMM joins its group itself, before it execs (see `jailer`), so it is
//! limited from its first instruction. A group is removed once its VMM is
//! gone (the driver's `wait_exit`, a failed launch) and every empty group
//! left under `vroom` is swept when a daemon starts. A sweep may race with
//! a launch of another daemon between the `mkdir` and the join, so joining
//! recreates a group that vanished.

use std::io::ErrorKind;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Where cgroup file systems are mounted.
pub const CGROUP_MOUNT: &str = "/sys/fs/cgroup";
/// The parent group of every VMM's group.
pub const PARENT: &str = "vroom";

/// QEMU's own memory next to the guest's under TCG with `tb-size=32`:
/// measured with a 128 MiB hello guest at boot, QEMU's RSS peaked at
/// ~190 MiB and the group's charge (RSS plus the page cache of the disks it
/// reads) at ~230 MiB; KVM needs less. The limit leaves room for a busy
/// guest's device buffers and the block layer's worker threads.
pub const VMM_OVERHEAD_MIB: u64 = 256;

/// QEMU's block layer alone may run 64 worker threads; vCPU threads, the
/// main loop, RCU and I/O threads come on top.
pub const PIDS_BASE: u64 = 128;

/// The limits of one VMM's group.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CgroupSpec {
    /// Relative to the hierarchy's root: `vroom/<id>`.
    pub name: String,
    pub memory_max_bytes: u64,
    pub pids_max: u64,
}

impl CgroupSpec {
    /// The group of the VMM whose run dir is `run_dir`: guest memory plus an
    /// eighth of it (page tables, device buffers grow with it) plus
    /// [`VMM_OVERHEAD_MIB`], and [`PIDS_BASE`] plus one per vCPU.
    pub fn for_vm(run_dir: &Path, mem_mib: u64, cpus: u32) -> CgroupSpec {
        CgroupSpec {
            name: group_name(run_dir),
            memory_max_bytes: (mem_mib + mem_mib / 8 + VMM_OVERHEAD_MIB) * 1024 * 1024,
            pids_max: PIDS_BASE + u64::from(cpus),
        }
    }
}

/// `vroom/<run dir name>` (or `vroom/<scope>/<run dir name>` in a scoped
/// daemon): the run dir's name is the instance id, unique across data dirs.
pub fn group_name(run_dir: &Path) -> String {
    let id = run_dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    format!("{}/{id}", scope_group())
}

static SCOPE: std::sync::OnceLock<String> = std::sync::OnceLock::new();

/// Puts every VMM this process launches under `vroom/<scope>`: a cluster
/// node's guard kills the whole scope when the node must fence itself. Set
/// once, before the first launch; a second call is ignored.
pub fn set_scope(scope: &str) {
    let _ = SCOPE.set(scope.to_string());
}

/// The group every VMM of this process is under: `vroom`, or `vroom/<scope>`.
pub fn scope_group() -> String {
    match SCOPE.get() {
        Some(scope) => format!("{PARENT}/{scope}"),
        None => PARENT.to_string(),
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error("no usable cgroup hierarchy under {mount} (need cgroup v2, or v1 with the memory and pids controllers)")]
    NoHierarchy { mount: PathBuf },
    #[error("failed to write {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("failed to create cgroup {path}")]
    Create {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("failed to remove cgroup {path}")]
    Remove {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// The cgroup layout of this host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Hierarchy {
    V1 { memory: PathBuf, pids: PathBuf },
    V2 { root: PathBuf },
}

impl Hierarchy {
    /// Reads the layout under `mount` (normally [`CGROUP_MOUNT`]).
    pub fn detect(mount: &Path) -> Result<Hierarchy, CgroupError> {
        if mount.join("cgroup.controllers").is_file() {
            return Ok(Hierarchy::V2 {
                root: mount.to_path_buf(),
            });
        }
        let (memory, pids) = (mount.join("memory"), mount.join("pids"));
        if memory.join("cgroup.procs").is_file() && pids.join("cgroup.procs").is_file() {
            return Ok(Hierarchy::V1 { memory, pids });
        }
        Err(CgroupError::NoHierarchy {
            mount: mount.to_path_buf(),
        })
    }

    /// The directories of group `name`, one per hierarchy it lives in.
    pub fn dirs(&self, name: &str) -> Vec<PathBuf> {
        match self {
            Hierarchy::V1 { memory, pids } => vec![memory.join(name), pids.join(name)],
            Hierarchy::V2 { root } => vec![root.join(name)],
        }
    }

    /// The limit files of a group and what goes into them.
    pub fn limit_files(&self, spec: &CgroupSpec) -> Vec<(PathBuf, String)> {
        let memory = spec.memory_max_bytes.to_string();
        let pids = spec.pids_max.to_string();
        match self {
            Hierarchy::V1 {
                memory: mem_root,
                pids: pids_root,
            } => {
                let dir = mem_root.join(&spec.name);
                vec![
                    (dir.join("memory.limit_in_bytes"), memory.clone()),
                    // With swap accounting on, memory plus swap gets the same
                    // cap: no swapping past the limit.
                    (dir.join("memory.memsw.limit_in_bytes"), memory),
                    (pids_root.join(&spec.name).join("pids.max"), pids),
                ]
            }
            Hierarchy::V2 { root } => {
                let dir = root.join(&spec.name);
                vec![
                    (dir.join("memory.max"), memory),
                    (dir.join("memory.swap.max"), "0".into()),
                    (dir.join("pids.max"), pids),
                ]
            }
        }
    }

    /// Creates the group with its limits (idempotent) and moves `pid` into it.
    /// A group that vanishes in between (another daemon's sweep) is made again.
    pub fn create_and_join(&self, spec: &CgroupSpec, pid: u32) -> Result<(), CgroupError> {
        let mut attempts = 0;
        loop {
            attempts += 1;
            match self.try_create_and_join(spec, pid) {
                Err(CgroupError::Write { source, .. } | CgroupError::Create { source, .. })
                    if source.kind() == ErrorKind::NotFound && attempts < 5 => {}
                other => return other,
            }
        }
    }

    fn try_create_and_join(&self, spec: &CgroupSpec, pid: u32) -> Result<(), CgroupError> {
        if let Hierarchy::V2 { root } = self {
            // Controllers must be enabled top-down before a child can use them.
            enable_controllers(root)?;
            let parent = root.join(PARENT);
            make_dir(&parent)?;
            enable_controllers(&parent)?;
            if SCOPE.get().is_some() {
                let scope = root.join(scope_group());
                make_dir(&scope)?;
                enable_controllers(&scope)?;
            }
        }
        for dir in self.dirs(&spec.name) {
            make_dir(&dir)?;
        }
        for (path, value) in self.limit_files(spec) {
            // Swap accounting may be off (no such file): then there is no swap to limit.
            let swap =
                path.ends_with("memory.swap.max") || path.ends_with("memory.memsw.limit_in_bytes");
            if swap && !path.exists() {
                continue;
            }
            write(&path, &value)?;
        }
        for dir in self.dirs(&spec.name) {
            write(&dir.join("cgroup.procs"), &pid.to_string())?;
        }
        Ok(())
    }

    /// Removes group `name` once it is empty; a missing group is fine. The
    /// kernel may need a moment after the last process exited.
    pub fn remove(&self, name: &str) -> Result<(), CgroupError> {
        for dir in self.dirs(name) {
            let mut attempts = 0;
            loop {
                match std::fs::remove_dir(&dir) {
                    Ok(()) => break,
                    Err(e) if e.kind() == ErrorKind::NotFound => break,
                    Err(e) if attempts < 20 && e.raw_os_error() == Some(libc::EBUSY) => {
                        attempts += 1;
                        std::thread::sleep(Duration::from_millis(25));
                    }
                    Err(source) => return Err(CgroupError::Remove { path: dir, source }),
                }
            }
        }
        Ok(())
    }

    /// Removes every empty group under `vroom` (those of VMMs that ended
    /// while no daemon watched them). Groups with processes stay.
    pub fn sweep(&self) -> Vec<String> {
        let mut removed = vec![];
        let mut groups = vec![scope_group(), PARENT.to_string()];
        groups.dedup();
        let parents = groups
            .iter()
            .flat_map(|group| self.dirs(group).into_iter().map(move |dir| (group, dir)));
        for (group, parent) in parents {
            let Ok(entries) = std::fs::read_dir(&parent) else {
                continue;
            };
            for entry in entries.flatten() {
                if entry.path().is_dir() && std::fs::remove_dir(entry.path()).is_ok() {
                    removed.push(format!("{group}/{}", entry.file_name().to_string_lossy()));
                }
            }
        }
        removed
    }
}

/// Every process in `group` and the groups under it, in each hierarchy.
pub fn processes_under(hierarchy: &Hierarchy, group: &str) -> Vec<u32> {
    fn walk(dir: &Path, pids: &mut Vec<u32>) {
        if let Ok(procs) = std::fs::read_to_string(dir.join("cgroup.procs")) {
            pids.extend(procs.lines().filter_map(|l| l.trim().parse::<u32>().ok()));
        }
        if let Ok(entries) = std::fs::read_dir(dir) {
            for entry in entries.flatten() {
                if entry.file_type().is_ok_and(|t| t.is_dir()) {
                    walk(&entry.path(), pids);
                }
            }
        }
    }
    let mut pids = vec![];
    for dir in hierarchy.dirs(group) {
        walk(&dir, &mut pids);
    }
    pids.sort_unstable();
    pids.dedup();
    pids
}

fn make_dir(dir: &Path) -> Result<(), CgroupError> {
    match std::fs::create_dir_all(dir) {
        Ok(()) => Ok(()),
        Err(source) => Err(CgroupError::Create {
            path: dir.to_path_buf(),
            source,
        }),
    }
}

fn write(path: &Path, value: &str) -> Result<(), CgroupError> {
    std::fs::write(path, value).map_err(|source| CgroupError::Write {
        path: path.to_path_buf(),
        source,
    })
}

fn enable_controllers(dir: &Path) -> Result<(), CgroupError> {
    let control = dir.join("cgroup.subtree_control");
    let enabled = std::fs::read_to_string(&control).unwrap_or_default();
    for controller in ["memory", "pids"] {
        if !enabled.split_whitespace().any(|c| c == controller) {
            write(&control, &format!("+{controller}"))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(path: &Path) -> String {
        std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
    }

    #[test]
    fn limits_follow_guest_memory_and_vcpus() {
        let cases = [
            (128, 1, (128 + 16 + 256) << 20, 129),
            (1024, 4, (1024 + 128 + 256) << 20, 132),
        ];
        for (mem_mib, cpus, memory, pids) in cases {
            let spec = CgroupSpec::for_vm(Path::new("/data/instances/ab12"), mem_mib, cpus);
            assert_eq!(spec.name, "vroom/ab12");
            assert_eq!((spec.memory_max_bytes, spec.pids_max), (memory, pids));
        }
    }

    #[test]
    fn detects_v2_v1_or_nothing() {
        let v2 = tempfile::tempdir().unwrap();
        std::fs::write(v2.path().join("cgroup.controllers"), "memory pids").unwrap();
        assert_eq!(
            Hierarchy::detect(v2.path()).unwrap(),
            Hierarchy::V2 {
                root: v2.path().into()
            }
        );
        let v1 = tempfile::tempdir().unwrap();
        for c in ["memory", "pids"] {
            std::fs::create_dir(v1.path().join(c)).unwrap();
            std::fs::write(v1.path().join(c).join("cgroup.procs"), "").unwrap();
        }
        assert!(matches!(
            Hierarchy::detect(v1.path()).unwrap(),
            Hierarchy::V1 { .. }
        ));
        let none = tempfile::tempdir().unwrap();
        std::fs::create_dir(none.path().join("memory")).unwrap();
        assert!(matches!(
            Hierarchy::detect(none.path()),
            Err(CgroupError::NoHierarchy { .. })
        ));
    }

    #[test]
    fn v2_enables_controllers_sets_limits_and_joins() {
        let root = tempfile::tempdir().unwrap();
        std::fs::write(root.path().join("cgroup.controllers"), "memory pids").unwrap();
        let h = Hierarchy::detect(root.path()).unwrap();
        let spec = CgroupSpec::for_vm(Path::new("/x/ab12"), 128, 1);
        h.create_and_join(&spec, 4242).unwrap();
        let group = root.path().join("vroom/ab12");
        // A fake file system keeps only the last write per file.
        assert_eq!(read(&root.path().join("cgroup.subtree_control")), "+pids");
        assert_eq!(read(&group.join("memory.max")), (400u64 << 20).to_string());
        assert_eq!(read(&group.join("pids.max")), "129");
        assert_eq!(read(&group.join("cgroup.procs")), "4242");
        assert!(
            !group.join("memory.swap.max").exists(),
            "no swap accounting, nothing written"
        );
    }

    #[test]
    fn v1_sets_limits_in_both_hierarchies_and_remove_is_idempotent() {
        let root = tempfile::tempdir().unwrap();
        for c in ["memory", "pids"] {
            std::fs::create_dir(root.path().join(c)).unwrap();
            std::fs::write(root.path().join(c).join("cgroup.procs"), "").unwrap();
        }
        let h = Hierarchy::detect(root.path()).unwrap();
        let spec = CgroupSpec::for_vm(Path::new("/x/cd34"), 256, 2);
        h.create_and_join(&spec, 7).unwrap();
        let memory = root.path().join("memory/vroom/cd34");
        let pids = root.path().join("pids/vroom/cd34");
        assert_eq!(
            read(&memory.join("memory.limit_in_bytes")),
            ((256u64 + 32 + 256) << 20).to_string()
        );
        assert_eq!(read(&pids.join("pids.max")), "130");
        assert_eq!(read(&memory.join("cgroup.procs")), "7");
        assert_eq!(read(&pids.join("cgroup.procs")), "7");
        // A real cgroup dir has only kernel files, which rmdir ignores; the fake one must be emptied.
        for dir in [&memory, &pids] {
            for f in std::fs::read_dir(dir).unwrap().flatten() {
                std::fs::remove_file(f.path()).unwrap();
            }
        }
        h.remove(&spec.name).unwrap();
        assert!(!memory.exists() && !pids.exists());
        h.remove(&spec.name).unwrap();
    }

    #[test]
    fn sweep_removes_only_empty_groups() {
        let root = tempfile::tempdir().unwrap();
        std::fs::write(root.path().join("cgroup.controllers"), "").unwrap();
        let h = Hierarchy::detect(root.path()).unwrap();
        std::fs::create_dir_all(root.path().join("vroom/gone")).unwrap();
        std::fs::create_dir_all(root.path().join("vroom/busy")).unwrap();
        std::fs::write(root.path().join("vroom/busy/cgroup.procs"), "1").unwrap();
        assert_eq!(h.sweep(), vec!["vroom/gone".to_string()]);
        assert!(root.path().join("vroom/busy").exists());
    }
}
