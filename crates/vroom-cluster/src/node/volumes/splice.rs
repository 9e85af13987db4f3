//! The replica's end of a replication's data path: the primary's proven
//! peer connection, spliced to the replica's `qemu-nbd` on its unix socket.
//!
//! **Why a splice.** `qemu-nbd` (and `qemu-storage-daemon`) authenticate no
//! client but by TLS, and in QEMU 7.2 neither takes an already-connected
//! client: `--socket`, `--bind/--port`, socket activation and
//! `--nbd-server addr.type=fd` all want a socket to *listen* on. A server on
//! a TCP port would serve whoever reaches the port first. So the server
//! listens on a unix socket only root on its node can reach, and the only
//! way to it from the network is the peer port: a connection whose hello
//! was proven and admitted ([`super::super::peers`]), after which the
//! replica's node forwards the NBD stream both ways here, byte for byte.
//!
//! **Ending.** Either side closing or failing ends both: the primary gone
//! (its relay released) closes the server's connection, so the next
//! replication finds the server free; the server gone (stopped before an
//! instance uses the copy, killed, restarted for the next replication)
//! closes the primary's connection, which its relay holds as a fault.
//! Nothing is half-closed: NBD has no use for it.

use std::io;

use tokio::io::{AsyncRead, AsyncWrite, BufReader};
use tokio::net::{TcpStream, UnixStream};

/// Each direction reads through a buffer this large: a 1 MiB mirror chunk
/// passes in a few reads (the relay's buffer on the primary's side is the
/// same size).
const BUFFER: usize = 256 * 1024;

/// How a splice ended.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum SpliceEnd {
    /// The primary closed its connection.
    PeerClosed,
    /// The server closed its end.
    ServerClosed,
    /// A read or write failed on either side.
    Failed(String),
}

/// Forwards bytes between the primary's connection `peer` and the
/// replica's server `server` until either side closes or fails, then
/// closes both.
pub(super) async fn splice(mut peer: TcpStream, mut server: UnixStream) -> SpliceEnd {
    // One NBD message is one write; Nagle would hold a reply behind an ACK.
    let _ = peer.set_nodelay(true);
    let (peer_read, mut peer_write) = peer.split();
    let (server_read, mut server_write) = server.split();
    let mut from_peer = BufReader::with_capacity(BUFFER, peer_read);
    let mut from_server = BufReader::with_capacity(BUFFER, server_read);
    tokio::select! {
        r = forward(&mut from_peer, &mut server_write) => match r {
            Ok(()) => SpliceEnd::PeerClosed,
            Err(e) => SpliceEnd::Failed(format!("the primary's connection to its server: {e}")),
        },
        r = forward(&mut from_server, &mut peer_write) => match r {
            Ok(()) => SpliceEnd::ServerClosed,
            Err(e) => SpliceEnd::Failed(format!("the server to the primary's connection: {e}")),
        },
    }
    // Both streams are dropped here: closed.
}

/// Copies until `from` ends.
async fn forward<R, W>(from: &mut R, to: &mut W) -> io::Result<()>
where
    R: tokio::io::AsyncBufRead + AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    tokio::io::copy_buf(from, to).await.map(drop)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    /// A splice between a TCP "primary" and a unix "server", both held by
    /// the test, running on a task.
    struct Harness {
        primary: TcpStream,
        server: UnixStream,
        ended: tokio::task::JoinHandle<SpliceEnd>,
    }

    async fn harness() -> Harness {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let primary = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (peer, _) = listener.accept().await.unwrap();
        let (server, spliced) = UnixStream::pair().unwrap();
        let ended = tokio::spawn(splice(peer, spliced));
        Harness {
            primary,
            server,
            ended,
        }
    }

    async fn passes(
        from: &mut (impl AsyncWrite + Unpin),
        to: &mut (impl AsyncRead + Unpin),
        n: usize,
    ) {
        let bytes: Vec<u8> = (0..n).map(|i| (i * 7 + n) as u8).collect();
        let (got, ()) = tokio::join!(
            async {
                let mut got = vec![0; n];
                to.read_exact(&mut got).await.unwrap();
                got
            },
            async { from.write_all(&bytes).await.unwrap() }
        );
        assert!(got == bytes, "the splice changed {n} bytes");
    }

    async fn closed(stream: &mut (impl AsyncRead + Unpin), what: &str) {
        let mut byte = [0; 1];
        let read = tokio::time::timeout(Duration::from_secs(3), stream.read(&mut byte))
            .await
            .unwrap_or_else(|_| panic!("{what} was left open"));
        assert!(
            matches!(read, Ok(0) | Err(_)),
            "{what}: read {read:?} where it should be closed"
        );
    }

    #[tokio::test]
    async fn bytes_pass_both_ways_unchanged_small_and_large() {
        let mut h = harness().await;
        for n in [1, 28, 4096 + 28, 1 << 20, 3 << 20] {
            passes(&mut h.primary, &mut h.server, n).await;
            passes(&mut h.server, &mut h.primary, n.min(64 << 10)).await;
        }
        assert!(!h.ended.is_finished());
    }

    #[tokio::test]
    async fn the_primary_closing_closes_the_server_end() {
        let mut h = harness().await;
        passes(&mut h.primary, &mut h.server, 100).await;
        drop(h.primary);
        closed(&mut h.server, "the server's end").await;
        assert_eq!(h.ended.await.unwrap(), SpliceEnd::PeerClosed);
    }

    /// The server stopped (for an instance to use the copy, or for the
    /// next replication) while the primary says nothing: the primary's
    /// connection closes, so its relay sees the fault at once.
    #[tokio::test]
    async fn the_server_closing_closes_a_silent_primarys_connection() {
        let mut h = harness().await;
        passes(&mut h.server, &mut h.primary, 100).await;
        drop(h.server);
        closed(&mut h.primary, "the primary's connection").await;
        assert_eq!(h.ended.await.unwrap(), SpliceEnd::ServerClosed);
    }
}
