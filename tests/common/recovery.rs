//! The history and recovery check shared by the tests of every broker: JSON clients, publishes
//! with positions, `recover=` across gateways with live publishes at the seam, `recovered:false`,
//! `/history`, refused parameters, gaps filled from history.

use std::time::Duration;

use futures_util::StreamExt;
use serde_json::Value;

use super::*;

pub const SECRET: &str = "history-test-secret";

/// The nodes of one system under test: gateways and publishers (one of each for standalone).
pub struct Nodes {
    pub gateways: Vec<Addr>,
    pub publishers: Vec<Addr>,
}

/// A JSON connection: its messages parsed.
pub struct JsonClient {
    pub ws: Ws,
    pub welcome: Value,
}

pub async fn connect_json(gw: &Addr, query: &str) -> JsonClient {
    let url = format!("ws://{}/?format=json&{query}", gw.0);
    let (mut ws, _) = tokio::time::timeout(Duration::from_secs(10), tokio_tungstenite::connect_async(url))
        .await
        .expect("connect timed out")
        .expect("websocket handshake");
    let welcome = serde_json::from_str(&next_text(&mut ws).await.expect("welcome")).expect("JSON welcome");
    JsonClient { ws, welcome }
}

impl JsonClient {
    pub async fn next(&mut self) -> Value {
        let t = next_text(&mut self.ws).await.expect("a message");
        serde_json::from_str(&t).unwrap_or_else(|e| panic!("not JSON: {t:?}: {e}"))
    }

    /// Messages until one has data `last` (included).
    pub async fn until(&mut self, last: &str) -> Vec<Value> {
        let mut out = Vec::new();
        loop {
            let m = self.next().await;
            let done = m["data"] == last;
            out.push(m);
            if done {
                return out;
            }
        }
    }
}

/// Publish with a JSON answer: (offset, epoch).
pub async fn publish(nodes: &Nodes, i: usize, query: &str) -> (u64, String) {
    let target = format!("/?{query}");
    let (status, body) =
        http(&nodes.publishers[i % nodes.publishers.len()], "GET", &target, &[("Accept", "application/json")], "")
            .await;
    assert_eq!(status, 200, "{query}: {body}");
    let v: Value = serde_json::from_str(&body).expect("JSON answer");
    assert_eq!(v["ok"], true);
    (v["offset"].as_u64().expect("offset"), v["epoch"].as_str().expect("epoch").to_owned())
}

fn token(sub: &str, channels: &[&str]) -> String {
    user_token(SECRET, sub, channels)
}

/// Offsets of the messages of `channel` in `msgs`, with the index of its `recovered` notice.
fn offsets(msgs: &[Value], channel: &str) -> (Vec<u64>, Option<(usize, bool)>) {
    let mut out = Vec::new();
    let mut notice = None;
    for m in msgs.iter().filter(|m| m["channel"] == channel) {
        match m.get("recovered") {
            Some(ok) => notice = Some((out.len(), ok.as_bool().expect("bool"))),
            None => out.push(m["offset"].as_u64().expect("offset")),
        }
    }
    (out, notice)
}

/// The whole check on one system.
pub async fn recovery(nodes: &Nodes) {
    let (gw0, gw1) = (&nodes.gateways[0], &nodes.gateways[nodes.gateways.len() - 1]);
    // A JSON welcome says who the connection is.
    let mut dana = connect_json(gw0, &format!("token={}", token("dana", &["news"]))).await;
    assert_eq!(dana.welcome["uid"], "dana");
    assert_eq!(dana.welcome["channels"], serde_json::json!(["news"]));
    assert!(dana.welcome["worker_id"].is_string() && dana.welcome["connection_id"].is_u64());
    let (t0, topic_epoch) = publish(nodes, 0, "to_channel=news&content=t0").await;
    let m = dana.next().await;
    assert_eq!(m, serde_json::json!({"channel": "topic:news", "offset": t0, "epoch": topic_epoch, "data": "t0"}));
    let (u0, user_epoch) = publish(nodes, 1, "to_uid=dana&content=u0").await;
    assert_eq!(dana.next().await["offset"], u0);
    // Offsets count per channel, without gaps, whichever publisher hands them out.
    let (t1, e) = publish(nodes, 1, "to_channel=news&content=t1").await;
    assert_eq!((t1, e.as_str()), (t0 + 1, topic_epoch.as_str()));
    assert_eq!(dana.next().await["offset"], t1);
    close(dana.ws).await;

    // Missed while away: 50 on the topic, 10 to the user.
    for i in 0..50 {
        publish(nodes, i, &format!("to_channel=news&content=m{i}")).await;
    }
    for i in 0..10 {
        publish(nodes, i, &format!("to_uid=dana&content=d{i}")).await;
    }
    // Back on the other gateway, while more is published: every message after the ones seen,
    // once, in order, the seam included.
    let recover = format!("topic:news:{topic_epoch}:{t1},user:dana:{user_epoch}:{u0}");
    let query = format!("token={}&recover={recover}", token("dana", &["news"]));
    let live = async {
        for i in 0..20 {
            publish(nodes, i, &format!("to_channel=news&content=l{i}")).await;
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        publish(nodes, 0, "to_uid=dana&content=user-end").await;
        publish(nodes, 0, "to_channel=news&content=topic-end").await;
    };
    let (mut dana, ()) = tokio::join!(connect_json(gw1, &query), live);
    let mut msgs = dana.until("topic-end").await;
    if !msgs.iter().any(|m| m["data"] == "user-end") {
        msgs.extend(dana.until("user-end").await);
    }
    let (topic, topic_notice) = offsets(&msgs, "topic:news");
    assert_eq!(topic, (t1 + 1..=t1 + 71).collect::<Vec<_>>(), "topic: every offset once, in order");
    let (n, ok) = topic_notice.expect("topic recovered notice");
    assert!(ok && n >= 50, "the notice follows the 50 missed messages (at {n})");
    let (user, user_notice) = offsets(&msgs, "user:dana");
    assert_eq!(user, (u0 + 1..=u0 + 11).collect::<Vec<_>>(), "user: every offset once, in order");
    assert!(user_notice.is_some_and(|(n, ok)| ok && n >= 10));
    let datas: Vec<&str> = msgs.iter().filter_map(|m| m["data"].as_str()).collect();
    assert_eq!(&datas.iter().filter(|d| d.starts_with('m')).copied().collect::<Vec<_>>()[..3], ["m0", "m1", "m2"]);
    close(dana.ws).await;

    // A position from another epoch, or older than the window: told, and live goes on.
    let stale = format!("token={}&recover=topic:news:0000dead:{t1}", token("dana", &["news"]));
    let mut c = connect_json(gw0, &stale).await;
    assert_eq!(c.next().await, serde_json::json!({"channel": "topic:news", "recovered": false}));
    publish(nodes, 0, "to_channel=news&content=after-stale").await;
    assert_eq!(c.next().await["data"], "after-stale");
    close(c.ws).await;
    let (w0, old_epoch) = publish(nodes, 0, "to_channel=old&content=w0").await;
    for i in 0..105 {
        publish(nodes, i, &format!("to_channel=old&content=w{}", i + 1)).await;
    }
    let old = format!("token={}&recover=topic:old:{old_epoch}:{w0}", token("erin", &["old"]));
    let mut c = connect_json(gw1, &old).await;
    assert_eq!(c.next().await, serde_json::json!({"channel": "topic:old", "recovered": false}), "beyond 100");
    close(c.ws).await;

    // The history as tools read it.
    let (status, body) = http_get(&nodes.publishers[0], "/history?channel=topic:news&since=0&limit=5").await;
    assert_eq!(status, 200, "{body}");
    let h: Value = serde_json::from_str(&body).expect("JSON");
    assert_eq!(
        (h["epoch"].as_str(), h["offset"].as_u64(), h["more"].as_bool()),
        (Some(&*topic_epoch), Some(t1 + 72), Some(true))
    );
    let first: Vec<(u64, &str)> = h["publications"]
        .as_array()
        .expect("publications")
        .iter()
        .map(|p| (p["offset"].as_u64().expect("offset"), p["data"].as_str().expect("data")))
        .collect();
    assert_eq!(first, [(1, "t0"), (2, "t1"), (3, "m0"), (4, "m1"), (5, "m2")]);
    for bad in [
        "/history?channel=NODE-0",
        "/history?channel=topic:a&since=x",
        "/history?since=1",
        "/history?channel=broadcast&x=1",
    ] {
        assert_eq!(http_get(&nodes.publishers[0], bad).await.0, 400, "{bad}");
    }
    // Refused connection parameters.
    for (query, why) in [
        ("recover=broadcast:ab:1", "needs format=json"),
        ("format=xml", "format"),
        ("format=json&recover=topic:secret:ab:1", "not a channel of this connection"),
        ("format=json&recover=broadcast:ab:x", "not a number"),
    ] {
        let url = format!("ws://{}/?{query}", gw0.0);
        match tokio_tungstenite::connect_async(url).await {
            Err(tokio_tungstenite::tungstenite::Error::Http(r)) => {
                let body = String::from_utf8_lossy(r.body().as_deref().unwrap_or_default()).into_owned();
                assert_eq!(r.status().as_u16(), 400, "{query}");
                assert!(body.contains(why), "{query}: {body}");
            }
            other => panic!("{query}: expected 400, got {:?}", other.map(|_| ())),
        }
    }
    // A seed client still gets the seed's bytes.
    let mut seed = connect(gw0).await;
    publish(nodes, 0, "content=plain").await;
    assert_eq!(next_text(&mut seed.ws).await.as_deref(), Some("plain"));
}

/// Bursts through a one-message subscription buffer lose messages between broker and worker;
/// the worker notices from the offsets and fills the gaps from history, so the client still gets
/// every offset once, in order.
pub async fn gaps_are_filled(nodes: &Nodes) {
    let gw = &nodes.gateways[0];
    let mut c = connect_json(gw, "").await;
    let mut last = String::new();
    let mut expected = Vec::new();
    for round in 0..20 {
        let burst = futures_util::stream::iter(0..40)
            .map(|i| async move { publish(nodes, i, &format!("content=b{round}-{i}")).await })
            .buffer_unordered(40)
            .collect::<Vec<_>>()
            .await;
        expected.extend(burst.into_iter().map(|(o, _)| o));
        tokio::time::sleep(Duration::from_millis(50)).await;
        last = format!("end{round}");
        expected.push(publish(nodes, 0, &format!("content={last}")).await.0);
        if metric(gw, "pushwire_gaps_total").await > 0 {
            break;
        }
    }
    let msgs = c.until(&last).await;
    let (got, notice) = offsets(&msgs, "broadcast");
    expected.sort_unstable();
    assert_eq!(got, expected, "every broadcast once, in order of offset");
    assert_eq!(notice, None, "nothing was lost for good");
    assert!(metric(gw, "pushwire_gaps_total").await > 0, "the tiny buffer made gaps");
    assert_eq!(metric(gw, "pushwire_gaps_unrepaired_total").await, 0);
}

impl Nodes {
    /// The gateways and publishers of a seed cluster.
    pub fn of(cluster: &Cluster) -> Nodes {
        Nodes { gateways: cluster.gateways.to_vec(), publishers: cluster.publishers.to_vec() }
    }

    /// The gateway and publisher of a standalone process.
    pub fn standalone(gateway: u16, publisher: u16) -> Nodes {
        Nodes { gateways: vec![Addr::from(gateway)], publishers: vec![Addr::from(publisher)] }
    }
}
