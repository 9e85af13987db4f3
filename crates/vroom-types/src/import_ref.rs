//! What `vroom image import REF` takes: the transports of skopeo's syntax.

use std::fmt;
use std::path::PathBuf;

/// Why a reference is not one `vroom image import` takes.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{reason}")]
pub struct ParseImportReferenceError {
    pub reason: String,
}

/// Where an image to import is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ImportReference {
    /// `oci:DIR[:TAG]`: an OCI image layout directory.
    OciDir { dir: PathBuf, tag: Option<String> },
    /// `oci-archive:FILE`: an OCI image layout in a tar file.
    OciArchive { file: PathBuf },
    /// `docker-archive:FILE`: what `docker save` and `podman save` write.
    DockerArchive { file: PathBuf },
    /// `docker://HOST[:PORT]/REPO[:TAG|@DIGEST]`: a registry (distribution API v2).
    Registry {
        /// `host[:port]` as written (Docker Hub's is `registry-1.docker.io`).
        registry: String,
        repository: String,
        /// A tag or a `sha256:` digest.
        reference: String,
    },
}

const USAGE: &str =
    "oci:DIR[:TAG], oci-archive:FILE, docker-archive:FILE or docker://HOST[:PORT]/REPO[:TAG]";

fn valid_tag(tag: &str) -> bool {
    !tag.is_empty()
        && tag.len() <= 128
        && tag
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
        && !tag.starts_with(['.', '-'])
}

fn valid_repository(repo: &str) -> bool {
    !repo.is_empty()
        && repo.split('/').all(|part| {
            !part.is_empty()
                && part
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b))
        })
}

impl std::str::FromStr for ImportReference {
    type Err = ParseImportReferenceError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = |reason: String| ParseImportReferenceError { reason };
        let Some((transport, rest)) = s.split_once(':') else {
            return Err(bad(format!("{s:?} names no transport: {USAGE}")));
        };
        let path = |p: &str| {
            let path = PathBuf::from(p);
            if p.is_empty() || !path.is_absolute() {
                return Err(bad(format!("{s}: the path must be absolute")));
            }
            Ok(path)
        };
        match transport {
            "oci" => {
                // A tag is what follows the last colon, unless that is
                // part of the path.
                let (dir, tag) = match rest.rsplit_once(':') {
                    Some((dir, tag)) if !tag.contains('/') => {
                        if !valid_tag(tag) {
                            return Err(bad(format!("{s}: {tag:?} is not a valid tag")));
                        }
                        (dir, Some(tag.to_string()))
                    }
                    _ => (rest, None),
                };
                Ok(ImportReference::OciDir {
                    dir: path(dir)?,
                    tag,
                })
            }
            "oci-archive" => Ok(ImportReference::OciArchive { file: path(rest)? }),
            "docker-archive" => Ok(ImportReference::DockerArchive { file: path(rest)? }),
            "docker" => {
                let Some(rest) = rest.strip_prefix("//") else {
                    return Err(bad(format!("{s}: write docker://HOST/REPO[:TAG]")));
                };
                let (name, reference) = match rest.split_once('@') {
                    Some((name, digest)) => {
                        let hex = digest.strip_prefix("sha256:").unwrap_or_default();
                        let valid = hex.len() == 64
                            && hex
                                .bytes()
                                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
                        if !valid {
                            return Err(bad(format!("{s}: {digest:?} is not a sha256 digest")));
                        }
                        (name, digest.to_string())
                    }
                    None => match rest.rsplit_once(':') {
                        Some((name, tag)) if !tag.contains('/') => {
                            if !valid_tag(tag) {
                                return Err(bad(format!("{s}: {tag:?} is not a valid tag")));
                            }
                            (name, tag.to_string())
                        }
                        _ => (rest, "latest".to_string()),
                    },
                };
                // The first part is a registry when it looks like a host.
                let (registry, repository) = match name.split_once('/') {
                    Some((host, repo))
                        if host.contains('.') || host.contains(':') || host == "localhost" =>
                    {
                        (host.to_string(), repo.to_string())
                    }
                    Some(_) => ("registry-1.docker.io".to_string(), name.to_string()),
                    None => (
                        "registry-1.docker.io".to_string(),
                        format!("library/{name}"),
                    ),
                };
                if !valid_repository(&repository) {
                    return Err(bad(format!(
                        "{s}: {repository:?} is not a valid repository name"
                    )));
                }
                Ok(ImportReference::Registry {
                    registry,
                    repository,
                    reference,
                })
            }
            other => Err(bad(format!("unknown transport {other:?} in {s}: {USAGE}"))),
        }
    }
}

impl fmt::Display for ImportReference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ImportReference::OciDir { dir, tag: None } => write!(f, "oci:{}", dir.display()),
            ImportReference::OciDir { dir, tag: Some(t) } => {
                write!(f, "oci:{}:{t}", dir.display())
            }
            ImportReference::OciArchive { file } => write!(f, "oci-archive:{}", file.display()),
            ImportReference::DockerArchive { file } => {
                write!(f, "docker-archive:{}", file.display())
            }
            ImportReference::Registry {
                registry,
                repository,
                reference,
            } => {
                let sep = if reference.starts_with("sha256:") {
                    '@'
                } else {
                    ':'
                };
                write!(f, "docker://{registry}/{repository}{sep}{reference}")
            }
        }
    }
}

impl ImportReference {
    /// The image name an import gets unless one is given: the repository's
    /// or the file's last part, made a valid name.
    pub fn default_name(&self) -> String {
        let base = match self {
            ImportReference::OciDir { dir, .. } => dir
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
            ImportReference::OciArchive { file } | ImportReference::DockerArchive { file } => file
                .file_stem()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
            ImportReference::Registry { repository, .. } => repository
                .rsplit('/')
                .next()
                .unwrap_or(repository)
                .to_string(),
        };
        let mut name: String = base
            .to_ascii_lowercase()
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
            .collect();
        name = name.trim_matches('-').to_string();
        if !name.starts_with(|c: char| c.is_ascii_lowercase()) {
            name = format!("oci-{name}");
        }
        name.truncate(crate::MAX_NAME_LEN);
        name.trim_end_matches('-').to_string()
    }

    /// The local file the reference reads, if it is local.
    pub fn local_path(&self) -> Option<&std::path::Path> {
        match self {
            ImportReference::OciDir { dir, .. } => Some(dir),
            ImportReference::OciArchive { file } | ImportReference::DockerArchive { file } => {
                Some(file)
            }
            ImportReference::Registry { .. } => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references_parse_by_transport() {
        let ok = |s: &str| s.parse::<ImportReference>().unwrap();
        let cases: &[(&str, ImportReference)] = &[
            (
                "oci:/srv/img:v1",
                ImportReference::OciDir {
                    dir: "/srv/img".into(),
                    tag: Some("v1".into()),
                },
            ),
            (
                "oci:/srv/img",
                ImportReference::OciDir {
                    dir: "/srv/img".into(),
                    tag: None,
                },
            ),
            (
                "oci-archive:/tmp/a.tar",
                ImportReference::OciArchive {
                    file: "/tmp/a.tar".into(),
                },
            ),
            (
                "docker-archive:/tmp/d.tar",
                ImportReference::DockerArchive {
                    file: "/tmp/d.tar".into(),
                },
            ),
            (
                "docker://127.0.0.1:5000/web/httpd:1.0",
                ImportReference::Registry {
                    registry: "127.0.0.1:5000".into(),
                    repository: "web/httpd".into(),
                    reference: "1.0".into(),
                },
            ),
            (
                "docker://nginx",
                ImportReference::Registry {
                    registry: "registry-1.docker.io".into(),
                    repository: "library/nginx".into(),
                    reference: "latest".into(),
                },
            ),
        ];
        for (text, want) in cases {
            assert_eq!(&ok(text), want, "{text}");
            assert_eq!(&ok(&want.to_string()), want, "{text} round-trips");
        }
        let digest = format!("docker://localhost:5000/a@sha256:{}", "a".repeat(64));
        assert_eq!(ok(&digest).to_string(), digest);
        for (text, says) in [
            ("nginx", "names no transport"),
            ("ftp:/x", "unknown transport \"ftp\""),
            ("oci:relative", "must be absolute"),
            ("docker://host.io/Repo", "not a valid repository"),
            ("docker://host.io/r@sha256:12", "not a sha256 digest"),
            ("oci:/srv/img:bad tag", "not a valid tag"),
        ] {
            let err = text.parse::<ImportReference>().unwrap_err().to_string();
            assert!(err.contains(says), "{text}: {err}");
        }
        assert_eq!(ok("docker://h.io/a/my_app:1").default_name(), "my-app");
        assert_eq!(ok("oci-archive:/t/1web.tar").default_name(), "oci-1web");
    }
}
