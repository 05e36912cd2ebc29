//! The request fields that change an answer beyond temperature and top-p:
//! structured outputs (`response_format`, `params.constraint`), logit bias,
//! penalties and min-p. Honoured on the tiny generated model run by
//! mistral.rs, through the unmodified `openai` Python client and the native
//! API; refused, naming the field, by a backend that cannot honour them and
//! for the OpenAI fields not honoured yet; and never mixed up in the cache.

#![cfg(feature = "mistralrs")]

mod common;

use common::*;
use serde_json::{json, Value};

/// A nats-server, a worker serving `tiny` and `echo`, and an ingress at `base`.
struct Fleet {
    base: String,
    _processes: (Proc, Proc),
    _setup: Setup,
    _models: tempfile::TempDir,
}

async fn fleet() -> Fleet {
    let models = tempfile::tempdir().unwrap();
    let s = setup(&config(models.path()));
    let worker = start_worker(&s.config, &[]).await;
    let (ingress, base) = start_ingress(&s.config).await;
    Fleet { base, _processes: (worker, ingress), _setup: s, _models: models }
}

/// `tiny` (its chat template shows tools), `plain` (the same model, its
/// template does not) and `echo`.
/// What to check when a client script fails.
const SDK_HINT: &str = "the openai client script failed (`make test` installs openai and jsonschema)";

fn config(dir: &std::path::Path) -> String {
    let (model, plain) = (dir.join("tiny"), dir.join("plain"));
    retro_fleet_worker::tiny_model::write(&model, &Default::default()).unwrap();
    let no_tools = retro_fleet_worker::tiny_model::Tiny { tools: false, ..Default::default() };
    retro_fleet_worker::tiny_model::write(&plain, &no_tools).unwrap();
    let mistral = |name: &str, path: &std::path::Path| {
        format!("[models.{name}]\nbackend = \"mistralrs\"\npath = \"{}\"\ndefault_max_tokens = 16\n", path.display())
    };
    format!("{}{}[models.echo]\nbackend = \"echo\"\n", mistral("tiny", &model), mistral("plain", &plain))
}

/// The official client asks for JSON fitting a schema (an object with
/// required fields, an enum, an array, a bounded integer): every answer, greedy or
/// sampled, streamed or not, parses and validates; a JSON-mode answer is an
/// object. The echo model, and the fields not honoured, are 400s that name
/// the field.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_openai_client_gets_json_that_fits_its_schema() {
    let f = fleet().await;
    let script = r#"
import json, sys, jsonschema, openai
c = openai.OpenAI(base_url=sys.argv[1] + "/v1", api_key="unused", max_retries=0)
schema = {"type": "object", "additionalProperties": False,
          "required": ["name", "mood", "tags", "n"],
          "properties": {"name": {"type": "string", "maxLength": 8},
                         "mood": {"enum": ["calm", "busy", "away"]},
                         "tags": {"type": "array", "items": {"type": "boolean"}, "maxItems": 3},
                         "n": {"type": "integer", "minimum": 0, "maximum": 99}}}
rf = {"type": "json_schema", "json_schema": {"name": "card", "schema": schema, "strict": True}}
def ask(prompt, **kw):
    return c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": prompt}],
                                     max_tokens=200, response_format=rf, **kw)
answers = []
for prompt, kw in [("a", {"temperature": 0}), ("who are you?", {"temperature": 0}),
                   ("b", {"temperature": 0.9, "seed": 7}), ("c", {"temperature": 1.5, "seed": 8, "top_p": 0.9})]:
    r = ask(prompt, **kw)
    text = r.choices[0].message.content
    assert r.choices[0].finish_reason == "stop", (r.choices[0].finish_reason, text)
    jsonschema.validate(json.loads(text), schema)
    answers.append(text)
assert len(set(answers)) > 1, answers  # the grammar shapes the answer, the model still picks
parts = [ch.choices[0].delta.content for ch in ask("streamed", temperature=0, stream=True)
         if ch.choices and ch.choices[0].delta.content]
jsonschema.validate(json.loads("".join(parts)), schema)
# unbounded: this holds because the fixed tiny model closes its object early
r = c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x"}], max_tokens=200,
                              temperature=0, response_format={"type": "json_object"})
assert r.choices[0].finish_reason == "stop", r
assert isinstance(json.loads(r.choices[0].message.content), dict)
def refused(field, **kw):
    try:
        c.chat.completions.create(messages=[{"role": "user", "content": "x"}], max_tokens=4, **kw)
    except openai.BadRequestError as e:
        assert field in str(e), (field, e)
        return
    raise SystemExit(f"expected a 400 naming {field}")
refused("response_format", model="echo", response_format=rf)
refused("logit_bias", model="echo", logit_bias={"50": -100})
refused("logprobs", model="echo", logprobs=True, top_logprobs=3)
try:
    c.completions.create(model="echo", prompt="x", max_tokens=4, logprobs=0)
    raise SystemExit("expected a 400 naming logprobs")
except openai.BadRequestError as e:
    assert "logprobs" in str(e), e
print("structured ok")
"#;
    python(script, &f.base, "structured ok", SDK_HINT);
}

async fn infer(base: &str, params: Value) -> Value {
    let body = json!({"model": "tiny", "prompt": "once upon a time", "params": params});
    let (status, r) = post_json(&format!("{base}/v1/infer"), &body).await;
    assert_eq!(status, 200, "{r}");
    r
}

fn text(r: &Value) -> &str {
    r["output"]["text"].as_str().unwrap()
}

/// Over the native API: a logit bias of -100 on a token the greedy answer
/// holds removes it; a frequency penalty and min-p reach the sampler; a
/// constrained answer matches its regex, and neither it nor the
/// unconstrained one is ever served for the other.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bias_penalties_and_constraints_reach_the_model_and_the_cache_keeps_them_apart() {
    let f = fleet().await;
    let base = f.base.as_str();

    let greedy = json!({"max_tokens": 24, "temperature": 0});
    let plain = infer(base, greedy.clone()).await;
    let again = infer(base, greedy.clone()).await;
    assert_eq!(text(&plain), text(&again));
    assert_ne!(again["cache"], "none", "the same question is answered from the cache: {again}");

    // the tiny model's token of byte b is b + 2
    let banned = text(&plain).bytes().next().unwrap();
    let biased =
        infer(base, json!({"max_tokens": 24, "temperature": 0, "logit_bias": {(banned as u32 + 2).to_string(): -100}}))
            .await;
    assert_eq!(biased["cache"], "none", "not the unbiased answer: {biased}");
    assert!(!text(&biased).as_bytes().contains(&banned), "{:?} still in {:?}", banned as char, text(&biased));

    let penalised = infer(base, json!({"max_tokens": 24, "temperature": 0, "frequency_penalty": 2.0})).await;
    assert_eq!(penalised["cache"], "none");
    assert_ne!(text(&penalised), text(&plain), "a penalty changes a greedy answer that repeats itself");

    // min-p 1 keeps only the likeliest token: sampling becomes greedy
    let min_p = infer(base, json!({"max_tokens": 24, "temperature": 1.5, "seed": 3, "min_p": 1.0})).await;
    let sampled = infer(base, json!({"max_tokens": 24, "temperature": 1.5, "seed": 3})).await;
    assert_eq!(text(&min_p), text(&plain));
    assert_ne!(text(&sampled), text(&plain));

    let regex = json!({"max_tokens": 24, "temperature": 0, "constraint": {"type": "regex", "pattern": "[a-z]{3,6}"}});
    let constrained = infer(base, regex.clone()).await;
    assert_eq!(constrained["cache"], "none", "not the unconstrained answer: {constrained}");
    let t = text(&constrained);
    assert!((3..=6).contains(&t.len()) && t.bytes().all(|b| b.is_ascii_lowercase()), "{t:?}");
    assert_eq!(constrained["output"]["finish_reason"], "stop");
    let constrained_again = infer(base, regex.clone()).await;
    assert_eq!(text(&constrained_again), t);
    assert_ne!(constrained_again["cache"], "none");
    // the other way round: constrained first, then the free question is
    // computed, not served the constrained answer
    let body = |params: &Value| json!({"model": "tiny", "prompt": "constrained first", "params": params});
    let (_, first) = post_json(&format!("{base}/v1/infer"), &body(&regex)).await;
    let (_, free) = post_json(&format!("{base}/v1/infer"), &body(&greedy)).await;
    assert_eq!((first["cache"].as_str(), free["cache"].as_str()), (Some("none"), Some("none")), "{first} {free}");
    assert_ne!(text(&first), text(&free));

    // a constraint the grammar library cannot use, and one the echo model cannot honour
    let bad =
        json!({"model": "tiny", "prompt": "x", "params": {"constraint": {"type": "regex", "pattern": "(unclosed"}}});
    let (status, r) = post_json(&format!("{base}/v1/infer"), &bad).await;
    assert_eq!(status, 422, "{r}");
    assert!(r["error"]["message"].as_str().unwrap().contains("params.constraint"), "{r}");
    let echo = json!({"model": "echo", "prompt": "x", "params": {"constraint": {"type": "regex", "pattern": "a"}}});
    let (status, r) = post_json(&format!("{base}/v1/infer"), &echo).await;
    assert_eq!((status, r["error"]["code"].as_str()), (400, Some("unsupported")), "{r}");
    assert!(r["error"]["message"].as_str().unwrap().contains("params.constraint"), "{r}");
    // out of range: refused at the door
    let (status, r) =
        post_json(&format!("{base}/v1/infer"), &json!({"model": "tiny", "prompt": "x", "params": {"min_p": 2.0}}))
            .await;
    assert_eq!((status, r["error"]["param"].as_str()), (422, Some("params.min_p")), "{r}");
}

/// Function calling through the official client: a named tool choice gets
/// one call whose arguments fit the function's schema, streamed as they
/// are decoded and assembling to the same call; `required` gets calls to
/// the offered tools only (one, without parallel calls); a conversation
/// carrying a call and its result goes on; the native API gives the same
/// calls. A model whose template cannot show tools, the echo model, and a
/// tool choice naming no offered tool are 400s naming the field.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_openai_client_gets_tool_calls_that_fit_the_functions() {
    let f = fleet().await;
    let script = r#"
import json, sys, jsonschema, openai
c = openai.OpenAI(base_url=sys.argv[1] + "/v1", api_key="unused", max_retries=0)
weather = {"type": "object", "additionalProperties": False, "required": ["city", "unit"],
           "properties": {"city": {"type": "string", "maxLength": 12}, "unit": {"enum": ["c", "f"]}}}
add = {"type": "object", "additionalProperties": False, "required": ["a", "b"],
       "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 999},
                      "b": {"type": "integer", "minimum": 0, "maximum": 999}}}
schemas = {"get_weather": weather, "add": add}
tools = [{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city", "parameters": weather}},
         {"type": "function", "function": {"name": "add", "description": "Adds two numbers", "parameters": add}}]
named = {"type": "function", "function": {"name": "get_weather"}}
def ask(prompt, **kw):
    kw = {"temperature": 0, **kw}
    return c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": prompt}],
                                     max_tokens=120, tools=tools, **kw)
def streamed(prompt, **kw):
    calls, pieces = {}, 0
    for ch in ask(prompt, stream=True, **kw):
        for tc in (ch.choices[0].delta.tool_calls or []) if ch.choices else []:
            call = calls.setdefault(tc.index, {"id": None, "name": None, "arguments": ""})
            call["id"] = tc.id or call["id"]
            call["name"] = (tc.function.name if tc.function else None) or call["name"]
            if tc.function and tc.function.arguments:
                call["arguments"] += tc.function.arguments
                pieces += 1
    return [calls[i] for i in sorted(calls)], pieces
def same(calls, message):
    # each answer names its calls after its own request
    assert all(x["id"].startswith("call_") for x in calls) and len({x["id"] for x in calls}) == len(calls), calls
    assert not {x["id"] for x in calls} & {t.id for t in message.tool_calls}, (calls, message)
    assert [(x["name"], x["arguments"]) for x in calls] == \
        [(t.function.name, t.function.arguments) for t in message.tool_calls], (calls, message)

# a named function: one call, its arguments decoded under its schema
r = ask("weather in Paris?", tool_choice=named)
m = r.choices[0].message
assert m.content is None and len(m.tool_calls) == 1 and r.choices[0].finish_reason == "stop", r
assert m.tool_calls[0].type == "function" and m.tool_calls[0].function.name == "get_weather", m
jsonschema.validate(json.loads(m.tool_calls[0].function.arguments), weather)
# streamed: the arguments arrive piece by piece and assemble to the same call
calls, pieces = streamed("and in Oslo?", tool_choice=named)
assert pieces > 1, f"the arguments came in {pieces} piece(s)"
same(calls, ask("and in Oslo?", tool_choice=named).choices[0].message)

# required: calls to the offered tools only, each fitting its function (the
# random model may list calls until max_tokens: then the complete ones come)
for prompt, kw in [("add 2 and 3", {}), ("sampled", {"temperature": 0.9, "seed": 5})]:
    r = ask(prompt, tool_choice="required", **kw)
    assert r.choices[0].finish_reason in ("tool_calls", "length") and r.choices[0].message.tool_calls, r
    for t in r.choices[0].message.tool_calls:
        jsonschema.validate(json.loads(t.function.arguments), schemas[t.function.name])
r = ask("just one", tool_choice="required", parallel_tool_calls=False)
assert len(r.choices[0].message.tool_calls) == 1 and r.choices[0].finish_reason == "tool_calls", r
calls, _ = streamed("streamed list", tool_choice="required")
same(calls, ask("streamed list", tool_choice="required").choices[0].message)

# the model decides, or is told not to call: a text answer here
for choice in ["auto", "none"]:
    r = ask("hello", tool_choice=choice)
    assert isinstance(r.choices[0].message.content, str) or r.choices[0].message.tool_calls, r
# the conversation goes on with the call and its result
call = m.tool_calls[0]
r = c.chat.completions.create(model="tiny", max_tokens=8, temperature=0, tools=tools, tool_choice="none", messages=[
    {"role": "user", "content": "weather in Paris?"},
    {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
    {"role": "tool", "tool_call_id": call.id, "content": "18 degrees"}])
assert r.choices[0].message.tool_calls is None and r.choices[0].message.content, r

def refused(field, error=openai.BadRequestError, **kw):
    try:
        c.chat.completions.create(messages=[{"role": "user", "content": "x"}], max_tokens=4, **kw)
    except error as e:
        assert field in str(e), (field, e)
        return
    raise SystemExit(f"expected a {error.__name__} naming {field}")
refused("tools", model="plain", tools=tools)
refused("tools", model="echo", tools=tools)
refused("functions", model="tiny", functions=[{"name": "f"}])
# invalid, like any out-of-range field: 422
invalid = openai.UnprocessableEntityError
refused("tool_choice", invalid, model="tiny", tools=tools, tool_choice={"type": "function", "function": {"name": "nope"}})
refused("tool_choice", invalid, model="tiny", tool_choice="required")
refused("tool_choice", invalid, model="tiny", tools=tools, tool_choice="required", response_format={"type": "json_object"})
print("tools ok")
"#;
    python(script, &f.base, "tools ok", SDK_HINT);

    // the native API: the same fields under `params`, calls in `output.tool_calls`
    let tools = json!([{"type": "function", "function": {"name": "add",
        "parameters": {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}}}]);
    let body = json!({"model": "tiny", "messages": [{"role": "user", "content": "add"}],
        "params": {"max_tokens": 40, "temperature": 0, "tools": tools,
                   "tool_choice": {"type": "function", "function": {"name": "add"}}}});
    let (status, r) = post_json(&format!("{}/v1/infer", f.base), &body).await;
    assert_eq!(status, 200, "{r}");
    let call = &r["output"]["tool_calls"][0];
    assert_eq!((call["type"].as_str(), call["function"]["name"].as_str()), (Some("function"), Some("add")), "{r}");
    let args: Value = serde_json::from_str(call["function"]["arguments"].as_str().unwrap()).unwrap();
    assert!(args["a"].is_i64(), "{r}");
    assert_eq!(r["output"]["text"], "", "{r}");
}

/// Log probabilities through the official client: one entry per generated
/// token whose texts make the answer, each with the asked number of
/// alternatives, likeliest first; greedy, the pick is the likeliest. The
/// same over a stream (with the last chunk) and on the completions
/// endpoint in its own shape.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_openai_client_gets_log_probabilities() {
    let f = fleet().await;
    let script = r#"
import math, sys, openai
c = openai.OpenAI(base_url=sys.argv[1] + "/v1", api_key="unused", max_retries=0)
msgs = [{"role": "user", "content": "count"}]
r = c.chat.completions.create(model="tiny", messages=msgs, max_tokens=12, temperature=0, logprobs=True, top_logprobs=3)
content, greedy = r.choices[0].logprobs.content, r.choices[0].message.content
assert len(content) == r.usage.completion_tokens == 12, (len(content), r.usage)
assert "".join(t.token for t in content) == r.choices[0].message.content, r
for t in content:
    top = t.top_logprobs
    assert len(top) == 3 and t.logprob <= 0, t
    assert top[0].token == t.token and abs(top[0].logprob - t.logprob) < 1e-6, t  # greedy
    assert top[0].logprob >= top[1].logprob >= top[2].logprob, t
    assert sum(math.exp(x.logprob) for x in top) <= 1 + 1e-6, t
    assert bytes(t.bytes).decode() == t.token, t
# sampled, without alternatives: still one entry per token
r = c.chat.completions.create(model="tiny", messages=msgs, max_tokens=10, temperature=1.2, seed=4, logprobs=True)
content = r.choices[0].logprobs.content
assert len(content) == 10 and all(t.top_logprobs == [] for t in content), r
assert "".join(t.token for t in content) == r.choices[0].message.content, r
# a stop string cuts the entries with the text
r = c.chat.completions.create(model="tiny", messages=msgs, max_tokens=12, temperature=0, logprobs=True,
                              stop=[greedy[3:5]])
assert len(r.choices[0].message.content) < len(greedy), r
assert "".join(t.token for t in r.choices[0].logprobs.content) == r.choices[0].message.content, r
# streamed: the entries come with the last chunk
chunks = list(c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "stream"}], max_tokens=9,
              temperature=0, logprobs=True, top_logprobs=2, stream=True, stream_options={"include_usage": True}))
entries = [t for ch in chunks if ch.choices and ch.choices[0].logprobs for t in ch.choices[0].logprobs.content]
text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
assert len(entries) == chunks[-1].usage.completion_tokens == 9 and "".join(t.token for t in entries) == text, chunks
# completions: parallel lists, alternatives as a map
r = c.completions.create(model="tiny", prompt="once", max_tokens=8, temperature=0, logprobs=2)
lp = r.choices[0].logprobs
assert "".join(lp.tokens) == r.choices[0].text and len(lp.token_logprobs) == 8, lp
assert all(len(d) == 2 for d in lp.top_logprobs) and lp.text_offset[:2] == [0, len(lp.tokens[0])], lp
# more entries than one result carries: refused before any work, naming the field
try:
    c.chat.completions.create(model="tiny", messages=msgs, max_tokens=2000, logprobs=True, top_logprobs=20)
    raise SystemExit("expected a 422 naming top_logprobs")
except openai.UnprocessableEntityError as e:
    assert "top_logprobs" in str(e), e
print("logprobs ok")
"#;
    python(script, &f.base, "logprobs ok", SDK_HINT);
}

/// `n` choices: over the native API, one request gives every choice's
/// result (ids `<id>-c<i>`, seeds `seed + i`), streamed too; the official
/// client gets the same choices with their indexes, the prompt counted once
/// and the completions summed, streamed or not; greedy choices agree; too
/// many is a 422 naming `n`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn n_choices_are_one_request_with_every_answer() {
    let f = fleet().await;
    let messages = json!([{"role": "user", "content": "tell me a story"}]);
    let params = json!({"temperature": 0.9, "seed": 5, "max_tokens": 12});
    let body = json!({"model": "tiny", "messages": messages, "params": params, "n": 3, "id": "three"});
    let (status, r) = post_json(&format!("{}/v1/infer", f.base), &body).await;
    assert_eq!(status, 200, "{r}");
    let choices = r["choices"].as_array().expect("choices");
    let ids: Vec<&str> = choices.iter().map(|c| c["id"].as_str().unwrap()).collect();
    assert_eq!((r["id"].as_str(), ids), (Some("three"), vec!["three", "three-c1", "three-c2"]));
    let texts: Vec<&str> = choices.iter().map(text).collect();
    let distinct: std::collections::BTreeSet<_> = texts.iter().collect();
    assert!(distinct.len() > 1, "three seeds, one answer: {texts:?}");
    // choice 1 is the request with seed 6
    let one =
        json!({"model": "tiny", "messages": messages, "params": {"temperature": 0.9, "seed": 6, "max_tokens": 12}});
    let (_, alone) = post_json(&format!("{}/v1/infer", f.base), &one).await;
    assert_eq!(text(&alone), texts[1]);
    let completion: u64 = choices.iter().map(|c| c["usage"]["completion_tokens"].as_u64().unwrap()).sum();
    let prompt = choices[0]["usage"]["prompt_tokens"].as_u64().unwrap();

    // streamed: every choice's chunks and result, each naming its id
    let streamed = json!({"model": "tiny", "messages": messages, "params": params, "n": 3, "stream": true});
    let body = post_text(&format!("{}/v1/infer", f.base), &streamed).await;
    let mut results = std::collections::BTreeMap::new();
    for event in body.split("\n\n").filter(|e| e.contains("event: result")) {
        let data = event.lines().find_map(|l| l.strip_prefix("data: ")).expect("data");
        let r: Value = serde_json::from_str(data).unwrap();
        results.insert(r["id"].as_str().unwrap().to_string(), text(&r).to_string());
    }
    assert_eq!(results.len(), 3, "{body}");
    assert!(!body.contains("event: error"), "{body}");
    assert!(body.matches("event: chunk").count() >= 3, "{body}");
    let mut in_order: Vec<String> = results.into_values().collect();
    in_order.sort();
    let mut want: Vec<String> = texts.iter().map(|t| t.to_string()).collect();
    want.sort();
    assert_eq!(in_order, want, "the same seeds give the same choices");

    let script = format!(
        r#"
import json, sys, openai
c = openai.OpenAI(base_url=sys.argv[1] + "/v1", api_key="unused", max_retries=0)
texts, prompt, completion = {texts}, {prompt}, {completion}
msgs = [{{"role": "user", "content": "tell me a story"}}]
kw = dict(model="tiny", messages=msgs, temperature=0.9, seed=5, max_tokens=12, n=3)
r = c.chat.completions.create(**kw)
assert [ch.index for ch in r.choices] == [0, 1, 2], r
assert [ch.message.content for ch in r.choices] == texts, (r, texts)
assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (prompt, completion), r.usage
assert r.usage.total_tokens == prompt + completion, r.usage
parts, finishes, usage = {{}}, {{}}, None
for ch in c.chat.completions.create(stream=True, stream_options={{"include_usage": True}}, **kw):
    if ch.usage:
        usage = ch.usage
    for choice in ch.choices:
        parts[choice.index] = parts.get(choice.index, "") + (choice.delta.content or "")
        if choice.finish_reason:
            finishes[choice.index] = choice.finish_reason
assert [parts[i] for i in range(3)] == texts, (parts, texts)
assert sorted(finishes) == [0, 1, 2], finishes
assert (usage.prompt_tokens, usage.completion_tokens) == (prompt, completion), usage
g = c.completions.create(model="tiny", prompt="once upon a time", temperature=0, max_tokens=8, n=2)
assert [ch.index for ch in g.choices] == [0, 1] and g.choices[0].text == g.choices[1].text, g
try:
    c.chat.completions.create(model="tiny", messages=msgs, max_tokens=4, n=17)
    raise SystemExit("expected a 422 naming n")
except openai.UnprocessableEntityError as e:
    assert "`n`" in str(e), e
print("choices ok")
"#,
        texts = serde_json::to_string(&texts).unwrap(),
    );
    python(&script, &f.base, "choices ok", SDK_HINT);
}
