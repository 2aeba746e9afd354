//! The probabilistic working-set model of a bootstrap: per memory chunk, the
//! probability that a bootstrap of this key writes it and its expected
//! first-touch time, learned from past boots' profiles. Pure; the store
//! persists it and the forecasting models may take the interface over.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use vmm_hooks::{BootProfile, GuestRange, PrefaultMode, PrefaultPlan};

/// A model that learns from bootstrap profiles and predicts the next one.
pub trait WorkingSetModel {
    /// Learns from one boot's profile.
    fn observe(&mut self, profile: &BootProfile);
    /// Per chunk with any evidence: (chunk index, touch probability,
    /// expected first-touch ms), in chunk order.
    fn predict(&self) -> Vec<ChunkPrediction>;
}

/// One chunk's prediction.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ChunkPrediction {
    /// Chunk index (guest-physical address / chunk size).
    pub chunk: u64,
    /// Probability that the next bootstrap writes it.
    pub probability: f64,
    /// Expected first-touch time, ms from the start request.
    pub first_touch_ms: f64,
}

/// How predictions become a plan.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct PlanPolicy {
    /// Chunks at or above this probability are pre-faulted.
    pub threshold: f64,
    /// How the VMM pre-faults.
    pub mode: PrefaultMode,
    /// Ask for transparent huge pages.
    pub hugepages: bool,
    /// Profiles needed before any plan is made.
    pub min_boots: u32,
}

impl Default for PlanPolicy {
    fn default() -> Self {
        PlanPolicy {
            threshold: 0.5,
            mode: PrefaultMode::Concurrent,
            hugepages: false,
            min_boots: 1,
        }
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
struct ChunkStats {
    /// Weight of the boots that wrote the chunk.
    weight: f64,
    /// Weighted sum of first-touch ms over those boots.
    first_touch_sum: f64,
}

/// After this many profiles, older ones fade: each new profile scales the
/// evidence so far by (MEMORY - 1) / MEMORY, so the model follows a
/// bootstrap that changes over time.
pub const MEMORY_BOOTS: u32 = 20;

/// Touch frequencies per chunk over the profiles observed (probability =
/// weight of the boots that touched / weight of all boots; every boot
/// weighs the same until [`MEMORY_BOOTS`], then older ones fade).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct FrequencyModel {
    chunk_size: u64,
    ram_bytes: u64,
    boots: u32,
    weight: f64,
    chunks: BTreeMap<u64, ChunkStats>,
}

impl FrequencyModel {
    /// An empty model.
    pub fn new() -> Self {
        FrequencyModel::default()
    }

    /// Profiles observed.
    pub fn boots(&self) -> u32 {
        self.boots
    }

    /// Chunk size of the observed profiles (0 before the first).
    pub fn chunk_size(&self) -> u64 {
        self.chunk_size
    }

    /// The plan for the next boot, or `None` without enough history.
    pub fn plan(&self, policy: &PlanPolicy) -> Option<PrefaultPlan> {
        if self.boots < policy.min_boots.max(1) || self.chunk_size == 0 {
            return None;
        }
        plan_from(&self.predict(), self.chunk_size, self.ram_bytes, policy)
    }
}

impl WorkingSetModel for FrequencyModel {
    fn observe(&mut self, profile: &BootProfile) {
        if profile.chunk_size == 0 {
            return;
        }
        if profile.chunk_size != self.chunk_size || profile.ram_bytes != self.ram_bytes {
            // A new granularity or VM size: the old counts do not apply.
            *self = FrequencyModel {
                chunk_size: profile.chunk_size,
                ram_bytes: profile.ram_bytes,
                ..FrequencyModel::default()
            };
        }
        if self.boots >= MEMORY_BOOTS {
            let keep = f64::from(MEMORY_BOOTS - 1) / f64::from(MEMORY_BOOTS);
            self.weight *= keep;
            for s in self.chunks.values_mut() {
                s.weight *= keep;
                s.first_touch_sum *= keep;
            }
            // Chunks whose evidence has all but faded are forgotten.
            self.chunks.retain(|_, s| s.weight > 1e-3);
        }
        self.boots = self.boots.saturating_add(1);
        self.weight += 1.0;
        let max_chunk = profile.ram_bytes.div_ceil(profile.chunk_size);
        for (chunk, at) in profile.touches() {
            if chunk >= max_chunk {
                continue;
            }
            let s = self.chunks.entry(chunk).or_default();
            s.weight += 1.0;
            s.first_touch_sum += at;
        }
    }

    fn predict(&self) -> Vec<ChunkPrediction> {
        let n = self.weight.max(f64::MIN_POSITIVE);
        self.chunks
            .iter()
            .map(|(&chunk, s)| ChunkPrediction {
                chunk,
                probability: (s.weight / n).min(1.0),
                first_touch_ms: s.first_touch_sum / s.weight.max(f64::MIN_POSITIVE),
            })
            .collect()
    }
}

/// Ranges for the chunks at or above the threshold, in expected first-touch
/// order (address-adjacent chunks that follow each other in that order are
/// merged), plus the chunks below it, most likely first, as extension.
pub fn plan_from(
    predictions: &[ChunkPrediction],
    chunk_size: u64,
    ram_bytes: u64,
    policy: &PlanPolicy,
) -> Option<PrefaultPlan> {
    let mut hot: Vec<&ChunkPrediction> = predictions
        .iter()
        .filter(|p| p.probability >= policy.threshold)
        .collect();
    if hot.is_empty() {
        return None;
    }
    hot.sort_by(|a, b| {
        a.first_touch_ms
            .total_cmp(&b.first_touch_ms)
            .then(a.chunk.cmp(&b.chunk))
    });
    let mut cold: Vec<&ChunkPrediction> = predictions
        .iter()
        .filter(|p| p.probability < policy.threshold && p.probability > 0.0)
        .collect();
    cold.sort_by(|a, b| {
        b.probability
            .total_cmp(&a.probability)
            .then(a.first_touch_ms.total_cmp(&b.first_touch_ms))
    });
    let mut plan = PrefaultPlan::new(policy.mode, ranges(&hot, chunk_size, ram_bytes));
    plan.extend = ranges(&cold, chunk_size, ram_bytes);
    plan.hugepages = policy.hugepages;
    Some(plan)
}

fn ranges(chunks: &[&ChunkPrediction], chunk_size: u64, ram_bytes: u64) -> Vec<GuestRange> {
    let mut out: Vec<GuestRange> = Vec::new();
    for p in chunks {
        let start = p.chunk * chunk_size;
        if start >= ram_bytes {
            continue;
        }
        let len = chunk_size.min(ram_bytes - start);
        match out.last_mut() {
            Some(r) if r.start + r.len == start => r.len += len,
            _ => out.push(GuestRange { start, len }),
        }
    }
    out
}

/// Recall and precision of `predicted` chunks against the `actual` ones.
pub fn recall_precision(predicted: &[u64], actual: &[u64]) -> (f64, f64) {
    let p: std::collections::HashSet<u64> = predicted.iter().copied().collect();
    let a: std::collections::HashSet<u64> = actual.iter().copied().collect();
    let hit = p.intersection(&a).count() as f64;
    let recall = if a.is_empty() {
        1.0
    } else {
        hit / a.len() as f64
    };
    let precision = if p.is_empty() {
        1.0
    } else {
        hit / p.len() as f64
    };
    (recall, precision)
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmm_hooks::TouchWindow;

    fn profile(windows: &[(f64, &[[u64; 2]])]) -> BootProfile {
        let mut p = BootProfile::new(4096, 1 << 20);
        p.windows = windows
            .iter()
            .map(|(at, runs)| TouchWindow {
                at_ms: *at,
                runs: runs.to_vec(),
            })
            .collect();
        p
    }

    #[test]
    fn no_history_means_no_plan() {
        assert!(FrequencyModel::new().plan(&PlanPolicy::default()).is_none());
    }

    #[test]
    fn frequent_chunks_are_planned_in_first_touch_order_and_rare_ones_extend() {
        let mut m = FrequencyModel::new();
        // Chunks 10-11 early, 3 late, in all boots; 50 in one of three.
        m.observe(&profile(&[(1.0, &[[10, 2]]), (5.0, &[[3, 1]])]));
        m.observe(&profile(&[(2.0, &[[10, 2]]), (6.0, &[[3, 1], [50, 1]])]));
        m.observe(&profile(&[(1.0, &[[10, 2]]), (4.0, &[[3, 1]])]));
        assert_eq!(m.boots(), 3);
        let plan = m.plan(&PlanPolicy::default()).unwrap();
        assert_eq!(plan.mode, PrefaultMode::Concurrent);
        assert_eq!(
            plan.ranges,
            vec![
                GuestRange {
                    start: 10 * 4096,
                    len: 2 * 4096
                },
                GuestRange {
                    start: 3 * 4096,
                    len: 4096
                },
            ]
        );
        assert_eq!(
            plan.extend,
            vec![GuestRange {
                start: 50 * 4096,
                len: 4096
            }]
        );
        let pred = m.predict();
        let c3 = pred.iter().find(|p| p.chunk == 3).unwrap();
        assert!((c3.first_touch_ms - 5.0).abs() < 1e-9);
        let c50 = pred.iter().find(|p| p.chunk == 50).unwrap();
        assert!((c50.probability - 1.0 / 3.0).abs() < 1e-9);
    }

    #[test]
    fn a_new_chunk_size_restarts_the_model_and_chunks_past_ram_are_ignored() {
        let mut m = FrequencyModel::new();
        m.observe(&profile(&[(1.0, &[[1, 1]])]));
        let mut other = BootProfile::new(8192, 1 << 20);
        other.windows = vec![TouchWindow {
            at_ms: 1.0,
            runs: vec![[2, 1], [1000, 5]],
        }];
        m.observe(&other);
        assert_eq!((m.boots(), m.chunk_size()), (1, 8192));
        assert_eq!(m.predict().len(), 1);
    }

    #[test]
    fn old_profiles_fade_after_the_memory_window() {
        let mut m = FrequencyModel::new();
        for _ in 0..MEMORY_BOOTS {
            m.observe(&profile(&[(1.0, &[[7, 1]])]));
        }
        // The bootstrap changes: chunk 8 instead of 7 from now on.
        for _ in 0..MEMORY_BOOTS {
            m.observe(&profile(&[(1.0, &[[8, 1]])]));
        }
        let p = |c| {
            m.predict()
                .iter()
                .find(|p| p.chunk == c)
                .map_or(0.0, |p| p.probability)
        };
        assert!(p(8) > 0.6, "{}", p(8));
        assert!(p(7) < 0.4, "{}", p(7));
        let plan = m.plan(&PlanPolicy::default()).unwrap();
        assert_eq!(
            plan.ranges,
            vec![GuestRange {
                start: 8 * 4096,
                len: 4096
            }]
        );
    }

    #[test]
    fn recall_and_precision_count_set_overlap() {
        assert_eq!(
            recall_precision(&[1, 2, 3, 4], &[2, 3, 4, 5, 6]),
            (0.6, 0.75)
        );
        assert_eq!(recall_precision(&[], &[]), (1.0, 1.0));
    }
}
