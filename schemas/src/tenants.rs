//! What an operator sets for a tenant: KV `fleet_tenants`, key the tenant,
//! value one JSON [`TenantPolicy`]. Workers follow it for weights, ingresses
//! for budgets; a tenant with no entry has the defaults. A [`Budget`] also
//! sits on an API key (`fleet_api_keys`).

use serde::{Deserialize, Serialize};

/// One tenant's settings. Fields may be added; readers ignore unknown ones.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct TenantPolicy {
    /// Its share of each worker's slots against the other tenants with work
    /// in the same class: a tenant of weight 3 starts three requests for
    /// each one of a tenant of weight 1 while both wait. Positive; default 1.
    #[serde(default = "one")]
    pub weight: f64,
    /// What the tenant may use per day or month, across all its keys; none:
    /// no limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub budget: Option<Budget>,
}

fn one() -> f64 {
    1.0
}

impl Default for TenantPolicy {
    fn default() -> Self {
        TenantPolicy { weight: 1.0, budget: None }
    }
}

impl TenantPolicy {
    /// Why this policy cannot be stored, naming the field.
    pub fn check(&self) -> Result<(), String> {
        if !(self.weight.is_finite() && self.weight > 0.0 && self.weight <= 1_000.0) {
            return Err(format!("`weight` is {}; it is a positive number up to 1000", self.weight));
        }
        self.budget.as_ref().map_or(Ok(()), Budget::check)
    }
}

/// How much may be used in each UTC day or calendar month, counted from the
/// metered usage (the requests and tokens `GET /v1/usage` reports). A
/// request whose estimate would take the count past a limit is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Budget {
    /// Prompt and completion tokens per period; none: not limited.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokens: Option<u64>,
    /// Requests per period (failed ones too, as usage counts them); none:
    /// not limited.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requests: Option<u64>,
    /// The period: `day` or `month` (UTC); default `month`.
    #[serde(default)]
    pub per: Period,
}

impl Budget {
    /// Why this budget cannot be stored, naming the field.
    pub fn check(&self) -> Result<(), String> {
        if self.tokens.is_none() && self.requests.is_none() {
            return Err("a `budget` limits `tokens`, `requests` or both".into());
        }
        Ok(())
    }
}

/// A budget's period, in UTC.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Period {
    /// From midnight to midnight.
    Day,
    /// From the first of the month to the first of the next.
    #[default]
    Month,
}

impl Period {
    /// As written in settings and on the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            Period::Day => "day",
            Period::Month => "month",
        }
    }

    /// `day` or `month`.
    pub fn parse(s: &str) -> Option<Period> {
        match s {
            "day" => Some(Period::Day),
            "month" => Some(Period::Month),
            _ => None,
        }
    }

    /// The start of the period holding `at_ms` and the start of the next
    /// one, both in unix ms.
    pub fn bounds(self, at_ms: u64) -> (u64, u64) {
        const DAY_MS: u64 = 86_400_000;
        let day = at_ms / DAY_MS;
        match self {
            Period::Day => (day * DAY_MS, (day + 1) * DAY_MS),
            Period::Month => {
                let (y, m, _) = civil_from_days(day as i64);
                let start = days_from_civil(y, m, 1);
                let next = if m == 12 { days_from_civil(y + 1, 1, 1) } else { days_from_civil(y, m + 1, 1) };
                (start as u64 * DAY_MS, next as u64 * DAY_MS)
            }
        }
    }
}

/// Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant's
/// `days_from_civil`).
fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (i64::from(m) + 9) % 12;
    let doy = (153 * mp + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// The date of a count of days since 1970-01-01 (`civil_from_days`).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    const DAY: u64 = 86_400_000;

    #[test]
    fn periods_start_at_utc_midnight_and_the_first_of_the_month() {
        // 2026-12-03T07:25:00Z
        let at = 1_796_282_700_000;
        let dec1 = 1_796_083_200_000; // 2026-12-01
        assert_eq!(Period::Day.bounds(at), (dec1 + 2 * DAY, dec1 + 3 * DAY));
        assert_eq!(Period::Month.bounds(at), (dec1, dec1 + 31 * DAY), "December has 31 days, ending in a new year");
        assert_eq!(Period::Month.bounds(dec1), Period::Month.bounds(dec1 + 31 * DAY - 1), "both ends");
        // February of a leap year
        let feb = days_from_civil(2028, 2, 1) as u64 * DAY;
        assert_eq!(Period::Month.bounds(feb + 5 * DAY), (feb, feb + 29 * DAY));
        assert_eq!(civil_from_days(days_from_civil(2000, 3, 1)), (2000, 3, 1));
    }

    #[test]
    fn a_budget_limits_something_and_the_default_period_is_a_month() {
        let b: Budget = serde_json::from_str(r#"{"tokens": 5}"#).unwrap();
        assert_eq!((b.tokens, b.per), (Some(5), Period::Month));
        assert!(serde_json::from_str::<Budget>(r#"{}"#).unwrap().check().unwrap_err().contains("`tokens`"));
        assert!(serde_json::from_str::<Budget>(r#"{"tokens": 1, "per": "week"}"#).is_err());
        let p: TenantPolicy = serde_json::from_str(r#"{"weight": 2}"#).unwrap();
        assert_eq!(p.budget, None, "settings stored before budgets read the same");
    }
}
