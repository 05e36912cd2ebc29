//! The mistral.rs backend on the tiny generated model: sampling parameters
//! are honoured as named.

#![cfg(feature = "mistralrs")]

use std::sync::Arc;

use retro_fleet_schemas::{ChatMessage, InferRequest, Input, SamplingParams};
use retro_fleet_worker::backend::{self, Attempt, Backend};
use retro_fleet_worker::ModelConfig;

async fn tiny() -> (tempfile::TempDir, Arc<dyn Backend>) {
    let dir = tempfile::tempdir().unwrap();
    retro_fleet_worker::tiny_model::write(dir.path(), &Default::default()).unwrap();
    let cfg = ModelConfig::Mistralrs {
        path: dir.path().to_path_buf(),
        gguf_file: None,
        isq: None,
        max_num_seqs: 8,
        admission: Default::default(),
        gather_ms: 2,
        default_max_tokens: 16,
        instances: 1,
        warm_instances: 1,
        grow_at: None,
        idle_unload_secs: 0,
        balance: Default::default(),
        revision: None,
        adapters: Default::default(),
    };
    let b = backend::build(
        "tiny",
        &cfg,
        &retro_fleet_worker::breaker::Board::unregistered(Default::default()),
        &backend::pool::Budget::new(0),
    )
    .await
    .unwrap();
    (dir, b)
}

fn req(input: Input, params: SamplingParams) -> InferRequest {
    InferRequest {
        v: 1,
        id: "t".into(),
        model: "tiny".into(),
        adapter: None,
        input,
        params,
        stream: false,
        cache: Default::default(),
        tenant: None,
        metadata: Default::default(),
    }
}

fn completion(prompt: &str) -> Input {
    Input::Completion { prompt: prompt.into() }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_tokens_is_honoured_with_greedy_sampling() {
    let (_dir, b) = tiny().await;
    for n in [1u32, 5, 12] {
        let params = SamplingParams { max_tokens: Some(n), temperature: Some(0.0), ..Default::default() };
        let g = b.generate(&req(completion("hello"), params), Attempt::default()).await.unwrap();
        assert_eq!(g.usage.completion_tokens, n, "{g:?}");
        assert_eq!(g.finish_reason, "length");
        assert!(!g.text.is_empty());
    }
    let zero = SamplingParams { max_tokens: Some(0), ..Default::default() };
    let g = b.generate(&req(completion("hello"), zero), Attempt::default()).await.unwrap();
    assert_eq!((g.text.as_str(), g.usage.completion_tokens), ("", 0));
    // no max_tokens: the model's configured default applies, not its context length
    let g = b.generate(&req(completion("hello"), SamplingParams::default()), Attempt::default()).await.unwrap();
    assert_eq!(g.usage.completion_tokens, 16);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn greedy_and_seeded_sampling_are_reproducible() {
    let (_dir, b) = tiny().await;
    let run = |params: SamplingParams| {
        let b = b.clone();
        async move { b.generate(&req(completion("the fleet"), params), Attempt::default()).await.unwrap().text }
    };
    let greedy = SamplingParams { max_tokens: Some(20), temperature: Some(0.0), ..Default::default() };
    assert_eq!(run(greedy.clone()).await, run(greedy).await);
    let seeded =
        |seed| SamplingParams { max_tokens: Some(20), temperature: Some(1.0), seed: Some(seed), ..Default::default() };
    let a = run(seeded(7)).await;
    assert_eq!(a, run(seeded(7)).await, "same seed, same text");
    let others = [run(seeded(8)).await, run(seeded(9)).await, run(seeded(10)).await];
    assert!(others.iter().any(|o| *o != a), "different seeds sample differently");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_sequences_cut_the_text() {
    let (_dir, b) = tiny().await;
    let base = SamplingParams { max_tokens: Some(40), temperature: Some(0.0), ..Default::default() };
    let full = b.generate(&req(completion("abc"), base.clone()), Attempt::default()).await.unwrap().text;
    assert!(full.len() > 6, "{full:?}");
    // stop at a piece of the greedy output: the text ends right before it
    let stop: String = full.chars().skip(4).take(2).collect();
    let cut_at = full.find(&stop).unwrap();
    let params = SamplingParams { stop: vec![stop.clone()], ..base };
    let g = b.generate(&req(completion("abc"), params), Attempt::default()).await.unwrap();
    assert_eq!(g.text, full[..cut_at], "stop {stop:?} in {full:?}");
    assert_eq!(g.finish_reason, "stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_uses_the_template_and_streams_the_same_text() {
    let (_dir, b) = tiny().await;
    let input =
        Input::Chat { messages: vec![ChatMessage::text("system", "be brief"), ChatMessage::text("user", "hi")] };
    let params = SamplingParams { max_tokens: Some(10), temperature: Some(0.0), ..Default::default() };
    let plain = b.generate(&req(input.clone(), params.clone()), Attempt::default()).await.unwrap();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let streamed = b.generate(&req(input, params), Attempt::streaming(Some(tx))).await.unwrap();
    let mut deltas = String::new();
    while let Ok(d) = rx.try_recv() {
        deltas.push_str(&d);
    }
    assert_eq!(plain.text, streamed.text);
    assert_eq!(deltas, streamed.text, "deltas concatenate to the final text");
    assert!(plain.usage.prompt_tokens > 2, "the chat template was rendered: {:?}", plain.usage);
}

#[test]
fn the_revision_is_a_hash_of_the_files() {
    let a = tempfile::tempdir().unwrap();
    let b = tempfile::tempdir().unwrap();
    retro_fleet_worker::tiny_model::write(a.path(), &Default::default()).unwrap();
    retro_fleet_worker::tiny_model::write(b.path(), &Default::default()).unwrap();
    let ra = backend::mistral::files_revision(a.path()).unwrap();
    assert_eq!(ra, backend::mistral::files_revision(b.path()).unwrap(), "same files, same revision");
    let bigger = retro_fleet_worker::tiny_model::Tiny { layers: 3, ..Default::default() };
    retro_fleet_worker::tiny_model::write(b.path(), &bigger).unwrap();
    assert_ne!(ra, backend::mistral::files_revision(b.path()).unwrap());
}

/// Runs `r` with checkpoints after every token and returns the last one.
async fn last_checkpoint(b: &Arc<dyn Backend>, r: &InferRequest) -> backend::Checkpoint {
    let (tx, rx) = tokio::sync::watch::channel(None);
    let every = std::time::Duration::ZERO;
    let attempt = Attempt { checkpoints: Some(backend::Checkpointing { tx, every }), ..Default::default() };
    b.generate(r, attempt).await.unwrap();
    let c = rx.borrow().clone();
    c.expect("a checkpoint was sent")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resumed_generation_goes_on_exactly_where_the_checkpoint_was() {
    let (_dir, b) = tiny().await;
    for (temperature, seed) in [(Some(0.0), None), (Some(1.0), Some(7)), (Some(1.0), None)] {
        let input = Input::Chat { messages: vec![ChatMessage::text("user", "tell me")] };
        let whole = SamplingParams { max_tokens: Some(300), temperature, seed, ..Default::default() };
        let uninterrupted = b.generate(&req(input.clone(), whole.clone()), Attempt::default()).await.unwrap();
        // an attempt that got 120 tokens in, as if its worker died there
        let cut = SamplingParams { max_tokens: Some(121), ..whole.clone() };
        let mut c = last_checkpoint(&b, &req(input.clone(), cut)).await;
        // after every token but the last, until a piece is not ASCII (the
        // tiny model draws an invalid byte now and then)
        let n = c.generated.len();
        let ascii = uninterrupted.text.find(|ch: char| !ch.is_ascii()).unwrap_or(usize::MAX);
        assert_eq!(n, 120.min(ascii), "{:?}", uninterrupted.text);
        assert_eq!(c.text, uninterrupted.text[..c.text.len()], "the checkpoint's text is the start of the answer");
        c.max_tokens = 300;
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let resumed = Attempt { deltas: Some(tx), resume: Some(c), ..Default::default() };
        let g = b.generate(&req(input.clone(), whole), resumed).await.unwrap();
        assert_eq!(g.text, uninterrupted.text, "temperature {temperature:?}, seed {seed:?}");
        assert_eq!(g.usage, uninterrupted.usage, "usage counts the whole answer");
        assert_eq!(
            g.computed_tokens as usize,
            300 - (n - 1),
            "only the tokens after the checkpoint (and its last again)"
        );
        let mut deltas = String::new();
        while let Ok(d) = rx.try_recv() {
            deltas.push_str(&d);
        }
        assert_eq!(deltas, g.text, "the stream repeats the checkpoint's text, then goes on");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_past_the_context_is_refused_before_the_engine() {
    let (_dir, b) = tiny().await;
    let params = SamplingParams { max_tokens: Some(5000), ..Default::default() };
    let e = b.generate(&req(completion("hello"), params), Attempt::default()).await.unwrap_err();
    assert_eq!(e.code, retro_fleet_schemas::ErrorCode::ContextLengthExceeded);
    assert!(!e.retryable);
    assert!(e.message.contains("2048") && e.message.contains("5000"), "{}", e.message);
    // the budget left by a long prompt, when none is asked for
    let long = "x".repeat(2040);
    let g = b.generate(&req(completion(&long), SamplingParams::default()), Attempt::default()).await.unwrap();
    assert!(g.usage.prompt_tokens + g.usage.completion_tokens <= 2048, "{:?}", g.usage);
    let e = b.generate(&req(completion(&"x".repeat(2100)), SamplingParams::default()), Attempt::default()).await;
    assert_eq!(e.unwrap_err().code, retro_fleet_schemas::ErrorCode::ContextLengthExceeded);
}
