//! The host↔guest protocol between vroomd and vroom-init, and the files on the
//! config volume that both sides read.
//!
//! The channel is a virtio-serial port named [`PORT_NAME`]; on the host it is
//! a unix socket served by QEMU. The host sends [`Request`]s, the guest answers
//! each with a [`Response`] carrying the same id. Every message travels in one
//! [`frame`]. Exec sessions ([`exec`]) are the exception: the `exec_start`
//! request's id names a session that gets several responses (start, output,
//! exit), and its credits and kills are not answered; they multiplex streamed
//! stdin and output over the same channel with credit-based flow control.
//! The host treats every byte from the guest as untrusted: frames are
//! length-limited, and a malformed frame costs the guest its message, never the
//! host its stability.

pub mod exec;
pub mod frame;
pub mod message;
pub mod volume;

pub use exec::{
    signal_name, ExecStatus, ExecStream, InvalidExecMessage, MAX_EXEC_CHUNK, MAX_EXEC_SESSIONS,
    MAX_EXEC_WINDOW,
};
pub use frame::{encode_frame, DecodeFrameError, FrameDecoder, FRAME_VERSION, MAX_FRAME_LEN};
pub use message::{
    from_hex, to_hex, BootTimes, ConntrackUsage, ExecOutput, GuestReply, HealthReport, HostCommand,
    Request, Response, ServiceHealth, VolumeUsage, MAX_FILE_COPY, MAX_READ_CHUNK,
    MAX_WAIT_READY_MS, VOLUME_FREEZE_BOUND_MS, WAIT_READY_CHECK_MS,
};

/// The name of the virtio-serial port that carries the protocol.
pub const PORT_NAME: &str = "org.vroom.agent.0";
