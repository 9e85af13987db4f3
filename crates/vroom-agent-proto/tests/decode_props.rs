//! Fuzz-style properties of everything that decodes bytes from the other
//! side of the agent channel: the frame decoder and the JSON messages inside
//! frames. Random input must never panic, the decoder must never hold more
//! than one maximal frame, and whatever decodes must stay within the limits
//! the host checks. A longer run: `PROPTEST_CASES=100000 cargo test -p
//! vroom-agent-proto --test decode_props`.

use proptest::prelude::*;
use vroom_agent_proto::exec::validate_chunk;
use vroom_agent_proto::frame::HEADER_LEN;
use vroom_agent_proto::{
    encode_frame, FrameDecoder, GuestReply, Request, Response, MAX_EXEC_CHUNK, MAX_FRAME_LEN,
};

/// Byte soup biased towards things that look like frames and messages.
fn chunk() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        proptest::collection::vec(any::<u8>(), 0..256),
        (any::<u8>(), any::<u32>()).prop_map(|(version, len)| {
            let mut v = b"VRM".to_vec();
            v.push(version % 3);
            v.extend_from_slice(&(len % (2 * MAX_FRAME_LEN as u32)).to_be_bytes());
            v
        }),
        json_ish().prop_map(|text| encode_frame(text.as_bytes()).unwrap_or_default()),
    ]
}

/// Text close to real messages, so that the JSON decoders get past the first byte.
fn json_ish() -> impl Strategy<Value = String> {
    let kinds = prop_oneof![
        Just("exec_data"),
        Just("exec_exit"),
        Just("exec_started"),
        Just("stdin_written"),
        Just("file_chunk"),
        Just("health"),
        Just("exec_start"),
        Just("exec_stdin"),
    ];
    (any::<u64>(), kinds, "[A-Za-z0-9+/=]{0,64}", any::<i64>()).prop_map(
        |(id, kind, data, n)| {
            format!(
                r#"{{"id":{id},"reply":{{"type":"{kind}","stream":"stdout","data":"{data}","status":{{"how":"exited","code":{n}}}}},"command":{{"type":"{kind}","session":{id},"data":"{data}","eof":true}}}}"#
            )
        },
    )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn random_streams_never_panic_and_stay_bounded(chunks in proptest::collection::vec(chunk(), 0..32)) {
        let mut decoder = FrameDecoder::new();
        for chunk in &chunks {
            decoder.push(chunk);
            loop {
                match decoder.next_frame() {
                    Ok(Some(frame)) => {
                        prop_assert!(frame.len() <= MAX_FRAME_LEN);
                        if let Ok(resp) = serde_json::from_slice::<Response>(&frame) {
                            if let GuestReply::ExecData { data, .. } = &resp.reply {
                                // Whatever decodes is still checked by the host.
                                let ok = validate_chunk(data).is_ok();
                                prop_assert_eq!(ok, data.len() <= MAX_EXEC_CHUNK);
                            }
                            if let GuestReply::ExecExit { status } = &resp.reply {
                                let _ = status.validate();
                                let _ = status.exit_code();
                            }
                        }
                        let _ = serde_json::from_slice::<Request>(&frame);
                    }
                    Ok(None) => break,
                    Err(_) => {}
                }
            }
            prop_assert!(decoder.buffered() <= HEADER_LEN + MAX_FRAME_LEN);
        }
    }

    #[test]
    fn random_payloads_never_panic_the_message_decoders(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let _ = serde_json::from_slice::<Response>(&bytes);
        let _ = serde_json::from_slice::<Request>(&bytes);
    }

    #[test]
    fn exec_data_round_trips(data in proptest::collection::vec(any::<u8>(), 0..2048)) {
        let reply = GuestReply::ExecData { stream: vroom_agent_proto::ExecStream::Stdout, data };
        let json = serde_json::to_vec(&reply).unwrap();
        prop_assert_eq!(serde_json::from_slice::<GuestReply>(&json).unwrap(), reply);
    }
}
