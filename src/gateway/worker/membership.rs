//! Who a worker's connections are: the indexes from users and topics to connections, the edits
//! that bind, join and leave (each saying which broker channel to join or leave), and the
//! numbered changes the presence trackers follow.

use super::*;

/// Who a connection is, for the connections that are someone (a token, a bind, a join). Kept
/// apart from the connection table, so that a broadcast walks a table of bare pointers.
#[derive(Default)]
pub(super) struct Who {
    pub(super) uid: Option<Arc<str>>,
    pub(super) topics: Vec<Arc<str>>,
    /// Broker channels joined by the connection's protocol (a Pusher subscription).
    pub(super) channels: Vec<Arc<str>>,
}

/// Most topics one connection may be in.
pub const MAX_TOPICS_PER_CONNECTION: usize = 256;

/// Why a change to a connection was not made.
pub(super) enum Refusal {
    NoConnection,
    Refused(String),
}

/// A change to a connection: the broker channel to join and the one to leave, if any.
pub(super) type Edit = Result<(Option<String>, Option<String>), Refusal>;

/// Changes kept for the trackers before the oldest are dropped.
pub(super) const MAX_CHANGES: usize = 65_536;

impl Table {
    /// Make connection `id` belong to `uid` (or to nobody).
    pub(super) fn bind(&mut self, id: u64, uid: Option<&str>) -> Edit {
        if !self.conns.contains_key(&id) {
            return Err(Refusal::NoConnection);
        }
        let e = self.who.entry(id).or_default();
        if e.uid.as_deref() == uid {
            return Ok((None, None));
        }
        let old = std::mem::replace(&mut e.uid, uid.map(Into::into));
        if let Some(u) = e.uid.clone() {
            self.index(Kind::User, &u, id);
        }
        if let Some(o) = &old {
            self.unindex(Kind::User, o, id);
        }
        Ok((uid.map(user_channel), old.as_deref().map(user_channel)))
    }

    /// Add connection `id` to topic `topic`.
    pub(super) fn join(&mut self, id: u64, topic: &str) -> Edit {
        if !self.conns.contains_key(&id) {
            return Err(Refusal::NoConnection);
        }
        let e = self.who.entry(id).or_default();
        if e.topics.iter().any(|t| &**t == topic) {
            return Ok((None, None));
        }
        if e.topics.len() >= MAX_TOPICS_PER_CONNECTION {
            return Err(Refusal::Refused(format!("the connection is in {MAX_TOPICS_PER_CONNECTION} topics already")));
        }
        let topic: Arc<str> = topic.into();
        e.topics.push(topic.clone());
        self.index(Kind::Topic, &topic, id);
        Ok((Some(topic_channel(&topic)), None))
    }

    /// Take connection `id` out of topic `topic`.
    pub(super) fn leave(&mut self, id: u64, topic: &str) -> Edit {
        if !self.conns.contains_key(&id) {
            return Err(Refusal::NoConnection);
        }
        let Some(e) = self.who.get_mut(&id) else { return Ok((None, None)) };
        let Some(i) = e.topics.iter().position(|t| &**t == topic) else { return Ok((None, None)) };
        e.topics.swap_remove(i);
        self.unindex(Kind::Topic, topic, id);
        Ok((None, Some(topic_channel(topic))))
    }

    /// Add connection `id` (one of the joiners) to broker channel `channel`; whether it was not
    /// in it already. A channel's first member here is joined on the broker by the caller.
    pub(super) fn join_channel(&mut self, id: u64, channel: &str) -> bool {
        if !self.joiners.contains_key(&id) {
            return false;
        }
        let e = self.who.entry(id).or_default();
        if e.channels.iter().any(|c| &**c == channel) {
            return false;
        }
        let channel: Arc<str> = channel.into();
        e.channels.reserve_exact(1);
        e.channels.push(channel.clone());
        if add_member(&mut self.channels, &channel, id) {
            self.note(true, Kind::Channel, &channel);
        }
        true
    }

    /// Record connection `id`, in broker channel `channel`, as presence member `member`; its
    /// user's first connection there is a change to report.
    pub(super) fn add_presence(&mut self, channel: &str, id: u64, member: Member) {
        let user = member.0.clone();
        let members = self.members.entry(channel.into()).or_default();
        let first = !members.values().any(|(u, _)| *u == user);
        members.insert(id, member);
        if first {
            self.note(true, Kind::Member, &member_key(channel, &user));
        }
    }

    /// Take connection `id` out of broker channel `channel`; whether it was in it.
    pub(super) fn leave_channel(&mut self, id: u64, channel: &str) -> bool {
        let Some(e) = self.who.get_mut(&id) else { return false };
        let Some(i) = e.channels.iter().position(|c| &**c == channel) else { return false };
        e.channels.swap_remove(i);
        self.forget_channel(channel, id);
        true
    }

    /// Take connection `id` out of broker channel `channel`'s indexes and members; a member's
    /// last connection, and the channel's last here, are changes to report.
    fn forget_channel(&mut self, channel: &str, id: u64) {
        if let Some(m) = self.members.get_mut(channel) {
            if let Some((user, _)) = m.remove(&id) {
                let last = !m.values().any(|(u, _)| *u == user);
                if m.is_empty() {
                    self.members.remove(channel);
                }
                if last {
                    self.note(false, Kind::Member, &member_key(channel, &user));
                }
            }
        }
        if let Some(name) = remove_member(&mut self.channels, channel, id) {
            self.seen.remove(channel.as_bytes());
            self.known.remove(channel);
            self.note(false, Kind::Channel, &name);
        }
    }

    /// Forget connection `id` and who it was.
    pub(super) fn unlink(&mut self, id: u64) -> Option<Who> {
        if self.conns.remove(&id).is_none() && self.joiners.remove(&id).is_none() {
            self.unlisted.remove(&id);
        }
        self.recovering.remove(&id);
        let e = self.who.remove(&id)?;
        if let Some(u) = &e.uid {
            self.unindex(Kind::User, u, id);
        }
        for t in &e.topics {
            self.unindex(Kind::Topic, t, id);
        }
        for c in &e.channels {
            self.forget_channel(c, id);
        }
        Some(e)
    }

    /// Put connection `id` under user (or topic) `name`; the first one is a change to report.
    pub(super) fn index(&mut self, kind: Kind, name: &Arc<str>, id: u64) {
        let index = if kind == Kind::Topic { &mut self.topics } else { &mut self.users };
        if add_member(index, name, id) {
            self.note(true, kind, name);
        }
    }

    /// Take connection `id` from under user (or topic) `name`; the last one is a change to report.
    pub(super) fn unindex(&mut self, kind: Kind, name: &str, id: u64) {
        let index = if kind == Kind::Topic { &mut self.topics } else { &mut self.users };
        if let Some(name) = remove_member(index, name, id) {
            let channel = if kind == Kind::Topic { topic_channel(&name) } else { user_channel(&name) };
            self.seen.remove(channel.as_bytes());
            self.note(false, kind, &name);
        }
    }

    /// Record that `name` (of `kind`) arrived on (`up`) or left this worker.
    pub(super) fn note(&mut self, up: bool, kind: Kind, name: &str) {
        self.seq += 1;
        if self.changes.len() >= MAX_CHANGES {
            self.changes.pop_front();
        }
        self.changes.push_back(Change { seq: self.seq, up, kind, name: name.to_string() });
    }
}

/// A member of a presence channel: its user id and `user_info` (JSON).
pub(super) type Member = (Arc<str>, Arc<str>);

/// Add `id` under `name`; whether it is the first there.
pub(super) fn add_member(index: &mut HashMap<Arc<str>, HashSet<u64>>, name: &Arc<str>, id: u64) -> bool {
    let ids = index.entry(name.clone()).or_default();
    ids.insert(id);
    ids.len() == 1
}

/// Remove `id` from under `name`; the name, if nobody is left under it.
pub(super) fn remove_member(index: &mut HashMap<Arc<str>, HashSet<u64>>, name: &str, id: u64) -> Option<Arc<str>> {
    let ids = index.get_mut(name)?;
    ids.remove(&id);
    if !ids.is_empty() {
        return None;
    }
    index.remove_entry(name).map(|(name, _)| name)
}

/// The indexes a push is looked up in.
pub(super) struct Indexes<'a> {
    pub(super) conns: &'a HashMap<u64, Arc<Conn>>,
    pub(super) users: &'a HashMap<Arc<str>, HashSet<u64>>,
    pub(super) topics: &'a HashMap<Arc<str>, HashSet<u64>>,
    pub(super) joiners: &'a HashMap<u64, Arc<Conn>>,
    pub(super) channels: &'a HashMap<Arc<str>, HashSet<u64>>,
}

/// Call `f` for each connection `to` names, found through the indexes.
pub(super) fn each_member(ix: Indexes<'_>, to: Target<'_>, mut f: impl FnMut(u64, &Arc<Conn>)) {
    let (ids, conns) = match to {
        Target::Members(Audience::All) => return ix.conns.iter().for_each(|(id, c)| f(*id, c)),
        Target::Conn(id) => return ix.conns.get(&id).into_iter().for_each(|c| f(id, c)),
        Target::Members(Audience::User(u)) => (ix.users.get(u), ix.conns),
        Target::Members(Audience::Topic(t)) => (ix.topics.get(t), ix.conns),
        Target::Channel(c) => (ix.channels.get(c), ix.joiners),
    };
    for id in ids.into_iter().flatten() {
        if let Some(c) = conns.get(id) {
            f(*id, c);
        }
    }
}

/// The broker channels of a connection of user `uid` in `topics`.
pub(super) fn broker_channels<T: AsRef<str>>(uid: Option<&str>, topics: &[T]) -> Vec<String> {
    uid.map(user_channel).into_iter().chain(topics.iter().map(|t| topic_channel(t.as_ref()))).collect()
}

#[cfg(test)]
mod tests {
    use super::super::*;

    #[test]
    fn binds_and_joins_edit_the_indexes_and_say_what_to_join() {
        let mut t = Table::default();
        t.conns.insert(1, Arc::new(Conn::new(0, false, Encoding::Raw, false)));
        assert!(matches!(t.bind(2, Some("x")), Err(Refusal::NoConnection)));
        assert_eq!(t.bind(1, Some("x")).ok(), Some((Some(user_channel("x")), None)));
        assert_eq!(t.bind(1, Some("x")).ok(), Some((None, None)), "already x");
        assert_eq!(t.bind(1, Some("y")).ok(), Some((Some(user_channel("y")), Some(user_channel("x")))));
        assert!(!t.users.contains_key("x") && t.users["y"].contains(&1));
        assert_eq!(t.join(1, "room").ok(), Some((Some(topic_channel("room")), None)));
        assert_eq!(t.join(1, "room").ok(), Some((None, None)), "in it already");
        assert_eq!(t.leave(1, "room").ok(), Some((None, Some(topic_channel("room")))));
        assert_eq!(t.leave(1, "room").ok(), Some((None, None)));
        for i in 0..MAX_TOPICS_PER_CONNECTION {
            assert!(t.join(1, &format!("t{i}")).is_ok());
        }
        assert!(matches!(t.join(1, "one-more"), Err(Refusal::Refused(_))));
        let who = t.unlink(1).expect("who it was");
        assert_eq!((who.uid.as_deref(), who.topics.len()), (Some("y"), MAX_TOPICS_PER_CONNECTION));
        assert!(t.users.is_empty() && t.topics.is_empty());
        let ups = t.changes.iter().filter(|c| c.up).count();
        assert_eq!(ups, t.changes.len() - ups, "every arrival reported has its departure");
    }
}
