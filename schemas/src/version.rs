//! The schema version every message carries in its `v` field.

/// Version of the wire schema written by this build. Readers accept any
/// message whose `v` is at most this (fields are only ever added).
pub const SCHEMA_VERSION: u32 = 1;

/// The version a message without `v` is read as (serde's default).
pub(crate) fn default_version() -> u32 {
    SCHEMA_VERSION
}
