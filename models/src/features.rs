//! Features of the learned model: a scale-free summary of one history.
//!
//! Values are divided by a per-history scale `s` (the mean of the last
//! 288 present values) and compressed with `g(x) = ln(1 + x / s)`, so one
//! model serves CPU percent, memory KiB and network KiB/s alike. Targets are
//! transformed the same way; quantiles survive monotone transforms.

use crate::forecast::{History, ewma_mean_var};
use crate::trace::{SLOTS_PER_DAY, SLOTS_PER_HOUR, STEP_S};

/// Version of the feature definition; stored in model files.
pub const FEATURE_VERSION: u32 = 1;

const LAST_SLOTS: usize = 12;
const HOURS: usize = 24;

/// Names of the features, in order (stored in model files and checked on
/// load).
pub fn feature_names() -> Vec<String> {
    let mut n = Vec::new();
    for j in 0..LAST_SLOTS {
        n.push(format!("slot_lag{j}"));
    }
    for h in 0..HOURS {
        n.push(format!("hour_mean_lag{h}"));
    }
    for h in 0..HOURS {
        n.push(format!("hour_max_lag{h}"));
    }
    for k in [
        "yday_mean",
        "yday_max",
        "yday_present",
        "week_mean",
        "week_max",
        "week_present",
        "day_p50",
        "day_p90",
        "day_p99",
        "day_max",
        "hour_p50",
        "hour_p90",
        "hour_max",
        "week_p50",
        "week_p90",
        "week_p99",
        "ewma_mean",
        "ewma_sd",
        "day_zero_share",
        "day_sd",
        "tod_sin",
        "tod_cos",
        "gap_hours",
        "gap_flag",
        "history_days",
        "vcpus_known",
        "vcpus_log",
        "memcap_known",
        "memcap_log_gib",
        "lag1_autocorr",
    ] {
        n.push(k.to_string());
    }
    n
}

/// Number of features.
pub const N_FEATURES: usize = LAST_SLOTS + 2 * HOURS + 30;

/// The scale `s`: the mean of the last day's present values, floored so
/// it is never 0.
fn scale_of_values(day: &[f64]) -> f64 {
    if day.is_empty() {
        return 1.0;
    }
    let mean = day.iter().sum::<f64>() / day.len() as f64;
    let max = day.iter().copied().fold(0.0f64, f64::max);
    mean.max(1e-3 * max).max(1e-6)
}

/// Network inputs and targets are f32; features are computed in f64 and
/// narrowed here on purpose (they are O(1) after the `z` transform).
#[allow(clippy::cast_possible_truncation)]
pub(crate) fn narrow(x: f64) -> f32 {
    x as f32
}

/// `ln(1 + max(x, 0) / s)`.
pub fn to_z(x: f64, s: f64) -> f64 {
    (x.max(0.0) / s).ln_1p()
}

/// Inverse of [`to_z`].
pub fn from_z(z: f64, s: f64) -> f64 {
    (s * z.exp_m1()).max(0.0)
}

/// Compute the features of `h` into `out` (length [`N_FEATURES`]); returns
/// the scale `s`.
pub fn features(h: &History<'_>, out: &mut [f32]) -> f64 {
    debug_assert_eq!(out.len(), N_FEATURES);
    let vals = h.values;
    let day = h.last_present(SLOTS_PER_DAY);
    let s = scale_of_values(&day);
    let g = |x: f64| narrow(to_z(x, s));
    let mut o = 0usize;
    let mut put = |v: f32, o: &mut usize| {
        out[*o] = if v.is_finite() { v } else { 0.0 };
        *o += 1;
    };
    let n = vals.len();
    let first_present = vals.iter().copied().find(|x| !x.is_nan()).unwrap_or(0.0);
    let day_mean = if day.is_empty() {
        0.0
    } else {
        day.iter().sum::<f64>() / day.len() as f64
    };

    // Last 12 slots, forward-filled from older values.
    let mut lastv = [f64::NAN; LAST_SLOTS];
    {
        let mut fill = f64::NAN;
        // Walk from older to newer so gaps take the previous value.
        let start = n.saturating_sub(LAST_SLOTS + SLOTS_PER_HOUR);
        for (i, &x) in vals.iter().enumerate().skip(start) {
            if !x.is_nan() {
                fill = x;
            }
            let back = n - 1 - i;
            if back < LAST_SLOTS {
                lastv[back] = fill;
            }
        }
        if fill.is_nan() {
            fill = vals
                .iter()
                .rev()
                .copied()
                .find(|x| !x.is_nan())
                .unwrap_or(first_present);
        }
        for v in &mut lastv {
            if v.is_nan() {
                *v = fill;
            }
        }
    }
    for v in lastv {
        put(g(v), &mut o);
    }

    // Hourly mean and max over the last 24 hours of slots.
    let mut means = [f64::NAN; HOURS];
    let mut maxes = [f64::NAN; HOURS];
    for hb in 0..HOURS {
        let hi = n.saturating_sub(hb * SLOTS_PER_HOUR);
        let lo = n.saturating_sub((hb + 1) * SLOTS_PER_HOUR);
        let (mut sum, mut c, mut mx) = (0.0, 0usize, f64::NAN);
        for &x in &vals[lo..hi] {
            if !x.is_nan() {
                sum += x;
                c += 1;
                mx = if mx.is_nan() { x } else { mx.max(x) };
            }
        }
        if c > 0 {
            means[hb] = sum / c as f64;
            maxes[hb] = mx;
        }
    }
    for v in means {
        put(g(if v.is_nan() { day_mean } else { v }), &mut o);
    }
    for v in maxes {
        put(g(if v.is_nan() { day_mean } else { v }), &mut o);
    }

    // The target hour one day and one week earlier.
    for lag in [SLOTS_PER_DAY as i64, 7 * SLOTS_PER_DAY as i64] {
        let (mut sum, mut c, mut mx) = (0.0, 0usize, 0.0f64);
        for d in 1..=SLOTS_PER_HOUR as i64 {
            let slot = h.decision_slot + d - lag;
            let Ok(i) = usize::try_from(slot - h.first_slot) else {
                continue;
            };
            if let Some(&x) = vals.get(i).filter(|x| !x.is_nan()) {
                sum += x;
                c += 1;
                mx = mx.max(x);
            }
        }
        if c > 0 {
            put(g(sum / c as f64), &mut o);
            put(g(mx), &mut o);
            put(1.0, &mut o);
        } else {
            put(g(day_mean), &mut o);
            put(g(day_mean), &mut o);
            put(0.0, &mut o);
        }
    }

    // Distribution summaries (selection, not a full sort: same values).
    let mut day_buf = day.clone();
    for x in select_quantiles(&mut day_buf, &[0.5, 0.9, 0.99, 1.0]) {
        put(g(x), &mut o);
    }
    let mut hour = h.last_present(SLOTS_PER_HOUR);
    for x in select_quantiles(&mut hour, &[0.5, 0.9, 1.0]) {
        put(g(x), &mut o);
    }
    let mut week = h.last_present(7 * SLOTS_PER_DAY);
    for x in select_quantiles(&mut week, &[0.5, 0.9, 0.99]) {
        put(g(x), &mut o);
    }
    let tail = &vals[n.saturating_sub(SLOTS_PER_DAY)..];
    let (m, v) = ewma_mean_var(tail).unwrap_or((0.0, 0.0));
    put(g(m), &mut o);
    put(narrow((v.sqrt() / s).ln_1p()), &mut o);
    let zeros = day.iter().filter(|&&x| x <= 0.0).count() as f64;
    put(narrow(zeros / day.len().max(1) as f64), &mut o);
    let var = if day.is_empty() {
        0.0
    } else {
        day.iter().map(|x| (x - day_mean).powi(2)).sum::<f64>() / day.len() as f64
    };
    put(narrow((var.sqrt() / s).ln_1p()), &mut o);

    // Time of day of the decision (meaningful where ts is absolute).
    let tod = (h.decision_slot * STEP_S).rem_euclid(86_400) as f64 / 86_400.0;
    put(narrow((tod * std::f64::consts::TAU).sin()), &mut o);
    put(narrow((tod * std::f64::consts::TAU).cos()), &mut o);

    // Gap between the last visible slot and the decision.
    let gap_slots = (h.decision_slot - h.last_slot()).max(0) as f64;
    put(narrow((gap_slots / SLOTS_PER_HOUR as f64).ln_1p()), &mut o);
    put(if gap_slots >= 6.0 { 1.0 } else { 0.0 }, &mut o);
    let present = vals.iter().filter(|x| !x.is_nan()).count() as f64;
    put(narrow((present / SLOTS_PER_DAY as f64).ln_1p()), &mut o);

    // Static features.
    match h.statics.vcpus {
        Some(c) => {
            put(1.0, &mut o);
            put(narrow(c.max(0.0).ln_1p()), &mut o);
        }
        None => {
            put(0.0, &mut o);
            put(0.0, &mut o);
        }
    }
    match h.statics.mem_cap_kb {
        Some(c) => {
            put(1.0, &mut o);
            put(narrow((c.max(0.0) / 1_048_576.0).ln_1p()), &mut o);
        }
        None => {
            put(0.0, &mut o);
            put(0.0, &mut o);
        }
    }

    // Lag-1 autocorrelation over the last day of present values.
    let ac = if day.len() > 2 && var > 0.0 {
        let c: f64 = day
            .windows(2)
            .map(|w| (w[0] - day_mean) * (w[1] - day_mean))
            .sum::<f64>()
            / (day.len() - 1) as f64;
        (c / var).clamp(-1.0, 1.0)
    } else {
        0.0
    };
    put(narrow(ac), &mut o);
    debug_assert_eq!(o, N_FEATURES);
    s
}

/// Empirical quantiles (as [`empirical_quantile`] of the sorted values) by
/// selection; `ps` ascending. Empty input gives zeros. Reorders `v`.
fn select_quantiles(v: &mut [f64], ps: &[f64]) -> Vec<f64> {
    let n = v.len();
    if n == 0 {
        return vec![0.0; ps.len()];
    }
    let mut lo = 0usize;
    ps.iter()
        .map(|&p| {
            let k = ((p * n as f64) - 1e-9).ceil().clamp(1.0, n as f64);
            // k is an integer in [1, n], so the cast is exact.
            #[allow(clippy::cast_possible_truncation)]
            let k = k as usize - 1;
            // Earlier selections left everything below `lo` no larger.
            let k = k.max(lo);
            let (_, x, _) = v[lo..].select_nth_unstable_by(k - lo, f64::total_cmp);
            let x = *x;
            lo = k;
            x
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::forecast::empirical_quantile;
    use crate::trace::Statics;

    #[test]
    fn feature_names_match_count() {
        assert_eq!(feature_names().len(), N_FEATURES);
    }

    #[test]
    fn features_are_scale_free() {
        let v: Vec<f64> = (0..600).map(|i| 5.0 + (i % 17) as f64).collect();
        let w: Vec<f64> = v.iter().map(|x| x * 1000.0).collect();
        let mk = |values: &[f64]| {
            let h = History {
                values,
                first_slot: 0,
                decision_slot: 599,
                statics: Statics::default(),
            };
            let mut f = vec![0.0f32; N_FEATURES];
            let s = features(&h, &mut f);
            (f, s)
        };
        let (a, sa) = mk(&v);
        let (b, sb) = mk(&w);
        assert!((sb / sa - 1000.0).abs() < 1e-6);
        for (x, y) in a.iter().zip(&b) {
            assert!((x - y).abs() < 1e-4, "{x} vs {y}");
        }
    }

    #[test]
    fn select_quantiles_equal_sorted_empirical_quantiles() {
        let mut state = 12345u64;
        for n in [1usize, 2, 12, 288, 1000] {
            let v: Vec<f64> = (0..n)
                .map(|_| {
                    state = state
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    ((state >> 33) % 50) as f64
                })
                .collect();
            let mut sorted = v.clone();
            sorted.sort_by(f64::total_cmp);
            let ps = [0.5, 0.9, 0.99, 1.0];
            let mut buf = v.clone();
            let got = select_quantiles(&mut buf, &ps);
            for (p, g) in ps.iter().zip(got) {
                assert_eq!(g, empirical_quantile(&sorted, *p), "n {n} p {p}");
            }
        }
    }

    #[test]
    fn z_transform_round_trips() {
        for x in [0.0, 0.5, 3.0, 1e4] {
            assert!((from_z(to_z(x, 2.0), 2.0) - x).abs() < 1e-9 * x.max(1.0));
        }
    }
}
