//! Channel servers that share a backend (`pushwire channel --broker URL`): PHP clients (raw frames
//! from the captured vectors) on different servers get each other's events byte for byte, once,
//! and pushwire nodes on different servers form one cluster.

mod common;

use std::time::Duration;

use channel_proto::Request;
use common::*;

/// Two channel servers federated on `backend`, each healthy (its backend link up).
async fn two_servers(backend: &str) -> (Vec<Proc>, [u16; 2]) {
    let ports = [free_port(), free_port()];
    let mut procs = Vec::new();
    for p in ports {
        let (listen, metrics) = (format!("127.0.0.1:{p}"), free_port());
        let args = ["--settle", "0s", "--broker", backend, "--metrics-listen", &format!("127.0.0.1:{metrics}")];
        procs.push(Proc::start(&[&["channel", "--listen", &listen][..], &args].concat(), &[p, metrics]).await);
        wait_healthy(metrics).await;
        assert_eq!(metric(metrics, "pushwire_channel_backend_up").await, 1);
    }
    (procs, ports)
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn php_frames_across_servers_on_redis() {
    let Some((_redis, url)) = redis_broker().await else { return };
    php_frames_across_servers(&url).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn php_frames_across_servers_on_nats() {
    let Some((_nats, url)) = nats_broker().await else { return };
    php_frames_across_servers(&url).await;
}

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
