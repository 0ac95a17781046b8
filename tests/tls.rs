//! TLS with a certificate the test makes (openssl). The publisher: requests over HTTPS, the
//! certificate's expiry in /metrics, and reloads (a changed file, SIGHUP, a broken file kept out)
//! while a connection opened before stays up. The gateway: `wss://` (seed and JSON clients),
//! `https://` for the page and event streams, and a reload while clients stay connected.

mod common;

use std::time::Duration;

use common::pki::{https_get, Pki, Tls};
use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_publisher_with_certificate_reloads() {
    if !have(&["openssl"], false) {
        return;
    }
    let (pki, cert, key) = Pki::rotating(1, 2);
    let (p, _c, w, h) = standalone(&["--tls-cert", &cert, "--tls-key", &key]).await;

    let (mut kept, cn) = pki.connect(h).await;
    assert_eq!(cn, "first");
    assert_eq!(https_get(&mut kept, "/healthz").await.0, 200);
    let (mut ws, _) = wss(&pki, w, "").await;
    assert_eq!(https_get(&mut kept, "/?content=over-tls").await, (200, "ok".to_owned()));
    assert_eq!(text_of(&mut ws).await.as_deref(), Some("over-tls"));
    let expiry = |text: &str| metric_in(text, "pushwire_tls_certificate_expiry_seconds");
    let first_expiry = expiry(&https_get(&mut kept, "/metrics").await.1);
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("clock").as_secs();
    assert!((now + 23 * 3600..now + 25 * 3600).contains(&first_expiry), "one day ahead: {first_expiry} (now {now})");
    // Plain HTTP on the TLS port is not served.
    let mut plain = tokio::net::TcpStream::connect(("127.0.0.1", h)).await.expect("connect");
    plain.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n").await.expect("write");
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(WAIT, plain.read_to_end(&mut answer)).await;
    assert!(!answer.starts_with(b"HTTP/1.1 200"), "plain HTTP answered on the TLS port");

    // The files change: new connections get the new certificate; the one opened before stays up.
    pki.install("second");
    pki.wait_for_cert(h, "second").await;
    assert_eq!(https_get(&mut kept, "/healthz").await.0, 200, "the connection opened before is still served");
    let second_expiry = expiry(&https_get(&mut kept, "/metrics").await.1);
    assert!(second_expiry >= first_expiry + 23 * 3600, "{second_expiry} after {first_expiry}");

    // A broken file is not taken: new connections keep the certificate that works.
    std::fs::write(pki.dir.join("live.pem"), "not a certificate").expect("write");
    let deadline = tokio::time::Instant::now() + WAIT;
    while metric_in(&https_get(&mut kept, "/metrics").await.1, "pushwire_tls_reload_failures_total") == 0 {
        assert!(tokio::time::Instant::now() < deadline, "the broken file was never looked at");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(pki.connect(h).await.1, "second");

    // SIGHUP reloads at once.
    pki.install("first");
    let status = std::process::Command::new("kill").args(["-HUP", &p.pid().to_string()]).status().expect("kill");
    assert!(status.success());
    pki.wait_for_cert(h, "first").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_serves_wss_https_and_event_streams_through_a_reload() {
    if !have(&["openssl"], false) {
        return;
    }
    let (pki, cert, key) = Pki::rotating(1, 2);
    let (_p, _c, w, h) = standalone(&["--tls-cert", &cert, "--tls-key", &key, "--token-secret", "tls-secret"]).await;

    // The page over https, its WebSocket over wss.
    let (mut page, cn) = pki.connect(w).await;
    assert_eq!(cn, "first");
    let (status, body) = https_get(&mut page, "/").await;
    assert!(status == 200 && body.contains("new WebSocket"), "{status} {body}");
    let (mut seed, welcome) = wss(&pki, w, "").await;
    let (worker, conn) = parse_welcome(&welcome);
    let token = user_token("tls-secret", "tia", &["news"]);
    let (mut json, welcome) = wss(&pki, w, &format!("?format=json&token={token}")).await;
    assert!(welcome.contains("\"uid\":\"tia\""), "{welcome}");
    // An event stream over https.
    let (mut events, _) = pki.connect(w).await;
    events.write_all(b"GET /events HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n").await.expect("write");
    let mut seen = String::new();
    let head = read_until(&mut events, &mut seen, "data: workerID:").await;
    assert!(head.starts_with("HTTP/1.1 200") && head.contains("text/event-stream"), "{head}");

    // Plain WebSocket and HTTP on the TLS port are not served.
    let mut plain = tokio::net::TcpStream::connect(("127.0.0.1", w)).await.expect("connect");
    plain.write_all(b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n").await.expect("write");
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(WAIT, plain.read_to_end(&mut answer)).await;
    assert!(!answer.starts_with(b"HTTP/1.1 101"), "plain WebSocket upgraded on the TLS port");

    // Every kind of push reaches every transport over TLS.
    let (mut publisher, _) = pki.connect(h).await;
    for query in [
        "/?content=to-all".to_owned(),
        format!("/?to_worker_id={}&to_connection_id={conn}&content=to-seed", q(&worker)),
        "/?to_uid=tia&content=to-tia".into(),
    ] {
        assert_eq!(https_get(&mut publisher, &query).await, (200, "ok".to_owned()), "{query}");
    }
    assert_eq!(text_of(&mut seed).await.as_deref(), Some("to-all"));
    assert_eq!(text_of(&mut seed).await.as_deref(), Some("to-seed"));
    for want in ["to-all", "to-tia"] {
        let m = text_of(&mut json).await.expect("a message");
        assert!(m.contains(&format!("\"data\":\"{want}\"")), "{m}");
    }
    read_until(&mut events, &mut seen, "data: to-all\n").await;

    // A new certificate: new connections get it, the clients connected before stay served.
    pki.install("second");
    pki.wait_for_cert(w, "second").await;
    assert_eq!(https_get(&mut publisher, "/?content=after-reload").await.0, 200);
    assert_eq!(text_of(&mut seed).await.as_deref(), Some("after-reload"));
    assert!(text_of(&mut json).await.is_some_and(|m| m.contains("after-reload")));
    read_until(&mut events, &mut seen, "data: after-reload\n").await;
    let (mut fresh, cn) = pki.connect(w).await;
    assert_eq!(cn, "second");
    let expiry = metric_in(&https_get(&mut fresh, "/metrics").await.1, "pushwire_tls_certificate_expiry_seconds");
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("clock").as_secs();
    assert!((now + 47 * 3600..now + 49 * 3600).contains(&expiry), "two days ahead: {expiry} (now {now})");
}

type Wss = tokio_tungstenite::WebSocketStream<Tls>;

/// A `wss://` client on 127.0.0.1:`port` asking with `query`, and its welcome.
async fn wss(pki: &Pki, port: u16, query: &str) -> (Wss, String) {
    let (tls, _) = pki.connect(port).await;
    let url = format!("wss://127.0.0.1:{port}/{query}");
    let (mut ws, _) = tokio::time::timeout(WAIT, tokio_tungstenite::client_async(url, tls))
        .await
        .expect("handshake in time")
        .expect("wss handshake");
    let welcome = text_of(&mut ws).await.expect("welcome");
    (ws, welcome)
}

/// The next text message, `None` at the end or after [`WAIT`].
async fn text_of(ws: &mut Wss) -> Option<String> {
    use futures_util::StreamExt;
    loop {
        match tokio::time::timeout(WAIT, ws.next()).await.ok()??.ok()? {
            tokio_tungstenite::tungstenite::Message::Text(t) => return Some(t.to_string()),
            tokio_tungstenite::tungstenite::Message::Close(_) => return None,
            _ => {}
        }
    }
}

/// Read from `tls` into `seen` until it holds `needle`; what came up to it is taken out and
/// returned.
async fn read_until(tls: &mut Tls, seen: &mut String, needle: &str) -> String {
    while !seen.contains(needle) {
        let mut chunk = [0u8; 4096];
        let n = tokio::time::timeout(WAIT, tls.read(&mut chunk)).await.expect("in time").expect("read");
        assert!(n > 0, "stream ended; read so far: {seen:?}");
        seen.push_str(&String::from_utf8_lossy(&chunk[..n]));
    }
    let end = seen.find(needle).map_or(0, |i| i + needle.len());
    seen.drain(..end).collect()
}
