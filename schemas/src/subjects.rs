//! Names of streams, subjects, consumers and buckets.

use crate::priority::Priority;

/// Request stream of a priority class.
pub fn request_stream(p: Priority) -> &'static str {
    match p {
        Priority::High => "FLEET_REQ_HIGH",
        Priority::Normal => "FLEET_REQ_NORMAL",
        Priority::Low => "FLEET_REQ_LOW",
    }
}

/// Results stream.
pub const RESULTS_STREAM: &str = "FLEET_RESULTS";
/// Dead-letter stream.
pub const DLQ_STREAM: &str = "FLEET_DLQ";
/// Worker registry bucket.
pub const WORKERS_BUCKET: &str = "fleet_workers";
/// Cache generation per model: any change makes the model's cached answers unreachable.
pub const MODELS_BUCKET: &str = "fleet_models";
/// Short-lived claims so that one worker computes an answer others wait for.
pub const CACHE_CLAIMS_BUCKET: &str = "fleet_cache_claims";
/// Batch records of the ingress's batch API.
pub const BATCHES_BUCKET: &str = "fleet_batches";
/// Object Store of the Files API (`/v1/files`): batch input and output
/// files, named `<tenant>/<file id>`.
pub const FILES_BUCKET: &str = "fleet_files";
/// Work queue of batches to run: one message per batch, held by the
/// ingress running it (its lease) and acknowledged when the batch ends.
pub const BATCH_RUNS_STREAM: &str = "FLEET_BATCH_RUNS";
/// Subjects of [`BATCH_RUNS_STREAM`].
pub const BATCH_RUNS_WILDCARD: &str = "fleet.batch.run.>";
/// The consumer every ingress pulls batches to run from.
pub const BATCH_RUNNERS: &str = "batch-runners";
/// Work queue of webhook events to deliver.
pub const WEBHOOKS_STREAM: &str = "FLEET_WEBHOOKS";
/// Subjects of [`WEBHOOKS_STREAM`].
pub const WEBHOOK_SEND_WILDCARD: &str = "fleet.webhook.send.*";
/// The consumer every ingress delivers webhook events from.
pub const WEBHOOK_SENDERS: &str = "webhook-senders";
/// Every webhook delivery attempt, with its outcome.
pub const WEBHOOK_LOG_STREAM: &str = "FLEET_WEBHOOK_LOG";
/// Subjects of [`WEBHOOK_LOG_STREAM`].
pub const WEBHOOK_LOG_WILDCARD: &str = "fleet.webhook.log.*";
/// API keys managed at run time (`retro-fleet keys`), one per key id.
pub const API_KEYS_BUCKET: &str = "fleet_api_keys";
/// Operators' settings per tenant (weights), one JSON entry per tenant.
pub const TENANTS_BUCKET: &str = "fleet_tenants";
/// Rate-limit counters shared by ingress replicas.
pub const RATELIMIT_BUCKET: &str = "fleet_ratelimit";
/// Generated token ids of running requests, per tenant and id, so that a
/// redelivered request resumes where its dead worker got to.
pub const CHECKPOINTS_BUCKET: &str = "fleet_checkpoints";
/// Asks every worker to warm its cache from `FLEET_RESULTS` (core NATS request, one reply per worker).
pub const CACHE_WARM: &str = "fleet.ctl.cache.warm";
/// Verdicts on semantic answers, to every worker (core NATS request; the
/// workers holding the entry reply).
pub const CACHE_FEEDBACK: &str = "fleet.ctl.cache.feedback";
/// Control subjects (core NATS).
pub const CONTROL_PREFIX: &str = "fleet.ctl";

/// Wildcard of cancel messages (core NATS, empty body).
pub const CANCEL_WILDCARD: &str = "fleet.ctl.cancel.*.*";

/// Subject that cancels request `id` of `tenant` (ids are per tenant).
pub fn cancel(tenant: &str, id: &str) -> String {
    format!("fleet.ctl.cancel.{tenant}.{id}")
}

/// The tenant and request id of a cancel subject.
pub fn parse_cancel(subject: &str) -> Option<(&str, &str)> {
    let (tenant, id) = subject.strip_prefix("fleet.ctl.cancel.")?.split_once('.')?;
    (is_token(tenant) && is_token(id)).then_some((tenant, id))
}

/// The request id in a `Nats-Msg-Id`: the HTTP ingress writes
/// `<tenant>.<id>` for tenants other than the default (ids are per tenant),
/// NATS publishers the bare id. `None` when it is not a valid id.
pub fn id_of_msg_id<'a>(msg_id: &'a str, tenant: Option<&str>) -> Option<&'a str> {
    let id = tenant.and_then(|t| msg_id.strip_prefix(t)?.strip_prefix('.')).unwrap_or(msg_id);
    is_token(id).then_some(id)
}

/// Subject that drains worker `key` (its registry key): it stops taking
/// requests, finishes the ones it runs, and stays up (core NATS request).
pub fn drain(key: &str) -> String {
    format!("fleet.ctl.drain.{key}")
}

/// Subject that lets drained worker `key` take requests again.
pub fn resume(key: &str) -> String {
    format!("fleet.ctl.resume.{key}")
}

/// Subject a request for `model` at priority `p` is published to: the
/// model's shared lane, which serves requests in arrival order whatever
/// their tenant.
pub fn request(p: Priority, model: &str) -> String {
    format!("fleet.req.{}.{model}", p.as_str())
}

/// Subject of `tenant`'s lane for `model` at `p`: workers share their slots
/// fairly between lanes, so a tenant flooding its lane does not delay
/// another's. The default tenant's lane is the shared one.
pub fn tenant_request(p: Priority, model: &str, tenant: &str) -> String {
    match tenant {
        DEFAULT_TENANT => request(p, model),
        t => lane(p, model, t),
    }
}

/// Subject of `tenant`'s own lane for `model` at `p` (the default tenant
/// may have one too, beside the shared lane it is served from by default).
pub fn lane(p: Priority, model: &str, tenant: &str) -> String {
    format!("fleet.req.{}.{model}.{tenant}", p.as_str())
}

/// Wildcard of a request stream.
pub fn request_wildcard(p: Priority) -> String {
    format!("fleet.req.{}.>", p.as_str())
}

/// Parses `fleet.req.<priority>.<model>` and `fleet.req.<priority>.<model>.<tenant>`:
/// the class, the model and the tenant of the lane (none for the shared lane).
pub fn parse_request(subject: &str) -> Option<(Priority, &str, Option<&str>)> {
    let mut tokens = subject.strip_prefix("fleet.req.")?.split('.');
    let p = tokens.next()?.parse().ok()?;
    let model = tokens.next().filter(|m| !m.is_empty())?;
    let tenant = tokens.next();
    if tokens.next().is_some() || tenant == Some("") {
        return None;
    }
    Some((p, model, tenant))
}

/// Subject of a stored result.
pub fn result(tenant: &str, id: &str) -> String {
    format!("fleet.res.{tenant}.{id}")
}

/// Wildcard of the results stream.
pub const RESULTS_WILDCARD: &str = "fleet.res.>";

/// Stream of usage records.
pub const USAGE_STREAM: &str = "FLEET_USAGE";

/// Wildcard of the usage stream.
pub const USAGE_WILDCARD: &str = "fleet.usage.>";

/// Subject of a usage record of `tenant` for `model`.
pub fn usage(tenant: &str, model: &str) -> String {
    format!("fleet.usage.{tenant}.{model}")
}

/// `Nats-Msg-Id` of request `id`'s usage record: one per request id and tenant.
pub fn usage_msg_id(tenant: &str, id: &str) -> String {
    format!("{tenant}.{id}")
}

/// Stream of recorded requests (see [`crate::archive`]); off unless configured.
pub const ARCHIVE_STREAM: &str = "FLEET_ARCHIVE";

/// Wildcard of the archive stream.
pub const ARCHIVE_WILDCARD: &str = "fleet.archive.>";

/// Subject of a recorded request of `tenant` for `model`.
pub fn archive(tenant: &str, model: &str) -> String {
    format!("fleet.archive.{tenant}.{model}")
}

/// Subject of a dead letter.
pub fn dlq(p: Priority, model: &str) -> String {
    format!("fleet.dlq.{}.{model}", p.as_str())
}

/// Wildcard of the DLQ stream.
pub const DLQ_WILDCARD: &str = "fleet.dlq.>";

/// Durable name of the worker consumer of `model`'s shared lane (one per
/// request stream; `topology apply` creates it).
pub fn consumer(model: &str) -> String {
    format!("worker_{model}")
}

/// Durable name of the worker consumer of `tenant`'s lane for `model`.
/// Workers create it when the lane has requests, from the shared lane's
/// configuration, and the server removes it after a while without workers.
pub fn tenant_consumer(model: &str, tenant: &str) -> String {
    format!("worker_{model}@{tenant}")
}

/// The model and lane tenant of a worker consumer's name.
pub fn parse_consumer(name: &str) -> Option<(&str, Option<&str>)> {
    let rest = name.strip_prefix("worker_")?;
    match rest.split_once('@') {
        Some((model, tenant)) => (is_token(model) && is_token(tenant)).then_some((model, Some(tenant))),
        None => is_token(rest).then_some((rest, None)),
    }
}

/// Subject the scaler publishes `model`'s recommendation on (core NATS).
pub fn scaling(model: &str) -> String {
    format!("fleet.scaling.{model}")
}

/// Every model's scaling report.
pub const SCALING_WILDCARD: &str = "fleet.scaling.*";

/// Subject of the run of batch `id` of `tenant`.
pub fn batch_run(tenant: &str, id: &str) -> String {
    format!("fleet.batch.run.{tenant}.{id}")
}

/// Subject of a webhook event of `tenant` to deliver.
pub fn webhook_send(tenant: &str) -> String {
    format!("fleet.webhook.send.{tenant}")
}

/// Subject of a webhook delivery attempt of `tenant`.
pub fn webhook_log(tenant: &str) -> String {
    format!("fleet.webhook.log.{tenant}")
}

/// Tenant used when a request names none.
pub const DEFAULT_TENANT: &str = "default";

/// Whether `s` is usable as one subject token and in consumer names:
/// non-empty, ASCII letters, digits, `_` and `-` only.
pub fn is_token(s: &str) -> bool {
    !s.is_empty() && s.len() <= 256 && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_subject_round_trips() {
        for p in Priority::ALL {
            let s = request(p, "tiny-llama");
            assert_eq!(parse_request(&s), Some((p, "tiny-llama", None)));
            let s = tenant_request(p, "tiny-llama", "acme");
            assert_eq!(parse_request(&s), Some((p, "tiny-llama", Some("acme"))));
            assert_eq!(tenant_request(p, "m", DEFAULT_TENANT), request(p, "m"));
        }
        assert_eq!(parse_request("fleet.req.urgent.x"), None);
        assert_eq!(parse_request("fleet.res.a.b"), None);
        assert_eq!(parse_request("fleet.req.low.m.t.extra"), None);
        assert_eq!(parse_request("fleet.req.low.m."), None);
        assert_eq!(parse_request("fleet.req.low."), None);
    }

    #[test]
    fn consumer_names_round_trip() {
        assert_eq!(parse_consumer(&consumer("a_b")), Some(("a_b", None)));
        assert_eq!(parse_consumer(&tenant_consumer("a_b", "c-d")), Some(("a_b", Some("c-d"))));
        assert_eq!(parse_consumer("scaler"), None);
        assert_eq!(parse_consumer("worker_a@b@c"), None);
    }

    #[test]
    fn cancel_subject_round_trips() {
        assert_eq!(parse_cancel(&cancel("acme", "01J-x_y")), Some(("acme", "01J-x_y")));
        assert_eq!(parse_cancel("fleet.ctl.cancel.a"), None);
        assert_eq!(id_of_msg_id("acme.job-1", Some("acme")), Some("job-1"));
        assert_eq!(id_of_msg_id("job-1", Some("acme")), Some("job-1"));
        assert_eq!(id_of_msg_id("job-1", None), Some("job-1"));
        assert_eq!(id_of_msg_id("other.job-1", Some("acme")), None);
        assert_eq!(parse_cancel("fleet.ctl.cancel.a.b.c"), None);
        assert_eq!(parse_cancel("fleet.ctl.drain.a"), None);
    }

    #[test]
    fn tokens() {
        assert!(is_token("01HZX3-abc_D"));
        assert!(!is_token(""));
        assert!(!is_token("a.b"));
        assert!(!is_token("a*"));
        assert!(!is_token("a b"));
        assert!(!is_token("a>"));
    }
}
