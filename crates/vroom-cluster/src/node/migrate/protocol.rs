//! The lines of a migration's control connection and how each side reads
//! them; the secret that admits its connections.

use std::io::{BufRead, Read};

use tokio::io::AsyncBufReadExt;
use vroom_core::console::ConsoleHistory;

use super::*;

/// The lines of a control connection.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub(in crate::node) enum Control {
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
pub(in crate::node) const CONSOLE_WAIT: Duration = Duration::from_secs(10);

pub(in crate::node) fn secret() -> String {
    format!("{:032x}", rand::random::<u128>())
}

/// A pending incoming migration's data connection, once it arrives.
pub(in crate::node) type DataSlot = std::sync::mpsc::SyncSender<std::net::TcpStream>;

/// Whether the peer closed `stream` (without taking what it may hold).
pub(in crate::node) fn closed(stream: &std::net::TcpStream) -> bool {
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
pub(in crate::node) fn read_console(
    control: std::net::TcpStream,
) -> std::io::Result<Option<ConsoleHistory>> {
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
    if !ConsoleHistory::sizes_fit(&earlier, current) {
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

pub(in crate::node) async fn read_control(
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
    use std::io::Write;
    use std::net::{TcpListener, TcpStream};

    use vroom_core::console::SEGMENT_BYTES;

    use super::*;

    /// What the destination makes of what a source sends after `resumed`.
    fn sent(bytes: &[u8]) -> std::io::Result<Option<ConsoleHistory>> {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let mut source = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (destination, _) = listener.accept().unwrap();
        source.write_all(bytes).unwrap();
        drop(source);
        read_console(destination)
    }

    /// A console header and the bytes after it.
    fn header(earlier: &[u64], current: u64, written: u64, then: &[u8]) -> Vec<u8> {
        let mut bytes = line(&Control::Console {
            earlier: earlier.to_vec(),
            current,
            written,
        });
        bytes.extend_from_slice(then);
        bytes
    }

    #[test]
    fn the_console_history_is_read_whole_or_not_at_all() {
        // An older source sends nothing: the log stays as it is.
        assert!(sent(b"").unwrap().is_none());

        let history = sent(&header(&[3], 5, 105, b"oldhello")).unwrap().unwrap();
        assert_eq!(history.earlier, vec![b"old".to_vec()]);
        assert_eq!(history.current, b"hello".to_vec());
        assert_eq!(history.written, 105);

        // Refused before anything is allocated or kept.
        let kept = vroom_core::console::KEPT_BOOTS as usize;
        let bad: &[(&str, Vec<u8>)] = &[
            ("another message", line(&Control::Ready)),
            ("not JSON", b"garbage\n".to_vec()),
            (
                "a boot larger than a segment",
                header(&[SEGMENT_BYTES + 1], 0, 0, b""),
            ),
            (
                "more boots than a console keeps",
                header(&vec![1; kept + 1], 0, 0, b""),
            ),
            (
                "a current boot too large",
                header(&[], 2 * SEGMENT_BYTES + 1, u64::MAX, b""),
            ),
            // Without the check before reading, the destination would
            // allocate it.
            ("an absurd size", header(&[], 1 << 60, 1 << 60, b"")),
            ("fewer bytes written than kept", header(&[], 5, 4, b"hello")),
            ("cut short", header(&[], 5, 5, b"hel")),
        ];
        for (case, bytes) in bad {
            assert!(sent(bytes).is_err(), "{case}");
        }
    }
}
