//! Routes for server rooms and the topology.

use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::Json;
use serde::Deserialize;
use vroom_core::OpError;
use vroom_types::{
    ApiErrorBody, ApplyRoomRequest, ErrorCode, Expose, Name, Protocol, Room, RoomFile, RoomPlan,
    RoomSpec, Topology,
};

use crate::replies::{BodyErrors, HostErrors, PathErrors};
use crate::{bad_request, body, body_within, ApiError, ApiResult, AppState};

#[utoipa::path(get, path = "/v1/rooms", responses((status = 200, body = Vec<Room>)))]
pub(crate) async fn list_rooms(State(engine): State<AppState>) -> Json<Vec<Room>> {
    Json(engine.list_rooms())
}

/// Creates the room's lan and dmz networks and its firewall; returns once
/// the firewall is ready.
#[utoipa::path(post, path = "/v1/rooms", request_body = RoomSpec,
    responses((status = 201, body = Room), BodyErrors, HostErrors,
        (status = 404, body = ApiErrorBody, description = "No such wan network, or no firewall image."),
        (status = 409, body = ApiErrorBody, description = "The room, its networks or its firewall's name exist, or the wan is isolated.")))]
pub(crate) async fn create_room(
    State(engine): State<AppState>,
    req: Result<Json<RoomSpec>, JsonRejection>,
) -> Result<(StatusCode, Json<Room>), ApiError> {
    Ok((
        StatusCode::CREATED,
        Json(engine.create_room(body(req)?).await?),
    ))
}

#[utoipa::path(get, path = "/v1/rooms/{name}", params(("name" = Name, Path)),
    responses((status = 200, body = Room), PathErrors))]
pub(crate) async fn get_room(
    State(engine): State<AppState>,
    Path(name): Path<String>,
) -> ApiResult<Room> {
    Ok(Json(engine.get_room(&name)?))
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub(crate) struct RemoveRoomQuery {
    /// Remove the room's instances too instead of refusing.
    #[serde(default)]
    force: bool,
}

#[utoipa::path(delete, path = "/v1/rooms/{name}", params(("name" = Name, Path), RemoveRoomQuery),
    responses((status = 204), PathErrors, HostErrors,
        (status = 409, body = ApiErrorBody, description = "The room has instances and `force` is not set.")))]
pub(crate) async fn remove_room(
    State(engine): State<AppState>,
    Path(name): Path<String>,
    query: Result<Query<RemoveRoomQuery>, QueryRejection>,
) -> Result<StatusCode, ApiError> {
    let Query(query) = query.map_err(|e| bad_request(e.body_text()))?;
    engine.remove_room(&name, query.force).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub(crate) struct ApplyQuery {
    /// Only say what would change.
    #[serde(default)]
    dry_run: bool,
}

/// Converges the room to the file (its name must be the path's): creates
/// it, sets its firewall's config, adds, recreates, reconfigures and removes
/// instances, sets its exposes. The same file twice changes nothing.
#[utoipa::path(put, path = "/v1/rooms/{name}", params(("name" = Name, Path), ApplyQuery), request_body = RoomFile,
    responses((status = 200, body = RoomPlan), PathErrors, BodyErrors, HostErrors,
        (status = 409, body = ApiErrorBody, description = "The file does not fit what exists (a wan change, an instance outside the room)."),
        (status = 422, body = ApiErrorBody, description = "A config in the file does not fit its appliance: unknown keys, its schema or rules (code `invalid_config`)."),
        (status = 502, body = ApiErrorBody, description = "A guest agent failed while a config was applied."),
        (status = 504, body = ApiErrorBody, description = "A guest agent did not answer while a config was applied.")))]
pub(crate) async fn apply_room(
    State(engine): State<AppState>,
    Path(name): Path<String>,
    query: Result<Query<ApplyQuery>, QueryRejection>,
    req: Result<Json<RoomFile>, JsonRejection>,
) -> ApiResult<RoomPlan> {
    let Query(query) = query.map_err(|e| bad_request(e.body_text()))?;
    let room = body_within(req, crate::MAX_ROOM_BODY)?;
    if room.name.as_str() != name {
        return Err(OpError::new(
            ErrorCode::Conflict,
            format!("the file is room {}, not {name}", room.name),
        )
        .into());
    }
    Ok(Json(
        engine
            .apply_room(ApplyRoomRequest {
                room,
                dry_run: query.dry_run,
            })
            .await?,
    ))
}

/// Forwards a port of the firewall's wan address to a room instance.
#[utoipa::path(post, path = "/v1/rooms/{name}/exposes", params(("name" = Name, Path)), request_body = Expose,
    responses((status = 201, body = Room), PathErrors, BodyErrors, HostErrors,
        (status = 409, body = ApiErrorBody, description = "The port is exposed already, or the room is not ready.")))]
pub(crate) async fn expose(
    State(engine): State<AppState>,
    Path(name): Path<String>,
    req: Result<Json<Expose>, JsonRejection>,
) -> Result<(StatusCode, Json<Room>), ApiError> {
    Ok((
        StatusCode::CREATED,
        Json(engine.expose(&name, body(req)?).await?),
    ))
}

#[utoipa::path(delete, path = "/v1/rooms/{name}/exposes/{proto}/{port}",
    params(("name" = Name, Path), ("proto" = Protocol, Path), ("port" = u16, Path, minimum = 1, maximum = 65535)),
    responses((status = 200, body = Room), PathErrors, HostErrors))]
pub(crate) async fn unexpose(
    State(engine): State<AppState>,
    Path((name, proto, port)): Path<(String, String, String)>,
) -> ApiResult<Room> {
    let proto = match proto.as_str() {
        "tcp" => Protocol::Tcp,
        "udp" => Protocol::Udp,
        _ => {
            return Err(bad_request(format!(
                "invalid protocol {proto:?}: tcp or udp"
            )))
        }
    };
    let port: u16 = port
        .parse()
        .ok()
        .filter(|p| *p > 0)
        .ok_or_else(|| bad_request(format!("invalid port {port:?}: 1 to 65535")))?;
    Ok(Json(engine.unexpose(&name, port, proto).await?))
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub(crate) struct TopologyQuery {
    /// Only this room: its networks, firewall, members, and the splices and
    /// mirrors that touch them.
    #[param(value_type = Option<Name>)]
    room: Option<String>,
}

#[utoipa::path(get, path = "/v1/topology", params(TopologyQuery),
    responses((status = 200, body = Topology), PathErrors))]
pub(crate) async fn topology(
    State(engine): State<AppState>,
    query: Result<Query<TopologyQuery>, QueryRejection>,
) -> ApiResult<Topology> {
    let Query(query) = query.map_err(|e| bad_request(e.body_text()))?;
    let room = match &query.room {
        Some(name) => Some(engine.get_room(name)?),
        None => None,
    };
    Ok(Json(Topology::build(
        engine.list_rooms(),
        engine.list_networks(),
        engine.list(),
        engine.list_splices(),
        engine.list_mirrors(),
        room.as_ref(),
    )))
}
