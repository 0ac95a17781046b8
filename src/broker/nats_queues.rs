//! Work queues on NATS JetStream, for the [`nats`](super::nats) backend.
//!
//! Queues live in a work-queue stream (`PREFIX` made a name, plus `queues`; queues that expire
//! when idle, as `publishLoop`'s are, in a second one, `...loops`, whose messages age out): a
//! queue is the subject `PREFIX wq.NAME` (`wl.` for the expiring ones). A push is a JetStream
//! publish, confirmed by the stream's acknowledgement; the stream refuses a message past its
//! bound of messages per subject (`discard new` per subject) or of bytes (all queues together:
//! JetStream bounds a stream's bytes, not a subject's). A pop fetches one message through the
//! queue's durable pull consumer, shared by every process (JetStream hands each message to one
//! fetch), and acknowledges it (confirmed, so it is gone for all) before handing it on: an item
//! is taken at most once. Consumers that see no fetch for an hour are removed by the server.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use async_nats::jetstream::{self, consumer, stream};
use bytes::Bytes;
use futures_util::StreamExt;

use super::QueueBounds;

/// Consumers a process remembers before it forgets them all (they are looked up again).
const MAX_CONSUMERS: usize = 10_000;
/// How long JetStream waits for an answer to one step.
const STEP: Duration = Duration::from_secs(5);

/// The work queues of one NATS cluster.
pub struct Queues {
    js: jetstream::Context,
    prefix: String,
    base: String,
    replicas: usize,
    /// Streams made, by name, with the bounds they were made with.
    made: Mutex<HashMap<String, QueueBounds>>,
    consumers: Mutex<HashMap<String, consumer::PullConsumer>>,
}

impl Queues {
    pub fn new(client: async_nats::Client, prefix: &str, replicas: usize) -> Queues {
        Queues {
            js: jetstream::new(client),
            prefix: prefix.to_owned(),
            base: super::jetstream::stream_base(prefix),
            replicas,
            made: Mutex::default(),
            consumers: Mutex::default(),
        }
    }

    /// The stream and subject of queue token `name` (`expiring`: with an idle ttl).
    fn place(&self, name: &str, expiring: bool) -> (String, String) {
        match expiring {
            false => (format!("{}queues", self.base), format!("{}wq.{name}", self.prefix)),
            true => (format!("{}loops", self.base), format!("{}wl.{name}", self.prefix)),
        }
    }

    /// Make the stream for queues with `bounds` (once per process, or again when the bounds
    /// changed or the stream was lost).
    async fn stream(&self, stream: &str, bounds: QueueBounds) -> Result<(), String> {
        if crate::io::lock(&self.made).get(stream) == Some(&bounds) {
            return Ok(());
        }
        let expiring = bounds.idle_ttl.is_some();
        let config = stream::Config {
            name: stream.to_owned(),
            subjects: vec![format!("{}{}.>", self.prefix, if expiring { "wl" } else { "wq" })],
            retention: stream::RetentionPolicy::WorkQueue,
            max_messages_per_subject: bounds.max_items.min(i64::MAX as usize) as i64,
            max_bytes: bounds.max_bytes.min(i64::MAX as usize) as i64,
            max_age: bounds.idle_ttl.unwrap_or_default(),
            discard: stream::DiscardPolicy::New,
            discard_new_per_subject: true,
            storage: stream::StorageType::File,
            num_replicas: self.replicas,
            ..Default::default()
        };
        match tokio::time::timeout(STEP, self.js.create_or_update_stream(config)).await {
            Ok(r) => r.map_err(|e| format!("queue stream {stream}: {e}"))?,
            Err(_) => return Err(format!("queue stream {stream}: no answer from JetStream")),
        };
        crate::io::lock(&self.made).insert(stream.to_owned(), bounds);
        Ok(())
    }

    /// Append `data` to queue token `name`; `false` when the queue is full.
    pub async fn push(&self, name: &str, data: Bytes, bounds: QueueBounds) -> Result<bool, String> {
        let (stream, subject) = self.place(name, bounds.idle_ttl.is_some());
        self.stream(&stream, bounds).await?;
        let acked = match self.js.publish(subject, data).await {
            Ok(ack) => ack.await,
            Err(e) => Err(e),
        };
        match acked {
            Ok(_) => Ok(true),
            Err(e) if e.to_string().contains("maximum") => Ok(false),
            Err(e) => {
                if e.kind() == jetstream::context::PublishErrorKind::StreamNotFound {
                    crate::io::lock(&self.made).remove(&stream);
                }
                Err(e.to_string())
            }
        }
    }

    /// Take the oldest item of queue token `name` (made with `bounds` if it does not exist).
    pub async fn pop(&self, name: &str, bounds: QueueBounds) -> Result<Option<Bytes>, String> {
        let (stream, subject) = self.place(name, bounds.idle_ttl.is_some());
        self.stream(&stream, bounds).await?;
        let consumer = self.consumer(&stream, &subject).await?;
        let mut batch = match consumer.fetch().max_messages(1).messages().await {
            Ok(b) => b,
            Err(e) => {
                crate::io::lock(&self.consumers).remove(&subject);
                return Err(e.to_string());
            }
        };
        let Some(m) = tokio::time::timeout(STEP, batch.next()).await.map_err(|_| "no answer to a fetch")? else {
            return Ok(None);
        };
        let m = m.map_err(|e| e.to_string())?;
        // Confirmed before it is handed on: once acknowledged, no other process gets it.
        m.double_ack().await.map_err(|e| e.to_string())?;
        Ok(Some(m.payload.clone()))
    }

    /// Items waiting in queue token `name`.
    pub async fn len(&self, name: &str, bounds: QueueBounds) -> Result<u64, String> {
        let (stream, subject) = self.place(name, bounds.idle_ttl.is_some());
        self.stream(&stream, bounds).await?;
        let consumer = self.consumer(&stream, &subject).await?;
        let info = tokio::time::timeout(STEP, consumer.get_info()).await.map_err(|_| "no answer to a consumer info")?;
        Ok(info.map_err(|e| e.to_string())?.num_pending)
    }

    /// The pull consumer every process shares for `subject`.
    async fn consumer(&self, stream: &str, subject: &str) -> Result<consumer::PullConsumer, String> {
        if let Some(c) = crate::io::lock(&self.consumers).get(subject) {
            return Ok(c.clone());
        }
        use sha1::Digest as _;
        let name: String = sha1::Sha1::digest(subject.as_bytes()).iter().take(12).map(|b| format!("{b:02x}")).collect();
        let config = consumer::pull::Config {
            durable_name: Some(name.clone()),
            filter_subject: subject.to_owned(),
            ack_policy: consumer::AckPolicy::Explicit,
            inactive_threshold: Duration::from_secs(3600),
            ..Default::default()
        };
        let found = async {
            let s = self.js.get_stream_no_info(stream).await.map_err(|e| e.to_string())?;
            s.get_or_create_consumer(&name, config).await.map_err(|e| e.to_string())
        };
        let c = tokio::time::timeout(STEP, found).await.map_err(|_| "no answer from JetStream".to_owned())??;
        let mut consumers = crate::io::lock(&self.consumers);
        if consumers.len() >= MAX_CONSUMERS {
            consumers.clear();
        }
        consumers.insert(subject.to_owned(), c.clone());
        Ok(c)
    }
}
