//! Cache keys: what makes two requests the same question. A contract
//! between workers (which store answers under a key) and the ingress (which
//! keeps an answer only under the key it computes itself).
//!
//! A key is the first 128 bits of a SHA-256 over, length-prefixed: tenant,
//! model, model revision, the model's cache generation (see
//! [`Generations`]), adapter, the normalized sampling parameters and the
//! input. Tenants never share keys.

use std::collections::HashMap;
use std::sync::RwLock;

use sha2::{Digest, Sha256};

use crate::{ChatMessage, Input, SamplingParams, ToolPlan};

/// A 128-bit cache key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Key(pub u128);

impl Key {
    /// 32 lowercase hex digits (the `Fleet-Cache-Key` header).
    pub fn hex(&self) -> String {
        format!("{:032x}", self.0)
    }

    /// Parses [`Key::hex`].
    pub fn parse(s: &str) -> Option<Key> {
        (s.len() == 32).then(|| u128::from_str_radix(s, 16).ok().map(Key)).flatten()
    }
}

/// Everything around the input that must match exactly for a cached answer to apply.
#[derive(Debug, Clone, Copy)]
pub struct Scope<'a> {
    /// Tenant of the request.
    pub tenant: &'a str,
    /// Model name.
    pub model: &'a str,
    /// Revision of the model's files.
    pub revision: &'a str,
    /// The model's cache generation (changes on purge).
    pub generation: &'a str,
    /// LoRA adapter, if any.
    pub adapter: Option<&'a str>,
}

/// Whether the answer to `input` under `p` is reproducible: greedy
/// (temperature 0) or seeded sampling, or an embedding (no sampling at all).
pub fn reproducible(input: &Input, p: &SamplingParams) -> bool {
    p.temperature == Some(0.0) || p.seed.is_some() || input.is_embed()
}

struct Hasher(Sha256);

impl Hasher {
    fn new(domain: &str) -> Hasher {
        let mut h = Hasher(Sha256::new());
        h.bytes(domain.as_bytes());
        h
    }
    fn bytes(&mut self, b: &[u8]) {
        self.0.update((b.len() as u64).to_le_bytes());
        self.0.update(b);
    }
    fn opt(&mut self, s: Option<&str>) {
        match s {
            Some(s) => {
                self.0.update([1]);
                self.bytes(s.as_bytes());
            }
            None => self.0.update([0]),
        }
    }
    fn scope(&mut self, s: &Scope<'_>) {
        self.bytes(s.tenant.as_bytes());
        self.bytes(s.model.as_bytes());
        self.bytes(s.revision.as_bytes());
        self.bytes(s.generation.as_bytes());
        self.opt(s.adapter);
    }
    /// Parameters that change the answer; greedy decoding ignores the sampling knobs.
    fn params(&mut self, p: &SamplingParams) {
        let num = |v: Option<f64>| v.map(|f| f.to_bits().to_string());
        self.opt(p.max_tokens.map(|n| n.to_string()).as_deref());
        if p.temperature == Some(0.0) {
            self.bytes(b"greedy");
        } else {
            self.opt(num(p.temperature).as_deref());
            self.opt(num(p.top_p).as_deref());
            self.opt(p.top_k.map(|k| k.to_string()).as_deref());
            self.opt(p.seed.map(|s| s.to_string()).as_deref());
        }
        let mut stop: Vec<&str> = p.stop.iter().map(String::as_str).collect();
        stop.sort_unstable();
        stop.dedup();
        self.bytes(&(stop.len() as u64).to_le_bytes());
        for s in stop {
            self.bytes(s.as_bytes());
        }
        // What changes even a greedy answer, each tagged and written only
        // when set: a request that sets none keeps the key it always had.
        let mut tagged = |tag: &str, value: &[u8]| {
            self.bytes(tag.as_bytes());
            self.bytes(value);
        };
        if let Some(v) = p.frequency_penalty.filter(|v| *v != 0.0) {
            tagged("frequency_penalty", &v.to_bits().to_le_bytes());
        }
        if let Some(v) = p.presence_penalty.filter(|v| *v != 0.0) {
            tagged("presence_penalty", &v.to_bits().to_le_bytes());
        }
        if !p.logit_bias.is_empty() {
            let bias: Vec<u8> = p
                .logit_bias
                .iter()
                .flat_map(|(t, b)| t.to_le_bytes().into_iter().chain(b.to_bits().to_le_bytes()))
                .collect();
            tagged("logit_bias", &bias);
        }
        if let Some(v) = p.min_p.filter(|v| *v != 0.0 && p.temperature != Some(0.0)) {
            tagged("min_p", &v.to_bits().to_le_bytes());
        }
        if let Some(c) = &p.constraint {
            // as received: the order of a schema's properties is the order
            // the answer writes them in, so it is part of the question
            tagged("constraint", &serde_json::to_vec(c).expect("a constraint is JSON"));
        }
        if !p.tools.is_empty() {
            // in order and as received: the template shows them so
            tagged("tools", &serde_json::to_vec(&p.tools).expect("tools are JSON"));
            // what the choice does, not how it was written: an unset
            // choice is `auto`, and one parallel call only bounds `required`
            let plan = match p.tool_plan() {
                ToolPlan::Text => "text".to_string(),
                ToolPlan::Auto => "auto".to_string(),
                ToolPlan::Forced(f) => format!("forced:{}", f.name),
                ToolPlan::Required if p.parallel_tool_calls == Some(false) => "required:one".to_string(),
                ToolPlan::Required => "required".to_string(),
            };
            tagged("tool_plan", plan.as_bytes());
        }
        if p.logprobs {
            tagged("logprobs", &p.top_logprobs.unwrap_or(0).to_le_bytes());
        }
    }
    /// One chat message: its role and text, and the tool fields only when
    /// set (a message without them keeps the key it always had).
    fn message(&mut self, m: &ChatMessage) {
        self.bytes(m.role.as_bytes());
        self.bytes(m.content.as_bytes());
        if !m.tool_calls.is_empty() {
            self.bytes(b"tool_calls");
            self.bytes(&serde_json::to_vec(&m.tool_calls).expect("tool calls are JSON"));
        }
        if let Some(id) = &m.tool_call_id {
            self.bytes(b"tool_call_id");
            self.bytes(id.as_bytes());
        }
    }
    fn finish(self) -> u128 {
        let d = self.0.finalize();
        u128::from_be_bytes(d[..16].try_into().expect("sha256 has 32 bytes"))
    }
}

/// The exact key of a request.
pub fn exact(scope: &Scope<'_>, params: &SamplingParams, input: &Input) -> Key {
    let mut h = Hasher::new("retro-fleet/exact/1");
    h.scope(scope);
    h.params(params);
    match input {
        Input::Completion { prompt } => {
            h.bytes(b"completion");
            h.bytes(prompt.as_bytes());
        }
        Input::Chat { messages } => {
            h.bytes(b"chat");
            h.bytes(&(messages.len() as u64).to_le_bytes());
            for m in messages {
                h.message(m);
            }
        }
        Input::Embed { texts, dimensions } => {
            h.bytes(b"embed");
            h.bytes(&dimensions.unwrap_or(0).to_le_bytes());
            h.bytes(&(texts.len() as u64).to_le_bytes());
            for t in texts {
                h.bytes(t.as_bytes());
            }
        }
    }
    Key(h.finish())
}

/// The semantic bucket of a request and the text compared within it.
///
/// Everything except the last message must match exactly (same tenant, model,
/// revision, adapter, parameters and earlier turns), so a multi-turn
/// conversation only matches one with the same context; only the final
/// user turn (or the completion prompt) is compared by similarity.
pub fn semantic(scope: &Scope<'_>, params: &SamplingParams, input: &Input) -> Option<(u128, String)> {
    let mut h = Hasher::new("retro-fleet/semantic/1");
    h.scope(scope);
    h.params(params);
    let text = match input {
        Input::Completion { prompt } => {
            h.bytes(b"completion");
            prompt.clone()
        }
        Input::Chat { messages } => {
            let (last, earlier) = messages.split_last()?;
            if last.role != "user" {
                return None;
            }
            h.bytes(b"chat");
            h.bytes(&(earlier.len() as u64).to_le_bytes());
            for m in earlier {
                h.message(m);
            }
            last.content.clone()
        }
        // vectors are not answers to a question: never served to a similar one
        Input::Embed { .. } => return None,
    };
    Some((h.finish(), text))
}

/// Each model's cache generation, as KV `fleet_models` holds it: a purge
/// (`retro-fleet cache purge`) writes a new one, which makes every answer
/// kept under the old one unreachable. Workers and ingresses each follow the
/// bucket into one of these tables; a model without an entry is at "".
#[derive(Debug, Default)]
pub struct Generations(RwLock<HashMap<String, String>>);

impl Generations {
    /// Sets `model`'s generation ("" when deleted); whether it changed.
    pub fn set(&self, model: &str, generation: &str) -> bool {
        let mut g = self.0.write().expect("generations lock");
        if g.get(model).map(String::as_str) == Some(generation) {
            return false;
        }
        g.insert(model.to_string(), generation.to_string());
        true
    }

    /// `model`'s current generation.
    pub fn get(&self, model: &str) -> String {
        self.0.read().expect("generations lock").get(model).cloned().unwrap_or_default()
    }

    /// Runs `f` with `model`'s generation while no purge can change it, so
    /// what `f` keeps under a key made from it cannot outlive a purge.
    pub fn with<R>(&self, model: &str, f: impl FnOnce(&str) -> R) -> R {
        let g = self.0.read().expect("generations lock");
        f(g.get(model).map_or("", String::as_str))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scope(tenant: &str) -> Scope<'_> {
        Scope { tenant, model: "m", revision: "r1", generation: "", adapter: None }
    }

    fn greedy() -> SamplingParams {
        SamplingParams { temperature: Some(0.0), max_tokens: Some(8), ..Default::default() }
    }

    fn prompt(p: &str) -> Input {
        Input::Completion { prompt: p.into() }
    }

    #[test]
    fn every_part_of_the_question_changes_the_key() {
        let base = exact(&scope("a"), &greedy(), &prompt("hi"));
        assert_eq!(base, exact(&scope("a"), &greedy(), &prompt("hi")));
        assert_ne!(base, exact(&scope("b"), &greedy(), &prompt("hi")), "tenant");
        assert_ne!(base, exact(&scope("a"), &greedy(), &prompt("hi ")), "input");
        let mut s = scope("a");
        s.revision = "r2";
        assert_ne!(base, exact(&s, &greedy(), &prompt("hi")), "revision");
        let mut s = scope("a");
        s.generation = "g2";
        assert_ne!(base, exact(&s, &greedy(), &prompt("hi")), "generation");
        let mut s = scope("a");
        s.adapter = Some("lora");
        assert_ne!(base, exact(&s, &greedy(), &prompt("hi")), "adapter");
        let p = SamplingParams { max_tokens: Some(9), ..greedy() };
        assert_ne!(base, exact(&scope("a"), &p, &prompt("hi")), "max_tokens");
        let chat = Input::Chat { messages: vec![ChatMessage::text("user", "hi")] };
        assert_ne!(base, exact(&scope("a"), &greedy(), &chat), "chat vs completion");
    }

    #[test]
    fn normalization_keeps_equal_questions_equal() {
        // greedy decoding ignores the sampling knobs
        let noisy = SamplingParams { top_p: Some(0.3), top_k: Some(5), seed: Some(1), ..greedy() };
        assert_eq!(exact(&scope("a"), &greedy(), &prompt("x")), exact(&scope("a"), &noisy, &prompt("x")));
        // stop sequences are a set
        let s1 = SamplingParams { stop: vec!["a".into(), "b".into()], ..greedy() };
        let s2 = SamplingParams { stop: vec!["b".into(), "a".into(), "a".into()], ..greedy() };
        assert_eq!(exact(&scope("a"), &s1, &prompt("x")), exact(&scope("a"), &s2, &prompt("x")));
        // but a seed matters when sampling
        let t1 = SamplingParams { temperature: Some(0.7), seed: Some(1), ..Default::default() };
        let t2 = SamplingParams { temperature: Some(0.7), seed: Some(2), ..Default::default() };
        assert_ne!(exact(&scope("a"), &t1, &prompt("x")), exact(&scope("a"), &t2, &prompt("x")));
    }

    #[test]
    fn what_changes_the_answer_changes_the_key_and_unset_keeps_the_old_one() {
        use crate::Constraint;
        let base = exact(&scope("a"), &greedy(), &prompt("x"));
        // the key of a request without the newer fields is what it was
        let zeroed = SamplingParams { frequency_penalty: Some(0.0), presence_penalty: Some(0.0), ..greedy() };
        assert_eq!(base, exact(&scope("a"), &zeroed, &prompt("x")));
        let schema = |s: serde_json::Value| Constraint::JsonSchema { schema: s };
        let tools: Vec<crate::tools::Tool> =
            serde_json::from_value(serde_json::json!([{"type": "function", "function": {"name": "f"}}])).unwrap();
        let choice = |c: &str| serde_json::from_value(serde_json::json!(c)).unwrap();
        let variants = [
            SamplingParams { frequency_penalty: Some(0.5), ..greedy() },
            SamplingParams { presence_penalty: Some(0.5), ..greedy() },
            SamplingParams { logit_bias: [(7, -100.0)].into(), ..greedy() },
            SamplingParams { logit_bias: [(8, -100.0)].into(), ..greedy() },
            SamplingParams { constraint: Some(schema(serde_json::json!({"type": "object"}))), ..greedy() },
            SamplingParams { constraint: Some(schema(serde_json::json!({"type": "array"}))), ..greedy() },
            SamplingParams { constraint: Some(Constraint::Regex { pattern: "a+".into() }), ..greedy() },
            SamplingParams { constraint: Some(Constraint::Lark { grammar: "a+".into() }), ..greedy() },
            SamplingParams { tools: tools.clone(), ..greedy() },
            SamplingParams { tools: tools.clone(), tool_choice: Some(choice("required")), ..greedy() },
            SamplingParams {
                tools,
                tool_choice: Some(choice("required")),
                parallel_tool_calls: Some(false),
                ..greedy()
            },
            SamplingParams { logprobs: true, ..greedy() },
            SamplingParams { logprobs: true, top_logprobs: Some(3), ..greedy() },
        ];
        let keys: std::collections::HashSet<Key> =
            variants.iter().map(|p| exact(&scope("a"), p, &prompt("x"))).chain([base]).collect();
        assert_eq!(keys.len(), variants.len() + 1, "each changes the key, and differently");
        // a tool choice is keyed by what it does: without tools it does
        // nothing, unset is `auto`, one parallel call bounds only `required`
        let key = |p: &SamplingParams| exact(&scope("a"), p, &prompt("x"));
        assert_eq!(base, key(&SamplingParams { tool_choice: Some(choice("auto")), ..greedy() }));
        let with_tools = SamplingParams { tools: variants[8].tools.clone(), ..greedy() };
        assert_eq!(key(&with_tools), key(&SamplingParams { tool_choice: Some(choice("auto")), ..with_tools.clone() }));
        let one = SamplingParams { parallel_tool_calls: Some(false), ..with_tools.clone() };
        assert_eq!(key(&with_tools), key(&one));
        // min_p only matters when sampling
        let min_p = SamplingParams { min_p: Some(0.1), ..greedy() };
        assert_eq!(base, exact(&scope("a"), &min_p, &prompt("x")));
        let t = SamplingParams { temperature: Some(0.7), seed: Some(1), ..Default::default() };
        let t_min_p = SamplingParams { min_p: Some(0.1), ..t.clone() };
        assert_ne!(exact(&scope("a"), &t, &prompt("x")), exact(&scope("a"), &t_min_p, &prompt("x")));
        // a schema's property order is the answer's: it changes the key
        let ab = serde_json::json!({"type": "object", "properties": {"a": {}, "b": {}}});
        let ba = serde_json::json!({"type": "object", "properties": {"b": {}, "a": {}}});
        let (pa, pb) = (
            SamplingParams { constraint: Some(schema(ab.clone())), ..greedy() },
            SamplingParams { constraint: Some(schema(ba)), ..greedy() },
        );
        assert_ne!(exact(&scope("a"), &pa, &prompt("x")), exact(&scope("a"), &pb, &prompt("x")));
        let same = SamplingParams { constraint: Some(schema(ab)), ..greedy() };
        assert_eq!(exact(&scope("a"), &pa, &prompt("x")), exact(&scope("a"), &same, &prompt("x")));
    }

    #[test]
    fn only_reproducible_sampling_is_deterministic() {
        let p = prompt("x");
        assert!(reproducible(&p, &greedy()));
        assert!(reproducible(&p, &SamplingParams { temperature: Some(0.9), seed: Some(3), ..Default::default() }));
        assert!(!reproducible(&p, &SamplingParams { temperature: Some(0.9), ..Default::default() }));
        assert!(!reproducible(&p, &SamplingParams::default()));
        let embed = Input::Embed { texts: vec!["x".into()], dimensions: None };
        assert!(reproducible(&embed, &SamplingParams::default()), "an embedding samples nothing");
    }

    #[test]
    fn semantic_buckets_need_the_same_earlier_turns() {
        let msg = |role: &str, c: &str| ChatMessage::text(role, c);
        let a = Input::Chat { messages: vec![msg("system", "be brief"), msg("user", "capital of France?")] };
        let b = Input::Chat { messages: vec![msg("system", "be brief"), msg("user", "France's capital?")] };
        let c = Input::Chat { messages: vec![msg("system", "be verbose"), msg("user", "capital of France?")] };
        let (ba, ta) = semantic(&scope("t"), &greedy(), &a).unwrap();
        let (bb, _) = semantic(&scope("t"), &greedy(), &b).unwrap();
        let (bc, _) = semantic(&scope("t"), &greedy(), &c).unwrap();
        assert_eq!(ta, "capital of France?");
        assert_eq!(ba, bb);
        assert_ne!(ba, bc);
        assert_ne!(ba, semantic(&scope("u"), &greedy(), &a).unwrap().0, "tenants never share a bucket");
        let ends_with_assistant = Input::Chat { messages: vec![msg("user", "q"), msg("assistant", "a")] };
        assert!(semantic(&scope("t"), &greedy(), &ends_with_assistant).is_none());
    }

    #[test]
    fn generations_change_once_per_new_value() {
        let g = Generations::default();
        assert_eq!(g.get("m"), "");
        assert!(g.set("m", "g1"));
        assert!(!g.set("m", "g1"));
        assert_eq!(g.with("m", str::to_string), "g1");
        assert!(g.set("m", ""));
        assert_eq!(g.get("m"), "");
    }

    #[test]
    fn hex_round_trips() {
        let k = exact(&scope("a"), &greedy(), &prompt("hi"));
        assert_eq!(Key::parse(&k.hex()), Some(k));
        assert_eq!(Key::parse("xyz"), None);
    }
}
