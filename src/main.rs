//! `stretch`: the one binary users run. See `stretch --help` and docs/operations.md.

mod admin;
mod admin_client;
mod cli;
mod config;
mod control;
mod detach;
mod force;
mod policy;
mod progress;
mod serve;
mod site;
mod status;
mod up;
mod verify;
mod volume;
mod witness;

use clap::Parser;
use tracing_subscriber::EnvFilter;

fn main() -> std::process::ExitCode {
    let cli = cli::Cli::parse();
    // Logs go to stderr so that stdout carries only what a script may parse (URIs, tables).
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env()
                // openraft narrates every vote at info; its warnings are what an operator needs.
                .unwrap_or_else(|_| EnvFilter::new("info,openraft=warn")),
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
            cli::Command::Witness(args) => witness::run(args).await,
            cli::Command::Detach(args) => detach::run(args).await,
            cli::Command::Volume(cmd) => volume::run(cmd).await,
            cli::Command::Link(args) => stretch_bench::run_link(args).await,
            cli::Command::Bench(args) => stretch_bench::run_bench(args).await,
            cli::Command::Status(args) => status::run(args).await,
            cli::Command::Verify(args) => verify::run(args).await,
            cli::Command::ForceSurvivor(args) => force::force_survivor(args).await,
            cli::Command::PrepareRejoin(args) => force::prepare_rejoin(args).await,
            cli::Command::Readmit(args) => force::readmit(args).await,
        }
    });
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        // A command that chose its exit status has already said why.
        Err(err) if err.downcast_ref::<verify::ExitStatus>().is_some() => {
            let code = err.downcast_ref::<verify::ExitStatus>().map_or(1, |e| e.0);
            std::process::ExitCode::from(code)
        }
        Err(err) => {
            eprintln!("stretch: error: {err:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
