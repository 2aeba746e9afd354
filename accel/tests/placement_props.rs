//! Placement properties over random hosts, holders and demands: never two
//! exclusive holders of overlapping hardware, never more than free memory,
//! the nearest node that fits, best fit within it.
#![allow(clippy::unwrap_used)]

use accel::{
    Demand, DeviceSlot, Holder, NodeDistances, PlacementError, SlotKind, available_mib, place,
};
use proptest::prelude::*;

fn distances() -> NodeDistances {
    // A 4-node ring-ish SLIT, as on a two-socket host with sub-NUMA clusters.
    NodeDistances::from_rows(vec![
        vec![10, 11, 21, 21],
        vec![11, 10, 21, 21],
        vec![21, 21, 10, 11],
        vec![21, 21, 11, 10],
    ])
}

/// GPUs, each either whole or split into MIG instances.
fn host() -> impl Strategy<Value = Vec<DeviceSlot>> {
    proptest::collection::vec(
        (
            0u32..4,
            prop_oneof![Just(16_384u64), Just(24_576), Just(40_960), Just(81_920)],
            0u64..=100,
            proptest::option::of(1usize..=7),
        ),
        0..6,
    )
    .prop_map(|gpus| {
        let mut slots = Vec::new();
        for (i, (node, total, used_pct, mig)) in gpus.into_iter().enumerate() {
            let uuid = format!("GPU-{i:08x}");
            match mig {
                None => slots.push(DeviceSlot {
                    id: uuid.clone(),
                    parent_uuid: uuid,
                    kind: SlotKind::Gpu,
                    numa_node: Some(node),
                    total_mib: total,
                    free_mib: total - total * used_pct / 100,
                }),
                Some(n) => {
                    let each = total / 8;
                    for gi in 0..n {
                        slots.push(DeviceSlot {
                            id: format!("{uuid}/gi{gi}/ci0"),
                            parent_uuid: uuid.clone(),
                            kind: SlotKind::Mig,
                            numa_node: Some(node),
                            total_mib: each,
                            free_mib: each - each * used_pct / 100,
                        });
                    }
                }
            }
        }
        slots
    })
}

fn demands() -> impl Strategy<Value = Vec<(u64, Option<u32>, bool)>> {
    proptest::collection::vec(
        (0u64..50_000, proptest::option::of(0u32..4), any::<bool>()),
        1..24,
    )
}

fn overlap(a: &Holder, b: &Holder) -> bool {
    a.device_id == b.device_id
        || (a.parent_uuid == b.parent_uuid && (a.kind == SlotKind::Gpu || b.kind == SlotKind::Gpu))
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(400))]

    #[test]
    fn placing_one_vm_after_another_keeps_every_invariant(slots in host(), ds in demands()) {
        let dist = distances();
        let mut holders: Vec<Holder> = Vec::new();
        for (i, (mem, node, exclusive)) in ds.into_iter().enumerate() {
            let d = Demand { vm: format!("vm-{i}"), mem_mib: mem, numa_node: node, exclusive };
            match place(&slots, &holders, &d, &dist) {
                Ok(c) => {
                    // Never over free memory.
                    let avail = available_mib(&c.slot, &holders, exclusive).unwrap();
                    prop_assert!(avail >= mem);
                    // Nearest node: no feasible slot is strictly nearer.
                    let feasible: Vec<&DeviceSlot> = slots
                        .iter()
                        .filter(|s| available_mib(s, &holders, exclusive).is_some_and(|a| a >= mem))
                        .collect();
                    if node.is_some() {
                        let best = feasible
                            .iter()
                            .map(|s| dist.distance(node, s.numa_node).unwrap())
                            .min()
                            .unwrap();
                        prop_assert_eq!(c.distance, Some(best));
                    }
                    // Least fragmenting among the equally near, same kind.
                    for s in &feasible {
                        if dist.distance(node, s.numa_node) == c.distance || node.is_none() {
                            prop_assert!(s.kind >= c.slot.kind,
                                "a MIG instance fitted but a whole GPU was chosen");
                            if s.kind == c.slot.kind {
                                prop_assert!(available_mib(s, &holders, exclusive).unwrap() >= avail);
                            }
                        }
                    }
                    holders.push(Holder {
                        vm: d.vm.clone(),
                        device_id: c.slot.id.clone(),
                        parent_uuid: c.slot.parent_uuid.clone(),
                        kind: c.slot.kind,
                        exclusive,
                        mem_mib: mem,
                    });
                }
                Err(PlacementError::NoDevices) => prop_assert!(slots.is_empty()),
                Err(PlacementError::NoFit { largest_free_mib, .. }) => {
                    // Really nothing fits.
                    for s in &slots {
                        prop_assert!(available_mib(s, &holders, exclusive).is_none_or(|a| a < mem));
                    }
                    prop_assert!(largest_free_mib < mem);
                }
                Err(e) => prop_assert!(false, "unexpected {e:?}"),
            }
        }
        // Never two holders of overlapping hardware where either is exclusive.
        for (i, a) in holders.iter().enumerate() {
            for b in &holders[i + 1..] {
                prop_assert!(!(overlap(a, b) && (a.exclusive || b.exclusive)), "{a:?} and {b:?}");
            }
        }
        // Shared holders never reserve more than a slot had free.
        for s in &slots {
            let reserved: u64 = holders.iter().filter(|h| h.device_id == s.id).map(|h| h.mem_mib).sum();
            let exclusive = holders.iter().any(|h| h.device_id == s.id && h.exclusive);
            if !exclusive {
                prop_assert!(reserved <= s.free_mib);
            }
        }
    }

    #[test]
    fn placement_is_deterministic_and_order_independent(slots in host(), mem in 0u64..40_000, node in proptest::option::of(0u32..4)) {
        let d = Demand { vm: "vm".to_string(), mem_mib: mem, numa_node: node, exclusive: false };
        let a = place(&slots, &[], &d, &distances());
        let mut rev = slots.clone();
        rev.reverse();
        let b = place(&rev, &[], &d, &distances());
        prop_assert_eq!(a.map(|c| c.slot.id), b.map(|c| c.slot.id));
    }
}
