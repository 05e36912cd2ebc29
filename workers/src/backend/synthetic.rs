//! The synthetic backend: a fixed latency per request and fixed output,
//! so scaling can be measured without a model (it sleeps; it does not burn CPU).

use std::time::Duration;

use futures::future::BoxFuture;
use retro_fleet_schemas::{InferRequest, Usage};
use tokio::sync::Semaphore;

use super::{limit_words, Backend, BackendError, DeltaSender, Generation};

/// Sleeps `latency`, then answers `output_tokens` words; at most
/// `concurrency` requests run at once per worker.
pub struct Synthetic {
    latency: Duration,
    output_tokens: u32,
    slots: Option<Semaphore>,
    revision: Option<String>,
}

impl Synthetic {
    /// A synthetic backend.
    pub fn new(latency: Duration, output_tokens: u32, concurrency: Option<usize>, revision: Option<String>) -> Self {
        Synthetic { latency, output_tokens, slots: concurrency.map(Semaphore::new), revision }
    }
}

impl Backend for Synthetic {
    fn revision(&self) -> Option<String> {
        self.revision.clone()
    }

    fn generate<'a>(
        &'a self,
        req: &'a InferRequest,
        deltas: Option<DeltaSender>,
    ) -> BoxFuture<'a, Result<Generation, BackendError>> {
        Box::pin(async move {
            let _slot = match &self.slots {
                Some(s) => Some(s.acquire().await.expect("semaphore never closed")),
                None => None,
            };
            tokio::time::sleep(self.latency).await;
            let n = req.params.max_tokens.unwrap_or(self.output_tokens).min(self.output_tokens.max(1) * 64);
            let words: Vec<&str> = std::iter::repeat_n("token", n as usize).collect();
            let (text, finish_reason) = limit_words(&words, req.params.max_tokens, &req.params.stop);
            if let Some(tx) = deltas {
                super::echo::send_words(&tx, &text);
            }
            let prompt_tokens = req.input.text_len().div_ceil(4) as u32;
            Ok(Generation {
                text,
                finish_reason,
                usage: Usage { prompt_tokens, completion_tokens: n, total_tokens: prompt_tokens + n },
            })
        })
    }
}
