//! Webhooks: events POSTed as JSON to one URL, in order, one request at a time, each request
//! carrying every event queued meanwhile (`{"time_ms": T, "events": [...]}`, at most
//! [`MAX_BATCH`]), signed, retried with growing backoff: a backlog built while the endpoint was
//! down drains in a few requests once it is back. The queue is bounded: when it is full the
//! oldest event is dropped and counted.
//!
//! Two signatures ([`Signing`]): pushwire's presence webhooks (`--webhook URL`) carry
//! `X-Pushwire-Signature: sha256=HEX`, an HMAC-SHA256 of the body with `--webhook-secret`;
//! Pusher apps' carry `X-Pusher-Key` and `X-Pusher-Signature` (the hex HMAC with the app's
//! secret), and are retried for about five minutes, as Pusher's.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use hmac::{Hmac, Mac};
use http_body_util::Full;
use hyper::header::{HeaderValue, CONTENT_TYPE};
use serde::Serialize;
use serde_json::value::RawValue;
use tokio::sync::Notify;

/// Events waiting to be sent before the oldest is dropped.
pub const QUEUE: usize = 10_000;
/// Most events in one request.
pub const MAX_BATCH: usize = 100;
/// Attempts per request before its events are given up.
pub const ATTEMPTS: u32 = 6;
/// Attempts for a Pusher app's request: about five minutes with the backoff's 8 s ceiling.
pub const PUSHER_ATTEMPTS: u32 = 42;
/// How long one attempt may take.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(5);

/// One request's body.
#[derive(Serialize)]
struct Batch<'a> {
    time_ms: u64,
    events: &'a [Box<RawValue>],
}

/// How requests are signed.
#[derive(Debug, Clone)]
pub enum Signing {
    None,
    /// `X-Pushwire-Signature: sha256=HEX`.
    Pushwire(String),
    /// `X-Pusher-Key: KEY` and `X-Pusher-Signature: HEX`.
    Pusher {
        key: String,
        secret: String,
    },
}

/// One presence event.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Event {
    /// `user_online`, `user_offline`, `channel_occupied` or `channel_vacated`.
    pub event: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub uid: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub channel: Option<String>,
    /// Milliseconds since the Unix epoch.
    pub time: u64,
}

impl Event {
    pub fn user(event: &'static str, uid: &str) -> Event {
        Event { event, uid: Some(uid.to_owned()), channel: None, time: now_ms() }
    }

    pub fn channel(event: &'static str, channel: &str) -> Event {
        Event { event, uid: None, channel: Some(channel.to_owned()), time: now_ms() }
    }
}

fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// Counters of a webhook sender.
#[derive(Debug, Default)]
pub struct Stats {
    pub sent: AtomicU64,
    pub failed: AtomicU64,
    pub dropped: AtomicU64,
}

/// The sending side of one webhook URL.
pub struct Webhooks {
    queue: Mutex<VecDeque<Box<RawValue>>>,
    wake: Notify,
    pub stats: Stats,
}

type HttpClient = hyper_util::client::legacy::Client<
    hyper_rustls::HttpsConnector<hyper_util::client::legacy::connect::HttpConnector>,
    Full<Bytes>,
>;

impl Webhooks {
    /// Start sending to `url`, signing as `signing` says.
    pub fn spawn(url: hyper::Uri, signing: Signing) -> Arc<Webhooks> {
        let hooks = Arc::new(Webhooks { queue: Mutex::default(), wake: Notify::new(), stats: Stats::default() });
        let https =
            hyper_rustls::HttpsConnectorBuilder::new().with_webpki_roots().https_or_http().enable_http1().build();
        let client: HttpClient =
            hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new()).build(https);
        tokio::spawn(run(hooks.clone(), client, url, signing));
        hooks
    }

    /// Queue `e`; the oldest queued event makes room when the queue is full.
    pub fn send(&self, e: &impl Serialize) {
        let Ok(e) = serde_json::value::to_raw_value(e) else { return };
        let mut q = crate::io::lock(&self.queue);
        if q.len() >= QUEUE {
            q.pop_front();
            self.stats.dropped.fetch_add(1, Ordering::Relaxed);
        }
        q.push_back(e);
        drop(q);
        self.wake.notify_one();
    }
}

/// Send what is queued, for as long as the process runs.
async fn run(h: Arc<Webhooks>, client: HttpClient, url: hyper::Uri, signing: Signing) {
    let attempts = if matches!(signing, Signing::Pusher { .. }) { PUSHER_ATTEMPTS } else { ATTEMPTS };
    loop {
        let batch: Vec<Box<RawValue>> = {
            let mut q = crate::io::lock(&h.queue);
            let n = q.len().min(MAX_BATCH);
            q.drain(..n).collect()
        };
        if batch.is_empty() {
            h.wake.notified().await;
            continue;
        }
        let body = Bytes::from(serde_json::to_vec(&Batch { time_ms: now_ms(), events: &batch }).unwrap_or_default());
        let mut backoff = Duration::from_millis(250);
        let mut delivered = false;
        for attempt in 1..=attempts {
            match post(&client, &url, &signing, body.clone()).await {
                Ok(()) => {
                    delivered = true;
                    break;
                }
                Err(e) => {
                    tracing::debug!(attempt, events = batch.len(), "webhook not delivered: {e}");
                    if attempt < attempts {
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(Duration::from_secs(8));
                    }
                }
            }
        }
        let n = batch.len() as u64;
        if delivered {
            h.stats.sent.fetch_add(n, Ordering::Relaxed);
        } else {
            h.stats.failed.fetch_add(n, Ordering::Relaxed);
            tracing::warn!(events = n, attempts, "webhook given up");
        }
    }
}

/// Lowercase hex of HMAC-SHA256(`secret`, `message`).
pub fn hmac_hex(secret: &str, message: &[u8]) -> String {
    let mut mac = Hmac::<sha2::Sha256>::new_from_slice(secret.as_bytes()).expect("HMAC takes keys of any length");
    mac.update(message);
    mac.finalize().into_bytes().iter().map(|b| format!("{b:02x}")).collect()
}

/// The `X-Pushwire-Signature` value for `body`.
pub fn signature(secret: &str, body: &[u8]) -> String {
    format!("sha256={}", hmac_hex(secret, body))
}

async fn post(client: &HttpClient, url: &hyper::Uri, signing: &Signing, body: Bytes) -> Result<(), String> {
    let mut req = hyper::Request::post(url.clone())
        .header(CONTENT_TYPE, HeaderValue::from_static("application/json"))
        .header("user-agent", "pushwire");
    match signing {
        Signing::None => {}
        Signing::Pushwire(s) => req = req.header("x-pushwire-signature", signature(s, &body)),
        Signing::Pusher { key, secret } => {
            req = req.header("x-pusher-key", key.as_str()).header("x-pusher-signature", hmac_hex(secret, &body))
        }
    }
    let req = req.body(Full::new(body)).map_err(|e| e.to_string())?;
    let resp = tokio::time::timeout(ATTEMPT_TIMEOUT, client.request(req))
        .await
        .map_err(|_| format!("no answer within {ATTEMPT_TIMEOUT:?}"))?
        .map_err(|e| e.to_string())?;
    match resp.status() {
        s if s.is_success() => Ok(()),
        s => Err(format!("answered {s}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signature_is_hmac_sha256_hex() {
        // RFC 4231 test case 2.
        let s = signature("Jefe", b"what do ya want for nothing?");
        assert_eq!(s, "sha256=5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843");
    }

    /// A receiver on loopback that answers 503 to its first `fail` requests, then 200; the
    /// bodies of the requests it accepted.
    async fn receiver(fail: usize) -> (hyper::Uri, tokio::sync::mpsc::UnboundedReceiver<serde_json::Value>) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/hook", listener.local_addr().unwrap()).parse().unwrap();
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            let mut seen = 0;
            while let Ok((mut s, _)) = listener.accept().await {
                let mut buf = Vec::new();
                let body = loop {
                    let mut chunk = [0u8; 65536];
                    let n = s.read(&mut chunk).await.unwrap_or(0);
                    if n == 0 {
                        break None;
                    }
                    buf.extend_from_slice(&chunk[..n]);
                    let text = String::from_utf8_lossy(&buf);
                    let Some(end) = text.find("\r\n\r\n") else { continue };
                    let len: usize = text[..end]
                        .to_ascii_lowercase()
                        .lines()
                        .find_map(|l| l.strip_prefix("content-length:").map(|v| v.trim().parse().unwrap()))
                        .unwrap_or(0);
                    if buf.len() >= end + 4 + len {
                        break Some(buf[end + 4..end + 4 + len].to_vec());
                    }
                };
                let Some(body) = body else { continue };
                seen += 1;
                let status = if seen <= fail { "503 Service Unavailable" } else { "200 OK" };
                let _ = s
                    .write_all(
                        format!("HTTP/1.1 {status}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n").as_bytes(),
                    )
                    .await;
                if seen > fail {
                    let _ = tx.send(serde_json::from_slice(&body).unwrap());
                }
            }
        });
        (url, rx)
    }

    #[tokio::test]
    async fn a_backlog_goes_in_a_few_requests_in_order() {
        let (url, mut rx) = receiver(2).await;
        let hooks = Webhooks::spawn(url, Signing::None);
        for i in 0..250 {
            hooks.send(&Event::user("user_online", &i.to_string()));
        }
        let mut got = Vec::new();
        let mut requests = 0;
        while got.len() < 250 {
            let body = tokio::time::timeout(Duration::from_secs(20), rx.recv()).await.unwrap().unwrap();
            assert!(body["time_ms"].as_u64().unwrap() > 1_600_000_000_000, "{body}");
            let events = body["events"].as_array().unwrap();
            assert!(events.len() <= MAX_BATCH);
            got.extend(events.iter().map(|e| e["uid"].as_str().unwrap().to_owned()));
            requests += 1;
        }
        assert_eq!(got, (0..250).map(|i| i.to_string()).collect::<Vec<_>>(), "every event once, in order");
        assert!(requests <= 4, "250 events in {requests} requests");
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while hooks.stats.sent.load(Ordering::Relaxed) < 250 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(hooks.stats.sent.load(Ordering::Relaxed), 250, "counted as sent");
    }

    #[test]
    fn event_shape() {
        let e = Event { event: "user_online", uid: Some("42".into()), channel: None, time: 7 };
        assert_eq!(serde_json::to_string(&e).unwrap(), r#"{"event":"user_online","uid":"42","time":7}"#);
    }
}
