//! Test helpers: start real `pushwire` processes on free loopback ports (stopped on drop), and
//! talk to them with real clients: WebSocket, HTTP over TCP, raw Channel frames.
#![allow(dead_code)]

pub mod pki;
pub mod recovery;
pub mod redis_cluster;

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

/// A free TCP port on 127.0.0.1, for a server a test starts.
///
/// Ports come from below Linux's ephemeral range (32768 and up), so the many client sockets the
/// tests open cannot take a port between the moment it is chosen and the moment the server binds
/// it; and no port is handed out twice in one test process.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU16, Ordering};
    static NEXT: AtomicU16 = AtomicU16::new(0);
    let start = 20_000 + (std::process::id() % 600) as u16 * 20;
    loop {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let port = 20_000 + (start - 20_000 + n) % 12_700;
        if StdListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

/// A server address: a bare port means 127.0.0.1.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Addr(pub String);

impl From<u16> for Addr {
    fn from(port: u16) -> Addr {
        Addr(format!("127.0.0.1:{port}"))
    }
}
impl From<&u16> for Addr {
    fn from(port: &u16) -> Addr {
        Addr::from(*port)
    }
}
impl From<&str> for Addr {
    fn from(a: &str) -> Addr {
        Addr(a.to_owned())
    }
}
impl From<String> for Addr {
    fn from(a: String) -> Addr {
        Addr(a)
    }
}
impl From<&Addr> for Addr {
    fn from(a: &Addr) -> Addr {
        a.clone()
    }
}
impl Addr {
    /// The port of a `HOST:PORT` address.
    pub fn port(&self) -> u16 {
        self.0.rsplit_once(':').and_then(|(_, p)| p.parse().ok()).expect("HOST:PORT")
    }
}

impl std::fmt::Display for Addr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// A running `pushwire` process, killed when dropped.
pub struct Proc {
    child: Child,
    pub args: Vec<String>,
    log: Option<std::path::PathBuf>,
}

impl Proc {
    /// Start `pushwire ARGS` and wait until every `ready` port accepts connections.
    pub async fn start(args: &[&str], ready: &[u16]) -> Proc {
        Proc::program(env!("CARGO_BIN_EXE_pushwire"), args, ready).await
    }

    /// Start any program (a Redis or NATS server, say) the same way; its output is discarded
    /// unless it is pushwire.
    pub async fn program(program: &str, args: &[&str], ready: &[u16]) -> Proc {
        Proc::program_env(program, args, &[], ready).await
    }

    /// [`Proc::program`] with extra environment variables.
    pub async fn program_env(program: &str, args: &[&str], env: &[(&str, &str)], ready: &[u16]) -> Proc {
        let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        let ours = program == env!("CARGO_BIN_EXE_pushwire");
        let child = Command::new(program)
            .args(&args)
            .envs(env.iter().copied())
            .env("RUST_LOG", std::env::var("TEST_LOG").unwrap_or_else(|_| "warn".into()))
            .stdin(Stdio::null())
            .stdout(if ours { Stdio::inherit() } else { Stdio::null() })
            .stderr(if ours { Stdio::inherit() } else { Stdio::null() })
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {program}: {e} (./scripts/test installs it)"));
        let p = Proc { child, args, log: None };
        for port in ready {
            wait_port(*port).await;
        }
        p
    }

    /// A `pushwire` process whose log (stderr, at `info`) goes to a file, read with [`Proc::log`].
    pub async fn start_logged(args: &[&str], ready: &[u16]) -> Proc {
        let path = std::env::temp_dir().join(format!("pushwire-test-{}-{}.log", std::process::id(), free_port()));
        let file = std::fs::File::create(&path).expect("log file");
        let child = Command::new(env!("CARGO_BIN_EXE_pushwire"))
            .args(args)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(file)
            .spawn()
            .expect("start pushwire");
        let p = Proc { child, args: args.iter().map(|s| s.to_string()).collect(), log: Some(path) };
        for port in ready {
            wait_port(*port).await;
        }
        p
    }

    /// What a [`Proc::start_logged`] process has logged so far.
    pub fn log(&self) -> String {
        self.log.as_ref().and_then(|p| std::fs::read_to_string(p).ok()).unwrap_or_default()
    }

    /// Start any command line (`ip netns exec NS pushwire ...`, say), then wait for `ready`.
    pub async fn command(argv: &[String], ready: &[Addr]) -> Proc {
        let child = Command::new(&argv[0])
            .args(&argv[1..])
            .env("RUST_LOG", std::env::var("TEST_LOG").unwrap_or_else(|_| "warn".into()))
            .stdin(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {argv:?}: {e}"));
        let p = Proc { child, args: argv.to_vec(), log: None };
        for a in ready {
            wait_port(a).await;
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
        let _ = Command::new("kill").arg("-TERM").arg(self.child.id().to_string()).status();
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

/// Wait until something listens on `addr`.
pub async fn wait_port(addr: impl Into<Addr>) {
    let addr = addr.into();
    for _ in 0..400 {
        if TcpStream::connect(&addr.0).await.is_ok() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("nothing listens on {addr}");
}

/// One HTTP/1.1 GET over a fresh connection: (status, body).
pub async fn http_get(addr: impl Into<Addr>, target: &str) -> (u16, String) {
    http(addr, "GET", target, &[], "").await
}

/// One HTTP request over a fresh connection: (status, body).
pub async fn http(
    addr: impl Into<Addr>,
    method: &str,
    target: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> (u16, String) {
    let addr = addr.into();
    let go = async {
        let mut s = TcpStream::connect(&addr.0).await.expect("connect");
        let mut req = format!("{method} {target} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
        for (k, v) in headers {
            req.push_str(&format!("{k}: {v}\r\n"));
        }
        req.push_str(&format!("Content-Length: {}\r\n\r\n{body}", body.len()));
        s.write_all(req.as_bytes()).await.expect("write");
        // Read the head, then Content-Length bytes (or to the end when there is none).
        let mut out = Vec::new();
        let mut chunk = [0u8; 4096];
        let head_end = loop {
            if let Some(i) = out.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            let n = s.read(&mut chunk).await.expect("read");
            assert!(n > 0, "connection closed before the response head");
            out.extend_from_slice(&chunk[..n]);
        };
        let head = String::from_utf8_lossy(&out[..head_end]).into_owned();
        let length = head
            .lines()
            .find_map(|l| l.to_ascii_lowercase().strip_prefix("content-length:").map(|v| v.trim().to_owned()))
            .and_then(|v| v.parse::<usize>().ok());
        match length {
            Some(len) => {
                while out.len() < head_end + len {
                    let n = s.read(&mut chunk).await.expect("read");
                    assert!(n > 0, "connection closed in the body");
                    out.extend_from_slice(&chunk[..n]);
                }
            }
            None => {
                s.read_to_end(&mut out).await.expect("read");
            }
        }
        let status = head.split(' ').nth(1).and_then(|c| c.parse().ok()).expect("status line");
        let body = String::from_utf8_lossy(&out[head_end..]).into_owned();
        (status, body)
    };
    tokio::time::timeout(WAIT, go).await.expect("http request timed out")
}

/// A WebSocket client and the ids from its welcome line.
pub struct Client {
    pub ws: Ws,
    pub worker: String,
    pub conn: String,
}

/// Connect to a gateway and read the welcome line.
pub async fn connect(addr: impl Into<Addr>) -> Client {
    let url = format!("ws://{}/", addr.into());
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
    let w = parts.next().and_then(|p| p.strip_prefix("workerID:")).expect("workerID");
    let c = parts.next().and_then(|p| p.strip_prefix("connectionID:")).expect("connectionID");
    (w.to_owned(), c.to_owned())
}

/// The next text message, skipping pings; `None` on timeout or close.
pub async fn next_text_within(ws: &mut Ws, limit: Duration) -> Option<String> {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        let m = tokio::time::timeout_at(deadline, ws.next()).await.ok()??.ok()?;
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
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// A raw Channel protocol client, for talking to `pushwire channel` as a PHP client would.
pub struct ChannelClient {
    pub stream: Box<dyn ChannelStream>,
    buf: bytes::BytesMut,
}

pub trait ChannelStream: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send> ChannelStream for T {}

impl ChannelClient {
    pub async fn tcp(port: u16) -> ChannelClient {
        let s = TcpStream::connect(("127.0.0.1", port)).await.expect("connect channel");
        ChannelClient { stream: Box::new(s), buf: Default::default() }
    }

    pub async fn unix(path: &std::path::Path) -> ChannelClient {
        let s = tokio::net::UnixStream::connect(path).await.expect("connect unix channel");
        ChannelClient { stream: Box::new(s), buf: Default::default() }
    }

    /// Send raw bytes (a whole frame, or a part of one).
    pub async fn raw(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).await.expect("write");
    }

    pub async fn send(&mut self, req: channel_proto::Request) {
        let f = channel_proto::frame::encode(&req.encode());
        self.raw(&f).await;
    }

    /// The next non-ping payload, within `limit`.
    pub async fn recv_within(&mut self, limit: Duration) -> Option<bytes::Bytes> {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            if let Some(p) = channel_proto::frame::take_payload(&mut self.buf, 1 << 24).expect("frame") {
                if p.is_empty() {
                    continue;
                }
                return Some(p);
            }
            match tokio::time::timeout_at(deadline, self.stream.read_buf(&mut self.buf)).await {
                Ok(Ok(n)) if n > 0 => {}
                _ => return None,
            }
        }
    }

    /// Wait until the server has handled everything this client sent: publish a marker on a
    /// private channel and wait for it to come back.
    pub async fn sync(&mut self) {
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let marker = format!("sync-{}", NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed));
        self.send(channel_proto::Request::Subscribe(names(&[&marker]))).await;
        self.send(channel_proto::Request::Publish {
            channels: names(&[&marker]),
            data: bytes::Bytes::from_static(b"N;"),
            keep: None,
        })
        .await;
        loop {
            let m = self.recv().await;
            if m.channel.as_bytes() == marker.as_bytes() {
                break;
            }
        }
        self.send(channel_proto::Request::Unsubscribe(names(&[&marker]))).await;
    }

    /// The next server message; panics if none comes.
    pub async fn recv(&mut self) -> channel_proto::ServerMessage {
        let p = self.recv_within(WAIT).await.expect("a server message");
        channel_proto::ServerMessage::parse(&p).expect("valid server message")
    }

    /// Whether the server closed this connection within `limit` (reading only EOF).
    pub async fn closed_within(&mut self, limit: Duration) -> bool {
        let mut scratch = [0u8; 1024];
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            match tokio::time::timeout_at(deadline, self.stream.read(&mut scratch)).await {
                Ok(Ok(0)) | Ok(Err(_)) => return true,
                Ok(Ok(_)) => continue,
                Err(_) => return false,
            }
        }
    }
}

/// Channel names for requests.
pub fn names(ns: &[&str]) -> Vec<channel_proto::Name> {
    ns.iter().map(|n| channel_proto::Name::new(n.as_bytes().to_vec())).collect()
}

/// A captured Channel frame from the protocol crate's vectors.
pub fn vector(prefix: &str) -> Vec<u8> {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/crates/channel-proto/tests/vectors");
    for e in std::fs::read_dir(dir).expect("vectors") {
        let p = e.expect("entry").path();
        let name = p.file_name().expect("name").to_string_lossy().into_owned();
        if name.starts_with(prefix) && name.ends_with(".bin") {
            return std::fs::read(p).expect("read vector");
        }
    }
    panic!("no vector {prefix}");
}

/// Wait until `GET /healthz` on `addr` answers 200 (the node's broker link is verified).
pub async fn wait_healthy(addr: impl Into<Addr>) {
    let addr = addr.into();
    for _ in 0..600 {
        if http_get(&addr, "/healthz").await.0 == 200 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("node on {addr} never became healthy");
}

/// The seed's topology on loopback: one channel server, two gateways of two workers, two
/// publishers, all on `broker` (a channel server is started when `broker` is `None`).
pub struct Cluster {
    pub procs: Vec<Proc>,
    pub channel_port: u16,
    pub gateways: [Addr; 2],
    pub publishers: [Addr; 2],
    /// Appended to every publish URL (`&key=...` when the publishers have a key).
    pub key_query: String,
    /// While set, [`every_ok_arrives`] publishes nothing.
    pub paused: std::sync::atomic::AtomicBool,
    /// When the test killed a Redis server: pushes Redis confirmed just before may be lost with
    /// it (README, "Delivery guarantees"), and [`every_ok_arrives`] excuses those alone.
    pub broker_killed_at: std::sync::Mutex<Option<tokio::time::Instant>>,
}

impl Cluster {
    pub async fn start(broker: Option<String>) -> Cluster {
        Cluster::start_with(broker, &[], &[]).await
    }

    /// [`Cluster::start`] with `gateway_args` added to each gateway's command line, and
    /// `publisher_args` to the first publisher's.
    pub async fn start_with(broker: Option<String>, gateway_args: &[&str], publisher_args: &[&str]) -> Cluster {
        let channel_port = free_port();
        let mut procs = Vec::new();
        let broker = match broker {
            Some(b) => b,
            None => {
                procs.push(
                    Proc::start(&["channel", "--listen", &format!("127.0.0.1:{channel_port}")], &[channel_port]).await,
                );
                format!("channel://127.0.0.1:{channel_port}")
            }
        };
        let gateways = [free_port(), free_port()];
        let publishers = [free_port(), free_port()];
        for g in gateways {
            // Identical command lines but the port: ids must still not collide.
            let listen = format!("127.0.0.1:{g}");
            let mut args = vec!["gateway", "--listen", &listen, "--broker", &broker, "--workers", "2"];
            args.extend_from_slice(gateway_args);
            procs.push(Proc::start(&args, &[g]).await);
        }
        for (i, p) in publishers.into_iter().enumerate() {
            let listen = format!("127.0.0.1:{p}");
            let mut args = vec!["publisher", "--listen", &listen, "--broker", &broker];
            if i == 0 {
                args.extend_from_slice(publisher_args);
            }
            procs.push(Proc::start(&args, &[p]).await);
        }
        Cluster::of(procs, channel_port, gateways.map(Addr::from), publishers.map(Addr::from)).await
    }

    /// The cluster of gateways and publishers started already (in `procs`), once healthy.
    pub async fn of(procs: Vec<Proc>, channel_port: u16, gateways: [Addr; 2], publishers: [Addr; 2]) -> Cluster {
        let cluster = Cluster {
            procs,
            channel_port,
            gateways,
            publishers,
            key_query: String::new(),
            paused: Default::default(),
            broker_killed_at: Default::default(),
        };
        cluster.wait_healthy().await;
        cluster
    }

    /// Wait until every gateway and publisher has a verified broker link.
    pub async fn wait_healthy(&self) {
        for a in self.gateways.iter().chain(&self.publishers) {
            wait_healthy(a).await;
        }
    }

    /// `n` clients spread evenly over both gateways.
    pub async fn clients(&self, n: usize) -> Vec<Client> {
        let mut out = Vec::with_capacity(n);
        for i in 0..n {
            out.push(connect(&self.gateways[i % 2]).await);
        }
        out
    }

    /// Publish through publisher `i`: (status, body).
    pub async fn publish(&self, i: usize, query: &str) -> (u16, String) {
        http_get(&self.publishers[i % 2], &format!("/?{query}{}", self.key_query)).await
    }
}

/// Every client collects text messages until it sees `last` (or `limit` passes).
pub async fn collect_until(clients: Vec<Client>, last: &str, limit: Duration) -> Vec<(Client, Vec<String>)> {
    collect_all(clients, |_| vec![last.to_owned()], limit).await
}

/// Every client collects text messages until it has seen each of `needed(client)` (or `limit`
/// passes): messages on different channels may arrive in another order than they were published
/// (a NATS client hands each subscription its own queue).
pub async fn collect_all(
    clients: Vec<Client>,
    needed: impl Fn(&Client) -> Vec<String>,
    limit: Duration,
) -> Vec<(Client, Vec<String>)> {
    let mut tasks = Vec::new();
    for mut c in clients {
        let mut needed = needed(&c);
        tasks.push(tokio::spawn(async move {
            let mut got = Vec::new();
            let deadline = tokio::time::Instant::now() + limit;
            while !needed.is_empty() {
                let left = deadline.saturating_duration_since(tokio::time::Instant::now());
                let Some(m) = next_text_within(&mut c.ws, left).await else { break };
                needed.retain(|n| *n != m);
                got.push(m);
            }
            (c, got)
        }));
    }
    let mut out = Vec::new();
    for t in tasks {
        out.push(t.await.expect("collector task"));
    }
    out
}

/// The seed's checks across a cluster: broadcasts through either publisher reach every client
/// exactly once, and a targeted push to every client reaches that client only.
pub async fn check_seed_pushes(cluster: &Cluster, clients: Vec<Client>, tag: &str) -> Vec<Client> {
    let ids: std::collections::HashSet<(String, String)> =
        clients.iter().map(|c| (c.worker.clone(), c.conn.clone())).collect();
    assert_eq!(ids.len(), clients.len(), "every client has its own (worker, connection) pair");
    assert_eq!(cluster.publish(0, &format!("content={tag}-b1")).await, (200, "ok".into()));
    assert_eq!(cluster.publish(1, &format!("content={tag}-b2")).await, (200, "ok".into()));
    for (i, c) in clients.iter().enumerate() {
        let (w, n) = (q(&c.worker), &c.conn);
        let query = format!("to_worker_id={w}&to_connection_id={n}&content={tag}-t-{w}-{n}");
        assert_eq!(cluster.publish(i, &query).await, (200, "ok".into()), "targeted push {i}");
    }
    assert_eq!(cluster.publish(1, &format!("content={tag}-end")).await, (200, "ok".into()));
    let want = |c: &Client| {
        let t = format!("{tag}-t-{}-{}", c.worker, c.conn);
        vec![format!("{tag}-b1"), format!("{tag}-b2"), t, format!("{tag}-end")]
    };
    let results = collect_all(clients, want, Duration::from_secs(30)).await;
    let mut out = Vec::new();
    for (c, got) in results {
        let want = want(&c);
        // Order holds per channel: the broadcasts in order; the targeted push (on the worker's
        // channel) may come anywhere among them.
        let mut sorted = got.clone();
        sorted.sort();
        let mut all = want.clone();
        all.sort();
        assert_eq!(sorted, all, "client {} {} got exactly its pushes, once each", c.worker, c.conn);
        let pos = |m: &String| got.iter().position(|g| g == m);
        assert!(pos(&want[0]) < pos(&want[1]) && pos(&want[1]) < pos(&want[3]), "broadcasts in order: {got:?}");
        out.push(c);
    }
    out
}

/// `N` channel servers federated on `backend` (with `extra` flags), each healthy (its backend
/// link up): the processes, their ports, and their metrics ports.
pub async fn servers<const N: usize>(backend: &str, extra: &[&str]) -> (Vec<Proc>, [u16; N], [u16; N]) {
    let (ports, metrics) = ([(); N].map(|()| free_port()), [(); N].map(|()| free_port()));
    let mut procs = Vec::new();
    for (p, m) in ports.into_iter().zip(metrics) {
        let (listen, metrics) = (format!("127.0.0.1:{p}"), format!("127.0.0.1:{m}"));
        let args = ["--settle", "0s", "--broker", backend, "--metrics-listen", &metrics];
        let args = [&["channel", "--listen", &listen][..], &args, extra].concat();
        procs.push(Proc::start(&args, &[p, m]).await);
        wait_healthy(m).await;
        assert_eq!(metric(m, "pushwire_channel_backend_up").await, 1);
    }
    (procs, ports, metrics)
}

/// HAProxy in TCP mode in front of the channel servers on `ports`, as README shows it: a server
/// takes new connections while its `/healthz` (on its `metrics` port) says 200, checked every
/// 200 ms here. The process and the port it listens on.
pub async fn haproxy(ports: &[u16], metrics: &[u16]) -> (Proc, u16) {
    let listen = free_port();
    let servers: String = ports
        .iter()
        .zip(metrics)
        .enumerate()
        .map(|(i, (p, m))| {
            format!("  server s{i} 127.0.0.1:{p} check port {m} inter 200ms fall 1 rise 2 on-marked-down shutdown-sessions\n")
        })
        .collect();
    let cfg = format!(
        "defaults\n  mode tcp\n  timeout connect 1s\n  timeout client 2m\n  timeout server 2m\n  retries 3\n  \
         option redispatch\nfrontend channel\n  bind 127.0.0.1:{listen}\n  default_backend servers\n\
         backend servers\n  balance roundrobin\n  option httpchk GET /healthz\n{servers}"
    );
    let path = std::env::temp_dir().join(format!("pushwire-haproxy-{}-{listen}.cfg", std::process::id()));
    std::fs::write(&path, cfg).expect("haproxy config");
    let args = ["-f", path.to_str().expect("path"), "-db"];
    (Proc::program(&find_program("haproxy"), &args, &[listen]).await, listen)
}

/// The path of an installed program (Debian puts some servers in /usr/sbin), if there is one.
fn installed(name: &str) -> Option<String> {
    let path = std::env::var("PATH").unwrap_or_default();
    let dirs = path.split(':').map(str::to_owned).chain(["/usr/sbin", "/usr/bin", "/usr/local/bin"].map(String::from));
    dirs.map(|dir| std::path::Path::new(&dir).join(name))
        .find(|p| p.is_file())
        .map(|p| p.to_string_lossy().into_owned())
}

/// The path of an installed program.
pub fn find_program(name: &str) -> String {
    installed(name).unwrap_or_else(|| panic!("{name} is not installed: run ./scripts/test, which installs it"))
}

/// Set by ./scripts/test: every test runs, and a missing program is a failure, not a skip.
pub const ALL_TESTS: &str = "PUSHWIRE_TEST_ALL";

/// Whether what a test needs is here: `programs` installed and, with `root`, root privileges.
/// Under plain `cargo test` a missing one skips the test with a message saying what to run;
/// under ./scripts/test (which installs everything) it fails the test.
pub fn have(programs: &[&str], root: bool) -> bool {
    let mut missing: Vec<String> = programs.iter().filter(|p| installed(p).is_none()).map(|p| p.to_string()).collect();
    // The effective user, from "Uid: real effective ..." in /proc/self/status.
    let uid = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find_map(|l| l.strip_prefix("Uid:")?.split_whitespace().nth(1)?.parse::<u32>().ok()));
    if root && uid != Some(0) {
        missing.push("root privileges".into());
    }
    if missing.is_empty() {
        return true;
    }
    let what = missing.join(", ");
    assert!(std::env::var_os(ALL_TESTS).is_none(), "{ALL_TESTS} is set and this test needs {what}");
    eprintln!("SKIPPED: this test needs {what}; ./scripts/test installs what is missing and runs it");
    false
}

/// A Redis server on 127.0.0.1:`port`, no persistence.
pub async fn redis_server(port: u16) -> Proc {
    let port_s = port.to_string();
    let args = ["--port", &port_s, "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--daemonize", "no"];
    Proc::program(&find_program("redis-server"), &args, &[port]).await
}

/// A Redis server on a free port and its broker URL; `None` (the test skips) when Redis is missing.
pub async fn redis_broker() -> Option<(Proc, String)> {
    if !have(&["redis-server"], false) {
        return None;
    }
    let port = free_port();
    Some((redis_server(port).await, format!("redis://127.0.0.1:{port}")))
}

/// A NATS server with JetStream (its store in a fresh temporary directory) on a free port, and its
/// broker URL; `None` (the test skips) when NATS is missing.
pub async fn nats_broker() -> Option<(Proc, String)> {
    if !have(&["nats-server"], false) {
        return None;
    }
    let port = free_port();
    let store = std::env::temp_dir().join(format!("pushwire-js-{}-{port}", std::process::id()));
    let _ = std::fs::remove_dir_all(&store);
    let store = store.to_string_lossy().into_owned();
    let args = ["-a", "127.0.0.1", "-p", &port.to_string(), "-js", "-sd", &store];
    let server = Proc::program(&find_program("nats-server"), &args, &[port]).await;
    Some((server, format!("nats://127.0.0.1:{port}")))
}

/// A NATS server on 127.0.0.1:`port`; with `cluster`, a route listener on that port and routes to
/// `routes`; with `monitor`, the HTTP monitoring port.
pub async fn nats_server(port: u16, cluster: Option<(u16, &[u16])>, monitor: Option<u16>) -> Proc {
    let mut args = vec!["-a".to_string(), "127.0.0.1".into(), "-p".into(), port.to_string()];
    if let Some((cport, routes)) = cluster {
        args.extend(["--cluster_name".into(), "pw".into(), "--cluster".into(), format!("nats://127.0.0.1:{cport}")]);
        let r: Vec<String> = routes.iter().map(|p| format!("nats://127.0.0.1:{p}")).collect();
        if !r.is_empty() {
            args.extend(["--routes".into(), r.join(",")]);
        }
    }
    if let Some(m) = monitor {
        args.extend(["-m".into(), m.to_string()]);
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    Proc::program(&find_program("nats-server"), &args, &[port]).await
}

/// A `pushwire standalone` on free loopback ports, with `extra` flags:
/// (process, channel port, gateway port, publisher port).
pub async fn standalone(extra: &[&str]) -> (Proc, u16, u16, u16) {
    let (c, w, h) = (free_port(), free_port(), free_port());
    let (cl, wl, hl) = (format!("127.0.0.1:{c}"), format!("127.0.0.1:{w}"), format!("127.0.0.1:{h}"));
    let mut args = vec!["standalone", "--channel-listen", &cl, "--ws-listen", &wl, "--http-listen", &hl];
    args.extend_from_slice(extra);
    (Proc::start(&args, &[c, w, h]).await, c, w, h)
}

/// [`every_ok_arrives`] across a restart of the Redis server on `port` (`redis`): killed (-9)
/// 300 ms into the publishing, started again 700 ms later. Some publishes must have been refused
/// in between and more than ten confirmed. Returns the clients and the new Redis server.
pub async fn every_ok_across_a_redis_restart(
    cluster: &Cluster,
    clients: Vec<Client>,
    port: u16,
    redis: Proc,
) -> (Vec<Client>, Proc) {
    let mut redis = Some(redis);
    let restart = async {
        tokio::time::sleep(Duration::from_millis(300)).await;
        if let Some(mut r) = redis.take() {
            r.kill();
            *cluster.broker_killed_at.lock().expect("lock") = Some(tokio::time::Instant::now());
        }
        tokio::time::sleep(Duration::from_millis(700)).await;
        redis = Some(redis_server(port).await);
        cluster.wait_healthy().await;
    };
    let (clients, confirmed, refused) = every_ok_arrives(cluster, clients, "live", restart).await;
    assert!(refused > 0, "publishes during the outage were refused");
    assert!(confirmed > 10, "publishes before and after the outage were confirmed ({confirmed})");
    (clients, redis.expect("Redis started again"))
}

/// Broadcast `tag-N` through alternating publishers of `cluster` every 20 ms while `during` runs
/// (an outage, say), then until a publish is confirmed again; then `tag-end`. Every client must
/// have received every confirmed (200) broadcast exactly once, in order. Returns the clients and
/// (confirmed, refused) counts.
pub async fn every_ok_arrives<F: std::future::Future<Output = ()>>(
    cluster: &Cluster,
    clients: Vec<Client>,
    tag: &str,
    during: F,
) -> (Vec<Client>, usize, usize) {
    let stop = std::sync::atomic::AtomicBool::new(false);
    let publishing = async {
        let (mut confirmed, mut refused): (Vec<(String, bool, tokio::time::Instant)>, usize) = (Vec::new(), 0);
        let mut n = 0;
        // Go on until the outage is over and a publish was confirmed after it.
        while !stop.load(std::sync::atomic::Ordering::Relaxed) || confirmed.last().is_none_or(|(_, after, _)| !after) {
            if cluster.paused.load(std::sync::atomic::Ordering::Relaxed) {
                tokio::time::sleep(Duration::from_millis(5)).await;
                continue;
            }
            n += 1;
            let content = format!("{tag}-{n}");
            let after = stop.load(std::sync::atomic::Ordering::Relaxed);
            match cluster.publish(n, &format!("content={content}")).await.0 {
                200 => confirmed.push((content, after, tokio::time::Instant::now())),
                503 => refused += 1,
                other => panic!("publish answered {other}"),
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
            assert!(n < 5_000, "no publish confirmed after the outage");
        }
        (confirmed.into_iter().map(|(c, _, at)| (c, at)).collect::<Vec<_>>(), refused)
    };
    let outage = async {
        during.await;
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
    };
    let ((confirmed, refused), ()) = tokio::join!(publishing, outage);
    let end = format!("{tag}-end");
    assert_eq!(cluster.publish(0, &format!("content={end}")).await.0, 200);
    let got = collect_until(clients, &end, WAIT).await;
    // Redis killed: what it confirmed in the 100 ms before may be lost with it.
    let killed = *cluster.broker_killed_at.lock().expect("lock");
    let excused = |at: tokio::time::Instant| killed.is_some_and(|k| at <= k && k - at < Duration::from_millis(100));
    let mut out = Vec::new();
    for (c, msgs) in got {
        let seen: Vec<&String> = msgs.iter().filter(|m| confirmed.iter().any(|(c, _)| c == *m)).collect();
        let missing: Vec<&String> =
            confirmed.iter().filter(|(m, at)| !msgs.contains(m) && !excused(*at)).map(|(m, _)| m).collect();
        assert!(missing.is_empty(), "client {}/{} missed confirmed pushes {missing:?}", c.worker, c.conn);
        let arrived: Vec<&String> = confirmed.iter().map(|(m, _)| m).filter(|m| msgs.contains(m)).collect();
        assert_eq!(seen, arrived, "in order, no duplicates");
        assert_eq!(msgs.last(), Some(&end));
        out.push(c);
    }
    (out, confirmed.len(), refused)
}

/// Wait (within [`WAIT`]) until metric `name` of a node reads `want`.
pub async fn wait_metric(addr: impl Into<Addr>, name: &str, want: u64) {
    let addr = addr.into();
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let got = metric(&addr, name).await;
        if got == want {
            return;
        }
        assert!(tokio::time::Instant::now() < deadline, "{name} is {got}, not {want}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The value of metric `name` in Prometheus `text`; panics when there is none.
pub fn metric_in(text: &str, name: &str) -> u64 {
    let value = text.lines().find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok());
    value.unwrap_or_else(|| panic!("no metric {name} in:\n{text}"))
}

/// A `/metrics` value of a node; panics when the node has no such metric.
pub async fn metric(addr: impl Into<Addr>, name: &str) -> u64 {
    metric_in(&http_get(addr, "/metrics").await.1, name)
}

/// An HS256 token with `claims`, signed with `secret`.
pub fn jwt(secret: &str, claims: serde_json::Value) -> String {
    let key = jsonwebtoken::EncodingKey::from_secret(secret.as_bytes());
    jsonwebtoken::encode(&jsonwebtoken::Header::default(), &claims, &key).expect("token")
}

/// A token for user `sub` in `channels`, signed with `secret`.
pub fn user_token(secret: &str, sub: &str, channels: &[&str]) -> String {
    jwt(secret, serde_json::json!({"sub": sub, "channels": channels}))
}

/// A WebSocket connection to `gw` with `token` (the welcome line already read).
pub async fn connect_with(gw: impl Into<Addr>, token: &str) -> Client {
    let url = format!("ws://{}/?token={token}", gw.into().0);
    let (mut ws, _) = tokio::time::timeout(WAIT, tokio_tungstenite::connect_async(url))
        .await
        .expect("connect timed out")
        .expect("websocket handshake");
    let (worker, conn) = parse_welcome(&next_text(&mut ws).await.expect("welcome line"));
    Client { ws, worker, conn }
}

/// Run `script` with Node in tests/pusher with `args`; its output, or a panic with it when it
/// fails. Missing libraries skip the test under plain `cargo test` (`./scripts/test` installs
/// them) and fail it under the full suite.
pub async fn node(script: &str, args: &[String]) -> Option<String> {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/pusher");
    if !dir.join("node_modules/pusher-js").exists() || !have(&["node"], false) {
        assert!(std::env::var_os(ALL_TESTS).is_none(), "{ALL_TESTS} is set and tests/pusher/node_modules is missing");
        eprintln!("skipped: run `npm ci --prefix tests/pusher` (./scripts/test does)");
        return None;
    }
    let run = tokio::process::Command::new("node").arg(script).args(args).current_dir(&dir).kill_on_drop(true).output();
    let out =
        tokio::time::timeout(std::time::Duration::from_secs(120), run).await.expect("in time").expect("node runs");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{script} failed:\n{text}");
    Some(text)
}

/// Counts and members come from the gateways the publishers know: wait until the first publisher
/// has heard from both (as the native /presence tests do).
pub async fn heard_from_both(cluster: &Cluster) {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let (_, body) = http_get(&cluster.publishers[0], "/cluster").await;
        let known: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
        if known["gateways"].as_array().is_some_and(|g| g.len() == 2) {
            return;
        }
        assert!(tokio::time::Instant::now() < deadline, "the publisher never heard from both gateways: {body}");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

/// The Pusher app of the tests: id, key, secret.
pub const PUSHER_APP: (&str, &str, &str) = ("7", "app-key", "app-secret");

/// The arguments of a Pusher test script on `cluster`: the first gateway, the first publisher,
/// [`PUSHER_APP`], the second gateway.
pub fn pusher_script_args(cluster: &Cluster) -> Vec<String> {
    let (id, key, secret) = PUSHER_APP;
    let (gateways, publisher) = (&cluster.gateways, cluster.publishers[0].port().to_string());
    let [a, b] = [0, 1].map(|i| gateways[i].port().to_string());
    vec![a, publisher, id.into(), key.into(), secret.into(), b]
}

/// The Pusher test scripts (tests/pusher: pusher-js, Laravel Echo, the Node SDK) against two
/// gateways and a publisher on `broker` (`None`: a channel server), with app [`PUSHER_APP`].
pub async fn pusher_across_two_gateways(broker: Option<String>) {
    let (id, key, secret) = PUSHER_APP;
    let app = format!("{id}:{key}:{secret}");
    let cluster = Cluster::start_with(broker, &["--app", &app], &["--app", &app]).await;
    heard_from_both(&cluster).await;
    let args = pusher_script_args(&cluster);
    for script in ["basic.mjs", "echo.mjs"] {
        if let Some(out) = node(script, &args).await {
            assert!(out.contains("all passed"), "{out}");
        }
    }
}
