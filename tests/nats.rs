//! The seed's cluster on real NATS servers, and failover across a three-node NATS cluster.

mod common;

use std::time::Duration;

use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_on_nats() {
    let port = free_port();
    let _nats = nats_server(port, None, None).await;
    let cluster = Cluster::start(Some(format!("nats://127.0.0.1:{port}"))).await;
    let clients = cluster.clients(200).await;
    check_seed_pushes(&cluster, clients, "n").await;
}

/// Wait until the NATS server with monitoring port `m` has `n` routes.
async fn wait_routes(m: u16, n: usize) {
    for _ in 0..200 {
        let (status, body) = http_get(m, "/routez").await;
        if status == 200 && body.contains(&format!("\"num_routes\": {n}")) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("NATS routes never formed on monitor port {m}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failover_across_a_three_node_nats_cluster() {
    let ports = [free_port(), free_port(), free_port()];
    let routes = [free_port(), free_port(), free_port()];
    let monitors = [free_port(), free_port(), free_port()];
    let mut nodes = Vec::new();
    for i in 0..3 {
        let others: Vec<u16> = (0..3).filter(|j| *j != i).map(|j| routes[j]).collect();
        nodes.push(Some(nats_server(ports[i], Some((routes[i], &others)), Some(monitors[i])).await));
    }
    for m in monitors {
        wait_routes(m, 2).await;
    }
    // Gateway 1 prefers node 0, gateway 2 node 1; publishers prefer node 2, then node 0.
    let list = |order: [usize; 3]| format!("nats://{}", order.map(|i| format!("127.0.0.1:{}", ports[i])).join(","));
    let (g1, g2, p1, p2) = (free_port(), free_port(), free_port(), free_port());
    let mut procs = Vec::new();
    for (port, role, order) in [
        (g1, "gateway", [0, 1, 2]),
        (g2, "gateway", [1, 2, 0]),
        (p1, "publisher", [2, 0, 1]),
        (p2, "publisher", [2, 1, 0]),
    ] {
        procs.push(
            Proc::start(&[role, "--listen", &format!("127.0.0.1:{port}"), "--broker", &list(order)], &[port]).await,
        );
    }
    for p in [g1, g2, p1, p2] {
        wait_healthy(p).await;
    }
    let cluster = Cluster {
        procs,
        channel_port: 0,
        gateways: [g1.into(), g2.into()],
        publishers: [p1.into(), p2.into()],
        key_query: String::new(),
    };
    let clients = check_seed_pushes(&cluster, cluster.clients(60).await, "before").await;

    // Kill the node gateway 1 is connected to; it moves to node 1 of its list.
    nodes[0] = None;
    tokio::time::sleep(Duration::from_millis(200)).await;
    for p in [g1, g2, p1, p2] {
        wait_healthy(p).await;
    }
    // Routes between the two survivors carry the pushes to both gateways.
    let mut all_back = false;
    for _ in 0..100 {
        let (status, _) = http_get(g1, "/metrics").await;
        assert_eq!(status, 200);
        if http_get(g1, "/healthz").await.0 == 200 {
            all_back = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(all_back);
    check_seed_pushes(&cluster, clients, "after").await;
}
