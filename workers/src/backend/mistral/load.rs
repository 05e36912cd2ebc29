//! Loading a mistral.rs model: one instance from its configuration, and the
//! pool of a model's instances.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use mistralrs::{GgufModelBuilder, ModelDType, TextModelBuilder, TokenSource};
use retro_fleet_schemas::ErrorCode;

use super::engine::Mistral;
use super::stream::backend_err;
use crate::backend::cohort::{Admission, Gate};
use crate::backend::pool::{Budget, LoadOn, Loader, Pool, PoolSpec};
use crate::backend::{Backend, BackendError};
use crate::breaker::Board;
use crate::config::ModelConfig;
use crate::hub::{self, ModelSource};

/// The error for a configuration of another backend.
pub(super) fn not_mistral(cfg: &ModelConfig) -> BackendError {
    BackendError { code: ErrorCode::Internal, message: format!("not a mistral.rs model: {cfg:?}"), retryable: false }
}

fn internal(message: String) -> BackendError {
    BackendError { code: ErrorCode::Internal, message, retryable: false }
}

impl Mistral {
    /// Loads one instance of the model `cfg` describes; `waiting` counts
    /// requests queued for its engine (cohort admission).
    pub async fn load(cfg: &ModelConfig, waiting: Option<prometheus::IntGauge>) -> Result<Mistral, BackendError> {
        let ModelConfig::Mistralrs {
            path,
            gguf_file,
            isq,
            max_num_seqs,
            admission,
            gather_ms,
            default_max_tokens,
            revision,
            ..
        } = cfg
        else {
            return Err(not_mistral(cfg));
        };
        let (dir, token) = match hub::resolve(path) {
            Ok(ModelSource::Local(p)) => (p.to_string_lossy().to_string(), TokenSource::None),
            Ok(ModelSource::Hub(id)) => {
                tracing::info!(model = %id, "fetching from the Hugging Face hub (HF_TOKEN used if set)");
                (id, TokenSource::CacheToken)
            }
            Err(message) => return Err(internal(message)),
        };
        let model = match gguf_file {
            Some(file) => {
                GgufModelBuilder::new(&dir, vec![file.clone()])
                    .with_force_cpu_if_no_cuda()
                    .with_token_source(token.clone())
                    .with_max_num_seqs(*max_num_seqs)
                    .build()
                    .await
            }
            None => {
                let mut b = TextModelBuilder::new(&dir)
                    .with_force_cpu_if_no_cuda()
                    .with_dtype(ModelDType::F32)
                    .with_token_source(token.clone())
                    .with_max_num_seqs(*max_num_seqs);
                if let Some(isq) = isq {
                    let t = mistralrs::parse_isq_value(isq, None).map_err(|e| internal(format!("isq `{isq}`: {e}")))?;
                    b = b.with_isq(t);
                }
                b.build().await
            }
        }
        .map_err(|e| internal(format!("loading {dir}: {e}")))?;
        let revision = match revision {
            Some(r) => r.clone(),
            None if Path::new(&dir).exists() => {
                files_revision(Path::new(&dir)).map_err(|e| backend_err(format!("hashing {dir}: {e}")))?
            }
            None => format!("hub:{dir}"),
        };
        let gate = (*admission == Admission::Cohort)
            .then(|| Gate::new(*max_num_seqs, Duration::from_millis(*gather_ms), waiting));
        // a model without a known context is left to the engine's own checks
        let context = model.max_sequence_length().ok().flatten();
        let tools = super::context::shows_tools(&model).await;
        let vocab = super::logprobs::vocab(Path::new(&dir));
        Ok(Mistral { model, gate, revision, default_max_tokens: *default_max_tokens, context, tools, vocab })
    }
}

/// What a pool of mistral.rs instances shares with every other model of
/// the worker.
pub struct Shared<'a> {
    /// The worker's memory budget.
    pub budget: &'a Arc<Budget>,
    /// The board of every instance's breaker.
    pub breakers: &'a Board,
    /// Where instances load.
    pub load_on: &'a LoadOn,
}

/// The pool of the instances of the model `cfg` describes.
pub async fn pool(name: &str, cfg: &ModelConfig, shared: &Shared<'_>) -> Result<Arc<dyn Backend>, BackendError> {
    let ModelConfig::Mistralrs {
        path,
        max_num_seqs,
        instances,
        warm_instances,
        grow_at,
        idle_unload_secs,
        balance,
        revision,
        ..
    } = cfg
    else {
        return Err(not_mistral(cfg));
    };
    let (revision, bytes) = match hub::resolve(path) {
        Ok(ModelSource::Local(dir)) => {
            let rev = match revision {
                Some(r) => Some(r.clone()),
                None => Some(files_revision(&dir).map_err(|e| backend_err(format!("hashing {}: {e}", dir.display())))?),
            };
            (rev, weight_bytes(&dir))
        }
        _ => (revision.clone(), 0),
    };
    let spec = PoolSpec {
        max: *instances,
        warm: *warm_instances,
        grow_at: grow_at.unwrap_or(*max_num_seqs),
        idle_unload: (*idle_unload_secs > 0).then(|| Duration::from_secs(*idle_unload_secs)),
        probe_after: Duration::from_secs(60),
        balance: *balance,
        bytes,
        revision,
    };
    let (owned, waiting) = (Arc::new(cfg.clone()), shared.budget.waiting_gauge(name));
    let loader: Loader = Arc::new(move || {
        let (cfg, waiting) = (owned.clone(), waiting.clone());
        Box::pin(async move { Ok(Arc::new(Mistral::load(&cfg, waiting).await?) as Arc<dyn Backend>) })
    });
    let (load_on, budget) = (shared.load_on.clone(), shared.budget.clone());
    let pool = Pool::build(name, spec, loader, load_on, budget, Some(shared.breakers)).await?;
    tracing::info!(model = name, path = %path.display(), "model ready");
    Ok(pool)
}

/// Bytes of the weight files under `path` (the budget's estimate of an instance).
fn weight_bytes(path: &Path) -> u64 {
    let files: Vec<PathBuf> = if path.is_dir() {
        std::fs::read_dir(path).into_iter().flatten().flatten().map(|e| e.path()).collect()
    } else {
        vec![path.to_path_buf()]
    };
    files
        .iter()
        .filter(|p| matches!(p.extension().and_then(|e| e.to_str()), Some("safetensors" | "gguf")))
        .filter_map(|p| std::fs::metadata(p).ok())
        .map(|m| m.len())
        .sum()
}

trait ForceCpu {
    fn with_force_cpu_if_no_cuda(self) -> Self;
}

impl ForceCpu for TextModelBuilder {
    fn with_force_cpu_if_no_cuda(self) -> Self {
        if cfg!(feature = "cuda") {
            self
        } else {
            self.with_force_cpu()
        }
    }
}

impl ForceCpu for GgufModelBuilder {
    fn with_force_cpu_if_no_cuda(self) -> Self {
        if cfg!(feature = "cuda") {
            self
        } else {
            self.with_force_cpu()
        }
    }
}

/// `fnv1a64:<hex>` over the small files of a model directory in full and,
/// for weight files, their size and first and last MiB (hashing gigabytes at
/// every start would cost seconds; a changed weight file changes its size or
/// its header in practice). Stable across platforms and Rust versions.
pub fn files_revision(dir: &Path) -> std::io::Result<String> {
    const FNV_OFFSET: u64 = 0xcbf29ce484222325;
    const FNV_PRIME: u64 = 0x100000001b3;
    let mut h = FNV_OFFSET;
    let mut feed = |bytes: &[u8]| {
        for b in bytes {
            h ^= *b as u64;
            h = h.wrapping_mul(FNV_PRIME);
        }
    };
    let mut names: Vec<PathBuf> = if dir.is_dir() {
        std::fs::read_dir(dir)?.filter_map(|e| e.ok().map(|e| e.path())).filter(|p| p.is_file()).collect()
    } else {
        vec![dir.to_path_buf()]
    };
    names.sort();
    for path in names {
        let name = path.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_default();
        feed(name.as_bytes());
        let len = std::fs::metadata(&path)?.len();
        feed(&len.to_le_bytes());
        if len <= 4 << 20 {
            feed(&std::fs::read(&path)?);
        } else {
            use std::io::{Read, Seek, SeekFrom};
            let mut f = std::fs::File::open(&path)?;
            let mut buf = vec![0u8; 1 << 20];
            f.read_exact(&mut buf)?;
            feed(&buf);
            f.seek(SeekFrom::End(-(1 << 20)))?;
            f.read_exact(&mut buf)?;
            feed(&buf);
        }
    }
    Ok(format!("fnv1a64:{h:016x}"))
}
