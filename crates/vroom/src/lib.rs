//! What the `vroom` binary shares with vroom-bench, which measures vroomd
//! the way the CLI drives it: where things are ([`paths`]), talking to
//! vroomd ([`session`]), output for people and scripts ([`output`]), a
//! process's start ([`process`]) and the jailer entry point ([`jail`]), which
//! every binary that launches QEMU through `vroom_qemu` must answer to.

pub mod jail;
pub mod output;
pub mod paths;
pub mod process;
pub mod session;
