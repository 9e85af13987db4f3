//! The few std-level helpers that crates on every layer share, the static
//! guest init included: locks that outlive a panicked holder ([`LockExt`]),
//! bytes as base64 in JSON ([`base64_bytes`]), the one line a failed tool
//! said ([`first_line`], [`last_line`], [`failure_line`]) and an error with
//! its causes on one line ([`error_chain`]).
//!
//! **Architecture invariant:** nothing of vroom's domain lives here, and the
//! crate depends on no other vroom crate; it stays small enough for the
//! guest init to link.

use std::process::Output;
use std::sync::{Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard};

/// Locking that takes over the data of a holder that panicked.
///
/// A panic while a lock is held is a bug, reported where it happened; the
/// lock's data is then used as that holder left it, instead of turning every
/// later caller (each API request, the monitor, the agent) into a second
/// panic. vroom's locks are never held across a step whose interruption would
/// leave the data inconsistent for the next holder.
pub trait LockExt<T: ?Sized> {
    fn lock_unpoisoned(&self) -> MutexGuard<'_, T>;
}

impl<T: ?Sized> LockExt<T> for Mutex<T> {
    fn lock_unpoisoned(&self) -> MutexGuard<'_, T> {
        self.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// [`LockExt`] for readers-writer locks.
pub trait RwLockExt<T: ?Sized> {
    fn read_unpoisoned(&self) -> RwLockReadGuard<'_, T>;
    fn write_unpoisoned(&self) -> RwLockWriteGuard<'_, T>;
}

impl<T: ?Sized> RwLockExt<T> for RwLock<T> {
    fn read_unpoisoned(&self) -> RwLockReadGuard<'_, T> {
        self.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write_unpoisoned(&self) -> RwLockWriteGuard<'_, T> {
        self.write().unwrap_or_else(|p| p.into_inner())
    }
}

/// Serde for bytes as standard base64 text inside JSON:
/// `#[serde(with = "vroom_base::base64_bytes")]`.
pub mod base64_bytes {
    use base64::engine::general_purpose::STANDARD;
    use base64::Engine;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(bytes: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&STANDARD.encode(bytes))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let text = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        STANDARD
            .decode(text.as_bytes())
            .map_err(serde::de::Error::custom)
    }
}

/// The first line of `text` that is not blank: what a tool said, for a
/// one-line message.
pub fn first_line(text: &str) -> Option<&str> {
    text.lines().find(|l| !l.trim().is_empty())
}

/// The last line of `text` that is not blank: where tools that log as they
/// go (apt, the jailer) put the reason they stopped.
pub fn last_line(text: &str) -> Option<&str> {
    text.lines().rev().find(|l| !l.trim().is_empty())
}

/// Why a tool failed, in one line: the first line of its stderr that is not
/// blank, or `default` when it wrote none.
pub fn failure_line(output: &Output, default: &str) -> String {
    first_line(&String::from_utf8_lossy(&output.stderr))
        .unwrap_or(default)
        .to_string()
}

/// An error and its causes on one line, `outer: inner: innermost`: errors
/// keep their cause in `source()`, and a log line or a reply to the host
/// wants all of it.
pub fn error_chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut out = err.to_string();
    let mut source = err.source();
    while let Some(e) = source {
        out.push_str(": ");
        out.push_str(&e.to_string());
        source = e.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn a_panicked_holder_leaves_the_data_to_the_next() {
        let m = Arc::new(Mutex::new(1));
        let held = m.clone();
        let _ = std::thread::spawn(move || {
            let mut g = held.lock().unwrap();
            *g = 2;
            panic!("while holding the lock");
        })
        .join();
        assert!(m.is_poisoned());
        assert_eq!(*m.lock_unpoisoned(), 2);
        let rw = RwLock::new(3);
        *rw.write_unpoisoned() += 1;
        assert_eq!(*rw.read_unpoisoned(), 4);
    }

    #[test]
    fn bytes_roundtrip_as_base64() {
        #[derive(serde::Serialize, serde::Deserialize, PartialEq, Debug)]
        struct Chunk {
            #[serde(with = "base64_bytes")]
            data: Vec<u8>,
        }
        let chunk = Chunk {
            data: vec![0, 1, 254, 255],
        };
        let text = serde_json::to_string(&chunk).unwrap();
        assert_eq!(text, r#"{"data":"AAH+/w=="}"#);
        assert_eq!(serde_json::from_str::<Chunk>(&text).unwrap(), chunk);
        assert!(serde_json::from_str::<Chunk>(r#"{"data":"not base64!"}"#).is_err());
    }

    #[test]
    fn first_lines_table() {
        let cases: &[(&str, Option<&str>)] = &[
            ("", None),
            ("\n \n\t\n", None),
            ("one", Some("one")),
            ("\n\ndnsmasq: bad option\nmore", Some("dnsmasq: bad option")),
            ("Error: x\nError: y\n", Some("Error: x")),
        ];
        for (text, want) in cases {
            assert_eq!(first_line(text), *want, "{text:?}");
        }
    }

    #[test]
    fn last_lines_table() {
        let cases: &[(&str, Option<&str>)] = &[
            ("", None),
            ("\n \n", None),
            ("one", Some("one")),
            (
                "Reading lists\nE: Unable to locate package x\n\n",
                Some("E: Unable to locate package x"),
            ),
        ];
        for (text, want) in cases {
            assert_eq!(last_line(text), *want, "{text:?}");
        }
    }
}
