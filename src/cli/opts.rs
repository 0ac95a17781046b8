//! The options of each command, as typed groups (broker, history, TLS, gateway, publisher,
//! channel server), and how each group becomes the typed configuration of what it starts.

use std::sync::Arc;
use std::time::Duration;

use clap::Args;

use super::*;

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
    pub(super) fn config(&self) -> HistoryConfig {
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
    /// Share a backend with other channel servers (redis://, redis-cluster://, nats://, ... as
    /// --broker of the other roles): events published through any of them reach the
    /// subscribers of all of them.
    #[arg(long)]
    pub broker: Option<BrokerUrl>,
    #[command(flatten)]
    pub link: LinkOpts,
}

impl ChannelArgs {
    /// The backend shared with other channel servers, when `--broker` names one.
    pub(super) async fn backend(&self) -> anyhow::Result<Option<Arc<dyn broker::Broker>>> {
        let Some(url) = &self.broker else { return Ok(None) };
        Ok(Some(self.link.open(url, self.history.config(), false).await?))
    }
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
    /// Items one queue holds while no watcher takes them; an enqueue past it is refused (the
    /// enqueuing client is cut off). With --broker, per queue on the backend.
    #[arg(long, default_value_t = HubLimits::default().max_queue_items)]
    pub max_queue_items: usize,
    /// Bytes all queues hold together; an enqueue past it is refused. With --broker, per queue
    /// on Redis, and for all queues on NATS.
    #[arg(long, default_value_t = HubLimits::default().max_queued_bytes)]
    pub max_queue_bytes: usize,
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
    #[command(flatten)]
    pub link: LinkOpts,
}

/// How a node (or a channel server sharing a backend) talks to the broker it names.
#[derive(Debug, Args)]
pub struct LinkOpts {
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
    pub(super) async fn open(&self, history: HistoryConfig, gateway: bool) -> anyhow::Result<Arc<dyn broker::Broker>> {
        self.link.open(&self.broker, history, gateway).await
    }
}

impl LinkOpts {
    async fn open(
        &self,
        url: &BrokerUrl,
        history: HistoryConfig,
        gateway: bool,
    ) -> anyhow::Result<Arc<dyn broker::Broker>> {
        let opts = broker::BrokerOptions {
            gateway,
            prefix: self.broker_prefix.clone(),
            ca: self.broker_ca.clone(),
            nats_creds: self.nats_creds.clone(),
            nats_nkey: self.nats_nkey.clone(),
            history,
        };
        Ok(broker::open(url, &opts, LinkConfig::default()).await?)
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
    #[command(flatten)]
    pub apps: AppsOpts,
}

/// The Pusher apps served, besides the config file's `[[apps]]`.
#[derive(Debug, Args)]
pub struct AppsOpts {
    /// A Pusher app, ID:KEY:SECRET (client events on): pusher-js connects to /app/KEY on the
    /// gateway, the Pusher SDKs call /apps/ID on the publisher. More apps, and their settings,
    /// go in the config file's [[apps]].
    #[arg(long = "app", env = "PUSHWIRE_APP", hide_env_values = true, value_parser = crate::protocol::pusher::App::parse_flag)]
    pub app: Option<crate::protocol::pusher::App>,
    /// On a gateway: serve the apps' Pusher HTTP API (/apps/ID/...) on its port too, so that
    /// clients and backends use one host and port (standalone always does).
    #[arg(long)]
    pub pusher_api: bool,
}

impl AppsOpts {
    /// The apps of the flag and of the config file at `config`.
    pub(super) fn load(&self, config: Option<&std::path::Path>) -> anyhow::Result<Arc<crate::protocol::pusher::Apps>> {
        let mut list = match config {
            Some(path) => crate::config::File::read(path)?.apps,
            None => Vec::new(),
        };
        list.extend(self.app.clone());
        Ok(Arc::new(crate::protocol::pusher::Apps::new(list).map_err(anyhow::Error::msg)?))
    }
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
pub(super) fn parse_echo_path(s: &str) -> Result<String, String> {
    match s {
        "/" | crate::sse::PATH => Err(format!("{s} is taken (the seed's WebSocket, the event stream)")),
        p if p.starts_with('/') && !p.contains(['?', '#']) => Ok(p.to_owned()),
        _ => Err("an absolute path, such as /echo".into()),
    }
}

/// `--compression`: off, or on from a minimum size.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Compression(pub Option<usize>);

pub(super) fn parse_compression(s: &str) -> Result<Compression, String> {
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
    pub(super) fn load(&self) -> anyhow::Result<Option<std::sync::Arc<crate::tls::Tls>>> {
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
    #[command(flatten)]
    pub apps: AppsOpts,
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
    /// A user (topic) with no connection anywhere for this long is offline (vacated); a Pusher
    /// channel is vacated, and a member removed, after this or 3 s, whichever is shorter.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    pub offline_delay: Duration,
    /// Send the Pusher apps' webhooks channel_occupied, channel_vacated, member_added and
    /// member_removed (gateways send client_event and cache_miss). Give it to one publisher;
    /// standalone always sends them.
    #[arg(long)]
    pub app_webhooks: bool,
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
    #[command(flatten)]
    pub apps: AppsOpts,
}

/// `--insecure` for the roles that have nothing else to flatten it into.
#[derive(Debug, Args)]
pub struct Insecure {
    /// Run without authentication even when reachable from other machines. Only on a trusted network.
    #[arg(long)]
    pub insecure: bool,
}

impl ChannelOpts {
    pub(super) fn config(&self) -> ChannelConfig {
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

    pub(super) fn limits(&self) -> HubLimits {
        HubLimits {
            max_names_per_client: self.max_channels_per_client,
            max_name_len: self.max_name_len,
            max_queue_items: self.max_queue_items,
            max_queued_bytes: self.max_queue_bytes,
            ..HubLimits::default()
        }
    }
}

impl GatewayOpts {
    pub(super) fn config(&self) -> anyhow::Result<GatewayConfig> {
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
    pub(super) fn config(&self) -> PublisherConfig {
        PublisherConfig {
            publish_key: self.publish_key.clone(),
            max_content: self.max_content,
            max_connections: self.max_http_connections,
            body_timeout: self.body_timeout,
            webhook: self.webhook.clone().map(|u| (u, self.webhook_secret.clone())),
            offline_delay: self.offline_delay,
            tls: None,
            keep: None,
            apps: Arc::default(),
            app_webhooks: self.app_webhooks,
        }
    }
}

/// An http:// or https:// URL.
pub(super) fn parse_webhook(s: &str) -> Result<hyper::Uri, String> {
    let u: hyper::Uri = s.parse().map_err(|e| format!("{s:?}: {e}"))?;
    match (u.scheme_str(), u.host()) {
        (Some("http" | "https"), Some(_)) => Ok(u),
        _ => Err(format!("{s:?}: use an http:// or https:// URL")),
    }
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
