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
//!   manifest's `writable`);
//! - the config floppy: a config key per variable the service may take,
//!   declared by an `org.vroom.config.KEY=TYPE:DEFAULT:DESCRIPTION` label
//!   (fed to the variable `KEY` upper-cased, `.` and `-` as `_`, or to the
//!   `Env` variable whose lower-cased name is `KEY`), and for every other
//!   `Env` variable whose lower-cased name is a config key, a string key of
//!   that name with the image's value as its default. vroom-init sets the
//!   variables from the config at each start of `main`, which restarts on
//!   a config change.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use vroom_types::{
    validate_config_key, validate_config_value, ApplianceSpec, ConfigField, ConfigSchema,
    ConfigValues, FieldType, Name, ServiceSpec, VolumeDecl,
};

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
    #[serde(default)]
    labels: Option<BTreeMap<String, String>>,
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
    let floppy = config_floppy(c.labels.as_ref().unwrap_or(&BTreeMap::new()), &env)?;
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
            seed_config: floppy.defaults,
            config_schema: floppy.schema,
            services: vec![ServiceSpec {
                name: "main".into(),
                command: argv,
                restart: true,
                // Its environment comes from the config: a change restarts it.
                restart_on_config: !floppy.env.is_empty(),
                env,
                config_env: floppy.env,
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

/// The prefix of the labels that declare config keys.
pub const CONFIG_LABEL: &str = "org.vroom.config.";

/// An imported image's config floppy: the keys its service takes.
#[derive(Debug, Default, PartialEq, Eq)]
struct Floppy {
    schema: ConfigSchema,
    defaults: ConfigValues,
    /// Environment variable name to config key.
    env: BTreeMap<String, String>,
}

/// The config keys of an image: one per `org.vroom.config.KEY` label, then
/// one (a string) per `Env` variable no label covers whose lower-cased name
/// is a config key. A label's empty default is the variable's `Env` value.
fn config_floppy(
    labels: &BTreeMap<String, String>,
    env: &[String],
) -> Result<Floppy, ImportImageError> {
    // Later entries win, as in a container runtime.
    let mut vars: Vec<(&str, &str)> = vec![];
    for (name, value) in env.iter().filter_map(|e| e.split_once('=')) {
        vars.retain(|(n, _)| *n != name);
        vars.push((name, value));
    }
    let mut floppy = Floppy::default();
    for (label, text) in labels {
        let Some(key) = label.strip_prefix(CONFIG_LABEL) else {
            continue;
        };
        let invalid = |reason: String| ImportImageError::Invalid {
            reason: format!("label {label}: {reason}"),
        };
        validate_config_key(key).map_err(|e| invalid(e.to_string()))?;
        let var = vars
            .iter()
            .find(|(name, _)| name.to_ascii_lowercase() == key)
            .copied();
        let (field, default) =
            parse_config_label(text, var.map(|(_, value)| value)).map_err(&invalid)?;
        let name = var.map_or_else(
            || key.to_ascii_uppercase().replace(['.', '-'], "_"),
            |(name, _)| name.to_string(),
        );
        if let Some(other) = floppy.env.iter().find(|(n, _)| **n == name) {
            return Err(invalid(format!(
                "variable {name} is fed by key {:?} already",
                other.1
            )));
        }
        floppy.env.insert(name, key.to_string());
        floppy.schema.insert(key.to_string(), field);
        floppy.defaults.insert(key.to_string(), default);
    }
    for (name, value) in vars {
        let key = name.to_ascii_lowercase();
        let usable =
            validate_config_key(&key).is_ok() && validate_config_value(&key, value).is_ok();
        if !usable || floppy.env.contains_key(name) || floppy.schema.contains_key(&key) {
            continue;
        }
        floppy.env.insert(name.to_string(), key.clone());
        floppy.schema.insert(
            key.clone(),
            ConfigField {
                description: Some(format!("the environment variable {name}")),
                ..Default::default()
            },
        );
        floppy.defaults.insert(key, value.to_string());
    }
    Ok(floppy)
}

/// A config label's `TYPE[:DEFAULT[:DESCRIPTION]]`: the field and its
/// default (`from_env` when the label gives none). The default holds no
/// `:`, so the types whose values do (forward, endpoint) are refused.
fn parse_config_label(text: &str, from_env: Option<&str>) -> Result<(ConfigField, String), String> {
    let mut parts = text.splitn(3, ':');
    let kind_text = parts.next().unwrap_or_default();
    let kind: FieldType = serde_json::from_value(serde_json::Value::String(kind_text.into()))
        .ok()
        .filter(|k| !matches!(k, FieldType::Forward | FieldType::Endpoint))
        .ok_or_else(|| {
            format!("{kind_text:?} is not a type a label may declare (string, int, bool, port, ipv4, cidr, host; as TYPE:DEFAULT:DESCRIPTION)")
        })?;
    let default = match parts.next().unwrap_or_default() {
        "" => from_env.unwrap_or_default(),
        given => given,
    };
    let description = parts.next().map(str::trim).filter(|d| !d.is_empty());
    let field = ConfigField {
        kind,
        description: description.map(String::from),
        ..Default::default()
    };
    validate_config_value("default", default)
        .map_err(|e| e.to_string())
        .and_then(|()| {
            field
                .check(default)
                .map_err(|reason| format!("the default {default:?} {reason}"))
        })?;
    Ok((field, default.to_string()))
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

    /// Config labels, table-driven: the field and default each declares,
    /// or why the import is refused (naming the label).
    #[test]
    fn config_labels_declare_typed_keys() {
        for (text, from_env, want) in [
            (
                "string:hi:the greeting",
                None,
                Ok((FieldType::String, "hi", Some("the greeting"))),
            ),
            (
                "port:8080:where it listens: tcp",
                None,
                Ok((FieldType::Port, "8080", Some("where it listens: tcp"))),
            ),
            ("int:3", None, Ok((FieldType::Int, "3", None))),
            ("bool:false:", None, Ok((FieldType::Bool, "false", None))),
            ("string", None, Ok((FieldType::String, "", None))),
            (
                "int::workers",
                Some("4"),
                Ok((FieldType::Int, "4", Some("workers"))),
            ),
            ("int:2", Some("4"), Ok((FieldType::Int, "2", None))),
            (
                "cidr:10.0.0.0/8",
                None,
                Ok((FieldType::Cidr, "10.0.0.0/8", None)),
            ),
            (
                "host:db=10.0.0.2",
                None,
                Ok((FieldType::Host, "db=10.0.0.2", None)),
            ),
            ("int", None, Err("the default \"\" must be an integer")),
            ("port:http", None, Err("the default \"http\"")),
            ("bool:yes", None, Err("must be true or false")),
            (
                "text:x",
                None,
                Err("\"text\" is not a type a label may declare"),
            ),
            ("endpoint:10.0.0.1", None, Err("\"endpoint\" is not a type")),
            ("", None, Err("\"\" is not a type")),
            ("string:a\u{7}b", None, Err("control characters")),
        ] {
            let got = parse_config_label(text, from_env);
            match want {
                Ok((kind, default, description)) => {
                    let (field, got_default) = got.unwrap_or_else(|e| panic!("{text}: {e}"));
                    assert_eq!(
                        (
                            field.kind,
                            got_default.as_str(),
                            field.description.as_deref()
                        ),
                        (kind, default, description),
                        "{text}"
                    );
                }
                Err(says) => {
                    let err = got.expect_err(text);
                    assert!(err.contains(says), "{text}: {err}");
                }
            }
        }
    }

    /// Which variables become config keys, named how, fed from where; a bad
    /// label is an import error naming it.
    #[test]
    fn env_variables_map_onto_config_keys() {
        let labels = |pairs: &[(&str, &str)]| -> BTreeMap<String, String> {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        let env: Vec<String> = [
            "PATH=/bin",
            "GREETING=hi",
            "Workers=2",
            "_PRIVATE=x",
            "1ST=y",
            "GREETING=hello",
            "greeting=lower",
        ]
        .iter()
        .map(|e| e.to_string())
        .collect();
        let floppy = config_floppy(
            &labels(&[
                ("org.vroom.config.workers", "int::how many"),
                ("org.vroom.config.listen.port", "port:8080"),
                ("org.opencontainers.image.title", "not ours"),
            ]),
            &env,
        )
        .unwrap();
        let pairs = |m: &BTreeMap<String, String>| -> Vec<(String, String)> {
            m.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
        };
        let owned = |v: &[(&str, &str)]| -> Vec<(String, String)> {
            v.iter()
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .collect()
        };
        assert_eq!(
            pairs(&floppy.env),
            owned(&[
                ("GREETING", "greeting"),
                ("LISTEN_PORT", "listen.port"),
                ("PATH", "path"),
                ("Workers", "workers"),
            ]),
            "the first of two names for a key takes it; names no key can have stay fixed"
        );
        assert_eq!(
            pairs(&floppy.defaults),
            owned(&[
                ("greeting", "hello"),
                ("listen.port", "8080"),
                ("path", "/bin"),
                ("workers", "2"),
            ]),
            "the image's last value of a variable is its default"
        );
        assert_eq!(floppy.schema["workers"].kind, FieldType::Int);
        assert_eq!(floppy.schema["listen.port"].kind, FieldType::Port);
        assert_eq!(floppy.schema["greeting"].kind, FieldType::String);
        assert_eq!(
            floppy.schema["greeting"].description.as_deref(),
            Some("the environment variable GREETING")
        );
        assert_eq!(config_floppy(&labels(&[]), &[]).unwrap(), Floppy::default());
        for (label, text, says) in [
            (
                "org.vroom.config.Port",
                "port:80",
                "label org.vroom.config.Port: invalid config key \"Port\"",
            ),
            (
                "org.vroom.config.",
                "string",
                "label org.vroom.config.: invalid config key \"\"",
            ),
            (
                "org.vroom.config.workers",
                "int:many",
                "label org.vroom.config.workers: the default \"many\" must be an integer",
            ),
            (
                "org.vroom.config.path",
                "number:1",
                "label org.vroom.config.path: \"number\" is not a type",
            ),
        ] {
            let err = config_floppy(&labels(&[(label, text)]), &env)
                .unwrap_err()
                .to_string();
            assert!(err.contains(says), "{label}={text}: {err}");
        }
        let err = config_floppy(
            &labels(&[
                ("org.vroom.config.a.b", "string"),
                ("org.vroom.config.a-b", "string"),
            ]),
            &[],
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("variable A_B is fed by key \"a-b\" already"),
            "{err}"
        );

        // In the manifest: the schema, the defaults, and `main` fed by them
        // and restarted on a change.
        let root = image_root();
        let mapped = map(
            &config(r#"{"Cmd":["/bin/busybox"],"Env":["GREETING=hi"],"Labels":{"org.vroom.config.motd":"string:welcome:shown first"}}"#),
            root.path(),
            false,
        )
        .unwrap();
        let a = &mapped.appliance;
        assert_eq!(
            pairs(&a.seed_config),
            owned(&[("greeting", "hi"), ("motd", "welcome")])
        );
        assert_eq!(a.config_schema.len(), 2);
        assert!(a.services[0].restart_on_config);
        assert_eq!(
            pairs(&a.services[0].config_env),
            owned(&[("GREETING", "greeting"), ("MOTD", "motd")])
        );
        let plain = map(&config(r#"{"Cmd":["/bin/busybox"]}"#), root.path(), false).unwrap();
        assert!(plain.appliance.seed_config.is_empty());
        assert!(!plain.appliance.services[0].restart_on_config);
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
