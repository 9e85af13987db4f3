//! Developer tasks. `cargo xtask demo` and `cargo xtask test` are the README's
//! quickstart; both build the static guest init, which needs its own target
//! flags and so cannot come from a plain `cargo build`.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

mod deb;

const INIT_TARGET: &str = "x86_64-unknown-linux-gnu";

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let root = workspace_root();
    match args.first().map(String::as_str) {
        Some("build-init") => build_init(&root).map(|_| ()),
        Some("prereqs") => build_prerequisites(),
        Some("demo") => {
            let vroom = build(&root, true, &["vroom"])?;
            run(Command::new(&vroom).arg("setup"))?;
            run(Command::new(&vroom).arg("demo").args(&args[1..]))
        }
        Some("test") => {
            // vroom-bench too: the jail test runs `vroom bench jail`, which
            // hands over to the vroom-bench beside it.
            let vroom = build(&root, false, &["vroom", "vroom-bench"])?;
            // The tests run on vroom's own kernel: built here (minutes on
            // a fresh machine, nothing when it is cached); QEMU 10 is
            // unpacked beside the machine's 7.2 for crates/vroom/tests/qemu10.rs
            // (seconds once; the package list check after that).
            run(Command::new(&vroom).args(["setup", "--wait-kernel", "--qemu", "10"]))?;
            install_test_tools()?;
            let init = init_path(&root);
            run(Command::new(cargo())
                .current_dir(&root)
                .args(["test", "--workspace", "--no-fail-fast"])
                .args(&args[1..])
                .env("VROOM_INIT", &init))
        }
        Some(which @ ("bench" | "bench-images")) => {
            let vroom = build(&root, true, &["vroom", "vroom-bench"])?;
            run(Command::new(&vroom).arg("setup"))?;
            let data = tempfile_dir("vroom-bench")?;
            // The benches are vroom-bench, beside the vroom they measure.
            let bench = |name: &str| {
                let mut cmd = Command::new(vroom.with_file_name("vroom-bench"));
                cmd.arg("--data-dir").arg(&data).arg(name);
                cmd
            };
            let mut result = if which == "bench" {
                run(bench("boot").args(&args[1..]))
            } else {
                run(bench("images")
                    .arg("--recipes")
                    .arg(root.join("recipes"))
                    .args(&args[1..]))
            };
            // The jail's cost, on the hello image the boot bench built; then
            // splicing, warm starts and density.
            for extra in ["jail", "splice", "warm", "density"] {
                if which == "bench" && result.is_ok() {
                    result = run(bench(extra).args(&args[1..]));
                }
            }
            // `--` so that pkill does not take the pattern for an option.
            let _ = run(Command::new("pkill")
                .args(["-f", "--"])
                .arg(format!("--data-dir {} daemon", data.display())));
            let _ = std::fs::remove_dir_all(&data);
            result
        }
        Some("deb") => {
            let release = !args[1..].iter().any(|a| a == "--debug");
            let deb = deb::package(&root, release)?;
            println!("{}", deb.display());
            Ok(())
        }
        Some("openapi") => run(Command::new(cargo())
            .current_dir(&root)
            .args([
                "test",
                "-q",
                "-p",
                "vroom-api",
                "openapi_document_is_in_sync",
            ])
            .env("VROOM_UPDATE_OPENAPI", "1")),
        _ => {
            eprintln!("usage: cargo xtask <demo [--keep] | test [cargo test args] | bench [-n N] | bench-images [-n N] [--no-debootstrap] | build-init | prereqs | openapi | deb [--debug]>");
            std::process::exit(2);
        }
    }
}

/// Installs Debian packages, reading the package lists first when they are
/// missing or stale (a fresh machine has none).
fn apt_install(packages: &[&str]) -> Result<()> {
    let install = || {
        run(Command::new("apt-get")
            .args(["install", "-y", "-q", "--no-install-recommends"])
            .args(packages)
            .env("DEBIAN_FRONTEND", "noninteractive"))
    };
    if install().is_ok() {
        return Ok(());
    }
    run(Command::new("apt-get").args(["update", "-q"]))?;
    install()
}

/// What building vroom needs beyond the Rust toolchain: the etcd client
/// crate compiles etcd's protobuf API with `protoc` and its well-known types.
fn build_prerequisites() -> Result<()> {
    let protoc = Command::new("protoc").arg("--version").output().is_ok();
    let types = Path::new("/usr/include/google/protobuf/descriptor.proto").is_file();
    if !protoc || !types {
        apt_install(&["protobuf-compiler", "libprotobuf-dev"])?;
    }
    Ok(())
}

/// Tools the tests use as real clients beside what `vroom setup` installs:
/// tcpdump reads the sniffer's captures, psql logs in to postgres.
fn install_test_tools() -> Result<()> {
    let missing = |tool: &str| {
        !std::env::var_os("PATH")
            .map(|paths| std::env::split_paths(&paths).any(|d| d.join(tool).is_file()))
            .unwrap_or(false)
    };
    if missing("tcpdump") {
        apt_install(&["tcpdump"])?;
    }
    // The catalog's dnsmasq configs are checked by the host's dnsmasq
    // (crates/vroom-image/tests/catalog_templates.rs).
    if missing("dnsmasq") {
        apt_install(&["dnsmasq-base"])?;
    }
    // ... and the load balancer's HAProxy configs by the host's haproxy.
    if missing("haproxy") {
        apt_install(&["haproxy"])?;
    }
    // The postgres appliance's test logs in with the real client.
    if missing("psql") {
        apt_install(&["postgresql-client"])?;
    }
    // The OCI import tests build images with umoci, copy them with
    // skopeo and serve them from a docker-registry of their own.
    for (tool, package) in [
        ("umoci", "umoci"),
        ("skopeo", "skopeo"),
        ("docker-registry", "docker-registry"),
    ] {
        if missing(tool) {
            apt_install(&[package])?;
        }
    }
    // The topology test renders its graph with Graphviz's dot.
    if missing("dot") {
        apt_install(&["graphviz"])?;
    }
    // The package test checks the .deb with lintian, and drives vroomd
    // as systemd would with systemd's own tools (no systemd as PID 1).
    if missing("lintian") {
        apt_install(&["lintian"])?;
    }
    if missing("systemd-socket-activate") || missing("systemd-sysusers") {
        apt_install(&["systemd"])?;
    }
    // The metrics test scrapes vroomd with a real Prometheus and lints the
    // exposition with promtool (both in Debian's prometheus package; its
    // service is not started here).
    if missing("prometheus") || missing("promtool") {
        apt_install(&["prometheus"])?;
    }
    // The dashboard's test (crates/vroom/tests/ui.rs) drives a real
    // headless chromium through chromedriver's WebDriver endpoint.
    if missing("chromium") || missing("chromedriver") {
        apt_install(&["chromium", "chromium-driver"])?;
    }
    // The load balancer's test keeps real HTTP load on it with wrk.
    if missing("wrk") {
        apt_install(&["wrk"])?;
    }
    // The cluster tests run a real three-member etcd.
    if missing("etcd") {
        apt_install(&["etcd-server"])?;
    }
    // The API conformance test (crates/vroom/tests/api.rs) runs schemathesis;
    // pinned, because new releases add checks.
    let installed = Command::new("schemathesis")
        .arg("--version")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).contains(SCHEMATHESIS_VERSION))
        .unwrap_or(false);
    if !installed {
        run(Command::new("python3").args([
            "-m",
            "pip",
            "install",
            "--quiet",
            &format!("schemathesis=={SCHEMATHESIS_VERSION}"),
        ]))?;
    }
    Ok(())
}

/// The schemathesis release `cargo xtask test` installs (what PyPI served on 2026-11-22).
const SCHEMATHESIS_VERSION: &str = "4.32.5";

fn cargo() -> String {
    std::env::var("CARGO").unwrap_or_else(|_| "cargo".into())
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("invariant: xtask lives in the workspace")
        .to_path_buf()
}

fn init_path(root: &Path) -> PathBuf {
    root.join("target")
        .join(INIT_TARGET)
        .join("init/vroom-init")
}

pub(crate) fn run(cmd: &mut Command) -> Result<()> {
    let status = cmd
        .status()
        .with_context(|| format!("cannot run {:?}", cmd.get_program()))?;
    if !status.success() {
        bail!("{:?} failed ({status})", cmd.get_program());
    }
    Ok(())
}

/// vroom-init is a static binary: built for an explicit target so that the
/// crt-static flag does not reach build scripts and proc macros.
fn build_init(root: &Path) -> Result<PathBuf> {
    run(Command::new(cargo())
        .current_dir(root)
        .args([
            "build",
            "-q",
            "--profile",
            "init",
            "-p",
            "vroom-init",
            "--target",
            INIT_TARGET,
        ])
        .env("RUSTFLAGS", "-C target-feature=+crt-static"))?;
    Ok(init_path(root))
}

/// Builds vroom (and the other `packages`' binaries beside it) and puts
/// vroom-init next to it, where vroom looks for it; returns vroom's path.
pub(crate) fn build(root: &Path, release: bool, packages: &[&str]) -> Result<PathBuf> {
    build_prerequisites()?;
    let init = build_init(root)?;
    let mut cmd = Command::new(cargo());
    cmd.current_dir(root).args(["build", "-q"]);
    for package in packages {
        cmd.args(["-p", package]);
    }
    if release {
        cmd.arg("--release");
    }
    run(&mut cmd)?;
    let dir = root
        .join("target")
        .join(if release { "release" } else { "debug" });
    // Under a name of its own: a plain `cargo build` writes a dynamically
    // linked `vroom-init` into the same directory, which must not replace it.
    std::fs::copy(&init, dir.join("vroom-guest-init"))
        .context("cannot place vroom-guest-init next to vroom")?;
    Ok(dir.join("vroom"))
}

fn tempfile_dir(prefix: &str) -> Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!("{prefix}-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}
