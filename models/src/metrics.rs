//! The metrics of `EVALUATION.md`, pooled over every series, decision time
//! and target slot, plus the equal-coverage comparison.

use serde::{Deserialize, Serialize};

use crate::forecast::{LEVELS, Quantiles};

/// Pinball (quantile) loss of one forecast `q` at level `p` for outcome `y`:
/// `p (y - q)` when `y > q`, else `(1 - p)(q - y)`.
pub fn pinball(p: f64, y: f64, q: f64) -> f64 {
    if y > q {
        p * (y - q)
    } else {
        (1.0 - p) * (q - y)
    }
}

/// Collects `(y, quantiles)` pairs and reports the metrics.
#[derive(Debug, Clone, Default)]
pub struct Scorer {
    ys: Vec<f64>,
    qs: Vec<[f64; 3]>,
}

/// Metrics at one quantile level.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct LevelMetrics {
    /// The level `p`.
    pub p: f64,
    /// Share of target values with `y <= q_p`.
    pub coverage: f64,
    /// Mean pinball loss.
    pub pinball: f64,
    /// Mean `q_p - y` over covered values.
    pub slack: f64,
    /// `sum(q_p - y) / sum(y)` over covered values.
    pub relative_slack: f64,
    /// Mean `y - q_p` over uncovered values (0 when all are covered).
    pub shortfall: f64,
    /// Equal coverage: the factor `c` that makes the pooled coverage of
    /// `c q_p` exactly `p` (the smallest such `c`); `None` if no finite
    /// factor reaches `p`.
    pub eq_factor: Option<f64>,
    /// Relative slack of `c q_p` (at coverage `p`).
    pub eq_relative_slack: Option<f64>,
    /// Pinball loss of `c q_p`.
    pub eq_pinball: Option<f64>,
}

/// All metrics of one forecaster on one table.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Metrics {
    /// Number of scored target values.
    pub n: usize,
    /// Mean absolute error of p50.
    pub mae: f64,
    /// Mean of the pinball losses at the three levels.
    pub pinball_mean: f64,
    /// Per level: p50, p90, p99.
    pub levels: Vec<LevelMetrics>,
}

impl Scorer {
    /// Record one target value and the forecast that was made for it.
    pub fn push(&mut self, y: f64, q: &Quantiles) {
        self.ys.push(y);
        self.qs.push(q.0);
    }

    /// Record all targets of one decision.
    pub fn push_all(&mut self, ys: &[f64], q: &Quantiles) {
        for &y in ys {
            self.push(y, q);
        }
    }

    /// Number of pairs recorded.
    pub fn len(&self) -> usize {
        self.ys.len()
    }

    /// Whether nothing was recorded.
    pub fn is_empty(&self) -> bool {
        self.ys.is_empty()
    }

    /// Compute the metrics; `None` when empty.
    pub fn metrics(&self) -> Option<Metrics> {
        if self.ys.is_empty() {
            return None;
        }
        let n = self.ys.len() as f64;
        let mae = self
            .ys
            .iter()
            .zip(&self.qs)
            .map(|(y, q)| (y - q[0]).abs())
            .sum::<f64>()
            / n;
        let levels: Vec<LevelMetrics> = LEVELS
            .iter()
            .enumerate()
            .map(|(k, &p)| self.level(k, p))
            .collect();
        let pinball_mean = levels.iter().map(|l| l.pinball).sum::<f64>() / levels.len() as f64;
        Some(Metrics {
            n: self.ys.len(),
            mae,
            pinball_mean,
            levels,
        })
    }

    fn level(&self, k: usize, p: f64) -> LevelMetrics {
        let (cov, pin, slack, rel, short) =
            level_stats(&self.ys, self.qs.iter().map(|q| q[k]), p, 1.0);
        let eq_factor = equal_coverage_factor(&self.ys, self.qs.iter().map(|q| q[k]), p);
        let (eq_rel, eq_pin) = match eq_factor {
            Some(c) => {
                let (_, pin, _, rel, _) = level_stats(&self.ys, self.qs.iter().map(|q| q[k]), p, c);
                (Some(rel), Some(pin))
            }
            None => (None, None),
        };
        LevelMetrics {
            p,
            coverage: cov,
            pinball: pin,
            slack,
            relative_slack: rel,
            shortfall: short,
            eq_factor,
            eq_relative_slack: eq_rel,
            eq_pinball: eq_pin,
        }
    }
}

/// (coverage, pinball, slack, relative slack, shortfall) of `scale * q`.
fn level_stats(
    ys: &[f64],
    qs: impl Iterator<Item = f64>,
    p: f64,
    scale: f64,
) -> (f64, f64, f64, f64, f64) {
    let (mut covered, mut pin, mut slack, mut ysum_cov, mut short) = (0usize, 0.0, 0.0, 0.0, 0.0);
    for (&y, q) in ys.iter().zip(qs) {
        let q = q * scale;
        pin += pinball(p, y, q);
        if y <= q {
            covered += 1;
            slack += q - y;
            ysum_cov += y;
        } else {
            short += y - q;
        }
    }
    let n = ys.len();
    let uncovered = n - covered;
    (
        covered as f64 / n as f64,
        pin / n as f64,
        if covered > 0 {
            slack / covered as f64
        } else {
            0.0
        },
        if ysum_cov > 0.0 {
            slack / ysum_cov
        } else {
            0.0
        },
        if uncovered > 0 {
            short / uncovered as f64
        } else {
            0.0
        },
    )
}

/// The smallest factor `c >= 0` such that the share of pairs with
/// `y <= c q` is at least `p`; `None` if even an infinite factor does not
/// reach `p` (too many pairs with `q = 0 < y`).
pub fn equal_coverage_factor(ys: &[f64], qs: impl Iterator<Item = f64>, p: f64) -> Option<f64> {
    // A pair is covered at factor c iff c >= ratio, with ratio = y / q for
    // q > 0; for q <= 0 it is covered at every c iff y <= q.
    let mut ratios: Vec<f64> = ys
        .iter()
        .zip(qs)
        .map(|(&y, q)| {
            if q > 0.0 {
                (y / q).max(0.0)
            } else if y <= q {
                0.0
            } else {
                f64::INFINITY
            }
        })
        .collect();
    if ratios.is_empty() {
        return None;
    }
    ratios.sort_by(f64::total_cmp);
    let c = crate::forecast::empirical_quantile(&ratios, p);
    c.is_finite().then_some(c)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pinball_hand_cases() {
        assert!((pinball(0.9, 10.0, 8.0) - 1.8).abs() < 1e-12);
        assert!((pinball(0.9, 8.0, 10.0) - 0.2).abs() < 1e-12);
        assert_eq!(pinball(0.5, 3.0, 3.0), 0.0);
        assert!((pinball(0.99, 0.0, 1.0) - 0.01).abs() < 1e-12);
    }

    #[test]
    fn scorer_hand_computed_small_case() {
        let mut s = Scorer::default();
        // q = (2, 4, 6) for targets 1, 3, 5, 7.
        s.push_all(&[1.0, 3.0, 5.0, 7.0], &Quantiles([2.0, 4.0, 6.0]));
        let m = s.metrics().unwrap();
        assert_eq!(m.n, 4);
        // MAE of p50: |1-2|+|3-2|+|5-2|+|7-2| = 10 -> 2.5
        assert!((m.mae - 2.5).abs() < 1e-12);
        let l90 = &m.levels[1];
        // p90 q = 4: covered 1, 3 -> coverage 0.5.
        assert!((l90.coverage - 0.5).abs() < 1e-12);
        // slack: (3 + 1)/2 = 2; relative: 4 / 4 = 1.
        assert!((l90.slack - 2.0).abs() < 1e-12);
        assert!((l90.relative_slack - 1.0).abs() < 1e-12);
        // shortfall: (1 + 3)/2 = 2.
        assert!((l90.shortfall - 2.0).abs() < 1e-12);
        // pinball: 0.1*3 + 0.1*1 + 0.9*1 + 0.9*3 = 4.0 -> mean 1.0
        assert!((l90.pinball - 1.0).abs() < 1e-12);
        // Equal coverage at 0.9: ratios 0.25, 0.75, 1.25, 1.75; the
        // smallest c covering 4 * 0.9 = 3.6 -> 4 pairs is 1.75.
        assert!((l90.eq_factor.unwrap() - 1.75).abs() < 1e-12);
        // At c = 1.75, q = 7: slack (6+4+2+0) / (1+3+5+7) = 0.75.
        assert!((l90.eq_relative_slack.unwrap() - 0.75).abs() < 1e-12);
        let l50 = &m.levels[0];
        // p50 ratios 0.5, 1.5, 2.5, 3.5 -> 2 of 4 at c = 1.5.
        assert!((l50.eq_factor.unwrap() - 1.5).abs() < 1e-12);
    }

    #[test]
    fn equal_coverage_factor_handles_zero_quantiles() {
        // q = 0 and y = 0 is covered at any factor; q = 0 < y never is.
        let ys = [0.0, 1.0, 2.0, 5.0];
        let qs = [0.0, 0.0, 1.0, 1.0];
        assert_eq!(equal_coverage_factor(&ys, qs.into_iter(), 0.5), Some(2.0));
        assert_eq!(equal_coverage_factor(&ys, qs.into_iter(), 0.75), Some(5.0));
        assert_eq!(equal_coverage_factor(&ys, qs.into_iter(), 0.9), None);
    }
}
