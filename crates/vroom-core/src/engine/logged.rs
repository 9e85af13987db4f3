//! The public operations that change something besides an instance's own
//! lifecycle (which [`Engine::update`] logs), each with the event it
//! leaves when it succeeds. The work itself is in the `*_unlogged`
//! function of its concern's module.

use std::path::PathBuf;
use std::sync::Arc;

use vroom_types::{
    ApplyRoomRequest, ArchiveReport, BuildReport, EventKind, Expose, ImageSummary, Instance,
    Network, NetworkSpec, Protocol, Room, RoomPlan, RoomSpec, Snapshot, SnapshotRequest, Volume,
    VolumeCloneRequest, VolumeCreateRequest, VolumeExport, VolumeExportRequest,
    VolumeImportRequest, VolumeResizeRequest, VolumeRestoreRequest, VolumeSnapshot,
    VolumeSnapshotRequest,
};

use super::Engine;
use crate::error::OpError;
use crate::events::NewEvent;

impl Engine {
    /// Logs `event` of a result that is `Ok`.
    fn logged<T>(
        &self,
        result: Result<T, OpError>,
        event: impl FnOnce(&T) -> NewEvent,
    ) -> Result<T, OpError> {
        if let Ok(value) = &result {
            self.emit(event(value));
        }
        result
    }

    // Snapshots.

    pub async fn snapshot(self: &Arc<Self>, req: SnapshotRequest) -> Result<Snapshot, OpError> {
        let result = self.snapshot_unlogged(req).await;
        self.logged(result, |s| {
            NewEvent::new(EventKind::Snapshot, "created", s.name.as_str())
                .message(format!("of {}", s.instance.spec.name))
                .detail("instance", s.instance.spec.name.to_string())
                .detail("pause_ms", s.pause_ms)
                .detail("state_bytes", s.state_bytes)
        })
    }

    pub async fn restore(
        self: &Arc<Self>,
        name: &str,
        snapshot_name: &str,
    ) -> Result<Instance, OpError> {
        let result = self.restore_unlogged(name, snapshot_name).await;
        self.logged(result, |i| {
            NewEvent::new(EventKind::Snapshot, "restored", snapshot_name)
                .message(format!("into {name}"))
                .detail("instance", name)
                .room(self.room_of(i))
        })
    }

    pub async fn remove_snapshot(&self, name: &str) -> Result<(), OpError> {
        let result = self.remove_snapshot_unlogged(name).await;
        self.logged(result, |_| {
            NewEvent::new(EventKind::Snapshot, "removed", name)
        })
    }

    pub async fn warm_image(
        self: &Arc<Self>,
        image_ref: &str,
        mem_mib: Option<u64>,
    ) -> Result<Snapshot, OpError> {
        let result = self.warm_image_unlogged(image_ref, mem_mib).await;
        self.logged(result, |s| {
            NewEvent::new(EventKind::Snapshot, "warmed", s.name.as_str())
                .message(format!("a warm start of image {}", s.instance.image_name))
                .detail("image_id", s.instance.image_id.clone())
        })
    }

    pub async fn remove_archived(
        self: &Arc<Self>,
        name: &str,
        dir: &str,
        caller: Option<(u32, u32)>,
    ) -> Result<ArchiveReport, OpError> {
        let result = self.remove_archived_unlogged(name, dir, caller).await;
        self.logged(result, |report| {
            NewEvent::new(EventKind::Instance, "archived", name)
                .message(format!(
                    "archived into {} and removed",
                    report.dir.display()
                ))
                .detail("files", report.files.len())
                .detail("memory", report.memory)
        })
    }

    // Rooms and networks.

    pub async fn create_room(self: &Arc<Self>, spec: RoomSpec) -> Result<Room, OpError> {
        let result = self.create_room_unlogged(spec).await;
        self.logged(result, |room| room_event(room, "created"))
    }

    pub async fn remove_room(self: &Arc<Self>, name: &str, force: bool) -> Result<(), OpError> {
        let result = self.remove_room_unlogged(name, force).await;
        self.logged(result, |_| {
            NewEvent::new(EventKind::Room, "removed", name).room(Some(name))
        })
    }

    pub async fn expose(self: &Arc<Self>, name: &str, expose: Expose) -> Result<Room, OpError> {
        let what = format!(
            "port {}/{} to {}:{}",
            expose.port,
            expose.proto.as_str(),
            expose.to,
            expose.to_port
        );
        let result = self.expose_unlogged(name, expose).await;
        self.logged(result, |room| room_event(room, "exposed").message(what))
    }

    pub async fn unexpose(
        self: &Arc<Self>,
        name: &str,
        port: u16,
        proto: Protocol,
    ) -> Result<Room, OpError> {
        let result = self.unexpose_unlogged(name, port, proto).await;
        self.logged(result, |room| {
            room_event(room, "unexposed").message(format!("port {port}/{}", proto.as_str()))
        })
    }

    pub async fn apply_room(self: &Arc<Self>, req: ApplyRoomRequest) -> Result<RoomPlan, OpError> {
        let result = self.apply_room_unlogged(req).await;
        match &result {
            Ok(plan) if plan.applied && !plan.changes.is_empty() => self.emit(
                NewEvent::new(EventKind::Room, "applied", plan.room.as_str())
                    .room(Some(plan.room.as_str()))
                    .message(format!("{} change(s)", plan.changes.len()))
                    .detail("changes", plan.changes.len()),
            ),
            _ => {}
        }
        result
    }

    pub async fn create_network(&self, spec: NetworkSpec) -> Result<Network, OpError> {
        let result = self.create_network_unlogged(spec).await;
        self.logged(result, |n| {
            NewEvent::new(EventKind::Network, "created", n.name.as_str())
                .detail("subnet", n.subnet.to_string())
        })
    }

    pub async fn remove_network(&self, name: &str) -> Result<(), OpError> {
        let result = self.remove_network_unlogged(name).await;
        self.logged(result, |_| {
            NewEvent::new(EventKind::Network, "removed", name)
        })
    }

    // Images.

    pub async fn build_image(
        &self,
        recipe: PathBuf,
        update: bool,
        kernel: Option<String>,
        caller: Option<u32>,
        progress: impl FnMut(&str, &str) + Send + 'static,
    ) -> Result<BuildReport, OpError> {
        let result = self
            .build_image_unlogged(recipe, update, kernel, caller, progress)
            .await;
        match &result {
            Ok(report) if !report.cached => self
                .emit(image_event(&report.image, "built").detail("packages", report.changes.len())),
            _ => {}
        }
        result
    }

    pub async fn import_oci_image(
        &self,
        request: vroom_types::ImportImageRequest,
        caller: Option<u32>,
        progress: impl FnMut(&str, &str) + Send + 'static,
    ) -> Result<BuildReport, OpError> {
        let reference = request.reference.clone();
        let result = self
            .import_oci_image_unlogged(request, caller, progress)
            .await;
        match &result {
            Ok(report) if !report.cached => {
                self.emit(image_event(&report.image, "imported").detail("reference", reference))
            }
            _ => {}
        }
        result
    }

    pub async fn remove_image(&self, reference: &str) -> Result<(), OpError> {
        let result = self.remove_image_unlogged(reference).await;
        self.logged(result, |_| {
            NewEvent::new(EventKind::Image, "removed", reference)
        })
    }

    pub async fn import_image(
        &self,
        id: &str,
        manifest: Vec<u8>,
        dir: tempfile::TempDir,
    ) -> Result<ImageSummary, OpError> {
        let result = self.import_image_unlogged(id, manifest, dir).await;
        self.logged(result, |image| image_event(image, "received"))
    }

    pub async fn prune_images(&self) -> Result<Vec<ImageSummary>, OpError> {
        let result = self.prune_images_unlogged().await;
        if let Ok(pruned) = &result {
            for image in pruned {
                self.emit(image_event(image, "removed").message("pruned"));
            }
        }
        result
    }

    // Volumes.

    pub async fn create_volume(&self, req: VolumeCreateRequest) -> Result<Volume, OpError> {
        let result = self.create_volume_unlogged(req).await;
        self.logged(result, |v| {
            volume_event(v, "created").detail("size_mib", v.size_mib)
        })
    }

    pub async fn remove_volume(&self, name: &str) -> Result<(), OpError> {
        let result = self.remove_volume_unlogged(name).await;
        self.logged(result, |_| {
            NewEvent::new(EventKind::Volume, "removed", name)
        })
    }

    pub async fn snapshot_volume(
        &self,
        name: &str,
        req: VolumeSnapshotRequest,
    ) -> Result<VolumeSnapshot, OpError> {
        let result = self.snapshot_volume_unlogged(name, req).await;
        self.logged(result, |s| {
            NewEvent::new(EventKind::Volume, "snapshotted", name)
                .id(s.name.as_str())
                .message(format!("snapshot {}", s.name))
        })
    }

    pub async fn restore_volume(
        &self,
        name: &str,
        req: VolumeRestoreRequest,
    ) -> Result<Volume, OpError> {
        let result = self.restore_volume_unlogged(name, req).await;
        self.logged(result, |v| volume_event(v, "restored"))
    }

    pub async fn clone_volume(
        &self,
        snapshot: &str,
        req: VolumeCloneRequest,
    ) -> Result<Volume, OpError> {
        let result = self.clone_volume_unlogged(snapshot, req).await;
        self.logged(result, |v| {
            volume_event(v, "created").message(format!("a clone of snapshot {snapshot}"))
        })
    }

    pub async fn remove_volume_snapshot(&self, name: &str, snapshot: &str) -> Result<(), OpError> {
        let result = self.remove_volume_snapshot_unlogged(name, snapshot).await;
        self.logged(result, |_| {
            NewEvent::new(EventKind::Volume, "snapshot_removed", name).id(snapshot)
        })
    }

    pub async fn resize_volume(
        &self,
        name: &str,
        req: VolumeResizeRequest,
    ) -> Result<Volume, OpError> {
        let result = self.resize_volume_unlogged(name, req).await;
        self.logged(result, |v| {
            volume_event(v, "resized").detail("size_mib", v.size_mib)
        })
    }

    pub async fn export_volume(
        &self,
        name: &str,
        req: VolumeExportRequest,
        caller_uid: Option<u32>,
    ) -> Result<VolumeExport, OpError> {
        let result = self.export_volume_unlogged(name, req, caller_uid).await;
        self.logged(result, |e| export_event(e, "exported"))
    }

    pub async fn unexport_volume(&self, name: &str) -> Result<(), OpError> {
        let result = self.unexport_volume_unlogged(name).await;
        self.logged(result, |_| {
            NewEvent::new(EventKind::Volume, "unexported", name)
        })
    }

    pub async fn import_volume(
        &self,
        name: &str,
        req: VolumeImportRequest,
    ) -> Result<VolumeExport, OpError> {
        let result = self.import_volume_unlogged(name, req).await;
        self.logged(result, |e| export_event(e, "importing"))
    }

    pub async fn commit_import(&self, name: &str) -> Result<Volume, OpError> {
        let result = self.commit_import_unlogged(name).await;
        self.logged(result, |v| volume_event(v, "imported"))
    }
}

fn room_event(room: &Room, action: &str) -> NewEvent {
    NewEvent::new(EventKind::Room, action, room.name.as_str()).room(Some(room.name.as_str()))
}

fn image_event(image: &ImageSummary, action: &str) -> NewEvent {
    NewEvent::new(EventKind::Image, action, &image.name)
        .id(&image.id)
        .detail("version", image.version.clone())
}

fn volume_event(volume: &Volume, action: &str) -> NewEvent {
    NewEvent::new(EventKind::Volume, action, volume.name.as_str()).id(&volume.id)
}

fn export_event(export: &VolumeExport, action: &str) -> NewEvent {
    NewEvent::new(EventKind::Volume, action, export.volume.as_str())
        .message(format!("{:?} on {}", export.kind, export.listen))
}
