//! Images vroom builds without a recipe. For now only `hello`: busybox-static
//! serving a page whose text comes from the `greeting` config key. The
//! recipe builder will produce images of the same layout.

use std::fs;
use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use vroom_types::{ApplianceSpec, ConfigField, FieldType, ServiceSpec, TemplateSpec, MIN_MEM_MIB};

use crate::kernel::Kernel;
use crate::pack::{pack_and_commit, ImageMeta};
use crate::store::{ImageStore, ImageStoreError, StoredImage};

pub const BUILTIN_IMAGES: &[&str] = &["hello"];

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
        health_tcp_config: None,
        config_schema: [(
            "greeting".to_string(),
            ConfigField {
                kind: FieldType::String,
                max_len: Some(200),
                description: Some("The page's heading.".into()),
                ..ConfigField::default()
            },
        )]
        .into(),
        sysctl: Default::default(),
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
    let tree = tempfile::tempdir().map_err(|source| BuildImageError::Stage {
        what: "a temporary root".into(),
        source,
    })?;
    stage_busybox_root(tree.path(), inputs.busybox).map_err(|source| BuildImageError::Stage {
        what: "the root filesystem".into(),
        source,
    })?;
    let meta = ImageMeta {
        name: name.into(),
        version: env!("CARGO_PKG_VERSION").into(),
        default_mem_mib: MIN_MEM_MIB,
        min_mem_mib: MIN_MEM_MIB,
        appliance,
        packages: vec![],
        modules: vec![],
    };
    pack_and_commit(tree.path(), meta, inputs.kernel, inputs.init, store)
}

/// The busybox root: the binary and its applet links. Mount points and
/// `/etc/vroom/appliance.json` are added by the packer.
fn stage_busybox_root(root: &Path, busybox: &Path) -> std::io::Result<()> {
    for dir in ["bin", "sbin", "usr/bin", "usr/sbin", "etc", "root"] {
        fs::create_dir_all(root.join(dir))?;
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
    fs::write(root.join("etc/hosts"), "127.0.0.1 localhost\n")
}
