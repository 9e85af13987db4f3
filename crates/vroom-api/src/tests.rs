//! The API's tests against an engine on fakes.

use super::*;
use vroom_types::{limits, MAX_EXEC_REQUEST_BYTES};

/// The checked-in document must match the annotations; regenerate with `cargo xtask openapi`.
/// The first line of an exec body, however the body is cut into chunks.
#[tokio::test]
async fn exec_request_line_table() {
    type Case = (Vec<&'static [u8]>, Option<(&'static [u8], &'static [u8])>);
    let long = Box::leak(vec![b'a'; MAX_EXEC_REQUEST_BYTES + 2].into_boxed_slice());
    let cases: Vec<Case> = vec![
        (vec![b"{}\nstdin"], Some((b"{}", b"stdin"))),
        (vec![b"{", b"}", b"\n", b"more"], Some((b"{}", b""))),
        (vec![b"{}"], Some((b"{}", b""))),
        (vec![], Some((b"", b""))),
        (vec![b"{}\n\n"], Some((b"{}", b"\n"))),
        (vec![&long[..]], None),
    ];
    for (chunks, want) in cases {
        let stream = futures::stream::iter(
            chunks
                .clone()
                .into_iter()
                .map(|c| Ok::<_, std::convert::Infallible>(c.to_vec())),
        );
        let mut input = axum::body::Body::from_stream(stream).into_data_stream();
        let got = exec_request_line(&mut input).await.ok();
        let want = want.map(|(l, r)| (l.to_vec(), r.to_vec()));
        assert_eq!(got, want, "{chunks:?}");
    }
}

/// Bodies are capped per route, and the answer is the API's JSON error.
#[tokio::test]
async fn bodies_over_the_route_limit_answer_413() {
    use tower::ServiceExt;
    let dir = tempfile::tempdir().unwrap();
    let t = vroom_core::testing::TestEngine::new(dir.path());
    let padded = |len: usize, json: &str| {
        let mut body = vec![b' '; len];
        body.extend_from_slice(json.as_bytes());
        body
    };
    let network = r#"{"name":"n1","subnet":"10.9.0.0/24"}"#;
    let values = r#"{"values":{}}"#;
    let cases: &[(&str, &str, Vec<u8>, u16)] = &[
        (
            "POST",
            "/v1/networks",
            padded(MAX_JSON_BODY + 1, network),
            413,
        ),
        (
            "POST",
            "/v1/images/build",
            padded(MAX_JSON_BODY + 1, "{}"),
            413,
        ),
        ("POST", "/v1/instances", padded(100 * 1024, "{}"), 413),
        // Config values may be larger, up to their own limit.
        (
            "PUT",
            "/v1/instances/nope/config",
            padded(MAX_JSON_BODY + 1, values),
            404,
        ),
        (
            "PUT",
            "/v1/instances/nope/config",
            padded(MAX_CONFIG_BODY + 1, values),
            413,
        ),
        (
            "PATCH",
            "/v1/instances/nope/config",
            padded(MAX_CONFIG_BODY + 1, values),
            413,
        ),
    ];
    for (method, path, body, want) in cases {
        let request = axum::http::Request::builder()
            .method(*method)
            .uri(*path)
            .header("content-type", "application/json")
            .body(axum::body::Body::from(body.clone()))
            .unwrap();
        let response = router(std::sync::Arc::new(vroom_core::service::Local::new(
            t.engine.clone(),
        )))
        .oneshot(request)
        .await
        .unwrap();
        let status = response.status().as_u16();
        let bytes = axum::body::to_bytes(response.into_body(), 1 << 20)
            .await
            .unwrap();
        assert_eq!(
            status,
            *want,
            "{method} {path} {} bytes: {bytes:?}",
            body.len()
        );
        if *want == 413 {
            let error: ApiErrorBody = serde_json::from_slice(&bytes).unwrap();
            assert_eq!(error.code, ErrorCode::PayloadTooLarge);
            let limit = if *method == "POST" {
                MAX_JSON_BODY
            } else {
                MAX_CONFIG_BODY
            };
            let named = format!("{} KiB", limit / 1024);
            assert!(error.message.contains(&named), "{}", error.message);
        }
    }
}

/// Statuses and messages of answers a user met with the wrong status or
/// a message that contradicts the answer: (method, path, body, status,
/// code, what the message says, what it must not say).
#[tokio::test]
async fn statuses_table() {
    use tower::ServiceExt;
    let dir = tempfile::tempdir().unwrap();
    let t = vroom_core::testing::TestEngine::new(dir.path());
    let mut small = vroom_core::testing::run_request("w1", "bump", &[]);
    small.spec.mem_mib = Some(64);
    let small = serde_json::to_vec(&small).unwrap();
    let room = |len: usize| {
        let mut body = vec![b' '; len];
        body.extend_from_slice(br#"{"name":"r1"}"#);
        body
    };
    type Case<'a> = (&'a str, &'a str, Vec<u8>, u16, ErrorCode, &'a str, &'a str);
    let cases: Vec<Case> = vec![
        // Well formed, but the image needs more on its kernel: like
        // memory beyond the host's, the host cannot carry it out.
        (
            "POST",
            "/v1/instances",
            small,
            422,
            ErrorCode::HostUnsupported,
            "below the 128 MiB image bump needs",
            "",
        ),
        // The message names the methods the `Allow` header lists.
        (
            "DELETE",
            "/v1/version",
            vec![],
            405,
            ErrorCode::MethodNotAllowed,
            "this route takes GET,HEAD",
            "none",
        ),
        (
            "PATCH",
            "/v1/instances/w1/actions",
            vec![],
            405,
            ErrorCode::MethodNotAllowed,
            "this route takes POST",
            "none",
        ),
        // A room file the CLI accepts (up to MAX_ROOM_BODY) reaches
        // the route (here refused for its name, after parsing).
        (
            "PUT",
            "/v1/rooms/r2",
            room(MAX_ROOM_BODY - 100),
            409,
            ErrorCode::Conflict,
            "the file is room r1",
            "",
        ),
        // Beyond it, one limit is named: the route's.
        (
            "PUT",
            "/v1/rooms/r2",
            room(MAX_ROOM_BODY + 1),
            413,
            ErrorCode::PayloadTooLarge,
            "at most 256 KiB",
            "64",
        ),
        (
            "POST",
            "/v1/networks",
            room(MAX_JSON_BODY + 1),
            413,
            ErrorCode::PayloadTooLarge,
            "at most 64 KiB",
            "256",
        ),
        // An import's reference is checked before the answer streams.
        (
            "POST",
            "/v1/images/import",
            br#"{"reference":"ftp://x/y"}"#.to_vec(),
            422,
            ErrorCode::InvalidReference,
            "unknown transport \"ftp\"",
            "",
        ),
        (
            "POST",
            "/v1/images/import",
            br#"{"reference":"oci:relative/dir"}"#.to_vec(),
            422,
            ErrorCode::InvalidReference,
            "the path must be absolute",
            "",
        ),
        // Schema-valid service definitions the rules refuse are 422s
        // (schemathesis found them answered 400).
        (
            "POST",
            "/v1/services",
            br#"{"name":"a","image":"hello","replicas":1,"max_replicas":2,"network":"lan","scale_on":{"cpu_percent":0}}"#.to_vec(),
            422,
            ErrorCode::InvalidService,
            "a scaling target must be above 0",
            "",
        ),
        (
            "POST",
            "/v1/services",
            br#"{"name":"a","image":"hello","replicas":3,"max_replicas":2,"network":"lan","scale_on":{"p95_ms":50}}"#.to_vec(),
            422,
            ErrorCode::InvalidService,
            "the minimum is above the maximum",
            "",
        ),
        (
            "POST",
            "/v1/images/import",
            br#"{"reference":"docker://h.io/a:1","kernel":"mine"}"#.to_vec(),
            400,
            ErrorCode::InvalidArgument,
            "unknown kernel \"mine\"",
            "",
        ),
    ];
    for (method, path, body, status, code, says, not) in cases {
        let request = axum::http::Request::builder()
            .method(method)
            .uri(path)
            .header("content-type", "application/json")
            .body(axum::body::Body::from(body))
            .unwrap();
        let response = router(std::sync::Arc::new(vroom_core::service::Local::new(
            t.engine.clone(),
        )))
        .oneshot(request)
        .await
        .unwrap();
        let got = response.status().as_u16();
        let allow = response.headers().get("allow").cloned();
        let bytes = axum::body::to_bytes(response.into_body(), 1 << 20)
            .await
            .unwrap();
        let error: ApiErrorBody = serde_json::from_slice(&bytes)
            .unwrap_or_else(|e| panic!("{method} {path}: {e}: {bytes:?}"));
        assert_eq!(
            (got, error.code),
            (status, code),
            "{method} {path}: {}",
            error.message
        );
        assert!(
            error.message.contains(says),
            "{method} {path}: {}",
            error.message
        );
        assert!(
            not.is_empty() || !error.message.contains(not),
            "{method} {path}: {}",
            error.message
        );
        if status == 405 {
            let allow = allow.expect("a 405 has an Allow header");
            assert!(
                error.message.contains(allow.to_str().unwrap()),
                "{method} {path}: Allow {allow:?}, message {}",
                error.message
            );
        }
    }
}

#[test]
fn openapi_document_is_in_sync() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../openapi.json");
    if std::env::var_os("VROOM_UPDATE_OPENAPI").is_some() {
        std::fs::write(&path, openapi_json()).unwrap();
    }
    let checked_in = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        checked_in == openapi_json(),
        "openapi.json is stale: run `cargo xtask openapi`"
    );
}

/// The document states the same ranges and patterns as the validators.
#[test]
fn document_rules_match_the_validators() {
    use vroom_types::limits::{Bounds, CONFIG_VOLUME_KIB, CPUS, MEM_MIB, READY_TIMEOUT_SECS};
    let doc: serde_json::Value = serde_json::from_str(&openapi_json()).unwrap();
    let schemas = &doc["components"]["schemas"];
    let range = |field: &serde_json::Value, bounds: Bounds| {
        assert_eq!(field["minimum"], bounds.min, "{} {field}", bounds.field);
        assert_eq!(field["maximum"], bounds.max, "{} {field}", bounds.field);
    };
    range(
        &schemas["RunRequest"]["properties"]["ready_timeout_secs"],
        READY_TIMEOUT_SECS,
    );
    let spec = &schemas["InstanceSpec"]["properties"];
    range(&spec["mem_mib"], MEM_MIB);
    range(&spec["cpus"], CPUS);
    range(&spec["config_volume_kib"], CONFIG_VOLUME_KIB);
    // A GET's query parameter `name` of `path`.
    let query = |path: &str, name: &str| {
        let param = doc["paths"][path]["get"]["parameters"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["name"] == name)
            .unwrap()
            .clone();
        assert_eq!(param["in"], "query");
        param
    };
    let offset = query("/v1/instances/{name}/logs", "offset");
    range(&offset["schema"], limits::LOG_OFFSET);
    let wait = query("/v1/instances/{name}", "wait_secs");
    range(&wait["schema"], limits::WAIT_SECS);
    assert_eq!(schemas["Name"]["pattern"], vroom_types::NAME_PATTERN);
    assert_eq!(
        schemas["NetworkSpec"]["properties"]["subnet"]["pattern"],
        vroom_types::subnet_pattern()
    );
}

/// Config values (string to string) and a config schema (key to rule)
/// are different maps; each use site says which it is.
#[test]
fn maps_are_described_where_they_are_used() {
    let doc: serde_json::Value = serde_json::from_str(&openapi_json()).unwrap();
    let schemas = &doc["components"]["schemas"];
    for (schema, field) in [
        ("Instance", "config"),
        ("ConfigDocument", "values"),
        ("ApplianceSpec", "seed_config"),
    ] {
        let map = &schemas[schema]["properties"][field];
        assert_eq!(
            map["additionalProperties"]["type"], "string",
            "{schema}.{field}: {map}"
        );
    }
    let rules = &schemas["ApplianceSpec"]["properties"]["config_schema"];
    assert_eq!(
        rules["additionalProperties"]["$ref"], "#/components/schemas/ConfigField",
        "{rules}"
    );
}

/// Request bodies refuse unknown fields, and say so; every error reply
/// is an `ApiErrorBody`.
#[test]
fn bodies_are_strict_and_errors_are_api_error_bodies() {
    let doc: serde_json::Value = serde_json::from_str(&openapi_json()).unwrap();
    let schemas = &doc["components"]["schemas"];
    for body in [
        "RunRequest",
        "InstanceSpec",
        "NicSpec",
        "NetworkSpec",
        "ActionRequest",
        "BuildImageRequest",
        "ConfigDocument",
    ] {
        assert_eq!(schemas[body]["additionalProperties"], false, "{body}");
    }
    for (path, item) in doc["paths"].as_object().unwrap() {
        for (method, op) in item.as_object().unwrap() {
            for (status, reply) in op["responses"].as_object().unwrap() {
                if status.starts_with('4') || status.starts_with('5') {
                    assert_eq!(
                        reply["content"]["application/json"]["schema"]["$ref"],
                        "#/components/schemas/ApiErrorBody",
                        "{method} {path} {status}"
                    );
                }
            }
        }
    }
}

/// Every link leads to a documented operation whose path takes the
/// parameter the link fills.
#[test]
fn links_lead_to_operations_that_take_their_parameter() {
    let doc: serde_json::Value = serde_json::from_str(&openapi_json()).unwrap();
    let mut path_of = std::collections::BTreeMap::new();
    for (path, item) in doc["paths"].as_object().unwrap() {
        for op in item.as_object().unwrap().values() {
            path_of.insert(
                op["operationId"].as_str().unwrap().to_string(),
                path.clone(),
            );
        }
    }
    let mut links = 0;
    for item in doc["paths"].as_object().unwrap().values() {
        for op in item.as_object().unwrap().values() {
            for reply in op["responses"].as_object().unwrap().values() {
                for link in reply["links"].as_object().into_iter().flatten() {
                    let target = link.1["operationId"].as_str().unwrap();
                    let path = path_of.get(target).unwrap_or_else(|| panic!("{target}"));
                    for param in link.1["parameters"].as_object().unwrap().keys() {
                        assert!(path.contains(&format!("{{{param}}}")), "{target}: {param}");
                    }
                    links += 1;
                }
            }
        }
    }
    assert_eq!(
        links, 18,
        "links from POST /v1/instances, /v1/networks, /v1/rooms, /v1/splices and /v1/mirrors"
    );
}

/// Every route the router serves is documented, and nothing else is.
#[test]
fn openapi_paths_match_router_routes() {
    let doc: serde_json::Value = serde_json::from_str(&openapi_json()).unwrap();
    let mut documented: Vec<String> = vec![];
    for (path, item) in doc["paths"].as_object().unwrap() {
        for method in item.as_object().unwrap().keys() {
            documented.push(format!("{} {path}", method.to_uppercase()));
        }
    }
    documented.sort();
    // Read the router's own source: every `.route("path", method(handler)...)` in `router()`
    // (not `metrics_router()`, whose one route `router()` has too).
    let source = include_str!("lib.rs");
    let body = source
        .split("pub fn router(")
        .nth(1)
        .unwrap()
        .split(".fallback(")
        .next()
        .unwrap();
    let mut routed: Vec<String> = vec![];
    for chunk in body.split(".route(").skip(1) {
        let path = chunk.split('"').nth(1).unwrap();
        let calls = chunk.split_once(',').unwrap().1;
        for method in ["get", "post", "put", "patch", "delete"] {
            let at_start = calls.trim_start().starts_with(&format!("{method}("));
            if at_start || calls.contains(&format!(".{method}(")) {
                routed.push(format!("{} {path}", method.to_uppercase()));
            }
        }
    }
    routed.sort();
    assert_eq!(documented, routed);
}

/// `GET /v1/events`: malformed queries answer 400 with one line and change
/// nothing; a history is JSON lines naming the caller who caused each
/// event; a browser resuming with `Last-Event-ID` gets server-sent events
/// after that number.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_are_history_lines_or_server_sent_events() {
    use tower::ServiceExt;
    let dir = tempfile::tempdir().unwrap();
    let t = vroom_core::testing::TestEngine::new(dir.path());
    let api = router(std::sync::Arc::new(vroom_core::service::Local::new(
        t.engine.clone(),
    )));
    let call = |uri: &str, headers: &[(&str, &str)], caller: Option<Caller>| {
        let mut request = axum::http::Request::builder().uri(uri);
        for (k, v) in headers {
            request = request.header(*k, *v);
        }
        let mut request = request.body(axum::body::Body::empty()).unwrap();
        if let Some(caller) = caller {
            request
                .extensions_mut()
                .insert(axum::extract::ConnectInfo(caller));
        }
        let api = api.clone();
        async move {
            let response = api.oneshot(request).await.unwrap();
            let status = response.status().as_u16();
            let content_type = response
                .headers()
                .get("content-type")
                .map(|v| v.to_str().unwrap().to_string())
                .unwrap_or_default();
            let bytes = axum::body::to_bytes(response.into_body(), 1 << 20)
                .await
                .unwrap();
            (
                status,
                content_type,
                String::from_utf8(bytes.to_vec()).unwrap(),
            )
        }
    };
    for uri in [
        "/v1/events?since=x",
        "/v1/events?limit=0",
        "/v1/events?kind=vm",
        "/v1/events?colour=red",
        "/v1/events?since=5&until=2",
    ] {
        let (status, _, body) = call(uri, &[], None).await;
        assert_eq!(status, 400, "{uri}: {body}");
        let error: ApiErrorBody = serde_json::from_str(&body).unwrap();
        assert_eq!(error.code, ErrorCode::InvalidArgument);
        assert!(!error.message.contains('\n'), "{}", error.message);
    }
    let (status, _, body) = call(
        "/v1/events?follow=false",
        &[("last-event-id", "soon")],
        None,
    )
    .await;
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("Last-Event-ID"), "{body}");

    // A network made by uid 1000 and one by a cluster certificate.
    let uid = Caller {
        uid: Some(1000),
        gid: Some(1000),
        pid: Some(1),
    };
    let mut request = axum::http::Request::builder()
        .method("POST")
        .uri("/v1/networks")
        .header("content-type", "application/json")
        .body(axum::body::Body::from(
            r#"{"name":"n1","subnet":"10.9.0.0/24","nat":false}"#,
        ))
        .unwrap();
    request
        .extensions_mut()
        .insert(axum::extract::ConnectInfo(uid));
    let response = api.clone().oneshot(request).await.unwrap();
    let status = response.status();
    let body = axum::body::to_bytes(response.into_body(), 1 << 16)
        .await
        .unwrap();
    assert_eq!(status, 201, "{body:?}");
    let mut request = axum::http::Request::builder()
        .method("DELETE")
        .uri("/v1/networks/n1")
        .body(axum::body::Body::empty())
        .unwrap();
    request
        .extensions_mut()
        .insert(PeerCertificate("ops-laptop".into()));
    assert_eq!(api.clone().oneshot(request).await.unwrap().status(), 204);

    let (status, content_type, body) = call("/v1/events?kind=network&limit=10", &[], None).await;
    assert_eq!(
        (status, content_type.as_str()),
        (200, "application/x-ndjson"),
        "{body}"
    );
    let lines: Vec<vroom_types::EventLine> = body
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let events: Vec<(String, String, u64)> = lines
        .iter()
        .map(|l| match l {
            vroom_types::EventLine::Event(e) => (e.action.clone(), e.actor.clone(), e.seq),
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(
        events
            .iter()
            .map(|(a, w, _)| (a.as_str(), w.as_str()))
            .collect::<Vec<_>>(),
        [("created", "uid:1000"), ("removed", "cert:ops-laptop")]
    );
    let first = events[0].2;

    // An EventSource resuming after the first: the second, as an SSE frame.
    let (status, content_type, body) = call(
        "/v1/events?kind=network&follow=false",
        &[
            ("accept", "text/event-stream"),
            ("last-event-id", &first.to_string()),
        ],
        None,
    )
    .await;
    assert_eq!((status, content_type.as_str()), (200, "text/event-stream"));
    let second = events[1].2;
    assert!(
        body.starts_with(&format!(
            "event: event\nid: {second}\ndata: {{\"type\":\"event\""
        )),
        "{body}"
    );
    assert!(body.ends_with("\n\n"), "{body:?}");
    assert_eq!(body.matches("event: ").count(), 1, "{body}");
}

/// The dashboard's pages are HTML with their security headers (an
/// unknown instance's page too, not rewritten to JSON); a changing request
/// a browser sent from another origin is refused on any route and changes
/// nothing, while the same request from the page's own origin passes.
#[tokio::test]
async fn dashboard_pages_and_cross_origin_refusals() {
    use tower::ServiceExt;
    let dir = tempfile::tempdir().unwrap();
    let t = vroom_core::testing::TestEngine::new(dir.path());
    let api = router(std::sync::Arc::new(vroom_core::service::Local::new(
        t.engine.clone(),
    )));
    let send = |method: &str, uri: &str, headers: &[(&str, &str)], body: &str| {
        let mut request = axum::http::Request::builder()
            .method(method)
            .uri(uri)
            .header("content-type", "application/json");
        for (k, v) in headers {
            request = request.header(*k, *v);
        }
        let request = request
            .body(axum::body::Body::from(body.to_string()))
            .unwrap();
        let api = api.clone();
        async move {
            let response = api.oneshot(request).await.unwrap();
            let status = response.status().as_u16();
            let headers = response.headers().clone();
            let bytes = axum::body::to_bytes(response.into_body(), 1 << 20)
                .await
                .unwrap();
            (
                status,
                headers,
                String::from_utf8_lossy(&bytes).into_owned(),
            )
        }
    };
    for (uri, status, says) in [
        ("/ui/", 200, "<h1>Overview</h1>"),
        ("/ui/instances", 200, "No instances"),
        ("/ui/rooms", 200, "No rooms"),
        ("/ui/services", 200, "No services"),
        ("/ui/wiring", 200, "No splices"),
        ("/ui/snapshots", 200, "No snapshots"),
        ("/ui/volumes", 200, "No data volumes"),
        ("/ui/nodes", 200, "not in a cluster"),
        ("/ui/events", 200, "<h1>Events</h1>"),
        ("/ui/instances/nope", 404, "nope"),
        ("/ui/rooms/nope", 404, "nope"),
    ] {
        let (got, headers, body) = send("GET", uri, &[], "").await;
        assert_eq!(got, status, "{uri}: {body}");
        assert!(body.contains(says), "{uri}: {body}");
        assert_eq!(headers["content-type"], "text/html; charset=utf-8", "{uri}");
        let csp = headers["content-security-policy"].to_str().unwrap();
        assert!(csp.contains("script-src 'self'"), "{uri}: {csp}");
        assert_eq!(headers["x-frame-options"], "DENY", "{uri}");
    }
    let (got, headers, _) = send("GET", "/ui/assets/app.js", &[], "").await;
    assert_eq!(
        (got, headers["content-type"].to_str().unwrap()),
        (200, "text/javascript")
    );

    let network = r#"{"name":"n1","subnet":"10.9.0.0/24","nat":false}"#;
    for headers in [
        &[("host", "n1:7948"), ("origin", "https://evil.example")][..],
        &[("host", "n1:7948"), ("sec-fetch-site", "cross-site")][..],
    ] {
        let (got, _, body) = send("POST", "/v1/networks", headers, network).await;
        assert_eq!(got, 403, "{headers:?}: {body}");
        let error: ApiErrorBody = serde_json::from_str(&body).unwrap();
        assert_eq!(error.code, ErrorCode::Forbidden);
        assert!(error.message.contains("cross-origin"), "{}", error.message);
        assert!(t.engine.list_networks().is_empty(), "nothing changed");
    }
    let same = [
        ("host", "n1:7948"),
        ("origin", "https://n1:7948"),
        ("sec-fetch-site", "same-origin"),
    ];
    let (got, _, body) = send("POST", "/v1/networks", &same, network).await;
    assert_eq!(got, 201, "{body}");
}
