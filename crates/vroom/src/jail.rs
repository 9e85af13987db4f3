//! `vroom __jail <jail.json>` (hidden): the jailer that vroomd runs for each
//! VMM. It must stay single-threaded, so it runs before any async runtime;
//! see `vroom_jail` for what it does. On success it prints QEMU's pid.

use std::path::Path;

use anyhow::Result;

pub fn run(spec: &Path) -> Result<i32> {
    let pid = vroom_jail::jailer::run(spec)?;
    // vroomd may be gone (killed inside a launch): the pid file has the pid too.
    let _ = std::io::Write::write_all(&mut std::io::stdout(), format!("{pid}\n").as_bytes());
    Ok(0)
}
