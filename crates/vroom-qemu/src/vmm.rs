//! Which QEMU runs the VMs, and whether vroom can use it.
//!
//! A QEMU is probed once per binary (path, size and mtime: an upgrade while
//! vroomd runs is seen): its `-version` and whether `-machine help` lists
//! `microvm`. vroom needs QEMU 7.2 (Debian 12) or newer with the microvm
//! machine, and uses only what 7.2 and 10.0 (Debian 13, or bookworm-backports
//! unpacked by `vroom setup --qemu 10`) both have; [`crate::compat`] checks
//! that against a binary's own QMP schema and device properties.
//!
//! A QEMU unpacked outside `/usr` (a private prefix `P`, with the binary at
//! `P/bin/qemu-system-x86_64`) finds its firmware only when told where
//! (Debian builds it non-relocatable): its data dirs are `P/share/qemu` and
//! `P/share/seabios`, passed with `-L`, and a jail binds the whole of `P`.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use vroom_base::LockExt;

/// The oldest QEMU vroom runs on: Debian 12's.
pub const MIN_VERSION: (u32, u32) = (7, 2);

/// What probing a QEMU binary found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Probe {
    /// `7.2.22`, or `None` when `-version` said nothing usable.
    pub version: Option<String>,
    /// Whether `-machine help` lists microvm (`None`: it did not answer).
    pub microvm: Option<bool>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CheckVmmError {
    #[error("{binary} not found; run `vroom setup` to install it")]
    Missing { binary: String },
    #[error("{binary} is QEMU {version}; vroom needs QEMU {}.{} or newer", MIN_VERSION.0, MIN_VERSION.1)]
    TooOld { binary: String, version: String },
    #[error("{binary} (QEMU {version}) has no microvm machine (`-machine help` does not list it)")]
    NoMicrovm { binary: String, version: String },
    #[error("cannot tell which QEMU {binary} is: `{binary} -version` printed no version")]
    Unknown { binary: String },
}

impl Probe {
    /// Whether vroom can run VMs on this QEMU. A binary that printed no
    /// version is [`CheckVmmError::Unknown`]: the launch path lets it
    /// through (QEMU's own words on exit say more), `vroom setup` does not.
    pub fn check(&self, binary: &Path) -> Result<(), CheckVmmError> {
        let name = binary.display().to_string();
        let Some(version) = &self.version else {
            return Err(CheckVmmError::Unknown { binary: name });
        };
        match parse_numbers(version) {
            Some((major, minor)) if (major, minor) < MIN_VERSION => Err(CheckVmmError::TooOld {
                binary: name,
                version: version.clone(),
            }),
            Some(_) if self.microvm == Some(false) => Err(CheckVmmError::NoMicrovm {
                binary: name,
                version: version.clone(),
            }),
            _ => Ok(()),
        }
    }
}

/// The QEMU binary vroomd launches: `explicit` (`VROOM_QEMU`), else
/// `qemu-system-x86_64` on PATH. A missing one is an error naming it.
pub fn locate(explicit: Option<&Path>) -> Result<PathBuf, CheckVmmError> {
    match explicit {
        Some(path) if path.is_file() => {
            // The jail binds what the binary really is (and its prefix).
            Ok(std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf()))
        }
        Some(path) => Err(CheckVmmError::Missing {
            binary: path.display().to_string(),
        }),
        None => crate::find_on_path(crate::QEMU_BINARY).ok_or_else(|| CheckVmmError::Missing {
            binary: crate::QEMU_BINARY.into(),
        }),
    }
}

/// The QEMU vroomd would launch (`explicit` is `VROOM_QEMU`), for `vroom
/// info`, `vroom setup` and vroomd's log: its path, version and why vroom
/// cannot use it, if it cannot.
pub fn describe(explicit: Option<&Path>) -> vroom_types::VmmInfo {
    match locate(explicit) {
        Ok(binary) => {
            let probe = probe(&binary);
            vroom_types::VmmInfo {
                path: binary.display().to_string(),
                version: probe.version.clone(),
                problem: probe.check(&binary).err().map(|e| e.to_string()),
            }
        }
        Err(e) => vroom_types::VmmInfo {
            path: explicit
                .unwrap_or(Path::new(crate::QEMU_BINARY))
                .display()
                .to_string(),
            version: None,
            problem: Some(e.to_string()),
        },
    }
}

/// The firmware dirs (`-L`, in search order) of a QEMU unpacked into the
/// private prefix `prefix`: Debian 13's microvm firmware is seabios's.
pub fn data_dirs_in(prefix: &Path) -> Vec<PathBuf> {
    vec![prefix.join("share/qemu"), prefix.join("share/seabios")]
}

/// The environment of a QEMU in the private prefix `prefix`: its own
/// modules. Left alone it loads the system QEMU's, another build's, which
/// it refuses ("Only modules from the same build can be loaded").
pub fn env_in(prefix: &Path) -> Vec<(String, String)> {
    vec![(
        "QEMU_MODULE_DIR".into(),
        prefix
            .join("lib/x86_64-linux-gnu/qemu")
            .display()
            .to_string(),
    )]
}

/// `P` of a binary at `P/bin/NAME` outside `/usr` that has `P/share/qemu`.
pub fn prefix_of(binary: &Path) -> Option<PathBuf> {
    prefix_of_path(binary).filter(|prefix| prefix.join("share/qemu").is_dir())
}

/// `P` of a path `P/bin/NAME` outside `/usr`, by its shape alone.
pub fn prefix_of_path(binary: &Path) -> Option<PathBuf> {
    if binary.starts_with("/usr") {
        return None;
    }
    let bin = binary.parent()?;
    if bin.file_name()? != "bin" {
        return None;
    }
    bin.parent().map(Path::to_path_buf)
}

/// The probe of `binary`, cached while its path, size and mtime stay the same.
pub fn probe(binary: &Path) -> Probe {
    type Key = (PathBuf, u64, Option<std::time::SystemTime>);
    // A few entries: a bench runs two QEMUs side by side.
    static CACHE: std::sync::Mutex<Vec<(Key, Probe)>> = std::sync::Mutex::new(Vec::new());
    let meta = std::fs::metadata(binary).ok();
    let key: Key = (
        binary.to_path_buf(),
        meta.as_ref().map_or(0, |m| m.len()),
        meta.as_ref().and_then(|m| m.modified().ok()),
    );
    if let Some((_, probe)) = CACHE.lock_unpoisoned().iter().find(|(k, _)| *k == key) {
        return probe.clone();
    }
    // Not under the lock: two QEMU runs of up to 2 s each.
    let version = run_bounded(binary, &["-version"]).and_then(|out| parse_version(&out));
    let microvm = version
        .as_ref()
        .and_then(|_| run_bounded(binary, &["-machine", "help"]))
        .map(|out| lists_microvm(&out));
    let probe = Probe { version, microvm };
    let mut cache = CACHE.lock_unpoisoned();
    cache.retain(|(k, _)| k.0 != key.0);
    if cache.len() >= 8 {
        cache.remove(0);
    }
    cache.push((key, probe.clone()));
    probe
}

/// What tells snapshots of one QEMU from another's: its version, or for a
/// binary that prints none, its size and mtime.
pub fn version_label(binary: &Path) -> String {
    if let Some(version) = probe(binary).version {
        return version;
    }
    let meta = std::fs::metadata(binary).ok();
    let mtime = meta
        .as_ref()
        .and_then(|m| m.modified().ok())
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_secs());
    format!("unknown-{}-{mtime}", meta.map_or(0, |m| m.len()))
}

/// Runs `binary args`, bounded: 2 s, 64 KiB of stdout, stderr discarded,
/// the whole process group killed if it does not end. `None` unless it
/// exits successfully.
pub(crate) fn run_bounded(binary: &Path, args: &[&str]) -> Option<String> {
    run_bounded_env(binary, args, &[])
}

/// [`run_bounded`] with `env` added to the environment.
pub(crate) fn run_bounded_env(
    binary: &Path,
    args: &[&str],
    env: &[(String, String)],
) -> Option<String> {
    use std::io::Read;
    use std::os::unix::process::CommandExt;
    let spawn = || {
        std::process::Command::new(binary)
            .args(args)
            .envs(env.iter().map(|(k, v)| (k, v)))
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .process_group(0)
            .spawn()
    };
    // A binary written a moment ago (an upgrade, a test's fake) may still
    // be open for writing in a child another thread forked before its exec:
    // ETXTBSY passes within moments.
    let mut tries = 0;
    let mut child = loop {
        match spawn() {
            Err(e) if e.kind() == std::io::ErrorKind::ExecutableFileBusy && tries < 50 => {
                tries += 1;
                std::thread::sleep(Duration::from_millis(20));
            }
            other => break other.ok()?,
        }
    };
    // Read while it runs: a full pipe would stall it.
    let mut stdout = child.stdout.take()?;
    let reader = std::thread::spawn(move || {
        let mut out = Vec::new();
        let _ = (&mut stdout).take(64 << 10).read_to_end(&mut out);
        out
    });
    let deadline = Instant::now() + Duration::from_secs(2);
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break Some(status),
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(10)),
            _ => break None,
        }
    };
    if status.is_none() {
        // SAFETY: plain syscall on the child's own process group.
        unsafe { libc::kill(-(child.id() as libc::pid_t), libc::SIGKILL) };
        let _ = child.wait();
    }
    let out = reader.join().ok()?;
    status
        .filter(|s| s.success())
        .map(|_| String::from_utf8_lossy(&out).into_owned())
}

/// `QEMU emulator version 7.2.22 (Debian ...)` -> `7.2.22`.
pub fn parse_version(output: &str) -> Option<String> {
    let rest = output.lines().next()?.split("version ").nth(1)?;
    let version = rest.split_whitespace().next()?;
    (!version.is_empty()
        && version
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || ".-+~".contains(c)))
    .then(|| version.to_string())
}

/// `10.0.2` -> (10, 0).
fn parse_numbers(version: &str) -> Option<(u32, u32)> {
    let mut parts = version.split('.');
    let major = parts.next()?.parse().ok()?;
    let minor = parts
        .next()?
        .chars()
        .take_while(char::is_ascii_digit)
        .collect::<String>()
        .parse()
        .ok()?;
    Some((major, minor))
}

/// Whether `-machine help` output lists a machine named `microvm`.
fn lists_microvm(help: &str) -> bool {
    help.lines()
        .any(|l| l.split_whitespace().next() == Some("microvm"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn versions_table() {
        let cases = [
            (
                "QEMU emulator version 7.2.22 (Debian 1:7.2+dfsg-7+deb12u18+b3)\nCopyright",
                Some("7.2.22"),
            ),
            (
                "QEMU emulator version 10.0.2 (Debian 1:10.0.2+ds-2+deb13u1~bpo12+1)",
                Some("10.0.2"),
            ),
            ("QEMU emulator version 9.2.0\n", Some("9.2.0")),
            ("QEMU emulator version $(rm -rf /)", None),
            ("garbage", None),
            ("", None),
        ];
        for (output, want) in cases {
            assert_eq!(parse_version(output).as_deref(), want, "{output:?}");
        }
        let numbers = [
            ("7.2.22", Some((7, 2))),
            ("10.0.2", Some((10, 0))),
            ("7.1.0", Some((7, 1))),
            ("8.2rc1", Some((8, 2))),
            ("x.y", None),
        ];
        for (version, want) in numbers {
            assert_eq!(parse_numbers(version), want, "{version}");
        }
    }

    #[test]
    fn microvm_is_a_machine_name_not_a_word() {
        assert!(lists_microvm(
            "Supported machines are:\nmicrovm              microvm (i386)\npc   Standard PC"
        ));
        assert!(!lists_microvm(
            "Supported machines are:\npc                   Standard PC (i440FX + PIIX, 1996) (no microvm here)"
        ));
    }

    /// A fake QEMU: a script answering `-version` and `-machine help`.
    fn fake_qemu(dir: &Path, name: &str, version: &str, machines: &str) -> PathBuf {
        let path = dir.join(name);
        std::fs::write(
            &path,
            format!(
                "#!/bin/sh\ncase \"$1\" in\n-version) echo 'QEMU emulator version {version} (fake)';;\n-machine) printf 'Supported machines are:\\n{machines}\\n';;\n*) exit 1;;\nesac\n"
            ),
        )
        .unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        path
    }

    #[test]
    fn old_qemus_and_ones_without_microvm_are_refused_by_name_and_version() {
        let dir = tempfile::tempdir().unwrap();
        let microvm = "microvm              microvm (i386)\npc    Standard PC";
        let cases = [
            ("q72", "7.2.22", microvm, Ok(())),
            ("q10", "10.0.2", microvm, Ok(())),
            (
                "q71",
                "7.1.0",
                microvm,
                Err("q71 is QEMU 7.1.0; vroom needs QEMU 7.2 or newer"),
            ),
            (
                "q5",
                "5.2.0",
                "pc    Standard PC",
                Err("q5 is QEMU 5.2.0; vroom needs QEMU 7.2 or newer"),
            ),
            (
                "nomicro",
                "8.2.0",
                "pc    Standard PC\nq35   Standard PC (Q35)",
                Err("nomicro (QEMU 8.2.0) has no microvm machine (`-machine help` does not list it)"),
            ),
        ];
        for (name, version, machines, want) in cases {
            let binary = fake_qemu(dir.path(), name, version, machines);
            let got = probe(&binary).check(&binary).map_err(|e| e.to_string());
            match want {
                Ok(()) => assert_eq!(got, Ok(()), "{name}"),
                Err(tail) => {
                    let message = got.unwrap_err();
                    assert!(message.ends_with(tail), "{name}: {message}");
                    assert!(
                        message.starts_with(&binary.display().to_string()),
                        "{message}"
                    );
                    assert_eq!(message.lines().count(), 1);
                }
            }
        }
        // One that prints no version is unknown, named.
        let mute = dir.path().join("mute");
        std::fs::write(&mute, "#!/bin/sh\nexit 0\n").unwrap();
        std::fs::set_permissions(&mute, std::fs::Permissions::from_mode(0o755)).unwrap();
        let err = probe(&mute).check(&mute).unwrap_err();
        assert!(matches!(err, CheckVmmError::Unknown { .. }), "{err}");
        assert!(version_label(&mute).starts_with("unknown-"));
    }

    #[test]
    fn probes_are_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let flood = dir.path().join("qemu");
        std::fs::write(&flood, "#!/bin/sh\nyes flood\n").unwrap();
        std::fs::set_permissions(&flood, std::fs::Permissions::from_mode(0o755)).unwrap();
        let started = Instant::now();
        assert_eq!(probe(&flood).version, None);
        assert!(started.elapsed() < Duration::from_secs(5));
    }

    #[test]
    fn a_prefix_install_is_known_by_its_shape() {
        let dir = tempfile::tempdir().unwrap();
        let prefix = dir.path().join("qemu/10/usr");
        std::fs::create_dir_all(prefix.join("bin")).unwrap();
        std::fs::create_dir_all(prefix.join("share/qemu")).unwrap();
        std::fs::create_dir_all(prefix.join("share/seabios")).unwrap();
        let binary = prefix.join("bin/qemu-system-x86_64");
        assert_eq!(prefix_of(&binary), Some(prefix.clone()));
        // The system's QEMU, and a lone binary elsewhere, have none.
        assert_eq!(prefix_of(Path::new("/usr/bin/qemu-system-x86_64")), None);
        assert_eq!(prefix_of(&dir.path().join("qemu-system-x86_64")), None);
        std::fs::create_dir_all(dir.path().join("opt/bin")).unwrap();
        assert_eq!(
            prefix_of(&dir.path().join("opt/bin/qemu")),
            None,
            "no share/qemu"
        );
    }
}
