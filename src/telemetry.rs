//! Logs, metrics and traces setup: one Prometheus registry per process,
//! JSON logs in production and pretty logs on a terminal, and OTLP export
//! of the request spans (`retro_fleet_worker::trace`) when configured.

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

/// Trace export settings (`[telemetry]`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TelemetryConfig {
    /// OTLP export of traces.
    pub otlp: OtlpConfig,
}

/// OTLP export of traces, over HTTP/protobuf (`[telemetry.otlp]`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OtlpConfig {
    /// The collector: its base URL (`http://otel-collector:4318`; spans go
    /// to `/v1/traces` under it) or the whole traces URL. Empty: no export
    /// (and no exporter: the `OTEL_*` environment is not read).
    pub endpoint: String,
    /// Headers sent with every export, such as a vendor's API key (secret:
    /// shown redacted).
    pub headers: std::collections::BTreeMap<String, String>,
    /// Fraction of new traces kept, 0 to 1. A request that arrives with a
    /// `traceparent` follows its sampled flag instead.
    pub sampling_ratio: f64,
    /// `service.name` of the spans; unset: `retro-fleet-<role>`. Set it per
    /// role with `FLEET_TELEMETRY__OTLP__SERVICE_NAME`.
    pub service_name: Option<String>,
    /// Most time one export may take, ms.
    pub timeout_ms: u64,
}

impl Default for OtlpConfig {
    fn default() -> Self {
        OtlpConfig {
            endpoint: String::new(),
            headers: Default::default(),
            sampling_ratio: 1.0,
            service_name: None,
            timeout_ms: 5000,
        }
    }
}

impl OtlpConfig {
    /// Values that cannot work, named with their key.
    pub fn check(&self) -> Result<(), String> {
        if !(0.0..=1.0).contains(&self.sampling_ratio) {
            return Err(format!("telemetry.otlp.sampling_ratio = {}: must be within 0..=1", self.sampling_ratio));
        }
        let e = &self.endpoint;
        for (name, value) in &self.headers {
            let valid = axum::http::HeaderName::try_from(name.as_str()).is_ok()
                && axum::http::HeaderValue::try_from(value.as_str()).is_ok();
            if !valid {
                return Err(format!("telemetry.otlp.headers: `{name}` is not a valid HTTP header name and value"));
            }
        }
        if !e.is_empty() && !(e.starts_with("http://") || e.starts_with("https://")) {
            return Err(format!(
                "telemetry.otlp.endpoint = {e:?}: an http:// or https:// URL of an OTLP/HTTP collector \
                 (such as http://localhost:4318)"
            ));
        }
        Ok(())
    }

    /// This configuration with header values, and credentials in the
    /// endpoint (`user:password@`), replaced by `<redacted>`.
    pub fn redacted(&self) -> OtlpConfig {
        let headers = self.headers.keys().map(|k| (k.clone(), crate::nats::REDACTED.to_string())).collect();
        OtlpConfig { headers, endpoint: crate::nats::redact_url(&self.endpoint), ..self.clone() }
    }

    /// Where spans are sent.
    fn traces_url(&self) -> String {
        match self.endpoint.trim_end_matches('/') {
            e if e.ends_with("/v1/traces") => e.to_string(),
            e => format!("{e}/v1/traces"),
        }
    }
}

/// Spans export until [`Traces::shutdown`], which sends what is left.
pub struct Traces(opentelemetry_sdk::trace::SdkTracerProvider);

impl Traces {
    /// Sends the spans not yet exported (waiting at most two seconds: a
    /// collector that is gone does not hold the process).
    pub fn shutdown(self) {
        if let Err(e) = self.0.shutdown_with_timeout(std::time::Duration::from_secs(2)) {
            tracing::warn!(error = %e, "the last spans were not exported");
        }
    }
}

/// Installs the trace exporter of `role` when `cfg` names a collector, as
/// the provider every span of the process goes to. Call it outside the
/// async runtime (the exporter's HTTP client has its own thread).
pub fn init_traces(cfg: &OtlpConfig, role: &str) -> anyhow::Result<Option<Traces>> {
    use opentelemetry_otlp::{WithExportConfig, WithHttpConfig};
    use opentelemetry_sdk::trace::{Sampler, SdkTracerProvider};
    if cfg.endpoint.is_empty() {
        return Ok(None);
    }
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_protocol(opentelemetry_otlp::Protocol::HttpBinary)
        .with_endpoint(cfg.traces_url())
        .with_timeout(std::time::Duration::from_millis(cfg.timeout_ms.max(1)))
        .with_headers(cfg.headers.clone().into_iter().collect())
        .build()
        .map_err(|e| {
            anyhow::anyhow!("telemetry.otlp: cannot build the exporter: {}", crate::nats::redact_url(&e.to_string()))
        })?;
    let service = cfg.service_name.clone().unwrap_or_else(|| format!("retro-fleet-{role}"));
    let provider = SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_sampler(Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(cfg.sampling_ratio))))
        .with_resource(opentelemetry_sdk::Resource::builder().with_service_name(service.clone()).build())
        .build();
    opentelemetry::global::set_tracer_provider(provider.clone());
    let shown = crate::nats::redact_url(&cfg.traces_url());
    tracing::info!(endpoint = %shown, service = %service, ratio = cfg.sampling_ratio, "exporting traces over OTLP");
    Ok(Some(Traces(provider)))
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
    use super::{directives, OtlpConfig};

    #[test]
    fn an_otlp_endpoint_is_a_base_url_or_the_traces_url() {
        let at = |endpoint: &str| OtlpConfig { endpoint: endpoint.into(), ..Default::default() };
        assert_eq!(at("http://c:4318").traces_url(), "http://c:4318/v1/traces");
        assert_eq!(at("http://c:4318/").traces_url(), "http://c:4318/v1/traces");
        assert_eq!(at("https://c/otlp/v1/traces").traces_url(), "https://c/otlp/v1/traces");
        assert!(at("c:4317").check().unwrap_err().contains("telemetry.otlp.endpoint"));
        let ratio = OtlpConfig { sampling_ratio: 1.5, ..Default::default() };
        assert!(ratio.check().unwrap_err().contains("sampling_ratio"));
        let keyed = OtlpConfig { headers: [("x-key".into(), "s3cret".into())].into(), ..Default::default() };
        assert!(!format!("{:?}", keyed.redacted()).contains("s3cret"));
        let inline = at("https://user:s3cret@c:4318");
        assert_eq!(inline.redacted().endpoint, "https://<redacted>@c:4318");
        let bad = OtlpConfig { headers: [("x key".into(), "v".into())].into(), ..Default::default() };
        assert!(bad.check().unwrap_err().contains("`x key`"));
    }

    #[test]
    fn engine_internals_stay_at_warn_unless_asked_for() {
        let d = directives("info");
        assert!(d.starts_with("info,") && d.contains("mistralrs_core=warn"), "{d}");
        assert!(!directives("debug").contains("=warn"), "a verbose level shows everything");
        let named = directives("info,mistralrs_core=info");
        assert!(!named.contains("mistralrs_core=warn") && named.contains("candle_core=warn"), "{named}");
    }
}
