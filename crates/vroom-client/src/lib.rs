//! The typed vroomd client, used by the CLI and the end-to-end tests. One
//! HTTP/1.1 connection per request over the daemon's unix socket.

use std::path::{Path, PathBuf};

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::{Method, Request};
use hyper_util::rt::TokioIo;
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::net::UnixStream;
use vroom_types::{
    ActionRequest, ApiErrorBody, BuildEvent, BuildImageRequest, BuildReport, ConfigDiff,
    ConfigDocument, ConfigHistory, ConfigRollback, ConfigUpdate, ConfigValues, ConfigVersion,
    ErrorCode, ExecRequest, ExecResult, ImageSummary, Instance, InstanceAction, LogChunk, Network,
    NetworkSpec, RunRequest, VersionInfo,
};

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot connect to vroomd at {socket}")]
    Connect {
        socket: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{message}")]
    Api {
        status: u16,
        code: ErrorCode,
        message: String,
    },
    #[error("HTTP exchange with vroomd failed")]
    Http(#[from] hyper::Error),
    #[error("vroomd sent an unexpected answer (HTTP {status}): {body}")]
    Unexpected { status: u16, body: String },
}

impl ClientError {
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            ClientError::Api { code, .. } => Some(*code),
            _ => None,
        }
    }
}

#[derive(Debug, Clone)]
pub struct Client {
    socket: PathBuf,
}

impl Client {
    pub fn new(socket: &Path) -> Self {
        Client {
            socket: socket.to_path_buf(),
        }
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    async fn call<B: Serialize, T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<&B>,
    ) -> Result<T, ClientError> {
        let bytes = self.raw(method, path, body).await?;
        let bytes = if bytes.is_empty() {
            Bytes::from_static(b"null")
        } else {
            bytes
        };
        serde_json::from_slice(&bytes).map_err(|_| ClientError::Unexpected {
            status: 200,
            body: String::from_utf8_lossy(&bytes).chars().take(200).collect(),
        })
    }

    async fn raw<B: Serialize>(
        &self,
        method: Method,
        path: &str,
        body: Option<&B>,
    ) -> Result<Bytes, ClientError> {
        let response = self.send(method, path, body).await?;
        let status = response.status();
        let bytes = response.into_body().collect().await?.to_bytes();
        if status.is_success() {
            return Ok(bytes);
        }
        Err(error_from(status.as_u16(), &bytes))
    }

    /// Sends a request; the response body is left to the caller.
    async fn send<B: Serialize>(
        &self,
        method: Method,
        path: &str,
        body: Option<&B>,
    ) -> Result<hyper::Response<hyper::body::Incoming>, ClientError> {
        let stream =
            UnixStream::connect(&self.socket)
                .await
                .map_err(|source| ClientError::Connect {
                    socket: self.socket.clone(),
                    source,
                })?;
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        tokio::spawn(conn);
        let payload = match body {
            Some(b) => {
                Bytes::from(serde_json::to_vec(b).expect("invariant: request bodies serialize"))
            }
            None => Bytes::new(),
        };
        let request = Request::builder()
            .method(method)
            .uri(path)
            .header("host", "vroomd")
            .header("content-type", "application/json")
            .body(Full::new(payload))
            .expect("invariant: a valid request");
        Ok(sender.send_request(request).await?)
    }

    pub async fn version(&self) -> Result<VersionInfo, ClientError> {
        self.call::<(), _>(Method::GET, "/v1/version", None).await
    }

    pub async fn run(&self, req: &RunRequest) -> Result<Instance, ClientError> {
        self.call(Method::POST, "/v1/instances", Some(req)).await
    }

    pub async fn list(&self) -> Result<Vec<Instance>, ClientError> {
        self.call::<(), _>(Method::GET, "/v1/instances", None).await
    }

    pub async fn get(&self, name: &str) -> Result<Instance, ClientError> {
        self.call::<(), _>(Method::GET, &format!("/v1/instances/{}", enc(name)), None)
            .await
    }

    pub async fn remove(&self, name: &str, force: bool) -> Result<(), ClientError> {
        self.raw::<()>(
            Method::DELETE,
            &format!("/v1/instances/{}?force={force}", enc(name)),
            None,
        )
        .await
        .map(|_| ())
    }

    pub async fn action(
        &self,
        name: &str,
        action: InstanceAction,
    ) -> Result<Instance, ClientError> {
        self.call(
            Method::POST,
            &format!("/v1/instances/{}/actions", enc(name)),
            Some(&ActionRequest { action }),
        )
        .await
    }

    pub async fn exec(&self, name: &str, req: &ExecRequest) -> Result<ExecResult, ClientError> {
        self.call(
            Method::POST,
            &format!("/v1/instances/{}/exec", enc(name)),
            Some(req),
        )
        .await
    }

    /// The bytes of a regular file in a running guest.
    pub async fn read_file(&self, name: &str, path: &str) -> Result<Bytes, ClientError> {
        self.raw::<()>(
            Method::GET,
            &format!("/v1/instances/{}/files?path={}", enc(name), enc(path)),
            None,
        )
        .await
    }

    pub async fn logs(&self, name: &str, offset: u64) -> Result<LogChunk, ClientError> {
        self.boot_logs(name, 0, offset).await
    }

    /// The console of boot `boot`: 0 the current one, -1 the one before...
    pub async fn boot_logs(
        &self,
        name: &str,
        boot: i32,
        offset: u64,
    ) -> Result<LogChunk, ClientError> {
        self.call::<(), _>(
            Method::GET,
            &format!(
                "/v1/instances/{}/logs?offset={offset}&boot={boot}",
                enc(name)
            ),
            None,
        )
        .await
    }

    pub async fn config_get(&self, name: &str) -> Result<ConfigValues, ClientError> {
        let doc: ConfigDocument = self
            .call::<(), _>(
                Method::GET,
                &format!("/v1/instances/{}/config", enc(name)),
                None,
            )
            .await?;
        Ok(doc.values)
    }

    pub async fn config_set(
        &self,
        name: &str,
        set: ConfigValues,
    ) -> Result<ConfigValues, ClientError> {
        let doc: ConfigDocument = self
            .call(
                Method::PATCH,
                &format!("/v1/instances/{}/config", enc(name)),
                Some(&ConfigUpdate { set }),
            )
            .await?;
        Ok(doc.values)
    }

    pub async fn config_replace(
        &self,
        name: &str,
        values: ConfigValues,
    ) -> Result<ConfigValues, ClientError> {
        let doc: ConfigDocument = self
            .call(
                Method::PUT,
                &format!("/v1/instances/{}/config", enc(name)),
                Some(&ConfigDocument { values }),
            )
            .await?;
        Ok(doc.values)
    }

    pub async fn config_reset(&self, name: &str) -> Result<ConfigValues, ClientError> {
        let doc: ConfigDocument = self
            .call::<(), _>(
                Method::POST,
                &format!("/v1/instances/{}/config/reset", enc(name)),
                None,
            )
            .await?;
        Ok(doc.values)
    }

    pub async fn config_history(&self, name: &str) -> Result<ConfigHistory, ClientError> {
        self.call::<(), _>(
            Method::GET,
            &format!("/v1/instances/{}/config/history", enc(name)),
            None,
        )
        .await
    }

    pub async fn config_version(
        &self,
        name: &str,
        version: u64,
    ) -> Result<ConfigVersion, ClientError> {
        self.call::<(), _>(
            Method::GET,
            &format!("/v1/instances/{}/config/versions/{version}", enc(name)),
            None,
        )
        .await
    }

    /// The keys that differ from `from` to `to` (by default the previous and the current version).
    pub async fn config_diff(
        &self,
        name: &str,
        from: Option<u64>,
        to: Option<u64>,
    ) -> Result<ConfigDiff, ClientError> {
        let mut query: Vec<String> = vec![];
        if let Some(v) = from {
            query.push(format!("from={v}"));
        }
        if let Some(v) = to {
            query.push(format!("to={v}"));
        }
        let query = if query.is_empty() {
            String::new()
        } else {
            format!("?{}", query.join("&"))
        };
        self.call::<(), _>(
            Method::GET,
            &format!("/v1/instances/{}/config/diff{query}", enc(name)),
            None,
        )
        .await
    }

    /// Restores an earlier version's values (by default the previous version's) as a new version.
    pub async fn config_rollback(
        &self,
        name: &str,
        version: Option<u64>,
    ) -> Result<ConfigValues, ClientError> {
        let doc: ConfigDocument = self
            .call(
                Method::POST,
                &format!("/v1/instances/{}/config/rollback", enc(name)),
                Some(&ConfigRollback { version }),
            )
            .await?;
        Ok(doc.values)
    }

    pub async fn networks(&self) -> Result<Vec<Network>, ClientError> {
        self.call::<(), _>(Method::GET, "/v1/networks", None).await
    }

    pub async fn network(&self, name: &str) -> Result<Network, ClientError> {
        self.call::<(), _>(Method::GET, &format!("/v1/networks/{}", enc(name)), None)
            .await
    }

    pub async fn create_network(&self, spec: &NetworkSpec) -> Result<Network, ClientError> {
        self.call(Method::POST, "/v1/networks", Some(spec)).await
    }

    pub async fn remove_network(&self, name: &str) -> Result<(), ClientError> {
        self.raw::<()>(Method::DELETE, &format!("/v1/networks/{}", enc(name)), None)
            .await
            .map(|_| ())
    }

    pub async fn images(&self) -> Result<Vec<ImageSummary>, ClientError> {
        self.call::<(), _>(Method::GET, "/v1/images", None).await
    }

    /// Builds an image, calling `on_progress(stage, detail)` as the daemon reports.
    pub async fn build_image(
        &self,
        recipe: &Path,
        update: bool,
        mut on_progress: impl FnMut(&str, &str),
    ) -> Result<BuildReport, ClientError> {
        let req = BuildImageRequest {
            recipe: recipe.display().to_string(),
            update,
        };
        let response = self
            .send(Method::POST, "/v1/images/build", Some(&req))
            .await?;
        let status = response.status().as_u16();
        if !response.status().is_success() {
            let bytes = response.into_body().collect().await?.to_bytes();
            return Err(error_from(status, &bytes));
        }
        let mut body = response.into_body();
        let mut pending = Vec::new();
        while let Some(frame) = body.frame().await {
            let Ok(data) = frame?.into_data() else {
                continue;
            };
            pending.extend_from_slice(&data);
            while let Some(end) = pending.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = pending.drain(..=end).collect();
                let event: BuildEvent =
                    serde_json::from_slice(&line).map_err(|_| ClientError::Unexpected {
                        status,
                        body: String::from_utf8_lossy(&line).chars().take(200).collect(),
                    })?;
                match event {
                    BuildEvent::Progress { stage, detail } => on_progress(&stage, &detail),
                    BuildEvent::Done { report } => return Ok(*report),
                    BuildEvent::Error { error } => {
                        return Err(ClientError::Api {
                            status,
                            code: error.code,
                            message: error.message,
                        })
                    }
                }
            }
        }
        Err(ClientError::Unexpected {
            status,
            body: "the build stream ended without a result".into(),
        })
    }

    pub async fn remove_image(&self, reference: &str) -> Result<(), ClientError> {
        self.raw::<()>(
            Method::DELETE,
            &format!("/v1/images/{}", enc(reference)),
            None,
        )
        .await
        .map(|_| ())
    }

    /// Removes the builds no name points to and no instance uses.
    pub async fn prune_images(&self) -> Result<Vec<ImageSummary>, ClientError> {
        self.call::<(), _>(Method::POST, "/v1/images/prune", None)
            .await
    }

    pub async fn image(&self, reference: &str) -> Result<ImageSummary, ClientError> {
        self.call::<(), _>(Method::GET, &format!("/v1/images/{}", enc(reference)), None)
            .await
    }
}

/// Percent-encodes a path segment so that any user text stays one segment.
/// The error an unsuccessful answer carries.
fn error_from(status: u16, bytes: &[u8]) -> ClientError {
    match serde_json::from_slice::<ApiErrorBody>(bytes) {
        Ok(err) => ClientError::Api {
            status,
            code: err.code,
            message: err.message,
        },
        Err(_) => ClientError::Unexpected {
            status,
            body: String::from_utf8_lossy(bytes).into_owned(),
        },
    }
}

fn enc(segment: &str) -> String {
    let mut out = String::with_capacity(segment.len());
    for b in segment.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn segments_are_encoded() {
        assert_eq!(super::enc("web-1"), "web-1");
        assert_eq!(super::enc("../etc"), "..%2Fetc");
        assert_eq!(super::enc("a b?"), "a%20b%3F");
    }
}
