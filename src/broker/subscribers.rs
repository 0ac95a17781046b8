//! Who listens to which broker channel inside this process, and the hand-off of each message to
//! them: shared by every remote backend. Subscribers are known by id, so that they can join and
//! leave channels later; joins are counted, so a subscriber holds a channel until it has left it
//! as often as it joined (joins and leaves commute: their order does not matter). A subscriber whose buffer is full loses that message (counted, logged now
//! and then); one that is gone is forgotten. Channels that gain their first subscriber, or lose
//! their last, are reported so that the backend subscribes or unsubscribes on the broker.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::mpsc;

use super::{Message, SubId};
use crate::metrics::{LogEvery, GLOBAL};

/// Warnings about messages dropped for a full subscriber: at most one line per interval.
static DROP_LOG: LogEvery = LogEvery::new(Duration::from_secs(10));

/// Subscribers by channel.
#[derive(Default)]
pub struct Subscribers {
    /// For each channel: who holds it, through which sender, how many times.
    subs: HashMap<Bytes, Vec<(SubId, mpsc::Sender<Message>, u32)>>,
    senders: HashMap<SubId, mpsc::Sender<Message>>,
}

impl Subscribers {
    /// Record subscriber `id`, fed through `tx`, on each of `channels`; returns the channels that
    /// are new here.
    pub fn add(&mut self, id: SubId, channels: Vec<String>, tx: mpsc::Sender<Message>) -> Vec<String> {
        self.senders.insert(id, tx);
        self.join(id, channels)
    }

    /// Add subscriber `id` to `channels`; returns the channels that are new here.
    pub fn join(&mut self, id: SubId, channels: Vec<String>) -> Vec<String> {
        let Some(tx) = self.senders.get(&id) else { return Vec::new() };
        let mut new = Vec::new();
        for c in channels {
            let list = self.subs.entry(Bytes::from(c.clone())).or_default();
            if let Some((_, _, n)) = list.iter_mut().find(|(s, _, _)| *s == id) {
                *n += 1;
                continue;
            }
            if list.is_empty() {
                new.push(c);
            }
            list.push((id, tx.clone(), 1));
        }
        new
    }

    /// Undo one join of `channels` by subscriber `id`; returns the channels nobody here listens to
    /// any more.
    pub fn leave(&mut self, id: SubId, channels: Vec<String>) -> Vec<String> {
        let mut gone = Vec::new();
        for c in channels {
            let key = Bytes::from(c);
            let Some(list) = self.subs.get_mut(&key) else { continue };
            if let Some(i) = list.iter().position(|(s, _, _)| *s == id) {
                list[i].2 -= 1;
                if list[i].2 == 0 {
                    list.swap_remove(i);
                }
            }
            if list.is_empty() {
                self.subs.remove(&key);
                gone.push(String::from_utf8_lossy(&key).into_owned());
            }
        }
        gone
    }

    /// Every channel somebody listens to.
    pub fn channels(&self) -> Vec<String> {
        self.subs.keys().map(|k| String::from_utf8_lossy(k).into_owned()).collect()
    }

    /// Hand `m` to the subscribers of its channel; returns the channel if nobody listens any more.
    pub fn deliver(&mut self, broker: &str, m: Message) -> Option<String> {
        let list = self.subs.get_mut(&m.channel)?;
        let mut closed = Vec::new();
        list.retain(|(id, tx, _)| match tx.try_send(m.clone()) {
            Ok(()) => true,
            Err(mpsc::error::TrySendError::Full(_)) => {
                GLOBAL.subscriber_drops.fetch_add(1, Ordering::Relaxed);
                if let Some(held) = DROP_LOG.ready() {
                    tracing::warn!(broker, similar_since_last = held, "subscriber is full: message dropped");
                }
                true
            }
            Err(mpsc::error::TrySendError::Closed(_)) => {
                closed.push(*id);
                false
            }
        });
        for id in closed {
            self.senders.remove(&id);
        }
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
        assert_eq!(s.add(1, vec!["a".into(), "b".into()], tx1), ["a", "b"]);
        assert_eq!(s.add(2, vec!["a".into()], tx2), Vec::<String>::new());
        assert_eq!(s.join(2, vec!["c".into(), "a".into()]), ["c"]);
        assert_eq!(s.join(2, vec!["c".into()]), Vec::<String>::new(), "joined twice");
        assert_eq!(s.leave(2, vec!["c".into()]), Vec::<String>::new(), "still joined once");
        assert_eq!(s.leave(2, vec!["c".into()]), ["c"]);
        assert_eq!(s.leave(2, vec!["b".into()]), Vec::<String>::new(), "1 still listens to b");
        let m = |d: &'static str| Message {
            channel: Bytes::from_static(b"a"),
            data: Bytes::from_static(d.as_bytes()),
            position: None,
        };
        assert_eq!(s.deliver("t", m("1")), None);
        assert_eq!(s.deliver("t", m("2")), None, "full subscribers keep their place");
        assert_eq!(rx1.try_recv().map(|m| m.data), Ok(Bytes::from_static(b"1")));
        drop((rx1, rx2));
        assert_eq!(s.deliver("t", m("3")), Some("a".into()), "nobody left on a");
        assert_eq!(s.channels(), ["b"]);
    }
}
