//! The WebSocket gateway (the seed's `start_ws.php`).
//!
//! A gateway node runs several workers. Each worker is a shard with its own connection table and
//! its own broker subscription: to its worker id (targeted pushes) and to `broadcast`. A client is
//! greeted with `workerID:W connectionID:C connected\n`.
//!
//! **Ids.** A worker id is `NODE-N`: `NODE` is, by default, 12 random hex digits drawn when the
//! process starts, or `--node-id` followed by `.` and the start time in base 36
//! (`web1.mhx3k2a9-0`), and `N` the worker's index. Two gateways started with the same command
//! line on two hosts, or one gateway restarted, therefore have different worker ids, and a targeted
//! push (`to_worker_id`, `to_connection_id`) names at most one connection, ever: a pair stored
//! before a restart reaches nobody after it. Connection ids count up from 1 per worker and are never
//! reused while the worker lives.
//!
//! **Fan-out.** A push is encoded into one WebSocket frame once and the same bytes are queued to
//! every connection. Each connection has a bounded queue; a client whose queue is full is a slow
//! consumer and is closed (1008), so it never holds back the others. While the worker keeps up
//! it writes to an idle plain-TCP connection itself, without waking its task. A
//! per-worker sweeper pings every connection and closes those that stopped answering.
//!
//! Layout: [`worker`] (a shard: connection table with users and topics, fan-out, heartbeat sweep),
//! [`connection`] (one client's task: its queue, reads, writes, close), [`handshake`] (the
//! WebSocket upgrade with its token, with and without the HTTP stack), [`presence`] (heartbeats
//! and answers to publishers' questions), [`routes`] (the page, `/healthz`, `/metrics`). What
//! clients are sent and what their messages do is their protocol's ([`crate::protocol`]).

mod connection;
mod handshake;
mod presence;
mod routes;
mod wire;
mod worker;

use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use tokio::net::TcpListener;

pub use worker::{bench_worker, Conn, Worker};

use crate::broker::{Broker, BrokerError};
use crate::metrics::GLOBAL;
use crate::protocol::native::push::BROADCAST;
use crate::protocol::native::Wants;

/// Settings of a gateway node.
#[derive(Debug, Clone)]
pub struct GatewayConfig {
    /// Worker shards (the seed's `count`).
    pub workers: usize,
    /// Fixed node id; random when `None`.
    pub node_id: Option<String>,
    /// Most WebSocket connections at once; more are answered 503.
    pub max_connections: usize,
    /// Most sockets at once that are not WebSocket connections (yet): handshakes in progress and
    /// plain HTTP requests such as /healthz. Counted apart from `max_connections`, so that a
    /// refused or closing handshake never takes a WebSocket's place.
    pub max_handshakes: usize,
    /// Frames queued for one connection before it counts as a slow consumer.
    pub outbound_queue: usize,
    /// Bytes queued for one connection before it counts as a slow consumer.
    pub outbound_queue_bytes: usize,
    /// Largest client frame accepted.
    pub max_client_frame: usize,
    /// How long one write to a client may block.
    pub write_timeout: Duration,
    /// How often connections are pinged; one silent for three intervals is closed.
    pub heartbeat: Duration,
    /// Browser origins allowed to connect; empty allows all.
    pub allowed_origins: Vec<String>,
    /// How connection tokens (`?token=JWT`) are checked, and whether one is required.
    pub tokens: crate::protocol::native::token::TokenPolicy,
    /// The gateway's presence lease: it sends a heartbeat every third of it, and counts as gone
    /// (its connections out of every count) once a whole lease passes without one.
    pub lease: Duration,
    /// Messages buffered between the broker and each worker; past it they are dropped (counted,
    /// and repaired from history where the channel keeps one).
    pub subscription_buffer: usize,
    /// permessage-deflate for clients that offer it: `None` off, `Some(n)` for pushes of at least
    /// `n` bytes (smaller ones go uncompressed).
    pub compression: Option<usize>,
    /// TLS for every connection (`wss://`, `https://`): requests then go through the HTTP stack,
    /// WebSocket upgrades and event streams included.
    pub tls: Option<Arc<crate::tls::Tls>>,
    /// The path on which WebSocket clients get the echo protocol (a conformance endpoint); off
    /// when `None`.
    pub echo_path: Option<String>,
    /// The Pusher apps served on `/app/KEY` (none: the native protocol on every path).
    pub apps: Arc<crate::protocol::pusher::Apps>,
    /// Serves the Pusher HTTP API (`/apps/...`) on the WebSocket port too, as Reverb, Soketi
    /// and Sockudo do (one host and port for clients and backend).
    pub api: Option<Arc<crate::publisher::Publisher>>,
}

impl Default for GatewayConfig {
    fn default() -> Self {
        GatewayConfig {
            workers: 2,
            node_id: None,
            max_connections: 100_000,
            max_handshakes: 10_000,
            outbound_queue: 1024,
            outbound_queue_bytes: 1 << 20,
            max_client_frame: 64 * 1024,
            write_timeout: Duration::from_secs(10),
            heartbeat: Duration::from_secs(25),
            allowed_origins: Vec::new(),
            tokens: crate::protocol::native::token::TokenPolicy::default(),
            lease: Duration::from_secs(15),
            subscription_buffer: crate::broker::SUBSCRIPTION_CAPACITY,
            compression: None,
            tls: None,
            echo_path: None,
            apps: Arc::default(),
            api: None,
        }
    }
}

/// Why the gateway could not start.
#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    #[error("worker {worker} could not subscribe: {source}")]
    Subscribe {
        worker: String,
        #[source]
        source: BrokerError,
    },
    #[error("--workers must be at least 1")]
    NoWorkers,
    #[error("--node-id {0:?}: use 1 to 64 letters, digits, '_' and '-'")]
    BadNodeId(String),
}

/// A running gateway node.
pub struct Gateway {
    pub node_id: String,
    pub workers: Vec<Arc<Worker>>,
    broker: Arc<dyn Broker>,
    cfg: GatewayConfig,
    next_worker: AtomicUsize,
    open: AtomicUsize,
}

impl Gateway {
    /// Create the workers and subscribe each to its channels.
    pub fn start(broker: Arc<dyn Broker>, cfg: GatewayConfig) -> Result<Arc<Gateway>, GatewayError> {
        if cfg.workers == 0 {
            return Err(GatewayError::NoWorkers);
        }
        let node_id = match &cfg.node_id {
            None => crate::io::random_hex(6),
            Some(id) if !crate::protocol::native::push::valid_node_id(id) => {
                return Err(GatewayError::BadNodeId(id.clone()))
            }
            Some(id) => format!("{id}.{}", start_epoch()),
        };
        let mut workers = Vec::new();
        for i in 0..cfg.workers {
            let id = format!("{node_id}-{i}");
            let sub = broker
                .subscribe_with(
                    vec![id.clone(), BROADCAST.to_owned(), crate::cluster::worker_channel(&id)],
                    cfg.subscription_buffer,
                )
                .map_err(|source| GatewayError::Subscribe { worker: id.clone(), source })?;
            let (queue, bytes) = (cfg.outbound_queue, cfg.outbound_queue_bytes);
            let (worker, repairs) = Worker::new(id, (queue, bytes), cfg.compression, broker.clone(), sub.id);
            let worker = Arc::new(worker);
            tokio::spawn(worker.clone().run(sub, repairs));
            let (w, beat) = (Arc::downgrade(&worker), cfg.heartbeat);
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(beat);
                tick.tick().await;
                loop {
                    tick.tick().await;
                    let Some(w) = w.upgrade() else { return };
                    w.sweep(beat * 3);
                }
            });
            workers.push(worker);
        }
        tracing::info!(node_id = %node_id, workers = cfg.workers, "gateway workers started");
        // Pusher presence asks every gateway for a channel's members.
        let asker = match cfg.apps.is_empty() {
            true => None,
            false => Some(
                crate::cluster::Asker::start(broker.clone(), &node_id)
                    .map_err(|source| GatewayError::Subscribe { worker: node_id.clone(), source })?,
            ),
        };
        if let Some(a) = &asker {
            workers.iter().for_each(|w| w.set_asker(a.clone()));
        }
        let nodes = broker
            .subscribe(vec![crate::cluster::NODES.to_owned()])
            .map_err(|source| GatewayError::Subscribe { worker: node_id.clone(), source })?;
        let gw = Arc::new(Gateway {
            node_id,
            workers,
            broker,
            cfg,
            next_worker: AtomicUsize::new(0),
            open: AtomicUsize::new(0),
        });
        tokio::spawn(presence::run(Arc::downgrade(&gw), nodes));
        if let Some(asker) = asker {
            tokio::spawn(presence::watch_peers(Arc::downgrade(&gw), asker));
        }
        Ok(gw)
    }

    /// Open WebSocket connections on this node.
    pub fn connections(&self) -> usize {
        self.open.load(Ordering::Relaxed)
    }

    /// Serve HTTP and WebSocket on `listener` until `shutdown`; then close every client with 1001
    /// (a Pusher client with 4200: reconnect now).
    pub async fn serve(self: Arc<Self>, listener: TcpListener, shutdown: impl Future<Output = ()>) {
        let gw = self.clone();
        let handler = move |req: hyper::Request<hyper::body::Incoming>| {
            let gw = gw.clone();
            async move {
                match &gw.cfg.api {
                    Some(api) if crate::publisher::is_pusher_api(req.uri().path()) => {
                        api.pusher_request(req).await.map(http_body_util::Either::Left)
                    }
                    _ => gw.route(req),
                }
            }
        };
        // The fast handshake reads the request from the socket, which TLS leaves to rustls.
        let (gw, tls) = (self.clone(), self.cfg.tls.clone());
        let fast = tls.is_none();
        let intercept = move |stream| {
            let gw = gw.clone();
            async move {
                match fast {
                    true => gw.fast_upgrade(stream).await,
                    false => Some(stream),
                }
            }
        };
        crate::http::serve_with("gateway", listener, tls, self.cfg.max_handshakes, handler, intercept, shutdown).await;
        for w in &self.workers {
            w.close_all();
        }
        let deadline = Instant::now() + crate::http::SHUTDOWN_GRACE;
        while self.connections() > 0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// This start of the process, as milliseconds since the Unix epoch in base 36 (8 digits): part of
/// the worker ids when `--node-id` fixes the rest, so that a worker id (and so a stored
/// `(worker, connection)` pair) never outlives the process that handed it out.
fn start_epoch() -> String {
    let mut ms = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis());
    let mut digits = Vec::new();
    while ms > 0 || digits.is_empty() {
        digits.push(b"0123456789abcdefghijklmnopqrstuvwxyz"[(ms % 36) as usize]);
        ms /= 36;
    }
    digits.iter().rev().map(|&d| d as char).collect()
}

/// One of the gateway's `--max-connections` slots, held for a connection's life.
struct OpenGuard(Arc<Gateway>);

impl Drop for OpenGuard {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::AcqRel);
    }
}

impl OpenGuard {
    /// Serve an upgraded connection that `wants` something (`None`: a seed client) on the next
    /// worker, round-robin.
    /// `head` is the handshake's answer when it is still to be written (it goes out with the
    /// welcome); `leftover`, what the client sent after its request.
    async fn run<P: crate::protocol::Protocol>(
        self,
        wire: wire::Wire,
        head: Option<Box<handshake::Opening>>,
        leftover: BytesMut,
        session: (Option<Box<Wants>>, P::Session),
        deflate: bool,
    ) {
        GLOBAL.ws_connections_total.fetch_add(1, Ordering::Relaxed);
        connection::serve::<P>(wire, head, leftover, &self.next_worker(), &self.0.cfg, session, deflate).await;
    }

    /// Serve an event stream on the next worker (`head`: its response head, when still to be
    /// written).
    async fn run_sse(self, wire: wire::Wire, head: Option<Box<handshake::Opening>>, wants: Option<Box<Wants>>) {
        GLOBAL.sse_connections_total.fetch_add(1, Ordering::Relaxed);
        connection::serve_sse(wire, head, &self.next_worker(), &self.0.cfg, wants).await;
    }

    /// The worker the next connection goes to, round-robin.
    fn next_worker(&self) -> Arc<Worker> {
        let gw = &self.0;
        gw.workers[gw.next_worker.fetch_add(1, Ordering::Relaxed) % gw.workers.len()].clone()
    }
}
