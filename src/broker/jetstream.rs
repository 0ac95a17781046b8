//! History on NATS JetStream, for the [`nats`](super::nats) backend.
//!
//! One stream (`PREFIX` made a name, plus `history`) stores the channels that keep history
//! (`broadcast`, users, topics): a publisher publishes them to `PREFIX h.CHANNEL`, and the stream
//! **republishes** each message it stored to `PREFIX d.CHANNEL`, where gateways subscribe. So a
//! gateway gets exactly the messages the stream kept, in the stream's order, and only once they
//! are kept: storing and delivering are one step, as recovery needs.
//!
//! Offsets count per channel without gaps, while the stream sequence is global: each message
//! carries its channel's offset and epoch as headers, and is published with
//! `Nats-Expected-Last-Subject-Sequence` set to the stream sequence of the channel's previous
//! message. The stream refuses it if another publisher got there first; the publisher then reads
//! the channel's last message and tries again with the next offset. A publisher sends one message
//! per channel at a time (the next needs the sequence the previous one got). The epoch is drawn by the
//! publisher of a channel's first kept message and copied from then on; once the channel's
//! messages are all gone (`max_age`), the next one starts a new epoch.
//!
//! History is read message by message from the stream's leader.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use async_nats::jetstream::{self, stream};
use bytes::Bytes;

use super::{Page, Position};
use crate::history::HistoryConfig;

/// Header carrying a message's offset in its channel.
pub const OFFSET: &str = "Pushwire-Offset";
/// Header carrying the channel's epoch.
pub const EPOCH: &str = "Pushwire-Epoch";

/// Tries to win an offset before the publish fails (each lost race waits a random moment, longer
/// each time, so that racing publishers fall out of step; the caller's publish timeout bounds it).
const MAX_ATTEMPTS: u32 = 32;
/// Channels whose latest offset a publisher remembers before it forgets them all.
const MAX_REMEMBERED: usize = 100_000;

/// Where a channel's history stands, as this publisher last saw it.
#[derive(Clone)]
struct Last {
    epoch: std::sync::Arc<str>,
    offset: u64,
    /// Stream sequence of the channel's latest message (0: none).
    sequence: u64,
}

/// The history stream of one NATS cluster.
pub struct JetStream {
    js: jetstream::Context,
    cfg: HistoryConfig,
    name: String,
    store: String,
    deliver: String,
    last: Mutex<HashMap<String, Last>>,
    /// One publish at a time per channel from this publisher: each needs the sequence the
    /// previous one got (publishes to different channels go in parallel).
    turns: Mutex<HashMap<String, std::sync::Arc<tokio::sync::Mutex<()>>>>,
    /// Whether the stream has been in place; until then, publishes go without history.
    ready: std::sync::atomic::AtomicBool,
    /// Wakes the task that makes the stream (it was found missing).
    lost: tokio::sync::Notify,
}

/// After the stream could not be made (no JetStream on the server, or a cluster still electing its
/// leader), the first wait before the next try; it doubles up to [`RETRY_STREAM`].
const FIRST_RETRY: Duration = Duration::from_millis(500);
/// The longest wait between two tries to make the stream.
const RETRY_STREAM: Duration = Duration::from_secs(30);

/// The start of the names of the streams of the channels under `prefix`: the prefix made a
/// stream name (`pushwire.` → `pushwire_`).
pub fn stream_base(prefix: &str) -> String {
    let base: String = prefix.chars().map(|c| if c.is_ascii_alphanumeric() || c == '-' { c } else { '_' }).collect();
    if base.is_empty() {
        "pushwire_".into()
    } else {
        base
    }
}

/// The position a message carries in its headers.
pub fn position(headers: Option<&async_nats::HeaderMap>) -> Option<Position> {
    let h = headers?;
    let offset = h.get(OFFSET)?.as_str().parse().ok()?;
    Some(Position { offset, epoch: h.get(EPOCH)?.as_str().into() })
}

impl JetStream {
    /// The history of the channels under `prefix`; `cfg` is what a publisher keeps (a gateway
    /// only reads).
    pub fn new(client: async_nats::Client, prefix: &str, cfg: HistoryConfig) -> JetStream {
        JetStream {
            js: jetstream::new(client),
            cfg,
            name: format!("{}history", stream_base(prefix)),
            store: format!("{prefix}h."),
            deliver: format!("{prefix}d."),
            last: Mutex::default(),
            turns: Mutex::default(),
            ready: std::sync::atomic::AtomicBool::new(false),
            lost: tokio::sync::Notify::new(),
        }
    }

    /// Subject prefix gateways subscribe under for history channels.
    pub fn deliver_prefix(&self) -> &str {
        &self.deliver
    }

    /// For a publisher that keeps history: make the stream (with this publisher's settings) now,
    /// in the background, and again whenever it is found missing; while it cannot be made (the
    /// server has no JetStream) publishes go without history and it is tried again, at growing
    /// intervals up to [`RETRY_STREAM`].
    pub fn start(self: &std::sync::Arc<Self>) {
        let js = self.clone();
        tokio::spawn(async move {
            let mut wait = FIRST_RETRY;
            loop {
                match js.make_stream().await {
                    Ok(()) => {
                        js.ready.store(true, std::sync::atomic::Ordering::Release);
                        wait = FIRST_RETRY;
                        js.lost.notified().await;
                    }
                    Err(e) => {
                        // Said once per outage, then at the longest wait.
                        if wait == FIRST_RETRY || wait == RETRY_STREAM {
                            tracing::warn!(stream = %js.name, "no history on NATS yet (publishes go without it): {e}");
                        }
                        tokio::time::sleep(wait).await;
                        wait = (wait * 2).min(RETRY_STREAM);
                    }
                }
            }
        });
    }

    async fn make_stream(&self) -> Result<(), String> {
        let config = stream::Config {
            name: self.name.clone(),
            subjects: vec![format!("{}>", self.store)],
            max_messages_per_subject: self.cfg.size as i64,
            max_age: self.cfg.ttl,
            max_bytes: self.cfg.max_bytes as i64,
            discard: stream::DiscardPolicy::Old,
            storage: stream::StorageType::File,
            num_replicas: self.cfg.replicas,
            republish: Some(stream::Republish {
                source: format!("{}>", self.store),
                destination: format!("{}>", self.deliver),
                headers_only: false,
            }),
            ..Default::default()
        };
        let create = self.js.create_or_update_stream(config);
        match tokio::time::timeout(Duration::from_secs(10), create).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(format!("history stream {}: {e}", self.name)),
            Err(_) => Err(format!("history stream {}: no answer from JetStream", self.name)),
        }
    }

    /// Where `subject`'s history stands on the server.
    async fn read_last(&self, subject: &str) -> Result<Last, String> {
        let stream = self.js.get_stream_no_info(&self.name).await.map_err(|e| e.to_string())?;
        match stream.get_last_raw_message_by_subject(subject).await {
            Ok(m) => {
                let p = position(Some(&m.headers)).ok_or("a stored message without its position")?;
                Ok(Last { epoch: p.epoch, offset: p.offset, sequence: m.sequence })
            }
            Err(e) if e.kind() == stream::LastRawMessageErrorKind::NoMessageFound => {
                Ok(Last { epoch: crate::io::random_hex(4).into(), offset: 0, sequence: 0 })
            }
            Err(e) => Err(e.to_string()),
        }
    }

    /// Store (and so deliver) `data` on channel subject token `name`; its position. `None` (and
    /// nothing sent) until the stream has first been made: the caller publishes without history.
    pub async fn publish(&self, name: &str, data: Bytes) -> Result<Option<Position>, String> {
        if !self.ready.load(std::sync::atomic::Ordering::Acquire) {
            return Ok(None);
        }
        let subject = format!("{}{name}", self.store);
        let turn = {
            let mut turns = crate::io::lock(&self.turns);
            if turns.len() >= MAX_REMEMBERED {
                turns.retain(|_, t| std::sync::Arc::strong_count(t) > 1);
            }
            turns.entry(subject.clone()).or_default().clone()
        };
        let _turn = turn.lock().await;
        for attempt in 0..MAX_ATTEMPTS {
            if attempt > 0 {
                let mut r = [0u8; 1];
                let _ = getrandom::fill(&mut r);
                let most = Duration::from_micros(500) * attempt.min(20);
                tokio::time::sleep(most.mul_f64(f64::from(r[0]) / 255.0)).await;
            }
            let cached = crate::io::lock(&self.last).get(&subject).cloned();
            let last = match cached {
                Some(l) => l,
                None => self.read_last(&subject).await?,
            };
            let offset = last.offset + 1;
            let mut headers = async_nats::HeaderMap::new();
            headers.insert(OFFSET, offset.to_string().as_str());
            headers.insert(EPOCH, &*last.epoch);
            headers.insert(async_nats::header::NATS_EXPECTED_LAST_SUBJECT_SEQUENCE, last.sequence.to_string().as_str());
            let sent = self.js.publish_with_headers(subject.clone(), headers, data.clone()).await;
            let acked = match sent {
                Ok(ack) => ack.await,
                Err(e) => Err(e),
            };
            let lost_stream = {
                let mut remembered = crate::io::lock(&self.last);
                match acked {
                    Ok(ack) => {
                        if remembered.len() >= MAX_REMEMBERED {
                            remembered.clear();
                        }
                        let epoch = last.epoch.clone();
                        remembered.insert(subject, Last { epoch: epoch.clone(), offset, sequence: ack.sequence });
                        return Ok(Some(Position { offset, epoch }));
                    }
                    // Another publisher took this offset (or what we remembered expired): look again.
                    Err(e) if e.kind() == jetstream::context::PublishErrorKind::WrongLastSequence => {
                        remembered.remove(&subject);
                        continue;
                    }
                    Err(e) => {
                        remembered.remove(&subject);
                        (e.kind() == jetstream::context::PublishErrorKind::StreamNotFound, e.to_string())
                    }
                }
            };
            // Once the stream has been in place, a publish it does not take fails (503): going on
            // without history would hand out messages no client could recover. A stream that is
            // gone (deleted) is made again.
            if lost_stream.0 {
                self.lost.notify_one();
            }
            return Err(lost_stream.1);
        }
        Err(format!("no offset won on {subject} in {MAX_ATTEMPTS} attempts"))
    }

    /// Messages of channel subject token `name` after `since`, at most `limit`; `None` when the
    /// stream does not exist (no publisher keeps history). Read message by message from the
    /// stream's leader (a consumer may be placed on a node that is gone, and a direct get may be
    /// answered by a replica that fell behind); while the leader is being elected this fails and
    /// the caller asks again.
    pub async fn history(&self, name: &str, since: u64, limit: usize) -> Result<Option<Page>, String> {
        use async_nats::jetstream::stream::LastRawMessageErrorKind as Kind;
        let subject = format!("{}{name}", self.store);
        let stream = self.js.get_stream_no_info(&self.name).await.map_err(|e| e.to_string())?;
        let last = match stream.get_last_raw_message_by_subject(&subject).await {
            Ok(m) => m,
            Err(e) if e.kind() == Kind::NoMessageFound => return Ok(Some(Page { first: 1, ..Page::default() })),
            Err(e) => return if self.stream_exists().await? { Err(e.to_string()) } else { Ok(None) },
        };
        let latest = position(Some(&last.headers)).ok_or("a stored message without its position")?;
        let mut page = Page { epoch: latest.epoch.to_string(), offset: latest.offset, first: 0, items: Vec::new() };
        let mut sequence = 1;
        // At most the messages the stream keeps of one subject, and never past the last one seen.
        for _ in 0..=(crate::history::MAX_PAGE * 10) {
            let m = match stream.get_first_raw_message_by_subject(&subject, sequence).await {
                Ok(m) => m,
                Err(e) if e.kind() == Kind::NoMessageFound => break,
                Err(e) => return Err(e.to_string()),
            };
            let Some(p) = position(Some(&m.headers)) else { break };
            if page.first == 0 {
                page.first = p.offset;
            }
            if p.offset > since && p.epoch == latest.epoch {
                page.items.push((p.offset, m.payload));
                if page.items.len() >= limit.min(crate::history::MAX_PAGE) {
                    break;
                }
            }
            if m.sequence >= last.sequence {
                break;
            }
            sequence = m.sequence + 1;
        }
        if page.first == 0 {
            page.first = page.offset + 1;
        }
        Ok(Some(page))
    }

    /// Whether the history stream exists.
    async fn stream_exists(&self) -> Result<bool, String> {
        use async_nats::jetstream::{context::GetStreamErrorKind, ErrorCode};
        match self.js.get_stream(&self.name).await {
            Ok(_) => Ok(true),
            Err(e) => match e.kind() {
                GetStreamErrorKind::JetStream(j) if j.error_code() == ErrorCode::STREAM_NOT_FOUND => Ok(false),
                _ => Err(e.to_string()),
            },
        }
    }
}
