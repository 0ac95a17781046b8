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
//! the backend confirmed the join.
//!
//! Not federated yet: `publishLoop` and the queues (`watch`, `enqueue`, `reserve`) stay local
//! to each server.

use std::sync::{Arc, Weak};

use bytes::Bytes;
use channel_proto::{Keep, Name, Request};

use super::{ClientId, Hub, HubError};
use crate::broker::{Broker, BrokerError, SubId, SUBSCRIPTION_CAPACITY};
use crate::channel_ext::{decode_history_request, encode_page, encode_position, HISTORY};
use crate::history::AS_THE_STORE;

/// How long a federated server waits for its backend before serving clients anyway.
pub const LINK_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

/// The backend of a federated hub.
pub(super) struct Backend {
    broker: Arc<dyn Broker>,
    sub: SubId,
    /// How this server keeps what it publishes for clients that do not say (PHP's), and what
    /// "as the store allows" means here.
    keep: Option<Keep>,
}

impl Backend {
    /// Leave `names` on the backend (a client left them, or is gone); in the background.
    pub(super) fn leave(&self, names: impl IntoIterator<Item = Name>) {
        let names: Vec<String> = names.into_iter().map(|n| broker_name(&n)).collect();
        if names.is_empty() {
            return;
        }
        let (broker, sub) = (self.broker.clone(), self.sub);
        tokio::spawn(async move {
            let _ = broker.leave(sub, names).await;
        });
    }
}

/// A channel's name on the backend.
fn broker_name(n: &Name) -> String {
    String::from_utf8_lossy(n.as_bytes()).into_owned()
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
        if self.backend.set(Backend { broker, sub: sub.id, keep }).is_err() {
            return Err(BrokerError::Refused("the hub is federated already".into()));
        }
        let hub: Weak<Hub> = Arc::downgrade(self);
        tokio::spawn(async move {
            while let Some(m) = sub.recv().await {
                let Some(hub) = hub.upgrade() else { return };
                hub.deliver(&Name::new(m.channel.clone()), &m.data, m.position.as_ref());
            }
        });
        Ok(())
    }

    /// Whether the hub shares a backend, and whether its link is up.
    pub fn backend_connected(&self) -> Option<bool> {
        self.backend.get().map(|b| b.broker.is_connected())
    }

    /// Carry out one request from client `id`: on a federated hub, subscriptions and events go
    /// through the backend; everything else (and everything on a hub of its own) as
    /// [`Hub::handle`] does.
    pub async fn handle_request(&self, id: ClientId, req: Request) -> Result<(), HubError> {
        let Some(b) = self.backend.get() else { return self.handle(id, req) };
        match req {
            Request::Subscribe(mut names) => {
                self.take_positions(id, &mut names);
                let added = self.subscribe_new(id, names)?;
                if !added.is_empty() {
                    let names = added.iter().map(broker_name).collect();
                    if let Err(e) = b.broker.join(b.sub, names).await {
                        tracing::warn!(client = id, "federated subscribe not confirmed: {e}");
                    }
                }
                Ok(())
            }
            Request::Unsubscribe(names) => {
                b.leave(self.unsubscribe(id, names));
                Ok(())
            }
            Request::Publish { channels, data, keep } => {
                let node = self.lock().clients.get(&id).is_some_and(|c| c.positions);
                if let ([one], true) = (&channels[..], node) {
                    if one.as_bytes() == HISTORY.as_bytes() {
                        if let Some(answer) = self.backend_history(b, &data).await {
                            self.send_to(id, answer.into());
                        }
                        return Ok(());
                    }
                }
                let mut first = None;
                for (i, name) in channels.iter().enumerate() {
                    let keep = match keep {
                        Some(k) if k == AS_THE_STORE => b.keep,
                        Some(k) => Some(k),
                        None if crate::protocol::native::push::keeps_history(name.as_bytes()) => b.keep,
                        None => None,
                    };
                    match b.broker.publish(&broker_name(name), data.clone(), keep).await {
                        Ok(p) if i == 0 => first = p,
                        Ok(_) => {}
                        Err(e) => tracing::warn!(client = id, "federated publish not taken: {e}"),
                    }
                }
                self.stats.published.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if let (true, Some(p)) = (node, first) {
                    self.send_to(id, encode_position(&p).into());
                }
                Ok(())
            }
            other => self.handle(id, other),
        }
    }

    /// A history page from the backend for a node's request.
    async fn backend_history(&self, b: &Backend, data: &Bytes) -> Option<Vec<u8>> {
        let (channel, since, limit) = decode_history_request(data)?;
        let channel = String::from_utf8_lossy(&channel).into_owned();
        Some(encode_page(&b.broker.history(&channel, since, limit).await.ok()?))
    }
}
