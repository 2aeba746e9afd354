//! The host's resource pool: what the host has, what it keeps for itself,
//! and what each VM holds. Pure bookkeeping (no I/O): the daemon persists
//! every change in the store and probes the host's totals (`host_totals`);
//! the allocator, the interruption coordinator and the shaping loop all
//! reserve and release through one [`Pool`], so no two plans promise the
//! same resources.
//!
//! Capacity per resource is `(total - host_reserved) * overcommit`, rounded
//! down; GPUs are never over-committed. A reservation succeeds only when
//! every resource fits in what is free, so the sum of reservations never
//! exceeds capacity, with one exception: reservations restored from the
//! store at start ([`Pool::restore`]) are kept even when a smaller
//! configuration no longer holds them (they are real VMs); the pool is then
//! over-committed until enough of them are released, and `free` is zero.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};
use vmm_hooks::{Resource, ResourceShort, Resources};

/// What a VM asks the pool for.
pub type Demand = Resources;

/// How far each resource may be promised beyond what the host has
/// (1.0: not at all). GPUs are never over-committed.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Overcommit {
    /// CPU.
    pub cpu: f64,
    /// Memory.
    pub memory: f64,
    /// Network bandwidth.
    pub network: f64,
    /// Disk bandwidth.
    pub disk: f64,
}

impl Default for Overcommit {
    /// CPU 4x (a common vCPU-to-CPU ratio for general-purpose VMs), nothing
    /// else.
    fn default() -> Self {
        Overcommit {
            cpu: 4.0,
            memory: 1.0,
            network: 1.0,
            disk: 1.0,
        }
    }
}

impl Overcommit {
    /// The ratio of one resource.
    pub fn ratio(&self, r: Resource) -> f64 {
        match r {
            Resource::Cpu => self.cpu,
            Resource::Memory => self.memory,
            Resource::Network => self.network,
            Resource::Disk => self.disk,
            Resource::Gpu => 1.0,
        }
    }
}

/// A VM's share of the pool.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reservation {
    /// The VM.
    pub vm: String,
    /// What it holds.
    pub resources: Resources,
}

/// A demand that does not fit: each resource that falls short, by how much.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Shortfall {
    /// The VM that asked.
    pub vm: String,
    /// The resources that fall short (never empty).
    pub short: Vec<ResourceShort>,
}

impl fmt::Display for Shortfall {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} does not fit: ", self.vm)?;
        for (i, s) in self.short.iter().enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            write!(f, "{s}")?;
        }
        Ok(())
    }
}

impl std::error::Error for Shortfall {}

/// The pool's bookkeeping.
#[derive(Clone, Debug, PartialEq)]
pub struct Pool {
    total: Resources,
    host_reserved: Resources,
    capacity: Resources,
    overcommit: Overcommit,
    vms: BTreeMap<String, Resources>,
    allocated: Resources,
}

impl Pool {
    /// A pool for a host with `total`, keeping `host_reserved` for the host.
    pub fn new(total: Resources, host_reserved: Resources, overcommit: Overcommit) -> Self {
        let usable = total.saturating_sub(&host_reserved);
        let capacity = usable.map(|r, v| scale(v, overcommit.ratio(r)));
        Pool {
            total,
            host_reserved,
            capacity,
            overcommit,
            vms: BTreeMap::new(),
            allocated: Resources::ZERO,
        }
    }

    /// What the host has.
    pub fn total(&self) -> Resources {
        self.total
    }

    /// What the host keeps for itself.
    pub fn host_reserved(&self) -> Resources {
        self.host_reserved
    }

    /// What VMs may be promised in all: `(total - host_reserved) * overcommit`.
    pub fn capacity(&self) -> Resources {
        self.capacity
    }

    /// The over-commit ratios.
    pub fn overcommit(&self) -> Overcommit {
        self.overcommit
    }

    /// What VMs hold now.
    pub fn allocated(&self) -> Resources {
        self.allocated
    }

    /// What is left to promise (zero where restored reservations exceed capacity).
    pub fn free(&self) -> Resources {
        self.capacity.saturating_sub(&self.allocated)
    }

    /// The reservation a VM holds, if any.
    pub fn reservation(&self, vm: &str) -> Option<Reservation> {
        self.vms.get(vm).map(|&resources| Reservation {
            vm: vm.to_string(),
            resources,
        })
    }

    /// Every reservation, by VM id.
    pub fn reservations(&self) -> impl Iterator<Item = Reservation> + '_ {
        self.vms.iter().map(|(vm, &resources)| Reservation {
            vm: vm.clone(),
            resources,
        })
    }

    /// Number of VMs holding a reservation.
    pub fn len(&self) -> usize {
        self.vms.len()
    }

    /// True when no VM holds anything.
    pub fn is_empty(&self) -> bool {
        self.vms.is_empty()
    }

    /// Would `demand` fit for `vm` (counting what `vm` already holds as
    /// free, so a resize is checked against what it would become)?
    pub fn check(&self, vm: &str, demand: &Demand) -> Result<(), Shortfall> {
        let held = self.vms.get(vm).copied().unwrap_or_default();
        let free = self
            .capacity
            .saturating_sub(&self.allocated.saturating_sub(&held));
        let short: Vec<ResourceShort> = Resource::ALL
            .iter()
            .filter(|&&r| demand.get(r) > free.get(r))
            .map(|&r| ResourceShort {
                resource: r,
                wanted: demand.get(r),
                free: free.get(r),
                short_by: demand.get(r) - free.get(r),
            })
            .collect();
        if short.is_empty() {
            Ok(())
        } else {
            Err(Shortfall {
                vm: vm.to_string(),
                short,
            })
        }
    }

    /// Reserves `demand` for `vm`, replacing what it held (a resize) when
    /// it fits; changes nothing when it does not.
    pub fn reserve(&mut self, vm: &str, demand: Demand) -> Result<Reservation, Shortfall> {
        self.check(vm, &demand)?;
        self.put(vm, demand);
        Ok(Reservation {
            vm: vm.to_string(),
            resources: demand,
        })
    }

    /// Releases what `vm` holds; `None` if it held nothing.
    pub fn release(&mut self, vm: &str) -> Option<Reservation> {
        let resources = self.vms.remove(vm)?;
        self.allocated = self.allocated.saturating_sub(&resources);
        Some(Reservation {
            vm: vm.to_string(),
            resources,
        })
    }

    /// Puts back a reservation the store held (at daemon start), whether or
    /// not it fits the current capacity; returns the shortfall it causes, if
    /// any, so the caller can say so.
    pub fn restore(&mut self, vm: &str, resources: Resources) -> Option<Shortfall> {
        let over = self.check(vm, &resources).err();
        self.put(vm, resources);
        over
    }

    fn put(&mut self, vm: &str, resources: Resources) {
        if let Some(old) = self.vms.insert(vm.to_string(), resources) {
            self.allocated = self.allocated.saturating_sub(&old);
        }
        self.allocated = self.allocated.saturating_add(&resources);
    }
}

/// `v * ratio`, rounded down, within `u64`.
fn scale(v: u64, ratio: f64) -> u64 {
    if ratio == 1.0 {
        return v;
    }
    let x = (v as f64 * ratio).floor();
    if !x.is_finite() || x <= 0.0 {
        0
    } else if x >= u64::MAX as f64 {
        u64::MAX
    } else {
        // Finite, non-negative and below u64::MAX: the cast is exact up to
        // f64 precision, which is what the ratio has anyway.
        #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
        let n = x as u64;
        n
    }
}

/// What this host has, as far as it can be probed: CPUs this process may
/// run on (`sched_getaffinity`, else the online CPUs) and `MemTotal`.
/// Network and disk bandwidth and GPUs cannot be probed reliably and come
/// from the configuration.
pub fn host_totals() -> Result<(u64, u64), std::io::Error> {
    let cpus = affinity_cpus().unwrap_or_else(online_cpus);
    let meminfo = std::fs::read_to_string("/proc/meminfo")?;
    let mem_kib = meminfo_total_kib(&meminfo).ok_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "/proc/meminfo has no MemTotal line",
        )
    })?;
    Ok((cpus, mem_kib / 1024))
}

/// CPUs in this process's affinity mask (what a cgroup or `taskset` left it).
fn affinity_cpus() -> Option<u64> {
    // SAFETY: cpu_set_t is a plain bit array; all zeroes is an empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: pid 0 names the calling thread; the size passed is that of
    // `set`, a live local the kernel writes into.
    let rc =
        unsafe { libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) };
    if rc != 0 {
        return None;
    }
    // SAFETY: `set` is initialised (zeroed, then filled by the kernel).
    let n = unsafe { libc::CPU_COUNT(&set) };
    u64::try_from(n).ok().filter(|&n| n > 0)
}

fn online_cpus() -> u64 {
    // SAFETY: sysconf has no preconditions; it returns -1 on error.
    let n = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) };
    u64::try_from(n).unwrap_or(1).max(1)
}

/// `MemTotal` in KiB from `/proc/meminfo` text.
pub fn meminfo_total_kib(text: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|n| n.parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn res(cpu: u64, mem: u64) -> Resources {
        Resources {
            cpu_millis: cpu,
            memory_mib: mem,
            ..Resources::ZERO
        }
    }

    fn pool() -> Pool {
        Pool::new(
            Resources {
                cpu_millis: 4000,
                memory_mib: 8192,
                net_mbps: 1000,
                disk_mbps: 500,
                gpus: 1,
            },
            res(1000, 1024),
            Overcommit::default(),
        )
    }

    #[test]
    fn capacity_is_total_less_host_reserve_times_overcommit() {
        let p = pool();
        assert_eq!(p.capacity().cpu_millis, 12_000);
        assert_eq!(p.capacity().memory_mib, 7168);
        assert_eq!(p.capacity().gpus, 1);
        assert_eq!(p.free(), p.capacity());
    }

    #[test]
    fn a_demand_that_does_not_fit_names_each_short_resource_and_changes_nothing() {
        let mut p = pool();
        p.reserve("a", res(2000, 6000)).unwrap();
        let before = p.clone();
        let want = Resources {
            cpu_millis: 1000,
            memory_mib: 2048,
            gpus: 2,
            ..Resources::ZERO
        };
        let e = p.reserve("b", want).unwrap_err();
        assert_eq!(p, before);
        assert_eq!(e.short.len(), 2);
        assert_eq!(
            e.short[0],
            ResourceShort {
                resource: Resource::Memory,
                wanted: 2048,
                free: 1168,
                short_by: 880
            }
        );
        assert_eq!(e.short[1].resource, Resource::Gpu);
        assert_eq!(e.short[1].short_by, 1);
        assert!(e.to_string().contains("memory short by 880 MiB"), "{e}");
    }

    #[test]
    fn a_resize_counts_what_the_vm_already_holds() {
        let mut p = pool();
        p.reserve("a", res(1000, 7000)).unwrap();
        // Growing to 7168 fits because a's own 7000 are counted as free.
        p.reserve("a", res(1000, 7168)).unwrap();
        assert_eq!(p.allocated().memory_mib, 7168);
        assert_eq!(p.len(), 1);
        assert!(p.reserve("a", res(1000, 7169)).is_err());
        assert_eq!(p.release("a").unwrap().resources.memory_mib, 7168);
        assert_eq!(p.allocated(), Resources::ZERO);
        assert!(p.release("a").is_none());
    }

    #[test]
    fn restored_reservations_are_kept_even_over_capacity() {
        let mut p = pool();
        assert!(p.restore("a", res(0, 5000)).is_none());
        let over = p.restore("b", res(0, 5000)).unwrap();
        assert_eq!(over.short[0].short_by, 5000 - 2168);
        assert_eq!(p.free().memory_mib, 0);
        assert!(p.reserve("c", res(0, 1)).is_err());
        p.release("a");
        assert_eq!(p.free().memory_mib, 2168);
    }

    #[test]
    fn meminfo_is_read() {
        let text = "MemTotal:       24684092 kB\nMemFree:        16908444 kB\n";
        assert_eq!(meminfo_total_kib(text), Some(24_684_092));
        assert_eq!(meminfo_total_kib("nothing"), None);
        let (cpus, mem) = host_totals().unwrap();
        assert!(cpus >= 1 && mem > 0);
    }

    #[derive(Clone, Debug)]
    enum Op {
        Reserve(u8, Resources),
        Release(u8),
    }

    fn resources() -> impl Strategy<Value = Resources> {
        (0u64..6000, 0u64..9000, 0u64..1500, 0u64..800, 0u64..3).prop_map(
            |(cpu_millis, memory_mib, net_mbps, disk_mbps, gpus)| Resources {
                cpu_millis,
                memory_mib,
                net_mbps,
                disk_mbps,
                gpus,
            },
        )
    }

    fn ops() -> impl Strategy<Value = Vec<Op>> {
        proptest::collection::vec(
            prop_oneof![
                (0u8..6, resources()).prop_map(|(v, r)| Op::Reserve(v, r)),
                (0u8..6).prop_map(Op::Release),
            ],
            0..60,
        )
    }

    proptest! {
        // Whatever the sequence: the sum of reservations equals `allocated`,
        // never exceeds capacity, free + allocated = capacity, and a failed
        // reserve changes nothing.
        #[test]
        fn never_over_committed_and_books_balance(ops in ops(), cpu_ratio in 1.0f64..8.0) {
            let mut p = Pool::new(
                Resources { cpu_millis: 4000, memory_mib: 8192, net_mbps: 1000, disk_mbps: 500, gpus: 2 },
                res(500, 512),
                Overcommit { cpu: cpu_ratio, ..Overcommit::default() },
            );
            for op in ops {
                match op {
                    Op::Reserve(v, r) => {
                        let before = p.clone();
                        match p.reserve(&format!("vm{v}"), r) {
                            Ok(res) => prop_assert_eq!(res.resources, r),
                            Err(e) => {
                                prop_assert_eq!(&p, &before);
                                prop_assert!(!e.short.is_empty());
                                for s in &e.short {
                                    prop_assert_eq!(s.short_by, s.wanted - s.free);
                                    prop_assert!(s.short_by > 0);
                                }
                            }
                        }
                    }
                    Op::Release(v) => {
                        p.release(&format!("vm{v}"));
                    }
                }
                let sum = p.reservations().fold(Resources::ZERO, |a, r| a.saturating_add(&r.resources));
                prop_assert_eq!(sum, p.allocated());
                prop_assert!(p.allocated().fits_within(&p.capacity()));
                prop_assert_eq!(p.free().saturating_add(&p.allocated()), p.capacity());
            }
        }

        // Reserve then release gives back exactly the pool before.
        #[test]
        fn reserve_release_round_trips(first in resources(), second in resources()) {
            let mut p = pool();
            let _ = p.reserve("base", first);
            let before = p.clone();
            if p.reserve("x", second).is_ok() {
                prop_assert_eq!(p.release("x").map(|r| r.resources), Some(second));
            }
            prop_assert_eq!(p, before);
        }

        // A shortfall's amounts are exactly what would have to be freed:
        // adding them to capacity makes the demand fit.
        #[test]
        fn shortfall_amounts_are_exact(held in resources(), want in resources()) {
            let mut p = pool();
            let _ = p.reserve("held", held);
            if let Err(e) = p.check("new", &want) {
                let mut bigger = p.capacity();
                for s in &e.short {
                    bigger.set(s.resource, bigger.get(s.resource) + s.short_by);
                }
                let mut q = Pool::new(bigger, Resources::ZERO, Overcommit { cpu: 1.0, ..Overcommit::default() });
                if let Some(r) = p.reservation("held") {
                    q.reserve("held", r.resources).unwrap();
                }
                prop_assert!(q.reserve("new", want).is_ok());
            }
        }
    }
}
