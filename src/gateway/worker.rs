//! A worker shard: its connection table with who each connection is (user, topics) and the
//! indexes from users and topics to connections, the fan-out of each push to its connections'
//! bounded queues (one encoded frame shared by all), slow-consumer cuts and the heartbeat sweep.
//!
//! A worker holds one broker subscription: its own worker id, `broadcast`, and the channel of
//! every user and topic it has a connection of (joined when a connection arrives, left when it
//! goes; the broker counts joins, so the broker is subscribed exactly while a member is here).
//!
//! **Offsets.** A message of a channel that keeps history carries its offset: the worker drops
//! one it has delivered already, and when offsets jump (a message lost between broker and
//! worker) holds the channel's newer messages, fills the gap from the broker's history, and
//! delivers in order; a gap the history cannot fill is reported to JSON clients
//! (`recovered:false`) and counted, never silent. A connection that reconnects with `recover=`
//! gets what it missed from history, merged at the seam with the live messages held meanwhile.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes};
use tokio::sync::{mpsc, Notify};

use super::format;
use super::Wants;
use crate::broker::{Broker, Message, Position, SubId, Subscription};
use crate::cluster::{Answer, Change, Envelope, Request, DUMP_PAGE};
use crate::history::{self, Page};
use crate::metrics::GLOBAL;
use crate::push::{topic_channel, user_channel, Audience, Push};
use crate::ws::{self, close};

/// What a worker and a connection's task share: the connection's outbound queue, and how to wake
/// the task (for queued frames, or to close with `close_code`).
pub struct Conn {
    queue: Mutex<Queue>,
    pub(super) wake: Notify,
    pub(super) close_code: AtomicU16,
    pub(super) last_seen: AtomicU64,
    /// A Server-Sent Events stream rather than a WebSocket: it gets events, not frames.
    pub(super) sse: bool,
    /// `format=json`: messages as JSON objects with their channel and position.
    pub(super) json: bool,
    /// permessage-deflate was negotiated: pushes of at least the gateway's minimum size go
    /// compressed.
    pub(super) deflate: bool,
}

/// One push as each kind of connection gets it (WebSocket or SSE, raw or JSON), each encoded on
/// first use (once per message per worker), then shared by every connection of that kind.
pub(super) struct Frames<'a> {
    channel: &'a str,
    position: Option<&'a Position>,
    content: &'a [u8],
    /// Compress for connections that negotiated it (the push is at least the minimum size).
    compress: bool,
    encoded: [std::cell::OnceCell<Bytes>; 8],
}

impl<'a> Frames<'a> {
    fn new(channel: &'a str, position: Option<&'a Position>, content: &'a [u8], compress: bool) -> Frames<'a> {
        Frames { channel, position, content, compress, encoded: Default::default() }
    }

    fn for_conn(&self, c: &Conn) -> &Bytes {
        let compress = self.compress && c.deflate;
        self.encoded[c.sse as usize * 4 + c.json as usize * 2 + compress as usize]
            .get_or_init(|| c.encode_push(self.channel, self.position, self.content, compress))
    }
}

/// Frames waiting for the connection's task. Empty, it allocates nothing: most connections
/// mostly listen.
#[derive(Default)]
struct Queue {
    frames: VecDeque<Bytes>,
    bytes: usize,
    /// The task has written everything it had: the worker may write to the socket itself.
    idle: bool,
    /// The first frame is the rest of one the worker wrote in part.
    partial: bool,
    /// The client's plain TCP socket, which the worker writes to itself while `idle` and nothing
    /// is queued; taken away when the task closes the connection.
    direct: Option<Arc<tokio::net::TcpStream>>,
    /// Told when the task takes the queue: a recovery waiting for room to feed more.
    drained: Option<Arc<Notify>>,
}

/// What became of a frame offered to a connection.
enum Offer {
    Queued,
    /// Nothing is queued and the task is not writing: the worker writes the frame itself, once
    /// the connection table is unlocked ([`Conn::write`]).
    Direct,
    /// The queue is full (messages or bytes): the client is a slow consumer.
    Full,
}

impl Conn {
    /// `text` as one frame (or event) of this connection's transport.
    pub(super) fn encode(&self, text: &[u8]) -> Bytes {
        self.encode_compressed(text, false)
    }

    /// `text` as one frame (compressed when `compress`) or event.
    fn encode_compressed(&self, text: &[u8], compress: bool) -> Bytes {
        let opcode = if std::str::from_utf8(text).is_ok() { ws::TEXT } else { ws::BINARY };
        match (self.sse, compress) {
            (true, _) => crate::sse::event(text),
            (false, true) => crate::deflate::frame(opcode, text),
            (false, false) => ws::encode(opcode, text),
        }
    }

    /// A push on `channel` (at `position`) as this connection gets it: raw, or JSON, compressed
    /// when `compress`; a JSON event stream's event has the position as its id, so that
    /// `EventSource` resumes from it.
    fn encode_push(&self, channel: &str, position: Option<&Position>, content: &[u8], compress: bool) -> Bytes {
        if !self.json {
            return self.encode_compressed(content, compress);
        }
        let text = format::push(channel, position, content);
        match (self.sse, position) {
            (true, Some(p)) => crate::sse::event_with_id(&text, Some(&format!("{channel}:{}:{}", p.epoch, p.offset))),
            _ => self.encode_compressed(&text, compress),
        }
    }

    fn queue(&self) -> std::sync::MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queue `frame` without waiting, within `max_frames` and `max_bytes`; with `direct`, leave
    /// it to the worker ([`Offer::Direct`]) when the connection is idle.
    fn offer(&self, frame: &Bytes, max_frames: usize, max_bytes: usize, direct: bool) -> Offer {
        let mut q = self.queue();
        if q.frames.len() >= max_frames || q.bytes + frame.len() > max_bytes {
            return Offer::Full;
        }
        let was_empty = q.frames.is_empty();
        if direct && was_empty && q.idle && q.direct.is_some() {
            return Offer::Direct;
        }
        q.bytes += frame.len();
        q.frames.push_back(frame.clone());
        drop(q);
        if was_empty {
            self.wake.notify_one();
        }
        Offer::Queued
    }

    /// Write `frame` to the socket now if nothing is queued and the task is not writing (no task
    /// wake-up, no second system call); otherwise, or for what the socket did not take, queue it
    /// for the task.
    fn write(&self, mut frame: Bytes) {
        let mut q = self.queue();
        if q.frames.is_empty() && q.idle {
            if let Some(s) = &q.direct {
                match s.try_write(&frame) {
                    Ok(n) if n == frame.len() => return,
                    Ok(n) => {
                        frame.advance(n);
                        q.partial = true;
                    }
                    Err(_) => {}
                }
            }
        }
        let was_empty = q.frames.is_empty();
        q.idle = false;
        q.bytes += frame.len();
        q.frames.push_back(frame);
        drop(q);
        if was_empty {
            self.wake.notify_one();
        }
    }

    /// Let the worker write to `socket` itself (once the task has written what it has).
    pub(super) fn attach(&self, socket: Arc<tokio::net::TcpStream>) {
        self.queue().direct = Some(socket);
    }

    /// The task closes the connection: the worker writes to it no more and lets go of the socket.
    /// Returns what is left of a frame the worker wrote in part, which must go out before the
    /// close frame.
    pub(super) fn detach(&self) -> Option<Bytes> {
        let mut q = self.queue();
        q.idle = false;
        q.direct = None;
        if let Some(drained) = q.drained.take() {
            drained.notify_one();
        }
        match std::mem::take(&mut q.partial) {
            true => q.frames.pop_front(),
            false => None,
        }
    }

    /// The task wrote everything: the worker may write directly again, unless more is queued.
    pub(super) fn written(&self) {
        let mut q = self.queue();
        q.idle = q.frames.is_empty();
        let more = !q.idle;
        drop(q);
        if more {
            self.wake.notify_one();
        }
    }

    /// Whether the queue has room for `n` more frames, keeping it at most half full (`max`:
    /// frames and bytes); if not, `drained` is told when the task next takes the queue.
    fn has_room(&self, n: usize, (max_frames, max_bytes): (usize, usize), drained: &Arc<Notify>) -> bool {
        let mut q = self.queue();
        let room = q.frames.is_empty() || (q.frames.len() + n <= max_frames / 2 && q.bytes <= max_bytes / 2);
        if !room {
            q.drained = Some(drained.clone());
        }
        room
    }

    /// Move everything queued into `out`.
    pub(super) fn take(&self, out: &mut VecDeque<Bytes>) {
        let mut q = self.queue();
        q.idle = false;
        q.partial = false;
        q.bytes = 0;
        if out.is_empty() {
            std::mem::swap(out, &mut q.frames);
        } else {
            out.extend(q.frames.drain(..));
        }
        if let Some(drained) = q.drained.take() {
            drained.notify_one();
        }
    }
}

/// Warnings about events that cannot be decoded: at most one line per interval.
static BAD_EVENT_LOG: crate::metrics::LogEvery = crate::metrics::LogEvery::new(Duration::from_secs(10));

/// Who a connection is, for the connections that are someone (a token, a bind, a join). Kept
/// apart from the connection table, so that a broadcast walks a table of bare pointers.
#[derive(Default)]
struct Who {
    uid: Option<Arc<str>>,
    topics: Vec<Arc<str>>,
}

/// The latest offset a worker delivered on one channel; while a gap is being filled from
/// history, the messages that arrived after it.
struct Seen {
    epoch: Arc<str>,
    offset: u64,
    held: Option<Vec<Message>>,
}

/// A channel a connection is recovering: the live frames held for it meanwhile, by offset; then,
/// once its history is queued (`done`: the last offset it has), the live messages that were
/// already on their way to the worker are dropped for it until the next one arrives.
struct Recovering {
    channel: String,
    frames: Vec<(u64, Bytes)>,
    done: Option<u64>,
}

/// What to do with a message that has an offset.
enum Check {
    Deliver,
    Duplicate,
    /// Held behind a gap being filled.
    Held,
    /// A gap after `since` (in the message's epoch): fill it, then deliver what is held.
    Repair {
        since: u64,
    },
}

/// A gap's filling, from the task that read the history back to the worker's own task.
pub(super) struct Repaired {
    channel: Bytes,
    epoch: Arc<str>,
    items: Option<Vec<(u64, Bytes)>>,
}

/// Most frames handed to a recovering connection at a time.
const RECOVERY_CHUNK: usize = 64;
/// How long a recovering connection may take nothing before it is cut off as a slow consumer.
const RECOVERY_STALL: Duration = Duration::from_secs(30);
/// Bytes of encoded history frames kept for connections recovering the same messages; past it
/// the cache starts again (and it is emptied when no recovery is under way).
const MAX_HISTORY_FRAME_BYTES: usize = 32 << 20;

/// Encoded history frames by (channel, epoch), then by (offset, kind of connection).
#[derive(Default)]
struct HistoryFrames {
    frames: HashMap<(String, String), HashMap<(u64, u8), Bytes>>,
    bytes: usize,
}

/// Messages held behind one gap before newer ones are dropped (and make a gap of their own).
const MAX_HELD: usize = 8192;
/// Most messages read from history to fill one gap or recover one channel.
const MAX_RECOVERED: usize = 10_000;

/// The connections of a worker and the indexes over them.
#[derive(Default)]
struct Table {
    conns: HashMap<u64, Arc<Conn>>,
    who: HashMap<u64, Who>,
    users: HashMap<Arc<str>, HashSet<u64>>,
    topics: HashMap<Arc<str>, HashSet<u64>>,
    /// Channels with offsets that somebody here holds.
    seen: HashMap<Bytes, Seen>,
    /// Connections recovering channels (`recover=`), until their history is queued.
    recovering: HashMap<u64, Vec<Recovering>>,
    /// Users and topics that arrived on or left this worker, numbered, for the presence
    /// trackers; bounded: when full, the oldest go (a tracker sees the gap and asks for all).
    changes: VecDeque<Change>,
    seq: u64,
    reported: u64,
}

/// Changes kept for the trackers before the oldest are dropped.
const MAX_CHANGES: usize = 65_536;

/// Whether the worker keeps up, so that it may write pushes to idle connections itself: nothing
/// else is waiting from the broker, and writing this message directly would keep the worker busy
/// at most half the time since the last message (as long as the last one written directly took).
/// Otherwise pushes are queued, and each connection's task writes several at once when it gets
/// to run: under overload, writes coalesce instead of costing a system call per push.
#[derive(Default)]
struct Pace {
    last: Option<Instant>,
    last_direct: Duration,
}

impl Pace {
    /// Whether the message that came at `now` is written directly (`backlog`: more are waiting).
    fn direct(&mut self, now: Instant, backlog: bool) -> bool {
        let since = self.last.map_or(Duration::MAX, |l| now.saturating_duration_since(l));
        self.last = Some(now);
        !backlog && since >= self.last_direct * 2
    }

    /// The last message written directly took `took`.
    fn took(&mut self, took: Duration) {
        self.last_direct = took;
    }
}

/// Whom a push is for.
enum Target<'a> {
    All,
    Conn(u64),
    User(&'a str),
    Topic(&'a str),
}

/// One worker shard: its id, its connections, its connection counter, its broker subscription.
pub struct Worker {
    pub id: String,
    table: Mutex<Table>,
    next_conn: AtomicU64,
    epoch: Instant,
    max_frames: usize,
    max_bytes: usize,
    broker: Arc<dyn Broker>,
    sub: SubId,
    repairs: mpsc::Sender<Repaired>,
    /// Pushes of at least this many bytes are compressed for connections that negotiated it
    /// (`None`: compression is off).
    compress_from: Option<usize>,
    /// The worker keeps up (see [`Pace`]): pushes are written to idle connections directly.
    quiet: AtomicBool,
    /// History frames encoded for recovering connections, shared by those of the same range.
    history_frames: Mutex<HistoryFrames>,
}

impl Worker {
    /// A worker, and the receiving end of its gap fillings for [`Worker::run`].
    pub(super) fn new(
        id: String,
        (max_frames, max_bytes): (usize, usize),
        compress_from: Option<usize>,
        broker: Arc<dyn Broker>,
        sub: SubId,
    ) -> (Worker, mpsc::Receiver<Repaired>) {
        let (table, next_conn, epoch) = (Mutex::default(), AtomicU64::new(0), Instant::now());
        let (repairs, done) = mpsc::channel(64);
        let quiet = AtomicBool::new(true);
        let history_frames = Mutex::default();
        let w = Worker {
            id,
            table,
            next_conn,
            epoch,
            max_frames,
            max_bytes,
            broker,
            sub,
            repairs,
            compress_from,
            quiet,
            history_frames,
        };
        (w, done)
    }

    /// Carry out what the broker sends (and the gap fillings) until the subscription ends. One
    /// task per worker: messages of a channel are delivered in order.
    pub(super) async fn run(self: Arc<Self>, mut sub: Subscription, mut repairs: mpsc::Receiver<Repaired>) {
        let mut pace = Pace::default();
        loop {
            tokio::select! {
                m = sub.recv() => match m {
                    // The seed's pushes are PHP arrays; requests from publishers are PHP strings.
                    Some(m) if crate::cluster::is_request(&m.data) && m.channel == self.id.as_bytes() => {
                        self.answer(m.data)
                    }
                    Some(m) => {
                        let start = Instant::now();
                        let direct = pace.direct(start, !sub.rx.is_empty());
                        self.quiet.store(direct, Ordering::Relaxed);
                        self.receive(m);
                        if direct {
                            pace.took(start.elapsed());
                        }
                    }
                    None => return,
                },
                Some(r) = repairs.recv() => self.repaired(r),
            }
        }
    }

    fn table(&self) -> std::sync::MutexGuard<'_, Table> {
        self.table.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether a push of `content` goes compressed to connections that negotiated compression.
    fn compresses(&self, content: &[u8]) -> bool {
        self.compress_from.is_some_and(|m| content.len() >= m)
    }

    /// Take connection `id`, whose queue is full, out of the table and close it (1008); its task
    /// forgets who it was as it ends.
    fn cut_slow(&self, t: &mut Table, id: u64) {
        if let Some(c) = t.conns.remove(&id) {
            GLOBAL.slow_consumer_disconnects.fetch_add(1, Ordering::Relaxed);
            tracing::info!(worker = %self.id, connection = id, "client not reading: closing (slow consumer)");
            c.close(close::POLICY);
        }
    }

    /// Milliseconds since the worker started: the clock of `last_seen`.
    pub(super) fn now(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    /// Add a connection who is `who`; once this returns, pushes to its user and topics reach it
    /// (the broker confirmed the subscriptions, or is down and renews them when it is back).
    pub(super) async fn add(self: &Arc<Self>, wants: Wants, sse: bool, deflate: bool) -> (u64, Arc<Conn>) {
        let id = self.next_conn.fetch_add(1, Ordering::Relaxed) + 1;
        let conn = Arc::new(Conn {
            queue: Mutex::default(),
            wake: Notify::new(),
            close_code: AtomicU16::new(0),
            last_seen: AtomicU64::new(self.now()),
            sse,
            json: wants.json,
            deflate,
        });
        let Wants { who, recover, .. } = wants;
        let channels = broker_channels(who.uid.as_deref(), &who.channels);
        let uid: Option<Arc<str>> = who.uid.map(Into::into);
        let topics: Vec<Arc<str>> = who.channels.into_iter().map(Into::into).collect();
        {
            let mut t = self.table();
            if let Some(u) = &uid {
                t.index(false, u, id);
            }
            for topic in &topics {
                t.index(true, topic, id);
            }
            t.conns.insert(id, conn.clone());
            if !recover.is_empty() {
                let held =
                    recover.iter().map(|r| Recovering { channel: r.channel.clone(), frames: Vec::new(), done: None });
                t.recovering.insert(id, held.collect());
            }
            if uid.is_some() || !topics.is_empty() {
                t.who.insert(id, Who { uid: uid.clone(), topics });
            }
        }
        if !channels.is_empty() {
            if let Err(e) = self.broker.join(self.sub, channels).await {
                tracing::warn!(worker = %self.id, connection = id, "subscriptions of a new connection not confirmed: {e}");
            }
        }
        // Live messages are held for the connection from before the join: the history read after
        // it overlaps them, and the seam is found by offset.
        if !recover.is_empty() {
            let (w, c) = (self.clone(), conn.clone());
            tokio::spawn(async move {
                for r in recover {
                    let items = read_history(&*w.broker, &r.channel, &r.epoch, r.offset, None).await;
                    if !w.recovered(id, &c, &r, uid.as_deref(), items).await {
                        return;
                    }
                }
            });
        }
        (id, conn)
    }

    /// Feed connection `id` what it missed on `r.channel` (`items`, or `None` when the history
    /// does not reach back), then the live messages held for it meanwhile, then the notice, as
    /// its client drains its queue; the history frames are encoded outside the table lock and
    /// shared with other connections recovering the same messages. Whether the connection is
    /// still there.
    async fn recovered(
        &self,
        id: u64,
        conn: &Arc<Conn>,
        r: &super::Recover,
        uid: Option<&str>,
        items: Option<Vec<(u64, Bytes)>>,
    ) -> bool {
        let ok = items.is_some();
        let mut last = r.offset;
        match items {
            Some(items) => {
                GLOBAL.recoveries.fetch_add(1, Ordering::Relaxed);
                let epoch: Arc<str> = r.epoch.as_str().into();
                for chunk in items.chunks(self.recovery_chunk()) {
                    last = chunk.last().map_or(last, |(o, _)| *o);
                    if !self.room_for(id, conn, chunk.len()).await {
                        return false;
                    }
                    for frame in self.history_frames(conn, &r.channel, &epoch, chunk, uid) {
                        if !self.feed(id, conn, &frame) {
                            return false;
                        }
                    }
                }
            }
            None => {
                GLOBAL.recoveries_failed.fetch_add(1, Ordering::Relaxed);
                if !self.feed(id, conn, &conn.encode(&format::recovered(&r.channel, false))) {
                    return false;
                }
            }
        }
        // What the client has up to: after a failed recovery, only the held live messages count.
        let mut has = ok.then_some(last);
        loop {
            let chunk = self.recovery_chunk();
            if !self.room_for(id, conn, chunk).await {
                return false;
            }
            let mut t = self.table();
            let caught_up = |has: u64, t: &Table| {
                t.seen.get(r.channel.as_bytes()).is_some_and(|s| *s.epoch == *r.epoch && s.offset >= has)
            };
            let Some(rec) = recovery_of(&mut t.recovering, id, &r.channel) else { return false };
            let held: Vec<(u64, Bytes)> = rec.frames.drain(..chunk.min(rec.frames.len())).collect();
            let finished = rec.frames.is_empty();
            for (offset, frame) in held {
                if offset > last || !ok {
                    has = Some(has.map_or(offset, |h| h.max(offset)));
                    if let Offer::Full = conn.offer(&frame, self.max_frames, self.max_bytes, false) {
                        self.cut_slow(&mut t, id);
                        return false;
                    }
                }
            }
            if !finished {
                continue;
            }
            if ok {
                let _ = conn.offer(&conn.encode(&format::recovered(&r.channel, true)), usize::MAX, usize::MAX, false);
            }
            // Live messages up to `has` that are still on their way to the worker (the history
            // had them first) are dropped for the client until the worker is past them.
            match has {
                Some(h) if ok && !caught_up(h, &t) => {
                    if let Some(rec) = recovery_of(&mut t.recovering, id, &r.channel) {
                        rec.done = Some(h);
                    }
                }
                _ => stop_recovering(&mut t.recovering, id, &r.channel),
            }
            // The last recovery here is done: its frames are not kept for later ones.
            if t.recovering.is_empty() {
                *self.history_frames.lock().unwrap_or_else(|e| e.into_inner()) = HistoryFrames::default();
            }
            return true;
        }
    }

    /// Frames handed to a recovering connection at a time.
    fn recovery_chunk(&self) -> usize {
        (self.max_frames / 4).clamp(1, RECOVERY_CHUNK)
    }

    /// Wait until connection `id` has room for `n` more frames (its queue at most half full with
    /// them), woken when its task takes the queue; false when it is gone, or took nothing for
    /// [`RECOVERY_STALL`] (then cut off).
    async fn room_for(&self, id: u64, conn: &Conn, n: usize) -> bool {
        let drained = Arc::new(Notify::new());
        loop {
            if conn.close_code.load(Ordering::Acquire) != 0 || !self.table().conns.contains_key(&id) {
                return false;
            }
            if conn.has_room(n, (self.max_frames, self.max_bytes), &drained) {
                return true;
            }
            // Woken also when the connection ends (its task detaches it).
            if tokio::time::timeout(RECOVERY_STALL, drained.notified()).await.is_err() {
                self.cut_slow(&mut self.table(), id);
                return false;
            }
        }
    }

    /// Queue `frame` to a recovering connection; a full queue cuts it off (false).
    fn feed(&self, id: u64, conn: &Conn, frame: &Bytes) -> bool {
        match conn.offer(frame, self.max_frames, self.max_bytes, false) {
            Offer::Full => {
                self.cut_slow(&mut self.table(), id);
                false
            }
            _ => true,
        }
    }

    /// History `items` of `channel` (in `epoch`) as `conn` gets them, without those whose
    /// publisher excluded user `uid`: each encoded once per kind of connection and kept a while,
    /// for the other connections recovering the same messages.
    fn history_frames(
        &self,
        conn: &Conn,
        channel: &str,
        epoch: &Arc<str>,
        items: &[(u64, Bytes)],
        uid: Option<&str>,
    ) -> Vec<Bytes> {
        let mut cache = self.history_frames.lock().unwrap_or_else(|e| e.into_inner());
        if cache.bytes > MAX_HISTORY_FRAME_BYTES {
            *cache = HistoryFrames::default();
        }
        let HistoryFrames { frames, bytes } = &mut *cache;
        let of_range = frames.entry((channel.to_owned(), epoch.to_string())).or_insert_with(|| {
            *bytes += channel.len() + epoch.len() + 64;
            HashMap::new()
        });
        let mut out = Vec::with_capacity(items.len());
        for (offset, data) in items {
            let Ok(push) = Push::decode(data) else { continue };
            if uid.is_some_and(|u| push.exclude_uid.iter().any(|x| x == u.as_bytes())) {
                continue;
            }
            let compress = self.compresses(&push.content) && conn.deflate;
            let kind = conn.sse as u8 * 4 + conn.json as u8 * 2 + compress as u8;
            let frame = of_range.entry((*offset, kind)).or_insert_with(|| {
                let p = Position { offset: *offset, epoch: epoch.clone() };
                let f = conn.encode_push(channel, Some(&p), &push.content, compress);
                *bytes += f.len();
                f
            });
            out.push(frame.clone());
        }
        out
    }

    /// Carry out a change to one of this worker's connections, asked for by a publisher.
    pub async fn control(&self, req: &Request) -> Answer {
        let change = {
            let mut t = self.table();
            match req {
                Request::Bind { conn, uid } => t.bind(*conn, Some(uid)),
                Request::Unbind { conn, .. } if !t.conns.contains_key(conn) => Err(Refusal::NoConnection),
                Request::Unbind { conn, uid } => match t.who.get(conn).and_then(|w| w.uid.as_deref()) {
                    Some(u) if u == uid => t.bind(*conn, None),
                    _ => Ok((None, None)),
                },
                Request::Join { conn, channel } => t.join(*conn, channel),
                Request::Leave { conn, channel } => t.leave(*conn, channel),
                Request::Dump { topics, after } => {
                    drop(t);
                    let (names, seq) = self.dump(*topics, after);
                    return Answer { ok: true, uids: names, seq, ..Answer::default() };
                }
                _ => return Answer::default(),
            }
        };
        let (join, leave) = match change {
            Err(Refusal::NoConnection) => return Answer::default(),
            Err(Refusal::Refused(e)) => return Answer { ok: true, error: Some(e), ..Answer::default() },
            Ok(c) => c,
        };
        if let Some(c) = join {
            if let Err(e) = self.broker.join(self.sub, vec![c]).await {
                tracing::warn!(worker = %self.id, "join not confirmed: {e}");
            }
        }
        if let Some(c) = leave {
            let _ = self.broker.leave(self.sub, vec![c]).await;
        }
        Answer { ok: true, ..Answer::default() }
    }

    /// Answer a publisher's request about one of this worker's connections.
    pub(super) fn answer(self: &Arc<Self>, data: Bytes) {
        let Some(env) = crate::cluster::decode::<Envelope>(&data) else {
            GLOBAL.bad_broker_messages.fetch_add(1, Ordering::Relaxed);
            return;
        };
        let w = self.clone();
        tokio::spawn(async move {
            let mut a = w.control(&env.req).await;
            (a.id, a.node) = (env.id, w.id.clone());
            let _ = w.broker.publish(&env.reply, crate::cluster::encode(&a)).await;
        });
    }

    /// Connections of user `uid` here.
    pub fn user_connections(&self, uid: &str) -> usize {
        self.table().users.get(uid).map_or(0, HashSet::len)
    }

    /// Connections in topic `topic` here; their users are added to `uids` (up to `cap` in all).
    pub fn topic_members(&self, topic: &str, uids: &mut std::collections::BTreeSet<String>, cap: usize) -> usize {
        let t = self.table();
        let Some(ids) = t.topics.get(topic) else { return 0 };
        for id in ids {
            if uids.len() >= cap {
                break;
            }
            if let Some(u) = t.who.get(id).and_then(|w| w.uid.as_deref()) {
                if !uids.contains(u) {
                    uids.insert(u.to_owned());
                }
            }
        }
        ids.len()
    }

    /// The changes since the last call; they count as reported from then on.
    pub(super) fn take_changes(&self) -> Vec<Change> {
        let mut t = self.table();
        t.reported = t.seq;
        t.changes.drain(..).collect()
    }

    /// The number of the latest change handed to [`Worker::take_changes`].
    pub(super) fn reported(&self) -> u64 {
        self.table().reported
    }

    /// One page of this worker's users (or topics), in order, after `after`; and the number of
    /// the latest change.
    pub(super) fn dump(&self, topics: bool, after: &str) -> (Vec<String>, u64) {
        let t = self.table();
        let keys: Vec<&Arc<str>> = if topics { t.topics.keys().collect() } else { t.users.keys().collect() };
        let mut page: Vec<String> = keys.into_iter().filter(|k| &***k > after).map(|k| k.to_string()).collect();
        page.sort_unstable();
        page.truncate(DUMP_PAGE);
        (page, t.seq)
    }

    /// (users, topics) with a connection here.
    pub fn counts(&self) -> (usize, usize) {
        let t = self.table();
        (t.users.len(), t.topics.len())
    }

    /// Forget connection `id` (if still known) and leave its user's and topics' channels.
    pub(super) async fn remove(&self, id: u64) {
        let Some(w) = self.table().unlink(id) else { return };
        let channels = broker_channels(w.uid.as_deref(), &w.topics);
        if !channels.is_empty() {
            let _ = self.broker.leave(self.sub, channels).await;
        }
    }

    /// Number of open connections.
    pub fn connections(&self) -> usize {
        self.table().conns.len()
    }

    /// Queue `frame` to the connections `to` names, except those of the users in `exclude`;
    /// returns deliveries.
    fn send(&self, frames: &Frames<'_>, to: Target<'_>, exclude: &[Vec<u8>]) -> usize {
        let mut table = self.table();
        let Table { conns, users, topics, recovering, .. } = &mut *table;
        // The connections of the excluded users (none in the common case: nothing to look up).
        let skip: Option<HashSet<u64>> = (!exclude.is_empty()).then(|| {
            exclude.iter().filter_map(|u| users.get(std::str::from_utf8(u).ok()?)).flatten().copied().collect()
        });
        let (mut slow, mut direct) = (Vec::new(), Vec::new());
        let mut delivered = 0;
        let (max_frames, max_bytes) = (self.max_frames, self.max_bytes);
        let quiet = self.quiet.load(Ordering::Relaxed);
        let offer = |id: u64, c: &Arc<Conn>| {
            let skipped = skip.as_ref().is_some_and(|s| s.contains(&id));
            // A connection recovering this channel gets it after its history (none usually); a
            // message not for it still tells where the worker is.
            if let (false, Some(p)) = (recovering.is_empty(), frames.position) {
                if let Some(r) = recovery_of(recovering, id, frames.channel) {
                    match r.done {
                        None if skipped => return,
                        None if r.frames.len() < max_frames => {
                            return r.frames.push((p.offset, frames.for_conn(c).clone()))
                        }
                        None => return slow.push(id),
                        // Sent with the history already; the worker is past the history's end
                        // once it has the last message of it.
                        Some(last) if p.offset <= last => {
                            if p.offset == last {
                                stop_recovering(recovering, id, frames.channel);
                            }
                            return;
                        }
                        Some(last) => {
                            stop_recovering(recovering, id, frames.channel);
                            // Not expected (the live messages flow before the history is read),
                            // but never silent.
                            if p.offset > last + 1 {
                                let _ = c.offer(
                                    &c.encode(&format::recovered(frames.channel, false)),
                                    max_frames,
                                    max_bytes,
                                    false,
                                );
                            }
                        }
                    }
                }
            }
            if skipped {
                return;
            }
            let frame = frames.for_conn(c);
            match c.offer(frame, max_frames, max_bytes, quiet) {
                Offer::Queued => delivered += 1,
                Offer::Direct => direct.push((c.clone(), frame.clone())),
                Offer::Full => slow.push(id),
            }
        };
        each_member(conns, users, topics, to, offer);
        for id in slow {
            self.cut_slow(&mut table, id);
        }
        drop(table);
        // Written with the table unlocked: connections come and go meanwhile. Sends come from the
        // worker's one task, so a connection's pushes still go out in order.
        delivered += direct.len();
        for (c, frame) in direct {
            c.write(frame);
        }
        GLOBAL.deliveries.fetch_add(delivered as u64, Ordering::Relaxed);
        delivered
    }

    /// Take one message from the broker: deliver it, unless it is a duplicate or comes after a
    /// gap (then held, and the gap filled from history first).
    pub(super) fn receive(self: &Arc<Self>, m: Message) {
        let Some(p) = m.position.clone() else { return self.handle(m) };
        let check = self.table().check(&m, &p);
        match check {
            Check::Deliver => self.handle(m),
            Check::Duplicate => {
                GLOBAL.duplicates.fetch_add(1, Ordering::Relaxed);
            }
            Check::Held => {}
            Check::Repair { since } => {
                GLOBAL.gaps.fetch_add(1, Ordering::Relaxed);
                let channel = String::from_utf8_lossy(&m.channel).into_owned();
                tracing::info!(worker = %self.id, %channel, since, next = p.offset, "gap in offsets: filling it from history");
                let w = self.clone();
                tokio::spawn(async move {
                    let items = read_history(&*w.broker, &channel, &p.epoch, since, Some(p.offset)).await;
                    let _ = w.repairs.send(Repaired { channel: m.channel, epoch: p.epoch, items }).await;
                });
            }
        }
    }

    /// Deliver a gap's filling (or report that there is none), then what was held behind it.
    fn repaired(self: &Arc<Self>, r: Repaired) {
        let Some(held) = self.table().seen.get_mut(&r.channel).and_then(|s| s.held.take()) else { return };
        let channel = String::from_utf8_lossy(&r.channel).into_owned();
        match r.items {
            Some(items) => {
                for (offset, data) in items {
                    let position = Some(Position { offset, epoch: r.epoch.clone() });
                    if let Some(s) = self.table().seen.get_mut(&r.channel) {
                        s.offset = offset;
                    }
                    self.handle(Message { channel: r.channel.clone(), data, position });
                }
            }
            None => {
                GLOBAL.gaps_unrepaired.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(worker = %self.id, %channel, "gap in offsets that history cannot fill: clients told");
                if let (Some(s), Some(first)) = (self.table().seen.get_mut(&r.channel), held.first()) {
                    s.offset = first.position.as_ref().map_or(0, |p| p.offset.saturating_sub(1));
                }
                self.notify(&channel, false);
            }
        }
        for m in held {
            self.receive(m);
        }
    }

    /// Tell the JSON connections of `channel` whether what they missed could be delivered.
    fn notify(&self, channel: &str, ok: bool) {
        let Some(to) = target(channel) else { return };
        let text = format::recovered(channel, ok);
        let t = self.table();
        each_member(&t.conns, &t.users, &t.topics, to, |_, c| {
            if c.json {
                let _ = c.offer(&c.encode(&text), self.max_frames, self.max_bytes, false);
            }
        });
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
        let channel = std::str::from_utf8(&m.channel).unwrap_or_default();
        let frames = Frames::new(channel, m.position.as_ref(), &push.content, self.compresses(&push.content));
        if let Some(to) = target(channel) {
            self.send(&frames, to, &push.exclude_uid);
            return;
        }
        let target = push.to_connection_id.as_deref().and_then(|c| std::str::from_utf8(c).ok()?.trim().parse().ok());
        let delivered = target.map_or(0, |id| self.send(&frames, Target::Conn(id), &[]));
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
        let (ping, comment) = (ws::ping(), crate::sse::heartbeat());
        self.table().conns.retain(|_, c| {
            // An SSE client never writes: a dead one shows as a full queue (a slow consumer).
            if !c.sse && now.saturating_sub(c.last_seen.load(Ordering::Relaxed)) > dead_after.as_millis() as u64 {
                c.close(close::GOING_AWAY);
                return false;
            }
            // A client whose queue is full gets no ping; the next push decides its fate.
            let _ = c.offer(if c.sse { &comment } else { &ping }, self.max_frames, self.max_bytes, false);
            true
        });
    }

    /// Close every connection with `code`.
    pub(super) fn close_all(&self, code: u16) {
        for (_, c) in self.table().conns.drain() {
            c.close(code);
        }
    }
}

/// Most topics one connection may be in.
pub const MAX_TOPICS_PER_CONNECTION: usize = 256;

/// Why a change to a connection was not made.
enum Refusal {
    NoConnection,
    Refused(String),
}

/// A change to a connection: the broker channel to join and the one to leave, if any.
type Edit = Result<(Option<String>, Option<String>), Refusal>;

impl Table {
    /// Where `m` (at `p`) stands against what this worker delivered on its channel.
    fn check(&mut self, m: &Message, p: &Position) -> Check {
        let held_here = match std::str::from_utf8(&m.channel).ok().and_then(target) {
            Some(Target::All) => true,
            Some(Target::User(u)) => self.users.contains_key(u),
            Some(Target::Topic(t)) => self.topics.contains_key(t),
            _ => false,
        };
        if !held_here {
            return Check::Deliver;
        }
        let Some(s) = self.seen.get_mut(&m.channel) else {
            let s = Seen { epoch: p.epoch.clone(), offset: p.offset, held: None };
            self.seen.insert(m.channel.clone(), s);
            return Check::Deliver;
        };
        if let Some(held) = &mut s.held {
            if held.len() < MAX_HELD {
                held.push(m.clone());
            } else {
                GLOBAL.subscriber_drops.fetch_add(1, Ordering::Relaxed);
            }
            return Check::Held;
        }
        if s.epoch != p.epoch {
            // The channel's history started again: from its first message on, nothing was missed.
            s.epoch = p.epoch.clone();
            s.offset = 0;
        }
        match p.offset {
            o if o <= s.offset => Check::Duplicate,
            o if o == s.offset + 1 => {
                s.offset = o;
                Check::Deliver
            }
            _ => {
                s.held = Some(vec![m.clone()]);
                Check::Repair { since: s.offset }
            }
        }
    }

    /// Make connection `id` belong to `uid` (or to nobody).
    fn bind(&mut self, id: u64, uid: Option<&str>) -> Edit {
        if !self.conns.contains_key(&id) {
            return Err(Refusal::NoConnection);
        }
        let e = self.who.entry(id).or_default();
        if e.uid.as_deref() == uid {
            return Ok((None, None));
        }
        let old = std::mem::replace(&mut e.uid, uid.map(Into::into));
        if let Some(u) = e.uid.clone() {
            self.index(false, &u, id);
        }
        if let Some(o) = &old {
            self.unindex(false, o, id);
        }
        Ok((uid.map(user_channel), old.as_deref().map(user_channel)))
    }

    /// Add connection `id` to topic `topic`.
    fn join(&mut self, id: u64, topic: &str) -> Edit {
        if !self.conns.contains_key(&id) {
            return Err(Refusal::NoConnection);
        }
        let e = self.who.entry(id).or_default();
        if e.topics.iter().any(|t| &**t == topic) {
            return Ok((None, None));
        }
        if e.topics.len() >= MAX_TOPICS_PER_CONNECTION {
            return Err(Refusal::Refused(format!("the connection is in {MAX_TOPICS_PER_CONNECTION} topics already")));
        }
        let topic: Arc<str> = topic.into();
        e.topics.push(topic.clone());
        self.index(true, &topic, id);
        Ok((Some(topic_channel(&topic)), None))
    }

    /// Take connection `id` out of topic `topic`.
    fn leave(&mut self, id: u64, topic: &str) -> Edit {
        if !self.conns.contains_key(&id) {
            return Err(Refusal::NoConnection);
        }
        let Some(e) = self.who.get_mut(&id) else { return Ok((None, None)) };
        let Some(i) = e.topics.iter().position(|t| &**t == topic) else { return Ok((None, None)) };
        e.topics.swap_remove(i);
        self.unindex(true, topic, id);
        Ok((None, Some(topic_channel(topic))))
    }

    /// Forget connection `id` and who it was.
    fn unlink(&mut self, id: u64) -> Option<Who> {
        self.conns.remove(&id);
        self.recovering.remove(&id);
        let e = self.who.remove(&id)?;
        if let Some(u) = &e.uid {
            self.unindex(false, u, id);
        }
        for t in &e.topics {
            self.unindex(true, t, id);
        }
        Some(e)
    }

    /// Put connection `id` under user (or topic) `name`; the first one is a change to report.
    fn index(&mut self, topic: bool, name: &Arc<str>, id: u64) {
        let index = if topic { &mut self.topics } else { &mut self.users };
        if add_member(index, name, id) {
            self.note(true, topic, name);
        }
    }

    /// Take connection `id` from under user (or topic) `name`; the last one is a change to report.
    fn unindex(&mut self, topic: bool, name: &str, id: u64) {
        let index = if topic { &mut self.topics } else { &mut self.users };
        if let Some(name) = remove_member(index, name, id) {
            let channel = if topic { topic_channel(&name) } else { user_channel(&name) };
            self.seen.remove(channel.as_bytes());
            self.note(false, topic, &name);
        }
    }

    /// Record that user or topic `name` arrived on (`up`) or left this worker.
    fn note(&mut self, up: bool, topic: bool, name: &Arc<str>) {
        self.seq += 1;
        if self.changes.len() >= MAX_CHANGES {
            self.changes.pop_front();
        }
        self.changes.push_back(Change { seq: self.seq, up, topic, name: name.to_string() });
    }
}

/// Add `id` under `name`; whether it is the first there.
fn add_member(index: &mut HashMap<Arc<str>, HashSet<u64>>, name: &Arc<str>, id: u64) -> bool {
    let ids = index.entry(name.clone()).or_default();
    ids.insert(id);
    ids.len() == 1
}

/// Remove `id` from under `name`; the name, if nobody is left under it.
fn remove_member(index: &mut HashMap<Arc<str>, HashSet<u64>>, name: &str, id: u64) -> Option<Arc<str>> {
    let ids = index.get_mut(name)?;
    ids.remove(&id);
    if !ids.is_empty() {
        return None;
    }
    index.remove_entry(name).map(|(name, _)| name)
}

/// Call `f` for each connection `to` names, found through the indexes.
fn each_member(
    conns: &HashMap<u64, Arc<Conn>>,
    users: &HashMap<Arc<str>, HashSet<u64>>,
    topics: &HashMap<Arc<str>, HashSet<u64>>,
    to: Target<'_>,
    mut f: impl FnMut(u64, &Arc<Conn>),
) {
    let ids = match to {
        Target::All => return conns.iter().for_each(|(id, c)| f(*id, c)),
        Target::Conn(id) => return conns.get(&id).into_iter().for_each(|c| f(id, c)),
        Target::User(u) => users.get(u),
        Target::Topic(t) => topics.get(t),
    };
    for id in ids.into_iter().flatten() {
        if let Some(c) = conns.get(id) {
            f(*id, c);
        }
    }
}

/// The recovery of `channel` that connection `id` has under way, if any.
fn recovery_of<'r>(
    recovering: &'r mut HashMap<u64, Vec<Recovering>>,
    id: u64,
    channel: &str,
) -> Option<&'r mut Recovering> {
    recovering.get_mut(&id)?.iter_mut().find(|r| r.channel == channel)
}

/// Connection `id` is done recovering `channel`.
fn stop_recovering(recovering: &mut HashMap<u64, Vec<Recovering>>, id: u64, channel: &str) {
    if let Some(list) = recovering.get_mut(&id) {
        list.retain(|r| r.channel != channel);
        if list.is_empty() {
            recovering.remove(&id);
        }
    }
}

/// Whom a push on `channel` is for, unless it is a worker's own channel.
fn target(channel: &str) -> Option<Target<'_>> {
    Some(match Audience::of(channel)? {
        Audience::All => Target::All,
        Audience::User(u) => Target::User(u),
        Audience::Topic(t) => Target::Topic(t),
    })
}

/// Messages of `channel` after `since` in `epoch`, read from the broker's history up to (not
/// including) offset `until`, or up to its latest message; `None` when the history does not reach
/// back to `since` (or changed epoch, or is not kept). A history that cannot be read right now (a
/// link just back, a store electing a leader) is asked again for up to [`HISTORY_PATIENCE`].
async fn read_history(
    broker: &dyn Broker,
    channel: &str,
    epoch: &str,
    since: u64,
    until: Option<u64>,
) -> Option<Vec<(u64, Bytes)>> {
    let deadline = tokio::time::Instant::now() + HISTORY_PATIENCE;
    let mut wait = Duration::from_millis(100);
    loop {
        match read_history_once(broker, channel, epoch, since, until).await {
            Ok(items) => return items,
            Err(e) if tokio::time::Instant::now() + wait < deadline => {
                tracing::debug!(%channel, "history not read yet: {e}");
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(Duration::from_secs(1));
            }
            Err(e) => {
                tracing::info!(%channel, "history could not be read: {e}");
                return None;
            }
        }
    }
}

/// How long a gap's filling or a recovery waits for a history that cannot be read right now.
const HISTORY_PATIENCE: Duration = Duration::from_secs(8);

/// One try of [`read_history`].
async fn read_history_once(
    broker: &dyn Broker,
    channel: &str,
    epoch: &str,
    since: u64,
    until: Option<u64>,
) -> Result<Option<Vec<(u64, Bytes)>>, crate::broker::BrokerError> {
    let mut items = Vec::new();
    let mut at = since;
    let mut until = until;
    while items.len() < MAX_RECOVERED {
        let page: Page = match broker.history(channel, at, history::MAX_PAGE).await {
            Ok(p) => p,
            Err(crate::broker::BrokerError::NoHistory(_)) => return Ok(None),
            Err(e) => return Err(e),
        };
        // The store has the message at `until` (it was delivered): a page that ends before it
        // comes from a replica that has not caught up yet.
        if until.is_some_and(|u| page.epoch == epoch && page.offset + 1 < u) {
            return Err(crate::broker::BrokerError::Unavailable(format!("history of {channel} behind")));
        }
        if !page.reaches(epoch, at) {
            return Ok(None);
        }
        let end = *until.get_or_insert(page.offset + 1);
        if page.items.is_empty() {
            return Ok((at + 1 >= end).then_some(items));
        }
        for (offset, data) in page.items {
            if offset >= end {
                return Ok(Some(items));
            }
            at = offset;
            items.push((offset, data));
        }
        if at + 1 >= end {
            return Ok(Some(items));
        }
        if at == page.offset {
            // The history ends before `until`: what is missing is gone.
            return Ok(None);
        }
    }
    Ok(None)
}

/// The broker channels of a connection of user `uid` in `topics`.
fn broker_channels<T: AsRef<str>>(uid: Option<&str>, topics: &[T]) -> Vec<String> {
    uid.map(user_channel).into_iter().chain(topics.iter().map(|t| topic_channel(t.as_ref()))).collect()
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
pub fn bench_worker(n: usize, queue: usize) -> (Arc<Worker>, Vec<Arc<Conn>>) {
    let broker = Arc::new(crate::broker::memory::MemoryBroker::new(Arc::default(), ""));
    let w = Arc::new(Worker::new("bench-0".into(), (queue, usize::MAX), None, broker, 0).0);
    let rt = tokio::runtime::Builder::new_current_thread().build().expect("runtime");
    let conns = (0..n).map(|_| rt.block_on(w.add(Wants::default(), false, false)).1).collect();
    (w, conns)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    /// A worker on an in-process broker that keeps history, and that broker.
    fn worker_with_history(max_frames: usize) -> (Arc<Worker>, Arc<dyn Broker>) {
        let hub = Arc::new(crate::hub::Hub::new(Default::default(), history::HistoryConfig::default()));
        let broker: Arc<dyn Broker> = Arc::new(crate::broker::memory::MemoryBroker::new(hub, ""));
        (Arc::new(Worker::new("test-0".into(), (max_frames, usize::MAX), None, broker.clone(), 0).0), broker)
    }

    /// Publish `content` on `channel`: the message as the worker gets it, with its position.
    async fn published(broker: &Arc<dyn Broker>, channel: &str, content: &str, exclude: &[&str]) -> Message {
        let push = Push {
            to_connection_id: None,
            content: content.as_bytes().to_vec(),
            exclude_uid: exclude.iter().map(|u| u.as_bytes().to_vec()).collect(),
        };
        let data = push.encode();
        let position = broker.publish(channel, data.clone()).await.expect("publish");
        Message { channel: Bytes::from(channel.to_owned()), data, position }
    }

    /// What is queued for `conn`, as the JSON texts of its frames (small, unmasked text frames).
    fn queued_json(conn: &Conn) -> Vec<serde_json::Value> {
        let mut out = VecDeque::new();
        conn.take(&mut out);
        conn.written();
        out.iter().map(|f| serde_json::from_slice(&f[2..]).expect("a JSON frame")).collect()
    }

    /// The offsets of data messages in `msgs`, and whether a `recovered:true` notice ends them.
    fn offsets(msgs: &[serde_json::Value]) -> (Vec<u64>, bool) {
        let offsets = msgs.iter().filter_map(|m| m["offset"].as_u64()).collect();
        (offsets, msgs.last().is_some_and(|m| m["recovered"] == true))
    }

    /// Wait (a deadline, not a guess) until `conn` has a `recovered` notice queued; all queued.
    async fn until_recovered(conn: &Conn) -> Vec<serde_json::Value> {
        let mut got = Vec::new();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while !got.iter().any(|m: &serde_json::Value| m.get("recovered").is_some()) {
            assert!(tokio::time::Instant::now() < deadline, "no recovered notice: {got:?}");
            tokio::time::sleep(Duration::from_millis(2)).await;
            got.extend(queued_json(conn));
        }
        got
    }

    fn recovering(w: &Worker, epoch: &str, offset: u64, uid: Option<&str>) -> Wants {
        let recover = vec![super::super::Recover { channel: "broadcast".into(), epoch: epoch.into(), offset }];
        let who = crate::token::Identity { uid: uid.map(Into::into), channels: Vec::new() };
        assert!(w.table().recovering.is_empty());
        Wants { who, json: true, recover }
    }

    #[tokio::test]
    async fn a_recovery_meets_live_messages_at_the_seam_once_and_goes_when_it_is_done() {
        let (w, broker) = worker_with_history(1024);
        let mut live = Vec::new();
        for i in 1..=8 {
            live.push(published(&broker, "broadcast", &format!("m{i}"), &[]).await);
        }
        let epoch = live[0].position.as_ref().expect("a position").epoch.to_string();
        for m in live.drain(..) {
            w.receive(m);
        }
        // A client that saw 3 comes back; 9 and 10 come live before its history is read (held),
        // and the history has them too: each is delivered once, after 4..8.
        let (_, conn) = w.add(recovering(&w, &epoch, 3, None), false, false).await;
        for i in 9..=10 {
            let m = published(&broker, "broadcast", &format!("m{i}"), &[]).await;
            w.receive(m);
        }
        let (got, notice) = offsets(&until_recovered(&conn).await);
        assert_eq!((got, notice), ((4..=10).collect::<Vec<_>>(), true));
        assert!(w.table().recovering.is_empty(), "done: no entry left for the fan-out to look up");
        w.receive(published(&broker, "broadcast", "m11", &[]).await);
        assert_eq!(offsets(&queued_json(&conn)).0, [11], "live again");

        // The history is ahead of the worker (12 and 13 are still on their way to it): they are
        // recovered, then dropped for this client when they arrive live, and only then does the
        // recovery end.
        let (_, late) = w.add(recovering(&w, &epoch, 11, Some("bob")), false, false).await;
        let ahead =
            [published(&broker, "broadcast", "m12", &[]).await, published(&broker, "broadcast", "m13", &["bob"]).await];
        let (got, _) = offsets(&until_recovered(&late).await);
        assert_eq!(got, [12], "13 excluded bob");
        assert!(!w.table().recovering.is_empty(), "13 is still on its way");
        for m in ahead {
            w.receive(m);
        }
        assert_eq!(offsets(&queued_json(&late)).0, Vec::<u64>::new(), "no duplicate");
        assert_eq!(offsets(&queued_json(&conn)).0, [12, 13], "the other client gets them live");
        assert!(w.table().recovering.is_empty(), "past the history's end: done");
        w.receive(published(&broker, "broadcast", "m14", &[]).await);
        assert_eq!(offsets(&queued_json(&late)).0, [14]);
    }

    #[tokio::test]
    async fn a_recovery_larger_than_the_queue_is_fed_as_the_client_drains() {
        let (w, broker) = worker_with_history(16);
        let first = published(&broker, "broadcast", "m1", &[]).await;
        let epoch = first.position.as_ref().expect("a position").epoch.to_string();
        w.receive(first);
        for i in 2..=90 {
            w.receive(published(&broker, "broadcast", &format!("m{i}"), &[]).await);
        }
        let (_, conn) = w.add(recovering(&w, &epoch, 1, None), false, false).await;
        let mut got = Vec::new();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while !got.iter().any(|m: &serde_json::Value| m.get("recovered").is_some()) {
            assert!(tokio::time::Instant::now() < deadline, "stuck after {} messages", got.len());
            assert!(conn.queue().frames.len() <= 16, "never more than the queue holds");
            tokio::time::sleep(Duration::from_millis(1)).await;
            got.extend(queued_json(&conn));
        }
        assert_eq!(offsets(&got), ((2..=90).collect::<Vec<_>>(), true));
        assert_eq!(conn.close_code.load(Ordering::Relaxed), 0, "not cut off");
    }

    #[test]
    fn offsets_tell_duplicates_gaps_and_new_epochs() {
        let mut t = Table::default();
        let m = |o: u64, e: &str| {
            let p = Position { offset: o, epoch: e.into() };
            (Message { channel: Bytes::from_static(b"broadcast"), data: Bytes::new(), position: Some(p.clone()) }, p)
        };
        let check = |t: &mut Table, o, e| {
            let (m, p) = m(o, e);
            t.check(&m, &p)
        };
        assert!(matches!(check(&mut t, 5, "a"), Check::Deliver), "the first one sets the place");
        assert!(matches!(check(&mut t, 6, "a"), Check::Deliver));
        assert!(matches!(check(&mut t, 6, "a"), Check::Duplicate));
        assert!(matches!(check(&mut t, 3, "a"), Check::Duplicate));
        assert!(matches!(check(&mut t, 9, "a"), Check::Repair { since: 6 }), "7 and 8 are missing");
        assert!(matches!(check(&mut t, 10, "a"), Check::Held), "behind the gap");
        t.seen.get_mut(&b"broadcast"[..]).expect("seen").held = None;
        assert!(matches!(check(&mut t, 1, "b"), Check::Deliver), "a new epoch starts again");
        assert!(matches!(check(&mut t, 1, "b"), Check::Duplicate));
        // A user's channel counts only while somebody here is that user.
        let (u, p) = (Message { channel: Bytes::from_static(b"user:x"), ..m(1, "a").0 }, m(1, "a").1);
        assert!(matches!(t.check(&u, &p), Check::Deliver));
        assert!(matches!(t.check(&u, &p), Check::Deliver), "not tracked: nobody here is x");
    }

    #[test]
    fn binds_and_joins_edit_the_indexes_and_say_what_to_join() {
        let mut t = Table::default();
        let conn = Conn {
            queue: Mutex::default(),
            wake: Notify::new(),
            close_code: AtomicU16::new(0),
            last_seen: AtomicU64::new(0),
            sse: false,
            json: false,
            deflate: false,
        };
        t.conns.insert(1, Arc::new(conn));
        assert!(matches!(t.bind(2, Some("x")), Err(Refusal::NoConnection)));
        assert_eq!(t.bind(1, Some("x")).ok(), Some((Some(user_channel("x")), None)));
        assert_eq!(t.bind(1, Some("x")).ok(), Some((None, None)), "already x");
        assert_eq!(t.bind(1, Some("y")).ok(), Some((Some(user_channel("y")), Some(user_channel("x")))));
        assert!(!t.users.contains_key("x") && t.users["y"].contains(&1));
        assert_eq!(t.join(1, "room").ok(), Some((Some(topic_channel("room")), None)));
        assert_eq!(t.join(1, "room").ok(), Some((None, None)), "in it already");
        assert_eq!(t.leave(1, "room").ok(), Some((None, Some(topic_channel("room")))));
        assert_eq!(t.leave(1, "room").ok(), Some((None, None)));
        for i in 0..MAX_TOPICS_PER_CONNECTION {
            assert!(t.join(1, &format!("t{i}")).is_ok());
        }
        assert!(matches!(t.join(1, "one-more"), Err(Refusal::Refused(_))));
        let who = t.unlink(1).expect("who it was");
        assert_eq!((who.uid.as_deref(), who.topics.len()), (Some("y"), MAX_TOPICS_PER_CONNECTION));
        assert!(t.users.is_empty() && t.topics.is_empty());
        let ups = t.changes.iter().filter(|c| c.up).count();
        assert_eq!(ups, t.changes.len() - ups, "every arrival reported has its departure");
    }

    #[test]
    fn the_worker_writes_directly_only_while_it_keeps_up() {
        let ms = Duration::from_millis;
        let t0 = Instant::now();
        let mut pace = Pace::default();
        assert!(pace.direct(t0, false), "the first message, nothing waiting");
        pace.took(ms(300));
        // A fan-out written directly took 300 ms: the next message goes direct only if it came
        // at least 600 ms later, and never while more are waiting.
        assert!(!pace.direct(t0 + ms(500), false), "busy more than half the time: queued");
        assert!(pace.direct(t0 + ms(1100), false), "600 ms since the last one: direct");
        assert!(!pace.direct(t0 + ms(2000), true), "a backlog: queued");
        // Queued messages do not change the estimate; a quicker direct one does.
        assert!(!pace.direct(t0 + ms(2100), false));
        assert!(pace.direct(t0 + ms(2700), false));
        pace.took(ms(1));
        assert!(pace.direct(t0 + ms(2702), false), "targeted pushes 2 ms apart, 1 ms each");
    }

    /// A worker's connection on a real socket whose peer (returned) reads only when told.
    async fn connection() -> (Arc<Conn>, tokio::net::TcpStream) {
        let broker = Arc::new(crate::broker::memory::MemoryBroker::new(Arc::default(), ""));
        let w = Arc::new(Worker::new("test-0".into(), (1024, usize::MAX), None, broker, 0).0);
        let (_, conn) = w.add(Wants::default(), false, false).await;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let peer = tokio::net::TcpStream::connect(listener.local_addr().expect("addr")).await.expect("connect");
        conn.attach(Arc::new(listener.accept().await.expect("accept").0));
        (conn, peer)
    }

    /// Read exactly `n` bytes, then check that nothing more came (the socket may be closed: once
    /// detached, only the task holds it, and here there is none).
    async fn read_exactly(peer: &mut tokio::net::TcpStream, n: usize) -> Vec<u8> {
        let mut got = vec![0u8; n];
        tokio::time::timeout(Duration::from_secs(10), peer.read_exact(&mut got)).await.expect("in time").expect("read");
        let mut more = [0u8; 1];
        let extra = tokio::time::timeout(Duration::from_millis(100), peer.read(&mut more)).await;
        assert!(!matches!(extra, Ok(Ok(k)) if k > 0), "nothing after the {n} bytes");
        got
    }

    #[tokio::test]
    async fn the_worker_writes_to_an_idle_socket_and_the_task_gets_the_rest_of_a_frame() {
        let (conn, mut peer) = connection().await;
        let (small, max) = (Bytes::from_static(b"\x81\x02hi"), usize::MAX);
        // Until the task has written its opening, pushes wait in the queue.
        assert!(matches!(conn.offer(&small, 1024, max, true), Offer::Queued));
        let mut out = VecDeque::new();
        conn.take(&mut out);
        assert_eq!(out, std::slice::from_ref(&small));
        conn.written();
        // Idle: the worker writes, and the frame goes out once.
        assert!(matches!(conn.offer(&small, 1024, max, true), Offer::Direct));
        conn.write(small.clone());
        assert_eq!(read_exactly(&mut peer, small.len()).await, &small[..]);
        // With a backlog the worker queues even to an idle connection.
        assert!(matches!(conn.offer(&small, 1024, max, false), Offer::Queued));
        conn.take(&mut out);
        conn.written();
        // A frame larger than the socket's buffers goes out in part; what follows waits behind
        // its rest, which the task gets back when it closes, to write before the close frame.
        let big = Bytes::from(vec![b'x'; 32 << 20]);
        assert!(matches!(conn.offer(&big, 1024, max, true), Offer::Direct));
        conn.write(big.clone());
        assert!(matches!(conn.offer(&small, 1024, max, true), Offer::Queued));
        let rest = conn.detach().expect("the rest of the big frame");
        assert!(!rest.is_empty() && rest.len() < big.len(), "written in part: {} left", rest.len());
        assert_eq!(rest, big.slice(big.len() - rest.len()..));
        let sent = read_exactly(&mut peer, big.len() - rest.len()).await;
        assert!(sent.iter().all(|&b| b == b'x'));
        // Detached: nothing more is written by the worker.
        conn.written();
        assert!(matches!(conn.offer(&small, 1024, max, true), Offer::Queued));
    }
}
