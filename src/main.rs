//! The `prescient` command line.
#![allow(clippy::print_stdout)]

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use prescient::{HooksServer, ServerConfig};
use vmm_hooks::error_chain;

/// Prescient: a KVM host companion that prepares the host before VM demand arrives.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the companion daemon: listen for VMM lifecycle hooks.
    Serve(ServeArgs),
}

#[derive(Debug, clap::Args)]
struct ServeArgs {
    /// The hooks socket VMMs connect to.
    #[arg(long, default_value = "/run/prescient/hooks.sock")]
    socket: PathBuf,
    /// Append every received event to this file as JSON lines.
    #[arg(long)]
    event_log: Option<PathBuf>,
    /// Also allow this user id to connect (root and the daemon's own user always may).
    #[arg(long)]
    allow_uid: Vec<u32>,
}

fn init_logging() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
}

fn serve(args: ServeArgs) -> ExitCode {
    let mut config = ServerConfig::new(args.socket);
    config.event_log = args.event_log;
    config.allowed_uids = args.allow_uid;
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("prescient: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async {
        let server = match HooksServer::bind(config) {
            Ok(s) => s,
            Err(e) => {
                eprintln!("prescient: {}", error_chain(&e));
                return ExitCode::FAILURE;
            }
        };
        let (tx, rx) = tokio::sync::watch::channel(false);
        tokio::spawn(async move {
            wait_for_shutdown_signal().await;
            tracing::info!("shutting down");
            let _ = tx.send(true);
        });
        server.serve(rx).await;
        ExitCode::SUCCESS
    })
}

async fn wait_for_shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(mut term), Ok(mut int)) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
        }
        _ => {
            tracing::error!("cannot install signal handlers; stop with SIGKILL");
            std::future::pending::<()>().await;
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging();
    match cli.command {
        Command::Serve(args) => serve(args),
    }
}
