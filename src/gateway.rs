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
//! consumer and is closed (1008), so it never holds back the others. A per-worker sweeper pings
//! every connection and closes those that stopped answering.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::sync::atomic::{AtomicU16, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{self, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;

use crate::broker::{Broker, BrokerError, Message};
use crate::metrics::GLOBAL;
use crate::push::{Push, BROADCAST};
use crate::ws::{self, close, ClientFrame};

/// Settings of a gateway node.
#[derive(Debug, Clone)]
pub struct GatewayConfig {
    /// Worker shards (the seed's `count`).
    pub workers: usize,
    /// Fixed node id; random when `None`.
    pub node_id: Option<String>,
    /// Most WebSocket connections at once; more are answered 503.
    pub max_connections: usize,
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
}

impl Default for GatewayConfig {
    fn default() -> Self {
        GatewayConfig {
            workers: 2,
            node_id: None,
            max_connections: 100_000,
            outbound_queue: 1024,
            outbound_queue_bytes: 1 << 20,
            max_client_frame: 64 * 1024,
            write_timeout: Duration::from_secs(10),
            heartbeat: Duration::from_secs(25),
            allowed_origins: Vec::new(),
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

/// What a worker and a connection's task share: the connection's outbound queue, and how to wake
/// the task (for queued frames, or to close with `close_code`).
pub struct Conn {
    queue: Mutex<Queue>,
    wake: Notify,
    close_code: AtomicU16,
    last_seen: AtomicU64,
}

/// Frames waiting for the connection's task. Empty, it allocates nothing: most connections
/// mostly listen.
#[derive(Default)]
struct Queue {
    frames: VecDeque<Bytes>,
    bytes: usize,
}

/// What became of a frame offered to a connection.
enum Offer {
    Queued,
    /// The queue is full (messages or bytes): the client is a slow consumer.
    Full,
}

impl Conn {
    fn queue(&self) -> std::sync::MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queue `frame` without waiting, within `max_frames` and `max_bytes`.
    fn offer(&self, frame: &Bytes, max_frames: usize, max_bytes: usize) -> Offer {
        let mut q = self.queue();
        if q.frames.len() >= max_frames || q.bytes + frame.len() > max_bytes {
            return Offer::Full;
        }
        let was_empty = q.frames.is_empty();
        q.bytes += frame.len();
        q.frames.push_back(frame.clone());
        drop(q);
        if was_empty {
            self.wake.notify_one();
        }
        Offer::Queued
    }

    /// Move everything queued into `out`.
    fn take(&self, out: &mut VecDeque<Bytes>) {
        let mut q = self.queue();
        q.bytes = 0;
        if out.is_empty() {
            std::mem::swap(out, &mut q.frames);
        } else {
            out.extend(q.frames.drain(..));
        }
    }
}

/// Warnings about events that cannot be decoded: at most one line per interval.
static BAD_EVENT_LOG: crate::metrics::LogEvery = crate::metrics::LogEvery::new(Duration::from_secs(10));

/// One worker shard: its id, its connections, its connection counter.
pub struct Worker {
    pub id: String,
    conns: Mutex<HashMap<u64, Arc<Conn>>>,
    next_conn: AtomicU64,
    epoch: Instant,
    max_frames: usize,
    max_bytes: usize,
}

impl Worker {
    fn new(id: String, max_frames: usize, max_bytes: usize) -> Worker {
        let (conns, next_conn, epoch) = (Mutex::new(HashMap::new()), AtomicU64::new(0), Instant::now());
        Worker { id, conns, next_conn, epoch, max_frames, max_bytes }
    }

    fn table(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Arc<Conn>>> {
        self.conns.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Milliseconds since the worker started: the clock of `last_seen`.
    fn now(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    fn add(&self) -> (u64, Arc<Conn>) {
        let id = self.next_conn.fetch_add(1, Ordering::Relaxed) + 1;
        let conn = Arc::new(Conn {
            queue: Mutex::default(),
            wake: Notify::new(),
            close_code: AtomicU16::new(0),
            last_seen: AtomicU64::new(self.now()),
        });
        self.table().insert(id, conn.clone());
        (id, conn)
    }

    fn remove(&self, id: u64) {
        self.table().remove(&id);
    }

    /// Number of open connections.
    pub fn connections(&self) -> usize {
        self.table().len()
    }

    /// Queue `frame` to the given connections (all when `only` is `None`); returns deliveries.
    fn send(&self, frame: &Bytes, only: Option<u64>) -> usize {
        let mut table = self.table();
        let mut slow = Vec::new();
        let mut delivered = 0;
        let mut offer = |id: u64, c: &Conn| match c.offer(frame, self.max_frames, self.max_bytes) {
            Offer::Queued => delivered += 1,
            Offer::Full => slow.push(id),
        };
        match only {
            Some(id) => {
                if let Some(c) = table.get(&id) {
                    offer(id, c);
                }
            }
            None => table.iter().for_each(|(id, c)| offer(*id, c)),
        }
        for id in slow {
            if let Some(c) = table.remove(&id) {
                GLOBAL.slow_consumer_disconnects.fetch_add(1, Ordering::Relaxed);
                tracing::info!(worker = %self.id, connection = id, "client not reading: closing (slow consumer)");
                c.close(close::POLICY);
            }
        }
        GLOBAL.deliveries.fetch_add(delivered as u64, Ordering::Relaxed);
        delivered
    }

    /// Carry out one message from the broker.
    pub fn handle(&self, m: Message) {
        GLOBAL.broker_messages.fetch_add(1, Ordering::Relaxed);
        let push = match Push::decode(&m.data) {
            Ok(p) => p,
            Err(e) => {
                GLOBAL.bad_broker_messages.fetch_add(1, Ordering::Relaxed);
                if let Some(held) = BAD_EVENT_LOG.ready() {
                    let channel = String::from_utf8_lossy(&m.channel);
                    tracing::warn!(worker = %self.id, %channel, similar_since_last = held, "ignoring event: {e}");
                }
                return;
            }
        };
        let opcode = if std::str::from_utf8(&push.content).is_ok() { ws::TEXT } else { ws::BINARY };
        let frame = ws::encode(opcode, &push.content);
        if &m.channel[..] == BROADCAST.as_bytes() {
            self.send(&frame, None);
            return;
        }
        let target = push.to_connection_id.as_deref().and_then(|c| std::str::from_utf8(c).ok()?.trim().parse().ok());
        let delivered = target.map_or(0, |id| self.send(&frame, Some(id)));
        if delivered == 0 {
            GLOBAL.undeliverable.fetch_add(1, Ordering::Relaxed);
            tracing::info!(
                worker = %self.id,
                to_connection_id = %String::from_utf8_lossy(push.to_connection_id.as_deref().unwrap_or_default()),
                "connection does not exist: push dropped"
            );
        }
    }

    /// Ping every connection; close those silent for longer than `dead_after`.
    fn sweep(&self, dead_after: Duration) {
        let now = self.now();
        let ping = ws::ping();
        let mut table = self.table();
        table.retain(|_, c| {
            if now.saturating_sub(c.last_seen.load(Ordering::Relaxed)) > dead_after.as_millis() as u64 {
                c.close(close::GOING_AWAY);
                return false;
            }
            // A client whose queue is full gets no ping; the next push decides its fate.
            let _ = c.offer(&ping, self.max_frames, self.max_bytes);
            true
        });
    }

    /// Close every connection with `code`.
    fn close_all(&self, code: u16) {
        for (_, c) in self.table().drain() {
            c.close(code);
        }
    }
}

impl Conn {
    /// Ask the connection's task to close with `code`.
    fn close(&self, code: u16) {
        self.close_code.store(code, Ordering::Release);
        self.wake.notify_one();
    }

    /// For benchmarks: drop whatever is queued.
    #[doc(hidden)]
    pub fn drain(&self) {
        *self.queue() = Queue::default();
    }
}

/// For benchmarks: a worker with `n` in-memory connections (no sockets); empty their queues with
/// [`Conn::drain`], as their tasks would.
#[doc(hidden)]
pub fn bench_worker(n: usize, queue: usize) -> (Worker, Vec<Arc<Conn>>) {
    let w = Worker::new("bench-0".into(), queue, usize::MAX);
    let conns = (0..n).map(|_| w.add().1).collect();
    (w, conns)
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
            Some(id) if !crate::push::valid_node_id(id) => return Err(GatewayError::BadNodeId(id.clone())),
            Some(id) => format!("{id}.{}", start_epoch()),
        };
        let mut workers = Vec::new();
        for i in 0..cfg.workers {
            let worker = Arc::new(Worker::new(format!("{node_id}-{i}"), cfg.outbound_queue, cfg.outbound_queue_bytes));
            let mut sub = broker
                .subscribe(vec![worker.id.clone(), BROADCAST.to_owned()])
                .map_err(|source| GatewayError::Subscribe { worker: worker.id.clone(), source })?;
            let w = worker.clone();
            tokio::spawn(async move {
                while let Some(m) = sub.recv().await {
                    w.handle(m);
                }
            });
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
        Ok(Arc::new(Gateway {
            node_id,
            workers,
            broker,
            cfg,
            next_worker: AtomicUsize::new(0),
            open: AtomicUsize::new(0),
        }))
    }

    /// Open WebSocket connections on this node.
    pub fn connections(&self) -> usize {
        self.open.load(Ordering::Relaxed)
    }

    /// Serve HTTP and WebSocket on `listener` until `shutdown`; then close every client with 1001.
    pub async fn serve(self: Arc<Self>, listener: TcpListener, shutdown: impl Future<Output = ()>) {
        let gw = self.clone();
        let handler = move |req| {
            let gw = gw.clone();
            async move { gw.route(req) }
        };
        let gw = self.clone();
        let intercept = move |stream| gw.clone().fast_upgrade(stream);
        crate::http::serve_with("gateway", listener, self.cfg.max_connections, handler, intercept, shutdown).await;
        for w in &self.workers {
            w.close_all(close::GOING_AWAY);
        }
        let deadline = Instant::now() + crate::http::SHUTDOWN_GRACE;
        while self.connections() > 0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn route(self: &Arc<Self>, req: Request<Incoming>) -> Response<Full<Bytes>> {
        let upgrade =
            req.headers().get(header::UPGRADE).is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"websocket"));
        match (req.method(), req.uri().path(), upgrade) {
            (&Method::GET, _, true) => self.upgrade(req),
            (&Method::GET, "/", false) => text(StatusCode::OK, "text/html; charset=utf-8", crate::page::INDEX),
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

    fn health(&self) -> Response<Full<Bytes>> {
        if self.broker.is_connected() {
            text(StatusCode::OK, "text/plain", "ok\n")
        } else {
            text(StatusCode::SERVICE_UNAVAILABLE, "text/plain", "broker unreachable\n")
        }
    }

    fn upgrade(self: &Arc<Self>, req: Request<Incoming>) -> Response<Full<Bytes>> {
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
        let origin = h.get(header::ORIGIN).map(HeaderValue::as_bytes);
        if !self.origin_allowed(origin) {
            GLOBAL.ws_connections_refused.fetch_add(1, Ordering::Relaxed);
            let origin = String::from_utf8_lossy(origin.unwrap_or_default());
            return text(StatusCode::FORBIDDEN, "text/plain", format!("origin {origin:?} is not allowed\n"));
        }
        let Some(open) = self.open_slot() else {
            GLOBAL.ws_connections_refused.fetch_add(1, Ordering::Relaxed);
            let mut r = text(StatusCode::SERVICE_UNAVAILABLE, "text/plain", "gateway is at its connection limit\n");
            r.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static("5"));
            return r;
        };
        let accept = ws::accept_key(key.as_bytes());
        // Only the upgrade future goes into the connection's task, not the whole request: the
        // task lives as long as the connection.
        let on_upgrade = hyper::upgrade::on(req);
        tokio::spawn(async move {
            let upgraded = match on_upgrade.await {
                Ok(u) => u,
                Err(e) => return tracing::debug!("websocket upgrade failed: {e}"),
            };
            let Ok(parts) = upgraded.downcast::<TokioIo<TcpStream>>() else {
                return tracing::error!("websocket upgrade gave an unexpected stream type");
            };
            // Copy what hyper read past the handshake and let its read buffer go: `read_buf` is a
            // view into hyper's whole buffer, which would otherwise live as long as the connection.
            let hyper::upgrade::Parts { io, read_buf, .. } = parts;
            let leftover = BytesMut::from(&read_buf[..]);
            drop(read_buf);
            open.run(io.into_inner(), leftover).await;
        });
        let mut r = Response::new(Full::new(Bytes::new()));
        *r.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
        let hs = r.headers_mut();
        hs.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        hs.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
        if let Ok(v) = HeaderValue::from_str(&accept) {
            hs.insert("sec-websocket-accept", v);
        }
        r
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
    /// Serve an upgraded connection on the next worker, round-robin.
    async fn run(self, stream: TcpStream, leftover: BytesMut) {
        let gw = &self.0;
        let n = gw.next_worker.fetch_add(1, Ordering::Relaxed) % gw.workers.len();
        let worker = gw.workers[n].clone();
        GLOBAL.ws_connections_total.fetch_add(1, Ordering::Relaxed);
        connection(stream, leftover, &worker, &gw.cfg).await;
    }
}

impl Gateway {
    fn origin_allowed(&self, origin: Option<&[u8]>) -> bool {
        let origin = origin.unwrap_or_default();
        self.cfg.allowed_origins.is_empty() || self.cfg.allowed_origins.iter().any(|a| a.as_bytes() == origin)
    }

    /// Take a connection slot, if the gateway is below its limit.
    fn open_slot(self: &Arc<Self>) -> Option<OpenGuard> {
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
    async fn fast_upgrade(self: Arc<Self>, mut stream: TcpStream) -> Option<TcpStream> {
        let mut head = vec![0u8; 2048];
        let n = match tokio::time::timeout(Duration::from_secs(1), stream.peek(&mut head)).await {
            Ok(Ok(n)) => n,
            _ => return Some(stream),
        };
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut req = httparse::Request::new(&mut headers);
        let Ok(httparse::Status::Complete(len)) = req.parse(&head[..n]) else { return Some(stream) };
        let get = |name: &str| req.headers.iter().find(|h| h.name.eq_ignore_ascii_case(name)).map(|h| h.value);
        let upgrade = get("upgrade").is_some_and(|v| v.eq_ignore_ascii_case(b"websocket"));
        let (Some(key), Some(b"13")) = (get("sec-websocket-key"), get("sec-websocket-version")) else {
            return Some(stream);
        };
        if req.method != Some("GET") || !upgrade || !self.origin_allowed(get("origin")) {
            return Some(stream);
        }
        let accept = ws::accept_key(key);
        let Some(open) = self.open_slot() else { return Some(stream) };
        let mut consumed = vec![0u8; len];
        let response = format!(
            "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {accept}\r\n\r\n"
        );
        let handshake = async {
            stream.read_exact(&mut consumed).await?;
            stream.write_all(response.as_bytes()).await
        };
        if tokio::time::timeout(crate::http::HEADER_TIMEOUT, handshake).await.is_ok_and(|r| r.is_ok()) {
            // A task of its own, sized for the connection alone, not for this HTTP accept path.
            tokio::spawn(open.run(stream, BytesMut::new()));
        }
        None
    }
}

use crate::http::reply as text;

/// Serve one WebSocket connection until it closes or is closed.
async fn connection(mut stream: TcpStream, mut buf: BytesMut, worker: &Worker, cfg: &GatewayConfig) {
    let (id, conn) = worker.add();
    tracing::debug!(worker = %worker.id, connection = id, "client connected");
    let welcome = ws::encode(ws::TEXT, format!("workerID:{} connectionID:{id} connected\n", worker.id).as_bytes());
    let mut out = VecDeque::from([welcome]);
    let mut reader = ws::Reader::default();
    let closing: Option<(u16, &str)> = 'conn: loop {
        if !out.is_empty() && !flush(&stream, &mut out, cfg.write_timeout).await {
            break None;
        }
        loop {
            match reader.parse(&mut buf, cfg.max_client_frame) {
                Ok(None) => break,
                Ok(Some(ClientFrame::Ping(p))) => out.push_back(ws::pong(&p)),
                Ok(Some(ClientFrame::Close(code))) => break 'conn Some((code.unwrap_or(close::NORMAL), "")),
                Ok(Some(ClientFrame::Data | ClientFrame::Pong)) => {}
                Err(e) => {
                    GLOBAL.bad_client_frames.fetch_add(1, Ordering::Relaxed);
                    tracing::info!(worker = %worker.id, connection = id, "closing: {e}");
                    break 'conn Some((e.code(), "bad frame"));
                }
            }
        }
        if !out.is_empty() {
            continue;
        }
        // Not biased: a connection pushed to without pause must still be read (pongs, closes),
        // or the heartbeat would take a live client for a dead one.
        tokio::select! {
            () = conn.wake.notified() => match conn.close_code.load(Ordering::Acquire) {
                0 => conn.take(&mut out),
                close::POLICY => break Some((close::POLICY, "slow consumer")),
                close::GOING_AWAY => break Some((close::GOING_AWAY, "going away")),
                code => break Some((code, "")),
            },
            r = stream.readable() => {
                if r.is_err() {
                    break None;
                }
                match stream.try_read_buf(&mut buf) {
                    Ok(0) => break None,
                    Ok(_) => conn.last_seen.store(worker.now(), Ordering::Relaxed),
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                    Err(_) => break None,
                }
            }
        }
    };
    worker.remove(id);
    if let Some((code, reason)) = closing {
        let mut last = VecDeque::from([ws::close_frame(code, reason)]);
        if flush(&stream, &mut last, CLOSE_LINGER).await {
            linger(&mut stream).await;
        }
    }
    tracing::debug!(worker = %worker.id, connection = id, "client gone");
}

/// How long a closing connection waits for its close frame to go out and for the client to close.
const CLOSE_LINGER: Duration = Duration::from_secs(1);
/// Most bytes read and thrown away from a client while waiting for it to close.
const LINGER_BYTES: usize = 64 * 1024;

/// After the close frame: send FIN, then read (and discard) until the client closes too, for at
/// most [`CLOSE_LINGER`]. Dropping a socket with unread input makes the kernel send a reset, which
/// can destroy the close frame before the client reads it.
async fn linger(stream: &mut TcpStream) {
    if stream.shutdown().await.is_err() {
        return;
    }
    let drain = async {
        let mut seen = 0;
        let mut scratch = [0u8; 512];
        while seen < LINGER_BYTES {
            match stream.read(&mut scratch).await {
                Ok(0) | Err(_) => return,
                Ok(n) => seen += n,
            }
        }
    };
    let _ = Box::pin(tokio::time::timeout(CLOSE_LINGER, drain)).await;
}

/// Write every queued frame, several per system call, waiting (up to `limit` each time) while the
/// socket's buffer is full. Returns false when the socket failed or stayed full.
///
/// The system call is made synchronously (`try_write_vectored`) so that the slice array lives on
/// the thread's stack, never in the connection's future: an idle connection stays small.
async fn flush(stream: &TcpStream, out: &mut VecDeque<Bytes>, limit: Duration) -> bool {
    while !out.is_empty() {
        match crate::io::try_write_frames(stream, out) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                // Boxed: the timer exists only while a socket is full, not in every idle connection.
                if !matches!(Box::pin(tokio::time::timeout(limit, stream.writable())).await, Ok(Ok(()))) {
                    return false;
                }
            }
            Err(_) => return false,
        }
    }
    true
}
