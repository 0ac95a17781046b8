//! The seed's cluster on a real Redis server: broadcast and targeted pushes with zero
//! misdeliveries, a Redis restart and a Sentinel failover that gateways and publishers ride out
//! without losing a confirmed push, and health that means subscribed.

mod common;

use std::time::Duration;

use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_on_redis() {
    let Some((_redis, url)) = redis_broker().await else { return };
    let cluster = Cluster::start(Some(url)).await;
    let clients = cluster.clients(200).await;
    check_seed_pushes(&cluster, clients, "r").await;
}

/// A Redis restart under continuous publishing: 503 while it is down, and every publish answered
/// `ok` (before, during and after) reaches every client exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_restart_under_load_loses_no_confirmed_push() {
    if !have(&["redis-server"], false) {
        return;
    }
    let port = free_port();
    let redis = redis_server(port).await;
    let cluster = Cluster::start(Some(format!("redis://127.0.0.1:{port}"))).await;
    let clients = check_seed_pushes(&cluster, cluster.clients(20).await, "before").await;
    let (clients, _redis) = every_ok_across_a_redis_restart(&cluster, clients, port, redis).await;
    for g in &cluster.gateways {
        assert!(metric(g, "pushwire_broker_reconnects").await >= 1, "gateway reconnected");
    }
    check_seed_pushes(&cluster, clients, "after").await;
}

/// `/healthz` says 200 only once the gateway's subscriptions are in place: a push published the
/// moment every node is healthy reaches a client connected just before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healthy_means_subscribed() {
    if !have(&["redis-server"], false) {
        return;
    }
    for round in 0..5 {
        let port = free_port();
        let _redis = redis_server(port).await;
        let cluster = Cluster::start(Some(format!("redis://127.0.0.1:{port}"))).await;
        let mut c = connect(&cluster.gateways[0]).await;
        assert_eq!(cluster.publish(0, "content=first").await.0, 200);
        assert_eq!(
            next_text_within(&mut c.ws, Duration::from_secs(2)).await.as_deref(),
            Some("first"),
            "round {round}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prefixes_keep_two_clusters_apart_on_one_redis() {
    if !have(&["redis-server"], false) {
        return;
    }
    let port = free_port();
    let _redis = redis_server(port).await;
    let url = format!("redis://127.0.0.1:{port}");
    let (g1, g2, p1, p2) = (free_port(), free_port(), free_port(), free_port());
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
    let _p2 = Proc::start(
        &["publisher", "--listen", &format!("127.0.0.1:{p2}"), "--broker", &url, "--broker-prefix", "app2."],
        &[p2],
    )
    .await;
    for p in [g1, g2, p1, p2] {
        wait_healthy(p).await;
    }
    let mut a = connect(g1).await;
    let mut b = connect(g2).await;
    assert_eq!(http_get(p1, "/?content=only-app1").await.0, 200);
    assert_eq!(next_text(&mut a.ws).await.as_deref(), Some("only-app1"));
    // app2's own push is the first thing its client gets: it heard nothing of app1's.
    assert_eq!(http_get(p2, "/?content=only-app2").await.0, 200);
    assert_eq!(next_text(&mut b.ws).await.as_deref(), Some("only-app2"), "app2 hears nothing of app1");
    assert_eq!(http_get(p1, "/?content=app1-again").await.0, 200);
    assert_eq!(next_text(&mut a.ws).await.as_deref(), Some("app1-again"), "nor app1 of app2");
}

/// Behind Sentinel: nodes find the primary through a sentinel, and when the primary dies and the
/// sentinel promotes its replica, they follow it: pushes flow again, with no confirmed one lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sentinel_failover() {
    if !have(&["redis-server", "redis-cli"], false) {
        return;
    }
    let (primary, replica, sentinel) = (free_port(), free_port(), free_port());
    let mut primary_proc = Some(redis_server(primary).await);
    let (r, p) = (replica.to_string(), primary.to_string());
    let args =
        ["--port", &r, "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--replicaof", "127.0.0.1", &p];
    let _replica = Proc::program(&find_program("redis-server"), &args, &[replica]).await;
    let conf = std::env::temp_dir().join(format!("pushwire-sentinel-{}-{sentinel}.conf", std::process::id()));
    std::fs::write(
        &conf,
        format!(
            "port {sentinel}\nbind 127.0.0.1\nsentinel monitor pw 127.0.0.1 {primary} 1\n\
             sentinel down-after-milliseconds pw 500\nsentinel failover-timeout pw 2000\n"
        ),
    )
    .expect("sentinel config");
    let conf_path = conf.to_string_lossy().into_owned();
    let _sentinel = Proc::program(&find_program("redis-server"), &[&conf_path, "--sentinel"], &[sentinel]).await;
    let cluster = Cluster::start(Some(format!("redis-sentinel://127.0.0.1:{sentinel}?sentinelServiceName=pw"))).await;
    let clients = check_seed_pushes(&cluster, cluster.clients(20).await, "before").await;
    let failover = async {
        tokio::time::sleep(Duration::from_millis(300)).await;
        if let Some(mut p) = primary_proc.take() {
            p.kill();
            *cluster.broker_killed_at.lock().expect("lock") = Some(tokio::time::Instant::now());
        }
        // The sentinel notices after 500 ms and promotes the replica; the nodes follow it.
        for _ in 0..200 {
            let (status, _) = http_get(&cluster.publishers[0], "/healthz").await;
            let info = std::process::Command::new(find_program("redis-cli"))
                .args(["-p", &r, "info", "replication"])
                .output()
                .map(|o| String::from_utf8_lossy(&o.stdout).contains("role:master"))
                .unwrap_or(false);
            if status == 200 && info {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        cluster.wait_healthy().await;
    };
    let (clients, confirmed, refused) = every_ok_arrives(&cluster, clients, "live", failover).await;
    assert!(confirmed > 10 && refused > 0, "confirmed {confirmed}, refused {refused}");
    check_seed_pushes(&cluster, clients, "after").await;
    let _ = std::fs::remove_file(conf);
}
