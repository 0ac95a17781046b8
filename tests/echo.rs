//! The echo protocol (`--echo-path`): every client message comes back unchanged through the same
//! reader, writer and compression as every other connection; nothing else is sent to it (no
//! welcome, no pushes); the seed's path is unchanged. And the Autobahn testsuite's fuzzing client
//! against it: the WebSocket conformance of the gateway's reader and writer, case by case.

mod common;

use std::time::Duration;

use common::*;
use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::Message;

async fn echo_client(port: u16, path: &str) -> Ws {
    let url = format!("ws://127.0.0.1:{port}{path}");
    tokio::time::timeout(WAIT, tokio_tungstenite::connect_async(url)).await.expect("in time").expect("handshake").0
}

async fn next(ws: &mut Ws) -> Message {
    loop {
        match tokio::time::timeout(WAIT, ws.next()).await.expect("a message in time").expect("open").expect("ok") {
            Message::Ping(_) | Message::Pong(_) => continue,
            m => return m,
        }
    }
}

#[tokio::test]
async fn messages_come_back_and_nothing_else_is_sent() {
    let (_p, _c, w, h) = standalone(&["--echo-path", "/echo", "--max-client-frame", "100000"]).await;
    let mut e = echo_client(w, "/echo").await;
    // No welcome: the first thing that comes is the echo of the first message.
    e.send(Message::text("first")).await.expect("send");
    assert_eq!(next(&mut e).await, Message::text("first"));
    e.send(Message::binary(vec![0u8, 1, 255])).await.expect("send");
    assert_eq!(next(&mut e).await, Message::binary(vec![0u8, 1, 255]));
    // A broadcast reaches the seed's clients, not the echo client: its next message is an echo.
    let mut seed = connect(w).await;
    assert_eq!(http_get(h, "/?content=to-everyone").await.0, 200);
    assert_eq!(next_text(&mut seed.ws).await.as_deref(), Some("to-everyone"));
    let big = "x".repeat(90_000);
    e.send(Message::text(big.clone())).await.expect("send");
    assert_eq!(next(&mut e).await, Message::text(big), "the echo, not the broadcast");
    // Over the frame limit: closed with 1009, as on every connection.
    e.send(Message::text("y".repeat(100_001))).await.expect("send");
    match next(&mut e).await {
        Message::Close(Some(f)) => assert_eq!(u16::from(f.code), 1009),
        other => panic!("expected a close, got {other:?}"),
    }
    // The seed's path is unchanged, and so is /echo on a gateway without --echo-path.
    assert!(connect(w).await.worker.contains('-'));
    let (_p2, _c2, w2, _h2) = standalone(&[]).await;
    let mut plain = echo_client(w2, "/echo").await;
    match next(&mut plain).await {
        Message::Text(t) => assert!(t.starts_with("workerID:") && t.ends_with(" connected\n"), "{t}"),
        other => panic!("expected the welcome line, got {other:?}"),
    }
}

#[tokio::test]
async fn an_echo_client_is_pinged_and_swept_like_any_other() {
    let (_p, _c, w, _h) = standalone(&["--echo-path", "/echo", "--heartbeat", "200ms"]).await;
    let mut e = echo_client(w, "/echo").await;
    // tokio-tungstenite answers pings by itself; the server's ping shows as a message first.
    let ping = tokio::time::timeout(WAIT, async {
        loop {
            if let Message::Ping(_) = e.next().await.expect("open").expect("ok") {
                return;
            }
        }
    });
    ping.await.expect("the server pings an echo client");
    let metrics = http_get(w, "/metrics").await.1;
    assert_eq!(metric_in(&metrics, "pushwire_ws_registered"), 1, "in its worker's table: {metrics}");
    drop(e);
    let deadline = tokio::time::Instant::now() + WAIT;
    while metric(w, "pushwire_ws_registered").await != 0 {
        assert!(tokio::time::Instant::now() < deadline, "an echo connection that went stays registered");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The Autobahn testsuite's fuzzing client (`wstest`, a Python 2.7 program that ./scripts/test
/// installs in a virtualenv) against the echo endpoint, compression on: every case of groups 1-10
/// and a set of the compression cases (12.2, whose image data found a compression bug, and 13.1
/// up to 64 KiB); no case may be FAILED. `scripts/autobahn` runs all 517 cases on a release build.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn autobahn_fuzzing_client_finds_no_failure() {
    let wstest = std::env::var("PUSHWIRE_WSTEST").unwrap_or_else(|_| "wstest".into());
    let runnable = std::process::Command::new(&wstest).arg("--help").output().is_ok_and(|o| o.status.success());
    if !runnable {
        assert!(
            std::env::var_os(ALL_TESTS).is_none(),
            "{ALL_TESTS} is set and the Autobahn testsuite ({wstest}) is missing"
        );
        return eprintln!("SKIPPED: the Autobahn testsuite (wstest) is missing; ./scripts/test installs it");
    }
    let args = ["--echo-path", "/echo", "--max-client-frame", "20000000", "--compression", "on"];
    let (_p, _c, w, _h) = standalone(&args).await;
    let dir = std::env::temp_dir().join(format!("pushwire-autobahn-{}-{w}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("report directory");
    let mut cases: Vec<String> = (1..=10).map(|g| format!("{g}.*")).collect();
    cases.extend((1..=14).map(|c| format!("12.2.{c}")));
    cases.extend((1..=9).map(|c| format!("13.1.{c}")));
    let spec = serde_json::json!({
        "outdir": dir.join("report"),
        "servers": [{"agent": "pushwire", "url": format!("ws://127.0.0.1:{w}/echo")}],
        "cases": cases,
        "exclude-cases": [],
        "exclude-agent-cases": {},
    });
    std::fs::write(dir.join("spec.json"), spec.to_string()).expect("spec");
    let run = tokio::process::Command::new(&wstest)
        .args(["-m", "fuzzingclient", "-s", "spec.json"])
        .current_dir(&dir)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status();
    let status = tokio::time::timeout(Duration::from_secs(600), run).await.expect("wstest finished").expect("wstest");
    assert!(status.success(), "wstest: {status}");
    let index = std::fs::read_to_string(dir.join("report/index.json")).expect("report");
    let index: serde_json::Value = serde_json::from_str(&index).expect("JSON report");
    let results = index["pushwire"].as_object().expect("our results");
    let failed: Vec<String> = results
        .iter()
        .filter(|(_, r)| {
            !matches!(r["behavior"].as_str(), Some("OK" | "NON-STRICT" | "INFORMATIONAL"))
                || !matches!(r["behaviorClose"].as_str(), Some("OK" | "INFORMATIONAL"))
        })
        .map(|(case, r)| format!("{case}: {} / {}", r["behavior"], r["behaviorClose"]))
        .collect();
    assert!(results.len() >= 320, "{} cases ran", results.len());
    assert!(failed.is_empty(), "{} cases failed (report in {}): {failed:?}", failed.len(), dir.display());
    let _ = std::fs::remove_dir_all(&dir);
}
