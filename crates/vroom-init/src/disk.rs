//! Block devices and mounts: virtio disks found by their serial, mount(2).

use std::ffi::CString;
use std::fs;
use std::io;
use std::path::Path;
use std::time::{Duration, Instant};

/// Finds a virtio disk by its serial; kernels that do not expose serials get
/// the disk at its probe-order name, when there is one (data volumes have
/// none: a wrong guess would mount another disk).
pub fn find_disk(serial: &str, fallback: Option<&str>) -> Result<String, String> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let mut without_serial = false;
        for entry in fs::read_dir("/sys/block").into_iter().flatten().flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if !name.starts_with("vd") {
                continue;
            }
            match fs::read_to_string(entry.path().join("serial")) {
                Ok(found) if found.trim() == serial => return Ok(format!("/dev/{name}")),
                Ok(_) => {}
                Err(_) => without_serial = true,
            }
        }
        if let Some(fallback) =
            fallback.filter(|f| without_serial && Path::new("/sys/block").join(f).exists())
        {
            return Ok(format!("/dev/{fallback}"));
        }
        if Instant::now() > deadline {
            return Err(format!("no disk with serial {serial} appeared"));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// mount(2).
pub fn sys_mount(
    source: &str,
    target: &str,
    fstype: &str,
    flags: libc::c_ulong,
    data: &str,
) -> io::Result<()> {
    let c = |s: &str| {
        CString::new(s).map_err(|_| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("NUL in mount argument {s:?}"),
            )
        })
    };
    let (src, tgt, fs, dat) = (c(source)?, c(target)?, c(fstype)?, c(data)?);
    // SAFETY: all pointers are valid C strings that outlive the call.
    let rc = unsafe {
        libc::mount(
            src.as_ptr(),
            tgt.as_ptr(),
            fs.as_ptr(),
            flags,
            dat.as_ptr().cast(),
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
