//! Fuzz the gateway's WebSocket frame reader on a client byte stream: it must never panic, and
//! feeding the same bytes in two pieces (as TCP may deliver them) must give the same frames and
//! the same verdict as feeding them whole; with permessage-deflate negotiated (compressed
//! messages inflated within the limit) and without.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use pushwire::ws::{ClientFrame, Reader, WsError};

/// Every frame the reader takes from `pieces`, fed one after another, and how it ended.
fn frames(pieces: &[&[u8]], max: usize, deflate: bool) -> (Vec<ClientFrame>, Option<WsError>) {
    let (mut reader, mut buf, mut out) = (Reader::new(deflate), BytesMut::new(), Vec::new());
    for piece in pieces {
        buf.extend_from_slice(piece);
        loop {
            match reader.parse(&mut buf, max) {
                Ok(Some(f)) => out.push(f),
                Ok(None) => break,
                Err(e) => return (out, Some(e)),
            }
        }
    }
    (out, None)
}

fuzz_target!(|data: &[u8]| {
    let [limit, split, stream @ ..] = data else { return };
    let (max, deflate) = (usize::from(*limit >> 1) * 16, *limit & 1 == 1);
    let at = usize::from(*split).min(stream.len());
    let whole = frames(&[stream], max, deflate);
    let pieces = frames(&[&stream[..at], &stream[at..]], max, deflate);
    assert_eq!(whole, pieces);
});
