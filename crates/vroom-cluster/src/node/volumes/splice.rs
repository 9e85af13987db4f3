//! The replica's end of a replication's data path: the primary's proven
//! peer connection (TLS, once the primary's certificate checked out),
//! spliced to the replica's `qemu-nbd` on its unix socket.
//!
//! **Why a splice.** `qemu-nbd` (and `qemu-storage-daemon`) authenticate no
//! client but by TLS, and in QEMU 7.2 neither takes an already-connected
//! client: `--socket`, `--bind/--port`, socket activation and
//! `--nbd-server addr.type=fd` all want a socket to *listen* on. A server on
//! a TCP port would serve whoever reaches the port first. So the server
//! listens on a unix socket only root on its node can reach, and the only
//! way to it from the network is the peer port: a connection whose hello
//! was proven and admitted ([`super::super::peers`]) and whose TLS showed
//! the primary's certificate, after which the replica's node forwards the
//! NBD stream both ways here, decrypting one way and encrypting the other.
//!
//! **Ending.** Either side closing or failing ends both: the primary gone
//! (its relay released) closes the server's connection, so the next
//! replication finds the server free; the server gone (stopped before an
//! instance uses the copy, killed, restarted for the next replication)
//! closes the primary's connection, which its relay holds as a fault.
//! Nothing is half-closed: NBD has no use for it.

use std::io::{self, Read, Write};

use vroom_volume::relay::sealed::{RecordKeys, SealedReader, SealedWriter};

/// Each direction reads into a buffer this large: a 1 MiB mirror chunk
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

/// Forwards between the primary's connection `peer`, carrying TLS records
/// sealed and opened with `keys`, and the replica's server `server`, on two
/// threads (this one and one more), until either side closes or fails;
/// then shuts both down and returns once both threads ended.
pub(super) fn splice(
    peer: std::net::TcpStream,
    keys: &RecordKeys,
    server: std::os::unix::net::UnixStream,
) -> SpliceEnd {
    let halves = || -> io::Result<_> {
        Ok((
            SealedReader::new(
                std::io::BufReader::with_capacity(BUFFER, peer.try_clone()?),
                keys,
            )?,
            SealedWriter::new(peer.try_clone()?, keys)?,
            (peer.try_clone()?, server.try_clone()?),
        ))
    };
    let (mut from_peer, mut to_peer, (peer_too, server_too)) = match halves() {
        Ok(halves) => halves,
        Err(e) => return SpliceEnd::Failed(format!("cannot split the streams: {e}")),
    };
    // Whichever direction ends first shuts both connections down, which
    // ends the other.
    let shut = |peer: &std::net::TcpStream, server: &std::os::unix::net::UnixStream| {
        let _ = peer.shutdown(std::net::Shutdown::Both);
        let _ = server.shutdown(std::net::Shutdown::Both);
    };
    let (ended, end) = std::sync::mpsc::channel();
    let up = {
        let ended = ended.clone();
        let mut to_server = match server.try_clone() {
            Ok(s) => s,
            Err(e) => return SpliceEnd::Failed(format!("cannot split the streams: {e}")),
        };
        std::thread::Builder::new()
            .name("splice-up".into())
            .spawn(move || {
                let r = copy(&mut from_peer, &mut to_server);
                let _ = ended.send(match r {
                    Ok(()) => SpliceEnd::PeerClosed,
                    Err(e) => {
                        SpliceEnd::Failed(format!("the primary's connection to its server: {e}"))
                    }
                });
                shut(&peer_too, &server_too);
            })
    };
    let up = match up {
        Ok(up) => up,
        Err(e) => return SpliceEnd::Failed(format!("cannot start a thread: {e}")),
    };
    let mut from_server = &server;
    let r = copy(&mut from_server, &mut to_peer);
    let _ = ended.send(match r {
        Ok(()) => SpliceEnd::ServerClosed,
        Err(e) => SpliceEnd::Failed(format!("the server to the primary's connection: {e}")),
    });
    shut(&peer, &server);
    let _ = up.join();
    end.recv()
        .expect("invariant: both directions said how they ended")
}

/// Copies until `from` ends; each read is one write.
fn copy(from: &mut impl Read, to: &mut impl Write) -> io::Result<()> {
    let mut buffer = vec![0; BUFFER];
    loop {
        let n = from.read(&mut buffer)?;
        if n == 0 {
            return Ok(());
        }
        to.write_all(&buffer[..n])?;
    }
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};
    use std::net::{TcpListener, TcpStream};
    use std::os::unix::net::UnixStream;

    use vroom_volume::relay::sealed::{
        DirectionKeys, RecordKeys, SealedReader, SealedWriter, CHACHA20_POLY1305,
    };

    use super::{splice, SpliceEnd};

    fn keys(tx: u8, rx: u8) -> RecordKeys {
        let direction = |seed: u8| DirectionKeys {
            key: vec![seed; 32],
            iv: vec![seed; 12],
            seq: 1,
        };
        RecordKeys {
            cipher: CHACHA20_POLY1305.into(),
            tx: direction(tx),
            rx: direction(rx),
        }
    }

    /// A sealed splice on a thread between a "primary" sealing with
    /// the mirror of the splice's keys and a unix "server".
    struct Harness {
        to: SealedWriter<TcpStream>,
        from: SealedReader<TcpStream>,
        raw: TcpStream,
        server: UnixStream,
        ended: std::thread::JoinHandle<SpliceEnd>,
    }

    fn harness() -> Harness {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let raw = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (peer, _) = listener.accept().unwrap();
        let (server, spliced) = UnixStream::pair().unwrap();
        let ended = std::thread::spawn(move || splice(peer, &keys(2, 1), spliced));
        let primary = keys(1, 2);
        Harness {
            to: SealedWriter::new(raw.try_clone().unwrap(), &primary).unwrap(),
            from: SealedReader::new(raw.try_clone().unwrap(), &primary).unwrap(),
            raw,
            server,
            ended,
        }
    }

    fn passes(from: &mut (impl Write + Send), to: &mut impl Read, n: usize) {
        let bytes: Vec<u8> = (0..n).map(|i| (i * 7 + n) as u8).collect();
        std::thread::scope(|s| {
            s.spawn(|| from.write_all(&bytes).unwrap());
            let mut got = vec![0; n];
            to.read_exact(&mut got).unwrap();
            assert!(got == bytes, "the splice changed {n} bytes");
        });
    }

    #[test]
    fn bytes_pass_both_ways_opened_and_sealed() {
        let mut h = harness();
        for n in [1, 28, 4096 + 28, 1 << 20] {
            passes(&mut h.to, &mut h.server, n);
            passes(&mut h.server, &mut h.from, n.min(64 << 10));
        }
        // What the server sends crosses the network sealed.
        h.server.write_all(b"plain reply").unwrap();
        let mut wire = [0; 64];
        let n = h.raw.read(&mut wire).unwrap();
        assert!(n > 11 && !wire[..n].windows(11).any(|w| w == b"plain reply"));
        assert!(!h.ended.is_finished());
    }

    #[test]
    fn the_primary_closing_closes_the_server_end() {
        let mut h = harness();
        passes(&mut h.to, &mut h.server, 100);
        h.raw.shutdown(std::net::Shutdown::Both).unwrap();
        let mut byte = [0; 1];
        assert_eq!(h.server.read(&mut byte).unwrap(), 0);
        assert_eq!(h.ended.join().unwrap(), SpliceEnd::PeerClosed);
    }

    #[test]
    fn the_server_closing_closes_the_primarys_connection() {
        let mut h = harness();
        drop(h.server);
        let mut byte = [0; 1];
        assert!(matches!(h.raw.read(&mut byte), Ok(0) | Err(_)));
        assert_eq!(h.ended.join().unwrap(), SpliceEnd::ServerClosed);
    }

    /// A record altered on the way ends the splice: nothing of it
    /// reaches the server.
    #[test]
    fn an_altered_record_ends_the_splice() {
        let mut h = harness();
        let mut record = vec![];
        SealedWriter::new(&mut record, &keys(1, 2))
            .unwrap()
            .write_all(b"a write")
            .unwrap();
        record[7] ^= 1;
        h.raw.write_all(&record).unwrap();
        let mut byte = [0; 1];
        assert!(matches!(h.server.read(&mut byte), Ok(0) | Err(_)));
        let end = h.ended.join().unwrap();
        assert!(
            matches!(&end, SpliceEnd::Failed(e) if e.contains("integrity")),
            "{end:?}"
        );
    }
}
