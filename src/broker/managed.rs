//! The shared part of the brokers reached through a maintained client library (Redis on fred, NATS
//! on async-nats). The library owns the connections: it connects, reconnects, follows cluster
//! topology, discovers servers and handles TLS. This module owns what pushwire promises on top:
//!
//! - **Up means subscribed.** The link counts as up (`/healthz` 200, publishes accepted) only once
//!   the library is connected *and* every subscription of this process has been confirmed by the
//!   broker since the latest (re)connection.
//! - **Confirmed publishes.** `publish` fails at once while the link is down (the library would
//!   buffer it), and resolves `Ok` only when the adapter saw the broker accept it.
//! - **Settle after a reconnection.** When the link comes back after a loss, publishes wait
//!   [`LinkConfig::settle`] before they are sent: other nodes that lost the broker at the same time
//!   (a broker restart, the loss of a shared NATS node) have resubscribed by then, so no publish is
//!   confirmed that a reconnecting gateway would miss.
//! - **Fan-out and bounds.** Messages go to this process's subscribers through [`Subscribers`];
//!   messages the library lost (a lagging receiver) are counted and logged.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::mpsc;
use tokio::time::Instant;

use super::subscribers::Subscribers;
use super::{
    Broker, BrokerError, BrokerFuture, Keep, LinkConfig, Message, Page, Position, Published, QueueBounds, SubId,
    Subscription, SUBSCRIPTION_CAPACITY,
};
use crate::metrics::{LogEvery, GLOBAL};

/// A future returned by a [`Client`].
pub type ClientFuture<'a, T = ()> = Pin<Box<dyn Future<Output = Result<T, String>> + Send + 'a>>;

/// A backend's client library, seen through what the shared part needs.
pub trait Client: Send + Sync + 'static {
    /// Publish; resolves once the broker has accepted the message (and routed it, where the
    /// broker can say so), with its position when the broker keeps the channel's history.
    fn publish(&self, channel: &str, data: Bytes, keep: Option<Keep>) -> ClientFuture<'_, Option<Position>>;
    /// Messages of `channel` after `since`; `None` when the broker keeps no history.
    fn history(&self, channel: &str, since: u64, limit: usize) -> ClientFuture<'_, Option<Page>> {
        let _ = (channel, since, limit);
        Box::pin(std::future::ready(Ok(None)))
    }
    /// Append to a work queue; `Ok(false)` when the queue is full.
    fn queue_push(&self, queue: &str, data: Bytes, bounds: QueueBounds) -> ClientFuture<'_, bool> {
        let _ = (queue, data, bounds);
        Box::pin(std::future::ready(Err("no work queues on this backend".into())))
    }
    /// Take the oldest item of a work queue.
    fn queue_pop(&self, queue: &str, bounds: QueueBounds) -> ClientFuture<'_, Option<Bytes>> {
        let _ = (queue, bounds);
        Box::pin(std::future::ready(Err("no work queues on this backend".into())))
    }
    /// Items waiting in a work queue.
    fn queue_len(&self, queue: &str, bounds: QueueBounds) -> ClientFuture<'_, u64> {
        let _ = (queue, bounds);
        Box::pin(std::future::ready(Err("no work queues on this backend".into())))
    }
    /// Make sure `channels` are subscribed on the broker (again, after a reconnection); resolves
    /// once the broker has confirmed them.
    fn subscribe(&self, channels: Vec<String>) -> ClientFuture<'_>;
    /// Drop the subscription to `channels`.
    fn unsubscribe(&self, channels: Vec<String>) -> ClientFuture<'_>;
    /// Whether the library has its connections up right now.
    fn connected(&self) -> bool;
}

/// What an adapter reports from its library.
#[derive(Debug)]
pub enum Event {
    /// A message on a subscribed channel (name without the broker prefix).
    Message(Message),
    /// The library (re)connected: subscriptions must be confirmed again.
    Connected,
    /// The library lost a connection.
    Disconnected(String),
    /// The library dropped this many messages (a receiver that lagged).
    Lost(u64),
}

/// Events an adapter may queue before its forwarding waits (and the library's own buffers fill).
pub const EVENT_QUEUE: usize = SUBSCRIPTION_CAPACITY;

type Done = tokio::sync::oneshot::Sender<Result<(), BrokerError>>;

enum Command {
    Subscribe { id: SubId, channels: Vec<String>, tx: mpsc::Sender<Message> },
    Join { id: SubId, channels: Vec<String>, done: Done },
    Leave { id: SubId, channels: Vec<String> },
}

/// Joins confirmed together in one round trip.
const JOIN_BATCH: usize = 256;

/// A broker reached through a client library.
pub struct Managed<C> {
    client: Arc<C>,
    cmd: mpsc::Sender<Command>,
    state: Arc<State>,
    name: String,
    cfg: LinkConfig,
}

/// What the link task and callers share.
struct State {
    up: AtomicBool,
    /// Counts connection changes (lost, re-established): a publish whose confirmation spans one
    /// is not confirmed.
    epoch: AtomicU64,
    reconnects: AtomicU64,
    /// Publishes wait until then after a reconnection.
    hold_until: Mutex<Option<Instant>>,
}

/// Warnings about messages the library lost: at most one line per interval.
static LOST_LOG: LogEvery = LogEvery::new(Duration::from_secs(10));

impl<C: Client> Managed<C> {
    /// Start the link task for `client`, whose adapter reports on `events`.
    pub fn spawn(client: Arc<C>, events: mpsc::Receiver<Event>, cfg: LinkConfig, name: String) -> Arc<Managed<C>> {
        let (cmd, rx) = mpsc::channel(64);
        let state = Arc::new(State {
            up: AtomicBool::new(false),
            epoch: AtomicU64::new(0),
            reconnects: AtomicU64::new(0),
            hold_until: Mutex::new(None),
        });
        let task = Task {
            client: client.clone(),
            cfg,
            name: name.clone(),
            state: state.clone(),
            subs: Subscribers::default(),
            renew: true,
            ever_up: false,
        };
        tokio::spawn(task.run(events, rx));
        Arc::new(Managed { client, cmd, state, name, cfg })
    }
}

impl<C: Client> Managed<C> {
    /// `op` within the publish timeout; a library error is a broker that is unavailable now.
    async fn within<T>(&self, what: &str, op: ClientFuture<'_, T>) -> Result<T, BrokerError> {
        let limit = self.cfg.publish_timeout;
        match tokio::time::timeout(limit, op).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => {
                tracing::debug!(broker = %self.name, "{what} failed: {e}");
                Err(BrokerError::Unavailable(self.name.clone()))
            }
            Err(_) => Err(BrokerError::Timeout(self.name.clone(), limit)),
        }
    }

    /// [`Managed::within`], refused at once while the link is down.
    async fn when_up<T>(&self, what: &str, op: ClientFuture<'_, T>) -> Result<T, BrokerError> {
        if !self.is_connected() {
            return Err(BrokerError::Unavailable(self.name.clone()));
        }
        self.within(what, op).await
    }
}

impl<C: Client> Broker for Managed<C> {
    fn publish(&self, channel: &str, data: Bytes, keep: Option<Keep>) -> BrokerFuture<'_, Option<Position>> {
        let message = (channel.to_owned(), data, keep);
        Box::pin(async move { self.publish_all(vec![message]).await?.pop().expect("one result per message") })
    }

    fn publish_all(&self, messages: Vec<(String, Bytes, Option<Keep>)>) -> BrokerFuture<'_, Vec<Published>> {
        Box::pin(async move {
            if !self.is_connected() {
                return Err(BrokerError::Unavailable(self.name.clone()));
            }
            let hold = *crate::io::lock(&self.state.hold_until);
            if let Some(until) = hold.filter(|u| *u > Instant::now()) {
                tokio::time::sleep_until(until).await;
            }
            let epoch = self.state.epoch.load(Ordering::Acquire);
            // Each library call hands its command over when first polled, and `join_all` first
            // polls them in order: sent in order, confirmed together.
            let sends = messages.iter().map(|(c, d, k)| self.within("publish", self.client.publish(c, d.clone(), *k)));
            let mut out = futures_util::future::join_all(sends).await;
            // A confirmation that spans a connection change confirms nothing.
            if self.state.epoch.load(Ordering::Acquire) != epoch || !self.is_connected() {
                out.iter_mut().for_each(|r| *r = Err(BrokerError::Unavailable(self.name.clone())));
            }
            Ok(out)
        })
    }

    fn history(&self, channel: &str, since: u64, limit: usize) -> BrokerFuture<'_, Page> {
        let read = self.when_up("history read", self.client.history(channel, since, limit));
        Box::pin(async move { read.await?.ok_or_else(|| BrokerError::NoHistory(self.name.clone())) })
    }

    fn queue_push(&self, queue: &str, data: Bytes, bounds: QueueBounds) -> BrokerFuture<'_, ()> {
        let (push, queue) = (self.when_up("queue push", self.client.queue_push(queue, data, bounds)), queue.to_owned());
        Box::pin(async move { push.await?.then_some(()).ok_or(BrokerError::QueueFull(queue)) })
    }

    fn queue_pop(&self, queue: &str, bounds: QueueBounds) -> BrokerFuture<'_, Option<Bytes>> {
        Box::pin(self.when_up("queue pop", self.client.queue_pop(queue, bounds)))
    }

    fn queue_len(&self, queue: &str, bounds: QueueBounds) -> BrokerFuture<'_, u64> {
        Box::pin(self.when_up("queue length", self.client.queue_len(queue, bounds)))
    }

    fn subscribe_with(&self, channels: Vec<String>, capacity: usize) -> Result<Subscription, BrokerError> {
        Subscription::through(&self.cmd, &self.name, capacity, |id, tx| Command::Subscribe { id, channels, tx })
    }

    fn join(&self, id: SubId, channels: Vec<String>) -> BrokerFuture<'_, ()> {
        Box::pin(async move {
            let (done, wait) = tokio::sync::oneshot::channel();
            let gone = || BrokerError::Unavailable(self.name.clone());
            self.cmd.send(Command::Join { id, channels, done }).await.map_err(|_| gone())?;
            let limit = self.cfg.publish_timeout;
            match tokio::time::timeout(limit, wait).await {
                Ok(r) => r.map_err(|_| gone())?,
                Err(_) => Err(BrokerError::Timeout(self.name.clone(), limit)),
            }
        })
    }

    fn leave(&self, id: SubId, channels: Vec<String>) -> BrokerFuture<'_, ()> {
        Box::pin(async move {
            let gone = BrokerError::Unavailable(self.name.clone());
            self.cmd.send(Command::Leave { id, channels }).await.map_err(|_| gone)
        })
    }

    fn is_connected(&self) -> bool {
        self.state.up.load(Ordering::Acquire) && self.client.connected()
    }

    fn reconnects(&self) -> u64 {
        self.state.reconnects.load(Ordering::Relaxed)
    }
}

struct Task<C> {
    client: Arc<C>,
    cfg: LinkConfig,
    name: String,
    state: Arc<State>,
    subs: Subscribers,
    /// Subscriptions must be confirmed (again) before the link counts as up.
    renew: bool,
    ever_up: bool,
}

impl<C: Client> Task<C> {
    async fn run(mut self, mut events: mpsc::Receiver<Event>, mut cmds: mpsc::Receiver<Command>) {
        let mut tick = tokio::time::interval(self.cfg.probe_interval.min(Duration::from_millis(250)));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut failures = 0u64;
        loop {
            tokio::select! {
                ev = events.recv() => match ev {
                    None => return,
                    Some(Event::Message(m)) => {
                        if let Some(gone) = self.subs.deliver(&self.name, m) {
                            let _ = self.client.unsubscribe(vec![gone]).await;
                        }
                    }
                    // Up again only once the subscriptions are confirmed on the new connection.
                    Some(Event::Connected) => {
                        self.lost();
                    }
                    Some(Event::Disconnected(why)) => self.down(&why),
                    Some(Event::Lost(n)) => {
                        GLOBAL.subscriber_drops.fetch_add(n, Ordering::Relaxed);
                        if let Some(held) = LOST_LOG.ready() {
                            tracing::warn!(broker = %self.name, lost = n, similar_since_last = held, "broker client lagged: messages lost");
                        }
                    }
                },
                cmd = cmds.recv() => match cmd {
                    None => return,
                    Some(Command::Join { id, channels, done }) => {
                        // Joins that are already waiting are confirmed in the same round trip.
                        let mut new = self.subs.join(id, channels);
                        let mut answers = vec![done];
                        while answers.len() < JOIN_BATCH {
                            match cmds.try_recv() {
                                Ok(Command::Join { id, channels, done }) => {
                                    new.extend(self.subs.join(id, channels));
                                    answers.push(done);
                                }
                                Ok(other) => {
                                    self.command(other).await;
                                    break;
                                }
                                Err(_) => break,
                            }
                        }
                        let result = self.add_channels(new).await;
                        for done in answers {
                            let _ = done.send(result.clone().map_err(BrokerError::Unavailable));
                        }
                    }
                    Some(other) => self.command(other).await,
                },
                _ = tick.tick() => {
                    if !self.client.connected() {
                        self.down("connection lost");
                    } else if self.renew {
                        match self.confirm(self.subs.channels()).await {
                            Ok(()) => {
                                failures = 0;
                                self.up();
                            }
                            Err(e) => {
                                failures += 1;
                                if failures == 1 || failures % 30 == 0 {
                                    tracing::warn!(broker = %self.name, failures, "subscriptions not confirmed: {e}");
                                }
                            }
                        }
                    }
                }
            }
        }
    }

    /// Carry out a command that needs no answer.
    async fn command(&mut self, cmd: Command) {
        match cmd {
            Command::Subscribe { id, channels, tx } => {
                let new = self.subs.add(id, channels, tx);
                let _ = self.add_channels(new).await;
            }
            Command::Join { id, channels, done } => {
                let new = self.subs.join(id, channels);
                let _ = done.send(self.add_channels(new).await.map_err(BrokerError::Unavailable));
            }
            Command::Leave { id, channels } => {
                let gone = self.subs.leave(id, channels);
                if !gone.is_empty() {
                    let _ = self.client.unsubscribe(gone).await;
                }
            }
        }
    }

    /// Subscribe the broker to channels new in this process, when the link is up (otherwise the
    /// renewal after the next connection takes them). A failure takes the link down until every
    /// subscription is confirmed again: up means subscribed.
    async fn add_channels(&mut self, new: Vec<String>) -> Result<(), String> {
        // While the library is connected they are subscribed now, also when a renewal of all is
        // due (it would come only at the next tick, and a join resolves once its channels are
        // in place); while it is not, the renewal after the connection takes them.
        if new.is_empty() || (self.renew && !self.client.connected()) {
            return Ok(());
        }
        let r = self.confirm(new).await;
        if let Err(e) = &r {
            self.down(&format!("subscription not confirmed: {e}"));
        }
        r
    }

    /// Subscribe to `channels` and wait for the broker's confirmation, within the publish timeout.
    async fn confirm(&self, channels: Vec<String>) -> Result<(), String> {
        match tokio::time::timeout(self.cfg.publish_timeout, self.client.subscribe(channels)).await {
            Ok(r) => r,
            Err(_) => Err(format!("no confirmation within {:?}", self.cfg.publish_timeout)),
        }
    }

    fn up(&mut self) {
        self.renew = false;
        if self.ever_up {
            self.state.reconnects.fetch_add(1, Ordering::Relaxed);
            let until = Instant::now() + self.cfg.settle;
            *crate::io::lock(&self.state.hold_until) = Some(until);
        }
        self.ever_up = true;
        self.state.up.store(true, Ordering::Release);
        tracing::info!(broker = %self.name, "broker link up");
    }

    /// The connection changed: down until the subscriptions are confirmed again. Whether it was up.
    fn lost(&mut self) -> bool {
        self.renew = true;
        self.state.epoch.fetch_add(1, Ordering::AcqRel);
        self.state.up.swap(false, Ordering::AcqRel)
    }

    fn down(&mut self, why: &str) {
        if self.lost() {
            GLOBAL.broker_link_failures.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(broker = %self.name, "broker link down: {why}");
        }
    }
}
