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
//!
//! Parts: [`queue`] (a connection's bounded queue and the direct write), [`membership`] (indexes,
//! edits, changes), [`continuity`] (offsets, gaps, history reads), [`recovery`] (`recover=`),
//! [`joined`] (connections a protocol joins to broker channels: Pusher's).

mod continuity;
mod joined;
mod membership;
mod queue;
mod recovery;

use continuity::*;
use membership::*;
pub use queue::Conn;
use queue::*;
use recovery::*;

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes};
use tokio::sync::{mpsc, Notify};

use crate::broker::{Broker, Message, Position, SubId, Subscription};
use crate::cluster::{member_key, Answer, Change, Envelope, Kind, Request, DUMP_PAGE};
use crate::history::{self, Page};
use crate::metrics::GLOBAL;
use crate::protocol::native::push::{topic_channel, user_channel, Audience, Push};
use crate::protocol::native::{json, Wants};
use crate::protocol::{pusher, BoxFuture, Encoding};
use crate::ws::{self, close};

/// Warnings about events that cannot be decoded: at most one line per interval.
static BAD_EVENT_LOG: crate::metrics::LogEvery = crate::metrics::LogEvery::new(Duration::from_secs(10));

/// The connections of a worker and the indexes over them.
#[derive(Default)]
struct Table {
    /// The connections pushes go to (the native protocol's).
    conns: HashMap<u64, Arc<Conn>>,
    /// Connections of protocols that get no pushes: pinged, swept and closed like the others.
    unlisted: HashMap<u64, Arc<Conn>>,
    /// Connections pushed to only through the broker channels their protocol joins (Pusher's).
    joiners: HashMap<u64, Arc<Conn>>,
    /// Broker channel → its joiners here.
    channels: HashMap<Arc<str>, HashSet<u64>>,
    /// Broker channel → the joiners here that joined as a member (Pusher presence): connection
    /// → (user id, user info as JSON).
    members: HashMap<Arc<str>, HashMap<u64, Member>>,
    /// Presence broker channel → its users on every gateway, as last heard (asked when a socket
    /// here joins, then followed through `member_added` / `member_removed`): what a gateway that
    /// dies takes away is told to the joiners here ([`Worker::reconcile_members`]).
    known: HashMap<Arc<str>, HashSet<Arc<str>>>,
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

/// Whom a push is for: the members of a native channel, one connection (a push on a worker's own
/// channel), or the joiners of a protocol's channel.
enum Target<'a> {
    Members(Audience<'a>),
    Conn(u64),
    Channel(&'a str),
}

/// One worker shard: its id, its connections, its connection counter, its broker subscription.
pub struct Worker {
    pub id: String,
    /// Where publishers' requests about this worker's connections come ([`crate::cluster::worker_channel`]).
    control: String,
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
    writes_directly: AtomicBool,
    /// History frames encoded for recovering connections, shared by those of the same range.
    history_frames: Mutex<HistoryFrames>,
    /// This worker's number in Pusher `socket_id`s.
    socket_number: u64,
    /// Asks every gateway (the members of a presence channel), once the gateway serves a
    /// protocol that needs it.
    asker: std::sync::OnceLock<Arc<crate::cluster::Asker>>,
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
        let writes_directly = AtomicBool::new(true);
        let history_frames = Mutex::default();
        let w = Worker {
            control: crate::cluster::worker_channel(&id),
            socket_number: pusher::worker_number(&id),
            asker: std::sync::OnceLock::new(),
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
            writes_directly,
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
                    Some(m) if m.channel == self.control.as_bytes() => self.on_request(m.data),
                    Some(m) => {
                        let start = Instant::now();
                        let direct = pace.direct(start, !sub.rx.is_empty());
                        self.writes_directly.store(direct, Ordering::Relaxed);
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
        crate::io::lock(&self.table)
    }

    /// Whether a message of `content` goes compressed to connections that negotiated compression.
    pub(super) fn compresses(&self, content: &[u8]) -> bool {
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
    pub(super) async fn add(self: &Arc<Self>, id: u64, wants: Wants, sse: bool, deflate: bool) -> Arc<Conn> {
        let encoding = if wants.json { Encoding::NativeJson } else { Encoding::Raw };
        let conn = Arc::new(Conn::new(self.now(), sse, encoding, deflate));
        let Wants { who, recover, .. } = wants;
        let channels = broker_channels(who.uid.as_deref(), &who.channels);
        let uid: Option<Arc<str>> = who.uid.map(Into::into);
        let topics: Vec<Arc<str>> = who.channels.into_iter().map(Into::into).collect();
        {
            let mut t = self.table();
            if let Some(u) = &uid {
                t.index(Kind::User, u, id);
            }
            for topic in &topics {
                t.index(Kind::Topic, topic, id);
            }
            t.conns.insert(id, conn.clone());
            if !recover.is_empty() {
                let held =
                    recover.iter().map(|r| Recovering { channel: r.channel.clone(), frames: Vec::new(), done: None });
                t.recovering.insert(id, held.collect());
            }
            if uid.is_some() || !topics.is_empty() {
                t.who.insert(id, Who { uid: uid.clone(), topics, channels: Vec::new() });
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
        conn
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
                Request::Dump { kind, after } => {
                    drop(t);
                    let (names, seq) = self.dump(*kind, after);
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
    pub(super) fn on_request(self: &Arc<Self>, data: Bytes) {
        let Some(env) = crate::cluster::decode::<Envelope>(&data) else {
            GLOBAL.bad_broker_messages.fetch_add(1, Ordering::Relaxed);
            return;
        };
        let w = self.clone();
        tokio::spawn(async move {
            let mut a = w.control(&env.req).await;
            (a.id, a.node) = (env.id, w.id.clone());
            let _ = w.broker.publish(&env.reply, crate::cluster::encode(&a), None).await;
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

    /// One page of this worker's names of `kind`, in order, after `after`; and the number of the
    /// latest change.
    pub(super) fn dump(&self, kind: Kind, after: &str) -> (Vec<String>, u64) {
        let t = self.table();
        let names: Vec<String> = match kind {
            Kind::User => t.users.keys().map(|k| k.to_string()).collect(),
            Kind::Topic => t.topics.keys().map(|k| k.to_string()).collect(),
            Kind::Channel => t.channels.keys().map(|k| k.to_string()).collect(),
            Kind::Member => {
                let mut keys = HashSet::new();
                for (channel, members) in &t.members {
                    keys.extend(members.values().map(|(user, _)| member_key(channel, user)));
                }
                keys.into_iter().collect()
            }
        };
        let mut page: Vec<String> = names.into_iter().filter(|k| k.as_str() > after).collect();
        page.sort_unstable();
        page.truncate(DUMP_PAGE);
        (page, t.seq)
    }

    /// (users, topics) with a connection here.
    pub fn counts(&self) -> (usize, usize) {
        let t = self.table();
        (t.users.len(), t.topics.len())
    }

    /// Forget connection `id` (if still known) and leave its user's, topics' and protocol's
    /// channels.
    pub(super) async fn remove(&self, id: u64) {
        let Some(w) = self.table().unlink(id) else { return };
        let mut channels = broker_channels(w.uid.as_deref(), &w.topics);
        channels.extend(w.channels.iter().map(|c| c.to_string()));
        if !channels.is_empty() {
            let _ = self.broker.leave(self.sub, channels).await;
        }
    }

    /// Number of open connections.
    pub fn connections(&self) -> usize {
        let t = self.table();
        t.conns.len() + t.unlisted.len() + t.joiners.len()
    }

    /// Queue `frame` to the connections `to` names, except those of the users in `exclude` and
    /// connection `exclude_conn`; returns deliveries.
    fn send(&self, frames: &Frames<'_>, to: Target<'_>, exclude: &[Vec<u8>], exclude_conn: Option<u64>) -> usize {
        let mut table = self.table();
        let Table { conns, users, topics, recovering, joiners, channels, .. } = &mut *table;
        // The connections of the excluded users (none in the common case: nothing to look up).
        let skip: Option<HashSet<u64>> = (!exclude.is_empty()).then(|| {
            exclude.iter().filter_map(|u| users.get(std::str::from_utf8(u).ok()?)).flatten().copied().collect()
        });
        let (mut slow, mut direct) = (Vec::new(), Vec::new());
        let mut delivered = 0;
        let (max_frames, max_bytes) = (self.max_frames, self.max_bytes);
        let writes_directly = self.writes_directly.load(Ordering::Relaxed);
        let offer = |id: u64, c: &Arc<Conn>| {
            let skipped = exclude_conn == Some(id) || skip.as_ref().is_some_and(|s| s.contains(&id));
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
                                    &c.encode(&json::recovered(frames.channel, false)),
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
            match c.offer(frame, max_frames, max_bytes, writes_directly) {
                Offer::Queued => delivered += 1,
                Offer::Direct => direct.push((c.clone(), frame.clone())),
                Offer::Full => slow.push(id),
            }
        };
        each_member(Indexes { conns, users, topics, joiners, channels }, to, offer);
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

    /// Carry out one message from the broker.
    pub fn handle(&self, m: Message) {
        GLOBAL.broker_messages.fetch_add(1, Ordering::Relaxed);
        if m.channel.starts_with(pusher::NAMESPACE.as_bytes()) {
            return self.handle_joined(&m);
        }
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
        if let Some(to) = Audience::of(channel) {
            self.send(&frames, Target::Members(to), &push.exclude_uid, None);
            return;
        }
        let target = push.to_connection_id.as_deref().and_then(|c| std::str::from_utf8(c).ok()?.trim().parse().ok());
        let delivered = target.map_or(0, |id| self.send(&frames, Target::Conn(id), &[], None));
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
        let keep = |_: &u64, c: &mut Arc<Conn>| {
            // An SSE client never writes: a dead one shows as a full queue (a slow consumer).
            if !c.sse && now.saturating_sub(c.last_seen.load(Ordering::Relaxed)) > dead_after.as_millis() as u64 {
                c.close(c.encoding.dead_close_code());
                return false;
            }
            // A client whose queue is full gets no ping; the next push decides its fate.
            let _ = c.offer(if c.sse { &comment } else { &ping }, self.max_frames, self.max_bytes, false);
            true
        };
        let mut t = self.table();
        t.conns.retain(keep);
        t.unlisted.retain(keep);
        t.joiners.retain(keep);
    }

    /// Close every connection, as its protocol closes them when the server stops.
    pub(super) fn close_all(&self) {
        let mut t = self.table();
        let Table { conns, unlisted, joiners, .. } = &mut *t;
        for (_, c) in conns.drain().chain(unlisted.drain()).chain(joiners.drain()) {
            c.close(c.encoding.going_away_close_code());
        }
    }

    /// The next connection id (from 1, never reused while the worker lives).
    pub(super) fn next_id(&self) -> u64 {
        self.next_conn.fetch_add(1, Ordering::Relaxed) + 1
    }

    /// Add a connection that gets no pushes (of a protocol that is not pushed to).
    pub(super) fn add_unlisted(&self, deflate: bool) -> (u64, Arc<Conn>) {
        let id = self.next_id();
        let conn = Arc::new(Conn::new(self.now(), false, Encoding::Raw, deflate));
        self.table().unlisted.insert(id, conn.clone());
        (id, conn)
    }
}

/// For benchmarks: a worker with `n` in-memory connections (no sockets); empty their queues with
/// [`Conn::drain`], as their tasks would.
#[doc(hidden)]
pub fn bench_worker(n: usize, queue: usize) -> (Arc<Worker>, Vec<Arc<Conn>>) {
    let broker = Arc::new(crate::broker::memory::MemoryBroker::new(Arc::default(), ""));
    let w = Arc::new(Worker::new("bench-0".into(), (queue, usize::MAX), None, broker, 0).0);
    let rt = tokio::runtime::Builder::new_current_thread().build().expect("runtime");
    let conns = (0..n).map(|_| rt.block_on(w.add(w.next_id(), Wants::default(), false, false))).collect();
    (w, conns)
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
