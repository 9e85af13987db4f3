//! Routes for splices (an appliance inline in front of a running VM) and
//! mirrors (a copy of a VM NIC's traffic to a capture appliance).

use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;
use vroom_types::{ApiErrorBody, Mirror, MirrorRequest, Name, Splice, SpliceRequest};

use crate::replies::{BodyErrors, HostErrors, PathErrors};
use crate::{body, ApiError, ApiResult, AppState};

#[utoipa::path(get, path = "/v1/splices", responses((status = 200, body = Vec<Splice>)))]
pub(crate) async fn list_splices(State(engine): State<AppState>) -> Json<Vec<Splice>> {
    Json(engine.list_splices())
}

/// Returns once the VM's traffic goes through the appliance.
#[utoipa::path(post, path = "/v1/splices", request_body = SpliceRequest,
    responses((status = 201, body = Splice), BodyErrors, HostErrors,
        (status = 404, body = ApiErrorBody, description = "No such VM, NIC, or instance or image to splice."),
        (status = 409, body = ApiErrorBody, description = "The request does not fit what it names: the VM is not running or is the appliance itself, the appliance has no outside and inside NICs or is already spliced or running, or the name is taken."),
        (status = 502, body = ApiErrorBody, description = "The appliance did not come up; nothing was changed.")))]
pub(crate) async fn create_splice(
    State(engine): State<AppState>,
    req: Result<Json<SpliceRequest>, JsonRejection>,
) -> Result<(StatusCode, Json<Splice>), ApiError> {
    Ok((StatusCode::CREATED, Json(engine.splice(body(req)?).await?)))
}

#[utoipa::path(get, path = "/v1/splices/{appliance}", params(("appliance" = Name, Path)),
    responses((status = 200, body = Splice), PathErrors))]
pub(crate) async fn get_splice(
    State(engine): State<AppState>,
    Path(appliance): Path<String>,
) -> ApiResult<Splice> {
    Ok(Json(engine.get_splice(&appliance)?))
}

/// Takes the appliance out of the path (the VM's NIC goes back where it
/// was) and removes it, or stops it when it existed before the splice.
#[utoipa::path(delete, path = "/v1/splices/{appliance}", params(("appliance" = Name, Path)),
    responses((status = 204), PathErrors, HostErrors))]
pub(crate) async fn remove_splice(
    State(engine): State<AppState>,
    Path(appliance): Path<String>,
) -> Result<StatusCode, ApiError> {
    engine.unsplice(&appliance).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(get, path = "/v1/mirrors", responses((status = 200, body = Vec<Mirror>)))]
pub(crate) async fn list_mirrors(State(engine): State<AppState>) -> Json<Vec<Mirror>> {
    Json(engine.list_mirrors())
}

#[utoipa::path(post, path = "/v1/mirrors", request_body = MirrorRequest,
    responses((status = 201, body = Mirror), BodyErrors, HostErrors,
        (status = 404, body = ApiErrorBody, description = "No such VM, appliance or NIC."),
        (status = 409, body = ApiErrorBody, description = "That NIC is already mirrored there, the target is the VM itself or its NIC is no capture NIC (mirror-sink)."),
        (status = 422, body = ApiErrorBody, description = "libpcap's compiler refuses the filter.")))]
pub(crate) async fn create_mirror(
    State(engine): State<AppState>,
    req: Result<Json<MirrorRequest>, JsonRejection>,
) -> Result<(StatusCode, Json<Mirror>), ApiError> {
    Ok((StatusCode::CREATED, Json(engine.mirror(body(req)?).await?)))
}

#[utoipa::path(delete, path = "/v1/mirrors/{id}",
    params(("id" = String, Path, description = "The mirror's id, `VM.NIC-TO.NIC`.", max_length = 80)),
    responses((status = 204), PathErrors, HostErrors))]
pub(crate) async fn remove_mirror(
    State(engine): State<AppState>,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    engine.unmirror(&id).await?;
    Ok(StatusCode::NO_CONTENT)
}
