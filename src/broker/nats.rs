//! The NATS backend on [async-nats](https://docs.rs/async-nats): `nats://` and `tls://`, a thin
//! adapter under [`managed`](super::managed). async-nats connects, rotates over the given servers
//! and the ones the cluster announces, reconnects, resubscribes, does TLS, tokens, user/password
//! and credentials files (nkeys). When a server announces lame-duck mode, the adapter moves to
//! another server at once rather than waiting to be closed (gateways a little after publishers).
//!
//! **Confirmation.** NATS core has no acknowledgement, and the client's `flush` only empties its
//! own buffer. So the adapter subscribes to a private inbox and, after each publish (or
//! subscription), publishes a numbered marker there: the server handles one connection's
//! operations in order, so the marker's return proves the operations before it were processed.
//! A server error that does not close the connection (a permissions violation) is logged and the
//! link stays up.
//!
//! Channel names become subjects `PREFIX d.` + name, with bytes that are not allowed or not safe
//! in a subject token (space, `.`, `*`, `>`, `%`, non-ASCII) percent-encoded. A publish that is
//! not kept goes there directly; one that is kept ([`Keep`]) goes to the JetStream history stream,
//! which republishes what it stored there ([`jetstream`](super::jetstream)); without the stream
//! (history off, or a server without JetStream) it goes there directly too. The stream's limits
//! are the publisher's history settings: a publish says whether it is kept, not for how long.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use tokio::sync::{mpsc, oneshot};

use super::jetstream::{self, JetStream};
use super::managed::{Client, ClientFuture, Event, EVENT_QUEUE};
use super::{Keep, LinkConfig, Message, Page, Position, QueueBounds};
use crate::history::HistoryConfig;
use crate::io::lock;

/// How much later than publishers a subscriber leaves a server in lame-duck mode.
pub const LAME_DUCK_SUBSCRIBER_DELAY: Duration = Duration::from_millis(1500);

/// Where and how to reach a NATS cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NatsUrl {
    /// `nats://HOST:PORT` or `tls://HOST:PORT`, credentials removed.
    pub servers: Vec<String>,
    pub user: Option<String>,
    pub pass: Option<String>,
    pub token: Option<String>,
    /// `tls://`: TLS is required.
    pub tls: bool,
}

impl NatsUrl {
    /// Parse `nats://[USER:PASS@|TOKEN@]HOST:PORT[,HOST:PORT...]` (`tls://` to require TLS).
    /// Credentials may be percent-encoded.
    pub fn parse(url: &str) -> Result<NatsUrl, String> {
        let (scheme, rest) = url.split_once("://").ok_or_else(|| format!("{url:?} is not a nats:// URL"))?;
        if !matches!(scheme, "nats" | "tls") {
            return Err(format!("{url:?} is not a nats:// or tls:// URL"));
        }
        let (auth, hosts) = match rest.rsplit_once('@') {
            Some((a, h)) => (Some(a), h),
            None => (None, rest),
        };
        let mut servers = Vec::new();
        for s in hosts.trim_end_matches('/').split(',') {
            let s = s.trim().trim_start_matches("nats://").trim_start_matches("tls://");
            if s.rsplit_once(':').is_none_or(|(h, p)| h.is_empty() || p.parse::<u16>().is_err()) {
                return Err(format!("{url:?}: {s:?} is not HOST:PORT"));
            }
            servers.push(format!("{scheme}://{s}"));
        }
        let decode = |s: &str| percent_encoding::percent_decode_str(s).decode_utf8_lossy().into_owned();
        let (user, pass, token) = match auth.map(|a| a.split_once(':')) {
            None => (None, None, None),
            Some(None) => (None, None, auth.map(decode)),
            Some(Some((u, p))) => (Some(decode(u)), Some(decode(p)), None),
        };
        Ok(NatsUrl { servers, user, pass, token, tls: scheme == "tls" })
    }
}

/// Extra settings of a NATS connection.
#[derive(Debug, Clone, Default)]
pub struct NatsOptions {
    /// PEM file of certificate authorities to trust (a private CA).
    pub ca: Option<std::path::PathBuf>,
    /// A NATS credentials file (JWT and nkey seed).
    pub creds: Option<std::path::PathBuf>,
    /// A file holding a user nkey seed.
    pub nkey: Option<std::path::PathBuf>,
    /// Leave a server in lame-duck mode [`LAME_DUCK_SUBSCRIBER_DELAY`] after publishers do (a
    /// gateway's: what publishers send meanwhile still reaches it).
    pub leave_late: bool,
}

/// A channel name as a subject token.
fn encode_name(name: &str) -> String {
    let mut out = String::with_capacity(name.len());
    for b in name.bytes() {
        if b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b':' {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn decode_name(token: &str) -> Option<Bytes> {
    let decoded: Vec<u8> = percent_encoding::percent_decode_str(token).collect();
    Some(Bytes::from(decoded))
}

/// A NATS cluster seen as a [`Client`].
pub struct Nats {
    client: async_nats::Client,
    prefix: String,
    /// Subscriptions by channel: the task forwarding its messages.
    subs: Mutex<HashMap<String, tokio::task::JoinHandle<()>>>,
    events: mpsc::Sender<Event>,
    /// The private subject of confirmation markers, and who waits for which marker.
    inbox: String,
    next_marker: AtomicU64,
    waiting: Arc<Mutex<HashMap<u64, oneshot::Sender<()>>>>,
    history: Arc<JetStream>,
    queues: super::nats_queues::Queues,
    /// This node's publishes keep history.
    keeps: bool,
    leave_late: bool,
}

/// Connect (in the background: async-nats retries until a server answers) and start forwarding.
pub async fn open(
    url: &NatsUrl,
    prefix: String,
    opts: &NatsOptions,
    cfg: &LinkConfig,
    history: HistoryConfig,
) -> Result<(Arc<Nats>, mpsc::Receiver<Event>), String> {
    let (tx, events) = mpsc::channel(EVENT_QUEUE);
    let mut o = async_nats::ConnectOptions::new();
    if let Some(path) = &opts.creds {
        o = o.credentials_file(path).await.map_err(|e| format!("NATS credentials {}: {e}", path.display()))?;
    }
    if let Some(path) = &opts.nkey {
        let seed = std::fs::read_to_string(path).map_err(|e| format!("NATS nkey {}: {e}", path.display()))?;
        o = o.nkey(seed.trim().to_owned());
    }
    if let (Some(u), Some(p)) = (&url.user, &url.pass) {
        o = o.user_and_password(u.clone(), p.clone());
    }
    if let Some(t) = &url.token {
        o = o.token(t.clone());
    }
    if let Some(ca) = &opts.ca {
        o = o.add_root_certificates(ca.clone());
    }
    let (min, max) = (cfg.min_backoff, cfg.max_backoff);
    let ev = tx.clone();
    let (lame_duck, mut lame_ducks) = mpsc::channel::<()>(1);
    o = o
        .name("pushwire")
        .require_tls(url.tls)
        .retry_on_initial_connect()
        .max_reconnects(None)
        .connection_timeout(cfg.connect_timeout)
        .ping_interval(cfg.probe_interval.max(Duration::from_secs(1)))
        .subscription_capacity(EVENT_QUEUE)
        .reconnect_delay_callback(move |attempts| (min * 2u32.saturating_pow(attempts as u32)).min(max))
        .event_callback(move |event| {
            let (ev, lame_duck) = (ev.clone(), lame_duck.clone());
            async move {
                let e = match event {
                    async_nats::Event::Connected => Event::Connected,
                    async_nats::Event::Disconnected => Event::Disconnected("disconnected".into()),
                    async_nats::Event::SlowConsumer(_) => Event::Lost(1),
                    async_nats::Event::LameDuckMode => {
                        let _ = lame_duck.try_send(());
                        return tracing::info!("NATS server entered lame duck mode: moving to another server");
                    }
                    other => return tracing::warn!("NATS: {other}"),
                };
                let _ = ev.send(e).await;
            }
        });
    let servers: Vec<async_nats::ServerAddr> =
        url.servers.iter().map(|s| s.parse()).collect::<Result<_, _>>().map_err(|e| format!("{e}"))?;
    let client = o.connect(servers).await.map_err(|e| e.to_string())?;
    let inbox = format!("{}.pushwire", client.new_inbox());
    let waiting: Arc<Mutex<HashMap<u64, oneshot::Sender<()>>>> = Arc::default();
    let mut markers = client.subscribe(inbox.clone()).await.map_err(|e| e.to_string())?;
    let w = waiting.clone();
    tokio::spawn(async move {
        while let Some(m) = markers.next().await {
            let n = std::str::from_utf8(&m.payload).ok().and_then(|s| s.parse::<u64>().ok());
            if let Some(done) = n.and_then(|n| lock(&w).remove(&n)) {
                let _ = done.send(());
            }
        }
    });
    let nats = Nats {
        history: Arc::new(JetStream::new(client.clone(), &prefix, history)),
        queues: super::nats_queues::Queues::new(client.clone(), &prefix, history.replicas),
        keeps: history.enabled(),
        leave_late: opts.leave_late,
        client,
        prefix,
        subs: Mutex::default(),
        events: tx,
        inbox,
        next_marker: AtomicU64::new(0),
        waiting,
    };
    let nats = Arc::new(nats);
    if nats.keeps {
        nats.history.start();
    }
    let mover = nats.clone();
    tokio::spawn(async move {
        while lame_ducks.recv().await.is_some() {
            mover.leave_lame_duck().await;
        }
    });
    Ok((nats, events))
}

impl Nats {
    /// The server announced lame-duck mode: it is about to go. Move to another server now rather
    /// than when it closes us, at a moment spread over a second so that its clients do not all
    /// arrive elsewhere at once. A subscriber (a gateway) moves after [`LAME_DUCK_SUBSCRIBER_DELAY`]
    /// more: publishers on the same server have moved by then and hold their publishes for the
    /// settle time, which covers the gateway's move. A publisher's own subscriptions (answers and
    /// heartbeats, on `pushwire:` channels) do not make it a subscriber here.
    async fn leave_lame_duck(&self) {
        let mut jitter = [0u8; 1];
        let _ = getrandom::fill(&mut jitter);
        let mut wait = Duration::from_millis(u64::from(jitter[0]) * 2);
        if self.leave_late {
            wait += LAME_DUCK_SUBSCRIBER_DELAY;
        }
        tokio::time::sleep(wait).await;
        if let Err(e) = self.client.force_reconnect().await {
            tracing::warn!("NATS: cannot leave a server in lame duck mode: {e}");
        }
    }

    /// Where `channel`'s messages are delivered (kept or not: see the module's doc).
    fn subject(&self, channel: &str) -> String {
        format!("{}{}", self.history.deliver_prefix(), encode_name(channel))
    }

    /// Publish a marker after what this client sent so far and wait for it to come back.
    async fn round_trip(&self) -> Result<(), String> {
        let n = self.next_marker.fetch_add(1, Ordering::Relaxed);
        let (done, wait) = oneshot::channel();
        lock(&self.waiting).insert(n, done);
        // Forget the marker however this ends, a caller's timeout included: the map stays bounded.
        let _forget = Forget(&self.waiting, n);
        self.client.publish(self.inbox.clone(), Bytes::from(n.to_string())).await.map_err(|e| e.to_string())?;
        wait.await.map_err(|_| "confirmation lost".to_owned())
    }
}

/// Removes a marker from the waiting map when dropped.
struct Forget<'a>(&'a Mutex<HashMap<u64, oneshot::Sender<()>>>, u64);

impl Drop for Forget<'_> {
    fn drop(&mut self) {
        lock(self.0).remove(&self.1);
    }
}

impl Client for Nats {
    fn publish(&self, channel: &str, data: Bytes, keep: Option<Keep>) -> ClientFuture<'_, Option<Position>> {
        let subject = self.subject(channel);
        let stored = self.keeps && keep.is_some_and(|k| k.size > 0 && k.ttl_ms > 0);
        let name = encode_name(channel);
        Box::pin(async move {
            if stored {
                // Confirmed by the stream's acknowledgement: stored, and so republished.
                if let Some(p) = self.history.publish(&name, data.clone()).await? {
                    return Ok(Some(p));
                }
            }
            self.client.publish(subject, data).await.map_err(|e| e.to_string())?;
            self.round_trip().await.map(|()| None)
        })
    }

    fn history(&self, channel: &str, since: u64, limit: usize) -> ClientFuture<'_, Option<Page>> {
        let name = encode_name(channel);
        Box::pin(async move { self.history.history(&name, since, limit).await })
    }

    fn queue_push(&self, queue: &str, data: Bytes, bounds: QueueBounds) -> ClientFuture<'_, bool> {
        let name = encode_name(queue);
        Box::pin(async move { self.queues.push(&name, data, bounds).await })
    }

    fn queue_pop(&self, queue: &str, bounds: QueueBounds) -> ClientFuture<'_, Option<Bytes>> {
        let name = encode_name(queue);
        Box::pin(async move { self.queues.pop(&name, bounds).await })
    }

    fn queue_len(&self, queue: &str, bounds: QueueBounds) -> ClientFuture<'_, u64> {
        let name = encode_name(queue);
        Box::pin(async move { self.queues.len(&name, bounds).await })
    }

    fn subscribe(&self, channels: Vec<String>) -> ClientFuture<'_> {
        Box::pin(async move {
            for c in channels {
                if lock(&self.subs).contains_key(&c) {
                    continue; // async-nats renews its subscriptions after a reconnection
                }
                let mut sub = self.client.subscribe(self.subject(&c)).await.map_err(|e| e.to_string())?;
                let (events, prefix) = (self.events.clone(), self.prefix.clone());
                let forward = tokio::spawn(async move {
                    while let Some(m) = sub.next().await {
                        let Some(local) = m.subject.strip_prefix(prefix.as_str()) else { continue };
                        let Some(channel) = decode_name(local.strip_prefix("d.").unwrap_or(local)) else { continue };
                        let position = jetstream::position(m.headers.as_ref());
                        if events.send(Event::Message(Message { channel, data: m.payload, position })).await.is_err() {
                            return;
                        }
                    }
                });
                lock(&self.subs).insert(c, forward);
            }
            // The server has the subscriptions once a marker sent after them comes back.
            self.round_trip().await
        })
    }

    fn unsubscribe(&self, channels: Vec<String>) -> ClientFuture<'_> {
        let mut subs = lock(&self.subs);
        for c in channels {
            // Dropping the subscriber (with its task) unsubscribes on the server.
            if let Some(task) = subs.remove(&c) {
                task.abort();
            }
        }
        Box::pin(std::future::ready(Ok(())))
    }

    fn connected(&self) -> bool {
        self.client.connection_state() == async_nats::connection::State::Connected
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        let u = NatsUrl::parse("nats://127.0.0.1:4222,127.0.0.1:4223").unwrap();
        assert_eq!(u.servers, ["nats://127.0.0.1:4222", "nats://127.0.0.1:4223"]);
        let u = NatsUrl::parse("nats://me:p%40ss@h:1").unwrap();
        assert_eq!((u.user.as_deref(), u.pass.as_deref()), (Some("me"), Some("p@ss")));
        assert_eq!(NatsUrl::parse("nats://tok@h:1").unwrap().token.as_deref(), Some("tok"));
        let u = NatsUrl::parse("tls://h:1").unwrap();
        assert!(u.tls && u.servers == ["tls://h:1"]);
        assert!(NatsUrl::parse("nats://h:1,nope").is_err());
    }

    #[test]
    fn names_round_trip() {
        for n in ["broadcast", "3f9a-0", "a b.c*>%", "ünï"] {
            let e = encode_name(n);
            assert!(!e.contains(['.', ' ', '*', '>']), "{e}");
            assert_eq!(decode_name(&e).unwrap(), n.as_bytes());
        }
    }
}
