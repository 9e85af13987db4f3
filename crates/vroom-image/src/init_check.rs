//! Checks the guest init before it is packed: the guest has no dynamic
//! loader, so `/init` must be a static x86-64 ELF. A dynamically linked
//! vroom-init (what a plain `cargo build` makes) boots to "Failed to execute
//! /init" and a kernel panic; refusing it here turns that into a build error
//! that says how to get the right one.
//!
//! Only the ELF header and program headers are read (ELF-64, little endian).

const PT_INTERP: u32 = 3;
const EM_X86_64: u16 = 62;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CheckInitError {
    #[error(
        "vroom-init not found at {path}: build it with `cargo xtask build-init` and point \
         VROOM_INIT at target/x86_64-unknown-linux-gnu/init/vroom-init (`cargo xtask demo` \
         puts it next to vroom as vroom-guest-init)"
    )]
    Missing { path: String },
    #[error("cannot read {path}: {reason}")]
    Unreadable { path: String, reason: String },
    #[error("{path} is not an ELF executable")]
    NotElf { path: String },
    #[error("{path} is not an x86-64 executable")]
    WrongArch { path: String },
    #[error(
        "{path} is dynamically linked (it asks for {interpreter}), but the guest has no dynamic \
         loader; build the static init with `cargo xtask build-init` and point VROOM_INIT at \
         target/x86_64-unknown-linux-gnu/init/vroom-init (`cargo xtask demo` puts it next to vroom)"
    )]
    Dynamic { path: String, interpreter: String },
}

/// Checks the init file before any build work starts, so a missing or
/// dynamically linked one is reported first, not after packages were fetched.
pub fn check_init_file(path: &std::path::Path) -> Result<(), CheckInitError> {
    let shown = path.display().to_string();
    match std::fs::read(path) {
        Ok(bytes) => check_init(&shown, &bytes),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            Err(CheckInitError::Missing { path: shown })
        }
        Err(e) => Err(CheckInitError::Unreadable {
            path: shown,
            reason: e.to_string(),
        }),
    }
}

/// Refuses anything but a static x86-64 ELF executable.
pub fn check_init(path: &str, bytes: &[u8]) -> Result<(), CheckInitError> {
    let not_elf = || CheckInitError::NotElf { path: path.into() };
    if bytes.len() < 64 || &bytes[..4] != b"\x7fELF" || bytes[4] != 2 || bytes[5] != 1 {
        return Err(not_elf());
    }
    let u16_at = |o: usize| {
        bytes
            .get(o..o + 2)
            .map(|b| u16::from_le_bytes([b[0], b[1]]))
    };
    let u32_at = |o: usize| {
        bytes
            .get(o..o + 4)
            .map(|b| u32::from_le_bytes(b.try_into().expect("invariant: 4 bytes")))
    };
    let u64_at = |o: usize| {
        bytes
            .get(o..o + 8)
            .map(|b| u64::from_le_bytes(b.try_into().expect("invariant: 8 bytes")))
    };
    if u16_at(18) != Some(EM_X86_64) {
        return Err(CheckInitError::WrongArch { path: path.into() });
    }
    let phoff = u64_at(32).ok_or_else(not_elf)? as usize;
    let phentsize = u16_at(54).ok_or_else(not_elf)? as usize;
    let phnum = u16_at(56).ok_or_else(not_elf)? as usize;
    let table_end = phnum
        .checked_mul(phentsize)
        .and_then(|n| n.checked_add(phoff));
    if phentsize < 56 || table_end.is_none_or(|end| end > bytes.len()) {
        return Err(not_elf());
    }
    for i in 0..phnum {
        let at = phoff.checked_add(i.checked_mul(phentsize).ok_or_else(not_elf)?);
        let at = at.ok_or_else(not_elf)?;
        if u32_at(at).ok_or_else(not_elf)? == PT_INTERP {
            let offset = u64_at(at + 8).ok_or_else(not_elf)? as usize;
            let size = u64_at(at + 32).ok_or_else(not_elf)? as usize;
            let interpreter = bytes
                .get(offset..offset.saturating_add(size).min(bytes.len()))
                .map(|b| {
                    String::from_utf8_lossy(b)
                        .trim_end_matches('\0')
                        .to_string()
                })
                .unwrap_or_default();
            return Err(CheckInitError::Dynamic {
                path: path.into(),
                interpreter,
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A minimal ELF-64 header with the given machine and program headers.
    fn elf(machine: u16, headers: &[(u32, &[u8])]) -> Vec<u8> {
        let mut out = vec![0u8; 64];
        out[..4].copy_from_slice(b"\x7fELF");
        out[4] = 2;
        out[5] = 1;
        out[18..20].copy_from_slice(&machine.to_le_bytes());
        out[32..40].copy_from_slice(&64u64.to_le_bytes());
        out[54..56].copy_from_slice(&56u16.to_le_bytes());
        out[56..58].copy_from_slice(&(headers.len() as u16).to_le_bytes());
        let data_at = 64 + 56 * headers.len();
        let mut data = vec![];
        for (kind, payload) in headers {
            let mut ph = vec![0u8; 56];
            ph[..4].copy_from_slice(&kind.to_le_bytes());
            ph[8..16].copy_from_slice(&((data_at + data.len()) as u64).to_le_bytes());
            ph[32..40].copy_from_slice(&(payload.len() as u64).to_le_bytes());
            data.extend_from_slice(payload);
            out.extend_from_slice(&ph);
        }
        out.extend_from_slice(&data);
        out
    }

    #[test]
    fn init_check_table() {
        let interp: &[u8] = b"/lib64/ld-linux-x86-64.so.2\0";
        let cases: Vec<(&str, Vec<u8>, Result<(), &str>)> = vec![
            ("static", elf(62, &[(1, b"")]), Ok(())),
            (
                "dynamic",
                elf(62, &[(6, b""), (PT_INTERP, interp)]),
                Err("dynamically linked"),
            ),
            ("arm64", elf(183, &[]), Err("not an x86-64")),
            (
                "script",
                b"#!/bin/sh\necho hi\n".to_vec(),
                Err("not an ELF"),
            ),
            ("empty", vec![], Err("not an ELF")),
            (
                "truncated",
                elf(62, &[(1, b"")])[..80].to_vec(),
                Err("not an ELF"),
            ),
        ];
        for (name, bytes, want) in cases {
            let got = check_init("/x/init", &bytes).map_err(|e| e.to_string());
            match (got, want) {
                (Ok(()), Ok(())) => {}
                (Err(e), Err(w)) => assert!(e.contains(w), "{name}: {e}"),
                (got, want) => panic!("{name}: got {got:?}, want {want:?}"),
            }
        }
        let err = check_init("/x/init", &elf(62, &[(PT_INTERP, interp)])).unwrap_err();
        assert!(err.to_string().contains("/lib64/ld-linux-x86-64.so.2"));
        assert!(err.to_string().contains("cargo xtask build-init"));
    }

    /// The test binary itself is dynamically linked on this host; a check
    /// that passed it would pass a plain `cargo build` init.
    #[test]
    fn this_dynamically_linked_test_binary_is_refused() {
        let exe = std::env::current_exe().unwrap();
        let bytes = std::fs::read(&exe).unwrap();
        let err = check_init(&exe.display().to_string(), &bytes).unwrap_err();
        assert!(matches!(err, CheckInitError::Dynamic { .. }), "{err}");
    }

    #[test]
    fn a_missing_init_says_how_to_build_it() {
        let err =
            check_init_file(std::path::Path::new("/nonexistent/vroom-guest-init")).unwrap_err();
        assert!(matches!(err, CheckInitError::Missing { .. }), "{err}");
        assert!(err.to_string().contains("cargo xtask build-init"), "{err}");
        let exe = std::env::current_exe().unwrap();
        assert!(matches!(
            check_init_file(&exe),
            Err(CheckInitError::Dynamic { .. })
        ));
    }

    /// Random bytes never panic the parser.
    #[test]
    fn random_bytes_never_panic() {
        let mut state = 0x2545_f491_4f6c_dd1du64;
        for len in 0..2000usize {
            let mut bytes: Vec<u8> = (0..len % 300)
                .map(|_| {
                    state ^= state << 13;
                    state ^= state >> 7;
                    state ^= state << 17;
                    state as u8
                })
                .collect();
            if bytes.len() >= 64 && len % 2 == 0 {
                bytes[..6].copy_from_slice(b"\x7fELF\x02\x01");
                bytes[18..20].copy_from_slice(&62u16.to_le_bytes());
            }
            let _ = check_init("x", &bytes);
        }
    }
}
