//! What a vroom process sets up before its work: PATH, SIGPIPE, logging and
//! the async runtime. The vroom binary and vroom-bench start alike.

pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("invariant: a tokio runtime starts")
}

pub fn init_tracing(daemon: bool) {
    // netlink-packet-route warns about every newer kernel attribute it does not know.
    let default = if daemon {
        "info,netlink_packet_route=error"
    } else {
        "warn,netlink_packet_route=error"
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env("VROOM_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .try_init();
}

/// `vroom inspect w | head -1`: like other Unix tools, the CLI ends
/// silently when its reader goes away. Rust ignores SIGPIPE, so `println!`
/// would panic on EPIPE instead. Only the CLI: vroomd, its jailer and its
/// guard must outlive any client that hangs up on them.
pub fn die_quietly_on_closed_stdout() {
    // SAFETY: called before any other thread exists; SIG_DFL is a valid
    // disposition for SIGPIPE.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}

/// nft, depmod and friends live in /usr/sbin, which non-login shells may lack.
pub fn ensure_sbin_on_path() {
    let path = std::env::var("PATH").unwrap_or_default();
    let mut parts: Vec<&str> = path.split(':').filter(|p| !p.is_empty()).collect();
    for dir in ["/usr/local/sbin", "/usr/sbin", "/sbin", "/usr/bin", "/bin"] {
        if !parts.contains(&dir) {
            parts.push(dir);
        }
    }
    std::env::set_var("PATH", parts.join(":"));
}
