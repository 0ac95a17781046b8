//! Channel servers that share a backend (`pushwire channel --broker URL`): PHP clients (raw frames
//! from the captured vectors) on different servers get each other's events byte for byte, once;
//! `publishLoop` messages go to one subscriber across the servers; queue items to one watcher
//! anywhere, once, also after the server they were enqueued through is killed; pushwire nodes on
//! different servers form one cluster.

mod common;

use std::time::Duration;

use channel_proto::Request;
use common::*;

/// A test running `scenario` on a Redis server of its own and one running it on a NATS server.
macro_rules! on_redis_and_nats {
    ($scenario:ident: $on_redis:ident, $on_nats:ident) => {
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $on_redis() {
            let Some((_redis, url)) = redis_broker().await else { return };
            $scenario(&url).await;
        }

        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $on_nats() {
            let Some((_nats, url)) = nats_broker().await else { return };
            $scenario(&url).await;
        }
    };
}

async fn two_servers(backend: &str) -> (Vec<Proc>, [u16; 2]) {
    let (procs, ports, _) = servers(backend, &[]).await;
    (procs, ports)
}

/// The next message any of `clients` gets within `limit`: (which client, the message, its
/// frame's payload).
async fn next_of(
    clients: &mut [ChannelClient],
    limit: Duration,
) -> Option<(usize, channel_proto::ServerMessage, bytes::Bytes)> {
    let deadline = tokio::time::Instant::now() + limit;
    while tokio::time::Instant::now() < deadline {
        for (i, c) in clients.iter_mut().enumerate() {
            if let Some(p) = c.recv_within(Duration::from_millis(10)).await {
                return Some((i, channel_proto::ServerMessage::parse(&p).expect("server message"), p));
            }
        }
    }
    None
}

/// A gateway on `broker` and a publisher on the channel server at port `server`, both healthy:
/// the processes, the gateway's port, the publisher's.
async fn gateway_and_publisher(broker: &str, server: u16) -> (Vec<Proc>, u16, u16) {
    let (g, p) = (free_port(), free_port());
    let on_server = format!("channel://127.0.0.1:{server}");
    let nodes = vec![
        Proc::start(&["gateway", "--listen", &format!("127.0.0.1:{g}"), "--broker", broker], &[g]).await,
        Proc::start(&["publisher", "--listen", &format!("127.0.0.1:{p}"), "--broker", &on_server], &[p]).await,
    ];
    for port in [g, p] {
        wait_healthy(port).await;
    }
    (nodes, g, p)
}

/// The seed's frames across two servers: a worker on one subscribes as PHP's does, the seed's
/// publisher on the other publishes; the events are PHP's bytes, each once; after an
/// unsubscribe nothing more comes (a marker published after shows it).
async fn php_frames_across_servers(backend: &str) {
    let (_procs, [a, b]) = two_servers(backend).await;
    let mut worker = ChannelClient::tcp(a).await;
    let mut other = ChannelClient::tcp(b).await;
    let mut publisher = ChannelClient::tcp(b).await;
    worker.raw(&vector("02_")).await;
    worker.raw(&vector("03_")).await;
    worker.sync().await;
    other.raw(&vector("03_")).await;
    other.sync().await;
    publisher.raw(&vector("07_")).await;
    let event = worker.recv_within(WAIT).await.expect("targeted event across servers");
    assert_eq!(&channel_proto::frame::encode(&event)[..], &vector("14_")[..]);
    publisher.raw(&vector("06_")).await;
    for c in [&mut worker, &mut other] {
        let event = c.recv_within(WAIT).await.expect("broadcast event across servers");
        assert_eq!(&channel_proto::frame::encode(&event)[..], &vector("13_")[..]);
    }
    // Once each: the next thing either gets is a marker published after.
    for c in [&mut worker, &mut other] {
        c.send(Request::Subscribe(names(&["marker"]))).await;
        c.sync().await;
    }
    publisher.send(Request::Publish { channels: names(&["marker"]), data: "i:1;".into(), keep: None }).await;
    for c in [&mut worker, &mut other] {
        let m = c.recv().await;
        assert_eq!(m.channel.as_bytes(), b"marker", "nothing came twice");
    }
}

on_redis_and_nats!(php_frames_across_servers: php_frames_across_servers_on_redis, php_frames_across_servers_on_nats);

/// pushwire nodes on two federated servers: a seed client on a gateway of one gets what a
/// publisher on the other publishes, to everyone and to its connection alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seed_cluster_across_federated_servers() {
    let Some((_redis, url)) = redis_broker().await else { return };
    let (_procs, [a, b]) = two_servers(&url).await;
    let (_nodes, g, p) = gateway_and_publisher(&format!("channel://127.0.0.1:{a}"), b).await;
    let mut c = connect(g).await;
    let (status, _) = http_get(p, "/?content=across").await;
    assert_eq!(status, 200);
    assert_eq!(next_text_within(&mut c.ws, Duration::from_secs(5)).await.as_deref(), Some("across"));
    let target = format!("/?to_worker_id={}&to_connection_id={}&content=just-you", c.worker, c.conn);
    assert_eq!(http_get(p, &target).await.0, 200);
    assert_eq!(next_text_within(&mut c.ws, Duration::from_secs(5)).await.as_deref(), Some("just-you"));
}

/// `--broker channel://A,B`: a gateway whose channel server is killed moves to the next one in
/// its list and its client gets what is published after, through the other server.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_moves_to_the_next_server_in_its_list() {
    let Some((_redis, url)) = redis_broker().await else { return };
    let (mut procs, [a, b]) = two_servers(&url).await;
    let (_nodes, g, p) = gateway_and_publisher(&format!("channel://127.0.0.1:{a},127.0.0.1:{b}"), b).await;
    let mut c = connect(g).await;
    assert_eq!(http_get(p, "/?content=before").await.0, 200);
    assert_eq!(next_text_within(&mut c.ws, Duration::from_secs(5)).await.as_deref(), Some("before"));
    procs[0].kill();
    // Published until one arrives: the gateway is on server B.
    let deadline = tokio::time::Instant::now() + WAIT;
    let mut n = 0;
    let got = loop {
        n += 1;
        assert_eq!(http_get(p, &format!("/?content=after-{n}")).await.0, 200);
        if let Some(m) = next_text_within(&mut c.ws, Duration::from_millis(200)).await {
            break m;
        }
        assert!(tokio::time::Instant::now() < deadline, "the gateway never moved to server B");
    };
    assert!(got.starts_with("after-"), "{got}");
    assert!(metric(g, "pushwire_broker_reconnects").await >= 1, "the gateway reconnected");
}

/// publishLoop through one of three servers: each message reaches exactly one subscriber across
/// them, every server's subscriber gets some, and nothing is left to come twice (an event
/// published after is the next thing each subscriber gets).
async fn publish_loop_across_servers(backend: &str) {
    let (_procs, ports, metrics) = servers::<3>(backend, &[]).await;
    let mut subscribers = Vec::new();
    for (p, m) in ports.into_iter().zip(metrics) {
        let mut c = ChannelClient::tcp(p).await;
        c.send(Request::Subscribe(names(&["jobs"]))).await;
        c.sync().await;
        wait_metric(m, "pushwire_channel_federated_channels", 1).await;
        subscribers.push(c);
    }
    let mut publisher = ChannelClient::tcp(ports[0]).await;
    // The captured frame first: its message is PHP's event bytes for whoever gets it.
    publisher.raw(&vector("08_")).await;
    let (_, first, _) = next_of(&mut subscribers, WAIT).await.expect("the captured publishLoop arrives");
    assert_eq!((first.channel.as_bytes(), &first.data[..]), (&b"jobs"[..], &b"s:1:\"x\";"[..]));
    const N: usize = 60;
    for i in 0..N {
        let data = format!("i:{i};").into();
        publisher.send(Request::PublishLoop { channels: names(&["jobs"]), data }).await;
    }
    let mut got = vec![Vec::new(); 3];
    while got.iter().map(Vec::len).sum::<usize>() < N {
        let (who, m, _) = next_of(&mut subscribers, WAIT).await.expect("every publishLoop message arrives");
        got[who].push(String::from_utf8_lossy(&m.data).into_owned());
    }
    let mut all: Vec<String> = got.concat();
    all.sort();
    all.dedup();
    assert_eq!(all.len(), N, "each message once: {got:?}");
    assert!(got.iter().all(|g| !g.is_empty()), "spread over the three servers: {got:?}");
    publisher.send(Request::Publish { channels: names(&["jobs"]), data: "s:6:\"marker\";".into(), keep: None }).await;
    for c in &mut subscribers {
        assert_eq!(&c.recv().await.data[..], b"s:6:\"marker\";", "nothing came twice");
    }
}

on_redis_and_nats!(publish_loop_across_servers: publish_loop_across_servers_on_redis, publish_loop_across_servers_on_nats);

/// Items enqueued through one server while nobody watches wait in the backend; that server is
/// killed (-9); watchers on the two others get every item once (the captured item as PHP's
/// bytes), and an item enqueued after is the next one either gets.
async fn queue_items_outlive_their_server(backend: &str) {
    let (mut procs, ports, metrics) = servers::<3>(backend, &[]).await;
    let mut producer = ChannelClient::tcp(ports[0]).await;
    producer.raw(&vector("11_")).await;
    const N: usize = 20;
    for i in 0..N {
        producer.send(Request::Enqueue { channels: names(&["queue"]), data: format!("i:{i};").into() }).await;
    }
    producer.sync().await;
    procs[0].kill();
    let depth = "pushwire_channel_queue_items{queue=\"queue\"}";
    let mut watchers = Vec::new();
    for p in &ports[1..] {
        let mut w = ChannelClient::tcp(*p).await;
        w.raw(&vector("09_")).await;
        if watchers.is_empty() {
            // Its server shows the depth of the queue watched there, as the backend counts it.
            w.sync().await;
            assert_eq!(metric(metrics[1], depth).await, N as u64 + 1, "every item waits in the backend");
            assert_eq!(metric(metrics[1], "pushwire_channel_federated_channels").await, 0);
        }
        w.raw(&vector("10_")).await;
        if watchers.is_empty() {
            // The first watcher alone gets the oldest item.
            let first = w.recv_within(WAIT).await.expect("the captured item arrives");
            assert_eq!(&channel_proto::frame::encode(&first)[..], &vector("15_")[..], "PHP's queue frame");
            w.raw(&vector("10_")).await;
        }
        watchers.push(w);
    }
    let mut got = Vec::new();
    while got.len() < N {
        let (who, m, _) = next_of(&mut watchers, WAIT).await.expect("every queued item arrives");
        assert_eq!(m.kind, channel_proto::message::ServerKind::Queue);
        got.push(String::from_utf8_lossy(&m.data).into_owned());
        watchers[who].raw(&vector("10_")).await;
    }
    // Two watchers on two servers: the order between them is not the queue's.
    let mut want: Vec<String> = (0..N).map(|i| format!("i:{i};")).collect();
    want.sort();
    got.sort();
    assert_eq!(got, want, "each item once");
    assert_eq!(metric(metrics[1], depth).await, 0, "the queue is empty");
    let mut late = ChannelClient::tcp(ports[1]).await;
    late.send(Request::Enqueue { channels: names(&["queue"]), data: "s:4:\"last\";".into() }).await;
    let (_, m, _) = next_of(&mut watchers, WAIT).await.expect("the last item arrives");
    assert_eq!(&m.data[..], b"s:4:\"last\";", "nothing came twice");
}

on_redis_and_nats!(queue_items_outlive_their_server: queue_items_outlive_their_server_on_redis, queue_items_outlive_their_server_on_nats);

/// A queue on the backend holds at most --max-queue-items: the enqueue past it is refused (its
/// client cut off) and the queue keeps what it had.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_backend_queue_refuses_more() {
    let Some((_redis, url)) = redis_broker().await else { return };
    let (_procs, [a, b], _) = servers::<2>(&url, &["--max-queue-items", "2"]).await;
    let mut producer = ChannelClient::tcp(a).await;
    for i in 0..3 {
        producer.send(Request::Enqueue { channels: names(&["q"]), data: format!("i:{i};").into() }).await;
    }
    assert!(producer.closed_within(WAIT).await, "the enqueue past the bound is refused");
    let mut watcher = ChannelClient::tcp(b).await;
    watcher.send(Request::Watch(names(&["q"]))).await;
    for want in ["i:0;", "i:1;", "s:1:\"z\";"] {
        if want.starts_with('s') {
            let mut late = ChannelClient::tcp(a).await;
            late.send(Request::Enqueue { channels: names(&["q"]), data: want.as_bytes().to_vec().into() }).await;
        }
        watcher.send(Request::Reserve).await;
        assert_eq!(&watcher.recv().await.data[..], want.as_bytes(), "the queue kept the first two, and room after");
    }
}

/// Three servers behind HAProxy, the seed's cluster (two gateways, two publishers) on HAProxy's
/// address; one server is killed (-9) while publishes go on every 20 ms: the nodes it held
/// reconnect through HAProxy to the others, and every publish answered `ok` reaches every client
/// once, in order.
async fn one_server_lost_behind_haproxy(backend: &str) {
    if !have(&["haproxy"], false) {
        return;
    }
    let (mut procs, ports, metrics) = servers::<3>(backend, &[]).await;
    let (_haproxy, lb) = haproxy(&ports, &metrics).await;
    let cluster = Cluster::start(Some(format!("channel://127.0.0.1:{lb}"))).await;
    let clients = check_seed_pushes(&cluster, cluster.clients(20).await, "before").await;
    let kill = async {
        tokio::time::sleep(Duration::from_millis(300)).await;
        procs[0].kill();
        tokio::time::sleep(Duration::from_millis(500)).await;
        cluster.wait_healthy().await;
    };
    let (clients, confirmed, refused) = every_ok_arrives(&cluster, clients, "live", kill).await;
    assert!(confirmed > 10, "confirmed {confirmed}, refused {refused}");
    let mut moved = 0;
    for node in cluster.gateways.iter().chain(&cluster.publishers) {
        moved += metric(node, "pushwire_broker_reconnects").await;
    }
    assert!(moved >= 1, "a node was on the killed server and moved");
    check_seed_pushes(&cluster, clients, "after").await;
}

on_redis_and_nats!(one_server_lost_behind_haproxy: one_server_lost_behind_haproxy_on_redis, one_server_lost_behind_haproxy_on_nats);

/// Everything above on a Redis Cluster (sharded pub/sub; each queue's keys in its own slot), on
/// one cluster to keep the suite short.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn federation_on_redis_cluster() {
    if !have(&["redis-server", "redis-cli"], false) {
        return;
    }
    let redis = common::redis_cluster::RedisCluster::start().await;
    let url = redis.url(3);
    php_frames_across_servers(&url).await;
    publish_loop_across_servers(&url).await;
    queue_items_outlive_their_server(&url).await;
    one_server_lost_behind_haproxy(&url).await;
}

/// Redis restarted (-9, then started again) under three servers behind HAProxy while publishes
/// go on: the servers' links come back, and every publish answered `ok` reaches every client
/// (but what Redis confirmed in the instant before it was killed: README, Delivery guarantees).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_restart_under_federated_servers() {
    if !have(&["redis-server", "haproxy"], false) {
        return;
    }
    let port = free_port();
    let redis = redis_server(port).await;
    let (_procs, ports, metrics) = servers::<3>(&format!("redis://127.0.0.1:{port}"), &[]).await;
    let (_haproxy, lb) = haproxy(&ports, &metrics).await;
    let cluster = Cluster::start(Some(format!("channel://127.0.0.1:{lb}"))).await;
    let clients = check_seed_pushes(&cluster, cluster.clients(20).await, "before").await;
    let (clients, _redis) = every_ok_across_a_redis_restart(&cluster, clients, port, redis).await;
    check_seed_pushes(&cluster, clients, "after").await;
    let mut refusals = 0;
    for m in metrics {
        // A backend that refused is no bad frame of the client's.
        assert_eq!(metric(m, "pushwire_channel_bad_frames_total").await, 0);
        refusals += metric(m, "pushwire_channel_backend_refusals_total").await;
    }
    assert!(refusals >= 1, "the servers closed the connections whose publishes Redis did not take");
}

/// A NATS node lost under two federated servers: each server was given that node's address only
/// (it finds the others from the cluster's announcements); gateway 1 and publisher 1 are on server
/// 1, gateway 2 and publisher 2 on server 2. The node is killed while publishes go on (paused
/// around the kill: core NATS confirms a publish when it has handled it, not when its subscribers
/// have it); both servers move to another node, and every publish answered `ok` reaches every
/// client once, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_node_lost_under_federated_servers() {
    if !have(&["nats-server"], false) {
        return;
    }
    let (ports, routes) = ([free_port(), free_port(), free_port()], [free_port(), free_port(), free_port()]);
    let mut nats = Vec::new();
    for i in 0..3 {
        // Each node routes to the nodes started before it (one side opens each route).
        nats.push(Some(nats_server(ports[i], Some((routes[i], &routes[..i])), None).await));
    }
    let (_procs, servers, _) = servers::<2>(&format!("nats://127.0.0.1:{}", ports[0]), &[]).await;
    let (mut procs, mine) = (Vec::new(), [free_port(), free_port(), free_port(), free_port()]);
    for (i, port) in mine.into_iter().enumerate() {
        let (listen, broker) = (format!("127.0.0.1:{port}"), format!("channel://127.0.0.1:{}", servers[i % 2]));
        let role = if i < 2 { "gateway" } else { "publisher" };
        procs.push(Proc::start(&[role, "--listen", &listen, "--broker", &broker], &[port]).await);
    }
    let [g1, g2, p1, p2] = mine.map(Addr::from);
    let cluster = Cluster::of(procs, servers[0], [g1, g2], [p1, p2]).await;
    let clients = check_seed_pushes(&cluster, cluster.clients(20).await, "before").await;
    let lose = async {
        tokio::time::sleep(Duration::from_millis(300)).await;
        cluster.paused.store(true, std::sync::atomic::Ordering::Relaxed);
        tokio::time::sleep(Duration::from_millis(200)).await;
        nats[0] = None;
        cluster.paused.store(false, std::sync::atomic::Ordering::Relaxed);
        tokio::time::sleep(Duration::from_millis(300)).await;
        cluster.wait_healthy().await;
    };
    let (clients, confirmed, refused) = every_ok_arrives(&cluster, clients, "live", lose).await;
    assert!(confirmed > 10, "confirmed {confirmed}, refused {refused}");
    check_seed_pushes(&cluster, clients, "after").await;
}

/// A pushwire node's answers (history pages) and confirmation markers come back in the order it
/// asked, also on a federated server: a marker that travelled through the backend would let the
/// next answer pass it, and the node would take that answer for the earlier request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_gets_its_answers_in_order() {
    let Some((_redis, url)) = redis_broker().await else { return };
    let (_procs, [a, _]) = two_servers(&url).await;
    let mut node = ChannelClient::tcp(a).await;
    node.send(Request::Subscribe(names(&["pushwire:ack:test", "pushwire:positions"]))).await;
    for i in 0..3 {
        node.send(Request::Publish { channels: names(&["broadcast"]), data: format!("i:{i};").into(), keep: None })
            .await;
    }
    node.sync().await;
    let ask = |since: u64| Request::Publish {
        channels: names(&["pushwire:history"]),
        data: pushwire::channel_ext::encode_history_request(b"broadcast", since, 10).into(),
        keep: None,
    };
    let marker = || Request::Publish { channels: names(&["pushwire:ack:test"]), data: "N;".into(), keep: None };
    let mut frames = Vec::new();
    for r in [ask(0), marker(), ask(2), marker()] {
        frames.extend(channel_proto::frame::encode(&r.encode()));
    }
    node.raw(&frames).await;
    let mut got = Vec::new();
    while got.len() < 4 {
        let m = node.recv().await;
        match m.channel.as_bytes() {
            b"pushwire:ack:test" => got.push("ack".to_owned()),
            b"pushwire:positions" => match pushwire::channel_ext::decode_page(&m.data) {
                Some(page) => got.push(format!("page of {}", page.items.len())),
                None => continue, // the position of a publish above
            },
            _ => {}
        }
    }
    assert_eq!(got, ["page of 3", "ack", "page of 1", "ack"]);
}

/// Publishes that come in together go to the backend together: they still reach a subscriber on
/// another server in order, once each, and a node still gets each publish's position before the
/// marker sent after it, positions in order.
async fn pipelined_publishes_keep_their_order(backend: &str) {
    let (_procs, [a, b]) = two_servers(backend).await;
    let mut subscriber = ChannelClient::tcp(b).await;
    subscriber.send(Request::Subscribe(names(&["broadcast"]))).await;
    subscriber.sync().await;
    let mut node = ChannelClient::tcp(a).await;
    node.send(Request::Subscribe(names(&["pushwire:ack:test", "pushwire:positions"]))).await;
    node.sync().await;
    const N: usize = 200;
    let mut frames = Vec::new();
    for i in 0..N {
        let publish = Request::Publish { channels: names(&["broadcast"]), data: format!("i:{i};").into(), keep: None };
        let marker = Request::Publish { channels: names(&["pushwire:ack:test"]), data: "N;".into(), keep: None };
        frames.extend(channel_proto::frame::encode(&publish.encode()));
        frames.extend(channel_proto::frame::encode(&marker.encode()));
    }
    node.raw(&frames).await;
    let (mut last, mut answered) = (0, false);
    for _ in 0..2 * N {
        let m = node.recv().await;
        if m.channel.as_bytes() == b"pushwire:positions" {
            let p = pushwire::channel_ext::decode_position(&m.data).expect("a position");
            assert!(!answered && p.offset > last, "one position per publish, in order, before its marker");
            (last, answered) = (p.offset, true);
        } else {
            assert_eq!(m.channel.as_bytes(), b"pushwire:ack:test");
            assert!(answered, "the marker after its publish's position");
            answered = false;
        }
    }
    for i in 0..N {
        assert_eq!(&subscriber.recv().await.data[..], format!("i:{i};").as_bytes(), "in order, once");
    }
}

on_redis_and_nats!(pipelined_publishes_keep_their_order: pipelined_publishes_keep_their_order_on_redis, pipelined_publishes_keep_their_order_on_nats);
