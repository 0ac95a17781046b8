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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_id_pins_worker_ids() {
    let (c, g) = (free_port(), free_port());
    let _ch = Proc::start(&["channel", "--listen", &format!("127.0.0.1:{c}")], &[c]).await;
    let _gw = Proc::start(
        &[
            "gateway",
            "--listen",
            &format!("127.0.0.1:{g}"),
            "--broker",
            &format!("127.0.0.1:{c}"),
            "--node-id",
            "web7",
            "--workers",
            "3",
        ],
        &[g],
    )
    .await;
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..3 {
        let cl = connect(g).await;
        assert_eq!(cl.conn, "1", "connection ids count per worker");
        seen.insert(cl.worker);
    }
    assert_eq!(seen.into_iter().collect::<Vec<_>>(), ["web7-0", "web7-1", "web7-2"]);
}
