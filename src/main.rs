//! The `prescient` command line.

mod forecast_cli;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(name = "prescient", about = "KVM host companion")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Train the forecasting model on trace files and score it on held-out series.
    Train(forecast_cli::TrainArgs),
    /// Score the baselines (and a model) on trace files.
    Eval(forecast_cli::EvalArgs),
}

fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let cli = Cli::parse();
    let r = match cli.command {
        Command::Train(a) => forecast_cli::run_train(a),
        Command::Eval(a) => forecast_cli::run_eval(a),
    };
    match r {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            let mut msg = format!("error: {e}");
            let mut src = std::error::Error::source(&e);
            while let Some(s) = src {
                msg.push_str(&format!(": {s}"));
                src = s.source();
            }
            tracing::error!("{msg}");
            std::process::ExitCode::FAILURE
        }
    }
}
