//! Presence and the backend's hold on connections: `/online`, `/presence` and `/cluster` counted
//! across gateways; `/bind`, `/unbind`, `/join`, `/leave` on a live connection (404 for one that
//! does not exist); a gateway killed with -9 drops out of every count within its lease.

mod common;

use std::time::Duration;

use common::*;

const SECRET: &str = "presence-test-secret";
const LEASE: Duration = Duration::from_secs(3);

async fn connect_as(gw: &Addr, sub: &str, channels: &[&str]) -> Client {
    connect_with(gw, &user_token(SECRET, sub, channels)).await
}

async fn json(addr: &Addr, method: &str, target: &str, body: &str) -> (u16, serde_json::Value) {
    let headers = [("Content-Type", "application/x-www-form-urlencoded")];
    let (status, text) = http(addr, method, target, &headers, body).await;
    (status, serde_json::from_str(&text).unwrap_or_else(|e| panic!("{target}: {e}: {text:?}")))
}

async fn online(p: &Addr, uid: &str) -> u64 {
    let (status, v) = json(p, "GET", &format!("/online?uid={uid}"), "").await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["uid"], uid);
    v["connections"].as_u64().expect("connections")
}

async fn presence_on(broker: Option<String>) {
    let lease = format!("{}s", LEASE.as_secs());
    let mut cluster = Cluster::start_with(broker, &["--token-secret", SECRET, "--presence-lease", &lease], &[]).await;
    let (g0, g1, p) =
        (Addr::from(&cluster.gateways[0]), Addr::from(&cluster.gateways[1]), Addr::from(&cluster.publishers[0]));
    let (g0, g1, p) = (&g0, &g1, &p);
    let _alice =
        [connect_as(g0, "alice", &[]).await, connect_as(g0, "alice", &[]).await, connect_as(g1, "alice", &[]).await];
    let _bob = connect_as(g1, "bob", &["room"]).await;
    let _carol = connect_as(g0, "carol", &["room"]).await;
    let mut anon = connect(g0).await;
    // Counts come from the gateways' heartbeats (every third of the lease): wait until the
    // publisher has heard both gateways since all six connections opened.
    for _ in 0..100 {
        let (_, v) = json(p, "GET", "/cluster", "").await;
        let gws = v["gateways"].as_array().cloned().unwrap_or_default();
        if gws.len() == 2 && gws.iter().map(|g| g["connections"].as_u64().unwrap_or(0)).sum::<u64>() == 6 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    assert_eq!(online(p, "alice").await, 3);
    assert_eq!(online(p, "nobody").await, 0);
    let (_, v) = json(p, "GET", "/presence?channel=room", "").await;
    assert_eq!(v, serde_json::json!({"channel": "room", "connections": 2, "uids": ["bob", "carol"], "uids_total": 2}));
    let (_, v) = json(p, "GET", "/presence?channel=room&limit=1", "").await;
    assert_eq!((v["uids"].as_array().map(Vec::len), v["uids_total"].as_u64()), (Some(1), Some(2)));
    let (_, v) = json(p, "GET", "/cluster", "").await;
    let gws = v["gateways"].as_array().expect("gateways");
    assert_eq!(gws.len(), 2, "{v}");
    assert_eq!(gws.iter().map(|g| g["connections"].as_u64().unwrap_or(0)).sum::<u64>(), 6);
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_pushwire"))
        .args(["status", "--publisher", &format!("http://{}", p.0)])
        .output()
        .expect("pushwire status");
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && table.contains("2 gateway(s) alive"), "{table}");
    for g in gws {
        assert!(table.contains(g["node"].as_str().unwrap_or("?")), "{table}");
    }

    // The backend binds a tokenless connection to a user and puts it in a topic.
    let pair = format!("to_worker_id={}&to_connection_id={}", anon.worker, anon.conn);
    assert_eq!(json(p, "POST", "/bind", &format!("{pair}&uid=dave")).await, (200, serde_json::json!({"ok": true})));
    assert_eq!(json(p, "POST", "/join", &format!("{pair}&channel=room")).await.0, 200);
    assert_eq!(online(p, "dave").await, 1);
    assert_eq!(cluster.publish(0, "to_uid=dave&content=to-dave").await.0, 200);
    assert_eq!(next_text(&mut anon.ws).await.as_deref(), Some("to-dave"));
    assert_eq!(cluster.publish(1, "to_channel=room&content=room-1").await.0, 200);
    assert_eq!(next_text(&mut anon.ws).await.as_deref(), Some("room-1"));
    assert_eq!(json(p, "GET", "/presence?channel=room", "").await.1["connections"], 3);
    assert_eq!(json(p, "POST", "/leave", &format!("{pair}&channel=room")).await.0, 200);
    assert_eq!(json(p, "POST", "/unbind", &format!("{pair}&uid=dave")).await.0, 200);
    assert_eq!(cluster.publish(0, "to_channel=room&content=room-2").await.0, 200);
    assert_eq!(cluster.publish(0, "to_uid=dave&content=to-dave-2").await.0, 200);
    assert_eq!(cluster.publish(0, "content=marker").await.0, 200);
    assert_eq!(next_text(&mut anon.ws).await.as_deref(), Some("marker"), "left the topic, unbound");
    assert_eq!(online(p, "dave").await, 0);

    // Refusals.
    let missing = format!("to_worker_id={}&to_connection_id=999999&uid=x", anon.worker);
    let (status, v) = json(p, "POST", "/bind", &missing).await;
    assert_eq!((status, v["ok"].as_bool()), (404, Some(false)), "{v}");
    assert_eq!(json(p, "POST", "/bind", "to_worker_id=broadcast&to_connection_id=1&uid=x").await.0, 400);
    assert_eq!(json(p, "POST", "/join", &format!("{pair}&channel=a%20b")).await.0, 400);
    assert_eq!(json(p, "GET", "/online?uid=a&extra=1", "").await.0, 400);
    assert_eq!(http(p, "GET", "/bind", &[], "").await.0, 405);

    // A gateway killed with -9 drops out of every count within its lease.
    let gw1 = cluster.procs.len() - 3;
    cluster.procs[gw1].kill();
    let killed = std::time::Instant::now();
    while online(p, "alice").await != 2 {
        assert!(killed.elapsed() < LEASE + Duration::from_secs(2), "the killed gateway still counts");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(json(p, "GET", "/presence?channel=room", "").await.1["uids"], serde_json::json!(["carol"]));
    let deadline = killed + LEASE + Duration::from_secs(2);
    loop {
        let n = json(p, "GET", "/cluster", "").await.1["gateways"].as_array().map_or(0, Vec::len);
        if n == 1 {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "the killed gateway is still listed after its lease");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_the_channel_server() {
    presence_on(None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_redis() {
    let Some((_redis, url)) = redis_broker().await else { return };
    presence_on(Some(url)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_nats() {
    let Some((_nats, url)) = nats_broker().await else { return };
    presence_on(Some(url)).await;
}
