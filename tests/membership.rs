//! A gateway's broker subscriptions follow its connections exactly: connections that join topics
//! and vanish at the same moment (thousands, so that leaves overtake joins) leave the broker
//! subscribed to the channels of the connections still there, and to nothing else.

mod common;

use std::time::Duration;

use common::*;

const SECRET: &str = "membership-test-secret";
/// Connections opened; every other one vanishes while the publisher adds it to a topic.
const CONNECTIONS: usize = 1200;

/// Open [`CONNECTIONS`] connections (user `u-I`, topic `t-I`) on gateway `gw`; ask the publisher
/// `pb` to add each to topic `j-I` while every even one closes at that moment. Returns the
/// clients still open; each holds three channels (its user and two topics).
async fn churn(gw: &Addr, pb: &Addr) -> Vec<Client> {
    // The publisher finds workers through their gateways' heartbeats: wait until it has one.
    let deadline = tokio::time::Instant::now() + WAIT;
    while !http_get(pb, "/cluster").await.1.contains("\"node\"") {
        assert!(tokio::time::Instant::now() < deadline, "the publisher never heard from the gateway");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut clients = Vec::with_capacity(CONNECTIONS);
    for i in 0..CONNECTIONS {
        clients.push(connect_with(gw, &user_token(SECRET, &format!("u-{i}"), &[&format!("t-{i}")])).await);
    }
    let mut kept = Vec::new();
    let mut joins = tokio::task::JoinSet::new();
    for (i, c) in clients.into_iter().enumerate() {
        let (pb, form) = (pb.clone(), format!("to_worker_id={}&to_connection_id={}&channel=j-{i}", c.worker, c.conn));
        let stays = i % 2 == 1;
        joins.spawn(async move {
            let ct = ("Content-Type", "application/x-www-form-urlencoded");
            (stays, http(pb, "POST", "/join", &[ct], &form).await)
        });
        match i % 2 {
            0 => drop(c.ws),
            _ => kept.push(c),
        }
    }
    while let Some(answer) = joins.join_next().await {
        // A connection that vanished may be gone before its join (404); one still there is not.
        let (stays, (status, body)) = answer.expect("join request");
        assert!(status == 200 || (status == 404 && !stays), "/join answered {status}: {body}");
    }
    kept
}

/// Wait until `count()` is `want`.
async fn settles<F: std::future::Future<Output = usize>>(what: &str, want: usize, count: impl Fn() -> F) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let n = count().await;
        if n == want {
            return;
        }
        assert!(tokio::time::Instant::now() < deadline, "{what}: {n} channels, want {want}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn channel_server_holds_exactly_the_channels_of_connections_still_there() {
    let (c, m, w, h) = (free_port(), free_port(), free_port(), free_port());
    let (cl, ml) = (format!("127.0.0.1:{c}"), format!("127.0.0.1:{m}"));
    let _ch = Proc::start(&["channel", "--listen", &cl, "--metrics-listen", &ml], &[c, m]).await;
    let url = format!("channel://127.0.0.1:{c}");
    let gwargs = ["gateway", "--listen", &format!("127.0.0.1:{w}"), "--broker", &url, "--token-secret", SECRET];
    let _g = Proc::start(&gwargs, &[w]).await;
    let _p = Proc::start(&["publisher", "--listen", &format!("127.0.0.1:{h}"), "--broker", &url], &[h]).await;
    wait_healthy(w).await;
    wait_healthy(h).await;
    let base = metric(m, "pushwire_channel_channels").await as usize;
    let kept = churn(&Addr::from(w), &Addr::from(h)).await;
    let want = base + 3 * kept.len();
    settles("channel server", want, || async { metric(m, "pushwire_channel_channels").await as usize }).await;
    // Once the last connection goes, only the channels the nodes started with are left.
    drop(kept);
    settles("channel server", base, || async { metric(m, "pushwire_channel_channels").await as usize }).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_holds_exactly_the_channels_of_connections_still_there() {
    let Some((_redis, url)) = redis_broker().await else {
        return eprintln!("skipped: redis-server not installed");
    };
    let port = url.rsplit(':').next().expect("port").to_owned();
    let (w, h) = (free_port(), free_port());
    let gwargs = ["gateway", "--listen", &format!("127.0.0.1:{w}"), "--broker", &url, "--token-secret", SECRET];
    let _g = Proc::start(&gwargs, &[w]).await;
    let _p = Proc::start(&["publisher", "--listen", &format!("127.0.0.1:{h}"), "--broker", &url], &[h]).await;
    wait_healthy(w).await;
    wait_healthy(h).await;
    let channels = || {
        let port = port.clone();
        async move {
            let out = tokio::process::Command::new(find_program("redis-cli"))
                .args(["-p", &port, "--raw", "PUBSUB", "CHANNELS", "*"])
                .output()
                .await
                .expect("redis-cli");
            String::from_utf8_lossy(&out.stdout).lines().filter(|l| !l.is_empty()).count()
        }
    };
    let base = channels().await;
    let kept = churn(&Addr::from(w), &Addr::from(h)).await;
    settles("redis", base + 3 * kept.len(), channels).await;
    drop(kept);
    settles("redis", base, channels).await;
}
