//! The image manifest (`manifest.json`), version [`MANIFEST_VERSION`].
//!
//! An image is a directory in the image store named by the sha256 of its
//! manifest. It holds `initramfs.cpio` (vroom-init plus kernel modules),
//! `rootfs.erofs` (the read-only root) and this manifest. The kernel is
//! referenced, not copied: it lives in the host's kernel cache and is pinned by
//! its package version and sha256. The [`ApplianceSpec`] part is also copied
//! into the root filesystem as `/etc/vroom/appliance.json`, where vroom-init
//! reads it.
//!
//! Versioning: readers reject a `manifest_version` they do not know; fields
//! added later are optional so that version 1 readers keep working.

use serde::{Deserialize, Serialize};

use std::collections::BTreeMap;

use crate::{ConfigRule, ConfigSchema, ConfigValues};

pub const MANIFEST_VERSION: u32 = 1;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ImageManifest {
    pub manifest_version: u32,
    pub name: String,
    pub version: String,
    pub kernel: KernelRef,
    pub initramfs: FileDigest,
    pub rootfs: FileDigest,
    /// Extra kernel command-line arguments.
    pub cmdline: String,
    pub default_mem_mib: u64,
    pub min_mem_mib: u64,
    /// What vroom-init does inside the guest.
    pub appliance: ApplianceSpec,
    /// The exact Debian packages in the root filesystem: the image's SBOM.
    /// Empty for built-in images.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub packages: Vec<PackageEntry>,
    /// The sha256 of the vroom-init packed as `/init`, so that an image made
    /// with an older init is recognised (absent in images from before).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub init_sha256: Option<String>,
    /// Where an imported OCI image came from (absent for recipe builds).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub oci: Option<OciOrigin>,
}

/// An image imported from an OCI image (`vroom image import`): its source
/// and what of its config has no other place in the manifest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct OciOrigin {
    /// The reference it was imported from, e.g. `docker://host/repo:tag`.
    pub reference: String,
    /// The sha256 digest of its image manifest (`sha256:...`).
    pub digest: String,
    /// The digest of its image config.
    pub config_digest: String,
    /// Its layers' digests, bottom first, as cached in the image store.
    pub layers: Vec<String>,
    /// Every exposed port (`80/tcp`); the first TCP one is the health check.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub exposed_ports: Vec<String>,
    /// The image's declared volumes (paths); each is a tmpfs, listed in `writable`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub volumes: Vec<String>,
}

impl OciOrigin {
    /// The lowest port of `proto` the image exposes: what `vroom room
    /// expose --to INSTANCE` forwards to when no port is given.
    pub fn first_exposed(&self, proto: crate::Protocol) -> Option<u16> {
        self.exposed_ports
            .iter()
            .filter_map(|p| {
                let (port, kind) = p.split_once('/').unwrap_or((p, "tcp"));
                (kind == proto.as_str())
                    .then(|| port.parse().ok())
                    .flatten()
            })
            .min()
    }
}

/// One package of an image's SBOM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct PackageEntry {
    pub name: String,
    pub version: String,
    /// The source package it was built from.
    pub source: String,
    /// The .deb's digest, as in the signed package index.
    pub sha256: String,
}

/// A kernel from the host's kernel cache, pinned by package version and digest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct KernelRef {
    /// The Debian package it came from, e.g. `linux-image-6.1.0-56-cloud-amd64`
    /// (for vroom's own kernel: the source package, `linux-source-6.1`).
    pub package: String,
    pub version: String,
    /// `uname -r` of the kernel; its modules live under `/lib/modules/<release>`.
    pub release: String,
    pub sha256: String,
    /// Which kernel it is; absent (Debian's) in images from before.
    #[serde(default, skip_serializing_if = "KernelFlavor::is_debian")]
    pub flavor: KernelFlavor,
    /// vroom's own kernel: its id in the kernel cache (`vroom kernel ls`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
}

/// Debian's cloud kernel (modules in the initramfs, ACPI), or vroom's own
/// (everything built in, no ACPI: QEMU describes the devices on the kernel
/// command line).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "lowercase")]
pub enum KernelFlavor {
    #[default]
    Debian,
    Vroom,
}

impl KernelFlavor {
    pub fn is_debian(&self) -> bool {
        *self == KernelFlavor::Debian
    }

    /// The least memory a guest on this kernel boots in, measured: Debian's
    /// cloud kernel does not boot in 64 MiB; vroom's does, with its
    /// services up.
    pub fn min_mem_mib(self) -> u64 {
        match self {
            KernelFlavor::Debian => 128,
            KernelFlavor::Vroom => 64,
        }
    }

    /// Whether the VM gets ACPI tables (vroom's kernel has no ACPI).
    pub fn acpi(self) -> bool {
        self == KernelFlavor::Debian
    }
}

impl std::fmt::Display for KernelFlavor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            KernelFlavor::Debian => "debian",
            KernelFlavor::Vroom => "vroom",
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct FileDigest {
    pub file: String,
    pub sha256: String,
    pub size: u64,
}

/// The guest's part of an image: read by vroom-init from the root filesystem.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ApplianceSpec {
    /// Factory-default config, written to a new config volume and restored by `config reset`.
    #[cfg_attr(feature = "openapi", schema(value_type = BTreeMap<String, String>))]
    pub seed_config: ConfigValues,
    /// The roles of the appliance's NICs in order (`lan`, `wan`, ...).
    pub nic_roles: Vec<String>,
    /// Directories that get a fresh tmpfs at boot; the rest of the root is read-only.
    pub writable: Vec<String>,
    /// Files rendered from the config at boot and after every config change.
    pub templates: Vec<TemplateSpec>,
    /// Long-running processes vroom-init supervises.
    pub services: Vec<ServiceSpec>,
    /// A TCP port that must accept connections before the appliance is healthy.
    pub health_tcp_port: Option<u16>,
    /// Like `health_tcp_port`, but the port is this config key's value.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health_tcp_config: Option<String>,
    /// The typed schema `config set` enforces; images without one accept
    /// exactly their seed keys, as strings.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[cfg_attr(feature = "openapi", schema(value_type = BTreeMap<String, crate::ConfigField>))]
    pub config_schema: ConfigSchema,
    /// Kernel parameters set at boot, e.g. `net.ipv4.ip_forward = "1"`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub sysctl: BTreeMap<String, String>,
    /// Cross-field rules of the config schema (e.g. `dhcp_first <= dhcp_last`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub config_rules: Vec<ConfigRule>,
    /// A command run (to completion, before the services continue) when the
    /// appliance wakes as a clone with a new identity: to regenerate keys
    /// or anything else a copy must not share.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub on_clone: Vec<String>,
    /// Data volumes the appliance needs (`[[volumes]]` in its recipe).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub volumes: Vec<crate::VolumeDecl>,
    /// vroom-init writes `/etc/hosts` (localhost and the hostname) and
    /// `/etc/resolv.conf` (the default gateway) at boot, as container
    /// images expect; the image has both as plain files.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub network_files: bool,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ServiceSpec {
    pub name: String,
    /// argv; `argv[0]` is an absolute path inside the root filesystem.
    pub command: Vec<String>,
    /// Restart the service when it exits.
    pub restart: bool,
    /// Restart the service after the config changed, to pick up re-rendered files.
    #[serde(default)]
    pub restart_on_config: bool,
    /// Runs to completion: readiness needs its success, and a config change
    /// is acknowledged only after its rerun succeeded.
    #[serde(default)]
    pub oneshot: bool,
    /// Checks the rendered config before it is put in force (e.g. `nft -c -f
    /// FILE`); an argument naming a template's path gets the staged copy.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub check: Vec<String>,
    /// Extra environment, `KEY=VALUE` each (an OCI image's `Env`); a
    /// `PATH` here replaces vroom-init's default one.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub env: Vec<String>,
    /// Who the service runs as, numeric `uid:gid` (resolved when the image
    /// was made); absent: root.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// The working directory; absent: `/`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workdir: Option<String>,
    /// The signal that stops the service (e.g. `SIGQUIT` or `3`); absent: SIGTERM.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stop_signal: Option<String>,
    /// Environment variables that take a config key's value, variable name
    /// to key (an imported image's config floppy): set over `env` at every
    /// start, so a config change reaches the service when it restarts.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub config_env: BTreeMap<String, String>,
}

impl ServiceSpec {
    /// The service's environment with `config` in force: `env`, then each
    /// `config_env` variable with its key's value (a key the config lacks
    /// leaves the variable as `env` has it).
    pub fn environment(&self, config: &ConfigValues) -> Vec<(String, String)> {
        let mut vars: Vec<(String, String)> = vec![];
        let mut set = |key: &str, value: &str| match vars.iter_mut().find(|(k, _)| k == key) {
            Some(var) => var.1 = value.to_string(),
            None => vars.push((key.to_string(), value.to_string())),
        };
        for entry in &self.env {
            if let Some((key, value)) = entry.split_once('=') {
                set(key, value);
            }
        }
        for (var, key) in &self.config_env {
            if let Some(value) = config.get(key) {
                set(var, value);
            }
        }
        vars
    }
}

impl ApplianceSpec {
    /// The config key a `vroom run --env KEY=VALUE` names: a config key of
    /// the appliance, or an environment variable a service takes from one.
    pub fn env_config_key<'a>(&'a self, key: &'a str) -> Option<&'a str> {
        if self.config_schema.contains_key(key) || self.seed_config.contains_key(key) {
            return Some(key);
        }
        self.services
            .iter()
            .find_map(|s| s.config_env.get(key))
            .map(String::as_str)
    }
}

/// The number of a stop signal as an OCI config names it (`SIGQUIT`,
/// `QUIT` or `3`), on Linux; `None` for a name this does not know.
pub fn signal_number(name: &str) -> Option<i32> {
    if let Ok(n) = name.parse::<i32>() {
        return (1..=64).contains(&n).then_some(n);
    }
    let name = name.strip_prefix("SIG").unwrap_or(name);
    Some(match name {
        "HUP" => 1,
        "INT" => 2,
        "QUIT" => 3,
        "KILL" => 9,
        "USR1" => 10,
        "USR2" => 12,
        "TERM" => 15,
        "CONT" => 18,
        "STOP" => 19,
        "WINCH" => 28,
        "PWR" => 30,
        "RTMIN+3" => 37,
        _ => return None,
    })
}

/// A file rendered from config with a MiniJinja template (see [`crate::template`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct TemplateSpec {
    /// Absolute destination path in the guest; must be under a writable directory.
    pub path: String,
    pub template: String,
}

/// One line of `image ls`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ImageSummary {
    /// The sha256 of the manifest.
    pub id: String,
    pub name: String,
    pub version: String,
    /// Bytes of initramfs plus root filesystem.
    pub size: u64,
    pub manifest: ImageManifest,
    /// This is the build the name resolves to (its newest); older builds of
    /// the name are kept until `vroom image prune`.
    #[serde(default)]
    pub current: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stop_signals_are_named_as_oci_configs_name_them() {
        for (name, want) in [
            ("SIGTERM", Some(15)),
            ("TERM", Some(15)),
            ("SIGQUIT", Some(3)),
            ("SIGWINCH", Some(28)),
            ("SIGRTMIN+3", Some(37)),
            ("9", Some(9)),
            ("0", None),
            ("65", None),
            ("SIGNOPE", None),
            ("", None),
        ] {
            assert_eq!(signal_number(name), want, "{name}");
        }
    }

    /// A service's environment: the image's `env`, each `config_env`
    /// variable over it with its key's value; `--env` names a key or such
    /// a variable.
    #[test]
    fn config_keys_feed_the_service_environment() {
        let service = ServiceSpec {
            name: "main".into(),
            env: vec![
                "PATH=/bin".into(),
                "GREETING=hi".into(),
                "HOME=/root".into(),
                "A=b=c".into(),
            ],
            config_env: [
                ("GREETING".to_string(), "greeting".to_string()),
                ("MOTD".into(), "motd".into()),
                ("PATH".into(), "path".into()),
            ]
            .into(),
            ..Default::default()
        };
        let config = |pairs: &[(&str, &str)]| -> ConfigValues {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        let env = |values: &ConfigValues| -> Vec<String> {
            service
                .environment(values)
                .into_iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect()
        };
        for (values, want) in [
            (
                config(&[]),
                vec!["PATH=/bin", "GREETING=hi", "HOME=/root", "A=b=c"],
            ),
            (
                config(&[("greeting", "hello"), ("motd", ""), ("path", "/sbin")]),
                vec![
                    "PATH=/sbin",
                    "GREETING=hello",
                    "HOME=/root",
                    "A=b=c",
                    "MOTD=",
                ],
            ),
            (
                config(&[("greeting", "x y"), ("other", "1")]),
                vec!["PATH=/bin", "GREETING=x y", "HOME=/root", "A=b=c"],
            ),
        ] {
            assert_eq!(env(&values), want, "{values:?}");
        }
        let appliance = ApplianceSpec {
            seed_config: config(&[("greeting", "hi"), ("motd", ""), ("path", "/bin")]),
            services: vec![service.clone()],
            ..Default::default()
        };
        for (key, want) in [
            ("greeting", Some("greeting")),
            ("GREETING", Some("greeting")),
            ("MOTD", Some("motd")),
            ("HOME", None),
            ("Greeting", None),
            ("nope", None),
        ] {
            assert_eq!(appliance.env_config_key(key), want, "{key}");
        }
    }

    #[test]
    fn the_first_exposed_port_of_a_protocol_is_the_lowest() {
        let origin = |ports: &[&str]| OciOrigin {
            reference: "oci:/x".into(),
            digest: "sha256:0".into(),
            config_digest: "sha256:1".into(),
            layers: vec![],
            exposed_ports: ports.iter().map(|p| p.to_string()).collect(),
            volumes: vec![],
        };
        use crate::Protocol::{Tcp, Udp};
        for (ports, proto, want) in [
            (&["53/udp", "443/tcp", "8080/tcp"][..], Tcp, Some(443)),
            (&["53/udp", "443/tcp", "8080/tcp"][..], Udp, Some(53)),
            (&["9000/tcp", "80/tcp"][..], Tcp, Some(80)),
            (&["80"][..], Tcp, Some(80)),
            (&["53/udp"][..], Tcp, None),
            (&["x/tcp"][..], Tcp, None),
            (&[][..], Tcp, None),
        ] {
            assert_eq!(
                origin(ports).first_exposed(proto),
                want,
                "{ports:?} {proto:?}"
            );
        }
    }

    /// Manifests from before kernels had a flavor read as Debian's, and a
    /// Debian kernel writes them byte for byte as before (an image's id is
    /// its manifest's digest).
    #[test]
    fn kernel_refs_of_older_manifests_are_debian_and_unchanged() {
        let old = r#"{"package":"linux-image-6.1.0-57-cloud-amd64","version":"6.1.192-3","release":"6.1.0-57-cloud-amd64","sha256":"ab"}"#;
        let parsed: KernelRef = serde_json::from_str(old).unwrap();
        assert_eq!(parsed.flavor, KernelFlavor::Debian);
        assert_eq!(parsed.id, None);
        assert_eq!(serde_json::to_string(&parsed).unwrap(), old);
        let vroom = KernelRef {
            flavor: KernelFlavor::Vroom,
            id: Some("7357a6b23eace1a9".into()),
            ..parsed
        };
        let text = serde_json::to_string(&vroom).unwrap();
        assert!(text.contains(r#""flavor":"vroom""#), "{text}");
        assert!(!KernelFlavor::Vroom.acpi() && KernelFlavor::Debian.acpi());
        assert!(KernelFlavor::Vroom.min_mem_mib() < KernelFlavor::Debian.min_mem_mib());
    }
}
