//! Service supervision and child reaping. As PID 1 we reap every process in
//! the guest, so exec'd commands get their exit status from here too.

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::net::{SocketAddr, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{self, Receiver, SyncSender};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use vroom_agent_proto::{BootTimes, HealthReport, ServiceHealth};
use vroom_base::LockExt;
use vroom_types::template::{TemplateContext, TemplateNic};
use vroom_types::{
    check_complete, check_config, check_rules, validate_config_key, validate_config_value,
    ApplianceSpec, ConfigValues, Ipv4Net, ServiceSpec,
};

use crate::boot::{self, Booted};
use crate::command::{read_capped, run_unreaped, PATH};
use crate::datavol::DataVolumes;
use crate::{conntrack, log, netconf};

mod snapshot;

const SERVICE_RESTART_DELAY: Duration = Duration::from_secs(1);
const REAP_INTERVAL: Duration = Duration::from_millis(20);
/// The longest the reaper sleeps without a child exiting: an idle guest
/// wakes vroom-init at most once a second.
const IDLE_WAKE: Duration = Duration::from_secs(1);

/// Blocks SIGCHLD in the calling thread and so in every thread it starts
/// afterwards (call it first thing in PID 1): the reaper then takes SIGCHLD
/// with `sigtimedwait` instead of polling. The programs vroom-init starts
/// get an empty mask (std's `Command` resets it).
pub fn block_sigchld() {
    // SAFETY: a sigset on the stack, initialised by sigemptyset.
    unsafe {
        let mut set = std::mem::MaybeUninit::<libc::sigset_t>::zeroed();
        libc::sigemptyset(set.as_mut_ptr());
        libc::sigaddset(set.as_mut_ptr(), libc::SIGCHLD);
        libc::pthread_sigmask(libc::SIG_BLOCK, set.as_ptr(), std::ptr::null_mut());
    }
}

/// Wakes the reaper now (a SIGCHLD of our own): a service that is not
/// running is due.
pub fn wake_reaper() {
    // SAFETY: plain syscall; SIGCHLD is blocked everywhere and taken only
    // by the reaper's sigtimedwait.
    unsafe { libc::kill(libc::getpid(), libc::SIGCHLD) };
}

/// Sleeps until a child changes state (SIGCHLD, blocked by
/// [`block_sigchld`]) or `timeout` passes.
fn wait_for_child(timeout: Duration) {
    let spec = libc::timespec {
        tv_sec: timeout.as_secs() as libc::time_t,
        tv_nsec: timeout.subsec_nanos() as libc::c_long,
    };
    // SAFETY: a sigset on the stack, initialised by sigemptyset; a valid
    // timespec; no siginfo wanted.
    unsafe {
        let mut set = std::mem::MaybeUninit::<libc::sigset_t>::zeroed();
        libc::sigemptyset(set.as_mut_ptr());
        libc::sigaddset(set.as_mut_ptr(), libc::SIGCHLD);
        libc::sigtimedwait(set.as_ptr(), std::ptr::null_mut(), &spec);
    }
}

pub struct Supervisor {
    spec: ApplianceSpec,
    /// Changes only when a restored guest takes on a reloaded volume's identity.
    identity: Mutex<Identity>,
    /// The config volume's block device, remounted when a restore reloads it.
    config_dev: String,
    /// Data volumes: grown, frozen and reported on the agent's requests.
    pub volumes: Arc<DataVolumes>,
    booted_at: Instant,
    /// This boot's milestones on the monotonic clock: init's start, and
    /// the first ready report (set once).
    init_ms: u64,
    ready_ms: std::sync::OnceLock<u64>,
    inner: Mutex<Inner>,
    /// Serialises config changes, freezes and resumes: one staging area per
    /// template directory, one set of NICs.
    applying: Mutex<()>,
}

/// Who the guest is: what the config volume's instance file said, as put in force.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Identity {
    hostname: String,
    machine_id: Option<String>,
    nics: Vec<netconf::Nic>,
}

impl Identity {
    fn template_nics(&self) -> BTreeMap<String, TemplateNic> {
        netconf::by_role(&self.nics)
    }
}

struct Inner {
    config: ConfigValues,
    services: Vec<Service>,
    exec_waiters: HashMap<i32, SyncSender<i32>>,
    started: bool,
    shutting_down: bool,
    /// Set when the stored config could not be put in force at boot.
    config_error: Option<String>,
    /// The reaper runs: children's exit codes arrive through `exec_waiters`.
    reaping: bool,
    /// Services are stopped (SIGSTOP) for a snapshot; nothing is started.
    frozen: bool,
}

/// Why a config change did not take effect.
#[derive(Debug)]
pub enum ApplyConfigError {
    /// Refused before anything changed: nothing saved, services untouched.
    Rejected { message: String, output: String },
    /// Saved, but putting it in force failed afterwards.
    Failed(String),
}

impl ApplyConfigError {
    fn rejected(message: impl Into<String>) -> Self {
        ApplyConfigError::Rejected {
            message: message.into(),
            output: String::new(),
        }
    }
}

/// How long one service's config check may take.
const CHECK_TIMEOUT: Duration = Duration::from_secs(5);
/// The most check output handed back to the host.
const MAX_CHECK_OUTPUT: usize = 4096;
/// Where rendered files wait for their checks: beside their final place, so
/// that putting them in force is a rename within one filesystem.
const STAGING_DIR: &str = ".vroom-staged";

/// Rendered templates waiting in their staging directories.
struct Staged {
    /// (staged copy, final path)
    files: Vec<(PathBuf, PathBuf)>,
    /// Whether any file renders otherwise than the one in place.
    changed: bool,
}

impl Staged {
    /// Moves every staged file into place.
    fn commit(self) -> Result<(), String> {
        for (staged, path) in &self.files {
            fs::rename(staged, path).map_err(|e| format!("{}: {e}", path.display()))?;
        }
        Ok(())
    }

    fn discard(self) {
        for (staged, _) in &self.files {
            let _ = fs::remove_file(staged);
        }
    }
}

fn staged_path(path: &Path) -> PathBuf {
    let name = path.file_name().unwrap_or_default();
    path.parent()
        .unwrap_or(Path::new("/"))
        .join(STAGING_DIR)
        .join(name)
}

/// A service's check command with every template path it names replaced by
/// the path of the template's staged copy.
fn check_argv(check: &[String], template_paths: &[&str]) -> Vec<String> {
    check
        .iter()
        .map(|arg| {
            template_paths.iter().fold(arg.clone(), |arg, path| {
                arg.replace(path, &staged_path(Path::new(path)).display().to_string())
            })
        })
        .collect()
}

struct Service {
    spec: ServiceSpec,
    pid: Option<i32>,
    restarts: u32,
    start_at: Option<Instant>,
    last_exit: Option<i32>,
    /// Re-run for a config change after a run that succeeded: what that run
    /// put in force stays until this one ends.
    reapplying: bool,
}

impl Service {
    /// What the guest's readiness counts on a oneshot: its latest run
    /// succeeded, or it is re-run for a config change after one that did.
    /// A firewall's rules reloaded in one nft transaction stay in force
    /// meanwhile, so the guest stays ready instead of tripping the watchdog
    /// of a splice it guards.
    fn in_force(&self) -> bool {
        let done = self.pid.is_none() && self.start_at.is_none();
        self.last_exit == Some(0) && (done || self.reapplying)
    }
}

/// How long a config change waits for its oneshot services; under the
/// host's 10 s agent timeout, so that the host hears the outcome.
const ONESHOT_TIMEOUT: Duration = Duration::from_secs(8);

impl Supervisor {
    /// `init_ms`: when init started, on [`monotonic_ms`]'s clock.
    pub fn new(booted: Booted, init_ms: u64) -> Self {
        let services = booted
            .spec
            .services
            .iter()
            .map(|spec| Service {
                spec: spec.clone(),
                pid: None,
                restarts: 0,
                start_at: None,
                last_exit: None,
                reapplying: false,
            })
            .collect();
        Supervisor {
            spec: booted.spec,
            identity: Mutex::new(Identity {
                hostname: booted.hostname,
                machine_id: booted.machine_id,
                nics: booted.nics,
            }),
            config_dev: booted.config_dev,
            volumes: Arc::new(booted.volumes),
            booted_at: Instant::now(),
            init_ms,
            ready_ms: std::sync::OnceLock::new(),
            inner: Mutex::new(Inner {
                config: booted.config,
                services,
                exec_waiters: HashMap::new(),
                started: false,
                shutting_down: false,
                config_error: None,
                reaping: false,
                frozen: false,
            }),
            applying: Mutex::new(()),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock_unpoisoned()
    }

    fn identity(&self) -> Identity {
        self.identity.lock_unpoisoned().clone()
    }

    /// Renders and checks the stored config, then starts the services. A
    /// config that cannot be put in force starts nothing: the health report
    /// carries the error, so the host fails the start at once instead of
    /// waiting for a readiness that cannot come.
    pub fn start_all(&self) {
        let config = self.lock().config.clone();
        let staged = self.stage(&config, &self.identity()).map_err(|e| match e {
            ApplyConfigError::Rejected { message, .. } | ApplyConfigError::Failed(message) => {
                message
            }
        });
        let result = staged.and_then(Staged::commit);
        let mut inner = self.lock();
        inner.started = true;
        if let Err(err) = result {
            log(&format!(
                "the stored config cannot be put in force: {err}; services not started"
            ));
            inner.config_error = Some(err);
            return;
        }
        let now = Instant::now();
        for service in &mut inner.services {
            service.start_at = Some(now);
        }
        inner.start_due_services();
        log("services started");
    }

    /// Reaps children forever: restarts services, hands exit codes to exec waiters.
    pub fn reap_forever(&self) -> ! {
        self.lock().reaping = true;
        let mut drops = conntrack::DropWatch::default();
        loop {
            if let Some(line) = drops.look(Instant::now()) {
                log(&line);
            }
            let due = {
                let mut inner = self.lock();
                loop {
                    let mut status = 0;
                    // SAFETY: plain syscall with a valid out-pointer.
                    let pid = unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG) };
                    if pid <= 0 {
                        break;
                    }
                    inner.child_exited(pid, status);
                }
                if !inner.shutting_down && !inner.frozen {
                    inner.start_due_services();
                }
                inner.next_due()
            };
            // Until a child exits or a restart is due, at most a second.
            let now = Instant::now();
            let timeout = due
                .map_or(IDLE_WAKE, |at| at.saturating_duration_since(now))
                .clamp(Duration::from_millis(1), IDLE_WAKE);
            wait_for_child(timeout);
        }
    }

    pub fn health(&self) -> HealthReport {
        let (config, services, started, config_error, frozen) = {
            let inner = self.lock();
            let services = inner
                .services
                .iter()
                .map(|s| ServiceHealth {
                    name: s.spec.name.clone(),
                    running: s.pid.is_some(),
                    restarts: s.restarts,
                    last_exit: s.last_exit,
                })
                .collect::<Vec<_>>();
            let oneshots_done = inner
                .services
                .iter()
                .filter(|s| s.spec.oneshot)
                .all(Service::in_force);
            (
                inner.config.clone(),
                services,
                inner.started && !inner.shutting_down && oneshots_done,
                inner.config_error.clone(),
                inner.frozen,
            )
        };
        let configured_port = self
            .spec
            .health_tcp_config
            .as_ref()
            .and_then(|key| config.get(key))
            .and_then(|port| port.parse::<u16>().ok());
        let healthy = match configured_port.or(self.spec.health_tcp_port) {
            Some(port) => {
                let addr = SocketAddr::from(([127, 0, 0, 1], port));
                TcpStream::connect_timeout(&addr, Duration::from_millis(300)).is_ok()
            }
            None => services
                .iter()
                .zip(&self.spec.services)
                .all(|(s, spec)| s.running || spec.oneshot),
        };
        let ready = started && healthy && config_error.is_none() && !frozen;
        if ready && self.ready_ms.get().is_none() {
            let ready_ms = *self.ready_ms.get_or_init(monotonic_ms);
            log(&format!(
                "ready {:.2}s after the kernel started (init started at {:.2}s)",
                ready_ms as f64 / 1000.0,
                self.init_ms as f64 / 1000.0
            ));
        }
        HealthReport {
            ready,
            uptime_ms: self.booted_at.elapsed().as_millis() as u64,
            services,
            config,
            config_error,
            frozen,
            conntrack: conntrack::usage(),
            volumes: self.volumes.usage(),
            boot: self.ready_ms.get().map(|&ready_ms| BootTimes {
                init_ms: self.init_ms,
                ready_ms,
            }),
        }
    }

    /// A config change as a transaction: validate, render every template
    /// into a staging area, run every service's check on the staged files;
    /// only when all of that passed is the config saved durably, the files
    /// moved into place and the dependent services restarted.
    pub fn apply_config(&self, values: ConfigValues) -> Result<ConfigValues, ApplyConfigError> {
        let _applying = self.applying.lock_unpoisoned();
        if self.lock().frozen {
            return Err(ApplyConfigError::rejected(
                "the appliance is frozen for a snapshot; resume it first",
            ));
        }
        self.validate(&values).map_err(ApplyConfigError::rejected)?;
        let staged = self.stage(&values, &self.identity())?;
        if let Err(err) = boot::write_config(&values) {
            staged.discard();
            return Err(ApplyConfigError::rejected(err));
        }
        let mut inner = self.lock();
        let moved = staged.commit();
        inner.config = values.clone();
        // A guest whose boot config was broken has started nothing yet.
        let was_broken = inner.config_error.take().is_some();
        inner.restart_services(|s| was_broken || s.restart_on_config);
        for service in inner.services.iter_mut().filter(|s| s.start_at.is_some()) {
            service.reapplying = service.spec.oneshot && service.last_exit == Some(0);
        }
        log(&format!("config applied ({} keys)", values.len()));
        drop(inner);
        moved.map_err(|e| {
            ApplyConfigError::Failed(format!(
                "the config is saved, but a rendered file could not be put in place: {e}"
            ))
        })?;
        self.wait_for_oneshots().map_err(ApplyConfigError::Failed)?;
        Ok(values)
    }

    /// The checks the host makes too: keys, values, the schema and its rules.
    fn validate(&self, values: &ConfigValues) -> Result<(), String> {
        for (key, value) in values {
            validate_config_key(key).map_err(|e| e.to_string())?;
            validate_config_value(key, value).map_err(|e| e.to_string())?;
        }
        let schema = &self.spec.config_schema;
        if schema.is_empty() {
            return Ok(());
        }
        check_config(schema, values).map_err(|e| e.to_string())?;
        check_complete(schema, values).map_err(|e| e.to_string())?;
        let nets: BTreeMap<String, Ipv4Net> = self
            .identity()
            .template_nics()
            .iter()
            .filter_map(|(role, nic)| Some((role.clone(), nic.cidr.parse().ok()?)))
            .collect();
        check_rules(&self.spec.config_rules, schema, values, &nets).map_err(|e| e.to_string())
    }

    /// Renders every template into its staging directory and runs every
    /// service's check on the staged files. On failure nothing is left behind.
    fn stage(
        &self,
        values: &ConfigValues,
        identity: &Identity,
    ) -> Result<Staged, ApplyConfigError> {
        let ctx = TemplateContext::new(
            &self.spec.config_schema,
            values,
            &identity.template_nics(),
            &identity.hostname,
        );
        let mut staged = Staged {
            files: vec![],
            changed: false,
        };
        for template in &self.spec.templates {
            let path = PathBuf::from(&template.path);
            let copy = staged_path(&path);
            let written = template.render(&ctx).and_then(|text| {
                if fs::read(&path).ok().as_deref() != Some(text.as_bytes()) {
                    staged.changed = true;
                }
                let dir = copy.parent().unwrap_or(Path::new("/"));
                fs::create_dir_all(dir)
                    .and_then(|()| fs::write(&copy, text))
                    .map_err(|e| format!("{}: {e}", template.path))
            });
            match written {
                Ok(()) => staged.files.push((copy, path)),
                Err(err) => {
                    staged.discard();
                    log(&format!("render {err}"));
                    return Err(ApplyConfigError::rejected(format!("template {err}")));
                }
            }
        }
        for service in self.spec.services.iter().filter(|s| !s.check.is_empty()) {
            let paths: Vec<&str> = self
                .spec
                .templates
                .iter()
                .map(|t| t.path.as_str())
                .collect();
            let (code, output) = self.run_check(&check_argv(&service.check, &paths));
            if code != 0 {
                staged.discard();
                let message = format!(
                    "the check of service {} failed (exit code {code}): {}",
                    service.name,
                    vroom_base::first_line(&output).unwrap_or("")
                );
                log(&message);
                return Err(ApplyConfigError::Rejected { message, output });
            }
        }
        Ok(staged)
    }

    /// Runs a check command: its exit code and its output (stdout then
    /// stderr, bounded). Before the reaper runs (at boot) it waits for the
    /// child itself; afterwards the reaper hands the exit code over.
    fn run_check(&self, argv: &[String]) -> (i32, String) {
        let reaping = self.lock().reaping;
        let (code, stdout, stderr) = if reaping {
            self.run_reaped(argv, CHECK_TIMEOUT)
        } else {
            run_unreaped(argv, CHECK_TIMEOUT)
        };
        let mut output = format!("{stdout}{stderr}");
        if output.len() > MAX_CHECK_OUTPUT {
            let mut cut = MAX_CHECK_OUTPUT;
            while !output.is_char_boundary(cut) {
                cut -= 1;
            }
            output.truncate(cut);
        }
        (code, output)
    }

    /// Waits until the oneshot services restarted by a config change have
    /// finished; a failure is reported, since the change is then not in effect.
    fn wait_for_oneshots(&self) -> Result<(), String> {
        let deadline = Instant::now() + ONESHOT_TIMEOUT;
        loop {
            {
                let mut inner = self.lock();
                if Instant::now() > deadline {
                    // Not in force: a run that hangs must not keep the guest
                    // ready on what the run before it put in force.
                    for service in inner.services.iter_mut().filter(|s| s.spec.oneshot) {
                        service.reapplying = false;
                        if let Some(pid) = service.pid {
                            // SAFETY: signalling the service's own process group.
                            unsafe { libc::kill(-pid, libc::SIGKILL) };
                        } else if service.start_at.is_some() {
                            service.last_exit = Some(128 + libc::SIGKILL);
                        }
                        service.start_at = None;
                    }
                    return Err(
                        "the config is saved, but its oneshot services did not finish; they were stopped".into(),
                    );
                }
                let pending: Vec<&Service> = inner
                    .services
                    .iter()
                    .filter(|s| s.spec.oneshot && s.spec.restart_on_config)
                    .collect();
                if pending
                    .iter()
                    .all(|s| s.pid.is_none() && s.start_at.is_none())
                {
                    return match pending.iter().find(|s| s.last_exit != Some(0)) {
                        Some(failed) => Err(format!(
                            "the config is saved, but service {} failed with exit code {}; see vroom logs",
                            failed.spec.name,
                            failed.last_exit.unwrap_or(-1)
                        )),
                        None => Ok(()),
                    };
                }
            }
            std::thread::sleep(REAP_INTERVAL);
        }
    }

    /// Spawns an exec'd command; the receiver gets its raw wait status once
    /// the reaper collects it (registered before the reaper can see the pid).
    pub fn spawn_exec(&self, command: &mut Command) -> std::io::Result<(Child, Receiver<i32>)> {
        let (tx, rx): (SyncSender<i32>, Receiver<i32>) = mpsc::sync_channel(1);
        let mut inner = self.lock();
        let child = command
            .env_clear()
            .env("PATH", PATH)
            .process_group(0)
            .spawn()?;
        inner.exec_waiters.insert(child.id() as i32, tx);
        Ok((child, rx))
    }

    /// Runs a command to completion while the reaper runs (which collects
    /// its exit): its exit code (128+n when killed by signal n, 137 after
    /// the timeout) and bounded stdout and stderr.
    fn run_reaped(&self, argv: &[String], timeout: Duration) -> (i32, String, String) {
        let Some((program, args)) = argv.split_first() else {
            return (127, String::new(), "empty command".into());
        };
        let mut command = Command::new(program);
        command
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let (mut child, exited) = match self.spawn_exec(&mut command) {
            Ok(spawned) => spawned,
            Err(err) => return (127, String::new(), format!("run {program}: {err}")),
        };
        let pid = child.id() as i32;
        let stdout = child.stdout.take().map(read_capped);
        let stderr = child.stderr.take().map(read_capped);
        let status = match exited.recv_timeout(timeout) {
            Ok(status) => status,
            Err(_) => {
                // SAFETY: killing the command's own process group.
                unsafe { libc::kill(-pid, libc::SIGKILL) };
                exited.recv().unwrap_or(libc::SIGKILL)
            }
        };
        let code = if libc::WIFEXITED(status) {
            libc::WEXITSTATUS(status)
        } else {
            128 + libc::WTERMSIG(status)
        };
        let join = |h: Option<std::thread::JoinHandle<String>>| {
            h.and_then(|h| h.join().ok()).unwrap_or_default()
        };
        (code, join(stdout), join(stderr))
    }

    /// Stops the services, then powers off. Never returns.
    pub fn shutdown(&self) -> ! {
        log("shutting down");
        let pids: Vec<(i32, i32)> = {
            let mut inner = self.lock();
            inner.shutting_down = true;
            inner
                .services
                .iter()
                .filter_map(|s| Some((s.pid?, stop_signal(&s.spec))))
                .collect()
        };
        for (pid, signal) in &pids {
            // SAFETY: signalling the service's own process group; SIGCONT
            // lets a frozen service act on the stop signal.
            unsafe {
                libc::kill(-pid, *signal);
                libc::kill(-pid, libc::SIGCONT);
            }
        }
        let deadline = Instant::now() + Duration::from_secs(3);
        while Instant::now() < deadline && self.lock().services.iter().any(|s| s.pid.is_some()) {
            std::thread::sleep(Duration::from_millis(50));
        }
        self.volumes.release();
        boot::power_off();
    }
}

impl Inner {
    /// Stops the services `which` selects (SIGTERM to each process group);
    /// the reaper starts them again as soon as they exited, or at once.
    fn restart_services(&mut self, which: impl Fn(&ServiceSpec) -> bool) {
        let now = Instant::now();
        for service in self.services.iter_mut().filter(|s| which(&s.spec)) {
            if let Some(pid) = service.pid {
                // SAFETY: signalling the service's own process group.
                unsafe { libc::kill(-pid, stop_signal(&service.spec)) };
            }
            service.start_at = Some(now);
        }
        wake_reaper();
    }

    fn child_exited(&mut self, pid: i32, status: i32) {
        let code = if libc::WIFEXITED(status) {
            libc::WEXITSTATUS(status)
        } else {
            128 + libc::WTERMSIG(status)
        };
        if let Some(waiter) = self.exec_waiters.remove(&pid) {
            let _ = waiter.send(status);
            return;
        }
        let shutting_down = self.shutting_down;
        if let Some(service) = self.services.iter_mut().find(|s| s.pid == Some(pid)) {
            service.pid = None;
            if service.start_at.is_none() {
                service.reapplying = false;
            }
            // A run stopped for its re-run says nothing of what is in force.
            if !service.reapplying {
                service.last_exit = Some(code);
            }
            if shutting_down {
                return;
            }
            log(&format!("service {} exited with {code}", service.spec.name));
            if service.start_at.is_some() {
                // A restart was requested (config change): start again right away.
            } else if service.spec.restart {
                service.restarts += 1;
                service.start_at = Some(Instant::now() + SERVICE_RESTART_DELAY);
            }
        }
    }

    /// When the next service is due to start, if one is.
    fn next_due(&self) -> Option<Instant> {
        self.services.iter().filter_map(|s| s.start_at).min()
    }

    fn start_due_services(&mut self) {
        let now = Instant::now();
        for service in &mut self.services {
            if service.pid.is_some() || service.start_at.is_none_or(|at| at > now) {
                continue;
            }
            service.start_at = None;
            let (program, args) = match service.spec.command.split_first() {
                Some(split) => split,
                None => continue,
            };
            let mut command = Command::new(program);
            command
                .args(args)
                .env_clear()
                .env("PATH", PATH)
                .stdin(Stdio::null())
                .process_group(0);
            apply_service_context(&mut command, &service.spec, &self.config);
            let spawned = command.spawn();
            match spawned {
                Ok(child) => service.pid = Some(child.id() as i32),
                Err(err) => {
                    log(&format!("start service {}: {err}", service.spec.name));
                    service.last_exit = Some(127);
                    if service.spec.restart {
                        service.start_at = Some(now + SERVICE_RESTART_DELAY);
                    }
                }
            }
        }
    }
}

/// The signal that stops a service: its own, or SIGTERM.
fn stop_signal(spec: &ServiceSpec) -> i32 {
    spec.stop_signal
        .as_deref()
        .and_then(vroom_types::signal_number)
        .unwrap_or(libc::SIGTERM)
}

/// A service's environment (over the default `PATH`; with the values of
/// the config keys it takes), user and working directory, as its image asked.
fn apply_service_context(command: &mut Command, spec: &ServiceSpec, config: &ConfigValues) {
    command.envs(spec.environment(config));
    if let Some((uid, gid)) = spec
        .user
        .as_deref()
        .and_then(|u| u.split_once(':'))
        .and_then(|(u, g)| Some((u.parse::<u32>().ok()?, g.parse::<u32>().ok()?)))
    {
        // std drops the supplementary groups when root changes uid.
        command.uid(uid).gid(gid);
    }
    if let Some(dir) = &spec.workdir {
        command.current_dir(dir);
    }
}

/// Milliseconds on the monotonic clock, which starts with the kernel.
pub fn monotonic_ms() -> u64 {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `now` is a valid timespec for the call to fill.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut now) };
    now.tv_sec as u64 * 1000 + now.tv_nsec as u64 / 1_000_000
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A oneshot's part in readiness: its latest run succeeded, or it runs
    /// again for a config change after one that did.
    #[test]
    fn a_oneshot_is_in_force_while_it_reapplies_after_success() {
        let now = Instant::now();
        // (pid, start_at, last_exit, reapplying) -> in force
        let cases = [
            ((None, None, None, false), false),         // never ran
            ((Some(7), None, None, false), false),      // first run under way
            ((None, None, Some(0), false), true),       // done
            ((None, None, Some(1), false), false),      // failed
            ((Some(7), None, Some(0), true), true),     // re-run for a change
            ((None, Some(now), Some(0), true), true),   // re-run due
            ((Some(7), None, Some(0), false), false),   // re-run at resume
            ((Some(7), None, Some(137), false), false), // re-run stopped on timeout
        ];
        for ((pid, start_at, last_exit, reapplying), want) in cases {
            let service = Service {
                spec: ServiceSpec {
                    name: "rules".into(),
                    command: vec!["/bin/true".into()],
                    restart: false,
                    restart_on_config: true,
                    oneshot: true,
                    check: vec![],
                    ..Default::default()
                },
                pid,
                restarts: 0,
                start_at,
                last_exit,
                reapplying,
            };
            assert_eq!(
                service.in_force(),
                want,
                "{pid:?} {last_exit:?} {reapplying}"
            );
        }
    }

    #[test]
    fn checks_read_the_staged_copies() {
        let paths = ["/run/fw/nftables.conf", "/run/fw/dnsmasq.conf"];
        let cases: &[(&[&str], &[&str])] = &[
            (
                &["/usr/sbin/nft", "-c", "-f", "/run/fw/nftables.conf"],
                &[
                    "/usr/sbin/nft",
                    "-c",
                    "-f",
                    "/run/fw/.vroom-staged/nftables.conf",
                ],
            ),
            (
                &[
                    "/usr/sbin/dnsmasq",
                    "--test",
                    "--conf-file=/run/fw/dnsmasq.conf",
                ],
                &[
                    "/usr/sbin/dnsmasq",
                    "--test",
                    "--conf-file=/run/fw/.vroom-staged/dnsmasq.conf",
                ],
            ),
            (
                &["/bin/true", "/run/other.conf"],
                &["/bin/true", "/run/other.conf"],
            ),
        ];
        for (check, want) in cases {
            let check: Vec<String> = check.iter().map(|s| s.to_string()).collect();
            assert_eq!(check_argv(&check, &paths), *want);
        }
    }
}
