//! NATS header names. Part of the public contract.

/// Request id; JetStream deduplicates on it within the duplicate window.
pub const MSG_ID: &str = "Nats-Msg-Id";
/// Subject for the synchronous reply and stream chunks.
pub const REPLY: &str = "Fleet-Reply";
/// Deadline as unix milliseconds; past it the request is answered `deadline_exceeded`.
pub const DEADLINE: &str = "Fleet-Deadline";
/// Tenant of the request.
pub const TENANT: &str = "Fleet-Tenant";
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
/// On stored results: the cache key the answer was stored under (32 hex digits), so replays can warm caches.
pub const CACHE_KEY: &str = "Fleet-Cache-Key";
/// On stored results: unix milliseconds after which the cached answer must not be served.
pub const CACHE_EXPIRES: &str = "Fleet-Cache-Expires";

/// Value of [`KIND`] on a final result.
pub const KIND_RESULT: &str = "result";
/// Value of [`KIND`] on a stream chunk.
pub const KIND_CHUNK: &str = "chunk";
