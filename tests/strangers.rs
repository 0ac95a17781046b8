//! Strangers cannot starve the system: connections that never authenticate, or never send a
//! whole request, are capped apart from real nodes and clients, have a deadline, and are not
//! logged once each.

mod common;

use std::time::Duration;

use channel_proto::Request;
use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Whether the peer closes `s` within `limit`.
async fn closed_within(s: &mut TcpStream, limit: Duration) -> bool {
    let mut buf = [0u8; 256];
    matches!(tokio::time::timeout(limit, s.read(&mut buf)).await, Ok(Ok(0) | Err(_)))
}

#[tokio::test]
async fn idle_strangers_do_not_keep_nodes_out_of_the_channel_server() {
    let (c, m) = (free_port(), free_port());
    let (cl, ml) = (format!("127.0.0.1:{c}"), format!("127.0.0.1:{m}"));
    let args = [
        "channel",
        "--listen",
        &cl,
        "--metrics-listen",
        &ml,
        "--secret",
        "hush",
        "--max-clients",
        "20",
        "--max-unauthenticated",
        "50",
        "--auth-timeout",
        "30s",
    ];
    let _ch = Proc::start(&args, &[c, m]).await;
    tokio::time::sleep(Duration::from_millis(300)).await; // the start-up probe's connection is gone
                                                          // 60 connections that never send a byte: 50 are held as strangers (30 s to authenticate), the
                                                          // rest have only a short grace period; over twice the cap they are closed at once.
    let mut idle = Vec::new();
    for _ in 0..60 {
        idle.push(TcpStream::connect(("127.0.0.1", c)).await.expect("connect"));
    }
    for (i, s) in idle.iter_mut().rev().take(10).enumerate() {
        assert!(closed_within(s, WAIT).await, "late connection {i} closed after its short deadline");
    }
    for (i, s) in idle.iter_mut().take(50).enumerate() {
        assert!(!closed_within(s, Duration::from_millis(10)).await, "stranger {i} keeps its 30 s");
    }
    let mut flood = Vec::new();
    for _ in 0..50 {
        flood.push(TcpStream::connect(("127.0.0.1", c)).await.expect("connect"));
    }
    let mut over = TcpStream::connect(("127.0.0.1", c)).await.expect("connect");
    assert!(closed_within(&mut over, Duration::from_millis(100)).await, "over both caps: closed at once");
    drop(flood);
    // With every stranger slot taken, nodes that know the secret still get in and work.
    let url = format!("channel://:hush@127.0.0.1:{c}");
    let (w, h) = (free_port(), free_port());
    let _g = Proc::start(&["gateway", "--listen", &format!("127.0.0.1:{w}"), "--broker", &url], &[w]).await;
    let _p = Proc::start(&["publisher", "--listen", &format!("127.0.0.1:{h}"), "--broker", &url], &[h]).await;
    wait_healthy(w).await;
    wait_healthy(h).await;
    let mut a = connect(w).await;
    assert_eq!(http_get(h, "/?content=through").await.0, 200);
    assert_eq!(next_text(&mut a.ws).await.as_deref(), Some("through"));
    let (_, metrics) = http_get(m, "/metrics").await;
    assert!(metric_in(&metrics, "pushwire_channel_refused_total") >= 1, "{metrics}");
    assert!(metric_in(&metrics, "pushwire_channel_unauthenticated_total") >= 10, "{metrics}");
    assert_eq!(metric_in(&metrics, "pushwire_channel_clients"), 2, "one link per node");
}

/// What a node sends together with its secret, in one write, is carried out without waiting for
/// more from it: a link sends auth, subscribe and a probe at once and then waits for the answer.
#[tokio::test]
async fn frames_that_come_with_the_secret_are_carried_out() {
    let c = free_port();
    let cl = format!("127.0.0.1:{c}");
    let _ch = Proc::start(&["channel", "--listen", &cl, "--secret", "hush", "--settle", "0s"], &[c]).await;
    let mut client = ChannelClient::tcp(c).await;
    let mut together = Vec::new();
    for req in [
        Request::Auth(bytes::Bytes::from_static(b"hush")),
        Request::Subscribe(names(&["me"])),
        Request::Publish { channels: names(&["me"]), data: bytes::Bytes::from_static(b"s:2:\"hi\";"), keep: None },
    ] {
        together.extend_from_slice(&channel_proto::frame::encode(&req.encode()));
    }
    client.raw(&together).await;
    let event = client.recv_within(Duration::from_secs(3)).await.expect("the publish was carried out");
    assert!(event.ends_with(b"s:2:\"hi\";}"), "{event:?}");
}

#[tokio::test]
async fn strangers_have_a_deadline_and_a_small_first_frame() {
    let (c, m) = (free_port(), free_port());
    let (cl, ml) = (format!("127.0.0.1:{c}"), format!("127.0.0.1:{m}"));
    let args = ["channel", "--listen", &cl, "--metrics-listen", &ml, "--secret", "hush", "--auth-timeout", "300ms"];
    let _ch = Proc::start(&args, &[c, m]).await;
    // Silent: closed after the deadline.
    let mut silent = TcpStream::connect(("127.0.0.1", c)).await.expect("connect");
    assert!(!closed_within(&mut silent, Duration::from_millis(100)).await, "not before the deadline");
    assert!(closed_within(&mut silent, WAIT).await, "closed after the deadline");
    // A first frame announcing a megabyte: closed without waiting for it.
    let mut big = TcpStream::connect(("127.0.0.1", c)).await.expect("connect");
    big.write_all(&(1u32 << 20).to_be_bytes()).await.expect("write");
    assert!(closed_within(&mut big, Duration::from_millis(250)).await, "oversized first frame refused at once");
    // A trickle of pings does not extend the deadline.
    let mut trickle = TcpStream::connect(("127.0.0.1", c)).await.expect("connect");
    let started = tokio::time::Instant::now();
    let mut closed = false;
    while started.elapsed() < Duration::from_secs(3) {
        if trickle.write_all(&channel_proto::frame::PING).await.is_err() {
            closed = true;
            break;
        }
        if closed_within(&mut trickle, Duration::from_millis(50)).await {
            closed = true;
            break;
        }
    }
    assert!(closed, "pings before auth do not keep a stranger alive");
    let (_, metrics) = http_get(m, "/metrics").await;
    assert!(metric_in(&metrics, "pushwire_channel_unauthenticated_total") >= 3, "{metrics}");
}

#[tokio::test]
async fn a_refused_link_backs_off_and_logs_sparingly() {
    let c = free_port();
    let cl = format!("127.0.0.1:{c}");
    let _ch = Proc::start(&["channel", "--listen", &cl, "--secret", "hush"], &[c]).await;
    // The server accepts the connection, then drops it for the wrong secret: a failure each time.
    let w = free_port();
    let url = format!("channel://:wrong@127.0.0.1:{c}");
    let g = Proc::start_logged(&["gateway", "--listen", &format!("127.0.0.1:{w}"), "--broker", &url], &[w]).await;
    tokio::time::sleep(Duration::from_secs(4)).await;
    let log = g.log();
    let lines = log.lines().filter(|l| l.contains("broker link down")).count();
    assert!(lines >= 1, "the failure is logged:\n{log}");
    assert!(lines <= 2, "{lines} lines in 4 s: backoff and log throttling do not work:\n{log}");
    assert!(log.contains("failures=1"), "{log}");
    let failures = metric(w, "pushwire_broker_link_failures_total").await;
    assert!((2..=10).contains(&failures), "failed attempts counted, with backoff: {failures} in 4 s");
    assert!(!log.contains("failures=2 "), "only the first and every 30th failure are logged:\n{log}");
}

#[tokio::test]
async fn the_publisher_caps_connections_and_bounds_request_bodies() {
    let h = free_port();
    let hl = format!("127.0.0.1:{h}");
    let args =
        ["publisher", "--listen", &hl, "--broker", "memory", "--max-http-connections", "4", "--body-timeout", "300ms"];
    let _p = Proc::start(&args, &[h]).await;
    // A body that never finishes: 408 after the timeout, not a connection held forever.
    let mut slow = TcpStream::connect(("127.0.0.1", h)).await.expect("connect");
    slow.write_all(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-www-form-urlencoded\r\nContent-Length: 100\r\n\r\ncontent=").await.expect("write");
    let mut answer = vec![0u8; 512];
    let n = tokio::time::timeout(WAIT, slow.read(&mut answer)).await.expect("answer in time").expect("read");
    assert!(answer[..n].starts_with(b"HTTP/1.1 408"), "{}", String::from_utf8_lossy(&answer[..n]));
    drop(slow);
    // Four idle connections take every slot; the fifth is told so (once the server has seen the
    // slow one go: until then a request may still find a slot, and is asked again).
    let mut idle = Vec::new();
    for _ in 0..4 {
        idle.push(TcpStream::connect(("127.0.0.1", h)).await.expect("connect"));
    }
    let deadline = tokio::time::Instant::now() + WAIT;
    let busy = loop {
        let (status, body) = http_get(h, "/healthz").await;
        if status == 503 {
            break body;
        }
        assert!(tokio::time::Instant::now() < deadline, "a fifth connection was always served");
    };
    assert!(busy.contains("too many open connections"), "{busy}");
    // Once they go, publishing works again.
    drop(idle);
    let deadline = tokio::time::Instant::now() + WAIT;
    while http_get(h, "/?content=x").await.0 != 200 {
        assert!(tokio::time::Instant::now() < deadline, "slots never freed");
    }
}

/// Send `head` and `body` on a new connection and read the answer's status line, within `limit`
/// and without sending more than `body`.
async fn status_after(h: u16, head: &str, body: &[u8], limit: Duration) -> String {
    let mut s = TcpStream::connect(("127.0.0.1", h)).await.expect("connect");
    s.write_all(head.as_bytes()).await.expect("head");
    s.write_all(body).await.expect("body");
    let mut answer = vec![0u8; 512];
    let n = tokio::time::timeout(limit, s.read(&mut answer)).await.expect("answered without the rest").expect("read");
    String::from_utf8_lossy(&answer[..n]).lines().next().unwrap_or_default().to_owned()
}

/// A request that announces a large body is judged on its key before the publisher reads (and
/// holds) that body: a wrong key in the header or the URL at once, no key within the first 4 KiB.
#[tokio::test]
async fn the_publisher_checks_the_key_before_reading_a_body() {
    let h = free_port();
    let hl = format!("127.0.0.1:{h}");
    let args = ["publisher", "--listen", &hl, "--broker", "memory", "--publish-key", "sesame", "--body-timeout", "30s"];
    let _p = Proc::start(&args, &[h]).await;
    let post = |target: &str, auth: &str| {
        format!(
            "POST {target} HTTP/1.1\r\nHost: x\r\n{auth}Content-Type: application/x-www-form-urlencoded\r\n\
             Content-Length: 700000\r\n\r\n"
        )
    };
    let quick = Duration::from_secs(5);
    let wrong = "Authorization: Bearer nope\r\n";
    assert!(status_after(h, &post("/", wrong), b"", quick).await.contains(" 401 "), "wrong bearer key");
    assert!(status_after(h, &post("/?key=nope", ""), b"", quick).await.contains(" 401 "), "wrong key in the URL");
    assert!(status_after(h, &post("/join", wrong), b"", quick).await.contains(" 401 "), "every endpoint");
    let filler = format!("content={}", "x".repeat(8192));
    assert!(status_after(h, &post("/", ""), filler.as_bytes(), quick).await.contains(" 401 "), "no key in 4 KiB");
    let late = format!("{filler}&key=sesame&");
    assert!(status_after(h, &post("/", ""), late.as_bytes(), quick).await.contains(" 401 "), "a key after 4 KiB");
    let late = format!("key=nope&{filler}");
    assert!(status_after(h, &post("/", ""), late.as_bytes(), quick).await.contains(" 401 "), "a wrong key in the body");
    // The right key, in each place, lets a whole body through; `key` first in a form body.
    let body = format!("content={}", "y".repeat(60_000));
    let full = |target: &str, auth: &str, body: &str| {
        format!(
            "POST {target} HTTP/1.1\r\nHost: x\r\n{auth}Content-Type: application/x-www-form-urlencoded\r\n\
             Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )
    };
    for (target, auth, body) in [
        ("/", "Authorization: Bearer sesame\r\n", body.clone()),
        ("/?key=sesame", "", body.clone()),
        ("/", "", format!("key=sesame&{body}")),
        ("/", "", "content=short&key=sesame".to_owned()),
    ] {
        let status = status_after(h, &full(target, auth, &body), b"", WAIT).await;
        assert!(status.contains(" 200 "), "{target} {auth:?} {}: {status}", &body[..20.min(body.len())]);
    }
}
