//! Who listens to which broker channel inside this process, and the hand-off of each message to
//! them: shared by every remote backend. A subscriber whose buffer is full loses that message
//! (counted, logged now and then); one that is gone is forgotten, and a channel nobody listens to
//! any more is reported so that the backend can unsubscribe on the broker.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::mpsc;

use super::Message;
use crate::metrics::{LogEvery, GLOBAL};

/// Warnings about messages dropped for a full subscriber: at most one line per interval.
static DROP_LOG: LogEvery = LogEvery::new(Duration::from_secs(10));

/// Subscribers by channel.
#[derive(Default)]
pub struct Subscribers {
    subs: HashMap<Bytes, Vec<mpsc::Sender<Message>>>,
}

impl Subscribers {
    /// Record `tx` for each of `channels`; returns the channels that are new here.
    pub fn add(&mut self, channels: Vec<String>, tx: mpsc::Sender<Message>) -> Vec<String> {
        let mut new = Vec::new();
        for c in channels {
            let list = self.subs.entry(Bytes::from(c.clone())).or_default();
            if list.is_empty() {
                new.push(c);
            }
            list.push(tx.clone());
        }
        new
    }

    /// Every channel somebody listens to.
    pub fn channels(&self) -> Vec<String> {
        self.subs.keys().map(|k| String::from_utf8_lossy(k).into_owned()).collect()
    }

    /// Hand `m` to the subscribers of its channel; returns the channel if nobody listens any more.
    pub fn deliver(&mut self, broker: &str, m: Message) -> Option<String> {
        let list = self.subs.get_mut(&m.channel)?;
        list.retain(|tx| match tx.try_send(m.clone()) {
            Ok(()) => true,
            Err(mpsc::error::TrySendError::Full(_)) => {
                GLOBAL.subscriber_drops.fetch_add(1, Ordering::Relaxed);
                if let Some(held) = DROP_LOG.ready() {
                    tracing::warn!(broker, similar_since_last = held, "subscriber is full: message dropped");
                }
                true
            }
            Err(mpsc::error::TrySendError::Closed(_)) => false,
        });
        if list.is_empty() {
            self.subs.remove(&m.channel);
            return Some(String::from_utf8_lossy(&m.channel).into_owned());
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn new_channels_drops_and_departures() {
        let mut s = Subscribers::default();
        let (tx1, mut rx1) = mpsc::channel(1);
        let (tx2, rx2) = mpsc::channel(1);
        assert_eq!(s.add(vec!["a".into(), "b".into()], tx1), ["a", "b"]);
        assert_eq!(s.add(vec!["a".into()], tx2), Vec::<String>::new());
        let m = |d: &'static str| Message { channel: Bytes::from_static(b"a"), data: Bytes::from_static(d.as_bytes()) };
        assert_eq!(s.deliver("t", m("1")), None);
        assert_eq!(s.deliver("t", m("2")), None, "full subscribers keep their place");
        assert_eq!(rx1.try_recv().map(|m| m.data), Ok(Bytes::from_static(b"1")));
        drop((rx1, rx2));
        assert_eq!(s.deliver("t", m("3")), Some("a".into()), "nobody left on a");
        assert_eq!(s.channels(), ["b"]);
    }
}
