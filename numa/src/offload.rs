//! Intra-host offload: pure decisions to move vCPU threads off hot PUs.
//!
//! Each [`Offloader::step`] takes one load sample (per-PU load, per-thread
//! load and the PU each thread runs on, optional per-PU forecasts) and
//! returns the moves to make. Loads are in percent of one PU; callers may
//! feed busy time or demand (run + run-queue wait), as long as thresholds
//! use the same unit.
//!
//! Hysteresis, so nothing oscillates:
//! - a PU is hot when its load (or its forecast) reaches `high_percent` for
//!   `sustain_samples` samples in a row (a forecast counts at once);
//! - a thread only moves to a PU whose load plus the thread's stays at or
//!   below `low_percent`, strictly below `high_percent`, so a move never
//!   makes its target hot;
//! - a moved thread stays put for `cooldown_samples` samples.
//!
//! Targets: the same NUMA node first (other cores before the source's SMT
//! siblings), then other nodes by distance, then the least loaded PU.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::topology::HostTopology;

/// Thresholds and damping.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct OffloadPolicy {
    /// A PU at or above this load is hot.
    pub high_percent: u32,
    /// A target must stay at or below this load after the move; must be
    /// below `high_percent`.
    pub low_percent: u32,
    /// Consecutive hot samples before acting on measured load.
    pub sustain_samples: u32,
    /// Samples a moved thread stays where it was put.
    pub cooldown_samples: u32,
    /// At most this many moves per step.
    pub max_moves_per_step: u32,
}

impl Default for OffloadPolicy {
    fn default() -> Self {
        Self {
            high_percent: 90,
            low_percent: 60,
            sustain_samples: 3,
            cooldown_samples: 10,
            max_moves_per_step: 4,
        }
    }
}

/// Load of one PU.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PuLoad {
    /// PU id.
    pub pu: u32,
    /// Measured load (percent of one PU), everything on it included.
    pub load_percent: u32,
    /// Forecast load for the coming interval, if any.
    pub forecast_percent: Option<u32>,
}

/// Load of one managed thread (a vCPU).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ThreadLoad {
    /// Kernel thread id.
    pub tid: u32,
    /// PU it runs on (is pinned to).
    pub pu: u32,
    /// Its load (percent of one PU).
    pub load_percent: u32,
    /// False for threads that must stay (latency-sensitive, exclusive cores).
    pub movable: bool,
}

/// One sample of the host.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LoadSample {
    /// Per-PU load; PUs not listed are not offload targets.
    pub pus: Vec<PuLoad>,
    /// Managed threads.
    pub threads: Vec<ThreadLoad>,
}

impl LoadSample {
    /// A sample whose PU loads are the sums of the managed threads on them
    /// (no background load, no forecast), over `pus`.
    #[must_use]
    pub fn from_threads(pus: &[u32], threads: Vec<ThreadLoad>) -> Self {
        let pus = pus
            .iter()
            .map(|&pu| PuLoad {
                pu,
                load_percent: threads
                    .iter()
                    .filter(|t| t.pu == pu)
                    .map(|t| t.load_percent)
                    .sum(),
                forecast_percent: None,
            })
            .collect();
        Self { pus, threads }
    }
}

/// Why a thread is moved.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum MoveReason {
    /// Measured load stayed at or above the threshold.
    Measured,
    /// The forecast crossed the threshold.
    Forecast,
}

/// Move a thread from one PU to another.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Move {
    /// Thread id.
    pub tid: u32,
    /// PU it leaves.
    pub from_pu: u32,
    /// PU it goes to.
    pub to_pu: u32,
    /// Why.
    pub reason: MoveReason,
}

/// Bad offload input.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum OffloadError {
    /// `low_percent` must be below `high_percent` or moves could oscillate.
    #[error("offload policy needs low_percent ({low}) < high_percent ({high}) for hysteresis")]
    NoHysteresis {
        /// high threshold.
        high: u32,
        /// low threshold.
        low: u32,
    },
    /// A sample names a PU the topology does not have.
    #[error("load sample names PU {pu}, which this host does not have")]
    UnknownPu {
        /// The PU.
        pu: u32,
    },
}

#[derive(Debug, Clone, Copy)]
struct PuPlace {
    node: u32,
    core: usize,
}

/// The offload state machine: hot streaks and cooldowns.
#[derive(Debug, Clone)]
pub struct Offloader {
    policy: OffloadPolicy,
    places: BTreeMap<u32, PuPlace>,
    distance: BTreeMap<(u32, u32), u64>,
    streak: BTreeMap<u32, u32>,
    moved_at: BTreeMap<u32, u64>,
    step: u64,
}

impl Offloader {
    /// An offloader for this host.
    ///
    /// # Errors
    /// [`OffloadError::NoHysteresis`] if `low_percent >= high_percent`.
    pub fn new(topology: &HostTopology, policy: OffloadPolicy) -> Result<Self, OffloadError> {
        if policy.low_percent >= policy.high_percent {
            return Err(OffloadError::NoHysteresis {
                high: policy.high_percent,
                low: policy.low_percent,
            });
        }
        let mut places = BTreeMap::new();
        for core in &topology.cores {
            for &pu in &core.pus {
                places.insert(
                    pu,
                    PuPlace {
                        node: core.node.unwrap_or(u32::MAX),
                        core: core.index,
                    },
                );
            }
        }
        let mut distance = BTreeMap::new();
        for a in &topology.nodes {
            for b in &topology.nodes {
                distance.insert(
                    (a.id, b.id),
                    topology.distance(a.id, b.id).unwrap_or(u64::MAX),
                );
            }
        }
        Ok(Self {
            policy,
            places,
            distance,
            streak: BTreeMap::new(),
            moved_at: BTreeMap::new(),
            step: 0,
        })
    }

    /// The policy in force.
    #[must_use]
    pub fn policy(&self) -> OffloadPolicy {
        self.policy
    }

    /// Take one sample, return the moves to make now.
    ///
    /// # Errors
    /// [`OffloadError::UnknownPu`] if the sample names a PU the host lacks;
    /// the state is unchanged then.
    pub fn step(&mut self, sample: &LoadSample) -> Result<Vec<Move>, OffloadError> {
        for pu in sample
            .pus
            .iter()
            .map(|p| p.pu)
            .chain(sample.threads.iter().map(|t| t.pu))
        {
            if !self.places.contains_key(&pu) {
                return Err(OffloadError::UnknownPu { pu });
            }
        }
        self.step += 1;
        let p = self.policy;

        // Measured load: what the caller saw, never less than our threads' sum.
        let mut measured: BTreeMap<u32, u32> = BTreeMap::new();
        for pl in &sample.pus {
            measured.insert(pl.pu, pl.load_percent);
        }
        let mut thread_sum: BTreeMap<u32, u32> = BTreeMap::new();
        for t in &sample.threads {
            *thread_sum.entry(t.pu).or_default() += t.load_percent;
        }
        for (pu, sum) in &thread_sum {
            let m = measured.entry(*pu).or_default();
            *m = (*m).max(*sum);
        }
        let forecast: BTreeMap<u32, u32> = sample
            .pus
            .iter()
            .filter_map(|pl| pl.forecast_percent.map(|f| (pl.pu, f)))
            .collect();
        // Effective load: the larger of measured and forecast.
        let mut load: BTreeMap<u32, u32> = measured
            .iter()
            .map(|(&pu, &m)| (pu, m.max(forecast.get(&pu).copied().unwrap_or(0))))
            .collect();

        // Hot streaks.
        let mut hot: Vec<(u32, u32, MoveReason)> = Vec::new();
        for (&pu, &m) in &measured {
            let s = self.streak.entry(pu).or_default();
            *s = if m >= p.high_percent { *s + 1 } else { 0 };
            let f = forecast.get(&pu).copied().unwrap_or(0);
            if *s >= p.sustain_samples.max(1) {
                hot.push((pu, m.max(f), MoveReason::Measured));
            } else if f >= p.high_percent {
                hot.push((pu, f, MoveReason::Forecast));
            }
        }
        self.streak.retain(|pu, _| measured.contains_key(pu));
        hot.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));

        let targets: Vec<u32> = sample.pus.iter().map(|pl| pl.pu).collect();
        let mut moves = Vec::new();
        for (src, _, reason) in hot {
            let mut threads: Vec<&ThreadLoad> = sample
                .threads
                .iter()
                .filter(|t| t.pu == src && t.movable && t.load_percent > 0)
                .filter(|t| {
                    self.moved_at
                        .get(&t.tid)
                        .is_none_or(|&at| self.step - at >= u64::from(p.cooldown_samples))
                })
                .collect();
            threads.sort_by(|a, b| b.load_percent.cmp(&a.load_percent).then(a.tid.cmp(&b.tid)));
            for t in threads {
                if moves.len() >= p.max_moves_per_step as usize {
                    break;
                }
                if load.get(&src).copied().unwrap_or(0) < p.high_percent {
                    break;
                }
                let Some(dst) = self.best_target(src, t.load_percent, &targets, &load) else {
                    continue;
                };
                if let Some(l) = load.get_mut(&src) {
                    *l = l.saturating_sub(t.load_percent);
                }
                *load.entry(dst).or_default() += t.load_percent;
                self.moved_at.insert(t.tid, self.step);
                moves.push(Move {
                    tid: t.tid,
                    from_pu: src,
                    to_pu: dst,
                    reason,
                });
            }
        }
        // Forget threads that are gone.
        self.moved_at
            .retain(|tid, _| sample.threads.iter().any(|t| t.tid == *tid));
        for m in &moves {
            tracing::debug!(tid = m.tid, from = m.from_pu, to = m.to_pu, reason = ?m.reason, "offload move");
        }
        Ok(moves)
    }

    fn best_target(
        &self,
        src: u32,
        thread_load: u32,
        targets: &[u32],
        load: &BTreeMap<u32, u32>,
    ) -> Option<u32> {
        let from = self.places.get(&src)?;
        targets
            .iter()
            .copied()
            .filter(|&pu| pu != src)
            .filter(|pu| {
                load.get(pu).copied().unwrap_or(0) + thread_load <= self.policy.low_percent
            })
            .filter_map(|pu| {
                let to = self.places.get(&pu)?;
                let dist = self
                    .distance
                    .get(&(from.node, to.node))
                    .copied()
                    .unwrap_or(u64::MAX);
                let sibling = u8::from(to.core == from.core);
                Some(((dist, sibling, load.get(&pu).copied().unwrap_or(0), pu), pu))
            })
            .min_by_key(|(key, _)| *key)
            .map(|(_, pu)| pu)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::topology::{Core, DistanceOrigin, Distances, NumaNode, TopologySource};

    /// Two nodes, two cores each, two PUs per core: PUs 0-3 on node 0.
    fn host() -> HostTopology {
        let cores: Vec<Core> = (0..4)
            .map(|i| Core {
                index: i,
                package: Some(0),
                node: Some(u32::try_from(i / 2).unwrap()),
                pus: vec![
                    u32::try_from(2 * i).unwrap(),
                    u32::try_from(2 * i + 1).unwrap(),
                ],
            })
            .collect();
        HostTopology {
            source: TopologySource::XmlText,
            packages: vec![],
            nodes: (0..2)
                .map(|n| NumaNode {
                    id: n,
                    package: Some(0),
                    memory_bytes: 1 << 30,
                    pus: (4 * n..4 * n + 4).collect(),
                    cores: vec![2 * n as usize, 2 * n as usize + 1],
                })
                .collect(),
            cores,
            caches: vec![],
            distances: Distances {
                nodes: vec![0, 1],
                values: vec![10, 20, 20, 10],
                origin: DistanceOrigin::Reported,
            },
            devices: vec![],
        }
    }

    fn t(tid: u32, pu: u32, load: u32) -> ThreadLoad {
        ThreadLoad {
            tid,
            pu,
            load_percent: load,
            movable: true,
        }
    }

    #[test]
    fn hot_pu_moves_to_other_core_of_same_node_before_sibling_or_other_node() {
        let mut o = Offloader::new(
            &host(),
            OffloadPolicy {
                sustain_samples: 1,
                ..OffloadPolicy::default()
            },
        )
        .unwrap();
        let s =
            LoadSample::from_threads(&[0, 1, 2, 3, 4, 5, 6, 7], vec![t(10, 0, 50), t(11, 0, 50)]);
        let moves = o.step(&s).unwrap();
        assert_eq!(
            moves,
            vec![Move {
                tid: 10,
                from_pu: 0,
                to_pu: 2,
                reason: MoveReason::Measured
            }]
        );
    }

    #[test]
    fn full_node_spills_to_other_node() {
        let mut o = Offloader::new(
            &host(),
            OffloadPolicy {
                sustain_samples: 1,
                ..OffloadPolicy::default()
            },
        )
        .unwrap();
        let s = LoadSample::from_threads(
            &[0, 1, 2, 3, 4, 5, 6, 7],
            vec![
                t(10, 0, 50),
                t(11, 0, 50),
                t(12, 1, 40),
                t(13, 2, 40),
                t(14, 3, 40),
            ],
        );
        let moves = o.step(&s).unwrap();
        assert_eq!(moves.len(), 1);
        assert_eq!(moves[0].to_pu, 4);
    }

    #[test]
    fn measured_load_must_persist_but_forecast_acts_at_once() {
        let mut o = Offloader::new(&host(), OffloadPolicy::default()).unwrap();
        let s = LoadSample::from_threads(&[0, 2], vec![t(10, 0, 50), t(11, 0, 50)]);
        assert!(o.step(&s).unwrap().is_empty());
        assert!(o.step(&s).unwrap().is_empty());
        assert_eq!(o.step(&s).unwrap().len(), 1);

        let mut o = Offloader::new(&host(), OffloadPolicy::default()).unwrap();
        let mut s = LoadSample::from_threads(&[0, 2], vec![t(10, 0, 30), t(11, 0, 30)]);
        s.pus[0].forecast_percent = Some(95);
        let moves = o.step(&s).unwrap();
        assert_eq!(moves.len(), 1);
        assert_eq!(moves[0].reason, MoveReason::Forecast);
    }

    #[test]
    fn policy_without_hysteresis_and_unknown_pu_are_errors() {
        let bad = OffloadPolicy {
            high_percent: 60,
            low_percent: 60,
            ..OffloadPolicy::default()
        };
        assert!(matches!(
            Offloader::new(&host(), bad),
            Err(OffloadError::NoHysteresis { .. })
        ));
        let mut o = Offloader::new(&host(), OffloadPolicy::default()).unwrap();
        let s = LoadSample::from_threads(&[0, 99], vec![]);
        assert_eq!(o.step(&s), Err(OffloadError::UnknownPu { pu: 99 }));
    }

    #[test]
    fn immovable_threads_stay() {
        let mut o = Offloader::new(
            &host(),
            OffloadPolicy {
                sustain_samples: 1,
                ..OffloadPolicy::default()
            },
        )
        .unwrap();
        let mut a = t(10, 0, 60);
        a.movable = false;
        let mut b = t(11, 0, 60);
        b.movable = false;
        let s = LoadSample::from_threads(&[0, 2], vec![a, b]);
        assert!(o.step(&s).unwrap().is_empty());
    }
}
