//! The clients' side: a minimal WebSocket client (plain or TLS), connecting many of them, and
//! receiving their pushes cheaply (a bitset per connection, latencies into sharded histograms).

use super::*;
/// A client socket: plain, or TLS for `wss://` and `https://`.
pub(crate) enum Stream {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

impl Stream {
    /// TLS over `tcp` when `tls` is given, naming the server by `host`'s IP address or name.
    pub(crate) async fn over(tcp: TcpStream, host: &str, tls: Option<&TlsConnector>) -> anyhow::Result<Stream> {
        let Some(tls) = tls else { return Ok(Stream::Plain(tcp)) };
        let name = host.rsplit_once(':').map_or(host, |(h, _)| h).trim_matches(['[', ']']);
        let name = rustls::pki_types::ServerName::try_from(name.to_owned())?;
        Ok(Stream::Tls(Box::new(tls.connect(name, tcp).await?)))
    }
}

impl AsyncRead for Stream {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Tls(s) => Pin::new(&mut **s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Tls(s) => Pin::new(&mut **s).poll_write(cx, buf),
        }
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_flush(cx),
            Stream::Tls(s) => Pin::new(&mut **s).poll_flush(cx),
        }
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Tls(s) => Pin::new(&mut **s).poll_shutdown(cx),
        }
    }
}

/// A TLS client trusting the certificate authority in `ca`.
pub(crate) fn tls_client(ca: &std::path::Path) -> anyhow::Result<TlsConnector> {
    use rustls::pki_types::pem::PemObject as _;
    let mut roots = rustls::RootCertStore::empty();
    for cert in
        rustls::pki_types::CertificateDer::pem_file_iter(ca).with_context(|| format!("--ca {}", ca.display()))?
    {
        roots.add(cert?)?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(TlsConnector::from(Arc::new(config)))
}

/// `HOST:PORT` of an address given as `HOST:PORT` or a URL, and whether the URL says TLS.
pub(crate) fn host_port(s: &str) -> (String, bool) {
    let tls = s.starts_with("wss://") || s.starts_with("https://");
    let rest = ["ws://", "wss://", "http://", "https://"].iter().find_map(|p| s.strip_prefix(p)).unwrap_or(s);
    (rest.trim_end_matches('/').to_owned(), tls)
}

/// One connected client: its ids from the welcome line.
pub(crate) struct Conn {
    pub(crate) stream: Stream,
    pub(crate) buf: BytesMut,
    pub(crate) worker: String,
    pub(crate) conn: String,
}

/// Connect a client to `gateway` at `path` and read its welcome; a Pusher client (`subscribe`)
/// subscribes to that channel and waits until it is in.
pub(crate) async fn connect_one(
    gateway: &str,
    path: &str,
    source: u8,
    compression: bool,
    tls: Option<&TlsConnector>,
    subscribe: Option<(&str, &PusherApp)>,
) -> anyhow::Result<Conn> {
    let addr: SocketAddr = tokio::net::lookup_host(gateway).await?.next().context("gateway address")?;
    let sock = if addr.is_ipv4() { TcpSocket::new_v4()? } else { TcpSocket::new_v6()? };
    if addr.ip().is_loopback() && addr.is_ipv4() {
        sock.bind(SocketAddr::from(([127, 0, 0, source.max(1)], 0)))?;
    }
    let tcp = sock.connect(addr).await?;
    tcp.set_nodelay(true)?;
    let mut stream = Stream::over(tcp, gateway, tls).await?;
    let offer = if compression { "Sec-WebSocket-Extensions: permessage-deflate\r\n" } else { "" };
    let req = format!(
        "GET {path} HTTP/1.1\r\nHost: {gateway}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: cHVzaHdpcmUtYmVuY2gtMQ==\r\nSec-WebSocket-Version: 13\r\n{offer}\r\n"
    );
    stream.write_all(req.as_bytes()).await?;
    let mut buf = BytesMut::with_capacity(1024);
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        if stream.read_buf(&mut buf).await? == 0 || buf.len() > 8192 {
            bail!("gateway closed during the handshake");
        }
    };
    if !buf.starts_with(b"HTTP/1.1 101") {
        bail!("handshake refused: {}", String::from_utf8_lossy(&buf[..head_end.min(80)]).lines().next().unwrap_or(""));
    }
    buf.advance(head_end);
    if let Some((channel, app)) = subscribe {
        return pusher_subscribe(stream, buf, channel, app).await;
    }
    loop {
        if let Some((_, payload)) = frame(&mut buf)? {
            let text = String::from_utf8_lossy(&payload);
            if text.starts_with('{') {
                // A JSON welcome (a recoverer): its ids are not needed.
                return Ok(Conn { stream, buf, worker: String::new(), conn: String::new() });
            }
            let mut parts = text.split_whitespace();
            let worker = parts.next().and_then(|p| p.strip_prefix("workerID:")).context("welcome line")?.to_owned();
            let conn = parts.next().and_then(|p| p.strip_prefix("connectionID:")).context("welcome line")?.to_owned();
            return Ok(Conn { stream, buf, worker, conn });
        }
        if stream.read_buf(&mut buf).await? == 0 {
            bail!("gateway closed before the welcome line");
        }
    }
}

/// After a Pusher client's handshake: its `socket_id` from `pusher:connection_established`, then
/// a subscription to `channel` (signed, for a private one), once
/// `pusher_internal:subscription_succeeded` came.
async fn pusher_subscribe(
    mut stream: Stream,
    mut buf: BytesMut,
    channel: &str,
    app: &PusherApp,
) -> anyhow::Result<Conn> {
    let mut socket_id = None;
    loop {
        while let Some((op, payload)) = frame(&mut buf)? {
            if op != 0x1 {
                continue;
            }
            let m: serde_json::Value = serde_json::from_slice(&payload)?;
            match m["event"].as_str() {
                Some("pusher:connection_established") => {
                    let data: serde_json::Value = serde_json::from_str(m["data"].as_str().unwrap_or_default())?;
                    socket_id = data["socket_id"].as_str().map(str::to_owned);
                    let mut sub = serde_json::json!({"event": "pusher:subscribe", "data": {"channel": channel}});
                    if let (true, Some(id)) = (channel.starts_with("private-"), &socket_id) {
                        sub["data"]["auth"] = app.auth(id, channel).into();
                    }
                    stream.write_all(&client_frame(0x1, sub.to_string().as_bytes())).await?;
                }
                Some("pusher_internal:subscription_succeeded") => {
                    let worker = socket_id.context("subscribed before connection_established")?;
                    return Ok(Conn { stream, buf, worker, conn: String::new() });
                }
                Some("pusher:error") => bail!("pusher:error {}", m["data"]),
                _ => {}
            }
        }
        if stream.read_buf(&mut buf).await? == 0 {
            bail!("gateway closed before the subscription");
        }
    }
}

/// Where the content of a push starts: all of a seed push; a Pusher event's `data` string.
fn content_of(payload: &[u8]) -> &[u8] {
    const DATA: &[u8] = br#""data":""#;
    match payload.first() {
        Some(b'{') => payload.windows(DATA.len()).position(|w| w == DATA).map_or(&[], |i| &payload[i + DATA.len()..]),
        _ => payload,
    }
}

/// Take one unmasked server frame: (opcode, payload), its payload inflated when RSV1 says it is
/// compressed (permessage-deflate without context takeover: each message on its own).
pub(crate) fn frame(buf: &mut BytesMut) -> anyhow::Result<Option<(u8, BytesMut)>> {
    let Some((b0, payload)) = raw_frame(buf)? else { return Ok(None) };
    if b0 & 0x40 == 0 {
        return Ok(Some((b0 & 0x0F, payload)));
    }
    let mut d = flate2::Decompress::new(false);
    let input = [&payload[..], &[0, 0, 0xff, 0xff]].concat();
    let mut out = Vec::with_capacity(payload.len() * 4 + 64);
    loop {
        let consumed = d.total_in() as usize;
        d.decompress_vec(&input[consumed..], &mut out, flate2::FlushDecompress::Sync)?;
        if d.total_in() as usize == input.len() && out.len() < out.capacity() {
            break;
        }
        out.reserve(out.capacity().max(256));
    }
    Ok(Some((b0 & 0x0F, BytesMut::from(&out[..]))))
}

/// Take one unmasked server frame: (first byte, payload as sent).
pub(crate) fn raw_frame(buf: &mut BytesMut) -> anyhow::Result<Option<(u8, BytesMut)>> {
    let [b0, b1, ..] = buf[..] else { return Ok(None) };
    let (len, head) = match b1 & 0x7F {
        126 => match buf.get(2..4) {
            Some(b) => (u16::from_be_bytes([b[0], b[1]]) as usize, 4),
            None => return Ok(None),
        },
        127 => match buf.get(2..10) {
            Some(b) => (u64::from_be_bytes(b.try_into()?) as usize, 10),
            None => return Ok(None),
        },
        n => (n as usize, 2),
    };
    if buf.len() < head + len {
        return Ok(None);
    }
    buf.advance(head);
    Ok(Some((b0, buf.split_to(len))))
}

/// A masked client frame (up to 64 KiB of payload).
pub(crate) fn client_frame(opcode: u8, payload: &[u8]) -> Vec<u8> {
    let payload = &payload[..payload.len().min(u16::MAX as usize)];
    let mut f = vec![0x80 | opcode];
    match payload.len() {
        n @ 0..=125 => f.push(0x80 | n as u8),
        n => {
            f.push(0x80 | 126);
            f.extend_from_slice(&(n as u16).to_be_bytes());
        }
    }
    f.extend_from_slice(&[1, 2, 3, 4]);
    f.extend(payload.iter().enumerate().map(|(i, b)| b ^ [1, 2, 3, 4][i % 4]));
    f
}

/// The channel of `--mode client-events`.
pub(crate) const CLIENT_EVENTS_CHANNEL: &str = "private-bench";

/// A client event carrying `content`.
pub(crate) fn client_event(content: &str) -> String {
    serde_json::json!({ "event": "client-e", "channel": CLIENT_EVENTS_CHANNEL, "data": content }).to_string()
}

/// A Pusher connection that sends client events (what it receives is read and dropped).
pub(crate) struct Sender {
    write: tokio::io::WriteHalf<Stream>,
}

impl Sender {
    pub(crate) async fn open(gateway: &str, tls: Option<&TlsConnector>, app: &PusherApp) -> anyhow::Result<Sender> {
        let path = format!("/app/{}?protocol=7&client=pushwire-bench&version=1.0", app.key);
        let c = connect_one(gateway, &path, 1, false, tls, Some((CLIENT_EVENTS_CHANNEL, app))).await?;
        let (mut read, write) = tokio::io::split(c.stream);
        tokio::spawn(async move {
            let mut buf = vec![0u8; 64 * 1024];
            while matches!(read.read(&mut buf).await, Ok(n) if n > 0) {}
        });
        Ok(Sender { write })
    }

    pub(crate) async fn send(&mut self, json: &str) -> anyhow::Result<()> {
        Ok(self.write.write_all(&client_frame(0x1, json.as_bytes())).await?)
    }
}

/// Read pushes until the connection ends (or the task is aborted at the end of the run); `me` is
/// this client's index, `broadcasts` the most expected. Everything is counted once per read batch,
/// so aborting between reads loses nothing and the shared counters are touched rarely.
pub(crate) async fn receive(mut c: Conn, me: usize, user: Option<String>, stats: Arc<Stats>, broadcasts: usize) {
    let shard = me % SHARDS;
    let mut seen = vec![0u64; broadcasts.div_ceil(64).max(1)];
    let mut lat: Vec<u64> = Vec::with_capacity(64);
    loop {
        let now = stats.now_us();
        let (mut delivered, mut new_broadcasts, mut dups, mut mine, mut wrong) = (0, 0, 0, 0, 0);
        while let Ok(Some((op, payload))) = frame(&mut c.buf) {
            match op {
                0x9 => {
                    let _ = c.stream.write_all(&client_frame(0xA, &payload)).await;
                    continue;
                }
                0x8 => return,
                0x1 | 0x2 => {}
                _ => continue,
            }
            if payload.starts_with(br#"{"event":"pusher:ping""#) {
                let _ = c.stream.write_all(&client_frame(0x1, br#"{"event":"pusher:pong","data":{}}"#)).await;
                continue;
            }
            let mut parts = content_of(&payload).split(|b| *b == b':');
            let (Some(seq), Some(sent), Some(target)) = (parts.next(), parts.next(), parts.next()) else { continue };
            let num = |b: &[u8]| std::str::from_utf8(b).ok().and_then(|s| s.parse::<u64>().ok());
            let (Some(seq), Some(sent)) = (num(seq), num(sent)) else { continue };
            delivered += 1;
            lat.push(now.saturating_sub(sent));
            if target == b"b" {
                let (word, bit) = (seq as usize / 64, 1u64 << (seq % 64));
                match seen.get_mut(word) {
                    Some(w) if *w & bit != 0 => dups += 1,
                    Some(w) => {
                        *w |= bit;
                        new_broadcasts += 1;
                        if let Some(a) = stats.last_arrival.get(seq as usize) {
                            a.fetch_max(now, Relaxed);
                        }
                    }
                    None => {}
                }
            } else if user.as_deref().map_or(num(target) == Some(me as u64), |u| target == u.as_bytes()) {
                mine += 1;
            } else {
                wrong += 1;
            }
        }
        if delivered > 0 {
            stats.deliveries.fetch_add(delivered, Relaxed);
            stats.broadcasts_seen.fetch_add(new_broadcasts, Relaxed);
            stats.duplicates.fetch_add(dups, Relaxed);
            stats.targeted_received.fetch_add(mine, Relaxed);
            stats.misdelivered.fetch_add(wrong, Relaxed);
            stats.last_receive.fetch_max(now, Relaxed);
            if let Ok(mut h) = stats.hist[shard].lock() {
                for l in lat.drain(..) {
                    let _ = h.record(l.max(1));
                }
            }
        }
        match c.stream.read_buf(&mut c.buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                stats.wire_bytes.fetch_add(n as u64, Relaxed);
            }
        }
    }
}

/// Connect clients `range` (spread over `gateways`, `--connect-concurrency` at a time) and start
/// their receivers: each connected client's index and ids, the failures, the receivers.
pub(crate) async fn connect_clients(
    args: &BenchArgs,
    range: std::ops::Range<usize>,
    gateways: &[String],
    tls: Option<&TlsConnector>,
    stats: &Arc<Stats>,
    planned: usize,
) -> (Vec<(usize, String, String)>, u64, Vec<tokio::task::JoinHandle<()>>) {
    let next = Arc::new(AtomicUsize::new(range.start));
    let conns: Arc<Mutex<Vec<(usize, Conn)>>> = Arc::new(Mutex::new(Vec::with_capacity(range.len())));
    let failures = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for _ in 0..args.connect_concurrency.max(1) {
        let (next, conns, failures, gateways) = (next.clone(), conns.clone(), failures.clone(), gateways.to_vec());
        let (end, ips, compression, tls) = (range.end, args.source_ips.max(1), args.compression, tls.cloned());
        let args = args.clone();
        tasks.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, Relaxed);
                if i >= end {
                    return;
                }
                let g = &gateways[i % gateways.len()];
                let path = match client_path(&args, i) {
                    Ok(p) => p,
                    Err(e) => return eprintln!("client {i}: {e:#}"),
                };
                let channel = (args.protocol == Protocol::Pusher).then(|| pusher_channel(args.mode, i));
                let app = args.app.as_deref().map(PusherApp::parse).transpose();
                let subscribe = match (&channel, &app) {
                    (Some(c), Ok(Some(app))) => Some((c.as_str(), app)),
                    _ => None,
                };
                let source = 1 + (i / gateways.len()) as u8 % ips;
                match connect_one(g, &path, source, compression, tls.as_ref(), subscribe).await {
                    Ok(c) => {
                        if let Ok(mut v) = conns.lock() {
                            v.push((i, c));
                        }
                    }
                    Err(e) => {
                        if failures.fetch_add(1, Relaxed) < 3 {
                            eprintln!("client {i}: {e:#}");
                        }
                    }
                }
            }
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
    let conns = std::mem::take(&mut *conns.lock().unwrap_or_else(|e| e.into_inner()));
    let mut ids = Vec::with_capacity(conns.len());
    let mut receivers = Vec::with_capacity(conns.len());
    for (i, c) in conns {
        ids.push((i, c.worker.clone(), c.conn.clone()));
        let user = (args.mode == Mode::Uid).then(|| format!("u{}", i / args.devices.max(1)));
        receivers.push(tokio::spawn(receive(c, i, user, stats.clone(), planned.max(1))));
    }
    (ids, failures.load(Relaxed), receivers)
}
