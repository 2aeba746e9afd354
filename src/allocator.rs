//! The predictive allocator: for a boot, a restart or a resize, forecast
//! what the VM will demand from what the store knows of its bootstrap key,
//! check it against the pool, reserve it, and say so in the plan; when it
//! does not fit, say which resources fall short and by how much.
//!
//! Forecast, per resource the store has history of (memory: the VMM's
//! resident set at ready; CPU: vCPU time over the time to ready, i.e. CPUs
//! busy during the bootstrap), at the VM class's quantile (p90 by default):
//!
//! - fewer than `min_samples` boots with the measure: the VM's declared size
//!   (cold start: vCPUs x 1000 millicores, guest RAM);
//! - `min_samples` or more: the empirical quantile of those boots
//!   (`models::empirical_quantile`);
//! - `model_min_samples` or more, and a quantile the models answer (0.5,
//!   0.9, 0.99): the models crate's decaying-histogram forecaster (`Vpa`,
//!   as in the Kubernetes VPA recommender), one boot per slot, so older
//!   boots weigh less.
//!
//! CPU is capped at the declared vCPUs (a guest cannot use more); memory is
//! not (the VMM's own memory is real host memory too). Network, disk and
//! GPUs are not measured per boot: they come from the VM's class.
//!
//! Pure: the daemon passes the history in and applies the result.

use serde::{Deserialize, Serialize};
use vmm_hooks::{Allocation, Resources, ShortfallAction};

use crate::pool::{Demand, Pool};

/// Which VMs a class covers and what it asks for them.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmClass {
    /// The class's name (in status and logs).
    pub name: String,
    /// VMs whose id starts with this belong to the class.
    #[serde(default)]
    pub vm_prefix: Option<String>,
    /// VMs of this image digest belong to the class.
    #[serde(default)]
    pub image: Option<String>,
    /// The forecast quantile for this class (0 < q <= 1); default: the
    /// allocator's.
    #[serde(default)]
    pub quantile: Option<f64>,
    /// Network bandwidth each VM of the class reserves, Mbit/s.
    #[serde(default)]
    pub net_mbps: u64,
    /// Disk bandwidth each VM of the class reserves, MB/s.
    #[serde(default)]
    pub disk_mbps: u64,
    /// GPUs each VM of the class reserves.
    #[serde(default)]
    pub gpus: u64,
}

impl VmClass {
    fn matches(&self, vm_id: &str, image: &str) -> bool {
        self.vm_prefix
            .as_deref()
            .is_some_and(|p| vm_id.starts_with(p))
            || self.image.as_deref().is_some_and(|i| i == image)
    }
}

/// How the allocator forecasts and what it does on a shortfall.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AllocatorPolicy {
    /// The forecast quantile of VMs no class covers.
    pub quantile: f64,
    /// Boots needed before history replaces the declared size.
    pub min_samples: usize,
    /// Boots needed before the models crate's forecaster is used.
    pub model_min_samples: usize,
    /// Boots of history considered (newest).
    pub history: usize,
    /// What a VMM is told to do when a demand does not fit.
    pub on_shortfall: ShortfallAction,
    /// VM classes, first match wins.
    pub classes: Vec<VmClass>,
}

impl Default for AllocatorPolicy {
    fn default() -> Self {
        AllocatorPolicy {
            quantile: 0.9,
            min_samples: 3,
            model_min_samples: 20,
            history: 200,
            on_shortfall: ShortfallAction::Refuse,
            classes: Vec::new(),
        }
    }
}

/// What one past boot says about demand.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct BootUsage {
    /// VMM resident set at ready, KiB (0: not measured).
    pub rss_kib: u64,
    /// vCPU time until ready, ms.
    pub vcpu_cpu_ms: f64,
    /// Time to ready, ms.
    pub time_to_ready_ms: f64,
}

impl BootUsage {
    /// CPUs busy on average during the bootstrap, if measured.
    fn cpus(&self) -> Option<f64> {
        (self.time_to_ready_ms > 0.0 && self.vcpu_cpu_ms > 0.0 && self.vcpu_cpu_ms.is_finite())
            .then(|| self.vcpu_cpu_ms / self.time_to_ready_ms)
    }

    fn memory_mib(&self) -> Option<f64> {
        (self.rss_kib > 0).then(|| self.rss_kib as f64 / 1024.0)
    }
}

/// The size a VM was created with.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Declared {
    /// vCPUs.
    pub vcpus: u64,
    /// Guest RAM, MiB.
    pub memory_mib: u64,
}

/// A forecast demand and how it was made.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Forecast {
    /// The demand.
    pub demand: Demand,
    /// The quantile.
    pub quantile: f64,
    /// The VM's class (`default` when none matched).
    pub class: String,
    /// How, e.g. `cpu: empirical p90 of 5 boots; memory: declared size (cold start)`.
    pub by: String,
}

impl AllocatorPolicy {
    /// The class of a VM, if one matches.
    pub fn class_of(&self, vm_id: &str, image: &str) -> Option<&VmClass> {
        self.classes.iter().find(|c| c.matches(vm_id, image))
    }

    /// Forecasts a VM's demand from its key's past boots (oldest first).
    pub fn forecast(
        &self,
        vm_id: &str,
        image: &str,
        declared: Declared,
        history: &[BootUsage],
    ) -> Forecast {
        let class = self.class_of(vm_id, image);
        let q = class.and_then(|c| c.quantile).unwrap_or(self.quantile);
        let recent = &history[history.len().saturating_sub(self.history)..];
        let cpus: Vec<f64> = recent.iter().filter_map(BootUsage::cpus).collect();
        let mem: Vec<f64> = recent.iter().filter_map(BootUsage::memory_mib).collect();
        let (cpu, cpu_by) = self.quantile_of(&cpus, q, declared.vcpus as f64);
        let (mem, mem_by) = self.quantile_of(&mem, q, declared.memory_mib as f64);
        let cpu_millis = ceil_u64(cpu.min(declared.vcpus as f64) * 1000.0);
        let demand = Resources {
            cpu_millis,
            memory_mib: ceil_u64(mem),
            net_mbps: class.map_or(0, |c| c.net_mbps),
            disk_mbps: class.map_or(0, |c| c.disk_mbps),
            gpus: class.map_or(0, |c| c.gpus),
        };
        let by = if cpu_by == mem_by {
            cpu_by
        } else {
            format!("cpu: {cpu_by}; memory: {mem_by}")
        };
        Forecast {
            demand,
            quantile: q,
            class: class.map_or_else(|| "default".to_string(), |c| c.name.clone()),
            by,
        }
    }

    fn quantile_of(&self, samples: &[f64], q: f64, declared: f64) -> (f64, String) {
        let n = samples.len();
        if n < self.min_samples.max(1) {
            return (declared, "declared size (cold start)".into());
        }
        let level = models::LEVELS.iter().position(|&l| (l - q).abs() < 1e-9);
        if let (Some(level), true) = (level, n >= self.model_min_samples) {
            let statics = models::Statics::default();
            let h = models::History {
                values: samples,
                first_slot: 0,
                decision_slot: i64::try_from(n).unwrap_or(i64::MAX),
                statics,
            };
            let f = models::Forecaster::forecast(
                &models::Vpa::plain(),
                &h,
                models::Horizon::NextInterval,
            );
            return (f.0[level], format!("models vpa p{} of {n} boots", pct(q)));
        }
        let mut sorted = samples.to_vec();
        sorted.sort_by(f64::total_cmp);
        (
            models::empirical_quantile(&sorted, q),
            format!("empirical p{} of {n} boots", pct(q)),
        )
    }

    /// Forecasts, checks against the pool and reserves: the allocation the
    /// plan carries. On a shortfall the pool is unchanged.
    pub fn admit(&self, pool: &mut Pool, vm_id: &str, forecast: &Forecast) -> Allocation {
        let short = match pool.reserve(vm_id, forecast.demand) {
            Ok(_) => Vec::new(),
            Err(s) => s.short,
        };
        Allocation::new(
            forecast.demand,
            forecast.quantile,
            forecast.by.clone(),
            short,
            self.on_shortfall,
        )
    }
}

fn pct(q: f64) -> String {
    let p = q * 100.0;
    if (p - p.round()).abs() < 1e-9 {
        format!("{p:.0}")
    } else {
        format!("{p}")
    }
}

fn ceil_u64(x: f64) -> u64 {
    let c = x.ceil();
    if !c.is_finite() || c <= 0.0 {
        0
    } else if c >= u64::MAX as f64 {
        u64::MAX
    } else {
        // Finite, positive, below u64::MAX and integral: exact.
        #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
        let n = c as u64;
        n
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pool::Overcommit;
    use vmm_hooks::Resource;

    fn boot(rss_mib: u64, cpus: f64) -> BootUsage {
        BootUsage {
            rss_kib: rss_mib * 1024,
            vcpu_cpu_ms: cpus * 100.0,
            time_to_ready_ms: 100.0,
        }
    }

    const DECLARED: Declared = Declared {
        vcpus: 4,
        memory_mib: 4096,
    };

    #[test]
    fn cold_start_uses_the_declared_size() {
        let p = AllocatorPolicy::default();
        let f = p.forecast("vm", "img", DECLARED, &[boot(500, 1.0), boot(600, 1.0)]);
        assert_eq!(f.demand.cpu_millis, 4000);
        assert_eq!(f.demand.memory_mib, 4096);
        assert_eq!(f.by, "declared size (cold start)");
        assert_eq!(f.class, "default");
    }

    #[test]
    fn few_boots_give_the_empirical_quantile() {
        let p = AllocatorPolicy::default();
        let h: Vec<BootUsage> = (1..=10).map(|i| boot(100 * i, 0.1 * i as f64)).collect();
        let f = p.forecast("vm", "img", DECLARED, &h);
        // p90 of 100..1000 (10 values): the 9th, 900.
        assert_eq!(f.demand.memory_mib, 900);
        assert_eq!(f.demand.cpu_millis, 900);
        assert_eq!(f.by, "empirical p90 of 10 boots");
        // Unmeasured boots do not count.
        let f = p.forecast("vm", "img", DECLARED, &[BootUsage::default(); 10]);
        assert_eq!(f.demand.memory_mib, 4096);
    }

    #[test]
    fn many_boots_use_the_models_forecaster_and_cpu_is_capped() {
        let p = AllocatorPolicy::default();
        let h: Vec<BootUsage> = (0..30).map(|i| boot(1000 + i, 9.0)).collect();
        let f = p.forecast("vm", "img", DECLARED, &h);
        assert_eq!(f.by, "models vpa p90 of 30 boots");
        // The VPA histogram rounds up to its 5 % buckets.
        assert!(
            (1000..=1100).contains(&f.demand.memory_mib),
            "{}",
            f.demand.memory_mib
        );
        assert_eq!(f.demand.cpu_millis, 4000);
    }

    #[test]
    fn classes_set_the_quantile_and_the_unmeasured_resources() {
        let p = AllocatorPolicy {
            classes: vec![VmClass {
                name: "batch".into(),
                vm_prefix: Some("batch-".into()),
                image: None,
                quantile: Some(0.5),
                net_mbps: 100,
                disk_mbps: 50,
                gpus: 1,
            }],
            ..AllocatorPolicy::default()
        };
        let h: Vec<BootUsage> = (1..=10).map(|i| boot(100 * i, 1.0)).collect();
        let f = p.forecast("batch-7", "img", DECLARED, &h);
        assert_eq!(f.class, "batch");
        assert_eq!(f.demand.memory_mib, 500);
        assert_eq!((f.demand.net_mbps, f.demand.gpus), (100, 1));
        assert_eq!(f.by, "empirical p50 of 10 boots");
        assert_eq!(p.forecast("web-1", "img", DECLARED, &h).class, "default");
    }

    #[test]
    fn admit_reserves_or_names_the_shortfall() {
        let p = AllocatorPolicy::default();
        let mut pool = Pool::new(
            Resources {
                cpu_millis: 2000,
                memory_mib: 6000,
                ..Resources::ZERO
            },
            Resources::ZERO,
            Overcommit::default(),
        );
        let f = p.forecast("a", "img", DECLARED, &[]);
        let a = p.admit(&mut pool, "a", &f);
        assert!(a.admitted && a.short.is_empty());
        let b = p.admit(&mut pool, "b", &f);
        assert!(!b.admitted);
        assert_eq!(b.short.len(), 1);
        assert_eq!(b.short[0].resource, Resource::Memory);
        assert_eq!(b.short[0].short_by, 4096 - (6000 - 4096));
        assert_eq!(b.on_shortfall, ShortfallAction::Refuse);
        assert_eq!(pool.len(), 1);
    }
}
