//! The seed's own test steps against one `pushwire standalone` process.

mod common;

use std::time::Duration;

use common::*;

#[tokio::test]
async fn seed_test_steps() {
    let (_p, _c, ws_port, http_port) = standalone(&[]).await;
    let mut a = connect(ws_port).await;
    let mut b = connect(ws_port).await;
    // Two workers by default, clients spread over them; ids have the NODE-N form.
    assert_ne!(a.worker, b.worker, "round-robin over the two workers");
    assert!(a.worker.ends_with("-0") || a.worker.ends_with("-1"), "{}", a.worker);

    // Broadcast: GET /?content=X answers ok and reaches everyone.
    assert_eq!(http_get(http_port, "/?content=hello%20world").await, (200, "ok".into()));
    assert_eq!(next_text(&mut a.ws).await.as_deref(), Some("hello world"));
    assert_eq!(next_text(&mut b.ws).await.as_deref(), Some("hello world"));

    // Targeted: only b receives it.
    let url = format!("/?to_worker_id={}&to_connection_id={}&content={}", q(&b.worker), b.conn, q("só para b ✓"));
    assert_eq!(http_get(http_port, &url).await, (200, "ok".into()));
    assert_eq!(next_text(&mut b.ws).await.as_deref(), Some("só para b ✓"));

    // A push to a connection that does not exist is accepted and dropped.
    let url = format!("/?to_worker_id={}&to_connection_id=999999&content=nobody", q(&a.worker));
    assert_eq!(http_get(http_port, &url).await.0, 200);
    // Then a marker to a: it is the next thing a gets (not b's push, not the dropped one).
    let url = format!("/?to_worker_id={}&to_connection_id={}&content=marker", q(&a.worker), a.conn);
    assert_eq!(http_get(http_port, &url).await.0, 200);
    assert_eq!(next_text(&mut a.ws).await.as_deref(), Some("marker"), "a got nothing meant for others");
}

#[tokio::test]
async fn publisher_refuses_bad_requests_clearly() {
    let (_p, _c, ws_port, http_port) = standalone(&[]).await;
    let mut a = connect(ws_port).await;
    for (target, status, reason) in [
        ("/", 400, "missing parameter \"content\""),
        ("/?content=", 400, "empty"),
        ("/?content=x&bogus=1", 400, "unknown parameter \"bogus\""),
        ("/?content=x&to_worker_id=a", 400, "go together"),
        ("/nowhere?content=x", 404, "not found"),
    ] {
        let (s, body) = http_get(http_port, target).await;
        assert_eq!(s, status, "{target}: {body}");
        assert!(body.contains(reason), "{target}: {body}");
        assert_eq!(body.lines().count(), 1, "one-line reason");
    }
    // POST with a form body works like GET; it is the first thing the client gets (nothing of
    // the above reached it).
    let form = [("Content-Type", "application/x-www-form-urlencoded")];
    assert_eq!(http(http_port, "POST", "/", &form, "content=posted").await, (200, "ok".into()));
    assert_eq!(next_text(&mut a.ws).await.as_deref(), Some("posted"));
}

#[tokio::test]
async fn keep_alive_serves_many_requests_on_one_connection() {
    use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
    let (_p, _c, ws_port, http_port) = standalone(&[]).await;
    let mut a = connect(ws_port).await;
    let s = tokio::net::TcpStream::connect(("127.0.0.1", http_port)).await.unwrap();
    let mut s = BufReader::new(s);
    for i in 0..5 {
        let req = format!("GET /?content=k{i} HTTP/1.1\r\nHost: x\r\n\r\n");
        s.get_mut().write_all(req.as_bytes()).await.unwrap();
        let mut status = String::new();
        tokio::time::timeout(WAIT, s.read_line(&mut status)).await.unwrap().unwrap();
        assert!(status.starts_with("HTTP/1.1 200"), "{status}");
        let mut len = 0;
        loop {
            let mut line = String::new();
            s.read_line(&mut line).await.unwrap();
            if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                len = v.trim().parse().unwrap();
            }
            if line == "\r\n" {
                break;
            }
        }
        let mut body = vec![0; len];
        s.read_exact(&mut body).await.unwrap();
        assert_eq!(body, b"ok");
        assert_eq!(next_text(&mut a.ws).await, Some(format!("k{i}")));
    }
}

#[tokio::test]
async fn channel_port_stays_open_to_other_nodes() {
    // A second gateway joins the standalone process through its channel port, as a PHP node could.
    let (_p, c, ws_port, http_port) = standalone(&[]).await;
    let w2 = free_port();
    let _gw2 =
        Proc::start(&["gateway", "--listen", &format!("127.0.0.1:{w2}"), "--broker", &format!("127.0.0.1:{c}")], &[w2])
            .await;
    wait_healthy(w2).await;
    let mut a = connect(ws_port).await;
    let mut b = connect(w2).await;
    assert_ne!(a.worker, b.worker);
    // The second gateway subscribes in the background: retry until its client hears the broadcast.
    let mut got = None;
    for i in 0..50 {
        assert_eq!(http_get(http_port, &format!("/?content=join{i}")).await.0, 200);
        assert_eq!(next_text(&mut a.ws).await, Some(format!("join{i}")));
        if let Some(m) = next_text_within(&mut b.ws, Duration::from_millis(100)).await {
            got = Some(m);
            break;
        }
    }
    assert!(got.is_some_and(|m| m.starts_with("join")), "remote gateway receives broadcasts");
    let url = format!("/?to_worker_id={}&to_connection_id={}&content=remote", q(&b.worker), b.conn);
    assert_eq!(http_get(http_port, &url).await.0, 200);
    assert_eq!(next_text(&mut b.ws).await.as_deref(), Some("remote"));
}

#[tokio::test]
async fn a_handshake_split_across_packets_still_upgrades() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    // The gateway answers a whole handshake that fits its first look (2 KiB) itself and hands
    // anything else to its HTTP stack; a request in pieces, with a large cookie as browsers send,
    // takes the second path whatever the timing, and must work the same.
    let (_p, _c, ws_port, http_port) = standalone(&[]).await;
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", ws_port)).await.unwrap();
    s.set_nodelay(true).unwrap();
    let cookie = format!("Cookie: session={}\r\n", "x".repeat(3000));
    s.write_all(format!("GET / HTTP/1.1\r\nHost: x\r\n{cookie}Upgrade: websocket\r\n").as_bytes()).await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    s.write_all(
        b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
    )
    .await
    .unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 1024];
    while !String::from_utf8_lossy(&got).contains(" connected\n") {
        let n = tokio::time::timeout(WAIT, s.read(&mut buf)).await.expect("answer").expect("read");
        assert!(n > 0, "closed: {}", String::from_utf8_lossy(&got));
        got.extend_from_slice(&buf[..n]);
    }
    let text = String::from_utf8_lossy(&got);
    assert!(text.starts_with("HTTP/1.1 101"), "{text}");
    assert!(text.to_ascii_lowercase().contains("sec-websocket-accept: s3pplmbitxaq9kygzzhzrbk+xoo="), "{text}");
    assert!(text.contains("\r\ndate: "), "answered by the HTTP stack (which sends a date), not the fast path: {text}");
    assert_eq!(http_get(http_port, "/?content=split").await.0, 200);
    let mut more = [0u8; 64];
    let n = tokio::time::timeout(WAIT, s.read(&mut more)).await.expect("push").expect("read");
    assert_eq!(&more[2..n], b"split");
}

/// `--threads N` sets the runtime's threads: one thread, and the seed's steps still work.
#[tokio::test]
async fn threads_sets_the_runtime_threads() {
    let (p, _c, w, h) = standalone(&["--threads", "1"]).await;
    let workers = std::fs::read_dir(format!("/proc/{}/task", p.pid()))
        .expect("task list")
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
        .filter(|comm| comm.trim() == "tokio-rt-worker")
        .count();
    assert_eq!(workers, 1);
    let mut c = connect(w).await;
    assert_eq!(http_get(h, "/?content=one-thread").await, (200, "ok".to_owned()));
    assert_eq!(next_text(&mut c.ws).await.as_deref(), Some("one-thread"));
}
