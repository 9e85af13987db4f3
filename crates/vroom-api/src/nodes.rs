//! Routes for the cluster's nodes: list, inspect, cordon, uncordon, drain.
//! A host that is not in a cluster answers 409 to each.

use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::Json;
use serde::Deserialize;
use vroom_types::{DrainReport, Name, NodeInfo};

use crate::replies::{HostErrors, PathErrors};
use crate::{bad_request, ApiResult, Service};

#[utoipa::path(get, path = "/v1/nodes",
    responses((status = 200, body = Vec<NodeInfo>), HostErrors,
        (status = 409, body = vroom_types::ApiErrorBody, description = "This host is not in a cluster.")))]
pub(crate) async fn list_nodes(State(vroomd): State<Service>) -> ApiResult<Vec<NodeInfo>> {
    Ok(Json(vroomd.nodes().await?))
}

#[utoipa::path(get, path = "/v1/nodes/{name}", params(("name" = Name, Path)),
    responses((status = 200, body = NodeInfo), PathErrors, HostErrors,
        (status = 409, body = vroom_types::ApiErrorBody, description = "This host is not in a cluster.")))]
pub(crate) async fn get_node(
    State(vroomd): State<Service>,
    Path(name): Path<String>,
) -> ApiResult<NodeInfo> {
    Ok(Json(vroomd.node(&name).await?))
}

#[utoipa::path(post, path = "/v1/nodes/{name}/cordon", params(("name" = Name, Path)),
    responses((status = 200, body = NodeInfo), PathErrors, HostErrors,
        (status = 409, body = vroom_types::ApiErrorBody, description = "This host is not in a cluster.")))]
pub(crate) async fn cordon_node(
    State(vroomd): State<Service>,
    Path(name): Path<String>,
) -> ApiResult<NodeInfo> {
    Ok(Json(vroomd.cordon(&name, true).await?))
}

#[utoipa::path(post, path = "/v1/nodes/{name}/uncordon", params(("name" = Name, Path)),
    responses((status = 200, body = NodeInfo), PathErrors, HostErrors,
        (status = 409, body = vroom_types::ApiErrorBody, description = "This host is not in a cluster.")))]
pub(crate) async fn uncordon_node(
    State(vroomd): State<Service>,
    Path(name): Path<String>,
) -> ApiResult<NodeInfo> {
    Ok(Json(vroomd.cordon(&name, false).await?))
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub(crate) struct DrainQuery {
    /// Leave the instances no other node can take running on the node
    /// instead of refusing.
    #[serde(default)]
    force: bool,
}

/// Cordons the node and moves its instances to other nodes; answers once
/// they have moved, with where each went.
#[utoipa::path(post, path = "/v1/nodes/{name}/drain", params(("name" = Name, Path), DrainQuery),
    responses((status = 200, body = DrainReport), PathErrors, HostErrors,
        (status = 409, body = vroom_types::ApiErrorBody, description = "This host is not in a cluster, an instance has no node to go to (nothing changed; `force` leaves it running there), or an instance did not move.")))]
pub(crate) async fn drain_node(
    State(vroomd): State<Service>,
    Path(name): Path<String>,
    query: Result<Query<DrainQuery>, QueryRejection>,
) -> ApiResult<DrainReport> {
    let Query(query) = query.map_err(|e| bad_request(e.body_text()))?;
    Ok(Json(vroomd.drain(&name, query.force).await?))
}

#[utoipa::path(delete, path = "/v1/nodes/{name}", params(("name" = Name, Path)),
    responses((status = 204), PathErrors, HostErrors,
        (status = 409, body = vroom_types::ApiErrorBody, description = "This host is not in a cluster, or the node is alive or still holds instances.")))]
pub(crate) async fn remove_node(
    State(vroomd): State<Service>,
    Path(name): Path<String>,
) -> Result<StatusCode, crate::ApiError> {
    vroomd.remove_node(&name).await?;
    Ok(StatusCode::NO_CONTENT)
}
