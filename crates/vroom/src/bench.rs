//! `vroom bench ...`: the benchmarks are vroom-bench, a binary of their own
//! built beside vroom (`cargo xtask bench` builds and runs them), so that the
//! product carries none of their code. This hands the command over to it.

use std::ffi::OsString;
use std::os::unix::process::CommandExt;
use std::path::Path;

use anyhow::{bail, Context, Result};

pub fn run(data_dir: &Path, args: &[OsString]) -> Result<i32> {
    let exe = std::env::current_exe().context("cannot find the vroom executable")?;
    let bench = exe.with_file_name("vroom-bench");
    if !bench.is_file() {
        bail!(
            "the benchmarks are vroom-bench, which is not beside {} (`cargo build --release -p vroom-bench` builds it; `cargo xtask bench` builds and runs them)",
            exe.display()
        );
    }
    // The data dir through the environment, where vroom-bench reads it too:
    // a `--data-dir` among `args` still takes precedence.
    let err = std::process::Command::new(&bench)
        .args(args)
        .env("VROOM_DATA_DIR", data_dir)
        .exec();
    Err(err).with_context(|| format!("cannot run {}", bench.display()))
}
