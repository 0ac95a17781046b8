//! The Pusher Channels protocol (version 7), for the apps a gateway serves: a client connects to
//! `/app/KEY`, gets `pusher:connection_established` with its `socket_id`, and subscribes to
//! channels; events come to it as one JSON text message each, made once by whoever published
//! them and shared by every subscriber on a worker.
//!
//! On the engine: an app's channel `C` is the broker channel `pusher:APP:C` (apps, and the native
//! protocol's channels, never meet); a subscription is a join of that channel; a published event
//! is the broker payload `EXCLUDE\nEVENT` as a PHP string (what a channel server carries), where
//! `EXCLUDE` is the `socket_id` that must not get it (or nothing) and `EVENT` the JSON its
//! subscribers get; a `cache-` channel keeps its last event (history of one, for 30 minutes).
//!
//! Parts: [`app`] (apps and their settings), [`sign`] (signatures), [`channel`] (names and
//! kinds), [`session`] (one connection), [`hooks`] (webhooks), [`count`] (subscription counts),
//! [`watchlist`] (watchlist events).

pub mod app;
pub mod channel;
pub mod count;
pub mod hooks;
pub mod session;
pub mod sign;
pub mod watchlist;

use bytes::Bytes;

pub use app::{App, Apps};
pub use session::Session;

use super::{BoxFuture, Encoding, Engine, Held, Protocol};
use crate::history::Keep;

/// The start of every broker channel of the Pusher protocol.
pub const NAMESPACE: &str = "pusher:";

/// The broker channel of the sockets signed in as `user` in app `app` (`#server-to-user-USER`).
pub fn user_channel(app: &str, user: &str) -> String {
    broker_channel(app, &format!("{}{user}", channel::USER_PREFIX))
}

/// The broker channel of app `app`'s channel `channel`.
pub fn broker_channel(app: &str, channel: &str) -> String {
    format!("{NAMESPACE}{app}:{channel}")
}

/// The app and channel of a broker channel made by [`broker_channel`].
pub fn app_channel(broker_channel: &str) -> Option<(&str, &str)> {
    broker_channel.strip_prefix(NAMESPACE)?.split_once(':')
}

/// How long a cache channel's last event is kept.
pub const CACHE_TTL_MS: u64 = 30 * 60 * 1000;

/// How a publish on `channel` is kept: a cache channel keeps its last event.
pub fn keep(channel: &str) -> Option<Keep> {
    channel::Kind::of(channel).cache.then_some(Keep { size: 1, ttl_ms: CACHE_TTL_MS })
}

/// The number of worker `worker` in its connections' `socket_id`s: a hash of its id, which is
/// unique in the cluster (at most 2^53, a number JavaScript holds exactly).
pub fn worker_number(worker: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in worker.bytes() {
        h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
    }
    h & ((1 << 53) - 1)
}

/// The `socket_id` of connection `id` of worker `worker`.
pub fn socket_id(worker: &str, id: u64) -> String {
    format!("{}.{id}", worker_number(worker))
}

/// Whether `s` has the form of a `socket_id` (`\d+\.\d+`).
pub fn is_socket_id(s: &str) -> bool {
    let digits = |p: &str| !p.is_empty() && p.len() <= 20 && p.bytes().all(|b| b.is_ascii_digit());
    s.split_once('.').is_some_and(|(w, c)| digits(w) && digits(c))
}

/// The broker payload of `event` (its JSON, as subscribers get it), not for `exclude`.
pub fn payload(exclude: Option<&str>, event: &[u8]) -> Bytes {
    let exclude = exclude.unwrap_or_default();
    let len = exclude.len() + 1 + event.len();
    let mut out = Vec::with_capacity(len + 16);
    out.extend_from_slice(format!("s:{len}:\"").as_bytes());
    out.extend_from_slice(exclude.as_bytes());
    out.push(b'\n');
    out.extend_from_slice(event);
    out.extend_from_slice(b"\";");
    out.into()
}

/// A socket as (worker number, connection id).
pub type Socket = (u64, u64);

/// What a payload that closes the sockets of a user's channel says instead of an event's
/// exclusion (`terminate_connections`).
const TERMINATE: &str = "!terminate";

/// The broker payload that closes every socket signed in as the user whose channel it goes to.
pub fn terminate_payload() -> Bytes {
    payload(Some(TERMINATE), b"")
}

/// Whether `data` is a [`terminate_payload`].
pub fn is_terminate(data: &[u8]) -> bool {
    data == &terminate_payload()[..]
}

/// Read a broker payload made by [`payload`]: the excluded socket, and the event.
pub fn read_payload(data: &[u8]) -> Option<(Option<Socket>, &[u8])> {
    let rest = data.strip_prefix(b"s:")?;
    let colon = rest.iter().position(|&b| b == b':')?;
    let len: usize = std::str::from_utf8(&rest[..colon]).ok()?.parse().ok()?;
    let body = rest[colon + 1..].strip_prefix(b"\"")?;
    if body.len() != len + 2 || &body[len..] != b"\";" {
        return None;
    }
    let data = &body[..len];
    let nl = data.iter().position(|&b| b == b'\n')?;
    let (exclude, event) = (std::str::from_utf8(&data[..nl]).ok()?, &data[nl + 1..]);
    let socket = exclude.split_once('.').and_then(|(w, c)| Some((w.parse().ok()?, c.parse().ok()?)));
    Some((socket, event))
}

/// An event as subscribers get it: `{"event":E,"channel":C,"data":D}`, where `data` is the JSON
/// value given (a string, for events from the HTTP API), plus the sender's `user_id` on presence
/// channels.
pub fn event_json(event: &str, channel: &str, data: &serde_json::value::RawValue, user_id: Option<&str>) -> Vec<u8> {
    #[derive(serde::Serialize)]
    struct Event<'a> {
        event: &'a str,
        channel: &'a str,
        data: &'a serde_json::value::RawValue,
        #[serde(skip_serializing_if = "Option::is_none")]
        user_id: Option<&'a str>,
    }
    serde_json::to_vec(&Event { event, channel, data, user_id }).unwrap_or_default()
}

/// The Pusher protocol; see the module documentation.
pub struct Pusher;

impl Protocol for Pusher {
    const READS: bool = true;
    const HELD: Held = Held::Joiner(Encoding::Pusher);
    type Session = Box<Session>;

    fn welcome(session: &mut Self::Session, engine: &mut dyn Engine) {
        session.welcome(engine)
    }

    fn on_close<'a>(session: &'a mut Self::Session, engine: &'a mut dyn Engine) -> BoxFuture<'a, ()> {
        Box::pin(session.close(engine))
    }

    fn on_message<'a>(
        session: &'a mut Self::Session,
        engine: &'a mut dyn Engine,
        text: bool,
        data: Bytes,
    ) -> BoxFuture<'a, ()> {
        Box::pin(session.on_message(engine, text, data))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn socket_ids_and_payloads() {
        let id = socket_id("3f9a1c7be2d0-1", 42);
        assert!(is_socket_id(&id) && id.ends_with(".42"));
        assert_ne!(worker_number("3f9a1c7be2d0-1"), worker_number("3f9a1c7be2d0-0"));
        assert!(!is_socket_id("1.") && !is_socket_id("a.1") && !is_socket_id("12"));
        let p = payload(Some(&id), br#"{"event":"e"}"#);
        assert!(channel_proto::Value::parse(&p).is_ok(), "a PHP value, as a channel server requires");
        let (ex, event) = read_payload(&p).unwrap();
        assert_eq!(ex, Some((worker_number("3f9a1c7be2d0-1"), 42)));
        assert_eq!(event, br#"{"event":"e"}"#);
        assert_eq!(read_payload(&payload(None, b"{}")).unwrap(), (None, &b"{}"[..]));
        let data = serde_json::value::RawValue::from_string("\"{\\\"a\\\":1}\"".into()).unwrap();
        assert_eq!(event_json("e", "c", &data, None), br#"{"event":"e","channel":"c","data":"{\"a\":1}"}"#);
        assert_eq!(keep("cache-x"), Some(Keep { size: 1, ttl_ms: CACHE_TTL_MS }));
        assert_eq!(keep("private-x"), None);
        assert_eq!(app_channel(&broker_channel("1", "presence-a:b")), Some(("1", "presence-a:b")));
        assert_eq!(app_channel("user:x"), None);
    }
}
