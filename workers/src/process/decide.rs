//! Deciding what to do with a delivered message, before anything is done.
//! Pure: no NATS, no clock, no backend call; unit-tested below.
//!
//! Two steps, because one answer needs a read in between: [`decide`] turns
//! the message into a [`Job`] or a [`Rejection`]; for a message delivered
//! before, the stored result is read, and [`admit`] then says whether to
//! re-send it, give up, answer "deadline passed" or run.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

use retro_fleet_schemas::{codec, subjects, ErrorCode, InferRequest, InferResult, Priority, Received};

use crate::backend::Backend;

/// Who asked, as far as is known: where an error result can go.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Ids {
    /// Request id, when known (from the body, else from `Nats-Msg-Id`).
    pub id: Option<String>,
    /// Tenant, when known and valid.
    pub tenant: Option<String>,
    /// Reply subject, when given.
    pub reply: Option<String>,
    /// Seconds the result is kept (`Fleet-Result-Ttl`; none: the stream's max age).
    pub keep_secs: Option<u64>,
    /// The credential that sent it (`Fleet-Caller`), for the usage record.
    pub caller: Option<String>,
}

impl Ids {
    /// What the envelope alone tells (the body could not be read).
    pub fn of_envelope(env: &Received<'_>) -> Ids {
        Ids {
            id: env.id.map(str::to_string),
            tenant: env.tenant.filter(|t| subjects::is_token(t)).map(str::to_string),
            reply: env.reply.map(str::to_string),
            keep_secs: env.result_ttl_secs,
            caller: env.caller.map(str::to_string),
        }
    }
}

/// A message given up: dead-lettered, answered with an error where someone
/// can see it, and terminated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    /// Where the error result goes.
    pub ids: Ids,
    /// Stable code.
    pub code: ErrorCode,
    /// What is wrong and what to do.
    pub message: String,
}

/// A valid request for a model (and adapter) this worker serves.
pub struct Job {
    /// The request.
    pub req: InferRequest,
    /// Its tenant (the header's, else the body's, else the default).
    pub tenant: String,
    /// Reply subject for chunks and the result.
    pub reply: Option<String>,
    /// The model's backend here.
    pub backend: Arc<dyn Backend>,
    /// Deliveries so far, this one included.
    pub delivered: i64,
    /// Deadline, unix ms.
    pub deadline_ms: Option<u64>,
    /// The request's own cache lifetime, seconds.
    pub cache_ttl_secs: Option<u64>,
    /// Seconds its result is kept (none: the stream's max age).
    pub result_ttl_secs: Option<u64>,
    /// The credential that sent it, for the usage record.
    pub caller: Option<String>,
}

impl Job {
    /// Where this job's error results go.
    pub fn ids(&self) -> Ids {
        Ids {
            id: Some(self.req.id.clone()),
            tenant: Some(self.tenant.clone()),
            reply: self.reply.clone(),
            keep_secs: self.result_ttl_secs,
            caller: self.caller.clone(),
        }
    }
}

/// A delivered message, as far as deciding needs it.
pub struct Delivery<'a> {
    /// Subject it was published to.
    pub subject: &'a str,
    /// Class of the stream it came from.
    pub priority: Priority,
    /// Its header envelope.
    pub envelope: Received<'a>,
    /// Its body.
    pub payload: &'a [u8],
    /// Deliveries so far, this one included.
    pub delivered: i64,
}

/// What this worker serves.
pub struct Served<'a> {
    /// Backends of the models this worker serves.
    pub backends: &'a HashMap<String, Arc<dyn Backend>>,
    /// Every model configured in the fleet (to tell "unknown" from "not mine").
    pub catalog: &'a BTreeSet<String>,
    /// Largest prompt accepted, bytes.
    pub max_prompt_bytes: usize,
}

/// A valid request for a model and adapter this worker serves, or why not.
pub fn decide(d: &Delivery<'_>, served: &Served<'_>) -> Result<Job, Rejection> {
    let env = &d.envelope;
    let req = parse(d, served.max_prompt_bytes).map_err(|(code, message)| Rejection {
        ids: Ids::of_envelope(env),
        code,
        message,
    })?;
    let named = env.tenant.or(req.tenant.as_deref());
    let lane = subjects::parse_request(d.subject).and_then(|(_, _, t)| t);
    if let (Some(lane), Some(named)) = (lane, named) {
        if lane != named {
            // not stored: NATS permissions can hold a publisher to its
            // tenant's subjects but not to a header, so neither is trusted
            let ids = Ids { id: None, tenant: None, ..Ids::of_envelope(env) };
            let message = format!(
                "request names tenant `{named}` but was published to tenant `{lane}`'s subject `{}`",
                d.subject
            );
            return Err(Rejection { ids, code: ErrorCode::InvalidRequest, message });
        }
    }
    let tenant = named.or(lane).unwrap_or(subjects::DEFAULT_TENANT).to_string();
    if !subjects::is_token(&tenant) {
        // not stored: a result subject needs a valid tenant, and storing it
        // under another tenant could take the place of that tenant's result
        let ids = Ids { id: None, tenant: None, ..Ids::of_envelope(env) };
        let message = format!("tenant `{tenant}` must be characters from [A-Za-z0-9_-]");
        return Err(Rejection { ids, code: ErrorCode::InvalidRequest, message });
    }
    let ids = Ids { id: Some(req.id.clone()), tenant: Some(tenant.clone()), ..Ids::of_envelope(env) };
    let Some(backend) = served.backends.get(&req.model) else {
        let message = match served.catalog.contains(&req.model) {
            true => format!("model `{}` is configured but this worker does not serve it", req.model),
            false => format!("model `{}` is not configured in this fleet", req.model),
        };
        return Err(Rejection { ids, code: ErrorCode::UnknownModel, message });
    };
    if let Some(adapter) = &req.adapter {
        let known = backend.adapters();
        if !known.contains(adapter) {
            let model = &req.model;
            let message = match known.is_empty() {
                true => format!("model `{model}` has no LoRA adapters; `{adapter}` cannot be applied"),
                false => format!("model `{model}` has no adapter `{adapter}`; adapters: {}", known.join(", ")),
            };
            return Err(Rejection { ids, code: ErrorCode::InvalidRequest, message });
        }
    }
    Ok(Job {
        req,
        tenant,
        reply: ids.reply,
        backend: backend.clone(),
        delivered: d.delivered,
        deadline_ms: env.deadline_ms,
        cache_ttl_secs: env.cache_ttl_secs,
        result_ttl_secs: env.result_ttl_secs,
        caller: ids.caller,
    })
}

/// The body as a valid request published to its own model's subject.
fn parse(d: &Delivery<'_>, max_prompt_bytes: usize) -> Result<InferRequest, (ErrorCode, String)> {
    let req: InferRequest =
        codec::decode(d.envelope.content_type, d.payload).map_err(|e| (ErrorCode::DecodeError, e.0))?;
    req.validate(max_prompt_bytes).map_err(|e| (e.code, e.message))?;
    let lane = subjects::parse_request(d.subject);
    if lane.map(|(_, m, _)| m) != Some(req.model.as_str()) {
        let tenant = lane.and_then(|(_, _, t)| t).unwrap_or(subjects::DEFAULT_TENANT);
        let message = format!(
            "request for model `{}` was published to `{}`; publish to `{}`",
            req.model,
            d.subject,
            subjects::tenant_request(d.priority, &req.model, tenant)
        );
        return Err((ErrorCode::InvalidRequest, message));
    }
    Ok(req)
}

/// What to do with a valid job, once it is known whether a result is stored.
#[derive(Debug, Clone, PartialEq)]
pub enum Admission {
    /// An earlier delivery stored its result before its worker died: send
    /// that one again, never a second computation.
    Answered(InferResult),
    /// Delivered too often without a result.
    GiveUp(Rejection),
    /// The deadline passed this long ago before a worker picked it up.
    Expired {
        /// Milliseconds past the deadline.
        late_ms: u64,
    },
    /// Run it.
    Run,
}

/// Whether `job` runs: `stored` is the result stored for it (read only
/// when it was delivered before), `max_deliver` the deliveries after which
/// it is given up.
pub fn admit(job: &Job, stored: Option<InferResult>, now_ms: u64, max_deliver: i64) -> Admission {
    if let Some(stored) = stored {
        return Admission::Answered(stored);
    }
    if job.delivered > max_deliver {
        // The server redelivers without limit so that no message can be
        // stranded; the limit is applied here, before any compute.
        let message = format!(
            "delivered {} times without a result (max_deliver {max_deliver}): workers died or stalled while running it",
            job.delivered
        );
        return Admission::GiveUp(Rejection { ids: job.ids(), code: ErrorCode::Internal, message });
    }
    match job.deadline_ms {
        Some(deadline) if now_ms > deadline => Admission::Expired { late_ms: now_ms - deadline },
        _ => Admission::Run,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::echo::Echo;
    use retro_fleet_schemas::Envelope;

    fn served_echo() -> (HashMap<String, Arc<dyn Backend>>, BTreeSet<String>) {
        let backends = HashMap::from([("echo".to_string(), Arc::new(Echo::new(None)) as Arc<dyn Backend>)]);
        (backends, BTreeSet::from(["echo".to_string(), "big".to_string()]))
    }

    fn request(id: &str, model: &str) -> InferRequest {
        let mut r = crate::backend::tests_support::request(id);
        r.model = model.into();
        r
    }

    fn decide_on(subject: &str, env: &async_nats::HeaderMap, payload: &[u8]) -> Result<Job, Rejection> {
        let (backends, catalog) = served_echo();
        let served = Served { backends: &backends, catalog: &catalog, max_prompt_bytes: 1 << 20 };
        let d = Delivery {
            subject,
            priority: Priority::Normal,
            envelope: Received::read(Some(env)),
            payload,
            delivered: 1,
        };
        decide(&d, &served)
    }

    #[test]
    fn a_valid_request_becomes_a_job_with_its_envelope() {
        let env = Envelope::new("r1").tenant("acme").reply("inbox.1").deadline_ms(99).headers();
        let job = decide_on("fleet.req.normal.echo", &env, &codec::encode(&request("r1", "echo"))).unwrap();
        assert_eq!((job.tenant.as_str(), job.reply.as_deref(), job.deadline_ms), ("acme", Some("inbox.1"), Some(99)));
        assert_eq!(job.req.id, "r1");
    }

    #[test]
    fn each_kind_of_bad_message_is_rejected_with_its_code() {
        let env = Envelope::new("r2").tenant("acme").reply("inbox.2").headers();
        let body = |model: &str| codec::encode(&request("r2", model));
        let code = |subject: &str, payload: &[u8]| decide_on(subject, &env, payload).err().map(|r| r.code);
        assert_eq!(code("fleet.req.normal.echo", b"\xc1garbage"), Some(ErrorCode::DecodeError));
        assert_eq!(code("fleet.req.normal.other", &body("echo")), Some(ErrorCode::InvalidRequest), "wrong subject");
        assert_eq!(code("fleet.req.normal.nope", &body("nope")), Some(ErrorCode::UnknownModel));
        let not_mine = decide_on("fleet.req.normal.big", &env, &body("big")).err().unwrap();
        assert!(not_mine.message.contains("does not serve it"), "{}", not_mine.message);
        let mut with_adapter = request("r2", "echo");
        with_adapter.adapter = Some("lora".into());
        let r = decide_on("fleet.req.normal.echo", &env, &codec::encode(&with_adapter)).err().unwrap();
        assert_eq!(r.code, ErrorCode::InvalidRequest);
        assert!(r.message.contains("no LoRA adapters"), "{}", r.message);
    }

    #[test]
    fn a_rejection_goes_where_the_caller_can_see_it() {
        // undecodable: only the envelope is known
        let env = Envelope::new("r3").tenant("acme").reply("inbox.3").headers();
        let r = decide_on("fleet.req.normal.echo", &env, b"\xc1").err().unwrap();
        let ids =
            Ids { id: Some("r3".into()), tenant: Some("acme".into()), reply: Some("inbox.3".into()), ..Ids::default() };
        assert_eq!(r.ids, ids);
        // a tenant that cannot name a result subject: reply only, never stored
        let mut env = async_nats::HeaderMap::new();
        env.insert(retro_fleet_schemas::headers::TENANT, "a b");
        env.insert(retro_fleet_schemas::headers::REPLY, "i");
        let r = decide_on("fleet.req.normal.echo", &env, &codec::encode(&request("r4", "echo"))).err().unwrap();
        assert_eq!(r.ids, Ids { reply: Some("i".into()), ..Ids::default() });
    }

    #[test]
    fn admission_prefers_a_stored_result_then_the_delivery_limit_then_the_deadline() {
        let env = Envelope::new("r5").deadline_ms(1_000).headers();
        let mut job = decide_on("fleet.req.normal.echo", &env, &codec::encode(&request("r5", "echo"))).unwrap();
        assert_eq!(admit(&job, None, 999, 5), Admission::Run);
        assert_eq!(admit(&job, None, 1_250, 5), Admission::Expired { late_ms: 250 });
        job.delivered = 6;
        let Admission::GiveUp(r) = admit(&job, None, 0, 5) else { panic!("over the limit") };
        assert_eq!(r.code, ErrorCode::Internal);
        let stored = InferResult::error("r5", "echo", ErrorCode::Cancelled, "earlier");
        assert_eq!(admit(&job, Some(stored.clone()), 2_000, 5), Admission::Answered(stored));
    }
}
