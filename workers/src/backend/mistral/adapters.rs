//! LoRA adapters: one pool of instances per adapter, each merged into a
//! copy of the base weights (see [`crate::lora`]).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use retro_fleet_schemas::{ErrorCode, InferRequest};

use super::load::{files_revision, not_mistral, pool, Shared};
use crate::backend::{Attempt, Backend, BackendError, Generating};
use crate::config::ModelConfig;
use crate::hub::{self, ModelSource};

/// The base model plus one instance set per LoRA adapter of `cfg`;
/// requests go to the instance of the adapter they name.
pub async fn with_adapters(
    name: &str,
    cfg: &ModelConfig,
    base: Arc<dyn Backend>,
    shared: &Shared<'_>,
) -> Result<Adapted, BackendError> {
    let ModelConfig::Mistralrs { path, gguf_file, adapters, .. } = cfg else { return Err(not_mistral(cfg)) };
    let fail = |message: String| BackendError { code: ErrorCode::Internal, message, retryable: false };
    if gguf_file.is_some() {
        return Err(fail(format!("model `{name}`: LoRA adapters need safetensors weights, not GGUF")));
    }
    let base_rev = base.revision().unwrap_or_default();
    let mut loaded = BTreeMap::new();
    let mut revisions = vec![base_rev.clone()];
    for (adapter, dir) in adapters {
        let rev = files_revision(dir).map_err(|e| fail(format!("adapter `{adapter}` at {}: {e}", dir.display())))?;
        let tag = rev.trim_start_matches("fnv1a64:").to_string();
        let base_tag =
            base_rev.trim_start_matches("fnv1a64:").chars().filter(|c| c.is_ascii_alphanumeric()).collect::<String>();
        let merged = std::env::temp_dir().join("retro-fleet-lora").join(format!("{name}-{adapter}-{base_tag}-{tag}"));
        if !merged.exists() {
            let base_dir = match hub::resolve(path).map_err(fail)? {
                ModelSource::Local(p) => p,
                ModelSource::Hub(id) => {
                    return Err(fail(format!(
                        "adapters of `{name}` need the files of `{id}` in the Hugging Face cache"
                    )))
                }
            };
            let (adapter_dir, out) = (dir.clone(), merged.clone());
            tokio::task::spawn_blocking(move || crate::lora::merge(&base_dir, &adapter_dir, &out))
                .await
                .map_err(|e| fail(format!("merging adapter `{adapter}`: {e}")))?
                .map_err(|e| fail(format!("adapter `{adapter}` of model `{name}`: {e}")))?;
        }
        let adapted = merged_model(cfg, merged, format!("{base_rev}+{adapter}:{tag}"));
        loaded.insert(adapter.clone(), pool(&format!("{name}+{adapter}"), &adapted, shared).await?);
        revisions.push(format!("{adapter}:{tag}"));
    }
    Ok(Adapted { base, adapters: loaded, revision: revisions.join("+") })
}

/// The model `cfg` with its weights read from `merged` and reporting
/// `revision`: the base's settings serve the merged copy.
fn merged_model(cfg: &ModelConfig, merged: PathBuf, revision: String) -> ModelConfig {
    let mut adapted = cfg.clone();
    if let ModelConfig::Mistralrs { path, revision: r, .. } = &mut adapted {
        (*path, *r) = (merged, Some(revision));
    }
    adapted
}

/// A model with LoRA adapters: the base and one backend per adapter.
pub struct Adapted {
    base: Arc<dyn Backend>,
    adapters: BTreeMap<String, Arc<dyn Backend>>,
    /// Base revision and every adapter's file hash: any change is a new revision.
    revision: String,
}

impl Backend for Adapted {
    fn revision(&self) -> Option<String> {
        Some(self.revision.clone())
    }

    fn adapters(&self) -> Vec<String> {
        self.adapters.keys().cloned().collect()
    }

    fn generate<'a>(&'a self, req: &'a InferRequest, attempt: Attempt) -> Generating<'a> {
        match req.adapter.as_deref() {
            None => self.base.generate(req, attempt),
            Some(a) => match self.adapters.get(a) {
                Some(b) => b.generate(req, attempt),
                None => {
                    let message = format!("no adapter `{a}`; adapters: {}", self.adapters().join(", "));
                    Box::pin(
                        async move { Err(BackendError { code: ErrorCode::InvalidRequest, message, retryable: false }) },
                    )
                }
            },
        }
    }
}
