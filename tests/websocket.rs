//! RFC 6455 on the gateway's read side, case by case in the groups of the Autobahn testsuite for a
//! server that does not echo data: 2 ping/pong, 3 reserved bits, 4 opcodes, 5 fragmentation,
//! 6 UTF-8, 7 close handling, 9 limits. Each case talks to a real `standalone` over raw TCP with
//! frames built by hand, and checks what comes back: a pong, silence, or a close frame with the
//! right code followed by a clean end of stream (FIN, never a reset).

mod common;

use std::time::Duration;

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Largest client message the gateway under test accepts.
const LIMIT: usize = 1000;

/// One client frame, masked: `first` is the FIN/RSV/opcode byte.
fn frame(first: u8, payload: &[u8]) -> Vec<u8> {
    let mask = [0x37, 0xfa, 0x21, 0x3d];
    let mut f = vec![first];
    match payload.len() {
        n if n < 126 => f.push(0x80 | n as u8),
        n if n <= 0xFFFF => {
            f.push(0x80 | 126);
            f.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            f.push(0x80 | 127);
            f.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    f.extend_from_slice(&mask);
    f.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    f
}

fn close_payload(code: u16, reason: &[u8]) -> Vec<u8> {
    let mut p = code.to_be_bytes().to_vec();
    p.extend_from_slice(reason);
    p
}

/// A server frame: opcode and payload.
#[derive(Debug, PartialEq)]
enum Got {
    Frame(u8, Vec<u8>),
    /// The server closed the stream (FIN).
    End,
    /// Nothing within the wait.
    Silence,
}

struct Raw {
    s: TcpStream,
    buf: Vec<u8>,
    /// Return the server's heartbeat pings instead of skipping them.
    pings: bool,
}

impl Raw {
    /// Connect and complete the handshake; the welcome line is read and checked.
    async fn open(port: u16) -> Raw {
        let mut s = TcpStream::connect(("127.0.0.1", port)).await.expect("connect");
        s.write_all(
            b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
              Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
        )
        .await
        .expect("write");
        let mut buf = Vec::new();
        let mut chunk = [0u8; 4096];
        while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
            let n = tokio::time::timeout(WAIT, s.read(&mut chunk)).await.expect("handshake").expect("read");
            assert!(n > 0, "closed during the handshake");
            buf.extend_from_slice(&chunk[..n]);
        }
        assert!(buf.starts_with(b"HTTP/1.1 101"), "{}", String::from_utf8_lossy(&buf));
        let end = buf.windows(4).position(|w| w == b"\r\n\r\n").unwrap_or(0) + 4;
        let mut raw = Raw { s, buf: buf.split_off(end), pings: false };
        match raw.next(WAIT).await {
            Got::Frame(0x1, w) => assert!(w.ends_with(b" connected\n")),
            other => panic!("expected the welcome line, got {other:?}"),
        }
        raw
    }

    async fn send(&mut self, bytes: &[u8]) {
        // The server may already have closed: a failed write shows up in what is read next.
        let _ = self.s.write_all(bytes).await;
    }

    /// The next server frame (pings skipped), the end of the stream, or silence within `wait`.
    async fn next(&mut self, wait: Duration) -> Got {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            if let [b0, b1, ..] = self.buf[..] {
                assert_eq!(b1 & 0x80, 0, "server frames are not masked");
                let (len, header) = match b1 & 0x7F {
                    126 if self.buf.len() >= 4 => (u16::from_be_bytes([self.buf[2], self.buf[3]]) as usize, 4),
                    127 if self.buf.len() >= 10 => {
                        (u64::from_be_bytes(self.buf[2..10].try_into().expect("8 bytes")) as usize, 10)
                    }
                    126 | 127 => (usize::MAX, 0),
                    n => (n as usize, 2),
                };
                if len != usize::MAX && self.buf.len() >= header + len {
                    let payload = self.buf[header..header + len].to_vec();
                    self.buf.drain(..header + len);
                    if b0 & 0x0F == 0x9 && !self.pings {
                        continue; // heartbeat ping
                    }
                    return Got::Frame(b0 & 0x0F, payload);
                }
            }
            let mut chunk = [0u8; 8192];
            match tokio::time::timeout_at(deadline, self.s.read(&mut chunk)).await {
                Err(_) => return Got::Silence,
                Ok(Ok(0)) => return Got::End,
                Ok(Ok(n)) => self.buf.extend_from_slice(&chunk[..n]),
                Ok(Err(e)) => panic!("read failed ({e}): the server reset the connection instead of closing it"),
            }
        }
    }

    /// The server must close with `code`, then end the stream cleanly.
    async fn expect_close(&mut self, code: u16, case: &str) {
        match self.next(WAIT).await {
            Got::Frame(0x8, p) => {
                assert!(p.len() >= 2, "{case}: close frame without a code");
                assert_eq!(u16::from_be_bytes([p[0], p[1]]), code, "{case}: close code");
            }
            other => panic!("{case}: expected close {code}, got {other:?}"),
        }
        // We answer the close, as a client does; then the server's FIN arrives.
        self.send(&frame(0x88, &close_payload(code, b""))).await;
        assert_eq!(self.next(WAIT).await, Got::End, "{case}: stream end after the close");
    }

    /// Nothing comes back: the frames were accepted and ignored.
    async fn expect_silence(&mut self, case: &str) {
        assert_eq!(self.next(Duration::from_millis(150)).await, Got::Silence, "{case}");
    }
}

/// One gateway for every case of a test; each case on a connection of its own.
async fn gateway() -> (Proc, u16) {
    let limit = LIMIT.to_string();
    let (p, _c, w, _h) = standalone(&["--max-client-frame", &limit]).await;
    (p, w)
}

/// Send `frames` on a fresh connection; the server must close with `code`.
async fn fails(w: u16, case: &str, frames: &[Vec<u8>], code: u16) {
    let mut c = Raw::open(w).await;
    c.send(&frames.concat()).await;
    c.expect_close(code, case).await;
}

#[tokio::test]
async fn ping_pong_group_2() {
    let (_p, w) = gateway().await;
    let mut c = Raw::open(w).await;
    // 2.1-2.3: empty, text and binary payloads come back in the pong.
    for payload in [&b""[..], b"Hello, world!", &[0x00, 0xff, 0xfe, 0xfd, 0xfc, 0xfb, 0x00, 0xff]] {
        c.send(&frame(0x89, payload)).await;
        assert_eq!(c.next(WAIT).await, Got::Frame(0xA, payload.to_vec()), "pong for {payload:?}");
    }
    // 2.4: 125 bytes, the most a control frame may carry.
    c.send(&frame(0x89, &[0xfe; 125])).await;
    assert_eq!(c.next(WAIT).await, Got::Frame(0xA, vec![0xfe; 125]));
    // 2.6: ten pings in one write, ten pongs in order.
    let pings: Vec<Vec<u8>> = (0..10u8).map(|i| frame(0x89, &[i])).collect();
    c.send(&pings.concat()).await;
    for i in 0..10u8 {
        assert_eq!(c.next(WAIT).await, Got::Frame(0xA, vec![i]));
    }
    // 2.7-2.8: unsolicited pongs are ignored.
    c.send(&[frame(0x8A, b""), frame(0x8A, b"unsolicited")].concat()).await;
    c.expect_silence("unsolicited pong").await;
    // 2.5: 126 bytes is too long for a control frame.
    fails(w, "2.5 ping of 126 bytes", &[frame(0x89, &[0; 126])], 1002).await;
    // 2.10: a close ends the connection; a ping after it is not answered.
    let mut c = Raw::open(w).await;
    c.send(&[frame(0x88, &close_payload(1000, b"")), frame(0x89, b"late")].concat()).await;
    assert_eq!(c.next(WAIT).await, Got::Frame(0x8, close_payload(1000, b"")));
    assert_eq!(c.next(WAIT).await, Got::End);
}

/// The server pings every heartbeat interval; a client that answers stays, one that sends
/// nothing for three intervals is closed (1001), not before.
#[tokio::test]
async fn the_server_pings_and_closes_a_silent_client_after_three_intervals() {
    let (_p, _c, w, _h) = standalone(&["--heartbeat", "300ms"]).await;
    let mut answering = Raw::open(w).await;
    answering.pings = true;
    let mut silent = Raw::open(w).await;
    silent.pings = true;
    let opened = tokio::time::Instant::now();
    // The answering client gets pings and answers each; it is still open after the silent one
    // has been closed.
    let mut pings = 0;
    while pings < 6 {
        match answering.next(WAIT).await {
            Got::Frame(0x9, p) => {
                answering.send(&frame(0x8A, &p)).await;
                pings += 1;
            }
            other => panic!("expected a ping, got {other:?}"),
        }
    }
    // The silent one got pings too, then a close once it had been silent for three intervals.
    let mut got_ping = false;
    let closed_at = loop {
        match silent.next(WAIT).await {
            Got::Frame(0x9, _) => got_ping = true,
            Got::Frame(0x8, p) => {
                assert_eq!(u16::from_be_bytes([p[0], p[1]]), 1001, "going away");
                break tokio::time::Instant::now();
            }
            other => panic!("expected pings then a close, got {other:?}"),
        }
    };
    assert!(got_ping, "the silent client was pinged");
    let silent_for = closed_at - opened;
    assert!(silent_for >= Duration::from_millis(900), "closed after {silent_for:?}: before three intervals");
    silent.send(&frame(0x88, &close_payload(1001, b""))).await;
    assert_eq!(silent.next(WAIT).await, Got::End);
    // Six pings answered (1.8 s): still open, and its own ping is answered.
    answering.send(&frame(0x89, b"still here")).await;
    loop {
        match answering.next(WAIT).await {
            Got::Frame(0x9, p) => answering.send(&frame(0x8A, &p)).await,
            Got::Frame(0xA, p) => break assert_eq!(p, b"still here"),
            other => panic!("expected the pong, got {other:?}"),
        }
    }
}

#[tokio::test]
async fn reserved_bits_group_3() {
    let (_p, w) = gateway().await;
    for (case, first) in [("3.1 RSV1", 0xC1), ("3.2 RSV2", 0xA1), ("3.3 RSV3", 0x91), ("3.7 RSV on a ping", 0xF9)] {
        fails(w, case, &[frame(first, b"x")], 1002).await;
    }
    // 3.2: a good text first, then the bad frame: the first is accepted, the second fails.
    fails(w, "3.2 after a good frame", &[frame(0x81, b"Hello"), frame(0xA1, b"x"), frame(0x89, b"")], 1002).await;
}

#[tokio::test]
async fn opcodes_group_4() {
    let (_p, w) = gateway().await;
    for op in [3u8, 4, 5, 6, 7, 0xB, 0xC, 0xD, 0xE, 0xF] {
        fails(w, &format!("opcode {op:#x}"), &[frame(0x80 | op, b"reserved")], 1002).await;
        fails(w, &format!("opcode {op:#x} after text"), &[frame(0x81, b"ok"), frame(0x80 | op, b"")], 1002).await;
    }
}

#[tokio::test]
async fn fragmentation_group_5() {
    let (_p, w) = gateway().await;
    // 5.1-5.2: control frames may not be fragmented.
    fails(w, "5.1 fragmented ping", &[frame(0x09, b"frag"), frame(0x80, b"ment")], 1002).await;
    fails(w, "5.2 fragmented pong", &[frame(0x0A, b"frag"), frame(0x80, b"ment")], 1002).await;
    // 5.9-5.14: continuation with nothing to continue.
    fails(w, "5.9 lone final continuation", &[frame(0x80, b"x"), frame(0x81, b"y")], 1002).await;
    fails(w, "5.10 lone continuation", &[frame(0x00, b"x"), frame(0x81, b"y")], 1002).await;
    fails(w, "5.13 continuation after a whole text", &[frame(0x81, b"done"), frame(0x80, b"x")], 1002).await;
    // 5.18-5.20: a new data frame inside a fragmented message.
    fails(w, "5.18 text inside text", &[frame(0x01, b"a"), frame(0x81, b"b")], 1002).await;
    fails(w, "5.x binary inside text", &[frame(0x01, b"a"), frame(0x02, b"b"), frame(0x80, b"c")], 1002).await;
    // 5.6-5.8, 5.15-5.17: fragments with pings between them; each ping answered, message accepted.
    let mut c = Raw::open(w).await;
    c.send(&frame(0x01, b"frag")).await;
    c.send(&frame(0x89, b"between")).await;
    assert_eq!(c.next(WAIT).await, Got::Frame(0xA, b"between".to_vec()));
    c.send(&frame(0x00, b"ment")).await;
    c.send(&frame(0x89, b"again")).await;
    assert_eq!(c.next(WAIT).await, Got::Frame(0xA, b"again".to_vec()));
    c.send(&frame(0x80, b"ed")).await;
    // A second fragmented message, with empty fragments, one byte at a time on the wire.
    for b in [frame(0x02, b""), frame(0x00, b"x"), frame(0x80, b"")].concat() {
        c.send(&[b]).await;
    }
    c.expect_silence("fragmented messages accepted").await;
    c.send(&frame(0x89, b"still here")).await;
    assert_eq!(c.next(WAIT).await, Got::Frame(0xA, b"still here".to_vec()));
    c.send(&frame(0x88, &close_payload(1000, b""))).await;
    assert_eq!(c.next(WAIT).await, Got::Frame(0x8, close_payload(1000, b"")));
    assert_eq!(c.next(WAIT).await, Got::End);
}

#[tokio::test]
async fn utf8_group_6() {
    let (_p, w) = gateway().await;
    let mut c = Raw::open(w).await;
    // 6.2-6.4: valid text, whole and split at every byte, including inside code points.
    let text = "Hello-µ@ßöäüàá-UTF-8!! κόσμε \u{1F600}".as_bytes();
    c.send(&frame(0x81, text)).await;
    let mut split = vec![frame(0x01, &text[..1])];
    split.extend(text[1..text.len() - 1].iter().map(|b| frame(0x00, &[*b])));
    split.push(frame(0x80, &text[text.len() - 1..]));
    c.send(&split.concat()).await;
    // 6.1: empty text messages, whole and fragmented.
    c.send(&[frame(0x81, b""), frame(0x01, b""), frame(0x00, b""), frame(0x80, b"")].concat()).await;
    c.expect_silence("valid text accepted").await;
    c.send(&frame(0x89, b"ok")).await;
    assert_eq!(c.next(WAIT).await, Got::Frame(0xA, b"ok".to_vec()));
    // 6.3-6.21: invalid sequences, whole or split, fail with 1007.
    let euro = "\u{20AC}".as_bytes();
    let cases: [(&str, Vec<Vec<u8>>); 8] = [
        ("6.3 invalid byte", vec![frame(0x81, b"\xce\xba\xe1\xbd\xb9\xcf\x83\xce\xbc\xce\xb5\xed\xa0\x80edited")]),
        ("6.5 lone continuation byte", vec![frame(0x81, b"\x80")]),
        ("6.6 cut at the end", vec![frame(0x81, &euro[..2])]),
        ("6.8 overlong", vec![frame(0x81, b"\xc0\xaf")]),
        ("6.18 surrogate", vec![frame(0x81, b"\xed\xa0\x80")]),
        ("6.x beyond U+10FFFF, split", vec![frame(0x01, b"\xf4"), frame(0x80, b"\x90\x80\x80")]),
        ("6.x cut at the end of fragments", vec![frame(0x01, &euro[..1]), frame(0x80, &euro[1..2])]),
        ("6.x invalid in the middle fragment", vec![frame(0x01, b"ok"), frame(0x00, b"\xff"), frame(0x80, b"ok")]),
    ];
    for (case, frames) in cases {
        fails(w, case, &frames, 1007).await;
    }
}

#[tokio::test]
async fn close_handling_group_7() {
    let (_p, w) = gateway().await;
    // 7.1.1 / 7.3.1: an empty close is answered with 1000.
    let mut c = Raw::open(w).await;
    c.send(&frame(0x88, b"")).await;
    assert_eq!(c.next(WAIT).await, Got::Frame(0x8, close_payload(1000, b"")));
    assert_eq!(c.next(WAIT).await, Got::End);
    // 7.7: every code a peer may send is echoed.
    for code in [1000u16, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 3000, 3999, 4000, 4999] {
        let mut c = Raw::open(w).await;
        c.send(&frame(0x88, &close_payload(code, b"bye \xce\xba"))).await;
        assert_eq!(c.next(WAIT).await, Got::Frame(0x8, close_payload(code, b"")), "echo of {code}");
        assert_eq!(c.next(WAIT).await, Got::End);
    }
    // 7.3.2: a one-byte payload. 7.9: codes that may not be sent. 7.5.1: a reason that is not UTF-8.
    fails(w, "7.3.2 one byte", &[frame(0x88, b"\x03")], 1002).await;
    for code in [0u16, 999, 1004, 1005, 1006, 1015, 1016, 1100, 2000, 2999, 5000, 65535] {
        fails(w, &format!("7.9 code {code}"), &[frame(0x88, &close_payload(code, b""))], 1002).await;
    }
    fails(w, "7.5.1 reason not UTF-8", &[frame(0x88, &close_payload(1000, b"\xce\xba\xe1\xbd\xb9\xcf\x83\xff"))], 1007)
        .await;
    // 7.1.2-7.1.6: data after the close is ignored; exactly one close comes back.
    let mut c = Raw::open(w).await;
    c.send(&[frame(0x88, &close_payload(1000, b"")), frame(0x81, b"after"), frame(0x88, b"")].concat()).await;
    assert_eq!(c.next(WAIT).await, Got::Frame(0x8, close_payload(1000, b"")));
    assert_eq!(c.next(WAIT).await, Got::End);
}

#[tokio::test]
async fn limits_group_9() {
    let (_p, w) = gateway().await;
    // At the limit, whole and in fragments: accepted.
    let mut c = Raw::open(w).await;
    c.send(&frame(0x82, &vec![7; LIMIT])).await;
    c.send(&[frame(0x01, &vec![b'a'; LIMIT / 2]), frame(0x80, &vec![b'b'; LIMIT / 2])].concat()).await;
    c.send(&frame(0x89, b"alive")).await;
    assert_eq!(c.next(WAIT).await, Got::Frame(0xA, b"alive".to_vec()));
    // One byte over: a whole frame, and a message whose fragments are each small.
    fails(w, "9.x frame over the limit", &[frame(0x82, &vec![0; LIMIT + 1])], 1009).await;
    let pieces: Vec<Vec<u8>> =
        [frame(0x02, &[0; 100])].into_iter().chain((0..10).map(|_| frame(0x00, &[0; 100]))).collect();
    fails(w, "9.x fragments over the limit", &pieces, 1009).await;
    // A 64-bit length with the top bit set.
    let mut huge = vec![0x82, 0x80 | 127];
    huge.extend_from_slice(&(1u64 << 63 | 5).to_be_bytes());
    huge.extend_from_slice(&[0, 0, 0, 0]);
    fails(w, "length with the top bit set", &[huge], 1002).await;
    // Unmasked client frame.
    fails(w, "unmasked", &[b"\x81\x02hi".to_vec()], 1002).await;
}

/// A client pushed to without pause is still read: its answers to the heartbeat count, so it is
/// not closed as dead.
#[tokio::test]
async fn a_client_pushed_to_steadily_is_still_read() {
    let (_p, _c, w, h) = standalone(&["--heartbeat", "100ms"]).await;
    let mut c = Raw::open(w).await;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut publishers = Vec::new();
    for i in 0..4 {
        let stop = stop.clone();
        publishers.push(tokio::spawn(async move {
            let mut s = TcpStream::connect(("127.0.0.1", h)).await.expect("connect");
            let req = format!("GET /?content=p{i} HTTP/1.1\r\nHost: x\r\n\r\n");
            let mut buf = [0u8; 1024];
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                s.write_all(req.as_bytes()).await.expect("publish");
                let n = s.read(&mut buf).await.expect("answer");
                assert!(n > 0);
            }
        }));
    }
    // For 3 s (30 heartbeats; 3 missed ones close a client), read everything and answer pings. A
    // client taken for dead would get a close frame and then the end of the stream.
    let until = tokio::time::Instant::now() + Duration::from_secs(3);
    let mut received = 0;
    while tokio::time::Instant::now() < until {
        let mut chunk = [0u8; 65536];
        let n = tokio::time::timeout(WAIT, c.s.read(&mut chunk)).await.expect("read").expect("read");
        assert!(n > 0, "closed while pushed to (after {received} bytes)");
        received += n;
        c.send(&frame(0x8A, b"")).await;
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for p in publishers {
        p.await.expect("publisher");
    }
    assert!(received > 10_000, "pushes arrived ({received} bytes)");
}
