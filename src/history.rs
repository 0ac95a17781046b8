//! Message history in memory: per channel, the latest messages with their offsets, so that a
//! client that reconnects gets what it missed and a gateway repairs a gap.
//!
//! A channel's offsets count from 1 without gaps; its epoch is drawn when its history starts, so a
//! history that was lost (expired, or the process restarted) never passes for the old one. Every
//! bound holds at once: `size` messages per channel, `ttl` per message, and `max_bytes` for all
//! channels together (the oldest messages anywhere go first). This store backs the in-process
//! broker and the channel server, both under the hub's lock: the offset is assigned and the
//! message delivered in one step, which is what makes recovery sound.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
pub use channel_proto::Keep;

/// Where a message sits in its channel's history.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Position {
    pub offset: u64,
    pub epoch: Arc<str>,
}

/// How much history is kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HistoryConfig {
    /// Messages kept per channel (0: no history).
    pub size: usize,
    /// How long a message is kept.
    pub ttl: Duration,
    /// Bytes of messages kept in all channels together.
    pub max_bytes: usize,
    /// Copies of the history a replicated store keeps (NATS JetStream stream replicas).
    pub replicas: usize,
}

impl Default for HistoryConfig {
    fn default() -> Self {
        HistoryConfig { size: 100, ttl: Duration::from_secs(300), max_bytes: 64 << 20, replicas: 1 }
    }
}

impl HistoryConfig {
    /// No history at all.
    pub const OFF: HistoryConfig = HistoryConfig { size: 0, ttl: Duration::ZERO, max_bytes: 0, replicas: 1 };

    pub fn enabled(&self) -> bool {
        self.size > 0 && !self.ttl.is_zero() && self.max_bytes > 0
    }

    /// How a publish is kept under these settings (`None`: history is off).
    pub fn keep(&self) -> Option<Keep> {
        self.enabled().then_some(Keep { size: self.size as u64, ttl_ms: self.ttl.as_millis() as u64 })
    }
}

/// A publish kept as long as the store that keeps it allows (a channel server's own settings).
pub const AS_THE_STORE: Keep = Keep { size: u64::MAX, ttl_ms: u64::MAX };

/// Most messages one page of history holds.
pub const MAX_PAGE: usize = 1000;
/// A page stops growing past this many bytes of messages (one message always fits).
pub const MAX_PAGE_BYTES: usize = 512 * 1024;

/// Part of one channel's history.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Page {
    /// The channel's epoch; empty when the channel has no history (never published, or expired).
    pub epoch: String,
    /// The latest offset handed out (0: none).
    pub offset: u64,
    /// The oldest offset still kept (`offset + 1` when nothing is).
    pub first: u64,
    /// Messages after the offset asked for, oldest first.
    pub items: Vec<(u64, Bytes)>,
}

impl Page {
    /// Whether everything after `since` in epoch `epoch` is still there: the page (with the pages
    /// after it) is exactly what a client at that position missed.
    pub fn reaches(&self, epoch: &str, since: u64) -> bool {
        self.epoch == epoch && since <= self.offset && self.first <= since + 1
    }

    /// Whether messages after the last item exist beyond this page.
    pub fn more(&self) -> bool {
        self.items.last().is_some_and(|(o, _)| *o < self.offset)
    }
}

struct Item {
    offset: u64,
    data: Bytes,
    expires: Instant,
}

struct Stream {
    name: Bytes,
    epoch: Arc<str>,
    offset: u64,
    items: VecDeque<Item>,
    /// The latest publish: the stream is forgotten once it is empty and this is older than the ttl.
    touched: Instant,
}

impl Stream {
    fn first(&self) -> u64 {
        self.items.front().map_or(self.offset + 1, |i| i.offset)
    }
}

/// The histories of many channels, within one [`HistoryConfig`].
pub struct History {
    cfg: HistoryConfig,
    streams: HashMap<Bytes, Stream>,
    /// Every kept message's (channel, offset, expiry), oldest first, for the byte bound and
    /// expiry; may name messages already trimmed by the per-channel size, and is compacted when
    /// those are the majority. A message kept for less time than one before it expires when
    /// that one does, or when its channel is read.
    order: VecDeque<(Bytes, u64, Instant)>,
    bytes: usize,
    live: usize,
    /// Streams counted when empty ones were last forgotten: the next sweep waits for twice as many.
    swept_at: usize,
}

impl History {
    pub fn new(cfg: HistoryConfig) -> History {
        History { cfg, streams: HashMap::new(), order: VecDeque::new(), bytes: 0, live: 0, swept_at: 0 }
    }

    pub fn config(&self) -> HistoryConfig {
        self.cfg
    }

    /// Append `data` to `channel`'s history, kept as `keep` says within this store's bounds; its
    /// position. `None` when history is off or `keep` keeps nothing.
    pub fn append(&mut self, channel: &[u8], data: &Bytes, now: Instant, keep: Keep) -> Option<Position> {
        let size = self.cfg.size.min(usize::try_from(keep.size).unwrap_or(usize::MAX));
        let ttl = self.cfg.ttl.min(Duration::from_millis(keep.ttl_ms));
        if !self.cfg.enabled() || size == 0 || ttl.is_zero() {
            return None;
        }
        self.expire(now);
        let expires = now + ttl;
        if !self.streams.contains_key(channel) {
            let name = Bytes::copy_from_slice(channel);
            let s = Stream {
                name: name.clone(),
                epoch: crate::io::random_hex(4).into(),
                offset: 0,
                items: VecDeque::new(),
                touched: now,
            };
            self.streams.insert(name, s);
        }
        let s = self.streams.get_mut(channel)?;
        s.offset += 1;
        s.touched = now;
        s.items.push_back(Item { offset: s.offset, data: data.clone(), expires });
        let pos = Position { offset: s.offset, epoch: s.epoch.clone() };
        self.bytes += data.len();
        self.live += 1;
        if s.items.len() > size {
            if let Some(old) = s.items.pop_front() {
                self.bytes -= old.data.len();
                self.live -= 1;
            }
        }
        self.order.push_back((s.name.clone(), pos.offset, expires));
        while self.bytes > self.cfg.max_bytes {
            if !self.drop_oldest() {
                break;
            }
        }
        if self.order.len() > 2 * self.live + 1024 {
            self.compact();
        }
        Some(pos)
    }

    /// Messages of `channel` after `since`, at most `limit` (and [`MAX_PAGE`], [`MAX_PAGE_BYTES`]).
    pub fn page(&mut self, channel: &[u8], since: u64, limit: usize, now: Instant) -> Page {
        self.expire(now);
        let Some(s) = self.streams.get_mut(channel) else { return Page { first: 1, ..Page::default() } };
        while s.items.front().is_some_and(|i| i.expires <= now) {
            if let Some(old) = s.items.pop_front() {
                self.bytes -= old.data.len();
                self.live -= 1;
            }
        }
        let mut page = Page { epoch: s.epoch.to_string(), offset: s.offset, first: s.first(), items: Vec::new() };
        let mut bytes = 0;
        let start = s.items.partition_point(|i| i.offset <= since);
        for i in s.items.iter().skip(start).take(limit.min(MAX_PAGE)) {
            if !page.items.is_empty() && bytes + i.data.len() > MAX_PAGE_BYTES {
                break;
            }
            bytes += i.data.len();
            page.items.push((i.offset, i.data.clone()));
        }
        page
    }

    /// Forget messages older than the ttl; now and then (as channels accumulate), also channels
    /// with nothing kept and no publish within the ttl (their next message starts a new epoch).
    pub fn expire(&mut self, now: Instant) {
        let ttl = self.cfg.ttl;
        while self.order.front().is_some_and(|(_, _, expires)| *expires <= now) {
            self.drop_oldest();
        }
        if self.streams.len() > self.swept_at.max(1024) {
            self.streams.retain(|_, s| !s.items.is_empty() || now.saturating_duration_since(s.touched) <= ttl);
            self.swept_at = 2 * self.streams.len();
        }
    }

    /// Drop the oldest entry of `order` (and its message, if still kept); false when none is left.
    fn drop_oldest(&mut self) -> bool {
        let Some((channel, offset, _)) = self.order.pop_front() else { return false };
        if let Some(s) = self.streams.get_mut(&channel) {
            if s.items.front().is_some_and(|i| i.offset == offset) {
                if let Some(old) = s.items.pop_front() {
                    self.bytes -= old.data.len();
                    self.live -= 1;
                }
            }
        }
        true
    }

    /// Keep in `order` only the messages still kept.
    fn compact(&mut self) {
        let streams = &self.streams;
        self.order.retain(|(c, o, _)| streams.get(c).is_some_and(|s| s.first() <= *o));
    }

    /// Bytes of messages kept.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Channels with a history.
    pub fn channels(&self) -> usize {
        self.streams.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(size: usize, ttl: u64, max_bytes: usize) -> HistoryConfig {
        HistoryConfig { size, ttl: Duration::from_secs(ttl), max_bytes, replicas: 1 }
    }

    const KEEP: Keep = Keep { size: u64::MAX, ttl_ms: u64::MAX };

    fn b(s: &str) -> Bytes {
        Bytes::copy_from_slice(s.as_bytes())
    }

    #[test]
    fn offsets_count_per_channel_and_pages_follow_them() {
        let mut h = History::new(cfg(3, 60, 1 << 20));
        let now = Instant::now();
        let t = b"topic:a";
        for i in 1..=5 {
            assert_eq!(h.append(t, &b(&format!("m{i}")), now, KEEP).unwrap().offset, i);
        }
        assert_eq!(h.append(b"user:7", &b("x"), now, KEEP).unwrap().offset, 1);
        assert_eq!(h.append(b"NODE-0", &b("x"), now, Keep { size: 0, ..KEEP }), None, "a publish that keeps nothing");
        let p = h.page(b"topic:a", 2, 10, now);
        assert_eq!((p.offset, p.first), (5, 3));
        assert_eq!(p.items.iter().map(|i| i.0).collect::<Vec<_>>(), [3, 4, 5]);
        assert!(p.reaches(&p.epoch.clone(), 2) && !p.reaches(&p.epoch.clone(), 1), "offset 2 was trimmed");
        assert!(!p.reaches("other", 4));
        let p = h.page(b"topic:a", 3, 1, now);
        assert_eq!((p.items.len(), p.more()), (1, true));
        assert!(h.page(b"topic:a", 5, 10, now).items.is_empty());
        assert_eq!(h.page(b"topic:none", 0, 10, now).epoch, "");
    }

    #[test]
    fn ttl_and_byte_bounds() {
        let mut h = History::new(cfg(100, 10, 10));
        let t0 = Instant::now();
        let (a, c) = (&b"topic:a"[..], &b"topic:c"[..]);
        let epoch = h.append(a, &b("12345"), t0, KEEP).unwrap().epoch;
        h.append(c, &b("12345"), t0, KEEP);
        h.append(c, &b("123"), t0, KEEP);
        assert_eq!(h.bytes(), 8, "the oldest message anywhere went");
        assert_eq!(h.page(b"topic:a", 0, 10, t0).first, 2);
        let later = t0 + Duration::from_secs(11);
        h.expire(later);
        assert_eq!(h.bytes(), 0);
        assert_eq!(h.append(a, &b("x"), later, KEEP).unwrap(), Position { offset: 2, epoch: epoch.clone() });
        // Many channels later, the ones with nothing kept and no recent publish are forgotten,
        // and their next message starts a new epoch.
        let much_later = later + Duration::from_secs(11);
        for i in 0..1100 {
            h.append(format!("topic:{i}").as_bytes(), &b(""), much_later, KEEP);
        }
        let again = h.append(a, &b("x"), much_later, KEEP).unwrap();
        assert_eq!(again.offset, 1);
        assert_ne!(again.epoch, epoch, "a history that was forgotten gets a new epoch");
        assert!(h.channels() <= 1102);
    }

    #[test]
    fn a_publish_keeps_within_its_own_bounds_and_the_store_s() {
        let mut h = History::new(cfg(100, 60, 1 << 20));
        let t0 = Instant::now();
        let last = Keep { size: 1, ttl_ms: 5_000 };
        for i in 1..=3 {
            h.append(b"cache-a", &b(&format!("m{i}")), t0, last);
        }
        assert_eq!(h.page(b"cache-a", 0, 10, t0).items, vec![(3, b("m3"))], "size 1: the latest only");
        // A longer ttl than the store's is cut to the store's; a shorter one holds even behind
        // a message kept longer.
        h.append(b"topic:a", &b("long"), t0, KEEP);
        h.append(b"cache-a", &b("m4"), t0 + Duration::from_secs(1), last);
        let at = |s| t0 + Duration::from_secs(s);
        assert_eq!(h.page(b"cache-a", 0, 10, at(5)).items, vec![(4, b("m4"))]);
        assert!(h.page(b"cache-a", 0, 10, at(7)).items.is_empty(), "m4 expired after 5 s");
        assert_eq!(h.page(b"topic:a", 0, 10, at(59)).items.len(), 1);
        assert!(h.page(b"topic:a", 0, 10, at(61)).items.is_empty(), "cut to the store's 60 s");
        assert_eq!(h.bytes(), 0);
    }

    #[test]
    fn order_stays_bounded() {
        let mut h = History::new(cfg(1, 60, 1 << 20));
        let now = Instant::now();
        for _ in 0..10_000 {
            h.append(b"topic:a", &b("x"), now, KEEP);
        }
        assert!(h.order.len() <= 2 * h.live + 1024);
        assert_eq!(h.page(b"topic:a", 0, 10, now).items, vec![(10_000, b("x"))]);
    }
}
