//! Property tests of the PHP value codec: round trips, and no panic on arbitrary bytes.

use bytes::{Bytes, BytesMut};
use channel_proto::{frame, Key, Request, ServerMessage, Value};
use proptest::prelude::*;

fn key() -> impl Strategy<Value = Key> {
    prop_oneof![any::<i64>().prop_map(Key::Int), proptest::collection::vec(any::<u8>(), 0..12).prop_map(Key::Str)]
}

fn value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::Int),
        any::<f64>().prop_filter("NaN never equals itself", |f| !f.is_nan()).prop_map(Value::Float),
        proptest::collection::vec(any::<u8>(), 0..24).prop_map(Value::Str),
    ];
    leaf.prop_recursive(6, 64, 8, |inner| proptest::collection::vec((key(), inner), 0..8).prop_map(Value::Array))
}

proptest! {
    #[test]
    fn value_round_trips(v in value()) {
        let bytes = v.encode();
        prop_assert_eq!(Value::parse(&bytes).expect("own encoding parses"), v);
    }

    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
        let _ = Value::parse(&bytes);
        let b = Bytes::from(bytes.clone());
        let _ = Request::parse(&b);
        let _ = ServerMessage::parse(&b);
        let mut buf = BytesMut::from(&bytes[..]);
        while let Ok(Some(p)) = frame::take_payload(&mut buf, 1024) {
            let _ = Request::parse(&p);
        }
    }

    #[test]
    fn mutated_messages_never_panic(v in value(), cut in 0usize..200, flip in any::<u8>()) {
        let mut bytes = Request::Publish { channels: vec![channel_proto::Name::new("c")], data: v.encode().into(), keep: None }.encode();
        if !bytes.is_empty() {
            let i = cut % bytes.len();
            bytes[i] ^= flip;
            bytes.truncate(cut.max(i + 1));
        }
        let _ = Request::parse(&Bytes::from(bytes));
    }
}
