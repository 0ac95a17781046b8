//! Fan-out of one broadcast to 10,000 in-memory connections through a gateway worker: decode the
//! broker message, encode the WebSocket frame once, queue it to every connection.

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use pushwire::broker::Message;
use pushwire::protocol::native::push::Push;

fn fanout(c: &mut Criterion) {
    const N: usize = 10_000;
    let (worker, conns) = pushwire::gateway::bench_worker(N, 4);
    let data = Push { content: vec![b'x'; 64], ..Push::default() }.encode();
    let msg = Message { channel: Bytes::from_static(b"broadcast"), data, position: None };
    let mut g = c.benchmark_group("fanout");
    g.throughput(Throughput::Elements(N as u64));
    g.bench_function("broadcast_64B_to_10k_connections", |b| {
        b.iter(|| {
            worker.handle(msg.clone());
            // Drain, as the connection tasks would, so that queues never fill.
            for c in &conns {
                c.drain();
            }
        })
    });
    g.finish();
}

criterion_group!(benches, fanout);
criterion_main!(benches);
