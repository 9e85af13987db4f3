//! The registry transport (`docker://HOST[:PORT]/REPO[:TAG|@DIGEST]`): the
//! OCI distribution API v2, read-only.
//!
//! - the manifest is asked for with every media type vroom reads (OCI index
//!   and manifest, Docker manifest list and schema 2); its digest is the
//!   sha256 of the bytes received, checked against a by-digest reference;
//! - a 401 is answered as its `WWW-Authenticate` says: a bearer token from
//!   the realm it names (with the stored credentials, if any), or basic
//!   credentials; credentials come from `$REGISTRY_AUTH_FILE`,
//!   `$XDG_RUNTIME_DIR/containers/auth.json` or `~/.docker/config.json`;
//! - HTTPS with the system's CA store; plain HTTP only with `insecure`, and
//!   only to a loopback or private address.

use std::collections::BTreeMap;
use std::io::Read;
use std::net::IpAddr;
use std::time::Duration;

use super::{
    choose_from, Chosen, Descriptor, ImportImageError, RegistryFailure, Transport,
    MAX_DOCUMENT_BYTES,
};

/// Every manifest media type vroom reads, as the `Accept` header.
const MANIFEST_TYPES: &str = "application/vnd.oci.image.index.v1+json, \
     application/vnd.oci.image.manifest.v1+json, \
     application/vnd.docker.distribution.manifest.list.v2+json, \
     application/vnd.docker.distribution.manifest.v2+json";

pub struct Registry {
    registry: String,
    repository: String,
    reference: String,
    base: String,
    agent: ureq::Agent,
    /// `Authorization` for the next request, once a 401 said what to send.
    authorization: Option<String>,
    /// Stored credentials for this registry, base64 `user:password`.
    credentials: Option<String>,
}

/// Whether `host` (`name[:port]`, `[v6]:port`) is a loopback or private address.
fn private_host(host: &str) -> bool {
    let name = match host.strip_prefix('[') {
        Some(rest) => rest.split(']').next().unwrap_or(rest),
        None => host.rsplit_once(':').map_or(host, |(name, _)| name),
    };
    if name == "localhost" {
        return true;
    }
    match name.parse::<IpAddr>() {
        Ok(IpAddr::V4(ip)) => ip.is_loopback() || ip.is_private() || ip.is_link_local(),
        Ok(IpAddr::V6(ip)) => ip.is_loopback() || (ip.segments()[0] & 0xfe00) == 0xfc00,
        Err(_) => false,
    }
}

/// The parameters of a `WWW-Authenticate` challenge: its scheme, lowercase,
/// and `key="value"` pairs.
fn challenge(header: &str) -> (String, BTreeMap<String, String>) {
    let (scheme, rest) = header.trim().split_once(' ').unwrap_or((header.trim(), ""));
    let mut params = BTreeMap::new();
    let mut rest = rest.trim();
    while let Some((key, after)) = rest.split_once('=') {
        let key = key
            .trim()
            .trim_start_matches(',')
            .trim()
            .to_ascii_lowercase();
        let after = after.trim_start();
        let (value, next) = if let Some(quoted) = after.strip_prefix('"') {
            match quoted.split_once('"') {
                Some((value, next)) => (value, next),
                None => (quoted, ""),
            }
        } else {
            after.split_once(',').unwrap_or((after, ""))
        };
        params.insert(key, value.to_string());
        rest = next.trim_start_matches(',').trim();
    }
    (scheme.to_ascii_lowercase(), params)
}

/// The stored credentials for `registry` (base64 `user:password`), from the
/// first auth file that has them.
fn stored_credentials(registry: &str) -> Option<String> {
    credentials_in(&auth_files(), registry)
}

/// Where credentials are looked for, first first (podman's, then Docker's).
fn auth_files() -> Vec<std::path::PathBuf> {
    let mut files = vec![];
    if let Some(file) = std::env::var_os("REGISTRY_AUTH_FILE") {
        files.push(std::path::PathBuf::from(file));
    }
    if let Some(dir) = std::env::var_os("XDG_RUNTIME_DIR") {
        files.push(std::path::Path::new(&dir).join("containers/auth.json"));
    }
    if let Some(home) = std::env::var_os("HOME") {
        files.push(std::path::Path::new(&home).join(".docker/config.json"));
    }
    files
}

fn credentials_in(files: &[std::path::PathBuf], registry: &str) -> Option<String> {
    let keys: Vec<String> = if registry == "registry-1.docker.io" {
        vec![
            "docker.io".into(),
            "https://index.docker.io/v1/".into(),
            "index.docker.io".into(),
        ]
    } else {
        vec![
            registry.to_string(),
            format!("https://{registry}"),
            format!("http://{registry}"),
        ]
    };
    for file in files {
        let Ok(bytes) = vroom_input::read_input(file, 1 << 20, None) else {
            continue;
        };
        let Ok(doc) = serde_json::from_slice::<serde_json::Value>(&bytes) else {
            tracing::warn!(
                "{} is not JSON; its credentials are ignored",
                file.display()
            );
            continue;
        };
        for key in &keys {
            if let Some(auth) = doc["auths"][key]["auth"].as_str() {
                return Some(auth.to_string());
            }
        }
    }
    None
}

impl Registry {
    pub fn new(
        registry: &str,
        repository: &str,
        reference: &str,
        insecure: bool,
    ) -> Result<Self, ImportImageError> {
        if insecure && !private_host(registry) {
            return Err(ImportImageError::Registry {
                registry: registry.into(),
                reason: "--insecure (plain HTTP) is only for a registry on a loopback or private \
                         address"
                    .into(),
                failure: RegistryFailure::Refused,
            });
        }
        let scheme = if insecure { "http" } else { "https" };
        // A redirect (to a blob store) takes the token along only to the
        // same host, by the same scheme.
        let agent = ureq::AgentBuilder::new()
            .timeout_connect(Duration::from_secs(10))
            .timeout_read(Duration::from_secs(60))
            .redirects(5)
            .redirect_auth_headers(ureq::RedirectAuthHeaders::SameHost)
            .build();
        Ok(Registry {
            registry: registry.into(),
            repository: repository.into(),
            reference: reference.into(),
            base: format!("{scheme}://{registry}"),
            agent,
            authorization: None,
            credentials: stored_credentials(registry),
        })
    }

    fn error(&self, failure: RegistryFailure, reason: String) -> ImportImageError {
        ImportImageError::Registry {
            registry: self.registry.clone(),
            reason,
            failure,
        }
    }

    /// GETs `path` (under `/v2/REPO/`), answering one 401 as it asks.
    fn get(&mut self, path: &str, accept: &str) -> Result<ureq::Response, ImportImageError> {
        let url = format!("{}/v2/{}/{path}", self.base, self.repository);
        let shown = format!("{}/{path}", self.repository);
        for attempt in 0..2 {
            let mut request = self.agent.get(&url).set("Accept", accept);
            if let Some(auth) = &self.authorization {
                request = request.set("Authorization", auth);
            }
            match request.call() {
                Ok(response) => return Ok(response),
                Err(ureq::Error::Status(401, response)) if attempt == 0 => {
                    let header = response
                        .header("www-authenticate")
                        .unwrap_or("")
                        .to_string();
                    self.authorize(&header)?;
                }
                Err(ureq::Error::Status(code, response)) => {
                    let detail: String = response
                        .into_string()
                        .ok()
                        .and_then(|body| {
                            let doc: serde_json::Value = serde_json::from_str(&body).ok()?;
                            doc["errors"][0]["message"].as_str().map(String::from)
                        })
                        .map(|m| format!(": {m}"))
                        .unwrap_or_default();
                    let (what, failure) = match code {
                        401 | 403 => ("access denied", RegistryFailure::Denied),
                        404 => ("not found", RegistryFailure::Missing),
                        500.. => ("failed", RegistryFailure::Failed),
                        _ => ("failed", RegistryFailure::Refused),
                    };
                    return Err(self.error(failure, format!("{shown}: {what} ({code}){detail}")));
                }
                Err(ureq::Error::Transport(e)) => {
                    let hint = if self.base.starts_with("https:") && private_host(&self.registry) {
                        " (a registry that speaks plain HTTP needs --insecure)"
                    } else {
                        ""
                    };
                    return Err(self.error(RegistryFailure::Unreachable, format!("{e}{hint}")));
                }
            }
        }
        Err(self.error(
            RegistryFailure::Denied,
            format!("{shown}: access denied (401) after authenticating"),
        ))
    }

    /// Prepares the `Authorization` a 401's challenge asks for.
    fn authorize(&mut self, header: &str) -> Result<(), ImportImageError> {
        let (scheme, params) = challenge(header);
        match scheme.as_str() {
            "basic" => {
                let Some(credentials) = &self.credentials else {
                    return Err(self.error(
                        RegistryFailure::Denied,
                        "access denied (401): the registry wants credentials and none are stored \
                         (REGISTRY_AUTH_FILE, containers/auth.json, ~/.docker/config.json)"
                            .into(),
                    ));
                };
                self.authorization = Some(format!("Basic {credentials}"));
                Ok(())
            }
            "bearer" => {
                let Some(realm) = params.get("realm") else {
                    return Err(self.error(
                        RegistryFailure::Failed,
                        "access denied (401): a bearer challenge without a realm".into(),
                    ));
                };
                let mut request = self.agent.get(realm);
                if let Some(service) = params.get("service") {
                    request = request.query("service", service);
                }
                let scope = params
                    .get("scope")
                    .cloned()
                    .unwrap_or_else(|| format!("repository:{}:pull", self.repository));
                request = request.query("scope", &scope);
                if let Some(credentials) = &self.credentials {
                    request = request.set("Authorization", &format!("Basic {credentials}"));
                }
                let response = request.call().map_err(|e| {
                    let failure = match &e {
                        ureq::Error::Status(401 | 403, _) => RegistryFailure::Denied,
                        ureq::Error::Status(500.., _) => RegistryFailure::Failed,
                        ureq::Error::Status(..) => RegistryFailure::Refused,
                        ureq::Error::Transport(_) => RegistryFailure::Unreachable,
                    };
                    self.error(
                        failure,
                        format!("cannot get a token from {realm}: {}", one_line(&e)),
                    )
                })?;
                let mut body = String::new();
                response
                    .into_reader()
                    .take(MAX_DOCUMENT_BYTES)
                    .read_to_string(&mut body)
                    .map_err(|e| {
                        self.error(
                            RegistryFailure::Failed,
                            format!("cannot read the token from {realm}: {e}"),
                        )
                    })?;
                let no_token = || {
                    self.error(
                        RegistryFailure::Failed,
                        format!("{realm} answered no token"),
                    )
                };
                let doc: serde_json::Value = serde_json::from_str(&body).map_err(|_| no_token())?;
                let token = doc["token"]
                    .as_str()
                    .or(doc["access_token"].as_str())
                    .ok_or_else(no_token)?;
                self.authorization = Some(format!("Bearer {token}"));
                Ok(())
            }
            _ => Err(self.error(
                RegistryFailure::Failed,
                format!("access denied (401) with a challenge vroom does not answer: {header:?}"),
            )),
        }
    }
}

fn one_line(e: &ureq::Error) -> String {
    match e {
        ureq::Error::Status(code, _) => format!("status {code}"),
        ureq::Error::Transport(t) => t.to_string(),
    }
}

impl Transport for Registry {
    fn choose(&mut self) -> Result<Chosen, ImportImageError> {
        let path = format!("manifests/{}", self.reference);
        let response = self.get(&path, MANIFEST_TYPES)?;
        let mut body = vec![];
        response
            .into_reader()
            .take(MAX_DOCUMENT_BYTES + 1)
            .read_to_end(&mut body)
            .map_err(|e| {
                self.error(
                    RegistryFailure::Failed,
                    format!("{}/{path}: {e}", self.repository),
                )
            })?;
        if body.len() as u64 > MAX_DOCUMENT_BYTES {
            return Err(self.error(
                RegistryFailure::Failed,
                format!(
                    "{}/{path}: the manifest is larger than {MAX_DOCUMENT_BYTES} bytes",
                    self.repository
                ),
            ));
        }
        let digest = format!("sha256:{}", crate::util::sha256_bytes(&body));
        let tag = if self.reference.starts_with("sha256:") {
            if digest != self.reference {
                return Err(ImportImageError::DigestMismatch {
                    digest: self.reference.clone(),
                    actual: digest["sha256:".len()..].to_string(),
                });
            }
            None
        } else {
            Some(self.reference.clone())
        };
        choose_from(self, body, digest, tag)
    }

    fn registry(&self) -> Option<&str> {
        Some(&self.registry)
    }

    fn open_blob(
        &mut self,
        descriptor: &Descriptor,
    ) -> Result<Box<dyn Read + '_>, ImportImageError> {
        // Manifests of an index are manifests, not blobs, to a registry.
        let kind = if descriptor.media_type.contains("manifest")
            || descriptor.media_type.contains("index")
        {
            "manifests"
        } else {
            "blobs"
        };
        let accept = if kind == "manifests" {
            MANIFEST_TYPES
        } else {
            "*/*"
        };
        let response = self.get(&format!("{kind}/{}", descriptor.digest), accept)?;
        Ok(Box::new(response.into_reader()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::oci::blobs::BlobCache;
    use std::io::{BufRead, BufReader, Write};
    use std::net::TcpListener;
    use std::sync::{Arc, Mutex};

    /// A registry that wants a bearer token, then serves `blobs` (path →
    /// status, declared length, body) and records the requests it got.
    fn fake_registry(
        blobs: Vec<(String, u16, usize, Vec<u8>)>,
    ) -> (String, Arc<Mutex<Vec<String>>>) {
        fake_registry_with(blobs, false)
    }

    /// With `basic`, the registry wants basic credentials `user:pw` instead.
    fn fake_registry_with(
        blobs: Vec<(String, u16, usize, Vec<u8>)>,
        basic: bool,
    ) -> (String, Arc<Mutex<Vec<String>>>) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let seen = Arc::new(Mutex::new(vec![]));
        let log = seen.clone();
        let realm = format!("http://{addr}/token");
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let mut reader = BufReader::new(stream.try_clone().unwrap());
                let mut line = String::new();
                reader.read_line(&mut line).unwrap();
                let path = line.split(' ').nth(1).unwrap_or("").to_string();
                let mut authorized = false;
                loop {
                    let mut header = String::new();
                    reader.read_line(&mut header).unwrap();
                    if header.trim().is_empty() {
                        break;
                    }
                    let wanted = if basic {
                        "authorization: basic dxnlcjpwdw==\r\n"
                    } else {
                        "authorization: bearer t0k\r\n"
                    };
                    authorized |= header.eq_ignore_ascii_case(wanted);
                }
                log.lock().unwrap().push(path.clone());
                let (status, length, body, extra) = if path.starts_with("/token?") {
                    (200, 15, br#"{"token":"t0k"}"#.to_vec(), String::new())
                } else if !authorized {
                    let challenge = if basic {
                        "Basic realm=\"fake\"".to_string()
                    } else {
                        format!("Bearer realm=\"{realm}\",service=\"fake\"")
                    };
                    (401, 0, vec![], format!("WWW-Authenticate: {challenge}\r\n"))
                } else {
                    match blobs.iter().find(|(p, ..)| *p == path) {
                        Some((_, status, length, body)) => {
                            (*status, *length, body.clone(), String::new())
                        }
                        None => (404, 0, vec![], String::new()),
                    }
                };
                let mut out = stream;
                let _ = write!(
                    out,
                    "HTTP/1.1 {status} X\r\nContent-Length: {length}\r\nConnection: close\r\n{extra}\r\n"
                );
                let _ = out.write_all(&body);
            }
        });
        (addr, seen)
    }

    /// Credentials are found under the registry's name, as podman and
    /// Docker write it; the first file that has them wins.
    #[test]
    fn credentials_come_from_the_first_auth_file_that_has_them() {
        let dir = tempfile::tempdir().unwrap();
        let podman = dir.path().join("auth.json");
        let docker = dir.path().join("config.json");
        std::fs::write(
            &podman,
            r#"{"auths":{"127.0.0.1:5000":{"auth":"cG9kbWFu"}}}"#,
        )
        .unwrap();
        std::fs::write(
            &docker,
            r#"{"auths":{"127.0.0.1:5000":{"auth":"ZG9ja2Vy"},"https://index.docker.io/v1/":{"auth":"aHVi"},"https://quay.io":{"auth":"cXVheQ=="}}}"#,
        )
        .unwrap();
        let files = [dir.path().join("missing.json"), podman, docker];
        for (registry, want) in [
            ("127.0.0.1:5000", Some("cG9kbWFu")),
            ("registry-1.docker.io", Some("aHVi")),
            ("quay.io", Some("cXVheQ==")),
            ("ghcr.io", None),
        ] {
            assert_eq!(
                credentials_in(&files, registry).as_deref(),
                want,
                "{registry}"
            );
        }
    }

    /// A basic challenge is answered with the stored credentials; without
    /// any, the error says where they are looked for.
    #[test]
    fn a_basic_challenge_is_answered_with_stored_credentials() {
        let manifest = br#"{"schemaVersion":2,"config":{"digest":"sha256:0000000000000000000000000000000000000000000000000000000000000000"},"layers":[]}"#.to_vec();
        let (addr, _) = fake_registry_with(
            vec![("/v2/r/manifests/t".into(), 200, manifest.len(), manifest)],
            true,
        );
        let mut registry = Registry::new(&addr, "r", "t", true).unwrap();
        registry.credentials = None;
        let err = registry.choose().unwrap_err().to_string();
        assert!(err.contains("none are stored"), "{err}");
        // base64 of `user:pw`
        registry.credentials = Some("dXNlcjpwdw==".into());
        registry.authorization = None;
        assert!(registry.choose().unwrap().layers.is_empty());
        registry.credentials = Some("d3Jvbmc6cHc=".into());
        registry.authorization = None;
        let err = registry.choose().unwrap_err().to_string();
        assert!(err.contains("access denied (401)"), "{err}");
    }

    fn descriptor(digest: &str, size: usize) -> Descriptor {
        Descriptor {
            media_type: "application/vnd.oci.image.layer.v1.tar".into(),
            digest: digest.into(),
            size: Some(size as u64),
            platform: None,
            annotations: Default::default(),
        }
    }

    /// The token flow, then a good layer, a truncated one, one whose bytes
    /// are not its digest's and a 500: each a one-line error naming the
    /// blob, and nothing of them in the cache.
    #[test]
    fn a_registry_is_read_with_a_token_and_bad_blobs_are_refused() {
        let layer = b"layer bytes".to_vec();
        let digest = |b: &[u8]| format!("sha256:{}", crate::util::sha256_bytes(b));
        let good = digest(&layer);
        let short = digest(b"a longer layer than sent");
        let wrong = digest(b"other bytes");
        let config = br#"{"architecture":"amd64","os":"linux","rootfs":{"diff_ids":[]}}"#.to_vec();
        let manifest = format!(
            r#"{{"schemaVersion":2,"config":{{"digest":"{}","size":{}}},"layers":[{{"digest":"{good}","size":{}}}]}}"#,
            digest(&config),
            config.len(),
            layer.len()
        )
        .into_bytes();
        let blobs = vec![
            (
                "/v2/r/manifests/t".to_string(),
                200,
                manifest.len(),
                manifest.clone(),
            ),
            (
                "/v2/r/manifests/boom".to_string(),
                500,
                36,
                br#"{"errors":[{"message":"disk full"}]}"#.to_vec(),
            ),
            (
                format!("/v2/r/blobs/{good}"),
                200,
                layer.len(),
                layer.clone(),
            ),
            (
                format!("/v2/r/blobs/{short}"),
                200,
                24,
                b"a longer".to_vec(),
            ),
            (
                format!("/v2/r/blobs/{wrong}"),
                200,
                layer.len(),
                layer.clone(),
            ),
        ];
        let (addr, seen) = fake_registry(blobs);
        let mut registry = Registry::new(&addr, "r", "t", true).unwrap();
        let chosen = registry.choose().unwrap();
        assert_eq!(chosen.digest, digest(&manifest));
        assert_eq!(chosen.layers[0].digest, good);
        assert!(
            seen.lock()
                .unwrap()
                .iter()
                .any(|p| p.starts_with("/token?")),
            "a token was asked for"
        );

        let store = tempfile::tempdir().unwrap();
        let cache = BlobCache::new(store.path());
        let (path, cached) = cache
            .ensure(&mut registry, &descriptor(&good, layer.len()))
            .unwrap();
        assert_eq!(
            (std::fs::read(&path).unwrap(), cached),
            (layer.clone(), false)
        );
        // A blob cut short or with other bytes is the registry's failure
        // (a bad gateway, to try again), not the image's.
        let err = cache
            .ensure(&mut registry, &descriptor(&short, 24))
            .unwrap_err();
        let chain = vroom_base::error_chain(&err);
        assert!(
            chain.contains(&format!(
                "registry {addr} sent a bad blob: cannot read blob {short}"
            )),
            "{chain}"
        );
        assert_eq!(err.code(), vroom_types::ErrorCode::UpstreamError, "{chain}");
        let err = cache
            .ensure(&mut registry, &descriptor(&wrong, layer.len()))
            .unwrap_err();
        let chain = vroom_base::error_chain(&err);
        assert!(
            chain.contains(&format!(
                "registry {addr} sent a bad blob: blob {wrong} does not match its digest"
            )),
            "{chain}"
        );
        assert_eq!(err.code(), vroom_types::ErrorCode::UpstreamError, "{chain}");
        assert_eq!(
            cache.list(),
            vec![good.clone()],
            "only the good layer is cached"
        );
        let left = std::fs::read_dir(store.path().join("blobs/sha256"))
            .unwrap()
            .count();
        assert_eq!(left, 1, "no temporary file is left");

        for (tag, says) in [
            ("boom", "r/manifests/boom: failed (500): disk full"),
            ("nope", "r/manifests/nope: not found (404)"),
        ] {
            let mut registry = Registry::new(&addr, "r", tag, true).unwrap();
            let err = registry.choose().unwrap_err().to_string();
            assert_eq!(err, format!("registry {addr}: {says}"));
        }
    }

    /// A registry's failures answer with the code that fits: one that is
    /// down or answers 5xx is a bad gateway (`upstream_error`, 502); a 404
    /// is `not_found`; a 401 or 403 is the caller's to fix
    /// (`invalid_reference`, 422); plain HTTP to a public host is a bad
    /// argument.
    #[test]
    fn registry_failures_answer_with_fitting_codes() {
        use vroom_types::ErrorCode;
        let problem = |code: u16| {
            let body = br#"{"errors":[{"message":"no"}]}"#.to_vec();
            (format!("/v2/r/manifests/{code}"), code, body.len(), body)
        };
        let (addr, _) = fake_registry(vec![problem(500), problem(503), problem(403)]);
        let code_of = |addr: &str, tag: &str, credentials: Option<&str>| {
            let mut registry = Registry::new(addr, "r", tag, true).unwrap();
            registry.credentials = credentials.map(String::from);
            let err = registry.choose().unwrap_err();
            (err.code(), err.to_string())
        };
        for (tag, want) in [
            ("500", ErrorCode::UpstreamError),
            ("503", ErrorCode::UpstreamError),
            ("403", ErrorCode::InvalidReference),
            ("missing", ErrorCode::NotFound),
        ] {
            let (code, message) = code_of(&addr, tag, None);
            assert_eq!(code, want, "{tag}: {message}");
        }
        // Basic credentials wanted, none stored or the wrong ones: 401.
        let (basic, _) = fake_registry_with(vec![], true);
        for credentials in [None, Some("d3Jvbmc6cHc=")] {
            let (code, message) = code_of(&basic, "t", credentials);
            assert_eq!(code, ErrorCode::InvalidReference, "{message}");
            assert!(message.contains("access denied (401)"), "{message}");
        }
        // Nothing listens on a port just freed.
        let closed = {
            let listener = TcpListener::bind("127.0.0.1:0").unwrap();
            listener.local_addr().unwrap().to_string()
        };
        let (code, message) = code_of(&closed, "t", None);
        assert_eq!(code, ErrorCode::UpstreamError, "{message}");
        let err = Registry::new("quay.io", "a/b", "latest", true)
            .err()
            .unwrap();
        assert_eq!(err.code(), ErrorCode::InvalidArgument);
    }

    #[test]
    fn challenges_parse_and_only_private_hosts_go_plain() {
        let (scheme, params) = challenge(
            r#"Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:library/nginx:pull""#,
        );
        assert_eq!(scheme, "bearer");
        assert_eq!(params["realm"], "https://auth.docker.io/token");
        assert_eq!(params["service"], "registry.docker.io");
        assert_eq!(params["scope"], "repository:library/nginx:pull");
        let (scheme, params) = challenge(r#"Basic realm="Registry Realm""#);
        assert_eq!(
            (scheme.as_str(), params["realm"].as_str()),
            ("basic", "Registry Realm")
        );
        for (host, private) in [
            ("127.0.0.1:5000", true),
            ("localhost:5000", true),
            ("10.1.2.3", true),
            ("192.168.0.9:443", true),
            ("[::1]:5000", true),
            ("8.8.8.8:5000", false),
            ("registry.example.com", false),
        ] {
            assert_eq!(private_host(host), private, "{host}");
        }
        let err = Registry::new("quay.io", "a/b", "latest", true)
            .err()
            .unwrap()
            .to_string();
        assert!(
            err.contains("only for a registry on a loopback or private"),
            "{err}"
        );
    }
}
