//! Live migration between nodes.
//!
//! Any node may ask: it checks the request and writes a
//! [`MigrationRecord`] (bound to its own lease) naming the owner's fencing
//! token and a secret. The owner (`from`) picks it up in its pass and
//! connects to the destination's peer port twice. The steps:
//!
//! 1. control connection (JSON lines): the destination checks the
//!    migration against etcd, creates the instance with its identity,
//!    launches its VMM waiting for a state, and answers `ready`;
//! 2. data connection, which each side hands straight to its QEMU
//!    (`getfd`): QEMU migrates over it while the guest runs;
//! 3. once the source's QEMU has finished (its VM paused for good), the
//!    source sends the config volume's bytes and QEMU's numbers over the
//!    control connection;
//! 4. takeover: the destination writes the volume in place and takes
//!    ownership in one transaction that also voids the source's token (the
//!    owner key's mod revision); the migration record stays `requested`;
//! 5. the destination lets its VM run, then verifies it: the guest must
//!    answer its agent (and pass its health check, if it did on the
//!    source: the control hello says) within [`ANSWER_WITHIN`] (it was
//!    running a moment ago), and still run and answer so [`ANSWER_SETTLE`]
//!    later (polled, within [`ANSWER_WITHIN`] again);
//! 6. verified: the destination records the migration `switched` (fenced
//!    on its takeover) and answers `resumed`; the source drops its paused
//!    copy and records it `done`;
//! 7. not verified: the destination kills its VM and removes the instance,
//!    then, unless the source hung up, gives ownership back in one
//!    transaction fenced on its takeover's revision and on the source's
//!    lease (the owner key names the source again, under the source's
//!    lease; the instance record is restored), then takes out its splices
//!    and answers `failed`. The source resumes its paused copy and records
//!    the migration `failed`, so `vroom migrate` fails and says why and
//!    where the instance runs. A destination that cannot give it back (the
//!    source hung up or is gone) records the migration `failed`, keeps
//!    owning the instance and starts it by its policy.
//!
//! After the stream, whatever happened, the source decides by the owner
//! key: if it names the source, the source rewrites it (which voids any
//! takeover still in flight) and its VM runs on. Otherwise the destination
//! has it; if its answer did not come in time (the destination is alive
//! but silent), the source keeps its paused copy while the destination
//! owns the instance and the migration is still `requested` (a give-back
//! may still come), up to [`DECISION_WAIT`], then records the migration
//! `failed` if nobody did. A destination that hung up gives nothing back
//! (it gives back only over an open control connection), so then the
//! paused copy goes at once: kept, it would sit beside the VM the
//! destination's new vroomd boots. A destination whose
//! vroomd restarted after its takeover (no receive under way, the
//! instance its own, the migration `requested`) records it `failed`: its
//! new vroomd boots the instance cold, which is no live move. Until the
//! source has decided it keeps its paused copy, even when its pass sees
//! another owner.

use std::io::{BufRead, Read, Write};
use std::net::{IpAddr, SocketAddr};
use std::os::fd::OwnedFd;
use std::time::Instant;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use vroom_core::console::{ConsoleHistory, SEGMENT_BYTES};
use vroom_core::{LiveIncoming, LiveOutgoing};
use vroom_types::Migration;

use super::*;

/// The TCP port a node's peers connect to, on its advertised address.
pub const PEER_PORT: u16 = 7947;
/// How long `vroom migrate` waits for the move.
const MIGRATE_TIMEOUT: Duration = Duration::from_secs(120);
/// How long a peer may take for a step of the protocol (launching the
/// destination's VMM, then streaming).
const STEP_TIMEOUT: Duration = Duration::from_secs(60);
const HELLO_MAX: usize = 4096;
/// How long a migrated guest has, once it runs on the destination, to
/// answer its agent and pass its health check. It was running a moment
/// ago; this only allows for a loaded host.
pub const ANSWER_WITHIN: Duration = Duration::from_secs(10);
/// How long after its first answer a migrated guest must still run and
/// answer: guests whose memory the move corrupted (QEMU 7.2's TCG loses
/// pages a vCPU dirties during a live copy on a loaded host) answered once
/// and panicked about 2 s later. The source keeps its paused copy until
/// then; the guest's pause is not longer for it.
pub const ANSWER_SETTLE: Duration = Duration::from_secs(3);
/// How long a source whose destination's answer did not come keeps its
/// paused copy while the destination owns the instance and the migration
/// is still `requested`: the destination may still be checking its guest
/// (up to [`ANSWER_WITHIN`] and [`ANSWER_SETTLE`]) and then give it back,
/// or have restarted and be about to say it has it.
const DECISION_WAIT: Duration = Duration::from_secs(30);
/// How a source's error says that the destination hung up.
const WENT_AWAY: &str = "went away during the migration";

/// What the destination's takeover changed, for the switch or the give-back.
#[derive(Debug, Clone)]
struct Taken {
    /// The takeover's revision: the owner key's mod revision after it.
    revision: i64,
    /// The instance record before the takeover.
    instance: InstanceRecord,
    /// The migration record's mod revision (the takeover left it as it was).
    migration_rev: i64,
    downtime_ms: u64,
    bytes: u64,
    /// When the takeover was done.
    at: Instant,
}

/// The revisions of an incoming instance's config and wiring records as
/// the destination read them (0: none); its takeover requires them still.
#[derive(Debug, Clone, Copy)]
struct Seen {
    config: i64,
    wiring: i64,
}

/// The first line of a peer connection.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
enum Hello {
    Control {
        instance: String,
        migration: String,
        secret: String,
        /// Whether the guest passed its health check on the source: the
        /// destination requires only what the source showed.
        #[serde(default = "yes")]
        ready: bool,
    },
    Data {
        migration: String,
        secret: String,
    },
    /// A peer lacks an image: its files, by id.
    Image {
        id: String,
    },
}

/// The answer to [`Hello::Image`]: a header line, then the manifest's bytes,
/// then each file's.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
enum ImageReply {
    Image {
        manifest: u64,
        files: Vec<(String, u64)>,
    },
    Missing,
}

/// How long fetching (or sending) one image may take.
const FETCH_TIMEOUT: Duration = Duration::from_secs(600);
/// The largest image file a peer is trusted to send.
const MAX_IMAGE_FILE: u64 = 8 << 30;

/// The lines of a control connection.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
enum Control {
    /// Destination: the VMM waits for the data connection.
    Ready,
    /// Destination: it will not take the instance.
    Refused { reason: String },
    /// Source: the VM paused for good; `bytes` of config volume follow.
    Volume {
        bytes: u64,
        downtime_ms: u64,
        ram_bytes: u64,
    },
    /// Source: the stream failed; the VM runs on at the source.
    Abort { reason: String },
    /// Destination: it owns the instance, its VM runs and its guest
    /// answered; `checked_ms` of the wait were spent after the takeover
    /// (the guest ran; the source's copy waited for the check).
    Resumed {
        #[serde(default)]
        checked_ms: u64,
    },
    /// Destination: it gave up (and did not take ownership).
    Failed { reason: String },
    /// Source, after `resumed`: the console history follows, the earlier
    /// boots' bytes then the current boot's, so `vroom logs` on the
    /// destination shows the whole boot. Outside the switch-over: the
    /// guest already runs there. An older peer neither sends nor reads it.
    Console {
        earlier: Vec<u64>,
        current: u64,
        written: u64,
    },
}

/// How long the destination waits for the console history after `resumed`.
const CONSOLE_WAIT: Duration = Duration::from_secs(10);

fn yes() -> bool {
    true
}

fn line<T: Serialize>(value: &T) -> Vec<u8> {
    let mut bytes = json(value);
    bytes.push(b'\n');
    bytes
}

fn secret() -> String {
    format!("{:032x}", rand::random::<u128>())
}

/// Reads one line byte by byte: on a data connection, what follows belongs
/// to QEMU and must stay in the socket.
async fn read_hello(stream: &mut TcpStream) -> std::io::Result<Hello> {
    let mut bytes = vec![];
    loop {
        let b = stream.read_u8().await?;
        if b == b'\n' {
            break;
        }
        bytes.push(b);
        if bytes.len() > HELLO_MAX {
            return Err(std::io::Error::other("the hello line is too long"));
        }
    }
    serde_json::from_slice(&bytes).map_err(std::io::Error::other)
}

fn into_blocking(stream: TcpStream) -> std::io::Result<std::net::TcpStream> {
    let stream = stream.into_std()?;
    stream.set_nonblocking(false)?;
    Ok(stream)
}

/// A pending incoming migration's data connection, once it arrives.
pub(super) type DataSlot = std::sync::mpsc::SyncSender<std::net::TcpStream>;

impl ClusterNode {
    /// Where this node listens for its peers.
    pub(super) fn peer_addr(&self) -> SocketAddr {
        let ip = advertised_ip(&self.advertise)
            .map(IpAddr::V4)
            .unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED));
        SocketAddr::new(ip, PEER_PORT)
    }

    pub(super) async fn bind_peers(&self) -> Result<TcpListener, String> {
        let addr = self.peer_addr();
        TcpListener::bind(addr)
            .await
            .map_err(|e| format!("cannot listen for peers on {addr}: {e}"))
    }

    /// Accepts peer connections: migrations coming in.
    pub(super) async fn serve_peers(self: Arc<Self>, listener: TcpListener) {
        loop {
            let (mut stream, peer) = match listener.accept().await {
                Ok(accepted) => accepted,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot accept a peer connection");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let node = self.clone();
            tokio::spawn(async move {
                let hello = match tokio::time::timeout(
                    Duration::from_secs(5),
                    read_hello(&mut stream),
                )
                .await
                {
                    Ok(Ok(hello)) => hello,
                    Ok(Err(e)) => {
                        tracing::warn!(%peer, error = %e, "dropping a peer connection that did not say hello");
                        return;
                    }
                    Err(_) => return,
                };
                match hello {
                    Hello::Data { migration, secret } => {
                        node.data_arrived(&migration, &secret, stream)
                    }
                    Hello::Image { id } => node.send_image(stream, &id).await,
                    Hello::Control {
                        instance,
                        migration,
                        secret,
                        ready,
                    } => {
                        node.receive_migration(stream, &instance, (&migration, &secret), ready)
                            .await
                    }
                }
            });
        }
    }

    /// Sends image `id` to a peer that lacks it (it checks the digests).
    async fn send_image(&self, mut stream: TcpStream, id: &str) {
        let export = match self.engine.export_image(id) {
            Ok(export) => export,
            Err(_) => {
                let _ = stream.write_all(&line(&ImageReply::Missing)).await;
                return;
            }
        };
        let mut files = vec![];
        for (name, path) in &export.files {
            match tokio::fs::File::open(path).await {
                Ok(file) => {
                    let len = file.metadata().await.map(|m| m.len()).unwrap_or(0);
                    files.push((name.clone(), len, file));
                }
                Err(_) => {
                    let _ = stream.write_all(&line(&ImageReply::Missing)).await;
                    return;
                }
            }
        }
        let header = ImageReply::Image {
            manifest: export.manifest.len() as u64,
            files: files.iter().map(|(n, l, _)| (n.clone(), *l)).collect(),
        };
        let sent = async {
            stream.write_all(&line(&header)).await?;
            stream.write_all(&export.manifest).await?;
            for (_, len, file) in files {
                let copied = tokio::io::copy(&mut file.take(len), &mut stream).await?;
                if copied != len {
                    return Err(std::io::Error::other("the file shrank while it was sent"));
                }
            }
            stream.flush().await
        };
        match tokio::time::timeout(FETCH_TIMEOUT, sent).await {
            Ok(Ok(())) => tracing::info!(image = %id, "sent an image to a peer"),
            Ok(Err(e)) => tracing::warn!(image = %id, error = %e, "cannot send an image to a peer"),
            Err(_) => tracing::warn!(image = %id, "gave up sending an image to a slow peer"),
        }
    }

    /// Makes sure image `reference` is here: an image id this node lacks is
    /// fetched from a live peer and checked against its id; a name is left
    /// to the engine (it builds a catalog image on first use).
    pub(super) async fn ensure_image(&self, reference: &str) -> Result<(), OpError> {
        let is_id = reference.len() == 64 && reference.bytes().all(|b| b.is_ascii_hexdigit());
        if !is_id || self.engine.get_image(reference).is_ok() {
            return Ok(());
        }
        let view = self.view().await?;
        let mut reasons = vec![];
        for (name, (node, _)) in &view.nodes {
            let Some(peer) = node.peer.as_ref().filter(|_| *name != self.name) else {
                continue;
            };
            let fetched = tokio::time::timeout(FETCH_TIMEOUT, self.fetch_image(reference, peer))
                .await
                .unwrap_or_else(|_| Err(format!("no whole image in {FETCH_TIMEOUT:?}")));
            match fetched {
                Ok(true) => {
                    tracing::info!(image = %reference, from = %name, "fetched an image from a peer");
                    return Ok(());
                }
                Ok(false) => {}
                Err(e) => reasons.push(format!("{name}: {e}")),
            }
        }
        Err(OpError::conflict(format!(
            "image {} is on no live node{}",
            &reference[..12],
            if reasons.is_empty() {
                String::new()
            } else {
                format!(" that could send it ({})", reasons.join("; "))
            }
        )))
    }

    /// Fetches image `id` from `peer`: `Ok(false)` when it does not have it.
    async fn fetch_image(&self, id: &str, peer: &str) -> Result<bool, String> {
        let mut stream =
            match tokio::time::timeout(Duration::from_secs(3), TcpStream::connect(peer)).await {
                Ok(Ok(stream)) => stream,
                Ok(Err(e)) => return Err(format!("cannot reach {peer}: {e}")),
                Err(_) => return Err(format!("cannot reach {peer}: timed out")),
            };
        let hello = Hello::Image { id: id.to_string() };
        stream
            .write_all(&line(&hello))
            .await
            .map_err(|e| e.to_string())?;
        let mut reader = tokio::io::BufReader::new(stream);
        let mut header = String::new();
        tokio::time::timeout(STEP_TIMEOUT, reader.read_line(&mut header))
            .await
            .map_err(|_| "no answer".to_string())?
            .map_err(|e| e.to_string())?;
        let (manifest_len, files) = match serde_json::from_str(&header) {
            Ok(ImageReply::Image { manifest, files }) => (manifest, files),
            Ok(ImageReply::Missing) => return Ok(false),
            Err(e) => return Err(format!("an unreadable answer: {e}")),
        };
        if manifest_len > 1 << 20 {
            return Err("the manifest is implausibly large".into());
        }
        let mut manifest = vec![0; manifest_len as usize];
        reader
            .read_exact(&mut manifest)
            .await
            .map_err(|e| e.to_string())?;
        let dir = self.engine.image_receiving().map_err(|e| e.message)?;
        for (name, len) in files {
            if name.contains('/') || name.starts_with('.') || len > MAX_IMAGE_FILE {
                return Err(format!("a bad file in the answer: {name:?} ({len} bytes)"));
            }
            let mut file = tokio::fs::File::create(dir.path().join(&name))
                .await
                .map_err(|e| e.to_string())?;
            let copied = tokio::time::timeout(
                Duration::from_secs(600),
                tokio::io::copy(&mut (&mut reader).take(len), &mut file),
            )
            .await
            .map_err(|_| "the transfer took too long".to_string())?
            .map_err(|e| e.to_string())?;
            if copied != len {
                return Err(format!("{name} broke off after {copied} of {len} bytes"));
            }
            file.sync_all().await.map_err(|e| e.to_string())?;
        }
        self.engine
            .import_image(id, manifest, dir)
            .await
            .map_err(|e| e.message)?;
        Ok(true)
    }

    fn data_arrived(&self, migration: &str, secret: &str, stream: TcpStream) {
        let slot = lock(&self.incoming)
            .values()
            .find(|(id, s, _)| id == migration && s == secret)
            .map(|(_, _, slot)| slot.clone());
        match (slot, into_blocking(stream)) {
            (Some(slot), Ok(stream)) => {
                let _ = slot.try_send(stream);
            }
            _ => tracing::warn!(%migration, "dropping a data connection no migration waits for"),
        }
    }

    /// The destination's side: checks the migration against etcd, creates
    /// the instance from the stream, switches over.
    async fn receive_migration(
        &self,
        stream: TcpStream,
        name: &str,
        (migration, secret): (&str, &str),
        was_ready: bool,
    ) {
        let mut control = match into_blocking(stream) {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "cannot use a control connection");
                return;
            }
        };
        let refuse = |control: &mut std::net::TcpStream, reason: String| {
            tracing::warn!(instance = %name, %reason, "refused an incoming migration");
            let _ = control.write_all(&line(&Control::Refused { reason }));
        };
        let checked = self.check_incoming(name, migration, secret).await;
        let (record, config, from, config_rev) = match checked {
            Ok(checked) => checked,
            Err(reason) => return refuse(&mut control, reason),
        };
        for nic in &record.request.spec.nics {
            if let Err(e) = self.ensure_network(nic.network.as_str()).await {
                return refuse(&mut control, e.message);
            }
        }
        if let Err(e) = self.ensure_image(&record.request.spec.image).await {
            return refuse(&mut control, e.message);
        }
        // The overlay (and the gateway's shared MAC) before the guest runs
        // here: it keeps talking to the gateway it knew.
        if let Ok(view) = self.view().await {
            self.join_networks(&view).await;
        }
        if !self.begin_start(name) {
            return refuse(&mut control, format!("{} is busy with {name}", self.name));
        }
        // Its splices (appliances booted, in the path) before its VMM: the
        // VM's first packet here goes through them.
        let wiring_rev = match self.bring_wiring(name).await {
            Ok(revision) => revision,
            Err(e) => {
                self.end_start(name);
                return refuse(
                    &mut control,
                    format!("cannot bring its splices: {}", e.message),
                );
            }
        };
        let taken = Arc::new(Mutex::new(None));
        let (slot, data) = std::sync::mpsc::sync_channel(1);
        lock(&self.incoming).insert(
            name.to_string(),
            (migration.to_string(), secret.to_string(), slot),
        );
        let outcome = self
            .receive_into_engine(
                &control,
                name,
                migration,
                (record, config),
                Seen {
                    config: config_rev,
                    wiring: wiring_rev,
                },
                (&from, was_ready),
                data,
                taken.clone(),
            )
            .await;
        let taken = lock(&taken).take();
        let outcome = match (outcome, taken) {
            (Ok(()), Some(taken)) => {
                let switched = MigrationState::Switched {
                    downtime_ms: taken.downtime_ms,
                    bytes: taken.bytes,
                };
                self.record_migration(name, &taken, switched).await;
                Ok(taken.at.elapsed().as_millis() as u64)
            }
            // The guest did not make it here (the engine killed it and
            // removed the instance): the source's paused copy is the one,
            // given back before anything else here (the splices) takes
            // time. Not to a source that hung up: it stopped waiting, and
            // may have dropped its copy.
            (Err(reason), Some(taken)) => {
                let given = if closed(&control) {
                    Err(format!("node {from} stopped waiting for the answer"))
                } else {
                    self.give_back(name, &from, &taken).await
                };
                match given {
                    Ok(()) => Err(reason),
                    Err(e) => {
                        tracing::error!(instance = %name, %from, error = %e, "cannot give a failed migration back; the instance starts here instead");
                        let reason = format!(
                            "{reason}; cannot give it back to {from} ({e}), so it starts again on {}",
                            self.name
                        );
                        let failed = MigrationState::Failed {
                            reason: reason.clone(),
                        };
                        self.record_migration(name, &taken, failed).await;
                        Err(reason)
                    }
                }
            }
            (outcome, None) => outcome.map(|()| 0),
        };
        if outcome.is_err() {
            self.engine.drop_wiring(name).await;
        }
        // Only now: a pass cannot start it here while it is given back, nor
        // take the migration for one a restart cut short.
        lock(&self.incoming).remove(name);
        self.end_start(name);
        let reply = match outcome {
            Ok(checked_ms) => {
                tracing::info!(instance = %name, %from, checked_ms, "migrated here; the guest answers");
                Control::Resumed { checked_ms }
            }
            Err(reason) => {
                tracing::warn!(instance = %name, %from, %reason, "an incoming migration failed");
                Control::Failed { reason }
            }
        };
        let _ = control.write_all(&line(&reply));
        if matches!(reply, Control::Resumed { .. }) {
            self.receive_console(control, name, &from).await;
        }
    }

    /// After a migration in: the source's console history, put before what
    /// the guest wrote here. A source that sends none (an older one, or it
    /// failed) leaves the log as the guest wrote it here.
    async fn receive_console(&self, control: std::net::TcpStream, name: &str, from: &str) {
        let read = tokio::task::spawn_blocking(move || read_console(control)).await;
        let history = match read {
            Ok(Ok(Some(history))) => history,
            Ok(Ok(None)) => return,
            Ok(Err(e)) => {
                tracing::warn!(instance = %name, %from, error = %e, "the console history of a migrated instance did not come; its log starts here");
                return;
            }
            Err(_) => return,
        };
        if let Err(e) = self.engine.adopt_console(name, history) {
            tracing::warn!(instance = %name, error = %e.message, "cannot keep the console history of a migrated instance");
        }
    }

    /// Whether `migration` of `name` is one this node should take: returns
    /// the instance, its config and the source.
    async fn check_incoming(
        &self,
        name: &str,
        migration: &str,
        secret: &str,
    ) -> Result<(InstanceRecord, Option<ConfigValues>, String, i64), String> {
        let read = |e: StoreError| format!("cannot read the cluster: {e}");
        let (record, _) = self
            .store
            .get_json::<MigrationRecord>(&key(MIGRATIONS, name))
            .await
            .map_err(read)?
            .ok_or("no such migration")?;
        if record.id != migration || record.secret != secret {
            return Err("no such migration".into());
        }
        if record.to != self.name || record.state != MigrationState::Requested {
            return Err(format!("the migration is not for {} now", self.name));
        }
        if self.engine.get(name).is_ok() {
            return Err(format!(
                "{} already has an instance named {name}",
                self.name
            ));
        }
        let (instance, _) = self
            .store
            .get_json::<InstanceRecord>(&key(INSTANCES, name))
            .await
            .map_err(read)?
            .ok_or("the instance is gone")?;
        let (config, config_rev) = match self
            .store
            .get_json::<ConfigValues>(&key(CONFIGS, name))
            .await
            .map_err(read)?
        {
            Some((config, kv)) => (Some(config), kv.mod_revision),
            None => (None, 0),
        };
        Ok((instance, config, record.from, config_rev))
    }

    #[allow(clippy::too_many_arguments)]
    async fn receive_into_engine(
        &self,
        control: &std::net::TcpStream,
        name: &str,
        migration: &str,
        (record, config): (InstanceRecord, Option<ConfigValues>),
        seen: Seen,
        (from, was_ready): (&str, bool),
        data: std::sync::mpsc::Receiver<std::net::TcpStream>,
        taken: Arc<Mutex<Option<Taken>>>,
    ) -> Result<(), String> {
        let io = |e: std::io::Error| OpError::internal("the control connection", e);
        let mut ready = control.try_clone().map_err(|e| e.to_string())?;
        let mut reader = std::io::BufReader::new(control.try_clone().map_err(|e| e.to_string())?);
        control
            .set_read_timeout(Some(STEP_TIMEOUT))
            .map_err(|e| e.to_string())?;
        let from_ = from.to_string();
        let channel = Box::new(move || {
            ready.write_all(&line(&Control::Ready)).map_err(io)?;
            let waiting = Instant::now();
            loop {
                match data.recv_timeout(Duration::from_millis(100)) {
                    Ok(stream) => return Ok(OwnedFd::from(stream)),
                    Err(_) if closed(&ready) => {
                        return Err(OpError::conflict(format!(
                            "node {from_} went away before it streamed"
                        )))
                    }
                    Err(_) if waiting.elapsed() > STEP_TIMEOUT => {
                        return Err(OpError::conflict(
                            "the source did not open the data connection in time",
                        ))
                    }
                    Err(_) => {}
                }
            }
        });
        let node = self.arc();
        let (name_, migration_, from_) =
            (name.to_string(), migration.to_string(), from.to_string());
        let switch_over = Box::new(move |volume: &Path| {
            let mut header = String::new();
            reader.read_line(&mut header).map_err(io)?;
            let message: Control = serde_json::from_str(&header).map_err(|_| {
                OpError::conflict(format!("node {from_} went away during the migration"))
            })?;
            let (bytes, downtime_ms, ram_bytes) = match message {
                Control::Volume {
                    bytes,
                    downtime_ms,
                    ram_bytes,
                } => (bytes, downtime_ms, ram_bytes),
                Control::Abort { reason } => {
                    return Err(OpError::conflict(format!("node {from_}: {reason}")))
                }
                other => {
                    return Err(OpError::conflict(format!(
                        "node {from_} said {other:?} out of turn"
                    )))
                }
            };
            if bytes > 64 * 1024 * 1024 {
                return Err(OpError::conflict("the config volume is implausibly large"));
            }
            let mut content = vec![0; bytes as usize];
            reader.read_exact(&mut content).map_err(io)?;
            // In place: the VMM holds the file open.
            let mut file = std::fs::OpenOptions::new()
                .write(true)
                .open(volume)
                .map_err(|e| OpError::internal("failed to open the config volume", e))?;
            file.set_len(bytes)
                .and_then(|()| file.write_all(&content))
                .and_then(|()| file.sync_all())
                .map_err(|e| OpError::internal("failed to write the config volume", e))?;
            let took = tokio::runtime::Handle::current().block_on(node.take_over(
                &name_,
                &migration_,
                seen,
                downtime_ms,
                ram_bytes,
            ))?;
            *lock(&taken) = Some(took);
            Ok(())
        });
        let incoming = LiveIncoming {
            channel,
            switch_over,
            label: format!("migration from {from}"),
            answer_within: ANSWER_WITHIN,
            settle: ANSWER_SETTLE,
            was_ready,
        };
        let request = record.request.clone();
        self.engine
            .receive(
                request,
                Identity {
                    id: record.id.clone(),
                    config,
                    cluster: true,
                },
                incoming,
            )
            .await
            .map(|_| ())
            .map_err(|e| e.message)
    }

    /// The switch-over: ownership moves here in one transaction that
    /// checks the source still owns the instance under the migration's
    /// token and the migration still stands. The migration record is left
    /// `requested` until the guest answers here ([`Self::record_switch`]).
    async fn take_over(
        &self,
        name: &str,
        migration: &str,
        seen: Seen,
        downtime_ms: u64,
        bytes: u64,
    ) -> Result<Taken, OpError> {
        let read = |e| etcd_error("cannot read the cluster", e);
        let (record, mkv) = self
            .store
            .get_json::<MigrationRecord>(&key(MIGRATIONS, name))
            .await
            .map_err(read)?
            .filter(|(m, _)| m.id == migration && m.state == MigrationState::Requested)
            .ok_or_else(|| OpError::conflict("the migration was called off"))?;
        let (mut instance, ikv) = self
            .store
            .get_json::<InstanceRecord>(&key(INSTANCES, name))
            .await
            .map_err(read)?
            .ok_or_else(|| OpError::conflict("the instance was removed"))?;
        let before = instance.clone();
        instance.previous = instance.home.replace(self.name.clone());
        let owner = OwnerRecord {
            node: self.name.clone(),
            since: now_secs(),
        };
        let lease = self.lease();
        let txn = Txn::new()
            .when([
                Compare::mod_revision(key(OWNERS, name), record.token),
                Compare::mod_revision(mkv.key.clone(), mkv.mod_revision),
                Compare::mod_revision(ikv.key.clone(), ikv.mod_revision),
                Compare::lease(key(NODES, &self.name), lease),
                // Its config and splices as this node made them: a change
                // the source took after they were read keeps it there.
                Compare::mod_revision(key(CONFIGS, name), seen.config),
                Compare::mod_revision(key(WIRINGS, name), seen.wiring),
            ])
            .and_then([
                Op::put_leased(key(OWNERS, name), json(&owner), lease),
                Op::put(ikv.key.clone(), json(&instance)),
            ]);
        let response = self
            .store
            .txn(txn)
            .await
            .map_err(|e| etcd_error("cannot take the instance over", e))?;
        if !response.succeeded() {
            return Err(OpError::conflict(
                "the instance changed while it migrated; it stays where it was",
            ));
        }
        let revision = response.revision();
        self.note_handover(name, Handover::TookOver(revision));
        Ok(Taken {
            revision,
            instance: before,
            migration_rev: mkv.mod_revision,
            downtime_ms,
            bytes,
            at: Instant::now(),
        })
    }

    /// How a migration ended here after the takeover, while this node
    /// still owns the instance: `switched` once the guest answered (so a
    /// requester whose source dies now still learns that the move stands),
    /// or `failed` when it could not be given back. Best effort.
    async fn record_migration(&self, name: &str, taken: &Taken, state: MigrationState) {
        let mkey = key(MIGRATIONS, name);
        let Ok(Some((mut record, kv))) = self.store.get_json::<MigrationRecord>(&mkey).await else {
            return;
        };
        record.state = state;
        let txn = Txn::new()
            .when([
                Compare::mod_revision(mkey.clone(), taken.migration_rev),
                Compare::mod_revision(key(OWNERS, name), taken.revision),
            ])
            .and_then([Op::put_leased(mkey, json(&record), kv.lease)]);
        if !matches!(self.store.txn(txn).await, Ok(r) if r.succeeded()) {
            tracing::warn!(instance = %name, state = ?record.state, "cannot record how the migration ended");
        }
    }

    /// Gives instance `name` back to node `from` after a takeover whose
    /// guest did not answer here (its VM is gone already): the owner key
    /// names `from` again under `from`'s lease, and the instance record is
    /// as it was. Fenced on the takeover (nobody changed the owner key
    /// since) and on `from` still holding its lease; either failing leaves
    /// the instance with this node.
    async fn give_back(&self, name: &str, from: &str, taken: &Taken) -> Result<(), String> {
        let source = self
            .store
            .get_json::<NodeRecord>(&key(NODES, from))
            .await
            .map_err(|e| format!("cannot read the cluster: {e}"))?
            .ok_or_else(|| format!("node {from} is down"))?;
        let lease = source.1.lease;
        let owner = OwnerRecord {
            node: from.to_string(),
            since: now_secs(),
        };
        let txn = Txn::new()
            .when([
                Compare::mod_revision(key(OWNERS, name), taken.revision),
                Compare::mod_revision(key(INSTANCES, name), taken.revision),
                Compare::lease(key(NODES, from), lease),
            ])
            .and_then([
                Op::put_leased(key(OWNERS, name), json(&owner), lease),
                Op::put(key(INSTANCES, name), json(&taken.instance)),
            ]);
        let response = self
            .store
            .txn(txn)
            .await
            .map_err(|e| format!("cannot write the cluster: {e}"))?;
        if !response.succeeded() {
            return Err("the instance or its source changed meanwhile".into());
        }
        let revision = response.revision();
        self.note_handover(name, Handover::GaveBack(revision));
        tracing::warn!(instance = %name, %from, "gave a migrated instance back: its guest did not answer here");
        Ok(())
    }

    /// Keeps an instance after a migration out that did not hand it over:
    /// rewrites the owner key (same owner, this lease) if the token is
    /// still `token`, which voids the token a late takeover would compare.
    /// `Ok(false)`: another node owns it now.
    pub(super) async fn reclaim(&self, name: &str, token: i64) -> Result<bool, StoreError> {
        let lease = self.lease();
        let owner = OwnerRecord {
            node: self.name.clone(),
            since: now_secs(),
        };
        let txn = Txn::new()
            .when([
                Compare::mod_revision(key(OWNERS, name), token),
                Compare::lease(key(NODES, &self.name), lease),
            ])
            .and_then([Op::put_leased(key(OWNERS, name), json(&owner), lease)]);
        let response = self.store.txn(txn).await?;
        if !response.succeeded() {
            return Ok(false);
        }
        let revision = response.revision();
        lock(&self.owned).insert(name.to_string(), revision);
        Ok(true)
    }

    /// After a migration out: keeps instance `name` if its owner key names
    /// this node (it never moved, or the destination gave it back),
    /// rewriting the key under this node's lease. `Ok(false)`: another
    /// node has it.
    async fn keep(&self, name: &str) -> Result<bool, StoreError> {
        for _ in 0..3 {
            let Some((owner, kv)) = self
                .store
                .get_json::<OwnerRecord>(&key(OWNERS, name))
                .await?
            else {
                return Ok(false);
            };
            if owner.node != self.name {
                return Ok(false);
            }
            if self.reclaim(name, kv.mod_revision).await? {
                return Ok(true);
            }
            // Changed between the read and the rewrite: read it again.
        }
        Ok(false)
    }

    /// The owner's part of its pass: starts the migrations asked of it.
    pub(super) fn start_migrations(&self, view: &View) {
        for (name, (record, kv)) in &view.migrations {
            if record.to == self.name && record.state == MigrationState::Requested {
                self.resolve_cut_arrival(name, record, kv, view);
            }
            if record.from != self.name || record.state != MigrationState::Requested {
                continue;
            }
            let busy = lock(&self.migrating).contains(name);
            match self.token(name) {
                Some(token) if token == record.token => {}
                // Kept after an attempt a restart cut short: this one is over.
                Some(_) if !busy => {
                    let mut failed = record.clone();
                    failed.state = MigrationState::Failed {
                        reason: format!("vroomd on {} restarted during the migration", self.name),
                    };
                    let node = self.arc();
                    let (k, revision, lease) = (kv.key.clone(), kv.mod_revision, kv.lease);
                    tokio::spawn(async move {
                        let txn = Txn::new()
                            .when([Compare::mod_revision(k.clone(), revision)])
                            .and_then([Op::put_leased(k, json(&failed), lease)]);
                        let _ = node.store.txn(txn).await;
                    });
                    continue;
                }
                _ => continue,
            }
            let Some(peer) = view.nodes.get(&record.to).and_then(|(n, _)| n.peer.clone()) else {
                continue;
            };
            if !lock(&self.migrating).insert(name.clone()) {
                continue;
            }
            let node = self.arc();
            let (name, record, revision) = (name.clone(), record.clone(), kv.mod_revision);
            tokio::spawn(async move {
                node.migrate_out(&name, record, revision, &peer).await;
                lock(&node.migrating).remove(&name);
                node.wake.notify_one();
            });
        }
    }

    /// A migration to this node that it took over (it owns the instance)
    /// but that no receive here is finishing: the daemon that took it over
    /// died before it said how it ended, and this one starts the instance
    /// afresh. Recorded `failed` (it was no live move), so the source
    /// drops its paused copy and `vroom migrate` says where it runs.
    fn resolve_cut_arrival(&self, name: &str, record: &MigrationRecord, kv: &Kv, view: &View) {
        let Some((owner, okv)) = view.owners.get(name) else {
            return;
        };
        let receiving = lock(&self.incoming).contains_key(name);
        if owner.node != self.name || self.token(name).is_none() || receiving {
            return;
        }
        let mut failed = record.clone();
        failed.state = MigrationState::Failed {
            reason: format!(
                "vroomd on {} restarted after it took the instance over, so {name} was restarted there",
                self.name
            ),
        };
        tracing::warn!(instance = %name, from = %record.from, "a migration here was cut short after the takeover; the instance starts here afresh");
        let node = self.arc();
        let txn = Txn::new()
            .when([
                Compare::mod_revision(kv.key.clone(), kv.mod_revision),
                Compare::mod_revision(okv.key.clone(), okv.mod_revision),
            ])
            .and_then([Op::put_leased(kv.key.clone(), json(&failed), kv.lease)]);
        tokio::spawn(async move {
            let _ = node.store.txn(txn).await;
        });
    }

    async fn migrate_out(&self, name: &str, record: MigrationRecord, revision: i64, peer: &str) {
        tracing::info!(instance = %name, to = %record.to, "migrating");
        let outcome = self.send(name, &record, peer).await;
        // Decided by the owner key (a destination whose guest did not
        // answer gave it back) and, when the destination's answer did not
        // come, by the migration record; fenced: a takeover still in flight
        // can no longer succeed once this node has rewritten its owner key.
        // A destination that hung up (its daemon died, or it closed the
        // connection) never gives the instance back: it gives back only over
        // an open control connection. Only a silent one may still decide.
        let unheard = matches!(&outcome, Err(reason) if !reason.contains(WENT_AWAY));
        let still_owner = match self.await_decision(name, &record, unheard).await {
            Ok(mine) => mine,
            // Cannot tell: the VM stays paused until a pass can.
            Err(_) => return,
        };
        if still_owner {
            if let Err(e) = self.engine.resume_unmigrated(name).await {
                tracing::warn!(instance = %name, error = %e.message, "cannot resume an instance whose migration failed");
            }
        } else if self.engine.get(name).is_ok() {
            // Handed over: the paused copy here goes, and its splices.
            self.engine.drop_wiring(name).await;
            let _ = self.engine.remove(name, true).await;
        }
        let mkey = key(MIGRATIONS, name);
        let Ok(Some((mut current, kv))) = self.store.get_json::<MigrationRecord>(&mkey).await
        else {
            return;
        };
        if current.id != record.id {
            return;
        }
        let state = match (&outcome, still_owner) {
            (Ok((stats, switchover_ms)), false) => MigrationState::Done {
                downtime_ms: stats.downtime_ms,
                switchover_ms: *switchover_ms,
                bytes: stats.bytes,
            },
            (Err(reason), true) => MigrationState::Failed {
                reason: reason.clone(),
            },
            (Ok(_), true) => MigrationState::Failed {
                reason: format!("node {} did not take the instance over", record.to),
            },
            // Handed over, but the source did not hear how it ended. The
            // destination decided (the record is `switched`, or `failed`
            // by a destination that restarted after its takeover), or it
            // never said within the wait: a failure, which the requester
            // reports with the node that owns the instance now.
            (Err(reason), false) => match current.state {
                MigrationState::Requested => MigrationState::Failed {
                    reason: format!(
                        "{reason}; node {} took the instance over and did not say whether its guest runs",
                        record.to
                    ),
                },
                _ => return,
            },
        };
        match &state {
            MigrationState::Done {
                downtime_ms,
                switchover_ms,
                ..
            } => {
                tracing::info!(instance = %name, to = %record.to, downtime_ms, switchover_ms, "migrated")
            }
            MigrationState::Failed { reason } if still_owner => {
                tracing::warn!(instance = %name, to = %record.to, %reason, "the migration failed; the instance runs here")
            }
            MigrationState::Failed { reason } => {
                tracing::warn!(instance = %name, to = %record.to, %reason, "the migration was cut short after the hand-over; the destination has the instance")
            }
            _ => {}
        }
        // A source that kept the instance expects the record as it asked;
        // otherwise as the destination left it.
        let expect = if still_owner {
            revision
        } else {
            kv.mod_revision
        };
        current.state = state;
        let txn = Txn::new()
            .when([Compare::mod_revision(mkey.clone(), expect)])
            .and_then([Op::put_leased(mkey, json(&current), kv.lease)]);
        let _ = self.store.txn(txn).await;
    }

    /// After a migration out: whether this node keeps instance `name`
    /// (see [`keep`](Self::keep)). When the destination's answer did not
    /// come (`unheard`), the destination may still be deciding: while it
    /// owns the instance and the migration is still `requested`, the paused
    /// copy here stays (a give-back may yet come), up to [`DECISION_WAIT`].
    async fn await_decision(
        &self,
        name: &str,
        record: &MigrationRecord,
        unheard: bool,
    ) -> Result<bool, StoreError> {
        let since = Instant::now();
        loop {
            if self.keep(name).await? {
                return Ok(true);
            }
            if !unheard {
                return Ok(false);
            }
            let owner = self
                .store
                .get_json::<OwnerRecord>(&key(OWNERS, name))
                .await?
                .map(|(o, _)| o.node);
            let migration = self
                .store
                .get_json::<MigrationRecord>(&key(MIGRATIONS, name))
                .await?
                .filter(|(m, _)| m.id == record.id)
                .map(|(m, _)| m.state);
            let waiting = since.elapsed() < DECISION_WAIT;
            match source_decision(
                owner.as_deref(),
                &self.name,
                &record.to,
                migration.as_ref(),
                waiting,
            ) {
                // Given back since: `keep` takes it on the next round.
                SourceDecision::Keep if waiting => {}
                SourceDecision::Wait => {}
                SourceDecision::Keep | SourceDecision::Release => return Ok(false),
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Streams `name` to the destination; returns QEMU's numbers and the
    /// switch-over time as the source saw it.
    async fn send(
        &self,
        name: &str,
        record: &MigrationRecord,
        peer: &str,
    ) -> Result<(vroom_core::driver::LiveStats, u64), String> {
        let to = &record.to;
        let connect = || async {
            match tokio::time::timeout(Duration::from_secs(3), TcpStream::connect(peer)).await {
                Ok(Ok(stream)) => Ok(stream),
                Ok(Err(e)) => Err(format!("cannot reach node {to} at {peer}: {e}")),
                Err(_) => Err(format!("cannot reach node {to} at {peer}: timed out")),
            }
        };
        // Its splices and mirrors go too: recorded as they are now, for the
        // destination to make before the VM arrives.
        if let Some(reason) = self.engine.immovable_reason(name) {
            return Err(format!("{name} cannot move to another node: {reason}"));
        }
        let wiring = self.engine.wiring_of(name);
        self.put_wiring(name, wiring.as_ref())
            .await
            .map_err(|e| e.message)?;
        // The destination boots each appliance before it is ready.
        let appliances = wiring.as_ref().map_or(0, |w| w.splices.len()) as u64;
        let ready_within = STEP_TIMEOUT
            + Duration::from_secs(
                appliances * (vroom_core::engine::DEFAULT_READY_TIMEOUT_SECS + 10),
            );
        let control = connect().await?;
        let (reader, mut writer) = control.into_split();
        let mut reader = tokio::io::BufReader::new(reader);
        let gone = |e: std::io::Error| format!("node {to} {WENT_AWAY}: {e}");
        let hello = Hello::Control {
            instance: name.to_string(),
            migration: record.id.clone(),
            secret: record.secret.clone(),
            ready: self.engine.guest_ready(name).await,
        };
        writer.write_all(&line(&hello)).await.map_err(gone)?;
        match read_control(&mut reader, to, ready_within).await? {
            Control::Ready => {}
            Control::Refused { reason } | Control::Failed { reason } => {
                return Err(format!("node {to} refused it: {reason}"))
            }
            other => return Err(format!("node {to} said {other:?} out of turn")),
        }
        let mut data = connect().await?;
        let hello = Hello::Data {
            migration: record.id.clone(),
            secret: record.secret.clone(),
        };
        data.write_all(&line(&hello)).await.map_err(gone)?;
        let _ = data.set_nodelay(true);
        let data = OwnedFd::from(into_blocking(data).map_err(gone)?);
        let sent: LiveOutgoing = match self.engine.send_live(name, data).await {
            Ok(sent) => sent,
            Err(e) => {
                let abort = Control::Abort {
                    reason: e.message.clone(),
                };
                let _ = writer.write_all(&line(&abort)).await;
                return Err(e.message);
            }
        };
        let paused = Instant::now();
        let header = Control::Volume {
            bytes: sent.volume.len() as u64,
            downtime_ms: sent.stats.downtime_ms,
            ram_bytes: sent.stats.bytes,
        };
        // Bounded: the VM stays paused until this ends.
        let handed = async {
            writer.write_all(&line(&header)).await?;
            writer.write_all(&sent.volume).await
        };
        tokio::time::timeout(STEP_TIMEOUT, handed)
            .await
            .map_err(|_| format!("node {to} did not take the config volume in {STEP_TIMEOUT:?}"))?
            .map_err(gone)?;
        match read_control(&mut reader, to, STEP_TIMEOUT).await? {
            // The switch-over as the guest saw it: to its `cont`, not the
            // check that followed while it ran.
            Control::Resumed { checked_ms } => {
                let switchover_ms = sent.stats.downtime_ms
                    + (paused.elapsed().as_millis() as u64).saturating_sub(checked_ms);
                self.send_console(name, &mut writer, to).await;
                Ok((sent.stats, switchover_ms))
            }
            Control::Failed { reason } => Err(format!("node {to}: {reason}")),
            other => Err(format!("node {to} said {other:?} out of turn")),
        }
    }

    /// After `resumed`: the paused copy's console history, for the
    /// destination's log. Best effort: the move is done either way.
    async fn send_console(
        &self,
        name: &str,
        writer: &mut tokio::net::tcp::OwnedWriteHalf,
        to: &str,
    ) {
        let history = match self.engine.console_history(name) {
            Ok(history) => history,
            Err(e) => {
                tracing::warn!(instance = %name, error = %e.message, "cannot read the console history to send");
                return;
            }
        };
        let header = Control::Console {
            earlier: history.earlier.iter().map(|b| b.len() as u64).collect(),
            current: history.current.len() as u64,
            written: history.written,
        };
        let sent = async {
            writer.write_all(&line(&header)).await?;
            for bytes in history.earlier.iter().chain([&history.current]) {
                writer.write_all(bytes).await?;
            }
            writer.flush().await
        };
        match tokio::time::timeout(CONSOLE_WAIT, sent).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                tracing::warn!(instance = %name, %to, error = %e, "cannot send the console history")
            }
            Err(_) => {
                tracing::warn!(instance = %name, %to, "sending the console history timed out")
            }
        }
    }

    /// `vroom migrate`: checks the request, asks the owner, waits for the end.
    pub(super) async fn request_migration(
        &self,
        name: &str,
        to: &str,
    ) -> Result<Migration, OpError> {
        let started = Instant::now();
        let view = self.view().await?;
        let (record, _) = view.instances.get(name).ok_or_else(|| {
            if self.engine.get(name).is_ok() {
                OpError::conflict(format!(
                    "instance {name} runs on this node only; only a cluster instance migrates"
                ))
            } else {
                OpError::not_found("instance", name)
            }
        })?;
        if record.removing {
            return Err(OpError::conflict(format!(
                "instance {name} is being removed"
            )));
        }
        if let Some((m, _)) = view.migrations.get(name) {
            return Err(OpError::conflict(format!(
                "instance {name} is being migrated to {} already",
                m.to
            )));
        }
        let (owner, okv) = view.owners.get(name).ok_or_else(|| {
            OpError::conflict(format!(
                "instance {name} runs nowhere now; only a running instance migrates"
            ))
        })?;
        let from = owner.node.clone();
        if from == to {
            return Err(OpError::conflict(format!(
                "instance {name} already runs on {to}"
            )));
        }
        let Some((target, _)) = view.nodes.get(to) else {
            return Err(if view.members.contains_key(to) {
                OpError::conflict(format!("node {to} is down"))
            } else {
                OpError::not_found("node", to)
            });
        };
        if view.cordons.contains_key(to) {
            return Err(OpError::conflict(format!(
                "node {to} is cordoned; `vroom node uncordon {to}` lets instances onto it"
            )));
        }
        let free = target.mem_total_mib.saturating_sub(target.mem_used_mib);
        let need = record.mem_mib + schedule::VMM_OVERHEAD_MIB;
        if free < need {
            return Err(OpError::new(
                ErrorCode::ResourceExhausted,
                format!("node {to} has {free} MiB free; {name} needs {need} MiB"),
            ));
        }
        if target.peer.is_none() {
            return Err(OpError::conflict(format!(
                "node {to} runs a vroom that does not take migrations"
            )));
        }
        self.await_running(name, &from).await?;
        let migration = MigrationRecord {
            id: format!("{:016x}", rand::random::<u64>()),
            from: from.clone(),
            to: to.to_string(),
            token: okv.mod_revision,
            secret: secret(),
            requested_at: now_secs(),
            state: MigrationState::Requested,
        };
        let mkey = key(MIGRATIONS, name);
        let lease = self.lease();
        let txn = Txn::new()
            .when([
                Compare::create_revision(mkey.clone(), 0),
                Compare::mod_revision(key(OWNERS, name), okv.mod_revision),
                Compare::lease(key(NODES, &self.name), lease),
            ])
            .and_then([Op::put_leased(mkey.clone(), json(&migration), lease)]);
        let asked = self
            .store
            .txn(txn)
            .await
            .map_err(|e| etcd_error("cannot ask for the migration", e))?;
        if !asked.succeeded() {
            return Err(OpError::conflict(format!(
                "instance {name} changed hands or is being migrated; try again"
            )));
        }
        self.wake.notify_one();
        let outcome = self.await_migration(name, &migration, started).await;
        // The record goes whatever happened (unless another replaced it).
        if let Ok(Some((m, kv))) = self.store.get_json::<MigrationRecord>(&mkey).await {
            if m.id == migration.id {
                let txn = Txn::new()
                    .when([Compare::mod_revision(mkey, kv.mod_revision)])
                    .and_then([Op::delete(kv.key.clone())]);
                let _ = self.store.txn(txn).await;
            }
        }
        outcome
    }

    /// Waits a little for the owner to publish the instance running (it
    /// may have just arrived there).
    async fn await_running(&self, name: &str, owner: &str) -> Result<(), OpError> {
        let since = Instant::now();
        loop {
            let status = self
                .store
                .get_json::<StatusRecord>(&key(STATUSES, name))
                .await
                .map_err(|e| etcd_error("cannot read the cluster", e))?;
            let state = status
                .filter(|(s, _)| s.node == owner)
                .map(|(s, _)| s.state);
            if state == Some(InstanceState::Running) {
                return Ok(());
            }
            if since.elapsed() > Duration::from_secs(5) {
                let state = state.map(|s| format!("{s:?}").to_lowercase());
                return Err(OpError::conflict(format!(
                    "instance {name} is {} on {owner}; only a running instance migrates",
                    state.as_deref().unwrap_or("not running")
                )));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn await_migration(
        &self,
        name: &str,
        migration: &MigrationRecord,
        started: Instant,
    ) -> Result<Migration, OpError> {
        let (from, to) = (&migration.from, &migration.to);
        let report = |downtime_ms, switchover_ms, bytes| {
            Ok(Migration {
                instance: Name::new(name).expect("invariant: an instance's name is valid"),
                from: Name::new(from).expect("invariant: a node's name is valid"),
                to: Name::new(to).expect("invariant: a node's name is valid"),
                total_ms: started.elapsed().as_millis() as u64,
                downtime_ms,
                switchover_ms,
                bytes,
            })
        };
        // The destination boots the VM's appliances first: each may take
        // its ready timeout (the source waits as long).
        let appliances = match self.store.get_json::<Wiring>(&key(WIRINGS, name)).await {
            Ok(Some((wiring, _))) => wiring.splices.len() as u64,
            _ => 0,
        };
        let limit = MIGRATE_TIMEOUT
            + Duration::from_secs(
                appliances * (vroom_core::engine::DEFAULT_READY_TIMEOUT_SECS + 10),
            );
        let mut switched_at = None;
        while started.elapsed() < limit {
            tokio::time::sleep(Duration::from_millis(20)).await;
            let current = match self
                .store
                .get_json::<MigrationRecord>(&key(MIGRATIONS, name))
                .await
            {
                Ok(current) => current,
                Err(_) => continue,
            };
            let Some((current, _)) = current.filter(|(m, _)| m.id == migration.id) else {
                return Err(OpError::conflict(format!(
                    "the migration of {name} was called off"
                )));
            };
            match current.state {
                MigrationState::Done {
                    downtime_ms,
                    switchover_ms,
                    bytes,
                } => return report(downtime_ms, switchover_ms, bytes),
                MigrationState::Failed { reason } => {
                    // Where it runs now: the source kept it, or a move cut
                    // short after the hand-over left it on `to`.
                    let runs = match self.store.get_json::<OwnerRecord>(&key(OWNERS, name)).await {
                        Ok(Some((owner, _))) => format!("it runs on {}", owner.node),
                        _ => "it runs nowhere now; the cluster restarts it by its policy".into(),
                    };
                    return Err(OpError::conflict(format!(
                        "cannot migrate {name} to {to}: {reason}; {runs}"
                    )));
                }
                // The source did not confirm (it may have died right after
                // the handover): the move stands.
                MigrationState::Switched { downtime_ms, bytes } => {
                    let since = *switched_at.get_or_insert_with(Instant::now);
                    if since.elapsed() > Duration::from_secs(5) {
                        return report(downtime_ms, downtime_ms, bytes);
                    }
                }
                MigrationState::Requested => {
                    // Read after the record: a handover between the two
                    // reads shows as the owner being `to`.
                    let owner = self
                        .store
                        .get_json::<OwnerRecord>(&key(OWNERS, name))
                        .await
                        .ok();
                    let lost = match owner {
                        Some(None) => true,
                        // (A source that kept it rewrites its key: still its.)
                        Some(Some((o, _))) => o.node != *from && o.node != *to,
                        None => false,
                    };
                    if lost {
                        let runs = match self.await_owner(name).await {
                            Some(node) => format!("the cluster restarted it on {node}"),
                            None => "the cluster restarts it by its policy".into(),
                        };
                        return Err(OpError::conflict(format!(
                            "node {from} lost instance {name} during the migration; {runs}"
                        )));
                    }
                }
            }
        }
        Err(OpError::new(
            ErrorCode::Internal,
            format!("the migration of {name} to {to} did not finish in {limit:?}"),
        ))
    }
}

impl ClusterNode {
    /// The node that owns `name` once one does, waiting a little (a lost
    /// instance is claimed again within a few passes).
    async fn await_owner(&self, name: &str) -> Option<String> {
        let since = Instant::now();
        while since.elapsed() < OWNER_WAIT {
            if let Ok(Some((owner, _))) =
                self.store.get_json::<OwnerRecord>(&key(OWNERS, name)).await
            {
                return Some(owner.node);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        None
    }
}

/// How long `vroom migrate` waits for a lost instance's new owner, to say
/// where it runs.
const OWNER_WAIT: Duration = Duration::from_secs(20);

/// What a source whose destination's answer did not come does with its
/// paused copy, by the owner key (`owner`), the migration's state (`None`
/// once it is gone or replaced) and whether it may still wait.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SourceDecision {
    /// The owner key names the source (given back): it keeps it.
    Keep,
    /// The destination owns it and has not said how it ended: it may still
    /// give it back, so the paused copy stays.
    Wait,
    /// The destination has it (or nobody does): the paused copy goes.
    Release,
}

fn source_decision(
    owner: Option<&str>,
    me: &str,
    to: &str,
    migration: Option<&MigrationState>,
    waiting: bool,
) -> SourceDecision {
    match owner {
        Some(o) if o == me => SourceDecision::Keep,
        Some(o) if o == to && waiting && migration == Some(&MigrationState::Requested) => {
            SourceDecision::Wait
        }
        _ => SourceDecision::Release,
    }
}

/// Whether the peer closed `stream` (without taking what it may hold).
fn closed(stream: &std::net::TcpStream) -> bool {
    use std::os::fd::AsRawFd;
    let mut byte = 0u8;
    // SAFETY: a one-byte buffer we own, on a socket we hold.
    let n = unsafe {
        libc::recv(
            stream.as_raw_fd(),
            (&mut byte as *mut u8).cast(),
            1,
            libc::MSG_PEEK | libc::MSG_DONTWAIT,
        )
    };
    n == 0
        || (n < 0
            && !matches!(
                std::io::Error::last_os_error().raw_os_error(),
                Some(libc::EAGAIN)
            ))
}

/// Blocking, on the destination: the [`Control::Console`] that follows
/// `resumed`, if the source sends one.
fn read_console(control: std::net::TcpStream) -> std::io::Result<Option<ConsoleHistory>> {
    let bad = |what: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, what.to_string());
    control.set_read_timeout(Some(CONSOLE_WAIT))?;
    let mut reader = std::io::BufReader::new(control).take(HELLO_MAX as u64);
    let mut header = String::new();
    if reader.read_line(&mut header)? == 0 {
        return Ok(None);
    }
    let Ok(Control::Console {
        earlier,
        current,
        written,
    }) = serde_json::from_str(&header)
    else {
        return Err(bad("the source sent something else than its console"));
    };
    let fits = earlier.len() <= vroom_core::console::KEPT_BOOTS as usize
        && earlier.iter().all(|&n| n <= SEGMENT_BYTES)
        && current <= 2 * SEGMENT_BYTES;
    if !fits {
        return Err(bad("the console history is larger than a console keeps"));
    }
    let mut reader = reader.into_inner();
    let mut read = |len: u64| -> std::io::Result<Vec<u8>> {
        let mut bytes = vec![0; len as usize];
        reader.read_exact(&mut bytes)?;
        Ok(bytes)
    };
    let earlier = earlier
        .into_iter()
        .map(&mut read)
        .collect::<Result<_, _>>()?;
    let history = ConsoleHistory {
        earlier,
        current: read(current)?,
        written,
    };
    if !history.fits() {
        return Err(bad("the console history does not add up"));
    }
    Ok(Some(history))
}

async fn read_control(
    reader: &mut tokio::io::BufReader<tokio::net::tcp::OwnedReadHalf>,
    to: &str,
    within: Duration,
) -> Result<Control, String> {
    let mut text = String::new();
    match tokio::time::timeout(within, reader.read_line(&mut text)).await {
        Ok(Ok(0)) => Err(format!("node {to} {WENT_AWAY}")),
        Ok(Ok(_)) => serde_json::from_str(&text)
            .map_err(|e| format!("node {to} said something unreadable: {e}")),
        Ok(Err(e)) => Err(format!("node {to} {WENT_AWAY}: {e}")),
        Err(_) => Err(format!("node {to} did not answer in {within:?}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Review finding (issue 23): a source that did not hear the answer
    /// dropped its paused copy as soon as the destination owned the
    /// instance, although the destination could still give it back. It
    /// waits while the destination owns it and the migration is still
    /// `requested`, and only within its bound.
    #[test]
    fn a_source_keeps_its_paused_copy_while_the_destination_decides() {
        use SourceDecision::*;
        let requested = MigrationState::Requested;
        let switched = MigrationState::Switched {
            downtime_ms: 1,
            bytes: 1,
        };
        let failed = MigrationState::Failed {
            reason: "restarted".into(),
        };
        #[rustfmt::skip]
        let cases: &[(Option<&str>, Option<&MigrationState>, bool, SourceDecision)] = &[
            // owner    migration         waiting  decision
            (Some("n1"), Some(&requested), true,  Keep),
            (Some("n1"), Some(&switched),  true,  Keep),
            (Some("n2"), Some(&requested), true,  Wait),
            (Some("n2"), Some(&requested), false, Release),
            (Some("n2"), Some(&switched),  true,  Release),
            (Some("n2"), Some(&failed),    true,  Release),
            (Some("n2"), None,             true,  Release),
            (Some("n3"), Some(&requested), true,  Release),
            (None,       Some(&requested), true,  Release),
        ];
        for (owner, migration, waiting, want) in cases {
            assert_eq!(
                source_decision(*owner, "n1", "n2", *migration, *waiting),
                *want,
                "owner {owner:?} migration {migration:?} waiting {waiting}"
            );
        }
    }
}
