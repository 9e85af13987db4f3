//! vroom's own guest kernel: Debian's `linux-source` package configured with
//! `make tinyconfig` plus vroom's fragment (`kernel/vroom.config`, every
//! option commented with who needs it), everything built in, no modules.
//!
//! Layout under the kernel cache: `vroom-<id>/` holds `vmlinux` (QEMU's
//! microvm boots it through its PVH entry), `config` (the final `.config`),
//! `modules.json` (which options build each module, read from the source's
//! Kbuild files, so that a module list becomes a check) and `kernel.json`
//! (a [`KernelRef`]). The id hashes the source package's
//! version, the fragment's options (not its comments) and vroom's patches
//! (`kernel/patches/`, applied to the source before it is configured): a
//! config change or a patch is a new kernel, a reworded comment is not.

use std::collections::BTreeMap;
use std::fs;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::Command;

use vroom_base::LockExt;
use vroom_types::{KernelFlavor, KernelRef};

use super::KernelCache;
use crate::util::{run, sha256_bytes, sha256_file};

/// The Debian package whose kernel source vroom builds.
pub const SOURCE_PACKAGE: &str = "linux-source-6.1";

/// An own kernel's files as sent with an image (name in the image's
/// transfer, name in the cache entry); the vmlinux first.
const OWN_FILES: &[(&str, &str)] = &[
    ("kernel.vmlinux", "vmlinux"),
    ("kernel.config", "config"),
    ("kernel.modules.json", "modules.json"),
];

/// vroom's kernel config fragment, as checked in.
pub const FRAGMENT: &str = include_str!("../../../../kernel/vroom.config");

/// vroom's patches to the kernel source, applied in this order with
/// `patch -p1` after it is unpacked: (file name, text).
pub const PATCHES: &[(&str, &str)] = &[(
    "lapic-timer-hz.patch",
    include_str!("../../../../kernel/patches/lapic-timer-hz.patch"),
)];

/// Commands the build runs, and the Debian packages that provide them.
const BUILD_TOOLS: &[(&str, &str)] = &[
    ("make", "make"),
    ("gcc", "gcc"),
    ("flex", "flex"),
    ("bison", "bison"),
    ("bc", "bc"),
    ("xz", "xz-utils"),
    ("patch", "patch"),
];

/// objtool (built with the kernel) needs libelf's header.
const LIBELF_HEADER: (&str, &str) = ("/usr/include/libelf.h", "libelf-dev");

#[derive(Debug, thiserror::Error)]
pub enum BuildKernelError {
    #[error("kernel config fragment, line {line}: {reason}")]
    Fragment { line: usize, reason: String },
    #[error("cannot find {SOURCE_PACKAGE} through apt: {0}")]
    Resolve(String),
    #[error("missing what the kernel build needs: {what}; install with: apt-get install --no-install-recommends {packages}")]
    MissingTools { what: String, packages: String },
    #[error("cannot {step}: {reason}")]
    Step { step: &'static str, reason: String },
    #[error(
        "the kernel config does not take {} option(s) as asked (a dependency missing from the fragment?): {}",
        .0.len(),
        .0.join(", ")
    )]
    Unmet(Vec<String>),
    #[error("the kernel build failed: {reason} (whole log: {})", log.display())]
    Make { reason: String, log: PathBuf },
    #[error("kernel cache {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// A kernel config fragment: the options it sets (`Some(value)`) or turns
/// off (`None`, written `# CONFIG_X is not set`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fragment {
    options: BTreeMap<String, Option<String>>,
}

impl Fragment {
    /// Reads a fragment; comments and blank lines are ignored, an option
    /// given twice with different values is an error.
    pub fn parse(text: &str) -> Result<Fragment, BuildKernelError> {
        let mut options = BTreeMap::new();
        for (index, raw) in text.lines().enumerate() {
            let line = raw.trim();
            let err = |reason: String| BuildKernelError::Fragment {
                line: index + 1,
                reason,
            };
            let (name, value) = if let Some(off) = line
                .strip_prefix("# ")
                .and_then(|l| l.strip_suffix(" is not set"))
            {
                (off, None)
            } else if line.is_empty() || line.starts_with('#') {
                continue;
            } else {
                let (name, value) = line
                    .split_once('=')
                    .ok_or_else(|| err(format!("expected CONFIG_NAME=value, got `{line}`")))?;
                if value.is_empty() {
                    return Err(err(format!("{name} has no value")));
                }
                (name, Some(value.to_string()))
            };
            let valid = name.strip_prefix("CONFIG_").is_some_and(|n| {
                !n.is_empty() && n.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
            });
            if !valid {
                return Err(err(format!("`{name}` is not a CONFIG_ option name")));
            }
            match options.insert(name.to_string(), value.clone()) {
                Some(before) if before != value => {
                    return Err(err(format!("{name} is given twice, differently")));
                }
                _ => {}
            }
        }
        Ok(Fragment { options })
    }

    /// The options a final `.config` does not have as the fragment asks, as
    /// `CONFIG_X=y (got: absent)`.
    pub fn unmet(&self, config: &str) -> Vec<String> {
        let mut have: BTreeMap<&str, Option<&str>> = BTreeMap::new();
        for line in config.lines() {
            if let Some(off) = line
                .strip_prefix("# ")
                .and_then(|l| l.strip_suffix(" is not set"))
            {
                have.insert(off, None);
            } else if let Some((name, value)) = line.split_once('=') {
                if name.starts_with("CONFIG_") {
                    have.insert(name, Some(value));
                }
            }
        }
        let show = |name: &str, value: Option<&str>| match value {
            Some(v) => format!("{name}={v}"),
            None => format!("{name} off"),
        };
        self.options
            .iter()
            .filter_map(|(name, want)| {
                let got = have.get(name.as_str());
                // An option turned off may be absent altogether.
                let met = match (want, got) {
                    (None, None | Some(None)) => true,
                    (Some(w), Some(Some(g))) => w == g,
                    _ => false,
                };
                (!met).then(|| {
                    let got = match got {
                        Some(value) => show(name, *value),
                        None => "absent".into(),
                    };
                    format!("{} (got: {got})", show(name, want.as_deref()))
                })
            })
            .collect()
    }

    /// The kernel id for this fragment built from `source_version` with
    /// vroom's [`PATCHES`].
    pub fn id(&self, source_version: &str) -> String {
        self.id_with(source_version, PATCHES)
    }

    fn id_with(&self, source_version: &str, patches: &[(&str, &str)]) -> String {
        let mut key = format!("{SOURCE_PACKAGE} {source_version}\n");
        for (name, text) in patches {
            key.push_str(&format!("patch {name} {}\n", sha256_bytes(text.as_bytes())));
        }
        for (name, value) in &self.options {
            key.push_str(name);
            key.push('=');
            key.push_str(value.as_deref().unwrap_or("n"));
            key.push('\n');
        }
        sha256_bytes(key.as_bytes())[..16].to_string()
    }

    pub fn len(&self) -> usize {
        self.options.len()
    }

    pub fn is_empty(&self) -> bool {
        self.options.is_empty()
    }
}

/// A kernel vroom built.
#[derive(Debug, Clone)]
pub struct OwnKernel {
    pub id: String,
    pub reference: KernelRef,
    pub vmlinux: PathBuf,
    /// The final `.config`.
    pub config: PathBuf,
    /// `modules.json`: module name (`-` as `_`) to the options that build
    /// it in. Read only by [`OwnKernel::lacks`] (builds), not at boot.
    pub modules: PathBuf,
}

impl OwnKernel {
    /// The modules of `names` this kernel does not have built in, each with
    /// the option it lacks: `nft_log (CONFIG_NFT_LOG)`.
    pub fn lacks(&self, names: &[&str]) -> Vec<String> {
        let config = fs::read_to_string(&self.config).unwrap_or_default();
        let modules: BTreeMap<String, Vec<String>> = fs::read(&self.modules)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default();
        lacking(&modules, &config, names)
    }
}

/// Digests of vmlinux files by path, with the size and mtime they were
/// taken at: resolving an image (every launch) checks its kernel without
/// hashing 18 MB again.
static DIGESTS: std::sync::LazyLock<std::sync::Mutex<BTreeMap<PathBuf, Digest>>> =
    std::sync::LazyLock::new(Default::default);

/// A file's size and mtime, and its sha256 then.
type Digest = (u64, std::time::SystemTime, String);

fn vmlinux_digest(path: &Path) -> Option<String> {
    let meta = fs::metadata(path).ok()?;
    let key = (meta.len(), meta.modified().ok()?);
    let mut digests = DIGESTS.lock_unpoisoned();
    if let Some((len, mtime, sha)) = digests.get(path) {
        if (*len, *mtime) == key {
            return Some(sha.clone());
        }
    }
    let (sha, _) = sha256_file(path).ok()?;
    digests.insert(path.to_path_buf(), (key.0, key.1, sha.clone()));
    Some(sha)
}

fn lacking(modules: &BTreeMap<String, Vec<String>>, config: &str, names: &[&str]) -> Vec<String> {
    let on: std::collections::BTreeSet<&str> = config
        .lines()
        .filter_map(|l| l.strip_suffix("=y"))
        .collect();
    names
        .iter()
        .filter_map(|name| match modules.get(&name.replace('-', "_")) {
            None => Some(format!("{name} (no such module in the source)")),
            Some(options) if options.iter().any(|o| o == "y" || on.contains(o.as_str())) => None,
            Some(options) => Some(format!("{name} ({})", options.join(" or "))),
        })
        .collect()
}

/// Which options build which module, from every `Makefile` and `Kbuild`
/// under `src`: `obj-$(CONFIG_X) += a.o b.o` builds a and b under X
/// (`obj-y` ones are always built, recorded as `y`).
fn module_options(src: &Path) -> std::io::Result<BTreeMap<String, Vec<String>>> {
    let mut map: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut dirs = vec![src.to_path_buf()];
    while let Some(dir) = dirs.pop() {
        for entry in fs::read_dir(&dir)?.flatten() {
            let path = entry.path();
            let kind = entry.file_type()?;
            let name = entry.file_name();
            if kind.is_dir() && !name.to_string_lossy().starts_with('.') {
                dirs.push(path);
            } else if kind.is_file() && (name == "Makefile" || name == "Kbuild") {
                add_kbuild(&fs::read_to_string(&path).unwrap_or_default(), &mut map);
            }
        }
    }
    Ok(map)
}

fn add_kbuild(text: &str, map: &mut BTreeMap<String, Vec<String>>) {
    let joined = text.replace("\\\n", " ");
    for line in joined.lines() {
        let Some(rest) = line.trim().strip_prefix("obj-") else {
            continue;
        };
        let (option, rest) = if let Some(r) = rest.strip_prefix("$(") {
            let Some((option, rest)) = r.split_once(')') else {
                continue;
            };
            if !option.starts_with("CONFIG_") {
                continue;
            }
            (option, rest)
        } else if let Some(rest) = rest.strip_prefix('y') {
            ("y", rest)
        } else {
            continue;
        };
        let Some(objects) = rest
            .trim_start()
            .strip_prefix("+=")
            .or_else(|| rest.trim_start().strip_prefix(":="))
        else {
            continue;
        };
        for object in objects.split_whitespace() {
            if object.starts_with('#') {
                break;
            }
            let Some(stem) = object.strip_suffix(".o") else {
                continue;
            };
            if stem.contains('/') || stem.contains('$') {
                continue;
            }
            let options = map.entry(stem.replace('-', "_")).or_default();
            if !options.iter().any(|o| o == option) {
                options.push(option.to_string());
            }
        }
    }
}

impl KernelCache {
    fn build_lock(&self) -> std::io::Result<fs::File> {
        fs::create_dir_all(&self.dir)?;
        fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(self.dir.join(".build.lock"))
    }

    /// Whether a kernel build is under way (another process holds the lock).
    pub fn building(&self) -> bool {
        let Ok(lock) = self.build_lock() else {
            return false;
        };
        // SAFETY: plain syscall on an fd we own; released when it closes.
        unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) != 0 }
    }

    /// Where a build in the background writes its output.
    pub fn build_log(&self) -> PathBuf {
        self.dir.join("build.log")
    }

    /// The kernels vroom built, by id.
    pub fn own(&self) -> Vec<OwnKernel> {
        let Ok(entries) = fs::read_dir(&self.dir) else {
            return vec![];
        };
        let mut kernels: Vec<OwnKernel> = entries
            .flatten()
            .filter_map(|e| {
                let name = e.file_name().to_string_lossy().into_owned();
                self.load_own(name.strip_prefix("vroom-")?)
            })
            .collect();
        kernels.sort_by(|a, b| a.id.cmp(&b.id));
        kernels
    }

    /// vroom's kernel: the newest built from the fragment this vroom
    /// carries (on any source version), if one is.
    pub fn vroom_kernel(&self) -> Option<OwnKernel> {
        let bundled = Fragment::parse(FRAGMENT).ok()?;
        self.own()
            .into_iter()
            .filter(|k| bundled.id(&k.reference.version) == k.id)
            .max_by_key(|k| fs::metadata(&k.vmlinux).and_then(|m| m.modified()).ok())
    }

    /// The files another host needs to boot images built for `kernel`, by
    /// the names [`KernelCache::adopt_own`] takes.
    pub fn own_files(kernel: &OwnKernel) -> Vec<(String, PathBuf)> {
        let root = kernel.vmlinux.parent().unwrap_or(Path::new("/"));
        OWN_FILES
            .iter()
            .map(|(sent, here)| (sent.to_string(), root.join(here)))
            .collect()
    }

    /// Takes in an own kernel received from another host with an image
    /// built for it: `dir` holds the files [`KernelCache::own_files`] names.
    /// The vmlinux must have the digest the image pins (`reference`); the
    /// files are moved out of `dir`. Nothing to do when it is here.
    pub fn adopt_own(&self, reference: &KernelRef, dir: &Path) -> Result<(), String> {
        let id = reference.id.as_deref().unwrap_or_default();
        if id.len() != 16 || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(format!("the image names no valid kernel id ({id:?})"));
        }
        let present = self.find_own(reference).is_some();
        let files: Vec<PathBuf> = OWN_FILES.iter().map(|(sent, _)| dir.join(sent)).collect();
        if present {
            for file in &files {
                let _ = fs::remove_file(file);
            }
            return Ok(());
        }
        let (sha256, _) = sha256_file(&files[0]).map_err(|e| format!("its kernel: {e}"))?;
        if sha256 != reference.sha256 {
            return Err(format!(
                "its kernel has sha256 {}, the image pins {}",
                &sha256[..12],
                &reference.sha256[..12.min(reference.sha256.len())]
            ));
        }
        let io = |e: std::io::Error| format!("cannot store kernel {id}: {e}");
        fs::create_dir_all(&self.dir).map_err(io)?;
        let work = tempfile::Builder::new()
            .prefix(".adopt-")
            .tempdir_in(&self.dir)
            .map_err(io)?;
        for ((_, here), file) in OWN_FILES.iter().zip(&files) {
            fs::rename(file, work.path().join(here)).map_err(io)?;
        }
        fs::write(
            work.path().join("kernel.json"),
            serde_json::to_vec_pretty(reference).expect("invariant: serializable"),
        )
        .map_err(io)?;
        let dest = self.dir.join(format!("vroom-{id}"));
        let _ = fs::remove_dir_all(&dest);
        fs::rename(work.keep(), &dest).map_err(io)?;
        self.find_own(reference)
            .map(|_| ())
            .ok_or_else(|| format!("kernel {id} does not read back"))
    }

    /// The own kernel `reference` pins, if it is here and intact.
    pub fn find_own(&self, reference: &KernelRef) -> Option<OwnKernel> {
        let kernel = self.load_own(reference.id.as_deref()?)?;
        (kernel.reference.sha256 == reference.sha256).then_some(kernel)
    }

    fn load_own(&self, id: &str) -> Option<OwnKernel> {
        let root = self.dir.join(format!("vroom-{id}"));
        let mut reference: KernelRef =
            serde_json::from_slice(&fs::read(root.join("kernel.json")).ok()?).ok()?;
        // Entries from before kernels had a flavor.
        reference.flavor = KernelFlavor::Vroom;
        reference.id = Some(id.to_string());
        let vmlinux = root.join("vmlinux");
        let config = root.join("config");
        let modules = root.join("modules.json");
        let intact = vmlinux_digest(&vmlinux).is_some_and(|sha| sha == reference.sha256);
        (intact && config.is_file() && modules.is_file()).then(|| OwnKernel {
            id: id.to_string(),
            reference,
            vmlinux,
            config,
            modules,
        })
    }

    /// Builds `fragment` on `tinyconfig` from the newest `linux-source`
    /// package with `jobs` parallel jobs (niced); fast when that kernel is
    /// cached. `progress` hears each step (a stage and a detail).
    pub fn build_own(
        &self,
        fragment: &Fragment,
        jobs: usize,
        progress: &mut dyn FnMut(&str, &str),
    ) -> Result<OwnKernel, BuildKernelError> {
        let version = super::candidate(SOURCE_PACKAGE).map_err(BuildKernelError::Resolve)?;
        let id = fragment.id(&version);
        if let Some(kernel) = self.load_own(&id) {
            return Ok(kernel);
        }
        check_tools()?;
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| BuildKernelError::Io { path, source }
        };
        fs::create_dir_all(&self.dir).map_err(io(&self.dir))?;
        // One build at a time (`vroom setup` may have one going in the
        // background): wait for it, then take what it built.
        let lock = self.build_lock().map_err(io(&self.dir))?;
        if self.building() {
            progress("wait", "for the kernel build under way");
        }
        // SAFETY: plain syscall on an fd we own; released when it closes.
        if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) } != 0 {
            return Err(io(&self.dir)(std::io::Error::last_os_error()));
        }
        if let Some(kernel) = self.load_own(&id) {
            return Ok(kernel);
        }
        // Holding the lock, no other build runs: a work dir left here is
        // from one that was killed (a source tree and objects, over 1 GB).
        for entry in fs::read_dir(&self.dir).into_iter().flatten().flatten() {
            if entry.file_name().to_string_lossy().starts_with(".build-") {
                let _ = fs::remove_dir_all(entry.path());
            }
        }
        let work = tempfile::Builder::new()
            .prefix(".build-")
            .tempdir_in(&self.dir)
            .map_err(io(&self.dir))?;
        let step = |step: &'static str| move |reason| BuildKernelError::Step { step, reason };

        progress("download", &format!("{SOURCE_PACKAGE} {version}"));
        run(Command::new("apt-get")
            .args(["download", "-q", &format!("{SOURCE_PACKAGE}={version}")])
            .current_dir(work.path()))
        .map_err(step("download the kernel source"))?;
        let deb = fs::read_dir(work.path())
            .map_err(io(work.path()))?
            .flatten()
            .map(|e| e.path())
            .find(|p| p.extension().is_some_and(|x| x == "deb"))
            .ok_or_else(|| BuildKernelError::Step {
                step: "download the kernel source",
                reason: "apt-get wrote no .deb".into(),
            })?;
        let package = work.path().join("package");
        run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&package))
            .map_err(step("extract the source package"))?;
        fs::remove_file(&deb).map_err(io(&deb))?;
        let tarball = package.join(format!("usr/src/{SOURCE_PACKAGE}.tar.xz"));
        progress("unpack", &format!("{SOURCE_PACKAGE}.tar.xz"));
        run(Command::new("tar")
            .arg("-C")
            .arg(work.path())
            .arg("-xf")
            .arg(&tarball))
        .map_err(step("unpack the kernel source"))?;
        fs::remove_dir_all(&package).map_err(io(&package))?;
        let src = work.path().join(SOURCE_PACKAGE);
        for (name, text) in PATCHES {
            progress("patch", name);
            let file = work.path().join(name);
            fs::write(&file, text).map_err(io(&file))?;
            run(Command::new("patch")
                .args(["-p1", "--forward", "--batch", "--quiet", "-i"])
                .arg(&file)
                .current_dir(&src))
            .map_err(step("apply vroom's kernel patches"))?;
        }
        let out = work.path().join("build");
        let make = |target: &str| {
            let mut cmd = Command::new("nice");
            cmd.args(["-n", "19", "make", "-s", "ARCH=x86_64"])
                .arg("-C")
                .arg(&src)
                .arg(format!("O={}", out.display()))
                .arg(format!("-j{}", jobs.max(1)))
                .arg(target);
            cmd
        };

        progress(
            "configure",
            &format!("tinyconfig + {} options", fragment.len()),
        );
        let fragment_file = work.path().join("vroom.config");
        fs::write(&fragment_file, render(fragment)).map_err(io(&fragment_file))?;
        run(&mut make("tinyconfig")).map_err(step("run make tinyconfig"))?;
        run(Command::new(src.join("scripts/kconfig/merge_config.sh"))
            .args(["-m", "-O"])
            .arg(&out)
            .arg(out.join(".config"))
            .arg(&fragment_file)
            .current_dir(&out))
        .map_err(step("merge the fragment"))?;
        run(&mut make("olddefconfig")).map_err(step("run make olddefconfig"))?;
        let config_path = out.join(".config");
        let config = fs::read_to_string(&config_path).map_err(io(&config_path))?;
        let unmet = fragment.unmet(&config);
        if !unmet.is_empty() {
            return Err(BuildKernelError::Unmet(unmet));
        }
        let modular: Vec<&str> = config
            .lines()
            .filter(|l| l.ends_with("=m"))
            .filter_map(|l| l.split_once('=').map(|(n, _)| n))
            .collect();
        if !modular.is_empty() {
            return Err(BuildKernelError::Unmet(
                modular
                    .iter()
                    .map(|n| format!("{n}=y (got: {n}=m)"))
                    .collect(),
            ));
        }

        let log = self.dir.join("last-build.log");
        progress(
            "build",
            &format!(
                "vmlinux, -j{jobs}, niced (minutes; make's output in {})",
                log.display()
            ),
        );
        let log_file = fs::File::create(&log).map_err(io(&log))?;
        let mut build = make("vmlinux");
        build
            .stdout(log_file.try_clone().map_err(io(&log))?)
            .stderr(log_file);
        let status = build.status().map_err(io(&src))?;
        if !status.success() {
            let text = fs::read_to_string(&log).unwrap_or_default();
            let reason = text
                .lines()
                .rev()
                .find(|l| l.contains("rror"))
                .or_else(|| text.lines().last())
                .unwrap_or("no output")
                .trim()
                .to_string();
            return Err(BuildKernelError::Make { reason, log });
        }
        let _ = fs::remove_file(&log);

        let root = work.path().join("entry");
        fs::create_dir(&root).map_err(io(&root))?;
        for (from, to) in [(out.join("vmlinux"), "vmlinux"), (config_path, "config")] {
            fs::rename(&from, root.join(to)).map_err(io(&from))?;
        }
        let modules = module_options(&src).map_err(io(&src))?;
        fs::write(
            root.join("modules.json"),
            serde_json::to_vec(&modules).expect("invariant: serializable"),
        )
        .map_err(io(&root))?;
        let release_file = out.join("include/config/kernel.release");
        let release = fs::read_to_string(&release_file)
            .map_err(io(&release_file))?
            .trim()
            .to_string();
        let (sha256, _) = sha256_file(&root.join("vmlinux")).map_err(io(&root))?;
        let reference = KernelRef {
            package: SOURCE_PACKAGE.into(),
            version,
            release,
            sha256,
            flavor: KernelFlavor::Vroom,
            id: Some(id.clone()),
        };
        fs::write(
            root.join("kernel.json"),
            serde_json::to_vec_pretty(&reference).expect("invariant: serializable"),
        )
        .map_err(io(&root))?;
        let dest = self.dir.join(format!("vroom-{id}"));
        let _ = fs::remove_dir_all(&dest);
        fs::rename(&root, &dest).map_err(io(&dest))?;
        self.load_own(&id).ok_or_else(|| BuildKernelError::Step {
            step: "store the kernel",
            reason: "the cache entry does not read back".into(),
        })
    }
}

/// The fragment as a file merge_config.sh reads.
fn render(fragment: &Fragment) -> String {
    fragment
        .options
        .iter()
        .map(|(name, value)| match value {
            Some(v) => format!("{name}={v}\n"),
            None => format!("# {name} is not set\n"),
        })
        .collect()
}

fn check_tools() -> Result<(), BuildKernelError> {
    let missing = missing_build_tools();
    if missing.is_empty() {
        return Ok(());
    }
    Err(BuildKernelError::MissingTools {
        what: missing
            .iter()
            .map(|(w, _)| *w)
            .collect::<Vec<_>>()
            .join(", "),
        packages: missing
            .iter()
            .map(|(_, p)| *p)
            .collect::<Vec<_>>()
            .join(" "),
    })
}

/// What the kernel build needs and this host lacks, as (what, Debian
/// package) pairs.
pub fn missing_build_tools() -> Vec<(&'static str, &'static str)> {
    let mut missing: Vec<(&str, &str)> = BUILD_TOOLS
        .iter()
        .filter(|(tool, _)| {
            !Command::new("sh")
                .args(["-c", &format!("command -v {tool}")])
                .output()
                .is_ok_and(|o| o.status.success())
        })
        .copied()
        .collect();
    if !Path::new(LIBELF_HEADER.0).is_file() {
        missing.push(LIBELF_HEADER);
    }
    missing
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    #[test]
    fn the_checked_in_fragment_parses() {
        let fragment = Fragment::parse(FRAGMENT).unwrap();
        assert!(fragment.len() > 50, "{}", fragment.len());
        assert_eq!(
            fragment.options.get("CONFIG_PVH"),
            Some(&Some("y".to_string()))
        );
        assert_eq!(
            fragment.options.get("CONFIG_MODULES"),
            Some(&None),
            "everything is built in"
        );
    }

    #[test]
    fn bad_fragments_name_the_line() {
        for (text, line, says) in [
            ("CONFIG_A=y\nCONFIG_B\n", 2, "expected CONFIG_NAME=value"),
            ("FOO=y\n", 1, "not a CONFIG_ option"),
            ("CONFIG_A=\n", 1, "no value"),
            ("CONFIG_A=y\n# c\nCONFIG_A=n\n", 3, "twice"),
            ("# CONFIG_a-b is not set\n", 1, "not a CONFIG_ option"),
        ] {
            match Fragment::parse(text) {
                Err(BuildKernelError::Fragment { line: l, reason }) => {
                    assert_eq!(l, line, "{text:?}");
                    assert!(reason.contains(says), "{text:?}: {reason}");
                }
                other => panic!("{text:?}: {other:?}"),
            }
        }
        assert!(Fragment::parse("CONFIG_A=y\nCONFIG_A=y\n").is_ok());
    }

    #[test]
    fn unmet_options_are_named_with_what_the_config_has() {
        let fragment = Fragment::parse(
            "CONFIG_A=y\nCONFIG_B=y\n# CONFIG_C is not set\n# CONFIG_D is not set\nCONFIG_N=8\n",
        )
        .unwrap();
        let config = "CONFIG_A=y\n# CONFIG_B is not set\nCONFIG_C=y\nCONFIG_N=4\n";
        assert_eq!(
            fragment.unmet(config),
            vec![
                "CONFIG_B=y (got: CONFIG_B off)",
                "CONFIG_C off (got: CONFIG_C=y)",
                "CONFIG_N=8 (got: CONFIG_N=4)",
            ]
        );
        assert!(fragment
            .unmet("CONFIG_A=y\nCONFIG_B=y\n# CONFIG_C is not set\nCONFIG_N=8\n")
            .is_empty());
        assert_eq!(
            Fragment::parse("CONFIG_E=y\n").unwrap().unmet(""),
            vec!["CONFIG_E=y (got: absent)"]
        );
    }

    #[test]
    fn kbuild_files_say_which_option_builds_a_module() {
        let dir = tempfile::tempdir().unwrap();
        let net = dir.path().join("net/netfilter");
        fs::create_dir_all(&net).unwrap();
        fs::write(
            net.join("Makefile"),
            "nf_tables-objs := nf_tables_core.o nft_immediate.o\n\
             obj-$(CONFIG_NF_TABLES)\t\t+= nf_tables.o\n\
             obj-$(CONFIG_NFT_NAT)\t+= nft_nat.o nft_chain_nat.o \\\n\
             \tnft_other.o # a comment.o\n\
             obj-$(CONFIG_NFT_NAT_COMPAT) += nft_nat.o\n\
             obj-y += core.o sub/\n\
             ifeq ($(CONFIG_X),y)\nobj-m += $(foo).o\nendif\n",
        )
        .unwrap();
        fs::write(
            dir.path().join("Kbuild"),
            "obj-$(CONFIG_NLS_ISO8859_1) += nls_iso8859-1.o\n",
        )
        .unwrap();
        let map = module_options(dir.path()).unwrap();
        let get = |m: &str| map.get(m).cloned().unwrap_or_default();
        assert_eq!(get("nf_tables"), vec!["CONFIG_NF_TABLES"]);
        assert_eq!(
            get("nft_nat"),
            vec!["CONFIG_NFT_NAT", "CONFIG_NFT_NAT_COMPAT"]
        );
        assert_eq!(get("nft_other"), vec!["CONFIG_NFT_NAT"], "continued line");
        assert_eq!(get("core"), vec!["y"]);
        assert_eq!(get("nls_iso8859_1"), vec!["CONFIG_NLS_ISO8859_1"]);
        assert!(!map.contains_key("a_comment"));

        let config = "CONFIG_NF_TABLES=y\n# CONFIG_NFT_NAT is not set\nCONFIG_NLS_ISO8859_1=y\n";
        assert_eq!(
            lacking(
                &map,
                config,
                &["nf_tables", "nft_nat", "core", "nls_iso8859-1", "nope"]
            ),
            vec![
                "nft_nat (CONFIG_NFT_NAT or CONFIG_NFT_NAT_COMPAT)",
                "nope (no such module in the source)",
            ]
        );
    }

    #[test]
    fn the_id_follows_options_and_source_not_comments() {
        let a = Fragment::parse("# why\nCONFIG_A=y\nCONFIG_B=y\n").unwrap();
        let reordered = Fragment::parse("CONFIG_B=y\n# reworded\nCONFIG_A=y\n").unwrap();
        let changed = Fragment::parse("CONFIG_A=y\n# CONFIG_B is not set\n").unwrap();
        assert_eq!(a.id("6.1.1"), reordered.id("6.1.1"));
        assert_ne!(a.id("6.1.1"), changed.id("6.1.1"));
        assert_ne!(a.id("6.1.1"), a.id("6.1.2"));
        assert_eq!(a.id("6.1.1").len(), 16);
        let patch = [("p.patch", "--- a/x\n+++ b/x\n")];
        let other = [("p.patch", "--- a/x\n+++ b/y\n")];
        assert_ne!(a.id_with("6.1.1", &[]), a.id_with("6.1.1", &patch));
        assert_ne!(a.id_with("6.1.1", &patch), a.id_with("6.1.1", &other));
        assert_eq!(Fragment::parse(&render(&a)).unwrap(), a);
    }

    /// Puts an own kernel entry into `cache` as a build would, for `fragment`
    /// on source `version`; returns its reference.
    pub(crate) fn fake_entry(
        cache: &KernelCache,
        fragment: &Fragment,
        version: &str,
        body: &[u8],
    ) -> KernelRef {
        let id = fragment.id(version);
        let root = cache.dir.join(format!("vroom-{id}"));
        fs::create_dir_all(&root).unwrap();
        fs::write(root.join("vmlinux"), body).unwrap();
        fs::write(root.join("config"), render(fragment)).unwrap();
        fs::write(root.join("modules.json"), "{}").unwrap();
        let reference = KernelRef {
            package: SOURCE_PACKAGE.into(),
            version: version.into(),
            release: "6.1.1".into(),
            sha256: sha256_bytes(body),
            flavor: KernelFlavor::Vroom,
            id: Some(id),
        };
        fs::write(
            root.join("kernel.json"),
            serde_json::to_vec(&reference).unwrap(),
        )
        .unwrap();
        reference
    }

    /// A config change is a new kernel id; an image keeps booting the kernel
    /// it was built for, and never another one.
    #[test]
    fn an_image_boots_only_the_kernel_it_was_built_for() {
        let dir = tempfile::tempdir().unwrap();
        let cache = KernelCache::new(dir.path());
        let bundled = Fragment::parse(FRAGMENT).unwrap();
        let changed = Fragment::parse(&format!("{FRAGMENT}\nCONFIG_WIREGUARD=y\n")).unwrap();
        assert_ne!(bundled.id("6.1.1-1"), changed.id("6.1.1-1"));
        assert_ne!(
            bundled.id("6.1.1-1"),
            bundled.id("6.1.2-1"),
            "the source counts"
        );
        let reworded = Fragment::parse(&format!("# another comment\n{FRAGMENT}")).unwrap();
        assert_eq!(
            bundled.id("6.1.1-1"),
            reworded.id("6.1.1-1"),
            "comments do not"
        );

        let old = fake_entry(&cache, &bundled, "6.1.1-1", b"old kernel");
        let new = fake_entry(&cache, &changed, "6.1.1-1", b"new kernel");
        assert_eq!(
            cache.vroom_kernel().map(|k| k.id),
            old.id.clone(),
            "new builds use the kernel of the fragment this vroom carries"
        );
        let found = cache.find(&old).unwrap();
        assert_eq!(fs::read(&found.vmlinuz).unwrap(), b"old kernel");
        assert_eq!(
            fs::read(cache.find(&new).unwrap().vmlinuz).unwrap(),
            b"new kernel"
        );
        // A kernel whose file changed, or that is gone, is not booted.
        let path = cache
            .dir
            .join(format!("vroom-{}", old.id.as_deref().unwrap()));
        fs::write(path.join("vmlinux"), b"tampered").unwrap();
        assert!(cache.find(&old).is_none());
        fs::remove_dir_all(&path).unwrap();
        assert!(cache.find(&old).is_none());
        assert!(
            cache.vroom_kernel().is_none(),
            "only the changed one is left"
        );
        assert_eq!(
            cache.choose(&"vroom".parse().unwrap()).unwrap_err(),
            "vroom's kernel is not built yet; `vroom kernel build` builds it (minutes), or use --kernel debian"
        );
        let by_id = cache
            .choose(&new.id.clone().unwrap().parse().unwrap())
            .unwrap();
        assert_eq!(by_id.reference, new);
        assert!("linux".parse::<crate::kernel::KernelChoice>().is_err());
    }
}
