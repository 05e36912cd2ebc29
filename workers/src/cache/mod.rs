//! The worker's result cache.
//!
//! - Exact answers live in a foyer [`HybridCache`]: a memory tier with a byte
//!   budget over a disk tier under the data dir. Every answer is written to
//!   disk on insertion, so the disk tier survives a restart (and a crash up to
//!   the last flush); a disk hit is promoted to memory.
//! - Only reproducible requests are cached by default (temperature 0 or a
//!   seed); a request's cache mode is `use`, `bypass`, `refresh` or `semantic`.
//! - Every answer carries an expiry (worker default, or the request's
//!   `Fleet-Cache-Ttl`); an expired answer is never served.
//! - Identical requests in flight in one worker share one model call
//!   ([`ResultCache::join`]); across workers, claims ([`sync::Claims`]) let
//!   one compute while the others wait for its answer. A request's part in
//!   all of this is one [`Session`].
//! - Each model has a cache generation, watched in KV `fleet_models`:
//!   changing it (`retro-fleet cache purge`) makes the model's old answers
//!   unreachable in every worker at once.
//! - The semantic cache ([`similar`]) finds answers to similar prompts; it
//!   can check a sample of them against the model and learn each model's
//!   threshold to a bound on wrong answers ([`calibrate`]).
//!
//! Keys and generations are a contract with the ingress and live in
//! [`retro_fleet_schemas::cache_key`].
//!
//! # Layout
//! - [`store`]: [`ResultCache`], the foyer store, and in-process flights ([`Flight`], [`Leader`]).
//! - [`session`]: a request's [`Session`]: lookup → flight → claim → keep or abandon.
//! - [`sync`]: what workers share over KV: generations and cross-worker [`sync::Claims`].
//! - [`warm`]: replaying `FLEET_RESULTS` into the cache.
//! - [`feedback`]: verdicts on semantic answers, heard from the ingress.
//! - [`similar`]: the semantic cache: embedding, hit or check, feedback.
//! - [`semantic`]: its index of prompts, with per-entry vetoes.
//! - [`ann`]: the HNSW graph a large bucket of that index is searched with.
//! - [`calibrate`]: learned thresholds held to a bound on false hits.
//! - [`answer`]: the cached [`Answer`] and a lookup's [`Hit`].
//! - [`config`]: its settings, [`CacheConfig`].

pub mod ann;
pub mod answer;
pub mod calibrate;
pub mod config;
mod error;
pub mod feedback;
pub mod semantic;
mod session;
pub mod similar;
pub mod store;
pub mod sync;
pub mod warm;

pub use answer::{Answer, Hit};
pub use config::CacheConfig;
pub use retro_fleet_schemas::cache_key::{Key, Scope};
pub use session::{Found, Session};
pub use store::{follow, CacheError, Flight, Leader, ResultCache};
