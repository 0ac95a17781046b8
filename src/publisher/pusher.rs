//! The Pusher HTTP API (`/apps/{id}/…`) for the apps a publisher serves: signed requests, events
//! to channels (one broker publish per channel, the event's JSON made once), batches. Errors are
//! Pusher's status codes with a JSON body `{"error": …}`.

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use serde::Deserialize;
use serde_json::value::RawValue;

use super::Publisher;
use crate::protocol::pusher::{self, channel, sign, App};

/// Most channels one event goes to.
pub const MAX_CHANNELS: usize = 100;
/// Most events in one batch.
pub const MAX_BATCH: usize = 10;
/// Most bytes of a request body read before it is answered 413 (before the app's payload limit
/// is applied to each event).
pub const MAX_BODY: usize = 1 << 20;

/// A refused API request.
struct ApiError(StatusCode, String);

impl ApiError {
    fn bad(message: impl Into<String>) -> ApiError {
        ApiError(StatusCode::BAD_REQUEST, message.into())
    }
}

/// One event, as `/events` and each `/batch_events` item give it.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Event<'a> {
    name: String,
    #[serde(borrow)]
    data: &'a RawValue,
    #[serde(default)]
    channel: Option<String>,
    #[serde(default)]
    channels: Option<Vec<String>>,
    #[serde(default)]
    socket_id: Option<String>,
    /// Attributes of its channels to answer with (`user_count`, `subscription_count`).
    #[serde(default)]
    info: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Batch<'a> {
    #[serde(borrow)]
    batch: Vec<Event<'a>>,
}

impl Publisher {
    /// Answer a request of the Pusher HTTP API (see [`super::is_pusher_api`]), for a gateway that
    /// serves it on its own port.
    pub async fn pusher_request(&self, req: Request<Incoming>) -> Response<Full<Bytes>> {
        self.pusher_api(req).await
    }

    /// Answer a request under `/apps/`.
    pub(super) async fn pusher_api(&self, req: Request<Incoming>) -> Response<Full<Bytes>> {
        match self.api(req).await {
            Ok(body) => reply(StatusCode::OK, body),
            Err(ApiError(status, message)) => reply(status, serde_json::json!({ "error": message })),
        }
    }

    async fn api(&self, req: Request<Incoming>) -> Result<serde_json::Value, ApiError> {
        let path = req.uri().path().to_owned();
        let query: Vec<(String, String)> =
            form_urlencoded::parse(req.uri().query().unwrap_or_default().as_bytes()).into_owned().collect();
        // `/apps/ID/...`; and `/users/...`, which the Python SDK's terminate_user_connections
        // calls without the app (it is the app of the auth_key).
        let (app, rest) = match path.strip_prefix("/apps/").and_then(|p| p.split_once('/')) {
            Some((id, rest)) => match self.cfg.apps.by_id(id) {
                Some(app) => (app.clone(), rest),
                None => return Err(ApiError(StatusCode::NOT_FOUND, format!("no app with id {id:?}"))),
            },
            None => match (path.strip_prefix('/').filter(|p| p.starts_with("users/")), param(&query, "auth_key")) {
                (Some(rest), Some(key)) => match self.cfg.apps.by_key(key) {
                    Some(app) => (app.clone(), rest),
                    None => return Err(ApiError(StatusCode::UNAUTHORIZED, "unknown auth_key".into())),
                },
                _ => return Err(ApiError(StatusCode::NOT_FOUND, format!("no such resource: {path}"))),
            },
        };
        // The key is checked before any body is read: a stranger's body is never taken in.
        let key = query.iter().find(|(k, _)| k == "auth_key").map(|(_, v)| v.as_str());
        if !key.is_some_and(|k| sign::same(k, &app.key)) {
            return Err(ApiError(StatusCode::UNAUTHORIZED, "missing or wrong auth_key".into()));
        }
        if !app.enabled {
            return Err(ApiError(StatusCode::FORBIDDEN, "the app is disabled".into()));
        }
        let method = req.method().clone();
        let body = self.read_body(req.into_body()).await?;
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
        sign::check_request(&app, method.as_str(), &path, &query, &body, now)
            .map_err(|e| ApiError(StatusCode::UNAUTHORIZED, e.to_string()))?;
        match (&method, rest) {
            (&Method::POST, "events") => {
                let event: Event<'_> =
                    serde_json::from_slice(&body).map_err(|e| ApiError::bad(format!("body: {e}")))?;
                self.trigger(&app, &event).await?;
                self.event_info(&app, &event).await
            }
            (&Method::POST, "batch_events") => {
                let batch: Batch<'_> =
                    serde_json::from_slice(&body).map_err(|e| ApiError::bad(format!("body: {e}")))?;
                if batch.batch.len() > MAX_BATCH {
                    return Err(ApiError::bad(format!("at most {MAX_BATCH} events per batch")));
                }
                for event in &batch.batch {
                    check_event(&app, event)?;
                }
                for event in &batch.batch {
                    self.trigger(&app, event).await?;
                }
                if batch.batch.iter().all(|e| e.info.is_none()) {
                    return Ok(serde_json::json!({}));
                }
                let mut items = Vec::new();
                for event in &batch.batch {
                    let mut info = self.event_info(&app, event).await?;
                    // An item's attributes: those of its one channel.
                    let one = event.channel.as_deref().and_then(|c| info["channels"].get_mut(c).map(std::mem::take));
                    items.push(one.unwrap_or_else(|| serde_json::json!({})));
                }
                Ok(serde_json::json!({ "batch": items }))
            }
            (&Method::POST, rest) if rest.starts_with("users/") && rest.ends_with("/terminate_connections") => {
                let user = &rest["users/".len()..rest.len() - "/terminate_connections".len()];
                let user = percent_encoding::percent_decode_str(user).decode_utf8_lossy().into_owned();
                channel::check(&format!("{}{user}", channel::USER_PREFIX)).map_err(ApiError::bad)?;
                self.broker
                    .publish(&pusher::user_channel(&app.id, &user), pusher::terminate_payload(), None)
                    .await
                    .map_err(|e| ApiError(StatusCode::SERVICE_UNAVAILABLE, e.to_string()))?;
                Ok(serde_json::json!({}))
            }
            (&Method::GET, "channels") => {
                let prefix = param(&query, "filter_by_prefix").unwrap_or_default();
                let info = Info::parse(param(&query, "info"))?;
                if info.user_count && !prefix.starts_with("presence-") {
                    return Err(ApiError::bad("info=user_count needs filter_by_prefix=presence-"));
                }
                let counts = self.subscriptions(&app, prefix).await?;
                let mut channels = serde_json::Map::new();
                for (name, n) in counts {
                    let users = match info.user_count {
                        true => self.members(&app, &name).await?.len() as u64,
                        false => 0,
                    };
                    channels.insert(name, info.attributes(n, users));
                }
                Ok(serde_json::json!({ "channels": channels }))
            }
            (&Method::GET, rest) if rest.starts_with("channels/") => {
                let rest = &rest["channels/".len()..];
                let (name, users) = match rest.strip_suffix("/users") {
                    Some(name) => (name, true),
                    None => (rest, false),
                };
                let name = percent_encoding::percent_decode_str(name).decode_utf8_lossy().into_owned();
                channel::check(&name).map_err(ApiError::bad)?;
                let kind = channel::Kind::of(&name);
                if users {
                    if !kind.presence {
                        return Err(ApiError::bad("users are listed for presence channels only"));
                    }
                    let users: Vec<_> = self
                        .members(&app, &name)
                        .await?
                        .into_keys()
                        .map(|id| serde_json::json!({ "id": id }))
                        .collect();
                    return Ok(serde_json::json!({ "users": users }));
                }
                let info = Info::parse(param(&query, "info"))?;
                if info.user_count && !kind.presence {
                    return Err(ApiError::bad("user_count is for presence channels"));
                }
                let n = self.subscriptions(&app, &name).await?.get(&name).copied().unwrap_or(0);
                let users = match info.user_count {
                    true => self.members(&app, &name).await?.len() as u64,
                    false => 0,
                };
                let mut body = info.attributes(n, users);
                body["occupied"] = (n > 0).into();
                Ok(body)
            }
            _ => Err(ApiError(StatusCode::NOT_FOUND, format!("no such resource: {method} {path}"))),
        }
    }

    /// What an event's `info` asks for, of each of its channels: `{}` without `info`, else
    /// `{"channels": {NAME: {ATTRIBUTE: N}}}`.
    async fn event_info(&self, app: &App, event: &Event<'_>) -> Result<serde_json::Value, ApiError> {
        let Some(info) = event.info.as_deref() else { return Ok(serde_json::json!({})) };
        let info = Info::parse(Some(info))?;
        let counts = if info.subscription_count { self.subscriptions(app, "").await? } else { Default::default() };
        let mut channels = serde_json::Map::new();
        for c in check_event(app, event)? {
            let presence = channel::Kind::of(c).presence;
            let users = match info.user_count && presence {
                true => self.members(app, c).await?.len() as u64,
                false => 0,
            };
            let only = Info {
                user_count: info.user_count && presence,
                subscription_count: info.subscription_count && !presence,
            };
            channels.insert(c.to_owned(), only.attributes(counts.get(c).copied().unwrap_or(0), users));
        }
        Ok(serde_json::json!({ "channels": channels }))
    }

    /// The members of app `app`'s presence channel `channel` on every live gateway: user id →
    /// `user_info`.
    async fn members(&self, app: &App, channel: &str) -> Result<std::collections::BTreeMap<String, String>, ApiError> {
        let req = crate::cluster::Request::Members { channel: pusher::broker_channel(&app.id, channel) };
        let answers =
            self.asker.ask_all(req).await.map_err(|e| ApiError(StatusCode::SERVICE_UNAVAILABLE, e.to_string()))?;
        Ok(answers.into_iter().flat_map(|a| a.members).collect())
    }

    /// App `app`'s channels starting with `prefix` that have subscribers anywhere, with how
    /// many (every live gateway asked).
    async fn subscriptions(
        &self,
        app: &App,
        prefix: &str,
    ) -> Result<std::collections::BTreeMap<String, u64>, ApiError> {
        let namespace = pusher::broker_channel(&app.id, "");
        let req = crate::cluster::Request::Channels { prefix: format!("{namespace}{prefix}") };
        let answers =
            self.asker.ask_all(req).await.map_err(|e| ApiError(StatusCode::SERVICE_UNAVAILABLE, e.to_string()))?;
        let mut all = std::collections::BTreeMap::new();
        for (name, n) in answers.into_iter().flat_map(|a| a.channels) {
            if let Some(c) = name.strip_prefix(&namespace) {
                *all.entry(c.to_owned()).or_default() += n;
            }
        }
        Ok(all)
    }

    /// Publish `event` to each of its channels.
    async fn trigger(&self, app: &App, event: &Event<'_>) -> Result<(), ApiError> {
        let channels = check_event(app, event)?;
        // The data as a JSON string: as given, or the JSON of what was given otherwise.
        let data = match serde_json::from_str::<String>(event.data.get()) {
            Ok(_) => event.data.to_owned(),
            Err(_) => RawValue::from_string(serde_json::to_string(event.data.get()).unwrap_or_default())
                .map_err(|e| ApiError::bad(format!("data: {e}")))?,
        };
        let exclude = event.socket_id.as_deref();
        for c in channels {
            let json = pusher::event_json(&event.name, c, &data, None);
            let to = pusher::broker_channel(&app.id, c);
            self.broker
                .publish(&to, pusher::payload(exclude, &json), pusher::keep(c))
                .await
                .map_err(|e| ApiError(StatusCode::SERVICE_UNAVAILABLE, e.to_string()))?;
        }
        Ok(())
    }

    /// A request body, at most [`MAX_BODY`] bytes, within the body timeout.
    async fn read_body(&self, body: Incoming) -> Result<Bytes, ApiError> {
        let limited = http_body_util::Limited::new(body, MAX_BODY);
        match tokio::time::timeout(self.cfg.body_timeout, limited.collect()).await {
            Err(_) => Err(ApiError(StatusCode::REQUEST_TIMEOUT, "request body not received in time".into())),
            Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => {
                Err(ApiError(StatusCode::PAYLOAD_TOO_LARGE, format!("request body over {MAX_BODY} bytes")))
            }
            Ok(Err(e)) => Err(ApiError::bad(format!("request body: {e}"))),
            Ok(Ok(c)) => Ok(c.to_bytes()),
        }
    }
}

/// The value of query parameter `name`.
fn param<'q>(query: &'q [(String, String)], name: &str) -> Option<&'q str> {
    query.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
}

/// The attributes a channel query asks for (`info=user_count,subscription_count`).
#[derive(Default)]
struct Info {
    user_count: bool,
    subscription_count: bool,
}

impl Info {
    fn parse(info: Option<&str>) -> Result<Info, ApiError> {
        let mut i = Info::default();
        for a in info.unwrap_or_default().split(',').filter(|a| !a.is_empty()) {
            match a {
                "user_count" => i.user_count = true,
                "subscription_count" => i.subscription_count = true,
                "cache" => {}
                other => return Err(ApiError::bad(format!("unknown info attribute {other:?}"))),
            }
        }
        Ok(i)
    }

    /// A channel's attributes: `subscriptions` connections, `users` distinct users.
    fn attributes(&self, subscriptions: u64, users: u64) -> serde_json::Value {
        let mut v = serde_json::json!({});
        if self.subscription_count {
            v["subscription_count"] = subscriptions.into();
        }
        if self.user_count {
            v["user_count"] = users.into();
        }
        v
    }
}

/// Whether `event` can be triggered for `app`: its channels (one of `channel`, `channels`),
/// name, data size and `socket_id`.
fn check_event<'e>(app: &App, event: &'e Event<'_>) -> Result<Vec<&'e str>, ApiError> {
    let channels: Vec<&str> = match (&event.channel, &event.channels) {
        (Some(c), None) => vec![c.as_str()],
        (None, Some(cs)) if !cs.is_empty() => cs.iter().map(String::as_str).collect(),
        _ => return Err(ApiError::bad("give channel or channels")),
    };
    if channels.len() > MAX_CHANNELS {
        return Err(ApiError::bad(format!("at most {MAX_CHANNELS} channels per event")));
    }
    for c in &channels {
        channel::check(c).map_err(ApiError::bad)?;
    }
    if event.name.is_empty() || event.name.len() > channel::MAX_EVENT {
        return Err(ApiError::bad(format!("event name must be 1 to {} characters", channel::MAX_EVENT)));
    }
    let size = serde_json::from_str::<String>(event.data.get()).map_or(event.data.get().len(), |s| s.len());
    if size > app.max_event_payload {
        let limit = app.max_event_payload;
        return Err(ApiError(StatusCode::PAYLOAD_TOO_LARGE, format!("event data over {limit} bytes")));
    }
    if event.socket_id.as_deref().is_some_and(|s| !pusher::is_socket_id(s)) {
        return Err(ApiError::bad("socket_id must be two numbers joined by a dot"));
    }
    Ok(channels)
}

fn reply(status: StatusCode, body: serde_json::Value) -> Response<Full<Bytes>> {
    crate::http::reply(status, "application/json", body.to_string())
}
