//! The WebSocket protocol (RFC 6455), server side, as much as a push gateway needs.
//!
//! Server frames are never masked, so one encoded frame ([`encode`]) is the same bytes for every
//! client and is shared, not copied, across a broadcast. Client frames are parsed only to answer
//! pings and closes and to enforce the size limit: a push gateway ignores what clients send.

use base64::Engine as _;
use bytes::{Buf, BufMut, Bytes, BytesMut};
use sha1::{Digest, Sha1};

/// Text frame opcode.
pub const TEXT: u8 = 0x1;
/// Binary frame opcode (content that is not UTF-8).
pub const BINARY: u8 = 0x2;
const CLOSE: u8 = 0x8;
const PING: u8 = 0x9;
const PONG: u8 = 0xA;

/// Close codes used by the gateway.
pub mod close {
    pub const NORMAL: u16 = 1000;
    pub const GOING_AWAY: u16 = 1001;
    pub const PROTOCOL_ERROR: u16 = 1002;
    pub const POLICY: u16 = 1008;
    pub const TOO_BIG: u16 = 1009;
}

/// The `Sec-WebSocket-Accept` answer to a client's `Sec-WebSocket-Key`.
pub fn accept_key(key: &[u8]) -> String {
    let mut h = Sha1::new();
    h.update(key);
    h.update(b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11");
    base64::engine::general_purpose::STANDARD.encode(h.finalize())
}

/// One whole unmasked server frame.
pub fn encode(opcode: u8, payload: &[u8]) -> Bytes {
    let mut out = BytesMut::with_capacity(payload.len() + 10);
    out.put_u8(0x80 | opcode);
    match payload.len() {
        n if n < 126 => out.put_u8(n as u8),
        n if n <= 0xFFFF => {
            out.put_u8(126);
            out.put_u16(n as u16);
        }
        n => {
            out.put_u8(127);
            out.put_u64(n as u64);
        }
    }
    out.put_slice(payload);
    out.freeze()
}

/// A close frame with a code and a short reason.
pub fn close_frame(code: u16, reason: &str) -> Bytes {
    let mut p = Vec::with_capacity(2 + reason.len());
    p.extend_from_slice(&code.to_be_bytes());
    p.extend_from_slice(&reason.as_bytes()[..reason.len().min(120)]);
    encode(CLOSE, &p)
}

/// What a client frame asks of the server.
#[derive(Debug, PartialEq)]
pub enum ClientFrame {
    /// Data (text, binary or a continuation): accepted and ignored.
    Data,
    /// Answer with a pong carrying the same bytes.
    Ping(Bytes),
    Pong,
    /// The client closes, with this code if it gave one.
    Close(Option<u16>),
}

/// A client frame that breaks the protocol or the limits; the connection closes with `code()`.
#[derive(Debug, PartialEq, thiserror::Error)]
pub enum WsError {
    #[error("client frames must be masked")]
    Unmasked,
    #[error("reserved bits set or unknown opcode {0:#x}")]
    BadOpcode(u8),
    #[error("control frames must be whole and at most 125 bytes")]
    BadControl,
    #[error("frame of {0} bytes exceeds the limit of {1}")]
    TooBig(u64, usize),
}

impl WsError {
    /// The close code that reports this error.
    pub fn code(&self) -> u16 {
        match self {
            WsError::TooBig(..) => close::TOO_BIG,
            _ => close::PROTOCOL_ERROR,
        }
    }
}

/// Take one client frame off `buf` if it is complete; frames over `max` bytes are refused from
/// their header, before their payload is buffered.
pub fn parse(buf: &mut BytesMut, max: usize) -> Result<Option<ClientFrame>, WsError> {
    let [b0, b1, ..] = buf[..] else {
        return Ok(None);
    };
    let (fin, rsv, opcode) = (b0 & 0x80 != 0, b0 & 0x70, b0 & 0x0F);
    if rsv != 0 || !matches!(opcode, 0x0..=0x2 | CLOSE | PING | PONG) {
        return Err(WsError::BadOpcode(b0));
    }
    if b1 & 0x80 == 0 {
        return Err(WsError::Unmasked);
    }
    let (len, header) = match b1 & 0x7F {
        126 => match buf.get(2..4) {
            Some(b) => (u64::from(u16::from_be_bytes([b[0], b[1]])), 4),
            None => return Ok(None),
        },
        127 => match buf.get(2..10) {
            Some(b) => (u64::from_be_bytes(b.try_into().unwrap_or_default()), 10),
            None => return Ok(None),
        },
        n => (u64::from(n), 2),
    };
    let control = opcode >= CLOSE;
    if control && (!fin || len > 125) {
        return Err(WsError::BadControl);
    }
    if len > max as u64 {
        return Err(WsError::TooBig(len, max));
    }
    let total = header + 4 + len as usize;
    if buf.len() < total {
        return Ok(None);
    }
    let mut frame = buf.split_to(total);
    frame.advance(header);
    let mask = [frame[0], frame[1], frame[2], frame[3]];
    frame.advance(4);
    if !control {
        return Ok(Some(ClientFrame::Data));
    }
    for (i, b) in frame.iter_mut().enumerate() {
        *b ^= mask[i % 4];
    }
    Ok(Some(match opcode {
        PING => ClientFrame::Ping(frame.freeze()),
        PONG => ClientFrame::Pong,
        _ => ClientFrame::Close(frame.get(..2).map(|c| u16::from_be_bytes([c[0], c[1]]))),
    }))
}

/// A pong answering `ping`.
pub fn pong(payload: &[u8]) -> Bytes {
    encode(PONG, payload)
}

/// A server ping (heartbeat).
pub fn ping() -> Bytes {
    encode(PING, b"")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn masked(first: u8, payload: &[u8]) -> BytesMut {
        let mask = [1, 2, 3, 4];
        let mut b = BytesMut::new();
        b.put_u8(first);
        assert!(payload.len() < 126);
        b.put_u8(0x80 | payload.len() as u8);
        b.put_slice(&mask);
        b.extend(payload.iter().enumerate().map(|(i, x)| x ^ mask[i % 4]));
        b
    }

    #[test]
    fn rfc_example_key() {
        assert_eq!(accept_key(b"dGhlIHNhbXBsZSBub25jZQ=="), "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=");
    }

    #[test]
    fn lengths() {
        assert_eq!(&encode(TEXT, b"hi")[..], b"\x81\x02hi");
        assert_eq!(encode(TEXT, &[0; 200])[1], 126);
        assert_eq!(encode(TEXT, &[0; 70000])[1], 127);
    }

    #[test]
    fn client_frames() {
        let mut b = masked(0x89, b"abc");
        b.extend_from_slice(&masked(0x88, &1000u16.to_be_bytes()));
        b.extend_from_slice(&masked(0x81, b"ignored"));
        assert_eq!(parse(&mut b, 100), Ok(Some(ClientFrame::Ping(Bytes::from_static(b"abc")))));
        assert_eq!(parse(&mut b, 100), Ok(Some(ClientFrame::Close(Some(1000)))));
        assert_eq!(parse(&mut b, 100), Ok(Some(ClientFrame::Data)));
        assert_eq!(parse(&mut b, 100), Ok(None));
    }

    #[test]
    fn bad_client_frames() {
        assert_eq!(parse(&mut BytesMut::from(&b"\x81\x02hi"[..]), 100), Err(WsError::Unmasked));
        assert_eq!(parse(&mut masked(0x83, b""), 100), Err(WsError::BadOpcode(0x83)));
        assert_eq!(parse(&mut masked(0x09, b""), 100), Err(WsError::BadControl));
        let mut big = BytesMut::from(&b"\x82\xFF\x00\x00\x00\x01\x00\x00\x00\x00"[..]);
        assert_eq!(parse(&mut big, 100), Err(WsError::TooBig(1 << 32, 100)));
        assert_eq!(WsError::TooBig(1, 1).code(), close::TOO_BIG);
    }
}
