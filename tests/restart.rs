//! Kill and restart the channel server: publishes during the outage get 503, never a false `ok`;
//! gateways and publishers reconnect and pushes reach every client again within seconds.

mod common;

use std::time::{Duration, Instant};

use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn channel_server_restart() {
    let mut cluster = Cluster::start(None).await;
    let clients = cluster.clients(40).await;
    let clients = check_seed_pushes(&cluster, clients, "before").await;

    cluster.procs[0].kill();
    let started = Instant::now();
    let mut refused = 0;
    while started.elapsed() < Duration::from_secs(2) {
        let (status, body) = cluster.publish(0, "content=during").await;
        assert_ne!(status, 200, "no ok while the channel server is down");
        assert_eq!(status, 503, "{body}");
        assert!(body.contains("broker"), "reason names the broker: {body}");
        refused += 1;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(refused > 5);

    let port = cluster.channel_port;
    let restarted = Instant::now();
    cluster.procs[0] = Proc::start(&["channel", "--listen", &format!("127.0.0.1:{port}")], &[port]).await;
    cluster.wait_healthy().await;
    let back = restarted.elapsed();
    assert!(back < Duration::from_secs(10), "links back after {back:?}");
    let clients = check_seed_pushes(&cluster, clients, "after").await;
    // Nobody received the refused publishes.
    for mut c in clients {
        assert_eq!(next_text_within(&mut c.ws, Duration::from_millis(50)).await, None);
    }
}
