use clap::Parser;
use retro_fleet::cli::{self, CacheAction, Cli, Command, DlqAction, KeysAction, ModelAction, TopologyAction};
use retro_fleet::{roles, telemetry};
use tokio_util::sync::CancellationToken;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let serves = matches!(
        cli.command,
        Command::Up { .. } | Command::Ingress { .. } | Command::Worker { .. } | Command::Scaler { .. }
    );
    if !serves {
        // `retro-fleet queues | head`: a closed stdout ends a tool quietly,
        // like any Unix tool, instead of a panic. (SIGPIPE stays ignored:
        // a dropped NATS connection must be an error, not a silent death.)
        let default_hook = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let payload = info.payload();
            let msg = payload.downcast_ref::<String>().map(String::as_str).or(payload.downcast_ref::<&str>().copied());
            if msg.is_some_and(|m| m.contains("failed printing to stdout") && m.contains("Broken pipe")) {
                std::process::exit(141);
            }
            default_hook(info);
        }));
    }
    let config = match cli.load_config() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: invalid configuration: {e}");
            return std::process::ExitCode::from(2);
        }
    };
    if let Command::Config { show_secrets } = cli.command {
        print!("{}", if show_secrets { config.to_toml() } else { config.redacted().to_toml() });
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
    if let Command::Model { action: ModelAction::TinyLora { out, rank, seed } } = &cli.command {
        return match cli::model_tiny_lora(out, *rank, *seed) {
            Ok(()) => std::process::ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("error: {e:#}");
                std::process::ExitCode::FAILURE
            }
        };
    }
    let mut log = config.log.clone();
    if !serves {
        // A tool's output is for people: its logs say only what went wrong
        // (an explicit level other than the default still wins).
        if log.level == "info" {
            log.level = "warn".into();
        }
    }
    telemetry::init_logs(&log);
    let runtime = match (&cli.command, config.worker.threads) {
        // a worker's messaging batches its socket writes on one thread
        (Command::Worker { .. }, 0 | 1) => {
            retro_fleet_worker::backend::pool::load_models_off_runtime();
            tokio::runtime::Builder::new_current_thread().enable_all().build()
        }
        (Command::Worker { .. }, n) => {
            tokio::runtime::Builder::new_multi_thread().worker_threads(n).enable_all().build()
        }
        _ => tokio::runtime::Runtime::new(),
    }
    .expect("tokio runtime");
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
            Command::Scaler { .. } => {
                roles::cancel_on_signal(shutdown.clone());
                retro_fleet::scaler::serve(config, shutdown).await
            }
            Command::Workers { json, action: None } => cli::workers(&config, json).await,
            Command::Workers { action: Some(action), .. } => cli::workers_action(&config, action).await,
            Command::Queues { action } => cli::queues(&config, action).await,
            Command::Topology { action: TopologyAction::Apply } => cli::topology_apply(&config).await,
            Command::Cache { action: CacheAction::Warm { since, from_seq, timeout } } => {
                let since_ms = since.map(|age| retro_fleet_worker::unix_ms().saturating_sub(age.as_millis() as u64));
                let from = retro_fleet_worker::cache::warm::WarmFrom { since_ms, from_seq };
                retro_fleet::cache_cli::warm(&config, from, std::time::Duration::from_secs(timeout)).await
            }
            Command::Cache { action: CacheAction::Purge { models } } => {
                retro_fleet::cache_cli::purge(&config, models).await
            }
            Command::Keys { action } => match action {
                KeysAction::Add { id, tenant, roles } => retro_fleet::keys_cli::add(&config, id, tenant, roles).await,
                KeysAction::List => retro_fleet::keys_cli::list(&config).await,
                KeysAction::Revoke { id } => retro_fleet::keys_cli::revoke(&config, id).await,
            },
            Command::Submit { model, priority, max_tokens, timeout, prompt } => {
                cli::submit(&config, model, priority, max_tokens, timeout, prompt).await
            }
            Command::Dlq { action } => match action {
                DlqAction::List { filter, limit } => {
                    let filter = retro_fleet::dlq::Filter::parse(&filter)?;
                    retro_fleet::dlq::list(&config, &filter, limit).await
                }
                DlqAction::Show { seq } => retro_fleet::dlq::show(&config, seq).await,
                DlqAction::Replay { filter, limit, keep, dry_run } => {
                    let filter = retro_fleet::dlq::Filter::parse(&filter)?;
                    retro_fleet::dlq::replay(&config, &filter, limit, keep, dry_run).await.map(|_| ())
                }
            },
            Command::Batch { action } => cli::batch(&config, action).await,
            Command::Config { .. } | Command::Model { .. } => unreachable!("handled above"),
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
