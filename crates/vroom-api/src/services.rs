//! Routes for services: members of one image behind a load balancer,
//! kept at their number by vroomd.

use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;
use vroom_types::{
    ApiErrorBody, Name, Service, ServiceDefinition, ServiceScaleRequest, ServiceUpdateRequest,
};

use crate::replies::{BodyErrors, HostErrors, PathErrors};
use crate::{body, ApiError, ApiResult, AppState};

#[utoipa::path(get, path = "/v1/services", responses((status = 200, body = Vec<Service>), HostErrors))]
pub(crate) async fn list_services(State(engine): State<AppState>) -> ApiResult<Vec<Service>> {
    Ok(Json(engine.services().await?))
}

/// Records the service and returns; vroomd then makes its balancer and
/// members (`ready` in `GET /v1/services/{name}` counts those the balancer
/// sends requests to).
#[utoipa::path(post, path = "/v1/services", request_body = ServiceDefinition,
    responses((status = 201, body = Service), BodyErrors, HostErrors,
        (status = 404, body = ApiErrorBody, description = "No such network, room or image."),
        (status = 422, body = ApiErrorBody, description = "The rules of services refuse it: bounds, a target without room to scale or bounds without one, a network and a room both or neither, an image that serves another port (code `invalid_service`)."),
        (status = 409, body = ApiErrorBody, description = "The service exists, or an instance has a name it would give.")))]
pub(crate) async fn create_service(
    State(engine): State<AppState>,
    req: Result<Json<ServiceDefinition>, JsonRejection>,
) -> Result<(StatusCode, Json<Service>), ApiError> {
    let definition = body(req)?;
    Ok((
        StatusCode::CREATED,
        Json(engine.create_service(definition).await?),
    ))
}

#[utoipa::path(get, path = "/v1/services/{name}", params(("name" = Name, Path)),
    responses((status = 200, body = Service), PathErrors))]
pub(crate) async fn get_service(
    State(engine): State<AppState>,
    Path(name): Path<String>,
) -> ApiResult<Service> {
    Ok(Json(engine.service(&name).await?))
}

/// Records the number of members (or the autoscaler's bounds) and returns;
/// vroomd then adds or drains and removes members until the service has it.
#[utoipa::path(post, path = "/v1/services/{name}/scale", params(("name" = Name, Path)),
    request_body = ServiceScaleRequest,
    responses((status = 202, body = Service), PathErrors, BodyErrors, HostErrors,
        (status = 422, body = ApiErrorBody, description = "Bounds whose minimum is above their maximum, one bound alone, or a number outside the bounds (code `invalid_service`)."),
        (status = 409, body = ApiErrorBody, description = "The service is being removed.")))]
pub(crate) async fn scale_service(
    State(engine): State<AppState>,
    Path(name): Path<String>,
    req: Result<Json<ServiceScaleRequest>, JsonRejection>,
) -> Result<(StatusCode, Json<Service>), ApiError> {
    let req = body(req)?;
    Ok((
        StatusCode::ACCEPTED,
        Json(engine.scale_service(&name, req).await?),
    ))
}

/// Records a rolling update and returns; vroomd then brings up members of
/// the new image one at a time, each into the balancer before an old one
/// drains and goes. A new member that fails rolls the service back (`update`
/// in `GET /v1/services/{name}` shows it; events say why).
#[utoipa::path(post, path = "/v1/services/{name}/update", params(("name" = Name, Path)),
    request_body = ServiceUpdateRequest,
    responses((status = 202, body = Service), PathErrors, BodyErrors, HostErrors,
        (status = 422, body = ApiErrorBody, description = "The service already runs that image, or the image serves another port (code `invalid_service`)."),
        (status = 409, body = ApiErrorBody, description = "The service is being removed or already updating.")))]
pub(crate) async fn update_service(
    State(engine): State<AppState>,
    Path(name): Path<String>,
    req: Result<Json<ServiceUpdateRequest>, JsonRejection>,
) -> Result<(StatusCode, Json<Service>), ApiError> {
    let req = body(req)?;
    Ok((
        StatusCode::ACCEPTED,
        Json(engine.update_service(&name, &req.image).await?),
    ))
}

/// Marks the service removed and returns; vroomd then removes its members,
/// its balancer and the service (a `GET` answers 404 once it is gone).
#[utoipa::path(delete, path = "/v1/services/{name}", params(("name" = Name, Path)),
    responses((status = 202), PathErrors, HostErrors))]
pub(crate) async fn remove_service(
    State(engine): State<AppState>,
    Path(name): Path<String>,
) -> Result<StatusCode, ApiError> {
    engine.remove_service(&name).await?;
    Ok(StatusCode::ACCEPTED)
}
