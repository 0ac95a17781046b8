//! Command-line interface: one typed configuration per role, read from flags and environment
//! variables, checked once before anything starts.

use std::future::Future;
use std::sync::Arc;

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand};
use tokio::net::TcpListener;

use crate::broker::{self, BrokerUrl, LinkConfig};
use crate::channel_server::{self, ChannelConfig};
use crate::gateway::{Gateway, GatewayConfig};
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
}

#[derive(Debug, Args)]
pub struct ChannelArgs {
    /// Address to listen on: HOST:PORT, or unix:/path for a Unix socket.
    #[arg(long, default_value = "0.0.0.0:2206")]
    pub listen: ListenAddr,
    #[command(flatten)]
    pub opts: ChannelOpts,
}

#[derive(Debug, Args)]
pub struct ChannelOpts {
    /// Largest channel frame accepted, in bytes (header included).
    #[arg(long, default_value_t = channel_proto::DEFAULT_MAX_FRAME)]
    pub max_frame: usize,
    /// Secret that channel clients must send first (not understood by PHP clients).
    #[arg(long, env = "PUSHWIRE_CHANNEL_SECRET")]
    pub secret: Option<String>,
}

/// How a node reaches the broker.
#[derive(Debug, Args)]
pub struct BrokerOpts {
    /// Broker: channel://[:SECRET@]HOST:PORT (or HOST:PORT), channel+unix:///path,
    /// redis://[[USER]:PASS@]HOST:PORT[/DB], nats://[USER:PASS@]HOST:PORT[,HOST:PORT...], memory.
    #[arg(long, default_value = "channel://127.0.0.1:2206")]
    pub broker: BrokerUrl,
    /// Prefix before channel names on the broker, so clusters can share one broker
    /// [default: none on channel://, "pushwire." on redis:// and nats://].
    #[arg(long)]
    pub broker_prefix: Option<String>,
}

impl BrokerOpts {
    fn open(&self) -> Arc<dyn broker::Broker> {
        broker::open(&self.broker, self.broker_prefix.as_deref(), None, LinkConfig::default())
    }
}

#[derive(Debug, Args)]
pub struct GatewayArgs {
    /// Address to listen on.
    #[arg(long, default_value = "0.0.0.0:4236")]
    pub listen: String,
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
    #[arg(long, default_value_t = 100_000)]
    pub max_connections: usize,
    /// Browser origins allowed to connect (comma-separated); all when empty.
    #[arg(long, value_delimiter = ',')]
    pub allowed_origins: Vec<String>,
}

#[derive(Debug, Args)]
pub struct PublisherArgs {
    /// Address to listen on.
    #[arg(long, default_value = "0.0.0.0:4237")]
    pub listen: String,
    #[command(flatten)]
    pub broker: BrokerOpts,
    #[command(flatten)]
    pub opts: PublisherOpts,
}

#[derive(Debug, Args)]
pub struct PublisherOpts {
    /// Key every publish must carry (Authorization: Bearer KEY, or key=KEY).
    #[arg(long, env = "PUSHWIRE_PUBLISH_KEY")]
    pub publish_key: Option<String>,
}

#[derive(Debug, Args)]
pub struct StandaloneArgs {
    /// Channel server address (stays open so more nodes, PHP ones too, can join).
    #[arg(long, default_value = "0.0.0.0:2206")]
    pub channel_listen: ListenAddr,
    /// WebSocket gateway address.
    #[arg(long, default_value = "0.0.0.0:4236")]
    pub ws_listen: String,
    /// HTTP publisher address.
    #[arg(long, default_value = "0.0.0.0:4237")]
    pub http_listen: String,
    #[command(flatten)]
    pub channel: ChannelOpts,
    #[command(flatten)]
    pub gateway: GatewayOpts,
    #[command(flatten)]
    pub publisher: PublisherOpts,
}

impl ChannelOpts {
    fn config(&self) -> ChannelConfig {
        ChannelConfig { max_frame: self.max_frame, secret: self.secret.clone(), ..ChannelConfig::default() }
    }
}

impl GatewayOpts {
    fn config(&self) -> GatewayConfig {
        GatewayConfig {
            workers: self.workers,
            node_id: self.node_id.clone(),
            max_connections: self.max_connections,
            allowed_origins: self.allowed_origins.clone(),
            ..GatewayConfig::default()
        }
    }
}

impl PublisherOpts {
    fn config(&self) -> PublisherConfig {
        PublisherConfig { publish_key: self.publish_key.clone(), ..PublisherConfig::default() }
    }
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

/// A shutdown signal that several servers can wait on.
fn shutdown_fanout() -> (impl Fn() -> std::pin::Pin<Box<dyn Future<Output = ()> + Send>>, tokio::task::JoinHandle<()>) {
    let (tx, rx) = tokio::sync::watch::channel(false);
    let trigger = tokio::spawn(async move {
        signal().await;
        let _ = tx.send(true);
    });
    let make = move || {
        let mut rx = rx.clone();
        Box::pin(async move {
            let _ = rx.wait_for(|v| *v).await;
        }) as std::pin::Pin<Box<dyn Future<Output = ()> + Send>>
    };
    (make, trigger)
}

async fn bind_tcp(addr: &str, what: &str) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr).await.with_context(|| format!("{what}: cannot listen on {addr}"))
}

/// Run the command.
pub async fn run(cli: Cli) -> anyhow::Result<()> {
    let (shutdown, _signal) = shutdown_fanout();
    match cli.command {
        Command::Channel(a) => {
            let listener =
                Listener::bind(&a.listen).await.with_context(|| format!("channel: cannot listen on {}", a.listen))?;
            let hub = Arc::new(Hub::new(HubLimits::default()));
            channel_server::run(listener, hub, a.opts.config(), shutdown()).await;
        }
        Command::Gateway(a) => {
            let listener = bind_tcp(&a.listen, "gateway").await?;
            let gw = Gateway::start(a.broker.open(), a.opts.config())?;
            gw.serve(listener, shutdown()).await;
        }
        Command::Publisher(a) => {
            let listener = bind_tcp(&a.listen, "publisher").await?;
            let broker = a.broker.open();
            Publisher::new(broker, a.opts.config()).serve(listener, shutdown()).await;
        }
        Command::Standalone(a) => {
            let channel = Listener::bind(&a.channel_listen)
                .await
                .with_context(|| format!("channel: cannot listen on {}", a.channel_listen))?;
            let ws = bind_tcp(&a.ws_listen, "gateway").await?;
            let http = bind_tcp(&a.http_listen, "publisher").await?;
            let hub = Arc::new(Hub::new(HubLimits::default()));
            let broker = broker::open(&BrokerUrl::Memory, None, Some(hub.clone()), LinkConfig::default());
            let gw = Gateway::start(broker.clone(), a.gateway.config())?;
            let publisher = Publisher::new(broker, a.publisher.config());
            tokio::join!(
                channel_server::run(channel, hub, a.channel.config(), shutdown()),
                gw.serve(ws, shutdown()),
                publisher.serve(http, shutdown()),
            );
        }
    }
    Ok(())
}
