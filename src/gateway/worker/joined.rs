//! Connections pushed to only through the broker channels their protocol joins (a Pusher
//! subscription): added, joined and left by their connection's task, and the fan-out of a message
//! on such a channel (one frame for every joiner here but the socket it leaves out). Also what a
//! protocol asks of the broker for its connections: publishes and the latest kept message.

use super::*;

/// Presence channels whose users a worker follows (see [`Table::known`]).
const MAX_KNOWN: usize = 100_000;

impl Worker {
    /// Add connection `id`, pushed to only through the broker channels it joins
    /// ([`Worker::join`]), with `encoding`.
    pub(in crate::gateway) fn add_joiner(&self, id: u64, encoding: Encoding, deflate: bool) -> Arc<Conn> {
        let conn = Arc::new(Conn::new(self.now(), false, encoding, deflate));
        self.table().joiners.insert(id, conn.clone());
        conn
    }

    /// Connection `id` (a joiner) joins broker channel `channel`; once this returns, pushes on
    /// it reach the connection (the broker confirmed, or is down and renews it when back).
    /// Whether it joined (false: not a joiner here, or in the channel already).
    pub async fn join(&self, id: u64, channel: &str, member: Option<(&str, &str)>) -> bool {
        {
            let mut t = self.table();
            if !t.join_channel(id, channel) {
                return false;
            }
            if let Some((user, info)) = member {
                t.add_presence(channel, id, (user.into(), info.into()));
            }
        }
        if let Err(e) = self.broker.join(self.sub, vec![channel.to_owned()]).await {
            tracing::warn!(worker = %self.id, connection = id, "join not confirmed: {e}");
        }
        true
    }

    /// Connection `id` leaves broker channel `channel`; whether it was in it.
    pub async fn leave(&self, id: u64, channel: &str) -> bool {
        if !self.table().leave_channel(id, channel) {
            return false;
        }
        let _ = self.broker.leave(self.sub, vec![channel.to_owned()]).await;
        true
    }

    /// Publish on the broker for one of this worker's connections; whether the broker took it.
    pub async fn publish(&self, channel: &str, data: Bytes, keep: Option<history::Keep>) -> bool {
        self.broker.publish(channel, data, keep).await.is_ok()
    }

    /// The latest message kept on `channel`, if the broker keeps any.
    pub async fn last(&self, channel: &str) -> Option<Bytes> {
        let page = self.broker.history(channel, 0, 1).await.ok()?;
        match page.items.last() {
            Some((offset, data)) if *offset == page.offset => Some(data.clone()),
            _ if page.offset == 0 => None,
            _ => self.broker.history(channel, page.offset - 1, 1).await.ok()?.items.pop().map(|(_, d)| d),
        }
    }

    /// Carry out a message on a protocol's channel (Pusher's): its event to the channel's
    /// joiners here, except the socket it names.
    pub(super) fn handle_joined(&self, m: &Message) {
        if pusher::is_terminate(&m.data) {
            return self.close_channel(&m.channel, pusher::session::code::UNAUTHORIZED);
        }
        let Some((exclude, event)) = pusher::read_payload(&m.data) else {
            GLOBAL.bad_broker_messages.fetch_add(1, Ordering::Relaxed);
            return;
        };
        let exclude = exclude.filter(|(worker, _)| *worker == self.socket_number).map(|(_, id)| id);
        let channel = std::str::from_utf8(&m.channel).unwrap_or_default();
        if let Some((added, user)) = pusher::session::member_change(event) {
            if let Some(users) = self.table().known.get_mut(channel) {
                match added {
                    true => users.insert(user.into()),
                    false => users.remove(&*user),
                };
            }
        }
        let frames = Frames::new(channel, m.position.as_ref(), event, self.compresses(event));
        self.send(&frames, Target::Channel(channel), &[], exclude);
    }

    /// Add the channels joined here that start with `prefix` to `out`, each with its joiners
    /// here, up to `cap` channels in all.
    pub fn joined_channels(&self, prefix: &str, out: &mut std::collections::BTreeMap<String, u64>, cap: usize) {
        let t = self.table();
        for (name, ids) in t.channels.iter().filter(|(n, _)| n.starts_with(prefix)) {
            if out.len() >= cap && !out.contains_key(&**name) {
                continue;
            }
            *out.entry(name.to_string()).or_default() += ids.len() as u64;
        }
    }

    /// The members of `channel` here, each user once with its info, added to `out` (up to `cap`
    /// users in all).
    pub fn local_members(&self, channel: &str, out: &mut std::collections::BTreeMap<String, String>, cap: usize) {
        let t = self.table();
        for (user, info) in t.members.get(channel).into_iter().flat_map(HashMap::values) {
            if out.len() >= cap && !out.contains_key(&**user) {
                continue;
            }
            out.entry(user.to_string()).or_insert_with(|| info.to_string());
        }
    }

    /// Use `asker` to ask every gateway (see [`Worker::members`]).
    pub(in crate::gateway) fn set_asker(&self, asker: Arc<crate::cluster::Asker>) {
        let _ = self.asker.set(asker);
    }

    /// The members of `channel` on every live gateway, each user once (`None`: the gateways
    /// could not be asked).
    pub async fn members(&self, channel: &str) -> Option<std::collections::BTreeMap<String, String>> {
        let asker = self.asker.get()?;
        let answers = asker.ask_all(crate::cluster::Request::Members { channel: channel.to_owned() }).await.ok()?;
        let mut all = std::collections::BTreeMap::new();
        if answers.is_empty() {
            // This gateway's own heartbeat not heard yet: at least what is here.
            self.local_members(channel, &mut all, crate::cluster::MAX_CHANNELS);
        }
        for (user, info) in answers.into_iter().flat_map(|a| a.members) {
            all.entry(user).or_insert(info);
        }
        let mut t = self.table();
        if t.known.len() >= MAX_KNOWN {
            let Table { known, channels, .. } = &mut *t;
            known.retain(|c, _| channels.contains_key(c));
        }
        if t.known.len() < MAX_KNOWN {
            t.known.insert(channel.into(), all.keys().map(|u| Arc::from(u.as_str())).collect());
        }
        Some(all)
    }

    /// A gateway was lost: the users of each presence channel here that no live gateway holds
    /// any more get `member_removed` to this worker's joiners, and the watched users signed in
    /// nowhere any more `offline` to their watchers here (every gateway tells its own).
    pub(in crate::gateway) async fn reconcile_members(&self) {
        let watched: Vec<Arc<str>> = {
            let t = self.table();
            let watchlist =
                |c: &&Arc<str>| pusher::app_channel(c).is_some_and(|(_, n)| n.starts_with(pusher::watchlist::PREFIX));
            t.channels.keys().filter(watchlist).cloned().collect()
        };
        for channel in watched {
            let Some((app, name)) = pusher::app_channel(&channel) else { continue };
            let user = &name[pusher::watchlist::PREFIX.len()..];
            if self.subscribers(&pusher::user_channel(app, user)).await == Some(0) {
                self.tell_joiners(&channel, &pusher::watchlist::event(&[], &[user]));
            }
        }
        let channels: Vec<Arc<str>> = {
            let mut t = self.table();
            let Table { known, channels, .. } = &mut *t;
            known.retain(|c, _| channels.contains_key(c));
            known.keys().cloned().collect()
        };
        for channel in channels {
            let before = self.table().known.get(&channel).cloned().unwrap_or_default();
            let Some(now) = self.members(&channel).await else { continue };
            let Some((_, name)) = pusher::app_channel(&channel) else { continue };
            for user in before.iter().filter(|u| !now.contains_key(&***u)) {
                self.tell_joiners(&channel, &pusher::session::member_removed(name, user));
            }
        }
    }

    /// Send `event` to every joiner of `channel` here (what this gateway tells its own clients).
    fn tell_joiners(&self, channel: &str, event: &[u8]) {
        let frames = Frames::new(channel, None, event, self.compresses(event));
        self.send(&frames, Target::Channel(channel), &[], None);
    }

    /// The joiners of `channel` on every live gateway (`None`: the gateways could not be asked).
    pub async fn subscribers(&self, channel: &str) -> Option<u64> {
        let asker = self.asker.get()?;
        let req = crate::cluster::Request::Channels { prefix: channel.to_owned() };
        let answers = asker.ask_all(req).await.ok()?;
        if answers.is_empty() {
            // This gateway's own heartbeat not heard yet: at least what is here.
            return Some(self.table().channels.get(channel).map_or(0, |ids| ids.len() as u64));
        }
        Some(answers.iter().filter_map(|a| a.channels.get(channel)).sum())
    }

    /// Close every joiner of `channel` here with `code`.
    fn close_channel(&self, channel: &[u8], code: u16) {
        let t = self.table();
        let Some(ids) = std::str::from_utf8(channel).ok().and_then(|c| t.channels.get(c)) else { return };
        for c in ids.iter().filter_map(|id| t.joiners.get(id)) {
            c.close(code);
        }
    }
}

impl crate::protocol::Cluster for Worker {
    fn subscribers<'a>(&'a self, channel: &'a str) -> BoxFuture<'a, Option<u64>> {
        Box::pin(Worker::subscribers(self, channel))
    }

    fn publish<'a>(&'a self, channel: &'a str, data: Bytes, keep: Option<history::Keep>) -> BoxFuture<'a, bool> {
        Box::pin(Worker::publish(self, channel, data, keep))
    }
}
