//! The placement planner: pure, deterministic, no I/O.
//!
//! Given a [`HostTopology`], the placements already made (as a [`Ledger`])
//! and a VM's demand, choose the NUMA node(s), a vCPU-to-PU mapping and a
//! memory layout.
//!
//! Rules, in order:
//! 1. A VM that names a GPU goes on a node local to that GPU, or fails.
//! 2. Otherwise one node if any node can hold the whole VM; among those,
//!    the node left with the most headroom (least loaded after placement,
//!    the smaller of CPU and memory headroom), ties to the lowest node id.
//! 3. Otherwise, if the policy allows, spread over the fewest nodes that
//!    are closest to each other (by the distance matrix).
//!
//! Capacity: a node takes at most `cpu_overcommit_percent`% of its shared
//! PUs in vCPUs (no single PU gets more than the rounded-up ratio), and at
//! most `memory_limit_percent`% of its memory. A latency-sensitive VM gets
//! whole free cores, one vCPU per core on the core's first PU, and its
//! cores (SMT siblings included) leave the shared pool. With
//! `reserved_cores_per_node`, each node's last cores never take shared
//! vCPUs; latency-sensitive VMs use them before any other free core.

use std::collections::BTreeSet;
use std::fmt;

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::topology::HostTopology;

/// Memory layout granule: spread segments start on 2 MiB boundaries so that
/// `mbind` ranges are page aligned (huge pages included).
pub const SEGMENT_GRANULE: u64 = 2 << 20;

/// What a VM is predicted to need.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmDemand {
    /// VM identifier, unique on the host.
    pub vm: String,
    /// Number of vCPUs.
    pub vcpus: u32,
    /// Guest memory in bytes.
    pub memory_bytes: u64,
    /// A GPU to pass through, by PCI bus id or OS device name.
    pub gpu: Option<String>,
    /// Give each vCPU a whole core (no SMT sibling shared with anyone).
    pub latency_sensitive: bool,
}

/// Limits the planner honours.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlacementPolicy {
    /// Shared vCPUs per 100 shared PUs on a node (100 = no overcommit).
    pub cpu_overcommit_percent: u32,
    /// Share of each node's memory that VMs may take, in percent.
    pub memory_limit_percent: u32,
    /// Spread a VM over several nodes when no single node can hold it.
    pub allow_spread: bool,
    /// Cores per node (the node's last ones) kept for latency-sensitive
    /// VMs: shared vCPUs never land there, so whole cores stay available
    /// however many shared VMs arrive first.
    #[serde(default)]
    pub reserved_cores_per_node: u32,
}

impl Default for PlacementPolicy {
    fn default() -> Self {
        Self {
            cpu_overcommit_percent: 100,
            memory_limit_percent: 90,
            allow_spread: true,
            reserved_cores_per_node: 0,
        }
    }
}

/// A contiguous part of the VM's memory bound to one node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemorySegment {
    /// Node the pages must come from.
    pub node: u32,
    /// Offset into the VM's memory (guest-physical order of its mappings).
    pub offset_bytes: u64,
    /// Length in bytes.
    pub len_bytes: u64,
}

/// Where a VM runs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Placement {
    /// VM identifier.
    pub vm: String,
    /// Nodes used, ascending.
    pub nodes: Vec<u32>,
    /// PU for each vCPU: `vcpu_pus[i]` is vCPU i's PU.
    pub vcpu_pus: Vec<u32>,
    /// Cores the VM holds alone (latency-sensitive VMs), by core index.
    pub exclusive_cores: Vec<usize>,
    /// Memory layout: segments in offset order, covering the whole VM.
    pub memory: Vec<MemorySegment>,
    /// GPU the VM was placed next to.
    pub gpu: Option<String>,
}

impl Placement {
    /// True when CPUs and memory are on one node.
    #[must_use]
    pub fn is_single_node(&self) -> bool {
        self.nodes.len() == 1
    }

    /// Bytes of the VM's memory on `node`.
    #[must_use]
    pub fn memory_on(&self, node: u32) -> u64 {
        self.memory
            .iter()
            .filter(|s| s.node == node)
            .map(|s| s.len_bytes)
            .sum()
    }
}

/// A resource the planner counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Resource {
    /// Shared vCPU slots.
    Vcpus,
    /// Whole free cores (latency-sensitive VMs).
    WholeCores,
    /// Memory in bytes.
    MemoryBytes,
}

impl fmt::Display for Resource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Vcpus => "vCPU slots",
            Self::WholeCores => "whole free cores",
            Self::MemoryBytes => "bytes of memory",
        })
    }
}

/// Why a VM could not be placed.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum PlacementError {
    /// The demand itself is impossible (zero vCPUs, zero memory).
    #[error("vm {vm}: invalid demand: {reason}")]
    InvalidDemand {
        /// VM id.
        vm: String,
        /// What is wrong.
        reason: String,
    },
    /// The VM already has a placement.
    #[error("vm {vm} is already placed on this host")]
    AlreadyPlaced {
        /// VM id.
        vm: String,
    },
    /// The GPU named by the demand is not on this host.
    #[error("vm {vm}: no GPU named {gpu} on this host")]
    UnknownGpu {
        /// VM id.
        vm: String,
        /// The GPU name as given.
        gpu: String,
    },
    /// An existing placement names a PU this host does not have.
    #[error("vm {vm}: placement uses PU {pu}, which this host does not have")]
    UnknownPu {
        /// VM id.
        vm: String,
        /// The PU.
        pu: u32,
    },
    /// An existing placement names a node or core this host does not have.
    #[error("vm {vm}: placement uses NUMA node {node}, which this host does not have")]
    UnknownNode {
        /// VM id.
        vm: String,
        /// The node.
        node: u32,
    },
    /// The GPU's node cannot hold the VM.
    #[error(
        "vm {vm}: needs {needed} {resource} on node {node} (local to GPU {gpu}) but it has {available} free (short by {short})",
        short = needed.saturating_sub(*available)
    )]
    GpuNodeShort {
        /// VM id.
        vm: String,
        /// GPU name.
        gpu: String,
        /// The GPU's node that came closest.
        node: u32,
        /// The missing resource.
        resource: Resource,
        /// Needed amount.
        needed: u64,
        /// Free amount.
        available: u64,
    },
    /// No single node fits and spreading is disabled.
    #[error(
        "vm {vm}: needs {needed} {resource} on one node (spreading is off) but the best node, {node}, has {available} free (short by {short})",
        short = needed.saturating_sub(*available)
    )]
    NoSingleNode {
        /// VM id.
        vm: String,
        /// The node that came closest.
        node: u32,
        /// The missing resource.
        resource: Resource,
        /// Needed amount.
        needed: u64,
        /// Free amount.
        available: u64,
    },
    /// Even spread over every node, the host is short.
    #[error(
        "vm {vm}: needs {needed} {resource} but the whole host has {available} free (short by {short})",
        short = needed.saturating_sub(*available)
    )]
    HostShort {
        /// VM id.
        vm: String,
        /// The missing resource.
        resource: Resource,
        /// Needed amount.
        needed: u64,
        /// Free amount host-wide.
        available: u64,
    },
}

/// Per-PU facts precomputed from the topology.
#[derive(Debug, Clone)]
struct PuInfo {
    id: u32,
    core: usize,
    node: usize,
    /// Position among its core's PUs (0 = first hardware thread).
    sibling_rank: usize,
}

#[derive(Debug, Clone)]
struct NodeInfo {
    id: u32,
    memory_bytes: u64,
    /// Indices into `Planner::cores`.
    cores: Vec<usize>,
}

#[derive(Debug, Clone)]
struct CoreInfo {
    /// Indices into `Planner::pus`.
    pus: Vec<usize>,
}

/// Usage of the host by the placements made so far.
///
/// Built by [`Planner::ledger`], updated by [`Planner::record`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ledger {
    pu_vcpus: Vec<u32>,
    core_exclusive: Vec<bool>,
    node_shared_vcpus: Vec<u64>,
    node_memory: Vec<u64>,
    vms: BTreeSet<String>,
}

impl Ledger {
    /// Number of VMs recorded.
    #[must_use]
    pub fn len(&self) -> usize {
        self.vms.len()
    }

    /// True when no VM is recorded.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.vms.is_empty()
    }
}

/// Free capacity of one node, as the planner sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeCapacity {
    /// Node id.
    pub node: u32,
    /// Shared vCPU slots left.
    pub free_vcpus: u64,
    /// Cores with no vCPU on any of their PUs.
    pub free_cores: u64,
    /// Memory left under the policy's limit.
    pub free_memory_bytes: u64,
}

/// The planner: a topology, a policy, and precomputed indices.
#[derive(Debug, Clone)]
pub struct Planner {
    policy: PlacementPolicy,
    pus: Vec<PuInfo>,
    cores: Vec<CoreInfo>,
    nodes: Vec<NodeInfo>,
    /// Row-major node-index distance matrix.
    distance: Vec<u64>,
    devices: Vec<(String, Vec<String>, Vec<usize>)>,
    /// PU id -> index into `pus` (PU ids are small and dense).
    pu_lookup: Vec<Option<usize>>,
    /// Per core: held back for latency-sensitive VMs.
    reserved: Vec<bool>,
}

impl Planner {
    /// Prepare a planner for this topology and policy.
    #[must_use]
    pub fn new(topology: &HostTopology, policy: PlacementPolicy) -> Self {
        let nodes: Vec<NodeInfo> = topology
            .nodes
            .iter()
            .map(|n| NodeInfo {
                id: n.id,
                memory_bytes: n.memory_bytes,
                cores: Vec::new(),
            })
            .collect();
        let mut planner = Self {
            policy,
            pus: Vec::new(),
            cores: Vec::new(),
            nodes,
            distance: Vec::new(),
            devices: Vec::new(),
            pu_lookup: Vec::new(),
            reserved: Vec::new(),
        };
        for core in &topology.cores {
            // A core without a node (rare; memory-less CPUs) is not placeable.
            let Some(node) = core
                .node
                .and_then(|id| planner.nodes.iter().position(|n| n.id == id))
            else {
                continue;
            };
            let ci = planner.cores.len();
            let mut pus = Vec::new();
            for (rank, &pu) in core.pus.iter().enumerate() {
                pus.push(planner.pus.len());
                planner.pus.push(PuInfo {
                    id: pu,
                    core: ci,
                    node,
                    sibling_rank: rank,
                });
            }
            planner.cores.push(CoreInfo { pus });
            if let Some(n) = planner.nodes.get_mut(node) {
                n.cores.push(ci);
            }
        }
        planner.reserved = vec![false; planner.cores.len()];
        for n in &planner.nodes {
            let keep = (policy.reserved_cores_per_node as usize).min(n.cores.len());
            for &c in n.cores.iter().rev().take(keep) {
                if let Some(r) = planner.reserved.get_mut(c) {
                    *r = true;
                }
            }
        }
        let max_pu = planner.pus.iter().map(|p| p.id as usize).max().unwrap_or(0);
        planner.pu_lookup = vec![None; max_pu + 1];
        for (i, p) in planner.pus.iter().enumerate() {
            if let Some(slot) = planner.pu_lookup.get_mut(p.id as usize) {
                *slot = Some(i);
            }
        }
        let ids: Vec<u32> = planner.nodes.iter().map(|n| n.id).collect();
        for &a in &ids {
            for &b in &ids {
                let d = topology
                    .distance(a, b)
                    .unwrap_or(if a == b { 10 } else { 20 });
                planner.distance.push(d);
            }
        }
        planner.devices = topology
            .devices
            .iter()
            .filter(|d| d.kind == crate::topology::DeviceKind::Gpu)
            .map(|d| {
                (
                    d.pci_bus_id.clone(),
                    d.names.clone(),
                    d.nodes
                        .iter()
                        .filter_map(|id| ids.iter().position(|x| x == id))
                        .collect(),
                )
            })
            .collect();
        planner
    }

    /// The policy in force.
    #[must_use]
    pub fn policy(&self) -> PlacementPolicy {
        self.policy
    }

    /// An empty ledger for this host.
    #[must_use]
    pub fn empty_ledger(&self) -> Ledger {
        Ledger {
            pu_vcpus: vec![0; self.pus.len()],
            core_exclusive: vec![false; self.cores.len()],
            node_shared_vcpus: vec![0; self.nodes.len()],
            node_memory: vec![0; self.nodes.len()],
            vms: BTreeSet::new(),
        }
    }

    /// A ledger holding these placements.
    ///
    /// # Errors
    /// A placement naming an unknown PU or node, or the same VM twice.
    pub fn ledger(&self, placements: &[Placement]) -> Result<Ledger, PlacementError> {
        let mut ledger = self.empty_ledger();
        for p in placements {
            self.record(&mut ledger, p)?;
        }
        Ok(ledger)
    }

    /// Add a placement to the ledger.
    ///
    /// # Errors
    /// A placement naming an unknown PU or node, or a VM already recorded;
    /// the ledger is unchanged then.
    pub fn record(&self, ledger: &mut Ledger, p: &Placement) -> Result<(), PlacementError> {
        if ledger.vms.contains(&p.vm) {
            return Err(PlacementError::AlreadyPlaced { vm: p.vm.clone() });
        }
        let mut pu_idx = Vec::with_capacity(p.vcpu_pus.len());
        for &pu in &p.vcpu_pus {
            let i = self.pu_index(pu).ok_or_else(|| PlacementError::UnknownPu {
                vm: p.vm.clone(),
                pu,
            })?;
            pu_idx.push(i);
        }
        let mut mem_idx = Vec::with_capacity(p.memory.len());
        for seg in &p.memory {
            let n = self
                .node_index(seg.node)
                .ok_or_else(|| PlacementError::UnknownNode {
                    vm: p.vm.clone(),
                    node: seg.node,
                })?;
            mem_idx.push((n, seg.len_bytes));
        }
        if let Some(&bad) = p.exclusive_cores.iter().find(|&&c| c >= self.cores.len()) {
            return Err(PlacementError::UnknownPu {
                vm: p.vm.clone(),
                pu: u32::try_from(bad).unwrap_or(u32::MAX),
            });
        }
        for &c in &p.exclusive_cores {
            if let Some(e) = ledger.core_exclusive.get_mut(c) {
                *e = true;
            }
        }
        for i in pu_idx {
            let Some(info) = self.pus.get(i) else {
                continue;
            };
            if p.exclusive_cores.contains(&info.core) {
                continue;
            }
            if let Some(v) = ledger.pu_vcpus.get_mut(i) {
                *v += 1;
            }
            if let Some(v) = ledger.node_shared_vcpus.get_mut(info.node) {
                *v += 1;
            }
        }
        for (n, len) in mem_idx {
            if let Some(m) = ledger.node_memory.get_mut(n) {
                *m += len;
            }
        }
        ledger.vms.insert(p.vm.clone());
        Ok(())
    }

    /// Free capacity per node, ascending node id.
    #[must_use]
    pub fn capacity(&self, ledger: &Ledger) -> Vec<NodeCapacity> {
        (0..self.nodes.len())
            .map(|k| NodeCapacity {
                node: self.nodes.get(k).map_or(0, |n| n.id),
                free_vcpus: self.free_vcpus(ledger, k),
                free_cores: self.free_cores(ledger, k).len() as u64,
                free_memory_bytes: self.free_memory(ledger, k),
            })
            .collect()
    }

    /// Place a VM given the placements already recorded.
    ///
    /// # Errors
    /// [`PlacementError`] naming the resource and the shortfall.
    pub fn plan(&self, ledger: &Ledger, demand: &VmDemand) -> Result<Placement, PlacementError> {
        let vm = demand.vm.clone();
        if demand.vcpus == 0 {
            return Err(PlacementError::InvalidDemand {
                vm,
                reason: "zero vCPUs".into(),
            });
        }
        if demand.memory_bytes == 0 {
            return Err(PlacementError::InvalidDemand {
                vm,
                reason: "zero memory".into(),
            });
        }
        if ledger.vms.contains(&demand.vm) {
            return Err(PlacementError::AlreadyPlaced { vm });
        }
        let cpu_resource = if demand.latency_sensitive {
            Resource::WholeCores
        } else {
            Resource::Vcpus
        };
        let vcpus = u64::from(demand.vcpus);

        let candidates: Vec<usize> = match &demand.gpu {
            Some(gpu) => self
                .devices
                .iter()
                .find(|(bus, names, _)| bus == gpu || names.iter().any(|n| n == gpu))
                .map(|(_, _, nodes)| nodes.clone())
                .ok_or_else(|| PlacementError::UnknownGpu {
                    vm: vm.clone(),
                    gpu: gpu.clone(),
                })?,
            None => (0..self.nodes.len()).collect(),
        };

        // 1 and 2: one node, most headroom after placement.
        let mut best: Option<(u64, usize)> = None;
        for &k in &candidates {
            let cpu_room = self.cpu_room(ledger, k, demand.latency_sensitive);
            let mem_room = self.free_memory(ledger, k);
            if cpu_room < vcpus || mem_room < demand.memory_bytes {
                continue;
            }
            let cpu_total = self.cpu_total(k, demand.latency_sensitive).max(1);
            let mem_total = self.memory_cap(k).max(1);
            let cpu_left = permille(cpu_room - vcpus, cpu_total);
            let mem_left = permille(mem_room - demand.memory_bytes, mem_total);
            let score = cpu_left.min(mem_left);
            if best.is_none_or(|(s, _)| score > s) {
                best = Some((score, k));
            }
        }
        if let Some((_, k)) = best {
            return Ok(self.build(
                ledger,
                demand,
                &[(k, demand.vcpus)],
                &[(k, demand.memory_bytes)],
            ));
        }

        // Nothing fits on one node: name the closest miss.
        let closest = candidates
            .iter()
            .map(|&k| {
                let cpu = self.cpu_room(ledger, k, demand.latency_sensitive);
                let mem = self.free_memory(ledger, k);
                let shorts = u8::from(cpu < vcpus) + u8::from(mem < demand.memory_bytes);
                let (resource, needed, available) = if cpu < vcpus {
                    (cpu_resource, vcpus, cpu)
                } else {
                    (Resource::MemoryBytes, demand.memory_bytes, mem)
                };
                (shorts, needed - available, k, resource, needed, available)
            })
            .min_by_key(|&(shorts, gap, k, ..)| (shorts, gap, k));
        let Some((_, _, k, resource, needed, available)) = closest else {
            // A GPU without node locality in this topology.
            return Err(PlacementError::UnknownGpu {
                vm,
                gpu: demand.gpu.clone().unwrap_or_default(),
            });
        };
        let node = self.nodes.get(k).map_or(0, |n| n.id);
        if let Some(gpu) = &demand.gpu {
            return Err(PlacementError::GpuNodeShort {
                vm,
                gpu: gpu.clone(),
                node,
                resource,
                needed,
                available,
            });
        }
        if !self.policy.allow_spread {
            return Err(PlacementError::NoSingleNode {
                vm,
                node,
                resource,
                needed,
                available,
            });
        }

        // 3: spread over the fewest, closest nodes.
        let rooms: Vec<(u64, u64)> = (0..self.nodes.len())
            .map(|k| {
                (
                    self.cpu_room(ledger, k, demand.latency_sensitive),
                    self.free_memory(ledger, k) / SEGMENT_GRANULE,
                )
            })
            .collect();
        let total_cpu: u64 = rooms.iter().map(|r| r.0).sum();
        let units = demand.memory_bytes.div_ceil(SEGMENT_GRANULE);
        let total_units: u64 = rooms.iter().map(|r| r.1).sum();
        if total_cpu < vcpus {
            return Err(PlacementError::HostShort {
                vm,
                resource: cpu_resource,
                needed: vcpus,
                available: total_cpu,
            });
        }
        if total_units < units {
            return Err(PlacementError::HostShort {
                vm,
                resource: Resource::MemoryBytes,
                needed: demand.memory_bytes,
                available: total_units * SEGMENT_GRANULE,
            });
        }
        let n = self.nodes.len();
        let mut best_set: Option<((usize, u64, usize), Vec<usize>)> = None;
        for seed in 0..n {
            let mut order: Vec<usize> = (0..n).collect();
            order.sort_by_key(|&k| (self.dist(seed, k), self.nodes.get(k).map_or(0, |x| x.id)));
            let (mut cpu, mut mem, mut set, mut spread_cost) = (0u64, 0u64, Vec::new(), 0u64);
            for k in order {
                if cpu >= vcpus && mem >= units {
                    break;
                }
                let (c, m) = rooms.get(k).copied().unwrap_or((0, 0));
                let useful = (cpu < vcpus && c > 0) || (mem < units && m > 0);
                if !useful {
                    continue;
                }
                cpu += c;
                mem += m;
                spread_cost += self.dist(seed, k);
                set.push(k);
            }
            if cpu < vcpus || mem < units {
                continue;
            }
            let key = (set.len(), spread_cost, seed);
            if best_set.as_ref().is_none_or(|(b, _)| key < *b) {
                best_set = Some((key, set));
            }
        }
        let Some((_, set)) = best_set else {
            return Err(PlacementError::HostShort {
                vm,
                resource: cpu_resource,
                needed: vcpus,
                available: total_cpu,
            });
        };
        // vCPUs: fill nodes in order of closeness to the seed.
        let mut left = vcpus;
        let mut cpu_split = Vec::new();
        for &k in &set {
            let take = left.min(rooms.get(k).map_or(0, |r| r.0));
            if take > 0 {
                cpu_split.push((k, u32::try_from(take).unwrap_or(u32::MAX)));
            }
            left -= take;
        }
        // Memory: in proportion to vCPUs, then overflow to nodes with room.
        let mut alloc: Vec<u64> = set
            .iter()
            .map(|&k| {
                let share = cpu_split
                    .iter()
                    .find(|(x, _)| *x == k)
                    .map_or(0, |(_, v)| u64::from(*v));
                let want = u64::try_from(u128::from(units) * u128::from(share) / u128::from(vcpus))
                    .unwrap_or(u64::MAX);
                want.min(rooms.get(k).map_or(0, |r| r.1))
            })
            .collect();
        let mut rest = units - alloc.iter().sum::<u64>();
        for (i, &k) in set.iter().enumerate() {
            let room = rooms.get(k).map_or(0, |r| r.1);
            if let Some(a) = alloc.get_mut(i) {
                let add = rest.min(room - *a);
                *a += add;
                rest -= add;
            }
        }
        let mut mem_split = Vec::new();
        let mut placed = 0u64;
        for (i, &k) in set.iter().enumerate() {
            let u = alloc.get(i).copied().unwrap_or(0);
            if u == 0 {
                continue;
            }
            let bytes = (u * SEGMENT_GRANULE).min(demand.memory_bytes - placed);
            placed += bytes;
            mem_split.push((k, bytes));
        }
        Ok(self.build(ledger, demand, &cpu_split, &mem_split))
    }

    /// Ledger + plan in one call.
    ///
    /// # Errors
    /// As [`Planner::ledger`] and [`Planner::plan`].
    pub fn place(
        &self,
        placements: &[Placement],
        demand: &VmDemand,
    ) -> Result<Placement, PlacementError> {
        let ledger = self.ledger(placements)?;
        self.plan(&ledger, demand)
    }

    fn build(
        &self,
        ledger: &Ledger,
        demand: &VmDemand,
        cpu_split: &[(usize, u32)],
        mem_split: &[(usize, u64)],
    ) -> Placement {
        let mut vcpu_pus = Vec::new();
        let mut exclusive_cores = Vec::new();
        for &(k, count) in cpu_split {
            if demand.latency_sensitive {
                for c in self.free_cores(ledger, k).into_iter().take(count as usize) {
                    exclusive_cores.push(c);
                    let first = self
                        .cores
                        .get(c)
                        .and_then(|core| core.pus.first())
                        .and_then(|&p| self.pus.get(p));
                    if let Some(pu) = first {
                        vcpu_pus.push(pu.id);
                    }
                }
            } else {
                vcpu_pus.extend(self.pick_shared_pus(ledger, k, count));
            }
        }
        let mut memory = Vec::new();
        let mut offset = 0;
        for &(k, bytes) in mem_split {
            let node = self.nodes.get(k).map_or(0, |n| n.id);
            memory.push(MemorySegment {
                node,
                offset_bytes: offset,
                len_bytes: bytes,
            });
            offset += bytes;
        }
        let mut nodes: Vec<u32> = cpu_split
            .iter()
            .map(|(k, _)| *k)
            .chain(mem_split.iter().map(|(k, _)| *k))
            .filter_map(|k| self.nodes.get(k).map(|n| n.id))
            .collect();
        nodes.sort_unstable();
        nodes.dedup();
        Placement {
            vm: demand.vm.clone(),
            nodes,
            vcpu_pus,
            exclusive_cores,
            memory,
            gpu: demand.gpu.clone(),
        }
    }

    /// Least-loaded shared PUs of node `k`: first hardware threads of the
    /// emptiest cores first, so vCPUs spread over cores before doubling up.
    fn pick_shared_pus(&self, ledger: &Ledger, k: usize, count: u32) -> Vec<u32> {
        let per_pu_cap = self.policy.cpu_overcommit_percent.div_ceil(100).max(1);
        let Some(node) = self.nodes.get(k) else {
            return Vec::new();
        };
        let mut load: Vec<(usize, u32)> = node
            .cores
            .iter()
            .filter(|&&c| self.in_shared_pool(ledger, c))
            .filter_map(|&c| self.cores.get(c))
            .flat_map(|core| core.pus.iter())
            .map(|&p| (p, ledger.pu_vcpus.get(p).copied().unwrap_or(0)))
            .collect();
        let mut core_load: Vec<u32> = self
            .cores
            .iter()
            .map(|c| {
                c.pus
                    .iter()
                    .map(|&p| ledger.pu_vcpus.get(p).copied().unwrap_or(0))
                    .sum()
            })
            .collect();
        let mut out = Vec::with_capacity(count as usize);
        for _ in 0..count {
            let pick = load
                .iter_mut()
                .filter(|(_, n)| *n < per_pu_cap)
                .min_by_key(|(p, n)| {
                    let info = self.pus.get(*p);
                    let core = info.map_or(0, |i| i.core);
                    (
                        *n,
                        info.map_or(0, |i| i.sibling_rank),
                        core_load.get(core).copied().unwrap_or(0),
                        info.map_or(0, |i| i.id),
                    )
                });
            let Some((p, n)) = pick else { break };
            *n += 1;
            if let Some(info) = self.pus.get(*p) {
                if let Some(cl) = core_load.get_mut(info.core) {
                    *cl += 1;
                }
                out.push(info.id);
            }
        }
        out
    }

    fn pu_index(&self, pu: u32) -> Option<usize> {
        self.pu_lookup.get(pu as usize).copied().flatten()
    }

    fn node_index(&self, node: u32) -> Option<usize> {
        self.nodes.iter().position(|n| n.id == node)
    }

    fn dist(&self, a: usize, b: usize) -> u64 {
        self.distance
            .get(a * self.nodes.len() + b)
            .copied()
            .unwrap_or(u64::MAX)
    }

    fn memory_cap(&self, k: usize) -> u64 {
        let mem = self.nodes.get(k).map_or(0, |n| n.memory_bytes);
        u64::try_from(u128::from(mem) * u128::from(self.policy.memory_limit_percent.min(100)) / 100)
            .unwrap_or(u64::MAX)
    }

    fn free_memory(&self, ledger: &Ledger, k: usize) -> u64 {
        self.memory_cap(k)
            .saturating_sub(ledger.node_memory.get(k).copied().unwrap_or(0))
    }

    fn shared_pus(&self, ledger: &Ledger, k: usize) -> u64 {
        self.nodes.get(k).map_or(0, |n| {
            n.cores
                .iter()
                .filter(|&&c| self.in_shared_pool(ledger, c))
                .filter_map(|&c| self.cores.get(c))
                .map(|c| c.pus.len() as u64)
                .sum()
        })
    }

    /// Shared vCPUs may use this core: not held by a latency-sensitive VM,
    /// not reserved for one.
    fn in_shared_pool(&self, ledger: &Ledger, c: usize) -> bool {
        !ledger.core_exclusive.get(c).copied().unwrap_or(true)
            && !self.reserved.get(c).copied().unwrap_or(true)
    }

    fn vcpu_cap(&self, shared_pus: u64) -> u64 {
        shared_pus * u64::from(self.policy.cpu_overcommit_percent) / 100
    }

    fn free_vcpus(&self, ledger: &Ledger, k: usize) -> u64 {
        self.vcpu_cap(self.shared_pus(ledger, k))
            .saturating_sub(ledger.node_shared_vcpus.get(k).copied().unwrap_or(0))
    }

    /// Cores of node `k` with no vCPU on any PU: reserved ones first, then
    /// ascending core index.
    fn free_cores(&self, ledger: &Ledger, k: usize) -> Vec<usize> {
        self.nodes.get(k).map_or_else(Vec::new, |n| {
            let mut order: Vec<usize> = n.cores.clone();
            order.sort_by_key(|&c| (!self.reserved.get(c).copied().unwrap_or(false), c));
            order
                .into_iter()
                .filter(|&c| {
                    !ledger.core_exclusive.get(c).copied().unwrap_or(true)
                        && self.cores.get(c).is_some_and(|core| {
                            core.pus
                                .iter()
                                .all(|&p| ledger.pu_vcpus.get(p).copied().unwrap_or(1) == 0)
                        })
                })
                .collect()
        })
    }

    /// How many whole cores a latency-sensitive VM can take on node `k`
    /// without pushing the shared vCPUs over the policy's limit.
    fn exclusive_room(&self, ledger: &Ledger, k: usize) -> u64 {
        let shared = self.shared_pus(ledger, k);
        let used = ledger.node_shared_vcpus.get(k).copied().unwrap_or(0);
        let mut taken_pus = 0u64;
        let mut room = 0u64;
        for c in self.free_cores(ledger, k) {
            // A reserved core is outside the shared pool already.
            let pus = if self.reserved.get(c).copied().unwrap_or(false) {
                0
            } else {
                self.cores.get(c).map_or(0, |core| core.pus.len() as u64)
            };
            if self.vcpu_cap(shared.saturating_sub(taken_pus + pus)) < used {
                break;
            }
            taken_pus += pus;
            room += 1;
        }
        room
    }

    fn cpu_room(&self, ledger: &Ledger, k: usize, latency_sensitive: bool) -> u64 {
        if latency_sensitive {
            self.exclusive_room(ledger, k)
        } else {
            self.free_vcpus(ledger, k)
        }
    }

    fn cpu_total(&self, k: usize, latency_sensitive: bool) -> u64 {
        let node = self.nodes.get(k);
        if latency_sensitive {
            node.map_or(0, |n| n.cores.len() as u64)
        } else {
            let pus = node.map_or(0, |n| {
                n.cores
                    .iter()
                    .filter(|&&c| !self.reserved.get(c).copied().unwrap_or(false))
                    .filter_map(|&c| self.cores.get(c))
                    .map(|c| c.pus.len() as u64)
                    .sum()
            });
            self.vcpu_cap(pus)
        }
    }
}

fn permille(part: u64, whole: u64) -> u64 {
    u64::try_from(u128::from(part) * 1000 / u128::from(whole.max(1))).unwrap_or(u64::MAX)
}
