//! Trend and anomaly helpers over short series: the least-squares slope of
//! a signal over a time window, and the robust z-score of its latest value
//! (median and MAD, so one earlier spike does not hide the next).

/// Least-squares slope of `points` (t, value) in value units per time unit;
/// `None` with fewer than two distinct times.
pub fn slope(points: &[(f64, f64)]) -> Option<f64> {
    let n = points.len() as f64;
    if points.len() < 2 {
        return None;
    }
    let mt = points.iter().map(|p| p.0).sum::<f64>() / n;
    let mv = points.iter().map(|p| p.1).sum::<f64>() / n;
    let (mut sxy, mut sxx) = (0.0, 0.0);
    for &(t, v) in points {
        sxy += (t - mt) * (v - mv);
        sxx += (t - mt) * (t - mt);
    }
    (sxx > 0.0).then(|| sxy / sxx)
}

fn median(sorted: &[f64]) -> f64 {
    let n = sorted.len();
    if n % 2 == 1 {
        sorted[n / 2]
    } else {
        (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0
    }
}

/// Robust z-score of `x` against `history`: `0.6745 (x − median) / MAD`.
/// `None` with fewer than five points of history. When the MAD is zero (a
/// flat history) any departure is reported as ±infinity, none as 0.
pub fn robust_z(history: &[f64], x: f64) -> Option<f64> {
    let mut h: Vec<f64> = history.iter().copied().filter(|v| v.is_finite()).collect();
    if h.len() < 5 || !x.is_finite() {
        return None;
    }
    h.sort_by(f64::total_cmp);
    let med = median(&h);
    let mut dev: Vec<f64> = h.iter().map(|v| (v - med).abs()).collect();
    dev.sort_by(f64::total_cmp);
    let mad = median(&dev);
    let d = x - med;
    if mad > 0.0 {
        Some(0.6745 * d / mad)
    } else if d.abs() < 1e-12 {
        Some(0.0)
    } else {
        Some(d.signum() * f64::INFINITY)
    }
}

/// The conventional threshold above which a robust z-score is an outlier.
pub const ANOMALY_Z: f64 = 3.5;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slope_of_lines() {
        let up: Vec<_> = (0..20).map(|i| (i as f64 * 5.0, 100.0 + 3.0 * i as f64 * 5.0)).collect();
        assert!((slope(&up).unwrap() - 3.0).abs() < 1e-9);
        let flat: Vec<_> = (0..20).map(|i| (i as f64, 7.0)).collect();
        assert_eq!(slope(&flat), Some(0.0));
        assert_eq!(slope(&[(1.0, 2.0)]), None);
        assert_eq!(slope(&[(1.0, 2.0), (1.0, 5.0)]), None, "one instant has no slope");
    }

    #[test]
    fn slope_sees_a_trend_through_noise() {
        // lag growing 2/s with ±50 noise
        let pts: Vec<_> = (0..60)
            .map(|i| {
                let t = i as f64 * 5.0;
                let noise = if i % 2 == 0 { 50.0 } else { -50.0 };
                (t, 2.0 * t + noise)
            })
            .collect();
        let s = slope(&pts).unwrap();
        assert!((s - 2.0).abs() < 0.1, "{s}");
    }

    #[test]
    fn robust_z_flags_spikes_not_noise() {
        let hist: Vec<f64> = (0..50).map(|i| 100.0 + ((i * 37) % 11) as f64 - 5.0).collect();
        let z_normal = robust_z(&hist, 103.0).unwrap();
        assert!(z_normal.abs() < ANOMALY_Z, "{z_normal}");
        let z_spike = robust_z(&hist, 160.0).unwrap();
        assert!(z_spike > ANOMALY_Z, "{z_spike}");
        assert!(robust_z(&hist, 40.0).unwrap() < -ANOMALY_Z);
    }

    #[test]
    fn robust_z_is_not_fooled_by_earlier_spikes() {
        // a mean/stddev z-score would be inflated by the old spikes
        let mut hist: Vec<f64> = (0..40).map(|i| 10.0 + (i % 3) as f64).collect();
        hist.extend([500.0, 800.0, 650.0]);
        let z = robust_z(&hist, 200.0).unwrap();
        assert!(z > ANOMALY_Z, "{z}");
        let mean = hist.iter().sum::<f64>() / hist.len() as f64;
        let sd = (hist.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / hist.len() as f64).sqrt();
        assert!((200.0 - mean) / sd < ANOMALY_Z, "the classic z-score would miss it");
    }

    #[test]
    fn robust_z_edge_cases() {
        assert_eq!(robust_z(&[1.0, 2.0], 3.0), None, "too little history");
        assert_eq!(robust_z(&[5.0; 10], 5.0), Some(0.0));
        assert_eq!(robust_z(&[5.0; 10], 6.0), Some(f64::INFINITY));
        assert_eq!(robust_z(&[1.0, 2.0, 3.0, 4.0, 5.0], f64::NAN), None);
    }
}
