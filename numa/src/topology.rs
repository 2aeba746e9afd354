//! The host topology as plain data.
//!
//! Built from hwloc by `hwloc.rs`; everything else in the crate (planner,
//! offload) reads only this model, so it can be serialised, compared in
//! tests and replayed without hwloc.

use serde::{Deserialize, Serialize};

/// Where a topology came from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum TopologySource {
    /// Discovered on the running machine.
    Live,
    /// Imported from an hwloc XML file.
    XmlFile {
        /// The file's path as given.
        path: String,
    },
    /// Imported from an hwloc XML document held in memory.
    XmlText,
    /// Built from an hwloc synthetic description.
    Synthetic {
        /// The description, e.g. `"pack:2 numa:2(memory=8GiB) core:4 pu:2"`.
        description: String,
    },
}

/// A processor package (socket).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Package {
    /// Logical index of the package (0..n in hwloc's order).
    pub index: u32,
    /// NUMA node ids (OS numbering) whose CPUs lie in this package.
    pub nodes: Vec<u32>,
    /// PU ids (OS numbering, as the kernel names CPUs) in this package.
    pub pus: Vec<u32>,
}

/// A NUMA node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NumaNode {
    /// The node id as the kernel numbers it (`mbind`, `/sys/devices/system/node/nodeN`).
    pub id: u32,
    /// Logical index of the package holding this node's CPUs, if any.
    pub package: Option<u32>,
    /// Local memory in bytes.
    pub memory_bytes: u64,
    /// PU ids local to this node, ascending.
    pub pus: Vec<u32>,
    /// Indices into [`HostTopology::cores`] of the cores local to this node.
    pub cores: Vec<usize>,
}

/// A physical core and its hardware threads.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Core {
    /// Logical index of the core (unique host-wide).
    pub index: usize,
    /// Logical index of its package, if any.
    pub package: Option<u32>,
    /// The NUMA node whose CPUs include this core, if any.
    pub node: Option<u32>,
    /// Its PUs (SMT siblings), ascending OS ids.
    pub pus: Vec<u32>,
}

/// Kind of a CPU cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum CacheKind {
    /// Holds data and instructions.
    Unified,
    /// Data only.
    Data,
    /// Instructions only.
    Instruction,
}

/// A CPU cache and the PUs that share it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cache {
    /// 1 for L1, 2 for L2, ...
    pub level: u8,
    /// Data, instruction or unified.
    pub kind: CacheKind,
    /// Size in bytes (0 when hwloc does not know).
    pub size_bytes: u64,
    /// PUs sharing this cache.
    pub pus: Vec<u32>,
}

/// Whether node distances were reported by the platform or derived by us.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum DistanceOrigin {
    /// From hwloc (ACPI SLIT, HMAT, an XML file, ...).
    Reported,
    /// Derived from the package structure: 10 within a node, 20 within a
    /// package, 30 across packages (the kernel's SLIT convention).
    Derived,
}

/// Node-to-node distance matrix (relative latency; 10 = local).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Distances {
    /// Node ids in matrix order.
    pub nodes: Vec<u32>,
    /// Row-major `nodes.len() x nodes.len()` values.
    pub values: Vec<u64>,
    /// Reported by the platform or derived.
    pub origin: DistanceOrigin,
}

/// Kind of an I/O device whose locality matters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum DeviceKind {
    /// A GPU or other display/3D/compute accelerator (PCI class 0x03 or 0x12).
    Gpu,
    /// A network interface (PCI class 0x02).
    Nic,
}

/// A PCI device hwloc reported, with its NUMA locality.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Device {
    /// GPU or NIC.
    pub kind: DeviceKind,
    /// PCI bus id, `dddd:bb:dd.f`.
    pub pci_bus_id: String,
    /// OS device names under it (`eth0`, `card1`, `cuda0`, ...).
    pub names: Vec<String>,
    /// Nodes local to the device. All nodes when hwloc attached it to the
    /// whole machine (no locality known).
    pub nodes: Vec<u32>,
}

impl Device {
    /// True if `name` is this device's PCI bus id or one of its OS names.
    #[must_use]
    pub fn is_named(&self, name: &str) -> bool {
        self.pci_bus_id == name || self.names.iter().any(|n| n == name)
    }
}

/// The host as the planner sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostTopology {
    /// Where the description came from.
    pub source: TopologySource,
    /// Packages in logical order.
    pub packages: Vec<Package>,
    /// NUMA nodes, ascending id.
    pub nodes: Vec<NumaNode>,
    /// Cores in logical order.
    pub cores: Vec<Core>,
    /// CPU caches, L1 first.
    pub caches: Vec<Cache>,
    /// Node distance matrix.
    pub distances: Distances,
    /// GPUs and NICs with their locality.
    pub devices: Vec<Device>,
}

impl HostTopology {
    /// The node with this id.
    #[must_use]
    pub fn node(&self, id: u32) -> Option<&NumaNode> {
        self.nodes.iter().find(|n| n.id == id)
    }

    /// Distance between two nodes; `None` if either is unknown.
    #[must_use]
    pub fn distance(&self, from: u32, to: u32) -> Option<u64> {
        let n = self.distances.nodes.len();
        let i = self.distances.nodes.iter().position(|&x| x == from)?;
        let j = self.distances.nodes.iter().position(|&x| x == to)?;
        self.distances.values.get(i * n + j).copied()
    }

    /// The core holding this PU.
    #[must_use]
    pub fn core_of_pu(&self, pu: u32) -> Option<&Core> {
        self.cores.iter().find(|c| c.pus.contains(&pu))
    }

    /// All PU ids, ascending.
    #[must_use]
    pub fn pus(&self) -> Vec<u32> {
        let mut pus: Vec<u32> = self
            .cores
            .iter()
            .flat_map(|c| c.pus.iter().copied())
            .collect();
        pus.sort_unstable();
        pus
    }

    /// The GPU named by PCI bus id or OS device name.
    #[must_use]
    pub fn gpu(&self, name: &str) -> Option<&Device> {
        self.devices
            .iter()
            .find(|d| d.kind == DeviceKind::Gpu && d.is_named(name))
    }

    /// Total memory over all nodes.
    #[must_use]
    pub fn memory_bytes(&self) -> u64 {
        self.nodes.iter().map(|n| n.memory_bytes).sum()
    }
}

/// Distances from the package structure when the platform reports none.
pub(crate) fn derived_distances(nodes: &[NumaNode]) -> Distances {
    let ids: Vec<u32> = nodes.iter().map(|n| n.id).collect();
    let mut values = Vec::with_capacity(ids.len() * ids.len());
    for a in nodes {
        for b in nodes {
            let d = if a.id == b.id {
                10
            } else if a.package.is_some() && a.package == b.package {
                20
            } else {
                30
            };
            values.push(d);
        }
    }
    Distances {
        nodes: ids,
        values,
        origin: DistanceOrigin::Derived,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(id: u32, package: u32) -> NumaNode {
        NumaNode {
            id,
            package: Some(package),
            memory_bytes: 1 << 30,
            pus: vec![id],
            cores: vec![],
        }
    }

    #[test]
    fn derived_distances_same_package_nearer_than_other_package() {
        let nodes = [node(0, 0), node(1, 0), node(2, 1)];
        let d = derived_distances(&nodes);
        assert_eq!(d.values, vec![10, 20, 30, 20, 10, 30, 30, 30, 10]);
        assert_eq!(d.origin, DistanceOrigin::Derived);
    }
}
