//! A VM's recorded splices and mirrors (its wiring): written by its owner
//! under the fencing token so that they move with it, made on the node
//! that runs it before the VM starts there.

use super::*;

impl ClusterNode {
    /// Makes VM `name`'s recorded splices and mirrors here (each appliance
    /// booted and in the path), fetching the appliances' images first.
    /// Returns the record's revision (0: none).
    pub(super) async fn bring_wiring(&self, name: &str) -> Result<i64, OpError> {
        let Some((wiring, kv)) = self
            .store
            .get_json::<Wiring>(&key(WIRINGS, name))
            .await
            .map_err(|e| etcd_error("cannot read the splices", e))?
        else {
            return Ok(0);
        };
        for carried in &wiring.splices {
            self.ensure_image(&carried.spec.image).await?;
        }
        self.engine.install_wiring(name, &wiring).await?;
        Ok(kv.mod_revision)
    }

    /// Rewrites VM `name`'s recorded wiring if it differs from the one
    /// here, unless the record changed since `recorded` was read.
    pub(super) async fn resync_wiring(
        &self,
        name: &str,
        token: i64,
        recorded: Option<&(Wiring, Kv)>,
    ) {
        let here = self.engine.wiring_of(name);
        let value = |w: Option<&Wiring>| w.and_then(|w| serde_json::to_value(w).ok());
        if value(here.as_ref()) == value(recorded.map(|(w, _)| w)) {
            return;
        }
        let k = key(WIRINGS, name);
        let op = match &here {
            Some(wiring) if json(wiring).len() > MAX_CONFIG_BYTES => {
                tracing::warn!(instance = %name, "its splices and their config exceed the cluster's cap; not recorded");
                return;
            }
            Some(wiring) => Op::put(k.clone(), json(wiring)),
            None => Op::delete(k.clone()),
        };
        let seen = recorded.map_or(0, |(_, kv)| kv.mod_revision);
        let txn = Txn::new()
            .when([
                Compare::mod_revision(key(OWNERS, name), token),
                Compare::mod_revision(k, seen),
            ])
            .and_then([op]);
        match self.store.txn(txn).await {
            Ok(r) if r.succeeded() => {
                tracing::info!(instance = %name, "recorded its splices and mirrors as they are here")
            }
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(instance = %name, error = %e, "cannot record its splices and mirrors")
            }
        }
    }

    /// Refuses a change to `name` (its config, splices or mirrors) while it
    /// migrates away: the destination has read them already.
    pub(super) fn refuse_while_moving(&self, name: &str) -> Result<(), OpError> {
        let migrating = self.migrating.lock_unpoisoned().contains(name);
        if migrating || self.engine.migrating_out().iter().any(|m| m == name) {
            return Err(OpError::conflict(format!(
                "{name} is migrating to another node; change it when the migration is done"
            )));
        }
        Ok(())
    }

    /// Writes (or, with `None`, deletes) VM `name`'s wiring under the
    /// fencing token. Nothing to do for a VM the cluster does not know (a
    /// local one); a conflict for one this node does not own.
    pub(super) async fn put_wiring(
        &self,
        name: &str,
        wiring: Option<&Wiring>,
    ) -> Result<(), OpError> {
        let known = self.known.lock_unpoisoned().contains(name);
        let Some(token) = self.token(name) else {
            if !known {
                return Ok(());
            }
            return Err(OpError::conflict(format!(
                "node {} does not own {name}; the change is not saved",
                self.name
            )));
        };
        let k = key(WIRINGS, name);
        let op = match wiring {
            Some(wiring) => {
                let bytes = json(wiring);
                if bytes.len() > MAX_CONFIG_BYTES {
                    return Err(OpError::new(
                        ErrorCode::InvalidArgument,
                        format!(
                            "the splices of {name} and their appliances' config come to {} KiB; a cluster instance carries at most {} KiB",
                            bytes.len() / 1024,
                            MAX_CONFIG_BYTES / 1024
                        ),
                    ));
                }
                Op::put(k, bytes)
            }
            None => Op::delete(k),
        };
        let txn = Txn::new()
            .when([Compare::mod_revision(key(OWNERS, name), token)])
            .and_then([op]);
        match self.store.txn(txn).await {
            Ok(r) if r.succeeded() => Ok(()),
            Ok(_) => Err(OpError::conflict(format!(
                "node {} lost {name} to another node; the change is not saved",
                self.name
            ))),
            Err(e) => Err(etcd_error("cannot record the splices", e)),
        }
    }
}
