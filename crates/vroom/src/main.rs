//! The `vroom` command line. It talks to vroomd only through the API
//! (starting a daemon in the background when none runs); `vroom daemon` runs
//! the daemon itself in the foreground.

mod args;
mod bench;
mod capture;
mod cli;
mod config;
mod daemon;
mod demo;
mod docs;
mod events;
mod gc;
mod guest;
mod image;
mod info;
mod instance;
mod kernel;
mod net;
mod node;
mod room;
mod serve;
mod service;
mod setup;
mod snapshot;
mod splice;
mod systemd;
mod ui;
mod volume;
mod volume_file;

use clap::Parser;
// The modules vroom-bench shares, in the library half of this package.
use vroom::process::{die_quietly_on_closed_stdout, ensure_sbin_on_path, init_tracing, runtime};
use vroom::{jail, output, paths, session};

use crate::args::{Cli, Command, DaemonOp};

fn main() {
    ensure_sbin_on_path();
    // clap's own report for usage errors: the cause, the usage line and
    // suggestions for mistyped subcommands, with exit code 2.
    let cli = Cli::parse();
    if !matches!(
        cli.command,
        Command::Daemon { op: None, .. }
            | Command::Jail { .. }
            | Command::Guard { .. }
            | Command::NbdRelay { .. }
    ) {
        die_quietly_on_closed_stdout();
    }
    let result = match &cli.command {
        // Before any runtime starts: the jailer forks and must be single-threaded.
        Command::Jail { spec } => jail::run(spec),
        Command::Guard { socket, scope } => vroom_cluster::guard::run(socket, scope)
            .map(|()| 0)
            .map_err(Into::into),
        Command::NbdRelay {
            qemu_fd,
            peer_fd,
            sealed,
            control,
            silent_ms,
        } => vroom_volume::relay::run_process(
            *qemu_fd,
            *peer_fd,
            *sealed,
            control,
            std::time::Duration::from_millis(*silent_ms),
        )
        .map(|()| 0)
        .map_err(Into::into),
        Command::Bench { args } => bench::run(&cli.data_dir, args),
        Command::Daemon {
            op: None,
            no_jail,
            metrics,
            cluster,
        } => {
            init_tracing(true);
            // Before the runtime's threads: it edits the environment.
            let launch = match systemd::Launch::from_env() {
                Ok(launch) => launch,
                Err(e) => {
                    eprintln!("error: {e:#}");
                    std::process::exit(1);
                }
            };
            let mode = if *no_jail {
                vroom_qemu::JailMode::Unjailed
            } else {
                vroom_qemu::JailMode::Jailed
            };
            runtime()
                .block_on(daemon::run(
                    &cli.data_dir,
                    mode,
                    *metrics,
                    cluster.clone(),
                    launch,
                ))
                .map(|()| 0)
        }
        Command::Cluster { op } => {
            init_tracing(false);
            runtime().block_on(node::cluster(op, cli.json))
        }
        Command::Daemon {
            op: Some(DaemonOp::Stop { self_started }),
            ..
        } => {
            init_tracing(false);
            runtime()
                .block_on(daemon::stop(&cli.data_dir, *self_started))
                .map(|()| 0)
        }
        Command::Info => {
            init_tracing(false);
            runtime().block_on(info::run(&cli.data_dir, cli.json))
        }
        Command::GenerateDocs { dir } => docs::generate(dir).map(|()| 0),
        Command::Setup { wait_kernel, qemu } => {
            let own = if *wait_kernel {
                setup::OwnKernelSetup::Wait
            } else {
                setup::OwnKernelSetup::Background
            };
            setup::run(false, own, qemu.as_deref()).map(|()| 0)
        }
        Command::Kernel { op } => kernel::run(op, cli.json),
        _ => {
            init_tracing(false);
            runtime().block_on(cli::dispatch(&cli))
        }
    };
    match result {
        Ok(code) => std::process::exit(code),
        Err(err) => {
            eprintln!("error: {err:#}");
            std::process::exit(1);
        }
    }
}
