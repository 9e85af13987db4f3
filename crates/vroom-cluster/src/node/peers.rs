//! The peer port: what a node's peers connect to. The first line of each
//! connection (a [`Hello`]) says what it is for: a live migration's
//! control or data connection ([`super::migrate`]), or an image a peer
//! lacks (sent here, fetched there and checked against its id).

use std::net::{IpAddr, SocketAddr};

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use super::migrate::STEP_TIMEOUT;
use super::*;

/// The TCP port a node's peers connect to, on its advertised address.
pub const PEER_PORT: u16 = 7947;

pub(super) const HELLO_MAX: usize = 4096;

/// The first line of a peer connection.
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
        primary: String,
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

/// Reads one line byte by byte: on a data connection, what follows belongs
/// to QEMU and must stay in the socket.
pub(super) async fn read_hello(stream: &mut TcpStream) -> std::io::Result<Hello> {
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
                    Hello::Replica { volume, primary } => {
                        node.serve_replica(stream, &volume, &primary).await
                    }
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
    pub(super) async fn fetch_image(&self, id: &str, peer: &str) -> Result<bool, String> {
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
}
