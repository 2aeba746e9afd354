//! `prescient bench offload`: the forecasting model's batch kernels (batch
//! inference for 1k, 10k and 100k VMs, one training epoch) on the CPU
//! (burn `flex`) and on the GPU (burn `wgpu`) side by side in one run, with
//! the agreement of their outputs, then the measured CPU/GPU crossover that
//! the offload chooser uses (stored as JSON).
//!
//! Without a GPU (no `gpu` feature, or no Vulkan adapter) the CPU column is
//! measured and the GPU column says why it is missing; nothing is made up.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::Instant;

use models::{
    CalibrationPlan, Crossover, Gpu, GpuInfo, GpuMode, Kernels, LearnedForecaster, Offload,
    OffloadWorkload, REL_ERR_FLOOR, Target, calibrate, max_relative_error, open_gpu,
};
use serde::Serialize;

use super::{BenchError, median};

/// Relative error the GPU's outputs must stay under.
pub const AGREEMENT: f64 = 1e-3;

/// Mini-batch steps after which a training row's agreement is measured.
pub const AGREE_STEPS: usize = 8;

/// What `prescient bench offload` runs.
#[derive(Clone, Debug)]
pub struct OffloadBench {
    /// Batch inference sizes (VMs, one feature row each).
    pub vms: Vec<usize>,
    /// Examples in the training epoch.
    pub train_examples: usize,
    /// Training mini-batch size.
    pub batch: usize,
    /// Hidden width of a fresh network (ignored with `model`).
    pub hidden: usize,
    /// Timed repetitions of each inference (median kept).
    pub reps: usize,
    /// Weights of a trained model to use instead of fresh ones.
    pub model: Option<PathBuf>,
    /// Measure the crossover and store it here (`None`: skip).
    pub crossover_out: Option<PathBuf>,
    /// Where the JSON report goes.
    pub out: PathBuf,
}

impl Default for OffloadBench {
    fn default() -> Self {
        OffloadBench {
            vms: vec![1_000, 10_000, 100_000],
            train_examples: 100_000,
            batch: 512,
            hidden: 128,
            reps: 5,
            model: None,
            crossover_out: Some(PathBuf::from("target/bench/offload-crossover.json")),
            out: PathBuf::from("target/bench"),
        }
    }
}

/// One kernel at one size, both sides.
#[derive(Clone, Debug, Serialize)]
pub struct OffloadRow {
    /// `inference` or `training epoch`.
    pub kernel: String,
    /// VMs (inference) or examples (training).
    pub size: usize,
    /// CPU wall time, ms (median for inference, one epoch for training).
    pub cpu_ms: f64,
    /// GPU wall time, ms (`None`: no GPU here).
    pub gpu_ms: Option<f64>,
    /// Largest elementwise relative error of the GPU's outputs against the
    /// CPU's (inference: the quantiles; training: the trained network's
    /// quantiles on a probe batch, both evaluated on the CPU).
    pub max_rel_err: Option<f64>,
    /// Largest absolute error, same outputs.
    pub max_abs_err: Option<f64>,
    /// Mean training loss of the epoch on each side (training only).
    pub loss: Option<[f64; 2]>,
    /// Training only: the largest relative error of the outputs after the
    /// whole epoch. Rounding differences (summation order) grow over
    /// hundreds of Adam steps, so this drift is reported, not held to
    /// [`AGREEMENT`]; `max_rel_err` of a training row is measured after
    /// [`AGREE_STEPS`] steps from the same weights on the same batches.
    pub epoch_drift_rel_err: Option<f64>,
    /// What `--gpu on` would choose for this size with the measured
    /// crossover (`None`: no crossover).
    pub chosen: Option<Target>,
}

/// The whole run.
#[derive(Clone, Debug, Serialize)]
pub struct OffloadResult {
    /// Host, CPU model and threads.
    pub host: String,
    /// The adapter, when one opened.
    pub gpu: Option<GpuInfo>,
    /// Why there is no GPU column, when there is none.
    pub gpu_unsupported: Option<String>,
    /// First GPU call (shader compilation, autotuning), ms.
    pub gpu_first_call_ms: Option<f64>,
    /// Hidden width of the network.
    pub hidden: usize,
    /// Training mini-batch size.
    pub batch: usize,
    /// The floor of the relative error (see `models::max_relative_error`).
    pub rel_err_floor: f64,
    /// The rows.
    pub rows: Vec<OffloadRow>,
    /// The measured crossover.
    pub crossover: Option<Crossover>,
    /// Where it was stored.
    pub crossover_file: Option<PathBuf>,
}

impl OffloadResult {
    /// Every GPU output agreed with the CPU's within [`AGREEMENT`].
    pub fn agrees(&self) -> bool {
        self.rows
            .iter()
            .all(|r| r.max_rel_err.is_none_or(|e| e < AGREEMENT))
    }
}

fn io(path: &Path, e: impl std::fmt::Display) -> BenchError {
    BenchError::Io(format!("{}: {e}", path.display()))
}

fn models_err(e: models::ModelsError) -> BenchError {
    BenchError::Io(vmm_hooks::error_chain(&e))
}

impl OffloadBench {
    /// Run it; `progress` gets a line per step.
    pub fn run(&self, progress: &mut dyn FnMut(&str)) -> Result<OffloadResult, BenchError> {
        let (kernels, hidden) = match &self.model {
            Some(path) => {
                let m = LearnedForecaster::load(path).map_err(models_err)?;
                let h = m.meta.net.hidden;
                (Kernels::from_model(&m), h)
            }
            None => (Kernels::new(self.hidden, 7), self.hidden),
        };
        let gpu = open_gpu();
        let (gpu, gpu_unsupported) = match gpu {
            Ok(g) => {
                progress(&format!("GPU: {}", g.info()));
                (Some(g), None)
            }
            Err(why) => {
                progress(&format!("GPU: unsupported here: {why}"));
                (None, Some(why))
            }
        };
        let max_vms = self.vms.iter().copied().max().unwrap_or(0);
        let t = Instant::now();
        let wl = OffloadWorkload::synthetic(max_vms.max(self.train_examples), 8192, 42);
        progress(&format!(
            "workload: {} feature rows of synthetic VMs ({} distinct) in {:.1} s",
            wl.rows(),
            8192.min(wl.rows()),
            t.elapsed().as_secs_f64()
        ));
        let on_cpu = kernels.place(None);
        let on_gpu = gpu.as_ref().map(|g| kernels.place(Some(g)));
        let mut gpu_first_call_ms = None;
        if let Some(p) = &on_gpu {
            let x = &wl.features()[..64 * models::N_FEATURES];
            let t = Instant::now();
            p.infer(x, 64).map_err(models_err)?;
            gpu_first_call_ms = Some(t.elapsed().as_secs_f64() * 1e3);
        }
        let mut rows = Vec::new();
        for &n in &self.vms {
            let x = &wl.features()[..n * models::N_FEATURES];
            let (cpu_ms, cpu_out) = time_infer(self.reps, || on_cpu.infer(x, n))?;
            let mut row = OffloadRow {
                kernel: "inference".into(),
                size: n,
                cpu_ms,
                gpu_ms: None,
                max_rel_err: None,
                max_abs_err: None,
                loss: None,
                epoch_drift_rel_err: None,
                chosen: None,
            };
            if let Some(p) = &on_gpu {
                let (gpu_ms, gpu_out) = time_infer(self.reps, || p.infer(x, n))?;
                let (rel, abs) = max_relative_error(&cpu_out, &gpu_out, REL_ERR_FLOOR);
                row.gpu_ms = Some(gpu_ms);
                row.max_rel_err = Some(rel);
                row.max_abs_err = Some(abs);
            }
            progress(&format!(
                "inference {n} VMs: CPU {cpu_ms:.2} ms, GPU {}",
                row.gpu_ms.map_or("-".into(), |g| format!("{g:.2} ms"))
            ));
            rows.push(row);
        }
        let train_wl = OffloadWorkload::synthetic(self.train_examples, 8192, 42);
        let probe_rows = 4096.min(train_wl.rows());
        let probe = &train_wl.features()[..probe_rows * models::N_FEATURES];
        // Warm-up: a few mini-batches on each side (compiles the GPU's
        // backward kernels), untimed.
        let warm = OffloadWorkload::synthetic(self.batch * 2, 1024, 3);
        kernels.train_epoch(None, &warm, self.batch, 2e-3, 1);
        if let Some(g) = &gpu {
            kernels.train_epoch(Some(g), &warm, self.batch, 2e-3, 1);
        }
        let t = Instant::now();
        let (cpu_net, cpu_loss) = kernels.train_epoch(None, &train_wl, self.batch, 2e-3, 11);
        let cpu_ms = t.elapsed().as_secs_f64() * 1e3;
        let cpu_probe = cpu_net
            .place(None)
            .infer(probe, probe_rows)
            .map_err(models_err)?;
        let mut row = OffloadRow {
            kernel: format!("training epoch ({}/batch)", self.batch),
            size: train_wl.rows(),
            cpu_ms,
            gpu_ms: None,
            max_rel_err: None,
            max_abs_err: None,
            loss: None,
            epoch_drift_rel_err: None,
            chosen: None,
        };
        if let Some(g) = &gpu {
            let t = Instant::now();
            let (gpu_net, gpu_loss) = kernels.train_epoch(Some(g), &train_wl, self.batch, 2e-3, 11);
            row.gpu_ms = Some(t.elapsed().as_secs_f64() * 1e3);
            let gpu_probe = gpu_net
                .place(None)
                .infer(probe, probe_rows)
                .map_err(models_err)?;
            let (drift, _) = max_relative_error(&cpu_probe, &gpu_probe, REL_ERR_FLOOR);
            row.epoch_drift_rel_err = Some(drift);
            row.loss = Some([cpu_loss, gpu_loss]);
            // Agreement: the first steps from the same weights on the same
            // mini-batches, both results evaluated on the CPU.
            let steps = OffloadWorkload::synthetic(self.batch * AGREE_STEPS, 8192, 42);
            let (a, _) = kernels.train_epoch(None, &steps, self.batch, 2e-3, 11);
            let (b, _) = kernels.train_epoch(Some(g), &steps, self.batch, 2e-3, 11);
            let pa = a.place(None).infer(probe, probe_rows).map_err(models_err)?;
            let pb = b.place(None).infer(probe, probe_rows).map_err(models_err)?;
            let (rel, abs) = max_relative_error(&pa, &pb, REL_ERR_FLOOR);
            row.max_rel_err = Some(rel);
            row.max_abs_err = Some(abs);
        }
        progress(&format!(
            "training epoch of {} examples: CPU {cpu_ms:.0} ms, GPU {}",
            row.size,
            row.gpu_ms.map_or("-".into(), |g| format!("{g:.0} ms"))
        ));
        rows.push(row);
        let (crossover, crossover_file) = match (&gpu, &self.crossover_out) {
            (Some(g), Some(path)) => {
                progress("calibrating the crossover (CPU and GPU, size by size)");
                let c = self.calibrate(g, hidden)?;
                c.save(path).map_err(models_err)?;
                (Some(c), Some(path.clone()))
            }
            _ => (None, None),
        };
        if let (Some(c), Some(g)) = (&crossover, &gpu) {
            let chooser = Offload::with_crossover(GpuMode::On, g.clone(), c.clone()).chooser();
            for r in &mut rows {
                r.chosen = Some(if r.kernel == "inference" {
                    chooser.inference(r.size)
                } else {
                    chooser.training(self.batch)
                });
            }
        }
        Ok(OffloadResult {
            host: models::host_identity(),
            gpu: gpu.as_ref().map(|g| g.info().clone()),
            gpu_unsupported,
            gpu_first_call_ms,
            hidden,
            batch: self.batch,
            rel_err_floor: REL_ERR_FLOOR,
            rows,
            crossover,
            crossover_file,
        })
    }

    fn calibrate(&self, gpu: &Gpu, hidden: usize) -> Result<Crossover, BenchError> {
        calibrate(gpu, hidden, &CalibrationPlan::default()).map_err(models_err)
    }
}

fn time_infer(
    reps: usize,
    mut f: impl FnMut() -> models::Result<Vec<f32>>,
) -> Result<(f64, Vec<f32>), BenchError> {
    let mut out = f().map_err(models_err)?;
    let mut times = Vec::with_capacity(reps);
    for _ in 0..reps.max(1) {
        let t = Instant::now();
        out = f().map_err(models_err)?;
        times.push(t.elapsed().as_secs_f64() * 1e3);
    }
    Ok((median(&times), out))
}

fn fmt_ms(v: f64) -> String {
    if v >= 100.0 {
        format!("{v:.0}")
    } else if v >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

/// The benchmark as text: a header naming both sides, the table, the
/// crossover.
pub fn offload_table(r: &OffloadResult) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "host: {}", r.host);
    let _ = writeln!(
        s,
        "CPU: burn flex, one thread (this build's flex has no rayon); network {} features -> {} -> {} -> 3",
        models::N_FEATURES,
        r.hidden,
        r.hidden
    );
    match (&r.gpu, &r.gpu_unsupported) {
        (Some(g), _) => {
            let _ = writeln!(s, "GPU: burn wgpu on {g}");
            if g.software {
                let _ = writeln!(
                    s,
                    "NOTE: this adapter is software-emulated (Vulkan on the CPU): its column shows \
                     that the GPU code path computes the same numbers; its timings are NOT GPU timings."
                );
            }
            if let Some(ms) = r.gpu_first_call_ms {
                let _ = writeln!(
                    s,
                    "GPU first call (shader compilation, autotune): {} ms, not in the table",
                    fmt_ms(ms)
                );
            }
        }
        (None, Some(why)) => {
            let _ = writeln!(s, "GPU: unsupported here: {why}");
        }
        (None, None) => {}
    }
    let gpu_head = match &r.gpu {
        Some(g) if g.software => "GPU ms (software-emulated)",
        _ => "GPU ms",
    };
    let _ = writeln!(
        s,
        "\n| kernel | size | CPU ms | {gpu_head} | GPU speed-up | max rel err | max abs err | agree (< {AGREEMENT:e}) | chooser (--gpu on) |"
    );
    s.push_str("| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- | --- |\n");
    for row in &r.rows {
        let unit = if row.kernel == "inference" {
            "VMs"
        } else {
            "examples"
        };
        let na = || "-".to_string();
        let _ = writeln!(
            s,
            "| {} | {} {unit} | {} | {} | {} | {} | {} | {} | {} |",
            row.kernel,
            row.size,
            fmt_ms(row.cpu_ms),
            row.gpu_ms.map_or_else(na, fmt_ms),
            row.gpu_ms
                .map_or_else(na, |g| format!("{:.2}x", row.cpu_ms / g)),
            row.max_rel_err.map_or_else(na, |e| format!("{e:.2e}")),
            row.max_abs_err.map_or_else(na, |e| format!("{e:.2e}")),
            row.max_rel_err.map_or_else(na, |e| if e < AGREEMENT {
                "yes".into()
            } else {
                "NO".into()
            }),
            row.chosen.map_or_else(na, |t| match t {
                Target::Cpu => "CPU".into(),
                Target::Gpu => "GPU".into(),
            }),
        );
    }
    for row in r.rows.iter().filter(|row| row.loss.is_some()) {
        let l = row.loss.unwrap_or_default();
        let _ = writeln!(
            s,
            "\ntraining: max rel err is measured after the first {AGREE_STEPS} mini-batch steps from the \
             same weights on the same batches. After the whole epoch ({} steps) the outputs differ by \
             {} (relative; mean loss CPU {:.6}, GPU {:.6}): rounding differences (summation order) \
             grow over Adam steps, so this drift is reported, not held to {AGREEMENT:e}.",
            row.size.div_ceil(r.batch.max(1)),
            row.epoch_drift_rel_err
                .map_or_else(|| "-".to_string(), |e| format!("{e:.2e}")),
            l[0],
            l[1]
        );
    }
    let _ = writeln!(
        s,
        "relative error = max |gpu - cpu| / max(|cpu|, {:e}) over every output (quantiles in z space)",
        r.rel_err_floor
    );
    match &r.crossover {
        Some(c) => {
            let _ = writeln!(
                s,
                "\ncrossover, measured now{}:",
                r.crossover_file
                    .as_ref()
                    .map(|p| format!(" (stored in {})", p.display()))
                    .unwrap_or_default()
            );
            s.push_str("| kernel | size | CPU ms | GPU ms | faster |\n| --- | ---: | ---: | ---: | --- |\n");
            for (kernel, list) in [("inference", &c.inference), ("training step", &c.training)] {
                for t in list {
                    let _ = writeln!(
                        s,
                        "| {kernel} | {} | {} | {} | {} |",
                        t.size,
                        fmt_ms(t.cpu_ms),
                        fmt_ms(t.gpu_ms),
                        if t.gpu_ms < t.cpu_ms { "GPU" } else { "CPU" }
                    );
                }
            }
            let at = |v: Option<usize>, unit: &str| {
                v.map_or("never (CPU faster at every size)".to_string(), |n| {
                    format!("from {n} {unit}")
                })
            };
            let _ = writeln!(
                s,
                "crossover: inference {}; training {}",
                at(c.inference_min_rows, "rows"),
                at(c.training_min_batch, "per mini-batch")
            );
        }
        None if r.gpu.is_some() => {
            let _ = writeln!(s, "crossover: not measured (--no-calibrate)");
        }
        None => {
            let _ = writeln!(s, "crossover: not measured (no GPU here)");
        }
    }
    s
}

/// Write the JSON report; returns its path.
pub fn write_offload_json(out: &Path, r: &OffloadResult) -> Result<PathBuf, BenchError> {
    std::fs::create_dir_all(out).map_err(|e| io(out, e))?;
    let path = out.join("offload.json");
    let json = serde_json::to_vec_pretty(r).map_err(|e| io(&path, e))?;
    std::fs::write(&path, json).map_err(|e| io(&path, e))?;
    Ok(path)
}
