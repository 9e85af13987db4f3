//! The config of an instance, changed as a transaction and kept with its
//! history.
//!
//! One source of truth: the instance record holds the config in force, and
//! it is committed together with the history ([`ConfigLog`]) in one store
//! transaction; `inspect` and `config get` both read it.
//!
//! A change is checked on the host first (keys, the schema, whole-config
//! completeness, the schema's cross-field rules, and every template rendered
//! with the instance's NICs). On a running instance the guest then renders
//! into a staging area and runs each service's check before it saves
//! anything; a refusal leaves the guest as it was. While the instance is
//! stopped the host writes the volume; the checks then run at the next boot,
//! which fails at once with their error.
//!
//! Crash safety: before the guest is asked, the change is saved as the
//! history's `pending` version. A daemon that dies between the guest's
//! acknowledgement and the commit finds it at the next start (or the next
//! config access) and settles it by comparing it with the config the guest,
//! or the volume, really has.

use std::collections::BTreeMap;

use vroom_types::template::{TemplateContext, TemplateNic};
use vroom_types::{
    check_complete, check_rules, config_diff, ConfigDiff, ConfigHistory, ConfigLog, ConfigOrigin,
    ConfigVersion,
};

use super::*;

/// The most check output an error message carries.
const MAX_DETAIL: usize = 4096;

/// Set in the daemon's environment to `config-applied`, the daemon exits
/// right after a guest acknowledged a change and before it is recorded: the
/// crash window the pending version exists for (used by the e2e tests).
const FAILPOINT_ENV: &str = "VROOM_TEST_FAILPOINT";

impl Engine {
    /// The config in force: the same values `inspect` shows.
    pub async fn config_get(&self, name: &str) -> Result<ConfigValues, OpError> {
        let cell = self.cell(name)?;
        let _op = cell.op.lock().await;
        self.settle_config(&cell).await?;
        Ok(cell.snapshot().config)
    }

    /// Every version kept, oldest first.
    pub async fn config_history(&self, name: &str) -> Result<ConfigHistory, OpError> {
        let cell = self.cell(name)?;
        let _op = cell.op.lock().await;
        Ok(self.settle_config(&cell).await?.history())
    }

    /// One version with its values.
    pub async fn config_version(&self, name: &str, version: u64) -> Result<ConfigVersion, OpError> {
        let cell = self.cell(name)?;
        let _op = cell.op.lock().await;
        let log = self.settle_config(&cell).await?;
        find_version(&log, name, version).cloned()
    }

    /// What changed from `from` to `to`; by default from the version before
    /// the current one to the current one.
    pub async fn config_diff(
        &self,
        name: &str,
        from: Option<u64>,
        to: Option<u64>,
    ) -> Result<ConfigDiff, OpError> {
        let cell = self.cell(name)?;
        let _op = cell.op.lock().await;
        let log = self.settle_config(&cell).await?;
        let current = log
            .current()
            .expect("invariant: a settled log has a version");
        let to = match to {
            Some(v) => find_version(&log, name, v)?,
            None => current,
        };
        let from = match from {
            Some(v) => find_version(&log, name, v)?,
            None => log
                .versions
                .iter()
                .rev()
                .find(|v| v.version < to.version)
                .ok_or_else(|| {
                    OpError::new(
                        ErrorCode::NotFound,
                        format!(
                            "instance {name} has no config version before {}",
                            to.version
                        ),
                    )
                })?,
        };
        Ok(ConfigDiff {
            from: from.version,
            to: to.version,
            changes: config_diff(&from.values, &to.values),
        })
    }

    /// Sets some keys, keeping the others.
    pub async fn config_update(
        &self,
        name: &str,
        set: ConfigValues,
    ) -> Result<ConfigValues, OpError> {
        self.change_config(name, ConfigOrigin::Set, None, |current, _| {
            let mut values = current;
            values.extend(set);
            Ok(values)
        })
        .await
    }

    /// Replaces the whole config (import); every key must be given.
    pub async fn config_replace(
        &self,
        name: &str,
        values: ConfigValues,
    ) -> Result<ConfigValues, OpError> {
        self.change_config(name, ConfigOrigin::Import, None, |_, _| Ok(values))
            .await
    }

    /// Back to the image's seed config.
    pub async fn config_reset(&self, name: &str) -> Result<ConfigValues, OpError> {
        self.change_config(name, ConfigOrigin::Reset, None, |_, seed| Ok(seed.clone()))
            .await
    }

    /// Back to the values of an earlier version (by default the one before
    /// the current); the rollback is a new version, checked like any change.
    pub async fn config_rollback(
        &self,
        name: &str,
        version: Option<u64>,
    ) -> Result<ConfigValues, OpError> {
        let cell = self.cell(name)?;
        let target = {
            let _op = cell.op.lock().await;
            let log = self.settle_config(&cell).await?;
            match version {
                Some(v) => find_version(&log, name, v)?.clone(),
                None => log.previous().cloned().ok_or_else(|| {
                    OpError::new(
                        ErrorCode::NotFound,
                        format!("instance {name} has no earlier config version to roll back to"),
                    )
                })?,
            }
        };
        self.change_config(
            name,
            ConfigOrigin::Rollback,
            Some(target.version),
            move |_, _| Ok(target.values),
        )
        .await
    }

    /// Changes a config and says so in an event: the version applied, or
    /// why it was refused.
    pub(super) async fn change_config(
        &self,
        name: &str,
        origin: ConfigOrigin,
        rollback_to: Option<u64>,
        change: impl FnOnce(ConfigValues, &ConfigValues) -> Result<ConfigValues, OpError>,
    ) -> Result<ConfigValues, OpError> {
        let version = || {
            blocking(|| self.store.config_log(name))
                .ok()
                .flatten()
                .and_then(|log| log.current().map(|v| v.version))
        };
        let before = version();
        let result = self
            .change_config_unlogged(name, origin, rollback_to, change)
            .await;
        let Ok(cell) = self.cell(name) else {
            return result;
        };
        let instance = cell.snapshot();
        let origin = serde_json::to_value(origin)
            .ok()
            .and_then(|v| v.as_str().map(String::from))
            .unwrap_or_default();
        let event = match &result {
            Ok(_) => match version() {
                // Nothing changed (the same values again): no news.
                after if after == before && before.is_some() => return result,
                Some(v) => self
                    .instance_event(&instance, "applied")
                    .id(format!("v{v}"))
                    .detail("version", v),
                None => self.instance_event(&instance, "applied"),
            },
            // Only a change the appliance (or its schema) refused is news:
            // a busy or missing instance changed nothing.
            Err(e)
                if matches!(
                    e.code,
                    ErrorCode::InvalidConfig | ErrorCode::GuestError | ErrorCode::Timeout
                ) =>
            {
                self.instance_event(&instance, "refused")
                    .message(e.message.clone())
            }
            Err(_) => return result,
        };
        let mut event = event.detail("origin", origin);
        event.kind = EventKind::Config;
        if let Some(v) = rollback_to {
            event = event.detail("rollback_to", v);
        }
        self.emit(event);
        result
    }

    async fn change_config_unlogged(
        &self,
        name: &str,
        origin: ConfigOrigin,
        rollback_to: Option<u64>,
        change: impl FnOnce(ConfigValues, &ConfigValues) -> Result<ConfigValues, OpError>,
    ) -> Result<ConfigValues, OpError> {
        let cell = self.cell(name)?;
        self.may_change(name)?;
        let _op = cell.op.lock().await;
        let (state, instance) = {
            let r = cell.lock();
            (r.instance.status.state, r.instance.clone())
        };
        let live = match state {
            InstanceState::Running => true,
            InstanceState::Stopped | InstanceState::Failed => false,
            state => {
                return Err(OpError::conflict(format!(
                    "instance {name} is {state}; try again when it is running or stopped"
                )))
            }
        };
        let image = self
            .images
            .resolve(&instance.image_id)
            .map_err(image_error)?;
        let mut log = self.settle_config(&cell).await?;
        if let Some(pending) = &log.pending {
            return Err(OpError::conflict(format!(
                "config version {} of {name} was interrupted and cannot be settled yet; try again",
                pending.version
            )));
        }
        // After settling: an interrupted change may just have been recorded.
        let current = cell.snapshot().config;
        let values = change(current.clone(), &image.manifest.appliance.seed_config)?;
        check_on_host(&image, &instance, &values)?;
        let Some(version) = log.propose(values.clone(), origin, rollback_to, now_secs()) else {
            return Ok(current);
        };
        log.pending = Some(version.clone());
        blocking(|| self.store.put_config_log(name, &log))
            .map_err(|e| OpError::internal("failed to save the config change", e))?;

        if !live {
            if let Err(e) = vroom_volume::write_config(&cell.volume(), &values) {
                self.drop_pending(name, &mut log);
                return Err(OpError::internal("failed to write the config volume", e));
            }
            self.commit_config(&cell, &mut log, version)?;
            return Ok(values);
        }

        let _changing = cell.changing_config();
        // Only a guest that passed its health check is waited for again.
        let was_healthy = cell
            .agent
            .health(Duration::from_secs(2))
            .await
            .is_ok_and(|r| r.ready);
        let reply = cell
            .agent
            .call(
                HostCommand::ApplyConfig {
                    values: values.clone(),
                },
                AGENT_TIMEOUT,
            )
            .await;
        if matches!(reply, Ok(GuestReply::ConfigApplied { .. }))
            && std::env::var(FAILPOINT_ENV).is_ok_and(|v| v == "config-applied")
        {
            tracing::error!("failpoint config-applied: exiting before the change is recorded");
            std::process::exit(86);
        }
        match reply {
            Ok(GuestReply::ConfigApplied { .. }) => {
                let number = version.version;
                self.commit_config(&cell, &mut log, version)?;
                if was_healthy {
                    self.wait_healthy(&cell, number).await?;
                }
                Ok(values)
            }
            Ok(GuestReply::ConfigRejected { message, output }) => {
                self.drop_pending(name, &mut log);
                Err(OpError::new(
                    ErrorCode::InvalidConfig,
                    rejection_message(&message, &output),
                ))
            }
            other => {
                // Saved or not? The guest's own config says. A guest that did
                // not answer may still be working on it: then only a config
                // that already matches settles the question now.
                let answered = other.is_ok();
                let problem = match other {
                    Ok(GuestReply::Error { message }) => truncate(&message),
                    Ok(_) => "the guest answered with the wrong reply".to_string(),
                    Err(e) => crate::error::chain(&e),
                };
                match self.guest_config(&cell).await {
                    Some(actual) if actual == values => {
                        let number = version.version;
                        self.commit_config(&cell, &mut log, version)?;
                        Err(OpError::new(
                            ErrorCode::GuestError,
                            format!("config version {number} is saved, but {problem}"),
                        ))
                    }
                    Some(_) if answered => {
                        self.drop_pending(name, &mut log);
                        Err(OpError::new(
                            ErrorCode::GuestError,
                            format!("the guest did not apply the config: {problem}"),
                        ))
                    }
                    // Unknown: the pending version is settled at the next access.
                    _ => Err(OpError::new(
                        ErrorCode::GuestError,
                        format!("cannot apply the config in the guest: {problem}"),
                    )),
                }
            }
        }
    }

    /// Waits until the guest passes its health check again after a config
    /// change (a restarted DNS server listens again): a change is done when
    /// the appliance serves with it.
    async fn wait_healthy(&self, cell: &Cell, version: u64) -> Result<(), OpError> {
        let timeout = Duration::from_secs(cell.lock().ready_timeout_secs.clamp(5, 60));
        let deadline = Instant::now() + timeout;
        loop {
            match cell.agent.health(Duration::from_secs(2)).await {
                Ok(report) if report.ready => return Ok(()),
                _ if Instant::now() >= deadline => {
                    let name = cell.snapshot().spec.name;
                    return Err(OpError::new(
                        ErrorCode::GuestError,
                        format!(
                            "config version {version} is in force, but {name} did not pass its health check within {}s; see vroom logs {name}",
                            timeout.as_secs()
                        ),
                    ));
                }
                _ => tokio::time::sleep(HEALTH_POLL).await,
            }
        }
    }

    /// Settles every instance's interrupted config change, after a restart
    /// of the daemon; instances whose guest cannot answer yet are settled at
    /// their next config access.
    pub(super) fn spawn_config_settle(self: &Arc<Self>) {
        for cell in self.cells() {
            let engine = self.clone();
            tokio::spawn(async move {
                let _op = cell.op.lock().await;
                if let Err(e) = engine.settle_config(&cell).await {
                    tracing::warn!(error = %e, "cannot settle an interrupted config change");
                }
            });
        }
    }

    /// The history of a cell (caller holds its op lock), with an interrupted
    /// change settled when the config in force can be read: committed when
    /// the guest (or the volume) has it, dropped otherwise. A history that
    /// was never saved starts with the record's config as version 1.
    pub(super) async fn settle_config(&self, cell: &Cell) -> Result<ConfigLog, OpError> {
        let (name, instance) = {
            let r = cell.lock();
            (r.instance.spec.name.to_string(), r.instance.clone())
        };
        let mut log = self
            .store
            .config_log(&name)
            .map_err(|e| OpError::internal("failed to read the config history", e))?
            .filter(|log| log.current().is_some())
            .unwrap_or_else(|| ConfigLog::start(instance.config.clone(), instance.created_at));
        let Some(pending) = log.pending.clone() else {
            return Ok(log);
        };
        let actual = match instance.status.state {
            InstanceState::Running => self.guest_config(cell).await,
            InstanceState::Stopped | InstanceState::Failed => {
                vroom_volume::read_config(&cell.volume()).ok()
            }
            _ => None,
        };
        match actual {
            Some(actual) if actual == pending.values => {
                tracing::info!(instance = %name, version = pending.version, "recorded an interrupted config change the guest had applied");
                self.commit_config(cell, &mut log, pending)?;
            }
            Some(_) => {
                tracing::info!(instance = %name, version = pending.version, "dropped an interrupted config change the guest never applied");
                self.drop_pending(&name, &mut log);
            }
            None => {}
        }
        Ok(log)
    }

    /// The config the guest has in force, if it answers.
    async fn guest_config(&self, cell: &Cell) -> Option<ConfigValues> {
        match cell.agent.call(HostCommand::Health, AGENT_TIMEOUT).await {
            Ok(GuestReply::Health(report)) => Some(sanitize_config(report.config)),
            _ => None,
        }
    }

    /// The config in force went back to `values` without a change through
    /// the guest (a restore brought back a snapshot's, an ephemeral start
    /// its seed): the history's current version follows. It is the newest
    /// kept version with those values, or else a new version of `origin`.
    /// The caller holds the op lock, and the VM is not running.
    pub(super) async fn config_went_back(
        &self,
        cell: &Cell,
        values: &ConfigValues,
        origin: ConfigOrigin,
    ) -> Result<(), OpError> {
        let mut log = self.settle_config(cell).await?;
        log.pending = None;
        if !log.back_to_values(values) {
            if let Some(version) = log.propose(values.clone(), origin, None, now_secs()) {
                return self.commit_config(cell, &mut log, version);
            }
        }
        let mut record = cell.lock();
        let mut updated = record.clone();
        updated.instance.config = values.clone();
        blocking(|| self.store.commit_config(&updated, &log))
            .map_err(|e| OpError::internal("failed to record the config in force", e))?;
        *record = updated;
        Ok(())
    }

    /// Records an accepted version: the record and the history in one transaction.
    fn commit_config(
        &self,
        cell: &Cell,
        log: &mut ConfigLog,
        version: ConfigVersion,
    ) -> Result<(), OpError> {
        let values = version.values.clone();
        let name = cell.lock().instance.spec.name.to_string();
        self.replicate_config(&name, &values)?;
        log.commit(version);
        let mut record = cell.lock();
        let mut updated = record.clone();
        updated.instance.config = values;
        blocking(|| self.store.commit_config(&updated, log))
            .map_err(|e| OpError::internal("failed to record the config change", e))?;
        *record = updated;
        Ok(())
    }

    fn drop_pending(&self, name: &str, log: &mut ConfigLog) {
        log.pending = None;
        if let Err(e) = blocking(|| self.store.put_config_log(name, log)) {
            tracing::warn!(instance = %name, error = %e, "failed to drop a refused config change; it is settled at the next access");
        }
    }
}

fn find_version<'a>(
    log: &'a ConfigLog,
    name: &str,
    version: u64,
) -> Result<&'a ConfigVersion, OpError> {
    log.get(version).ok_or_else(|| {
        let kept = match (log.versions.first(), log.versions.last()) {
            (Some(a), Some(b)) => format!("kept: {} to {}", a.version, b.version),
            _ => "none kept".into(),
        };
        OpError::new(
            ErrorCode::NotFound,
            format!("instance {name} has no config version {version} ({kept})"),
        )
    })
}

/// One line saying what failed, then the check's output (bounded).
fn rejection_message(message: &str, output: &str) -> String {
    let mut text = format!("the guest refused the config: {}", truncate(message));
    let output = output.trim_end();
    if !output.is_empty() {
        let mut cut = output.len().min(MAX_DETAIL);
        while !output.is_char_boundary(cut) {
            cut -= 1;
        }
        text.push('\n');
        text.push_str(&output[..cut]);
    }
    text
}

/// Everything the host can check before the guest is asked: keys and
/// values, the schema, that a whole config names every key, the schema's
/// cross-field rules with the instance's NICs, and every template rendered
/// as the guest would.
pub(super) fn check_on_host(
    image: &BootImage,
    instance: &Instance,
    values: &ConfigValues,
) -> Result<(), OpError> {
    check_before_instance(image, values)?;
    fits_the_instance(image, instance, values).map_err(appliance_refusal)
}

/// What the host can check of a config for an instance not made yet (a
/// room file's): keys and values, and the image's schema; the rules and
/// templates that need its NICs' addresses wait for [`check_on_host`].
pub(super) fn check_before_instance(
    image: &BootImage,
    values: &ConfigValues,
) -> Result<(), OpError> {
    // The format of keys and values is the API's own rule (400); what the
    // appliance makes of well-formed values is its own (422).
    for (key, value) in values {
        validate_config_key(key)?;
        validate_config_value(key, value)?;
    }
    fits_the_schema(image, values).map_err(appliance_refusal)
}

/// The config a new instance of an imported image starts with: the image's
/// defaults with `vroom run --env` over them (each key a config key or the
/// environment variable it feeds). `None` without `--env`.
pub(super) fn run_env_config(
    image: &BootImage,
    env: &ConfigValues,
) -> Result<Option<ConfigValues>, OpError> {
    if env.is_empty() {
        return Ok(None);
    }
    let manifest = &image.manifest;
    if manifest.oci.is_none() {
        return Err(OpError::new(
            ErrorCode::InvalidConfig,
            format!(
                "--env is for imported images and {} was built from a recipe; set its config with `vroom config NAME set KEY=VALUE`",
                manifest.name
            ),
        ));
    }
    let appliance = &manifest.appliance;
    let mut values = appliance.seed_config.clone();
    for (given, value) in env {
        let key = appliance.env_config_key(given).ok_or_else(|| {
            let known: Vec<&str> = appliance.seed_config.keys().map(String::as_str).collect();
            OpError::new(
                ErrorCode::InvalidConfig,
                format!(
                    "image {} takes no env {given:?} (its keys: {})",
                    manifest.name,
                    if known.is_empty() {
                        "none".to_string()
                    } else {
                        known.join(", ")
                    }
                ),
            )
        })?;
        values.insert(key.to_string(), value.clone());
    }
    check_before_instance(image, &values)?;
    Ok(Some(values))
}

fn appliance_refusal(mut e: OpError) -> OpError {
    if e.code == ErrorCode::InvalidArgument {
        e.code = ErrorCode::InvalidConfig;
    }
    e
}

/// The schema's cross-field rules with the instance's NICs, and every
/// template rendered as the guest would.
fn fits_the_instance(
    image: &BootImage,
    instance: &Instance,
    values: &ConfigValues,
) -> Result<(), OpError> {
    let appliance = &image.manifest.appliance;
    let nics = template_nics(instance, &appliance.nic_roles);
    let nets: BTreeMap<String, Ipv4Net> = instance
        .nics
        .iter()
        .zip(&appliance.nic_roles)
        .filter_map(|(nic, role)| Some((role.clone(), Ipv4Net::new(nic.ip?, nic.prefix_len).ok()?)))
        .collect();
    let schema = &appliance.config_schema;
    check_rules(&appliance.config_rules, schema, values, &nets)?;
    let ctx = TemplateContext::new(schema, values, &nics, instance.spec.name.as_str());
    for template in &appliance.templates {
        template.render(&ctx).map_err(|e| {
            OpError::new(
                ErrorCode::InvalidArgument,
                format!("the config does not render: template {e}"),
            )
        })?;
    }
    Ok(())
}

/// Keys the image knows, values its schema allows, and every key given.
fn fits_the_schema(image: &BootImage, values: &ConfigValues) -> Result<(), OpError> {
    let appliance = &image.manifest.appliance;
    let seed = &appliance.seed_config;
    let schema = &appliance.config_schema;
    for key in values.keys() {
        if schema.is_empty() && !seed.contains_key(key) {
            let known: Vec<&str> = seed.keys().map(String::as_str).collect();
            return Err(OpError::new(
                ErrorCode::InvalidArgument,
                format!(
                    "unknown config key {key:?} for image {} (known: {})",
                    image.manifest.name,
                    known.join(", ")
                ),
            ));
        }
    }
    if schema.is_empty() {
        let missing: Vec<&str> = seed
            .keys()
            .filter(|k| !values.contains_key(*k))
            .map(String::as_str)
            .collect();
        if !missing.is_empty() {
            return Err(InvalidInputError::MissingConfigKeys {
                missing: missing.join(", "),
            }
            .into());
        }
    } else {
        check_config(schema, values)?;
        check_complete(schema, values)?;
    }
    Ok(())
}

/// The instance's NICs as its templates see them in the guest.
fn template_nics(instance: &Instance, roles: &[String]) -> BTreeMap<String, TemplateNic> {
    instance
        .nics
        .iter()
        .zip(roles)
        .map(|(nic, role)| {
            let template = match nic.ip {
                Some(ip) => {
                    let gateway = Some(nic.gateway).filter(|g| *g != ip);
                    TemplateNic::new(role, ip, nic.prefix_len, gateway, &nic.mac)
                }
                None => TemplateNic::l2(role, &nic.mac),
            };
            (role.clone(), template)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// A firewall-like image: a DHCP pool with rules, and a template that
    /// uses it; its instance has a lan NIC on 10.0.1.0/24.
    fn image_and_instance() -> (BootImage, Instance) {
        let int = json!({ "type": "int", "min": 2, "max": 65534 });
        let manifest = serde_json::from_value(json!({
            "manifest_version": 1, "name": "fw", "version": "1.0",
            "kernel": { "package": "k", "version": "1", "release": "r", "sha256": "0" },
            "initramfs": { "file": "i", "sha256": "0", "size": 0 },
            "rootfs": { "file": "r", "sha256": "0", "size": 0 },
            "cmdline": "", "default_mem_mib": 128, "min_mem_mib": 128,
            "appliance": {
                "seed_config": { "dhcp": "true", "first": "100", "last": "199", "lease": "12h" },
                "nic_roles": ["lan"],
                "writable": ["/run"],
                "templates": [{
                    "path": "/run/d.conf",
                    "template": "{% if dhcp %}{{ nics.lan.cidr | host(first) }} {{ nics.lan.cidr | host(last) }}{% endif %}\n"
                }],
                "services": [],
                "health_tcp_port": null,
                "config_schema": {
                    "dhcp": { "type": "bool" }, "first": int, "last": int,
                    "lease": { "type": "string", "max_len": 16 }
                },
                "config_rules": [
                    { "rule": "first in nics.lan", "when": "dhcp" },
                    { "rule": "first <= last", "when": "dhcp" }
                ]
            }
        }))
        .unwrap();
        let image = BootImage {
            id: "img".into(),
            manifest,
            kernel: "/k".into(),
            initramfs: "/i".into(),
            rootfs: "/r".into(),
        };
        let instance = serde_json::from_value(json!({
            "id": "0123456789abcdef",
            "spec": {
                "name": "fw", "image": "fw", "mem_mib": null, "cpus": 1,
                "nics": [], "accel": "auto", "config_volume_kib": null
            },
            "image_id": "img", "image_name": "fw", "mem_mib": 128, "created_at": 1,
            "desired": "running",
            "nics": [{
                "network": "lan", "ip": "10.0.1.1", "prefix_len": 24,
                "gateway": "10.0.1.1", "mac": "52:54:00:00:00:01", "tap": "t0"
            }],
            "status": {
                "state": "running", "pid": null, "accel": null, "started_at": null,
                "boot_ms": null, "restarts": 0, "last_error": null
            },
            "config": {}
        }))
        .unwrap();
        (image, instance)
    }

    #[test]
    fn the_host_refuses_what_would_break_the_guest() {
        let (image, instance) = image_and_instance();
        let seed = image.manifest.appliance.seed_config.clone();
        let with = |changes: &[(&str, &str)]| {
            let mut values = seed.clone();
            for (k, v) in changes {
                values.insert(k.to_string(), v.to_string());
            }
            values
        };
        let mut missing = seed.clone();
        missing.remove("lease");
        let cases: Vec<(ConfigValues, Option<&str>)> = vec![
            (seed.clone(), None),
            (with(&[("first", "254"), ("last", "254")]), None),
            (
                with(&[("first", "300")]),
                Some("must be a host number of lan's subnet 10.0.1.0/24"),
            ),
            (
                with(&[("first", "150"), ("last", "120")]),
                Some("must be at most last (120)"),
            ),
            (with(&[("dhcp", "false"), ("first", "300")]), None),
            // No rule on `last`: the template's render catches it.
            (
                with(&[("last", "255")]),
                Some("the config does not render: template /run/d.conf line 1"),
            ),
            (with(&[("first", "x")]), Some("must be an integer")),
            (with(&[("nope", "1")]), Some("unknown config key \"nope\"")),
            (
                ConfigValues::new(),
                Some("lacks keys dhcp, first, last, lease"),
            ),
            (missing, Some("lacks keys lease")),
        ];
        for (values, want) in cases {
            let got = check_on_host(&image, &instance, &values);
            match want {
                None => assert!(got.is_ok(), "{values:?}: {got:?}"),
                Some(want) => {
                    let err = got.expect_err(want);
                    assert_eq!(err.code, ErrorCode::InvalidConfig, "{values:?}");
                    assert!(err.message.contains(want), "{values:?}: {}", err.message);
                }
            }
        }
    }

    #[test]
    fn a_rejection_is_one_line_then_bounded_output() {
        let text = rejection_message(
            "the check of service dnsmasq failed (exit code 1): bad option\nmore",
            &format!("line one\n{}", "x".repeat(10_000)),
        );
        let mut lines = text.lines();
        assert_eq!(
            lines.next(),
            Some("the guest refused the config: the check of service dnsmasq failed (exit code 1): bad option")
        );
        assert_eq!(lines.next(), Some("line one"));
        assert!(text.len() < 4096 + 200, "{}", text.len());
        assert_eq!(
            rejection_message("template x line 2: bad", ""),
            "the guest refused the config: template x line 2: bad"
        );
    }
}
