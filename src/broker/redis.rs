//! The Redis backend on [fred](https://docs.rs/fred): `redis://`, `rediss://` (TLS),
//! `redis-sentinel://` and `redis-cluster://`, a thin adapter under [`managed`](super::managed).
//!
//! Two clients, because a subscribed Redis connection (RESP2) takes no `PUBLISH`: one subscribes,
//! one publishes. `PUBLISH` is confirmed by its reply. On a cluster, sharded pub/sub
//! (`SSUBSCRIBE`/`SPUBLISH`) keeps each message on the shard that owns its channel's slot instead
//! of flooding every node; fred routes by slot and follows `MOVED`, failover and topology changes,
//! and every reconnection or topology change renews the subscriptions. Pub/sub is global to a
//! server (the `/DB` of a URL does not scope it), so names carry the configured prefix.
//!
//! **History.** A publish that is kept ([`Keep`]: how many of the channel's messages, for how
//! long) is one Lua script: it counts the channel's offset up (`HINCRBY` on `{NAME}.m`, which also holds the
//! epoch, drawn when the channel's history starts), appends to the stream `{NAME}.s` with the
//! offset as the entry id (`XADD ... MAXLEN size`), renews both keys' expiry, and publishes the
//! message with its position in front. Offset assignment, storage and delivery are one atomic
//! step, so two publishers never share an offset and a reader merging history with live
//! messages finds the seam. The keys carry `{NAME}` as their hash tag: on a cluster they live in
//! the slot of the sharded channel `NAME` that the script also publishes on.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use fred::prelude::{ClientLike, Config, EventInterface, PubsubInterface, ReconnectPolicy, ServerConfig, TlsConnector};
use tokio::sync::broadcast::error::RecvError;
use tokio::sync::mpsc;

use super::managed::{Client, ClientFuture, Event, EVENT_QUEUE};
use super::{Keep, LinkConfig, Message, Page, Position, QueueBounds};

/// Publish with history: KEYS stream, meta; ARGV channel, data, size, ttl ms, meta ttl ms, a new
/// epoch (used only when the channel has none), sharded (1) or not. Returns {offset, epoch}.
const PUBLISH: &str = r#"
local epoch = redis.call('hget', KEYS[2], 'e')
if not epoch then
  epoch = ARGV[6]
  redis.call('del', KEYS[1])
  redis.call('hset', KEYS[2], 'e', epoch)
end
local offset = redis.call('hincrby', KEYS[2], 'o', 1)
redis.call('xadd', KEYS[1], 'MAXLEN', ARGV[3], offset .. '-0', 'd', ARGV[2])
redis.call('pexpire', KEYS[1], ARGV[4])
redis.call('pexpire', KEYS[2], ARGV[5])
local message = '\0' .. offset .. ':' .. epoch .. '\n' .. ARGV[2]
if ARGV[7] == '1' then
  redis.call('spublish', ARGV[1], message)
else
  redis.call('publish', ARGV[1], message)
end
return {offset, epoch}
"#;

/// Read history: KEYS stream, meta; ARGV since, limit. Returns {epoch, offset, first, entries}.
const HISTORY: &str = r#"
local meta = redis.call('hmget', KEYS[2], 'e', 'o')
if not meta[1] then
  return {'', 0, 1, {}}
end
local offset = tonumber(meta[2])
local first = offset + 1
local oldest = redis.call('xrange', KEYS[1], '-', '+', 'COUNT', 1)
if #oldest > 0 then
  first = tonumber(string.match(oldest[1][1], '^(%d+)'))
end
local entries = redis.call('xrange', KEYS[1], '(' .. ARGV[1] .. '-0', '+', 'COUNT', ARGV[2])
return {meta[1], offset, first, entries}
"#;

/// Append to a work queue: KEYS list, byte count; ARGV item, max items, max bytes, idle ttl ms
/// (0: none). Returns 1, or 0 when the queue is full.
const QUEUE_PUSH: &str = r#"
local n = redis.call('llen', KEYS[1])
local bytes = 0
if n > 0 then bytes = tonumber(redis.call('get', KEYS[2]) or '0') end
if n >= tonumber(ARGV[2]) or bytes + #ARGV[1] > tonumber(ARGV[3]) then
  return 0
end
redis.call('rpush', KEYS[1], ARGV[1])
redis.call('set', KEYS[2], bytes + #ARGV[1])
if ARGV[4] ~= '0' then
  redis.call('pexpire', KEYS[1], ARGV[4])
  redis.call('pexpire', KEYS[2], ARGV[4])
end
return 1
"#;

/// Take a work queue's oldest item: KEYS list, byte count. Returns the item or nil.
const QUEUE_POP: &str = r#"
local item = redis.call('lpop', KEYS[1])
if not item then
  return false
end
if redis.call('llen', KEYS[1]) == 0 then
  redis.call('del', KEYS[2])
else
  redis.call('decrby', KEYS[2], #item)
end
return item
"#;

/// How long a channel's offset and epoch outlive its last message: a client that saw everything
/// of a quiet channel still recovers (with nothing to deliver) within this time.
const META_TTL: Duration = Duration::from_secs(24 * 3600);
/// Longest a publish is kept.
const MAX_TTL: Duration = Duration::from_secs(30 * 24 * 3600);

/// Run `script` by its SHA-1, sending it (`EVAL`) when the server does not have it yet. A raw
/// command, so that it keeps the client's options (fail at once while disconnected) and is routed
/// by its first key's slot.
async fn run_script<C: ClientLike>(
    client: &C,
    script: &str,
    keys: Vec<String>,
    args: Vec<fred::types::Value>,
) -> Result<fred::types::Value, String> {
    use fred::types::{ClusterHash, CustomCommand, Value};
    use sha1::Digest as _;
    let sha: String = sha1::Sha1::digest(script.as_bytes()).iter().map(|b| format!("{b:02x}")).collect();
    let call = |cmd: &'static str, body: String| {
        let mut all: Vec<Value> = vec![body.into(), (keys.len() as i64).into()];
        all.extend(keys.iter().map(|k| Value::from(k.as_str())));
        all.extend(args.iter().cloned());
        let slot = ClusterHash::Custom(fred::util::redis_keyslot(keys.first().map_or(&b""[..], |k| k.as_bytes())));
        client.custom::<Value, Value>(CustomCommand::new_static(cmd, slot, false), all)
    };
    match call("EVALSHA", sha).await {
        Err(e) if e.details().starts_with("NOSCRIPT") => call("EVAL", script.to_owned()).await,
        r => r,
    }
    .map_err(|e| e.to_string())
}

/// The position a history publish put in front of its message, and the message.
fn split_position(data: Bytes) -> (Option<Position>, Bytes) {
    if data.first() != Some(&0) {
        return (None, data);
    }
    let Some(nl) = data.iter().position(|&b| b == b'\n') else { return (None, data) };
    let head = std::str::from_utf8(&data[1..nl]).ok().and_then(|h| h.split_once(':'));
    match head.and_then(|(o, e)| Some((o.parse().ok()?, e))) {
        Some((offset, epoch)) => (Some(Position { offset, epoch: epoch.into() }), data.slice(nl + 1..)),
        None => (None, data),
    }
}

/// Where and how to reach Redis: a URL as fred reads it, plus what pushwire adds.
#[derive(Debug, Clone, PartialEq)]
pub struct RedisUrl {
    /// The URL as given, with any password hidden: how logs name the broker.
    pub display: String,
    config: Config,
}

impl RedisUrl {
    /// Parse `redis://[[USER]:PASS@]HOST:PORT[/DB]`, `rediss://...` (TLS),
    /// `redis-sentinel://...?sentinelServiceName=NAME`, or `redis-cluster://HOST:PORT[,HOST:PORT...]`
    /// (`rediss-cluster://` with TLS). Passwords may be percent-encoded.
    pub fn parse(url: &str) -> Result<RedisUrl, String> {
        let (scheme, rest) = url.split_once("://").ok_or_else(|| format!("{url:?} is not a Redis URL"))?;
        let (authority, query) = rest.split_once('?').unwrap_or((rest, ""));
        let (auth, hosts) = authority.rsplit_once('@').map_or(("", authority), |(a, h)| (a, h));
        let hosts = hosts.split('/').next().unwrap_or_default();
        // A cluster's seed nodes as a comma-separated list: fred takes the first as the host and
        // the others as `node=` parameters.
        let normalized = match scheme.ends_with("-cluster") {
            true => {
                let mut nodes = hosts.split(',').map(str::trim);
                let first = nodes.next().unwrap_or_default();
                let params: Vec<String> =
                    nodes.map(|n| format!("node={n}")).chain((!query.is_empty()).then(|| query.to_owned())).collect();
                let at = if auth.is_empty() { "" } else { "@" };
                format!("{scheme}://{auth}{at}{first}?{}", params.join("&"))
            }
            false => url.to_owned(),
        };
        if hosts
            .split(',')
            .any(|hp| hp.trim().rsplit_once(':').is_none_or(|(h, p)| h.is_empty() || p.parse::<u16>().is_err()))
        {
            return Err(format!("{}: expected HOST:PORT", hide_password(url)));
        }
        let config = Config::from_url(&normalized).map_err(|e| format!("{}: {e}", hide_password(url)))?;
        Ok(RedisUrl { display: hide_password(url), config })
    }

    fn clustered(&self) -> bool {
        matches!(self.config.server, ServerConfig::Clustered { .. })
    }
}

/// `url` with the password of its user info replaced by `***`.
fn hide_password(url: &str) -> String {
    match (url.split_once("://"), url.rfind('@')) {
        (Some((scheme, rest)), Some(_)) => {
            let (userinfo, host) = rest.rsplit_once('@').unwrap_or(("", rest));
            let user = userinfo.split_once(':').map_or("", |(u, _)| u);
            format!("{scheme}://{user}:***@{host}")
        }
        _ => url.to_owned(),
    }
}

/// A Redis deployment seen as a [`Client`].
pub struct Redis {
    /// Publishes fail when the connection is down or drops under them, instead of waiting to be
    /// sent again after a reconnection (when a gateway may not have resubscribed yet).
    publisher: fred::clients::WithOptions<fred::clients::Client>,
    subscriber: fred::clients::Client,
    prefix: String,
    clustered: bool,
}

/// Build the two clients, start connecting (fred retries with backoff by itself), and forward
/// their messages and connection events to `events`.
pub fn open(
    url: &RedisUrl,
    prefix: String,
    tls: Option<rustls::ClientConfig>,
    cfg: &LinkConfig,
) -> Result<(Arc<Redis>, mpsc::Receiver<Event>), String> {
    let mut config = url.config.clone();
    if let Some(tls) = tls {
        config.tls = Some(TlsConnector::from(tls).into());
    }
    let build = || {
        let mut b = fred::types::Builder::from_config(config.clone());
        let (connect, probe, dead) = (cfg.connect_timeout, cfg.probe_interval, cfg.ack_timeout);
        b.with_connection_config(|c| {
            c.connection_timeout = connect;
            c.internal_command_timeout = connect;
            c.unresponsive.max_timeout = Some(dead);
            c.unresponsive.interval = probe;
            c.max_command_buffer_len = cfg.max_in_flight;
            // Each confirmation is waited for: no Nagle delay on small pipelined commands.
            c.tcp.nodelay = Some(true);
        });
        b.with_performance_config(|p| p.broadcast_channel_capacity = EVENT_QUEUE);
        let (min, max) = (cfg.min_backoff.as_millis() as u32, cfg.max_backoff.as_millis() as u32);
        b.set_policy(ReconnectPolicy::new_exponential(0, min.max(1), max.max(1), 2));
        b.build().map_err(|e| format!("{}: {e}", url.display))
    };
    let (publisher, subscriber) = (build()?, build()?);
    let (tx, events) = mpsc::channel(EVENT_QUEUE);
    for client in [&publisher, &subscriber] {
        let mut reconnects = client.reconnect_rx();
        let mut changes = client.cluster_change_rx();
        let mut errors = client.error_rx();
        let tx = tx.clone();
        tokio::spawn(async move {
            loop {
                let event = tokio::select! {
                    r = reconnects.recv() => match r {
                        Ok(_) | Err(RecvError::Lagged(_)) => Event::Connected,
                        Err(_) => return,
                    },
                    // Slots moved: sharded subscriptions may have been dropped by the server.
                    r = changes.recv() => match r {
                        Ok(_) | Err(RecvError::Lagged(_)) => Event::Connected,
                        Err(_) => return,
                    },
                    r = errors.recv() => match r {
                        Ok((e, server)) => Event::Disconnected(match server {
                            Some(s) => format!("{s}: {e}"),
                            None => e.to_string(),
                        }),
                        Err(RecvError::Lagged(_)) => continue,
                        Err(_) => return,
                    },
                };
                if tx.send(event).await.is_err() {
                    return;
                }
            }
        });
        client.connect();
    }
    let mut messages = subscriber.message_rx();
    let strip = prefix.clone();
    tokio::spawn(async move {
        loop {
            let event = match messages.recv().await {
                Ok(m) => {
                    let Some(local) = m.channel.strip_prefix(strip.as_str()) else { continue };
                    let Some(data) = payload(&m.value) else { continue };
                    let (position, data) = split_position(data);
                    Event::Message(Message { channel: Bytes::copy_from_slice(local.as_bytes()), data, position })
                }
                Err(RecvError::Lagged(n)) => Event::Lost(n),
                Err(_) => return,
            };
            if tx.send(event).await.is_err() {
                return;
            }
        }
    });
    let once = fred::types::config::Options { fail_fast: true, max_attempts: Some(1), ..Default::default() };
    let publisher = publisher.with_options(&once);
    Ok((Arc::new(Redis { publisher, subscriber, prefix, clustered: url.clustered() }), events))
}

impl Redis {
    /// Channel names as they are on the server.
    fn names(&self, channels: &[String]) -> Vec<String> {
        channels.iter().map(|c| format!("{}{c}", self.prefix)).collect()
    }

    /// The list and byte-count keys of work queue `queue`.
    fn queue_keys(&self, queue: &str) -> Vec<String> {
        let tag = format!("{{{}q.{queue}}}", self.prefix);
        vec![format!("{tag}.l"), format!("{tag}.b")]
    }

    /// The stream and meta keys of channel `name` (as on the server).
    fn history_keys(name: &str) -> Vec<String> {
        vec![format!("{{{name}}}.s"), format!("{{{name}}}.m")]
    }
}

/// The bytes of a Redis string reply (shared, not copied).
fn payload(v: &fred::types::Value) -> Option<Bytes> {
    match v {
        fred::types::Value::Bytes(b) => Some(b.clone()),
        fred::types::Value::String(s) => Some(s.inner().clone()),
        _ => None,
    }
}

/// A Redis integer or the digits of a string, as a number.
fn number(v: &fred::types::Value) -> Option<u64> {
    match v {
        fred::types::Value::Integer(i) => u64::try_from(*i).ok(),
        other => other.as_str()?.parse().ok(),
    }
}

impl Client for Redis {
    fn publish(&self, channel: &str, data: Bytes, keep: Option<Keep>) -> ClientFuture<'_, Option<Position>> {
        let name = format!("{}{channel}", self.prefix);
        if let Some(k) = keep.filter(|k| k.size > 0 && k.ttl_ms > 0) {
            return Box::pin(async move {
                let size = k.size.min(i64::MAX as u64) as i64;
                let ttl = Duration::from_millis(k.ttl_ms).min(MAX_TTL);
                let args: Vec<fred::types::Value> = vec![
                    name.clone().into(),
                    data.into(),
                    size.into(),
                    (ttl.as_millis() as i64).into(),
                    (META_TTL.max(ttl).as_millis() as i64).into(),
                    crate::io::random_hex(4).into(),
                    (if self.clustered { "1" } else { "0" }).into(),
                ];
                let r = run_script(&self.publisher, PUBLISH, Redis::history_keys(&name), args).await?;
                let fred::types::Value::Array(parts) = r else { return Err(format!("unexpected answer {r:?}")) };
                let offset = parts.first().and_then(number).ok_or("no offset in the answer")?;
                let epoch = parts.get(1).and_then(|e| e.as_str().map(|e| e.to_string())).ok_or("no epoch")?;
                Ok(Some(Position { offset, epoch: epoch.into() }))
            });
        }
        Box::pin(async move {
            let receivers: Result<i64, _> = if self.clustered {
                self.publisher.spublish(name, data).await
            } else {
                self.publisher.publish(name, data).await
            };
            receivers.map(|_| None).map_err(|e| e.to_string())
        })
    }

    fn history(&self, channel: &str, since: u64, limit: usize) -> ClientFuture<'_, Option<Page>> {
        let name = format!("{}{channel}", self.prefix);
        Box::pin(async move {
            let args: Vec<fred::types::Value> = vec![(since as i64).into(), (limit as i64).into()];
            let r = run_script(&self.publisher, HISTORY, Redis::history_keys(&name), args).await?;
            let bad = || format!("unexpected history answer {r:?}");
            let fred::types::Value::Array(parts) = &r else { return Err(bad()) };
            let [epoch, offset, first, entries] = &parts[..] else { return Err(bad()) };
            let mut page = Page {
                epoch: epoch.as_str().map(|e| e.to_string()).unwrap_or_default(),
                offset: number(offset).ok_or_else(bad)?,
                first: number(first).ok_or_else(bad)?,
                items: Vec::new(),
            };
            use fred::types::Value;
            let Value::Array(entries) = entries else { return Err(bad()) };
            for entry in entries {
                // [id "N-0", [field "d", value]]
                let Value::Array(entry) = entry else { return Err(bad()) };
                let [id, Value::Array(fields)] = &entry[..] else { return Err(bad()) };
                let offset = id.as_str().and_then(|i| i.split('-').next()?.parse().ok()).ok_or_else(bad)?;
                let data = fields.get(1).and_then(payload).ok_or_else(bad)?;
                page.items.push((offset, data));
            }
            Ok(Some(page))
        })
    }

    fn queue_push(&self, queue: &str, data: Bytes, bounds: QueueBounds) -> ClientFuture<'_, bool> {
        let keys = self.queue_keys(queue);
        Box::pin(async move {
            let ttl = bounds.idle_ttl.map_or(0, |t| t.as_millis().max(1) as i64);
            let args: Vec<fred::types::Value> = vec![
                data.into(),
                (bounds.max_items.min(i64::MAX as usize) as i64).into(),
                (bounds.max_bytes.min(i64::MAX as usize) as i64).into(),
                ttl.into(),
            ];
            let r = run_script(&self.publisher, QUEUE_PUSH, keys, args).await?;
            Ok(number(&r) == Some(1))
        })
    }

    fn queue_pop(&self, queue: &str, _: QueueBounds) -> ClientFuture<'_, Option<Bytes>> {
        let keys = self.queue_keys(queue);
        Box::pin(async move { Ok(payload(&run_script(&self.publisher, QUEUE_POP, keys, Vec::new()).await?)) })
    }

    fn queue_len(&self, queue: &str, _: QueueBounds) -> ClientFuture<'_, u64> {
        let keys = self.queue_keys(queue);
        Box::pin(async move {
            let r = run_script(&self.publisher, "return redis.call('llen', KEYS[1])", keys, Vec::new()).await?;
            number(&r).ok_or_else(|| format!("unexpected answer {r:?}"))
        })
    }

    fn subscribe(&self, channels: Vec<String>) -> ClientFuture<'_> {
        Box::pin(async move {
            if channels.is_empty() {
                // Nothing to subscribe: a round trip proves the server answers.
                return self.publisher.ping::<()>(None).await.map_err(|e| e.to_string());
            }
            let names = self.names(&channels);
            if self.clustered {
                // One command per channel: a sharded subscription names channels of one slot.
                for n in names {
                    self.subscriber.ssubscribe(n).await.map_err(|e| e.to_string())?;
                }
                Ok(())
            } else {
                // fred resolves a SUBSCRIBE once written, not once Redis has it in place: a PING
                // on the same connection is answered after it.
                self.subscriber.subscribe(names).await.map_err(|e| e.to_string())?;
                self.subscriber.ping::<()>(None).await.map_err(|e| e.to_string())
            }
        })
    }

    fn unsubscribe(&self, channels: Vec<String>) -> ClientFuture<'_> {
        Box::pin(async move {
            let names = self.names(&channels);
            let r = if self.clustered {
                self.subscriber.sunsubscribe(names).await
            } else {
                self.subscriber.unsubscribe(names).await
            };
            r.map_err(|e| e.to_string())
        })
    }

    fn connected(&self) -> bool {
        self.publisher.is_connected() && self.subscriber.is_connected()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        let u = RedisUrl::parse("redis://127.0.0.1:6379").unwrap();
        assert!(!u.clustered());
        let u = RedisUrl::parse("redis://:p%40ss@h:1/3").unwrap();
        assert_eq!((u.config.password.as_deref(), u.config.database), (Some("p@ss"), Some(3)), "percent-decoded");
        assert_eq!(u.display, "redis://:***@h:1/3");
        let u = RedisUrl::parse("redis-cluster://127.0.0.1:7000,127.0.0.1:7001, 127.0.0.1:7002").unwrap();
        assert!(u.clustered());
        let ServerConfig::Clustered { hosts, .. } = &u.config.server else { panic!("clustered") };
        assert_eq!(hosts.len(), 3);
        assert!(RedisUrl::parse("redis://h:notaport").is_err());
        assert!(RedisUrl::parse("redis://h").is_err(), "a port is required");
        assert!(RedisUrl::parse("redis://:pw@h").is_err(), "a port is required, with a password too");
        let u = RedisUrl::parse("redis-cluster://me:pw@127.0.0.1:7000,127.0.0.1:7001").unwrap();
        assert_eq!((u.config.username.as_deref(), u.config.password.as_deref()), (Some("me"), Some("pw")));
    }
}
