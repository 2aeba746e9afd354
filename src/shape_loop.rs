//! The daemon's shaping loop: the thin adapter around `shaping`.
//!
//! It learns each VM from its events (size, vCPUs and priority from
//! `created`; memory in use from the guest statistics in every `balloon`
//! status; CPU from the VMM process's `/proc/PID/stat`, the process being
//! the hooks socket's peer), and every interval (`tick`, time injected):
//! closes the interval's samples into one value per VM, scores the last
//! forecasts and the tuner's margins against it, forecasts the next hour
//! per VM through the `ForecasterSelector` (over `prev_hour`, `prev_24h`,
//! `ewma_sd`, on the loop's own intervals), has the `Shaper` decide at the
//! tuner's margin, and applies: balloon targets go back to the VMM as the
//! answer to its next `balloon` status (the existing balloon path), CPU
//! weights and limits go to a cgroup per VM holding its VMM process through
//! `numa::CgroupBinder` (with `cgroups` on). Forecast, actual, grant,
//! margin and pre-fault amount are exported per VM in `/metrics`.
//!
//! The pre-fault amount is computed and exported but not applied: protocol
//! v1 has no message asking a running VMM to populate memory (only a boot
//! plan carries pre-fault ranges).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use models::{EwmaSd, Forecaster, ForecasterSelector, Grid, History, Horizon, Quantiles, slot_of};
use serde::{Deserialize, Serialize};
use vmm_hooks::{BalloonStatus, Event, EventKind, HookReply};

use crate::metrics::Metrics;
use crate::online::{CPU_METRIC, MEM_METRIC, Online};
use crate::shaping::{
    DEFAULT_ARMS, HostCapacity, MarginTuner, ShapeError, ShapeLimits, ShapePlan, ShapePolicy,
    Shaper, TunerMode, VmShapeInput, baseline_forecasts, reward, slack_shortfall,
};
use crate::store::{Sample, ServedForecast};

/// Intervals of history a forecast sees.
const HISTORY: usize = 576;
/// Intervals of history before the first forecast.
const WARMUP: usize = 2;
/// Most VMs the loop follows (a peer inventing VM ids cannot grow it further).
const MAX_VMS: usize = 4096;
/// The selector's name for the served model (whichever file it is).
const MODEL: &str = "model";

/// How the loop runs (`[shaping]` in the configuration file).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ShapingConfig {
    /// Seconds between decisions; 0 turns the loop off.
    pub interval_s: u64,
    /// How grants are cut and rounded.
    pub policy: ShapePolicy,
    /// Cost of shortfall against slack in the tuner's reward.
    pub lambda: f64,
    /// Memory every guest keeps, MiB.
    pub floor_mib: u64,
    /// Memory shaped VMs may hold together, MiB (default: the host's).
    pub host_memory_mib: Option<u64>,
    /// CPUs shaped VMs may use together (default: the host's).
    pub host_cpus: Option<f64>,
    /// Write `cpu.weight` and `cpu.max` to a cgroup per VM holding its VMM
    /// process (the hooks socket's peer).
    pub cgroups: bool,
    /// The parent of the per-VM cgroups.
    pub cgroup_parent: String,
    /// Shaper knobs.
    pub limits: ShapeLimits,
}

impl Default for ShapingConfig {
    fn default() -> Self {
        ShapingConfig {
            interval_s: 0,
            policy: ShapePolicy::default(),
            lambda: 20.0,
            floor_mib: 128,
            host_memory_mib: None,
            host_cpus: None,
            cgroups: false,
            cgroup_parent: "prescient".into(),
            limits: ShapeLimits::default(),
        }
    }
}

impl ShapingConfig {
    /// Checks every value.
    pub fn validate(&self) -> Result<(), ShapeError> {
        self.limits.validate()?;
        if self.interval_s > 86_400 {
            return Err(ShapeError::Setting {
                setting: "shaping.interval_s",
                value: self.interval_s.to_string(),
                reason: "must be 0 (off) to 86400",
            });
        }
        if !(self.lambda.is_finite() && (0.0..=1000.0).contains(&self.lambda)) {
            return Err(ShapeError::Setting {
                setting: "shaping.lambda",
                value: self.lambda.to_string(),
                reason: "must be 0 to 1000",
            });
        }
        if let Some(c) = self.host_cpus
            && !(c.is_finite() && c > 0.0)
        {
            return Err(ShapeError::Setting {
                setting: "shaping.host_cpus",
                value: c.to_string(),
                reason: "must be above 0",
            });
        }
        if self.cgroup_parent.is_empty()
            || self.cgroup_parent.contains("..")
            || self.cgroup_parent.starts_with('/')
        {
            return Err(ShapeError::Setting {
                setting: "shaping.cgroup_parent",
                value: self.cgroup_parent.clone(),
                reason: "must be a relative cgroup name without ..",
            });
        }
        Ok(())
    }
}

/// One VM as the loop knows it.
#[derive(Debug)]
struct Track {
    memory_mib: u64,
    vcpus: u32,
    priority: i32,
    pid: Option<u32>,
    /// Memory in use seen this interval: sum (MiB) and count.
    samples: (f64, u32),
    /// Per closed interval: memory in use (NaN: nothing seen).
    mem: Vec<f64>,
    /// Per closed interval: CPU in cores (NaN: unknown).
    cpu: Vec<f64>,
    /// Per closed interval: when it closed, Unix seconds.
    at_s: Vec<i64>,
    /// The served model's generation the selector's model outcomes are of.
    model_generation: u64,
    /// The last forecast served.
    served: Option<ServedForecast>,
    /// CPU ticks of the VMM process at the last tick.
    cpu_ticks: Option<(Instant, u64)>,
    /// Forecasts of every candidate made at the last tick.
    candidates: Vec<(String, Quantiles)>,
    /// Which forecaster has measured best on this VM.
    selector: ForecasterSelector,
    /// The balloon target the loop wants, if it differs from the VMM's, and
    /// how much of what that deflates to pre-fault (predicted growth).
    pending: Option<(u64, u64)>,
    /// The target the VMM reported last.
    reported_target: Option<u64>,
    cgroup: CgroupState,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum CgroupState {
    None,
    Attached,
    Failed,
}

impl Track {
    fn new(memory_mib: u64, min_outcomes: u64) -> Self {
        Track {
            memory_mib,
            vcpus: 1,
            priority: 0,
            pid: None,
            samples: (0.0, 0),
            mem: Vec::new(),
            cpu: Vec::new(),
            at_s: Vec::new(),
            model_generation: 0,
            served: None,
            cpu_ticks: None,
            candidates: Vec::new(),
            selector: ForecasterSelector::new(
                MODEL,
                &["prev_hour", "prev_24h", "ewma_sd"],
                0.02,
                min_outcomes,
            ),
            pending: None,
            reported_target: None,
            cgroup: CgroupState::None,
        }
    }
}

#[derive(Debug)]
struct State {
    vms: HashMap<String, Track>,
    tuner: MarginTuner,
    /// The last decision's inputs, to score every margin once the interval
    /// has passed.
    last: Option<Vec<VmShapeInput>>,
    /// Whether the VM limit was reported.
    full_warned: bool,
}

/// What one tick did (for tests and logs).
#[derive(Debug, Clone, PartialEq)]
pub struct TickOutcome {
    /// The margin chosen.
    pub margin: f64,
    /// The plan (None: no VM had enough history).
    pub plan: Option<ShapePlan>,
}

/// The shaping loop.
#[derive(Debug)]
pub struct ShapingLoop {
    config: ShapingConfig,
    shaper: Shaper,
    metrics: Arc<Metrics>,
    binder: Option<numa::CgroupBinder>,
    /// Samples to the store, the served model (`None`: baselines only,
    /// nothing stored).
    online: Option<Arc<Online>>,
    state: Mutex<State>,
}

fn host_memory_mib() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|k| k.parse::<u64>().ok())
        })
        .map_or(0, |kib| kib / 1024)
}

fn host_cpus() -> f64 {
    std::thread::available_parallelism().map_or(1.0, |n| n.get() as f64)
}

/// User plus system CPU ticks of a process, from `/proc/PID/stat`.
fn process_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command may hold spaces and parentheses: fields follow the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // After ')': state is field 3, utime 14, stime 15 (1-based) -> 11, 12.
    let utime: u64 = f.get(11)?.parse().ok()?;
    let stime: u64 = f.get(12)?.parse().ok()?;
    Some(utime + stime)
}

fn clock_ticks() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 { t as f64 } else { 100.0 }
}

/// Memory the guest uses, MiB, from its balloon statistics.
fn used_mib(s: &BalloonStatus) -> Option<f64> {
    if s.stats_updates == 0 {
        return None;
    }
    let total = s.guest_stat("total-memory")?;
    let avail = s
        .guest_stat("available-memory")
        .or_else(|| s.guest_stat("free-memory"))?;
    Some(total.saturating_sub(avail) as f64 / f64::from(1u32 << 20))
}

impl ShapingLoop {
    /// A loop with this configuration (checked); with `cgroups`, the cgroup
    /// layout is detected now.
    pub fn new(config: ShapingConfig, metrics: Arc<Metrics>) -> Result<Self, ShapeError> {
        config.validate()?;
        let host = HostCapacity {
            memory_mib: config.host_memory_mib.unwrap_or_else(host_memory_mib),
            cpus: config.host_cpus.unwrap_or_else(host_cpus),
        };
        let shaper = Shaper::new(config.policy, host, config.limits)?;
        let binder = if config.cgroups {
            match numa::CgroupLayout::detect() {
                Ok(layout) => Some(numa::CgroupBinder::new(layout, &config.cgroup_parent)),
                Err(e) => return Err(ShapeError::Cgroups(e)),
            }
        } else {
            None
        };
        let tuner = MarginTuner::new(&DEFAULT_ARMS, TunerMode::FullInformation, 0.995)?;
        tracing::info!(
            policy = config.policy.name(),
            interval_s = config.interval_s,
            host_memory_mib = host.memory_mib,
            host_cpus = host.cpus,
            cgroups = config.cgroups,
            "shaping loop on"
        );
        Ok(ShapingLoop {
            config,
            shaper,
            metrics,
            binder,
            online: None,
            state: Mutex::new(State {
                vms: HashMap::new(),
                tuner,
                last: None,
                full_warned: false,
            }),
        })
    }

    /// Stores every closed interval's samples and served forecast through
    /// `online`, and lets its model compete with the baselines.
    #[must_use]
    pub fn with_online(mut self, online: Arc<Online>) -> Self {
        self.online = Some(online);
        self
    }

    /// The last forecast served to each VM, by VM id.
    pub fn served(&self) -> Vec<ServedForecast> {
        let st = self.lock();
        let mut out: Vec<ServedForecast> =
            st.vms.values().filter_map(|t| t.served.clone()).collect();
        out.sort_by(|a, b| a.vm_id.cmp(&b.vm_id));
        out
    }

    fn min_outcomes(&self) -> u64 {
        self.online
            .as_ref()
            .map_or(u64::MAX, |o| o.config().min_outcomes)
    }

    /// The interval between ticks.
    pub fn interval(&self) -> Duration {
        Duration::from_secs(self.config.interval_s.max(1))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Notes an event from `peer_pid`'s VMM and adjusts the reply: a
    /// `balloon` status is answered with the loop's target while the VMM's
    /// differs from it.
    pub fn observe(&self, event: &Event, peer_pid: Option<u32>, reply: HookReply) -> HookReply {
        let vm = event.vm.vm_id.as_str();
        let mut st = self.lock();
        if st.vms.len() >= MAX_VMS && !st.vms.contains_key(vm) {
            if !st.full_warned {
                st.full_warned = true;
                tracing::warn!(vm, "shaping follows {MAX_VMS} VMs already; not this one");
            }
            return reply;
        }
        match &event.kind {
            EventKind::Created { spec } => {
                let mut t = Track::new(spec.memory_mib, self.min_outcomes());
                t.vcpus = spec.vcpus.max(1);
                t.priority = spec.priority;
                t.pid = peer_pid;
                st.vms.insert(vm.to_string(), t);
                reply
            }
            EventKind::Balloon(status) => {
                let t = st
                    .vms
                    .entry(vm.to_string())
                    .or_insert_with(|| Track::new(status.memory_mib, self.min_outcomes()));
                t.memory_mib = status.memory_mib;
                if t.pid.is_none() {
                    t.pid = peer_pid;
                }
                if let Some(u) = used_mib(status) {
                    t.samples.0 += u;
                    t.samples.1 = t.samples.1.saturating_add(1);
                }
                t.reported_target = Some(status.target_mib);
                match t.pending {
                    Some((p, _)) if p == status.target_mib => {
                        t.pending = None;
                        reply
                    }
                    // A guest that deflated under memory pressure keeps
                    // what it took: never ask for more than it holds.
                    Some((p, _)) if status.deflated_on_oom && p > status.actual_mib => reply,
                    Some((p, prefault_mib)) => {
                        tracing::debug!(vm, target_mib = p, prefault_mib, "shaping balloon target");
                        Metrics::inc(&self.metrics.shape_actions, "balloon-target");
                        if prefault_mib > 0 {
                            Metrics::inc(&self.metrics.shape_actions, "prefault-growth");
                        }
                        HookReply::BalloonTarget {
                            target_mib: p,
                            prefault_mib,
                        }
                    }
                    None => reply,
                }
            }
            EventKind::Stopped { .. } => {
                if let Some(t) = st.vms.remove(vm) {
                    self.metrics.forget_shaped_vm(vm);
                    if t.cgroup == CgroupState::Attached
                        && let Some(b) = &self.binder
                        && let Err(e) = b.remove(vm)
                    {
                        tracing::debug!(vm, "cgroup not removed yet: {e}");
                    }
                }
                reply
            }
            _ => reply,
        }
    }

    /// One decision at `now` (Unix time from the system clock).
    pub fn tick(&self, now: Instant) -> TickOutcome {
        self.tick_at(now, crate::online::unix_ms_now())
    }

    /// One decision at `now`, which is `unix_ms` on the wall clock (the
    /// time stored with samples and forecasts, and the model's 5-minute
    /// grid).
    pub fn tick_at(&self, now: Instant, unix_ms: i64) -> TickOutcome {
        let unix_s = unix_ms.div_euclid(1000);
        let mut guard = self.lock();
        let st = &mut *guard;
        let hz = clock_ticks();
        // Close the interval.
        for t in st.vms.values_mut() {
            let (sum, n) = std::mem::take(&mut t.samples);
            t.mem
                .push(if n == 0 { f64::NAN } else { sum / f64::from(n) });
            let ticks = t.pid.and_then(process_ticks);
            let cores = match (t.cpu_ticks, ticks) {
                (Some((then, a)), Some(b)) if b >= a => {
                    let dt = now.saturating_duration_since(then).as_secs_f64();
                    if dt > 0.0 {
                        (b - a) as f64 / hz / dt
                    } else {
                        f64::NAN
                    }
                }
                _ => f64::NAN,
            };
            t.cpu.push(cores);
            t.at_s.push(unix_s);
            t.cpu_ticks = ticks.map(|b| (now, b));
            for h in [&mut t.mem, &mut t.cpu] {
                if h.len() > HISTORY {
                    h.drain(..h.len() - HISTORY);
                }
            }
            if t.at_s.len() > HISTORY {
                t.at_s.drain(..t.at_s.len() - HISTORY);
            }
        }
        // Every closed interval's usage goes to the store.
        if let Some(o) = &self.online {
            for (vm, t) in &st.vms {
                for (metric, h) in [(MEM_METRIC, &t.mem), (CPU_METRIC, &t.cpu)] {
                    if let Some(&v) = h.last().filter(|v| v.is_finite()) {
                        o.sample(Sample {
                            vm_id: vm.clone(),
                            metric: metric.into(),
                            at_unix_ms: unix_ms,
                            value: v,
                            vcpus: Some(t.vcpus),
                            memory_mib: Some(t.memory_mib),
                        });
                    }
                }
            }
        }
        let model = self.online.as_ref().and_then(|o| o.model());
        let generation = self.online.as_ref().map_or(0, |o| o.generation());
        // Score the last forecasts and every margin against what happened.
        for (vm, t) in &mut st.vms {
            if let Some(&y) = t.mem.last().filter(|y| !y.is_nan()) {
                for (name, q) in &t.candidates {
                    t.selector.record(vm, name, y, q);
                }
                self.metrics
                    .shape_gauge(&self.metrics.shape_actual_mib, vm, y);
            }
        }
        if let Some(last) = st.last.take() {
            let rewards: Vec<f64> = st
                .tuner
                .arms()
                .to_vec()
                .iter()
                .map(|&m| self.score(&last, &st.vms, m))
                .collect();
            st.tuner.update(&rewards);
        }
        // A replaced model is measured afresh.
        for t in st.vms.values_mut() {
            if t.model_generation != generation {
                t.model_generation = generation;
                t.selector.forget(MODEL);
            }
        }
        // The model's forecasts, one batch for every VM: each VM on its
        // 5-minute grid, as the model was trained.
        let model_q: HashMap<&str, Quantiles> = match &model {
            Some(m) => {
                let grids: Vec<(&str, Grid, models::Statics)> = st
                    .vms
                    .iter()
                    .filter(|(_, t)| t.mem.iter().filter(|x| !x.is_nan()).count() >= WARMUP)
                    .filter_map(|(vm, t)| {
                        let pts: Vec<(i64, f64)> = t
                            .at_s
                            .iter()
                            .zip(&t.mem)
                            .filter(|(_, v)| v.is_finite())
                            .map(|(&a, &v)| (a, v))
                            .collect();
                        let statics = models::Statics {
                            vcpus: Some(f64::from(t.vcpus)),
                            mem_cap_kb: Some(t.memory_mib as f64 * 1024.0),
                        };
                        Grid::from_samples(&pts).map(|g| (vm.as_str(), g, statics))
                    })
                    .collect();
                let hs: Vec<History<'_>> = grids
                    .iter()
                    .map(|(_, g, statics)| History {
                        values: &g.values,
                        first_slot: g.first_slot,
                        decision_slot: slot_of(unix_s).max(g.last_slot()),
                        statics: *statics,
                    })
                    .collect();
                let qs = m.forecast_batch(&hs);
                grids.iter().map(|(vm, _, _)| *vm).zip(qs).collect()
            }
            None => HashMap::new(),
        };
        // Forecast and decide.
        let mut inputs = Vec::new();
        let mut ids: Vec<&String> = st.vms.keys().collect();
        ids.sort();
        let mut forecasts: Vec<(String, Vec<(String, Quantiles)>)> = Vec::new();
        let mut served: Vec<(String, ServedForecast)> = Vec::new();

        for vm in ids {
            let t = &st.vms[vm];
            let present = t.mem.iter().filter(|x| !x.is_nan()).count();
            if present < WARMUP {
                continue;
            }
            let n = t.mem.len();
            let h = History {
                values: &t.mem,
                first_slot: 0,
                decision_slot: n as i64 - 1,
                statics: models::Statics::default(),
            };
            let mut all = baseline_forecasts(&h);
            if let Some(q) = model_q.get(vm.as_str()) {
                all.push((MODEL.to_string(), *q));
            }
            let choice = t.selector.choose(vm);
            let (chosen, q) = all
                .iter()
                .find(|(n, _)| *n == choice.forecaster)
                .map_or((&all[0].0, all[0].1), |x| (&x.0, x.1));
            let forecaster = match &model {
                Some(m) if chosen == MODEL => m.id.clone(),
                _ => format!("baseline:{chosen}"),
            };
            let reason = if *chosen == choice.forecaster {
                choice.reason.clone()
            } else {
                format!("{} unavailable, fell back", choice.forecaster)
            };
            served.push((
                vm.clone(),
                ServedForecast {
                    vm_id: vm.clone(),
                    at_unix_ms: unix_ms,
                    metric: MEM_METRIC.into(),
                    forecaster,
                    reason,
                    quantiles: q.0,
                },
            ));
            let cpu_h: Vec<f64> = t.cpu.clone();
            let cpu_q = (cpu_h.iter().filter(|x| !x.is_nan()).count() >= WARMUP).then(|| {
                let h = History {
                    values: &cpu_h,
                    first_slot: 0,
                    decision_slot: cpu_h.len() as i64 - 1,
                    statics: models::Statics::default(),
                };
                EwmaSd.forecast(&h, Horizon::NextHour).sanitized()
            });
            let used = t.mem.last().filter(|x| !x.is_nan()).map(|x| {
                // Non-negative MiB below guest RAM.
                #[allow(clippy::cast_possible_truncation)]
                let u = x.max(0.0).ceil() as u64;
                u
            });
            inputs.push(VmShapeInput {
                vm: vm.clone(),
                priority: t.priority,
                memory_mib: t.memory_mib,
                vcpus: t.vcpus,
                floor_mib: self.config.floor_mib.min(t.memory_mib),
                memory: Some(q),
                cpu: cpu_q,
                current_memory_mib: t.reported_target.map(|b| t.memory_mib.saturating_sub(b)),
                current_cpu: None,
                used_mib: used,
            });
            for (label, v) in ["p50", "p90", "p99"].iter().zip(q.0) {
                self.metrics.shape_forecast(vm, label, v);
            }
            forecasts.push((vm.clone(), all));
        }
        for (vm, all) in forecasts {
            if let Some(t) = st.vms.get_mut(&vm) {
                t.candidates = all;
            }
        }
        for (vm, f) in served {
            if let Some(o) = &self.online {
                o.served(f.clone());
            } else {
                Metrics::inc(&self.metrics.forecasts_served, &f.forecaster);
            }
            if let Some(t) = st.vms.get_mut(&vm) {
                t.served = Some(f);
            }
        }
        let margin = st.tuner.choose();
        self.metrics.shape_margin.set(margin);
        if inputs.is_empty() {
            return TickOutcome { margin, plan: None };
        }
        let plan = match self.shaper.shape(&inputs, margin) {
            Ok(p) => p,
            Err(e) => {
                tracing::warn!("shaping skipped this interval: {e}");
                return TickOutcome { margin, plan: None };
            }
        };
        for a in &plan.actions {
            let Some(t) = st.vms.get_mut(&a.vm) else {
                continue;
            };
            if let Some(b) = a.balloon_target_mib {
                // Growth is met by deflating: pre-fault what the forecast
                // expects the guest to use of the memory handed back.
                let handed_back = t.reported_target.map_or(0, |r| r.saturating_sub(b));
                let prefault = a.prefault_mib.min(handed_back);
                t.pending = (t.reported_target != Some(b)).then_some((b, prefault));
            }
            let vm = a.vm.as_str();
            if let Some(m) = a.memory_mib {
                self.metrics
                    .shape_gauge(&self.metrics.shape_grant_mib, vm, m as f64);
            }
            self.metrics
                .shape_gauge(&self.metrics.shape_prefault_mib, vm, a.prefault_mib as f64);
            self.metrics
                .shape_gauge(&self.metrics.shape_vm_margin, vm, a.effective_margin);
            if let (Some(b), Some(pid)) = (&self.binder, t.pid) {
                apply_cgroup(b, vm, pid, a, &mut t.cgroup, &self.metrics);
            }
        }
        st.last = Some(inputs);
        TickOutcome {
            margin,
            plan: Some(plan),
        }
    }

    /// Reward of margin `m` on `inputs` against what each VM used in the
    /// interval just closed (slack and shortfall in % of host memory).
    fn score(&self, inputs: &[VmShapeInput], vms: &HashMap<String, Track>, m: f64) -> f64 {
        let Ok(plan) = self.shaper.shape(inputs, m) else {
            return f64::NAN;
        };
        let (mut slack, mut short) = (0.0, 0.0);
        let mut seen = false;
        for a in &plan.actions {
            let (Some(g), Some(y)) = (
                a.memory_mib,
                vms.get(&a.vm)
                    .and_then(|t| t.mem.last().copied())
                    .filter(|y| !y.is_nan()),
            ) else {
                continue;
            };
            let (s, f) = slack_shortfall(g as f64, y);
            slack += s;
            short += f;
            seen = true;
        }
        if !seen {
            return f64::NAN;
        }
        let cap = (self.shaper.host.memory_mib.max(1)) as f64;
        reward(100.0 * slack / cap, 100.0 * short / cap, self.config.lambda)
    }

    /// Ticks every interval until `shutdown` turns true.
    pub async fn run(self: Arc<Self>, mut shutdown: tokio::sync::watch::Receiver<bool>) {
        let mut every = tokio::time::interval(self.interval());
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        every.tick().await;
        loop {
            tokio::select! {
                _ = shutdown.changed() => break,
                _ = every.tick() => {
                    let me = Arc::clone(&self);
                    // /proc and cgroup files: off the async workers.
                    let done = tokio::task::spawn_blocking(move || me.tick(Instant::now())).await;
                    if let Err(e) = done {
                        tracing::error!("shaping tick failed: {e}");
                    }
                }
            }
        }
    }
}

/// Writes one VM's CPU settings into its cgroup, moving its VMM process
/// there first. A failure is logged once per VM and not retried.
fn apply_cgroup(
    b: &numa::CgroupBinder,
    vm: &str,
    pid: u32,
    a: &crate::shaping::VmAction,
    state: &mut CgroupState,
    metrics: &Metrics,
) {
    if *state == CgroupState::Failed || (a.cpu_weight.is_none() && a.cpu_max.is_none()) {
        return;
    }
    let settings = numa::CgroupSettings {
        cpu_weight: a.cpu_weight,
        cpu_max: a.cpu_max.map(|c| numa::CpuMax {
            quota_us: Some(c.quota_us),
            period_us: c.period_us,
        }),
        ..numa::CgroupSettings::default()
    };
    let applied = b.apply(vm, &settings).and_then(|out| {
        if *state == CgroupState::None {
            b.attach(vm, pid)?;
        }
        Ok(out)
    });
    match applied {
        Ok(out) => {
            *state = CgroupState::Attached;
            Metrics::inc(&metrics.shape_actions, "cgroup-set");
            for s in &out.skipped {
                tracing::debug!(vm, setting = s.setting, "skipped: {}", s.reason);
            }
        }
        Err(e) => {
            *state = CgroupState::Failed;
            Metrics::inc(&metrics.shape_actions, "cgroup-failed");
            tracing::error!(vm, pid, "cannot set the VM's cgroup: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmm_hooks::{VmIdentity, VmSpec};

    /// `created` (seq 0) of a labvm VM with 2 vCPUs and 1 GiB.
    fn created_1g(vm: &str) -> Event {
        event(
            vm,
            0,
            EventKind::Created {
                spec: VmSpec {
                    vcpus: 2,
                    memory_mib: 1024,
                    vmm: "labvm".into(),
                    priority: 0,
                    interruptible: false,
                },
            },
        )
    }

    fn event(vm: &str, seq: u64, kind: EventKind) -> Event {
        Event {
            vm: VmIdentity {
                vm_id: vm.into(),
                image_digest: "i".into(),
                package_digest: "p".into(),
            },
            seq,
            at_unix_ms: 0,
            kind,
        }
    }

    fn status(target: u64, used_mib: u64) -> BalloonStatus {
        let mut s = BalloonStatus::new(1024);
        s.target_mib = target;
        s.actual_mib = target;
        s.stats_updates = 1;
        s.guest_stats = vec![
            ("total-memory".into(), 1024 << 20),
            ("available-memory".into(), (1024 - used_mib) << 20),
        ];
        s
    }

    fn shaping(policy: ShapePolicy) -> ShapingLoop {
        let c = ShapingConfig {
            interval_s: 10,
            policy,
            host_memory_mib: Some(1 << 20),
            host_cpus: Some(16.0),
            ..ShapingConfig::default()
        };
        ShapingLoop::new(c, Arc::new(Metrics::new())).unwrap()
    }

    /// Replays a VM's balloon statuses with time injected: after the
    /// warm-up the loop forecasts its usage and answers the next status
    /// with a target that leaves the guest the forecast plus margin.
    #[test]
    fn loop_answers_balloon_status_with_a_target_from_the_forecast() {
        let l = shaping(ShapePolicy::MaximiseUtilisation);
        let t0 = Instant::now();
        let created = created_1g("vm-a");
        assert_eq!(l.observe(&created, None, HookReply::Ack), HookReply::Ack);
        let mut target = 0;
        let mut seq = 1;
        let mut answered = None;
        for k in 0..6u64 {
            for _ in 0..3 {
                let e = event("vm-a", seq, EventKind::Balloon(status(target, 300)));
                seq += 1;
                if let HookReply::BalloonTarget { target_mib, .. } =
                    l.observe(&e, None, HookReply::Ack)
                {
                    answered.get_or_insert(k);
                    target = target_mib;
                }
            }
            let out = l.tick(t0 + Duration::from_secs(10 * (k + 1)));
            if k + 1 < WARMUP as u64 {
                assert!(out.plan.is_none());
            }
        }
        // First target right after the warm-up ticks.
        assert_eq!(answered, Some(WARMUP as u64));
        // Forecast 300 MiB in use: the guest keeps 300 plus the margin.
        let grant = 1024 - target;
        assert!((300..=600).contains(&grant), "grant {grant}");
        let text = l.metrics.render();
        assert!(
            text.contains(r#"prescient_shape_actual_mib{vm="vm-a"} 300"#),
            "{text}"
        );
        assert!(
            text.contains(r#"prescient_shape_forecast_mib{vm="vm-a",quantile="p90"} 300"#),
            "{text}"
        );
        assert!(
            text.contains(r#"prescient_shape_vm_margin{vm="vm-a"}"#),
            "{text}"
        );
        assert!(
            text.contains("prescient_shape_actions_total{kind=\"balloon-target\"}"),
            "{text}"
        );
        // Stopped: forgotten, and gone from the metrics.
        l.observe(
            &event(
                "vm-a",
                seq,
                EventKind::Stopped {
                    status: vmm_hooks::StopStatus::Stopped,
                },
            ),
            None,
            HookReply::Ack,
        );
        assert!(!l.metrics.render().contains("vm-a"));
    }

    /// A guest squeezed by its balloon whose use swings up: the loop
    /// deflates, and asks for the growth it forecasts to be pre-faulted,
    /// never more than the deflation hands back.
    #[test]
    fn loop_deflates_for_forecast_growth_and_asks_for_it_to_be_prefaulted() {
        let l = shaping(ShapePolicy::MaximiseUtilisation);
        let t0 = Instant::now();
        let created = created_1g("vm-g");
        l.observe(&created, None, HookReply::Ack);
        // The balloon holds 800 MiB: the guest has 224 and its use swings
        // between 120 and 300 MiB from one interval to the next; it is in a
        // low interval now.
        let reported = 800;
        let mut seq = 1;
        for k in 0..9u64 {
            let used = if k % 2 == 0 { 120 } else { 300 };
            for _ in 0..3 {
                let e = event("vm-g", seq, EventKind::Balloon(status(reported, used)));
                seq += 1;
                l.observe(&e, None, HookReply::Ack);
            }
            l.tick(t0 + Duration::from_secs(10 * (k + 1)));
        }
        let e = event("vm-g", seq, EventKind::Balloon(status(reported, 120)));
        let HookReply::BalloonTarget {
            target_mib: target,
            prefault_mib: prefault,
        } = l.observe(&e, None, HookReply::Ack)
        else {
            panic!("no balloon target: {}", l.metrics.render());
        };
        assert!(target < reported, "target {target}: no deflation");
        assert!(prefault > 0, "no pre-fault asked for the forecast growth");
        assert!(
            prefault <= reported - target,
            "pre-fault {prefault} MiB exceeds the {} MiB handed back",
            reported - target
        );
        assert!(
            l.metrics
                .render()
                .contains("prescient_shape_actions_total{kind=\"prefault-growth\"}"),
        );
    }

    /// With a model loaded, the model competes; once the VM's selector has
    /// measured it better than every baseline, the served forecast is the
    /// model's and names it by file checksum and version, in the stored
    /// record, the status and the metrics. Before, the best baseline serves
    /// and says why.
    #[test]
    fn a_model_measured_better_serves_and_its_id_is_recorded() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.model");
        models::LearnedForecaster::untrained(8).save(&path).unwrap();
        let metrics = Arc::new(Metrics::new());
        let online = Arc::new(Online::new(
            crate::online::ForecastConfig {
                model: Some(path.clone()),
                min_outcomes: 3,
                ..crate::online::ForecastConfig::default()
            },
            None,
            Arc::clone(&metrics),
        ));
        let id = online.model().unwrap().id.clone();
        let c = ShapingConfig {
            interval_s: 300,
            host_memory_mib: Some(1 << 20),
            host_cpus: Some(16.0),
            ..ShapingConfig::default()
        };
        let l = ShapingLoop::new(c, Arc::clone(&metrics))
            .unwrap()
            .with_online(online);
        let t0 = Instant::now();
        let u0 = 1_795_000_000_000i64;
        l.observe(&created_1g("vm-m"), None, HookReply::Ack);
        let mut seq = 1;
        let mut step = |k: u64, used: u64| {
            let e = event("vm-m", seq, EventKind::Balloon(status(0, used)));
            seq += 1;
            l.observe(&e, None, HookReply::Ack);
            let at = i64::try_from(k).unwrap() * 300_000;
            l.tick_at(t0 + Duration::from_secs(300 * k), u0 + at)
        };
        for k in 0..3 {
            step(k, 200 + 100 * (k % 2));
        }
        let served = l.served();
        assert_eq!(served.len(), 1);
        assert!(served[0].forecaster.starts_with("baseline:"), "{served:?}");
        assert!(served[0].reason.contains("model outcomes"), "{served:?}");
        assert_eq!(served[0].at_unix_ms, u0 + 2 * 300_000);
        // The selector has measured the model exact and every baseline far
        // off (a faithful record of outcomes, at the selector's seam).
        {
            let mut st = l.lock();
            let sel = &mut st.vms.get_mut("vm-m").unwrap().selector;
            for _ in 0..500 {
                sel.record("vm-m", MODEL, 250.0, &Quantiles([250.0; 3]));
                for b in ["prev_hour", "prev_24h", "ewma_sd"] {
                    sel.record("vm-m", b, 1e9, &Quantiles([0.0; 3]));
                }
            }
        }
        step(3, 250);
        let served = l.served();
        assert_eq!(served[0].forecaster, id, "{served:?}");
        assert!(
            served[0].reason.contains("model measured better"),
            "{served:?}"
        );
        let text = metrics.render();
        assert!(
            text.contains(&format!(
                "prescient_forecasts_served_total{{kind=\"{id}\"}} 1"
            )),
            "{text}"
        );
        assert!(
            text.contains("prescient_forecasts_served_total{kind=\"baseline:"),
            "{text}"
        );
    }

    #[test]
    fn a_peer_inventing_vm_ids_cannot_grow_the_loop_past_its_limit() {
        let l = shaping(ShapePolicy::MaximiseUtilisation);
        for i in 0..MAX_VMS + 10 {
            let e = event(&format!("vm-{i}"), 0, EventKind::Balloon(status(0, 10)));
            assert_eq!(l.observe(&e, None, HookReply::Ack), HookReply::Ack);
        }
        assert_eq!(l.lock().vms.len(), MAX_VMS);
    }

    #[test]
    fn bad_configuration_is_refused_with_the_key() {
        for c in [
            ShapingConfig {
                lambda: -1.0,
                ..ShapingConfig::default()
            },
            ShapingConfig {
                cgroup_parent: "../etc".into(),
                ..ShapingConfig::default()
            },
            ShapingConfig {
                host_cpus: Some(0.0),
                ..ShapingConfig::default()
            },
        ] {
            let e = c.validate().unwrap_err().to_string();
            assert!(e.contains("shaping."), "{e}");
        }
    }

    #[test]
    fn proc_stat_ticks_of_this_process_are_read() {
        let me = std::process::id();
        assert!(process_ticks(me).is_some());
        assert!(process_ticks(u32::MAX).is_none());
    }
}
