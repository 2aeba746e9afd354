//! GPU offload of the model's batch kernels: batch inference and training
//! epochs, on the CPU (burn `flex`) or on a GPU (burn `wgpu`, Vulkan at run
//! time), with the same weights on both.
//!
//! Which one runs is chosen per call by batch size against a crossover
//! that is *measured* on this host ([`calibrate`]): the smallest measured
//! batch from which the GPU was faster at every larger measured batch. The
//! measurement is stored as JSON ([`Crossover`]) and is only trusted on the
//! host, CPU, adapter, driver and network width it was measured with.
//!
//! The GPU path needs the `gpu` cargo feature (it pulls in wgpu and is heavy
//! to build). Without it, or when no Vulkan adapter can be opened, [`Offload`]
//! says why in one line and everything runs on the CPU.
//!
//! A software Vulkan device (Mesa's lavapipe, `device_type = Cpu`) works as an
//! adapter and proves the GPU code path computes the same numbers, but its
//! timings are CPU emulation: [`GpuMode::Auto`] never picks one; only
//! [`GpuMode::On`] does.

use std::fmt;
use std::path::Path;
use std::str::FromStr;
use std::sync::OnceLock;
use std::time::Instant;

use burn::module::Module;
use burn::optim::AdamConfig;
use burn::prelude::*;
use serde::{Deserialize, Serialize};

use crate::error::{ModelsError, Result};
use crate::features::N_FEATURES;
use crate::model::LearnedForecaster;
use crate::nn::{NetSpec, QuantileMlp, tensor2};
use crate::train::{Examples, Rng, run_epoch, synthetic_examples};

/// Whether the host lets the companion use a GPU (`--gpu auto|off|on`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum GpuMode {
    /// Use a hardware GPU adapter when one can be opened (treated as free
    /// and reserved for the host until the GPU ledger says otherwise);
    /// never a software (CPU-emulated) adapter.
    #[default]
    Auto,
    /// Never use a GPU.
    Off,
    /// A GPU is reserved for the host: use whatever adapter opens, a
    /// software one included.
    On,
}

impl FromStr for GpuMode {
    type Err = ModelsError;

    fn from_str(s: &str) -> Result<Self> {
        match s {
            "auto" => Ok(GpuMode::Auto),
            "off" => Ok(GpuMode::Off),
            "on" => Ok(GpuMode::On),
            other => Err(ModelsError::InvalidArgument(format!(
                "GPU mode {other:?}: expected auto, off or on"
            ))),
        }
    }
}

impl fmt::Display for GpuMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            GpuMode::Auto => "auto",
            GpuMode::Off => "off",
            GpuMode::On => "on",
        })
    }
}

/// Where a kernel runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Target {
    /// burn `flex` on the host CPU.
    Cpu,
    /// burn `wgpu` on the opened adapter.
    Gpu,
}

/// What the opened adapter says about itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GpuInfo {
    /// Adapter name (e.g. `NVIDIA H100 80GB HBM3`, `llvmpipe (LLVM 15.0.6, 256 bits)`).
    pub name: String,
    /// Graphics API (`Vulkan`, `Gl`, ...).
    pub backend: String,
    /// wgpu's device type (`DiscreteGpu`, `IntegratedGpu`, `Cpu`, ...).
    pub device_type: String,
    /// Driver name and version information.
    pub driver: String,
    /// The adapter is a CPU emulation of a GPU (lavapipe, llvmpipe).
    pub software: bool,
}

impl fmt::Display for GpuInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} ({}, {}, {})",
            self.name, self.backend, self.device_type, self.driver
        )?;
        if self.software {
            f.write_str(" [software-emulated: CPU, not a GPU]")?;
        }
        Ok(())
    }
}

/// An opened GPU adapter and its burn device.
#[derive(Debug, Clone)]
pub struct Gpu {
    device: Device,
    info: GpuInfo,
}

impl Gpu {
    /// The burn device (inference; call `.autodiff()` for training).
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// What the adapter says about itself.
    pub fn info(&self) -> &GpuInfo {
        &self.info
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(c) = src {
        s.push_str(": ");
        s.push_str(&c.to_string());
        src = c.source();
    }
    s
}

/// Whether this build has the GPU backend at all.
pub fn gpu_compiled() -> bool {
    cfg!(feature = "gpu")
}

static GPU: OnceLock<std::result::Result<Gpu, String>> = OnceLock::new();

/// Open the GPU adapter (once per process; later calls return the same
/// answer). Errors say why there is none, ready to follow "unsupported
/// here: ".
pub fn open_gpu() -> std::result::Result<Gpu, String> {
    GPU.get_or_init(open_gpu_uncached).clone()
}

#[cfg(feature = "gpu")]
fn open_gpu_uncached() -> std::result::Result<Gpu, String> {
    // wgpu reports a missing loader or driver as an error; the unwind guard
    // is for the odd driver that panics instead: no GPU, not a dead process.
    let opened = std::panic::catch_unwind(|| Device::wgpu_options().init_with_setup());
    match opened {
        Ok(Ok((device, setup))) => {
            let i = setup.adapter.get_info();
            let driver = [i.driver.as_str(), i.driver_info.as_str()]
                .iter()
                .filter(|s| !s.is_empty())
                .copied()
                .collect::<Vec<_>>()
                .join(" ");
            let info = GpuInfo {
                name: i.name.clone(),
                backend: format!("{:?}", i.backend),
                device_type: format!("{:?}", i.device_type),
                driver,
                software: i.device_type == burn::tensor::wgpu::wgpu::DeviceType::Cpu,
            };
            tracing::info!(adapter = %info, "GPU adapter opened");
            Ok(Gpu { device, info })
        }
        Ok(Err(e)) => Err(format!(
            "no usable GPU adapter ({e}); Vulkan needs libvulkan.so.1 and a driver ICD \
             (on NVIDIA hosts the driver's nvidia_icd.json)"
        )),
        Err(_) => Err("the wgpu runtime panicked while opening an adapter".into()),
    }
}

#[cfg(not(feature = "gpu"))]
fn open_gpu_uncached() -> std::result::Result<Gpu, String> {
    Err(
        "this build has no GPU backend (built without the `gpu` feature; \
         rebuild with `cargo build --release --features gpu`)"
            .into(),
    )
}

/// One measured batch size: median wall time on each side.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct SizeTiming {
    /// Rows (inference) or mini-batch size (training step).
    pub size: usize,
    /// CPU median, ms.
    pub cpu_ms: f64,
    /// GPU median, ms.
    pub gpu_ms: f64,
}

/// The smallest measured size from which the GPU was faster at every
/// larger measured size; `None` when it was not faster at the largest.
pub fn crossover_of(timings: &[SizeTiming]) -> Option<usize> {
    let mut sorted: Vec<SizeTiming> = timings.to_vec();
    sorted.sort_by_key(|t| t.size);
    let mut from = None;
    for t in sorted.iter().rev() {
        if t.gpu_ms < t.cpu_ms {
            from = Some(t.size);
        } else {
            break;
        }
    }
    from
}

/// Where `prescient bench offload` stores the crossover and `--gpu`
/// reads it by default.
pub const DEFAULT_CROSSOVER_FILE: &str = "target/bench/offload-crossover.json";

/// Version of the crossover file.
pub const CROSSOVER_FORMAT: u32 = 1;

/// A crossover measured on one host with one adapter.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Crossover {
    /// [`CROSSOVER_FORMAT`].
    pub format: u32,
    /// Where it was measured: host name, CPU model and thread count.
    pub host: String,
    /// The adapter it was measured with.
    pub adapter: GpuInfo,
    /// Hidden width of the network it was measured with.
    pub hidden: usize,
    /// When, seconds since the Unix epoch.
    pub measured_unix_s: u64,
    /// Batch inference (upload, forward, read back) per row count.
    pub inference: Vec<SizeTiming>,
    /// Measured crossover for inference, rows.
    pub inference_min_rows: Option<usize>,
    /// One training step (forward, backward, Adam) per mini-batch size.
    pub training: Vec<SizeTiming>,
    /// Measured crossover for training, mini-batch size.
    pub training_min_batch: Option<usize>,
}

impl Crossover {
    /// Read a crossover file.
    pub fn load(path: &Path) -> Result<Self> {
        let bytes = std::fs::read(path).map_err(|e| ModelsError::io(path, e))?;
        let c: Crossover = serde_json::from_slice(&bytes)?;
        if c.format != CROSSOVER_FORMAT {
            return Err(ModelsError::InvalidArgument(format!(
                "{}: crossover format {}, this build reads {CROSSOVER_FORMAT}",
                path.display(),
                c.format
            )));
        }
        Ok(c)
    }

    /// Write it (pretty JSON), creating the directory.
    pub fn save(&self, path: &Path) -> Result<()> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| ModelsError::io(dir, e))?;
        }
        let json = serde_json::to_vec_pretty(self)?;
        std::fs::write(path, json).map_err(|e| ModelsError::io(path, e))
    }

    /// Why this measurement does not apply to `host` / `adapter` / `hidden`
    /// (`None`: it applies).
    pub fn mismatch(&self, host: &str, adapter: &GpuInfo, hidden: usize) -> Option<String> {
        if self.host != host {
            Some(format!("measured on {:?}, this is {host:?}", self.host))
        } else if &self.adapter != adapter {
            Some(format!("measured with {}, this is {adapter}", self.adapter))
        } else if self.hidden != hidden {
            Some(format!(
                "measured for hidden width {}, this model has {hidden}",
                self.hidden
            ))
        } else {
            None
        }
    }
}

/// This host as a crossover file names it: host name, CPU model, threads.
pub fn host_identity() -> String {
    let name = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown-host".into());
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let threads = std::thread::available_parallelism().map_or(1, usize::from);
    format!("{name}; {cpu} x{threads}")
}

/// Pure device choice from plain inputs (what [`Offload`] decides with).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Chooser {
    /// The operator's mode.
    pub mode: GpuMode,
    /// `None`: no adapter; `Some(true)`: a software (CPU-emulated) adapter.
    pub adapter_software: Option<bool>,
    /// Measured inference crossover (rows); `None`: never (or not measured).
    pub inference_min_rows: Option<usize>,
    /// Measured training crossover (mini-batch size).
    pub training_min_batch: Option<usize>,
}

impl Chooser {
    fn gpu_allowed(&self) -> bool {
        match (self.mode, self.adapter_software) {
            (GpuMode::Off, _) | (_, None) => false,
            (GpuMode::Auto, Some(software)) => !software,
            (GpuMode::On, Some(_)) => true,
        }
    }

    /// Where a batch inference of `rows` rows runs.
    pub fn inference(&self, rows: usize) -> Target {
        match self.inference_min_rows {
            Some(min) if self.gpu_allowed() && rows >= min => Target::Gpu,
            _ => Target::Cpu,
        }
    }

    /// Where training with mini-batches of `batch` runs.
    pub fn training(&self, batch: usize) -> Target {
        match self.training_min_batch {
            Some(min) if self.gpu_allowed() && batch >= min => Target::Gpu,
            _ => Target::Cpu,
        }
    }
}

/// The offload decision for this process: the mode, the opened adapter (if
/// any) and its measured crossover.
#[derive(Debug, Clone)]
pub struct Offload {
    chooser: Chooser,
    gpu: Option<Gpu>,
    crossover: Option<Crossover>,
    line: String,
}

impl Offload {
    /// Everything on the CPU, with the reason.
    pub fn cpu_only(reason: &str) -> Self {
        Offload {
            chooser: Chooser {
                mode: GpuMode::Off,
                adapter_software: None,
                inference_min_rows: None,
                training_min_batch: None,
            },
            gpu: None,
            crossover: None,
            line: format!("offload: CPU only: {reason}"),
        }
    }

    /// Decide for `mode`: open the adapter unless `off`, then use the
    /// crossover stored in `crossover_file` when it was measured on this
    /// host with this adapter and width; otherwise, if `calibrate_missing`,
    /// measure it now and store it there. Never fails for want of a GPU:
    /// that is reported in [`Offload::line`] and the CPU is used.
    pub fn open(
        mode: GpuMode,
        crossover_file: &Path,
        hidden: usize,
        calibrate_missing: bool,
    ) -> Self {
        if mode == GpuMode::Off {
            return Self::cpu_only("--gpu off");
        }
        let gpu = match open_gpu() {
            Ok(g) => g,
            Err(why) => return Self::cpu_only(&format!("GPU unsupported here: {why}")),
        };
        if mode == GpuMode::Auto && gpu.info.software {
            return Self::cpu_only(&format!(
                "the only adapter is software-emulated ({}); `--gpu on` uses it anyway",
                gpu.info.name
            ));
        }
        let host = host_identity();
        let stored = match Crossover::load(crossover_file) {
            Ok(c) => match c.mismatch(&host, &gpu.info, hidden) {
                None => Ok(c),
                Some(why) => Err(format!("stale crossover file: {why}")),
            },
            Err(e) => Err(format!("no crossover: {}", error_chain(&e))),
        };
        let crossover = match stored {
            Ok(c) => c,
            Err(why) if calibrate_missing => {
                tracing::info!(file = %crossover_file.display(), "{why}; measuring it now");
                match calibrate(&gpu, hidden, &CalibrationPlan::default()) {
                    Ok(c) => {
                        if let Err(e) = c.save(crossover_file) {
                            tracing::warn!(error = %error_chain(&e), "crossover not stored");
                        }
                        c
                    }
                    Err(e) => {
                        return Self::cpu_only(&format!(
                            "GPU {} failed its calibration: {}",
                            gpu.info.name,
                            error_chain(&e)
                        ));
                    }
                }
            }
            Err(why) => {
                return Self::cpu_only(&format!(
                    "GPU {} present but {why} (run `prescient bench offload`)",
                    gpu.info.name
                ));
            }
        };
        Self::with_crossover(mode, gpu, crossover)
    }

    /// Decide for `mode` with an adapter and a measurement in hand.
    pub fn with_crossover(mode: GpuMode, gpu: Gpu, crossover: Crossover) -> Self {
        let chooser = Chooser {
            mode,
            adapter_software: Some(gpu.info.software),
            inference_min_rows: crossover.inference_min_rows,
            training_min_batch: crossover.training_min_batch,
        };
        let at = |v: Option<usize>, what: &str| match v {
            Some(n) => format!("{what} >= {n}"),
            None => format!("{what}: never (CPU faster at every measured size)"),
        };
        let line = format!(
            "offload: GPU {} for inference batches {}, training mini-batches {}; CPU below",
            gpu.info,
            at(crossover.inference_min_rows, "of rows"),
            at(crossover.training_min_batch, "of size")
        );
        Offload {
            chooser,
            gpu: Some(gpu),
            crossover: Some(crossover),
            line,
        }
    }

    /// One line saying what was decided and why.
    pub fn line(&self) -> &str {
        &self.line
    }

    /// The decision rules, as plain data.
    pub fn chooser(&self) -> Chooser {
        self.chooser
    }

    /// The opened adapter, when the decision may use it.
    pub fn gpu(&self) -> Option<&Gpu> {
        self.gpu.as_ref()
    }

    /// The measurement behind the decision.
    pub fn crossover(&self) -> Option<&Crossover> {
        self.crossover.as_ref()
    }

    /// The device a batch inference of `rows` rows runs on.
    pub fn inference_device(&self, rows: usize) -> Device {
        match (self.chooser.inference(rows), &self.gpu) {
            (Target::Gpu, Some(g)) => g.device.clone(),
            _ => Device::flex(),
        }
    }

    /// The device training with mini-batches of `batch` runs on (without
    /// autodiff; the trainer adds it).
    pub fn training_device(&self, batch: usize) -> Device {
        match (self.chooser.training(batch), &self.gpu) {
            (Target::Gpu, Some(g)) => g.device.clone(),
            _ => Device::flex(),
        }
    }
}

/// A synthetic fleet's training examples, built with the real feature code:
/// the offload benchmark's and the calibration's workload.
#[derive(Debug)]
pub struct OffloadWorkload {
    ex: Examples,
}

impl OffloadWorkload {
    /// `rows` examples from synthetic VMs (8 days of 5-minute usage each:
    /// a daily cycle, noise, bursts, idle VMs and missing samples). When
    /// more rows are asked for than `distinct` examples exist, the examples
    /// repeat (the kernels' cost does not depend on the values).
    pub fn synthetic(rows: usize, distinct: usize, seed: u64) -> Self {
        OffloadWorkload {
            ex: synthetic_examples(rows, distinct.max(1), seed),
        }
    }

    /// Rows.
    pub fn rows(&self) -> usize {
        self.ex.len()
    }

    /// Feature rows, row-major `[rows, N_FEATURES]`.
    pub fn features(&self) -> &[f32] {
        &self.ex.x
    }
}

/// The model's weights, kept on the CPU, to be placed on either device.
#[derive(Debug, Clone)]
pub struct Kernels {
    net: QuantileMlp,
    spec: NetSpec,
}

impl Kernels {
    /// A freshly initialised network (seeded).
    pub fn new(hidden: usize, seed: u64) -> Self {
        let device = Device::flex();
        device.seed(seed);
        let spec = NetSpec {
            inputs: N_FEATURES,
            hidden,
        };
        Kernels {
            net: QuantileMlp::new(spec, &device),
            spec,
        }
    }

    /// The weights of a trained model.
    pub fn from_model(model: &LearnedForecaster) -> Self {
        Kernels {
            net: model.home_net().clone().to_device(&Device::flex()),
            spec: model.meta.net,
        }
    }

    /// Hidden width.
    pub fn hidden(&self) -> usize {
        self.spec.hidden
    }

    /// A copy of the weights on `gpu`, or on the CPU for `None`.
    pub fn place(&self, gpu: Option<&Gpu>) -> PlacedNet {
        self.place_on(&device_of(gpu))
    }

    fn place_on(&self, device: &Device) -> PlacedNet {
        PlacedNet {
            net: self.net.clone().to_device(device),
            device: device.clone(),
        }
    }

    /// One training epoch over `wl` on `gpu` (the CPU for `None`): Adam,
    /// the trainer's step function, mini-batches of `batch`, learning rate
    /// `lr`, the example order shuffled with `seed`, starting from these
    /// weights. Returns the trained weights (back on the CPU) and the mean
    /// training loss.
    pub fn train_epoch(
        &self,
        gpu: Option<&Gpu>,
        wl: &OffloadWorkload,
        batch: usize,
        lr: f64,
        seed: u64,
    ) -> (Kernels, f64) {
        self.train_epoch_on(&device_of(gpu), wl, batch, lr, seed)
    }

    fn train_epoch_on(
        &self,
        device: &Device,
        wl: &OffloadWorkload,
        batch: usize,
        lr: f64,
        seed: u64,
    ) -> (Kernels, f64) {
        let train_device = device.clone().autodiff();
        // A module made for inference starts in validation state: `train`
        // turns gradient tracking on, on the device it was forked to.
        let net = self.net.clone().fork(&train_device).train();
        let mut optim = AdamConfig::new().init();
        let mut order: Vec<usize> = (0..wl.rows()).collect();
        let mut rng = Rng::new(seed);
        for i in (1..order.len()).rev() {
            let j = rng.below(i + 1);
            order.swap(i, j);
        }
        let (net, loss) = run_epoch(net, &mut optim, &wl.ex, &order, batch, lr, &train_device);
        let trained = net.valid().to_device(&Device::flex());
        (
            Kernels {
                net: trained,
                spec: self.spec,
            },
            loss,
        )
    }
}

fn device_of(gpu: Option<&Gpu>) -> Device {
    gpu.map_or_else(Device::flex, |g| g.device.clone())
}

/// A network placed on one device.
#[derive(Debug)]
pub struct PlacedNet {
    net: QuantileMlp,
    device: Device,
}

impl PlacedNet {
    /// Quantiles in z space, row-major `[rows, 3]`, for feature rows
    /// `x` (`[rows, N_FEATURES]`): upload, forward, read back.
    pub fn infer(&self, x: &[f32], rows: usize) -> Result<Vec<f32>> {
        if x.len() != rows * N_FEATURES {
            return Err(ModelsError::InvalidArgument(format!(
                "{} values for {rows} rows of {N_FEATURES} features",
                x.len()
            )));
        }
        if rows == 0 {
            return Ok(Vec::new());
        }
        let out = self
            .net
            .forward(tensor2(x.to_vec(), rows, N_FEATURES, &self.device));
        out.into_data()
            .try_to_vec::<f32>()
            .map_err(|e| ModelsError::Weights(format!("reading results back: {e:?}")))
    }
}

/// Largest elementwise relative error of `b` against the reference `a`:
/// `max |b - a| / max(|a|, floor)`, and the largest absolute error. The floor
/// keeps values near zero from turning rounding into huge ratios.
pub fn max_relative_error(a: &[f32], b: &[f32], floor: f64) -> (f64, f64) {
    let mut rel = 0.0f64;
    let mut abs = 0.0f64;
    for (&x, &y) in a.iter().zip(b) {
        let d = (f64::from(y) - f64::from(x)).abs();
        if !d.is_finite() {
            return (f64::INFINITY, f64::INFINITY);
        }
        abs = abs.max(d);
        rel = rel.max(d / f64::from(x).abs().max(floor));
    }
    if a.len() != b.len() {
        return (f64::INFINITY, f64::INFINITY);
    }
    (rel, abs)
}

/// The floor of [`max_relative_error`] used by the benchmark and tests.
pub const REL_ERR_FLOOR: f64 = 1e-3;

/// What a calibration measures.
#[derive(Debug, Clone)]
pub struct CalibrationPlan {
    /// Inference batch sizes, rows.
    pub inference_rows: Vec<usize>,
    /// Training mini-batch sizes.
    pub training_batches: Vec<usize>,
    /// Timed repetitions per size (after one untimed warm-up); the median
    /// is kept.
    pub reps: usize,
    /// Training steps per timed repetition.
    pub steps: usize,
}

impl Default for CalibrationPlan {
    fn default() -> Self {
        CalibrationPlan {
            inference_rows: vec![64, 256, 1024, 4096, 16_384, 65_536],
            training_batches: vec![128, 512, 2048, 8192],
            reps: 3,
            steps: 4,
        }
    }
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n == 0 {
        f64::NAN
    } else if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// Time `f` `reps` times after one warm-up call; median ms.
fn time_ms(reps: usize, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    f()?;
    let mut v = Vec::with_capacity(reps);
    for _ in 0..reps.max(1) {
        let t = Instant::now();
        f()?;
        v.push(t.elapsed().as_secs_f64() * 1e3);
    }
    Ok(median(&mut v))
}

/// Measure batch inference and training steps on the CPU and on `gpu`,
/// interleaved size by size, and derive both crossovers.
pub fn calibrate(gpu: &Gpu, hidden: usize, plan: &CalibrationPlan) -> Result<Crossover> {
    let max_rows = plan.inference_rows.iter().copied().max().unwrap_or(0);
    let max_batch = plan.training_batches.iter().copied().max().unwrap_or(0);
    let wl = OffloadWorkload::synthetic(
        max_rows.max(max_batch * plan.steps.max(1)),
        4096,
        0x00ff_10ad,
    );
    let kernels = Kernels::new(hidden, 7);
    let cpu = Device::flex();
    let on_cpu = kernels.place_on(&cpu);
    let on_gpu = kernels.place_on(&gpu.device);
    let mut inference = Vec::new();
    for &rows in &plan.inference_rows {
        let x = &wl.features()[..rows * N_FEATURES];
        let cpu_ms = time_ms(plan.reps, || on_cpu.infer(x, rows).map(drop))?;
        let gpu_ms = time_ms(plan.reps, || on_gpu.infer(x, rows).map(drop))?;
        inference.push(SizeTiming {
            size: rows,
            cpu_ms,
            gpu_ms,
        });
    }
    let mut training = Vec::new();
    for &batch in &plan.training_batches {
        let steps = OffloadWorkload {
            ex: wl.ex.head(batch * plan.steps.max(1)),
        };
        let per_step = |d: &Device| {
            time_ms(plan.reps, || {
                kernels.train_epoch_on(d, &steps, batch, 1e-3, 1);
                Ok(())
            })
            .map(|ms| ms / plan.steps.max(1) as f64)
        };
        let cpu_ms = per_step(&cpu)?;
        let gpu_ms = per_step(&gpu.device)?;
        training.push(SizeTiming {
            size: batch,
            cpu_ms,
            gpu_ms,
        });
    }
    Ok(Crossover {
        format: CROSSOVER_FORMAT,
        host: host_identity(),
        adapter: gpu.info.clone(),
        hidden,
        measured_unix_s: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
        inference_min_rows: crossover_of(&inference),
        inference,
        training_min_batch: crossover_of(&training),
        training,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(size: usize, cpu_ms: f64, gpu_ms: f64) -> SizeTiming {
        SizeTiming {
            size,
            cpu_ms,
            gpu_ms,
        }
    }

    #[test]
    fn crossover_is_where_gpu_stays_faster() {
        let v = [
            t(64, 0.1, 1.0),
            t(256, 0.4, 1.1),
            t(1024, 1.5, 1.2),
            t(4096, 6.0, 1.5),
        ];
        assert_eq!(crossover_of(&v), Some(1024));
        // Order of measurement does not matter.
        let mut r = v;
        r.reverse();
        assert_eq!(crossover_of(&r), Some(1024));
    }

    #[test]
    fn crossover_ignores_a_fast_gpu_blip_below_a_slow_size() {
        // Faster at 256, slower again at 1024: the crossover is above 1024.
        let v = [t(256, 1.0, 0.5), t(1024, 2.0, 2.5), t(4096, 8.0, 3.0)];
        assert_eq!(crossover_of(&v), Some(4096));
    }

    #[test]
    fn crossover_none_when_gpu_loses_at_the_largest_size() {
        assert_eq!(crossover_of(&[t(64, 0.1, 1.0), t(65536, 5.0, 6.0)]), None);
        assert_eq!(crossover_of(&[]), None);
    }

    fn chooser(mode: GpuMode, software: Option<bool>) -> Chooser {
        Chooser {
            mode,
            adapter_software: software,
            inference_min_rows: Some(4096),
            training_min_batch: Some(512),
        }
    }

    #[test]
    fn chooser_uses_gpu_only_at_or_above_the_crossover() {
        let c = chooser(GpuMode::Auto, Some(false));
        assert_eq!(c.inference(4095), Target::Cpu);
        assert_eq!(c.inference(4096), Target::Gpu);
        assert_eq!(c.inference(100_000), Target::Gpu);
        assert_eq!(c.training(256), Target::Cpu);
        assert_eq!(c.training(512), Target::Gpu);
    }

    #[test]
    fn chooser_off_or_no_adapter_is_cpu() {
        for c in [
            chooser(GpuMode::Off, Some(false)),
            chooser(GpuMode::Auto, None),
            chooser(GpuMode::On, None),
        ] {
            assert_eq!(c.inference(1 << 20), Target::Cpu, "{c:?}");
            assert_eq!(c.training(1 << 20), Target::Cpu, "{c:?}");
        }
    }

    #[test]
    fn chooser_auto_never_picks_a_software_adapter_but_on_does() {
        assert_eq!(
            chooser(GpuMode::Auto, Some(true)).inference(1 << 20),
            Target::Cpu
        );
        assert_eq!(
            chooser(GpuMode::On, Some(true)).inference(1 << 20),
            Target::Gpu
        );
    }

    #[test]
    fn chooser_without_a_crossover_is_cpu() {
        let c = Chooser {
            inference_min_rows: None,
            training_min_batch: None,
            ..chooser(GpuMode::On, Some(false))
        };
        assert_eq!(c.inference(1 << 20), Target::Cpu);
        assert_eq!(c.training(1 << 20), Target::Cpu);
    }

    #[test]
    fn gpu_mode_parses_and_rejects() {
        assert_eq!("auto".parse::<GpuMode>().ok(), Some(GpuMode::Auto));
        assert_eq!("off".parse::<GpuMode>().ok(), Some(GpuMode::Off));
        assert_eq!("on".parse::<GpuMode>().ok(), Some(GpuMode::On));
        let e = "yes".parse::<GpuMode>().err().map(|e| e.to_string());
        assert!(e.is_some_and(|m| m.contains("auto, off or on")));
    }

    fn info(name: &str) -> GpuInfo {
        GpuInfo {
            name: name.into(),
            backend: "Vulkan".into(),
            device_type: "DiscreteGpu".into(),
            driver: "NVIDIA 570".into(),
            software: false,
        }
    }

    fn crossover() -> Crossover {
        Crossover {
            format: CROSSOVER_FORMAT,
            host: "h1; cpu x16".into(),
            adapter: info("A"),
            hidden: 128,
            measured_unix_s: 1,
            inference: vec![t(64, 0.1, 1.0), t(4096, 6.0, 1.5)],
            inference_min_rows: Some(4096),
            training: vec![t(512, 10.0, 2.0)],
            training_min_batch: Some(512),
        }
    }

    #[test]
    fn crossover_file_round_trips_and_applies_only_where_measured() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/crossover.json");
        let c = crossover();
        c.save(&path).unwrap();
        let back = Crossover::load(&path).unwrap();
        assert_eq!(back, c);
        assert_eq!(back.mismatch("h1; cpu x16", &info("A"), 128), None);
        assert!(back.mismatch("h2; cpu x16", &info("A"), 128).is_some());
        assert!(back.mismatch("h1; cpu x16", &info("B"), 128).is_some());
        assert!(back.mismatch("h1; cpu x16", &info("A"), 64).is_some());
    }

    #[test]
    fn crossover_file_of_another_format_or_garbage_is_rejected() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.json");
        let mut c = crossover();
        c.format = 99;
        std::fs::write(&path, serde_json::to_vec(&c).unwrap()).unwrap();
        let e = Crossover::load(&path).unwrap_err().to_string();
        assert!(e.contains("format 99"), "{e}");
        std::fs::write(&path, b"not json").unwrap();
        assert!(Crossover::load(&path).is_err());
    }

    #[test]
    fn offload_with_crossover_decides_by_size_and_says_so() {
        let gpu = Gpu {
            device: Device::flex(),
            info: info("A"),
        };
        let o = Offload::with_crossover(GpuMode::Auto, gpu, crossover());
        assert!(o.line().contains(">= 4096"), "{}", o.line());
        assert_eq!(o.chooser().inference(10_000), Target::Gpu);
        assert_eq!(o.chooser().inference(100), Target::Cpu);
        let off = Offload::cpu_only("--gpu off");
        assert_eq!(off.line(), "offload: CPU only: --gpu off");
        assert_eq!(off.chooser().inference(1 << 20), Target::Cpu);
    }

    #[test]
    fn relative_error_uses_the_floor_near_zero() {
        let (rel, abs) = max_relative_error(&[1.0, 0.0, -2.0], &[1.001, 0.0005, -2.0], 1e-3);
        assert!((abs - 0.001).abs() < 1e-6, "{abs}");
        // 0.0005 / max(0, 1e-3) = 0.5 dominates 0.001 / 1.
        assert!((rel - 0.5).abs() < 1e-3, "{rel}");
        let (rel, _) = max_relative_error(&[1.0], &[f32::NAN], 1e-3);
        assert!(rel.is_infinite());
        let (rel, _) = max_relative_error(&[1.0, 2.0], &[1.0], 1e-3);
        assert!(rel.is_infinite());
    }

    #[test]
    fn cpu_training_epoch_moves_the_weights_and_is_repeatable() {
        let wl = OffloadWorkload::synthetic(1024, 1024, 1);
        assert_eq!(wl.rows(), 1024);
        let k = Kernels::new(16, 1);
        let x = &wl.features()[..64 * N_FEATURES];
        let before = k.place(None).infer(x, 64).unwrap();
        let (a, loss_a) = k.train_epoch(None, &wl, 256, 1e-2, 3);
        let (b, loss_b) = k.train_epoch(None, &wl, 256, 1e-2, 3);
        let after_a = a.place(None).infer(x, 64).unwrap();
        let after_b = b.place(None).infer(x, 64).unwrap();
        let (moved, _) = max_relative_error(&before, &after_a, REL_ERR_FLOOR);
        assert!(moved > 1e-3, "the epoch changed nothing ({moved})");
        assert!(loss_a.is_finite() && loss_a > 0.0, "{loss_a}");
        // Same weights, data, order and device: the same result.
        assert_eq!(after_a, after_b);
        assert_eq!(loss_a, loss_b);
    }

    #[test]
    fn synthetic_workload_repeats_its_distinct_rows() {
        let wl = OffloadWorkload::synthetic(300, 100, 5);
        assert_eq!(wl.rows(), 300);
        let f = wl.features();
        assert_eq!(f.len(), 300 * N_FEATURES);
        assert_eq!(f[..N_FEATURES], f[100 * N_FEATURES..101 * N_FEATURES]);
        assert!(f.iter().all(|v| v.is_finite()));
    }

    #[test]
    fn without_the_feature_or_an_adapter_open_says_why_and_uses_cpu() {
        let dir = tempfile::tempdir().unwrap();
        let o = Offload::open(GpuMode::Off, &dir.path().join("c.json"), 128, false);
        assert_eq!(o.line(), "offload: CPU only: --gpu off");
        if open_gpu().is_err() {
            let o = Offload::open(GpuMode::Auto, &dir.path().join("c.json"), 128, false);
            assert!(o.line().contains("GPU unsupported here: "), "{}", o.line());
            assert!(o.gpu().is_none());
            assert!(o.inference_device(1 << 20) == Device::flex());
        }
        if !gpu_compiled() {
            let why = open_gpu().unwrap_err();
            assert!(why.contains("without the `gpu` feature"), "{why}");
        }
    }
}
