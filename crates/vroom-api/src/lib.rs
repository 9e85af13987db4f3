//! The REST API of vroomd: JSON over a unix socket. The only crate that
//! knows HTTP. Every route is annotated for OpenAPI; `openapi.json` at the
//! repository root is generated from the same annotations and a test keeps it
//! in sync.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use axum::extract::rejection::JsonRejection;
use axum::extract::{DefaultBodyLimit, FromRef, Request};
use axum::http::StatusCode;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use tracing::Instrument;
use utoipa::OpenApi;
use vroom_core::service::Vroomd;
use vroom_core::{Engine, OpError};
use vroom_types::{ApiErrorBody, ErrorCode, Name};

mod audit;
mod links;
mod replies;

pub use audit::{Caller, PeerCertificate};

use links::CreatedResourceLinks;
mod config;
mod events;
mod images;
mod instances;
mod metrics;
mod networks;
// Named without their module in `ApiDoc`'s paths: utoipa would tag them by
// it, and the document has always listed these operations untagged.
use config::*;
use images::*;
use instances::*;
use networks::*;
mod nodes;
mod rooms;
mod services;
mod snapshots;
mod splices;
mod ui;
mod volumes;

/// What most handlers need: this host's engine (a sub-state of [`Api`]).
type AppState = Arc<Engine>;
/// What the handlers of instances and nodes need: vroomd, local or
/// clustered, which decides where an operation goes.
type Service = Arc<dyn Vroomd>;

/// The router's state.
#[derive(Clone)]
struct Api {
    engine: AppState,
    vroomd: Service,
}

impl FromRef<Api> for AppState {
    fn from_ref(api: &Api) -> Self {
        api.engine.clone()
    }
}

impl FromRef<Api> for Service {
    fn from_ref(api: &Api) -> Self {
        api.vroomd.clone()
    }
}

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
        ErrorCode::HostUnsupported
        | ErrorCode::InvalidConfig
        | ErrorCode::InvalidFilter
        | ErrorCode::InvalidVolume
        | ErrorCode::InvalidService
        | ErrorCode::InvalidReference => StatusCode::UNPROCESSABLE_ENTITY,
        ErrorCode::ResourceExhausted => StatusCode::INSUFFICIENT_STORAGE,
        ErrorCode::Timeout => StatusCode::GATEWAY_TIMEOUT,
        ErrorCode::GuestError | ErrorCode::UpstreamError => StatusCode::BAD_GATEWAY,
        ErrorCode::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        ErrorCode::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
        ErrorCode::PayloadTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
        ErrorCode::UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
        ErrorCode::UriTooLong => StatusCode::URI_TOO_LONG,
        ErrorCode::Forbidden => StatusCode::FORBIDDEN,
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
        StatusCode::FORBIDDEN => ErrorCode::Forbidden,
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

/// [`body`] for a body whose fields are all optional: serde would also take
/// a JSON array for it (its fields by position), so anything but an object
/// is refused first.
fn object_body<T: serde::de::DeserializeOwned>(
    json: Result<Json<serde_json::Value>, JsonRejection>,
) -> Result<T, ApiError> {
    let value = body(json)?;
    if !value.is_object() {
        return Err(bad_request(
            "invalid request body: expected a JSON object".into(),
        ));
    }
    serde_json::from_value(value).map_err(|e| {
        bad_request(one_line(&format!(
            "invalid request body: {}",
            lowercase_first(&e.to_string())
        )))
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
        events::events,
        metrics::metrics,
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
        import_image,
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
        services::list_services,
        services::create_service,
        services::get_service,
        services::scale_service,
        services::update_service,
        services::remove_service,
        volumes::list_volumes,
        volumes::create_volume,
        volumes::get_volume,
        volumes::remove_volume,
        volumes::resize_volume,
        volumes::snapshot_volume,
        volumes::remove_volume_snapshot,
        volumes::restore_volume,
        volumes::clone_volume,
        volumes::export_volume,
        volumes::unexport_volume,
        volumes::import_volume,
        volumes::commit_import,
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
        // A service's scaling target: one of two keys, in bounds (utoipa's
        // enum derive states neither).
        doc["components"]["schemas"]["ScaleTarget"] = serde_json::json!({
            "description": "What a service's autoscaler keeps under its target: the p95 latency at the balancer in milliseconds, or the members' average CPU in percent.",
            "oneOf": [
                {
                    "type": "object",
                    "required": ["p95_ms"],
                    "properties": {"p95_ms": {"type": "integer", "minimum": 1, "maximum": 60000}},
                    "additionalProperties": false,
                },
                {
                    "type": "object",
                    "required": ["cpu_percent"],
                    "properties": {"cpu_percent": {"type": "integer", "minimum": 1, "maximum": 100}},
                    "additionalProperties": false,
                },
            ],
        });
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

/// `GET /metrics` alone, for the daemon's plain loopback listener.
pub fn metrics_router(engine: Arc<Engine>) -> Router {
    Router::new()
        .route("/metrics", get(metrics::metrics))
        .with_state(engine)
}

/// The API of `vroomd`: a host alone or a cluster node.
pub fn router(vroomd: Arc<dyn Vroomd>) -> Router {
    let state = Api {
        engine: vroomd.engine().clone(),
        vroomd,
    };
    let routes = Router::new()
        .route("/v1/version", get(instances::version))
        .route("/v1/events", get(events::events))
        .route("/metrics", get(metrics::metrics))
        .route(
            "/v1/instances",
            get(instances::list_instances).post(instances::run_instance),
        )
        .route(
            "/v1/instances/{name}",
            get(instances::get_instance).delete(instances::remove_instance),
        )
        .route(
            "/v1/instances/{name}/actions",
            post(instances::instance_action),
        )
        .route(
            "/v1/instances/{name}/migrate",
            post(instances::migrate_instance),
        )
        .route("/v1/instances/{name}/exec", post(instances::exec_instance))
        .route("/v1/instances/{name}/logs", get(instances::instance_logs))
        .route("/v1/instances/{name}/files", get(instances::read_file))
        .route(
            "/v1/instances/{name}/config",
            get(config::get_config)
                .patch(config::update_config)
                .put(config::replace_config)
                .layer(DefaultBodyLimit::max(MAX_CONFIG_BODY)),
        )
        .route(
            "/v1/instances/{name}/config/reset",
            post(config::reset_config),
        )
        .route(
            "/v1/instances/{name}/config/history",
            get(config::config_history),
        )
        .route(
            "/v1/instances/{name}/config/versions/{version}",
            get(config::config_version),
        )
        .route("/v1/instances/{name}/config/diff", get(config::config_diff))
        .route(
            "/v1/instances/{name}/config/rollback",
            post(config::rollback_config),
        )
        .route(
            "/v1/networks",
            get(networks::list_networks).post(networks::create_network),
        )
        .route(
            "/v1/networks/{name}",
            get(networks::get_network).delete(networks::remove_network),
        )
        .route("/v1/images", get(images::list_images))
        .route("/v1/images/build", post(images::build_image))
        .route("/v1/images/import", post(images::import_image))
        .route("/v1/images/prune", post(images::prune_images))
        .route(
            "/v1/images/{reference}",
            get(images::get_image).delete(images::remove_image),
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
            "/v1/services",
            get(services::list_services).post(services::create_service),
        )
        .route(
            "/v1/services/{name}",
            get(services::get_service).delete(services::remove_service),
        )
        .route("/v1/services/{name}/scale", post(services::scale_service))
        .route("/v1/services/{name}/update", post(services::update_service))
        .route(
            "/v1/volumes",
            get(volumes::list_volumes).post(volumes::create_volume),
        )
        .route(
            "/v1/volumes/{name}",
            get(volumes::get_volume).delete(volumes::remove_volume),
        )
        .route("/v1/volumes/{name}/resize", post(volumes::resize_volume))
        .route(
            "/v1/volumes/{name}/snapshots",
            post(volumes::snapshot_volume),
        )
        .route(
            "/v1/volumes/{name}/snapshots/{snapshot}",
            delete(volumes::remove_volume_snapshot),
        )
        .route("/v1/volumes/{name}/restore", post(volumes::restore_volume))
        .route(
            "/v1/volume-snapshots/{snapshot}/clone",
            post(volumes::clone_volume),
        )
        .route(
            "/v1/volumes/{name}/export",
            post(volumes::export_volume).delete(volumes::unexport_volume),
        )
        .route("/v1/volumes/{name}/import", post(volumes::import_volume))
        .route(
            "/v1/volumes/{name}/import/commit",
            post(volumes::commit_import),
        )
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
        // The dashboard's pages: not API operations, so not in the document.
        .merge(ui::routes())
        .route_layer(middleware::from_fn_with_state(
            state.engine.clone(),
            metrics::count_request,
        ))
        .fallback(no_route)
        // Routes that carry more say so above (the innermost limit wins); the
        // exec route streams stdin and bounds its request line itself.
        .layer(DefaultBodyLimit::max(MAX_JSON_BODY))
        .with_state(state);
    // `Router::layer` wraps each route inside the future that adds `Allow`
    // to a 405, so the error rewrite wraps the whole router instead (as the
    // fallback of an outer one): it sees the answer as it leaves, and a
    // 405's message names its `Allow`.
    Router::new()
        .fallback_service(routes)
        .layer(middleware::from_fn(json_errors))
        .layer(middleware::from_fn(ui::same_origin_only))
        .layer(middleware::from_fn(act_for_caller))
        .layer(middleware::from_fn(trace_request))
}

/// Runs each request on behalf of its caller: the events it causes name
/// them (`cert:NAME` for a cluster certificate, `uid:N` for a local user).
async fn act_for_caller(req: Request, next: Next) -> Response {
    let actor = match (
        req.extensions().get::<PeerCertificate>(),
        req.extensions()
            .get::<axum::extract::ConnectInfo<Caller>>()
            .and_then(|c| c.0.uid),
    ) {
        (Some(PeerCertificate(name)), _) => format!("cert:{name}"),
        (None, Some(uid)) => format!("uid:{uid}"),
        (None, None) => "unknown".to_string(),
    };
    vroom_core::events::acting_for(actor, next.run(req)).await
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
        .is_some_and(|v| {
            // The dashboard's error pages are HTML on purpose.
            v.as_bytes().starts_with(b"application/json") || v.as_bytes().starts_with(b"text/html")
        });
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

#[cfg(test)]
mod tests;
