//! Test helpers: start real `pushwire` processes on free loopback ports (stopped on drop), and
//! talk to them with real clients: WebSocket, HTTP over TCP, raw Channel frames.
#![allow(dead_code)]

use std::net::TcpListener as StdListener;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;

pub type Ws = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<TcpStream>>;

/// Every await in a test is bounded by this unless it says otherwise.
pub const WAIT: Duration = Duration::from_secs(10);

/// A free TCP port on 127.0.0.1.
pub fn free_port() -> u16 {
    StdListener::bind("127.0.0.1:0")
        .expect("bind port 0")
        .local_addr()
        .expect("addr")
        .port()
}

/// A running `pushwire` process, killed when dropped.
pub struct Proc {
    child: Child,
    pub args: Vec<String>,
}

impl Proc {
    /// Start `pushwire ARGS` and wait until every `ready` port accepts connections.
    pub async fn start(args: &[&str], ready: &[u16]) -> Proc {
        let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        let child = Command::new(env!("CARGO_BIN_EXE_pushwire"))
            .args(&args)
            .env(
                "RUST_LOG",
                std::env::var("TEST_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .stdin(Stdio::null())
            .spawn()
            .expect("start pushwire");
        let p = Proc { child, args };
        for port in ready {
            wait_port(*port).await;
        }
        p
    }

    /// Kill the process and wait for it.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Send SIGTERM and wait (bounded) for the exit status.
    pub async fn terminate(&mut self) -> Option<std::process::ExitStatus> {
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status();
        for _ in 0..200 {
            if let Ok(Some(s)) = self.child.try_wait() {
                return Some(s);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        None
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Wait until something listens on 127.0.0.1:`port`.
pub async fn wait_port(port: u16) {
    for _ in 0..200 {
        if TcpStream::connect(("127.0.0.1", port)).await.is_ok() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("nothing listens on port {port}");
}

/// One HTTP/1.1 GET over a fresh connection: (status, body).
pub async fn http_get(port: u16, target: &str) -> (u16, String) {
    http(port, "GET", target, &[], "").await
}

/// One HTTP request over a fresh connection: (status, body).
pub async fn http(
    port: u16,
    method: &str,
    target: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> (u16, String) {
    let go = async {
        let mut s = TcpStream::connect(("127.0.0.1", port))
            .await
            .expect("connect");
        let mut req =
            format!("{method} {target} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n");
        for (k, v) in headers {
            req.push_str(&format!("{k}: {v}\r\n"));
        }
        req.push_str(&format!("Content-Length: {}\r\n\r\n{body}", body.len()));
        s.write_all(req.as_bytes()).await.expect("write");
        let mut out = Vec::new();
        s.read_to_end(&mut out).await.expect("read");
        let text = String::from_utf8_lossy(&out).into_owned();
        let status = text
            .split(' ')
            .nth(1)
            .and_then(|c| c.parse().ok())
            .expect("status line");
        let body = text
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_owned())
            .unwrap_or_default();
        (status, body)
    };
    tokio::time::timeout(WAIT, go)
        .await
        .expect("http request timed out")
}

/// A WebSocket client and the ids from its welcome line.
pub struct Client {
    pub ws: Ws,
    pub worker: String,
    pub conn: String,
}

/// Connect to a gateway and read the welcome line.
pub async fn connect(port: u16) -> Client {
    let url = format!("ws://127.0.0.1:{port}/");
    let (mut ws, _) = tokio::time::timeout(WAIT, tokio_tungstenite::connect_async(url))
        .await
        .expect("connect timed out")
        .expect("websocket handshake");
    let welcome = next_text(&mut ws).await.expect("welcome line");
    let (worker, conn) = parse_welcome(&welcome);
    Client { ws, worker, conn }
}

/// `workerID:W connectionID:C connected\n` -> (W, C).
pub fn parse_welcome(line: &str) -> (String, String) {
    assert!(line.ends_with(" connected\n"), "welcome line {line:?}");
    let mut parts = line.split_whitespace();
    let w = parts
        .next()
        .and_then(|p| p.strip_prefix("workerID:"))
        .expect("workerID");
    let c = parts
        .next()
        .and_then(|p| p.strip_prefix("connectionID:"))
        .expect("connectionID");
    (w.to_owned(), c.to_owned())
}

/// The next text message, skipping pings; `None` on timeout or close.
pub async fn next_text_within(ws: &mut Ws, limit: Duration) -> Option<String> {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        let m = tokio::time::timeout_at(deadline, ws.next())
            .await
            .ok()??
            .ok()?;
        match m {
            Message::Text(t) => return Some(t.to_string()),
            Message::Close(_) => return None,
            _ => continue,
        }
    }
}

pub async fn next_text(ws: &mut Ws) -> Option<String> {
    next_text_within(ws, WAIT).await
}

/// Close a client politely.
pub async fn close(mut ws: Ws) {
    let _ = ws.send(Message::Close(None)).await;
}

/// Percent-encode a query value.
pub fn q(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}
