//! The shaping loop's pure core: from per-VM demand forecasts (quantiles
//! over the horizon), the VMs' sizes, floors, priorities and the host's
//! capacity, decide each VM's memory grant (its balloon target), how much
//! predicted growth to pre-fault, and its cgroup CPU weight and limit; and
//! tune the headroom margin online from what each interval's outcome says
//! every margin would have cost.
//!
//! Nothing here reads a clock or touches the host: the daemon adapter
//! (`shape_loop.rs`) and the trace replay (`shape_replay.rs`) feed it and
//! apply what it returns.
//!
//! **Grants.** For each resource a VM has a forecast of (memory in MiB, CPU
//! in cores), the grant it *wants* is `p90 + margin * (p90 + g * (p90 -
//! p50))`: the p90 plus a headroom that widens with the forecast's spread
//! (`g` = [`ShapeLimits::spread_gain`]). It *needs* at least its floor; its
//! p50 is the level a policy cuts to before it cuts to the floor. Grants
//! never go below the floor or above the VM's size, and the total stays
//! within the host's capacity whenever the floors fit (otherwise every VM
//! is at its floor and the plan says it is overcommitted).
//!
//! **Thresholds.** A grant moves only when the new one differs from the
//! current one by more than a band (`hysteresis_frac` of the VM's size),
//! and the band narrows as the forecast's relative spread grows: an
//! uncertain forecast is acted on sooner.
//!
//! **Policies** ([`ShapePolicy`]) decide how grants are cut when the host
//! is short, and how they are rounded:
//! - `maximise-utilisation`: every VM gets exactly what its forecast and
//!   the margin ask for, nothing more (the rest of the host stays free for
//!   other VMs); under contention every VM's headroom is cut in the same
//!   proportion, then every VM's grant towards its p50, then towards its
//!   floor.
//! - `favour-high-priority`: under contention the lowest priority is cut
//!   first, all the way to its floor, before any higher priority gives up
//!   anything; CPU weights double per priority level.
//! - `minimise-fragmentation`: grants are whole granules (memory in
//!   `memory_granule_mib`, CPU in `cpu_granule`), so balloons move in large
//!   blocks and host memory is handed out and returned in large pieces;
//!   contention is shared proportionally, in granules.

use serde::{Deserialize, Serialize};

use models::Quantiles;

/// Smallest `cpu.max` quota the kernel accepts, microseconds.
pub const MIN_CPU_QUOTA_US: u64 = 1000;

/// What the shaper refuses.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ShapeError {
    /// `shaping.cgroups` is on and the host's cgroup layout cannot be read.
    #[error("shaping.cgroups: cannot read the host's cgroup layout (turn it off or mount cgroups)")]
    Cgroups(#[source] numa::BindError),
    /// A VM's input is inconsistent.
    #[error("VM {vm}: {reason}")]
    Vm {
        /// The VM id.
        vm: String,
        /// What is wrong.
        reason: String,
    },
    /// A setting is out of range.
    #[error("shaping setting {setting} = {value}: {reason}")]
    Setting {
        /// The setting.
        setting: &'static str,
        /// The value given.
        value: String,
        /// What is allowed.
        reason: &'static str,
    },
}

/// How grants are cut under contention and rounded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ShapePolicy {
    /// Grants in whole granules; contention shared proportionally.
    MinimiseFragmentation,
    /// Grants exactly as forecast plus margin; contention shared
    /// proportionally.
    #[default]
    MaximiseUtilisation,
    /// Contention taken from the lowest priority first.
    FavourHighPriority,
}

impl ShapePolicy {
    /// Every policy, in table order.
    pub const ALL: [ShapePolicy; 3] = [
        ShapePolicy::MinimiseFragmentation,
        ShapePolicy::MaximiseUtilisation,
        ShapePolicy::FavourHighPriority,
    ];

    /// The name used in configuration and tables.
    pub fn name(self) -> &'static str {
        match self {
            ShapePolicy::MinimiseFragmentation => "minimise-fragmentation",
            ShapePolicy::MaximiseUtilisation => "maximise-utilisation",
            ShapePolicy::FavourHighPriority => "favour-high-priority",
        }
    }
}

impl std::str::FromStr for ShapePolicy {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        ShapePolicy::ALL
            .into_iter()
            .find(|p| p.name() == s)
            .ok_or_else(|| {
                format!(
                    "unknown shaping policy {s:?} (minimise-fragmentation, maximise-utilisation, favour-high-priority)"
                )
            })
    }
}

/// The host's capacity for shaped VMs.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct HostCapacity {
    /// Memory the shaped VMs may hold together, MiB.
    pub memory_mib: u64,
    /// CPU the shaped VMs may use together, in cores.
    pub cpus: f64,
}

/// Knobs of the shaper (all have defaults).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ShapeLimits {
    /// How much the spread `p90 - p50` adds to the headroom, per unit of
    /// margin.
    pub spread_gain: f64,
    /// A grant moves only by more than this share of the VM's size (at a
    /// forecast without spread; the band narrows as the spread grows).
    pub hysteresis_frac: f64,
    /// Memory granule of `minimise-fragmentation`, MiB.
    pub memory_granule_mib: u64,
    /// CPU granule of `minimise-fragmentation`, cores.
    pub cpu_granule: f64,
    /// `cpu.max` period, microseconds.
    pub cpu_period_us: u64,
    /// The least CPU a VM is granted, cores.
    pub min_cpu: f64,
}

impl Default for ShapeLimits {
    fn default() -> Self {
        ShapeLimits {
            spread_gain: 1.0,
            hysteresis_frac: 0.02,
            memory_granule_mib: 128,
            cpu_granule: 0.25,
            cpu_period_us: 100_000,
            min_cpu: 0.05,
        }
    }
}

impl ShapeLimits {
    /// Checks every value.
    pub fn validate(&self) -> Result<(), ShapeError> {
        let bad = |setting, value: String, reason| ShapeError::Setting {
            setting,
            value,
            reason,
        };
        if !(self.spread_gain.is_finite() && (0.0..=10.0).contains(&self.spread_gain)) {
            return Err(bad(
                "spread_gain",
                self.spread_gain.to_string(),
                "must be 0 to 10",
            ));
        }
        if !(self.hysteresis_frac.is_finite() && (0.0..0.5).contains(&self.hysteresis_frac)) {
            return Err(bad(
                "hysteresis_frac",
                self.hysteresis_frac.to_string(),
                "must be at least 0 and below 0.5",
            ));
        }
        if self.memory_granule_mib == 0 || self.memory_granule_mib > 65_536 {
            return Err(bad(
                "memory_granule_mib",
                self.memory_granule_mib.to_string(),
                "must be 1 to 65536",
            ));
        }
        if !(self.cpu_granule.is_finite() && self.cpu_granule > 0.0 && self.cpu_granule <= 64.0) {
            return Err(bad(
                "cpu_granule",
                self.cpu_granule.to_string(),
                "must be above 0 and at most 64",
            ));
        }
        if !(1000..=1_000_000).contains(&self.cpu_period_us) {
            return Err(bad(
                "cpu_period_us",
                self.cpu_period_us.to_string(),
                "must be 1000 to 1000000",
            ));
        }
        if !(self.min_cpu.is_finite() && self.min_cpu >= 0.01 && self.min_cpu <= 64.0) {
            return Err(bad(
                "min_cpu",
                self.min_cpu.to_string(),
                "must be 0.01 to 64",
            ));
        }
        Ok(())
    }
}

/// What the shaper knows of one VM this interval.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VmShapeInput {
    /// The VM id.
    pub vm: String,
    /// Higher is more important.
    pub priority: i32,
    /// Guest RAM, MiB.
    pub memory_mib: u64,
    /// vCPUs.
    pub vcpus: u32,
    /// Memory the guest always keeps, MiB.
    pub floor_mib: u64,
    /// Memory demand over the horizon, MiB (none: memory is not shaped).
    pub memory: Option<Quantiles>,
    /// CPU demand over the horizon, cores (none: CPU is not shaped).
    pub cpu: Option<Quantiles>,
    /// Memory granted now (guest RAM minus the balloon), MiB.
    pub current_memory_mib: Option<u64>,
    /// CPU granted now, cores.
    pub current_cpu: Option<f64>,
    /// Memory the guest uses now, MiB (for the pre-fault amount).
    pub used_mib: Option<u64>,
}

/// A `cpu.max` setting: `quota_us` per `period_us`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct CpuLimit {
    /// CPU time per period, microseconds.
    pub quota_us: u64,
    /// The period, microseconds.
    pub period_us: u64,
}

/// What to do to one VM this interval.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VmAction {
    /// The VM id.
    pub vm: String,
    /// Memory granted, MiB (guest RAM minus the balloon).
    pub memory_mib: Option<u64>,
    /// The balloon target, MiB.
    pub balloon_target_mib: Option<u64>,
    /// Predicted growth to make resident ahead of use, MiB: the grant's
    /// share of the p90 above what the guest uses now.
    pub prefault_mib: u64,
    /// CPU granted, cores.
    pub cpu: Option<f64>,
    /// `cpu.weight` (1 to 10000).
    pub cpu_weight: Option<u32>,
    /// `cpu.max`.
    pub cpu_max: Option<CpuLimit>,
    /// The margin after widening by the memory (else CPU) forecast's spread.
    pub effective_margin: f64,
    /// The relative spread `(p90 - p50) / p90` of the memory (else CPU)
    /// forecast.
    pub spread: f64,
    /// Whether the policy cut this VM below what it wanted.
    pub cut: bool,
}

/// The actions of one interval.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ShapePlan {
    /// One per input VM, in input order.
    pub actions: Vec<VmAction>,
    /// Memory granted in total, MiB.
    pub memory_mib: u64,
    /// CPU granted in total, cores.
    pub cpus: f64,
    /// Whether the floors alone exceed the host (memory or CPU).
    pub overcommitted: bool,
}

/// The pure shaper.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Shaper {
    /// The policy.
    pub policy: ShapePolicy,
    /// The host.
    pub host: HostCapacity,
    /// The knobs.
    pub limits: ShapeLimits,
}

/// One resource's levels for one VM: floor <= mid <= wanted.
#[derive(Debug, Clone, Copy)]
struct Levels {
    low: f64,
    mid: f64,
    high: f64,
}

/// Relative spread of a forecast, in [0, 1].
/// The next hour's forecast of each baseline the shaping loop (and its
/// replay) chooses among, by the forecaster's name.
pub(crate) fn baseline_forecasts(h: &models::History) -> Vec<(String, Quantiles)> {
    use models::Forecaster;
    let candidates: [&dyn Forecaster; 3] = [
        &models::PrevWindow::hour(),
        &models::PrevWindow::day(),
        &models::EwmaSd,
    ];
    candidates
        .iter()
        .map(|f| {
            (
                f.name().to_string(),
                f.forecast(h, models::Horizon::NextHour).sanitized(),
            )
        })
        .collect()
}

fn rel_spread(q: &Quantiles) -> f64 {
    let p90 = q.p90();
    if p90 <= 0.0 {
        return 0.0;
    }
    ((p90 - q.p50()) / p90).clamp(0.0, 1.0)
}

/// What a VM wants of a resource at `margin`.
fn wanted(q: &Quantiles, margin: f64, gain: f64) -> f64 {
    q.p90() + margin * (q.p90() + gain * (q.p90() - q.p50()))
}

impl Shaper {
    /// A shaper (settings checked).
    pub fn new(
        policy: ShapePolicy,
        host: HostCapacity,
        limits: ShapeLimits,
    ) -> Result<Self, ShapeError> {
        limits.validate()?;
        if !(host.cpus.is_finite() && host.cpus >= 0.0) {
            return Err(ShapeError::Setting {
                setting: "host.cpus",
                value: host.cpus.to_string(),
                reason: "must be a finite, non-negative number of cores",
            });
        }
        Ok(Shaper {
            policy,
            host,
            limits,
        })
    }

    fn check(vm: &VmShapeInput, margin: f64) -> Result<(), ShapeError> {
        let bad = |reason: String| ShapeError::Vm {
            vm: vm.vm.clone(),
            reason,
        };
        if !(margin.is_finite() && (0.0..=10.0).contains(&margin)) {
            return Err(bad(format!("margin {margin} is not in 0 to 10")));
        }
        if vm.floor_mib > vm.memory_mib {
            return Err(bad(format!(
                "floor of {} MiB exceeds guest RAM of {} MiB",
                vm.floor_mib, vm.memory_mib
            )));
        }
        if vm.vcpus == 0 {
            return Err(bad("no vCPUs".into()));
        }
        for q in vm.memory.iter().chain(&vm.cpu) {
            if q.0.iter().any(|x| !x.is_finite() || *x < 0.0) {
                return Err(bad(format!("forecast {:?} is negative or not finite", q.0)));
            }
        }
        if let Some(c) = vm.current_cpu
            && !(c.is_finite() && c >= 0.0)
        {
            return Err(bad(format!("current CPU {c} is not a finite share")));
        }
        Ok(())
    }

    /// The actions for `vms` at headroom `margin` (0.1 = 10 %).
    pub fn shape(&self, vms: &[VmShapeInput], margin: f64) -> Result<ShapePlan, ShapeError> {
        for vm in vms {
            Self::check(vm, margin)?;
        }
        let l = &self.limits;
        let frag = self.policy == ShapePolicy::MinimiseFragmentation;
        let by_rank = self.policy == ShapePolicy::FavourHighPriority;
        let ranks = priority_ranks(vms);

        // Memory levels, in whole MiB (granules for fragmentation).
        let g = l.memory_granule_mib as f64;
        let mut mem_idx = Vec::new();
        let mut mem_levels = Vec::new();
        for (i, vm) in vms.iter().enumerate() {
            let Some(q) = vm.memory.map(Quantiles::sanitized) else {
                continue;
            };
            let size = vm.memory_mib as f64;
            let floor = vm.floor_mib as f64;
            let up = |x: f64| {
                let x = if frag { (x / g).ceil() * g } else { x.ceil() };
                x.clamp(floor, size)
            };
            let mut high = up(wanted(&q, margin, l.spread_gain));
            let mid = up(q.p50()).min(high);
            if let Some(cur) = vm.current_memory_mib.map(|c| c as f64) {
                let band = l.hysteresis_frac * size * (1.0 - rel_spread(&q));
                if (high - cur).abs() <= band && cur >= mid && cur <= size {
                    high = up(cur);
                }
            }
            mem_idx.push(i);
            mem_levels.push(Levels {
                low: floor,
                mid,
                high,
            });
        }
        let mem_ranks: Vec<usize> = mem_idx.iter().map(|&i| ranks[i]).collect();
        let (mem, mem_over) = fit(
            &mem_levels,
            &mem_ranks,
            self.host.memory_mib as f64,
            by_rank,
        );
        let mem = integral(&mem, &mem_levels, &mem_ranks, self.host.memory_mib, |x| {
            if frag { (x / g).floor() * g } else { x.floor() }
        });

        // CPU levels, in cores (granules for fragmentation).
        let cg = l.cpu_granule;
        let mut cpu_idx = Vec::new();
        let mut cpu_levels = Vec::new();
        for (i, vm) in vms.iter().enumerate() {
            let Some(q) = vm.cpu.map(Quantiles::sanitized) else {
                continue;
            };
            let size = f64::from(vm.vcpus);
            let floor = l.min_cpu.min(size);
            let up = |x: f64| {
                let x = if frag { (x / cg).ceil() * cg } else { x };
                x.clamp(floor, size)
            };
            let mut high = up(wanted(&q, margin, l.spread_gain));
            let mid = up(q.p50()).min(high);
            if let Some(cur) = vm.current_cpu {
                let band = l.hysteresis_frac * size * (1.0 - rel_spread(&q));
                if (high - cur).abs() <= band && cur >= mid && cur <= size {
                    high = up(cur);
                }
            }
            cpu_idx.push(i);
            cpu_levels.push(Levels {
                low: floor,
                mid,
                high,
            });
        }
        let cpu_ranks: Vec<usize> = cpu_idx.iter().map(|&i| ranks[i]).collect();
        let (mut cpu, cpu_over) = fit(&cpu_levels, &cpu_ranks, self.host.cpus, by_rank);
        if frag {
            for (c, lv) in cpu.iter_mut().zip(&cpu_levels) {
                *c = ((*c / cg).floor() * cg).max(lv.low);
            }
        }

        let mut actions: Vec<VmAction> = vms
            .iter()
            .map(|vm| {
                let q = vm.memory.or(vm.cpu).map(Quantiles::sanitized);
                let spread = q.as_ref().map_or(0.0, rel_spread);
                let effective_margin = q.map_or(margin, |q| {
                    if q.p90() > 0.0 {
                        (wanted(&q, margin, l.spread_gain) - q.p90()) / q.p90()
                    } else {
                        margin
                    }
                });
                VmAction {
                    vm: vm.vm.clone(),
                    memory_mib: None,
                    balloon_target_mib: None,
                    prefault_mib: 0,
                    cpu: None,
                    cpu_weight: None,
                    cpu_max: None,
                    effective_margin,
                    spread,
                    cut: false,
                }
            })
            .collect();
        for ((&i, &m), lv) in mem_idx.iter().zip(&mem).zip(&mem_levels) {
            let vm = &vms[i];
            let a = &mut actions[i];
            a.memory_mib = Some(m);
            a.balloon_target_mib = Some(vm.memory_mib - m);
            a.cut |= (m as f64) < lv.high;
            if let (Some(used), Some(q)) = (vm.used_mib, vm.memory.map(Quantiles::sanitized)) {
                // Growth the forecast expects, as far as the grant covers it.
                let expect = q.p90().min(m as f64);
                // Finite and within guest RAM (checked above).
                #[allow(clippy::cast_possible_truncation)]
                let expect = expect.max(0.0).ceil() as u64;
                a.prefault_mib = expect.saturating_sub(used);
            }
        }
        let period = l.cpu_period_us as f64;
        for ((&i, &c), lv) in cpu_idx.iter().zip(&cpu).zip(&cpu_levels) {
            let a = &mut actions[i];
            a.cpu = Some(c);
            a.cut |= c < lv.high - 1e-9;
            // Bounded by vCPUs * period (checked); the cast saturates.
            #[allow(clippy::cast_possible_truncation)]
            let quota = ((c * period).floor() as u64).max(MIN_CPU_QUOTA_US);
            a.cpu_max = Some(CpuLimit {
                quota_us: quota,
                period_us: l.cpu_period_us,
            });
            let boost = if by_rank {
                2f64.powi(i32::try_from(ranks[i].min(20)).unwrap_or(20))
            } else {
                1.0
            };
            // Clamped to 1..=10000 before the cast.
            #[allow(clippy::cast_possible_truncation)]
            let w = (100.0 * c * boost).round().clamp(1.0, 10_000.0) as u32;
            a.cpu_weight = Some(w);
        }
        let memory_mib = mem.iter().sum();
        let cpus = cpu.iter().sum();
        Ok(ShapePlan {
            actions,
            memory_mib,
            cpus,
            overcommitted: mem_over || cpu_over,
        })
    }
}

/// Dense rank of each VM's priority (0 = lowest priority present).
fn priority_ranks(vms: &[VmShapeInput]) -> Vec<usize> {
    let mut ps: Vec<i32> = vms.iter().map(|v| v.priority).collect();
    ps.sort_unstable();
    ps.dedup();
    vms.iter()
        .map(|v| ps.partition_point(|&p| p < v.priority))
        .collect()
}

/// Cuts amounts from `high` towards `mid`, then towards `low`, until they
/// fit `cap`. Proportionally across all items, or (`by_rank`) lowest rank
/// first, each rank to its floor before the next rank gives anything.
/// Returns the amounts and whether even the floors exceed `cap`.
fn fit(levels: &[Levels], ranks: &[usize], cap: f64, by_rank: bool) -> (Vec<f64>, bool) {
    let mut amt: Vec<f64> = levels.iter().map(|l| l.high).collect();
    let total: f64 = amt.iter().sum();
    let mut excess = total - cap;
    if excess <= 0.0 {
        return (amt, false);
    }
    // Each step: (which items, from which level to which).
    type Pick = fn(&Levels) -> (f64, f64);
    let stages: [Pick; 2] = [|l| (l.high, l.mid), |l| (l.mid, l.low)];
    let mut groups: Vec<Vec<usize>> = Vec::new();
    if by_rank {
        let max_rank = ranks.iter().copied().max().unwrap_or(0);
        for r in 0..=max_rank {
            let g: Vec<usize> = (0..levels.len()).filter(|&i| ranks[i] == r).collect();
            if !g.is_empty() {
                groups.push(g);
            }
        }
    } else {
        groups.push((0..levels.len()).collect());
    }
    // Proportional: stage-major over one group. By rank: rank-major, each
    // rank through both stages.
    let mut steps: Vec<(usize, Pick)> = Vec::new();
    if by_rank {
        for gi in 0..groups.len() {
            for s in stages {
                steps.push((gi, s));
            }
        }
    } else {
        for s in stages {
            steps.push((0, s));
        }
    }
    // Rounding residue of a cut is not a reason to cut further.
    let tolerance = 1e-9 * cap.max(1.0);
    for (gi, stage) in steps {
        if excess <= tolerance {
            break;
        }
        let group = &groups[gi];
        let room: f64 = group
            .iter()
            .map(|&i| {
                let (from, to) = stage(&levels[i]);
                (amt[i].min(from) - to).max(0.0)
            })
            .sum();
        if room <= 0.0 {
            continue;
        }
        let frac = (excess / room).min(1.0);
        for &i in group {
            let (from, to) = stage(&levels[i]);
            let r = (amt[i].min(from) - to).max(0.0);
            amt[i] = if frac >= 1.0 {
                to.min(amt[i])
            } else {
                amt[i] - r * frac
            };
        }
        excess -= room * frac;
    }
    let over = excess > tolerance;
    if over {
        for (a, l) in amt.iter_mut().zip(levels) {
            *a = l.low;
        }
    }
    (amt, over)
}

/// Whole MiB from fitted amounts: rounded down (by `round`, never below the
/// floor), then, if rounding error left the total above `cap` while the
/// floors fit, trimmed one MiB at a time from the lowest rank that still
/// has room above its floor.
fn integral(
    amt: &[f64],
    levels: &[Levels],
    ranks: &[usize],
    cap: u64,
    round: impl Fn(f64) -> f64,
) -> Vec<u64> {
    // Amounts are finite, between a floor and guest RAM (both u64).
    #[allow(clippy::cast_possible_truncation)]
    let mut out: Vec<u64> = amt
        .iter()
        .zip(levels)
        .map(|(&a, l)| round(a).max(l.low) as u64)
        .collect();
    #[allow(clippy::cast_possible_truncation)]
    let floors: Vec<u64> = levels.iter().map(|l| l.low as u64).collect();
    let floor_total: u64 = floors.iter().sum();
    let mut total: u64 = out.iter().sum();
    if floor_total > cap {
        return out;
    }
    let mut order: Vec<usize> = (0..out.len()).collect();
    order.sort_by_key(|&i| ranks[i]);
    for &i in &order {
        if total <= cap {
            break;
        }
        let cut = (total - cap).min(out[i] - floors[i]);
        out[i] -= cut;
        total -= cut;
    }
    out
}

/// Slack and shortfall of one resource: granted minus used, either way.
pub fn slack_shortfall(granted: f64, used: f64) -> (f64, f64) {
    ((granted - used).max(0.0), (used - granted).max(0.0))
}

/// The reward of one interval: `-(slack + lambda * shortfall)`.
pub fn reward(slack: f64, shortfall: f64, lambda: f64) -> f64 {
    -(slack + lambda * shortfall)
}

/// How the tuner learns.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum TunerMode {
    /// Every arm's reward is known after each interval (the shaper is pure,
    /// so what another margin would have granted is recomputed): follow the
    /// arm with the best discounted mean reward.
    #[default]
    FullInformation,
    /// Only the played arm's reward is known: UCB1 with the exploration
    /// bonus scaled by the observed reward range.
    Ucb1,
}

impl TunerMode {
    /// The name used in tables.
    pub fn name(self) -> &'static str {
        match self {
            TunerMode::FullInformation => "full-information",
            TunerMode::Ucb1 => "ucb1",
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
struct Arm {
    /// Discounted reward sum and weight (full information), or plain sum
    /// and count (UCB1).
    sum: f64,
    weight: f64,
    plays: u64,
}

/// The online headroom-margin tuner: a choice among discrete margins,
/// learnt from each interval's reward `-(slack + lambda * shortfall)`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MarginTuner {
    arms: Vec<f64>,
    stats: Vec<Arm>,
    mode: TunerMode,
    /// Weight kept by older rewards per interval (full information).
    discount: f64,
    t: u64,
    chosen: usize,
    lo: f64,
    hi: f64,
}

/// The margins the tuner chooses among by default.
pub const DEFAULT_ARMS: [f64; 9] = [0.0, 0.05, 0.1, 0.15, 0.25, 0.35, 0.5, 0.75, 1.0];

impl MarginTuner {
    /// A tuner over `arms` (margins, ascending, 0 to 10).
    pub fn new(arms: &[f64], mode: TunerMode, discount: f64) -> Result<Self, ShapeError> {
        let sorted = arms.windows(2).all(|w| w[0] < w[1]);
        if arms.is_empty()
            || !sorted
            || arms
                .iter()
                .any(|a| !a.is_finite() || !(0.0..=10.0).contains(a))
        {
            return Err(ShapeError::Setting {
                setting: "margins",
                value: format!("{arms:?}"),
                reason: "must be ascending margins from 0 to 10",
            });
        }
        if !(discount > 0.0 && discount <= 1.0) {
            return Err(ShapeError::Setting {
                setting: "discount",
                value: discount.to_string(),
                reason: "must be above 0 and at most 1",
            });
        }
        Ok(MarginTuner {
            arms: arms.to_vec(),
            stats: vec![Arm::default(); arms.len()],
            mode,
            discount,
            t: 0,
            chosen: 0,
            lo: f64::INFINITY,
            hi: f64::NEG_INFINITY,
        })
    }

    /// The margins.
    pub fn arms(&self) -> &[f64] {
        &self.arms
    }

    /// How it learns.
    pub fn mode(&self) -> TunerMode {
        self.mode
    }

    /// The arm played last.
    pub fn chosen(&self) -> usize {
        self.chosen
    }

    /// How often each arm was played.
    pub fn plays(&self) -> Vec<u64> {
        self.stats.iter().map(|a| a.plays).collect()
    }

    fn mean(a: &Arm) -> f64 {
        if a.weight > 0.0 {
            a.sum / a.weight
        } else {
            f64::NEG_INFINITY
        }
    }

    /// The margin to use this interval.
    pub fn choose(&mut self) -> f64 {
        self.t += 1;
        let i = match self.mode {
            TunerMode::FullInformation => self.best(),
            TunerMode::Ucb1 => {
                if let Some(i) = self.stats.iter().position(|a| a.plays == 0) {
                    i
                } else {
                    let range = if self.hi > self.lo {
                        self.hi - self.lo
                    } else {
                        1.0
                    };
                    let ln_t = (self.t as f64).ln();
                    let mut best = 0;
                    let mut best_v = f64::NEG_INFINITY;
                    for (i, a) in self.stats.iter().enumerate() {
                        let v = Self::mean(a) + range * (2.0 * ln_t / a.plays as f64).sqrt();
                        if v > best_v {
                            best_v = v;
                            best = i;
                        }
                    }
                    best
                }
            }
        };
        self.chosen = i;
        self.stats[i].plays += 1;
        self.arms[i]
    }

    /// The arm with the best mean reward so far (ties: the smaller margin).
    pub fn best(&self) -> usize {
        let mut best = 0;
        let mut best_v = f64::NEG_INFINITY;
        for (i, a) in self.stats.iter().enumerate() {
            let v = Self::mean(a);
            if v > best_v {
                best_v = v;
                best = i;
            }
        }
        best
    }

    fn note(&mut self, r: f64) {
        self.lo = self.lo.min(r);
        self.hi = self.hi.max(r);
    }

    /// Learns from one interval: `rewards[i]` is what arm `i` would have
    /// earned (full information); in UCB1 mode only the chosen arm's entry
    /// is used. Non-finite rewards are ignored.
    pub fn update(&mut self, rewards: &[f64]) {
        match self.mode {
            TunerMode::FullInformation => {
                let d = self.discount;
                for (a, &r) in self.stats.iter_mut().zip(rewards) {
                    if r.is_finite() {
                        a.sum = d * a.sum + r;
                        a.weight = d * a.weight + 1.0;
                    }
                }
                for &r in rewards.iter().filter(|r| r.is_finite()) {
                    self.note(r);
                }
            }
            TunerMode::Ucb1 => {
                if let Some(&r) = rewards.get(self.chosen).filter(|r| r.is_finite()) {
                    let a = &mut self.stats[self.chosen];
                    a.sum += r;
                    a.weight += 1.0;
                    self.note(r);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn vm(id: &str, prio: i32, mem: u64, floor: u64, q: [f64; 3]) -> VmShapeInput {
        VmShapeInput {
            vm: id.into(),
            priority: prio,
            memory_mib: mem,
            vcpus: 4,
            floor_mib: floor,
            memory: Some(Quantiles(q)),
            cpu: Some(Quantiles([0.5, 1.0, 2.0])),
            current_memory_mib: None,
            current_cpu: None,
            used_mib: None,
        }
    }

    fn shaper(policy: ShapePolicy, mem: u64, cpus: f64) -> Shaper {
        Shaper::new(
            policy,
            HostCapacity {
                memory_mib: mem,
                cpus,
            },
            ShapeLimits::default(),
        )
        .unwrap()
    }

    #[test]
    fn uncontended_grant_is_p90_plus_margin_widened_by_spread() {
        let s = shaper(ShapePolicy::MaximiseUtilisation, 1 << 20, 64.0);
        let mut v = vm("a", 0, 4096, 256, [1000.0, 1200.0, 1500.0]);
        v.used_mib = Some(900);
        let p = s.shape(&[v.clone()], 0.1).unwrap();
        let a = &p.actions[0];
        // 1200 + 0.1 * (1200 + 1.0 * 200) = 1340.
        assert_eq!(a.memory_mib, Some(1340));
        assert_eq!(a.balloon_target_mib, Some(4096 - 1340));
        // Pre-fault: from 900 used up to the p90 of 1200.
        assert_eq!(a.prefault_mib, 300);
        assert!(!a.cut);
        assert!((a.effective_margin - 0.1 * 1400.0 / 1200.0).abs() < 1e-12);
        // A wider spread at the same p90 widens the headroom.
        v.memory = Some(Quantiles([600.0, 1200.0, 1500.0]));
        let wide = s.shape(&[v.clone()], 0.1).unwrap();
        assert_eq!(wide.actions[0].memory_mib, Some(1200 + 180));
        // No margin: exactly the p90.
        assert_eq!(
            s.shape(&[v], 0.0).unwrap().actions[0].memory_mib,
            Some(1200)
        );
    }

    #[test]
    fn hysteresis_band_narrows_when_the_forecast_is_uncertain() {
        let s = shaper(ShapePolicy::MaximiseUtilisation, 1 << 20, 64.0);
        // Band at no spread: 2 % of 4096 = 81.92 MiB.
        let mut v = vm("a", 0, 4096, 256, [1200.0, 1200.0, 1200.0]);
        v.current_memory_mib = Some(1260);
        assert_eq!(
            s.shape(&[v.clone()], 0.0).unwrap().actions[0].memory_mib,
            Some(1260)
        );
        // Same p90, half of it spread: band 41 MiB, so 60 MiB is acted on.
        v.memory = Some(Quantiles([600.0, 1200.0, 1200.0]));
        assert_eq!(
            s.shape(&[v], 0.0).unwrap().actions[0].memory_mib,
            Some(1200)
        );
    }

    #[test]
    fn contention_is_shared_or_taken_from_low_priority() {
        let vms = [
            vm("low", 0, 4096, 256, [1000.0, 2000.0, 2500.0]),
            vm("high", 5, 4096, 256, [1000.0, 2000.0, 2500.0]),
        ];
        // Both want 2000; the host has 3000.
        let p = shaper(ShapePolicy::MaximiseUtilisation, 3000, 64.0)
            .shape(&vms, 0.0)
            .unwrap();
        assert_eq!(p.memory_mib, 3000);
        assert_eq!(p.actions[0].memory_mib, Some(1500));
        assert_eq!(p.actions[1].memory_mib, Some(1500));
        let p = shaper(ShapePolicy::FavourHighPriority, 3000, 64.0)
            .shape(&vms, 0.0)
            .unwrap();
        assert_eq!(p.actions[1].memory_mib, Some(2000));
        assert_eq!(p.actions[0].memory_mib, Some(1000));
        assert!(p.actions[0].cut && !p.actions[1].cut);
        // 2000 more: low goes to its floor first.
        let p = shaper(ShapePolicy::FavourHighPriority, 2100, 64.0)
            .shape(&vms, 0.0)
            .unwrap();
        assert_eq!(p.actions[0].memory_mib, Some(256));
        assert_eq!(p.actions[1].memory_mib, Some(1844));
        // Weights double per priority level.
        let w0 = p.actions[0].cpu_weight.unwrap();
        let w1 = p.actions[1].cpu_weight.unwrap();
        assert_eq!(w1, 2 * w0);
        // Floors alone do not fit: everyone at the floor, flagged.
        let p = shaper(ShapePolicy::MaximiseUtilisation, 300, 64.0)
            .shape(&vms, 0.0)
            .unwrap();
        assert!(p.overcommitted);
        assert_eq!(p.memory_mib, 512);
    }

    #[test]
    fn fragmentation_policy_grants_whole_granules() {
        let s = shaper(ShapePolicy::MinimiseFragmentation, 1 << 20, 64.0);
        let p = s
            .shape(&[vm("a", 0, 4096, 256, [1000.0, 1201.0, 1500.0])], 0.0)
            .unwrap();
        assert_eq!(p.actions[0].memory_mib, Some(1280));
        // CPU p90 1.0 core: a whole granule already; cpu.max 1 core.
        assert_eq!(
            p.actions[0].cpu_max,
            Some(CpuLimit {
                quota_us: 100_000,
                period_us: 100_000
            })
        );
    }

    #[test]
    fn bad_inputs_are_refused_with_the_vm() {
        let s = shaper(ShapePolicy::MaximiseUtilisation, 1 << 20, 64.0);
        let mut v = vm("bad-vm", 0, 1024, 2048, [1.0, 2.0, 3.0]);
        let e = s.shape(&[v.clone()], 0.1).unwrap_err().to_string();
        assert!(e.contains("bad-vm") && e.contains("floor"), "{e}");
        v.floor_mib = 64;
        v.memory = Some(Quantiles([f64::NAN, 1.0, 1.0]));
        assert!(s.shape(&[v.clone()], 0.1).is_err());
        v.memory = Some(Quantiles([1.0, 1.0, 1.0]));
        assert!(s.shape(&[v.clone()], f64::INFINITY).is_err());
        assert!(s.shape(&[v], -0.5).is_err());
        let limits = ShapeLimits {
            hysteresis_frac: 0.9,
            ..ShapeLimits::default()
        };
        assert!(
            Shaper::new(
                ShapePolicy::MaximiseUtilisation,
                HostCapacity {
                    memory_mib: 1,
                    cpus: 1.0
                },
                limits
            )
            .is_err()
        );
        assert!(MarginTuner::new(&[0.2, 0.1], TunerMode::Ucb1, 1.0).is_err());
        assert!(MarginTuner::new(&[], TunerMode::Ucb1, 1.0).is_err());
        assert!(MarginTuner::new(&[0.1], TunerMode::FullInformation, 0.0).is_err());
        assert_eq!(
            "favour-high-priority".parse::<ShapePolicy>(),
            Ok(ShapePolicy::FavourHighPriority)
        );
        assert!("fastest".parse::<ShapePolicy>().is_err());
    }

    /// A stationary world where margin 0.25 is best: both modes find it.
    #[test]
    fn tuner_converges_to_the_best_margin_in_a_stationary_world() {
        // Reward of margin m: -(m - 0.25)^2 plus deterministic noise.
        for mode in [TunerMode::FullInformation, TunerMode::Ucb1] {
            let mut t = MarginTuner::new(&DEFAULT_ARMS, mode, 0.999).unwrap();
            let mut last = Vec::new();
            for k in 0..3000u32 {
                let m = t.choose();
                let noise = f64::from((k * 7919) % 101) / 101.0 - 0.5;
                let rewards: Vec<f64> = DEFAULT_ARMS
                    .iter()
                    .map(|a| -(a - 0.25) * (a - 0.25) + 0.01 * noise)
                    .collect();
                t.update(&rewards);
                if k >= 2500 {
                    last.push(m);
                }
            }
            let at_best = last.iter().filter(|&&m| m == 0.25).count();
            assert_eq!(DEFAULT_ARMS[t.best()], 0.25, "{mode:?}");
            match mode {
                // Knows every arm's reward: plays the best one only.
                TunerMode::FullInformation => assert_eq!(at_best, last.len()),
                // Still explores, but plays the best arm more than any other.
                TunerMode::Ucb1 => {
                    let plays = t.plays();
                    let most = (0..plays.len()).max_by_key(|&i| plays[i]).unwrap();
                    assert_eq!(DEFAULT_ARMS[most], 0.25, "{plays:?}");
                }
            }
        }
    }

    fn arb_vm(i: usize) -> impl Strategy<Value = VmShapeInput> {
        (
            -2i32..3,
            256u64..16384,
            0.0f64..1.0,
            0.0f64..1.5,
            0.0f64..0.5,
            0.0f64..0.5,
            1u32..16,
            proptest::option::of(0.0f64..1.2),
            0.0f64..1.2,
        )
            .prop_map(
                move |(prio, mem, floor_f, p50_f, d90, d99, vcpus, cur_f, cpu_f)| {
                    let size = mem as f64;
                    let p50 = p50_f * size;
                    let p90 = p50 + d90 * size;
                    let p99 = p90 + d99 * size;
                    let c50 = cpu_f * f64::from(vcpus);
                    // Floors below guest RAM; fractions of it, whole MiB.
                    #[allow(clippy::cast_possible_truncation)]
                    let floor = (floor_f * size * 0.5) as u64;
                    #[allow(clippy::cast_possible_truncation)]
                    let cur = cur_f.map(|f| ((f * size) as u64).min(mem));
                    VmShapeInput {
                        vm: format!("vm-{i}"),
                        priority: prio,
                        memory_mib: mem,
                        vcpus,
                        floor_mib: floor,
                        memory: Some(Quantiles([p50, p90, p99])),
                        cpu: Some(Quantiles([c50, c50 * 1.3, c50 * 1.6])),
                        current_memory_mib: cur,
                        current_cpu: None,
                        used_mib: cur,
                    }
                },
            )
    }

    fn arb_vms() -> impl Strategy<Value = Vec<VmShapeInput>> {
        (1usize..8).prop_flat_map(|n| (0..n).map(arb_vm).collect::<Vec<_>>())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        #[test]
        fn grants_stay_between_floor_and_size_and_within_the_host(
            vms in arb_vms(),
            host_mem in 0u64..65_536,
            host_cpu in 0.0f64..64.0,
            margin in 0.0f64..1.0,
            policy in prop::sample::select(ShapePolicy::ALL.to_vec()),
        ) {
            let s = shaper(policy, host_mem, host_cpu);
            let p = s.shape(&vms, margin).unwrap();
            let floors: u64 = vms.iter().map(|v| v.floor_mib).sum();
            for (a, v) in p.actions.iter().zip(&vms) {
                let m = a.memory_mib.unwrap();
                prop_assert!(m >= v.floor_mib, "{} below floor {}", m, v.floor_mib);
                prop_assert!(m <= v.memory_mib, "{} above size {}", m, v.memory_mib);
                prop_assert_eq!(a.balloon_target_mib.unwrap(), v.memory_mib - m);
                let c = a.cpu.unwrap();
                prop_assert!(c <= f64::from(v.vcpus) + 1e-9);
                let w = a.cpu_weight.unwrap();
                prop_assert!((1..=10_000).contains(&w));
                let q = a.cpu_max.unwrap();
                prop_assert!(q.quota_us >= MIN_CPU_QUOTA_US);
                prop_assert!(q.quota_us <= u64::from(v.vcpus) * q.period_us);
            }
            if floors <= host_mem {
                prop_assert!(p.memory_mib <= host_mem, "{} > {}", p.memory_mib, host_mem);
                prop_assert!(!p.overcommitted || p.cpus > host_cpu - 1e-6);
            } else {
                prop_assert!(p.overcommitted);
            }
            let cpu_floors: f64 = vms.iter().map(|v| 0.05f64.min(f64::from(v.vcpus))).sum();
            if cpu_floors <= host_cpu {
                prop_assert!(p.cpus <= host_cpu + 1e-6, "{} > {}", p.cpus, host_cpu);
            }
        }

        #[test]
        fn favour_high_priority_cuts_lower_priorities_to_the_floor_first(
            vms in arb_vms(),
            host_mem in 0u64..65_536,
            margin in 0.0f64..1.0,
        ) {
            let s = shaper(ShapePolicy::FavourHighPriority, host_mem, 64.0);
            let p = s.shape(&vms, margin).unwrap();
            let uncut = shaper(ShapePolicy::FavourHighPriority, u64::MAX / 4, 1e9)
                .shape(&vms, margin)
                .unwrap();
            for (i, a) in p.actions.iter().enumerate() {
                let got = a.memory_mib.unwrap();
                let want = uncut.actions[i].memory_mib.unwrap();
                if got < want {
                    // Everyone of lower priority is at the floor.
                    for (j, b) in p.actions.iter().enumerate() {
                        if vms[j].priority < vms[i].priority {
                            prop_assert_eq!(b.memory_mib.unwrap(), vms[j].floor_mib,
                                "{} (prio {}) cut to {} while {} (prio {}) keeps {}",
                                vms[i].vm, vms[i].priority, got,
                                vms[j].vm, vms[j].priority, b.memory_mib.unwrap());
                        }
                    }
                }
            }
        }
    }
}
