//! Channel servers that share a backend (`pushwire channel --broker URL`): each behaves, for its
//! own clients, like one Workerman Channel server, and every event published through any of them
//! reaches the subscribers on all of them.
//!
//! How: a server joins the backend's channel for each channel its clients subscribe to (joins are
//! counted by the backend, so a channel is held while any client here holds it) and publishes
//! its clients' events to the backend instead of delivering them itself; what the backend
//! delivers is then fanned out to the local subscribers, exactly once per server, in the order
//! the backend delivers one publisher's events. History and positions come from the backend
//! (offsets assigned once, by it), so pushwire nodes on a federated server get them as pushwire
//! nodes on that backend do. A client's subscribe is answered (its next frame read) only once
//! the backend confirmed the join. A publish (or enqueue) the backend does not take closes the
//! connection that made it, so that nothing sent after it (a pushwire node's confirmation marker)
//! answers for it: a node counts it as not confirmed, a PHP client reconnects as it does when a
//! server is lost.
//!
//! **Queues** live in the backend ([`Broker::queue_push`]: a Redis list, a JetStream work-queue
//! stream), bounded per queue by the hub's `max_queue_items` and `max_queued_bytes` (a full queue
//! refuses the item, and the enqueuing client is cut off as on a hub of its own). An enqueue
//! pushes the item, then publishes a wake-up on the queue's backend channel, which every server
//! with a watcher of the queue has joined; a server takes (pops) one item per reserved watcher
//! of its own, on a wake-up, on a reservation, and every [`POLL`] while a watcher waits (for
//! wake-ups lost while a link was down, and items pushed before a watcher came). A pop is final:
//! each item goes to one watcher anywhere, once; an item whose watcher left while it was being
//! taken goes back to the end of the queue. Items wait in the backend while nobody is ready, so
//! they outlive the server they were enqueued through.
//!
//! **publishLoop** is a short-lived queue per channel ([`LOOP_BOUNDS`]: unclaimed messages expire
//! after 10 s idle) with a wake-up: every server with subscribers of the channel takes one
//! message per wake-up, after a random pause under [`LOOP_JITTER`] (so that the server the
//! backend tells first does not win every time); the server that gets it hands it to its next
//! subscriber in turn. So a message goes to exactly one subscriber across the servers, spread at
//! random over the servers and round-robin over each server's subscribers.
//!
//! Backend channels of queues and loops carry the prefixes [`QUEUE`] and [`LOOP`] (a NUL byte
//! first, which no PHP client's channel name has in practice); what arrives on them never goes
//! to clients.

use std::sync::{Arc, Weak};
use std::time::Duration;

use bytes::Bytes;
use channel_proto::{Keep, Name, Request};

use super::queues::{dispatch, forget_if_idle};
use super::{ClientId, Hub, HubError};
use crate::broker::{Broker, BrokerError, QueueBounds, SubId, SUBSCRIPTION_CAPACITY};
use crate::channel_ext::{decode_history_request, encode_page, encode_position, ACK, HISTORY};
use crate::history::AS_THE_STORE;

/// How long a federated server waits for its backend before serving clients anyway.
pub const LINK_WAIT: Duration = Duration::from_secs(10);
/// How often a server with a reserved watcher looks for items it was not woken up for.
pub const POLL: Duration = Duration::from_secs(1);
/// Before a queue's name on the backend (its items and its wake-up channel).
pub const QUEUE: &str = "\0q:";
/// Before a channel's name for its `publishLoop` messages on the backend.
pub const LOOP: &str = "\0l:";
/// What a channel's `publishLoop` queue holds while no server takes its messages.
pub const LOOP_BOUNDS: QueueBounds =
    QueueBounds { max_items: 1000, max_bytes: 16 << 20, idle_ttl: Some(Duration::from_secs(10)) };
/// The longest pause before a server claims a `publishLoop` message.
pub const LOOP_JITTER: Duration = Duration::from_millis(2);

/// The backend of a federated hub.
pub(super) struct Backend {
    broker: Arc<dyn Broker>,
    sub: SubId,
    /// How this server keeps what it publishes for clients that do not say (PHP's), and what
    /// "as the store allows" means here.
    keep: Option<Keep>,
    /// What one queue holds on the backend.
    bounds: QueueBounds,
    hub: Weak<Hub>,
}

impl Backend {
    /// Leave the backend channels of `channels` (events and loops) and of the queues
    /// `watching` (a client left them, or is gone); in the background.
    pub(super) fn leave(&self, channels: impl IntoIterator<Item = Name>, watching: Vec<Name>) {
        let mut names: Vec<String> = channels.into_iter().flat_map(|n| [broker_name(&n), marked(LOOP, &n)]).collect();
        names.extend(watching.iter().map(|n| marked(QUEUE, n)));
        if names.is_empty() {
            return;
        }
        let (broker, sub) = (self.broker.clone(), self.sub);
        tokio::spawn(async move {
            let _ = broker.leave(sub, names).await;
        });
    }

    /// How a publish to `name` is kept: as the client says (`AS_THE_STORE`: as this server keeps
    /// history), or, when it does not say (PHP's), as this server keeps the seed's channels.
    fn keep_for(&self, name: &Name, keep: Option<Keep>) -> Option<Keep> {
        match keep {
            Some(k) if k == AS_THE_STORE => self.keep,
            Some(k) => Some(k),
            None if crate::protocol::native::push::keeps_history(name.as_bytes()) => self.keep,
            None => None,
        }
    }

    /// Join `names` on the backend; logged when the backend does not confirm it.
    async fn join(&self, id: ClientId, names: Vec<String>) {
        if names.is_empty() {
            return;
        }
        if let Err(e) = self.broker.join(self.sub, names).await {
            tracing::warn!(client = id, "federated subscribe not confirmed: {e}");
        }
    }

    /// Push `data` to the backend queue `queue` with `bounds` and wake its takers up.
    async fn push(&self, queue: String, data: Bytes, bounds: QueueBounds) -> Result<(), BrokerError> {
        self.broker.queue_push(&queue, data, bounds).await?;
        self.broker.publish(&queue, Bytes::new(), None).await.map(drop)
    }
}

/// A channel's name on the backend.
fn broker_name(n: &Name) -> String {
    String::from_utf8_lossy(n.as_bytes()).into_owned()
}

/// Whether a publish to `channels` is a history request (from a node).
fn is_history(channels: &[Name]) -> bool {
    matches!(channels, [one] if one.as_bytes() == HISTORY.as_bytes())
}

/// Whether `n` is the private channel of a pushwire node's confirmation markers.
fn is_marker(n: &Name) -> bool {
    n.as_bytes().windows(ACK.len()).any(|w| w == ACK.as_bytes())
}

/// `n` after `mark`, as a backend name.
fn marked(mark: &str, n: &Name) -> String {
    format!("{mark}{}", String::from_utf8_lossy(n.as_bytes()))
}

impl Hub {
    /// Share this hub's events with every channel server on `broker`; `keep` is how it keeps
    /// what its clients publish without saying (the seed's channels, by its history settings).
    /// Returns once the backend link is up (at most [`LINK_WAIT`]), so that the clients served
    /// after (they queue until then) do not have their first subscribes and publishes refused.
    pub async fn federate(self: &Arc<Self>, broker: Arc<dyn Broker>, keep: Option<Keep>) -> Result<(), BrokerError> {
        let deadline = tokio::time::Instant::now() + LINK_WAIT;
        while !broker.is_connected() && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        let mut sub = broker.subscribe_with(Vec::new(), SUBSCRIPTION_CAPACITY)?;
        let bounds = QueueBounds {
            max_items: self.limits.max_queue_items,
            max_bytes: self.limits.max_queued_bytes,
            idle_ttl: None,
        };
        let hub: Weak<Hub> = Arc::downgrade(self);
        if self.backend.set(Backend { broker, sub: sub.id, keep, bounds, hub: hub.clone() }).is_err() {
            return Err(BrokerError::Refused("the hub is federated already".into()));
        }
        let polling = hub.clone();
        tokio::spawn(async move {
            while let Some(m) = sub.recv().await {
                let Some(hub) = hub.upgrade() else { return };
                if let Some(queue) = m.channel.strip_prefix(QUEUE.as_bytes()) {
                    hub.take(Name::new(Bytes::copy_from_slice(queue)));
                } else if let Some(channel) = m.channel.strip_prefix(LOOP.as_bytes()) {
                    hub.take_loop(Name::new(Bytes::copy_from_slice(channel)));
                } else {
                    hub.deliver(&Name::new(m.channel.clone()), &m.data, m.position.as_ref());
                }
            }
        });
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(POLL);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let Some(hub) = polling.upgrade() else { return };
                let waiting: Vec<Name> = {
                    let st = hub.lock();
                    let reserved = |id: &ClientId| st.clients.get(id).is_some_and(|c| c.reserved);
                    st.queues.iter().filter(|(_, q)| q.watchers.iter().any(reserved)).map(|(n, _)| n.clone()).collect()
                };
                for q in waiting {
                    hub.take(q);
                }
            }
        });
        Ok(())
    }

    /// Take items of the backend queue `queue`, one per reserved watcher here not yet served,
    /// and hand each to one of them; in the background.
    fn take(&self, queue: Name) {
        let Some(b) = self.backend.get() else { return };
        {
            let mut st = self.lock();
            let super::State { queues, clients, .. } = &mut *st;
            let Some(q) = queues.get_mut(&queue) else { return };
            let ready = q.watchers.iter().filter(|w| clients.get(w).is_some_and(|c| c.reserved)).count();
            if q.taking >= ready {
                return;
            }
            q.taking += 1;
        }
        let (broker, bounds, hub) = (b.broker.clone(), b.bounds, b.hub.clone());
        tokio::spawn(async move {
            let item = broker.queue_pop(&marked(QUEUE, &queue), bounds).await;
            let Some(hub) = hub.upgrade() else { return };
            // The item goes to a reserved watcher here, through the hub's own dispatch; what no
            // watcher took (it left meanwhile) is left over.
            let left = {
                let mut st = hub.lock();
                let q = st.queues.entry(queue.clone()).or_default();
                q.taking = q.taking.saturating_sub(1);
                if let Ok(Some(data)) = &item {
                    q.items.push_back(data.clone());
                    st.queued_bytes += data.len();
                    dispatch(&mut st, &queue, &hub.stats);
                }
                let left: Vec<Bytes> =
                    st.queues.get_mut(&queue).map(|q| q.items.drain(..).collect()).unwrap_or_default();
                st.queued_bytes -= left.iter().map(Bytes::len).sum::<usize>();
                forget_if_idle(&mut st, &queue);
                left
            };
            match item {
                Ok(Some(_)) if left.is_empty() => hub.take(queue),
                Ok(Some(_)) => {
                    // Its watcher left while it was being taken: back to the queue, for others.
                    let Some(b) = hub.backend.get() else { return };
                    for data in left {
                        if let Err(e) = b.push(marked(QUEUE, &queue), data, b.bounds).await {
                            tracing::warn!(queue = %queue.to_string_lossy(), "queue item lost on its way back: {e}");
                        }
                    }
                }
                Ok(None) => {}
                Err(e) => tracing::debug!(queue = %queue.to_string_lossy(), "queue not read: {e}"),
            }
        });
    }

    /// Claim one `publishLoop` message of `channel` for a subscriber here; in the background.
    fn take_loop(&self, channel: Name) {
        let Some(b) = self.backend.get() else { return };
        if !self.lock().channels.contains_key(&channel) {
            return;
        }
        let (broker, hub) = (b.broker.clone(), b.hub.clone());
        tokio::spawn(async move {
            let mut r = [0u8; 1];
            let _ = getrandom::fill(&mut r);
            tokio::time::sleep(LOOP_JITTER.mul_f64(f64::from(r[0]) / 255.0)).await;
            match broker.queue_pop(&marked(LOOP, &channel), LOOP_BOUNDS).await {
                Ok(Some(data)) => {
                    if let Some(hub) = hub.upgrade() {
                        hub.publish_loop(std::slice::from_ref(&channel), &data);
                    }
                }
                Ok(None) => {}
                Err(e) => tracing::debug!(channel = %channel.to_string_lossy(), "publishLoop message not read: {e}"),
            }
        });
    }

    /// Items waiting in each of the first `max` queues known here (by name): watched here or, on
    /// a hub of its own, holding items; on a federated hub, as the backend counts them (a queue
    /// it does not answer for within a second is left out).
    pub async fn queue_depths(&self, max: usize) -> Vec<(Name, u64)> {
        let mut local: Vec<(Name, u64)> =
            self.lock().queues.iter().map(|(n, q)| (n.clone(), q.items.len() as u64)).collect();
        local.sort_unstable_by(|a, b| a.0.as_bytes().cmp(b.0.as_bytes()));
        local.truncate(max);
        let Some(b) = self.backend.get() else { return local };
        let mut out = Vec::with_capacity(local.len());
        let deadline = tokio::time::Instant::now() + Duration::from_secs(1);
        for (n, _) in local {
            let len = b.broker.queue_len(&marked(QUEUE, &n), b.bounds);
            if let Ok(Ok(len)) = tokio::time::timeout_at(deadline, len).await {
                out.push((n, len));
            }
        }
        out
    }

    /// Whether the hub shares a backend, and whether its link is up.
    pub fn backend_connected(&self) -> Option<bool> {
        self.backend.get().map(|b| b.broker.is_connected())
    }

    /// Carry out requests from client `id` (those that came in together), in order: on a
    /// federated hub, subscriptions and events go through the backend, consecutive publishes
    /// together ([`Broker::publish_all`]: one round trip for all, sent in order); everything else
    /// (and everything on a hub of its own) as [`Hub::handle`] does.
    pub async fn handle_requests(&self, id: ClientId, reqs: Vec<Request>) -> Result<(), HubError> {
        let Some(b) = self.backend.get() else {
            return reqs.into_iter().try_for_each(|r| self.handle(id, r));
        };
        let plain = |r: &Request| match r {
            Request::Publish { channels, .. } => !(self.is_node(id) && is_history(channels)),
            _ => false,
        };
        let mut reqs = reqs.into_iter().peekable();
        while let Some(req) = reqs.next() {
            if plain(&req) {
                let mut run = vec![req];
                while let Some(r) = reqs.next_if(plain) {
                    run.push(r);
                }
                self.publish_run(id, b, run).await?;
            } else {
                self.handle_one(id, b, req).await?;
            }
        }
        Ok(())
    }

    /// Whether client `id` is a pushwire node (it asked for positions).
    fn is_node(&self, id: ClientId) -> bool {
        self.lock().clients.get(&id).is_some_and(|c| c.positions)
    }

    /// Publishes of client `id` (none a node's history request), to the backend at once; then,
    /// in their order, each one's answer to a node, or a node's confirmation marker. The first
    /// the backend did not take ends the run (and the connection): nothing after it is answered.
    async fn publish_run(&self, id: ClientId, b: &Backend, run: Vec<Request>) -> Result<(), HubError> {
        let node = self.is_node(id);
        let marker = |channels: &[Name]| node && matches!(channels, [one] if is_marker(one));
        let mut messages = Vec::new();
        for req in &run {
            let Request::Publish { channels, data, keep } = req else { continue };
            if !marker(channels) {
                messages.extend(channels.iter().map(|n| (broker_name(n), data.clone(), b.keep_for(n, *keep))));
            }
        }
        let results = match messages.is_empty() {
            true => Vec::new(),
            false => b.broker.publish_all(messages).await.map_err(HubError::Backend)?,
        };
        let mut results = results.into_iter();
        for req in run {
            let Request::Publish { channels, data, .. } = req else { continue };
            if marker(&channels) {
                // A node's confirmation marker: everything before it was taken by the backend;
                // delivered here, it keeps its place after the answers sent before it (a trip
                // through the backend would let later answers pass it).
                if !b.broker.is_connected() {
                    return Err(HubError::Backend(BrokerError::Unavailable("backend".into())));
                }
                self.deliver(&channels[0], &data, None);
                continue;
            }
            let mut first = None;
            for i in 0..channels.len() {
                match results.next() {
                    Some(Ok(p)) if i == 0 => first = p,
                    Some(Ok(_)) | None => {}
                    Some(Err(e)) => return Err(HubError::Backend(e)),
                }
            }
            self.stats.published.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            if let (true, Some(p)) = (node, first) {
                self.send_to(id, encode_position(&p).into());
            }
        }
        Ok(())
    }

    /// One request of client `id` on a federated hub (see [`Hub::handle_requests`]).
    async fn handle_one(&self, id: ClientId, b: &Backend, req: Request) -> Result<(), HubError> {
        match req {
            Request::Subscribe(mut names) => {
                self.take_positions(id, &mut names);
                let added = self.subscribe_new(id, names)?;
                b.join(id, added.iter().flat_map(|n| [broker_name(n), marked(LOOP, n)]).collect()).await;
                Ok(())
            }
            Request::Unsubscribe(names) => {
                b.leave(self.unsubscribe(id, names), Vec::new());
                Ok(())
            }
            Request::Watch(names) => {
                let added = self.watch(id, names)?;
                b.join(id, added.iter().map(|n| marked(QUEUE, n)).collect()).await;
                for n in added {
                    self.take(n);
                }
                Ok(())
            }
            Request::Unwatch(names) => {
                b.leave(Vec::new(), self.unwatch(id, names));
                Ok(())
            }
            Request::Reserve => {
                for q in self.reserve(id) {
                    self.take(q);
                }
                Ok(())
            }
            Request::Enqueue { channels, data } => {
                if let Some(n) = channels.iter().find(|n| n.as_bytes().len() > self.limits.max_name_len) {
                    return Err(HubError::NameTooLong(n.as_bytes().len(), self.limits.max_name_len));
                }
                for n in &channels {
                    match b.push(marked(QUEUE, n), data.clone(), b.bounds).await {
                        Ok(()) => {}
                        Err(BrokerError::QueueFull(_)) => {
                            return Err(HubError::QueueFull(n.to_string_lossy(), b.bounds.max_items))
                        }
                        Err(e) => return Err(HubError::Backend(e)),
                    }
                }
                Ok(())
            }
            Request::PublishLoop { channels, data } => {
                for n in &channels {
                    b.push(marked(LOOP, n), data.clone(), LOOP_BOUNDS).await.map_err(HubError::Backend)?;
                }
                Ok(())
            }
            Request::Publish { channels, data, .. } if self.is_node(id) && is_history(&channels) => {
                if let Some(answer) = self.backend_history(b, &data).await? {
                    self.send_to(id, answer.into());
                }
                Ok(())
            }
            req @ Request::Publish { .. } => self.publish_run(id, b, vec![req]).await,
            other => self.handle(id, other),
        }
    }

    /// A history page from the backend for a node's request; none for a request that is not one
    /// or a backend without history (the node's confirmation then carries no page). A backend
    /// that fails to answer closes the connection, so that the node asks again rather than take
    /// the missing page for no history.
    async fn backend_history(&self, b: &Backend, data: &Bytes) -> Result<Option<Vec<u8>>, HubError> {
        let Some((channel, since, limit)) = decode_history_request(data) else { return Ok(None) };
        let channel = String::from_utf8_lossy(&channel).into_owned();
        match b.broker.history(&channel, since, limit).await {
            Ok(page) => Ok(Some(encode_page(&page))),
            Err(BrokerError::NoHistory(_)) => Ok(None),
            Err(e) => Err(HubError::Backend(e)),
        }
    }
}
