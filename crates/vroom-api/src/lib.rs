//! The REST API of vroomd: JSON over a unix socket. The only crate that
//! knows HTTP. Every route is annotated for OpenAPI; `openapi.json` at the
//! repository root is generated from the same annotations and a test keeps it
//! in sync.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use axum::extract::rejection::{JsonRejection, PathRejection, QueryRejection};
use axum::extract::{DefaultBodyLimit, Path, Query, Request, State};
use axum::http::StatusCode;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use serde::Deserialize;
use tracing::Instrument;
use utoipa::OpenApi;
use vroom_core::engine::GuestStdin;
use vroom_core::{Engine, OpError};
use vroom_types::limits;
use vroom_types::{
    ActionRequest, ApiErrorBody, BuildEvent, BuildImageRequest, ConfigDiff, ConfigDocument,
    ConfigHistory, ConfigRollback, ConfigUpdate, ConfigVersion, ErrorCode, ExecEvent, ExecRequest,
    ImageSummary, Instance, LogChunk, MigrateRequest, Migration, Name, Network, NetworkSpec,
    RunRequest, VersionInfo, MAX_EXEC_REQUEST_BYTES,
};

mod audit;
mod links;
mod replies;

use audit::AuditCaller;
pub use audit::Caller;

use links::CreatedResourceLinks;
mod nodes;
mod rooms;
mod snapshots;
mod splices;
use replies::{BodyErrors, ConfigErrors, HostErrors, PathErrors};

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
        ErrorCode::HostUnsupported | ErrorCode::InvalidConfig | ErrorCode::InvalidFilter => {
            StatusCode::UNPROCESSABLE_ENTITY
        }
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

pub use vroom_types::limits::{MAX_CONFIG_BODY, MAX_JSON_BODY, MAX_ROOM_BODY};

/// A JSON body, or the reason it was refused: 413 when too large, 415 when
/// not JSON, 400 for anything else (bad syntax, a wrong or unknown field).
/// For routes whose body limit is [`MAX_JSON_BODY`].
fn body<T>(json: Result<Json<T>, JsonRejection>) -> Result<T, ApiError> {
    body_within(json, MAX_JSON_BODY)
}

/// [`body`] for a route whose body limit is `limit`, the one its 413 names.
fn body_within<T>(json: Result<Json<T>, JsonRejection>, limit: usize) -> Result<T, ApiError> {
    json.map(|Json(t)| t).map_err(|rejection| {
        let status = rejection.status();
        if status == StatusCode::PAYLOAD_TOO_LARGE {
            return ApiError(OpError::new(
                ErrorCode::PayloadTooLarge,
                format!(
                    "invalid request body: length limit exceeded: this route takes at most {} KiB",
                    limit / 1024
                ),
            ));
        }
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
        migrate_instance,
        exec_instance,
        instance_logs,
        read_file,
        get_config,
        update_config,
        replace_config,
        reset_config,
        config_history,
        config_version,
        config_diff,
        rollback_config,
        list_networks,
        create_network,
        get_network,
        remove_network,
        list_images,
        build_image,
        prune_images,
        remove_image,
        get_image,
        splices::list_splices,
        splices::create_splice,
        splices::get_splice,
        splices::remove_splice,
        splices::list_mirrors,
        splices::create_mirror,
        splices::remove_mirror,
        rooms::list_rooms,
        rooms::create_room,
        rooms::get_room,
        rooms::remove_room,
        rooms::apply_room,
        rooms::expose,
        rooms::unexpose,
        rooms::topology,
        snapshots::list_snapshots,
        snapshots::create_snapshot,
        snapshots::get_snapshot,
        snapshots::remove_snapshot,
        snapshots::restore_instance,
        snapshots::warm_image,
        snapshots::remove_warm,
        snapshots::archive_instance,
        nodes::list_nodes,
        nodes::get_node,
        nodes::cordon_node,
        nodes::uncordon_node,
        nodes::drain_node,
        nodes::remove_node
    ),
    components(schemas(ApiErrorBody, Name)),
    modifiers(&ConfigValueRules, &CrossFieldRules, &CreatedResourceLinks)
)]
pub struct ApiDoc;

/// Rules between fields, which utoipa's derive cannot state: an isolated
/// network has no NAT (its router appliance does that) and no host ports
/// (the host has no address on it). utoipa's schema
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
                serde_json::json!({"anyOf": [
                    {
                        "required": ["isolated", "nat"],
                        "properties": {"isolated": {"const": true}, "nat": {"const": true}}
                    },
                    {
                        "required": ["isolated", "allow_host"],
                        "properties": {
                            "isolated": {"const": true},
                            "allow_host": {"minItems": 1}
                        }
                    }
                ]}),
            );
        }
    }
}

/// What the server enforces on config keys and values
/// (`vroom_types::validate_config_key` and `validate_config_value`), stated
/// on the request bodies that carry them. utoipa cannot put a pattern on a
/// map's keys, so the two maps are rewritten as plain JSON.
struct ConfigValueRules;

/// Config keys: a lowercase letter, then lowercase letters, digits, `_`, `.`, `-`.
pub const CONFIG_KEY_PATTERN: &str = "^[a-z][a-z0-9_.-]*$";
/// Config values: no control characters but tab (Unicode category Cc).
pub const CONFIG_VALUE_PATTERN: &str = "^[^\\u0000-\\u0008\\u000a-\\u001f\\u007f-\\u009f]*$";

impl utoipa::Modify for ConfigValueRules {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let mut doc = serde_json::to_value(&*openapi).expect("invariant: the document serializes");
        let map = serde_json::json!({
            "type": "object",
            "propertyNames": {"type": "string", "pattern": CONFIG_KEY_PATTERN, "minLength": 1, "maxLength": 64},
            "additionalProperties": {"type": "string", "pattern": CONFIG_VALUE_PATTERN, "maxLength": 4096},
        });
        for (schema, field) in [
            ("ConfigUpdate", "set"),
            ("ConfigDocument", "values"),
            ("RoomInstance", "config"),
            ("RoomFile", "firewall"),
        ] {
            let property = &mut doc["components"]["schemas"][schema]["properties"][field];
            let description = property.get("description").cloned();
            *property = map.clone();
            if let Some(description) = description {
                property["description"] = description;
            }
        }
        // A room file's instances are keyed by instance name.
        let instances = &mut doc["components"]["schemas"]["RoomFile"]["properties"]["instances"];
        instances["propertyNames"] = serde_json::json!({
            "type": "string",
            "pattern": vroom_types::NAME_PATTERN,
            "minLength": 1,
            "maxLength": 32,
        });
        *openapi = serde_json::from_value(doc).expect("invariant: the edited document parses");
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
    let routes = Router::new()
        .route("/v1/version", get(version))
        .route("/v1/instances", get(list_instances).post(run_instance))
        .route(
            "/v1/instances/{name}",
            get(get_instance).delete(remove_instance),
        )
        .route("/v1/instances/{name}/actions", post(instance_action))
        .route("/v1/instances/{name}/migrate", post(migrate_instance))
        .route("/v1/instances/{name}/exec", post(exec_instance))
        .route("/v1/instances/{name}/logs", get(instance_logs))
        .route("/v1/instances/{name}/files", get(read_file))
        .route(
            "/v1/instances/{name}/config",
            get(get_config)
                .patch(update_config)
                .put(replace_config)
                .layer(DefaultBodyLimit::max(MAX_CONFIG_BODY)),
        )
        .route("/v1/instances/{name}/config/reset", post(reset_config))
        .route("/v1/instances/{name}/config/history", get(config_history))
        .route(
            "/v1/instances/{name}/config/versions/{version}",
            get(config_version),
        )
        .route("/v1/instances/{name}/config/diff", get(config_diff))
        .route(
            "/v1/instances/{name}/config/rollback",
            post(rollback_config),
        )
        .route("/v1/networks", get(list_networks).post(create_network))
        .route(
            "/v1/networks/{name}",
            get(get_network).delete(remove_network),
        )
        .route("/v1/images", get(list_images))
        .route("/v1/images/build", post(build_image))
        .route("/v1/images/prune", post(prune_images))
        .route(
            "/v1/images/{reference}",
            get(get_image).delete(remove_image),
        )
        .route(
            "/v1/splices",
            get(splices::list_splices).post(splices::create_splice),
        )
        .route(
            "/v1/splices/{appliance}",
            get(splices::get_splice).delete(splices::remove_splice),
        )
        .route(
            "/v1/mirrors",
            get(splices::list_mirrors).post(splices::create_mirror),
        )
        .route("/v1/mirrors/{id}", delete(splices::remove_mirror))
        .route("/v1/rooms", get(rooms::list_rooms).post(rooms::create_room))
        .route(
            "/v1/rooms/{name}",
            get(rooms::get_room)
                .put(rooms::apply_room)
                .delete(rooms::remove_room)
                .layer(DefaultBodyLimit::max(MAX_ROOM_BODY)),
        )
        .route("/v1/rooms/{name}/exposes", post(rooms::expose))
        .route(
            "/v1/rooms/{name}/exposes/{proto}/{port}",
            delete(rooms::unexpose),
        )
        .route("/v1/topology", get(rooms::topology))
        .route(
            "/v1/snapshots",
            get(snapshots::list_snapshots).post(snapshots::create_snapshot),
        )
        .route(
            "/v1/snapshots/{name}",
            get(snapshots::get_snapshot).delete(snapshots::remove_snapshot),
        )
        .route(
            "/v1/instances/{name}/restore",
            post(snapshots::restore_instance),
        )
        .route(
            "/v1/instances/{name}/archive",
            post(snapshots::archive_instance),
        )
        .route(
            "/v1/images/{name}/warm",
            post(snapshots::warm_image).delete(snapshots::remove_warm),
        )
        .route("/v1/nodes", get(nodes::list_nodes))
        .route(
            "/v1/nodes/{name}",
            get(nodes::get_node).delete(nodes::remove_node),
        )
        .route("/v1/nodes/{name}/cordon", post(nodes::cordon_node))
        .route("/v1/nodes/{name}/uncordon", post(nodes::uncordon_node))
        .route("/v1/nodes/{name}/drain", post(nodes::drain_node))
        .fallback(no_route)
        // Routes that carry more say so above (the innermost limit wins); the
        // exec route streams stdin and bounds its request line itself.
        .layer(DefaultBodyLimit::max(MAX_JSON_BODY))
        .with_state(engine);
    // `Router::layer` wraps each route inside the future that adds `Allow`
    // to a 405, so the error rewrite wraps the whole router instead (as the
    // fallback of an outer one): it sees the answer as it leaves, and a
    // 405's message names its `Allow`.
    Router::new()
        .fallback_service(routes)
        .layer(middleware::from_fn(json_errors))
        .layer(middleware::from_fn(trace_request))
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
    let mut list = engine.list();
    // A cluster node lists the cluster's instances too (as their owners
    // published them); an unreachable etcd leaves the local ones.
    if let Some(cluster) = engine.cluster() {
        for instance in &mut list {
            instance.node = Some(cluster.node_name().to_string());
        }
        if let Ok(remote) = cluster.instances().await {
            for instance in remote {
                if !list.iter().any(|i| i.spec.name == instance.spec.name) {
                    list.push(instance);
                }
            }
        }
    }
    Json(list)
}

/// Creates an instance and starts it; the guest reports ready later (`status.state` becomes `running`).
#[utoipa::path(post, path = "/v1/instances", request_body = RunRequest,
    responses((status = 201, body = Instance), BodyErrors, HostErrors,
        (status = 404, body = ApiErrorBody, description = "No such image, network or snapshot."),
        (status = 409, body = ApiErrorBody, description = "The name is taken, or the request does not fit the image, network or snapshot it names (too many NICs, an address outside the subnet or taken, no address left; a snapshot of another machine, corrupt, still being written or whose image is gone)."),
        (status = 422, body = ApiErrorBody, description = "This host cannot run it: more memory or CPUs than it has, less memory than the image needs on its kernel, no KVM when asked for (code `host_unsupported`)."),
        (status = 507, body = ApiErrorBody, description = "The host is out of disk space for the config volume.")))]
async fn run_instance(
    State(engine): State<AppState>,
    req: Result<Json<RunRequest>, JsonRejection>,
) -> Result<(StatusCode, Json<Instance>), ApiError> {
    let req = body(req)?;
    req.validate()
        .map_err(|e| OpError::new(ErrorCode::InvalidArgument, e.to_string()))?;
    let instance = match engine.cluster() {
        Some(cluster) => cluster.run(req).await?,
        None if !req.placement.is_default() => {
            return Err(OpError::new(
                ErrorCode::Conflict,
                "this host is not in a cluster: placement (ha, spread, node) needs one",
            )
            .into())
        }
        None => engine.run(req).await?,
    };
    Ok((StatusCode::CREATED, Json(instance)))
}

#[utoipa::path(get, path = "/v1/instances/{name}", params(("name" = Name, Path)),
    responses((status = 200, body = Instance), PathErrors))]
async fn get_instance(
    State(engine): State<AppState>,
    Path(name): Path<String>,
) -> ApiResult<Instance> {
    match (engine.inspect(&name).await, engine.cluster()) {
        (Ok(mut instance), cluster) => {
            instance.node = cluster.map(|c| c.node_name().to_string());
            Ok(Json(instance))
        }
        (Err(e), Some(cluster)) => cluster.instance(&name).await?.map(Json).ok_or(e.into()),
        (Err(e), None) => Err(e.into()),
    }
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
    let in_cluster = match engine.cluster() {
        Some(cluster) => cluster.remove(&name, query.force).await?,
        None => false,
    };
    if !in_cluster {
        engine.remove(&name, query.force).await?;
    }
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
    let action = body(req)?.action;
    let instance = engine.action(&name, action).await?;
    if let Some(cluster) = engine.cluster() {
        cluster.set_desired(&name, instance.desired).await?;
    }
    Ok(Json(instance))
}

#[utoipa::path(post, path = "/v1/instances/{name}/migrate", params(("name" = Name, Path)), request_body = MigrateRequest,
    responses((status = 200, body = Migration, description = "It runs on the target node now."),
        PathErrors, BodyErrors, HostErrors,
        (status = 409, body = ApiErrorBody, description = "This host is not in a cluster, the instance is not running or already migrating, the node is down or cordoned, or the migration failed (the instance runs on where it was)."),
        (status = 507, body = ApiErrorBody, description = "The target node has no room for it.")))]
async fn migrate_instance(
    State(engine): State<AppState>,
    Path(name): Path<String>,
    req: Result<Json<MigrateRequest>, JsonRejection>,
) -> ApiResult<Migration> {
    let to = body(req)?.to;
    let cluster = nodes::cluster_of(&engine)?;
    Ok(Json(cluster.migrate(&name, to.as_str()).await?))
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
async fn exec_instance(
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
async fn stdin_broke(
    broken: &mut Option<tokio::sync::oneshot::Receiver<String>>,
) -> Result<String, tokio::sync::oneshot::error::RecvError> {
    match broken {
        Some(rx) => rx.await,
        None => std::future::pending().await,
    }
}

/// The first line of an exec body and whatever followed it in the same read.
async fn exec_request_line(
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
async fn pump_stdin(
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
struct LogQuery {
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
async fn instance_logs(
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
struct FileQuery {
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
async fn read_file(
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

#[utoipa::path(get, path = "/v1/instances/{name}/config", params(("name" = Name, Path)),
    responses((status = 200, body = ConfigDocument), PathErrors, HostErrors))]
async fn get_config(
    State(engine): State<AppState>,
    Path(name): Path<String>,
) -> ApiResult<ConfigDocument> {
    Ok(Json(ConfigDocument {
        values: engine.config_get(&name).await?,
    }))
}

/// Sets some keys: a new config version. The host checks the schema and its
/// rules and renders the templates; a running guest then renders into a
/// staging area and runs each service's check before it saves anything. On
/// any failure nothing changes (422 `invalid_config`, with the failing
/// template or check output in the message).
#[utoipa::path(patch, path = "/v1/instances/{name}/config", params(("name" = Name, Path)), request_body = ConfigUpdate,
    responses((status = 200, body = ConfigDocument), BodyErrors, PathErrors, HostErrors, ConfigErrors))]
async fn update_config(
    State(engine): State<AppState>,
    Path(name): Path<String>,
    req: Result<Json<ConfigUpdate>, JsonRejection>,
) -> ApiResult<ConfigDocument> {
    Ok(Json(ConfigDocument {
        values: engine
            .config_update(&name, body_within(req, MAX_CONFIG_BODY)?.set)
            .await?,
    }))
}

/// Replaces the whole config (import): every key of the schema must be given.
/// Checked like `PATCH`.
#[utoipa::path(put, path = "/v1/instances/{name}/config", params(("name" = Name, Path)), request_body = ConfigDocument,
    responses((status = 200, body = ConfigDocument), BodyErrors, PathErrors, HostErrors, ConfigErrors))]
async fn replace_config(
    State(engine): State<AppState>,
    Path(name): Path<String>,
    req: Result<Json<ConfigDocument>, JsonRejection>,
) -> ApiResult<ConfigDocument> {
    Ok(Json(ConfigDocument {
        values: engine
            .config_replace(&name, body_within(req, MAX_CONFIG_BODY)?.values)
            .await?,
    }))
}

/// Restores the image's factory config, as a new version.
#[utoipa::path(post, path = "/v1/instances/{name}/config/reset", params(("name" = Name, Path)),
    responses((status = 200, body = ConfigDocument), PathErrors, HostErrors, ConfigErrors))]
async fn reset_config(
    State(engine): State<AppState>,
    Path(name): Path<String>,
) -> ApiResult<ConfigDocument> {
    Ok(Json(ConfigDocument {
        values: engine.config_reset(&name).await?,
    }))
}

/// The config versions kept (at least the last 20), oldest first.
#[utoipa::path(get, path = "/v1/instances/{name}/config/history", params(("name" = Name, Path)),
    responses((status = 200, body = ConfigHistory), PathErrors, HostErrors))]
async fn config_history(
    State(engine): State<AppState>,
    Path(name): Path<String>,
) -> ApiResult<ConfigHistory> {
    Ok(Json(engine.config_history(&name).await?))
}

/// One config version with its values.
#[utoipa::path(get, path = "/v1/instances/{name}/config/versions/{version}",
    params(("name" = Name, Path), ("version" = u64, Path, minimum = 1)),
    responses((status = 200, body = ConfigVersion), PathErrors, HostErrors))]
async fn config_version(
    State(engine): State<AppState>,
    path: Result<Path<(String, u64)>, PathRejection>,
) -> ApiResult<ConfigVersion> {
    let Path((name, version)) = path.map_err(|e| bad_request(e.body_text()))?;
    Ok(Json(engine.config_version(&name, version).await?))
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
struct DiffQuery {
    /// The older version; by default the one before `to`.
    from: Option<u64>,
    /// The newer version; by default the current one.
    to: Option<u64>,
}

/// The keys that differ between two config versions.
#[utoipa::path(get, path = "/v1/instances/{name}/config/diff", params(("name" = Name, Path), DiffQuery),
    responses((status = 200, body = ConfigDiff), PathErrors, HostErrors))]
async fn config_diff(
    State(engine): State<AppState>,
    Path(name): Path<String>,
    query: Result<Query<DiffQuery>, QueryRejection>,
) -> ApiResult<ConfigDiff> {
    let Query(query) = query.map_err(|e| bad_request(e.body_text()))?;
    Ok(Json(engine.config_diff(&name, query.from, query.to).await?))
}

/// Restores the values of an earlier version (by default the one before the
/// current) as a new version, checked like any change.
#[utoipa::path(post, path = "/v1/instances/{name}/config/rollback", params(("name" = Name, Path)), request_body = ConfigRollback,
    responses((status = 200, body = ConfigDocument), BodyErrors, PathErrors, HostErrors, ConfigErrors))]
async fn rollback_config(
    State(engine): State<AppState>,
    Path(name): Path<String>,
    req: Result<Json<serde_json::Value>, JsonRejection>,
) -> ApiResult<ConfigDocument> {
    // serde reads a struct from an array too (`[]` would mean "no
    // version"); the document says object.
    let value = body(req)?;
    if !value.is_object() {
        return Err(bad_request(
            "the request body must be a JSON object".to_string(),
        ));
    }
    let req: ConfigRollback = serde_json::from_value(value)
        .map_err(|e| bad_request(format!("invalid request body: {e}")))?;
    Ok(Json(ConfigDocument {
        values: engine.config_rollback(&name, req.version).await?,
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
    AuditCaller(caller): AuditCaller,
    req: Result<Json<BuildImageRequest>, JsonRejection>,
) -> Result<Response, ApiError> {
    let req = body(req)?;
    let recipe = std::path::PathBuf::from(&req.recipe);
    // As the document's pattern says: an absolute path, or a catalog name.
    let catalog_name = req.recipe.starts_with(|c: char| c.is_ascii_lowercase())
        && req
            .recipe
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
    if !recipe.is_absolute() && !catalog_name {
        return Err(bad_request(format!(
            "recipe path {} must be absolute (or the name of a catalog recipe)",
            recipe.display()
        )));
    }
    // As the document's pattern says, before the answer starts to stream.
    if let Some(kernel) = &req.kernel {
        let id = kernel.len() == 16
            && kernel
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
        if !(id || kernel == "debian" || kernel == "vroom") {
            return Err(bad_request(format!(
                "unknown kernel {kernel:?}: debian, vroom, or a kernel id from `vroom kernel ls`"
            )));
        }
    }
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<BuildEvent>();
    let progress = tx.clone();
    tokio::spawn(async move {
        let result = engine
            .build_image(
                recipe,
                req.update,
                req.kernel,
                caller.uid,
                move |stage, detail| {
                    let _ = progress.send(BuildEvent::Progress {
                        stage: stage.to_string(),
                        detail: detail.to_string(),
                    });
                },
            )
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

/// Removes the older builds that no name points to and no instance uses; returns them.
#[utoipa::path(post, path = "/v1/images/prune", responses((status = 200, body = Vec<ImageSummary>)))]
async fn prune_images(State(engine): State<AppState>) -> ApiResult<Vec<ImageSummary>> {
    Ok(Json(engine.prune_images().await?))
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
    /// The first line of an exec body, however the body is cut into chunks.
    #[tokio::test]
    async fn exec_request_line_table() {
        type Case = (Vec<&'static [u8]>, Option<(&'static [u8], &'static [u8])>);
        let long = Box::leak(vec![b'a'; MAX_EXEC_REQUEST_BYTES + 2].into_boxed_slice());
        let cases: Vec<Case> = vec![
            (vec![b"{}\nstdin"], Some((b"{}", b"stdin"))),
            (vec![b"{", b"}", b"\n", b"more"], Some((b"{}", b""))),
            (vec![b"{}"], Some((b"{}", b""))),
            (vec![], Some((b"", b""))),
            (vec![b"{}\n\n"], Some((b"{}", b"\n"))),
            (vec![&long[..]], None),
        ];
        for (chunks, want) in cases {
            let stream = futures::stream::iter(
                chunks
                    .clone()
                    .into_iter()
                    .map(|c| Ok::<_, std::convert::Infallible>(c.to_vec())),
            );
            let mut input = axum::body::Body::from_stream(stream).into_data_stream();
            let got = exec_request_line(&mut input).await.ok();
            let want = want.map(|(l, r)| (l.to_vec(), r.to_vec()));
            assert_eq!(got, want, "{chunks:?}");
        }
    }

    /// Bodies are capped per route, and the answer is the API's JSON error.
    #[tokio::test]
    async fn bodies_over_the_route_limit_answer_413() {
        use tower::ServiceExt;
        let dir = tempfile::tempdir().unwrap();
        let t = vroom_core::testing::TestEngine::new(dir.path());
        let padded = |len: usize, json: &str| {
            let mut body = vec![b' '; len];
            body.extend_from_slice(json.as_bytes());
            body
        };
        let network = r#"{"name":"n1","subnet":"10.9.0.0/24"}"#;
        let values = r#"{"values":{}}"#;
        let cases: &[(&str, &str, Vec<u8>, u16)] = &[
            (
                "POST",
                "/v1/networks",
                padded(MAX_JSON_BODY + 1, network),
                413,
            ),
            (
                "POST",
                "/v1/images/build",
                padded(MAX_JSON_BODY + 1, "{}"),
                413,
            ),
            ("POST", "/v1/instances", padded(100 * 1024, "{}"), 413),
            // Config values may be larger, up to their own limit.
            (
                "PUT",
                "/v1/instances/nope/config",
                padded(MAX_JSON_BODY + 1, values),
                404,
            ),
            (
                "PUT",
                "/v1/instances/nope/config",
                padded(MAX_CONFIG_BODY + 1, values),
                413,
            ),
            (
                "PATCH",
                "/v1/instances/nope/config",
                padded(MAX_CONFIG_BODY + 1, values),
                413,
            ),
        ];
        for (method, path, body, want) in cases {
            let request = axum::http::Request::builder()
                .method(*method)
                .uri(*path)
                .header("content-type", "application/json")
                .body(axum::body::Body::from(body.clone()))
                .unwrap();
            let response = router(t.engine.clone()).oneshot(request).await.unwrap();
            let status = response.status().as_u16();
            let bytes = axum::body::to_bytes(response.into_body(), 1 << 20)
                .await
                .unwrap();
            assert_eq!(
                status,
                *want,
                "{method} {path} {} bytes: {bytes:?}",
                body.len()
            );
            if *want == 413 {
                let error: ApiErrorBody = serde_json::from_slice(&bytes).unwrap();
                assert_eq!(error.code, ErrorCode::PayloadTooLarge);
                let limit = if *method == "POST" {
                    MAX_JSON_BODY
                } else {
                    MAX_CONFIG_BODY
                };
                let named = format!("{} KiB", limit / 1024);
                assert!(error.message.contains(&named), "{}", error.message);
            }
        }
    }

    /// Statuses and messages of answers a user met with the wrong status or
    /// a message that contradicts the answer: (method, path, body, status,
    /// code, what the message says, what it must not say).
    #[tokio::test]
    async fn statuses_table() {
        use tower::ServiceExt;
        let dir = tempfile::tempdir().unwrap();
        let t = vroom_core::testing::TestEngine::new(dir.path());
        let mut small = vroom_core::testing::run_request("w1", "bump", &[]);
        small.spec.mem_mib = Some(64);
        let small = serde_json::to_vec(&small).unwrap();
        let room = |len: usize| {
            let mut body = vec![b' '; len];
            body.extend_from_slice(br#"{"name":"r1"}"#);
            body
        };
        type Case<'a> = (&'a str, &'a str, Vec<u8>, u16, ErrorCode, &'a str, &'a str);
        let cases: Vec<Case> = vec![
            // Well formed, but the image needs more on its kernel: like
            // memory beyond the host's, the host cannot carry it out.
            (
                "POST",
                "/v1/instances",
                small,
                422,
                ErrorCode::HostUnsupported,
                "below the 128 MiB image bump needs",
                "",
            ),
            // The message names the methods the `Allow` header lists.
            (
                "DELETE",
                "/v1/version",
                vec![],
                405,
                ErrorCode::MethodNotAllowed,
                "this route takes GET,HEAD",
                "none",
            ),
            (
                "PATCH",
                "/v1/instances/w1/actions",
                vec![],
                405,
                ErrorCode::MethodNotAllowed,
                "this route takes POST",
                "none",
            ),
            // A room file the CLI accepts (up to MAX_ROOM_BODY) reaches
            // the route (here refused for its name, after parsing).
            (
                "PUT",
                "/v1/rooms/r2",
                room(MAX_ROOM_BODY - 100),
                409,
                ErrorCode::Conflict,
                "the file is room r1",
                "",
            ),
            // Beyond it, one limit is named: the route's.
            (
                "PUT",
                "/v1/rooms/r2",
                room(MAX_ROOM_BODY + 1),
                413,
                ErrorCode::PayloadTooLarge,
                "at most 256 KiB",
                "64",
            ),
            (
                "POST",
                "/v1/networks",
                room(MAX_JSON_BODY + 1),
                413,
                ErrorCode::PayloadTooLarge,
                "at most 64 KiB",
                "256",
            ),
        ];
        for (method, path, body, status, code, says, not) in cases {
            let request = axum::http::Request::builder()
                .method(method)
                .uri(path)
                .header("content-type", "application/json")
                .body(axum::body::Body::from(body))
                .unwrap();
            let response = router(t.engine.clone()).oneshot(request).await.unwrap();
            let got = response.status().as_u16();
            let allow = response.headers().get("allow").cloned();
            let bytes = axum::body::to_bytes(response.into_body(), 1 << 20)
                .await
                .unwrap();
            let error: ApiErrorBody = serde_json::from_slice(&bytes)
                .unwrap_or_else(|e| panic!("{method} {path}: {e}: {bytes:?}"));
            assert_eq!(
                (got, error.code),
                (status, code),
                "{method} {path}: {}",
                error.message
            );
            assert!(
                error.message.contains(says),
                "{method} {path}: {}",
                error.message
            );
            assert!(
                not.is_empty() || !error.message.contains(not),
                "{method} {path}: {}",
                error.message
            );
            if status == 405 {
                let allow = allow.expect("a 405 has an Allow header");
                assert!(
                    error.message.contains(allow.to_str().unwrap()),
                    "{method} {path}: Allow {allow:?}, message {}",
                    error.message
                );
            }
        }
    }

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

    /// Every link leads to a documented operation whose path takes the
    /// parameter the link fills.
    #[test]
    fn links_lead_to_operations_that_take_their_parameter() {
        let doc: serde_json::Value = serde_json::from_str(&openapi_json()).unwrap();
        let mut path_of = std::collections::BTreeMap::new();
        for (path, item) in doc["paths"].as_object().unwrap() {
            for op in item.as_object().unwrap().values() {
                path_of.insert(
                    op["operationId"].as_str().unwrap().to_string(),
                    path.clone(),
                );
            }
        }
        let mut links = 0;
        for item in doc["paths"].as_object().unwrap().values() {
            for op in item.as_object().unwrap().values() {
                for reply in op["responses"].as_object().unwrap().values() {
                    for link in reply["links"].as_object().into_iter().flatten() {
                        let target = link.1["operationId"].as_str().unwrap();
                        let path = path_of.get(target).unwrap_or_else(|| panic!("{target}"));
                        for param in link.1["parameters"].as_object().unwrap().keys() {
                            assert!(path.contains(&format!("{{{param}}}")), "{target}: {param}");
                        }
                        links += 1;
                    }
                }
            }
        }
        assert_eq!(
            links, 18,
            "links from POST /v1/instances, /v1/networks, /v1/rooms, /v1/splices and /v1/mirrors"
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
            .split(".fallback(")
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
