//! Pusher apps' webhooks: for each endpoint of an app (`webhooks = [{ url, events }]`), a
//! [`Webhooks`] sender signed with the app's key and secret, which gets the events the endpoint
//! asked for (all, when it names none). Who sends what: `channel_occupied`, `channel_vacated`,
//! `member_added` and `member_removed` come from the presence tracker (one per cluster, see
//! [`crate::tracker`]); `client_event`, `cache_miss` and `subscription_count` from the gateway
//! that saw them.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;

use super::Apps;
use crate::webhook::{Signing, Webhooks};

/// The events the tracker sends (cluster-wide transitions).
pub const TRACKED: [&str; 4] = ["channel_occupied", "channel_vacated", "member_added", "member_removed"];
/// The events a gateway sends.
pub const GATEWAY: [&str; 3] = ["client_event", "cache_miss", "subscription_count"];

/// One webhook event, as Pusher sends it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Event<'a> {
    pub name: &'static str,
    pub channel: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub user_id: Option<&'a str>,
    /// A client event's name.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub event: Option<&'a str>,
    /// A client event's data, as a string.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub data: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub socket_id: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub subscription_count: Option<u64>,
}

impl<'a> Event<'a> {
    pub fn new(name: &'static str, channel: &'a str) -> Event<'a> {
        Event { name, channel, user_id: None, event: None, data: None, socket_id: None, subscription_count: None }
    }
}

/// An endpoint: its sender and the events it gets (empty: all).
struct Endpoint {
    sender: Arc<Webhooks>,
    events: Vec<String>,
}

/// A `cache_miss` webhook goes out at most once per channel in this long (per gateway).
pub const CACHE_MISS_WINDOW: Duration = Duration::from_secs(5);
/// Channels remembered for that; past it, misses are sent without the check.
const MAX_MISSES: usize = 10_000;

/// The senders of every app's endpoints that get one of a set of events.
pub struct Hooks {
    apps: HashMap<String, Vec<Endpoint>>,
    /// When each (app, channel) last had its `cache_miss` sent.
    misses: Mutex<HashMap<(String, String), Instant>>,
}

impl std::fmt::Debug for Hooks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hooks").field("apps", &self.apps.keys()).finish_non_exhaustive()
    }
}

impl Hooks {
    /// Start a sender for each endpoint of `apps` that gets one of `names`; `None` when no
    /// endpoint does.
    pub fn spawn(apps: &Apps, names: &[&str]) -> Option<Arc<Hooks>> {
        let mut out = HashMap::new();
        for app in apps.iter() {
            let endpoints: Vec<Endpoint> = app
                .webhooks
                .iter()
                .filter(|w| w.events.is_empty() || w.events.iter().any(|e| names.contains(&e.as_str())))
                .filter_map(|w| {
                    let signing = Signing::Pusher { key: app.key.clone(), secret: app.secret.clone() };
                    let sender = Webhooks::spawn(w.url.parse().ok()?, signing);
                    Some(Endpoint { sender, events: w.events.clone() })
                })
                .collect();
            if !endpoints.is_empty() {
                out.insert(app.id.clone(), endpoints);
            }
        }
        (!out.is_empty()).then(|| Arc::new(Hooks { apps: out, misses: Mutex::default() }))
    }

    /// Whether some endpoint of app `app` gets events named `name`.
    pub fn wants(&self, app: &str, name: &str) -> bool {
        self.endpoints(app, name).next().is_some()
    }

    /// Queue `e` for every endpoint of app `app` that gets it.
    pub fn send(&self, app: &str, e: &Event) {
        for endpoint in self.endpoints(app, e.name) {
            endpoint.sender.send(e);
        }
    }

    /// `cache_miss` for `channel` of app `app`, unless it was sent for it within
    /// [`CACHE_MISS_WINDOW`].
    pub fn cache_miss(&self, app: &str, channel: &str) {
        if !self.wants(app, "cache_miss") {
            return;
        }
        let now = Instant::now();
        {
            let mut misses = crate::io::lock(&self.misses);
            let key = (app.to_owned(), channel.to_owned());
            if misses.get(&key).is_some_and(|at| now.duration_since(*at) < CACHE_MISS_WINDOW) {
                return;
            }
            if misses.len() >= MAX_MISSES {
                misses.retain(|_, at| now.duration_since(*at) < CACHE_MISS_WINDOW);
            }
            if misses.len() < MAX_MISSES {
                misses.insert(key, now);
            }
        }
        self.send(app, &Event::new("cache_miss", channel));
    }

    fn endpoints<'a>(&'a self, app: &str, name: &'a str) -> impl Iterator<Item = &'a Endpoint> {
        let all = self.apps.get(app).map(Vec::as_slice).unwrap_or_default();
        all.iter().filter(move |e| e.events.is_empty() || e.events.iter().any(|n| n == name))
    }

    /// Events sent, failed and dropped, over every endpoint.
    pub fn stats(&self) -> [u64; 3] {
        use std::sync::atomic::Ordering::Relaxed;
        let mut out = [0; 3];
        for e in self.apps.values().flatten() {
            let s = &e.sender.stats;
            out[0] += s.sent.load(Relaxed);
            out[1] += s.failed.load(Relaxed);
            out[2] += s.dropped.load(Relaxed);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_shapes() {
        let e = Event::new("channel_occupied", "my-channel");
        assert_eq!(serde_json::to_string(&e).unwrap(), r#"{"name":"channel_occupied","channel":"my-channel"}"#);
        let e = Event {
            event: Some("client-x"),
            data: Some(r#"{"a":1}"#),
            socket_id: Some("44610.7511910"),
            ..Event::new("client_event", "private-c")
        };
        let want = r#"{"name":"client_event","channel":"private-c","event":"client-x","data":"{\"a\":1}","socket_id":"44610.7511910"}"#;
        assert_eq!(serde_json::to_string(&e).unwrap(), want);
        // The signature of Pusher's webhook vector.
        let body = r#"{"time_ms":1327078148132,"events":[{"name":"channel_occupied","channel":"my-channel"}]}"#;
        assert_eq!(
            crate::webhook::hmac_hex("7ad3773142a6692b25b8", body.as_bytes()),
            "c19001ae3963ccb13bf618e5b16ba9848e7e74df0993aa0689168e341c6833cf"
        );
    }
}
