//! Online learning in the daemon: usage samples to the store, the burn
//! model served beside the baselines, and a bounded retraining job.
//!
//! - **Samples**: the shaping loop hands every closed interval's usage of
//!   each VM (memory in use, CPU) and every forecast it served to a
//!   [`Online`] handle. `send` never blocks the caller: records go into a
//!   bounded queue (full: the record is dropped and counted) that a writer
//!   thread empties in batches, one SQLite transaction per batch, into the
//!   store's `samples` and `served_forecasts` tables (schema 3), pruning
//!   both by age and count (`[forecast] sample_retain_hours`,
//!   `sample_max_rows`, `forecast_max_rows`).
//! - **Serving**: the model file (`[forecast] model`, `serve --model`) is
//!   loaded at start. A file of another format version, a corrupted or a
//!   truncated one is rejected: one error line naming the file and the
//!   reason, `prescient_model_rejected_total{reason}`, and the daemon
//!   serves the baselines. A loaded model is one more candidate of each
//!   VM's `ForecasterSelector`, which serves it only where its measured
//!   pinball loss is below the best baseline's.
//! - **Retraining** ([`retrain_once`], run by [`Online::start`] on its own
//!   thread every `retrain_interval_s`, at `SCHED_IDLE` (nice 19 where that
//!   is refused), on a one-thread rayon pool, reading at most
//!   `retrain_max_samples` samples and optimising at most
//!   `retrain_max_seconds`): it scores the served model and every baseline
//!   on the latest held-out window of stored samples (`holdout_s`, the
//!   next-hour task of `EVALUATION.md` on the 5-minute grid); when the model
//!   is worse than the best baseline (or absent), it fine-tunes the served
//!   model (or trains a fresh one when none is served) on the samples
//!   before the window and installs it only if it beats both
//!   the old model and the best baseline on the window. Installing keeps
//!   the old file as `PATH.prev` (a rejected file goes to
//!   `PATH.rejected`); the new file replaces `PATH` by rename, so a failed
//!   or worse candidate never replaces it and a restart loads it.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use models::{
    Dataset, Forecaster, Grid, History, Horizon, LEVELS, LearnedForecaster, Metric, ModelsError,
    Quantiles, Series, SplitSpec, Statics, TrainConfig, next_hour_cases, pinball, slot_of,
};
use serde::{Deserialize, Serialize};

use crate::metrics::Metrics;
use crate::store::{ProfileStore, Sample, ServedForecast, StoreError, StorePolicy};

/// The metric the shaping loop forecasts and the model is trained on.
pub const MEM_METRIC: &str = "mem_mib";
/// The shaping loop's CPU samples (stored, not yet forecast by the model).
pub const CPU_METRIC: &str = "cpu_cores";

/// `[forecast]`: the model the daemon serves and its retraining.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ForecastConfig {
    /// The model file: loaded at start, replaced by retraining (the
    /// previous one kept as `PATH.prev`). Default: the store's path with
    /// `.model` appended.
    pub model: Option<PathBuf>,
    /// Outcomes of the model a VM needs before the selector may serve it.
    pub min_outcomes: u64,
    /// Seconds between retraining runs; 0 turns retraining off.
    pub retrain_interval_s: u64,
    /// Most samples one run reads (the newest).
    pub retrain_max_samples: usize,
    /// Most seconds one run optimises (the best epoch so far is kept).
    pub retrain_max_seconds: f64,
    /// Most epochs one run trains.
    pub retrain_epochs: usize,
    /// Share of one CPU a run may take while training (0.05 to 1): after
    /// each step it sleeps so that its CPU time stays at this share of its
    /// wall time. `SCHED_IDLE` alone still cost the hook path tail latency
    /// on a 2-CPU host (README, "Online learning").
    pub retrain_cpu_share: f64,
    /// Hidden width of a retrained model.
    pub retrain_hidden: usize,
    /// The held-out window: the latest this many seconds of samples are
    /// never trained on; every model is scored there.
    pub holdout_s: u64,
    /// Held-out decisions needed before a run scores or trains anything.
    pub min_holdout_cases: usize,
    /// Samples older than this are deleted, hours.
    pub sample_retain_hours: u64,
    /// Most sample rows kept (the oldest go first).
    pub sample_max_rows: u64,
    /// Most served-forecast rows kept (the oldest go first).
    pub forecast_max_rows: u64,
}

impl Default for ForecastConfig {
    fn default() -> Self {
        ForecastConfig {
            model: None,
            min_outcomes: 12,
            retrain_interval_s: 21_600,
            retrain_max_samples: 2_000_000,
            retrain_max_seconds: 120.0,
            retrain_epochs: 8,
            retrain_cpu_share: 0.25,
            retrain_hidden: 32,
            holdout_s: 21_600,
            min_holdout_cases: 24,
            sample_retain_hours: 336,
            sample_max_rows: 20_000_000,
            forecast_max_rows: 1_000_000,
        }
    }
}

impl ForecastConfig {
    /// The model file: `model`, else next to the store.
    pub fn model_path(&self, store: Option<&Path>) -> Option<PathBuf> {
        self.model.clone().or_else(|| {
            store.map(|s| {
                let mut p = s.as_os_str().to_owned();
                p.push(".model");
                PathBuf::from(p)
            })
        })
    }
}

/// What can go wrong in online learning.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum OnlineError {
    /// The store failed.
    #[error("store")]
    Store(#[from] StoreError),
    /// Training, scoring or the model file failed.
    #[error("model")]
    Model(#[from] ModelsError),
    /// Installing the new model file failed.
    #[error("cannot install the model at {path}")]
    Install {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A thread could not be started.
    #[error("cannot start the {what} thread")]
    Thread {
        /// Which.
        what: &'static str,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// A loaded model and its id.
#[derive(Debug)]
pub struct ServedModel {
    /// `model:<checksum prefix>@v<format version>`.
    pub id: String,
    /// Its file.
    pub path: PathBuf,
    forecaster: Mutex<LearnedForecaster>,
}

impl ServedModel {
    fn new(path: &Path, f: LearnedForecaster) -> Self {
        ServedModel {
            id: f.id(),
            path: path.to_path_buf(),
            forecaster: Mutex::new(f),
        }
    }

    /// Forecasts each history (next hour), in batches.
    pub fn forecast_batch(&self, hs: &[History<'_>]) -> Vec<Quantiles> {
        let f = self
            .forecaster
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        // Chunks below the size where the model splits the feature work
        // over two threads: the retraining job stays on one.
        hs.chunks(200)
            .flat_map(|c| f.forecast_batch(c, Horizon::NextHour))
            .map(Quantiles::sanitized)
            .collect()
    }
}

/// The model part of `prescient status`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ModelStatus {
    /// The model file.
    pub path: Option<String>,
    /// The id of the model served, if one is loaded.
    pub loaded: Option<String>,
    /// Why the file was rejected, if it was.
    pub rejected: Option<String>,
    /// The last retraining run's decision, if one ran.
    pub last_retrain: Option<String>,
}

/// One record for the writer thread.
#[derive(Debug)]
enum Record {
    Sample(Sample),
    Forecast(ServedForecast),
    /// Write what is queued and end.
    Stop,
}

/// Online learning: the sample queue, the served model, the jobs.
#[derive(Debug)]
pub struct Online {
    config: ForecastConfig,
    model_path: Option<PathBuf>,
    metrics: Arc<Metrics>,
    tx: SyncSender<Record>,
    rx: Mutex<Option<Receiver<Record>>>,
    model: RwLock<Option<Arc<ServedModel>>>,
    /// Bumped whenever the served model changes.
    generation: AtomicU64,
    status: Mutex<ModelStatus>,
    writer: Mutex<Option<std::thread::JoinHandle<()>>>,
    stop_retrain: Mutex<Option<SyncSender<()>>>,
    /// Whether a writer runs (records are queued only then).
    storing: std::sync::atomic::AtomicBool,
}

/// Records the queue holds before it drops new ones.
const QUEUE: usize = 65_536;
/// Most records one write transaction holds.
const BATCH: usize = 4096;
/// Seconds between prunes of the online tables.
const PRUNE_EVERY: Duration = Duration::from_secs(60);

/// Why a model file was rejected, as a metric label.
fn reject_reason(e: &ModelsError) -> &'static str {
    match e {
        ModelsError::Io { .. } => "unreadable",
        ModelsError::ModelFile { reason, .. } if reason.contains("format version") => {
            "other-version"
        }
        ModelsError::ModelFile { reason, .. } if reason.contains("checksum") => "corrupted",
        ModelsError::ModelFile { reason, .. } if reason.contains("magic") => "not-a-model",
        ModelsError::ModelFile { reason, .. } if reason.contains("feature spec") => {
            "other-features"
        }
        _ => "invalid",
    }
}

/// Unix time now, ms.
pub fn unix_ms_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

impl Online {
    /// Loads the model file (if there is one) and sets up the sample
    /// queue; nothing runs until [`Online::start`]. A rejected model file
    /// is logged and counted here, and the baselines are served.
    pub fn new(config: ForecastConfig, store: Option<&Path>, metrics: Arc<Metrics>) -> Self {
        let (tx, rx) = std::sync::mpsc::sync_channel(QUEUE);
        let model_path = config.model_path(store);
        let online = Online {
            config,
            model_path: model_path.clone(),
            metrics,
            tx,
            rx: Mutex::new(Some(rx)),
            model: RwLock::new(None),
            generation: AtomicU64::new(0),
            status: Mutex::new(ModelStatus {
                path: model_path.as_ref().map(|p| p.display().to_string()),
                ..ModelStatus::default()
            }),
            writer: Mutex::new(None),
            stop_retrain: Mutex::new(None),
            storing: std::sync::atomic::AtomicBool::new(false),
        };
        if let Some(p) = &model_path {
            online.load_at_start(p);
        }
        online
    }

    /// Stores samples only: no model is loaded or served, nothing is
    /// retrained (the daemon without its shaping loop, where only the
    /// libvirt agent samples VMs).
    pub fn samples_only(config: ForecastConfig, metrics: Arc<Metrics>) -> Self {
        let config = ForecastConfig {
            model: None,
            retrain_interval_s: 0,
            ..config
        };
        Online::new(config, None, metrics)
    }

    fn load_at_start(&self, path: &Path) {
        if !path.exists() {
            tracing::info!(model = %path.display(), "no model file yet: serving the baselines (retraining writes it once a model beats them)");
            return;
        }
        match LearnedForecaster::load(path) {
            Ok(f) => {
                let m = ServedModel::new(path, f);
                tracing::info!(model = %path.display(), id = m.id, "forecasting model loaded; served where it measures better than the best baseline");
                self.install_in_memory(m);
            }
            Err(e) => {
                let reason = reject_reason(&e);
                Metrics::inc(&self.metrics.model_rejected, reason);
                let text = vmm_hooks::error_chain(&e);
                tracing::error!(
                    model = %path.display(),
                    reason,
                    "model file rejected, serving the baselines: {text}"
                );
                self.lock_status().rejected = Some(text);
            }
        }
    }

    fn lock_status(&self) -> std::sync::MutexGuard<'_, ModelStatus> {
        self.status
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn install_in_memory(&self, m: ServedModel) {
        {
            let mut st = self.lock_status();
            st.loaded = Some(m.id.clone());
            st.rejected = None;
        }
        *self
            .model
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(Arc::new(m));
        self.generation.fetch_add(1, Ordering::SeqCst);
        self.metrics.model_loaded.set(1);
    }

    /// The model served now, if any.
    pub fn model(&self) -> Option<Arc<ServedModel>> {
        self.model
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Changes whenever the served model does.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::SeqCst)
    }

    /// The configuration.
    pub fn config(&self) -> &ForecastConfig {
        &self.config
    }

    /// The model file.
    pub fn model_path(&self) -> Option<&Path> {
        self.model_path.as_deref()
    }

    /// What `prescient status` shows of the model.
    pub fn status(&self) -> ModelStatus {
        self.lock_status().clone()
    }

    fn send(&self, r: Record) {
        if !self.storing.load(Ordering::Relaxed) {
            return;
        }
        match self.tx.try_send(r) {
            Ok(()) => {}
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => {
                self.metrics.online_dropped.inc();
            }
        }
    }

    /// Queues a usage sample for the store (never blocks).
    pub fn sample(&self, s: Sample) {
        self.send(Record::Sample(s));
    }

    /// Queues a served forecast for the store (never blocks).
    pub fn served(&self, f: ServedForecast) {
        Metrics::inc(&self.metrics.forecasts_served, &f.forecaster);
        self.send(Record::Forecast(f));
    }

    /// Starts the writer thread on `store` and, with
    /// `retrain_interval_s > 0`, the retraining thread.
    pub fn start(self: &Arc<Self>, store: &Path) -> Result<(), OnlineError> {
        let rx = self
            .rx
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take();
        let Some(rx) = rx else {
            return Ok(());
        };
        let db = ProfileStore::open(store, StorePolicy::default())?;
        let me = Arc::clone(self);
        let writer = std::thread::Builder::new()
            .name("prescient-samples".into())
            .spawn(move || me.write_loop(db, &rx))
            .map_err(|source| OnlineError::Thread {
                what: "sample writer",
                source,
            })?;
        *self
            .writer
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(writer);
        self.storing.store(true, Ordering::Relaxed);
        if self.config.retrain_interval_s > 0 {
            let (stop_tx, stop_rx) = std::sync::mpsc::sync_channel(1);
            let db = ProfileStore::open(store, StorePolicy::default())?;
            let me = Arc::clone(self);
            let every = Duration::from_secs(self.config.retrain_interval_s);
            std::thread::Builder::new()
                .name("prescient-retrain".into())
                .spawn(move || me.retrain_loop(db, &stop_rx, every))
                .map_err(|source| OnlineError::Thread {
                    what: "retraining",
                    source,
                })?;
            *self
                .stop_retrain
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(stop_tx);
            tracing::info!(
                every_s = self.config.retrain_interval_s,
                max_samples = self.config.retrain_max_samples,
                max_seconds = self.config.retrain_max_seconds,
                "retraining job on (lowest CPU priority, one thread)"
            );
        }
        Ok(())
    }

    /// Writes what is queued, stops the writer and the retraining job
    /// (a run in progress is abandoned; its candidate never installed).
    pub fn shutdown(&self) {
        if let Some(s) = self
            .stop_retrain
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take()
        {
            let _ = s.try_send(());
        }
        let writer = self
            .writer
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take();
        if let Some(w) = writer {
            // Blocking: the queue may be full; the writer is emptying it.
            let _ = self.tx.send(Record::Stop);
            if w.join().is_err() {
                tracing::error!("the sample writer thread panicked");
            }
        }
    }

    fn write_loop(&self, mut db: ProfileStore, rx: &Receiver<Record>) {
        let mut last_prune: Option<Instant> = None;
        loop {
            let first = match rx.recv_timeout(PRUNE_EVERY) {
                Ok(r) => Some(r),
                Err(RecvTimeoutError::Timeout) => None,
                Err(RecvTimeoutError::Disconnected) => return,
            };
            let mut samples = Vec::new();
            let mut forecasts = Vec::new();
            let mut stop = false;
            let mut next = first;
            while let Some(r) = next {
                match r {
                    Record::Sample(s) => samples.push(s),
                    Record::Forecast(f) => forecasts.push(f),
                    Record::Stop => stop = true,
                }
                if stop || samples.len() + forecasts.len() >= BATCH {
                    break;
                }
                next = rx.try_recv().ok();
            }
            if !(samples.is_empty() && forecasts.is_empty()) {
                match db.write_online(&samples, &forecasts) {
                    Ok(()) => {
                        self.metrics
                            .online_written
                            .inc_by((samples.len() + forecasts.len()) as u64);
                    }
                    Err(e) => {
                        self.metrics.store_errors.inc();
                        tracing::error!(
                            samples = samples.len(),
                            forecasts = forecasts.len(),
                            "cannot store samples: {}",
                            vmm_hooks::error_chain(&e)
                        );
                    }
                }
            }
            if last_prune.is_none_or(|t| t.elapsed() >= PRUNE_EVERY) {
                last_prune = Some(Instant::now());
                let c = &self.config;
                let before = unix_ms_now().saturating_sub(
                    i64::try_from(c.sample_retain_hours.saturating_mul(3_600_000))
                        .unwrap_or(i64::MAX),
                );
                match db.prune_online(before, c.sample_max_rows, c.forecast_max_rows) {
                    Ok((s, f)) if s + f > 0 => {
                        tracing::debug!(samples = s, forecasts = f, "online tables pruned");
                    }
                    Ok(_) => {}
                    Err(e) => {
                        self.metrics.store_errors.inc();
                        tracing::error!("cannot prune samples: {}", vmm_hooks::error_chain(&e));
                    }
                }
            }
            if stop {
                return;
            }
        }
    }

    fn retrain_loop(&self, mut db: ProfileStore, stop: &Receiver<()>, every: Duration) {
        lowest_cpu_priority();
        let pool = match rayon::ThreadPoolBuilder::new()
            .num_threads(1)
            .thread_name(|_| "prescient-train".into())
            .start_handler(|_| lowest_cpu_priority())
            .build()
        {
            Ok(p) => p,
            Err(e) => {
                tracing::error!("retraining off: cannot start its thread: {e}");
                return;
            }
        };
        loop {
            match stop.recv_timeout(every) {
                Err(RecvTimeoutError::Timeout) => {}
                Ok(()) | Err(RecvTimeoutError::Disconnected) => return,
            }
            let now = unix_ms_now();
            let db = &mut db;
            let out = pool.install(move || retrain_once(self, db, now));
            match out {
                Ok(o) => tracing::info!(
                    decision = o.decision.name(),
                    samples = o.samples,
                    holdout_cases = o.holdout_cases,
                    model_loss = ?o.model_loss,
                    best_baseline = ?o.best_baseline,
                    candidate_loss = ?o.candidate_loss,
                    wall_s = o.wall_s,
                    cpu_s = o.cpu_s,
                    "retraining run: {}", o.summary()
                ),
                Err(e) => tracing::error!("retraining run failed: {}", vmm_hooks::error_chain(&e)),
            }
        }
    }
}

/// Puts the calling thread at the lowest CPU priority: `SCHED_IDLE`, or
/// nice 19 where that is refused.
pub fn lowest_cpu_priority() {
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: pid 0 is the calling thread; `param` is a valid, initialised
    // sched_param that lives across the call; SCHED_IDLE takes priority 0.
    let rc = unsafe { libc::sched_setscheduler(0, libc::SCHED_IDLE, &param) };
    if rc != 0 {
        // SAFETY: gettid has no preconditions.
        let tid = unsafe { libc::gettid() };
        let who = libc::id_t::try_from(tid).unwrap_or(0);
        // SAFETY: setpriority on this thread's own id with a valid nice
        // value; no memory is passed.
        let rc = unsafe { libc::setpriority(libc::PRIO_PROCESS, who, 19) };
        if rc != 0 {
            tracing::warn!(
                "cannot lower the retraining thread's CPU priority: {}",
                std::io::Error::last_os_error()
            );
        }
    }
}

/// CPU time of the calling thread, seconds.
fn thread_cpu_s() -> f64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec for the call's duration.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    if rc != 0 {
        return 0.0;
    }
    ts.tv_sec as f64 + ts.tv_nsec as f64 * 1e-9
}

/// What a retraining run decided.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Decision {
    /// Too few held-out decisions (or training examples) to judge.
    NotEnoughData,
    /// The served model is at least as good as the best baseline.
    ModelGood,
    /// A candidate beat the old model and the best baseline: installed.
    Installed,
    /// The candidate did not beat both: discarded.
    CandidateWorse,
}

impl Decision {
    /// As logged and counted.
    pub fn name(&self) -> &'static str {
        match self {
            Decision::NotEnoughData => "not-enough-data",
            Decision::ModelGood => "model-good",
            Decision::Installed => "installed",
            Decision::CandidateWorse => "candidate-worse",
        }
    }
}

/// What one retraining run did.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RetrainOutcome {
    /// The decision.
    pub decision: Decision,
    /// Samples read.
    pub samples: usize,
    /// Held-out decisions scored.
    pub holdout_cases: usize,
    /// The served model's pinball loss on the window, if one is served.
    pub model_loss: Option<f64>,
    /// The best baseline and its loss on the window.
    pub best_baseline: Option<(String, f64)>,
    /// The candidate's loss, if one was trained.
    pub candidate_loss: Option<f64>,
    /// The installed model's id.
    pub installed: Option<String>,
    /// The served model the candidate was fine-tuned from (`None`: trained
    /// from scratch, or no candidate).
    pub fine_tuned_from: Option<String>,
    /// Wall time, seconds.
    pub wall_s: f64,
    /// CPU time of the thread that ran it, seconds.
    pub cpu_s: f64,
}

impl RetrainOutcome {
    /// One line for logs and the status.
    pub fn summary(&self) -> String {
        let f = |x: Option<f64>| x.map_or_else(|| "-".into(), |v| format!("{v:.4}"));
        format!(
            "{}: model {} vs best baseline {} ({}), candidate {}{}{}; {} samples, {} held-out decisions, {:.1} s wall, {:.1} s CPU",
            self.decision.name(),
            f(self.model_loss),
            f(self.best_baseline.as_ref().map(|b| b.1)),
            self.best_baseline.as_ref().map_or("-", |b| b.0.as_str()),
            f(self.candidate_loss),
            self.fine_tuned_from
                .as_ref()
                .map_or_else(String::new, |i| format!(" (fine-tuned from {i})")),
            self.installed
                .as_ref()
                .map_or_else(String::new, |i| format!(", installed {i}")),
            self.samples,
            self.holdout_cases,
            self.wall_s,
            self.cpu_s
        )
    }
}

/// A VM's static features and its `(Unix seconds, value)` samples.
type VmSamples = (Statics, Vec<(i64, f64)>);

/// Per-VM 5-minute grids of stored samples, with static features.
fn grids(samples: &[Sample]) -> Vec<(String, Statics, Grid)> {
    let mut by_vm: BTreeMap<&str, VmSamples> = BTreeMap::new();
    for s in samples {
        let e = by_vm.entry(&s.vm_id).or_default();
        if let Some(v) = s.vcpus {
            e.0.vcpus = Some(f64::from(v));
        }
        if let Some(m) = s.memory_mib {
            e.0.mem_cap_kb = Some(m as f64 * 1024.0);
        }
        if s.value.is_finite() {
            e.1.push((s.at_unix_ms.div_euclid(1000), s.value));
        }
    }
    by_vm
        .into_iter()
        .filter_map(|(vm, (st, xs))| Grid::from_samples(&xs).map(|g| (vm.to_string(), st, g)))
        .collect()
}

/// Held-out next-hour decisions at or after `cutoff_slot`: (VM index,
/// visible length, decision slot, targets).
struct Holdout {
    cases: Vec<(usize, usize, i64, Vec<f64>)>,
}

impl Holdout {
    fn of(grids: &[(String, Statics, Grid)], cutoff_slot: i64) -> Self {
        let mut cases = Vec::new();
        for (i, (_, _, g)) in grids.iter().enumerate() {
            for c in next_hour_cases(g) {
                if c.decision_slot >= cutoff_slot {
                    cases.push((i, c.visible_len, c.decision_slot, c.targets));
                }
            }
        }
        Holdout { cases }
    }

    fn histories<'a>(&self, grids: &'a [(String, Statics, Grid)]) -> Vec<History<'a>> {
        self.cases
            .iter()
            .map(|&(i, vis, t, _)| {
                let (_, st, g) = &grids[i];
                History {
                    values: &g.values[..vis],
                    first_slot: g.first_slot,
                    decision_slot: t,
                    statics: *st,
                }
            })
            .collect()
    }

    /// Mean pinball loss (over levels and every target value).
    fn loss(&self, qs: &[Quantiles]) -> f64 {
        let (mut sum, mut n) = (0.0, 0usize);
        for ((_, _, _, ys), q) in self.cases.iter().zip(qs) {
            for &y in ys {
                for (&p, &qk) in LEVELS.iter().zip(&q.0) {
                    sum += pinball(p, y, qk);
                }
                n += LEVELS.len();
            }
        }
        if n == 0 { f64::NAN } else { sum / n as f64 }
    }
}

/// One retraining run at `now_unix_ms` (see the module docs): reads the
/// store, scores, maybe trains and installs. Runs on the calling thread
/// (and the rayon pool it is called in).
pub fn retrain_once(
    online: &Online,
    db: &mut ProfileStore,
    now_unix_ms: i64,
) -> Result<RetrainOutcome, OnlineError> {
    let t0 = Instant::now();
    let cpu0 = thread_cpu_s();
    let c = &online.config;
    let since = now_unix_ms.saturating_sub(
        i64::try_from(c.sample_retain_hours.saturating_mul(3_600_000)).unwrap_or(i64::MAX),
    );
    let samples = db.samples(MEM_METRIC, since, c.retrain_max_samples)?;
    let grids = grids(&samples);
    let cutoff_s = (now_unix_ms / 1000).saturating_sub(i64::try_from(c.holdout_s).unwrap_or(0));
    let cutoff_slot = slot_of(cutoff_s);
    let holdout = Holdout::of(&grids, cutoff_slot);
    let hs = holdout.histories(&grids);
    let mut out = RetrainOutcome {
        decision: Decision::NotEnoughData,
        samples: samples.len(),
        holdout_cases: hs.len(),
        model_loss: None,
        best_baseline: None,
        candidate_loss: None,
        installed: None,
        fine_tuned_from: None,
        wall_s: 0.0,
        cpu_s: 0.0,
    };
    let finish = |mut o: RetrainOutcome, metrics: &Metrics| {
        o.wall_s = t0.elapsed().as_secs_f64();
        o.cpu_s = thread_cpu_s() - cpu0;
        Metrics::inc(&metrics.retrain_runs, o.decision.name());
        metrics.retrain_wall_seconds.set(o.wall_s);
        metrics.retrain_cpu_seconds.set(o.cpu_s);
        online.lock_status().last_retrain = Some(o.summary());
        o
    };
    if hs.len() < c.min_holdout_cases.max(1) {
        return Ok(finish(out, &online.metrics));
    }
    for b in models::baselines() {
        let qs: Vec<Quantiles> = hs
            .iter()
            .map(|h| b.forecast(h, Horizon::NextHour).sanitized())
            .collect();
        let l = holdout.loss(&qs);
        if l.is_finite() && out.best_baseline.as_ref().is_none_or(|(_, m)| l < *m) {
            out.best_baseline = Some((b.name().to_string(), l));
        }
    }
    let Some((_, best)) = out.best_baseline.clone() else {
        return Ok(finish(out, &online.metrics));
    };
    let old = online.model();
    if let Some(m) = &old {
        let l = holdout.loss(&m.forecast_batch(&hs));
        out.model_loss = Some(l);
        if l <= best {
            out.decision = Decision::ModelGood;
            return Ok(finish(out, &online.metrics));
        }
    }
    let Some(path) = online.model_path.clone() else {
        return Ok(finish(out, &online.metrics));
    };
    // Train on what came before the window only.
    let series: Vec<Series> = grids
        .iter()
        .filter_map(|(vm, st, g)| {
            let keep = usize::try_from(cutoff_slot - g.first_slot)
                .ok()?
                .min(g.values.len());
            (keep > 0).then(|| Series {
                id: vm.clone(),
                split_key: vm.clone(),
                statics: *st,
                metrics: vec![(
                    Metric::MemKb,
                    Grid {
                        first_slot: g.first_slot,
                        values: g.values[..keep].to_vec(),
                    },
                )],
            })
        })
        .collect();
    let ds = Dataset {
        name: "store".into(),
        path: path.clone(),
        series,
    };
    let cfg = TrainConfig {
        hidden: c.retrain_hidden,
        epochs: c.retrain_epochs,
        max_seconds: c.retrain_max_seconds,
        split: SplitSpec {
            test_pct: 0,
            calibration_pct: 25,
            seed: 0x0411e,
        },
        max_examples_per_dataset: 50_000,
        threads: 1,
        ..TrainConfig::default()
    };
    // The CPU share: after each step (example building, each epoch,
    // calibration) sleep so that CPU time / wall time stays at the share.
    let share = c.retrain_cpu_share.clamp(0.05, 1.0);
    let mut last = thread_cpu_s();
    let mut progress = |l: &str| {
        tracing::debug!("retraining: {l}");
        if share < 1.0 {
            let used = thread_cpu_s() - last;
            std::thread::sleep(Duration::from_secs_f64(
                (used * (1.0 / share - 1.0)).clamp(0.0, 60.0),
            ));
            last = thread_cpu_s();
        }
    };
    // Fine-tune the served model where there is one (a private copy from
    // its file: the served one stays free for the shaping loop); else
    // train from scratch.
    let start = old
        .as_ref()
        .and_then(|m| match LearnedForecaster::load(&m.path) {
            Ok(f) => Some((m.id.clone(), f)),
            Err(e) => {
                tracing::warn!(
                    "retraining from scratch: cannot reread the served model: {}",
                    vmm_hooks::error_chain(&e)
                );
                None
            }
        });
    let trained = match &start {
        Some((id, f)) => {
            out.fine_tuned_from = Some(id.clone());
            models::fine_tune(std::slice::from_ref(&ds), &cfg, f, &mut progress)
        }
        None => models::train(std::slice::from_ref(&ds), &cfg, &mut progress),
    };
    let candidate = match trained {
        Ok((m, _)) => m,
        Err(ModelsError::Training(why)) => {
            tracing::info!("retraining: no candidate: {why}");
            return Ok(finish(out, &online.metrics));
        }
        Err(e) => return Err(e.into()),
    };
    // Through the file: the candidate is scored exactly as it would load.
    let cand_path = sibling(&path, "candidate");
    candidate.save(&cand_path)?;
    let loaded = LearnedForecaster::load(&cand_path)?;
    let cand = ServedModel::new(&path, loaded);
    let l = holdout.loss(&cand.forecast_batch(&hs));
    out.candidate_loss = Some(l);
    let beats_old = out.model_loss.is_none_or(|m| l < m);
    if !(l < best && beats_old) {
        let _ = std::fs::remove_file(&cand_path);
        out.decision = Decision::CandidateWorse;
        return Ok(finish(out, &online.metrics));
    }
    install_file(&cand_path, &path, online.lock_status().rejected.is_some())?;
    out.installed = Some(cand.id.clone());
    tracing::info!(model = %path.display(), id = cand.id, loss = l, best_baseline = best, "retrained model installed; the previous file is kept as .prev");
    online.install_in_memory(cand);
    out.decision = Decision::Installed;
    Ok(finish(out, &online.metrics))
}

/// `PATH.<ext>` beside `PATH`.
pub fn sibling(path: &Path, ext: &str) -> PathBuf {
    let mut p = path.as_os_str().to_owned();
    p.push(".");
    p.push(ext);
    PathBuf::from(p)
}

/// Moves `candidate` to `path`, keeping the file there as `PATH.prev` (as
/// `PATH.rejected` when it was rejected at load). Each step is a rename
/// after the candidate reached the disk, so a crash leaves either the old
/// or the new file at `path`.
fn install_file(candidate: &Path, path: &Path, current_rejected: bool) -> Result<(), OnlineError> {
    let io = |p: &Path| {
        let p = p.to_path_buf();
        move |source| OnlineError::Install { path: p, source }
    };
    std::fs::File::open(candidate)
        .and_then(|f| f.sync_all())
        .map_err(io(candidate))?;
    if path.exists() {
        let keep = sibling(path, if current_rejected { "rejected" } else { "prev" });
        std::fs::rename(path, &keep).map_err(io(&keep))?;
    }
    std::fs::rename(candidate, path).map_err(io(path))?;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::File::open(dir)
            .and_then(|f| f.sync_all())
            .map_err(io(dir))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reject_reasons_name_version_and_corruption() {
        let bad = |r: &str| ModelsError::ModelFile {
            path: "m".into(),
            reason: r.into(),
        };
        assert_eq!(
            reject_reason(&bad("format version 9, this build reads version 1")),
            "other-version"
        );
        assert_eq!(
            reject_reason(&bad("weights checksum 1 does not match")),
            "corrupted"
        );
        assert_eq!(
            reject_reason(&bad("no header (wrong magic)")),
            "not-a-model"
        );
    }

    fn sample(vm: &str, at: i64) -> Sample {
        Sample {
            vm_id: vm.into(),
            metric: MEM_METRIC.into(),
            at_unix_ms: at,
            value: 1.0,
            vcpus: None,
            memory_mib: None,
        }
    }

    #[test]
    fn queued_samples_are_written_in_batches_and_flushed_at_shutdown() {
        let dir = tempfile::tempdir().unwrap();
        let store = dir.path().join("s.db");
        drop(ProfileStore::open(&store, StorePolicy::default()).unwrap());
        let metrics = Arc::new(Metrics::new());
        let o = Arc::new(Online::new(
            ForecastConfig::default(),
            Some(&store),
            Arc::clone(&metrics),
        ));
        // Before the writer runs nothing is queued (no store to write to).
        o.sample(sample("early", unix_ms_now()));
        o.start(&store).unwrap();
        let now = unix_ms_now();
        for k in 0..5000 {
            o.sample(sample("a", now - 5000 + k));
        }
        o.served(ServedForecast {
            vm_id: "a".into(),
            at_unix_ms: now,
            metric: MEM_METRIC.into(),
            forecaster: "baseline:ewma_sd".into(),
            reason: "best baseline".into(),
            quantiles: [1.0, 2.0, 3.0],
        });
        o.shutdown();
        let db = ProfileStore::open(&store, StorePolicy::default()).unwrap();
        assert_eq!(db.sample_rows().unwrap(), 5000);
        assert_eq!(db.served_forecasts(None, 10).unwrap().len(), 1);
        let text = metrics.render();
        assert!(
            text.contains("prescient_online_records_written_total 5001"),
            "{text}"
        );
        assert!(
            text.contains(r#"prescient_forecasts_served_total{kind="baseline:ewma_sd"} 1"#),
            "{text}"
        );
    }

    #[test]
    fn a_full_queue_drops_and_counts_instead_of_blocking() {
        let metrics = Arc::new(Metrics::new());
        let o = Online::new(ForecastConfig::default(), None, Arc::clone(&metrics));
        // A writer that never drains: the queue fills.
        o.storing.store(true, Ordering::Relaxed);
        for k in 0..QUEUE + 3 {
            o.sample(sample("a", i64::try_from(k).unwrap()));
        }
        assert!(
            metrics
                .render()
                .contains("prescient_online_records_dropped_total 3"),
            "{}",
            metrics.render()
        );
    }

    #[test]
    fn model_path_defaults_to_beside_the_store() {
        let c = ForecastConfig::default();
        assert_eq!(
            c.model_path(Some(Path::new("/var/lib/p/store.db"))),
            Some(PathBuf::from("/var/lib/p/store.db.model"))
        );
        assert_eq!(c.model_path(None), None);
        assert_eq!(
            sibling(Path::new("/a/m"), "prev"),
            PathBuf::from("/a/m.prev")
        );
    }
}
