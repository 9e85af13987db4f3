//! The web dashboard under `/ui/`: server-rendered HTML pages of the same
//! records the JSON API answers, made live by a small script
//! (`ui/app.js`, embedded like the style sheet: no build step) that follows
//! `GET /v1/events` with an `EventSource`, re-renders the parts of a page
//! marked `data-live` on each event (and on a `reset`), draws CPU
//! sparklines from successive `GET /metrics` reads, follows the console
//! through `GET /v1/instances/{name}/logs`, and calls the JSON API (the
//! CLI's routes, with its errors) for every change, after a confirmation.
//!
//! No page changes anything: every route here is a `GET`. Pages carry a
//! content security policy that allows only this origin's script and style
//! (no inline script), and may not be framed. Who may see them is decided
//! where the request comes in: the unix socket's permissions (through `vroom
//! ui`'s loopback proxy, which holds the one-time token and the cookie) or
//! a cluster node's mutual TLS. [`same_origin_only`] refuses a changing
//! request that a browser sent from another origin, on every route.
//!
//! Not in the OpenAPI document: these are pages, not API operations.

mod html;
mod pages;

use std::time::Duration;

use axum::extract::{Path, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::get;
use axum::Router;
use vroom_core::OpError;
use vroom_types::{ErrorCode, Event, EventLine, EventQuery, Topology};

use crate::{Api, ApiError, AppState, Service};

use self::pages::Drawing;

const APP_JS: &str = include_str!("ui/app.js");
const APP_CSS: &str = include_str!("ui/app.css");
const FAVICON: &str = include_str!("ui/favicon.svg");

/// How many events the overview and the events page show.
const RECENT_EVENTS: usize = 20;
const EVENTS_PAGE: usize = 200;
/// How long Graphviz may take to draw a room.
const DOT_TIMEOUT: Duration = Duration::from_secs(10);
/// The most SVG a drawing may be.
const MAX_SVG: usize = 4 << 20;

/// What every page may load: this origin's script, style and images
/// (and inline SVG, which is markup, not script).
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; \
                   connect-src 'self'; form-action 'none'; base-uri 'none'; frame-ancestors 'none'";

/// The dashboard's routes (all `GET`).
pub(crate) fn routes() -> Router<Api> {
    Router::new()
        .route("/ui", get(|| async { Redirect::permanent("/ui/") }))
        .route("/ui/", get(overview))
        .route("/ui/instances", get(instances))
        .route("/ui/instances/{name}", get(instance))
        .route("/ui/rooms", get(rooms))
        .route("/ui/rooms/{name}", get(room))
        .route("/ui/services", get(services))
        .route("/ui/wiring", get(wiring))
        .route("/ui/snapshots", get(snapshots))
        .route("/ui/volumes", get(volumes))
        .route("/ui/nodes", get(nodes))
        .route("/ui/events", get(events))
        .route(
            "/ui/assets/app.js",
            get(|| asset("text/javascript", APP_JS)),
        )
        .route("/ui/assets/app.css", get(|| asset("text/css", APP_CSS)))
        .route(
            "/ui/assets/favicon.svg",
            get(|| asset("image/svg+xml", FAVICON)),
        )
}

async fn asset(content_type: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CACHE_CONTROL, "no-cache"),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        ],
        body,
    )
        .into_response()
}

/// The pages' navigation: (path, label).
const NAV: [(&str, &str); 9] = [
    ("/ui/", "Overview"),
    ("/ui/instances", "Instances"),
    ("/ui/rooms", "Rooms"),
    ("/ui/services", "Services"),
    ("/ui/wiring", "Splices & mirrors"),
    ("/ui/snapshots", "Snapshots"),
    ("/ui/volumes", "Volumes"),
    ("/ui/nodes", "Nodes"),
    ("/ui/events", "Events"),
];

/// A whole page: `body` inside the layout, with the headers every page has.
fn page(status: StatusCode, title: &str, active: &str, body: &str) -> Response {
    let mut nav = String::new();
    for (path, label) in NAV {
        let current = if path == active {
            " aria-current=\"page\""
        } else {
            ""
        };
        nav.push_str(&format!("<a href=\"{path}\"{current}>{label}</a>"));
    }
    let html = format!(
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
         <title>{title} · vroom</title>\
         <link rel=\"icon\" href=\"/ui/assets/favicon.svg\" type=\"image/svg+xml\">\
         <link rel=\"stylesheet\" href=\"/ui/assets/app.css\">\
         <script src=\"/ui/assets/app.js\" defer></script></head>\
         <body><header><a class=\"brand\" href=\"/ui/\">vroom</a><nav>{nav}</nav>\
         <span id=\"live\" class=\"live\" role=\"status\">connecting</span></header>\
         <main>{body}</main><div id=\"toast\" role=\"alert\" hidden></div></body></html>\n",
        title = html::esc(title),
    );
    (status, page_headers(), html).into_response()
}

fn page_headers() -> HeaderMap {
    let mut headers = HeaderMap::new();
    let mut set = |name: header::HeaderName, value: &'static str| {
        headers.insert(name, HeaderValue::from_static(value));
    };
    set(header::CONTENT_TYPE, "text/html; charset=utf-8");
    set(header::CACHE_CONTROL, "no-store");
    set(header::CONTENT_SECURITY_POLICY, CSP);
    set(header::X_FRAME_OPTIONS, "DENY");
    set(header::X_CONTENT_TYPE_OPTIONS, "nosniff");
    set(header::REFERRER_POLICY, "no-referrer");
    headers
}

/// An error as a page: the API's own message, with its status.
fn error_page(active: &str, e: OpError) -> Response {
    let status = crate::status_for(e.code);
    if status.is_server_error() {
        tracing::error!(code = ?e.code, error = %e.message, "a dashboard page failed");
    }
    page(
        status,
        "Error",
        active,
        &format!(
            "<h1>{}</h1><p class=\"error\">{}</p><p><a href=\"{active}\">Back</a></p>",
            status.as_u16(),
            html::esc(&e.message)
        ),
    )
}

fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// The latest `n` events of this vroomd's log.
/// The latest `n` events: in a cluster, of every node.
async fn recent_events(engine: &AppState, vroomd: &Service, n: usize) -> Vec<Event> {
    let query = EventQuery {
        limit: Some(n),
        follow: false,
        all_nodes: true,
        ..EventQuery::default()
    };
    let cluster = crate::events::merge::Cluster {
        log: engine.events().clone(),
        vroomd: vroomd.clone(),
    };
    let mut events = vec![];
    if cluster.nodes(&query).await.is_empty() {
        let mut reader = engine.events().read(EventQuery {
            all_nodes: false,
            ..query
        });
        while let Some(line) = reader.next().await {
            if let EventLine::Event(e) = line {
                events.push(e);
            }
        }
    } else {
        let mut merged = cluster.stream(query).await;
        while let Some((line, _)) = merged.recv().await {
            if let EventLine::Event(e) = line {
                events.push(e);
            }
        }
    }
    events
}

/// The cluster's nodes, or `None` for a host alone.
async fn cluster_nodes(vroomd: &Service) -> Result<Option<Vec<vroom_types::NodeInfo>>, OpError> {
    match vroomd.nodes().await {
        Ok(nodes) => Ok(Some(nodes)),
        // `vroom_core::service::not_in_cluster`: a host alone.
        Err(e) if e.code == ErrorCode::Conflict => Ok(None),
        Err(e) => Err(e),
    }
}

async fn overview(State(engine): State<AppState>, State(vroomd): State<Service>) -> Response {
    let instances = vroomd.list().await;
    let nodes = match cluster_nodes(&vroomd).await {
        Ok(nodes) => nodes,
        Err(e) => return error_page("/ui/", e),
    };
    let events = recent_events(&engine, &vroomd, RECENT_EVENTS).await;
    let body = pages::overview(&pages::Overview {
        instances: &instances,
        nodes: nodes.as_deref(),
        events: &events,
        data_dir: &engine.data_dir().display().to_string(),
    });
    page(StatusCode::OK, "Overview", "/ui/", &body)
}

async fn instances(State(engine): State<AppState>, State(vroomd): State<Service>) -> Response {
    let body = pages::instances(&vroomd.list().await, &engine.list_rooms());
    page(StatusCode::OK, "Instances", "/ui/instances", &body)
}

async fn instance(
    State(engine): State<AppState>,
    State(vroomd): State<Service>,
    Path(name): Path<String>,
) -> Response {
    match vroomd.inspect(&name).await {
        Ok(i) => page(
            StatusCode::OK,
            &format!("Instance {name}"),
            "/ui/instances",
            &pages::instance(&i, &engine.list_rooms(), now_secs()),
        ),
        Err(e) => error_page("/ui/instances", e),
    }
}

async fn rooms(State(engine): State<AppState>, State(vroomd): State<Service>) -> Response {
    let body = pages::rooms(&engine.list_rooms(), &vroomd.list().await);
    page(StatusCode::OK, "Rooms", "/ui/rooms", &body)
}

async fn room(
    State(engine): State<AppState>,
    State(vroomd): State<Service>,
    Path(name): Path<String>,
) -> Response {
    let room = match engine.get_room(&name) {
        Ok(room) => room,
        Err(e) => return error_page("/ui/rooms", e),
    };
    // The same graph as `vroom topology --room NAME --format svg`.
    let topology = Topology::build(
        engine.list_rooms(),
        engine.list_networks(),
        engine.list(),
        engine.list_splices(),
        engine.list_mirrors(),
        Some(&room),
    );
    let drawing = match draw(&topology.to_dot()).await {
        Ok(svg) => Drawing::Svg(svg),
        Err(why) => Drawing::Text {
            text: topology.to_text(),
            why,
        },
    };
    let body = pages::room(&room, &vroomd.list().await, &engine.list_rooms(), &drawing);
    page(StatusCode::OK, &format!("Room {name}"), "/ui/rooms", &body)
}

/// Graphviz's drawing of a graph, as inline SVG (without the XML prolog
/// and doctype), or why there is none.
async fn draw(dot: &str) -> Result<String, String> {
    use tokio::io::AsyncWriteExt;
    let mut child = tokio::process::Command::new("dot")
        .arg("-Tsvg")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| {
            format!("no drawing: cannot run Graphviz's dot ({e}); install the graphviz package")
        })?;
    let mut stdin = child.stdin.take().ok_or("no drawing: dot has no stdin")?;
    let input = dot.as_bytes().to_vec();
    let fed = tokio::spawn(async move {
        let _ = stdin.write_all(&input).await;
    });
    let output = tokio::time::timeout(DOT_TIMEOUT, child.wait_with_output())
        .await
        .map_err(|_| format!("no drawing: dot took longer than {DOT_TIMEOUT:?}"))?
        .map_err(|e| format!("no drawing: dot failed ({e})"))?;
    let _ = fed.await;
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        return Err(format!(
            "no drawing: dot failed: {}",
            vroom_base::last_line(&stderr).unwrap_or("no message")
        ));
    }
    if output.stdout.len() > MAX_SVG {
        return Err("no drawing: the graph is too large to draw".into());
    }
    let svg = String::from_utf8_lossy(&output.stdout);
    let start = svg.find("<svg").ok_or("no drawing: dot wrote no SVG")?;
    Ok(svg[start..].to_string())
}

async fn services(State(engine): State<AppState>) -> Response {
    match engine.services().await {
        Ok(services) => page(
            StatusCode::OK,
            "Services",
            "/ui/services",
            &pages::services(&services, now_secs()),
        ),
        Err(e) => error_page("/ui/services", e),
    }
}

async fn wiring(State(engine): State<AppState>) -> Response {
    let body = pages::wiring(
        &engine.list_networks(),
        &engine.list_splices(),
        &engine.list_mirrors(),
        now_secs(),
    );
    page(StatusCode::OK, "Splices & mirrors", "/ui/wiring", &body)
}

async fn snapshots(State(engine): State<AppState>) -> Response {
    let body = pages::snapshots(&engine.list_snapshots(), &engine.list_warm(), now_secs());
    page(StatusCode::OK, "Snapshots", "/ui/snapshots", &body)
}

async fn volumes(State(vroomd): State<Service>) -> Response {
    match vroomd.list_volumes().await {
        Ok(volumes) => page(
            StatusCode::OK,
            "Volumes",
            "/ui/volumes",
            &pages::volumes(&volumes),
        ),
        Err(e) => error_page("/ui/volumes", e),
    }
}

async fn nodes(State(engine): State<AppState>, State(vroomd): State<Service>) -> Response {
    match cluster_nodes(&vroomd).await {
        Ok(nodes) => page(
            StatusCode::OK,
            "Nodes",
            "/ui/nodes",
            &pages::nodes(nodes.as_deref(), &engine.data_dir().display().to_string()),
        ),
        Err(e) => error_page("/ui/nodes", e),
    }
}

async fn events(State(engine): State<AppState>, State(vroomd): State<Service>) -> Response {
    let events = recent_events(&engine, &vroomd, EVENTS_PAGE).await;
    page(
        StatusCode::OK,
        "Events",
        "/ui/events",
        &pages::events(&events),
    )
}

/// Refuses a request that changes something when a browser sent it from
/// another origin (its `Origin` is not the `Host` it was sent to, or its
/// `Sec-Fetch-Site` says `cross-site`): a page elsewhere cannot use a
/// browser's client certificate or cookie to act here. Clients that are
/// not browsers send neither header and pass.
pub(crate) async fn same_origin_only(req: Request, next: Next) -> Response {
    if matches!(*req.method(), Method::GET | Method::HEAD | Method::OPTIONS) {
        return next.run(req).await;
    }
    if let Some(refusal) = cross_origin(req.headers()) {
        return ApiError(OpError::new(ErrorCode::Forbidden, refusal)).into_response();
    }
    next.run(req).await
}

/// Why a changing request with these headers is cross-origin, if it is.
pub(crate) fn cross_origin(headers: &HeaderMap) -> Option<String> {
    let text = |name: &str| headers.get(name).map(|v| v.to_str().unwrap_or("?"));
    if let Some(site) = text("sec-fetch-site") {
        if !matches!(site, "same-origin" | "none") {
            return Some(format!(
                "refused a cross-origin request (Sec-Fetch-Site: {site}): changes come only from this dashboard's own pages"
            ));
        }
    }
    let origin = text("origin")?;
    let host = text("host").unwrap_or("");
    let origin_host = origin
        .strip_prefix("https://")
        .or_else(|| origin.strip_prefix("http://"));
    if origin_host == Some(host) {
        return None;
    }
    Some(format!(
        "refused a cross-origin request from {origin}: changes come only from this dashboard's own pages"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cross_origin_table() {
        let cases: &[(&[(&str, &str)], bool)] = &[
            // The CLI: neither header.
            (&[("host", "vroomd")], false),
            (&[("host", "n1:7946"), ("origin", "https://n1:7946")], false),
            (
                &[
                    ("host", "127.0.0.1:8080"),
                    ("origin", "http://127.0.0.1:8080"),
                ],
                false,
            ),
            (
                &[("host", "n1:7946"), ("origin", "https://evil.example")],
                true,
            ),
            (&[("host", "n1:7946"), ("origin", "null")], true),
            (
                &[
                    ("host", "n1:7946"),
                    ("origin", "https://n1:7946.evil.example"),
                ],
                true,
            ),
            (
                &[("host", "n1:7946"), ("sec-fetch-site", "cross-site")],
                true,
            ),
            (
                &[("host", "n1:7946"), ("sec-fetch-site", "same-site")],
                true,
            ),
            (
                &[
                    ("host", "n1:7946"),
                    ("sec-fetch-site", "same-origin"),
                    ("origin", "https://n1:7946"),
                ],
                false,
            ),
        ];
        for (headers, refused) in cases {
            let mut map = HeaderMap::new();
            for (k, v) in *headers {
                map.insert(
                    header::HeaderName::from_static(k),
                    HeaderValue::from_str(v).unwrap(),
                );
            }
            assert_eq!(cross_origin(&map).is_some(), *refused, "{headers:?}");
        }
    }
}
