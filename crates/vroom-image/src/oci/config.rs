//! An OCI image config (`image-spec/config.md`) mapped onto an appliance:
//!
//! - `Entrypoint` + `Cmd` are the main service, supervised and restarted;
//!   a bare program name is looked up in the image's `PATH` when the image
//!   is imported, so the manifest names an absolute path;
//! - `Env`, `WorkingDir` and `StopSignal` go with the service;
//! - `User` (a name, a uid, `user:group`) is resolved against the image's
//!   own `/etc/passwd` and `/etc/group` to a numeric `uid:gid`;
//! - the first TCP port of `ExposedPorts` is the health check;
//! - `Volumes` are data volumes (`vroom run` creates `NAME-ROLE`, as for a
//!   recipe's `[[volumes]]`) when the kernel can mount them (vroom's) and
//!   the path may hold one; otherwise a tmpfs;
//! - the root is read-only: `/run`, `/tmp` and `/var` (and volumes that
//!   are not data volumes) get a tmpfs seeded with the image's content (the
//!   manifest's `writable`).

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use vroom_types::{ApplianceSpec, Name, ServiceSpec, VolumeDecl};

use super::ImportImageError;
use crate::inroot;

/// The writable directories of every imported image.
pub const WRITABLE: &[&str] = &["/run", "/tmp", "/var"];
/// The `PATH` of an image that sets none (the OCI runtime's default).
const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct ContainerConfig {
    #[serde(default)]
    user: Option<String>,
    #[serde(default)]
    env: Option<Vec<String>>,
    #[serde(default)]
    entrypoint: Option<Vec<String>>,
    #[serde(default)]
    cmd: Option<Vec<String>>,
    #[serde(default)]
    working_dir: Option<String>,
    #[serde(default)]
    exposed_ports: Option<BTreeMap<String, serde_json::Value>>,
    #[serde(default)]
    volumes: Option<BTreeMap<String, serde_json::Value>>,
    #[serde(default)]
    stop_signal: Option<String>,
}

#[derive(Debug, Deserialize)]
struct RootFs {
    #[serde(default)]
    diff_ids: Vec<String>,
}

#[derive(Debug, Deserialize)]
pub struct ImageConfig {
    #[serde(default)]
    architecture: String,
    #[serde(default)]
    os: String,
    #[serde(default)]
    config: Option<ContainerConfig>,
    rootfs: RootFs,
}

impl ImageConfig {
    pub fn parse(bytes: &[u8]) -> Result<Self, ImportImageError> {
        serde_json::from_slice(bytes).map_err(|e| ImportImageError::Invalid {
            reason: format!("the image config is not valid: {e}"),
        })
    }

    /// linux/amd64, or the platform it is for.
    pub fn check_platform(&self) -> Result<(), ImportImageError> {
        if self.os == "linux" && self.architecture == "amd64" {
            return Ok(());
        }
        Err(ImportImageError::Architecture {
            platform: format!("{}/{}", self.os, self.architecture),
        })
    }

    /// The digests of the uncompressed layers, bottom first.
    pub fn diff_ids(&self) -> &[String] {
        &self.rootfs.diff_ids
    }
}

/// The diff ids of a config's layers.
pub fn diff_ids(config: &[u8]) -> Result<Vec<String>, ImportImageError> {
    Ok(ImageConfig::parse(config)?.rootfs.diff_ids)
}

/// What the import records of the config besides the appliance.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Mapped {
    pub appliance: ApplianceSpec,
    pub exposed_ports: Vec<String>,
    pub volumes: Vec<String>,
}

/// The size of a data volume `vroom run` creates for a declared volume (a
/// sparse file: it takes what is written).
pub const VOLUME_MIB: u64 = 1024;

/// Maps the config onto an appliance; `root` is the unpacked image (for
/// its `PATH` and accounts). With `data_volumes` (the kernel mounts ext4),
/// `Volumes` become data volumes.
pub fn map(
    config: &ImageConfig,
    root: &Path,
    data_volumes: bool,
) -> Result<Mapped, ImportImageError> {
    let empty = ContainerConfig::default();
    let c = config.config.as_ref().unwrap_or(&empty);
    let mut argv: Vec<String> = c.entrypoint.clone().unwrap_or_default();
    argv.extend(c.cmd.clone().unwrap_or_default());
    if argv.is_empty() {
        return Err(ImportImageError::NoEntrypoint);
    }
    let mut env = c.env.clone().unwrap_or_default();
    if let Some(bad) = env.iter().find(|e| !e.contains('=')) {
        return Err(ImportImageError::Invalid {
            reason: format!("Env entry {bad:?} is not KEY=VALUE"),
        });
    }
    let path = env
        .iter()
        .rev()
        .find_map(|e| e.strip_prefix("PATH="))
        .unwrap_or(DEFAULT_PATH);
    let workdir = c.working_dir.clone().filter(|w| !w.is_empty());
    let stop_signal = c.stop_signal.clone().filter(|s| !s.is_empty());
    if let Some(signal) = stop_signal.as_deref() {
        if vroom_types::signal_number(signal).is_none() {
            return Err(ImportImageError::Invalid {
                reason: format!("StopSignal {signal:?} is not a signal vroom knows"),
            });
        }
    }
    argv[0] = program_path(root, &argv[0], path, workdir.as_deref())?;
    let user = resolve_user(root, c.user.as_deref().unwrap_or(""))?;
    // As container runtimes do: HOME from the user's account, unless set.
    if !env.iter().any(|e| e.starts_with("HOME=")) {
        let uid: u32 = user
            .as_deref()
            .and_then(|u| u.split(':').next()?.parse().ok())
            .unwrap_or(0);
        let home = passwd_home(root, uid).unwrap_or_else(|| "/".into());
        env.push(format!("HOME={home}"));
    }

    let mut ports: Vec<(u16, String)> = vec![];
    for key in c.exposed_ports.iter().flat_map(|p| p.keys()) {
        let (port, proto) = key.split_once('/').unwrap_or((key, "tcp"));
        let port: u16 = port.parse().map_err(|_| ImportImageError::Invalid {
            reason: format!("exposed port {key:?} is not PORT[/PROTO]"),
        })?;
        ports.push((port, proto.to_string()));
    }
    ports.sort();
    let health_tcp_port = ports.iter().find(|(_, p)| p == "tcp").map(|(n, _)| *n);

    let volumes: Vec<String> = c
        .volumes
        .iter()
        .flat_map(|v| v.keys())
        .map(|v| normal_dir(v))
        .collect::<Result<_, _>>()?;
    let mut writable: Vec<String> = WRITABLE.iter().map(|w| w.to_string()).collect();
    let mut declared: Vec<VolumeDecl> = vec![];
    for volume in &volumes {
        if data_volumes && vroom_types::check_mount_path(volume).is_ok() {
            let name = volume_role(volume, &declared);
            declared.push(VolumeDecl {
                name,
                path: volume.clone(),
                size_mib: VOLUME_MIB,
                fs: Default::default(),
                // As a container's volumes: programs on it may run.
                exec: true,
            });
            continue;
        }
        // A volume under a writable directory is writable already.
        let covered = writable
            .iter()
            .any(|w| volume == w || volume.starts_with(&format!("{w}/")));
        if !covered {
            writable.push(volume.clone());
        }
    }
    Ok(Mapped {
        appliance: ApplianceSpec {
            writable,
            services: vec![ServiceSpec {
                name: "main".into(),
                command: argv,
                restart: true,
                env,
                user,
                workdir,
                stop_signal,
                ..Default::default()
            }],
            health_tcp_port,
            volumes: declared,
            network_files: true,
            ..Default::default()
        },
        exposed_ports: ports.iter().map(|(n, p)| format!("{n}/{p}")).collect(),
        volumes,
    })
}

/// A data volume's role: its path's last part as a name, unique in the image.
fn volume_role(path: &str, taken: &[VolumeDecl]) -> Name {
    let last = path.rsplit('/').next().unwrap_or_default();
    let mut base: String = last
        .to_ascii_lowercase()
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .collect();
    base = base.trim_matches('-').to_string();
    if !base.starts_with(|c: char| c.is_ascii_lowercase()) {
        base = format!("vol-{base}").trim_end_matches('-').to_string();
    }
    base.truncate(20);
    let base = base.trim_end_matches('-').to_string();
    (1..)
        .map(|n| {
            if n == 1 {
                base.clone()
            } else {
                format!("{base}-{n}")
            }
        })
        .filter_map(|candidate| Name::new(&candidate).ok())
        .find(|name| !taken.iter().any(|d| &d.name == name))
        .expect("invariant: some suffix is free")
}

/// An absolute directory path without `.`, `..` or a trailing `/`.
fn normal_dir(path: &str) -> Result<String, ImportImageError> {
    let p = Path::new(path);
    let plain = p.is_absolute()
        && p.components()
            .skip(1)
            .all(|c| matches!(c, std::path::Component::Normal(_)));
    let normal: PathBuf = p.components().collect();
    if !plain || normal == Path::new("/") {
        return Err(ImportImageError::Invalid {
            reason: format!("volume {path:?} is not an absolute directory below /"),
        });
    }
    Ok(normal.display().to_string())
}

/// The file the guest would run as `program`: absolute as it is, relative
/// to the working directory with a `/`, else the first executable of that
/// name on `PATH`, every link followed inside the image.
fn program_path(
    root: &Path,
    program: &str,
    path: &str,
    workdir: Option<&str>,
) -> Result<String, ImportImageError> {
    let executable = |candidate: &str| {
        use std::os::unix::fs::PermissionsExt;
        inroot::open_file(root, candidate)
            .and_then(|f| f.metadata())
            .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    };
    let candidates: Vec<String> = if program.starts_with('/') {
        vec![program.to_string()]
    } else if program.contains('/') {
        let joined = Path::new("/").join(workdir.unwrap_or("/")).join(program);
        vec![joined
            .components()
            .collect::<PathBuf>()
            .display()
            .to_string()]
    } else {
        path.split(':')
            .filter(|d| d.starts_with('/'))
            .map(|d| format!("{}/{program}", d.trim_end_matches('/')))
            .collect()
    };
    candidates
        .into_iter()
        .find(|c| executable(c))
        .ok_or_else(|| ImportImageError::Invalid {
            reason: format!(
                "the entrypoint {program:?} is not an executable file in the image (PATH {path})"
            ),
        })
}

/// `/etc/passwd` or `/etc/group` of the image as (name, id, gid) lines.
fn accounts(root: &Path, file: &str) -> Vec<(String, u32, u32)> {
    let mut text = String::new();
    let read =
        inroot::open_file(root, file).and_then(|f| f.take(1 << 20).read_to_string(&mut text));
    if read.is_err() {
        return vec![];
    }
    text.lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split(':').collect();
            let id = fields.get(2)?.parse().ok()?;
            let gid = fields.get(3).and_then(|g| g.parse().ok()).unwrap_or(id);
            Some((fields[0].to_string(), id, gid))
        })
        .collect()
}

/// The home directory of `uid` in the image's `/etc/passwd`.
fn passwd_home(root: &Path, uid: u32) -> Option<String> {
    let mut text = String::new();
    inroot::open_file(root, "/etc/passwd")
        .and_then(|f| f.take(1 << 20).read_to_string(&mut text))
        .ok()?;
    text.lines().find_map(|line| {
        let fields: Vec<&str> = line.split(':').collect();
        (fields.get(2)?.parse::<u32>().ok()? == uid)
            .then(|| fields.get(5).map(|h| h.to_string()))
            .flatten()
            .filter(|h| h.starts_with('/'))
    })
}

/// `User` as numeric `uid:gid`; none for root.
fn resolve_user(root: &Path, user: &str) -> Result<Option<String>, ImportImageError> {
    if user.is_empty() {
        return Ok(None);
    }
    let passwd = accounts(root, "/etc/passwd");
    let (who, group) = match user.split_once(':') {
        Some((who, group)) => (who, Some(group)),
        None => (user, None),
    };
    let unknown = |what: &str, name: &str, file: &str| ImportImageError::Invalid {
        reason: format!("User {user:?}: {what} {name:?} is not in the image's {file}"),
    };
    let (uid, primary) = match who.parse::<u32>() {
        Ok(uid) => (
            uid,
            passwd
                .iter()
                .find(|(_, id, _)| *id == uid)
                .map_or(0, |(_, _, gid)| *gid),
        ),
        Err(_) => passwd
            .iter()
            .find(|(name, _, _)| name == who)
            .map(|(_, uid, gid)| (*uid, *gid))
            .ok_or_else(|| unknown("user", who, "/etc/passwd"))?,
    };
    let gid = match group {
        None => primary,
        Some(group) => match group.parse::<u32>() {
            Ok(gid) => gid,
            Err(_) => accounts(root, "/etc/group")
                .iter()
                .find(|(name, _, _)| name == group)
                .map(|(_, gid, _)| *gid)
                .ok_or_else(|| unknown("group", group, "/etc/group"))?,
        },
    };
    Ok(Some(format!("{uid}:{gid}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    fn image_root() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        fs::create_dir_all(root.join("bin")).unwrap();
        fs::create_dir_all(root.join("etc")).unwrap();
        fs::create_dir_all(root.join("app")).unwrap();
        fs::write(root.join("bin/busybox"), "").unwrap();
        fs::set_permissions(
            root.join("bin/busybox"),
            std::os::unix::fs::PermissionsExt::from_mode(0o755),
        )
        .unwrap();
        std::os::unix::fs::symlink("busybox", root.join("bin/httpd")).unwrap();
        std::os::unix::fs::symlink("/bin/busybox", root.join("app/run")).unwrap();
        fs::write(root.join("etc/notexec"), "").unwrap();
        fs::write(
            root.join("etc/passwd"),
            "root:x:0:0::/root:/bin/sh\nwww:x:33:34::/var/www:/bin/false\n",
        )
        .unwrap();
        fs::write(
            root.join("etc/group"),
            "root:x:0:\nweb:x:34:\nstaff:x:50:\n",
        )
        .unwrap();
        dir
    }

    fn config(json: &str) -> ImageConfig {
        ImageConfig::parse(
            format!(
                r#"{{"architecture":"amd64","os":"linux","rootfs":{{"type":"layers","diff_ids":[]}},"config":{json}}}"#
            )
            .as_bytes(),
        )
        .unwrap()
    }

    /// The config's fields, table-driven: what each becomes in the
    /// manifest, or why the image is refused.
    #[test]
    fn the_config_maps_onto_the_appliance() {
        let root = image_root();
        let main = |json: &str| {
            map(&config(json), root.path(), false).map(|m| m.appliance.services[0].clone())
        };
        let ok = |json: &str| main(json).unwrap();
        let s = ok(
            r#"{"Entrypoint":["httpd","-f"],"Cmd":["-p","8080"],"Env":["A=1"],"User":"www","WorkingDir":"/app","StopSignal":"SIGQUIT"}"#,
        );
        assert_eq!(s.command, ["/bin/httpd", "-f", "-p", "8080"]);
        assert_eq!(s.env, ["A=1", "HOME=/var/www"]);
        let home = |json: &str| ok(json).env;
        assert_eq!(home(r#"{"Cmd":["/bin/busybox"]}"#), ["HOME=/root"]);
        assert_eq!(
            home(r#"{"Cmd":["/bin/busybox"],"User":"4242"}"#),
            ["HOME=/"]
        );
        assert_eq!(
            home(r#"{"Cmd":["/bin/busybox"],"Env":["HOME=/h"]}"#),
            ["HOME=/h"]
        );
        assert_eq!(s.user.as_deref(), Some("33:34"));
        assert_eq!(s.workdir.as_deref(), Some("/app"));
        assert_eq!(s.stop_signal.as_deref(), Some("SIGQUIT"));
        assert!(s.restart);
        for (user, want) in [
            ("", None),
            ("33", Some("33:34")),
            ("1000", Some("1000:0")),
            ("www:staff", Some("33:50")),
            ("7:8", Some("7:8")),
        ] {
            let s = ok(&format!(r#"{{"Cmd":["/bin/busybox"],"User":"{user}"}}"#));
            assert_eq!(s.user.as_deref(), want, "{user}");
        }
        assert_eq!(
            ok(r#"{"Cmd":["./run"],"WorkingDir":"/app"}"#).command,
            ["/app/run"]
        );
        assert_eq!(
            ok(r#"{"Cmd":["busybox"],"Env":["PATH=/nowhere:/bin"]}"#).command,
            ["/bin/busybox"]
        );
        for (json, says) in [
            (r#"{}"#, "neither an Entrypoint nor a Cmd"),
            (
                r#"{"Entrypoint":null,"Cmd":[]}"#,
                "neither an Entrypoint nor a Cmd",
            ),
            (
                r#"{"Cmd":["nginx"]}"#,
                "\"nginx\" is not an executable file",
            ),
            (r#"{"Cmd":["/etc/notexec"]}"#, "is not an executable file"),
            (
                r#"{"Cmd":["/bin/busybox"],"User":"nobody"}"#,
                "user \"nobody\" is not in the image's /etc/passwd",
            ),
            (
                r#"{"Cmd":["/bin/busybox"],"User":"www:nogroup"}"#,
                "group \"nogroup\"",
            ),
            (
                r#"{"Cmd":["/bin/busybox"],"Env":["NOEQUALS"]}"#,
                "not KEY=VALUE",
            ),
            (
                r#"{"Cmd":["/bin/busybox"],"StopSignal":"SIGNOPE"}"#,
                "not a signal",
            ),
            (
                r#"{"Cmd":["/bin/busybox"],"Volumes":{"rel/dir":{}}}"#,
                "not an absolute directory",
            ),
        ] {
            let err = main(json).unwrap_err().to_string();
            assert!(err.contains(says), "{json}: {err}");
        }
        let mapped = map(
            &config(r#"{"Cmd":["/bin/busybox"],"ExposedPorts":{"8080/tcp":{},"53/udp":{},"443/tcp":{}},"Volumes":{"/data/":{},"/var/lib/x":{}}}"#),
            root.path(),
            false,
        )
        .unwrap();
        assert_eq!(mapped.appliance.health_tcp_port, Some(443));
        assert_eq!(mapped.exposed_ports, ["53/udp", "443/tcp", "8080/tcp"]);
        assert_eq!(mapped.volumes, ["/data", "/var/lib/x"]);
        assert_eq!(mapped.appliance.writable, ["/run", "/tmp", "/var", "/data"]);
        assert!(mapped.appliance.volumes.is_empty());
        // On a kernel that mounts data volumes, they are data volumes where
        // a volume may go; elsewhere still a tmpfs.
        let mapped = map(
            &config(r#"{"Cmd":["/bin/busybox"],"Volumes":{"/data":{}, "/srv/data":{}, "/etc/conf":{}, "/9":{}}}"#),
            root.path(),
            true,
        )
        .unwrap();
        let decls: Vec<(String, String)> = mapped
            .appliance
            .volumes
            .iter()
            .map(|v| (v.name.to_string(), v.path.clone()))
            .collect();
        assert_eq!(
            decls,
            [
                ("vol-9".to_string(), "/9".to_string()),
                ("data".into(), "/data".into()),
                ("data-2".into(), "/srv/data".into()),
            ]
        );
        assert_eq!(
            mapped.appliance.writable,
            ["/run", "/tmp", "/var", "/etc/conf"]
        );
        let arm = ImageConfig::parse(
            br#"{"architecture":"arm64","os":"linux","rootfs":{"diff_ids":[]}}"#,
        )
        .unwrap();
        assert_eq!(
            arm.check_platform().unwrap_err().to_string(),
            "the image is for linux/arm64, not linux/amd64"
        );
    }
}
