//! History and recovery: `format=json` messages with offsets, `recover=` after a disconnect (to
//! another gateway too), the seam between recovered and live messages, `recovered:false` beyond
//! the window or after an epoch change, `/history`, and gaps between broker and gateway (a tiny
//! subscription buffer) filled from history; on the in-process broker, the channel server, Redis
//! and NATS JetStream (Redis Cluster: `tests/redis_cluster.rs`).

mod common;

use common::recovery::*;
use common::*;

#[tokio::test]
async fn standalone_keeps_history() {
    let (_p, _, w, h) = standalone(&["--token-secret", SECRET]).await;
    recovery(&Nodes::standalone(w, h)).await;
}

#[tokio::test]
async fn channel_server_keeps_history() {
    let cluster = Cluster::start_with(None, &["--token-secret", SECRET], &[]).await;
    recovery(&Nodes::of(&cluster)).await;
}

#[tokio::test]
async fn gaps_are_filled_from_history() {
    let (_p, _, w, h) = standalone(&["--subscription-buffer", "1", "--workers", "1"]).await;
    gaps_are_filled(&Nodes::standalone(w, h)).await;
    let cluster = Cluster::start_with(None, &["--subscription-buffer", "1"], &[]).await;
    gaps_are_filled(&Nodes::of(&cluster)).await;
}

#[tokio::test]
async fn history_off_changes_nothing_for_clients() {
    let (_p, _, w, h) = standalone(&["--history-size", "0"]).await;
    let (gw, publisher) = (Addr::from(w), Addr::from(h));
    let mut c = connect_json(&gw, "").await;
    let (status, body) = http(&publisher, "GET", "/?content=x", &[("Accept", "application/json")], "").await;
    assert_eq!((status, body.trim()), (200, r#"{"ok":true}"#));
    assert_eq!(c.next().await, serde_json::json!({"channel": "broadcast", "data": "x"}));
    assert_eq!(http_get(&publisher, "/history?channel=broadcast").await.0, 404);
}

/// The recovery check, then the gap check (a one-message subscription buffer), each on a cluster
/// of its own on a fresh broker from `start` (skipped when the broker is not installed).
async fn broker_keeps_history<F, Fut>(start: F)
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = Option<(Proc, String)>>,
{
    let Some((_broker, url)) = start().await else { return };
    let cluster = Cluster::start_with(Some(url), &["--token-secret", SECRET], &[]).await;
    recovery(&Nodes::of(&cluster)).await;
    drop(cluster);
    let Some((_broker, url)) = start().await else { return };
    let cluster = Cluster::start_with(Some(url), &["--subscription-buffer", "1"], &[]).await;
    gaps_are_filled(&Nodes::of(&cluster)).await;
}

#[tokio::test]
async fn redis_keeps_history() {
    broker_keeps_history(redis_broker).await;
}

#[tokio::test]
async fn nats_jetstream_keeps_history() {
    broker_keeps_history(nats_broker).await;
}

/// A recovery of 5,000 messages, five times the client's queue, reaches a client that reads: the
/// history is fed as it drains its queue, then the notice, then live messages again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recovery_five_times_the_queue_succeeds() {
    const MISSED: u64 = 5000;
    let (_p, _, w, h) = standalone(&["--history-size", "10000", "--workers", "1"]).await;
    let nodes = Nodes::standalone(w, h);
    let gw = Addr::from(w);
    let (since, epoch) = publish(&nodes, 0, "content=before").await;
    let mut publishers = tokio::task::JoinSet::new();
    for batch in 0..50 {
        let publisher = nodes.publishers[0].clone();
        publishers.spawn(async move {
            for i in 0..MISSED / 50 {
                let target = format!("/?content=m{}", batch * 100 + i);
                assert_eq!(http_get(&publisher, &target).await.0, 200);
            }
        });
    }
    while let Some(r) = publishers.join_next().await {
        r.expect("publisher");
    }
    let mut c = connect_json(&gw, &format!("recover=broadcast:{epoch}:{since}")).await;
    let mut offsets = Vec::new();
    loop {
        let m = c.next().await;
        if m.get("recovered").is_some() {
            assert_eq!(m["recovered"], true, "{m}");
            break;
        }
        offsets.push(m["offset"].as_u64().expect("offset"));
    }
    assert_eq!(offsets, (since + 1..=since + MISSED).collect::<Vec<_>>(), "every message once, in order");
    let (marker, _) = publish(&nodes, 0, "content=live").await;
    let m = c.next().await;
    assert_eq!((m["data"].as_str(), m["offset"].as_u64()), (Some("live"), Some(marker)), "then live again");
    assert_eq!(metric(w, "pushwire_slow_consumer_disconnects_total").await, 0);
}
