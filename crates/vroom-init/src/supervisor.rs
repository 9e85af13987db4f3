//! Service supervision and child reaping. As PID 1 we reap every process in
//! the guest, so exec'd commands get their exit status from here too.

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::net::{SocketAddr, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{self, Receiver, SyncSender};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use vroom_agent_proto::{HealthReport, ServiceHealth};
use vroom_types::template::{TemplateContext, TemplateNic};
use vroom_types::{
    check_config, validate_config_key, validate_config_value, ApplianceSpec, ConfigValues,
    ServiceSpec,
};

use crate::boot::{self, Booted};
use crate::log;

const SERVICE_RESTART_DELAY: Duration = Duration::from_secs(1);
const REAP_INTERVAL: Duration = Duration::from_millis(20);
const PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

pub struct Supervisor {
    spec: ApplianceSpec,
    hostname: String,
    nics: BTreeMap<String, TemplateNic>,
    booted_at: Instant,
    inner: Mutex<Inner>,
}

struct Inner {
    config: ConfigValues,
    services: Vec<Service>,
    exec_waiters: HashMap<i32, SyncSender<i32>>,
    started: bool,
    shutting_down: bool,
}

struct Service {
    spec: ServiceSpec,
    pid: Option<i32>,
    restarts: u32,
    start_at: Option<Instant>,
    last_exit: Option<i32>,
}

impl Service {
    /// A oneshot that finished its latest run successfully.
    fn succeeded(&self) -> bool {
        self.pid.is_none() && self.start_at.is_none() && self.last_exit == Some(0)
    }
}

/// How long a config change waits for its oneshot services; under the
/// host's 10 s agent timeout, so that the host hears the outcome.
const ONESHOT_TIMEOUT: Duration = Duration::from_secs(8);

impl Supervisor {
    pub fn new(booted: Booted) -> Self {
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
            })
            .collect();
        Supervisor {
            spec: booted.spec,
            hostname: booted.hostname,
            nics: booted.nics,
            booted_at: Instant::now(),
            inner: Mutex::new(Inner {
                config: booted.config,
                services,
                exec_waiters: HashMap::new(),
                started: false,
                shutting_down: false,
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    pub fn start_all(&self) {
        let mut inner = self.lock();
        self.render_templates(&inner.config);
        let now = Instant::now();
        for service in &mut inner.services {
            service.start_at = Some(now);
        }
        inner.start_due_services();
        inner.started = true;
        log("services started");
    }

    /// Reaps children forever: restarts services, hands exit codes to exec waiters.
    pub fn reap_forever(&self) -> ! {
        loop {
            {
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
                if !inner.shutting_down {
                    inner.start_due_services();
                }
            }
            std::thread::sleep(REAP_INTERVAL);
        }
    }

    pub fn health(&self) -> HealthReport {
        let (config, services, started) = {
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
                .all(Service::succeeded);
            (
                inner.config.clone(),
                services,
                inner.started && !inner.shutting_down && oneshots_done,
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
        HealthReport {
            ready: started && healthy,
            uptime_ms: self.booted_at.elapsed().as_millis() as u64,
            services,
            config,
        }
    }

    /// Validates, persists durably, re-renders and restarts what depends on the config.
    pub fn apply_config(&self, values: ConfigValues) -> Result<ConfigValues, String> {
        for (key, value) in &values {
            validate_config_key(key).map_err(|e| e.to_string())?;
            validate_config_value(key, value).map_err(|e| e.to_string())?;
        }
        if !self.spec.config_schema.is_empty() {
            check_config(&self.spec.config_schema, &values).map_err(|e| e.to_string())?;
        }
        let mut inner = self.lock();
        boot::write_config(&values)?;
        inner.config = values.clone();
        let render_errors = self.render_templates(&values);
        for service in inner
            .services
            .iter_mut()
            .filter(|s| s.spec.restart_on_config)
        {
            match service.pid {
                Some(pid) => {
                    // SAFETY: signalling the service's own process group.
                    unsafe { libc::kill(-pid, libc::SIGTERM) };
                    service.start_at = Some(Instant::now());
                }
                None => service.start_at = Some(Instant::now()),
            }
        }
        log(&format!("config applied ({} keys)", values.len()));
        drop(inner);
        self.wait_for_oneshots()?;
        if let Some(first) = render_errors.first() {
            return Err(format!(
                "the config is saved, but a template failed: {first}"
            ));
        }
        Ok(values)
    }

    /// Waits until the oneshot services restarted by a config change have
    /// finished; a failure is reported, since the change is then not in effect.
    fn wait_for_oneshots(&self) -> Result<(), String> {
        let deadline = Instant::now() + ONESHOT_TIMEOUT;
        loop {
            {
                let inner = self.lock();
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
                if Instant::now() > deadline {
                    return Err(
                        "the config is saved, but its oneshot services did not finish".into(),
                    );
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

    /// Stops the services, then powers off. Never returns.
    pub fn shutdown(&self) -> ! {
        log("shutting down");
        let pids: Vec<i32> = {
            let mut inner = self.lock();
            inner.shutting_down = true;
            inner.services.iter().filter_map(|s| s.pid).collect()
        };
        for pid in &pids {
            // SAFETY: signalling the service's own process group.
            unsafe { libc::kill(-pid, libc::SIGTERM) };
        }
        let deadline = Instant::now() + Duration::from_secs(3);
        while Instant::now() < deadline && self.lock().services.iter().any(|s| s.pid.is_some()) {
            std::thread::sleep(Duration::from_millis(50));
        }
        boot::power_off();
    }

    /// Renders every template; a template that fails keeps its previous file
    /// and its error is returned (and logged).
    fn render_templates(&self, values: &ConfigValues) -> Vec<String> {
        let ctx =
            TemplateContext::new(&self.spec.config_schema, values, &self.nics, &self.hostname);
        let mut errors = vec![];
        for template in &self.spec.templates {
            let text = match template.render(&ctx) {
                Ok(text) => text,
                Err(err) => {
                    log(&format!("render {err}"));
                    errors.push(err);
                    continue;
                }
            };
            let path = Path::new(&template.path);
            if let Some(parent) = path.parent() {
                let _ = fs::create_dir_all(parent);
            }
            let tmp = path.with_extension("vroom-tmp");
            let result = fs::write(&tmp, text).and_then(|()| fs::rename(&tmp, path));
            if let Err(err) = result {
                log(&format!("render {}: {err}", template.path));
                errors.push(format!("{}: {err}", template.path));
            }
        }
        errors
    }
}

impl Inner {
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
            service.last_exit = Some(code);
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
            let spawned = Command::new(program)
                .args(args)
                .env_clear()
                .env("PATH", PATH)
                .stdin(Stdio::null())
                .process_group(0)
                .spawn();
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
