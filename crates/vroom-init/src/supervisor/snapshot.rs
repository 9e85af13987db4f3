//! The guest's side of snapshots and clones. `Freeze` stops every service
//! (SIGSTOP to its process group) and flushes the config volume, so that
//! the host saves memory and volume in agreement and a copy restored from
//! them runs nothing of the appliance's until it is resumed. `Resume`
//! reseeds the kernel RNG, sets the clock and, for a clone, takes on the
//! identity and config of the volume the host swapped in, before the
//! services continue.

use std::time::{Duration, Instant};

use vroom_agent_proto::volume::InstanceFile;
use vroom_base::LockExt;

use super::{ApplyConfigError, Identity, Supervisor};
use crate::boot::{self, CONFIG_DIR};
use crate::{log, netconf, reseed};

/// How long a recipe's `on_clone` hook may run; the whole resume must fit
/// in the host's agent timeout (10 s).
const ON_CLONE_TIMEOUT: Duration = Duration::from_secs(5);

impl Supervisor {
    /// Stops the services and flushes the config volume. Idempotent.
    pub fn freeze(&self) -> Result<(), String> {
        let _applying = self.applying.lock_unpoisoned();
        self.stop_services();
        boot::sync_config().map_err(|e| format!("sync {CONFIG_DIR}: {e}"))
    }

    /// Reseeds the RNG, sets the clock, takes on a reloaded volume's identity
    /// and config, and continues the services. Returns whether the identity
    /// changed. Every step is tried, and the services continue, even after
    /// one failed; the first failure is returned.
    pub fn resume(
        &self,
        entropy: &[u8],
        unix_ms: u64,
        reload_volume: bool,
    ) -> Result<bool, String> {
        let _applying = self.applying.lock_unpoisoned();
        let started = Instant::now();
        let mut failures = vec![];
        // First, so that nothing below (the on_clone hook) reads the RNG
        // state every copy of the snapshot shares.
        if let Err(err) = reseed::add_entropy(entropy) {
            failures.push(err);
        }
        if let Err(err) = reseed::set_clock(unix_ms) {
            failures.push(err);
        }
        let mut identity_changed = false;
        let mut steps = Steps::new(started);
        steps.done("reseed and clock");
        if reload_volume {
            // A guest resumed without a freeze still changes identity with
            // its services stopped.
            self.stop_services();
            match self.reload_volume(&mut steps) {
                Ok(changed) => identity_changed = changed,
                Err(err) => failures.push(err),
            }
        }
        self.continue_services();
        steps.done("continue");
        for failure in &failures {
            log(&format!("resume: {failure}"));
        }
        match failures.into_iter().next() {
            Some(first) => Err(first),
            None => {
                log(&format!(
                    "resumed (identity changed: {identity_changed}) in {}",
                    steps.summary()
                ));
                Ok(identity_changed)
            }
        }
    }

    /// SIGSTOP to every service's process group; the reaper starts nothing
    /// until [`Self::continue_services`].
    fn stop_services(&self) {
        let mut inner = self.lock();
        if inner.frozen {
            return;
        }
        inner.frozen = true;
        for pid in inner.services.iter().filter_map(|s| s.pid) {
            // SAFETY: signalling the service's own process group.
            unsafe { libc::kill(-pid, libc::SIGSTOP) };
        }
        log("services frozen");
    }

    fn continue_services(&self) {
        let mut inner = self.lock();
        if !inner.frozen {
            return;
        }
        inner.frozen = false;
        for pid in inner.services.iter().filter_map(|s| s.pid) {
            // SAFETY: signalling the service's own process group.
            unsafe { libc::kill(-pid, libc::SIGCONT) };
        }
        // Restarts that fell due while frozen.
        super::wake_reaper();
        log("services continue");
    }

    /// Mounts the volume the host swapped in and puts what it says in force:
    /// hostname, machine id, NICs, then the templates and services, then the
    /// `on_clone` hook. Returns whether the identity changed.
    fn reload_volume(&self, steps: &mut Steps) -> Result<bool, String> {
        boot::remount_config(&self.config_dev)?;
        steps.done("remount");
        let volume = boot::read_volume()?;
        steps.done("read");
        let before = self.identity();
        let instance = volume.instance;
        let changed = identity_changed(&before, &instance);
        let plan = netconf::plan(&before.nics, &instance.nics)?;
        if instance.hostname != before.hostname {
            boot::set_hostname(&instance.hostname)?;
        }
        if instance.machine_id != before.machine_id {
            match &instance.machine_id {
                Some(id) => boot::set_machine_id(id)?,
                None => log("the reloaded volume has no machine id; the old one stays"),
            }
        }
        steps.done("names");
        netconf::reconfigure(&plan)?;
        steps.done("NICs");
        let after = Identity {
            hostname: instance.hostname,
            machine_id: instance.machine_id.or(before.machine_id.clone()),
            nics: plan.nics,
        };
        *self.identity.lock_unpoisoned() = after.clone();

        let current = self.lock().config.clone();
        let config = volume.config.unwrap_or_else(|| {
            log("keeping the config in force");
            current.clone()
        });
        let config_changed = config != current;
        if after != before || config_changed {
            let staged = self.stage(&config, &after).map_err(|e| match e {
                ApplyConfigError::Rejected { message, .. } | ApplyConfigError::Failed(message) => {
                    format!("the reloaded config cannot be put in force: {message}")
                }
            })?;
            let rendered_changed = staged.changed;
            let moved = staged.commit();
            let mut inner = self.lock();
            inner.config = config;
            let was_broken = inner.config_error.take().is_some();
            inner.restart_services(|s| {
                restarts_on_reload(
                    s.restart_on_config,
                    changed,
                    config_changed,
                    rendered_changed,
                ) || was_broken
            });
            drop(inner);
            moved.map_err(|e| format!("a rendered file could not be put in place: {e}"))?;
            steps.done("render");
        }
        if changed && !self.spec.on_clone.is_empty() {
            self.run_on_clone()?;
            steps.done("on_clone");
        }
        Ok(changed)
    }

    fn run_on_clone(&self) -> Result<(), String> {
        let (code, stdout, stderr) = self.run_reaped(&self.spec.on_clone, ON_CLONE_TIMEOUT);
        for line in stdout.lines().chain(stderr.lines()) {
            log(&format!("on_clone: {line}"));
        }
        if code != 0 {
            return Err(format!(
                "the on_clone hook failed with exit code {code}: {}",
                vroom_base::first_line(&format!("{stderr}{stdout}")).unwrap_or("")
            ));
        }
        log("on_clone hook done");
        Ok(())
    }
}

/// Whether a reloaded volume restarts a service. One that takes its config
/// from templates (`restart_on_config`) restarts when its config changed or
/// a template renders otherwise with the new identity (an address, a
/// hostname in a file): a clone of a web server whose files name neither
/// keeps serving without a restart. Any other service restarts on a new
/// identity, as if the clone had booted with it, since nothing tells what
/// it read at its start.
fn restarts_on_reload(
    restart_on_config: bool,
    identity_changed: bool,
    config_changed: bool,
    rendered_changed: bool,
) -> bool {
    if restart_on_config {
        config_changed || rendered_changed
    } else {
        identity_changed
    }
}

/// How long each step of a resume took, for its log line.
struct Steps {
    started: Instant,
    last: Instant,
    took: Vec<(&'static str, Duration)>,
}

impl Steps {
    fn new(started: Instant) -> Steps {
        Steps {
            started,
            last: started,
            took: Vec::new(),
        }
    }

    fn done(&mut self, step: &'static str) {
        let now = Instant::now();
        self.took.push((step, now - self.last));
        self.last = now;
    }

    /// `12 ms (reseed and clock 1, volume 4, ...)`.
    fn summary(&self) -> String {
        let parts: Vec<String> = self
            .took
            .iter()
            .map(|(step, took)| format!("{step} {}", took.as_millis()))
            .collect();
        format!(
            "{} ms ({})",
            (self.last - self.started).as_millis(),
            parts.join(", ")
        )
    }
}

/// Whether a volume gives the guest another identity: hostname, machine id,
/// or any NIC's MAC or address. A renamed role or a new gateway alone is
/// not one (they re-render templates all the same).
fn identity_changed(before: &Identity, after: &InstanceFile) -> bool {
    let nic_changed = |(old, new): (&netconf::Nic, &vroom_agent_proto::volume::NicConfig)| {
        !old.config.mac.eq_ignore_ascii_case(&new.mac)
            || old.config.address != new.address
            || old.config.prefix_len != new.prefix_len
    };
    before.hostname != after.hostname
        || (after.machine_id.is_some() && before.machine_id != after.machine_id)
        || before.nics.len() != after.nics.len()
        || before.nics.iter().zip(&after.nics).any(nic_changed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use vroom_agent_proto::volume::NicConfig;

    fn nic(mac: &str, role: &str, address: Option<&str>) -> NicConfig {
        NicConfig {
            mac: mac.into(),
            role: Some(role.into()),
            address: address.map(Into::into),
            prefix_len: 24,
            gateway: Some("10.0.0.1".into()),
        }
    }

    #[test]
    fn which_services_a_reload_restarts() {
        // (restart_on_config, identity, config, rendered) -> restarts
        let cases = [
            ((true, true, false, false), false),
            ((true, true, false, true), true),
            ((true, false, true, false), true),
            ((true, false, false, true), true),
            ((false, true, false, false), true),
            ((false, false, true, true), false),
            ((false, false, false, false), false),
        ];
        for ((on_config, identity, config, rendered), want) in cases {
            assert_eq!(
                restarts_on_reload(on_config, identity, config, rendered),
                want,
                "restart_on_config {on_config}, identity {identity}, config {config}, rendered {rendered}"
            );
        }
    }

    #[test]
    fn identity_changed_table() {
        let before = Identity {
            hostname: "web".into(),
            machine_id: Some("0".repeat(32)),
            nics: vec![netconf::Nic {
                dev: "lan".into(),
                config: nic("52:54:00:00:00:01", "lan", Some("10.0.0.5")),
            }],
        };
        let same = InstanceFile {
            version: 1,
            hostname: "web".into(),
            nics: vec![nic("52:54:00:00:00:01", "lan", Some("10.0.0.5"))],
            machine_id: Some("0".repeat(32)),
            volumes: Vec::new(),
        };
        let with = |f: &dyn Fn(&mut InstanceFile)| {
            let mut file = same.clone();
            f(&mut file);
            file
        };
        let cases: Vec<(&str, InstanceFile, bool)> = vec![
            ("same", same.clone(), false),
            (
                "MAC case only",
                with(&|f| f.nics[0].mac = "52:54:00:00:00:01".to_uppercase()),
                false,
            ),
            ("no machine id given", with(&|f| f.machine_id = None), false),
            (
                "new gateway",
                with(&|f| f.nics[0].gateway = Some("10.0.0.2".into())),
                false,
            ),
            ("hostname", with(&|f| f.hostname = "web2".into()), true),
            (
                "machine id",
                with(&|f| f.machine_id = Some("1".repeat(32))),
                true,
            ),
            (
                "MAC",
                with(&|f| f.nics[0].mac = "52:54:00:00:00:02".into()),
                true,
            ),
            (
                "address",
                with(&|f| f.nics[0].address = Some("10.0.0.6".into())),
                true,
            ),
            ("prefix", with(&|f| f.nics[0].prefix_len = 16), true),
            ("L2 now", with(&|f| f.nics[0].address = None), true),
            ("NIC count", with(&|f| f.nics.clear()), true),
        ];
        for (what, after, want) in cases {
            assert_eq!(identity_changed(&before, &after), want, "{what}");
        }
    }
}
