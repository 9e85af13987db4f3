//! Writing the agent's replies to the host: one frame per response, whole,
//! under the port's lock (the agent's handlers and the exec sessions share
//! the port).

use std::fs::File;
use std::io::Write;
use std::sync::Mutex;

use vroom_agent_proto::{encode_frame, GuestReply, Response};
use vroom_base::LockExt;

use crate::log;

/// Sends `response` on the agent port; one too large for a frame becomes
/// an error reply to the same request.
pub(crate) fn send(writer: &Mutex<File>, response: &Response) {
    let payload = match serde_json::to_vec(response) {
        Ok(p) => p,
        Err(err) => return log(&format!("encode response: {err}")),
    };
    let frame = encode_frame(&payload).unwrap_or_else(|| {
        let fallback = Response {
            id: response.id,
            reply: GuestReply::Error {
                message: "response exceeds the frame limit".into(),
            },
        };
        encode_frame(&serde_json::to_vec(&fallback).unwrap_or_default()).unwrap_or_default()
    });
    let mut file = writer.lock_unpoisoned();
    if let Err(err) = file.write_all(&frame).and_then(|()| file.flush()) {
        log(&format!("write agent port: {err}"));
    }
}
