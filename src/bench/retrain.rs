//! `prescient bench retrain`: what one run of the daemon's retraining job
//! costs on a store of realistic size, and the background job that
//! `prescient bench load --retrain` runs beside the hooks load.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use serde::Serialize;

use crate::metrics::Metrics;
use crate::online::{
    Decision, ForecastConfig, MEM_METRIC, Online, lowest_cpu_priority, retrain_once,
};
use crate::store::{ProfileStore, Sample, StorePolicy};

use super::BenchError;

/// Fills `store` with `vms` VMs' memory in use every 5 minutes over
/// `hours` hours ending at `end_s` (Unix seconds): per VM a level, a daily
/// cycle with its own phase and depth, noise, and bursts (seeded,
/// reproducible). Returns the samples written.
pub fn fill_samples(
    store: &Path,
    vms: usize,
    hours: u32,
    end_s: i64,
    seed: u64,
) -> Result<usize, BenchError> {
    let mut x = seed.max(1);
    let mut unit = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        (x >> 11) as f64 / (1u64 << 53) as f64
    };
    let slots = i64::from(hours) * 12;
    let mut db = ProfileStore::open(store, StorePolicy::default())?;
    let mut written = 0;
    for v in 0..vms {
        let size = [1024u64, 2048, 4096, 8192][v % 4];
        let level = size as f64 * (0.1 + 0.5 * unit());
        let depth = 0.6 * unit();
        let phase = unit() * std::f64::consts::TAU;
        let mut burst = 0u32;
        let mut batch = Vec::with_capacity(usize::try_from(slots).unwrap_or(0));
        for k in 0..slots {
            let at = end_s - (slots - 1 - k) * 300;
            let day = at.rem_euclid(86_400) as f64 / 86_400.0 * std::f64::consts::TAU;
            if burst == 0 && unit() < 0.01 {
                burst = 3 + u32::from(unit() < 0.5) * 6 + u32::from(unit() < 0.5) * 3;
            }
            let mut value = level * (1.0 + depth * (day + phase).sin() + 0.1 * (unit() - 0.5));
            if burst > 0 {
                burst -= 1;
                value *= 1.5;
            }
            batch.push(Sample {
                vm_id: format!("vm-{v:04}"),
                metric: MEM_METRIC.into(),
                at_unix_ms: at * 1000,
                value: value.clamp(0.0, size as f64),
                vcpus: Some(2),
                memory_mib: Some(size),
            });
        }
        written += batch.len();
        db.write_online(&batch, &[])?;
    }
    Ok(written)
}

/// One retraining run as the bench measured it.
#[derive(Clone, Debug, Serialize)]
pub struct RetrainRow {
    /// What the run faced.
    pub case: String,
    /// Its outcome.
    pub outcome: crate::online::RetrainOutcome,
}

/// Runs the retraining job on a store of `vms` VMs x `hours` hours of
/// 5-minute samples in `dir`: once without a model (it trains), once more
/// with whatever that installed (scoring only when the model holds up),
/// and once with an untrained network served (it fine-tunes it).
/// The runs execute as the daemon's do: at the lowest CPU priority, on a
/// one-thread rayon pool.
pub fn retrain_bench(
    dir: &Path,
    vms: usize,
    hours: u32,
    config: &ForecastConfig,
) -> Result<Vec<RetrainRow>, BenchError> {
    let store = dir.join("retrain-store.db");
    let model = dir.join("retrain.model");
    for p in [
        store.clone(),
        model.clone(),
        crate::online::sibling(&model, "prev"),
    ] {
        let _ = std::fs::remove_file(p);
    }
    let end_s = crate::online::unix_ms_now() / 1000;
    fill_samples(&store, vms, hours, end_s, 7)?;
    let cfg = ForecastConfig {
        model: Some(model.clone()),
        ..config.clone()
    };
    let mut online = Online::new(cfg.clone(), Some(&store), Arc::new(Metrics::new()));
    let mut db = ProfileStore::open(&store, StorePolicy::default())?;
    let pool = one_thread_pool()?;
    let mut rows = Vec::new();
    for case in [
        "no model yet",
        "after the first run",
        "an untrained network served",
    ] {
        if case.starts_with("an untrained") {
            models::LearnedForecaster::untrained(cfg.retrain_hidden)
                .save(&model)
                .map_err(|e| BenchError::Io(vmm_hooks::error_chain(&e)))?;
            online = Online::new(cfg.clone(), Some(&store), Arc::new(Metrics::new()));
        }
        let outcome = pool
            .install(|| retrain_once(&online, &mut db, end_s * 1000))
            .map_err(|e| BenchError::Io(vmm_hooks::error_chain(&e)))?;
        rows.push(RetrainRow {
            case: case.into(),
            outcome,
        });
    }
    Ok(rows)
}

fn one_thread_pool() -> Result<rayon::ThreadPool, BenchError> {
    rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .start_handler(|_| lowest_cpu_priority())
        .build()
        .map_err(|e| BenchError::Io(e.to_string()))
}

/// The retraining bench as a table.
pub fn retrain_table(rows: &[RetrainRow]) -> String {
    let f = |x: Option<f64>| x.map_or_else(|| "-".into(), |v| format!("{v:.3}"));
    let mut out = String::from(
        "| run | samples | held-out decisions | decision | best baseline | its loss | model loss | candidate loss | wall s | CPU s |\n\
         | --- | ---: | ---: | --- | --- | ---: | ---: | ---: | ---: | ---: |\n",
    );
    for r in rows {
        let o = &r.outcome;
        out.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} | {} | {} | {:.1} | {:.1} |\n",
            r.case,
            o.samples,
            o.holdout_cases,
            if o.fine_tuned_from.is_some() {
                format!("{} (fine-tuned)", o.decision.name())
            } else {
                o.decision.name().to_string()
            },
            o.best_baseline.as_ref().map_or("-", |b| b.0.as_str()),
            f(o.best_baseline.as_ref().map(|b| b.1)),
            f(o.model_loss),
            f(o.candidate_loss),
            o.wall_s,
            o.cpu_s
        ));
    }
    out
}

/// A retraining job on 100 VMs x 14 days of samples (the default
/// retention) that runs again and again (each time without a model,
/// so each run trains) until `stop`, the way the daemon runs it; returns
/// the runs completed and their CPU seconds.
pub(crate) fn retrain_in_background(
    dir: &Path,
    cpu_share: f64,
    stop: Arc<AtomicBool>,
) -> Result<std::thread::JoinHandle<(u64, f64)>, BenchError> {
    let store = dir.join("load-retrain-store.db");
    let model = dir.join("load-retrain.model");
    let _ = std::fs::remove_file(&store);
    let end_s = crate::online::unix_ms_now() / 1000;
    fill_samples(&store, 100, 14 * 24, end_s, 11)?;
    std::thread::Builder::new()
        .name("bench-retrain".into())
        .spawn(move || {
            lowest_cpu_priority();
            let (mut runs, mut cpu) = (0u64, 0.0);
            let Ok(pool) = one_thread_pool() else {
                return (0, 0.0);
            };
            let Ok(mut db) = ProfileStore::open(&store, StorePolicy::default()) else {
                return (0, 0.0);
            };
            let t = Instant::now();
            while !stop.load(Ordering::Relaxed) {
                let _ = std::fs::remove_file(&model);
                let cfg = ForecastConfig {
                    model: Some(model.clone()),
                    retrain_cpu_share: cpu_share,
                    ..ForecastConfig::default()
                };
                let online = Online::new(cfg, Some(&store), Arc::new(Metrics::new()));
                match pool.install(|| retrain_once(&online, &mut db, end_s * 1000)) {
                    Ok(o) => {
                        runs += 1;
                        cpu += o.cpu_s;
                        if o.decision == Decision::NotEnoughData {
                            break;
                        }
                    }
                    Err(_) => break,
                }
            }
            tracing::debug!(
                runs,
                seconds = t.elapsed().as_secs_f64(),
                "background retraining done"
            );
            (runs, cpu)
        })
        .map_err(|e| BenchError::Io(e.to_string()))
}
