//! Configuration: built-in defaults < `retro-fleet.toml` (or `--config`) <
//! `FLEET_*` environment (`__` separates levels: `FLEET_WORKER__MAX_INFLIGHT`)
//! < command-line flags. Unknown keys are an error that names the key.

use std::path::{Path, PathBuf};

use figment::providers::{Env, Format, Serialized, Toml};
use figment::Figment;
use retro_fleet_worker::config::{default_models, Models, WorkerConfig};
use serde::{Deserialize, Serialize};

use crate::ingress::config::IngressConfig;
use crate::nats::NatsConfig;
use crate::scaler::Policy;
use crate::telemetry::{LogConfig, TelemetryConfig};
use crate::topology::TopologyConfig;

/// The whole configuration of a retro-fleet process.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// NATS connection.
    pub nats: NatsConfig,
    /// Where local state lives (the embedded nats-server store, caches).
    pub data_dir: PathBuf,
    /// Logging.
    pub log: LogConfig,
    /// Trace export.
    pub telemetry: TelemetryConfig,
    /// Where `worker` and `scaler` serve `/metrics` and `/health/*` (the
    /// ingress serves them on its own port). Unset: not served.
    pub metrics_listen: Option<String>,
    /// Streams, consumers and their limits.
    pub topology: TopologyConfig,
    /// HTTP ingress.
    pub ingress: IngressConfig,
    /// Worker.
    pub worker: WorkerConfig,
    /// The fleet's model catalogue, by name.
    pub models: Models,
    /// Scaling recommendations.
    pub scaler: Policy,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            nats: NatsConfig::default(),
            data_dir: PathBuf::from("data"),
            log: LogConfig::default(),
            telemetry: TelemetryConfig::default(),
            metrics_listen: Some("127.0.0.1:9091".into()),
            topology: TopologyConfig::default(),
            ingress: IngressConfig::default(),
            worker: WorkerConfig::default(),
            models: default_models(),
            scaler: Policy::default(),
        }
    }
}

/// Config file read when `--config` is not given and it exists.
pub const DEFAULT_FILE: &str = "retro-fleet.toml";

impl Config {
    /// Loads defaults < file < `FLEET_*` env (and `NATS_URL`) < `overrides`.
    /// `file` must exist when given; `retro-fleet.toml` is read if present.
    pub fn load(file: Option<&Path>, overrides: Figment) -> Result<Config, figment::Error> {
        // Models merge by name, so the built-in `echo` model is added only
        // when nothing else is configured (below), not merged into a catalogue.
        let defaults = Config { models: Models::new(), ..Config::default() };
        let mut fig = Figment::from(Serialized::defaults(defaults));
        match file {
            Some(path) => {
                if !path.exists() {
                    return Err(figment::Error::from(format!("config file `{}` does not exist", path.display())));
                }
                fig = fig.merge(Toml::file_exact(path));
            }
            None if Path::new(DEFAULT_FILE).exists() => fig = fig.merge(Toml::file_exact(DEFAULT_FILE)),
            None => {}
        }
        if let Ok(url) = std::env::var("NATS_URL") {
            fig = fig.merge(Serialized::default("nats.url", url));
        }
        fig = fig.merge(Env::prefixed("FLEET_").split("__").ignore(&["config", "api_key"]));
        let mut config: Config = fig.merge(overrides).extract()?;
        if config.models.is_empty() {
            config.models = default_models();
        }
        config.check().map_err(figment::Error::from)?;
        Ok(config)
    }

    /// Values the types admit but that cannot work, refused with the key and
    /// the range instead of hanging a worker or being quietly capped.
    fn check(&self) -> Result<(), String> {
        self.worker.check()?;
        self.telemetry.otlp.check()?;
        self.models.iter().try_for_each(|(name, model)| model.check(name))
    }

    /// This configuration with every secret replaced by `<redacted>`: API
    /// key hashes, JWT secrets, the user and password (or token) of NATS
    /// URLs, the path of the NATS credentials file and OTLP export headers.
    pub fn redacted(&self) -> Config {
        let mut c = self.clone();
        c.ingress.auth = c.ingress.auth.redacted();
        c.ingress.webhooks = c.ingress.webhooks.redacted();
        c.nats = c.nats.redacted();
        c.telemetry.otlp = c.telemetry.otlp.redacted();
        c
    }

    /// What `topology apply` lays out for this configuration.
    pub fn topology_plan(&self) -> crate::topology::Plan {
        crate::topology::Plan {
            topology: self.topology.clone(),
            models: self.models.keys().cloned().collect(),
            rate_limit_age_secs: self.ingress.rate_limit.max_age_secs(),
            claim_wait_ms: self.worker.cache.claim_wait_ms,
        }
    }

    /// The effective configuration as TOML.
    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).unwrap_or_else(|e| format!("# cannot render config: {e}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_extract() {
        figment::Jail::expect_with(|_| {
            let c = Config::load(None, Figment::new())?;
            assert_eq!(c, Config::default());
            Ok(())
        });
    }

    #[test]
    fn env_overrides_file_and_flags_override_env() {
        figment::Jail::expect_with(|jail| {
            jail.create_file(
                "f.toml",
                "[worker]\nmax_inflight = 7\nbatch_size = 3\n[ingress]\nlisten = \"0.0.0.0:1\"\n",
            )?;
            jail.set_env("FLEET_WORKER__MAX_INFLIGHT", "9");
            jail.set_env("FLEET_INGRESS__LISTEN", "0.0.0.0:2");
            let flags = Figment::from(Serialized::default("ingress.listen", "0.0.0.0:3"));
            let c = Config::load(Some(Path::new("f.toml")), flags)?;
            assert_eq!(c.worker.max_inflight, 9);
            assert_eq!(c.worker.batch_size, 3);
            assert_eq!(c.ingress.listen, "0.0.0.0:3");
            Ok(())
        });
    }

    #[test]
    fn unknown_keys_are_named() {
        figment::Jail::expect_with(|jail| {
            jail.create_file("f.toml", "[worker]\nmax_inflite = 7\n")?;
            let err = Config::load(Some(Path::new("f.toml")), Figment::new()).unwrap_err();
            assert!(err.to_string().contains("max_inflite"), "{err}");
            jail.create_file("g.toml", "colour = 1\n")?;
            let err = Config::load(Some(Path::new("g.toml")), Figment::new()).unwrap_err();
            assert!(err.to_string().contains("colour"), "{err}");
            Ok(())
        });
    }

    #[test]
    fn unknown_env_key_is_an_error() {
        figment::Jail::expect_with(|jail| {
            jail.set_env("FLEET_WORKER__BOGUS", "1");
            let err = Config::load(None, Figment::new()).unwrap_err();
            assert!(err.to_string().contains("bogus"), "{err}");
            Ok(())
        });
    }

    #[test]
    fn models_are_tagged_by_backend() {
        figment::Jail::expect_with(|jail| {
            jail.create_file(
                "m.toml",
                "[models.slow]\nbackend = \"synthetic\"\nlatency_ms = 20\n[models.echo]\nbackend = \"echo\"\n",
            )?;
            jail.create_file("only.toml", "[models.slow]\nbackend = \"synthetic\"\n")?;
            let only = Config::load(Some(Path::new("only.toml")), Figment::new())?;
            assert_eq!(only.models.keys().collect::<Vec<_>>(), ["slow"], "a catalogue replaces the built-in echo");
            let c = Config::load(Some(Path::new("m.toml")), Figment::new())?;
            assert_eq!(c.models.keys().collect::<Vec<_>>(), ["echo", "slow"]);
            Ok(())
        });
    }

    #[test]
    fn settings_that_cannot_work_are_refused_with_their_key() {
        figment::Jail::expect_with(|jail| {
            let cases = [
                ("[worker]\nmax_inflight = 0\n", "worker.max_inflight"),
                ("[worker]\nbatch_size = 0\n", "worker.batch_size"),
                ("[worker]\nlow_share = 0.8\n", "worker.low_share"),
                ("[worker]\nnormal_share = -0.1\n", "worker.normal_share"),
                ("[worker]\nstream_interval_ms = 10001\n", "worker.stream_interval_ms"),
                ("[models.m]\nbackend = \"mistralrs\"\npath = \"x\"\ngather_ms = 60000\n", "models.m.gather_ms"),
                ("[models.m]\nbackend = \"mistralrs\"\npath = \"x\"\nmax_num_seqs = 0\n", "models.m.max_num_seqs"),
            ];
            for (toml, key) in cases {
                jail.create_file("bad.toml", toml)?;
                let err = Config::load(Some(Path::new("bad.toml")), Figment::new()).unwrap_err();
                assert!(err.to_string().contains(key), "{toml}: {err}");
            }
            jail.create_file("edge.toml", "[worker]\nstream_interval_ms = 10000\nmax_inflight = 1\nbatch_size = 1\n")?;
            Config::load(Some(Path::new("edge.toml")), Figment::new())?;
            // gather_ms only paces cohorts: ignored, so not refused, without them
            let continuous =
                "[models.m]\nbackend = \"mistralrs\"\npath = \"x\"\nadmission = \"continuous\"\ngather_ms = 60000\n";
            jail.create_file("continuous.toml", continuous)?;
            Config::load(Some(Path::new("continuous.toml")), Figment::new())?;
            Ok(())
        });
    }

    use crate::nats::redact_url;

    #[test]
    fn urls_lose_their_credentials() {
        assert_eq!(redact_url("nats://127.0.0.1:4222"), "nats://127.0.0.1:4222");
        assert_eq!(redact_url("nats://u:p4ss@h:1"), "nats://<redacted>@h:1");
        assert_eq!(redact_url("tls://s3cr3t-token@h:1, nats://h2:2"), "tls://<redacted>@h:1, nats://h2:2");
        assert_eq!(redact_url("u:p@h:1"), "nats://<redacted>@h:1");
        let mut c = Config::default();
        c.nats.url = "nats://u:p4ss@h:1".into();
        c.nats.credentials = Some("/etc/nats/secret.creds".into());
        (c.nats.user, c.nats.password, c.nats.token) = (Some("u".into()), Some("pw-9".into()), Some("tok-7".into()));
        let shown = c.redacted().to_toml();
        for secret in ["p4ss", "secret.creds", "pw-9", "tok-7"] {
            assert!(!shown.contains(secret), "{shown}");
        }
    }

    #[test]
    fn missing_file_is_an_error() {
        let err = Config::load(Some(Path::new("/nonexistent/x.toml")), Figment::new()).unwrap_err();
        assert!(err.to_string().contains("does not exist"));
    }

    #[test]
    fn example_config_matches_defaults() {
        let example = retro_fleet_testkit::package_dir().join("deploy/retro-fleet.example.toml");
        let c = Config::load(Some(&example), Figment::new()).unwrap();
        assert_eq!(c, Config::default(), "deploy/retro-fleet.example.toml documents every default");
    }
}
