//! Feeding the offload policy from the live machine and applying its moves.
//!
//! Reads per-thread CPU accounting from /proc (run time and run-queue wait
//! from `schedstat`) and turns it into [`ThreadLoad`]s; applies [`Move`]s
//! with `sched_setaffinity`.

use std::collections::BTreeMap;
use std::time::Instant;

use crate::offload::{Move, ThreadLoad};
use crate::plan::Placement;
use crate::sys::{BindError, MemPolicyMode, bind_memory, pin_thread, thread_affinity, thread_cpu};

/// One host mapping of guest memory: `len` bytes at host address `addr`.
/// A VM's mappings, in order, make up the offsets a [`Placement`]'s memory
/// segments refer to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct HostRange {
    /// Host virtual address (page aligned).
    pub addr: usize,
    /// Length in bytes (whole pages).
    pub len: usize,
}

/// Pin vCPU `i`'s thread (`vcpu_tids[i]`) to the placement's PU for vCPU `i`.
///
/// # Errors
/// The first thread the kernel refuses, or [`BindError::NoCpus`] for a
/// thread beyond the placement's vCPU count.
pub fn pin_vcpus(placement: &Placement, vcpu_tids: &[u32]) -> Result<(), BindError> {
    for (i, &tid) in vcpu_tids.iter().enumerate() {
        let pu = placement
            .vcpu_pus
            .get(i)
            .copied()
            .ok_or(BindError::NoCpus { tid })?;
        pin_thread(tid, &[pu])?;
    }
    tracing::info!(vm = placement.vm, tids = ?vcpu_tids, pus = ?placement.vcpu_pus, "vCPUs pinned");
    Ok(())
}

/// Bind the VM's guest memory to the placement's nodes, segment by segment
/// (`MPOL_BIND`), before it is pre-faulted. `mappings` are the VM's host
/// mappings in the order its memory offsets run.
///
/// # Errors
/// A segment boundary that is not page aligned inside a mapping, or the
/// kernel's refusal.
pub fn bind_guest_memory(placement: &Placement, mappings: &[HostRange]) -> Result<(), BindError> {
    for seg in &placement.memory {
        let (seg_start, seg_end) = (seg.offset_bytes, seg.offset_bytes + seg.len_bytes);
        let mut base = 0u64;
        for m in mappings {
            let (m_start, m_end) = (base, base + m.len as u64);
            base = m_end;
            let (start, end) = (seg_start.max(m_start), seg_end.min(m_end));
            if start >= end {
                continue;
            }
            let off = usize::try_from(start - m_start).unwrap_or(usize::MAX);
            let len = usize::try_from(end - start).unwrap_or(usize::MAX);
            bind_memory(m.addr + off, len, &[seg.node], MemPolicyMode::Bind, false)?;
        }
    }
    tracing::info!(
        vm = placement.vm,
        segments = placement.memory.len(),
        "guest memory bound"
    );
    Ok(())
}

/// What a thread's load counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum LoadMeasure {
    /// Time spent running: busy percent.
    Busy,
    /// Running plus waiting on a run queue: how much CPU it wanted. A PU
    /// with two always-runnable threads shows 200 whatever else runs.
    Demand,
}

/// Samples the CPU use of a set of threads of one process.
#[derive(Debug, Clone)]
pub struct ThreadSampler {
    pid: u32,
    measure: LoadMeasure,
    prev: BTreeMap<u32, (u64, Instant)>,
}

impl ThreadSampler {
    /// A sampler for threads of process `pid`.
    #[must_use]
    pub fn new(pid: u32, measure: LoadMeasure) -> Self {
        Self {
            pid,
            measure,
            prev: BTreeMap::new(),
        }
    }

    /// Read the threads now; loads are over the time since the previous
    /// call (a thread seen for the first time reports 0). The PU of a
    /// thread pinned to one PU is that PU, otherwise the PU it last ran on.
    ///
    /// # Errors
    /// A thread's /proc files cannot be read (it exited).
    pub fn sample(&mut self, tids: &[u32], now: Instant) -> Result<Vec<ThreadLoad>, BindError> {
        let mut out = Vec::with_capacity(tids.len());
        for &tid in tids {
            let cpu = thread_cpu(self.pid, tid)?;
            let used = match self.measure {
                LoadMeasure::Busy => cpu.run_ns,
                LoadMeasure::Demand => cpu.run_ns + cpu.wait_ns,
            };
            let load = self.prev.get(&tid).map_or(0, |&(before, at)| {
                let wall = now.saturating_duration_since(at).as_nanos().max(1);
                let pct = u128::from(used.saturating_sub(before)) * 100 / wall;
                u32::try_from(pct).unwrap_or(u32::MAX)
            });
            self.prev.insert(tid, (used, now));
            let allowed = thread_affinity(tid)?;
            let pu = match allowed.as_slice() {
                [only] => *only,
                _ => cpu.last_cpu,
            };
            out.push(ThreadLoad {
                tid,
                pu,
                load_percent: load,
                movable: true,
            });
        }
        self.prev.retain(|tid, _| tids.contains(tid));
        Ok(out)
    }
}

/// Pin each moved thread to its new PU.
///
/// # Errors
/// The first move the kernel refuses; earlier moves stay applied.
pub fn apply_moves(moves: &[Move]) -> Result<(), BindError> {
    for m in moves {
        pin_thread(m.tid, &[m.to_pu])?;
        tracing::info!(tid = m.tid, from = m.from_pu, to = m.to_pu, reason = ?m.reason, "vCPU thread offloaded");
    }
    Ok(())
}
