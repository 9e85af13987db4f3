//! Routes for the cluster's nodes: list, inspect, cordon, uncordon, drain.
//! A host that is not in a cluster answers 409 to each.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;
use vroom_core::cluster::Cluster;
use vroom_core::OpError;
use vroom_types::{ErrorCode, Name, NodeInfo};

use crate::replies::{HostErrors, PathErrors};
use crate::{ApiResult, AppState};

pub(crate) fn cluster_of(engine: &AppState) -> Result<std::sync::Arc<dyn Cluster>, OpError> {
    engine.cluster().ok_or_else(|| {
        OpError::new(
            ErrorCode::Conflict,
            "this host is not in a cluster (start vroomd with --cluster)",
        )
    })
}

#[utoipa::path(get, path = "/v1/nodes",
    responses((status = 200, body = Vec<NodeInfo>), HostErrors,
        (status = 409, body = vroom_types::ApiErrorBody, description = "This host is not in a cluster.")))]
pub(crate) async fn list_nodes(State(engine): State<AppState>) -> ApiResult<Vec<NodeInfo>> {
    Ok(Json(cluster_of(&engine)?.nodes().await?))
}

#[utoipa::path(get, path = "/v1/nodes/{name}", params(("name" = Name, Path)),
    responses((status = 200, body = NodeInfo), PathErrors, HostErrors,
        (status = 409, body = vroom_types::ApiErrorBody, description = "This host is not in a cluster.")))]
pub(crate) async fn get_node(
    State(engine): State<AppState>,
    Path(name): Path<String>,
) -> ApiResult<NodeInfo> {
    Ok(Json(cluster_of(&engine)?.node(&name).await?))
}

#[utoipa::path(post, path = "/v1/nodes/{name}/cordon", params(("name" = Name, Path)),
    responses((status = 200, body = NodeInfo), PathErrors, HostErrors,
        (status = 409, body = vroom_types::ApiErrorBody, description = "This host is not in a cluster.")))]
pub(crate) async fn cordon_node(
    State(engine): State<AppState>,
    Path(name): Path<String>,
) -> ApiResult<NodeInfo> {
    Ok(Json(cluster_of(&engine)?.cordon(&name, true).await?))
}

#[utoipa::path(post, path = "/v1/nodes/{name}/uncordon", params(("name" = Name, Path)),
    responses((status = 200, body = NodeInfo), PathErrors, HostErrors,
        (status = 409, body = vroom_types::ApiErrorBody, description = "This host is not in a cluster.")))]
pub(crate) async fn uncordon_node(
    State(engine): State<AppState>,
    Path(name): Path<String>,
) -> ApiResult<NodeInfo> {
    Ok(Json(cluster_of(&engine)?.cordon(&name, false).await?))
}

#[utoipa::path(post, path = "/v1/nodes/{name}/drain", params(("name" = Name, Path)),
    responses((status = 200, body = NodeInfo), PathErrors, HostErrors,
        (status = 409, body = vroom_types::ApiErrorBody, description = "This host is not in a cluster, or an instance cannot move.")))]
pub(crate) async fn drain_node(
    State(engine): State<AppState>,
    Path(name): Path<String>,
) -> ApiResult<NodeInfo> {
    Ok(Json(cluster_of(&engine)?.drain(&name).await?))
}

#[utoipa::path(delete, path = "/v1/nodes/{name}", params(("name" = Name, Path)),
    responses((status = 204), PathErrors, HostErrors,
        (status = 409, body = vroom_types::ApiErrorBody, description = "This host is not in a cluster, or the node is alive or still holds instances.")))]
pub(crate) async fn remove_node(
    State(engine): State<AppState>,
    Path(name): Path<String>,
) -> Result<StatusCode, crate::ApiError> {
    cluster_of(&engine)?.remove_node(&name).await?;
    Ok(StatusCode::NO_CONTENT)
}
