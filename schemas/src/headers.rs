//! NATS header names. Part of the public contract.

/// Request id; JetStream deduplicates on it within the duplicate window.
pub const MSG_ID: &str = "Nats-Msg-Id";
/// Subject for the synchronous reply and stream chunks.
pub const REPLY: &str = "Fleet-Reply";
/// Deadline as unix milliseconds; past it the request is answered `deadline_exceeded`.
pub const DEADLINE: &str = "Fleet-Deadline";
/// Tenant of the request.
pub const TENANT: &str = "Fleet-Tenant";
/// The credential that sent a request (`key:<id>`, `jwt:...`), set by the
/// ingress: usage is metered by it.
pub const CALLER: &str = "Fleet-Caller";
/// On requests: a URL the result is POSTed to, as a signed webhook event
/// (`request.completed` or `request.failed`), delivered only when an
/// ingress allows its host.
pub const CALLBACK_URL: &str = "Fleet-Callback-Url";
/// `application/msgpack` (default) or `application/json`.
pub const CONTENT_TYPE: &str = "Content-Type";
/// W3C trace context.
pub const TRACEPARENT: &str = "traceparent";
/// On messages sent to a reply subject: `result` or `chunk`.
pub const KIND: &str = "Fleet-Kind";
/// Unix milliseconds at which the request was published (queue-wait timing).
pub const PUBLISHED: &str = "Fleet-Published";
/// On dead letters: stable error code.
pub const ERROR_CODE: &str = "Fleet-Error-Code";
/// On dead letters: error message.
pub const ERROR_MESSAGE: &str = "Fleet-Error-Message";
/// On dead letters: deliveries before the message was given up.
pub const DELIVERY_COUNT: &str = "Fleet-Delivery-Count";
/// On dead letters: subject the request was published to.
pub const ORIGINAL_SUBJECT: &str = "Fleet-Original-Subject";
/// On requests: seconds a cached answer to this request stays valid (overrides the worker's default).
pub const CACHE_TTL: &str = "Fleet-Cache-Ttl";
/// Seconds the request's result is kept in `FLEET_RESULTS` (absent: the
/// stream's max age); set by the ingress on synchronous calls.
pub const RESULT_TTL: &str = "Fleet-Result-Ttl";
/// On stored results: the cache key the answer was stored under (32 hex digits), so replays can warm caches.
pub const CACHE_KEY: &str = "Fleet-Cache-Key";
/// On stored results: unix milliseconds after which the cached answer must not be served.
pub const CACHE_EXPIRES: &str = "Fleet-Cache-Expires";

/// Whether `s` is a W3C `traceparent` (version 00 form: `00-<32 hex trace
/// id>-<16 hex parent id>-<2 hex flags>`, ids not all zero).
pub fn is_traceparent(s: &str) -> bool {
    let parts: Vec<&str> = s.split('-').collect();
    let hex = |p: &str, n: usize| p.len() == n && p.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
    parts.len() >= 4
        && hex(parts[0], 2)
        && parts[0] != "ff"
        && hex(parts[1], 32)
        && hex(parts[2], 16)
        && hex(parts[3], 2)
        && parts[1].bytes().any(|b| b != b'0')
        && parts[2].bytes().any(|b| b != b'0')
        && (parts[0] != "00" || parts.len() == 4)
}

/// The trace id of a valid `traceparent`.
pub fn trace_id(traceparent: &str) -> Option<&str> {
    is_traceparent(traceparent).then(|| traceparent.split('-').nth(1)).flatten()
}

/// The trace id, parent span id and flags of a valid `traceparent`.
pub fn parse_traceparent(traceparent: &str) -> Option<(u128, u64, u8)> {
    if !is_traceparent(traceparent) {
        return None;
    }
    let mut parts = traceparent.split('-').skip(1);
    let trace = u128::from_str_radix(parts.next()?, 16).ok()?;
    let span = u64::from_str_radix(parts.next()?, 16).ok()?;
    let flags = u8::from_str_radix(parts.next()?, 16).ok()?;
    Some((trace, span, flags))
}

/// The version 00 `traceparent` of a span (ids not zero).
pub fn format_traceparent(trace: u128, span: u64, flags: u8) -> String {
    format!("00-{:032x}-{:016x}-{flags:02x}", trace.max(1), span.max(1))
}

/// A new sampled `traceparent` from 128 + 64 random bits.
pub fn new_traceparent(trace: u128, span: u64) -> String {
    format_traceparent(trace, span, 1)
}

/// Value of [`KIND`] on a final result.
pub const KIND_RESULT: &str = "result";
/// Value of [`KIND`] on a stream chunk.
pub const KIND_CHUNK: &str = "chunk";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_traceparent_reads_back_what_was_written() {
        let t = format_traceparent(0x4bf92f3577b34da6a3ce929d0e0e4736, 0x00f067aa0ba902b7, 1);
        assert_eq!(t, "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01");
        assert_eq!(parse_traceparent(&t), Some((0x4bf92f3577b34da6a3ce929d0e0e4736, 0x00f067aa0ba902b7, 1)));
        assert_eq!(parse_traceparent("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00").map(|p| p.2), Some(0));
        assert_eq!(parse_traceparent("00-00000000000000000000000000000000-00f067aa0ba902b7-01"), None);
    }

    #[test]
    fn traceparents() {
        let t = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        assert!(is_traceparent(t));
        assert_eq!(trace_id(t), Some("4bf92f3577b34da6a3ce929d0e0e4736"));
        assert!(!is_traceparent("00-00000000000000000000000000000000-00f067aa0ba902b7-01"));
        assert!(!is_traceparent("00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01"));
        assert!(!is_traceparent("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7"));
        assert!(!is_traceparent("ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"));
        assert!(!is_traceparent("garbage"));
        let n = new_traceparent(0xabc, 7);
        assert!(is_traceparent(&n), "{n}");
        assert!(is_traceparent(&new_traceparent(0, 0)));
    }
}
