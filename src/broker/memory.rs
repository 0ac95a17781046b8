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
}

impl MemoryBroker {
    pub fn new(hub: Arc<Hub>) -> MemoryBroker {
        MemoryBroker { hub }
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
        self.hub.publish(
            &[Name::new(Bytes::copy_from_slice(channel.as_bytes()))],
            &data,
        );
        Box::pin(std::future::ready(Ok(())))
    }

    fn subscribe(&self, channels: Vec<String>) -> Result<Subscription, BrokerError> {
        let (tx, rx) = mpsc::channel(SUBSCRIPTION_CAPACITY);
        let id = self.hub.connect(Sink::Local(tx));
        let guard = Unsubscribe(self.hub.clone(), id);
        let names = channels
            .into_iter()
            .map(|c| Name::new(c.into_bytes()))
            .collect();
        self.hub
            .subscribe(id, names)
            .map_err(|e| BrokerError::Refused(e.to_string()))?;
        Ok(Subscription {
            rx,
            _guard: Some(Box::new(guard)),
        })
    }

    fn is_connected(&self) -> bool {
        true
    }
}
