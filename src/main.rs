//! The `pushwire` binary: parse flags, set up logging, run.

fn main() -> anyhow::Result<()> {
    let cli = pushwire::cli::parse()?;
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_new(&cli.log_level)?)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    tokio::runtime::Builder::new_multi_thread().enable_all().build()?.block_on(pushwire::cli::run(cli))
}
