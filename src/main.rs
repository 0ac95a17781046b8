//! The `pushwire` binary: parse flags, set up logging, run.

fn main() -> anyhow::Result<()> {
    let cli = pushwire::cli::parse()?;
    let mut filter = tracing_subscriber::EnvFilter::try_new(&cli.log_level)?;
    // The broker libraries log every connection error they then retry; pushwire's link logs the
    // state changes once. Their own lines only when asked for by name.
    for (lib, level) in [("fred", "error"), ("async_nats", "error")] {
        if !cli.log_level.contains(lib) {
            filter = filter.add_directive(format!("{lib}={level}").parse()?);
        }
    }
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let mut runtime = tokio::runtime::Builder::new_multi_thread();
    if let Some(n) = cli.threads {
        runtime.worker_threads(n.get());
    }
    runtime.enable_all().build()?.block_on(pushwire::cli::run(cli))
}
