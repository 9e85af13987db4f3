//! Routes for an instance's configuration: read, update, replace, reset,
//! its history, versions, diffs and rollback.

use axum::extract::rejection::{JsonRejection, PathRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::Json;
use serde::Deserialize;
use vroom_types::{
    ConfigDiff, ConfigDocument, ConfigHistory, ConfigRollback, ConfigUpdate, ConfigVersion, Name,
};

use crate::replies::{BodyErrors, ConfigErrors, HostErrors, PathErrors};
use crate::{bad_request, body, body_within, ApiResult, AppState, MAX_CONFIG_BODY};

#[utoipa::path(get, path = "/v1/instances/{name}/config", params(("name" = Name, Path)),
    responses((status = 200, body = ConfigDocument), PathErrors, HostErrors))]
pub(crate) async fn get_config(
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
pub(crate) async fn update_config(
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
pub(crate) async fn replace_config(
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
pub(crate) async fn reset_config(
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
pub(crate) async fn config_history(
    State(engine): State<AppState>,
    Path(name): Path<String>,
) -> ApiResult<ConfigHistory> {
    Ok(Json(engine.config_history(&name).await?))
}

/// One config version with its values.
#[utoipa::path(get, path = "/v1/instances/{name}/config/versions/{version}",
    params(("name" = Name, Path), ("version" = u64, Path, minimum = 1)),
    responses((status = 200, body = ConfigVersion), PathErrors, HostErrors))]
pub(crate) async fn config_version(
    State(engine): State<AppState>,
    path: Result<Path<(String, u64)>, PathRejection>,
) -> ApiResult<ConfigVersion> {
    let Path((name, version)) = path.map_err(|e| bad_request(e.body_text()))?;
    Ok(Json(engine.config_version(&name, version).await?))
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub(crate) struct DiffQuery {
    /// The older version; by default the one before `to`.
    from: Option<u64>,
    /// The newer version; by default the current one.
    to: Option<u64>,
}

/// The keys that differ between two config versions.
#[utoipa::path(get, path = "/v1/instances/{name}/config/diff", params(("name" = Name, Path), DiffQuery),
    responses((status = 200, body = ConfigDiff), PathErrors, HostErrors))]
pub(crate) async fn config_diff(
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
pub(crate) async fn rollback_config(
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
