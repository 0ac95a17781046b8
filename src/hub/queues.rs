//! The hub's work queues (`watch`, `enqueue`, `reserve`): each item goes to one reserved
//! watcher, the watchers taking turns; items wait, within the hub's limits, while nobody is
//! ready; a queue with neither watchers nor items is forgotten.

use super::*;

impl Hub {
    /// Add client `id` to the watchers of each queue; the queues it was not watching yet.
    pub(super) fn watch(&self, id: ClientId, names: Vec<Name>) -> Result<Vec<Name>, HubError> {
        let mut st = self.lock();
        self.check_names(&st, id, &names)?;
        let mut added = Vec::new();
        for n in names {
            if st.clients.get(&id).is_none_or(|c| c.watching.contains(&n)) {
                continue;
            }
            self.check_queue_room(&st, &n)?;
            let Some(c) = st.clients.get_mut(&id) else { break };
            c.watching.push(n.clone());
            st.queues.entry(n.clone()).or_default().watchers.push(id);
            dispatch(&mut st, &n, &self.stats);
            added.push(n);
        }
        Ok(added)
    }

    /// Take client `id` off the watchers of each queue; the queues it was watching.
    pub(super) fn unwatch(&self, id: ClientId, names: Vec<Name>) -> Vec<Name> {
        let mut st = self.lock();
        let mut gone = Vec::new();
        for n in names {
            let Some(c) = st.clients.get_mut(&id) else { break };
            let before = c.watching.len();
            c.watching.retain(|w| *w != n);
            if c.watching.len() < before {
                unwatch(&mut st, id, &n);
                gone.push(n);
            }
        }
        gone
    }

    /// Mark client `id` ready for one item of the queues it watches; the queues.
    pub(super) fn reserve(&self, id: ClientId) -> Vec<Name> {
        let mut st = self.lock();
        let Some(c) = st.clients.get_mut(&id) else {
            return Vec::new();
        };
        c.reserved = true;
        let watching = c.watching.clone();
        for q in &watching {
            dispatch(&mut st, q, &self.stats);
        }
        watching
    }

    pub(super) fn enqueue(&self, names: &[Name], data: &Bytes) -> Result<(), HubError> {
        let mut st = self.lock();
        if let Some(n) = names.iter().find(|n| n.as_bytes().len() > self.limits.max_name_len) {
            return Err(HubError::NameTooLong(n.as_bytes().len(), self.limits.max_name_len));
        }
        for n in names {
            if st.queued_bytes + data.len() > self.limits.max_queued_bytes {
                return Err(HubError::QueuesFull(st.queued_bytes));
            }
            self.check_queue_room(&st, n)?;
            let q = st.queues.entry(n.clone()).or_default();
            if q.items.len() >= self.limits.max_queue_items {
                return Err(HubError::QueueFull(n.to_string_lossy(), q.items.len()));
            }
            q.items.push_back(data.clone());
            st.queued_bytes += data.len();
            dispatch(&mut st, n, &self.stats);
        }
        Ok(())
    }

    /// Whether `name` may hold a queue: an existing one, or a new one within `max_queues`.
    fn check_queue_room(&self, st: &State, name: &Name) -> Result<(), HubError> {
        if !st.queues.contains_key(name) && st.queues.len() >= self.limits.max_queues {
            return Err(HubError::TooManyQueues(st.queues.len()));
        }
        Ok(())
    }
}

/// Hand queued items of `queue` to reserved watchers, one item per reservation.
pub(super) fn dispatch(st: &mut State, queue: &Name, stats: &HubStats) {
    loop {
        let State { queues, clients, queued_bytes, .. } = &mut *st;
        let Some(q) = queues.get_mut(queue) else {
            return;
        };
        if q.items.is_empty() {
            return;
        }
        let Some(pos) = q.watchers.iter().position(|w| clients.get(w).is_some_and(|c| c.reserved)) else {
            return;
        };
        // Rotate so that the next item prefers the next watcher.
        let id = q.watchers.remove(pos);
        q.watchers.push(id);
        let Some(item) = q.items.pop_front() else {
            return;
        };
        *queued_bytes -= item.len();
        let Some(c) = clients.get_mut(&id) else {
            return;
        };
        c.reserved = false;
        if let Sent::SlowConsumer = c.send(&mut Outgoing::new(ServerKind::Queue, queue, &item, None)) {
            stats.slow_consumers.fetch_add(1, Ordering::Relaxed);
            drop_client(st, id);
        }
    }
}

/// Take client `id` off the watchers of queue `name`; a queue left with neither watchers nor
/// items goes, so that names watched once do not fill `max_queues`.
pub(super) fn unwatch(st: &mut State, id: ClientId, name: &Name) {
    if let Some(q) = st.queues.get_mut(name) {
        q.watchers.retain(|w| *w != id);
    }
    forget_if_idle(st, name);
}

/// Forget queue `name` if it has neither watchers nor items (nor items being taken for it).
pub(super) fn forget_if_idle(st: &mut State, name: &Name) {
    if st.queues.get(name).is_some_and(|q| q.watchers.is_empty() && q.items.is_empty() && q.taking == 0) {
        st.queues.remove(name);
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::local;
    use super::*;

    #[test]
    fn queues_emptied_by_unwatch_go_and_leave_room_for_new_names() {
        let hub = Hub::default();
        let (id, _rx) = local(&hub);
        for i in 0..20_000 {
            let n = vec![Name::new(format!("q{i}"))];
            hub.handle(id, Request::Watch(n.clone())).unwrap();
            hub.handle(id, Request::Unwatch(n)).unwrap();
        }
        assert_eq!(hub.lock().queues.len(), 0, "no empty queue without a watcher is kept");
        hub.handle(id, Request::Watch(vec![Name::new("new")])).unwrap();
        hub.enqueue(&[Name::new("another")], &Bytes::from_static(b"x")).unwrap();
        // A queue that still holds items stays after its watcher leaves; a name both watched
        // and subscribed stays subscribed after the unwatch.
        hub.handle(id, Request::Unwatch(vec![Name::new("new")])).unwrap();
        assert_eq!(hub.lock().queues.len(), 1);
        let (sub, mut rx) = local(&hub);
        let both = Name::new("both");
        hub.handle(sub, Request::Watch(vec![both.clone()])).unwrap();
        hub.subscribe(sub, vec![both.clone()]).unwrap();
        hub.handle(sub, Request::Unwatch(vec![both.clone()])).unwrap();
        hub.publish(std::slice::from_ref(&both), &Bytes::from_static(b"hi"), None);
        assert!(rx.try_recv().is_ok(), "still subscribed to the channel");
    }
}
