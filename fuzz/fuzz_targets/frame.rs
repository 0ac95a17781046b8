//! Fuzz the frame codec and message decoding as the channel server runs them on a byte stream.
#![no_main]

use bytes::BytesMut;
use channel_proto::{frame, Request, ServerMessage};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut buf = BytesMut::from(data);
    while let Ok(Some(payload)) = frame::take_payload(&mut buf, 1 << 16) {
        if let Ok(req) = Request::parse(&payload) {
            // Whatever decodes must encode and decode to the same request.
            let again = Request::parse(&req.encode().into()).expect("own encoding decodes");
            assert_eq!(again, req);
        }
        if let Ok(msg) = ServerMessage::parse(&payload) {
            assert_eq!(ServerMessage::parse(&msg.encode().into()).expect("own encoding decodes"), msg);
        }
    }
});
