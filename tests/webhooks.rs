//! Presence webhooks: user_online / user_offline and channel_occupied / channel_vacated for the
//! whole cluster, signed, with `user_offline` held back by `--offline-delay` (a page reload sends
//! nothing), and sent for the users of a gateway killed with -9 once its lease runs out.

mod common;

use std::time::Duration;

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;

const SECRET: &str = "webhook-test-secret";
const HOOK_SECRET: &str = "hook-key";

async fn connect_as(gw: &Addr, sub: &str, channels: &[&str]) -> Client {
    connect_with(gw, &user_token(SECRET, sub, channels)).await
}

/// A webhook receiver on loopback: every event of every request (whose signature it checks),
/// answered 200.
async fn receiver() -> (u16, mpsc::Receiver<serde_json::Value>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let (tx, rx) = mpsc::channel(100);
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let tx = tx.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                loop {
                    let Ok(n) = s.read(&mut chunk).await else { return };
                    if n == 0 {
                        return;
                    }
                    buf.extend_from_slice(&chunk[..n]);
                    let text = String::from_utf8_lossy(&buf).into_owned();
                    let Some(end) = text.find("\r\n\r\n") else { continue };
                    let head = text[..end].to_ascii_lowercase();
                    let len: usize = head
                        .lines()
                        .find_map(|l| l.strip_prefix("content-length:"))
                        .and_then(|v| v.trim().parse().ok())
                        .unwrap_or(0);
                    if buf.len() < end + 4 + len {
                        continue;
                    }
                    let sig = head.lines().find_map(|l| l.strip_prefix("x-pushwire-signature:")).unwrap_or("").trim();
                    let body = String::from_utf8_lossy(&buf[end + 4..end + 4 + len]).into_owned();
                    assert_eq!(sig, pushwire::webhook::signature(HOOK_SECRET, body.as_bytes()), "signed");
                    let batch: serde_json::Value = serde_json::from_str(&body).expect("JSON body");
                    assert!(batch["time_ms"].as_u64().is_some_and(|t| t > 1_600_000_000_000), "{body}");
                    for event in batch["events"].as_array().expect("a batch of events") {
                        let _ = tx.send(event.clone()).await;
                    }
                    let _ = s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n").await;
                    buf.drain(..end + 4 + len);
                }
            });
        }
    });
    (port, rx)
}

/// The next event as (event, uid or channel).
async fn next_event(rx: &mut mpsc::Receiver<serde_json::Value>, within: Duration) -> Option<(String, String)> {
    let v = tokio::time::timeout(within, rx.recv()).await.ok()??;
    let body = v.to_string();
    let who = v.get("uid").or_else(|| v.get("channel")).and_then(|s| s.as_str()).unwrap_or_default();
    assert!(v["time"].as_u64().is_some_and(|t| t > 1_600_000_000_000), "time in ms: {body}");
    Some((v["event"].as_str().unwrap_or_default().to_owned(), who.to_owned()))
}

fn ev(e: &str, who: &str) -> Option<(String, String)> {
    Some((e.to_owned(), who.to_owned()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presence_events_are_debounced_and_survive_a_crash() {
    let (port, mut rx) = receiver().await;
    let hook = format!("http://127.0.0.1:{port}/hook");
    let gateway = ["--token-secret", SECRET, "--presence-lease", "3s"];
    let publisher = ["--webhook", &hook, "--webhook-secret", HOOK_SECRET, "--offline-delay", "1s"];
    let mut cluster = Cluster::start_with(None, &gateway, &publisher).await;
    let (g0, g1) = (Addr::from(&cluster.gateways[0]), Addr::from(&cluster.gateways[1]));
    wait_gateways(&cluster.publishers[0], 2).await; // the tracker has heard from both gateways

    let a0 = connect_as(&g0, "alice", &["room"]).await;
    assert_eq!(next_event(&mut rx, WAIT).await, ev("user_online", "alice"));
    assert_eq!(next_event(&mut rx, WAIT).await, ev("channel_occupied", "room"));
    // A second device, the first one closing, a reload of the last one: no event.
    let a1 = connect_as(&g1, "alice", &[]).await;
    close(a0.ws).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    close(a1.ws).await;
    let a2 = connect_as(&g1, "alice", &[]).await;
    // room has been empty since a0 closed: vacated after the delay; alice stays online.
    assert_eq!(next_event(&mut rx, Duration::from_secs(4)).await, ev("channel_vacated", "room"));
    assert_eq!(next_event(&mut rx, Duration::from_millis(1500)).await, None, "a reload is no offline + online");
    close(a2.ws).await;
    let t = std::time::Instant::now();
    assert_eq!(next_event(&mut rx, Duration::from_secs(4)).await, ev("user_offline", "alice"));
    assert!(t.elapsed() >= Duration::from_millis(900), "held back by --offline-delay");

    // A gateway killed with -9: its users go offline once its lease has run out (plus the delay).
    let _bob = connect_as(&g1, "bob", &[]).await;
    assert_eq!(next_event(&mut rx, WAIT).await, ev("user_online", "bob"));
    let gw1 = cluster.procs.len() - 3;
    cluster.procs[gw1].kill();
    let t = std::time::Instant::now();
    assert_eq!(next_event(&mut rx, Duration::from_secs(8)).await, ev("user_offline", "bob"));
    assert!(t.elapsed() < Duration::from_secs(6), "within lease + delay, took {:?}", t.elapsed());
}

/// Wait until publisher `p` has heard from `n` gateways.
async fn wait_gateways(p: &Addr, n: usize) {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let (_, body) = http_get(p, "/cluster").await;
        let v: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
        if v["gateways"].as_array().is_some_and(|g| g.len() == n) {
            return;
        }
        assert!(tokio::time::Instant::now() < deadline, "publisher never heard from {n} gateways: {body}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A gateway that does not answer (stopped with SIGSTOP, its last heartbeats claiming changes the
/// tracker has not seen) delays only its own events: users coming and going on another gateway
/// are announced within the usual delay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_gateway_delays_only_its_own_events() {
    let (port, mut rx) = receiver().await;
    let hook = format!("http://127.0.0.1:{port}/hook");
    let gateway = ["--token-secret", SECRET, "--presence-lease", "30s"];
    let publisher = ["--webhook", &hook, "--webhook-secret", HOOK_SECRET, "--offline-delay", "500ms"];
    let cluster = Cluster::start_with(None, &gateway, &publisher).await;
    let (g0, g1) = (Addr::from(&cluster.gateways[0]), Addr::from(&cluster.gateways[1]));
    wait_gateways(&cluster.publishers[0], 2).await;
    let other = connect_as(&g1, "carol", &[]).await;
    assert_eq!(next_event(&mut rx, WAIT).await, ev("user_online", "carol"));
    let node = other.worker.rsplit_once('-').expect("NODE-N").0.to_owned();

    // Gateway 1 stops answering; heartbeats of it say it has changes the tracker has not seen,
    // so the tracker asks it for all its users (each question waits 2 s for an answer).
    let pid = cluster.procs[2].pid().to_string();
    assert!(std::process::Command::new("kill").args(["-STOP", &pid]).status().expect("kill").success());
    let mut channel = ChannelClient::tcp(cluster.channel_port).await;
    for _ in 0..3 {
        let hb = pushwire::cluster::Report::Heartbeat(pushwire::cluster::Heartbeat {
            node: node.clone(),
            workers: 2,
            lease_ms: 30_000,
            workers_seq: vec![(format!("{node}-0"), 1000), (format!("{node}-1"), 1000)],
            ..Default::default()
        });
        let data = pushwire::cluster::encode(&hb);
        channel
            .send(channel_proto::Request::Publish { channels: names(&["pushwire:cluster"]), data, keep: None })
            .await;
    }
    channel.sync().await;

    // Users on gateway 0 come and go, announced as usual.
    let t = std::time::Instant::now();
    let a = connect_as(&g0, "alice", &["room"]).await;
    assert_eq!(next_event(&mut rx, Duration::from_secs(3)).await, ev("user_online", "alice"));
    assert_eq!(next_event(&mut rx, Duration::from_secs(3)).await, ev("channel_occupied", "room"));
    close(a.ws).await;
    // Both fall due after the same delay, in either order.
    let mut gone =
        [next_event(&mut rx, Duration::from_secs(3)).await, next_event(&mut rx, Duration::from_secs(3)).await];
    gone.sort();
    assert_eq!(gone, [ev("channel_vacated", "room"), ev("user_offline", "alice")]);
    assert!(t.elapsed() < Duration::from_secs(4), "took {:?}", t.elapsed());
    assert!(std::process::Command::new("kill").args(["-CONT", &pid]).status().expect("kill").success());
}
