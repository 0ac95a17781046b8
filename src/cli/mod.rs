//! Command-line interface: one typed configuration per role, read from flags and environment
//! variables, checked once before anything starts (a wrong value stops the program with a clear
//! message).
//!
//! **Protected by default.** A listener that can change what clients receive (the publisher, the
//! channel server) and that is reachable beyond loopback must be authenticated (`--publish-key`,
//! `--secret`), or the operator must pass `--insecure`; otherwise the process refuses to start.

use std::net::IpAddr;
use std::sync::Arc;

use anyhow::{bail, Context as _};
use clap::{Parser, Subcommand};
use tokio::net::TcpListener;

use crate::broker::{self, BrokerUrl, LinkConfig};
use crate::channel_server::{self, ChannelConfig};
use crate::gateway::{Gateway, GatewayConfig};
use crate::history::HistoryConfig;
use crate::hub::{Hub, HubLimits};
use crate::io::{ListenAddr, Listener};
use crate::publisher::{Publisher, PublisherConfig};

mod opts;
pub use opts::*;

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
    let config = cli.config.as_deref();
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
            if let Some(backend) = a.backend().await? {
                hub.federate(backend, a.history.config().keep()).await?;
            }
            if let Some(m) = &a.metrics_listen {
                let l = bind_tcp(m, "channel metrics").await?;
                tokio::spawn(channel_server::serve_metrics(l, hub.clone(), shutdown()));
            }
            channel_server::run(listener, hub, a.opts.config(), shutdown()).await;
        }
        Command::Gateway(a) => {
            let listener = bind_tcp(&a.listen, "gateway").await?;
            // A gateway reads history but stores none: its publishes are answers and heartbeats.
            let apps = a.apps.load(config)?;
            let broker = a.broker.open(HistoryConfig::OFF, true).await?;
            let api = match a.apps.pusher_api && !apps.is_empty() {
                true => Some(Publisher::new(
                    broker.clone(),
                    PublisherConfig { apps: apps.clone(), keep: None, ..PublisherConfig::default() },
                )?),
                false => None,
            };
            let cfg = GatewayConfig { tls: a.tls.load()?, apps, api, ..a.opts.config()? };
            let gw = Gateway::start(broker, cfg)?;
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
            let cfg = PublisherConfig { tls: a.tls.load()?, keep, apps: a.apps.load(config)?, ..a.opts.config() };
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
            let apps = a.apps.load(config)?;
            let cfg = PublisherConfig {
                tls: tls.clone(),
                keep: a.history.config().keep(),
                apps,
                app_webhooks: true,
                ..a.publisher.config()
            };
            let publisher = Publisher::new(broker.clone(), cfg)?;
            // Pusher's clients and backends reach one host and port: the API on the WebSocket port too.
            let (apps, api) = (publisher.apps(), Some(publisher.clone()));
            let api = api.filter(|_| !apps.is_empty());
            let gw = Gateway::start(broker, GatewayConfig { tls, apps, api, ..a.gateway.config()? })?;
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
    use std::time::Duration;

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
