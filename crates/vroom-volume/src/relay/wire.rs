//! NBD framing, as far as the relay needs it: where each message of either
//! side begins and ends, and what it says about the replica's health.
//!
//! Covered (the NBD protocol, `doc/proto.md` of NetworkBlockDevice/nbd):
//! the fixed newstyle handshake (server greeting, client flags, options and
//! option replies, ending at `NBD_OPT_GO`'s `NBD_REP_ACK` or at the reply to
//! `NBD_OPT_EXPORT_NAME`), then the transmission phase: requests (a write
//! carries its payload), simple replies (a successful read's payload
//! follows) and structured reply chunks (QEMU's client negotiates them,
//! with the `base:allocation` meta context). Not covered, refused as
//! malformed by the caller: oldstyle servers, TLS (`NBD_OPT_STARTTLS`)
//! and extended headers (`NBD_OPT_EXTENDED_HEADERS`), which QEMU 7.2
//! neither offers nor asks for.
//!
//! Each message is read whole and handed back with its exact bytes, so the
//! relay forwards it unchanged or not at all.

use std::io::{self, Read};

pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
pub const OPT_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
pub const CLIENT_FLAG_NO_ZEROES: u32 = 1 << 1;

pub const OPT_EXPORT_NAME: u32 = 1;
pub const OPT_ABORT: u32 = 2;
pub const OPT_STARTTLS: u32 = 5;
pub const OPT_GO: u32 = 7;
#[cfg(test)]
pub const OPT_STRUCTURED_REPLY: u32 = 8;
pub const OPT_EXTENDED_HEADERS: u32 = 11;

pub const REP_ACK: u32 = 1;
pub const REP_FLAG_ERROR: u32 = 1 << 31;

pub const CMD_READ: u16 = 0;
pub const CMD_WRITE: u16 = 1;
pub const CMD_DISC: u16 = 2;

pub const REPLY_FLAG_DONE: u16 = 1 << 0;
pub const REPLY_TYPE_ERROR_BIT: u16 = 1 << 15;

/// Bounds that only a broken stream exceeds: QEMU's largest request is
/// 32 MiB, and option data are names and short lists.
const MAX_PAYLOAD: u32 = 64 << 20;
const MAX_OPTION_DATA: u32 = 1 << 20;
/// The zero padding after `NBD_OPT_EXPORT_NAME`'s reply, unless both sides
/// agreed to `NO_ZEROES`.
const EXPORT_ZEROES: usize = 124;

#[derive(Debug)]
pub enum ReadError {
    /// The stream ended cleanly, between two messages.
    Closed,
    /// A read failed, or the stream ended inside a message.
    Io(io::Error),
    /// Bytes that are no NBD message where one was due.
    Malformed(String),
}

impl From<io::Error> for ReadError {
    fn from(e: io::Error) -> ReadError {
        ReadError::Io(e)
    }
}

/// What the client's next message may be, from the phase the stream is in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientExpect {
    Flags,
    Option,
    Request,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientMessage {
    Flags {
        no_zeroes: bool,
    },
    Option {
        option: u32,
    },
    Request {
        command: u16,
        cookie: u64,
        offset: u64,
        length: u32,
    },
}

/// What the server's next message may be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ServerExpect {
    Greeting,
    OptionReply,
    /// The reply to `NBD_OPT_EXPORT_NAME`: size, transmission flags and,
    /// unless `NO_ZEROES` was agreed, 124 zero bytes.
    ExportInfo {
        zeroes: bool,
    },
    Reply,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServerMessage {
    Greeting {
        no_zeroes: bool,
    },
    OptionReply {
        option: u32,
        reply: u32,
    },
    ExportInfo,
    SimpleReply {
        cookie: u64,
        error: u32,
    },
    Chunk {
        cookie: u64,
        flags: u16,
        kind: u16,
        /// The error code of an error chunk.
        error: Option<u32>,
    },
}

/// A request the server still owes a reply to, as far as its reply's
/// framing depends on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sent {
    pub command: u16,
    pub length: u32,
}

pub fn read_client(
    r: &mut impl Read,
    expect: ClientExpect,
) -> Result<(ClientMessage, Vec<u8>), ReadError> {
    match expect {
        ClientExpect::Flags => {
            let bytes = read_first(r, 4)?;
            let flags = be32(&bytes[0..4]);
            Ok((
                ClientMessage::Flags {
                    no_zeroes: flags & CLIENT_FLAG_NO_ZEROES != 0,
                },
                bytes,
            ))
        }
        ClientExpect::Option => {
            let mut bytes = read_first(r, 16)?;
            let magic = be64(&bytes[0..8]);
            if magic != IHAVEOPT {
                return Err(malformed(format!("option magic {magic:#x}")));
            }
            let option = be32(&bytes[8..12]);
            let length = be32(&bytes[12..16]);
            if length > MAX_OPTION_DATA {
                return Err(malformed(format!(
                    "option {option} with {length} bytes of data"
                )));
            }
            read_more(r, &mut bytes, length as usize)?;
            Ok((ClientMessage::Option { option }, bytes))
        }
        ClientExpect::Request => {
            let mut bytes = read_first(r, 28)?;
            let magic = be32(&bytes[0..4]);
            if magic != REQUEST_MAGIC {
                return Err(malformed(format!("request magic {magic:#x}")));
            }
            let command = be16(&bytes[6..8]);
            let cookie = be64(&bytes[8..16]);
            let offset = be64(&bytes[16..24]);
            let length = be32(&bytes[24..28]);
            if command == CMD_WRITE {
                if length > MAX_PAYLOAD {
                    return Err(malformed(format!("write of {length} bytes")));
                }
                read_more(r, &mut bytes, length as usize)?;
            }
            Ok((
                ClientMessage::Request {
                    command,
                    cookie,
                    offset,
                    length,
                },
                bytes,
            ))
        }
    }
}

/// Reads the server's next message. `sent` looks up the request a reply
/// names (by cookie); a reply to no outstanding request is malformed.
pub fn read_server(
    r: &mut impl Read,
    expect: ServerExpect,
    sent: impl FnOnce(u64) -> Option<Sent>,
) -> Result<(ServerMessage, Vec<u8>), ReadError> {
    match expect {
        ServerExpect::Greeting => {
            let bytes = read_first(r, 18)?;
            let (magic, opt) = (be64(&bytes[0..8]), be64(&bytes[8..16]));
            if magic != NBDMAGIC || opt != IHAVEOPT {
                return Err(malformed(format!(
                    "greeting {magic:#x} {opt:#x} (not a newstyle server)"
                )));
            }
            let flags = be16(&bytes[16..18]);
            if flags & FLAG_FIXED_NEWSTYLE == 0 {
                return Err(malformed("a server without fixed newstyle".into()));
            }
            Ok((
                ServerMessage::Greeting {
                    no_zeroes: flags & FLAG_NO_ZEROES != 0,
                },
                bytes,
            ))
        }
        ServerExpect::OptionReply => {
            let mut bytes = read_first(r, 20)?;
            let magic = be64(&bytes[0..8]);
            if magic != OPT_REPLY_MAGIC {
                return Err(malformed(format!("option reply magic {magic:#x}")));
            }
            let option = be32(&bytes[8..12]);
            let reply = be32(&bytes[12..16]);
            let length = be32(&bytes[16..20]);
            if length > MAX_OPTION_DATA {
                return Err(malformed(format!(
                    "option reply with {length} bytes of data"
                )));
            }
            read_more(r, &mut bytes, length as usize)?;
            Ok((ServerMessage::OptionReply { option, reply }, bytes))
        }
        ServerExpect::ExportInfo { zeroes } => {
            let len = 10 + if zeroes { EXPORT_ZEROES } else { 0 };
            let bytes = read_first(r, len)?;
            Ok((ServerMessage::ExportInfo, bytes))
        }
        ServerExpect::Reply => {
            let mut bytes = read_first(r, 4)?;
            match be32(&bytes[0..4]) {
                SIMPLE_REPLY_MAGIC => {
                    read_more(r, &mut bytes, 12)?;
                    let error = be32(&bytes[4..8]);
                    let cookie = be64(&bytes[8..16]);
                    let request = sent(cookie).ok_or_else(|| unknown(cookie))?;
                    if error == 0 && request.command == CMD_READ {
                        read_more(r, &mut bytes, request.length as usize)?;
                    }
                    Ok((ServerMessage::SimpleReply { cookie, error }, bytes))
                }
                STRUCTURED_REPLY_MAGIC => {
                    read_more(r, &mut bytes, 16)?;
                    let flags = be16(&bytes[4..6]);
                    let kind = be16(&bytes[6..8]);
                    let cookie = be64(&bytes[8..16]);
                    let length = be32(&bytes[16..20]);
                    sent(cookie).ok_or_else(|| unknown(cookie))?;
                    if length > MAX_PAYLOAD {
                        return Err(malformed(format!("reply chunk of {length} bytes")));
                    }
                    read_more(r, &mut bytes, length as usize)?;
                    let error = (kind & REPLY_TYPE_ERROR_BIT != 0 && length >= 4)
                        .then(|| be32(&bytes[20..24]));
                    Ok((
                        ServerMessage::Chunk {
                            cookie,
                            flags,
                            kind,
                            error,
                        },
                        bytes,
                    ))
                }
                magic => Err(malformed(format!("reply magic {magic:#x}"))),
            }
        }
    }
}

/// The name of an NBD error code (the protocol's subset of errno).
pub fn error_name(code: u32) -> &'static str {
    match code {
        1 => "EPERM",
        5 => "EIO",
        12 => "ENOMEM",
        22 => "EINVAL",
        28 => "ENOSPC",
        75 => "EOVERFLOW",
        95 => "ENOTSUP",
        108 => "ESHUTDOWN",
        _ => "unknown error",
    }
}

pub fn command_name(command: u16) -> &'static str {
    match command {
        0 => "read",
        1 => "write",
        2 => "disconnect",
        3 => "flush",
        4 => "trim",
        5 => "cache",
        6 => "write zeroes",
        7 => "block status",
        8 => "resize",
        _ => "unknown command",
    }
}

/// Reads a message's first `len` bytes: nothing at all is a clean end.
fn read_first(r: &mut impl Read, len: usize) -> Result<Vec<u8>, ReadError> {
    let mut bytes = vec![0; len];
    let mut got = 0;
    while got < len {
        match r.read(&mut bytes[got..]) {
            Ok(0) if got == 0 => return Err(ReadError::Closed),
            Ok(0) => return Err(ReadError::Io(io::ErrorKind::UnexpectedEof.into())),
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(ReadError::Io(e)),
        }
    }
    Ok(bytes)
}

fn read_more(r: &mut impl Read, bytes: &mut Vec<u8>, len: usize) -> Result<(), ReadError> {
    let start = bytes.len();
    bytes.resize(start + len, 0);
    r.read_exact(&mut bytes[start..])?;
    Ok(())
}

fn malformed(what: String) -> ReadError {
    ReadError::Malformed(what)
}

fn unknown(cookie: u64) -> ReadError {
    malformed(format!(
        "a reply to cookie {cookie:#x}, which no request has"
    ))
}

fn be16(b: &[u8]) -> u16 {
    u16::from_be_bytes(b.try_into().expect("invariant: two bytes"))
}

fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes(b.try_into().expect("invariant: four bytes"))
}

fn be64(b: &[u8]) -> u64 {
    u64::from_be_bytes(b.try_into().expect("invariant: eight bytes"))
}

/// Builders of well-formed messages, for the tests here and the relay's.
#[cfg(test)]
pub mod build {
    use super::*;

    pub fn greeting(flags: u16) -> Vec<u8> {
        let mut b = NBDMAGIC.to_be_bytes().to_vec();
        b.extend(IHAVEOPT.to_be_bytes());
        b.extend(flags.to_be_bytes());
        b
    }

    pub fn option(option: u32, data: &[u8]) -> Vec<u8> {
        let mut b = IHAVEOPT.to_be_bytes().to_vec();
        b.extend(option.to_be_bytes());
        b.extend((data.len() as u32).to_be_bytes());
        b.extend(data);
        b
    }

    pub fn option_reply(option: u32, reply: u32, data: &[u8]) -> Vec<u8> {
        let mut b = OPT_REPLY_MAGIC.to_be_bytes().to_vec();
        b.extend(option.to_be_bytes());
        b.extend(reply.to_be_bytes());
        b.extend((data.len() as u32).to_be_bytes());
        b.extend(data);
        b
    }

    pub fn request(command: u16, cookie: u64, offset: u64, length: u32, data: &[u8]) -> Vec<u8> {
        let mut b = REQUEST_MAGIC.to_be_bytes().to_vec();
        b.extend(0u16.to_be_bytes());
        b.extend(command.to_be_bytes());
        b.extend(cookie.to_be_bytes());
        b.extend(offset.to_be_bytes());
        b.extend(length.to_be_bytes());
        b.extend(data);
        b
    }

    pub fn simple_reply(error: u32, cookie: u64, data: &[u8]) -> Vec<u8> {
        let mut b = SIMPLE_REPLY_MAGIC.to_be_bytes().to_vec();
        b.extend(error.to_be_bytes());
        b.extend(cookie.to_be_bytes());
        b.extend(data);
        b
    }

    pub fn chunk(flags: u16, kind: u16, cookie: u64, payload: &[u8]) -> Vec<u8> {
        let mut b = STRUCTURED_REPLY_MAGIC.to_be_bytes().to_vec();
        b.extend(flags.to_be_bytes());
        b.extend(kind.to_be_bytes());
        b.extend(cookie.to_be_bytes());
        b.extend((payload.len() as u32).to_be_bytes());
        b.extend(payload);
        b
    }
}

#[cfg(test)]
mod tests {
    use super::build::*;
    use super::*;

    fn client(bytes: &[u8], expect: ClientExpect) -> Result<ClientMessage, String> {
        let mut r = bytes;
        match read_client(&mut r, expect) {
            Ok((m, b)) => {
                assert_eq!(b, bytes[..b.len()], "the message's bytes are the input's");
                assert!(r.is_empty(), "{} bytes left unread", r.len());
                Ok(m)
            }
            Err(e) => Err(format!("{e:?}")),
        }
    }

    fn server(
        bytes: &[u8],
        expect: ServerExpect,
        sent: Option<Sent>,
    ) -> Result<ServerMessage, String> {
        let mut r = bytes;
        match read_server(&mut r, expect, |_| sent) {
            Ok((m, b)) => {
                assert_eq!(b, bytes[..b.len()]);
                assert!(r.is_empty(), "{} bytes left unread", r.len());
                Ok(m)
            }
            Err(e) => Err(format!("{e:?}")),
        }
    }

    #[test]
    fn client_messages_parse_whole() {
        let table: Vec<(Vec<u8>, ClientExpect, Result<ClientMessage, &str>)> = vec![
            (
                3u32.to_be_bytes().to_vec(),
                ClientExpect::Flags,
                Ok(ClientMessage::Flags { no_zeroes: true }),
            ),
            (
                1u32.to_be_bytes().to_vec(),
                ClientExpect::Flags,
                Ok(ClientMessage::Flags { no_zeroes: false }),
            ),
            (
                option(OPT_GO, b"\0\0\0\x04vol0\0\0"),
                ClientExpect::Option,
                Ok(ClientMessage::Option { option: OPT_GO }),
            ),
            (
                option(OPT_STRUCTURED_REPLY, b""),
                ClientExpect::Option,
                Ok(ClientMessage::Option {
                    option: OPT_STRUCTURED_REPLY,
                }),
            ),
            (
                request(CMD_WRITE, 7, 4096, 4, b"abcd"),
                ClientExpect::Request,
                Ok(ClientMessage::Request {
                    command: CMD_WRITE,
                    cookie: 7,
                    offset: 4096,
                    length: 4,
                }),
            ),
            // A read's length is what the server sends back, not payload.
            (
                request(CMD_READ, 8, 0, 4096, b""),
                ClientExpect::Request,
                Ok(ClientMessage::Request {
                    command: CMD_READ,
                    cookie: 8,
                    offset: 0,
                    length: 4096,
                }),
            ),
            (
                request(CMD_DISC, 9, 0, 0, b""),
                ClientExpect::Request,
                Ok(ClientMessage::Request {
                    command: CMD_DISC,
                    cookie: 9,
                    offset: 0,
                    length: 0,
                }),
            ),
            (
                b"IHAVEOPX\0\0\0\x07\0\0\0\0".to_vec(),
                ClientExpect::Option,
                Err("Malformed(\"option magic"),
            ),
            (
                request(CMD_WRITE, 7, 0, 4, b"ab"),
                ClientExpect::Request,
                Err("Io("),
            ),
            (
                request(CMD_WRITE, 7, 0, MAX_PAYLOAD + 1, b""),
                ClientExpect::Request,
                Err("Malformed(\"write of"),
            ),
            (
                vec![
                    0x25, 0x60, 0x95, 0x14, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
                    0, 0, 0, 0, 0, 0,
                ],
                ClientExpect::Request,
                Err("Malformed(\"request magic"),
            ),
            (vec![], ClientExpect::Request, Err("Closed")),
            (vec![0x25], ClientExpect::Request, Err("Io(")),
        ];
        for (bytes, expect, want) in table {
            let got = client(&bytes, expect);
            match want {
                Ok(m) => assert_eq!(got, Ok(m), "{bytes:02x?}"),
                Err(prefix) => {
                    let e = got.expect_err("a broken message parses");
                    assert!(e.starts_with(prefix), "{e} for {bytes:02x?}, want {prefix}");
                }
            }
        }
    }

    #[test]
    fn server_messages_parse_whole() {
        let read = Some(Sent {
            command: CMD_READ,
            length: 4,
        });
        let write = Some(Sent {
            command: CMD_WRITE,
            length: 4,
        });
        let mut export = 1u64.to_be_bytes().to_vec();
        export.extend(3u16.to_be_bytes());
        let mut export_zeroes = export.clone();
        export_zeroes.extend([0; EXPORT_ZEROES]);
        let mut error_chunk = 28u32.to_be_bytes().to_vec();
        error_chunk.extend(2u16.to_be_bytes());
        error_chunk.extend(b"no");
        type Row = (
            Vec<u8>,
            ServerExpect,
            Option<Sent>,
            Result<ServerMessage, &'static str>,
        );
        let table: Vec<Row> = vec![
            (
                greeting(3),
                ServerExpect::Greeting,
                None,
                Ok(ServerMessage::Greeting { no_zeroes: true }),
            ),
            (
                greeting(0),
                ServerExpect::Greeting,
                None,
                Err("Malformed(\"a server without fixed newstyle"),
            ),
            (
                b"NBDMAGIC\0\0\x42\x02\x81\x86\x12\x53\0\0".to_vec(),
                ServerExpect::Greeting,
                None,
                Err("Malformed(\"greeting"),
            ),
            (
                option_reply(OPT_GO, 3, b"\0\0\0\0\0\0\0\0\0\0\0\0"),
                ServerExpect::OptionReply,
                None,
                Ok(ServerMessage::OptionReply {
                    option: OPT_GO,
                    reply: 3,
                }),
            ),
            (
                option_reply(OPT_GO, REP_ACK, b""),
                ServerExpect::OptionReply,
                None,
                Ok(ServerMessage::OptionReply {
                    option: OPT_GO,
                    reply: REP_ACK,
                }),
            ),
            (
                export.clone(),
                ServerExpect::ExportInfo { zeroes: false },
                None,
                Ok(ServerMessage::ExportInfo),
            ),
            (
                export_zeroes,
                ServerExpect::ExportInfo { zeroes: true },
                None,
                Ok(ServerMessage::ExportInfo),
            ),
            (
                simple_reply(0, 5, b""),
                ServerExpect::Reply,
                write,
                Ok(ServerMessage::SimpleReply {
                    cookie: 5,
                    error: 0,
                }),
            ),
            (
                simple_reply(0, 5, b"data"),
                ServerExpect::Reply,
                read,
                Ok(ServerMessage::SimpleReply {
                    cookie: 5,
                    error: 0,
                }),
            ),
            // An error reply to a read carries no data.
            (
                simple_reply(5, 5, b""),
                ServerExpect::Reply,
                read,
                Ok(ServerMessage::SimpleReply {
                    cookie: 5,
                    error: 5,
                }),
            ),
            (
                simple_reply(0, 5, b""),
                ServerExpect::Reply,
                None,
                Err("Malformed(\"a reply to cookie 0x5"),
            ),
            (
                chunk(REPLY_FLAG_DONE, 0, 6, b""),
                ServerExpect::Reply,
                read,
                Ok(ServerMessage::Chunk {
                    cookie: 6,
                    flags: 1,
                    kind: 0,
                    error: None,
                }),
            ),
            (
                chunk(0, 1, 6, b"\0\0\0\0\0\0\0\0data"),
                ServerExpect::Reply,
                read,
                Ok(ServerMessage::Chunk {
                    cookie: 6,
                    flags: 0,
                    kind: 1,
                    error: None,
                }),
            ),
            (
                chunk(REPLY_FLAG_DONE, REPLY_TYPE_ERROR_BIT | 1, 6, &error_chunk),
                ServerExpect::Reply,
                write,
                Ok(ServerMessage::Chunk {
                    cookie: 6,
                    flags: 1,
                    kind: 0x8001,
                    error: Some(28),
                }),
            ),
            (
                b"\x67\x44\x66\x99".to_vec(),
                ServerExpect::Reply,
                write,
                Err("Malformed(\"reply magic"),
            ),
            (vec![], ServerExpect::Reply, write, Err("Closed")),
        ];
        for (bytes, expect, sent, want) in table {
            let got = server(&bytes, expect, sent);
            match want {
                Ok(m) => assert_eq!(got, Ok(m), "{bytes:02x?}"),
                Err(prefix) => {
                    let e = got.expect_err("a broken message parses");
                    assert!(e.starts_with(prefix), "{e} for {bytes:02x?}, want {prefix}");
                }
            }
        }
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(512))]
        /// Any bytes from either side are a message, an end or an error:
        /// never a panic, and never more bytes taken than given.
        #[test]
        fn any_bytes_are_read_without_panic(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..200), which in 0usize..7) {
            let mut r = &bytes[..];
            let sent = Some(Sent { command: CMD_READ, length: 16 });
            let taken = match which {
                0 => read_client(&mut r, ClientExpect::Flags).map(|(_, b)| b),
                1 => read_client(&mut r, ClientExpect::Option).map(|(_, b)| b),
                2 => read_client(&mut r, ClientExpect::Request).map(|(_, b)| b),
                3 => read_server(&mut r, ServerExpect::Greeting, |_| sent).map(|(_, b)| b),
                4 => read_server(&mut r, ServerExpect::OptionReply, |_| sent).map(|(_, b)| b),
                5 => read_server(&mut r, ServerExpect::ExportInfo { zeroes: true }, |_| sent).map(|(_, b)| b),
                _ => read_server(&mut r, ServerExpect::Reply, |_| sent).map(|(_, b)| b),
            };
            if let Ok(b) = taken {
                proptest::prop_assert_eq!(&b[..], &bytes[..b.len()]);
            }
        }
    }
}
