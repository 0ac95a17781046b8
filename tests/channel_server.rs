//! `pushwire channel` over TCP and a Unix socket, spoken to with raw Channel frames as a PHP
//! client would: fan-out, unsubscribe, publishLoop, queues, cleanup and bad frames.

mod common;

use std::time::Duration;

use bytes::Bytes;
use channel_proto::message::ServerKind;
use channel_proto::Request;
use common::*;

const QUIET: Duration = Duration::from_millis(300);

fn publish(ch: &[&str], data: &'static [u8]) -> Request {
    Request::Publish { channels: names(ch), data: Bytes::from_static(data), keep: None }
}

async fn tcp_server() -> (Proc, u16) {
    let port = free_port();
    // No settle time: these tests do not restart the server.
    let p = Proc::start(&["channel", "--listen", &format!("127.0.0.1:{port}"), "--settle", "0s"], &[port]).await;
    (p, port)
}

/// Run `body` against clients made by `connect`; both transports share the same checks.
async fn fan_out_checks(mut clients: Vec<ChannelClient>) {
    let [a, b, c] = &mut clients[..] else { panic!("three clients") };
    for cl in [&mut *a, &mut *b] {
        cl.send(Request::Subscribe(names(&["news"]))).await;
        cl.sync().await;
    }
    // The publisher (a) is itself subscribed, so it hears its own publish too; c is not subscribed.
    a.send(publish(&["news"], b"s:5:\"hello\";")).await;
    for cl in [&mut *a, &mut *b] {
        let m = cl.recv().await;
        assert_eq!(
            (m.kind, m.channel.as_bytes(), &m.data[..]),
            (ServerKind::Event, &b"news"[..], &b"s:5:\"hello\";"[..])
        );
    }
    assert!(c.recv_within(QUIET).await.is_none(), "unsubscribed client gets nothing");

    // Unsubscribe: b stops hearing, a still hears.
    b.send(Request::Unsubscribe(names(&["news"]))).await;
    b.sync().await;
    c.send(publish(&["news"], b"i:2;")).await;
    assert_eq!(&a.recv().await.data[..], b"i:2;");
    assert!(b.recv_within(QUIET).await.is_none(), "unsubscribed");
}

#[tokio::test]
async fn fan_out_and_unsubscribe_over_tcp() {
    let (_p, port) = tcp_server().await;
    fan_out_checks(vec![
        ChannelClient::tcp(port).await,
        ChannelClient::tcp(port).await,
        ChannelClient::tcp(port).await,
    ])
    .await;
}

#[tokio::test]
async fn fan_out_and_unsubscribe_over_unix_socket() {
    let dir = std::env::temp_dir().join(format!("pushwire-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("channel.sock");
    let _p = Proc::start(&["channel", "--listen", &format!("unix:{}", path.display()), "--settle", "0s"], &[]).await;
    for _ in 0..200 {
        if path.exists() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let mut cl = Vec::new();
    for _ in 0..3 {
        cl.push(ChannelClient::unix(&path).await);
    }
    fan_out_checks(cl).await;
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test]
async fn captured_php_frames_give_captured_events() {
    // A worker subscribes with an integer name (i:0), the seed's publisher sends to "0": the event
    // is byte for byte the one PHP's server sends.
    let (_p, port) = tcp_server().await;
    let mut worker = ChannelClient::tcp(port).await;
    let mut publisher = ChannelClient::tcp(port).await;
    worker.raw(&vector("02_")).await;
    worker.raw(&vector("03_")).await;
    worker.raw(&vector("01_")).await; // ping: ignored
    worker.sync().await;
    publisher.raw(&vector("07_")).await;
    let event = worker.recv_within(WAIT).await.expect("targeted event");
    assert_eq!(&channel_proto::frame::encode(&event)[..], &vector("14_")[..]);
    publisher.raw(&vector("06_")).await;
    let event = worker.recv_within(WAIT).await.expect("broadcast event");
    assert_eq!(&channel_proto::frame::encode(&event)[..], &vector("13_")[..]);
}

#[tokio::test]
async fn publish_loop_round_robins_over_three_subscribers() {
    let (_p, port) = tcp_server().await;
    let mut subs = Vec::new();
    for _ in 0..3 {
        let mut s = ChannelClient::tcp(port).await;
        s.send(Request::Subscribe(names(&["jobs"]))).await;
        s.sync().await;
        subs.push(s);
    }
    let mut publisher = ChannelClient::tcp(port).await;
    for _ in 0..6 {
        publisher
            .send(Request::PublishLoop { channels: names(&["jobs"]), data: Bytes::from_static(b"s:1:\"x\";") })
            .await;
    }
    for s in &mut subs {
        assert!(s.recv_within(WAIT).await.is_some(), "first of two");
        assert!(s.recv_within(WAIT).await.is_some(), "second of two");
        assert!(s.recv_within(QUIET).await.is_none(), "exactly two each");
    }
}

#[tokio::test]
async fn queues_one_item_per_reserve_each_to_one_consumer() {
    let (_p, port) = tcp_server().await;
    let mut producer = ChannelClient::tcp(port).await;
    // Enqueued before anyone watches: kept.
    for i in 0..4 {
        producer.send(Request::Enqueue { channels: names(&["q"]), data: format!("i:{i};").into_bytes().into() }).await;
    }
    let mut a = ChannelClient::tcp(port).await;
    a.send(Request::Watch(names(&["q"]))).await;
    assert!(a.recv_within(QUIET).await.is_none(), "nothing before reserve");
    a.send(Request::Reserve).await;
    let m = a.recv().await;
    assert_eq!((m.kind, &m.data[..]), (ServerKind::Queue, &b"i:0;"[..]));
    assert!(a.recv_within(QUIET).await.is_none(), "one item per reserve");

    // A second consumer: items are split, never duplicated.
    let mut b = ChannelClient::tcp(port).await;
    b.send(Request::Watch(names(&["q"]))).await;
    b.send(Request::Reserve).await;
    a.send(Request::Reserve).await;
    let got = [a.recv().await.data, b.recv().await.data];
    let mut got: Vec<_> = got.iter().map(|d| d.to_vec()).collect();
    got.sort();
    assert_eq!(got, vec![b"i:1;".to_vec(), b"i:2;".to_vec()]);

    // Unwatch: a gets nothing more even when reserved.
    a.send(Request::Unwatch(names(&["q"]))).await;
    a.send(Request::Reserve).await;
    assert!(a.recv_within(QUIET).await.is_none(), "unwatched");

    // Cleanup on close: b reserves then disconnects; the item waits for c instead of vanishing.
    // Item 3 is still queued, so b's next reserve takes it at once.
    b.send(Request::Reserve).await;
    assert_eq!(&b.recv().await.data[..], b"i:3;");
    b.send(Request::Reserve).await;
    b.sync().await;
    drop(b);
    tokio::time::sleep(Duration::from_millis(200)).await;
    producer.send(Request::Enqueue { channels: names(&["q"]), data: Bytes::from_static(b"i:4;") }).await;
    let mut c = ChannelClient::tcp(port).await;
    c.send(Request::Watch(names(&["q"]))).await;
    c.send(Request::Reserve).await;
    assert_eq!(&c.recv().await.data[..], b"i:4;", "item left for a live consumer");
}

#[tokio::test]
async fn bad_frames_close_only_their_connection() {
    let (_p, port) = tcp_server().await;
    let mut good = ChannelClient::tcp(port).await;
    good.send(Request::Subscribe(names(&["ok"]))).await;
    good.sync().await;
    for bad in ["90_", "91_", "92_", "93_", "94_", "95_", "96_"] {
        let mut c = ChannelClient::tcp(port).await;
        c.raw(&vector(bad)).await;
        assert!(c.closed_within(WAIT).await, "{bad}: connection closed");
        let mut p = ChannelClient::tcp(port).await;
        p.send(publish(&["ok"], b"N;")).await;
        assert_eq!(good.recv().await.channel.as_bytes(), b"ok", "after {bad} the server still serves others");
    }
}

#[tokio::test]
async fn max_frame_is_configurable() {
    let port = free_port();
    let _p = Proc::start(
        &["channel", "--listen", &format!("127.0.0.1:{port}"), "--max-frame", "256", "--settle", "0s"],
        &[port],
    )
    .await;
    let mut c = ChannelClient::tcp(port).await;
    let big = vec![b'x'; 300];
    c.send(Request::Publish {
        channels: names(&["a"]),
        data: channel_proto::Value::Str(big).encode().into(),
        keep: None,
    })
    .await;
    assert!(c.closed_within(WAIT).await, "oversized frame refused");
    let mut d = ChannelClient::tcp(port).await;
    d.send(Request::Subscribe(names(&["a"]))).await;
    d.sync().await;
    d.send(publish(&["a"], b"N;")).await;
    assert_eq!(&d.recv().await.data[..], b"N;");
}

/// `/metrics` shows each queue's depth (the items waiting for a watcher) and, on a server of its
/// own, no federated channels.
#[tokio::test]
async fn metrics_show_queue_depths() {
    let (port, metrics) = (free_port(), free_port());
    let args = ["channel", "--listen", &format!("127.0.0.1:{port}"), "--settle", "0s"];
    let _p =
        Proc::start(&[&args[..], &["--metrics-listen", &format!("127.0.0.1:{metrics}")]].concat(), &[port, metrics])
            .await;
    let mut producer = ChannelClient::tcp(port).await;
    for i in 0..3 {
        producer
            .send(Request::Enqueue { channels: names(&["q\"1"]), data: format!("i:{i};").into_bytes().into() })
            .await;
    }
    producer.sync().await;
    assert_eq!(metric(metrics, "pushwire_channel_queue_items{queue=\"q\\\"1\"}").await, 3, "label escaped");
    assert_eq!(metric(metrics, "pushwire_channel_federated_channels").await, 0);
}
