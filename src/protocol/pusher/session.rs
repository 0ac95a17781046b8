//! One Pusher connection: its app and `socket_id`, the channels it is subscribed to, and what
//! each message it sends does (`pusher:ping`, `pusher:subscribe`, `pusher:unsubscribe`, client
//! events). Refusals are `pusher:error` events and leave the connection open; only what the
//! protocol makes fatal (an unknown app, an unsupported version) closes it, with its code.

use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use serde::Deserialize;
use serde_json::value::RawValue;

use super::app::Local;
use super::channel::{self, Kind};
use super::hooks::Event;
use super::watchlist;
use super::{broker_channel, event_json, payload, read_payload, sign, socket_id, App};
use crate::protocol::Engine;

/// Close codes and error codes of the protocol.
pub mod code {
    /// Unknown app key.
    pub const NO_APP: u16 = 4001;
    /// The app is disabled.
    pub const DISABLED: u16 = 4003;
    /// Over the app's connection quota.
    pub const OVER_QUOTA: u16 = 4004;
    /// A `protocol` that is not a number.
    pub const VERSION_FORMAT: u16 = 4006;
    /// Unsupported protocol version (or none given).
    pub const VERSION: u16 = 4007;
    /// Unauthorized (a bad subscription signature).
    pub const UNAUTHORIZED: u16 = 4009;
    /// The server is over capacity: reconnect later.
    pub const OVER_CAPACITY: u16 = 4100;
    /// The server is going away: reconnect at once.
    pub const RECONNECT: u16 = 4200;
    /// No pong in time.
    pub const NO_PONG: u16 = 4201;
    /// A message the server cannot use.
    pub const BAD_MESSAGE: u16 = 4300;
    /// Client events over the rate limit.
    pub const RATE: u16 = 4301;
}

/// Protocol versions served (Java and .NET clients say 5; pusher-js 7).
const VERSIONS: std::ops::RangeInclusive<u32> = 5..=7;

/// One channel the connection is subscribed to.
struct Subscribed {
    name: Box<str>,
    kind: Kind,
    /// On a presence channel, the user it joined as.
    user_id: Option<Box<str>>,
}

/// Longest presence `user_id`.
const MAX_USER_ID: usize = 128;

/// See the module documentation.
pub struct Session {
    app: Option<Arc<App>>,
    /// Why the connection is refused (sent as `pusher:error`, then closed with the code).
    refused: Option<(u16, &'static str)>,
    channels: Vec<Subscribed>,
    /// Client events sent in the current second, and when that second began.
    events: (u32, Option<Instant>),
    /// The user the connection signed in as (`pusher:signin`): its id and `user_info` (JSON).
    user: Option<(Box<str>, Box<str>)>,
    /// Its place under the app's `max_connections`.
    _slot: Option<super::app::Slot>,
    /// What the gateway keeps for all its connections (webhook senders, counts).
    local: Arc<Local>,
}

/// `pusher:signin`'s data.
#[derive(Deserialize)]
struct Signin {
    auth: String,
    user_data: String,
}

/// A sign-in's `user_data`: at least the user's `id`; the users it watches, if any.
#[derive(Deserialize)]
struct UserData<'a> {
    id: String,
    #[serde(default, borrow)]
    user_info: Option<&'a RawValue>,
    #[serde(default)]
    watchlist: Vec<String>,
}

/// A client's message: `{"event", "channel"?, "data"?}`.
#[derive(Deserialize)]
struct Message<'a> {
    #[serde(borrow)]
    event: std::borrow::Cow<'a, str>,
    #[serde(default, borrow)]
    channel: Option<std::borrow::Cow<'a, str>>,
    #[serde(default, borrow)]
    data: Option<&'a RawValue>,
}

/// `pusher:subscribe`'s data.
#[derive(Deserialize)]
struct Subscribe {
    channel: String,
    #[serde(default)]
    auth: Option<String>,
    #[serde(default)]
    channel_data: Option<String>,
}

/// A presence subscription's `channel_data`: `user_id` (a string or a number) and `user_info`.
#[derive(Deserialize)]
struct ChannelData<'a> {
    user_id: serde_json::Value,
    #[serde(default, borrow)]
    user_info: Option<&'a RawValue>,
}

impl Session {
    /// A connection to `/app/KEY` asking with `query`, for the app of that key among `apps`.
    pub fn admit(apps: &super::Apps, key: &str, query: Option<&str>) -> Session {
        let app = apps.by_key(key).cloned();
        let slot = app.as_ref().and_then(|a| apps.slot(a));
        let version = form_urlencoded::parse(query.unwrap_or_default().as_bytes())
            .find(|(k, _)| k == "protocol")
            .map(|(_, v)| v.parse::<u32>().ok());
        let refused = match (&app, version) {
            (None, _) => Some((code::NO_APP, "Application does not exist")),
            (Some(a), _) if !a.enabled => Some((code::DISABLED, "Application is disabled")),
            (Some(_), _) if slot.is_none() => Some((code::OVER_QUOTA, "Application is over its connection quota")),
            (_, None) => Some((code::VERSION, "No protocol version given (protocol=7)")),
            (_, Some(None)) => Some((code::VERSION_FORMAT, "The protocol version is not a number")),
            (_, Some(Some(v))) if !VERSIONS.contains(&v) => Some((code::VERSION, "Unsupported protocol version")),
            _ => None,
        };
        let local = apps.local();
        Session { app, refused, channels: Vec::new(), events: (0, None), user: None, _slot: slot, local }
    }

    /// Refuse the connection: the gateway is at its connection limit.
    pub fn over_capacity(&mut self) {
        self.refused = Some((code::OVER_CAPACITY, "Over capacity: try again later"));
    }

    /// `pusher:connection_established`, or the error that refuses the connection.
    pub fn welcome(&mut self, engine: &mut dyn Engine) {
        match (self.refused, &self.app) {
            (Some((code, message)), _) => {
                error(engine, Some(code), message);
                engine.close(code, message);
            }
            (None, Some(app)) => {
                let data = serde_json::json!({"socket_id": me(engine), "activity_timeout": app.activity_timeout});
                send(engine, "pusher:connection_established", None, &data.to_string());
            }
            (None, None) => engine.close(code::NO_APP, "Application does not exist"),
        }
    }

    /// Act on one message from the client.
    pub async fn on_message(&mut self, engine: &mut dyn Engine, text: bool, data: Bytes) {
        let Some(app) = self.app.clone() else { return };
        let parsed = text.then(|| serde_json::from_slice::<Message<'_>>(&data).ok()).flatten();
        let Some(m) = parsed else {
            return error(
                engine,
                Some(code::BAD_MESSAGE),
                "Messages are JSON text: {\"event\", \"channel\", \"data\"}",
            );
        };
        match &*m.event {
            "pusher:ping" => send(engine, "pusher:pong", None, "{}"),
            "pusher:pong" => {}
            "pusher:subscribe" => match m.data.and_then(|d| serde_json::from_str::<Subscribe>(d.get()).ok()) {
                Some(s) => self.subscribe(&app, engine, s).await,
                None => error(engine, Some(code::BAD_MESSAGE), "pusher:subscribe needs data with a channel"),
            },
            "pusher:signin" => match m.data.and_then(|d| serde_json::from_str::<Signin>(d.get()).ok()) {
                Some(s) => self.signin(&app, engine, s).await,
                None => error(engine, Some(code::BAD_MESSAGE), "pusher:signin needs data with auth and user_data"),
            },
            "pusher:unsubscribe" => {
                let channel = m.data.and_then(|d| serde_json::from_str::<Subscribe>(d.get()).ok()).map(|s| s.channel);
                if let Some(i) = channel.and_then(|c| self.channels.iter().position(|s| *s.name == *c)) {
                    let gone = self.channels.swap_remove(i);
                    leave(&app, &self.local, engine, gone).await;
                }
            }
            e if e.starts_with("client-") => {
                let channel = m.channel.as_deref().unwrap_or_default();
                let data = m.data.map_or("null", RawValue::get);
                self.client_event(&app, engine, e, channel, data).await
            }
            // Other events (a newer client's) are not for this server: ignored, as Pusher does.
            _ => {}
        }
    }

    async fn subscribe(&mut self, app: &App, engine: &mut dyn Engine, s: Subscribe) {
        let name = s.channel;
        if let Err(e) = channel::check(&name) {
            return error(engine, Some(code::BAD_MESSAGE), &e);
        }
        if self.channels.iter().any(|c| *c.name == *name) {
            return send(engine, "pusher_internal:subscription_succeeded", Some(&name), "{}");
        }
        if self.channels.len() >= app.max_channels_per_connection {
            let limit = app.max_channels_per_connection;
            return error(engine, Some(code::BAD_MESSAGE), &format!("At most {limit} channels per connection"));
        }
        let kind = Kind::of(&name);
        if kind.user {
            // The socket is in its user's channel from its sign-in on; only that user's may ask.
            let mine = self.user.as_ref().is_some_and(|(u, _)| name.strip_prefix(channel::USER_PREFIX) == Some(u));
            return match mine {
                true => send(engine, "pusher_internal:subscription_succeeded", Some(&name), "{}"),
                false => subscription_error(engine, &name, 403, "Only a socket signed in as this user may subscribe"),
            };
        }
        let channel_data = s.channel_data.as_deref().filter(|_| kind.presence);
        // A presence member: as channel_data says, or (without it) the signed-in user.
        let member = match (kind.presence, channel_data, &self.user) {
            (false, ..) => None,
            (true, Some(data), _) => match member(app, data) {
                Some(m) => Some(m),
                None => {
                    let limit = app.max_user_info;
                    let message = format!(
                        "channel_data needs a user_id (at most {MAX_USER_ID} characters) and a user_info of at most {limit} bytes"
                    );
                    return error(engine, Some(code::BAD_MESSAGE), &message);
                }
            },
            (true, None, Some((id, info))) => Some((id.to_string(), info.to_string())),
            (true, None, None) => {
                return error(
                    engine,
                    Some(code::UNAUTHORIZED),
                    "A presence subscription needs channel_data or a sign-in",
                );
            }
        };
        if kind.private {
            let string = match channel_data {
                Some(data) => format!("{}:{name}:{data}", me(engine)),
                None => format!("{}:{name}", me(engine)),
            };
            if !sign::authorizes(app, string.as_bytes(), s.auth.as_deref().unwrap_or_default()) {
                let message = format!("Invalid signature: expected HMAC SHA256 hex digest of {string}");
                return error(engine, Some(code::UNAUTHORIZED), &message);
            }
        }
        let to = broker_channel(&app.id, &name);
        let mut user_id = None;
        match member {
            None => {
                engine.join(&to, None).await;
                send(engine, "pusher_internal:subscription_succeeded", Some(&name), "{}");
                if app.subscription_count {
                    self.local.count_changed(app, engine, &name);
                }
            }
            Some((id, info)) => {
                let Some(mut members) = engine.members(&to).await else {
                    return subscription_error(engine, &name, 503, "The members could not be counted: try again");
                };
                let known = members.contains_key(&id);
                if !known && members.len() >= app.max_presence_members {
                    let limit = app.max_presence_members;
                    return subscription_error(
                        engine,
                        &name,
                        403,
                        &format!("Presence channels hold at most {limit} members"),
                    );
                }
                engine.join(&to, Some((&id, &info))).await;
                members.insert(id.clone(), info.clone());
                send(engine, "pusher_internal:subscription_succeeded", Some(&name), &presence_data(&members));
                if !known {
                    let added = member_event(&id, Some(&info));
                    let json = event_json("pusher_internal:member_added", &name, &added, None);
                    engine.publish(&to, payload(Some(&me(engine)), &json), None).await;
                }
                user_id = Some(id.into_boxed_str());
            }
        }
        if kind.cache {
            let last = engine.last(&broker_channel(&app.id, &name)).await;
            match last.as_deref().and_then(read_payload) {
                Some((_, event)) => engine.send(true, event),
                None => {
                    let miss = serde_json::json!({"event": "pusher:cache_miss", "channel": name});
                    engine.send(true, miss.to_string().as_bytes());
                    if let Some(h) = &self.local.hooks {
                        h.cache_miss(&app.id, &name);
                    }
                }
            }
        }
        // Grown one at a time: most connections hold a channel or two.
        self.channels.reserve_exact(1);
        self.channels.push(Subscribed { name: name.into(), kind, user_id });
    }

    /// `pusher:signin`: the user data signed for this socket; the socket joins its user's channel.
    async fn signin(&mut self, app: &App, engine: &mut dyn Engine, s: Signin) {
        if !app.user_authentication {
            return error(engine, Some(code::BAD_MESSAGE), "User authentication is not enabled for this app");
        }
        let string = format!("{}::user::{}", me(engine), s.user_data);
        if !sign::authorizes(app, string.as_bytes(), &s.auth) {
            let message = format!("Invalid signature: expected HMAC SHA256 hex digest of {string}");
            return error(engine, Some(code::UNAUTHORIZED), &message);
        }
        let Some((user, info, watchlist)) = serde_json::from_str::<UserData<'_>>(&s.user_data)
            .ok()
            .map(|u| (u.id, u.user_info.map_or("null", RawValue::get).to_owned(), u.watchlist))
            .filter(|(_, info, w)| info.len() <= app.max_user_info && w.len() <= watchlist::MAX_WATCHLIST)
        else {
            let message = format!(
                "user_data needs an id (and a user_info within the app's limit, a watchlist of at most {} ids)",
                watchlist::MAX_WATCHLIST
            );
            return error(engine, Some(code::BAD_MESSAGE), &message);
        };
        if channel::check(&format!("{}{user}", channel::USER_PREFIX)).is_err() {
            return error(engine, Some(code::BAD_MESSAGE), "The user id may use A-Z a-z 0-9 _ - = @ , . ; only");
        }
        match self.user.as_ref() {
            Some((u, _)) if **u != *user => {
                return error(engine, Some(code::UNAUTHORIZED), "This socket is signed in as another user");
            }
            Some(_) => {}
            None => {
                engine.join(&super::user_channel(&app.id, &user), None).await;
                if app.watchlist_events {
                    watchlist::announce(engine.cluster(), &app.id, &user, true).await;
                }
                self.user = Some((user.into_boxed_str(), info.into_boxed_str()));
            }
        }
        let m = serde_json::json!({"event": "pusher:signin_success", "data": {"user_data": s.user_data}});
        engine.send(true, m.to_string().as_bytes());
        if app.watchlist_events && !watchlist.is_empty() {
            for u in &watchlist {
                engine.join(&watchlist::channel(&app.id, u), None).await;
            }
            let cluster = engine.cluster();
            if let Some(online) = watchlist::online(&*cluster, &app.id, &watchlist).await {
                let offline: Vec<&str> = watchlist.iter().map(String::as_str).filter(|u| !online.contains(u)).collect();
                engine.send(true, &watchlist::event(&online, &offline));
            }
        }
    }

    /// Leave every channel (the connection ends): the members it was the last socket of are
    /// removed for the others.
    pub async fn close(&mut self, engine: &mut dyn Engine) {
        let Some(app) = self.app.clone() else { return };
        for s in std::mem::take(&mut self.channels) {
            leave(&app, &self.local, engine, s).await;
        }
        if let Some((user, _)) = self.user.take().filter(|_| app.watchlist_events) {
            engine.leave(&super::user_channel(&app.id, &user)).await;
            watchlist::announce(engine.cluster(), &app.id, &user, false).await;
        }
    }

    async fn client_event(&mut self, app: &App, engine: &mut dyn Engine, event: &str, channel: &str, data: &str) {
        if !app.client_events {
            return error(engine, Some(code::BAD_MESSAGE), "Client events are not enabled for this app");
        }
        let Some(sub) = self.channels.iter().find(|c| *c.name == *channel) else {
            return error(engine, Some(code::BAD_MESSAGE), &format!("Not subscribed to {channel:?}"));
        };
        if !sub.kind.takes_client_events() {
            return error(engine, Some(code::BAD_MESSAGE), "Client events go on private and presence channels only");
        }
        if !channel::is_client_event(event) {
            return error(
                engine,
                Some(code::BAD_MESSAGE),
                "Client event names start with client- (at most 200 characters)",
            );
        }
        if data.len() > app.max_event_payload {
            return error(engine, Some(code::BAD_MESSAGE), &format!("Event data over {} bytes", app.max_event_payload));
        }
        let now = Instant::now();
        match self.events {
            (n, Some(start)) if now.duration_since(start).as_secs() < 1 => {
                if n >= app.client_event_rate {
                    return error(engine, Some(code::RATE), "Client event rate limit reached");
                }
                self.events.0 = n + 1;
            }
            _ => self.events = (1, Some(now)),
        }
        let Ok(raw) = RawValue::from_string(data.to_owned()) else { return };
        let json = event_json(event, channel, &raw, sub.user_id.as_deref());
        let to = broker_channel(&app.id, channel);
        let socket = me(engine);
        if !engine.publish(&to, payload(Some(&socket), &json), None).await {
            return error(engine, Some(code::BAD_MESSAGE), "The event could not be relayed: the broker is unreachable");
        }
        if let Some(h) = self.local.hooks.as_ref().filter(|h| h.wants(&app.id, "client_event")) {
            // `data` as a string: a string's value, anything else its JSON.
            let text = serde_json::from_str::<String>(data).unwrap_or_else(|_| data.to_owned());
            let e = Event {
                event: Some(event),
                data: Some(&text),
                socket_id: Some(&socket),
                user_id: sub.user_id.as_deref(),
                ..Event::new("client_event", channel)
            };
            h.send(&app.id, &e);
        }
    }
}

/// The connection's `socket_id`.
fn me(engine: &dyn Engine) -> String {
    let (worker, id) = engine.socket();
    socket_id(worker, id)
}

/// Leave channel `s`; on a presence channel, its user's `member_removed` for the others when no
/// socket of that user is left in it anywhere.
async fn leave(app: &App, local: &Local, engine: &mut dyn Engine, s: Subscribed) {
    let to = broker_channel(&app.id, &s.name);
    engine.leave(&to).await;
    if app.subscription_count && !s.kind.presence {
        local.count_changed(app, engine, &s.name);
    }
    let Some(user) = s.user_id else { return };
    if engine.members(&to).await.is_some_and(|m| !m.contains_key(&*user)) {
        engine.publish(&to, payload(None, &member_removed(&s.name, &user)), None).await;
    }
}

/// The event that tells a presence channel's subscribers that `user` left it.
pub fn member_removed(channel: &str, user: &str) -> Vec<u8> {
    event_json("pusher_internal:member_removed", channel, &member_event(user, None), None)
}

/// What a presence event (as [`event_json`] makes it) changes: a user added (`true`) or removed.
pub fn member_change(event: &[u8]) -> Option<(bool, String)> {
    let added = match event.strip_prefix(br#"{"event":"pusher_internal:member_"#)? {
        e if e.starts_with(b"added\"") => true,
        e if e.starts_with(b"removed\"") => false,
        _ => return None,
    };
    #[derive(Deserialize)]
    struct Outer {
        data: String,
    }
    #[derive(Deserialize)]
    struct Data {
        user_id: String,
    }
    let outer: Outer = serde_json::from_slice(event).ok()?;
    Some((added, serde_json::from_str::<Data>(&outer.data).ok()?.user_id))
}

/// The member a presence subscription's `channel_data` names: its user id (a number becomes its
/// digits) and `user_info` JSON (`null` when absent), within the app's limits.
fn member(app: &App, channel_data: &str) -> Option<(String, String)> {
    let d: ChannelData<'_> = serde_json::from_str(channel_data).ok()?;
    let id = match d.user_id {
        serde_json::Value::String(s) => s,
        serde_json::Value::Number(n) => n.to_string(),
        _ => return None,
    };
    let info = d.user_info.map_or("null", RawValue::get).to_owned();
    (!id.is_empty() && id.len() <= MAX_USER_ID && info.len() <= app.max_user_info).then_some((id, info))
}

/// `member_added` / `member_removed` data: a string holding `{"user_id", "user_info"?}`.
fn member_event(id: &str, info: Option<&str>) -> Box<RawValue> {
    #[derive(serde::Serialize)]
    struct Member<'a> {
        user_id: &'a str,
        #[serde(skip_serializing_if = "Option::is_none")]
        user_info: Option<&'a RawValue>,
    }
    // `info` was checked as JSON when the member joined.
    let user_info = info.and_then(|i| serde_json::from_str::<&RawValue>(i).ok());
    let text = serde_json::to_string(&Member { user_id: id, user_info }).unwrap_or_default();
    RawValue::from_string(serde_json::to_string(&text).unwrap_or_default()).expect("a JSON string")
}

/// `subscription_succeeded` data of a presence channel: `{"presence":{"ids","hash","count"}}`.
fn presence_data(members: &std::collections::BTreeMap<String, String>) -> String {
    #[derive(serde::Serialize)]
    struct Data<'a> {
        presence: Presence<'a>,
    }
    #[derive(serde::Serialize)]
    struct Presence<'a> {
        ids: Vec<&'a str>,
        hash: std::collections::BTreeMap<&'a str, &'a RawValue>,
        count: usize,
    }
    let hash = members.iter().filter_map(|(id, info)| Some((id.as_str(), serde_json::from_str(info).ok()?))).collect();
    let presence = Presence { ids: members.keys().map(String::as_str).collect(), hash, count: members.len() };
    serde_json::to_string(&Data { presence }).unwrap_or_default()
}

/// Send `{"event":E,"channel"?:C,"data":D}` with `data` a string holding `data`.
fn send(engine: &mut dyn Engine, event: &str, channel: Option<&str>, data: &str) {
    let mut m = serde_json::json!({"event": event, "data": data});
    if let Some(c) = channel {
        m["channel"] = c.into();
    }
    engine.send(true, m.to_string().as_bytes());
}

/// `pusher:error` with `code` (a number or null) and `message`, its data an object as Pusher's.
fn error(engine: &mut dyn Engine, code: Option<u16>, message: &str) {
    let m = serde_json::json!({"event": "pusher:error", "data": {"code": code, "message": message}});
    engine.send(true, m.to_string().as_bytes());
}

/// `pusher:subscription_error` on `channel`, with an HTTP-like `status`.
fn subscription_error(engine: &mut dyn Engine, channel: &str, status: u16, message: &str) {
    let data = serde_json::json!({"type": "AuthError", "error": message, "status": status});
    send(engine, "pusher:subscription_error", Some(channel), &data.to_string());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presence_shapes() {
        let app = App::new("1", "k", "s");
        assert_eq!(
            member(&app, r#"{"user_id":10,"user_info":{"name":"Mr. Channels"}}"#),
            Some(("10".into(), r#"{"name":"Mr. Channels"}"#.into()))
        );
        assert_eq!(
            member(&app, r#"{"user_id": "u1"}"#),
            Some(("u1".into(), "null".into())),
            "Python's separators, no info"
        );
        assert_eq!(member(&app, r#"{"user_id":""}"#), None);
        assert_eq!(member(&app, &format!(r#"{{"user_id":"{}"}}"#, "x".repeat(129))), None, "user_id over 128");
        let big = format!(r#"{{"user_id":"u","user_info":"{}"}}"#, "x".repeat(1100));
        assert_eq!(member(&app, &big), None, "user_info over the app's limit");
        let mut members = std::collections::BTreeMap::new();
        members.insert("u1".to_string(), r#"{"name":"A"}"#.to_string());
        members.insert("2".to_string(), "null".to_string());
        let data = presence_data(&members);
        assert_eq!(data, r#"{"presence":{"ids":["2","u1"],"hash":{"2":null,"u1":{"name":"A"}},"count":2}}"#);
        assert!(serde_json::from_str::<serde_json::Value>(&data).is_ok());
        // member_added/removed data is a string holding the JSON (as Pusher sends it).
        let added = member_event("u1", Some(r#"{"name":"A"}"#));
        assert_eq!(
            serde_json::from_str::<String>(added.get()).unwrap(),
            r#"{"user_id":"u1","user_info":{"name":"A"}}"#
        );
        let json = event_json("pusher_internal:member_added", "presence-r", &added, None);
        assert_eq!(member_change(&json), Some((true, "u1".to_owned())));
        assert_eq!(member_change(&member_removed("presence-r", "u1")), Some((false, "u1".to_owned())));
        assert_eq!(member_change(br#"{"event":"client-x","channel":"presence-r","data":{}}"#), None);
        let removed = member_event("u1", None);
        assert_eq!(serde_json::from_str::<String>(removed.get()).unwrap(), r#"{"user_id":"u1"}"#);
    }
}
