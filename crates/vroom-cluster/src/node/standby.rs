//! Standby snapshots: a warm snapshot on every node of each image a
//! `standby` instance runs, so that a failover starts it from memory.

use super::*;

impl ClusterNode {
    /// Keeps a warm snapshot here of every image a `standby` instance runs
    /// (in its memory size), so that a failover to this node starts it from
    /// memory instead of booting. Warms one image at a time, in the background.
    pub(super) fn prepare_standby(&self, view: &View) {
        if view.cordons.contains_key(&self.name) || !self.warming.lock_unpoisoned().is_empty() {
            return;
        }
        let warm = self.engine.list_warm();
        for (record, _) in view.instances.values() {
            if record.request.placement.ha != HaPolicy::Standby || record.removing {
                continue;
            }
            let reference = record.request.spec.image.to_string();
            let Ok(image) = self.engine.get_image(&reference) else {
                // Not here yet: fetched from a peer, warmed on a later pass.
                let key = format!("fetch/{reference}");
                if self.unwarmable.lock_unpoisoned().contains(&key) {
                    continue;
                }
                self.warming.lock_unpoisoned().insert(key.clone());
                let node = self.arc();
                tokio::spawn(async move {
                    if let Err(e) = node.ensure_image(&reference).await {
                        tracing::warn!(image = %reference, error = %e.message, "cannot fetch an image for standby instances");
                        node.unwarmable.lock_unpoisoned().insert(key.clone());
                    }
                    node.warming.lock_unpoisoned().remove(&key);
                });
                return;
            };
            let have = warm
                .iter()
                .any(|s| s.image_id() == image.id && s.instance.mem_mib == record.mem_mib);
            if have {
                continue;
            }
            let key = format!("{}/{}", image.id, record.mem_mib);
            if self.unwarmable.lock_unpoisoned().contains(&key) {
                continue;
            }
            self.warming.lock_unpoisoned().insert(key.clone());
            let node = self.arc();
            let mem = record.mem_mib;
            tokio::spawn(async move {
                match node.engine.warm_image(&image.id, Some(mem)).await {
                    Ok(s) => {
                        tracing::info!(image = %image.name, snapshot = %s.name, "warmed for standby instances")
                    }
                    Err(e) => {
                        tracing::warn!(image = %image.name, error = %e.message, "cannot warm an image for standby instances; they boot cold here");
                        node.unwarmable.lock_unpoisoned().insert(key.clone());
                    }
                }
                node.warming.lock_unpoisoned().remove(&key);
            });
            return;
        }
    }
}
