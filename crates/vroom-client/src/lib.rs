//! The typed vroomd client, used by the CLI and the end-to-end tests. One
//! HTTP/1.1 connection per request over the daemon's unix socket, or over
//! TCP with mutual TLS to a cluster node ([`Client::remote`]).

use std::path::{Path, PathBuf};

use http_body_util::{BodyExt, Channel, Full};
use hyper::body::Bytes;
use hyper::{Method, Request};
use hyper_util::rt::TokioIo;
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::UnixStream;
use vroom_types::{
    ActionRequest, ApiErrorBody, BuildEvent, BuildImageRequest, BuildReport, CappedOutput,
    ConfigDiff, ConfigDocument, ConfigHistory, ConfigRollback, ConfigUpdate, ConfigValues,
    ConfigVersion, ErrorCode, ExecEvent, ExecRequest, ExecResult, ImageSummary, Instance,
    InstanceAction, LogChunk, Network, NetworkSpec, RunRequest, VersionInfo,
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
    #[error("cannot reach vroomd at {host}: {reason}")]
    Remote { host: String, reason: String },
    #[error("HTTP exchange with vroomd failed")]
    Http(#[from] hyper::Error),
    #[error("vroomd sent an unexpected answer (HTTP {status}): {body}")]
    Unexpected { status: u16, body: String },
    #[error("cannot write the output")]
    Write(#[source] std::io::Error),
}

impl ClientError {
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            ClientError::Api { code, .. } => Some(*code),
            _ => None,
        }
    }
}

pub mod tls;

/// A vroomd on another host: its address and the TLS to reach it with.
#[derive(Clone)]
struct Remote {
    host: String,
    addr: String,
    config: std::sync::Arc<rustls::ClientConfig>,
}

impl std::fmt::Debug for Remote {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Remote").field("addr", &self.addr).finish()
    }
}

trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

#[derive(Debug, Clone)]
pub struct Client {
    socket: PathBuf,
    remote: Option<Remote>,
}

impl Client {
    pub fn new(socket: &Path) -> Self {
        Client {
            socket: socket.to_path_buf(),
            remote: None,
        }
    }

    /// A cluster node's vroomd at `host` (`HOST` or `HOST:PORT`; the port
    /// defaults to [`tls::API_PORT`]), with the CA and certificate in `tls_dir`.
    pub fn remote(host: &str, tls_dir: &Path) -> Result<Self, ClientError> {
        let failed = |reason: String| ClientError::Remote {
            host: host.to_string(),
            reason,
        };
        let (name, addr) = match host.rsplit_once(':') {
            Some((name, port)) if port.parse::<u16>().is_ok() && !name.contains(':') => {
                (name.to_string(), host.to_string())
            }
            _ => (host.to_string(), format!("{host}:{}", tls::API_PORT)),
        };
        let config = tls::client_config(tls_dir).map_err(failed)?;
        Ok(Client {
            socket: PathBuf::from(&addr),
            remote: Some(Remote {
                host: name,
                addr,
                config,
            }),
        })
    }

    /// With TLS 1.3 a server refuses a client certificate after the
    /// handshake: the refusal shows as the first exchange failing.
    fn exchange_error(&self, e: hyper::Error) -> ClientError {
        let mut text = e.to_string();
        let mut source = std::error::Error::source(&e);
        while let Some(s) = source {
            text = format!("{text}: {s}");
            source = s.source();
        }
        match &self.remote {
            Some(remote) if text.contains("alert") => ClientError::Remote {
                host: remote.addr.clone(),
                reason: format!("it refused the certificate in the TLS directory ({text})"),
            },
            // The server may drop the connection before its alert is read.
            Some(remote) => ClientError::Remote {
                host: remote.addr.clone(),
                reason: format!(
                    "the connection broke off ({text}); is the certificate in the TLS directory from this cluster's CA?"
                ),
            },
            None => ClientError::Http(e),
        }
    }

    /// One connection to vroomd, local or remote.
    async fn connect(&self) -> Result<Box<dyn Io>, ClientError> {
        let Some(remote) = &self.remote else {
            let stream =
                UnixStream::connect(&self.socket)
                    .await
                    .map_err(|source| ClientError::Connect {
                        socket: self.socket.clone(),
                        source,
                    })?;
            return Ok(Box::new(stream));
        };
        let failed = |reason: String| ClientError::Remote {
            host: remote.addr.clone(),
            reason,
        };
        let tcp = tokio::time::timeout(
            std::time::Duration::from_secs(5),
            tokio::net::TcpStream::connect(&remote.addr),
        )
        .await
        .map_err(|_| failed("timed out".into()))?
        .map_err(|e| failed(e.to_string()))?;
        let name = rustls::pki_types::ServerName::try_from(remote.host.clone())
            .map_err(|e| failed(e.to_string()))?;
        let tls = tokio_rustls::TlsConnector::from(remote.config.clone())
            .connect(name, tcp)
            .await
            .map_err(|e| failed(format!("TLS: {e}")))?;
        Ok(Box::new(tls))
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// GET `path`: its JSON answer.
    async fn fetch<T: DeserializeOwned>(&self, path: &str) -> Result<T, ClientError> {
        self.call::<(), _>(Method::GET, path, None).await
    }

    /// DELETE `path`, whose answer has no body.
    async fn delete(&self, path: &str) -> Result<(), ClientError> {
        self.raw::<()>(Method::DELETE, path, None).await.map(|_| ())
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

    /// Sends a request with a streamed body; the response body is left to the caller.
    async fn send_body(
        &self,
        method: Method,
        path: &str,
        content_type: &str,
        body: Channel<Bytes>,
    ) -> Result<hyper::Response<hyper::body::Incoming>, ClientError> {
        let stream = self.connect().await?;
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        tokio::spawn(conn);
        let request = Request::builder()
            .method(method)
            .uri(path)
            .header("host", "vroomd")
            .header("content-type", content_type)
            .body(body)
            .expect("invariant: a valid request");
        sender
            .send_request(request)
            .await
            .map_err(|e| self.exchange_error(e))
    }

    /// Sends a request; the response body is left to the caller.
    async fn send<B: Serialize>(
        &self,
        method: Method,
        path: &str,
        body: Option<&B>,
    ) -> Result<hyper::Response<hyper::body::Incoming>, ClientError> {
        let stream = self.connect().await?;
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
        sender
            .send_request(request)
            .await
            .map_err(|e| self.exchange_error(e))
    }

    /// Sends `request` as it is, over a connection of its own, and returns
    /// vroomd's answer as it is, its body streaming (`vroom ui`'s proxy:
    /// pages, the event stream, the JSON API). Only `Host` is set.
    pub async fn forward<B>(
        &self,
        mut request: Request<B>,
    ) -> Result<hyper::Response<hyper::body::Incoming>, ClientError>
    where
        B: hyper::body::Body + Send + 'static,
        B::Data: Send,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let stream = self.connect().await?;
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        tokio::spawn(conn);
        request.headers_mut().insert(
            hyper::header::HOST,
            hyper::header::HeaderValue::from_static("vroomd"),
        );
        sender
            .send_request(request)
            .await
            .map_err(|e| self.exchange_error(e))
    }

    pub async fn version(&self) -> Result<VersionInfo, ClientError> {
        self.fetch("/v1/version").await
    }

    pub async fn run(&self, req: &RunRequest) -> Result<Instance, ClientError> {
        self.call(Method::POST, "/v1/instances", Some(req)).await
    }

    pub async fn list(&self) -> Result<Vec<Instance>, ClientError> {
        self.fetch("/v1/instances").await
    }

    pub async fn get(&self, name: &str) -> Result<Instance, ClientError> {
        self.fetch(&format!("/v1/instances/{}", enc(name))).await
    }

    /// Instance `name` once it is no longer starting (or restarting), or
    /// as it is after `wait` (whole seconds, at most a minute): vroomd
    /// answers when it changes. Without the guest's `health`.
    pub async fn get_settled(
        &self,
        name: &str,
        wait: std::time::Duration,
    ) -> Result<Instance, ClientError> {
        let secs = wait.as_secs().min(vroom_types::limits::WAIT_SECS.max);
        self.fetch(&format!("/v1/instances/{}?wait_secs={secs}", enc(name)))
            .await
    }

    pub async fn remove(&self, name: &str, force: bool) -> Result<(), ClientError> {
        self.delete(&format!("/v1/instances/{}?force={force}", enc(name)))
            .await
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

    /// Runs a command in a guest and collects its output as text (invalid
    /// UTF-8 replaced, the first [`vroom_types::MAX_EXEC_RESULT_BYTES`] of
    /// each stream); for all the bytes and stdin use [`Client::exec_stream`].
    pub async fn exec(&self, name: &str, req: &ExecRequest) -> Result<ExecResult, ClientError> {
        let req = ExecRequest {
            stdin: false,
            ..req.clone()
        };
        let (mut events, _) = self.exec_stream(name, &req).await?;
        let (mut stdout, mut stderr) = (CappedOutput::default(), CappedOutput::default());
        while let Some(event) = events.next().await {
            match event? {
                ExecEvent::Stdout { data } => stdout.push(&data),
                ExecEvent::Stderr { data } => stderr.push(&data),
                ExecEvent::Exit(exit) => {
                    return Ok(ExecResult {
                        exit_code: exit.exit_code,
                        stdout: stdout.text(),
                        stderr: stderr.text(),
                        stdout_truncated: stdout.truncated(),
                        stderr_truncated: stderr.truncated(),
                        message: exit.message,
                    })
                }
                ExecEvent::Error { error } => return Err(api_error(events.status, error)),
            }
        }
        Err(events.ended_early())
    }

    /// Starts a command in a guest. Its output and exit arrive through the
    /// returned [`ExecEvents`]; with `req.stdin` the [`ExecInput`] feeds its
    /// stdin (dropping it closes stdin). Dropping the events kills the command.
    pub async fn exec_stream(
        &self,
        name: &str,
        req: &ExecRequest,
    ) -> Result<(ExecEvents, Option<ExecInput>), ClientError> {
        let (mut tx, body) = Channel::<Bytes>::new(4);
        let mut line = serde_json::to_vec(req).expect("invariant: request bodies serialize");
        line.push(b'\n');
        tx.send_data(Bytes::from(line))
            .await
            .map_err(|_| ClientError::Unexpected {
                status: 0,
                body: "the request body closed early".into(),
            })?;
        let input = req.stdin.then_some(ExecInput { tx });
        let path = format!("/v1/instances/{}/exec", enc(name));
        let response = self
            .send_body(Method::POST, &path, "application/x-ndjson", body)
            .await?;
        let status = response.status().as_u16();
        if !response.status().is_success() {
            let bytes = response.into_body().collect().await?.to_bytes();
            return Err(error_from(status, &bytes));
        }
        Ok((JsonLines::new(response), input))
    }

    /// The event log (`GET /v1/events`): history, then live events when
    /// the query follows.
    pub async fn events(
        &self,
        query: &vroom_types::EventQuery,
    ) -> Result<JsonLines<vroom_types::EventLine>, ClientError> {
        let pairs: Vec<String> = query
            .to_pairs()
            .into_iter()
            .map(|(k, v)| format!("{k}={}", enc(&v)))
            .collect();
        let path = format!("/v1/events?{}", pairs.join("&"));
        let response = self.send::<()>(Method::GET, &path, None).await?;
        if !response.status().is_success() {
            let status = response.status().as_u16();
            let bytes = response.into_body().collect().await?.to_bytes();
            return Err(error_from(status, &bytes));
        }
        Ok(JsonLines::new(response))
    }

    /// Streams a regular file out of a running guest into `out`; returns
    /// the bytes written. A copy that fails midway returns an error.
    pub async fn read_file_to(
        &self,
        name: &str,
        path: &str,
        out: &mut (impl tokio::io::AsyncWrite + Unpin),
    ) -> Result<u64, ClientError> {
        use tokio::io::AsyncWriteExt;
        let response = self
            .send::<()>(
                Method::GET,
                &format!("/v1/instances/{}/files?path={}", enc(name), enc(path)),
                None,
            )
            .await?;
        let status = response.status().as_u16();
        if !response.status().is_success() {
            let bytes = response.into_body().collect().await?.to_bytes();
            return Err(error_from(status, &bytes));
        }
        let mut body = response.into_body();
        let mut written = 0;
        while let Some(frame) = body.frame().await {
            let Ok(data) = frame?.into_data() else {
                continue;
            };
            out.write_all(&data).await.map_err(ClientError::Write)?;
            written += data.len() as u64;
        }
        out.flush().await.map_err(ClientError::Write)?;
        Ok(written)
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
        self.fetch(&format!(
            "/v1/instances/{}/logs?offset={offset}&boot={boot}",
            enc(name)
        ))
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
        self.fetch(&format!("/v1/instances/{}/config/history", enc(name)))
            .await
    }

    pub async fn config_version(
        &self,
        name: &str,
        version: u64,
    ) -> Result<ConfigVersion, ClientError> {
        self.fetch(&format!(
            "/v1/instances/{}/config/versions/{version}",
            enc(name)
        ))
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
        self.fetch(&format!("/v1/instances/{}/config/diff{query}", enc(name)))
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

    /// Removes an instance and, with `volumes`, its data volumes.
    pub async fn remove_with_volumes(&self, name: &str, force: bool) -> Result<(), ClientError> {
        self.delete(&format!(
            "/v1/instances/{}?force={force}&volumes=true",
            enc(name)
        ))
        .await
    }

    pub async fn volumes(&self) -> Result<Vec<vroom_types::Volume>, ClientError> {
        self.fetch("/v1/volumes").await
    }

    pub async fn volume(&self, name: &str) -> Result<vroom_types::Volume, ClientError> {
        self.fetch(&format!("/v1/volumes/{}", enc(name))).await
    }

    pub async fn create_volume(
        &self,
        req: &vroom_types::VolumeCreateRequest,
    ) -> Result<vroom_types::Volume, ClientError> {
        self.call(Method::POST, "/v1/volumes", Some(req)).await
    }

    pub async fn remove_volume(&self, name: &str) -> Result<(), ClientError> {
        self.delete(&format!("/v1/volumes/{}", enc(name))).await
    }

    pub async fn resize_volume(
        &self,
        name: &str,
        size_mib: u64,
    ) -> Result<vroom_types::Volume, ClientError> {
        self.call(
            Method::POST,
            &format!("/v1/volumes/{}/resize", enc(name)),
            Some(&vroom_types::VolumeResizeRequest { size_mib }),
        )
        .await
    }

    pub async fn snapshot_volume(
        &self,
        name: &str,
        snapshot: Option<vroom_types::Name>,
    ) -> Result<vroom_types::VolumeSnapshot, ClientError> {
        self.call(
            Method::POST,
            &format!("/v1/volumes/{}/snapshots", enc(name)),
            Some(&vroom_types::VolumeSnapshotRequest { name: snapshot }),
        )
        .await
    }

    pub async fn remove_volume_snapshot(
        &self,
        name: &str,
        snapshot: &str,
    ) -> Result<(), ClientError> {
        self.delete(&format!(
            "/v1/volumes/{}/snapshots/{}",
            enc(name),
            enc(snapshot)
        ))
        .await
    }

    pub async fn restore_volume(
        &self,
        name: &str,
        snapshot: vroom_types::Name,
    ) -> Result<vroom_types::Volume, ClientError> {
        self.call(
            Method::POST,
            &format!("/v1/volumes/{}/restore", enc(name)),
            Some(&vroom_types::VolumeRestoreRequest { snapshot }),
        )
        .await
    }

    pub async fn clone_volume(
        &self,
        snapshot: &str,
        name: vroom_types::Name,
    ) -> Result<vroom_types::Volume, ClientError> {
        self.call(
            Method::POST,
            &format!("/v1/volume-snapshots/{}/clone", enc(snapshot)),
            Some(&vroom_types::VolumeCloneRequest { name }),
        )
        .await
    }

    pub async fn export_volume(
        &self,
        name: &str,
        req: &vroom_types::VolumeExportRequest,
    ) -> Result<vroom_types::VolumeExport, ClientError> {
        self.call(
            Method::POST,
            &format!("/v1/volumes/{}/export", enc(name)),
            Some(req),
        )
        .await
    }

    /// Ends a volume's export, or drops an import not committed.
    pub async fn unexport_volume(&self, name: &str) -> Result<(), ClientError> {
        self.delete(&format!("/v1/volumes/{}/export", enc(name)))
            .await
    }

    /// Starts an import: a writable export to write the image into.
    pub async fn import_volume(
        &self,
        name: &str,
        size_mib: u64,
    ) -> Result<vroom_types::VolumeExport, ClientError> {
        self.call(
            Method::POST,
            &format!("/v1/volumes/{}/import", enc(name)),
            Some(&vroom_types::VolumeImportRequest { size_mib }),
        )
        .await
    }

    pub async fn commit_import(&self, name: &str) -> Result<vroom_types::Volume, ClientError> {
        self.call::<(), _>(
            Method::POST,
            &format!("/v1/volumes/{}/import/commit", enc(name)),
            None,
        )
        .await
    }

    pub async fn networks(&self) -> Result<Vec<Network>, ClientError> {
        self.fetch("/v1/networks").await
    }

    pub async fn network(&self, name: &str) -> Result<Network, ClientError> {
        self.fetch(&format!("/v1/networks/{}", enc(name))).await
    }

    pub async fn create_network(&self, spec: &NetworkSpec) -> Result<Network, ClientError> {
        self.call(Method::POST, "/v1/networks", Some(spec)).await
    }

    pub async fn remove_network(&self, name: &str) -> Result<(), ClientError> {
        self.delete(&format!("/v1/networks/{}", enc(name))).await
    }

    pub async fn splices(&self) -> Result<Vec<vroom_types::Splice>, ClientError> {
        self.fetch("/v1/splices").await
    }

    /// Returns once the VM's traffic goes through the appliance.
    pub async fn splice(
        &self,
        req: &vroom_types::SpliceRequest,
    ) -> Result<vroom_types::Splice, ClientError> {
        self.call(Method::POST, "/v1/splices", Some(req)).await
    }

    pub async fn unsplice(&self, appliance: &str) -> Result<(), ClientError> {
        self.delete(&format!("/v1/splices/{}", enc(appliance)))
            .await
    }

    pub async fn snapshots(&self, warm: bool) -> Result<Vec<vroom_types::Snapshot>, ClientError> {
        let path = if warm {
            "/v1/snapshots?warm=true"
        } else {
            "/v1/snapshots"
        };
        self.fetch(path).await
    }

    pub async fn snapshot_info(&self, name: &str) -> Result<vroom_types::Snapshot, ClientError> {
        self.fetch(&format!("/v1/snapshots/{}", enc(name))).await
    }

    pub async fn snapshot(
        &self,
        req: &vroom_types::SnapshotRequest,
    ) -> Result<vroom_types::Snapshot, ClientError> {
        self.call(Method::POST, "/v1/snapshots", Some(req)).await
    }

    pub async fn remove_snapshot(&self, name: &str) -> Result<(), ClientError> {
        self.delete(&format!("/v1/snapshots/{}", enc(name))).await
    }

    pub async fn restore(
        &self,
        name: &str,
        snapshot: &vroom_types::Name,
    ) -> Result<Instance, ClientError> {
        let req = vroom_types::RestoreRequest {
            snapshot: snapshot.clone(),
        };
        self.call(
            Method::POST,
            &format!("/v1/instances/{}/restore", enc(name)),
            Some(&req),
        )
        .await
    }

    pub async fn remove_warm(
        &self,
        image: &str,
    ) -> Result<Vec<vroom_types::Snapshot>, ClientError> {
        self.call::<(), _>(
            Method::DELETE,
            &format!("/v1/images/{}/warm", enc(image)),
            None,
        )
        .await
    }

    pub async fn warm_image(
        &self,
        image: &str,
        req: &vroom_types::WarmRequest,
    ) -> Result<vroom_types::Snapshot, ClientError> {
        self.call(
            Method::POST,
            &format!("/v1/images/{}/warm", enc(image)),
            Some(req),
        )
        .await
    }

    pub async fn archive(
        &self,
        name: &str,
        dir: &str,
    ) -> Result<vroom_types::ArchiveReport, ClientError> {
        let req = vroom_types::ArchiveRequest {
            dir: dir.to_string(),
        };
        self.call(
            Method::POST,
            &format!("/v1/instances/{}/archive", enc(name)),
            Some(&req),
        )
        .await
    }

    pub async fn nodes(&self) -> Result<Vec<vroom_types::NodeInfo>, ClientError> {
        self.fetch("/v1/nodes").await
    }

    pub async fn node(&self, name: &str) -> Result<vroom_types::NodeInfo, ClientError> {
        self.fetch(&format!("/v1/nodes/{}", enc(name))).await
    }

    pub async fn remove_node(&self, name: &str) -> Result<(), ClientError> {
        self.delete(&format!("/v1/nodes/{}", enc(name))).await
    }

    /// `op`: cordon or uncordon.
    pub async fn migrate(
        &self,
        name: &str,
        to: &vroom_types::Name,
    ) -> Result<vroom_types::Migration, ClientError> {
        let req = vroom_types::MigrateRequest { to: to.clone() };
        self.call(
            Method::POST,
            &format!("/v1/instances/{}/migrate", enc(name)),
            Some(&req),
        )
        .await
    }

    pub async fn node_op(
        &self,
        name: &str,
        op: &str,
    ) -> Result<vroom_types::NodeInfo, ClientError> {
        self.call::<(), _>(Method::POST, &format!("/v1/nodes/{}/{op}", enc(name)), None)
            .await
    }

    /// Cordons node `name` and moves its instances off; `force` leaves
    /// those no other node can take running there instead of refusing.
    pub async fn drain_node(
        &self,
        name: &str,
        force: bool,
    ) -> Result<vroom_types::DrainReport, ClientError> {
        self.call::<(), _>(
            Method::POST,
            &format!("/v1/nodes/{}/drain?force={force}", enc(name)),
            None,
        )
        .await
    }

    pub async fn mirrors(&self) -> Result<Vec<vroom_types::Mirror>, ClientError> {
        self.fetch("/v1/mirrors").await
    }

    pub async fn mirror(
        &self,
        req: &vroom_types::MirrorRequest,
    ) -> Result<vroom_types::Mirror, ClientError> {
        self.call(Method::POST, "/v1/mirrors", Some(req)).await
    }

    pub async fn unmirror(&self, id: &str) -> Result<(), ClientError> {
        self.delete(&format!("/v1/mirrors/{}", enc(id))).await
    }

    pub async fn services(&self) -> Result<Vec<vroom_types::Service>, ClientError> {
        self.fetch("/v1/services").await
    }

    pub async fn service(&self, name: &str) -> Result<vroom_types::Service, ClientError> {
        self.fetch(&format!("/v1/services/{}", enc(name))).await
    }

    /// Returns once the members run behind the balancer.
    pub async fn create_service(
        &self,
        definition: &vroom_types::ServiceDefinition,
    ) -> Result<vroom_types::Service, ClientError> {
        self.call(Method::POST, "/v1/services", Some(definition))
            .await
    }

    pub async fn scale_service(
        &self,
        name: &str,
        req: &vroom_types::ServiceScaleRequest,
    ) -> Result<vroom_types::Service, ClientError> {
        self.call(
            Method::POST,
            &format!("/v1/services/{}/scale", enc(name)),
            Some(req),
        )
        .await
    }

    /// Starts a rolling update; returns once it is recorded.
    pub async fn update_service(
        &self,
        name: &str,
        image: &str,
    ) -> Result<vroom_types::Service, ClientError> {
        let req = vroom_types::ServiceUpdateRequest {
            image: image.to_string(),
        };
        self.call(
            Method::POST,
            &format!("/v1/services/{}/update", enc(name)),
            Some(&req),
        )
        .await
    }

    pub async fn remove_service(&self, name: &str) -> Result<(), ClientError> {
        self.delete(&format!("/v1/services/{}", enc(name))).await
    }

    pub async fn rooms(&self) -> Result<Vec<vroom_types::Room>, ClientError> {
        self.fetch("/v1/rooms").await
    }

    pub async fn room(&self, name: &str) -> Result<vroom_types::Room, ClientError> {
        self.fetch(&format!("/v1/rooms/{}", enc(name))).await
    }

    /// Returns once the room's firewall is ready.
    pub async fn create_room(
        &self,
        spec: &vroom_types::RoomSpec,
    ) -> Result<vroom_types::Room, ClientError> {
        self.call(Method::POST, "/v1/rooms", Some(spec)).await
    }

    pub async fn remove_room(&self, name: &str, force: bool) -> Result<(), ClientError> {
        self.delete(&format!("/v1/rooms/{}?force={force}", enc(name)))
            .await
    }

    /// Converges a room to a file; with `dry_run`, only says what would change.
    pub async fn apply_room(
        &self,
        file: &vroom_types::RoomFile,
        dry_run: bool,
    ) -> Result<vroom_types::RoomPlan, ClientError> {
        self.call(
            Method::PUT,
            &format!("/v1/rooms/{}?dry_run={dry_run}", enc(file.name.as_str())),
            Some(file),
        )
        .await
    }

    pub async fn expose(
        &self,
        room: &str,
        expose: &vroom_types::Expose,
    ) -> Result<vroom_types::Room, ClientError> {
        self.call(
            Method::POST,
            &format!("/v1/rooms/{}/exposes", enc(room)),
            Some(expose),
        )
        .await
    }

    pub async fn unexpose(
        &self,
        room: &str,
        proto: vroom_types::Protocol,
        port: u16,
    ) -> Result<vroom_types::Room, ClientError> {
        self.call::<(), _>(
            Method::DELETE,
            &format!("/v1/rooms/{}/exposes/{}/{port}", enc(room), proto.as_str()),
            None,
        )
        .await
    }

    pub async fn topology(&self, room: Option<&str>) -> Result<vroom_types::Topology, ClientError> {
        let path = match room {
            Some(room) => format!("/v1/topology?room={}", enc(room)),
            None => "/v1/topology".to_string(),
        };
        self.fetch(&path).await
    }

    pub async fn images(&self) -> Result<Vec<ImageSummary>, ClientError> {
        self.fetch("/v1/images").await
    }

    /// Builds an image, calling `on_progress(stage, detail)` as the daemon reports.
    pub async fn build_image(
        &self,
        recipe: &Path,
        update: bool,
        kernel: Option<&str>,
        on_progress: impl FnMut(&str, &str),
    ) -> Result<BuildReport, ClientError> {
        let req = BuildImageRequest {
            recipe: recipe.display().to_string(),
            update,
            kernel: kernel.map(String::from),
        };
        self.build_stream("/v1/images/build", &req, on_progress)
            .await
    }

    /// Imports an OCI image, calling `on_progress(stage, detail)` as the daemon reports.
    pub async fn import_image(
        &self,
        req: &vroom_types::ImportImageRequest,
        on_progress: impl FnMut(&str, &str),
    ) -> Result<BuildReport, ClientError> {
        self.build_stream("/v1/images/import", req, on_progress)
            .await
    }

    /// A build's or import's stream of progress lines and its last line.
    async fn build_stream(
        &self,
        path: &str,
        req: &impl serde::Serialize,
        mut on_progress: impl FnMut(&str, &str),
    ) -> Result<BuildReport, ClientError> {
        let response = self.send(Method::POST, path, Some(req)).await?;
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
        self.delete(&format!("/v1/images/{}", enc(reference))).await
    }

    /// Removes the builds no name points to and no instance uses.
    pub async fn prune_images(&self) -> Result<Vec<ImageSummary>, ClientError> {
        self.call::<(), _>(Method::POST, "/v1/images/prune", None)
            .await
    }

    pub async fn image(&self, reference: &str) -> Result<ImageSummary, ClientError> {
        self.fetch(&format!("/v1/images/{}", enc(reference))).await
    }
}

/// A stream of JSON lines from the daemon (an exec's events, the event log).
pub struct JsonLines<T> {
    body: hyper::body::Incoming,
    pending: Vec<u8>,
    status: u16,
    line: std::marker::PhantomData<fn() -> T>,
}

/// The events of an exec, as the daemon streams them.
pub type ExecEvents = JsonLines<ExecEvent>;

/// The longest line the client accepts from a stream (a base64 chunk
/// of the agent's largest output chunk fits many times over).
const MAX_STREAM_LINE: usize = 1 << 20;

impl<T: DeserializeOwned> JsonLines<T> {
    fn new(response: hyper::Response<hyper::body::Incoming>) -> Self {
        JsonLines {
            status: response.status().as_u16(),
            body: response.into_body(),
            pending: Vec::new(),
            line: std::marker::PhantomData,
        }
    }

    /// The next line; `None` when the stream ended.
    pub async fn next(&mut self) -> Option<Result<T, ClientError>> {
        loop {
            if let Some(end) = self.pending.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = self.pending.drain(..=end).collect();
                return Some(
                    serde_json::from_slice(&line).map_err(|_| ClientError::Unexpected {
                        status: self.status,
                        body: String::from_utf8_lossy(&line).chars().take(200).collect(),
                    }),
                );
            }
            if self.pending.len() > MAX_STREAM_LINE {
                return Some(Err(ClientError::Unexpected {
                    status: self.status,
                    body: format!("a streamed line exceeds {MAX_STREAM_LINE} bytes"),
                }));
            }
            match self.body.frame().await? {
                Ok(frame) => {
                    if let Ok(data) = frame.into_data() {
                        self.pending.extend_from_slice(&data);
                    }
                }
                Err(e) => return Some(Err(e.into())),
            }
        }
    }
}

impl JsonLines<ExecEvent> {
    /// The error for a stream that ended without an exit.
    pub fn ended_early(&self) -> ClientError {
        ClientError::Unexpected {
            status: self.status,
            body: "the exec stream ended without an exit".into(),
        }
    }

    /// The error an `error` event carries.
    pub fn error(&self, error: ApiErrorBody) -> ClientError {
        api_error(self.status, error)
    }
}

/// Feeds an exec's stdin; dropping it closes stdin.
pub struct ExecInput {
    tx: http_body_util::channel::Sender<Bytes>,
}

impl ExecInput {
    /// Sends bytes; fails once the daemon stopped reading (the command ended).
    pub async fn write(&mut self, data: Bytes) -> Result<(), ClientError> {
        self.tx
            .send_data(data)
            .await
            .map_err(|_| ClientError::Unexpected {
                status: 200,
                body: "the command's stdin is closed".into(),
            })
    }
}

fn api_error(status: u16, error: ApiErrorBody) -> ClientError {
    ClientError::Api {
        status,
        code: error.code,
        message: error.message,
    }
}

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

/// Percent-encodes a path segment so that any user text stays one segment.
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
