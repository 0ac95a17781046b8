//! The seed's cluster on real NATS servers, and failover across a three-node NATS cluster.

mod common;

use std::time::Duration;

use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_on_nats() {
    let Some((_nats, url)) = nats_broker().await else { return };
    let cluster = Cluster::start(Some(url)).await;
    let clients = cluster.clients(200).await;
    check_seed_pushes(&cluster, clients, "n").await;
}

/// Wait until every NATS server (monitoring ports `monitors`) has `n` routes, and keeps them for a
/// second: a cluster that has just formed may still open a second route between two nodes and drop
/// one of them, losing what was on it.
async fn wait_routes(monitors: &[u16], n: usize) {
    let mut stable = 0;
    for _ in 0..200 {
        let mut all = true;
        for m in monitors {
            let (status, body) = http_get(*m, "/routez").await;
            all &= status == 200 && body.contains(&format!("\"num_routes\": {n}"));
        }
        stable = if all { stable + 1 } else { 0 };
        if stable == 10 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("NATS routes never settled on monitor ports {monitors:?}");
}

/// Two gateways and two publishers, each given the address of one NATS node only (`on`: the
/// node indexes of gateway 1, gateway 2, publisher 1, publisher 2 into `ports`), the publishers
/// with `publisher_args` too; once healthy.
async fn nodes_on(ports: &[u16], on: [usize; 4], publisher_args: &[&str]) -> Cluster {
    let mine = [free_port(), free_port(), free_port(), free_port()];
    let mut procs = Vec::new();
    for (i, (port, node)) in mine.into_iter().zip(on).enumerate() {
        let (listen, broker) = (format!("127.0.0.1:{port}"), format!("nats://127.0.0.1:{}", ports[node]));
        let role = if i < 2 { "gateway" } else { "publisher" };
        let mut args = vec![role, "--listen", &listen, "--broker", &broker];
        if role == "publisher" {
            args.extend_from_slice(publisher_args);
        }
        procs.push(Proc::start(&args, &[port]).await);
    }
    let [g1, g2, p1, p2] = mine.map(Addr::from);
    Cluster::of(procs, 0, [g1, g2], [p1, p2]).await
}

/// How a NATS node leaves.
#[derive(Clone, Copy, PartialEq)]
enum Leave {
    /// Killed.
    Crash,
    /// Told to enter lame-duck mode: it announces it, then closes its clients over the next
    /// 10 s grace period and 30 s.
    LameDuck,
}

/// The NATS node that gateway 1 and both publishers are connected to leaves, under continuous
/// publishing. Each was given that node's address only: they must find the others from the
/// cluster's announcements, reconnect, and lose no confirmed push (publishes wait for the settle
/// time after a reconnection, so gateway 1 has resubscribed before any is confirmed).
async fn node_leaves(how: Leave) {
    let ports = [free_port(), free_port(), free_port()];
    let routes = [free_port(), free_port(), free_port()];
    let monitors = [free_port(), free_port(), free_port()];
    let mut nodes = Vec::new();
    // Each node routes only to the nodes started before it: one side opens each route, so no
    // duplicate routes are made and dropped (messages on a dropped route are lost) while the tests
    // already publish.
    for i in 0..3 {
        let earlier: Vec<u16> = routes[..i].to_vec();
        nodes.push(Some(nats_server(ports[i], Some((routes[i], &earlier)), Some(monitors[i])).await));
    }
    wait_routes(&monitors, 2).await;
    let cluster = nodes_on(&ports, [0, 1, 0, 0], &[]).await;
    let ([g1, g2], [p1, p2]) = (&cluster.gateways, &cluster.publishers);
    let clients = cluster.clients(60).await;
    wait_interest(&cluster, &clients).await;
    let clients = check_seed_pushes(&cluster, clients, "before").await;
    let started = tokio::time::Instant::now();
    let leave = async {
        tokio::time::sleep(Duration::from_millis(300)).await;
        match how {
            // A push confirmed in the instant before the kill may not have been written to its
            // subscribers yet (core NATS confirms handling, not delivery): publishing pauses
            // around the kill and goes on right after it.
            Leave::Crash => {
                cluster.paused.store(true, std::sync::atomic::Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(200)).await;
                nodes[0] = None;
                cluster.paused.store(false, std::sync::atomic::Ordering::Relaxed);
            }
            Leave::LameDuck => {
                let pid = nodes[0].as_ref().expect("node 0").pid().to_string();
                let out = std::process::Command::new(find_program("nats-server"))
                    .arg("--signal")
                    .arg(format!("ldm={pid}"))
                    .output()
                    .expect("signal");
                assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
                for node in [g1, p1, p2] {
                    while metric(node, "pushwire_broker_reconnects").await == 0 {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        cluster.wait_healthy().await;
    };
    let (clients, confirmed, refused) = every_ok_arrives(&cluster, clients, "live", leave).await;
    assert!(confirmed > 10, "confirmed {confirmed}, refused {refused}");
    for (node, reconnected) in [(g1, true), (p1, true), (p2, true), (g2, false)] {
        assert_eq!(metric(node, "pushwire_broker_reconnects").await >= 1, reconnected, "node {node}");
    }
    if how == Leave::LameDuck {
        // Moved on its own announcement, long before the server would have closed anyone.
        assert!(started.elapsed() < Duration::from_secs(8), "took {:?}", started.elapsed());
        assert!(nodes[0].is_some());
    }
    check_seed_pushes(&cluster, clients, "after").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_loss_across_a_three_node_nats_cluster() {
    if !have(&["nats-server"], false) {
        return;
    }
    node_leaves(Leave::Crash).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lame_duck_node_is_left_at_once() {
    if !have(&["nats-server"], false) {
        return;
    }
    node_leaves(Leave::LameDuck).await;
}

/// Wait until the publishers' NATS node routes every worker's subject: a node learns of
/// subscriptions on the other nodes of a cluster that has just formed a little later than the
/// subscribing gateway sees them confirmed. A push to connection 0 of each worker must reach its
/// gateway (where it is counted as undeliverable).
async fn wait_interest(cluster: &Cluster, clients: &[Client]) {
    let workers: std::collections::BTreeSet<(usize, &str)> =
        clients.iter().enumerate().map(|(i, c)| (i % 2, c.worker.as_str())).collect();
    for (g, w) in workers {
        let gateway = &cluster.gateways[g];
        let mut routed = false;
        for _ in 0..100 {
            let before = metric(gateway, "pushwire_undeliverable_total").await;
            assert_eq!(
                cluster.publish(0, &format!("to_worker_id={}&to_connection_id=0&content=probe", q(w))).await.0,
                200
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
            if metric(gateway, "pushwire_undeliverable_total").await > before {
                routed = true;
                break;
            }
        }
        assert!(routed, "worker {w} never became reachable through the publishers' node");
    }
}

/// A server error that does not close the connection (a permissions violation) leaves the link
/// up: no reconnection, and the next pushes go through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_permissions_violation_keeps_the_link() {
    if !have(&["nats-server"], false) {
        return;
    }
    let port = free_port();
    let conf = std::env::temp_dir().join(format!("pushwire-nats-{}-{port}.conf", std::process::id()));
    std::fs::write(
        &conf,
        format!(
            "listen: 127.0.0.1:{port}\nauthorization {{ users = [ {{ user: pw, password: s3cret, permissions: {{ publish: {{ deny: [\"pushwire.d.forbidden-0\"] }} }} }} ] }}\n"
        ),
    )
    .expect("config");
    let _nats = Proc::program(&find_program("nats-server"), &["-c", conf.to_str().expect("path")], &[port]).await;
    let url = format!("nats://pw:s3cret@127.0.0.1:{port}");
    let (g, p) = (free_port(), free_port());
    let _g = Proc::start(&["gateway", "--listen", &format!("127.0.0.1:{g}"), "--broker", &url], &[g]).await;
    let pub_node =
        Proc::start_logged(&["publisher", "--listen", &format!("127.0.0.1:{p}"), "--broker", &url], &[p]).await;
    wait_healthy(g).await;
    wait_healthy(p).await;
    let mut c = connect(g).await;
    http_get(p, "/?to_worker_id=forbidden-0&to_connection_id=1&content=denied").await;
    let deadline = tokio::time::Instant::now() + WAIT;
    while !pub_node.log().contains("Permissions Violation") {
        assert!(tokio::time::Instant::now() < deadline, "the server never refused the publish:\n{}", pub_node.log());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(http_get(p, "/?content=still-up").await.0, 200);
    assert_eq!(next_text(&mut c.ws).await.as_deref(), Some("still-up"));
    assert_eq!(metric(p, "pushwire_broker_reconnects").await, 0, "the link was not dropped");
    assert_eq!(http_get(p, "/healthz").await.0, 200);
    let _ = std::fs::remove_file(conf);
}

/// A server that authenticates users by nkey: a node with the user's seed (`--nats-nkey`) gets in
/// and pushes go through; one with another user's seed never becomes healthy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nkey_authentication() {
    if !have(&["nats-server"], false) {
        return;
    }
    let (user, stranger) = (nkeys::KeyPair::new_user(), nkeys::KeyPair::new_user());
    let port = free_port();
    let dir = std::env::temp_dir().join(format!("pushwire-nkey-{}-{port}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let conf = dir.join("nats.conf");
    let pk = user.public_key();
    std::fs::write(&conf, format!("listen: 127.0.0.1:{port}\nauthorization {{ users = [ {{ nkey: {pk} }} ] }}\n"))
        .expect("config");
    let (good, bad) = (dir.join("user.nk"), dir.join("stranger.nk"));
    std::fs::write(&good, user.seed().expect("seed")).expect("seed file");
    std::fs::write(&bad, stranger.seed().expect("seed")).expect("seed file");
    let _nats = Proc::program(&find_program("nats-server"), &["-c", conf.to_str().expect("path")], &[port]).await;
    let url = format!("nats://127.0.0.1:{port}");
    let (g, p, b) = (free_port(), free_port(), free_port());
    let start = |role: &'static str, listen: u16, seed: &std::path::Path| {
        let args = [role, "--listen", &format!("127.0.0.1:{listen}"), "--broker", &url, "--nats-nkey"]
            .map(String::from)
            .into_iter()
            .chain([seed.to_string_lossy().into_owned()])
            .collect::<Vec<_>>();
        async move {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            Proc::start(&args, &[listen]).await
        }
    };
    let _g = start("gateway", g, &good).await;
    let _p = start("publisher", p, &good).await;
    let _b = start("gateway", b, &bad).await;
    wait_healthy(g).await;
    wait_healthy(p).await;
    let mut c = connect(g).await;
    assert_eq!(http_get(p, "/?content=signed").await.0, 200);
    assert_eq!(next_text(&mut c.ws).await.as_deref(), Some("signed"));
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(http_get(b, "/healthz").await.0, 503, "another user's seed is refused");
    let _ = std::fs::remove_dir_all(dir);
}

/// The node of one gateway dies while both publishers, on another node, go on publishing: the
/// pushes republished while that gateway reconnects never reach it over pub/sub, so the next
/// message of the channel shows it a gap in the offsets, and it fills the gap from the JetStream
/// history (three replicas, so the history outlives the node). Every confirmed push arrives, once,
/// in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_node_loss_is_repaired_from_jetstream() {
    if !have(&["nats-server"], false) {
        return;
    }
    let ports = [free_port(), free_port(), free_port()];
    let routes = [free_port(), free_port(), free_port()];
    let monitors = [free_port(), free_port(), free_port()];
    let store = std::env::temp_dir().join(format!("pushwire-jsc-{}-{}", std::process::id(), ports[0]));
    let _ = std::fs::remove_dir_all(&store);
    let mut nodes = Vec::new();
    for i in 0..3 {
        let dir = store.join(i.to_string());
        // A JetStream cluster needs every node to have routes configured: each to the two others.
        let others: Vec<String> =
            (0..3).filter(|&j| j != i).map(|j| format!("nats://127.0.0.1:{}", routes[j])).collect();
        let (port, name) = (ports[i].to_string(), format!("n{i}"));
        let (cluster, monitor) = (format!("nats://127.0.0.1:{}", routes[i]), monitors[i].to_string());
        let mut args = vec!["-a", "127.0.0.1", "-p", &port, "-n", &name, "--cluster_name", "pw", "--cluster", &cluster];
        let routes_arg = others.join(",");
        args.extend(["--routes", &routes_arg]);
        let dir = dir.to_string_lossy().into_owned();
        args.extend(["-m", &monitor, "-js", "-sd", &dir]);
        nodes.push(Some(Proc::program(&find_program("nats-server"), &args, &[ports[i]]).await));
    }
    wait_routes(&monitors, 2).await;
    let cluster = nodes_on(&ports, [0, 1, 2, 2], &["--history-replicas", "3"]).await;
    let ([g1, _], [p1, p2]) = (&cluster.gateways, &cluster.publishers);
    // The stream is made once the cluster has elected its JetStream leader; from then on each
    // publisher's pushes carry offsets. The warm-up goes to a topic no client joins: a publish the
    // stream answered too late for (503) may still be stored and delivered later.
    for p in [p1, p2] {
        let mut stored = false;
        for _ in 0..300 {
            let (_, body) =
                http(p, "GET", "/?to_channel=warm-up&content=warm-up", &[("Accept", "application/json")], "").await;
            if body.contains("offset") {
                stored = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(stored, "publisher {p} never stored a broadcast");
    }
    let clients = cluster.clients(40).await;
    wait_interest(&cluster, &clients).await;
    let clients = check_seed_pushes(&cluster, clients, "before").await;
    let leave = async {
        tokio::time::sleep(Duration::from_millis(300)).await;
        nodes[0] = None;
        while metric(g1, "pushwire_broker_reconnects").await == 0 {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        cluster.wait_healthy().await;
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    let (clients, confirmed, _) = every_ok_arrives(&cluster, clients, "js", leave).await;
    assert!(confirmed >= 3, "confirmed {confirmed}"); // each waits for a JetStream quorum: few on a loaded machine
    assert_eq!(metric(p1, "pushwire_broker_reconnects").await, 0, "the publishers' node stayed");
    assert_eq!(metric(g1, "pushwire_gaps_unrepaired_total").await, 0);
    eprintln!("gaps filled on the gateway that lost its node: {}", metric(g1, "pushwire_gaps_total").await);
    check_seed_pushes(&cluster, clients, "after").await;
    drop(cluster);
    drop(nodes);
    let _ = std::fs::remove_dir_all(&store);
}
