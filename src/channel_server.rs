//! The Channel server: Workerman's Channel protocol over TCP or a Unix socket, backed by a [`Hub`].
//!
//! Each connection is one task that reads frames and writes what the hub queued for it. A frame
//! that cannot be decoded, or a request the hub refuses, is logged and closes that connection only.
//!
//! **Strangers.** With a secret, a new connection is a stranger until its first frame, a small
//! `auth`, proves the secret, within a short deadline. Strangers are capped on their own
//! (`max_unauthenticated`) and take none of the `max_connections` slots. When the stranger slots
//! are full, a new connection still gets [`LATE_AUTH_TIMEOUT`] to authenticate (as many again at
//! most): a node sends its secret as soon as it connects, so connections that never send anything
//! cannot keep an authenticated node out.

use std::collections::VecDeque;
use std::future::Future;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use channel_proto::{frame, FrameError, MessageError, Request};
use tokio::io::AsyncReadExt;
use tokio::sync::{mpsc, Semaphore};

use crate::hub::{Hub, HubError, Sink};
use crate::io::{write_frames, Listener, Stream};
use crate::metrics::LogEvery;

/// Settings of a channel server.
#[derive(Debug, Clone)]
pub struct ChannelConfig {
    /// Largest frame accepted, header included.
    pub max_frame: usize,
    /// When set, every client's first frame must be `auth` with this secret.
    pub secret: Option<String>,
    /// Frames queued for one client before it counts as a slow consumer and is cut off.
    pub outbound_queue: usize,
    /// Most simultaneous (authenticated) connections; more are closed at once.
    pub max_connections: usize,
    /// With a secret: most connections that have not authenticated yet; more are closed at once.
    pub max_unauthenticated: usize,
    /// With a secret: how long a new connection has to authenticate.
    pub auth_timeout: Duration,
    /// How long one write to a client may block.
    pub write_timeout: Duration,
    /// After start, publishes are held this long before they are routed, so that subscribers
    /// reconnecting after a restart are back before any publish is confirmed.
    pub settle: Duration,
}

impl Default for ChannelConfig {
    fn default() -> Self {
        ChannelConfig {
            max_frame: channel_proto::DEFAULT_MAX_FRAME,
            secret: None,
            outbound_queue: 4096,
            max_connections: 10_000,
            max_unauthenticated: 1024,
            auth_timeout: Duration::from_secs(3),
            write_timeout: Duration::from_secs(10),
            settle: Duration::from_secs(3),
        }
    }
}

/// Why one channel connection was closed.
#[derive(Debug, thiserror::Error)]
enum ConnError {
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    #[error("bad frame: {0}")]
    Frame(#[from] FrameError),
    #[error("bad message: {0}")]
    Message(#[from] MessageError),
    #[error("refused: {0}")]
    Hub(#[from] HubError),
    #[error("wrong secret")]
    BadSecret,
    #[error("did not authenticate within {0:?}")]
    AuthTimeout(Duration),
    #[error("write blocked for more than {0:?}")]
    WriteTimeout(Duration),
    #[error("not reading its messages (slow consumer)")]
    Slow,
}

/// Largest frame a connection may send before it has authenticated: an `auth` request.
pub const MAX_AUTH_FRAME: usize = 4096;
/// How long a connection arriving while every stranger slot is taken has to authenticate.
pub const LATE_AUTH_TIMEOUT: Duration = Duration::from_secs(1);

/// Warnings about refused connections: at most one line per interval.
static REFUSED_LOG: LogEvery = LogEvery::new(Duration::from_secs(10));
/// Warnings about connections closed for a backend that did not take their request.
static BACKEND_LOG: LogEvery = LogEvery::new(Duration::from_secs(10));

/// Serve the Channel protocol on `listener` until `shutdown` resolves.
pub async fn run(listener: Listener, hub: Arc<Hub>, cfg: ChannelConfig, shutdown: impl Future<Output = ()>) {
    let settled = tokio::time::Instant::now() + cfg.settle;
    let cfg = Arc::new(cfg);
    let slots = Arc::new(Semaphore::new(cfg.max_connections));
    let strangers = Arc::new(Semaphore::new(cfg.max_unauthenticated));
    let late = Arc::new(Semaphore::new(cfg.max_unauthenticated));
    tracing::info!(listen = %listener.local_addr(), "channel server listening");
    tokio::pin!(shutdown);
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            () = &mut shutdown => break,
        };
        let (stream, peer) = match accepted {
            Ok(s) => s,
            Err(e) => {
                // Out of descriptors and similar: back off instead of spinning.
                crate::io::log_accept_error("channel server", &e);
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let stranger = match cfg.secret {
            None => None,
            Some(_) => {
                let slot = strangers.clone().try_acquire_owned().map(|p| (p, cfg.auth_timeout)).or_else(|_| {
                    late.clone().try_acquire_owned().map(|p| (p, LATE_AUTH_TIMEOUT.min(cfg.auth_timeout)))
                });
                let Ok(slot) = slot else {
                    refused(&hub, &peer, "too many connections that have not authenticated", cfg.max_unauthenticated);
                    continue;
                };
                Some(slot)
            }
        };
        let (hub, cfg, slots) = (hub.clone(), cfg.clone(), slots.clone());
        tokio::spawn(async move {
            let mut stream = stream;
            let mut buf = BytesMut::with_capacity(4096);
            if let (Some(secret), Some((stranger, deadline))) = (&cfg.secret, stranger) {
                let auth = tokio::time::timeout(deadline, authenticate(&mut stream, &mut buf, secret));
                let result = auth.await.unwrap_or(Err(ConnError::AuthTimeout(deadline)));
                drop(stranger);
                match result {
                    Ok(()) => {}
                    // Gone before saying anything: a port probe, not an attack.
                    Err(ConnError::Io(e)) => return tracing::debug!(%peer, "channel connection ended: {e}"),
                    Err(e) => {
                        hub.stats.unauthenticated.fetch_add(1, Ordering::Relaxed);
                        if let Some(held) = REFUSED_LOG.ready() {
                            tracing::warn!(%peer, similar_since_last = held, "closing channel connection: {e}");
                        }
                        return;
                    }
                }
            }
            let Ok(permit) = slots.try_acquire_owned() else {
                return refused(&hub, &peer, "too many connections", cfg.max_connections);
            };
            tracing::debug!(%peer, "channel client connected");
            match serve(stream, buf, &hub, &cfg, settled).await {
                Ok(()) => tracing::debug!(%peer, "channel client left"),
                Err(ConnError::Io(e)) => tracing::debug!(%peer, "channel connection ended: {e}"),
                // Every client of a server whose backend is down meets this: one line per interval.
                Err(e @ ConnError::Hub(HubError::Backend(_))) => {
                    hub.stats.backend_refusals.fetch_add(1, Ordering::Relaxed);
                    if let Some(held) = BACKEND_LOG.ready() {
                        tracing::warn!(%peer, similar_since_last = held, "closing channel connection: {e}");
                    }
                }
                Err(e) => {
                    if matches!(e, ConnError::Frame(_) | ConnError::Message(_) | ConnError::Hub(_)) {
                        hub.stats.bad_frames.fetch_add(1, Ordering::Relaxed);
                    }
                    tracing::warn!(%peer, "closing channel connection: {e}");
                }
            }
            drop(permit);
        });
    }
}

/// A connection turned away for a full cap: counted, and logged now and then.
fn refused(hub: &Hub, peer: &str, why: &str, max: usize) {
    hub.stats.refused.fetch_add(1, Ordering::Relaxed);
    if let Some(held) = REFUSED_LOG.ready() {
        tracing::warn!(%peer, max, similar_since_last = held, "channel connection refused: {why}");
    }
}

/// Read the first frame, which must be `auth` with `secret` (pings may come before it). What the
/// peer sent after it stays in `buf`.
async fn authenticate(stream: &mut Box<dyn Stream>, buf: &mut BytesMut, secret: &str) -> Result<(), ConnError> {
    loop {
        while let Some(payload) = frame::take_payload(buf, MAX_AUTH_FRAME)? {
            if payload.is_empty() {
                continue; // ping
            }
            let Request::Auth(given) = Request::parse(&payload)? else {
                return Err(MessageError::AuthRequired.into());
            };
            return match bool::from(subtle::ConstantTimeEq::ct_eq(&given[..], secret.as_bytes())) {
                true => Ok(()),
                false => Err(ConnError::BadSecret),
            };
        }
        if stream.read_buf(buf).await? == 0 {
            return Err(ConnError::Io(std::io::ErrorKind::UnexpectedEof.into()));
        }
    }
}

async fn serve(
    stream: Box<dyn Stream>,
    buf: BytesMut,
    hub: &Hub,
    cfg: &ChannelConfig,
    settled: tokio::time::Instant,
) -> Result<(), ConnError> {
    let (tx, mut rx) = mpsc::channel(cfg.outbound_queue);
    let id = hub.connect(Sink::Frames(tx));
    let result = pump(stream, buf, hub, id, &mut rx, cfg, settled).await;
    hub.disconnect(id);
    result
}

async fn pump(
    stream: Box<dyn Stream>,
    mut buf: BytesMut,
    hub: &Hub,
    id: crate::hub::ClientId,
    rx: &mut mpsc::Receiver<Bytes>,
    cfg: &ChannelConfig,
    settled: tokio::time::Instant,
) -> Result<(), ConnError> {
    let (mut rd, mut wr) = tokio::io::split(stream);
    let mut out = VecDeque::new();
    let mut batch = Vec::with_capacity(64);
    loop {
        // Whole frames in the buffer first, those that came with the authentication included: the
        // peer may be waiting for their answer and send nothing more until then.
        handle_frames(&mut buf, hub, id, cfg, settled).await?;
        tokio::select! {
            n = rd.read_buf(&mut buf) => {
                if n? == 0 {
                    return if buf.is_empty() { Ok(()) } else { Err(ConnError::Io(std::io::ErrorKind::UnexpectedEof.into())) };
                }
            }
            n = rx.recv_many(&mut batch, 64) => {
                if n == 0 {
                    return Err(ConnError::Slow);
                }
                out.extend(batch.drain(..));
                tokio::time::timeout(cfg.write_timeout, write_frames(&mut wr, &mut out))
                    .await
                    .map_err(|_| ConnError::WriteTimeout(cfg.write_timeout))??;
            }
        }
    }
}

/// Carry out every whole frame in `buf`; publishes wait until the server has `settled`.
async fn handle_frames(
    buf: &mut BytesMut,
    hub: &Hub,
    id: crate::hub::ClientId,
    cfg: &ChannelConfig,
    settled: tokio::time::Instant,
) -> Result<(), ConnError> {
    // The whole frames that came together are carried out together (a federated server sends
    // consecutive publishes to its backend at once); a bad frame among them ends the connection
    // after those before it.
    let mut reqs = Vec::new();
    let bad = loop {
        match frame::take_payload(buf, cfg.max_frame) {
            Ok(Some(p)) if p.is_empty() => continue, // ping
            Ok(Some(p)) => match Request::parse(&p) {
                Ok(req) => reqs.push(req),
                Err(e) => break Some(ConnError::from(e)),
            },
            Ok(None) => break None,
            Err(e) => break Some(e.into()),
        }
    };
    if reqs.iter().any(|r| matches!(r, Request::Publish { .. } | Request::PublishLoop { .. } | Request::Enqueue { .. }))
    {
        tokio::time::sleep_until(settled).await;
    }
    hub.handle_requests(id, reqs).await?;
    bad.map_or(Ok(()), Err)
}

/// Queues whose depth `/metrics` shows, at most (the first by name).
const MAX_QUEUE_SERIES: usize = 100;

/// The `pushwire_channel_queue_items` series for `depths`.
fn queue_depths(depths: &[(channel_proto::Name, u64)]) -> String {
    let mut out = String::from(
        "# HELP pushwire_channel_queue_items items waiting in a queue watched here (federated: on the backend); \
         the first 100 queues by name\n# TYPE pushwire_channel_queue_items gauge\n",
    );
    for (name, items) in depths {
        let label = name.to_string_lossy().replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n");
        out.push_str(&format!("pushwire_channel_queue_items{{queue=\"{label}\"}} {items}\n"));
    }
    out
}

/// Serve `/metrics` and `/healthz` for a channel server's hub on `listener`.
pub async fn serve_metrics(listener: tokio::net::TcpListener, hub: Arc<Hub>, shutdown: impl Future<Output = ()>) {
    let handler = move |req: hyper::Request<hyper::body::Incoming>| {
        let hub = hub.clone();
        async move {
            use hyper::StatusCode;
            use std::sync::atomic::Ordering::Relaxed;
            match req.uri().path() {
                // A federated server is healthy while its backend link is up.
                "/healthz" => match hub.backend_connected() {
                    Some(false) => crate::http::text(StatusCode::SERVICE_UNAVAILABLE, "backend unreachable\n"),
                    _ => crate::http::text(StatusCode::OK, "ok\n"),
                },
                "/metrics" => {
                    let s = &hub.stats;
                    let federated = if hub.backend_connected().is_some() { hub.channels() } else { 0 };
                    let mut body = crate::metrics::render_with(
                        &[
                            ("channel_clients", "connected channel clients", hub.clients() as u64),
                            ("channel_channels", "channels with a subscriber", hub.channels() as u64),
                            ("channel_queues", "queues with a watcher or an item", hub.queues() as u64),
                            (
                                "channel_federated_channels",
                                "channels held on the backend shared with other channel servers, for clients here",
                                federated as u64,
                            ),
                            (
                                "channel_backend_up",
                                "1 while the backend shared with other channel servers is reachable (0: down or none)",
                                u64::from(hub.backend_connected() == Some(true)),
                            ),
                        ],
                        &[
                            ("channel_publishes_total", "publish requests routed", s.published.load(Relaxed)),
                            ("channel_deliveries_total", "events queued to subscribers", s.deliveries.load(Relaxed)),
                            (
                                "channel_slow_consumers_total",
                                "clients cut off for not reading",
                                s.slow_consumers.load(Relaxed),
                            ),
                            (
                                "channel_local_drops_total",
                                "events dropped for a full in-process subscriber",
                                s.local_drops.load(Relaxed),
                            ),
                            (
                                "channel_refused_total",
                                "connections refused at a connection cap",
                                s.refused.load(Relaxed),
                            ),
                            (
                                "channel_unauthenticated_total",
                                "connections closed for a missing or wrong secret or no auth in time",
                                s.unauthenticated.load(Relaxed),
                            ),
                            (
                                "channel_backend_refusals_total",
                                "connections closed because the shared backend did not take their request",
                                s.backend_refusals.load(Relaxed),
                            ),
                            (
                                "channel_bad_frames_total",
                                "connections closed for a bad frame or request",
                                s.bad_frames.load(Relaxed),
                            ),
                        ],
                    );
                    body.push_str(&queue_depths(&hub.queue_depths(MAX_QUEUE_SERIES).await));
                    crate::http::reply(StatusCode::OK, "text/plain; version=0.0.4", body)
                }
                _ => crate::http::text(StatusCode::NOT_FOUND, "not found: /metrics, /healthz\n"),
            }
        }
    };
    crate::http::serve("channel metrics", listener, None, 64, handler, shutdown).await;
}
