//! Routes for snapshots (capture, list, remove), restores, warm snapshots
//! of images and forensic removal (`rm --archive`).

use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::Json;
use serde::Deserialize;
use vroom_types::{
    ApiErrorBody, ArchiveReport, ArchiveRequest, Instance, Name, RestoreRequest, Snapshot,
    SnapshotRequest, WarmRequest,
};

use crate::audit::AuditCaller;
use crate::replies::{BodyErrors, HostErrors, PathErrors};
use crate::{bad_request, body, ApiError, ApiResult, AppState};

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub(crate) struct ListQuery {
    /// List the warm snapshots of images instead of the users' snapshots.
    #[serde(default)]
    warm: bool,
}

#[utoipa::path(get, path = "/v1/snapshots", params(ListQuery),
    responses((status = 200, body = Vec<Snapshot>), (status = 400, body = ApiErrorBody)))]
pub(crate) async fn list_snapshots(
    State(engine): State<AppState>,
    query: Result<Query<ListQuery>, QueryRejection>,
) -> ApiResult<Vec<Snapshot>> {
    let Query(query) = query.map_err(|e| bad_request(e.body_text()))?;
    Ok(Json(if query.warm {
        engine.list_warm()
    } else {
        engine.list_snapshots()
    }))
}

/// Captures a running instance: its memory and device state, its config
/// volume and its record, as one object. The guest is paused meanwhile.
#[utoipa::path(post, path = "/v1/snapshots", request_body = SnapshotRequest,
    responses((status = 201, body = Snapshot), BodyErrors, HostErrors,
        (status = 404, body = ApiErrorBody, description = "No such instance."),
        (status = 409, body = ApiErrorBody, description = "The instance is not running, its guest cannot be frozen, or the name is taken.")))]
pub(crate) async fn create_snapshot(
    State(engine): State<AppState>,
    req: Result<Json<SnapshotRequest>, JsonRejection>,
) -> Result<(StatusCode, Json<Snapshot>), ApiError> {
    Ok((
        StatusCode::CREATED,
        Json(engine.snapshot(body(req)?).await?),
    ))
}

#[utoipa::path(get, path = "/v1/snapshots/{name}", params(("name" = Name, Path)),
    responses((status = 200, body = Snapshot), PathErrors,
        (status = 409, body = ApiErrorBody, description = "The snapshot is still being written.")))]
pub(crate) async fn get_snapshot(
    State(engine): State<AppState>,
    Path(name): Path<String>,
) -> ApiResult<Snapshot> {
    Ok(Json(engine.get_snapshot(&name)?))
}

#[utoipa::path(delete, path = "/v1/snapshots/{name}", params(("name" = Name, Path)),
    responses((status = 204), PathErrors, HostErrors,
        (status = 409, body = ApiErrorBody, description = "The snapshot is still being written.")))]
pub(crate) async fn remove_snapshot(
    State(engine): State<AppState>,
    Path(name): Path<String>,
) -> Result<StatusCode, ApiError> {
    engine.remove_snapshot(&name).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Puts an instance back to a snapshot (memory, devices and config). The
/// snapshot is verified first; the instance's current VM is discarded.
#[utoipa::path(post, path = "/v1/instances/{name}/restore", params(("name" = Name, Path)),
    request_body = RestoreRequest,
    responses((status = 200, body = Instance), PathErrors, BodyErrors, HostErrors,
        (status = 409, body = ApiErrorBody, description = "The snapshot is of another shape (image, memory, CPUs, NICs) or machine, corrupt, or still being written, or the instance is spliced.")))]
pub(crate) async fn restore_instance(
    State(engine): State<AppState>,
    Path(name): Path<String>,
    req: Result<Json<RestoreRequest>, JsonRejection>,
) -> ApiResult<Instance> {
    let req = body(req)?;
    Ok(Json(engine.restore(&name, req.snapshot.as_str()).await?))
}

/// Boots the image once with its default config, waits until it is ready
/// and keeps a warm snapshot that `run` starts from instead of booting.
#[utoipa::path(post, path = "/v1/images/{name}/warm", params(("name" = String, Path, description = "An image name or id.", max_length = 80)),
    request_body = WarmRequest,
    responses((status = 201, body = Snapshot), PathErrors, BodyErrors, HostErrors,
        (status = 409, body = ApiErrorBody, description = "The image's default config does not work."),
        (status = 422, body = ApiErrorBody, description = "This host cannot run it (memory beyond the host's, no KVM).")))]
pub(crate) async fn warm_image(
    State(engine): State<AppState>,
    Path(name): Path<String>,
    req: Result<Json<WarmRequest>, JsonRejection>,
) -> Result<(StatusCode, Json<Snapshot>), ApiError> {
    let req = body(req)?;
    Ok((
        StatusCode::CREATED,
        Json(engine.warm_image(&name, req.mem_mib).await?),
    ))
}

/// Removes the warm snapshots of an image (every shape of it), by the name
/// `GET /v1/snapshots?warm=true` shows or the image's id, and answers
/// what it removed. `run` boots the image again until it is warmed anew.
#[utoipa::path(delete, path = "/v1/images/{name}/warm", params(("name" = String, Path, description = "The warm snapshot's name (the image's name) or the image's id.", max_length = 80)),
    responses((status = 200, body = Vec<Snapshot>), HostErrors,
        (status = 404, body = ApiErrorBody, description = "The image has no warm snapshot.")))]
pub(crate) async fn remove_warm(
    State(engine): State<AppState>,
    Path(name): Path<String>,
) -> ApiResult<Vec<Snapshot>> {
    Ok(Json(engine.remove_warm(&name).await?))
}

/// Removes an instance after archiving it for forensics: a final snapshot
/// of its memory when it runs, its config volume and history, its console
/// logs and its record, with a sha256 manifest; its files are overwritten
/// before they are unlinked.
#[utoipa::path(post, path = "/v1/instances/{name}/archive", params(("name" = Name, Path)),
    request_body = ArchiveRequest,
    responses((status = 200, body = ArchiveReport), PathErrors, BodyErrors, HostErrors,
        (status = 409, body = ApiErrorBody, description = "The archive directory is not empty, not writable, a symbolic link (or its parent is), or a caller other than root could not write there itself; or the instance cannot be removed (spliced, a room's firewall).")))]
pub(crate) async fn archive_instance(
    State(engine): State<AppState>,
    Path(name): Path<String>,
    AuditCaller(caller): AuditCaller,
    req: Result<Json<ArchiveRequest>, JsonRejection>,
) -> ApiResult<ArchiveReport> {
    let req = body(req)?;
    Ok(Json(
        engine
            .remove_archived(&name, &req.dir, caller.uid.zip(caller.gid))
            .await?,
    ))
}
