//! The WebSocket handshake. A complete upgrade request found by peeking at a new socket is
//! answered here without the HTTP stack (no per-connection HTTP state: what keeps an idle
//! connection near 1.5 kB); anything else goes through hyper, which answers errors and unusual
//! requests properly. Event streams (`GET /events`) take the same two paths. Both paths check the
//! key, the version, the origin, the token and the connection limit ([`Gateway::admit`]).

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{self, HeaderValue};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;
use tokio_rustls::server::TlsStream;

use super::wire::Wire;
use super::{Gateway, OpenGuard};
use crate::http::reply as text;
use crate::metrics::GLOBAL;
use crate::protocol::native::token::TokenError;
use crate::protocol::native::Wants;
use crate::protocol::pusher::{self, Pusher};
use crate::protocol::{echo::Echo, Native};

/// The protocol a WebSocket client gets, chosen by the path of its upgrade.
pub(super) enum Choice {
    Native,
    Echo,
    Pusher(Box<pusher::Session>),
}
use crate::ws;

impl Gateway {
    pub(super) fn upgrade(self: &Arc<Self>, req: Request<Incoming>) -> Response<Full<Bytes>> {
        let h = req.headers();
        let Some(key) = h.get("sec-websocket-key") else {
            GLOBAL.bad_requests.fetch_add(1, Ordering::Relaxed);
            return text(StatusCode::BAD_REQUEST, "text/plain", "missing Sec-WebSocket-Key\n");
        };
        if h.get("sec-websocket-version").map(HeaderValue::as_bytes) != Some(b"13") {
            GLOBAL.bad_requests.fetch_add(1, Ordering::Relaxed);
            let mut r = text(StatusCode::UPGRADE_REQUIRED, "text/plain", "only WebSocket version 13 is supported\n");
            r.headers_mut().insert("sec-websocket-version", HeaderValue::from_static("13"));
            return r;
        }
        let mut choice = self.choose(req.uri().path(), req.uri().query());
        let origin = h.get(header::ORIGIN).map(HeaderValue::as_bytes);
        let (wants, open) = match self.admit(origin, req.uri().query(), None, &mut choice) {
            Ok(admitted) => admitted,
            Err(refusal) => return refusal.response(),
        };
        let accept = ws::accept_key(key.as_bytes());
        let deflate = self.deflate(h.get_all("sec-websocket-extensions").iter().filter_map(|v| v.to_str().ok()));
        // Only the upgrade future goes into the connection's task, not the whole request: the
        // task lives as long as the connection.
        let on_upgrade = hyper::upgrade::on(req);
        tokio::spawn(async move {
            let upgraded = match on_upgrade.await {
                Ok(u) => u,
                Err(e) => return tracing::debug!("websocket upgrade failed: {e}"),
            };
            // Copy what hyper read past the handshake and let its read buffer go: `read_buf` is a
            // view into hyper's whole buffer, which would otherwise live as long as the connection.
            let (wire, leftover) = match upgraded.downcast::<TokioIo<TcpStream>>() {
                Ok(p) => (Wire::Tcp(Arc::new(p.io.into_inner())), BytesMut::from(&p.read_buf[..])),
                Err(upgraded) => match upgraded.downcast::<TokioIo<TlsStream<TcpStream>>>() {
                    Ok(p) => (Wire::Tls(Box::new(p.io.into_inner())), BytesMut::from(&p.read_buf[..])),
                    Err(_) => return tracing::error!("websocket upgrade gave an unexpected stream type"),
                },
            };
            match choice {
                Choice::Echo => open.run::<Echo>(wire, None, leftover, (None, ()), deflate).await,
                Choice::Native => open.run::<Native>(wire, None, leftover, (wants, ()), deflate).await,
                Choice::Pusher(s) => open.run::<Pusher>(wire, None, leftover, (None, s), deflate).await,
            }
        });
        let mut r = Response::new(Full::new(Bytes::new()));
        *r.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
        let hs = r.headers_mut();
        hs.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        hs.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
        if let Ok(v) = HeaderValue::from_bytes(&accept) {
            hs.insert("sec-websocket-accept", v);
        }
        if deflate {
            hs.insert("sec-websocket-extensions", HeaderValue::from_static(crate::deflate::RESPONSE));
        }
        r
    }

    /// The protocol of a WebSocket client on `path` asking with `query`: echo on `--echo-path`,
    /// Pusher on `/app/KEY` when the gateway serves apps, native on every other path.
    fn choose(&self, path: &str, query: Option<&str>) -> Choice {
        if self.cfg.echo_path.as_deref() == Some(path) {
            return Choice::Echo;
        }
        match path.strip_prefix("/app/") {
            Some(key) if !self.cfg.apps.is_empty() => {
                Choice::Pusher(Box::new(pusher::Session::admit(&self.cfg.apps, key, query)))
            }
            _ => Choice::Native,
        }
    }

    /// Whether a client whose `Sec-WebSocket-Extensions` headers are `headers` gets
    /// permessage-deflate.
    fn deflate<'h>(&self, mut headers: impl Iterator<Item = &'h str>) -> bool {
        self.cfg.compression.is_some() && headers.any(crate::deflate::accepts)
    }

    /// Whether a connection (WebSocket or event stream) from `origin` asking with `query` (and,
    /// for an event stream, its `Last-Event-ID`) may open: who it is and what it wants (for the
    /// native protocol; `native` false: a protocol that reads neither), and its connection slot.
    pub(super) fn admit(
        self: &Arc<Self>,
        origin: Option<&[u8]>,
        query: Option<&str>,
        last_event_id: Option<&str>,
        choice: &mut Choice,
    ) -> Result<(Option<Box<Wants>>, OpenGuard), Refusal> {
        if !self.origin_allowed(origin) {
            return Err(Refusal::Origin(String::from_utf8_lossy(origin.unwrap_or_default()).into_owned()));
        }
        let wants = if matches!(choice, Choice::Native) { self.wants(query, last_event_id)? } else { None };
        let open = match (self.open_slot(), choice) {
            (Some(open), _) => open,
            // A Pusher client is told in its protocol (4100: over capacity, try later), on a
            // connection that ends as soon as it is told.
            (None, Choice::Pusher(session)) => {
                session.over_capacity();
                self.open.fetch_add(1, Ordering::AcqRel);
                OpenGuard(self.clone())
            }
            (None, _) => return Err(Refusal::Full),
        };
        Ok((wants, open))
    }

    /// Who the connection asking with `query` is (its `token`) and what it wants; `None` for a
    /// seed client (boxed: it travels in the connection's long-lived task).
    fn wants(&self, query: Option<&str>, last_event_id: Option<&str>) -> Result<Option<Box<Wants>>, Refusal> {
        let token = form_urlencoded::parse(query.unwrap_or_default().as_bytes())
            .find_map(|(k, v)| (k == "token").then(|| v.into_owned()));
        let who = self.cfg.tokens.identify(token.as_deref()).map_err(Refusal::Token)?;
        let wants = Wants::parse(query, who, last_event_id).map_err(Refusal::BadRequest)?;
        Ok((wants != Wants::default()).then(|| Box::new(wants)))
    }

    /// What an event stream's `Access-Control-Allow-Origin` says to a browser from `origin`
    /// (already allowed): any origin when all are allowed, else its own.
    pub(super) fn allow_origin(&self, origin: Option<&[u8]>) -> Option<String> {
        let origin = std::str::from_utf8(origin?).ok()?;
        Some(if self.cfg.allowed_origins.is_empty() { "*" } else { origin }.to_owned())
    }

    pub(super) fn origin_allowed(&self, origin: Option<&[u8]>) -> bool {
        let origin = origin.unwrap_or_default();
        self.cfg.allowed_origins.is_empty() || self.cfg.allowed_origins.iter().any(|a| a.as_bytes() == origin)
    }

    /// Take a connection slot, if the gateway is below its limit.
    pub(super) fn open_slot(self: &Arc<Self>) -> Option<OpenGuard> {
        if self.open.fetch_add(1, Ordering::AcqRel) >= self.cfg.max_connections {
            self.open.fetch_sub(1, Ordering::AcqRel);
            return None;
        }
        Some(OpenGuard(self.clone()))
    }

    /// The WebSocket handshake without the HTTP stack, when the whole request is already in the
    /// socket and is an upgrade this gateway accepts: no per-connection HTTP state, which matters
    /// with tens of thousands of clients. Anything else is handed back (`Some`) to hyper, which
    /// answers errors and unusual requests properly.
    pub(super) async fn fast_upgrade(self: Arc<Self>, mut stream: TcpStream) -> Option<TcpStream> {
        let mut head = vec![0u8; 2048];
        let n = match tokio::time::timeout(Duration::from_secs(1), stream.peek(&mut head)).await {
            Ok(Ok(n)) => n,
            _ => return Some(stream),
        };
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut req = httparse::Request::new(&mut headers);
        let Ok(httparse::Status::Complete(len)) = req.parse(&head[..n]) else { return Some(stream) };
        let get = |name: &str| req.headers.iter().find(|h| h.name.eq_ignore_ascii_case(name)).map(|h| h.value);
        let (path, query) = match req.path.map(|p| p.split_once('?').unwrap_or((p, ""))) {
            Some((p, q)) => (p, (!q.is_empty()).then_some(q)),
            None => return Some(stream),
        };
        let origin = get("origin");
        let sse = path == crate::sse::PATH && req.method == Some("GET");
        let upgrade = get("upgrade").is_some_and(|v| v.eq_ignore_ascii_case(b"websocket"));
        let key = match (get("sec-websocket-key"), get("sec-websocket-version")) {
            (Some(key), Some(b"13")) if req.method == Some("GET") && upgrade => Some(key),
            _ => None,
        };
        if !sse && key.is_none() {
            return Some(stream);
        }
        // Refusals (origin, token, the connection limit) are answered, with the reason, by the
        // HTTP path.
        let last_event_id = get("last-event-id").filter(|_| sse).and_then(|v| std::str::from_utf8(v).ok());
        let mut choice = if sse { Choice::Native } else { self.choose(path, query) };
        let Ok((wants, open)) = self.admit(origin, query, last_event_id, &mut choice) else { return Some(stream) };
        let offers = req.headers.iter().filter(|h| h.name.eq_ignore_ascii_case("sec-websocket-extensions"));
        let deflate = !sse && self.deflate(offers.filter_map(|h| std::str::from_utf8(h.value).ok()));
        let opening = match key {
            Some(key) if !sse => Opening::Upgrade { accept: ws::accept_key(key), deflate },
            _ => Opening::Events(self.allow_origin(origin).map(String::into_boxed_str)),
        };
        // The request is taken off the socket (it was only peeked at); the answer goes out with
        // the welcome, in one write by the connection's task.
        let mut consumed = vec![0u8; len];
        let read = tokio::time::timeout(crate::http::HEADER_TIMEOUT, stream.read_exact(&mut consumed)).await;
        if read.is_ok_and(|r| r.is_ok()) {
            // A task of its own, sized for the connection alone, not for this HTTP accept path.
            let opening = Some(Box::new(opening));
            let wire = Wire::Tcp(Arc::new(stream));
            match (sse, choice) {
                (true, _) => tokio::spawn(open.run_sse(wire, opening, wants)),
                (false, Choice::Echo) => {
                    tokio::spawn(open.run::<Echo>(wire, opening, BytesMut::new(), (None, ()), deflate))
                }
                (false, Choice::Native) => {
                    tokio::spawn(open.run::<Native>(wire, opening, BytesMut::new(), (wants, ()), deflate))
                }
                (false, Choice::Pusher(s)) => {
                    tokio::spawn(open.run::<Pusher>(wire, opening, BytesMut::new(), (None, s), deflate))
                }
            };
        }
        None
    }
}

/// The handshake's answer when the fast path leaves it to the connection's task, which writes it
/// with the welcome (one write, one packet) and builds it there, so that nothing allocated for
/// the handshake outlives the handshake's own task. Boxed, and `None` once sent: it is an
/// argument of the connection's long-lived future, where every byte counts.
pub(super) enum Opening {
    /// `101 Switching Protocols` with this `Sec-WebSocket-Accept`, permessage-deflate or not.
    Upgrade { accept: [u8; 28], deflate: bool },
    /// An event stream's `200`, with its `Access-Control-Allow-Origin`.
    Events(Option<Box<str>>),
}

impl Opening {
    /// `opening` (unless already sent) followed by `welcome`, as one buffer.
    pub(super) fn then(opening: Option<Box<Opening>>, welcome: Bytes) -> Bytes {
        let Some(opening) = opening else { return welcome };
        let mut out = BytesMut::with_capacity(160 + welcome.len());
        match *opening {
            Opening::Upgrade { accept, deflate } => {
                out.extend_from_slice(
                    b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: ",
                );
                out.extend_from_slice(&accept);
                out.extend_from_slice(b"\r\n");
                if deflate {
                    out.extend_from_slice(b"Sec-WebSocket-Extensions: ");
                    out.extend_from_slice(crate::deflate::RESPONSE.as_bytes());
                    out.extend_from_slice(b"\r\n");
                }
                out.extend_from_slice(b"\r\n");
            }
            Opening::Events(origin) => out.extend_from_slice(&crate::sse::response_head(origin.as_deref())),
        }
        out.extend_from_slice(&welcome);
        out.freeze()
    }
}

/// Why a connection may not open.
pub(super) enum Refusal {
    Origin(String),
    Token(TokenError),
    BadRequest(String),
    Full,
}

impl Refusal {
    /// The HTTP answer (counted as a refused connection).
    pub(super) fn response(self) -> Response<Full<Bytes>> {
        GLOBAL.ws_connections_refused.fetch_add(1, Ordering::Relaxed);
        match self {
            Refusal::Origin(o) => text(StatusCode::FORBIDDEN, "text/plain", format!("origin {o:?} is not allowed\n")),
            Refusal::Token(e) => text(StatusCode::UNAUTHORIZED, "text/plain", format!("{e}\n")),
            Refusal::BadRequest(e) => text(StatusCode::BAD_REQUEST, "text/plain", format!("{e}\n")),
            Refusal::Full => {
                let mut r = text(StatusCode::SERVICE_UNAVAILABLE, "text/plain", "gateway is at its connection limit\n");
                r.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static("5"));
                r
            }
        }
    }
}
