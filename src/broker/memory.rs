//! The in-process broker: publishes go straight into a [`Hub`], which may also serve remote
//! channel clients (that is how `standalone` keeps port 2206 open to other nodes).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use bytes::Bytes;
use channel_proto::Name;
use tokio::sync::mpsc;

use super::{Broker, BrokerError, Subscription, SUBSCRIPTION_CAPACITY};
use crate::hub::{ClientId, Hub, Sink};

/// A broker that is a hub in this process.
pub struct MemoryBroker {
    hub: Arc<Hub>,
    prefix: String,
}

impl MemoryBroker {
    pub fn new(hub: Arc<Hub>, prefix: &str) -> MemoryBroker {
        MemoryBroker { hub, prefix: prefix.to_owned() }
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
    fn publish(
        &self,
        channel: &str,
        data: Bytes,
    ) -> Pin<Box<dyn Future<Output = Result<(), BrokerError>> + Send + '_>> {
        self.hub.publish(&[self.name(channel)], &data);
        Box::pin(std::future::ready(Ok(())))
    }

    fn subscribe(&self, channels: Vec<String>) -> Result<Subscription, BrokerError> {
        let (tx, mut rx) = mpsc::channel(SUBSCRIPTION_CAPACITY);
        let id = self.hub.connect(Sink::Local(tx));
        let guard = Unsubscribe(self.hub.clone(), id);
        let names = channels.iter().map(|c| self.name(c)).collect();
        self.hub.subscribe(id, names).map_err(|e| BrokerError::Refused(e.to_string()))?;
        if !self.prefix.is_empty() {
            // Subscribers see names without the prefix, as on every other backend.
            let (strip_tx, strip_rx) = mpsc::channel(SUBSCRIPTION_CAPACITY);
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
        Ok(Subscription { rx, _guard: Some(Box::new(guard)) })
    }

    fn is_connected(&self) -> bool {
        true
    }
}
