//! The command line's grammar: every command, flag and help text, as clap
//! reads them. Handlers live in the module of their command family.

use std::path::PathBuf;

use clap::{Parser, Subcommand};
use vroom_types::{parse_mem_mib, AccelChoice, Name, NicSpec, Protocol};

use crate::paths;

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
    /// Talk to the vroomd of a cluster node on another host (`HOST` or
    /// `HOST:PORT`, port 7948 by default) over mutual TLS, instead of the
    /// local one.
    #[arg(long, global = true, env = "VROOM_HOST")]
    pub host: Option<String>,
    /// The CA, certificate and key for `--host` (`vroom cluster
    /// credentials` makes them; a node has its own in DATA_DIR/tls).
    #[arg(long, global = true, env = "VROOM_TLS_DIR")]
    pub tls_dir: Option<PathBuf>,
    /// Say which vroomd answers (its pid, who started it, its data dir) on
    /// stderr before the command's output.
    #[arg(short, long, global = true)]
    pub verbose: bool,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
pub enum Command {
    /// Install or verify host prerequisites and the guest kernels: Debian's
    /// cloud kernel at once, and vroom's own (everything built in, boots in
    /// 64 MiB) built in the background unless it is built already.
    Setup {
        /// Build vroom's kernel now, in the foreground, instead of in the
        /// background.
        #[arg(long)]
        wait_kernel: bool,
        /// Also unpack this QEMU series into a private prefix under the
        /// cache dir, beside the machine's own (10: QEMU 10.0 from
        /// bookworm-backports); vroomd runs it when VROOM_QEMU names it.
        #[arg(long, value_name = "SERIES", value_parser = ["10"])]
        qemu: Option<String>,
    },
    /// Run vroomd in the foreground (`vroom daemon stop` stops a running one;
    /// its VMs keep running and the next daemon re-adopts them).
    Daemon {
        #[command(subcommand)]
        op: Option<DaemonOp>,
        /// Run QEMU unjailed, as root with the host's files (for benchmarks
        /// and debugging only).
        #[arg(long)]
        no_jail: bool,
        /// Also serve `GET /metrics` (Prometheus text) in plain HTTP on this
        /// loopback address, e.g. 127.0.0.1:9464, for a local scraper.
        #[arg(long, value_name = "ADDR:PORT", env = "VROOM_METRICS")]
        metrics: Option<std::net::SocketAddr>,
        #[command(flatten)]
        cluster: ClusterArgs,
    },
    /// Which vroomd the CLI talks to: a systemd unit (socket-activated or
    /// not) or one the CLI started, its pid, version, data dir and socket.
    /// Starts none.
    Info,
    /// Internal: write shell completions (bash, zsh, fish) and man pages
    /// generated from this grammar into DIR (the package's build runs it).
    #[command(name = "__generate-docs", hide = true)]
    GenerateDocs {
        /// Where to write `completions/` and `man/`.
        dir: PathBuf,
    },
    /// The cluster's identity in etcd (`cluster init`, once per cluster).
    Cluster {
        #[command(subcommand)]
        op: ClusterOp,
    },
    /// Move a running cluster instance to another node without stopping it
    /// (live migration).
    Migrate {
        /// The instance's name.
        name: String,
        /// The node to move it to.
        #[arg(long)]
        to: Name,
    },
    /// The cluster's hosts: list, inspect, cordon, uncordon, drain, rm.
    Node {
        #[command(subcommand)]
        op: NodeOp,
    },
    /// Internal: a cluster node's fencing guard (vroomd starts it).
    #[command(name = "__guard", hide = true)]
    Guard {
        /// The unix socket vroomd reports acknowledged keepalives on.
        #[arg(long)]
        socket: PathBuf,
        /// The cgroup scope (under `vroom/`) whose processes it kills.
        #[arg(long)]
        scope: String,
    },
    /// Internal: the NBD relay on a replicated volume's replication
    /// connection (vroomd starts it).
    #[command(name = "__nbd-relay", hide = true)]
    NbdRelay {
        /// The fd of QEMU's NBD connection (a unix socket).
        #[arg(long)]
        qemu_fd: i32,
        /// The fd of the connection to the replica (TCP).
        #[arg(long)]
        peer_fd: i32,
        /// The peer connection is TLS: its record keys come as a line on
        /// stdin.
        #[arg(long)]
        sealed: bool,
        /// The unix socket the relay answers status and release on.
        #[arg(long)]
        control: PathBuf,
        /// How long a request may go unanswered before the relay holds.
        #[arg(long, default_value_t = 1000)]
        silent_ms: u64,
    },
    /// Create and start an instance; returns when the guest reports ready.
    Run(RunArgs),
    /// List instances.
    Ps,
    /// Show one instance.
    Inspect {
        /// The instance's name.
        name: String,
    },
    /// Start a stopped instance.
    Start {
        /// The instance's name.
        name: String,
    },
    /// Shut an instance down gracefully (killed after a timeout).
    Stop {
        /// The instance's name.
        name: String,
    },
    /// Stop, then start an instance.
    Restart {
        /// The instance's name.
        name: String,
    },
    /// Remove an instance, its config volume and its files.
    Rm {
        /// Kill it first if it runs.
        #[arg(short, long)]
        force: bool,
        /// Forensic removal: first archive the instance into DIR (a last
        /// memory snapshot if it runs, the config volume and its history,
        /// the console logs, the record, a SHA256SUMS manifest), then
        /// overwrite its files before unlinking them. DIR must not exist
        /// yet or be empty, and not be a symbolic link; a caller other than
        /// root may only use a directory it could write itself.
        #[arg(long, value_name = "DIR")]
        archive: Option<PathBuf>,
        /// Remove its data volumes too (they stay otherwise, for the next
        /// instance to attach).
        #[arg(long, conflicts_with = "archive")]
        volumes: bool,
        /// The instance's name.
        name: String,
    },
    /// Capture a running instance (memory and device state, config volume,
    /// record) as one snapshot; `snapshot ls|inspect|rm` manage them.
    #[command(args_conflicts_with_subcommands = true)]
    Snapshot {
        #[command(subcommand)]
        op: Option<SnapshotOp>,
        /// The running instance to capture.
        vm: Option<String>,
        /// The snapshot's name (VM-YYYYMMDD-HHMMSS by default).
        #[arg(long)]
        name: Option<Name>,
        /// Shut the instance down after the capture instead of resuming it.
        #[arg(long)]
        stop: bool,
    },
    /// Put an instance back to a snapshot: memory, devices and config (its
    /// current run is discarded).
    Restore {
        /// The instance's name.
        vm: String,
        /// The snapshot's name.
        snapshot: Name,
    },
    /// Start a new instance from a snapshot instead of booting it (`run
    /// --from-snapshot`): the snapshot's memory and config, its own name,
    /// MACs, addresses, machine id and a reseeded RNG.
    Clone {
        /// The snapshot's name.
        snapshot: Name,
        /// The new instance's name.
        name: Name,
        /// Attach a NIC to a network: [ROLE=]NET[:IP] (the snapshot's
        /// networks by default; as many NICs as the snapshot has).
        #[arg(long = "net")]
        nets: Vec<NicSpec>,
    },
    /// Forensic archives written by `rm --archive`.
    Archive {
        #[command(subcommand)]
        op: ArchiveOp,
    },
    /// Show an instance's console log (kernel, vroom-init and services):
    /// the newest 512 KiB to 1 MiB of the current boot, the last 512 KiB of
    /// each earlier one.
    Logs {
        /// Keep printing new output.
        #[arg(short, long)]
        follow: bool,
        /// Which boot: 0 is the current (or last) one, -1 the one before, down to -5.
        #[arg(long, default_value_t = 0, allow_hyphen_values = true,
              value_parser = clap::value_parser!(i32).range(-5..=0))]
        boot: i32,
        /// Only the last N lines.
        #[arg(short = 'n', long)]
        tail: Option<usize>,
        /// The instance's name.
        name: String,
    },
    /// Show what changed and who changed it: vroomd's event log (instances,
    /// configs, splices, snapshots, rooms, images, volumes, nodes), newest
    /// last; `--follow` keeps printing new events.
    Events {
        /// Keep printing new events (after the history asked for with
        /// `--since` or `--limit`).
        #[arg(short, long)]
        follow: bool,
        /// Only events after this number (with `--all-nodes`: after a
        /// cursor, NODE:NUMBER,... as `--json` lines' nodes and numbers give).
        #[arg(long)]
        since: Option<String>,
        /// Only events up to this number.
        #[arg(long, conflicts_with_all = ["follow", "all_nodes"])]
        until: Option<u64>,
        /// At most this many events: the latest, or the first after `--since`
        /// (default: the last 100 unless `--follow` alone).
        #[arg(short = 'n', long)]
        limit: Option<usize>,
        /// KEY=VALUE[,VALUE...] with KEY one of kind, action, name, room,
        /// node; repeat for more (all must match).
        #[arg(long = "filter", value_name = "KEY=VALUE")]
        filters: Vec<String>,
        /// Every cluster node's events in one stream, by time (each node
        /// numbers its own).
        #[arg(short = 'A', long)]
        all_nodes: bool,
    },
    /// Open the web dashboard: serves it on a loopback port, through to
    /// vroomd (this host's socket, or `--host`'s mutual TLS), and prints a
    /// link with a one-time token; runs until Ctrl-C.
    Ui {
        /// The loopback port to listen on (default: any free one).
        #[arg(long, default_value_t = 0)]
        port: u16,
    },
    /// Copy a file out of a running guest: `vroom cp NAME:/path LOCAL`
    /// (LOCAL may be a directory; `-` writes to stdout).
    Cp {
        /// NAME:/path/in/the/guest of a regular file.
        source: String,
        /// A local file or directory, or `-` for stdout.
        dest: PathBuf,
    },
    /// Run a command in the guest, streaming its output, and exit with its
    /// exit code (124 timed out, 127 not found, 128+n killed by signal n).
    Exec {
        /// The instance's name.
        name: String,
        /// Seconds before the command is killed (1 to 86400).
        #[arg(long, default_value_t = 30)]
        timeout: u64,
        /// Forward stdin to the command (without it the command's stdin is empty).
        #[arg(short, long)]
        interactive: bool,
        /// The command and its arguments, after `--`.
        #[arg(last = true, required = true)]
        command: Vec<String>,
    },
    /// Read and change an instance's config.
    Config {
        /// The instance's name.
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
    /// List host bridges and NAT tables with vroom's prefix that no network
    /// or instance of this data dir owns (left by a deleted data dir), and
    /// stale files: run dirs of instances that no longer exist, console
    /// rotations the log layout no longer names.
    Gc {
        /// Delete the idle ones (bridges without ports, tables without a
        /// bridge, run dirs untouched for a minute, stale console files).
        #[arg(long)]
        remove: bool,
    },
    /// Put an appliance inline in front of a running VM's NIC, without
    /// touching the VM: its tap moves to a private bridge shared with the
    /// appliance's inside NIC. Returns once traffic goes through it.
    Splice {
        /// An image (an appliance is created, and removed on unsplice), or a
        /// stopped instance with outside and inside NICs.
        appliance: String,
        /// The VM and its NIC (a role or an index from 0; the first NIC by default).
        #[arg(long, value_name = "VM[:NIC]")]
        in_front_of: vroom_types::NicRef,
        /// When the appliance dies or fails its health check: `open` wires the
        /// VM around it, `closed` keeps the path cut. Capture appliances fail
        /// open, others closed.
        #[arg(long)]
        fail: Option<vroom_types::FailMode>,
        /// The created appliance's name (VM-IMAGE by default).
        #[arg(long)]
        name: Option<vroom_types::Name>,
        /// Seconds the appliance has to become ready.
        #[arg(long)]
        timeout: Option<u64>,
    },
    /// Take a spliced appliance out of the path (the VM's NIC goes back where
    /// it was) and remove it, or stop it if it existed before the splice.
    Unsplice {
        /// The spliced appliance's instance name.
        appliance: String,
    },
    /// List splices, their state and last event.
    Splices,
    /// Data volumes: persistent disks instances mount.
    Volume {
        #[command(subcommand)]
        op: VolumeOp,
    },
    /// Server rooms: per-tenant networks behind a firewall.
    Room {
        #[command(subcommand)]
        op: RoomOp,
    },
    /// Services: members of one image behind a load balancer (the `lb`
    /// appliance), kept at their number: a failed member is replaced.
    Service {
        #[command(subcommand)]
        op: ServiceOp,
    },
    /// Networks, instances with NIC roles and addresses, splices, mirrors
    /// and exposed ports.
    Topology {
        /// Only this room.
        room: Option<String>,
        /// text, dot (Graphviz), svg (through Graphviz's dot) or json.
        #[arg(long, value_enum, default_value = "text")]
        format: TopologyFormat,
    },
    /// Stream a live pcap from a sniffer (inline or fed by a mirror) to
    /// stdout: `vroom capture snf | tshark -r -`.
    Capture {
        /// The sniffer's instance name.
        name: String,
        /// A pcap-filter expression.
        #[arg(long)]
        filter: Option<String>,
        /// Stop after this many packets.
        #[arg(long, short = 'c')]
        count: Option<u64>,
    },
    /// Copy a VM NIC's traffic, both directions, to a capture appliance
    /// (tc mirred from the VM's tap; the VM's path is unchanged).
    Mirror {
        /// The VM and its NIC (a role or an index from 0; the first NIC by default).
        #[arg(value_name = "VM[:NIC]")]
        source: vroom_types::NicRef,
        /// The capture appliance and its sink NIC.
        #[arg(long, value_name = "APPLIANCE[:NIC]")]
        to: vroom_types::NicRef,
        /// A pcap-filter expression: only matching frames are copied.
        #[arg(long, value_name = "BPF")]
        filter: Option<String>,
    },
    /// Stop mirroring a VM's NIC (to one appliance with --to).
    Unmirror {
        /// The VM and its NIC (all its NICs when absent).
        #[arg(value_name = "VM[:NIC]")]
        source: vroom_types::NicRef,
        /// Only the mirror to this appliance.
        #[arg(long)]
        to: Option<vroom_types::Name>,
    },
    /// Run the end-to-end demo: a network, the hello appliance, a config change.
    Demo {
        /// Leave the demo running instead of cleaning up.
        #[arg(long)]
        keep: bool,
    },
    /// vroom's own guest kernel, which new images are built for and boot
    /// (Debian's until it is built): build it, list the kernels.
    Kernel {
        #[command(subcommand)]
        op: KernelOp,
    },
    /// Benchmarks.
    #[command(disable_help_flag = true)]
    Bench {
        /// The benchmark and its options (`vroom bench --help` lists them),
        /// run by vroom-bench, which is built beside vroom.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<std::ffi::OsString>,
    },
    /// Internal: the jailer vroomd runs to start one QEMU.
    #[command(name = "__jail", hide = true)]
    Jail {
        /// The jail spec (jail.json in the instance's run dir).
        spec: PathBuf,
    },
}

/// How `vroom daemon` joins a cluster.
#[derive(clap::Args, Clone)]
pub struct ClusterArgs {
    /// Join a cluster (needs --etcd, --node and --advertise).
    #[arg(long, requires_all = ["etcd", "node", "advertise"])]
    pub cluster: bool,
    /// The cluster's etcd endpoints, comma-separated (http://HOST:PORT,...).
    #[arg(long, env = "VROOM_ETCD", value_delimiter = ',')]
    pub etcd: Vec<String>,
    /// This host's node name: lowercase letters, digits and dashes.
    #[arg(long)]
    pub node: Option<Name>,
    /// The address peers and clients reach this node at.
    #[arg(long)]
    pub advertise: Option<String>,
    /// Refuse to join a cluster with another id.
    #[arg(long)]
    pub cluster_id: Option<String>,
}

#[derive(Subcommand)]
pub enum ClusterOp {
    /// Write a new cluster's identity and its CA into etcd (refused if one
    /// is there).
    Init {
        /// etcd endpoints, comma-separated.
        #[arg(long, env = "VROOM_ETCD", value_delimiter = ',', required = true)]
        etcd: Vec<String>,
    },
    /// Issue a client certificate from the cluster's CA, for `--host` from
    /// a host that is not a node.
    Credentials {
        /// etcd endpoints, comma-separated.
        #[arg(long, env = "VROOM_ETCD", value_delimiter = ',', required = true)]
        etcd: Vec<String>,
        /// Where to write ca.pem, cert.pem and key.pem.
        #[arg(long)]
        out: PathBuf,
        /// The certificate's name.
        #[arg(long, default_value = "client")]
        name: Name,
    },
}

#[derive(Subcommand)]
pub enum NodeOp {
    /// List the cluster's nodes with liveness, memory and instances.
    Ls,
    /// Show one node.
    Inspect {
        /// The node's name.
        name: Name,
    },
    /// Place no new instance on the node.
    Cordon {
        /// The node's name.
        name: Name,
    },
    /// Let the scheduler use the node again.
    Uncordon {
        /// The node's name.
        name: Name,
    },
    /// Cordon the node and move every instance it runs to other nodes.
    /// Refused, changing nothing, when an instance has no node to go to.
    Drain {
        /// The node's name.
        name: Name,
        /// Leave the instances no other node can take running on the node
        /// (it is cordoned) instead of refusing.
        #[arg(long)]
        force: bool,
    },
    /// Forget a node that is down and holds no instance.
    Rm {
        /// The node's name.
        name: Name,
    },
}

#[derive(clap::Args)]
pub struct RunArgs {
    /// Image name or id (a catalog image is built on first use).
    #[arg(required_unless_present = "from_snapshot")]
    pub image: Option<String>,
    /// The new instance's name: lowercase letters, digits and dashes.
    #[arg(long)]
    pub name: vroom_types::Name,
    /// Guest memory, e.g. 128M or 1G (the image's default when absent).
    #[arg(long, value_parser = parse_mem_mib)]
    pub mem: Option<u64>,
    /// Virtual CPUs.
    #[arg(long, default_value_t = 1, value_parser = vroom_types::limits::parse_cpus)]
    pub cpus: u32,
    /// Attach a NIC to a network: [ROLE=]NET[:IP], e.g. `wan=uplink` or
    /// `lan=office:10.0.0.1`. Repeatable; NICs without a role take the
    /// image's remaining roles in order.
    #[arg(long = "net")]
    pub nets: Vec<NicSpec>,
    /// Accelerator: kvm where the CPU has vmx/svm, tcg (emulation) otherwise.
    #[arg(long, default_value = "auto")]
    pub accel: AccelChoice,
    /// Seconds the guest has to report ready (1 to 3600).
    #[arg(long, default_value_t = vroom_core::engine::DEFAULT_READY_TIMEOUT_SECS,
        value_parser = vroom_types::limits::parse_ready_timeout_secs)]
    pub timeout: u64,
    /// Size of the config volume in KiB (64 to 65536).
    #[arg(long, value_parser = vroom_types::limits::parse_config_volume_kib)]
    pub config_size: Option<u32>,
    /// Start from this snapshot instead of booting: a clone with its own
    /// identity and the snapshot's config (see `vroom clone`).
    #[arg(long, value_name = "SNAPSHOT", conflicts_with_all = ["image", "cold"])]
    pub from_snapshot: Option<Name>,
    /// Boot, even when a warm snapshot of the image (`image warm`) fits.
    #[arg(long)]
    pub cold: bool,
    /// Every start is a clean slate: the config volume returns to the
    /// config the instance was created with, and what the guest wrote is
    /// discarded when it stops.
    #[arg(long)]
    pub ephemeral: bool,
    /// Attach a data volume: NAME:/path or NAME:/path:ro. Repeatable. The
    /// image's declared volumes that are not named get `INSTANCE-ROLE`
    /// volumes, created when missing.
    #[arg(long = "volume", value_name = "NAME:/PATH[:ro]",
        value_parser = vroom_types::VolumeAttach::parse)]
    pub volumes: Vec<vroom_types::VolumeAttach>,
    /// Put the instance in this room (a NIC on its lan or dmz network; its
    /// name gets into the room's DNS).
    #[arg(long, requires = "segment")]
    pub room: Option<String>,
    /// The room's segment: lan or dmz.
    #[arg(long, requires = "room")]
    pub segment: Option<vroom_types::Segment>,
    /// Cluster: what happens when its node is lost (none, restart, standby).
    #[arg(long, default_value = "none")]
    pub ha: vroom_types::HaPolicy,
    /// Cluster: place instances of this group on different nodes.
    #[arg(long, value_name = "GROUP")]
    pub spread: Option<Name>,
    /// Cluster: run it on this node.
    #[arg(long, value_name = "NODE")]
    pub node: Option<Name>,
    /// An imported image's environment: KEY=VALUE, where KEY is one of its
    /// config keys (`vroom image inspect`) or the variable it feeds (e.g.
    /// `GREETING=hi`). Repeatable; `vroom config NAME set` changes it later.
    #[arg(long = "env", value_name = "KEY=VALUE", value_parser = parse_env)]
    pub env: Vec<(String, String)>,
}

#[derive(Subcommand)]
pub enum KernelOp {
    /// Build the kernel from Debian's `linux-source` package (downloaded and
    /// verified by apt) with `make tinyconfig` plus vroom's fragment,
    /// everything built in, into the kernel cache. Takes minutes; fast when
    /// that kernel (source version and options) is cached already.
    Build {
        /// Parallel make jobs (default: one per CPU).
        #[arg(long, short)]
        jobs: Option<usize>,
        /// A fragment to use instead of vroom's (`kernel/vroom.config`).
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
    },
    /// List the kernels in the cache.
    Ls,
}

#[derive(Subcommand)]
pub enum SnapshotOp {
    /// List snapshots with their sizes (the warm ones of images with --warm).
    Ls {
        /// The warm snapshots `run` starts images from.
        #[arg(long)]
        warm: bool,
    },
    /// Show one snapshot.
    Inspect {
        /// The snapshot's name.
        name: String,
    },
    /// Remove a snapshot, or with `--warm` the warm snapshots of an image.
    Rm {
        /// The snapshot's name, as `snapshot ls` (or `ls --warm`) shows it.
        name: String,
        /// Remove the warm snapshots named NAME (every shape of that
        /// image; NAME may also be the image's id): `run` boots it again.
        #[arg(long)]
        warm: bool,
    },
}

#[derive(Subcommand)]
pub enum ArchiveOp {
    /// Check an archive against its SHA256SUMS manifest; exits 1 on any
    /// missing, changed or unlisted file.
    Verify {
        /// The archive directory.
        dir: PathBuf,
    },
}

#[derive(Subcommand)]
pub enum VolumeOp {
    /// Create a volume: a sparse file on this host, formatted ext4. Attach
    /// it with `vroom run IMAGE --volume NAME:/path`.
    Create {
        /// The new volume's name.
        name: Name,
        /// Its size, e.g. 512M, 2G or 1T (16M to 16T); refused when the
        /// host's disk has less free space.
        #[arg(long, value_parser = vroom_types::parse_volume_size_mib)]
        size: u64,
        /// Copies on distinct nodes: 1, or 2 in a cluster.
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(1..=2))]
        replicas: u8,
        /// In a cluster: the node that keeps it (with 2 replicas, its
        /// primary copy); an instance using a volume with one copy runs
        /// there only. Default: the node asked.
        #[arg(long)]
        node: Option<Name>,
        /// In a cluster, with --replicas 2: the node that keeps the
        /// replica. Default: the one with the most free memory.
        #[arg(long)]
        replica_node: Option<Name>,
    },
    /// List volumes, their size, use of the host's disk and instance.
    Ls,
    /// Show one volume.
    Inspect {
        /// The volume's name.
        name: Name,
    },
    /// Remove a volume and its data; refused while an instance has it.
    Rm {
        /// The volume's name.
        name: Name,
    },
    /// Grow a volume; a running guest grows its filesystem at once, a
    /// stopped one when it next mounts it.
    Resize {
        /// The volume's name.
        name: Name,
        /// The new size, e.g. 4G; volumes only grow.
        #[arg(long, value_parser = vroom_types::parse_volume_size_mib)]
        size: u64,
    },
    /// Take a snapshot: a copy of the volume now (a running guest's
    /// filesystems are frozen and its CPUs paused for the copy).
    Snapshot {
        /// The volume's name.
        name: Name,
        /// The snapshot's name, unique among all volume snapshots
        /// (VOLUME-YYYYMMDD-HHMMSS when absent).
        #[arg(long = "name", value_name = "SNAPSHOT")]
        snapshot: Option<Name>,
    },
    /// Put a volume back to one of its snapshots (its instance stopped).
    Restore {
        /// The volume's name.
        name: Name,
        /// One of its snapshots.
        snapshot: Name,
    },
    /// Make a new volume NAME from a snapshot.
    Clone {
        /// A volume snapshot (`volume inspect` lists them).
        snapshot: Name,
        /// The new volume's name.
        name: Name,
    },
    /// Remove one of a volume's snapshots.
    SnapshotRm {
        /// The volume's name.
        name: Name,
        /// The snapshot to remove.
        snapshot: Name,
    },
    /// Serve a volume read-only over NBD (for nbdinfo, nbdcopy, qemu-img):
    /// one of its snapshots, or the volume itself when no instance runs
    /// with it (none may start with it until `unexport`).
    Export {
        /// The volume.
        name: Name,
        /// Serve this snapshot of the volume.
        #[arg(long)]
        snapshot: Option<Name>,
        /// unix:PATH or tcp:ADDR:PORT; a unix socket under the data dir when
        /// absent. TCP has no authentication or encryption: whoever reaches
        /// the port reads the volume.
        #[arg(long, value_name = "unix:PATH|tcp:ADDR:PORT")]
        listen: Option<String>,
    },
    /// End a volume's export (or drop an import cut short).
    Unexport {
        /// The volume.
        name: Name,
    },
    /// Back a volume up to FILE (qcow2 by default), with its SHA256 in
    /// FILE.sha256; a running instance's volume is snapshotted for it.
    Backup {
        /// The volume.
        name: Name,
        /// The file to write; it must not exist (nor FILE.sha256).
        file: PathBuf,
        /// Back up this snapshot of the volume.
        #[arg(long)]
        snapshot: Option<Name>,
        /// qcow2 (compact: only the data) or raw (sparse).
        #[arg(long, default_value = "qcow2", value_parser = ["qcow2", "raw"])]
        format: String,
    },
    /// Make volume NAME from FILE, a raw or qcow2 image of an ext4
    /// filesystem, checked against FILE.sha256 when it exists.
    Import {
        /// The new volume's name.
        name: Name,
        /// The image to read.
        file: PathBuf,
    },
}

#[derive(Subcommand)]
pub enum ServiceOp {
    /// Create a service: its balancer NAME-lb and its members NAME-1, NAME-2...
    /// Returns once they run and the balancer lists them.
    Create {
        /// At most 24 characters.
        name: Name,
        /// The members' image.
        #[arg(long)]
        image: String,
        /// How many members: N, or MIN..MAX for the autoscaler (with
        /// --slo or --target-cpu); it starts with MIN.
        #[arg(long, default_value = "2", value_parser = vroom_types::parse_replicas)]
        replicas: (u32, Option<u32>),
        /// The network of the members and the balancer (`default` when
        /// neither --net nor --room is given).
        #[arg(long, conflicts_with = "room")]
        net: Option<Name>,
        /// The room whose lan the members and the balancer are on.
        #[arg(long)]
        room: Option<Name>,
        /// The port the members serve and the balancer listens on.
        #[arg(long, default_value_t = 80)]
        port: u16,
        /// Scale to keep the 95th percentile latency under a target, e.g.
        /// `p95<50ms` (measured at the balancer).
        #[arg(long, conflicts_with = "target_cpu")]
        slo: Option<vroom_types::ScaleTarget>,
        /// Scale to keep the members' average CPU under a target, e.g. `60%`.
        #[arg(long)]
        target_cpu: Option<vroom_types::ScaleTarget>,
        /// Members boot; by default they start from the image's warm
        /// snapshot (made once, in the background, if it has none).
        #[arg(long)]
        cold: bool,
    },
    /// List services.
    Ls,
    /// Show a service: its address, balancer, members, load and the
    /// autoscaler's recent decisions.
    Inspect {
        /// The service's name.
        name: String,
    },
    /// Set the number of members (N), or the autoscaler's bounds
    /// (MIN..MAX); returns once the service has it.
    Scale {
        /// The service's name.
        name: String,
        /// N or MIN..MAX (1 to 64).
        #[arg(value_parser = vroom_types::parse_replicas)]
        replicas: (u32, Option<u32>),
    },
    /// Replace the members with members of another image, one at a time,
    /// without a failed request; a new member that fails rolls it back.
    /// Returns once done (or rolled back).
    Update {
        /// The service's name.
        name: String,
        /// The new image.
        #[arg(long)]
        image: String,
    },
    /// Remove a service: its members, its balancer, then itself.
    Rm {
        /// The service's name.
        name: String,
    },
}

#[derive(Subcommand)]
pub enum RoomOp {
    /// Create a room: networks NAME-lan and NAME-dmz, a firewall NAME-fw with
    /// NAT, DHCP and DNS on lan.
    Create {
        /// At most 28 characters.
        name: Name,
        /// The network of the firewall's wan NIC (`default` when absent).
        #[arg(long)]
        wan: Option<Name>,
        /// A network's subnet, `ROLE=CIDR` with ROLE wan, lan or dmz
        /// (repeatable): lan and dmz get it, wan's network must have it (or
        /// `default` is made with it). Free /24s when absent.
        #[arg(long = "subnet", value_name = "ROLE=CIDR")]
        subnets: Vec<String>,
    },
    /// Create or converge a room from a TOML file; shows what it changes.
    Apply {
        /// The room file (TOML; see docs/rooms.md).
        file: PathBuf,
        /// Only show what would change.
        #[arg(long)]
        dry_run: bool,
    },
    /// List rooms.
    Ls,
    /// Show a room: its firewall, networks, instances and exposes.
    Inspect {
        /// The room's name.
        name: String,
    },
    /// Remove a room; refused while it has instances unless --force.
    Rm {
        /// The room's name.
        name: String,
        /// Remove its instances too (unsplicing what is spliced in front of them).
        #[arg(long, short)]
        force: bool,
    },
    /// Forward a port of the firewall's wan address to a room instance.
    Expose {
        /// The room's name.
        name: String,
        /// The port on the firewall's wan address; the instance's port when absent.
        #[arg(long)]
        port: Option<u16>,
        /// INSTANCE:PORT, or INSTANCE of an imported image: its lowest
        /// exposed port of the protocol (`vroom image inspect`).
        #[arg(long, value_name = "INSTANCE[:PORT]")]
        to: String,
        /// tcp or udp.
        #[arg(long, default_value = "tcp", value_parser = parse_proto)]
        proto: vroom_types::Protocol,
    },
    /// Remove a port forward.
    Unexpose {
        /// The room's name.
        name: String,
        /// The exposed port.
        #[arg(long)]
        port: u16,
        /// tcp or udp.
        #[arg(long, default_value = "tcp", value_parser = parse_proto)]
        proto: vroom_types::Protocol,
    },
}

#[derive(Clone, Copy, clap::ValueEnum)]
pub enum TopologyFormat {
    Text,
    Dot,
    Svg,
    Json,
}

#[derive(Subcommand)]
pub enum ConfigOp {
    /// Print the config, or one key's value.
    Get {
        /// One key; all of them when absent.
        key: Option<String>,
    },
    /// Set KEY=VALUE pairs (applied live on a running instance).
    Set {
        /// KEY=VALUE pairs.
        #[arg(required = true, value_parser = vroom_types::parse_assignment)]
        pairs: Vec<(String, String)>,
    },
    /// Restore the image's factory config.
    Reset,
    /// Write the config to a JSON file, or to stdout with `-`.
    Export {
        /// The file to write; `-` for stdout.
        file: PathBuf,
    },
    /// Replace the whole config with a JSON file written by `export` (`-` reads stdin); every key must be set.
    Import {
        /// The file to read; `-` for stdin (at most 1 MiB).
        file: PathBuf,
    },
    /// List the config versions kept: version, time, origin and keys changed.
    History,
    /// Show what changed between two versions: by default the previous one and the current one.
    Diff {
        /// The older version; by default the one before V2.
        v1: Option<u64>,
        /// The newer version; by default the current one.
        v2: Option<u64>,
    },
    /// Restore an earlier version's values, as a new version checked like any change.
    Rollback {
        /// The version to restore; by default the previous one.
        version: Option<u64>,
    },
}

#[derive(Subcommand)]
pub enum NetOp {
    /// Create a network: a bridge on this host or, in a cluster, one
    /// network of the cluster whose bridge each node makes when it runs an
    /// instance on it (one subnet and gateway everywhere).
    Create {
        /// The network's name.
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
        /// Let the guests reach this port of the host on the network's
        /// gateway: PORT, PORT/tcp or PORT/udp; repeatable. By default they
        /// reach no host service at all.
        #[arg(long, value_name = "PORT[/udp]", conflicts_with = "isolated")]
        allow_host: Vec<vroom_types::HostPort>,
    },
    /// List networks.
    Ls,
    /// Show one network.
    Inspect {
        /// The network's name.
        name: String,
    },
    /// Remove a network no instance uses.
    Rm {
        /// The network's name.
        name: String,
    },
}

#[derive(Subcommand)]
pub enum ImageOp {
    /// Boot an image once with its default config, wait until it is ready
    /// and keep a warm snapshot of it: `vroom run` of that image (same
    /// memory, CPUs and NICs) then starts from it instead of booting.
    Warm {
        /// Image name or id (a catalog image is built first).
        image: String,
        /// The memory of the instances that will start from it (the
        /// image's default when absent).
        #[arg(long, value_parser = parse_mem_mib)]
        mem: Option<u64>,
    },
    /// Build an image from a recipe (a recipe.toml or its directory).
    Build {
        /// A recipe.toml, its directory, or the name of a catalog recipe.
        recipe: PathBuf,
        /// Refresh the package indexes first (security updates) and list the
        /// packages that changed.
        #[arg(long)]
        update: bool,
        /// The guest kernel: `vroom` (vroom's own: everything built in, boots
        /// in 64 MiB), `debian` (Debian's cloud kernel, with its modules), or
        /// a kernel id from `vroom kernel ls`. Default: vroom's once `vroom
        /// kernel build` (which `vroom setup` starts) has built it, Debian's
        /// until then.
        #[arg(long, value_name = "KERNEL")]
        kernel: Option<String>,
    },
    /// Import an OCI image as an appliance image: its entrypoint becomes a
    /// supervised service, its first exposed TCP port the health check.
    Import {
        /// `oci:DIR[:TAG]` (an OCI layout), `oci-archive:FILE`,
        /// `docker-archive:FILE` (`docker save` output) or
        /// `docker://HOST[:PORT]/REPO[:TAG|@sha256:...]` (a registry).
        reference: String,
        /// The image's name (default: the repository's or file's last part).
        #[arg(long)]
        name: Option<vroom_types::Name>,
        /// Allow plain HTTP to a registry on a loopback or private address.
        #[arg(long)]
        insecure: bool,
        /// The guest kernel, as for `image build`.
        #[arg(long, value_name = "KERNEL")]
        kernel: Option<String>,
    },
    /// List images.
    Ls,
    /// Show an image's manifest.
    Inspect {
        /// Image name (its newest build) or id.
        image: String,
    },
    /// List the exact Debian packages in an image (its SBOM).
    Sbom {
        /// Image name (its newest build) or id.
        image: String,
    },
    /// Remove an image no instance uses.
    Rm {
        /// Image name (its newest build) or id.
        image: String,
    },
    /// Remove the older builds that no name points to and no instance uses.
    Prune,
}

#[derive(Subcommand)]
pub enum DaemonOp {
    /// Stop the running vroomd gracefully; its VMs keep running.
    Stop {
        /// Only if the CLI started it (the package's install hands the data
        /// dir over to the systemd unit this way).
        #[arg(long)]
        self_started: bool,
    },
}

/// Parses `KEY=VALUE` of `run --env` (the daemon resolves the key).
pub fn parse_env(raw: &str) -> Result<(String, String), String> {
    match raw.split_once('=') {
        Some((key, value)) if !key.is_empty() => {
            vroom_types::validate_config_value(key, value).map_err(|e| e.to_string())?;
            Ok((key.to_string(), value.to_string()))
        }
        _ => Err(format!("invalid env {raw:?}: use KEY=VALUE")),
    }
}

/// Parses `tcp` or `udp`.
pub fn parse_proto(raw: &str) -> Result<Protocol, String> {
    match raw {
        "tcp" => Ok(Protocol::Tcp),
        "udp" => Ok(Protocol::Udp),
        _ => Err(format!("invalid protocol {raw:?}: tcp or udp")),
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    /// Every subcommand and every argument explains itself in `--help`.
    #[test]
    fn every_command_and_argument_has_help() {
        fn walk(cmd: &clap::Command, path: &str, missing: &mut Vec<String>) {
            for arg in cmd.get_arguments() {
                let builtin = matches!(arg.get_id().as_str(), "help" | "version");
                if !builtin && arg.get_help().is_none() {
                    missing.push(format!("{path} {}", arg.get_id()));
                }
            }
            for sub in cmd.get_subcommands() {
                if sub.get_about().is_none() {
                    missing.push(format!("{path} {} (command)", sub.get_name()));
                }
                walk(sub, &format!("{path} {}", sub.get_name()), missing);
            }
        }
        let mut missing = vec![];
        walk(&super::Cli::command(), "vroom", &mut missing);
        assert!(missing.is_empty(), "no help text: {missing:#?}");
        super::Cli::command().debug_assert();
    }
}
