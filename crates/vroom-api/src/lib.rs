//! The REST API of vroomd: JSON over a unix socket. The only crate that
//! knows HTTP. Every route is annotated for OpenAPI; `openapi.json` at the
//! repository root is generated from the same annotations and a test keeps it
//! in sync.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::{Path, Query, Request, State};
use axum::http::StatusCode;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use tracing::Instrument;
use utoipa::OpenApi;
use vroom_core::{Engine, OpError};
use vroom_types::limits;
use vroom_types::{
    ActionRequest, ApiErrorBody, BuildEvent, BuildImageRequest, ConfigDocument, ConfigUpdate,
    ErrorCode, ExecRequest, ExecResult, ImageSummary, Instance, LogChunk, Name, Network,
    NetworkSpec, RunRequest, VersionInfo,
};

mod links;
mod replies;

use links::CreatedResourceLinks;
use replies::{BodyErrors, HostErrors, PathErrors};

type AppState = Arc<Engine>;

/// An error answer: a status, a stable code and a one-line message.
pub struct ApiError(OpError);

impl From<OpError> for ApiError {
    fn from(e: OpError) -> Self {
        ApiError(e)
    }
}

pub fn status_for(code: ErrorCode) -> StatusCode {
    match code {
        ErrorCode::InvalidArgument => StatusCode::BAD_REQUEST,
        ErrorCode::NotFound => StatusCode::NOT_FOUND,
        ErrorCode::AlreadyExists | ErrorCode::Conflict => StatusCode::CONFLICT,
        ErrorCode::HostUnsupported => StatusCode::UNPROCESSABLE_ENTITY,
        ErrorCode::ResourceExhausted => StatusCode::INSUFFICIENT_STORAGE,
        ErrorCode::Timeout => StatusCode::GATEWAY_TIMEOUT,
        ErrorCode::GuestError => StatusCode::BAD_GATEWAY,
        ErrorCode::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        ErrorCode::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
        ErrorCode::PayloadTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
        ErrorCode::UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
        ErrorCode::UriTooLong => StatusCode::URI_TOO_LONG,
    }
}

/// The code of an error answer that axum or hyper made (a rejected
/// extractor, an unknown route, a wrong method), by its status.
fn code_for(status: StatusCode) -> ErrorCode {
    match status {
        StatusCode::NOT_FOUND => ErrorCode::NotFound,
        StatusCode::METHOD_NOT_ALLOWED => ErrorCode::MethodNotAllowed,
        StatusCode::CONFLICT => ErrorCode::Conflict,
        StatusCode::PAYLOAD_TOO_LARGE => ErrorCode::PayloadTooLarge,
        StatusCode::UNSUPPORTED_MEDIA_TYPE => ErrorCode::UnsupportedMediaType,
        StatusCode::URI_TOO_LONG => ErrorCode::UriTooLong,
        s if s.is_server_error() => ErrorCode::Internal,
        _ => ErrorCode::InvalidArgument,
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = status_for(self.0.code);
        if status.is_server_error() {
            tracing::error!(code = ?self.0.code, error = %self.0.message, "request failed");
        }
        (
            status,
            Json(ApiErrorBody {
                code: self.0.code,
                message: self.0.message,
            }),
        )
            .into_response()
    }
}

fn bad_request(message: String) -> ApiError {
    ApiError(OpError::new(ErrorCode::InvalidArgument, message))
}

/// A JSON body, or the reason it was refused: 413 when too large, 415 when
/// not JSON, 400 for anything else (bad syntax, a wrong or unknown field).
fn body<T>(json: Result<Json<T>, JsonRejection>) -> Result<T, ApiError> {
    json.map(|Json(t)| t).map_err(|rejection| {
        let status = rejection.status();
        let code = match status {
            StatusCode::PAYLOAD_TOO_LARGE | StatusCode::UNSUPPORTED_MEDIA_TYPE => code_for(status),
            _ => ErrorCode::InvalidArgument,
        };
        let text = rejection.body_text();
        let detail = text
            .strip_prefix("Failed to deserialize the JSON body into the target type: ")
            .or_else(|| text.strip_prefix("Failed to parse the request body as JSON: "))
            .unwrap_or(&text);
        ApiError(OpError::new(
            code,
            one_line(&format!(
                "invalid request body: {}",
                lowercase_first(detail)
            )),
        ))
    })
}

/// axum's own messages start with a capital; ours do not.
fn lowercase_first(text: &str) -> String {
    let mut chars = text.chars();
    match chars.next() {
        Some(first) => first.to_lowercase().chain(chars).collect(),
        None => String::new(),
    }
}

/// Messages are one line, whatever the input quoted in them holds.
fn one_line(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

type ApiResult<T> = Result<Json<T>, ApiError>;

#[derive(OpenApi)]
#[openapi(
    info(
        title = "vroomd",
        description = "The vroom host daemon: MicroVM appliances on one host."
    ),
    paths(
        version,
        list_instances,
        run_instance,
        get_instance,
        remove_instance,
        instance_action,
        exec_instance,
        instance_logs,
        read_file,
        get_config,
        update_config,
        replace_config,
        reset_config,
        list_networks,
        create_network,
        get_network,
        remove_network,
        list_images,
        build_image,
        remove_image,
        get_image
    ),
    components(schemas(ApiErrorBody, Name)),
    modifiers(&CrossFieldRules, &CreatedResourceLinks)
)]
pub struct ApiDoc;

/// Rules between fields, which utoipa's derive cannot state: an isolated
/// network has no NAT (its router appliance does that). utoipa's schema
/// types lack JSON Schema's `not`, so it is added as a raw keyword.
struct CrossFieldRules;

impl utoipa::Modify for CrossFieldRules {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::{schema::Schema, RefOr};
        let Some(components) = openapi.components.as_mut() else {
            return;
        };
        if let Some(RefOr::T(Schema::Object(spec))) = components.schemas.get_mut("NetworkSpec") {
            spec.extensions.get_or_insert_with(Default::default).insert(
                "not".into(),
                serde_json::json!({
                    "required": ["isolated", "nat"],
                    "properties": {"isolated": {"const": true}, "nat": {"const": true}}
                }),
            );
        }
    }
}

/// The OpenAPI document as pretty JSON, as checked into the repository.
pub fn openapi_json() -> String {
    let mut json = ApiDoc::openapi()
        .to_pretty_json()
        .expect("invariant: the OpenAPI document serializes");
    json.push('\n');
    json
}

pub fn router(engine: Arc<Engine>) -> Router {
    Router::new()
        .route("/v1/version", get(version))
        .route("/v1/instances", get(list_instances).post(run_instance))
        .route(
            "/v1/instances/{name}",
            get(get_instance).delete(remove_instance),
        )
        .route("/v1/instances/{name}/actions", post(instance_action))
        .route("/v1/instances/{name}/exec", post(exec_instance))
        .route("/v1/instances/{name}/logs", get(instance_logs))
        .route("/v1/instances/{name}/files", get(read_file))
        .route(
            "/v1/instances/{name}/config",
            get(get_config).patch(update_config).put(replace_config),
        )
        .route("/v1/instances/{name}/config/reset", post(reset_config))
        .route("/v1/networks", get(list_networks).post(create_network))
        .route(
            "/v1/networks/{name}",
            get(get_network).delete(remove_network),
        )
        .route("/v1/images", get(list_images))
        .route("/v1/images/build", post(build_image))
        .route(
            "/v1/images/{reference}",
            get(get_image).delete(remove_image),
        )
        .fallback(no_route)
        .layer(middleware::from_fn(json_errors))
        .layer(middleware::from_fn(trace_request))
        .with_state(engine)
}

async fn no_route(method: axum::http::Method, uri: axum::http::Uri) -> ApiError {
    ApiError(OpError::new(
        ErrorCode::NotFound,
        one_line(&format!("no route for {method} {}", uri.path())),
    ))
}

/// The longest request URI (path and query) the API reads: names are short.
const MAX_URI_LEN: usize = 8 * 1024;

/// Every error answer is an [`ApiErrorBody`]: the ones that axum makes itself
/// (a path or query that does not parse, a method the route lacks) are
/// rewritten, keeping their status and headers (e.g. `Allow`).
async fn json_errors(req: Request, next: Next) -> Response {
    // hyper answers URIs beyond 64 KiB itself, with an empty 414 that this
    // layer never sees; below that, the API's own limit answers in JSON.
    if req.uri().to_string().len() > MAX_URI_LEN {
        return ApiError(OpError::new(
            ErrorCode::UriTooLong,
            format!("the request URI is longer than {MAX_URI_LEN} bytes"),
        ))
        .into_response();
    }
    let request_line = format!("{} {}", req.method(), req.uri().path());
    let response = next.run(req).await;
    let status = response.status();
    let is_json = response
        .headers()
        .get(axum::http::header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
    if !(status.is_client_error() || status.is_server_error()) || is_json {
        return response;
    }
    let (mut parts, body) = response.into_parts();
    let text = axum::body::to_bytes(body, 64 * 1024)
        .await
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default();
    let message = match (status, text.trim()) {
        (StatusCode::METHOD_NOT_ALLOWED, _) => {
            let allowed = parts
                .headers
                .get(axum::http::header::ALLOW)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("none");
            one_line(&format!(
                "{request_line} is not allowed; this route takes {allowed}"
            ))
        }
        (_, "") => one_line(&format!(
            "{request_line}: {}",
            status.canonical_reason().unwrap_or("error").to_lowercase()
        )),
        (_, text) => lowercase_first(&one_line(text)),
    };
    parts.headers.remove(axum::http::header::CONTENT_LENGTH);
    parts.headers.remove(axum::http::header::CONTENT_TYPE);
    let body = Json(ApiErrorBody {
        code: code_for(status),
        message,
    });
    (parts, body).into_response()
}

/// Every request runs in a span carrying its id; failures are logged with it.
async fn trace_request(req: Request, next: Next) -> Response {
    static NEXT_ID: AtomicU64 = AtomicU64::new(1);
    let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
    let span = tracing::info_span!("request", id, method = %req.method(), path = %req.uri().path());
    async move {
        let started = std::time::Instant::now();
        let response = next.run(req).await;
        tracing::debug!(
            status = response.status().as_u16(),
            ms = started.elapsed().as_millis() as u64,
            "handled"
        );
        response
    }
    .instrument(span)
    .await
}

#[utoipa::path(get, path = "/v1/version", responses((status = 200, body = VersionInfo)))]
async fn version(State(engine): State<AppState>) -> Json<VersionInfo> {
    Json(VersionInfo {
        version: env!("CARGO_PKG_VERSION").into(),
        data_dir: engine.data_dir().display().to_string(),
    })
}

#[utoipa::path(get, path = "/v1/instances", responses((status = 200, body = Vec<Instance>)))]
async fn list_instances(State(engine): State<AppState>) -> Json<Vec<Instance>> {
    Json(engine.list())
}

/// Creates an instance and starts it; the guest reports ready later (`status.state` becomes `running`).
#[utoipa::path(post, path = "/v1/instances", request_body = RunRequest,
    responses((status = 201, body = Instance), BodyErrors, HostErrors,
        (status = 404, body = ApiErrorBody, description = "No such image or network."),
        (status = 409, body = ApiErrorBody, description = "The name is taken, or the request does not fit the image or network it names (too many NICs, a mirror-sink on a plain network, an address outside the subnet or taken, no address left)."),
        (status = 422, body = ApiErrorBody, description = "This host cannot run it (e.g. no KVM when asked for)."),
        (status = 507, body = ApiErrorBody, description = "The host is out of disk space for the config volume.")))]
async fn run_instance(
    State(engine): State<AppState>,
    req: Result<Json<RunRequest>, JsonRejection>,
) -> Result<(StatusCode, Json<Instance>), ApiError> {
    let req = body(req)?;
    req.validate()
        .map_err(|e| OpError::new(ErrorCode::InvalidArgument, e.to_string()))?;
    let instance = engine.run(req).await?;
    Ok((StatusCode::CREATED, Json(instance)))
}

#[utoipa::path(get, path = "/v1/instances/{name}", params(("name" = Name, Path)),
    responses((status = 200, body = Instance), PathErrors))]
async fn get_instance(
    State(engine): State<AppState>,
    Path(name): Path<String>,
) -> ApiResult<Instance> {
    Ok(Json(engine.get(&name)?))
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
struct RemoveQuery {
    /// Kill a running instance instead of refusing.
    #[serde(default)]
    force: bool,
}

#[utoipa::path(delete, path = "/v1/instances/{name}", params(("name" = Name, Path), RemoveQuery),
    responses((status = 204), PathErrors, HostErrors,
        (status = 409, body = ApiErrorBody, description = "The instance runs and `force` is not set.")))]
async fn remove_instance(
    State(engine): State<AppState>,
    Path(name): Path<String>,
    query: Result<Query<RemoveQuery>, QueryRejection>,
) -> Result<StatusCode, ApiError> {
    let Query(query) = query.map_err(|e| bad_request(e.body_text()))?;
    engine.remove(&name, query.force).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(post, path = "/v1/instances/{name}/actions", params(("name" = Name, Path)), request_body = ActionRequest,
    responses((status = 200, body = Instance), PathErrors, BodyErrors, HostErrors,
        (status = 409, body = ApiErrorBody, description = "The action does not apply in the instance's state."),
        (status = 422, body = ApiErrorBody, description = "This host cannot run it.")))]
async fn instance_action(
    State(engine): State<AppState>,
    Path(name): Path<String>,
    req: Result<Json<ActionRequest>, JsonRejection>,
) -> ApiResult<Instance> {
    Ok(Json(engine.action(&name, body(req)?.action).await?))
}

/// Runs a command in the guest (for debugging and tests) and returns its output and exit code.
#[utoipa::path(post, path = "/v1/instances/{name}/exec", params(("name" = String, Path)), request_body = ExecRequest,
    responses((status = 200, body = ExecResult), (status = 409, body = ApiErrorBody), (status = 502, body = ApiErrorBody)))]
async fn exec_instance(
    State(engine): State<AppState>,
    Path(name): Path<String>,
    req: Result<Json<ExecRequest>, JsonRejection>,
) -> ApiResult<ExecResult> {
    Ok(Json(engine.exec(&name, body(req)?).await?))
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
struct LogQuery {
    /// Byte offset to read from; 0 for the start.
    #[serde(default)]
    #[param(minimum = 0, maximum = 9007199254740991.0)]
    offset: u64,
}

#[utoipa::path(get, path = "/v1/instances/{name}/logs", params(("name" = Name, Path), LogQuery),
    responses((status = 200, body = LogChunk), PathErrors, HostErrors))]
async fn instance_logs(
    State(engine): State<AppState>,
    Path(name): Path<String>,
    query: Result<Query<LogQuery>, QueryRejection>,
) -> ApiResult<LogChunk> {
    let Query(query) = query.map_err(|e| bad_request(e.body_text()))?;
    let offset = limits::LOG_OFFSET
        .check(query.offset)
        .map_err(|e| bad_request(e.to_string()))?;
    let (data, next_offset) = engine.logs(&name, offset)?;
    Ok(Json(LogChunk { data, next_offset }))
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
struct FileQuery {
    /// An absolute path of a regular file in the guest.
    path: String,
}

/// Copies a file out of a running guest (e.g. a packet capture).
#[utoipa::path(get, path = "/v1/instances/{name}/files", params(("name" = String, Path), FileQuery),
    responses((status = 200, content_type = "application/octet-stream", body = Vec<u8>),
        (status = 404, body = ApiErrorBody), (status = 409, body = ApiErrorBody)))]
async fn read_file(
    State(engine): State<AppState>,
    Path(name): Path<String>,
    query: Result<Query<FileQuery>, QueryRejection>,
) -> Result<([(axum::http::HeaderName, &'static str); 1], Vec<u8>), ApiError> {
    let Query(query) = query.map_err(|e| bad_request(e.body_text()))?;
    let data = engine.read_file(&name, &query.path).await?;
    Ok((
        [(axum::http::header::CONTENT_TYPE, "application/octet-stream")],
        data,
    ))
}

#[utoipa::path(get, path = "/v1/instances/{name}/config", params(("name" = String, Path)),
    responses((status = 200, body = ConfigDocument), (status = 404, body = ApiErrorBody)))]
async fn get_config(
    State(engine): State<AppState>,
    Path(name): Path<String>,
) -> ApiResult<ConfigDocument> {
    Ok(Json(ConfigDocument {
        values: engine.config_get(&name).await?,
    }))
}

/// Sets some keys. On a running instance the guest applies and persists them before this returns.
#[utoipa::path(patch, path = "/v1/instances/{name}/config", params(("name" = String, Path)), request_body = ConfigUpdate,
    responses((status = 200, body = ConfigDocument), (status = 400, body = ApiErrorBody)))]
async fn update_config(
    State(engine): State<AppState>,
    Path(name): Path<String>,
    req: Result<Json<ConfigUpdate>, JsonRejection>,
) -> ApiResult<ConfigDocument> {
    Ok(Json(ConfigDocument {
        values: engine.config_update(&name, body(req)?.set).await?,
    }))
}

/// Replaces the whole config (import).
#[utoipa::path(put, path = "/v1/instances/{name}/config", params(("name" = String, Path)), request_body = ConfigDocument,
    responses((status = 200, body = ConfigDocument), (status = 400, body = ApiErrorBody)))]
async fn replace_config(
    State(engine): State<AppState>,
    Path(name): Path<String>,
    req: Result<Json<ConfigDocument>, JsonRejection>,
) -> ApiResult<ConfigDocument> {
    Ok(Json(ConfigDocument {
        values: engine.config_replace(&name, body(req)?.values).await?,
    }))
}

/// Restores the image's factory config.
#[utoipa::path(post, path = "/v1/instances/{name}/config/reset", params(("name" = String, Path)),
    responses((status = 200, body = ConfigDocument), (status = 404, body = ApiErrorBody)))]
async fn reset_config(
    State(engine): State<AppState>,
    Path(name): Path<String>,
) -> ApiResult<ConfigDocument> {
    Ok(Json(ConfigDocument {
        values: engine.config_reset(&name).await?,
    }))
}

#[utoipa::path(get, path = "/v1/networks", responses((status = 200, body = Vec<Network>)))]
async fn list_networks(State(engine): State<AppState>) -> Json<Vec<Network>> {
    Json(engine.list_networks())
}

#[utoipa::path(post, path = "/v1/networks", request_body = NetworkSpec,
    responses((status = 201, body = Network), BodyErrors, HostErrors,
        (status = 409, body = ApiErrorBody, description = "The name is taken, or the subnet overlaps another network or a host address."),
        (status = 507, body = ApiErrorBody, description = "No free subnet is left.")))]
async fn create_network(
    State(engine): State<AppState>,
    req: Result<Json<NetworkSpec>, JsonRejection>,
) -> Result<(StatusCode, Json<Network>), ApiError> {
    Ok((
        StatusCode::CREATED,
        Json(engine.create_network(body(req)?).await?),
    ))
}

#[utoipa::path(get, path = "/v1/networks/{name}", params(("name" = Name, Path)),
    responses((status = 200, body = Network), PathErrors))]
async fn get_network(
    State(engine): State<AppState>,
    Path(name): Path<String>,
) -> ApiResult<Network> {
    Ok(Json(engine.network(&name)?))
}

#[utoipa::path(delete, path = "/v1/networks/{name}", params(("name" = Name, Path)),
    responses((status = 204), PathErrors, HostErrors,
        (status = 409, body = ApiErrorBody, description = "Instances are attached to it.")))]
async fn remove_network(
    State(engine): State<AppState>,
    Path(name): Path<String>,
) -> Result<StatusCode, ApiError> {
    engine.remove_network(&name).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(get, path = "/v1/images", responses((status = 200, body = Vec<ImageSummary>), HostErrors))]
async fn list_images(State(engine): State<AppState>) -> ApiResult<Vec<ImageSummary>> {
    Ok(Json(engine.list_images()?))
}

/// Builds an image from a recipe on the daemon's host. The answer is a stream
/// of JSON lines (`application/x-ndjson`): a `progress` line per stage, then
/// one `done` line with the report or one `error` line.
#[utoipa::path(post, path = "/v1/images/build", request_body = BuildImageRequest,
    responses((status = 200, content_type = "application/x-ndjson", body = BuildEvent), BodyErrors))]
async fn build_image(
    State(engine): State<AppState>,
    req: Result<Json<BuildImageRequest>, JsonRejection>,
) -> Result<Response, ApiError> {
    let req = body(req)?;
    let recipe = std::path::PathBuf::from(&req.recipe);
    if !recipe.is_absolute() {
        return Err(bad_request(format!(
            "recipe path {} must be absolute",
            recipe.display()
        )));
    }
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<BuildEvent>();
    let progress = tx.clone();
    tokio::spawn(async move {
        let result = engine
            .build_image(recipe, req.update, move |stage, detail| {
                let _ = progress.send(BuildEvent::Progress {
                    stage: stage.to_string(),
                    detail: detail.to_string(),
                });
            })
            .await;
        let last = match result {
            Ok(report) => BuildEvent::Done {
                report: Box::new(report),
            },
            Err(e) => {
                if status_for(e.code).is_server_error() {
                    tracing::error!(code = ?e.code, error = %e.message, "build failed");
                }
                BuildEvent::Error {
                    error: ApiErrorBody {
                        code: e.code,
                        message: e.message,
                    },
                }
            }
        };
        let _ = tx.send(last);
    });
    let lines = futures::stream::unfold(rx, |mut rx| async move {
        let event = rx.recv().await?;
        let mut line = serde_json::to_vec(&event).expect("invariant: events serialize");
        line.push(b'\n');
        Some((Ok::<_, std::convert::Infallible>(line), rx))
    });
    Ok((
        [(axum::http::header::CONTENT_TYPE, "application/x-ndjson")],
        axum::body::Body::from_stream(lines),
    )
        .into_response())
}

/// Removes an image; refused while an instance uses it.
#[utoipa::path(delete, path = "/v1/images/{reference}", params(("reference" = String, Path, description = "name or id")),
    responses((status = 204), PathErrors, HostErrors,
        (status = 409, body = ApiErrorBody, description = "An instance uses the image.")))]
async fn remove_image(
    State(engine): State<AppState>,
    Path(reference): Path<String>,
) -> Result<StatusCode, ApiError> {
    engine.remove_image(&reference).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(get, path = "/v1/images/{reference}", params(("reference" = String, Path, description = "name or id")),
    responses((status = 200, body = ImageSummary), PathErrors, HostErrors))]
async fn get_image(
    State(engine): State<AppState>,
    Path(reference): Path<String>,
) -> ApiResult<ImageSummary> {
    Ok(Json(engine.get_image(&reference)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The checked-in document must match the annotations; regenerate with `cargo xtask openapi`.
    #[test]
    fn openapi_document_is_in_sync() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../openapi.json");
        if std::env::var_os("VROOM_UPDATE_OPENAPI").is_some() {
            std::fs::write(&path, openapi_json()).unwrap();
        }
        let checked_in = std::fs::read_to_string(&path).unwrap_or_default();
        assert!(
            checked_in == openapi_json(),
            "openapi.json is stale: run `cargo xtask openapi`"
        );
    }

    /// The document states the same ranges and patterns as the validators.
    #[test]
    fn document_rules_match_the_validators() {
        use vroom_types::limits::{Bounds, CONFIG_VOLUME_KIB, CPUS, MEM_MIB, READY_TIMEOUT_SECS};
        let doc: serde_json::Value = serde_json::from_str(&openapi_json()).unwrap();
        let schemas = &doc["components"]["schemas"];
        let range = |field: &serde_json::Value, bounds: Bounds| {
            assert_eq!(field["minimum"], bounds.min, "{} {field}", bounds.field);
            assert_eq!(field["maximum"], bounds.max, "{} {field}", bounds.field);
        };
        range(
            &schemas["RunRequest"]["properties"]["ready_timeout_secs"],
            READY_TIMEOUT_SECS,
        );
        let spec = &schemas["InstanceSpec"]["properties"];
        range(&spec["mem_mib"], MEM_MIB);
        range(&spec["cpus"], CPUS);
        range(&spec["config_volume_kib"], CONFIG_VOLUME_KIB);
        let logs = &doc["paths"]["/v1/instances/{name}/logs"]["get"]["parameters"];
        let offset = logs
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["name"] == "offset")
            .unwrap();
        assert_eq!(offset["in"], "query");
        range(&offset["schema"], limits::LOG_OFFSET);
        assert_eq!(schemas["Name"]["pattern"], vroom_types::NAME_PATTERN);
        assert_eq!(
            schemas["NetworkSpec"]["properties"]["subnet"]["pattern"],
            vroom_types::subnet_pattern()
        );
    }

    /// Config values (string to string) and a config schema (key to rule)
    /// are different maps; each use site says which it is.
    #[test]
    fn maps_are_described_where_they_are_used() {
        let doc: serde_json::Value = serde_json::from_str(&openapi_json()).unwrap();
        let schemas = &doc["components"]["schemas"];
        for (schema, field) in [
            ("Instance", "config"),
            ("ConfigDocument", "values"),
            ("ApplianceSpec", "seed_config"),
        ] {
            let map = &schemas[schema]["properties"][field];
            assert_eq!(
                map["additionalProperties"]["type"], "string",
                "{schema}.{field}: {map}"
            );
        }
        let rules = &schemas["ApplianceSpec"]["properties"]["config_schema"];
        assert_eq!(
            rules["additionalProperties"]["$ref"], "#/components/schemas/ConfigField",
            "{rules}"
        );
    }

    /// Request bodies refuse unknown fields, and say so; every error reply
    /// is an `ApiErrorBody`.
    #[test]
    fn bodies_are_strict_and_errors_are_api_error_bodies() {
        let doc: serde_json::Value = serde_json::from_str(&openapi_json()).unwrap();
        let schemas = &doc["components"]["schemas"];
        for body in [
            "RunRequest",
            "InstanceSpec",
            "NicSpec",
            "NetworkSpec",
            "ActionRequest",
            "BuildImageRequest",
            "ConfigDocument",
        ] {
            assert_eq!(schemas[body]["additionalProperties"], false, "{body}");
        }
        for (path, item) in doc["paths"].as_object().unwrap() {
            for (method, op) in item.as_object().unwrap() {
                for (status, reply) in op["responses"].as_object().unwrap() {
                    if status.starts_with('4') || status.starts_with('5') {
                        assert_eq!(
                            reply["content"]["application/json"]["schema"]["$ref"],
                            "#/components/schemas/ApiErrorBody",
                            "{method} {path} {status}"
                        );
                    }
                }
            }
        }
    }

    /// Every link leads to a documented operation that takes `{name}`.
    #[test]
    fn links_lead_to_operations_that_take_the_name() {
        let doc: serde_json::Value = serde_json::from_str(&openapi_json()).unwrap();
        let mut takes_name = std::collections::BTreeSet::new();
        for (path, item) in doc["paths"].as_object().unwrap() {
            for op in item.as_object().unwrap().values() {
                if path.contains("{name}") {
                    takes_name.insert(op["operationId"].as_str().unwrap().to_string());
                }
            }
        }
        let mut links = 0;
        for item in doc["paths"].as_object().unwrap().values() {
            for op in item.as_object().unwrap().values() {
                for reply in op["responses"].as_object().unwrap().values() {
                    for link in reply["links"].as_object().into_iter().flatten() {
                        let target = link.1["operationId"].as_str().unwrap();
                        assert!(takes_name.contains(target), "link to {target}");
                        links += 1;
                    }
                }
            }
        }
        assert_eq!(
            links, 12,
            "links from POST /v1/instances and POST /v1/networks"
        );
    }

    /// Every route the router serves is documented, and nothing else is.
    #[test]
    fn openapi_paths_match_router_routes() {
        let doc: serde_json::Value = serde_json::from_str(&openapi_json()).unwrap();
        let mut documented: Vec<String> = vec![];
        for (path, item) in doc["paths"].as_object().unwrap() {
            for method in item.as_object().unwrap().keys() {
                documented.push(format!("{} {path}", method.to_uppercase()));
            }
        }
        documented.sort();
        // Read the router's own source: every `.route("path", method(handler)...)` in `router()`.
        let source = include_str!("lib.rs");
        let body = source
            .split("Router::new()")
            .nth(1)
            .unwrap()
            .split(".layer(")
            .next()
            .unwrap();
        let mut routed: Vec<String> = vec![];
        for chunk in body.split(".route(").skip(1) {
            let path = chunk.split('"').nth(1).unwrap();
            let calls = chunk.split_once(',').unwrap().1;
            for method in ["get", "post", "put", "patch", "delete"] {
                let at_start = calls.trim_start().starts_with(&format!("{method}("));
                if at_start || calls.contains(&format!(".{method}(")) {
                    routed.push(format!("{} {path}", method.to_uppercase()));
                }
            }
        }
        routed.sort();
        assert_eq!(documented, routed);
    }
}
