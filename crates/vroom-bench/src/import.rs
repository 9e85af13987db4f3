//! `vroom bench import`: OCI images as appliances. A busybox httpd image
//! (built with umoci, pushed with skopeo to a `docker-registry` this bench
//! starts on loopback) is imported cold (its layers fetched) against with
//! its layers cached (another config over the same layers); the imported
//! image boots to ready against the `hello` recipe image (both serve HTTP
//! from busybox); and its size (erofs root plus initramfs) is set against
//! the OCI image's compressed layers.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use vroom_client::Client;
use vroom_types::{ImportImageRequest, Name, NetworkSpec};

use crate::stats::{median, p90};
use crate::warm::{one_nic_request, start};

const RECIPE_IMAGE: &str = "hello";

/// A `docker-registry` on a loopback port, killed when dropped.
struct Registry {
    child: Child,
    addr: String,
}

impl Registry {
    fn start(dir: &Path) -> Result<Registry> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let addr = format!("127.0.0.1:{port}");
        let config = dir.join("registry.yml");
        std::fs::write(
            &config,
            format!(
                "version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: {}\nhttp:\n  addr: {addr}\n",
                dir.join("registry").display()
            ),
        )?;
        let child = Command::new("docker-registry")
            .arg("serve")
            .arg(&config)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("start docker-registry (apt install docker-registry)")?;
        let registry = Registry { child, addr };
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(&registry.addr).is_err() {
            if Instant::now() > deadline {
                bail!("docker-registry did not come up on {}", registry.addr);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(registry)
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn sh(script: &str) -> Result<()> {
    let out = Command::new("sh").arg("-ec").arg(script).output()?;
    if !out.status.success() {
        bail!(
            "{script}: {}",
            String::from_utf8_lossy(&out.stderr).trim_end()
        );
    }
    Ok(())
}

/// An OCI layout with the busybox httpd image tagged `c0`, `w0`, `c1`...:
/// the same layers, each tag its own config (so its own digest).
fn build_layout(dir: &Path, runs: usize) -> Result<PathBuf> {
    let layout = dir.join("layout");
    let (l, b) = (layout.display(), dir.join("bundle"));
    let b = b.display();
    sh(&format!(
        "umoci init --layout {l} && umoci new --image {l}:base && umoci unpack --image {l}:base {b}"
    ))?;
    let root = dir.join("bundle/rootfs");
    for d in ["bin", "www"] {
        std::fs::create_dir_all(root.join(d))?;
    }
    std::fs::copy("/bin/busybox", root.join("bin/busybox")).context("copy /bin/busybox")?;
    std::os::unix::fs::symlink("busybox", root.join("bin/httpd"))?;
    std::fs::write(root.join("www/index.html"), "hello from an oci image\n")?;
    sh(&format!(
        "umoci repack --image {l}:base {b} && umoci config --image {l}:base \
         --config.entrypoint /bin/httpd --config.cmd -f --config.cmd -p --config.cmd 8080 \
         --config.cmd -h --config.cmd /www --config.exposedports 8080/tcp && rm -rf {b}"
    ))?;
    for i in 0..runs {
        for kind in ["c", "w"] {
            sh(&format!(
                "umoci config --image {l}:base --tag {kind}{i} --config.env BENCH={kind}{i}"
            ))?;
        }
    }
    Ok(layout)
}

pub async fn import(data_dir: &Path, runs: usize) -> Result<()> {
    if runs == 0 {
        bail!("--runs must be at least 1");
    }
    let client = crate::vroomd::connect(data_dir).await?;
    vroom::session::build_from_catalog_if_missing(&client, RECIPE_IMAGE, true).await?;
    let tag = std::process::id() % 10000;
    let dir = tempfile::Builder::new()
        .prefix("vroom-bench-import")
        .tempdir()?;
    let net = format!("bim{tag}");
    client
        .create_network(&NetworkSpec::plain(Name::new(&net)?))
        .await?;
    let result = measure(&client, dir.path(), &net, runs).await;
    for instance in client.list().await.unwrap_or_default() {
        if instance.spec.name.as_str().starts_with(&net) {
            let _ = client.remove(instance.spec.name.as_str(), true).await;
        }
    }
    for image in client.images().await.unwrap_or_default() {
        if image.name.starts_with(&net) {
            let _ = client.remove_image(&image.id).await;
        }
    }
    let _ = client.remove_network(&net).await;
    result
}

async fn import_secs(client: &Client, reference: &str, name: &str) -> Result<(f64, bool)> {
    let t0 = Instant::now();
    let report = client
        .import_image(
            &ImportImageRequest {
                reference: reference.into(),
                name: Some(Name::new(name)?),
                insecure: true,
                kernel: None,
            },
            |_, _| {},
        )
        .await?;
    Ok((t0.elapsed().as_secs_f64(), report.cached))
}

async fn measure(client: &Client, dir: &Path, net: &str, runs: usize) -> Result<()> {
    let layout = build_layout(dir, runs)?;
    let registry = Registry::start(dir)?;
    for i in 0..runs {
        for kind in ["c", "w"] {
            sh(&format!(
                "skopeo copy -q --dest-tls-verify=false oci:{}:{kind}{i} docker://{}/bench/web:{kind}{i}",
                layout.display(),
                registry.addr
            ))?;
        }
    }
    // Cold: no image names the layers, so `image rm` collected them;
    // cached: another config over the same layers (a new digest, so a real
    // import: unpack and pack, without the fetch).
    let name = format!("{net}-web");
    let (mut cold, mut cached) = (vec![], vec![]);
    let mut imported = None;
    for i in 0..runs {
        for (kind, out) in [("c", &mut cold), ("w", &mut cached)] {
            let reference = format!("docker://{}/bench/web:{kind}{i}", registry.addr);
            let (secs, unchanged) =
                import_secs(client, &reference, &format!("{name}{kind}")).await?;
            if unchanged {
                bail!("{reference} was imported before: not a measurement");
            }
            out.push(secs);
        }
        if i + 1 < runs {
            for kind in ["c", "w"] {
                client.remove_image(&format!("{name}{kind}")).await?;
            }
        } else {
            imported = Some(client.image(&format!("{name}c")).await?);
        }
    }
    println!(
        "import from a registry on loopback: cold (layers fetched) median {:.3}s p90 {:.3}s; layers cached median {:.3}s p90 {:.3}s ({:.2}x of cold), {runs} runs each",
        median(&cold),
        p90(&cold),
        median(&cached),
        p90(&cached),
        median(&cached) / median(&cold)
    );

    let image = imported.expect("invariant: runs >= 1");
    let oci = image
        .manifest
        .oci
        .clone()
        .context("the import has no OCI origin")?;
    let mut layer_bytes = 0;
    for layer in &oci.layers {
        let hex = layer.trim_start_matches("sha256:");
        layer_bytes += std::fs::metadata(layout.join("blobs/sha256").join(hex))?.len();
    }
    let m = &image.manifest;
    println!(
        "imported image: {:.2} MB (erofs root {:.2} MB + initramfs {:.2} MB) against {:.2} MB of compressed layers ({:.2}x), kernel {}",
        image.size as f64 / 1e6,
        m.rootfs.size as f64 / 1e6,
        m.initramfs.size as f64 / 1e6,
        layer_bytes as f64 / 1e6,
        image.size as f64 / layer_bytes as f64,
        m.kernel.flavor
    );

    let recipe = client.image(RECIPE_IMAGE).await?;
    let (mut baseline, mut ours) = (vec![], vec![]);
    for i in 0..runs {
        for (image, out) in [
            (RECIPE_IMAGE.to_string(), &mut baseline),
            (format!("{name}c"), &mut ours),
        ] {
            let kind = if image == RECIPE_IMAGE { "h" } else { "o" };
            let instance = format!("{net}-{kind}{i}");
            let (secs, _) = start(
                client,
                &one_nic_request(&instance, &image, net, true, None)?,
            )
            .await?;
            out.push(secs);
            client.remove(&instance, true).await?;
        }
    }
    println!(
        "boot to ready (cold): {RECIPE_IMAGE} recipe image (baseline, kernel {}) median {:.3}s p90 {:.3}s; imported busybox httpd median {:.3}s p90 {:.3}s ({:.2}x), {runs} runs each",
        recipe.manifest.kernel.flavor,
        median(&baseline),
        p90(&baseline),
        median(&ours),
        p90(&ours),
        median(&ours) / median(&baseline)
    );
    drop(registry);
    Ok(())
}
