//! `vroom setup`: checks the host prerequisites, installs the missing ones
//! from Debian packages when run as root, and fetches the guest kernel into
//! vroom's cache. Idempotent, and fast when everything is in place.

use std::path::Path;
use std::process::Command;

use anyhow::{bail, Context, Result};
use vroom_image::KernelCache;

use crate::paths;

pub mod qemu;

/// A command vroom runs, and the Debian package that provides it.
const PREREQUISITES: &[(&str, &str)] = &[
    ("qemu-system-x86_64", "qemu-system-x86"),
    // Volume exports (vroomd) and backups and imports (the CLI).
    ("qemu-nbd", "qemu-utils"),
    ("qemu-img", "qemu-utils"),
    ("mkfs.erofs", "erofs-utils"),
    ("nft", "nftables"),
    // Mirrors: tc's mirred action, filters compiled by tcpdump (libpcap).
    ("tc", "iproute2"),
    ("tcpdump", "tcpdump"),
    ("depmod", "kmod"),
    ("dpkg-deb", "dpkg"),
    ("apt-get", "apt"),
];

fn is_root() -> bool {
    // SAFETY: plain syscall.
    unsafe { libc::geteuid() == 0 }
}

/// What is missing, as (what, package) pairs.
pub fn missing() -> Vec<(String, &'static str)> {
    let mut out: Vec<(String, &'static str)> = PREREQUISITES
        .iter()
        .filter(|(bin, _)| vroom_qemu::find_on_path(bin).is_none())
        .map(|(bin, pkg)| (bin.to_string(), *pkg))
        .collect();
    if !is_static_binary(&paths::busybox()) {
        out.push((
            format!("a static busybox at {}", paths::busybox().display()),
            "busybox-static",
        ));
    }
    out
}

/// A static ELF has no `PT_INTERP` program header (no dynamic loader).
fn is_static_binary(path: &Path) -> bool {
    std::fs::read(path)
        .map(|bytes| elf_is_static(&bytes))
        .unwrap_or(false)
}

fn elf_is_static(bytes: &[u8]) -> bool {
    const PT_INTERP: u32 = 3;
    let u16_at = |o: usize| {
        bytes
            .get(o..o + 2)
            .map(|b| u16::from_le_bytes([b[0], b[1]]) as usize)
    };
    let u32_at = |o: usize| {
        bytes
            .get(o..o + 4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    };
    let u64_at = |o: usize| {
        bytes
            .get(o..o + 8)
            .map(|b| u64::from_le_bytes(b.try_into().expect("invariant: 8 bytes")) as usize)
    };
    // 64-bit little-endian ELF only, which is what x86-64 hosts run.
    if !bytes.starts_with(b"\x7fELF\x02\x01") {
        return false;
    }
    let (Some(phoff), Some(phentsize), Some(phnum)) = (u64_at(0x20), u16_at(0x36), u16_at(0x38))
    else {
        return false;
    };
    (0..phnum).all(|i| u32_at(phoff + i * phentsize).is_some_and(|t| t != PT_INTERP))
}

/// The packages providing `missing`, each once, in order.
fn packages_of(missing: &[(String, &'static str)]) -> Vec<&'static str> {
    let mut packages: Vec<&'static str> = Vec::new();
    for (_, package) in missing {
        if !packages.contains(package) {
            packages.push(package);
        }
    }
    packages
}

fn apt(args: &[&str]) -> Result<()> {
    let status = Command::new("apt-get")
        .args(args)
        .env("DEBIAN_FRONTEND", "noninteractive")
        .status()
        .context("cannot run apt-get")?;
    if !status.success() {
        bail!("apt-get {} failed ({status})", args.join(" "));
    }
    Ok(())
}

/// What `vroom setup` does about vroom's own kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OwnKernelSetup {
    /// Start its build in the background unless it is built (or building):
    /// Debian's kernel serves until it is done.
    Background,
    /// Build it now, in the foreground, with progress.
    Wait,
    /// Leave it as it is.
    Leave,
}

/// `qemu`: a QEMU series to unpack beside the machine's (`--qemu 10`).
pub fn run(quiet: bool, own: OwnKernelSetup, qemu: Option<&str>) -> Result<()> {
    let say = |msg: &str| {
        if !quiet {
            println!("{msg}");
        }
    };
    let missing = missing();
    if !missing.is_empty() {
        let packages = packages_of(&missing);
        if !is_root() {
            let what: Vec<String> = missing
                .iter()
                .map(|(w, p)| format!("{w} (package {p})"))
                .collect();
            bail!(
                "missing {}; install with: sudo apt-get install --no-install-recommends {}",
                what.join(", "),
                packages.join(" ")
            );
        }
        say(&format!("installing {}", packages.join(" ")));
        apt(&["update", "-qq"])?;
        let mut args = vec!["install", "-y", "-qq", "--no-install-recommends"];
        args.extend(&packages);
        apt(&args)?;
        // apt may remove an installed package to make room for one it
        // installs: a machine with qemu-utils from bookworm-backports (10.0)
        // loses it to qemu-system-x86 7.2's. A second install of what went
        // missing takes the version that fits.
        let mut still = self::missing();
        if !still.is_empty() {
            let packages = packages_of(&still);
            say(&format!("installing {} again", packages.join(" ")));
            let mut args = vec!["install", "-y", "-qq", "--no-install-recommends"];
            args.extend(&packages);
            apt(&args)?;
            still = self::missing();
        }
        if !still.is_empty() {
            bail!(
                "still missing after install: {}",
                still
                    .iter()
                    .map(|(w, _)| w.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
    }
    say("prerequisites: ok");
    // The QEMU vroomd would run (VROOM_QEMU, else the system's), checked.
    let explicit = std::env::var_os("VROOM_QEMU").map(std::path::PathBuf::from);
    say(&format!("qemu: {}", check_qemu(explicit.as_deref())?));
    if let Some(series) = qemu {
        let binary = qemu::install(&paths::cache_dir(), series, &say)?;
        say(&format!(
            "qemu {series}: {}; vroomd runs it with VROOM_QEMU={}",
            check_qemu(Some(&binary))?,
            binary.display()
        ));
    }
    say(&api_group()?);

    let kernels = KernelCache::new(&paths::cache_dir());
    let kernel = match kernels.fetch() {
        Ok(kernel) => kernel,
        Err(first) if is_root() => {
            // Fresh machines often have no package lists yet.
            say(&format!("{first:#}; refreshing package lists"));
            apt(&["update", "-qq"])?;
            kernels.fetch().context("cannot fetch the guest kernel")?
        }
        Err(e) => return Err(e).context(
            "cannot fetch the guest kernel (run `vroom setup` as root to refresh package lists)",
        ),
    };
    say(&format!(
        "guest kernel: {} {} ({})",
        kernel.reference.package,
        kernel.reference.version,
        kernel.vmlinuz.display()
    ));

    let init = paths::init_binary();
    if !init.is_file() {
        bail!(
            "vroom-init not found at {}; build it with `cargo xtask build-init` or set VROOM_INIT",
            init.display()
        );
    }
    say(&format!("vroom-init: {}", init.display()));
    own_kernel(&kernels, own, is_root(), &say)?;
    match vroom_qemu::accel::kvm_status() {
        Ok(()) => say("accelerator: kvm available"),
        Err(reason) => say(&format!("accelerator: tcg ({reason})")),
    }
    Ok(())
}

/// What a QEMU is, when vroom can run VMs on it: its version, path and that
/// it has microvm and every QMP command and property vroom uses; else the
/// one-line reason it cannot.
fn check_qemu(explicit: Option<&Path>) -> Result<String> {
    use vroom_qemu::vmm;
    let binary = vmm::locate(explicit)?;
    vmm::probe(&binary).check(&binary)?;
    let lacks = vroom_qemu::compat::missing(&binary)?;
    if !lacks.is_empty() {
        bail!(
            "{} lacks what vroom uses: {}",
            binary.display(),
            lacks.join("; ")
        );
    }
    Ok(format!(
        "{}, with microvm and every QMP command and device property vroom uses",
        vmm::describe(Some(&binary)).describe()
    ))
}

/// vroom's own kernel: built (new images use it), building, or started.
fn own_kernel(
    kernels: &KernelCache,
    own: OwnKernelSetup,
    root: bool,
    say: &dyn Fn(&str),
) -> Result<()> {
    if let Some(kernel) = kernels.vroom_kernel() {
        say(&format!(
            "vroom kernel: {} ({}), new images are built for it",
            kernel.id, kernel.reference.release
        ));
        return Ok(());
    }
    if own == OwnKernelSetup::Leave {
        return Ok(());
    }
    let tools = vroom_image::kernel::missing_build_tools();
    if !tools.is_empty() {
        let packages: Vec<&str> = tools.iter().map(|(_, p)| *p).collect();
        if !root {
            say(&format!(
                "vroom kernel: not built; its build needs {} (run `vroom setup` as root); images are built for Debian's kernel",
                packages.join(" ")
            ));
            return Ok(());
        }
        say(&format!(
            "installing {} (for vroom's kernel)",
            packages.join(" ")
        ));
        let mut args = vec!["install", "-y", "-qq", "--no-install-recommends"];
        args.extend(&packages);
        apt(&args)?;
    }
    if own == OwnKernelSetup::Wait {
        say("vroom kernel: building it now (minutes; `vroom kernel ls` shows it when done)");
        let exe = std::env::current_exe().context("cannot find the vroom executable")?;
        let status = Command::new(exe)
            .args(["kernel", "build"])
            .status()
            .context("cannot run `vroom kernel build`")?;
        if !status.success() {
            bail!("vroom's kernel did not build ({status})");
        }
        return Ok(());
    }
    let log = kernels.build_log();
    if kernels.building() {
        say(&format!(
            "vroom kernel: building in the background (log: {}); until it is done, images are built for Debian's kernel",
            log.display()
        ));
        return Ok(());
    }
    if let Some(dir) = log.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    let out =
        std::fs::File::create(&log).with_context(|| format!("cannot create {}", log.display()))?;
    let exe = std::env::current_exe().context("cannot find the vroom executable")?;
    // Its own process group: a ^C at the terminal does not stop it.
    use std::os::unix::process::CommandExt;
    Command::new(exe)
        .args(["kernel", "build"])
        .stdin(std::process::Stdio::null())
        .stdout(out.try_clone()?)
        .stderr(out)
        .process_group(0)
        .spawn()
        .context("cannot start `vroom kernel build`")?;
    say(&format!(
        "vroom kernel: started its build in the background (about 5 minutes on 2 idle cores; log: {}); until it is done, images are built for Debian's kernel. `vroom setup --wait-kernel` waits for it",
        log.display()
    ));
    Ok(())
}

/// Creates the group that may use the API socket (a system group, no
/// members): root grants the API to a user by adding them to it.
fn api_group() -> Result<String> {
    let group = paths::api_group();
    if crate::daemon::group_id(&group).is_some() {
        return Ok(format!(
            "api group: {group} (members may use vroomd's socket)"
        ));
    }
    if !is_root() {
        return Ok(format!(
            "api group: {group} missing, the socket stays root-only (run `vroom setup` as root to create it)"
        ));
    }
    let status = Command::new("groupadd")
        .args(["--system", &group])
        .status()
        .context("cannot run groupadd")?;
    if !status.success() {
        bail!("groupadd --system {group} failed ({status})");
    }
    Ok(format!(
        "api group: created {group}; add users with `usermod -aG {group} USER` (root-equivalent for the VMs); restart vroomd to apply"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The package's `Depends:` is what `vroom setup` installs (but dpkg,
    /// which is essential and so never listed), no more, no less.
    #[test]
    fn the_package_depends_on_what_setup_installs() {
        let control = std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../../packaging/debian/control.in"),
        )
        .unwrap();
        let mut depends: Vec<&str> = control
            .lines()
            .find_map(|l| l.strip_prefix("Depends:"))
            .unwrap()
            .split(',')
            .map(str::trim)
            .filter(|d| *d != "@SHLIBS@")
            .collect();
        depends.sort_unstable();
        let mut installs: Vec<&str> = PREREQUISITES
            .iter()
            .map(|(_, package)| *package)
            .chain(["busybox-static"])
            .filter(|package| *package != "dpkg")
            .collect();
        installs.sort_unstable();
        installs.dedup();
        assert_eq!(depends, installs);
    }

    #[test]
    fn recognises_static_and_dynamic_elves() {
        assert!(
            !elf_is_static(&std::fs::read("/bin/sh").unwrap()),
            "/bin/sh is dynamic"
        );
        assert!(!elf_is_static(b"#!/bin/sh"));
        if let Ok(init) = std::fs::read(crate::paths::init_binary()) {
            assert!(elf_is_static(&init));
        }
    }
}
