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
    /// Attributes of the channels to answer with; not answered yet (the answer is `{}`).
    #[serde(default, rename = "info")]
    _info: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Batch<'a> {
    #[serde(borrow)]
    batch: Vec<Event<'a>>,
}

impl Publisher {
    /// Answer a request under `/apps/`.
    pub(super) async fn pusher_api(&self, req: Request<Incoming>) -> Response<Full<Bytes>> {
        match self.api(req).await {
            Ok(body) => reply(StatusCode::OK, body),
            Err(ApiError(status, message)) => reply(status, serde_json::json!({ "error": message })),
        }
    }

    async fn api(&self, req: Request<Incoming>) -> Result<serde_json::Value, ApiError> {
        let path = req.uri().path().to_owned();
        let Some((app_id, rest)) = path.strip_prefix("/apps/").and_then(|p| p.split_once('/')) else {
            return Err(ApiError(StatusCode::NOT_FOUND, format!("no such resource: {path}")));
        };
        let Some(app) = self.cfg.apps.by_id(app_id).cloned() else {
            return Err(ApiError(StatusCode::NOT_FOUND, format!("no app with id {app_id:?}")));
        };
        let query: Vec<(String, String)> =
            form_urlencoded::parse(req.uri().query().unwrap_or_default().as_bytes()).into_owned().collect();
        // The key is checked before any body is read: a stranger's body is never taken in.
        let key = query.iter().find(|(k, _)| k == "auth_key").map(|(_, v)| v.as_str());
        if !key.is_some_and(|k| sign::same(k, &app.key)) {
            return Err(ApiError(StatusCode::UNAUTHORIZED, "missing or wrong auth_key".into()));
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
                Ok(serde_json::json!({}))
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
                Ok(serde_json::json!({}))
            }
            _ => Err(ApiError(StatusCode::NOT_FOUND, format!("no such resource: {method} {path}"))),
        }
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
