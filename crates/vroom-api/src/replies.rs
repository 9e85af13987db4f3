//! The error replies routes share, as the OpenAPI document lists them. Every
//! one carries an [`vroom_types::ApiErrorBody`].

use std::collections::BTreeMap;

use utoipa::openapi::{ContentBuilder, Ref, RefOr, Response, ResponseBuilder};

fn error(description: &str) -> RefOr<Response> {
    ResponseBuilder::new()
        .description(description)
        .content(
            "application/json",
            ContentBuilder::new()
                .schema(Some(Ref::from_schema_name("ApiErrorBody")))
                .build(),
        )
        .build()
        .into()
}

macro_rules! replies {
    ($(#[$doc:meta])* $name:ident { $($status:literal => $description:literal),+ $(,)? }) => {
        $(#[$doc])*
        pub struct $name;

        impl utoipa::IntoResponses for $name {
            fn responses() -> BTreeMap<String, RefOr<Response>> {
                BTreeMap::from([$(($status.to_string(), error($description))),+])
            }
        }
    };
}

replies!(
    /// A route with a `{name}` or `{reference}` in its path.
    PathErrors {
        "400" => "The path or the query does not parse.",
        "404" => "Nothing of that name exists.",
    }
);

replies!(
    /// A route that takes a JSON body.
    BodyErrors {
        "400" => "The body does not parse, or a value is out of its range.",
        "413" => "The body is larger than the route accepts: 64 KiB; 256 KiB for a room file, 2 MiB for config values (code `payload_too_large`). The message names the route's limit.",
        "415" => "The body is not `application/json`.",
    }
);

replies!(
    /// A route that touches the host (files, processes, the state store).
    HostErrors {
        "500" => "The daemon failed; its log has the cause.",
    }
);

replies!(
    /// A route that changes an instance's config through its guest.
    ConfigErrors {
        "409" => "The instance is starting or stopping.",
        "422" => "The values do not fit the appliance: its schema, its rules, its templates or its services' checks (code `invalid_config`).",
        "502" => "The guest agent failed.",
        "504" => "The guest agent did not answer.",
    }
);
