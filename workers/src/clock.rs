//! The wall clock, in the unix milliseconds every message and KV entry carries.

/// Milliseconds since the unix epoch.
pub fn unix_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// `t` (a JetStream message's time) in unix milliseconds.
pub fn ms_of(t: time::OffsetDateTime) -> u64 {
    (t.unix_timestamp_nanos() / 1_000_000) as u64
}
