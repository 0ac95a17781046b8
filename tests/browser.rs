//! End to end in headless Chromium: the gateway's page and the seed's own console snippet, with
//! pushes published through the page's form and through the HTTP API. Chromium is driven over the
//! DevTools protocol. A screenshot of the page is saved to target/artifacts/browser-page.png.

mod common;

use std::time::Duration;

use base64::Engine as _;
use common::pki::{https_get, Pki};
use common::*;
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

/// One DevTools connection to one page.
struct Page {
    ws: Ws,
    next_id: u64,
    /// Messages of the `alert()` dialogs seen so far (each is accepted at once).
    alerts: Vec<String>,
}

impl Page {
    async fn open(devtools: u16) -> Page {
        let (status, body) = http(devtools, "PUT", "/json/new?about:blank", &[], "").await;
        assert_eq!(status, 200, "new target: {body}");
        let target: Value = serde_json::from_str(&body).expect("target json");
        let url = target["webSocketDebuggerUrl"].as_str().expect("debugger url").to_owned();
        let (ws, _) = tokio_tungstenite::connect_async(url).await.expect("devtools websocket");
        let mut page = Page { ws, next_id: 0, alerts: Vec::new() };
        page.call("Page.enable", json!({})).await;
        page.call("Runtime.enable", json!({})).await;
        page
    }

    async fn send(&mut self, method: &str, params: Value) -> u64 {
        self.next_id += 1;
        let msg = json!({"id": self.next_id, "method": method, "params": params}).to_string();
        self.ws.send(Message::Text(msg.into())).await.expect("devtools send");
        self.next_id
    }

    /// Read one DevTools message, answering dialogs as they open.
    async fn read(&mut self, limit: Duration) -> Option<Value> {
        let m = tokio::time::timeout(limit, self.ws.next()).await.ok()??.ok()?;
        let Message::Text(t) = m else { return Some(Value::Null) };
        let v: Value = serde_json::from_str(&t).expect("devtools json");
        if v["method"] == "Page.javascriptDialogOpening" {
            self.alerts.push(v["params"]["message"].as_str().unwrap_or_default().to_owned());
            self.send("Page.handleJavaScriptDialog", json!({"accept": true})).await;
        }
        Some(v)
    }

    async fn call(&mut self, method: &str, params: Value) -> Value {
        let id = self.send(method, params).await;
        loop {
            let v = self.read(WAIT).await.unwrap_or_else(|| panic!("no answer to {method}"));
            if v["id"] == id {
                assert!(v.get("error").is_none(), "{method}: {v}");
                return v["result"].clone();
            }
        }
    }

    async fn eval(&mut self, expr: &str) -> Value {
        let r = self
            .call("Runtime.evaluate", json!({"expression": expr, "returnByValue": true, "awaitPromise": true}))
            .await;
        r["result"]["value"].clone()
    }

    /// Poll `expr` until it is true.
    async fn wait_for(&mut self, expr: &str) {
        for _ in 0..200 {
            if self.eval(expr).await == Value::Bool(true) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("never true: {expr}");
    }

    /// Wait until an alert with `text` has been seen.
    async fn wait_alert(&mut self, text: &str) {
        let deadline = tokio::time::Instant::now() + WAIT;
        while !self.alerts.iter().any(|a| a == text) {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            assert!(self.read(left).await.is_some(), "no alert {text:?}; alerts so far: {:?}", self.alerts);
        }
    }

    /// Drain events for a while (to see alerts that should not come).
    async fn settle(&mut self, d: Duration) {
        let deadline = tokio::time::Instant::now() + d;
        while self.read(deadline.saturating_duration_since(tokio::time::Instant::now())).await.is_some() {}
    }
}

/// Headless Chromium with `extra` flags, driven on a DevTools port: the process, the port and
/// its profile directory (to remove at the end).
async fn chromium(extra: &[&str]) -> (Proc, u16, std::path::PathBuf) {
    let d = free_port();
    let profile = std::env::temp_dir().join(format!("pushwire-chromium-{}-{d}", std::process::id()));
    let (profile_flag, port_flag) =
        (format!("--user-data-dir={}", profile.display()), format!("--remote-debugging-port={d}"));
    let mut args = vec![
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-renderer-backgrounding",
        "--disable-background-timer-throttling",
        "--disable-backgrounding-occluded-windows",
        "--window-size=1000,800",
        &profile_flag,
        &port_flag,
    ];
    args.extend_from_slice(extra);
    args.push("about:blank");
    (Proc::program(&find_program("chromium"), &args, &[d]).await, d, profile)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seed_console_snippet_and_page_in_chromium() {
    if !have(&["chromium"], false) {
        return;
    }
    let (c, w, h) = (free_port(), free_port(), free_port());
    let args = |c: u16, w: u16, h: u16| {
        vec![
            "standalone".to_string(),
            "--channel-listen".into(),
            format!("127.0.0.1:{c}"),
            "--ws-listen".into(),
            format!("127.0.0.1:{w}"),
            "--http-listen".into(),
            format!("127.0.0.1:{h}"),
            "--publish-key".into(),
            "page-key".into(),
            "--token-secret".into(),
            "page-secret".into(),
            "--compression".into(),
            "on".into(),
        ]
    };
    let argv = args(c, w, h);
    let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
    let mut server = Proc::start(&argv, &[c, w, h]).await;
    let (_chromium, d, profile) = chromium(&[]).await;

    // Page A: the gateway's page.
    let mut a = Page::open(d).await;
    a.call("Page.navigate", json!({"url": format!("http://127.0.0.1:{w}/")})).await;
    a.wait_for("document.getElementById('status').textContent === 'connected' && document.getElementById('conn').textContent !== '?'").await;
    let a_worker = a.eval("document.getElementById('worker').textContent").await;
    let a_conn = a.eval("document.getElementById('conn').textContent").await;
    // Chromium offers permessage-deflate; the gateway takes it without context takeover, and every
    // push below reaches the page through compressed frames.
    let ext = a.eval("ws.extensions").await;
    assert_eq!(ext, json!("permessage-deflate; server_no_context_takeover; client_no_context_takeover"));
    let welcome = a.eval("document.getElementById('welcome').textContent").await;
    assert_eq!(
        welcome,
        json!(format!("workerID:{} connectionID:{} connected", a_worker.as_str().unwrap(), a_conn.as_str().unwrap()))
    );

    // Page B: the seed's console snippet, alert and all.
    let mut b = Page::open(d).await;
    b.eval(&format!("ws = new WebSocket(\"ws://127.0.0.1:{w}\"); ws.onmessage = function(e) {{ alert(e.data); }}; 1"))
        .await;
    let deadline = tokio::time::Instant::now() + WAIT;
    while b.alerts.is_empty() {
        assert!(
            b.read(deadline.saturating_duration_since(tokio::time::Instant::now())).await.is_some(),
            "no welcome alert"
        );
    }
    let (b_worker, b_conn) = parse_welcome(&b.alerts[0]);

    // A broadcast through page A's form (the key typed in, CORS to the publisher).
    a.eval(&format!(
        "document.getElementById('publisher').value = 'http://127.0.0.1:{h}/';
         document.getElementById('key').value = 'page-key';
         document.getElementById('content').value = 'hello from the page';
         document.getElementById('send').click(); 1"
    ))
    .await;
    a.wait_for("document.getElementById('result').textContent === '200 ok'").await;
    a.wait_for("document.getElementById('log').textContent.includes('hello from the page')").await;
    b.wait_alert("hello from the page").await;

    // Without the key the page shows the refusal, and nothing is pushed.
    a.eval("document.getElementById('key').value = ''; document.getElementById('content').value = 'keyless'; document.getElementById('send').click(); 1").await;
    a.wait_for("document.getElementById('result').textContent.startsWith('401')").await;

    // A targeted push to B over the HTTP API reaches B only.
    let url =
        format!("/?to_worker_id={}&to_connection_id={b_conn}&content={}&key=page-key", q(&b_worker), q("only for B"));
    assert_eq!(http_get(h, &url).await, (200, "ok".into()));
    b.wait_alert("only for B").await;
    a.settle(Duration::from_millis(300)).await;
    assert_eq!(a.eval("document.getElementById('log').textContent.includes('only for B')").await, json!(false));

    // A targeted push to A through its own form (its ids are filled in) reaches A only.
    a.eval("document.getElementById('key').value = 'page-key'; document.getElementById('content').value = 'just page A'; document.getElementById('targeted').checked = true; document.getElementById('send').click(); 1").await;
    a.wait_for("document.getElementById('log').textContent.includes('just page A')").await;
    b.settle(Duration::from_millis(300)).await;
    assert!(!b.alerts.iter().any(|m| m == "just page A"), "B got A's push: {:?}", b.alerts);
    assert!(!b.alerts.iter().any(|m| m == "keyless"));

    // Page C carries a token: it shows its user and topics and publishes to them.
    let claims = json!({"sub": "ann", "channels": ["lobby", "news"]});
    let token =
        jsonwebtoken::encode(&Default::default(), &claims, &jsonwebtoken::EncodingKey::from_secret(b"page-secret"))
            .expect("token");
    let mut pc = Page::open(d).await;
    pc.call("Page.navigate", json!({"url": format!("http://127.0.0.1:{w}/?token={token}")})).await;
    pc.wait_for("document.getElementById('status').textContent === 'connected' && document.getElementById('conn').textContent !== '?'").await;
    assert_eq!(pc.eval("document.getElementById('uid').textContent").await, json!("ann"));
    assert_eq!(pc.eval("document.getElementById('topics').textContent").await, json!("lobby, news"));
    pc.eval(&format!(
        "document.getElementById('publisher').value = 'http://127.0.0.1:{h}/';
         document.getElementById('key').value = 'page-key';
         document.getElementById('content').value = 'to ann';
         document.getElementById('to_me').checked = true;
         document.getElementById('send').click(); 1"
    ))
    .await;
    pc.wait_for("document.getElementById('log').textContent.includes('to ann')").await;
    pc.eval("document.getElementById('content').value = 'to the lobby'; document.getElementById('to_topic').checked = true; document.getElementById('send').click(); 1").await;
    pc.wait_for("document.getElementById('log').textContent.includes('to the lobby')").await;
    a.settle(Duration::from_millis(300)).await;
    assert_eq!(a.eval("document.getElementById('log').textContent.includes('to ann')").await, json!(false));
    assert_eq!(a.eval("document.getElementById('log').textContent.includes('to the lobby')").await, json!(false));

    // Page D: an EventSource on the gateway's /events (the same text as WebSocket clients get).
    let mut pd = Page::open(d).await;
    pd.call("Page.navigate", json!({"url": format!("http://127.0.0.1:{w}/healthz")})).await;
    pd.eval("window.got = []; window.es = new EventSource('/events'); es.onmessage = (e) => got.push(e.data); 1").await;
    pd.wait_for("got.length >= 1 && got[0].startsWith('workerID:') && got[0].endsWith(' connected\\n')").await;
    assert_eq!(http_get(h, "/?content=to-every-stream&key=page-key").await.0, 200);
    pd.wait_for("got.includes('to-every-stream')").await;

    a.call("Page.bringToFront", json!({})).await;
    let shot = a.call("Page.captureScreenshot", json!({"format": "png"})).await;
    let png =
        base64::engine::general_purpose::STANDARD.decode(shot["data"].as_str().expect("png data")).expect("base64");
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target/artifacts");
    std::fs::create_dir_all(&dir).expect("artifacts dir");
    std::fs::write(dir.join("browser-page.png"), &png).expect("write screenshot");
    assert!(png.starts_with(b"\x89PNG"), "a PNG screenshot");

    // Offsets on the page, and recovery after a reconnect: what was published while it was away
    // arrives, then the notice.
    a.wait_for("document.getElementById('log').textContent.includes('broadcast #')").await;
    a.eval("ws.onclose = null; ws.close(); 1").await;
    for i in 0..3 {
        assert_eq!(http_get(h, &format!("/?content=missed-{i}&key=page-key")).await.0, 200);
    }
    a.eval("connect(); 1").await;
    a.wait_for("document.getElementById('log').textContent.includes('everything missed while away is above')").await;
    let log = a.eval("document.getElementById('log').textContent").await;
    let log = log.as_str().expect("log text");
    let at = |s: &str| log.find(s).unwrap_or_else(|| panic!("{s:?} not on the page: {log}"));
    // Newest first: the notice above missed-2 above missed-1 above missed-0.
    assert!(
        at("everything missed") < at("missed-2") && at("missed-2") < at("missed-1") && at("missed-1") < at("missed-0")
    );

    // The page reconnects when the gateway comes back.
    server.kill();
    a.wait_for("document.getElementById('status').textContent.startsWith('disconnected')").await;
    let _server = Proc::start(&argv, &[c, w, h]).await;
    a.wait_for("document.getElementById('status').textContent === 'connected'").await;
    // The EventSource reconnected by itself (a second welcome) and gets pushes again.
    pd.wait_for("got.filter((m) => m.startsWith('workerID:')).length >= 2").await;
    assert_eq!(http_get(h, "/?content=after-restart&key=page-key").await.0, 200);
    pd.wait_for("got.includes('after-restart')").await;
    let _ = std::fs::remove_dir_all(profile);
}

/// The page over `https://`, its WebSocket over `wss://` (compressed) and an `EventSource` over
/// https, with a certificate the test makes (Chromium trusts its keys by their hashes, and
/// nothing else: without them the page does not connect); the certificate is replaced while the
/// page stays connected, and a page loaded afterwards connects too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_page_wss_and_event_source_in_chromium() {
    if !have(&["chromium", "openssl"], false) {
        return;
    }
    let (pki, cert, key) = Pki::rotating(1, 1);
    let (_server, _c, w, h) = standalone(&["--tls-cert", &cert, "--tls-key", &key, "--compression", "on"]).await;
    let trust = format!("--ignore-certificate-errors-spki-list={},{}", pki.spki("first"), pki.spki("second"));
    let (_chromium, d, profile) = chromium(&[&trust]).await;

    let mut page = Page::open(d).await;
    page.call("Page.navigate", json!({"url": format!("https://127.0.0.1:{w}/")})).await;
    page.wait_for("document.getElementById('status').textContent === 'connected' && document.getElementById('conn').textContent !== '?'").await;
    assert_eq!(page.eval("ws.url").await, json!(format!("wss://127.0.0.1:{w}/?format=json")));
    let ext = page.eval("ws.extensions").await;
    assert_eq!(ext, json!("permessage-deflate; server_no_context_takeover; client_no_context_takeover"));
    page.eval("window.got = []; window.es = new EventSource('/events'); es.onmessage = (e) => got.push(e.data); 1")
        .await;
    page.wait_for("got.length >= 1 && got[0].startsWith('workerID:')").await;

    let (mut publisher, _) = pki.connect(h).await;
    assert_eq!(https_get(&mut publisher, "/?content=over-tls-1").await.0, 200);
    page.wait_for("document.getElementById('log').textContent.includes('over-tls-1') && got.includes('over-tls-1')")
        .await;

    pki.install("second");
    pki.wait_for_cert(w, "second").await;
    assert_eq!(https_get(&mut publisher, "/?content=over-tls-2").await.0, 200);
    page.wait_for("document.getElementById('log').textContent.includes('over-tls-2') && got.includes('over-tls-2')")
        .await;
    assert_eq!(
        page.eval("got.filter((m) => m.startsWith('workerID:')).length").await,
        json!(1),
        "the stream stayed up"
    );

    let mut fresh = Page::open(d).await;
    fresh.call("Page.navigate", json!({"url": format!("https://127.0.0.1:{w}/")})).await;
    fresh.wait_for("document.getElementById('status').textContent === 'connected'").await;
    let _ = std::fs::remove_dir_all(profile);
}
