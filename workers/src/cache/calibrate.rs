//! Learned similarity thresholds for the semantic cache, held to a bound on
//! false hits.
//!
//! One static threshold says nothing about how often a similar prompt's
//! answer is wrong (vCache, Schroeder et al., arXiv 2502.03771). Here the
//! threshold of each model is learned from answers checked against the
//! model itself, and each entry's own threshold rises past every neighbour
//! it answered wrongly:
//!
//! - Every semantic lookup that reaches the index is counted (`L`). When its
//!   nearest prompt is at least `floor` similar, the lookup is a candidate
//!   (`C`).
//! - A uniform fraction of candidates is verified, hit or not: the request is
//!   computed anyway and its answer compared with the cached one. Each check
//!   is an observation: a similarity and whether the answers agreed.
//! - The share of all lookups answered wrongly at threshold `t` is
//!   `C/L · k(t)/n`, with `k(t)` the disagreeing observations at similarity
//!   `t` or more and `n` all observations. The learned threshold is the
//!   lowest `t ≥ floor` whose one-sided 95 % Wilson upper bound on that
//!   share is within the bound. Until [`MIN_OBSERVATIONS`] checks are in,
//!   the static threshold stands.
//! - A wrong answer (checked, or reported through `/v1/cache/feedback`) at
//!   similarity `s` vetoes its entry for anything `s` similar or less
//!   ([`super::semantic::Index::veto`]). Reports from callers stay out of the
//!   learned threshold: callers report a biased sample (answers they saw,
//!   wrong ones more than right ones), and the bound needs a uniform one.
//!
//! The observations are a histogram of similarity bins, so memory stays
//! constant however long a worker runs.

/// Width of a similarity bin.
const BIN: f64 = 0.0025;
/// Bins over similarities 0..1.
const BINS: usize = 400;
/// Checks needed before the learned threshold replaces the static one.
pub const MIN_OBSERVATIONS: u64 = 30;
/// One-sided 95 % normal quantile.
const Z: f64 = 1.645;

/// How a model's semantic threshold is learned (from `[worker.cache]`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Learning {
    /// Most share of semantic lookups that may be answered wrongly.
    pub bound: f64,
    /// Least similarity a candidate has (nothing below it is checked or served).
    pub floor: f64,
    /// Share of candidates checked against the model.
    pub verify: f64,
}

/// What one model's lookups and checks have shown.
#[derive(Debug, Clone)]
pub struct Calibration {
    agreed: Vec<u32>,
    disagreed: Vec<u32>,
    lookups: u64,
    candidates: u64,
    observed: u64,
}

impl Default for Calibration {
    fn default() -> Self {
        Calibration { agreed: vec![0; BINS], disagreed: vec![0; BINS], lookups: 0, candidates: 0, observed: 0 }
    }
}

fn bin(similarity: f64) -> usize {
    ((similarity.max(0.0) / BIN) as usize).min(BINS - 1)
}

/// One-sided upper confidence bound of a proportion of `k` in `n` (Wilson score).
pub fn wilson_upper(k: u64, n: u64) -> f64 {
    if n == 0 {
        return 1.0;
    }
    let (n, p) = (n as f64, k as f64 / n as f64);
    let z2 = Z * Z;
    ((p + z2 / (2.0 * n) + Z * (p * (1.0 - p) / n + z2 / (4.0 * n * n)).sqrt()) / (1.0 + z2 / n)).min(1.0)
}

impl Calibration {
    /// Counts a lookup; `candidate` when its nearest prompt was at least the floor similar.
    pub fn lookup(&mut self, candidate: bool) {
        self.lookups += 1;
        self.candidates += candidate as u64;
    }

    /// Records a checked candidate: its similarity and whether the answers agreed.
    pub fn observe(&mut self, similarity: f64, agreed: bool) {
        let b = bin(similarity);
        match agreed {
            true => self.agreed[b] += 1,
            false => self.disagreed[b] += 1,
        }
        self.observed += 1;
    }

    /// Checks recorded.
    pub fn observed(&self) -> u64 {
        self.observed
    }

    /// The learned threshold. While the checks cannot show any threshold
    /// within the bound (fewer than [`MIN_OBSERVATIONS`], or too few for
    /// the bound even with no wrong answer), `fallback`, raised above every
    /// disagreement seen. Above 1 (no semantic hits) when enough checks
    /// show even the most similar bin beyond the bound.
    pub fn threshold(&self, learning: &Learning, fallback: f64) -> f64 {
        let share = self.candidates as f64 / self.lookups.max(1) as f64;
        if self.observed < MIN_OBSERVATIONS || share * wilson_upper(0, self.observed) > learning.bound {
            let above_wrong = self.disagreed.iter().rposition(|n| *n > 0).map_or(0.0, |b| (b + 1) as f64 * BIN);
            return fallback.max(above_wrong);
        }
        let lowest = bin(learning.floor) + usize::from(bin(learning.floor) as f64 * BIN < learning.floor);
        let mut wrong = 0u64;
        let mut learned = f64::INFINITY;
        // the bound only grows as t falls: stop at the first bin past it
        for b in (lowest..BINS).rev() {
            wrong += self.disagreed[b] as u64;
            if share * wilson_upper(wrong, self.observed) > learning.bound {
                break;
            }
            learned = b as f64 * BIN;
        }
        learned
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LEARN: Learning = Learning { bound: 0.02, floor: 0.8, verify: 1.0 };

    #[test]
    fn wilson_bounds_are_above_the_rate_and_shrink_with_evidence() {
        assert!(wilson_upper(0, 10) > 0.15);
        assert!(wilson_upper(0, 1000) < 0.003);
        assert!(wilson_upper(5, 100) > 0.05 && wilson_upper(5, 100) < 0.11);
        assert_eq!(wilson_upper(0, 0), 1.0);
    }

    #[test]
    fn the_static_threshold_stands_until_enough_checks() {
        let mut c = Calibration::default();
        for _ in 0..MIN_OBSERVATIONS - 1 {
            c.lookup(true);
            c.observe(0.85, true);
        }
        assert_eq!(c.threshold(&LEARN, 0.97), 0.97);
    }

    #[test]
    fn the_threshold_falls_to_where_wrong_answers_start() {
        let mut c = Calibration::default();
        // 1000 lookups, all candidates: right answers from 0.9 up, wrong ones below 0.88
        for i in 0..1000 {
            c.lookup(true);
            let s = 0.8 + (i % 200) as f64 * 0.001;
            c.observe(s, s >= 0.88);
        }
        let t = c.threshold(&LEARN, 0.97);
        assert!(t < 0.97, "agreeing checks lower it: {t}");
        assert!(t >= 0.87, "it stays where wrong answers are rare: {t}");
        // at the learned threshold, the wrong share is within the bound
        let wrong = (0..1000).filter(|i| {
            let s = 0.8 + (*i % 200) as f64 * 0.001;
            s >= t && s < 0.88
        });
        assert!(wrong.count() as f64 / 1000.0 <= LEARN.bound);
    }

    #[test]
    fn wrong_answers_near_one_turn_semantic_hits_off() {
        let mut c = Calibration::default();
        for _ in 0..40 {
            c.lookup(true);
            c.observe(0.999, false);
        }
        assert!(c.threshold(&LEARN, 0.97) >= 1.0, "too few to certify: above every wrong answer");
        for _ in 0..1000 {
            c.lookup(true);
            c.observe(0.999, false);
        }
        assert!(c.threshold(&LEARN, 0.97) > 1.0, "shown beyond the bound: none");
    }

    #[test]
    fn too_few_checks_for_the_bound_keep_the_static_threshold_above_wrong_answers() {
        let mut c = Calibration::default();
        for i in 0..60 {
            c.lookup(true);
            c.observe(0.9 + i as f64 * 0.001, i != 10);
        }
        // 60 checks with every lookup a candidate cannot show 2 % (the bound with none wrong is 4.3 %)
        assert_eq!(c.threshold(&LEARN, 0.95), 0.95);
        let t = c.threshold(&LEARN, 0.90);
        assert!(t > 0.91 && t <= 0.9125, "raised just above the disagreement at 0.910: {t}");
    }

    #[test]
    fn rare_candidates_allow_a_lower_threshold() {
        // the same checks, but only one lookup in ten had a candidate at all
        let (mut often, mut rarely) = (Calibration::default(), Calibration::default());
        for i in 0..400 {
            let s = 0.8 + (i % 200) as f64 * 0.001;
            often.lookup(true);
            often.observe(s, s >= 0.9 || i % 3 != 0);
            for _ in 0..10 {
                rarely.lookup(false);
            }
            rarely.lookup(true);
            rarely.observe(s, s >= 0.9 || i % 3 != 0);
        }
        assert!(rarely.threshold(&LEARN, 0.97) < often.threshold(&LEARN, 0.97));
    }
}
