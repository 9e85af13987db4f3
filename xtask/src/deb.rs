//! `cargo xtask deb [--debug]`: `target/vroom_VERSION_amd64.deb`, built
//! with dpkg-deb from the workspace's own build: `/usr/bin/vroom`, the
//! static guest init under `/usr/lib/vroom/`, the catalog's recipes under
//! `/usr/share/vroom/recipes`, the systemd units and sysusers file of
//! `packaging/`, and the completions and man pages vroom generates from
//! its own grammar (`vroom __generate-docs`). `--debug` packages the debug
//! build (what CI has built already) instead of a release build.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

use crate::{build, run};

/// Builds the package; returns its path.
pub fn package(root: &Path, release: bool) -> Result<PathBuf> {
    let vroom = build(root, release, &["vroom"])?;
    let version = env!("CARGO_PKG_VERSION");
    let target = root.join("target");
    let stage = target.join("deb").join(format!("vroom_{version}_amd64"));
    if stage.exists() {
        fs::remove_dir_all(&stage).with_context(|| format!("cannot empty {}", stage.display()))?;
    }
    let packaging = root.join("packaging");

    // Binaries, stripped: the debug build's symbols are hundreds of MiB.
    install_stripped(&vroom, &stage.join("usr/bin/vroom"))?;
    install_stripped(
        &vroom.with_file_name("vroom-guest-init"),
        &stage.join("usr/lib/vroom/vroom-guest-init"),
    )?;
    copy_tree(
        &root.join("recipes"),
        &stage.join("usr/share/vroom/recipes"),
    )?;
    for unit in ["vroomd.service", "vroomd.socket"] {
        install(
            &packaging.join("systemd").join(unit),
            &stage.join("usr/lib/systemd/system").join(unit),
            0o644,
        )?;
    }
    install(
        &packaging.join("sysusers.d/vroom.conf"),
        &stage.join("usr/lib/sysusers.d/vroom.conf"),
        0o644,
    )?;

    // Completions and man pages, from the grammar of the vroom just built.
    let generated = target.join("deb").join("generated");
    if generated.exists() {
        fs::remove_dir_all(&generated)?;
    }
    run(Command::new(&vroom).arg("__generate-docs").arg(&generated))?;
    let completions = generated.join("completions");
    for (file, dir) in [
        ("vroom", "usr/share/bash-completion/completions"),
        ("_vroom", "usr/share/zsh/vendor-completions"),
        ("vroom.fish", "usr/share/fish/vendor_completions.d"),
    ] {
        install(&completions.join(file), &stage.join(dir).join(file), 0o644)?;
    }
    let man = stage.join("usr/share/man/man1");
    for page in sorted_entries(&generated.join("man"))? {
        let name = page.file_name().expect("invariant: an entry has a name");
        let dest = man.join(format!("{}.gz", name.to_string_lossy()));
        install(&page, &dest.with_extension(""), 0o644)?;
        // -n: no name or time in the header, so equal pages make equal packages.
        run(Command::new("gzip")
            .args(["-9nf"])
            .arg(dest.with_extension("")))?;
    }

    let doc = stage.join("usr/share/doc/vroom");
    install(
        &packaging.join("debian/copyright"),
        &doc.join("copyright"),
        0o644,
    )?;
    fs::write(doc.join("changelog"), changelog(root, version)?)?;
    run(Command::new("gzip")
        .args(["-9nf"])
        .arg(doc.join("changelog")))?;

    // Control files.
    let debian = stage.join("DEBIAN");
    for script in ["postinst", "prerm", "postrm"] {
        install(
            &packaging.join("debian").join(script),
            &debian.join(script),
            0o755,
        )?;
    }
    let control = fs::read_to_string(packaging.join("debian/control.in"))?
        .replace("@VERSION@", version)
        .replace("@INSTALLED_SIZE@", &installed_size_kib(&stage)?.to_string())
        .replace("@SHLIBS@", &shlib_depends(&stage.join("usr/bin/vroom"))?);
    fs::write(debian.join("control"), control)?;
    fs::write(debian.join("md5sums"), md5sums(&stage)?)?;

    let deb = target.join(format!("vroom_{version}_amd64.deb"));
    // xz for a release; gzip for the debug package, which only tests install.
    let compression = if release { "-Zxz" } else { "-Zgzip" };
    run(Command::new("dpkg-deb")
        .args(["--root-owner-group", compression, "--build"])
        .arg(&stage)
        .arg(&deb))?;
    Ok(deb)
}

fn install(from: &Path, to: &Path, mode: u32) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    if let Some(dir) = to.parent() {
        make_dirs(dir)?;
    }
    fs::copy(from, to)
        .with_context(|| format!("cannot copy {} to {}", from.display(), to.display()))?;
    fs::set_permissions(to, fs::Permissions::from_mode(mode))?;
    Ok(())
}

fn install_stripped(from: &Path, to: &Path) -> Result<()> {
    install(from, to, 0o755)?;
    run(Command::new("strip")
        .args([
            "--strip-unneeded",
            "--remove-section=.comment",
            "--remove-section=.note",
        ])
        .arg(to))
}

/// Directories 0755 whatever the umask.
fn make_dirs(dir: &Path) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let mut missing = vec![];
    let mut at = dir;
    while !at.exists() {
        missing.push(at.to_path_buf());
        match at.parent() {
            Some(parent) => at = parent,
            None => break,
        }
    }
    for dir in missing.iter().rev() {
        fs::create_dir(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        fs::set_permissions(dir, fs::Permissions::from_mode(0o755))?;
    }
    Ok(())
}

fn sorted_entries(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut entries: Vec<PathBuf> = fs::read_dir(dir)
        .with_context(|| format!("cannot read {}", dir.display()))?
        .map(|e| e.map(|e| e.path()))
        .collect::<std::io::Result<_>>()?;
    entries.sort();
    Ok(entries)
}

fn copy_tree(from: &Path, to: &Path) -> Result<()> {
    for entry in sorted_entries(from)? {
        let dest = to.join(entry.file_name().expect("invariant: an entry has a name"));
        if entry.is_dir() {
            copy_tree(&entry, &dest)?;
        } else {
            // Scripts (the recipes' CGIs) are executable, as in the images.
            let script = fs::read(&entry)?.starts_with(b"#!");
            install(&entry, &dest, if script { 0o755 } else { 0o644 })?;
        }
    }
    Ok(())
}

/// Every file under `dir` but `DEBIAN/`, relative to it, sorted.
fn files(dir: &Path) -> Result<Vec<PathBuf>> {
    fn walk(root: &Path, dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
        for entry in sorted_entries(dir)? {
            let rel = entry.strip_prefix(root)?.to_path_buf();
            if rel.starts_with("DEBIAN") {
                continue;
            }
            if entry.is_dir() {
                walk(root, &entry, out)?;
            } else {
                out.push(rel);
            }
        }
        Ok(())
    }
    let mut out = vec![];
    walk(dir, dir, &mut out)?;
    Ok(out)
}

fn installed_size_kib(stage: &Path) -> Result<u64> {
    let mut bytes = 0;
    for file in files(stage)? {
        bytes += fs::metadata(stage.join(file))?.len().div_ceil(1024) * 1024;
    }
    Ok(bytes / 1024)
}

fn md5sums(stage: &Path) -> Result<String> {
    let files = files(stage)?;
    let out = Command::new("md5sum")
        .current_dir(stage)
        .args(&files)
        .output()
        .context("cannot run md5sum")?;
    if !out.status.success() {
        bail!("md5sum failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8(out.stdout)?)
}

/// The packages of the shared libraries `binary` links, with the glibc
/// version its symbols need (what dpkg-shlibdeps would say, without a
/// debian/ source tree).
fn shlib_depends(binary: &Path) -> Result<String> {
    let out = Command::new("objdump")
        .arg("-pT")
        .arg(binary)
        .output()
        .context("cannot run objdump")?;
    if !out.status.success() {
        bail!("objdump failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let needed: Vec<&str> = text
        .lines()
        .filter_map(|l| l.trim().strip_prefix("NEEDED"))
        .map(str::trim)
        .collect();
    let glibc = text
        .split_whitespace()
        .filter_map(|w| w.strip_prefix("GLIBC_"))
        .filter_map(|v| {
            let mut parts = v.split('.').map(|p| p.parse::<u32>().ok());
            Some((parts.next()??, parts.next().flatten().unwrap_or(0)))
        })
        .max()
        .context("the binary needs no glibc symbol version")?;
    let mut depends = vec![format!("libc6 (>= {}.{})", glibc.0, glibc.1)];
    for lib in needed {
        match lib {
            "libgcc_s.so.1" => depends.push("libgcc-s1".into()),
            "libc.so.6"
            | "libm.so.6"
            | "ld-linux-x86-64.so.2"
            | "libpthread.so.0"
            | "libdl.so.2"
            | "librt.so.1" => {}
            other => bail!("vroom links {other}: name its package in xtask/src/deb.rs"),
        }
    }
    Ok(depends.join(", "))
}

/// A one-entry Debian changelog, dated by the last commit.
fn changelog(root: &Path, version: &str) -> Result<String> {
    let out = Command::new("git")
        .current_dir(root)
        .args(["log", "-1", "--format=%cD"])
        .output()
        .context("cannot run git")?;
    let date = String::from_utf8_lossy(&out.stdout).trim().to_string();
    if !out.status.success() || date.is_empty() {
        bail!("cannot date the changelog from git");
    }
    Ok(format!(
        "vroom ({version}) unstable; urgency=medium\n\n  * Built from the vroom workspace by `cargo xtask deb`.\n\n -- vroom developers <vroom@example.org>  {date}\n"
    ))
}
