//! Which embedder a worker runs (`worker.cache.semantic_embedder`).

use std::path::PathBuf;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::embedder::{EmbedError, Embedder};
use super::lexical::Lexical;

/// An embedder: `"lexical"`, or `{ path = "<sentence-transformers dir>" }`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum EmbedderConfig {
    /// One that needs no model.
    Builtin(Builtin),
    /// A sentence-transformers BERT from a local directory.
    Bert(BertConfig),
}

/// The embedders that need no model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Builtin {
    /// Hashed words and character trigrams.
    Lexical,
}

/// A sentence-transformers BERT (`config.json`, `model.safetensors`,
/// `tokenizer.json`, optionally `sentence_bert_config.json`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BertConfig {
    /// The model's directory.
    pub path: PathBuf,
}

impl Default for EmbedderConfig {
    fn default() -> Self {
        EmbedderConfig::Builtin(Builtin::Lexical)
    }
}

/// Loads the embedder `cfg` names.
pub fn load(cfg: &EmbedderConfig) -> Result<Arc<dyn Embedder>, EmbedError> {
    match cfg {
        EmbedderConfig::Builtin(Builtin::Lexical) => Ok(Arc::new(Lexical)),
        #[cfg(feature = "mistralrs")]
        EmbedderConfig::Bert(b) => Ok(Arc::new(super::bert::Bert::load(&b.path)?)),
        #[cfg(not(feature = "mistralrs"))]
        EmbedderConfig::Bert(b) => Err(EmbedError::Load {
            path: b.path.clone(),
            message: "this build has no BERT embedder (it comes with the `mistralrs` feature)".into(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Deserialize)]
    struct Holder {
        e: EmbedderConfig,
    }

    #[test]
    fn reads_both_forms() {
        let h: Holder = serde_json::from_str(r#"{"e": "lexical"}"#).unwrap();
        assert_eq!(h.e, EmbedderConfig::Builtin(Builtin::Lexical));
        let h: Holder = serde_json::from_str(r#"{"e": {"path": "/m"}}"#).unwrap();
        assert_eq!(h.e, EmbedderConfig::Bert(BertConfig { path: "/m".into() }));
        assert!(serde_json::from_str::<Holder>(r#"{"e": "word2vec"}"#).is_err());
        assert!(serde_json::from_str::<Holder>(r#"{"e": {"paht": "/m"}}"#).is_err());
    }
}
