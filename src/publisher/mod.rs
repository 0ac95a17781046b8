//! The HTTP publisher (the seed's `start_http.php`).
//!
//! `GET /?content=X` publishes X to `broadcast`; `GET /?to_worker_id=W&to_connection_id=C&content=X`
//! publishes to worker W for connection C; `to_uid=U` to every connection of user U, `to_channel=T`
//! to every connection in topic T; `exclude_uid=U` (repeated or comma-separated) leaves users out
//! of a broadcast or topic push. With `Accept: application/json` the answer is JSON. The answer is `200 ok` once the broker has confirmed
//! the publish; otherwise a status and a one-line reason: 400 for a bad request, 401 without the
//! publish key, 503 when the broker is unreachable or does not confirm in time. `POST /` with a
//! form body takes the same fields. CORS is answered so that a page on a gateway can publish.

use std::future::Future;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::header::{self, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use tokio::net::TcpListener;

use crate::broker::{Broker, BrokerError, Position};
use crate::cluster::{self, Asker};
use crate::metrics::GLOBAL;
use crate::protocol::native::push::{check_name, Audience, Push};
use crate::protocol::pusher::hooks;
use crate::webhook::{Signing, Webhooks};

mod pusher;
mod request;
pub use request::*;

/// Settings of a publisher node.
#[derive(Debug, Clone)]
pub struct PublisherConfig {
    /// When set, every publish must carry it (`Authorization: Bearer KEY` or `key=KEY`).
    pub publish_key: Option<String>,
    /// Longest `content`, in characters.
    pub max_content: usize,
    /// Most HTTP connections at once; more are answered 503 and closed.
    pub max_connections: usize,
    /// How long a client may take to send a request body (408 after that).
    pub body_timeout: std::time::Duration,
    /// Where presence events go (`--webhook`), and the key that signs them.
    pub webhook: Option<(hyper::Uri, Option<String>)>,
    /// How long a user (or topic) must have no connection anywhere before `user_offline`
    /// (`channel_vacated`) is sent.
    pub offline_delay: std::time::Duration,
    /// Serve HTTPS with this certificate (reloaded as it changes).
    pub tls: Option<Arc<crate::tls::Tls>>,
    /// How publishes to channels that keep history are kept (`None`: history is off).
    pub keep: Option<crate::broker::Keep>,
    /// The Pusher apps whose HTTP API is served under `/apps/` (none: not served).
    pub apps: Arc<crate::protocol::pusher::Apps>,
    /// Send the apps' channel and member webhooks (`--app-webhooks`; one publisher should).
    pub app_webhooks: bool,
}

impl Default for PublisherConfig {
    fn default() -> Self {
        PublisherConfig {
            publish_key: None,
            max_content: 64 * 1024,
            max_connections: 10_000,
            body_timeout: std::time::Duration::from_secs(10),
            webhook: None,
            offline_delay: std::time::Duration::from_secs(5),
            tls: None,
            keep: crate::history::HistoryConfig::default().keep(),
            apps: Arc::default(),
            app_webhooks: false,
        }
    }
}

/// A publish request the publisher refuses, and how it answers.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error("{0}")]
    BadRequest(String),
    #[error("request body over {0} bytes")]
    TooLarge(usize),
    #[error("request body not received within {0:?}")]
    BodyTimeout(std::time::Duration),
    #[error("missing or wrong publish key (send Authorization: Bearer KEY or key=KEY)")]
    Unauthorized,
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    Broker(#[from] crate::broker::BrokerError),
}

impl PublishError {
    fn status(&self) -> StatusCode {
        match self {
            PublishError::BadRequest(_) => StatusCode::BAD_REQUEST,
            PublishError::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            PublishError::BodyTimeout(_) => StatusCode::REQUEST_TIMEOUT,
            PublishError::Unauthorized => StatusCode::UNAUTHORIZED,
            PublishError::NotFound(_) => StatusCode::NOT_FOUND,
            PublishError::Conflict(_) => StatusCode::CONFLICT,
            PublishError::Broker(_) => StatusCode::SERVICE_UNAVAILABLE,
        }
    }
}

/// A running publisher.
pub struct Publisher {
    broker: Arc<dyn Broker>,
    cfg: PublisherConfig,
    asker: Arc<Asker>,
}

/// The fields of a form sent to the connection and presence endpoints.
type Fields = std::collections::HashMap<String, String>;

impl Publisher {
    pub fn new(broker: Arc<dyn Broker>, cfg: PublisherConfig) -> Result<Arc<Publisher>, BrokerError> {
        let asker = Asker::start(broker.clone(), &crate::io::random_hex(6))?;
        let native = cfg.webhook.as_ref().map(|(url, secret)| {
            let signing = secret.clone().map_or(Signing::None, Signing::Pushwire);
            Webhooks::spawn(url.clone(), signing)
        });
        let apps = cfg.app_webhooks.then(|| hooks::Hooks::spawn(&cfg.apps, &hooks::TRACKED)).flatten();
        if native.is_some() || apps.is_some() {
            crate::tracker::spawn(asker.clone(), crate::tracker::Sinks { native, apps }, cfg.offline_delay);
        }
        Ok(Arc::new(Publisher { broker, cfg, asker }))
    }

    /// Serve HTTP on `listener` until `shutdown`; requests in flight then get a few seconds to end.
    /// The Pusher apps it serves.
    pub fn apps(&self) -> Arc<crate::protocol::pusher::Apps> {
        self.cfg.apps.clone()
    }

    pub async fn serve(self: Arc<Self>, listener: TcpListener, shutdown: impl Future<Output = ()>) {
        let (max, tls) = (self.cfg.max_connections, self.cfg.tls.clone());
        let handler = move |req| {
            let me = self.clone();
            async move { me.handle(req).await }
        };
        crate::http::serve("publisher", listener, tls, max, handler, shutdown).await;
    }

    async fn handle(&self, req: Request<Incoming>) -> Response<Full<Bytes>> {
        let resp = match (req.method(), req.uri().path()) {
            (&Method::OPTIONS, _) => {
                let mut r = reply(StatusCode::NO_CONTENT, "");
                let h = r.headers_mut();
                h.insert(header::ACCESS_CONTROL_ALLOW_METHODS, HeaderValue::from_static("GET, POST, OPTIONS"));
                h.insert(header::ACCESS_CONTROL_ALLOW_HEADERS, HeaderValue::from_static("authorization, content-type"));
                h.insert(header::ACCESS_CONTROL_MAX_AGE, HeaderValue::from_static("600"));
                r
            }
            (_, path) if is_pusher_api(path) && !self.cfg.apps.is_empty() => {
                return self.pusher_api(req).await;
            }
            (&Method::GET, "/healthz") => crate::http::health(self.broker.is_connected()),
            (&Method::GET, "/metrics") => crate::http::metrics(
                (self.broker.is_connected(), self.broker.reconnects()),
                self.cfg.tls.as_deref(),
                &[],
            ),
            (&Method::GET | &Method::POST, "/") => {
                let json = wants_json(&req);
                match self.publish(req).await {
                    Ok(position) => {
                        GLOBAL.publish_requests.fetch_add(1, Ordering::Relaxed);
                        match (json, position) {
                            (false, _) => reply(StatusCode::OK, "ok"),
                            (true, None) => json_reply(StatusCode::OK, serde_json::json!({"ok": true})),
                            (true, Some(p)) => json_reply(
                                StatusCode::OK,
                                serde_json::json!({"ok": true, "offset": p.offset, "epoch": &*p.epoch}),
                            ),
                        }
                    }
                    Err(e) => {
                        let counter = match e {
                            PublishError::Broker(_) => &GLOBAL.publish_errors,
                            _ => &GLOBAL.bad_requests,
                        };
                        counter.fetch_add(1, Ordering::Relaxed);
                        tracing::debug!("publish refused: {e}");
                        match json {
                            true => json_reply(e.status(), serde_json::json!({"ok": false, "error": e.to_string()})),
                            false => reply(e.status(), format!("{e}\n")),
                        }
                    }
                }
            }
            (&Method::GET, "/history")
            | (&Method::POST, "/bind" | "/unbind" | "/join" | "/leave")
            | (&Method::GET, "/online" | "/presence" | "/cluster") => {
                let path = req.uri().path().to_owned();
                let answer = match path.as_str() {
                    "/history" => self.history(req).await,
                    _ => self.cluster_request(req, &path).await,
                };
                match answer {
                    Ok(v) => json_reply(StatusCode::OK, v),
                    Err(e) => {
                        GLOBAL.bad_requests.fetch_add(1, Ordering::Relaxed);
                        json_reply(e.status(), serde_json::json!({"ok": false, "error": e.to_string()}))
                    }
                }
            }
            (_, path)
                if !matches!(path, "/" | "/healthz" | "/metrics" | "/history") && !CLUSTER_PATHS.contains(&path) =>
            {
                reply(StatusCode::NOT_FOUND, "not found: publish on /\n")
            }
            (_, path) => {
                let allow = match path {
                    "/" => "GET, POST, OPTIONS",
                    "/bind" | "/unbind" | "/join" | "/leave" => "POST, OPTIONS",
                    _ => "GET, OPTIONS",
                };
                let mut r = reply(StatusCode::METHOD_NOT_ALLOWED, format!("method not allowed; use {allow}\n"));
                r.headers_mut().insert(header::ALLOW, HeaderValue::from_static(allow));
                r
            }
        };
        cors(resp)
    }

    /// The query string and, for a POST, the form body after it, once the publish key (when
    /// there is one) has been found and checked. A key in the `Authorization` header or the
    /// query string is checked before the body is read; a key only in a form body must come
    /// within its first [`MAX_BODY_BEFORE_KEY`] bytes, and is checked as soon as it has come:
    /// a stranger never makes the publisher hold more than that.
    async fn read_form(&self, req: Request<Incoming>) -> Result<Vec<u8>, PublishError> {
        let bearer = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::to_owned);
        let mut form = req.uri().query().unwrap_or_default().as_bytes().to_vec();
        let mut authorized = self.cfg.publish_key.is_none();
        if let Some(key) = bearer.or_else(|| form_key(&form, true)) {
            self.check_key(&key)?;
            authorized = true;
        }
        if req.method() == Method::POST {
            // Every character of content may take 12 bytes once UTF-8 and percent-encoded.
            let limit = self.cfg.max_content * 12 + 4096;
            let wait = self.cfg.body_timeout;
            let deadline = tokio::time::Instant::now() + wait;
            let mut body = req.into_body();
            let mut read = Vec::new();
            while let Some(frame) =
                tokio::time::timeout_at(deadline, body.frame()).await.map_err(|_| PublishError::BodyTimeout(wait))?
            {
                let Ok(data) = frame.map_err(|e| PublishError::BadRequest(format!("request body: {e}")))?.into_data()
                else {
                    continue;
                };
                if read.len() + data.len() > limit {
                    return Err(PublishError::TooLarge(limit));
                }
                read.extend_from_slice(&data);
                if !authorized {
                    match form_key(&read, false) {
                        Some(key) => {
                            self.check_key(&key)?;
                            authorized = true;
                        }
                        None if read.len() > MAX_BODY_BEFORE_KEY => return Err(PublishError::Unauthorized),
                        None => {}
                    }
                }
            }
            if !authorized {
                if let Some(key) = form_key(&read, true) {
                    self.check_key(&key)?;
                    authorized = true;
                }
            }
            if !form.is_empty() {
                form.push(b'&');
            }
            form.extend_from_slice(&read);
        }
        match authorized {
            true => Ok(form),
            false => Err(PublishError::Unauthorized),
        }
    }

    /// Whether `given` is the publish key (compared in constant time).
    fn check_key(&self, given: &str) -> Result<(), PublishError> {
        if let Some(want) = &self.cfg.publish_key {
            if !bool::from(subtle::ConstantTimeEq::ct_eq(given.as_bytes(), want.as_bytes())) {
                return Err(PublishError::Unauthorized);
            }
        }
        Ok(())
    }

    async fn publish(&self, req: Request<Incoming>) -> Result<Option<Position>, PublishError> {
        let form = self.read_form(req).await?;
        let r = PublishRequest::parse(&form, self.cfg.max_content)?;
        let (channel, data) = r.to_message();
        let keep = self.cfg.keep.filter(|_| crate::protocol::native::push::keeps_history(channel.as_bytes()));
        Ok(self.broker.publish(&channel, data, keep).await?)
    }

    /// `GET /history?channel=C[&since=N][&limit=L]`: the messages of C after offset N (0: all
    /// kept), at most L (100; at most 1000), with the channel's epoch and latest offset.
    async fn history(&self, req: Request<Incoming>) -> Result<serde_json::Value, PublishError> {
        let form = self.read_form(req).await?;
        let f = parse_fields(&form, &["channel", "since", "limit"])?;
        let bad = |m: String| PublishError::BadRequest(m);
        let channel = f.get("channel").ok_or_else(|| bad("missing parameter \"channel\"".into()))?;
        let name_ok = match Audience::of(channel) {
            Some(Audience::All) => true,
            Some(Audience::User(n)) => check_name("uid", n).is_ok(),
            Some(Audience::Topic(n)) => check_name("channel", n).is_ok(),
            None => false,
        };
        if !name_ok {
            return Err(bad(format!("channel {channel:?} keeps no history: use broadcast, user:UID or topic:NAME")));
        }
        let number = |k: &str, default: u64, max: u64| match f.get(k) {
            None => Ok(default),
            Some(v) => {
                v.parse::<u64>().ok().filter(|n| *n <= max).ok_or_else(|| bad(format!("{k} must be 0 to {max}")))
            }
        };
        let since = number("since", 0, u64::MAX)?;
        let limit = number("limit", DEFAULT_HISTORY_PAGE as u64, crate::history::MAX_PAGE as u64)? as usize;
        let page = match self.broker.history(channel, since, limit).await {
            Ok(p) => p,
            Err(BrokerError::NoHistory(b)) => {
                return Err(PublishError::NotFound(format!("broker {b} keeps no history (see --history-size)")))
            }
            Err(e) => return Err(e.into()),
        };
        let more = page.more();
        let publications: Vec<serde_json::Value> = page
            .items
            .iter()
            .map(|(offset, data)| {
                let content = Push::decode(data).map(|p| String::from_utf8_lossy(&p.content).into_owned());
                serde_json::json!({"offset": offset, "data": content.unwrap_or_default()})
            })
            .collect();
        Ok(serde_json::json!({
            "channel": channel,
            "epoch": page.epoch,
            "offset": page.offset,
            "first": page.first,
            "complete": page.reaches(&page.epoch, since),
            "more": more,
            "publications": publications,
        }))
    }

    /// `/bind`, `/unbind`, `/join`, `/leave`, `/online`, `/presence`, `/cluster`: JSON answers.
    async fn cluster_request(&self, req: Request<Incoming>, path: &str) -> Result<serde_json::Value, PublishError> {
        let form = self.read_form(req).await?;
        let (name, wanted): (&str, &[&str]) = match path {
            "/bind" | "/unbind" => ("uid", &["to_worker_id", "to_connection_id", "uid"]),
            "/join" | "/leave" => ("channel", &["to_worker_id", "to_connection_id", "channel"]),
            "/online" => ("uid", &["uid"]),
            "/presence" => ("channel", &["channel", "limit"]),
            _ => ("", &[]),
        };
        let f = parse_fields(&form, wanted)?;
        if path == "/cluster" {
            return Ok(serde_json::json!({"ok": true, "gateways": self.asker.alive()}));
        }
        let field = |k: &str| f.get(k).ok_or_else(|| PublishError::BadRequest(format!("missing parameter {k:?}")));
        let value = field(name)?.clone();
        let what = if name == "uid" { "uid" } else { "channel" };
        check_name(what, &value).map_err(PublishError::BadRequest)?;
        match path {
            "/online" => {
                let answers = self.asker.ask_all(cluster::Request::Online { uid: value.clone() }).await?;
                let n: u64 = answers.iter().map(|a| a.connections).sum();
                Ok(serde_json::json!({"uid": value, "connections": n}))
            }
            "/presence" => {
                let limit = match f.get("limit") {
                    None => DEFAULT_PRESENCE_UIDS,
                    Some(l) => {
                        l.parse::<usize>().ok().filter(|l| *l <= cluster::MAX_PRESENCE_UIDS).ok_or_else(|| {
                            PublishError::BadRequest(format!("limit must be 0 to {}", cluster::MAX_PRESENCE_UIDS))
                        })?
                    }
                };
                let answers = self.asker.ask_all(cluster::Request::Presence { channel: value.clone() }).await?;
                let n: u64 = answers.iter().map(|a| a.connections).sum();
                let all: std::collections::BTreeSet<&String> = answers.iter().flat_map(|a| &a.uids).collect();
                let uids: Vec<&String> = all.iter().take(limit).copied().collect();
                Ok(serde_json::json!({"channel": value, "connections": n, "uids": uids, "uids_total": all.len()}))
            }
            _ => {
                let (w, c) = (field("to_worker_id")?, field("to_connection_id")?);
                check_worker(w, true)?;
                let conn = c.trim().parse::<u64>().map_err(|_| {
                    PublishError::BadRequest(format!("to_connection_id {c:?} is not a connection number"))
                })?;
                let req = match path {
                    "/bind" => cluster::Request::Bind { conn, uid: value },
                    "/unbind" => cluster::Request::Unbind { conn, uid: value },
                    "/join" => cluster::Request::Join { conn, channel: value },
                    _ => cluster::Request::Leave { conn, channel: value },
                };
                if !self.asker.knows_worker(w).await {
                    return Err(PublishError::NotFound(format!("no live gateway has worker {w}")));
                }
                let answer = self.asker.ask(&crate::cluster::worker_channel(w), req, 1).await?.pop();
                match answer {
                    Some(a) if a.ok => match a.error {
                        None => Ok(serde_json::json!({"ok": true})),
                        Some(e) => Err(PublishError::Conflict(e)),
                    },
                    _ => Err(PublishError::NotFound(format!("no connection {c} on worker {w}"))),
                }
            }
        }
    }
}

impl std::fmt::Debug for Publisher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Publisher").finish_non_exhaustive()
    }
}

/// Whether `path` is one of the Pusher HTTP API's.
pub fn is_pusher_api(path: &str) -> bool {
    path.starts_with("/apps/") || path.starts_with("/users/")
}

/// The paths of [`Publisher::cluster_request`].
const CLUSTER_PATHS: [&str; 7] = ["/bind", "/unbind", "/join", "/leave", "/online", "/presence", "/cluster"];

/// Messages in a `/history` answer unless `limit` says otherwise.
pub const DEFAULT_HISTORY_PAGE: usize = 100;

/// Users listed in a presence answer unless `limit` says otherwise.
pub const DEFAULT_PRESENCE_UIDS: usize = 100;

/// Most bytes of a form body read while looking for the publish key in it.
pub const MAX_BODY_BEFORE_KEY: usize = 4096;

/// The `key` field of `form`, among its complete fields (`whole`: the form is all there; else
/// only fields followed by `&` count, as the last one may be cut short).
fn form_key(form: &[u8], whole: bool) -> Option<String> {
    let end = if whole { form.len() } else { form.iter().rposition(|&b| b == b'&')? };
    form_urlencoded::parse(&form[..end]).find(|(k, _)| k == "key").map(|(_, v)| v.into_owned())
}

/// Read a form of `wanted` fields (plus `key`), each at most once.
fn parse_fields(form: &[u8], wanted: &[&str]) -> Result<Fields, PublishError> {
    let mut f = Fields::new();
    for (k, v) in form_urlencoded::parse(form) {
        if k != "key" && !wanted.contains(&&*k) {
            let expected = wanted.iter().chain(&["key"]).copied().collect::<Vec<_>>().join(", ");
            return Err(PublishError::BadRequest(format!("unknown parameter {k:?} (expected {expected})")));
        }
        if f.insert(k.clone().into_owned(), v.into_owned()).is_some() {
            return Err(PublishError::BadRequest(format!("parameter {k:?} given twice")));
        }
    }
    Ok(f)
}

use crate::http::text as reply;

/// Whether the client asked for JSON answers (`Accept: application/json`).
fn wants_json(req: &Request<Incoming>) -> bool {
    req.headers()
        .get_all(header::ACCEPT)
        .iter()
        .any(|v| v.to_str().is_ok_and(|v| v.split(',').any(|t| t.trim().starts_with("application/json"))))
}

fn json_reply(status: StatusCode, body: serde_json::Value) -> Response<Full<Bytes>> {
    crate::http::reply(status, "application/json", format!("{body}\n"))
}

fn cors(mut r: Response<Full<Bytes>>) -> Response<Full<Bytes>> {
    r.headers_mut().insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, HeaderValue::from_static("*"));
    r
}
