//! Command-line interface: one typed configuration per role, read from flags and environment
//! variables, checked once before anything starts (a wrong value stops the program with a clear
//! message).
//!
//! **Protected by default.** A listener that can change what clients receive (the publisher, the
//! channel server) and that is reachable beyond loopback must be authenticated (`--publish-key`,
//! `--secret`), or the operator must pass `--insecure`; otherwise the process refuses to start.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context as _};
use clap::{Args, Parser, Subcommand};
use tokio::net::TcpListener;

use crate::broker::{self, BrokerUrl, LinkConfig};
use crate::channel_server::{self, ChannelConfig};
use crate::gateway::{Gateway, GatewayConfig};
use crate::history::HistoryConfig;
use crate::hub::{Hub, HubLimits};
use crate::io::{ListenAddr, Listener};
use crate::publisher::{Publisher, PublisherConfig};

/// Distributed WebSocket push, compatible with Workerman's Channel.
#[derive(Debug, Parser)]
#[command(name = "pushwire", version)]
pub struct Cli {
    /// Log filter (tracing syntax): error, warn, info, debug, or per module.
    #[arg(long, global = true, env = "RUST_LOG", default_value = "info")]
    pub log_level: String,
    /// Settings file (TOML): `[channel]`, `[gateway]`, `[publisher]` and `[standalone]` tables of
    /// `flag-name = value`. Environment variables and flags override it.
    #[arg(long, global = true, env = "PUSHWIRE_CONFIG")]
    pub config: Option<std::path::PathBuf>,
    /// Runtime threads [default: one per core]. Several processes on one machine (gateways of
    /// 20,000 connections each where a process may open only so many files) do better with
    /// cores / processes each.
    #[arg(long, global = true, env = "PUSHWIRE_THREADS")]
    pub threads: Option<std::num::NonZeroUsize>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the Channel server, the publish/subscribe hub (the seed's start_channel.php).
    Channel(ChannelArgs),
    /// Run a WebSocket gateway node (the seed's start_ws.php).
    Gateway(GatewayArgs),
    /// Run an HTTP publisher node (the seed's start_http.php).
    Publisher(PublisherArgs),
    /// Run channel server, gateway and publisher in one process, wired in-process.
    Standalone(StandaloneArgs),
    /// Load-test a running system with the seed's API: runs the `pushwire-bench` binary next to
    /// this one with the same arguments (`pushwire bench --help` lists them).
    Bench {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<std::ffi::OsString>,
    },
    /// List the live gateways (node, workers, connections, users, topics, rates) as a publisher
    /// sees them.
    Status {
        /// The publisher to ask.
        #[arg(long, default_value = "http://127.0.0.1:4237")]
        publisher: hyper::Uri,
        /// The publisher's --publish-key, if it has one.
        #[arg(long, env = "PUSHWIRE_PUBLISH_KEY", hide_env_values = true)]
        publish_key: Option<String>,
    },
    /// Check a settings file and print the effective settings of each command (secrets masked).
    CheckConfig {
        /// The TOML file.
        file: std::path::PathBuf,
    },
}

/// How much history the node's store keeps: the channel server (and standalone) in memory, a
/// publisher on Redis and NATS JetStream.
#[derive(Debug, Args)]
pub struct HistoryOpts {
    /// Messages kept per channel (broadcast, users, topics) for recovery; 0 keeps none.
    #[arg(long, default_value_t = HistoryConfig::default().size)]
    pub history_size: usize,
    /// How long a message is kept for recovery.
    #[arg(long, default_value = "5m", value_parser = parse_duration)]
    pub history_ttl: Duration,
    /// Bytes of history kept in memory by a channel server, all channels together; the oldest
    /// messages go first.
    #[arg(long, default_value_t = HistoryConfig::default().max_bytes)]
    pub history_max_bytes: usize,
    /// Copies of the history stream on a NATS cluster (JetStream replicas, 1 to 5): 3 keeps
    /// history and publishes going through the loss of one node.
    #[arg(long, default_value_t = 1, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=5))]
    pub history_replicas: usize,
}

impl HistoryOpts {
    fn config(&self) -> HistoryConfig {
        HistoryConfig {
            size: self.history_size,
            ttl: self.history_ttl,
            max_bytes: self.history_max_bytes,
            replicas: self.history_replicas,
        }
    }
}

#[derive(Debug, Args)]
pub struct ChannelArgs {
    /// Address to listen on: HOST:PORT, or unix:/path for a Unix socket.
    #[arg(long, default_value = "0.0.0.0:2206")]
    pub listen: ListenAddr,
    /// Serve /metrics and /healthz on this HTTP address.
    #[arg(long)]
    pub metrics_listen: Option<String>,
    #[command(flatten)]
    pub insecure: Insecure,
    #[command(flatten)]
    pub opts: ChannelOpts,
    #[command(flatten)]
    pub history: HistoryOpts,
}

#[derive(Debug, Args)]
pub struct ChannelOpts {
    /// Largest channel frame accepted, in bytes (header included).
    #[arg(long, default_value_t = channel_proto::DEFAULT_MAX_FRAME)]
    pub max_frame: usize,
    /// Secret that channel clients must send first; nodes pass it as channel://:SECRET@HOST:PORT.
    /// PHP Channel clients cannot send it: run those only with --insecure on a trusted network.
    #[arg(long, env = "PUSHWIRE_CHANNEL_SECRET", hide_env_values = true)]
    pub secret: Option<String>,
    /// Channels plus queues one channel client may hold.
    #[arg(long, default_value_t = HubLimits::default().max_names_per_client)]
    pub max_channels_per_client: usize,
    /// Longest channel or queue name, in bytes.
    #[arg(long, default_value_t = HubLimits::default().max_name_len)]
    pub max_name_len: usize,
    /// After start, hold publishes this long so that nodes reconnecting after a restart have
    /// resubscribed before any publish is confirmed (0s: route at once).
    #[arg(long, default_value = "3s", value_parser = parse_duration_or_zero)]
    pub settle: Duration,
    /// Most authenticated channel clients (connections) at once.
    #[arg(long, default_value_t = ChannelConfig::default().max_connections)]
    pub max_clients: usize,
    /// With --secret: most connections that have not authenticated yet (kept apart from
    /// --max-clients, so that strangers cannot lock nodes out).
    #[arg(long, default_value_t = ChannelConfig::default().max_unauthenticated)]
    pub max_unauthenticated: usize,
    /// With --secret: how long a new connection has to send its secret.
    #[arg(long, default_value = "3s", value_parser = parse_duration)]
    pub auth_timeout: Duration,
}

/// How a node reaches the broker.
#[derive(Debug, Args)]
pub struct BrokerOpts {
    /// Broker: channel://[:SECRET@]HOST:PORT (or HOST:PORT), channel+unix:///path,
    /// redis://[[USER]:PASS@]HOST:PORT[/DB] (rediss:// for TLS), redis-cluster://HOST:PORT[,HOST:PORT...],
    /// redis-sentinel://HOST:PORT?sentinelServiceName=NAME, nats://[USER:PASS@|TOKEN@]HOST:PORT[,HOST:PORT...]
    /// (tls:// for TLS), memory.
    #[arg(long, default_value = "channel://127.0.0.1:2206")]
    pub broker: BrokerUrl,
    /// Prefix before channel names on the broker, so clusters can share one broker
    /// [default: none on channel://, "pushwire." on Redis and NATS].
    #[arg(long)]
    pub broker_prefix: Option<String>,
    /// PEM file of the certificate authorities to trust for TLS to the broker (rediss://, tls://)
    /// instead of the system's.
    #[arg(long)]
    pub broker_ca: Option<std::path::PathBuf>,
    /// NATS credentials file (user JWT and nkey seed).
    #[arg(long)]
    pub nats_creds: Option<std::path::PathBuf>,
    /// File holding a NATS user nkey seed (SU...), for servers that authenticate users by nkey.
    #[arg(long)]
    pub nats_nkey: Option<std::path::PathBuf>,
}

impl BrokerOpts {
    /// Open the broker for a gateway (`gateway`) or a publisher whose publishes keep `history`.
    async fn open(&self, history: HistoryConfig, gateway: bool) -> anyhow::Result<Arc<dyn broker::Broker>> {
        let opts = broker::BrokerOptions {
            gateway,
            prefix: self.broker_prefix.clone(),
            ca: self.broker_ca.clone(),
            nats_creds: self.nats_creds.clone(),
            nats_nkey: self.nats_nkey.clone(),
            history,
        };
        Ok(broker::open(&self.broker, &opts, LinkConfig::default()).await?)
    }
}

#[derive(Debug, Args)]
pub struct GatewayArgs {
    /// Address to listen on.
    #[arg(long, default_value = "0.0.0.0:4236")]
    pub listen: String,
    /// wss:// and https:// (the page, event streams).
    #[command(flatten)]
    pub tls: TlsOpts,
    #[command(flatten)]
    pub broker: BrokerOpts,
    #[command(flatten)]
    pub opts: GatewayOpts,
}

#[derive(Debug, Args)]
pub struct GatewayOpts {
    /// Worker shards (the seed's count).
    #[arg(long, default_value_t = 2)]
    pub workers: usize,
    /// Node id used in worker ids (NODE-N); random by default, unique per process.
    #[arg(long)]
    pub node_id: Option<String>,
    /// Most WebSocket connections at once; more are answered 503.
    #[arg(long, default_value_t = GatewayConfig::default().max_connections)]
    pub max_connections: usize,
    /// Most sockets at once still in their HTTP stage (handshakes, /healthz); more are answered 503.
    #[arg(long, default_value_t = GatewayConfig::default().max_handshakes)]
    pub max_handshakes: usize,
    /// Browser origins allowed to connect (comma-separated, e.g. https://example.com); all when empty.
    #[arg(long, value_delimiter = ',')]
    pub allowed_origins: Vec<String>,
    /// Largest frame a client may send, in bytes; larger ones close the connection (1009).
    #[arg(long, default_value_t = GatewayConfig::default().max_client_frame)]
    pub max_client_frame: usize,
    /// Messages queued for one client before it is cut off as a slow consumer (1008).
    #[arg(long, default_value_t = GatewayConfig::default().outbound_queue)]
    pub outbound_queue: usize,
    /// Bytes queued for one client before it is cut off as a slow consumer (1008).
    #[arg(long, default_value_t = GatewayConfig::default().outbound_queue_bytes)]
    pub outbound_queue_bytes: usize,
    /// Ping interval (e.g. 25s, 500ms); a client silent for three intervals is closed.
    #[arg(long, default_value = "25s", value_parser = parse_duration)]
    pub heartbeat: Duration,
    /// Secret of HS256 connection tokens (?token=JWT: sub = user id, channels = topics).
    #[arg(long, env = "PUSHWIRE_TOKEN_SECRET", hide_env_values = true, conflicts_with = "token_public_key")]
    pub token_secret: Option<String>,
    /// PEM public key (RSA or P-256) of RS256 / ES256 connection tokens.
    #[arg(long)]
    pub token_public_key: Option<std::path::PathBuf>,
    /// Refuse connections without a valid token (401).
    #[arg(long)]
    pub require_token: bool,
    /// Longest token lifetime accepted (e.g. 1h): tokens must then have `exp`, at most this far
    /// ahead. Unset, a token without `exp` never expires.
    #[arg(long, value_parser = parse_duration)]
    pub token_max_age: Option<Duration>,
    /// Presence lease: a heartbeat goes out every third of it; a gateway silent for a whole lease
    /// (killed, cut off) drops out of every count.
    #[arg(long, default_value = "15s", value_parser = parse_duration)]
    pub presence_lease: Duration,
    /// Messages buffered between the broker and each worker; past it they are dropped (counted,
    /// and repaired from history where the channel keeps one).
    #[arg(long, default_value_t = crate::broker::SUBSCRIPTION_CAPACITY, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=1_000_000))]
    pub subscription_buffer: usize,
    /// permessage-deflate for clients that offer it (browsers do): off, on, or the smallest push
    /// in bytes that is compressed (smaller ones go uncompressed). Each push is compressed once per
    /// worker and shared by every connection that negotiated it.
    #[arg(long, default_value = "off", value_parser = parse_compression)]
    pub compression: Compression,
    /// Serve the echo protocol on this path (e.g. /echo): every WebSocket message comes back
    /// unchanged. A conformance endpoint for WebSocket test suites; off by default.
    #[arg(long, value_parser = parse_echo_path)]
    pub echo_path: Option<String>,
}

/// `--echo-path`: an absolute path other than `/` (the seed's) and the event stream's.
fn parse_echo_path(s: &str) -> Result<String, String> {
    match s {
        "/" | crate::sse::PATH => Err(format!("{s} is taken (the seed's WebSocket, the event stream)")),
        p if p.starts_with('/') && !p.contains(['?', '#']) => Ok(p.to_owned()),
        _ => Err("an absolute path, such as /echo".into()),
    }
}

/// `--compression`: off, or on from a minimum size.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Compression(pub Option<usize>);

fn parse_compression(s: &str) -> Result<Compression, String> {
    match s.trim() {
        "off" => Ok(Compression(None)),
        "on" => Ok(Compression(Some(0))),
        n => n.parse().map(|n| Compression(Some(n))).map_err(|_| format!("{s:?}: use off, on, or a size in bytes")),
    }
}

/// TLS for a node's HTTP listeners.
#[derive(Debug, Args)]
pub struct TlsOpts {
    /// PEM certificate chain: serve HTTPS (the gateway: wss:// and https://), reloaded on SIGHUP
    /// and when the file changes, without dropping connections.
    #[arg(long, requires = "tls_key")]
    pub tls_cert: Option<std::path::PathBuf>,
    /// PEM private key of --tls-cert.
    #[arg(long, requires = "tls_cert")]
    pub tls_key: Option<std::path::PathBuf>,
}

impl TlsOpts {
    /// The certificate, loaded and watched, when one is given.
    fn load(&self) -> anyhow::Result<Option<std::sync::Arc<crate::tls::Tls>>> {
        let (Some(cert), Some(key)) = (&self.tls_cert, &self.tls_key) else { return Ok(None) };
        let tls = crate::tls::Tls::load(crate::tls::TlsFiles { cert: cert.clone(), key: key.clone() })
            .map_err(|e| anyhow::anyhow!("TLS: {e}"))?;
        tls.watch();
        Ok(Some(tls))
    }
}

#[derive(Debug, Args)]
pub struct PublisherArgs {
    /// Address to listen on.
    #[arg(long, default_value = "0.0.0.0:4237")]
    pub listen: String,
    #[command(flatten)]
    pub tls: TlsOpts,
    #[command(flatten)]
    pub broker: BrokerOpts,
    #[command(flatten)]
    pub insecure: Insecure,
    #[command(flatten)]
    pub opts: PublisherOpts,
    #[command(flatten)]
    pub history: HistoryOpts,
}

#[derive(Debug, Args)]
pub struct PublisherOpts {
    /// Key every publish must carry (Authorization: Bearer KEY, or key=KEY).
    #[arg(long, env = "PUSHWIRE_PUBLISH_KEY", hide_env_values = true)]
    pub publish_key: Option<String>,
    /// Longest content of one push, in characters.
    #[arg(long, default_value_t = PublisherConfig::default().max_content)]
    pub max_content: usize,
    /// Most HTTP connections at once; more are answered 503 and closed.
    #[arg(long = "max-http-connections", default_value_t = PublisherConfig::default().max_connections)]
    pub max_http_connections: usize,
    /// How long a client may take to send a request body; 408 after that.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub body_timeout: Duration,
    /// POST presence events (user_online, user_offline, channel_occupied, channel_vacated) as
    /// JSON to this URL. Give it to one publisher.
    #[arg(long, value_parser = parse_webhook)]
    pub webhook: Option<hyper::Uri>,
    /// Sign webhook bodies: X-Pushwire-Signature: sha256=HMAC-SHA256(body) in hex.
    #[arg(long, env = "PUSHWIRE_WEBHOOK_SECRET", hide_env_values = true)]
    pub webhook_secret: Option<String>,
    /// A user (topic) with no connection anywhere for this long is offline (vacated).
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    pub offline_delay: Duration,
}

#[derive(Debug, Args)]
pub struct StandaloneArgs {
    /// Channel server address (more nodes, PHP ones too, can join through it).
    #[arg(long, default_value = "127.0.0.1:2206")]
    pub channel_listen: ListenAddr,
    /// WebSocket gateway address.
    #[arg(long, default_value = "0.0.0.0:4236")]
    pub ws_listen: String,
    /// HTTP publisher address.
    #[arg(long, default_value = "127.0.0.1:4237")]
    pub http_listen: String,
    /// Run the publisher and channel server without authentication even when reachable from
    /// other machines. Only on a trusted network.
    #[arg(long)]
    pub insecure: bool,
    #[command(flatten)]
    pub channel: ChannelOpts,
    #[command(flatten)]
    pub gateway: GatewayOpts,
    #[command(flatten)]
    pub publisher: PublisherOpts,
    /// TLS for the gateway (wss://, https://) and the publisher, one certificate for both.
    #[command(flatten)]
    pub tls: TlsOpts,
    #[command(flatten)]
    pub history: HistoryOpts,
}

/// `--insecure` for the roles that have nothing else to flatten it into.
#[derive(Debug, Args)]
pub struct Insecure {
    /// Run without authentication even when reachable from other machines. Only on a trusted network.
    #[arg(long)]
    pub insecure: bool,
}

impl ChannelOpts {
    fn config(&self) -> ChannelConfig {
        ChannelConfig {
            max_frame: self.max_frame,
            secret: self.secret.clone(),
            settle: self.settle,
            max_connections: self.max_clients,
            max_unauthenticated: self.max_unauthenticated,
            auth_timeout: self.auth_timeout,
            ..ChannelConfig::default()
        }
    }

    fn limits(&self) -> HubLimits {
        HubLimits {
            max_names_per_client: self.max_channels_per_client,
            max_name_len: self.max_name_len,
            ..HubLimits::default()
        }
    }
}

impl GatewayOpts {
    fn config(&self) -> anyhow::Result<GatewayConfig> {
        if self.presence_lease < Duration::from_millis(300) {
            bail!("--presence-lease must be at least 300ms");
        }
        let verifier = match (&self.token_secret, &self.token_public_key) {
            (Some(secret), _) => Some(crate::protocol::native::token::Verifier::hs256(secret.as_bytes())),
            (None, Some(path)) => {
                let pem = std::fs::read(path).with_context(|| format!("--token-public-key {}", path.display()))?;
                let v = crate::protocol::native::token::Verifier::public_key_pem(&pem)
                    .map_err(|e| anyhow::anyhow!("--token-public-key {}: {e}", path.display()))?;
                Some(v)
            }
            (None, None) if self.require_token => {
                anyhow::bail!("--require-token needs --token-secret or --token-public-key")
            }
            (None, None) => None,
        };
        Ok(GatewayConfig {
            workers: self.workers,
            node_id: self.node_id.clone(),
            max_connections: self.max_connections,
            max_handshakes: self.max_handshakes,
            allowed_origins: self.allowed_origins.clone(),
            max_client_frame: self.max_client_frame,
            outbound_queue: self.outbound_queue,
            outbound_queue_bytes: self.outbound_queue_bytes,
            heartbeat: self.heartbeat,
            tokens: crate::protocol::native::token::TokenPolicy {
                verifier,
                required: self.require_token,
                max_age: self.token_max_age,
            },
            lease: self.presence_lease,
            subscription_buffer: self.subscription_buffer,
            compression: self.compression.0,
            echo_path: self.echo_path.clone(),
            ..GatewayConfig::default()
        })
    }
}

impl PublisherOpts {
    fn config(&self) -> PublisherConfig {
        PublisherConfig {
            publish_key: self.publish_key.clone(),
            max_content: self.max_content,
            max_connections: self.max_http_connections,
            body_timeout: self.body_timeout,
            webhook: self.webhook.clone().map(|u| (u, self.webhook_secret.clone())),
            offline_delay: self.offline_delay,
            tls: None,
            keep: None,
        }
    }
}

/// An http:// or https:// URL.
fn parse_webhook(s: &str) -> Result<hyper::Uri, String> {
    let u: hyper::Uri = s.parse().map_err(|e| format!("{s:?}: {e}"))?;
    match (u.scheme_str(), u.host()) {
        (Some("http" | "https"), Some(_)) => Ok(u),
        _ => Err(format!("{s:?}: use an http:// or https:// URL")),
    }
}

/// Parse the command line, with the settings of `--config FILE` (if given) under flags and
/// environment variables: defaults, then the file, then the environment, then flags.
pub fn parse() -> anyhow::Result<Cli> {
    use clap::{CommandFactory, FromArgMatches};
    let argv: Vec<std::ffi::OsString> = std::env::args_os().collect();
    let cmd = Cli::command();
    let matches = cmd.clone().try_get_matches_from(&argv).unwrap_or_else(|e| e.exit());
    let (Some(path), Some((name, sub))) = (matches.get_one::<std::path::PathBuf>("config"), matches.subcommand())
    else {
        return Ok(Cli::from_arg_matches(&matches)?);
    };
    if !crate::config::SECTIONS.contains(&name) {
        return Ok(Cli::from_arg_matches(&matches)?);
    }
    let file = crate::config::File::read(path)?;
    let sub_cmd = cmd.find_subcommand(name).context("no such command")?;
    let injected = file.flags(name, sub_cmd, sub)?;
    let at = argv.iter().position(|a| a == name).map_or(argv.len(), |i| i + 1);
    let mut full = argv;
    full.splice(at..at, injected.into_iter().map(Into::into));
    Ok(Cli::try_parse_from(full).unwrap_or_else(|e| e.exit()))
}

/// `pushwire check-config FILE`: every command's effective settings from `file`, the environment
/// and the defaults; an error names the file and line.
pub fn check_config(path: &std::path::Path) -> anyhow::Result<String> {
    use clap::CommandFactory;
    let file = crate::config::File::read(path)?;
    let cmd = Cli::command();
    let mut out = format!("# {}: valid\n", path.display());
    for role in crate::config::SECTIONS {
        let sub_cmd = cmd.find_subcommand(role).context("no such command")?;
        let base = sub_cmd.clone().try_get_matches_from([role]).map_err(|e| anyhow::anyhow!("{role}: {e}"))?;
        let mut argv = vec![role.to_owned()];
        argv.extend(file.flags(role, sub_cmd, &base)?);
        let matches = sub_cmd.clone().try_get_matches_from(&argv).map_err(|e| anyhow::anyhow!("[{role}]: {e}"))?;
        out.push_str(&format!("\n[{role}]\n{}", crate::config::describe(sub_cmd, &matches)));
    }
    Ok(out)
}

/// `25s`, `500ms`, `2m`, `1h 30m` (humantime), or a bare number of seconds; 1 ms to 24 h.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let d = match s.parse::<f64>() {
        Ok(secs) if secs.is_finite() && secs >= 0.0 => Duration::from_secs_f64(secs),
        _ => humantime::parse_duration(s).map_err(|e| format!("{s:?} is not a duration like 25s or 500ms: {e}"))?,
    };
    if !(Duration::from_millis(1)..=Duration::from_secs(86_400)).contains(&d) {
        return Err(format!("{s:?} is out of range (1ms to 24h)"));
    }
    Ok(d)
}

/// Like [`parse_duration`], and `0` or `0s` means none.
pub fn parse_duration_or_zero(s: &str) -> Result<Duration, String> {
    match s.trim() {
        "0" | "0s" | "0ms" => Ok(Duration::ZERO),
        _ => parse_duration(s),
    }
}

/// Whether only this machine can reach `addr`.
pub fn is_local(addr: &ListenAddr) -> bool {
    match addr {
        ListenAddr::Unix(_) => true,
        ListenAddr::Tcp(a) => {
            let host = a.rsplit_once(':').map_or(a.as_str(), |(h, _)| h).trim_start_matches('[').trim_end_matches(']');
            host == "localhost" || host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
        }
    }
}

/// Refuse an unauthenticated listener that other machines can reach, unless `insecure`.
fn protect(role: &str, addr: &ListenAddr, authenticated: bool, insecure: bool, how: &str) -> anyhow::Result<()> {
    if authenticated || insecure || is_local(addr) {
        return Ok(());
    }
    bail!(
        "refusing to start: the {role} on {addr} is reachable from other machines and has no authentication.\n\
         Set one with {how},\n\
         or listen on loopback (127.0.0.1), or pass --insecure to run it open on a trusted network."
    )
}

/// Resolves on SIGINT or SIGTERM.
async fn signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        () = term => {}
    }
    tracing::info!("shutting down");
}

/// A shutdown signal that several servers can wait on: each call of the returned function gives
/// a future that resolves on SIGINT or SIGTERM.
fn shutdown_signal() -> impl Fn() -> tokio_util::sync::WaitForCancellationFutureOwned {
    let token = tokio_util::sync::CancellationToken::new();
    let cancel = token.clone();
    tokio::spawn(async move {
        signal().await;
        cancel.cancel();
    });
    move || token.clone().cancelled_owned()
}

async fn bind_tcp(addr: &str, what: &str) -> anyhow::Result<TcpListener> {
    crate::io::bind_tcp(addr).await.with_context(|| format!("{what}: cannot listen on {addr}"))
}

fn tcp_addr(addr: &str) -> anyhow::Result<ListenAddr> {
    match addr.parse() {
        Ok(a @ ListenAddr::Tcp(_)) => Ok(a),
        _ => bail!("{addr:?} is not HOST:PORT"),
    }
}

const PUBLISH_KEY_HOW: &str = "--publish-key KEY (or the PUSHWIRE_PUBLISH_KEY environment variable)";
const SECRET_HOW: &str =
    "--secret SECRET (or PUSHWIRE_CHANNEL_SECRET); nodes then use --broker channel://:SECRET@HOST:PORT";

/// Run the command.
pub async fn run(cli: Cli) -> anyhow::Result<()> {
    crate::io::raise_fd_limit();
    let shutdown = shutdown_signal();
    match cli.command {
        Command::CheckConfig { file } => print!("{}", check_config(&file)?),
        Command::Status { publisher, publish_key } => {
            print!("{}", crate::status::status(&publisher, publish_key.as_deref()).await?)
        }
        Command::Bench { args } => {
            use std::os::unix::process::CommandExt as _;
            let exe = std::env::current_exe()?.with_file_name("pushwire-bench");
            let err = std::process::Command::new(&exe).args(args).exec();
            bail!("cannot run {}: {err} (build it with `cargo build --release --workspace`)", exe.display());
        }
        Command::Channel(a) => {
            protect("channel server", &a.listen, a.opts.secret.is_some(), a.insecure.insecure, SECRET_HOW)?;
            let listener =
                Listener::bind(&a.listen).await.with_context(|| format!("channel: cannot listen on {}", a.listen))?;
            let hub = Arc::new(Hub::new(a.opts.limits(), a.history.config()));
            if let Some(m) = &a.metrics_listen {
                let l = bind_tcp(m, "channel metrics").await?;
                tokio::spawn(channel_server::serve_metrics(l, hub.clone(), shutdown()));
            }
            channel_server::run(listener, hub, a.opts.config(), shutdown()).await;
        }
        Command::Gateway(a) => {
            let listener = bind_tcp(&a.listen, "gateway").await?;
            // A gateway reads history but stores none: its publishes are answers and heartbeats.
            let cfg = GatewayConfig { tls: a.tls.load()?, ..a.opts.config()? };
            let gw = Gateway::start(a.broker.open(HistoryConfig::OFF, true).await?, cfg)?;
            gw.serve(listener, shutdown()).await;
        }
        Command::Publisher(a) => {
            let addr = tcp_addr(&a.listen)?;
            protect("publisher", &addr, a.opts.publish_key.is_some(), a.insecure.insecure, PUBLISH_KEY_HOW)?;
            let listener = bind_tcp(&a.listen, "publisher").await?;
            // A channel server keeps history as its own settings say.
            let keep = match a.broker.broker {
                BrokerUrl::Channel { .. } => Some(crate::history::AS_THE_STORE),
                _ => a.history.config().keep(),
            };
            let cfg = PublisherConfig { tls: a.tls.load()?, keep, ..a.opts.config() };
            Publisher::new(a.broker.open(a.history.config(), false).await?, cfg)?.serve(listener, shutdown()).await;
        }
        Command::Standalone(a) => {
            let http_addr = tcp_addr(&a.http_listen)?;
            protect("publisher", &http_addr, a.publisher.publish_key.is_some(), a.insecure, PUBLISH_KEY_HOW)?;
            protect("channel server", &a.channel_listen, a.channel.secret.is_some(), a.insecure, SECRET_HOW)?;
            let channel = Listener::bind(&a.channel_listen)
                .await
                .with_context(|| format!("channel: cannot listen on {}", a.channel_listen))?;
            let ws = bind_tcp(&a.ws_listen, "gateway").await?;
            let http = bind_tcp(&a.http_listen, "publisher").await?;
            let hub = Arc::new(Hub::new(a.channel.limits(), a.history.config()));
            let broker: Arc<dyn broker::Broker> = Arc::new(broker::memory::MemoryBroker::new(hub.clone(), ""));
            let tls = a.tls.load()?;
            let gw = Gateway::start(broker.clone(), GatewayConfig { tls: tls.clone(), ..a.gateway.config()? })?;
            let cfg = PublisherConfig { tls, keep: a.history.config().keep(), ..a.publisher.config() };
            let publisher = Publisher::new(broker, cfg)?;
            // The publisher gets a thread and runtime of its own, so that a publish is never
            // queued behind the thousands of connection tasks a broadcast wakes.
            let (http, stop) = (http.into_std()?, shutdown());
            let publisher_thread = std::thread::Builder::new().name("publisher".into()).spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
                rt.block_on(async move {
                    publisher.serve(TcpListener::from_std(http)?, stop).await;
                    anyhow::Ok(())
                })
            })?;
            tokio::join!(channel_server::run(channel, hub, a.channel.config(), shutdown()), gw.serve(ws, shutdown()),);
            tokio::task::spawn_blocking(move || publisher_thread.join())
                .await?
                .map_err(|_| anyhow::anyhow!("publisher thread panicked"))??;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("25s"), Ok(Duration::from_secs(25)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("3"), Ok(Duration::from_secs(3)));
        assert!(parse_duration("0s").is_err());
        assert_eq!(parse_duration("1h 30m"), Ok(Duration::from_secs(5400)));
        assert!(parse_duration("25h").is_err());
        assert!(parse_duration("soon").is_err());
    }

    #[test]
    fn locality() {
        let l = |s: &str| is_local(&s.parse().unwrap());
        assert!(l("127.0.0.1:1") && l("127.9.9.9:1") && l("[::1]:1") && l("localhost:1") && l("unix:/tmp/s"));
        assert!(!l("0.0.0.0:1") && !l("[::]:1") && !l("10.1.2.3:1") && !l("example.com:1"));
    }

    #[test]
    fn protected_mode() {
        let open: ListenAddr = "0.0.0.0:4237".parse().unwrap();
        let err = protect("publisher", &open, false, false, PUBLISH_KEY_HOW).unwrap_err().to_string();
        assert!(err.contains("--publish-key") && err.contains("--insecure"), "{err}");
        assert!(protect("publisher", &open, true, false, "").is_ok());
        assert!(protect("publisher", &open, false, true, "").is_ok());
        assert!(protect("publisher", &"127.0.0.1:4237".parse().unwrap(), false, false, "").is_ok());
    }
}
