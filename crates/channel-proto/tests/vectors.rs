//! The frames captured from Workerman's PHP Channel, decoded and re-encoded byte for byte.

use bytes::{Bytes, BytesMut};
use channel_proto::{frame, Error, Request, ServerMessage, Value, DEFAULT_MAX_FRAME};

fn vectors() -> Vec<(String, Vec<u8>, String)> {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/vectors");
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).expect("vectors directory") {
        let path = entry.expect("dir entry").path();
        if path.extension().is_some_and(|e| e == "bin") {
            let name = path.file_stem().expect("stem").to_string_lossy().into_owned();
            let bytes = std::fs::read(&path).expect("read vector");
            let txt = std::fs::read_to_string(path.with_extension("txt")).expect("read description");
            out.push((name, bytes, txt));
        }
    }
    out.sort();
    assert_eq!(out.len(), 26, "all vectors present");
    out
}

/// Decode one whole frame the way the server does.
fn decode(bytes: &[u8]) -> Result<Option<Bytes>, Error> {
    let mut buf = BytesMut::from(bytes);
    let payload = frame::take_payload(&mut buf, DEFAULT_MAX_FRAME)?
        .ok_or(Error::Value(channel_proto::ValueError::Truncated(bytes.len())))?;
    assert!(buf.is_empty(), "one vector is one frame");
    Ok(Some(payload))
}

#[test]
fn good_vectors_round_trip() {
    for (name, bytes, txt) in vectors().into_iter().filter(|(n, ..)| n.as_str() < "90") {
        let payload = decode(&bytes).unwrap_or_else(|e| panic!("{name}: {e}")).expect("payload");
        assert_eq!(frame::encode(&payload)[..], bytes[..], "{name}: frame re-encodes");
        if payload.is_empty() {
            assert!(name.contains("ping"));
            continue;
        }
        let value = Value::parse(&payload).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(value.encode(), payload, "{name}: value re-encodes to the same bytes");
        let encoded = if txt.starts_with("client -> server") {
            Request::parse(&payload).unwrap_or_else(|e| panic!("{name}: {e}")).encode()
        } else {
            assert!(txt.starts_with("server -> client"), "{name}");
            ServerMessage::parse(&payload).unwrap_or_else(|e| panic!("{name}: {e}")).encode()
        };
        assert_eq!(encoded, payload.to_vec(), "{name}: message re-encodes to the same bytes");
    }
}

#[test]
fn bad_vectors_are_refused_for_their_reason() {
    use channel_proto::{FrameError, MessageError, ValueError};
    let bad: Vec<_> = vectors().into_iter().filter(|(n, ..)| n.as_str() >= "90").collect();
    assert_eq!(bad.len(), 7);
    for (name, bytes, _) in bad {
        let result = decode(&bytes).and_then(|p| Ok(Request::parse(&p.unwrap_or_default())?));
        let err = result.expect_err(&name);
        let right = match &name[..2] {
            "90" | "93" => {
                matches!(&err, Error::Message(MessageError::NotArray(ValueError::Unexpected { pos: 0, expected, .. })) if *expected == "an array")
            }
            "91" | "92" => matches!(err, Error::Message(MessageError::NotArray(ValueError::Truncated(_)))),
            "94" => matches!(&err, Error::Message(MessageError::UnknownType(t)) if t == "explode"),
            "95" => matches!(err, Error::Frame(FrameError::TooSmall(2))),
            "96" => matches!(err, Error::Message(MessageError::NotArray(ValueError::TooDeep))),
            _ => false,
        };
        assert!(right, "{name}: refused for the wrong reason: {err:?}");
    }
}

#[test]
fn specific_values() {
    let targeted = vectors().into_iter().find(|(n, ..)| n.starts_with("07")).expect("07").1;
    let payload = decode(&targeted).expect("decodes").expect("payload");
    let Request::Publish { channels, data, .. } = Request::parse(&payload).expect("publish") else {
        panic!("not a publish")
    };
    assert_eq!(channels[0].as_bytes(), b"0");
    let data = Value::parse(&data).expect("data");
    assert_eq!(data.get("to_connection_id"), Some(&Value::str("2")));
    assert_eq!(data.get("content"), Some(&Value::str("hi")));
}
