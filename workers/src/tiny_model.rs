//! A tiny random-weights Llama model that mistral.rs loads: the demo model of
//! `retro-fleet up` and the model of every test. Nothing is downloaded.
//!
//! What mistral.rs 0.8.1 needs, as read in its sources:
//! - `config.json` with `architectures: ["LlamaForCausalLM"]` and the Llama
//!   fields (hidden/intermediate sizes, layers, heads, kv heads, vocab size,
//!   rms eps, rope theta, max positions); head size = hidden / heads, even.
//! - tensors `model.embed_tokens.weight`, `model.norm.weight`, `lm_head.weight`
//!   and per layer the attention and MLP projections ([out, in], no biases).
//! - `tokenizer.json` whose `model.vocab` is a map and whose decoder is
//!   ByteLevel (the grammar library refuses others): a byte-level BPE with
//!   the 256 byte tokens plus `<s>` and `</s>`.
//! - `tokenizer_config.json` whose `eos_token` is in the vocabulary, with a
//!   `chat_template` for chat requests (showing tools, unless `tools` is
//!   off).
//!
//! Only the printable-ASCII rows of `lm_head` are non-zero, so output is
//! always printable text and the end token is practically never chosen:
//! `max_tokens` decides the length. Weights come from a fixed LCG, so the
//! same sizes always give the same model (and the same revision).

use std::path::Path;

use serde_json::json;

/// Sizes of the tiny model.
#[derive(Debug, Clone)]
pub struct Tiny {
    /// Hidden size.
    pub hidden: usize,
    /// MLP size.
    pub inter: usize,
    /// Decoder layers.
    pub layers: usize,
    /// Attention heads.
    pub heads: usize,
    /// Key/value heads.
    pub kv_heads: usize,
    /// Longest sequence (prompt + output) in tokens.
    pub max_pos: usize,
    /// Whether the chat template shows tools and tool calls to the model.
    pub tools: bool,
}

/// A chat template that writes each message as `role: content`.
const TEMPLATE: &str = "{{ bos_token }}{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}";

/// [`TEMPLATE`] with the tools first, and each message's tool calls.
const TOOLS_TEMPLATE: &str = "{{ bos_token }}{% if tools %}tools: {{ tools | tojson }}\n{% endif %}{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}{% if m['tool_calls'] %} calls {{ m['tool_calls'] | tojson }}{% endif %}\n{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}";

impl Default for Tiny {
    fn default() -> Self {
        Tiny { hidden: 64, inter: 128, layers: 2, heads: 4, kv_heads: 2, max_pos: 2048, tools: true }
    }
}

fn io_err(e: impl std::fmt::Debug) -> std::io::Error {
    std::io::Error::other(format!("{e:?}"))
}

/// GPT-2 byte->char table (same as tokenizers-0.21.4/src/pre_tokenizers/byte_level.rs:15-45).
fn byte_chars() -> Vec<char> {
    let mut bs: Vec<u32> = (b'!' as u32..=b'~' as u32).chain(0xA1..=0xAC).chain(0xAE..=0xFF).collect();
    let mut cs = bs.clone();
    let mut n = 0;
    for b in 0..=255u32 {
        if !bs.contains(&b) {
            bs.push(b);
            cs.push(256 + n);
            n += 1;
        }
    }
    let mut out = vec![' '; 256];
    for (b, c) in bs.into_iter().zip(cs) {
        out[b as usize] = char::from_u32(c).unwrap();
    }
    out
}

/// Writes the model files into `dir` (created if needed).
pub fn write(dir: &Path, t: &Tiny) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    // vocab: 0 "<s>", 1 "</s>", 2+b = byte b  -> 258 tokens
    let chars = byte_chars();
    let mut vocab = serde_json::Map::new();
    vocab.insert("<s>".into(), json!(0));
    vocab.insert("</s>".into(), json!(1));
    for (b, c) in chars.iter().enumerate() {
        vocab.insert(c.to_string(), json!(b + 2));
    }
    let vocab_size = 258;
    let added = |id: u32, s: &str| {
        json!({"id": id, "content": s, "single_word": false, "lstrip": false,
        "rstrip": false, "normalized": false, "special": true})
    };
    let tok = json!({
        "version": "1.0", "truncation": null, "padding": null,
        "added_tokens": [added(0, "<s>"), added(1, "</s>")],
        "normalizer": null,
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true},
        "post_processor": null,
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                  "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false,
                  "ignore_merges": false, "vocab": vocab, "merges": []}
    });
    std::fs::write(dir.join("tokenizer.json"), serde_json::to_vec_pretty(&tok).map_err(io_err)?)?;
    std::fs::write(
        dir.join("tokenizer_config.json"),
        serde_json::to_vec_pretty(&json!({
            "bos_token": "<s>", "eos_token": "</s>", "model_max_length": t.max_pos,
            "tokenizer_class": "PreTrainedTokenizerFast",
            "chat_template": if t.tools { TOOLS_TEMPLATE } else { TEMPLATE }
        }))
        .map_err(io_err)?,
    )?;
    std::fs::write(dir.join("generation_config.json"), r#"{"bos_token_id": 0, "eos_token_id": 1}"#)?;
    std::fs::write(
        dir.join("config.json"),
        serde_json::to_vec_pretty(&json!({
            "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
            "hidden_size": t.hidden, "intermediate_size": t.inter, "num_hidden_layers": t.layers,
            "num_attention_heads": t.heads, "num_key_value_heads": t.kv_heads, "vocab_size": vocab_size,
            "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "max_position_embeddings": t.max_pos,
            "tie_word_embeddings": false, "bos_token_id": 0, "eos_token_id": 1, "torch_dtype": "float32"
        }))
        .map_err(io_err)?,
    )?;

    // deterministic weights (LCG), f32 little-endian
    let mut state = 0x2545_F491_4F6C_DD1Du64;
    let mut rnd = |n: usize, scale: f32| -> Vec<f32> {
        (0..n)
            .map(|_| {
                state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                ((state >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale
            })
            .collect()
    };
    let (h, i, hd) = (t.hidden, t.inter, t.hidden / t.heads);
    let mut ts: Vec<(String, Vec<usize>, Vec<f32>)> = vec![
        ("model.embed_tokens.weight".into(), vec![vocab_size, h], rnd(vocab_size * h, 1.0)),
        ("model.norm.weight".into(), vec![h], vec![1.0; h]),
    ];
    // lm_head: only printable ASCII rows non-zero => output is (almost always) printable ASCII,
    // never invalid UTF-8, and EOS (row 1) is practically never chosen.
    let mut lm = vec![0f32; vocab_size * h];
    let ascii = rnd(95 * h, 1.0);
    for (k, b) in (0x20..=0x7Eusize).enumerate() {
        lm[(b + 2) * h..(b + 3) * h].copy_from_slice(&ascii[k * h..(k + 1) * h]);
    }
    ts.push(("lm_head.weight".into(), vec![vocab_size, h], lm));
    for l in 0..t.layers {
        let p = format!("model.layers.{l}");
        let s = 0.1;
        ts.push((format!("{p}.input_layernorm.weight"), vec![h], vec![1.0; h]));
        ts.push((format!("{p}.post_attention_layernorm.weight"), vec![h], vec![1.0; h]));
        ts.push((format!("{p}.self_attn.q_proj.weight"), vec![t.heads * hd, h], rnd(t.heads * hd * h, s)));
        ts.push((format!("{p}.self_attn.k_proj.weight"), vec![t.kv_heads * hd, h], rnd(t.kv_heads * hd * h, s)));
        ts.push((format!("{p}.self_attn.v_proj.weight"), vec![t.kv_heads * hd, h], rnd(t.kv_heads * hd * h, s)));
        ts.push((format!("{p}.self_attn.o_proj.weight"), vec![h, t.heads * hd], rnd(h * t.heads * hd, s)));
        ts.push((format!("{p}.mlp.gate_proj.weight"), vec![i, h], rnd(i * h, s)));
        ts.push((format!("{p}.mlp.up_proj.weight"), vec![i, h], rnd(i * h, s)));
        ts.push((format!("{p}.mlp.down_proj.weight"), vec![h, i], rnd(h * i, s)));
    }
    let bytes: Vec<(String, Vec<usize>, Vec<u8>)> =
        ts.into_iter().map(|(n, s, v)| (n, s, v.iter().flat_map(|x| x.to_le_bytes()).collect())).collect();
    let views = bytes
        .iter()
        .map(|(n, s, b)| {
            // safetensors-0.7.0/src/tensor.rs:718 ; lib.rs:8-9
            safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), b).map(|v| (n.clone(), v))
        })
        .collect::<Result<Vec<_>, _>>()
        .map_err(io_err)?;
    safetensors::serialize_to_file(views, None, &dir.join("model.safetensors")) // tensor.rs:308
        .map_err(io_err)?;
    Ok(())
}
