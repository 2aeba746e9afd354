//! Host topology, NUMA placement and binding for Prescient.
//!
//! This crate reads the host's topology through hwloc (packages, NUMA nodes,
//! cores, PUs, caches, distances, GPU and NIC locality) from the live
//! machine, an hwloc XML file or a synthetic description, and turns it into
//! a plain serde model. A pure planner places a VM's vCPUs and memory on that
//! model; a pure offload policy decides when to move vCPU threads off hot
//! cores; a thin binder applies decisions with `sched_setaffinity`, `mbind`
//! and cgroup files. It does not forecast demand (it takes demand as plain
//! data), does not own guest memory (the VMM hands it a host mapping) and
//! does not start or stop VMs.

mod cgroup;
mod hwloc;
mod live;
mod offload;
mod plan;
mod sys;
mod topology;

pub use cgroup::{
    AppliedSetting, CgroupBinder, CgroupLayout, CgroupOutcome, CgroupSettings, CpuMax, IoMax,
    SkippedSetting,
};
pub use hwloc::TopologyError;
pub use live::{HostRange, LoadMeasure, ThreadSampler, apply_moves, bind_guest_memory, pin_vcpus};
pub use offload::{
    LoadSample, Move, MoveReason, OffloadError, OffloadPolicy, Offloader, PuLoad, ThreadLoad,
};
pub use plan::{
    Ledger, MemorySegment, NodeCapacity, Placement, PlacementError, PlacementPolicy, Planner,
    Resource, SEGMENT_GRANULE, VmDemand,
};
pub use sys::{
    AnonMapping, BindError, MemPolicyMode, ThreadCpu, bind_memory, current_tid, memory_policy,
    page_node, pin_thread, thread_affinity, thread_cpu, threads_named,
};
pub use topology::{
    Cache, CacheKind, Core, Device, DeviceKind, DistanceOrigin, Distances, HostTopology, NumaNode,
    Package, TopologySource,
};
