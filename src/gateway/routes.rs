//! The gateway's HTTP routes besides the upgrade: the demo page, `/healthz` and `/metrics`.

use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{self, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};

use super::Gateway;
use crate::http::reply as text;
use crate::metrics::GLOBAL;
use std::sync::atomic::Ordering;

impl Gateway {
    pub(super) fn route(self: &Arc<Self>, req: Request<Incoming>) -> Response<Full<Bytes>> {
        let mut r = self.answer(req);
        // No keep-alive here: a browser would send its next request, an EventSource's say, on
        // the pooled connection, where only this HTTP stack listens; a fresh connection reaches
        // the handshake that serves event streams and WebSockets without it.
        if r.status() != StatusCode::SWITCHING_PROTOCOLS {
            r.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        r
    }

    fn answer(self: &Arc<Self>, req: Request<Incoming>) -> Response<Full<Bytes>> {
        let upgrade =
            req.headers().get(header::UPGRADE).is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"websocket"));
        match (req.method(), req.uri().path(), upgrade) {
            (&Method::GET, _, true) => self.upgrade(req),
            (&Method::GET, "/", false) => text(StatusCode::OK, "text/html; charset=utf-8", crate::page::INDEX),
            (&Method::GET, crate::sse::PATH, false) => self.events_refused(&req),
            (&Method::GET, "/healthz", _) => self.health(),
            (&Method::GET, "/metrics", _) => {
                let workers: u64 = self.workers.iter().map(|w| w.connections() as u64).sum();
                let body = crate::metrics::render(&[
                    ("ws_connections", "open WebSocket connections", self.connections() as u64),
                    ("ws_registered", "connections in worker tables", workers),
                    ("broker_connected", "1 when the broker link is up", self.broker.is_connected() as u64),
                    ("broker_reconnects", "broker link re-establishments", self.broker.reconnects()),
                ]);
                text(StatusCode::OK, "text/plain; version=0.0.4", body)
            }
            (&Method::GET, _, false) => text(StatusCode::NOT_FOUND, "text/plain", "not found\n"),
            _ => {
                let mut r = text(StatusCode::METHOD_NOT_ALLOWED, "text/plain", "only GET is served here\n");
                r.headers_mut().insert(header::ALLOW, HeaderValue::from_static("GET"));
                r
            }
        }
    }

    /// An event stream request the fast path did not take: say why.
    fn events_refused(self: &Arc<Self>, req: &Request<Incoming>) -> Response<Full<Bytes>> {
        match self.admit(req.headers().get(header::ORIGIN).map(HeaderValue::as_bytes), req.uri().query(), None) {
            Err(refusal) => refusal.answer(),
            Ok(_) => {
                GLOBAL.ws_connections_refused.fetch_add(1, Ordering::Relaxed);
                text(StatusCode::BAD_REQUEST, "text/plain", "the request head did not arrive whole within 1 s\n")
            }
        }
    }

    fn health(&self) -> Response<Full<Bytes>> {
        if self.broker.is_connected() {
            text(StatusCode::OK, "text/plain", "ok\n")
        } else {
            text(StatusCode::SERVICE_UNAVAILABLE, "text/plain", "broker unreachable\n")
        }
    }
}
