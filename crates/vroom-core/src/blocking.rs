//! Blocking work from async code.

/// Runs blocking work (a durable store commit, volume and file I/O) without
/// stalling the async workers: on the multi-threaded runtime the worker hands
/// its other tasks to another thread first; on a single-threaded one (unit
/// tests) it just runs.
pub(crate) fn blocking<T>(work: impl FnOnce() -> T) -> T {
    match tokio::runtime::Handle::try_current() {
        Ok(handle) if handle.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
            tokio::task::block_in_place(work)
        }
        _ => work(),
    }
}
