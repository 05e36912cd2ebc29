//! Logs and metrics setup: one Prometheus registry per process, JSON logs in
//! production and pretty logs on a terminal.

use std::io::IsTerminal;

use prometheus::{Encoder, Registry, TextEncoder};
use tracing_subscriber::EnvFilter;

use serde::{Deserialize, Serialize};

/// Log settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// `auto` (pretty in a terminal, JSON otherwise), `json` or `pretty`.
    pub format: LogFormat,
    /// `tracing` filter, e.g. `info` or `retro_fleet=debug,info`. `RUST_LOG` wins.
    pub level: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig { format: LogFormat::Auto, level: "info".into() }
    }
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    /// Pretty on a terminal, JSON otherwise.
    Auto,
    /// One JSON object per line.
    Json,
    /// Human-readable.
    Pretty,
}

/// Libraries whose `info` lines are their internals (mistral.rs loader
/// steps, dtypes and layer maps; the cache's block recovery; the NATS
/// client's own connect lines, which the roles already say in their words): kept at `warn` unless the level
/// names them or asks for `debug`/`trace`.
const ENGINE_TARGETS: &[&str] = &[
    "mistralrs",
    "mistralrs_core",
    "mistralrs_quant",
    "mistralrs_paged_attn",
    "mistralrs_vision",
    "mistralrs_audio",
    "candle_core",
    "candle_nn",
    "hf_hub",
    "tokenizers",
    "foyer",
    "foyer_common",
    "foyer_memory",
    "foyer_storage",
    "async_nats",
];

/// The filter directives for the configured `level`: the level itself,
/// plus `warn` for the engine libraries unless it names them or is verbose.
pub fn directives(level: &str) -> String {
    let verbose = ["debug", "trace"].iter().any(|v| level.contains(v));
    let mut out = level.trim().to_string();
    for target in ENGINE_TARGETS {
        if !verbose && !level.contains(target) {
            out.push_str(&format!(",{target}=warn"));
        }
    }
    out
}

/// Installs the global subscriber. `RUST_LOG` replaces the configured
/// level (and the engine defaults) entirely.
pub fn init_logs(cfg: &LogConfig) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(directives(&cfg.level)));
    let json = match cfg.format {
        LogFormat::Json => true,
        LogFormat::Pretty => false,
        LogFormat::Auto => !std::io::stderr().is_terminal(),
    };
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    let _ = if json { builder.json().flatten_event(true).try_init() } else { builder.compact().try_init() };
}

/// The process's registry, with the `fleet_` prefix on every metric.
pub fn registry() -> Registry {
    Registry::new()
}

/// Text exposition of `registry`.
pub fn render(registry: &Registry) -> String {
    let mut buf = Vec::new();
    TextEncoder::new().encode(&registry.gather(), &mut buf).expect("text encoding of metrics");
    String::from_utf8(buf).expect("metrics are UTF-8")
}

#[cfg(test)]
mod tests {
    use super::directives;

    #[test]
    fn engine_internals_stay_at_warn_unless_asked_for() {
        let d = directives("info");
        assert!(d.starts_with("info,") && d.contains("mistralrs_core=warn"), "{d}");
        assert!(!directives("debug").contains("=warn"), "a verbose level shows everything");
        let named = directives("info,mistralrs_core=info");
        assert!(!named.contains("mistralrs_core=warn") && named.contains("candle_core=warn"), "{named}");
    }
}
