//! What pushwire nodes say to each other through the broker besides pushes: heartbeats, changes
//! to a connection asked for by the application's backend, and presence questions. All of it is
//! JSON, sent as a PHP string (`s:N:"{...}";`: every payload on a channel server is a serialized
//! PHP value), on channels PHP nodes never subscribe to:
//!
//! - `pushwire:cluster`: every gateway's [`Heartbeat`], every `lease / 3`. Publishers keep the
//!   gateways heard from within the lease: that is the list of live gateways (a gateway killed
//!   with `-9` falls out of it when its lease runs out).
//! - `pushwire:nodes`: [`Request`]s every gateway answers (presence counts, "heartbeat now").
//! - a worker's own channel: [`Request`]s about one of its connections (bind, join...). A worker
//!   tells them from the seed's pushes (PHP arrays, `a:...`) by their first byte (`s`).
//! - `pushwire:reply:NODE`: the [`Answer`]s for the publisher `NODE`.
//!
//! Presence lives where the connections are: each gateway counts its own, and a question is
//! answered by asking the live gateways. Nothing is stored in the broker, so nothing is left behind
//! when a gateway dies, on any backend.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::broker::{Broker, BrokerError, Message};
use crate::io::lock;

/// The start of the names of the channels nodes use among themselves (never pushes to clients).
pub const INTERNAL: &str = "pushwire:";
/// Heartbeats of the gateways.
pub const CLUSTER: &str = "pushwire:cluster";
/// Questions to every gateway.
pub const NODES: &str = "pushwire:nodes";

/// The channel on which publisher `node` receives its answers.
pub fn reply_channel(node: &str) -> String {
    format!("pushwire:reply:{node}")
}

/// The channel on which worker `worker` takes publishers' requests about its connections (its
/// own channel, `worker`, carries only the seed's pushes).
pub fn worker_channel(worker: &str) -> String {
    format!("pushwire:worker:{worker}")
}

/// `value` as a broker payload: its JSON as a serialized PHP string.
pub fn encode<T: Serialize>(value: &T) -> Bytes {
    let json = serde_json::to_vec(value).unwrap_or_default();
    let mut out = Vec::with_capacity(json.len() + 16);
    channel_proto::value::encode_str(&json, &mut out);
    out.into()
}

/// A payload made by [`encode`], read back.
pub fn decode<T: serde::de::DeserializeOwned>(data: &[u8]) -> Option<T> {
    let v = channel_proto::Value::parse(data).ok()?;
    serde_json::from_slice(v.as_bytes()?).ok()
}

/// Names in one page of a [`Request::Dump`].
pub const DUMP_PAGE: usize = 2000;

/// Most uids a gateway lists in one presence answer.
pub const MAX_PRESENCE_UIDS: usize = 1000;

/// Something a publisher asks of gateways.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    /// Connection `conn` of the worker belongs to user `uid` (instead of any other).
    Bind { conn: u64, uid: String },
    /// Connection `conn` no longer belongs to user `uid`.
    Unbind { conn: u64, uid: String },
    /// Connection `conn` joins topic `channel`.
    Join { conn: u64, channel: String },
    /// Connection `conn` leaves topic `channel`.
    Leave { conn: u64, channel: String },
    /// How many connections user `uid` has on the gateway.
    Online { uid: String },
    /// The connections in topic `channel` on the gateway, and (up to [`MAX_PRESENCE_UIDS`]) their users.
    Presence { channel: String },
    /// Send a heartbeat now (a publisher that has just started wants to know the gateways).
    Hello,
    /// A page of the worker's names of one kind after `after`, for a presence tracker.
    Dump { kind: Kind, after: String },
    /// The protocol channels (broker channels a protocol joins: Pusher's) starting with
    /// `prefix` that have subscribers on the gateway, with how many (up to [`MAX_CHANNELS`]).
    Channels { prefix: String },
    /// The members of protocol channel `channel` on the gateway (Pusher presence): each user
    /// once, with its `user_info` (up to [`MAX_CHANNELS`]).
    Members { channel: String },
}

/// Channels in one answer to [`Request::Channels`].
pub const MAX_CHANNELS: usize = 10_000;

/// What a name a worker holds names: the presence trackers follow all four.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    /// A native user (with a connection here).
    User,
    /// A native topic.
    Topic,
    /// A protocol's broker channel (Pusher's `pusher:APP:CHANNEL`) with a subscriber here.
    Channel,
    /// A presence member: [`member_key`] of its broker channel and user id.
    Member,
}

impl Kind {
    pub const ALL: [Kind; 4] = [Kind::User, Kind::Topic, Kind::Channel, Kind::Member];
}

/// The name of presence member `user` of broker channel `channel` (a channel name holds no
/// newline).
pub fn member_key(channel: &str, user: &str) -> String {
    format!("{channel}\n{user}")
}

/// A name of one kind that arrived on (`up`) or left a worker: the `seq`-th change there.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Change {
    pub seq: u64,
    pub up: bool,
    pub kind: Kind,
    pub name: String,
}

/// What gateways report on `pushwire:cluster`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Report {
    Heartbeat(Heartbeat),
    /// A worker's latest changes, in order.
    Changes {
        worker: String,
        changes: Vec<Change>,
    },
}

/// A [`Request`] with where to answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Envelope {
    pub id: u64,
    pub reply: String,
    #[serde(flatten)]
    pub req: Request,
}

/// A gateway's answer to one [`Envelope`].
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Answer {
    pub id: u64,
    pub node: String,
    /// For a connection change: whether the connection exists.
    pub ok: bool,
    /// Why a connection change was refused, when it exists.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default)]
    pub connections: u64,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub uids: Vec<String>,
    /// For a dump: the number of the worker's latest change when the page was taken.
    #[serde(default)]
    pub seq: u64,
    /// For [`Request::Channels`]: channel → subscriptions.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub channels: std::collections::BTreeMap<String, u64>,
    /// For [`Request::Members`]: user id → its `user_info` (JSON).
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub members: std::collections::BTreeMap<String, String>,
}

/// What a gateway says about itself every `lease / 3`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Heartbeat {
    pub node: String,
    pub workers: usize,
    pub connections: u64,
    pub users: u64,
    pub topics: u64,
    /// Messages received from the broker per second, since the previous heartbeat.
    pub messages_in_per_s: f64,
    /// Frames queued to clients per second, since the previous heartbeat.
    pub messages_out_per_s: f64,
    pub slow_consumer_cuts: u64,
    /// The gateway counts as gone once this long has passed without a heartbeat.
    pub lease_ms: u64,
    /// Each worker's id and the number of its latest change.
    #[serde(default)]
    pub workers_seq: Vec<(String, u64)>,
}

/// The publisher's side: the live gateways, and the answers awaited.
pub struct Asker {
    broker: Arc<dyn Broker>,
    reply: String,
    next: AtomicU64,
    waiting: Mutex<HashMap<u64, mpsc::Sender<Answer>>>,
    nodes: Mutex<HashMap<String, (Heartbeat, Instant)>>,
    /// Questions wait until then: gateways asked by `Hello` have answered.
    ready_at: Mutex<Option<Instant>>,
    /// Where reports go besides the list of gateways (a presence tracker), and whether some
    /// were lost because it lagged.
    reports: Mutex<Option<mpsc::Sender<Report>>>,
    pub(crate) reports_lost: std::sync::atomic::AtomicBool,
}

/// Longest wait for answers.
pub const ANSWER_TIMEOUT: Duration = Duration::from_secs(2);
/// How long after `Hello` the list of gateways is taken as complete.
const HELLO_WAIT: Duration = Duration::from_millis(500);

impl Asker {
    /// Listen for heartbeats and answers addressed to publisher `node`.
    pub fn start(broker: Arc<dyn Broker>, node: &str) -> Result<Arc<Asker>, BrokerError> {
        let reply = reply_channel(node);
        let mut sub = broker.subscribe(vec![reply.clone(), CLUSTER.to_owned()])?;
        let asker = Arc::new(Asker {
            broker,
            reply,
            next: AtomicU64::new(1),
            waiting: Mutex::default(),
            nodes: Mutex::default(),
            ready_at: Mutex::default(),
            reports: Mutex::default(),
            reports_lost: Default::default(),
        });
        let weak = Arc::downgrade(&asker);
        tokio::spawn(async move {
            while let Some(m) = sub.recv().await {
                let Some(a) = weak.upgrade() else { return };
                a.receive(m);
            }
        });
        // Learn the live gateways as soon as the broker link is up, not at the first question:
        // their heartbeats then have all the time they need to arrive (a question asked right
        // after the start still waits `HELLO_WAIT`).
        let weak = Arc::downgrade(&asker);
        tokio::spawn(async move {
            loop {
                let Some(a) = weak.upgrade() else { return };
                if a.broker.is_connected() && a.hello().await {
                    return;
                }
                drop(a);
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        });
        Ok(asker)
    }

    fn receive(&self, m: Message) {
        if &m.channel[..] == CLUSTER.as_bytes() {
            let Some(report) = decode::<Report>(&m.data) else { return };
            if let Report::Heartbeat(hb) = &report {
                lock(&self.nodes).insert(hb.node.clone(), (hb.clone(), Instant::now()));
            }
            if let Some(tx) = &*lock(&self.reports) {
                if tx.try_send(report).is_err() {
                    self.reports_lost.store(true, Ordering::Relaxed);
                }
            }
        } else if let Some(a) = decode::<Answer>(&m.data) {
            if let Some(tx) = lock(&self.waiting).get(&a.id) {
                let _ = tx.try_send(a);
            }
        }
    }

    /// Every report from now on also goes to the returned receiver (bounded: when it lags,
    /// reports are lost and `reports_lost` is set).
    pub fn reports(&self, capacity: usize) -> mpsc::Receiver<Report> {
        let (tx, rx) = mpsc::channel(capacity);
        *lock(&self.reports) = Some(tx);
        rx
    }

    /// The gateways heard from within their lease.
    pub fn alive(&self) -> Vec<Heartbeat> {
        let mut nodes = lock(&self.nodes);
        nodes.retain(|_, (hb, at)| at.elapsed() < Duration::from_millis(hb.lease_ms));
        let mut v: Vec<Heartbeat> = nodes.values().map(|(hb, _)| hb.clone()).collect();
        v.sort_by(|a, b| a.node.cmp(&b.node));
        v
    }

    /// Ask every gateway for a heartbeat now (once the broker link is up).
    /// Whether that was done (now or before).
    pub async fn hello(&self) -> bool {
        if lock(&self.ready_at).is_some() {
            return true;
        }
        let sent = self.send(NODES, 0, Request::Hello).await.is_ok();
        if sent {
            lock(&self.ready_at).get_or_insert(Instant::now() + HELLO_WAIT);
        }
        sent
    }

    async fn send(&self, channel: &str, id: u64, req: Request) -> Result<(), BrokerError> {
        let env = Envelope { id, reply: self.reply.clone(), req };
        self.broker.publish(channel, encode(&env), None).await.map(drop)
    }

    /// Send `req` on `channel` and collect answers until `expect` arrived or [`ANSWER_TIMEOUT`].
    pub async fn ask(&self, channel: &str, req: Request, expect: usize) -> Result<Vec<Answer>, BrokerError> {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let (tx, mut rx) = mpsc::channel(expect.clamp(1, 4096));
        lock(&self.waiting).insert(id, tx);
        let _forget = Forget(&self.waiting, id);
        self.send(channel, id, req).await?;
        let mut answers = Vec::new();
        let deadline = Instant::now() + ANSWER_TIMEOUT;
        while answers.len() < expect {
            match tokio::time::timeout_at(deadline, rx.recv()).await {
                Ok(Some(a)) => answers.push(a),
                _ => break,
            }
        }
        Ok(answers)
    }

    /// Once the gateways asked by `Hello` have had time to answer.
    async fn ready(&self) {
        self.hello().await;
        let ready = *lock(&self.ready_at);
        if let Some(at) = ready {
            tokio::time::sleep_until(at).await;
        }
    }

    /// Whether `worker` belongs to a live gateway.
    pub async fn knows_worker(&self, worker: &str) -> bool {
        self.ready().await;
        self.alive().iter().any(|hb| hb.workers_seq.iter().any(|(w, _)| w == worker))
    }

    /// Ask every live gateway; answers of the ones that answered in time.
    pub async fn ask_all(&self, req: Request) -> Result<Vec<Answer>, BrokerError> {
        self.ready().await;
        let expect = self.alive().len();
        if expect == 0 {
            return Ok(Vec::new());
        }
        self.ask(NODES, req, expect).await
    }
}

struct Forget<'a>(&'a Mutex<HashMap<u64, mpsc::Sender<Answer>>>, u64);

impl Drop for Forget<'_> {
    fn drop(&mut self) {
        lock(self.0).remove(&self.1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_shapes() {
        let e = Envelope { id: 7, reply: reply_channel("p1"), req: Request::Bind { conn: 3, uid: "42".into() } };
        let text = serde_json::to_string(&e).unwrap();
        assert_eq!(text, r#"{"id":7,"reply":"pushwire:reply:p1","op":"bind","conn":3,"uid":"42"}"#);
        assert_eq!(serde_json::from_str::<Envelope>(&text).unwrap(), e);
        let hello = encode(&Envelope { id: 0, reply: "r".into(), req: Request::Hello });
        assert!(hello.starts_with(b"s:"));
        assert_eq!(decode::<Envelope>(&hello).unwrap().req, Request::Hello);
    }
}
