//! Routes for instances: list, run, inspect, remove, act on, migrate, and
//! what runs inside them (exec, logs, files).

use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use vroom_core::engine::GuestStdin;
use vroom_core::OpError;
use vroom_types::{
    limits, ActionRequest, ApiErrorBody, ErrorCode, ExecEvent, ExecRequest, Instance, LogChunk,
    MigrateRequest, Migration, Name, RunRequest, VersionInfo, MAX_EXEC_REQUEST_BYTES,
};

use crate::audit::AuditCaller;
use crate::replies::{BodyErrors, HostErrors, PathErrors};
use crate::{audit, bad_request, body, ApiError, ApiResult, AppState, Service};

#[utoipa::path(get, path = "/v1/version", responses((status = 200, body = VersionInfo)))]
pub(crate) async fn version(
    State(engine): State<AppState>,
    daemon: Option<axum::Extension<vroom_types::DaemonInfo>>,
) -> Json<VersionInfo> {
    Json(VersionInfo {
        version: env!("CARGO_PKG_VERSION").into(),
        data_dir: engine.data_dir().display().to_string(),
        daemon: daemon.map(|axum::Extension(info)| info),
    })
}

#[utoipa::path(get, path = "/v1/instances", responses((status = 200, body = Vec<Instance>)))]
pub(crate) async fn list_instances(State(vroomd): State<Service>) -> Json<Vec<Instance>> {
    Json(vroomd.list().await)
}

/// Creates an instance and starts it; the guest reports ready later (`status.state` becomes `running`).
#[utoipa::path(post, path = "/v1/instances", request_body = RunRequest,
    responses((status = 201, body = Instance), BodyErrors, HostErrors,
        (status = 404, body = ApiErrorBody, description = "No such image, network or snapshot."),
        (status = 409, body = ApiErrorBody, description = "The name is taken, or the request does not fit the image, network or snapshot it names (too many NICs, an address outside the subnet or taken, no address left; a snapshot of another machine, corrupt, still being written or whose image is gone)."),
        (status = 422, body = ApiErrorBody, description = "This host cannot run it: more memory or CPUs than it has, less memory than the image needs on its kernel, no KVM when asked for (code `host_unsupported`); a data volume its rules refuse: a system or read-only mount path, one attached twice, volumes for an ephemeral instance or an image without ext4 (code `invalid_volume`)."),
        (status = 507, body = ApiErrorBody, description = "The host is out of disk space for the config volume.")))]
pub(crate) async fn run_instance(
    State(vroomd): State<Service>,
    req: Result<Json<RunRequest>, JsonRejection>,
) -> Result<(StatusCode, Json<Instance>), ApiError> {
    let req = body(req)?;
    req.validate()
        .map_err(|e| OpError::new(ErrorCode::InvalidArgument, e.to_string()))?;
    let instance = vroomd.run(req).await?;
    Ok((StatusCode::CREATED, Json(instance)))
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub(crate) struct GetQuery {
    /// Wait up to this many seconds while the instance is `starting` or
    /// `restarting`, and answer as soon as it is not (ready, failed,
    /// stopped) or the time is up: how a client waits for ready without
    /// polling. The answer then leaves out `health` (the guest is not
    /// asked again; it just reported ready).
    #[param(minimum = 0, maximum = 60)]
    wait_secs: Option<u64>,
}

#[utoipa::path(get, path = "/v1/instances/{name}", params(("name" = Name, Path), GetQuery),
    responses((status = 200, body = Instance), PathErrors))]
pub(crate) async fn get_instance(
    State(vroomd): State<Service>,
    Path(name): Path<String>,
    query: Result<Query<GetQuery>, QueryRejection>,
) -> ApiResult<Instance> {
    let Query(query) = query.map_err(|e| bad_request(e.body_text()))?;
    match query.wait_secs {
        Some(secs) => {
            let secs = limits::WAIT_SECS
                .check(secs)
                .map_err(|e| bad_request(e.to_string()))?;
            let wait = std::time::Duration::from_secs(secs);
            Ok(Json(vroomd.wait_settled(&name, wait).await?))
        }
        None => Ok(Json(vroomd.inspect(&name).await?)),
    }
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub(crate) struct RemoveQuery {
    /// Kill a running instance instead of refusing.
    #[serde(default)]
    force: bool,
    /// Remove its data volumes too (they stay otherwise).
    #[serde(default)]
    volumes: bool,
}

#[utoipa::path(delete, path = "/v1/instances/{name}", params(("name" = Name, Path), RemoveQuery),
    responses((status = 204), PathErrors, HostErrors,
        (status = 409, body = ApiErrorBody, description = "The instance runs and `force` is not set.")))]
pub(crate) async fn remove_instance(
    State(vroomd): State<Service>,
    Path(name): Path<String>,
    query: Result<Query<RemoveQuery>, QueryRejection>,
) -> Result<StatusCode, ApiError> {
    let Query(query) = query.map_err(|e| bad_request(e.body_text()))?;
    let volumes = match query.volumes {
        true => vroomd.inspect(&name).await?.spec.volumes,
        false => vec![],
    };
    vroomd.remove(&name, query.force).await?;
    vroomd.engine().remove_volumes(&volumes).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(post, path = "/v1/instances/{name}/actions", params(("name" = Name, Path)), request_body = ActionRequest,
    responses((status = 200, body = Instance), PathErrors, BodyErrors, HostErrors,
        (status = 409, body = ApiErrorBody, description = "The action does not apply in the instance's state."),
        (status = 422, body = ApiErrorBody, description = "This host cannot run it.")))]
pub(crate) async fn instance_action(
    State(vroomd): State<Service>,
    Path(name): Path<String>,
    req: Result<Json<ActionRequest>, JsonRejection>,
) -> ApiResult<Instance> {
    let action = body(req)?.action;
    Ok(Json(vroomd.act(&name, action).await?))
}

#[utoipa::path(post, path = "/v1/instances/{name}/migrate", params(("name" = Name, Path)), request_body = MigrateRequest,
    responses((status = 200, body = Migration, description = "It runs on the target node now."),
        PathErrors, BodyErrors, HostErrors,
        (status = 409, body = ApiErrorBody, description = "This host is not in a cluster, the instance is not running or already migrating, the node is down or cordoned, or the migration failed (the instance runs on where it was)."),
        (status = 507, body = ApiErrorBody, description = "The target node has no room for it.")))]
pub(crate) async fn migrate_instance(
    State(vroomd): State<Service>,
    Path(name): Path<String>,
    req: Result<Json<MigrateRequest>, JsonRejection>,
) -> ApiResult<Migration> {
    let to = body(req)?.to;
    Ok(Json(vroomd.migrate(&name, to.as_str()).await?))
}

/// Runs a command in the guest, streaming. The request body is one JSON line,
/// an `ExecRequest`; when it sets `stdin`, the rest of the body is the
/// command's stdin as raw bytes, closed when the body ends. The answer is a
/// stream of JSON lines (`application/x-ndjson`), one `ExecEvent` each: output
/// chunks (base64) as the command writes them, then one `exit` line (with the
/// exit code: 124 timed out, 127 not found, 128+n killed by signal n) or one
/// `error` line. Closing the connection early kills the command, and so does
/// a body that breaks off before its end (an `error` line says so).
#[utoipa::path(post, path = "/v1/instances/{name}/exec", params(("name" = Name, Path)),
    request_body(content = ExecRequest, content_type = "application/json",
        description = "an ExecRequest; with `stdin` true, a newline after it and then the command's stdin as raw bytes"),
    responses((status = 200, content_type = "application/x-ndjson", body = ExecEvent),
        PathErrors, BodyErrors, HostErrors,
        (status = 409, body = ApiErrorBody, description = "The instance is not running."),
        (status = 502, body = ApiErrorBody, description = "The guest agent failed."),
        (status = 504, body = ApiErrorBody, description = "The guest agent did not answer."),
        (status = 507, body = ApiErrorBody, description = "The guest runs too many exec sessions.")))]
pub(crate) async fn exec_instance(
    State(engine): State<AppState>,
    Path(name): Path<String>,
    AuditCaller(caller): AuditCaller,
    body: axum::body::Body,
) -> Result<Response, ApiError> {
    let mut input = body.into_data_stream();
    let (line, rest) = exec_request_line(&mut input).await?;
    let req: ExecRequest = serde_json::from_slice(&line)
        .map_err(|e| bad_request(format!("invalid exec request: {e}")))?;
    audit::exec(caller, &name, &req.argv);
    let mut exec = engine.exec(&name, req).await?;
    // A body that breaks off mid-stdin must not look like a clean EOF to the command.
    let (broken_tx, broken_rx) = tokio::sync::oneshot::channel::<String>();
    let pump = exec
        .take_stdin()
        .map(|stdin| tokio::spawn(pump_stdin(stdin, rest, input, broken_tx)));
    /// What ended a wait for the session's next event.
    enum Next {
        Event(Option<ExecEvent>),
        StdinBroke(String),
    }
    let lines = futures::stream::unfold(
        (Some(exec), Some(broken_rx), pump),
        |(mut exec, mut broken, mut pump)| async move {
            let running = exec.as_mut()?;
            // `next()` is not cancel-safe (an event taken from the guest
            // could be lost while its credit is sent), so the one future is
            // polled to its end while the stdin pump is watched beside it.
            let outcome = {
                let next = running.next();
                tokio::pin!(next);
                loop {
                    tokio::select! {
                        event = &mut next => break Next::Event(event),
                        result = stdin_broke(&mut broken), if broken.is_some() => match result {
                            Ok(message) => break Next::StdinBroke(message),
                            // The pump finished (or never ran): stop watching it.
                            Err(_) => broken = None,
                        },
                    }
                }
            };
            match outcome {
                Next::Event(Some(event)) => Some((ndjson_line(&event), (exec, broken, pump))),
                Next::Event(None) => {
                    // The reply ends once the rest of the body is read: a
                    // connection closed with request bytes unread is reset,
                    // and a reset can destroy the reply's own last lines
                    // before the client reads them.
                    if let Some(pump) = pump.take() {
                        let _ = tokio::time::timeout(STDIN_DRAIN, pump).await;
                    }
                    None
                }
                Next::StdinBroke(message) => {
                    let event = ExecEvent::Error {
                        error: ApiErrorBody {
                            code: ErrorCode::InvalidArgument,
                            message: format!("the command's stdin broke off: {message}"),
                        },
                    };
                    // Ending the stream drops the session, which kills the command.
                    Some((ndjson_line(&event), (None, None, None)))
                }
            }
        },
    );
    Ok((
        [(axum::http::header::CONTENT_TYPE, "application/x-ndjson")],
        axum::body::Body::from_stream(lines),
    )
        .into_response())
}

fn ndjson_line(event: &ExecEvent) -> Result<Vec<u8>, std::convert::Infallible> {
    let mut line = serde_json::to_vec(event).expect("invariant: events serialize");
    line.push(b'\n');
    Ok(line)
}

/// Resolves when the stdin pump reports a broken body (or is gone).
pub(crate) async fn stdin_broke(
    broken: &mut Option<tokio::sync::oneshot::Receiver<String>>,
) -> Result<String, tokio::sync::oneshot::error::RecvError> {
    match broken {
        Some(rx) => rx.await,
        None => std::future::pending().await,
    }
}

/// The first line of an exec body and whatever followed it in the same read.
pub(crate) async fn exec_request_line(
    input: &mut axum::body::BodyDataStream,
) -> Result<(Vec<u8>, Vec<u8>), ApiError> {
    use futures::StreamExt;
    let mut buf = Vec::new();
    loop {
        if let Some(end) = buf.iter().position(|b| *b == b'\n') {
            let rest = buf.split_off(end + 1);
            buf.pop();
            return Ok((buf, rest));
        }
        if buf.len() > MAX_EXEC_REQUEST_BYTES {
            return Err(bad_request(format!(
                "the exec request line exceeds {MAX_EXEC_REQUEST_BYTES} bytes"
            )));
        }
        match input.next().await {
            Some(Ok(chunk)) => buf.extend_from_slice(&chunk),
            Some(Err(e)) => return Err(bad_request(format!("cannot read the request body: {e}"))),
            // A plain JSON body without a newline.
            None => return Ok((buf, Vec::new())),
        }
    }
}

/// Copies the rest of the request body into the command's stdin, one
/// acknowledged chunk at a time (so a command that does not read holds the
/// client back), and closes it at the end of the body.
pub(crate) async fn pump_stdin(
    stdin: GuestStdin,
    rest: Vec<u8>,
    mut input: axum::body::BodyDataStream,
    broken: tokio::sync::oneshot::Sender<String>,
) {
    use futures::StreamExt;
    let mut reading = rest.is_empty() || stdin.write(&rest, false).await.is_ok();
    while let Some(chunk) = input.next().await {
        let chunk = match chunk {
            Ok(chunk) => chunk,
            Err(e) => {
                let _ = broken.send(e.to_string());
                return;
            }
        };
        // A command that stopped reading leaves the rest to be drained.
        if reading && stdin.write(&chunk, false).await.is_err() {
            reading = false;
        }
    }
    if reading {
        let _ = stdin.write(&[], true).await;
    }
}

/// How long an exec reply waits, after the command's end, for the client to
/// finish sending stdin that nobody reads any more.
const STDIN_DRAIN: std::time::Duration = std::time::Duration::from_secs(2);

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub(crate) struct LogQuery {
    /// Byte offset to read from; 0 for the start. Offsets count the boot's
    /// bytes: an offset whose output was rotated away (the current boot
    /// keeps its newest 512 KiB to 1 MiB) reads from the oldest byte kept.
    #[serde(default)]
    #[param(minimum = 0, maximum = 9007199254740991.0)]
    offset: u64,
    /// Which boot: 0 (the default) is the current or last one, -1 the one
    /// before, down to -5.
    #[serde(default)]
    #[param(minimum = -5, maximum = 0)]
    boot: i32,
}

#[utoipa::path(get, path = "/v1/instances/{name}/logs", params(("name" = Name, Path), LogQuery),
    responses((status = 200, body = LogChunk), PathErrors, HostErrors))]
pub(crate) async fn instance_logs(
    State(engine): State<AppState>,
    Path(name): Path<String>,
    query: Result<Query<LogQuery>, QueryRejection>,
) -> ApiResult<LogChunk> {
    let Query(query) = query.map_err(|e| bad_request(e.body_text()))?;
    let offset = limits::LOG_OFFSET
        .check(query.offset)
        .map_err(|e| bad_request(e.to_string()))?;
    let (data, next_offset) = engine.logs(&name, query.boot, offset)?;
    Ok(Json(LogChunk { data, next_offset }))
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub(crate) struct FileQuery {
    /// An absolute path of a regular file in the guest.
    #[param(pattern = "^/")]
    path: String,
}

/// Copies a regular file out of a running guest (e.g. a packet capture),
/// streamed as the guest reads it; at most 1 GiB. A path with no regular file
/// behind it (missing, a directory, a FIFO, a device) answers 404 with the
/// guest's reason. A failure after the first bytes aborts the connection, so
/// a truncated copy never looks complete.
#[utoipa::path(get, path = "/v1/instances/{name}/files", params(("name" = Name, Path), FileQuery),
    responses((status = 200, content_type = "application/octet-stream", body = Vec<u8>),
        PathErrors, HostErrors,
        (status = 409, body = ApiErrorBody, description = "The instance is not running."),
        (status = 502, body = ApiErrorBody, description = "The guest agent failed."),
        (status = 504, body = ApiErrorBody, description = "The guest agent did not answer."),
        (status = 507, body = ApiErrorBody, description = "The file is larger than 1 GiB.")))]
pub(crate) async fn read_file(
    State(engine): State<AppState>,
    Path(name): Path<String>,
    AuditCaller(caller): AuditCaller,
    query: Result<Query<FileQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(query) = query.map_err(|e| bad_request(e.body_text()))?;
    audit::copy(caller, &name, &query.path);
    let file = engine.read_file(&name, &query.path).await?;
    let chunks = futures::stream::unfold(file, |mut file| async move {
        let chunk = file.next_chunk().await?.map_err(|e| {
            tracing::warn!(code = ?e.code, error = %e.message, "copy aborted");
            std::io::Error::other(e.message)
        });
        Some((chunk, file))
    });
    Ok((
        [(axum::http::header::CONTENT_TYPE, "application/octet-stream")],
        axum::body::Body::from_stream(chunks),
    )
        .into_response())
}
