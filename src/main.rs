use clap::Parser;
use futures::FutureExt as _;
use retro_fleet::tools::{
    self, CacheAction, Cli, Command, DlqAction, KeysAction, ModelAction, TenantsAction, TopologyAction,
};
use retro_fleet::{roles, telemetry};
use tokio_util::sync::CancellationToken;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    // the role a serving command runs (its traces' service name)
    let role = match cli.command {
        Command::Up { .. } => Some("up"),
        Command::Ingress { .. } => Some("ingress"),
        Command::Worker { .. } => Some("worker"),
        Command::Scaler { .. } => Some("scaler"),
        _ => None,
    };
    let serves = role.is_some();
    if !serves {
        quiet_broken_pipe();
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
    if let Command::Model { action } = &cli.command {
        return exit_code(model_tool(action));
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
    let traces = match role.map(|r| telemetry::init_traces(&config.telemetry.otlp, r)).transpose() {
        Ok(t) => t.flatten(),
        Err(e) => return exit_code(Err(e)),
    };
    let runtime = runtime_for(&cli.command, config.worker.threads, config.ingress.threads);
    let serving = runtime.block_on(async move {
        let shutdown = CancellationToken::new();
        let role = match cli.command {
            Command::Up { .. } => roles::up(config, shutdown.clone()).boxed_local(),
            Command::Ingress { .. } => roles::ingress(config, shutdown.clone()).boxed_local(),
            Command::Worker { .. } => roles::worker(config, shutdown.clone()).boxed_local(),
            Command::Scaler { .. } => roles::scaler(config, shutdown.clone()).boxed_local(),
            tool => return run_tool(tool, config).await.map(|()| roles::Exit::Clean),
        };
        roles::cancel_on_signal(shutdown);
        role.await
    });
    // Tasks still waiting on NATS (a lost connection) or a model thread
    // must not keep a stopped process alive.
    runtime.shutdown_timeout(retro_fleet_worker::FINAL_OP_TIMEOUT);
    if let Some(t) = traces {
        t.shutdown();
    }
    match serving {
        Ok(exit) => std::process::ExitCode::from(exit.code()),
        Err(e) => exit_code(Err(e)),
    }
}

/// `retro-fleet queues | head`: a closed stdout ends a tool quietly, like
/// any Unix tool, instead of a panic. (SIGPIPE stays ignored: a dropped
/// NATS connection must be an error, not a silent death.)
fn quiet_broken_pipe() {
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

/// 0, or the error on stderr and 1.
fn exit_code(result: anyhow::Result<()>) -> std::process::ExitCode {
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// `retro-fleet model ...`: no runtime, no NATS.
fn model_tool(action: &ModelAction) -> anyhow::Result<()> {
    match action {
        ModelAction::Tiny { out, layers, hidden } => tools::model::tiny(out, *layers, *hidden),
        ModelAction::TinyLora { out, rank, seed } => tools::model::tiny_lora(out, *rank, *seed),
    }
}

/// A worker's messaging batches its socket writes on one thread (unless
/// `worker.threads` asks for more); an ingress runs `ingress.threads`
/// (default one per core); everything else one thread per core.
fn runtime_for(command: &Command, worker_threads: usize, ingress_threads: usize) -> tokio::runtime::Runtime {
    let threads = match command {
        Command::Worker { .. } => worker_threads.max(1),
        Command::Ingress { .. } => ingress_threads,
        _ => 0,
    };
    match threads {
        0 => tokio::runtime::Runtime::new(),
        1 => tokio::runtime::Builder::new_current_thread().enable_all().build(),
        n => tokio::runtime::Builder::new_multi_thread().worker_threads(n).enable_all().build(),
    }
    .expect("tokio runtime")
}

/// Runs a tool (any command that does not serve) to its end.
async fn run_tool(command: Command, config: retro_fleet::config::Config) -> anyhow::Result<()> {
    match command {
        Command::Workers { json, action: None } => tools::ops::workers(&config, json).await,
        Command::Workers { action: Some(action), .. } => tools::ops::workers_action(&config, action).await,
        Command::Queues { action } => tools::ops::queues(&config, action).await,
        Command::Usage { tenant, key, model, from, to, group_by, json } => {
            let group_by = retro_fleet::usage::Dim::parse_list(&group_by).map_err(anyhow::Error::msg)?;
            let q = retro_fleet::usage::Query { tenant, key, model, from, to, group_by };
            tools::ops::usage(&config, &q, json).await
        }
        Command::Topology { action: TopologyAction::Apply } => tools::ops::topology_apply(&config).await,
        Command::Topology { action: TopologyAction::Status } => tools::ops::topology_status(&config).await,
        Command::Cache { action: CacheAction::Warm { since, from_seq, timeout } } => {
            let since_ms = since.map(|age| retro_fleet_worker::unix_ms().saturating_sub(age.as_millis() as u64));
            let from = retro_fleet_worker::cache::warm::WarmFrom { since_ms, from_seq };
            tools::cache::warm(&config, from, std::time::Duration::from_secs(timeout)).await
        }
        Command::Cache { action: CacheAction::Purge { models } } => tools::cache::purge(&config, models).await,
        Command::Keys { action } => match action {
            KeysAction::Add { id, tenant, roles, max_priority, max_batch_priority, budget } => {
                let ceilings = (max_priority, max_batch_priority);
                tools::keys::add(&config, id, tenant, roles, ceilings, budget.budget()).await
            }
            KeysAction::Budget { id, budget } => tools::keys::set_budget(&config, id, budget.budget()).await,
            KeysAction::List => tools::keys::list(&config).await,
            KeysAction::Revoke { id } => tools::keys::revoke(&config, id).await,
        },
        Command::Tenants { action } => match action {
            TenantsAction::List => tools::tenants::list(&config).await,
            TenantsAction::Set { tenant, weight, budget } => {
                tools::tenants::set(&config, tenant, weight, budget.budget()).await
            }
        },
        Command::Submit { model, priority, max_tokens, timeout, prompt } => {
            tools::submit::submit(&config, model, priority, max_tokens, timeout, prompt).await
        }
        Command::Dlq { action } => match action {
            DlqAction::List { filter, limit } => {
                let filter = retro_fleet::ops::dlq::Filter::parse(&filter)?;
                tools::dlq::list(&config, &filter, limit).await
            }
            DlqAction::Show { seq } => tools::dlq::show(&config, seq).await,
            DlqAction::Replay { filter, limit, keep, dry_run } => {
                let filter = retro_fleet::ops::dlq::Filter::parse(&filter)?;
                tools::dlq::replay(&config, &filter, limit, keep, dry_run).await.map(|_| ())
            }
        },
        Command::Batch { action } => tools::batch::batch(&config, action).await,
        Command::Replay(args) => tools::replay::replay(&config, args).await,
        Command::Up { .. } | Command::Ingress { .. } | Command::Worker { .. } | Command::Scaler { .. } => {
            unreachable!("serving roles are run by main")
        }
        Command::Config { .. } | Command::Model { .. } => unreachable!("handled before the runtime starts"),
    }
}
