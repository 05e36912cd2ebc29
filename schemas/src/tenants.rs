//! What an operator sets for a tenant: KV `fleet_tenants`, key the tenant,
//! value one JSON [`TenantPolicy`]. Workers follow it for weights; a tenant
//! with no entry has the defaults.

use serde::{Deserialize, Serialize};

/// One tenant's settings. Fields may be added; readers ignore unknown ones.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct TenantPolicy {
    /// Its share of each worker's slots against the other tenants with work
    /// in the same class: a tenant of weight 3 starts three requests for
    /// each one of a tenant of weight 1 while both wait. Positive; default 1.
    #[serde(default = "one")]
    pub weight: f64,
}

fn one() -> f64 {
    1.0
}

impl Default for TenantPolicy {
    fn default() -> Self {
        TenantPolicy { weight: 1.0 }
    }
}

impl TenantPolicy {
    /// Why this policy cannot be stored, naming the field.
    pub fn check(&self) -> Result<(), String> {
        if !(self.weight.is_finite() && self.weight > 0.0 && self.weight <= 1_000.0) {
            return Err(format!("`weight` is {}; it is a positive number up to 1000", self.weight));
        }
        Ok(())
    }
}
