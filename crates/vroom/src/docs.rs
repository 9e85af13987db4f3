//! `vroom __generate-docs DIR`: the shell completions (bash, zsh, fish)
//! and man pages (one per command) the package ships, generated from the
//! CLI's own grammar ([`crate::args`]) so that they cannot drift from it.

use std::path::Path;

use anyhow::{Context, Result};
use clap::CommandFactory;
use clap_complete::Shell;

use crate::args::Cli;

/// Writes `DIR/completions/{vroom,_vroom,vroom.fish}` and `DIR/man/*.1`.
pub fn generate(dir: &Path) -> Result<()> {
    let completions = dir.join("completions");
    std::fs::create_dir_all(&completions)
        .with_context(|| format!("cannot create {}", completions.display()))?;
    for (shell, file) in [
        (Shell::Bash, "vroom"),
        (Shell::Zsh, "_vroom"),
        (Shell::Fish, "vroom.fish"),
    ] {
        let path = completions.join(file);
        let mut out = std::fs::File::create(&path)
            .with_context(|| format!("cannot create {}", path.display()))?;
        clap_complete::generate(shell, &mut Cli::command(), "vroom", &mut out);
    }
    let man = dir.join("man");
    std::fs::create_dir_all(&man).with_context(|| format!("cannot create {}", man.display()))?;
    clap_mangen::generate_to(Cli::command(), &man)
        .with_context(|| format!("cannot write the man pages into {}", man.display()))?;
    Ok(())
}
