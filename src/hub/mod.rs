//! The Channel hub: who subscribes to what, round-robin cursors, and work queues.
//!
//! One hub backs a channel server. Its clients are either remote connections (fed encoded frames)
//! or in-process subscribers (fed [`Message`]s, how `standalone` wires its gateway and publisher),
//! so PHP nodes on port 2206 and in-process ones see the same events.
//!
//! Every client has a bounded outbound queue. A remote client whose queue is full is cut off (it
//! is a slow consumer: buffering for it forever is how memory runs out); an in-process subscriber
//! that is full loses that message, which is counted. Delivery is at most once, in publish order.
//!
//! **History.** The hub keeps the latest messages of `broadcast`, users' and topics' channels
//! ([`History`]) and gives each an offset under the same lock that delivers it. pushwire nodes
//! that subscribe to [`POSITIONS`](crate::channel_ext::POSITIONS) get each event with its offset and epoch, an answer with the
//! position of each of their publishes, and history pages for requests published to [`HISTORY`](crate::channel_ext::HISTORY);
//! PHP clients see the seed's frames and nothing else.

mod federation;
mod queues;

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use bytes::Bytes;
use channel_proto::message::ServerKind;
use channel_proto::{frame, Keep, Name, Request, ServerMessage};
use tokio::sync::mpsc;

use crate::channel_ext::{decode_history_request, encode_page, encode_position, HISTORY, POSITIONS};
use crate::history::{History, HistoryConfig, Page, Position, AS_THE_STORE};
use crate::message::Message;
use queues::unwatch;

/// Identifies a hub client.
pub type ClientId = u64;

/// Where a client's messages go.
pub enum Sink {
    /// A remote connection: encoded frames for its writer.
    Frames(mpsc::Sender<Bytes>),
    /// An in-process subscriber.
    Local(mpsc::Sender<Message>),
}

/// Limits that keep one client from growing the hub without bound.
#[derive(Debug, Clone, Copy)]
pub struct HubLimits {
    /// Channels plus queues one client may subscribe to or watch.
    pub max_names_per_client: usize,
    /// Longest channel or queue name, in bytes.
    pub max_name_len: usize,
    /// Items a queue holds while nobody takes them; further enqueues are refused.
    pub max_queue_items: usize,
    /// Bytes held by all queues together; further enqueues are refused.
    pub max_queued_bytes: usize,
    /// Queues that may exist at once (a queue exists while it holds items or has watchers).
    pub max_queues: usize,
}

impl Default for HubLimits {
    fn default() -> Self {
        HubLimits {
            max_names_per_client: 1_000_000,
            max_name_len: 1024,
            max_queue_items: 100_000,
            max_queued_bytes: 64 << 20,
            max_queues: 10_000,
        }
    }
}

/// Why the hub refused a request. The connection that sent it is told through the log and closed.
#[derive(Debug, thiserror::Error)]
pub enum HubError {
    #[error("name of {0} bytes exceeds the limit of {1}")]
    NameTooLong(usize, usize),
    #[error("client would hold more than {0} subscriptions and watches")]
    TooManyNames(usize),
    #[error("queue {0:?} is full ({1} items)")]
    QueueFull(String, usize),
    #[error("queues hold {0} bytes, the limit")]
    QueuesFull(usize),
    #[error("{0} queues exist, the limit")]
    TooManyQueues(usize),
    #[error("{0} is not allowed on this connection")]
    NotAllowed(&'static str),
    #[error("the backend did not take it: {0}")]
    Backend(crate::broker::BrokerError),
}

/// Counters, read by the metrics endpoint.
#[derive(Debug, Default)]
pub struct HubStats {
    pub published: AtomicU64,
    pub deliveries: AtomicU64,
    pub slow_consumers: AtomicU64,
    pub local_drops: AtomicU64,
    pub bad_frames: AtomicU64,
    pub refused: AtomicU64,
    pub unauthenticated: AtomicU64,
    /// Connections closed because the backend of a federated server did not take a request.
    pub backend_refusals: AtomicU64,
}

struct Client {
    sink: Sink,
    /// Channels subscribed.
    names: HashSet<Name>,
    /// Queues watched.
    watching: Vec<Name>,
    reserved: bool,
    /// A pushwire node: events carry positions, publishes are answered with theirs.
    positions: bool,
}

#[derive(Default)]
struct Channel {
    subscribers: Vec<ClientId>,
    cursor: usize,
}

#[derive(Default)]
struct Queue {
    items: VecDeque<Bytes>,
    watchers: Vec<ClientId>,
    /// On a federated hub: items being taken from the backend for this queue's watchers.
    taking: usize,
}

#[derive(Default)]
struct State {
    next_id: ClientId,
    clients: HashMap<ClientId, Client>,
    channels: HashMap<Name, Channel>,
    queues: HashMap<Name, Queue>,
    /// Bytes of every queued item.
    queued_bytes: usize,
    history: Option<History>,
}

/// The publish/subscribe and queue state of one channel server.
pub struct Hub {
    state: Mutex<State>,
    limits: HubLimits,
    pub stats: HubStats,
    /// The backend shared with other channel servers, when federated.
    backend: std::sync::OnceLock<federation::Backend>,
}

enum Sent {
    Ok,
    Dropped,
    SlowConsumer,
}

/// A message as the hub's clients get it: encoded once per form (with and without its position),
/// on first use.
struct Outgoing<'a> {
    kind: ServerKind,
    channel: &'a Name,
    data: &'a Bytes,
    position: Option<&'a Position>,
    plain: Option<Bytes>,
    positioned: Option<Bytes>,
}

impl<'a> Outgoing<'a> {
    fn new(kind: ServerKind, channel: &'a Name, data: &'a Bytes, position: Option<&'a Position>) -> Outgoing<'a> {
        Outgoing { kind, channel, data, position, plain: None, positioned: None }
    }

    fn frame(&mut self, with_position: bool) -> Bytes {
        let (kind, channel, data) = (self.kind, self.channel, &self.data[..]);
        match self.position.filter(|_| with_position) {
            None => self.plain.get_or_insert_with(|| frame::encode(&ServerMessage::encode_parts(kind, channel, data))),
            Some(p) => self.positioned.get_or_insert_with(|| {
                frame::encode(&ServerMessage::encode_at(kind, channel, data, Some((p.offset, p.epoch.as_bytes()))))
            }),
        }
        .clone()
    }
}

impl Client {
    fn send(&self, out: &mut Outgoing<'_>) -> Sent {
        match &self.sink {
            Sink::Frames(tx) => {
                let f = out.frame(self.positions);
                match tx.try_send(f) {
                    Ok(()) => Sent::Ok,
                    Err(mpsc::error::TrySendError::Full(_)) => Sent::SlowConsumer,
                    Err(mpsc::error::TrySendError::Closed(_)) => Sent::Dropped,
                }
            }
            Sink::Local(tx) => {
                let m = Message {
                    channel: Bytes::copy_from_slice(out.channel.as_bytes()),
                    data: out.data.clone(),
                    position: out.position.cloned(),
                };
                match tx.try_send(m) {
                    Ok(()) => Sent::Ok,
                    Err(_) => Sent::Dropped,
                }
            }
        }
    }
}

impl Default for Hub {
    fn default() -> Hub {
        Hub::new(HubLimits::default(), HistoryConfig::default())
    }
}

impl Hub {
    /// An empty hub that keeps `history`.
    pub fn new(limits: HubLimits, history: HistoryConfig) -> Hub {
        let state = State { history: history.enabled().then(|| History::new(history)), ..State::default() };
        Hub { state: Mutex::new(state), limits, stats: HubStats::default(), backend: std::sync::OnceLock::new() }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic while holding the lock would be a bug; the state is still consistent enough to
        // keep serving, so recover the guard rather than take the whole server down.
        crate::io::lock(&self.state)
    }

    /// Register a client; its messages go to `sink`.
    pub fn connect(&self, sink: Sink) -> ClientId {
        let mut st = self.lock();
        st.next_id += 1;
        let id = st.next_id;
        let c = Client { sink, names: HashSet::new(), watching: Vec::new(), reserved: false, positions: false };
        st.clients.insert(id, c);
        id
    }

    /// Drop a client with all its subscriptions, watches and reservation.
    pub fn disconnect(&self, id: ClientId) {
        let gone = drop_client(&mut self.lock(), id);
        self.forget(gone);
    }

    /// On a federated hub, leave the backend channels a dropped client held.
    fn forget(&self, gone: Option<Client>) {
        if let (Some(b), Some(c)) = (self.backend.get(), gone) {
            b.leave(c.names, c.watching);
        }
    }

    /// Number of connected clients.
    pub fn clients(&self) -> usize {
        self.lock().clients.len()
    }

    /// Number of channels with a subscriber.
    pub fn channels(&self) -> usize {
        self.lock().channels.len()
    }

    /// Number of queues (with a watcher or an item).
    pub fn queues(&self) -> usize {
        self.lock().queues.len()
    }

    /// Carry out one request from client `id`.
    pub fn handle(&self, id: ClientId, req: Request) -> Result<(), HubError> {
        match req {
            Request::Subscribe(mut names) => {
                self.take_positions(id, &mut names);
                self.subscribe(id, names)
            }
            Request::Unsubscribe(names) => {
                self.unsubscribe(id, names);
                Ok(())
            }
            Request::Publish { channels, data, keep } => {
                let node = self.lock().clients.get(&id).is_some_and(|c| c.positions);
                let answer = match &channels[..] {
                    [one] if node && one.as_bytes() == HISTORY.as_bytes() => self.history_request(&data),
                    _ => self.publish_as(&channels, &data, keep).filter(|_| node).map(|p| encode_position(&p)),
                };
                if let Some(answer) = answer {
                    self.send_to(id, answer.into());
                }
                Ok(())
            }
            Request::PublishLoop { channels, data } => {
                self.publish_loop(&channels, &data);
                Ok(())
            }
            Request::Watch(names) => self.watch(id, names).map(drop),
            Request::Unwatch(names) => {
                self.unwatch(id, names);
                Ok(())
            }
            Request::Enqueue { channels, data } => self.enqueue(&channels, &data),
            Request::Reserve => {
                self.reserve(id);
                Ok(())
            }
            Request::Auth(_) => Err(HubError::NotAllowed("auth after the first frame")),
        }
    }

    /// A subscription to [`POSITIONS`] among `names` makes client `id` a pushwire node: taken out
    /// of `names`, noted on the client.
    fn take_positions(&self, id: ClientId, names: &mut Vec<Name>) {
        if let Some(i) = names.iter().position(|n| n.as_bytes() == POSITIONS.as_bytes()) {
            names.swap_remove(i);
            if let Some(c) = self.lock().clients.get_mut(&id) {
                c.positions = true;
            }
        }
    }

    fn check_names(&self, st: &State, id: ClientId, names: &[Name]) -> Result<(), HubError> {
        if let Some(n) = names.iter().find(|n| n.as_bytes().len() > self.limits.max_name_len) {
            return Err(HubError::NameTooLong(n.as_bytes().len(), self.limits.max_name_len));
        }
        let held = st.clients.get(&id).map_or(0, |c| c.names.len() + c.watching.len());
        if held + names.len() > self.limits.max_names_per_client {
            return Err(HubError::TooManyNames(self.limits.max_names_per_client));
        }
        Ok(())
    }

    /// Add client `id` to each channel.
    pub fn subscribe(&self, id: ClientId, names: Vec<Name>) -> Result<(), HubError> {
        self.subscribe_new(id, names).map(drop)
    }

    /// Add client `id` to each channel; the channels it was not in yet.
    fn subscribe_new(&self, id: ClientId, names: Vec<Name>) -> Result<Vec<Name>, HubError> {
        let mut st = self.lock();
        self.check_names(&st, id, &names)?;
        let mut added = Vec::new();
        for n in names {
            let Some(c) = st.clients.get_mut(&id) else { break };
            if c.names.insert(n.clone()) {
                st.channels.entry(n.clone()).or_default().subscribers.push(id);
                added.push(n);
            }
        }
        Ok(added)
    }

    /// Take client `id` out of each channel; the channels it was in.
    fn unsubscribe(&self, id: ClientId, names: Vec<Name>) -> Vec<Name> {
        let mut st = self.lock();
        names.into_iter().filter(|n| unsubscribe(&mut st, id, n)).collect()
    }

    /// [`Hub::publish`] for a client: kept as it says, or, when it does not say (PHP's clients
    /// never do), as the seed's channels are ([`crate::protocol::native::push::keeps_history`]) within the hub's
    /// own history settings.
    fn publish_as(&self, channels: &[Name], data: &Bytes, keep: Option<Keep>) -> Option<Position> {
        let by_name = |n: &Name| crate::protocol::native::push::keeps_history(n.as_bytes()).then_some(AS_THE_STORE);
        self.publish_with(channels, data, |n| keep.or_else(|| by_name(n)))
    }

    /// Send `data` to every subscriber of each channel, after adding it to the channel's history
    /// as `keep` says; the position of the first channel's message, if kept.
    pub fn publish(&self, channels: &[Name], data: &Bytes, keep: Option<Keep>) -> Option<Position> {
        self.publish_with(channels, data, |_| keep)
    }

    fn publish_with(&self, channels: &[Name], data: &Bytes, keep: impl Fn(&Name) -> Option<Keep>) -> Option<Position> {
        let mut st = self.lock();
        let mut delivered = 0;
        let mut slow = Vec::new();
        let mut first = None;
        let now = std::time::Instant::now();
        for (i, name) in channels.iter().enumerate() {
            let position = match (st.history.as_mut(), keep(name)) {
                (Some(h), Some(k)) => h.append(name.as_bytes(), data, now, k),
                _ => None,
            };
            if i == 0 {
                first.clone_from(&position);
            }
            delivered += self.fan_out(&st, name, data, position.as_ref(), &mut slow);
        }
        self.cut_slow(&mut st, slow);
        self.stats.published.fetch_add(1, Ordering::Relaxed);
        self.stats.deliveries.fetch_add(delivered, Ordering::Relaxed);
        first
    }

    /// Send `data` (at `position`) to every subscriber of `name` here, as the backend of a
    /// federated hub delivers it.
    fn deliver(&self, name: &Name, data: &Bytes, position: Option<&Position>) {
        let mut st = self.lock();
        let mut slow = Vec::new();
        let delivered = self.fan_out(&st, name, data, position, &mut slow);
        self.cut_slow(&mut st, slow);
        self.stats.deliveries.fetch_add(delivered, Ordering::Relaxed);
    }

    /// Send `data` (at `position`) to every subscriber of `name` here; how many took it. The
    /// slow consumers are added to `slow`.
    fn fan_out(
        &self,
        st: &State,
        name: &Name,
        data: &Bytes,
        position: Option<&Position>,
        slow: &mut Vec<ClientId>,
    ) -> u64 {
        let Some(ch) = st.channels.get(name) else { return 0 };
        let mut out = Outgoing::new(ServerKind::Event, name, data, position);
        let mut delivered = 0;
        for id in &ch.subscribers {
            let Some(c) = st.clients.get(id) else { continue };
            match c.send(&mut out) {
                Sent::Ok => delivered += 1,
                Sent::Dropped => {
                    self.stats.local_drops.fetch_add(1, Ordering::Relaxed);
                }
                Sent::SlowConsumer => slow.push(*id),
            }
        }
        delivered
    }

    /// Messages of `channel` after offset `since` (at most `limit`); `None` without history.
    pub fn history(&self, channel: &[u8], since: u64, limit: usize) -> Option<Page> {
        let mut st = self.lock();
        Some(st.history.as_mut()?.page(channel, since, limit, std::time::Instant::now()))
    }

    /// Send `data` to client `id` alone, as an event on [`POSITIONS`](crate::channel_ext::POSITIONS).
    fn send_to(&self, id: ClientId, data: Bytes) {
        let mut st = self.lock();
        let name = Name::new(POSITIONS);
        let slow = st.clients.get(&id).is_some_and(|c| {
            matches!(c.send(&mut Outgoing::new(ServerKind::Event, &name, &data, None)), Sent::SlowConsumer)
        });
        if slow {
            self.cut_slow(&mut st, vec![id]);
        }
    }

    /// The answer to a history request from a node (see [`HISTORY`]), encoded; none to a request
    /// that is not one or without history (the node's confirmation then carries no page).
    fn history_request(&self, data: &Bytes) -> Option<Vec<u8>> {
        let (channel, since, limit) = decode_history_request(data)?;
        Some(encode_page(&self.history(&channel, since, limit)?))
    }

    fn publish_loop(&self, channels: &[Name], data: &Bytes) {
        let mut st = self.lock();
        let mut slow = Vec::new();
        for name in channels {
            let State { channels: chans, clients, .. } = &mut *st;
            let Some(ch) = chans.get_mut(name) else {
                continue;
            };
            if ch.subscribers.is_empty() {
                continue;
            }
            ch.cursor = (ch.cursor + 1) % ch.subscribers.len();
            let id = ch.subscribers[ch.cursor];
            if let Some(c) = clients.get(&id) {
                if let Sent::SlowConsumer = c.send(&mut Outgoing::new(ServerKind::Event, name, data, None)) {
                    slow.push(id);
                }
            }
        }
        self.cut_slow(&mut st, slow);
    }

    fn cut_slow(&self, st: &mut State, slow: Vec<ClientId>) {
        for id in slow {
            tracing::warn!(client = id, "channel client is not reading: queue full, disconnecting (slow consumer)");
            self.stats.slow_consumers.fetch_add(1, Ordering::Relaxed);
            let gone = drop_client(st, id);
            self.forget(gone);
        }
    }
}

/// Take client `id` out of channel `name`; whether it was in it.
fn unsubscribe(st: &mut State, id: ClientId, name: &Name) -> bool {
    let was = st.clients.get_mut(&id).is_some_and(|c| c.names.remove(name));
    if let Some(ch) = st.channels.get_mut(name) {
        ch.subscribers.retain(|s| *s != id);
        if ch.subscribers.is_empty() {
            st.channels.remove(name);
        }
    }
    was
}

/// Forget client `id`; what it was.
fn drop_client(st: &mut State, id: ClientId) -> Option<Client> {
    let c = st.clients.remove(&id)?;
    for n in &c.names {
        unsubscribe(st, id, n);
    }
    for n in &c.watching {
        unwatch(st, id, n);
    }
    Some(c)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::channel_ext::{decode_page, decode_position};

    pub(super) fn local(hub: &Hub) -> (ClientId, mpsc::Receiver<Message>) {
        let (tx, rx) = mpsc::channel(4);
        (hub.connect(Sink::Local(tx)), rx)
    }

    #[test]
    fn int_and_string_names_meet() {
        let hub = Hub::default();
        let (id, mut rx) = local(&hub);
        let sub = Request::parse(&Bytes::from_static(
            b"a:2:{s:4:\"type\";s:9:\"subscribe\";s:8:\"channels\";a:1:{i:0;i:0;}}",
        ));
        hub.handle(id, sub.unwrap()).unwrap();
        assert_eq!(
            hub.publish_as(&[Name::new("0")], &Bytes::from_static(b"N;"), None),
            None,
            "no history on a worker channel"
        );
        assert_eq!(rx.try_recv().unwrap().channel, "0");
    }

    #[test]
    fn nodes_get_positions_and_history_php_clients_the_seed_frames() {
        let hub = Hub::default();
        let (php_tx, mut php) = mpsc::channel(8);
        let (node_tx, mut node) = mpsc::channel(8);
        let (php_id, node_id) = (hub.connect(Sink::Frames(php_tx)), hub.connect(Sink::Frames(node_tx)));
        hub.handle(php_id, Request::Subscribe(vec![Name::new("broadcast")])).unwrap();
        hub.handle(node_id, Request::Subscribe(vec![Name::new(POSITIONS), Name::new("broadcast")])).unwrap();
        let data = Bytes::from_static(b"a:1:{s:7:\"content\";s:1:\"x\";}");
        hub.handle(
            node_id,
            Request::Publish { channels: vec![Name::new("broadcast")], data: data.clone(), keep: None },
        )
        .unwrap();
        let seed = frame::encode(&ServerMessage::encode_parts(ServerKind::Event, &Name::new("broadcast"), &data));
        assert_eq!(php.try_recv().unwrap(), seed, "byte for byte the seed's event");
        assert!(php.try_recv().is_err());
        let parse = |f: Bytes| ServerMessage::parse(&f.slice(channel_proto::HEADER_LEN..)).unwrap();
        let event = parse(node.try_recv().unwrap());
        let (offset, epoch) = event.position.clone().unwrap();
        assert_eq!((offset, event.data), (1, data.clone()));
        let answer = parse(node.try_recv().unwrap());
        assert_eq!(answer.channel, Name::new(POSITIONS));
        let p = decode_position(&answer.data).unwrap();
        assert_eq!((p.offset, p.epoch.as_bytes()), (1, &epoch[..]));
        // A history request is answered to the node alone.
        let req = channel_proto::Value::assoc([
            ("channel", channel_proto::Value::str("broadcast")),
            ("since", channel_proto::Value::Int(0)),
            ("limit", channel_proto::Value::Int(10)),
        ]);
        hub.handle(
            node_id,
            Request::Publish { channels: vec![Name::new(HISTORY)], data: req.encode().into(), keep: None },
        )
        .unwrap();
        let page = decode_page(&parse(node.try_recv().unwrap()).data).unwrap();
        assert_eq!((page.offset, page.first, page.items), (1, 1, vec![(1, data)]));
        assert_eq!(page.epoch.as_bytes(), &epoch[..]);
        assert!(php.try_recv().is_err(), "PHP clients see nothing new");
    }

    #[test]
    fn full_local_subscriber_loses_messages_not_others() {
        let hub = Hub::default();
        let (a, _rx_a) = local(&hub);
        let (b, mut rx_b) = local(&hub);
        for id in [a, b] {
            hub.subscribe(id, vec![Name::new("x")]).unwrap();
        }
        for _ in 0..10 {
            hub.publish(&[Name::new("x")], &Bytes::from_static(b"N;"), None);
            let _ = rx_b.try_recv();
        }
        assert_eq!(hub.stats.local_drops.load(Ordering::Relaxed), 6);
        assert_eq!(hub.clients(), 2);
    }

    #[test]
    fn limits() {
        let limits = HubLimits {
            max_names_per_client: 2,
            max_name_len: 3,
            max_queue_items: 1,
            max_queued_bytes: 10,
            max_queues: 2,
        };
        let hub = Hub::new(limits, HistoryConfig::default());
        let (id, _rx) = local(&hub);
        assert!(matches!(hub.subscribe(id, vec![Name::new("long")]), Err(HubError::NameTooLong(4, 3))));
        assert!(matches!(
            hub.subscribe(id, vec![Name::new("a"), Name::new("b"), Name::new("c")]),
            Err(HubError::TooManyNames(2))
        ));
        let q = [Name::new("q")];
        hub.enqueue(&q, &Bytes::new()).unwrap();
        assert!(matches!(hub.enqueue(&q, &Bytes::new()), Err(HubError::QueueFull(..))));
        // All queues together hold at most 10 bytes, and at most two queues exist.
        hub.enqueue(&[Name::new("r")], &Bytes::from_static(b"123456789")).unwrap();
        assert!(matches!(hub.enqueue(&[Name::new("s")], &Bytes::from_static(b"12")), Err(HubError::QueuesFull(9))));
        assert!(matches!(hub.enqueue(&[Name::new("s")], &Bytes::new()), Err(HubError::TooManyQueues(2))));
        // A watcher that takes the item frees its bytes.
        hub.handle(id, Request::Watch(vec![Name::new("r")])).unwrap();
        hub.handle(id, Request::Reserve).unwrap();
        hub.enqueue(&[Name::new("r")], &Bytes::from_static(b"123456789")).unwrap();
    }
}
