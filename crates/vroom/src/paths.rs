//! Where vroom keeps things. Every location can be overridden so that tests
//! (and several users) isolate themselves.

use std::path::PathBuf;

pub const DEFAULT_DATA_DIR: &str = "/var/lib/vroom";
pub const DEFAULT_CACHE_DIR: &str = "/var/cache/vroom";

pub fn cache_dir() -> PathBuf {
    std::env::var_os("VROOM_CACHE_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(DEFAULT_CACHE_DIR))
}

/// The QEMU of series `series` (`10`) that `vroom setup --qemu SERIES`
/// unpacks into the cache dir: `CACHE/qemu/SERIES/usr/bin/qemu-system-x86_64`.
pub fn private_qemu(series: &str) -> PathBuf {
    cache_dir()
        .join("qemu")
        .join(series)
        .join("usr/bin/qemu-system-x86_64")
}

/// The static vroom-init binary: `VROOM_INIT`, else the first of
/// [`init_candidates`] that exists (the first when none does, for the
/// message that says it is missing).
pub fn init_binary() -> PathBuf {
    if let Some(path) = std::env::var_os("VROOM_INIT") {
        return PathBuf::from(path);
    }
    let exe = std::env::current_exe().unwrap_or_default();
    let candidates = init_candidates(&exe);
    candidates
        .iter()
        .find(|c| c.is_file())
        .unwrap_or(&candidates[0])
        .clone()
}

/// Where vroom-init may be beside the executable `exe`: `vroom-guest-init`
/// next to it (where `cargo xtask demo` puts it; not `vroom-init`, which a
/// plain `cargo build` overwrites with a dynamically linked build), then
/// `../lib/vroom/vroom-guest-init` (the package's `/usr/bin/vroom` and
/// `/usr/lib/vroom/`, or any other prefix).
pub fn init_candidates(exe: &std::path::Path) -> Vec<PathBuf> {
    let beside = exe.with_file_name("vroom-guest-init");
    let prefix = exe.parent().and_then(|bin| bin.parent());
    let mut candidates = vec![beside];
    if let Some(prefix) = prefix {
        candidates.push(prefix.join("lib/vroom/vroom-guest-init"));
    }
    candidates
}

/// The host's static busybox, which tests and demos use as a client.
pub fn busybox() -> PathBuf {
    std::env::var_os("VROOM_BUSYBOX")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/bin/busybox"))
}

pub fn socket(data_dir: &std::path::Path) -> PathBuf {
    data_dir.join("vroomd.sock")
}

/// The host group whose members may use the API socket (`VROOM_GROUP`,
/// `vroom` by default). Membership is root-equivalent for the VMs.
pub fn api_group() -> String {
    std::env::var("VROOM_GROUP").unwrap_or_else(|_| "vroom".into())
}

/// Prefix of host interface names (at most 5 characters), `VROOM_IFACE_PREFIX`.
pub fn iface_prefix() -> String {
    let prefix = std::env::var("VROOM_IFACE_PREFIX").unwrap_or_else(|_| "vr".into());
    prefix
        .chars()
        .filter(|c| c.is_ascii_alphanumeric())
        .take(5)
        .collect()
}

/// The image source of a data dir: its store, the shared kernel and package caches.
pub fn local_images(data_dir: &std::path::Path) -> vroom_image::LocalImages {
    vroom_image::LocalImages::new(
        vroom_image::ImageStore::new(&data_dir.join("images")),
        vroom_image::KernelCache::new(&cache_dir()),
        init_binary(),
        cache_dir().join("debs"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_guest_init_is_found_beside_vroom_or_under_its_prefix() {
        let cases = [
            (
                "/usr/bin/vroom",
                vec![
                    "/usr/bin/vroom-guest-init",
                    "/usr/lib/vroom/vroom-guest-init",
                ],
            ),
            (
                "/work/target/debug/vroom",
                vec![
                    "/work/target/debug/vroom-guest-init",
                    "/work/target/lib/vroom/vroom-guest-init",
                ],
            ),
        ];
        for (exe, want) in cases {
            let want: Vec<PathBuf> = want.into_iter().map(PathBuf::from).collect();
            assert_eq!(init_candidates(std::path::Path::new(exe)), want, "{exe}");
        }
    }
}
