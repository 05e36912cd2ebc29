//! Wire contract of retro-fleet: every process and every client in any
//! language agrees on what is written here.
//!
//! # Layout
//! - [`request`]: the inference request a producer publishes.
//! - [`priority`]: the priority classes (one request stream each).
//! - [`result`]: the result a worker publishes, its error body and stable codes.
//! - [`chunk`]: a streamed token delta.
//! - [`subjects`]: stream, subject, consumer and KV names (the NATS topology).
//! - [`headers`]: NATS header names.
//! - [`codec`]: MessagePack (default) or JSON in, MessagePack out.
//! - [`json_schema`]: the JSON Schemas committed under `schemas/json/`.
//! - [`registry`]: worker heartbeats (KV `fleet_workers`) and scaling reports.
//! - [`envelope`]: the request header envelope, written by every publisher and read by workers.
//! - [`cache_key`]: cache keys and the purge generations they are made under.
//! - [`stored`]: reading a request's stored result from `FLEET_RESULTS`.
//! - [`tenants`]: what an operator sets per tenant (KV `fleet_tenants`): weights and budgets.
//! - [`tools`]: function calling: tools offered, the tool choice, calls made.
//! - [`usage`]: metered usage, one record per answered request (`FLEET_USAGE`).
//! - [`archive`]: recorded requests and their results (`FLEET_ARCHIVE`), read by `replay`.
//! - [`webhook`]: webhook events queued for delivery (`FLEET_WEBHOOKS`).
//! - [`version`]: [`SCHEMA_VERSION`], the `v` every message carries.
//!
//! Messages are MessagePack maps with named fields (so fields can be added)
//! and carry a schema version `v`; see [`SCHEMA_VERSION`].

pub mod archive;
pub mod cache_key;
pub mod chunk;
pub mod codec;
pub mod envelope;
pub mod feedback;
pub mod headers;
pub mod json_schema;
pub mod priority;
pub mod registry;
pub mod request;
pub mod result;
pub mod stored;
pub mod subjects;
pub mod tenants;
pub mod tools;
pub mod usage;
pub mod version;
pub mod webhook;

pub use chunk::{Splice, StreamChunk};
pub use codec::{decode, encode, ContentType, DecodeError};
pub use envelope::{Envelope, Received};
pub use feedback::{CacheFeedback, FeedbackAck, Verdict};
pub use priority::Priority;
pub use registry::{ModelLoad, ModelScaling, PerPriority, Totals, WorkerInfo};
pub use request::{CacheMode, ChatMessage, Constraint, Field, InferRequest, Input, SamplingParams};
pub use result::{
    CacheTier, ErrorBody, ErrorCode, InferResult, Output, Status, Timings, TokenLogprob, TopLogprob, Usage,
};
pub use tenants::{Budget, Period, TenantPolicy};
pub use tools::{ToolCall, ToolPlan};
pub use version::SCHEMA_VERSION;
