//! The peer port: what a node's peers connect to. Every connection is
//! proven first ([`crate::peer_auth`]: a challenge, the hello with its
//! proof, a verdict), then checked against the cluster: the named node is
//! live and advertised at the connection's source address, and what its
//! hello asks is its to ask ([`ClusterNode::authorize`]). The hello says
//! what the connection is for: a live migration's control or data
//! connection ([`super::migrate`]), an image a peer lacks (sent here,
//! fetched there and checked against its id), or a replica's copy served
//! to its primary ([`super::volumes`]).

use std::net::{IpAddr, SocketAddr};

use serde::de::DeserializeOwned;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};

use super::migrate::STEP_TIMEOUT;
use super::*;
use crate::peer_auth::{Challenge, SignedHello, Verdict, HANDSHAKE_TIMEOUT, PROTOCOL};

/// The TCP port a node's peers connect to, on its advertised address.
pub const PEER_PORT: u16 = 7947;

/// The longest line of the handshake (a challenge, a proven hello, a
/// verdict) and of a migration's control connection.
pub(super) const HELLO_MAX: usize = 4096;

/// What a peer connection is for: the hello inside a
/// [`crate::peer_auth::SignedHello`].
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub(super) enum Hello {
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
    /// The primary of a replicated volume asks for the replica's copy to be
    /// served to it ([`super::volumes`]).
    Replica {
        volume: String,
        /// The proven node itself: anything else is refused.
        primary: String,
        /// A full copy follows (the copy is emptied first); `false`: the
        /// primary's paused replication resumes on the copy as it is.
        #[serde(default = "yes")]
        empty: bool,
    },
}

/// The answer to [`Hello::Image`]: a header line, then the manifest's bytes,
/// then each file's.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub(super) enum ImageReply {
    Image {
        manifest: u64,
        files: Vec<(String, u64)>,
    },
    Missing,
}

/// How long fetching (or sending) one image may take.
pub(super) const FETCH_TIMEOUT: Duration = Duration::from_secs(600);

/// The largest image file a peer is trusted to send.
pub(super) const MAX_IMAGE_FILE: u64 = 8 << 30;

pub(super) fn yes() -> bool {
    true
}

pub(super) fn line<T: Serialize>(value: &T) -> Vec<u8> {
    let mut bytes = json(value);
    bytes.push(b'\n');
    bytes
}

/// How long a peer has to say its proven hello after the challenge.
const HELLO_TIMEOUT: Duration = Duration::from_secs(5);

/// How long the checks of a proven hello may take (they read etcd).
const CHECK_TIMEOUT: Duration = Duration::from_secs(5);

/// What a refused peer is told before its proof checked out.
const NOT_AUTHENTICATED: &str = "not authenticated";

/// Reads one line of at most [`HELLO_MAX`] bytes, byte by byte: on a data
/// connection, what follows belongs to QEMU and must stay in the socket.
pub(super) async fn read_line_bounded<S: AsyncRead + Unpin>(
    stream: &mut S,
) -> std::io::Result<Vec<u8>> {
    let mut bytes = vec![];
    loop {
        let b = stream.read_u8().await?;
        if b == b'\n' {
            return Ok(bytes);
        }
        bytes.push(b);
        if bytes.len() > HELLO_MAX {
            return Err(std::io::Error::other("the line is too long"));
        }
    }
}

pub(super) async fn read_json_line<T: DeserializeOwned, S: AsyncRead + Unpin>(
    stream: &mut S,
) -> std::io::Result<T> {
    let bytes = read_line_bounded(stream).await?;
    serde_json::from_slice(&bytes).map_err(std::io::Error::other)
}

/// The client's half of the handshake on `stream`, as node `me` saying
/// `hello` to node `to`: answers the challenge, waits for the verdict.
/// Reads nothing past the verdict's line.
pub(super) async fn greet<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    (key, me): (&PeerKey, &str),
    to: &str,
    hello: &Hello,
) -> Result<(), String> {
    let challenge: Challenge = read_json_line(stream)
        .await
        .map_err(|e| format!("no challenge from node {to} (a node of an older vroom?): {e}"))?;
    if challenge.v != PROTOCOL {
        return Err(format!(
            "node {to} speaks peer protocol {}, this node {PROTOCOL}",
            challenge.v
        ));
    }
    if challenge.node != to {
        return Err(format!(
            "node {} answers at node {to}'s address",
            challenge.node
        ));
    }
    let text = String::from_utf8(json(hello)).expect("invariant: JSON is UTF-8");
    let signed = SignedHello::new(key, &challenge, me, text);
    stream
        .write_all(&line(&signed))
        .await
        .map_err(|e| format!("node {to} went away: {e}"))?;
    match read_json_line(stream).await {
        Ok(Verdict::Accepted) => Ok(()),
        Ok(Verdict::Refused { reason }) => {
            Err(format!("node {to} refused the connection: {reason}"))
        }
        Err(e) => Err(format!("no verdict from node {to}: {e}")),
    }
}

/// Why a peer connection was refused.
#[derive(Debug)]
struct Refusal {
    /// The node it said it was, if it got that far.
    node: Option<String>,
    /// For the log.
    reason: String,
    /// For the peer: nothing more than [`NOT_AUTHENTICATED`] until its
    /// proof checked out.
    told: String,
}

impl Refusal {
    fn unproven(node: Option<String>, reason: String) -> Refusal {
        Refusal {
            node,
            reason,
            told: NOT_AUTHENTICATED.into(),
        }
    }

    fn of(node: &str, reason: String) -> Refusal {
        Refusal {
            node: Some(node.to_string()),
            told: reason.clone(),
            reason,
        }
    }
}

/// Whether a node advertised as `advertise` (`ADDR` or `ADDR:PORT`, an IP
/// address or a host name) is at `ip`.
async fn advertised_at(advertise: &str, ip: IpAddr) -> bool {
    if let Some(v4) = advertised_ip(advertise) {
        return IpAddr::V4(v4) == ip;
    }
    let host = match advertise.rsplit_once(':') {
        Some((host, port)) if port.parse::<u16>().is_ok() => host,
        _ => advertise,
    };
    tokio::net::lookup_host((host, 0))
        .await
        .is_ok_and(|mut addrs| addrs.any(|a| a.ip().to_canonical() == ip))
}

pub(super) fn into_blocking(stream: TcpStream) -> std::io::Result<std::net::TcpStream> {
    let stream = stream.into_std()?;
    stream.set_nonblocking(false)?;
    Ok(stream)
}

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

    /// Accepts peer connections, each on a task of its own.
    pub(super) async fn serve_peers(self: Arc<Self>, listener: TcpListener) {
        loop {
            let (stream, peer) = match listener.accept().await {
                Ok(accepted) => accepted,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot accept a peer connection");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let node = self.clone();
            tokio::spawn(async move { node.handle_peer(stream, peer).await });
        }
    }

    /// One peer connection: admitted (proven and checked), then given to
    /// what its hello asks for; refused with one warning line otherwise.
    pub(super) async fn handle_peer(&self, mut stream: TcpStream, peer: SocketAddr) {
        let (node, hello) = match self.admit(&mut stream, peer).await {
            Ok(admitted) => admitted,
            Err(refusal) => {
                tracing::warn!(
                    %peer,
                    node = refusal.node.as_deref().unwrap_or("?"),
                    reason = %refusal.reason,
                    "refused a peer connection"
                );
                let verdict = Verdict::Refused {
                    reason: refusal.told,
                };
                let _ =
                    tokio::time::timeout(Duration::from_secs(1), stream.write_all(&line(&verdict)))
                        .await;
                return;
            }
        };
        // (Not the hello itself: a migration's carries its secret.)
        tracing::debug!(%peer, %node, "admitted a peer connection");
        match hello {
            Hello::Data { migration, secret } => self.data_arrived(&migration, &secret, stream),
            Hello::Image { id } => self.send_image(stream, &id).await,
            Hello::Replica { volume, empty, .. } => {
                // `authorize` checked that the hello's primary is `node`.
                self.serve_replica(stream, &volume, &node, empty).await
            }
            Hello::Control {
                instance,
                migration,
                secret,
                ready,
            } => {
                self.receive_migration(stream, &instance, (&migration, &secret), ready)
                    .await
            }
        }
    }

    /// The server's half of the handshake: challenges the peer at `peer`,
    /// checks its proof, then [`Self::authorize`]s its hello, and tells it
    /// the verdict when it is accepted. Nothing is read from etcd for a
    /// peer without a valid proof, and nothing is changed for any.
    async fn admit<S: AsyncRead + AsyncWrite + Unpin>(
        &self,
        stream: &mut S,
        peer: SocketAddr,
    ) -> Result<(String, Hello), Refusal> {
        let challenge =
            Challenge::new(&self.name).map_err(|e| Refusal::unproven(None, e.to_string()))?;
        let said = async {
            stream.write_all(&line(&challenge)).await?;
            read_line_bounded(stream).await
        };
        let bytes = match tokio::time::timeout(HELLO_TIMEOUT, said).await {
            Ok(Ok(bytes)) => bytes,
            Ok(Err(e)) => return Err(Refusal::unproven(None, format!("no hello: {e}"))),
            Err(_) => {
                return Err(Refusal::unproven(
                    None,
                    format!("no hello within {HELLO_TIMEOUT:?}"),
                ))
            }
        };
        let signed: SignedHello = serde_json::from_slice(&bytes).map_err(|e| {
            Refusal::unproven(
                None,
                format!("a hello without a proof (a node of an older vroom, or no node): {e}"),
            )
        })?;
        if !signed.verify(&self.peer_key, &challenge) {
            return Err(Refusal::unproven(
                Some(signed.node),
                "a wrong proof: another cluster's secret, another connection's, or a hello altered after it was proven".into(),
            ));
        }
        let node = signed.node;
        let hello: Hello = serde_json::from_str(&signed.hello)
            .map_err(|e| Refusal::of(&node, format!("an unreadable hello: {e}")))?;
        let ip = peer.ip().to_canonical();
        match tokio::time::timeout(CHECK_TIMEOUT, self.authorize(&node, ip, &hello)).await {
            Ok(Ok(())) => {}
            Ok(Err(reason)) => return Err(Refusal::of(&node, reason)),
            Err(_) => {
                return Err(Refusal::of(
                    &node,
                    format!("etcd did not answer the checks within {CHECK_TIMEOUT:?}"),
                ))
            }
        }
        stream
            .write_all(&line(&Verdict::Accepted))
            .await
            .map_err(|e| Refusal::of(&node, format!("went away before its verdict: {e}")))?;
        Ok((node, hello))
    }

    /// Whether proven node `node`, connecting from `ip`, may have what
    /// `hello` asks for: it is live in the cluster and advertised at `ip`;
    /// a replica's copy goes only to the volume's recorded primary, when
    /// this node is its replica; a migration's control connection comes
    /// only from the migration's source.
    pub(super) async fn authorize(
        &self,
        node: &str,
        ip: IpAddr,
        hello: &Hello,
    ) -> Result<(), String> {
        let read = |e: StoreError| format!("cannot read the cluster: {e}");
        let (record, _) = self
            .store
            .get_json::<NodeRecord>(&key(NODES, node))
            .await
            .map_err(read)?
            .ok_or_else(|| format!("node {node} is not a live member of the cluster"))?;
        if !advertised_at(&record.advertise, ip).await {
            return Err(format!(
                "node {node} is advertised at {}, not at {ip}",
                record.advertise
            ));
        }
        match hello {
            Hello::Replica {
                volume, primary, ..
            } => {
                if primary != node {
                    return Err(format!(
                        "node {node} asked for volume {volume}'s replica for node {primary}"
                    ));
                }
                self.replica_record(volume, node).await.map(drop)
            }
            Hello::Control { instance, .. } => {
                let (migration, _) = self
                    .store
                    .get_json::<MigrationRecord>(&key(MIGRATIONS, instance))
                    .await
                    .map_err(read)?
                    .ok_or_else(|| format!("no migration of {instance} under way"))?;
                if migration.from != node {
                    return Err(format!(
                        "the migration of {instance} comes from node {}, not {node}",
                        migration.from
                    ));
                }
                Ok(())
            }
            // A data connection proves its migration by its secret; any
            // live node may fetch an image.
            Hello::Data { .. } | Hello::Image { .. } => Ok(()),
        }
    }

    /// Opens a connection to node `to`, at `addr` on its peer port, for
    /// `hello`: from this node's advertised address (what `to` checks),
    /// proven; returned once `to` accepted it.
    pub(super) async fn connect_peer(
        &self,
        to: &str,
        addr: &str,
        hello: &Hello,
    ) -> Result<TcpStream, String> {
        let unreachable = |e: String| format!("cannot reach node {to} at {addr}: {e}");
        let connect = async {
            let target = tokio::net::lookup_host(addr)
                .await?
                .next()
                .ok_or_else(|| std::io::Error::other("no address"))?;
            let socket = match target {
                SocketAddr::V4(_) => TcpSocket::new_v4()?,
                SocketAddr::V6(_) => TcpSocket::new_v6()?,
            };
            let local = self.peer_addr().ip();
            if !local.is_unspecified() && local.is_ipv4() == target.is_ipv4() {
                socket.bind(SocketAddr::new(local, 0))?;
            }
            socket.connect(target).await
        };
        let mut stream = tokio::time::timeout(Duration::from_secs(3), connect)
            .await
            .map_err(|_| unreachable("timed out".into()))?
            .map_err(|e| unreachable(e.to_string()))?;
        let me = (&self.peer_key, self.name.as_str());
        tokio::time::timeout(HANDSHAKE_TIMEOUT, greet(&mut stream, me, to, hello))
            .await
            .map_err(|_| {
                format!("node {to} did not answer the handshake within {HANDSHAKE_TIMEOUT:?}")
            })??;
        Ok(stream)
    }

    /// Sends image `id` to a peer that lacks it (it checks the digests).
    pub(super) async fn send_image(&self, mut stream: TcpStream, id: &str) {
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
        if !is_image_id(reference) || self.engine.get_image(reference).is_ok() {
            return Ok(());
        }
        let view = self.view().await?;
        let mut reasons = vec![];
        for (name, (node, _)) in &view.nodes {
            let Some(peer) = node.peer.as_ref().filter(|_| *name != self.name) else {
                continue;
            };
            let fetched =
                tokio::time::timeout(FETCH_TIMEOUT, self.fetch_image(reference, (name, peer)))
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

    /// Fetches image `id` from node `from` (its name, its peer address):
    /// `Ok(false)` when it does not have it.
    pub(super) async fn fetch_image(&self, id: &str, from: (&str, &str)) -> Result<bool, String> {
        let hello = Hello::Image { id: id.to_string() };
        let stream = self.connect_peer(from.0, from.1, &hello).await?;
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
}

/// Whether `reference` is an image id (a manifest's sha256), not a name.
pub(super) fn is_image_id(reference: &str) -> bool {
    reference.len() == 64 && reference.bytes().all(|b| b.is_ascii_hexdigit())
}
