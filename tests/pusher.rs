//! The Pusher Channels protocol with the libraries applications use (`tests/pusher/*.mjs`:
//! pusher-js and Laravel Echo as clients, the `pusher` server SDK for Node; `tests/pusher/sdk.py`: the `pusher`
//! SDK from PyPI with a raw WebSocket client), against standalone and against a cluster of two
//! gateways over the channel server, each client on its own gateway.

mod common;

use common::*;

const APP: (&str, &str, &str) = PUSHER_APP;

/// Run `tests/pusher/sdk.py` with `args`; its output (skipped like [`node`] when the SDK is
/// missing).
async fn python(args: &[String]) -> Option<String> {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/pusher");
    let present = std::process::Command::new("python3").args(["-c", "import pusher, websockets"]).output();
    if !present.is_ok_and(|o| o.status.success()) {
        assert!(std::env::var_os(ALL_TESTS).is_none(), "{ALL_TESTS} is set and the pusher PyPI package is missing");
        eprintln!("skipped: pip install pusher==3.3.4 websockets==13.1 (./scripts/test does)");
        return None;
    }
    let run =
        tokio::process::Command::new("python3").arg("sdk.py").args(args).current_dir(&dir).kill_on_drop(true).output();
    let out =
        tokio::time::timeout(std::time::Duration::from_secs(120), run).await.expect("in time").expect("python runs");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "sdk.py failed:\n{text}");
    Some(text)
}

fn app_flag() -> String {
    format!("{}:{}:{}", APP.0, APP.1, APP.2)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pusher_js_and_the_node_sdk_on_standalone() {
    let (ws, http, ch) = (free_port(), free_port(), free_port());
    let _node = Proc::start(
        &[
            "standalone",
            "--ws-listen",
            &format!("127.0.0.1:{ws}"),
            "--http-listen",
            &format!("127.0.0.1:{http}"),
            "--channel-listen",
            &format!("127.0.0.1:{ch}"),
            "--app",
            &app_flag(),
        ],
        &[ws, http],
    )
    .await;
    let args = [ws.to_string(), http.to_string(), APP.0.into(), APP.1.into(), APP.2.into()];
    for script in ["basic.mjs", "echo.mjs"] {
        if let Some(out) = node(script, &args).await {
            assert!(out.contains("all passed"), "{out}");
        }
    }
    if let Some(out) = python(&args).await {
        assert!(out.contains("all passed"), "{out}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pusher_js_and_the_node_sdk_across_two_gateways() {
    pusher_across_two_gateways(None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pusher_js_and_the_node_sdk_on_redis() {
    let Some((_redis, url)) = redis_broker().await else { return };
    pusher_across_two_gateways(Some(url)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pusher_js_and_the_node_sdk_on_nats() {
    let Some((_nats, url)) = nats_broker().await else { return };
    pusher_across_two_gateways(Some(url)).await;
}

/// Without apps, `/app/KEY` is a path like any other: a seed client there gets the native
/// welcome line.
#[tokio::test]
async fn without_apps_the_native_protocol_is_on_every_path() {
    let (_p, _c, w, _h) = standalone(&[]).await;
    let url = format!("ws://127.0.0.1:{w}/app/some-key?protocol=7");
    let (mut ws, _) = tokio_tungstenite::connect_async(url).await.expect("handshake");
    let welcome = next_text(&mut ws).await.expect("welcome");
    assert!(welcome.starts_with("workerID:") && welcome.ends_with(" connected\n"), "{welcome:?}");
}

/// The next JSON message of a raw Pusher client, or the code of the close that came instead.
async fn next(ws: &mut Ws) -> Result<serde_json::Value, Option<u16>> {
    use futures_util::StreamExt;
    use tokio_tungstenite::tungstenite::Message;
    loop {
        match tokio::time::timeout(WAIT, ws.next()).await.expect("in time").expect("open") {
            Ok(Message::Text(t)) => return Ok(serde_json::from_str(&t).expect("json")),
            Ok(Message::Close(frame)) => return Err(frame.map(|f| u16::from(f.code))),
            Ok(_) => continue,
            Err(e) => panic!("{e}"),
        }
    }
}

/// Apps from the config file's `[[apps]]`, with their settings: an app over its
/// `max-connections` refuses the next connection with `pusher:error` 4004 and closes it with 4004;
/// a connection that goes frees its slot.
#[tokio::test]
async fn apps_from_the_config_file_and_the_connection_quota() {
    let file = std::env::temp_dir().join(format!("pushwire-apps-{}-{}.toml", std::process::id(), free_port()));
    std::fs::write(&file, "[[apps]]\nid = \"9\"\nkey = \"quota-key\"\nsecret = \"s\"\nmax-connections = 1\n")
        .expect("write");
    let config = file.to_string_lossy().into_owned();
    let (_p, _c, w, _h) = standalone(&["--config", &config]).await;
    let url = format!("ws://127.0.0.1:{w}/app/quota-key?protocol=7");
    let (mut first, _) = tokio_tungstenite::connect_async(&url).await.expect("handshake");
    assert_eq!(next(&mut first).await.expect("welcome")["event"], "pusher:connection_established");
    let (mut second, _) = tokio_tungstenite::connect_async(&url).await.expect("handshake");
    let refusal = next(&mut second).await.expect("pusher:error first");
    assert_eq!((refusal["event"].as_str(), refusal["data"]["code"].as_u64()), (Some("pusher:error"), Some(4004)));
    assert_eq!(next(&mut second).await.expect_err("then the close"), Some(4004));
    drop(first);
    // The slot comes back once the first connection's task has ended.
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let (mut again, _) = tokio_tungstenite::connect_async(&url).await.expect("handshake");
        match next(&mut again).await {
            Ok(m) if m["event"] == "pusher:connection_established" => break,
            _ => assert!(tokio::time::Instant::now() < deadline, "the slot was never freed"),
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let _ = std::fs::remove_file(file);
}

/// Bad input from a Pusher client gets `pusher:error` and changes nothing else: a message that
/// is not JSON, a subscribe without a channel, a bad channel name, a client event on a public
/// channel, and more channels than the app allows; the socket stays up through all of them and
/// the app's limits hold.
#[tokio::test]
async fn bad_client_messages_get_errors_and_the_socket_stays() {
    use futures_util::SinkExt;
    use tokio_tungstenite::tungstenite::Message;
    let file = std::env::temp_dir().join(format!("pushwire-apps-{}-{}.toml", std::process::id(), free_port()));
    let app =
        "[[apps]]\nid = \"3\"\nkey = \"k3\"\nsecret = \"s3\"\nclient-events = true\nmax-channels-per-connection = 2\n";
    std::fs::write(&file, app).expect("write");
    let config = file.to_string_lossy().into_owned();
    let (_p, _c, w, _h) = standalone(&["--config", &config]).await;
    let (mut ws, _) =
        tokio_tungstenite::connect_async(format!("ws://127.0.0.1:{w}/app/k3?protocol=7")).await.expect("handshake");
    assert_eq!(next(&mut ws).await.expect("welcome")["event"], "pusher:connection_established");
    let expect_error = async |ws: &mut Ws, sent: &str, code: Option<u64>| {
        ws.send(Message::text(sent)).await.expect("send");
        let m = next(ws).await.expect("an answer, not a close");
        assert_eq!((m["event"].as_str(), m["data"]["code"].as_u64()), (Some("pusher:error"), code), "{sent}: {m}");
    };
    expect_error(&mut ws, "not json", Some(4300)).await;
    expect_error(&mut ws, r#"{"event":"pusher:subscribe","data":{}}"#, Some(4300)).await;
    expect_error(&mut ws, r#"{"event":"pusher:subscribe","data":{"channel":"a b"}}"#, Some(4300)).await;
    for c in ["one", "two"] {
        ws.send(Message::text(format!(r#"{{"event":"pusher:subscribe","data":{{"channel":"{c}"}}}}"#)))
            .await
            .expect("send");
        assert_eq!(next(&mut ws).await.expect("answer")["event"], "pusher_internal:subscription_succeeded");
    }
    expect_error(&mut ws, r#"{"event":"pusher:subscribe","data":{"channel":"three"}}"#, Some(4300)).await;
    expect_error(&mut ws, r#"{"event":"client-x","channel":"one","data":{}}"#, Some(4300)).await;
    expect_error(&mut ws, r#"{"event":"client-x","channel":"private-not-mine","data":{}}"#, Some(4300)).await;
    // Still up: a ping is answered.
    ws.send(Message::text(r#"{"event":"pusher:ping","data":{}}"#)).await.expect("send");
    assert_eq!(next(&mut ws).await.expect("pong")["event"], "pusher:pong");
    let _ = std::fs::remove_file(file);
}

/// A config file with the test app, client events and subscription counts on, and a webhook to `127.0.0.1:hook_port`
/// for every event.
fn hooks_config(hook_port: u16) -> std::path::PathBuf {
    let file = std::env::temp_dir().join(format!("pushwire-hooks-{}-{hook_port}.toml", std::process::id()));
    let (id, key, secret) = APP;
    let app = format!(
        "[[apps]]\nid = \"{id}\"\nkey = \"{key}\"\nsecret = \"{secret}\"\nclient-events = true\nsubscription-count = true\nwatchlist-events = true\n\
         webhooks = [{{ url = \"http://127.0.0.1:{hook_port}/hook\" }}]\n"
    );
    std::fs::write(&file, app).expect("write");
    file
}

/// Webhooks on standalone, checked by the Node SDK: channel_occupied and member_added once
/// for a user on two sockets, client_event, cache_miss, then channel_vacated and
/// member_removed once when everyone leaves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhooks_on_standalone() {
    let hook = free_port();
    let file = hooks_config(hook);
    let config = file.to_string_lossy().into_owned();
    let (_p, _c, ws, http) = standalone(&["--config", &config, "--offline-delay", "300ms"]).await;
    let (id, key, secret) = APP;
    let args = [ws, http].map(|p| p.to_string());
    let args = [&args[..], &[id.into(), key.into(), secret.into(), ws.to_string(), hook.to_string()]].concat();
    if let Some(out) = node("hooks.mjs", &args).await {
        assert!(out.contains("all passed"), "{out}");
    }
    let _ = std::fs::remove_file(file);
}

/// The webhook script across two gateways on `broker` (`None`: a channel server), the tracker in
/// the publisher started with `--app-webhooks`; with `kill`, the second gateway is killed with -9
/// while members are on it.
async fn hooks_across_two_gateways(broker: Option<String>, kill: bool) {
    let hook = free_port();
    let file = hooks_config(hook);
    let config = file.to_string_lossy().into_owned();
    let gateway = ["--config", &config, "--presence-lease", "3s"];
    let publisher = ["--config", &config, "--app-webhooks", "--offline-delay", "300ms"];
    let on_channel_server = broker.is_none();
    let cluster = Cluster::start_with(broker, &gateway, &publisher).await;
    heard_from_both(&cluster).await;
    let mut args = pusher_script_args(&cluster);
    args.push(hook.to_string());
    if kill {
        // procs: the channel server (when there is one), then the gateways.
        args.push(cluster.procs[if on_channel_server { 2 } else { 1 }].pid().to_string());
    }
    if let Some(out) = node("hooks.mjs", &args).await {
        assert!(out.contains("all passed"), "{out}");
    }
    let _ = std::fs::remove_file(file);
}

/// Webhooks across two gateways, then one gateway killed with -9 while members are on it: a
/// member that was only there is removed for the clients on the other gateway and by webhook
/// once its lease ends, a user signed in only there goes offline for its watchers; a user still
/// on a live gateway stays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhooks_and_a_killed_gateway_across_two_gateways() {
    hooks_across_two_gateways(None, true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhooks_and_a_killed_gateway_on_redis() {
    let Some((_redis, url)) = redis_broker().await else { return };
    hooks_across_two_gateways(Some(url), true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhooks_on_nats() {
    let Some((_nats, url)) = nats_broker().await else { return };
    hooks_across_two_gateways(Some(url), false).await;
}

/// The protocol's refusals before a connection is admitted, each as `pusher:error` with its code
/// and then a close with the same code: a disabled app (4003), no `protocol` (4007), one that is
/// not a number (4006), an unsupported one (4007), a gateway at its `--max-connections` (4100).
/// A disabled app's HTTP API answers 403. A gateway that stops closes its Pusher clients with
/// 4200 (reconnect now).
#[tokio::test]
async fn refusals_and_close_codes() {
    let file = std::env::temp_dir().join(format!("pushwire-apps-{}-{}.toml", std::process::id(), free_port()));
    let apps = "[[apps]]\nid = \"1\"\nkey = \"on\"\nsecret = \"s1\"\n\n\
                [[apps]]\nid = \"2\"\nkey = \"off\"\nsecret = \"s2\"\nenabled = false\n";
    std::fs::write(&file, apps).expect("write");
    let config = file.to_string_lossy().into_owned();
    let (mut node, _c, w, _h) = standalone(&["--config", &config]).await;
    for (path, code) in [("off?protocol=7", 4003), ("on", 4007), ("on?protocol=seven", 4006), ("on?protocol=4", 4007)] {
        let (mut ws, _) =
            tokio_tungstenite::connect_async(format!("ws://127.0.0.1:{w}/app/{path}")).await.expect("handshake");
        let refusal = next(&mut ws).await.expect("pusher:error first");
        assert_eq!((refusal["event"].as_str(), refusal["data"]["code"].as_u64()), (Some("pusher:error"), Some(code)));
        assert_eq!(next(&mut ws).await.expect_err("then the close"), Some(code as u16), "{path}");
    }
    // A signed event to the disabled app: 403.
    let body = r#"{"name":"e","channel":"c","data":"x"}"#;
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
    let md5 = pushwire::protocol::pusher::sign::md5_hex(body.as_bytes());
    let query = format!("auth_key=off&auth_timestamp={now}&auth_version=1.0&body_md5={md5}");
    let signature = pushwire::webhook::hmac_hex("s2", format!("POST\n/apps/2/events\n{query}").as_bytes());
    let target = format!("/apps/2/events?{query}&auth_signature={signature}");
    let (status, _) = http(w, "POST", &target, &[("content-type", "application/json")], body).await;
    assert_eq!(status, 403, "a disabled app's API");
    // A gateway at its connection limit: 4100 (over capacity, try later).
    let (_full, _c, fw, _h) = standalone(&["--config", &config, "--max-connections", "1"]).await;
    let url = format!("ws://127.0.0.1:{fw}/app/on?protocol=7");
    let (mut first, _) = tokio_tungstenite::connect_async(&url).await.expect("handshake");
    assert_eq!(next(&mut first).await.expect("welcome")["event"], "pusher:connection_established");
    let (mut second, _) = tokio_tungstenite::connect_async(&url).await.expect("handshake");
    assert_eq!(next(&mut second).await.expect("pusher:error first")["data"]["code"], 4100);
    assert_eq!(next(&mut second).await.expect_err("then the close"), Some(4100));
    // Stopping: 4200.
    let (mut ws, _) =
        tokio_tungstenite::connect_async(format!("ws://127.0.0.1:{w}/app/on?protocol=7")).await.expect("handshake");
    assert_eq!(next(&mut ws).await.expect("welcome")["event"], "pusher:connection_established");
    let stopping = tokio::spawn(async move { node.terminate().await });
    assert_eq!(next(&mut ws).await.expect_err("closed"), Some(4200), "going away: reconnect now");
    let _ = stopping.await;
    let _ = std::fs::remove_file(file);
}
