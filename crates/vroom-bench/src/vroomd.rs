//! The vroom under test: the `vroom` executable beside this one, and the
//! daemon it runs for a data dir.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use vroom_client::Client;

/// `vroom` beside this executable, where `cargo xtask bench` builds both.
pub fn vroom_exe() -> Result<PathBuf> {
    let exe = std::env::current_exe().context("cannot find the vroom-bench executable")?;
    let vroom = exe.with_file_name("vroom");
    if !vroom.is_file() {
        bail!(
            "vroom-bench measures the vroom beside it, and there is none: {} (`cargo xtask bench` builds both)",
            vroom.display()
        );
    }
    Ok(vroom)
}

/// The vroomd of `data_dir`, started from [`vroom_exe`] when none answers.
pub async fn connect(data_dir: &Path) -> Result<Client> {
    vroom::session::connect(data_dir, Some(&vroom_exe()?)).await
}
