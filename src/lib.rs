//! pushwire: distributed WebSocket push, wire-compatible with Workerman's Channel.
//!
//! ```text
//!   browsers ──ws──▶ gateway (4236) ── workers NODE-0, NODE-1 …
//!                        ▲ subscribe(worker id, "broadcast")
//!                        │
//!                     broker ◀── channel server (2206, Workerman protocol) or in-process hub
//!                        ▲ publish(worker id | "broadcast", data)
//!                        │
//!   curl/apps ──http──▶ publisher (4237)
//! ```
//!
//! Layout:
//! - [`channel_proto`] (its own crate): frames and PHP values, no I/O.
//! - [`hub`]: subscriptions, round-robin, queues; [`channel_server`] serves it over TCP/Unix.
//! - [`broker`]: the [`Broker`](broker::Broker) trait and its backends: in-process, the channel
//!   protocol (our own link loop), Redis and NATS (maintained client libraries under one managed
//!   link); [`message`]: what travels through them.
//! - [`gateway`]: WebSocket workers and fan-out; [`ws`]: the WebSocket wire format;
//!   [`protocol`]: the client protocols a gateway speaks (the seed's, an echo for conformance).
//! - [`publisher`]: the HTTP publish API; [`push`]: the seed's event payloads.
//! - [`cli`]: flags and wiring; [`config`]: the TOML settings file; [`metrics`], [`io`]: small shared pieces.
//!
//! See `docs/ARCHITECTURE.md` for the whole picture.

pub mod broker;
pub mod channel_ext;
pub mod channel_server;
pub mod cli;
pub mod cluster;
pub mod config;
pub mod deflate;
pub mod gateway;
pub mod history;
pub mod http;
pub mod hub;
pub mod io;
pub mod message;
pub mod metrics;
pub mod page;
pub mod protocol;
pub mod publisher;
pub mod sse;
pub mod status;
pub mod tls;
pub mod tracker;
pub mod webhook;
pub mod ws;
