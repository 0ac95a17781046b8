//! The in-process broker: publishes go straight into a [`Hub`], which may also serve remote
//! channel clients (that is how `standalone` keeps port 2206 open to other nodes).

use std::sync::Arc;

use bytes::Bytes;
use channel_proto::{Name, Request};
use tokio::sync::mpsc;

use super::{Broker, BrokerError, BrokerFuture, Keep, Page, Position, SubId, Subscription};
use crate::hub::{ClientId, Hub, Sink};

/// A broker that is a hub in this process.
pub struct MemoryBroker {
    hub: Arc<Hub>,
    prefix: String,
    /// How many times each subscription joined each channel (the hub keeps sets, not counts).
    joins: std::sync::Mutex<std::collections::HashMap<(SubId, String), i32>>,
}

impl MemoryBroker {
    pub fn new(hub: Arc<Hub>, prefix: &str) -> MemoryBroker {
        MemoryBroker { hub, prefix: prefix.to_owned(), joins: Default::default() }
    }

    fn name(&self, channel: &str) -> Name {
        Name::new(format!("{}{channel}", self.prefix).into_bytes())
    }
}

struct Unsubscribe(Arc<Hub>, ClientId);

impl Drop for Unsubscribe {
    fn drop(&mut self) {
        self.0.disconnect(self.1);
    }
}

impl Broker for MemoryBroker {
    fn publish(&self, channel: &str, data: Bytes, keep: Option<Keep>) -> BrokerFuture<'_, Option<Position>> {
        let position = self.hub.publish(&[self.name(channel)], &data, keep);
        Box::pin(std::future::ready(Ok(position)))
    }

    fn history(&self, channel: &str, since: u64, limit: usize) -> BrokerFuture<'_, Page> {
        let page = self.hub.history(self.name(channel).as_bytes(), since, limit);
        Box::pin(std::future::ready(page.ok_or_else(|| BrokerError::NoHistory("memory".into()))))
    }

    fn subscribe_with(&self, channels: Vec<String>, capacity: usize) -> Result<Subscription, BrokerError> {
        let (tx, mut rx) = mpsc::channel(capacity.max(1));
        let id = self.hub.connect(Sink::Local(tx));
        let guard = Unsubscribe(self.hub.clone(), id);
        let names = channels.iter().map(|c| self.name(c)).collect();
        self.hub.subscribe(id, names).map_err(|e| BrokerError::Refused(e.to_string()))?;
        if !self.prefix.is_empty() {
            // Subscribers see names without the prefix, as on every other backend.
            let (strip_tx, strip_rx) = mpsc::channel(capacity.max(1));
            let n = self.prefix.len();
            tokio::spawn(async move {
                while let Some(mut m) = rx.recv().await {
                    m.channel = m.channel.slice(n.min(m.channel.len())..);
                    if strip_tx.send(m).await.is_err() {
                        return;
                    }
                }
            });
            rx = strip_rx;
        }
        Ok(Subscription { rx, id, _guard: Some(Box::new(guard)) })
    }

    fn join(&self, id: SubId, channels: Vec<String>) -> BrokerFuture<'_, ()> {
        let mut joins = crate::io::lock(&self.joins);
        let mut new = Vec::new();
        for c in channels {
            let name = self.name(&c);
            let key = (id, c);
            let n = joins.entry(key.clone()).or_insert(0);
            *n += 1;
            match *n {
                1 => new.push(name),
                // It had left before it joined: nothing to hold.
                0 => drop(joins.remove(&key)),
                _ => {}
            }
        }
        let r = self.hub.subscribe(id, new).map_err(|e| BrokerError::Refused(e.to_string()));
        Box::pin(std::future::ready(r))
    }

    fn leave(&self, id: SubId, channels: Vec<String>) -> BrokerFuture<'_, ()> {
        let mut joins = crate::io::lock(&self.joins);
        let mut gone = Vec::new();
        for c in channels {
            // Counted also before its join (below zero), which then holds nothing.
            let key = (id, c);
            let n = joins.entry(key.clone()).or_insert(0);
            *n -= 1;
            if *n == 0 {
                joins.remove(&key);
                gone.push(self.name(&key.1));
            }
        }
        let r = self.hub.handle(id, Request::Unsubscribe(gone)).map_err(|e| BrokerError::Refused(e.to_string()));
        Box::pin(std::future::ready(r))
    }

    fn is_connected(&self) -> bool {
        true
    }
}
