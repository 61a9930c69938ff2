//! `stretch`: the one binary users run. See `stretch --help` and docs/operations.md.

mod cli;
mod config;
mod serve;
mod site;
mod up;
mod volume;

use clap::Parser;
use tracing_subscriber::EnvFilter;

fn main() -> std::process::ExitCode {
    let cli = cli::Cli::parse();
    // Logs go to stderr so that stdout carries only what a script may parse (URIs, tables).
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(err) => {
            eprintln!("stretch: cannot start the async runtime: {err}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async move {
        match cli.command {
            cli::Command::Up(args) => up::run(args).await,
            cli::Command::Serve(args) => serve::run(args).await,
            cli::Command::Site(args) => site::run(args).await,
            cli::Command::Volume(cmd) => volume::run(cmd),
            cli::Command::Link(args) => stretch_bench::run_link(args).await,
            cli::Command::Bench(args) => stretch_bench::run_bench(args).await,
        }
    });
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("stretch: error: {err:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
