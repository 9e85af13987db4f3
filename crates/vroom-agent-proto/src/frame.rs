//! Framing, version [`FRAME_VERSION`].
//!
//! ```text
//! +------+------+------+---------+----------------+------------------+
//! | 'V'  | 'R'  | 'M'  | version | length (u32 BE) | payload (JSON)   |
//! +------+------+------+---------+----------------+------------------+
//! ```
//!
//! The payload is at most [`MAX_FRAME_LEN`] bytes. A reader that meets a bad
//! magic, an unknown version or an oversized length reports it and resyncs on
//! the next magic, so a garbled stream (for example after the host reconnects
//! mid-frame) recovers by itself. A new version will bump the version byte;
//! readers reject versions they do not know.

use thiserror::Error;

pub const MAGIC: [u8; 3] = *b"VRM";
pub const FRAME_VERSION: u8 = 1;
pub const HEADER_LEN: usize = 8;
/// The largest payload either side accepts.
pub const MAX_FRAME_LEN: usize = 1 << 20;

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum DecodeFrameError {
    #[error("{skipped} bytes without a frame header were discarded")]
    Garbage { skipped: usize },
    #[error("unsupported frame version {version}")]
    Version { version: u8 },
    #[error("frame of {len} bytes exceeds the {MAX_FRAME_LEN} byte limit")]
    TooLong { len: usize },
}

/// Encodes one payload as a frame. Payloads over the limit are refused.
pub fn encode_frame(payload: &[u8]) -> Option<Vec<u8>> {
    if payload.len() > MAX_FRAME_LEN {
        return None;
    }
    let mut out = Vec::with_capacity(HEADER_LEN + payload.len());
    out.extend_from_slice(&MAGIC);
    out.push(FRAME_VERSION);
    out.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    out.extend_from_slice(payload);
    Some(out)
}

/// An incremental decoder: feed bytes with [`push`](Self::push), take frames
/// with [`next_frame`](Self::next_frame).
#[derive(Debug, Default)]
pub struct FrameDecoder {
    buf: Vec<u8>,
}

impl FrameDecoder {
    pub fn new() -> Self {
        Self::default()
    }

    /// How many bytes wait in the decoder: never more than one maximal frame
    /// after [`next_frame`](Self::next_frame) returned `Ok(None)`.
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }

    pub fn push(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// Returns the next complete payload, `Ok(None)` when more bytes are
    /// needed, or an error after discarding the offending bytes. Callers may
    /// keep calling after an error.
    pub fn next_frame(&mut self) -> Result<Option<Vec<u8>>, DecodeFrameError> {
        if let Some(skipped) = self.skip_to_magic() {
            return Err(DecodeFrameError::Garbage { skipped });
        }
        if self.buf.len() < HEADER_LEN {
            return Ok(None);
        }
        let version = self.buf[3];
        if version != FRAME_VERSION {
            self.buf.drain(..MAGIC.len());
            return Err(DecodeFrameError::Version { version });
        }
        let len = u32::from_be_bytes([self.buf[4], self.buf[5], self.buf[6], self.buf[7]]) as usize;
        if len > MAX_FRAME_LEN {
            self.buf.drain(..MAGIC.len());
            return Err(DecodeFrameError::TooLong { len });
        }
        if self.buf.len() < HEADER_LEN + len {
            return Ok(None);
        }
        let payload = self.buf[HEADER_LEN..HEADER_LEN + len].to_vec();
        self.buf.drain(..HEADER_LEN + len);
        Ok(Some(payload))
    }

    /// Drops bytes before the first possible magic; returns how many if any.
    fn skip_to_magic(&mut self) -> Option<usize> {
        let mut start = 0;
        while start < self.buf.len() {
            let rest = &self.buf[start..];
            let n = rest.len().min(MAGIC.len());
            if rest[..n] == MAGIC[..n] {
                break;
            }
            start += 1;
        }
        if start == 0 {
            return None;
        }
        self.buf.drain(..start);
        Some(start)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode_all(bytes: &[u8]) -> Vec<Result<Vec<u8>, DecodeFrameError>> {
        let mut d = FrameDecoder::new();
        d.push(bytes);
        let mut out = vec![];
        loop {
            match d.next_frame() {
                Ok(Some(f)) => out.push(Ok(f)),
                Ok(None) => break,
                Err(e) => out.push(Err(e)),
            }
        }
        out
    }

    #[test]
    fn roundtrip_and_split_reads() {
        let a = encode_frame(b"{\"a\":1}").unwrap();
        let b = encode_frame(b"").unwrap();
        let stream = [a.clone(), b].concat();
        let mut d = FrameDecoder::new();
        let mut got = vec![];
        for byte in &stream {
            d.push(std::slice::from_ref(byte));
            while let Some(f) = d.next_frame().unwrap() {
                got.push(f);
            }
        }
        assert_eq!(got, vec![b"{\"a\":1}".to_vec(), vec![]]);
    }

    #[test]
    fn decoding_table() {
        let good = encode_frame(b"ok").unwrap();
        let mut bad_version = good.clone();
        bad_version[3] = 9;
        let mut too_long = good[..4].to_vec();
        too_long.extend_from_slice(&((MAX_FRAME_LEN as u32) + 1).to_be_bytes());
        type Case = (Vec<u8>, Vec<Result<Vec<u8>, DecodeFrameError>>);
        let cases: Vec<Case> = vec![
            (good.clone(), vec![Ok(b"ok".to_vec())]),
            (
                [b"xx".to_vec(), good.clone()].concat(),
                vec![
                    Err(DecodeFrameError::Garbage { skipped: 2 }),
                    Ok(b"ok".to_vec()),
                ],
            ),
            (
                [bad_version, good.clone()].concat(),
                vec![
                    Err(DecodeFrameError::Version { version: 9 }),
                    Err(DecodeFrameError::Garbage { skipped: 7 }),
                    Ok(b"ok".to_vec()),
                ],
            ),
            (
                [too_long, good.clone()].concat(),
                vec![
                    Err(DecodeFrameError::TooLong {
                        len: MAX_FRAME_LEN + 1,
                    }),
                    Err(DecodeFrameError::Garbage { skipped: 5 }),
                    Ok(b"ok".to_vec()),
                ],
            ),
            (good[..5].to_vec(), vec![]),
        ];
        for (input, want) in cases {
            assert_eq!(decode_all(&input), want, "input {input:?}");
        }
    }

    /// Stand-in for a fuzzer (cargo-fuzz needs a nightly toolchain): random
    /// bytes in random chunks, biased towards header-like garbage (magic, odd
    /// versions, huge lengths). The decoder never panics and never holds more
    /// than one maximal frame.
    #[test]
    fn random_input_never_panics_or_grows_unbounded() {
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        for _ in 0..200 {
            let mut decoder = FrameDecoder::new();
            for _ in 0..200 {
                let mut chunk: Vec<u8> = (0..(next() % 64)).map(|_| next() as u8).collect();
                if next() % 3 == 0 {
                    chunk.extend_from_slice(&MAGIC);
                    chunk.push(next() as u8 % 3);
                    chunk.extend_from_slice(
                        &(next() as u32 % (2 * MAX_FRAME_LEN as u32)).to_be_bytes(),
                    );
                }
                decoder.push(&chunk);
                while let Ok(Some(_)) | Err(_) = decoder.next_frame() {}
                assert!(decoder.buf.len() <= HEADER_LEN + MAX_FRAME_LEN);
            }
        }
    }

    #[test]
    fn refuses_oversized_payload() {
        assert!(encode_frame(&vec![0; MAX_FRAME_LEN + 1]).is_none());
        assert!(encode_frame(&vec![0; MAX_FRAME_LEN]).is_some());
    }
}
