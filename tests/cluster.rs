//! The seed's cluster on loopback: one channel server, two gateways of two workers, two
//! publishers, a few hundred WebSocket clients; zero misdeliveries across gateways.

mod common;

use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broadcast_and_targeted_across_two_gateways() {
    let cluster = Cluster::start(None).await;
    let clients = cluster.clients(300).await;
    // Gateways started with identical flags got distinct node ids: four distinct worker ids.
    let workers: std::collections::HashSet<_> = clients.iter().map(|c| c.worker.clone()).collect();
    assert_eq!(workers.len(), 4, "{workers:?}");
    check_seed_pushes(&cluster, clients, "c").await;
}

/// A gateway restarted with the same `--node-id`: a `(worker, connection)` pair stored before the
/// restart reaches nobody after it, though the new connections count from 1 again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pair_from_before_a_restart_reaches_nobody() {
    let (c, g, h) = (free_port(), free_port(), free_port());
    let broker = format!("127.0.0.1:{c}");
    let _ch = Proc::start(&["channel", "--listen", &broker, "--settle", "0s"], &[c]).await;
    let _pb = Proc::start(&["publisher", "--listen", &format!("127.0.0.1:{h}"), "--broker", &broker], &[h]).await;
    let gl = format!("127.0.0.1:{g}");
    let gateway = ["gateway", "--listen", &gl, "--broker", &broker, "--node-id", "web7", "--workers", "3"];
    let mut gw = Proc::start(&gateway, &[g]).await;
    wait_healthy(g).await;
    let mut seen = std::collections::BTreeSet::new();
    let mut old = Vec::new();
    for _ in 0..3 {
        let cl = connect(g).await;
        assert_eq!(cl.conn, "1", "connection ids count per worker");
        let (node, n) = cl.worker.rsplit_once('-').expect("NODE-N");
        assert!(node.starts_with("web7.") && node.len() > 5, "node id with its start epoch: {node}");
        seen.insert(n.to_owned());
        old.push((cl.worker.clone(), cl.conn.clone()));
    }
    assert_eq!(seen.into_iter().collect::<Vec<_>>(), ["0", "1", "2"]);
    gw.terminate().await;
    let _gw = Proc::start(&gateway, &[g]).await;
    wait_healthy(g).await;
    wait_healthy(h).await;
    let mut fresh = Vec::new();
    for _ in 0..3 {
        let cl = connect(g).await;
        assert_eq!(cl.conn, "1");
        assert!(!old.iter().any(|(w, _)| *w == cl.worker), "worker id {} reused after a restart", cl.worker);
        fresh.push(cl);
    }
    for (w, conn) in &old {
        assert_eq!(publish_to(h, w, conn, "stale").await, 200);
    }
    for cl in &fresh {
        assert_eq!(publish_to(h, &cl.worker, &cl.conn, &format!("for {}", cl.worker)).await, 200);
    }
    for mut cl in fresh {
        let want = format!("for {}", cl.worker);
        assert_eq!(next_text(&mut cl.ws).await.as_deref(), Some(want.as_str()), "the stale push reached nobody");
    }
    // Not a worker: refused, not routed to a channel of that name.
    for w in ["broadcast", "pushwire:ack:00ff"] {
        assert_eq!(publish_to(h, w, "1", "x").await, 400, "{w}");
    }
}

async fn publish_to(h: u16, worker: &str, conn: &str, content: &str) -> u16 {
    http_get(h, &format!("/?to_worker_id={}&to_connection_id={conn}&content={}", q(worker), q(content))).await.0
}
