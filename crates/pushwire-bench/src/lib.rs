//! `pushwire-bench` (also run as `pushwire bench`): a load tool for any system with the seed's API (pushwire, or the PHP
//! original): WebSocket clients on gateways, publishes through publishers over HTTP.
//!
//! Modes: `broadcast` (a fixed rate, or as fast as delivery keeps up), `targeted` (a random client
//! each time, several requests in flight), `uid` (clients are users with `--devices` connections
//! each, identified by tokens signed with `--token-secret`; each push goes `to_uid` a random user)
//! and `idle` (hold connections, measure server RSS). It
//! measures deliveries/s, latency percentiles (HDR histogram), fan-out completion time, missing,
//! duplicate and misdelivered messages, connect rate, and RSS per connection of given pids.
//!
//! Receiving is kept cheap because the tool shares the machine with the server: a minimal
//! WebSocket client, a bitset per connection for duplicates, latencies batched into a few sharded
//! histograms. Each push carries `SEQ:SENT_US:TARGET` padded to `--size` bytes.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use bytes::{Buf, BytesMut};
use hdrhistogram::Histogram;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpSocket, TcpStream};
use tokio_rustls::TlsConnector;

mod client;
mod fleet;
mod publish;
mod recovery;
mod report;

use client::*;
use publish::*;

/// What to measure.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Mode {
    Broadcast,
    Targeted,
    Uid,
    Idle,
    /// Pusher client events: `--inflight` sender connections send `client-e` on
    /// `private-bench`, which every client subscribes to.
    ClientEvents,
}

/// The protocol the clients and publishes speak.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Protocol {
    /// The seed's: welcome line, `GET /?content=` and `to_worker_id`/`to_connection_id`.
    Native,
    /// Pusher Channels: clients on `/app/KEY` subscribed to `bench` (broadcast, idle) or to a
    /// channel of their own, `c-I` (targeted); events by signed `POST /apps/ID/events`.
    Pusher,
}

/// Settings of one run.
#[derive(Debug, Clone, clap::Args)]
pub struct BenchArgs {
    /// broadcast, targeted, uid, idle or client-events (Pusher).
    #[arg(long, value_enum, default_value = "broadcast")]
    pub mode: Mode,
    /// native or pusher (broadcast, targeted, idle and client-events; needs --app).
    #[arg(long, value_enum, default_value = "native")]
    pub protocol: Protocol,
    /// The Pusher app, ID:KEY:SECRET.
    #[arg(long, env = "PUSHWIRE_APP", hide_env_values = true)]
    pub app: Option<String>,
    /// Gateway addresses (HOST:PORT or ws://HOST:PORT), clients spread over them.
    #[arg(long, value_delimiter = ',', default_value = "127.0.0.1:4236")]
    pub gateway: Vec<String>,
    /// Publisher addresses (HOST:PORT or http://HOST:PORT), publishes spread over them.
    #[arg(long, value_delimiter = ',', default_value = "127.0.0.1:4237")]
    pub publisher: Vec<String>,
    /// WebSocket clients.
    #[arg(long, default_value_t = 1000)]
    pub clients: usize,
    /// Local source addresses 127.0.0.1..127.0.0.N for client sockets (about 28k ports each).
    #[arg(long, default_value_t = 4)]
    pub source_ips: u8,
    /// Publishes per second, fractions allowed (0.2: one every 5 s; 0: as fast as delivery keeps
    /// up; broadcast and targeted).
    #[arg(long, default_value_t = 0.0)]
    pub rate: f64,
    /// How long to publish (or, in idle mode, to hold the connections).
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub duration: Duration,
    /// Bytes of content per push.
    #[arg(long, default_value_t = 64)]
    pub size: usize,
    /// Publish requests in flight.
    #[arg(long, default_value_t = 8)]
    pub inflight: usize,
    /// Publish key (sent as key=KEY).
    #[arg(long, env = "PUSHWIRE_PUBLISH_KEY", hide_env_values = true)]
    pub key: Option<String>,
    /// Server processes whose RSS to report per connection (repeatable): the gateways, which the
    /// clients are spread over evenly; measured once every client is connected.
    #[arg(long)]
    pub pid: Vec<u32>,
    /// Write the results as JSON here.
    #[arg(long)]
    pub json: Option<std::path::PathBuf>,
    /// Connections opened at once while connecting.
    #[arg(long, default_value_t = 200)]
    pub connect_concurrency: usize,
    /// uid mode: connections per user (client i is user i / devices).
    #[arg(long, default_value_t = 3)]
    pub devices: usize,
    /// uid mode: the gateways' --token-secret (HS256), to sign each user's token.
    #[arg(long, env = "PUSHWIRE_TOKEN_SECRET", hide_env_values = true)]
    pub token_secret: Option<String>,
    /// Offer permessage-deflate and inflate compressed frames (the gateway needs --compression).
    #[arg(long)]
    pub compression: bool,
    /// What pads each push to --size: x (one repeated byte) or json (JSON records, which compress
    /// like real application data).
    #[arg(long, value_enum, default_value = "x")]
    pub payload: Payload,
    /// PEM file of the certificate authority to trust for wss:// gateways and https:// publishers.
    #[arg(long)]
    pub ca: Option<std::path::PathBuf>,
    /// Processes holding the clients (a process may open only so many sockets); this one
    /// publishes and reports for all.
    #[arg(long, default_value_t = 1)]
    pub processes: usize,
    /// Clients that connect halfway through the run and recover the broadcasts they missed
    /// (JSON clients with `recover=`); their time to the `recovered` notice is reported apart.
    #[arg(long, default_value_t = 0)]
    pub recoverers: usize,
    /// Broadcasts published before the clients connect, for the recoverers to recover.
    #[arg(long, default_value_t = 1000)]
    pub backlog: usize,
    /// Internal: run as child K of --processes (connect a share of the clients, report on stdout).
    #[arg(long, hide = true)]
    pub child: Option<usize>,
}

/// Padding of a push.
#[derive(Debug, Clone, Copy, PartialEq, clap::ValueEnum)]
pub enum Payload {
    X,
    Json,
}

/// The connection URL path of client `i`: with a token naming its user in uid mode, the app's
/// for Pusher.
fn client_path(args: &BenchArgs, i: usize) -> anyhow::Result<String> {
    if args.protocol == Protocol::Pusher {
        let app = PusherApp::parse(args.app.as_deref().context("--protocol pusher needs --app")?)?;
        return Ok(format!("/app/{}?protocol=7&client=pushwire-bench&version=1.0", app.key));
    }
    if args.mode != Mode::Uid {
        return Ok("/".into());
    }
    let secret = args.token_secret.as_deref().context("--mode uid needs --token-secret")?;
    let claims = serde_json::json!({"sub": format!("u{}", i / args.devices.max(1))});
    let key = jsonwebtoken::EncodingKey::from_secret(secret.as_bytes());
    Ok(format!("/?token={}", jsonwebtoken::encode(&jsonwebtoken::Header::default(), &claims, &key)?))
}

const SHARDS: usize = 16;
/// Broadcasts may be ahead of the slowest delivery by this many before the publisher waits.
const WINDOW: u64 = 64;
/// After the last publish, how long without any delivery before what has not arrived counts as
/// missing.
const DRAIN_QUIET: Duration = Duration::from_secs(3);

struct Stats {
    deliveries: AtomicU64,
    /// Bytes read from the gateways' sockets after the welcome: what the pushes cost on the wire.
    wire_bytes: AtomicU64,
    broadcasts_seen: AtomicU64,
    duplicates: AtomicU64,
    misdelivered: AtomicU64,
    targeted_received: AtomicU64,
    hist: Vec<Mutex<Histogram<u64>>>,
    /// Per broadcast: when it was sent and its latest arrival (µs since the Unix epoch: load-tool
    /// processes on one machine compare them).
    sent_at: Vec<AtomicU64>,
    last_arrival: Vec<AtomicU64>,
    first_send: AtomicU64,
    last_receive: AtomicU64,
}

impl Stats {
    fn new(planned: usize) -> Stats {
        Stats {
            deliveries: AtomicU64::new(0),
            wire_bytes: AtomicU64::new(0),
            broadcasts_seen: AtomicU64::new(0),
            duplicates: AtomicU64::new(0),
            misdelivered: AtomicU64::new(0),
            targeted_received: AtomicU64::new(0),
            hist: (0..SHARDS).map(|_| Mutex::new(histogram())).collect(),
            sent_at: (0..planned).map(|_| AtomicU64::new(0)).collect(),
            last_arrival: (0..planned).map(|_| AtomicU64::new(0)).collect(),
            first_send: AtomicU64::new(u64::MAX),
            last_receive: AtomicU64::new(0),
        }
    }

    /// Microseconds since the Unix epoch: the same clock in every load-tool process.
    fn now_us(&self) -> u64 {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_micros() as u64)
    }

    /// The pushes this process's clients should have had: `published` publishes, `connected`
    /// clients.
    fn received_ok(&self, mode: Mode) -> u64 {
        match mode {
            Mode::Broadcast | Mode::ClientEvents => self.broadcasts_seen.load(Relaxed),
            _ => self.targeted_received.load(Relaxed),
        }
    }

    /// Wait until `expected` pushes arrived, or nothing arrived for [`DRAIN_QUIET`].
    async fn drain(&self, mode: Mode, expected: u64) {
        let (mut last, mut since) = (u64::MAX, Instant::now());
        while mode != Mode::Idle && self.received_ok(mode) < expected {
            let now = self.deliveries.load(Relaxed);
            if now != last {
                (last, since) = (now, Instant::now());
            } else if since.elapsed() >= DRAIN_QUIET {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// All latencies recorded, in one histogram.
    fn latencies(&self) -> Histogram<u64> {
        let mut hist = histogram();
        for h in &self.hist {
            if let Ok(h) = h.lock() {
                let _ = hist.add(&*h);
            }
        }
        hist
    }
}

fn histogram() -> Histogram<u64> {
    // 1 µs to 100 s, 3 significant digits.
    Histogram::new_with_bounds(1, 100_000_000, 3)
        .unwrap_or_else(|_| Histogram::new(3).unwrap_or_else(|_| unreachable!()))
}
/// The pushes `clients` clients should get from `published` publishes: every broadcast each; a
/// targeted push once, a uid push once per connection of the user (counted over all clients).
fn expected(args: &BenchArgs, published: u64, clients: u64) -> u64 {
    match args.mode {
        Mode::Broadcast | Mode::ClientEvents => published * clients,
        Mode::Targeted => published,
        // Every connection of the user; the last user may have fewer.
        Mode::Uid => published * args.devices.max(1) as u64,
        Mode::Idle => 0,
    }
}

/// Resident memory of process `pid`, in kB (0 when it cannot be read).
pub fn rss_kb(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// The Pusher channel client `i` subscribes to.
fn pusher_channel(mode: Mode, i: usize) -> String {
    match mode {
        Mode::Targeted => format!("c-{i}"),
        Mode::ClientEvents => CLIENT_EVENTS_CHANNEL.into(),
        _ => "bench".into(),
    }
}

/// CPU time process `pid` has used (user and system), in ms (0 when it cannot be read). The
/// kernel counts it in ticks of 1/100 s (USER_HZ) on Linux.
pub fn cpu_ms(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may hold spaces): state is the 3rd, utime the 14th.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let fields: Vec<u64> = rest.split_whitespace().skip(11).take(2).filter_map(|f| f.parse().ok()).collect();
    fields.iter().sum::<u64>() as f64 * 10.0
}

/// Run a benchmark and print (and optionally write) its results.
pub async fn run(args: BenchArgs) -> anyhow::Result<()> {
    let pusher = match args.protocol {
        Protocol::Native if args.mode == Mode::ClientEvents => bail!("--mode client-events needs --protocol pusher"),
        Protocol::Native => None,
        Protocol::Pusher if args.mode == Mode::Uid || args.recoverers > 0 => {
            bail!("--protocol pusher runs broadcast, targeted, idle and client-events, without recoverers")
        }
        Protocol::Pusher => Some(PusherApp::parse(args.app.as_deref().context("--protocol pusher needs --app")?)?),
    };
    let (gateways, gateway_tls): (Vec<String>, Vec<bool>) = args.gateway.iter().map(|g| host_port(g)).unzip();
    let (publishers, publisher_tls): (Vec<String>, Vec<bool>) = args.publisher.iter().map(|p| host_port(p)).unzip();
    let tls = match &args.ca {
        Some(ca) => Some(tls_client(ca)?),
        None if gateway_tls.contains(&true) || publisher_tls.contains(&true) => bail!("wss:// and https:// need --ca"),
        None => None,
    };
    let gateway_tls = gateway_tls.contains(&true).then(|| tls.clone()).flatten();
    let publisher_tls = publisher_tls.contains(&true).then(|| tls.clone()).flatten();
    if gateways.is_empty() || publishers.is_empty() || args.clients == 0 {
        bail!("need at least one gateway, one publisher and one client");
    }
    let planned = match args.mode {
        Mode::Broadcast | Mode::ClientEvents if args.rate <= 0.0 => 1_000_000,
        Mode::Broadcast | Mode::ClientEvents => (args.rate * args.duration.as_secs_f64()).ceil() as usize,
        _ => 0,
    };
    let stats = Arc::new(Stats::new(planned));
    let rss_before: Vec<(u32, u64)> = args.pid.iter().map(|p| (*p, rss_kb(*p))).collect();

    // Connect: this process's share of the clients, the others' in child processes.
    let processes = args.processes.clamp(1, args.clients);
    let mine = fleet::share(args.clients, processes, args.child.unwrap_or(0));
    let connect = connect_clients(&args, mine, &gateways, gateway_tls.as_ref(), &stats, planned);
    if args.child.is_some() {
        return fleet::child(args.mode, &stats, connect).await;
    }
    let key = args.key.as_deref().map(|k| format!("&key={k}")).unwrap_or_default();
    let since = match args.recoverers {
        0 => None,
        _ => {
            eprintln!("publishing a backlog of {} broadcasts for {} recoverers", args.backlog, args.recoverers);
            Some(recovery::backlog(&publishers[0], publisher_tls.as_ref(), &key, args.backlog).await?)
        }
    };
    eprintln!("connecting {} clients to {} from {processes} process(es)", args.clients, gateways.join(", "));
    let started = Instant::now();
    let mut helpers = fleet::spawn(processes)?;
    let (conns, failed, receivers) = connect.await;
    let mut ids: Vec<Option<(String, String)>> = vec![None; args.clients];
    let local = conns.len();
    for (i, worker, conn) in conns {
        ids[i] = Some((worker, conn));
    }
    for h in &mut helpers {
        h.connected(&mut ids).await?;
    }
    let connect_secs = started.elapsed().as_secs_f64();
    let connected = local + helpers.iter().map(|h| h.connected as usize).sum::<usize>();
    let failed = failed + helpers.iter().map(|h| h.failed).sum::<u64>();
    eprintln!(
        "connected {connected}/{} in {connect_secs:.2}s ({:.0}/s), {failed} failed",
        args.clients,
        connected as f64 / connect_secs,
    );
    if local == 0 {
        bail!("no client connected");
    }
    let ids = Arc::new(ids);

    // Server memory with every client connected (idle mode: after holding them).
    let mut rss_held: Vec<(u32, u64)> = args.pid.iter().map(|p| (*p, rss_kb(*p))).collect();
    let published = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let pub_hist = Arc::new(Mutex::new(histogram()));
    let publish_started = Instant::now();
    let cpu_before: f64 = args.pid.iter().map(|p| cpu_ms(*p)).sum();
    // Progress on stderr.
    let progress = {
        let (stats, published) = (stats.clone(), published.clone());
        tokio::spawn(async move {
            let mut last = 0;
            loop {
                tokio::time::sleep(Duration::from_secs(1)).await;
                let d = stats.deliveries.load(Relaxed);
                eprintln!("  published {:>8}  delivered {:>10}  ({:>8}/s)", published.load(Relaxed), d, d - last);
                last = d;
            }
        })
    };
    // Halfway through, the recoverers come back all at once.
    let recovering = since.map(|since| {
        let (gateways, tls, n, ips) = (gateways.clone(), gateway_tls.clone(), args.recoverers, args.source_ips.max(1));
        let half = args.duration / 2;
        tokio::spawn(async move {
            tokio::time::sleep(half).await;
            let tasks: Vec<_> = (0..n)
                .map(|i| {
                    let (g, tls, since) = (gateways[i % gateways.len()].clone(), tls.clone(), since.clone());
                    let source = 1 + (i % ips as usize) as u8;
                    tokio::spawn(async move { recovery::recover(&g, tls.as_ref(), &since, source).await })
                })
                .collect();
            let mut out = Vec::with_capacity(n);
            for t in tasks {
                out.push(t.await.map_err(anyhow::Error::from).and_then(|r| r));
            }
            out
        })
    });
    match args.mode {
        Mode::Idle => {
            tokio::time::sleep(args.duration).await;
            rss_held = args.pid.iter().map(|p| (*p, rss_kb(*p))).collect();
        }
        Mode::Broadcast | Mode::Targeted | Mode::Uid | Mode::ClientEvents => {
            // Publishers run on their own thread and runtime, so that thousands of receivers
            // waking at once never delay a publish (or its timestamp).
            let (stats, published, errors, pub_hist, ids, key, publishers, args) = (
                stats.clone(),
                published.clone(),
                errors.clone(),
                pub_hist.clone(),
                ids.clone(),
                key.clone(),
                publishers.clone(),
                args.clone(),
            );
            let (publisher_tls, pusher) = (publisher_tls.clone(), pusher.clone());
            let (gateways, gateway_tls) = (gateways.clone(), gateway_tls.clone());
            let thread = std::thread::spawn(move || -> anyhow::Result<()> {
                let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
                rt.block_on(async move {
                    let seq = Arc::new(AtomicU64::new(0));
                    let deadline = Instant::now() + args.duration;
                    let interval = (args.rate > 0.0).then(|| Duration::from_secs_f64(args.inflight as f64 / args.rate));
                    let mut pubs = Vec::new();
                    for w in 0..args.inflight.max(1) {
                        let host = publishers[w % publishers.len()].clone();
                        let (stats, seq, published, errors, pub_hist, ids, key) = (
                            stats.clone(),
                            seq.clone(),
                            published.clone(),
                            errors.clone(),
                            pub_hist.clone(),
                            ids.clone(),
                            key.clone(),
                        );
                        let (mode, size, payload, planned) = (args.mode, args.size, args.payload, planned as u64);
                        let tls = publisher_tls.clone();
                        let users = args.clients.div_ceil(args.devices.max(1)) as u64;
                        let pusher = pusher.clone();
                        let (gateway, gateway_tls) = (gateways[w % gateways.len()].clone(), gateway_tls.clone());
                        pubs.push(tokio::spawn(async move {
                            let mut http = Http::open(&host, tls.as_ref()).await?;
                            let mut sender = match (mode, &pusher) {
                                (Mode::ClientEvents, Some(app)) => {
                                    Some(Sender::open(&gateway, gateway_tls.as_ref(), app).await?)
                                }
                                _ => None,
                            };
                            // The publishers' ticks are spread over the interval, so that a
                            // rate means evenly spaced publishes, not bursts of --inflight.
                            let inflight = args.inflight.max(1) as u32;
                            let mut tick = interval.map(|i| {
                                let first = tokio::time::Instant::now() + i * w as u32 / inflight;
                                let mut t = tokio::time::interval_at(first, i);
                                t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
                                t
                            });
                            let mut rng = (w as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15);
                            while Instant::now() < deadline {
                                if let Some(t) = tick.as_mut() {
                                    t.tick().await;
                                }
                                let target = match mode {
                                    Mode::Broadcast | Mode::ClientEvents => {
                                        let s = seq.fetch_add(1, Relaxed);
                                        if s >= planned {
                                            break;
                                        }
                                        // Closed loop at max rate: stay within WINDOW broadcasts of delivery.
                                        while tick.is_none()
                                            && s > WINDOW
                                            && stats.broadcasts_seen.load(Relaxed)
                                                < (s - WINDOW) * local as u64 * 9 / 10
                                            && Instant::now() < deadline
                                        {
                                            tokio::time::sleep(Duration::from_micros(200)).await;
                                        }
                                        let now = stats.now_us();
                                        if let Some(t) = stats.sent_at.get(s as usize) {
                                            t.store(now, Relaxed);
                                        }
                                        let c = content(s, now, "b", size, payload);
                                        match &pusher {
                                            _ if mode == Mode::ClientEvents => Target::Client(client_event(&c)),
                                            Some(app) => Target::Pusher(app.event("bench", &c, now / 1_000_000)),
                                            None => Target::Get(format!("content={}", form(&c))),
                                        }
                                    }
                                    Mode::Uid => {
                                        rng ^= rng << 13;
                                        rng ^= rng >> 7;
                                        rng ^= rng << 17;
                                        let u = format!("u{}", rng % users);
                                        let s = seq.fetch_add(1, Relaxed);
                                        let c = form(&content(s, stats.now_us(), &u, size, payload));
                                        Target::Get(format!("to_uid={u}&content={c}"))
                                    }
                                    _ => {
                                        rng ^= rng << 13;
                                        rng ^= rng >> 7;
                                        rng ^= rng << 17;
                                        let i = (rng % ids.len() as u64) as usize;
                                        let Some((worker, conn)) = &ids[i] else { continue };
                                        let s = seq.fetch_add(1, Relaxed);
                                        let now = stats.now_us();
                                        let c = content(s, now, &i.to_string(), size, payload);
                                        match &pusher {
                                            Some(app) => {
                                                Target::Pusher(app.event(&pusher_channel(mode, i), &c, now / 1_000_000))
                                            }
                                            None => Target::Get(format!(
                                                "to_worker_id={worker}&to_connection_id={conn}&content={}",
                                                form(&c)
                                            )),
                                        }
                                    }
                                };
                                let t0 = stats.now_us();
                                stats.first_send.fetch_min(t0, Relaxed);
                                let answer = match &target {
                                    Target::Get(query) => http.get(&format!("/?{query}{key}")).await,
                                    Target::Pusher((path, body)) => http.post(path, body).await,
                                    Target::Client(json) => match sender.as_mut() {
                                        Some(s) => s.send(json).await.map(|()| 200),
                                        None => Ok(0),
                                    },
                                };
                                match answer {
                                    Ok(200) => {
                                        published.fetch_add(1, Relaxed);
                                        if let Ok(mut h) = pub_hist.lock() {
                                            let _ = h.record((stats.now_us() - t0).max(1));
                                        }
                                    }
                                    Ok(status) => {
                                        if errors.fetch_add(1, Relaxed) < 3 {
                                            eprintln!("publisher {host}: answered {status}");
                                        }
                                    }
                                    Err(e) => {
                                        if errors.fetch_add(1, Relaxed) < 3 {
                                            eprintln!("publisher {host}: {e:#}; reconnecting");
                                        }
                                        http = Http::open(&host, tls.as_ref()).await?;
                                    }
                                }
                            }
                            anyhow::Ok(())
                        }));
                    }
                    for p in pubs {
                        p.await??;
                    }
                    anyhow::Ok(())
                })
            });
            tokio::task::spawn_blocking(move || thread.join())
                .await?
                .map_err(|_| anyhow::anyhow!("publisher thread panicked"))??;
        }
    }
    let publish_secs = publish_started.elapsed().as_secs_f64();
    // Let deliveries drain: stop once every expected push arrived, or nothing arrived for
    // DRAIN_QUIET (a backlog of broadcasts can take seconds to reach the last clients). With
    // several processes, each waits for its own clients' share (targeted: until quiet).
    let (n, alone) = (published.load(Relaxed), helpers.is_empty());
    // A process's share of a targeted run is unknown to it: it waits until quiet.
    let share = |clients: u64| match args.mode {
        Mode::Targeted | Mode::Uid if !alone => u64::MAX,
        _ => expected(&args, n, clients),
    };
    let finishing: Vec<_> = helpers
        .into_iter()
        .map(|h| {
            let (e, stats) = (share(h.connected), stats.clone());
            tokio::spawn(async move { h.finish(e, &stats).await })
        })
        .collect();
    stats.drain(args.mode, share(local as u64)).await;
    let cpu_used = args.pid.iter().map(|p| cpu_ms(*p)).sum::<f64>() - cpu_before;
    for f in finishing {
        f.await??;
    }
    progress.abort();
    for r in &receivers {
        r.abort();
    }
    for r in receivers {
        let _ = r.await;
    }

    let recovery = match recovering {
        None => None,
        Some(task) => {
            let (mut times, mut messages, mut failed) = (histogram(), Vec::new(), 0);
            for r in task.await? {
                match r {
                    Ok((took, n)) => {
                        let _ = times.record((took.as_micros() as u64).max(1));
                        messages.push(n);
                    }
                    Err(e) => {
                        if failed == 0 {
                            eprintln!("recoverer: {e:#}");
                        }
                        failed += 1;
                    }
                }
            }
            messages.sort_unstable();
            Some((times, messages.get(messages.len() / 2).copied().unwrap_or(0), failed))
        }
    };
    let hist = stats.latencies();
    let published = published.load(Relaxed);
    let deliveries = stats.deliveries.load(Relaxed);
    let span_us = stats.last_receive.load(Relaxed).saturating_sub(stats.first_send.load(Relaxed)).max(1);
    let expected = expected(&args, published, connected as u64);
    let received_ok = stats.received_ok(args.mode);
    // Fan-out completion: from a broadcast's send to its arrival at the last client.
    let mut fanout = histogram();
    for (sent, last) in stats.sent_at.iter().zip(&stats.last_arrival) {
        let (sent, last) = (sent.load(Relaxed), last.load(Relaxed));
        if sent > 0 && last > 0 {
            let _ = fanout.record(last.saturating_sub(sent).max(1));
        }
    }
    let pub_hist = pub_hist.lock().map(|h| h.clone()).unwrap_or_else(|_| histogram());
    // p50, p90, p99, p99.9 and max, in ms.
    let pcts = |h: &Histogram<u64>| {
        let ms = |us: u64| us as f64 / 1000.0;
        let q = |p: f64| ms(h.value_at_quantile(p));
        [q(0.5), q(0.9), q(0.99), q(0.999), ms(h.max())]
    };
    let rss: Vec<report::Rss> = rss_before
        .iter()
        .zip(&rss_held)
        .map(|((pid, before), (_, after))| report::Rss {
            pid: *pid,
            before_kb: *before,
            after_kb: *after,
            // Clients are spread evenly over the gateways, each given with --pid.
            per_connection_kb: (*after as f64 - *before as f64) / (connected as f64 / args.pid.len() as f64),
        })
        .collect();
    let summary = report::Summary {
        mode: format!("{:?}", args.mode).to_lowercase(),
        clients: connected,
        connect_per_s: connected as f64 / connect_secs,
        published,
        publish_errors: errors.load(Relaxed),
        publish_per_s: published as f64 / publish_secs,
        deliveries,
        deliveries_per_s: deliveries as f64 / (span_us as f64 / 1e6),
        wire_bytes_per_delivery: stats.wire_bytes.load(Relaxed) as f64 / deliveries.max(1) as f64,
        missing: expected.saturating_sub(received_ok),
        duplicates: stats.duplicates.load(Relaxed),
        misdelivered: stats.misdelivered.load(Relaxed),
        latency_ms: pcts(&hist),
        publish_latency_ms: pcts(&pub_hist),
        fanout_ms: pcts(&fanout),
        rss,
        cpu_ms: cpu_used,
        cpu_us_per_delivery: cpu_used * 1000.0 / deliveries.max(1) as f64,
        recovery: recovery.map(|(times, messages, failed)| report::Recovery {
            clients: times.len() + failed,
            failed,
            messages,
            ms: pcts(&times),
        }),
    };
    println!("{}", summary.human());
    if let Some(path) = &args.json {
        std::fs::write(path, summary.json()).with_context(|| format!("writing {}", path.display()))?;
        eprintln!("results written to {}", path.display());
    }
    Ok(())
}
