//! Images vroom builds without a recipe. For now only `hello`: busybox-static
//! serving a page whose text comes from the `greeting` config key. The
//! recipe builder will produce images of the same layout.

use std::fs;
use std::io::BufWriter;
use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use vroom_types::{
    ApplianceSpec, FileDigest, ImageManifest, ServiceSpec, TemplateSpec, MANIFEST_VERSION,
    MIN_MEM_MIB,
};

use crate::cpio::CpioWriter;
use crate::kernel::{module_load_order, Kernel};
use crate::store::{ImageStore, ImageStoreError, StoredImage};
use crate::util::{run, sha256_file};

pub const BUILTIN_IMAGES: &[&str] = &["hello"];

/// The kernel modules every appliance needs: virtio transport, disks, NICs,
/// the agent port, the erofs root and the FAT config volume.
const BASE_MODULES: &[&str] = &[
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

#[derive(Debug, thiserror::Error)]
pub enum BuildImageError {
    #[error("no built-in image named {name:?} (built-ins: {})", BUILTIN_IMAGES.join(", "))]
    UnknownBuiltin { name: String },
    #[error("missing build input {path}: {hint}")]
    MissingInput { path: PathBuf, hint: &'static str },
    #[error("failed to stage {what}")]
    Stage {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("failed to pack the image: {reason}")]
    Pack { reason: String },
    #[error(transparent)]
    Store(#[from] ImageStoreError),
}

pub struct BuildInputs<'a> {
    pub kernel: &'a Kernel,
    /// The static vroom-init binary.
    pub init: &'a Path,
    pub busybox: &'a Path,
}

pub fn hello_appliance() -> ApplianceSpec {
    ApplianceSpec {
        seed_config: [("greeting".to_string(), "Hello from vroom!".to_string())].into(),
        nic_roles: vec!["lan".into()],
        writable: vec!["/run".into(), "/tmp".into(), "/var".into()],
        templates: vec![TemplateSpec {
            path: "/run/www/index.html".into(),
            template: "<!doctype html>\n<html><head><title>vroom hello</title></head>\n<body><h1>{{greeting}}</h1></body></html>\n".into(),
        }],
        services: vec![ServiceSpec {
            name: "httpd".into(),
            command: ["/bin/busybox", "httpd", "-f", "-p", "80", "-h", "/run/www"].map(String::from).to_vec(),
            restart: true,
            restart_on_config: false,
        }],
        health_tcp_port: Some(80),
    }
}

pub fn build_builtin(
    name: &str,
    inputs: &BuildInputs<'_>,
    store: &ImageStore,
) -> Result<StoredImage, BuildImageError> {
    if name != "hello" {
        return Err(BuildImageError::UnknownBuiltin { name: name.into() });
    }
    for (path, hint) in [
        (
            inputs.init,
            "build it with `cargo xtask build-init` or set VROOM_INIT",
        ),
        (inputs.busybox, "install busybox-static (`vroom setup`)"),
        (
            inputs.kernel.vmlinuz.as_path(),
            "fetch the kernel with `vroom setup`",
        ),
    ] {
        if !path.is_file() {
            return Err(BuildImageError::MissingInput {
                path: path.to_path_buf(),
                hint,
            });
        }
    }
    let appliance = hello_appliance();
    let staging = store.staging()?;
    let stage = |what: &str| {
        let what = what.to_string();
        move |source| BuildImageError::Stage { what, source }
    };

    let tree = tempfile::tempdir().map_err(stage("a temporary root"))?;
    stage_busybox_root(tree.path(), inputs.busybox, &appliance)
        .map_err(stage("the root filesystem"))?;
    let rootfs = staging.path().join("rootfs.erofs");
    run(Command::new("mkfs.erofs")
        .args([
            "--quiet",
            "-zlz4hc",
            "-T0",
            "--all-root",
            &format!("-U{ROOTFS_UUID}"),
        ])
        .arg(&rootfs)
        .arg(tree.path()))
    .map_err(|reason| BuildImageError::Pack { reason })?;

    let initramfs = staging.path().join("initramfs.cpio");
    write_initramfs(&initramfs, inputs.init, inputs.kernel)
        .map_err(|reason| BuildImageError::Pack { reason })?;

    let digest = |path: &Path| -> Result<FileDigest, BuildImageError> {
        let (sha256, size) = sha256_file(path).map_err(stage("digests"))?;
        let file = path
            .file_name()
            .map(|f| f.to_string_lossy().into_owned())
            .unwrap_or_default();
        Ok(FileDigest { file, sha256, size })
    };
    let manifest = ImageManifest {
        manifest_version: MANIFEST_VERSION,
        name: name.into(),
        version: env!("CARGO_PKG_VERSION").into(),
        kernel: inputs.kernel.reference.clone(),
        initramfs: digest(&initramfs)?,
        rootfs: digest(&rootfs)?,
        cmdline: String::new(),
        default_mem_mib: MIN_MEM_MIB,
        min_mem_mib: MIN_MEM_MIB,
        appliance,
    };
    Ok(store.commit(staging, &manifest)?)
}

fn stage_busybox_root(
    root: &Path,
    busybox: &Path,
    appliance: &ApplianceSpec,
) -> std::io::Result<()> {
    for dir in [
        "bin",
        "sbin",
        "usr/bin",
        "usr/sbin",
        "etc/vroom",
        "config",
        "dev",
        "proc",
        "sys",
        "root",
    ] {
        fs::create_dir_all(root.join(dir))?;
    }
    for dir in &appliance.writable {
        fs::create_dir_all(root.join(dir.trim_start_matches('/')))?;
    }
    fs::copy(busybox, root.join("bin/busybox"))?;
    fs::set_permissions(root.join("bin/busybox"), fs::Permissions::from_mode(0o755))?;
    let applets = Command::new(busybox).arg("--list-full").output()?;
    for applet in String::from_utf8_lossy(&applets.stdout).lines() {
        let link = root.join(applet);
        if applet == "bin/busybox" || link.exists() {
            continue;
        }
        if let Some(parent) = link.parent() {
            fs::create_dir_all(parent)?;
        }
        symlink("/bin/busybox", link)?;
    }
    fs::write(root.join("etc/passwd"), "root:x:0:0:root:/root:/bin/sh\n")?;
    fs::write(root.join("etc/group"), "root:x:0:\n")?;
    fs::write(root.join("etc/hosts"), "127.0.0.1 localhost\n")?;
    let spec = serde_json::to_vec_pretty(appliance).expect("invariant: appliance specs serialize");
    fs::write(root.join("etc/vroom/appliance.json"), spec)
}

/// The initramfs: `/init` (vroom-init), the kernel modules and their load order.
fn write_initramfs(path: &Path, init: &Path, kernel: &Kernel) -> Result<(), String> {
    let order = module_load_order(&kernel.modules_dir, BASE_MODULES)?;
    let file = fs::File::create(path).map_err(|e| format!("create {}: {e}", path.display()))?;
    let mut cpio = CpioWriter::new(BufWriter::new(file));
    let io = |e: std::io::Error| format!("write initramfs: {e}");
    for dir in ["dev", "proc", "sys", "newroot", "lib", "lib/vroom"] {
        cpio.dir(dir).map_err(io)?;
    }
    cpio.char_device("dev/console", 0o600, 5, 1).map_err(io)?;
    let init_bytes = fs::read(init).map_err(|e| format!("read {}: {e}", init.display()))?;
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
        let bytes = fs::read(kernel.modules_dir.join(module))
            .map_err(|e| format!("read module {module}: {e}"))?;
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
