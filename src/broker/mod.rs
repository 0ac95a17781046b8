//! Brokers: how gateways and publishers reach each other.
//!
//! A [`Broker`] carries [`Message`]s (a channel name and a payload) from publishers to every
//! subscriber of that channel. Backends: `memory` (an in-process [`Hub`](crate::hub::Hub)),
//! `channel` (a Workerman-compatible channel server, ours or PHP's), `redis` (Redis pub/sub, Redis
//! Cluster sharded pub/sub, Sentinel, on fred) and `nats` (NATS core, on async-nats).
//!
//! The channel protocol is ours to drive: [`link`] connects, resubscribes, confirms publishes and
//! notices dead peers, and [`channel`] only speaks the protocol. Redis and NATS are driven by their
//! maintained client libraries, which own the connections; [`managed`] adds what pushwire promises
//! on top (up only once subscribed, confirmed publishes, settle after a reconnection), and
//! [`redis`] and [`nats`] are thin adapters. Both share [`subscribers`], the in-process fan-out.

pub mod channel;
#[cfg(feature = "nats")]
pub mod jetstream;
pub mod link;
#[cfg(any(feature = "redis", feature = "nats"))]
pub mod managed;
pub mod memory;
#[cfg(feature = "nats")]
pub mod nats;
#[cfg(feature = "nats")]
pub mod nats_queues;
#[cfg(feature = "redis")]
pub mod redis;
pub mod subscribers;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::mpsc;

use crate::io::ListenAddr;

pub use crate::history::Page;
pub use crate::message::{Message, Position};
pub use channel_proto::Keep;

/// Why a broker operation failed.
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    #[error("broker {0} is unreachable")]
    Unavailable(String),
    #[error("broker {0} did not confirm the publish within {1:?}")]
    Timeout(String, Duration),
    #[error("broker {0}: too many publishes waiting for confirmation")]
    Busy(String),
    #[error("subscription refused: {0}")]
    Refused(String),
    #[error("broker {0}: {1}")]
    Config(String, String),
    #[error("broker {0} keeps no history")]
    NoHistory(String),
    #[error("broker {0} keeps no work queues")]
    NoQueues(String),
    #[error("queue {0:?} is full")]
    QueueFull(String),
}

/// How much one work queue on a backend may hold ([`Broker::queue_push`]); a push that would
/// go past either bound is refused.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct QueueBounds {
    pub max_items: usize,
    /// Bytes of the queue's items together (on NATS, of all queues' items: JetStream bounds a
    /// stream's bytes, not a subject's).
    pub max_bytes: usize,
    /// The queue is dropped when nothing was pushed to it for this long (`None`: kept).
    pub idle_ttl: Option<Duration>,
}

/// What a publish came to: its position when kept, or why it was not taken.
pub type Published = Result<Option<Position>, BrokerError>;

/// Names one subscription to its broker, for [`Broker::join`] and [`Broker::leave`].
pub type SubId = u64;

/// A boxed future, as the [`Broker`] methods return.
pub type BrokerFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, BrokerError>> + Send + 'a>>;

/// Messages for one subscriber. Dropping it ends the subscription.
pub struct Subscription {
    pub rx: mpsc::Receiver<Message>,
    pub id: SubId,
    _guard: Option<Box<dyn Send + Sync>>,
}

impl Subscription {
    /// A subscription fed by a link task: `make` wraps its id and new sender into the task's
    /// command, which is queued without waiting on `cmd`.
    fn through<T>(
        cmd: &mpsc::Sender<T>,
        link: &str,
        capacity: usize,
        make: impl FnOnce(SubId, mpsc::Sender<Message>) -> T,
    ) -> Result<Subscription, BrokerError> {
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
        let id = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let (tx, rx) = mpsc::channel(capacity.max(1));
        cmd.try_send(make(id, tx)).map_err(|_| BrokerError::Refused(format!("link to {link} is busy or gone")))?;
        Ok(Subscription { rx, id, _guard: None })
    }

    /// The next message, or `None` once the broker is gone.
    pub async fn recv(&mut self) -> Option<Message> {
        self.rx.recv().await
    }
}

/// Messages buffered for one subscriber before newer ones are dropped (and counted), unless the
/// subscriber asks for another size.
pub const SUBSCRIPTION_CAPACITY: usize = 8192;

/// A publish/subscribe broker.
///
/// Guarantees every backend keeps:
/// - **At most once.** A message reaches each subscriber of its channel at most once; while a
///   link is down, or when a subscriber's buffer ([`SUBSCRIPTION_CAPACITY`]) is full, messages for
///   it are lost, and the loss is counted and logged, never silent.
/// - **Per-publisher order.** Messages one `Broker` value publishes to one channel arrive in the
///   order they were published.
/// - **Confirmed publishes.** `publish` resolves `Ok` only after the broker has taken the message
///   for delivery (for `channel://`, after the server has routed it; for `memory`, at once). While
///   the broker is unreachable it fails at once with [`BrokerError::Unavailable`], so callers can
///   answer 503 instead of losing the message silently.
/// - **Subscriptions survive reconnects.** After a link comes back, every live subscription is
///   renewed before anything else is sent.
pub trait Broker: Send + Sync + 'static {
    /// Publish `data` on `channel`, kept in the channel's history as `keep` says (`None`: not
    /// kept; a channel server decides for itself); its position in that history when kept (the
    /// broker assigns it, once, so two publishers never share one).
    fn publish(&self, channel: &str, data: Bytes, keep: Option<Keep>) -> BrokerFuture<'_, Option<Position>>;
    /// [`Broker::publish`] of each of `messages` (channel, data, keep), sent together and in
    /// their order, each result in its place. One round trip for all where the backend allows.
    fn publish_all(&self, messages: Vec<(String, Bytes, Option<Keep>)>) -> BrokerFuture<'_, Vec<Published>> {
        Box::pin(async move {
            let mut out = Vec::with_capacity(messages.len());
            for (channel, data, keep) in messages {
                out.push(self.publish(&channel, data, keep).await);
            }
            Ok(out)
        })
    }
    /// Messages of `channel` after offset `since`, at most `limit` (see [`Page::reaches`]).
    fn history(&self, channel: &str, since: u64, limit: usize) -> BrokerFuture<'_, Page> {
        let _ = (channel, since, limit);
        Box::pin(std::future::ready(Err(BrokerError::NoHistory(String::new()))))
    }
    /// Subscribe to each of `channels`; messages arrive on the returned subscription, which
    /// buffers [`SUBSCRIPTION_CAPACITY`] of them.
    fn subscribe(&self, channels: Vec<String>) -> Result<Subscription, BrokerError> {
        self.subscribe_with(channels, SUBSCRIPTION_CAPACITY)
    }
    /// [`Broker::subscribe`] with a buffer of `capacity` messages.
    fn subscribe_with(&self, channels: Vec<String>, capacity: usize) -> Result<Subscription, BrokerError>;
    /// Add `channels` to subscription `sub`. Resolves once the broker has them in place, so that
    /// a publish confirmed after that reaches `sub`; while the link is down, at once (they are
    /// renewed with the others when it comes back). The broker is subscribed to a channel only
    /// while some subscription of this process holds it.
    fn join(&self, sub: SubId, channels: Vec<String>) -> BrokerFuture<'_, ()>;
    /// Remove `channels` from subscription `sub`; the broker stops sending a channel once no
    /// subscription of this process holds it.
    fn leave(&self, sub: SubId, channels: Vec<String>) -> BrokerFuture<'_, ()>;
    /// Append `data` to the work queue `queue`, which lives in the backend (it outlives every
    /// process), within `bounds`. Resolves once the backend holds it.
    fn queue_push(&self, queue: &str, data: Bytes, bounds: QueueBounds) -> BrokerFuture<'_, ()> {
        let _ = (queue, data, bounds);
        Box::pin(std::future::ready(Err(BrokerError::NoQueues(String::new()))))
    }
    /// Take the oldest item of the work queue `queue` (pushed with `bounds`), if any: once
    /// taken, no process gets it again.
    fn queue_pop(&self, queue: &str, bounds: QueueBounds) -> BrokerFuture<'_, Option<Bytes>> {
        let _ = (queue, bounds);
        Box::pin(std::future::ready(Err(BrokerError::NoQueues(String::new()))))
    }
    /// Items waiting in the work queue `queue` (pushed with `bounds`).
    fn queue_len(&self, queue: &str, bounds: QueueBounds) -> BrokerFuture<'_, u64> {
        let _ = (queue, bounds);
        Box::pin(std::future::ready(Err(BrokerError::NoQueues(String::new()))))
    }
    /// Whether the broker is reachable right now.
    fn is_connected(&self) -> bool;
    /// Times the link was re-established after a loss.
    fn reconnects(&self) -> u64 {
        0
    }
}

/// Timing of remote broker links.
#[derive(Debug, Clone, Copy)]
pub struct LinkConfig {
    /// First retry delay after a failure; doubles up to `max_backoff`.
    pub min_backoff: Duration,
    pub max_backoff: Duration,
    /// How long one connection attempt may take.
    pub connect_timeout: Duration,
    /// How often an idle link checks that the broker still answers.
    pub probe_interval: Duration,
    /// A link whose oldest unconfirmed publish or probe is older than this is dead. Longer than a
    /// short network outage, which TCP rides out by retransmitting, so that one needs no reconnect.
    pub ack_timeout: Duration,
    /// How long `publish` waits for the broker's confirmation before failing.
    pub publish_timeout: Duration,
    /// Publishes awaiting confirmation before new ones wait.
    pub max_in_flight: usize,
    /// After a link managed by a client library comes back from a loss, publishes wait this long,
    /// so that other nodes that lost the broker too have resubscribed (longer than
    /// `max_backoff`).
    pub settle: Duration,
}

impl Default for LinkConfig {
    fn default() -> Self {
        LinkConfig {
            min_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(2),
            connect_timeout: Duration::from_secs(3),
            probe_interval: Duration::from_secs(1),
            ack_timeout: Duration::from_secs(10),
            publish_timeout: Duration::from_secs(3),
            max_in_flight: 4096,
            settle: Duration::from_secs(3),
        }
    }
}

/// What `--broker` names.
#[derive(Debug, Clone, PartialEq)]
pub enum BrokerUrl {
    /// In-process (`standalone`).
    Memory,
    /// A channel server over TCP or a Unix socket, with an optional secret; with several
    /// addresses (`channel://A,B,C`), the link moves to the next one when one is lost.
    Channel { addrs: Vec<ListenAddr>, secret: Option<String> },
    /// A Redis server, Sentinel group or Cluster.
    #[cfg(feature = "redis")]
    Redis(redis::RedisUrl),
    /// One or more servers of a NATS cluster.
    #[cfg(feature = "nats")]
    Nats(nats::NatsUrl),
}

/// The URL schemes of the Redis backend.
macro_rules! REDIS_SCHEMES {
    () => {
        "redis" | "rediss" | "redis-cluster" | "rediss-cluster" | "redis-sentinel" | "rediss-sentinel"
    };
}

/// The prefix put before channel names on a broker when none is configured: none on `channel://`
/// and `memory` (so PHP nodes see the seed's names), `pushwire.` on Redis and NATS.
pub const DEFAULT_PREFIX: &str = "pushwire.";

impl std::str::FromStr for BrokerUrl {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if s == "memory" {
            return Ok(BrokerUrl::Memory);
        }
        if let Some(path) = s.strip_prefix("channel+unix://") {
            if path.is_empty() {
                return Err(format!("{s:?}: channel+unix:// needs a socket path"));
            }
            return Ok(BrokerUrl::Channel { addrs: vec![ListenAddr::Unix(path.into())], secret: None });
        }
        let rest = match s.split_once("://") {
            Some(("channel", rest)) => rest,
            #[cfg(feature = "redis")]
            Some((REDIS_SCHEMES!(), _)) => return redis::RedisUrl::parse(s).map(BrokerUrl::Redis),
            #[cfg(feature = "nats")]
            Some(("nats" | "tls", _)) => return nats::NatsUrl::parse(s).map(BrokerUrl::Nats),
            #[allow(unreachable_patterns)] // reached only when a backend feature is off
            Some((scheme @ (REDIS_SCHEMES!() | "nats" | "tls"), _)) => {
                return Err(format!("{s:?}: this pushwire was built without the backend for {scheme}://"))
            }
            Some((scheme, _)) => {
                return Err(format!(
                    "{s:?}: unknown broker scheme {scheme:?} (use channel://, channel+unix://, redis://, rediss://, \
                     redis-cluster://, redis-sentinel://, nats://, tls:// or memory)"
                ))
            }
            None => s,
        };
        let (secret, hostport) = match rest.rsplit_once('@') {
            Some((userinfo, hp)) => (Some(userinfo.strip_prefix(':').unwrap_or(userinfo).to_owned()), hp),
            None => (None, rest),
        };
        let hostports = hostport.trim_end_matches('/').split(',');
        let addrs = hostports.map(|h| h.parse().map_err(|e| format!("{s:?}: {e}"))).collect::<Result<_, _>>()?;
        Ok(BrokerUrl::Channel { addrs, secret: secret.filter(|s| !s.is_empty()) })
    }
}

impl std::fmt::Display for BrokerUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BrokerUrl::Memory => f.write_str("memory"),
            BrokerUrl::Channel { addrs, .. } => match &addrs[..] {
                [ListenAddr::Unix(p)] => write!(f, "channel+unix://{}", p.display()),
                _ => {
                    let hosts: Vec<String> = addrs.iter().map(ToString::to_string).collect();
                    write!(f, "channel://{}", hosts.join(","))
                }
            },
            #[cfg(feature = "redis")]
            BrokerUrl::Redis(u) => f.write_str(&u.display),
            #[cfg(feature = "nats")]
            BrokerUrl::Nats(u) => f.write_str(&u.servers.join(",")),
        }
    }
}

/// How a node reaches its broker, beyond the URL.
#[derive(Debug, Clone, Default)]
pub struct BrokerOptions {
    /// Before every channel name on the broker (`None`: [`DEFAULT_PREFIX`] on Redis and NATS,
    /// nothing elsewhere).
    pub prefix: Option<String>,
    /// PEM file of certificate authorities to trust for TLS to the broker (`rediss://`, `tls://`),
    /// instead of the system's.
    pub ca: Option<std::path::PathBuf>,
    /// NATS credentials file (JWT and nkey seed).
    pub nats_creds: Option<std::path::PathBuf>,
    /// File holding a NATS user nkey seed (`SU...`), for servers that authenticate by nkey.
    pub nats_nkey: Option<std::path::PathBuf>,
    /// A gateway's broker (on NATS, it leaves a server in lame-duck mode after publishers do).
    pub gateway: bool,
    /// The bounds of the NATS JetStream history stream this node makes when its publishes keep
    /// history (other backends take the bounds from each publish).
    pub history: crate::history::HistoryConfig,
}

/// Open a broker for `url`; links start in the background and connect (and reconnect) by
/// themselves. `memory` is a hub of its own here; `standalone` builds its
/// [`MemoryBroker`](memory::MemoryBroker) on the hub it shares with its channel server.
#[allow(unused_variables)] // `opts` is unused when no backend with TLS is compiled in
pub async fn open(url: &BrokerUrl, opts: &BrokerOptions, cfg: LinkConfig) -> Result<Arc<dyn Broker>, BrokerError> {
    let name = url.to_string();
    let prefix = opts.prefix.as_deref();
    Ok(match url {
        BrokerUrl::Memory => Arc::new(memory::MemoryBroker::new(Arc::default(), prefix.unwrap_or_default())),
        BrokerUrl::Channel { addrs, secret } => {
            let t = channel::ChannelTransport::new(addrs.clone(), secret.clone(), prefix.unwrap_or_default());
            link::Link::spawn(t, cfg, name)
        }
        #[cfg(feature = "redis")]
        BrokerUrl::Redis(u) => {
            let tls =
                opts.ca.as_deref().map(rustls_with_ca).transpose().map_err(|e| BrokerError::Config(name.clone(), e))?;
            let prefix = prefix.unwrap_or(DEFAULT_PREFIX).to_owned();
            let (client, events) =
                redis::open(u, prefix, tls, &cfg).map_err(|e| BrokerError::Config(name.clone(), e))?;
            managed::Managed::spawn(client, events, cfg, name)
        }
        #[cfg(feature = "nats")]
        BrokerUrl::Nats(u) => {
            let nats_opts = nats::NatsOptions {
                ca: opts.ca.clone(),
                creds: opts.nats_creds.clone(),
                nkey: opts.nats_nkey.clone(),
                leave_late: opts.gateway,
            };
            let prefix = prefix.unwrap_or(DEFAULT_PREFIX).to_owned();
            let (client, events) = nats::open(u, prefix, &nats_opts, &cfg, opts.history)
                .await
                .map_err(|e| BrokerError::Config(name.clone(), e))?;
            managed::Managed::spawn(client, events, cfg, name)
        }
    })
}

/// A TLS client configuration that trusts the certificate authorities in the PEM file `ca`.
#[cfg(feature = "redis")]
fn rustls_with_ca(ca: &std::path::Path) -> Result<rustls::ClientConfig, String> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::CertificateDer;
    let mut roots = rustls::RootCertStore::empty();
    let certs = CertificateDer::pem_file_iter(ca).map_err(|e| format!("{}: {e}", ca.display()))?;
    for cert in certs {
        let cert = cert.map_err(|e| format!("{}: {e}", ca.display()))?;
        roots.add(cert).map_err(|e| format!("{}: {e}", ca.display()))?;
    }
    Ok(rustls::ClientConfig::builder().with_root_certificates(roots).with_no_client_auth())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        let tcp = |a: &str, s: Option<&str>| BrokerUrl::Channel {
            addrs: a.split(',').map(|a| ListenAddr::Tcp(a.into())).collect(),
            secret: s.map(Into::into),
        };
        assert_eq!("memory".parse(), Ok(BrokerUrl::Memory));
        assert_eq!("channel://127.0.0.1:2206".parse(), Ok(tcp("127.0.0.1:2206", None)));
        assert_eq!("10.0.0.1:2206".parse(), Ok(tcp("10.0.0.1:2206", None)));
        assert_eq!("channel://:s3cret@h:2206".parse(), Ok(tcp("h:2206", Some("s3cret"))));
        assert_eq!(
            "channel+unix:///tmp/c.sock".parse(),
            Ok(BrokerUrl::Channel { addrs: vec![ListenAddr::Unix("/tmp/c.sock".into())], secret: None })
        );
        let list = "channel://:s@10.0.0.1:2206,10.0.0.2:2206,10.0.0.3:2206".parse::<BrokerUrl>();
        assert_eq!(list, Ok(tcp("10.0.0.1:2206,10.0.0.2:2206,10.0.0.3:2206", Some("s"))));
        assert_eq!(list.unwrap().to_string(), "channel://10.0.0.1:2206,10.0.0.2:2206,10.0.0.3:2206");
        assert!("kafka://x:1".parse::<BrokerUrl>().unwrap_err().contains("unknown broker scheme"));
        assert!("channel://nohost".parse::<BrokerUrl>().is_err());
    }
}
