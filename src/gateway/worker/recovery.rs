//! `recover=`: a returning connection is fed what it missed from history, then the live messages
//! held for it meanwhile, merged at the seam by offset, as its client drains its queue; the
//! history frames are encoded outside the table lock and shared between connections.

use super::*;

/// A channel a connection is recovering: the live frames held for it meanwhile, by offset; then,
/// once its history is queued (`done`: the last offset it has), the live messages that were
/// already on their way to the worker are dropped for it until the next one arrives.
pub(super) struct Recovering {
    pub(super) channel: String,
    pub(super) frames: Vec<(u64, Bytes)>,
    pub(super) done: Option<u64>,
}

/// Most frames handed to a recovering connection at a time.
pub(super) const RECOVERY_CHUNK: usize = 64;

/// How long a recovering connection may take nothing before it is cut off as a slow consumer.
pub(super) const RECOVERY_STALL: Duration = Duration::from_secs(30);

/// Bytes of encoded history frames kept for connections recovering the same messages; past it
/// the cache starts again (and it is emptied when no recovery is under way).
pub(super) const MAX_HISTORY_FRAME_BYTES: usize = 32 << 20;

/// Encoded history frames by (channel, epoch), then by (offset, kind of connection).
#[derive(Default)]
pub(super) struct HistoryFrames {
    pub(super) frames: HashMap<(String, String), HashMap<(u64, usize), Bytes>>,
    pub(super) bytes: usize,
}

impl Worker {
    /// Feed connection `id` what it missed on `r.channel` (`items`, or `None` when the history
    /// does not reach back), then the live messages held for it meanwhile, then the notice, as
    /// its client drains its queue; the history frames are encoded outside the table lock and
    /// shared with other connections recovering the same messages. Whether the connection is
    /// still there.
    pub(super) async fn recovered(
        &self,
        id: u64,
        conn: &Arc<Conn>,
        r: &crate::protocol::native::Recover,
        uid: Option<&str>,
        items: Option<Vec<(u64, Bytes)>>,
    ) -> bool {
        let ok = items.is_some();
        let mut last = r.offset;
        match items {
            Some(items) => {
                GLOBAL.recoveries.fetch_add(1, Ordering::Relaxed);
                let epoch: Arc<str> = r.epoch.as_str().into();
                for chunk in items.chunks(self.recovery_chunk()) {
                    last = chunk.last().map_or(last, |(o, _)| *o);
                    if !self.room_for(id, conn, chunk.len()).await {
                        return false;
                    }
                    for frame in self.history_frames(conn, &r.channel, &epoch, chunk, uid) {
                        if !self.feed(id, conn, &frame) {
                            return false;
                        }
                    }
                }
            }
            None => {
                GLOBAL.recoveries_failed.fetch_add(1, Ordering::Relaxed);
                if !self.feed(id, conn, &conn.encode(&json::recovered(&r.channel, false))) {
                    return false;
                }
            }
        }
        // What the client has up to: after a failed recovery, only the held live messages count.
        let mut has = ok.then_some(last);
        loop {
            let chunk = self.recovery_chunk();
            if !self.room_for(id, conn, chunk).await {
                return false;
            }
            let mut t = self.table();
            let caught_up = |has: u64, t: &Table| {
                t.seen.get(r.channel.as_bytes()).is_some_and(|s| *s.epoch == *r.epoch && s.offset >= has)
            };
            let Some(rec) = recovery_of(&mut t.recovering, id, &r.channel) else { return false };
            let held: Vec<(u64, Bytes)> = rec.frames.drain(..chunk.min(rec.frames.len())).collect();
            let finished = rec.frames.is_empty();
            for (offset, frame) in held {
                if offset > last || !ok {
                    has = Some(has.map_or(offset, |h| h.max(offset)));
                    if let Offer::Full = conn.offer(&frame, self.max_frames, self.max_bytes, false) {
                        self.cut_slow(&mut t, id);
                        return false;
                    }
                }
            }
            if !finished {
                continue;
            }
            if ok {
                let _ = conn.offer(&conn.encode(&json::recovered(&r.channel, true)), usize::MAX, usize::MAX, false);
            }
            // Live messages up to `has` that are still on their way to the worker (the history
            // had them first) are dropped for the client until the worker is past them.
            match has {
                Some(h) if ok && !caught_up(h, &t) => {
                    if let Some(rec) = recovery_of(&mut t.recovering, id, &r.channel) {
                        rec.done = Some(h);
                    }
                }
                _ => stop_recovering(&mut t.recovering, id, &r.channel),
            }
            // The last recovery here is done: its frames are not kept for later ones.
            if t.recovering.is_empty() {
                *crate::io::lock(&self.history_frames) = HistoryFrames::default();
            }
            return true;
        }
    }

    /// Frames handed to a recovering connection at a time.
    pub(super) fn recovery_chunk(&self) -> usize {
        (self.max_frames / 4).clamp(1, RECOVERY_CHUNK)
    }

    /// Wait until connection `id` has room for `n` more frames (its queue at most half full with
    /// them), woken when its task takes the queue; false when it is gone, or took nothing for
    /// [`RECOVERY_STALL`] (then cut off).
    pub(super) async fn room_for(&self, id: u64, conn: &Conn, n: usize) -> bool {
        let drained = Arc::new(Notify::new());
        loop {
            if conn.close_code.load(Ordering::Acquire) != 0 || !self.table().conns.contains_key(&id) {
                return false;
            }
            if conn.has_room(n, (self.max_frames, self.max_bytes), &drained) {
                return true;
            }
            // Woken also when the connection ends (its task detaches it).
            if tokio::time::timeout(RECOVERY_STALL, drained.notified()).await.is_err() {
                self.cut_slow(&mut self.table(), id);
                return false;
            }
        }
    }

    /// Queue `frame` to a recovering connection; a full queue cuts it off (false).
    pub(super) fn feed(&self, id: u64, conn: &Conn, frame: &Bytes) -> bool {
        match conn.offer(frame, self.max_frames, self.max_bytes, false) {
            Offer::Full => {
                self.cut_slow(&mut self.table(), id);
                false
            }
            _ => true,
        }
    }

    /// History `items` of `channel` (in `epoch`) as `conn` gets them, without those whose
    /// publisher excluded user `uid`: each encoded once per kind of connection and kept a while,
    /// for the other connections recovering the same messages.
    pub(super) fn history_frames(
        &self,
        conn: &Conn,
        channel: &str,
        epoch: &Arc<str>,
        items: &[(u64, Bytes)],
        uid: Option<&str>,
    ) -> Vec<Bytes> {
        let mut cache = crate::io::lock(&self.history_frames);
        if cache.bytes > MAX_HISTORY_FRAME_BYTES {
            *cache = HistoryFrames::default();
        }
        let HistoryFrames { frames, bytes } = &mut *cache;
        let of_range = frames.entry((channel.to_owned(), epoch.to_string())).or_insert_with(|| {
            *bytes += channel.len() + epoch.len() + 64;
            HashMap::new()
        });
        let mut out = Vec::with_capacity(items.len());
        for (offset, data) in items {
            let Ok(push) = Push::decode(data) else { continue };
            if uid.is_some_and(|u| push.exclude_uid.iter().any(|x| x == u.as_bytes())) {
                continue;
            }
            let compress = self.compresses(&push.content) && conn.deflate;
            let kind = conn.kind(compress);
            let frame = of_range.entry((*offset, kind)).or_insert_with(|| {
                let p = Position { offset: *offset, epoch: epoch.clone() };
                let f = conn.encode_push(channel, Some(&p), &push.content, compress);
                *bytes += f.len();
                f
            });
            out.push(frame.clone());
        }
        out
    }
}

/// The recovery of `channel` that connection `id` has under way, if any.
#[inline]
pub(super) fn recovery_of<'r>(
    recovering: &'r mut HashMap<u64, Vec<Recovering>>,
    id: u64,
    channel: &str,
) -> Option<&'r mut Recovering> {
    recovering.get_mut(&id)?.iter_mut().find(|r| r.channel == channel)
}

/// Connection `id` is done recovering `channel`.
pub(super) fn stop_recovering(recovering: &mut HashMap<u64, Vec<Recovering>>, id: u64, channel: &str) {
    if let Some(list) = recovering.get_mut(&id) {
        list.retain(|r| r.channel != channel);
        if list.is_empty() {
            recovering.remove(&id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::*;

    /// A worker on an in-process broker that keeps history, and that broker.
    fn worker_with_history(max_frames: usize) -> (Arc<Worker>, Arc<dyn Broker>) {
        let hub = Arc::new(crate::hub::Hub::new(Default::default(), history::HistoryConfig::default()));
        let broker: Arc<dyn Broker> = Arc::new(crate::broker::memory::MemoryBroker::new(hub, ""));
        (Arc::new(Worker::new("test-0".into(), (max_frames, usize::MAX), None, broker.clone(), 0).0), broker)
    }

    /// Publish `content` on `channel`: the message as the worker gets it, with its position.
    async fn published(broker: &Arc<dyn Broker>, channel: &str, content: &str, exclude: &[&str]) -> Message {
        let push = Push {
            to_connection_id: None,
            content: content.as_bytes().to_vec(),
            exclude_uid: exclude.iter().map(|u| u.as_bytes().to_vec()).collect(),
        };
        let data = push.encode();
        let position = broker
            .publish(channel, data.clone(), crate::history::HistoryConfig::default().keep())
            .await
            .expect("publish");
        Message { channel: Bytes::from(channel.to_owned()), data, position }
    }

    /// What is queued for `conn`, as the JSON texts of its frames (small, unmasked text frames).
    fn queued_json(conn: &Conn) -> Vec<serde_json::Value> {
        let mut out = VecDeque::new();
        conn.take(&mut out);
        conn.written();
        out.iter().map(|f| serde_json::from_slice(&f[2..]).expect("a JSON frame")).collect()
    }

    /// The offsets of data messages in `msgs`, and whether a `recovered:true` notice ends them.
    fn offsets(msgs: &[serde_json::Value]) -> (Vec<u64>, bool) {
        let offsets = msgs.iter().filter_map(|m| m["offset"].as_u64()).collect();
        (offsets, msgs.last().is_some_and(|m| m["recovered"] == true))
    }

    /// Wait (a deadline, not a guess) until `conn` has a `recovered` notice queued; all queued.
    async fn until_recovered(conn: &Conn) -> Vec<serde_json::Value> {
        let mut got = Vec::new();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while !got.iter().any(|m: &serde_json::Value| m.get("recovered").is_some()) {
            assert!(tokio::time::Instant::now() < deadline, "no recovered notice: {got:?}");
            tokio::time::sleep(Duration::from_millis(2)).await;
            got.extend(queued_json(conn));
        }
        got
    }

    fn recovering(w: &Worker, epoch: &str, offset: u64, uid: Option<&str>) -> Wants {
        let recover =
            vec![crate::protocol::native::Recover { channel: "broadcast".into(), epoch: epoch.into(), offset }];
        let who = crate::protocol::native::token::Identity { uid: uid.map(Into::into), channels: Vec::new() };
        assert!(w.table().recovering.is_empty());
        Wants { who, json: true, recover }
    }

    #[tokio::test]
    async fn a_recovery_meets_live_messages_at_the_seam_once_and_goes_when_it_is_done() {
        let (w, broker) = worker_with_history(1024);
        let mut live = Vec::new();
        for i in 1..=8 {
            live.push(published(&broker, "broadcast", &format!("m{i}"), &[]).await);
        }
        let epoch = live[0].position.as_ref().expect("a position").epoch.to_string();
        for m in live.drain(..) {
            w.receive(m);
        }
        // A client that saw 3 comes back; 9 and 10 come live before its history is read (held),
        // and the history has them too: each is delivered once, after 4..8.
        let conn = w.add(w.next_id(), recovering(&w, &epoch, 3, None), false, false).await;
        for i in 9..=10 {
            let m = published(&broker, "broadcast", &format!("m{i}"), &[]).await;
            w.receive(m);
        }
        let (got, notice) = offsets(&until_recovered(&conn).await);
        assert_eq!((got, notice), ((4..=10).collect::<Vec<_>>(), true));
        assert!(w.table().recovering.is_empty(), "done: no entry left for the fan-out to look up");
        w.receive(published(&broker, "broadcast", "m11", &[]).await);
        assert_eq!(offsets(&queued_json(&conn)).0, [11], "live again");

        // The history is ahead of the worker (12 and 13 are still on their way to it): they are
        // recovered, then dropped for this client when they arrive live, and only then does the
        // recovery end.
        let late = w.add(w.next_id(), recovering(&w, &epoch, 11, Some("bob")), false, false).await;
        let ahead =
            [published(&broker, "broadcast", "m12", &[]).await, published(&broker, "broadcast", "m13", &["bob"]).await];
        let (got, _) = offsets(&until_recovered(&late).await);
        assert_eq!(got, [12], "13 excluded bob");
        assert!(!w.table().recovering.is_empty(), "13 is still on its way");
        for m in ahead {
            w.receive(m);
        }
        assert_eq!(offsets(&queued_json(&late)).0, Vec::<u64>::new(), "no duplicate");
        assert_eq!(offsets(&queued_json(&conn)).0, [12, 13], "the other client gets them live");
        assert!(w.table().recovering.is_empty(), "past the history's end: done");
        w.receive(published(&broker, "broadcast", "m14", &[]).await);
        assert_eq!(offsets(&queued_json(&late)).0, [14]);
    }

    #[tokio::test]
    async fn a_recovery_larger_than_the_queue_is_fed_as_the_client_drains() {
        let (w, broker) = worker_with_history(16);
        let first = published(&broker, "broadcast", "m1", &[]).await;
        let epoch = first.position.as_ref().expect("a position").epoch.to_string();
        w.receive(first);
        for i in 2..=90 {
            w.receive(published(&broker, "broadcast", &format!("m{i}"), &[]).await);
        }
        let conn = w.add(w.next_id(), recovering(&w, &epoch, 1, None), false, false).await;
        let mut got = Vec::new();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while !got.iter().any(|m: &serde_json::Value| m.get("recovered").is_some()) {
            assert!(tokio::time::Instant::now() < deadline, "stuck after {} messages", got.len());
            assert!(conn.queue().frames.len() <= 16, "never more than the queue holds");
            tokio::time::sleep(Duration::from_millis(1)).await;
            got.extend(queued_json(&conn));
        }
        assert_eq!(offsets(&got), ((2..=90).collect::<Vec<_>>(), true));
        assert_eq!(conn.close_code.load(Ordering::Relaxed), 0, "not cut off");
    }
}
