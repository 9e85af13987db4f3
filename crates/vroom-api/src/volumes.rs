//! Routes for data volumes.

use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;
use vroom_types::{
    ApiErrorBody, Name, Volume, VolumeCloneRequest, VolumeCreateRequest, VolumeExport,
    VolumeExportRequest, VolumeImportRequest, VolumeResizeRequest, VolumeRestoreRequest,
    VolumeSnapshot, VolumeSnapshotRequest,
};

use crate::audit::AuditCaller;
use crate::replies::{BodyErrors, HostErrors, PathErrors};
use crate::{body, object_body, ApiError, ApiResult, AppState, Service};

#[utoipa::path(get, path = "/v1/volumes", responses((status = 200, body = Vec<Volume>), HostErrors))]
pub(crate) async fn list_volumes(State(vroomd): State<Service>) -> ApiResult<Vec<Volume>> {
    Ok(Json(vroomd.list_volumes().await?))
}

/// Creates a volume: a sparse file on this host, formatted with its
/// filesystem. Refused when the host's disk has less free space than its size.
#[utoipa::path(post, path = "/v1/volumes", request_body = VolumeCreateRequest,
    responses((status = 201, body = Volume), BodyErrors, HostErrors,
        (status = 409, body = ApiErrorBody, description = "A volume of that name exists."),
        (status = 422, body = ApiErrorBody, description = "Two replicas on a host outside a cluster, a replica node for a volume with one copy, or not enough free disk space here.")))]
pub(crate) async fn create_volume(
    State(vroomd): State<Service>,
    req: Result<Json<VolumeCreateRequest>, JsonRejection>,
) -> Result<(StatusCode, Json<Volume>), ApiError> {
    Ok((
        StatusCode::CREATED,
        Json(vroomd.create_volume(body(req)?).await?),
    ))
}

#[utoipa::path(get, path = "/v1/volumes/{name}", params(("name" = Name, Path)),
    responses((status = 200, body = Volume), PathErrors, HostErrors))]
pub(crate) async fn get_volume(
    State(vroomd): State<Service>,
    Path(name): Path<String>,
) -> ApiResult<Volume> {
    Ok(Json(vroomd.volume(&name).await?))
}

/// Removes a volume and its data; refused while an instance has it.
#[utoipa::path(delete, path = "/v1/volumes/{name}", params(("name" = Name, Path)),
    responses((status = 204), PathErrors, HostErrors,
        (status = 409, body = ApiErrorBody, description = "An instance has the volume attached.")))]
pub(crate) async fn remove_volume(
    State(vroomd): State<Service>,
    Path(name): Path<String>,
) -> Result<StatusCode, ApiError> {
    vroomd.remove_volume(&name).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Grows a volume; a running guest grows its filesystem at once, a stopped
/// one when it next mounts it.
#[utoipa::path(post, path = "/v1/volumes/{name}/resize", params(("name" = Name, Path)),
    request_body = VolumeResizeRequest,
    responses((status = 200, body = Volume), PathErrors, BodyErrors, HostErrors,
        (status = 409, body = ApiErrorBody, description = "The volume is larger (volumes only grow), or it is a cluster's (one copy or two): vroom cannot grow those yet."),
        (status = 422, body = ApiErrorBody, description = "Not enough free disk space here.")))]
pub(crate) async fn resize_volume(
    State(engine): State<AppState>,
    Path(name): Path<String>,
    req: Result<Json<VolumeResizeRequest>, JsonRejection>,
) -> ApiResult<Volume> {
    Ok(Json(engine.resize_volume(&name, body(req)?).await?))
}

/// Takes a snapshot of a volume: a sparse copy on this host. A running
/// guest is frozen and paused for the copy.
#[utoipa::path(post, path = "/v1/volumes/{name}/snapshots", params(("name" = Name, Path)),
    request_body = VolumeSnapshotRequest,
    responses((status = 201, body = VolumeSnapshot), PathErrors, BodyErrors, HostErrors,
        (status = 409, body = ApiErrorBody, description = "A volume snapshot of that name exists."),
        (status = 422, body = ApiErrorBody, description = "Not enough free disk space here.")))]
pub(crate) async fn snapshot_volume(
    State(engine): State<AppState>,
    Path(name): Path<String>,
    req: Result<Json<serde_json::Value>, JsonRejection>,
) -> Result<(StatusCode, Json<VolumeSnapshot>), ApiError> {
    Ok((
        StatusCode::CREATED,
        Json(engine.snapshot_volume(&name, object_body(req)?).await?),
    ))
}

#[utoipa::path(delete, path = "/v1/volumes/{name}/snapshots/{snapshot}",
    params(("name" = Name, Path), ("snapshot" = Name, Path)),
    responses((status = 204), PathErrors, HostErrors))]
pub(crate) async fn remove_volume_snapshot(
    State(engine): State<AppState>,
    Path((name, snapshot)): Path<(String, String)>,
) -> Result<StatusCode, ApiError> {
    engine.remove_volume_snapshot(&name, &snapshot).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Puts a volume back to one of its snapshots; its instance must be stopped.
#[utoipa::path(post, path = "/v1/volumes/{name}/restore", params(("name" = Name, Path)),
    request_body = VolumeRestoreRequest,
    responses((status = 200, body = Volume), PathErrors, BodyErrors, HostErrors,
        (status = 409, body = ApiErrorBody, description = "Its instance runs, or the snapshot is another volume's.")))]
pub(crate) async fn restore_volume(
    State(engine): State<AppState>,
    Path(name): Path<String>,
    req: Result<Json<VolumeRestoreRequest>, JsonRejection>,
) -> ApiResult<Volume> {
    Ok(Json(engine.restore_volume(&name, body(req)?).await?))
}

/// Makes a new volume with a snapshot's content.
#[utoipa::path(post, path = "/v1/volume-snapshots/{snapshot}/clone", params(("snapshot" = Name, Path)),
    request_body = VolumeCloneRequest,
    responses((status = 201, body = Volume), PathErrors, BodyErrors, HostErrors,
        (status = 409, body = ApiErrorBody, description = "A volume of that name exists."),
        (status = 422, body = ApiErrorBody, description = "Not enough free disk space here.")))]
pub(crate) async fn clone_volume(
    State(engine): State<AppState>,
    Path(snapshot): Path<String>,
    req: Result<Json<VolumeCloneRequest>, JsonRejection>,
) -> Result<(StatusCode, Json<Volume>), ApiError> {
    Ok((
        StatusCode::CREATED,
        Json(engine.clone_volume(&snapshot, body(req)?).await?),
    ))
}

/// Serves a volume, or one of its snapshots, read-only over NBD (a
/// `qemu-nbd` process vroomd supervises): a point in time, so a volume a
/// running instance has is refused unless `backup` asks for a snapshot taken
/// for the export. Only root may name a unix socket path or a port below 1024.
#[utoipa::path(post, path = "/v1/volumes/{name}/export", params(("name" = Name, Path)),
    request_body = VolumeExportRequest,
    responses((status = 201, body = VolumeExport), PathErrors, BodyErrors, HostErrors,
        (status = 409, body = ApiErrorBody, description = "The volume is exported already, its running instance has it, or the address is in use."),
        (status = 422, body = ApiErrorBody, description = "The listen address is not unix:PATH or tcp:ADDR:PORT (code `invalid_volume`).")))]
pub(crate) async fn export_volume(
    State(engine): State<AppState>,
    AuditCaller(caller): AuditCaller,
    Path(name): Path<String>,
    req: Result<Json<serde_json::Value>, JsonRejection>,
) -> Result<(StatusCode, Json<VolumeExport>), ApiError> {
    let req: VolumeExportRequest = object_body(req)?;
    Ok((
        StatusCode::CREATED,
        Json(engine.export_volume(&name, req, caller.uid).await?),
    ))
}

/// Ends a volume's export (and removes a snapshot taken for it), or drops
/// an import that was not committed.
#[utoipa::path(delete, path = "/v1/volumes/{name}/export", params(("name" = Name, Path)),
    responses((status = 204), PathErrors, HostErrors))]
pub(crate) async fn unexport_volume(
    State(engine): State<AppState>,
    Path(name): Path<String>,
) -> Result<StatusCode, ApiError> {
    engine.unexport_volume(&name).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Starts an import: an empty staging file of the size asked, served
/// writable over NBD on a unix socket under the data dir. The client writes
/// the image into it, then commits. No volume is listed until the commit.
#[utoipa::path(post, path = "/v1/volumes/{name}/import", params(("name" = Name, Path)),
    request_body = VolumeImportRequest,
    responses((status = 201, body = VolumeExport), PathErrors, BodyErrors, HostErrors,
        (status = 409, body = ApiErrorBody, description = "A volume of that name exists or is being imported."),
        (status = 422, body = ApiErrorBody, description = "Not enough free disk space here.")))]
pub(crate) async fn import_volume(
    State(engine): State<AppState>,
    Path(name): Path<String>,
    req: Result<Json<VolumeImportRequest>, JsonRejection>,
) -> Result<(StatusCode, Json<VolumeExport>), ApiError> {
    let req = body(req)?;
    Ok((
        StatusCode::CREATED,
        Json(engine.import_volume(&name, req).await?),
    ))
}

/// Makes the volume an import wrote, if it holds an ext4 filesystem;
/// drops the import otherwise.
#[utoipa::path(post, path = "/v1/volumes/{name}/import/commit", params(("name" = Name, Path)),
    responses((status = 201, body = Volume), PathErrors, HostErrors,
        (status = 422, body = ApiErrorBody, description = "The image is not an ext4 filesystem.")))]
pub(crate) async fn commit_import(
    State(engine): State<AppState>,
    Path(name): Path<String>,
) -> Result<(StatusCode, Json<Volume>), ApiError> {
    Ok((
        StatusCode::CREATED,
        Json(engine.commit_import(&name).await?),
    ))
}
