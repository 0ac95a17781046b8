//! pushwire: distributed WebSocket push, wire-compatible with Workerman's Channel.
//!
//! ```text
//!  publisher (4237) ── publish(channel, payload, keep) ──▶ broker (channel server 2206,
//!                                                           Redis, NATS, memory)
//!  gateway (4236), per worker:      push out ▼                      ▲ client message in
//!    control   requests on the worker's control channel, presence heartbeats
//!    engine    members of the channel, offsets and gaps, recovery, one frame per kind
//!    protocol  native (the seed's, format=json, recover=, tokens) │ echo
//!    transport per-connection bounded queue, WebSocket / SSE, deflate, TLS
//!  browsers ◀── frames                                               ── messages ──▶
//! ```
//!
//! - Transport: [`ws`], [`deflate`], [`sse`], [`tls`], [`http`], [`io`]; the gateway's
//!   connection queue, wire and handshake ([`gateway`]).
//! - Engine: the gateway's workers ([`gateway`]): membership, continuity, recovery, fan-out.
//! - Protocol: [`protocol`] (its `native` module holds the seed's payloads, JSON messages and
//!   tokens).
//! - Broker: [`broker`] (the trait, in-process, the Channel link, Redis, NATS), [`message`],
//!   [`history`]; the Channel server: [`hub`], [`channel_server`], [`channel_ext`] and the
//!   `channel_proto` crate (frames and PHP values, no I/O).
//! - Control: [`cluster`] (what nodes say to each other), [`tracker`], [`webhook`], [`status`].
//! - [`publisher`]: the HTTP publish API; [`cli`], [`config`]: flags, settings file and wiring;
//!   [`metrics`], [`page`].
//!
//! `docs/ARCHITECTURE.md` shows the whole system on one screen.

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
