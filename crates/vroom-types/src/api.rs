//! Small request and response bodies of the API that are not domain objects.

use serde::{Deserialize, Serialize};

use crate::{ConfigValues, InstanceAction};

/// The body of `POST /v1/instances/{name}/actions`.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ActionRequest {
    pub action: InstanceAction,
}

/// A whole config, as returned by `GET` and accepted by `PUT /v1/instances/{name}/config`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ConfigDocument {
    pub values: ConfigValues,
}

/// A piece of an instance's console log.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct LogChunk {
    pub data: String,
    /// Pass as `offset` to get what follows.
    pub next_offset: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct VersionInfo {
    pub version: String,
    pub data_dir: String,
}

/// The body of `POST /v1/images/build`.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct BuildImageRequest {
    /// Absolute path of a recipe file, or of a directory holding `recipe.toml`, on the daemon's host.
    pub recipe: String,
}
