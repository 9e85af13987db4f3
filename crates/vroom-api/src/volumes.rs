//! Routes for data volumes.

use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;
use vroom_types::{ApiErrorBody, Name, Volume, VolumeCreateRequest, VolumeResizeRequest};

use crate::replies::{BodyErrors, HostErrors, PathErrors};
use crate::{body, ApiError, ApiResult, AppState};

#[utoipa::path(get, path = "/v1/volumes", responses((status = 200, body = Vec<Volume>), HostErrors))]
pub(crate) async fn list_volumes(State(engine): State<AppState>) -> ApiResult<Vec<Volume>> {
    Ok(Json(engine.list_volumes()?))
}

/// Creates a volume: a sparse file on this host, formatted with its
/// filesystem. Refused when the host's disk has less free space than its size.
#[utoipa::path(post, path = "/v1/volumes", request_body = VolumeCreateRequest,
    responses((status = 201, body = Volume), BodyErrors, HostErrors,
        (status = 409, body = ApiErrorBody, description = "A volume of that name exists."),
        (status = 422, body = ApiErrorBody, description = "Two replicas on a host outside a cluster."),
        (status = 507, body = ApiErrorBody, description = "Not enough free disk space.")))]
pub(crate) async fn create_volume(
    State(engine): State<AppState>,
    req: Result<Json<VolumeCreateRequest>, JsonRejection>,
) -> Result<(StatusCode, Json<Volume>), ApiError> {
    Ok((
        StatusCode::CREATED,
        Json(engine.create_volume(body(req)?).await?),
    ))
}

#[utoipa::path(get, path = "/v1/volumes/{name}", params(("name" = Name, Path)),
    responses((status = 200, body = Volume), PathErrors, HostErrors))]
pub(crate) async fn get_volume(
    State(engine): State<AppState>,
    Path(name): Path<String>,
) -> ApiResult<Volume> {
    Ok(Json(engine.volume(&name)?))
}

/// Removes a volume and its data; refused while an instance has it.
#[utoipa::path(delete, path = "/v1/volumes/{name}", params(("name" = Name, Path)),
    responses((status = 204), PathErrors, HostErrors,
        (status = 409, body = ApiErrorBody, description = "An instance has the volume attached.")))]
pub(crate) async fn remove_volume(
    State(engine): State<AppState>,
    Path(name): Path<String>,
) -> Result<StatusCode, ApiError> {
    engine.remove_volume(&name).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Grows a volume; its guest grows the filesystem when it next mounts it.
#[utoipa::path(post, path = "/v1/volumes/{name}/resize", params(("name" = Name, Path)),
    request_body = VolumeResizeRequest,
    responses((status = 200, body = Volume), PathErrors, BodyErrors, HostErrors,
        (status = 409, body = ApiErrorBody, description = "The volume's instance runs."),
        (status = 507, body = ApiErrorBody, description = "Not enough free disk space.")))]
pub(crate) async fn resize_volume(
    State(engine): State<AppState>,
    Path(name): Path<String>,
    req: Result<Json<VolumeResizeRequest>, JsonRejection>,
) -> ApiResult<Volume> {
    Ok(Json(engine.resize_volume(&name, body(req)?).await?))
}
