//! Ready for failovers: every node keeps the image of each HA instance
//! (fetched from a peer by digest while the instance's node is alive: an
//! imported image, or one built on one node only, cannot be had from
//! anywhere once that node is gone), and a warm snapshot of each image a
//! `standby` instance runs, so that a failover starts it from memory.

use std::time::{Duration, Instant};

use super::*;

/// How long after a failed fetch of an HA instance's image it is tried again.
pub(super) const FETCH_RETRY: Duration = Duration::from_secs(30);

impl ClusterNode {
    /// Fetches here the image of every HA instance this node lacks (a
    /// failover to it needs it, and its node may be gone by then), and keeps
    /// a warm snapshot of every image a `standby` instance runs (in its
    /// memory size), so that a failover to this node starts it from memory
    /// instead of booting. One image at a time, in the background.
    pub(super) fn prepare_standby(&self, view: &View) {
        if view.cordons.contains_key(&self.name) || !self.warming.lock_unpoisoned().is_empty() {
            return;
        }
        let warm = self.engine.list_warm();
        for (record, _) in view.instances.values() {
            if record.request.placement.ha.is_none() || record.removing {
                continue;
            }
            let reference = record.request.spec.image.to_string();
            let Ok(image) = self.engine.get_image(&reference) else {
                // Only an id can be fetched (a name is the engine's to
                // resolve, or a snapshot's).
                if !is_image_id(&reference) {
                    continue;
                }
                let key = format!("fetch/{reference}");
                let failed = self.unfetched.lock_unpoisoned().get(&key).copied();
                if failed.is_some_and(|at| at.elapsed() < FETCH_RETRY) {
                    continue;
                }
                self.warming.lock_unpoisoned().insert(key.clone());
                let node = self.arc();
                tokio::spawn(async move {
                    match node.ensure_image(&reference).await {
                        Ok(()) => {
                            node.unfetched.lock_unpoisoned().remove(&key);
                        }
                        Err(e) => {
                            tracing::warn!(image = %reference, error = %e.message, "cannot fetch the image of an HA instance; a failover to this node fails until it is here");
                            node.unfetched
                                .lock_unpoisoned()
                                .insert(key.clone(), Instant::now());
                        }
                    }
                    node.warming.lock_unpoisoned().remove(&key);
                });
                return;
            };
            if record.request.placement.ha != HaPolicy::Standby {
                continue;
            }
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
