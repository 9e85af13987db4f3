//! The client-side commands: [`dispatch`] sends each to the module of its
//! family, which talks to vroomd through `vroom-client`.

use anyhow::Result;
use vroom_client::Client;
use vroom_types::ExecRequest;

use crate::args::{ArchiveOp, Cli, Command, ConfigOp};
use crate::{
    capture, config, demo, events, gc, guest, image, instance, net, node, paths, room, service,
    session, snapshot, splice, ui, volume,
};

/// Runs one client-side command; returns the process's exit code.
pub async fn dispatch(cli: &Cli) -> Result<i32> {
    let json = cli.json;
    // A file to import is checked before anything else: a refused one must
    // not start a daemon on the way.
    if let Command::Config {
        op: ConfigOp::Import { file },
        ..
    } = &cli.command
    {
        config::check_import_file(file)?;
    }
    if let Command::Archive {
        op: ArchiveOp::Verify { dir },
    } = &cli.command
    {
        return snapshot::verify(dir, json);
    }
    let client = &client(cli).await?;
    let done = match &cli.command {
        // Instances.
        Command::Run(args) => return instance::run(client, args, json).await,
        Command::Clone {
            snapshot,
            name,
            nets,
        } => return instance::clone(client, snapshot, name, nets, json).await,
        Command::Ps => instance::ps(client, json).await,
        Command::Inspect { name } => instance::inspect(client, name, json).await,
        Command::Start { name } => instance::start(client, name, json).await,
        Command::Stop { name } => instance::stop(client, name, json).await,
        Command::Restart { name } => instance::restart(client, name, json).await,
        Command::Rm {
            force,
            archive: Some(dir),
            name,
            ..
        } => snapshot::archive(client, name, dir, *force, json).await,
        Command::Rm {
            force,
            archive: None,
            volumes: false,
            name,
        } => client.remove(name, *force).await.map_err(Into::into),
        Command::Rm {
            force,
            archive: None,
            volumes: true,
            name,
        } => client
            .remove_with_volumes(name, *force)
            .await
            .map_err(Into::into),
        Command::Volume { op } => volume::volume(client, op, json).await,
        Command::Config { name, op } => config::config(client, name, op, json).await,
        // Inside the guest.
        Command::Logs {
            follow,
            boot,
            tail,
            name,
        } => guest::logs(client, name, *boot, *tail, *follow).await,
        Command::Ui { port } => return ui::serve(client.clone(), *port).await,
        Command::Cp { source, dest } => guest::copy_out(client, source, dest).await,
        Command::Events {
            follow,
            since,
            until,
            limit,
            filters,
            all_nodes,
        } => {
            let query = events::query(
                *follow,
                since.as_deref(),
                *until,
                *limit,
                filters,
                *all_nodes,
            )?;
            events::events(client, query, json).await
        }
        Command::Exec {
            name,
            timeout,
            interactive,
            command,
        } => {
            let req = ExecRequest {
                argv: command.to_vec(),
                timeout_secs: Some(*timeout),
                stdin: *interactive,
            };
            return guest::exec(client, name, &req, json).await;
        }
        // Snapshots.
        Command::Snapshot { op, vm, name, stop } => {
            snapshot::snapshot(client, op.as_ref(), vm.as_deref(), name, *stop, json).await
        }
        Command::Restore { vm, snapshot } => snapshot::restore(client, vm, snapshot, json).await,
        // Networks, rooms, splices and mirrors.
        Command::Net { op } => net::net(client, op, json).await,
        Command::Room { op } => room::room(client, op, json).await,
        Command::Service { op } => service::service(client, op, json).await,
        Command::Topology { room, format } => {
            room::topology(client, room.as_deref(), *format, json).await
        }
        Command::Splice {
            appliance,
            in_front_of,
            fail,
            name,
            timeout,
        } => {
            let name = name.clone();
            splice::splice(client, appliance, in_front_of, *fail, name, *timeout, json).await
        }
        Command::Unsplice { appliance } => client.unsplice(appliance).await.map_err(Into::into),
        Command::Splices => splice::list(client, json).await,
        Command::Capture {
            name,
            filter,
            count,
        } => return capture::capture(client, name, filter.as_deref(), *count).await,
        Command::Mirror { source, to, filter } => {
            splice::mirror(client, source, to, filter.clone(), json).await
        }
        Command::Unmirror { source, to } => splice::unmirror(client, source, to.as_ref()).await,
        // Images.
        Command::Image { op } => image::image(client, op, json).await,
        // The cluster.
        Command::Node { op } => node::node(client, op, json).await,
        Command::Migrate { name, to } => node::migrate(client, name, to, json).await,
        // The host.
        Command::Demo { keep } => demo::run(client, *keep).await,
        Command::Gc { remove } => {
            gc::run(client, &cli.data_dir, &paths::iface_prefix(), *remove, json).await
        }
        Command::Archive { .. } => unreachable!("handled before connecting"),
        Command::Setup { .. }
        | Command::Kernel { .. }
        | Command::Daemon { .. }
        | Command::Bench { .. }
        | Command::Jail { .. }
        | Command::Guard { .. }
        | Command::Info
        | Command::GenerateDocs { .. }
        | Command::NbdRelay { .. }
        | Command::Cluster { .. } => {
            unreachable!("handled in main")
        }
    };
    done.map(|()| 0)
}

/// The vroomd of `--host` over mutual TLS, or the local one (started when
/// none runs).
async fn client(cli: &Cli) -> Result<Client> {
    Ok(match &cli.host {
        Some(host) => {
            let dir = cli
                .tls_dir
                .clone()
                .unwrap_or_else(|| cli.data_dir.join("tls"));
            Client::remote(host, &dir)?
        }
        None => {
            let client = session::connect(&cli.data_dir, None).await?;
            if cli.verbose {
                if let Ok(version) = client.version().await {
                    eprintln!("vroom: talking to {}", session::describe(&version));
                }
            }
            client
        }
    })
}
