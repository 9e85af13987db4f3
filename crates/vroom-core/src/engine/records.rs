//! The records a new instance starts with: its [`Instance`] and the
//! identity its config volume carries. Used by whatever makes an instance
//! (a run, a clone, a warm-up's golden guest, a migration's arrival).

use super::*;

/// A new instance's record: wanted running, not started yet, the image's
/// seed config.
pub(super) fn new_instance(
    id: &str,
    spec: InstanceSpec,
    image: &BootImage,
    mem_mib: u64,
    accel: vroom_types::Accel,
    nics: Vec<NicStatus>,
) -> Instance {
    Instance {
        id: id.to_string(),
        spec,
        image_id: image.id.clone(),
        image_name: image.manifest.name.clone(),
        mem_mib,
        created_at: now_secs(),
        desired: DesiredState::Running,
        nics,
        status: InstanceStatus {
            accel: Some(accel),
            ..InstanceStatus::stopped()
        },
        config: image.manifest.appliance.seed_config.clone(),
        node: None,
        health: None,
    }
}

/// A machine id (32 hex digits) derived from the instance id: stable for
/// the instance, different for every clone.
pub(super) fn machine_id(instance_id: &str) -> String {
    use sha2::Digest;
    let digest = sha2::Sha256::digest(format!("vroom-machine-id:{instance_id}"));
    digest[..16].iter().map(|b| format!("{b:02x}")).collect()
}

pub(super) fn instance_file(instance: &Instance, image: &BootImage) -> InstanceFile {
    let roles = &image.manifest.appliance.nic_roles;
    InstanceFile {
        version: VOLUME_VERSION,
        hostname: instance.spec.name.to_string(),
        nics: instance
            .nics
            .iter()
            .enumerate()
            .map(|(i, nic)| NicConfig {
                mac: nic.mac.clone(),
                role: nic.role.clone().or_else(|| roles.get(i).cloned()),
                address: nic.ip.map(|ip| ip.to_string()),
                prefix_len: nic.prefix_len,
                gateway: Some(nic.gateway.to_string()),
            })
            .collect(),
        machine_id: Some(machine_id(&instance.id)),
        volumes: data_volumes(instance, image),
    }
}

/// The instance's data volumes as its guest mounts them, in the order of
/// their disks. The image's recipe says whether programs may run from a
/// path it declares.
fn data_volumes(instance: &Instance, image: &BootImage) -> Vec<DataVolume> {
    let decls = &image.manifest.appliance.volumes;
    instance
        .spec
        .volumes
        .iter()
        .enumerate()
        .map(|(i, attach)| {
            let decl = decls.iter().find(|d| d.path == attach.path);
            DataVolume {
                serial: data_disk_serial(i),
                name: attach.volume.to_string(),
                path: attach.path.clone(),
                fs: decl.map(|d| d.fs).unwrap_or_default().as_str().to_string(),
                read_only: attach.read_only,
                exec: decl.is_some_and(|d| d.exec),
            }
        })
        .collect()
}
