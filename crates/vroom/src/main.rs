//! The `vroom` command line. It talks to vroomd only through the API
//! (starting a daemon in the background when none runs); `vroom daemon` runs
//! the daemon itself in the foreground.

mod bench;
mod bench_images;
mod cli;
mod daemon;
mod demo;
mod output;
mod paths;
mod setup;

use std::path::PathBuf;

use clap::{Parser, Subcommand};
use vroom_types::{parse_mem_mib, AccelChoice, NicSpec};

#[derive(Parser)]
#[command(
    name = "vroom",
    version,
    about = "MicroVM appliances: boot in seconds, configure from a floppy, throw away"
)]
pub struct Cli {
    /// Where vroomd keeps its state, images and instances.
    #[arg(long, global = true, env = "VROOM_DATA_DIR", default_value = paths::DEFAULT_DATA_DIR)]
    pub data_dir: PathBuf,
    /// Print JSON instead of tables.
    #[arg(long, global = true)]
    pub json: bool,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
pub enum Command {
    /// Install or verify host prerequisites and the guest kernel.
    Setup,
    /// Run vroomd in the foreground.
    Daemon,
    /// Create and start an instance; returns when the guest reports ready.
    Run(RunArgs),
    /// List instances.
    Ps,
    /// Show one instance.
    Inspect { name: String },
    /// Start a stopped instance.
    Start { name: String },
    /// Shut an instance down gracefully (killed after a timeout).
    Stop { name: String },
    /// Stop, then start an instance.
    Restart { name: String },
    /// Remove an instance, its config volume and its files.
    Rm {
        /// Kill it first if it runs.
        #[arg(short, long)]
        force: bool,
        name: String,
    },
    /// Show an instance's console log.
    Logs {
        /// Keep printing new output.
        #[arg(short, long)]
        follow: bool,
        name: String,
    },
    /// Copy a file out of a running guest: `vroom cp NAME:/path LOCAL`
    /// (LOCAL may be a directory; `-` writes to stdout).
    Cp { source: String, dest: PathBuf },
    /// Run a command in the guest and exit with its exit code.
    Exec {
        name: String,
        /// Seconds before the command is killed.
        #[arg(long, default_value_t = 30)]
        timeout: u64,
        #[arg(last = true, required = true)]
        command: Vec<String>,
    },
    /// Read and change an instance's config.
    Config {
        name: String,
        #[command(subcommand)]
        op: ConfigOp,
    },
    /// Manage networks.
    Net {
        #[command(subcommand)]
        op: NetOp,
    },
    /// Manage images.
    Image {
        #[command(subcommand)]
        op: ImageOp,
    },
    /// Run the end-to-end demo: a network, the hello appliance, a config change.
    Demo {
        /// Leave the demo running instead of cleaning up.
        #[arg(long)]
        keep: bool,
    },
    /// Benchmarks.
    Bench {
        #[command(subcommand)]
        op: BenchOp,
    },
}

#[derive(clap::Args)]
pub struct RunArgs {
    /// Image name or id.
    pub image: String,
    #[arg(long)]
    pub name: vroom_types::Name,
    /// Guest memory, e.g. 128M or 1G (the image's default when absent).
    #[arg(long, value_parser = parse_mem_mib)]
    pub mem: Option<u64>,
    #[arg(long, default_value_t = 1, value_parser = vroom_types::limits::parse_cpus)]
    pub cpus: u32,
    /// Attach to a network, optionally with a fixed address: NET or NET:IP. Repeatable.
    #[arg(long = "net")]
    pub nets: Vec<NicSpec>,
    #[arg(long, default_value = "auto")]
    pub accel: AccelChoice,
    /// Seconds the guest has to report ready (1 to 3600).
    #[arg(long, default_value_t = vroom_core::engine::DEFAULT_READY_TIMEOUT_SECS,
        value_parser = vroom_types::limits::parse_ready_timeout_secs)]
    pub timeout: u64,
    /// Size of the config volume in KiB (64 to 65536).
    #[arg(long, value_parser = vroom_types::limits::parse_config_volume_kib)]
    pub config_size: Option<u32>,
}

#[derive(Subcommand)]
pub enum ConfigOp {
    /// Print the config, or one key's value.
    Get { key: Option<String> },
    /// Set KEY=VALUE pairs (applied live on a running instance).
    Set {
        #[arg(required = true, value_parser = vroom_types::parse_assignment)]
        pairs: Vec<(String, String)>,
    },
    /// Restore the image's factory config.
    Reset,
    /// Write the config to a JSON file.
    Export { file: PathBuf },
    /// Replace the config with a JSON file written by `export`.
    Import { file: PathBuf },
}

#[derive(Subcommand)]
pub enum NetOp {
    /// Create a network (a bridge on this host).
    Create {
        name: vroom_types::Name,
        /// IPv4 subnet, e.g. 10.90.0.0/24; a free /24 when absent.
        #[arg(long, value_parser = vroom_types::parse_subnet)]
        subnet: Option<vroom_types::Ipv4Net>,
        /// NAT to the host's uplink.
        #[arg(long, conflicts_with = "isolated")]
        nat: bool,
        /// No host address: a firewall appliance on it is the gateway.
        #[arg(long)]
        isolated: bool,
        /// Flood every frame to every port, for a sniffer's mirror-sink NIC.
        #[arg(long)]
        mirror: bool,
    },
    /// List networks.
    Ls,
    /// Show one network.
    Inspect { name: String },
    /// Remove a network no instance uses.
    Rm { name: String },
}

#[derive(Subcommand)]
pub enum ImageOp {
    /// Build an image from a recipe (a recipe.toml or its directory).
    Build {
        recipe: PathBuf,
        /// Refresh the package indexes first (security updates) and list the
        /// packages that changed.
        #[arg(long)]
        update: bool,
    },
    /// List images.
    Ls,
    /// Show an image's manifest.
    Inspect { image: String },
    /// List the exact Debian packages in an image (its SBOM).
    Sbom { image: String },
    /// Remove an image no instance uses.
    Rm { image: String },
}

#[derive(Subcommand)]
pub enum BenchOp {
    /// Boot the hello appliance N times through vroom and N times with the raw QEMU command.
    Boot {
        #[arg(short = 'n', long, default_value_t = 5)]
        runs: usize,
    },
    /// Build every recipe in a directory cold and cached, boot each, and
    /// compare the firewall with a debootstrap minbase root.
    Images {
        /// A directory of recipe directories.
        #[arg(long, default_value = "recipes")]
        recipes: PathBuf,
        #[arg(short = 'n', long, default_value_t = 3)]
        runs: usize,
        /// Skip the debootstrap comparison (it downloads a full minbase).
        #[arg(long)]
        no_debootstrap: bool,
    },
}

fn main() {
    ensure_sbin_on_path();
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if !e.use_stderr() => e.exit(),
        Err(e) => {
            // One line: clap's first line already reads "error: <cause>".
            let text = e.to_string();
            eprintln!(
                "{}",
                text.lines().next().unwrap_or("error: invalid arguments")
            );
            std::process::exit(2);
        }
    };
    let result = match &cli.command {
        Command::Daemon => {
            init_tracing(true);
            runtime().block_on(daemon::run(&cli.data_dir)).map(|()| 0)
        }
        Command::Setup => setup::run(false).map(|()| 0),
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

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("invariant: a tokio runtime starts")
}

fn init_tracing(daemon: bool) {
    // netlink-packet-route warns about every newer kernel attribute it does not know.
    let default = if daemon {
        "info,netlink_packet_route=error"
    } else {
        "warn,netlink_packet_route=error"
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env("VROOM_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .try_init();
}

/// nft, depmod and friends live in /usr/sbin, which non-login shells may lack.
fn ensure_sbin_on_path() {
    let path = std::env::var("PATH").unwrap_or_default();
    let mut parts: Vec<&str> = path.split(':').filter(|p| !p.is_empty()).collect();
    for dir in ["/usr/local/sbin", "/usr/sbin", "/sbin", "/usr/bin", "/bin"] {
        if !parts.contains(&dir) {
            parts.push(dir);
        }
    }
    std::env::set_var("PATH", parts.join(":"));
}
