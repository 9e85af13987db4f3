//! The host end of the agent channel: one multiplexed connection per
//! instance to the unix socket QEMU serves for the guest's agent port.
//! Everything read from it is untrusted guest output.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::unix::OwnedWriteHalf;
use tokio::net::UnixStream;
use tokio::sync::oneshot;
use vroom_agent_proto::{encode_frame, FrameDecoder, GuestReply, HostCommand, Request, Response};

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("cannot reach the guest agent")]
    Connect(#[source] std::io::Error),
    #[error("the guest agent did not answer within {0:?}")]
    Timeout(Duration),
    #[error("the agent connection closed")]
    Closed,
    #[error("the request is too large to send")]
    TooLarge,
}

type Pending = Arc<Mutex<HashMap<u64, oneshot::Sender<GuestReply>>>>;

struct Conn {
    writer: OwnedWriteHalf,
    pending: Pending,
    alive: Arc<std::sync::atomic::AtomicBool>,
}

pub struct AgentClient {
    socket: PathBuf,
    conn: tokio::sync::Mutex<Option<Conn>>,
    next_id: AtomicU64,
}

impl AgentClient {
    pub fn new(socket: PathBuf) -> Self {
        // Ids start from the clock so replies meant for an earlier daemon never match.
        let start = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_micros() as u64)
            .unwrap_or(1);
        AgentClient {
            socket,
            conn: tokio::sync::Mutex::new(None),
            next_id: AtomicU64::new(start),
        }
    }

    /// Drops the connection, e.g. after the VMM exited.
    pub async fn reset(&self) {
        *self.conn.lock().await = None;
    }

    pub async fn call(
        &self,
        command: HostCommand,
        timeout: Duration,
    ) -> Result<GuestReply, AgentError> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let payload =
            serde_json::to_vec(&Request { id, command }).map_err(|_| AgentError::TooLarge)?;
        let frame = encode_frame(&payload).ok_or(AgentError::TooLarge)?;
        let (tx, rx) = oneshot::channel();
        {
            let mut guard = self.conn.lock().await;
            if guard
                .as_ref()
                .is_none_or(|c| !c.alive.load(Ordering::Relaxed))
            {
                *guard = Some(self.connect().await?);
            }
            let conn = guard.as_mut().expect("invariant: connected above");
            conn.pending
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(id, tx);
            if let Err(e) = conn.writer.write_all(&frame).await {
                *guard = None;
                return Err(AgentError::Connect(e));
            }
        }
        match tokio::time::timeout(timeout, rx).await {
            Ok(Ok(reply)) => Ok(reply),
            Ok(Err(_)) => Err(AgentError::Closed),
            Err(_) => {
                if let Some(conn) = self.conn.lock().await.as_ref() {
                    conn.pending
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .remove(&id);
                }
                Err(AgentError::Timeout(timeout))
            }
        }
    }

    async fn connect(&self) -> Result<Conn, AgentError> {
        let stream = UnixStream::connect(&self.socket)
            .await
            .map_err(AgentError::Connect)?;
        let (mut reader, writer) = stream.into_split();
        let pending: Pending = Arc::default();
        let alive = Arc::new(std::sync::atomic::AtomicBool::new(true));
        let (pending_r, alive_r) = (pending.clone(), alive.clone());
        tokio::spawn(async move {
            let mut decoder = FrameDecoder::new();
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                let n = match reader.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => n,
                };
                decoder.push(&buf[..n]);
                loop {
                    match decoder.next_frame() {
                        Ok(Some(frame)) => match serde_json::from_slice::<Response>(&frame) {
                            Ok(resp) => {
                                let waiter = pending_r
                                    .lock()
                                    .unwrap_or_else(|p| p.into_inner())
                                    .remove(&resp.id);
                                if let Some(waiter) = waiter {
                                    let _ = waiter.send(resp.reply);
                                }
                            }
                            Err(e) => {
                                tracing::warn!(error = %e, "discarding an unparsable agent message")
                            }
                        },
                        Ok(None) => break,
                        Err(e) => tracing::warn!(error = %e, "agent stream out of sync"),
                    }
                }
            }
            alive_r.store(false, Ordering::Relaxed);
            pending_r.lock().unwrap_or_else(|p| p.into_inner()).clear();
        });
        Ok(Conn {
            writer,
            pending,
            alive,
        })
    }
}
