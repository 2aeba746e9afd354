//! Balloon benchmark on real KVM: how long from set-target until the VMM's
//! resident set changes, and inflate/deflate rates in pages per second, for
//! 256 MiB and 1 GiB, with the lab guest's own virtio-balloon driver.
//!
//! `cargo bench -p labvm --bench balloon` (add `-- ROUNDS` for more rounds;
//! default 3). Runs one 1.5 GiB lab VM in this process (nothing else runs
//! here, so /proc/self is the VMM's RSS); the guest first touches its whole
//! page pool so that ballooned pages are resident. Sizes alternate within
//! each round so that both see the host in the same state (PLATFORM.md:
//! the host hands freed memory back after about 2 s).
#![allow(
    clippy::print_stdout,
    clippy::unwrap_used,
    clippy::cast_possible_truncation
)]

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, mpsc};
use std::time::{Duration, Instant};

use labvm::{BalloonConfig, LabVm, LabVmConfig, RunObserver, Workload, process_rss_bytes};

const MIB: u64 = 1 << 20;
const RAM_MIB: u64 = 1536;

struct Observer {
    ready: mpsc::Sender<()>,
    stop: Arc<AtomicBool>,
}

impl RunObserver for Observer {
    fn ready(&mut self, _: Duration, _: &vmm_hooks::BootReport) {
        let _ = self.ready.send(());
    }
    fn should_stop(&mut self) -> bool {
        self.stop.load(Ordering::SeqCst)
    }
}

#[derive(Clone, Copy, Debug)]
struct Sample {
    /// set-target until RSS moved by 95 % of the size.
    to_rss: Duration,
    /// set-target until the guest reported the new size (`actual`).
    to_actual: Duration,
}

/// Sets the target and waits for the guest and for the RSS.
fn step(h: &balloon::BalloonHandle, target_mib: u64, rss_goal: impl Fn(u64) -> bool) -> Sample {
    let target_pages = (target_mib * MIB / 4096) as u32;
    let t0 = Instant::now();
    h.set_target_mib(target_mib).unwrap();
    let (mut to_rss, mut to_actual) = (None, None);
    while to_rss.is_none() || to_actual.is_none() {
        assert!(
            t0.elapsed() < Duration::from_secs(120),
            "balloon did not move"
        );
        if to_rss.is_none() && rss_goal(process_rss_bytes().unwrap()) {
            to_rss = Some(t0.elapsed());
        }
        if to_actual.is_none() && h.report().actual_pages == target_pages {
            to_actual = Some(t0.elapsed());
        }
        std::thread::sleep(Duration::from_micros(200));
    }
    Sample {
        to_rss: to_rss.unwrap(),
        to_actual: to_actual.unwrap(),
    }
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

type Results = Vec<(u64, Vec<Sample>, Vec<Sample>)>;

struct StopOnDrop(Arc<AtomicBool>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

/// One VM, `rounds` rounds of inflate/deflate for each size.
fn run(use_deflated: bool, rounds: usize) -> Results {
    let mut config = LabVmConfig::new(
        RAM_MIB,
        Workload::Balloon {
            touch_mib: RAM_MIB - 4,
            keep_mib: 64,
            report_free: false,
            ignore_target: false,
            use_deflated,
            grow_mib: 0,
        },
    );
    config.ready_deadline = Duration::from_secs(120);
    // A safety net: the measuring thread stops the VM long before this.
    config.run_for = Some(Duration::from_secs(900));
    config.balloon = Some(BalloonConfig {
        stats_interval: Duration::from_secs(1),
        grace: Duration::from_secs(60),
        ..BalloonConfig::default()
    });
    let mut vm = LabVm::create(config, Instant::now()).unwrap();
    let handle = vm.balloon().unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let (tx, rx) = mpsc::channel();
    let stop2 = Arc::clone(&stop);
    let bench = std::thread::spawn(move || {
        // Stops the VM however this thread ends (a failed step panics).
        let _stop = StopOnDrop(stop2);
        rx.recv().unwrap();
        let sizes = [256u64, 1024];
        let mut results: Results = sizes.iter().map(|&s| (s, Vec::new(), Vec::new())).collect();
        for _ in 0..rounds {
            for (size, inflates, deflates) in &mut results {
                let bytes = *size * MIB;
                let base = process_rss_bytes().unwrap();
                // A guest that only frees deflated pages leaves them
                // non-resident, so re-inflating them moves no RSS: its
                // inflations are timed to the guest's `actual` only.
                inflates.push(step(&handle, *size, |rss| {
                    !use_deflated || rss + bytes * 95 / 100 <= base
                }));
                let low = process_rss_bytes().unwrap();
                // A guest that only frees the pages does not fault them in.
                deflates.push(step(&handle, 0, |rss| {
                    !use_deflated || rss >= low + bytes * 95 / 100
                }));
                std::thread::sleep(Duration::from_millis(500));
            }
        }
        results
    });
    let mut obs = Observer { ready: tx, stop };
    let report = vm.run(&mut obs);
    let results = bench.join().unwrap();
    report.unwrap();
    results
}

fn main() {
    if !labvm::testing::kvm_or_skip("bench balloon") {
        return;
    }
    let rounds: usize = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(3);
    let used = run(true, rounds);
    let lazy = run(false, rounds);
    println!(
        "balloon benchmark: {RAM_MIB} MiB lab VM, guest driver polls every 1 ms, \
         4096 PFNs per buffer, 16 buffers per batch; median of {rounds} rounds"
    );
    println!(
        "| size | op | guest after deflate | set-target -> RSS change (ms) | set-target -> guest done (ms) | pages/s |"
    );
    println!("|---|---|---|---|---|---|");
    for (strategy, results) in [("writes every page", &used), ("only frees them", &lazy)] {
        for (size, inflates, deflates) in results {
            let pages = (*size * MIB / 4096) as f64;
            for (op, samples) in [("inflate", inflates), ("deflate", deflates)] {
                let rss = median(samples.iter().map(|s| s.to_rss).collect());
                let done = median(samples.iter().map(|s| s.to_actual).collect());
                let rss = if strategy == "only frees them" {
                    "n/a".to_string()
                } else {
                    format!("{:.1}", rss.as_secs_f64() * 1e3)
                };
                println!(
                    "| {size} MiB | {op} | {strategy} | {rss} | {:.1} | {:.0} |",
                    done.as_secs_f64() * 1e3,
                    pages / done.as_secs_f64()
                );
            }
        }
    }
    println!(
        "RSS columns: time until the VMM's RSS moved by 95 % of the size. A guest that only \
         frees deflated pages does not fault them in (no RSS change to time), and re-inflating \
         those non-resident pages moves no RSS either: its rows are timed to the guest's \
         `actual`. Deflate rates of the first strategy include the guest's first touch of every page."
    );
}
