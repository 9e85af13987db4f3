//! `vroom bench images`: for every recipe in a directory, the image size, the
//! cold build time (empty image store and package cache, so downloads count),
//! the cached rebuild time and boot-to-ready through vroom; and, as the size
//! baseline, a `debootstrap --variant=minbase` root with the firewall's
//! packages, measured in the same run and packed with the same erofs settings.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use vroom_core::images::ImageSource;
use vroom_types::{BuildReport, Name, NetworkSpec};

use crate::stats::median;
use vroom::paths;

struct Row {
    name: String,
    packages: usize,
    image_bytes: u64,
    rootfs_bytes: u64,
    cold_s: f64,
    cached_s: f64,
    boot_ms: Vec<f64>,
}

pub async fn images(data_dir: &Path, recipes: &Path, runs: usize, debootstrap: bool) -> Result<()> {
    if runs == 0 {
        bail!("--runs must be at least 1");
    }
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(recipes)
        .with_context(|| format!("cannot read {}", recipes.display()))?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.join("recipe.toml").is_file())
        .collect();
    dirs.sort();
    if dirs.is_empty() {
        bail!("no recipes under {}", recipes.display());
    }

    let mut rows = vec![];
    for dir in &dirs {
        // Cold: a fresh package cache and nothing in the store for this recipe.
        let debs = tempfile::tempdir()?;
        let images = vroom_image::LocalImages::new(
            vroom_image::ImageStore::new(&data_dir.join("images")),
            vroom_image::KernelCache::new(&paths::cache_dir()),
            paths::init_binary(),
            debs.path().to_path_buf(),
        );
        let build = |images: &vroom_image::LocalImages| -> Result<(BuildReport, f64)> {
            let started = Instant::now();
            let report = images
                .build(dir, false, None, None, &mut |_, _| {})
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            Ok((report, started.elapsed().as_secs_f64()))
        };
        let (cold, cold_s) = build(&images)?;
        let (cached, cached_s) = build(&images)?;
        if cold.cached || !cached.cached {
            bail!(
                "{}: the cold build hit, or the rebuild missed, the cache",
                dir.display()
            );
        }
        eprintln!("built {} in {cold_s:.1}s", cold.image.name);
        rows.push(Row {
            name: cold.image.name.clone(),
            packages: cold.image.manifest.packages.len(),
            image_bytes: cold.image.size,
            rootfs_bytes: cold.image.manifest.rootfs.size,
            cold_s,
            cached_s,
            boot_ms: vec![],
        });
    }

    let client = crate::vroomd::connect(data_dir).await?;
    let net = format!("bimg{}", std::process::id() % 10000);
    client
        .create_network(&NetworkSpec {
            name: Name::new(&net)?,
            subnet: None,
            nat: false,
            isolated: false,
            // Every appliance can sit on it, the sniffer's mirror-sink included.
            mirror: true,
            allow_host: vec![],
        })
        .await?;
    let booted = boot_all(&client, &net, &mut rows, runs).await;
    let _ = client.remove_network(&net).await;
    booted?;

    print_table(&rows, runs);
    if debootstrap {
        let firewall = rows
            .iter()
            .find(|r| r.name == "firewall")
            .context("no firewall recipe to compare with debootstrap")?;
        let packages = firewall_packages(&recipes.join("firewall"))?;
        compare_with_debootstrap(firewall, &packages)?;
    }
    Ok(())
}

async fn boot_all(
    client: &vroom_client::Client,
    net: &str,
    rows: &mut [Row],
    runs: usize,
) -> Result<()> {
    // Interleaved, so that machine noise hits every appliance alike.
    for run in 0..runs {
        for row in rows.iter_mut() {
            let name = format!("bimg-{}-{run}", row.name);
            client
                .run(&crate::warm::one_nic_request(
                    &name, &row.name, net, true, None,
                )?)
                .await?;
            let instance =
                vroom::session::wait_ready(client, &name, Duration::from_secs(130)).await;
            let _ = client.remove(&name, true).await;
            let ms = instance?.status.boot_ms.context("no boot time recorded")?;
            row.boot_ms.push(ms as f64);
        }
    }
    Ok(())
}

fn print_table(rows: &[Row], runs: usize) {
    let hello = rows
        .iter()
        .find(|r| r.name == "hello")
        .map(|r| median(&r.boot_ms));
    println!(
        "{:<10} {:>8} {:>10} {:>10} {:>8} {:>8} {:>8} {:>10} {:>9}",
        "APPLIANCE",
        "PACKAGES",
        "IMAGE MB",
        "ROOTFS MB",
        "COLD s",
        "CACHED s",
        "CACHED/COLD",
        "READY ms",
        "VS HELLO"
    );
    for r in rows {
        let boot = median(&r.boot_ms);
        println!(
            "{:<10} {:>8} {:>10.1} {:>10.1} {:>8.1} {:>8.3} {:>11.4}x {:>10.0} {:>8.2}x",
            r.name,
            r.packages,
            r.image_bytes as f64 / 1e6,
            r.rootfs_bytes as f64 / 1e6,
            r.cold_s,
            r.cached_s,
            r.cached_s / r.cold_s,
            boot,
            hello.map_or(f64::NAN, |h| boot / h)
        );
    }
    println!(
        "(image = initramfs + erofs root; cold = empty store and package cache; READY = launch to agent-ready, median of {runs})"
    );
}

/// The packages the firewall recipe asks for.
fn firewall_packages(dir: &Path) -> Result<Vec<String>> {
    let loaded = vroom_image::recipe::load(&dir.join("recipe.toml"))
        .map_err(|e| anyhow::anyhow!("{}", vroom_core::error::chain(&e)))?;
    Ok(loaded
        .recipe
        .debian
        .packages
        .iter()
        .map(|p| p.name().to_string())
        .collect())
}

fn compare_with_debootstrap(firewall: &Row, packages: &[String]) -> Result<()> {
    if which("debootstrap").is_none() {
        run(Command::new("apt-get")
            .args([
                "install",
                "-y",
                "-q",
                "--no-install-recommends",
                "debootstrap",
            ])
            .env("DEBIAN_FRONTEND", "noninteractive"))?;
    }
    let mirror = debian_mirror().unwrap_or_else(|| "http://deb.debian.org/debian".into());
    let root = tempfile::tempdir()?;
    let started = Instant::now();
    run(Command::new("debootstrap")
        .arg("--variant=minbase")
        .arg(format!("--include={}", packages.join(",")))
        .arg("bookworm")
        .arg(root.path())
        .arg(&mirror))?;
    let seconds = started.elapsed().as_secs_f64();
    let tree = tree_bytes(root.path())?;
    let packed = root.path().with_extension("erofs");
    run(Command::new("mkfs.erofs")
        .args(["--quiet", "-zlz4hc", "-T0", "--all-root"])
        .arg(&packed)
        .arg(root.path()))?;
    let erofs = std::fs::metadata(&packed)?.len();
    let _ = std::fs::remove_file(&packed);
    let ours = firewall.rootfs_bytes as f64;
    println!(
        "firewall vs debootstrap --variant=minbase --include={} ({seconds:.0}s):",
        packages.join(",")
    );
    println!(
        "  debootstrap root {:.1} MB as files, {:.1} MB as lz4hc erofs; vroom root {:.1} MB erofs, image {:.1} MB",
        tree as f64 / 1e6,
        erofs as f64 / 1e6,
        ours / 1e6,
        firewall.image_bytes as f64 / 1e6
    );
    println!(
        "  ratio vroom/debootstrap (same erofs settings): {:.2}x",
        ours / erofs as f64
    );
    Ok(())
}

fn tree_bytes(dir: &Path) -> Result<u64> {
    let mut total = 0;
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let meta = entry.path().symlink_metadata()?;
        if meta.is_dir() {
            total += tree_bytes(&entry.path())?;
        } else if meta.is_file() {
            total += meta.len();
        }
    }
    Ok(total)
}

/// The first Debian archive URI in the machine's apt sources.
fn debian_mirror() -> Option<String> {
    let text = std::fs::read_to_string("/etc/apt/sources.list.d/debian.sources").ok()?;
    text.lines()
        .filter_map(|l| l.strip_prefix("URIs:"))
        .flat_map(|uris| uris.split_whitespace())
        .find(|u| u.ends_with("/debian"))
        .map(String::from)
}

fn which(tool: &str) -> Option<PathBuf> {
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|d| d.join(tool))
        .find(|p| p.is_file())
}

fn run(cmd: &mut Command) -> Result<()> {
    let status = cmd
        .status()
        .with_context(|| format!("cannot run {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed with {status}");
    }
    Ok(())
}
