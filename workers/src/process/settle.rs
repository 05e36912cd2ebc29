//! Settling a message: every store, reply, dead letter and ack/nak/term of
//! the worker happens here, in the order one table gives ([`Settlement::steps`]).
//!
//! Ack discipline: a result is written to `FLEET_RESULTS` first (the first
//! writer wins), then the stored result goes to the reply subject, then its
//! usage record is written (when metering), then the request is recorded in
//! the archive (when it is on), then its webhook event is queued (when it
//! names a callback URL), then the message is acked. A message given up is
//! dead-lettered with its original payload before it is terminated; if the
//! dead letter cannot be written it is nak'ed instead, so nothing is lost.
//! Retryable failures are nak'ed with a delay.

use std::borrow::Cow;
use std::time::Duration;

use async_nats::jetstream::{self, AckKind};
use async_nats::HeaderMap;
use bytes::Bytes;
use retro_fleet_schemas::archive::{self, Recorded};
use retro_fleet_schemas::envelope::{dead_letter_headers, GivenUp};
use retro_fleet_schemas::stored::{decode as decode_stored, stored_message, StoredError};
use retro_fleet_schemas::webhook::{self, Event};
use retro_fleet_schemas::{codec, headers, subjects, ErrorCode, InferRequest, InferResult, Priority, Received};

use super::decide::{Ids, Rejection};
use super::shared::Shared;
use crate::cache::Key;
use crate::{failover, trace};

/// How a message is settled; made by deciding and running, carried out by [`settle`].
#[derive(Debug)]
pub enum Settlement {
    /// Store the result (first writer wins), reply with what is stored, ack.
    Answer {
        /// The result (an answer, or a final error such as `cancelled`).
        result: Box<InferResult>,
        /// Its tenant and reply subject.
        to: Ids,
        /// The cache key and expiry the answer is kept under, recorded with it.
        cached: Option<(Key, u64)>,
    },
    /// Reply with the result an earlier delivery stored, ack.
    Resend {
        /// The stored result.
        result: Box<InferResult>,
        /// The reply subject.
        reply: Option<String>,
        /// The request's tenant.
        tenant: String,
        /// The credential that sent it, for the usage record.
        caller: Option<String>,
    },
    /// Nak with a delay: another attempt (maybe elsewhere) may succeed.
    Retry {
        /// Redelivery delay.
        delay: Duration,
    },
    /// Dead letter, error result, term.
    GiveUp(Rejection),
}

/// One effect of settling.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Write the result to `FLEET_RESULTS`, then reply with the stored one.
    Store,
    /// Reply with a result already stored.
    Resend,
    /// Write the dead letter; when that fails, nak instead of every later step.
    DeadLetter,
    /// Store (when the id is known) and reply the error result.
    ErrorResult,
    /// Write the usage record of the result the caller got, when one was
    /// stored or re-sent and metering is on (see [`crate::usage`]).
    Meter,
    /// Record the request and the result its caller got in `FLEET_ARCHIVE`,
    /// when the archive is on (see [`retro_fleet_schemas::archive`]).
    Archive,
    /// Queue the result as a webhook event on `FLEET_WEBHOOKS`, when the
    /// request names a `Fleet-Callback-Url`; when that fails, the message is
    /// left for redelivery (its event id is the request's: queued once).
    Callback,
    /// Remove the request's checkpoint, when it may have one (the request
    /// is settled: no attempt will resume it).
    Forget,
    /// Done.
    Ack,
    /// Redeliver later.
    Nak,
    /// Never redeliver.
    Term,
}

impl Settlement {
    /// The effects of this settlement, in order.
    pub fn steps(&self) -> &'static [Step] {
        match self {
            Settlement::Answer { .. } => {
                &[Step::Store, Step::Meter, Step::Archive, Step::Callback, Step::Forget, Step::Ack]
            }
            Settlement::Resend { .. } => {
                &[Step::Resend, Step::Meter, Step::Archive, Step::Callback, Step::Forget, Step::Ack]
            }
            Settlement::Retry { .. } => &[Step::Nak],
            Settlement::GiveUp(_) => &[
                Step::DeadLetter,
                Step::ErrorResult,
                Step::Meter,
                Step::Archive,
                Step::Callback,
                Step::Forget,
                Step::Term,
            ],
        }
    }

    /// The outcome label when every step succeeds.
    fn outcome(&self) -> Outcome {
        match self {
            Settlement::Answer { result, .. } => result.error.as_ref().map_or(Outcome::Ok, |e| Outcome::Failed(e.code)),
            Settlement::Resend { .. } => Outcome::Ok,
            Settlement::Retry { .. } => Outcome::Retried,
            Settlement::GiveUp(r) => Outcome::Failed(r.code),
        }
    }
}

impl Settlement {
    /// The tenant and caller a usage record of this settlement names.
    fn metered_as(&self) -> (&str, Option<&str>) {
        let (tenant, caller) = match self {
            Settlement::Answer { to, .. } => (to.tenant.as_deref(), to.caller.as_deref()),
            Settlement::Resend { tenant, caller, .. } => (Some(tenant.as_str()), caller.as_deref()),
            Settlement::GiveUp(r) => (r.ids.tenant.as_deref(), r.ids.caller.as_deref()),
            Settlement::Retry { .. } => (None, None),
        };
        (tenant.unwrap_or(subjects::DEFAULT_TENANT), caller)
    }

    /// The tenant and id of the request settled, when known.
    fn request(&self) -> Option<(&str, &str)> {
        let (tenant, id) = match self {
            Settlement::Answer { result, to, .. } => (to.tenant.as_deref(), Some(result.id.as_str())),
            Settlement::Resend { result, tenant, .. } => (Some(tenant.as_str()), Some(result.id.as_str())),
            Settlement::Retry { .. } => return None,
            Settlement::GiveUp(r) => (r.ids.tenant.as_deref(), r.ids.id.as_deref()),
        };
        Some((tenant.unwrap_or(subjects::DEFAULT_TENANT), id?))
    }

    /// Replaces an error message that carries a program's internals (a
    /// backtrace, a source path) with a sentence; the original goes to the
    /// log. Every error a caller can read passes here.
    fn keep_internals_out(&mut self) {
        let message = match self {
            Settlement::Answer { result, .. } => result.error.as_mut().map(|e| (e.code, &mut e.message)),
            Settlement::GiveUp(r) => Some((r.code, &mut r.message)),
            Settlement::Resend { .. } | Settlement::Retry { .. } => None,
        };
        if let Some((code, message)) = message {
            if let Some(public) = public_message(code, message) {
                tracing::warn!(error = %message, "an error message held internals; the caller gets a sentence");
                *message = public;
            }
        }
    }
}

/// A sentence to send instead of `message` when it shows internals.
pub fn public_message(code: ErrorCode, message: &str) -> Option<String> {
    let lower = message.to_ascii_lowercase();
    let internal =
        lower.contains(".rs:") || lower.contains("backtrace") || lower.contains("panicked") || message.contains('\n');
    internal.then(|| format!("the request failed ({code}); the worker's log has the detail under the request id"))
}

/// How a message ended, for the outcome label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Answered.
    Ok,
    /// Answered with an error, or given up.
    Failed(ErrorCode),
    /// Handed back for redelivery.
    Retried,
}

impl Outcome {
    /// The `outcome` label.
    pub fn as_str(&self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::Failed(c) => c.as_str(),
            Outcome::Retried => "retried",
        }
    }
}

/// A NATS operation of settling failed; the message is left for redelivery.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SettleError {
    /// A JetStream write (result or dead letter) failed.
    #[error("writing to JetStream: {0}")]
    Write(#[from] jetstream::context::PublishError),
    /// A reply could not be sent.
    #[error("replying: {0}")]
    Reply(#[from] async_nats::client::PublishError),
    /// The result stored by another delivery could not be read.
    #[error("reading the stored result: {0}")]
    Stored(#[from] StoredError),
    /// The write said a result is stored, but none could be read.
    #[error("a result is stored for this id but cannot be read")]
    StoredMissing,
    /// Ack, nak or term failed.
    #[error("acknowledging: {0}")]
    Ack(async_nats::Error),
}

impl SettleError {
    /// Whether JetStream did not answer (a leader election), rather than refused.
    fn unanswered(&self) -> bool {
        match self {
            SettleError::Write(e) => failover::unanswered(e),
            SettleError::Stored(_) => true,
            _ => false,
        }
    }
}

/// The message being settled: what it was, where it came from.
pub struct Settling<'a> {
    /// The message.
    pub msg: &'a jetstream::Message,
    /// Class of its stream.
    pub priority: Priority,
    /// Model label of its metrics.
    pub model_label: &'a str,
    /// Deliveries so far.
    pub delivered: i64,
    /// A checkpoint of this request was written (by this delivery).
    pub checkpointed: std::sync::atomic::AtomicBool,
}

/// Carries out `s` for the message.
pub async fn settle(sh: &Shared, m: &Settling<'_>, mut s: Settlement) -> Result<Outcome, SettleError> {
    s.keep_internals_out();
    // a write to a stream whose leader is being elected is sent again,
    // the message kept in progress meanwhile (see `crate::failover`)
    let until = std::time::Instant::now() + failover::RIDE_FOR;
    let in_progress = || async {
        let _ = m.msg.ack_with(AckKind::Progress).await;
    };
    // the result the caller got, once stored or re-sent: what is metered
    let mut answered: Option<Cow<'_, InferResult>> = None;
    for step in s.steps() {
        match (step, &s) {
            (Step::Store, Settlement::Answer { result, to, cached }) => {
                let tenant = to.tenant.as_deref().unwrap_or(subjects::DEFAULT_TENANT);
                let store = || publish_result(sh, to, tenant, result, *cached);
                let theirs = failover::ride(until, SettleError::unanswered, store, in_progress).await?;
                answered = Some(theirs.map_or(Cow::Borrowed(&**result), Cow::Owned));
            }
            (Step::Resend, Settlement::Resend { result, reply, .. }) => {
                tracing::info!(id = %result.id, delivered = m.delivered, "redelivered request already answered; re-sending the stored result");
                if let Some(reply) = reply {
                    let payload = Bytes::from(codec::encode(result));
                    sh.client.publish_with_headers(reply.clone(), reply_headers(), payload).await?;
                }
                // the delivery that stored it may have died before metering it
                answered = Some(Cow::Borrowed(&**result));
            }
            (Step::DeadLetter, Settlement::GiveUp(r)) => {
                let letter = Letter::of(m.msg, m.delivered);
                let write = || dead_letter(sh, m.priority, &letter, r.code, &r.message);
                if let Err(e) = failover::ride(until, SettleError::unanswered, write, in_progress).await {
                    tracing::error!(error = %e, "cannot write the dead letter; nak so the message is kept");
                    ack(m.msg, AckKind::Nak(Some(Duration::from_secs(5)))).await?;
                    return Ok(Outcome::Retried);
                }
                sh.metrics.dead_lettered(m.priority, m.model_label, r.code, r.ids.id.as_deref(), &r.message);
            }
            (Step::ErrorResult, Settlement::GiveUp(r)) => {
                let answer = || answer_error(sh, &r.ids, letter_model(&m.msg.subject), r.code, &r.message);
                answered = failover::ride(until, SettleError::unanswered, answer, in_progress).await?.map(Cow::Owned);
            }
            (Step::Meter, s) => {
                if let Some(result) = &answered {
                    let (tenant, caller) = s.metered_as();
                    let write = || meter(sh, tenant, caller, result);
                    failover::ride(until, SettleError::unanswered, write, in_progress).await?;
                }
            }
            (Step::Archive, s) => {
                if let (true, Some(result)) = (sh.archive, &answered) {
                    archive(sh, m, s.metered_as().0, result).await;
                }
            }
            (Step::Callback, s) => {
                let url = Received::read(m.msg.headers.as_ref()).callback_url;
                if let (Some(url), Some(result)) = (url, &answered) {
                    let event = Event::of_result(result, s.metered_as().0, url, crate::clock::unix_ms() / 1000);
                    let event = &event;
                    let queue = || queue_event(sh, event);
                    failover::ride(until, SettleError::unanswered, queue, in_progress).await?;
                }
            }
            (Step::Forget, s) => {
                let may_exist = m.delivered > 1 || m.checkpointed.load(std::sync::atomic::Ordering::Relaxed);
                if let (Some(c), Some((tenant, id)), true) = (&sh.checkpoints, s.request(), may_exist) {
                    c.forget(tenant, id).await;
                }
            }
            (Step::Ack, _) => ack(m.msg, AckKind::Ack).await?,
            (Step::Nak, Settlement::Retry { delay }) => {
                sh.metrics.handed_back(m.priority, m.model_label);
                ack(m.msg, AckKind::Nak(Some(*delay))).await?;
            }
            (Step::Term, _) => ack(m.msg, AckKind::Term).await?,
            (step, s) => unreachable!("step {step:?} is not in the table of {s:?}"),
        }
    }
    Ok(s.outcome())
}

/// Records the request of `m` and the `result` its caller got. The archive
/// is a record, not the answer: a failed write is logged and the request
/// settled all the same.
async fn archive(sh: &Shared, m: &Settling<'_>, tenant: &str, result: &InferResult) {
    let envelope = Received::read(m.msg.headers.as_ref());
    let Ok(request) = codec::decode::<InferRequest>(envelope.content_type, &m.msg.payload) else {
        return; // nothing a replay could send again
    };
    let at_ms = m.msg.info().map_or_else(|_| crate::clock::unix_ms(), |i| crate::clock::ms_of(i.published));
    let mut record = Recorded::new(at_ms, m.priority, tenant, request, result.clone());
    record.timeout_ms = envelope.deadline_ms.map(|d| d.saturating_sub(at_ms));
    if let Err(e) = archive::publish(&sh.js, &record).await {
        tracing::warn!(id = %result.id, error = %e, "recording the request in the archive failed");
    }
}

async fn queue_event(sh: &Shared, event: &Event) -> Result<(), SettleError> {
    Ok(webhook::enqueue(&sh.js, event).await?)
}

async fn ack(msg: &jetstream::Message, kind: AckKind) -> Result<(), SettleError> {
    msg.ack_with(kind).await.map_err(SettleError::Ack)
}

/// A request message being given up.
pub struct Letter<'a> {
    /// Subject it was published to.
    pub subject: &'a str,
    /// Its headers.
    pub headers: Option<&'a HeaderMap>,
    /// Its body.
    pub payload: &'a Bytes,
    /// Deliveries so far.
    pub delivered: i64,
}

impl<'a> Letter<'a> {
    fn of(msg: &'a jetstream::Message, delivered: i64) -> Letter<'a> {
        Letter { subject: &msg.subject, headers: msg.headers.as_ref(), payload: &msg.payload, delivered }
    }
}

/// The model named by a request subject, for dead-letter subjects and error results.
fn letter_model(subject: &str) -> &str {
    subjects::parse_request(subject).map(|(_, m, _)| m).filter(|m| subjects::is_token(m)).unwrap_or("unknown")
}

/// Writes `letter` to `FLEET_DLQ` with its original payload and headers plus
/// the error, and waits for the stream to have it.
pub async fn dead_letter(
    sh: &Shared,
    prio: Priority,
    letter: &Letter<'_>,
    code: ErrorCode,
    message: &str,
) -> Result<(), SettleError> {
    let why = GivenUp { code, message, delivered: letter.delivered, subject: letter.subject };
    let h = dead_letter_headers(letter.headers, &why);
    let subject = subjects::dlq(prio, letter_model(letter.subject));
    sh.js.publish_with_headers(subject, h, letter.payload.clone()).await?.await?;
    Ok(())
}

/// Sends the error result to whoever can see it: stored and replied when
/// the request id is known, replied only when just the reply subject is.
/// The result stored for the request, when one was (to meter).
pub async fn answer_error(
    sh: &Shared,
    ids: &Ids,
    model: &str,
    code: ErrorCode,
    message: &str,
) -> Result<Option<InferResult>, SettleError> {
    let mut result = InferResult::error(ids.id.as_deref().unwrap_or(""), model, code, message);
    result.worker = sh.worker_id.clone();
    match (&ids.id, &ids.reply) {
        (Some(_), _) => {
            let tenant = ids.tenant.as_deref().unwrap_or(subjects::DEFAULT_TENANT);
            let theirs = publish_result(sh, ids, tenant, &result, None).await?;
            Ok(Some(theirs.unwrap_or(result)))
        }
        (None, Some(reply)) => {
            let payload = Bytes::from(codec::encode(&result));
            sh.client.publish_with_headers(reply.clone(), reply_headers(), payload).await?;
            Ok(None)
        }
        (None, None) => Ok(None),
    }
}

/// Headers of a result sent to a reply subject, or stored: the trace
/// context is the current span's (the request's handling here).
fn reply_headers() -> HeaderMap {
    let mut h = HeaderMap::new();
    h.insert(headers::CONTENT_TYPE, codec::ContentType::MSGPACK_MIME);
    h.insert(headers::KIND, headers::KIND_RESULT);
    if let Some(t) = trace::current_traceparent() {
        h.insert(headers::TRACEPARENT, t.as_str());
    }
    h
}

/// Stores the result in `FLEET_RESULTS` (for `to.keep_secs` when set: a
/// per-message TTL, else the stream's max age), then sends the stored
/// result to `to.reply`. The first writer wins: the write expects no earlier
/// result for the id, so when two deliveries of one request both computed
/// (a worker stalled past `ack_wait`, or died after storing), the later one
/// re-sends the result already stored instead of its own. A caller never
/// sees two different answers, nor one that is not stored. `cached` is the
/// key and expiry of a cacheable answer, recorded in headers so replays of
/// `FLEET_RESULTS` can warm caches and the ingress can keep the answer.
/// Returns the result stored by another delivery when there was one.
pub async fn publish_result(
    sh: &Shared,
    to: &Ids,
    tenant: &str,
    result: &InferResult,
    cached: Option<(Key, u64)>,
) -> Result<Option<InferResult>, SettleError> {
    let payload = Bytes::from(codec::encode(result));
    // No `Nats-Msg-Id` on the write: the expected sequence alone decides, so
    // a result removed on purpose (`dlq replay`) can be written again within
    // the duplicate window.
    let mut first_only = reply_headers();
    first_only.insert(async_nats::header::NATS_EXPECTED_LAST_SUBJECT_SEQUENCE, "0");
    if let Some(secs) = to.keep_secs {
        first_only.insert(async_nats::header::NATS_MESSAGE_TTL, format!("{secs}s").as_str());
    }
    let mut h = reply_headers();
    h.insert(headers::MSG_ID, result.id.as_str());
    if let Some((key, expires_ms)) = cached {
        first_only.insert(headers::CACHE_KEY, key.hex().as_str());
        first_only.insert(headers::CACHE_EXPIRES, expires_ms.to_string().as_str());
    }
    let subject = subjects::result(tenant, &result.id);
    let store = async { sh.js.publish_with_headers(subject, first_only, payload.clone()).await?.await };
    let first = match trace::in_span("store result", trace::none, store).await {
        Ok(ack) => !ack.duplicate,
        Err(e) if e.kind() == jetstream::context::PublishErrorKind::WrongLastSequence => false,
        Err(e) => return Err(e.into()),
    };
    let (payload, theirs) = if first {
        if let Some((key, expires_ms)) = cached {
            // the caller may keep this answer until then (the ingress's
            // cache), under this key (which says the generation it used)
            h.insert(headers::CACHE_KEY, key.hex().as_str());
            h.insert(headers::CACHE_EXPIRES, expires_ms.to_string().as_str());
        }
        (payload, None)
    } else {
        let stored = Box::pin(stored_message(&sh.js, tenant, &result.id)).await?;
        tracing::info!(id = %result.id, "a result for this request was already stored; sending that one");
        let stored = stored.ok_or(SettleError::StoredMissing)?;
        let theirs = decode_stored(&stored)?.ok_or(SettleError::StoredMissing)?;
        (stored.payload, Some(theirs))
    };
    if let Some(reply) = &to.reply {
        trace::in_span("reply", trace::none, sh.client.publish_with_headers(reply.clone(), h, payload)).await?;
    }
    Ok(theirs)
}

/// Meters `result`, the result stored for its request, when metering is on
/// (one record per request: see [`crate::usage`]).
pub async fn meter(sh: &Shared, tenant: &str, caller: Option<&str>, result: &InferResult) -> Result<(), SettleError> {
    if let Some(m) = &sh.meter {
        m.record(result, tenant, caller).await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn every_settlement() -> Vec<Settlement> {
        let result = Box::new(InferResult::error("r", "m", ErrorCode::Cancelled, "x"));
        vec![
            Settlement::Answer { result: result.clone(), to: Ids::default(), cached: None },
            Settlement::Resend { result, reply: None, tenant: "default".into(), caller: None },
            Settlement::Retry { delay: Duration::from_secs(1) },
            Settlement::GiveUp(Rejection { ids: Ids::default(), code: ErrorCode::DecodeError, message: "m".into() }),
        ]
    }

    #[test]
    fn every_settlement_ends_with_exactly_one_acknowledgement() {
        for s in every_settlement() {
            let steps = s.steps();
            let acks = steps.iter().filter(|s| matches!(s, Step::Ack | Step::Nak | Step::Term)).count();
            assert_eq!(acks, 1, "{s:?}");
            assert!(matches!(steps.last(), Some(Step::Ack | Step::Nak | Step::Term)), "{s:?}: acknowledged last");
        }
    }

    #[test]
    fn results_are_stored_before_the_ack_and_dead_letters_before_the_term() {
        let table: Vec<_> = every_settlement().iter().map(|s| (s.steps(), s.outcome())).collect();
        let answer = [Step::Store, Step::Meter, Step::Archive, Step::Callback, Step::Forget, Step::Ack];
        assert_eq!(table[0], (&answer[..], Outcome::Failed(ErrorCode::Cancelled)));
        let resend = [Step::Resend, Step::Meter, Step::Archive, Step::Callback, Step::Forget, Step::Ack];
        assert_eq!(table[1], (&resend[..], Outcome::Ok));
        assert_eq!(table[2], (&[Step::Nak][..], Outcome::Retried));
        assert_eq!(
            table[3],
            (
                &[
                    Step::DeadLetter,
                    Step::ErrorResult,
                    Step::Meter,
                    Step::Archive,
                    Step::Callback,
                    Step::Forget,
                    Step::Term
                ][..],
                Outcome::Failed(ErrorCode::DecodeError)
            )
        );
    }
}
