//! permessage-deflate (RFC 7692) as a push gateway does it: accepting a client's offer, compressing
//! a server message once so that every connection that negotiated compression shares the same
//! frame, and inflating a client's compressed message within a size bound.
//!
//! The server answers `server_no_context_takeover; client_no_context_takeover`: neither side keeps
//! a compression context from one message to the next. That is what lets one compressed frame go
//! to every client (no per-connection dictionary), and keeps an idle connection free of any
//! (de)compressor state: a client message is inflated by a decompressor made for it alone.

use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress, Status};

/// The `Sec-WebSocket-Extensions` answer when compression is negotiated.
pub const RESPONSE: &str = "permessage-deflate; server_no_context_takeover; client_no_context_takeover";

/// The four bytes a sync flush ends with, removed from each message (RFC 7692 7.2.1).
const TAIL: [u8; 4] = [0, 0, 0xff, 0xff];

/// Whether `header` (the `Sec-WebSocket-Extensions` values, comma-separated offers) offers
/// permessage-deflate on terms this server can take: it compresses with the full window (15
/// bits) and no context takeover, so an offer that limits the server's window below 15 bits, or
/// has a parameter this server does not know, is declined (the connection goes uncompressed).
pub fn accepts(header: &str) -> bool {
    header.split(',').any(|offer| {
        let mut params = offer.split(';').map(str::trim);
        params.next() == Some("permessage-deflate")
            && params.all(|p| {
                let (name, value) = match p.split_once('=') {
                    Some((n, v)) => (n.trim(), Some(v.trim().trim_matches('"'))),
                    None => (p, None),
                };
                match name {
                    "server_no_context_takeover" | "client_no_context_takeover" => value.is_none(),
                    "client_max_window_bits" => {
                        value.is_none_or(|v| v.parse::<u8>().is_ok_and(|b| (8..=15).contains(&b)))
                    }
                    "server_max_window_bits" => value == Some("15"),
                    _ => false,
                }
            })
    })
}

/// `payload` compressed as one message: the raw DEFLATE data of a sync flush, without its tail.
pub fn compress(payload: &[u8]) -> Vec<u8> {
    let mut c = Compress::new(Compression::default(), false);
    let mut out = Vec::with_capacity(payload.len() / 2 + 64);
    // A sync flush is complete once its empty stored block (the tail) is out: the compressor may
    // hold part of it back even when the buffer had room (miniz_oxide does), so calls go on until
    // then, not until the buffer is left with room.
    loop {
        if out.capacity() - out.len() < 64 {
            out.reserve(out.capacity().max(256));
        }
        let (consumed, made) = (c.total_in() as usize, c.total_out());
        if c.compress_vec(&payload[consumed..], &mut out, FlushCompress::Sync).is_err() {
            break;
        }
        let all_in = c.total_in() as usize == payload.len();
        if all_in && (out.ends_with(&TAIL) || c.total_out() == made) {
            break;
        }
    }
    if out.ends_with(&TAIL) {
        out.truncate(out.len() - TAIL.len());
    }
    out
}

/// Why a compressed client message was refused.
#[derive(Debug, PartialEq)]
pub enum InflateError {
    /// The data is not valid DEFLATE.
    Corrupt,
    /// It inflates to more than the limit.
    TooBig(u64),
}

/// One compressed client message being inflated.
pub struct Inflate {
    d: Decompress,
}

impl Default for Inflate {
    fn default() -> Self {
        Inflate { d: Decompress::new(false) }
    }
}

impl Inflate {
    /// Inflate `input` (`last`: the message ends with it), handing the output to `sink` piece by
    /// piece, and refusing more than `max` bytes of output in all.
    pub fn feed(
        &mut self,
        input: &[u8],
        last: bool,
        max: u64,
        sink: &mut dyn FnMut(&[u8]),
    ) -> Result<(), InflateError> {
        self.run(input, max, sink, FlushDecompress::None)?;
        if last {
            self.run(&TAIL, max, sink, FlushDecompress::Sync)?;
        }
        Ok(())
    }

    fn run(
        &mut self,
        mut input: &[u8],
        max: u64,
        sink: &mut dyn FnMut(&[u8]),
        flush: FlushDecompress,
    ) -> Result<(), InflateError> {
        let mut out = [0u8; 4096];
        loop {
            let (in_before, out_before) = (self.d.total_in(), self.d.total_out());
            let status = self.d.decompress(input, &mut out, flush).map_err(|_| InflateError::Corrupt)?;
            let used = (self.d.total_in() - in_before) as usize;
            let made = (self.d.total_out() - out_before) as usize;
            input = &input[used..];
            if self.d.total_out() > max {
                return Err(InflateError::TooBig(self.d.total_out()));
            }
            sink(&out[..made]);
            // More to do while input remains or the output buffer came back full.
            if (input.is_empty() && made < out.len()) || status == Status::StreamEnd || (used == 0 && made == 0) {
                return Ok(());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inflate(data: &[u8], max: u64) -> Result<Vec<u8>, InflateError> {
        let mut out = Vec::new();
        Inflate::default().feed(data, true, max, &mut |b| out.extend_from_slice(b))?;
        Ok(out)
    }

    #[test]
    fn large_messages_inflate_whole() {
        // Text-like and incompressible data, in one piece and in frames of 256 bytes.
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let noise: Vec<u8> = (0..65536)
            .map(|_| {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                seed as u8
            })
            .collect();
        let text: Vec<u8> = (0..65536u32).map(|i| b"pushwire "[(i % 9) as usize]).collect();
        for payload in [noise, text] {
            let compressed = compress(&payload);
            assert_eq!(inflate(&compressed, u64::MAX).unwrap(), payload, "in one piece");
            let mut out = Vec::new();
            let mut i = Inflate::default();
            let chunks: Vec<&[u8]> = compressed.chunks(256).collect();
            for (k, c) in chunks.iter().enumerate() {
                i.feed(c, k + 1 == chunks.len(), u64::MAX, &mut |b| out.extend_from_slice(b)).unwrap();
            }
            assert_eq!(out.len(), payload.len(), "in frames of 256 bytes");
            assert_eq!(out, payload);
        }
    }

    #[test]
    fn an_image_like_message_is_compressed_whole() {
        // A slice of a noisy 512 x 512 gradient: the compressor held back part of its sync flush
        // although the buffer had room, and 13 bytes of the message were lost.
        let mut seed = 100u64;
        let image: Vec<u8> = (0..512u32 * 512)
            .map(|i| {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                let (x, y) = (i % 512, i / 512);
                let v = (x * 2 / 4 + y * 3 / 2 + ((x ^ y) >> 1)) & 0xff;
                (v + seed as u32 % 6) as u8
            })
            .collect();
        let payload = &image[114_737..114_737 + 65_536];
        assert_eq!(inflate(&compress(payload), u64::MAX).unwrap(), payload);
    }

    #[test]
    fn offers() {
        assert!(accepts("permessage-deflate"));
        assert!(accepts("permessage-deflate; client_max_window_bits"), "what browsers offer");
        assert!(accepts("x-webkit-deflate-frame, permessage-deflate; server_no_context_takeover"));
        assert!(accepts("permessage-deflate; server_max_window_bits=10, permessage-deflate"), "the second offer");
        assert!(!accepts("permessage-deflate; server_max_window_bits=10"));
        assert!(!accepts("permessage-deflate; client_max_window_bits=20"));
        assert!(!accepts("permessage-deflate; unknown_param"));
        assert!(!accepts("x-webkit-deflate-frame"));
    }

    #[test]
    fn round_trip_without_the_tail() {
        // RFC 7692 7.2.3.1: "Hello" compressed with no context takeover.
        assert_eq!(compress(b"Hello"), [0xf2, 0x48, 0xcd, 0xc9, 0xc9, 0x07, 0x00]);
        let big: Vec<u8> = (0..200_000u32).flat_map(|i| format!("{{\"id\":{i},\"x\":\"y\"}}").into_bytes()).collect();
        let c = compress(&big);
        assert!(c.len() < big.len() / 4, "{} of {}", c.len(), big.len());
        assert_eq!(inflate(&c, u64::MAX).unwrap(), big);
        assert_eq!(inflate(&compress(b""), 10).unwrap(), b"");
    }

    #[test]
    fn bounded_and_checked() {
        let zeros = compress(&vec![0u8; 1 << 20]);
        assert!(zeros.len() < 2048, "a bomb: small in, large out");
        assert!(matches!(inflate(&zeros, 64 * 1024), Err(InflateError::TooBig(_))));
        assert_eq!(inflate(b"\xff\xff\xff\xff garbage", 1 << 20), Err(InflateError::Corrupt));
        // Fed in pieces, as fragments arrive.
        let c = compress(b"split across fragments");
        let mut out = Vec::new();
        let mut i = Inflate::default();
        for (n, piece) in c.chunks(3).enumerate() {
            i.feed(piece, n == c.len().div_ceil(3) - 1, 100, &mut |b| out.extend_from_slice(b)).unwrap();
        }
        assert_eq!(out, b"split across fragments");
    }
}
