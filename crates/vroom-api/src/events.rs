//! `GET /v1/events`: the event log as history and as a live stream, in
//! newline-delimited JSON or, when the client accepts it, as server-sent
//! events (with `id:` lines, so a browser's `EventSource` resumes by
//! itself through `Last-Event-ID`).

use std::time::Duration;

use axum::extract::{Query, State};
use axum::http::{header, HeaderMap};
use axum::response::{IntoResponse, Response};
use vroom_core::events::{EventLog, EventReader};
use vroom_types::{EventLine, EventQuery};

pub(crate) mod merge;

use crate::replies::HostErrors;
use crate::{bad_request, ApiError, AppState, Service};
use futures::StreamExt;

/// How often a quiet stream says it is alive.
pub const HEARTBEAT: Duration = Duration::from_secs(15);

/// The query keys of `GET /v1/events`, for the API document; the handler
/// reads them as pairs (a filter key may come more than once).
#[derive(utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[allow(dead_code)]
pub(crate) struct EventsQuery {
    /// Only events after this number (or the `Last-Event-ID` header).
    since: Option<u64>,
    /// Only events up to this number; the answer ends there.
    until: Option<u64>,
    /// At most this many events (1 to 10000): after `since`, the first;
    /// without it, the latest. The answer ends there.
    limit: Option<u32>,
    /// Keep the answer open for new events: the default unless `until` or
    /// `limit` is given.
    follow: Option<bool>,
    /// Only these kinds (comma-separated): instance, config, splice,
    /// mirror, snapshot, room, network, image, volume, node, migration.
    kind: Option<String>,
    /// Only these actions (comma-separated), e.g. `ready,failed`.
    action: Option<String>,
    /// Only about these objects (comma-separated names).
    name: Option<String>,
    /// Only in these rooms.
    room: Option<String>,
    /// Only on these cluster nodes. One node that is not the one asked:
    /// its own log, read through its API. `*`, or several names: one
    /// stream merged from those nodes' logs, resumed with `cursor`.
    node: Option<String>,
    /// Where a merged stream resumes: each node's last event seen
    /// (`n1:12,n2:40`; a merged stream's SSE `id:`).
    cursor: Option<String>,
}

/// The event log: every change of state, numbered. Without `since`, a
/// follower gets what happens from now on; with it, what it missed first.
/// A `reset` line means events were lost to the client (it asked for more
/// than is kept, or fell behind): it lists the state again and goes on
/// from the reset's `seq`. A `heartbeat` line comes every 15 s of quiet.
#[utoipa::path(get, path = "/v1/events", params(EventsQuery),
    responses(
        (status = 200, content_type = "application/x-ndjson", body = EventLine,
            description = "One `EventLine` a line; as `text/event-stream` when the client's `Accept` asks for it."),
        (status = 400, body = vroom_types::ApiErrorBody, description = "A malformed number or filter."),
        HostErrors))]
pub(crate) async fn events(
    State(engine): State<AppState>,
    State(vroomd): State<Service>,
    headers: HeaderMap,
    Query(pairs): Query<Vec<(String, String)>>,
) -> Result<Response, ApiError> {
    let mut query = EventQuery::from_pairs(pairs.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .map_err(|e| bad_request(e.to_string()))?;
    if query.since.is_none() && query.cursor.is_empty() {
        if let Some(id) = headers.get("last-event-id") {
            let id = id.to_str().unwrap_or_default().trim();
            let malformed = || {
                bad_request(format!(
                    "Last-Event-ID {id:?} is not an event number or a cursor"
                ))
            };
            if query.merged() {
                query.cursor = id.parse().map_err(|_| malformed())?;
            } else {
                query.since = Some(id.parse().map_err(|_| malformed())?);
            }
        }
    }
    let sse = headers
        .get(header::ACCEPT)
        .and_then(|a| a.to_str().ok())
        .is_some_and(|a| a.contains("text/event-stream"));
    let content_type = if sse {
        "text/event-stream"
    } else {
        "application/x-ndjson"
    };
    let reply = |lines| {
        (
            [
                (header::CONTENT_TYPE, content_type),
                (header::CACHE_CONTROL, "no-cache"),
            ],
            axum::body::Body::from_stream(lines),
        )
            .into_response()
    };
    if query.merged() {
        let cluster = merge::Cluster {
            log: engine.events().clone(),
            vroomd: vroomd.clone(),
        };
        if query.all_nodes && cluster.nodes(&query).await.is_empty() {
            // Not a cluster: this host's log is every node's.
            query.all_nodes = false;
        } else {
            if let Ok(known) = vroomd.nodes().await {
                if let Some(stranger) = query
                    .filter
                    .nodes
                    .iter()
                    .find(|n| !known.iter().any(|k| k.name.as_str() == n.as_str()))
                {
                    return Err(vroom_core::OpError::not_found("node", stranger).into());
                }
            }
            let log = engine.events().clone();
            let merged = cluster.stream(query).await;
            let lines =
                futures::stream::unfold((merged, log), move |(mut merged, log)| async move {
                    let line = match tokio::time::timeout(HEARTBEAT, merged.recv()).await {
                        Ok(Some((line, cursor))) => {
                            let id = cursor.to_string();
                            if sse {
                                sse_frame(&line, Some(id))
                            } else {
                                ndjson(&line)
                            }
                        }
                        Ok(None) => return None,
                        Err(_) => {
                            let beat = EventLine::Heartbeat {
                                seq: log.last_seq(),
                            };
                            if sse {
                                sse_frame(&beat, None)
                            } else {
                                ndjson(&beat)
                            }
                        }
                    };
                    Some((Ok::<_, std::convert::Infallible>(line), (merged, log)))
                });
            return Ok(reply(lines.boxed()));
        }
    }
    // One other cluster node's events: read from that node.
    let peer = match single(&query.filter.nodes) {
        Some(node) => vroomd.peer_events(node, &query).await?,
        None => None,
    };
    let encode = move |line: &EventLine| {
        if sse {
            sse_frame(line, line_id(line).map(|id| id.to_string()))
        } else {
            ndjson(line)
        }
    };
    let lines = match peer {
        Some(rx) => futures::stream::unfold(rx, move |mut rx| async move {
            let line = rx.recv().await?;
            Some((Ok::<_, std::convert::Infallible>(encode(&line)), rx))
        })
        .boxed(),
        None => {
            let log = engine.events().clone();
            let reader = log.read(query);
            futures::stream::unfold((reader, log), move |(mut reader, log)| async move {
                let line = next_or_heartbeat(&mut reader, &log).await?;
                Some((
                    Ok::<_, std::convert::Infallible>(encode(&line)),
                    (reader, log),
                ))
            })
            .boxed()
        }
    };
    Ok(reply(lines))
}

/// The one element of a set of one.
fn single(set: &std::collections::BTreeSet<String>) -> Option<&str> {
    match set.len() {
        1 => set.first().map(String::as_str),
        _ => None,
    }
}

/// The next line, or a heartbeat after [`HEARTBEAT`] of quiet.
async fn next_or_heartbeat(reader: &mut EventReader, log: &EventLog) -> Option<EventLine> {
    // `EventReader::next` is cancel-safe: a live event is taken from the
    // channel only when it is returned.
    match tokio::time::timeout(HEARTBEAT, reader.next()).await {
        Ok(line) => line,
        Err(_) => Some(EventLine::Heartbeat {
            seq: log.last_seq(),
        }),
    }
}

fn ndjson(line: &EventLine) -> Vec<u8> {
    let mut bytes = serde_json::to_vec(line).expect("invariant: events serialize");
    bytes.push(b'\n');
    bytes
}

/// The number a client resumes after: an event's, or a reset's.
fn line_id(line: &EventLine) -> Option<u64> {
    match line {
        EventLine::Event(e) => Some(e.seq),
        EventLine::Reset { seq, .. } => Some(*seq),
        EventLine::Heartbeat { .. } => None,
    }
}

/// A server-sent event: its type as `event:`, where to resume after it as
/// `id:` (a number, or a merged stream's cursor), the line as `data:`.
fn sse_frame(line: &EventLine, id: Option<String>) -> Vec<u8> {
    let kind = match line {
        EventLine::Event(_) => "event",
        EventLine::Reset { .. } => "reset",
        EventLine::Heartbeat { .. } => "heartbeat",
    };
    let data = serde_json::to_string(line).expect("invariant: events serialize");
    let id = id.map(|id| format!("id: {id}\n")).unwrap_or_default();
    format!("event: {kind}\n{id}data: {data}\n\n").into_bytes()
}
