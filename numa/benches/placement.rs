//! numa benchmark: planner cost on a 4-socket synthetic host, and the
//! measured effect of pinning on run time under CPU contention (a labvm lab
//! guest when labvm and /dev/kvm are there, and CPU-bound threads always).
//!
//! `cargo bench -p numa --bench placement`; env: `NUMA_BENCH_REPS` (runs per
//! strategy, default 5), `LABVM` (path to the labvm binary; default
//! `$CARGO_TARGET_DIR/{release,debug}/labvm`), `NUMA_BENCH_PAUSE_MS` (pause
//! before every labvm run, default 3000: freed memory is handed back to the
//! outer hypervisor after ~2 s, so every run starts from the same state).
#![allow(clippy::print_stdout)]

use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, mpsc};
use std::thread;
use std::time::{Duration, Instant};

use numa::{
    HostTopology, Placement, PlacementPolicy, Planner, VmDemand, current_tid, pin_thread,
    thread_affinity, threads_named,
};

const HOST: &str = "pack:4 numa:2(memory=512GiB) l3:1(size=32MiB) core:32 pu:2";

/// Deterministic demands: 1-4 vCPUs, 1-3 GiB, one in 50 latency-sensitive.
fn demands(n: usize) -> Vec<VmDemand> {
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    (0..n)
        .map(|i| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            VmDemand {
                vm: format!("vm{i}"),
                vcpus: u32::try_from(x % 4).unwrap_or(0) + 1,
                memory_bytes: ((x >> 8) % 3 + 1) << 30,
                gpu: None,
                latency_sensitive: (x >> 16).is_multiple_of(50),
            }
        })
        .collect()
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

/// Place the demands one after another with an incremental ledger, five
/// times; (median seconds, placements, rejections by missing resource).
fn sequence(
    planner: &Planner,
    ds: &[VmDemand],
) -> (
    f64,
    Vec<Placement>,
    std::collections::BTreeMap<String, usize>,
) {
    let mut times = Vec::new();
    let mut placements: Vec<Placement> = Vec::new();
    let mut reasons = std::collections::BTreeMap::<String, usize>::new();
    for _ in 0..5 {
        let start = Instant::now();
        let mut ledger = planner.empty_ledger();
        placements.clear();
        reasons.clear();
        for d in ds {
            match planner.plan(&ledger, d) {
                Ok(p) => {
                    planner.record(&mut ledger, &p).expect("record");
                    placements.push(p);
                }
                Err(e) => {
                    let kind = match e {
                        numa::PlacementError::HostShort { resource, .. }
                        | numa::PlacementError::NoSingleNode { resource, .. } => {
                            resource.to_string()
                        }
                        other => other.to_string(),
                    };
                    *reasons.entry(kind).or_default() += 1;
                }
            }
        }
        times.push(start.elapsed().as_secs_f64());
    }
    (median(&mut times), placements, reasons)
}

fn planner_cost() {
    let topo = HostTopology::from_synthetic(HOST).expect("synthetic host");
    let open = PlacementPolicy {
        cpu_overcommit_percent: 800,
        ..PlacementPolicy::default()
    };
    let reserving = PlacementPolicy {
        reserved_cores_per_node: 8,
        ..open
    };
    let ds = demands(1000);
    println!(
        "## Planner cost\n\nhost: `{HOST}` ({} nodes, {} cores, {} PUs), policy: {}% vCPU overcommit, {}% memory; 1,000 demands: 1-4 vCPUs, 1-3 GiB, one in 50 latency-sensitive\n",
        topo.nodes.len(),
        topo.cores.len(),
        topo.pus().len(),
        open.cpu_overcommit_percent,
        open.memory_limit_percent
    );
    println!("| what | time | plans per second |");
    println!("| --- | --- | --- |");
    let mut placements = Vec::new();
    for (label, policy) in [
        ("no reserved cores", open),
        (
            "8 cores per node reserved for latency-sensitive VMs",
            reserving,
        ),
    ] {
        let planner = Planner::new(&topo, policy);
        let (t, placed, reasons) = sequence(&planner, &ds);
        let spread = placed.iter().filter(|p| !p.is_single_node()).count();
        let rejected: usize = reasons.values().sum();
        let why: Vec<String> = reasons
            .iter()
            .map(|(k, v)| format!("{v} short of {k}"))
            .collect();
        println!(
            "| place 1,000 VMs in sequence, {label}: {} placed, {spread} spread, {rejected} rejected{} | {:.2} ms total | {:.0} |",
            placed.len(),
            if why.is_empty() {
                String::new()
            } else {
                format!(" ({})", why.join(", "))
            },
            t * 1e3,
            1000.0 / t
        );
        placements = placed;
    }
    let planner = Planner::new(&topo, reserving);

    // One more VM against the full ledger.
    let ledger = planner.ledger(&placements).expect("ledger");
    let probe = VmDemand {
        vm: "probe".into(),
        vcpus: 4,
        memory_bytes: 2 << 30,
        gpu: None,
        latency_sensitive: false,
    };
    let iters = 2000;
    let mut times = Vec::new();
    for _ in 0..5 {
        let start = Instant::now();
        for _ in 0..iters {
            std::hint::black_box(planner.plan(&ledger, &probe).ok());
        }
        times.push(start.elapsed().as_secs_f64() / f64::from(iters));
    }
    let b = median(&mut times);

    // Stateless: rebuild the ledger from the placements, then plan.
    let iters = 100;
    let mut times = Vec::new();
    for _ in 0..5 {
        let start = Instant::now();
        for _ in 0..iters {
            std::hint::black_box(planner.place(&placements, &probe).ok());
        }
        times.push(start.elapsed().as_secs_f64() / f64::from(iters));
    }
    let c = median(&mut times);
    println!(
        "| plan 1 VM against a ledger of {} placements | {:.1} µs | {:.0} |",
        placements.len(),
        b * 1e6,
        1.0 / b
    );
    println!(
        "| rebuild the ledger from {} placements + plan (`Planner::place`) | {:.1} µs | {:.0} |",
        placements.len(),
        c * 1e6,
        1.0 / c
    );
    println!("\nmedian of 5 runs each\n");
}

/// Spinning threads that load the CPU until dropped.
struct Hogs {
    stop: Arc<AtomicBool>,
    tids: Vec<u32>,
    handles: Vec<thread::JoinHandle<()>>,
}

impl Hogs {
    fn start(n: usize) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let (tx, rx) = mpsc::channel();
        let handles = (0..n)
            .map(|i| {
                let stop = stop.clone();
                let tx = tx.clone();
                thread::Builder::new()
                    .name(format!("hog{i}"))
                    .spawn(move || {
                        let _ = tx.send(current_tid());
                        let mut x = 1u64;
                        while !stop.load(Ordering::Relaxed) {
                            for j in 0..10_000u64 {
                                x = x.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(j);
                            }
                            std::hint::black_box(x);
                        }
                    })
                    .expect("spawn hog")
            })
            .collect();
        let tids = (0..n).map(|_| rx.recv().expect("hog tid")).collect();
        Self {
            stop,
            tids,
            handles,
        }
    }

    fn pin(&self, cpus: &[u32]) {
        for &t in &self.tids {
            pin_thread(t, cpus).expect("pin hog");
        }
    }
}

impl Drop for Hogs {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for h in self.handles.drain(..) {
            let _ = h.join();
        }
    }
}

#[derive(Debug, Clone, Copy)]
enum Strategy {
    Idle,
    Unpinned,
    PinnedApart,
    PinnedTogether,
}

impl Strategy {
    const ALL: [Self; 4] = [
        Self::Idle,
        Self::Unpinned,
        Self::PinnedApart,
        Self::PinnedTogether,
    ];

    fn describe(self) -> &'static str {
        match self {
            Self::Idle => "no contention, unpinned (reference)",
            Self::Unpinned => "contention, nothing pinned (scheduler decides)",
            Self::PinnedApart => "contention confined to other PUs, guest pinned to its own PU",
            Self::PinnedTogether => "guest pinned onto the contended PU (bad placement)",
        }
    }

    /// (guest PUs, hog PUs) or None for "no pinning".
    fn layout(self, pus: &[u32]) -> (Option<Vec<u32>>, Option<Vec<u32>>) {
        let first = pus.first().copied().unwrap_or(0);
        let last = pus.last().copied().unwrap_or(0);
        let rest: Vec<u32> = pus.iter().copied().filter(|&p| p != last).collect();
        match self {
            Self::Idle | Self::Unpinned => (None, None),
            Self::PinnedApart => (Some(vec![last]), Some(rest)),
            Self::PinnedTogether => (Some(vec![first]), Some(vec![first])),
        }
    }
}

/// A CPU-bound stand-in for a vCPU: a fixed amount of arithmetic over a
/// 1 MiB working set.
fn vcpu_work(pin: Option<&[u32]>) -> f64 {
    let (tx, rx) = mpsc::channel();
    let pin = pin.map(<[u32]>::to_vec);
    let h = thread::Builder::new()
        .name("labvm-vcpu0".into())
        .spawn(move || {
            if let Some(p) = &pin {
                pin_thread(current_tid(), p).expect("pin vcpu");
            }
            let mut buf = vec![0u64; 1 << 17];
            let start = Instant::now();
            let mut x = 7u64;
            for round in 0..2000u64 {
                for (i, v) in buf.iter_mut().enumerate() {
                    x = x
                        .wrapping_mul(6_364_136_223_846_793_005)
                        .wrapping_add(round ^ i as u64);
                    *v = v.wrapping_add(x);
                }
            }
            std::hint::black_box(&buf);
            let _ = tx.send(start.elapsed().as_secs_f64());
        })
        .expect("spawn vcpu");
    let t = rx.recv().expect("vcpu time");
    let _ = h.join();
    t
}

fn labvm_binary() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("LABVM") {
        return Some(PathBuf::from(p));
    }
    let target = std::env::var_os("CARGO_TARGET_DIR").map_or_else(
        || PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../target")),
        PathBuf::from,
    );
    ["release", "debug"]
        .iter()
        .map(|p| target.join(p).join("labvm"))
        .find(|p| p.is_file())
}

/// Run one lab guest; returns its time to ready in seconds.
fn labvm_run(bin: &PathBuf, pin: Option<&[u32]>, all: &[u32]) -> Result<f64, String> {
    // A child inherits the spawning thread's affinity: pin ourselves for the
    // spawn so every labvm thread starts on the guest's PUs, then pin the
    // vCPU threads by tid as the companion would.
    let me = current_tid();
    if let Some(p) = pin {
        pin_thread(me, p).map_err(|e| e.to_string())?;
    }
    let child = Command::new(bin)
        .args(["--mem", "768", "--workload", "seq:512"])
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn();
    pin_thread(me, all).map_err(|e| e.to_string())?;
    let child = child.map_err(|e| format!("cannot start {}: {e}", bin.display()))?;
    if let Some(p) = pin {
        for (tid, _) in threads_named(child.id(), "labvm-vcpu").unwrap_or_default() {
            let _ = pin_thread(tid, p);
            debug_assert_eq!(thread_affinity(tid).ok().as_deref(), Some(p));
        }
    }
    let out = child.wait_with_output().map_err(|e| e.to_string())?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    stdout
        .lines()
        .find_map(|l| l.strip_prefix("ready after "))
        .and_then(|l| l.trim_end_matches(" ms").parse::<f64>().ok())
        .map(|ms| ms / 1e3)
        .ok_or_else(|| {
            format!(
                "labvm exited {:?}: {}{}",
                out.status.code(),
                stdout,
                String::from_utf8_lossy(&out.stderr)
            )
        })
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next().map(str::to_owned))
        .unwrap_or_else(|| "?".into())
}

fn pinning_effect() {
    let topo = HostTopology::live().expect("live topology");
    let pus = topo.pus();
    println!("## Pinning under CPU contention\n");
    if pus.len() < 2 {
        println!("SKIP pinning: needs 2 PUs, this host has {}\n", pus.len());
        return;
    }
    let reps: usize = std::env::var("NUMA_BENCH_REPS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(5);
    let pause = Duration::from_millis(
        std::env::var("NUMA_BENCH_PAUSE_MS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(3000),
    );
    let me = current_tid();
    pin_thread(me, &pus).expect("unpin bench thread");
    let labvm = labvm_binary().filter(|_| std::path::Path::new("/dev/kvm").exists());
    println!(
        "host: {} PUs on {} node(s); contention: {} spinning threads; {reps} runs per strategy, strategies interleaved\n",
        pus.len(),
        topo.nodes.len(),
        pus.len()
    );

    let load_before = loadavg();
    let mut threads: Vec<Vec<f64>> = vec![Vec::new(); Strategy::ALL.len()];
    let mut guests: Vec<Vec<f64>> = vec![Vec::new(); Strategy::ALL.len()];
    let mut labvm_error = None;
    for _ in 0..reps {
        for (i, s) in Strategy::ALL.iter().enumerate() {
            let (guest_pin, hog_pin) = s.layout(&pus);
            let hogs = match s {
                Strategy::Idle => None,
                _ => {
                    let h = Hogs::start(pus.len());
                    h.pin(hog_pin.as_deref().unwrap_or(&pus));
                    Some(h)
                }
            };
            threads[i].push(vcpu_work(guest_pin.as_deref()));
            if let (Some(bin), None) = (&labvm, &labvm_error) {
                drop(hogs);
                thread::sleep(pause);
                let hogs = match s {
                    Strategy::Idle => None,
                    _ => {
                        let h = Hogs::start(pus.len());
                        h.pin(hog_pin.as_deref().unwrap_or(&pus));
                        Some(h)
                    }
                };
                match labvm_run(bin, guest_pin.as_deref(), &pus) {
                    Ok(t) => guests[i].push(t),
                    Err(e) => labvm_error = Some(e),
                }
                drop(hogs);
            }
        }
    }

    println!(
        "host load average (1 min, all processes, ours included) before / after the runs: {load_before} / {}\n",
        loadavg()
    );
    let table = |title: &str, rows: &mut [Vec<f64>]| {
        println!("{title}\n");
        println!("| strategy | median | min | max | vs unpinned |");
        println!("| --- | --- | --- | --- | --- |");
        let unpinned = median(&mut rows[1].clone());
        for (i, s) in Strategy::ALL.iter().enumerate() {
            let v = &mut rows[i];
            let m = median(v);
            let min = v.iter().copied().fold(f64::INFINITY, f64::min);
            let max = v.iter().copied().fold(0.0, f64::max);
            println!(
                "| {} | {:.0} ms | {:.0} ms | {:.0} ms | {:.2}x |",
                s.describe(),
                m * 1e3,
                min * 1e3,
                max * 1e3,
                m / unpinned
            );
        }
        println!();
    };
    table(
        "CPU-bound vCPU stand-in thread (fixed arithmetic over 1 MiB), time to finish:",
        &mut threads,
    );
    match (&labvm, &labvm_error) {
        (Some(bin), None) => table(
            &format!(
                "labvm lab guest (`{} --mem 768 --workload seq:512`, 1 vCPU), time to ready:",
                bin.display()
            ),
            &mut guests,
        ),
        (Some(_), Some(e)) => println!("SKIP labvm rows: {e}\n"),
        (None, _) => println!(
            "SKIP labvm rows: no labvm binary (cargo build --release -p labvm, or set LABVM) or no /dev/kvm\n"
        ),
    }
}

fn main() {
    // `cargo bench` passes --bench; `cargo test --benches` passes nothing
    // useful: run only the cheap part then.
    let full = std::env::args().any(|a| a == "--bench");
    planner_cost();
    if full {
        pinning_effect();
    }
}
