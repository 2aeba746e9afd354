//! Benchmarks that compare strategies side by side in one run and print a
//! table: `prescient bench bootstrap` (time to ready under each pre-fault
//! strategy, real labvm guests on KVM) and `prescient bench store` (serving
//! boot plans from a store with many boots), `prescient bench offload` (the
//! forecasting model's batch kernels on the CPU and the GPU, in `offload.rs`).

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use vmm_hooks::{
    BootPlan, BootProfile, BootReport, GuestRange, PrefaultMode, PrefaultPlan, ProfileRequest,
    TouchWindow,
};

use crate::store::{ProfileKey, ProfileStore, StorePolicy};

mod offload;
mod retrain;
use crate::working_set::{FrequencyModel, PlanPolicy, WorkingSetModel};
pub use offload::{
    AGREE_STEPS, AGREEMENT, OffloadBench, OffloadResult, OffloadRow, offload_table,
    write_offload_json,
};
pub use retrain::{RetrainRow, fill_samples, retrain_bench, retrain_table};

/// What can go wrong running a benchmark.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BenchError {
    /// labvm could not be found or run.
    #[error("cannot run labvm at {path}: {reason}")]
    Labvm {
        /// Where it was looked for.
        path: PathBuf,
        /// What happened.
        reason: String,
    },
    /// A run failed.
    #[error("{workload} / {strategy}: labvm failed: {stderr}")]
    Run {
        /// The workload.
        workload: String,
        /// The strategy.
        strategy: String,
        /// What labvm said.
        stderr: String,
    },
    /// Files could not be written or read.
    #[error("{0}")]
    Io(String),
    /// The store failed.
    #[error("store")]
    Store(#[from] crate::store::StoreError),
}

/// A bootstrap workload of the benchmark.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct BenchWorkload {
    /// Short name.
    pub name: String,
    /// Guest RAM, MiB.
    pub mem_mib: u64,
    /// labvm's `--workload` argument.
    pub spec: String,
}

/// How the bootstrap benchmark runs.
#[derive(Clone, Debug)]
pub struct BootstrapBench {
    /// The labvm binary.
    pub labvm: PathBuf,
    /// Repetitions of every strategy.
    pub reps: u32,
    /// Pause before each run, so every strategy meets memory in the same
    /// state (this host hands freed memory back after about 2 s).
    pub pause: Duration,
    /// Profile (and plan) granularity, bytes.
    pub chunk: u64,
    /// Workloads.
    pub workloads: Vec<BenchWorkload>,
    /// Where JSON and the plot go.
    pub out: PathBuf,
}

/// The strategies compared.
const STRATEGIES: [&str; 8] = [
    "lazy",
    "lazy+dirty-log",
    "predicted-before",
    "predicted-concurrent",
    "predicted-concurrent-thp",
    "full-prealloc",
    "oracle-before",
    "prewarmed",
];

/// One measured run.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RunSample {
    /// Strategy.
    pub strategy: String,
    /// Repetition.
    pub rep: u32,
    /// Start request to ready, ms.
    pub time_to_ready_ms: f64,
    /// Time spent populating, ms.
    pub prefault_ms: f64,
    /// Guest RAM resident at ready, MiB.
    pub guest_resident_mib: f64,
    /// labvm process RSS at ready, MiB.
    pub rss_mib: f64,
    /// Bytes populated beyond the plan.
    pub extended_mib: f64,
}

/// Per-strategy summary of one workload.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct StrategyRow {
    /// Strategy.
    pub strategy: String,
    /// Median, min, max time to ready, ms.
    pub ttr_ms: [f64; 3],
    /// Median populate time, ms.
    pub prefault_ms: f64,
    /// Median guest-resident MiB at ready.
    pub guest_resident_mib: f64,
    /// Median process RSS MiB at ready.
    pub rss_mib: f64,
    /// Median time to ready relative to lazy.
    pub vs_lazy: f64,
    /// Median time to ready relative to the oracle.
    pub vs_oracle: f64,
}

/// One workload's results.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct WorkloadResult {
    /// The workload.
    pub workload: BenchWorkload,
    /// MiB the bootstrap really wrote (the oracle's set, median).
    pub touched_mib: f64,
    /// Recall and precision of the predicted set against each run's real one (mean).
    pub recall: f64,
    /// See `recall`.
    pub precision: f64,
    /// Rows, in STRATEGIES order.
    pub rows: Vec<StrategyRow>,
    /// Every run.
    pub samples: Vec<RunSample>,
}

impl BootstrapBench {
    /// The default workloads of the issue: 512 MiB sequential of 1 GiB,
    /// 256 MiB random of 2 GiB (3% varying per boot), and the recorded
    /// start-up of a real program, replayed as touch order alone and with
    /// its recorded compute.
    pub fn default_workloads(trace: &Path) -> Vec<BenchWorkload> {
        let t = trace.display();
        vec![
            BenchWorkload {
                name: "seq-512M-of-1G".into(),
                mem_mib: 1024,
                spec: "seq:512".into(),
            },
            BenchWorkload {
                name: "rand-256M-of-2G".into(),
                mem_mib: 2048,
                spec: "rand:256:7:3".into(),
            },
            BenchWorkload {
                name: "trace-sympy-order".into(),
                mem_mib: 256,
                spec: format!("trace:{t}:0"),
            },
            BenchWorkload {
                name: "trace-sympy-compute".into(),
                mem_mib: 256,
                spec: format!("trace:{t}:100"),
            },
        ]
    }

    /// Runs everything; prints progress to stderr; returns the results.
    pub fn run(&self) -> Result<Vec<WorkloadResult>, BenchError> {
        if !self.labvm.exists() {
            return Err(BenchError::Labvm {
                path: self.labvm.clone(),
                reason: "not found; build it with `cargo build --release`".into(),
            });
        }
        std::fs::create_dir_all(&self.out)
            .map_err(|e| BenchError::Io(format!("{}: {e}", self.out.display())))?;
        let mut results = Vec::new();
        for w in &self.workloads {
            results.push(self.run_workload(w)?);
        }
        Ok(results)
    }

    fn labvm_run(
        &self,
        w: &BenchWorkload,
        strategy: &str,
        nonce: u64,
        plan: &BootPlan,
        prewarm: bool,
    ) -> Result<BootReport, BenchError> {
        std::thread::sleep(self.pause);
        let dir = tempfile::tempdir().map_err(|e| BenchError::Io(e.to_string()))?;
        let plan_file = dir.path().join("plan.json");
        let report_file = dir.path().join("report.json");
        std::fs::write(
            &plan_file,
            serde_json::to_vec(plan).map_err(|e| BenchError::Io(e.to_string()))?,
        )
        .map_err(|e| BenchError::Io(e.to_string()))?;
        let mut cmd = Command::new(&self.labvm);
        cmd.args([
            "--mem",
            &w.mem_mib.to_string(),
            "--workload",
            &w.spec,
            "--nonce",
            &nonce.to_string(),
            "--deadline",
            "300",
        ])
        .arg("--plan-file")
        .arg(&plan_file)
        .arg("--report-json")
        .arg(&report_file)
        .env("RUST_LOG", "error");
        if prewarm {
            cmd.arg("--prewarm");
        }
        let out = cmd.output().map_err(|e| BenchError::Labvm {
            path: self.labvm.clone(),
            reason: e.to_string(),
        })?;
        let fail = |stderr: String| BenchError::Run {
            workload: w.name.clone(),
            strategy: strategy.into(),
            stderr,
        };
        if !out.status.success() {
            return Err(fail(String::from_utf8_lossy(&out.stderr).into_owned()));
        }
        let json: serde_json::Value = serde_json::from_slice(
            &std::fs::read(&report_file).map_err(|e| fail(format!("no report: {e}")))?,
        )
        .map_err(|e| fail(format!("bad report: {e}")))?;
        serde_json::from_value(json["boot"].clone())
            .map_err(|e| fail(format!("no boot report: {e}")))
    }

    fn run_workload(&self, w: &BenchWorkload) -> Result<WorkloadResult, BenchError> {
        let profile = |chunk| {
            BootPlan::made_by("bench").with_profile(ProfileRequest {
                chunk_size: chunk,
                interval_ms: 10,
            })
        };
        // Learn: three profiled boots with different per-boot variation.
        let mut model = FrequencyModel::new();
        for n in 1..=3u64 {
            eprintln!("bench: {}: learning from profiled boot {n} of 3", w.name);
            let r = self.labvm_run(w, "learn", n, &profile(self.chunk), false)?;
            if let Some(p) = &r.profile {
                model.observe(p);
            }
        }
        let policy = |mode| PlanPolicy {
            mode,
            ..PlanPolicy::default()
        };
        let predicted = |mode| {
            model
                .plan(&policy(mode))
                .unwrap_or_else(|| PrefaultPlan::new(mode, Vec::new()))
        };
        let plan_of = |p: PrefaultPlan| BootPlan::made_by("bench").with_prefault(p);
        let predicted_set = plan_pages(&predicted(PrefaultMode::Before).ranges);

        let mut samples = Vec::new();
        let (mut recall, mut precision, mut touched) = (Vec::new(), Vec::new(), Vec::new());
        for rep in 0..self.reps {
            let nonce = 1000 + u64::from(rep);
            // The oracle needs this run's exact set: a lazy boot with the
            // same nonce, dirty-logged at 4 KiB (also the logging-cost sample).
            eprintln!(
                "bench: {}: rep {} of {}: lazy+dirty-log",
                w.name,
                rep + 1,
                self.reps
            );
            let logged = self.labvm_run(w, "lazy+dirty-log", nonce, &profile(4096), false)?;
            let exact = logged.profile.clone().unwrap_or_default();
            let actual = profile_pages(&exact);
            let (r, p) = crate::working_set::recall_precision(&predicted_set, &actual);
            recall.push(r);
            precision.push(p);
            touched.push(actual.len() as f64 * 4096.0 / MIB);
            samples.push(sample("lazy+dirty-log", rep, &logged));
            let oracle = oracle_plan(&exact);
            // The other strategies, in an order that rotates with the rep.
            let others = [
                ("lazy", BootPlan::made_by("bench"), false),
                (
                    "predicted-before",
                    plan_of(predicted(PrefaultMode::Before)),
                    false,
                ),
                (
                    "predicted-concurrent",
                    plan_of(predicted(PrefaultMode::Concurrent)),
                    false,
                ),
                (
                    "predicted-concurrent-thp",
                    plan_of(thp(predicted(PrefaultMode::Concurrent))),
                    false,
                ),
                (
                    "full-prealloc",
                    plan_of(PrefaultPlan::new(PrefaultMode::Full, Vec::new())),
                    false,
                ),
                ("oracle-before", plan_of(oracle), false),
                ("prewarmed", plan_of(predicted(PrefaultMode::Before)), true),
            ];
            let n = others.len();
            for k in 0..n {
                let (name, plan, prewarm) = &others[(k + rep as usize) % n];
                eprintln!(
                    "bench: {}: rep {} of {}: {name}",
                    w.name,
                    rep + 1,
                    self.reps
                );
                let r = self.labvm_run(w, name, nonce, plan, *prewarm)?;
                samples.push(sample(name, rep, &r));
            }
        }
        let rows = summarise(&samples);
        Ok(WorkloadResult {
            workload: w.clone(),
            touched_mib: median(&touched),
            recall: mean(&recall),
            precision: mean(&precision),
            rows,
            samples,
        })
    }
}

const MIB: f64 = 1024.0 * 1024.0;

fn sample(strategy: &str, rep: u32, r: &BootReport) -> RunSample {
    let pf = r.prefault.as_ref();
    RunSample {
        strategy: strategy.into(),
        rep,
        time_to_ready_ms: r.time_to_ready_ms,
        prefault_ms: pf.map_or(0.0, |p| p.ms),
        guest_resident_mib: r.guest_resident_kib as f64 / 1024.0,
        rss_mib: r.rss_kib as f64 / 1024.0,
        extended_mib: pf.map_or(0.0, |p| p.extended_bytes as f64 / MIB),
    }
}

fn plan_pages(ranges: &[GuestRange]) -> Vec<u64> {
    ranges
        .iter()
        .flat_map(|r| (r.start / 4096)..((r.start + r.len) / 4096))
        .collect()
}

fn profile_pages(p: &BootProfile) -> Vec<u64> {
    let per = (p.chunk_size / 4096).max(1);
    p.touches()
        .flat_map(|(c, _)| (c * per)..((c + 1) * per))
        .collect()
}

/// The same plan with transparent huge pages asked for.
fn thp(mut p: PrefaultPlan) -> PrefaultPlan {
    p.hugepages = true;
    p
}

/// Pre-fault exactly what the run wrote, in its first-touch order, before boot.
fn oracle_plan(p: &BootProfile) -> PrefaultPlan {
    let mut ranges: Vec<GuestRange> = Vec::new();
    for (c, _) in p.touches() {
        let start = c * p.chunk_size;
        match ranges.last_mut() {
            Some(r) if r.start + r.len == start => r.len += p.chunk_size,
            _ => ranges.push(GuestRange {
                start,
                len: p.chunk_size,
            }),
        }
    }
    PrefaultPlan::new(PrefaultMode::Before, ranges)
}

fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    match s.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => s[n / 2],
        n => (s[n / 2 - 1] + s[n / 2]) / 2.0,
    }
}

fn mean(v: &[f64]) -> f64 {
    if v.is_empty() {
        f64::NAN
    } else {
        v.iter().sum::<f64>() / v.len() as f64
    }
}

fn summarise(samples: &[RunSample]) -> Vec<StrategyRow> {
    let of = |name: &str, f: &dyn Fn(&RunSample) -> f64| -> Vec<f64> {
        samples
            .iter()
            .filter(|s| s.strategy == name)
            .map(f)
            .collect()
    };
    let ttr = |name: &str| of(name, &|s| s.time_to_ready_ms);
    let lazy = median(&ttr("lazy"));
    let oracle = median(&ttr("oracle-before"));
    STRATEGIES
        .iter()
        .map(|&name| {
            let t = ttr(name);
            let m = median(&t);
            StrategyRow {
                strategy: name.into(),
                ttr_ms: [
                    m,
                    t.iter().copied().fold(f64::INFINITY, f64::min),
                    t.iter().copied().fold(0.0, f64::max),
                ],
                prefault_ms: median(&of(name, &|s| s.prefault_ms)),
                guest_resident_mib: median(&of(name, &|s| s.guest_resident_mib)),
                rss_mib: median(&of(name, &|s| s.rss_mib)),
                vs_lazy: m / lazy,
                vs_oracle: m / oracle,
            }
        })
        .collect()
}

/// The results as text tables.
pub fn bootstrap_table(results: &[WorkloadResult], reps: u32, chunk: u64) -> String {
    let mut s = String::new();
    for r in results {
        let _ = writeln!(
            s,
            "\n{} ({} MiB RAM, `{}`): touched {:.1} MiB; predicted set recall {:.3}, precision {:.3} ({} KiB chunks, model of 3 profiled boots); {} reps",
            r.workload.name,
            r.workload.mem_mib,
            r.workload.spec,
            r.touched_mib,
            r.recall,
            r.precision,
            chunk / 1024,
            reps
        );
        let _ = writeln!(
            s,
            "| strategy | time to ready ms (median) | min | max | pre-fault ms | guest resident MiB | resident / touched | process RSS MiB | vs lazy | vs oracle |"
        );
        let _ = writeln!(
            s,
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
        );
        for row in &r.rows {
            let _ = writeln!(
                s,
                "| {} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} | {:.2} | {:.1} | {:.2} | {:.2} |",
                row.strategy,
                row.ttr_ms[0],
                row.ttr_ms[1],
                row.ttr_ms[2],
                row.prefault_ms,
                row.guest_resident_mib,
                row.guest_resident_mib / r.touched_mib,
                row.rss_mib,
                row.vs_lazy,
                row.vs_oracle
            );
        }
    }
    s
}

/// A grouped bar chart of median time to ready (SVG).
pub fn bootstrap_svg(results: &[WorkloadResult]) -> String {
    let colours = [
        "#777", "#aaa", "#4a90d9", "#1f5fa8", "#d9822b", "#3a9a5b", "#9b59b6",
    ];
    let (w, h, top, left, bottom) = (980.0, 420.0, 40.0, 70.0, 90.0);
    let groups = results.len().max(1) as f64;
    let gw = (w - left - 20.0) / groups;
    let bw = gw * 0.8 / STRATEGIES.len() as f64;
    let max = results
        .iter()
        .flat_map(|r| r.rows.iter().map(|x| x.ttr_ms[0]))
        .filter(|v| v.is_finite())
        .fold(1.0, f64::max);
    let y = |v: f64| top + (h - top - bottom) * (1.0 - v / max);
    let mut s = format!(
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="11">"#
    );
    let _ = write!(
        s,
        r#"<text x="{left}" y="20" font-size="14">Median time to ready by pre-fault strategy (ms, lower is better)</text>"#
    );
    let _ = write!(
        s,
        r#"<line x1="{left}" y1="{}" x2="{}" y2="{}" stroke="black"/>"#,
        y(0.0),
        w - 20.0,
        y(0.0)
    );
    for i in 0..=4 {
        let v = max * f64::from(i) / 4.0;
        let _ = write!(
            s,
            r#"<text x="{}" y="{}" text-anchor="end">{v:.0}</text><line x1="{left}" y1="{}" x2="{}" y2="{}" stroke="gainsboro"/>"#,
            left - 5.0,
            y(v) + 4.0,
            y(v),
            w - 20.0,
            y(v)
        );
    }
    for (g, r) in results.iter().enumerate() {
        let gx = left + gw * g as f64 + gw * 0.1;
        for (k, row) in r.rows.iter().enumerate() {
            let v = if row.ttr_ms[0].is_finite() {
                row.ttr_ms[0]
            } else {
                0.0
            };
            let x = gx + bw * k as f64;
            let _ = write!(
                s,
                r#"<rect x="{x:.1}" y="{:.1}" width="{:.1}" height="{:.1}" fill="{}"><title>{}: {v:.1} ms</title></rect>"#,
                y(v),
                bw * 0.9,
                y(0.0) - y(v),
                colours[k % colours.len()],
                row.strategy
            );
        }
        let _ = write!(
            s,
            r#"<text x="{:.1}" y="{}" text-anchor="middle">{}</text>"#,
            gx + gw * 0.4,
            y(0.0) + 15.0,
            r.workload.name
        );
    }
    for (k, name) in STRATEGIES.iter().enumerate() {
        let x = left + (k as f64) * 112.0;
        let _ = write!(
            s,
            r#"<rect x="{x}" y="{}" width="10" height="10" fill="{}"/><text x="{}" y="{}">{name}</text>"#,
            h - 30.0,
            colours[k % colours.len()],
            x + 14.0,
            h - 21.0
        );
    }
    s.push_str("</svg>\n");
    s
}

/// Writes JSON and SVG next to each other.
pub fn write_bootstrap_outputs(
    out: &Path,
    results: &[WorkloadResult],
) -> Result<(PathBuf, PathBuf), BenchError> {
    let json = out.join("bootstrap.json");
    let svg = out.join("bootstrap.svg");
    std::fs::write(
        &json,
        serde_json::to_vec_pretty(results).map_err(|e| BenchError::Io(e.to_string()))?,
    )
    .map_err(|e| BenchError::Io(format!("{}: {e}", json.display())))?;
    std::fs::write(&svg, bootstrap_svg(results))
        .map_err(|e| BenchError::Io(format!("{}: {e}", svg.display())))?;
    Ok((json, svg))
}

/// Plan-serving latency from a store holding `boots` boots over `keys` keys.
#[derive(Clone, Debug, Serialize)]
pub struct StoreBenchRow {
    /// What was served.
    pub case: String,
    /// Boots stored.
    pub boots: u64,
    /// Ranges in the plan served.
    pub plan_ranges: usize,
    /// Median, p99 and max serving time, ms.
    pub ms: [f64; 3],
}

/// `prescient bench store`: fills a fresh store in `dir` and times serving
/// boot plans, as the daemon does for each before-boot event.
pub fn store_bench(
    dir: &Path,
    boots: u64,
    keys: u64,
    lookups: u32,
) -> Result<Vec<StoreBenchRow>, BenchError> {
    let path = dir.join("bench-store.db");
    let _ = std::fs::remove_file(&path);
    let mut store = ProfileStore::open(&path, StorePolicy::default())?;
    let key = |k: u64| ProfileKey {
        image: format!("image-{k}"),
        package: format!("package-{}", k % 7),
    };
    let t = Instant::now();
    for i in 0..boots {
        let k = i % keys.max(1);
        let summary = store.summary(&key(k))?;
        let mut report = BootReport::new(100.0 + (i % 13) as f64);
        if store.should_profile(&summary) {
            // A 2 GiB guest whose bootstrap writes ~300 MiB in 2 MiB chunks.
            let mut p = BootProfile::new(2 << 20, 2 << 30);
            p.windows = (0..15u64)
                .map(|w| TouchWindow {
                    at_ms: 10.0 * w as f64,
                    runs: vec![[w * 60 + (i % 3), 10]],
                })
                .collect();
            report.profile = Some(p);
        }
        store.record_boot(&key(k), "vm", i64::try_from(i).unwrap_or(0), &report)?;
    }
    eprintln!(
        "bench: stored {boots} boots over {keys} keys in {:.1} s",
        t.elapsed().as_secs_f64()
    );
    // A key with a sparse 4 KiB-chunk plan (65,536 single pages) too.
    let sparse = ProfileKey {
        image: "sparse".into(),
        package: "4k".into(),
    };
    for n in 0..3u64 {
        let mut p = BootProfile::new(4096, 2 << 30);
        p.windows = vec![TouchWindow {
            at_ms: 1.0,
            runs: (0..65_536u64).map(|j| [j * 7 + (n % 2), 1]).collect(),
        }];
        let mut report = BootReport::new(1.0);
        report.profile = Some(p);
        store.record_boot(&sparse, "vm", 0, &report)?;
    }
    let mut rows = Vec::new();
    let total = store.boot_rows()?;
    for (case, k) in [
        ("dense key (2 MiB chunks)", key(1)),
        ("sparse key (4 KiB chunks, 65,536 ranges)", sparse),
    ] {
        let mut times = Vec::new();
        let mut ranges = 0;
        for _ in 0..lookups {
            let t = Instant::now();
            let plan = store.boot_plan(&k)?;
            times.push(t.elapsed().as_secs_f64() * 1e3);
            ranges = plan.prefault.map_or(0, |p| p.ranges.len());
        }
        times.sort_by(f64::total_cmp);
        let p99 = times[(times.len() * 99 / 100).min(times.len() - 1)];
        rows.push(StoreBenchRow {
            case: case.into(),
            boots: total,
            plan_ranges: ranges,
            ms: [
                median(&times),
                p99,
                times.last().copied().unwrap_or(f64::NAN),
            ],
        });
    }
    Ok(rows)
}

/// The store benchmark as a table.
pub fn store_table(rows: &[StoreBenchRow]) -> String {
    let mut s = String::from(
        "| case | boots stored | plan ranges | serve median ms | p99 ms | max ms |\n| --- | ---: | ---: | ---: | ---: | ---: |\n",
    );
    for r in rows {
        let _ = writeln!(
            s,
            "| {} | {} | {} | {:.3} | {:.3} | {:.3} |",
            r.case, r.boots, r.plan_ranges, r.ms[0], r.ms[1], r.ms[2]
        );
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_and_oracle_plan_behave() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
        let mut p = BootProfile::new(4096, 1 << 20);
        p.windows = vec![
            TouchWindow {
                at_ms: 1.0,
                runs: vec![[5, 2]],
            },
            TouchWindow {
                at_ms: 2.0,
                runs: vec![[7, 1], [1, 1]],
            },
        ];
        let o = oracle_plan(&p);
        assert_eq!(
            o.ranges,
            vec![
                GuestRange {
                    start: 5 * 4096,
                    len: 3 * 4096
                },
                GuestRange {
                    start: 4096,
                    len: 4096
                }
            ]
        );
        assert_eq!(profile_pages(&p), vec![5, 6, 7, 1]);
    }

    #[test]
    fn retrain_bench_fills_a_store_and_times_two_runs() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = crate::ForecastConfig {
            retrain_epochs: 1,
            retrain_hidden: 8,
            min_holdout_cases: 1,
            ..crate::ForecastConfig::default()
        };
        let rows = retrain_bench(dir.path(), 4, 30, &cfg).unwrap();
        assert_eq!(rows.len(), 3);
        for r in &rows {
            assert_eq!(r.outcome.samples, 4 * 30 * 12);
            assert!(r.outcome.holdout_cases > 0, "{r:?}");
            assert!(r.outcome.best_baseline.is_some(), "{r:?}");
            assert!(r.outcome.wall_s > 0.0 && r.outcome.cpu_s > 0.0, "{r:?}");
        }
        // The first run had no model to score; the last fine-tuned the
        // untrained network it was given.
        assert_eq!(rows[0].outcome.model_loss, None);
        assert!(rows[2].outcome.model_loss.is_some(), "{:?}", rows[2]);
        assert!(retrain_table(&rows).contains("| no model yet |"));
    }

    #[test]
    fn load_bench_loses_no_event_at_a_small_rate() {
        let dir = tempfile::tempdir().unwrap();
        let r = load_bench(dir.path(), 20, 1, 2, None, 10).unwrap();
        assert!(r.events_sent > 0);
        assert_eq!(r.retrain, None);
        // The samples went into the same store as the boots.
        let sent = r.samples_sent.unwrap();
        assert!(sent >= 10, "{r:?}");
        let db =
            ProfileStore::open(&dir.path().join("load-store.db"), StorePolicy::default()).unwrap();
        assert_eq!(db.sample_rows().unwrap(), sent);
        assert!(load_table(&r).contains("| off | "));
        assert_eq!(r.failures, 0);
        assert_eq!(r.events_logged, r.events_sent);
        assert_eq!(r.boots_stored * 5, r.events_sent);
        // Every boot was admitted and every reservation released.
        assert_eq!(r.admitted, r.boots_stored);
        assert_eq!((r.not_admitted, r.reservations_left), (0, 0));
    }

    #[test]
    fn store_bench_serves_plans_from_a_filled_store() {
        let dir = tempfile::tempdir().unwrap();
        let rows = store_bench(dir.path(), 200, 10, 5).unwrap();
        assert_eq!(rows.len(), 2);
        assert!(
            rows[0].plan_ranges > 0 && rows[1].plan_ranges > 60_000,
            "{rows:?}"
        );
        assert!(store_table(&rows).contains("sparse key"));
    }
}

/// `prescient bench load`: simulated VM lifecycles driven through the hooks
/// socket of a daemon started in this process (with a store and an event
/// log), at a fixed offered rate, by several client connections.
#[derive(Clone, Debug, Serialize)]
pub struct LoadResult {
    /// Lifecycles per second offered.
    pub offered_per_s: f64,
    /// Lifecycles completed per second.
    pub achieved_per_s: f64,
    /// Seconds the load ran.
    pub seconds: f64,
    /// Events sent and acknowledged.
    pub events_sent: u64,
    /// Events the daemon logged.
    pub events_logged: u64,
    /// Boots the store holds afterwards.
    pub boots_stored: u64,
    /// Event round-trip latency percentiles (p50, p99, p99.9, max), ms.
    pub latency_ms: [f64; 4],
    /// Exchanges that failed (timeouts, errors, rejections).
    pub failures: u64,
    /// Boots the allocator admitted (demand reserved in the pool).
    pub admitted: u64,
    /// Boots it did not admit (demand short).
    pub not_admitted: u64,
    /// VM records left in the store's pool table after every VM stopped
    /// (0: nothing leaked).
    pub reservations_left: u64,
    /// With a retraining job running beside the load: its runs completed
    /// and their CPU seconds.
    pub retrain: Option<(u64, f64)>,
    /// With usage samples written beside the load: how many were queued.
    pub samples_sent: Option<u64>,
}

/// Runs the load benchmark.
pub fn load_bench(
    dir: &Path,
    per_s: u32,
    seconds: u32,
    clients: u32,
    retrain: Option<(&Path, f64)>,
    samples_per_s: u32,
) -> Result<LoadResult, BenchError> {
    use std::os::unix::net::UnixStream;
    use vmm_hooks::proto::{self, Message};
    use vmm_hooks::{Event, EventKind, StopStatus, VmIdentity, VmSpec};

    let socket = dir.join("load.sock");
    let log = dir.join("load-events.jsonl");
    let store = dir.join("load-store.db");
    for p in [&socket, &log, &store] {
        let _ = std::fs::remove_file(p);
    }
    let mut config = crate::ServerConfig::new(&socket);
    config.event_log = Some(log.clone());
    config.store = Some(store.clone());
    // A pool that holds every client's VM at once (each client runs one VM
    // of 2 vCPUs and 1 GiB at a time), so every boot is admitted and the
    // allocator's full path (forecast, reserve, persist, release) is timed.
    let clients = clients.max(1);
    config.pool.cpus = Some(u64::from(clients) * 2);
    config.pool.memory_mib = Some(u64::from(clients) * 1024 + 512);
    config.pool.cpu_overcommit = 1.0;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| BenchError::Io(e.to_string()))?;
    let server = {
        let _in_runtime = runtime.enter();
        crate::HooksServer::bind(config).map_err(|e| BenchError::Io(vmm_hooks::error_chain(&e)))?
    };
    let (tx, rx) = tokio::sync::watch::channel(false);
    let serving = runtime.spawn(server.serve(rx));
    // Usage samples through the daemon's sample writer into the same store
    // file as the hook path's writes, one batch per second (as a shaping
    // loop with a 1 s interval over samples_per_s / 2 VMs would queue).
    let stop_samples = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sampler = if samples_per_s > 0 {
        let online = std::sync::Arc::new(crate::Online::samples_only(
            crate::ForecastConfig::default(),
            std::sync::Arc::new(crate::Metrics::new()),
        ));
        online
            .start(&store)
            .map_err(|e| BenchError::Io(vmm_hooks::error_chain(&e)))?;
        let stop = std::sync::Arc::clone(&stop_samples);
        Some(std::thread::spawn(move || {
            let mut sent = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let now = crate::online::unix_ms_now();
                for k in 0..samples_per_s {
                    online.sample(crate::Sample {
                        vm_id: format!("vm-{}", k / 2),
                        metric: if k % 2 == 0 { "mem_mib" } else { "cpu_cores" }.into(),
                        at_unix_ms: now,
                        value: f64::from(k),
                        vcpus: Some(2),
                        memory_mib: Some(1024),
                    });
                }
                sent += u64::from(samples_per_s);
                std::thread::sleep(Duration::from_secs(1));
            }
            online.shutdown();
            sent
        }))
    } else {
        None
    };
    // The daemon's retraining job (100 VMs x 14 days of samples, training
    // again and again at the lowest CPU priority) beside the hooks load.
    let stop_retrain = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let retraining = match retrain {
        Some((rdir, share)) => Some(retrain::retrain_in_background(
            rdir,
            share,
            std::sync::Arc::clone(&stop_retrain),
        )?),
        None => None,
    };

    let per_client = f64::from(per_s) / f64::from(clients);
    let duration = Duration::from_secs(u64::from(seconds));
    let start = Instant::now();
    let handles: Vec<_> = (0..clients)
        .map(|c| {
            let socket = socket.clone();
            std::thread::spawn(move || -> (Vec<f64>, u64, u64, u64, [u64; 2]) {
                let mut lat = Vec::new();
                let (mut sent, mut failures, mut lifecycles) = (0u64, 0u64, 0u64);
                // Boots admitted, boots not admitted.
                let mut admissions = [0u64; 2];
                let Ok(mut s) = UnixStream::connect(&socket) else {
                    return (lat, 0, 1, 0, admissions);
                };
                let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
                if proto::write_message(
                    &mut s,
                    &Message::Hello {
                        peer: format!("load-{c}"),
                        features: Vec::new(),
                    },
                )
                .is_err()
                {
                    return (lat, 0, 1, 0, admissions);
                }
                let interval = Duration::from_secs_f64(1.0 / per_client.max(1e-3));
                let mut next = Instant::now();
                while start.elapsed() < duration {
                    let vm = VmIdentity {
                        vm_id: format!("load-{c}-{lifecycles}"),
                        image_digest: format!("image-{}", lifecycles % 50),
                        package_digest: "pkg".into(),
                    };
                    let kinds = [
                        EventKind::Created {
                            spec: VmSpec {
                                vcpus: 2,
                                memory_mib: 1024,
                                vmm: "load".into(),
                                priority: 0,
                                interruptible: false,
                            },
                        },
                        EventKind::BeforeBoot {
                            vcpu_tids: vec![1, 2],
                            ram: GuestRange {
                                start: 0,
                                len: 1 << 30,
                            },
                            admission: Default::default(),
                        },
                        EventKind::Ready {
                            time_to_ready_ms: 100.0,
                        },
                        EventKind::BootReport(BootReport::new(100.0)),
                        EventKind::Stopped {
                            status: StopStatus::Stopped,
                        },
                    ];
                    for (seq, kind) in kinds.into_iter().enumerate() {
                        let e = Event {
                            vm: vm.clone(),
                            seq: seq as u64,
                            at_unix_ms: 0,
                            kind,
                        };
                        let t = Instant::now();
                        let reply = if proto::write_message(&mut s, &Message::Event(e)).is_ok() {
                            proto::read_message(&mut s).ok()
                        } else {
                            None
                        };
                        if let Some(Message::Reply(vmm_hooks::HookReply::Plan(p))) = &reply
                            && let Some(a) = &p.allocation
                        {
                            admissions[usize::from(!a.admitted)] += 1;
                        }
                        let ok = matches!(
                            reply,
                            Some(Message::Reply(r)) if !matches!(r, vmm_hooks::HookReply::Rejected { .. })
                        );
                        if ok {
                            sent += 1;
                            lat.push(t.elapsed().as_secs_f64() * 1e3);
                        } else {
                            failures += 1;
                        }
                    }
                    lifecycles += 1;
                    next += interval;
                    if let Some(d) = next.checked_duration_since(Instant::now()) {
                        std::thread::sleep(d);
                    }
                }
                (lat, sent, failures, lifecycles, admissions)
            })
        })
        .collect();
    let mut lat = Vec::new();
    let (mut sent, mut failures, mut lifecycles) = (0, 0, 0);
    let mut admissions = [0u64; 2];
    for h in handles {
        let (l, s, f, n, a) = h
            .join()
            .map_err(|_| BenchError::Io("a load client panicked".into()))?;
        lat.extend(l);
        sent += s;
        failures += f;
        lifecycles += n;
        admissions[0] += a[0];
        admissions[1] += a[1];
    }
    let elapsed = start.elapsed().as_secs_f64();
    stop_retrain.store(true, std::sync::atomic::Ordering::Relaxed);
    stop_samples.store(true, std::sync::atomic::Ordering::Relaxed);
    let samples_sent = match sampler {
        Some(h) => Some(
            h.join()
                .map_err(|_| BenchError::Io("the sample thread panicked".into()))?,
        ),
        None => None,
    };
    let retrain = match retraining {
        Some(h) => Some(
            h.join()
                .map_err(|_| BenchError::Io("the retraining thread panicked".into()))?,
        ),
        None => None,
    };
    let _ = tx.send(true);
    let _ = runtime.block_on(serving);
    let events_logged = std::fs::read_to_string(&log)
        .map(|t| t.lines().count() as u64)
        .unwrap_or(0);
    let opened = ProfileStore::open(&store, StorePolicy::default())?;
    let boots_stored = opened.boot_rows()?;
    let reservations_left = opened.pool_records()?.len() as u64;
    lat.sort_by(f64::total_cmp);
    let pct = |p: usize| {
        lat.get((lat.len() * p / 1000).min(lat.len().saturating_sub(1)))
            .copied()
            .unwrap_or(f64::NAN)
    };
    Ok(LoadResult {
        offered_per_s: f64::from(per_s),
        achieved_per_s: lifecycles as f64 / elapsed,
        seconds: elapsed,
        events_sent: sent,
        events_logged,
        boots_stored,
        latency_ms: [
            pct(500),
            pct(990),
            pct(999),
            lat.last().copied().unwrap_or(f64::NAN),
        ],
        failures,
        admitted: admissions[0],
        not_admitted: admissions[1],
        reservations_left,
        retrain,
        samples_sent,
    })
}

/// The load benchmark as a table.
pub fn load_table(r: &LoadResult) -> String {
    format!(
        "| offered lifecycles/s | achieved/s | seconds | events sent (acked) | events logged | lost | boots stored | admitted | not admitted | left reserved | failures | p50 ms | p99 ms | p99.9 ms | max ms | retraining runs (CPU s) | samples stored |\n\
         | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |\n\
         | {:.0} | {:.1} | {:.1} | {} | {} | {} | {} | {} | {} | {} | {} | {:.3} | {:.3} | {:.3} | {:.3} | {} | {} |\n",
        r.offered_per_s,
        r.achieved_per_s,
        r.seconds,
        r.events_sent,
        r.events_logged,
        r.events_sent.saturating_sub(r.events_logged),
        r.boots_stored,
        r.admitted,
        r.not_admitted,
        r.reservations_left,
        r.failures,
        r.latency_ms[0],
        r.latency_ms[1],
        r.latency_ms[2],
        r.latency_ms[3],
        r.retrain
            .map_or_else(|| "off".into(), |(n, c)| format!("{n} ({c:.1})")),
        r.samples_sent
            .map_or_else(|| "off".into(), |n| n.to_string())
    )
}

/// One row of `prescient bench interrupt`: `n` VMs on a host, every one a
/// candidate, many random requests that need interruptions, decided by the
/// exact search and by the greedy one.
#[derive(Clone, Debug, Serialize)]
pub struct InterruptBenchRow {
    /// VMs on the host (all interruptible, of lower priority).
    pub vms: usize,
    /// Requests decided.
    pub cases: usize,
    /// Median time of one exact decision, microseconds.
    pub exact_us_p50: f64,
    /// Slowest exact decision, microseconds.
    pub exact_us_max: f64,
    /// Median time of one greedy decision, microseconds.
    pub greedy_us_p50: f64,
    /// Cases where the exact search interrupted someone.
    pub exact_interrupts: usize,
    /// Of those, cases where the greedy search found no set (it delayed).
    pub greedy_missed: usize,
    /// Of the cases both solved, how often greedy chose a set with more
    /// disruption at the highest priority level it touched, or touched a
    /// higher level.
    pub greedy_worse: usize,
    /// Total disruption of greedy's choices over exact's, where both chose.
    pub greedy_disruption_ratio: f64,
}

/// Random hosts and requests (seeded, reproducible) decided by both
/// searches; see [`InterruptBenchRow`].
pub fn interrupt_bench(sizes: &[usize], cases: usize, seed: u64) -> Vec<InterruptBenchRow> {
    use crate::interrupt::{Decision, HostView, Request, Resources, Search, VmView, decide_with};
    let mut x = seed.max(1);
    let mut rnd = move |lo: u64, hi: u64| {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        lo + x % (hi - lo).max(1)
    };
    let mut rows = Vec::new();
    for &n in sizes {
        let (mut exact_t, mut greedy_t) = (Vec::new(), Vec::new());
        let (mut interrupts, mut missed, mut worse) = (0, 0, 0);
        let (mut d_exact, mut d_greedy) = (0u64, 0u64);
        for _ in 0..cases {
            let vms: Vec<VmView> = (0..n)
                .map(|i| {
                    let mem = rnd(64, 2048);
                    VmView {
                        id: format!("vm{i:03}"),
                        priority: i32::try_from(rnd(0, 4)).unwrap_or(0),
                        interruptible: true,
                        allocated: Resources::new(mem, rnd(1, 8)),
                        shrinkable_mib: rnd(0, mem / 8 + 1),
                        restart_demand: Resources::new(mem, 1),
                        disruption: mem,
                    }
                })
                .collect();
            let used: u64 = vms.iter().map(|v| v.allocated.memory_mib).sum();
            let host = HostView {
                capacity: Resources::new(used + rnd(0, 512), u64::MAX),
                held: Resources::default(),
            };
            let req = Request {
                id: "new".into(),
                priority: 10,
                demand: Resources::new(rnd(1024, 8192), 2),
            };
            let t = Instant::now();
            let e = decide_with(&host, &vms, &req, Search::Auto);
            exact_t.push(t.elapsed().as_secs_f64() * 1e6);
            let t = Instant::now();
            let g = decide_with(&host, &vms, &req, Search::Greedy);
            greedy_t.push(t.elapsed().as_secs_f64() * 1e6);
            let cost = |d: &Decision| match d {
                Decision::Interrupt { interrupt, .. } => {
                    let top = interrupt
                        .iter()
                        .map(|i| vms.iter().find(|v| v.id == i.id).map_or(0, |v| v.priority))
                        .max()
                        .unwrap_or(0);
                    let at_top: u64 = interrupt
                        .iter()
                        .filter_map(|i| vms.iter().find(|v| v.id == i.id))
                        .filter(|v| v.priority == top)
                        .map(|v| v.disruption)
                        .sum();
                    let all: u64 = interrupt.iter().map(|i| i.frees.memory_mib).sum();
                    Some((top, at_top, all))
                }
                _ => None,
            };
            if let Some((etop, eat, eall)) = cost(&e) {
                interrupts += 1;
                match cost(&g) {
                    None => missed += 1,
                    Some((gtop, gat, gall)) => {
                        if (gtop, gat) > (etop, eat) {
                            worse += 1;
                        }
                        d_exact += eall;
                        d_greedy += gall;
                    }
                }
            }
        }
        let p50 = |v: &mut Vec<f64>| {
            v.sort_by(f64::total_cmp);
            v.get(v.len() / 2).copied().unwrap_or(0.0)
        };
        rows.push(InterruptBenchRow {
            vms: n,
            cases,
            exact_us_max: exact_t.iter().copied().fold(0.0, f64::max),
            exact_us_p50: p50(&mut exact_t),
            greedy_us_p50: p50(&mut greedy_t),
            exact_interrupts: interrupts,
            greedy_missed: missed,
            greedy_worse: worse,
            greedy_disruption_ratio: if d_exact == 0 {
                0.0
            } else {
                d_greedy as f64 / d_exact as f64
            },
        });
    }
    rows
}

/// The table `prescient bench interrupt` prints.
pub fn interrupt_table(rows: &[InterruptBenchRow]) -> String {
    let mut t = String::from(
        "| VMs | cases | exact p50 µs | exact max µs | greedy p50 µs | exact interrupted | greedy found none | greedy touched worse | greedy/exact disruption |\n\
         | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |\n",
    );
    for r in rows {
        let _ = writeln!(
            t,
            "| {} | {} | {:.1} | {:.1} | {:.1} | {} | {} | {} | {:.3} |",
            r.vms,
            r.cases,
            r.exact_us_p50,
            r.exact_us_max,
            r.greedy_us_p50,
            r.exact_interrupts,
            r.greedy_missed,
            r.greedy_worse,
            r.greedy_disruption_ratio
        );
    }
    t
}
