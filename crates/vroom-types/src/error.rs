use serde::{Deserialize, Serialize};

/// Stable, machine-readable error codes returned by the API next to a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    InvalidArgument,
    NotFound,
    AlreadyExists,
    Conflict,
    HostUnsupported,
    ResourceExhausted,
    Timeout,
    GuestError,
    Internal,
    /// The route exists, but not with this method.
    MethodNotAllowed,
    /// The request body exceeds the API's limit.
    PayloadTooLarge,
    /// The request body is not `application/json`.
    UnsupportedMediaType,
    /// The request's path and query are longer than the API accepts.
    UriTooLong,
    /// Well-formed config values that the appliance refuses: a key its
    /// schema lacks, a value of the wrong type, a broken cross-field rule, a
    /// template that does not render or a service check that fails.
    InvalidConfig,
    /// A pcap filter expression libpcap's compiler refuses.
    InvalidFilter,
    /// Well-formed volume requests the rules of data volumes refuse: a mount
    /// path over a system directory or on the image's read-only root, a
    /// volume attached twice or two at one path, volumes for an ephemeral
    /// instance or an image without ext4, an imported image that is not ext4.
    InvalidVolume,
    /// Well-formed service requests the rules of services refuse: bounds
    /// whose minimum is above their maximum, a target without room to scale
    /// (or bounds without a target), a network and a room both or neither,
    /// an image that serves another port, a number outside the bounds.
    InvalidService,
    /// A well-formed image reference to import that does not parse (an
    /// unknown transport, a bad repository name, tag or digest), or whose
    /// registry denies access to it (401, 403: credentials missing or wrong).
    InvalidReference,
    /// A browser sent a changing request from another web origin (see the
    /// dashboard, docs/dashboard.md); nothing was changed.
    Forbidden,
    /// A server vroom reads from on the caller's behalf failed: an image
    /// registry that cannot be reached or answered a 5xx or a broken answer.
    /// Nothing was changed; trying again later may work.
    UpstreamError,
}

impl ErrorCode {
    /// Whether a user can fix the cause by changing their request.
    pub fn is_user_error(self) -> bool {
        !matches!(self, ErrorCode::Internal | ErrorCode::UpstreamError)
    }
}

/// The JSON body of every error answer of the API.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ApiErrorBody {
    pub code: ErrorCode,
    pub message: String,
}

impl InvalidInputError {
    /// How the API answers: a request beyond what this host has (memory,
    /// CPUs) is well formed but cannot be carried out here, which the API
    /// document, written for every host, cannot state in advance.
    pub fn code(&self) -> ErrorCode {
        match self {
            InvalidInputError::MemTooLarge { .. } => ErrorCode::HostUnsupported,
            // A count in the documented range, refused: the host has fewer.
            InvalidInputError::Cpus { cpus, .. }
                if crate::limits::CPUS.check(u64::from(*cpus)).is_ok() =>
            {
                ErrorCode::HostUnsupported
            }
            // Schema-valid (any string is a path), refused by the rules.
            InvalidInputError::MountPath { .. } => ErrorCode::InvalidVolume,
            InvalidInputError::ExportAddress { .. } => ErrorCode::InvalidVolume,
            // Each field schema-valid, the two together refused.
            InvalidInputError::ReplicaNodeWithOneCopy => ErrorCode::InvalidVolume,
            _ => ErrorCode::InvalidArgument,
        }
    }
}

/// Input that fails validation before any work is done.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidInputError {
    #[error("invalid name {name:?}: {reason}")]
    Name { name: String, reason: &'static str },
    #[error(
        "invalid memory size {raw:?}: use a number of MiB, optionally with M or G (e.g. 128M)"
    )]
    MemSize { raw: String },
    #[error("memory {mem_mib} MiB is below the {min_mib} MiB the guest kernel needs")]
    MemTooSmall { mem_mib: u64, min_mib: u64 },
    #[error("memory {mem_mib} MiB exceeds the host's {host_mib} MiB")]
    MemTooLarge { mem_mib: u64, host_mib: u64 },
    #[error("invalid cpu count {cpus}: must be between 1 and {max}")]
    Cpus { cpus: u32, max: u32 },
    #[error("invalid network attachment {raw:?}: use NET or NET:IP")]
    NicSpec { raw: String },
    #[error("invalid subnet {raw:?}: {reason}")]
    Subnet { raw: String, reason: &'static str },
    #[error("invalid host port {raw:?}: {reason}")]
    HostPort { raw: String, reason: &'static str },
    #[error("invalid config key {key:?}: {reason}")]
    ConfigKey { key: String, reason: &'static str },
    #[error("invalid value for config key {key:?}: {reason}")]
    ConfigValue { key: String, reason: &'static str },
    #[error("unknown config key {key:?} (known: {known})")]
    UnknownConfigKey { key: String, known: String },
    #[error("invalid value {value:?} for config key {key:?}: {reason}")]
    ConfigType {
        key: String,
        value: String,
        reason: String,
    },
    #[error("invalid config assignment {raw:?}: use KEY=VALUE")]
    ConfigAssignment { raw: String },
    #[error("invalid accelerator {raw:?}: use auto, kvm or tcg")]
    Accel { raw: String },
    #[error("invalid {what} {raw:?}: use one of {choices}")]
    Choice {
        what: &'static str,
        raw: String,
        choices: &'static str,
    },
    #[error("invalid NIC reference {raw:?}: use VM or VM:NIC (a role or an index from 0)")]
    NicRef { raw: String },
    #[error("invalid {field} {raw:?}: a NIC role or an index from 0")]
    NicField { field: &'static str, raw: String },
    #[error("the filter is {len} bytes long; at most 1024")]
    FilterTooLong { len: usize },
    #[error("invalid room name {raw:?}: at most 28 characters (its networks are NAME-lan and NAME-dmz, its firewall NAME-fw)")]
    RoomName { raw: String },
    #[error("an exposed port must be between 1 and 65535")]
    ExposePort,
    #[error("the config lacks keys {missing}: a whole config must set every key")]
    MissingConfigKeys { missing: String },
    #[error("{field} must be an integer between {min} and {max}, got {value}")]
    OutOfRange {
        field: &'static str,
        value: String,
        min: u64,
        max: u64,
    },
    #[error("config volume size {kib} KiB is outside {min}..={max} KiB")]
    ConfigVolumeSize { kib: u32, min: u64, max: u64 },
    #[error("invalid volume size {raw:?}: use a number of MiB, optionally with M, G or T (e.g. 2G), from 16M to 16T")]
    VolumeSize { raw: String },
    #[error("invalid mount path {path:?}: {reason}")]
    MountPath { path: String, reason: &'static str },
    #[error("invalid volume attachment {raw:?}: use NAME:/path or NAME:/path:ro")]
    VolumeAttach { raw: String },
    #[error("invalid listen address {raw:?}: {reason}")]
    ExportAddress { raw: String, reason: &'static str },
    #[error("a volume with one copy has no replica: --replica-node needs --replicas 2")]
    ReplicaNodeWithOneCopy,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_table() {
        let cases = [
            (
                InvalidInputError::MemTooLarge {
                    mem_mib: 9000,
                    host_mib: 4000,
                },
                ErrorCode::HostUnsupported,
            ),
            (
                InvalidInputError::Cpus { cpus: 8, max: 2 },
                ErrorCode::HostUnsupported,
            ),
            (
                InvalidInputError::Cpus { cpus: 0, max: 2 },
                ErrorCode::InvalidArgument,
            ),
            (
                InvalidInputError::Cpus {
                    cpus: 256,
                    max: 255,
                },
                ErrorCode::InvalidArgument,
            ),
            (
                InvalidInputError::MemTooSmall {
                    mem_mib: 64,
                    min_mib: 128,
                },
                ErrorCode::InvalidArgument,
            ),
            (
                InvalidInputError::ReplicaNodeWithOneCopy,
                ErrorCode::InvalidVolume,
            ),
        ];
        for (error, code) in cases {
            assert_eq!(error.code(), code, "{error}");
        }
    }
}
