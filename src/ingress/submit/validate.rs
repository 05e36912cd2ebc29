//! The decision step of a submission: a [`Draft`] (what an API handler
//! read from its body) becomes a [`Prepared`] request (ids, priority,
//! tenant, cache policy, deadline and trace context assigned; fields and
//! model checked), or an [`ApiError`] naming the field at fault. Nothing
//! here touches NATS, so it is tested without a server.
//!
//! This module imports no other submit code and nothing that imports it:
//! the answer cache reads [`Prepared`] from here while the rest of
//! [`super`] calls the answer cache.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use axum::http::HeaderMap as HttpHeaders;
use retro_fleet_schemas::{headers, CacheMode, ErrorCode, InferRequest, Input, Priority, SamplingParams};

use crate::ingress::auth::{Asked, Principal, Use};
use crate::ingress::error::{ApiError, REQUEST_ID};
use crate::ingress::request_id::ID_MADE_HERE;

/// A request as an API handler understood it, before ids and limits.
#[derive(Debug)]
pub struct Draft {
    /// Model name.
    pub model: String,
    /// Adapter.
    pub adapter: Option<String>,
    /// The prompt.
    pub input: Input,
    /// Sampling parameters.
    pub params: SamplingParams,
    /// Stream chunks.
    pub stream: bool,
    /// Cache policy.
    pub cache: CacheMode,
    /// Metadata.
    pub metadata: BTreeMap<String, String>,
    /// Caller's id.
    pub id: Option<String>,
    /// Caller's timeout.
    pub timeout_ms: Option<u64>,
    /// Priority asked for by the body, and the field that asked (the
    /// `X-Priority` header wins).
    pub priority: Option<Asked>,
    /// Choices asked for (OpenAI's `n`; 1 when unset).
    pub n: Option<u32>,
}

/// A request ready to publish.
#[derive(Clone)]
pub struct Prepared {
    /// The wire request.
    pub req: InferRequest,
    /// Its class.
    pub priority: Priority,
    /// Tenant (from the credential).
    pub tenant: String,
    /// How long to wait (also the deadline).
    pub timeout: Duration,
    /// Seconds a cached answer stays valid (`X-Cache-Ttl`), when the caller sets it.
    pub cache_ttl: Option<u64>,
    /// Seconds its result is to be kept (`X-Result-Ttl`), when the caller sets it.
    pub result_ttl: Option<u64>,
    /// W3C trace context: the caller's `traceparent`, or a new one.
    pub traceparent: String,
    /// The caller (for token limits).
    pub who: Principal,
    /// The caller chose the request id (body or `X-Request-Id`).
    pub caller_id: bool,
    /// Choices asked for, 1..=[`MAX_CHOICES`]: each is a request of its own
    /// ([`Prepared::choice`]).
    pub choices: u32,
    /// Where the worker that settles it queues its result as a webhook
    /// event (checked against the allowed hosts).
    pub callback_url: Option<String>,
}

/// The most choices (`n`) one call may ask for.
pub const MAX_CHOICES: u32 = 16;

/// The request id of choice `i` of request `id`: the id itself for the
/// first, `<id>-c<i>` for the others.
pub fn choice_id(id: &str, i: u32) -> String {
    match i {
        0 => id.to_string(),
        _ => format!("{id}-c{i}"),
    }
}

impl Prepared {
    /// Choice `i` of this request, a request of its own: it has
    /// [`choice_id`] as its id and, when seeded, the seed `seed + i` (a
    /// greedy or seeded request's choices are reproducible one by one;
    /// unseeded ones are drawn apart by the worker).
    pub fn choice(&self, i: u32) -> Prepared {
        let mut req = self.req.clone();
        req.id = choice_id(&self.req.id, i);
        req.params.seed = req.params.seed.map(|s| s.wrapping_add(i as u64));
        Prepared {
            req,
            priority: self.priority,
            tenant: self.tenant.clone(),
            timeout: self.timeout,
            cache_ttl: self.cache_ttl,
            result_ttl: self.result_ttl,
            traceparent: self.traceparent.clone(),
            who: self.who.clone(),
            caller_id: self.caller_id,
            choices: 1,
            callback_url: self.callback_url.clone(),
        }
    }

    /// Every choice of this request, in order: the request itself when it
    /// asks for one (no copy on the common path).
    pub fn each_choice(&self) -> Vec<std::borrow::Cow<'_, Prepared>> {
        match self.choices {
            1 => vec![std::borrow::Cow::Borrowed(self)],
            n => (0..n).map(|i| std::borrow::Cow::Owned(self.choice(i))).collect(),
        }
    }
}

/// What a request is checked against: the ingress's limits and models.
pub struct Rules<'a> {
    /// Longest input text, in bytes.
    pub max_prompt_bytes: usize,
    /// Longest wait (ms); a caller's `timeout_ms` may only shorten it.
    pub request_timeout_ms: u64,
    /// Models the fleet serves.
    pub models: &'a BTreeSet<String>,
    /// The longest a result may be kept, seconds (`X-Result-Ttl`'s cap).
    pub max_result_ttl_secs: u64,
}

/// Assigns id, priority and tenant (the caller's), and checks the request
/// and its model against `rules`.
pub fn prepare(rules: &Rules<'_>, h: &HttpHeaders, who: &Principal, d: Draft) -> Result<Prepared, ApiError> {
    let priority = who.class(asked_priority(h, d.priority)?, Use::Request)?;
    let tenant = who.tenant.clone();
    let caller_id = d.id.is_some() || !h.contains_key(ID_MADE_HERE);
    let id =
        d.id.or_else(|| h.get(REQUEST_ID).and_then(|v| v.to_str().ok()).map(str::to_string))
            .unwrap_or_else(|| ulid::Ulid::new().to_string());
    let (cache, cache_ttl) = cache_headers(h, d.cache)?;
    let result_ttl = result_ttl(h, rules.max_result_ttl_secs)?;
    let req = InferRequest {
        v: retro_fleet_schemas::SCHEMA_VERSION,
        id,
        model: d.model,
        adapter: d.adapter,
        input: d.input,
        params: d.params,
        stream: d.stream,
        cache,
        tenant: Some(tenant.clone()),
        metadata: d.metadata,
    };
    check(rules, &req)?;
    let choices = choices(d.n, &req.id)?;
    let cap = Duration::from_millis(rules.request_timeout_ms);
    let timeout = d.timeout_ms.map(Duration::from_millis).map_or(cap, |t| t.min(cap));
    let traceparent = traceparent(h);
    Ok(Prepared {
        req,
        priority,
        tenant,
        timeout,
        cache_ttl,
        result_ttl,
        traceparent,
        who: who.clone(),
        caller_id,
        choices,
        callback_url: None,
    })
}

/// `n`, checked: 1..=[`MAX_CHOICES`], and room in the request id for
/// the last choice's suffix.
fn choices(n: Option<u32>, id: &str) -> Result<u32, ApiError> {
    let n = n.unwrap_or(1);
    if !(1..=MAX_CHOICES).contains(&n) {
        return Err(ApiError::new(ErrorCode::InvalidRequest, format!("`n` must be from 1 to {MAX_CHOICES}, not {n}"))
            .with_id(id)
            .param("n"));
    }
    if choice_id(id, n - 1).len() > 128 {
        return Err(ApiError::new(
            ErrorCode::InvalidRequest,
            format!(
                "with `n` = {n} the request id may be at most {} characters (choices add `-c<i>`)",
                128 - (choice_id(id, n - 1).len() - id.len())
            ),
        )
        .with_id(id)
        .param("id"));
    }
    Ok(n)
}

/// The class asked for: `X-Priority` (wins over the body), else the
/// body's; `None` when neither asks ([`Principal::class`] decides then).
pub fn asked_priority(h: &HttpHeaders, body: Option<Asked>) -> Result<Option<Asked>, ApiError> {
    match h.get("x-priority").and_then(|v| v.to_str().ok()) {
        Some(p) => match p.parse() {
            Ok(class) => Ok(Some((class, "headers.x-priority"))),
            Err(e) => Err(ApiError::new(ErrorCode::InvalidRequest, e).param("headers.x-priority")),
        },
        None => Ok(body),
    }
}

/// `X-Cache: use|bypass|refresh|semantic` (wins over the body) and `X-Cache-Ttl: SECONDS`.
fn cache_headers(h: &HttpHeaders, body: CacheMode) -> Result<(CacheMode, Option<u64>), ApiError> {
    let mode = match h.get("x-cache").and_then(|v| v.to_str().ok()) {
        Some(v) => serde_json::from_value(serde_json::Value::String(v.trim().to_ascii_lowercase())).map_err(|_| {
            ApiError::new(
                ErrorCode::InvalidRequest,
                format!("X-Cache `{v}`: use one of use, bypass, refresh, semantic"),
            )
        })?,
        None => body,
    };
    let ttl = match h.get("x-cache-ttl").and_then(|v| v.to_str().ok()) {
        Some(v) => Some(v.trim().parse::<u64>().map_err(|_| {
            ApiError::new(ErrorCode::InvalidRequest, format!("X-Cache-Ttl `{v}` must be whole seconds"))
        })?),
        None => None,
    };
    Ok((mode, ttl))
}

/// `X-Result-Ttl: SECONDS`: how long to keep the result, from 1 to `max`.
fn result_ttl(h: &HttpHeaders, max: u64) -> Result<Option<u64>, ApiError> {
    let Some(v) = h.get("x-result-ttl") else { return Ok(None) };
    let v = v.to_str().unwrap_or_default().trim();
    match v.parse::<u64>() {
        Ok(secs) if (1..=max).contains(&secs) => Ok(Some(secs)),
        _ => Err(ApiError::new(
            ErrorCode::InvalidRequest,
            format!("X-Result-Ttl `{v}` must be whole seconds from 1 to {max} (how long results are kept at most)"),
        )
        .param("headers.x-result-ttl")),
    }
}

/// The wire's own checks, then whether the model is served here.
fn check(rules: &Rules<'_>, req: &InferRequest) -> Result<(), ApiError> {
    req.validate(rules.max_prompt_bytes).map_err(|e| {
        let err = ApiError::new(e.code, e.message.clone()).with_id(&req.id);
        match e.field {
            Some(p) => err.param(p),
            None => err,
        }
    })?;
    if !rules.models.contains(&req.model) {
        let known: Vec<&str> = rules.models.iter().map(String::as_str).collect();
        return Err(ApiError::new(
            ErrorCode::UnknownModel,
            format!("model `{}` is not served here; models: {}", req.model, known.join(", ")),
        )
        .param("model"));
    }
    Ok(())
}

/// The trace context of the request: the ingress's span of the call when
/// traces are exported, else the caller's W3C `traceparent` when well
/// formed (a span that is not exported carries it), else a new one.
fn traceparent(h: &HttpHeaders) -> String {
    retro_fleet_worker::trace::current_traceparent()
        .or_else(|| {
            h.get(headers::TRACEPARENT)
                .and_then(|v| v.to_str().ok())
                .filter(|t| headers::is_traceparent(t))
                .map(str::to_string)
        })
        .unwrap_or_else(|| headers::new_traceparent(ulid::Ulid::new().0, ulid::Ulid::new().0 as u64))
}

/// Tokens a request may use, as token limits count them: prompt and
/// constraint bytes / 4 (a common rule of thumb for English text) plus
/// `max_tokens`, or `default_output` when it sets none (texts to embed
/// generate nothing).
pub fn estimated_tokens(req: &InferRequest, default_output: u64) -> u64 {
    let output = match req.input.is_embed() {
        true => 0,
        false => req.params.max_tokens.map_or(default_output, u64::from),
    };
    (req.counted_len() as u64).div_ceil(4) + output
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ingress::error::ApiCode;
    use axum::http::HeaderValue;

    fn models() -> BTreeSet<String> {
        ["echo".to_string()].into()
    }

    fn draft(model: &str, prompt: &str) -> Draft {
        Draft {
            model: model.into(),
            adapter: None,
            input: Input::Completion { prompt: prompt.into() },
            params: SamplingParams::default(),
            stream: false,
            cache: CacheMode::Use,
            metadata: BTreeMap::new(),
            id: None,
            timeout_ms: None,
            priority: None,
            n: None,
        }
    }

    fn who() -> Principal {
        Principal::new("key:a", "acme", Default::default())
    }

    fn headers(pairs: &[(&'static str, &str)]) -> HttpHeaders {
        let mut h = HttpHeaders::new();
        for (k, v) in pairs {
            h.insert(*k, HeaderValue::from_str(v).unwrap());
        }
        h
    }

    #[test]
    fn assigns_tenant_priority_id_and_a_capped_timeout() {
        let models = models();
        let rules =
            Rules { max_prompt_bytes: 100, request_timeout_ms: 5_000, models: &models, max_result_ttl_secs: 60 };
        let h = headers(&[("x-priority", "high"), (REQUEST_ID, "made-here"), (ID_MADE_HERE, "1")]);
        let mut d = draft("echo", "hi");
        d.priority = Some((Priority::Low, "priority"));
        d.timeout_ms = Some(60_000);
        let p = prepare(&rules, &h, &who(), d).unwrap();
        assert_eq!((p.priority, p.tenant.as_str(), p.req.tenant.as_deref()), (Priority::High, "acme", Some("acme")));
        assert_eq!((p.req.id.as_str(), p.caller_id), ("made-here", false), "the guard's id is not the caller's");
        assert_eq!(p.timeout, Duration::from_secs(5), "capped by the ingress timeout");
        assert!(headers::is_traceparent(&p.traceparent));

        let mut d = draft("echo", "hi");
        d.id = Some("mine".into());
        let p = prepare(&rules, &headers(&[("x-cache", "Bypass"), ("x-cache-ttl", "7")]), &who(), d).unwrap();
        assert_eq!((p.req.id.as_str(), p.caller_id, p.priority), ("mine", true, Priority::Normal));
        assert_eq!((p.req.cache, p.cache_ttl), (CacheMode::Bypass, Some(7)));
    }

    #[test]
    fn refusals_name_their_field() {
        let models = models();
        let rules = Rules { max_prompt_bytes: 4, request_timeout_ms: 5_000, models: &models, max_result_ttl_secs: 60 };
        let refuse = |h: &HttpHeaders, d: Draft| prepare(&rules, h, &who(), d).err().expect("refused");

        let e = refuse(&HttpHeaders::new(), draft("gpt", "hi"));
        assert_eq!((e.code, e.param.as_deref()), (ApiCode::Wire(ErrorCode::UnknownModel), Some("model")));
        let e = refuse(&HttpHeaders::new(), draft("echo", "too long"));
        assert_eq!((e.code, e.param.as_deref()), (ApiCode::Wire(ErrorCode::PromptTooLarge), Some("input")));
        let mut d = draft("echo", "hi");
        d.params.top_p = Some(0.0);
        let e = refuse(&HttpHeaders::new(), d);
        assert_eq!((e.code, e.param.as_deref()), (ApiCode::Wire(ErrorCode::InvalidRequest), Some("params.top_p")));
        assert!(e.request_id.is_some(), "a refused request keeps the id it was given");
        let e = refuse(&headers(&[("x-priority", "urgent")]), draft("echo", "hi"));
        assert_eq!(e.param.as_deref(), Some("headers.x-priority"));
        let e = refuse(&headers(&[("x-cache", "sometimes")]), draft("echo", "hi"));
        assert_eq!(e.code, ApiCode::Wire(ErrorCode::InvalidRequest));
    }

    #[test]
    fn choices_are_requests_of_their_own() {
        let models = models();
        let rules =
            Rules { max_prompt_bytes: 100, request_timeout_ms: 5_000, models: &models, max_result_ttl_secs: 60 };
        let mut d = draft("echo", "hi");
        (d.id, d.n, d.params.seed) = (Some("job".into()), Some(3), Some(u64::MAX));
        let p = prepare(&rules, &HttpHeaders::new(), &who(), d).unwrap();
        let each: Vec<_> = p.each_choice().iter().map(|c| (c.req.id.clone(), c.req.params.seed, c.choices)).collect();
        assert_eq!(
            each,
            [("job".into(), Some(u64::MAX), 1), ("job-c1".into(), Some(0), 1), ("job-c2".into(), Some(1), 1)]
        );
        let mut d = draft("echo", "hi");
        d.n = Some(2);
        let unseeded = prepare(&rules, &HttpHeaders::new(), &who(), d).unwrap();
        assert!(unseeded.each_choice().iter().all(|c| c.req.params.seed.is_none()), "the worker draws them apart");

        let refuse = |d: Draft| prepare(&rules, &HttpHeaders::new(), &who(), d).err().expect("refused");
        for n in [0, MAX_CHOICES + 1] {
            let mut d = draft("echo", "hi");
            d.n = Some(n);
            assert_eq!(refuse(d).param.as_deref(), Some("n"));
        }
        let mut d = draft("echo", "hi");
        (d.id, d.n) = (Some("x".repeat(126)), Some(MAX_CHOICES));
        let e = refuse(d);
        assert_eq!(e.param.as_deref(), Some("id"), "{}", e.message);
        assert!(e.message.contains("at most 124"), "{}", e.message);
    }

    #[test]
    fn estimates_prompt_bytes_over_four_plus_max_tokens() {
        let mut req = prepare(
            &Rules { max_prompt_bytes: 100, request_timeout_ms: 1, models: &models(), max_result_ttl_secs: 60 },
            &HttpHeaders::new(),
            &who(),
            draft("echo", "hello"),
        )
        .unwrap()
        .req;
        assert_eq!(estimated_tokens(&req, 16), 2 + 16);
        req.params.max_tokens = Some(3);
        assert_eq!(estimated_tokens(&req, 16), 2 + 3);
    }
}
