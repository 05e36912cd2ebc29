//! The request header envelope: what travels with a request besides its
//! body, written by every publisher of this project (the ingress, `submit`,
//! `dlq replay`, the load generator) through [`Envelope`] and read by the
//! worker through [`Received`]. Publishers in other languages write the same
//! headers by hand (docs/WIRE.md); only `Nats-Msg-Id` is required.

use async_nats::HeaderMap;

use crate::{codec, headers, subjects, ErrorCode};

/// The headers of a request to publish.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Envelope {
    /// Request id (1-128 of `[A-Za-z0-9_-]`).
    pub id: String,
    /// Tenant (the default tenant unless set).
    pub tenant: String,
    /// Subject for the synchronous reply and stream chunks.
    pub reply: Option<String>,
    /// Unix ms after which the request is answered `deadline_exceeded` instead of run.
    pub deadline_ms: Option<u64>,
    /// W3C trace context.
    pub traceparent: Option<String>,
    /// Seconds a cached answer to this request stays valid.
    pub cache_ttl_secs: Option<u64>,
    /// Seconds its result is kept in `FLEET_RESULTS` (none: the stream's max age).
    pub result_ttl_secs: Option<u64>,
    /// The credential that sent it (usage is metered by it).
    pub caller: Option<String>,
    /// Where its result is POSTed as a webhook event.
    pub callback_url: Option<String>,
}

impl Envelope {
    /// The envelope of request `id` in the default tenant, with nothing else set.
    pub fn new(id: impl Into<String>) -> Envelope {
        Envelope {
            id: id.into(),
            tenant: subjects::DEFAULT_TENANT.to_string(),
            reply: None,
            deadline_ms: None,
            traceparent: None,
            cache_ttl_secs: None,
            result_ttl_secs: None,
            caller: None,
            callback_url: None,
        }
    }

    /// Sets the tenant.
    pub fn tenant(mut self, tenant: impl Into<String>) -> Envelope {
        self.tenant = tenant.into();
        self
    }

    /// Sets the reply subject.
    pub fn reply(mut self, reply: impl Into<String>) -> Envelope {
        self.reply = Some(reply.into());
        self
    }

    /// Sets the deadline (unix ms).
    pub fn deadline_ms(mut self, deadline_ms: u64) -> Envelope {
        self.deadline_ms = Some(deadline_ms);
        self
    }

    /// Sets the trace context.
    pub fn traceparent(mut self, traceparent: impl Into<String>) -> Envelope {
        self.traceparent = Some(traceparent.into());
        self
    }

    /// Sets how long a cached answer stays valid.
    pub fn cache_ttl_secs(mut self, secs: Option<u64>) -> Envelope {
        self.cache_ttl_secs = secs;
        self
    }

    /// Sets the credential that sent it.
    pub fn caller(mut self, caller: impl Into<String>) -> Envelope {
        self.caller = Some(caller.into());
        self
    }

    /// Sets where the result is POSTed as a webhook event.
    pub fn callback_url(mut self, url: Option<String>) -> Envelope {
        self.callback_url = url;
        self
    }

    /// Sets how long the result is kept.
    pub fn result_ttl_secs(mut self, secs: Option<u64>) -> Envelope {
        self.result_ttl_secs = secs;
        self
    }

    /// The `Nats-Msg-Id`. Request ids are per tenant (results live at
    /// `fleet.res.<tenant>.<id>`), and so is JetStream's duplicate window:
    /// outside the default tenant the id is prefixed `<tenant>.`, so another
    /// tenant choosing the same id does not have its request dropped.
    pub fn msg_id(&self) -> String {
        if self.tenant == subjects::DEFAULT_TENANT {
            self.id.clone()
        } else {
            format!("{}.{}", self.tenant, self.id)
        }
    }

    /// The headers of a MessagePack request body.
    pub fn headers(&self) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(headers::MSG_ID, self.msg_id().as_str());
        h.insert(headers::CONTENT_TYPE, codec::ContentType::MSGPACK_MIME);
        h.insert(headers::TENANT, self.tenant.as_str());
        if let Some(t) = &self.traceparent {
            h.insert(headers::TRACEPARENT, t.as_str());
        }
        if let Some(d) = self.deadline_ms {
            h.insert(headers::DEADLINE, d.to_string().as_str());
        }
        if let Some(reply) = &self.reply {
            h.insert(headers::REPLY, reply.as_str());
        }
        if let Some(ttl) = self.cache_ttl_secs {
            h.insert(headers::CACHE_TTL, ttl.to_string().as_str());
        }
        if let Some(ttl) = self.result_ttl_secs {
            h.insert(headers::RESULT_TTL, ttl.to_string().as_str());
        }
        if let Some(caller) = &self.caller {
            h.insert(headers::CALLER, header_safe(caller).as_str());
        }
        if let Some(url) = &self.callback_url {
            h.insert(headers::CALLBACK_URL, header_safe(url).as_str());
        }
        h
    }
}

/// The envelope of a delivered request as a worker reads it: what is known
/// about who asked even when the body is not a valid request. Values that do
/// not parse read as absent.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Received<'a> {
    /// The request id named by `Nats-Msg-Id`, when it is a valid id.
    pub id: Option<&'a str>,
    /// `Fleet-Tenant` as sent (not yet checked).
    pub tenant: Option<&'a str>,
    /// Reply subject, when not empty.
    pub reply: Option<&'a str>,
    /// Deadline, unix ms.
    pub deadline_ms: Option<u64>,
    /// Trace context as sent.
    pub traceparent: Option<&'a str>,
    /// Cache lifetime asked for, seconds.
    pub cache_ttl_secs: Option<u64>,
    /// How long the result is to be kept, seconds (0 reads as absent).
    pub result_ttl_secs: Option<u64>,
    /// `Content-Type` of the body as sent.
    pub content_type: Option<&'a str>,
    /// `Fleet-Caller` as sent.
    pub caller: Option<&'a str>,
    /// `Fleet-Callback-Url` as sent (not yet checked).
    pub callback_url: Option<&'a str>,
}

impl<'a> Received<'a> {
    /// Reads the envelope from a message's headers.
    pub fn read(h: Option<&'a HeaderMap>) -> Received<'a> {
        let get = |name: &str| h.and_then(|h| h.get(name)).map(|v| v.as_str());
        let number = |name: &str| get(name).and_then(|v| v.trim().parse::<u64>().ok());
        let tenant = get(headers::TENANT);
        Received {
            id: get(headers::MSG_ID).and_then(|m| subjects::id_of_msg_id(m, tenant)),
            tenant,
            reply: get(headers::REPLY).filter(|r| !r.is_empty()),
            deadline_ms: number(headers::DEADLINE),
            traceparent: get(headers::TRACEPARENT),
            cache_ttl_secs: number(headers::CACHE_TTL),
            result_ttl_secs: number(headers::RESULT_TTL).filter(|s| *s > 0),
            content_type: get(headers::CONTENT_TYPE),
            caller: get(headers::CALLER).filter(|c| !c.is_empty()),
            callback_url: get(headers::CALLBACK_URL).filter(|u| !u.is_empty()),
        }
    }
}

/// What a dead letter says about why its request was given up.
#[derive(Debug, Clone, Copy)]
pub struct GivenUp<'a> {
    /// Stable error code.
    pub code: ErrorCode,
    /// Error message (made header-safe here).
    pub message: &'a str,
    /// Deliveries before the request was given up.
    pub delivered: i64,
    /// Subject the request was published to.
    pub subject: &'a str,
}

/// The headers of a dead letter: the request's own, plus why it was given up.
pub fn dead_letter_headers(request: Option<&HeaderMap>, why: &GivenUp<'_>) -> HeaderMap {
    let mut h = request.cloned().unwrap_or_default();
    h.insert(headers::ERROR_CODE, why.code.as_str());
    h.insert(headers::ERROR_MESSAGE, header_safe(why.message).as_str());
    h.insert(headers::DELIVERY_COUNT, why.delivered.to_string().as_str());
    h.insert(headers::ORIGINAL_SUBJECT, why.subject);
    h
}

/// The headers to publish a dead letter's request again: its own envelope
/// without the dead letter's additions and without its deadline (long
/// past), under a new `Nats-Msg-Id` so the duplicate window lets it in.
pub fn replay_headers(letter: &HeaderMap, msg_id: &str) -> HeaderMap {
    const DROPPED: [&str; 6] = [
        headers::ERROR_CODE,
        headers::ERROR_MESSAGE,
        headers::DELIVERY_COUNT,
        headers::ORIGINAL_SUBJECT,
        headers::DEADLINE,
        headers::MSG_ID,
    ];
    let mut h = HeaderMap::new();
    for (name, values) in letter.iter() {
        let name = name.to_string();
        if DROPPED.iter().any(|d| d.eq_ignore_ascii_case(&name)) {
            continue;
        }
        for v in values {
            h.append(name.as_str(), v.as_str());
        }
    }
    h.insert(headers::MSG_ID, msg_id);
    h
}

/// Header values cannot hold line breaks; long messages are cut.
fn header_safe(s: &str) -> String {
    s.chars().map(|c| if c.is_control() { ' ' } else { c }).take(1024).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_is_written_is_read_back() {
        let e = Envelope::new("r1")
            .tenant("acme")
            .reply("_INBOX.x.r1")
            .deadline_ms(1_700_000_000_000)
            .traceparent("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")
            .cache_ttl_secs(Some(60))
            .result_ttl_secs(Some(120))
            .caller("key:app");
        let h = e.headers();
        assert_eq!(h.get(headers::MSG_ID).unwrap().as_str(), "acme.r1");
        let r = Received::read(Some(&h));
        assert_eq!(r.id, Some("r1"));
        assert_eq!(r.tenant, Some("acme"));
        assert_eq!(r.reply, Some("_INBOX.x.r1"));
        assert_eq!(r.deadline_ms, Some(1_700_000_000_000));
        assert_eq!(r.traceparent, e.traceparent.as_deref());
        assert_eq!(r.cache_ttl_secs, Some(60));
        assert_eq!(r.result_ttl_secs, Some(120));
        assert_eq!(r.content_type, Some(codec::ContentType::MSGPACK_MIME));
        assert_eq!(r.caller, Some("key:app"));
    }

    #[test]
    fn the_default_tenant_keeps_the_bare_id_and_bad_values_read_as_absent() {
        let h = Envelope::new("r2").headers();
        assert_eq!(h.get(headers::MSG_ID).unwrap().as_str(), "r2");
        assert_eq!(Received::read(Some(&h)).id, Some("r2"));
        let mut h = HeaderMap::new();
        h.insert(headers::MSG_ID, "not an id");
        h.insert(headers::DEADLINE, "soon");
        h.insert(headers::REPLY, "");
        let r = Received::read(Some(&h));
        assert_eq!((r.id, r.deadline_ms, r.reply), (None, None, None));
        assert_eq!(Received::read(None), Received::default());
    }

    #[test]
    fn a_replayed_letter_has_its_envelope_without_the_letter_or_the_deadline() {
        let req = Envelope::new("r3").tenant("t").deadline_ms(5).traceparent("tp").headers();
        let why =
            GivenUp { code: ErrorCode::DecodeError, message: "bad\nbody", delivered: 3, subject: "fleet.req.normal.m" };
        let letter = dead_letter_headers(Some(&req), &why);
        assert_eq!(letter.get(headers::ERROR_MESSAGE).unwrap().as_str(), "bad body");
        assert_eq!(letter.get(headers::DELIVERY_COUNT).unwrap().as_str(), "3");
        let again = replay_headers(&letter, "r3-replay-7");
        assert_eq!(again.get(headers::MSG_ID).unwrap().as_str(), "r3-replay-7");
        assert_eq!(again.get(headers::TENANT).unwrap().as_str(), "t");
        assert_eq!(again.get(headers::TRACEPARENT).unwrap().as_str(), "tp");
        for gone in [headers::DEADLINE, headers::ERROR_CODE, headers::ERROR_MESSAGE, headers::ORIGINAL_SUBJECT] {
            assert!(again.get(gone).is_none(), "{gone}");
        }
    }
}
