//! The link loop shared by every remote broker: connect with a timeout, renew subscriptions,
//! confirm publishes in order, probe an idle connection, and reconnect with capped backoff.
//!
//! A backend only says how to speak its protocol ([`Transport`], [`Reader`], [`Writer`]); all the
//! state (subscribers, unconfirmed publishes) lives here, in one task per link.

use std::collections::VecDeque;
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use super::subscribers::Subscribers;
use super::{Broker, BrokerError, BrokerFuture, Keep, LinkConfig, Message, Page, Position, SubId, Subscription};

/// What a reader took off the wire.
pub enum Incoming {
    /// A message on a subscribed channel.
    Message(Message),
    /// The broker confirmed the oldest unconfirmed publish or probe, with what it answered to it
    /// (a position, a history page), if anything.
    Ack(Option<Bytes>),
    /// The broker checks that we are alive; the writer answers.
    Ping,
    /// Protocol chatter that needs no action.
    Nothing,
}

/// Opens connections to one broker.
pub trait Transport: Send + Sync + 'static {
    type Reader: Reader;
    type Writer: Writer;
    /// Connect (and authenticate); nothing is subscribed yet.
    fn connect(&self) -> impl Future<Output = std::io::Result<(Self::Reader, Self::Writer)>> + Send;
}

/// The receiving half of a connection.
pub trait Reader: Send + 'static {
    /// The next thing from the broker. Must be cancel-safe: it is polled inside `select!`.
    fn next(&mut self) -> impl Future<Output = std::io::Result<Incoming>> + Send;
}

/// The sending half: commands are buffered, then written by `flush`.
pub trait Writer: Send + 'static {
    fn subscribe(&mut self, channels: &[String]);
    fn unsubscribe(&mut self, channels: &[String]);
    /// Queue a publish; the broker's confirmation arrives later as exactly one [`Incoming::Ack`].
    fn publish(&mut self, channel: &str, data: &[u8], keep: Option<Keep>);
    /// Queue a liveness check, also answered by exactly one [`Incoming::Ack`].
    fn probe(&mut self);
    /// Queue a history request (`data` as the broker takes it), answered by exactly one
    /// [`Incoming::Ack`] that carries the page.
    fn history(&mut self, data: &[u8]);
    /// Queue the answer to a broker's [`Incoming::Ping`].
    fn answer_ping(&mut self) {}
    /// Whether anything is buffered.
    fn has_pending(&self) -> bool;
    /// Write what is buffered. Must be cancel-safe (partial progress is kept).
    fn flush(&mut self) -> impl Future<Output = std::io::Result<()>> + Send;
}

type Done = oneshot::Sender<Result<Option<Bytes>, BrokerError>>;

enum Command {
    Publish { channel: String, data: Bytes, keep: Option<Keep>, done: Done },
    History { data: Bytes, done: Done },
    Subscribe { id: SubId, channels: Vec<String>, tx: mpsc::Sender<Message> },
    Join { id: SubId, channels: Vec<String>, done: Done },
    Leave { id: SubId, channels: Vec<String>, done: Done },
}

/// Commands queued for the link task before callers wait.
const COMMAND_QUEUE: usize = 1024;

/// A broker reached over the network, driven by one background task.
pub struct Link {
    cmd: mpsc::Sender<Command>,
    connected: Arc<AtomicBool>,
    reconnects: Arc<AtomicU64>,
    name: String,
    cfg: LinkConfig,
}

impl Link {
    /// Start the link task for `transport`; `name` is how logs and errors call the broker.
    pub fn spawn<T: Transport>(transport: T, cfg: LinkConfig, name: String) -> Arc<Link> {
        let (cmd, rx) = mpsc::channel(COMMAND_QUEUE);
        let connected = Arc::new(AtomicBool::new(false));
        let reconnects = Arc::new(AtomicU64::new(0));
        let task = Task {
            transport,
            cfg,
            name: name.clone(),
            rx,
            subs: Subscribers::default(),
            connected: connected.clone(),
            reconnects: reconnects.clone(),
            sessions: 0,
        };
        tokio::spawn(task.run());
        Arc::new(Link { cmd, connected, reconnects, name, cfg })
    }
}

impl Link {
    /// Queue a command for the task and wait (within the publish timeout) for its answer.
    fn ask(&self, make: impl FnOnce(Done) -> Command + Send + 'static) -> BrokerFuture<'_, Option<Bytes>> {
        Box::pin(async move {
            let (done, wait) = oneshot::channel();
            let limit = self.cfg.publish_timeout;
            let answered = tokio::time::timeout(limit, async {
                self.cmd.send(make(done)).await.ok()?;
                wait.await.ok()
            });
            match answered.await {
                Ok(Some(result)) => result,
                Ok(None) => Err(BrokerError::Unavailable(self.name.clone())),
                Err(_) => Err(BrokerError::Timeout(self.name.clone(), limit)),
            }
        })
    }
}

impl Link {
    /// Hand a join or leave to the task, however long its queue takes to make room: a membership
    /// edit is never dropped (the task records it, and renews every channel after a reconnect);
    /// only the wait for the broker's confirmation is bounded.
    fn edit(&self, make: impl FnOnce(Done) -> Command + Send + 'static) -> BrokerFuture<'_, ()> {
        Box::pin(async move {
            let (done, wait) = oneshot::channel();
            self.cmd.send(make(done)).await.map_err(|_| BrokerError::Unavailable(self.name.clone()))?;
            let limit = self.cfg.publish_timeout;
            match tokio::time::timeout(limit, wait).await {
                Ok(Ok(result)) => result.map(drop),
                Ok(Err(_)) => Err(BrokerError::Unavailable(self.name.clone())),
                Err(_) => Err(BrokerError::Timeout(self.name.clone(), limit)),
            }
        })
    }
}

impl Broker for Link {
    fn publish(&self, channel: &str, data: Bytes, keep: Option<Keep>) -> BrokerFuture<'_, Option<Position>> {
        if !self.is_connected() {
            return Box::pin(std::future::ready(Err(BrokerError::Unavailable(self.name.clone()))));
        }
        let channel = channel.to_owned();
        let answer = self.ask(move |done| Command::Publish { channel, data, keep, done });
        Box::pin(async move { Ok(answer.await?.and_then(|a| crate::channel_ext::decode_position(&a))) })
    }

    fn history(&self, channel: &str, since: u64, limit: usize) -> BrokerFuture<'_, Page> {
        if !self.is_connected() {
            return Box::pin(std::future::ready(Err(BrokerError::Unavailable(self.name.clone()))));
        }
        let data = crate::channel_ext::encode_history_request(channel.as_bytes(), since, limit).into();
        let answer = self.ask(move |done| Command::History { data, done });
        Box::pin(async move {
            // A channel server that keeps no history (PHP's, or one without) answers nothing.
            let page = answer.await?.and_then(|a| crate::channel_ext::decode_page(&a));
            page.ok_or_else(|| BrokerError::NoHistory(self.name.clone()))
        })
    }

    fn subscribe_with(&self, channels: Vec<String>, capacity: usize) -> Result<Subscription, BrokerError> {
        Subscription::through(&self.cmd, &self.name, capacity, |id, tx| Command::Subscribe { id, channels, tx })
    }

    fn join(&self, id: SubId, channels: Vec<String>) -> BrokerFuture<'_, ()> {
        self.edit(move |done| Command::Join { id, channels, done })
    }

    fn leave(&self, id: SubId, channels: Vec<String>) -> BrokerFuture<'_, ()> {
        self.edit(move |done| Command::Leave { id, channels, done })
    }

    fn is_connected(&self) -> bool {
        self.connected.load(Ordering::Acquire)
    }

    fn reconnects(&self) -> u64 {
        self.reconnects.load(Ordering::Relaxed)
    }
}

struct Task<T> {
    transport: T,
    cfg: LinkConfig,
    name: String,
    rx: mpsc::Receiver<Command>,
    subs: Subscribers,
    connected: Arc<AtomicBool>,
    /// Sessions verified after the first one, counted as each is verified.
    reconnects: Arc<AtomicU64>,
    /// Sessions verified so far.
    sessions: u64,
}

/// Why a session ended.
enum End {
    /// Every handle is gone: stop the task.
    Closed,
    Lost(String),
}

impl<T: Transport> Task<T> {
    async fn run(mut self) {
        let mut backoff = self.cfg.min_backoff;
        let mut failures = 0u64;
        loop {
            let attempt = tokio::time::timeout(self.cfg.connect_timeout, self.transport.connect()).await;
            let err = match attempt {
                Ok(Ok((reader, writer))) => {
                    let (end, verified) = self.session(reader, writer).await;
                    self.connected.store(false, Ordering::Release);
                    // Only a session that worked resets the backoff: a server that accepts the
                    // connection and then drops it (full, wrong secret) is a failure like any other.
                    if verified {
                        backoff = self.cfg.min_backoff;
                        failures = 0;
                    }
                    match end {
                        End::Closed => return,
                        End::Lost(why) => why,
                    }
                }
                Ok(Err(e)) => e.to_string(),
                Err(_) => format!("connect timed out after {:?}", self.cfg.connect_timeout),
            };
            failures += 1;
            crate::metrics::GLOBAL.broker_link_failures.fetch_add(1, Ordering::Relaxed);
            // Say it once, then only now and then: an outage should not flood the log.
            if failures == 1 || failures % 30 == 0 {
                tracing::warn!(broker = %self.name, failures, retry_in = ?backoff, "broker link down: {err}");
            } else {
                tracing::debug!(broker = %self.name, failures, "broker still unreachable: {err}");
            }
            let retry = tokio::time::sleep(backoff);
            tokio::pin!(retry);
            loop {
                tokio::select! {
                    () = &mut retry => break,
                    cmd = self.rx.recv() => match cmd {
                        None => return,
                        Some(Command::Publish { done, .. } | Command::History { done, .. }) => {
                            let _ = done.send(Err(BrokerError::Unavailable(self.name.clone())));
                        }
                        Some(Command::Subscribe { id, channels, tx }) => {
                            self.subs.add(id, channels, tx);
                        }
                        // Recorded; the next session subscribes to them with the rest.
                        Some(Command::Join { id, channels, done }) => {
                            self.subs.join(id, channels);
                            let _ = done.send(Ok(None));
                        }
                        Some(Command::Leave { id, channels, done }) => {
                            self.subs.leave(id, channels);
                            let _ = done.send(Ok(None));
                        }
                    },
                }
            }
            backoff = (backoff * 2).min(self.cfg.max_backoff);
        }
    }

    /// Run one connection until it ends; also says whether the broker ever confirmed anything.
    async fn session(&mut self, mut reader: T::Reader, mut writer: T::Writer) -> (End, bool) {
        let all = self.subs.channels();
        if !all.is_empty() {
            writer.subscribe(&all);
        }
        // Each entry: when it was sent, and who waits for its confirmation (none for probes).
        let mut pending: VecDeque<(Instant, Option<Done>)> = VecDeque::new();
        // The link counts as up once the broker has answered the first probe, which it does only
        // after the subscriptions sent before it are in place.
        let mut verified = false;
        let mut tick = tokio::time::interval(self.cfg.probe_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let end = loop {
            tokio::select! {
                incoming = reader.next() => match incoming {
                    Ok(Incoming::Message(m)) => {
                        if let Some(gone) = self.subs.deliver(&self.name, m) {
                            writer.unsubscribe(&[gone]);
                        }
                    }
                    Ok(Incoming::Ack(answer)) => {
                        if !verified {
                            verified = true;
                            self.connected.store(true, Ordering::Release);
                            if self.sessions > 0 {
                                self.reconnects.fetch_add(1, Ordering::Relaxed);
                            }
                            self.sessions += 1;
                            tracing::info!(broker = %self.name, "broker link up");
                        }
                        if let Some((_, Some(done))) = pending.pop_front() {
                            let _ = done.send(Ok(answer));
                        }
                    }
                    Ok(Incoming::Ping) => writer.answer_ping(),
                    Ok(Incoming::Nothing) => {}
                    Err(e) => break End::Lost(e.to_string()),
                },
                cmd = self.rx.recv(), if pending.len() < self.cfg.max_in_flight => match cmd {
                    None => break End::Closed,
                    Some(Command::Publish { channel, data, keep, done }) => {
                        writer.publish(&channel, &data, keep);
                        pending.push_back((Instant::now(), Some(done)));
                    }
                    Some(Command::History { data, done }) => {
                        writer.history(&data);
                        pending.push_back((Instant::now(), Some(done)));
                    }
                    Some(Command::Subscribe { id, channels, tx }) => {
                        let new = self.subs.add(id, channels, tx);
                        if !new.is_empty() {
                            writer.subscribe(&new);
                        }
                    }
                    // The broker has the channels once a probe sent after them is answered (also
                    // when another join subscribed them just before: its probe comes first).
                    Some(Command::Join { id, channels, done }) => {
                        let new = self.subs.join(id, channels);
                        if !new.is_empty() {
                            writer.subscribe(&new);
                        }
                        writer.probe();
                        pending.push_back((Instant::now(), Some(done)));
                    }
                    Some(Command::Leave { id, channels, done }) => {
                        let gone = self.subs.leave(id, channels);
                        if !gone.is_empty() {
                            writer.unsubscribe(&gone);
                        }
                        let _ = done.send(Ok(None));
                    }
                },
                r = writer.flush(), if writer.has_pending() => {
                    if let Err(e) = r {
                        break End::Lost(e.to_string());
                    }
                }
                _ = tick.tick() => {
                    if let Some((since, _)) = pending.front() {
                        if since.elapsed() > self.cfg.ack_timeout {
                            break End::Lost(format!("no answer for {:?}", self.cfg.ack_timeout));
                        }
                    } else {
                        writer.probe();
                        pending.push_back((Instant::now(), None));
                    }
                }
            }
        };
        for (_, done) in pending {
            if let Some(done) = done {
                let _ = done.send(Err(BrokerError::Unavailable(self.name.clone())));
            }
        }
        (end, verified)
    }
}
