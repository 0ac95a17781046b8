//! Who listens to which broker channel inside this process, and the hand-off of each message to
//! them: shared by every remote backend. Subscribers are known by id, so that they can join and
//! leave channels later; joins are counted, so a subscriber holds a channel until it has left it
//! as often as it joined, and joins and leaves commute: a leave that comes before its join is
//! counted too, and that join then holds nothing. A subscriber whose buffer is full loses that
//! message (counted, logged now and then); one that is gone is forgotten. Channels that gain their first subscriber, or lose
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
    /// For each channel: who joined it, through which sender, how many times more than it left
    /// (below zero: a leave came before its join). Only a count above zero holds the channel.
    subs: HashMap<Bytes, Vec<(SubId, mpsc::Sender<Message>, i32)>>,
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
        self.edit(id, channels, 1)
    }

    /// Undo one join of `channels` by subscriber `id` (made already, or still to come); returns
    /// the channels nobody here listens to any more.
    pub fn leave(&mut self, id: SubId, channels: Vec<String>) -> Vec<String> {
        self.edit(id, channels, -1)
    }

    /// Add `by` to subscriber `id`'s count on each of `channels`; the channels whose holding
    /// changed (held by nobody before, or by nobody after).
    fn edit(&mut self, id: SubId, channels: Vec<String>, by: i32) -> Vec<String> {
        let Some(tx) = self.senders.get(&id) else { return Vec::new() };
        let mut changed = Vec::new();
        for c in channels {
            let key = Bytes::from(c);
            let list = self.subs.entry(key.clone()).or_default();
            let before = held(list);
            match list.iter().position(|(s, _, _)| *s == id) {
                Some(i) => {
                    list[i].2 += by;
                    if list[i].2 == 0 {
                        list.swap_remove(i);
                    }
                }
                None => list.push((id, tx.clone(), by)),
            }
            if held(list) != before {
                changed.push(String::from_utf8_lossy(&key).into_owned());
            }
            if list.is_empty() {
                self.subs.remove(&key);
            }
        }
        changed
    }

    /// Every channel somebody listens to.
    pub fn channels(&self) -> Vec<String> {
        self.subs.iter().filter(|(_, l)| held(l)).map(|(k, _)| String::from_utf8_lossy(k).into_owned()).collect()
    }

    /// Hand `m` to the subscribers of its channel; returns the channel if nobody here listens to
    /// it (any more, or at all: the broker is still subscribed, and the caller unsubscribes it).
    pub fn deliver(&mut self, broker: &str, m: Message) -> Option<String> {
        let nobody = || Some(String::from_utf8_lossy(&m.channel).into_owned());
        let Some(list) = self.subs.get_mut(&m.channel) else { return nobody() };
        if !held(list) {
            return nobody();
        }
        let mut closed = Vec::new();
        list.retain(|(id, tx, n)| {
            *n <= 0
                || match tx.try_send(m.clone()) {
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
                }
        });
        for id in closed {
            self.senders.remove(&id);
        }
        if !held(list) {
            if list.is_empty() {
                self.subs.remove(&m.channel);
            }
            return nobody();
        }
        None
    }
}

/// Whether anybody in `list` holds its channel.
fn held(list: &[(SubId, mpsc::Sender<Message>, i32)]) -> bool {
    list.iter().any(|(_, _, n)| *n > 0)
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

    #[test]
    fn joins_and_leaves_commute() {
        let mut s = Subscribers::default();
        let (tx, mut rx) = mpsc::channel(4);
        let (tx2, _rx2) = mpsc::channel(4);
        s.add(1, Vec::new(), tx);
        s.add(2, Vec::new(), tx2);
        // A leave that overtakes its join: the join then holds nothing.
        assert_eq!(s.leave(1, vec!["a".into()]), Vec::<String>::new());
        assert_eq!(s.join(1, vec!["a".into()]), Vec::<String>::new(), "the leave came first");
        assert!(s.channels().is_empty());
        // Every order of two joins and two leaves ends with nothing held; the channel is
        // reported new exactly when it becomes held, gone exactly when it stops.
        let ops = [(1, 1), (1, 1), (1, -1), (1, -1)];
        for perm in permutations(&ops) {
            let mut held = false;
            for (id, by) in perm {
                let ch = vec!["b".to_owned()];
                let changed = if by > 0 { s.join(id, ch) } else { s.leave(id, ch) };
                let now = s.channels().contains(&"b".to_owned());
                assert_eq!(!changed.is_empty(), now != held, "reported exactly when held changes");
                held = now;
            }
            assert!(!held && s.channels().is_empty());
        }
        // Held by another subscriber while one's count is below zero: delivered to the holder only.
        s.leave(1, vec!["c".into()]);
        assert_eq!(s.join(2, vec!["c".into()]), ["c"]);
        let m = Message { channel: Bytes::from_static(b"c"), data: Bytes::from_static(b"x"), position: None };
        assert_eq!(s.deliver("t", m.clone()), None);
        assert!(rx.try_recv().is_err(), "subscriber 1 left c before joining it");
        assert_eq!(s.leave(2, vec!["c".into()]), ["c"]);
        assert_eq!(s.deliver("t", m), Some("c".into()), "a message nobody holds: unsubscribe the broker");
    }

    /// Every ordering of `ops`.
    fn permutations(ops: &[(SubId, i32)]) -> Vec<Vec<(SubId, i32)>> {
        if ops.len() <= 1 {
            return vec![ops.to_vec()];
        }
        let mut out = Vec::new();
        for i in 0..ops.len() {
            let mut rest = ops.to_vec();
            let first = rest.remove(i);
            for mut p in permutations(&rest) {
                p.insert(0, first);
                out.push(p);
            }
        }
        out
    }
}
