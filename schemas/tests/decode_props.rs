//! Property tests of the decoder of every wire type (request, result, stream
//! chunk), in MessagePack and JSON: arbitrary bytes and mutated valid
//! messages never panic the decoder, and every valid value survives an
//! encode/decode round trip. `PROPTEST_CASES=100000` runs longer.

use proptest::prelude::*;
use retro_fleet_schemas::tools::{
    call_of, Function, FunctionName, NamedTool, Tool, ToolCall, ToolChoice, ToolKind, ToolMode,
};
use retro_fleet_schemas::*;
use serde::de::DeserializeOwned;

const JSON: Option<&str> = Some("application/json");

fn token() -> impl Strategy<Value = String> {
    "[A-Za-z0-9_-]{1,40}"
}

fn text() -> impl Strategy<Value = String> {
    any::<String>().prop_map(|s| s.chars().take(120).collect())
}

/// Finite floats that JSON carries exactly (quarters), so round trips compare equal.
fn finite() -> impl Strategy<Value = f64> {
    (-4_000_000i32..4_000_000).prop_map(|x| f64::from(x) / 4.0)
}

fn input() -> impl Strategy<Value = Input> {
    prop_oneof![
        text().prop_map(|prompt| Input::Completion { prompt }),
        prop::collection::vec(
            (text(), text(), prop::collection::vec(tool_call(), 0..2), prop::option::of(text())),
            0..4
        )
        .prop_map(|m| Input::Chat {
            messages: m
                .into_iter()
                .map(|(role, content, tool_calls, tool_call_id)| ChatMessage {
                    tool_calls,
                    tool_call_id,
                    ..ChatMessage::text(role, content)
                })
                .collect()
        }),
    ]
}

fn constraint() -> impl Strategy<Value = Constraint> {
    prop_oneof![
        text().prop_map(|pattern| Constraint::Regex { pattern }),
        text().prop_map(|grammar| Constraint::Lark { grammar }),
        (text(), finite()).prop_map(|(k, v)| Constraint::JsonSchema { schema: serde_json::json!({ k: v }) }),
    ]
}

fn params() -> impl Strategy<Value = SamplingParams> {
    let basic = (
        any::<Option<u32>>(),
        prop::option::of(finite()),
        prop::option::of(finite()),
        any::<Option<u32>>(),
        any::<Option<u64>>(),
        prop::collection::vec(text(), 0..3),
    );
    let shaping = (
        prop::option::of(finite()),
        prop::option::of(finite()),
        prop::collection::btree_map(any::<u32>(), finite(), 0..4),
        prop::option::of(finite()),
        prop::option::of(constraint()),
    );
    let tools = (
        prop::collection::vec(tool(), 0..3),
        prop::option::of(tool_choice()),
        any::<Option<bool>>(),
        any::<bool>(),
        any::<Option<u32>>(),
    );
    (basic, shaping, tools).prop_map(
        |(
            (max_tokens, temperature, top_p, top_k, seed, stop),
            (frequency_penalty, presence_penalty, logit_bias, min_p, constraint),
            (tools, tool_choice, parallel_tool_calls, logprobs, top_logprobs),
        )| SamplingParams {
            max_tokens,
            temperature,
            top_p,
            top_k,
            seed,
            stop,
            frequency_penalty,
            presence_penalty,
            logit_bias,
            min_p,
            constraint,
            tools,
            tool_choice,
            parallel_tool_calls,
            logprobs,
            top_logprobs,
        },
    )
}

fn tool() -> impl Strategy<Value = Tool> {
    (token(), prop::option::of(text()), prop::option::of((text(), finite())), any::<Option<bool>>()).prop_map(
        |(name, description, parameters, strict)| Tool {
            kind: ToolKind::Function,
            function: Function {
                name,
                description,
                parameters: parameters.map(|(k, v)| serde_json::json!({ k: v })),
                strict,
            },
        },
    )
}

fn tool_choice() -> impl Strategy<Value = ToolChoice> {
    prop_oneof![
        Just(ToolChoice::Mode(ToolMode::None)),
        Just(ToolChoice::Mode(ToolMode::Auto)),
        Just(ToolChoice::Mode(ToolMode::Required)),
        token().prop_map(|name| ToolChoice::Named(NamedTool {
            kind: ToolKind::Function,
            function: FunctionName { name }
        })),
    ]
}

fn tool_call() -> impl Strategy<Value = ToolCall> {
    (token(), any::<u8>(), token(), text()).prop_map(|(id, i, name, args)| call_of(&id, i as usize, &name, args))
}

fn cache_mode() -> impl Strategy<Value = CacheMode> {
    prop_oneof![Just(CacheMode::Use), Just(CacheMode::Bypass), Just(CacheMode::Refresh), Just(CacheMode::Semantic)]
}

fn request() -> impl Strategy<Value = InferRequest> {
    (
        any::<u32>(),
        token(),
        token(),
        prop::option::of(token()),
        input(),
        params(),
        any::<bool>(),
        cache_mode(),
        prop::option::of(token()),
        prop::collection::btree_map(text(), text(), 0..3),
    )
        .prop_map(|(v, id, model, adapter, input, params, stream, cache, tenant, metadata)| InferRequest {
            v,
            id,
            model,
            adapter,
            input,
            params,
            stream,
            cache,
            tenant,
            metadata,
        })
}

fn code() -> impl Strategy<Value = ErrorCode> {
    prop::sample::select(vec![
        ErrorCode::DecodeError,
        ErrorCode::InvalidRequest,
        ErrorCode::PromptTooLarge,
        ErrorCode::ContextLengthExceeded,
        ErrorCode::UnknownModel,
        ErrorCode::DeadlineExceeded,
        ErrorCode::Cancelled,
        ErrorCode::Overloaded,
        ErrorCode::BackendError,
        ErrorCode::Timeout,
        ErrorCode::NotFound,
        ErrorCode::Internal,
    ])
}

fn result() -> impl Strategy<Value = InferResult> {
    let logprob = || (text(), finite(), prop::collection::vec(any::<u8>(), 0..4));
    let token_logprob =
        (logprob(), prop::collection::vec(logprob(), 0..3)).prop_map(|((token, logprob, bytes), top)| TokenLogprob {
            token,
            logprob,
            bytes,
            top_logprobs: top.into_iter().map(|(token, logprob, bytes)| TopLogprob { token, logprob, bytes }).collect(),
        });
    let output = prop::option::of(
        (
            text(),
            token(),
            prop::collection::vec(tool_call(), 0..2),
            prop::option::of(prop::collection::vec(token_logprob, 0..3)),
        )
            .prop_map(|(text, finish_reason, tool_calls, logprobs)| Output {
                tool_calls,
                logprobs,
                ..Output::text(text, finish_reason)
            }),
    );
    let usage = prop::option::of((any::<u32>(), any::<u32>(), any::<u32>()).prop_map(|(p, c, t)| Usage {
        prompt_tokens: p,
        completion_tokens: c,
        total_tokens: t,
    }));
    let tier = prop::sample::select(vec![
        CacheTier::None,
        CacheTier::Memory,
        CacheTier::Disk,
        CacheTier::Semantic,
        CacheTier::Coalesced,
    ]);
    let timings =
        (finite(), finite(), finite()).prop_map(|(q, c, t)| Timings { queued_ms: q, compute_ms: c, total_ms: t });
    let error = prop::option::of((code(), text(), any::<bool>()).prop_map(|(code, message, retryable)| ErrorBody {
        code,
        message,
        retryable,
    }));
    (
        (any::<u32>(), token(), token(), prop::option::of(token()), prop::option::of(token())),
        any::<bool>(),
        output,
        usage,
        (tier, prop::option::of(finite()), prop::option::of(token())),
        timings,
        text(),
        error,
    )
        .prop_map(
            |(
                (v, id, model, model_revision, adapter),
                ok,
                output,
                usage,
                (cache, cache_similarity, cache_entry),
                timings,
                worker,
                error,
            )| {
                InferResult {
                    v,
                    id,
                    model,
                    model_revision,
                    adapter,
                    status: if ok { Status::Ok } else { Status::Error },
                    output,
                    usage,
                    cache,
                    cache_similarity,
                    cache_entry,
                    timings,
                    worker,
                    error,
                }
            },
        )
}

fn chunk() -> impl Strategy<Value = StreamChunk> {
    (any::<u32>(), token(), any::<u64>(), any::<u64>(), text(), any::<bool>())
        .prop_map(|(v, id, seq, offset, delta, done)| StreamChunk { v, id, seq, offset, delta, done })
}

/// Decodes `bytes` as `T` in both formats; only `Ok`/`Err` may come out.
fn decode_any<T: DeserializeOwned>(bytes: &[u8]) {
    let _ = decode::<T>(None, bytes);
    let _ = decode::<T>(JSON, bytes);
}

/// Flips, truncates or splices `bytes` as told by `edits`.
fn mutate(mut bytes: Vec<u8>, edits: &[(u8, usize, u8)]) -> Vec<u8> {
    for &(kind, at, value) in edits {
        if bytes.is_empty() {
            bytes.push(value);
            continue;
        }
        let at = at % bytes.len();
        match kind % 4 {
            0 => bytes[at] = value,
            1 => bytes.truncate(at),
            2 => bytes.insert(at, value),
            _ => {
                bytes.remove(at);
            }
        }
    }
    bytes
}

fn edits() -> impl Strategy<Value = Vec<(u8, usize, u8)>> {
    prop::collection::vec(any::<(u8, usize, u8)>(), 1..6)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2_000, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_bytes_never_panic_any_decoder(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        decode_any::<InferRequest>(&bytes);
        decode_any::<InferResult>(&bytes);
        decode_any::<StreamChunk>(&bytes);
    }

    #[test]
    fn requests_round_trip_and_survive_mutation(req in request(), e in edits()) {
        let packed = encode(&req);
        prop_assert_eq!(&decode::<InferRequest>(None, &packed).unwrap(), &req);
        let json = serde_json::to_vec(&req).unwrap();
        prop_assert_eq!(&decode::<InferRequest>(JSON, &json).unwrap(), &req);
        decode_any::<InferRequest>(&mutate(packed, &e));
        decode_any::<InferRequest>(&mutate(json, &e));
    }

    #[test]
    fn results_round_trip_and_survive_mutation(res in result(), e in edits()) {
        let packed = encode(&res);
        prop_assert_eq!(&decode::<InferResult>(None, &packed).unwrap(), &res);
        let json = serde_json::to_vec(&res).unwrap();
        prop_assert_eq!(&decode::<InferResult>(JSON, &json).unwrap(), &res);
        decode_any::<InferResult>(&mutate(packed, &e));
        decode_any::<InferResult>(&mutate(json, &e));
    }

    #[test]
    fn chunks_round_trip_and_survive_mutation(c in chunk(), e in edits()) {
        let packed = encode(&c);
        prop_assert_eq!(&decode::<StreamChunk>(None, &packed).unwrap(), &c);
        let json = serde_json::to_vec(&c).unwrap();
        prop_assert_eq!(&decode::<StreamChunk>(JSON, &json).unwrap(), &c);
        decode_any::<StreamChunk>(&mutate(packed, &e));
        decode_any::<StreamChunk>(&mutate(json, &e));
    }

    #[test]
    fn validate_never_panics_on_decoded_requests(req in request(), limit in 0usize..1_000) {
        let _ = req.validate(limit);
    }
}
