//! Bootstrap orchestration inside labvm: recording which guest memory a
//! bootstrap writes (KVM dirty log) and applying the companion's pre-fault
//! plan, with rollback to lazy faulting when the plan cannot be applied.

use std::time::{Duration, Instant};

use balloon::{HostMapping, Prefetcher};
use kvm_bindings::{KVM_MEM_LOG_DIRTY_PAGES, kvm_userspace_memory_region};
use kvm_ioctls::VmFd;
use vmm_hooks::{
    BootProfile, PrefaultMode, PrefaultPlan, PrefaultReport, ProfileRequest, TouchWindow,
};

use crate::VmmError;
use crate::layout::PAGE_SIZE;

/// Turns dirty logging of the RAM slot on or off (`KVM_MR_FLAGS_ONLY`: the
/// slot keeps its memory).
pub(crate) fn set_dirty_logging(
    vm: &VmFd,
    slot: u32,
    host: u64,
    ram: u64,
    on: bool,
) -> Result<(), VmmError> {
    let region = kvm_userspace_memory_region {
        slot,
        flags: if on { KVM_MEM_LOG_DIRTY_PAGES } else { 0 },
        guest_phys_addr: 0,
        memory_size: ram,
        userspace_addr: host,
    };
    // SAFETY: the same slot, address and size as when the slot was created
    // over the live guest mapping (see LabVm::create); only the flags change.
    unsafe { vm.set_user_memory_region(region) }.map_err(|source| VmmError::Kvm {
        op: "set dirty logging",
        source,
    })
}

/// Records first writes per chunk from the dirty log, interval by interval.
#[derive(Debug)]
pub(crate) struct Profiler {
    req: ProfileRequest,
    ram: u64,
    pages_per_chunk: u64,
    seen: Vec<bool>,
    windows: Vec<TouchWindow>,
    last_poll: Instant,
}

impl Profiler {
    /// Checks the request against guest RAM.
    pub fn new(req: ProfileRequest, ram: u64) -> Result<Self, VmmError> {
        if req.chunk_size < PAGE_SIZE || !req.chunk_size.is_power_of_two() || req.chunk_size > ram {
            return Err(VmmError::Config(format!(
                "profile chunk size {} is not a power of two between 4096 and the RAM size",
                req.chunk_size
            )));
        }
        if req.interval_ms == 0 || req.interval_ms > 10_000 {
            return Err(VmmError::Config(format!(
                "profile interval {} ms is outside 1..=10000",
                req.interval_ms
            )));
        }
        let chunks = ram.div_ceil(req.chunk_size);
        Ok(Profiler {
            req,
            ram,
            pages_per_chunk: req.chunk_size / PAGE_SIZE,
            seen: vec![false; usize::try_from(chunks).unwrap_or(0)],
            windows: Vec::new(),
            last_poll: Instant::now(),
        })
    }

    /// The interval between polls.
    pub fn interval(&self) -> Duration {
        Duration::from_millis(self.req.interval_ms)
    }

    /// True when the next poll is due.
    pub fn due(&self, now: Instant) -> bool {
        now.saturating_duration_since(self.last_poll) >= self.interval()
    }

    /// Reads (and clears) the dirty log and records new chunks at `at_ms`.
    pub fn poll(&mut self, vm: &VmFd, slot: u32, at_ms: f64) -> Result<(), VmmError> {
        self.last_poll = Instant::now();
        let bitmap = vm
            .get_dirty_log(slot, usize::try_from(self.ram).unwrap_or(usize::MAX))
            .map_err(|source| VmmError::Kvm {
                op: "get dirty log",
                source,
            })?;
        self.record(&bitmap, at_ms);
        Ok(())
    }

    /// Records the chunks of the set bits of a 4 KiB-page dirty bitmap that
    /// were not seen before.
    pub fn record(&mut self, bitmap: &[u64], at_ms: f64) {
        let mut fresh = Vec::new();
        for (w, &word) in bitmap.iter().enumerate() {
            let mut bits = word;
            while bits != 0 {
                let b = u64::from(bits.trailing_zeros());
                bits &= bits - 1;
                let page = w as u64 * 64 + b;
                let chunk = page / self.pages_per_chunk;
                if let Some(s) = self
                    .seen
                    .get_mut(usize::try_from(chunk).unwrap_or(usize::MAX))
                    && !*s
                {
                    *s = true;
                    fresh.push(chunk);
                }
            }
        }
        if fresh.is_empty() {
            return;
        }
        fresh.sort_unstable();
        let mut runs: Vec<[u64; 2]> = Vec::new();
        for c in fresh {
            match runs.last_mut() {
                Some(r) if r[0] + r[1] == c => r[1] += 1,
                _ => runs.push([c, 1]),
            }
        }
        self.windows.push(TouchWindow { at_ms, runs });
    }

    /// The profile recorded so far.
    pub fn finish(self) -> BootProfile {
        let mut p = BootProfile::new(self.req.chunk_size, self.ram);
        p.windows = self.windows;
        p
    }
}

/// A pre-fault plan being applied.
#[derive(Debug)]
pub(crate) enum Applied {
    /// Nothing to do (no plan, or a lazy one).
    Nothing,
    /// Populated before the vCPUs started.
    Done(PrefaultReport),
    /// A prefetch thread is running.
    Prefetching(PrefaultMode, Prefetcher),
}

/// Applies `plan` to guest RAM. Errors never fail the boot: the plan is
/// rolled back to lazy faulting and the reason reported.
pub(crate) fn apply(map: HostMapping, plan: &PrefaultPlan) -> Applied {
    let t = Instant::now();
    let mut report = PrefaultReport::default();
    report.mode = plan.mode;
    let result = match plan.mode {
        PrefaultMode::Lazy => return Applied::Nothing,
        PrefaultMode::Before => balloon::populate_plan(&map, &plan.ranges, plan.hugepages),
        PrefaultMode::Full => balloon::populate_plan(
            &map,
            &[vmm_hooks::GuestRange {
                start: 0,
                len: map.len(),
            }],
            plan.hugepages,
        ),
        PrefaultMode::Concurrent => {
            let head = plan.bytes() * u64::from(plan.head_start_pct.min(100)) / 100;
            return match Prefetcher::spawn(
                map,
                plan.ranges.clone(),
                plan.extend.clone(),
                plan.hugepages,
                head,
            ) {
                Ok(p) => Applied::Prefetching(plan.mode, p),
                Err(e) => {
                    let reason = vmm_hooks::error_chain(&e);
                    tracing::warn!("pre-fault plan rolled back to lazy faulting: {reason}");
                    report.rolled_back = Some(reason);
                    Applied::Done(report)
                }
            };
        }
        _ => return Applied::Nothing,
    };
    report.ms = t.elapsed().as_secs_f64() * 1e3;
    match result {
        Ok(bytes) => report.bytes = bytes,
        Err(e) => {
            let reason = vmm_hooks::error_chain(&e);
            tracing::warn!("pre-fault plan rolled back to lazy faulting: {reason}");
            report.rolled_back = Some(reason);
        }
    }
    Applied::Done(report)
}

impl Applied {
    /// Stops a prefetch thread; returns the report (None: nothing was asked).
    pub fn finish(self) -> Option<PrefaultReport> {
        match self {
            Applied::Nothing => None,
            Applied::Done(r) => Some(r),
            Applied::Prefetching(mode, p) => {
                let stats = p.stop();
                let mut r = PrefaultReport::default();
                r.mode = mode;
                r.bytes = stats.planned_bytes + stats.extended_bytes;
                r.extended_bytes = stats.extended_bytes;
                r.ms = stats.busy.as_secs_f64() * 1e3;
                if let Some(e) = stats.error {
                    tracing::warn!(
                        "prefetch stopped early, the guest faulted the rest lazily: {e}"
                    );
                    r.rolled_back = Some(e);
                }
                Some(r)
            }
        }
    }

    /// True when a plan was asked for and is not (yet) rolled back.
    pub fn applied(&self) -> bool {
        match self {
            Applied::Nothing => false,
            Applied::Done(r) => r.rolled_back.is_none(),
            Applied::Prefetching(..) => true,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn profiler_records_first_writes_by_chunk_and_window() {
        let req = ProfileRequest {
            chunk_size: 16 * 1024,
            interval_ms: 5,
        };
        let mut p = Profiler::new(req, 1 << 20).unwrap();
        // Pages 0, 1 (chunk 0), 4 (chunk 1), 70 (chunk 17).
        let mut bm = vec![0u64; 4];
        bm[0] = 0b10011;
        bm[1] = 1 << 6;
        p.record(&bm, 1.0);
        // Page 2 (chunk 0 again: not new), page 8 (chunk 2), page 255 (chunk 63).
        let mut bm = vec![0u64; 4];
        bm[0] = (1 << 2) | (1 << 8);
        bm[3] = 1 << 63;
        p.record(&bm, 2.0);
        p.record(&[0; 4], 3.0);
        let prof = p.finish();
        assert_eq!(prof.windows.len(), 2);
        assert_eq!(prof.windows[0].runs, vec![[0, 2], [17, 1]]);
        assert_eq!(prof.windows[1].runs, vec![[2, 1], [63, 1]]);
        let touches: Vec<(u64, f64)> = prof.touches().collect();
        assert_eq!(
            touches,
            vec![(0, 1.0), (1, 1.0), (17, 1.0), (2, 2.0), (63, 2.0)]
        );
        assert_eq!(prof.touched_chunks(), 5);
    }

    #[test]
    fn profiler_rejects_bad_requests_and_ignores_bits_past_ram() {
        for (chunk, interval) in [(1000, 5), (2048, 5), (3 * 4096, 5), (2 << 30, 5), (4096, 0)] {
            let req = ProfileRequest {
                chunk_size: chunk,
                interval_ms: interval,
            };
            assert!(Profiler::new(req, 1 << 30).is_err(), "{chunk} {interval}");
        }
        let mut p = Profiler::new(
            ProfileRequest {
                chunk_size: 4096,
                interval_ms: 5,
            },
            64 * 4096,
        )
        .unwrap();
        p.record(&[0, u64::MAX], 1.0);
        assert_eq!(p.finish().touched_chunks(), 0);
    }
}
