use clap::Parser;
use retro_fleet::cli::{self, Cli, Command, ModelAction, TopologyAction};
use retro_fleet::{roles, telemetry};
use tokio_util::sync::CancellationToken;

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let config = match cli.load_config() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: invalid configuration: {e}");
            return std::process::ExitCode::from(2);
        }
    };
    if let Command::Config = cli.command {
        print!("{}", config.to_toml());
        return std::process::ExitCode::SUCCESS;
    }
    if let Command::Model { action: ModelAction::Tiny { out, layers, hidden } } = &cli.command {
        return match cli::model_tiny(out, *layers, *hidden) {
            Ok(()) => std::process::ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("error: {e:#}");
                std::process::ExitCode::FAILURE
            }
        };
    }
    telemetry::init_logs(&config.log);
    let runtime = tokio::runtime::Runtime::new().expect("tokio runtime");
    let result = runtime.block_on(async move {
        let shutdown = CancellationToken::new();
        match cli.command {
            Command::Up { .. } => {
                roles::cancel_on_signal(shutdown.clone());
                roles::up(config, shutdown).await
            }
            Command::Ingress { .. } => {
                roles::cancel_on_signal(shutdown.clone());
                roles::ingress(config, shutdown).await
            }
            Command::Worker { .. } => {
                roles::cancel_on_signal(shutdown.clone());
                roles::worker(config, shutdown).await
            }
            Command::Topology { action: TopologyAction::Apply } => cli::topology_apply(&config).await,
            Command::Submit { model, priority, max_tokens, timeout, prompt } => {
                cli::submit(&config, model, priority, max_tokens, timeout, prompt).await
            }
            Command::Batch { action } => cli::batch(&config, action).await,
            Command::Config | Command::Model { .. } => unreachable!("handled above"),
        }
    });
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
