//! The gateway's HTTP routes: the demo page, `/healthz`, `/metrics`, the WebSocket upgrade and
//! event streams that did not take the fast path (any request over TLS, or one that arrived in
//! pieces).

use std::sync::Arc;

use bytes::Bytes;
use http_body_util::{Either, Full};
use hyper::body::Incoming;
use hyper::header::{self, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};

use super::handshake::Choice;
use super::wire::Wire;
use super::Gateway;
use crate::http::{reply as text, Streamed};

/// Chunks of an event stream served by hyper that wait for it to write them (the connection's
/// own queue, bounded by `--outbound-queue`, holds the rest).
const STREAM_CHUNKS: usize = 16;

/// A gateway response: whole, or an event stream.
pub(super) type Answer = Response<Either<Full<Bytes>, Streamed>>;

impl Gateway {
    pub(super) fn route(self: &Arc<Self>, req: Request<Incoming>) -> Answer {
        let upgrade =
            req.headers().get(header::UPGRADE).is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"websocket"));
        let mut r = match (req.method(), req.uri().path(), upgrade) {
            (&Method::GET, crate::sse::PATH, false) => self.events(&req),
            _ => self.respond(req, upgrade).map(Either::Left),
        };
        // No keep-alive here: a browser would send its next request, an EventSource's say, on
        // the pooled connection, where only this HTTP stack listens; a fresh connection reaches
        // the handshake that serves event streams and WebSockets with the least memory.
        if r.status() != StatusCode::SWITCHING_PROTOCOLS {
            r.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        r
    }

    fn respond(self: &Arc<Self>, req: Request<Incoming>, upgrade: bool) -> Response<Full<Bytes>> {
        match (req.method(), req.uri().path(), upgrade) {
            (&Method::GET, _, true) => self.upgrade(req),
            (&Method::GET, "/", false) => text(StatusCode::OK, "text/html; charset=utf-8", crate::page::INDEX),
            (&Method::GET, "/healthz", _) => crate::http::health(self.broker.is_connected()),
            (&Method::GET, "/metrics", _) => {
                let workers: u64 = self.workers.iter().map(|w| w.connections() as u64).sum();
                let broker = (self.broker.is_connected(), self.broker.reconnects());
                crate::http::metrics(
                    broker,
                    self.cfg.tls.as_deref(),
                    &[
                        ("ws_connections", "open WebSocket connections", self.connections() as u64),
                        ("ws_registered", "connections in worker tables", workers),
                    ],
                )
            }
            (&Method::GET, _, false) => text(StatusCode::NOT_FOUND, "text/plain", "not found\n"),
            _ => {
                let mut r = text(StatusCode::METHOD_NOT_ALLOWED, "text/plain", "only GET is served here\n");
                r.headers_mut().insert(header::ALLOW, HeaderValue::from_static("GET"));
                r
            }
        }
    }

    /// An event stream through this HTTP stack: its connection is served like any other, its
    /// events written to the response body.
    fn events(self: &Arc<Self>, req: &Request<Incoming>) -> Answer {
        let origin = req.headers().get(header::ORIGIN).map(HeaderValue::as_bytes);
        let last_event_id = req.headers().get("last-event-id").and_then(|v| v.to_str().ok());
        let (wants, open) = match self.admit(origin, req.uri().query(), last_event_id, &mut Choice::Native) {
            Ok(admitted) => admitted,
            Err(refusal) => return refusal.response().map(Either::Left),
        };
        // Counted as a connection from now on, no longer as an HTTP request (like an upgrade).
        crate::http::Slot::release(req);
        let (tx, rx) = tokio::sync::mpsc::channel(STREAM_CHUNKS);
        tokio::spawn(open.run_sse(Wire::Body(tx), None, wants));
        let mut r = Response::new(Either::Right(Streamed(rx)));
        for (k, v) in crate::sse::headers(self.allow_origin(origin).as_deref()) {
            if let Ok(v) = HeaderValue::from_str(v) {
                r.headers_mut().insert(k, v);
            }
        }
        r
    }
}
