//! The apt layer against the machine's real Debian sources (CI runs
//! `vroom setup` first, which refreshes the package lists when needed).

use vroom_image::apt::{download, resolve, ResolvePackagesError};

#[test]
fn resolves_verifies_and_caches_real_packages() {
    let closure = resolve(&["busybox-static"]).unwrap();
    let bb = closure
        .iter()
        .find(|p| p.name == "busybox-static")
        .expect("busybox-static in its own closure");
    assert_eq!(bb.source, "busybox");
    assert_eq!(bb.sha256.len(), 64);

    let cache = tempfile::tempdir().unwrap();
    let debs = download(&closure, cache.path()).unwrap();
    assert_eq!(debs.len(), closure.len());
    let first = std::fs::metadata(&debs[0]).unwrap().modified().unwrap();
    // A second call finds everything cached and fetches nothing.
    let again = download(&closure, cache.path()).unwrap();
    assert_eq!(again, debs);
    assert_eq!(
        std::fs::metadata(&again[0]).unwrap().modified().unwrap(),
        first
    );

    // A corrupted cache entry is detected and fetched again.
    std::fs::write(&debs[0], b"tampered").unwrap();
    download(&closure, cache.path()).unwrap();
    assert_ne!(std::fs::read(&debs[0]).unwrap(), b"tampered");
}

#[test]
fn unknown_and_conflicting_packages_are_named() {
    match resolve(&["busybox-static", "no-such-package-vroom"]) {
        Err(ResolvePackagesError::UnknownPackage { name }) => {
            assert_eq!(name, "no-such-package-vroom")
        }
        other => panic!("unexpected {other:?}"),
    }
    let err = resolve(&["busybox-static", "busybox"]).unwrap_err();
    assert!(
        matches!(err, ResolvePackagesError::Unsatisfiable { .. }),
        "{err}"
    );
    assert!(err.to_string().contains("busybox"), "{err}");
}
