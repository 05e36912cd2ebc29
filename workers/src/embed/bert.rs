//! A sentence-transformers BERT run in process with candle: tokenise
//! (padding to the longest text of a batch, truncating at the model's
//! `max_seq_length`), run the encoder, mean-pool the token vectors under
//! the attention mask, and L2-normalise — what sentence-transformers does
//! for all-MiniLM-L6-v2 and its kin.

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::bert::{BertModel, Config, DTYPE};
use tokenizers::{PaddingParams, PaddingStrategy, Tokenizer, TruncationParams};

use super::embedder::{EmbedError, Embedded, Embedder};

/// Tokens per text when the directory does not say (`sentence_bert_config.json`).
const DEFAULT_MAX_SEQ: usize = 256;

/// A BERT sentence embedder.
pub struct Bert {
    model: BertModel,
    tokenizer: Tokenizer,
    name: String,
    dim: usize,
}

impl Bert {
    /// Loads the model in `dir`.
    pub fn load(dir: &Path) -> Result<Bert, EmbedError> {
        let fail = |message: String| EmbedError::Load { path: dir.to_path_buf(), message };
        let read =
            |name: &str| std::fs::read_to_string(dir.join(name)).map_err(|e| fail(format!("reading {name}: {e}")));
        let config: Config =
            serde_json::from_str(&read("config.json")?).map_err(|e| fail(format!("config.json: {e}")))?;
        let max_seq = std::fs::read_to_string(dir.join("sentence_bert_config.json"))
            .ok()
            .and_then(|s| serde_json::from_str::<serde_json::Value>(&s).ok())
            .and_then(|v| v["max_seq_length"].as_u64())
            .map_or(DEFAULT_MAX_SEQ, |n| n as usize)
            .min(config.max_position_embeddings);
        let mut tokenizer =
            Tokenizer::from_file(dir.join("tokenizer.json")).map_err(|e| fail(format!("tokenizer.json: {e}")))?;
        tokenizer.with_padding(Some(PaddingParams { strategy: PaddingStrategy::BatchLongest, ..Default::default() }));
        tokenizer
            .with_truncation(Some(TruncationParams { max_length: max_seq, ..Default::default() }))
            .map_err(|e| fail(format!("tokenizer truncation: {e}")))?;
        let weights = dir.join("model.safetensors");
        if !weights.is_file() {
            return Err(fail("no model.safetensors".into()));
        }
        // SAFETY: the weights are memory-mapped read-only; the file must not
        // change while the worker runs (as for every model it serves).
        let vb = unsafe { VarBuilder::from_mmaped_safetensors(&[weights], DTYPE, &Device::Cpu) }
            .map_err(|e| fail(format!("model.safetensors: {e}")))?;
        let model = BertModel::load(vb, &config).map_err(|e| fail(format!("model.safetensors: {e}")))?;
        let name = dir.file_name().map_or_else(|| "bert".into(), |n| n.to_string_lossy().into_owned());
        tracing::info!(embedder = %name, dim = config.hidden_size, max_seq, "sentence embedder loaded");
        Ok(Bert { model, tokenizer, name, dim: config.hidden_size })
    }

    fn run(&self, texts: &[&str]) -> Result<Embedded, String> {
        let encodings = self.tokenizer.encode_batch(texts.to_vec(), true).map_err(|e| e.to_string())?;
        let tokens = encodings.iter().map(|e| e.get_attention_mask().iter().filter(|m| **m == 1).count()).sum();
        let rows = |f: &dyn Fn(&tokenizers::Encoding) -> &[u32]| -> candle_core::Result<Tensor> {
            let rows = encodings.iter().map(|e| Tensor::new(f(e), &Device::Cpu)).collect::<Result<Vec<_>, _>>()?;
            Tensor::stack(&rows, 0)
        };
        let ids = rows(&|e| e.get_ids()).map_err(|e| e.to_string())?;
        let types = rows(&|e| e.get_type_ids()).map_err(|e| e.to_string())?;
        let mask = rows(&|e| e.get_attention_mask()).map_err(|e| e.to_string())?;
        let pooled = (|| {
            let tokens = self.model.forward(&ids, &types, Some(&mask))?;
            let mask = mask.to_dtype(DType::F32)?.unsqueeze(2)?;
            let sum = tokens.broadcast_mul(&mask)?.sum(1)?;
            let mean = sum.broadcast_div(&mask.sum(1)?.clamp(1e-9, f64::MAX)?)?;
            let norm = mean.sqr()?.sum_keepdim(1)?.sqrt()?.clamp(1e-12, f64::MAX)?;
            mean.broadcast_div(&norm)?.to_vec2::<f32>()
        })();
        Ok(Embedded { vectors: pooled.map_err(|e| e.to_string())?, tokens })
    }
}

impl Embedder for Bert {
    fn name(&self) -> &str {
        &self.name
    }

    fn dim(&self) -> usize {
        self.dim
    }

    fn embed(&self, texts: &[&str]) -> Result<Embedded, EmbedError> {
        if texts.is_empty() {
            return Ok(Embedded { vectors: Vec::new(), tokens: 0 });
        }
        self.run(texts).map_err(EmbedError::Run)
    }

    fn default_threshold(&self) -> f64 {
        0.975
    }
}
