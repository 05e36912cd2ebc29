//! The submit service: the one path every HTTP request to the fleet takes,
//! whatever API it came in by. API handlers translate their shapes into a
//! [`Draft`] and call this; they never talk to JetStream or to each other.
//!
//! - [`validate`]: the decision step, `Draft` → [`Prepared`] (validation,
//!   ids, priority, tenant, deadline), pure.
//! - [`queue`]: publishing to the priority stream ([`send`]) and telling
//!   JetStream's refusals apart by their API error code.
//! - this file: token charging, and the three ways to submit: [`call`] (wait
//!   for the results, answered from the ingress's memory when it can),
//!   [`open_stream`] (chunks, then the results) and [`publish`] (fire and
//!   forget). A request asking for `n` choices is `n` requests
//!   ([`Prepared::choice`]), charged together and run side by side.
//! - [`duplicate`]: a request id sent again within the duplicate window
//!   follows the first request's result.

pub mod duplicate;
pub mod queue;
pub mod validate;

use std::time::Instant;

use retro_fleet_schemas::{ErrorCode, InferResult};

pub use queue::{send, Sent};
pub use validate::{Draft, Prepared, Rules};

use super::auth::Principal;
use super::error::ApiError;
use super::ratelimit::{self, RouteClass, Unit};
use super::replies::{Cacheable, Waiter};
use super::state::AppState;

/// [`validate::prepare`] against this ingress's limits and models.
pub fn prepare(
    state: &AppState,
    h: &axum::http::HeaderMap,
    who: &super::auth::Principal,
    d: Draft,
) -> Result<Prepared, ApiError> {
    let rules = Rules {
        max_prompt_bytes: state.cfg.max_prompt_bytes,
        request_timeout_ms: state.cfg.request_timeout_ms,
        models: &state.models,
        max_result_ttl_secs: state.results_max_age_secs,
    };
    validate::prepare(&rules, h, who, d)
}

/// Admits `items` (`(request id, estimated tokens)`, each a request of
/// `tenant` sent by `who`) against their budgets, then takes their tokens
/// from `who`'s token limit; refuses (429) naming `id`, the request or
/// batch charged. Each request's usage record later settles both.
async fn charge(
    state: &AppState,
    who: &Principal,
    tenant: &str,
    id: &str,
    items: &[(String, u64)],
) -> Result<(), ApiError> {
    if let Some(b) = &state.budgets {
        b.admit(who, tenant, items, retro_fleet_worker::unix_ms()).map_err(|e| {
            state.metrics.denied.with_label_values(&[RouteClass::Submit.as_str(), "budget_exceeded"]).inc();
            e.refusal().with_id(id)
        })?;
    }
    if !state.limits.enabled() {
        return Ok(());
    }
    let cost = items.iter().fold(0u64, |sum, (_, t)| sum.saturating_add(*t));
    match state.limits.check(who, RouteClass::Submit, Unit::Tokens, cost).await {
        Some(d) if !d.allowed => {
            if let Some(b) = &state.budgets {
                b.release(tenant, &items.iter().map(|(i, _)| i.as_str()).collect::<Vec<_>>());
            }
            state.metrics.denied.with_label_values(&[RouteClass::Submit.as_str(), "token_limited"]).inc();
            let e = ratelimit::refusal(&d, Unit::Tokens).with_id(id);
            if cost <= d.limit {
                return Err(e);
            }
            let message = format!(
                "estimated at {cost} tokens, over the token limit of {} per window itself: split it (or ask for \
                 a larger limit)",
                d.limit
            );
            Err(ApiError { message, retry_after: None, ..e })
        }
        _ => Ok(()),
    }
}

/// Charges every choice of `p` (see [`charge`]).
async fn charge_tokens(state: &AppState, p: &Prepared) -> Result<(), ApiError> {
    let estimate = state.estimated_tokens(&p.req);
    let items: Vec<(String, u64)> = p.each_choice().iter().map(|c| (c.req.id.clone(), estimate)).collect();
    charge(state, &p.who, &p.tenant, &p.req.id, &items).await
}

/// Charges every line of batch `id` at once (see [`charge`]).
pub async fn charge_batch(state: &AppState, who: &Principal, id: &str, lines: &[Prepared]) -> Result<(), ApiError> {
    let items: Vec<(String, u64)> = lines.iter().map(|p| (p.req.id.clone(), state.estimated_tokens(&p.req))).collect();
    let tenant = lines.first().map_or(who.tenant.as_str(), |p| p.tenant.as_str());
    charge(state, who, tenant, id, &items).await
}

/// A request admitted but not sent: its estimate is no longer held.
pub fn unsent(state: &AppState, p: &Prepared) {
    if let Some(b) = &state.budgets {
        b.release(&p.tenant, &[p.req.id.as_str()]);
    }
}

/// Charges the caller's token limit, then [`send`]s every choice without
/// waiting for a result (they go to `FLEET_RESULTS`, under
/// [`choice_id`](validate::choice_id)s); what the first choice's send was.
pub async fn publish(state: &AppState, p: &Prepared) -> Result<Sent, ApiError> {
    charge_tokens(state, p).await?;
    let mut first = None;
    for c in p.each_choice() {
        let sent = send(state, &c, None).await.inspect_err(|_| unsent(state, &c))?;
        first.get_or_insert(sent);
    }
    Ok(first.expect("at least one choice"))
}

/// The results of every choice of `p`, in order: see [`answer`].
pub async fn call(state: &AppState, p: &Prepared) -> Result<Vec<InferResult>, ApiError> {
    // an answer from memory costs the caller's token limit like any other
    charge_tokens(state, p).await?;
    let choices = p.each_choice();
    futures::future::try_join_all(choices.iter().map(|c| answer(state, c))).await
}

/// Answers `p` (charged) from the ingress's cache, or publishes it and waits
/// for its result (kept for the next identical call when the worker allows);
/// a timeout is 504 with the id.
async fn answer(state: &AppState, p: &Prepared) -> Result<InferResult, ApiError> {
    let started = Instant::now();
    if state.answers.serves(p) {
        if let Some(result) = state.answers.get(p, retro_fleet_worker::unix_ms()) {
            meter(state, p, &result).await?;
            observe(state, p, "ok", started);
            return Ok(result);
        }
    }
    let waiter = register_and_send(state, p).await?;
    let (result, cacheable) = wait_result(state, p, waiter, started).await?;
    if let Some(c) = cacheable {
        state.answers.put(p, &result, c, retro_fleet_worker::unix_ms());
    }
    Ok(result)
}

/// Writes the usage record of an answer from this ingress's memory (a
/// worker writes the others'): the caller is answered only once it is
/// counted, as a worker acks only then.
async fn meter(state: &AppState, p: &Prepared, result: &InferResult) -> Result<(), ApiError> {
    let Some(m) = &state.meter else { return Ok(()) };
    m.record(result, &p.tenant, Some(&p.who.id)).await.map_err(|e| {
        ApiError::new(ErrorCode::Overloaded, format!("NATS did not confirm the usage record ({e}); retry"))
            .with_id(&p.req.id)
            .retry_after(state.cfg.retry_after_secs)
    })
}

/// The first failed choice's error, as its caller is answered.
pub fn failed(results: &[InferResult]) -> Option<ApiError> {
    results.iter().find_map(|r| match (&r.status, &r.error) {
        (retro_fleet_schemas::Status::Error, Some(e)) => Some(ApiError::from(e.clone()).with_id(&r.id)),
        _ => None,
    })
}

fn observe(state: &AppState, p: &Prepared, outcome: &str, started: Instant) {
    state
        .metrics
        .e2e
        .with_label_values(&[p.priority.as_str(), &p.req.model, outcome])
        .observe(started.elapsed().as_secs_f64());
}

async fn wait_result(
    state: &AppState,
    p: &Prepared,
    mut waiter: Waiter,
    started: Instant,
) -> Result<(InferResult, Option<Cacheable>), ApiError> {
    let id = &p.req.id;
    let outcome = tokio::time::timeout(p.timeout, waiter.result_and_cacheable()).await;
    let (label, result) = match outcome {
        Ok(Some(r)) => (r.0.error.as_ref().map_or("ok", |e| e.code.as_str()), Ok(r)),
        _ => (
            "timeout",
            Err(ApiError::new(
                ErrorCode::Timeout,
                format!(
                    "no result within {} ms, so the request was cancelled; its final result (`cancelled`, or the \
                     answer if it finished first) is at /v1/results/{id}",
                    p.timeout.as_millis()
                ),
            )
            .with_id(id)),
        ),
    };
    observe(state, p, label, started);
    result
}

/// Charges the caller's token limit, publishes every choice of `p` and
/// returns the waiters of their chunks and results, in order.
pub async fn open_stream(state: &AppState, p: &Prepared) -> Result<Vec<Waiter>, ApiError> {
    charge_tokens(state, p).await?;
    let mut waiters = Vec::with_capacity(p.choices as usize);
    for c in p.each_choice() {
        // a refusal drops the waiters before it, which cancels their choices
        waiters.push(register_and_send(state, &c).await?);
    }
    Ok(waiters)
}

/// Publishes `p` (already charged) and returns the waiter of its chunks
/// and result; a duplicate follows the first request's result.
pub async fn register_and_send(state: &AppState, p: &Prepared) -> Result<Waiter, ApiError> {
    let (reply, mut waiter) = state.replies.register(&p.tenant, &p.req.id);
    match send(state, p, Some(&reply)).await {
        Ok(Sent::New) => {}
        Ok(Sent::Duplicate { seq }) => {
            // the first request is metered (or held) once: this one holds nothing
            unsent(state, p);
            duplicate::follow(state, p, &mut waiter, seq).await?
        }
        Err(e) => {
            waiter.disarm();
            unsent(state, p);
            return Err(e);
        }
    }
    Ok(waiter)
}
