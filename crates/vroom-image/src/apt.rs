//! Package resolution and download through the machine's own apt
//! configuration, without installing anything on the host.
//!
//! The dependency closure comes from `apt-get install --print-uris` run
//! against an empty, private dpkg status file, so apt plans as if nothing were
//! installed and touches no host state. Hashes come from the Packages indexes
//! (`apt-cache show`), which apt verified against the signed Release files
//! when they were fetched; every downloaded .deb is checked against them.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde::{Deserialize, Serialize};

use crate::util::sha256_file;

/// One resolved package: what goes into the image and its SBOM.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ResolvedPackage {
    pub name: String,
    pub version: String,
    /// The source package it was built from.
    pub source: String,
    pub sha256: String,
    pub size: u64,
    /// Package names it depends on (Depends and Pre-Depends, every alternative).
    #[serde(default)]
    pub depends: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum ResolvePackagesError {
    #[error("unknown package {name} (not in the configured Debian sources; run apt-get update?)")]
    UnknownPackage { name: String },
    #[error("the packages cannot be installed together: {detail}")]
    Unsatisfiable { detail: String },
    #[error("apt failed: {detail}")]
    Apt { detail: String },
    #[error("cannot prune {name}: {reason}")]
    Prune { name: String, reason: String },
    #[error("no SHA256 in the package index for {name} {version}")]
    NoHash { name: String, version: String },
}

#[derive(Debug, thiserror::Error)]
pub enum DownloadPackagesError {
    #[error("cannot download {name} {version}: {detail}")]
    Download {
        name: String,
        version: String,
        detail: String,
    },
    #[error("{name} {version} does not match the signed index (sha256 {got}, index says {want})")]
    HashMismatch {
        name: String,
        version: String,
        got: String,
        want: String,
    },
    #[error("package cache {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Refreshes the machine's package indexes (`apt-get update`), so that a
/// resolve picks the newest versions, security updates included.
pub fn update() -> Result<(), ResolvePackagesError> {
    let output = Command::new("apt-get")
        .args(["update", "-q"])
        .env("DEBIAN_FRONTEND", "noninteractive")
        .output()
        .map_err(|e| ResolvePackagesError::Apt {
            detail: format!("cannot run apt-get update: {e}"),
        })?;
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        return Err(ResolvePackagesError::Apt {
            detail: format!(
                "apt-get update failed: {}",
                vroom_base::last_line(&stderr).unwrap_or("").trim()
            ),
        });
    }
    Ok(())
}

/// A digest of what apt resolves from: the signed release files of the
/// package indexes, the sources and the pinning preferences. Equal
/// fingerprints mean a resolve gives the same closure.
pub fn index_fingerprint() -> std::io::Result<String> {
    use sha2::{Digest, Sha256};
    let mut files = vec![];
    for (dir, wanted) in [
        ("/var/lib/apt/lists", "Release"),
        ("/etc/apt/sources.list.d", ""),
        ("/etc/apt/preferences.d", ""),
    ] {
        if let Ok(entries) = std::fs::read_dir(dir) {
            for entry in entries.flatten() {
                let path = entry.path();
                let name = entry.file_name().to_string_lossy().into_owned();
                if path.is_file() && name.contains(wanted) {
                    files.push(path);
                }
            }
        }
    }
    files.extend(
        ["/etc/apt/sources.list", "/etc/apt/preferences"]
            .map(std::path::PathBuf::from)
            .into_iter()
            .filter(|p| p.is_file()),
    );
    files.sort();
    let mut h = Sha256::new();
    for path in &files {
        h.update(path.display().to_string().as_bytes());
        h.update([0]);
        h.update(std::fs::read(path)?);
        h.update([0]);
    }
    Ok(crate::util::hex(&h.finalize()))
}

/// Resolves the full dependency closure of `packages`, sorted by name.
pub fn resolve(packages: &[&str]) -> Result<Vec<ResolvedPackage>, ResolvePackagesError> {
    let status = tempfile::NamedTempFile::new().map_err(|e| ResolvePackagesError::Apt {
        detail: e.to_string(),
    })?;
    let output = Command::new("apt-get")
        .args([
            "install",
            "--print-uris",
            "-q",
            "-y",
            "--no-install-recommends",
            "-o",
            "Debug::NoLocking=1",
        ])
        .arg("-o")
        .arg(format!("Dir::State::status={}", status.path().display()))
        .args(packages)
        .env("DEBIAN_FRONTEND", "noninteractive")
        .output()
        .map_err(|e| ResolvePackagesError::Apt {
            detail: format!("cannot run apt-get: {e}"),
        })?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    if !output.status.success() {
        return Err(apt_failure(&stdout, &stderr));
    }
    let planned = parse_print_uris(&stdout);
    let pins: Vec<String> = planned.iter().map(|(n, v)| format!("{n}={v}")).collect();
    let show = Command::new("apt-cache")
        .args(["show", "--no-all-versions"])
        .args(&pins)
        .output()
        .map_err(|e| ResolvePackagesError::Apt {
            detail: format!("cannot run apt-cache: {e}"),
        })?;
    if !show.status.success() {
        return Err(ResolvePackagesError::Apt {
            detail: String::from_utf8_lossy(&show.stderr).trim().to_string(),
        });
    }
    let index = parse_index(&String::from_utf8_lossy(&show.stdout));
    let mut resolved = Vec::new();
    for (name, version) in planned {
        let entry = index.get(&(name.clone(), version.clone())).ok_or_else(|| {
            ResolvePackagesError::NoHash {
                name: name.clone(),
                version: version.clone(),
            }
        })?;
        resolved.push(entry.clone());
    }
    resolved.sort();
    Ok(resolved)
}

fn apt_failure(stdout: &str, stderr: &str) -> ResolvePackagesError {
    for line in stderr.lines() {
        if let Some(name) = line.strip_prefix("E: Unable to locate package ") {
            return ResolvePackagesError::UnknownPackage {
                name: name.trim().to_string(),
            };
        }
    }
    // apt explains conflicts on stdout as "pkg : Depends: ... but it is not installable".
    let detail: Vec<&str> = stdout
        .lines()
        .map(str::trim)
        .filter(|l| l.contains(" : ") || l.starts_with("Depends:"))
        .collect();
    if !detail.is_empty() {
        return ResolvePackagesError::Unsatisfiable {
            detail: detail.join("; "),
        };
    }
    let last = stderr
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("no output");
    ResolvePackagesError::Apt {
        detail: last.trim().to_string(),
    }
}

/// `'URI' name_version_arch.deb size hash` lines → (name, version).
pub fn parse_print_uris(text: &str) -> Vec<(String, String)> {
    text.lines()
        .filter(|l| l.starts_with('\''))
        .filter_map(|l| {
            let file = l.split_whitespace().nth(1)?;
            let stem = file.strip_suffix(".deb")?;
            let mut parts = stem.splitn(3, '_');
            let name = parts.next()?.to_string();
            let version = parts.next()?.replace("%3a", ":");
            Some((name, version))
        })
        .collect()
}

/// `apt-cache show` stanzas → (name, version) → package.
pub fn parse_index(text: &str) -> BTreeMap<(String, String), ResolvedPackage> {
    let mut out = BTreeMap::new();
    for stanza in text.split("\n\n") {
        let field = |key: &str| {
            stanza.lines().find_map(|l| {
                l.strip_prefix(key)
                    .and_then(|v| v.strip_prefix(": "))
                    .map(|v| v.trim().to_string())
            })
        };
        let (Some(name), Some(version), Some(sha256)) =
            (field("Package"), field("Version"), field("SHA256"))
        else {
            continue;
        };
        let source = field("Source")
            .map(|s| s.split_whitespace().next().unwrap_or("").to_string())
            .unwrap_or_else(|| name.clone());
        let size = field("Size").and_then(|s| s.parse().ok()).unwrap_or(0);
        let mut depends: Vec<String> = ["Depends", "Pre-Depends"]
            .iter()
            .filter_map(|k| field(k))
            .flat_map(|list| {
                list.split([',', '|'])
                    .filter_map(|dep| {
                        let name = dep.split_whitespace().next()?;
                        Some(name.split(':').next().unwrap_or(name).to_string())
                    })
                    .collect::<Vec<_>>()
            })
            .collect();
        depends.sort();
        depends.dedup();
        out.insert(
            (name.clone(), version.clone()),
            ResolvedPackage {
                name,
                version,
                source,
                sha256,
                size,
                depends,
            },
        );
    }
    out
}

/// The closure without `prune` and without what only the pruned packages
/// needed: what stays is reachable from `requested` without passing through
/// a pruned package. Debian declares some dependencies for the benefit of
/// maintainer scripts (e.g. `passwd` to add a system user), which an image
/// built without running them does not need.
pub fn prune(
    closure: Vec<ResolvedPackage>,
    requested: &[&str],
    prune: &[&str],
) -> Result<Vec<ResolvedPackage>, ResolvePackagesError> {
    let by_name: BTreeMap<&str, &ResolvedPackage> =
        closure.iter().map(|p| (p.name.as_str(), p)).collect();
    for name in prune {
        if requested.contains(name) {
            return Err(ResolvePackagesError::Prune {
                name: name.to_string(),
                reason: "it is requested by the recipe".into(),
            });
        }
        if !by_name.contains_key(name) {
            return Err(ResolvePackagesError::Prune {
                name: name.to_string(),
                reason: "it is not in the closure".into(),
            });
        }
    }
    let mut keep = std::collections::BTreeSet::new();
    let mut todo: Vec<&str> = requested.to_vec();
    while let Some(name) = todo.pop() {
        if prune.contains(&name) || !keep.insert(name) {
            continue;
        }
        if let Some(p) = by_name.get(name) {
            todo.extend(
                p.depends
                    .iter()
                    .map(String::as_str)
                    .filter(|d| by_name.contains_key(d)),
            );
        }
    }
    Ok(closure
        .iter()
        .filter(|p| keep.contains(p.name.as_str()))
        .cloned()
        .collect())
}

/// Makes sure every package is in `cache` with the index's digest; returns
/// the paths in the order given. Packages already cached are not fetched again.
pub fn download(
    packages: &[ResolvedPackage],
    cache: &Path,
) -> Result<Vec<PathBuf>, DownloadPackagesError> {
    let io = |source| DownloadPackagesError::Io {
        path: cache.to_path_buf(),
        source,
    };
    fs::create_dir_all(cache).map_err(io)?;
    let cached = |p: &ResolvedPackage| cache.join(format!("{}_{}.deb", p.name, p.sha256));
    let missing: Vec<&ResolvedPackage> = packages
        .iter()
        .filter(|p| !sha256_file(&cached(p)).is_ok_and(|(h, _)| h == p.sha256))
        .collect();
    if !missing.is_empty() {
        let work = tempfile::Builder::new()
            .prefix(".download-")
            .tempdir_in(cache)
            .map_err(io)?;
        let pins: Vec<String> = missing
            .iter()
            .map(|p| format!("{}={}", p.name, p.version))
            .collect();
        let out = Command::new("apt-get")
            .args(["download", "-q"])
            .args(&pins)
            .current_dir(work.path())
            .output()
            .map_err(|e| DownloadPackagesError::Download {
                name: "apt-get".into(),
                version: String::new(),
                detail: e.to_string(),
            })?;
        if !out.status.success() {
            let stderr = String::from_utf8_lossy(&out.stderr);
            let detail = stderr
                .lines()
                .rev()
                .find(|l| l.starts_with("E:"))
                .unwrap_or("apt-get download failed")
                .to_string();
            return Err(DownloadPackagesError::Download {
                name: pins.join(" "),
                version: String::new(),
                detail,
            });
        }
        let fetched: Vec<PathBuf> = fs::read_dir(work.path())
            .map_err(io)?
            .flatten()
            .map(|e| e.path())
            .collect();
        for p in missing {
            let prefix = format!("{}_", p.name);
            let file = fetched
                .iter()
                .find(|f| {
                    f.file_name()
                        .is_some_and(|n| n.to_string_lossy().starts_with(&prefix))
                })
                .ok_or_else(|| DownloadPackagesError::Download {
                    name: p.name.clone(),
                    version: p.version.clone(),
                    detail: "apt-get wrote no file for it".into(),
                })?;
            let (got, _) = sha256_file(file).map_err(io)?;
            if got != p.sha256 {
                return Err(DownloadPackagesError::HashMismatch {
                    name: p.name.clone(),
                    version: p.version.clone(),
                    got,
                    want: p.sha256.clone(),
                });
            }
            fs::rename(file, cached(p)).map_err(io)?;
        }
    }
    Ok(packages.iter().map(cached).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prune_drops_what_only_the_pruned_packages_needed() {
        let p = |name: &str, deps: &[&str]| ResolvedPackage {
            name: name.into(),
            version: "1".into(),
            source: name.into(),
            sha256: String::new(),
            size: 0,
            depends: deps.iter().map(|d| d.to_string()).collect(),
        };
        let closure = vec![
            p("dnsmasq-base", &["libc6", "passwd"]),
            p("libc6", &[]),
            p("libpam0g", &["libc6"]),
            p("passwd", &["libc6", "libpam0g"]),
        ];
        let kept = prune(closure.clone(), &["dnsmasq-base"], &["passwd"]).unwrap();
        let names: Vec<&str> = kept.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(names, ["dnsmasq-base", "libc6"]);
        assert_eq!(
            prune(closure.clone(), &["dnsmasq-base"], &[]).unwrap(),
            closure
        );
        let err = prune(closure.clone(), &["dnsmasq-base"], &["dnsmasq-base"]).unwrap_err();
        assert!(err.to_string().contains("requested by the recipe"), "{err}");
        let err = prune(closure, &["dnsmasq-base"], &["perl"]).unwrap_err();
        assert!(err.to_string().contains("not in the closure"), "{err}");
    }

    #[test]
    fn print_uris_table() {
        let text = "'http://deb.debian.org/debian/pool/main/b/busybox/busybox-static_1.35.0-4%2bdeb12u1%2bb1_amd64.deb' busybox-static_1%3a1.35.0-4+deb12u1+b1_amd64.deb 928188 MD5Sum:f6\n\
                    'http://x/libc6_2.36-9%2bdeb12u14_amd64.deb' libc6_2.36-9+deb12u14_amd64.deb 2759320 \n\
                    Reading package lists...\n";
        assert_eq!(
            parse_print_uris(text),
            vec![
                (
                    "busybox-static".to_string(),
                    "1:1.35.0-4+deb12u1+b1".to_string()
                ),
                ("libc6".to_string(), "2.36-9+deb12u14".to_string())
            ]
        );
    }

    #[test]
    fn index_table() {
        let text = "Package: busybox-static\nSource: busybox (1:1.35.0-4+deb12u1)\nVersion: 1:1.35.0-4+deb12u1+b1\nSize: 928188\nSHA256: 3d3f\n\n\
                    Package: libc6\nVersion: 2.36-9\nSHA256: abcd\nDescription: x\n multi\n\nPackage: nohash\nVersion: 1\n";
        let index = parse_index(text);
        let bb = &index[&(
            "busybox-static".to_string(),
            "1:1.35.0-4+deb12u1+b1".to_string(),
        )];
        assert_eq!(
            (bb.source.as_str(), bb.sha256.as_str(), bb.size),
            ("busybox", "3d3f", 928188)
        );
        assert_eq!(
            index[&("libc6".to_string(), "2.36-9".to_string())].source,
            "libc6"
        );
        assert_eq!(index.len(), 2, "a stanza without SHA256 is not trusted");
    }

    #[test]
    fn failures_are_told_apart() {
        let unknown = apt_failure(
            "",
            "Reading package lists...\nE: Unable to locate package nosuch\n",
        );
        assert!(
            matches!(unknown, ResolvePackagesError::UnknownPackage { ref name } if name == "nosuch")
        );
        let broken = apt_failure(
            "The following packages have unmet dependencies:\n busybox-static : Conflicts: busybox but 1:1.35 is to be installed\n",
            "E: Unable to correct problems, you have held broken packages.\n",
        );
        assert!(
            broken
                .to_string()
                .contains("busybox-static : Conflicts: busybox"),
            "{broken}"
        );
    }
}
