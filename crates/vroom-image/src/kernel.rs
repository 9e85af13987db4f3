//! The guest kernel cache: Debian's cloud kernel, downloaded with apt and
//! extracted with dpkg-deb into vroom's cache, never installed into /boot.
//!
//! Layout under the cache dir: `kernels/<package>_<version>/` holds the
//! package's `boot/` and `lib/modules/` trees plus `kernel.json` (a
//! [`KernelRef`]); `kernels/current.json` names the entry in use.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use vroom_types::{KernelFlavor, KernelRef};

use crate::util::{run, sha256_file};

mod own;
#[cfg(test)]
pub(crate) use own::tests::fake_entry as fake_own_kernel;
pub use own::{
    missing_build_tools, BuildKernelError, Fragment, OwnKernel, FRAGMENT, SOURCE_PACKAGE,
};

/// The Debian metapackage that always depends on the newest cloud kernel.
pub const KERNEL_METAPACKAGE: &str = "linux-image-cloud-amd64";

#[derive(Debug, thiserror::Error)]
pub enum FetchKernelError {
    #[error("cannot resolve the kernel package behind {meta} through apt: {reason}")]
    Resolve { meta: String, reason: String },
    #[error("cannot download {package}: {reason}")]
    Download { package: String, reason: String },
    #[error("cannot extract {package}: {reason}")]
    Extract { package: String, reason: String },
    #[error("kernel cache {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// A cached kernel ready to boot.
#[derive(Debug, Clone)]
pub struct Kernel {
    pub reference: KernelRef,
    /// What QEMU boots: Debian's `vmlinuz`, or vroom's `vmlinux`.
    pub vmlinuz: PathBuf,
    pub modules: KernelModules,
}

/// Where an image's kernel modules come from.
#[derive(Debug, Clone)]
pub enum KernelModules {
    /// `lib/modules/<release>` of the kernel package: the modules an image
    /// needs go into its initramfs.
    Dir(PathBuf),
    /// Everything built in: an image's module list is a check against the
    /// kernel's config.
    BuiltIn(OwnKernel),
}

impl From<OwnKernel> for Kernel {
    fn from(own: OwnKernel) -> Kernel {
        Kernel {
            reference: own.reference.clone(),
            vmlinuz: own.vmlinux.clone(),
            modules: KernelModules::BuiltIn(own),
        }
    }
}

/// Which kernel an image is built for (`--kernel`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KernelChoice {
    /// vroom's own when it is built, Debian's cloud kernel until then.
    Default,
    Debian,
    /// vroom's own, built from the fragment this vroom carries.
    Vroom,
    /// An own kernel by id (one built from another fragment).
    Id(String),
}

impl std::str::FromStr for KernelChoice {
    type Err = String;

    fn from_str(s: &str) -> Result<KernelChoice, String> {
        match s {
            "" | "default" => Ok(KernelChoice::Default),
            "debian" => Ok(KernelChoice::Debian),
            "vroom" => Ok(KernelChoice::Vroom),
            id if id.len() == 16 && id.chars().all(|c| c.is_ascii_hexdigit()) => {
                Ok(KernelChoice::Id(id.to_ascii_lowercase()))
            }
            other => Err(format!(
                "unknown kernel {other:?}: debian, vroom, or a kernel id from `vroom kernel ls`"
            )),
        }
    }
}

pub struct KernelCache {
    dir: PathBuf,
}

impl KernelCache {
    pub fn new(cache_dir: &Path) -> Self {
        KernelCache {
            dir: cache_dir.join("kernels"),
        }
    }

    /// The kernel in use, if one was fetched and its files are intact.
    pub fn current(&self) -> Option<Kernel> {
        let entry: String =
            serde_json::from_slice(&fs::read(self.dir.join("current.json")).ok()?).ok()?;
        self.load(&entry)
    }

    /// Makes sure the newest packaged kernel is cached; fast when it already is.
    pub fn fetch(&self) -> Result<Kernel, FetchKernelError> {
        let (package, version) = resolve(KERNEL_METAPACKAGE)?;
        let entry = format!("{package}_{version}");
        let kernel = match self.load(&entry) {
            Some(kernel) => kernel,
            None => self.download(&package, &version, &entry)?,
        };
        let io = |source| FetchKernelError::Io {
            path: self.dir.clone(),
            source,
        };
        let tmp = self.dir.join("current.json.tmp");
        fs::write(
            &tmp,
            serde_json::to_vec(&entry).expect("invariant: a string serializes"),
        )
        .map_err(io)?;
        fs::rename(&tmp, self.dir.join("current.json")).map_err(io)?;
        Ok(kernel)
    }

    /// The cached kernel an image references, if its digest still matches.
    pub fn find(&self, reference: &KernelRef) -> Option<Kernel> {
        match reference.flavor {
            KernelFlavor::Debian => self
                .load(&format!("{}_{}", reference.package, reference.version))
                .filter(|k| k.reference.sha256 == reference.sha256),
            KernelFlavor::Vroom => self.find_own(reference).map(Kernel::from),
        }
    }

    /// The kernel to build an image for.
    pub fn choose(&self, choice: &KernelChoice) -> Result<Kernel, String> {
        let debian = || {
            self.current()
                .ok_or_else(|| "no guest kernel is cached; run `vroom setup`".to_string())
        };
        match choice {
            KernelChoice::Default => match self.vroom_kernel() {
                Some(own) => Ok(own.into()),
                None => debian(),
            },
            KernelChoice::Debian => debian(),
            KernelChoice::Vroom => self.vroom_kernel().map(Kernel::from).ok_or_else(|| {
                "vroom's kernel is not built yet; `vroom kernel build` builds it (minutes), or use --kernel debian".to_string()
            }),
            KernelChoice::Id(id) => self
                .own()
                .into_iter()
                .find(|k| &k.id == id)
                .map(Kernel::from)
                .ok_or_else(|| format!("no kernel {id} in the cache (`vroom kernel ls`)")),
        }
    }

    fn load(&self, entry: &str) -> Option<Kernel> {
        let root = self.dir.join(entry);
        let reference: KernelRef =
            serde_json::from_slice(&fs::read(root.join("kernel.json")).ok()?).ok()?;
        let vmlinuz = root
            .join("boot")
            .join(format!("vmlinuz-{}", reference.release));
        let modules_dir = root.join("lib/modules").join(&reference.release);
        (vmlinuz.is_file() && modules_dir.join("modules.dep").is_file()).then_some(Kernel {
            reference,
            vmlinuz,
            modules: KernelModules::Dir(modules_dir),
        })
    }

    fn download(
        &self,
        package: &str,
        version: &str,
        entry: &str,
    ) -> Result<Kernel, FetchKernelError> {
        let io = |source| FetchKernelError::Io {
            path: self.dir.clone(),
            source,
        };
        fs::create_dir_all(&self.dir).map_err(io)?;
        let work = tempfile::Builder::new()
            .prefix(".fetch-")
            .tempdir_in(&self.dir)
            .map_err(io)?;
        let pin = format!("{package}={version}");
        run(Command::new("apt-get")
            .args(["download", "-q", &pin])
            .current_dir(work.path()))
        .map_err(|reason| FetchKernelError::Download {
            package: package.into(),
            reason,
        })?;
        let deb = fs::read_dir(work.path())
            .map_err(io)?
            .flatten()
            .map(|e| e.path())
            .find(|p| p.extension().is_some_and(|x| x == "deb"))
            .ok_or_else(|| FetchKernelError::Download {
                package: package.into(),
                reason: "apt-get wrote no .deb".into(),
            })?;
        let root = work.path().join("root");
        run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&root)).map_err(|reason| {
            FetchKernelError::Extract {
                package: package.into(),
                reason,
            }
        })?;
        let release = fs::read_dir(root.join("boot"))
            .map_err(io)?
            .flatten()
            .find_map(|e| {
                e.file_name()
                    .to_string_lossy()
                    .strip_prefix("vmlinuz-")
                    .map(String::from)
            })
            .ok_or_else(|| FetchKernelError::Extract {
                package: package.into(),
                reason: "no boot/vmlinuz-* in the package".into(),
            })?;
        // The package's postinst would run depmod; we run it on the extracted tree instead.
        run(Command::new("depmod").arg("-b").arg(&root).arg(&release)).map_err(|reason| {
            FetchKernelError::Extract {
                package: package.into(),
                reason,
            }
        })?;
        let (sha256, _) =
            sha256_file(&root.join("boot").join(format!("vmlinuz-{release}"))).map_err(io)?;
        let reference = KernelRef {
            package: package.into(),
            version: version.into(),
            release,
            sha256,
            flavor: KernelFlavor::Debian,
            id: None,
        };
        fs::write(
            root.join("kernel.json"),
            serde_json::to_vec_pretty(&reference).expect("invariant: serializable"),
        )
        .map_err(io)?;
        let dest = self.dir.join(entry);
        let _ = fs::remove_dir_all(&dest);
        fs::rename(&root, &dest).map_err(io)?;
        self.load(entry).ok_or_else(|| FetchKernelError::Extract {
            package: package.into(),
            reason: "the extracted package lacks vmlinuz or modules.dep".into(),
        })
    }
}

/// Resolves the metapackage to the versioned kernel package and its candidate version.
fn resolve(meta: &str) -> Result<(String, String), FetchKernelError> {
    let err = |reason: String| FetchKernelError::Resolve {
        meta: meta.into(),
        reason,
    };
    let deps =
        run(Command::new("apt-cache").args(["depends", "--no-recommends", "--no-suggests", meta]))
            .map_err(err)?;
    let package = deps
        .lines()
        .filter_map(|l| l.trim().strip_prefix("Depends: "))
        .find(|p| p.starts_with("linux-image-"))
        .ok_or_else(|| err("no linux-image dependency (run apt-get update?)".into()))?
        .to_string();
    let version = candidate(&package).map_err(err)?;
    Ok((package, version))
}

/// The version apt would install of `package`.
fn candidate(package: &str) -> Result<String, String> {
    let policy = run(Command::new("apt-cache").args(["policy", package]))?;
    policy
        .lines()
        .filter_map(|l| l.trim().strip_prefix("Candidate: "))
        .find(|v| *v != "(none)")
        .map(String::from)
        .ok_or_else(|| format!("{package} has no installable candidate (run apt-get update?)"))
}

/// Resolves `names` to module files in load order (dependencies first), using the
/// kernel's `modules.dep`.
pub fn module_load_order(modules_dir: &Path, names: &[&str]) -> Result<Vec<String>, String> {
    let dep_text = fs::read_to_string(modules_dir.join("modules.dep"))
        .map_err(|e| format!("read modules.dep: {e}"))?;
    resolve_module_order(&dep_text, names)
}

fn resolve_module_order(dep_text: &str, names: &[&str]) -> Result<Vec<String>, String> {
    let mut deps = std::collections::HashMap::new();
    let mut by_name = std::collections::HashMap::new();
    for line in dep_text.lines() {
        let Some((module, rest)) = line.split_once(':') else {
            continue;
        };
        let name = Path::new(module)
            .file_stem()
            .map(|s| s.to_string_lossy().replace('-', "_"))
            .unwrap_or_default();
        by_name.insert(name, module.to_string());
        deps.insert(
            module.to_string(),
            rest.split_whitespace()
                .map(String::from)
                .collect::<Vec<_>>(),
        );
    }
    let mut order = Vec::new();
    for name in names {
        let module = by_name
            .get(&name.replace('-', "_"))
            .ok_or_else(|| format!("the kernel has no module {name}"))?;
        // modules.dep lists dependencies so that the last one loads first.
        let chain = deps.get(module).cloned().unwrap_or_default();
        for dep in chain.iter().rev().chain(std::iter::once(module)) {
            if !order.contains(dep) {
                order.push(dep.clone());
            }
        }
    }
    Ok(order)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn module_order_puts_dependencies_first() {
        let dep = "kernel/fs/fat/vfat.ko: kernel/fs/fat/fat.ko\n\
                   kernel/fs/fat/fat.ko:\n\
                   kernel/drivers/net/virtio_net.ko: kernel/drivers/net/net_failover.ko kernel/net/core/failover.ko\n\
                   kernel/drivers/net/net_failover.ko: kernel/net/core/failover.ko\n\
                   kernel/net/core/failover.ko:\n\
                   kernel/fs/nls/nls_iso8859-1.ko:\n";
        let order =
            resolve_module_order(dep, &["vfat", "virtio_net", "nls_iso8859-1", "fat"]).unwrap();
        assert_eq!(
            order,
            vec![
                "kernel/fs/fat/fat.ko",
                "kernel/fs/fat/vfat.ko",
                "kernel/net/core/failover.ko",
                "kernel/drivers/net/net_failover.ko",
                "kernel/drivers/net/virtio_net.ko",
                "kernel/fs/nls/nls_iso8859-1.ko",
            ]
        );
        assert!(resolve_module_order(dep, &["nope"]).is_err());
    }
}
