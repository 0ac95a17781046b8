//! The WebSocket protocol (RFC 6455), server side, as much as a push gateway needs.
//!
//! Server frames are never masked, so one encoded frame ([`encode`]) is the same bytes for every
//! client and is shared, not copied, across a broadcast. Client frames are checked as RFC 6455
//! requires of a server (masking, reserved bits, opcodes, fragmentation, UTF-8 of text across
//! fragments, close codes, the message size limit) by a [`Reader`] that keeps a few bytes of state
//! per connection; their data is then ignored: a push gateway does not act on what clients send.
//! With permessage-deflate negotiated ([`crate::deflate`]), a compressed client message is
//! inflated (within the size limit) so that its text can be checked.

use base64::Engine as _;
use bytes::{Buf, BufMut, Bytes, BytesMut};
use sha1::{Digest, Sha1};

/// Text frame opcode.
pub const TEXT: u8 = 0x1;
/// Binary frame opcode (content that is not UTF-8).
pub const BINARY: u8 = 0x2;
const CONTINUATION: u8 = 0x0;
const CLOSE: u8 = 0x8;
const PING: u8 = 0x9;
const PONG: u8 = 0xA;

/// Close codes used by the gateway.
pub mod close {
    pub const NORMAL: u16 = 1000;
    pub const GOING_AWAY: u16 = 1001;
    pub const PROTOCOL_ERROR: u16 = 1002;
    pub const INVALID_DATA: u16 = 1007;
    pub const POLICY: u16 = 1008;
    pub const TOO_BIG: u16 = 1009;
}

/// The `Sec-WebSocket-Accept` answer to a client's `Sec-WebSocket-Key`.
pub fn accept_key(key: &[u8]) -> [u8; 28] {
    let mut h = Sha1::new();
    h.update(key);
    h.update(b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11");
    // 20 bytes of SHA-1 are 28 characters of base64.
    let mut out = [0u8; 28];
    let _ = base64::engine::general_purpose::STANDARD.encode_slice(h.finalize(), &mut out);
    out
}

/// One whole unmasked server frame.
pub fn encode(opcode: u8, payload: &[u8]) -> Bytes {
    encode_first(0x80 | opcode, payload)
}

/// One whole unmasked server frame carrying `payload` compressed (permessage-deflate: RSV1 set).
pub fn encode_compressed(opcode: u8, payload: &[u8]) -> Bytes {
    encode_first(0x80 | 0x40 | opcode, &crate::deflate::compress(payload))
}

fn encode_first(b0: u8, payload: &[u8]) -> Bytes {
    let mut out = BytesMut::with_capacity(payload.len() + 10);
    out.put_u8(b0);
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
    /// Data (a whole message or a fragment of one): checked and ignored.
    Data,
    /// A whole message (fragments joined, inflated), for a reader that keeps messages
    /// ([`Reader::keeping`]): text (valid UTF-8) or binary.
    Message {
        text: bool,
        data: Bytes,
    },
    /// Answer with a pong carrying the same bytes.
    Ping(Bytes),
    Pong,
    /// The client closes, with this code if it gave one; the server echoes it.
    Close(Option<u16>),
}

/// A client frame that breaks the protocol or the limits; the connection closes with `code()`.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum WsError {
    #[error("client frames must be masked")]
    Unmasked,
    #[error("reserved bits set or unknown opcode {0:#x}")]
    BadOpcode(u8),
    #[error("control frames must be whole and at most 125 bytes")]
    BadControl,
    #[error("64-bit frame length with the most significant bit set")]
    BadLength,
    #[error("message of {0} bytes exceeds the limit of {1}")]
    TooBig(u64, usize),
    #[error("continuation frame without a message to continue")]
    NothingToContinue,
    #[error("new data frame inside a fragmented message")]
    ExpectedContinuation,
    #[error("close frame with a one-byte payload")]
    BadCloseLength,
    #[error("close code {0} may not be sent")]
    BadCloseCode(u16),
    #[error("text is not valid UTF-8")]
    InvalidUtf8,
    #[error("compressed message is not valid DEFLATE data")]
    BadCompression,
}

impl WsError {
    /// The close code that reports this error.
    pub fn code(&self) -> u16 {
        match self {
            WsError::TooBig(..) => close::TOO_BIG,
            WsError::InvalidUtf8 | WsError::BadCompression => close::INVALID_DATA,
            _ => close::PROTOCOL_ERROR,
        }
    }
}

/// Whether a peer may send close code `code` (RFC 6455 section 7.4; 1012-1014 are registered
/// with IANA since).
pub fn close_code_allowed(code: u16) -> bool {
    matches!(code, 1000..=1003 | 1007..=1014 | 3000..=4999)
}

/// A client's message stream between frames: which message is being fragmented, its size so far,
/// and the bytes of a UTF-8 sequence split between two fragments. A few bytes per connection;
/// while a message arrives compressed, or for a reader that keeps messages, what it needs for
/// that (allocated only then: an idle connection pays nothing for either).
#[derive(Default)]
pub struct Reader {
    /// Opcode of the fragmented message in progress ([`TEXT`] or [`BINARY`]); 0 when none.
    message: u8,
    /// Payload bytes of the message so far.
    len: u64,
    utf8: Utf8Tail,
    /// [`DEFLATE`] (permessage-deflate was negotiated: a message may come compressed, RSV1 on its
    /// first frame) and [`KEEP`] (whole messages are handed over).
    flags: u8,
    partial: Option<Box<Partial>>,
}

/// A message in progress that needs more than counting: its decompressor, its bytes so far.
#[derive(Default)]
struct Partial {
    inflate: Option<crate::deflate::Inflate>,
    data: BytesMut,
}

/// [`Reader`] flags.
const DEFLATE: u8 = 1;
const KEEP: u8 = 2;

impl Reader {
    /// A reader for a connection that negotiated permessage-deflate (or not).
    pub fn new(deflate: bool) -> Reader {
        Reader { flags: if deflate { DEFLATE } else { 0 }, ..Reader::default() }
    }

    /// This reader hands over whole messages ([`ClientFrame::Message`]) instead of checking and
    /// dropping them.
    pub fn keeping(mut self) -> Reader {
        self.flags |= KEEP;
        self
    }

    /// Take one client frame off `buf` if it is complete. Messages over `max` bytes (all their
    /// fragments together) are refused from a frame header, before its payload is buffered.
    pub fn parse(&mut self, buf: &mut BytesMut, max: usize) -> Result<Option<ClientFrame>, WsError> {
        let [b0, b1, ..] = buf[..] else {
            return Ok(None);
        };
        let (fin, rsv, opcode) = (b0 & 0x80 != 0, b0 & 0x70, b0 & 0x0F);
        // RSV1 marks a compressed message, on its first frame only, once negotiated.
        let compressed = rsv == 0x40 && self.flags & DEFLATE != 0 && matches!(opcode, TEXT | BINARY);
        if (rsv != 0 && !compressed) || !matches!(opcode, CONTINUATION | TEXT | BINARY | CLOSE | PING | PONG) {
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
        if len >> 63 != 0 {
            return Err(WsError::BadLength);
        }
        let control = opcode >= CLOSE;
        if control {
            if !fin || len > 125 {
                return Err(WsError::BadControl);
            }
        } else {
            match (opcode, self.message) {
                (CONTINUATION, 0) => return Err(WsError::NothingToContinue),
                (TEXT | BINARY, m) if m != 0 => return Err(WsError::ExpectedContinuation),
                _ => {}
            }
            let so_far = if opcode == CONTINUATION { self.len } else { 0 };
            if so_far + len > max as u64 {
                return Err(WsError::TooBig(so_far + len, max));
            }
        }
        let total = header + 4 + len as usize;
        if buf.len() < total {
            return Ok(None);
        }
        let mut frame = buf.split_to(total);
        frame.advance(header);
        let mask = [frame[0], frame[1], frame[2], frame[3]];
        frame.advance(4);
        let text = opcode == TEXT || (opcode == CONTINUATION && self.message == TEXT);
        let keep = self.flags & KEEP != 0;
        if matches!(opcode, TEXT | BINARY) && (compressed || keep) {
            let inflate = compressed.then(crate::deflate::Inflate::default);
            self.partial = Some(Box::new(Partial { inflate, data: BytesMut::new() }));
        }
        if control || text || keep || self.partial.as_ref().is_some_and(|p| p.inflate.is_some()) {
            for (i, b) in frame.iter_mut().enumerate() {
                *b ^= mask[i % 4];
            }
        }
        if !control {
            if opcode != CONTINUATION {
                (self.message, self.len) = (opcode, 0);
            }
            let message = if text { TEXT } else { BINARY };
            self.len += len;
            match self.partial.as_deref_mut() {
                Some(Partial { inflate: Some(inflate), data }) => {
                    // The text to check is what the compressed bytes inflate to.
                    let (utf8, mut valid) = (&mut self.utf8, true);
                    let mut check = |piece: &[u8]| {
                        valid &= !text || utf8.feed(piece, false);
                        if keep {
                            data.extend_from_slice(piece);
                        }
                    };
                    inflate.feed(&frame, fin, max as u64, &mut check).map_err(|e| match e {
                        crate::deflate::InflateError::Corrupt => WsError::BadCompression,
                        crate::deflate::InflateError::TooBig(n) => WsError::TooBig(n, max),
                    })?;
                    if !valid || (text && fin && !self.utf8.feed(&[], true)) {
                        return Err(WsError::InvalidUtf8);
                    }
                }
                Some(Partial { inflate: None, data }) => {
                    if text && !self.utf8.feed(&frame, fin) {
                        return Err(WsError::InvalidUtf8);
                    }
                    match data.is_empty() && fin {
                        // A whole message in one frame: its own bytes, not copied.
                        true => *data = frame,
                        false => data.extend_from_slice(&frame),
                    }
                }
                None if text && !self.utf8.feed(&frame, fin) => return Err(WsError::InvalidUtf8),
                None => {}
            }
            if !fin {
                return Ok(Some(ClientFrame::Data));
            }
            (self.message, self.len) = (0, 0);
            let partial = self.partial.take();
            return Ok(Some(match partial {
                Some(p) if keep => ClientFrame::Message { text: message == TEXT, data: p.data.freeze() },
                _ => ClientFrame::Data,
            }));
        }
        Ok(Some(match opcode {
            PING => ClientFrame::Ping(frame.freeze()),
            PONG => ClientFrame::Pong,
            _ => match &frame[..] {
                [] => ClientFrame::Close(None),
                [_] => return Err(WsError::BadCloseLength),
                [hi, lo, reason @ ..] => {
                    let code = u16::from_be_bytes([*hi, *lo]);
                    if !close_code_allowed(code) {
                        return Err(WsError::BadCloseCode(code));
                    }
                    if std::str::from_utf8(reason).is_err() {
                        return Err(WsError::InvalidUtf8);
                    }
                    ClientFrame::Close(Some(code))
                }
            },
        }))
    }
}

/// The start of a UTF-8 sequence that the previous fragment ended in the middle of.
#[derive(Default)]
struct Utf8Tail {
    bytes: [u8; 4],
    len: u8,
}

impl Utf8Tail {
    /// Check the next piece of a text message (`last`: the message ends with it). Fails as soon as
    /// the bytes seen cannot be the start of valid UTF-8.
    fn feed(&mut self, mut data: &[u8], last: bool) -> bool {
        while self.len > 0 {
            let Some((&b, rest)) = data.split_first() else { return !last };
            self.bytes[self.len as usize] = b;
            self.len += 1;
            data = rest;
            match std::str::from_utf8(&self.bytes[..self.len as usize]) {
                Ok(_) => self.len = 0,
                Err(e) if e.error_len().is_none() => {} // still incomplete, valid so far
                Err(_) => return false,
            }
        }
        match std::str::from_utf8(data) {
            Ok(_) => true,
            Err(e) if e.error_len().is_none() && !last => {
                let tail = &data[e.valid_up_to()..];
                self.bytes[..tail.len()].copy_from_slice(tail);
                self.len = tail.len() as u8;
                true
            }
            Err(_) => false,
        }
    }
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
        assert_eq!(&accept_key(b"dGhlIHNhbXBsZSBub25jZQ==")[..], b"s3pPLMBiTxaQ9kYGzzhZRbK+xOo=");
    }

    #[test]
    fn lengths() {
        assert_eq!(&encode(TEXT, b"hi")[..], b"\x81\x02hi");
        assert_eq!(encode(TEXT, &[0; 200])[1], 126);
        assert_eq!(encode(TEXT, &[0; 70000])[1], 127);
    }

    fn parse(b: &mut BytesMut, max: usize) -> Result<Option<ClientFrame>, WsError> {
        Reader::default().parse(b, max)
    }

    /// Parse every frame of `frames` with one reader; the first error, or the last frame.
    fn run(frames: &[(u8, &[u8])]) -> Result<Option<ClientFrame>, WsError> {
        let mut r = Reader::default();
        let mut last = None;
        for (first, payload) in frames {
            last = r.parse(&mut masked(*first, payload), 1000)?;
        }
        Ok(last)
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
    fn a_keeping_reader_hands_over_whole_messages() {
        let mut r = Reader::new(true).keeping();
        // Three fragments with a ping between them: one message, the ping answered on its way.
        let mut b = masked(0x01, "héllo ".as_bytes());
        b.extend_from_slice(&masked(0x89, b"p"));
        b.extend_from_slice(&masked(0x00, b"wor"));
        b.extend_from_slice(&masked(0x80, b"ld"));
        b.extend_from_slice(&masked(0x82, &[0, 255]));
        assert_eq!(r.parse(&mut b, 100), Ok(Some(ClientFrame::Data)));
        assert_eq!(r.parse(&mut b, 100), Ok(Some(ClientFrame::Ping(Bytes::from_static(b"p")))));
        assert_eq!(r.parse(&mut b, 100), Ok(Some(ClientFrame::Data)));
        let whole = Bytes::from("héllo world");
        assert_eq!(r.parse(&mut b, 100), Ok(Some(ClientFrame::Message { text: true, data: whole })));
        let binary = Bytes::from_static(&[0, 255]);
        assert_eq!(r.parse(&mut b, 100), Ok(Some(ClientFrame::Message { text: false, data: binary })));
        // A compressed message (RSV1) comes out inflated.
        let compressed = encode_compressed(TEXT, b"squeezed squeezed squeezed");
        let mut b = masked(compressed[0], &compressed[2..]);
        let data = Bytes::from_static(b"squeezed squeezed squeezed");
        assert_eq!(r.parse(&mut b, 100), Ok(Some(ClientFrame::Message { text: true, data })));
        // The limit counts the whole message.
        let mut b = masked(0x01, &[b'x'; 60]);
        b.extend_from_slice(&masked(0x80, &[b'x'; 60]));
        assert_eq!(r.parse(&mut b, 100), Ok(Some(ClientFrame::Data)));
        assert_eq!(r.parse(&mut b, 100), Err(WsError::TooBig(120, 100)));
    }

    #[test]
    fn bad_client_frames() {
        assert_eq!(parse(&mut BytesMut::from(&b"\x81\x02hi"[..]), 100), Err(WsError::Unmasked));
        assert_eq!(parse(&mut masked(0x83, b""), 100), Err(WsError::BadOpcode(0x83)));
        assert_eq!(parse(&mut masked(0xC1, b""), 100), Err(WsError::BadOpcode(0xC1)), "RSV1 without an extension");
        assert_eq!(parse(&mut masked(0x09, b""), 100), Err(WsError::BadControl));
        let mut big = BytesMut::from(&b"\x82\xFF\x00\x00\x00\x01\x00\x00\x00\x00"[..]);
        assert_eq!(parse(&mut big, 100), Err(WsError::TooBig(1 << 32, 100)));
        let mut top = BytesMut::from(&b"\x82\xFF\x80\x00\x00\x00\x00\x00\x00\x01"[..]);
        assert_eq!(parse(&mut top, usize::MAX), Err(WsError::BadLength));
        assert_eq!(WsError::TooBig(1, 1).code(), close::TOO_BIG);
        assert_eq!(WsError::InvalidUtf8.code(), close::INVALID_DATA);
    }

    #[test]
    fn fragmentation() {
        // A ping between fragments is answered; the message goes on.
        let ping = run(&[(0x01, b"Hel"), (0x89, b"p")]);
        assert_eq!(ping, Ok(Some(ClientFrame::Ping(Bytes::from_static(b"p")))));
        assert_eq!(run(&[(0x01, b"Hel"), (0x89, b""), (0x80, b"lo")]), Ok(Some(ClientFrame::Data)));
        assert_eq!(run(&[(0x80, b"x")]), Err(WsError::NothingToContinue));
        assert_eq!(run(&[(0x00, b"x")]), Err(WsError::NothingToContinue));
        assert_eq!(run(&[(0x81, b"done"), (0x80, b"x")]), Err(WsError::NothingToContinue));
        assert_eq!(run(&[(0x01, b"a"), (0x81, b"b")]), Err(WsError::ExpectedContinuation));
        assert_eq!(run(&[(0x02, b"a"), (0x01, b"b")]), Err(WsError::ExpectedContinuation));
        // Control frames may not be fragmented.
        assert_eq!(run(&[(0x09, b"")]), Err(WsError::BadControl));
    }

    #[test]
    fn size_limit_counts_whole_messages() {
        let mut r = Reader::default();
        assert_eq!(r.parse(&mut masked(0x02, &[0; 60]), 100), Ok(Some(ClientFrame::Data)));
        assert_eq!(r.parse(&mut masked(0x00, &[0; 30]), 100), Ok(Some(ClientFrame::Data)));
        assert_eq!(r.parse(&mut masked(0x80, &[0; 11]), 100), Err(WsError::TooBig(101, 100)));
        // A finished message does not count towards the next one.
        let mut r = Reader::default();
        assert_eq!(r.parse(&mut masked(0x82, &[0; 100]), 100), Ok(Some(ClientFrame::Data)));
        assert_eq!(r.parse(&mut masked(0x82, &[0; 100]), 100), Ok(Some(ClientFrame::Data)));
    }

    #[test]
    fn compressed_messages() {
        use crate::deflate::compress;
        let mut r = Reader::new(true);
        let mut one = masked(0xC1, &compress("héllo".as_bytes()));
        assert_eq!(r.parse(&mut one, 100), Ok(Some(ClientFrame::Data)));
        // Fragmented: RSV1 on the first frame only; a code point split between fragments.
        let c = compress("añb".as_bytes());
        let (a, b) = c.split_at(2);
        let mut two = masked(0x41, a);
        two.extend_from_slice(&masked(0x80, b));
        assert_eq!(r.parse(&mut two, 100), Ok(Some(ClientFrame::Data)));
        assert_eq!(r.parse(&mut two, 100), Ok(Some(ClientFrame::Data)));
        let mut bad = masked(0x41, a);
        bad.extend_from_slice(&masked(0xC0, b));
        let mut r = Reader::new(true);
        assert_eq!(r.parse(&mut bad, 100), Ok(Some(ClientFrame::Data)));
        assert_eq!(r.parse(&mut bad, 100), Err(WsError::BadOpcode(0xC0)), "RSV1 on a continuation");
        let cases: [(&[u8], u8, WsError); 4] = [
            (&compress(b"\xff\xfe"), 0xC1, WsError::InvalidUtf8),
            (b"\xff\xff\xff garbage", 0xC2, WsError::BadCompression),
            (&compress(&[b'a'; 1000]), 0xC1, WsError::TooBig(1000, 100)),
            (b"", 0xC9, WsError::BadOpcode(0xC9)),
        ];
        for (payload, first, err) in cases {
            let mut f = masked(first, payload);
            let got = Reader::new(true).parse(&mut f, 100);
            assert!(
                matches!((&got, &err), (Err(WsError::TooBig(..)), WsError::TooBig(..))) || got == Err(err.clone()),
                "{got:?}"
            );
        }
        assert_eq!(WsError::BadCompression.code(), close::INVALID_DATA);
        let mut f = masked(0xC1, &compress(b"x"));
        assert_eq!(Reader::new(false).parse(&mut f, 100), Err(WsError::BadOpcode(0xC1)), "not negotiated");
    }

    #[test]
    fn utf8_across_fragments() {
        let euro = "\u{20AC}".as_bytes(); // E2 82 AC
        let data = Ok(Some(ClientFrame::Data));
        assert_eq!(run(&[(0x81, "κόσμε".as_bytes())]), data);
        assert_eq!(run(&[(0x01, &euro[..1]), (0x00, &euro[1..2]), (0x80, &euro[2..])]), data);
        assert_eq!(run(&[(0x01, &euro[..2]), (0x89, b""), (0x80, &euro[2..])]), data);
        assert_eq!(run(&[(0x81, b"\xCE\xBA\xE1\xBD")]), Err(WsError::InvalidUtf8), "cut at the end");
        assert_eq!(run(&[(0x01, &euro[..2]), (0x80, b"")]), Err(WsError::InvalidUtf8));
        assert_eq!(run(&[(0x81, b"\xED\xA0\x80")]), Err(WsError::InvalidUtf8), "surrogate");
        assert_eq!(run(&[(0x81, b"\xC0\xAF")]), Err(WsError::InvalidUtf8), "overlong");
        // Fails on the fragment where it becomes invalid, not at the end of the message.
        assert_eq!(run(&[(0x01, b"\xF4"), (0x00, b"\x90")]), Err(WsError::InvalidUtf8));
        assert_eq!(run(&[(0x01, b"ok\xFF")]), Err(WsError::InvalidUtf8));
        // Binary data is not text.
        assert_eq!(run(&[(0x82, b"\xFF\xFE")]), data);
    }

    #[test]
    fn close_frames() {
        let close = |p: &[u8]| run(&[(0x88, p)]);
        assert_eq!(close(b""), Ok(Some(ClientFrame::Close(None))));
        assert_eq!(close(b"\x03"), Err(WsError::BadCloseLength));
        for ok in [1000u16, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 3000, 3999, 4000, 4999] {
            assert_eq!(close(&ok.to_be_bytes()), Ok(Some(ClientFrame::Close(Some(ok)))), "{ok}");
        }
        for bad in [0u16, 999, 1004, 1005, 1006, 1015, 1016, 1100, 2000, 2999, 5000, 65535] {
            assert_eq!(close(&bad.to_be_bytes()), Err(WsError::BadCloseCode(bad)), "{bad}");
        }
        assert_eq!(close(b"\x03\xE8bye"), Ok(Some(ClientFrame::Close(Some(1000)))));
        assert_eq!(close(b"\x03\xE8\xFF"), Err(WsError::InvalidUtf8));
    }
}
