//! The relay's side of an established TLS 1.3 connection: the record layer
//! only, keyed by the traffic secrets of a handshake vroomd made.
//!
//! **Why not rustls here.** The relay outlives vroomd, so the connection's
//! TLS state must live in the relay; but vroomd makes the handshake (it
//! needs the answer that follows it before it starts the relay, and the
//! node's private key stays in vroomd). rustls can hand over an established
//! connection's keys and sequence numbers (`dangerous_extract_secrets`, as
//! for kernel TLS, which this host's kernel lacks), and what remains is
//! the record layer of RFC 8446 §5.2: each record's plaintext, with its
//! content type, sealed with ChaCha20-Poly1305 (`ring`) under a nonce made
//! of the IV and the record's sequence number, the record's header as
//! associated data. The two directions have separate keys, so the relay's
//! two forwarding threads each hold one and never share a lock.
//!
//! **What it accepts.** Application data; a `close_notify` alert reads as
//! the end of the stream. Anything else (another alert, a post-handshake
//! message such as a key update or a session ticket, a record that fails
//! its tag) is an error: the server of a replica sends none (its tickets
//! are off, and ChaCha20-Poly1305 never needs a key update, RFC 8446
//! §5.5), and the relay holds on any error. The writer seals at most
//! [`MAX_PLAINTEXT`] bytes a record and writes each message's records with
//! one write.
//!
//! **Handover format** (version 1): [`RecordKeys`] as one JSON line on the
//! relay's stdin (never on its command line, which any local user can
//! read): the cipher, then each direction's key, IV and next sequence
//! number, keys and IVs in base64.

use std::io::{self, Read, Write};

use ring::aead::{self, Aad, LessSafeKey, Nonce, UnboundKey};
use serde::{Deserialize, Serialize};

/// The largest plaintext of one record (RFC 8446 §5.1).
pub const MAX_PLAINTEXT: usize = 1 << 14;
/// The largest ciphertext of one record (RFC 8446 §5.2).
const MAX_CIPHERTEXT: usize = MAX_PLAINTEXT + 256;
const HEADER: usize = 5;
const TAG: usize = 16;
const NONCE: usize = 12;
const APPLICATION_DATA: u8 = 23;
const ALERT: u8 = 21;
const HANDSHAKE: u8 = 22;
/// The one cipher the handover carries (the replication's TLS config
/// offers no other).
pub const CHACHA20_POLY1305: &str = "chacha20-poly1305";

/// One direction's traffic keys: what rustls hands over.
#[derive(Clone, Serialize, Deserialize)]
pub struct DirectionKeys {
    #[serde(with = "vroom_base::base64_bytes")]
    pub key: Vec<u8>,
    #[serde(with = "vroom_base::base64_bytes")]
    pub iv: Vec<u8>,
    /// The sequence number of the next record.
    pub seq: u64,
}

/// Both directions' keys of an established connection.
#[derive(Clone, Serialize, Deserialize)]
pub struct RecordKeys {
    pub cipher: String,
    /// What this end sends with.
    pub tx: DirectionKeys,
    /// What this end receives with.
    pub rx: DirectionKeys,
}

impl std::fmt::Debug for RecordKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RecordKeys { .. }")
    }
}

/// One direction's sealing or opening state.
struct Direction {
    key: LessSafeKey,
    iv: [u8; NONCE],
    seq: u64,
}

impl Direction {
    fn new(keys: &DirectionKeys, cipher: &str) -> io::Result<Direction> {
        if cipher != CHACHA20_POLY1305 {
            return Err(io::Error::other(format!(
                "unsupported cipher {cipher:?} (only {CHACHA20_POLY1305})"
            )));
        }
        let key = UnboundKey::new(&aead::CHACHA20_POLY1305, &keys.key)
            .map_err(|_| io::Error::other("a traffic key of the wrong length"))?;
        let iv: [u8; NONCE] = keys
            .iv
            .as_slice()
            .try_into()
            .map_err(|_| io::Error::other("an IV of the wrong length"))?;
        Ok(Direction {
            key: LessSafeKey::new(key),
            iv,
            seq: keys.seq,
        })
    }

    /// The next record's nonce (RFC 8446 §5.3); a sequence number is never
    /// used twice.
    fn nonce(&mut self) -> io::Result<Nonce> {
        let mut nonce = self.iv;
        for (n, s) in nonce[NONCE - 8..].iter_mut().zip(self.seq.to_be_bytes()) {
            *n ^= s;
        }
        self.seq = self
            .seq
            .checked_add(1)
            .ok_or_else(|| io::Error::other("the record sequence numbers ran out"))?;
        Ok(Nonce::assume_unique_for_key(nonce))
    }
}

fn header(len: usize) -> [u8; HEADER] {
    let len = (len as u16).to_be_bytes();
    [APPLICATION_DATA, 3, 3, len[0], len[1]]
}

/// Seals what is written into records on `inner`.
pub struct SealedWriter<W> {
    inner: W,
    tx: Direction,
    out: Vec<u8>,
}

impl<W: Write> SealedWriter<W> {
    pub fn new(inner: W, keys: &RecordKeys) -> io::Result<Self> {
        Ok(SealedWriter {
            inner,
            tx: Direction::new(&keys.tx, &keys.cipher)?,
            out: Vec::new(),
        })
    }
}

impl<W: Write> Write for SealedWriter<W> {
    /// Seals all of `buf` (as records of at most [`MAX_PLAINTEXT`]) and
    /// writes them at once: one message, one write.
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.out.clear();
        for chunk in buf.chunks(MAX_PLAINTEXT) {
            let start = self.out.len();
            self.out.extend_from_slice(&header(chunk.len() + 1 + TAG));
            self.out.extend_from_slice(chunk);
            self.out.push(APPLICATION_DATA);
            let mut body = self.out.split_off(start + HEADER);
            let aad: [u8; HEADER] = self.out[start..].try_into().expect("invariant: a header");
            let nonce = self.tx.nonce()?;
            self.tx
                .key
                .seal_in_place_append_tag(nonce, Aad::from(aad), &mut body)
                .map_err(|_| io::Error::other("cannot seal a record"))?;
            self.out.extend_from_slice(&body);
        }
        self.inner.write_all(&self.out)?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// Opens the records read from `inner`.
pub struct SealedReader<R> {
    inner: R,
    rx: Direction,
    /// The current record's plaintext, and how much of it was read.
    plain: Vec<u8>,
    at: usize,
    ended: bool,
}

impl<R: Read> SealedReader<R> {
    pub fn new(inner: R, keys: &RecordKeys) -> io::Result<Self> {
        Ok(SealedReader {
            inner,
            rx: Direction::new(&keys.rx, &keys.cipher)?,
            plain: Vec::new(),
            at: 0,
            ended: false,
        })
    }

    /// Reads and opens the next record into `plain`; `false` at the end of
    /// the stream (closed between records, or a `close_notify`).
    fn next_record(&mut self) -> io::Result<bool> {
        let mut head = [0; HEADER];
        if !read_all_or_nothing(&mut self.inner, &mut head)? {
            return Ok(false);
        }
        let len = usize::from(u16::from_be_bytes([head[3], head[4]]));
        if head[0] != APPLICATION_DATA || !(TAG + 1..=MAX_CIPHERTEXT).contains(&len) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("a malformed TLS record (type {}, {len} bytes)", head[0]),
            ));
        }
        let mut body = std::mem::take(&mut self.plain);
        body.resize(len, 0);
        self.inner.read_exact(&mut body)?;
        let nonce = self.rx.nonce()?;
        let plain_len = self
            .rx
            .key
            .open_in_place(nonce, Aad::from(head), &mut body)
            .map_err(|_| {
                io::Error::new(
                    io::ErrorKind::InvalidData,
                    "a TLS record failed its integrity check",
                )
            })?
            .len();
        body.truncate(plain_len);
        // The content type is the last byte that is not padding.
        let kind_at = body
            .iter()
            .rposition(|&b| b != 0)
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "a record of padding"))?;
        let kind = body[kind_at];
        body.truncate(kind_at);
        match kind {
            APPLICATION_DATA => {
                self.plain = body;
                self.at = 0;
                Ok(true)
            }
            ALERT if body == [1, 0] => Ok(false), // close_notify
            ALERT => Err(io::Error::new(
                io::ErrorKind::ConnectionAborted,
                format!("the peer sent TLS alert {body:?}"),
            )),
            HANDSHAKE => Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "the peer sent a post-handshake message (a key update or a ticket)",
            )),
            other => Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("a record of unexpected type {other}"),
            )),
        }
    }
}

/// Fills `buf`, or reads nothing at a clean end (`false`); an end inside
/// `buf` is an error.
fn read_all_or_nothing(r: &mut impl Read, buf: &mut [u8]) -> io::Result<bool> {
    let mut got = 0;
    while got < buf.len() {
        match r.read(&mut buf[got..]) {
            Ok(0) if got == 0 => return Ok(false),
            Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(true)
}

impl<R: Read> Read for SealedReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.at == self.plain.len() {
            if self.ended || !self.next_record()? {
                self.ended = true;
                return Ok(0);
            }
        }
        let n = buf.len().min(self.plain.len() - self.at);
        buf[..n].copy_from_slice(&self.plain[self.at..self.at + n]);
        self.at += n;
        Ok(n)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    fn keys(seed: u8) -> DirectionKeys {
        DirectionKeys {
            key: vec![seed; 32],
            iv: vec![seed ^ 0x5a; NONCE],
            seq: 7,
        }
    }

    /// Two ends of one connection: a's tx is b's rx.
    pub(crate) fn pair() -> (RecordKeys, RecordKeys) {
        let a = RecordKeys {
            cipher: CHACHA20_POLY1305.into(),
            tx: keys(1),
            rx: keys(2),
        };
        let b = RecordKeys {
            cipher: CHACHA20_POLY1305.into(),
            tx: keys(2),
            rx: keys(1),
        };
        (a, b)
    }

    fn sealed(keys: &RecordKeys, messages: &[&[u8]]) -> Vec<u8> {
        let mut w = SealedWriter::new(Vec::new(), keys).unwrap();
        for m in messages {
            w.write_all(m).unwrap();
        }
        w.inner
    }

    #[test]
    fn what_is_sealed_opens_unchanged_and_is_not_plaintext() {
        let (a, b) = pair();
        let big: Vec<u8> = (0..3 * MAX_PLAINTEXT + 5).map(|i| i as u8).collect();
        let marker = b"a marker the guest wrote".to_vec();
        let wire = sealed(&a, &[&marker, &big, b"x"]);
        assert!(
            !wire.windows(marker.len()).any(|w| w == marker.as_slice()),
            "the marker is on the wire in plaintext"
        );
        let mut r = SealedReader::new(wire.as_slice(), &b).unwrap();
        let mut got = vec![];
        r.read_to_end(&mut got).unwrap();
        assert_eq!(got, [marker, big, b"x".to_vec()].concat());
    }

    #[test]
    fn an_altered_replayed_or_foreign_record_is_refused() {
        let (a, b) = pair();
        let wire = sealed(&a, &[b"first", b"second"]);
        let read = |bytes: &[u8], keys: &RecordKeys| {
            let mut got = vec![];
            SealedReader::new(bytes, keys)
                .unwrap()
                .read_to_end(&mut got)
                .map(|_| got)
        };
        assert_eq!(read(&wire, &b).unwrap(), b"firstsecond");
        let mut altered = wire.clone();
        altered[HEADER + 1] ^= 1;
        assert!(read(&altered, &b).is_err(), "an altered record opened");
        // The second record alone: its sequence number is not the next.
        let first_len = HEADER + 5 + 1 + TAG;
        assert!(read(&wire[first_len..], &b).is_err(), "a skipped record");
        let replayed = [&wire[..first_len], &wire[..first_len]].concat();
        assert!(read(&replayed, &b).is_err(), "a replayed record opened");
        assert!(read(&wire, &a).is_err(), "the wrong key opened a record");
        // Cut inside a record: an error, not a clean end.
        assert!(read(&wire[..first_len - 1], &b).is_err());
    }

    #[test]
    fn a_close_notify_ends_the_stream_and_other_records_fail() {
        let (a, b) = pair();
        let record = |kind: u8, body: &[u8]| {
            let mut tx = Direction::new(&a.tx, &a.cipher).unwrap();
            let mut plain = body.to_vec();
            plain.push(kind);
            plain.extend([0, 0]); // padding
            let head = header(plain.len() + TAG);
            let nonce = tx.nonce().unwrap();
            tx.key
                .seal_in_place_append_tag(nonce, Aad::from(head), &mut plain)
                .unwrap();
            [head.to_vec(), plain].concat()
        };
        let mut got = vec![];
        let closed = record(ALERT, &[1, 0]);
        SealedReader::new(closed.as_slice(), &b)
            .unwrap()
            .read_to_end(&mut got)
            .unwrap();
        assert!(got.is_empty());
        for (kind, body) in [(ALERT, &[2u8, 40][..]), (HANDSHAKE, &[24, 0, 0, 1, 0][..])] {
            let wire = record(kind, body);
            let err = SealedReader::new(wire.as_slice(), &b)
                .unwrap()
                .read_to_end(&mut got)
                .unwrap_err();
            assert!(err.to_string().contains("the peer sent"), "{err}");
        }
    }
}
