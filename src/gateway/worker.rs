//! A worker shard: its connection table, the fan-out of each push to its connections' bounded
//! queues (one encoded frame shared by all), slow-consumer cuts and the heartbeat sweep.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU16, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::Notify;

use crate::broker::Message;
use crate::metrics::GLOBAL;
use crate::push::{Push, BROADCAST};
use crate::ws::{self, close};

/// What a worker and a connection's task share: the connection's outbound queue, and how to wake
/// the task (for queued frames, or to close with `close_code`).
pub struct Conn {
    queue: Mutex<Queue>,
    pub(super) wake: Notify,
    pub(super) close_code: AtomicU16,
    pub(super) last_seen: AtomicU64,
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
    pub(super) fn take(&self, out: &mut VecDeque<Bytes>) {
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
    pub(super) fn new(id: String, max_frames: usize, max_bytes: usize) -> Worker {
        let (conns, next_conn, epoch) = (Mutex::new(HashMap::new()), AtomicU64::new(0), Instant::now());
        Worker { id, conns, next_conn, epoch, max_frames, max_bytes }
    }

    fn table(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Arc<Conn>>> {
        self.conns.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Milliseconds since the worker started: the clock of `last_seen`.
    pub(super) fn now(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    pub(super) fn add(&self) -> (u64, Arc<Conn>) {
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

    pub(super) fn remove(&self, id: u64) {
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
    pub(super) fn sweep(&self, dead_after: Duration) {
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
    pub(super) fn close_all(&self, code: u16) {
        for (_, c) in self.table().drain() {
            c.close(code);
        }
    }
}

impl Conn {
    /// Ask the connection's task to close with `code`.
    pub(super) fn close(&self, code: u16) {
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
