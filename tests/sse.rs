//! Server-Sent Events on the gateway port (`GET /events`), read with a plain HTTP client: the
//! welcome line first, every kind of push (broadcast, targeted, user, topic), heartbeat comments,
//! refusals answered with a reason, a stream whose request arrives in pieces (served chunked by the
//! HTTP stack), and a stream that stops reading cut off without holding back anyone.

mod common;

use std::time::Duration;

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const SECRET: &str = "sse-secret";

/// An open event stream and what has been read of it.
struct Stream {
    s: TcpStream,
    buf: String,
    /// Bytes read but not yet decoded, when the body is chunked (served by hyper).
    raw: Option<Vec<u8>>,
    worker: String,
    conn: String,
}

impl Stream {
    /// Open `/events?query` on `gw` in `pieces` writes; check the head; read the welcome event.
    /// A whole request gets the raw stream; one in pieces goes through the HTTP stack and is
    /// answered chunked, which is decoded here.
    async fn open(gw: u16, query: &str, pieces: usize) -> Stream {
        let mut s = TcpStream::connect(("127.0.0.1", gw)).await.expect("connect");
        let req = format!("GET /events{query} HTTP/1.1\r\nHost: x\r\nAccept: text/event-stream\r\n\r\n");
        let step = req.len().div_ceil(pieces);
        for part in req.as_bytes().chunks(step) {
            s.write_all(part).await.expect("write");
            if pieces > 1 {
                tokio::time::sleep(Duration::from_millis(30)).await;
            }
        }
        let mut st = Stream { s, buf: String::new(), raw: None, worker: String::new(), conn: String::new() };
        let head = st.until("\r\n\r\n").await.to_ascii_lowercase();
        assert!(head.starts_with("http/1.1 200"), "{head}");
        assert!(head.contains("content-type: text/event-stream"), "{head}");
        assert_eq!(head.contains("transfer-encoding: chunked"), pieces > 1, "{head}");
        if pieces > 1 {
            st.raw = Some(std::mem::take(&mut st.buf).into_bytes());
            st.dechunk();
        }
        let welcome = st.event().await.expect("welcome event");
        let (worker, conn) = parse_welcome(&welcome);
        (st.worker, st.conn) = (worker, conn);
        st
    }

    /// Move every whole chunk of `raw` into `buf`.
    fn dechunk(&mut self) {
        let Some(raw) = &mut self.raw else { return };
        loop {
            let Some(eol) = raw.windows(2).position(|w| w == b"\r\n") else { return };
            let size = usize::from_str_radix(std::str::from_utf8(&raw[..eol]).expect("chunk size"), 16).expect("hex");
            if raw.len() < eol + 2 + size + 2 {
                return;
            }
            self.buf.push_str(std::str::from_utf8(&raw[eol + 2..eol + 2 + size]).expect("utf-8"));
            assert_eq!(&raw[eol + 2 + size..eol + 4 + size], b"\r\n", "chunk ends with CRLF");
            raw.drain(..eol + 4 + size);
        }
    }

    /// Read up to and including `end`.
    async fn until(&mut self, end: &str) -> String {
        loop {
            if let Some(i) = self.buf.find(end) {
                let out = self.buf[..i + end.len()].to_owned();
                self.buf.drain(..i + end.len());
                return out;
            }
            let mut chunk = vec![0u8; 64 * 1024];
            let n = tokio::time::timeout(WAIT, self.s.read(&mut chunk)).await.expect("read timed out").expect("read");
            assert!(n > 0, "stream ended; read so far: {:?}", self.buf);
            match &mut self.raw {
                Some(raw) => {
                    raw.extend_from_slice(&chunk[..n]);
                    self.dechunk();
                }
                None => self.buf.push_str(&String::from_utf8_lossy(&chunk[..n])),
            }
        }
    }

    /// The next event's data (comments skipped), as EventSource would give it; `None` at the end.
    async fn event(&mut self) -> Option<String> {
        loop {
            let block = tokio::time::timeout(WAIT, self.until("\n\n")).await.ok()?;
            let data: Vec<&str> = block.lines().filter_map(|l| l.strip_prefix("data: ")).collect();
            if !data.is_empty() {
                return Some(data.join("\n"));
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_kind_of_push_reaches_an_event_stream() {
    let (_p, _c, w, h) = standalone(&["--token-secret", SECRET, "--workers", "2"]).await;
    let mut anon = Stream::open(w, "", 1).await;
    let token = user_token(SECRET, "sam", &["news"]);
    let mut sam = Stream::open(w, &format!("?token={token}"), 3).await; // the request in pieces
    let mut ws = connect(w).await;

    assert_eq!(http_get(h, "/?content=line1%0Aline2").await.0, 200);
    let target = format!("/?to_worker_id={}&to_connection_id={}&content=just-anon", q(&anon.worker), anon.conn);
    assert_eq!(http_get(h, &target).await.0, 200);
    assert_eq!(http_get(h, "/?to_uid=sam&content=for-sam").await.0, 200);
    assert_eq!(http_get(h, "/?to_channel=news&content=news-1").await.0, 200);
    assert_eq!(http_get(h, "/?content=end").await.0, 200);

    for (s, want) in [
        (&mut anon, vec!["line1\nline2", "just-anon", "end"]),
        (&mut sam, vec!["line1\nline2", "for-sam", "news-1", "end"]),
    ] {
        let mut got = Vec::new();
        while let Some(e) = s.event().await {
            let done = e == "end";
            got.push(e);
            if done {
                break;
            }
        }
        assert_eq!(got, want);
    }
    // WebSocket clients get the same text.
    assert_eq!(next_text(&mut ws.ws).await.as_deref(), Some("line1\nline2"));
    assert_eq!(next_text(&mut ws.ws).await.as_deref(), Some("end"));
    assert_eq!(metric(h, "pushwire_sse_connections_total").await, 2);
}

#[tokio::test]
async fn heartbeats_keep_a_silent_stream_open() {
    let (_p, _c, w, _h) = standalone(&["--heartbeat", "200ms"]).await;
    let mut s = Stream::open(w, "", 1).await;
    // A comment every heartbeat, and the stream is not closed for never writing anything (a
    // WebSocket that silent for three intervals would be).
    for _ in 0..6 {
        assert_eq!(s.until("\n\n").await, ":\n\n");
    }
}

#[tokio::test]
async fn refusals_have_a_reason() {
    let (_p, _c, w, _h) =
        standalone(&["--token-secret", SECRET, "--allowed-origins", "https://ok.example", "--max-connections", "1"])
            .await;
    let get =
        |path: &'static str, origin: &'static str| async move { http(w, "GET", path, &[("Origin", origin)], "").await };
    let (status, body) = get("/events?token=nonsense", "https://ok.example").await;
    assert!(status == 401 && body.contains("malformed"), "{status} {body}");
    assert_eq!(get("/events", "https://evil.example").await.0, 403);
    assert_eq!(http(w, "GET", "/events", &[], "").await.0, 403, "no Origin, when origins are restricted");
    // An allowed origin gets a stream, its origin echoed for the browser.
    let mut raw = TcpStream::connect(("127.0.0.1", w)).await.expect("connect");
    raw.write_all(b"GET /events HTTP/1.1\r\nHost: x\r\nOrigin: https://ok.example\r\n\r\n").await.expect("write");
    let mut head = vec![0u8; 1024];
    let n = tokio::time::timeout(WAIT, raw.read(&mut head)).await.expect("head").expect("read");
    let head = String::from_utf8_lossy(&head[..n]);
    assert!(head.contains("Access-Control-Allow-Origin: https://ok.example"), "{head}");
    // It holds the one connection slot.
    assert_eq!(get("/events", "https://ok.example").await.0, 503);
}

/// An event stream served by the HTTP stack counts as a connection, not as an HTTP request: with
/// room for two requests at a time, four streams are open and a request is still answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_through_the_http_stack_do_not_hold_request_slots() {
    let (_p, _c, w, _h) = standalone(&["--max-handshakes", "2"]).await;
    // A connection that just closed (the start-up probes, say) holds its slot until the gateway
    // sees it gone: a refusal is tried again for a while. Streams holding slots never give them
    // back, so without the release the third stream would never open.
    async fn soon<T: Send + 'static>(f: impl Fn() -> tokio::task::JoinHandle<T>) -> T {
        for _ in 0..50 {
            if let Ok(t) = f().await {
                return t;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("refused for 5 s");
    }
    let mut streams = Vec::new();
    for _ in 0..4 {
        streams.push(soon(|| tokio::spawn(Stream::open(w, "", 2))).await);
    }
    assert_eq!(soon(|| tokio::spawn(http_get(w, "/healthz"))).await.0, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_that_stops_reading_is_cut_off_alone() {
    // The stalled stream on the fast path, then on the HTTP stack's (its request in pieces).
    for pieces in [1, 2] {
        stalled_stream_is_cut_off(pieces).await;
    }
}

async fn stalled_stream_is_cut_off(pieces: usize) {
    let (_p, _c, w, h) = standalone(&["--outbound-queue-bytes", "524288"]).await;
    let mut reader = Stream::open(w, "", 1).await;
    let stalled = Stream::open(w, "", pieces).await; // never read from again
    let content = "y".repeat(8 * 1024);
    let n = 600; // 4.8 MB: more than the socket buffers and the 512 KiB queue hold
    let len = content.len();
    let reading = tokio::spawn(async move {
        for got in 0..n {
            let e = reader.event().await.unwrap_or_else(|| panic!("event {got}"));
            assert_eq!(e.len(), len);
        }
    });
    let publishing = async {
        for _ in 0..n {
            assert_eq!(http(h, "POST", "/", &[], &format!("content={content}")).await.0, 200);
        }
    };
    publishing.await;
    reading.await.expect("the reading client got every event");
    assert_eq!(metric(w, "pushwire_slow_consumer_disconnects_total").await, 1);
    drop(stalled);
}

/// A JSON event stream resumes as `EventSource` does: each event with a position carries it as
/// its id; a new request with `Last-Event-ID` gets what was published since, then
/// `recovered:true`, then live events. A `Last-Event-ID` that is not a position is ignored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn last_event_id_resumes_a_json_stream() {
    let (_p, _c, w, h) = standalone(&[]).await;
    async fn open(gw: u16, last: Option<&str>) -> (TcpStream, String) {
        let mut s = TcpStream::connect(("127.0.0.1", gw)).await.expect("connect");
        let header = last.map(|l| format!("Last-Event-ID: {l}\r\n")).unwrap_or_default();
        let req = format!("GET /events?format=json HTTP/1.1\r\nHost: x\r\n{header}\r\n");
        s.write_all(req.as_bytes()).await.expect("write");
        (s, String::new())
    }
    /// The next event as (id, data).
    async fn next(s: &mut TcpStream, buf: &mut String) -> (Option<String>, String) {
        loop {
            if let Some(i) = buf.find("\n\n") {
                let block: String = buf.drain(..i + 2).collect();
                let block = block.rsplit("\r\n\r\n").next().unwrap_or_default().to_owned();
                let id = block.lines().find_map(|l| l.strip_prefix("id: ")).map(str::to_owned);
                let data: Vec<&str> = block.lines().filter_map(|l| l.strip_prefix("data: ")).collect();
                if !data.is_empty() {
                    return (id, data.join("\n"));
                }
                continue;
            }
            let mut chunk = vec![0u8; 16 * 1024];
            let n = tokio::time::timeout(WAIT, s.read(&mut chunk)).await.expect("read timed out").expect("read");
            assert!(n > 0, "stream ended: {buf:?}");
            buf.push_str(&String::from_utf8_lossy(&chunk[..n]));
        }
    }
    let (mut s, mut buf) = open(w, None).await;
    let (_, welcome) = next(&mut s, &mut buf).await;
    assert!(welcome.contains("\"worker_id\""), "{welcome}");
    assert_eq!(http_get(h, "/?content=one").await.0, 200);
    let (id, data) = next(&mut s, &mut buf).await;
    let v: serde_json::Value = serde_json::from_str(&data).expect("JSON event");
    let id = id.expect("an id");
    assert_eq!(id, format!("broadcast:{}:{}", v["epoch"].as_str().expect("epoch"), v["offset"]));
    drop(s);
    for c in ["two", "three"] {
        assert_eq!(http_get(h, &format!("/?content={c}")).await.0, 200);
    }
    let (mut s, mut buf) = open(w, Some(&id)).await;
    let mut got = Vec::new();
    for _ in 0..4 {
        got.push(next(&mut s, &mut buf).await.1);
    }
    assert!(got[0].contains("\"worker_id\""));
    let data: Vec<String> = got[1..3]
        .iter()
        .map(|d| serde_json::from_str::<serde_json::Value>(d).expect("JSON")["data"].to_string())
        .collect();
    assert_eq!(data, ["\"two\"", "\"three\""]);
    assert_eq!(got[3], r#"{"channel":"broadcast","recovered":true}"#);
    assert_eq!(http_get(h, "/?content=four").await.0, 200);
    assert!(next(&mut s, &mut buf).await.1.contains("\"four\""));
    // Whatever else a Last-Event-ID says, the stream opens.
    let (mut s, mut buf) = open(w, Some("not-a-position")).await;
    assert!(next(&mut s, &mut buf).await.1.contains("\"worker_id\""));
}
