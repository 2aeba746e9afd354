//! Offload decisions on a synthetic host (replays and properties) and on
//! the live machine with real threads.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, mpsc};
use std::thread;
use std::time::Instant;

use numa::{
    HostTopology, LoadMeasure, LoadSample, Move, OffloadPolicy, Offloader, PuLoad, ThreadLoad,
    ThreadSampler, apply_moves, current_tid, thread_affinity, threads_named,
};
use proptest::prelude::*;

const FIXTURE: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/fixtures/two-socket-four-node.xml"
);

/// A simulated host: threads with loads, background load per PU.
struct Sim {
    pus: Vec<u32>,
    background: BTreeMap<u32, u32>,
    threads: Vec<ThreadLoad>,
}

impl Sim {
    fn sample(&self) -> LoadSample {
        let mut s = LoadSample::from_threads(&self.pus, self.threads.clone());
        for p in &mut s.pus {
            p.load_percent += self.background.get(&p.pu).copied().unwrap_or(0);
        }
        s
    }
    fn apply(&mut self, moves: &[Move]) {
        for m in moves {
            let t = self
                .threads
                .iter_mut()
                .find(|t| t.tid == m.tid)
                .expect("moved thread exists");
            assert_eq!(t.pu, m.from_pu);
            t.pu = m.to_pu;
        }
    }
}

fn fixture() -> HostTopology {
    HostTopology::from_xml_file(FIXTURE).expect("fixture loads")
}

#[test]
fn replay_hot_pu_spills_same_node_first_then_nearest_node_then_settles() {
    let topo = fixture();
    let policy = OffloadPolicy {
        sustain_samples: 2,
        cooldown_samples: 5,
        ..OffloadPolicy::default()
    };
    let mut o = Offloader::new(&topo, policy).unwrap();
    // Node 0 holds PUs 0-7. PU 0 runs four 40% vCPUs; node 0's other PUs
    // are busy (50%) except PU 4 (20%): one thread fits there (60 <= 60),
    // the next must go to node 1 (distance 12), not node 2 or 3 (20).
    let mut background: BTreeMap<u32, u32> = (1..8).map(|pu| (pu, 50)).collect();
    background.insert(4, 20);
    let threads = (0..4)
        .map(|i| ThreadLoad {
            tid: 100 + i,
            pu: 0,
            load_percent: 40,
            movable: true,
        })
        .collect();
    let mut sim = Sim {
        pus: topo.pus(),
        background,
        threads,
    };
    let mut log = Vec::new();
    for step in 0..30 {
        let moves = o.step(&sim.sample()).unwrap();
        sim.apply(&moves);
        log.extend(moves.into_iter().map(|m| (step, m)));
    }
    let targets: Vec<(u32, u32)> = log.iter().map(|(s, m)| (*s, m.to_pu)).collect();
    // Sustained for two samples: acts at step 1; PU0 160 -> 120 -> 80 < 90.
    assert_eq!(targets, vec![(1, 4), (1, 8)]);
    let node_of = |pu: u32| topo.core_of_pu(pu).unwrap().node.unwrap();
    assert_eq!(node_of(4), 0);
    assert_eq!(node_of(8), 1);
}

#[test]
fn replay_flickering_load_around_threshold_never_moves() {
    let topo = fixture();
    let mut o = Offloader::new(&topo, OffloadPolicy::default()).unwrap();
    for step in 0..200u32 {
        // 95, 85, 95, 85, ... : never three hot samples in a row.
        let load = if step % 2 == 0 { 95 } else { 85 };
        let s = LoadSample {
            pus: topo
                .pus()
                .iter()
                .map(|&pu| PuLoad {
                    pu,
                    load_percent: if pu == 0 { load } else { 0 },
                    forecast_percent: None,
                })
                .collect(),
            threads: vec![
                ThreadLoad {
                    tid: 1,
                    pu: 0,
                    load_percent: load / 2,
                    movable: true,
                },
                ThreadLoad {
                    tid: 2,
                    pu: 0,
                    load_percent: load / 2,
                    movable: true,
                },
            ],
        };
        assert!(o.step(&s).unwrap().is_empty(), "moved at step {step}");
    }
}

fn sim_strategy() -> impl Strategy<Value = (Vec<(u32, u32)>, Vec<u32>)> {
    // (pu, load) per thread on the 32-PU fixture; background per PU.
    (
        prop::collection::vec((0u32..32, 5u32..80), 1..40),
        prop::collection::vec(0u32..70, 32),
    )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, failure_persistence: None, ..ProptestConfig::default() })]

    /// Constant loads: every thread moves at most once, moves stop, and no
    /// move ever makes its target hot.
    #[test]
    fn constant_load_each_thread_moves_at_most_once_and_settles(
        (threads, background) in sim_strategy(),
        sustain in 1u32..4,
        cooldown in 0u32..6,
    ) {
        let topo = fixture();
        let policy = OffloadPolicy { sustain_samples: sustain, cooldown_samples: cooldown, ..OffloadPolicy::default() };
        let mut o = Offloader::new(&topo, policy).unwrap();
        let mut sim = Sim {
            pus: topo.pus(),
            background: background.iter().enumerate().map(|(i, &b)| (u32::try_from(i).unwrap(), b)).collect(),
            threads: threads.iter().enumerate().map(|(i, &(pu, l))| ThreadLoad { tid: u32::try_from(i).unwrap(), pu, load_percent: l, movable: true }).collect(),
        };
        let mut moved: BTreeMap<u32, u32> = BTreeMap::new();
        let mut last_move_step = None;
        for step in 0..60 {
            let moves = o.step(&sim.sample()).unwrap();
            sim.apply(&moves);
            for m in &moves {
                *moved.entry(m.tid).or_default() += 1;
                last_move_step = Some(step);
            }
            let after = sim.sample();
            for m in &moves {
                let l = after.pus.iter().find(|p| p.pu == m.to_pu).unwrap().load_percent;
                prop_assert!(l <= policy.low_percent, "target {} at {}", m.to_pu, l);
            }
        }
        prop_assert!(moved.values().all(|&n| n == 1), "{:?}", moved);
        prop_assert!(last_move_step.is_none_or(|s| s < 10), "still moving at step {:?}", last_move_step);
    }

    /// Noisy loads: a thread never moves again within its cooldown, so it
    /// can never bounce between two PUs faster than that.
    #[test]
    fn noisy_load_respects_cooldown(
        (threads, background) in sim_strategy(),
        noise in prop::collection::vec(prop::collection::vec(0u32..60, 40), 40),
        cooldown in 1u32..8,
    ) {
        let topo = fixture();
        let policy = OffloadPolicy { sustain_samples: 1, cooldown_samples: cooldown, ..OffloadPolicy::default() };
        let mut o = Offloader::new(&topo, policy).unwrap();
        let mut sim = Sim {
            pus: topo.pus(),
            background: background.iter().enumerate().map(|(i, &b)| (u32::try_from(i).unwrap(), b)).collect(),
            threads: threads.iter().enumerate().map(|(i, &(pu, l))| ThreadLoad { tid: u32::try_from(i).unwrap(), pu, load_percent: l, movable: true }).collect(),
        };
        let base: Vec<u32> = sim.threads.iter().map(|t| t.load_percent).collect();
        let mut last: BTreeMap<u32, usize> = BTreeMap::new();
        for (step, row) in noise.iter().enumerate() {
            for (i, t) in sim.threads.iter_mut().enumerate() {
                t.load_percent = base[i] / 2 + row[i % row.len()];
            }
            let moves = o.step(&sim.sample()).unwrap();
            sim.apply(&moves);
            for m in &moves {
                if let Some(&prev) = last.get(&m.tid) {
                    prop_assert!(step - prev >= cooldown as usize, "tid {} moved at {} and {}", m.tid, prev, step);
                }
                last.insert(m.tid, step);
            }
        }
    }
}

/// Spinning threads named like labvm's vCPUs; each reports a tick per chunk
/// of work so the test can wait for work done, not for time.
struct Spinners {
    stop: Arc<AtomicBool>,
    ticks: mpsc::Receiver<usize>,
    handles: Vec<thread::JoinHandle<()>>,
    tids: Vec<u32>,
}

fn spinners(n: usize) -> Spinners {
    let stop = Arc::new(AtomicBool::new(false));
    let (tick_tx, ticks) = mpsc::channel();
    let (tid_tx, tid_rx) = mpsc::channel();
    let handles = (0..n)
        .map(|i| {
            let stop = stop.clone();
            let tick_tx = tick_tx.clone();
            let tid_tx = tid_tx.clone();
            thread::Builder::new()
                .name(format!("labvm-vcpu{i}"))
                .spawn(move || {
                    tid_tx.send(current_tid()).expect("tid");
                    let mut x = 0u64;
                    while !stop.load(Ordering::Relaxed) {
                        for j in 0..2_000_000u64 {
                            x = x.wrapping_mul(6364136223846793005).wrapping_add(j);
                        }
                        std::hint::black_box(x);
                        let _ = tick_tx.send(i);
                    }
                })
                .expect("spawn")
        })
        .collect();
    let mut tids: Vec<u32> = (0..n).map(|_| tid_rx.recv().expect("tid")).collect();
    tids.sort_unstable();
    Spinners {
        stop,
        ticks,
        handles,
        tids,
    }
}

impl Spinners {
    fn wait_ticks(&self, each: usize) {
        let mut seen = vec![0usize; self.handles.len()];
        while seen.iter().any(|&s| s < each) {
            let i = self.ticks.recv().expect("tick");
            seen[i] += 1;
        }
    }
    fn stop(self) {
        self.stop.store(true, Ordering::Relaxed);
        for h in self.handles {
            h.join().expect("join");
        }
    }
}

#[test]
fn hw_numa_offload_moves_a_real_vcpu_thread_off_a_hot_pu() {
    let topo = HostTopology::live().unwrap();
    let pus = topo.pus();
    if pus.len() < 2 {
        println!(
            "SKIP hw_numa_offload_moves_a_real_vcpu_thread_off_a_hot_pu: needs 2 PUs, host has {}",
            pus.len()
        );
        return;
    }
    let s = spinners(2);
    let found: Vec<u32> = threads_named(std::process::id(), "labvm-vcpu")
        .unwrap()
        .into_iter()
        .map(|(t, _)| t)
        .collect();
    assert_eq!(found, s.tids);
    let (hot, cool) = (pus[0], pus[1]);
    for &tid in &s.tids {
        numa::pin_thread(tid, &[hot]).unwrap();
    }
    // Demand = run + run-queue wait: two always-runnable threads on one PU
    // show ~200% there whatever else the machine runs.
    let policy = OffloadPolicy {
        high_percent: 130,
        low_percent: 120,
        sustain_samples: 1,
        cooldown_samples: 10,
        max_moves_per_step: 4,
    };
    let mut o = Offloader::new(&topo, policy).unwrap();
    let mut sampler = ThreadSampler::new(std::process::id(), LoadMeasure::Demand);
    sampler.sample(&s.tids, Instant::now()).unwrap();
    s.wait_ticks(3);
    let loads = sampler.sample(&s.tids, Instant::now()).unwrap();
    let sample = LoadSample::from_threads(&pus, loads.clone());
    let moves = o.step(&sample).unwrap();
    println!("loads {loads:?} -> moves {moves:?}");
    assert_eq!(moves.len(), 1, "{loads:?}");
    assert_eq!((moves[0].from_pu, moves[0].to_pu), (hot, cool));
    apply_moves(&moves).unwrap();
    assert_eq!(thread_affinity(moves[0].tid).unwrap(), vec![cool]);

    // After the move the thread runs on the cool PU, and nothing moves back.
    s.wait_ticks(3);
    let loads = sampler.sample(&s.tids, Instant::now()).unwrap();
    let moved = loads.iter().find(|t| t.tid == moves[0].tid).unwrap();
    assert_eq!(moved.pu, cool);
    assert_eq!(
        numa::thread_cpu(std::process::id(), moved.tid)
            .unwrap()
            .last_cpu,
        cool
    );
    let again = o
        .step(&LoadSample::from_threads(&pus, loads.clone()))
        .unwrap();
    assert!(again.is_empty(), "{loads:?} -> {again:?}");
    s.stop();
}
