//! What `apply` reports, and its errors.

use std::fmt;

/// What `apply` did to one object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// It did not exist.
    Created,
    /// It existed with other settings (the fields named).
    Updated(Vec<&'static str>),
    /// Already as configured.
    Unchanged,
}

/// One line of an `apply` report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Applied {
    /// `stream` or `consumer`.
    pub kind: &'static str,
    /// Stream name, or `STREAM/consumer`.
    pub name: String,
    /// What happened.
    pub change: Change,
}

impl fmt::Display for Applied {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.change {
            Change::Created => write!(f, "{:<8} {:<32} created", self.kind, self.name),
            Change::Updated(fields) => write!(f, "{:<8} {:<32} updated ({})", self.kind, self.name, fields.join(", ")),
            Change::Unchanged => write!(f, "{:<8} {:<32} unchanged", self.kind, self.name),
        }
    }
}

/// Errors applying the topology.
#[derive(Debug, thiserror::Error)]
#[error("topology: {what}: {source}")]
pub struct TopologyError {
    what: String,
    #[source]
    source: async_nats::Error,
}

pub(super) fn err(what: impl Into<String>) -> impl FnOnce(async_nats::Error) -> TopologyError {
    let what = what.into();
    move |source| TopologyError { what, source }
}

/// [`err`] for creating or updating a stream or bucket of `replicas`
/// copies: a deployment that cannot place them (one server, or fewer
/// JetStream servers than copies) is told apart, with what to do.
pub(super) fn placing(what: impl Into<String>, replicas: usize) -> impl FnOnce(async_nats::Error) -> TopologyError {
    let what = what.into();
    move |source| {
        let text = source.to_string().to_ascii_lowercase();
        let cannot_place = ["replicas", "insufficient resources", "no suitable peers"].iter().any(|t| text.contains(t));
        let what = match replicas > 1 && cannot_place {
            true => format!(
                "{what}: topology.replicas = {replicas} needs a NATS cluster of at least {replicas} JetStream \
                 servers, and this one cannot place {replicas} copies; run a cluster (docs/OPERATIONS.md) or set \
                 topology.replicas = 1"
            ),
            false => what,
        };
        TopologyError { what, source }
    }
}
