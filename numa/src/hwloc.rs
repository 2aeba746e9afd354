//! Loading a [`HostTopology`] through hwloc (hwlocality).
//!
//! The only module that touches hwloc. It builds an hwloc topology from the
//! live machine, an XML file or document, or a synthetic description, and
//! converts it at once into the plain model of `topology.rs`.

use std::collections::BTreeSet;
use std::path::Path;

use hwlocality::Topology;
use hwlocality::bitmap::BitmapIndex;
use hwlocality::object::TopologyObject;
use hwlocality::object::attributes::ObjectAttributes;
use hwlocality::object::distance::DistancesKind;
use hwlocality::object::types::{CacheType, ObjectType};
use hwlocality::topology::builder::{TopologyBuilder, TypeFilter};
use thiserror::Error;

use crate::topology::{
    Cache, CacheKind, Core, Device, DeviceKind, DistanceOrigin, Distances, HostTopology, NumaNode,
    Package, TopologySource, derived_distances,
};

/// Why a topology could not be loaded.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum TopologyError {
    /// hwloc could not discover the running machine.
    #[error("hwloc could not discover this machine's topology: {reason}")]
    Live {
        /// hwloc's own words.
        reason: String,
    },
    /// The synthetic description was rejected by hwloc.
    #[error(
        "hwloc rejected the synthetic topology description {description:?} (expected e.g. \"pack:2 numa:2(memory=8GiB) core:4 pu:2\")"
    )]
    Synthetic {
        /// The description as given.
        description: String,
    },
    /// The XML file could not be read or is not an hwloc topology.
    #[error(
        "hwloc could not import the XML topology file {path}: missing, unreadable or not hwloc XML"
    )]
    XmlFile {
        /// The file's path as given.
        path: String,
    },
    /// The in-memory XML document is not an hwloc topology.
    #[error("hwloc could not import the XML topology document: not hwloc XML")]
    XmlText,
    /// hwloc loaded something, but not a topology the planner can use.
    #[error("the topology from {source_name} is unusable: {reason}")]
    Unusable {
        /// Where it came from.
        source_name: String,
        /// What is missing.
        reason: String,
    },
}

impl HostTopology {
    /// Discover the running machine (with its GPUs and NICs).
    ///
    /// # Errors
    /// [`TopologyError::Live`] if hwloc fails, [`TopologyError::Unusable`]
    /// if it reports no PU.
    pub fn live() -> Result<Self, TopologyError> {
        let builder = io_builder().map_err(|reason| TopologyError::Live { reason })?;
        let topo = builder.build().map_err(|e| TopologyError::Live {
            reason: e.to_string(),
        })?;
        convert(&topo, TopologySource::Live)
    }

    /// Import an hwloc XML file (as written by `lstopo file.xml`).
    ///
    /// # Errors
    /// [`TopologyError::XmlFile`] if the file is missing or malformed.
    pub fn from_xml_file(path: impl AsRef<Path>) -> Result<Self, TopologyError> {
        let path = path.as_ref();
        let shown = path.display().to_string();
        let err = || TopologyError::XmlFile {
            path: shown.clone(),
        };
        // hwloc prints parser complaints on stderr and returns EINVAL; check
        // that the file exists first so a typo gets the same clear error.
        if !path.is_file() {
            return Err(err());
        }
        let builder = io_builder().map_err(|_| err())?;
        let topo = builder
            .from_xml_file(path)
            .map_err(|_| err())?
            .build()
            .map_err(|_| err())?;
        convert(
            &topo,
            TopologySource::XmlFile {
                path: shown.clone(),
            },
        )
    }

    /// Import an hwloc XML document held in memory.
    ///
    /// # Errors
    /// [`TopologyError::XmlText`] if it is not hwloc XML.
    pub fn from_xml(xml: &str) -> Result<Self, TopologyError> {
        let builder = io_builder().map_err(|_| TopologyError::XmlText)?;
        let topo = builder
            .from_xml(xml)
            .map_err(|_| TopologyError::XmlText)?
            .build()
            .map_err(|_| TopologyError::XmlText)?;
        convert(&topo, TopologySource::XmlText)
    }

    /// Build a topology from an hwloc synthetic description, e.g.
    /// `"pack:2 numa:2(memory=8GiB) core:4 pu:2"` (two sockets, four nodes).
    ///
    /// # Errors
    /// [`TopologyError::Synthetic`] if hwloc rejects the description.
    pub fn from_synthetic(description: &str) -> Result<Self, TopologyError> {
        let err = || TopologyError::Synthetic {
            description: description.to_owned(),
        };
        let topo = Topology::builder()
            .from_synthetic(description)
            .map_err(|_| err())?
            .build()
            .map_err(|_| err())?;
        convert(
            &topo,
            TopologySource::Synthetic {
                description: description.to_owned(),
            },
        )
    }
}

/// A builder that keeps the I/O objects that matter (GPUs, NICs).
fn io_builder() -> Result<TopologyBuilder, String> {
    Topology::builder()
        .with_io_type_filter(TypeFilter::KeepImportant)
        .map_err(|e| e.to_string())
}

fn source_name(source: &TopologySource) -> String {
    match source {
        TopologySource::Live => "this machine".to_owned(),
        TopologySource::XmlFile { path } => format!("XML file {path}"),
        TopologySource::XmlText => "an XML document".to_owned(),
        TopologySource::Synthetic { description } => format!("synthetic {description:?}"),
    }
}

fn to_u32(i: BitmapIndex) -> u32 {
    u32::try_from(usize::from(i)).unwrap_or(u32::MAX)
}

fn cpus_of(obj: &TopologyObject) -> Vec<u32> {
    obj.cpuset()
        .map(|set| set.iter_set().map(to_u32).collect())
        .unwrap_or_default()
}

fn nodes_of(obj: &TopologyObject) -> Vec<u32> {
    obj.nodeset()
        .map(|set| set.iter_set().map(to_u32).collect())
        .unwrap_or_default()
}

fn package_index(obj: &TopologyObject) -> Option<u32> {
    obj.first_ancestor_with_type(ObjectType::Package)
        .and_then(|p| u32::try_from(p.logical_index()).ok())
}

fn convert(topo: &Topology, source: TopologySource) -> Result<HostTopology, TopologyError> {
    let unusable = |reason: &str| TopologyError::Unusable {
        source_name: source_name(&source),
        reason: reason.to_owned(),
    };

    let mut packages: Vec<Package> = topo
        .objects_with_type(ObjectType::Package)
        .map(|p| Package {
            index: u32::try_from(p.logical_index()).unwrap_or(u32::MAX),
            nodes: Vec::new(),
            pus: cpus_of(p),
        })
        .collect();

    let mut nodes: Vec<NumaNode> = Vec::new();
    for n in topo.objects_with_type(ObjectType::NUMANode) {
        let Some(id) = n.os_index().and_then(|i| u32::try_from(i).ok()) else {
            return Err(unusable("a NUMA node has no OS index"));
        };
        let memory_bytes = match n.attributes() {
            Some(ObjectAttributes::NUMANode(a)) => a.local_memory().map_or(0, |m| m.get()),
            _ => 0,
        };
        let pus = cpus_of(n);
        // A memory object hangs off a normal object; its package is that
        // object's package, else the package whose PUs cover the node's.
        let package = n
            .parent()
            .and_then(|p| {
                if p.object_type() == ObjectType::Package {
                    u32::try_from(p.logical_index()).ok()
                } else {
                    package_index(p)
                }
            })
            .or_else(|| {
                packages
                    .iter()
                    .find(|p| !pus.is_empty() && pus.iter().all(|c| p.pus.contains(c)))
                    .map(|p| p.index)
            });
        nodes.push(NumaNode {
            id,
            package,
            memory_bytes,
            pus,
            cores: Vec::new(),
        });
    }
    if nodes.is_empty() {
        return Err(unusable("hwloc reported no NUMA node"));
    }
    nodes.sort_by_key(|n| n.id);

    let mut cores: Vec<Core> = topo
        .objects_with_type(ObjectType::Core)
        .map(|c| Core {
            index: c.logical_index(),
            package: package_index(c),
            node: None,
            pus: cpus_of(c),
        })
        .collect();
    if cores.is_empty() {
        // Some platforms report PUs without cores: each PU is then a core.
        cores = topo
            .objects_with_type(ObjectType::PU)
            .map(|p| Core {
                index: p.logical_index(),
                package: package_index(p),
                node: None,
                pus: cpus_of(p),
            })
            .collect();
    }
    cores.retain(|c| !c.pus.is_empty());
    if cores.is_empty() {
        return Err(unusable("hwloc reported no processing unit"));
    }
    for (i, core) in cores.iter_mut().enumerate() {
        core.index = i;
        let first = core.pus.first().copied();
        if let Some(node) = nodes
            .iter_mut()
            .find(|n| first.is_some_and(|f| n.pus.contains(&f)))
        {
            core.node = Some(node.id);
            node.cores.push(i);
        }
    }
    for p in &mut packages {
        p.nodes = nodes
            .iter()
            .filter(|n| n.package == Some(p.index))
            .map(|n| n.id)
            .collect();
    }

    let caches = topo
        .objects()
        .filter(|o| o.object_type().is_cpu_cache())
        .filter_map(|o| match o.attributes() {
            Some(ObjectAttributes::Cache(a)) => Some(Cache {
                level: u8::try_from(a.depth()).unwrap_or(u8::MAX),
                kind: match a.cache_type() {
                    CacheType::Data => CacheKind::Data,
                    CacheType::Instruction => CacheKind::Instruction,
                    _ => CacheKind::Unified,
                },
                size_bytes: a.size().map_or(0, |s| s.get()),
                pus: cpus_of(o),
            }),
            _ => None,
        })
        .collect::<Vec<_>>();
    let mut caches = caches;
    caches.sort_by(|a, b| (a.level, &a.pus).cmp(&(b.level, &b.pus)));

    let distances = reported_distances(topo, &nodes).unwrap_or_else(|| derived_distances(&nodes));

    let all_nodes: Vec<u32> = nodes.iter().map(|n| n.id).collect();
    let mut devices = Vec::new();
    for pci in topo.pci_devices() {
        let Some(ObjectAttributes::PCIDevice(attr)) = pci.attributes() else {
            continue;
        };
        let kind = match attr.class_id() >> 8 {
            0x03 | 0x12 => DeviceKind::Gpu,
            0x02 => DeviceKind::Nic,
            _ => continue,
        };
        let names = pci
            .io_children()
            .filter(|c| c.object_type() == ObjectType::OSDevice)
            .filter_map(|c| c.name().map(|n| n.to_string_lossy().into_owned()))
            .collect();
        let mut local: Vec<u32> = pci
            .first_non_io_ancestor()
            .map(nodes_of)
            .unwrap_or_default();
        local.retain(|n| all_nodes.contains(n));
        if local.is_empty() {
            local.clone_from(&all_nodes);
        }
        devices.push(Device {
            kind,
            pci_bus_id: format!(
                "{:04x}:{:02x}:{:02x}.{:x}",
                attr.domain(),
                attr.bus_id(),
                attr.bus_device(),
                attr.function()
            ),
            names,
            nodes: local,
        });
    }

    let topology = HostTopology {
        source,
        packages,
        nodes,
        cores,
        caches,
        distances,
        devices,
    };
    tracing::debug!(
        source = %source_name(&topology.source),
        packages = topology.packages.len(),
        nodes = topology.nodes.len(),
        cores = topology.cores.len(),
        pus = topology.pus().len(),
        devices = topology.devices.len(),
        distances = ?topology.distances.origin,
        "topology loaded"
    );
    Ok(topology)
}

/// The platform's NUMA distance matrix, reordered to our node order; a
/// latency matrix is preferred over others.
fn reported_distances(topo: &Topology, nodes: &[NumaNode]) -> Option<Distances> {
    let all = topo.distances(None).ok()?;
    let numa = all.iter().filter(|d| {
        d.objects()
            .all(|o| o.is_some_and(|o| o.object_type() == ObjectType::NUMANode))
    });
    let chosen = numa
        .clone()
        .find(|d| d.kind().contains(DistancesKind::MEANS_LATENCY))
        .or_else(|| numa.clone().next())?;
    let ids: Vec<Option<u32>> = chosen
        .objects()
        .map(|o| {
            o.and_then(|o| o.os_index())
                .and_then(|i| u32::try_from(i).ok())
        })
        .collect();
    let have: BTreeSet<u32> = ids.iter().flatten().copied().collect();
    if nodes.iter().any(|n| !have.contains(&n.id)) {
        return None;
    }
    let m = ids.len();
    let raw = chosen.distances();
    let pos = |id: u32| ids.iter().position(|&x| x == Some(id));
    let mut values = Vec::with_capacity(nodes.len() * nodes.len());
    for a in nodes {
        for b in nodes {
            let (i, j) = (pos(a.id)?, pos(b.id)?);
            values.push(*raw.get(i * m + j)?);
        }
    }
    Some(Distances {
        nodes: nodes.iter().map(|n| n.id).collect(),
        values,
        origin: DistanceOrigin::Reported,
    })
}
