//! Channel frame and PHP value codec throughput: the seed's publish, decoded and encoded.

use bytes::{Bytes, BytesMut};
use channel_proto::message::ServerKind;
use channel_proto::{frame, Name, Request, ServerMessage, Value};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};

fn codec(c: &mut Criterion) {
    let data = Value::assoc([("to_connection_id", Value::str("42")), ("content", Value::str("x".repeat(64)))]).encode();
    let publish =
        Request::Publish { channels: vec![Name::new("3f9a1c7be2d0-0")], data: data.clone().into(), keep: None };
    let wire = frame::encode(&publish.encode());
    let mut g = c.benchmark_group("codec");
    g.throughput(Throughput::Elements(1));
    g.bench_function("decode_publish_frame", |b| {
        b.iter(|| {
            let mut buf = BytesMut::from(&wire[..]);
            let payload = frame::take_payload(&mut buf, 1 << 20).expect("frame").expect("whole");
            Request::parse(&payload).expect("request")
        })
    });
    g.bench_function("encode_event_frame", |b| {
        let name = Name::new("3f9a1c7be2d0-0");
        b.iter(|| frame::encode(&ServerMessage::encode_parts(ServerKind::Event, &name, &data)))
    });
    let payload = Bytes::from(data.clone());
    g.bench_function("parse_php_value", |b| b.iter(|| Value::parse(&payload).expect("value")));
    g.finish();
}

criterion_group!(benches, codec);
criterion_main!(benches);
