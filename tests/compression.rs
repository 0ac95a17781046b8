//! permessage-deflate (RFC 7692) on the gateway: negotiated only when `--compression` allows it
//! and the client offers it, with `server_no_context_takeover; client_no_context_takeover`;
//! pushes from the minimum size go as compressed frames (RSV1) that inflate to the push, smaller
//! ones plain; compressed client messages are inflated and checked (1007, 1009). Read with a raw
//! client here, and with a second client library (Python `websockets`); Chromium in
//! `tests/browser.rs`.

mod common;

use std::time::Duration;

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const OFFER: &str = "permessage-deflate; client_max_window_bits";

/// A raw WebSocket client: the handshake's answer head, and frames as (first byte, payload).
struct Raw {
    s: TcpStream,
    buf: Vec<u8>,
    head: String,
}

impl Raw {
    async fn open(port: u16, extensions: Option<&str>) -> Raw {
        let mut s = TcpStream::connect(("127.0.0.1", port)).await.expect("connect");
        let ext = extensions.map(|e| format!("Sec-WebSocket-Extensions: {e}\r\n")).unwrap_or_default();
        let req = format!(
            "GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n{ext}\r\n"
        );
        s.write_all(req.as_bytes()).await.expect("write");
        let mut raw = Raw { s, buf: Vec::new(), head: String::new() };
        let end = loop {
            if let Some(i) = raw.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            raw.read().await;
        };
        raw.head = String::from_utf8_lossy(&raw.buf[..end]).into_owned();
        raw.buf.drain(..end);
        assert!(raw.head.starts_with("HTTP/1.1 101"), "{}", raw.head);
        raw
    }

    async fn read(&mut self) {
        let mut chunk = vec![0u8; 64 * 1024];
        let n = tokio::time::timeout(WAIT, self.s.read(&mut chunk)).await.expect("read timed out").expect("read");
        assert!(n > 0, "closed; read so far {:?}", self.buf);
        self.buf.extend_from_slice(&chunk[..n]);
    }

    /// The next frame: its first byte and payload, skipping pings.
    async fn frame(&mut self) -> (u8, Vec<u8>) {
        loop {
            if self.buf.len() >= 2 {
                let (len, head) = match self.buf[1] & 0x7F {
                    126 if self.buf.len() >= 4 => (u16::from_be_bytes([self.buf[2], self.buf[3]]) as usize, 4),
                    127 if self.buf.len() >= 10 => {
                        (u64::from_be_bytes(self.buf[2..10].try_into().expect("8 bytes")) as usize, 10)
                    }
                    n if n < 126 => (n as usize, 2),
                    _ => (usize::MAX, 0),
                };
                if head > 0 && self.buf.len() >= head + len {
                    let b0 = self.buf[0];
                    let payload = self.buf[head..head + len].to_vec();
                    self.buf.drain(..head + len);
                    if b0 & 0x0F == 0x9 {
                        continue;
                    }
                    return (b0, payload);
                }
            }
            self.read().await;
        }
    }

    /// Send a masked frame with first byte `b0`.
    async fn send(&mut self, b0: u8, payload: &[u8]) {
        let mut f = vec![b0];
        match payload.len() {
            n if n < 126 => f.push(0x80 | n as u8),
            n => {
                f.push(0x80 | 126);
                f.extend_from_slice(&(n as u16).to_be_bytes());
            }
        }
        f.extend_from_slice(&[7, 7, 7, 7]);
        f.extend(payload.iter().map(|b| b ^ 7));
        self.s.write_all(&f).await.expect("write");
    }
}

fn deflate(data: &[u8]) -> Vec<u8> {
    use flate2::{Compress, Compression, FlushCompress};
    let mut c = Compress::new(Compression::default(), false);
    let mut out = Vec::with_capacity(data.len() + 64);
    c.compress_vec(data, &mut out, FlushCompress::Sync).expect("compress");
    out.truncate(out.len() - 4);
    out
}

fn inflate(data: &[u8]) -> Vec<u8> {
    let mut d = flate2::Decompress::new(false);
    let mut out = Vec::with_capacity(1 << 20);
    let input = [data, &[0, 0, 0xff, 0xff]].concat();
    d.decompress_vec(&input, &mut out, flate2::FlushDecompress::Sync).expect("valid DEFLATE");
    out
}

/// 4 KiB of JSON-like text.
fn json_4k() -> String {
    let mut s = String::from("[");
    let mut i = 0;
    while s.len() < 4000 {
        s.push_str(&format!(
            "{{\"id\":{i},\"user\":\"user-{i}\",\"score\":{},\"tags\":[\"a\",\"b\"]}},",
            i * 37 % 1000
        ));
        i += 1;
    }
    s.push_str("{}]");
    s
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn negotiated_compressed_once_and_inflated() {
    let (_p, _, w, h) = standalone(&["--compression", "1000", "--workers", "1"]).await;
    let mut a = Raw::open(w, Some(OFFER)).await;
    let lower = a.head.to_ascii_lowercase();
    assert!(
        lower.contains(
            "sec-websocket-extensions: permessage-deflate; server_no_context_takeover; client_no_context_takeover"
        ),
        "{}",
        a.head
    );
    let mut b = Raw::open(w, Some(OFFER)).await;
    let mut plain = Raw::open(w, None).await;
    assert!(!plain.head.to_ascii_lowercase().contains("sec-websocket-extensions"), "{}", plain.head);
    for c in [&mut a, &mut b, &mut plain] {
        let (b0, welcome) = c.frame().await;
        assert_eq!(b0, 0x81, "the welcome goes uncompressed");
        assert!(String::from_utf8_lossy(&welcome).starts_with("workerID:"));
    }
    let big = json_4k();
    let status =
        http(h, "POST", "/", &[("Content-Type", "application/x-www-form-urlencoded")], &format!("content={}", q(&big)))
            .await
            .0;
    assert_eq!(status, 200);
    let (ba, fa) = a.frame().await;
    let (bb, fb) = b.frame().await;
    assert_eq!((ba, bb), (0xC1, 0xC1), "FIN, RSV1, text");
    assert_eq!(fa, fb, "the same compressed bytes for every connection");
    assert!(fa.len() < big.len() / 2, "{} bytes on the wire for {}", fa.len(), big.len());
    assert_eq!(inflate(&fa), big.as_bytes());
    let (bp, fp) = plain.frame().await;
    assert_eq!((bp, fp), (0x81, big.clone().into_bytes()), "a client without compression gets the plain frame");
    // Below the minimum size: plain for everyone.
    assert_eq!(http_get(h, "/?content=small").await.0, 200);
    assert_eq!(a.frame().await, (0x81, b"small".to_vec()));
    assert_eq!(plain.frame().await, (0x81, b"small".to_vec()));
    // Compressed client messages: fine, then a ping still answered; bad ones close the connection.
    a.send(0xC1, &deflate("héllo".as_bytes())).await;
    a.send(0x89, b"p").await;
    loop {
        let mut buf_has_pong = false;
        while a.buf.len() >= 2 {
            let (b0, len) = (a.buf[0], (a.buf[1] & 0x7F) as usize);
            if b0 == 0x8A {
                buf_has_pong = true;
            }
            if a.buf.len() < 2 + len {
                break;
            }
            a.buf.drain(..2 + len);
        }
        if buf_has_pong {
            break;
        }
        a.read().await;
    }
    for (payload, code) in [(deflate(b"\xff\xfe"), 1007u16), (deflate(&[b'a'; 100_000]), 1009)] {
        let mut c = Raw::open(w, Some(OFFER)).await;
        c.frame().await;
        c.send(0xC1, &payload).await;
        let (b0, close) = c.frame().await;
        assert_eq!(b0, 0x88, "a close frame");
        assert_eq!(u16::from_be_bytes([close[0], close[1]]), code);
    }
    // A client that did not negotiate compression may not send RSV1.
    plain.send(0xC1, &deflate(b"x")).await;
    let (b0, close) = plain.frame().await;
    assert_eq!((b0, u16::from_be_bytes([close[0], close[1]])), (0x88, 1002));
}

#[tokio::test]
async fn off_unless_asked_for() {
    let (_p, _, w, h) = standalone(&[]).await;
    let mut c = Raw::open(w, Some(OFFER)).await;
    assert!(!c.head.to_ascii_lowercase().contains("sec-websocket-extensions"), "{}", c.head);
    c.frame().await;
    assert_eq!(http_get(h, &format!("/?content={}", q(&json_4k()))).await.0, 200);
    assert_eq!(c.frame().await.0, 0x81);
}

/// A second client library: Python's `websockets` offers permessage-deflate, inflates what it
/// gets and compresses what it sends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_websockets_client() {
    if !have(&["python3"], false) {
        return;
    }
    let importable = std::process::Command::new("python3").args(["-c", "import websockets"]).status();
    if !importable.is_ok_and(|s| s.success()) {
        assert!(std::env::var_os("PUSHWIRE_TEST_ALL").is_none(), "python3 websockets is missing");
        eprintln!("SKIPPED: python3 websockets is missing; ./scripts/test installs it");
        return;
    }
    let (_p, _, w, h) = standalone(&["--compression", "on"]).await;
    let big = json_4k();
    let script = format!(
        r#"
import asyncio, websockets, sys
async def main():
    async with websockets.connect("ws://127.0.0.1:{w}/", max_size=2**20) as ws:
        print("extensions", [e.name for e in ws.extensions], flush=True)
        print("welcome", (await ws.recv()).startswith("workerID:"), flush=True)
        await ws.send("a compressed hello from the client " * 20)
        msg = await asyncio.wait_for(ws.recv(), 10)
        print("got", len(msg), msg == sys.stdin.read(), flush=True)
asyncio.run(main())
"#
    );
    let mut child = tokio::process::Command::new("python3")
        .args(["-c", &script])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("python3 runs");
    let mut stdin = child.stdin.take().expect("stdin");
    stdin.write_all(big.as_bytes()).await.expect("write stdin");
    drop(stdin);
    // Publish once the client is connected (it has its welcome).
    let mut sent = false;
    for _ in 0..100 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        if metric(w, "pushwire_ws_connections_total").await >= 1 {
            tokio::time::sleep(Duration::from_millis(300)).await;
            let body = format!("content={}", q(&big));
            let status = http(h, "POST", "/", &[("Content-Type", "application/x-www-form-urlencoded")], &body).await.0;
            assert_eq!(status, 200);
            sent = true;
            break;
        }
    }
    assert!(sent, "the client never connected");
    let out = tokio::time::timeout(WAIT, child.wait_with_output()).await.expect("python finished").expect("output");
    let out = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.contains("extensions ['permessage-deflate']"), "{out}");
    assert!(out.contains("welcome True"), "{out}");
    assert!(out.contains(&format!("got {} True", big.len())), "{out}");
}
