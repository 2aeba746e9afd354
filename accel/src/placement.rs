//! GPU placement: a pure function from devices, current holders and one VM's
//! demand to the device it should get.
//!
//! Rules, in order:
//! 1. **Fits**: the device's free memory, less what shared holders have
//!    reserved on it, covers the demand.
//! 2. **Exclusive never overlaps**: an exclusive demand takes only a device
//!    nobody holds (nor its parent GPU or its MIG instances); a shared demand
//!    takes no device that someone holds exclusively.
//! 3. **Nearest NUMA node**: the device closest to the VM's node (distance
//!    from the node table; unknown nodes rank last).
//! 4. **Least fragmenting**: a MIG instance before a whole GPU, then the
//!    smallest sufficient free memory (best fit), then the device id, so the
//!    choice is deterministic.

use serde::{Deserialize, Serialize};

use crate::error::PlacementError;
use crate::sysfs::NodeDistances;

/// What a slot is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, PartialOrd, Ord)]
#[serde(rename_all = "kebab-case")]
pub enum SlotKind {
    /// A MIG instance.
    Mig,
    /// A whole GPU (MIG off).
    Gpu,
}

impl SlotKind {
    /// `gpu` or `mig`.
    pub fn as_str(self) -> &'static str {
        match self {
            SlotKind::Gpu => "gpu",
            SlotKind::Mig => "mig",
        }
    }
}

/// A device a VM can hold: a whole GPU, or a MIG instance of one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceSlot {
    /// The GPU's UUID, the MIG instance's UUID, or `GPU-…/giN/ciM` for a MIG
    /// instance whose UUID the source did not give.
    pub id: String,
    /// The UUID of the GPU it is, or is part of.
    pub parent_uuid: String,
    /// Whole GPU or MIG instance.
    pub kind: SlotKind,
    /// The GPU's NUMA node.
    pub numa_node: Option<u32>,
    /// Its memory.
    pub total_mib: u64,
    /// Its free memory as read.
    pub free_mib: u64,
}

/// A reservation as placement sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Holder {
    /// The VM.
    pub vm: String,
    /// The slot id it holds.
    pub device_id: String,
    /// The GPU the slot is, or is part of.
    pub parent_uuid: String,
    /// Whole GPU or MIG instance.
    pub kind: SlotKind,
    /// Whether nobody else may use the device.
    pub exclusive: bool,
    /// Memory it reserved, MiB.
    pub mem_mib: u64,
}

/// One VM's GPU demand.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Demand {
    /// The VM.
    pub vm: String,
    /// Predicted GPU memory, MiB (a high quantile of the forecast).
    pub mem_mib: u64,
    /// The NUMA node the VM's memory and vCPUs are on.
    pub numa_node: Option<u32>,
    /// Whether it needs the device to itself (passthrough, exclusive compute).
    pub exclusive: bool,
}

/// The chosen device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Choice {
    /// The slot.
    pub slot: DeviceSlot,
    /// NUMA distance from the VM's node (`None`: a node is unknown).
    pub distance: Option<u32>,
    /// What stays available on the slot after this demand, MiB.
    pub left_mib: u64,
}

/// Whether holder `h` and slot `s` share hardware: the same slot, or one is
/// the whole GPU the other is part of.
fn overlaps(h: &Holder, s: &DeviceSlot) -> bool {
    h.device_id == s.id
        || (h.parent_uuid == s.parent_uuid && (h.kind == SlotKind::Gpu || s.kind == SlotKind::Gpu))
}

/// What is available on `slot` given the holders (`None`: it cannot be held
/// for this demand at all).
pub fn available_mib(slot: &DeviceSlot, holders: &[Holder], exclusive: bool) -> Option<u64> {
    let mut reserved = 0u64;
    for h in holders.iter().filter(|h| overlaps(h, slot)) {
        if h.exclusive || exclusive {
            return None;
        }
        if h.device_id == slot.id {
            reserved = reserved.saturating_add(h.mem_mib);
        }
    }
    Some(slot.free_mib.saturating_sub(reserved))
}

/// Placement's order: NUMA distance, kind (MIG first), available MiB (best
/// fit), id.
type RankKey<'a> = (u32, SlotKind, u64, &'a str);

/// Chooses the device for `demand` (see the module's rules).
pub fn place(
    slots: &[DeviceSlot],
    holders: &[Holder],
    demand: &Demand,
    distances: &NodeDistances,
) -> Result<Choice, PlacementError> {
    if slots.is_empty() {
        return Err(PlacementError::NoDevices);
    }
    let mut best: Option<(RankKey<'_>, Choice)> = None;
    let mut largest_free = 0u64;
    for s in slots {
        let Some(avail) = available_mib(s, holders, demand.exclusive) else {
            continue;
        };
        largest_free = largest_free.max(avail);
        if avail < demand.mem_mib {
            continue;
        }
        let distance = distances.distance(demand.numa_node, s.numa_node);
        let rank_distance = match (demand.numa_node, distance) {
            (None, _) => 0,
            (Some(_), Some(d)) => d,
            (Some(_), None) => u32::MAX,
        };
        let key = (rank_distance, s.kind, avail, s.id.as_str());
        if best.as_ref().is_none_or(|(k, _)| key < *k) {
            let left_mib = if demand.exclusive {
                0
            } else {
                avail - demand.mem_mib
            };
            best = Some((
                key,
                Choice {
                    slot: s.clone(),
                    distance,
                    left_mib,
                },
            ));
        }
    }
    best.map(|(_, c)| c).ok_or(PlacementError::NoFit {
        demand_mib: demand.mem_mib,
        exclusive: demand.exclusive,
        largest_free_mib: largest_free,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slot(id: &str, parent: &str, kind: SlotKind, node: u32, free: u64) -> DeviceSlot {
        DeviceSlot {
            id: id.to_string(),
            parent_uuid: parent.to_string(),
            kind,
            numa_node: Some(node),
            total_mib: free,
            free_mib: free,
        }
    }

    fn demand(mem: u64, node: Option<u32>, exclusive: bool) -> Demand {
        Demand {
            vm: "vm".to_string(),
            mem_mib: mem,
            numa_node: node,
            exclusive,
        }
    }

    #[test]
    fn mig_instance_that_fits_beats_whole_gpu_on_the_same_node() {
        let slots = vec![
            slot("GPU-a", "GPU-a", SlotKind::Gpu, 0, 40_000),
            slot("GPU-b/gi3/ci0", "GPU-b", SlotKind::Mig, 0, 19_955),
        ];
        let c = place(
            &slots,
            &[],
            &demand(8_000, Some(0), false),
            &NodeDistances::default(),
        );
        assert_eq!(c.map(|c| c.slot.id).ok().as_deref(), Some("GPU-b/gi3/ci0"));
    }

    #[test]
    fn nearer_node_beats_tighter_fit() {
        let d = NodeDistances::from_rows(vec![vec![10, 21], vec![21, 10]]);
        let slots = vec![
            slot("GPU-far", "GPU-far", SlotKind::Gpu, 1, 9_000),
            slot("GPU-near", "GPU-near", SlotKind::Gpu, 0, 80_000),
        ];
        let c = place(&slots, &[], &demand(8_000, Some(0), false), &d);
        assert_eq!(c.map(|c| c.slot.id).ok().as_deref(), Some("GPU-near"));
    }

    #[test]
    fn exclusive_holder_blocks_its_mig_instances_and_shared_holders_block_exclusive() {
        let slots = vec![
            slot("GPU-a/gi1/ci0", "GPU-a", SlotKind::Mig, 0, 20_000),
            slot("GPU-a/gi2/ci0", "GPU-a", SlotKind::Mig, 0, 20_000),
        ];
        let whole = Holder {
            vm: "old".to_string(),
            device_id: "GPU-a".to_string(),
            parent_uuid: "GPU-a".to_string(),
            kind: SlotKind::Gpu,
            exclusive: true,
            mem_mib: 0,
        };
        let r = place(
            &slots,
            std::slice::from_ref(&whole),
            &demand(1, None, false),
            &NodeDistances::default(),
        );
        assert!(
            matches!(
                r,
                Err(PlacementError::NoFit {
                    largest_free_mib: 0,
                    ..
                })
            ),
            "{r:?}"
        );

        let shared = Holder {
            vm: "old".to_string(),
            device_id: "GPU-a/gi1/ci0".to_string(),
            parent_uuid: "GPU-a".to_string(),
            kind: SlotKind::Mig,
            exclusive: false,
            mem_mib: 15_000,
        };
        let c = place(
            &slots,
            std::slice::from_ref(&shared),
            &demand(1_000, None, true),
            &NodeDistances::default(),
        );
        assert_eq!(c.map(|c| c.slot.id).ok().as_deref(), Some("GPU-a/gi2/ci0"));
        // Shared: the reserved 15 GB count against the first instance.
        let c = place(
            &slots,
            std::slice::from_ref(&shared),
            &demand(6_000, None, false),
            &NodeDistances::default(),
        );
        assert_eq!(c.map(|c| c.slot.id).ok().as_deref(), Some("GPU-a/gi2/ci0"));
        let c = place(
            &slots,
            std::slice::from_ref(&shared),
            &demand(4_000, None, false),
            &NodeDistances::default(),
        );
        assert_eq!(
            c.map(|c| (c.slot.id, c.left_mib)).ok(),
            Some(("GPU-a/gi1/ci0".to_string(), 1_000))
        );
    }

    #[test]
    fn no_devices_and_no_fit_say_why() {
        let d = NodeDistances::default();
        assert_eq!(
            place(&[], &[], &demand(1, None, false), &d),
            Err(PlacementError::NoDevices)
        );
        let slots = vec![slot("GPU-a", "GPU-a", SlotKind::Gpu, 0, 4_000)];
        let e = place(&slots, &[], &demand(8_000, None, false), &d);
        assert_eq!(
            e,
            Err(PlacementError::NoFit {
                demand_mib: 8_000,
                exclusive: false,
                largest_free_mib: 4_000
            })
        );
    }
}
