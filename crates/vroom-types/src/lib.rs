//! Domain and API data types for vroom.
//!
//! Everything a user hands to vroom is a `*Spec`; everything vroom observes is a
//! `*Status`. Validation of user input lives here, next to the types, and does no
//! I/O so that every layer (CLI, API, core) can share it.
//!
//! Two features add machinery that not every user of the types wants (the
//! static guest init links only what it needs):
//! - `openapi`: the `utoipa` schemas of the API types, for the API document
//!   (enabled by `vroom-api`);
//! - `templates`: rendering appliance templates with MiniJinja
//!   ([`template`], enabled by the image builder, which checks them, and by
//!   the guest init, which renders them).

mod api;
mod cluster;
mod config;
mod error;
mod event;
mod exec;
mod image;
mod import_ref;
mod instance;
mod json_int;
pub mod limits;
mod name;
mod network;
mod room;
mod schema;
mod service;
mod size;
mod snapshot;
mod splice;
#[cfg(feature = "templates")]
pub mod template;
mod topology;
mod volume;

pub use api::{
    package_changes, ActionRequest, BuildEvent, BuildImageRequest, BuildReport, ConfigDocument,
    DaemonInfo, DaemonStarter, ImportImageRequest, LogChunk, PackageChange, VersionInfo, VmmInfo,
};
pub use cluster::{
    ClusterInfo, DrainReport, DrainedInstance, HaPolicy, KeptInstance, MigrateRequest, Migration,
    NodeInfo, Placement,
};
pub use config::{
    config_diff, parse_assignment, validate_config_key, validate_config_value, ConfigChange,
    ConfigDiff, ConfigHistory, ConfigLog, ConfigOrigin, ConfigRollback, ConfigUpdate, ConfigValues,
    ConfigVersion, ConfigVersionSummary,
};
pub use error::{ApiErrorBody, ErrorCode, InvalidInputError};
pub use event::{
    Event, EventCursor, EventFilter, EventKind, EventLine, EventQuery, EventQueryError,
    MAX_EVENTS_LIMIT,
};
pub use exec::{
    CappedOutput, ExecEvent, ExecExit, ExecRequestError, ExitReason, DEFAULT_EXEC_TIMEOUT_SECS,
    MAX_EXEC_REQUEST_BYTES, MAX_EXEC_RESULT_BYTES, MAX_EXEC_TIMEOUT_SECS,
};
pub use image::{
    signal_number, ApplianceSpec, FileDigest, ImageManifest, ImageSummary, KernelFlavor, KernelRef,
    OciOrigin, PackageEntry, ServiceSpec, TemplateSpec, MANIFEST_VERSION,
};
pub use import_ref::{ImportReference, ParseImportReferenceError};
pub use instance::{
    Accel, AccelChoice, BootPhases, ConntrackTable, DesiredState, ExecRequest, ExecResult,
    GuestHealth, Instance, InstanceAction, InstanceSpec, InstanceState, InstanceStatus, NicSpec,
    NicStatus, RunRequest, VolumeUsage,
};
pub use ipnet::Ipv4Net;
pub use name::{Name, MAX_NAME_LEN, NAME_PATTERN};
pub use network::{
    parse_subnet, subnet_pattern, HostPort, Network, NetworkSpec, Protocol, MIRROR_ROLE,
    ROUTER_ROLES,
};
pub use room::{
    check_room_name, nic_label, ApplyRoomRequest, ChangeOp, Expose, ExposeRequest, Replicas, Room,
    RoomChange, RoomFile, RoomInstance, RoomNetworks, RoomPlan, RoomService, RoomSpec, RoomState,
    Segment, MAX_ROOM_NAME_LEN,
};
pub use schema::{
    check_complete, check_config, check_rules, host_number, shown_config, ConfigField, ConfigRule,
    ConfigSchema, FieldType, SECRET_MASK,
};
pub use service::{
    balancer_name, is_service_name, member_name, parse_replicas, MemberRecord, ScaleDecision,
    ScaleTarget, Service, ServiceDefinition, ServiceLoad, ServiceMember, ServiceRecord,
    ServiceScaleRequest, ServiceUpdate, ServiceUpdateRequest, KEPT_DECISIONS, MAX_SERVICE_NAME_LEN,
    MAX_SERVICE_REPLICAS,
};
pub use size::{parse_mem_mib, MIN_MEM_MIB};
pub use snapshot::{
    parse_sha256sums, ArchiveReport, ArchiveRequest, ArchivedFile, RestoreRequest, Snapshot,
    SnapshotFile, SnapshotKind, SnapshotRequest, SnapshotVolume, VmShape, WarmRequest,
    ARCHIVE_MANIFEST,
};
pub use splice::{
    is_l2_role, FailMode, Mirror, MirrorRequest, NicRef, Splice, SpliceEvent, SpliceRequest,
    SpliceState, INSIDE_ROLE, L2_ROLES, MAX_SPLICE_EVENTS, OUTSIDE_ROLE,
};
pub use topology::{Topology, TopologyInstance, TopologyNic};
pub use volume::{
    check_mount_path, check_volume_mib, parse_volume_size_mib, ExportAddress, ExportKind,
    ReplicaState, SnapshotTaken, SyncReport, Volume, VolumeAttach, VolumeCloneRequest,
    VolumeCreateRequest, VolumeDecl, VolumeExport, VolumeExportRequest, VolumeFs,
    VolumeImportRequest, VolumeReplication, VolumeResizeRequest, VolumeRestoreRequest,
    VolumeSnapshot, VolumeSnapshotRequest, MAX_VOLUME_MIB, MIN_VOLUME_MIB,
};
