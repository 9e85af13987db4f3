//! OpenAPI links: how the answer of a create leads to the routes of what it
//! created. Instances and networks are addressed by name, not by their `id`,
//! which a generated client (or schemathesis' link inference) would
//! otherwise guess.

use utoipa::openapi::OpenApi;

/// (the `POST` that creates, its success status, the path parameter the
/// targets take, where the answer holds its value, the target operations).
const LINKS: &[(&str, &str, &str, &str, &[&str])] = &[
    (
        "/v1/instances",
        "201",
        "name",
        "$response.body#/spec/name",
        &[
            "get_instance",
            "remove_instance",
            "instance_action",
            "instance_logs",
            "exec_instance",
            "read_file",
            "get_config",
            "update_config",
            "replace_config",
            "reset_config",
        ],
    ),
    (
        "/v1/networks",
        "201",
        "name",
        "$response.body#/name",
        &["get_network", "remove_network"],
    ),
    (
        "/v1/splices",
        "201",
        "appliance",
        "$response.body#/appliance",
        &["get_splice", "remove_splice"],
    ),
    (
        "/v1/rooms",
        "201",
        "name",
        "$response.body#/name",
        &["get_room", "remove_room", "expose"],
    ),
    (
        "/v1/mirrors",
        "201",
        "id",
        "$response.body#/id",
        &["remove_mirror"],
    ),
];

pub struct CreatedResourceLinks;

impl utoipa::Modify for CreatedResourceLinks {
    fn modify(&self, openapi: &mut OpenApi) {
        use utoipa::openapi::RefOr;
        for (path, status, param, value, targets) in LINKS {
            let response = openapi
                .paths
                .paths
                .get_mut(*path)
                .and_then(|item| item.post.as_mut())
                .and_then(|op| op.responses.responses.get_mut(*status));
            let Some(RefOr::T(response)) = response else {
                continue;
            };
            // utoipa 5.5's `Link` serializes `operation_id` rather than
            // OpenAPI's `operationId`, so the links go in as plain JSON.
            let links: serde_json::Map<String, serde_json::Value> = targets
                .iter()
                .map(|target| {
                    let link = serde_json::json!({
                        "operationId": target,
                        "parameters": {*param: value},
                    });
                    ((*target).to_string(), link)
                })
                .collect();
            response
                .extensions
                .get_or_insert_with(Default::default)
                .insert("links".into(), links.into());
        }
    }
}
