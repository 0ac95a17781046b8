//! The `pushwire-bench` binary: parse flags, run one benchmark.

use clap::Parser;

/// Load-test a running system with the seed's API (pushwire or the PHP original).
#[derive(Parser)]
#[command(name = "pushwire-bench", version)]
struct Cli {
    #[command(flatten)]
    args: pushwire_bench::BenchArgs,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    tokio::runtime::Builder::new_multi_thread().enable_all().build()?.block_on(pushwire_bench::run(cli.args))
}
