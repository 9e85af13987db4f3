//! vroom-init: PID 1 of every vroom appliance.
//!
//! It starts in the initramfs, which holds only this binary, the kernel
//! modules and their load order (`/lib/vroom/modules`). It loads the modules,
//! mounts the read-only root (erofs) with tmpfs over the appliance's writable
//! directories and the config volume at `/config`, and switches into the root.
//! There it applies the config (hostname, NIC addresses, rendered templates),
//! checks and mounts the data volumes (`datavol`), starts and supervises the
//! services and serves the host over the agent port. For snapshots it freezes the services, and on resume reseeds the RNG, sets
//! the clock and, in a clone, takes on a new identity (`supervisor::snapshot`).

mod agent;
mod boot;
mod command;
mod conntrack;
mod datavol;
mod disk;
mod exec;
mod netconf;
mod reply;
mod reseed;
mod supervisor;

use std::sync::Arc;

fn main() {
    if std::process::id() != 1 {
        eprintln!("vroom-init: must run as PID 1 inside a vroom guest");
        std::process::exit(2);
    }
    let init_ms = supervisor::monotonic_ms();
    // Before any thread starts: they all inherit it.
    supervisor::block_sigchld();
    let appliance = match boot::boot() {
        Ok(appliance) => appliance,
        Err(err) => {
            log(&format!("boot failed: {err}"));
            boot::power_off();
        }
    };
    let state = Arc::new(supervisor::Supervisor::new(appliance, init_ms));
    state.start_all();
    {
        let state = state.clone();
        std::thread::spawn(move || agent::serve(state));
    }
    state.reap_forever();
}

pub fn log(msg: &str) {
    eprintln!("vroom-init: {msg}");
}
