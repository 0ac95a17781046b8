//! Offsets: a message already delivered is dropped, a jump is a gap whose later messages are held
//! while the missing ones are read from history and delivered first; what history cannot fill is
//! reported. Also the history reads shared with recovery.

use super::*;

/// The latest offset a worker delivered on one channel; while a gap is being filled from
/// history, the messages that arrived after it.
pub(super) struct Seen {
    pub(super) epoch: Arc<str>,
    pub(super) offset: u64,
    pub(super) held: Option<Vec<Message>>,
}

/// What to do with a message that has an offset.
pub(super) enum Check {
    Deliver,
    Duplicate,
    /// Held behind a gap being filled.
    Held,
    /// A gap after `since` (in the message's epoch): fill it, then deliver what is held.
    Repair {
        since: u64,
    },
}

/// A gap's filling, from the task that read the history back to the worker's own task.
pub(in crate::gateway) struct Repaired {
    pub(super) channel: Bytes,
    pub(super) epoch: Arc<str>,
    pub(super) items: Option<Vec<(u64, Bytes)>>,
}

/// Messages held behind one gap before newer ones are dropped (and make a gap of their own).
pub(super) const MAX_HELD: usize = 8192;

/// Most messages read from history to fill one gap or recover one channel.
pub(super) const MAX_RECOVERED: usize = 10_000;

impl Table {
    /// Where `m` (at `p`) stands against what this worker delivered on its channel.
    pub(super) fn check(&mut self, m: &Message, p: &Position) -> Check {
        let held_here = match std::str::from_utf8(&m.channel).ok().and_then(Audience::of) {
            Some(Audience::All) => true,
            Some(Audience::User(u)) => self.users.contains_key(u),
            Some(Audience::Topic(t)) => self.topics.contains_key(t),
            None => false,
        };
        if !held_here {
            return Check::Deliver;
        }
        let Some(s) = self.seen.get_mut(&m.channel) else {
            let s = Seen { epoch: p.epoch.clone(), offset: p.offset, held: None };
            self.seen.insert(m.channel.clone(), s);
            return Check::Deliver;
        };
        if let Some(held) = &mut s.held {
            if held.len() < MAX_HELD {
                held.push(m.clone());
            } else {
                GLOBAL.subscriber_drops.fetch_add(1, Ordering::Relaxed);
            }
            return Check::Held;
        }
        if s.epoch != p.epoch {
            // The channel's history started again: from its first message on, nothing was missed.
            s.epoch = p.epoch.clone();
            s.offset = 0;
        }
        match p.offset {
            o if o <= s.offset => Check::Duplicate,
            o if o == s.offset + 1 => {
                s.offset = o;
                Check::Deliver
            }
            _ => {
                s.held = Some(vec![m.clone()]);
                Check::Repair { since: s.offset }
            }
        }
    }
}

impl Worker {
    /// Take one message from the broker: deliver it, unless it is a duplicate or comes after a
    /// gap (then held, and the gap filled from history first).
    pub(in crate::gateway) fn receive(self: &Arc<Self>, m: Message) {
        let Some(p) = m.position.clone() else { return self.handle(m) };
        let check = self.table().check(&m, &p);
        match check {
            Check::Deliver => self.handle(m),
            Check::Duplicate => {
                GLOBAL.duplicates.fetch_add(1, Ordering::Relaxed);
            }
            Check::Held => {}
            Check::Repair { since } => {
                GLOBAL.gaps.fetch_add(1, Ordering::Relaxed);
                let channel = String::from_utf8_lossy(&m.channel).into_owned();
                tracing::info!(worker = %self.id, %channel, since, next = p.offset, "gap in offsets: filling it from history");
                let w = self.clone();
                tokio::spawn(async move {
                    let items = read_history(&*w.broker, &channel, &p.epoch, since, Some(p.offset)).await;
                    let _ = w.repairs.send(Repaired { channel: m.channel, epoch: p.epoch, items }).await;
                });
            }
        }
    }

    /// Deliver a gap's filling (or report that there is none), then what was held behind it.
    pub(super) fn repaired(self: &Arc<Self>, r: Repaired) {
        let Some(held) = self.table().seen.get_mut(&r.channel).and_then(|s| s.held.take()) else { return };
        let channel = String::from_utf8_lossy(&r.channel).into_owned();
        match r.items {
            Some(items) => {
                for (offset, data) in items {
                    let position = Some(Position { offset, epoch: r.epoch.clone() });
                    if let Some(s) = self.table().seen.get_mut(&r.channel) {
                        s.offset = offset;
                    }
                    self.handle(Message { channel: r.channel.clone(), data, position });
                }
            }
            None => {
                GLOBAL.gaps_unrepaired.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(worker = %self.id, %channel, "gap in offsets that history cannot fill: clients told");
                if let (Some(s), Some(first)) = (self.table().seen.get_mut(&r.channel), held.first()) {
                    s.offset = first.position.as_ref().map_or(0, |p| p.offset.saturating_sub(1));
                }
                self.notify(&channel, false);
            }
        }
        for m in held {
            self.receive(m);
        }
    }

    /// Tell the JSON connections of `channel` whether what they missed could be delivered.
    pub(super) fn notify(&self, channel: &str, ok: bool) {
        let Some(to) = Audience::of(channel).map(Target::Members) else { return };
        let text = json::recovered(channel, ok);
        let t = self.table();
        let ix =
            Indexes { conns: &t.conns, users: &t.users, topics: &t.topics, joiners: &t.joiners, channels: &t.channels };
        each_member(ix, to, |_, c| {
            if c.encoding == Encoding::NativeJson {
                let _ = c.offer(&c.encode(&text), self.max_frames, self.max_bytes, false);
            }
        });
    }
}

/// Messages of `channel` after `since` in `epoch`, read from the broker's history up to (not
/// including) offset `until`, or up to its latest message; `None` when the history does not reach
/// back to `since` (or changed epoch, or is not kept). A history that cannot be read right now (a
/// link just back, a store electing a leader) is asked again for up to [`HISTORY_PATIENCE`].
pub(super) async fn read_history(
    broker: &dyn Broker,
    channel: &str,
    epoch: &str,
    since: u64,
    until: Option<u64>,
) -> Option<Vec<(u64, Bytes)>> {
    let deadline = tokio::time::Instant::now() + HISTORY_PATIENCE;
    let mut wait = Duration::from_millis(100);
    loop {
        match read_history_once(broker, channel, epoch, since, until).await {
            Ok(items) => return items,
            Err(e) if tokio::time::Instant::now() + wait < deadline => {
                tracing::debug!(%channel, "history not read yet: {e}");
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(Duration::from_secs(1));
            }
            Err(e) => {
                tracing::info!(%channel, "history could not be read: {e}");
                return None;
            }
        }
    }
}

/// How long a gap's filling or a recovery waits for a history that cannot be read right now.
pub(super) const HISTORY_PATIENCE: Duration = Duration::from_secs(8);

/// One try of [`read_history`].
pub(super) async fn read_history_once(
    broker: &dyn Broker,
    channel: &str,
    epoch: &str,
    since: u64,
    until: Option<u64>,
) -> Result<Option<Vec<(u64, Bytes)>>, crate::broker::BrokerError> {
    let mut items = Vec::new();
    let mut at = since;
    let mut until = until;
    while items.len() < MAX_RECOVERED {
        let page: Page = match broker.history(channel, at, history::MAX_PAGE).await {
            Ok(p) => p,
            Err(crate::broker::BrokerError::NoHistory(_)) => return Ok(None),
            Err(e) => return Err(e),
        };
        // The store has the message at `until` (it was delivered): a page that ends before it
        // comes from a replica that has not caught up yet.
        if until.is_some_and(|u| page.epoch == epoch && page.offset + 1 < u) {
            return Err(crate::broker::BrokerError::Unavailable(format!("history of {channel} behind")));
        }
        if !page.reaches(epoch, at) {
            return Ok(None);
        }
        let end = *until.get_or_insert(page.offset + 1);
        if page.items.is_empty() {
            return Ok((at + 1 >= end).then_some(items));
        }
        for (offset, data) in page.items {
            if offset >= end {
                return Ok(Some(items));
            }
            at = offset;
            items.push((offset, data));
        }
        if at + 1 >= end {
            return Ok(Some(items));
        }
        if at == page.offset {
            // The history ends before `until`: what is missing is gone.
            return Ok(None);
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::super::*;

    #[test]
    fn offsets_tell_duplicates_gaps_and_new_epochs() {
        let mut t = Table::default();
        let m = |o: u64, e: &str| {
            let p = Position { offset: o, epoch: e.into() };
            (Message { channel: Bytes::from_static(b"broadcast"), data: Bytes::new(), position: Some(p.clone()) }, p)
        };
        let check = |t: &mut Table, o, e| {
            let (m, p) = m(o, e);
            t.check(&m, &p)
        };
        assert!(matches!(check(&mut t, 5, "a"), Check::Deliver), "the first one sets the place");
        assert!(matches!(check(&mut t, 6, "a"), Check::Deliver));
        assert!(matches!(check(&mut t, 6, "a"), Check::Duplicate));
        assert!(matches!(check(&mut t, 3, "a"), Check::Duplicate));
        assert!(matches!(check(&mut t, 9, "a"), Check::Repair { since: 6 }), "7 and 8 are missing");
        assert!(matches!(check(&mut t, 10, "a"), Check::Held), "behind the gap");
        t.seen.get_mut(&b"broadcast"[..]).expect("seen").held = None;
        assert!(matches!(check(&mut t, 1, "b"), Check::Deliver), "a new epoch starts again");
        assert!(matches!(check(&mut t, 1, "b"), Check::Duplicate));
        // A user's channel counts only while somebody here is that user.
        let (u, p) = (Message { channel: Bytes::from_static(b"user:x"), ..m(1, "a").0 }, m(1, "a").1);
        assert!(matches!(t.check(&u, &p), Check::Deliver));
        assert!(matches!(t.check(&u, &p), Check::Deliver), "not tracked: nobody here is x");
    }
}
