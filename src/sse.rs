//! Server-Sent Events (the WHATWG HTML "server-sent events" format), as much as a push gateway
//! needs: the response head of `GET /events`, one event per push, and comments as heartbeats.
//!
//! An event is one `data:` line per line of the push, then an empty line, so that `EventSource`
//! hands the page exactly the text a WebSocket client gets (line breaks `\r\n` and `\r` arrive as
//! `\n`: the format knows only lines). Like a WebSocket frame, an encoded event is the same bytes
//! for every client and is shared across a fan-out. Written without the HTTP stack, the body is the
//! raw stream until the connection closes (`Connection: close`, no chunking); served by hyper (over
//! TLS, or when the request came in pieces) it is chunked. Every `EventSource` and proxy reads both.

use bytes::{BufMut, Bytes, BytesMut};

/// The path SSE clients ask for.
pub const PATH: &str = "/events";

/// The event carrying `content`.
pub fn event(content: &[u8]) -> Bytes {
    event_with_id(content, None)
}

/// The event carrying `content`, with an `id` (the position `EventSource` sends back as
/// `Last-Event-ID` when it reconnects).
pub fn event_with_id(content: &[u8], id: Option<&str>) -> Bytes {
    let text = String::from_utf8_lossy(content);
    let mut out = BytesMut::with_capacity(text.len() + 16 + id.map_or(0, |i| i.len() + 5));
    if let Some(id) = id {
        out.put_slice(b"id: ");
        out.put_slice(id.as_bytes());
        out.put_u8(b'\n');
    }
    // Most pushes are one line: found with the standard library's memchr, not a scan of our own.
    if !text.as_bytes().contains(&b'\n') && !text.as_bytes().contains(&b'\r') {
        out.put_slice(b"data: ");
        out.put_slice(text.as_bytes());
        out.put_slice(b"\n\n");
        return out.freeze();
    }
    for line in text.split("\r\n").flat_map(|l| l.split(['\r', '\n'])) {
        out.put_slice(b"data: ");
        out.put_slice(line.as_bytes());
        out.put_u8(b'\n');
    }
    out.put_u8(b'\n');
    out.freeze()
}

/// A comment: ignored by clients, it keeps proxies from closing an idle stream.
pub fn heartbeat() -> Bytes {
    Bytes::from_static(b":\n\n")
}

/// The headers of the `200` answer besides its framing; `allow_origin` is echoed for browsers
/// on other origins.
pub fn headers(allow_origin: Option<&str>) -> Vec<(&'static str, &str)> {
    let mut h = vec![("Content-Type", "text/event-stream"), ("Cache-Control", "no-cache"), ("X-Accel-Buffering", "no")];
    if let Some(o) = allow_origin {
        h.extend([("Access-Control-Allow-Origin", o), ("Vary", "Origin")]);
    }
    h
}

/// The head of the `200` answer written without the HTTP stack: the body is the raw stream until
/// the connection closes.
pub fn response_head(allow_origin: Option<&str>) -> Vec<u8> {
    let mut head = String::from("HTTP/1.1 200 OK\r\n");
    for (k, v) in headers(allow_origin) {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("Connection: close\r\n\r\n");
    head.into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events() {
        assert_eq!(&event(b"hi")[..], b"data: hi\n\n");
        assert_eq!(&event(b"")[..], b"data: \n\n");
        // The welcome line ends with a line break: EventSource gives back "...connected\n".
        assert_eq!(&event(b"a connected\n")[..], b"data: a connected\ndata: \n\n");
        assert_eq!(&event(b"a\r\nb\rc\nd")[..], b"data: a\ndata: b\ndata: c\ndata: d\n\n");
        assert_eq!(&event(b"\xff")[..], "data: \u{fffd}\n\n".as_bytes());
        let head = String::from_utf8(response_head(Some("https://a.example"))).unwrap();
        assert!(head.starts_with("HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"), "{head}");
        assert!(head
            .ends_with("Access-Control-Allow-Origin: https://a.example\r\nVary: Origin\r\nConnection: close\r\n\r\n"));
        assert_eq!(&event_with_id(b"x", Some("topic:a:ab12:7"))[..], b"id: topic:a:ab12:7\ndata: x\n\n");
    }
}
