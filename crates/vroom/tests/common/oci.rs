//! OCI images for the tests, made with Debian's real tools: umoci builds
//! them, a `docker-registry` started on loopback serves them.

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::Duration;

use super::{free_port, sh};

/// A `docker-registry` on a loopback port with its own config and storage,
/// killed when dropped.
pub struct Registry {
    child: Child,
    pub addr: String,
}

impl Registry {
    pub fn start(dir: &Path) -> Registry {
        let port = free_port();
        let addr = format!("127.0.0.1:{port}");
        let storage = dir.join("registry");
        std::fs::create_dir_all(&storage).unwrap();
        let config = dir.join("registry.yml");
        std::fs::write(
            &config,
            format!(
                "version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: {}\nhttp:\n  addr: {addr}\n",
                storage.display()
            ),
        )
        .unwrap();
        let log = std::fs::File::create(dir.join("registry.log")).unwrap();
        let child = Command::new("docker-registry")
            .arg("serve")
            .arg(&config)
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("docker-registry (apt install docker-registry)");
        super::poll(Duration::from_secs(10), || {
            std::net::TcpStream::connect(&addr).ok()
        })
        .expect("docker-registry did not come up");
        Registry { child, addr }
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Builds the test's images with umoci in `dir/layout`:
/// - `web`: busybox httpd on 8080 as user `www`, a base layer with
///   `/www/index.html` and `/www/secret.txt`, an upper layer that whites the
///   secret out; the entrypoint says who it runs as and writes to /var/cache;
///   its StopSignal is SIGUSR1, which the entrypoint traps and says so;
/// - `arm`: the same config for linux/arm64; `noentry`: no Entrypoint or Cmd;
/// - `novolume`: `web` without its volume (no data volume to make or replicate);
/// - `big` (with `big`): `web` plus a 16 MB layer of random bytes.
pub fn build_images(dir: &Path, big: bool) -> PathBuf {
    let layout = dir.join("layout");
    let l = layout.display();
    let bundle = dir.join("bundle");
    let b = bundle.display();
    sh(&format!(
        "umoci init --layout {l} && umoci new --image {l}:web && umoci unpack --image {l}:web {b}"
    ));
    let root = bundle.join("rootfs");
    for d in ["bin", "etc", "www", "var/cache"] {
        std::fs::create_dir_all(root.join(d)).unwrap();
    }
    std::fs::copy("/bin/busybox", root.join("bin/busybox")).unwrap();
    for applet in ["sh", "httpd", "id"] {
        std::os::unix::fs::symlink("busybox", root.join("bin").join(applet)).unwrap();
    }
    std::fs::write(root.join("www/index.html"), "hello from an oci image\n").unwrap();
    std::fs::write(root.join("www/secret.txt"), "whited out\n").unwrap();
    std::fs::write(
        root.join("etc/passwd"),
        "root:x:0:0:root:/root:/bin/sh\nwww:x:33:33::/www:/bin/sh\n",
    )
    .unwrap();
    std::fs::write(root.join("etc/group"), "root:x:0:\nwww:x:33:\n").unwrap();
    // The service's own cache dir: written as `www` in the guest.
    std::os::unix::fs::chown(root.join("var/cache"), Some(33), Some(33)).unwrap();
    sh(&format!("umoci repack --image {l}:web {b}"));
    sh(&format!(
        "umoci config --image {l}:web \
         --config.entrypoint /bin/sh --config.entrypoint -c \
         --config.entrypoint 'echo starting httpd as $(id -u):$(id -g) in $PWD with $GREETING and $MOTD; echo written > /var/cache/stamp; trap \"echo stopped by SIGUSR1; exit 0\" USR1; httpd -f -p 8080 -h /www & wait' \
         --config.exposedports 8080/tcp --config.user www --config.workingdir /www \
         --config.stopsignal SIGUSR1 \
         --config.env GREETING=hi --config.volume /data \
         --config.label 'org.vroom.config.motd=string:welcome:the line after the greeting'"
    ));
    sh(&format!("rm -rf {b} && umoci unpack --image {l}:web {b}"));
    std::fs::remove_file(bundle.join("rootfs/www/secret.txt")).unwrap();
    sh(&format!("umoci repack --image {l}:web {b}"));
    sh(&format!(
        "umoci config --image {l}:web --tag arm --architecture arm64"
    ));
    sh(&format!(
        "umoci config --image {l}:web --tag noentry --clear=config.entrypoint --clear=config.cmd"
    ));
    sh(&format!(
        "umoci config --image {l}:web --tag novolume --clear=config.volume"
    ));
    if big {
        sh(&format!(
            "umoci config --image {l}:web --tag big && rm -rf {b} && umoci unpack --image {l}:big {b}"
        ));
        sh(&format!(
            "head -c 16M /dev/urandom > {b}/rootfs/www/big.bin && umoci repack --image {l}:big {b}"
        ));
    }
    sh(&format!("rm -rf {b}"));
    layout
}
