//! Packing a staged root filesystem into an image: a compressed, reproducible
//! erofs root (fixed timestamps, owners and UUID), an initramfs with
//! vroom-init and the kernel modules, and the manifest with their digests.

use std::fs;
use std::io::BufWriter;
use std::path::Path;
use std::process::Command;

use vroom_types::{ApplianceSpec, FileDigest, ImageManifest, PackageEntry, MANIFEST_VERSION};

use crate::builtin::BuildImageError;
use crate::cpio::CpioWriter;
use crate::kernel::{module_load_order, Kernel, KernelModules};
use crate::store::{ImageStore, StoredImage};
use crate::util::{run, sha256_file};

/// The kernel modules every appliance needs: virtio transport, disks, NICs,
/// the agent port, the erofs root and the FAT config volume.
/// The modules every appliance loads (vroom's devices and filesystems).
pub const BASE_MODULES: &[&str] = &[
    "virtio_mmio",
    "virtio_blk",
    "virtio_net",
    "virtio_console",
    "erofs",
    "vfat",
    "nls_cp437",
    "nls_iso8859-1",
];

/// The fixed filesystem UUID, so that equal inputs give equal images.
const ROOTFS_UUID: &str = "766f6f6d-0000-4000-8000-000000000001";

/// What the manifest says beyond the packed files.
pub struct ImageMeta {
    pub name: String,
    pub version: String,
    pub default_mem_mib: u64,
    pub min_mem_mib: u64,
    pub appliance: ApplianceSpec,
    pub packages: Vec<PackageEntry>,
    /// Kernel modules beyond the base set, loaded at boot (e.g. nf_tables).
    pub modules: Vec<String>,
    /// The files keep the owners they have in `tree` (an OCI image's
    /// layers say who owns what); otherwise root owns everything.
    pub keep_owners: bool,
    /// Where an imported OCI image came from.
    pub oci: Option<vroom_types::OciOrigin>,
}

/// Packs `tree` and commits the image to the store.
pub fn pack_and_commit(
    tree: &Path,
    meta: ImageMeta,
    kernel: &Kernel,
    init: &Path,
    store: &ImageStore,
) -> Result<StoredImage, BuildImageError> {
    let modules: Vec<&str> = BASE_MODULES
        .iter()
        .copied()
        .chain(meta.modules.iter().map(String::as_str))
        .collect();
    check_kernel(&meta.name, kernel, &modules)?;
    let staging = store.staging()?;
    let stage = |what: &str| {
        let what = what.to_string();
        move |source| BuildImageError::Stage { what, source }
    };
    // Every path resolved inside the tree: a link in it (an imported
    // image's) never leads a write onto the host.
    let vroom_dir = crate::inroot::create_dir_all(tree, "etc/vroom").map_err(stage("etc/vroom"))?;
    let spec =
        serde_json::to_vec_pretty(&meta.appliance).expect("invariant: appliance specs serialize");
    let spec_file = vroom_dir.join("appliance.json");
    if fs::symlink_metadata(&spec_file).is_ok_and(|m| !m.is_file()) {
        fs::remove_file(&spec_file).map_err(stage("appliance.json"))?;
    }
    fs::write(spec_file, spec).map_err(stage("appliance.json"))?;
    // The mount point of each instance's own machine id, which vroom-init
    // writes to /run at boot: the root is read-only and shared by every
    // instance of the image.
    let machine_id =
        crate::inroot::resolve(tree, "etc/machine-id").map_err(stage("etc/machine-id"))?;
    if fs::symlink_metadata(&machine_id).is_err() {
        fs::write(&machine_id, "").map_err(stage("etc/machine-id"))?;
    }
    for dir in ["config", "dev", "proc", "sys"]
        .iter()
        .map(|d| d.to_string())
        .chain(
            meta.appliance
                .writable
                .iter()
                .map(|w| w.trim_start_matches('/').to_string()),
        )
    {
        crate::inroot::create_dir_all(tree, dir).map_err(stage("mount points"))?;
    }

    let rootfs = staging.path().join("rootfs.erofs");
    make_erofs(tree, &rootfs, meta.keep_owners)
        .map_err(|reason| BuildImageError::Pack { reason })?;
    let initramfs = staging.path().join("initramfs.cpio");
    write_initramfs(&initramfs, init, kernel, &modules)
        .map_err(|reason| BuildImageError::Pack { reason })?;

    let digest = |path: &Path| -> Result<FileDigest, BuildImageError> {
        let (sha256, size) = sha256_file(path).map_err(stage("digests"))?;
        let file = path
            .file_name()
            .map(|f| f.to_string_lossy().into_owned())
            .unwrap_or_default();
        Ok(FileDigest { file, sha256, size })
    };
    let floor = kernel.reference.flavor.min_mem_mib();
    let manifest = ImageManifest {
        manifest_version: MANIFEST_VERSION,
        name: meta.name,
        version: meta.version,
        kernel: kernel.reference.clone(),
        initramfs: digest(&initramfs)?,
        rootfs: digest(&rootfs)?,
        cmdline: String::new(),
        // What the kernel boots in, at least (a recipe may ask less).
        default_mem_mib: meta.default_mem_mib.max(floor),
        min_mem_mib: meta.min_mem_mib.max(floor),
        appliance: meta.appliance,
        packages: meta.packages,
        init_sha256: Some(sha256_file(init).map_err(stage("digests"))?.0),
        oci: meta.oci,
    };
    Ok(store.commit(staging, &manifest)?)
}

/// Packs `tree` into a reproducible erofs file: every timestamp is 0 and
/// the UUID fixed, so equal trees give equal bytes. Unless `keep_owners`,
/// root owns every file.
pub fn make_erofs(tree: &Path, out: &Path, keep_owners: bool) -> Result<(), String> {
    let mut mkfs = Command::new("mkfs.erofs");
    mkfs.args(["--quiet", "-zlz4hc", "-T0", &format!("-U{ROOTFS_UUID}")]);
    if !keep_owners {
        mkfs.arg("--all-root");
    }
    run(mkfs.arg(out).arg(tree)).map(drop)
}

/// Fails, naming each module and the option that builds it, when `kernel`
/// has everything built in but not all of `modules` (what image `name`
/// needs). A modular kernel is checked when the initramfs is packed.
pub fn check_kernel(name: &str, kernel: &Kernel, modules: &[&str]) -> Result<(), BuildImageError> {
    let KernelModules::BuiltIn(own) = &kernel.modules else {
        return Ok(());
    };
    let missing = own.lacks(modules);
    if missing.is_empty() {
        return Ok(());
    }
    Err(BuildImageError::KernelLacks {
        image: name.to_string(),
        kernel: own.id.clone(),
        missing,
    })
}

/// The initramfs: `/init` (vroom-init), the kernel modules and their load
/// order (none for a kernel with everything built in).
fn write_initramfs(
    path: &Path,
    init: &Path,
    kernel: &Kernel,
    modules: &[&str],
) -> Result<(), String> {
    let (modules_dir, order) = match &kernel.modules {
        KernelModules::Dir(dir) => (dir.as_path(), module_load_order(dir, modules)?),
        KernelModules::BuiltIn(_) => (Path::new("/"), vec![]),
    };
    let file = fs::File::create(path).map_err(|e| format!("create {}: {e}", path.display()))?;
    let mut cpio = CpioWriter::new(BufWriter::new(file));
    let io = |e: std::io::Error| format!("write initramfs: {e}");
    for dir in ["dev", "proc", "sys", "newroot", "lib", "lib/vroom"] {
        cpio.dir(dir).map_err(io)?;
    }
    cpio.char_device("dev/console", 0o600, 5, 1).map_err(io)?;
    let init_bytes = fs::read(init).map_err(|e| format!("read {}: {e}", init.display()))?;
    crate::init_check::check_init(&init.display().to_string(), &init_bytes)
        .map_err(|e| e.to_string())?;
    cpio.file("init", 0o755, &init_bytes).map_err(io)?;
    let mut list = String::new();
    let mut made_dirs = std::collections::BTreeSet::new();
    for module in &order {
        let dest = format!("lib/modules/{}/{module}", kernel.reference.release);
        let mut prefix = String::new();
        for part in Path::new(&dest).parent().into_iter().flat_map(|p| p.iter()) {
            if !prefix.is_empty() {
                prefix.push('/');
            }
            prefix.push_str(&part.to_string_lossy());
            if made_dirs.insert(prefix.clone()) && prefix != "lib" {
                cpio.dir(&prefix).map_err(io)?;
            }
        }
        let bytes =
            fs::read(modules_dir.join(module)).map_err(|e| format!("read module {module}: {e}"))?;
        cpio.file(&dest, 0o644, &bytes).map_err(io)?;
        list.push('/');
        list.push_str(&dest);
        list.push('\n');
    }
    cpio.file("lib/vroom/modules", 0o644, list.as_bytes())
        .map_err(io)?;
    cpio.finish()
        .map_err(io)?
        .into_inner()
        .map_err(|e| io(e.into_error()))?
        .sync_all()
        .map_err(io)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernel::OwnKernel;
    use vroom_types::{KernelFlavor, KernelRef};

    fn own(dir: &Path) -> Kernel {
        let config = dir.join("config");
        fs::write(
            &config,
            "CONFIG_VIRTIO_MMIO=y\n# CONFIG_NFT_LOG is not set\n",
        )
        .unwrap();
        let modules = dir.join("modules.json");
        fs::write(
            &modules,
            r#"{"virtio_mmio":["CONFIG_VIRTIO_MMIO"],"nft_log":["CONFIG_NFT_LOG"]}"#,
        )
        .unwrap();
        OwnKernel {
            id: "0123456789abcdef".into(),
            reference: KernelRef {
                package: "linux-source-6.1".into(),
                version: "6.1.1-1".into(),
                release: "6.1.1".into(),
                sha256: "0".repeat(64),
                flavor: KernelFlavor::Vroom,
                id: Some("0123456789abcdef".into()),
            },
            vmlinux: dir.join("vmlinux"),
            config,
            modules,
        }
        .into()
    }

    /// An image whose recipe needs a module the built-in kernel lacks
    /// fails at build time, naming the image, the module and the option.
    #[test]
    fn a_module_the_kernel_lacks_is_named_with_its_option() {
        let dir = tempfile::tempdir().unwrap();
        let kernel = own(dir.path());
        check_kernel("fw", &kernel, &["virtio_mmio"]).unwrap();
        let err = check_kernel("fw", &kernel, &["virtio-mmio", "nft_log", "nope"])
            .unwrap_err()
            .to_string();
        for says in [
            "image fw",
            "kernel 0123456789abcdef",
            "nft_log (CONFIG_NFT_LOG)",
            "nope (no such module in the source)",
            "--kernel debian",
        ] {
            assert!(err.contains(says), "{says}: {err}");
        }
        assert!(!err.contains("virtio"), "{err}");
    }
}
