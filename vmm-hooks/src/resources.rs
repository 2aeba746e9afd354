//! Host resources as the companion's pool counts them, and the allocator's
//! answer to a boot (carried in [`crate::BootPlan::allocation`]).

use std::fmt;

use serde::{Deserialize, Serialize};

/// One kind of host resource the pool counts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Resource {
    /// CPU, in millicores (1000 = one host CPU busy all the time).
    Cpu,
    /// Memory, in MiB.
    Memory,
    /// Network bandwidth, in Mbit/s.
    Network,
    /// Disk bandwidth, in MB/s.
    Disk,
    /// GPUs, whole devices.
    Gpu,
}

impl Resource {
    /// Every resource, in table order.
    pub const ALL: [Resource; 5] = [
        Resource::Cpu,
        Resource::Memory,
        Resource::Network,
        Resource::Disk,
        Resource::Gpu,
    ];

    /// The resource's name in logs, metrics and tables.
    pub fn name(self) -> &'static str {
        match self {
            Resource::Cpu => "cpu",
            Resource::Memory => "memory",
            Resource::Network => "network",
            Resource::Disk => "disk",
            Resource::Gpu => "gpu",
        }
    }

    /// The unit amounts of this resource are counted in.
    pub fn unit(self) -> &'static str {
        match self {
            Resource::Cpu => "millicores",
            Resource::Memory => "MiB",
            Resource::Network => "Mbit/s",
            Resource::Disk => "MB/s",
            Resource::Gpu => "GPUs",
        }
    }
}

/// An amount of each resource (whole units; never negative).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Resources {
    /// CPU in millicores.
    pub cpu_millis: u64,
    /// Memory in MiB.
    pub memory_mib: u64,
    /// Network bandwidth in Mbit/s.
    pub net_mbps: u64,
    /// Disk bandwidth in MB/s.
    pub disk_mbps: u64,
    /// Whole GPUs.
    pub gpus: u64,
}

impl Resources {
    /// Nothing.
    pub const ZERO: Resources = Resources {
        cpu_millis: 0,
        memory_mib: 0,
        net_mbps: 0,
        disk_mbps: 0,
        gpus: 0,
    };

    /// The amount of one resource.
    pub fn get(&self, r: Resource) -> u64 {
        match r {
            Resource::Cpu => self.cpu_millis,
            Resource::Memory => self.memory_mib,
            Resource::Network => self.net_mbps,
            Resource::Disk => self.disk_mbps,
            Resource::Gpu => self.gpus,
        }
    }

    /// Sets the amount of one resource.
    pub fn set(&mut self, r: Resource, v: u64) {
        match r {
            Resource::Cpu => self.cpu_millis = v,
            Resource::Memory => self.memory_mib = v,
            Resource::Network => self.net_mbps = v,
            Resource::Disk => self.disk_mbps = v,
            Resource::Gpu => self.gpus = v,
        }
    }

    /// Applies `f` to each resource's amount.
    pub fn map(&self, mut f: impl FnMut(Resource, u64) -> u64) -> Resources {
        let mut out = Resources::ZERO;
        for r in Resource::ALL {
            out.set(r, f(r, self.get(r)));
        }
        out
    }

    /// `self + other`, each resource saturating at `u64::MAX`.
    pub fn saturating_add(&self, other: &Resources) -> Resources {
        self.map(|r, v| v.saturating_add(other.get(r)))
    }

    /// `self - other`, each resource floored at zero.
    pub fn saturating_sub(&self, other: &Resources) -> Resources {
        self.map(|r, v| v.saturating_sub(other.get(r)))
    }

    /// True when every resource of `self` is at most that of `other`.
    pub fn fits_within(&self, other: &Resources) -> bool {
        Resource::ALL.iter().all(|&r| self.get(r) <= other.get(r))
    }
}

impl fmt::Display for Resources {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "cpu {} millicores, memory {} MiB, network {} Mbit/s, disk {} MB/s, {} GPUs",
            self.cpu_millis, self.memory_mib, self.net_mbps, self.disk_mbps, self.gpus
        )
    }
}

/// One resource that does not cover a demand.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResourceShort {
    /// Which resource.
    pub resource: Resource,
    /// What the VM needs.
    pub wanted: u64,
    /// What the pool has free for it.
    pub free: u64,
    /// `wanted - free`.
    pub short_by: u64,
}

impl fmt::Display for ResourceShort {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let u = self.resource.unit();
        write!(
            f,
            "{} short by {} {u} (wanted {} {u}, {} {u} free)",
            self.resource.name(),
            self.short_by,
            self.wanted,
            self.free
        )
    }
}

/// What a VMM does with a VM whose demand does not fit.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
#[non_exhaustive]
pub enum ShortfallAction {
    /// Do not run the guest: stop the VM and report it stopped (failed).
    #[default]
    Refuse,
    /// Run the guest without reserved resources: no pre-faulting, no
    /// profiling; the host may be over-committed.
    BootLazily,
}

impl ShortfallAction {
    /// The action's name as on the wire.
    pub fn name(self) -> &'static str {
        match self {
            ShortfallAction::Refuse => "refuse",
            ShortfallAction::BootLazily => "boot-lazily",
        }
    }
}

/// The allocator's answer to a boot: what it forecast the VM will demand,
/// whether the pool reserved it, and if not, which resources fall short and
/// by how much.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct Allocation {
    /// True when the demand was reserved in the host's pool.
    pub admitted: bool,
    /// The forecast demand (what was reserved, when admitted).
    pub demand: Resources,
    /// The quantile of the forecast (e.g. 0.9).
    pub quantile: f64,
    /// How the demand was forecast (e.g. `declared size (cold start)`).
    pub forecast_by: String,
    /// The resources that fall short (empty when admitted).
    #[serde(default)]
    pub short: Vec<ResourceShort>,
    /// What the VMM must do when not admitted.
    #[serde(default)]
    pub on_shortfall: ShortfallAction,
}

impl Allocation {
    /// A decision: admitted when nothing falls short.
    pub fn new(
        demand: Resources,
        quantile: f64,
        forecast_by: impl Into<String>,
        short: Vec<ResourceShort>,
        on_shortfall: ShortfallAction,
    ) -> Self {
        Allocation {
            admitted: short.is_empty(),
            demand,
            quantile,
            forecast_by: forecast_by.into(),
            short,
            on_shortfall,
        }
    }

    /// The shortfall in one line, e.g. `memory short by 512 MiB (wanted
    /// 1024 MiB, 512 MiB free)`; empty when admitted.
    pub fn shortfall_text(&self) -> String {
        self.short
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join("; ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arithmetic_saturates_and_compares_per_resource() {
        let a = Resources {
            cpu_millis: 1000,
            memory_mib: 512,
            ..Resources::ZERO
        };
        let b = Resources {
            cpu_millis: 1500,
            memory_mib: 256,
            gpus: 1,
            ..Resources::ZERO
        };
        assert_eq!(a.saturating_sub(&b).cpu_millis, 0);
        assert_eq!(a.saturating_sub(&b).memory_mib, 256);
        assert_eq!(a.saturating_add(&b).gpus, 1);
        assert!(!a.fits_within(&b) && !b.fits_within(&a));
        assert!(a.fits_within(&a.saturating_add(&b)));
        let short = ResourceShort {
            resource: Resource::Memory,
            wanted: 1024,
            free: 512,
            short_by: 512,
        };
        assert_eq!(
            short.to_string(),
            "memory short by 512 MiB (wanted 1024 MiB, 512 MiB free)"
        );
    }
}
