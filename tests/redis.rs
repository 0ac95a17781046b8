//! The seed's cluster on a real Redis server: broadcast and targeted pushes with zero
//! misdeliveries, and a Redis restart that gateways and publishers ride out.

mod common;

use std::time::Duration;

use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_on_redis() {
    let port = free_port();
    let _redis = redis_server(port).await;
    let cluster = Cluster::start(Some(format!("redis://127.0.0.1:{port}"))).await;
    let clients = cluster.clients(200).await;
    check_seed_pushes(&cluster, clients, "r").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_restart_resubscribes() {
    let port = free_port();
    let mut redis = redis_server(port).await;
    let cluster = Cluster::start(Some(format!("redis://127.0.0.1:{port}"))).await;
    let clients = check_seed_pushes(&cluster, cluster.clients(20).await, "before").await;

    redis.kill();
    let mut refused = false;
    for _ in 0..50 {
        let (status, body) = cluster.publish(0, "content=down").await;
        assert_ne!(status, 200, "no ok while Redis is down: {body}");
        if status == 503 {
            refused = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(refused, "publish during the outage answered 503");

    let _redis = redis_server(port).await;
    cluster.wait_healthy().await;
    check_seed_pushes(&cluster, clients, "after").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prefixes_keep_two_clusters_apart_on_one_redis() {
    let port = free_port();
    let _redis = redis_server(port).await;
    let url = format!("redis://127.0.0.1:{port}");
    let (g1, g2, p1) = (free_port(), free_port(), free_port());
    let _a = Proc::start(
        &["gateway", "--listen", &format!("127.0.0.1:{g1}"), "--broker", &url, "--broker-prefix", "app1."],
        &[g1],
    )
    .await;
    let _b = Proc::start(
        &["gateway", "--listen", &format!("127.0.0.1:{g2}"), "--broker", &url, "--broker-prefix", "app2."],
        &[g2],
    )
    .await;
    let _p = Proc::start(
        &["publisher", "--listen", &format!("127.0.0.1:{p1}"), "--broker", &url, "--broker-prefix", "app1."],
        &[p1],
    )
    .await;
    for p in [g1, g2, p1] {
        wait_healthy(p).await;
    }
    let mut a = connect(g1).await;
    let mut b = connect(g2).await;
    assert_eq!(http_get(p1, "/?content=only-app1").await.0, 200);
    assert_eq!(next_text(&mut a.ws).await.as_deref(), Some("only-app1"));
    assert_eq!(next_text_within(&mut b.ws, Duration::from_millis(300)).await, None, "app2 hears nothing of app1");
}
