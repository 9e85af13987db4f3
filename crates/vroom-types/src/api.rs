//! Small request and response bodies of the API that are not domain objects.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::{ApiErrorBody, ConfigValues, ImageSummary, InstanceAction, PackageEntry};

/// The body of `POST /v1/instances/{name}/actions`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct ActionRequest {
    pub action: InstanceAction,
}

/// A whole config, as returned by `GET` and accepted by `PUT /v1/instances/{name}/config`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct ConfigDocument {
    // Spelled out: utoipa names every alias of a `BTreeMap` "BTreeMap", so
    // the config values and the config schema would share one component.
    #[cfg_attr(feature = "openapi", schema(value_type = BTreeMap<String, String>))]
    pub values: ConfigValues,
}

/// A piece of an instance's console log.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct LogChunk {
    pub data: String,
    /// Pass as `offset` to get what follows.
    pub next_offset: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct VersionInfo {
    pub version: String,
    pub data_dir: String,
    /// The process that answers: its pid and how it was started (absent
    /// from daemons older than this field, and from in-process test servers).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub daemon: Option<DaemonInfo>,
}

/// Which vroomd answers, so that an operator can tell a systemd unit from
/// a daemon the CLI started in a developer's checkout.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct DaemonInfo {
    pub pid: u32,
    pub started_by: DaemonStarter,
    /// The systemd unit it runs in (`vroomd.service`), when systemd started it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unit: Option<String>,
    /// Whether its API socket was handed over by systemd (socket
    /// activation, `vroomd.socket`) rather than bound by vroomd itself.
    pub socket_activated: bool,
    /// The QEMU it launches VMs with, as found when it started (absent from
    /// daemons older than this field).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vmm: Option<VmmInfo>,
}

/// A QEMU binary as vroom sees it: where, which version, and why vroom
/// cannot use it, if it cannot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct VmmInfo {
    pub path: String,
    /// `7.2.22`, `10.0.2`; absent when the binary printed none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    /// Why VMs cannot run on it (too old, no microvm machine, missing).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub problem: Option<String>,
}

impl VmmInfo {
    /// `QEMU 10.0.2 (/path)`, and what is wrong with it, on one line.
    pub fn describe(&self) -> String {
        let version = self.version.as_deref().unwrap_or("of unknown version");
        match &self.problem {
            None => format!("QEMU {version} ({})", self.path),
            Some(problem) => format!("unusable: {problem}"),
        }
    }
}

/// Who started a vroomd.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum DaemonStarter {
    /// A systemd unit (`vroomd.service`, possibly through `vroomd.socket`).
    Systemd,
    /// The CLI, because no daemon answered (a developer's checkout).
    Cli,
    /// Someone ran `vroom daemon` by hand.
    Manual,
}

impl std::fmt::Display for DaemonStarter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            DaemonStarter::Systemd => "systemd",
            DaemonStarter::Cli => "cli",
            DaemonStarter::Manual => "manual",
        })
    }
}

/// The body of `POST /v1/images/build`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct BuildImageRequest {
    /// Absolute path of a recipe file, or of a directory holding `recipe.toml`, on the daemon's host;
    /// or the name of a recipe of vroom's catalog (`firewall`, `web`, ...).
    #[cfg_attr(feature = "openapi", schema(pattern = "^(/|[a-z][a-z0-9-]*$)"))]
    pub recipe: String,
    /// Refresh the package indexes first, so the newest versions (security
    /// updates) are picked, and report what changed.
    #[serde(default)]
    pub update: bool,
    /// The kernel to build for: `vroom` (vroom's own, everything built in,
    /// boots in 64 MiB), `debian` (Debian's cloud kernel, with modules), or
    /// an id from `vroom kernel ls`. Absent: vroom's when it is built,
    /// Debian's until then.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "openapi", schema(pattern = "^(debian|vroom|[0-9a-f]{16})$"))]
    pub kernel: Option<String>,
}

/// The body of `POST /v1/images/import`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct ImportImageRequest {
    /// `oci:DIR[:TAG]`, `oci-archive:FILE`, `docker-archive:FILE` (absolute
    /// paths on the daemon's host) or `docker://HOST[:PORT]/REPO[:TAG|@sha256:...]`.
    #[cfg_attr(
        feature = "openapi",
        schema(pattern = "^(oci:/|oci-archive:/|docker-archive:/|docker://)")
    )]
    pub reference: String,
    /// The image's name; by default the repository's (or file's) last part.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<crate::Name>,
    /// Allow plain HTTP to a registry on a loopback or private address.
    #[serde(default)]
    pub insecure: bool,
    /// The kernel to make the image for, as for a build.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "openapi", schema(pattern = "^(debian|vroom|[0-9a-f]{16})$"))]
    pub kernel: Option<String>,
}

/// The outcome of a build.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct BuildReport {
    pub image: ImageSummary,
    /// Nothing changed since an earlier build of the same inputs; nothing was built.
    pub cached: bool,
    /// Packages that differ from the image this name resolved to before.
    pub changes: Vec<PackageChange>,
}

/// One package added, removed or moved to another version.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct PackageChange {
    pub name: String,
    /// The version before; absent for an added package.
    pub from: Option<String>,
    /// The version now; absent for a removed package.
    pub to: Option<String>,
}

/// One line of the `POST /v1/images/build` stream (NDJSON).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum BuildEvent {
    /// A stage (resolve, download, extract, trim, pack) began or advanced.
    Progress { stage: String, detail: String },
    /// The build finished; the last line.
    Done { report: Box<BuildReport> },
    /// The build failed; the last line.
    Error { error: ApiErrorBody },
}

/// The packages of `after` that differ from `before`, by name.
pub fn package_changes(before: &[PackageEntry], after: &[PackageEntry]) -> Vec<PackageChange> {
    let old: BTreeMap<&str, &str> = before
        .iter()
        .map(|p| (p.name.as_str(), p.version.as_str()))
        .collect();
    let new: BTreeMap<&str, &str> = after
        .iter()
        .map(|p| (p.name.as_str(), p.version.as_str()))
        .collect();
    let mut names: Vec<&str> = old.keys().chain(new.keys()).copied().collect();
    names.sort();
    names.dedup();
    names
        .into_iter()
        .filter(|n| old.get(n) != new.get(n))
        .map(|n| PackageChange {
            name: n.to_string(),
            from: old.get(n).map(|v| v.to_string()),
            to: new.get(n).map(|v| v.to_string()),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Request bodies refuse fields they do not know, at every level.
    #[test]
    fn request_bodies_are_strict() {
        fn accepts<T: serde::de::DeserializeOwned>(json: &str) -> bool {
            serde_json::from_str::<T>(json).is_ok()
        }
        let spec = r#"{"name":"a","image":"hello","cpus":1,"nics":[],"accel":"auto"}"#;
        let cases: &[(&str, bool, bool)] = &[
            // (body, is RunRequest, accepted)
            (&format!(r#"{{"spec":{spec}}}"#), true, true),
            (&format!(r#"{{"spec":{spec},"bogus":1}}"#), true, false),
            (
                r#"{"spec":{"name":"a","image":"hello","cpus":1,"nics":[],"accel":"auto","bogus":1}}"#,
                true,
                false,
            ),
            (
                r#"{"spec":{"name":"a","image":"hello","cpus":1,"nics":[{"network":"lan","bogus":1}],"accel":"auto"}}"#,
                true,
                false,
            ),
            (r#"{"action":"start"}"#, false, true),
            (r#"{"action":"start","bogus":1}"#, false, false),
        ];
        for (json, is_run, ok) in cases {
            let got = if *is_run {
                accepts::<crate::RunRequest>(json)
            } else {
                accepts::<ActionRequest>(json)
            };
            assert_eq!(got, *ok, "{json}");
        }
        assert!(accepts::<BuildImageRequest>(r#"{"recipe":"/r"}"#));
        assert!(!accepts::<BuildImageRequest>(
            r#"{"recipe":"/r","bogus":1}"#
        ));
        assert!(accepts::<ConfigDocument>(r#"{"values":{"a":"b"}}"#));
        assert!(!accepts::<ConfigDocument>(r#"{"values":{},"bogus":1}"#));
    }

    #[test]
    fn package_changes_name_added_removed_and_moved() {
        let p = |n: &str, v: &str| PackageEntry {
            name: n.into(),
            version: v.into(),
            source: n.into(),
            sha256: String::new(),
        };
        let before = [p("libc6", "2.36-9"), p("gone", "1"), p("same", "1")];
        let after = [p("libc6", "2.36-10"), p("new", "2"), p("same", "1")];
        let change = |n: &str, from: Option<&str>, to: Option<&str>| PackageChange {
            name: n.into(),
            from: from.map(Into::into),
            to: to.map(Into::into),
        };
        assert_eq!(
            package_changes(&before, &after),
            vec![
                change("gone", Some("1"), None),
                change("libc6", Some("2.36-9"), Some("2.36-10")),
                change("new", None, Some("2")),
            ]
        );
    }
}
