//! `vroom setup --qemu 10`: QEMU 10.0 from bookworm-backports, unpacked into
//! a private prefix under the cache dir, beside the machine's own QEMU 7.2,
//! which stays what `apt-get install` and vroomd pick by default.
//!
//! apt runs with a sources list, package lists and cache of its own
//! (`CACHE/qemu/apt/`): the host's sources, lists and dpkg database are only
//! read (the mirror is the one the host's sources name). `apt-get download`
//! checks each .deb against the signed index; `dpkg-deb -x` unpacks
//! `qemu-system-x86`, `qemu-system-common`, `qemu-system-data` and
//! `seabios` (Debian 13's microvm firmware is seabios's) into
//! `CACHE/qemu/VERSION/`, and `CACHE/qemu/10` points at the newest. Nothing
//! else is needed here: the 10.0 binary's libraries are all Debian 12's
//! (checked with `ldd` at each install). vroomd runs it when `VROOM_QEMU`
//! names `CACHE/qemu/10/usr/bin/qemu-system-x86_64` (see
//! `vroom_qemu::vmm` for how its firmware and modules are found).

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

/// The QEMU series `--qemu` offers, with the suite they come from.
pub const OFFERED: &[(&str, &str)] = &[("10", "bookworm-backports")];

/// What is unpacked: the emulator, its firmware and its modules.
const PACKAGES: &[&str] = &[
    "qemu-system-x86",
    "qemu-system-common",
    "qemu-system-data",
    "seabios",
];

/// Where series `series` lives under `cache`: `CACHE/qemu/SERIES`, a
/// link to the dir of its newest version ([`crate::paths::private_qemu`]
/// names its binary).
fn link(cache: &Path, series: &str) -> PathBuf {
    cache.join("qemu").join(series)
}

fn binary(cache: &Path, series: &str) -> PathBuf {
    link(cache, series).join("usr/bin/qemu-system-x86_64")
}

/// Installs series `series` (unless its newest build is there already) and
/// returns its binary. Offline with an install in place, keeps that one.
pub fn install(cache: &Path, series: &str, say: &dyn Fn(&str)) -> Result<PathBuf> {
    let Some((_, suite)) = OFFERED.iter().find(|(s, _)| *s == series) else {
        bail!(
            "QEMU {series} is not offered; `--qemu` takes {}",
            OFFERED
                .iter()
                .map(|(s, _)| *s)
                .collect::<Vec<_>>()
                .join(", ")
        );
    };
    let codename = os_codename()?;
    if codename != "bookworm" {
        bail!("QEMU {series} from {suite} is for Debian 12 (bookworm); this host is {codename}: install its own qemu-system-x86 instead");
    }
    let root = cache.join("qemu");
    std::fs::create_dir_all(&root).with_context(|| format!("cannot create {}", root.display()))?;
    // One install at a time (tests may ask at once).
    let _lock = lock(&root.join(".lock"))?;
    let apt = PrivateApt::new(&root.join("apt"), suite)?;
    let candidate = apt.update().and_then(|()| apt.candidate("qemu-system-x86"));
    let current = std::fs::read_link(link(cache, series)).ok();
    let version = match candidate {
        Ok(version) => version,
        Err(e) => match &current {
            Some(dir) if binary(cache, series).is_file() => {
                say(&format!(
                    "qemu {series}: cannot look for a newer one ({e:#}); keeping {}",
                    dir.display()
                ));
                return Ok(binary(cache, series));
            }
            _ => return Err(e.context(format!("cannot install QEMU {series}"))),
        },
    };
    let dir_name = version.replace([':', '~', '+'], "_");
    let dir = root.join(&dir_name);
    if !dir.join("usr/bin/qemu-system-x86_64").is_file() {
        say(&format!(
            "qemu {series}: unpacking {version} from {suite} into {}",
            dir.display()
        ));
        unpack(&apt, &root, &dir, &version)?;
    }
    // Point the series at it, atomically.
    let tmp = root.join(format!(".{series}.link"));
    let _ = std::fs::remove_file(&tmp);
    std::os::unix::fs::symlink(&dir_name, &tmp)
        .and_then(|()| std::fs::rename(&tmp, link(cache, series)))
        .with_context(|| {
            format!(
                "cannot point {} at {dir_name}",
                link(cache, series).display()
            )
        })?;
    Ok(binary(cache, series))
}

/// Downloads the packages of `version` and unpacks them into `dir`
/// (through a staging dir, renamed into place once complete and checked).
fn unpack(apt: &PrivateApt, root: &Path, dir: &Path, version: &str) -> Result<()> {
    let staging = root.join(format!(
        ".staging-{}",
        dir.file_name().unwrap_or_default().to_string_lossy()
    ));
    let _ = std::fs::remove_dir_all(&staging);
    let debs = staging.join("debs");
    let tree = staging.join("tree");
    std::fs::create_dir_all(&debs).context("cannot create a staging dir")?;
    let result = (|| {
        // The emulator and its common files at exactly `version`; firmware
        // and data from the same suite.
        let pins: Vec<String> = PACKAGES
            .iter()
            .map(|p| {
                if p.starts_with("qemu-") {
                    format!("{p}={version}")
                } else {
                    format!("{p}/{}", apt.suite)
                }
            })
            .collect();
        apt.download(&pins, &debs)?;
        for entry in std::fs::read_dir(&debs)? {
            let deb = entry?.path();
            run_quiet(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&tree))
                .with_context(|| format!("cannot unpack {}", deb.display()))?;
        }
        let binary = tree.join("usr/bin/qemu-system-x86_64");
        let missing = missing_libraries(&binary)?;
        if !missing.is_empty() {
            bail!(
                "QEMU {version} needs libraries this host lacks: {}; install them with apt-get",
                missing.join(", ")
            );
        }
        std::fs::rename(&tree, dir)
            .with_context(|| format!("cannot move the unpacked QEMU to {}", dir.display()))?;
        Ok(())
    })();
    let _ = std::fs::remove_dir_all(&staging);
    result
}

/// Runs `cmd` with its output captured; a failure says its last line of stderr.
fn run_quiet(cmd: &mut Command) -> Result<()> {
    let out = cmd
        .output()
        .with_context(|| format!("cannot run {}", cmd.get_program().to_string_lossy()))?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        bail!(
            "{} failed ({}): {}",
            cmd.get_program().to_string_lossy(),
            out.status,
            vroom_base::last_line(&stderr)
                .unwrap_or("no error output")
                .trim()
        );
    }
    Ok(())
}

/// Libraries `ldd` cannot find for `binary`.
fn missing_libraries(binary: &Path) -> Result<Vec<String>> {
    let out = Command::new("ldd")
        .arg(binary)
        .output()
        .context("cannot run ldd")?;
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.contains("not found"))
        .filter_map(|l| l.split_whitespace().next().map(str::to_string))
        .collect())
}

/// apt with its own sources list, lists and cache: the host's Debian
/// mirror plus one suite (`bookworm-backports`).
struct PrivateApt {
    dir: PathBuf,
    suite: String,
}

impl PrivateApt {
    fn new(dir: &Path, suite: &str) -> Result<Self> {
        for sub in ["lists/partial", "cache/archives/partial"] {
            std::fs::create_dir_all(dir.join(sub))
                .with_context(|| format!("cannot create {}", dir.join(sub).display()))?;
        }
        let apt = PrivateApt {
            dir: dir.to_path_buf(),
            suite: suite.to_string(),
        };
        let mirror = host_mirror()?;
        let list = format!(
            "# Written by `vroom setup --qemu`: apt reads it only with vroom's options.\n\
             deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] {mirror} {suite} main\n"
        );
        std::fs::write(apt.sources(), list).context("cannot write vroom's sources list")?;
        Ok(apt)
    }

    fn sources(&self) -> PathBuf {
        self.dir.join("sources.list")
    }

    /// apt-get or apt-cache with this configuration.
    fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new(program);
        cmd.arg("-q")
            .arg("-o")
            .arg(format!("Dir::Etc::sourcelist={}", self.sources().display()))
            .args(["-o", "Dir::Etc::sourceparts=-"])
            .arg("-o")
            .arg(format!(
                "Dir::State::Lists={}",
                self.dir.join("lists").display()
            ))
            .arg("-o")
            .arg(format!("Dir::Cache={}", self.dir.join("cache").display()))
            // Reads the host's dpkg status; takes no host lock.
            .args(["-o", "Debug::NoLocking=1"])
            .env("DEBIAN_FRONTEND", "noninteractive");
        cmd
    }

    fn update(&self) -> Result<()> {
        run_quiet(self.command("apt-get").arg("update"))
            .with_context(|| format!("cannot read the package list of {}", self.suite))
    }

    /// The version of `package` that `suite` offers.
    fn candidate(&self, package: &str) -> Result<String> {
        let out = self
            .command("apt-cache")
            .args(["show", "--no-all-versions"])
            .arg(format!("{package}/{}", self.suite))
            .output()
            .context("cannot run apt-cache")?;
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .find_map(|l| l.strip_prefix("Version: "))
            .map(|v| v.trim().to_string())
            .with_context(|| format!("{} offers no {package}", self.suite))
    }

    fn download(&self, pins: &[String], into: &Path) -> Result<()> {
        run_quiet(
            self.command("apt-get")
                .arg("download")
                .args(pins)
                .current_dir(into),
        )
        .with_context(|| format!("cannot download {}", pins.join(" ")))
    }
}

/// The Debian archive the host's apt uses (`http://deb.debian.org/debian/`).
fn host_mirror() -> Result<String> {
    let out = Command::new("apt-get")
        .args(["indextargets", "--format", "$(REPO_URI) $(RELEASE) $(SITE)"])
        .output()
        .context("cannot run apt-get indextargets")?;
    mirror_from_targets(&String::from_utf8_lossy(&out.stdout))
        .context("the host's apt sources name no Debian archive for bookworm (run apt-get update?)")
}

/// The repository URI of the `bookworm` release among `apt-get indextargets`
/// lines (`URI RELEASE SITE`).
fn mirror_from_targets(targets: &str) -> Option<String> {
    targets
        .lines()
        .filter_map(|l| {
            let mut parts = l.split_whitespace();
            Some((parts.next()?, parts.next()?))
        })
        .find(|(_, release)| *release == "bookworm")
        .map(|(uri, _)| uri.to_string())
}

fn os_codename() -> Result<String> {
    let text = std::fs::read_to_string("/etc/os-release").context("cannot read /etc/os-release")?;
    text.lines()
        .find_map(|l| l.strip_prefix("VERSION_CODENAME="))
        .map(|v| v.trim_matches('"').to_string())
        .context("/etc/os-release names no VERSION_CODENAME")
}

/// An exclusive `flock` on `path`, held until the file is dropped.
fn lock(path: &Path) -> Result<std::fs::File> {
    use std::os::fd::AsRawFd;
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
        .with_context(|| format!("cannot open {}", path.display()))?;
    // SAFETY: plain syscall on an fd this function owns.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) } != 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("cannot lock {}", path.display()));
    }
    Ok(file)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_hosts_mirror_is_found_among_its_index_targets() {
        let targets = "http://deb.debian.org/debian-security/ bookworm-security deb.debian.org\n\
                       http://deb.debian.org/debian/ bookworm deb.debian.org\n\
                       http://deb.debian.org/debian/ bookworm-updates deb.debian.org\n";
        assert_eq!(
            mirror_from_targets(targets).as_deref(),
            Some("http://deb.debian.org/debian/")
        );
        assert_eq!(mirror_from_targets("http://x/ trixie x\n"), None);
        assert_eq!(mirror_from_targets(""), None);
    }

    #[test]
    fn the_installed_binary_is_where_paths_says() {
        assert_eq!(
            binary(&crate::paths::cache_dir(), "10"),
            crate::paths::private_qemu("10")
        );
    }

    #[test]
    fn only_offered_series_are_installed() {
        let dir = tempfile::tempdir().unwrap();
        let err = install(dir.path(), "9", &|_| {}).unwrap_err();
        assert_eq!(err.to_string(), "QEMU 9 is not offered; `--qemu` takes 10");
        assert!(!dir.path().join("qemu").exists(), "nothing made");
    }
}
