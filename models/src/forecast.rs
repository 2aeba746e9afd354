//! The forecasting interface and the baselines of `EVALUATION.md`.

use serde::{Deserialize, Serialize};

use crate::trace::{STEP_S, Statics};

/// The quantile levels every forecaster answers.
pub const LEVELS: [f64; 3] = [0.5, 0.9, 0.99];

/// A forecast: quantiles at [`LEVELS`] (p50, p90, p99), non-decreasing.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Quantiles(pub [f64; 3]);

impl Quantiles {
    /// The median.
    pub fn p50(&self) -> f64 {
        self.0[0]
    }
    /// The 90th percentile.
    pub fn p90(&self) -> f64 {
        self.0[1]
    }
    /// The 99th percentile.
    pub fn p99(&self) -> f64 {
        self.0[2]
    }
    /// Make non-decreasing and non-negative (usage is never negative).
    pub fn sanitized(mut self) -> Self {
        let mut lo = 0.0f64;
        for q in &mut self.0 {
            if !q.is_finite() {
                *q = lo;
            }
            *q = q.max(lo);
            lo = *q;
        }
        self
    }
}

/// How far ahead a forecast looks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Horizon {
    /// The next 5-minute interval.
    NextInterval,
    /// Any slot of the next hour.
    NextHour,
    /// Any slot of the first full hour after a restart; the history ends at
    /// the interruption.
    AfterRestart,
}

/// What a forecaster may look at: one metric of one series on the grid, up
/// to (and including) the last visible slot, and the decision time.
#[derive(Debug, Clone, Copy)]
pub struct History<'a> {
    /// Visible slots, oldest first; `NaN` = empty slot.
    pub values: &'a [f64],
    /// Slot number of `values[0]`.
    pub first_slot: i64,
    /// The decision time as a slot number (`ts = 300 * slot`); at or after
    /// the last visible slot.
    pub decision_slot: i64,
    /// Static features of the series.
    pub statics: Statics,
}

impl History<'_> {
    /// The last `n` present values, oldest first.
    pub fn last_present(&self, n: usize) -> Vec<f64> {
        let mut v: Vec<f64> = self
            .values
            .iter()
            .rev()
            .filter(|x| !x.is_nan())
            .take(n)
            .copied()
            .collect();
        v.reverse();
        v
    }

    /// Slot number of the last visible slot.
    pub fn last_slot(&self) -> i64 {
        self.first_slot + self.values.len() as i64 - 1
    }
}

/// Something that turns history into quantiles. Implementations are pure:
/// the same history gives the same forecast.
pub trait Forecaster: Send + Sync {
    /// Short stable name used in tables and JSON.
    fn name(&self) -> &str;
    /// Forecast `horizon` from `history`.
    fn forecast(&self, history: &History<'_>, horizon: Horizon) -> Quantiles;
    /// Forecast many histories at once (a model batches; default: one by one).
    fn forecast_batch(&self, histories: &[History<'_>], horizon: Horizon) -> Vec<Quantiles> {
        histories
            .iter()
            .map(|h| self.forecast(h, horizon))
            .collect()
    }
    /// Forecast the decisions of one series in time order, where
    /// `outcomes[i]` holds what followed decision `i`. A forecaster that
    /// learns online may use the outcomes of decision `j` for decision `i`
    /// only if `j`'s target hour ended at or before `i`'s decision time
    /// (so only values at or before each decision are used). Default: the
    /// same as [`Forecaster::forecast_batch`].
    fn forecast_sequence(
        &self,
        histories: &[History<'_>],
        horizon: Horizon,
        outcomes: &[&[f64]],
    ) -> Vec<Quantiles> {
        let _ = outcomes;
        self.forecast_batch(histories, horizon)
    }
}

/// Adaptive conformal adjustment of one series' quantiles (Gibbs and
/// Candès, 2021): per level a multiplier `exp(a)`, with
/// `a += gamma (miss - (1 - p))` after each outcome, so the series' long-run
/// coverage approaches `p` whatever the base forecaster does. The daemon
/// keeps one per VM and metric.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct OnlineCalibrator {
    log_adj: [f64; 3],
    gamma: f64,
}

impl OnlineCalibrator {
    /// Start neutral with step `gamma`.
    pub fn new(gamma: f64) -> Self {
        OnlineCalibrator {
            log_adj: [0.0; 3],
            gamma,
        }
    }

    /// The adjusted forecast.
    pub fn adjust(&self, q: Quantiles) -> Quantiles {
        let mut out = q.0;
        for (o, a) in out.iter_mut().zip(self.log_adj) {
            *o *= a.exp();
        }
        Quantiles(out).sanitized()
    }

    /// Learn from one outcome `y` of an adjusted forecast `q`.
    pub fn update(&mut self, q: &Quantiles, y: f64) {
        for ((a, &p), &qk) in self.log_adj.iter_mut().zip(&LEVELS).zip(&q.0) {
            let miss = if y > qk { 1.0 } else { 0.0 };
            *a = (*a + self.gamma * (miss - (1.0 - p))).clamp(-3.0, 3.0);
        }
    }
}

/// Empirical quantile: the smallest `x` with `F(x) >= p`. `sorted` must be
/// ascending and non-empty.
pub fn empirical_quantile(sorted: &[f64], p: f64) -> f64 {
    let n = sorted.len();
    // smallest k (1-based) with k/n >= p; the epsilon absorbs p*n rounding.
    let k = ((p * n as f64) - 1e-9).ceil().clamp(1.0, n as f64);
    // k is an integer in [1, n] here, so the cast is exact.
    #[allow(clippy::cast_possible_truncation)]
    let k = k as usize;
    sorted[k - 1]
}

fn window_quantiles(mut v: Vec<f64>) -> Quantiles {
    if v.is_empty() {
        return Quantiles([0.0; 3]);
    }
    v.sort_by(f64::total_cmp);
    Quantiles(LEVELS.map(|p| empirical_quantile(&v, p)))
}

/// `prev_hour` / `prev_24h`: empirical quantiles of the last `n` present
/// slots (12 and 288).
#[derive(Debug, Clone)]
pub struct PrevWindow {
    name: &'static str,
    n: usize,
}

impl PrevWindow {
    /// `prev_hour`: the last 12 present slots.
    pub fn hour() -> Self {
        PrevWindow {
            name: "prev_hour",
            n: 12,
        }
    }
    /// `prev_24h`: the last 288 present slots.
    pub fn day() -> Self {
        PrevWindow {
            name: "prev_24h",
            n: 288,
        }
    }
}

impl Forecaster for PrevWindow {
    fn name(&self) -> &str {
        self.name
    }
    fn forecast(&self, h: &History<'_>, _: Horizon) -> Quantiles {
        window_quantiles(h.last_present(self.n))
    }
}

/// `ewma_sd`: EWMA mean `m` and variance `v` with `alpha = 2/13` over all
/// history (`m` starts at the first value, `v` at 0; per value
/// `d = x - m; m += alpha d; v = (1 - alpha)(v + alpha d^2)`);
/// `q_p = max(0, m + z_p sqrt(v))` with `z = 0, 1.2816, 2.3263`.
#[derive(Debug, Clone, Default)]
pub struct EwmaSd;

/// EWMA smoothing constant of `ewma_sd`.
pub const EWMA_ALPHA: f64 = 2.0 / 13.0;
/// Normal quantiles used by `ewma_sd`.
pub const EWMA_Z: [f64; 3] = [0.0, 1.2816, 2.3263];

/// EWMA mean and variance over the present values of `values`.
pub fn ewma_mean_var(values: &[f64]) -> Option<(f64, f64)> {
    let mut it = values.iter().filter(|x| !x.is_nan());
    let mut m = *it.next()?;
    let mut v = 0.0;
    for &x in it {
        let d = x - m;
        m += EWMA_ALPHA * d;
        v = (1.0 - EWMA_ALPHA) * (v + EWMA_ALPHA * d * d);
    }
    Some((m, v))
}

impl Forecaster for EwmaSd {
    fn name(&self) -> &str {
        "ewma_sd"
    }
    fn forecast(&self, h: &History<'_>, _: Horizon) -> Quantiles {
        match ewma_mean_var(h.values) {
            None => Quantiles([0.0; 3]),
            Some((m, v)) => Quantiles(EWMA_Z.map(|z| (m + z * v.sqrt()).max(0.0))),
        }
    }
}

/// `vpa` / `vpa_margin`: a decaying histogram as in the Kubernetes VPA
/// recommender. Buckets are exponential: bucket 0 is `[0, 0.1)`, bucket `i`
/// ends at `0.1 (1.05^(i+1) - 1) / 0.05`. Each value is weighted
/// `2^((ts - t) / 24 h)` (half-life 24 h, `t` the decision time);
/// `q_p` is the end of the first bucket where the cumulative weight reaches
/// `p` of the total; `vpa_margin` multiplies by 1.15 (the VPA safety margin).
#[derive(Debug, Clone)]
pub struct Vpa {
    margin: f64,
}

/// First bucket size of the VPA histogram.
pub const VPA_FIRST_BUCKET: f64 = 0.1;
/// Bucket growth ratio of the VPA histogram.
pub const VPA_RATIO: f64 = 1.05;
/// Half-life of the VPA weights, seconds.
pub const VPA_HALF_LIFE_S: f64 = 86_400.0;
/// Safety margin of `vpa_margin`.
pub const VPA_MARGIN: f64 = 1.15;

impl Vpa {
    /// `vpa`.
    pub fn plain() -> Self {
        Vpa { margin: 1.0 }
    }
    /// `vpa_margin`.
    pub fn with_margin() -> Self {
        Vpa { margin: VPA_MARGIN }
    }
}

/// Bucket index of `v` in the VPA histogram.
pub fn vpa_bucket(v: f64) -> usize {
    if v < VPA_FIRST_BUCKET {
        return 0;
    }
    let i = ((1.0 + v * (VPA_RATIO - 1.0) / VPA_FIRST_BUCKET).ln() / VPA_RATIO.ln()).floor();
    // Finite and >= 0 here (v >= 0.1), so the cast is exact.
    #[allow(clippy::cast_possible_truncation)]
    let mut i = i as usize;
    // Guard the floating-point boundary: v must be >= start(i), < end(i).
    while i > 0 && v < vpa_bucket_end(i - 1) {
        i -= 1;
    }
    while v >= vpa_bucket_end(i) {
        i += 1;
    }
    i
}

/// End (exclusive upper bound) of VPA bucket `i`.
pub fn vpa_bucket_end(i: usize) -> f64 {
    VPA_FIRST_BUCKET * (VPA_RATIO.powf(i as f64 + 1.0) - 1.0) / (VPA_RATIO - 1.0)
}

impl Forecaster for Vpa {
    fn name(&self) -> &str {
        if self.margin == 1.0 {
            "vpa"
        } else {
            "vpa_margin"
        }
    }
    fn forecast(&self, h: &History<'_>, _: Horizon) -> Quantiles {
        let mut weights: Vec<f64> = Vec::new();
        let mut total = 0.0;
        // Weight relative to the decision time: 2^((ts - t)/24h). Walk back
        // from the newest slot multiplying by the per-slot decay.
        let per_slot = (-(STEP_S as f64) / VPA_HALF_LIFE_S).exp2();
        let age0 = (h.decision_slot - h.last_slot()) as f64 * STEP_S as f64;
        let mut w = (-age0 / VPA_HALF_LIFE_S).exp2();
        for &x in h.values.iter().rev() {
            if !x.is_nan() {
                let b = vpa_bucket(x);
                if b >= weights.len() {
                    weights.resize(b + 1, 0.0);
                }
                weights[b] += w;
                total += w;
            }
            w *= per_slot;
            if w < 1e-300 {
                break;
            }
        }
        if total <= 0.0 {
            return Quantiles([0.0; 3]);
        }
        let q = LEVELS.map(|p| {
            let threshold = p * total;
            let mut cum = 0.0;
            let mut end = vpa_bucket_end(weights.len().saturating_sub(1));
            for (i, &bw) in weights.iter().enumerate() {
                cum += bw;
                if cum >= threshold * (1.0 - 1e-12) {
                    end = vpa_bucket_end(i);
                    break;
                }
            }
            end * self.margin
        });
        Quantiles(q)
    }
}

/// The five baselines every table carries, in table order.
pub fn baselines() -> Vec<Box<dyn Forecaster>> {
    vec![
        Box::new(PrevWindow::hour()),
        Box::new(PrevWindow::day()),
        Box::new(EwmaSd),
        Box::new(Vpa::plain()),
        Box::new(Vpa::with_margin()),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hist(values: &[f64]) -> History<'_> {
        History {
            values,
            first_slot: 0,
            decision_slot: values.len() as i64 - 1,
            statics: Statics::default(),
        }
    }

    #[test]
    fn empirical_quantile_is_smallest_x_with_cdf_at_least_p() {
        let v: Vec<f64> = (1..=10).map(f64::from).collect();
        assert_eq!(empirical_quantile(&v, 0.5), 5.0);
        assert_eq!(empirical_quantile(&v, 0.9), 9.0);
        assert_eq!(empirical_quantile(&v, 0.91), 10.0);
        assert_eq!(empirical_quantile(&v, 0.99), 10.0);
        let v12: Vec<f64> = (1..=12).map(f64::from).collect();
        // 0.9 * 12 = 10.8 -> 11th value.
        assert_eq!(empirical_quantile(&v12, 0.9), 11.0);
        assert_eq!(empirical_quantile(&v12, 0.5), 6.0);
    }

    #[test]
    fn prev_hour_uses_last_12_present_slots_skipping_gaps() {
        let mut v: Vec<f64> = (0..30).map(f64::from).collect();
        v[25] = f64::NAN;
        let q = PrevWindow::hour().forecast(&hist(&v), Horizon::NextHour);
        // Present tail: 17..=24, 26..=29 (12 values).
        assert_eq!(q.p50(), 22.0);
        assert_eq!(q.p90(), 28.0);
        assert_eq!(q.p99(), 29.0);
    }

    #[test]
    fn ewma_sd_matches_hand_computation() {
        let v = [10.0, 20.0];
        let q = EwmaSd.forecast(&hist(&v), Horizon::NextHour);
        let a = 2.0 / 13.0;
        let m = 10.0 + a * 10.0;
        let var = (1.0 - a) * (a * 100.0);
        assert!((q.p50() - m).abs() < 1e-12);
        assert!((q.p90() - (m + 1.2816 * var.sqrt())).abs() < 1e-12);
        assert!((q.p99() - (m + 2.3263 * var.sqrt())).abs() < 1e-12);
        // Never negative.
        let q = EwmaSd.forecast(&hist(&[0.0, 0.0]), Horizon::NextHour);
        assert_eq!(q.0, [0.0; 3]);
    }

    #[test]
    fn online_calibrator_brings_coverage_to_p() {
        // A forecaster that always says 1.0 for values uniform on [0, 2):
        // p90 covers 50 % at first; the calibrator must reach about 90 %.
        let mut cal = OnlineCalibrator::new(0.01);
        let mut covered = [0usize; 3];
        let n = 20_000;
        for i in 0..n {
            let y = 2.0 * ((i * 7919) % 1000) as f64 / 1000.0;
            let q = cal.adjust(Quantiles([1.0, 1.0, 1.0]));
            if i >= n / 2 {
                for (c, qk) in covered.iter_mut().zip(q.0) {
                    *c += usize::from(y <= qk);
                }
            }
            cal.update(&q, y);
        }
        let half = (n / 2) as f64;
        assert!((covered[0] as f64 / half - 0.5).abs() < 0.02, "{covered:?}");
        assert!((covered[1] as f64 / half - 0.9).abs() < 0.02, "{covered:?}");
        assert!(
            (covered[2] as f64 / half - 0.99).abs() < 0.01,
            "{covered:?}"
        );
    }

    #[test]
    fn vpa_buckets_are_exponential_from_0_1() {
        assert_eq!(vpa_bucket(0.0), 0);
        assert_eq!(vpa_bucket(0.099), 0);
        assert_eq!(vpa_bucket(0.1), 1);
        assert!((vpa_bucket_end(0) - 0.1).abs() < 1e-12);
        assert!((vpa_bucket_end(1) - 0.205).abs() < 1e-12);
        for x in [0.3, 1.0, 7.7, 55.0, 100.0, 12345.6] {
            let b = vpa_bucket(x);
            assert!(x < vpa_bucket_end(b) && (b == 0 || x >= vpa_bucket_end(b - 1)));
        }
    }

    #[test]
    fn vpa_weights_recent_values_more() {
        // One day of 1.0 then one day of 50.0: the newer day has twice the
        // weight of the older one in total, so p50 lands in the 50.0 bucket.
        let mut v = vec![1.0; 288];
        v.extend(vec![50.0; 288]);
        let q = Vpa::plain().forecast(&hist(&v), Horizon::NextHour);
        assert_eq!(q.p50(), vpa_bucket_end(vpa_bucket(50.0)));
        // Old-day share is 1/3 of the weight: p = 0.3 would be in bucket(1.0).
        let qm = Vpa::with_margin().forecast(&hist(&v), Horizon::NextHour);
        assert!((qm.p50() - 1.15 * q.p50()).abs() < 1e-9);
        // Hand-computed weight share for two values a day apart.
        let mut v = vec![f64::NAN; 289];
        v[0] = 1.0;
        v[288] = 3.0;
        // weights: 1.0 -> 0.5, 3.0 -> 1.0; total 1.5; p50 threshold 0.75:
        // cum after bucket(1.0) = 0.5 < 0.75, so bucket(3.0).
        let q = Vpa::plain().forecast(&hist(&v), Horizon::NextHour);
        assert_eq!(q.p50(), vpa_bucket_end(vpa_bucket(3.0)));
    }
}
