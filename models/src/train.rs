//! Training the learned forecaster on trace files.

use std::time::Instant;

use burn::module::Module;
use burn::optim::{AdamConfig, GradientsParams, ModuleOptimizer};
use burn::prelude::*;
use serde::{Deserialize, Serialize};

use crate::error::{ModelsError, Result};
use crate::features::{FEATURE_VERSION, N_FEATURES, feature_names, features, narrow, to_z};
use crate::forecast::{History, LEVELS, Quantiles};
use crate::metrics::{equal_coverage_factor, pinball};
use crate::model::{Calibration, LearnedForecaster, ModelMeta, shrink};
use crate::nn::{NetSpec, QuantileMlp, pinball_loss, tensor2};
use crate::offload::Offload;
use crate::task::{GAP_SLOTS, MIN_TARGETS, next_hour_cases, post_restart_cases};
use crate::trace::{Dataset, Grid, Part, SLOTS_PER_HOUR, SplitSpec, Statics};

/// Training settings.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TrainConfig {
    /// Hidden layer width.
    pub hidden: usize,
    /// Maximum passes over the training examples.
    pub epochs: usize,
    /// Mini-batch size.
    pub batch: usize,
    /// Adam learning rate (halved at 60 % and again at 85 % of the epochs).
    pub lr: f64,
    /// Stop after this many seconds of optimisation (the best epoch so far
    /// is kept).
    pub max_seconds: f64,
    /// The series split.
    pub split: SplitSpec,
    /// Share of examples whose history is cut 30 min to 24 h before the
    /// decision, standing in for restarts.
    pub restart_share: f64,
    /// At most this many training examples per dataset (sampled).
    pub max_examples_per_dataset: usize,
    /// Random seed.
    pub seed: u64,
    /// Example weight = (scale / dataset mean scale)^weight_power.
    pub weight_power: f64,
    /// Training decisions every this many slots (12 = every full hour;
    /// smaller gives more, correlated, examples).
    pub stride_slots: i64,
    /// How much worse (relative) the calibration pinball loss may get when
    /// a shrink exponent is chosen for less slack.
    pub shrink_pinball_tolerance: f64,
    /// Threads building feature rows (1 or 2). The optimisation runs on
    /// the caller's rayon pool: run `train` inside a one-thread pool to
    /// keep all of it on one thread (the daemon's retraining does).
    #[serde(default = "two_threads")]
    pub threads: usize,
}

fn two_threads() -> usize {
    2
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            hidden: 128,
            epochs: 30,
            batch: 512,
            lr: 2e-3,
            max_seconds: 360.0,
            split: SplitSpec::default(),
            restart_share: 0.2,
            max_examples_per_dataset: 200_000,
            seed: 7,
            stride_slots: 3,
            weight_power: 1.0,
            shrink_pinball_tolerance: 0.01,
            threads: 2,
        }
    }
}

/// What training did.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TrainReport {
    /// Training examples used.
    pub train_examples: usize,
    /// Calibration examples used.
    pub calibration_examples: usize,
    /// Epochs completed.
    pub epochs: usize,
    /// Seconds spent building examples.
    pub prepare_seconds: f64,
    /// Seconds spent optimising.
    pub train_seconds: f64,
    /// Calibration-split loss per epoch.
    pub calibration_loss: Vec<f64>,
    /// Calibration of regular forecasts.
    pub calibration: Calibration,
    /// Calibration after a gap.
    pub calibration_restart: Calibration,
}

/// Small deterministic RNG (xorshift64*).
#[derive(Debug, Clone)]
pub(crate) struct Rng(u64);

impl Rng {
    pub(crate) fn new(seed: u64) -> Self {
        Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1)
    }
    pub(crate) fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    pub(crate) fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            0
        } else {
            // The remainder is below n, which is a usize.
            usize::try_from(self.next_u64() % n as u64).unwrap_or(0)
        }
    }
    pub(crate) fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// One example: where its history ends and what followed.
#[derive(Debug, Clone)]
struct Spec<'a> {
    grid: &'a Grid,
    statics: Statics,
    decision_slot: i64,
    visible_len: usize,
    targets: Vec<f64>,
}

/// Feature rows and targets of a set of examples.
#[derive(Debug, Default)]
pub(crate) struct Examples {
    pub(crate) x: Vec<f32>,
    y: Vec<f32>,
    mask: Vec<f32>,
    w: Vec<f32>,
    scale: Vec<f64>,
    raw_targets: Vec<Vec<f64>>,
    restart: Vec<bool>,
}

impl Examples {
    pub(crate) fn len(&self) -> usize {
        self.scale.len()
    }

    /// The first `n` examples, repeating from the start when `n` exceeds
    /// the number held (none when there are none).
    pub(crate) fn head(&self, n: usize) -> Examples {
        let len = self.len();
        let mut out = Examples::default();
        if len == 0 {
            return out;
        }
        for k in 0..n {
            let i = k % len;
            out.x
                .extend_from_slice(&self.x[i * N_FEATURES..(i + 1) * N_FEATURES]);
            out.y
                .extend_from_slice(&self.y[i * SLOTS_PER_HOUR..(i + 1) * SLOTS_PER_HOUR]);
            out.mask
                .extend_from_slice(&self.mask[i * SLOTS_PER_HOUR..(i + 1) * SLOTS_PER_HOUR]);
            out.w.push(self.w[i]);
            out.scale.push(self.scale[i]);
            out.raw_targets.push(self.raw_targets[i].clone());
            out.restart.push(self.restart[i]);
        }
        out
    }
}

/// One synthetic VM: 8 days of one usage metric on the 5-minute grid, with
/// a daily cycle, noise, bursts and missing samples (a fifth of the VMs
/// nearly idle).
fn synthetic_grid(rng: &mut Rng) -> Grid {
    let slots = 8 * 288;
    let idle = rng.unit() < 0.2;
    let level = if idle {
        0.05 + rng.unit() * 0.5
    } else {
        1.0 + rng.unit() * 60.0
    };
    let amplitude = level * rng.unit() * 0.8;
    let phase = rng.unit() * std::f64::consts::TAU;
    let mut burst = 0usize;
    let values = (0..slots)
        .map(|k| {
            if rng.unit() < 0.02 {
                return f64::NAN;
            }
            if burst == 0 && rng.unit() < 0.005 {
                burst = 3 + rng.below(24);
            }
            let day = (k % 288) as f64 / 288.0 * std::f64::consts::TAU;
            let mut v = level + amplitude * (day + phase).sin() + level * 0.2 * (rng.unit() - 0.5);
            if burst > 0 {
                burst -= 1;
                v += level * 2.0;
            }
            v.max(0.0)
        })
        .collect();
    Grid {
        first_slot: 100_000,
        values,
    }
}

/// `rows` training examples of synthetic VMs (`distinct` different ones,
/// repeated to fill `rows`), built with the real feature code; weights 1.
pub(crate) fn synthetic_examples(rows: usize, distinct: usize, seed: u64) -> Examples {
    let mut rng = Rng::new(seed);
    let want = distinct.min(rows).max(1);
    let mut grids = Vec::new();
    let mut candidates = 0usize;
    while candidates < want {
        let g = synthetic_grid(&mut rng);
        // About 740 decisions per 8-day grid at a 15-minute stride.
        candidates += 700;
        grids.push(g);
    }
    let statics = Statics {
        vcpus: Some(4.0),
        mem_cap_kb: Some(16.0 * 1024.0 * 1024.0),
    };
    let mut specs = Vec::new();
    for g in &grids {
        specs.extend(train_specs(g, statics, 0.2, 3, &mut rng));
    }
    let specs = sample(specs, want, &mut rng);
    build(&specs, 2).head(rows)
}

fn build(specs: &[Spec<'_>], threads: usize) -> Examples {
    let n = specs.len();
    let mut ex = Examples {
        x: vec![0.0; n * N_FEATURES],
        y: vec![0.0; n * SLOTS_PER_HOUR],
        mask: vec![0.0; n * SLOTS_PER_HOUR],
        w: vec![1.0; n],
        scale: vec![1.0; n],
        raw_targets: Vec::with_capacity(n),
        restart: Vec::with_capacity(n),
    };
    // Two threads (the machine has two cores) unless asked for one.
    if threads >= 2 {
        let half = n / 2;
        let (xa, xb) = ex.x.split_at_mut(half * N_FEATURES);
        let (sa, sb) = ex.scale.split_at_mut(half);
        std::thread::scope(|sc| {
            sc.spawn(|| fill(&specs[..half], xa, sa));
            fill(&specs[half..], xb, sb);
        });
    } else {
        fill(specs, &mut ex.x, &mut ex.scale);
    }
    for (i, sp) in specs.iter().enumerate() {
        let s = ex.scale[i];
        for (j, &t) in sp.targets.iter().take(SLOTS_PER_HOUR).enumerate() {
            ex.y[i * SLOTS_PER_HOUR + j] = narrow(to_z(t, s));
            ex.mask[i * SLOTS_PER_HOUR + j] = 1.0;
        }
        ex.raw_targets.push(sp.targets.clone());
        let last = sp.grid.first_slot + sp.visible_len as i64 - 1;
        ex.restart.push(sp.decision_slot - last >= GAP_SLOTS);
    }
    ex
}

fn fill(specs: &[Spec<'_>], x: &mut [f32], scale: &mut [f64]) {
    for ((sp, row), s) in specs.iter().zip(x.chunks_mut(N_FEATURES)).zip(scale) {
        let h = History {
            values: &sp.grid.values[..sp.visible_len],
            first_slot: sp.grid.first_slot,
            decision_slot: sp.decision_slot,
            statics: sp.statics,
        };
        *s = features(&h, row);
    }
}

fn targets_at(grid: &Grid, t: i64) -> Vec<f64> {
    (1..=SLOTS_PER_HOUR as i64)
        .filter_map(|d| grid.index_of(t + d))
        .map(|i| grid.values[i])
        .filter(|v| !v.is_nan())
        .collect()
}

/// Training specs of one grid: every full hour with 6 h of present history
/// and 10 present targets; a share of them with the history cut.
fn train_specs<'a>(
    grid: &'a Grid,
    statics: Statics,
    restart_share: f64,
    stride: i64,
    rng: &mut Rng,
) -> Vec<Spec<'a>> {
    let mut out = Vec::new();
    let mut present = 0usize;
    let mut present_at = Vec::with_capacity(grid.values.len());
    for v in &grid.values {
        if !v.is_nan() {
            present += 1;
        }
        present_at.push(present);
    }
    let first = grid.first_slot;
    let mut t = first.div_euclid(12) * 12 + 12;
    while t < grid.last_slot() {
        let Some(vis) = grid.index_of(t).map(|i| i + 1) else {
            t += stride;
            continue;
        };
        if present_at[vis - 1] >= 72 {
            let targets = targets_at(grid, t);
            if targets.len() >= MIN_TARGETS {
                let mut visible_len = vis;
                if rng.unit() < restart_share {
                    let g = 6 + rng.below(283);
                    visible_len = vis.saturating_sub(g);
                }
                if visible_len > 0 && present_at[visible_len - 1] >= 12 {
                    out.push(Spec {
                        grid,
                        statics,
                        decision_slot: t,
                        visible_len,
                        targets,
                    });
                }
            }
        }
        t += stride;
    }
    out
}

/// Calibration specs: the evaluation cases, plus each one again with its
/// history cut (for the restart calibration).
fn calibration_specs<'a>(grid: &'a Grid, statics: Statics, rng: &mut Rng) -> Vec<Spec<'a>> {
    let mut out = Vec::new();
    for c in next_hour_cases(grid)
        .into_iter()
        .chain(post_restart_cases(grid))
    {
        out.push(Spec {
            grid,
            statics,
            decision_slot: c.decision_slot,
            visible_len: c.visible_len,
            targets: c.targets.clone(),
        });
        let g = 6 + rng.below(283);
        if c.visible_len > g + 12 {
            out.push(Spec {
                grid,
                statics,
                decision_slot: c.decision_slot,
                visible_len: c.visible_len - g,
                targets: c.targets,
            });
        }
    }
    out
}

fn sample<T>(mut v: Vec<T>, max: usize, rng: &mut Rng) -> Vec<T> {
    if v.len() <= max {
        return v;
    }
    // Partial Fisher-Yates.
    for i in 0..max {
        let j = i + rng.below(v.len() - i);
        v.swap(i, j);
    }
    v.truncate(max);
    v
}

/// Train on the Train part of every dataset, calibrate on the Calibration
/// part; the Test part is never touched. `progress` gets one line per step.
/// Everything runs on the CPU.
pub fn train(
    datasets: &[Dataset],
    cfg: &TrainConfig,
    progress: &mut dyn FnMut(&str),
) -> Result<(LearnedForecaster, TrainReport)> {
    train_on(datasets, cfg, &Offload::cpu_only("CPU training"), progress)
}

/// [`train`], with the epochs on the device `offload` chooses for the
/// mini-batch size and the calibration split's inference on the device it
/// chooses for those batches. The returned model's weights live on the CPU,
/// with `offload` attached ([`LearnedForecaster::with_offload`]).
pub fn train_on(
    datasets: &[Dataset],
    cfg: &TrainConfig,
    offload: &Offload,
    progress: &mut dyn FnMut(&str),
) -> Result<(LearnedForecaster, TrainReport)> {
    train_from(datasets, cfg, offload, None, progress)
}

/// [`train`], starting from `from`'s weights instead of random ones (its
/// hidden width wins over `cfg.hidden`): fine-tuning a served model on
/// new samples. Calibration is fitted afresh.
pub fn fine_tune(
    datasets: &[Dataset],
    cfg: &TrainConfig,
    from: &LearnedForecaster,
    progress: &mut dyn FnMut(&str),
) -> Result<(LearnedForecaster, TrainReport)> {
    train_from(
        datasets,
        cfg,
        &Offload::cpu_only("CPU training"),
        Some(from),
        progress,
    )
}

fn train_from(
    datasets: &[Dataset],
    cfg: &TrainConfig,
    offload: &Offload,
    from: Option<&LearnedForecaster>,
    progress: &mut dyn FnMut(&str),
) -> Result<(LearnedForecaster, TrainReport)> {
    let t0 = Instant::now();
    let mut rng = Rng::new(cfg.seed);
    let mut train_ex = Examples::default();
    let mut cal_specs_all: Vec<Spec<'_>> = Vec::new();
    let mut train_specs_all: Vec<Spec<'_>> = Vec::new();
    for ds in datasets {
        let mut tr = Vec::new();
        let mut ca = Vec::new();
        for s in &ds.series {
            let part = cfg.split.part(&s.split_key);
            for (_, g) in &s.metrics {
                match part {
                    Part::Train => tr.extend(train_specs(
                        g,
                        s.statics,
                        cfg.restart_share,
                        cfg.stride_slots.max(1),
                        &mut rng,
                    )),
                    Part::Calibration => ca.extend(calibration_specs(g, s.statics, &mut rng)),
                    Part::Test => {}
                }
            }
        }
        let tr = sample(tr, cfg.max_examples_per_dataset, &mut rng);
        let ca = sample(ca, cfg.max_examples_per_dataset / 2, &mut rng);
        progress(&format!(
            "{}: {} training examples, {} calibration examples",
            ds.name,
            tr.len(),
            ca.len()
        ));
        // Per-dataset weights: scale relative to the dataset's mean scale,
        // so large series count more, as in the pooled metrics.
        let ex = build(&tr, cfg.threads);
        let mean_s = ex.scale.iter().sum::<f64>() / ex.len().max(1) as f64;
        let mut ex = ex;
        for (w, s) in ex.w.iter_mut().zip(&ex.scale) {
            *w = narrow(
                (s / mean_s.max(1e-12))
                    .powf(cfg.weight_power)
                    .clamp(0.02, 50.0),
            );
        }
        append(&mut train_ex, ex);
        train_specs_all.extend(tr);
        cal_specs_all.extend(ca);
    }
    drop(train_specs_all);
    let cal_ex = build(&cal_specs_all, cfg.threads);
    drop(cal_specs_all);
    let n = train_ex.len();
    if n == 0 {
        return Err(ModelsError::Training(
            "no training examples: the files have no series with 6 h of history and a following hour".into(),
        ));
    }
    let prepare_seconds = t0.elapsed().as_secs_f64();
    progress(&format!(
        "{n} training and {} calibration examples prepared in {prepare_seconds:.1} s",
        cal_ex.len()
    ));

    let spec = NetSpec {
        inputs: N_FEATURES,
        hidden: from.map_or(cfg.hidden, |f| f.meta.net.hidden),
    };
    let base_device = offload.training_device(cfg.batch);
    progress(&format!(
        "training on {} (mini-batches of {})",
        if base_device == Device::flex() {
            "the CPU".to_string()
        } else {
            offload
                .gpu()
                .map_or_else(|| "the GPU".to_string(), |g| format!("GPU {}", g.info()))
        },
        cfg.batch
    ));
    let device = base_device.clone().autodiff();
    let infer_device = offload.inference_device(EVAL_CHUNK);
    // The initial weights follow the seed too, so a training is repeatable
    // (burn's CPU backend keeps one generator per process: two trainings
    // at once still draw from it in turn).
    device.seed(cfg.seed);
    let mut net = QuantileMlp::new(spec, &device);
    if let Some(f) = from {
        net = net
            .try_load_record(f.home_net().clone().into_record())
            .map_err(|e| ModelsError::Weights(format!("cannot start from the model: {e:?}")))?;
        progress("starting from the given model's weights");
    }
    let mut optim = AdamConfig::new().init();
    let mut order: Vec<usize> = (0..n).collect();
    let t1 = Instant::now();
    let mut best: Option<(f64, QuantileMlp)> = None;
    let mut cal_losses = Vec::new();
    let mut epochs = 0;
    for epoch in 0..cfg.epochs {
        for i in (1..order.len()).rev() {
            let j = rng.below(i + 1);
            order.swap(i, j);
        }
        let frac = epoch as f64 / cfg.epochs as f64;
        let lr = cfg.lr
            * if frac < 0.6 {
                1.0
            } else if frac < 0.85 {
                0.5
            } else {
                0.25
            };
        let (trained, train_loss) =
            run_epoch(net, &mut optim, &train_ex, &order, cfg.batch, lr, &device);
        net = trained;
        epochs += 1;
        let valid = net.valid();
        let cal_loss = if cal_ex.len() > 0 {
            eval_loss(&valid, &cal_ex, &infer_device)
        } else {
            train_loss
        };
        cal_losses.push(cal_loss);
        progress(&format!(
            "epoch {epoch:>3}: train loss {train_loss:.5}  calibration loss {cal_loss:.5}  ({:.0} s)",
            t1.elapsed().as_secs_f64()
        ));
        if best.as_ref().is_none_or(|b| cal_loss < b.0) {
            best = Some((cal_loss, valid));
        }
        if t1.elapsed().as_secs_f64() > cfg.max_seconds {
            progress("time budget reached; keeping the best epoch");
            break;
        }
    }
    let Some((_, best_net)) = best else {
        return Err(ModelsError::Training("no epoch ran".into()));
    };
    let train_seconds = t1.elapsed().as_secs_f64();

    // Calibration on the held-out calibration series.
    let mut model = LearnedForecaster::from_parts(
        best_net.to_device(&Device::flex()),
        Device::flex(),
        ModelMeta {
            feature_version: FEATURE_VERSION,
            feature_names: feature_names(),
            net: spec,
            calibration: Calibration::default(),
            calibration_restart: Calibration::default(),
            split: cfg.split,
            trained_on: datasets.iter().map(|d| d.name.clone()).collect(),
            payload_fnv1a: 0,
        },
    )
    .with_offload(offload);
    let (cal, cal_r) = calibration_factors(&model, &cal_ex, cfg.shrink_pinball_tolerance, progress);
    model.meta.calibration = cal;
    model.meta.calibration_restart = cal_r;
    progress(&format!("calibration: {cal:?}; after a gap: {cal_r:?}"));
    let report = TrainReport {
        train_examples: n,
        calibration_examples: cal_ex.len(),
        epochs,
        prepare_seconds,
        train_seconds,
        calibration_loss: cal_losses,
        calibration: cal,
        calibration_restart: cal_r,
    };
    Ok((model, report))
}

/// One pass over `ex` in `order`, mini-batches of `batch`, on `device`
/// (an autodiff device; `net` must live there). Returns the updated network
/// and the mean training loss. The loss is summed on the device and read
/// once at the end, so a GPU is not made to wait for the host every step.
pub(crate) fn run_epoch(
    mut net: QuantileMlp,
    optim: &mut ModuleOptimizer,
    ex: &Examples,
    order: &[usize],
    batch: usize,
    lr: f64,
    device: &Device,
) -> (QuantileMlp, f64) {
    let mut sum: Option<Tensor<1>> = None;
    let mut batches = 0usize;
    for idx in order.chunks(batch.max(1)) {
        let (x, y, m, w) = gather(ex, idx, device);
        let q = net.forward(x);
        let loss = pinball_loss(q, y, m, w);
        let lv = loss.clone().detach().without_autodiff();
        sum = Some(match sum {
            None => lv,
            Some(s) => s + lv,
        });
        batches += 1;
        let grads = GradientsParams::from_grads(loss.backward(), &net);
        net = optim.step(lr, net, grads);
    }
    let total: f32 = sum.map_or(0.0, |s| s.into_scalar());
    (net, f64::from(total) / batches.max(1) as f64)
}

fn append(a: &mut Examples, b: Examples) {
    a.x.extend(b.x);
    a.y.extend(b.y);
    a.mask.extend(b.mask);
    a.w.extend(b.w);
    a.scale.extend(b.scale);
    a.raw_targets.extend(b.raw_targets);
    a.restart.extend(b.restart);
}

fn gather(
    ex: &Examples,
    idx: &[usize],
    device: &Device,
) -> (Tensor<2>, Tensor<2>, Tensor<2>, Tensor<2>) {
    let b = idx.len();
    let mut x = Vec::with_capacity(b * N_FEATURES);
    let mut y = Vec::with_capacity(b * SLOTS_PER_HOUR);
    let mut m = Vec::with_capacity(b * SLOTS_PER_HOUR);
    let mut w = Vec::with_capacity(b);
    for &i in idx {
        x.extend_from_slice(&ex.x[i * N_FEATURES..(i + 1) * N_FEATURES]);
        y.extend_from_slice(&ex.y[i * SLOTS_PER_HOUR..(i + 1) * SLOTS_PER_HOUR]);
        m.extend_from_slice(&ex.mask[i * SLOTS_PER_HOUR..(i + 1) * SLOTS_PER_HOUR]);
        w.push(ex.w[i]);
    }
    (
        tensor2(x, b, N_FEATURES, device),
        tensor2(y, b, SLOTS_PER_HOUR, device),
        tensor2(m, b, SLOTS_PER_HOUR, device),
        tensor2(w, b, 1, device),
    )
}

/// Rows per batch when the calibration split is scored.
const EVAL_CHUNK: usize = 4096;

fn eval_loss(net: &QuantileMlp, ex: &Examples, device: &Device) -> f64 {
    let idx: Vec<usize> = (0..ex.len()).collect();
    let mut sum = 0.0;
    let mut wsum = 0.0;
    for chunk in idx.chunks(EVAL_CHUNK) {
        let (x, y, m, _) = gather(ex, chunk, device);
        let w = tensor2(vec![1.0; chunk.len()], chunk.len(), 1, device);
        let wm: f32 = m.clone().sum().into_scalar();
        let l: f32 = pinball_loss(net.forward(x), y, m, w).into_scalar();
        sum += f64::from(l) * f64::from(wm);
        wsum += f64::from(wm);
    }
    sum / wsum.max(1.0)
}

/// Fit the per level calibration (shrink exponent and factor) for regular
/// and for after-gap examples on the calibration split. For each level the
/// factor makes the calibration coverage exactly `p`; the exponent is the
/// one (from a grid) with the least relative slack at that coverage whose
/// pinball loss is within `tol` of the unshrunk one.
fn calibration_factors(
    model: &LearnedForecaster,
    ex: &Examples,
    tol: f64,
    progress: &mut dyn FnMut(&str),
) -> (Calibration, Calibration) {
    let n = ex.len();
    let raw: Vec<Quantiles> = (0..n)
        .collect::<Vec<_>>()
        .chunks(EVAL_CHUNK)
        .flat_map(|c| {
            let mut x = Vec::with_capacity(c.len() * N_FEATURES);
            for &i in c {
                x.extend_from_slice(&ex.x[i * N_FEATURES..(i + 1) * N_FEATURES]);
            }
            let scales: Vec<f64> = c.iter().map(|&i| ex.scale[i]).collect();
            model.predict_raw(x, &scales)
        })
        .collect();
    let mut group = |restart: bool| {
        let mut out = Calibration::default();
        for (k, &p) in LEVELS.iter().enumerate() {
            let mut ys = Vec::new();
            let mut qs = Vec::new();
            let mut ss = Vec::new();
            for (((q, targets), _), &s) in raw
                .iter()
                .zip(&ex.raw_targets)
                .zip(&ex.restart)
                .zip(&ex.scale)
                .filter(|((_, r), _)| **r == restart)
            {
                for &y in targets {
                    ys.push(y);
                    qs.push(q.0[k]);
                    ss.push(s);
                }
            }
            if ys.is_empty() {
                continue;
            }
            let betas: &[f64] = if k == 0 {
                &[1.0]
            } else {
                &[1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 1.1, 1.2]
            };
            let mut results = Vec::new();
            for &beta in betas {
                let shrunk: Vec<f64> = qs
                    .iter()
                    .zip(&ss)
                    .map(|(&q, &s)| shrink(q, s, beta))
                    .collect();
                let Some(c) =
                    equal_coverage_factor(&ys, shrunk.iter().copied(), p).filter(|&c| c > 0.0)
                else {
                    continue;
                };
                let (mut pin, mut slack, mut ycov) = (0.0, 0.0, 0.0);
                for (&y, &q) in ys.iter().zip(&shrunk) {
                    let q = c * q;
                    pin += pinball(p, y, q);
                    if y <= q {
                        slack += q - y;
                        ycov += y;
                    }
                }
                results.push((beta, c, pin / ys.len() as f64, slack / ycov.max(1e-12)));
            }
            let Some(&(_, _, pin1, _)) = results.first() else {
                continue;
            };
            let best = results
                .iter()
                .filter(|r| r.2 <= pin1 * (1.0 + tol))
                .min_by(|a, b| a.3.total_cmp(&b.3))
                .copied();
            progress(&format!(
                "calibration p{} {}: {}",
                p * 100.0,
                if restart { "after gap" } else { "regular" },
                results
                    .iter()
                    .map(|r| format!(
                        "beta {:.1}: c {:.3} pinball {:.4} rel.slack {:.4}",
                        r.0, r.1, r.2, r.3
                    ))
                    .collect::<Vec<_>>()
                    .join("; ")
            ));
            if let Some((beta, c, _, _)) = best {
                out.factor[k] = c;
                out.shrink[k] = beta;
            }
        }
        out
    };
    let a = group(false);
    let b = group(true);
    (a, b)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::trace::{Metric, Series};

    fn dataset(n: usize) -> Dataset {
        let mut rng = Rng::new(3);
        Dataset {
            name: "synthetic".into(),
            path: "synthetic".into(),
            series: (0..n)
                .map(|i| Series {
                    id: format!("s{i}"),
                    split_key: format!("s{i}"),
                    statics: Statics::default(),
                    metrics: vec![(Metric::CpuPct, synthetic_grid(&mut rng))],
                })
                .collect(),
        }
    }

    /// Raw outputs of a model on the first rows of synthetic examples.
    fn outputs(m: &LearnedForecaster) -> Vec<f64> {
        let ex = synthetic_examples(32, 32, 5);
        m.predict_raw(ex.x.clone(), &ex.scale)
            .iter()
            .flat_map(|q| q.0)
            .collect()
    }

    #[test]
    fn fine_tuning_starts_from_the_given_weights_and_moves_them() {
        let ds = [dataset(6)];
        let cfg = TrainConfig {
            hidden: 8,
            epochs: 1,
            max_examples_per_dataset: 400,
            threads: 1,
            ..TrainConfig::default()
        };
        let (base, _) = train(&ds, &cfg, &mut |_| {}).unwrap();
        let before = outputs(&base);
        // A learning rate too small to move anything: the outputs are the
        // starting model's (a fresh network's would be far off).
        let still = TrainConfig {
            lr: 1e-12,
            hidden: 64,
            ..cfg.clone()
        };
        let (same, _) = fine_tune(&ds, &still, &base, &mut |_| {}).unwrap();
        assert_eq!(same.meta.net, base.meta.net, "the model's width wins");
        let rel = |a: &[f64], b: &[f64]| {
            a.iter()
                .zip(b)
                .map(|(x, y)| (x - y).abs() / x.abs().max(1e-6))
                .fold(0.0f64, f64::max)
        };
        assert!(rel(&before, &outputs(&same)) < 1e-4);
        let (fresh, _) = train(
            &ds,
            &TrainConfig {
                lr: 1e-12,
                seed: 9,
                ..cfg.clone()
            },
            &mut |_| {},
        )
        .unwrap();
        assert!(rel(&before, &outputs(&fresh)) > 1e-2);
        // An ordinary learning rate moves the weights: gradients flow.
        let (moved, _) = fine_tune(&ds, &cfg, &base, &mut |_| {}).unwrap();
        assert!(rel(&before, &outputs(&moved)) > 1e-4);
    }
}
