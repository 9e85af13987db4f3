//! The peer port's handshake on real loopback connections: node `b`
//! serves its peer port on a free port of 127.0.0.1 (every node of the
//! fleet is advertised there), and a test plays its peers, good and bad.
//! A volume kept on `a` (primary) and `b` (replica), outdated, so that a
//! `Replica` hello that got through would empty and serve b's copy.

use std::net::SocketAddr;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};

use super::super::peers::read_json_line;
use super::super::volumes::ReplicaConnection;
use super::*;
use crate::peer_auth::{Challenge, PeerKey, PeerSecret, SignedHello, Verdict};

/// Serves node `name`'s peer port on a free loopback port.
async fn listen(fleet: &Fleet, name: &str) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(fleet.node(name).serve_peers(listener));
    addr
}

/// A connection to `to` from address `source`.
async fn connect_from(source: &str, to: SocketAddr) -> TcpStream {
    let socket = TcpSocket::new_v4().unwrap();
    socket
        .bind(SocketAddr::new(source.parse().unwrap(), 0))
        .unwrap();
    socket.connect(to).await.unwrap()
}

/// What a test answers a challenge with.
type Answer = Box<dyn FnOnce(&Challenge) -> SignedHello + Send>;

/// Reads the challenge on `stream`, answers it with what `answer` makes of
/// it, and returns the verdict.
async fn handshake(
    stream: &mut TcpStream,
    answer: impl FnOnce(&Challenge) -> SignedHello,
) -> Verdict {
    let challenge: Challenge = read_json_line(stream).await.unwrap();
    stream.write_all(&line(&answer(&challenge))).await.unwrap();
    read_json_line(stream).await.unwrap()
}

fn text(hello: &Hello) -> String {
    String::from_utf8(json(hello)).unwrap()
}

fn replica_hello(primary: &str) -> Hello {
    Hello::Replica {
        volume: "data".into(),
        primary: primary.into(),
        empty: true,
    }
}

/// Node `name`'s copy of volume `volume`: its file.
fn copy_file(fleet: &Fleet, name: &str, volume: &str) -> std::path::PathBuf {
    let engine = &fleet.member(name).engine.engine;
    let id = engine.volume(volume).unwrap().id;
    vroom_volume::data::volume_file(&engine.config().data_dir.join("volumes"), &id)
}

/// A node's proven hellos pass: an image fetched (b has none by that id:
/// it says so, past the handshake) and a replica asked for by the
/// volume's primary (refused only because b's copy is up to date, which
/// b checks after admitting the connection).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proven_hello_is_admitted() {
    let fleet = Fleet::new(&["a", "b"]).await;
    replicated_volume(&fleet, "data", ReplicaState::UpToDate).await;
    let addr = listen(&fleet, "b").await.to_string();
    let a = fleet.node("a");
    let id = "0".repeat(64);
    assert_eq!(a.fetch_image(&id, ("b", &addr)).await, Ok(false));
    let err = a
        .connect_replica("data", ("b", &addr), true)
        .await
        .unwrap_err();
    assert!(err.contains("is up to date"), "{err}");
    // The node a client meant is the one that answers.
    let err = a.fetch_image(&id, ("c", &addr)).await.unwrap_err();
    assert!(err.contains("node b answers at node c's address"), "{err}");
}

/// Everything written to `inner`, kept.
struct Tee<W> {
    inner: W,
    written: std::sync::Arc<std::sync::Mutex<Vec<u8>>>,
}

impl<W: std::io::Write> std::io::Write for Tee<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.written.lock().unwrap().extend_from_slice(&buf[..n]);
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// Speaks NBD on the replica's stream `conn` as the primary's relay does
/// (TLS records with its keys): the fixed newstyle handshake, the old way
/// to choose the export, then a write of `payload` at 1 MiB and its reply.
/// Returns the bytes sent on the network, and the stream, still open.
fn nbd_write(conn: ReplicaConnection, payload: &[u8]) -> (Vec<u8>, std::net::TcpStream) {
    use std::io::{Read, Write};
    use vroom_volume::relay::sealed::{SealedReader, SealedWriter};
    let tcp = super::super::peers::into_blocking(conn.stream).unwrap();
    let written = std::sync::Arc::default();
    let tee = Tee {
        inner: tcp.try_clone().unwrap(),
        written: std::sync::Arc::clone(&written),
    };
    let mut to = SealedWriter::new(tee, &conn.keys).unwrap();
    let mut from = SealedReader::new(tcp.try_clone().unwrap(), &conn.keys).unwrap();
    let mut greeting = [0; 18];
    from.read_exact(&mut greeting).unwrap();
    assert_eq!(&greeting[..16], b"NBDMAGICIHAVEOPT", "{greeting:?}");
    to.write_all(&3u32.to_be_bytes()).unwrap(); // fixed newstyle, no zeroes
    let export = b"replica-data";
    let mut option = b"IHAVEOPT".to_vec();
    option.extend(1u32.to_be_bytes()); // NBD_OPT_EXPORT_NAME
    option.extend((export.len() as u32).to_be_bytes());
    option.extend(export);
    to.write_all(&option).unwrap();
    let mut exported = [0; 10];
    from.read_exact(&mut exported).unwrap();
    assert_eq!(
        u64::from_be_bytes(exported[..8].try_into().unwrap()),
        16 << 20,
        "the export's size"
    );
    let mut write = 0x2560_9513u32.to_be_bytes().to_vec();
    write.extend(0u16.to_be_bytes()); // flags
    write.extend(1u16.to_be_bytes()); // NBD_CMD_WRITE
    write.extend(7u64.to_be_bytes()); // cookie
    write.extend((1u64 << 20).to_be_bytes());
    write.extend((payload.len() as u32).to_be_bytes());
    write.extend(payload);
    to.write_all(&write).unwrap();
    let mut reply = [0; 16];
    from.read_exact(&mut reply).unwrap();
    assert_eq!(&reply[..4], &0x6744_6698u32.to_be_bytes(), "{reply:?}");
    assert_eq!(&reply[4..8], &[0; 4], "the write failed: {reply:?}");
    assert_eq!(&reply[8..], &7u64.to_be_bytes());
    let sent = written.lock().unwrap().clone();
    (sent, tcp)
}

/// Stops node `name`'s server of its copy of `volume` when dropped: a
/// failed test leaves no `qemu-nbd` behind.
struct StopsServer<'a>(&'a Fleet, &'static str, &'static str);

impl Drop for StopsServer<'_> {
    fn drop(&mut self) {
        self.0
            .member(self.1)
            .engine
            .engine
            .stop_replica_server(self.2);
    }
}

/// The replica's copy is reached only through the proven connection that
/// asked for it: the primary's NBD client speaks on that very connection
/// (a real `qemu-nbd` on b answers, and its write lands in b's copy), and
/// b's server listens on a unix socket, on no TCP port.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_is_written_only_through_the_proven_connection() {
    let fleet = Fleet::new(&["a", "b"]).await;
    replicated_volume(&fleet, "data", ReplicaState::Outdated).await;
    let _stop = StopsServer(&fleet, "b", "data");
    let addr = listen(&fleet, "b").await.to_string();
    let conn = fleet
        .node("a")
        .connect_replica("data", ("b", &addr), true)
        .await
        .unwrap();
    let payload = b"proven!!";
    let (on_the_wire, nbd) = tokio::task::spawn_blocking(move || nbd_write(conn, payload))
        .await
        .unwrap();
    // What crossed the network is sealed: the written bytes are not in it.
    assert!(
        on_the_wire.len() > payload.len()
            && !on_the_wire
                .windows(payload.len())
                .any(|w| w == payload.as_slice()),
        "the payload crossed the network in plaintext"
    );
    // Written through before the reply: it is in b's file now.
    let copy = std::fs::read(copy_file(&fleet, "b", "data")).unwrap();
    assert_eq!(&copy[1 << 20..(1 << 20) + payload.len()], payload);

    let b = &fleet.member("b").engine.engine;
    assert!(b.serves_replica("data"));
    let server = b.config().data_dir.join("replicas/data.pid");
    let pid = std::fs::read_to_string(&server).unwrap();
    let cmdline = std::fs::read_to_string(format!("/proc/{}/cmdline", pid.trim())).unwrap();
    let args: Vec<&str> = cmdline.split('\0').collect();
    assert!(
        args.iter().any(|a| a.starts_with("--socket="))
            && !args
                .iter()
                .any(|a| a.starts_with("--port") || a.starts_with("--bind")),
        "b's server listens on the network: {args:?}"
    );
    // The primary gone, the splice closed the server's end: the server
    // (one client at a time) greets the next one.
    drop(nbd);
    let socket = b.config().data_dir.join("replicas/data.sock");
    let mut next = tokio::net::UnixStream::connect(&socket).await.unwrap();
    let mut greeting = [0; 16];
    tokio::time::timeout(Duration::from_secs(5), next.read_exact(&mut greeting))
        .await
        .expect("the server still serves the primary that went away")
        .unwrap();
    assert_eq!(&greeting, b"NBDMAGICIHAVEOPT");
}

/// Nodes a, b and c; volume `data` with its primary on a and an outdated
/// replica on b (bytes in b's copy that emptying would take away), and
/// volume `fresh`, whose replica b has no copy of yet (serving makes one);
/// b's peer port, and a check that neither changed.
async fn outdated_and_fresh() -> (Fleet, SocketAddr, impl Fn(&Fleet, &str)) {
    let fleet = Fleet::new(&["a", "b", "c"]).await;
    replicated_volume(&fleet, "data", ReplicaState::Outdated).await;
    let mut fresh = volume_record(&fleet, "data").await;
    fresh.name = "fresh".into();
    fleet
        .store
        .put(&key(VOLUMES, "fresh"), json(&fresh))
        .await
        .unwrap();
    let copy = copy_file(&fleet, "b", "data");
    {
        let mut file = std::fs::OpenOptions::new().write(true).open(&copy).unwrap();
        std::io::Write::write_all(&mut file, b"b's copy before any hello").unwrap();
    }
    let before = std::fs::read(&copy).unwrap();
    let addr = listen(&fleet, "b").await;
    let unchanged = move |fleet: &Fleet, what: &str| {
        assert!(
            std::fs::read(&copy).unwrap() == before,
            "{what} changed b's copy"
        );
        let b = &fleet.member("b").engine.engine;
        assert!(b.volume("fresh").is_err(), "{what} made a copy");
    };
    (fleet, addr, unchanged)
}

/// Every hello that is not proven by a live node from its own address, or
/// asks for a replica its node is not the primary of, is refused, and
/// nothing changes: the replica's copy keeps its bytes, and a copy b lacks
/// is not made.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unproven_or_misplaced_hellos_are_refused_and_change_nothing() {
    let (fleet, addr, unchanged) = outdated_and_fresh().await;
    let proof_key = fleet.node("a").peer_key.clone();
    let wrong_key = PeerSecret::generate().unwrap().key();
    let not_authenticated = "not authenticated";

    // A hello without a proof, said at once (as vroom before the handshake did).
    for volume in ["data", "fresh"] {
        let mut raw = connect_from("127.0.0.1", addr).await;
        let hello = Hello::Replica {
            volume: volume.into(),
            primary: "a".into(),
            empty: true,
        };
        raw.write_all(&line(&hello)).await.unwrap();
        let _: Challenge = read_json_line(&mut raw).await.unwrap();
        let verdict: Verdict = read_json_line(&mut raw).await.unwrap();
        assert_eq!(
            verdict,
            Verdict::Refused {
                reason: not_authenticated.into()
            },
            "an unproven hello for {volume}"
        );
    }

    // A proof made for another connection (its nonce), replayed here.
    let mut first = connect_from("127.0.0.1", addr).await;
    let first_challenge: Challenge = read_json_line(&mut first).await.unwrap();
    let captured = SignedHello::new(&proof_key, &first_challenge, "a", text(&replica_hello("a")));
    drop(first);

    let proven = |key: &PeerKey, client: &str, hello: Hello| -> Answer {
        let (key, client) = (key.clone(), client.to_string());
        Box::new(move |c| SignedHello::new(&key, c, &client, text(&hello)))
    };
    let altered = {
        let image = Hello::Image { id: "0".repeat(64) };
        let proven_image = proven(&proof_key, "a", image);
        Box::new(move |c: &Challenge| {
            let mut signed = proven_image(c);
            signed.hello = text(&replica_hello("a"));
            signed
        })
    };
    let cases: Vec<(&str, &str, Answer, &str)> = vec![
        (
            "another cluster's secret",
            "127.0.0.1",
            proven(&wrong_key, "a", replica_hello("a")),
            not_authenticated,
        ),
        (
            "a proof replayed from another connection",
            "127.0.0.1",
            Box::new(move |_| captured),
            not_authenticated,
        ),
        (
            "a hello altered after it was proven",
            "127.0.0.1",
            altered,
            not_authenticated,
        ),
        (
            "a node that is not in the cluster",
            "127.0.0.1",
            proven(&proof_key, "z", replica_hello("z")),
            "node z is not a live member of the cluster",
        ),
        (
            "a node at another address than its own",
            "127.0.0.2",
            proven(&proof_key, "a", replica_hello("a")),
            "node a is advertised at 127.0.0.1, not at 127.0.0.2",
        ),
        (
            "a node that is not the volume's primary",
            "127.0.0.1",
            proven(&proof_key, "c", replica_hello("c")),
            "volume data's copies are on a (primary) and b (replica), not c and b",
        ),
        (
            "a node asking in the primary's name",
            "127.0.0.1",
            proven(&proof_key, "c", replica_hello("a")),
            "node c asked for volume data's replica for node a",
        ),
    ];
    for (what, source, answer, reason) in cases {
        let mut stream = connect_from(source, addr).await;
        let verdict = handshake(&mut stream, answer).await;
        assert_eq!(
            verdict,
            Verdict::Refused {
                reason: reason.into()
            },
            "{what}"
        );
    }

    // A migration's control connection from a node that is not its source.
    fleet
        .store
        .put(
            &key(MIGRATIONS, "web"),
            json(&MigrationRecord {
                id: "m1".into(),
                from: "a".into(),
                to: "b".into(),
                token: 1,
                secret: "s".into(),
                requested_at: now_secs(),
                state: MigrationState::Requested,
            }),
        )
        .await
        .unwrap();
    let control = Hello::Control {
        instance: "web".into(),
        migration: "m1".into(),
        secret: "s".into(),
        ready: true,
    };
    let mut stream = connect_from("127.0.0.1", addr).await;
    let verdict = handshake(&mut stream, |c| {
        SignedHello::new(&proof_key, c, "c", text(&control))
    })
    .await;
    assert_eq!(
        verdict,
        Verdict::Refused {
            reason: "the migration of web comes from node a, not c".into()
        }
    );

    unchanged(&fleet, "a refused hello");
}

/// A primary whose hello was proven still gets nothing from the replica's
/// node without its own certificate of this cluster on the TLS that
/// follows: another cluster's certificate in its name, none, or another
/// node's are each refused, before b's copy is emptied or a copy made.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proven_primary_without_its_certificate_changes_nothing() {
    use std::sync::Arc;
    use vroom_client::tls::{crypto_provider, read_roots, CA_FILE};
    let (fleet, addr, unchanged) = outdated_and_fresh().await;
    let proof_key = fleet.node("a").peer_key.clone();
    let cluster_tls = fleet.node("b").tls_dir();

    let dir = tempfile::tempdir().unwrap();
    let foreign = dir.path().join("foreign");
    crate::tls::Ca::generate("another")
        .unwrap()
        .issue("a", &["a".into(), "127.0.0.1".into()], &foreign)
        .unwrap();
    // It trusts this cluster's CA: only its own certificate is foreign.
    std::fs::copy(cluster_tls.join(CA_FILE), foreign.join(CA_FILE)).unwrap();
    let no_certificate = rustls::ClientConfig::builder_with_provider(crypto_provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(read_roots(&cluster_tls).unwrap())
        .with_no_client_auth();
    let cases = [
        (
            "another cluster's certificate",
            crate::tls::replication_client(&foreign).unwrap(),
        ),
        ("no certificate", Arc::new(no_certificate)),
        (
            "node c's certificate",
            crate::tls::replication_client(&fleet.node("c").tls_dir()).unwrap(),
        ),
    ];
    for volume in ["data", "fresh"] {
        for (what, config) in &cases {
            let mut stream = connect_from("127.0.0.1", addr).await;
            let hello = Hello::Replica {
                volume: volume.into(),
                primary: "a".into(),
                empty: true,
            };
            let verdict = handshake(&mut stream, |c| {
                SignedHello::new(&proof_key, c, "a", text(&hello))
            })
            .await;
            assert_eq!(verdict, Verdict::Accepted, "{what}: the hello is proven");
            let name = rustls::pki_types::ServerName::try_from("b").unwrap();
            let answered = match tokio_rustls::TlsConnector::from(config.clone())
                .connect(name, stream)
                .await
            {
                // TLS 1.3: the client is done before the server judged it.
                Ok(mut tls) => tokio::time::timeout(Duration::from_secs(10), tls.read_u8())
                    .await
                    .expect("the server neither answered nor closed"),
                Err(e) => Err(e),
            };
            assert!(
                answered.is_err(),
                "{what}: the replica's node answered {answered:?} for {volume}"
            );
        }
    }
    unchanged(&fleet, "a refused certificate");
}
