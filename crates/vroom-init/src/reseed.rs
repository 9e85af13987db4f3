//! What a guest woken from a memory snapshot must not share with its other
//! copies or keep from the moment it was saved: the kernel RNG's state and
//! the wall clock. Two restores of one snapshot would otherwise read the
//! same bytes from `/dev/urandom` (and derive the same keys and nonces).

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;

use crate::log;

/// `RNDADDENTROPY` from `<linux/random.h>`: `_IOW('R', 0x03, int[2])`.
const RNDADDENTROPY: libc::c_ulong = 0x4008_5203;
/// `RNDRESEEDCRNG`: `_IO('R', 0x07)`, Linux 4.17 and later.
const RNDRESEEDCRNG: libc::c_ulong = 0x5207;
/// The most entropy bytes mixed in at once; the host sends far fewer.
const MAX_ENTROPY: usize = 4096;

/// `struct rand_pool_info { int entropy_count; int buf_size; __u32 buf[]; }`
/// in native byte order: the bits credited, the byte count, the bytes.
pub fn rand_pool_info(entropy: &[u8]) -> Vec<u8> {
    let entropy = &entropy[..entropy.len().min(MAX_ENTROPY)];
    let len = entropy.len() as i32;
    let mut info = Vec::with_capacity(8 + entropy.len());
    info.extend_from_slice(&(len * 8).to_ne_bytes());
    info.extend_from_slice(&len.to_ne_bytes());
    info.extend_from_slice(entropy);
    info
}

/// Mixes the host's bytes into the kernel RNG, credits them, and makes the
/// CRNG reseed from the pool at once instead of at its next interval.
pub fn add_entropy(entropy: &[u8]) -> Result<(), String> {
    if entropy.is_empty() {
        return Err("the host sent no entropy".into());
    }
    let urandom = File::options()
        .write(true)
        .open("/dev/urandom")
        .map_err(|e| format!("open /dev/urandom: {e}"))?;
    let mut info = rand_pool_info(entropy);
    // SAFETY: info is a complete rand_pool_info with buf_size bytes after its
    // header; the kernel only reads it.
    let rc = unsafe { libc::ioctl(urandom.as_raw_fd(), RNDADDENTROPY as _, info.as_mut_ptr()) };
    if rc != 0 {
        return Err(format!("RNDADDENTROPY: {}", io::Error::last_os_error()));
    }
    // SAFETY: RNDRESEEDCRNG takes no argument.
    if unsafe { libc::ioctl(urandom.as_raw_fd(), RNDRESEEDCRNG as _) } != 0 {
        let err = io::Error::last_os_error();
        match err.raw_os_error() {
            // Kernels before 4.17 lack it; the entropy still reaches the CRNG
            // at its next reseed.
            Some(libc::ENOTTY | libc::EINVAL) => log(&format!("RNDRESEEDCRNG: {err}")),
            _ => return Err(format!("RNDRESEEDCRNG: {err}")),
        }
    }
    Ok(())
}

/// Sets the wall clock; it stood still while the guest was saved.
pub fn set_clock(unix_ms: u64) -> Result<(), String> {
    let ts = libc::timespec {
        tv_sec: (unix_ms / 1000) as libc::time_t,
        tv_nsec: ((unix_ms % 1000) * 1_000_000) as libc::c_long,
    };
    // SAFETY: a valid timespec that outlives the call.
    if unsafe { libc::clock_settime(libc::CLOCK_REALTIME, &ts) } != 0 {
        return Err(format!("clock_settime: {}", io::Error::last_os_error()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rand_pool_info_layout() {
        let info = rand_pool_info(&[0xaa, 0xbb, 0xcc]);
        let int = |at: usize| i32::from_ne_bytes(info[at..at + 4].try_into().unwrap());
        assert_eq!(int(0), 24, "entropy_count is in bits");
        assert_eq!(int(4), 3, "buf_size is in bytes");
        assert_eq!(&info[8..], &[0xaa, 0xbb, 0xcc]);
        assert_eq!(info.len(), 11);

        let big = rand_pool_info(&vec![1; MAX_ENTROPY + 10]);
        assert_eq!(big.len(), 8 + MAX_ENTROPY);
        assert_eq!(i32::from_ne_bytes(big[4..8].try_into().unwrap()), 4096);
    }

    #[test]
    fn ioctl_numbers_match_linux() {
        // _IOC(dir, type, nr, size) = dir << 30 | size << 16 | type << 8 | nr
        let ioc = |dir: u64, ty: u8, nr: u64, size: u64| {
            dir << 30 | size << 16 | libc::c_ulong::from(ty) << 8 | nr
        };
        assert_eq!(RNDADDENTROPY, ioc(1, b'R', 3, 8));
        assert_eq!(RNDRESEEDCRNG, ioc(0, b'R', 7, 0));
    }
}
