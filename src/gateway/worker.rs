//! A worker shard: its connection table with who each connection is (user, topics) and the
//! indexes from users and topics to connections, the fan-out of each push to its connections'
//! bounded queues (one encoded frame shared by all), slow-consumer cuts and the heartbeat sweep.
//!
//! A worker holds one broker subscription: its own worker id, `broadcast`, and the channel of
//! every user and topic it has a connection of (joined when a connection arrives, left when it
//! goes; the broker counts joins, so the broker is subscribed exactly while a member is here).

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicU16, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::Notify;

use crate::broker::{Broker, Message, SubId};
use crate::cluster::{Answer, Change, Envelope, Request, DUMP_PAGE};
use crate::metrics::GLOBAL;
use crate::push::{topic_channel, user_channel, Push, BROADCAST};
use crate::token::Identity;
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
}

/// One push as each transport sends it: the WebSocket frame, and the SSE event made on first use
/// (once per message per worker, then shared like the frame).
pub(super) struct Frames<'a> {
    ws: Bytes,
    content: &'a [u8],
    sse: std::cell::OnceCell<Bytes>,
}

impl<'a> Frames<'a> {
    fn new(content: &'a [u8]) -> Frames<'a> {
        let opcode = if std::str::from_utf8(content).is_ok() { ws::TEXT } else { ws::BINARY };
        Frames { ws: ws::encode(opcode, content), content, sse: std::cell::OnceCell::new() }
    }

    fn for_conn(&self, c: &Conn) -> &Bytes {
        match c.sse {
            false => &self.ws,
            true => self.sse.get_or_init(|| crate::sse::event(self.content)),
        }
    }
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

/// Who a connection is, for the connections that are someone (a token, a bind, a join). Kept
/// apart from the connection table, so that a broadcast walks a table of bare pointers.
#[derive(Default)]
struct Who {
    uid: Option<Arc<str>>,
    topics: Vec<Arc<str>>,
}

/// The connections of a worker and the indexes over them.
#[derive(Default)]
struct Table {
    conns: HashMap<u64, Arc<Conn>>,
    who: HashMap<u64, Who>,
    users: HashMap<Arc<str>, HashSet<u64>>,
    topics: HashMap<Arc<str>, HashSet<u64>>,
    /// Users and topics that arrived on or left this worker, numbered, for the presence
    /// trackers; bounded: when full, the oldest go (a tracker sees the gap and asks for all).
    changes: VecDeque<Change>,
    seq: u64,
    reported: u64,
}

/// Changes kept for the trackers before the oldest are dropped.
const MAX_CHANGES: usize = 65_536;

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
}

impl Worker {
    pub(super) fn new(id: String, max_frames: usize, max_bytes: usize, broker: Arc<dyn Broker>, sub: SubId) -> Worker {
        let (table, next_conn, epoch) = (Mutex::default(), AtomicU64::new(0), Instant::now());
        Worker { id, table, next_conn, epoch, max_frames, max_bytes, broker, sub }
    }

    fn table(&self) -> std::sync::MutexGuard<'_, Table> {
        self.table.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Milliseconds since the worker started: the clock of `last_seen`.
    pub(super) fn now(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    /// Add a connection who is `who`; once this returns, pushes to its user and topics reach it
    /// (the broker confirmed the subscriptions, or is down and renews them when it is back).
    pub(super) async fn add(&self, who: Identity, sse: bool) -> (u64, Arc<Conn>) {
        let id = self.next_conn.fetch_add(1, Ordering::Relaxed) + 1;
        let conn = Arc::new(Conn {
            queue: Mutex::default(),
            wake: Notify::new(),
            close_code: AtomicU16::new(0),
            last_seen: AtomicU64::new(self.now()),
            sse,
        });
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
            if uid.is_some() || !topics.is_empty() {
                t.who.insert(id, Who { uid, topics });
            }
        }
        if !channels.is_empty() {
            if let Err(e) = self.broker.join(self.sub, channels).await {
                tracing::warn!(worker = %self.id, connection = id, "subscriptions of a new connection not confirmed: {e}");
            }
        }
        (id, conn)
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
        let t = &*table;
        // The connections of the excluded users (none in the common case: nothing to look up).
        let skip: Option<HashSet<u64>> = (!exclude.is_empty()).then(|| {
            exclude.iter().filter_map(|u| t.users.get(std::str::from_utf8(u).ok()?)).flatten().copied().collect()
        });
        let mut slow = Vec::new();
        let mut delivered = 0;
        let mut offer = |id: u64, c: &Conn| {
            if skip.as_ref().is_some_and(|s| s.contains(&id)) {
                return;
            }
            match c.offer(frames.for_conn(c), self.max_frames, self.max_bytes) {
                Offer::Queued => delivered += 1,
                Offer::Full => slow.push(id),
            }
        };
        match to {
            Target::All => t.conns.iter().for_each(|(id, c)| offer(*id, c)),
            Target::Conn(id) => {
                if let Some(c) = t.conns.get(&id) {
                    offer(id, c);
                }
            }
            Target::User(u) => {
                for id in t.users.get(u).into_iter().flatten() {
                    if let Some(c) = t.conns.get(id) {
                        offer(*id, c);
                    }
                }
            }
            Target::Topic(topic) => {
                for id in t.topics.get(topic).into_iter().flatten() {
                    if let Some(c) = t.conns.get(id) {
                        offer(*id, c);
                    }
                }
            }
        }
        // Out of the table at once; the connection's task forgets who it was as it ends.
        for id in slow {
            if let Some(c) = table.conns.remove(&id) {
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
        let frames = Frames::new(&push.content);
        let channel = std::str::from_utf8(&m.channel).unwrap_or_default();
        let to = match channel.split_once(':') {
            _ if channel == BROADCAST => Some(Target::All),
            Some(("user", u)) => Some(Target::User(u)),
            Some(("topic", t)) => Some(Target::Topic(t)),
            _ => None,
        };
        if let Some(to) = to {
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
            let _ = c.offer(if c.sse { &comment } else { &ping }, self.max_frames, self.max_bytes);
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
pub fn bench_worker(n: usize, queue: usize) -> (Worker, Vec<Arc<Conn>>) {
    let broker = Arc::new(crate::broker::memory::MemoryBroker::new(Arc::default(), ""));
    let w = Worker::new("bench-0".into(), queue, usize::MAX, broker, 0);
    let rt = tokio::runtime::Builder::new_current_thread().build().expect("runtime");
    let conns = (0..n).map(|_| rt.block_on(w.add(Identity::default(), false)).1).collect();
    (w, conns)
}
