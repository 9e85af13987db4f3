//! Serving the API: one accept loop for the unix socket and for the
//! cluster's TCP API (mutual TLS), with bounds so that no client can take
//! the daemon's file descriptors or memory (22,000 idle connections once
//! took vroomd to its fd limit and `vroom ps` timed out).
//!
//! - Connections are counted per peer (its uid on the unix socket, through
//!   `SO_PEERCRED`; its address on TCP) and in all, per listener. A
//!   connection beyond a bound is accepted and closed at once, so it holds
//!   no descriptor and the backlog never fills.
//! - A share of the connections is reserved for privileged peers (root, or
//!   the daemon's own uid): the CLI and recovery still get in while group
//!   members hold all the others.
//! - Request headers must arrive within [`HEADER_TIMEOUT`]; hyper's timer
//!   also runs while a kept-alive connection waits for its next request, so
//!   the same bound closes idle connections. Only HTTP/1 is served (the
//!   client speaks nothing else), so no protocol sniffing waits unbounded.
//! - The soft `RLIMIT_NOFILE` is raised to the hard one at start, and the
//!   bounds follow from it (or from `VROOM_API_MAX_CONNECTIONS`).

pub mod tls;

use std::collections::HashMap;
use std::future::Future;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::ConnectInfo;
use axum::Router;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use vroom_api::Caller;

/// How long a client may take to send a request's headers, and how long a
/// kept-alive connection may wait for its next request.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a TLS handshake may take.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// The environment variable that sets [`Limits::total`] (tests lower it).
const MAX_CONNECTIONS_ENV: &str = "VROOM_API_MAX_CONNECTIONS";

/// The bounds on one listener's connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Open connections in all.
    pub total: usize,
    /// Open connections of one unprivileged peer.
    pub per_peer: usize,
    /// Connections only privileged peers may use.
    pub reserved: usize,
}

impl Limits {
    /// Bounds for a total: a peer may hold a quarter of it, an eighth is
    /// kept for privileged peers.
    pub fn for_total(total: usize) -> Limits {
        let total = total.max(2);
        Limits {
            total,
            per_peer: (total / 4).max(1),
            reserved: (total / 8).max(1),
        }
    }

    /// Bounds for a daemon that may open `nofile` descriptors: each of its
    /// two listeners may use a quarter of them for connections (VMs, their
    /// monitors, logs and taps need the rest), at most 1,024 each, which
    /// also bounds the memory idle connections take.
    pub fn for_fd_limit(nofile: u64) -> Limits {
        Limits::for_total((nofile / 4).clamp(16, 1024) as usize)
    }

    /// From the environment when set, else from the fd limit.
    pub fn from_env(nofile: u64) -> Limits {
        match std::env::var(MAX_CONNECTIONS_ENV)
            .ok()
            .and_then(|v| v.parse::<usize>().ok())
        {
            Some(total) => Limits::for_total(total),
            None => Limits::for_fd_limit(nofile),
        }
    }
}

/// Who is at the other end of a connection, as far as the bounds go.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Peer {
    Uid(u32),
    Addr(IpAddr),
    /// A unix peer whose credentials could not be read.
    Unknown,
}

/// Why a connection was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    Total,
    PerPeer,
}

/// Whether one more connection of a peer is admitted, given the open
/// connections in all and of that peer.
pub fn admits(
    limits: Limits,
    open_total: usize,
    open_of_peer: usize,
    privileged: bool,
) -> Result<(), Refusal> {
    if privileged {
        return if open_total < limits.total {
            Ok(())
        } else {
            Err(Refusal::Total)
        };
    }
    if open_total >= limits.total - limits.reserved {
        return Err(Refusal::Total);
    }
    if open_of_peer >= limits.per_peer {
        return Err(Refusal::PerPeer);
    }
    Ok(())
}

/// The open connections of one listener.
pub struct Gate {
    limits: Limits,
    /// Uids whose connections may use the reserve.
    privileged: Vec<u32>,
    open: Mutex<Open>,
}

#[derive(Default)]
struct Open {
    total: usize,
    of_peer: HashMap<Peer, usize>,
    /// When the last refusal was logged: a flood logs once a second.
    logged: Option<std::time::Instant>,
}

/// An admitted connection; dropping it frees its place.
pub struct Permit {
    gate: Arc<Gate>,
    peer: Peer,
}

impl Drop for Permit {
    fn drop(&mut self) {
        let mut open = self.gate.open.lock().expect("invariant: not poisoned");
        open.total -= 1;
        if let Some(n) = open.of_peer.get_mut(&self.peer) {
            *n -= 1;
            if *n == 0 {
                open.of_peer.remove(&self.peer);
            }
        }
    }
}

impl Gate {
    pub fn new(limits: Limits) -> Arc<Gate> {
        // SAFETY: geteuid has no preconditions and cannot fail.
        let me = unsafe { libc::geteuid() };
        Arc::new(Gate {
            limits,
            privileged: vec![0, me],
            open: Mutex::new(Open::default()),
        })
    }

    /// Admits a connection of `peer`, or says why not (and logs it, at
    /// most once a second).
    pub fn admit(self: &Arc<Self>, peer: Peer) -> Option<Permit> {
        let privileged = matches!(peer, Peer::Uid(uid) if self.privileged.contains(&uid));
        let mut open = self.open.lock().expect("invariant: not poisoned");
        let of_peer = open.of_peer.get(&peer).copied().unwrap_or(0);
        if let Err(why) = admits(self.limits, open.total, of_peer, privileged) {
            let now = std::time::Instant::now();
            if open
                .logged
                .is_none_or(|t| now.duration_since(t) >= Duration::from_secs(1))
            {
                open.logged = Some(now);
                tracing::warn!(?peer, ?why, open = open.total, limits = ?self.limits,
                    "refused an API connection: too many open; the peer's are closed when it sends no request within {}s",
                    HEADER_TIMEOUT.as_secs());
            }
            return None;
        }
        open.total += 1;
        *open.of_peer.entry(peer).or_default() += 1;
        Some(Permit {
            gate: self.clone(),
            peer,
        })
    }
}

/// Raises the soft limit on open files to the hard one; returns the limit
/// in force.
pub fn raise_fd_limit() -> u64 {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes only into `limit`.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return 1024;
    }
    if limit.rlim_cur < limit.rlim_max {
        let raised = libc::rlimit {
            rlim_cur: limit.rlim_max,
            rlim_max: limit.rlim_max,
        };
        // SAFETY: setrlimit reads only `raised`.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
            limit = raised;
        } else {
            tracing::warn!(soft = limit.rlim_cur, hard = limit.rlim_max, error = %std::io::Error::last_os_error(), "cannot raise the open-files limit");
        }
    }
    limit.rlim_cur
}

/// A listener the API is served on.
pub enum Endpoint {
    Unix(tokio::net::UnixListener),
    Tls(tokio::net::TcpListener, tokio_rustls::TlsAcceptor),
}

/// An accepted connection, before TLS.
enum Stream {
    Unix(tokio::net::UnixStream),
    Tls(tokio::net::TcpStream, tokio_rustls::TlsAcceptor),
}

impl Endpoint {
    async fn accept(&self) -> std::io::Result<(Stream, Peer, Caller)> {
        match self {
            Endpoint::Unix(listener) => {
                let (stream, _) = listener.accept().await?;
                let (peer, caller) = match stream.peer_cred() {
                    Ok(cred) => (
                        Peer::Uid(cred.uid()),
                        Caller {
                            uid: Some(cred.uid()),
                            gid: Some(cred.gid()),
                            pid: cred.pid(),
                        },
                    ),
                    Err(_) => (Peer::Unknown, Caller::UNKNOWN),
                };
                Ok((Stream::Unix(stream), peer, caller))
            }
            // Holders of a cluster certificate act as no local user (a
            // build reads only catalog recipes for them; the audit log
            // says so).
            Endpoint::Tls(listener, acceptor) => {
                let (stream, addr) = listener.accept().await?;
                Ok((
                    Stream::Tls(stream, acceptor.clone()),
                    Peer::Addr(addr.ip()),
                    Caller::UNKNOWN,
                ))
            }
        }
    }
}

/// Serves `router` on `endpoint` within `limits` until `shutdown`
/// completes; then waits for the requests under way.
pub async fn serve(
    endpoint: Endpoint,
    router: Router,
    limits: Limits,
    shutdown: impl Future<Output = ()>,
) {
    let gate = Gate::new(limits);
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let accepted = tokio::select! {
            accepted = endpoint.accept() => accepted,
            () = &mut shutdown => break,
        };
        let (stream, peer, caller) = match accepted {
            Ok(accepted) => accepted,
            Err(e) => {
                // Out of descriptors (or a transient error): let the
                // timeouts close connections instead of spinning.
                tracing::warn!(error = %e, "cannot accept an API connection");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Some(permit) = gate.admit(peer) else {
            drop(stream);
            continue;
        };
        let router = router.clone();
        let stop = stop_rx.clone();
        tokio::spawn(async move {
            let _permit = permit;
            match stream {
                Stream::Unix(stream) => connection(stream, router, caller, None, stop).await,
                Stream::Tls(tcp, acceptor) => {
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                        Ok(Ok(tls)) => {
                            let name = tls
                                .get_ref()
                                .1
                                .peer_certificates()
                                .and_then(|chain| chain.first())
                                .and_then(|cert| vroom_client::tls::common_name(cert));
                            connection(tls, router, caller, name, stop).await
                        }
                        Ok(Err(e)) => {
                            tracing::warn!(?peer, error = %e, "refused an API connection")
                        }
                        Err(_) => tracing::debug!(?peer, "a TLS handshake timed out"),
                    }
                }
            }
        });
    }
    drop(stop_rx);
    let _ = stop_tx.send(true);
    // Every connection holds a receiver; they are gone when all have ended.
    stop_tx.closed().await;
}

/// Serves one connection: HTTP/1 with a header timeout, the caller's
/// credentials in each request's extensions; ends gracefully (the request
/// under way is finished) when `stop` turns true.
async fn connection<I>(
    io: I,
    router: Router,
    caller: Caller,
    certificate: Option<String>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let service = hyper::service::service_fn(move |mut request: hyper::Request<_>| {
        request.extensions_mut().insert(ConnectInfo(caller));
        if let Some(name) = &certificate {
            request
                .extensions_mut()
                .insert(vroom_api::PeerCertificate(name.clone()));
        }
        let mut router = router.clone();
        async move {
            use tower::Service;
            router.call(request.map(axum::body::Body::new)).await
        }
    });
    let mut builder =
        hyper_util::server::conn::auto::Builder::new(TokioExecutor::new()).http1_only();
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT);
    let conn = builder.serve_connection(TokioIo::new(io), service);
    let mut conn = std::pin::pin!(conn);
    let served = tokio::select! {
        served = conn.as_mut() => served,
        _ = async { stop.wait_for(|stop| *stop).await.is_ok() } => {
            conn.as_mut().graceful_shutdown();
            conn.await
        }
    };
    if let Err(e) = served {
        tracing::debug!(error = %e, "an API connection ended");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_follow_the_fd_limit() {
        assert_eq!(
            Limits::for_fd_limit(20_000),
            Limits {
                total: 1024,
                per_peer: 256,
                reserved: 128
            }
        );
        assert_eq!(Limits::for_fd_limit(1024).total, 256);
        assert_eq!(Limits::for_fd_limit(8).total, 16);
    }

    /// (open in all, open of the peer, privileged, answer) for 64
    /// connections: 16 a peer, 8 kept for privileged peers.
    #[test]
    fn admission_table() {
        let limits = Limits::for_total(64);
        let cases = [
            (0, 0, false, Ok(())),
            (15, 15, false, Ok(())),
            (16, 16, false, Err(Refusal::PerPeer)),
            (55, 0, false, Ok(())),
            (56, 0, false, Err(Refusal::Total)),
            (56, 0, true, Ok(())),
            (63, 40, true, Ok(())),
            (64, 0, true, Err(Refusal::Total)),
        ];
        for (total, of_peer, privileged, want) in cases {
            assert_eq!(
                admits(limits, total, of_peer, privileged),
                want,
                "{total} open, {of_peer} of the peer, privileged {privileged}"
            );
        }
    }

    /// The cluster's TCP API through the same loop: a client with a
    /// certificate of the cluster's CA is served; connections of one
    /// address are bounded (raw TCP, never past the handshake, holds a
    /// place only until closed), and a refused one is closed at once.
    #[tokio::test]
    async fn the_tls_endpoint_serves_and_bounds_per_address() {
        let dir = tempfile::tempdir().unwrap();
        let ca = vroom_cluster::tls::Ca::generate("test").unwrap();
        let (server, client) = (dir.path().join("server"), dir.path().join("client"));
        ca.issue("n1", &["127.0.0.1".to_string()], &server).unwrap();
        ca.issue("cli", &[], &client).unwrap();
        let config = tls::server_config(&server).unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let t = vroom_core::testing::TestEngine::new(&dir.path().join("data"));
        let endpoint = Endpoint::Tls(listener, tokio_rustls::TlsAcceptor::from(config));
        tokio::spawn(serve(
            endpoint,
            vroom_api::router(std::sync::Arc::new(vroom_core::service::Local::new(
                t.engine.clone(),
            ))),
            Limits::for_total(8),
            std::future::pending(),
        ));
        let api = vroom_client::Client::remote(&addr.to_string(), &client).unwrap();
        api.version().await.expect("served over TLS");
        // The server sees that connection end.
        tokio::time::sleep(Duration::from_millis(200)).await;

        // 2 an address: two idle TCP connections take this one's places.
        let mut idle = vec![];
        for _ in 0..2 {
            idle.push(tokio::net::TcpStream::connect(addr).await.unwrap());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(
            api.version().await.is_err(),
            "a third connection is refused"
        );
        drop(idle);
        tokio::time::sleep(Duration::from_millis(200)).await;
        api.version().await.expect("served again once they closed");
    }

    #[test]
    fn permits_are_returned_on_drop() {
        let gate = Gate::new(Limits::for_total(8));
        let peer = Peer::Uid(4242);
        let held: Vec<Permit> = (0..2).map_while(|_| gate.admit(peer)).collect();
        assert_eq!(held.len(), 2);
        assert!(gate.admit(peer).is_none(), "2 a peer");
        assert!(gate.admit(Peer::Uid(4343)).is_some());
        drop(held);
        assert!(gate.admit(peer).is_some());
        let open = gate.open.lock().unwrap();
        assert_eq!(open.total, 0);
        assert!(open.of_peer.is_empty());
    }
}
