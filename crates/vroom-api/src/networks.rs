//! Routes for networks: list, create, inspect, remove.

use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;
use vroom_types::{ApiErrorBody, Name, Network, NetworkSpec};

use crate::replies::{BodyErrors, HostErrors, PathErrors};
use crate::{body, ApiError, ApiResult, AppState};

#[utoipa::path(get, path = "/v1/networks", responses((status = 200, body = Vec<Network>)))]
pub(crate) async fn list_networks(State(engine): State<AppState>) -> Json<Vec<Network>> {
    Json(engine.list_networks())
}

#[utoipa::path(post, path = "/v1/networks", request_body = NetworkSpec,
    responses((status = 201, body = Network), BodyErrors, HostErrors,
        (status = 409, body = ApiErrorBody, description = "The name is taken, or the subnet overlaps another network or a host address."),
        (status = 507, body = ApiErrorBody, description = "No free subnet is left.")))]
pub(crate) async fn create_network(
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
pub(crate) async fn get_network(
    State(engine): State<AppState>,
    Path(name): Path<String>,
) -> ApiResult<Network> {
    Ok(Json(engine.network(&name)?))
}

#[utoipa::path(delete, path = "/v1/networks/{name}", params(("name" = Name, Path)),
    responses((status = 204), PathErrors, HostErrors,
        (status = 409, body = ApiErrorBody, description = "Instances are attached to it.")))]
pub(crate) async fn remove_network(
    State(engine): State<AppState>,
    Path(name): Path<String>,
) -> Result<StatusCode, ApiError> {
    engine.remove_network(&name).await?;
    Ok(StatusCode::NO_CONTENT)
}
